"""Guidance-scale control (noisecraft.guidance_embed): the CFG scale as an input of the refiner pass.

Tier 1: torch + diffusers + peft, CPU, the shipped toy model, seconds. Checks: the sinusoid is diffusers'
(LCM's) guidance-scale embedding; a zero-initialised embedding leaves the refined noise bit for bit equal
to the plain refiner's, at every scale; the teacher cache draws each sample's scale reproducibly (a build
in parts has the same bytes) and guides each sample with its own scale; a few training steps make the
refined noise depend on the scale; save/load round-trips the embedding exactly; bad inputs (no scale for a
conditioned refiner, a scale for a plain one, a range that does not match the cache, --cfg with
--guidance-range) are refused or warned about; old refiner files and plain settings are unchanged.
"""

import json
import logging

import pytest
import torch

from noisecraft.guidance_embed import (DEFAULT_MULT, META_KEY, WEIGHT_KEY, GuidanceEmbedding, GuidanceMissing, cfg_per_sample,
                                       find_time_embedding, scale_draws)
from noisecraft.hosts import toy
from noisecraft.hosts.adapters import attach_lora, load_lora
from noisecraft.lora import read_lora_file
from noisecraft.refine import refine_noise
from noisecraft.rng import seeded_noise
from noisecraft.sigmas import get_sigmas
from noisecraft.train import RefinerTrainConfig, build_teacher_cache, train_refiner
from noisecraft.train.teacher_cache import per_sample_teacher

RANGE = (1.5, 5.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = toy.load_toy()
    host = toy.toy_host(model)
    root = tmp_path_factory.mktemp("guidance")
    kw = dict(shape=model.latent_shape, conds=list(range(10)), total=16, sigmas=get_sigmas(model.table, "normal", 3),
              kind="eps", base_seed=11, shard_size=8, batch_size=8, guidance_range=RANGE)
    cache = build_teacher_cache(root / "cache", per_sample_teacher(host), **kw)
    config = RefinerTrainConfig(steps=4, rank=2, lr=2e-2, batch_size=8, student_steps=2, checkpoint_every=4,
                                guidance_range=RANGE)
    result = train_refiner(host, cache, root / "run", config)
    result.lora.remove()
    return model, host, cache, result, kw, root


def _refined(model, lora, guidance=None, labels=(1, 7)):
    e = torch.cat([seeded_noise(900 + i, (1, *model.latent_shape)) for i in range(len(labels))])
    smax = float(get_sigmas(model.table, "normal", 10)[0])
    den = model.denoiser(torch.tensor(labels))
    with torch.no_grad():
        return refine_noise(e, *lora.base_and_lora(den, guidance=guidance), "eps", smax)


def test_sinusoid_is_diffusers_guidance_scale_embedding():
    from diffusers.models.embeddings import get_timestep_embedding

    g = torch.tensor([1.0, 1.5, 3.0, 7.5])
    lcm_form = GuidanceEmbedding(width=8, mult=1000.0)
    # LCM's get_guidance_scale_embedding(w = g - 1, 256): sin/cos of (g - 1) * 1000 at log-spaced frequencies
    half = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 127)
    lcm = torch.cat([torch.sin(((g - 1) * 1000)[:, None] * half), torch.cos(((g - 1) * 1000)[:, None] * half)], 1)
    assert torch.allclose(lcm_form.sinusoid(g), lcm, atol=1e-3)  # float32 sin of arguments up to 6500
    assert torch.equal(lcm_form.sinusoid(g), get_timestep_embedding((g - 1) * 1000, 256, False, 1))
    emb = GuidanceEmbedding(width=8)  # ours: the same form on g - 1 itself (smooth over CFG ranges)
    assert emb.mult == DEFAULT_MULT and torch.equal(emb.sinusoid(g), get_timestep_embedding((g - 1) * DEFAULT_MULT,
                                                                                           256, False, 1))
    assert torch.equal(emb(g), torch.zeros(4, 8))  # zero-initialised projection


def test_zero_init_equals_the_plain_refiner_exactly(setup):
    model = setup[0]
    lora = attach_lora(model.unet, 2, seed=3)
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for pair in lora.layers.values():  # a non-trivial plain refiner
                pair.lora_up.weight.copy_(torch.randn(pair.lora_up.weight.shape, generator=g) * 0.05)
        plain = _refined(model, lora)
        assert plain.abs().sum() > 0
        emb = GuidanceEmbedding.for_model(model.unet, train_range=RANGE)
        assert emb.width == model.unet.time_embedding.linear_2.out_features
        assert find_time_embedding(model.unet)[0] == "time_embedding"
        lora.add_guidance(emb)
        for scale in (1.5, 3.0, 5.0):
            assert torch.equal(_refined(model, lora, scale), plain)
    finally:
        lora.remove()
    assert not model.unet.time_embedding._forward_hooks  # remove() takes the hook off too


def test_teacher_scales_are_per_sample_reproducible_and_resumable(setup, tmp_path, check_resumed_build):
    model, host, cache, _, kw, _ = setup
    b = cache.get(range(cache.total))
    assert torch.equal(b.guidance, scale_draws(range(16), 11, RANGE))
    assert float(b.guidance.min()) >= RANGE[0] and float(b.guidance.max()) <= RANGE[1]
    assert len(set(b.guidance.tolist())) == 16 and cache.guidance_range == RANGE
    # any 16 consecutive draws leave no gap wider than 2/16 of the range (golden-ratio sequence)
    u = torch.sort((scale_draws(range(100, 116), 11, RANGE) - RANGE[0]) / (RANGE[1] - RANGE[0])).values
    assert float(torch.diff(torch.cat([u, u[:1] + 1])).max()) < 2 / 16

    build = lambda root, shards=None: build_teacher_cache(root, per_sample_teacher(host), **{**kw, "total": 24},
                                                          shards=shards)  # noqa: E731
    build(tmp_path / "a")
    check_resumed_build(build, tmp_path, [1], [0, 2], 8)

    # the teacher guides each sample with its own scale: equal to scalar CFG per sample (batched vs not)
    ids, e = torch.tensor([2, 5]), torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    sig = torch.full((2,), 3.0)
    with torch.no_grad():
        mixed = cfg_per_sample(host.denoiser(ids, cfg=2.0), torch.tensor([1.5, 4.0]))(e, sig)
        for i, scale in enumerate((1.5, 4.0)):
            ref = host.denoiser(ids[i:i + 1], cfg=scale)(e[i:i + 1], sig[:1])
            assert torch.allclose(mixed[i:i + 1], ref, atol=1e-5)  # float32 rounding of two network batchings


def test_training_makes_the_refined_noise_follow_the_scale(setup):
    model, _, _, result, _, _ = setup
    lora = load_lora(model.unet, result.refiner_path)
    try:
        assert lora.guidance is not None and lora.guidance.proj.weight.abs().max() > 0
        outs = [_refined(model, lora, g) for g in (1.5, 3.0, 5.0)]
        assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
        # one scale per sample: each row equals the run with that scale for all
        per = _refined(model, lora, torch.tensor([1.5, 5.0]))
        assert torch.allclose(per[:1], outs[0][:1], atol=1e-6) and torch.allclose(per[1:], outs[2][1:], atol=1e-6)
    finally:
        lora.remove()


def test_save_load_round_trip(setup, tmp_path):
    model, _, _, result, _, _ = setup
    state, meta = read_lora_file(result.refiner_path)
    info = json.loads(meta[META_KEY])
    assert state[WEIGHT_KEY].shape == (info["width"], info["freq_dim"]) and info["range"] == list(RANGE)
    assert json.loads(meta["noisecraft.training"])["guidance_range"] == list(RANGE)
    assert json.loads(meta["noisecraft.training"])["teacher"]["guidance_range"] == list(RANGE)
    lora = load_lora(model.unet, result.refiner_path)
    try:
        before = _refined(model, lora, 3.0)
        lora.save(tmp_path / "again.safetensors", {k[len("noisecraft."):]: v for k, v in meta.items()
                                                   if k.startswith("noisecraft.") and k != META_KEY})
    finally:
        lora.remove()
    assert torch.equal(read_lora_file(tmp_path / "again.safetensors")[0][WEIGHT_KEY], state[WEIGHT_KEY])
    lora = load_lora(model.unet, tmp_path / "again.safetensors")
    try:
        assert torch.equal(_refined(model, lora, 3.0), before)
    finally:
        lora.remove()


def test_bad_inputs(setup, caplog, tmp_path):
    model, host, cache, result, _, _ = setup
    lora = load_lora(model.unet, result.refiner_path)
    try:
        with pytest.raises(GuidanceMissing, match=r"guidance=<scale>"):
            _refined(model, lora)
        with pytest.raises(ValueError, match="finite number >= 0"):
            _refined(model, lora, float("nan"))
        with caplog.at_level(logging.WARNING):
            _refined(model, lora, 9.0)
        assert "outside the range" in caplog.text
    finally:
        lora.remove()
    plain = toy.load_toy_refiner(model)[1]  # the shipped (old, plain) refiner file
    try:
        assert plain.guidance is None
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            with_g = _refined(model, plain, 4.0)
        assert "no guidance-scale input" in caplog.text
        assert torch.equal(with_g, _refined(model, plain))
    finally:
        plain.remove()
    with pytest.raises(ValueError, match="guidance_range"):
        RefinerTrainConfig(guidance_range=(5.0, 1.0)).check()
    with pytest.raises(ValueError, match="same range"):
        train_refiner(host, cache, tmp_path / "x", RefinerTrainConfig(steps=1, guidance_range=(1.0, 3.0)))
    state, meta = read_lora_file(result.refiner_path)
    del state[WEIGHT_KEY]
    with pytest.raises(ValueError, match="incomplete or damaged"):
        GuidanceEmbedding.from_file(state, meta, "x")
    assert not model.unet.time_embedding._forward_hooks


def test_plain_settings_and_old_files_unchanged(tmp_path):
    assert "guidance_range" not in RefinerTrainConfig().to_json()
    assert RefinerTrainConfig.from_json(RefinerTrainConfig(guidance_range=RANGE).to_json()).guidance_range == RANGE
    state, meta = read_lora_file(toy.REFINER_WEIGHTS)
    assert GuidanceEmbedding.from_file(state, meta) is None and META_KEY not in meta
    model, lora = toy.load_toy_refiner()
    try:
        lora.save(tmp_path / "plain.safetensors")
    finally:
        lora.remove()
    state2, meta2 = read_lora_file(tmp_path / "plain.safetensors")
    assert set(state2) == set(state) and META_KEY not in meta2


def test_cli_guidance_range(tmp_path, capsys):
    from noisecraft.__main__ import main

    common = ["--steps", "2", "--samples", "8", "--batch", "4", "--student-steps", "2", "--teacher-steps", "2",
              "--rank", "2", "--shard-size", "8"]
    assert main(["train-refiner", "--toy", "--out", str(tmp_path / "ok"), "--guidance-range", "2", "4", *common]) == 0
    state, meta = read_lora_file(tmp_path / "ok" / "refiner.safetensors")
    assert WEIGHT_KEY in state and json.loads(meta[META_KEY])["range"] == [2.0, 4.0]
    assert json.loads(meta["noisecraft.training"])["teacher"]["cfg"] == [2.0, 4.0]

    rc = main(["train-refiner", "--toy", "--out", str(tmp_path / "o"), "--guidance-range", "1.5", "5", "--cfg", "3"])
    assert rc == 2 and "--guidance-range" in capsys.readouterr().err
    rc = main(["train-refiner", "--toy", "--out", str(tmp_path / "o"), "--guidance-range", "5", "1.5"])
    assert rc == 2 and "lo <= hi" in capsys.readouterr().err
