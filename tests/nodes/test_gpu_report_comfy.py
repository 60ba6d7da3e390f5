"""Tier 2: ``benchmarks/gpu_report.py --cpu --tiny`` with ``COMFYUI_PATH`` set, so that the ComfyUI rows
(refine vs cfg timing, NPNet cost, every NOISE/LATENT node in fp16 / bf16 against fp32) run for real on
the tiny models, in a subprocess as a user runs the script. The checks are the core smoke test's
(``tests/core/test_gpu_report.py``), with every row expected to run.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _core_test():
    path = REPO / "tests" / "core" / "test_gpu_report.py"
    spec = importlib.util.spec_from_file_location("nc_core_test_gpu_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_tiny_smoke_with_comfyui(tmp_path):
    core = _core_test()
    proc = core.run_report(tmp_path, os.environ["COMFYUI_PATH"], "--cpu", "--tiny")
    nodes = core.noise_node_ids()
    expected = {r: "ok" for r in [*core.CORE_ROWS, *core.COMFY_ROWS, *(f"precision/{n}" for n in nodes)]}
    expected["dynamic_vram/train_wrappers"] = "not run: "  # CUDA only (and newer ComfyUI); its control runs here
    rows = core.check_report(tmp_path, proc, expected)
    check_comfy_rows(rows, nodes)


def check_comfy_rows(rows: dict, nodes: list[str]) -> None:
    """The numbers of the ComfyUI rows of a ``--cpu --tiny`` report (shared with the offline-bundle test)."""
    # ComfyUI's classes with the report's full-size configs are the real SD1.5 / SDXL UNets
    assert rows["models/comfyui"]["values"] == {"sd15_params": 859520964, "sdxl_params": 2567463684}
    for family in ("sd15", "sdxl"):
        v = rows[f"refine_cfg_ratio/{family}"]["values"]
        assert v["refined_s"] > 0 and v["cfg_s"] > 0 and v["limit"] == 22 / 40
    for n in nodes:
        v = rows[f"precision/{n}"]["values"]
        assert v["fp16_finite"] and v["bf16_finite"], n
        # the noise is unit-scale: a half-precision copy off by a quarter of its standard deviation anywhere
        # would be a different noise (bf16's 8-bit mantissa gives ~0.05 through the tiny models)
        assert v["fp16_max_abs"] < 0.25 and v["bf16_max_abs"] < 0.25, (n, v)
    assert rows["seeded_noise/contract"]["values"]["equal"] == 6
    assert rows["seeded_noise/contract"]["values"]["rng_touched"] == 0
    # the dynamic-VRAM row's control (the plain ModelPatcher): every adapter attached, and given a gradient by one
    # backward pass through the model loaded in inference mode, as Train Refiner runs
    plain = rows["dynamic_vram/train_wrappers"]["values"]
    assert plain["plain_missing"] == 0 and plain["plain_error"] is None
    assert plain["plain_grads"] == plain["plain_adapters"] > 0
    assert plain["plain_refined_finite"] is True
