"""Benchmark: stability selection cost vs K and micro-batch; optimizer steps to a target.

Run: ``python benchmarks/bench_stability.py`` (toy model, CPU; about a minute on 2 cores).
Everything is measured side by side in this one run, and printed as ratios:

1. ``select`` wall time for K candidates and several micro-batch sizes, relative to one
   20-step cfg generation of the same batch (the cost a user compares against).
2. The rank correlation (Spearman) of the cheap N-step score with the 20-step score, over
   ``--seeds`` seeds for three digit classes, with best-of-8's cost at N steps.
3. For both optimizers (the paper's momentum GD, our fixed-point steps): the stability after
   each step, and the number of steps each needs to reach the stability the paper's method has
   after its full 100 steps.
"""

from __future__ import annotations

import argparse

import torch

from noisecraft import ode
from noisecraft import stability as st
from noisecraft.rng import seeded_noise
from noisecraft.sigmas import get_sigmas, noise_to_x
from noisecraft.hosts.toy import load_toy

from _common import fastest, spearman


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4, help="latent batch (items) per run")
    p.add_argument("--score-steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--paper-lr", type=float, default=100.0)
    p.add_argument("--seeds", type=int, default=48, help="seeds per class for the rank correlation")
    args = p.parse_args()

    torch.set_grad_enabled(False)
    toy = load_toy()
    b = args.batch
    labels = torch.arange(b) % toy.num_classes
    shape = (b, *toy.latent_shape)
    guided = toy.denoiser(labels, cfg=args.cfg)
    unguided = toy.denoiser(labels, cfg=1.0)
    kind = toy.table.kind
    gen_sigmas = get_sigmas(toy.table, "normal", 20)
    score_sigmas = get_sigmas(toy.table, "normal", args.score_steps)
    base = seeded_noise(0, shape)

    gen = fastest(lambda: ode.sample(guided, noise_to_x(base, kind, float(gen_sigmas[0])), gen_sigmas))
    print(f"toy model, batch {b}, {torch.get_num_threads()} threads; one 20-step cfg generation: {gen * 1e3:.1f} ms")
    print(f"\n1. select: wall time / one 20-step cfg generation (score round trips of {args.score_steps} steps)")
    print(f"{'K':>4} " + " ".join(f"{'mb=' + str(m):>8}" for m in (1, 2, 4, 8, 16)) + "   passes ratio")
    for k in (2, 4, 8, 16):
        cands = torch.stack([seeded_noise(s, shape) for s in range(k)])
        cells = []
        for mb in (1, 2, 4, 8, 16):
            t = fastest(lambda: st.select(guided, cands, score_sigmas, kind, micro_batch=mb,
                                        inverse_denoiser=unguided, keep_x0=False), repeat=2)
            cells.append(f"{t / gen:8.2f}")
        passes = k * st.round_trip_passes(args.score_steps) / 40
        print(f"{k:>4} " + " ".join(cells) + f"   {passes:8.2f}")

    print(f"\n2. cheap score vs the 20-step score: Spearman over {args.seeds} seeds, classes 1, 3, 8; "
          "best-of-8 cost at N steps (8 candidates in one micro-batch, batch 1)")
    print(f"{'N':>4} {'class 1':>8} {'class 3':>8} {'class 8':>8} {'passes/gen':>11} {'wall/gen':>9}")
    ref, table = {}, {}
    for lab in (1, 3, 8):
        g1, u1 = toy.denoiser(torch.tensor([lab]), cfg=args.cfg), toy.denoiser(torch.tensor([lab]), cfg=1.0)
        cands = torch.stack([seeded_noise(s, (1, *toy.latent_shape)) for s in range(args.seeds)])
        for n in (20, 2, 3, 4, 6, 10):
            sc = st.select(g1, cands, get_sigmas(toy.table, "normal", n), kind, micro_batch=args.seeds,
                           inverse_denoiser=u1, keep_x0=False).scores[:, 0]
            if n == 20:
                ref[lab] = sc
            else:
                table.setdefault(n, []).append(spearman(sc, ref[lab]))
    g1, u1 = toy.denoiser(torch.tensor([3]), cfg=args.cfg), toy.denoiser(torch.tensor([3]), cfg=1.0)
    one = seeded_noise(0, (1, *toy.latent_shape))
    gen1 = fastest(lambda: ode.sample(g1, noise_to_x(one, kind, float(gen_sigmas[0])), gen_sigmas))
    c8 = torch.stack([seeded_noise(s, (1, *toy.latent_shape)) for s in range(8)])
    for n, rhos in table.items():
        sig = get_sigmas(toy.table, "normal", n)
        t8 = fastest(lambda: st.select(g1, c8, sig, kind, micro_batch=8, inverse_denoiser=u1, keep_x0=False))
        print(f"{n:>4} " + " ".join(f"{r:8.3f}" for r in rhos) + f" {8 * st.round_trip_passes(n) / 40:11.2f} {t8 / gen1:9.2f}")

    print("\n3. optimizer: mean stability after each step")
    paper = st.optimize(guided, base, score_sigmas, kind, method="momentum", steps=100, lr=args.paper_lr,
                        inverse_denoiser=unguided)
    paper_x = st.optimize(guided, base, score_sigmas, kind, method="momentum", steps=100, lr=args.paper_lr * 30,
                          inverse_denoiser=unguided)
    ours = st.optimize(guided, base, score_sigmas, kind, method="fixed_point", steps=20, inverse_denoiser=unguided)
    rows = [("paper momentum, lr %g" % args.paper_lr, paper), ("paper momentum, lr %g" % (args.paper_lr * 30), paper_x),
            ("fixed-point (ours)", ours)]
    target = float(paper.history[-1].mean())
    print(f"target = the paper method's stability after 100 steps at lr {args.paper_lr:g}: {target:.4f}")
    print(f"{'method':<28} {'start':>7} {'@5':>7} {'@10':>7} {'@20':>7} {'@100':>7} {'steps to target':>16}")
    for name, r in rows:
        h = r.history.mean(1)
        at = lambda i: f"{float(h[i]):7.4f}" if i < len(h) else f"{'-':>7}"
        # the running best is what optimize() returns
        best = torch.cummax(r.history, dim=0).values.mean(1)
        hit = (best >= target - 1e-6).nonzero()
        steps = int(hit[0]) if hit.numel() else None
        print(f"{name:<28} {at(0)} {at(5)} {at(10)} {at(20)} {at(100)} {str(steps) if steps is not None else '>' + str(len(h) - 1):>16}")
    print("\nEach optimizer step costs one round trip: "
          f"{st.round_trip_passes(args.score_steps)} model passes per sample at {args.score_steps} score steps.")


if __name__ == "__main__":
    main()
