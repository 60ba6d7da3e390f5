"""``train-refiner --cache DIR`` on a teacher cache ComfyUI built (issue 17, cache interchange).

ComfyUI's Build Teacher Cache with a ``cache_name`` writes the CLI's cache format (``nodes/train_store.py``): the
teacher cache (:mod:`noisecraft.train.teacher_cache`) and the prompt encodings
(:mod:`noisecraft.train.cond_store`), its index meta saying ``"host": "comfyui"``. Such a folder trains here as
it is: nothing is sampled or encoded again, and :mod:`noisecraft.cli_train` calls, in this order,
:func:`open_comfy_cache` (before ``--preset`` fills its flags), :func:`adopt_comfy_cache` (after),
:func:`check_model_fits` (once the model is loaded) and :func:`use_comfy_cache` (the cache to train from).

Choices where the issue left one open:

* Prompts: the cache's (its ``conds`` labels: the prompt texts, or ``conditioning sha256 ...`` digests of
  CONDITIONING entries); ``--prompts`` is not needed. Given, its training prompts (after ``--prompt-validation``
  and the other prompt flags) must be the cache's, in order, else refused naming the first difference; a cache
  built from CONDITIONING entries has no texts to compare, so ``--prompts`` is refused there.
* Teacher flags: a flag given on the command line with another value than the cache's is REFUSED (one line
  naming the flag and the cache's value), as a CLI cache refuses a changed definition: ``--cfg``,
  ``--pag-scale``, ``--guidance-range``, ``--samples``, ``--teacher-steps``, ``--teacher-sampler``,
  ``--scheduler``, ``--seed-base`` and ``--latent-shape``; ``--pag-layers``, ``--negative`` and
  ``--prompt-embeds`` are refused outright (the cache holds ComfyUI's PAG, its negative prompt's encoding and
  its prompts' encodings). A flag equal to the cache's value is accepted. Flags not given take the cache's
  values (a ``--preset`` value that differs is replaced, with a log line). ``--shard-size`` and the teacher's
  micro-batch do not apply to a finished cache.
* The student's schedule is the teacher's (``--scheduler``, as for every CLI run): a cache sampled on a ComfyUI
  schedule the CLI does not have (beta, ...) is refused; Train Refiner in ComfyUI trains from it.
* A guidance-range cache (ComfyUI's guidance_min/max) trains a guidance-conditioned refiner: ``--guidance-range``
  is the cache's range (given equal, or taken from the cache).
* The model must fit: its kind (eps / v / flow), sigma_max, family (SD1.x/SD2.x, SDXL, SD3), latent
  channels (and patch size) and conditioning width (the network's cross-attention width; SDXL/SD3 also the
  pooled width) against the cache's; else one line naming both and the fix. Its weights are not compared
  (the cache's ``model_fingerprint`` is ComfyUI's digest); train with the checkpoint the cache was built with.
* ``--validate-every``: the held-out prompts are ``--prompt-validation N`` prompts of ``--prompts FILE``
  (whose training prompts must be the cache's), encoded by the folder's text encoders; the validation's
  teacher is the cache's (its cfg, PAG scale on diffusers' default PAG layers, steps, schedule; Euler, as every
  CLI validation's teacher) with the cache's negative-prompt encoding. Refused for a cache built from CONDITIONING entries (no texts), for a
  guidance-range cache (as for any), and for a model carrying other post-CFG functions (the CLI cannot
  reproduce that teacher).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .cli_args import Refused

__all__ = ["ComfyCache", "open_comfy_cache", "adopt_comfy_cache", "check_model_fits", "use_comfy_cache",
           "SEED_BASE_DEFAULT"]

SEED_BASE_DEFAULT = 10_000  # train-refiner's --seed-base when not given (None in the parser: given is told apart)
_DIGEST = "conditioning sha256 "
_FAMILY_NAMES = {"sd": "SD1.x/SD2.x", "sdxl": "SDXL", "sd3": "SD3"}
_KIND_NAMES = {"eps": "eps-prediction", "v": "v-prediction", "flow": "flow-matching"}


@dataclass
class ComfyCache:
    """A complete teacher cache folder ComfyUI built, and what the CLI takes from it."""

    root: Path
    cache: object  # TeacherCache
    store: object  # CondStore
    meta: dict

    @property
    def prompts(self) -> list:
        return list(self.cache.conds)

    @property
    def from_entries(self) -> bool:
        """True when the prompts were CONDITIONING entries (labels are digests, no texts)."""
        return any(isinstance(p, str) and p.startswith(_DIGEST) for p in self.prompts)

    @property
    def model(self) -> str:
        return str(self.meta.get("model_name") or self.meta.get("model") or "unknown")

    @property
    def cfg(self) -> Optional[float]:
        return None if self.meta.get("guidance_range") is not None else float(self.meta["cfg"])

    @property
    def pag_scale(self) -> float:
        return float(self.meta.get("pag_scale", 0.0)) if self.meta.get("guidance") == "cfg+pag" else 0.0

    def values(self) -> dict:
        """The cache's value of each teacher flag (by its argparse dest)."""
        m = self.meta
        r = m.get("guidance_range")
        return {"cfg": self.cfg, "pag_scale": self.pag_scale, "guidance_range": None if r is None else list(r),
                "samples": int(self.cache.total), "teacher_steps": int(m.get("teacher_steps", m.get("steps", 0))),
                "teacher_sampler": str(m.get("teacher_sampler", m.get("sampler", "euler"))),
                "scheduler": str(m.get("scheduler", "normal")),
                "seed_base": int(self.cache._index["base_seed"]), "latent_shape": list(self.cache.shape)}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _text(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(_text(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a).strip().lower() == str(b).strip().lower()


def open_comfy_cache(args: argparse.Namespace) -> Optional[ComfyCache]:
    """The ``--cache`` folder as a :class:`ComfyCache` when ComfyUI built it (None otherwise: a CLI cache, or no
    folder yet). Checked before any work and before ``--preset`` fills its flags: the cache is complete, the
    flags given on the command line agree with it, and ``--prompts`` (if given) holds its prompts."""
    from .train import TeacherCache
    from .train.cond_store import CONDS_INDEX, CondStore
    from .train.shards import INDEX_NAME

    if not getattr(args, "cache", None) or not (Path(args.cache) / INDEX_NAME).is_file():
        return None
    root = Path(args.cache)
    cache = TeacherCache(root)
    meta = cache.meta
    if meta.get("host") != "comfyui":
        return None
    where = f"--cache {root}"
    if args.toy:
        raise Refused(f"{where} was built in ComfyUI with {meta.get('model_name') or meta.get('model')}: train it with "
                      f"that model as a diffusers folder (--model DIR), not --toy")
    missing = cache.missing_shards()
    if missing:
        raise Refused(f"{where}: this ComfyUI teacher cache is not finished ({len(missing)} of {cache.num_shards} "
                      f"shards missing): queue its Build Teacher Cache graph again in ComfyUI (it continues where it "
                      f"stopped), then train from it")
    if not (root / CONDS_INDEX).is_file():
        raise Refused(f"{where}: no prompt encodings ({CONDS_INDEX}) next to the teacher samples: queue its Build "
                      f"Teacher Cache graph again in ComfyUI to finish it")
    try:
        store = CondStore(root)
    except (ValueError, OSError) as exc:
        raise Refused(f"{where}: {exc}") from None
    gone = [j for j in range(store.num_chunks) if not store.chunk_path(j).is_file()]
    if gone or store.count != len(cache.conds):
        raise Refused(f"{where}: its prompt encodings are incomplete ({store.count} encoded of {len(cache.conds)} "
                      f"prompts, {len(gone)} chunk(s) missing): queue its Build Teacher Cache graph again in ComfyUI")
    comfy = ComfyCache(root, cache, store, meta)
    _check_given(args, comfy, where)
    return comfy


def _check_given(args: argparse.Namespace, comfy: ComfyCache, where: str) -> None:
    """Refuse a teacher flag given with another value than the cache's (see the module docstring)."""
    built = f"{where} was built in ComfyUI"
    for dest, have in comfy.values().items():
        given = getattr(args, dest, None)
        if given is None:
            continue
        if dest == "guidance_range" and have is None:
            raise Refused(f"--guidance-range {_text(given)}: {built} with one CFG scale ({_text(comfy.cfg)}), not a "
                          f"guidance range: leave --guidance-range out (or build the cache with guidance_min/max)")
        if have is None:  # --cfg on a guidance-range cache
            raise Refused(f"{_flag(dest)} {_text(given)}: {built} with a CFG scale per sample in "
                          f"{_text(comfy.meta['guidance_range'])} (guidance range): leave {_flag(dest)} out")
        if not _same(given, have):
            raise Refused(f"{_flag(dest)} {_text(given)}: {built} with {_flag(dest)} {_text(have)} (its teacher "
                          f"settings are fixed): leave {_flag(dest)} out to train from it, or build another cache")
    if args.pag_layers:
        raise Refused(f"--pag-layers: {built} (its teacher's PAG, if any, is ComfyUI's): leave --pag-layers out")
    if args.negative:
        raise Refused(f"--negative: {built} with the encoding of its own negative prompt (ComfyUI's negative "
                      f"input): leave --negative out")
    if args.prompt_embeds:
        raise Refused(f"--prompt-embeds: {built} with its prompts' encodings: leave --prompt-embeds out")


def _check_prompts(args: argparse.Namespace, comfy: ComfyCache, built: str) -> None:
    from .cli_args import read_prompt_flags

    if comfy.from_entries:
        raise Refused(f"--prompts {args.prompts}: {built} from CONDITIONING entries (no prompt texts to compare): "
                      f"leave --prompts out (it trains on the cache's prompts)")
    mine, theirs = read_prompt_flags(args), comfy.prompts
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            raise Refused(f"--prompts {args.prompts}: training prompt {i + 1} is {a!r} but the cache's prompt {i + 1} "
                          f"is {b!r}: {built} on other prompts; leave --prompts out to train on the cache's")
    if len(mine) != len(theirs):
        raise Refused(f"--prompts {args.prompts}: {len(mine)} training prompts but {built} on {len(theirs)} "
                      f"(the first {min(len(mine), len(theirs))} agree): leave --prompts out to train on the cache's")


def adopt_comfy_cache(args: argparse.Namespace, comfy: ComfyCache, log: logging.Logger) -> None:
    """After ``--preset``: every teacher flag takes the cache's value (a preset value that differs is logged as
    replaced); the student's schedule must be one the CLI has; the validation flags are checked for it."""
    from .presets import PRESETS
    from .sigmas import SCHEDULERS
    from .train.validation import check_held_out, held_out_seeds

    log.info("--cache %s: a teacher cache built in ComfyUI (%s, %d prompts, %d samples): training from it as it is",
             comfy.root, comfy.model, len(comfy.prompts), comfy.cache.total)
    args._comfy_cache = True  # validation keeps the cache's negative-prompt rows (noisecraft.cli_validation)
    preset = {s.dest for s in PRESETS.get(getattr(args, "preset", None) or "", ())}
    for dest, have in comfy.values().items():
        now = getattr(args, dest, None)
        if dest in preset and now is not None and not _same(now, have):
            log.info("  %s %s: the cache's (the preset's %s not used)", _flag(dest), _text(have), _text(now))
        setattr(args, dest, have)
    if args.prompts:  # (after --preset: its --prompt-validation splits the file)
        _check_prompts(args, comfy, f"--cache {comfy.root} was built in ComfyUI")
    if args.scheduler not in SCHEDULERS:
        raise Refused(f"--cache {comfy.root}: its teacher sampled on ComfyUI's {args.scheduler!r} schedule, which the "
                      f"CLI's student (it takes the teacher's schedule) does not have ({', '.join(SCHEDULERS)}): "
                      f"train it in ComfyUI (Train Refiner), or build the cache with one of those schedulers")
    if not args.validate_every:
        return
    stop = "or leave --validate-every out (give --validate-every 0 with a --preset)"
    if comfy.from_entries:
        raise Refused(f"--validate-every: --cache {comfy.root} was built from CONDITIONING entries, so there are no "
                      f"prompt texts to hold out and encode: build it from prompt texts (Load Prompts + clip), {stop}")
    if not args.prompts:
        raise Refused(f"--validate-every: the held-out prompts are --prompt-validation N prompts of --prompts FILE "
                      f"(its other prompts must be the cache's): give both, {stop}")
    if args.guidance_range is not None:
        raise Refused(f"--validate-every: --cache {comfy.root} is a guidance-range cache; validation of a "
                      f"guidance-conditioned refiner is not supported yet: {stop}")
    if comfy.meta.get("post_cfg"):
        raise Refused(f"--validate-every: the cache's teacher ran ComfyUI post-CFG functions "
                      f"{comfy.meta['post_cfg']} the CLI cannot reproduce for the held-out teacher: {stop}")
    _, seeds = held_out_seeds(args.prompt_validation, args.validation_seeds or 2, args.validation_seed_base)
    try:
        check_held_out(seeds, args.seed_base, args.samples)
    except ValueError as exc:
        raise Refused(f"--validation-seed-base {args.validation_seed_base}: {exc}") from None


def check_model_fits(comfy: ComfyCache, host, shape, args: argparse.Namespace) -> None:
    """Before any work: the --model must be the kind of model the cache was sampled with (kind, sigma_max,
    family, latent channels, conditioning widths); else one line naming both and the fix."""
    from .hosts.diffusers import check_latent_shape
    from .sigmas import get_sigmas

    model, theirs = args.model, f"the cache's model ({comfy.model}, built in ComfyUI)"
    fix = f"give --model the diffusers folder of the checkpoint {comfy.root} was built with"
    made, kind = str(comfy.meta.get("kind")), host.table.kind.value
    if made != kind:
        raise Refused(f"--model {model} is {_KIND_NAMES.get(kind, kind)} ({kind}) but {theirs} is "
                      f"{_KIND_NAMES.get(made, made)} ({made}): a refiner learns from its own model's teacher; {fix}")
    smax = float(get_sigmas(host.table, args.scheduler, args.teacher_steps)[0])
    cmax = float(comfy.meta["sigma_max"])
    if abs(smax - cmax) > 1e-4 * max(1.0, smax):
        raise Refused(f"--model {model}'s schedule starts at sigma_max {smax:.6g} but {theirs} started at {cmax:.6g} "
                      f"(another noise schedule, e.g. zero-terminal-SNR, or another model): {fix}")
    fam = comfy.meta.get("family")
    if fam is not None and fam != host.family:
        raise Refused(f"--model {model} is {_FAMILY_NAMES.get(host.family, host.family)} but {theirs} is "
                      f"{_FAMILY_NAMES.get(fam, fam)}: {fix}")
    try:
        check_latent_shape(host.unet, shape, "the cache's latent", batched=False)
    except ValueError as exc:
        raise Refused(f"--cache {comfy.root}: {exc}; {fix}") from None
    cfg = host.unet.config
    sd3 = host.family == "sd3"
    widths = {"cond": ("joint_attention_dim" if sd3 else "cross_attention_dim",
                       int(cfg.joint_attention_dim if sd3 else cfg.cross_attention_dim))}
    if host.family == "sdxl":
        widths["text_embeds"] = ("projection_class_embeddings_input_dim - 6 x addition_time_embed_dim",
                                 int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim))
    if sd3:
        widths["pooled_projections"] = ("pooled_projection_dim", int(cfg.pooled_projection_dim))
    keys = comfy.store.keys
    for key, (what, want) in widths.items():
        have = keys.get(key)
        if have is None:
            raise Refused(f"--cache {comfy.root} holds no {key!r} prompt rows ({sorted(keys)}), which "
                          f"{_FAMILY_NAMES.get(host.family)} --model {model} needs: {fix}")
        if int(have[-1]) != want:
            raise Refused(f"--cache {comfy.root}: its prompt encodings ({key}) are {have[-1]} wide but --model "
                          f"{model}'s {what} is {want}: they come from another text encoder and model; {fix}")


def use_comfy_cache(comfy: ComfyCache, host):
    """The cache to train from; the host reads each batch's prompt rows from its encodings."""
    host.use_conds(comfy.store)
    return comfy.cache
