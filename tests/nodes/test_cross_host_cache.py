"""A teacher cache crosses hosts (issue 17): ComfyUI-built -> ``train-refiner --cache``, CLI-built -> Load Teacher Cache.

Tier 2 (ComfyUI checkout). The same small SD1.5-shaped network exists twice, as in
``test_cross_host_refiner.py``: the tiny ComfyUI model and a diffusers ``UNet2DConditionModel`` with its weights
copied through ComfyUI's diffusers -> ldm map, saved here as a diffusers folder (``unet/``, ``scheduler/``, and a
tiny 768-wide CLIP text encoder + tokenizer so the CLI can encode prompts).

1. Build Teacher Cache with a ``cache_name`` (positive CONDITIONING entries of 77 and 154 tokens, the latent's
   batch of 2 as the teacher's micro-batch) writes ``output/noisecraft_caches/<name>``; the CLI host's guided
   teacher on the stored rows reproduces its x0 (the same network, the same batches of rows: a 154-token
   prompt meets a 77-token one and the negative at one token count, as ComfyUI batches them); and
   ``python -m noisecraft train-refiner --model DIR --cache <that folder>`` (a subprocess, no ``--prompts``)
   trains from it: rc 0, the refiner written, the cache unchanged.
2. A cache the CLI built (``train-refiner --model DIR --prompts FILE``, a subprocess) opens with Load Teacher
   Cache (``path``): the node's noise, x0 and prompt ids are the shards' tensors; its conditioning for a batch
   (``conditioning_from_rows``, as Train Refiner reads it) is the CLI host's encoding of those prompts; ComfyUI's
   model on that conditioning computes the CLI host's ``D(x, sigma)``; and Train Refiner trains on the cache.

Tolerances: the two networks are the same float32 weights, evaluated by ComfyUI's and diffusers' modules (both on
torch's SDPA here: measured differences are 0 on the CPU, as in ``test_cross_host_refiner.py``); 1e-4 leaves room
for another attention backend or device, also over the teacher's 3 CFG-7 steps. The teacher's exact agreement
also shows the CLI batches a 154-token prompt with 77-token ones and the negative as ComfyUI does (one token count
by repetition: measured 0; the same rows in two forwards instead: 1.3e-4).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TOL = dict(rtol=1e-4, atol=1e-4)
CFG, STEPS, SEED, PER_PROMPT = 7.0, 3, 5, 2
SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "steps_offset": 1}
TRAIN = ("--steps", "2", "--batch", "2", "--student-steps", "2", "--checkpoint-every", "1", "--lr", "1e-2",
         "--device", "cpu")


def _sd1_test_module():
    spec = importlib.util.spec_from_file_location("nc_cross_host_refiner_for_cache", Path(__file__).with_name(
        "test_cross_host_refiner.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SD1 = _sd1_test_module()
core = _SD1.core  # the pack's noisecraft modules (fixture)
model = _SD1.model  # the tiny SD1.5 ComfyUI model (fixture)
unet = _SD1.unet  # its diffusers copy (fixture)


def _pack(nc) -> str:
    return nc.noise.__name__.split(".")[0]


def _mod(nc, name: str):
    return importlib.import_module(f"{_pack(nc)}.{name}")


def _tokenizer(folder: Path):
    """A CLIP tokenizer over a 54-token vocabulary (letters), 16 positions: nothing downloaded."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=16)


@pytest.fixture(scope="module")
def model_dir(unet, tmp_path_factory):
    """The diffusers copy as a model folder train-refiner --model reads (SD1: unet/, scheduler/, tokenizer/,
    text_encoder/ of the UNet's 768-wide context)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("xcache") / "tiny_sd15"
    unet.save_pretrained(str(root / "unet"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    _tokenizer(root.parent / "vocab").save_pretrained(str(root / "tokenizer"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=64, num_attention_heads=2,
                                            num_hidden_layers=1, vocab_size=54, max_position_embeddings=16,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1))
    text.save_pretrained(str(root / "text_encoder"))
    return root


def _cli(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "noisecraft", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=str(cwd), timeout=600)


@pytest.fixture
def output_dir(tmp_path):
    import folder_paths

    saved = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    try:
        yield tmp_path / "output"
    finally:
        folder_paths.set_output_directory(saved)


def _host(core, folder: Path, prompts):
    """The CLI's host of the folder, its prompts to be read from a cache's encodings (``use_conds``)."""
    return core.host.diffusers_host(folder, prompts, encode_now=False)


# -- 1. ComfyUI-built -> the shell ------------------------------------------------------------------------------

def test_a_cache_built_by_the_node_trains_from_the_shell(nc, tr, core, model, model_dir, output_dir, tmp_path):
    store_mod = _mod(nc, "noisecraft.train.cond_store")
    tc = _mod(nc, "noisecraft.train.teacher_cache")
    msd = _mod(nc, "noisecraft.msd")
    g = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, n, 768, generator=g), {}] for n in (77, 154, 77)]  # CLIP Text Encode entries
    _, negative = nc.conds("sd15")
    with torch.inference_mode():
        node_cache = tr.BuildTeacherCache.execute(model, positive, negative, nc.latent("sd15", batch=2, size=8),
                                                  PER_PROMPT, SEED, CFG, STEPS, "normal", cache_name="xhost").args[0]
    root = output_dir / "noisecraft_caches" / "xhost"
    assert Path(node_cache.folder) == root and (root / "conds.json").is_file()
    cache, store = tc.TeacherCache(root), store_mod.CondStore(root)
    assert cache.meta["host"] == "comfyui" and cache.meta["family"] == "sd" and cache.total == 3 * PER_PROMPT

    # the CLI host's teacher on the stored rows gives the node's x0 (micro-batches of 2, as the node sampled)
    host = _host(core, model_dir, cache.conds)
    host.use_conds(store)
    sigmas = core.sigmas.get_sigmas(host.table, "normal", STEPS)
    torch.testing.assert_close(sigmas, nc.bridge.get_sigmas(model, "normal", STEPS), rtol=1e-5, atol=0)
    full = cache.get(range(cache.total))
    worst = 0.0
    with torch.no_grad():
        for a in range(0, cache.total, 2):
            ids = full.cond[a:a + 2]
            x0 = msd.teacher_x0(host.denoiser(ids, cfg=CFG), full.e[a:a + 2], sigmas, "eps").float()
            worst = max(worst, float((x0 - full.x0[a:a + 2]).abs().max()))
            torch.testing.assert_close(x0, full.x0[a:a + 2], **TOL)
    print(f"\nComfyUI teacher vs the CLI host's on the stored rows: max|x0 diff| = {worst:.3g}")

    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    out = tmp_path / "cli_out"
    proc = _cli("train-refiner", "--model", model_dir, "--cache", root, "--out", out, *TRAIN, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "refiner.safetensors").is_file() and "built in ComfyUI" in proc.stderr
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
    # a teacher flag that differs from the cache's: one line, rc 2
    proc = _cli("train-refiner", "--model", model_dir, "--cache", root, "--out", tmp_path / "o2", "--cfg", "3", *TRAIN,
                cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--cfg 7" in proc.stderr


# -- 2. CLI-built -> ComfyUI ------------------------------------------------------------------------------------

def test_a_cli_built_cache_opens_in_comfyui_with_the_same_batches_and_trains(nc, tr, core, model, model_dir,
                                                                           tmp_path):
    from safetensors.torch import load_file

    store_mod = _mod(nc, "noisecraft.train.cond_store")
    ts = _mod(nc, "nodes.train_store")
    prompts = ["a red cat", "a blue dog", "a green bird"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "cli"
    proc = _cli("train-refiner", "--model", model_dir, "--prompts", tmp_path / "p.txt", "--out", out, "--samples", 6,
                "--teacher-steps", STEPS, "--cfg", CFG, "--shard-size", 4, *TRAIN, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = out / "teacher_cache"

    node_cache = ts.LoadTeacherCache.execute(cache_name=None, path=str(root)).args[0]
    assert len(node_cache) == 6 and node_cache.prompt_count == 3 and node_cache.kind.value == "eps"
    shards = [load_file(str(root / f"shard_{k:05d}.safetensors")) for k in range(2)]
    for key, got in (("noise", node_cache.noise), ("x0", node_cache.x0), ("cond", node_cache.prompt_ids)):
        assert torch.equal(got, torch.cat([s[key] for s in shards])), key

    # the node's conditioning of a batch is the CLI host's encoding of those prompts
    eager = core.host.diffusers_host(model_dir, prompts)  # encodes now, as the CLI's encoder does
    ids = torch.tensor([2, 0, 1])
    entry = store_mod.conditioning_from_rows(node_cache.store.rows(ids))
    assert torch.equal(entry[0], eager.conds[ids]) and entry[1] == {}
    assert torch.equal(node_cache.negative[0][0], eager.uncond)

    # ComfyUI's model on that conditioning computes the CLI host's D(x, sigma)
    lazy = _host(core, model_dir, prompts)
    lazy.use_conds(node_cache.store)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3.0
    sigma = torch.full((3,), 2.5)

    def fn(ctx):
        return ts.stored_denoiser(ctx, node_cache.store, ids)(x.to(ctx.device), sigma).cpu()

    with torch.inference_mode():
        d_comfy = nc.bridge.run_core(model, [entry], node_cache.negative, x, fn, sigmas=torch.tensor([2.5, 0.0]),
                                     cfg=1.0)
    with torch.no_grad():
        d_cli = lazy.denoiser(ids)(x, sigma)
    print(f"\nD(x, sigma) on the CLI cache's rows: max|comfy - cli| = {float((d_comfy - d_cli).abs().max()):.3g}")
    torch.testing.assert_close(d_comfy, d_cli, **TOL)

    with torch.inference_mode():
        _, losses = tr.TrainRefiner.execute(model, node_cache, 2, 2, 2, 1e-2, 4, 0.0, 1).args
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
