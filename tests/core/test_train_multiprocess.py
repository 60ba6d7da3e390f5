"""Data-parallel refiner training: two CPU processes (gloo) equal one process with the same global batch.

Tier 1: torch + accelerate (installed by the ``dev`` and ``train`` extras), CPU, no ComfyUI.
``python -m noisecraft train-refiner --toy`` runs once as a single process and once under
``accelerate launch --multi_gpu --num_processes 2`` (accelerate starts the processes through
torchrun; on a CPU-only machine they join a gloo group; ``--cpu --num_processes 2`` would start
only one process unless an MPI hostfile is given). The global batch is 8 in both runs (4 per
process), so the saved LoRA tensors and the loss log must agree up to float32 summation order.

Tolerances, from the arithmetic: a float32 sum of n terms carries a relative rounding error of at
most about n * u (u = 2^-24); the loss is a mean over n = 8 samples x 64 latent elements, so the
two runs' losses on the same weights agree to n * u = 3.1e-5 relative, plus, after the first step,
the first-order effect of the weights' difference (grad_norm * |w_1 - w_2|). AdamW normalises each
gradient component, so a relative gradient error becomes a relative update error of the same size,
except on components whose gradient is within rounding of zero, where g / (|g| + eps) can move by
up to 2 lr: the max-abs difference alone is not bounded by rounding (it was 2.9e-5 on one torch,
1.7e-6 on another). The weights are therefore compared by the relative L2 norm of the difference of
the LoRA up weights (which start at zero, so their norm is the update): <= 1e-3, 30x the n * u
bound. A run on other data (another data-order seed: what a sharding bug gives) must exceed 5e-2
(measured 0.42), so the comparison can fail.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e .[train] or .[dev])")

ARGS = ["--toy", "--steps", "3", "--samples", "16", "--batch", "8", "--student-steps", "2", "--teacher-steps", "3",
        "--rank", "2", "--shard-size", "8", "--checkpoint-every", "2", "--lr", "3e-3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # not inside another launch
        env.pop(k, None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd, tmp_path):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _log(path):
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in path.read_text().splitlines()]


def test_two_gloo_processes_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "noisecraft", "train-refiner", *ARGS, "--out", str(one)], tmp_path)
    proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(_free_port()),
                 "-m", "noisecraft", "train-refiner", *ARGS, "--out", str(two)], tmp_path)
    assert proc.stdout.count("refiner.safetensors") == 1  # only rank 0 reports

    # it really ran as two processes (rank 0 records the count), and the cache was built in shares
    with safe_open(str(two / "refiner.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["noisecraft.training"])["processes"] == 2
    with safe_open(str(one / "refiner.safetensors"), "pt") as f:
        assert "processes" not in json.loads(f.metadata()["noisecraft.training"])
    assert sorted(p.name for p in (two / "teacher_cache").glob("shard_*")) == ["shard_00000.safetensors",
                                                                               "shard_00001.safetensors"]

    a, b = load_file(one / "refiner.safetensors"), load_file(two / "refiner.safetensors")
    assert set(a) == set(b) and len(a) > 0
    rel, l2 = _relative_up_difference(a, b), _l2_difference(a, b)
    print(f"1 vs 2 processes: relative L2 of the up-weight difference {rel:.3g}, "
          f"max-abs {max(float((a[k] - b[k]).abs().max()) for k in a):.3g}")
    assert rel <= 1e-3, rel

    # the control: the same single process on another data order is far outside the tolerance
    other = tmp_path / "other"
    _run([sys.executable, "-m", "noisecraft", "train-refiner", *ARGS, "--seed", "1", "--out", str(other)], tmp_path)
    control = _relative_up_difference(a, load_file(other / "refiner.safetensors"))
    print(f"1 process vs another data order: {control:.3g}")
    assert control >= 5e-2, control

    la, lb = _log(one / "loss.jsonl"), _log(two / "loss.jsonl")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3]
    n_u = 8 * 64 * 2.0 ** -24  # global batch x latent elements x unit roundoff
    for ra, rb in zip(la, lb):
        assert ra["samples"] == rb["samples"] and ra["lr"] == rb["lr"]
        for k in ("loss", "residual_rms", "grad_norm"):
            tol = n_u * abs(ra[k]) + (ra["grad_norm"] * l2 if ra["step"] > 1 else 0.0)
            assert abs(ra[k] - rb[k]) <= tol, (k, ra, rb, tol)
    # the run moved the weights (the comparison is not trivially between two untouched inits)
    assert la[-1]["residual_rms"] > 0


def _up_keys(weights):
    return [k for k in weights if "lora_up" in k]


def _relative_up_difference(a, b) -> float:
    keys = _up_keys(a)
    diff = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in keys) ** 0.5
    norm = sum(float(a[k].double().pow(2).sum()) for k in keys) ** 0.5
    assert norm > 0  # the up weights start at zero: a zero norm would mean nothing was trained
    return diff / norm


def _l2_difference(a, b) -> float:
    return sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5
