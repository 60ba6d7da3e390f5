"""The refiner LoRA on a diffusers UNet (noisecraft.lora: peft adapter, kohya file), on the shipped toy UNet.

Tier 1: torch + diffusers + peft, CPU, no ComfyUI. Checks: zero init and the disabled flag give
the base output bit for bit; toggling re-patches nothing and leaves requires_grad alone; remove()
restores the UNet's modules; save/load round trip with metadata; the exported weights merged by
ComfyUI's LoRA formula give the adapted output; a peft/diffusers file (diffusers' own writer;
lora_A/lora_B, prefixes, alpha from metadata) reads into the same refiner; files read and write
without peft; the pairs writer and reader; clear errors for a LoRA made for another model; the LoRA
as a NoiseRefine refiner trained by msd_loss; and tables of bad state dicts and bad pairs, one row
per input.
"""

import json

import pytest
import torch

from noisecraft.hosts import toy
from noisecraft.hosts.adapters import attach_lora, load_lora
from noisecraft.lora import (CONVENTION, DEFAULT_TARGETS, flat_name, read_lora_file, read_refiner_pairs,
                             save_refiner_pairs)
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
    # peft wraps each target (its weight is then ``<name>.base_layer.weight``); the values are the UNet's own
    assert {k.replace(".base_layer.", ".") for k in model.unet.state_dict() if ".lora_" not in k} == set(keys_before)
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
    for layer in lora.layers.values():  # a frozen refiner stays frozen through the toggle (peft's own
        layer.lora_up.weight.requires_grad_(False)  # enable_adapters would make it trainable again)
    with lora.disabled():
        pass
    assert not any(layer.lora_up.weight.requires_grad for layer in lora.layers.values())
    lora.remove()
    assert list(model.unet.state_dict().keys()) == keys_before  # the UNet's own modules are back
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
    loaded.load_state_dict(lora.state_dict())  # the resume path (the training checkpoint): exact copy
    assert torch.equal(_run(fresh, x, t, c), out)


def test_export_merged_with_comfyui_formula_matches_adapted_output(model):
    """ComfyUI's LoRA patch: W += alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)."""
    x, t, c = _inputs(model)
    lora = attach_lora(model.unet, rank=4, alpha=8.0)
    _randomize_up(lora, seed=3)
    adapted = _run(model, x, t, c)
    state = lora.export_state_dict()
    lora.remove()
    with torch.no_grad():
        for key, name in lora.module_names.items():
            w = model.unet.get_submodule(name).weight
            up, down = state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"]
            scale = float(state[f"{key}.alpha"]) / down.shape[0]
            w += scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    merged = _run(model, x, t, c)
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=1e-4), float((merged - adapted).abs().max())


def test_lora_for_another_model_is_rejected_clearly(model):
    lora = attach_lora(model.unet, rank=2)
    state = lora.export_state_dict()
    lora.remove()
    key = next(iter(lora.layers))
    bad_shape = dict(state)
    down = state[f"{key}.lora_down.weight"]
    bad_shape[f"{key}.lora_down.weight"] = torch.zeros(2, 7, *down.shape[2:])  # same rank, wrong input width
    with pytest.raises(ValueError, match=r"shape \(2, 7.*needs \(2, "):
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



def test_peft_files_read_into_the_same_refiner(model, tmp_path):
    """A file written by diffusers' own ``save_lora_weights`` from peft's ``get_peft_model_state_dict``
    (``unet.<module>.lora_A.weight``, alpha in ``lora_adapter_metadata``) loads as the same refiner, bit
    for bit; PeftModel keys (``base_model.model.<module>.lora_A.weight``, no alpha: alpha = rank) and raw
    peft state dicts (``<module>.lora_A.<adapter>.weight``, ``alpha_pattern``) read as the kohya pairs."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from noisecraft.lora import ADAPTER

    x, t, c = _inputs(model)
    lora = attach_lora(model.unet, rank=3, alpha=6.0)
    _randomize_up(lora, seed=4)
    out = _run(model, x, t, c)
    pairs = lora.pairs()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "diffusers", unet_lora_layers=get_peft_model_state_dict(model.unet, adapter_name=ADAPTER),
        unet_lora_adapter_metadata=model.unet.peft_config[ADAPTER].to_dict(), safe_serialization=True)
    lora.remove()
    path = tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    got, _ = read_refiner_pairs(path)
    assert set(got) == set(pairs) and all(got[k][2] == 6.0 for k in got)
    loaded = load_lora(model.unet, path)
    assert torch.equal(_run(model, x, t, c), out)
    loaded.remove()

    layouts = (("base_model.model.", "", {}, 3.0),
               ("", ".default", {"lora_adapter_metadata": json.dumps({"lora_alpha": 3.0, "alpha_pattern": {"to_q": 6.0}})},
                None))
    for prefix, adapter, meta, alpha in layouts:
        state = {}
        for key, (down, up, _) in pairs.items():
            module = lora.module_names[key]
            state[f"{prefix}{module}.lora_A{adapter}.weight"] = down
            state[f"{prefix}{module}.lora_B{adapter}.weight"] = up
        path = tmp_path / f"peft_{len(prefix)}{adapter}.safetensors"
        save_file(state, str(path), metadata={"noisecraft.kind": "refiner", **meta})
        got, _ = read_refiner_pairs(path)
        assert set(got) == set(pairs)
        for key, (down, up, a) in got.items():
            want = alpha if alpha is not None else (6.0 if lora.module_names[key].endswith("to_q") else 3.0)
            assert torch.equal(down, pairs[key][0]) and torch.equal(up, pairs[key][1]) and a == want, key


def test_without_peft_files_still_read_and_attaching_says_what_to_install(model, tmp_path, monkeypatch):
    """The ComfyUI nodes only read and write refiner files: that needs no peft. Putting a refiner on a
    diffusers model does, and says how to get it."""
    import sys

    lora = attach_lora(model.unet, rank=2)
    path = lora.save(tmp_path / "r.safetensors")
    lora.remove()
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed: `import peft` raises ImportError
    pairs, meta = read_refiner_pairs(path)
    save_refiner_pairs(pairs, tmp_path / "copy.safetensors", meta)
    assert (tmp_path / "copy.safetensors").read_bytes() == path.read_bytes()
    for attach in (lambda: attach_lora(model.unet, rank=2), lambda: load_lora(model.unet, path)):
        with pytest.raises(ImportError, match=r"needs peft.*pip install"):
            attach()
    assert not hasattr(model.unet, "peft_config")


def test_pairs_writer_and_reader(model, tmp_path):
    """save_refiner_pairs / read_refiner_pairs (what the ComfyUI Save Refiner and Load Refiner use): exact
    round trip, byte-for-byte reproducible, default metadata under the caller's, refuses what the reader would."""
    lora = attach_lora(model.unet, rank=2, alpha=4.0)
    _randomize_up(lora, seed=5)
    pairs = lora.pairs()
    lora.remove()
    a = save_refiner_pairs(pairs, tmp_path / "a.safetensors", {"noisecraft.base_model": "toy", "model_kind": "eps"})
    b = save_refiner_pairs(dict(reversed(pairs.items())), tmp_path / "b.safetensors",
                           {"model_kind": "eps", "noisecraft.base_model": "toy"})
    assert a.read_bytes() == b.read_bytes()
    got, meta = read_refiner_pairs(a)
    assert set(got) == set(pairs) and all(torch.equal(got[k][0], pairs[k][0]) and torch.equal(got[k][1], pairs[k][1])
                                          and got[k][2] == 4.0 for k in pairs)
    assert meta["noisecraft.kind"] == "refiner" and meta["noisecraft.rank"] == "2"
    assert meta["noisecraft.model_kind"] == "eps" and meta["noisecraft.layers"] == str(len(pairs))


# -- bad refiner state dicts and pairs: one row per input, the message names what is wrong -----------

K = "lora_unet_mid_block_attentions_0_proj"  # a kohya prefix
M = "mid_block.attentions.0.proj"  # the same layer's module name (peft keys)
D, U = torch.ones(2, 4), torch.ones(3, 2)  # down [rank 2, in 4], up [out 3, rank 2]
KOHYA = {f"{K}.lora_down.weight": D, f"{K}.lora_up.weight": U, f"{K}.alpha": torch.tensor(2.0)}
PEFT = {f"unet.{M}.lora_A.weight": D, f"unet.{M}.lora_B.weight": U}
REFINER = {"noisecraft.kind": "refiner"}

PARSE_CASES = [  # (id, state, metadata, message)
    ("other-noisecraft-kind", KOHYA, {"noisecraft.kind": "npnet"}, "NoiseCraft 'npnet' file, not a refiner"),
    ("dora-variant", {**KOHYA, f"{K}.dora_scale": torch.ones(3, 1)}, REFINER, "LoRA variants"),
    ("peft-dora-magnitude", {**PEFT, f"{M}.lora_magnitude_vector.weight": torch.ones(3)}, REFINER, "LoRA variants"),
    ("text-encoder-keys", {**PEFT, "text_encoder.q.lora_A.weight": D}, REFINER, "text-encoder LoRA keys"),
    ("kohya-and-peft-mixed", {**KOHYA, **PEFT}, REFINER, "mixes kohya"),
    ("kohya-down-without-up", {f"{K}.lora_down.weight": D}, REFINER, "but no lora_unet_mid_block_attentions_0_proj"),
    ("peft-A-without-B", {f"{M}.lora_A.weight": D}, REFINER, "lora_A.weight without its lora_B"),
    ("peft-B-without-A", {f"{M}.lora_B.weight": U}, REFINER, "lora_B.weight without its lora_A"),
    ("rank-mismatch", {**KOHYA, f"{K}.lora_up.weight": torch.ones(3, 5)}, REFINER, "with the same rank"),
    ("down-1d", {**KOHYA, f"{K}.lora_down.weight": torch.ones(2)}, REFINER, "with the same rank"),
    ("alpha-two-numbers", {**KOHYA, f"{K}.alpha": torch.ones(2)}, REFINER, "expected one number"),
    ("alpha-inf", {**KOHYA, f"{K}.alpha": torch.tensor(float("inf"))}, REFINER, "expected a finite number"),
    ("two-peft-adapters", {f"{M}.lora_A.a.weight": D, f"{M}.lora_B.a.weight": U, "x.lora_A.b.weight": D,
                           "x.lora_B.b.weight": U}, REFINER, "2 peft adapters"),
    ("no-lora-keys", {"conv.weight": torch.ones(1)}, REFINER, "it is not a LoRA"),
]


@pytest.mark.parametrize("case", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_bad_refiner_state_is_refused_by_name(case):
    from noisecraft.lora import parse_refiner_state

    _, state, meta, message = case
    with pytest.raises(ValueError, match=message) as info:
        parse_refiner_state(state, meta, "bad.safetensors")
    assert str(info.value).startswith("bad.safetensors")


SAVE_CASES = [  # (id, pairs, message)
    ("nan-up", {K: (D, U * float("nan"), 2.0)}, f"{K} has NaN/inf in \\['lora_up'\\]"),
    ("inf-alpha", {K: (D, U, float("inf"))}, f"{K} has NaN/inf in \\['alpha'\\]"),
    ("rank-mismatch", {K: (D, torch.ones(3, 1), 2.0)}, "with the same rank"),
    ("not-a-triple", {K: (D, U)}, "is not '<prefix>': \\(down, up, alpha\\)"),
    ("empty", {}, "has no LoRA layers"),
]


@pytest.mark.parametrize("case", SAVE_CASES, ids=[c[0] for c in SAVE_CASES])
def test_bad_pairs_are_not_written(case, tmp_path):
    _, pairs, message = case
    path = tmp_path / "r.safetensors"
    with pytest.raises(ValueError, match=f"refusing to write {path}.*{message}"):
        save_refiner_pairs(pairs, path)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left
