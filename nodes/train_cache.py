"""Build Teacher Cache's work inside ComfyUI (:mod:`nodes.nodes_train` declares the node; its module docstring
gives the choices): the prompts of a CONDITIONING, the guided teacher samples from seeded noise (the core's
Euler, or ComfyUI's own sampling with a given SAMPLER), and the TEACHER_CACHE that carries them to Train
Refiner (:class:`NodeTeacherCache`: the core's in-memory :class:`~noisecraft.train.TeacherCache` plus the
prompts' CONDITIONINGs). Split from ``nodes_train.py`` to keep each file under 600 lines."""

from __future__ import annotations

from typing import Optional

import torch

from ..noisecraft.msd import teacher_x0
from ..noisecraft.sigmas import ModelKind
from ..noisecraft.train.teacher_cache import TeacherCache
from . import bridge
from .comfy_lora import lora_targets
from .common import check_combo, check_int, check_number

CACHE_NAME = "Build Teacher Cache"


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

class NodeTeacherCache:
    """What travels on a TEACHER_CACHE socket: the core's :class:`TeacherCache` (``data``: in memory, or a folder)
    and the prompts: in memory, ``prompts`` (one one-entry CONDITIONING per condition id), or on disk, ``store``
    (a :class:`~noisecraft.train.cond_store.CondStore` next to the folder's shards: a batch's rows at a time,
    :mod:`nodes.train_store`)."""

    def __init__(self, data: TeacherCache, prompts: Optional[list], negative: Optional[list], store=None):
        self.data = data
        self.prompts = prompts
        self.store = store
        self.held_out: Optional[list] = None  # Load Prompts' validation split, encoded (one CONDITIONING each)
        if negative is None:
            from ..noisecraft.train.cond_store import conditioning_from_rows

            negative = [conditioning_from_rows(store.uncond())]
        self.negative = negative
        meta = data.meta
        self.kind = ModelKind.parse(meta["kind"])
        self.sigma_max = float(meta["sigma_max"])
        self.channels = int(data.shape[0])
        self.model_name = meta.get("model_name") or meta.get("model") or "unknown"
        named = {"steps": "teacher_steps", "sampler": "teacher_sampler"}  # the CLI's names of the same settings
        self.settings = {k: meta[k] if k in meta else meta[named[k]] for k in
                         ("cfg", "steps", "scheduler", "sampler", "seed", "samples_per_prompt", "guidance", "pag_scale")
                         if k in meta or named.get(k) in meta}
        if store is not None:
            self.settings.setdefault("sampler", "euler")

    @property
    def prompt_count(self) -> int:
        return len(self.prompts) if self.prompts is not None else self.store.count

    @property
    def folder(self):
        """The cache folder (None in memory)."""
        return getattr(self.data, "root", None)

    def with_data(self, data: TeacherCache) -> "NodeTeacherCache":
        """The same prompts with other samples (a filtered view of ``data``)."""
        out = NodeTeacherCache(data, self.prompts, self.negative, self.store)
        out.held_out = self.held_out
        return out

    def __len__(self) -> int:
        return self.data.total

    @property
    def noise(self) -> torch.Tensor:
        return self.data.get(range(self.data.total)).e

    @property
    def x0(self) -> torch.Tensor:
        return self.data.get(range(self.data.total)).x0

    @property
    def prompt_ids(self) -> torch.Tensor:
        return self.data.get(range(self.data.total)).cond

    def __repr__(self) -> str:
        return (f"TeacherCache({len(self)} samples, {self.prompt_count} prompts, latent {list(self.data.shape[1:])}, "
                f"{self.kind.value}, {self.model_name}, {self.settings})")


def _check_prompts(positive, prompts, clip) -> Optional[list]:
    """The texts of a Load Prompts input (None for a CONDITIONING); exactly one of the two must be connected."""
    if (positive is None) == (prompts is None):
        raise ValueError(f"{CACHE_NAME}: {'no prompts' if positive is None else 'two prompt inputs'}: connect either "
                         f"positive (CLIP Text Encode prompts, joined with Conditioning (Combine)) or prompts (Load "
                         f"Prompts, with the clip input), {'not both' if positive is not None else 'one of them'}")
    if prompts is None:
        return None
    texts = getattr(prompts, "train", None)
    if not isinstance(texts, list) or not texts:
        raise ValueError(f"{CACHE_NAME}: prompts: expected NC_PROMPTS from Load Prompts with at least one training "
                         f"prompt, got {type(prompts).__name__}")
    if clip is None or not hasattr(clip, "encode_from_tokens_scheduled"):
        raise ValueError(f"{CACHE_NAME}: prompts (from Load Prompts) are encoded by the clip input: connect the "
                         f"checkpoint's CLIP (Load Checkpoint's CLIP output), got {type(clip).__name__}")
    return texts


def _with_held_out(cache: "NodeTeacherCache", prompts, clip) -> "NodeTeacherCache":
    """Load Prompts' held-out (validation) prompts, encoded by the clip as CLIP Text Encode would, carried with the
    cache: Train Refiner validates on them when its validation_prompts input is not connected."""
    held = list(getattr(prompts, "validation", None) or [])
    if held:
        cache.held_out = [clone_conditioning([clip.encode_from_tokens_scheduled(clip.tokenize(t))[0]]) for t in held]
    return cache


def build_teacher_cache(model, positive, negative, latent, *, samples_per_prompt: int, seed: int, cfg: float,
                        steps: int, scheduler: str, node_id=None, sampler=None, prompts=None, clip=None,
                        cache_name: str = "", guidance_min: float = 0.0, guidance_max: float = 0.0) -> NodeTeacherCache:
    texts = _check_prompts(positive, prompts, clip)
    name = cache_name.strip() if isinstance(cache_name, str) else ""
    gmin = check_number(CACHE_NAME, "guidance_min", guidance_min, 0.0, None, "0 with guidance_max 0 turns it off")
    gmax = check_number(CACHE_NAME, "guidance_max", guidance_max, 0.0, None, "0 with guidance_min 0 turns it off")
    grange = None if gmin == 0 and gmax == 0 else (gmin, gmax)
    if grange is not None and not name:
        raise ValueError(f"{CACHE_NAME}: guidance_min/guidance_max (one CFG scale per sample) need a cache_name: such "
                         f"a cache trains a guidance-conditioned refiner from the shell (train-refiner --cache "
                         f"output/noisecraft_caches/<name> --guidance-range); or set both to 0")
    if name:
        cache = _build_named(model, positive, negative, latent, texts, clip, name, samples_per_prompt, seed, cfg,
                             steps, scheduler, node_id, sampler, grange)
        return _with_held_out(cache, prompts, clip)
    if texts is not None:  # in memory, encoded here as CLIP Text Encode would
        positive = [clip.encode_from_tokens_scheduled(clip.tokenize(t))[0] for t in texts]
        return _with_held_out(build_teacher_cache(model, positive, negative, latent,
                                                  samples_per_prompt=samples_per_prompt, seed=seed, cfg=cfg,
                                                  steps=steps, scheduler=scheduler, node_id=node_id, sampler=sampler),
                              prompts, clip)
    prompts = split_prompts(positive, CACHE_NAME)
    lora_targets(model, CACHE_NAME)  # before the teacher runs: a model Train Refiner cannot train
    bridge.check_conditioning(positive, "positive", CACHE_NAME, model)
    bridge.check_conditioning(negative, "negative", CACHE_NAME, model)
    n = check_int(CACHE_NAME, "samples_per_prompt", samples_per_prompt, 1, hint="set it to 1 or more")
    steps = check_int(CACHE_NAME, "steps", steps, 1,
                      hint="the teacher needs at least one guided step (the paper uses 20)")
    cfg = check_number(CACHE_NAME, "cfg", cfg, above=0.0)
    check_combo(CACHE_NAME, "scheduler", scheduler, bridge.scheduler_names())
    sampler_name = "euler" if sampler is None else bridge.sampler_name(sampler, CACHE_NAME)  # refuses ancestral/SDE
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
                                   seed=int(seed), progress=progress) if sampler is None else
                   bridge.run_sampler(model, cond, negative, e, sampler, sigmas=sigmas, cfg=cfg, seed=int(seed),
                                      progress=progress))
    x0 = torch.cat(x0s)
    if not torch.isfinite(x0).all():
        raise ValueError(f"{CACHE_NAME}: the teacher's samples contain NaN/inf; check the model, cfg and scheduler")
    meta = {"cfg": cfg, "steps": steps, "teacher_steps": steps, "scheduler": scheduler, "seed": int(seed),
            "samples_per_prompt": n, "sampler": sampler_name, "kind": kind.value, "sigma_max": float(sigmas[0]),
            "model_name": bridge.model_name(model), "host": "comfyui"}
    with torch.inference_mode(False):  # normal tensors: the trainer's autograd may save them
        data = TeacherCache.in_memory(noise.clone(), x0.clone(), torch.arange(len(prompts)).repeat_interleave(n),
                                      conds=[f"prompt {p}" for p in range(len(prompts))], meta=meta)
    return NodeTeacherCache(data, [clone_conditioning(p) for p in prompts], clone_conditioning(negative))


def _build_named(model, positive, negative, latent, texts, clip, name, samples_per_prompt, seed, cfg, steps, scheduler,
                 node_id, sampler, grange) -> NodeTeacherCache:
    """A named cache on disk (:mod:`nodes.train_store`): built, finished after a crash or interrupt, or opened."""
    from .train_store import build_named

    lora_targets(model, CACHE_NAME)
    entries = None
    if texts is None:
        entries = [e for p in split_prompts(positive, CACHE_NAME) for e in p]
        bridge.check_conditioning(positive, "positive", CACHE_NAME, model)
    bridge.check_conditioning(negative, "negative", CACHE_NAME, model)
    n = check_int(CACHE_NAME, "samples_per_prompt", samples_per_prompt, 1, hint="set it to 1 or more")
    steps = check_int(CACHE_NAME, "steps", steps, 1, hint="the teacher needs at least one guided step (the paper uses 20)")
    cfg = check_number(CACHE_NAME, "cfg", cfg, above=0.0)
    check_combo(CACHE_NAME, "scheduler", scheduler, bridge.scheduler_names())
    sampler_name = "euler" if sampler is None else bridge.sampler_name(sampler, CACHE_NAME)
    lat = bridge.prepare_latent(model, latent, CACHE_NAME)["samples"]
    try:
        data, store = build_named(model, name=name, node=CACHE_NAME, texts=texts, entries=entries, clip=clip,
                                  negative=clone_conditioning(negative), shape=tuple(lat.shape[1:]),
                                  micro_batch=int(lat.shape[0]), samples_per_prompt=n, seed=int(seed), cfg=cfg,
                                  steps=steps, scheduler=scheduler, sampler_name=sampler_name, guidance_range=grange,
                                  node_id=node_id)
    except (ValueError, FileExistsError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(CACHE_NAME) else f"{CACHE_NAME}: {msg}") from None
    return NodeTeacherCache(data, None, None, store)
