"""Every bad input to the CLI ends in one clear line on stderr, a non-zero return code and no traceback.

Table-driven: one row per input, the CLI run as a subprocess (``python -m noisecraft ...``). Rows
that need a real checkpoint or pair folder copy a tiny one made once per module (toy model, the
smallest flags). Families: numeric flags of every command, unknown scheduler, wrong latent
channels, an unusable --out / --cache, convert's destination, corrupt resume checkpoints, resume
with fewer --steps, corrupt pair / teacher-cache folders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
TOY_NPNET = REPO / "noisecraft" / "assets" / "toy_npnet.safetensors"
# the smallest toy runs (a few seconds each)
TINY_REFINER = ["--toy", "--samples", "8", "--batch", "4", "--student-steps", "1", "--teacher-steps", "2", "--rank", "1",
                "--shard-size", "4"]
TINY_PAIRS = ["--toy", "--pairs", "8", "--steps", "2", "--shard-size", "4", "--batch", "8"]
LONG = "n" * 300  # longer than any file system's 255-byte name limit


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NOISECRAFT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "noisecraft", *args], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A finished tiny refiner run (step 2), a pair folder, and a finished tiny NPNet run (step 2)."""
    root = tmp_path_factory.mktemp("cli_made")
    for args in (["train-refiner", *TINY_REFINER, "--steps", "2", "--out", "refiner"],
                 ["collect-pairs", *TINY_PAIRS, "--out", "pairs"],
                 ["train-npnet", "--pairs", "pairs", "--out", "npnet", "--steps", "2", "--batch", "4"]):
        proc = _run(args, root)
        assert proc.returncode == 0, f"{args}: {proc.stderr[-3000:]}"
    return root


def _copy(made: Path, tmp: Path, *names: str) -> None:
    for name in names:
        shutil.copytree(made / name, tmp / name)


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _header_plus(path: Path, extra: int) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little") + extra


@dataclass
class Case:
    id: str
    argv: list[str]
    message: str  # a substring of stderr
    rc: int = 2
    setup: Optional[Callable[[Path, Path], None]] = None  # (tmp, made)
    needs_made: bool = False
    also: list[str] = field(default_factory=list)  # more substrings


def _file(tmp: Path, made: Path) -> None:
    (tmp / "afile").write_text("not a folder\n")


def _pairs_copy(tmp: Path, made: Path) -> None:
    _copy(made, tmp, "pairs")


def _corrupt_index(tmp: Path, made: Path) -> None:
    _copy(made, tmp, "pairs")
    (tmp / "pairs" / "index.json").write_text('{"kind": "npnet_pairs", "shape": [1, 8')


def _index_list(tmp: Path, made: Path) -> None:
    _copy(made, tmp, "pairs")
    (tmp / "pairs" / "index.json").write_text("[1, 2, 3]\n")


def _garbage_shard(tmp: Path, made: Path) -> None:
    _copy(made, tmp, "pairs")
    (tmp / "pairs" / "shard_00000.safetensors").write_bytes(b"<html>not found</html>")


def _garbage_conds(tmp: Path, made: Path) -> None:
    _copy(made, tmp, "pairs")
    (tmp / "pairs" / "conds.safetensors").write_bytes(b"")


def _corrupt_cache_index(tmp: Path, made: Path) -> None:
    (tmp / "cache").mkdir()
    (tmp / "cache" / "index.json").write_bytes(b"\xff\xfe garbage")


def _refiner_copy(tmp: Path, made: Path) -> None:
    _copy(made, tmp, "refiner")


def _refiner_truncated(tmp: Path, made: Path) -> None:
    _copy(made, tmp, "refiner")
    _truncate(tmp / "refiner" / "checkpoint.safetensors", 1000)


def _refiner_cut_data(tmp: Path, made: Path) -> None:
    _copy(made, tmp, "refiner")
    ckpt = tmp / "refiner" / "checkpoint.safetensors"
    _truncate(ckpt, _header_plus(ckpt, 100))  # the header reads, the tensors are cut


def _npnet_copy(tmp: Path, made: Path) -> None:
    _copy(made, tmp, "pairs", "npnet")


def _npnet_garbage(tmp: Path, made: Path) -> None:
    _copy(made, tmp, "pairs", "npnet")
    (tmp / "npnet" / "checkpoint.safetensors").write_text("this is text, not a checkpoint\n")


def _npnet_empty(tmp: Path, made: Path) -> None:
    _copy(made, tmp, "pairs", "npnet")
    (tmp / "npnet" / "checkpoint.safetensors").write_bytes(b"")


def _dst_folder(tmp: Path, made: Path) -> None:
    (tmp / "outdir").mkdir()


def _dst_exists(tmp: Path, made: Path) -> None:
    (tmp / "taken.safetensors").write_bytes(b"x")


NUM = "expected a whole number >= 1"
FIN = "expected a finite number"
TR = ["train-refiner", "--toy", "--out", "r"]
CP = ["collect-pairs", "--toy", "--out", "p"]
TN = ["train-npnet", "--pairs", "pairs", "--out", "n"]

CASES = [
    # -- numeric flags: refused by argparse before any work, naming flag, value and what is allowed
    Case("refiner-batch-0", [*TR, "--batch", "0"], "--batch: expected a whole number >= 1, got 0"),
    Case("fetch-timeout-0", ["fetch", "npnet-sdxl-lucipherdev", "--timeout", "0"],
         "--timeout: expected a finite number > 0, got 0"),
    Case("fetch-retries-negative", ["fetch", "npnet-sdxl-lucipherdev", "--retries", "-1"],
         "--retries: expected a whole number >= 0, got -1"),
    Case("refiner-batch-text", [*TR, "--batch", "four"], "--batch: expected a whole number >= 1, got 'four'"),
    Case("refiner-steps-0", [*TR, "--steps", "0"], f"--steps: {NUM}, got 0"),
    Case("refiner-student-steps-0", [*TR, "--student-steps", "0"], f"--student-steps: {NUM}, got 0"),
    Case("refiner-teacher-steps-0", [*TR, "--teacher-steps", "0"], f"--teacher-steps: {NUM}, got 0"),
    Case("refiner-teacher-sampler-ancestral", [*TR, "--teacher-sampler", "euler_ancestral"],
         "--teacher-sampler: sampler 'euler_ancestral' is stochastic", also=["euler, heun, dpmpp_2m"]),
    Case("refiner-teacher-sampler-unknown", [*TR, "--teacher-sampler", "lms"],
         "--teacher-sampler: sampler 'lms' is not one of the core's deterministic samplers", also=["dpmpp_2m"]),
    Case("refiner-samples-0", [*TR, "--samples", "0"], f"--samples: {NUM}, got 0"),
    Case("refiner-shard-size-0", [*TR, "--shard-size", "0"], f"--shard-size: {NUM}, got 0"),
    Case("refiner-grad-accum-0", [*TR, "--grad-accum", "0"], f"--grad-accum: {NUM}, got 0"),
    Case("refiner-rank-0", [*TR, "--rank", "0"], f"--rank: {NUM}, got 0"),
    Case("refiner-lr-nan", [*TR, "--lr", "nan"], "--lr: expected a finite number > 0, got 'nan'"),
    Case("refiner-lr-0", [*TR, "--lr", "0"], "--lr: expected a finite number > 0, got 0"),
    Case("refiner-lr-negative", [*TR, "--lr", "-1"], "--lr: expected a finite number > 0, got -1"),
    Case("refiner-alpha-inf", [*TR, "--alpha", "inf"], "--alpha: expected a finite number > 0, got 'inf'"),
    Case("refiner-cfg-nan", [*TR, "--cfg", "nan"], f"--cfg: {FIN}, got 'nan'"),
    Case("refiner-warmup-negative", [*TR, "--warmup", "-1"], "--warmup: expected a whole number >= 0, got -1"),
    Case("refiner-checkpoint-every-0", [*TR, "--checkpoint-every", "0"], f"--checkpoint-every: {NUM}, got 0"),
    Case("refiner-latent-shape-0", [*TR, "--latent-shape", "0", "8", "8"], f"--latent-shape: {NUM}, got 0"),
    Case("refiner-seed-negative", [*TR, "--seed", "-3"], "--seed: expected a whole number >= 0, got -3"),
    Case("pairs-margin-nan", [*CP, "--margin", "nan"], "--margin: expected a number in [-1, 1)", also=["'nan'"]),
    Case("pairs-margin-too-big", [*CP, "--margin", "1.5"], "--margin: expected a number in [-1, 1)", also=["1.5"]),
    Case("pairs-w-l-nan", [*CP, "--w-l", "nan"], f"--w-l: {FIN}, got 'nan'"),
    Case("pairs-w-w-inf", [*CP, "--w-w", "inf"], f"--w-w: {FIN}, got 'inf'"),
    Case("pairs-steps-1", [*CP, "--steps", "1"], "--steps: expected a whole number >= 2, got 1"),
    Case("pairs-pairs-0", [*CP, "--pairs", "0"], f"--pairs: {NUM}, got 0"),
    Case("pairs-batch-0", [*CP, "--batch", "0"], f"--batch: {NUM}, got 0"),
    Case("pairs-shard-size-0", [*CP, "--shard-size", "0"], f"--shard-size: {NUM}, got 0"),
    Case("pairs-latent-shape-0", [*CP, "--latent-shape", "1", "0", "8"], f"--latent-shape: {NUM}, got 0"),
    Case("npnet-margin-nan", [*TN, "--margin", "nan"], f"--margin: {FIN}, got 'nan'"),
    Case("npnet-lr-0", [*TN, "--lr", "0"], "--lr: expected a finite number > 0, got 0"),
    Case("npnet-steps-0", [*TN, "--steps", "0"], f"--steps: {NUM}, got 0"),
    Case("npnet-batch-0", [*TN, "--batch", "0"], f"--batch: {NUM}, got 0"),
    Case("npnet-warmup-negative", [*TN, "--warmup", "-1"], "--warmup: expected a whole number >= 0, got -1"),
    Case("npnet-weight-decay-negative", [*TN, "--weight-decay", "-0.1"], "--weight-decay: expected a finite number >= 0"),
    Case("npnet-checkpoint-every-0", [*TN, "--checkpoint-every", "0"], f"--checkpoint-every: {NUM}, got 0"),
    Case("unknown-command", ["retrain"], "invalid choice: 'retrain'"),
    # -- names: scheduler choices listed; channels from the model
    Case("refiner-unknown-scheduler", [*TR, "--scheduler", "karass"], "--scheduler 'karass' is not a known",
         also=["normal, karras, exponential"]),
    Case("pairs-unknown-scheduler", [*CP, "--scheduler", "linear"], "--scheduler 'linear' is not a known",
         also=["ddim_uniform"]),
    Case("refiner-latent-channels", [*TR, "--latent-shape", "4", "8", "8"], "the model takes 1-channel latents, got C = 4"),
    Case("pairs-latent-channels", [*CP, "--latent-shape", "3", "8", "8"], "the model takes 1-channel latents, got C = 3"),
    # -- the model and its prompts
    Case("refiner-toy-and-model", ["train-refiner", "--toy", "--model", "m", "--out", "r"], "give either --toy or --model"),
    Case("refiner-prompts-missing", ["train-refiner", "--model", "m", "--prompts", "nofile.txt", "--out", "r"],
         "--prompts nofile.txt: no such file"),
    Case("pairs-prompts-empty", ["collect-pairs", "--model", "m", "--prompts", "empty.txt", "--out", "p"],
         "--prompts empty.txt: the file has no prompts", setup=lambda tmp, made: (tmp / "empty.txt").write_text("\n \n")),
    Case("refiner-model-not-diffusers", ["train-refiner", "--model", "m", "--prompts", "p.txt", "--out", "r"],
         "m is not a diffusers model folder", setup=lambda tmp, made: ((tmp / "m").mkdir(), (tmp / "p.txt").write_text("a\n"))),
    # -- an unusable output folder
    Case("refiner-out-is-file", ["train-refiner", "--toy", "--out", "afile"], "--out afile: a file of that name is in the way",
         setup=_file),
    Case("refiner-out-under-file", ["train-refiner", "--toy", "--out", "afile/sub"], "is a file, not a folder",
         setup=_file, also=["--out afile/sub"]),
    Case("refiner-out-long-name", ["train-refiner", "--toy", "--out", LONG], "too long", also=["--out nnn"]),
    Case("refiner-cache-under-file", ["train-refiner", "--toy", "--out", "r", "--cache", "afile/c"],
         "--cache afile/c", setup=_file, also=["is a file, not a folder"]),
    Case("pairs-out-is-file", ["collect-pairs", "--toy", "--out", "afile"], "--out afile: a file of that name is in the way",
         setup=_file),
    Case("pairs-out-under-file", ["collect-pairs", "--toy", "--out", "afile/deeper/sub"], "is a file, not a folder",
         setup=_file),
    Case("pairs-out-long-name", ["collect-pairs", "--toy", "--out", f"ok/{LONG}"], "too long"),
    Case("npnet-out-is-file", ["train-npnet", "--pairs", "pairs", "--out", "afile"], "a file of that name is in the way",
         setup=_file),
    Case("npnet-out-long-name", ["train-npnet", "--pairs", "pairs", "--out", LONG], "too long"),
    Case("demo-out-under-file", ["demo", "--quick", "--out", "afile/demo"], "is a file, not a folder", setup=_file),
    # -- convert's destination and source
    Case("convert-onto-folder", ["convert", str(TOY_NPNET), "outdir"], "outdir is a folder", setup=_dst_folder,
         also=["toy_npnet.safetensors"]),
    Case("convert-under-file", ["convert", str(TOY_NPNET), "afile/x.safetensors"], "a file of that name is in the way",
         setup=_file),
    Case("convert-long-name", ["convert", str(TOY_NPNET), f"{LONG}.safetensors"], "too long"),
    Case("convert-exists", ["convert", str(TOY_NPNET), "taken.safetensors"], "exists", setup=_dst_exists,
         also=["--overwrite"]),
    Case("convert-src-missing", ["convert", "nothing.pth", "x.safetensors"], "nothing.pth does not exist"),
    # -- resume: corrupt checkpoints, fewer steps, no --resume
    Case("refiner-resume-truncated", [*TINY_REFINER, "--out", "refiner", "--steps", "3", "--resume"],
         "refiner/checkpoint.safetensors is not a readable safetensors file", setup=_refiner_truncated,
         also=["delete it"]),
    Case("refiner-resume-cut-tensors", [*TINY_REFINER, "--out", "refiner", "--steps", "3", "--resume"],
         "refiner/checkpoint.safetensors is not a readable safetensors file", setup=_refiner_cut_data),
    Case("refiner-resume-fewer-steps", [*TINY_REFINER, "--out", "refiner", "--steps", "1", "--resume"],
         "is at step 2, but --steps is 1", setup=_refiner_copy, also=["--steps 2 or more", "refiner.safetensors"]),
    Case("refiner-no-resume", [*TINY_REFINER, "--out", "refiner", "--steps", "3"], "add --resume", setup=_refiner_copy),
    Case("npnet-resume-garbage", [*TN[:3], "--out", "npnet", "--steps", "3", "--batch", "4", "--resume"],
         "npnet/checkpoint.safetensors is not a readable safetensors file", setup=_npnet_garbage),
    Case("npnet-resume-empty", [*TN[:3], "--out", "npnet", "--steps", "3", "--batch", "4", "--resume"],
         "npnet/checkpoint.safetensors is not a readable safetensors file", setup=_npnet_empty, also=["0 bytes"]),
    Case("npnet-resume-fewer-steps", [*TN[:3], "--out", "npnet", "--steps", "1", "--batch", "4", "--resume"],
         "is at step 2, but --steps is 1", setup=_npnet_copy, also=["npnet.safetensors"]),
    # -- corrupt data folders
    Case("npnet-corrupt-index", [*TN, "--steps", "2", "--batch", "4"], "pairs/index.json is not valid JSON",
         setup=_corrupt_index, also=["delete the folder", "collect"]),
    Case("npnet-index-not-object", [*TN, "--steps", "2", "--batch", "4"], "pairs/index.json is not an index",
         setup=_index_list, also=["delete the folder"]),
    Case("pairs-resume-corrupt-index", ["collect-pairs", *TINY_PAIRS, "--out", "pairs"],
         "pairs/index.json is not valid JSON", setup=_corrupt_index, also=["delete the folder"]),
    Case("npnet-garbage-shard", [*TN, "--steps", "2", "--batch", "4"],
         "pairs/shard_00000.safetensors is not a readable safetensors file", setup=_garbage_shard),
    Case("npnet-empty-conds", [*TN, "--steps", "2", "--batch", "4"],
         "pairs/conds.safetensors is not a readable safetensors file", setup=_garbage_conds),
    Case("npnet-no-pairs", ["train-npnet", "--pairs", "missing", "--out", "n"], "missing is not an NPNet pair folder"),
    Case("refiner-corrupt-cache-index", [*TINY_REFINER, "--out", "r", "--steps", "2", "--cache", "cache"],
         "cache/index.json is not valid JSON", setup=_corrupt_cache_index, also=["delete the folder"]),
]

# rows that read a real checkpoint or pair folder
_MADE = {_refiner_copy, _refiner_truncated, _refiner_cut_data, _npnet_copy, _npnet_garbage, _npnet_empty,
         _corrupt_index, _index_list, _garbage_shard, _garbage_conds, _pairs_copy}


def test_enough_rows():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_bad_input(case: Case, tmp_path: Path, request):
    made = request.getfixturevalue("made") if case.setup in _MADE else tmp_path
    if case.setup is not None:
        case.setup(tmp_path, made)
    argv = case.argv if case.argv[0] in ("train-refiner", "collect-pairs", "train-npnet", "convert", "demo", "fetch",
                                          "retrain") else ["train-refiner", *case.argv]
    proc = _run(argv, tmp_path)
    err = proc.stderr
    assert proc.returncode == case.rc, f"rc {proc.returncode}, stderr:\n{err}"
    assert "Traceback" not in err, err
    for text in (case.message, *case.also):
        assert text in err, f"{text!r} not in stderr:\n{err}"
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("noisecraft: " if argv[0] == "retrain" else f"noisecraft {argv[0]}: "), err


def test_unexpected_error_is_one_line_and_debug_reraises(tmp_path: Path):
    """The last-resort handler: a bug prints its type and text and how to get the traceback (the command
    is replaced by one that raises, as only a bug would)."""
    code = ("import sys, noisecraft.__main__ as m\n"
            "def boom(args):\n    raise KeyError('surprise')\n"
            "m._demo = boom\n"
            "sys.exit(m.main(['demo', '--out', 'd']))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NOISECRAFT_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "unexpected error, KeyError: 'surprise'" in proc.stderr and "NOISECRAFT_DEBUG=1" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env={**env, "NOISECRAFT_DEBUG": "1"},
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "KeyError" in proc.stderr
