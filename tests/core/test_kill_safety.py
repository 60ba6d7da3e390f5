"""Kill safety: atomic writes keep the old file on failure, and a run that starts or resumes after a kill
removes the temp files of our own naming (and nothing else).

Real subprocesses are SIGKILLed once their first shard / checkpoint exists; a stale temp file of our
naming (as a kill in the middle of a write leaves) and unrelated files are put next to them; the
resumed run must finish, leave no temp file of our naming, and not touch the unrelated files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from noisecraft import io as ncio

# unrelated files that look a little like ours: none may be touched
UNRELATED = {
    "notes.txt": b"mine\n",
    ".checkpoint.safetensors.123.tmp": b"someone else's temp naming\n",
    "model.noisecraft-tmp": b"no leading dot, no pid\n",
    ".x.abc.noisecraft-tmp": b"no pid\n",
}


def _ours(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ncio.is_temp_name(p.name))


def _plant(folder: Path, dead_pid: int, final: str) -> Path:
    """A stale temp file of our naming (a dead process's half-written ``final``) and the unrelated files."""
    for name, data in UNRELATED.items():
        (folder / name).write_bytes(data)
    stale = folder / f".{final}.{dead_pid}{ncio.TEMP_SUFFIX}"
    stale.write_bytes(b"half a file")
    return stale


def _unrelated_intact(folder: Path) -> bool:
    return all((folder / n).read_bytes() == d for n, d in UNRELATED.items())


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NOISECRAFT_DEBUG", None)
    return env


def _kill_when(args: list[str], cwd: Path, ready: Path, timeout: float = 120) -> int:
    """Start the CLI, SIGKILL it as soon as ``ready`` exists; return its (now dead) pid."""
    proc = subprocess.Popen([sys.executable, "-m", "noisecraft", *args], cwd=str(cwd), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"{args} ended (rc {proc.returncode}) before {ready} existed: "
                                     f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{ready} did not appear within {timeout} s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    return proc.pid


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "noisecraft", *args], cwd=str(cwd), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


# -- atomic writes ---------------------------------------------------------------------------------


class _Boom(Exception):
    pass


@pytest.mark.parametrize("how", ["atomic_write", "atomic_write_text_mode", "atomic_path"])
def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path, how: str):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old content")
    with pytest.raises(_Boom):
        if how == "atomic_write":
            with ncio.atomic_write(path, "wb") as f:
                f.write(b"new content, half")
                f.flush()
                raise _Boom()
        elif how == "atomic_write_text_mode":
            with ncio.atomic_write(path, "w") as f:
                f.write("new content, half")
                raise _Boom()
        else:  # a third-party writer that fails midway through its file
            with ncio.atomic_path(path) as tmp:
                tmp.write_bytes(b"new content, half")
                raise _Boom()
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]  # no temp file left


def test_atomic_writes_replace_and_name_their_temp_files(tmp_path: Path):
    path = tmp_path / "index.json"
    tmp = ncio.temp_path(path)
    assert tmp.parent == tmp_path and tmp.name == f".index.json.{os.getpid()}.noisecraft-tmp"
    assert ncio.is_temp_name(tmp.name) and not ncio.is_temp_name("index.json")
    ncio.atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert ncio.read_json(path) == {"a": [1, 2], "b": 1}
    ncio.atomic_write_text(path, "{}\n")
    assert ncio.read_json(path) == {} and sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
    a = ncio.write_safetensors({"x": torch.arange(4.0), "y": torch.zeros(2, dtype=torch.int64)}, tmp_path / "a.st",
                               {"k": "v", "a": "b"})
    b = ncio.write_safetensors({"y": torch.zeros(2, dtype=torch.int64), "x": torch.arange(4.0)}, tmp_path / "b.st",
                               {"a": "b", "k": "v"})
    assert a.read_bytes() == b.read_bytes()  # reproducible bytes whatever the insertion order
    tensors, meta = ncio.read_safetensors(a)
    assert torch.equal(tensors["x"], torch.arange(4.0)) and meta == {"a": "b", "k": "v"}


def test_clean_stale_temps_removes_only_dead_writers_temps(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = _plant(tmp_path, dead.pid, "shard_00003.safetensors")
    live = tmp_path / f".index.json.{os.getpid()}{ncio.TEMP_SUFFIX}"  # this process: a write in progress
    live.write_bytes(b"being written")
    (tmp_path / "sub").mkdir()
    nested = tmp_path / "sub" / f".a.{dead.pid}{ncio.TEMP_SUFFIX}"
    nested.write_bytes(b"x")
    removed = ncio.clean_stale_temps(tmp_path)
    assert removed == [stale] and not stale.exists()
    assert live.exists() and nested.exists() and _unrelated_intact(tmp_path)
    assert ncio.clean_stale_temps(tmp_path / "missing") == []


def test_next_free_path(tmp_path: Path):
    assert ncio.next_free_path(tmp_path, "npnet") == tmp_path / "npnet.safetensors"
    (tmp_path / "npnet.safetensors").write_bytes(b"")
    (tmp_path / "npnet_00001.safetensors").write_bytes(b"")
    assert ncio.next_free_path(tmp_path, "npnet") == tmp_path / "npnet_00002.safetensors"
    assert ncio.next_free_path(tmp_path, "npnet", overwrite=True) == tmp_path / "npnet.safetensors"


# -- real kills -------------------------------------------------------------------------------------


def test_collect_pairs_killed_then_rerun_finishes_without_litter(tmp_path: Path):
    args = ["collect-pairs", "--toy", "--out", "pairs", "--pairs", "256", "--steps", "10", "--shard-size", "4",
            "--batch", "4"]
    pid = _kill_when(args, tmp_path, tmp_path / "pairs" / "shard_00000.safetensors")
    folder = tmp_path / "pairs"
    stale = _plant(folder, pid, "shard_00005.safetensors")
    proc = _cli(args, tmp_path)
    assert not stale.exists() and _ours(folder) == [] and _unrelated_intact(folder)
    assert "removed a stale temp file" in proc.stderr and stale.name in proc.stderr
    from noisecraft.train import PairStore

    store = PairStore(folder)
    assert store.complete and store.total == 256


def test_train_refiner_killed_after_a_checkpoint_then_resumed(tmp_path: Path):
    args = ["train-refiner", "--toy", "--out", "run", "--steps", "30", "--samples", "8", "--batch", "4",
            "--student-steps", "1", "--teacher-steps", "2", "--rank", "1", "--shard-size", "4", "--checkpoint-every", "1"]
    run = tmp_path / "run"
    pid = _kill_when(args, tmp_path, run / "checkpoint.safetensors")
    stale_ckpt = _plant(run, pid, "checkpoint.safetensors")
    stale_shard = run / "teacher_cache" / f".shard_00001.safetensors.{pid}{ncio.TEMP_SUFFIX}"
    stale_shard.write_bytes(b"half")
    (run / "teacher_cache" / "keep.txt").write_bytes(b"keep")
    _cli([*args, "--resume"], tmp_path)
    assert not stale_ckpt.exists() and not stale_shard.exists()
    assert _ours(run) == [] and _ours(run / "teacher_cache") == [] and _unrelated_intact(run)
    assert (run / "teacher_cache" / "keep.txt").read_bytes() == b"keep"
    from noisecraft.lora import read_lora_file

    _, meta = read_lora_file(run / "refiner.safetensors")
    assert json.loads(meta["noisecraft.training"])["steps"] == 30


def test_train_npnet_and_convert_remove_stale_temps(tmp_path: Path):
    from noisecraft.hosts.toy import NPNET_WEIGHTS

    _cli(["collect-pairs", "--toy", "--out", "pairs", "--pairs", "8", "--steps", "2", "--shard-size", "4",
          "--batch", "8"], tmp_path)
    args = ["train-npnet", "--pairs", "pairs", "--out", "run", "--steps", "2", "--batch", "4", "--checkpoint-every", "1"]
    _cli(args, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = _plant(tmp_path / "run", dead.pid, "npnet.safetensors")
    _cli(["train-npnet", "--pairs", "pairs", "--out", "run", "--steps", "3", "--batch", "4", "--checkpoint-every", "1",
          "--resume"], tmp_path)
    assert not stale.exists() and _ours(tmp_path / "run") == [] and _unrelated_intact(tmp_path / "run")

    out = tmp_path / "converted"
    out.mkdir()
    stale = _plant(out, dead.pid, "toy.safetensors")
    _cli(["convert", str(NPNET_WEIGHTS), str(out / "toy.safetensors")], tmp_path)
    assert not stale.exists() and _ours(out) == [] and _unrelated_intact(out)
    assert (out / "toy.safetensors").is_file()


def test_ctrl_c_during_training_is_rc_130_one_line_and_no_litter(tmp_path: Path):
    args = ["train-refiner", "--toy", "--out", "run", "--steps", "400", "--samples", "8", "--batch", "4",
            "--student-steps", "1", "--teacher-steps", "2", "--rank", "1", "--shard-size", "4", "--checkpoint-every", "1"]
    # a shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored:
    # give the child the default disposition, as a terminal's Ctrl-C would find it
    proc = subprocess.Popen([sys.executable, "-m", "noisecraft", *args], cwd=str(tmp_path), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.monotonic()
    while not (tmp_path / "run" / "checkpoint.safetensors").exists():
        assert proc.poll() is None and time.monotonic() - t0 < 120, "the run ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err and "--resume" in err
    assert _ours(tmp_path / "run") == [] and _ours(tmp_path / "run" / "teacher_cache") == []
