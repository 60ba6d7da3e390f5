"""Held-out validation inside the one training loop: unguided | refined | teacher on fixed seeds.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895): the refiner should make
unguided sampling land near the guided result (Sec. 3.3); this measures it while training runs, on
conditions x seeds the teacher cache never held.

For V held-out samples (condition id, seed) the :class:`Validator` samples from the same unit noise e:
unguided from e, unguided from the refined noise, and the teacher's guided sampling. The teacher's x0
and the unguided x0 do not depend on the refiner: they are sampled once, at the first validation of a
process; a validation then costs ``V * (2 + N)`` model passes (the refiner's two passes and N student
steps), see :meth:`Validator.passes`. Reported per validation (``validation.jsonl``, trackers): the share
of the unguided -> teacher latent-MSE gap the refiner closes, ``1 - mse(refined, teacher) /
mse(unguided, teacher)`` (the figure of the README's toy evaluation), and, with a scorer (the teacher
filter's, :mod:`noisecraft.train.teacher_filter`, or a user function), the mean score of each column.

Files in the run folder: ``validation.jsonl`` (one record per validation), ``validation/step_<n>.png``
(rows = held-out prompts, columns = unguided | refined | teacher, decoded by ``decode`` or the latents
shown directly) and ``refiner_best.safetensors`` (the refiner of the best gap closed so far, written by
the method's ``save_best``). Validation runs under ``torch.no_grad`` with the LoRA's on/off state
restored, draws its noise from its own seeds (:func:`noisecraft.rng.seeded_noise`) and never touches the
data order: a run with validation trains the same weights as one without (tested).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .. import ode
from ..io import atomic_write, atomic_write_text, ensure_dir
from ..refine import refine_noise
from ..rng import seeded_noise
from ..sigmas import noise_to_x
from .losslog import read_log

__all__ = ["ValidationSet", "Validator", "held_out_seeds", "check_held_out", "latents_to_images", "grid_image",
           "VALIDATION_SEED_BASE", "VALIDATION_LOG", "VALIDATION_DIR", "BEST_NAME"]

logger = logging.getLogger(__name__)

VALIDATION_SEED_BASE = 1_000_000_000  # far above any teacher cache's seed_base + samples
VALIDATION_LOG = "validation.jsonl"
VALIDATION_DIR = "validation"
BEST_NAME = "refiner_best.safetensors"
GRID_ROWS = 16


def held_out_seeds(prompts: int, seeds_per_prompt: int, base: int = VALIDATION_SEED_BASE) -> tuple[list[int], list[int]]:
    """``(prompt index, seed)`` of every held-out sample, prompt-major: prompt ``p``'s ``k``-th seed is
    ``base + k * prompts + p`` (the first seed of every prompt comes first in seed order)."""
    idx = [p for p in range(prompts) for _ in range(seeds_per_prompt)]
    seeds = [base + k * prompts + p for p in range(prompts) for k in range(seeds_per_prompt)]
    return idx, seeds


def check_held_out(seeds: Sequence[int], cache_base_seed: Optional[int], cache_total: int) -> None:
    """Refuse held-out seeds inside the teacher cache's seed range (those noises were trained on)."""
    if cache_base_seed is None:
        return
    lo, hi = int(cache_base_seed), int(cache_base_seed) + int(cache_total)
    inside = [s for s in seeds if lo <= s < hi]
    if inside:
        raise ValueError(f"validation seeds must lie outside the teacher cache's seeds {lo}..{hi - 1}, got "
                         f"{inside[:4]}: choose another validation seed base (default {VALIDATION_SEED_BASE})")


@dataclass
class ValidationSet:
    """What to validate on. ``denoiser(cond_ids)``: the unguided (cfg 1) ``D(x, sigma)`` of those conditions
    (the refiner runs on it too); ``teacher(cond_ids)``: the guided teacher's; ``cond_ids`` [V] and ``seeds``
    (V ints) one per sample; ``shape``: (C, H, W); ``teacher_sigmas``: the teacher's schedule; ``names``: one
    text per sample (the grid's row labels); ``teacher_passes``: model passes per teacher step (2 for CFG, 3
    for CFG + PAG: for the cost statement); ``decode``: latents -> images [n, 3, H, W] in [0, 1] (None: the
    latents are shown); ``scorer``: ``score(images, cond_ids) -> [n]`` (None: no scores); ``batch_size``:
    samples per model batch."""

    denoiser: Callable[[torch.Tensor], Callable]
    teacher: Callable[[torch.Tensor], Callable]
    cond_ids: torch.Tensor
    seeds: Sequence[int]
    shape: tuple
    teacher_sigmas: torch.Tensor
    names: Sequence[str] = ()
    teacher_passes: int = 2
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    scorer: Optional[Callable] = None
    batch_size: int = 16

    def __post_init__(self):
        self.cond_ids = torch.as_tensor(self.cond_ids, dtype=torch.long).reshape(-1)
        self.seeds = [int(s) for s in self.seeds]
        if len(self.seeds) != len(self.cond_ids) or not self.seeds:
            raise ValueError(f"a validation set needs one seed per condition id and at least one sample, got "
                             f"{len(self.cond_ids)} ids and {len(self.seeds)} seeds")
        if self.names and len(self.names) != len(self.seeds):
            raise ValueError(f"validation names: expected one per sample ({len(self.seeds)}), got {len(self.names)}")

    def __len__(self) -> int:
        return len(self.seeds)


@dataclass
class _Result:
    step: int
    record: dict
    grid: Optional[Path] = None
    images: Any = None


@dataclass
class Validator:
    """Validation and tracker logging of one run: the loop calls it (the method's ``monitor``) on the main
    process at the start and after every step: ``validator(step, total, record)``.

    ``vset``: the held-out set (None: no validation, the trackers only); ``every``: validate at step 0, every
    ``every`` steps and at the last step (0: only at 0 and the last);
    ``trackers``: accelerate trackers (:func:`noisecraft.train.trackers.make_trackers`) that get every
    step's loss, lr and gradient norm and every validation's figures and grid; ``on_result(record, grid
    path)``: called after each validation (the ComfyUI node shows the grid); ``grid_rows``: at most this many
    prompts in the grid (the first seed of each)."""

    vset: Optional[ValidationSet]
    every: int = 50
    trackers: Sequence[Any] = ()
    on_result: Optional[Callable[[dict, Optional[Path]], None]] = None
    grid_rows: int = GRID_ROWS
    method: Any = None
    out_dir: Optional[Path] = None
    records: list = field(default_factory=list)
    seconds: float = 0.0
    _fixed: Optional[dict] = None
    _started: bool = False

    def bind(self, method, out_dir) -> "Validator":
        """The method whose refiner is validated (its ``module`` LoRA, ``sigmas``, ``kind_of_model``, ``device``,
        ``save_best``) and the run folder."""
        self.method, self.out_dir = method, Path(out_dir)
        return self

    # -- cost --------------------------------------------------------------------------------------
    def passes(self) -> dict:
        """Model passes: ``per_validation`` (V * (2 + N)) and ``once`` (the cached unguided and teacher samplings)."""
        v, n = len(self.vset), len(self.method.sigmas) - 1
        t = len(self.vset.teacher_sigmas) - 1
        return {"samples": v, "per_validation": v * (2 + n), "once": v * (n + self.vset.teacher_passes * t)}

    # -- the loop's hook ----------------------------------------------------------------------------
    def __call__(self, step: int, total: int, record: Optional[dict]) -> None:
        if not self._started:
            self._start(step)
        if record is not None and self.trackers:
            scalars = {f"train/{k}": float(record[k]) for k in ("loss", "lr", "grad_norm", "residual_rms")
                       if k in record}
            for t in self.trackers:
                t.log(scalars, step=step)
        due = step == 0 or step == total or (self.every and step % self.every == 0)
        if due and self.vset is not None and not any(r["step"] == step for r in self.records):
            self.validate(step)
        if step == total:
            self.close()

    def _start(self, step: int) -> None:
        self._started = True
        if self.vset is None:
            return
        log = self.out_dir / VALIDATION_LOG
        # a resume forgets what came after its checkpoint; a new run (step 0) what an earlier one left
        self.records = read_log(log, upto_step=step) if step > 0 else []
        atomic_write_text(log, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))
        p = self.passes()
        logger.info("validation: %d held-out samples every %s steps: %d model passes per validation (+%d once for "
                    "the unguided and teacher samplings)", p["samples"], self.every or "(first and last)",
                    p["per_validation"], p["once"])

    def close(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = ()

    # -- sampling ----------------------------------------------------------------------------------
    def _autocast(self):
        """The training's autocast (a bf16 network with an fp32 LoRA runs as it does in training)."""
        import contextlib

        from .loop import resolve_precision

        precision = getattr(getattr(self.method, "config", None), "precision", "fp32")
        device = torch.device(self.method.device)
        dtype = resolve_precision(precision, device)
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _batches(self):
        b = max(1, int(self.vset.batch_size))
        for i in range(0, len(self.vset), b):
            yield slice(i, i + b)

    def _noise(self, sl: slice) -> torch.Tensor:
        e = torch.cat([seeded_noise(s, (1, *self.vset.shape)) for s in self.vset.seeds[sl]])
        return e.to(self.method.device)

    def _prepare(self) -> dict:
        m, vs = self.method, self.vset
        kind, smax = m.kind_of_model, float(m.sigmas[0])
        xu, xt = [], []
        with m.module.disabled():
            for sl in self._batches():
                ids, x_t = vs.cond_ids[sl], noise_to_x(self._noise(sl), kind, smax)
                xu.append(ode.sample(vs.denoiser(ids), x_t, m.sigmas).float().cpu())
                xt.append(ode.sample(vs.teacher(ids), x_t, vs.teacher_sigmas).float().cpu())
        fixed = {"unguided": torch.cat(xu), "teacher": torch.cat(xt)}
        fixed["scores"] = {k: self._score(x) for k, x in fixed.items()}
        return fixed

    def _refined(self) -> torch.Tensor:
        m, vs = self.method, self.vset
        kind, smax = m.kind_of_model, float(m.sigmas[0])
        out = []
        for sl in self._batches():
            ids, e = vs.cond_ids[sl], self._noise(sl)
            d = vs.denoiser(ids)
            e_hat = refine_noise(e, *m.module.base_and_lora(d), kind, smax)
            with m.module.disabled():
                out.append(ode.sample(d, noise_to_x(e_hat, kind, smax), m.sigmas).float().cpu())
        return torch.cat(out)

    def _score(self, x0: torch.Tensor) -> Optional[float]:
        if self.vset.scorer is None:
            return None
        vals = []
        for sl in self._batches():
            imgs = self.vset.decode(x0[sl]) if self.vset.decode is not None else x0[sl]
            vals.append(torch.as_tensor(self.vset.scorer(imgs, self.vset.cond_ids[sl])).float().reshape(-1).cpu())
        return float(torch.cat(vals).mean())

    @torch.no_grad()
    def validate(self, step: int) -> dict:
        """One validation at ``step``: figures to ``validation.jsonl`` and the trackers, the grid, the best refiner."""
        t0 = time.perf_counter()
        with self._autocast():
            if self._fixed is None:
                self._fixed = self._prepare()
            x_r = self._refined()
        fx = self._fixed
        mse_u = float((fx["unguided"] - fx["teacher"]).double().pow(2).mean())
        mse_r = float((x_r - fx["teacher"]).double().pow(2).mean())
        gap = 1.0 - mse_r / mse_u if mse_u > 0 else float("nan")
        rec = {"step": int(step), "gap_closed": gap, "mse_unguided": mse_u, "mse_refined": mse_r,
               "samples": len(self.vset)}
        if self.vset.scorer is not None:
            rec.update(score_unguided=fx["scores"]["unguided"], score_refined=self._score(x_r),
                       score_teacher=fx["scores"]["teacher"])
        grid_path, grid = self._grid(step, x_r)
        if grid_path is not None:
            rec["grid"] = f"{VALIDATION_DIR}/{grid_path.name}"
        best = max((r["gap_closed"] for r in self.records if math.isfinite(r["gap_closed"])), default=-math.inf)
        if math.isfinite(gap) and gap > best and hasattr(self.method, "save_best"):
            self.method.save_best(self.out_dir / BEST_NAME, {"step": int(step), **_figures(rec)})
            rec["best"] = True
        self.seconds += time.perf_counter() - t0
        rec["wall_s"] = round(self.seconds, 3)
        self.records.append(rec)
        with open(self.out_dir / VALIDATION_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.trackers:
            from .trackers import log_image

            for t in self.trackers:
                t.log({f"validation/{k}": v for k, v in _figures(rec).items()}, step=step)
            if grid is not None:
                log_image(self.trackers, "validation/grid", grid, step)
        logger.info("validation at step %d: %.1f%% of the unguided -> teacher latent-MSE gap closed (%d samples)",
                    step, 100 * gap, len(self.vset))
        if self.on_result is not None:
            self.on_result(rec, grid_path)
        return rec

    def _grid(self, step: int, x_r: torch.Tensor):
        rows, seen = [], set()
        for i, c in enumerate(self.vset.cond_ids.tolist()):
            if c not in seen and len(rows) < self.grid_rows:
                seen.add(c)
                rows.append(i)
        if not rows:
            return None, None
        idx = torch.tensor(rows)
        cols = [self._fixed["unguided"][idx], x_r[idx], self._fixed["teacher"][idx]]
        dec = self.vset.decode
        images = [dec(c) if dec is not None else latents_to_images(c) for c in cols]
        names = [self.vset.names[i] if self.vset.names else str(int(self.vset.cond_ids[i])) for i in rows]
        img = grid_image(images, names, ("unguided", "refined", "teacher"), title=f"step {step}")
        path = ensure_dir(self.out_dir / VALIDATION_DIR, "validation folder") / f"step_{step}.png"
        with atomic_write(path, "wb") as f:
            img.save(f, format="PNG")
        return path, img

    # -- summaries ---------------------------------------------------------------------------------
    def curve(self) -> tuple[list[int], list[float]]:
        """(steps, gap closed) of every validation so far: for ``loss.png``."""
        return [r["step"] for r in self.records], [r["gap_closed"] for r in self.records]

    def summary(self) -> Optional[dict]:
        """The validation figures for the refiner's metadata: the last, the best and the cost."""
        if not self.records:
            return None
        best = max(self.records, key=lambda r: r["gap_closed"] if math.isfinite(r["gap_closed"]) else -math.inf)
        p = self.passes()
        return {"last": {"step": self.records[-1]["step"], **_figures(self.records[-1])},
                "best": {"step": best["step"], **_figures(best)}, "samples": p["samples"],
                "passes_per_validation": p["per_validation"], "every": self.every}


def _figures(rec: dict) -> dict:
    return {k: rec[k] for k in ("gap_closed", "mse_unguided", "mse_refined", "score_unguided", "score_refined",
                                "score_teacher") if k in rec}


def latents_to_images(x: torch.Tensor) -> torch.Tensor:
    """Latents [n, C, h, w] shown directly as images [n, 3, h, w] in [0, 1]: one channel as grey ([-1, 1]
    -> [0, 1], the toy's pixel space), else the first three channels (fewer repeated) each stretched over
    its own range per image."""
    x = x.float()
    if x.shape[1] == 1:
        return ((x + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)
    x = x[:, :3] if x.shape[1] >= 3 else torch.cat([x, x[:, :1].expand(-1, 3 - x.shape[1], -1, -1)], 1)
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)


def grid_image(columns: Sequence[torch.Tensor], row_names: Sequence[str], col_names: Sequence[str], *,
               title: str = "", cell: int = 96):
    """A PIL grid: ``columns`` (each [rows, 3, H, W] in [0, 1]) side by side, a label per row and column; images
    smaller than ``cell`` pixels are enlarged (nearest) to about ``cell``."""
    from PIL import Image, ImageDraw

    h, w = int(columns[0].shape[-2]), int(columns[0].shape[-1])
    scale = max(1, cell // max(h, w))
    ch, cw = h * scale, w * scale
    left, top, pad = 120, 36, 4
    n = int(columns[0].shape[0])
    img = Image.new("RGB", (left + len(columns) * (cw + pad), top + n * (ch + pad)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black")
    for j, name in enumerate(col_names):
        draw.text((left + j * (cw + pad), 20), name, fill="black")
    for i in range(n):
        draw.text((4, top + i * (ch + pad) + ch // 2 - 6), str(row_names[i])[:18], fill="black")
        for j, col in enumerate(columns):
            arr = (col[i].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            tile = Image.fromarray(arr, "RGB").resize((cw, ch), Image.NEAREST)
            img.paste(tile, (left + j * (cw + pad), top + i * (ch + pad)))
    return img
