"""The NoiseRefine training nodes on the tiny SD1.5-shaped model: Build Teacher Cache, Train Refiner, Save Refiner.

Everything runs under ``torch.inference_mode()`` like the server, on a model built in inference mode (its
weights are inference tensors, as after ComfyUI's checkpoint loading).
"""

from __future__ import annotations


import pytest
import torch
from safetensors import safe_open

import comfy.model_management as mm
import nodes as comfy_nodes
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise


@pytest.fixture(scope="module")
def model(nc):
    with torch.inference_mode():
        return nc.tiny.build("sd15", seed=0)


def prompts(nc, n=2):
    pos = []
    for i in range(n):
        pos += nc.tiny.conditioning("sd15", 10 + i, 1)
    return pos


@pytest.fixture(scope="module")
def cache(nc, tr, model):
    _, neg = nc.conds("sd15")
    with torch.inference_mode():
        return tr.BuildTeacherCache.execute(model, prompts(nc), neg, nc.latent("sd15", size=8), 2, 5, 7.0, 4,
                                            "normal").args[0]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def no_weight_functions_left(model):
    return all(not getattr(m, "weight_function", []) and not getattr(m, "bias_function", []) for m in model.model.modules())


def train(tr, model, cache, steps=6, **kw):
    args = dict(steps=steps, student_steps=3, batch_size=len(cache), learning_rate=3e-3, rank=4, alpha=0.0, seed=1)
    args.update(kw)
    with torch.inference_mode():
        out = tr.TrainRefiner.execute(model, cache, *args.values())
    return out


def test_the_cache_holds_guided_samples_per_prompt(cache):
    assert len(cache) == 4 and len(cache.prompts) == 2
    assert cache.prompt_ids.tolist() == [0, 0, 1, 1]
    assert cache.x0.shape == cache.noise.shape == (4, 4, 8, 8)
    assert torch.isfinite(cache.x0).all() and not torch.equal(cache.x0[0], cache.x0[2])


def test_training_lowers_the_msd_loss_and_leaves_the_model_unchanged(tr, rf, model, cache):
    before = snapshot(model)
    uuid = model.patches_uuid
    out = train(tr, model, cache, steps=6)
    refiner, losses = out.args
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] * 0.98, losses
    assert "MSD loss" in out.ui["text"][0] and out.ui["noisecraft_losses"] == losses
    assert isinstance(refiner, rf.Refiner) and refiner.metadata["noisecraft.kind"] == "refiner"
    assert refiner.model_kind.value == "eps"
    assert any(float(up.abs().max()) > 0 for _, up, _ in refiner.pairs.values())
    assert same(before, snapshot(model)) and model.patches_uuid == uuid and not model.patches
    assert no_weight_functions_left(model)


def test_interrupt_mid_training_raises_and_leaves_the_model_unchanged(tr, nc, model, cache, monkeypatch):
    before = snapshot(model)
    ticks = {"n": 0}
    orig = nc.bridge.Progress.tick

    def tick(self, n=1):
        ticks["n"] += 1
        if ticks["n"] == 8:  # inside the second optimizer step
            mm.interrupt_current_processing(True)
        return orig(self, n)

    monkeypatch.setattr(nc.bridge.Progress, "tick", tick)
    with pytest.raises(mm.InterruptProcessingException):
        train(tr, model, cache, steps=5)
    assert ticks["n"] == 8
    assert same(before, snapshot(model)) and no_weight_functions_left(model) and not model.patches


@pytest.fixture()
def models_dir(tmp_path, rf, model_folders):
    (tmp_path / "loras").mkdir()
    with model_folders(tmp_path, ("noise_refiners", "loras"), rf, set_paths=("loras",)):
        yield tmp_path


def test_save_refiner_numbers_files_like_comfyui_savers(tr, model, cache, models_dir):
    """The counter is one past the highest ``<name>_<counter>_`` in the folder (ComfyUI's
    ``get_save_image_path``, as SaveLoRA uses it), also past a gap; an old-style file is kept."""
    refiner, _ = train(tr, model, cache, steps=1).args
    loras = models_dir / "loras"
    (loras / "numbered_00007_.safetensors").write_bytes(b"placeholder")
    (loras / "numbered_00001.safetensors").write_bytes(b"old naming")
    assert tr.SaveRefiner.execute(refiner, "numbered", "loras").args[0] == "numbered_00008_.safetensors"
    assert (loras / "numbered_00001.safetensors").read_bytes() == b"old naming"
    assert (loras / "numbered_00007_.safetensors").read_bytes() == b"placeholder"


def test_saved_refiner_loads_in_load_refiner_refine_noise_and_the_stock_lora_loader(tr, rf, nc, model, cache,
                                                                                     models_dir):
    refiner, _ = train(tr, model, cache, steps=2).args
    out = tr.SaveRefiner.execute(refiner, "tiny_refiner", "loras")
    name = out.args[0]
    assert name == "tiny_refiner_00001_.safetensors"
    path = models_dir / "loras" / name
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["noisecraft.kind"] == "refiner" and meta["noisecraft.model_kind"] == "eps"
    assert '"steps": 2' in meta["noisecraft.training"]
    assert tr.SaveRefiner.execute(refiner, "tiny_refiner", "loras").args[0] == "tiny_refiner_00002_.safetensors"

    loaded = rf.LoadRefiner.execute(name).args[0]
    assert loaded.pairs.keys() == refiner.pairs.keys()
    for k, (down, up, alpha) in refiner.pairs.items():
        d2, u2, a2 = loaded.pairs[k]
        assert torch.equal(down, d2) and torch.equal(up, u2) and alpha == a2

    pos, _ = nc.conds("sd15")
    with torch.inference_mode():
        outs = []
        for r in (refiner, loaded):
            noise = rf.RefineNoise.execute(Noise_RandomNoise(3), model, r, pos, 1.0).args[0]
            outs.append(noise.generate_noise(nc.latent("sd15", size=8)))
    base = Noise_RandomNoise(3).generate_noise(nc.latent("sd15", size=8))
    assert torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], base)

    patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    assert len(patched.patches) == len(refiner.pairs)


def test_bad_inputs_give_clear_errors(tr, nc, model, cache):
    _, neg = nc.conds("sd15")
    with torch.inference_mode():
        with pytest.raises(ValueError, match="no prompts"):
            tr.BuildTeacherCache.execute(model, [], neg, nc.latent("sd15", size=8), 2, 0, 7.0, 4, "normal")
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            tr.BuildTeacherCache.execute(model, prompts(nc), neg, nc.latent("sd15", size=8), 2, 0, 7.0, 0, "normal")
        with pytest.raises(ValueError, match="samples_per_prompt must be an integer >= 1"):
            tr.BuildTeacherCache.execute(model, prompts(nc), neg, nc.latent("sd15", size=8), 0, 0, 7.0, 4, "normal")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        train(tr, model, cache, steps=0)
    with pytest.raises(ValueError, match="student_steps must be an integer >= 1"):
        train(tr, model, cache, student_steps=0)
    with pytest.raises(ValueError, match="expected a TEACHER_CACHE"):
        train(tr, model, "not a cache")
    with pytest.raises(ValueError, match="built with another model"):
        train(tr, nc.model("sd2v"), cache)
    with pytest.raises(ValueError, match="plain file name"):
        tr.save_refiner(train(tr, model, cache, steps=1).args[0], "../escape", "loras")
