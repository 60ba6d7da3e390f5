"""Every example workflow runs on a real ComfyUI server and saves finite, non-constant images.

The workflows are what users load (CheckpointLoaderSimple, CLIPTextEncode, VAEDecode). No
checkpoint exists here, so converting them to the API format (with ``noisecraft.workflow_api``, the converter
of run-graph) swaps those three node types for the test-only stand-ins of ``nc_test_pack`` (same widgets
and outputs) and shrinks the empty latent to 128x128 so a CPU run takes seconds; every other node and value
is the workflow's own.
(For the NPNet example the tiny model is SDXL-shaped, with 2048-wide text, and NPNet Golden Noise
runs on a 16x16 latent through its any-resolution policy.) The NPNet files the examples load are
written into the server's models/npnet with seeded random weights (nothing is downloaded).
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
            "NC_TrainRefiner", "NC_SaveRefiner", "NC_FilterTeacherCache", "NC_LoadPrompts"}
REPORTING_NODES = {"NC_InversionStabilitySelect", "NC_OptimizeNoise"}  # the nodes that send UI data
NPNET_FILES = {"sdxl.safetensors": "sdxl"}  # file name in the examples -> preset of the random stand-in
# file name in the examples -> tiny model family (its refiner records the fingerprint of that tiny model, seed 0)
REFINER_FILES = {"sd15_refiner.safetensors": "sd15", "sdxl_base_refiner.safetensors": "sdxl"}
HEADLESS = {"train_refiner", "train_refiner_pag"}  # training workflows: they save a model file, not images (tested below)
IMAGE_WORKFLOWS = [p for p in WORKFLOWS if p.stem not in HEADLESS]
# Tiny step counts for the training example (its own values are for real use).
TRAIN_OVERRIDES = {
    "NC_BuildTeacherCache": {"samples_per_prompt": 1, "steps": 3},
    "NC_TrainRefiner": {"steps": 3, "student_steps": 2, "rank": 2, "batch_size": 2, "learning_rate": 1e-3},
}


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
