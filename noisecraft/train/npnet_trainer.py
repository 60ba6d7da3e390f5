"""Training an NPNet on re-denoise pairs: MSE(npnet(x_T, c), x'_T), AdamW, resumable.

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie,
*Golden Noise for Diffusion Models: A Learning Framework*, arXiv:2411.09502 (2024), Sec. 3.2,
Alg. 2 (MSE between the predicted and the target noise), App. A.5 (batch 64, 30 epochs).

Choices (ours; the paper is silent or we differ on purpose):

* Per-sample prompts: every pair is trained with its own prompt embedding (the official training
  code uses one prompt for the whole batch; App. A.5 calls that a regulariser, we do not copy it).
* The NPNet is run with ``canonical_signs=True``, as :func:`noisecraft.npnet.golden_noise` runs it
  at inference by default, so the SVD branch's MLPs see the same sign convention in both.
* Initialisation from ``init_seed`` (no global RNG): the seeded weights of
  :func:`noisecraft.npnet.random_npnet`, then the three places where the net's change enters set
  to zero (the SVD branch's last layer, ``alpha``, ``beta``): the untrained net is the identity,
  so the loss starts at the pairs' own MSE(x_T, x'_T) (logged as ``identity_mse``) and every step
  has to earn its change.
* Data order: a pure function of ``(seed, epoch)`` over the kept pairs (:meth:`PairStore.batches`);
  nothing else is random, so the data position is the whole RNG state.
* Checkpoints: one safetensors file (weights, AdamW moments and step counts) + JSON metadata
  (step, data position, config, samples, time), written atomically (:mod:`noisecraft.io`; a start or
  resume removes the temp files of a killed write); a resume with fewer ``steps`` than the
  checkpoint is refused; resuming
  truncates the loss log to the checkpoint's step, so kill + resume equals an uninterrupted run
  bit for bit on CPU (tested).
* Output ``npnet.safetensors``: the ``text_embedding.*`` flavour that :func:`noisecraft.npnet.load_npnet`
  reads strictly, with the same ``noisecraft.*`` shape metadata as ``save_npnet_safetensors`` plus
  the training settings, written byte-for-byte reproducibly.

Outputs in ``out_dir``: ``npnet.safetensors``, ``checkpoint.safetensors``, ``loss.jsonl``, ``loss.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from ..npnet import NPNet, NPNetConfig, random_npnet
from .npnet_pairs import PairStore
from ..io import atomic_write_text, clean_stale_temps, ensure_dir, read_safetensors
from .refiner import _fewer_steps_message, _read_log, plot_losses
from .teacher_cache import write_safetensors

__all__ = ["NPNetTrainConfig", "NPNetTrainResult", "train_npnet", "init_npnet", "npnet_config_for",
           "save_trained_npnet", "pair_loss", "SMALL_NPNET", "CHECKPOINT_NAME", "NPNET_NAME", "LOG_NAME", "PLOT_NAME"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
NPNET_NAME = "npnet.safetensors"
LOG_NAME = "loss.jsonl"
PLOT_NAME = "loss.png"
# A small NPNet for small latents (the toy NPNet's shape): SVD MLPs 32/64 wide with 2 heads, and a
# 2-stage Swin at 32x32 input (patch 4, width 32, depths 2+2, heads 2+4, window 4), ~0.14M parameters
# at 8x8 latents instead of Swin-T's 28M. Pass as npnet_config_for(pairs, **SMALL_NPNET).
SMALL_NPNET = dict(svd_hidden=32, svd_mlp4_hidden=64, svd_heads=2, swin_classes=1, swin_img_size=32, swin_patch=4,
                   swin_embed_dim=32, swin_depths=(2, 2), swin_heads=(2, 4), swin_window=4)
_PAPER = "Golden Noise for Diffusion Models: A Learning Framework, arXiv:2411.09502"


@dataclass
class NPNetTrainConfig:
    steps: int = 600
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    lr_schedule: str = "constant"  # or "cosine" (to 10% of lr)
    batch_size: int = 64
    max_grad_norm: Optional[float] = 1.0
    margin: Optional[float] = None  # None: the stored kept flags; a number: re-filter by score margin
    canonical_signs: bool = True
    seed: int = 0  # data order
    init_seed: int = 0  # weights
    checkpoint_every: int = 100
    log_every: int = 1

    def check(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if int(self.warmup) != self.warmup or self.warmup < 0:
            raise ValueError(f"warmup must be a whole number of steps >= 0, got {self.warmup!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.margin is not None and not math.isfinite(float(self.margin)):
            raise ValueError(f"margin must be a finite number or None (the stored kept flags), got {self.margin}: "
                             "with NaN no pair would be kept")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "NPNetTrainConfig":
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.9, 0.999)))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


_RESUME_KEYS = ("lr", "weight_decay", "betas", "warmup", "lr_schedule", "batch_size", "max_grad_norm", "margin",
                "canonical_signs", "seed", "init_seed")


@dataclass
class NPNetTrainResult:
    model: NPNet
    npnet_path: Path
    step: int
    losses: list = field(default_factory=list)
    wall_s: float = 0.0
    stopped_early: bool = False


def _config_json(cfg: NPNetConfig) -> dict:
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v) for f in fields(cfg)}


def npnet_config_for(pairs: PairStore, **overrides) -> NPNetConfig:
    """An :class:`NPNetConfig` that fits a pair folder: channels and size from its latents, tokens and
    text width from its prompt embeddings; everything else from ``overrides`` (else the defaults)."""
    c, h, w = pairs.shape
    if h != w:
        raise ValueError(f"NPNet trains on square latents; the pairs are {h}x{w}")
    _, tokens, width = pairs.embeds.shape
    return NPNetConfig(**{"latent_channels": c, "latent_size": h, "tokens": tokens, "text_width": width, **overrides})


def init_npnet(config: NPNetConfig, seed: int = 0) -> NPNet:
    """Seeded initial weights (no global RNG) with the identity as the initial function."""
    model = random_npnet(config, seed=seed, golden_scale=1.0)
    with torch.no_grad():
        model.unet_svd.mlp4[2].weight.zero_()
        model.unet_svd.mlp4[2].bias.zero_()
        model.alpha.zero_()
        model.beta.zero_()
    return model


def pair_loss(model: NPNet, pairs: PairStore, indices, canonical_signs: bool = True) -> tuple[float, float]:
    """(MSE of the net's output to the targets, MSE of the identity) over the pairs ``indices``."""
    b = pairs.get(indices)
    with torch.no_grad():
        out = model(b.e, pairs.embeds[b.cond], canonical_signs=canonical_signs)
    return float(F.mse_loss(out, b.target)), float(F.mse_loss(b.e, b.target))


def _npnet_metadata(model: NPNet, extra: Mapping[str, Any]) -> dict:
    cfg = model.config
    meta = {
        "noisecraft.kind": "npnet",
        "noisecraft.preset": model.preset or "",
        "noisecraft.text_width": str(cfg.text_width),
        "noisecraft.tokens": str(cfg.tokens),
        "noisecraft.latent_channels": str(cfg.latent_channels),
        "noisecraft.latent_size": str(cfg.latent_size),
        "noisecraft.svd_heads": str(cfg.svd_heads),
        "noisecraft.config": json.dumps(_config_json(cfg), sort_keys=True),
        "noisecraft.paper": _PAPER,
    }
    for k, v in extra.items():
        key = k if k.startswith("noisecraft.") else f"noisecraft.{k}"
        meta[key] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    meta["noisecraft.kind"] = "npnet"
    return meta


def save_trained_npnet(model: NPNet, path: str | os.PathLike, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """The NPNet as safetensors (``text_embedding.*`` flavour, loads with ``load_npnet``), reproducibly."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return write_safetensors(state, path, _npnet_metadata(model, metadata or {}))


def _save_checkpoint(path: Path, model: NPNet, opt: torch.optim.Optimizer, state: dict) -> None:
    tensors = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
    opt_sd = opt.state_dict()
    for i, st in opt_sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach()
    write_safetensors(tensors, path, {"noisecraft.kind": "npnet_checkpoint", "state": json.dumps(state, sort_keys=True),
                                      "param_groups": json.dumps(opt_sd["param_groups"], sort_keys=True)})


def _load_checkpoint(path: Path, model: NPNet, opt: torch.optim.Optimizer) -> dict:
    tensors, meta = read_safetensors(
        path, what="the training checkpoint to resume from",
        fix="delete it (and resume from nothing) or choose another output folder")
    if meta.get("noisecraft.kind") != "npnet_checkpoint":
        raise ValueError(f"{path} is not a NoiseCraft NPNet checkpoint: resume from the folder train-npnet wrote")
    own = model.state_dict()
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if set(sd) != set(own) or any(own[k].shape != sd[k].shape for k in own):
        raise ValueError(f"{path}: the NPNet in this checkpoint has another shape than the one being trained")
    model.load_state_dict(sd, strict=True)
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["state"])


def _lr_at(config: NPNetTrainConfig, step: int) -> float:
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "cosine":
        p = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))
    return config.lr


def train_npnet(
    pairs: PairStore | str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Optional[NPNetTrainConfig] = None,
    npnet_config: Optional[NPNetConfig] = None,
    *,
    resume: bool = False,
    stop_after: Optional[int] = None,
    progress: Optional[Callable[[int, int, dict], None]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    device: str | torch.device = "cpu",
) -> NPNetTrainResult:
    """Train an NPNet on a complete pair folder; see the module docstring.

    Args:
        pairs: a :class:`PairStore` (or its folder); its prompt embeddings are the NPNet's text input.
        npnet_config: the net's shape; default :func:`npnet_config_for` (official-size SVD MLPs and
            Swin-T: give a smaller one for small models). Must fit the pairs' latents and embeddings.
        resume: continue from ``out_dir/checkpoint.safetensors`` (same settings except ``steps``);
            without it an existing checkpoint is an error.
        stop_after: stop once this step is done, without a checkpoint (like a kill): for tests.
        progress: ``progress(step, total, record)`` after each step; may raise to interrupt.
    """
    config = config or NPNetTrainConfig()
    config.check()
    pairs = pairs if isinstance(pairs, PairStore) else PairStore(pairs)
    npnet_config = npnet_config or npnet_config_for(pairs)
    want = npnet_config_for(pairs)
    if (npnet_config.latent_channels, npnet_config.latent_size, npnet_config.tokens, npnet_config.text_width) != \
            (want.latent_channels, want.latent_size, want.tokens, want.text_width):
        raise ValueError(
            f"the NPNet shape ({npnet_config.latent_channels}x{npnet_config.latent_size}x{npnet_config.latent_size} "
            f"latents, {npnet_config.tokens}x{npnet_config.text_width} text) does not fit the pairs "
            f"({want.latent_channels}x{want.latent_size}x{want.latent_size}, {want.tokens}x{want.text_width}): "
            "use npnet_config_for(pairs, ...)"
        )
    out = ensure_dir(out_dir, "output folder")
    ckpt_path, log_path = out / CHECKPOINT_NAME, out / LOG_NAME
    if ckpt_path.is_file() and not resume:
        raise FileExistsError(f"{ckpt_path} exists: resume that run (resume=True / --resume) or choose another "
                              "output folder")
    clean_stale_temps(out)
    model = init_npnet(npnet_config, config.init_seed).to(device).train()
    embeds = pairs.embeds.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    kept = int(pairs.kept_indices(config.margin).numel())

    step, epoch, offset, samples, wall_prev = 0, 0, 0, 0, 0.0
    if resume and ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path, model, opt)
        saved = NPNetTrainConfig.from_json(state["config"]).to_json()
        now = config.to_json()
        diff = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
        if diff:
            raise ValueError(
                f"{ckpt_path} was trained with other settings ("
                + ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in diff)
                + "): resume with the same settings or start a new output folder")
        if state.get("npnet_config") != _config_json(npnet_config) or state.get("pairs") != [pairs.total, kept]:
            raise ValueError(f"{ckpt_path} was trained with another NPNet shape or other pairs: start a new folder")
        step, (epoch, offset) = int(state["step"]), state["position"]
        if step > config.steps:
            raise ValueError(_fewer_steps_message(ckpt_path, step, config.steps, out / NPNET_NAME))
        samples, wall_prev = int(state["samples"]), float(state["wall_s"])
        logger.info("resuming %s at step %d (epoch %d, offset %d)", out, step, epoch, offset)
    records = _read_log(log_path, upto_step=step) if resume else []
    atomic_write_text(log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    t0 = time.perf_counter()

    def checkpoint(at_step: int, position) -> None:
        _save_checkpoint(ckpt_path, model, opt, {
            "step": at_step, "position": list(position), "samples": samples,
            "wall_s": wall_prev + time.perf_counter() - t0, "config": config.to_json(),
            "npnet_config": _config_json(npnet_config), "pairs": [pairs.total, kept],
        })

    data = pairs.batches(config.batch_size, seed=config.seed, epoch=epoch, offset=offset, margin=config.margin)
    stopped = False
    with torch.inference_mode(False), torch.enable_grad(), open(log_path, "a", encoding="utf-8") as log:
        while step < config.steps:
            lr = _lr_at(config, step)
            for g in opt.param_groups:
                g["lr"] = lr
            batch, position = next(data)
            e, target = batch.e.to(device), batch.target.to(device)
            prompt = embeds[batch.cond.to(device)]  # one prompt per pair
            opt.zero_grad(set_to_none=True)
            pred = model(e, prompt, canonical_signs=config.canonical_signs)
            loss = F.mse_loss(pred, target)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                params, config.max_grad_norm if config.max_grad_norm else float("inf")))
            opt.step()
            step += 1
            samples += len(batch)
            rec = {"step": step, "loss": float(loss.detach()), "identity_mse": float(F.mse_loss(e, target)),
                   "lr": lr, "grad_norm": grad_norm, "alpha": float(model.alpha.detach()),
                   "beta": float(model.beta.detach()), "samples": samples,
                   "wall_s": round(wall_prev + time.perf_counter() - t0, 3)}
            records.append(rec)
            if step % config.log_every == 0 or step == config.steps:
                log.write(json.dumps(rec, sort_keys=True) + "\n")
                log.flush()
            if progress is not None:
                progress(step, config.steps, rec)
            if stop_after is not None and step >= stop_after and step < config.steps:
                stopped = True
                break
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint(step, position)
    model.eval()
    wall = wall_prev + time.perf_counter() - t0
    plot_losses([r["step"] for r in records], [r["loss"] for r in records], out / PLOT_NAME,
                title=f"NPNet MSE to re-denoise targets ({pairs.meta.get('base_model', '?')})")
    npnet_path = out / NPNET_NAME
    if not stopped:
        meta: dict[str, Any] = {
            "base_model": str(pairs.meta.get("base_model", "unknown")),
            "model_kind": str(pairs.meta.get("kind", "")),
            "training": {**config.to_json(), "pairs": pairs.meta, "pairs_total": pairs.total, "pairs_kept": kept,
                         "optimizer": "AdamW", "loss": "MSE(npnet(x_T, c), x'_T), one prompt per pair"},
        }
        meta.update(dict(metadata or {}))
        save_trained_npnet(model, npnet_path, meta)
    return NPNetTrainResult(model, npnet_path, step, [r["loss"] for r in records], wall, stopped)
