"""NoiseRefine training inside ComfyUI: Build Teacher Cache -> Train Refiner -> Save Refiner.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3 (a
refiner LoRA, trained with multistep score distillation, MSD) and App. D (teacher: N' guided
steps; student: N = 10 unguided steps; latent MSE; LoRA on attention, conv and feed-forward
layers). Training is the core's, written once: the loop is :func:`noisecraft.train.loop.run`
(AdamW, lr schedule and warmup, accumulation, clipping, precision, checkpoint and resume, loss
log), the step is :class:`noisecraft.train.refiner.RefinerMethod` (the MSD loss of
:mod:`noisecraft.msd` on the residual of :mod:`noisecraft.refine`), the data is a
:class:`noisecraft.train.TeacherCache`; this module only puts them on a ComfyUI model.

Choices where the issue was silent:

* Prompts: a CONDITIONING whose entries are the prompts. One CLIP Text Encode is one prompt;
  several are joined with ComfyUI's stock "Conditioning (Combine)" (which concatenates the
  entry lists), and every entry becomes one training prompt (its own tensor and dict: SDXL
  pooled output and size keys travel with it). We do not take a multiline STRING + CLIP: that
  would re-implement text encoding inside our node, and it works with any text encoder node.
* Teacher cache (TEACHER_CACHE, :class:`NodeTeacherCache`): the core's
  :meth:`TeacherCache.in_memory <noisecraft.train.TeacherCache.in_memory>` (the noises, the prompt
  index of each sample and the teacher's x0 in the model's inner latent space, on the CPU; read in
  batches by the same code as the CLI's folder caches) plus the prompts' CONDITIONINGs; the teacher
  settings and the model's kind / sigma_max / latent channels are its metadata, checked by Train
  Refiner. ComfyUI caches the node's output, so changing only the training settings re-uses it.
  Noises: ``samples_per_prompt`` per prompt (prompt-major) from one ``torch.Generator(seed)`` (never
  the global RNG); the LATENT input only gives the size and channels (its batch and content are
  ignored).
* Train Refiner runs the whole loop inside ONE sampler run (:func:`nodes.bridge.run_core`, as
  ComfyUI's own training node runs inside ``TrainSampler.sample``): ComfyUI loads the model and
  prepares every prompt's conditioning once (the prompts are passed as one combined CONDITIONING;
  the denoiser of a batch runs each prompt's samples with that prompt's prepared entry, as
  ``TrainSampler`` selects its entries, cfg 1). The LoRA is :class:`nodes.comfy_lora.TrainableLoRA`
  (ComfyUI's ``LoraDiff`` adapters as weight wrappers of a clone, initialised like the core's LoRA)
  on UNets (SD1.x/SD2.x/SDXL) and DiTs (SD3/SD3.5 MMDiT, Flux-class): the target layers and file
  keys per family are :func:`nodes.comfy_lora.lora_keys`'s; any other model gets one error listing
  the supported families, before anything runs. The input MODEL is never patched or changed and
  keeps no function of ours, also when training is interrupted.
* A teacher cache from another model is refused by Train Refiner (:func:`check_cache_fits`): a
  flow model's cache with an eps/v model, or the reverse, gets its own message (the families
  differ, not just the checkpoint); another kind, sigma_max or channel count the general one; a
  cache on disk whose prompt encodings are another family's or text width (SD1.5 vs SDXL) its own.
  Defaults are the node's behaviour before the engine: fp32, constant lr, no warmup, no clipping,
  no accumulation, weight decay 0; ``batch_size`` is capped at the cache size.
* ComfyUI runs nodes under ``torch.inference_mode()``: the training runs in
  ``torch.inference_mode(False)`` on cloned conditioning, noise and teacher tensors, with the base
  weights' ``requires_grad`` off for the run (restored afterwards), so no gradient is computed for
  them or left in their ``.grad``.
* Progress and interrupt: one progress tick per optimizer step; Cancel is seen by the engine's
  ``interrupt`` check before the next step: it writes a checkpoint and stops, then the node raises
  ComfyUI's ``InterruptProcessingException`` (the UI shows the interrupt). An interrupted training
  returns nothing.
* Runs (``resume_from``): empty = a temporary folder, removed afterwards (nothing resumes). A name
  = the folder ``<ComfyUI output>/noisecraft_runs/<name>``: checkpoints every
  :data:`CHECKPOINT_EVERY` steps and at an interrupt, the loss log and plot, and the finished
  ``refiner.safetensors`` go there, and a run whose folder holds a checkpoint resumes from it (with
  the same settings; ``steps`` may grow), after an interrupt or a killed process alike.
* Output: a REFINER exactly like Load Refiner's (:class:`nodes.nodes_refine.Refiner`, kohya keys,
  ``noisecraft.*`` metadata), so Refine Noise and Save Refiner take it; the loss per step goes to
  the UI as text and as the list ``noisecraft_losses``, and out as a FLOAT list.
* Save Refiner writes ``<folder>/<filename>_<counter:05>_.safetensors`` through the core's one
  refiner writer (:func:`noisecraft.lora.save_refiner_pairs`), numbered the way ComfyUI's own savers
  (SaveLoRA) number theirs (:func:`nodes.common.save_path`, the counter one past the highest in the
  folder), never overwriting. The default folder is ``models/loras``, where both Load Refiner and
  ComfyUI's stock LoraLoader(ModelOnly) find it; ``noise_refiners`` keeps it out of the LoRA lists.
  The filename is refused (not sanitized) when it is empty, longer than 200 characters, or has a
  folder part ('/', '\\', '..'), so nothing is written outside that folder.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.utils

from ..noisecraft import lora as core_lora
from ..noisecraft.train.loop import CHECKPOINT_NAME, PRECISIONS, SCHEDULES, run
from ..noisecraft.train.refiner import RefinerMethod, RefinerTrainConfig
from . import bridge
from .train_validation import NodeValidation, validation_inputs
from .comfy_lora import TrainableLoRA, lora_keys, lora_targets  # noqa: F401 - lora_keys: public here (tests, tools)
from .common import (check_combo, check_int, check_number, file_list_changed, node_id,
                     run_folder as common_run_folder, sampling_inputs, save_path, scheduler_input, seed_input)
from .fingerprint import model_fingerprint
from .nodes_prompts import PromptsType
from .nodes_refine import FOLDER as REFINER_FOLDER, LORA_FOLDER, Refiner, RefinerType
from .train_cache import (CACHE_NAME, NodeTeacherCache, build_teacher_cache, clone_conditioning,  # noqa: F401 - public
                          split_prompts)
from .train_checkpointing import ComfyCheckpointing
from .train_store import LoadTeacherCache, fingerprint_digest, stored_denoiser

log = logging.getLogger(__name__)

CATEGORY = "noisecraft/train"
TRAIN_NAME = "Train Refiner"
SAVE_NAME = "Save Refiner"
TeacherCacheType = io.Custom("TEACHER_CACHE")
SAVE_FOLDERS = [LORA_FOLDER, REFINER_FOLDER]
CHECKPOINT_EVERY = 50  # steps between checkpoints of a named run


# -- training: the core's method and loop on a ComfyUI model -----------------------------------------

class _ComfyHost:
    """The host :class:`RefinerMethod` trains on, inside the sampler run: ``denoiser(cond_ids)`` is the
    cfg-1 model call with each sample's prompt (its entry of the guider's prepared conditioning)."""

    def __init__(self, ctx: bridge.BridgeContext, prompts: int, base_model: str, unet: torch.nn.Module,
                 store=None, offset: int = 0):
        self.table = SimpleNamespace(kind=ctx.kind)  # the student schedule comes from ComfyUI (sigmas=)
        self.base_model, self.unet, self._ctx = base_model, unet, ctx
        # a cache on disk: ids below ``offset`` are its prompts (a batch's rows read and prepared per call); the
        # prepared entries (the negative and held-out prompts of validation) are ids ``offset`` and up
        self._store, self._offset = store, int(offset)
        self.checkpointing = None  # a ComfyCheckpointing with gradient_checkpointing on
        self._entries = list(ctx.model_wrap.conds["positive"])
        if len(self._entries) != prompts:
            raise ValueError(f"{TRAIN_NAME}: ComfyUI prepared {len(self._entries)} conditioning entries for "
                             f"{prompts} prompts (area or mask conditioning?); use plain CLIP Text Encode prompts, "
                             f"joined with Conditioning (Combine)")

    def _call(self, p: int, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        conds = self._ctx.model_wrap.conds
        saved, conds["positive"] = conds["positive"], [self._entries[p]]
        try:
            return self._ctx.denoiser(x, sigma)
        finally:
            conds["positive"] = saved

    def denoiser(self, cond_ids: torch.Tensor):
        d = self._denoiser(torch.as_tensor(cond_ids, dtype=torch.long).reshape(-1).cpu())
        if self.checkpointing is not None:  # the core checkpoints the LoRA pass through d.unet (train_checkpointing)
            d.unet = self.checkpointing
        return d

    def _denoiser(self, ids: torch.Tensor):
        if self._store is not None and int(ids.max()) < self._offset:
            return stored_denoiser(self._ctx, self._store, ids, cfg1=True)
        ids = ids - self._offset
        groups = sorted(set(ids.tolist()))

        def d(x, sigma):
            if len(groups) == 1:
                return self._call(groups[0], x, sigma)
            parts, order = [], []
            for p in groups:
                sel = (ids == p).nonzero().flatten()
                dev = sel.to(x.device)
                parts.append(self._call(p, x.index_select(0, dev), sigma.index_select(0, dev.to(sigma.device))))
                order.append(sel)
            inverse = torch.empty(len(ids), dtype=torch.long)
            inverse[torch.cat(order)] = torch.arange(len(ids))
            return torch.cat(parts).index_select(0, inverse.to(x.device))

        return d


class _ComfyRefinerMethod(RefinerMethod):
    """:class:`RefinerMethod` on the ComfyUI host: ComfyUI's student schedule and device; the finished
    refiner is written by the core's writer with the node's metadata."""

    def __init__(self, host, cache, config, lora, *, sigmas, device, metadata: dict):
        super().__init__(host, cache, config, lora, None, sigmas=sigmas)
        self.device = device
        self.file_metadata = metadata

    def finalize(self, out_dir: Path, records: list, meta) -> Path:
        summary = self.monitor.summary() if self.monitor is not None else None  # held-out validation's figures
        extra = {"noisecraft.validation": json.dumps(summary, sort_keys=True)} if summary else {}
        return write_refiner(self.module.pairs(), Path(out_dir) / self.result_name, {**self.file_metadata, **extra})

    def save_best(self, path: Path, figures: dict) -> Path:
        best = json.dumps({"best": dict(figures)}, sort_keys=True)
        return write_refiner(self.module.pairs(), path, {**self.file_metadata, "noisecraft.validation": best})


def write_refiner(pairs: dict, path: Path, metadata: dict) -> Path:
    """The core's one refiner writer (kohya keys, ``noisecraft.*`` metadata, atomic)."""
    return core_lora.save_refiner_pairs(pairs, path, metadata)


def run_folder(resume_from, node: str = TRAIN_NAME) -> Optional[Path]:
    """``<output>/noisecraft_runs/<name>`` for a ``resume_from`` name; None when it is empty (off)."""
    return common_run_folder(resume_from, node, example="my_refiner_run")


def _metadata(pairs: dict, model, kind, smax: float, training: dict, targets: tuple) -> dict:
    """The refiner's metadata: the core's (:func:`noisecraft.lora.refiner_metadata`) with this model and run."""
    extra = {"noisecraft.model_kind": kind.value, "noisecraft.base_model": bridge.model_name(model),
             "noisecraft.sigma_max": repr(smax), "noisecraft.training": training}
    base_fp = model_fingerprint(model)  # which weights it was trained on (nodes/fingerprint.py)
    if base_fp is not None:
        extra["noisecraft.base_fingerprint"] = base_fp
    return core_lora.refiner_metadata(pairs, extra, targets=targets)


def check_cache_fits(model, cache: NodeTeacherCache) -> None:
    """Train Refiner's ``teacher_cache`` against its MODEL: same prediction family (eps/v vs flow), sigma_max
    and latent channels, else one error naming both models and the fix."""
    kind, smax = bridge.model_kind(model), bridge.sigma_max(model)
    channels = int(model.get_model_object("latent_format").latent_channels)
    name = bridge.model_name(model)
    if kind.is_flow != cache.kind.is_flow:
        def what(k):
            return "a flow (velocity-prediction)" if k.is_flow else f"a diffusion ({k.value}-prediction)"

        raise ValueError(
            f"{TRAIN_NAME}: teacher_cache: the teacher cache was built with another model family: expected a cache "
            f"from {what(kind)} model like this MODEL ({name}: {kind.value}, sigma_max {smax:g}), got one built with "
            f"{what(cache.kind)} model ({cache.model_name}: {cache.kind.value}, sigma_max {cache.sigma_max:g}); its "
            f"teacher samples follow the other family's path from noise to image, so the refiner would learn another "
            f"model's map. Build the teacher cache with the MODEL you train (connect the same MODEL to Build Teacher "
            f"Cache and Train Refiner)"
        )
    if kind != cache.kind or abs(smax - cache.sigma_max) > 1e-4 * max(1.0, smax) or channels != cache.channels:
        raise ValueError(
            f"{TRAIN_NAME}: the teacher cache was built with another model ({cache.model_name}: {cache.kind.value}, "
            f"sigma_max {cache.sigma_max:g}, {cache.channels} latent channels) than this MODEL "
            f"({name}: {kind.value}, sigma_max {smax:g}, {channels} channels); build the cache "
            f"with the model you train"
        )
    want = cache.data.meta.get("model_fingerprint")  # a named cache records the weights it was sampled with
    if want and fingerprint_digest(model) not in (None, want):
        log.warning("%s: the teacher cache (%s) was sampled with other weights of this architecture than this MODEL "
                    "(%s): a fine-tune or another checkpoint? The refiner learns that model's teacher; connect the "
                    "MODEL the cache was built with", TRAIN_NAME, cache.folder or "in memory", name)
    if cache.store is not None:  # on disk: its prompt encodings must be this MODEL's text inputs (a loaded cache)
        from .train_store import family

        try:
            fam = family(model, TRAIN_NAME)
        except ValueError:
            fam = None
        keys = cache.store.keys
        want = {"sd": {"cond"}, "sdxl": {"cond", "text_embeds", "time_ids"}, "sd3": {"cond", "pooled_projections"}}
        width = (getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}).get("context_dim")
        if set(keys) != want.get(fam) or (width is not None and keys["cond"][-1] != width):
            raise ValueError(
                f"{TRAIN_NAME}: teacher_cache: its prompts are encoded for another model ({cache.model_name}: "
                f"{sorted(keys)}, text width {keys['cond'][-1]}) than this MODEL ({name}: {fam or 'no cache family'}"
                f"{f', text width {width}' if width else ''}); train with the model the cache was built with"
            )


def train(model, cache: NodeTeacherCache, *, steps: int, student_steps: int, batch_size: int, learning_rate: float,
          rank: int, alpha: float, seed: int, resume_from: str = "", precision: str = "fp32",
          lr_schedule: str = "constant", warmup: int = 0, max_grad_norm: float = 0.0, grad_accum: int = 1,
          scheduler: Optional[str] = None, node_id=None, validation: Optional[NodeValidation] = None,
          gradient_checkpointing: bool = False, checkpoint_every: int = CHECKPOINT_EVERY):
    """Train a refiner LoRA on ``cache``; returns ``(Refiner, losses)``. ``model`` is not modified."""
    if not isinstance(cache, NodeTeacherCache):
        raise ValueError(f"{TRAIN_NAME}: expected a TEACHER_CACHE from {CACHE_NAME}, got {type(cache).__name__}")
    steps = check_int(TRAIN_NAME, "steps", steps, 1, hint="set the number of optimizer steps to 1 or more")
    student_steps = check_int(TRAIN_NAME, "student_steps", student_steps, 1, hint="the paper uses 10 student steps")
    batch_size = check_int(TRAIN_NAME, "batch_size", batch_size, 1, hint="set it to 1 or more")
    rank = check_int(TRAIN_NAME, "rank", rank, 1, hint="set the LoRA rank to 1 or more")
    lr = check_number(TRAIN_NAME, "learning_rate", learning_rate, above=0.0)
    alpha = check_number(TRAIN_NAME, "alpha", alpha, 0.0, None, "0 uses alpha = rank (scale 1)")
    alpha = alpha if alpha > 0 else float(rank)
    precision = check_combo(TRAIN_NAME, "precision", precision, list(PRECISIONS))
    lr_schedule = check_combo(TRAIN_NAME, "lr_schedule", lr_schedule, list(SCHEDULES))
    warmup = check_int(TRAIN_NAME, "warmup", warmup, 0, hint="0 turns warmup off")
    max_grad_norm = check_number(TRAIN_NAME, "max_grad_norm", max_grad_norm, 0.0, None, "0 turns clipping off")
    grad_accum = check_int(TRAIN_NAME, "grad_accum", grad_accum, 1, hint="1 turns accumulation off")
    out = run_folder(resume_from)
    targets = lora_targets(model)  # a model the trainer cannot handle: the supported families
    check_cache_fits(model, cache)
    if cache.data.guidance_range is not None:
        lo, hi = cache.data.guidance_range
        raise ValueError(f"{TRAIN_NAME}: this teacher cache's samples each have their own CFG scale ({lo:g}..{hi:g}, "
                         f"guidance_min/guidance_max): Train Refiner trains one-scale refiners; train it from the "
                         f"shell, `python -m noisecraft train-refiner --model <this checkpoint> --cache "
                         f"{cache.folder} --guidance-range {lo:g} {hi:g} ...`, or build the cache with both set to 0")
    kind = bridge.model_kind(model)
    smax = bridge.sigma_max(model)
    scheduler = scheduler or cache.settings["scheduler"]
    sigmas = bridge.get_sigmas(model, scheduler, student_steps)
    data = cache.data
    batch = min(batch_size, len(data))
    config = RefinerTrainConfig(
        steps=steps, lr=lr, weight_decay=0.0, warmup=warmup, lr_schedule=lr_schedule, batch_size=batch,
        grad_accum=grad_accum, max_grad_norm=max_grad_norm or None, precision=precision,
        checkpoint_every=check_int(TRAIN_NAME, "checkpoint_every", checkpoint_every, 1,
                                   hint=f"steps between checkpoints of a named run ({CHECKPOINT_EVERY} before)"),
        log_every=1, seed=int(seed), rank=rank, alpha=alpha,
        targets=targets, student_steps=student_steps, scheduler=scheduler, lora_seed=int(seed),
        gradient_checkpointing=bool(gradient_checkpointing))
    checkpointing = ComfyCheckpointing(model.model, TRAIN_NAME) if gradient_checkpointing else None
    try:
        config.check()
    except ValueError as e:
        raise ValueError(f"{TRAIN_NAME}: {e}") from None
    training = {"steps": steps, "student_steps": student_steps, "batch_size": batch_size, "learning_rate": lr,
                "seed": int(seed), "scheduler": scheduler, "optimizer": "AdamW", "teacher": cache.settings,
                "prompts": cache.prompt_count, "samples": len(cache), "host": "comfyui", "precision": precision,
                "lr_schedule": lr_schedule, "warmup": warmup, "max_grad_norm": max_grad_norm,
                "grad_accum": grad_accum, "loss": "MSD latent MSE (noisecraft.msd)",
                **({"gradient_checkpointing": True} if gradient_checkpointing else {})}
    bar = comfy.utils.ProgressBar(steps, node_id=node_id)

    def progress(step, total, record):
        if not comfy.model_management.processing_interrupted():  # else the server's hook would raise mid-run
            bar.update_absolute(step, total)

    with torch.inference_mode(False):
        lora = TrainableLoRA(model, rank, alpha, seed)
        meta = _metadata(lora.pairs(), model, kind, smax, training, targets)
        if validation is not None and validation.held_out is None and cache.held_out:
            validation.held_out = cache.held_out  # Load Prompts' validation split (Build Teacher Cache encoded it)
        extra = validation.entries(cache) if validation else []  # the negative and held-out prompts
        if cache.store is None:  # in memory: every prompt prepared once, ids 0..P-1
            prompts = [clone_conditioning(p) for p in cache.prompts]
            positive, offset = [entry for p in prompts for entry in p] + extra, 0
        else:  # on disk: a batch's prompts read and prepared per call (nodes/train_store.py), others from id P
            positive, offset = clone_conditioning(extra or cache.negative[:1]), cache.prompt_count
        patcher = model.clone()
        lora.register(patcher)
        tmp = tempfile.TemporaryDirectory(prefix="noisecraft_train_") if out is None else None
        out_dir = Path(tmp.name) if tmp is not None else out
        resume = (out_dir / CHECKPOINT_NAME).is_file()

        def fn(ctx: bridge.BridgeContext):
            lora.check_attached(patcher.model)  # loaded now: newer ComfyUI's dynamic VRAM may skip small layers
            host = _ComfyHost(ctx, len(positive), bridge.model_name(model), patcher.model, cache.store, offset)
            host.checkpointing = checkpointing
            method = _ComfyRefinerMethod(host, data, config, lora, sigmas=sigmas, device=ctx.device, metadata=meta)
            if validation is not None:  # held-out validation (nodes/train_validation.py)
                validation.bind(model, cache, host, method, out_dir, steps, node_id)
            return run(method, data, out_dir, config.loop(), resume=resume, device=ctx.device, progress=progress,
                       interrupt=comfy.model_management.processing_interrupted)

        # the base weights take no gradient (else autograd fills their .grad: the input MODEL's, and memory)
        frozen = [p for p in model.model.parameters() if p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            result = bridge.run_core(patcher, positive, positive, torch.zeros((batch, *data.shape)), fn,
                                     sigmas=sigmas, cfg=1.0, seed=int(seed))
        except (ValueError, FileExistsError) as e:
            msg = str(e) if str(e).startswith(TRAIN_NAME) else f"{TRAIN_NAME}: {e}"
            if out is not None and CHECKPOINT_NAME in msg:
                msg += f" (resume_from {resume_from!r}: {out})"
            raise ValueError(msg) from None
        finally:
            for p in frozen:
                with torch.inference_mode(p.is_inference()):  # (only allowed there for inference tensors)
                    p.requires_grad_(True)
            lora.detach(model.model)
            if tmp is not None:
                tmp.cleanup()
    if result.interrupted:
        log.info("%s: interrupted at step %d%s", TRAIN_NAME, result.step,
                 f"; checkpoint in {out}" if out is not None else "")
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise comfy.model_management.InterruptProcessingException()
    losses = [float(v) for v in result.losses]
    training.update(final_loss=losses[-1], wall_s=round(result.wall_s, 3))
    pairs = lora.pairs()
    meta = {**_metadata(pairs, model, kind, smax, training, targets), **(validation.summary() if validation else {})}
    refiner = Refiner(pairs, meta, f"trained refiner ({steps} steps)")
    log.info("%s: %d steps in %.1f s, loss %.5g -> %.5g", TRAIN_NAME, steps, result.wall_s, losses[0], losses[-1])
    return refiner, losses


# -- saving ------------------------------------------------------------------------------------------

def save_refiner(refiner: Refiner, filename: str, folder: str) -> Path:
    if not isinstance(refiner, Refiner):
        raise ValueError(f"{SAVE_NAME}: expected a REFINER from {TRAIN_NAME} or Load Refiner, got {type(refiner).__name__}")
    check_combo(SAVE_NAME, "folder", folder, SAVE_FOLDERS)
    path = save_path(folder, filename, SAVE_NAME, example="my_refiner")
    meta = {str(k): str(v) for k, v in refiner.metadata.items()}
    meta.setdefault("noisecraft.kind", "refiner")
    try:
        write_refiner(refiner.pairs, path, meta)
    except ValueError as e:
        raise ValueError(f"{SAVE_NAME}: {e}") from None
    file_list_changed(folder)
    return path


# -- nodes -------------------------------------------------------------------------------------------

class BuildTeacherCache(io.ComfyNode):
    """Guided (CFG) samples of the prompts from seeded noises: the teacher of refiner training."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_BuildTeacherCache",
            display_name=CACHE_NAME,
            category=CATEGORY,
            description="Samples every prompt with CFG from seeded noises and keeps the noises and the guided results "
            "in memory: the teacher for Train Refiner (NoiseRefine, Ahn, Kang et al., arXiv:2412.03895). Costs "
            "2 x steps model passes per sample.",
            inputs=[
                *[io.Conditioning.Input("positive", optional=True, tooltip=i.tooltip) if i.id == "positive" else i
                  for i in sampling_inputs(
                    model="The model to train a refiner for (the refiner only fits this model). Not modified. "
                    "Always used.",
                    positive="The training prompts: one CLIP Text Encode per prompt, joined with Conditioning "
                    "(Combine); every entry is one prompt. Or connect prompts (Load Prompts) instead: one of the "
                    "two.",
                    negative="The negative prompt of the guided teacher (often empty). Always used.",
                    latent="Gives the training size and channels (e.g. Empty Latent Image); its content is ignored. "
                    "Its batch size is ignored too, except with a cache_name: then it is how many samples the "
                    "teacher samples at once. Always used.",
                )],
                io.Int.Input("samples_per_prompt", default=8, min=1, max=4096,
                             tooltip="Seeded noises per prompt (training samples = prompts x this). Minimum 1."),
                seed_input("Seed of the noises (one torch.Generator for all of them)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale of the teacher: the guided look the refiner learns to give "
                               "without guidance. 1 turns guidance off (nothing to learn)."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="Teacher sampling steps (the paper uses 20). Minimum 1."),
                scheduler_input("ComfyUI scheduler of the teacher's (and, by default, the student's) schedule.",
                                bridge.scheduler_names()),
                io.Sampler.Input("sampler", optional=True, tooltip="The teacher's sampler (e.g. KSamplerSelect: the "
                                 "look your own sampler gives); deterministic only, ancestral/SDE are refused. Not "
                                 "connected: Euler (= DDIM, the paper's)."),
                PromptsType.Input("prompts", optional=True, tooltip="The training prompts from Load Prompts (a "
                                  "file: any number of prompts), encoded by the clip input; replaces positive."),
                io.Clip.Input("clip", optional=True, tooltip="Encodes the prompts input with ComfyUI's own encoding "
                              "(as CLIP Text Encode does): the checkpoint's CLIP. Used only with prompts."),
                io.String.Input("cache_name", default="", optional=True,
                                tooltip="A name: the cache is written to output/noisecraft_caches/<name>/ (the CLI's "
                                "format: train-refiner --cache trains from it), prompt encodings included; queuing the "
                                "graph again after a crash, a restart or an interrupt continues with the next "
                                "unfinished shard (a changed model, prompt set or setting is refused). Empty: the "
                                "cache lives in memory (off)."),
                io.Float.Input("guidance_min", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01, optional=True,
                               tooltip="With guidance_max: each sample's teacher CFG scale is drawn from this range "
                               "(the CLI's --guidance-range; needs a cache_name; such a cache trains a "
                               "guidance-conditioned refiner from the shell). Both 0 turn it off (cfg is used)."),
                io.Float.Input("guidance_max", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01, optional=True,
                               tooltip="Upper end of the guidance range; both 0 turn it off."),
            ],
            outputs=[TeacherCacheType.Output(display_name="teacher_cache",
                                             tooltip="Noises, prompts and guided results, for Train Refiner (in "
                                             "memory, or on disk with a cache_name).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive=None, negative=None, latent=None, samples_per_prompt=8, seed=0, cfg=7.5, steps=20,
                scheduler="normal", sampler=None, prompts=None, clip=None, cache_name="", guidance_min=0.0,
                guidance_max=0.0):  # (positive is optional now: prompts may replace it; old callers pass it 2nd)
        cache = build_teacher_cache(model, positive, negative, latent, samples_per_prompt=samples_per_prompt,
                                    seed=seed, cfg=cfg, steps=steps, scheduler=scheduler, node_id=node_id(cls),
                                    sampler=sampler, prompts=prompts, clip=clip, cache_name=cache_name,
                                    guidance_min=guidance_min, guidance_max=guidance_max)
        log.info("%s: %r", CACHE_NAME, cache)
        where = f" in {cache.folder}" if cache.folder is not None else ""
        return io.NodeOutput(cache, ui={"text": [f"{len(cache)} teacher samples ({cache.prompt_count} prompts){where}"]})


class TrainRefiner(io.ComfyNode):
    """Train a refiner LoRA with MSD on a teacher cache; outputs a REFINER and the loss history."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_TrainRefiner",
            display_name=TRAIN_NAME,
            category=CATEGORY,
            description="Trains a NoiseRefine refiner LoRA (Ahn, Kang et al., arXiv:2412.03895) with multistep score "
            "distillation: unguided sampling from the refined noise learns to land on the guided teacher's result. "
            "Interruptible and resumable (resume_from); shows the loss. Save it with Save Refiner, use it with Refine "
            "Noise.",
            inputs=[
                io.Model.Input("model", tooltip="The model the teacher cache was built with. Not modified. Always used."),
                TeacherCacheType.Input("teacher_cache", tooltip="From Build Teacher Cache. Always used."),
                io.Int.Input("steps", default=200, min=1, max=1000000,
                             tooltip="Optimizer steps. Minimum 1."),
                io.Int.Input("student_steps", default=10, min=1, max=1000,
                             tooltip="Unguided student sampling steps N (the paper uses 10). Minimum 1."),
                io.Int.Input("batch_size", default=2, min=1, max=1024,
                             tooltip="Samples per optimizer step (per micro-batch with grad_accum; capped at the cache "
                             "size). Minimum 1."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-5, round=1e-8,
                               tooltip="AdamW learning rate. Must be > 0."),
                io.Int.Input("rank", default=16, min=1, max=512,
                             tooltip="LoRA rank (the paper uses 128 for SD2.1). Minimum 1."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=1.0,
                               tooltip="LoRA alpha (scale alpha / rank). 0 uses alpha = rank (scale 1)."),
                seed_input("Seed of the LoRA initialisation and the data order."),
                io.String.Input("resume_from", default="", optional=True,
                                tooltip="Name of a run folder (output/noisecraft_runs/<name>): checkpoints, the loss "
                                "log and the finished refiner go there, and a run whose folder holds a checkpoint "
                                "continues from it (after an interrupt or a crash; same settings, steps may grow). "
                                "Empty turns it off (nothing is kept, nothing resumes)."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="fp32", optional=True,
                               tooltip="Compute precision of training: fp32 (off: full precision), bf16 / fp16 "
                               "autocast (LoRA weights and optimizer stay fp32; fp16 uses a gradient scaler), auto = "
                               "bf16 on GPUs that support it, else fp16, fp32 on the CPU."),
                io.Combo.Input("lr_schedule", options=list(SCHEDULES), default="constant", optional=True,
                               tooltip="Learning-rate schedule after warmup: constant (off) or cosine (down to 10% of "
                               "learning_rate at the last step)."),
                io.Int.Input("warmup", default=0, min=0, max=1000000, optional=True,
                             tooltip="Steps of linear learning-rate warmup. 0 turns it off."),
                io.Float.Input("max_grad_norm", default=0.0, min=0.0, max=1000.0, step=0.1, round=0.001,
                               optional=True,
                               tooltip="Clip the gradient norm of each step to this value. 0 turns clipping off."),
                io.Int.Input("grad_accum", default=1, min=1, max=1024, optional=True,
                             tooltip="Micro-batches of batch_size accumulated per optimizer step (a step sees "
                             "batch_size x grad_accum samples). 1 turns accumulation off."),
                *validation_inputs(),  # validate_every, validation_seeds, validation_prompts, vae
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute the refiner pass block by block in backward instead of keeping its "
                                 "activations: much less memory (SDXL rank 256 batch 2 fits 24 GB with it), about one "
                                 "more forward pass of time; same loss and gradients. Off: as before."),
                io.Int.Input("checkpoint_every", default=CHECKPOINT_EVERY, min=1, max=1000000, optional=True,
                             tooltip="Steps between the checkpoints of a named run (resume_from); an interrupt writes "
                             "one too. A checkpoint holds the LoRA and its two AdamW moments (9 GB at SDXL rank 256): "
                             "raise it for large ranks."),
            ],
            outputs=[
                RefinerType.Output(display_name="refiner", tooltip="The trained refiner, for Refine Noise and Save "
                                   "Refiner."),
                io.Float.Output(display_name="losses", tooltip="The MSD loss of every step.", is_output_list=True),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, teacher_cache, steps, student_steps, batch_size, learning_rate, rank, alpha, seed,
                resume_from="", precision="fp32", lr_schedule="constant", warmup=0, max_grad_norm=0.0, grad_accum=1,
                gradient_checkpointing=False, checkpoint_every=CHECKPOINT_EVERY, **validation):
        shown = NodeValidation(**validation)  # validate_every, ... (nodes/train_validation.py)
        refiner, losses = train(model, teacher_cache, steps=steps, student_steps=student_steps, batch_size=batch_size,
                                learning_rate=learning_rate, rank=rank, alpha=alpha, seed=seed,
                                resume_from=resume_from, precision=precision, lr_schedule=lr_schedule, warmup=warmup,
                                max_grad_norm=max_grad_norm, grad_accum=grad_accum, node_id=node_id(cls),
                                validation=shown, gradient_checkpointing=gradient_checkpointing,
                                checkpoint_every=checkpoint_every)
        text = (f"MSD loss {losses[0]:.5g} -> {losses[-1]:.5g} in {len(losses)} steps\n"
                + ", ".join(f"{v:.5g}" for v in losses))
        return io.NodeOutput(refiner, losses, ui={"text": [text], "noisecraft_losses": losses, **shown.ui()})


class SaveRefiner(io.ComfyNode):
    """Write a REFINER as a kohya LoRA safetensors with noisecraft.* metadata."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_SaveRefiner",
            display_name=SAVE_NAME,
            category=CATEGORY,
            description="Saves a refiner LoRA (.safetensors, kohya keys, noisecraft.* metadata) that Load Refiner and "
            "ComfyUI's LoRA loaders read. Never overwrites: a counter is appended (<filename>_00001_.safetensors, "
            "numbered like ComfyUI's own savers).",
            inputs=[
                RefinerType.Input("refiner", tooltip="From Train Refiner (or Load Refiner). Always used."),
                io.String.Input("filename", default="noisecraft_refiner",
                                tooltip="File name without folder; '_00001_.safetensors' (the next counter, as "
                                "ComfyUI's savers number files) is appended."),
                io.Combo.Input("folder", options=SAVE_FOLDERS, default=LORA_FOLDER,
                               tooltip="models/loras (Load Refiner and the stock LoRA loaders see it) or "
                               "models/noise_refiners (only Load Refiner lists it)."),
            ],
            outputs=[io.String.Output(display_name="refiner_name", tooltip="The saved file's name, as Load Refiner "
                                      "lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, refiner, filename, folder):
        path = save_refiner(refiner, filename, folder)
        log.info("%s: wrote %s", SAVE_NAME, path)
        return io.NodeOutput(path.name, ui={"text": [str(path)], "noisecraft_saved": [path.name]})


NODES = [BuildTeacherCache, TrainRefiner, SaveRefiner, LoadTeacherCache]
