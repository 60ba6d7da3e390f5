"""The NoiseRefine training nodes on the tiny SD1.5-shaped model: Build Teacher Cache, Train Refiner, Save Refiner.

Everything runs under ``torch.inference_mode()`` like the server, on a model built in inference mode (its
weights are inference tensors, as after ComfyUI's checkpoint loading).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import comfy.model_management as mm
import comfy.utils
import folder_paths
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
    """Train Refiner as an old workflow calls it (the required inputs in order), new inputs by name."""
    args = dict(steps=steps, student_steps=3, batch_size=len(cache), learning_rate=3e-3, rank=4, alpha=0.0, seed=1)
    new = {k: kw.pop(k) for k in ("resume_from", "precision", "lr_schedule", "warmup", "max_grad_norm", "grad_accum")
           if k in kw}
    args.update(kw)
    with torch.inference_mode():
        out = tr.TrainRefiner.execute(model, cache, *args.values(), **new)
    return out


def test_the_cache_holds_guided_samples_per_prompt(cache):
    assert len(cache) == 4 and len(cache.prompts) == 2
    assert cache.prompt_ids.tolist() == [0, 0, 1, 1]
    assert cache.x0.shape == cache.noise.shape == (4, 4, 8, 8)
    assert torch.isfinite(cache.x0).all() and not torch.equal(cache.x0[0], cache.x0[2])


def test_the_node_cache_is_the_cores_teacher_cache_with_the_cli_batches(tr, nc, cache, tmp_path):
    """Build Teacher Cache's data is the core's TeacherCache (in memory): its batches are the ones the same
    samples give from a cache folder the CLI writes, position for position."""
    core = importlib.import_module(nc.noise.__name__.split(".")[0] + ".noisecraft.train.teacher_cache")
    assert isinstance(cache.data, core.TeacherCache) and cache.data.is_in_memory
    full = cache.data.get(range(len(cache)))
    folder = core.TeacherCache.create(tmp_path / "cache", shape=cache.data.shape, conds=cache.data.conds, base_seed=0,
                                      total=len(cache), meta=cache.data.meta, shard_size=3)
    for k in range(folder.num_shards):
        idx = list(folder.shard_range(k))
        with torch.inference_mode(False):
            folder.write_shard(k, full.x0[idx], full.e[idx])
    # the folder's sample conditions are i % P; the node's are prompt-major, so compare on the node's order
    mem = cache.data.batches(2, seed=3, epoch=0, offset=0)
    disk = core.TeacherCache(tmp_path / "cache").batches(2, seed=3, epoch=0, offset=0)
    for _ in range(5):
        (a, pa), (b, pb) = next(mem), next(disk)
        assert pa == pb and torch.equal(a.index, b.index) and torch.equal(a.e, b.e) and torch.equal(a.x0, b.x0)
        assert torch.equal(a.cond, full.cond[a.index])


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
    params = list(model.model.parameters())  # no gradient reached the base weights; their flags are as they were
    assert all(p.grad is None for p in params) and all(p.requires_grad for p in params)


@contextlib.contextmanager
def interrupt_at(step):
    """A progress hook like the server's (it raises when Cancel was pressed) that presses Cancel at ``step``."""
    seen = []

    def hook(value, total, preview, node_id=None):
        mm.throw_exception_if_processing_interrupted()
        seen.append(value)
        if value == step:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield seen
    finally:
        comfy.utils.set_progress_bar_global_hook(None)


def test_interrupt_mid_training_raises_and_leaves_the_model_unchanged(tr, model, cache, runs):
    before = snapshot(model)
    with interrupt_at(2) as seen, pytest.raises(mm.InterruptProcessingException):
        train(tr, model, cache, steps=5)
    assert seen == [1, 2] and not mm.processing_interrupted()
    assert same(before, snapshot(model)) and no_weight_functions_left(model) and not model.patches
    assert not list(runs.iterdir())  # without resume_from nothing is kept


@pytest.fixture()
def runs(tmp_path):
    """ComfyUI's output folder pointed at a temporary one (the run folders go to noisecraft_runs/)."""
    saved = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        yield tmp_path
    finally:
        folder_paths.set_output_directory(saved)


def same_refiner(a, b):
    return a.pairs.keys() == b.pairs.keys() and all(
        torch.equal(a.pairs[k][0], b.pairs[k][0]) and torch.equal(a.pairs[k][1], b.pairs[k][1]) for k in a.pairs)


def test_a_named_run_resumes_after_an_interrupt_and_equals_the_uninterrupted_run(tr, model, cache, runs,
                                                                                 monkeypatch):
    """CPU float32 is deterministic and a checkpoint holds the LoRA, AdamW's state and the data position,
    so the resumed run is the uninterrupted one bit for bit."""
    monkeypatch.setattr(tr, "CHECKPOINT_EVERY", 100)  # only the interrupt writes a checkpoint
    full, full_losses = train(tr, model, cache, steps=5, resume_from="full").args
    with interrupt_at(2), pytest.raises(mm.InterruptProcessingException):
        train(tr, model, cache, steps=5, resume_from="cut")
    folder = runs / "noisecraft_runs" / "cut"
    assert (folder / "checkpoint.safetensors").is_file() and not (folder / "refiner.safetensors").exists()
    resumed, losses = train(tr, model, cache, steps=5, resume_from="cut").args
    assert same_refiner(resumed, full) and losses == full_losses
    assert (folder / "refiner.safetensors").is_file() and (folder / "loss.jsonl").is_file()
    again, _ = train(tr, model, cache, steps=5, resume_from="cut").args  # a finished run: nothing to do
    assert same_refiner(again, full)
    with pytest.raises(ValueError, match=r"Train Refiner: .*other settings.*learning_rate|Train Refiner: .*lr"):
        train(tr, model, cache, steps=6, resume_from="cut", learning_rate=1e-3)


KILL_SCRIPT = r"""
import os, sys
sys.path.insert(0, os.environ["COMFYUI_PATH"])
sys.path.insert(0, os.environ["NC_TESTS"])
import torch
torch.set_num_threads(1)
from comfy.cli_args import args
args.cpu = True
args.use_pytorch_cross_attention = True
import comfy.model_management, comfy.utils, folder_paths
comfy.utils.PROGRESS_BAR_ENABLED = False
import conftest
conftest.load_pack()
import importlib
tr = importlib.import_module(conftest.PACK_NAME + ".nodes.nodes_train")
tiny = conftest.load_tiny_models()
folder_paths.set_output_directory(os.environ["NC_OUT"])
tr.CHECKPOINT_EVERY = 2
with torch.inference_mode():
    model = tiny.build("sd15", seed=0)
    pos = tiny.conditioning("sd15", 10, 1) + tiny.conditioning("sd15", 11, 1)
    neg = tiny.conditioning("sd15", 2, 1, empty=True)
    cache = tr.BuildTeacherCache.execute(model, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, 2, 5, 7.0, 4,
                                         "normal").args[0]
    tr.TrainRefiner.execute(model, cache, int(os.environ["NC_STEPS"]), 3, 4, 3e-3, 4, 0.0, 1,
                            os.environ.get("NC_RUN", "killed"))
"""


def test_a_named_run_resumes_after_a_process_kill(tr, model, cache, runs, tmp_path, monkeypatch):
    """A subprocess runs the node (same tiny model, prompts and teacher as this module's ``cache``) and is
    SIGKILLed right after its first checkpoint; the run resumed here equals an uninterrupted run."""
    steps = 12
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "NC_TESTS": str(Path(__file__).parent), "NC_OUT": str(runs), "NC_STEPS": str(steps),
           "OMP_NUM_THREADS": "1"}
    folder = runs / "noisecraft_runs" / "killed"
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (folder / "checkpoint.safetensors").is_file():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (folder / "refiner.safetensors").exists()  # it was killed mid-run
    monkeypatch.setattr(tr, "CHECKPOINT_EVERY", 2)
    args = dict(student_steps=3, batch_size=4, learning_rate=3e-3, rank=4, alpha=0.0, seed=1)
    resumed, losses = train(tr, model, cache, steps=steps, resume_from="killed", **args).args
    full, full_losses = train(tr, model, cache, steps=steps, resume_from="whole", **args).args
    assert same_refiner(resumed, full) and losses == full_losses and len(losses) == steps


def test_two_trainings_on_one_run_name_one_runs_and_the_other_is_refused(tr, model, cache, runs, tmp_path):
    """Two ComfyUI processes sharing an output folder (two servers, or a server and a queued retry elsewhere)
    resume the same run name: the second is refused at once naming the first; once the first is killed
    (SIGKILL: the kernel drops its lock) the name trains again."""
    script = tmp_path / "hold.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "NC_TESTS": str(Path(__file__).parent), "NC_OUT": str(runs), "NC_STEPS": "100000",
           "NC_RUN": "shared", "OMP_NUM_THREADS": "1"}
    folder = runs / "noisecraft_runs" / "shared"
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while json.loads((folder / ".noisecraft.lock.json").read_text()).get("pid") != proc.pid \
                if (folder / ".noisecraft.lock.json").is_file() else True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first training did not lock its run folder within 300 s"
            time.sleep(0.02)
        with pytest.raises(ValueError) as err:
            train(tr, model, cache, steps=3, resume_from="shared")
        msg = str(err.value)
        assert msg.startswith("Train Refiner: ") and f"pid {proc.pid}" in msg and str(folder) in msg, msg
        assert "in use by" in msg and "wait for that run to finish" in msg and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the killed holder blocks nothing: the name resumes from its last checkpoint (every 2 steps there)
    ckpt = folder / "checkpoint.safetensors"
    done = json.loads(safe_open(str(ckpt), "pt").metadata()["state"])["step"] if ckpt.is_file() else 0
    refiner, losses = train(tr, model, cache, steps=done + 2, resume_from="shared").args
    assert len(losses) == done + 2 and all(math.isfinite(v) for v in losses)


def test_bf16_on_the_cpu_trains_with_finite_losses(tr, model, cache):
    refiner, losses = train(tr, model, cache, steps=3, precision="bf16").args
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert any(float(up.abs().max()) > 0 for _, up, _ in refiner.pairs.values())
    assert all(torch.isfinite(up).all() and up.dtype == torch.float32 for _, up, _ in refiner.pairs.values())
    assert '"precision": "bf16"' in refiner.metadata["noisecraft.training"]


def test_schedule_warmup_clipping_and_accumulation_reach_the_engine(tr, model, cache, runs):
    _, losses = train(tr, model, cache, steps=4, batch_size=2, lr_schedule="cosine", warmup=2, max_grad_norm=0.5,
                      grad_accum=2, resume_from="knobs").args
    log = runs / "noisecraft_runs" / "knobs" / "loss.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    lr = 3e-3
    assert [r["lr"] for r in records[:2]] == [lr / 2, lr] and records[3]["lr"] < records[2]["lr"]
    assert all(r["samples"] == 4 * r["step"] for r in records) and len(losses) == 4


@dataclass(frozen=True)
class Bad:
    id: str
    kw: dict
    match: str


BAD_NEW_INPUTS = [
    Bad("precision", {"precision": "fp8"},
        r"Train Refiner: precision: expected one of \[.auto., .fp32., .bf16., .fp16.\], got .fp8."),
    Bad("lr_schedule", {"lr_schedule": "linear"}, r"Train Refiner: lr_schedule: expected one of \[.constant., .cosine"),
    Bad("warmup", {"warmup": -1}, r"Train Refiner: warmup must be an integer >= 0.*0 turns warmup off"),
    Bad("max_grad_norm", {"max_grad_norm": float("nan")}, r"Train Refiner: max_grad_norm must be a finite number"),
    Bad("grad_accum", {"grad_accum": 0}, r"Train Refiner: grad_accum must be an integer >= 1"),
    Bad("resume_from", {"resume_from": "../elsewhere"}, r"Train Refiner: resume_from .* contains a folder part"),
]


@pytest.mark.parametrize("case", BAD_NEW_INPUTS, ids=[c.id for c in BAD_NEW_INPUTS])
def test_bad_new_inputs_are_refused_with_the_input_named(tr, model, cache, case):
    with pytest.raises(ValueError, match=case.match):
        train(tr, model, cache, steps=1, **case.kw)


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
