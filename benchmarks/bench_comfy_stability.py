"""Inversion-stability selection inside real ComfyUI: cost against a generation, and score quality.

Measures, side by side in one run, on a small random-weight SD1.5-shaped model built from
ComfyUI's own classes (CPU by default):

* the wall time of ``NC_InversionStabilitySelect`` with K = 8 candidates, relative to one
  20-step cfg generation (euler, ComfyUI's ``sample_custom``) at the same resolution, for
  score steps 2, 4 and 10;
* the Spearman rank correlation, over ``--seeds`` seeds, of each cheap score with the score of a
  20-step round trip (the full-cost score of the paper's setting).

Usage (ComfyUI checkout and its interpreter; the pack need not be installed)::

    COMFYUI_PATH=<ComfyUI checkout> OMP_NUM_THREADS=1 <ComfyUI venv python> benchmarks/bench_comfy_stability.py

Paper: Qi, Bai, Xiong, Xie, "Not All Noises Are Created Equally: Diffusion Noise Selection and
Optimization" (arXiv:2407.14041). Target (DESIGN.md): best-of-8 / one 20-step generation <= 3.0
with Spearman >= 0.8 against the 20-step score. Random weights make the *values* of the scores
meaningless for image quality; the timings and the agreement between score settings are what
this measures.
"""

from __future__ import annotations

import argparse
import logging

from _common import fastest, load_pack, setup_comfy, spearman


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8); default 256")
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--score-steps", type=int, nargs="+", default=[2, 4, 10])
    p.add_argument("--gen-steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=16, help="seeds for the rank correlation")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="timings keep the fastest of this many runs")
    p.add_argument("--gpu", action="store_true", help="let ComfyUI pick the GPU instead of --cpu")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    setup_comfy(cpu=not a.gpu)
    import torch

    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    nodes, tiny = load_pack("nodes.nodes_stability")

    model = tiny.build("sd15", seed=0)
    pos = tiny.conditioning("sd15", seed=1)
    neg = tiny.conditioning("sd15", seed=2, empty=True)
    side = a.size // 8
    latent = {"samples": torch.zeros(1, 4, side, side)}
    sched = "normal"

    def generate(seed: int):
        noise = Noise_RandomNoise(seed).generate_noise(latent)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), sched, a.gen_steps)
        return comfy.sample.sample_custom(model, noise, a.cfg, comfy.samplers.sampler_object("euler"), sigmas, pos, neg,
                                          latent["samples"], seed=seed, disable_pbar=True)

    def select(seed: int, k: int, steps: int, micro_batch: int):
        out = nodes.InversionStabilitySelect.execute(model, pos, neg, latent, seed, k, steps, a.cfg, 1.0, sched,
                                                     micro_batch, 0)
        return out.ui["noisecraft_scores"][0]

    generate(0)  # warm-up: model load, kernels
    t_gen = fastest(lambda: generate(1), a.repeats)
    full = select(1000, a.seeds, a.gen_steps, a.micro_batch)  # the reference score of every seed
    rows = []
    for steps in a.score_steps:
        t_sel = fastest(lambda: select(0, a.candidates, steps, a.micro_batch), a.repeats)
        cheap = select(1000, a.seeds, steps, a.micro_batch)
        rows.append((steps, t_sel, t_sel / t_gen, spearman(cheap, full)))

    dev = str(model.load_device)
    print(f"ComfyUI, tiny SD1.5-shaped model ({sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6:.2f}M "
          f"params), {a.size}x{a.size} (latent {side}x{side}), device {dev}, {torch.get_num_threads()} thread(s), "
          f"cfg {a.cfg}, inversion cfg 1, scheduler {sched}, micro_batch {a.micro_batch}")
    print(f"one {a.gen_steps}-step cfg generation (euler): {t_gen:.2f} s (fastest of {a.repeats})")
    print(f"Spearman reference: {a.gen_steps}-step round-trip score over {a.seeds} seeds")
    print()
    print(f"| score steps | best-of-{a.candidates} select (s) | / one {a.gen_steps}-step generation | "
          f"Spearman vs {a.gen_steps}-step score |")
    print("|---:|---:|---:|---:|")
    for steps, t_sel, ratio, rho in rows:
        print(f"| {steps} | {t_sel:.2f} | {ratio:.2f} | {rho:.2f} |")
    print()
    print(f"model passes per candidate at N score steps: 3N (2N cfg sampling + N cfg-1 inversion); "
          f"a {a.gen_steps}-step cfg generation: {2 * a.gen_steps}. "
          f"Target (DESIGN.md): ratio <= 3.0 with Spearman >= 0.8.")


if __name__ == "__main__":
    main()
