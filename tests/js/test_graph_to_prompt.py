"""Tier 4: run-graph's UI -> API converter gives what the real ComfyUI frontend sends, for every example workflow.

``graph_to_prompt.mjs`` loads each workflow (with the stand-in nodes of the tier-3 tests, so that every node
type exists on the server) into the frontend served by the tier-3 server, in headless Chromium, and writes
``app.graphToPrompt().output``: the API-format prompt the browser would queue. ``noisecraft.workflow_api``
converts the same workflows with the server's ``/object_info``; the two must be equal. Variants add what the
examples lack: a muted and a bypassed node, a widget converted to an input and fed by a link, a Reroute and a
PrimitiveNode.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHROMIUM = os.environ.get("NOISECRAFT_CHROMIUM", "/usr/bin/chromium")  # as in conftest.py (skip logic)
NODE = "node"
TIMEOUT_S = float(os.environ.get("NOISECRAFT_JS_TIMEOUT_S", "420"))


def _examples():
    return sys.modules["noisecraft_js_e2e_workflows"]  # loaded by conftest.py: the tier-3 helpers


def _variants(ex) -> dict:
    out = {}
    for path in ex.WORKFLOWS:
        out[path.stem] = ex.stand_in(json.loads(path.read_text()))
    rg = copy.deepcopy(out["refined_guidance_free"])
    for n in rg["nodes"]:
        if n["id"] == 7:
            n["mode"] = 4  # Refine Noise bypassed
        if n["id"] == 17:
            n["mode"] = 2  # the second Save Image muted
    out["bypassed_and_muted"] = rg
    ntl = copy.deepcopy(out["noise_to_latent"])  # best_seed of the select node -> KSamplerAdvanced's noise_seed
    link_id = max(lk[0] for lk in ntl["links"]) + 1
    ntl["links"].append([link_id, 5, 1, 7, 4, "INT"])
    sampler = next(n for n in ntl["nodes"] if n["id"] == 7)
    sampler["inputs"].append({"name": "noise_seed", "type": "INT", "link": link_id, "widget": {"name": "noise_seed"}})
    select = next(n for n in ntl["nodes"] if n["id"] == 5)
    select["outputs"][1]["links"] = [link_id]
    out["converted_widget"] = ntl
    out["reroute_and_primitive"] = _reroute_and_primitive(out["npnet_golden_noise"])
    return out


def _reroute_and_primitive(wf: dict) -> dict:
    """VAE Decode's vae through a Reroute; BasicScheduler's steps from a PrimitiveNode (7, its own widget says 20)."""
    wf = copy.deepcopy(wf)
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf["links"]}
    next_link = max(links) + 1
    vae_in = next(i for i in nodes[12]["inputs"] if i["name"] == "vae")
    vae = links[vae_in["link"]]
    wf["links"].append([next_link, vae[1], vae[2], 60, 0, "VAE"])
    nodes[vae[1]]["outputs"][vae[2]]["links"] = [x if x != vae[0] else next_link
                                                 for x in nodes[vae[1]]["outputs"][vae[2]]["links"]]
    vae[1], vae[2] = 60, 0
    wf["nodes"].append({"id": 60, "type": "Reroute", "pos": [1200, 700], "size": [75, 26], "flags": {}, "order": 0,
                        "mode": 0, "inputs": [{"name": "", "type": "*", "link": next_link}],
                        "outputs": [{"name": "", "type": "VAE", "links": [vae[0]]}],
                        "properties": {"showOutputText": False, "horizontal": False}})
    steps_link = next_link + 1
    wf["links"].append([steps_link, 61, 0, 10, 1, "INT"])
    nodes[10]["inputs"].append({"name": "steps", "type": "INT", "link": steps_link, "widget": {"name": "steps"}})
    wf["nodes"].append({"id": 61, "type": "PrimitiveNode", "pos": [0, 900], "size": [210, 82], "flags": {},
                        "order": 0, "mode": 0, "inputs": [],
                        "outputs": [{"name": "INT", "type": "INT", "links": [steps_link], "widget": {"name": "steps"}}],
                        "title": "steps", "properties": {"Run widget replace on values": False},
                        "widgets_values": [7, "fixed"]})
    wf["last_node_id"], wf["last_link_id"] = 61, steps_link
    return wf


def test_the_converter_sends_what_the_frontend_sends(server, refiner_files, tmp_path):
    from noisecraft.workflow_api import ui_to_api

    ex = _examples()
    workflows = _variants(ex)
    (tmp_path / "workflows.json").write_text(json.dumps(workflows))
    env = dict(os.environ, NC_URL=server.url, NC_WORKFLOWS=str(tmp_path / "workflows.json"),
               NC_OUT=str(tmp_path / "frontend.json"), NC_CHROMIUM=CHROMIUM,
               NC_USER_DATA=str(tmp_path / "chromium-profile"))
    proc = subprocess.run([NODE, str(HERE / "graph_to_prompt.mjs")], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    frontend = json.loads((tmp_path / "frontend.json").read_text())
    object_info = server.get("/object_info", timeout=60)
    for name, ui in workflows.items():
        ours = ui_to_api(ui, object_info)
        assert ours == frontend[name], f"{name}:\nours     {json.dumps(ours)}\nfrontend {json.dumps(frontend[name])}"
