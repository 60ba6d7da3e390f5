"""Tier 3: a real ComfyUI server (``COMFYUI_PATH``, run by ``COMFYUI_PYTHON``) with the pack installed.

Without ``COMFYUI_PATH`` the folder is skipped with one line in the summary. The server runs on
the CPU, bound to 127.0.0.1 on a free port, with ``--base-directory`` pointing at a temporary
folder whose ``custom_nodes`` holds links to this repository and to the test-only pack
``nc_test_pack`` (the ComfyUI checkout is not modified; its outputs go to the temp folder).
``start_server`` / ``stop_server`` start and stop more servers (tests that kill and restart one).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
SKIP_LINE = "COMFYUI_PATH not set: skipping ComfyUI end-to-end tests (tier 3)"
PACK_FOLDER = "ComfyUI-NoiseCraft"  # not "noisecraft": ComfyUI registers a pack under its folder name
STARTUP_TIMEOUT_S = float(os.environ.get("NOISECRAFT_E2E_STARTUP_S", "180"))
AESTHETIC_FOLDER = "aesthetic_weights"  # in the base folder: the test server's $NOISECRAFT_AESTHETIC

if not COMFYUI_PATH:
    collect_ignore_glob = ["test_*.py"]

    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_line(SKIP_LINE, yellow=True, bold=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log_path: Path):
        self.base, self.port, self.proc, self.log_path = base, port, proc, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.aesthetic = base / AESTHETIC_FOLDER  # its $NOISECRAFT_AESTHETIC

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.load(r)

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return {"http_error": e.code, **json.loads(e.read() or b"{}")}

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def queue_prompt(self, prompt: dict, workflow: Optional[dict] = None) -> str:
        """POST the API-format ``prompt``; returns its prompt id (the server must accept it)."""
        extra = {"extra_pnginfo": {"workflow": workflow}} if workflow is not None else {}
        res = self.post("/prompt", {"prompt": prompt, "client_id": "noisecraft-e2e", "extra_data": extra})
        if "prompt_id" not in res:
            raise AssertionError(f"/prompt rejected the workflow: {json.dumps(res)[:2000]}")
        return res["prompt_id"]

    def wait_prompt(self, pid: str, timeout: float = 600) -> dict:
        """The history entry of prompt ``pid`` once it has finished (success or error)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") in ("success", "error") or entry["status"].get("completed"):
                    return entry
            time.sleep(0.2)
        raise AssertionError(f"prompt {pid} did not finish in {timeout} s:\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, workflow: Optional[dict] = None, timeout: float = 600) -> dict:
        """Queue ``prompt`` and wait for it: its history entry."""
        return self.wait_prompt(self.queue_prompt(prompt, workflow), timeout)



def make_base(base: Path) -> Path:
    """A ComfyUI base folder whose ``custom_nodes`` links this repository and the test pack."""
    custom = base / "custom_nodes"
    custom.mkdir(parents=True)
    (custom / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    (custom / "nc_test_pack").symlink_to(REPO / "tests" / "e2e" / "nc_test_pack", target_is_directory=True)
    return base


def start_server(base: Path, log_name: str = "server.log") -> Server:
    """ComfyUI on the CPU on a free 127.0.0.1 port with ``base`` as its base directory, up and answering
    (its log in ``base/log_name``, appended to). The aesthetic scorer's weights are looked for in
    ``base/aesthetic_weights`` (never the user's). Stop it with :func:`stop_server`."""
    port = _free_port()
    log_path = base / log_name
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
               NOISECRAFT_AESTHETIC=str(base / AESTHETIC_FOLDER))
    cmd = [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--use-pytorch-cross-attention", "--base-directory", str(base), "--disable-auto-launch"]
    if os.environ.get("NOISECRAFT_FRONTEND_ROOT"):  # another frontend build (tier 4: tests/js/conftest.py)
        cmd += ["--front-end-root", os.environ["NOISECRAFT_FRONTEND_ROOT"]]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = Server(base, port, proc, log_path)
    try:
        end = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode} at startup:\n{srv.log_tail()}")
            try:
                srv.get("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > end:
                    raise RuntimeError(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S} s:\n{srv.log_tail()}")
                time.sleep(0.5)
    except BaseException:
        stop_server(srv)
        raise
    return srv


def stop_server(srv: Server) -> None:
    """Stop the server's process (terminate, then kill after 30 s) and wait for it."""
    proc = srv.proc
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = start_server(make_base(tmp_path_factory.mktemp("comfy_base")))
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="session")
def object_info(server):
    return server.get("/object_info", timeout=60)
