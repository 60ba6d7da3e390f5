"""The refiner LoRA on a diffusers UNet (noisecraft.lora), on the shipped toy UNet.

Tier 1: torch + diffusers, CPU, no ComfyUI, no peft. Checks: zero init and the disabled flag give
the base output bit for bit; toggling re-patches nothing; save/load round trip with metadata;
the exported weights merged by ComfyUI's LoRA formula give the hooked output; clear errors for a
LoRA made for another model; and the LoRA as a NoiseRefine refiner trained by msd_loss.
"""

import json

import pytest
import torch

from noisecraft.hosts import toy
from noisecraft.lora import CONVENTION, DEFAULT_TARGETS, attach_lora, flat_name, load_lora, read_lora_file
from noisecraft.msd import msd_loss, teacher_x0
from noisecraft.refine import refine_noise, refine_with, residual_from_denoisers
from noisecraft.sigmas import get_sigmas


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def model():
    return toy.load_toy()


def _inputs(m, b=2, seed=0):
    x = torch.randn((b, *m.latent_shape), generator=_gen(seed))
    t = torch.tensor([999.0, 500.0][:b])
    return x, t, m.cond(torch.arange(b))


def _run(m, x, t, c):
    with torch.no_grad():
        return m.unet(x, t, encoder_hidden_states=c, return_dict=False)[0]


def _randomize_up(lora, seed=1, scale=0.05):
    g = _gen(seed)
    with torch.no_grad():
        for layer in lora.layers.values():
            w = layer.lora_up.weight
            w.copy_(torch.randn(w.shape, generator=g) * scale)


def test_attach_targets_zero_init_and_toggle_are_exact(model):
    x, t, c = _inputs(model)
    base = _run(model, x, t, c)
    keys_before = list(model.unet.state_dict().keys())
    rng = torch.random.get_rng_state()
    lora = attach_lora(model.unet, rank=4, alpha=2.0)
    assert torch.equal(torch.random.get_rng_state(), rng)  # init from a private generator
    assert list(model.unet.state_dict().keys()) == keys_before  # the UNet itself is untouched
    names = list(lora.module_names.values())
    assert names and all(any(n == tg or n.endswith("." + tg) for tg in DEFAULT_TARGETS) for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} >= {"to_q", "to_k", "to_v", "0", "conv1", "conv2", "proj", "2"}
    assert all(k == flat_name(n) for k, n in lora.module_names.items())
    assert all(layer.scale == 0.5 for layer in lora.layers.values())
    assert len(list(lora.parameters())) == 2 * len(lora.layers)  # only the LoRA weights, never the UNet's
    with pytest.raises(ValueError, match="already has a refiner LoRA"):
        attach_lora(model.unet, rank=2)

    assert torch.equal(_run(model, x, t, c), base)  # up = 0: identical
    _randomize_up(lora)
    on = _run(model, x, t, c)
    assert float((on - base).abs().max()) > 1e-3
    lora.enabled = False
    assert torch.equal(_run(model, x, t, c), base)
    lora.enabled = True
    assert torch.equal(_run(model, x, t, c), on)  # toggling re-patches nothing
    with lora.disabled():
        assert torch.equal(_run(model, x, t, c), base)
    assert lora.enabled
    lora.remove()
    assert torch.equal(_run(model, x, t, c), base)
    attach_lora(model.unet, rank=2).remove()  # attachable again after remove()


def test_save_load_round_trip_with_metadata(model, tmp_path):
    x, t, c = _inputs(model)
    lora = attach_lora(model.unet, rank=3, seed=5)
    _randomize_up(lora, seed=2)
    out = _run(model, x, t, c)
    path = lora.save(
        tmp_path / "refiner.safetensors",
        metadata={"base_model": "noisecraft-toy", "model_kind": "eps", "sigma_max": 14.6146, "training": {"steps": 3}},
    )
    assert not (tmp_path / "refiner.safetensors.tmp").exists()
    state, meta = read_lora_file(path)
    assert meta["noisecraft.kind"] == "refiner" and meta["noisecraft.convention"] == CONVENTION
    assert meta["noisecraft.rank"] == "3" and meta["noisecraft.base_model"] == "noisecraft-toy"
    assert json.loads(meta["noisecraft.training"]) == {"steps": 3}
    assert json.loads(meta["noisecraft.targets"]) == list(DEFAULT_TARGETS)
    key = next(iter(lora.layers))
    assert key.startswith("lora_unet_") and {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= set(state)
    assert len(state) == 3 * len(lora.layers)

    fresh = toy.load_toy()
    loaded = load_lora(fresh.unet, path)
    assert torch.equal(_run(fresh, x, t, c), out)
    assert set(loaded.layers) == set(lora.layers)
    loaded.load_exported(lora.export_state_dict(), "same weights")  # the resume path: exact copy
    assert torch.equal(_run(fresh, x, t, c), out)


def test_export_merged_with_comfyui_formula_matches_hooked_output(model):
    """ComfyUI's LoRA patch: W += alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)."""
    x, t, c = _inputs(model)
    lora = attach_lora(model.unet, rank=4, alpha=8.0)
    _randomize_up(lora, seed=3)
    hooked = _run(model, x, t, c)
    state = lora.export_state_dict()
    lora.remove()
    with torch.no_grad():
        for key, name in lora.module_names.items():
            w = model.unet.get_submodule(name).weight
            up, down = state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"]
            scale = float(state[f"{key}.alpha"]) / down.shape[0]
            w += scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    merged = _run(model, x, t, c)
    assert torch.allclose(merged, hooked, atol=1e-5, rtol=1e-4), float((merged - hooked).abs().max())


def test_lora_for_another_model_is_rejected_clearly(model):
    lora = attach_lora(model.unet, rank=2)
    state = lora.export_state_dict()
    lora.remove()
    key = next(iter(lora.layers))
    bad_shape = dict(state)
    bad_shape[f"{key}.lora_down.weight"] = torch.zeros(2, 7)
    with pytest.raises(ValueError, match=r"shape \(2, 7\).*needs \(2, "):
        load_lora(model.unet, bad_shape)
    with pytest.raises(ValueError, match="another model"):
        load_lora(model.unet, {**state, "lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
                               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="not a LoRA"):
        load_lora(model.unet, {"foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="matches the targets"):
        attach_lora(model.unet, rank=2, targets=("no_such",))
    with pytest.raises(ValueError, match="rank"):
        attach_lora(model.unet, rank=0)
    assert len(attach_lora(model.unet, rank=2).layers) == len(lora.layers)  # failures left nothing attached


def test_lora_refiner_is_exact_noop_at_init_and_trains_with_msd(model):
    labels = torch.tensor([2, 8])
    student = model.denoiser(labels)
    lora = attach_lora(model.unet, rank=4, seed=0)
    d_base, d_lora = lora.base_and_lora(student)
    sigmas = get_sigmas(model.table, "karras", 3)
    sigma_max = float(sigmas[0])
    e = model.noise(2, _gen(4))
    assert torch.equal(refine_noise(e, d_base, d_lora, "eps", sigma_max), e)  # exactly zero residual

    residual = residual_from_denoisers(d_base, d_lora, "eps", sigma_max)
    target = teacher_x0(model.denoiser(labels, cfg=3.0), e, sigmas, "eps")
    params = list(lora.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(2):
        with lora.disabled():  # the student samples without the refiner
            loss, stats = msd_loss(lambda z: refine_with(residual, z), e, student, target, sigmas, "eps")
        assert lora.enabled
        opt.zero_grad()
        loss.backward()
        losses.append(stats["loss"])
        ups = [layer.lora_up.weight.grad for layer in lora.layers.values()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in ups)
        assert max(float(g.abs().max()) for g in ups) > 0
        opt.step()
    assert not torch.equal(refine_noise(e, d_base, d_lora, "eps", sigma_max), e)
    assert all(torch.isfinite(torch.tensor(losses)))
