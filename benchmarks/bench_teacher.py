"""Benchmark: the teacher's sampler and step count, and the student sampler a refiner is used with.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_teacher.py`` (the shipped toy model, CPU; 22 minutes on 2 busy
cores with the defaults, 16 of them for the 7 refiner trainings; ``--teachers``, ``--no-seed-check``,
``--train-steps`` / ``--samples`` / ``--eval-samples`` trade time for precision).

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), App. D: the teacher is 20 DDIM
steps (= Euler in sigma space) with guidance. DPM-Solver++(2M): Lu et al., arXiv:2211.01095.

Three tables, side by side in one run (toy: cfg 3, ``normal`` schedule unless a row says otherwise):

1. **Teacher error**: the guided x0 of each sampler x step count against a converged guided reference (the same
   noises, ``--ref-sampler`` at ``--ref-steps``; its own distance to a run at twice the steps is printed as the
   reference's error), RMS over ``--error-samples`` held-out noises; model passes per sample; and the wall time
   of one teacher batch on a tiny random-weight UNet (the toy's architecture at 4x32x32, random weights).
2. **Refiners from cheaper teachers**: a refiner trained (recipe of ``scripts/train_toy_refiner.py``, shrunk
   to ``--train-steps`` steps on ``--samples`` teacher samples) from each teacher of ``--teachers``, judged on
   ``--eval-samples`` held-out noises (seeds 500000 + i, classes i % 10; the teacher's own x0 RMS as in
   table 1): refined-unguided 20-step Euler
   sampling against the *converged* guided result, as the share of the unguided -> guided gap it closes
   (latent MSE: ``1 - mse(refined, ref) / mse(unguided, ref)``; accuracy: ``(acc_refined - acc_unguided) /
   (acc_ref - acc_unguided)``). The baseline's training is repeated with another LoRA seed and data order
   (``euler-20 (seed 1)``): the spread of the training itself, against which "within 2 points" is read.
3. **Student-sampler robustness**: the euler-20-teacher refiner (trained with a 10-step Euler student on
   ``normal``) sampled unguided with each sampler x steps x schedule, against the guided result of the *same*
   sampler, steps and schedule, on ``--robust-samples`` held-out noises; the last column is the change from
   the trained setting (euler, 10, and the student's schedule, ``--student-scheduler``: normal by default).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

TRAIN_SEED_BASE = 10_000
EVAL_SEED_BASE = 500_000
CFG = 3.0


def _parse_teacher(text: str) -> tuple[str, int, str]:
    """``sampler-steps[-scheduler]``, e.g. ``euler-20``, ``dpmpp_2m-10-karras``."""
    parts = text.split("-")
    return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "normal"


def _label(sampler: str, steps: int, scheduler: str) -> str:
    return f"{sampler}-{steps}" + ("" if scheduler == "normal" else f" {scheduler}")


class Counter:
    """A denoiser that counts its calls (passes per sample = calls x passes per call)."""

    def __init__(self, d):
        self.d, self.calls = d, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.d(x, sigma)


def _rms(a, b) -> float:
    return float((a - b).pow(2).mean().sqrt())


def _mse(a, b) -> float:
    return float((a - b).pow(2).mean())


@torch.no_grad()
def _guided(model, labels, e, sampler, steps, scheduler, cfg=CFG):
    from noisecraft import solvers
    from noisecraft.sigmas import get_sigmas, noise_to_x

    s = get_sigmas(model.table, scheduler, steps)
    d = Counter(model.denoiser(labels, cfg=cfg))
    x = solvers.solve(sampler, d, noise_to_x(e, model.table.kind, float(s[0])), s)
    return x, d.calls


def _tiny_random_unet(model):
    """The toy's UNet architecture with 4 channels and random weights (seed 0), for timings at a larger latent."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global RNG: seed it, then restore it
        torch.manual_seed(0)
        return UNet2DConditionModel.from_config({**model.unet.config, "in_channels": 4, "out_channels": 4}).eval()


@torch.no_grad()
def teacher_error_table(model, a, ref, e, labels):
    from noisecraft import solvers
    from noisecraft.sigmas import get_sigmas, noise_to_x

    from noisecraft.hosts.diffusers import DiffusersDenoiser

    unet = _tiny_random_unet(model)
    g = torch.Generator().manual_seed(1)
    states, null = (torch.randn(n, 1, unet.config.cross_attention_dim, generator=g) for n in (4, 1))
    table = model.table
    x_r = torch.randn(4, 4, 32, 32, generator=g)
    cfg_d = DiffusersDenoiser(unet, table, states, null, cfg=CFG)
    rows = []
    for spec in a.error_rows:
        sampler, steps, scheduler = _parse_teacher(spec)
        x, calls = _guided(model, labels, e, sampler, steps, scheduler)
        s = get_sigmas(table, scheduler, steps)
        t0 = time.perf_counter()
        solvers.solve(sampler, cfg_d, noise_to_x(x_r, table.kind, float(s[0])), s)
        rows.append((_label(sampler, steps, scheduler), 2 * calls, _rms(x, ref), time.perf_counter() - t0))
    return rows


def _train(host, model, work: Path, a, sampler, steps, scheduler, seed=0):
    from noisecraft.sigmas import get_sigmas
    from noisecraft.train import RefinerTrainConfig, build_teacher_cache, train_refiner

    name = f"{sampler}-{steps}-{scheduler}"
    cache = build_teacher_cache(
        work / f"cache-{name}", lambda c: host.denoiser(c, cfg=CFG), shape=model.latent_shape,
        conds=list(range(model.num_classes)), total=a.samples, sigmas=get_sigmas(model.table, scheduler, steps),
        kind="eps", base_seed=TRAIN_SEED_BASE, meta={"model": host.base_model, "cfg": CFG}, shard_size=a.samples,
        batch_size=256, sampler=sampler)
    config = RefinerTrainConfig(steps=a.train_steps, rank=4, lr=1e-3, batch_size=32, lr_schedule="cosine", warmup=10,
                                student_steps=10, scheduler=a.student_scheduler, checkpoint_every=a.train_steps, seed=seed,
                                lora_seed=seed)
    return train_refiner(host, cache, work / f"run-{name}-{seed}", config).lora


@torch.no_grad()
def _refined(model, lora, labels, e):
    from noisecraft.refine import refine_noise
    from noisecraft.sigmas import get_sigmas

    smax = float(get_sigmas(model.table, "normal", 10)[0])
    d_base, d_lora = lora.base_and_lora(model.denoiser(labels))
    return refine_noise(e, d_base, d_lora, model.table.kind, smax)


def _gaps(model, labels, x_u, x_r, ref) -> tuple[float, float]:
    from noisecraft.hosts import toy

    acc = {k: toy.score_digits(x, labels)["accuracy"] for k, x in (("u", x_u), ("r", x_r), ("ref", ref))}
    gap = acc["ref"] - acc["u"]
    return (1 - _mse(x_r, ref) / _mse(x_u, ref),
            (acc["r"] - acc["u"]) / gap if gap > 0 else float("nan"))


@torch.no_grad()
def _unguided(model, labels, e, sampler="euler", steps=20, scheduler="normal"):
    return _guided(model, labels, e, sampler, steps, scheduler, cfg=1.0)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", nargs="+", default=["euler-20", "euler-15", "euler-10", "dpmpp_2m-15", "dpmpp_2m-10",
                                                "dpmpp_2m-10-karras"],
                    help="sampler-steps[-scheduler] of each refiner's teacher; the first is the baseline")
    ap.add_argument("--error-rows", nargs="+",
                    default=["euler-10", "euler-15", "euler-20", "euler-40", "dpmpp_2m-8", "dpmpp_2m-10",
                             "dpmpp_2m-15", "dpmpp_2m-20", "dpmpp_2m-10-karras", "dpmpp_2m-20-karras", "heun-5",
                             "heun-8", "heun-10"])
    ap.add_argument("--ref-sampler", default="heun")
    ap.add_argument("--ref-steps", type=int, default=40)
    ap.add_argument("--samples", type=int, default=512, help="teacher-cache size per refiner (default 512)")
    ap.add_argument("--train-steps", type=int, default=150, help="optimizer steps per refiner (default 150)")
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--error-samples", type=int, default=100)
    ap.add_argument("--robust-samples", type=int, default=200)
    ap.add_argument("--robust-samplers", nargs="+", default=["euler", "dpmpp_2m"])
    ap.add_argument("--robust-steps", nargs="+", type=int, default=[10, 20, 30])
    ap.add_argument("--robust-schedulers", nargs="+", default=["normal", "karras"])
    ap.add_argument("--student-scheduler", default="normal", help="the refiners' 10-step Euler student's schedule")
    ap.add_argument("--no-seed-check", action="store_true", help="skip the baseline's second training seed")
    a = ap.parse_args()

    from noisecraft.hosts import toy
    from noisecraft.hosts.toy import toy_host
    from noisecraft.rng import seeded_noise

    t_all = time.perf_counter()
    model = toy.load_toy()
    host = toy_host(model)
    n = max(a.eval_samples, a.error_samples, a.robust_samples)
    labels = torch.arange(n) % model.num_classes
    e = torch.cat([seeded_noise(EVAL_SEED_BASE + i, (1, *model.latent_shape)) for i in range(n)])

    # the converged guided reference, and its own error (against twice the steps, on the error samples)
    ref, _ = _guided(model, labels[:a.eval_samples], e[:a.eval_samples], a.ref_sampler, a.ref_steps, "karras")
    k = a.error_samples
    finer, _ = _guided(model, labels[:k], e[:k], a.ref_sampler, 2 * a.ref_steps, "karras")
    ref_err = _rms(ref[:k], finer)
    print(f"toy model, cfg {CFG}, {torch.get_num_threads()} thread(s); converged reference: {a.ref_sampler} "
          f"{a.ref_steps} steps karras (x0 RMS {ref_err:.4f} from {2 * a.ref_steps} steps)\n", flush=True)

    t0 = time.perf_counter()
    errors = teacher_error_table(model, a, finer, e[:k], labels[:k])
    print(f"1. teacher x0 error against the converged guided result ({k} held-out noises; wall: one batch of 4 "
          f"4x32x32 on a tiny random UNet) [{time.perf_counter() - t0:.0f} s]")
    print(f"   {'teacher':<20} {'passes':>6} {'x0 RMS':>8} {'wall s':>7}")
    for label, passes, rms, wall in errors:
        print(f"   {label:<20} {passes:>6} {rms:>8.4f} {wall:>7.3f}")
    print(flush=True)

    ne = a.eval_samples
    le, ee, rr = labels[:ne], e[:ne], ref
    x_u = _unguided(model, le, ee)
    work = Path(tempfile.mkdtemp(prefix="nc_bench_teacher_"))
    runs = [(_parse_teacher(t), 0) for t in a.teachers]
    if not a.no_seed_check:
        runs.insert(1, (runs[0][0], 1))
    results, robust_noise = [], None
    t0 = time.perf_counter()
    for (sampler, steps, scheduler), seed in runs:
        t1 = time.perf_counter()
        lora = _train(host, model, work, a, sampler, steps, scheduler, seed)
        e_hat = _refined(model, lora, le, ee)
        if robust_noise is None:
            robust_noise = _refined(model, lora, labels[:a.robust_samples], e[:a.robust_samples])
        lora.remove()
        teacher, calls = _guided(model, labels[:k], e[:k], sampler, steps, scheduler)
        x_r = _unguided(model, le, e_hat)
        gm, ga = _gaps(model, le, x_u, x_r, rr)
        label = _label(sampler, steps, scheduler) + ("" if seed == 0 else f" (seed {seed})")
        results.append((label, 2 * calls, _rms(teacher, finer),
                        gm, ga, time.perf_counter() - t1))
        print(f"   trained {label}: gap {100 * gm:.1f}% ({time.perf_counter() - t1:.0f} s)", flush=True)
    base = results[0][3]
    print(f"\n2. refiners from cheaper teachers ({a.samples} teacher samples, {a.train_steps} steps each; judged on "
          f"{ne} held-out noises, refined unguided euler-20 vs the converged guided x0) [{time.perf_counter() - t0:.0f} s]")
    print(f"   {'teacher':<22} {'passes':>6} {'teacher RMS':>11} {'MSE gap':>8} {'acc gap':>8} {'vs base':>8}")
    for label, passes, trms, gm, ga, _ in results:
        acc = "n/a" if math.isnan(ga) else f"{100 * ga:.1f}%"
        print(f"   {label:<22} {passes:>6} {trms:>11.4f} {100 * gm:>7.1f}% {acc:>8} "
              f"{100 * (gm - base):>+7.1f}")
    held = [r for r in results if "seed" not in r[0] and base - r[3] <= 0.02]
    cheapest = min(held, key=lambda r: r[1])
    print(f"   cheapest teacher within 2 points of {results[0][0]} (MSE gap): {cheapest[0]} ({cheapest[1]} passes)")
    print(flush=True)

    t0 = time.perf_counter()
    nr = a.robust_samples
    lr, er = labels[:nr], e[:nr]
    rows = []
    for sampler in a.robust_samplers:
        for scheduler in a.robust_schedulers:
            for steps in a.robust_steps:
                g, _ = _guided(model, lr, er, sampler, steps, scheduler)
                u = _unguided(model, lr, er, sampler, steps, scheduler)
                r = _unguided(model, lr, robust_noise, sampler, steps, scheduler)
                rows.append((sampler, steps, scheduler, *_gaps(model, lr, u, r, g)))
    trained = next((r for r in rows if r[:3] == ("euler", 10, a.student_scheduler)), rows[0])
    print(f"3. student-sampler robustness of the {results[0][0]} refiner (student: euler 10 {a.student_scheduler}), {nr} held-out "
          f"noises, each against the guided x0 of the same sampler, steps and schedule [{time.perf_counter() - t0:.0f} s]")
    print(f"   {'sampler':<10} {'steps':>5} {'schedule':<8} {'MSE gap':>8} {'acc gap':>8} {'vs trained':>10}")
    for sampler, steps, scheduler, gm, ga in rows:
        acc = "n/a" if math.isnan(ga) else f"{100 * ga:.1f}%"
        print(f"   {sampler:<10} {steps:>5} {scheduler:<8} {100 * gm:>7.1f}% {acc:>8} {100 * (gm - trained[3]):>+10.1f}")
    print(f"\nwhole run: {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
