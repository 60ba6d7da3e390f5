"""Train Refiner's held-out validation (issue 18) on the tiny SD1.5-shaped model inside ComfyUI.

Checks: an old graph (no validation inputs) trains and returns exactly as before (no validation output, same
refiner); with validate_every the same refiner comes out, the gap closed starts at exactly 0 (a fresh LoRA's
residual is 0), the node returns the curve and the last grid as its output image (decoded by a real ComfyUI VAE),
a named run folder holds validation.jsonl, the grids and refiner_best.safetensors, and held-out prompts from the
validation_prompts input are validated on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import comfy.sd
import folder_paths
from comfy.taesd.taesd import TAESD


@pytest.fixture(scope="module")
def model(nc):
    with torch.inference_mode():
        return nc.tiny.build("sd15", seed=0)


@pytest.fixture(scope="module")
def cache(nc, tr, model):
    pos = nc.tiny.conditioning("sd15", 10, 1) + nc.tiny.conditioning("sd15", 11, 1)
    _, neg = nc.conds("sd15")
    with torch.inference_mode():
        return tr.BuildTeacherCache.execute(model, pos, neg, nc.latent("sd15", size=8), 2, 5, 7.0, 3,
                                            "normal").args[0]


@pytest.fixture(scope="module")
def vae():
    """A ComfyUI VAE (TAESD, 4 latent channels) with seeded LeCun-normal weights, zero biases."""
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5 if v.ndim > 1 else torch.zeros(v.shape))
             for k, v in TAESD(latent_channels=4).state_dict().items()}
    state["vae_scale"] = torch.tensor(1.0)
    return comfy.sd.VAE(sd=state)


def run(tr, model, cache, steps=4, **kw):
    args = dict(steps=steps, student_steps=2, batch_size=len(cache), learning_rate=3e-3, rank=4, alpha=0.0, seed=1)
    with torch.inference_mode():
        return tr.TrainRefiner.execute(model, cache, *args.values(), **kw)


def same_pairs(a, b):
    return a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k][:2], b[k][:2]))


def test_validation_leaves_old_graphs_and_the_training_alone(tr, model, cache, vae, tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path / "temp"))
    old = run(tr, model, cache)
    assert set(old.ui) == {"text", "noisecraft_losses"}  # an old graph's output, as before
    watched = run(tr, model, cache, validate_every=2, validation_seeds=1, vae=vae, resume_from="val_run")
    assert watched.args[1] == old.args[1]  # the same losses
    assert same_pairs(watched.args[0].pairs, old.args[0].pairs)  # the same refiner weights
    curve = watched.ui["noisecraft_validation"]
    assert [s for s, _ in curve] == [0, 2, 4] and curve[0][1] == 0.0
    assert all(v == v for _, v in curve)  # finite numbers
    image = watched.ui["images"][0]
    assert image["type"] == "temp" and (tmp_path / "temp" / image["filename"]).is_file()
    from PIL import Image

    grid = Image.open(tmp_path / "temp" / image["filename"])
    assert grid.mode == "RGB" and grid.size[1] > 2 * 8  # 2 prompt rows
    folder = tmp_path / "output" / "noisecraft_runs" / "val_run"
    recs = [json.loads(x) for x in (folder / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 2, 4] and all(r["samples"] == 2 for r in recs)
    assert all((folder / r["grid"]).is_file() for r in recs)
    with safe_open(str(folder / "refiner_best.safetensors"), "pt") as f:
        best = json.loads(f.metadata()["noisecraft.validation"])["best"]
    assert best["gap_closed"] == max(r["gap_closed"] for r in recs)
    summary = json.loads(watched.args[0].metadata["noisecraft.validation"])
    assert summary["last"]["step"] == 4 and summary["samples"] == 2


def test_held_out_prompts_are_validated_on(tr, nc, model, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path / "temp"))
    held = nc.tiny.conditioning("sd15", 20, 1) + nc.tiny.conditioning("sd15", 21, 1) + \
        nc.tiny.conditioning("sd15", 22, 1)
    out = run(tr, model, cache, steps=2, validate_every=1, validation_seeds=2, validation_prompts=held)
    curve = out.ui["noisecraft_validation"]
    assert [s for s, _ in curve] == [0, 1, 2] and curve[0][1] == 0.0
    summary = json.loads(out.args[0].metadata["noisecraft.validation"])
    assert summary["samples"] == 3 * 2  # 3 held-out prompts x 2 seeds
    assert Path(tmp_path / "temp" / out.ui["images"][0]["filename"]).is_file()  # latents shown without a vae
