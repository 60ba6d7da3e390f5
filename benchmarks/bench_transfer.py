"""Benchmark: a refiner trained on the base model, used with fine-tunes of it (two wirings), on the toy.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_transfer.py`` (the shipped toy model, CPU, one thread;
``--ref-steps`` / ``--ref-samples`` / ``--eval-samples`` trade time for precision).

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Tab. 4: a refiner trained
on SD2.1 used zero-shot on fine-tunes of it. Two ways to wire that differ:

* (a) refine with the *base* model + the refiner LoRA (the paper's g_phi), sample the refined noise with the
  fine-tune;
* (b) put the refiner LoRA on the *fine-tune* (refine and sample with the fine-tune).

The fine-tunes are made here from the shipped toy model (``noisecraft/assets``), each with the toy's own loss
(eps MSE, label dropout 0.12 to the null class) on the training digits of ``scripts/train_toy.py`` in a
shifted style, seeded, AdamW, no EMA; the class tokens (the toy's "text encoder") stay frozen:

* ``contrast``: every weight, ``--ft-steps`` steps, strokes brightened (pixel p -> 16 (p / 16)^0.5);
* ``thick``: every weight, ``--ft-steps`` steps, strokes thickened (p -> max(p, 0.75 * 3x3 max-pool(p)));
* ``thick, LoRA``: a rank-``--ft-lora-rank`` LoRA (peft, on the refiner's target layers) trained
  ``--ft-steps`` steps on the thick digits, then merged into the weights (as a user merges a style LoRA).

For the base model and each fine-tune, on ``--eval-samples`` held-out seeds (``500000 + i``, class ``i % 10``,
20 Euler steps, cfg 3: the README's toy figures, ``scripts/train_toy_refiner.py``'s ``evaluate``): the share of
the model's own unguided -> CFG gap (classifier accuracy, latent MSE to the CFG x0 of the same noise) that
refined unguided sampling closes with (a), (b), and a reference refiner trained on that fine-tune (the recipe
of ``scripts/train_toy_refiner.py``, ``--ref-steps`` steps on ``--ref-samples`` teacher samples; on the base
model with the same settings too, so the reference column is one recipe; at the default recipe that is the
shipped refiner itself, which ``scripts/train_toy_refiner.py`` trains with it). Distance of each model from the
base: relative change of the UNet weights, and the latent MSE between its CFG x0 and the base's.

Cost: the fine-tunes and 500-sample evaluations alone (``--no-reference``) take a few minutes; each reference
refiner adds its teacher cache (``--ref-samples`` x 40 passes) and training (``--ref-steps`` MSD steps at batch 32).
The script prints its wall time; the README gives both.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # the toy scripts' data split and evaluation

from train_toy import NULL_CLASS, load_data  # noqa: E402
from train_toy_refiner import EVAL_SEED_BASE, TRAIN_SEED_BASE, evaluate  # noqa: E402

STYLES = ("contrast", "thick")
SHIPPED_STEPS, SHIPPED_SAMPLES = 300, 1024  # scripts/train_toy_refiner.py's defaults: the shipped toy refiner


def restyle(x: torch.Tensor, style: str) -> torch.Tensor:
    """Digits in model space [-1, 1] in another style (see the module docstring)."""
    p = (x + 1.0) * 8.0  # back to load_digits' 0..16
    if style == "contrast":
        p = 16.0 * (p / 16.0).clamp_min(0).sqrt()
    elif style == "thick":
        p = torch.maximum(p, 0.75 * torch.nn.functional.max_pool2d(p, 3, stride=1, padding=1))
    else:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    return p / 8.0 - 1.0


def finetune(base, x: torch.Tensor, y: torch.Tensor, a, seed: int, lora_rank: int = 0):
    """A copy of the toy model ``base`` trained ``a.ft_steps`` more steps on ``(x, y)`` (full, or a merged LoRA)."""
    from noisecraft.hosts.adapters import attach_lora
    from noisecraft.lora import DEFAULT_TARGETS
    from noisecraft.sigmas import scaled_linear_alphas_cumprod

    model = copy.copy(base)
    model.unet = copy.deepcopy(base.unet)
    unet = model.unet
    gen = torch.Generator().manual_seed(seed)
    lora = None
    if lora_rank:
        lora = attach_lora(unet, lora_rank, targets=DEFAULT_TARGETS, seed=seed)
        params = list(lora.parameters())
    else:
        unet.requires_grad_(True)
        params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=a.ft_lr * (10 if lora_rank else 1), weight_decay=1e-4, betas=(0.9, 0.99))
    ac = scaled_linear_alphas_cumprod().to(torch.float32)
    unet.train()
    for step in range(a.ft_steps):
        for g in opt.param_groups:
            g["lr"] = opt.defaults["lr"] * min(1.0, (step + 1) / 20)
        i = torch.randint(0, x.shape[0], (a.ft_batch,), generator=gen)
        x0, lab = x[i], y[i].clone()
        lab[torch.rand(lab.shape, generator=gen) < 0.12] = NULL_CLASS
        t = torch.randint(0, ac.numel(), (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        al = ac[t].view(-1, 1, 1, 1)
        pred = unet(al.sqrt() * x0 + (1 - al).sqrt() * eps, t, encoder_hidden_states=model.cond(lab),
                    return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    unet.eval().requires_grad_(False)
    if lora is not None:  # merge: W += (alpha / rank) up @ down, then take the adapter off
        merged = {lora.module_names[k]: (d, u, al) for k, (d, u, al) in lora.pairs().items()}
        lora.remove()
        with torch.no_grad():
            for name, (down, up, alpha) in merged.items():
                w = unet.get_submodule(name).weight
                w += (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    return model


def weight_change(base, model) -> float:
    """||theta - theta_base|| / ||theta_base|| over the UNet's weights."""
    num = den = 0.0
    b = base.unet.state_dict()
    for k, v in model.unet.state_dict().items():
        num += float((v.double() - b[k].double()).pow(2).sum())
        den += float(b[k].double().pow(2).sum())
    return math.sqrt(num / den)


def train_reference(model, work: Path, a):
    """A refiner trained on ``model`` with the recipe of ``scripts/train_toy_refiner.py`` (attached; .remove() it)."""
    from noisecraft.hosts.toy import toy_host
    from noisecraft.sigmas import get_sigmas
    from noisecraft.train import RefinerTrainConfig, build_teacher_cache, train_refiner

    host = toy_host(model)
    cache = build_teacher_cache(
        work / "cache", lambda c: host.denoiser(c, cfg=a.cfg), shape=model.latent_shape,
        conds=list(range(model.num_classes)), total=a.ref_samples, sigmas=get_sigmas(model.table, "normal", 20),
        kind=model.table.kind.value, base_seed=TRAIN_SEED_BASE, meta={"model": host.base_model, "cfg": a.cfg},
        shard_size=256, batch_size=128)
    config = RefinerTrainConfig(steps=a.ref_steps, rank=4, lr=1e-3, batch_size=32, lr_schedule="cosine", warmup=10,
                                student_steps=10, checkpoint_every=a.ref_steps, precision="fp32", seed=0, lora_seed=0)
    with torch.enable_grad():
        return train_refiner(host, cache, work / "run", config).lora


def pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.0f}%"


def main() -> None:
    from noisecraft.hosts import toy
    from noisecraft.hosts.adapters import load_lora

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ft-steps", type=int, default=300, help="fine-tuning steps per fine-tune (default 300)")
    ap.add_argument("--ft-batch", type=int, default=64)
    ap.add_argument("--ft-lr", type=float, default=5e-4, help="full fine-tunes; the LoRA fine-tune uses 10x")
    ap.add_argument("--ft-lora-rank", type=int, default=8)
    ap.add_argument("--ref-steps", type=int, default=SHIPPED_STEPS, help="reference refiner steps (default: the "
                    "shipped refiner's 300; 150 steps on 512 samples closes only 39%% of the base's MSE gap)")
    ap.add_argument("--ref-samples", type=int, default=SHIPPED_SAMPLES, help="reference teacher samples (default 1024)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference refiners (a few minutes)")
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t_all, c_all = time.perf_counter(), time.process_time()

    base = toy.load_toy()
    xtr, ytr, _, _ = load_data(0)  # scripts/train_toy.py's split: the held-out digits stay unseen
    models = {"base": base}
    for i, (name, style, rank) in enumerate((("contrast", "contrast", 0), ("thick", "thick", 0),
                                             ("thick, LoRA", "thick", a.ft_lora_rank))):
        t0 = time.perf_counter()
        models[name] = finetune(base, restyle(xtr, style), ytr, a, a.seed + 100 + i, rank)
        print(f"fine-tune {name!r}: {a.ft_steps} steps, {time.perf_counter() - t0:.0f}s", flush=True)

    shipped = toy.REFINER_WEIGHTS
    results, base_cfg = {}, None
    tmp = tempfile.TemporaryDirectory()
    for name, model in models.items():
        t0 = time.perf_counter()
        baseline: dict = {}  # this model's unguided and CFG x0, shared by its rows
        row = {"weight_change": weight_change(base, model)}
        lora = load_lora(base.unet, shipped)  # (a): the base model refines
        try:
            row["a"] = evaluate(base, lora, a.eval_samples, EVAL_SEED_BASE, cfg=a.cfg, sample_model=model,
                                refined_cfg=False, baseline=baseline)
        finally:
            lora.remove()
        if model is not base:  # (b): the refiner on the fine-tune
            lora = load_lora(model.unet, shipped)
            try:
                row["b"] = evaluate(model, lora, a.eval_samples, EVAL_SEED_BASE, cfg=a.cfg, refined_cfg=False,
                                    baseline=baseline)
            finally:
                lora.remove()
        if base_cfg is None:
            base_cfg = baseline["cfg"]
        row["cfg_shift"] = float((baseline["cfg"] - base_cfg).pow(2).mean())
        if not a.no_reference:
            if model is base and (a.ref_steps, a.ref_samples, a.cfg) == (SHIPPED_STEPS, SHIPPED_SAMPLES, 3.0):
                lora = load_lora(base.unet, shipped)  # this very recipe on the base: the shipped refiner
            else:
                lora = train_reference(model, Path(tmp.name) / name.replace(", ", "_"), a)
            try:
                row["ref"] = evaluate(model, lora, a.eval_samples, EVAL_SEED_BASE, cfg=a.cfg, refined_cfg=False,
                                      baseline=baseline)
            finally:
                lora.remove()
        results[name] = row
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
    tmp.cleanup()

    print(f"\nshare of each model's own unguided -> cfg {a.cfg:g} gap closed by refined unguided sampling, "
          f"{a.eval_samples} held-out samples (latent MSE | accuracy):\n")
    ref = "" if a.no_reference else f" refiner trained on it ({a.ref_steps} st) |"
    print(f"| model | weight change | cfg x0 shift from base | unguided / cfg acc | (a) base refines |"
          f" (b) refiner on the fine-tune |{ref}")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if ref else ""))
    for name, r in results.items():
        a_ = r["a"]
        cells = [f"{100 * r['weight_change']:.1f}%", f"{r['cfg_shift']:.4f}",
                 f"{a_['unguided']['accuracy']:.3f} / {a_['cfg']['accuracy']:.3f}",
                 f"{pct(a_['gap_closed_mse'])} / {pct(a_['gap_closed_accuracy'])}"]
        b = r.get("b")
        cells.append("= (a)" if b is None else f"{pct(b['gap_closed_mse'])} / {pct(b['gap_closed_accuracy'])}")
        if "ref" in r:
            cells.append(f"{pct(r['ref']['gap_closed_mse'])} / {pct(r['ref']['gap_closed_accuracy'])}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results}, indent=2))
    print(f"\nwall time {time.perf_counter() - t_all:.0f}s, CPU time {time.process_time() - c_all:.0f}s (1 thread; "
          f"the wall time grows when other jobs share the cores)")


if __name__ == "__main__":
    main()
