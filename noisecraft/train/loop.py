"""The one training loop: a method step plugged into AdamW, schedule, accumulation, precision, checkpoints.

Both trainers (the NoiseRefine MSD refiner, :mod:`noisecraft.train.refiner`, and NPNet,
:mod:`noisecraft.train.npnet`) are a *method* run by :func:`run`. A method owns its trainable
module and its loss on one micro-batch; the loop owns everything else, once:

* :class:`LoopConfig`: steps, AdamW (lr, weight decay, betas), linear warmup then a constant or
  cosine (to 10% of lr) schedule (:func:`lr_at`), gradient accumulation over ``grad_accum``
  micro-batches, clipping to ``max_grad_norm`` (None: no clipping, the norm is still logged),
  precision, checkpoint and log intervals, the data-order seed. :meth:`LoopConfig.check` refuses bad
  values naming the field, the value and what is allowed.
* Precision (:func:`resolve_precision`): ``"auto"`` is float32 on CPU, bf16 autocast on CUDA when
  supported (else fp16 with a GradScaler); ``"bf16"`` / ``"fp16"`` are refused on a device that cannot
  autocast to them. Trainable weights and optimizer state stay float32. Autocast is ``torch.autocast``
  on the method's own device, not accelerate's ``mixed_precision``: accelerate keeps precision and
  device in a process-wide singleton that cannot change after the first ``Accelerator`` ("AcceleratorState
  has already been initialized"), while one ComfyUI process trains many times, on other devices and
  precisions, and the CLI trains the toy model on CPU on a CUDA machine.
* AdamW (:func:`make_adamw`): torch's fused kernel on CUDA (one launch for all LoRA tensors; ``foreach``
  where fused is refused); elsewhere torch's default (single-tensor on CPU). torch's fused CPU kernel is
  not used: it differs from the default by an ulp, and ``foreach`` (bit-identical on CPU) would change
  the ``param_groups`` a checkpoint records. The choice is not a setting: a resume re-applies the
  current device's choice over the checkpoint's (a CUDA run resumes on CPU and back).
* Data: any source with ``batches(batch_size, *, seed, epoch, offset, rank, world_size)`` yielding
  ``(batch, next_position)`` (:class:`~noisecraft.train.TeacherCache`,
  :class:`~noisecraft.train.PairStore`). The data position ``(epoch, offset)`` is the whole RNG state
  (nothing else draws random numbers), so a checkpoint that stores it resumes exactly.
* Checkpoints: one safetensors file through :mod:`noisecraft.io` (atomic): trainable weights, AdamW
  moments and step counts, the GradScaler state for fp16, and JSON metadata (step, data position,
  samples, elapsed time, the method's settings and identity). A start removes the temp files of a
  killed write; an existing checkpoint without ``resume`` is refused; a resume with other settings, on
  other data, or with fewer ``steps`` than the checkpoint is refused with the fix. Resuming truncates
  the loss log to the checkpoint's step, so a run killed at any moment and resumed equals the
  uninterrupted run (bit for bit on CPU: tested).
* Log and plot: ``loss.jsonl`` (one record per step: loss and the method's statistics, lr, grad norm, samples, wall
  time) and ``loss.png`` (:mod:`noisecraft.train.losslog`); held-out validation is the method's ``monitor``.
* Control: ``progress(step, total, record)`` after every step; ``interrupt()`` checked before every step: when
  it returns True the loop writes a checkpoint at the last finished step and returns (``result.interrupted``);
  the same call with ``resume=True`` continues. Exceptions raised by either leave the last checkpoint valid.

Several processes (data parallel) run on accelerate's :class:`accelerate.Accelerator`, which replaces
the hand-written process group, gradient all-reduce and barriers: every process calls :func:`run` with
the same arguments; ``batch_size`` is the *global* micro-batch and each process takes its contiguous
slice of every global batch (``rank`` / ``world_size`` of the data source, so the union is the
single-process batch); the method's loss is wrapped in a small module (:class:`_Step`, holding only the
trainable weights, so DDP all-reduces only them) and ``accelerator.prepare``'d (DDP: one forward per
backward; micro-batches before the last run under ``accelerator.no_sync``); the logged loss and
statistics are ``accelerator.reduce``'d to their global values; only ``accelerator.is_main_process``
writes files, and ``accelerator.wait_for_everyone()`` closes the run. Every process reads a checkpoint
to resume (a shared folder); the number of processes may change between a run and its resume. The
result equals the single-process run with the same global batch up to float summation order (the
tests check 2 CPU processes against 1). Start the processes with accelerate's launcher:

* one machine, N GPUs: ``accelerate launch --multi_gpu --num_processes N -m noisecraft train-refiner ...``
  (on a CPU-only machine the same command runs N gloo processes);
* several machines: on machine R of N (R = 0 .. N - 1), with IP the address of machine 0, P a free port
  there and TOTAL the number of processes over all machines:
  ``accelerate launch --multi_gpu --num_machines N --machine_rank R --main_process_ip IP
  --main_process_port P --num_processes TOTAL -m noisecraft train-refiner ... --out SHARED_FOLDER``.
  The output (and teacher-cache) folder must be shared between the machines.

For ComfyUI (a later node): :func:`run` is a plain function call inside one sampler run, no process
launching; the method's module stays on the device it is on (``accelerator`` device placement is off).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..io import (atomic_write_text, clean_stale_temps, ensure_dir, read_safetensors, verify_safetensors,
                  write_safetensors)
from ..locks import folder_lock
from .losslog import plot_losses, read_log

__all__ = ["LoopConfig", "Method", "DataSource", "LoopResult", "TrainerResult", "run", "lr_at", "resolve_precision",
           "make_accelerator", "make_adamw", "module_device", "plot_losses", "read_log", "fewer_steps_message",
           "CHECKPOINT_NAME", "LOG_NAME", "PLOT_NAME", "LOOP_RESUME_KEYS"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
LOG_NAME = "loss.jsonl"
PLOT_NAME = "loss.png"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine")
# loop settings that change the trajectory: a resume must use the same ones (steps may grow)
LOOP_RESUME_KEYS = ("lr", "weight_decay", "betas", "warmup", "lr_schedule", "batch_size", "grad_accum",
                    "max_grad_norm", "precision", "seed")


# -- configuration ------------------------------------------------------------------------------------


@dataclass
class LoopConfig:
    """The loop's settings (see the module docstring). ``batch_size`` is the global micro-batch (over
    all processes); an optimizer step sees ``batch_size * grad_accum`` samples."""

    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    lr_schedule: str = "constant"  # or "cosine" (to 10% of lr)
    batch_size: int = 32
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    checkpoint_every: int = 50
    log_every: int = 1
    seed: int = 0  # data order

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            _positive_int(name, getattr(self, name))
        if not _is_real(self.lr) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not _is_real(self.weight_decay) or not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(_is_real(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1) (AdamW's, e.g. (0.9, 0.999)), got {self.betas!r}")
        if not _is_real(self.warmup) or not math.isfinite(self.warmup) or int(self.warmup) != self.warmup \
                or self.warmup < 0:
            raise ValueError(f"warmup must be a whole number of steps >= 0, got {self.warmup!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.max_grad_norm is not None and not (_is_real(self.max_grad_norm) and math.isfinite(self.max_grad_norm)
                                                   and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0 or None: no clipping), got "
                             f"{self.max_grad_norm!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not _is_real(self.seed) or not math.isfinite(self.seed) or int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be a whole number >= 0 (the data-order seed), got {self.seed!r}")


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(name: str, v) -> None:
    if not _is_real(v) or not math.isfinite(v) or int(v) != v or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def lr_at(config: LoopConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps, then
    constant, or cosine from lr down to 10% of lr at the last step."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "cosine":
        p = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))
    return config.lr


def resolve_precision(precision: str, device: torch.device | str) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` on ``device`` (None: float32); refuses what the device cannot do."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if precision == "fp32":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"precision {precision}: torch cannot autocast on a {device.type} device; use "
                         f"precision fp32 (or auto)")
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16: this GPU ({torch.cuda.get_device_name(device)}) does not support "
                         "bfloat16; use fp16 or auto (auto picks fp16 with a GradScaler here)")
    return dtype


# -- what plugs in --------------------------------------------------------------------------------------


@runtime_checkable
class DataSource(Protocol):
    """A resumable batch source: endless batches from the data position ``(epoch, offset)``, each yielded
    with the position after it. ``batch_size`` is global; with ``world_size > 1`` a process gets its
    contiguous slice. Batches have ``len()`` (samples in this process's slice)."""

    def batches(self, batch_size: int, *, seed: int, epoch: int, offset: int, rank: int,
                world_size: int) -> Iterator[tuple[Any, tuple[int, int]]]: ...


@runtime_checkable
class Method(Protocol):
    """A training method: its trainable weights and its loss on one micro-batch.

    ``module``: the trainable weights (only they go into the checkpoint, under ``state_prefix``; only parameters with
    ``requires_grad`` are optimised). ``loss(batch)``: ``(loss tensor, stats)`` with the loss a per-sample mean over
    the micro-batch and ``stats`` floats for the log (``"loss"`` included; keys ending in ``_rms`` are combined over
    processes as root-mean-squares, the others as means). ``kind``: names the checkpoint (``"<kind>_checkpoint"``).
    ``settings()``: this run's settings (JSON), stored in the checkpoint; ``settings_from(saved)``: a stored copy
    completed with defaults; ``resume_keys``: which of them must match to resume. ``identity()``: what the data and
    shapes must be to resume (JSON, stored in the checkpoint's state), refused with ``identity_error(saved_state)``
    when they differ. ``record()``: extra log entries after each step (may be empty). Optional
    ``find_unused_parameters = True``: the loss leaves some trainable parameters unused (DDP then looks for them).
    Optional ``monitor``: called on the main process as ``monitor(step, total, record or None)`` at the start and
    after every step (validation, trackers: :mod:`noisecraft.train.validation`); its ``curve()`` goes in loss.png.
    ``finalize(out_dir, records, meta)``: write the final artifact (on the main process, after the last step) and
    return its path; ``meta`` holds the loop's facts (``processes`` when several). ``result_name``: its file name.
    """

    kind: str
    state_prefix: str
    result_name: str
    resume_keys: Sequence[str]
    plot_title: str
    module: nn.Module

    def loss(self, batch) -> tuple[torch.Tensor, Mapping[str, float]]: ...

    def settings(self) -> dict: ...

    def settings_from(self, saved: Mapping[str, Any]) -> dict: ...

    def identity(self) -> dict: ...

    def identity_error(self, saved: Mapping[str, Any]) -> str: ...

    def record(self) -> dict: ...

    def finalize(self, out_dir: Path, records: list, meta: Mapping[str, Any]) -> Path: ...


@dataclass
class LoopResult:
    step: int
    records: list = field(default_factory=list)
    wall_s: float = 0.0
    stopped_early: bool = False  # stop_after or interrupt: no final artifact
    interrupted: bool = False  # interrupt() said stop (a checkpoint was written at ``step``)
    artifact: Optional[Path] = None  # the final artifact when the run finished

    @property
    def losses(self) -> list:
        return [r["loss"] for r in self.records]


@dataclass
class TrainerResult:
    """The part of a trainer's result that comes from the loop (the trainers add their model and file)."""

    step: int
    losses: list = field(default_factory=list)
    wall_s: float = 0.0
    stopped_early: bool = False


class _Step(nn.Module):
    """The method's loss on a micro-batch as one module forward: what DDP wraps (one forward per backward;
    its only submodule is the method's trainable module, so only those weights are broadcast and reduced)."""

    def __init__(self, method: Method):
        super().__init__()
        self.trainable = method.module
        self._method = [method]  # a list: not a submodule

    def forward(self, batch):
        return self._method[0].loss(batch)


def make_accelerator(cpu: bool = False, find_unused_parameters: bool = False):
    """The :class:`accelerate.Accelerator` the loop runs on: no device placement (modules stay where the
    caller put them), no mixed precision of its own (see the module docstring), processes from the
    launcher's environment (a single plain process: no process group). ``cpu=True`` makes a launched
    group use gloo on CPU (e.g. the toy model on a machine with GPUs); ``find_unused_parameters``: for a
    trainable module with parameters its loss does not use (DDP must then look for them)."""
    launched = _launched_world_size() > 1
    try:
        from accelerate import Accelerator
    except ImportError:
        if not launched:  # one plain process (e.g. inside ComfyUI) needs nothing of accelerate
            return _OneProcess()
        raise ImportError("training with several processes needs the 'accelerate' package (pip install "
                          "accelerate, or the project's 'train' extra: pip install -e .[train])") from None
    from datetime import timedelta

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # a long timeout: the main process may write a checkpoint or a teacher-cache shard while the others wait
    kwargs = [InitProcessGroupKwargs(timeout=timedelta(hours=2)),
              DistributedDataParallelKwargs(find_unused_parameters=bool(find_unused_parameters))]
    return Accelerator(device_placement=False, mixed_precision="no", cpu=bool(cpu and launched),
                       kwargs_handlers=kwargs)


class _OneProcess:
    """What :func:`run` uses of an ``Accelerator``, for one process when accelerate is not installed."""

    num_processes, process_index, is_main_process, device = 1, 0, True, torch.device("cpu")

    def prepare(self, module):
        return module

    def no_sync(self, module):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def wait_for_everyone(self) -> None:
        pass


def _launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def module_device(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def make_adamw(params: Sequence[torch.Tensor], config: LoopConfig,
               device: torch.device | str) -> tuple[torch.optim.AdamW, dict]:
    """AdamW over ``params`` with the loop's hyper-parameters and the implementation for ``device`` (module
    docstring): ``(optimizer, flags)``, ``flags`` the ``fused`` / ``foreach`` values it runs with."""
    device, params = torch.device(device), list(params)
    kw = dict(lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if device.type == "cuda" and params:
        try:
            opt = torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError) as e:  # e.g. a dtype the fused kernel does not take
            logger.info("fused AdamW refused (%s): using foreach", e)
            opt = torch.optim.AdamW(params, foreach=True, **kw)
    else:
        opt = torch.optim.AdamW(params, **kw)
    flags = {k: opt.param_groups[0].get(k) for k in ("fused", "foreach")} if params else {}
    logger.info("AdamW on %s: %s", device, "fused" if flags.get("fused") else
                "foreach" if flags.get("foreach") else "torch default")
    return opt, flags


def _use_impl(opt: torch.optim.Optimizer, flags: Mapping[str, Any]) -> None:
    """Run ``opt`` with ``flags`` (from :func:`make_adamw`) after loading a state dict written elsewhere;
    the step counts go where that implementation keeps them (fused: the parameter's device; else CPU)."""
    for g in opt.param_groups:
        g.update(flags)
        for prm in g["params"]:
            st = opt.state.get(prm, {})
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(device=prm.device if flags.get("fused") else "cpu", dtype=torch.float32)


# -- the loop -------------------------------------------------------------------------------------------


def run(
    method: Method,
    data: DataSource,
    out_dir: str | os.PathLike,
    config: LoopConfig,
    *,
    resume: bool = False,
    accelerator=None,
    device: Optional[str | torch.device] = None,
    progress: Optional[Callable[[int, int, dict], None]] = None,
    interrupt: Optional[Callable[[], bool]] = None,
    stop_after: Optional[int] = None,
) -> LoopResult:
    """Train ``method`` on ``data`` into ``out_dir``; see the module docstring.

    Args:
        resume: continue from ``out_dir/checkpoint.safetensors`` (same settings except ``steps``, which
            may grow); without it an existing checkpoint is an error (nothing is overwritten).
        accelerator: an :class:`accelerate.Accelerator` (default :func:`make_accelerator`); pass the one
            that already set up the processes (the CLI does, for the teacher-cache build).
        device: where autocast runs (default: the device of the method's module).
        progress: ``progress(step, total_steps, record)`` after each step, on every process; may raise
            to stop (the last checkpoint stays valid).
        interrupt: checked before each step; True stops after writing a checkpoint.
        stop_after: stop once this step is done, without a checkpoint (like a kill): for tests.

    Returns a :class:`LoopResult`; the final artifact is written by ``method.finalize`` when the run
    reached ``config.steps``.

    The main process holds the folder's one-writer lock (:func:`noisecraft.locks.folder_lock`) for the
    whole run: a second run on the same folder is refused at once, naming this one. (A store's shards are
    checked against their checksums as they are first read: :mod:`noisecraft.train.shards`.)
    """
    config.check()
    acc = accelerator if accelerator is not None else make_accelerator(
        find_unused_parameters=bool(getattr(method, "find_unused_parameters", False)))
    out = ensure_dir(out_dir, "output folder")
    lock = (folder_lock(out, what="training output folder", fix="wait for that run to finish or stop it, or choose "
                                                                "another output folder")
            if acc.is_main_process else contextlib.nullcontext())
    with lock:
        return _run(method, data, out, config, resume=resume, acc=acc, device=device, progress=progress,
                    interrupt=interrupt, stop_after=stop_after)


def _run(method: Method, data: DataSource, out: Path, config: LoopConfig, *, resume: bool, acc, device,
         progress, interrupt, stop_after) -> LoopResult:
    world, rank, is_main = int(acc.num_processes), int(acc.process_index), bool(acc.is_main_process)
    if config.batch_size % world:
        raise ValueError(f"the global batch ({config.batch_size}) must divide evenly over {world} processes "
                         f"(each takes batch / processes samples): choose a multiple of {world}")
    ckpt_path, log_path = out / CHECKPOINT_NAME, out / LOG_NAME
    if ckpt_path.is_file() and not resume:
        raise FileExistsError(f"{ckpt_path} exists: resume that run (resume=True / --resume) or choose another "
                              "output folder")
    if is_main:  # the one writer cleans up after a killed one (never another process's live write)
        clean_stale_temps(out)
    device = torch.device(device) if device is not None else module_device(method.module)
    amp_dtype = resolve_precision(config.precision, device)
    params = [p for p in method.module.parameters() if p.requires_grad]
    opt, impl = make_adamw(params, config, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None

    step, epoch, offset, samples, wall_prev = 0, 0, 0, 0, 0.0
    if resume and ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path, method, opt, scaler)
        _use_impl(opt, impl)  # the checkpoint's param_groups carry the writing device's implementation
        saved, now = method.settings_from(state["config"]), method.settings()
        diff = [k for k in method.resume_keys if saved.get(k) != now.get(k)]
        if diff:
            raise ValueError(
                f"{ckpt_path} was trained with other settings ("
                + ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in diff)
                + "): resume with the same settings or start a new output folder")
        ident = method.identity()
        if any(state.get(k) != v for k, v in ident.items()):
            raise ValueError(f"{ckpt_path} {method.identity_error(state)}")
        step, (epoch, offset) = int(state["step"]), state["position"]
        if step > config.steps:
            raise ValueError(fewer_steps_message(ckpt_path, step, config.steps, out / method.result_name))
        samples, wall_prev = int(state["samples"]), float(state["wall_s"])
        logger.info("resuming %s at step %d (epoch %d, offset %d)", out, step, epoch, offset)
    records = read_log(log_path, upto_step=step) if resume else []
    if is_main:
        atomic_write_text(log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    model = acc.prepare(_Step(method))
    t0, monitor = time.perf_counter(), getattr(method, "monitor", None) if is_main else None

    def checkpoint(at_step: int, position) -> None:
        if is_main:
            _save_checkpoint(ckpt_path, method, opt, scaler, {
                "step": at_step, "position": list(position), "samples": samples,
                "wall_s": wall_prev + (time.perf_counter() - t0), "config": method.settings(),
                **method.identity()})

    it = data.batches(config.batch_size, seed=config.seed, epoch=epoch, offset=offset, rank=rank, world_size=world)
    position = (epoch, offset)
    stopped = interrupted = False
    last_ckpt = step
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    log_file = open(log_path, "a", encoding="utf-8") if is_main else contextlib.nullcontext()
    with torch.inference_mode(False), torch.enable_grad(), log_file as log:
        if monitor is not None:
            monitor(step, config.steps, None)
        while step < config.steps:
            if interrupt is not None and interrupt():
                if step > last_ckpt:
                    checkpoint(step, position)
                stopped = interrupted = True
                break
            lr = lr_at(config, step)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            micro = []
            for i in range(config.grad_accum):
                batch, position = next(it)
                sync = i == config.grad_accum - 1
                with (contextlib.nullcontext() if sync else acc.no_sync(model)), autocast():
                    loss, stats = model(batch)
                loss = loss / config.grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
                micro.append({k: float(v) for k, v in stats.items()})
                samples += len(batch) * world
            rec = {"step": step + 1, **_combine(micro, acc, config.grad_accum)}
            if scaler is not None:
                scaler.unscale_(opt)
            grad_norm = float(acc.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm
                                                  else float("inf")))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            step += 1
            rec.update(lr=lr, grad_norm=grad_norm, samples=samples,
                       wall_s=round(wall_prev + time.perf_counter() - t0, 3), **method.record())
            records.append(rec)
            if is_main and (step % config.log_every == 0 or step == config.steps):
                log.write(json.dumps(rec, sort_keys=True) + "\n")
                log.flush()
            if progress is not None:
                progress(step, config.steps, rec)
            if stop_after is not None and step >= stop_after and step < config.steps:
                stopped = True  # like a kill: no checkpoint at this step
                break
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint(step, position)
                last_ckpt = step
            if monitor is not None:
                monitor(step, config.steps, rec)
    wall = wall_prev + time.perf_counter() - t0
    artifact = None
    if is_main:
        plot_losses([r["step"] for r in records], [r["loss"] for r in records], out / PLOT_NAME,
                    title=method.plot_title, validation=monitor.curve() if monitor is not None else None)
        if not stopped:
            artifact = method.finalize(out, records, {"processes": world} if world > 1 else {})
    acc.wait_for_everyone()
    return LoopResult(step, records, wall, stopped, interrupted,
                      artifact if artifact is not None else (None if stopped else out / method.result_name))


def _combine(micro: list[dict], acc, grad_accum: int) -> dict:
    """The step's statistics: per micro-batch the global value (reduced over processes: means, and
    root-mean-squares for ``*_rms`` keys), then the mean over the micro-batches (summed in order, as
    a single process always did, so one process logs exactly its own values)."""
    keys = list(micro[0])
    if acc.num_processes > 1:
        vals = torch.tensor([[m[k] ** 2 if k.endswith("_rms") else m[k] for k in keys] for m in micro],
                            dtype=torch.float64, device=acc.device)
        vals = acc.reduce(vals, reduction="mean")
        micro = [{k: (math.sqrt(v) if k.endswith("_rms") else v) for k, v in zip(keys, row)} for row in vals.tolist()]
    out = {k: 0.0 for k in keys}
    for m in micro:
        for k in keys:
            out[k] += m[k] / grad_accum
    return out


# -- checkpoints -------------------------------------------------------------------------------------


def _save_checkpoint(path: Path, method: Method, opt: torch.optim.Optimizer, scaler, state: dict) -> None:
    tensors = {f"{method.state_prefix}.{k}": v.detach() for k, v in method.module.state_dict().items()}
    opt_sd = opt.state_dict()
    for i, st in opt_sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach()
    meta = {"noisecraft.kind": f"{method.kind}_checkpoint", "state": json.dumps(state, sort_keys=True),
            "param_groups": json.dumps(opt_sd["param_groups"], sort_keys=True)}
    if scaler is not None:
        meta["scaler"] = json.dumps(scaler.state_dict(), sort_keys=True)
    write_safetensors(tensors, path, meta, digest=True)


def _load_checkpoint(path: Path, method: Method, opt: torch.optim.Optimizer, scaler) -> dict:
    what, fix = ("the training checkpoint to resume from",
                 "delete it (and resume from nothing) or choose another output folder")
    verify_safetensors(path, what=what, fix=fix)
    tensors, meta = read_safetensors(path, what=what, fix=fix)
    if meta.get("noisecraft.kind") != f"{method.kind}_checkpoint":
        raise ValueError(f"{path} is not a NoiseCraft {method.kind} checkpoint: resume from a folder this "
                         f"trainer wrote, or choose another output folder")
    prefix = method.state_prefix + "."
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    own = method.module.state_dict()
    if set(sd) != set(own) or any(own[k].shape != sd[k].shape for k in own):
        raise ValueError(f"{path}: the weights in this checkpoint do not match the {method.kind} being trained "
                         "(other model, targets, rank or shape): resume with the same settings or start a new "
                         "output folder")
    device = next(iter(own.values())).device if own else torch.device("cpu")
    method.module.load_state_dict({k: v.to(device) for k, v in sd.items()})
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v if name == "step" else v.to(device)
    opt.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
    if scaler is not None and "scaler" in meta:
        scaler.load_state_dict(json.loads(meta["scaler"]))
    return json.loads(meta["state"])


def fewer_steps_message(ckpt_path: Path, step: int, steps: int, output: Path) -> str:
    """The refusal of a resume whose ``steps`` lies below the checkpoint's step."""
    return (f"{ckpt_path} is at step {step}, but this run asks for steps = {steps} (--steps {steps}): a resume "
            f"cannot go back. Give --steps {step} or more to continue training, or use the result already in "
            f"{output} if that run finished")
