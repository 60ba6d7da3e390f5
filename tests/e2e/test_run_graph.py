"""``python -m noisecraft run-graph`` against a real ComfyUI server: every example workflow, failures, Ctrl-C,
and a server that run-graph starts itself.

The workflows get the stand-in nodes of ``test_example_workflows.py`` (written to a temporary UI-format file:
run-graph converts it) and the same tiny settings, given as ``--set`` on the command line, addressed by node
id, by title and by node type. run-graph runs as a subprocess with ``--server`` pointing at the session's
server, except in the ``--comfyui`` test. Also here: the object_info fixture of the tier-1 converter tests is
checked against this server (``NOISECRAFT_WRITE_FIXTURES=1`` rewrites it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIXTURE = REPO / "tests" / "core" / "data" / "object_info_examples.json"
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)


def _examples():
    spec = importlib.util.spec_from_file_location("noisecraft_e2e_examples", HERE / "test_example_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EX = _examples()
# the same model, prompt and scorer files, made the same way
npnet_files, refiner_files, prompt_file, aesthetic_weights = (EX.npnet_files, EX.refiner_files, EX.prompt_file,
                                                              EX.aesthetic_weights)
WORKFLOWS = EX.WORKFLOWS
# the paper example under its own cache and run names (the README's headless command sets the same inputs), so that
# it builds and trains here even after test_example_workflows.py finished "sdxl_paper" on this server
PAPER_NAME = "sdxl_paper_run_graph"
PAPER = {**EX.PAPER_OVERRIDES, "NC_LoadPrompts": {"file": EX.PROMPT_FILE},
         "NC_BuildTeacherCache": {**EX.PAPER_OVERRIDES["NC_BuildTeacherCache"], "cache_name": PAPER_NAME},
         "NC_TrainRefiner": {**EX.PAPER_OVERRIDES["NC_TrainRefiner"], "resume_from": PAPER_NAME}}
TINY = {"train_refiner": EX.TRAIN_OVERRIDES, "train_refiner_pag": EX.TRAIN_OVERRIDES, "train_refiner_paper": PAPER,
        "collect_npnet_pairs": EX.NPNET_TRAIN_OVERRIDES}
LABEL = r"node (\d+) \((\w+)(?: '[^\n]*')?\)"  # node 8 (CFGGuider 'CFGGuider (cfg 1: refined)')
PROGRESS = re.compile(rf"^{LABEL}: (\d+)/(\d+)$", re.MULTILINE)
OUTPUT_FILE = re.compile(rf"^  {LABEL}: output/(\S+)$", re.MULTILINE)


def run_graph(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("NOISECRAFT_DEBUG", None)
    return subprocess.run([COMFYUI_PYTHON, "-m", "noisecraft", "run-graph", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout)


def _write_stand_in(path: Path, tmp_path: Path) -> tuple[Path, dict]:
    ui = EX.stand_in(json.loads(path.read_text()))
    out = tmp_path / path.name
    out.write_text(json.dumps(ui))
    return out, ui


def _sets(ui: dict, tiny: dict) -> list[str]:
    """--set flags for the small latent (by node id) and ``tiny`` (by node type)."""
    flags = []
    for n in ui["nodes"]:
        if n["type"] == "EmptyLatentImage":
            flags += ["--set", f"{n['id']}.width=128", "--set", f"{n['id']}.height=128"]
    for kind, values in tiny.items():
        flags += [x for name, v in values.items() for x in ("--set", f"{kind}.{name}={json.dumps(v)}")]
    return flags


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_run_graph_runs_every_example_workflow(server, npnet_files, refiner_files, prompt_file, aesthetic_weights,
                                              path, tmp_path):
    file, ui = _write_stand_in(path, tmp_path)
    proc = run_graph(str(file), "--server", server.url, *_sets(ui, TINY.get(path.stem, {})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr
    out = proc.stdout
    assert re.search(r"^queued prompt \S+ \(\d+ nodes\) on http://127\.0\.0\.1:\d+$", out, re.MULTILINE), out
    assert "\ndone in " in out, out
    ran = {m.group(2) for m in re.finditer(rf"^{LABEL}: running$", out, re.MULTILINE)}
    cached = re.search(r"^cached .*: nodes ([\d, ]+)$", out, re.MULTILINE)
    assert ran or cached, out
    nc_progress = [m for m in PROGRESS.finditer(out) if m.group(2).startswith("NC_")]
    if ran & {"NC_BuildTeacherCache", "NC_TrainRefiner", "NC_InversionStabilitySelect", "NC_OptimizeNoise"}:
        assert nc_progress, f"no progress line of a NoiseCraft node:\n{out}"
    for m in nc_progress:  # (0/N: Train Refiner's validation preview at step 0)
        assert 0 <= int(m.group(3)) <= int(m.group(4))
    for node in {m.group(1) for m in nc_progress}:
        assert max(int(m.group(3)) for m in nc_progress if m.group(1) == node) >= 1, out
    saves = [n for n in ui["nodes"] if n["type"] == "SaveImage" and n.get("mode", 0) == 0]
    files = OUTPUT_FILE.findall(out)
    assert {str(n["id"]) for n in saves} <= {node for node, _, _ in files}, out
    for _, _, name in files:
        assert (server.base / "output" / name).is_file(), name
    if path.stem.startswith("train_refiner"):
        (saved,) = re.findall(r"NC_SaveRefiner[^\n]*: noisecraft_saved: (\S+)$", out, re.MULTILINE)
        assert (server.base / "models" / "loras" / saved).is_file()
    if path.stem == "train_refiner_paper":  # its named teacher cache and run folder, on disk
        from noisecraft.train import TeacherCache

        assert {"NC_BuildTeacherCache", "NC_FilterTeacherCache", "NC_TrainRefiner"} <= ran, out
        assert TeacherCache(server.base / "output" / "noisecraft_caches" / PAPER_NAME).complete
        assert (server.base / "output" / "noisecraft_runs" / PAPER_NAME / "refiner.safetensors").is_file()
    if path.stem == "collect_npnet_pairs":
        (saved,) = re.findall(r"NC_SaveNPNet[^\n]*: noisecraft_npnet_file: (\S+)$", out, re.MULTILINE)
        assert (server.base / "models" / "npnet" / saved).is_file()


def test_run_graph_addresses_nodes_by_title_and_an_api_format_file(server, object_info, tmp_path):
    """An API-format file, with --set by id, by title (a node's own, and the display name of an untitled node)
    and by type: the values reach the server (the run's prompt in /history has them)."""
    from noisecraft.workflow_api import ui_to_api

    ui = EX.stand_in(json.loads((REPO / "example_workflows" / "stability_select.json").read_text()))
    api = tmp_path / "stability_select_api.json"
    api.write_text(json.dumps(ui_to_api(ui, object_info)))
    proc = run_graph(str(api), "--server", server.url, "--set", "4.width=128", "--set", "4.height=128",
                     "--set", "Inversion-Stability Select.candidates=3", "--set", "Empty Latent Image.batch_size=2",
                     "--set", "BasicScheduler.steps=2",
                     "--set", "Positive.text=a small red boat")
    assert proc.returncode == 0, proc.stderr
    prompt_id = re.search(r"^queued prompt (\S+)", proc.stdout, re.MULTILINE).group(1)
    sent = server.get(f"/history/{prompt_id}")[prompt_id]["prompt"][2]
    assert sent["5"]["inputs"]["candidates"] == 3 and sent["8"]["inputs"]["steps"] == 2
    assert sent["4"]["inputs"]["batch_size"] == 2
    assert sent["2"]["inputs"]["text"] == "a small red boat" and sent["4"]["inputs"]["width"] == 128


def test_a_failing_node_exits_1_naming_the_node(server, npnet_files, tmp_path):
    file, ui = _write_stand_in(REPO / "example_workflows" / "npnet_golden_noise.json", tmp_path)
    proc = run_graph(str(file), "--server", server.url, *_sets(ui, {}),
                     "--set", "Load NPNet.npnet_name=missing.safetensors")
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("noisecraft run-graph: node 6 (NC_LoadNPNet 'Load NPNet') failed: FileNotFoundError: ")
    assert "'missing.safetensors' not found" in lines[0]


def test_a_graph_the_server_refuses_exits_1_naming_the_node(server, tmp_path):
    file, ui = _write_stand_in(REPO / "example_workflows" / "train_refiner.json", tmp_path)
    proc = run_graph(str(file), "--server", server.url, "--set", "NC_TrainRefiner.rank=0")
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0] == "noisecraft run-graph: ComfyUI refused the graph: Prompt outputs failed validation"
    assert any(ln.startswith("noisecraft run-graph: node 8 (NC_TrainRefiner 'Train Refiner'): ") and "rank" in ln
               for ln in lines[1:]), proc.stderr


@pytest.mark.parametrize("flag, message", [
    ("Nowhere.steps=3", "no node with the id, title or type 'Nowhere' in the graph that runs"),
    ("NC_Test_TextEncode.text=x", "3 nodes have the type 'NC_Test_TextEncode' (ids 2, 3, 5); name the node by its id"),
    ("8.stepz=3", "node 8 (NC_TrainRefiner) has no input 'stepz'; its inputs: model, teacher_cache, steps"),
])
def test_a_bad_set_exits_2_with_one_line(server, tmp_path, flag, message):
    file, _ = _write_stand_in(REPO / "example_workflows" / "train_refiner.json", tmp_path)
    proc = run_graph(str(file), "--server", server.url, "--set", flag)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_ctrl_c_interrupts_the_run_on_the_server_and_exits_130(server, tmp_path):
    file, ui = _write_stand_in(REPO / "example_workflows" / "train_refiner.json", tmp_path)
    flags = _sets(ui, {**EX.TRAIN_OVERRIDES, "NC_TrainRefiner": {**EX.TRAIN_OVERRIDES["NC_TrainRefiner"],
                                                                 "steps": 1_000_000}})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([COMFYUI_PYTHON, "-m", "noisecraft", "run-graph", str(file), "--server", server.url,
                             *flags], cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,  # a shell starts background jobs with SIGINT ignored, and Python keeps it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # so: the default
    prompt_id, seen = None, []
    try:
        for line in proc.stdout:  # wait (by events, not time) until training runs
            seen.append(line)
            if line.startswith("queued prompt "):
                prompt_id = line.split()[2]
            if re.match(r"node 8 \(NC_TrainRefiner 'Train Refiner'\): \d+/1000000$", line.strip()):
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(seen) + rest + err
    assert err.strip() == f"noisecraft run-graph: interrupted: asked ComfyUI at {server.url} to stop prompt {prompt_id}"
    for _ in range(600):  # the server records the interrupted prompt once the node stops
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry:
            break
        time.sleep(0.2)
    events = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in events, events


def _port_is_closed(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/system_stats", timeout=5)
    except (urllib.error.URLError, ConnectionError, OSError):
        return True
    return False


def test_run_graph_starts_comfyui_itself_and_stops_it(server, object_info, tmp_path):
    """--comfyui (+ --python, --cpu and server arguments after --): a second ComfyUI with its own base folder."""
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-NoiseCraft").symlink_to(REPO)  # as conftest.py links it
    (base / "custom_nodes" / "nc_test_pack").symlink_to(HERE / "nc_test_pack")
    file, ui = _write_stand_in(REPO / "example_workflows" / "noise_to_latent.json", tmp_path)
    log = tmp_path / "comfyui.log"
    proc = run_graph(str(file), "--comfyui", COMFYUI_PATH, "--python", COMFYUI_PYTHON, "--cpu", "--server-log",
                     str(log), *_sets(ui, {"NC_InversionStabilitySelect": {"candidates": 2, "score_steps": 2},
                                         "KSamplerAdvanced": {"steps": 2}}),
                     "--", "--base-directory", str(base), "--use-pytorch-cross-attention")
    assert proc.returncode == 0, proc.stderr + log.read_text(errors="replace")[-3000:]
    assert proc.stdout.startswith("starting ComfyUI: "), proc.stdout
    assert f"--cpu --base-directory {base} --use-pytorch-cross-attention" in proc.stdout.splitlines()[0]
    url = re.search(r"^ComfyUI is up at (http://127\.0\.0\.1:\d+)$", proc.stdout, re.MULTILINE).group(1)
    assert url != server.url
    (name,) = [n for node, _, n in OUTPUT_FILE.findall(proc.stdout)]
    assert (base / "output" / name).is_file()
    assert "Starting server" in log.read_text(errors="replace")
    assert _port_is_closed(url), "the ComfyUI that run-graph started still answers"


# -- the object_info fixture of tests/core/test_workflow_api.py ---------------------------------------------------


def _stripped(info: dict) -> dict:
    """What the converter reads of a node type: display name, input order, each input's kind and options."""
    keep = {"forceInput", "control_after_generate", "default", "image_upload", "video_upload", "audio_upload"}

    def spec(s):
        kind = "COMBO" if isinstance(s[0], list) else s[0]
        opts = {k: v for k, v in (s[1] if len(s) > 1 and isinstance(s[1], dict) else {}).items() if k in keep}
        return [kind, opts] if opts else [kind]

    inputs = {part: {name: spec(s) for name, s in (info["input"].get(part) or {}).items()}
              for part in ("required", "optional") if info["input"].get(part)}
    order = {part: names for part, names in (info.get("input_order") or {}).items() if part in inputs}
    return {"display_name": info.get("display_name"), "input": inputs, "input_order": order}


def test_the_object_info_fixture_is_this_servers(object_info):
    kinds = sorted({n["type"] for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"]} - {"Note"})
    want = {k: _stripped(object_info[k]) for k in kinds}
    if os.environ.get("NOISECRAFT_WRITE_FIXTURES"):
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                                             for k, v in sorted(want.items())) + "\n}\n")  # a node type a line
    got = json.loads(FIXTURE.read_text())
    assert got == want, (f"{FIXTURE} differs from the server's /object_info for the example workflows' nodes; "
                         f"rewrite it: NOISECRAFT_WRITE_FIXTURES=1 pytest tests/e2e/test_run_graph.py -k fixture")
