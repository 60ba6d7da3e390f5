"""NoiseRefine training inside ComfyUI: Build Teacher Cache -> Train Refiner -> Save Refiner.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3 (a
refiner LoRA, trained with multistep score distillation, MSD) and App. D (teacher: N' guided
steps; student: N = 10 unguided steps; latent MSE; LoRA on attention, conv and feed-forward
layers). The loss is :func:`noisecraft.msd.msd_loss`, the teacher :func:`noisecraft.msd.teacher_x0`,
the residual :func:`noisecraft.refine.residual_from_denoisers` (DESIGN.md, "NoiseRefine
conventions"). The model calls go through :func:`nodes.bridge.run_core`, so ComfyUI prepares the
conditioning and the model's own patches, exactly as for sampling.

Choices where the issue was silent:

* Prompts: a CONDITIONING whose entries are the prompts. One CLIP Text Encode is one prompt;
  several are joined with ComfyUI's stock "Conditioning (Combine)" (which concatenates the
  entry lists), and every entry becomes one training prompt (its own tensor and dict: SDXL
  pooled output and size keys travel with it). We do not take a multiline STRING + CLIP: that
  would re-implement text encoding inside our node, and it works with any text encoder node.
* Teacher cache (TEACHER_CACHE): in memory only (the noises, the prompt index of each sample and
  the teacher's x0 in the model's inner latent space, on the CPU), with the teacher settings and
  the model's kind / sigma_max / latent channels for checks. ComfyUI caches the node's output, so
  changing only the training settings re-uses it. Large caches produced by a separate job are
  the CLI's business (:mod:`noisecraft.train.teacher_cache` shards); not written here.
  Noises: ``samples_per_prompt`` per prompt from one ``torch.Generator(seed)`` (never the global
  RNG); the LATENT input only gives the size and channels (its batch and content are ignored).
* Trainer: LoRA pairs on ComfyUI's UNet weights of the default targets of :mod:`noisecraft.lora`
  (attention q/k/v/out, resnet conv1/conv2, feed-forward), named with ComfyUI's own
  ``unet_to_diffusers`` table in the kohya form (``lora_unet_<diffusers name>``) and bound to the
  weights with :func:`nodes.nodes_refine.map_refiner` (the mapping Load Refiner uses). UNet models
  only (SD1.x/SD2.x/SDXL); DiT/MMDiT models get a clear error. ``down`` is Kaiming-uniform (bound
  ``1/sqrt(fan_in)``) from ``torch.Generator(seed)``, ``up`` zero: the residual starts at exactly 0.
  The LoRA is applied as scoped weight functions (:class:`nodes.nodes_refine.RefinerSwitch`, on
  only for the refiner pass) whose deltas are recomputed from the trainable float32 tensors at
  every call; the forward runs in the model's compute dtype (float32 on the CPU). AdamW
  (weight decay 0), no schedule. Every optimizer step draws ``batch_size`` samples in a per-epoch
  permutation from ``torch.Generator(seed + epoch)``; samples of different prompts are handled in
  one guider run per prompt, and their losses are weighted by their share of the batch.
* ComfyUI runs nodes under ``torch.inference_mode()``: the training runs in
  ``torch.inference_mode(False)`` + ``torch.enable_grad()`` on cloned conditioning, noise and
  teacher tensors, and every other ComfyUI layer whose weight is an inference tensor gets a
  weight function for the refiner pass too, so ComfyUI's cast path hands autograd a copy (norm
  layers save their weight for backward). All of these functions are removed afterwards: the
  input MODEL is never patched or changed, also when training is interrupted.
* Progress: one tick per model call (teacher: one per step and prompt; training: 2 + N per
  prompt group and step); every tick is an interrupt point (ComfyUI's
  ``InterruptProcessingException``). An interrupted training returns nothing.
* Output: a REFINER exactly like Load Refiner's (:class:`nodes.nodes_refine.Refiner`, kohya keys,
  ``noisecraft.*`` metadata), so Refine Noise and Save Refiner take it; the loss per step goes to
  the UI as text and as the list ``noisecraft_losses``, and out as a FLOAT list.
* Save Refiner writes ``<folder>/<filename>_<counter:05>_.safetensors``, numbered the way ComfyUI's
  own savers (SaveLoRA) number theirs (:func:`nodes.common.save_path`, the counter one past the
  highest in the folder), atomically and reproducibly (:func:`noisecraft.io.write_safetensors`),
  never overwriting. The default folder is ``models/loras``, where both Load Refiner and ComfyUI's
  stock LoraLoader(ModelOnly) find it; ``noise_refiners`` keeps it out of the LoRA lists. The
  filename is refused (not sanitized) when it is empty, longer than 200 characters, or has a folder
  part ('/', '\\', '..'), so nothing is written outside that folder.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
from comfy_api.latest import io

import comfy.utils

from ..noisecraft.lora import CONVENTION, DEFAULT_TARGETS
from ..noisecraft.msd import msd_loss, teacher_x0
from ..noisecraft.io import write_safetensors
from ..noisecraft.refine import refine_with, residual_from_denoisers
from . import bridge
from .common import (check_combo, check_int, check_number, file_list_changed, node_id, sampling_inputs, save_path,
                     scheduler_input, seed_input)
from .nodes_refine import (
    FOLDER as REFINER_FOLDER,
    LORA_FOLDER,
    Refiner,
    RefinerSwitch,
    RefinerType,
    Target,
    map_refiner,
)

log = logging.getLogger(__name__)

CATEGORY = "noisecraft/train"
CACHE_NAME = "Build Teacher Cache"
TRAIN_NAME = "Train Refiner"
SAVE_NAME = "Save Refiner"
TeacherCacheType = io.Custom("TEACHER_CACHE")
SAVE_FOLDERS = [LORA_FOLDER, REFINER_FOLDER]


def _clone_value(v):
    if torch.is_tensor(v):
        return v.detach().to("cpu").clone()
    if isinstance(v, dict):
        return {k: _clone_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_clone_value(x) for x in v)
    return v


def clone_conditioning(cond: list) -> list:
    """A deep copy of a CONDITIONING with normal (non-inference) CPU tensors, for autograd."""
    with torch.inference_mode(False):
        return [[_clone_value(c[0]), _clone_value(c[1]) if len(c) > 1 else {}] for c in cond]


def split_prompts(positive, node: str) -> list[list]:
    """Each entry of a CONDITIONING as a one-entry CONDITIONING (one training prompt each)."""
    if not isinstance(positive, list) or len(positive) == 0:
        raise ValueError(
            f"{node}: no prompts: expected a CONDITIONING with at least one prompt (a CLIP Text Encode output; join "
            f"several prompts with Conditioning (Combine)), got "
            f"{'an empty list' if isinstance(positive, list) else type(positive).__name__}"
        )
    out = []
    for i, entry in enumerate(positive):
        if not isinstance(entry, (list, tuple)) or len(entry) < 1 or not torch.is_tensor(entry[0]):
            raise ValueError(f"{node}: prompt {i} of the positive CONDITIONING is not a [tensor, dict] entry; connect "
                             f"CLIP Text Encode outputs")
        out.append([[entry[0], dict(entry[1]) if len(entry) > 1 else {}]])
    return out


# -- the teacher cache -----------------------------------------------------------------------------

class TeacherCache:
    """What travels on a TEACHER_CACHE socket (CPU tensors; x0 in the model's inner latent space)."""

    def __init__(self, prompts, negative, noise, prompt_ids, x0, *, kind, sigma_max, channels, model_name,
                 settings: dict):
        self.prompts = prompts  # list of one-entry CONDITIONINGs
        self.negative = negative
        self.noise = noise  # [S, C, H, W] unit noise
        self.prompt_ids = prompt_ids  # [S] long
        self.x0 = x0  # [S, C, H, W]
        self.kind = kind
        self.sigma_max = float(sigma_max)
        self.channels = int(channels)
        self.model_name = model_name
        self.settings = dict(settings)

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    def __repr__(self) -> str:
        return (f"TeacherCache({len(self)} samples, {len(self.prompts)} prompts, latent {list(self.noise.shape[1:])}, "
                f"{self.kind.value}, {self.model_name}, {self.settings})")


def build_teacher_cache(model, positive, negative, latent, *, samples_per_prompt: int, seed: int, cfg: float,
                        steps: int, scheduler: str, node_id=None) -> TeacherCache:
    prompts = split_prompts(positive, CACHE_NAME)
    bridge.check_conditioning(positive, "positive", CACHE_NAME, model)
    bridge.check_conditioning(negative, "negative", CACHE_NAME, model)
    n = check_int(CACHE_NAME, "samples_per_prompt", samples_per_prompt, 1, hint="set it to 1 or more")
    steps = check_int(CACHE_NAME, "steps", steps, 1,
                      hint="the teacher needs at least one guided step (the paper uses 20)")
    cfg = check_number(CACHE_NAME, "cfg", cfg, above=0.0)
    check_combo(CACHE_NAME, "scheduler", scheduler, bridge.scheduler_names())
    kind = bridge.model_kind(model)
    lat = bridge.prepare_latent(model, latent, CACHE_NAME)["samples"]
    shape = tuple(lat.shape[1:])
    sigmas = bridge.get_sigmas(model, scheduler, steps)
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((len(prompts) * n, *shape), generator=g, dtype=torch.float32)
    progress = bridge.Progress(len(prompts) * (len(sigmas) - 1), node_id=node_id)
    x0s = []
    for p, cond in enumerate(prompts):
        e = noise[p * n:(p + 1) * n]

        def fn(ctx: bridge.BridgeContext, e=e):
            return teacher_x0(ctx.denoiser, e.to(ctx.device), ctx.sigmas, ctx.kind).float().cpu()

        x0s.append(bridge.run_core(model, cond, negative, torch.zeros((n, *shape)), fn, sigmas=sigmas, cfg=cfg,
                                   seed=int(seed), progress=progress))
    ids = torch.arange(len(prompts)).repeat_interleave(n)
    x0 = torch.cat(x0s)
    if not torch.isfinite(x0).all():
        raise ValueError(f"{CACHE_NAME}: the teacher's samples contain NaN/inf; check the model, cfg and scheduler")
    settings = {"cfg": cfg, "steps": steps, "scheduler": scheduler, "seed": int(seed), "samples_per_prompt": n}
    return TeacherCache(clone_conditioning_list(prompts), clone_conditioning(negative), noise, ids, x0, kind=kind,
                        sigma_max=float(sigmas[0]), channels=shape[0], model_name=bridge.model_name(model),
                        settings=settings)


def clone_conditioning_list(prompts: list) -> list:
    return [clone_conditioning(p) for p in prompts]


# -- trainable LoRA on ComfyUI weights -------------------------------------------------------------

class TrainTarget(Target):
    """A :class:`Target` whose ``down``/``up`` are trainable float32 leaves; the delta is recomputed
    at every call (no cache), so gradients reach them through ComfyUI's weight functions."""

    def __init__(self, target: Target, generator: torch.Generator):
        super().__init__(target.weight_key, target.down, target.up, target.scale)
        fan_in = self.down.shape[1]
        bound = 1.0 / math.sqrt(fan_in)
        self.down = (torch.rand(self.down.shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        self.up = torch.zeros(self.up.shape, dtype=torch.float32)
        self.down.requires_grad_(True)
        self.up.requires_grad_(True)
        self.down_shape = target.down_shape  # saved in the standard (kohya) shapes, not flattened
        self.up_shape = target.up_shape

    def params(self) -> list[torch.Tensor]:
        return [self.down, self.up]

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        d = torch.mm(self.up.to(weight.device) * self.scale, self.down.to(weight.device))
        return d.reshape(weight.shape).to(weight.dtype)

    def release(self) -> None:
        pass


def lora_keys(model) -> dict[str, str]:
    """kohya key -> ComfyUI weight key of the default targets of ``model``'s UNet."""
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    try:
        diff = comfy.utils.unet_to_diffusers(unet_config)
    except Exception:  # noqa: BLE001 - not a UNet config
        diff = {}
    out = {}
    for dname, lname in sorted(diff.items()):
        if not dname.endswith(".weight"):
            continue
        mod = dname[: -len(".weight")]
        if any(mod == t or mod.endswith("." + t) for t in DEFAULT_TARGETS):
            out["lora_unet_" + mod.replace(".", "_")] = "diffusion_model." + lname
    if not out:
        raise ValueError(
            f"{TRAIN_NAME}: this MODEL ({bridge.model_name(model)}) has no UNet layers the refiner LoRA targets "
            f"({', '.join(DEFAULT_TARGETS)}); training in ComfyUI supports UNet models (SD1.x, SD2.x, SDXL)"
        )
    return out


def new_targets(model, rank: int, alpha: float, seed: int) -> list[TrainTarget]:
    weights = dict(model.model.named_parameters())
    pairs = {}
    for key, wkey in lora_keys(model).items():
        w = weights[wkey]
        r = min(rank, w.shape[0], w[0].numel())
        pairs[key] = (torch.zeros((r, *w.shape[1:])), torch.zeros((w.shape[0], r, *([1] * (w.ndim - 2)))), alpha)
    targets = map_refiner(Refiner(pairs, {}, "new refiner"), model)
    g = torch.Generator().manual_seed(int(seed))
    return [TrainTarget(t, g) for t in targets]


class _Copier:
    """Weight/bias functions that make ComfyUI's cast path hand autograd a copy of inference-tensor
    weights and biases (see the module docstring); removed on exit."""

    @staticmethod
    def fn(weight: torch.Tensor) -> torch.Tensor:
        return weight

    def __init__(self, base_model: torch.nn.Module, skip: set):
        self.slots = []
        for name, m in base_model.named_modules():
            for attr, fattr in (("weight", "weight_function"), ("bias", "bias_function")):
                t = getattr(m, attr, None)
                if not hasattr(m, fattr) or not torch.is_tensor(t) or not t.is_inference():
                    continue
                if attr == "weight" and name in skip:
                    continue  # the LoRA's own function already makes the copy
                self.slots.append((m, fattr))

    def __enter__(self):
        self.saved = []
        for m, fattr in self.slots:
            prev = m.__dict__.get(fattr, None)
            mine = [*getattr(m, fattr), self.fn]  # any function makes comfy.ops cast with copy=True
            setattr(m, fattr, mine)
            self.saved.append((m, fattr, prev, mine))
        return self

    def __exit__(self, *exc):
        for m, fattr, prev, mine in reversed(self.saved):
            if m.__dict__.get(fattr) is mine:
                if prev is None:
                    delattr(m, fattr)
                else:
                    setattr(m, fattr, prev)
        return False


def to_refiner(targets: list[TrainTarget], keys: list[str], metadata: dict, name: str) -> Refiner:
    pairs = {}
    for key, t in zip(keys, targets):
        down = t.down.detach().to("cpu", torch.float32).clone().reshape(t.down_shape)
        up = t.up.detach().to("cpu", torch.float32).clone().reshape(t.up_shape)
        pairs[key] = (down, up, float(t.scale * t.down_shape[0]))
    return Refiner(pairs, metadata, name)


def epoch_batches(total: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Sample indices of each optimizer step: consecutive slices of per-epoch permutations."""
    out, pool, epoch = [], [], 0
    while len(out) < steps:
        while len(pool) < batch:
            pool += torch.randperm(total, generator=torch.Generator().manual_seed(int(seed) + epoch)).tolist()
            epoch += 1
        out.append(torch.tensor(pool[:batch]))
        pool = pool[batch:]
    return out


def train(model, cache: TeacherCache, *, steps: int, student_steps: int, batch_size: int, learning_rate: float,
          rank: int, alpha: float, seed: int, scheduler: Optional[str] = None, node_id=None):
    """Train a refiner LoRA on ``cache``; returns ``(Refiner, losses)``. ``model`` is not modified."""
    if not isinstance(cache, TeacherCache):
        raise ValueError(f"{TRAIN_NAME}: expected a TEACHER_CACHE from {CACHE_NAME}, got {type(cache).__name__}")
    steps = check_int(TRAIN_NAME, "steps", steps, 1, hint="set the number of optimizer steps to 1 or more")
    student_steps = check_int(TRAIN_NAME, "student_steps", student_steps, 1, hint="the paper uses 10 student steps")
    batch_size = check_int(TRAIN_NAME, "batch_size", batch_size, 1, hint="set it to 1 or more")
    rank = check_int(TRAIN_NAME, "rank", rank, 1, hint="set the LoRA rank to 1 or more")
    lr = check_number(TRAIN_NAME, "learning_rate", learning_rate, above=0.0)
    alpha = check_number(TRAIN_NAME, "alpha", alpha, 0.0, None, "0 uses alpha = rank (scale 1)")
    alpha = alpha if alpha > 0 else float(rank)
    kind = bridge.model_kind(model)
    smax = bridge.sigma_max(model)
    channels = int(model.get_model_object("latent_format").latent_channels)
    if kind != cache.kind or abs(smax - cache.sigma_max) > 1e-4 * max(1.0, smax) or channels != cache.channels:
        raise ValueError(
            f"{TRAIN_NAME}: the teacher cache was built with another model ({cache.model_name}: {cache.kind.value}, "
            f"sigma_max {cache.sigma_max:g}, {cache.channels} latent channels) than this MODEL "
            f"({bridge.model_name(model)}: {kind.value}, sigma_max {smax:g}, {channels} channels); build the cache "
            f"with the model you train"
        )
    scheduler = scheduler or cache.settings["scheduler"]
    sigmas = bridge.get_sigmas(model, scheduler, student_steps)
    batches = epoch_batches(len(cache), min(batch_size, len(cache)), steps, seed)
    groups_per_step = [len(set(cache.prompt_ids[b].tolist())) for b in batches]
    calls = 2 + (len(sigmas) - 1)
    progress = bridge.Progress(sum(groups_per_step) * calls, node_id=node_id)
    keys = list(lora_keys(model))
    losses: list[float] = []
    t0 = time.monotonic()
    with torch.inference_mode(False):
        targets = new_targets(model, rank, alpha, seed)
        params = [p for t in targets for p in t.params()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        prompts = [clone_conditioning(p) for p in cache.prompts]
        for idx in batches:
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            ids = cache.prompt_ids[idx]
            for pid in sorted(set(ids.tolist())):
                sel = idx[ids == pid]
                e = cache.noise[sel].clone()
                x0 = cache.x0[sel].clone()
                weight = len(sel) / len(idx)
                switch = RefinerSwitch(targets)

                def fn(ctx: bridge.BridgeContext, e=e, x0=x0, weight=weight, switch=switch):
                    base = ctx.model_wrap.inner_model
                    skip = {t.module_path for t in targets}

                    def d_base(x, sigma):
                        with torch.no_grad():
                            switch.enabled = False
                            return ctx.denoiser(x, sigma)

                    def d_lora(x, sigma):
                        switch.enabled = True
                        try:
                            with _Copier(base, skip):
                                return ctx.denoiser(x, sigma)
                        finally:
                            switch.enabled = False

                    def d_student(x, sigma):
                        switch.enabled = False
                        return ctx.denoiser(x, sigma)

                    with switch.attached(base), torch.enable_grad():
                        residual = residual_from_denoisers(d_base, d_lora, ctx.kind, smax)
                        loss, _ = msd_loss(lambda z: refine_with(residual, z), e.to(ctx.device), d_student,
                                           x0.to(ctx.device), ctx.sigmas, ctx.kind)
                        (loss * weight).backward()
                    return float(loss.detach())

                pos = prompts[pid]
                value = bridge.run_core(model, pos, pos, torch.zeros_like(e), fn, sigmas=sigmas, cfg=1.0,
                                        seed=int(seed), progress=progress)
                step_loss += value * weight
            opt.step()
            losses.append(step_loss)
    wall = time.monotonic() - t0
    training = {"steps": steps, "student_steps": student_steps, "batch_size": batch_size, "learning_rate": lr,
                "seed": int(seed), "scheduler": scheduler, "optimizer": "AdamW", "teacher": cache.settings,
                "prompts": len(cache.prompts), "samples": len(cache), "final_loss": losses[-1],
                "host": "comfyui", "wall_s": round(wall, 3)}
    metadata = {
        "noisecraft.kind": "refiner",
        "noisecraft.convention": CONVENTION,
        "noisecraft.model_kind": kind.value,
        "noisecraft.base_model": bridge.model_name(model),
        "noisecraft.sigma_max": repr(smax),
        "noisecraft.rank": str(rank),
        "noisecraft.alpha": repr(alpha),
        "noisecraft.targets": json.dumps(list(DEFAULT_TARGETS)),
        "noisecraft.layers": str(len(targets)),
        "noisecraft.training": json.dumps(training, sort_keys=True),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": repr(alpha),
    }
    refiner = to_refiner(targets, keys, metadata, f"trained refiner ({steps} steps)")
    log.info("%s: %d steps in %.1f s, loss %.5g -> %.5g", TRAIN_NAME, steps, wall, losses[0], losses[-1])
    return refiner, losses


# -- saving ------------------------------------------------------------------------------------------

def save_refiner(refiner: Refiner, filename: str, folder: str) -> Path:
    if not isinstance(refiner, Refiner):
        raise ValueError(f"{SAVE_NAME}: expected a REFINER from {TRAIN_NAME} or Load Refiner, got {type(refiner).__name__}")
    check_combo(SAVE_NAME, "folder", folder, SAVE_FOLDERS)
    path = save_path(folder, filename, SAVE_NAME, example="my_refiner")
    state = {}
    for key, (down, up, alpha) in refiner.pairs.items():
        state[f"{key}.lora_down.weight"] = down.to(torch.float32)
        state[f"{key}.lora_up.weight"] = up.to(torch.float32)
        state[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    meta = {str(k): str(v) for k, v in refiner.metadata.items()}
    meta.setdefault("noisecraft.kind", "refiner")
    write_safetensors(state, path, meta)
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
                *sampling_inputs(
                    model="The model to train a refiner for (the refiner only fits this model). Not modified. "
                    "Always used.",
                    positive="The training prompts: one CLIP Text Encode per prompt, joined with Conditioning "
                    "(Combine); every entry is one prompt. Always used.",
                    negative="The negative prompt of the guided teacher (often empty). Always used.",
                    latent="Gives the training size and channels (e.g. Empty Latent Image); its batch and content "
                    "are ignored. Always used.",
                ),
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
            ],
            outputs=[TeacherCacheType.Output(display_name="teacher_cache",
                                             tooltip="Noises, prompts and guided results, for Train Refiner.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, samples_per_prompt, seed, cfg, steps, scheduler):
        cache = build_teacher_cache(model, positive, negative, latent, samples_per_prompt=samples_per_prompt,
                                    seed=seed, cfg=cfg, steps=steps, scheduler=scheduler, node_id=node_id(cls))
        log.info("%s: %r", CACHE_NAME, cache)
        return io.NodeOutput(cache, ui={"text": [f"{len(cache)} teacher samples ({len(cache.prompts)} prompts)"]})


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
            "Interruptible; shows the loss. Save it with Save Refiner, use it with Refine Noise.",
            inputs=[
                io.Model.Input("model", tooltip="The model the teacher cache was built with. Not modified. Always used."),
                TeacherCacheType.Input("teacher_cache", tooltip="From Build Teacher Cache. Always used."),
                io.Int.Input("steps", default=200, min=1, max=1000000,
                             tooltip="Optimizer steps. Minimum 1."),
                io.Int.Input("student_steps", default=10, min=1, max=1000,
                             tooltip="Unguided student sampling steps N (the paper uses 10). Minimum 1."),
                io.Int.Input("batch_size", default=2, min=1, max=1024,
                             tooltip="Samples per optimizer step (capped at the cache size). Minimum 1."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-5, round=1e-8,
                               tooltip="AdamW learning rate. Must be > 0."),
                io.Int.Input("rank", default=16, min=1, max=512,
                             tooltip="LoRA rank (the paper uses 128 for SD2.1). Minimum 1."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=1.0,
                               tooltip="LoRA alpha (scale alpha / rank). 0 uses alpha = rank (scale 1)."),
                seed_input("Seed of the LoRA initialisation and the data order."),
            ],
            outputs=[
                RefinerType.Output(display_name="refiner", tooltip="The trained refiner, for Refine Noise and Save "
                                   "Refiner."),
                io.Float.Output(display_name="losses", tooltip="The MSD loss of every step.", is_output_list=True),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, teacher_cache, steps, student_steps, batch_size, learning_rate, rank, alpha, seed):
        refiner, losses = train(model, teacher_cache, steps=steps, student_steps=student_steps, batch_size=batch_size,
                                learning_rate=learning_rate, rank=rank, alpha=alpha, seed=seed,
                                node_id=node_id(cls))
        text = (f"MSD loss {losses[0]:.5g} -> {losses[-1]:.5g} in {len(losses)} steps\n"
                + ", ".join(f"{v:.5g}" for v in losses))
        return io.NodeOutput(refiner, losses, ui={"text": [text], "noisecraft_losses": losses})


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


NODES = [BuildTeacherCache, TrainRefiner, SaveRefiner]
