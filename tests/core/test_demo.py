"""The demo's whole path on a small configuration: table, JSON and PNG."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from noisecraft.demo import DemoConfig, format_gap, format_table, gap_summary, run_demo


def test_small_demo_writes_results_and_grid(tmp_path):
    cfg = DemoConfig(per_class=1, candidates=2, paper_steps=2, fixed_point_steps=2, score_steps=3, steps=6)
    rows = run_demo(tmp_path, cfg)
    methods = [r.method for r in rows]
    assert methods[0].startswith("unguided") and methods[1].startswith("cfg")
    assert len(rows) == 8
    assert methods[5] == "refined unguided (cfg 1)" and methods[6].startswith("refined + cfg")
    assert methods[7].startswith("golden noise (NPNet) + cfg")
    for r in rows:
        assert 0.0 <= r.accuracy <= 1.0 and 0.0 < r.confidence <= 1.0
        assert -1.0 <= r.stability_before <= 1.0
        assert r.passes_per_sample >= 6 and r.wall_s > 0
    assert rows[1].passes_per_sample == 2 * rows[0].passes_per_sample  # cfg costs two passes a step
    # search rows never end below where they started: they keep the most stable noise seen
    assert all(r.stability_after >= r.stability_before - 1e-6 for r in rows[2:5])
    # NoiseRefine rows: 2 refiner passes + the sampling; every row has a latent MSE to the cfg x0
    assert rows[5].passes_per_sample == 2 + cfg.steps and rows[6].passes_per_sample == 2 + 2 * cfg.steps
    # NPNet is not a model pass: the golden-noise row costs what the cfg row costs, plus NPNet's time
    assert rows[7].passes_per_sample == rows[1].passes_per_sample and 0 < rows[7].extra["npnet_s"] < rows[7].wall_s
    assert rows[1].mse_to_cfg == 0.0 and all(r.mse_to_cfg is not None and r.mse_to_cfg >= 0 for r in rows)
    assert rows[5].mse_to_cfg < rows[0].mse_to_cfg  # refined unguided lands closer to the cfg result
    gap = gap_summary(rows)
    assert gap is not None and gap["latent_mse"] > 0 and "gap" in format_gap(gap)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in data["rows"]] == methods
    assert data["gap_closed_by_refined_unguided"]["latent_mse"] == pytest.approx(gap["latent_mse"])
    img = Image.open(tmp_path / "samples.png")
    assert img.size[0] > 200 and img.size[1] > 5 * 8
    table = format_table(rows)
    assert all(m in table for m in methods)


def test_cli_help_lists_demo():
    out = subprocess.run([sys.executable, "-m", "noisecraft", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "train-refiner" in out.stdout
