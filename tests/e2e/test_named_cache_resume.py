"""Named (on-disk) teacher caches and Train Refiner runs survive a killed ComfyUI: SIGKILL the server in the middle of
the work, start it again on the same base folder, queue the same graph, and it finishes with only what was left.

(a) Build Teacher Cache with a cache_name, 8 shards of the real 256 samples (8 prompts x 256 samples per prompt, 2
    teacher steps on a 64x64 image of the tiny SD1.5 model and its tiny real CLIP; nothing in the node is lowered
    for the test): the server is killed once 4 shards are on disk (any further shard that lands before the kill is
    counted as written). After the restart the same graph writes only the missing shards (the finished ones keep
    their inode and mtime), its time is at most 1.1 x the unfinished fraction of a clean build's time plus a
    start-up allowance measured here (a fresh server's first run of the graph, on a one-micro-batch cache: the
    model and CLIP builds, prompt loading and encoding, the first sampling call), and the finished folder is
    byte-identical, file by file (every shard, the prompt encodings, the index), to a build that was never
    interrupted (another cache_name). The clean build runs on the restarted server right after the resumed run,
    so that both see the same machine load (other jobs on a shared machine move a build's time by 10-30%).
(b) Load Prompts -> Build Teacher Cache (named) -> Train Refiner (resume_from) -> Save Refiner: the server is killed
    once Train Refiner has written its first checkpoint (step 50 of 100, the node's own CHECKPOINT_EVERY) and before
    it finishes; after the restart the same graph resumes from that checkpoint ("resuming ... at step 50" in the
    server log), finishes, and Save Refiner writes a refiner; the loss log holds steps 1..100 once each, and the
    refiner and the losses equal those of an uninterrupted run of the same settings (another run name).

The servers are the conftest's (``start_server`` / ``stop_server``), each with its own base folder, stopped or
killed (and waited for) before the test returns.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
from pathlib import Path

import pytest


def _conftest():
    spec = importlib.util.spec_from_file_location("noisecraft_e2e_resume_conftest", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_CONF = _conftest()
make_base, start_server, stop_server = _CONF.make_base, _CONF.start_server, _CONF.stop_server

PROMPTS = [f"a photo of a {c} {t}" for c in ("red", "blue", "green", "black") for t in ("cat", "dog")]
PROMPT_FILE = "resume_prompts.txt"
SHARD = 256  # samples per shard: Build Teacher Cache's (nodes/train_store.py SHARD_SIZE, the CLI's default)
SHARDS = 8
KILL_AT = 4  # shards on disk when the server is killed
TIME_SLACK = 1.1


def _graph(cache_name: str, samples_per_prompt: int, train: dict | None = None) -> dict:
    """API prompt: tiny SD1.5 checkpoint -> Load Prompts (input/resume_prompts.txt) -> Build Teacher Cache (named),
    then either a teacher-cache sink (an output node of the test pack) or Train Refiner ``train`` -> Save Refiner."""
    g = {
        "1": {"class_type": "NC_Test_TinyCheckpoint", "inputs": {"ckpt_name": "tiny"}},
        "2": {"class_type": "NC_LoadPrompts", "inputs": {"file": PROMPT_FILE, "path": "", "column": "", "limit": 0,
                                                          "shuffle_seed": -1, "dedupe": False, "validation": 0.0,
                                                          "format": "auto"}},
        "3": {"class_type": "NC_Test_TextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 32}},
        "5": {"class_type": "NC_BuildTeacherCache", "inputs": {
            "model": ["1", 0], "negative": ["3", 0], "latent": ["4", 0], "prompts": ["2", 0], "clip": ["1", 1],
            "samples_per_prompt": samples_per_prompt, "seed": 0, "cfg": 5.0, "steps": 2, "scheduler": "normal",
            "cache_name": cache_name}},
    }
    if train is None:
        g["6"] = {"class_type": "NC_Test_TeacherCacheInfo", "inputs": {"teacher_cache": ["5", 0]}}
    else:
        g["6"] = {"class_type": "NC_TrainRefiner", "inputs": {
            "model": ["1", 0], "teacher_cache": ["5", 0], "student_steps": 2, "batch_size": 2, "learning_rate": 1e-3,
            "rank": 2, "alpha": 0.0, "seed": 0, **train}}
        g["7"] = {"class_type": "NC_SaveRefiner", "inputs": {"refiner": ["6", 0], "filename": train["resume_from"],
                                                             "folder": "loras"}}
    return g


def _ok(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[:3000]
    return entry


def _exec_seconds(entry: dict) -> float:
    """The server's own execution time of a prompt: execution_start -> execution_success (ms timestamps)."""
    ts = {m[0]: m[1].get("timestamp") for m in entry["status"]["messages"]}
    return (ts["execution_success"] - ts["execution_start"]) / 1000.0


def _shards(folder: Path) -> dict:
    """{shard file name: (inode, mtime_ns)} of the finished shards in a cache folder."""
    out = {}
    for p in folder.glob("shard_*.safetensors"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out[p.name] = (st.st_ino, st.st_mtime_ns)
    return out


def _kill(srv) -> None:
    """SIGKILL the server (no shutdown of any kind) and reap it."""
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(timeout=60)
    assert srv.proc.returncode == -signal.SIGKILL


def _wait_for(what, predicate, srv, timeout: float = 600, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if srv.proc.poll() is not None:
            raise AssertionError(f"server exited with {srv.proc.returncode} before {what}:\n{srv.log_tail()}")
        time.sleep(every)
    raise AssertionError(f"no {what} within {timeout} s:\n{srv.log_tail()}")


def _files(folder: Path) -> dict:
    """The cache folder's files (the lock and its holder record left out): {name: bytes}."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".noisecraft.lock")}


@pytest.fixture
def base(tmp_path):
    b = make_base(tmp_path / "comfy_base")
    (b / "input").mkdir()
    (b / "input" / PROMPT_FILE).write_text("\n".join(PROMPTS) + "\n")
    return b


def test_a_killed_named_cache_build_finishes_with_the_remaining_shards_and_the_same_bytes(base):
    caches = base / "output" / "noisecraft_caches"
    first = start_server(base, "server1.log")
    try:
        # the fixed start-up allowance: a fresh server's first run of the graph (one micro-batch of 32 samples)
        probe = _ok(first.run_prompt(_graph("probe", 4)))
        allowance = _exec_seconds(probe)
        assert probe["outputs"]["6"]["noisecraft_cache"][:2] == [32, 8]
        # the build, killed once KILL_AT shards are on disk
        first.queue_prompt(_graph("resumed", SHARD))
        _wait_for(f"{KILL_AT} shards", lambda: len(_shards(caches / "resumed")) >= KILL_AT, first)
        _kill(first)
    finally:
        stop_server(first)
    before = _shards(caches / "resumed")
    written = len(before)
    assert KILL_AT <= written < SHARDS, f"{written} shards were on disk at the kill"
    assert (caches / "resumed" / "index.json").is_file() and (caches / "resumed" / "conds.json").is_file()

    second = start_server(base, "server2.log")
    try:
        resumed = _ok(second.run_prompt(_graph("resumed", SHARD)))  # the restarted server's first prompt
        # then a clean build on the same server under another name, right after (the same machine load); the
        # loaders' outputs are cached by ComfyUI: this is Build Teacher Cache's own time
        clean = _ok(second.run_prompt(_graph("clean", SHARD)))
    finally:
        stop_server(second)
    resumed_s, clean_s = _exec_seconds(resumed), _exec_seconds(clean)
    assert resumed["outputs"]["6"]["noisecraft_cache"][:2] == [SHARDS * SHARD, 8]
    assert clean["outputs"]["6"]["noisecraft_cache"][:2] == [SHARDS * SHARD, 8]
    after = _shards(caches / "resumed")
    assert len(after) == SHARDS and len(_shards(caches / "clean")) == SHARDS
    assert {k: after[k] for k in before} == before, "a shard finished before the kill was written again"
    remaining = SHARDS - written
    assert len(set(after) - set(before)) == remaining
    fraction = remaining / SHARDS
    bound = TIME_SLACK * fraction * clean_s + allowance
    print(f"\nnamed cache resume: clean build {clean_s:.2f} s ({SHARDS} shards), killed at {written}/{SHARDS} shards, "
          f"resumed run {resumed_s:.2f} s for {remaining} shards on a restarted server; start-up allowance "
          f"{allowance:.2f} s; bound {TIME_SLACK} x {fraction:.3f} x {clean_s:.2f} + {allowance:.2f} = {bound:.2f} s; "
          f"resumed / (fraction x clean) = {resumed_s / (fraction * clean_s):.3f}, "
          f"(resumed - allowance) / (fraction x clean) = {(resumed_s - allowance) / (fraction * clean_s):.3f}")
    assert resumed_s <= bound, (resumed_s, bound)

    want, got = _files(caches / "clean"), _files(caches / "resumed")
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    assert {n for n in want if n.startswith("shard_")} == {f"shard_{k:05d}.safetensors" for k in range(SHARDS)}
    assert {"index.json", "conds.json", "conds_00000.safetensors"} <= set(want)
    differ = [n for n in want if got[n] != want[n]]
    assert not differ, f"files that differ from the uninterrupted build: {differ}"


def test_a_killed_training_run_resumes_from_its_checkpoint_and_saves_the_refiner(base):
    from safetensors import safe_open
    from safetensors.torch import load_file

    steps = 100
    runs = base / "output" / "noisecraft_runs"
    graph = _graph("train_cache", 2, {"steps": steps, "resume_from": "killed"})
    first = start_server(base, "server1.log")
    try:
        first.queue_prompt(graph)
        ckpt = runs / "killed" / "checkpoint.safetensors"
        _wait_for("training checkpoint", ckpt.is_file, first)
        _kill(first)
    finally:
        stop_server(first)
    assert not (runs / "killed" / "refiner.safetensors").exists(), "the training had finished before the kill"
    logged = (runs / "killed" / "loss.jsonl").read_text().splitlines()
    assert 50 <= len(logged) < steps
    assert (base / "output" / "noisecraft_caches" / "train_cache" / "index.json").is_file()

    second = start_server(base, "server2.log")
    try:
        start = len(second.log_path.read_text(errors="replace"))
        entry = _ok(second.run_prompt(graph))
        log = second.log_path.read_text(errors="replace")[start:]
        reference = _ok(second.run_prompt(_graph("train_cache", 2, {"steps": steps, "resume_from": "uninterrupted"})))
    finally:
        stop_server(second)
    assert f"resuming {runs / 'killed'} at step 50" in log, log[-3000:]
    records = [json.loads(line) for line in (runs / "killed" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))

    (saved,) = entry["outputs"]["7"]["noisecraft_saved"]
    (ref_saved,) = reference["outputs"]["7"]["noisecraft_saved"]
    path = base / "models" / "loras" / saved
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["noisecraft.kind"] == "refiner" and json.loads(meta["noisecraft.training"])["steps"] == steps
    got, want = load_file(str(path)), load_file(str(base / "models" / "loras" / ref_saved))
    assert got.keys() == want.keys() and any(k.endswith(".lora_up.weight") for k in got)
    assert all(bool((got[k] == want[k]).all()) for k in got), "the resumed refiner differs from the uninterrupted one"
    ref_records = [json.loads(line) for line in (runs / "uninterrupted" / "loss.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [r["loss"] for r in ref_records]
