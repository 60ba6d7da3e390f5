"""Every example workflow runs on a real ComfyUI server and saves finite, non-constant images.

The workflows are what users load (CheckpointLoaderSimple, CLIPTextEncode, VAEDecode). No
checkpoint exists here, so converting them to the API format (with ``noisecraft.workflow_api``, the converter
of run-graph) swaps those three node types for the test-only stand-ins of ``nc_test_pack`` (same widgets
and outputs) and shrinks the empty latent to 128x128 so a CPU run takes seconds; every other node and value
is the workflow's own.
(For the NPNet example the tiny model is SDXL-shaped, with 2048-wide text, and NPNet Golden Noise
runs on a 16x16 latent through its any-resolution policy.) The NPNet files the examples load are
written into the server's models/npnet with seeded random weights (nothing is downloaded), the prompt
file of the paper-scale example into its input folder, and a tiny random LAION aesthetic scorer (a
transformers CLIP vision model + the head) into the folder the server's $NOISECRAFT_AESTHETIC names.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
SUBSTITUTE = {
    "CheckpointLoaderSimple": "NC_Test_TinyCheckpoint",
    "CLIPTextEncode": "NC_Test_TextEncode",
    "VAEDecode": "NC_Test_VAEDecode",
}
OVERRIDES = {"EmptyLatentImage": {"width": 128, "height": 128}}
NC_NODES = {"NC_InversionStabilitySelect", "NC_OptimizeNoise", "NC_NoiseToLatent", "NC_LoadNPNet",
            "NC_NPNetGoldenNoise", "NC_LoadRefiner", "NC_RefineNoise", "NC_BuildTeacherCache",
            "NC_TrainRefiner", "NC_SaveRefiner", "NC_FilterTeacherCache", "NC_LoadPrompts",
            "NC_LoadTeacherCache"}
REPORTING_NODES = {"NC_InversionStabilitySelect", "NC_OptimizeNoise"}  # the nodes that send UI data
NPNET_FILES = {"sdxl.safetensors": "sdxl"}  # file name in the examples -> preset of the random stand-in
# file name in the examples -> tiny model family (its refiner records the fingerprint of that tiny model, seed 0)
REFINER_FILES = {"sd15_refiner.safetensors": "sd15", "sdxl_base_refiner.safetensors": "sdxl"}
HEADLESS = {"train_refiner", "train_refiner_pag", "train_refiner_paper"}  # training workflows: they save a model file, not images (tested below)
IMAGE_WORKFLOWS = [p for p in WORKFLOWS if p.stem not in HEADLESS]
# Tiny step counts for the training example (its own values are for real use).
TRAIN_OVERRIDES = {
    "NC_BuildTeacherCache": {"samples_per_prompt": 1, "steps": 3},
    "NC_TrainRefiner": {"steps": 3, "student_steps": 2, "rank": 2, "batch_size": 2, "learning_rate": 1e-3},
}
# The paper-scale example (train_refiner_paper.json): tiny teacher steps, training steps and rank, and a keep that
# fits the tiny prompt file below; its other values (2 samples per prompt, micro-batch 2, PAG 3, the aesthetic
# filter, bf16, grad_accum 4, warmup, validation, the cache and run names) run as shipped.
PAPER_OVERRIDES = {
    "NC_BuildTeacherCache": {"steps": 3},
    "NC_FilterTeacherCache": {"keep": 8},
    "NC_TrainRefiner": TRAIN_OVERRIDES["NC_TrainRefiner"],
}
# input/prompts.jsonl for it: 26 lines, 24 distinct prompts (dedupe drops 2); Load Prompts holds 16 out for
# validation, so the teacher cache has 8 prompts x 2 samples = 16, of which the filter keeps 8
PROMPT_FILE = "prompts.jsonl"
PAPER_PROMPTS = [f"a {c} {t} on a {w} day, photograph" for c in ("red", "blue", "green", "yellow")
                 for t in ("boat", "house", "bicycle") for w in ("sunny", "rainy")]


def stand_in(ui: dict) -> dict:
    """A copy of UI workflow ``ui`` with the test pack's stand-ins in place of the three node types."""
    ui = copy.deepcopy(ui)
    for n in ui["nodes"]:
        n["type"] = SUBSTITUTE.get(n["type"], n["type"])
    return ui


def _prompt(ui: dict, object_info, **overrides) -> dict:
    """The UI workflow in API format (by ``noisecraft.workflow_api``, the converter run-graph uses) with the
    stand-in nodes, the small latent and ``overrides`` ({node type: {input: value}})."""
    from noisecraft.workflow_api import ui_to_api

    prompt = ui_to_api(stand_in(ui), object_info)
    for node in prompt.values():
        node["inputs"].update({**OVERRIDES, **overrides}.get(node["class_type"], {}))
    return prompt


def _run_ok(server, prompt: dict, ui: dict) -> dict:
    """Run ``prompt`` on the server; it must succeed. Returns its history entry."""
    entry = server.run_prompt(prompt, ui)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[:3000]
    return entry


def _ui_values(entry: dict, key: str) -> list:
    """What the nodes of a finished prompt sent as UI data under ``key``, one item per node."""
    return [out[key] for out in entry["outputs"].values() if key in out]


def test_there_is_one_example_workflow_per_node_with_a_thumbnail():
    names = {p.stem for p in WORKFLOWS}
    assert {"stability_select", "optimize_noise", "noise_to_latent", "npnet_golden_noise",
            "refined_guidance_free", "refined_finetune"} <= names
    for p in WORKFLOWS:
        assert p.with_suffix(".png").is_file(), f"{p.name} has no same-name thumbnail"


def test_the_server_lists_the_examples_as_templates(server):
    templates = server.get("/workflow_templates")
    assert set(templates.get("ComfyUI-NoiseCraft", [])) >= {p.stem for p in WORKFLOWS}


def test_every_noisecraft_node_is_registered(object_info):
    for node_id in sorted(NC_NODES):
        assert node_id in object_info
        assert object_info[node_id]["category"].startswith("noisecraft/")


@pytest.fixture(scope="session")
def npnet_files(server):
    """models/npnet/<name> in the server's base folder: seeded random NPNets of the examples' presets."""
    from noisecraft.npnet import random_npnet, save_npnet_safetensors

    folder = server.base / "models" / "npnet"
    folder.mkdir(parents=True, exist_ok=True)
    for name, preset in NPNET_FILES.items():
        if not (folder / name).is_file():
            save_npnet_safetensors(random_npnet(preset, seed=0), folder / name)
    return folder


@pytest.fixture(scope="session")
def prompt_file(server):
    """input/prompts.jsonl of the server: the paper example's prompts (JSONL, two lines repeated)."""
    folder = server.base / "input"
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"prompt": t}) + "\n" for t in PAPER_PROMPTS + PAPER_PROMPTS[:2])
    path = folder / PROMPT_FILE
    if not path.is_file() or path.read_text() != text:  # (unchanged: Load Prompts' fingerprint, the mtime, stays)
        path.write_text(text)
    return path


@pytest.fixture(scope="session")
def aesthetic_weights(server):
    """A tiny random LAION aesthetic scorer (noisecraft.train.aesthetic's layout: ``clip/`` in Hugging Face format and
    ``head.safetensors``) where the test server's $NOISECRAFT_AESTHETIC points (conftest.start_server)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from noisecraft.train.aesthetic import AestheticHead

    root = server.aesthetic
    if not (root / "head.safetensors").is_file():
        cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                            num_hidden_layers=2, image_size=32, patch_size=8, projection_dim=768)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(str(root / "clip"))
            head = AestheticHead(768)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(root / "head.safetensors"))
    return root


def _tiny_models():
    """The test pack's tiny_models module, imported in this process (ComfyUI as a library, on the CPU)."""
    import os

    if COMFYUI_PATH := os.environ.get("COMFYUI_PATH"):
        if COMFYUI_PATH not in sys.path:
            sys.path.insert(0, COMFYUI_PATH)
    from comfy.cli_args import args

    args.cpu = True
    args.use_pytorch_cross_attention = True
    spec = importlib.util.spec_from_file_location("noisecraft_e2e_tiny_models", HERE / "nc_test_pack" / "tiny_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def refiner_files(server):
    """models/loras/<name> in the server's base folder: seeded random refiner LoRAs for the tiny models, in the
    kohya format NoiseCraft exports (``tiny_models.random_refiner_lora``)."""
    from safetensors.torch import save_file

    folder = server.base / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    for name, family in REFINER_FILES.items():
        if (folder / name).is_file():
            continue
        tiny = _tiny_models()
        model = tiny.build(family, seed=0)
        state = tiny.random_refiner_lora(model, rank=2, seed=0)
        save_file(state, str(folder / name), metadata={"noisecraft.kind": "refiner", "noisecraft.model_kind": "eps",
                                                         "noisecraft.base_model": f"nc-test-tiny-{family}",
                                                         "noisecraft.base_fingerprint": _fingerprint(model)})
    return folder


def _fingerprint(model) -> str:
    """The base fingerprint (noisecraft/fingerprint.py) of a tiny UNet ModelPatcher, its weights named through
    ComfyUI's ``unet_to_diffusers`` table (as Train Refiner records it)."""
    import comfy.utils

    from noisecraft import fingerprint as fp

    table = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    params = dict(model.model.named_parameters())
    weights = [(m, params["diffusion_model." + table[m + ".weight"]]) for m in fp.UNET_MODULES if m + ".weight" in table]
    return json.dumps(fp.fingerprint(weights), sort_keys=True)


def _npnet_names(ui: dict) -> set:
    return {n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "NC_LoadNPNet"}


@pytest.mark.parametrize("path", IMAGE_WORKFLOWS, ids=[p.stem for p in IMAGE_WORKFLOWS])
def test_example_workflow_runs_and_saves_images(server, object_info, npnet_files, refiner_files, path):
    ui = json.loads(path.read_text())
    used = {n["type"] for n in ui["nodes"]}
    assert used & NC_NODES
    assert _npnet_names(ui) <= set(NPNET_FILES), "add the example's NPNet file to NPNET_FILES"
    refiners = {n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "NC_LoadRefiner"}
    assert refiners <= set(REFINER_FILES), "add the example's refiner file to REFINER_FILES"
    entry = _run_ok(server, _prompt(ui, object_info), ui)
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images, f"no images saved: {entry['outputs']}"
    for img in images:
        file = server.base / "output" / img.get("subfolder", "") / img["filename"]
        assert file.is_file(), file
        arr = np.asarray(Image.open(file).convert("RGB"), dtype=np.float32)
        assert arr.shape == (128, 128, 3)
        assert np.isfinite(arr).all() and arr.std() > 1.0, f"{file} is constant"
    if used & REPORTING_NODES:
        nc_ui = [out for out in entry["outputs"].values() if "noisecraft_scores" in out or "noisecraft_history" in out]
        assert nc_ui, "the NoiseCraft node sent no UI data"


def test_a_missing_npnet_file_fails_with_a_clear_error(server, object_info, npnet_files):
    ui = json.loads((REPO / "example_workflows" / "npnet_golden_noise.json").read_text())
    prompt = _prompt(ui, object_info)
    loader = next(n for n in prompt.values() if n["class_type"] == "NC_LoadNPNet")
    loader["inputs"]["npnet_name"] = "missing.safetensors"
    entry = server.run_prompt(prompt, ui)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "NC_LoadNPNet"
    assert "'missing.safetensors' not found" in errors[0]["exception_message"]
    assert "models/npnet" in errors[0]["exception_message"].replace("\\", "/")


def test_refined_example_saves_a_refined_and_a_cfg_image_that_differ(server, object_info, refiner_files):
    ui = json.loads((REPO / "example_workflows" / "refined_guidance_free.json").read_text())
    prompt = _prompt(ui, object_info)
    guiders = sorted(n["inputs"]["cfg"] for n in prompt.values() if n["class_type"] == "CFGGuider")
    assert guiders == [1.0, 7.0]
    entry = _run_ok(server, prompt, ui)
    arrays = {}
    for out in entry["outputs"].values():
        for img in out.get("images", []):
            file = server.base / "output" / img.get("subfolder", "") / img["filename"]
            arrays[img["filename"].split("_0")[0]] = np.asarray(Image.open(file).convert("RGB"), dtype=np.float32)
    assert set(arrays) == {"noisecraft_refined_cfg1", "noisecraft_cfg7"}
    assert np.abs(arrays["noisecraft_refined_cfg1"] - arrays["noisecraft_cfg7"]).max() > 1.0


def test_a_refiner_for_another_model_fails_with_a_clear_error(server, object_info, refiner_files):
    ui = json.loads((REPO / "example_workflows" / "refined_guidance_free.json").read_text())
    prompt = _prompt(ui, object_info)
    ckpt = next(n for n in prompt.values() if n["class_type"] == "NC_Test_TinyCheckpoint")
    ckpt["inputs"]["ckpt_name"] = "sd_xl_base_1.0.safetensors"  # the tiny SDXL-shaped model
    for n in prompt.values():
        if n["class_type"] == "NC_Test_TextEncode":
            n["inputs"]["text"] += " (xl)"
    entry = server.run_prompt(prompt, ui)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "NC_RefineNoise"
    msg = errors[0]["exception_message"]
    assert "sd15_refiner.safetensors (for nc-test-tiny-sd15" in msg and "does not fit this MODEL (SDXL)" in msg


def test_finetune_example_refines_with_the_base_and_samples_with_the_fine_tune(server, object_info, refiner_files):
    """refined_finetune.json: Refine Noise gets the base checkpoint's MODEL (and its CLIP's prompt), both samplers the
    fine-tune's (the stand-in gives a name with 'finetune' other weights); Refine Noise logs that it was fed the
    refiner's base, and fed the fine-tune instead (the other wiring) that this MODEL is not its base."""
    ui = json.loads((REPO / "example_workflows" / "refined_finetune.json").read_text())
    prompt = _prompt(ui, object_info)
    loaders = {n["inputs"]["ckpt_name"]: key for key, n in prompt.items() if n["class_type"] == "NC_Test_TinyCheckpoint"}
    base, tuned = loaders["sd_xl_base_1.0.safetensors"], loaders["my_sdxl_finetune.safetensors"]
    refine = next(n for n in prompt.values() if n["class_type"] == "NC_RefineNoise")
    assert refine["inputs"]["model"][0] == base
    assert prompt[refine["inputs"]["positive"][0]]["inputs"]["clip"][0] == base
    for key, n in prompt.items():
        if n["class_type"] in ("CFGGuider", "BasicScheduler"):
            assert n["inputs"]["model"][0] == tuned, (key, n)
        if n["class_type"] == "NC_Test_VAEDecode":
            assert n["inputs"]["vae"][0] == tuned
    assert sorted(n["inputs"]["cfg"] for n in prompt.values() if n["class_type"] == "CFGGuider") == [1.0, 7.0]
    start = len(server.log_path.read_text(errors="replace"))
    entry = _run_ok(server, prompt, ui)
    assert len([i for out in entry["outputs"].values() for i in out.get("images", [])]) == 2
    log = server.log_path.read_text(errors="replace")[start:]
    assert "Refine Noise: fed the base model the refiner sdxl_base_refiner.safetensors" in log, log[-3000:]

    refine["inputs"]["model"] = [tuned, 0]  # wiring (b): the refiner on the fine-tune
    start = len(server.log_path.read_text(errors="replace"))
    _run_ok(server, prompt, ui)
    log = server.log_path.read_text(errors="replace")[start:]
    assert "is not the base model the refiner sdxl_base_refiner.safetensors was trained on (nc-test-tiny-sdxl)" \
        in log, log[-3000:]


def test_training_example_trains_saves_and_the_saved_refiner_runs_in_the_refined_example(server, object_info,
                                                                                          refiner_files):
    from safetensors import safe_open

    ui = json.loads((REPO / "example_workflows" / "train_refiner.json").read_text())
    assert [n["type"] for n in ui["nodes"] if n["type"].startswith("NC_")] == \
        ["NC_BuildTeacherCache", "NC_TrainRefiner", "NC_SaveRefiner"]
    entry = _run_ok(server, _prompt(ui, object_info, **TRAIN_OVERRIDES), ui)
    losses = _ui_values(entry, "noisecraft_losses")
    assert losses and len(losses[0]) == 3 and all(np.isfinite(losses[0]))
    saved = sum(_ui_values(entry, "noisecraft_saved"), [])
    assert len(saved) == 1 and saved[0].startswith("sd15_refiner_trained_")
    path = server.base / "models" / "loras" / saved[0]
    assert path.is_file()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert any(k.endswith(".lora_up.weight") for k in f.keys())
    assert meta["noisecraft.kind"] == "refiner" and meta["noisecraft.model_kind"] == "eps"

    # The saved file loads in Load Refiner and drives Refine Noise in the guidance-free example.
    ui2 = json.loads((REPO / "example_workflows" / "refined_guidance_free.json").read_text())
    prompt2 = _prompt(ui2, object_info)
    loader = next(n for n in prompt2.values() if n["class_type"] == "NC_LoadRefiner")
    loader["inputs"]["refiner_name"] = saved[0]
    _run_ok(server, prompt2, ui2)


def test_pag_training_example_samples_the_teacher_through_pag_and_trains_the_plain_model(server, object_info):
    """train_refiner_pag.json: the paper's teacher (CFG 7 + PAG 3, the stock Perturbed Attention Guidance node on
    Build Teacher Cache's MODEL); Train Refiner gets the checkpoint's own MODEL (the student is unguided)."""
    from safetensors import safe_open

    ui = json.loads((REPO / "example_workflows" / "train_refiner_pag.json").read_text())
    prompt = _prompt(ui, object_info, **TRAIN_OVERRIDES)
    by_type = {n["class_type"]: (key, n) for key, n in prompt.items()}
    pag_id, pag = by_type["PerturbedAttentionGuidance"]
    ckpt_id, _ = by_type["NC_Test_TinyCheckpoint"]
    assert pag["inputs"]["scale"] == 3.0 and pag["inputs"]["model"][0] == ckpt_id
    assert by_type["NC_BuildTeacherCache"][1]["inputs"]["model"][0] == pag_id
    assert by_type["NC_BuildTeacherCache"][1]["inputs"]["cfg"] == 7.0
    assert by_type["NC_TrainRefiner"][1]["inputs"]["model"][0] == ckpt_id
    entry = _run_ok(server, prompt, ui)
    (saved,) = sum(_ui_values(entry, "noisecraft_saved"), [])
    assert saved.startswith("sd15_refiner_pag_trained_")
    assert all(np.isfinite(v).all() for v in _ui_values(entry, "noisecraft_losses"))
    with safe_open(str(server.base / "models" / "loras" / saved), "pt") as f:
        assert f.metadata()["noisecraft.kind"] == "refiner" and len(list(f.keys())) > 0


def _paper_graph(prompt: dict) -> dict:
    """The paper example's API prompt by class type ({type: (node id, node)}; one node of each type but the
    stand-in text encoder)."""
    return {n["class_type"]: (key, n) for key, n in prompt.items()}


def test_paper_example_is_the_papers_sdxl_recipe(object_info):
    """train_refiner_paper.json as shipped: an SDXL single file; PAG 3 on the teacher's MODEL only; Load Prompts
    (shuffled, deduped, a validation split) encoded by the checkpoint's CLIP into a named cache, an empty negative,
    1024x1024 with batch 2, cfg 7, 20 steps; the aesthetic filter decoding with the checkpoint's VAE; Train Refiner
    at rank 256, bf16, batch 2, 10 student steps, a run name, validation decoded with the VAE."""
    ui = json.loads((REPO / "example_workflows" / "train_refiner_paper.json").read_text())
    from noisecraft.workflow_api import ui_to_api

    g = _paper_graph(ui_to_api(ui, object_info))
    ckpt_id, ckpt = g["CheckpointLoaderSimple"]
    assert ckpt["inputs"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    pag_id, pag = g["PerturbedAttentionGuidance"]
    assert pag["inputs"] == {"scale": 3.0, "model": [ckpt_id, 0]}
    prompts_id, prompts = g["NC_LoadPrompts"]
    assert prompts["inputs"]["file"] == PROMPT_FILE and prompts["inputs"]["dedupe"] is True
    assert prompts["inputs"]["shuffle_seed"] >= 0 and prompts["inputs"]["validation"] > 0
    neg_id, neg = g["CLIPTextEncode"]
    assert neg["inputs"] == {"text": "", "clip": [ckpt_id, 1]}
    lat_id, lat = g["EmptyLatentImage"]
    assert lat["inputs"] == {"width": 1024, "height": 1024, "batch_size": 2}
    btc_id, btc = g["NC_BuildTeacherCache"]
    b = btc["inputs"]
    assert (b["model"], b["prompts"], b["clip"], b["negative"], b["latent"]) == \
        ([pag_id, 0], [prompts_id, 0], [ckpt_id, 1], [neg_id, 0], [lat_id, 0])
    assert "positive" not in b and "sampler" not in b  # Load Prompts replaces positive; Euler (the paper's DDIM)
    assert (b["cfg"], b["steps"], b["scheduler"], b["cache_name"]) == (7.0, 20, "normal", "sdxl_paper")
    assert (b["guidance_min"], b["guidance_max"]) == (0.0, 0.0)
    flt_id, flt = g["NC_FilterTeacherCache"]
    assert flt["inputs"]["scorer"] == "aesthetic" and flt["inputs"]["custom_scorer"] == ""
    assert (flt["inputs"]["teacher_cache"], flt["inputs"]["vae"], flt["inputs"]["model"]) == \
        ([btc_id, 0], [ckpt_id, 2], [ckpt_id, 0])
    assert (b["samples_per_prompt"], flt["inputs"]["keep"]) == (2, 181_000)  # the top half: the paper's N = 181K
    train_id, train = g["NC_TrainRefiner"]
    t = train["inputs"]
    assert (t["model"], t["teacher_cache"], t["vae"]) == ([ckpt_id, 0], [flt_id, 0], [ckpt_id, 2])
    assert (t["rank"], t["precision"], t["batch_size"], t["student_steps"]) == (256, "bf16", 2, 10)
    assert t["resume_from"] == "sdxl_paper" and t["validate_every"] > 0
    assert g["NC_SaveRefiner"][1]["inputs"]["refiner"] == [train_id, 0]


def test_paper_example_builds_a_named_cache_filters_trains_and_saves(server, object_info, prompt_file,
                                                                      aesthetic_weights):
    """train_refiner_paper.json on the tiny SDXL-shaped model and its tiny real CLIP (tiny steps, rank and keep):
    the prompts of input/prompts.jsonl, deduped and with 16 held out, are encoded by the checkpoint's CLIP into
    output/noisecraft_caches/sdxl_paper with the PAG teacher's samples; the aesthetic filter (tiny random weights)
    keeps 8 of 16; Train Refiner trains in bf16 with validation in output/noisecraft_runs/sdxl_paper; Save Refiner
    writes a refiner whose metadata records the PAG teacher and the filter."""
    from safetensors import safe_open

    from noisecraft.train import TeacherCache
    from noisecraft.train.cond_store import CondStore

    ui = json.loads((REPO / "example_workflows" / "train_refiner_paper.json").read_text())
    entry = _run_ok(server, _prompt(ui, object_info, **PAPER_OVERRIDES), ui)
    texts = " ".join(t for v in _ui_values(entry, "text") for t in v)
    assert "16 teacher samples (8 prompts)" in texts, texts
    assert "kept 8 of 16 teacher samples by aesthetic" in texts, texts

    root = server.base / "output" / "noisecraft_caches" / "sdxl_paper"
    cache = TeacherCache(root)
    assert cache.complete and cache.total == 16 and len(cache.conds) == 8
    assert set(cache.conds) <= set(PAPER_PROMPTS) and len(set(cache.conds)) == 8  # deduped, 16 held out
    meta = cache.meta
    assert (meta["guidance"], meta["pag_scale"], meta["cfg"], meta["family"]) == ("cfg+pag", 3.0, 7.0, "sdxl")
    assert meta["samples_per_prompt"] == 2 and tuple(cache.shape) == (4, 16, 16)
    store = CondStore(root)
    rows = store.rows([0, 7])
    assert all(torch_isfinite(v) for v in rows.values()) and store.count == 8
    assert list(root.glob("scores_aesthetic*.safetensors")), "the filter's scores are not next to the shards"

    losses = _ui_values(entry, "noisecraft_losses")
    assert len(losses) == 1 and len(losses[0]) == 3 and all(np.isfinite(losses[0]))
    curve = _ui_values(entry, "noisecraft_validation")
    assert curve and [s for s, _ in curve[0]] == [0, 3]  # held-out validation at step 0 and the last step
    run = server.base / "output" / "noisecraft_runs" / "sdxl_paper"
    assert (run / "refiner.safetensors").is_file() and (run / "loss.jsonl").is_file()
    (saved,) = sum(_ui_values(entry, "noisecraft_saved"), [])
    assert saved.startswith("sdxl_refiner_paper_")
    with safe_open(str(server.base / "models" / "loras" / saved), "pt") as f:
        meta = f.metadata()
        assert any(k.endswith(".lora_up.weight") for k in f.keys())
    training = json.loads(meta["noisecraft.training"])
    assert training["precision"] == "bf16" and training["grad_accum"] == 4 and training["prompts"] == 8
    assert training["teacher"]["pag_scale"] == 3.0 and training["teacher"]["filter"]["scorer"] == "aesthetic"
    assert training["teacher"]["filter"]["kept"] == 8 and training["samples"] == 8


def torch_isfinite(t) -> bool:
    import torch

    return bool(torch.isfinite(t.float()).all())


# -- NPNet training example (collect_npnet_pairs.json) ----------------------------------------------------

NPNET_TRAIN_NODES = {"NC_CollectNPNetPairs", "NC_TrainNPNet", "NC_SaveNPNet"}
NPNET_TRAIN_OVERRIDES = {"NC_CollectNPNetPairs": {"count": 4, "steps": 4, "batch_size": 4},
                         "NC_TrainNPNet": {"steps": 3, "batch_size": 4},
                         "NC_SaveNPNet": {"filename": "e2e_trained_npnet", "overwrite": True},
                         "BasicScheduler": {"steps": 2}}


def test_npnet_training_nodes_are_registered(object_info):
    for node_id in sorted(NPNET_TRAIN_NODES):
        assert node_id in object_info
        assert object_info[node_id]["category"] == "noisecraft/npnet"


def test_npnet_training_example_collects_trains_saves_a_loadable_npnet(server, object_info):
    """Headless: Collect NPNet Pairs -> Train NPNet -> Save NPNet over HTTP (tiny counts), the file loads."""
    from noisecraft.npnet import load_npnet

    ui = json.loads((REPO / "example_workflows" / "collect_npnet_pairs.json").read_text())
    assert NPNET_TRAIN_NODES <= {n["type"] for n in ui["nodes"]}
    entry = _run_ok(server, _prompt(ui, object_info, **NPNET_TRAIN_OVERRIDES), ui)
    history = _ui_values(entry, "noisecraft_history")
    assert history and len(history[0]) == 3 and all(np.isfinite(history[0]))
    saved = sum(_ui_values(entry, "noisecraft_npnet_file"), [])
    assert saved == ["e2e_trained_npnet.safetensors"]
    path = server.base / "models" / "npnet" / saved[0]
    assert path.is_file()
    net = load_npnet(path)
    cfg = net.config
    assert (cfg.latent_channels, cfg.latent_size, cfg.tokens, cfg.text_width) == (4, 16, 77, 2048)
    # Load NPNet lists it (its file list is read when the node info is asked for)
    listed = server.get("/object_info/NC_LoadNPNet")["NC_LoadNPNet"]["input"]["required"]["npnet_name"]
    assert saved[0] in json.dumps(listed)
