"""``benchmarks/gpu_report.py``: the one-command GPU report, smoke-run at tiny sizes on the CPU.

The report's CUDA run cannot happen in CI; its rows are the same functions with device and dtype as
parameters, so ``--cpu --tiny`` runs their code here. Without ``COMFYUI_PATH`` the ComfyUI rows must
still be listed, each with the reason it did not run; the core rows run and give finite numbers.
(With ComfyUI: ``tests/nodes/test_gpu_report_comfy.py``.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_report.py"
CORE_ROWS = ["models/diffusers", "select_micro_batch", "train_step/sd15", "train_step/sdxl", "npnet_device"]
COMFY_ROWS = ["models/comfyui", "refine_cfg_ratio/sd15", "refine_cfg_ratio/sdxl", "npnet_cost/sdxl",
              "seeded_noise/contract", "dynamic_vram/train_wrappers"]
# numbers a CPU run leaves empty: CUDA peaks (and whatever bench_train_memory does not time on a CPU)
CUDA_ONLY = {"peak_bytes", "peak_bytes_mb1", "peak_bytes_mb8", "step_s"}


def noise_node_ids() -> list[str]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _gpu_rows import noise_nodes
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return [node for node, _ in noise_nodes()]


def run_report(out: Path, comfyui: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env.update(OMP_NUM_THREADS="1", **({"COMFYUI_PATH": comfyui} if comfyui else {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def check_report(out: Path, proc: subprocess.CompletedProcess, expected: dict[str, str]) -> dict:
    """rc 0; every expected row in the JSON and the markdown with the expected status (prefix);
    every number of a row that ran is finite. Returns the JSON rows by id."""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_report.json").read_text(encoding="utf-8"))
    rows = {r["id"]: r for r in report["rows"]}
    assert set(expected) <= set(rows), sorted(set(expected) - set(rows))
    md = (out / "gpu_report.md").read_text(encoding="utf-8")
    table = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    for rid, status in expected.items():
        row = rows[rid]
        assert row["status"].startswith(status), (rid, row["status"])
        assert rid in table and f"| {row['status']} |" in table[rid], (rid, table.get(rid))
        if status == "ok":
            assert row["values"] and row["summary"], rid
            for key, v in row["values"].items():
                if v is None:
                    assert key in CUDA_ONLY, (rid, key)
                elif isinstance(v, float):
                    assert math.isfinite(v), (rid, key, v)
    assert report["meta"]["device"] == "cpu" and report["meta"]["tiny"] is True
    return rows


def test_cpu_tiny_smoke_without_comfyui(tmp_path):
    proc = run_report(tmp_path, None, "--cpu", "--tiny")
    skipped = "not run: COMFYUI_PATH not set"
    expected = {**{r: "ok" for r in CORE_ROWS}, **{r: skipped for r in COMFY_ROWS},
                **{f"precision/{n}": skipped for n in noise_node_ids()}}
    rows = check_report(tmp_path, proc, expected)
    # the full-size configs the GPU run builds are the real SD1.5 / SDXL UNets
    assert rows["models/diffusers"]["values"] == {"sd15_params": 859520964, "sdxl_params": 2567463684}
    assert rows["select_micro_batch"]["values"]["scores_finite"] is True
    # on one device the canonical-sign golden noise is bit-identical
    assert rows["npnet_device"]["values"]["max_abs_canonical"] == 0.0


def test_noise_nodes_listed_from_source():
    ids = noise_node_ids()
    assert {"NC_RefineNoise", "NC_NPNetGoldenNoise", "NC_InversionStabilitySelect", "NC_OptimizeNoise",
            "NC_NoiseToLatent"} <= set(ids)
    assert "NC_LoadNPNet" not in ids and "NC_TrainRefiner" not in ids  # NPNET / REFINER outputs


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_exits_with_one_line(tmp_path):
    proc = run_report(tmp_path, None)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu --tiny" in lines[0], proc.stderr
    assert not (tmp_path / "gpu_report.json").exists()
