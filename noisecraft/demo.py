"""``python -m noisecraft demo``: every method on the shipped toy model, one results table.

For a fixed set of seeds and classes (``per_class`` samples of each digit), each row turns the
same starting noises into samples and scores them with the shipped digit classifier:

* ``unguided``: 20 Euler steps at cfg 1 (1 model pass per step).
* ``cfg``: 20 steps at cfg ``DemoConfig.cfg`` (2 passes per step).
* ``cfg + best-of-K``: the most inversion-stable of K seeds per sample (round trips of
  ``score_steps`` steps, sampling at the cfg, inversion at cfg 1), then the 20-step cfg sample.
* ``cfg + optimize (paper)`` / ``(fixed-point)``: the noise optimized for stability by the
  paper's momentum GD or by our fixed-point steps, then the 20-step cfg sample. The paper's
  100 steps cost 100 round trips plus their backward passes per sample, most of the demo's time
  if run on every sample, so it runs on the first ``paper_samples`` samples (one of each class by
  default; the row's label says how many) and reports its wall time per sample in
  ``extra["wall_s_per_sample"]``; the fixed-point row's "steps to the paper's stability" is
  compared on the same samples.

* ``refined unguided (cfg 1)``: NoiseRefine (Ahn, Kang et al., arXiv:2412.03895) with the shipped
  toy refiner LoRA (``noisecraft/assets/toy_refiner.safetensors``): the noise is refined once at
  sigma_max with the class prompt (2 passes), then sampled for 20 steps without guidance.
* ``refined + cfg``: the refined noise sampled with CFG (the paper's Table 6 case).
* ``golden noise (NPNet) + cfg``: NPNet (Zhou et al., arXiv:2411.09502) with the shipped toy NPNet
  (``noisecraft/assets/toy_npnet.safetensors``, trained on re-denoise pairs of the toy model):
  ``golden_noise`` of the base noise with the class token as the prompt, then the 20-step cfg
  sample. NPNet is not a model pass (passes = the cfg row's); its time is in the row's wall time
  and in ``extra["npnet_s"]``.

Columns: classifier accuracy and mean confidence of the target class; latent MSE of each row's x0
to the CFG row's x0 from the same noise (0 for the CFG row itself); the stability of the noise
each row finally samples from (``before -> after`` for search and refined rows); model passes per
sample (search and refinement included); wall time of the row. :func:`gap_summary` gives the share
of the unguided -> CFG gap that refined-unguided sampling closes (accuracy and latent MSE).
Writes ``results.json`` and ``samples.png`` to ``--out``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import ode
from . import stability as st
from .rng import seeded_noise
from .sigmas import get_sigmas, noise_to_x

logger = logging.getLogger(__name__)

__all__ = ["DemoConfig", "Row", "run_demo", "format_table", "gap_summary", "save_grid"]


@dataclass
class DemoConfig:
    seed: int = 1000
    per_class: int = 3
    steps: int = 20
    scheduler: str = "normal"
    cfg: float = 3.0
    score_steps: int = 6
    candidates: int = 8
    micro_batch: int = 8
    paper_steps: int = 100
    paper_lr: float = 100.0
    paper_samples: int = 10  # the paper's optimizer runs on the first this-many samples (0 or >= all: all)
    fixed_point_steps: int = 20
    fixed_point_patience: int = 4
    grid_columns: int = 10
    refiner: bool = True  # add the NoiseRefine rows (needs noisecraft/assets/toy_refiner.safetensors)
    npnet: bool = True  # add the golden-noise row (needs noisecraft/assets/toy_npnet.safetensors)


@dataclass
class Row:
    method: str
    accuracy: float
    confidence: float
    stability_before: float
    stability_after: Optional[float]
    passes_per_sample: int
    wall_s: float
    extra: dict = field(default_factory=dict)
    mse_to_cfg: Optional[float] = None


class _Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def format_table(rows: list[Row]) -> str:
    head = f"{'method':<40} {'acc':>6} {'conf':>6} {'mse cfg':>8} {'stability':>17} {'passes':>7} {'wall s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        stab = f"{r.stability_before:.4f}"
        if r.stability_after is not None:
            stab += f" -> {r.stability_after:.4f}"
        mse = "-" if r.mse_to_cfg is None else f"{r.mse_to_cfg:.4f}"
        lines.append(
            f"{r.method:<40} {r.accuracy:>6.3f} {r.confidence:>6.3f} {mse:>8} {stab:>17} {r.passes_per_sample:>7d} {r.wall_s:>7.2f}"
        )
    return "\n".join(lines)


def gap_summary(rows: list[Row]) -> Optional[dict]:
    """Share of the unguided -> CFG gap closed by refined-unguided sampling (None without those rows).

    Accuracy: ``(acc_refined - acc_unguided) / (acc_cfg - acc_unguided)`` (NaN when CFG is not better);
    latent MSE to the CFG x0: ``1 - mse_refined / mse_unguided``.
    """
    by = {r.method: r for r in rows}
    u, c = rows[0], rows[1]
    ref = by.get("refined unguided (cfg 1)")
    if ref is None or u.mse_to_cfg is None or ref.mse_to_cfg is None:
        return None
    gap = c.accuracy - u.accuracy
    return {
        "accuracy": (ref.accuracy - u.accuracy) / gap if gap > 0 else float("nan"),
        "latent_mse": 1.0 - ref.mse_to_cfg / u.mse_to_cfg if u.mse_to_cfg > 0 else float("nan"),
        "speed_passes": ref.passes_per_sample / c.passes_per_sample,
    }


def format_gap(summary: Optional[dict]) -> str:
    if summary is None:
        return "(no refined rows: the unguided -> CFG gap closed is not measured)"
    acc = summary["accuracy"]
    acc_text = "n/a (cfg is not more accurate than unguided on these samples)" if math.isnan(acc) else f"{100 * acc:.0f}%"
    return (f"refined unguided closes {acc_text} of the unguided -> cfg accuracy gap and "
            f"{100 * summary['latent_mse']:.0f}% of the latent-MSE gap (to the cfg x0 of the same noise), "
            f"at {summary['speed_passes']:.2f}x the cfg model passes")


def save_grid(images: dict[str, torch.Tensor], path: Path, columns: int, scale: int = 4) -> None:
    """One row of ``columns`` samples per method, 8x8 digits upscaled, method names on the left."""
    from PIL import Image, ImageDraw

    names = list(images)
    h, w = next(iter(images.values())).shape[-2:]
    cell_h, cell_w, pad = h * scale, w * scale, 2
    label_w = 200
    width = label_w + columns * (cell_w + pad)
    height = len(names) * (cell_h + pad) + pad
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        y = pad + r * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 5), name, fill=0)
        x0 = images[name][:columns, 0].float().clamp(-1, 1)
        pix = ((1.0 - (x0 + 1.0) / 2.0) * 255).round().to(torch.uint8)  # dark digits on white
        for c in range(pix.shape[0]):
            tile = Image.fromarray(pix[c].numpy(), mode="L").resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (cell_w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _refined_rows(toy, cfg, sigma_max, base, base_stability, unguided, guided, generate, score, add, log) -> None:
    """The NoiseRefine rows: refine once at sigma_max (2 passes), then sample unguided / with CFG."""
    from .refine import refine_noise
    from .hosts.toy import REFINER_WEIGHTS, load_toy_refiner

    if not REFINER_WEIGHTS.is_file():
        log(f"skipping the refined rows: {REFINER_WEIGHTS} is missing (python scripts/train_toy_refiner.py makes it)")
        return
    _, lora = load_toy_refiner(toy)
    try:
        kind = toy.table.kind
        d_base, d_lora = lora.base_and_lora(unguided)
        for method, denoiser, passes in (
            ("refined unguided (cfg 1)", unguided, 2 + cfg.steps),
            (f"refined + cfg {cfg.cfg:g}", guided, 2 + 2 * cfg.steps),
        ):
            with _Timer() as t:
                e_hat = refine_noise(base, d_base, d_lora, kind, sigma_max)
                with lora.disabled():
                    x0 = generate(e_hat, denoiser)
            with lora.disabled():
                after = float(score(e_hat).mean())
            add(method, x0, base_stability, after, passes, t.s,
                residual_rms=float((e_hat - base).pow(2).mean().sqrt()))
    finally:
        lora.remove()


def _golden_row(toy, cfg, labels, base, base_stability, guided, generate, score, add, log) -> None:
    """The NPNet row: golden noise from the class token (no model pass), then the cfg sample."""
    from .npnet import golden_noise
    from .hosts.toy import NPNET_WEIGHTS, load_toy_npnet

    if not NPNET_WEIGHTS.is_file():
        log(f"skipping the golden-noise row: {NPNET_WEIGHTS} is missing (python scripts/train_toy_npnet.py makes it)")
        return
    npnet = load_toy_npnet()
    prompt = toy.cond(labels)
    with _Timer() as t:
        with _Timer() as t_net:
            golden = golden_noise(npnet, base, prompt)
        x0 = generate(golden, guided)
    add(f"golden noise (NPNet) + cfg {cfg.cfg:g}", x0, base_stability, float(score(golden).mean()),
        2 * cfg.steps, t.s, npnet_s=t_net.s, change_rms=float((golden - base).pow(2).mean().sqrt()))


def run_demo(
    out_dir: Optional[Path] = None,
    config: Optional[DemoConfig] = None,
    log: Callable[[str], None] = logger.info,
) -> list[Row]:
    from .hosts.toy import load_toy, score_digits

    cfg = config or DemoConfig()
    toy = load_toy()
    n = cfg.per_class * toy.num_classes
    labels = torch.arange(toy.num_classes).repeat(cfg.per_class)
    shape = (n, *toy.latent_shape)
    base = seeded_noise(cfg.seed, shape)  # ComfyUI's RandomNoise(seed) for this latent batch
    sigmas = get_sigmas(toy.table, cfg.scheduler, cfg.steps)
    score_sigmas = get_sigmas(toy.table, cfg.scheduler, cfg.score_steps)
    kind = toy.table.kind
    sigma_max = float(sigmas[0])

    guided = toy.denoiser(labels, cfg=cfg.cfg)
    unguided = toy.denoiser(labels, cfg=1.0)
    gen_passes = cfg.steps * 2
    trip_passes = st.round_trip_passes(cfg.score_steps, cfg_sampling=True, cfg_inversion=False)

    def generate(e: torch.Tensor, denoiser) -> torch.Tensor:
        return ode.sample(denoiser, noise_to_x(e, kind, sigma_max), sigmas)

    def score(e: torch.Tensor) -> torch.Tensor:
        return st.round_trip(guided, e, score_sigmas, kind, inverse_denoiser=unguided).score

    rows: list[Row] = []
    images: dict[str, torch.Tensor] = {}

    x0_ref: dict[str, torch.Tensor] = {}

    def add(method, x0, before, after, passes, wall, **extra):
        m = x0.shape[0]  # a row may cover the first m samples only (the paper's optimizer)
        q = score_digits(x0, labels[:m])
        mse = float((x0 - x0_ref["cfg"][:m]).pow(2).mean()) if "cfg" in x0_ref else None
        row = Row(method, q["accuracy"], q["confidence"], before, after, passes, wall, extra, mse)
        rows.append(row)
        images[method] = x0.detach()
        log(format_table([row]).splitlines()[-1])

    with torch.no_grad():
        base_scores = score(base)  # [n]
        base_stability = float(base_scores.mean())

        with _Timer() as t_u:
            x0_u = generate(base, unguided)
        with _Timer() as t:
            x0_cfg = generate(base, guided)
        x0_ref["cfg"] = x0_cfg
        add("unguided (cfg 1)", x0_u, base_stability, None, cfg.steps, t_u.s)
        add(f"cfg {cfg.cfg:g}", x0_cfg, base_stability, None, gen_passes, t.s)

        with _Timer() as t:
            cands = torch.stack([seeded_noise(cfg.seed + k, shape) for k in range(cfg.candidates)])
            sel = st.select(guided, cands, score_sigmas, kind, micro_batch=cfg.micro_batch,
                            inverse_denoiser=unguided, keep_x0=False)
            chosen = sel.best_noise(cands)
            x0 = generate(chosen, guided)
        add(
            f"cfg + best-of-{cfg.candidates} stability",
            x0,
            base_stability,
            float(sel.scores.max(0).values.mean()),
            cfg.candidates * trip_passes + gen_passes,
            t.s,
            chosen_seeds=[cfg.seed + int(i) for i in sel.best_index[: cfg.grid_columns]],
        )

        n_paper = n if cfg.paper_samples <= 0 else min(n, cfg.paper_samples)
        paper_final = None
        for label, method, steps, lr, patience, count in (
            (f"cfg + optimize paper ({cfg.paper_steps} st" + (f", {n_paper} of {n})" if n_paper < n else ")"),
             "momentum", cfg.paper_steps, cfg.paper_lr, 0, n_paper),
            (f"cfg + optimize fixed-pt (<={cfg.fixed_point_steps} st)", "fixed_point", cfg.fixed_point_steps, None,
             cfg.fixed_point_patience, n),
        ):
            e0 = base[:count]
            d_guided = guided if count == n else toy.denoiser(labels[:count], cfg=cfg.cfg)
            d_unguided = unguided if count == n else toy.denoiser(labels[:count], cfg=1.0)
            with _Timer() as t:
                res = st.optimize(d_guided, e0, score_sigmas, kind, method=method, steps=steps, lr=lr,
                                  patience=patience, inverse_denoiser=d_unguided)
                x0 = generate(res.noise, d_guided)
            extra = {"history": [float(v) for v in res.history.mean(1)], "steps_taken": res.steps,
                     "samples": count, "wall_s_per_sample": t.s / count}
            running_best = torch.cummax(res.history, dim=0).values  # [iterates, count]
            if paper_final is None:
                paper_final = running_best[-1]
            else:  # per sample: the first step at which ours matches the paper's stability (paper's samples)
                hit = running_best[:, : paper_final.shape[0]] >= paper_final[None] - 1e-6
                first = torch.where(hit.any(0), hit.float().argmax(0), torch.full_like(paper_final, float("nan")))
                extra["steps_to_paper_stability_median"] = float(first.nanmedian())
                extra["share_reaching_paper_stability"] = float(hit.any(0).float().mean())
            add(label, x0, float(base_scores[:count].mean()),
                float(res.best_score.mean()), res.round_trips * trip_passes + gen_passes, t.s, **extra)

        if cfg.refiner:
            _refined_rows(toy, cfg, sigma_max, base, base_stability, unguided, guided, generate, score, add, log)
        if cfg.npnet:
            _golden_row(toy, cfg, labels, base, base_stability, guided, generate, score, add, log)

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": asdict(cfg),
            "model": "toy digits UNet (noisecraft/assets), eps, scaled_linear",
            "samples": n,
            "torch_threads": torch.get_num_threads(),
            "rows": [asdict(r) for r in rows],
            "gap_closed_by_refined_unguided": gap_summary(rows),
        }
        (out_dir / "results.json").write_text(json.dumps(payload, indent=2))
        save_grid(images, out_dir / "samples.png", cfg.grid_columns)
    return rows
