"""``python -m noisecraft run-graph``: run a ComfyUI workflow without a browser.

The workflow (UI or API format; see :mod:`noisecraft.workflow_api`) goes to a ComfyUI server: one this
command starts (``main.py`` of ``--comfyui`` / ``$COMFYUI_PATH`` / the ComfyUI this pack is installed in, run
by ``--python`` or this interpreter, on 127.0.0.1 and a free port, stopped at the end) or a running one
(``--server URL``). The command prints each node as it runs, its progress, and at the end the outputs
(saved file names, text); a failing node ends it with rc 1 and one line per error (node id, class, message).
Ctrl-C asks the server to stop the prompt (``POST /interrupt``) and exits 130.

The server talk (standard library only: HTTP for the graph and its result, a websocket for progress) is in
:mod:`noisecraft.comfy_client`. Without a websocket (a proxy that refuses the upgrade) the command still runs
the graph, polling the history, and says that it shows no progress.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from .cli_args import positive_float
from .comfy_client import (ComfyClient, RunGraphError, WebSocketReader, failure_lines, node_label, output_lines)
from .workflow_api import WorkflowError, apply_sets, parse_set, read_workflow, ui_to_api

_RESERVED_SERVER_ARGS = ("--listen", "--port", "--disable-auto-launch", "--auto-launch")


# -- what the user sees ------------------------------------------------------------------------------------


class Reporter:
    """Node events and progress as lines on ``out``: on a terminal one progress line updated in place, else a
    line at every 10% of a node's progress."""

    def __init__(self, prompt: dict, out=None):
        self.prompt, self.out = prompt, out or sys.stdout
        self.tty = self.out.isatty()
        self.current: Optional[str] = None
        self.shown_pct: dict = {}
        self.open_line = False

    def say(self, text: str) -> None:
        if self.open_line:
            self.out.write("\n")
            self.open_line = False
        self.out.write(text + "\n")
        self.out.flush()

    def event(self, msg: dict, prompt_id: str) -> None:
        kind, data = msg.get("type"), msg.get("data") or {}
        if not isinstance(data, dict) or data.get("prompt_id") not in (None, prompt_id):
            return
        if kind == "execution_cached" and data.get("nodes"):
            self.say(f"cached (unchanged since the server last ran them): nodes {', '.join(map(str, data['nodes']))}")
        elif kind == "executing" and data.get("node") is not None and data.get("prompt_id") == prompt_id:
            node = str(data.get("display_node") or data["node"])
            if node != self.current:
                self.current = node
                self.say(f"{node_label(self.prompt, node)}: running")
        elif kind == "progress" and data.get("prompt_id") == prompt_id:
            self.progress(str(data.get("node") or self.current), int(data.get("value", 0)), int(data.get("max", 0)))

    def progress(self, node: str, value: int, total: int) -> None:
        if total <= 0:
            return
        label = f"{node_label(self.prompt, node)}: {value}/{total}"
        if self.tty:
            self.out.write(f"\r{label}   ")
            self.out.flush()
            self.open_line = value < total
            if not self.open_line:
                self.out.write("\n")
            return
        step = 100 * value // total // 10
        if step > self.shown_pct.get(node, -1):
            self.shown_pct[node] = step
            self.say(label)

    def close(self) -> None:
        if self.open_line:
            self.out.write("\n")
            self.open_line = False


# -- a ComfyUI of our own ----------------------------------------------------------------------------------


def resolve_comfyui(arg: Optional[str]) -> Path:
    """``--comfyui``, else ``$COMFYUI_PATH``, else the ComfyUI this pack is installed in: a folder with main.py."""
    from .weights import COMFYUI_ENV, find_comfyui_root

    if arg:
        root, where = Path(arg).expanduser(), "--comfyui"
    elif os.environ.get(COMFYUI_ENV):
        root, where = Path(os.environ[COMFYUI_ENV]).expanduser(), f"${COMFYUI_ENV}"
    else:
        root, where = find_comfyui_root(), ""
        if root is None:
            raise RunGraphError(f"no ComfyUI to start: this pack is not inside <ComfyUI>/custom_nodes/ and "
                                f"{COMFYUI_ENV} is not set; give --comfyui DIR, or --server URL for a running one",
                                rc=2)
    if not (root / "main.py").is_file():
        raise RunGraphError(f"{where} is {str(root)!r}, which has no main.py: expected the ComfyUI folder "
                            f"(the one with main.py and custom_nodes/); fix the path", rc=2)
    return root


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:400] if lines else ""


class LocalServer:
    """``main.py`` of a ComfyUI folder on 127.0.0.1 and a free port, its output in a log file; stopped on exit.

    The server runs in its own session, so a Ctrl-C in the terminal reaches only run-graph, which then asks
    the server to interrupt the prompt before it stops it."""

    def __init__(self, root: Path, python: str, args: list[str], startup_timeout: float, log: Optional[str] = None):
        for arg in args:
            if arg.split("=", 1)[0] in _RESERVED_SERVER_ARGS:
                raise RunGraphError(f"server argument {arg!r}: run-graph sets --listen 127.0.0.1, a free --port and "
                                    f"--disable-auto-launch itself; leave it out (or start ComfyUI yourself and "
                                    f"give --server URL)", rc=2)
        self.root, self.python, self.args, self.startup_timeout = root, python, args, startup_timeout
        if log:
            self.log_path = Path(log)
        else:
            fd, name = tempfile.mkstemp(prefix="noisecraft-comfyui-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, say: Callable[[str], None]) -> ComfyClient:
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
               *self.args]
        say(f"starting ComfyUI: {' '.join(cmd)} (in {self.root}; its log: {self.log_path})")
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(cmd, cwd=str(self.root), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except OSError as err:
            raise RunGraphError(f"cannot start {self.python!r} ({err.strerror}): give --python PATH, the python of "
                                f"your ComfyUI") from None
        client = ComfyClient(self.url)
        end = time.monotonic() + self.startup_timeout
        while not client.alive():
            if self.proc.poll() is not None:
                raise RunGraphError(f"ComfyUI exited with code {self.proc.returncode} while starting; its log: "
                                    f"{self.log_path} (last line: {_last_line(self.log_path)!r}); if that python "
                                    f"lacks ComfyUI's packages, give --python PATH (the python of your ComfyUI)")
            if time.monotonic() > end:
                raise RunGraphError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s of starting; its log: "
                                    f"{self.log_path} (last line: {_last_line(self.log_path)!r}); raise "
                                    f"--startup-timeout if it is only slow")
            time.sleep(0.5)
        say(f"ComfyUI is up at {self.url}")
        return client

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RunGraphError(f"ComfyUI exited with code {self.proc.returncode}; its log: {self.log_path} "
                                f"(last line: {_last_line(self.log_path)!r})")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the run -----------------------------------------------------------------------------------------------


def prepare(path: str, sets: list[str], object_info: dict) -> tuple[dict, Optional[dict]]:
    """``(API prompt with the --set values, the UI workflow or None)`` for the workflow file ``path``."""
    data, is_ui = read_workflow(path)
    prompt = ui_to_api(data, object_info) if is_ui else json.loads(json.dumps(data))
    if not is_ui:
        for key, node in prompt.items():
            if node["class_type"] not in object_info:
                raise WorkflowError(f"node {key}: the server has no node type {node['class_type']!r}; install the "
                                    f"custom node pack that provides it on the server and restart it")
    return apply_sets(prompt, sets, object_info), (data if is_ui else None)


def execute(client: ComfyClient, prompt: dict, workflow: Optional[dict], reporter: Reporter,
            check: Callable[[], None] = lambda: None, poll_s: float = 2.0, lost_s: float = 120.0) -> dict:
    """Queue ``prompt``, report its events, return its history entry. Ctrl-C cancels it on the server; a server
    that does not answer for ``lost_s`` seconds ends the wait."""
    client_id = uuid.uuid4().hex
    ws = None
    try:
        ws = WebSocketReader(client.url, client_id)
    except (OSError, ValueError) as err:
        reporter.say(f"no progress shown: the websocket at {client.url}/ws failed ({err}); waiting for the result")
    prompt_id = client.queue(prompt, client_id, workflow)
    reporter.say(f"queued prompt {prompt_id} ({len(prompt)} nodes) on {client.url}")
    lost_since = None
    try:
        next_poll = time.monotonic() + poll_s
        while True:
            if ws is not None and not ws.closed:
                try:
                    msg = ws.receive(timeout=max(0.05, next_poll - time.monotonic()))
                except (OSError, ValueError):
                    ws.close()
                    msg = None
                if msg:
                    reporter.event(msg, prompt_id)
                    done = (msg.get("type") in ("execution_success", "execution_error", "execution_interrupted")
                            or (msg.get("type") == "executing" and (msg.get("data") or {}).get("node") is None))
                    if not (done and (msg.get("data") or {}).get("prompt_id") == prompt_id):
                        continue
            else:
                time.sleep(max(0.0, next_poll - time.monotonic()))
            check()
            try:
                entry = client.history(prompt_id)
                lost_since = None
            except RunGraphError as err:  # a blip (a tunnel, a busy server): give it a while
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > lost_s:
                    raise RunGraphError(f"{err.lines[0]}; prompt {prompt_id} may still be running there") from None
                entry = None
            if entry is not None:
                return entry
            next_poll = time.monotonic() + poll_s
    except KeyboardInterrupt:
        reporter.close()
        client.cancel(prompt_id)
        raise RunGraphError(f"interrupted: asked ComfyUI at {client.url} to stop prompt {prompt_id}", rc=130) from None
    finally:
        reporter.close()
        if ws is not None:
            ws.close()


def run(args: argparse.Namespace) -> int:
    """The run-graph command: returns the exit code; errors go to stderr as ``noisecraft run-graph: <line>``."""
    out = sys.stdout

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    server: Optional[LocalServer] = None
    try:
        read_workflow(args.workflow)  # a bad file or --set fails before a server starts
        for text in args.set or []:
            parse_set(text)
        if args.server:
            if args.server_args or args.cpu or args.comfyui or args.python:
                raise RunGraphError("--comfyui, --python, --cpu and server arguments after -- start a server; with "
                                    "--server URL run-graph uses that one: give one or the other", rc=2)
            client = ComfyClient(args.server)
            client.get("/system_stats")
        else:
            server = LocalServer(resolve_comfyui(args.comfyui), args.python or sys.executable,
                                 (["--cpu"] if args.cpu else []) + list(args.server_args), args.startup_timeout,
                                 args.server_log)
            client = server.start(say)
        prompt, workflow = prepare(args.workflow, args.set or [], client.get("/object_info", timeout=300))
        t0 = time.monotonic()
        entry = execute(client, prompt, workflow, Reporter(prompt, out), server.check if server else lambda: None)
        failed = failure_lines(entry, prompt)
        if failed:
            raise RunGraphError(*failed)
        lines = output_lines(entry, prompt)
        say(f"done in {time.monotonic() - t0:.1f} s; outputs:" if lines else
            f"done in {time.monotonic() - t0:.1f} s (no node reported an output)")
        for line in lines:
            say(f"  {line}")
        return 0
    except WorkflowError as err:
        sys.stderr.write(f"noisecraft run-graph: {' '.join(str(err).split())}\n")
        return 2
    except RunGraphError as err:
        for line in err.lines:
            sys.stderr.write(f"noisecraft run-graph: {line}\n")
        return err.rc
    except KeyboardInterrupt:
        sys.stderr.write("noisecraft run-graph: interrupted before the graph was queued\n")
        return 130
    finally:
        if server is not None:
            server.stop()


def _split_server_args(parser, args=None, namespace=None):
    """``parse_known_args`` of the run-graph parser: everything after ``--`` is ComfyUI's (argparse cannot give a
    subcommand's positional both the workflow before options and words after them)."""
    args = list(sys.argv[1:] if args is None else args)
    extra = args[args.index("--") + 1:] if "--" in args else []
    args = args[:args.index("--")] if "--" in args else args
    ns, rest = super(type(parser), parser).parse_known_args(args, namespace)
    ns.server_args = extra
    return ns, rest


def add_run_graph_command(sub) -> None:
    """Register ``run-graph`` on the CLI's subparsers."""
    p = sub.add_parser(
        "run-graph", help="run a ComfyUI workflow (UI or API format) without a browser",
        usage="%(prog)s WORKFLOW.json [--server URL | --comfyui DIR [--python PY] [--cpu]] "
              "[--set NODE.INPUT=VALUE ...] [-- COMFYUI_ARGS ...]",
        description="Run a ComfyUI workflow file (saved from ComfyUI, UI or API format) without a browser: start "
                    "ComfyUI on 127.0.0.1 (--comfyui DIR, else $COMFYUI_PATH, else the ComfyUI this pack is "
                    "installed in) or use a running server (--server URL), queue the graph, print each node's "
                    "progress and the outputs. A failing node ends it with rc 1 and its error; Ctrl-C stops the "
                    "run on the server (rc 130). Arguments after -- go to ComfyUI's main.py when run-graph starts "
                    "it, e.g. -- --highvram --output-directory DIR.")
    p.__class__ = type("RunGraphParser", (type(p),), {"parse_known_args": _split_server_args})
    p.add_argument("workflow", help="the workflow .json (File > Save or File > Export (API) in ComfyUI)")
    p.add_argument("--server", help="a running ComfyUI, e.g. http://127.0.0.1:8188 (no server is started)")
    p.add_argument("--comfyui", help="the ComfyUI folder to start (default: $COMFYUI_PATH, else the ComfyUI this "
                                     "pack is installed in)")
    p.add_argument("--python", help="the python that runs ComfyUI (default: this one)")
    p.add_argument("--cpu", action="store_true", help="start ComfyUI with --cpu")
    p.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                   help="override an input: NODE is a node id or title (or type, if only one node has it), INPUT an "
                        "input name, VALUE JSON if it parses (10, 1e-4, true, \"7\") else a string; repeatable")
    p.add_argument("--startup-timeout", type=positive_float, default=600,
                   help="seconds to wait for a started ComfyUI to answer (default 600)")
    p.add_argument("--server-log", help="write a started ComfyUI's output here (default: a temporary file, named "
                                        "when it starts)")
    p.set_defaults(func=run)
