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

* Host-agnostic through :class:`~noisecraft.hosts.diffusers.RefinerHost`: a module to hang the LoRA on,
  its sigma table, and a bank of condition embeddings indexed by the cache's condition ids.
  :func:`noisecraft.hosts.diffusers.diffusers_host` builds one for a local diffusers folder,
  :func:`noisecraft.hosts.toy.toy_host` for the shipped toy model.
* Randomness: the LoRA ``down`` init comes from ``lora_seed``; the data order is a pure function of
  ``(seed, epoch)`` (:meth:`TeacherCache.epoch_order`). Nothing else draws random numbers (no dropout,
  no noise augmentation), so the data position ``(epoch, offset)`` is the trainer's whole RNG state;
  the global RNG is never touched.
* The loop (AdamW, lr schedule and warmup, accumulation, clipping, precision, checkpoint and exact
  resume, loss log and plot, several processes on accelerate) is :mod:`noisecraft.train.loop`;
  this module is the method plugged into it (:class:`RefinerMethod`: the LoRA is the trainable
  module, the checkpoint holds its weights). ``batch_size`` is the global micro-batch over all
  processes; the logged loss and ``residual_rms`` are the global ones.

Scale (SDXL, rank 256; the paper trains SD2.1 at rank 128 and SDXL at rank 256):

* ``gradient_checkpointing``: only the LoRA pass keeps a graph (MSD runs the N student steps without
  one), so only it is checkpointed (:func:`lora_residual`): on a diffusers model through its own
  ``enable_gradient_checkpointing`` (every resnet and transformer block a non-reentrant
  ``torch.utils.checkpoint`` segment, switched on for the LoRA pass only; each segment recomputes with
  the LoRA state it ran with, and draws no random numbers), on any other module one segment around the
  whole pass. Same loss and gradients (tested); the saved activations fall to the block inputs plus one
  block's recompute (``benchmarks/bench_train_memory.py``). A memory setting, not a trajectory one: not a
  resume key, and recorded in the files only when on (files of runs without it stay as they were).
* Precision is the loop's (bf16 autocast; LoRA weights, gradients and AdamW state float32; the
  student chain and the loss in float32, :func:`noisecraft.msd.msd_loss`); AdamW is fused on CUDA.
* Any rank >= 1 is taken as asked on every target layer, also on a layer narrower than the rank (peft
  caps nothing: ``down`` [rank, fan_in], ``up`` [fan_out, rank]; the update then has rank
  <= min(fan_in, fan_out) and the extra columns cost only memory). SD1.5/SDXL have no target layer
  narrower than 320.

* Guidance-scale control (``guidance_range``, :mod:`noisecraft.guidance_embed`; the paper's App. A.4): the
  cache's teachers each used their own CFG scale (``TeacherBatch.guidance``), and the refiner pass gets that
  scale through a zero-initialised ``GuidanceEmbedding`` added to the timestep embedding (trained with the
  LoRA, saved in the same file). Without it (None) settings, checkpoints and refiner files are as before.

Outputs in ``out_dir``: ``refiner.safetensors`` (kohya LoRA + ``noisecraft.*`` metadata, byte-for-byte
reproducible), ``checkpoint.safetensors``, ``loss.jsonl``, ``loss.png``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ..hosts.diffusers import RefinerHost
from ..fingerprint import module_fingerprint
from ..guidance_embed import GuidanceEmbedding, check_guidance_range
from ..hosts.adapters import LoRASet, attach_lora
from ..lora import CONVENTION, DEFAULT_TARGETS
from ..msd import msd_loss
from ..refine import refine_with, residual_from_denoisers
from ..sigmas import get_sigmas
from .loop import CHECKPOINT_NAME, LOG_NAME, PLOT_NAME, LoopConfig, TrainerResult, module_device, plot_losses, run
from .teacher_cache import TeacherCache, write_safetensors

__all__ = [
    "RefinerTrainConfig",
    "TrainResult",
    "train_refiner",
    "RefinerMethod",
    "msd_step_loss",
    "lora_residual",
    "save_refiner",
    "write_safetensors",
    "plot_losses",
    "CHECKPOINT_NAME",
    "REFINER_NAME",
    "LOG_NAME",
    "PLOT_NAME",
]

logger = logging.getLogger(__name__)

REFINER_NAME = "refiner.safetensors"


# -- config and results ------------------------------------------------------------------------


@dataclass
class RefinerTrainConfig(LoopConfig):
    """Training settings: the loop's (:class:`~noisecraft.train.loop.LoopConfig`: steps, AdamW, schedule,
    ``batch_size`` = the global micro-batch over all processes, accumulation, clipping, precision,
    data-order ``seed``, intervals) and the refiner's (LoRA rank/alpha/targets and init seed, student
    steps and schedule). An optimizer step sees ``batch_size * grad_accum`` samples."""

    rank: int = 4
    alpha: Optional[float] = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    student_steps: int = 10
    scheduler: str = "normal"
    lora_seed: int = 0  # LoRA down init
    gradient_checkpointing: bool = False  # of the LoRA pass (module docstring, "Scale")
    # guidance-scale control (noisecraft.guidance_embed): train on a cache built with this (lo, hi) teacher CFG
    # range, the refiner taking each sample's scale; None = a plain refiner (settings JSON without the key)
    guidance_range: Optional[tuple[float, float]] = None

    def check(self) -> None:
        self.loop().check()
        for name in ("rank", "student_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.alpha is not None and not (math.isfinite(float(self.alpha)) and float(self.alpha) > 0):
            raise ValueError(f"alpha must be a positive number (or None: alpha = rank), got {self.alpha}")
        check_guidance_range(self.guidance_range)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")

    def loop(self) -> LoopConfig:
        """The loop's part of these settings."""
        return LoopConfig(**{k: getattr(self, k) for k in LoopConfig.__dataclass_fields__})

    def to_json(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["betas"] = list(self.betas)
        if d.get("guidance_range") is None:  # a plain refiner's settings (and files) stay as they were
            d.pop("guidance_range", None)
        else:
            d["guidance_range"] = [float(v) for v in self.guidance_range]
        if not self.gradient_checkpointing:  # memory only: files of runs without it stay as they were
            del d["gradient_checkpointing"]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RefinerTrainConfig":
        d = dict(d)
        d["targets"] = tuple(d.get("targets", DEFAULT_TARGETS))
        d["betas"] = tuple(d.get("betas", (0.9, 0.999)))
        if d.get("guidance_range") is not None:
            d["guidance_range"] = tuple(float(v) for v in d["guidance_range"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# Settings that change the trajectory: a resume must use the same ones (steps may grow).
_RESUME_KEYS = ("rank", "alpha", "targets", "lr", "weight_decay", "betas", "warmup", "lr_schedule", "batch_size",
                "grad_accum", "max_grad_norm", "student_steps", "scheduler", "precision", "seed", "lora_seed",
                "guidance_range")


@dataclass(kw_only=True)
class TrainResult(TrainerResult):
    lora: LoRASet
    refiner_path: Path


# -- the method -------------------------------------------------------------------------------------


def save_refiner(lora: LoRASet, path: str | os.PathLike, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """The refiner LoRA as the refiner file (:meth:`LoRASet.save`: kohya keys, ``noisecraft.*``
    metadata, written atomically and reproducibly by :func:`noisecraft.lora.save_refiner_pairs`)."""
    return lora.save(path, metadata)


def lora_residual(lora: LoRASet, student, kind, sigma_max: float, *, guidance=None,
                  gradient_checkpointing: bool = False, checkpoint: Optional[Callable] = None):
    """Step 1 of the module docstring as a residual function ``e -> (D_base(x_T) - D_lora(x_T)) / sigma_max``
    (:func:`noisecraft.refine.residual_from_denoisers`) over ``student``'s network with ``lora`` toggled;
    ``guidance``: per-sample CFG scales for a guidance-conditioned refiner (:meth:`LoRASet.base_and_lora`).

    ``gradient_checkpointing``: the LoRA pass runs checkpointed (module docstring, "Scale"); ``checkpoint``
    replaces ``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)``
    (same call form; the memory benchmark passes a measuring one)."""
    d_base, d_lora = lora.base_and_lora(student) if guidance is None else lora.base_and_lora(student, guidance=guidance)
    if gradient_checkpointing:
        d_lora = _checkpointed(d_lora, lora, getattr(student, "unet", None), checkpoint or _checkpoint)
    return residual_from_denoisers(d_base, d_lora, kind, sigma_max)


def _checkpoint(fn, *args):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def _checkpointed(d_lora, lora: LoRASet, net, checkpoint: Callable):
    def segment_func(module, *args):  # diffusers' gradient_checkpointing_func: one block
        enabled = lora.enabled

        def segment(*a):  # the recompute (in backward) runs with the LoRA state of the forward
            prev = lora.enabled
            if prev != enabled:
                lora.enabled = enabled
            try:
                return module(*a)
            finally:
                if prev != enabled:
                    lora.enabled = prev

        return checkpoint(segment, *args)

    def call(x, sigma):
        if not getattr(net, "_supports_gradient_checkpointing", False):
            return checkpoint(d_lora, x, sigma)  # one segment: the pass's activations are freed until backward
        was_on = bool(getattr(net, "is_gradient_checkpointing", False))
        net.enable_gradient_checkpointing(segment_func)
        try:
            return d_lora(x, sigma)
        finally:
            if not was_on:
                net.disable_gradient_checkpointing()

    return call


def msd_step_loss(lora: LoRASet, student, e: torch.Tensor, x0: torch.Tensor, sigmas: torch.Tensor, kind, *,
                  guidance=None, gradient_checkpointing: bool = False) -> tuple[torch.Tensor, dict]:
    """Steps 1-3 of the module docstring on one micro-batch: refiner (:func:`lora_residual`), student
    without the refiner, :func:`noisecraft.msd.msd_loss`; ``(loss, stats)`` as msd_loss returns them."""
    residual = lora_residual(lora, student, kind, float(sigmas[0]), guidance=guidance,
                             gradient_checkpointing=gradient_checkpointing)
    with lora.disabled():  # the student samples without the refiner
        return msd_loss(functools.partial(refine_with, residual), e, student, x0, sigmas, kind)


class RefinerMethod:
    """The MSD refiner step as a :class:`noisecraft.train.loop.Method`: the LoRA on ``host``'s UNet is
    the trainable module; the loss of a micro-batch is steps 1-3 of the module docstring."""

    kind = "refiner"
    state_prefix = "lora"
    result_name = REFINER_NAME
    resume_keys = _RESUME_KEYS
    monitor = None  # a noisecraft.train.validation.Validator (held-out validation, trackers), or None

    def __init__(self, host: RefinerHost, cache: TeacherCache, config: RefinerTrainConfig, lora: LoRASet,
                 metadata: Optional[Mapping[str, Any]] = None, sigmas: Optional[torch.Tensor] = None):
        # ``sigmas``: the student schedule when the host has its own (ComfyUI's schedulers); default: the core's
        self.host, self.cache, self.config, self.module = host, cache, config, lora
        self.kind_of_model = host.table.kind
        self.sigmas = get_sigmas(host.table, config.scheduler, config.student_steps) if sigmas is None else sigmas
        self.sigma_max = float(self.sigmas[0])
        self.device = module_device(host.unet)
        self.extra = dict(metadata or {})
        self.plot_title = f"MSD loss ({host.base_model}, rank {config.rank}, N={config.student_steps})"

    def loss(self, batch):
        # guidance-scale control: each sample's teacher scale
        guidance = batch.guidance if self.config.guidance_range is not None else None
        loss, stats = msd_step_loss(self.module, self.host.denoiser(batch.cond), batch.e.to(self.device),
                                    batch.x0.to(self.device), self.sigmas, self.kind_of_model, guidance=guidance,
                                    gradient_checkpointing=self.config.gradient_checkpointing)
        return loss, {"loss": stats["loss"], "residual_rms": stats["residual_rms"]}

    def settings(self) -> dict:
        return self.config.to_json()

    def settings_from(self, saved: Mapping[str, Any]) -> dict:
        return RefinerTrainConfig.from_json(saved).to_json()

    def identity(self) -> dict:
        return {"cache_total": self.cache.total, "cache_conds": len(self.cache.conds)}

    def identity_error(self, saved: Mapping[str, Any]) -> str:
        return (f"was trained on another teacher cache ({saved.get('cache_total')} samples, this one has "
                f"{self.cache.total}): resume with the same cache or start a new output folder")

    def record(self) -> dict:
        return {}

    def _file_metadata(self, meta: Mapping[str, Any]) -> dict:
        training = {**self.config.to_json(), "teacher": self.cache.meta, "cache_samples": self.cache.total,
                    "optimizer": "AdamW", "loss": "MSD latent MSE (noisecraft.msd)", **dict(meta)}
        full = {"base_model": self.host.base_model, "model_kind": self.kind_of_model.value,
                "sigma_max": repr(self.sigma_max), "convention": CONVENTION, "training": training}
        base_fp = module_fingerprint(self.host.unet)  # which weights it was trained on (noisecraft/fingerprint.py)
        if base_fp is not None:
            full["base_fingerprint"] = base_fp
        full.update(self.extra)
        return full

    def finalize(self, out_dir: Path, records: list, meta: Mapping[str, Any]) -> Path:
        full = self._file_metadata(meta)
        summary = self.monitor.summary() if self.monitor is not None else None
        if summary is not None:  # the held-out validation's figures (noisecraft.train.validation)
            full["validation"] = summary
        return save_refiner(self.module, Path(out_dir) / REFINER_NAME, full)

    def save_best(self, path: Path, figures: Mapping[str, Any]) -> Path:
        """The refiner as it is now, as the best by held-out validation (``figures``: that validation's)."""
        return save_refiner(self.module, path, {**self._file_metadata({}), "validation": {"best": dict(figures)}})


def _check_guidance_cache(config: RefinerTrainConfig, cache: TeacherCache) -> None:
    """Guidance-scale control needs a cache whose teachers used per-sample scales over the same range."""
    want, have = check_guidance_range(config.guidance_range), cache.guidance_range
    if want is None:
        if have is not None:
            logger.warning("the teacher cache mixes CFG scales %g..%g but the refiner has no guidance input (no "
                           "guidance_range): it learns one average refiner", *have)
        return
    if have is None or any(abs(a - b) > 1e-9 for a, b in zip(want, have)):
        raise ValueError(f"guidance_range {list(want)} needs a teacher cache built with the same range (per-sample "
                         f"CFG scales), this one has {None if have is None else list(have)}: build the cache with "
                         f"build_teacher_cache(..., guidance_range={tuple(want)}) / --guidance-range, or train "
                         f"without guidance_range")


def train_refiner(
    host: RefinerHost,
    cache: TeacherCache | str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Optional[RefinerTrainConfig] = None,
    *,
    resume: bool = False,
    stop_after: Optional[int] = None,
    progress: Optional[Callable[[int, int, dict], None]] = None,
    interrupt: Optional[Callable[[], bool]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    accelerator=None,
    validation=None,
) -> TrainResult:
    """Train a refiner LoRA on ``host`` from a teacher cache with :func:`noisecraft.train.loop.run`.

    Args:
        host: the model (:func:`noisecraft.hosts.toy.toy_host`, :func:`noisecraft.hosts.diffusers.diffusers_host`).
            Its UNet must have no LoRA attached; the trained LoRA stays attached (``result.lora``;
            ``.remove()`` it when done).
        cache: a complete :class:`TeacherCache` (or its folder) built with this host's conditions.
        out_dir: where the refiner, checkpoint, loss log and plot go.
        config: :class:`RefinerTrainConfig`.
        resume: continue from ``out_dir/checkpoint.safetensors`` (its settings must match ``config``,
            except ``steps``). Without it, an existing checkpoint is an error (nothing is overwritten).
        stop_after: stop (without a final checkpoint, like a kill) once this step is done: for tests.
        progress: ``progress(step, total_steps, record)`` after each step; may raise to interrupt (the
            last checkpoint stays valid).
        interrupt: checked before each step; True stops with a checkpoint (``result.stopped_early``).
        metadata: extra refiner metadata (merged over the trainer's own).
        accelerator: the :class:`accelerate.Accelerator` of the run (default: a new one; see the loop).
        validation: a :class:`noisecraft.train.validation.Validator` (held-out validation at step 0, every
            ``every`` steps and the last, ``refiner_best.safetensors``, trackers), run on the main process; None: off.

    Under ``accelerate launch`` (several processes) every process calls this with the same arguments;
    see :mod:`noisecraft.train.loop` (data parallel, only the main process writes files; ``progress`` is
    called on every process, and all return the same weights and losses).

    Returns a :class:`TrainResult`. Cost per optimizer step, per sample: 2 refiner passes (one with a
    graph and its backward) + ``student_steps`` passes without a graph; the teacher is in the cache.
    """
    config = config or RefinerTrainConfig()
    config.check()
    cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME
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
        raise ValueError(f"the teacher cache was made with a {cache.meta.get('kind')} model, this one is a {kind.value} "
                         f"model: build a teacher cache with this model (another cache folder) and train on that")
    sigma_max = float(get_sigmas(host.table, config.scheduler, config.student_steps)[0])
    cached_max = cache.meta.get("sigma_max")
    if cached_max is not None and abs(float(cached_max) - sigma_max) > 1e-4 * max(1.0, sigma_max):
        raise ValueError(
            f"the teacher started at sigma_max {cached_max} but the student schedule starts at {sigma_max}: "
            "build the cache with the same model and a full-denoise schedule"
        )
    _check_guidance_cache(config, cache)
    lora = attach_lora(host.unet, config.rank, config.alpha, config.targets, seed=config.lora_seed)
    try:
        if config.guidance_range is not None:
            lora.add_guidance(GuidanceEmbedding.for_model(host.unet, train_range=config.guidance_range))
        method = RefinerMethod(host, cache, config, lora, metadata)
        if validation is not None:
            method.monitor = validation.bind(method, out_dir)
        res = run(method, cache, out_dir, config.loop(), resume=resume, accelerator=accelerator,
                  device=method.device, progress=progress, interrupt=interrupt, stop_after=stop_after)
    except BaseException:
        lora.remove()
        raise
    finally:
        if validation is not None:
            validation.close()  # the trackers (also after an interrupt or a stop)
    return TrainResult(lora=lora, refiner_path=Path(out_dir) / REFINER_NAME, step=res.step, losses=res.losses,
                       wall_s=res.wall_s, stopped_early=res.stopped_early)
