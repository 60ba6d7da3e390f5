"""Teacher caches on disk in ComfyUI: Build Teacher Cache with a ``cache_name``, and Load Teacher Cache.

A named cache is the CLI's teacher cache folder (:mod:`noisecraft.train.teacher_cache` and the prompt encodings
of :mod:`noisecraft.train.cond_store`) written by ComfyUI, in ``<ComfyUI output>/noisecraft_caches/<name>/``:
the same files, so a cache built here trains from the shell (``train-refiner --cache``) and a CLI-built one
trains here (Load Teacher Cache). The work is the core's: :func:`~noisecraft.train.cond_store.build_conds`
encodes the prompts a chunk at a time, :func:`~noisecraft.train.teacher_cache.build_teacher_cache` samples the
teacher a shard at a time, both resumable; this module gives them ComfyUI's text encoding (the CLIP input,
ComfyUI's own ``tokenize`` + ``encode_from_tokens_scheduled``, so SDXL size conditioning, SD3's three encoders and
any CLIP ComfyUI loads work) and ComfyUI's model (one ``CFGGuider`` run, the batch's prompts prepared by
ComfyUI's ``process_conds``, so the MODEL's patches, PAG's post-CFG function included, run in the teacher).

Choices where the issue was silent:

* Samples: sample ``i`` has the noise of ``RandomNoise(seed + i)`` for a batch of one and prompt ``i % P`` (the
  CLI's layout: any shard is a function of the seed and the prompts, so a build resumes shard by shard and an
  interrupted one gives the same bytes). ``samples_per_prompt`` x P samples, 256 per shard (the CLI's default).
  The LATENT's batch size is how many samples the teacher samples at once (an Empty Latent Image of batch 4:
  4 at a time); the in-memory cache (no name) is unchanged.
* The definition that must match to resume (else refused naming what differs): the prompts (their texts, or a
  digest of each CONDITIONING entry), the latent size, samples, seed, cfg or guidance range, steps, scheduler,
  sampler, the model's class and weight fingerprint, and the MODEL's post-CFG functions (PAG: its scale).
* Teacher samplers: the core's deterministic solvers (euler, heun, dpmpp_2m, by ComfyUI's names), which the
  CLI uses too; another SAMPLER is refused for a named cache (an unnamed cache still takes any deterministic one).
* Prompt encodings are stored in the model's dtype (what the model computes with; fp16 for a half-precision
  checkpoint) and each prompt keeps its own token count (a prompt over 75 tokens is 154 tokens, as ComfyUI
  encodes it; a batch mixing them is brought to one count the way ComfyUI batches them).
* ``guidance_min`` / ``guidance_max`` (the CLI's ``--guidance-range``): every sample gets its own CFG scale,
  drawn as the CLI draws them, stored per shard. Such a cache trains a guidance-conditioned refiner from the
  shell (``--guidance-range``); Train Refiner here trains one-scale refiners and refuses it, saying so.
* Families: SD1.x, SD2.x, SDXL and SD3 (their stored inputs have the CLI's names); other models use the
  unnamed (in-memory) cache.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import folder_paths

from ..noisecraft.guidance_embed import check_guidance_range
from ..noisecraft.locks import folder_lock
from ..noisecraft.solvers import TEACHER_SAMPLERS
from ..noisecraft.train.cond_store import (CONDS_INDEX, CondStore, build_conds, conditioning_from_rows,
                                           rows_from_conditioning)
from ..noisecraft.train.shards import INDEX_NAME
from ..noisecraft.train.teacher_cache import TeacherCache, build_teacher_cache as core_build, teacher_meta
from . import bridge
from .common import check_save_name, inside

log = logging.getLogger(__name__)

CACHES_FOLDER = "noisecraft_caches"
SHARD_SIZE = 256  # samples per shard (the CLI's --shard-size default)
CHUNK = 256  # prompts per encoding chunk (the CLI's)
LOAD_NAME = "Load Teacher Cache"
TeacherCacheType = io.Custom("TEACHER_CACHE")
_BUSY_FIX = ("wait for that build to finish (once complete, any number of runs can train from the cache at the same "
             "time), or choose another cache_name")


def caches_root() -> Path:
    return Path(folder_paths.get_output_directory()).absolute() / CACHES_FOLDER


def cache_folder(name: str, node: str) -> Path:
    """``<output>/noisecraft_caches/<name>``, the name checked like a save name (refused, never sanitized)."""
    try:
        stem = check_save_name(name, node, "my_teacher_cache")
    except ValueError as e:
        raise ValueError(str(e).replace(": filename", ": cache_name", 1).replace(
            "the file is always written into the node's models folder",
            f"the cache is always made in ComfyUI's output/{CACHES_FOLDER}")) from None
    return inside(caches_root(), caches_root() / stem, node)


def cache_names() -> list[str]:
    """The finished-or-not cache folders in ``output/noisecraft_caches`` (those holding an index)."""
    root = caches_root()
    return sorted(p.name for p in root.iterdir() if (p / INDEX_NAME).is_file()) if root.is_dir() else []


def family(model, node: str) -> str:
    """"sd" (SD1.x/SD2.x), "sdxl" or "sd3": the prompt-encoding layout of a named cache; else refused."""
    import comfy.model_base as mb

    klass = type(model.model)
    if klass is getattr(mb, "SDXL", None):
        return "sdxl"
    if klass is getattr(mb, "SD3", None):
        return "sd3"
    if klass is mb.BaseModel:
        return "sd"
    raise ValueError(f"{node}: cache_name: named (on-disk) teacher caches are made for SD1.x, SD2.x, SDXL and SD3 "
                     f"models, got {bridge.model_name(model)}; leave cache_name empty (an in-memory cache) for it")


def post_cfg_record(model) -> dict:
    """The MODEL's post-CFG functions in the cache's metadata: ComfyUI's Perturbed Attention Guidance (PAG) as
    ``{"guidance": "cfg+pag", "pag_scale": s}``, any other by its name, so a cache records its teacher."""
    fns = list((getattr(model, "model_options", None) or {}).get("sampler_post_cfg_function", []))
    rec: dict = {"guidance": "cfg"}
    others = []
    for fn in fns:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        scale = inspect.getclosurevars(fn).nonlocals.get("scale") if inspect.isfunction(fn) else None
        if "PerturbedAttentionGuidance" in name and scale is not None:
            rec.update(guidance="cfg+pag", pag_scale=float(scale), pag="ComfyUI PerturbedAttentionGuidance")
        else:
            others.append(name)
    if others:
        rec["post_cfg"] = others
    return rec


def fingerprint_digest(model) -> Optional[str]:
    """A short digest of the MODEL's weight fingerprint (:mod:`nodes.fingerprint`), recorded in a named cache."""
    from .fingerprint import model_fingerprint

    fp = model_fingerprint(model)
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16] if fp else None


def _digest(entry) -> str:
    h = hashlib.sha256()
    h.update(entry[0].detach().float().cpu().contiguous().numpy().tobytes())
    extra = entry[1] if len(entry) > 1 else {}
    for k in sorted(extra):
        v = extra[k]
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    return "conditioning sha256 " + h.hexdigest()[:32]


def clip_encoder(clip, texts_family: str, negative: list, latent_hw):
    """``encode(texts) -> (rows, uncond row)`` for :func:`build_conds`: ComfyUI's own encoding of each text
    (as CLIP Text Encode does), the negative CONDITIONING as the unconditional row."""
    def encode(texts):
        entries = []
        for t in texts:
            out = clip.encode_from_tokens_scheduled(clip.tokenize(t))
            entries.append(out[0])
        return (rows_from_conditioning(entries, texts_family, latent_hw),
                rows_from_conditioning(negative[:1], texts_family, latent_hw))

    return encode


def entries_encoder(entries: list, labels: list, texts_family: str, negative: list, latent_hw):
    """The same for prompts given as CONDITIONING entries (one per prompt, ``labels`` their digests)."""
    where = {}
    for i, label in enumerate(labels):
        where.setdefault(label, i)

    def encode(texts):
        return (rows_from_conditioning([entries[where[t]] for t in texts], texts_family, latent_hw),
                rows_from_conditioning(negative[:1], texts_family, latent_hw))

    return encode


# -- ComfyUI's model on a batch of stored prompts ------------------------------------------------------------

def prepare_batch(ctx: bridge.BridgeContext, entry: list, x_shape) -> dict:
    """One raw CONDITIONING entry for a batch (``[cond [n, L, D], dict]``) prepared as ComfyUI prepares a
    sampler's conditioning (``convert_cond`` + ``process_conds``: area, timesteps, the model's extra inputs)."""
    raw = comfy.sampler_helpers.convert_cond([entry])
    noise = torch.zeros(tuple(x_shape), device=ctx.device)
    conds = comfy.samplers.process_conds(ctx.model_wrap.inner_model, noise, {"positive": raw}, ctx.device,
                                         latent_image=noise, denoise_mask=None, seed=None)
    return conds["positive"][0]


def with_entry(ctx: bridge.BridgeContext, prepared: dict, x, sigma, *, cfg1: bool = False):
    """The guider's denoiser on ``x`` with ``prepared`` as its positive (``cfg1``: at cfg 1, no uncond pass)."""
    conds = ctx.model_wrap.conds
    saved, conds["positive"] = conds["positive"], [prepared]
    try:
        return (ctx.inverse_denoiser if cfg1 else ctx.denoiser)(x, sigma)
    finally:
        conds["positive"] = saved


def stored_denoiser(ctx: bridge.BridgeContext, store: CondStore, ids, *, cfg1: bool = True, scales=None):
    """``D(x, sigma)`` for the prompts ``ids`` of ``store`` (one row per sample): cfg 1 (training), the guider's
    cfg (``cfg1=False``: the teacher), or CFG with one scale per sample (``scales``: guidance range)."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
    entry = conditioning_from_rows(store.rows(ids))
    cache: dict = {}

    def prepared(x):
        if "p" not in cache:
            cache["p"] = prepare_batch(ctx, entry, x.shape)
        return cache["p"]

    if scales is None:
        return lambda x, sigma: with_entry(ctx, prepared(x), x, sigma, cfg1=cfg1)
    s = torch.as_tensor(scales, dtype=torch.float32)

    def guided(x, sigma):
        cond = with_entry(ctx, prepared(x), x, sigma, cfg1=True)
        conds = ctx.model_wrap.conds
        saved, conds["positive"] = conds["positive"], conds["negative"]
        try:
            uncond = ctx.inverse_denoiser(x, sigma)
        finally:
            conds["positive"] = saved
        w = s.to(cond.device, cond.dtype).reshape(-1, *([1] * (cond.ndim - 1)))
        return uncond + w * (cond - uncond)

    return guided


# -- Build Teacher Cache with a name ----------------------------------------------------------------------

def build_named(model, *, name: str, node: str, texts: Optional[list], entries: Optional[list], clip, negative,
                shape, micro_batch: int, samples_per_prompt: int, seed: int, cfg: float, steps: int, scheduler: str,
                sampler_name: str, guidance_range, node_id=None):
    """Build (or finish, or just open) the named cache; returns ``(TeacherCache, CondStore)`` of its folder."""
    root = cache_folder(name, node)
    fam = family(model, node)
    if sampler_name not in TEACHER_SAMPLERS:
        raise ValueError(f"{node}: a named cache samples its teacher with the core's solvers {list(TEACHER_SAMPLERS)} "
                         f"(ComfyUI's names; the CLI uses them too), got sampler {sampler_name!r}: connect "
                         f"KSamplerSelect with one of them, or leave cache_name empty")
    guidance_range = check_guidance_range(guidance_range)
    post = post_cfg_record(model)
    if guidance_range is not None and post["guidance"] != "cfg":
        raise ValueError(f"{node}: guidance_min/guidance_max draw each teacher's CFG scale; the MODEL carries "
                         f"{post.get('pag') or post.get('post_cfg')} (PAG teachers take one scale): remove it or set "
                         f"both to 0")
    if texts is not None:
        if clip is None:
            raise ValueError(f"{node}: prompts (from Load Prompts) need the clip input to encode them: connect the "
                             f"checkpoint's CLIP")
        labels = list(texts)
    else:
        labels = [_digest(e) for e in entries]
        if fam == "sdxl":
            sizes = {tuple((e[1] if len(e) > 1 else {}).get(k) for k in ("width", "height", "crop_w", "crop_h",
                                                                        "target_width", "target_height"))
                     for e in entries}
            if len(sizes) > 1:
                raise ValueError(f"{node}: the prompts carry different SDXL size conditioning ({len(sizes)} kinds): "
                                 f"a named cache needs one size for all prompts (use one CLIPTextEncodeSDXL setting)")
    dtype = model.model.get_dtype()
    dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    meta = {"model": bridge.model_name(model), "model_name": bridge.model_name(model), "host": "comfyui",
            "model_fingerprint": fingerprint_digest(model),
            "cfg": float(cfg), "scheduler": scheduler, "steps": int(steps), "seed": int(seed), "family": fam,
            "samples_per_prompt": int(samples_per_prompt), "sampler": sampler_name, **post}
    if guidance_range is not None:
        meta["cfg"] = list(guidance_range)
    sigmas = bridge.get_sigmas(model, scheduler, steps)
    kind = bridge.model_kind(model)
    total = len(labels) * int(samples_per_prompt)
    args = dict(shape=tuple(shape), conds=labels, total=total, sigmas=sigmas, kind=kind.value, base_seed=int(seed),
                meta=meta, shard_size=SHARD_SIZE, batch_size=int(micro_batch), guidance_range=guidance_range,
                sampler=sampler_name)
    hw = tuple(shape[-2:])
    with folder_lock(root, what="teacher cache", fix=_BUSY_FIX):
        # the definition first: a changed model, prompt set or setting is refused before any work
        try:
            TeacherCache.create(root, shape=shape, conds=labels, base_seed=int(seed), total=total,
                                meta=teacher_meta(meta, sigmas, kind.value, sampler_name, guidance_range),
                                shard_size=SHARD_SIZE)
        except ValueError as e:
            raise ValueError(_refused(root, e, meta, labels, shape)) from None
        bar = comfy.utils.ProgressBar(max(total, 1), node_id=node_id)
        encode = (clip_encoder(clip, fam, negative, hw) if texts is not None else
                  entries_encoder(entries, labels, fam, negative, hw))
        log.info("%s: %s: %d prompts, %d samples", node, root, len(labels), total)

        def encoded(done, count):
            comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel: finished chunks stay
            bar.update_absolute(done, count)

        store = build_conds(root, labels, encode, chunk=CHUNK, dtype=dtype, progress=encoded)
        cache = TeacherCache(root)
        if cache.complete:
            return cache, store

        def progress(done, work):
            comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel: finished shards stay
            bar.update_absolute(done, work)

        def fn(ctx: bridge.BridgeContext):
            def teacher(c, scales=None):
                return stored_denoiser(ctx, store, c, cfg1=False, scales=scales)

            return core_build(root, teacher, progress=progress, **args)

        first = conditioning_from_rows(store.rows([0]))
        cache = bridge.run_core(model, [first], negative, torch.zeros((int(micro_batch), *shape)), fn,
                                sigmas=sigmas, cfg=float(cfg if guidance_range is None else 1.0), seed=int(seed))
    return cache, store


_DEFINING = ("samples_per_prompt", "seed", "cfg", "steps", "scheduler", "sampler", "model", "model_fingerprint",
             "guidance", "pag_scale")


def _refused(root: Path, err: ValueError, meta: dict, labels: list, shape) -> str:
    """The core's refusal of a changed definition, with the node's inputs that differ by their names (the core
    names its index keys: ``total`` for samples_per_prompt, ``conds`` for the prompts) and the node's fix."""
    msg = str(err).replace("use another folder or delete that one",
                           "choose another cache_name, or delete that folder to build it anew")
    try:
        old = json.loads((root / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return msg
    was = old.get("meta") or {}
    diff = [f"{'model weights (fingerprint)' if k == 'model_fingerprint' else k} {was.get(k)!r} there, "
            f"{meta.get(k)!r} asked" for k in _DEFINING if was.get(k) != meta.get(k)]
    if old.get("conds") != list(labels):
        diff.append(f"the prompts ({len(old.get('conds') or [])} there, {len(labels)} asked)")
    if list(old.get("shape") or []) != list(shape):
        diff.append(f"the latent ({old.get('shape')} there, {list(shape)} asked)")
    return f"{msg} [differs: {'; '.join(diff)}]" if diff else msg


# -- Load Teacher Cache ---------------------------------------------------------------------------------------

def open_cache(name: str, path: str, node: str = LOAD_NAME):
    """``(TeacherCache, CondStore)`` of a named cache or a cache folder (``path`` wins when not empty)."""
    path = (path or "").strip() if isinstance(path, str) else ""
    if path:
        root = Path(path).expanduser()
        root = root if root.is_absolute() else caches_root() / root
    elif name:
        root = cache_folder(name, node)
    else:
        raise ValueError(f"{node}: no cache: choose a cache_name (output/{CACHES_FOLDER}) or give a path to a teacher "
                         f"cache folder (one made by Build Teacher Cache with a name, or by train-refiner --model)")
    if not (root / INDEX_NAME).is_file():
        raise ValueError(f"{node}: {root} is not a teacher cache (no {INDEX_NAME}): build one with Build Teacher "
                         f"Cache (cache_name) or `python -m noisecraft train-refiner --model ...`")
    try:
        data = TeacherCache(root)
        missing = data.missing_shards()
        if missing:
            raise ValueError(f"{root} is not finished: {len(missing)} of {data.num_shards} shards missing; queue the "
                             f"Build Teacher Cache graph (or the train-refiner command) that makes it again: it "
                             f"continues where it stopped")
        if not (root / CONDS_INDEX).is_file():
            raise ValueError(f"{root} holds no prompt encodings ({CONDS_INDEX}): it was built with --toy or "
                             f"--prompt-embeds; ComfyUI trains from caches built with --model or by Build Teacher "
                             f"Cache")
        store = CondStore(root)
    except (FileNotFoundError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(node) else f"{node}: {msg}") from None
    return data, store


class LoadTeacherCache(io.ComfyNode):
    """A teacher cache folder on disk (a named cache, or one the CLI built) as a TEACHER_CACHE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_LoadTeacherCache",
            display_name=LOAD_NAME,
            category="noisecraft/train",
            description="Opens a finished teacher cache from disk for Train Refiner (and Filter Teacher Cache): one "
            "Build Teacher Cache made with a cache_name, or one `python -m noisecraft train-refiner --model` made. "
            "Nothing is sampled; the prompts' encodings are read a batch at a time while training.",
            inputs=[
                io.Combo.Input("cache_name", options=cache_names(), optional=True,
                               tooltip="A cache in output/noisecraft_caches (Build Teacher Cache's cache_name)."),
                io.String.Input("path", default="", optional=True,
                                tooltip="A teacher cache folder elsewhere (e.g. a CLI run's <out>/teacher_cache): an "
                                "absolute path, or one relative to output/noisecraft_caches. Replaces cache_name "
                                "when not empty."),
            ],
            outputs=[TeacherCacheType.Output(display_name="teacher_cache",
                                             tooltip="The cache, for Train Refiner (train with the model it was "
                                             "built with).")],
        )

    @classmethod
    def fingerprint_inputs(cls, cache_name=None, path=""):
        try:
            data, _ = open_cache(cache_name or "", path)
            index = Path(data.root) / INDEX_NAME
            st = index.stat()
            return f"{index}:{st.st_mtime_ns}:{st.st_size}"
        except (ValueError, OSError):
            return float("nan")  # run (and report) every time

    @classmethod
    def execute(cls, cache_name=None, path=""):
        from .train_cache import NodeTeacherCache

        data, store = open_cache(cache_name or "", path)
        cache = NodeTeacherCache(data, None, None, store)
        log.info("%s: %r", LOAD_NAME, cache)
        return io.NodeOutput(cache, ui={"text": [f"{len(cache)} teacher samples ({cache.prompt_count} prompts) in "
                                                 f"{data.root}"]})
