"""Integrity of the data every training builds on: one writer per folder, checksums on what we read back.

- One writer: two real CLI runs on one ``--out`` (and on one teacher cache, one pair folder): the second is
  refused at once naming the first (pid, host, start, command) while the first goes on; a SIGKILLed holder
  blocks nothing (the kernel drops its lock); runs that only read a finished cache share it.
- Checksums: one changed byte in each kind of file we write and read back (teacher-cache shard data, a store
  index, NPNet pair shards and conds, training checkpoints, saved teacher scores) is refused naming the file;
  a rerun of the build remakes just the damaged shard, byte for byte; files written without a checksum (an
  older NoiseCraft) still load, with a notice.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from noisecraft import io as ncio
from noisecraft.hosts.toy import toy_host
from noisecraft.locks import HOLDER_NAME, FolderBusy, folder_lock, lock_holder
from noisecraft.sigmas import get_sigmas
from noisecraft.train import PairStore, TeacherCache, build_teacher_cache, collect_pairs


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NOISECRAFT_DEBUG", None)
    return env


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "noisecraft", *args], cwd=str(cwd), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "noisecraft", *args], cwd=str(cwd), env=_env(), capture_output=True,
                          text=True, timeout=600)


def _wait_for_holder(folder: Path, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """Wait until ``proc`` holds ``folder``'s lock (its record names its pid)."""
    t0 = time.monotonic()
    while True:
        holder = lock_holder(folder)
        if holder and holder.get("pid") == proc.pid:
            return holder
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended (rc {proc.returncode}) before it held {folder}: "
                                 f"{proc.stderr.read()[-2000:]}")
        assert time.monotonic() - t0 < timeout, f"{folder} was not locked within {timeout} s"
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()


def _refused_naming(res: subprocess.CompletedProcess, holder: subprocess.Popen, *words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for w in (f"pid {holder.pid}", "in use by", *words):
        assert w in lines[0], (w, lines[0])


TRAIN = ["train-refiner", "--toy", "--samples", "8", "--batch", "4", "--checkpoint-every", "1000"]


# -- one writer per folder --------------------------------------------------------------------------------


def test_two_train_runs_on_one_out_folder_one_runs_and_the_other_is_refused_naming_it(tmp_path):
    first = _start([*TRAIN, "--out", "run", "--steps", "5000"], tmp_path)
    try:
        holder = _wait_for_holder(tmp_path / "run", first)
        assert holder["command"].startswith("python -m noisecraft train-refiner") and holder["host"]
        second = _cli([*TRAIN, "--out", "run", "--steps", "5000"], tmp_path)
        _refused_naming(second, first, "--out run", holder["started"], "train-refiner --toy",
                        "wait for that run to finish")
        assert first.poll() is None  # the first goes on: exactly one runs
    finally:
        _kill(first)
    # the kernel dropped the killed run's lock: the next run takes the folder (no checkpoint yet: a fresh run)
    again = _cli([*TRAIN, "--out", "run", "--steps", "3"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "run" / "refiner.safetensors").is_file() and not (tmp_path / "run" / HOLDER_NAME).exists()


def test_a_teacher_cache_being_built_is_refused_to_a_second_builder_and_shared_once_finished(tmp_path):
    big = ["--samples", "4096", "--shard-size", "64", "--steps", "3"]
    first = _start([*TRAIN[:2], "--batch", "4", "--out", "r1", "--cache", "cache", *big], tmp_path)
    try:
        _wait_for_holder(tmp_path / "cache", first)
        second = _cli([*TRAIN[:2], "--batch", "4", "--out", "r2", "--cache", "cache", *big], tmp_path)
        _refused_naming(second, first, "teacher cache", str(Path("cache")), "wait for that build to finish")
        assert first.poll() is None
    finally:
        _kill(first)
    # readers: a finished cache is trained from by two runs at the same time (neither takes its lock)
    assert _cli([*TRAIN, "--out", "r0", "--cache", "small", "--steps", "1"], tmp_path).returncode == 0
    runs = [_start([*TRAIN, "--out", f"r{i}", "--cache", "small", "--steps", "3"], tmp_path) for i in (3, 4)]
    for p in runs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
        p.stderr.close()


def test_two_collections_into_one_pair_folder_and_two_npnet_trainings_on_one_out(tmp_path):
    collect = ["collect-pairs", "--toy", "--out", "pairs", "--steps", "10", "--shard-size", "4", "--batch", "4"]
    first = _start([*collect, "--pairs", "4096"], tmp_path)
    try:
        _wait_for_holder(tmp_path / "pairs", first)
        _refused_naming(_cli([*collect, "--pairs", "4096"], tmp_path), first, "--out pairs", "collect-pairs")
    finally:
        _kill(first)
    small = ["collect-pairs", "--toy", "--out", "p8", "--steps", "2", "--shard-size", "4", "--batch", "4",
             "--pairs", "8"]
    assert _cli(small, tmp_path).returncode == 0
    npnet = ["train-npnet", "--pairs", "p8", "--out", "nrun", "--batch", "4", "--checkpoint-every", "100000"]
    first = _start([*npnet, "--steps", "100000"], tmp_path)
    try:
        _wait_for_holder(tmp_path / "nrun", first)
        _refused_naming(_cli([*npnet, "--steps", "100000"], tmp_path), first, "--out nrun", "train-npnet")
    finally:
        _kill(first)
    assert _cli([*npnet, "--steps", "2"], tmp_path).returncode == 0


def test_the_lock_is_reentrant_in_its_thread_refused_to_another_and_released_on_error(tmp_path):
    with folder_lock(tmp_path / "f", what="run folder") as f:
        with folder_lock(f):  # the CLI locks --out, the loop locks it again
            assert lock_holder(f)["pid"] == os.getpid()
        errors = []

        def other():
            try:
                with folder_lock(f, what="run folder", fix="choose another"):
                    pass
            except FolderBusy as exc:
                errors.append(str(exc))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and "run folder" in errors[0] and f"pid {os.getpid()}" in errors[0]
        assert errors[0].endswith(": choose another")
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path / "f"):
            raise RuntimeError("boom")
    assert not (tmp_path / "f" / HOLDER_NAME).exists()
    with folder_lock(tmp_path / "f"):  # free again
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="a file of that name is in the way"):
        with folder_lock(tmp_path / "file"):
            pass


# -- checksums -------------------------------------------------------------------------------------------


def _data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _high_byte(path: Path, name: str, i: int) -> int:
    """The file offset of the high (sign and exponent) byte of float32 element ``i`` of tensor ``name``."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        start = json.loads(f.read(n))[name]["data_offsets"][0]
    return 8 + n + start + 4 * i + 3


def _flip(path: Path, offset: int, value: int = 0x7E) -> bytes:
    """Set one byte to ``value`` (or value - 1 if it was that): 0x7e as the high byte of a float32 gives a large
    but finite number (exponent 0xfc or 0xfd). Returns the file's bytes before."""
    raw = bytearray(path.read_bytes())
    before = bytes(raw)
    raw[offset] = value if raw[offset] != value else value - 1
    path.write_bytes(bytes(raw))
    return before


def _build(root: Path, total: int = 12, shard_size: int = 4, **kw) -> TeacherCache:
    host = toy_host()
    return build_teacher_cache(root, lambda c: host.denoiser(c, cfg=3.0), shape=(1, 8, 8), conds=list(range(10)),
                               total=total, sigmas=get_sigmas(host.table, "normal", 4), kind=host.table.kind.value,
                               shard_size=shard_size, batch_size=4, meta={"model": "toy"}, **kw)


def test_a_changed_byte_in_a_teacher_shard_is_refused_and_a_rebuild_remakes_just_that_shard(tmp_path, caplog):
    cache = _build(tmp_path / "c")
    shards = [cache.shard_path(k) for k in range(cache.num_shards)]
    mtimes = [p.stat().st_mtime_ns for p in shards]
    original = _flip(shards[1], _high_byte(shards[1], "x0", 100))
    assert torch.isfinite(ncio.load_safetensors(shards[1])["x0"]).all()  # large but finite: only the checksum sees it
    with pytest.raises(ncio.ChecksumError, match=r"shard_00001\.safetensors is damaged.*remakes just that shard"):
        TeacherCache(tmp_path / "c").verify()
    # a build with work to do (shard 2 missing) checks the shards present and remakes the damaged one, byte
    # for byte (a finished cache is only read: its shards are checked as they are first read)
    third = shards[2].read_bytes()
    shards[2].unlink()
    with caplog.at_level(logging.WARNING):
        _build(tmp_path / "c")
    assert "shard_00001.safetensors is damaged" in caplog.text and "remaking it" in caplog.text
    assert shards[1].read_bytes() == original and shards[2].read_bytes() == third
    assert shards[0].stat().st_mtime_ns == mtimes[0]  # the sound one was not rewritten
    # a reader finds it at its first read, sets it aside and says so; the next build remakes it
    _flip(shards[1], _high_byte(shards[1], "x0", 7))
    fresh = TeacherCache(tmp_path / "c")
    assert fresh.get([0]).x0.shape == (1, 1, 8, 8)  # the sound shards read
    with pytest.raises(ncio.ChecksumError, match=r"shard_00001\.safetensors is damaged.*set aside as "
                                                 r"shard_00001\.safetensors\.damaged"):
        fresh.get([5])
    assert not shards[1].exists() and not fresh.complete
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _build(tmp_path / "c").verify()
    assert "set aside as damaged by a reader: remaking it" in caplog.text
    assert shards[1].read_bytes() == original and not fresh.damaged_path(1).exists()


def test_train_refiner_on_a_cache_with_a_changed_byte_stops_naming_the_shard_and_a_rerun_remakes_it(tmp_path):
    """The issue's case: `train-refiner --cache` trained on a flipped shard with rc 0."""
    args = [*TRAIN, "--cache", "cache", "--samples", "16", "--shard-size", "4", "--steps", "2"]
    assert _cli([*args, "--out", "r1"], tmp_path).returncode == 0
    shard = tmp_path / "cache" / "shard_00002.safetensors"
    original = _flip(shard, _high_byte(shard, "x0", 3))
    res = _cli([*args, "--out", "r2"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "shard_00002.safetensors is damaged" in last and "remakes just that shard" in last, last
    res = _cli([*args, "--out", "r3"], tmp_path)
    assert res.returncode == 0 and "set aside as damaged by a reader: remaking it" in res.stderr, res.stderr[-2000:]
    assert shard.read_bytes() == original


def test_every_kind_of_file_we_read_back_detects_a_changed_byte(tmp_path):
    # index: a valid-JSON change of one digit, and a byte that breaks the JSON
    cache = _build(tmp_path / "c", total=8)
    index = tmp_path / "c" / "index.json"
    text = index.read_text()
    index.write_text(text.replace('"total": 8', '"total": 9'))
    with pytest.raises(ncio.ChecksumError, match=r"index\.json is damaged.*delete the folder"):
        TeacherCache(tmp_path / "c")
    index.write_text(text.replace('"total"', '"tota\x01"'))
    with pytest.raises(ValueError, match=r"index\.json"):
        TeacherCache(tmp_path / "c")
    index.write_text(text)
    assert len(TeacherCache(tmp_path / "c")) == len(cache)

    # NPNet pairs: a shard and the conds
    host = toy_host()
    store = collect_pairs(tmp_path / "p", host, total=8, steps=2, shard_size=4, batch_size=4)
    shard = store.shard_path(0)
    original = _flip(shard, _data_offset(shard) + 1 + 3)
    with pytest.raises(ncio.ChecksumError, match=r"shard_00000\.safetensors is damaged.*collect-pairs again"):
        PairStore(tmp_path / "p").get([0])
    collect_pairs(tmp_path / "p", host, total=8, steps=2, shard_size=4, batch_size=4)
    assert shard.read_bytes() == original
    conds = tmp_path / "p" / "conds.safetensors"
    _flip(conds, conds.stat().st_size - 1)
    with pytest.raises(ncio.ChecksumError, match=r"conds\.safetensors is damaged"):
        _ = PairStore(tmp_path / "p").embeds

    # a training checkpoint: the CLI refuses the resume in one line naming it
    assert _cli([*TRAIN, "--out", "run", "--steps", "2", "--checkpoint-every", "1"], tmp_path).returncode == 0
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    _flip(ckpt, ckpt.stat().st_size - 2)
    res = _cli([*TRAIN, "--out", "run", "--steps", "3", "--checkpoint-every", "1", "--resume"], tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr  # before any work
    assert "checkpoint.safetensors is damaged" in res.stderr and "delete it" in res.stderr


def test_damaged_saved_scores_are_scored_again(tmp_path, caplog):
    from noisecraft.hosts.toy import toy_confidence_scorer
    from noisecraft.train.teacher_filter import filter_teacher_cache, register_scorer, scores_path

    cache = _build(tmp_path / "c", total=8)
    register_scorer("toy-classifier", toy_confidence_scorer, "toy")
    a = filter_teacher_cache(cache, "toy-classifier", 4)
    path = scores_path(cache, "toy-classifier|none (latents)")
    _flip(path, path.stat().st_size - 1)
    with caplog.at_level(logging.WARNING):
        b = filter_teacher_cache(cache, "toy-classifier", 4)
    assert "is damaged" in caplog.text and "scoring again" in caplog.text
    assert torch.equal(a.kept_from, b.kept_from) and ncio.verify_safetensors(path) is True


def test_files_without_checksums_still_load_with_one_notice(tmp_path, caplog):
    """A cache of an older NoiseCraft (no checksums in its index or shards) keeps working."""
    cache = _build(tmp_path / "c", total=8)
    for k in range(cache.num_shards):  # rewrite each shard and the index as an older NoiseCraft did
        p = cache.shard_path(k)
        tensors, meta = ncio.read_safetensors(p)
        meta.pop(ncio.DIGEST_KEY)
        ncio.write_safetensors(tensors, p, meta)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    index.pop("sha256")
    ncio.atomic_write_json(tmp_path / "c" / "index.json", index)
    with caplog.at_level(logging.INFO, logger="noisecraft.train.shards"):
        old = TeacherCache(tmp_path / "c")
        old.verify()
        assert old.get([0, 7]).x0.shape == (2, 1, 8, 8)
    notices = [r.getMessage() for r in caplog.records if "without checksums" in r.getMessage()]
    assert len(notices) == 2 and "older NoiseCraft" in notices[0]
    # the next write of the index adds its checksum
    old.reindex()
    assert "sha256" in json.loads((tmp_path / "c" / "index.json").read_text())
    assert ncio.verify_json(tmp_path / "c" / "index.json", json.loads((tmp_path / "c" / "index.json").read_text()))


def test_the_checksum_covers_the_header_and_every_data_byte(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2)}
    p = ncio.write_safetensors(t, tmp_path / "x.safetensors", {"k": "v"}, digest=True)
    assert ncio.verify_safetensors(p) is True
    raw = p.read_bytes()
    n = 8 + int.from_bytes(raw[:8], "little")
    # every single data byte, and a metadata value in the header, changed one at a time
    for i in list(range(n, len(raw))) + [raw.index(b'"v"') + 1]:
        p.write_bytes(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:])
        with pytest.raises(ncio.ChecksumError, match=r"x\.safetensors is damaged"):
            ncio.verify_safetensors(p)
    p.write_bytes(raw + b"\x00")  # an appended byte
    with pytest.raises((ncio.ChecksumError, ValueError)):
        ncio.verify_safetensors(p)
    plain = ncio.write_safetensors(t, tmp_path / "y.safetensors", {"k": "v"})
    assert ncio.verify_safetensors(plain) is None  # no checksum recorded: nothing to check
