"""The one training loop (noisecraft.train.loop) on a tiny fake method: schedule, accumulation, clipping,
resume, interrupt, precision, config validation.

Tier 1: torch + accelerate, CPU, no ComfyUI. The fake method is a float64 linear regression (so
equalities that hold in exact arithmetic hold to a bound derived from float64 rounding), its data a
fixed seeded table read through the same positioned batches as the teacher cache and the NPNet pairs.
"""

from __future__ import annotations

import json
import sys
import math
from dataclasses import asdict, dataclass

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from noisecraft.io import write_safetensors
from noisecraft.train.loop import LOOP_RESUME_KEYS, LoopConfig, lr_at, resolve_precision, run
from noisecraft.train.shards import epoch_generator, positioned_batches

pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e .[train] or .[dev])")

N, D = 16, 3


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


class FakeData:
    """16 seeded rows, y = x . w + 1 + noise (targets far from the initial fit: no gradient near zero)."""

    def __init__(self, dtype=torch.float64, n: int = N):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
        self.y = (self.x.double() @ torch.tensor([2.0, -3.0, 1.5], dtype=torch.float64) + 4.0).to(dtype)
        self.n = n

    def get(self, idx):
        return Batch(self.x[idx], self.y[idx])

    def batches(self, batch_size, *, seed, epoch, offset, rank, world_size):
        return positioned_batches(lambda ep: torch.randperm(self.n, generator=epoch_generator(seed, ep)), self.n,
                                  self.get, batch_size, epoch=epoch, offset=offset, rank=rank, world_size=world_size)


class FakeMethod:
    kind = "fake"
    state_prefix = "model"
    result_name = "fake.safetensors"
    resume_keys = LOOP_RESUME_KEYS
    plot_title = "fake regression"

    def __init__(self, config: LoopConfig, dtype=torch.float64, n: int = N):
        self.config, self.n = config, n
        self.module = nn.Linear(D, 1, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.module.weight.copy_(torch.randn(1, D, generator=g, dtype=torch.float64).to(dtype))
            self.module.bias.zero_()

    def loss(self, batch):
        loss = (self.module(batch.x).squeeze(-1) - batch.y).pow(2).mean()
        return loss, {"loss": float(loss.detach())}

    def settings(self):
        return {**asdict(self.config), "betas": list(self.config.betas)}

    def settings_from(self, saved):
        return dict(saved)

    def identity(self):
        return {"rows": self.n}

    def identity_error(self, saved):
        return f"was trained on {saved.get('rows')} rows, this data has {self.n}"

    def record(self):  # the gradient norm after clipping (the grads are still there after the step)
        return {"clipped_norm": float(torch.cat([p.grad.reshape(-1) for p in self.module.parameters()]).norm())}

    def finalize(self, out_dir, records, meta):
        return write_safetensors({k: v.detach().clone() for k, v in self.module.state_dict().items()},
                                 out_dir / self.result_name, {"steps": str(len(records))})


def _cfg(**kw) -> LoopConfig:
    base = dict(steps=6, lr=1e-2, batch_size=4, checkpoint_every=2, precision="fp32", max_grad_norm=None)
    base.update(kw)
    return LoopConfig(**base)


def _train(tmp, config, **kw):
    method = FakeMethod(config, **{k: kw.pop(k) for k in ("dtype", "n") if k in kw})
    data = FakeData(**({"dtype": method.module.weight.dtype}))
    return method, run(method, data, tmp, config, **kw)


def _log(path):
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in path.read_text().splitlines()]


# -- schedule ------------------------------------------------------------------------------------------


def test_lr_schedule_values():
    c = LoopConfig(steps=12, lr=1.0, warmup=2, lr_schedule="cosine")
    assert [lr_at(c, s) for s in (0, 1)] == [0.5, 1.0]  # linear warmup: (step + 1) / warmup
    assert lr_at(c, 2) == pytest.approx(1.0)  # cosine starts at lr after the warmup
    assert lr_at(c, 7) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the 10 cosine steps
    assert lr_at(c, 12) == pytest.approx(0.1) and lr_at(c, 40) == pytest.approx(0.1)  # floor: 10% of lr
    const = LoopConfig(steps=12, lr=0.3, warmup=3)
    assert [lr_at(const, s) for s in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])


def test_logged_lr_follows_the_schedule(tmp_path):
    config = _cfg(steps=5, warmup=2, lr_schedule="cosine", checkpoint_every=5)
    _, res = _train(tmp_path / "r", config)
    assert [r["lr"] for r in res.records] == [lr_at(config, s) for s in range(5)]
    assert [r["lr"] for r in _log(tmp_path / "r" / "loss.jsonl")] == [lr_at(config, s) for s in range(5)]


# -- accumulation and clipping -------------------------------------------------------------------------


def test_accumulation_equals_the_big_batch(tmp_path):
    # 2 micro-batches of 4 are the rows of one batch of 8 (the epoch order does not depend on the batch
    # size), and the mean of the two micro-means is the 8-mean. In float64 the two sums differ by a few
    # ulps (8 terms x 2^-53: ~1e-15 relative); AdamW turns a relative gradient error into the same
    # relative update error on components away from zero (the targets sit far from the initial fit), so
    # after 3 steps of lr 1e-2 the weights agree to ~1e-16; 1e-12 leaves a wide margin, and the
    # control (another data order) lies far outside it.
    big_m, big = _train(tmp_path / "big", _cfg(steps=3, batch_size=8))
    acc_m, acc = _train(tmp_path / "acc", _cfg(steps=3, batch_size=4, grad_accum=2))
    other_m, _ = _train(tmp_path / "other", _cfg(steps=3, batch_size=4, seed=5))
    for a, b in zip(big_m.module.parameters(), acc_m.module.parameters()):
        assert float((a - b).detach().abs().max()) <= 1e-12
    for ra, rb in zip(big.records, acc.records):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-12 * ra["loss"] and ra["samples"] == rb["samples"]
    assert float((big_m.module.weight - other_m.module.weight).detach().abs().max()) > 1e-4


@pytest.mark.parametrize("max_norm", [None, 0.0, 1e-3, 1e6])
def test_clipping_scales_the_gradient_to_the_limit(tmp_path, max_norm):
    _, res = _train(tmp_path / "c", _cfg(steps=3, max_grad_norm=max_norm))
    for r in res.records:
        total = r["grad_norm"]  # the norm before clipping
        # torch's clip: factor min(1, max / (total + 1e-6)); float64 rounding of a 4-component norm: 1e-15
        want = total if not max_norm else total * min(1.0, max_norm / (total + 1e-6))
        assert abs(r["clipped_norm"] - want) <= 1e-12 * max(1.0, total), (r, want)
    if max_norm == 1e-3:
        assert all(r["grad_norm"] > 1e-3 for r in res.records)  # the clip did act


# -- checkpoint, resume, interrupt ---------------------------------------------------------------------


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    config = _cfg()
    _, full = _train(tmp_path / "full", config)
    _, killed = _train(tmp_path / "killed", config, stop_after=5)  # checkpoint at 4, killed at 5
    assert killed.stopped_early and not (tmp_path / "killed" / "fake.safetensors").exists()
    _, resumed = _train(tmp_path / "killed", config, resume=True)
    assert resumed.step == 6 and not resumed.stopped_early and resumed.artifact.name == "fake.safetensors"
    assert (tmp_path / "full" / "fake.safetensors").read_bytes() == (tmp_path / "killed" / "fake.safetensors").read_bytes()
    assert _log(tmp_path / "full" / "loss.jsonl") == _log(tmp_path / "killed" / "loss.jsonl")
    assert [r["step"] for r in resumed.records] == list(range(1, 7))


def test_resume_refusals(tmp_path):
    config = _cfg()
    _train(tmp_path / "r", config, stop_after=3)
    with pytest.raises(FileExistsError, match="resume"):
        _train(tmp_path / "r", config)
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.01 there, 0.02 now\)"):
        _train(tmp_path / "r", _cfg(lr=2e-2), resume=True)
    with pytest.raises(ValueError, match="is at step 2, but this run asks for steps = 1"):
        _train(tmp_path / "r", _cfg(steps=1), resume=True)
    with pytest.raises(ValueError, match="was trained on 16 rows, this data has 8"):
        _train(tmp_path / "r", config, resume=True, n=8)
    with pytest.raises(ValueError, match="global batch"):
        run(FakeMethod(config), FakeData(), tmp_path / "x", _cfg(batch_size=3), accelerator=_FakeWorld(2))


class _FakeWorld:
    """Only what run() asks before any work: a 2-process world (the refusal needs no process group)."""

    def __init__(self, n):
        self.num_processes, self.process_index, self.is_main_process = n, 0, True


def test_interrupt_stops_cleanly_with_a_checkpoint_and_resumes(tmp_path):
    config = _cfg(checkpoint_every=5)
    _, full = _train(tmp_path / "full", config)
    calls = []

    def interrupt():  # asked before every step: say stop before step 4 (3 steps done)
        calls.append(1)
        return len(calls) == 4

    seen = []
    _, res = _train(tmp_path / "int", config, interrupt=interrupt, progress=lambda s, t, r: seen.append((s, t)))
    assert res.interrupted and res.stopped_early and res.step == 3 and res.artifact is None
    assert seen == [(1, 6), (2, 6), (3, 6)]
    assert not (tmp_path / "int" / "fake.safetensors").exists()
    with safe_open(str(tmp_path / "int" / "checkpoint.safetensors"), "pt") as f:
        state = json.loads(f.metadata()["state"])
    assert state["step"] == 3  # written at the interrupt, not only at checkpoint_every
    _, done = _train(tmp_path / "int", config, resume=True)
    assert done.step == 6
    assert load_file(tmp_path / "int" / "fake.safetensors").keys() == load_file(tmp_path / "full" / "fake.safetensors").keys()
    assert (tmp_path / "int" / "fake.safetensors").read_bytes() == (tmp_path / "full" / "fake.safetensors").read_bytes()


def test_progress_may_raise_and_the_last_checkpoint_stays_valid(tmp_path):
    config = _cfg()

    def boom(step, total, rec):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "p", config, progress=boom)
    _, res = _train(tmp_path / "p", config, resume=True)
    _, full = _train(tmp_path / "full", config)
    assert res.step == 6 and _log(tmp_path / "p" / "loss.jsonl") == _log(tmp_path / "full" / "loss.jsonl")


# -- precision -----------------------------------------------------------------------------------------


def test_precision_resolution_and_refusal():
    assert resolve_precision("auto", "cpu") is None and resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="cannot autocast on a meta device"):
        resolve_precision("fp16", "meta")
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_cpu_trains_float32_weights(tmp_path, precision):
    if precision == "fp16" and not torch.amp.is_autocast_available("cpu"):
        with pytest.raises(ValueError, match="cannot autocast"):
            _train(tmp_path / "h", _cfg(steps=2, precision=precision), dtype=torch.float32)
        return
    method, res = _train(tmp_path / "h", _cfg(steps=2, precision=precision), dtype=torch.float32)
    assert res.step == 2 and all(math.isfinite(r["loss"]) for r in res.records)
    assert all(v.dtype == torch.float32 for v in load_file(res.artifact).values())
    if precision == "fp16":  # the GradScaler state is part of the checkpoint
        with safe_open(str(tmp_path / "h" / "checkpoint.safetensors"), "pt") as f:
            meta = f.metadata()
        assert "scale" in json.loads(meta["scaler"])


# -- config validation -----------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    field: str
    value: object
    message: str


NAN = float("nan")
CASES = [
    Case("steps_zero", "steps", 0, "steps must be a positive integer, got 0"),
    Case("steps_fraction", "steps", 2.5, "steps must be a positive integer, got 2.5"),
    Case("steps_nan", "steps", NAN, "steps must be a positive integer, got nan"),
    Case("steps_text", "steps", "10", "steps must be a positive integer, got '10'"),
    Case("batch_zero", "batch_size", 0, "batch_size must be a positive integer"),
    Case("grad_accum_zero", "grad_accum", 0, "grad_accum must be a positive integer"),
    Case("checkpoint_every_zero", "checkpoint_every", 0, "checkpoint_every must be a positive integer"),
    Case("log_every_negative", "log_every", -1, "log_every must be a positive integer"),
    Case("lr_zero", "lr", 0.0, "lr must be a positive number, got 0.0"),
    Case("lr_nan", "lr", NAN, "lr must be a positive number, got nan"),
    Case("lr_inf", "lr", float("inf"), "lr must be a positive number, got inf"),
    Case("weight_decay_negative", "weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
    Case("weight_decay_nan", "weight_decay", NAN, "weight_decay must be a finite number >= 0"),
    Case("betas_one", "betas", (0.9,), "betas must be two numbers in [0, 1)"),
    Case("betas_out_of_range", "betas", (0.9, 1.0), "betas must be two numbers in [0, 1)"),
    Case("warmup_negative", "warmup", -1, "warmup must be a whole number of steps >= 0, got -1"),
    Case("warmup_fraction", "warmup", 0.5, "warmup must be a whole number of steps >= 0"),
    Case("schedule_unknown", "lr_schedule", "linear", "lr_schedule must be 'constant' or 'cosine', got 'linear'"),
    Case("max_grad_norm_negative", "max_grad_norm", -1.0, "max_grad_norm must be a finite number >= 0"),
    Case("max_grad_norm_nan", "max_grad_norm", NAN, "max_grad_norm must be a finite number >= 0"),
    Case("precision_unknown", "precision", "fp8", "precision must be auto, fp32, bf16 or fp16, got 'fp8'"),
    Case("seed_negative", "seed", -1, "seed must be a whole number >= 0"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_config_validation(case, tmp_path):
    config = LoopConfig(**{case.field: case.value})
    with pytest.raises(ValueError) as err:
        config.check()
    assert case.message in str(err.value)
    with pytest.raises(ValueError, match="must be"):  # run() checks before touching the folder
        run(FakeMethod(_cfg()), FakeData(), tmp_path / "never", config)
    assert not (tmp_path / "never").exists()


def test_default_config_is_valid():
    LoopConfig().check()


def test_one_process_without_accelerate_gives_the_same_run(tmp_path, monkeypatch):
    from noisecraft.train.loop import make_accelerator

    config = _cfg(steps=3)
    _, with_acc = _train(tmp_path / "a", config)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    stand_in = make_accelerator()
    assert type(stand_in).__module__ == "noisecraft.train.loop" and stand_in.num_processes == 1
    _, without = _train(tmp_path / "b", config, accelerator=stand_in)
    assert (tmp_path / "a" / "fake.safetensors").read_bytes() == (tmp_path / "b" / "fake.safetensors").read_bytes()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ImportError, match="several processes needs the 'accelerate' package"):
        make_accelerator()
