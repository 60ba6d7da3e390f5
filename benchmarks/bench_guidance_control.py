"""Benchmark: guidance-scale control (a refiner with the CFG scale as input) vs the strength knob, on the toy.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_guidance_control.py`` (the shipped toy model, CPU, a few
minutes; ``--steps`` / ``--samples`` trade time for quality).

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 4 "Controllability"
and App. A.4: the training-free control scales the refiner's residual (our ``strength``), the
training-based one conditions the refiner on the guidance scale (:mod:`noisecraft.guidance_embed`).

Side by side in one run, with the recipe of ``scripts/train_toy_refiner.py`` (teacher 20 Euler steps,
student 10 unguided steps, rank 4, AdamW 1e-3 cosine, batch 32) and the same budget for both refiners:

* a *conditioned* refiner trained on a teacher cache whose samples each get their own CFG scale in
  ``--range`` (default 1.5..5; :func:`noisecraft.guidance_embed.scale_draws`);
* a *plain* refiner trained at the toy's default cfg 3: by default the shipped toy refiner, which
  ``scripts/train_toy_refiner.py`` trains with exactly these settings (``--train-plain`` retrains it here).

Then, on held-out seeds (``500000 + i``, classes ``i % 10``) and 20-step sampling, for each CFG scale g of
``--scales``: the latent MSE of the refined cfg-1 x0 to the CFG-g x0 of the same noise, for: no refiner
(plain cfg-1 sampling), the plain refiner at strength 1, the plain refiner at the strength that is best *for
that scale on these very samples* (an oracle over ``--strengths``: the training-free control at its best),
and the conditioned refiner given guidance = g (at strength 1). The classifier accuracy of each is printed
next to it; ``cfg acc`` is the CFG-g samples' own.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

TRAIN_SEED_BASE = 10_000
EVAL_SEED_BASE = 500_000


def _train(host, model, work: Path, a, guidance_range=None):
    from noisecraft.sigmas import get_sigmas
    from noisecraft.train import RefinerTrainConfig, build_teacher_cache, train_refiner
    from noisecraft.train.teacher_cache import per_sample_teacher

    teacher = per_sample_teacher(host) if guidance_range else (lambda c: host.denoiser(c, cfg=a.cfg))
    cache = build_teacher_cache(
        work / "cache", teacher, shape=model.latent_shape, conds=list(range(model.num_classes)), total=a.samples,
        sigmas=get_sigmas(model.table, "normal", 20), kind="eps", base_seed=TRAIN_SEED_BASE,
        meta={"model": host.base_model, "cfg": list(guidance_range) if guidance_range else a.cfg},
        shard_size=256, batch_size=128, guidance_range=guidance_range)
    config = RefinerTrainConfig(steps=a.steps, rank=4, lr=1e-3, batch_size=32, lr_schedule="cosine", warmup=10,
                                student_steps=10, checkpoint_every=a.steps, seed=0, lora_seed=0,
                                guidance_range=guidance_range)
    result = train_refiner(host, cache, work / "run", config)
    return result.lora


@torch.no_grad()
def main() -> None:
    from noisecraft import ode
    from noisecraft.hosts import toy
    from noisecraft.refine import refine_noise
    from noisecraft.rng import seeded_noise
    from noisecraft.sigmas import get_sigmas, noise_to_x

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024, help="teacher-cache size per refiner (default 1024)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per refiner (default 300)")
    ap.add_argument("--range", type=float, nargs=2, default=(1.5, 5.0), metavar=("LO", "HI"))
    ap.add_argument("--cfg", type=float, default=3.0, help="the plain refiner's teacher scale (default 3)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0, 5.0])
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--train-plain", action="store_true",
                    help="train the plain refiner here too (default: the shipped toy refiner, which "
                         "scripts/train_toy_refiner.py makes with these settings at cfg 3)")
    a = ap.parse_args()
    torch.set_num_threads(1)

    model = toy.load_toy()
    host = toy.toy_host(model)
    t0 = time.perf_counter()
    tmpdir = tempfile.TemporaryDirectory()
    tmp = tmpdir.name
    with torch.enable_grad():
        cond_lora = _train(host, model, Path(tmp) / "conditioned", a, tuple(a.range))
        t_cond = time.perf_counter() - t0
        cond_path = Path(tmp) / "conditioned.safetensors"
        cond_lora.save(cond_path)
        cond_lora.remove()  # one refiner on the UNet at a time
        if a.train_plain:
            plain_lora = _train(host, model, Path(tmp) / "plain", a)
        else:  # scripts/train_toy_refiner.py: this recipe at cfg 3 (its metadata says so), bit for bit
            plain_lora = toy.load_toy_refiner(model)[1]
        t_plain = time.perf_counter() - t0 - t_cond
        cond_lora = None
    plain = f"trained {t_plain:.0f}s" if a.train_plain else "the shipped toy refiner"
    print(f"conditioned ({a.range[0]:g}..{a.range[1]:g}): trained {t_cond:.0f}s; plain (cfg {a.cfg:g}): {plain}; "
          f"{a.samples} teacher samples and {a.steps} steps each", flush=True)

    n = a.eval_samples
    labels = torch.arange(n) % model.num_classes
    e = torch.cat([seeded_noise(EVAL_SEED_BASE + i, (1, *model.latent_shape)) for i in range(n)])
    sigmas = get_sigmas(model.table, "normal", 20)
    smax = float(sigmas[0])
    unguided = model.denoiser(labels)

    def sample(noise, cfg=1.0):  # the attached refiner is disabled outside its own base_and_lora pass
        return ode.sample(model.denoiser(labels, cfg=cfg) if cfg != 1.0 else unguided,
                          noise_to_x(noise, "eps", smax), sigmas)

    plain_lora.enabled = False
    residual = refine_noise(e, *plain_lora.base_and_lora(unguided), "eps", smax) - e
    x_plain = {s: sample(e + s * residual) for s in a.strengths}
    plain_lora.remove()
    from noisecraft.hosts.adapters import load_lora

    cond_lora = load_lora(model.unet, cond_path)  # through the refiner file: the round trip is measured too
    cond_lora.enabled = False
    x_none = sample(e)

    def mse(x, ref):
        return float((x - ref).pow(2).mean())

    def acc(x):
        return toy.score_digits(x, labels)["accuracy"]

    rows, rms = [], {}
    for g in a.scales:
        x_cfg = sample(e, g)
        e_cond = refine_noise(e, *cond_lora.base_and_lora(unguided, guidance=g), "eps", smax)
        rms[g] = float((e_cond - e).pow(2).mean().sqrt())
        x_cond = sample(e_cond)
        best = min(a.strengths, key=lambda s: mse(x_plain[s], x_cfg))
        rows.append((g, acc(x_cfg), mse(x_none, x_cfg), acc(x_none), mse(x_plain[1.0], x_cfg), acc(x_plain[1.0]),
                     best, mse(x_plain[best], x_cfg), acc(x_plain[best]), mse(x_cond, x_cfg), acc(x_cond)))
    cond_lora.remove()
    tmpdir.cleanup()

    head = ("| cfg g | cfg acc | no refiner | plain s=1 | plain best s (s) | conditioned, guidance=g |\n"
            "|---|---|---|---|---|---|")
    print(f"\nlatent MSE to the CFG-g x0 of the same noise (accuracy), {n} held-out samples, 20 steps:\n{head}")
    for g, ca, mn, an, m1, a1, s, mb, ab, mc, ac in rows:
        print(f"| {g:g} | {ca:.3f} | {mn:.4f} ({an:.3f}) | {m1:.4f} ({a1:.3f}) | {mb:.4f} ({ab:.3f}) (s={s:g}) "
              f"| **{mc:.4f}** ({ac:.3f}) |")
    mean = lambda i: sum(r[i] for r in rows) / len(rows)  # noqa: E731
    print(f"| mean | | {mean(2):.4f} | {mean(4):.4f} | {mean(7):.4f} | **{mean(9):.4f}** |")
    print(f"residual RMS |e_hat - e|: plain refiner {float(residual.pow(2).mean().sqrt()):.3f} x s; conditioned: "
          + ", ".join(f"{g:g}: {v:.3f}" for g, v in rms.items()))
    print(f"\nconditioned / plain-best-s MSE, per scale: "
          + ", ".join(f"{r[0]:g}: {r[9] / r[7]:.2f}" for r in rows) + f"  ({time.perf_counter() - t0:.0f}s in all)")


if __name__ == "__main__":
    main()
