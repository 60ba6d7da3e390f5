"""NoiseRefine training (noisecraft.train): teacher cache, MSD trainer, resume, CLI, shipped toy refiner.

Tier 1: torch + diffusers, CPU, no ComfyUI. Checks: the teacher cache round-trips and is
deterministic (same definition -> same bytes; data order a pure function of (seed, epoch); ranks
partition the global batch; killed builds resume); a short run on the toy model lowers the MSD loss;
a run killed between checkpoints (or stopped by its interrupt callback) and resumed equals an
uninterrupted one bit for bit; the CLI in
toy and diffusers-folder mode; the shipped toy refiner matches its manifest entry, loads through
noisecraft.lora and beats unguided sampling on held-out seeds.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from noisecraft import ode
from noisecraft.hosts import toy
from noisecraft.hosts.toy import toy_host
from noisecraft.hosts.adapters import load_lora
from noisecraft.lora import CONVENTION, read_lora_file
from noisecraft.msd import msd_loss
from noisecraft.refine import refine_noise, refine_with, residual_from_denoisers
from noisecraft.rng import seeded_noise
from noisecraft.sigmas import get_sigmas, noise_to_x
from noisecraft.train import RefinerTrainConfig, TeacherCache, build_teacher_cache, train_refiner
from noisecraft.weights import find_entry, sha256_file, verify_file

SHAPE = (1, 4, 4)


def _fake_guided(cond_ids):
    """A cheap deterministic 'guided denoiser' for cache tests: x0 = x / (1 + sigma) + cond id."""
    c = cond_ids.float().view(-1, 1, 1, 1)
    return lambda x, s: x / (1 + s.view(-1, 1, 1, 1)) + c


def _build(root, **kw):
    args = dict(shape=SHAPE, conds=["a", "b", "c"], total=10, sigmas=torch.tensor([4.0, 1.0, 0.0]), kind="eps",
                base_seed=7, shard_size=4, batch_size=3, meta={"model": "fake"})
    args.update(kw)
    return build_teacher_cache(root, _fake_guided, **args)


# -- teacher cache ---------------------------------------------------------------------------------


def test_teacher_cache_round_trip_and_determinism(tmp_path, check_resumed_build):
    cache = _build(tmp_path / "a")
    assert cache.complete and cache.num_shards == 3 and len(cache) == 10
    assert cache.meta["model"] == "fake" and cache.meta["teacher_steps"] == 2 and cache.meta["sigma_max"] == 4.0
    assert not list((tmp_path / "a").glob("*.tmp")) and not list((tmp_path / "a").glob(".*tmp"))
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [4, 4, 2]

    batch = TeacherCache(tmp_path / "a").get([9, 0, 5])
    for j, i in enumerate([9, 0, 5]):  # noise from the sample's own seed, condition i % 3
        assert torch.equal(batch.e[j], seeded_noise(7 + i, (1, *SHAPE))[0])
        assert int(batch.cond[j]) == i % 3
    sig = torch.tensor([4.0, 1.0, 0.0])
    expected = ode.sample(_fake_guided(batch.cond), noise_to_x(batch.e, "eps", 4.0), sig)
    assert torch.allclose(batch.x0, expected, atol=1e-6)

    # same definition elsewhere -> the same shard bytes; a build killed after one shard resumes
    check_resumed_build(lambda root, shards=None: (_build(root, shards=shards), TeacherCache(root))[1],
                        tmp_path, first=[1], missing=[0, 2], batch=4)
    with pytest.raises(ValueError, match="different"):
        _build(tmp_path / "b", total=12)
    with pytest.raises(FileNotFoundError, match="not a teacher cache"):
        TeacherCache(tmp_path / "nothing")


def test_teacher_cache_batches_positions_and_ranks(tmp_path):
    cache = _build(tmp_path / "c")
    it = cache.batches(4, seed=3)
    seen, positions = [], []
    for _ in range(5):  # 2 full batches per epoch of 10 (the tail of 2 is skipped)
        b, pos = next(it)
        seen.append(b.index.tolist())
        positions.append(pos)
    assert positions[:3] == [(0, 4), (1, 0), (1, 4)]
    assert sorted(seen[0] + seen[1]) == sorted(cache.epoch_order(3, 0)[:8].tolist())
    assert seen[2] != seen[0]  # a new order each epoch
    again = [b.index.tolist() for (b, _), _ in zip(cache.batches(4, seed=3), range(5))]
    assert again == seen  # pure function of the seed
    resumed, _ = next(cache.batches(4, seed=3, epoch=positions[2][0], offset=positions[2][1]))
    assert resumed.index.tolist() == seen[3]  # a stored position continues exactly
    halves = [next(cache.batches(4, seed=3, rank=r, world_size=2))[0].index.tolist() for r in (0, 1)]
    assert halves[0] + halves[1] == seen[0]  # ranks partition the global batch
    with pytest.raises(ValueError, match="split evenly"):
        next(cache.batches(4, world_size=3))
    with pytest.raises(ValueError, match="batch size"):
        next(cache.batches(11))


# -- the trainer on the toy model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_setup(tmp_path_factory):
    model = toy.load_toy()
    host = toy_host(model)
    root = tmp_path_factory.mktemp("toy_cache")
    cache = build_teacher_cache(
        root / "cache", lambda c: host.denoiser(c, cfg=3.0), shape=model.latent_shape, conds=list(range(10)),
        total=32, sigmas=get_sigmas(model.table, "normal", 8), kind="eps", base_seed=123, shard_size=16,
        batch_size=32)
    return model, host, cache


def _cache_loss(host, cache, lora, student_steps):
    """The MSD loss over the whole cache with the (possibly trained) LoRA."""
    b = cache.get(range(cache.total))
    student = host.denoiser(b.cond)
    sigmas = get_sigmas(host.table, "normal", student_steps)
    if lora is None:
        with torch.enable_grad():
            return float(msd_loss(lambda z: z, b.e, student, b.x0, sigmas, "eps")[0].detach())
    d_base, d_lora = lora.base_and_lora(student)
    residual = residual_from_denoisers(d_base, d_lora, "eps", float(sigmas[0]))
    with torch.enable_grad(), lora.disabled():
        loss, _ = msd_loss(lambda z: refine_with(residual, z), b.e, student, b.x0, sigmas, "eps")
    return float(loss.detach())


def test_short_training_lowers_the_msd_loss(toy_setup, tmp_path):
    model, host, cache = toy_setup
    config = RefinerTrainConfig(steps=20, rank=2, lr=3e-3, batch_size=8, student_steps=4, checkpoint_every=10)
    result = train_refiner(host, cache, tmp_path / "run", config)
    try:
        after = _cache_loss(host, cache, result.lora, 4)
        with result.lora.disabled():  # the untrained refiner is the identity: the plain student's loss
            before = _cache_loss(host, cache, None, 4)
        assert after < 0.9 * before, (before, after)
        log = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(1, 21)) and all(r["loss"] > 0 for r in log)
        from PIL import Image

        assert Image.open(tmp_path / "run" / "loss.png").size == (640, 360)
        state, meta = read_lora_file(result.refiner_path)
        assert meta["noisecraft.kind"] == "refiner" and meta["noisecraft.rank"] == "2"
        assert json.loads(meta["noisecraft.training"])["student_steps"] == 4
        assert all(k.startswith("lora_unet_") for k in state)
    finally:
        result.lora.remove()


def test_resume_after_kill_equals_uninterrupted_run(toy_setup, tmp_path):
    _, host, cache = toy_setup
    config = RefinerTrainConfig(steps=6, rank=2, lr=3e-3, batch_size=8, student_steps=3, checkpoint_every=2)
    full = train_refiner(host, cache, tmp_path / "full", config)
    full.lora.remove()
    killed = train_refiner(host, cache, tmp_path / "killed", config, stop_after=5)  # checkpoint at 4, killed at 5
    killed.lora.remove()
    assert killed.stopped_early and not (tmp_path / "killed" / "refiner.safetensors").exists()
    with pytest.raises(FileExistsError, match="resume"):
        train_refiner(host, cache, tmp_path / "killed", config)
    with pytest.raises(ValueError, match="other settings"):
        train_refiner(host, cache, tmp_path / "killed", RefinerTrainConfig(**{**config.__dict__, "lr": 1e-2}), resume=True)
    resumed = train_refiner(host, cache, tmp_path / "killed", config, resume=True)
    resumed.lora.remove()
    assert resumed.step == 6
    a = (tmp_path / "full" / "refiner.safetensors").read_bytes()
    b = (tmp_path / "killed" / "refiner.safetensors").read_bytes()
    assert a == b  # bit for bit
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "wall_s"} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(tmp_path / "full" / "loss.jsonl") == strip(tmp_path / "killed" / "loss.jsonl")


def test_interrupt_stops_with_a_checkpoint_and_resume_finishes_the_same(toy_setup, tmp_path):
    _, host, cache = toy_setup
    config = RefinerTrainConfig(steps=4, rank=2, lr=3e-3, batch_size=8, student_steps=2, checkpoint_every=4)
    full = train_refiner(host, cache, tmp_path / "full", config)
    full.lora.remove()
    asked = []
    stopped = train_refiner(host, cache, tmp_path / "int", config, interrupt=lambda: len(asked.append(1) or asked) > 2)
    stopped.lora.remove()
    assert stopped.stopped_early and stopped.step == 2 and not (tmp_path / "int" / "refiner.safetensors").exists()
    resumed = train_refiner(host, cache, tmp_path / "int", config, resume=True)
    resumed.lora.remove()
    assert (tmp_path / "int" / "refiner.safetensors").read_bytes() == (tmp_path / "full" / "refiner.safetensors").read_bytes()


def test_bf16_autocast_step_runs(toy_setup, tmp_path):
    _, host, cache = toy_setup
    config = RefinerTrainConfig(steps=1, rank=2, batch_size=4, student_steps=2, precision="bf16")
    result = train_refiner(host, cache, tmp_path / "bf16", config)
    result.lora.remove()
    assert result.step == 1 and torch.isfinite(torch.tensor(result.losses)).all()
    assert all(v.dtype == torch.float32 for v in load_file(result.refiner_path).values())  # weights stay fp32


# -- CLI ---------------------------------------------------------------------------------------------


def test_cli_train_refiner_toy_and_diffusers_folder(tmp_path, capsys):
    from noisecraft.__main__ import main

    assert main(["train-refiner", "--out", str(tmp_path / "x")]) == 2  # neither --toy nor --model
    common = ["--steps", "2", "--samples", "8", "--batch", "4", "--student-steps", "2", "--teacher-steps", "3",
              "--rank", "2", "--shard-size", "8"]
    assert main(["train-refiner", "--toy", "--out", str(tmp_path / "toy"), *common]) == 0
    assert (tmp_path / "toy" / "refiner.safetensors").is_file() and (tmp_path / "toy" / "teacher_cache" / "index.json").is_file()
    assert main(["train-refiner", "--toy", "--out", str(tmp_path / "toy"), *common]) == 2  # would overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["train-refiner", "--toy", "--out", str(tmp_path / "toy"), "--resume", *common[:1], "3", *common[2:]]) == 0

    # a local diffusers folder (the toy UNet saved by diffusers) with precomputed prompt embeddings
    model = toy.load_toy()
    folder = tmp_path / "model"
    model.unet.save_pretrained(str(folder / "unet"))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "num_train_timesteps": 1000, "prediction_type": "epsilon"}))
    (tmp_path / "prompts.txt").write_text("three\nseven\n")
    save_file({"cond": model.cond(torch.tensor([3, 7])).contiguous(), "uncond": model.uncond(1).contiguous()},
              str(tmp_path / "embeds.safetensors"))
    args = ["train-refiner", "--model", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--cfg", "3",
            "--out", str(tmp_path / "gen"), *common]
    assert main([*args, "--prompt-embeds", str(tmp_path / "embeds.safetensors")]) == 0
    _, meta = read_lora_file(tmp_path / "gen" / "refiner.safetensors")
    assert meta["noisecraft.base_model"] == "model" and meta["noisecraft.model_kind"] == "eps"
    try:
        import transformers  # noqa: F401
    except ImportError:  # without transformers (and no tokenizer here) the error says what to do
        assert main([*args[:-len(common)], "--out", str(tmp_path / "gen2")]) == 2
        assert "transformers" in capsys.readouterr().err


# -- the shipped toy refiner -------------------------------------------------------------------------


def test_shipped_toy_refiner_matches_manifest_and_beats_unguided():
    entry = find_entry("toy-refiner")
    assert entry.local_path.resolve() == toy.REFINER_WEIGHTS.resolve()
    verify_file(toy.REFINER_WEIGHTS, entry)
    assert sha256_file(toy.REFINER_WEIGHTS) == entry.sha256
    state, meta = read_lora_file(toy.REFINER_WEIGHTS)
    assert meta["noisecraft.kind"] == "refiner" and meta["noisecraft.convention"] == CONVENTION
    assert meta["noisecraft.base_model"] == "noisecraft-toy-digits-8x8" and meta["noisecraft.model_kind"] == "eps"
    training = json.loads(meta["noisecraft.training"])
    assert training["student_steps"] == 10 and training["teacher"]["cfg"] == 3.0 and training["teacher"]["teacher_steps"] == 20

    model, lora = toy.load_toy_refiner()
    try:
        assert len(lora.layers) * 3 == len(state)
        n = 60  # held-out: seeds 700_000.. (training used 10_000..)
        labels = torch.arange(n) % 10
        e = torch.cat([seeded_noise(700_000 + i, (1, 1, 8, 8)) for i in range(n)])
        sigmas = get_sigmas(model.table, "normal", 20)
        smax = float(sigmas[0])
        assert float(meta["noisecraft.sigma_max"]) == pytest.approx(smax)
        unguided, guided = model.denoiser(labels), model.denoiser(labels, cfg=3.0)
        with torch.no_grad():
            e_hat = refine_noise(e, *lora.base_and_lora(unguided), "eps", smax)
            with lora.disabled():
                x_u, x_c, x_r = (ode.sample(d, noise_to_x(z, "eps", smax), sigmas)
                                 for d, z in ((unguided, e), (guided, e), (unguided, e_hat)))
        acc = {k: toy.score_digits(x, labels)["accuracy"] for k, x in (("u", x_u), ("c", x_c), ("r", x_r))}
        mse_u, mse_r = float((x_u - x_c).pow(2).mean()), float((x_r - x_c).pow(2).mean())
        assert acc["r"] > acc["u"], acc
        assert mse_r < 0.7 * mse_u, (mse_u, mse_r)
    finally:
        lora.remove()
    fresh = toy.load_toy()
    assert len(load_lora(fresh.unet, toy.REFINER_WEIGHTS).layers) == len(lora.layers)
