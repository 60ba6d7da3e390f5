"""The training loss log and its plot: ``loss.jsonl`` (one JSON record per optimizer step) and ``loss.png``.

Used by :mod:`noisecraft.train.loop` (both trainers, NoiseRefine's MSD refiner and NPNet; papers:
Ahn, Kang et al., arXiv:2412.03895; Zhou et al., arXiv:2411.09502). Reading skips a last line cut by a
kill (the resume truncates the log to the checkpoint's step); the plot needs nothing but PIL
(raw loss in grey, running mean in black, log-scale y; the held-out validation's gap closed in blue on a
right-hand 0-100% axis when given) so that training never needs matplotlib.
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


def plot_losses(steps: Sequence[int], losses: Sequence[float], path: str | os.PathLike, title: str = "loss",
                validation: Optional[tuple[Sequence[int], Sequence[float]]] = None) -> Path:
    """A small PNG line plot (PIL only): the raw loss (grey) and its running mean (black), log-scale y;
    ``validation``: ``(steps, gap closed)`` of the held-out validation (:mod:`noisecraft.train.validation`),
    drawn in blue against a right-hand axis (0% at the bottom, 100% at the top; values outside are clipped)."""
    from PIL import Image, ImageDraw

    path = Path(path)
    w, h, left, right, top, bottom = 640, 360, 64, 16 if not validation else 48, 28, 36
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
        if validation:
            _draw_validation(draw, validation, xy, x0, x1, y0, y1, w - right, top, h - bottom)
    else:
        draw.text((left, h // 2), "not enough points to plot", fill="black")
    with atomic_write(path, "wb") as f:
        img.save(f, format="PNG")
    return path


VALIDATION_COLOR = (30, 90, 200)


def _draw_validation(draw, validation, xy, x0, x1, y0, y1, axis_x, top, bottom) -> None:
    """The gap-closed curve: its own linear y (0..1 from the bottom to the top of the frame), ticks on the right."""
    vs, vg = validation
    pts = [(int(s), min(1.0, max(0.0, float(g)))) for s, g in zip(vs, vg) if math.isfinite(float(g))]
    for frac in (0.0, 0.5, 1.0):
        py = bottom - frac * (bottom - top)
        draw.line([(axis_x, py), (axis_x + 4, py)], fill=VALIDATION_COLOR)
        draw.text((axis_x + 6, py - 6), f"{100 * frac:.0f}%", fill=VALIDATION_COLOR)
    draw.text((axis_x - 150, top + 4), "held-out gap closed", fill=VALIDATION_COLOR)
    coords = [(xy(min(max(s, x0), x1), y0)[0], bottom - g * (bottom - top)) for s, g in pts]
    if len(coords) >= 2:
        draw.line(coords, fill=VALIDATION_COLOR, width=2)
    for px, py in coords:
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], outline=VALIDATION_COLOR)
