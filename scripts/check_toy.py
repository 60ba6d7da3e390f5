"""Quality and speed check of the shipped toy model (noisecraft/assets/).

For 20 samples per class (fixed generator seeds), sample with a 20-step ``normal`` schedule
(Euler = DDIM) unguided (cfg=1) and guided at each --cfg, score x0 with the shipped digit
classifier, and time one 20-step cfg batch of 64 on one thread.

    OMP_NUM_THREADS=1 python scripts/check_toy.py [--cfg 2 3 4 5] [--assets DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from noisecraft import ode  # noqa: E402
from noisecraft.hosts import toy  # noqa: E402
from noisecraft.sigmas import get_sigmas, noise_to_x  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cfg", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0])
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--assets", type=Path, default=None, help="read weights from this folder instead")
    ap.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the samples here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.assets is not None:
        toy.UNET_WEIGHTS = args.assets / "toy_unet.safetensors"
        toy.UNET_CONFIG = args.assets / "toy_unet_config.json"
        toy.CLASSIFIER_WEIGHTS = args.assets / "toy_classifier.safetensors"
        toy._read_config.cache_clear()
        toy._cached_classifier.cache_clear()

    model = toy.load_toy()
    labels = torch.arange(model.num_classes).repeat_interleave(args.per_class)
    e = model.noise(labels.numel(), torch.Generator().manual_seed(args.seed))
    sigmas = get_sigmas(model.table, "normal", args.steps)
    x_t = noise_to_x(e, model.table.kind, float(sigmas[0]))
    print(f"{labels.numel()} samples, {args.steps} steps normal, seed {args.seed}")
    print(f"{'cfg':>5} {'accuracy':>9} {'confidence':>11} {'passes':>7} {'time':>7}")
    grids = []
    with torch.no_grad():
        for cfg in [1.0] + list(args.cfg):
            d = model.denoiser(labels, cfg=cfg)
            t0 = time.perf_counter()
            x0 = ode.sample(d, x_t, sigmas)
            dt = time.perf_counter() - t0
            s = toy.score_digits(x0, labels)
            grids.append(x0)
            print(f"{cfg:5.1f} {s['accuracy']:9.3f} {s['confidence']:11.3f} {d.passes:7d} {dt:6.2f}s")

        # timing: one 20-step cfg batch of 64
        lab = torch.arange(64) % model.num_classes
        d = model.denoiser(lab, cfg=args.cfg[0])
        xb = noise_to_x(model.noise(64, torch.Generator().manual_seed(0)), model.table.kind, float(sigmas[0]))
        ode.sample(d, xb, sigmas[:3])  # warm up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            ode.sample(d, xb, sigmas)
            times.append(time.perf_counter() - t0)
        d1 = model.denoiser(lab, cfg=1.0)
        t0 = time.perf_counter()
        ode.sample(d1, xb, sigmas)
        t1 = time.perf_counter() - t0
        print(f"one {args.steps}-step cfg batch of 64, 1 thread: {min(times):.3f}s (min of 3; {times}); cfg=1: {t1:.3f}s")

    if args.grid is not None:
        from PIL import Image

        rows = []
        for x0 in grids:
            # first 10 samples of each class side by side
            x = x0.reshape(model.num_classes, args.per_class, 8, 8)[:, :10]
            x = x.permute(0, 2, 1, 3).reshape(model.num_classes * 8, 10 * 8)
            rows.append(x)
        img = torch.cat(rows, dim=1).clamp(-1, 1).add(1).mul(127.5).round().byte().numpy()
        Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(args.grid)
        print(f"grid written to {args.grid} (columns: cfg 1, {args.cfg}; rows: classes)")


if __name__ == "__main__":
    main()
