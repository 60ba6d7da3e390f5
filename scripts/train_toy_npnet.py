"""Train the shipped toy NPNet (noisecraft/assets/toy_npnet.safetensors) on re-denoise pairs.

Deterministic (fixed seeds, one CPU thread, deterministic algorithms); the output is byte-for-byte
reproducible. The paper's recipe (Zhou et al., arXiv:2411.09502, Alg. 1-2, App. A.5) scaled to the
toy model:

* pairs: ``--pairs`` noises with seeds ``TRAIN_SEED_BASE + i`` and class ``i % 10`` as the prompt;
  re-denoise sampling on the 10-step ``normal`` schedule (one step at CFG w_l = 3, the demo's cfg,
  one inversion step at w_w = 1); kept when the digit classifier's confidence in the target class
  of the cfg-3 sample from x'_T beats the one from x_T (margin 0, the paper's threshold);
* NPNet: 1 channel, 8x8, one 32-wide class token; SVD MLPs 32/64 wide with 2 heads; Swin at 32x32
  input, patch 4, width 32, 2 stages (depths 2, 2; heads 2, 4; window 4): ~0.14M parameters
  instead of Swin-T's 28M;
* training: MSE to the target noise, AdamW, one prompt per pair, batch 64, cosine schedule.

Then it measures on held-out seeds (``EVAL_SEED_BASE + i``): the pairs' MSE to the net's output
against the identity's, and 20-step cfg-3 sampling from x_T, from golden_noise(x_T) and from the
re-denoised x'_T itself (the target the net imitates): classifier accuracy and confidence. It writes
the asset, updates the "toy-npnet" entry of weights_manifest.json and prints the sha256.

    OMP_NUM_THREADS=1 python scripts/train_toy_npnet.py
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
from noisecraft.hosts.toy import toy_confidence_scorer, toy_host  # noqa: E402
from noisecraft.npnet import golden_noise  # noqa: E402
from noisecraft.rng import seeded_noise  # noqa: E402
from noisecraft.sigmas import get_sigmas, noise_to_x  # noqa: E402
from noisecraft.train import (NPNetTrainConfig, collect_pairs, npnet_config_for, re_denoise,  # noqa: E402
                              train_npnet)
from noisecraft.train.npnet import SMALL_NPNET  # noqa: E402

TRAIN_SEED_BASE = 20_000
EVAL_SEED_BASE = 600_000
ASSET = ROOT / "noisecraft" / "assets" / "toy_npnet.safetensors"


@torch.no_grad()
def evaluate(model, npnet, n: int, seed_base: int, w_l: float, w_w: float, collect_steps: int,
             steps: int = 20, cfg: float = 3.0) -> dict:
    labels = torch.arange(n) % model.num_classes
    e = torch.cat([seeded_noise(seed_base + i, (1, *model.latent_shape)) for i in range(n)])
    kind = model.table.kind
    prompt = model.cond(labels)
    t0 = time.perf_counter()
    golden = golden_noise(npnet, e, prompt)
    npnet_s = time.perf_counter() - t0
    target = re_denoise(model.denoiser(labels, cfg=w_l), model.denoiser(labels, cfg=w_w), e,
                        get_sigmas(model.table, "normal", collect_steps), kind)
    sigmas = get_sigmas(model.table, "normal", steps)
    smax = float(sigmas[0])
    guided = model.denoiser(labels, cfg=cfg)
    out = {"samples": n, "seed_base": seed_base, "npnet_s": npnet_s,
           "pair_mse_identity": float((e - target).pow(2).mean()),
           "pair_mse_npnet": float((golden - target).pow(2).mean()),
           "change_rms_npnet": float((golden - e).pow(2).mean().sqrt()),
           "change_rms_target": float((target - e).pow(2).mean().sqrt())}
    for name, z in (("cfg", e), ("golden_cfg", golden), ("re_denoised_cfg", target)):
        out[name] = toy.score_digits(ode.sample(guided, noise_to_x(z, kind, smax), sigmas), labels)
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--pairs", type=int, default=2048)
    ap.add_argument("--w-l", type=float, default=3.0)
    ap.add_argument("--w-w", type=float, default=1.0)
    ap.add_argument("--collect-steps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--no-filter", action="store_true", help="keep every pair (no classifier filter)")
    add_asset_flags(ap, ASSET, Path("/tmp/noisecraft_toy_npnet"), "pairs and checkpoints")
    args = ap.parse_args()

    t_all = deterministic(args.work)
    model = toy.load_toy()
    host = toy_host(model)
    t0 = time.perf_counter()
    pairs = collect_pairs(args.work / "pairs", host, total=args.pairs, w_l=args.w_l, w_w=args.w_w,
                          steps=args.collect_steps, base_seed=TRAIN_SEED_BASE,
                          scorer=None if args.no_filter else toy_confidence_scorer(), margin=0.0,
                          shard_size=512, batch_size=128, shape=model.latent_shape)
    kept = int(pairs.column("kept").sum())
    print(f"pairs: {pairs.total} collected, {kept} kept, {time.perf_counter() - t0:.0f}s", flush=True)

    config = NPNetTrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch, lr_schedule="cosine", warmup=20,
                              checkpoint_every=max(1, args.steps // 4), seed=0, init_seed=0)

    def progress(step, total, rec):
        if step % 100 == 0 or step == total:
            print(f"  step {step}/{total} loss {rec['loss']:.5f} (identity {rec['identity_mse']:.5f}) "
                  f"alpha {rec['alpha']:.3f} beta {rec['beta']:.3f} ({rec['wall_s']:.0f}s)", flush=True)

    result = train_npnet(pairs, args.work / "run", config, npnet_config_for(pairs, **SMALL_NPNET),
                         progress=progress, metadata={
                             "training_script": "scripts/train_toy_npnet.py",
                             "prompt": "the toy's class token (ToyModel.cond(label)) [1, 1, 32]",
                             "train_seeds": f"{TRAIN_SEED_BASE}..{TRAIN_SEED_BASE + args.pairs - 1}"})
    print(f"training: {result.step} steps, {result.wall_s:.0f}s; {args.work / 'run' / 'loss.png'}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.npnet_path, args.out)

    npnet = toy.load_toy_npnet(args.out)
    ev = evaluate(model, npnet, args.eval_samples, EVAL_SEED_BASE, args.w_l, args.w_w, args.collect_steps)
    print(f"held-out ({ev['samples']} samples, seeds {EVAL_SEED_BASE}..): pair MSE identity "
          f"{ev['pair_mse_identity']:.5f} -> NPNet {ev['pair_mse_npnet']:.5f}; change rms NPNet "
          f"{ev['change_rms_npnet']:.4f}, target {ev['change_rms_target']:.4f}; NPNet {ev['npnet_s'] * 1000:.0f} ms")
    for name in ("cfg", "golden_cfg", "re_denoised_cfg"):
        print(f"  {name:<16} accuracy {ev[name]['accuracy']:.3f}  confidence {ev[name]['confidence']:.4f}")
    (args.work / "eval.json").write_text(json.dumps(ev, indent=2))

    finish(args, ASSET, "toy-npnet", "toy_npnet", "train_toy_npnet.py", t_all)


if __name__ == "__main__":
    main()
