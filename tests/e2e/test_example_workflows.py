"""Every example workflow runs on a real ComfyUI server and saves finite, non-constant images.

The workflows are what users load (CheckpointLoaderSimple, CLIPTextEncode, VAEDecode). No
checkpoint exists here, so converting them to the API format swaps those three node types for
the test-only stand-ins of ``nc_test_pack`` (same widgets and outputs) and shrinks the empty
latent to 128x128 so a CPU run takes seconds; every other node and value is the workflow's own.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
SUBSTITUTE = {
    "CheckpointLoaderSimple": "NC_Test_TinyCheckpoint",
    "CLIPTextEncode": "NC_Test_TextEncode",
    "VAEDecode": "NC_Test_VAEDecode",
}
OVERRIDES = {"EmptyLatentImage": {"width": 128, "height": 128}}


def _converter():
    spec = importlib.util.spec_from_file_location("noisecraft_e2e_workflow_api", HERE / "workflow_api.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_there_is_one_example_workflow_per_node_with_a_thumbnail():
    names = {p.stem for p in WORKFLOWS}
    assert {"stability_select", "optimize_noise", "noise_to_latent"} <= names
    for p in WORKFLOWS:
        assert p.with_suffix(".png").is_file(), f"{p.name} has no same-name thumbnail"


def test_the_server_lists_the_examples_as_templates(server):
    templates = server.get("/workflow_templates")
    assert set(templates.get("ComfyUI-NoiseCraft", [])) >= {p.stem for p in WORKFLOWS}


def test_every_noisecraft_node_is_registered(object_info):
    for node_id in ("NC_InversionStabilitySelect", "NC_OptimizeNoise", "NC_NoiseToLatent"):
        assert node_id in object_info
        assert object_info[node_id]["category"].startswith("noisecraft/")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_runs_and_saves_images(server, object_info, path):
    ui = json.loads(path.read_text())
    used = {n["type"] for n in ui["nodes"]}
    assert used & {"NC_InversionStabilitySelect", "NC_OptimizeNoise", "NC_NoiseToLatent"}
    prompt = _converter().to_api(ui, object_info, substitute=SUBSTITUTE, overrides=OVERRIDES)
    entry = server.run_prompt(prompt, ui)
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"])[:3000]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images, f"no images saved: {entry['outputs']}"
    for img in images:
        file = server.base / "output" / img.get("subfolder", "") / img["filename"]
        assert file.is_file(), file
        arr = np.asarray(Image.open(file).convert("RGB"), dtype=np.float32)
        assert arr.shape == (128, 128, 3)
        assert np.isfinite(arr).all() and arr.std() > 1.0, f"{file} is constant"
    nc_ui = [out for out in entry["outputs"].values() if "noisecraft_scores" in out or "noisecraft_history" in out]
    assert nc_ui, "the NoiseCraft node sent no UI data"
