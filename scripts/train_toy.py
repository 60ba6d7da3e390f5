"""Train the shipped toy model and digit classifier (noisecraft/assets/).

Deterministic (fixed seed, one CPU thread). Data: scikit-learn's bundled ``load_digits`` (1797
8x8 images, 0..16 -> [-1, 1]); a stratified 80/20 split, the 20% never seen by either model.

  (a) a small diffusers UNet2DConditionModel, eps-prediction on SD's scaled_linear 1000-step
      schedule, class-conditioned by cross-attention on one learned token (nn.Embedding(11, D),
      index 10 = null class, label dropout to it) so classifier-free guidance works;
  (b) an MLP digit classifier, trained on clean and slightly noisy inputs.

Writes toy_unet.safetensors (keys unet.* and class_embedding.weight), toy_unet_config.json,
toy_classifier.safetensors, and prints their sha256.

    OMP_NUM_THREADS=1 python scripts/train_toy.py
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from _common import ROOT, parser, shown

import torch  # noqa: E402
from torch import nn  # noqa: E402

from noisecraft.hosts.toy import DigitClassifier, digits_to_x  # noqa: E402
from noisecraft.io import atomic_write_text, write_safetensors  # noqa: E402
from noisecraft.sigmas import scaled_linear_alphas_cumprod  # noqa: E402
from noisecraft.weights import sha256_file  # noqa: E402

NUM_CLASSES = 10
NULL_CLASS = 10
CROSS_DIM = 32


def unet_config() -> dict:
    return dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=[16, 32, 32],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = list(range(len(d.target)))
    tr, te = train_test_split(idx, test_size=0.2, random_state=seed, stratify=d.target)
    x = digits_to_x(torch.from_numpy(d.images)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(d.target).long()
    return x[tr], y[tr], x[te], y[te]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def train_classifier(xtr, ytr, xte, yte, args, gen) -> tuple[DigitClassifier, dict]:
    model = DigitClassifier(64, (256, 256), NUM_CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=args.cls_lr, weight_decay=1e-2)
    n = xtr.shape[0]
    t0 = time.perf_counter()
    for step in range(args.cls_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.cls_steps, args.cls_lr, 100)
        i = torch.randint(0, n, (args.batch,), generator=gen)
        x, y = xtr[i], ytr[i]
        # half the batch clean, half with Gaussian noise of std U(0, 0.5): robust to sampler output
        std = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * 0.5
        std[: x.shape[0] // 2] = 0
        x = x + std * torch.randn(x.shape, generator=gen)
        model.train()
        loss = nn.functional.cross_entropy(model(x), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0:
            print(f"  classifier step {step + 1}/{args.cls_steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(-1) == yte).float().mean().item()
        g2 = torch.Generator().manual_seed(args.seed + 7)
        noisy = xte + 0.2 * torch.randn(xte.shape, generator=g2)
        acc_noisy = (model(noisy).argmax(-1) == yte).float().mean().item()
    return model, {"test_accuracy": acc, "test_accuracy_noise0.2": acc_noisy}


def train_unet(xtr, ytr, args, gen):
    from diffusers import UNet2DConditionModel

    cfg = unet_config()
    unet = UNet2DConditionModel(**cfg)
    emb = nn.Embedding(NUM_CLASSES + 1, CROSS_DIM)
    nn.init.normal_(emb.weight, std=1.0)
    params = list(unet.parameters()) + list(emb.parameters())
    nparams = sum(p.numel() for p in params)
    print(f"unet: {nparams} parameters ({nparams * 4 / 2**20:.2f} MiB fp32)", flush=True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4, betas=(0.9, 0.99))
    ac = scaled_linear_alphas_cumprod().to(torch.float32)
    n = xtr.shape[0]
    t0 = time.perf_counter()
    running = None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        i = torch.randint(0, n, (args.batch,), generator=gen)
        x0, y = xtr[i], ytr[i].clone()
        drop = torch.rand(y.shape, generator=gen) < args.label_dropout
        y[drop] = NULL_CLASS
        t = torch.randint(0, ac.numel(), (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        unet.train()
        pred = unet(xt, t, encoder_hidden_states=emb(y)[:, None, :], return_dict=False)[0]
        loss = nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 100 == 0 or step == 0:
            el = time.perf_counter() - t0
            print(
                f"  unet step {step + 1}/{args.steps} loss {running:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{el:.0f}s (eta {el / (step + 1) * (args.steps - step - 1):.0f}s)",
                flush=True,
            )
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return unet, emb, cfg, nparams, time.perf_counter() - t0


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300, help="UNet optimizer steps (few on purpose: unguided stays clearly below CFG)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--label-dropout", type=float, default=0.12)
    ap.add_argument("--cls-steps", type=int, default=3000)
    ap.add_argument("--cls-lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=ROOT / "noisecraft" / "assets")
    ap.add_argument("--skip-classifier", action="store_true", help="keep the existing classifier file")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)  # module initialisation only; data, noise and t use `gen`
    args.out.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = load_data(args.seed)
    print(f"digits: {xtr.shape[0]} train, {xte.shape[0]} held out", flush=True)
    t_all = time.perf_counter()

    paths = []
    if not args.skip_classifier:
        gen = torch.Generator().manual_seed(args.seed + 1)
        clf, stats = train_classifier(xtr, ytr, xte, yte, args, gen)
        print(f"classifier: held-out accuracy {stats['test_accuracy']:.4f}, with noise 0.2: {stats['test_accuracy_noise0.2']:.4f}", flush=True)
        p = args.out / "toy_classifier.safetensors"
        write_safetensors(
            clf.state_dict(),
            p,
            metadata={
                "what": "noisecraft toy digit classifier: MLP 64-256-256-10 (GELU) on load_digits x = pixel/8 - 1, clamped to [-1, 1]",
                "seed": str(args.seed),
                "steps": str(args.cls_steps),
                "held_out_accuracy": f"{stats['test_accuracy']:.4f}",
                "script": "scripts/train_toy.py",
            },
        )
        paths.append(p)

    gen = torch.Generator().manual_seed(args.seed + 2)
    unet, emb, cfg, nparams, secs = train_unet(xtr, ytr, args, gen)
    print(f"unet training: {secs:.0f}s", flush=True)
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors["class_embedding.weight"] = emb.weight
    p = args.out / "toy_unet.safetensors"
    write_safetensors(
        tensors,
        p,
        metadata={
            "what": "noisecraft toy diffusion model: diffusers UNet2DConditionModel (unet.*) + class token "
            "nn.Embedding(11, 32) (class_embedding.weight, 10 = null); eps-prediction, SD scaled_linear 1000 steps; "
            "8x8x1 load_digits, x = pixel/8 - 1",
            "seed": str(args.seed),
            "steps": str(args.steps),
            "batch": str(args.batch),
            "label_dropout": str(args.label_dropout),
            "ema": str(args.ema),
            "parameters": str(nparams),
            "script": "scripts/train_toy.py",
        },
    )
    paths.append(p)
    full = dict(unet.config)
    full = {k: (list(v) if isinstance(v, tuple) else v) for k, v in full.items() if not k.startswith("_")}
    full["_class_name"] = "UNet2DConditionModel"
    full["_noisecraft_toy"] = {
        "num_classes": NUM_CLASSES,
        "null_class": NULL_CLASS,
        "class_embedding": "class_embedding.weight in toy_unet.safetensors, states [B, 1, cross_attention_dim]",
        "prediction": "eps",
        "schedule": "scaled_linear beta 0.00085..0.012, 1000 steps",
        "data": "sklearn.datasets.load_digits, x = pixel / 8 - 1, 1x8x8",
        "seed": args.seed,
        "steps": args.steps,
    }
    p = args.out / "toy_unet_config.json"
    atomic_write_text(p, json.dumps(full, indent=2, sort_keys=True) + "\n")
    paths.append(p)
    print(f"total wall time {time.perf_counter() - t_all:.0f}s", flush=True)
    for p in paths:
        print(f"{sha256_file(p)}  {shown(p)}  ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
