"""Train the shipped toy refiner (noisecraft/assets/toy_refiner.safetensors) with MSD.

Deterministic (fixed seeds, one CPU thread, deterministic algorithms); the output is byte-for-byte
reproducible. Paper settings (Ahn, Kang et al., arXiv:2412.03895, App. D) scaled to the toy:

* teacher: CFG 3 against the null class, 20 Euler (= DDIM eta 0) steps, ``normal`` schedule,
  cached once (``noisecraft.train.TeacherCache``) for ``--samples`` noises with seeds
  ``TRAIN_SEED_BASE + i`` and class ``i % 10`` as the prompt;
* student: unguided (cfg 1), 10 steps; refine at sigma_max with the class prompt;
* refiner: LoRA on every attention, conv and feed-forward layer (``noisecraft.lora.DEFAULT_TARGETS``).

Then it measures, on held-out seeds (``EVAL_SEED_BASE + i``, never trained on), the share of the
unguided -> CFG gap that refined-unguided sampling closes (classifier accuracy and latent MSE to
the CFG x0 of the same noise; 20-step sampling as in the demo), writes the asset with its metadata,
updates the "toy-refiner" entry of weights_manifest.json and prints the sha256.

    OMP_NUM_THREADS=1 python scripts/train_toy_refiner.py
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from _common import ROOT, add_asset_flags, deterministic, finish, parser

import torch  # noqa: E402

from noisecraft import ode  # noqa: E402
from noisecraft.hosts import toy  # noqa: E402
from noisecraft.hosts.toy import toy_host  # noqa: E402
from noisecraft.refine import refine_noise  # noqa: E402
from noisecraft.rng import seeded_noise  # noqa: E402
from noisecraft.sigmas import get_sigmas, noise_to_x  # noqa: E402
from noisecraft.train import RefinerTrainConfig, build_teacher_cache, train_refiner  # noqa: E402

TRAIN_SEED_BASE = 10_000
EVAL_SEED_BASE = 500_000
ASSET = ROOT / "noisecraft" / "assets" / "toy_refiner.safetensors"


@torch.no_grad()
def evaluate(model, lora, n: int, seed_base: int, steps: int = 20, cfg: float = 3.0, *, sample_model=None,
             refined_cfg: bool = True, baseline: dict | None = None) -> dict:
    """Unguided, CFG and refined-unguided on held-out seeds: accuracy, confidence, MSE to CFG x0.

    ``lora`` is on ``model``, which refines; ``sample_model`` (default ``model``) samples the noises (a
    fine-tune sampling noise that its base model refined: ``benchmarks/bench_transfer.py``). ``baseline``:
    a dict this function fills with the unguided and CFG x0 on the first call and reuses on later ones with
    the same ``sample_model`` (they do not depend on the refiner). ``refined_cfg`` adds the refined + CFG row."""
    sample_model = model if sample_model is None else sample_model
    labels = torch.arange(n) % model.num_classes
    e = torch.cat([seeded_noise(seed_base + i, (1, *model.latent_shape)) for i in range(n)])
    sigmas = get_sigmas(model.table, "normal", steps)
    kind, smax = model.table.kind, float(sigmas[0])
    unguided, guided = sample_model.denoiser(labels), sample_model.denoiser(labels, cfg=cfg)
    baseline = {} if baseline is None else baseline
    if not baseline:
        with lora.disabled():
            baseline["unguided"] = ode.sample(unguided, noise_to_x(e, kind, smax), sigmas)
            baseline["cfg"] = ode.sample(guided, noise_to_x(e, kind, smax), sigmas)
    x_u, x_c = baseline["unguided"], baseline["cfg"]
    d_base, d_lora = lora.base_and_lora(model.denoiser(labels))
    e_hat = refine_noise(e, d_base, d_lora, kind, smax)
    rows = [("unguided", x_u), ("cfg", x_c)]
    with lora.disabled():
        rows.append(("refined", ode.sample(unguided, noise_to_x(e_hat, kind, smax), sigmas)))
        if refined_cfg:
            rows.append(("refined_cfg", ode.sample(guided, noise_to_x(e_hat, kind, smax), sigmas)))
    out = {}
    for name, x in rows:
        s = toy.score_digits(x, labels)
        out[name] = {**s, "mse_to_cfg": float((x - x_c).pow(2).mean())}
    gap_acc = out["cfg"]["accuracy"] - out["unguided"]["accuracy"]
    out["gap_closed_accuracy"] = (out["refined"]["accuracy"] - out["unguided"]["accuracy"]) / gap_acc if gap_acc > 0 else float("nan")
    out["gap_closed_mse"] = 1.0 - out["refined"]["mse_to_cfg"] / out["unguided"]["mse_to_cfg"]
    out["samples"], out["seed_base"] = n, seed_base
    out["residual_rms"] = float((e_hat - e).pow(2).mean().sqrt())
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--samples", type=int, default=1024, help="teacher-cache size (training noises)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--schedule", default="cosine", choices=["constant", "cosine"])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--student-steps", type=int, default=10)
    ap.add_argument("--teacher-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    add_asset_flags(ap, ASSET, Path("/tmp/noisecraft_toy_refiner"), "teacher cache and checkpoints")
    args = ap.parse_args()

    t_all = deterministic(args.work)
    model = toy.load_toy()
    host = toy_host(model)
    teacher_sigmas = get_sigmas(model.table, "normal", args.teacher_steps)
    t0 = time.perf_counter()
    cache = build_teacher_cache(
        args.work / "teacher_cache",
        lambda c: host.denoiser(c, cfg=args.cfg),
        shape=model.latent_shape, conds=list(range(model.num_classes)), total=args.samples,
        sigmas=teacher_sigmas, kind=model.table.kind.value, base_seed=TRAIN_SEED_BASE,
        meta={"model": host.base_model, "cfg": args.cfg, "scheduler": "normal", "guidance": "cfg"},
        shard_size=256, batch_size=128,
    )
    t_cache = time.perf_counter() - t0
    print(f"teacher cache: {cache.total} samples, {2 * args.teacher_steps} passes each, {t_cache:.0f}s", flush=True)

    config = RefinerTrainConfig(
        steps=args.steps, rank=args.rank, lr=args.lr, batch_size=args.batch, lr_schedule=args.schedule,
        warmup=args.warmup, student_steps=args.student_steps, checkpoint_every=max(1, args.steps // 4),
        precision="fp32", seed=0, lora_seed=0, log_every=1,
    )

    def progress(step, total, rec):
        if step % 25 == 0 or step == total:
            print(f"  step {step}/{total} loss {rec['loss']:.5f} residual rms {rec['residual_rms']:.4f} "
                  f"({rec['wall_s']:.0f}s)", flush=True)

    result = train_refiner(
        host, cache, args.work / "run", config, progress=progress,
        metadata={"training_script": "scripts/train_toy_refiner.py", "teacher_cfg": args.cfg,
                  "teacher_steps": args.teacher_steps, "student_guidance": "none (cfg 1)",
                  "prompt": "the class label (0..9) as the condition token",
                  "train_seeds": f"{TRAIN_SEED_BASE}..{TRAIN_SEED_BASE + args.samples - 1}"},
    )
    print(f"training: {result.step} steps, {result.wall_s:.0f}s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.refiner_path, args.out)
    for extra in ("loss.png", "loss.jsonl"):
        print(f"  {args.work / 'run' / extra}")

    t0 = time.perf_counter()
    ev = evaluate(model, result.lora, args.eval_samples, EVAL_SEED_BASE, cfg=args.cfg)
    print(f"held-out evaluation ({ev['samples']} samples, seeds {EVAL_SEED_BASE}.., 20 steps), {time.perf_counter() - t0:.0f}s:")
    for name in ("unguided", "cfg", "refined", "refined_cfg"):
        r = ev[name]
        print(f"  {name:<12} accuracy {r['accuracy']:.3f}  confidence {r['confidence']:.3f}  mse to cfg {r['mse_to_cfg']:.4f}")
    print(f"  gap closed: accuracy {100 * ev['gap_closed_accuracy']:.0f}%, latent MSE {100 * ev['gap_closed_mse']:.0f}%")
    (args.work / "eval.json").write_text(json.dumps(ev, indent=2))

    finish(args, ASSET, "toy-refiner", "noise_refiner_lora", "train_toy_refiner.py", t_all)


if __name__ == "__main__":
    main()
