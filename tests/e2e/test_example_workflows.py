"""Every example workflow runs on a real ComfyUI server and saves finite, non-constant images.

The workflows are what users load (CheckpointLoaderSimple, CLIPTextEncode, VAEDecode). No
checkpoint exists here, so converting them to the API format swaps those three node types for
the test-only stand-ins of ``nc_test_pack`` (same widgets and outputs) and shrinks the empty
latent to 128x128 so a CPU run takes seconds; every other node and value is the workflow's own.
(For the NPNet example the tiny model is SDXL-shaped, with 2048-wide text, and NPNet Golden Noise
runs on a 16x16 latent through its any-resolution policy.) The NPNet files the examples load are
written into the server's models/npnet with seeded random weights (nothing is downloaded).
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
NC_NODES = {"NC_InversionStabilitySelect", "NC_OptimizeNoise", "NC_NoiseToLatent", "NC_LoadNPNet",
            "NC_NPNetGoldenNoise"}
REPORTING_NODES = {"NC_InversionStabilitySelect", "NC_OptimizeNoise"}  # the nodes that send UI data
NPNET_FILES = {"sdxl.safetensors": "sdxl"}  # file name in the examples -> preset of the random stand-in


def _converter():
    spec = importlib.util.spec_from_file_location("noisecraft_e2e_workflow_api", HERE / "workflow_api.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_there_is_one_example_workflow_per_node_with_a_thumbnail():
    names = {p.stem for p in WORKFLOWS}
    assert {"stability_select", "optimize_noise", "noise_to_latent", "npnet_golden_noise"} <= names
    for p in WORKFLOWS:
        assert p.with_suffix(".png").is_file(), f"{p.name} has no same-name thumbnail"


def test_the_server_lists_the_examples_as_templates(server):
    templates = server.get("/workflow_templates")
    assert set(templates.get("ComfyUI-NoiseCraft", [])) >= {p.stem for p in WORKFLOWS}


def test_every_noisecraft_node_is_registered(object_info):
    for node_id in sorted(NC_NODES):
        assert node_id in object_info
        assert object_info[node_id]["category"].startswith("noisecraft/")


@pytest.fixture(scope="session")
def npnet_files(server):
    """models/npnet/<name> in the server's base folder: seeded random NPNets of the examples' presets."""
    from noisecraft.npnet import random_npnet, save_npnet_safetensors

    folder = server.base / "models" / "npnet"
    folder.mkdir(parents=True, exist_ok=True)
    for name, preset in NPNET_FILES.items():
        if not (folder / name).is_file():
            save_npnet_safetensors(random_npnet(preset, seed=0), folder / name)
    return folder


def _npnet_names(ui: dict) -> set:
    return {n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "NC_LoadNPNet"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_runs_and_saves_images(server, object_info, npnet_files, path):
    ui = json.loads(path.read_text())
    used = {n["type"] for n in ui["nodes"]}
    assert used & NC_NODES
    assert _npnet_names(ui) <= set(NPNET_FILES), "add the example's NPNet file to NPNET_FILES"
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
    if used & REPORTING_NODES:
        nc_ui = [out for out in entry["outputs"].values() if "noisecraft_scores" in out or "noisecraft_history" in out]
        assert nc_ui, "the NoiseCraft node sent no UI data"


def test_a_missing_npnet_file_fails_with_a_clear_error(server, object_info, npnet_files):
    ui = json.loads((REPO / "example_workflows" / "npnet_golden_noise.json").read_text())
    prompt = _converter().to_api(ui, object_info, substitute=SUBSTITUTE, overrides=OVERRIDES)
    loader = next(n for n in prompt.values() if n["class_type"] == "NC_LoadNPNet")
    loader["inputs"]["npnet_name"] = "missing.safetensors"
    entry = server.run_prompt(prompt, ui)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "NC_LoadNPNet"
    assert "'missing.safetensors' not found" in errors[0]["exception_message"]
    assert "models/npnet" in errors[0]["exception_message"].replace("\\", "/")
