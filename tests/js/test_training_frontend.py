"""Tier 4: a short training with held-out validation in headless Chromium on the real ComfyUI frontend.

The workflow is ``example_workflows/train_refiner.json`` made runnable here: the test pack's tiny checkpoint /
text encoder stand in for CheckpointLoaderSimple / CLIPTextEncode, a 64x64 latent, 2 samples per prompt and a
3-step teacher, 6 training steps. ``training_check.mjs`` sets validate_every 2 and validation_seeds 1 and
connects the checkpoint's VAE to Train Refiner in the page, queues the graph and checks that the node shows the
validation grid (its image) and both curves (loss and gap closed, drawn by ``js/noisecraft.charts.js``).
Screenshots ``5_training_validation.png`` and ``5b_train_refiner_node.png`` go to ``tests/js/artifacts/``.
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
CHROMIUM = os.environ.get("NOISECRAFT_CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")
ARTIFACTS = Path(os.environ.get("NOISECRAFT_JS_ARTIFACTS", HERE / "artifacts"))
SUBSTITUTE = {"CheckpointLoaderSimple": "NC_Test_TinyCheckpoint", "CLIPTextEncode": "NC_Test_TextEncode"}
SCRIPT_TIMEOUT_S = float(os.environ.get("NOISECRAFT_JS_TIMEOUT_S", "420"))


def build_workflow() -> dict:
    wf = copy.deepcopy(json.loads((REPO / "example_workflows" / "train_refiner.json").read_text()))
    for n in wf["nodes"]:
        if n["type"] in SUBSTITUTE:
            n["type"] = SUBSTITUTE[n["type"]]
            n.setdefault("properties", {})["Node name for S&R"] = n["type"]
        if n["type"] == "EmptyLatentImage":
            n["widgets_values"][:2] = [64, 64]
        if n["type"] == "NC_BuildTeacherCache":  # samples_per_prompt, seed, control, cfg, steps, scheduler
            n["widgets_values"][0], n["widgets_values"][4] = 2, 3
        if n["type"] == "NC_TrainRefiner":  # steps, student_steps, batch_size, learning_rate, rank, ...
            n["widgets_values"][:5] = [6, 2, 2, 0.003, 4]
    return wf


def test_training_shows_the_validation_grid_and_both_curves(server, tmp_path):
    wf = build_workflow()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    wf_path = ARTIFACTS / "workflow_training.json"
    wf_path.write_text(json.dumps(wf, indent=1))
    train_id = next(n["id"] for n in wf["nodes"] if n["type"] == "NC_TrainRefiner")
    ckpt_id = next(n["id"] for n in wf["nodes"] if n["type"] == "NC_Test_TinyCheckpoint")
    env = dict(os.environ, NC_URL=server.url, NC_WORKFLOW=str(wf_path), NC_ARTIFACTS=str(ARTIFACTS),
               NC_CHROMIUM=CHROMIUM, NC_USER_DATA=str(tmp_path / "chromium-profile"), NC_TRAIN_ID=str(train_id),
               NC_CKPT_ID=str(ckpt_id))
    proc = subprocess.run([NODE, str(HERE / "training_check.mjs")], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=SCRIPT_TIMEOUT_S)
    (ARTIFACTS / "training_check.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    assert proc.returncode == 0, (f"training_check.mjs failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                                  f"{proc.stderr[-4000:]}\n--- server log ---\n{server.log_tail(40)}")
    result = json.loads((ARTIFACTS / "training_result.json").read_text())
    assert result["ok"] is True
    for name in ("5_training_validation.png", "5b_train_refiner_node.png"):
        assert (ARTIFACTS / name).stat().st_size > 1000, name
