"""Tier 4: load, run and edit a workflow in headless Chromium on the real ComfyUI frontend.

The workflow is ``example_workflows/refined_guidance_free.json`` made runnable here: the test pack's
tiny checkpoint / text encoder / VAE decode stand in for CheckpointLoaderSimple / CLIPTextEncode /
VAEDecode (same widgets and outputs), the empty latent is 128x128 with 4 sampling steps, and the
RandomNoise node is replaced by Inversion Stability Select (K=4, 2 score steps) so that one run
exercises both extensions: the chart on the select node and the guidance toggle on Refine Noise.
The refined branch's CFGGuider gets cfg 6.5 so the toggle has something to change; the cfg-7
comparison branch is fed by the select node directly and must keep its cfg.

``frontend_check.mjs`` drives the browser; screenshots and the saved workflows go to
``tests/js/artifacts/`` (git-ignored; ``NOISECRAFT_JS_ARTIFACTS`` overrides).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHROMIUM = os.environ.get("NOISECRAFT_CHROMIUM", "/usr/bin/chromium")  # as in conftest.py (skip logic)
NODE = shutil.which("node")
ARTIFACTS = Path(os.environ.get("NOISECRAFT_JS_ARTIFACTS", HERE / "artifacts"))
SUBSTITUTE = {
    "CheckpointLoaderSimple": "NC_Test_TinyCheckpoint",
    "CLIPTextEncode": "NC_Test_TextEncode",
    "VAEDecode": "NC_Test_VAEDecode",
}
REFINED_GUIDER_CFG = 6.5
SCRIPT_TIMEOUT_S = float(os.environ.get("NOISECRAFT_JS_TIMEOUT_S", "420"))


def build_workflow() -> dict:
    wf = copy.deepcopy(json.loads((REPO / "example_workflows" / "refined_guidance_free.json").read_text()))
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        if n["type"] in SUBSTITUTE:
            n["type"] = SUBSTITUTE[n["type"]]
            n.setdefault("properties", {})["Node name for S&R"] = n["type"]
        if n["type"] == "EmptyLatentImage":
            n["widgets_values"][:2] = [128, 128]
        if n["type"] == "BasicScheduler":
            n["widgets_values"][1] = 4
    refine = next(n for n in wf["nodes"] if n["type"] == "NC_RefineNoise")
    noise_link = next(i["link"] for i in refine["inputs"] if i["name"] == "noise")
    links = {lk[0]: lk for lk in wf["links"]}
    rnd = nodes[links[noise_link][1]]
    assert rnd["type"] == "RandomNoise"
    # the refined branch's guider (RefineNoise -> SamplerCustomAdvanced <- CFGGuider)
    sampler_id = next(links[i][3] for i in refine["outputs"][0]["links"])
    guider_link = next(i["link"] for i in nodes[sampler_id]["inputs"] if i["name"] == "guider")
    guider = nodes[links[guider_link][1]]
    guider["widgets_values"][0] = REFINED_GUIDER_CFG

    # RandomNoise -> Inversion Stability Select, fed by the checkpoint, both prompts and the latent
    ckpt = next(n for n in wf["nodes"] if n["type"] == "NC_Test_TinyCheckpoint")
    pos = nodes[links[next(i["link"] for i in guider["inputs"] if i["name"] == "positive")][1]]
    neg = nodes[links[next(i["link"] for i in guider["inputs"] if i["name"] == "negative")][1]]
    latent = next(n for n in wf["nodes"] if n["type"] == "EmptyLatentImage")
    next_link = max(links) + 1
    inputs = []
    for name, typ, src, slot in (("model", "MODEL", ckpt, 0), ("positive", "CONDITIONING", pos, 0),
                                 ("negative", "CONDITIONING", neg, 0), ("latent", "LATENT", latent, 0)):
        wf["links"].append([next_link, src["id"], slot, rnd["id"], len(inputs), typ])
        src["outputs"][slot]["links"].append(next_link)
        inputs.append({"name": name, "type": typ, "link": next_link})
        next_link += 1
    wf["last_link_id"] = next_link - 1
    rnd.update(
        type="NC_InversionStabilitySelect",
        inputs=inputs,
        outputs=[{"name": "noise", "type": "NOISE", "links": rnd["outputs"][0]["links"], "slot_index": 0},
                 {"name": "best_seed", "type": "INT", "links": []},
                 {"name": "scores", "type": "FLOAT", "links": []},
                 {"name": "top_seeds", "type": "STRING", "links": []}],
        # seed, control_after_generate, candidates, score_steps, cfg, inversion_cfg, scheduler, micro_batch, top_k
        widgets_values=[0, "fixed", 4, 2, 7.0, 1.0, "normal", 4, 3],
        properties={"Node name for S&R": "NC_InversionStabilitySelect"},
        size=[320, 330],
        # left of the whole graph: RandomNoise's slot is too small for this node and its chart
        pos=[min(n["pos"][0] for n in wf["nodes"]) - 380, rnd["pos"][1]],
    )
    return wf


def test_chart_and_guidance_toggle_in_the_real_frontend(server, refiner_files, tmp_path):
    wf = build_workflow()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*"):
        if old.is_file():
            old.unlink()
    wf_path = ARTIFACTS / "workflow_in.json"
    wf_path.write_text(json.dumps(wf, indent=1))
    select_id = next(n["id"] for n in wf["nodes"] if n["type"] == "NC_InversionStabilitySelect")
    refine_id = next(n["id"] for n in wf["nodes"] if n["type"] == "NC_RefineNoise")
    guiders = {n["id"]: n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "CFGGuider"}
    env = dict(os.environ, NC_URL=server.url, NC_WORKFLOW=str(wf_path), NC_ARTIFACTS=str(ARTIFACTS),
               NC_CHROMIUM=CHROMIUM, NC_USER_DATA=str(tmp_path / "chromium-profile"),
               NC_SELECT_ID=str(select_id), NC_REFINE_ID=str(refine_id), NC_GUIDERS=json.dumps(guiders))
    proc = subprocess.run([NODE, str(HERE / "frontend_check.mjs")], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=SCRIPT_TIMEOUT_S)
    (ARTIFACTS / "frontend_check.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    assert proc.returncode == 0, (f"frontend_check.mjs failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                                  f"{proc.stderr[-4000:]}\n--- server log ---\n{server.log_tail(40)}")
    result = json.loads((ARTIFACTS / "result.json").read_text())
    assert result["ok"] is True
    wanted = os.environ.get("NOISECRAFT_FRONTEND")
    if wanted and not os.path.isdir(wanted):  # a version: the page must be that frontend
        assert result["frontend_version"] == wanted, (result["frontend_version"], wanted)
    for name in ("1_loaded.png", "2_executed_chart.png", "3_guidance_off.png", "4_reloaded_restored.png"):
        assert (ARTIFACTS / name).stat().st_size > 1000, name
