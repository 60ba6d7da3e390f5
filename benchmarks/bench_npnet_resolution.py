"""Benchmark: NPNet golden noise at any latent size, sign invariance, half precision.

Paper: Zhou et al., *Golden Noise for Diffusion Models: A Learning Framework*, arXiv:2411.09502.
Run: ``python benchmarks/bench_npnet_resolution.py`` (CPU, a few minutes on 2 cores; ``--device cuda``
works too). Nothing is downloaded: the NPNet is the SDXL preset with seeded random weights
(``random_npnet``), a stand-in for the official weights. What is measured is the *noise path*
around the net, which does not depend on what the weights learned: does the output keep the
statistics of Gaussian noise, or does the resampling duplicate / smooth values?

1. Statistics of the output, ours (``resolution="residual"``: band-limited 128x128 view, residual
   at the trained size, band-limited carry-back added to the original noise) against the peers'
   resize-to-128-and-back (``"resize"``, nearest-exact both ways as ComfyUI-Golden-Noise does) and a
   bilinear resize-and-back, for 64x64, 96x160, 128x128, 192x192 latents (4 channels):
   per-element std, lag-1 autocorrelation (horizontal, vertical), and the radial power spectrum as
   mean power in the low band (|f| < 1/8 cycle/pixel) and the high band (|f| > 3/8), per element,
   so white unit noise reads 1.00 / 1.00 (HF/LF ratio 1.00). The input noise is the first row.
2. Singular-vector signs: a random half of the SVD pairs flipped (u_i, v_i -> -u_i, -v_i: the same
   matrix, another SVD implementation's choice): max-abs change of the golden noise without and with
   ``canonical_signs``, for the stand-in weights (golden_scale 0.1) and 10x larger ones (1.0); and the
   float32 SVD replaced by a float64 one (a proxy for another device's rounding), which shows the
   floor any two devices differ by anyway. Then how often the sign convention itself is ambiguous.
3. Half precision: a float16 / bfloat16 module against the float32 one.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from noisecraft.npnet import (
    canonicalize_svd_signs,
    from_trained_size,
    golden_noise,
    random_npnet,
    to_trained_size,
)

from _common import fastest

SIZES = ((64, 64), (96, 160), (128, 128), (192, 192))


def lag1(x: torch.Tensor) -> tuple[float, float]:
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    var = (x * x).mean()
    return (float((x[..., :, 1:] * x[..., :, :-1]).mean() / var),
            float((x[..., 1:, :] * x[..., :-1, :]).mean() / var))


def band_power(x: torch.Tensor) -> tuple[float, float]:
    """Mean power per element in the low (|f| < 1/8) and high (|f| > 3/8) radial bands (white unit = 1)."""
    x = x.double() - x.double().mean(dim=(-2, -1), keepdim=True)
    h, w = x.shape[-2:]
    p = (torch.fft.fft2(x).abs() ** 2 / (h * w)).mean(dim=(0, 1))
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.fftfreq(w, dtype=torch.float64)
    r = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    low = (r > 0) & (r < 0.125)
    return float(p[low].mean()), float(p[r > 0.375].mean())


def resize_bilinear(model, noise, prompt):
    """Resize-and-back with bilinear interpolation (the other resize a peer could use)."""
    s = model.config.latent_size
    h, w = noise.shape[-2:]
    small = F.interpolate(noise, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        out = model(small, prompt, canonical_signs=True)
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)


def stats_row(latent: str, name: str, x: torch.Tensor, noise: torch.Tensor, seen) -> str:
    lh, lv = lag1(x)
    lf, hf = band_power(x)
    change = f"{float((x - noise).std()):.3f}" if x is not noise else "-"
    net = "-" if seen is None else f"{sum(lag1(seen)) / 2:+.3f}"
    return (f"| {latent:<7} | {name:<20} | {float(x.std()):5.3f} | {lh:+6.3f} | {lv:+6.3f} | {lf:4.2f} | {hf:4.2f} "
            f"| {hf / lf:4.2f} | {change:>6} | {net:>6} |")


def section_resolution(model, prompt, args) -> None:
    print("\n## 1. Output statistics by latent size (4 channels, SDXL preset, seeded random weights; "
          f"{args.batch} noises per size)\n")
    print("| latent  | method               |  std  | lag1 h | lag1 v |  LF  |  HF  | HF/LF | change | net in |")
    print("|---------|----------------------|-------|--------|--------|------|------|-------|--------|--------|")
    g = torch.Generator().manual_seed(args.seed)
    s = model.config.latent_size
    for h, w in SIZES:
        noise = torch.randn(args.batch, 4, h, w, generator=g).to(args.device)
        rows = [
            ("input noise", noise, None),
            ("ours (residual)", golden_noise(model, noise, prompt), to_trained_size(noise, s)),
            ("resize nearest-exact", golden_noise(model, noise, prompt, resolution="resize"),
             F.interpolate(noise, size=(s, s), mode="nearest-exact")),
            ("resize bilinear", resize_bilinear(model, noise, prompt),
             F.interpolate(noise, size=(s, s), mode="bilinear", align_corners=False, antialias=True)),
        ]
        for name, x, seen in rows:
            print(stats_row(f"{h}x{w}", name, x.cpu(), noise.cpu(), None if seen is None else seen.cpu()))
    print("\nLF / HF: mean power per element below 1/8 and above 3/8 cycle/pixel (white unit noise = 1.00).\n"
          "change: std of (output - input noise). net in: mean lag-1 autocorrelation of the 128x128 noise the\n"
          "net was given (0 for white noise). At 128x128 all methods are the official output.")
    # cost of the resampling around the net
    noise = torch.randn(1, 4, 192, 192, generator=g).to(args.device)
    x128 = to_trained_size(noise, s)
    t_net = fastest(lambda: model(x128, prompt, canonical_signs=True))
    t_all = fastest(lambda: golden_noise(model, noise, prompt))
    t_rs = fastest(lambda: from_trained_size(to_trained_size(noise, s), 192, 192))
    print(f"\nTime at 192x192, one item: net forward {1000 * t_net:.0f} ms, golden_noise {1000 * t_all:.0f} ms, "
          f"the two resamplings alone {1000 * t_rs:.1f} ms.")


class FlippingSVD:
    """torch.linalg.svd replacement: flips a random half of the singular pairs, or runs in float64."""

    def __init__(self, mode: str, seed: int = 0):
        self.mode, self.g, self.orig = mode, torch.Generator().manual_seed(seed), torch.linalg.svd

    def __call__(self, a, full_matrices=True, **kw):
        if self.mode == "float64":
            u, s, vh = self.orig(a.double(), full_matrices=full_matrices, **kw)
            return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)
        u, s, vh = self.orig(a, full_matrices=full_matrices, **kw)
        flip = torch.where(torch.rand(s.shape, generator=self.g) < 0.5, -1.0, 1.0).to(s)
        return u * flip.unsqueeze(-2), s, vh * flip.unsqueeze(-1)

    def __enter__(self):
        torch.linalg.svd = self
        return self

    def __exit__(self, *exc):
        torch.linalg.svd = self.orig


def section_signs(prompt, args) -> None:
    print("\n## 2. Singular-vector signs (128x128 and 96x160 latents)\n")
    print("| weights (golden_scale) | latent | flipped pairs: max-abs change, official | with canonical_signs "
          "| float64 SVD: official | canonical | change of the net |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(args.seed + 1)
    for scale in (0.1, 1.0):
        model = random_npnet("sdxl", seed=args.seed, golden_scale=scale, device=args.device)
        for h, w in ((128, 128), (96, 160)):
            noise = torch.randn(2, 4, h, w, generator=g).to(args.device)
            res = {}
            for canonical in (False, True):
                base = golden_noise(model, noise, prompt, canonical_signs=canonical)
                with FlippingSVD("flip", seed=3):
                    flipped = golden_noise(model, noise, prompt, canonical_signs=canonical)
                with FlippingSVD("float64"):
                    f64 = golden_noise(model, noise, prompt, canonical_signs=canonical)
                res[canonical] = (float((flipped - base).abs().max()), float((f64 - base).abs().max()))
            change = float((base - noise).abs().max())
            print(f"| random ({scale}) | {h}x{w} | {res[False][0]:.2e} | {res[True][0]:.2e} "
                  f"| {res[False][1]:.2e} | {res[True][1]:.2e} | {change:.2f} |")
    # how close the convention comes to an ambiguity on Gaussian noise, against SVD rounding
    x = torch.randn(64, 256, 256, generator=g)
    u32, _, vh32 = torch.linalg.svd(x)
    u64, _, _ = torch.linalg.svd(x.double())
    top2 = u32.abs().topk(2, dim=-2)
    vals = torch.gather(u32, -2, top2.indices)
    opposite = (vals[..., 0, :].sign() != vals[..., 1, :].sign())
    gap = (top2.values[..., 0, :] - top2.values[..., 1, :])[opposite]
    c32, _ = canonicalize_svd_signs(u32, vh32)
    c64, _ = canonicalize_svd_signs(u64.float(), vh32)
    differ = int((c32 * c64).sum(dim=-2).lt(0).sum())
    err = float((u32.abs() - u64.float().abs()).abs().amax(dim=-2).median())
    n = c32.shape[0] * 256
    print(f"\nConvention robustness, {n} singular vectors of {x.shape[0]} Gaussian 256x256 matrices: the two "
          f"largest |entries| of a vector have opposite signs and a gap below 1e-5 (about the float32 SVD's "
          f"rounding; median float32-vs-float64 entry error {err:.1e}) in {int((gap < 1e-5).sum())} of {n} "
          f"vectors (smallest gap {float(gap.min()):.1e}, median {float(gap.median()):.1e}); canonical signs "
          f"that differ between the float32 and the float64 SVD here: {differ} of {n}. Only such a vector can\n"
          f"still come out with another sign on another device, and it moves one of the 256 pairs.")


def section_precision(model, prompt, args) -> None:
    print("\n## 3. Half-precision module against float32 (SVD in float32 in all cases)\n")
    print("| module dtype | latent | max-abs vs float32 | mean-abs | ms per item |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(args.seed + 2)
    noises = {hw: torch.randn(1, 4, *hw, generator=g).to(args.device) for hw in ((128, 128), (96, 160))}
    refs = {hw: golden_noise(model, n, prompt) for hw, n in noises.items()}
    for dtype in (torch.float16, torch.bfloat16):
        half = copy.deepcopy(model).to(dtype)
        for hw, n in noises.items():
            t0 = time.perf_counter()
            out = golden_noise(half, n, prompt)
            dt = time.perf_counter() - t0
            d = (out - refs[hw]).abs()
            print(f"| {str(dtype).replace('torch.', '')} | {hw[0]}x{hw[1]} | {float(d.max()):.4f} "
                  f"| {float(d.mean()):.5f} | {1000 * dt:.0f} |")
        del half


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="noises per latent size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip-precision", action="store_true", help="skip section 3 (slow on CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = random_npnet("sdxl", seed=args.seed, device=args.device)
    prompt = torch.randn(1, 77, 2048, generator=torch.Generator().manual_seed(args.seed + 100)).to(args.device)
    print(f"# NPNet any-resolution benchmark (device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print("The NPNet has seeded random weights (random_npnet, golden_scale 0.1): a stand-in for the official "
          "weights. The statistics measure the noise path (resampling, residual), not what a trained net does.")
    section_resolution(model, prompt, args)
    section_signs(prompt, args)
    if not args.skip_precision:
        section_precision(model, prompt, args)


if __name__ == "__main__":
    main()
