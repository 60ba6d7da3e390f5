"""Training a NoiseRefine refiner LoRA with multistep score distillation (MSD).

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3
(refiner = LoRA on the diffusion model, residual connection, run once at t = T; MSD loss) and
App. D (LoRA on all attention, convolution and feed-forward layers; teacher N' = 20 guided steps,
student N = 10 unguided steps; latent MSE).

What one optimizer step does (per micro-batch of cached samples ``(e, cond, x0_teacher)``, see
:mod:`noisecraft.train.teacher_cache`):

1. refiner: ``e_hat = e + (D_base(x_T) - D_lora(x_T)) / sigma_max`` (DESIGN.md convention; two
   single-cond passes, the LoRA pass keeps a graph), via :func:`noisecraft.refine.residual_from_denoisers`
   over one UNet whose LoRA (:mod:`noisecraft.lora`) is toggled;
2. student: N unguided Euler steps from ``noise_to_x(e_hat)`` without a graph (refiner off);
3. loss: :func:`noisecraft.msd.msd_loss` (latent MSE to the teacher's x0, slopes detached), divided
   by the accumulation count, backward; after ``grad_accum`` micro-batches: optional gradient
   clipping, AdamW step.

Choices (the paper is silent on them; measured on the toy model, see README):

* Host-agnostic through :class:`RefinerHost`: a module to hang the LoRA on, its sigma table, and
  a bank of condition embeddings indexed by the cache's condition ids. :func:`toy_host` and
  :func:`diffusers_host` build one for the shipped toy model and for a local diffusers folder.
* Randomness: the LoRA ``down`` init comes from ``lora_seed``; the data order is a pure function of
  ``(seed, epoch)`` (:meth:`TeacherCache.epoch_order`). Nothing else draws random numbers (no dropout,
  no noise augmentation), so the data position ``(epoch, offset)`` is the trainer's whole RNG state;
  the global RNG is never touched.
* Checkpoints: one safetensors file (LoRA weights, AdamW moments and step counts, GradScaler state
  for fp16) with JSON metadata (step, data position, config, samples seen, elapsed time), written
  atomically (:mod:`noisecraft.io`; a start or resume removes the temp files of a killed write; a
  resume with fewer ``steps`` than the checkpoint is refused). Resuming restores all of it and
  truncates the loss log to the checkpoint's step, so a run killed at any moment and resumed equals
  an uninterrupted run (bit for bit on CPU; the tests check it).
* Precision: ``"auto"`` is float32 on CPU, bf16 autocast on CUDA when supported (else fp16 with a
  GradScaler). LoRA weights and optimizer state stay float32.
* Several processes (``accelerate launch`` / ``torchrun``, data parallel): detected from the
  launcher's environment (``WORLD_SIZE`` > 1 with ``RANK``/``MASTER_ADDR``/``MASTER_PORT``), see
  :func:`init_distributed`; the process group uses gloo on CPU and nccl on CUDA. ``batch_size`` is
  the *global* micro-batch: each rank takes its contiguous slice of every global batch
  (:meth:`TeacherCache.batches`; ``batch_size`` must divide by the number of processes), the loss
  is a per-sample mean, and the LoRA gradients are all-reduced (mean) before clipping and the AdamW
  step, so every rank holds the same weights and the run equals the single-process run with the
  same global batch up to float summation order (the tests check 2 CPU processes against 1). The
  logged loss / residual RMS are the global ones. Only rank 0 writes the checkpoint, loss log,
  plot and refiner; every rank reads a checkpoint to resume (a shared folder), and the number of
  processes may change between a run and its resume. The accelerate ``Accelerator`` object is not
  used (nothing here needs its device placement or wrapping); its launcher is.

Outputs in ``out_dir``: ``refiner.safetensors`` (kohya LoRA + ``noisecraft.*`` metadata, byte-for-byte
reproducible), ``checkpoint.safetensors``, ``loss.jsonl``, ``loss.png``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from datetime import timedelta
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..hosts.diffusers import DiffusersDenoiser
from ..io import atomic_write, atomic_write_text, clean_stale_temps, ensure_dir, load_safetensors, read_safetensors
from ..lora import CONVENTION, DEFAULT_TARGETS, LoRASet, attach_lora
from ..msd import msd_loss
from ..refine import refine_with, residual_from_denoisers
from ..sigmas import SigmaTable, get_sigmas
from .teacher_cache import TeacherCache, write_safetensors

__all__ = [
    "RefinerHost",
    "RefinerTrainConfig",
    "TrainResult",
    "train_refiner",
    "DistInfo",
    "init_distributed",
    "toy_host",
    "diffusers_host",
    "save_refiner",
    "write_safetensors",
    "plot_losses",
    "CHECKPOINT_NAME",
    "REFINER_NAME",
    "LOG_NAME",
    "PLOT_NAME",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
REFINER_NAME = "refiner.safetensors"
LOG_NAME = "loss.jsonl"
PLOT_NAME = "loss.png"


# -- the host ------------------------------------------------------------------------------------


@dataclass
class RefinerHost:
    """What the trainer needs from a model.

    ``unet``: the module the LoRA hooks onto (frozen; a diffusers ``UNet2DConditionModel``);
    ``table``: its sigma table (model kind); ``conds``: condition embeddings [P, L, D], row ``i``
    for condition id ``i`` of the teacher cache; ``uncond``: [1, L, D] for guided teachers (may be
    None if the cache is already built); ``base_model``: a name written into the refiner's metadata.
    """

    unet: nn.Module
    table: SigmaTable
    conds: torch.Tensor
    uncond: Optional[torch.Tensor] = None
    base_model: str = "unknown"
    cond_labels: Optional[list] = None

    def denoiser(self, cond_ids: torch.Tensor, cfg: float = 1.0) -> DiffusersDenoiser:
        ids = torch.as_tensor(cond_ids, dtype=torch.long).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.conds.shape[0]):
            raise ValueError(f"condition ids must lie in 0..{self.conds.shape[0] - 1}, got {ids.tolist()[:8]}")
        cond = self.conds[ids.to(self.conds.device)]
        return DiffusersDenoiser(self.unet, self.table, cond, self.uncond if float(cfg) != 1.0 else None, cfg=cfg)


def toy_host(toy=None) -> RefinerHost:
    """The shipped toy model as a host: condition id = digit label (0..9), uncond = null class."""
    from ..toy import load_toy

    toy = toy or load_toy()
    with torch.no_grad():
        conds = toy.cond(torch.arange(toy.num_classes)).detach()
        uncond = toy.uncond(1).detach()
    return RefinerHost(toy.unet, toy.table, conds, uncond, base_model="noisecraft-toy-digits-8x8",
                       cond_labels=list(range(toy.num_classes)))


def diffusers_host(
    model_dir: str | os.PathLike,
    prompts: Sequence[str],
    *,
    prompt_embeds: Optional[str | os.PathLike] = None,
    negative_prompt: str = "",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RefinerHost:
    """A local diffusers folder as a host: ``unet/`` (config + weights), ``scheduler/`` (config) and,
    for encoding the prompts, ``tokenizer/`` + ``text_encoder/`` (needs ``transformers``).

    ``prompt_embeds``: a safetensors file with ``cond`` [P, L, D] (one row per prompt, in order) and
    ``uncond`` [1, L, D], made elsewhere; then no text encoder (and no ``transformers``) is needed.
    Models with extra conditioning (SDXL's pooled text and time ids) are not supported here yet.
    """
    from diffusers import UNet2DConditionModel

    from ..hosts.diffusers import sigma_table_from_scheduler

    root = Path(model_dir)
    if not (root / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"{root} is not a diffusers model folder: expected {root / 'unet' / 'config.json'} (and the UNet's "
            "weights next to it) and scheduler/scheduler_config.json; save one with pipe.save_pretrained(folder)"
        )
    sched_cfg = root / "scheduler" / "scheduler_config.json"
    if not sched_cfg.is_file():
        raise FileNotFoundError(f"{sched_cfg} is missing: the trainer needs the scheduler config for the sigma schedule")
    unet = UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", torch_dtype=dtype)
    if getattr(unet.config, "addition_embed_type", None):
        raise ValueError(
            f"{root}: this UNet needs extra conditioning ({unet.config.addition_embed_type!r}, e.g. SDXL's pooled "
            "text embeddings and time ids), which train-refiner does not build yet; use an SD1.x/SD2.x-class model"
        )
    unet.to(device).eval().requires_grad_(False)
    table = sigma_table_from_scheduler(json.loads(sched_cfg.read_text(encoding="utf-8")))
    if not prompts:
        raise ValueError("no prompts: give a text file with one prompt per line (--prompts FILE)")
    if prompt_embeds is not None:
        data = load_safetensors(prompt_embeds, what="prompt embeddings (--prompt-embeds)",
                                fix="give a safetensors with 'cond' [P, L, D] and 'uncond' [1, L, D]")
        if "cond" not in data or "uncond" not in data:
            raise ValueError(f"{prompt_embeds}: expected tensors 'cond' [P, L, D] and 'uncond' [1, L, D], got {sorted(data)}")
        cond, uncond = data["cond"], data["uncond"]
        if cond.ndim != 3 or cond.shape[0] != len(prompts):
            raise ValueError(f"{prompt_embeds}: 'cond' has shape {tuple(cond.shape)}, expected [{len(prompts)}, tokens, width] (one per prompt)")
    else:
        cond, uncond = _encode_prompts(root, list(prompts), negative_prompt, device)
    width = int(unet.config.cross_attention_dim)
    if cond.shape[-1] != width or uncond.shape[-1] != width:
        raise ValueError(
            f"prompt embeddings have width {cond.shape[-1]} (uncond {uncond.shape[-1]}) but the UNet's "
            f"cross_attention_dim is {width}: they were made with another text encoder"
        )
    return RefinerHost(unet, table, cond.to(device=device, dtype=dtype), uncond[:1].to(device=device, dtype=dtype),
                       base_model=root.name, cond_labels=list(prompts))


@torch.no_grad()
def _encode_prompts(root: Path, prompts: list[str], negative: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from transformers import AutoTokenizer, CLIPTextModel
    except ImportError:
        raise ImportError(
            "encoding prompts needs the 'transformers' package (pip install transformers), which is not "
            "installed; or encode them elsewhere and pass --prompt-embeds FILE.safetensors with 'cond' [P, L, D] "
            "and 'uncond' [1, L, D]"
        ) from None
    for sub in ("tokenizer", "text_encoder"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub} is missing: the prompts cannot be encoded (or pass --prompt-embeds)")
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    enc = CLIPTextModel.from_pretrained(str(root / "text_encoder")).to(device).eval()

    def encode(texts: list[str]) -> torch.Tensor:
        out = []
        for a in range(0, len(texts), 16):
            ids = tok(texts[a: a + 16], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device)
            out.append(enc(ids)[0].float().cpu())
        return torch.cat(out)

    return encode(prompts), encode([negative])


# -- config and results ------------------------------------------------------------------------


@dataclass
class RefinerTrainConfig:
    """Training settings. ``batch_size`` is the global micro-batch (over all processes; each of
    ``world_size`` processes takes ``batch_size / world_size`` of it); an optimizer step sees
    ``batch_size * grad_accum`` samples."""

    steps: int = 300
    rank: int = 4
    alpha: Optional[float] = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    lr_schedule: str = "constant"  # or "cosine" (to 10% of lr)
    batch_size: int = 32
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    student_steps: int = 10
    scheduler: str = "normal"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 0  # data order
    lora_seed: int = 0  # LoRA down init
    checkpoint_every: int = 50
    log_every: int = 1

    def check(self) -> None:
        for name in ("steps", "rank", "batch_size", "grad_accum", "student_steps", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if int(self.warmup) != self.warmup or self.warmup < 0:
            raise ValueError(f"warmup must be a whole number of steps >= 0, got {self.warmup!r}")
        if self.alpha is not None and not (math.isfinite(float(self.alpha)) and float(self.alpha) > 0):
            raise ValueError(f"alpha must be a positive number (or None: alpha = rank), got {self.alpha}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RefinerTrainConfig":
        d = dict(d)
        d["targets"] = tuple(d.get("targets", DEFAULT_TARGETS))
        d["betas"] = tuple(d.get("betas", (0.9, 0.999)))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# Settings that change the trajectory: a resume must use the same ones (steps may grow).
_RESUME_KEYS = ("rank", "alpha", "targets", "lr", "weight_decay", "betas", "warmup", "lr_schedule", "batch_size",
                "grad_accum", "max_grad_norm", "student_steps", "scheduler", "precision", "seed", "lora_seed")


@dataclass
class TrainResult:
    lora: LoRASet
    refiner_path: Path
    step: int
    losses: list = field(default_factory=list)
    wall_s: float = 0.0
    stopped_early: bool = False


# -- file helpers ---------------------------------------------------------------------------------

def save_refiner(lora: LoRASet, path: str | os.PathLike, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """The refiner LoRA as a kohya/ComfyUI safetensors (:meth:`LoRASet.export_state_dict` keys) with
    ``noisecraft.*`` metadata (:meth:`LoRASet.metadata`), written atomically and reproducibly."""
    return write_safetensors(lora.export_state_dict(), path, lora.metadata(metadata))


def plot_losses(steps: Sequence[int], losses: Sequence[float], path: str | os.PathLike, title: str = "MSD loss") -> Path:
    """A small PNG line plot (PIL only): the raw loss (grey) and its running mean (black), log-scale y."""
    from PIL import Image, ImageDraw

    path = Path(path)
    w, h, left, right, top, bottom = 640, 360, 64, 16, 28, 36
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    pts = [(int(s), float(v)) for s, v in zip(steps, losses) if math.isfinite(float(v)) and float(v) > 0]
    if len(pts) >= 2:
        xs, ys = [p[0] for p in pts], [math.log10(p[1]) for p in pts]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-3
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad

        def xy(s, ly):
            return (left + (s - x0) / (x1 - x0) * (w - left - right), top + (y1 - ly) / (y1 - y0) * (h - top - bottom))

        draw.rectangle([left, top, w - right, h - bottom], outline="black")
        for frac in (0.0, 0.5, 1.0):
            ly = y0 + frac * (y1 - y0)
            _, py = xy(x0, ly)
            draw.line([(left - 4, py), (left, py)], fill="black")
            draw.text((4, py - 6), f"{10 ** ly:.3g}", fill="black")
        for frac in (0.0, 0.5, 1.0):
            s = x0 + frac * (x1 - x0)
            px, _ = xy(s, y0)
            draw.line([(px, h - bottom), (px, h - bottom + 4)], fill="black")
            draw.text((px - 10, h - bottom + 8), f"{s:.0f}", fill="black")
        draw.text((w // 2 - 20, h - 14), "step", fill="black")
        draw.line([xy(s, ly) for s, ly in zip(xs, ys)], fill=(180, 180, 180), width=1)
        k = max(1, len(ys) // 25)
        smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
        draw.line([xy(s, ly) for s, ly in zip(xs, smooth)], fill="black", width=2)
    else:
        draw.text((left, h // 2), "not enough points to plot", fill="black")
    with atomic_write(path, "wb") as f:
        img.save(f, format="PNG")
    return path


def _fewer_steps_message(ckpt_path: Path, step: int, steps: int, output: Path) -> str:
    """The refusal of a resume whose ``steps`` lies below the checkpoint's step (shared with the NPNet trainer)."""
    return (f"{ckpt_path} is at step {step}, but this run asks for steps = {steps} (--steps {steps}): a resume "
            f"cannot go back. Give --steps {step} or more to continue training, or use the result already in "
            f"{output} if that run finished")


def _read_log(path: Path, upto_step: Optional[int] = None) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if upto_step is None or int(rec.get("step", 0)) <= upto_step:
            out.append(rec)
    return out


# -- checkpoints ----------------------------------------------------------------------------------


def _save_checkpoint(path: Path, lora: LoRASet, opt: torch.optim.Optimizer, scaler, state: dict) -> None:
    tensors = {f"lora.{k}": v.detach() for k, v in lora.state_dict().items()}
    opt_sd = opt.state_dict()
    for i, st in opt_sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"opt.{i}.{k}"] = t.detach()
    meta = {"noisecraft.kind": "refiner_checkpoint", "state": json.dumps(state, sort_keys=True),
            "param_groups": json.dumps(opt_sd["param_groups"], sort_keys=True)}
    if scaler is not None:
        meta["scaler"] = json.dumps(scaler.state_dict(), sort_keys=True)
    write_safetensors(tensors, path, meta)


def _load_checkpoint(path: Path, lora: LoRASet, opt: torch.optim.Optimizer, scaler) -> dict:
    tensors, meta = read_safetensors(
        path, what="the training checkpoint to resume from",
        fix="delete it (and resume from nothing) or choose another output folder")
    if meta.get("noisecraft.kind") != "refiner_checkpoint":
        raise ValueError(f"{path} is not a NoiseCraft refiner checkpoint")
    lora_sd = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
    own = lora.state_dict()
    if set(lora_sd) != set(own) or any(own[k].shape != lora_sd[k].shape for k in own):
        raise ValueError(f"{path}: the LoRA in this checkpoint does not match the model/targets/rank being trained")
    device = next(iter(own.values())).device
    lora.load_state_dict({k: v.to(device) for k, v in lora_sd.items()})
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v if name == "step" else v.to(device)
    opt.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
    if scaler is not None and "scaler" in meta:
        scaler.load_state_dict(json.loads(meta["scaler"]))
    return json.loads(meta["state"])


# -- several processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a data-parallel run (``world_size`` 1: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def _launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def init_distributed(device: Optional[str | torch.device] = None) -> DistInfo:
    """Join the launcher's process group, if any; a no-op for a single process.

    ``accelerate launch`` (``--num_processes N``, also ``--cpu``) and ``torchrun --nproc_per_node N``
    set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with
    ``WORLD_SIZE`` > 1 this initialises ``torch.distributed`` from them (``env://``): gloo on CPU,
    nccl on CUDA (and selects ``cuda:LOCAL_RANK``). An already initialised group is reused.
    """
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    world = _launched_world_size()
    if world <= 1:
        return DistInfo()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start several processes with "
            "`accelerate launch` or `torchrun`, or unset WORLD_SIZE for a single process"
        )
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: train with a single process")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(local if dev.index is None else dev.index)
    # a long timeout: rank 0 may write a checkpoint or a teacher-cache shard while the others wait
    dist.init_process_group(backend, timeout=timedelta(hours=2))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def _dist_all_reduce(t: torch.Tensor) -> None:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _all_reduce_mean_grads(params: Sequence[torch.Tensor], world_size: int) -> None:
    """Average the gradients of ``params`` over all processes (one flat all-reduce)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off: off + n].view_as(p).clone()
        off += n


# -- training ---------------------------------------------------------------------------------------


def _precision(config: RefinerTrainConfig, device: torch.device) -> Optional[torch.dtype]:
    p = config.precision
    if p == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def _lr_at(config: RefinerTrainConfig, step: int) -> float:
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "cosine":
        p = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))
    return config.lr


def _module_device(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def train_refiner(
    host: RefinerHost,
    cache: TeacherCache | str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Optional[RefinerTrainConfig] = None,
    *,
    resume: bool = False,
    stop_after: Optional[int] = None,
    progress: Optional[Callable[[int, int, dict], None]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
) -> TrainResult:
    """Train a refiner LoRA on ``host`` from a teacher cache; see the module docstring.

    Args:
        host: the model (:func:`toy_host`, :func:`diffusers_host`). Its UNet must have no LoRA
            attached; the trained LoRA stays attached (``result.lora``; ``.remove()`` it when done).
        cache: a complete :class:`TeacherCache` (or its folder) built with this host's conditions.
        out_dir: where the refiner, checkpoint, loss log and plot go.
        config: :class:`RefinerTrainConfig`.
        resume: continue from ``out_dir/checkpoint.safetensors`` (its settings must match ``config``,
            except ``steps``). Without it, an existing checkpoint is an error (nothing is overwritten).
        stop_after: stop (without a final checkpoint, like a kill) once this step is done: for tests.
        progress: ``progress(step, total_steps, record)`` after each step; may raise to interrupt (the
            last checkpoint stays valid).
        metadata: extra refiner metadata (merged over the trainer's own).

    Under ``accelerate launch`` / ``torchrun`` (several processes) every process calls this with the
    same arguments; see the module docstring (data parallel, only rank 0 writes files; ``progress``
    is called on every rank, and all ranks return the same weights and losses).

    Returns a :class:`TrainResult`. Cost per optimizer step, per sample: 2 refiner passes (one with a
    graph and its backward) + ``student_steps`` passes without a graph; the teacher is in the cache.
    """
    config = config or RefinerTrainConfig()
    config.check()
    cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
    out = ensure_dir(out_dir, "output folder")
    ckpt_path, log_path = out / CHECKPOINT_NAME, out / LOG_NAME
    if ckpt_path.is_file() and not resume:
        raise FileExistsError(
            f"{ckpt_path} exists: resume that run (resume=True / --resume) or choose another output folder"
        )
    if host.conds.shape[0] != len(cache.conds):
        raise ValueError(
            f"the teacher cache has {len(cache.conds)} conditions but the host has {host.conds.shape[0]} "
            "condition embeddings: the cache was built for other prompts"
        )
    kind = host.table.kind
    if cache.meta.get("kind") not in (None, kind.value):
        raise ValueError(f"the teacher cache was made with a {cache.meta.get('kind')} model, this one is {kind.value}")
    sigmas = get_sigmas(host.table, config.scheduler, config.student_steps)
    sigma_max = float(sigmas[0])
    cached_max = cache.meta.get("sigma_max")
    if cached_max is not None and abs(float(cached_max) - sigma_max) > 1e-4 * max(1.0, sigma_max):
        raise ValueError(
            f"the teacher started at sigma_max {cached_max} but the student schedule starts at {sigma_max}: "
            "build the cache with the same model and a full-denoise schedule"
        )

    device = _module_device(host.unet)
    import torch.distributed as _dist

    owns_group = _launched_world_size() > 1 and not (_dist.is_available() and _dist.is_initialized())
    ddp = init_distributed(device)
    if config.batch_size % ddp.world_size:
        if owns_group:
            _dist.destroy_process_group()
        raise ValueError(
            f"the global batch ({config.batch_size}) must divide evenly over {ddp.world_size} processes "
            f"(each takes batch / processes samples): choose a multiple of {ddp.world_size}"
        )
    try:
        return _train(host, cache, out, config, ddp, device, ckpt_path, log_path, kind, sigmas, sigma_max,
                      resume, stop_after, progress, metadata)
    finally:
        if owns_group and _dist.is_initialized():
            _dist.destroy_process_group()


def _train(host, cache, out, config, ddp, device, ckpt_path, log_path, kind, sigmas, sigma_max,
           resume, stop_after, progress, metadata) -> TrainResult:
    if ddp.is_main:  # the one writer cleans up after a killed one (never another rank's live write)
        clean_stale_temps(out)
    amp_dtype = _precision(config, device)
    lora = attach_lora(host.unet, config.rank, config.alpha, config.targets, seed=config.lora_seed)
    try:
        params = list(lora.parameters())
        opt = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None

        step, epoch, offset, samples, wall_prev = 0, 0, 0, 0, 0.0
        if resume and ckpt_path.is_file():
            state = _load_checkpoint(ckpt_path, lora, opt, scaler)
            saved = RefinerTrainConfig.from_json(state["config"]).to_json()
            now = config.to_json()
            diff = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
            if diff:
                raise ValueError(
                    f"{ckpt_path} was trained with other settings ({', '.join(f'{k}: {saved.get(k)!r} there, {now.get(k)!r} now' for k in diff)}): "
                    "resume with the same settings or start a new output folder"
                )
            if state.get("cache_total") != cache.total or state.get("cache_conds") != len(cache.conds):
                raise ValueError(f"{ckpt_path} was trained on another teacher cache ({state.get('cache_total')} samples)")
            step, (epoch, offset) = int(state["step"]), state["position"]
            if step > config.steps:
                raise ValueError(_fewer_steps_message(ckpt_path, step, config.steps, out / REFINER_NAME))
            samples, wall_prev = int(state["samples"]), float(state["wall_s"])
            logger.info("resuming %s at step %d (epoch %d, offset %d)", out, step, epoch, offset)
        records = _read_log(log_path, upto_step=step) if resume else []
        if ddp.is_main:
            atomic_write_text(log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

        def checkpoint(at_step: int, position) -> None:
            if not ddp.is_main:
                return
            _save_checkpoint(ckpt_path, lora, opt, scaler, {
                "step": at_step, "position": list(position), "samples": samples,
                "wall_s": wall_prev + (time.perf_counter() - t0), "config": config.to_json(),
                "cache_total": cache.total, "cache_conds": len(cache.conds),
            })

        data = cache.batches(config.batch_size, seed=config.seed, epoch=epoch, offset=offset,
                             **({"rank": ddp.rank, "world_size": ddp.world_size} if ddp.enabled else {}))
        position = (epoch, offset)
        t0 = time.perf_counter()
        stopped = False
        autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
        log_file = open(log_path, "a", encoding="utf-8") if ddp.is_main else contextlib.nullcontext()
        with torch.inference_mode(False), torch.enable_grad(), log_file as log:
            while step < config.steps:
                lr = _lr_at(config, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                loss_sum, rms_sum = 0.0, 0.0
                micro_stats = []
                for _ in range(config.grad_accum):
                    batch, position = next(data)
                    e = batch.e.to(device)
                    student = host.denoiser(batch.cond)
                    d_base, d_lora = lora.base_and_lora(student)
                    residual = residual_from_denoisers(d_base, d_lora, kind, sigma_max)
                    with autocast(), lora.disabled():  # the student samples without the refiner
                        loss, stats = msd_loss(functools.partial(refine_with, residual), e, student,
                                               batch.x0.to(device), sigmas, kind)
                    loss = loss / config.grad_accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    loss_sum += stats["loss"] / config.grad_accum
                    rms_sum += stats["residual_rms"] / config.grad_accum
                    micro_stats.append((stats["loss"], stats["residual_rms"] ** 2))
                    samples += len(batch) * ddp.world_size
                if ddp.enabled:
                    # the global mean gradient (equal slices: the mean of the per-rank means); before
                    # unscale_, so an inf/nan on any rank reaches every rank's GradScaler
                    _all_reduce_mean_grads(params, ddp.world_size)
                    red = torch.tensor(micro_stats, dtype=torch.float64, device=device)
                    _dist_all_reduce(red)
                    red /= ddp.world_size
                    loss_sum, rms_sum = 0.0, 0.0
                    for l_i, r2_i in red.tolist():  # global loss and RMS of each micro-batch
                        loss_sum += l_i / config.grad_accum
                        rms_sum += math.sqrt(r2_i) / config.grad_accum
                if scaler is not None:
                    scaler.unscale_(opt)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    params, config.max_grad_norm if config.max_grad_norm else float("inf")))
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                step += 1
                rec = {"step": step, "loss": loss_sum, "residual_rms": rms_sum, "lr": lr, "grad_norm": grad_norm,
                       "samples": samples, "wall_s": round(wall_prev + time.perf_counter() - t0, 3)}
                records.append(rec)
                if ddp.is_main and (step % config.log_every == 0 or step == config.steps):
                    log.write(json.dumps(rec, sort_keys=True) + "\n")
                    log.flush()
                if progress is not None:
                    progress(step, config.steps, rec)
                if stop_after is not None and step >= stop_after and step < config.steps:
                    stopped = True  # like a kill: no checkpoint at this step
                    break
                if step % config.checkpoint_every == 0 or step == config.steps:
                    checkpoint(step, position)
        wall = wall_prev + time.perf_counter() - t0
        refiner_path = out / REFINER_NAME
        if not ddp.is_main:
            ddp.barrier()  # rank 0 writes the plot and the refiner
            return TrainResult(lora, refiner_path, step, [r["loss"] for r in records], wall, stopped)
        plot_losses([r["step"] for r in records], [r["loss"] for r in records], out / PLOT_NAME,
                    title=f"MSD loss ({host.base_model}, rank {config.rank}, N={config.student_steps})")
        if not stopped:
            meta = {
                "base_model": host.base_model,
                "model_kind": kind.value,
                "sigma_max": repr(sigma_max),
                "convention": CONVENTION,
                "training": {**config.to_json(), "teacher": cache.meta, "cache_samples": cache.total,
                             "optimizer": "AdamW", "loss": "MSD latent MSE (noisecraft.msd)"},
            }
            if ddp.enabled:
                meta["training"]["processes"] = ddp.world_size
            meta.update(dict(metadata or {}))
            save_refiner(lora, refiner_path, meta)
        ddp.barrier()
        return TrainResult(lora, refiner_path, step, [r["loss"] for r in records], wall, stopped)
    except BaseException:
        lora.remove()
        raise
