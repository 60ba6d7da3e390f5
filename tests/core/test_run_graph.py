"""``python -m noisecraft run-graph`` without a server (tier 1): bad input ends in one line before any server is
contacted or started, and the progress report. The runs against a real ComfyUI are in tests/e2e/test_run_graph.py.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from noisecraft.run_graph import Reporter

REPO = Path(__file__).resolve().parents[2]


def load(name: str) -> dict:
    return json.loads((REPO / "example_workflows" / f"{name}.json").read_text())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with block ends: nothing listens there


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("COMFYUI_PATH", None)
    return subprocess.run([sys.executable, "-m", "noisecraft", "run-graph", *args], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, rc, message", [
    (["bad.json"], 2, "bad.json is not JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
    (["list.json"], 2, "list.json is not a ComfyUI workflow: expected the UI format"),
    (["missing.json"], 2, "missing.json: no such file"),
    (["good.json", "--set", "5steps=3"], 2, "--set '5steps=3': expected NODE.INPUT=VALUE"),
    (["good.json", "--server", "http://127.0.0.1:1", "--cpu"], 2,
     "--comfyui, --python, --cpu and server arguments after -- start a server; with --server URL run-graph uses "
     "that one"),
    (["good.json", "--server", "ftp://host"], 2, "--server 'ftp://host': expected an http(s) URL"),
    (["good.json", "--server", "http://127.0.0.1:PORT"], 1, "cannot reach ComfyUI at http://127.0.0.1:PORT"),
    (["good.json", "--comfyui", "."], 2, "--comfyui is '.', which has no main.py: expected the ComfyUI folder"),
    (["good.json", "--comfyui", "fake", "--", "--port", "9"], 2,
     "server argument '--port': run-graph sets --listen 127.0.0.1, a free --port and --disable-auto-launch itself"),
    (["good.json", "--startup-timeout", "0"], 2, "argument --startup-timeout: expected a finite number > 0, got 0"),
])
def test_cli_bad_input_is_one_line_before_any_server(tmp_path, args, rc, message):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "good.json").write_text(json.dumps(load("stability_select")))
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "main.py").write_text("raise SystemExit('not run: refused before start')\n")
    port = str(_closed_port())
    proc = _cli(*[a.replace("PORT", port) for a in args], cwd=tmp_path)
    assert proc.returncode == rc, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("noisecraft run-graph: ") and message.replace("PORT", port) in lines[0], lines[0]
    assert proc.stdout == ""


def test_progress_is_reported_at_every_tenth_and_other_prompts_are_ignored():
    prompt = {"8": {"class_type": "NC_TrainRefiner", "_meta": {"title": "Train Refiner"}}}
    out = io.StringIO()
    rep = Reporter(prompt, out)
    rep.event({"type": "executing", "data": {"node": "8", "display_node": "8", "prompt_id": "p"}}, "p")
    rep.event({"type": "executing", "data": {"node": "3", "prompt_id": "other"}}, "p")
    for value in range(1, 201):
        rep.event({"type": "progress", "data": {"value": value, "max": 200, "node": "8", "prompt_id": "p"}}, "p")
    rep.event({"type": "progress", "data": {"value": 5, "max": 10, "node": "8", "prompt_id": "other"}}, "p")
    lines = out.getvalue().splitlines()
    assert lines[0] == "node 8 (NC_TrainRefiner 'Train Refiner'): running"
    assert lines[1:] == [f"node 8 (NC_TrainRefiner 'Train Refiner'): {v}/200" for v in [1, *range(20, 201, 20)]]
