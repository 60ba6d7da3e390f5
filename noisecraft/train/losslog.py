"""The training loss log and its plot: ``loss.jsonl`` (one JSON record per optimizer step) and ``loss.png``.

Used by :mod:`noisecraft.train.loop` (both trainers, NoiseRefine's MSD refiner and NPNet; papers:
Ahn, Kang et al., arXiv:2412.03895; Zhou et al., arXiv:2411.09502). Reading skips a last line cut by a
kill (the resume truncates the log to the checkpoint's step); the plot needs nothing but PIL
(raw loss in grey, running mean in black, log-scale y) so that training never needs matplotlib.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from ..io import atomic_write

__all__ = ["read_log", "plot_losses"]


def read_log(path: Path, upto_step: Optional[int] = None) -> list[dict]:
    """The records of a ``loss.jsonl`` (up to ``upto_step``); a line cut by a kill is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if upto_step is None or int(rec.get("step", 0)) <= upto_step:
            out.append(rec)
    return out


def plot_losses(steps: Sequence[int], losses: Sequence[float], path: str | os.PathLike, title: str = "loss") -> Path:
    """A small PNG line plot (PIL only): the raw loss (grey) and its running mean (black), log-scale y."""
    from PIL import Image, ImageDraw

    path = Path(path)
    w, h, left, right, top, bottom = 640, 360, 64, 16, 28, 36
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    pts = [(int(s), float(v)) for s, v in zip(steps, losses) if math.isfinite(float(v)) and float(v) > 0]
    if len(pts) >= 2:
        xs, ys = [p[0] for p in pts], [math.log10(p[1]) for p in pts]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-3
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad

        def xy(s, ly):
            return (left + (s - x0) / (x1 - x0) * (w - left - right), top + (y1 - ly) / (y1 - y0) * (h - top - bottom))

        draw.rectangle([left, top, w - right, h - bottom], outline="black")
        for frac in (0.0, 0.5, 1.0):
            ly = y0 + frac * (y1 - y0)
            _, py = xy(x0, ly)
            draw.line([(left - 4, py), (left, py)], fill="black")
            draw.text((4, py - 6), f"{10 ** ly:.3g}", fill="black")
        for frac in (0.0, 0.5, 1.0):
            s = x0 + frac * (x1 - x0)
            px, _ = xy(s, y0)
            draw.line([(px, h - bottom), (px, h - bottom + 4)], fill="black")
            draw.text((px - 10, h - bottom + 8), f"{s:.0f}", fill="black")
        draw.text((w // 2 - 20, h - 14), "step", fill="black")
        draw.line([xy(s, ly) for s, ly in zip(xs, ys)], fill=(180, 180, 180), width=1)
        k = max(1, len(ys) // 25)
        smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
        draw.line([xy(s, ly) for s, ly in zip(xs, smooth)], fill="black", width=2)
    else:
        draw.text((left, h // 2), "not enough points to plot", fill="black")
    with atomic_write(path, "wb") as f:
        img.save(f, format="PNG")
    return path
