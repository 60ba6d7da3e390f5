"""Held-out validation in the training loop (issue 18): noisecraft.train.validation, .trackers, noisecraft.presets,
train-refiner's --validate-every / --prompt-validation / --report-to / --preset.

Tier 1: torch + diffusers + peft, CPU, the shipped toy model (and a tiny random SD1 folder for the --model path).
Checks: the gap closed is exactly 0 at step 0 (a fresh LoRA's residual is exactly 0); a run with validation
trains the same tensor bytes and losses as one without, and a killed + resumed run validates like the
uninterrupted one; the files (validation.jsonl, grids, refiner_best with its figures, the refiner's
metadata); TensorBoard event files read back with TensorBoard's own reader (every scalar and the grid);
wandb offline; presets fill the paper's values with their sources and a given flag wins; refusals are one line.
"""

import argparse
import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from noisecraft.hosts import toy
from noisecraft.hosts.toy import toy_confidence_scorer
from noisecraft.sigmas import get_sigmas
from noisecraft.train import RefinerTrainConfig, build_teacher_cache, train_refiner
from noisecraft.train.trackers import make_trackers
from noisecraft.train.validation import (BEST_NAME, VALIDATION_LOG, ValidationSet, Validator, check_held_out,
                                         held_out_seeds)

TEACHER_CFG = 3.0


@pytest.fixture(scope="module")
def host():
    return toy.toy_host()


@pytest.fixture(scope="module")
def cache(host, tmp_path_factory):
    return build_teacher_cache(
        tmp_path_factory.mktemp("val_cache") / "cache", lambda c: host.denoiser(c, cfg=TEACHER_CFG),
        shape=(1, 8, 8), conds=list(range(10)), total=32, sigmas=get_sigmas(host.table, "normal", 6), kind="eps",
        base_seed=10_000, shard_size=32, batch_size=32)


def _validator(host, every=3, trackers=()):
    idx, seeds = held_out_seeds(10, 1)
    vs = ValidationSet(host.denoiser, lambda c: host.denoiser(c, cfg=TEACHER_CFG), idx, seeds, (1, 8, 8),
                       get_sigmas(host.table, "normal", 6), names=[f"digit {i}" for i in idx],
                       scorer=toy_confidence_scorer(), batch_size=10)
    return Validator(vs, every=every, trackers=trackers)


CONFIG = dict(steps=7, batch_size=8, precision="fp32", checkpoint_every=2, student_steps=3)


def _train(host, cache, out, validation=None, **kw):
    result = train_refiner(host, cache, out, RefinerTrainConfig(**CONFIG), validation=validation, **kw)
    result.lora.remove()
    return result


def _data_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + struct.unpack("<Q", raw[:8])[0]:]


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _records(out: Path) -> list:
    return [json.loads(x) for x in (out / VALIDATION_LOG).read_text().splitlines() if x.strip()]


def test_validation_leaves_training_alone_and_records_the_gap(host, cache, tmp_path):
    plain = _train(host, cache, tmp_path / "plain")
    val = _validator(host)
    watched = _train(host, cache, tmp_path / "val", validation=val)
    out = tmp_path / "val"
    # the same training: losses and the refiner's tensor bytes; the metadata differs by the validation only
    assert watched.losses == plain.losses
    assert _data_bytes(out / "refiner.safetensors") == _data_bytes(tmp_path / "plain" / "refiner.safetensors")
    meta, plain_meta = _meta(out / "refiner.safetensors"), _meta(tmp_path / "plain" / "refiner.safetensors")
    assert {k: v for k, v in meta.items() if k != "noisecraft.validation"} == plain_meta

    recs = _records(out)
    assert [r["step"] for r in recs] == [0, 3, 6, 7]  # step 0, every 3, the last
    assert recs[0]["gap_closed"] == 0.0  # a fresh LoRA's residual is exactly 0: refined == unguided
    assert recs[0]["score_refined"] == recs[0]["score_unguided"]
    assert recs[-1]["gap_closed"] > 0 and recs[-1]["score_teacher"] > recs[0]["score_unguided"]
    assert all(r["samples"] == 10 for r in recs)
    for r in recs:
        assert (out / r["grid"]).is_file() and r["grid"] == f"validation/step_{r['step']}.png"
    from PIL import Image

    grid = Image.open(out / recs[-1]["grid"])
    assert grid.size[1] > 10 * 8 and grid.size[0] > 3 * 8  # 10 prompt rows, 3 columns

    summary = json.loads(meta["noisecraft.validation"])
    best = max(recs, key=lambda r: r["gap_closed"])
    assert summary["last"]["gap_closed"] == recs[-1]["gap_closed"] and summary["best"]["step"] == best["step"]
    assert summary["passes_per_validation"] == 10 * (2 + 3)  # V * (2 refiner passes + N student steps)
    best_meta = json.loads(_meta(out / BEST_NAME)["noisecraft.validation"])
    assert best_meta["best"]["step"] == best["step"] and best_meta["best"]["gap_closed"] == best["gap_closed"]
    assert val.passes()["once"] == 10 * (3 + 2 * 6)  # unguided N steps + CFG teacher 2 x N' passes


def test_killed_and_resumed_run_validates_like_the_uninterrupted_one(host, cache, tmp_path):
    whole = _records_of(host, cache, tmp_path / "whole")
    out = tmp_path / "killed"
    _train(host, cache, out, validation=_validator(host), stop_after=5)  # killed after step 5 (checkpoint at 4)
    assert [r["step"] for r in _records(out)] == [0, 3]
    _train(host, cache, out, validation=_validator(host), resume=True)
    resumed = _records(out)
    strip = ("wall_s", "best")
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed] == \
           [{k: v for k, v in r.items() if k not in strip} for r in whole]


def _records_of(host, cache, out):
    _train(host, cache, out, validation=_validator(host))
    return _records(out)


def test_tensorboard_events_hold_every_scalar_and_the_grid(host, cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = make_trackers("tensorboard", tmp_path / "logs", project="proj", run_name="r1",
                             config={"steps": 7, "nested": {"rank": 4}, "targets": ["a", "b"]})
    _train(host, cache, tmp_path / "run", validation=_validator(host, trackers=trackers))
    acc = EventAccumulator(str(tmp_path / "logs" / "proj" / "r1"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/residual_rms"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, 8))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)  # float32 in the events
    recs = _records(tmp_path / "run")
    for key in ("gap_closed", "mse_unguided", "mse_refined", "score_unguided", "score_refined", "score_teacher"):
        events = acc.Scalars(f"validation/{key}")
        assert [e.step for e in events] == [0, 3, 6, 7]
        assert [e.value for e in events] == pytest.approx([r[key] for r in recs], rel=1e-6, abs=1e-7)
    assert "validation/grid" in tags["images"]
    images = acc.Images("validation/grid")
    assert [e.step for e in images] == [0, 3, 6, 7]
    from PIL import Image
    import io

    png = Image.open(io.BytesIO(images[-1].encoded_image_string))
    assert png.size == Image.open(tmp_path / "run" / recs[-1]["grid"]).size


def test_wandb_offline_run_is_written(host, cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = make_trackers("wandb", tmp_path / "logs", project="nc-test", run_name="offline-run",
                             config={"steps": 7})
    _train(host, cache, tmp_path / "run", validation=_validator(host, trackers=trackers))
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the offline run's record


def test_held_out_seeds_stay_out_of_the_cache():
    idx, seeds = held_out_seeds(3, 2, base=100)
    assert idx == [0, 0, 1, 1, 2, 2] and seeds == [100, 103, 101, 104, 102, 105]
    check_held_out(seeds, 0, 100)  # cache seeds 0..99
    with pytest.raises(ValueError, match=r"outside the teacher cache's seeds 90\.\.109.*validation seed base"):
        check_held_out(seeds, 90, 20)
    with pytest.raises(ValueError, match="one seed per condition id"):
        ValidationSet(None, None, [0, 1], [5], (1, 8, 8), torch.tensor([1.0, 0.0]))


# -- presets -------------------------------------------------------------------------------------------


def _parse(*argv):
    from noisecraft.cli_train import add_train_commands

    p = argparse.ArgumentParser()
    add_train_commands(p.add_subparsers(dest="command"))
    return p.parse_args(["train-refiner", *argv])


def test_preset_fills_the_papers_values_and_a_given_flag_wins(caplog):
    from noisecraft.presets import apply_preset

    plain = _parse("--model", "m")
    apply_preset(plain)  # no preset: every flag keeps its own default
    assert (plain.rank, plain.lr, plain.steps, plain.student_steps, plain.teacher_steps, plain.pag_scale,
            plain.cfg, plain.batch, plain.validate_every, plain.gradient_checkpointing) == \
           (4, 1e-3, 300, 10, 20, 0.0, None, 32, 0, False)

    args = _parse("--model", "m", "--preset", "paper-sdxl", "--rank", "64", "--lr", "3e-5")
    with caplog.at_level("INFO"):
        lines = apply_preset(args)
    assert (args.rank, args.lr) == (64, 3e-5)  # given flags win
    assert (args.student_steps, args.cfg, args.pag_scale) == (10, 7.0, 3.0)
    # the teacher: the cheapest measured within 2 points of the paper's Euler-20 (noisecraft.solvers), marked ours
    assert (args.teacher_sampler, args.teacher_steps, args.scheduler) == ("dpmpp_2m", 10, "karras")
    assert (plain.teacher_sampler, plain.scheduler) == ("euler", "normal")  # no preset: the flags' own defaults
    assert (args.batch, args.grad_accum, args.precision, args.gradient_checkpointing) == (2, 4, "bf16", True)
    text = "\n".join(lines)
    assert "--rank 64: given on the command line (the preset's 256 not used)" in text
    assert "--cfg 7.0: paper, App. D.2.1" in text and "--pag-scale 3.0: paper, App. D.2.1" in text
    assert "--student-steps 10: paper, App. D.1" in text and "--teacher-steps 10: ours:" in text
    assert "--teacher-sampler dpmpp_2m: ours:" in text and "--teacher-sampler euler --teacher-steps 20" in text
    assert "--batch 2: ours:" in text and "--steps 135750: ours:" in text  # not stated by the paper: ours
    assert args.prompt_validation == 16 and "--prompt-validation 16: ours:" in text
    assert "aesthetic" in text
    assert all(line in caplog.text for line in lines)  # logged at the start

    sd21 = _parse("--model", "m", "--preset", "paper-sd21")
    apply_preset(sd21)
    assert (sd21.rank, sd21.samples, sd21.batch) == (128, 50_000, 8)
    assert plain.prompt_validation == 0 and sd21.steps == 37_500


def test_cli_refusals_are_one_line(tmp_path, capsys):
    from noisecraft.__main__ import main

    rc = main(["train-refiner", "--toy", "--preset", "paper-sd21", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "leave it out with --toy" in err
    rc = main(["train-refiner", "--toy", "--samples", "8", "--steps", "1", "--validate-every", "1",
               "--validation-seed-base", "10004", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "--validation-seed-base 10004" in err and "outside the teacher cache's seeds" in err


def test_cli_toy_run_with_validation_and_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from noisecraft.__main__ import main

    out = tmp_path / "run"
    assert main(["train-refiner", "--toy", "--samples", "16", "--steps", "4", "--batch", "8", "--teacher-steps", "4",
                 "--student-steps", "2", "--validate-every", "2", "--validation-seeds", "1", "--report-to",
                 "tensorboard", "--run-name", "cli", "--out", str(out)]) == 0
    recs = _records(out)
    assert [r["step"] for r in recs] == [0, 2, 4] and recs[0]["gap_closed"] == 0.0
    assert "score_teacher" in recs[0]  # the toy's digit classifier scores the validation by default
    assert (out / BEST_NAME).is_file() and list((out / "logs" / "noisecraft" / "cli").glob("events.out.tfevents.*"))
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert said.startswith(f"(held-out validation: {100 * recs[-1]['gap_closed']:.1f}% of the latent-MSE gap closed")


def test_cli_model_validates_on_held_out_prompts(tmp_path):
    spec = importlib.util.spec_from_file_location("nc_test_families", Path(__file__).with_name("test_families.py"))
    fam = importlib.util.module_from_spec(spec)
    sys.modules["nc_test_families"] = fam
    spec.loader.exec_module(fam)
    fam.build_pipeline("sd1", tmp_path / "sd1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na green cone\nthe held out one\nanother held out\n")
    out = tmp_path / "run"
    argv = fam.train_args(tmp_path / "sd1", prompts, out, "--prompt-validation", 2, "--validate-every", 1,
                          "--validation-seeds", 2)
    assert fam.run_cli(*argv) == 0
    recs = _records(out)
    assert [r["step"] for r in recs] == [0, 1, 2] and recs[0]["gap_closed"] == 0.0
    assert all(r["samples"] == 4 for r in recs)  # 2 held-out prompts x 2 seeds
    from PIL import Image

    assert Image.open(out / recs[-1]["grid"]).mode == "RGB"  # decoded by the folder's vae/
    refusal = fam.train_args(tmp_path / "sd1", prompts, tmp_path / "run2", "--validate-every", 1)
    assert fam.run_cli(*refusal) == 2


# -- the aesthetic scorer ---------------------------------------------------------------------------


def _aesthetic_folder(root: Path) -> Path:
    """openai/clip-vit-large-patch14's vision classes, built small from a config with random weights (768-wide
    projection, as ViT-L/14's), and a random LAION head, in the folder layout the scorer reads."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from noisecraft.train.aesthetic import AestheticHead

    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, image_size=32, patch_size=8, projection_dim=768)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(str(root / "clip"))
        head = AestheticHead(768)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(root / "head.safetensors"))
    return root


def test_aesthetic_scorer_is_clip_embeddings_through_the_laion_head(tmp_path, monkeypatch):
    from noisecraft.train.aesthetic import CLIP_MEAN, CLIP_STD
    from noisecraft.train.teacher_filter import resolve_scorer

    root = _aesthetic_folder(tmp_path / "aes")
    monkeypatch.setenv("NOISECRAFT_AESTHETIC", str(root))
    scorer = resolve_scorer("aesthetic")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = scorer(images, torch.zeros(3, dtype=torch.long))
    assert scores.shape == (3,) and torch.isfinite(scores).all() and scores.unique().numel() == 3
    # by hand: 32x32 is already the CLIP size (the resize is exact), normalise, embed, L2-normalise, the head
    inner = scorer.fn
    pixels = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(inner.clip(pixel_values=pixels).image_embeds, dim=-1)
        expected = inner.head(emb).reshape(-1)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_aesthetic_scorer_without_its_weights_is_refused_in_one_line(tmp_path, monkeypatch):
    from noisecraft.train.teacher_filter import resolve_scorer

    monkeypatch.setenv("NOISECRAFT_AESTHETIC", str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match=r"not in .*nothing.*clip-vit-large-patch14.*NOISECRAFT_AESTHETIC") as e:
        resolve_scorer("aesthetic")
    assert "\n" not in str(e.value)


def test_validation_runs_under_the_trainings_autocast(host, cache, tmp_path):
    config = RefinerTrainConfig(**{**CONFIG, "steps": 2, "precision": "bf16"})
    val = _validator(host, every=1)
    result = train_refiner(host, cache, tmp_path / "bf16", config, validation=val)
    result.lora.remove()
    recs = _records(tmp_path / "bf16")
    assert [r["step"] for r in recs] == [0, 1, 2] and recs[0]["gap_closed"] == 0.0
    assert all(r["gap_closed"] == r["gap_closed"] for r in recs)  # finite under bf16 autocast
