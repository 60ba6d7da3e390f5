"""Teacher filter: keep the top-N samples of a teacher cache by a pluggable scorer.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), App. D: "for SD2.1
and SDXL, we generated images for all datasets with guidance and retained only the top-N samples
ranked by AES (Schuhmann, 2022) scores"; App. A counts one VAE decode per generated sample.

The filter scores every sample of a complete :class:`~noisecraft.train.TeacherCache` (its guided
``x0``, decoded to an image first when there is a decoder), keeps the ``keep`` best and returns a
*view* of the same store (:meth:`TeacherCache.subset`): no sample is copied, the view is a cache of N
samples (sample ``i`` of the view is stored sample ``cache.kept_from[i]``), so
:meth:`TeacherCache.batches`, the trainer and the checkpoint's data position work unchanged over the
kept samples, and a resume on the same view is exact. The record of the filter (scorer, kept N of
M, the score threshold) is in the view's index and its ``meta["filter"]``, so the trainer writes it
into the refiner's metadata (``training.teacher.filter``).

The scorer interface (:data:`Scorer`)::

    score(images, cond_ids) -> scores          # higher is better
    images:   [n, 3, H, W] float32 in [0, 1]   decoded by the model's VAE (``decode``), or, when there
              is no decoder, the cache's x0 latents [n, C, h, w] as they are (the toy model: its
              8x8 "latent" is the image itself, in [-1, 1])
    cond_ids: [n] int64                        the samples' condition ids: indices into ``cache.conds``
    scores:   [n] finite floats (a tensor or anything ``torch.as_tensor`` takes)

A scorer that also wants the prompt text declares a keyword parameter named ``prompts``: it is then
called as ``score(images, cond_ids, prompts=[cache.conds[i] for i in cond_ids])``.

Scorers by name (:func:`resolve_scorer`): the registry (:func:`register_scorer`, :func:`scorer_names`)
or a ``"package.module:function"`` import spec naming a scorer (the function itself). Shipped,
without any download:

* ``sharpness``: variance of the Laplacian of the image's luma (Pech-Pacheco et al., ICPR 2000), a
  classical no-reference focus / detail measure. It drops blurry, flat, washed-out samples; it is not
  an aesthetic model: it rewards noise, grain and hard edges as much as real detail, and grows with
  contrast (a dark or low-contrast image scores low whatever its content).
* ``colorfulness``: Hasler and Suesstrunk's colourfulness metric (SPIE 2003; it tracked their
  observers' colourfulness ratings closely): spread and mean of the opponent colour channels rg, yb.
  It drops greyish, desaturated samples; it rewards over-saturation just as much, and it marks every
  intentionally monochrome image as poor.
* ``aesthetic``: the LAION aesthetic score the paper filters by (:mod:`noisecraft.train.aesthetic`; needs
  ``transformers`` and its weights in ``$NOISECRAFT_AESTHETIC``, nothing is downloaded).
* ``toy-classifier`` (registered by the command line, :mod:`noisecraft.cli_train`, never imported by
  this package): the shipped toy digit classifier's probability of the target digit
  (:func:`noisecraft.hosts.toy.toy_confidence_scorer`), on the toy's x0.

Plugging in an aesthetic model (the paper's AES is the LAION "improved aesthetic predictor": an MLP
on CLIP ViT-L/14 image embeddings). Nothing here downloads it; a user module does, e.g.
``my_scorers.py`` on ``PYTHONPATH``::

    import torch
    from transformers import CLIPModel, CLIPProcessor

    _clip = _mlp = _proc = None

    def aesthetic(images, cond_ids):                 # images [n, 3, H, W] in [0, 1]
        global _clip, _mlp, _proc
        if _clip is None:
            _clip = CLIPModel.from_pretrained("openai/clip-vit-large-patch14").eval()
            _proc = CLIPProcessor.from_pretrained("openai/clip-vit-large-patch14")
            _mlp = load_the_aesthetic_mlp()          # the predictor's linear head, your weights
        with torch.no_grad():
            pixels = _proc(images=list(images), return_tensors="pt", do_rescale=False)["pixel_values"]
            emb = torch.nn.functional.normalize(_clip.get_image_features(pixel_values=pixels), dim=-1)
            return _mlp(emb).reshape(-1)

then ``python -m noisecraft train-refiner ... --keep 0.5 --scorer my_scorers:aesthetic``, or in
Python ``filter_teacher_cache(cache, "my_scorers:aesthetic", keep=512, decode=...)``, or in ComfyUI
the Filter Teacher Cache node's ``custom_scorer`` input.

Choices where the issue was silent:

* ``keep``: an int is a count N in 1..M; a float in (0, 1] a fraction, N = fraction * M rounded half
  up, at least 1. The top N are the N highest scores; ties go to the lower sample index (a stable sort), so
  the kept set is a pure function of the scores. The view lists them in store order (ascending
  sample index): the trainer shuffles anyway.
* Scores of a folder cache are saved next to its shards (``scores_<scorer>.safetensors``, atomic,
  with the scorer name, the decoder name and the sample count in its metadata) and reused by the next
  filter with the same scorer and decoder: a resumed run keeps exactly the samples it kept before,
  and another N costs no rescoring. Delete the file to rescore (e.g. after changing the scorer's code).
* Resume: the trainer's checkpoint checks the sample count of the cache, not which samples were kept;
  :func:`check_run_filter` (called by the CLI) keeps the filter's record in the run folder
  (``teacher_filter.json``) and refuses a resume with another scorer, decoder or N.
* Decoding (:func:`diffusers_vae_decoder`): a diffusers folder's ``vae/`` (AutoencoderKL), latents
  divided by its ``scaling_factor`` (plus ``shift_factor`` if set), output mapped from [-1, 1] to
  [0, 1]; no ``vae/``: the scorer gets the latents (logged). ComfyUI decodes with its VAE
  (:mod:`nodes.nodes_teacher_filter`).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import math
import numbers
import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..io import atomic_write_json, ensure_dir, read_json, read_safetensors, verify_safetensors, write_safetensors
from .teacher_cache import TeacherCache

__all__ = ["Scorer", "Decoder", "NamedScorer", "register_scorer", "scorer_names", "scorer_description",
           "resolve_scorer", "sharpness_scorer", "colorfulness_scorer", "keep_count", "top_n", "score_teacher_cache",
           "filter_teacher_cache", "check_run_filter", "FILTER_RECORD", "diffusers_vae_decoder", "scores_path"]

logger = logging.getLogger(__name__)

Scorer = Callable[..., Any]
"""``score(images [n, 3, H, W] in [0, 1] (or latents), cond_ids [n]) -> [n]`` finite floats, higher is better
(optionally ``prompts=`` as a keyword, see the module docstring)."""

Decoder = Callable[[torch.Tensor], torch.Tensor]
"""``decode(x0 latents [n, C, h, w]) -> images [n, 3, H, W]`` float32 in [0, 1]."""


class NamedScorer:
    """A scorer with the name the filter records (its registry name or import spec)."""

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = str(name), fn
        self.wants_prompts = _has_prompts_keyword(fn)

    def __call__(self, images, cond_ids, prompts=None):
        return self.fn(images, cond_ids, prompts=prompts) if self.wants_prompts else self.fn(images, cond_ids)


def _has_prompts_keyword(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: the plain two-argument call
        return False
    p = params.get("prompts")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


# -- the registry ------------------------------------------------------------------------------------

_REGISTRY: dict[str, tuple[Callable[[], Callable], str]] = {}


def register_scorer(name: str, factory: Callable[[], Callable], description: str = "", *,
                    replace: bool = False) -> None:
    """Make ``factory()`` (a function returning a :data:`Scorer`) available as ``name`` (letters, digits,
    '-', '_', '.'; no ':'). Registering the same factory again is a no-op; another factory under a taken
    name needs ``replace=True``."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"a scorer name is letters, digits, '.', '_' or '-' (no ':', which marks a "
                         f"module:function spec), got {name!r}")
    if not callable(factory):
        raise ValueError(f"register_scorer({name!r}, ...): the factory must be callable (it returns the scorer), "
                         f"got {type(factory).__name__}")
    old = _REGISTRY.get(name)
    if old is not None and old[0] is not factory and not replace:
        raise ValueError(f"a scorer named {name!r} is registered already: pass replace=True to replace it, or "
                         "choose another name")
    _REGISTRY[name] = (factory, str(description))


def scorer_names() -> list[str]:
    """The registered scorer names, sorted."""
    return sorted(_REGISTRY)


def scorer_description(name: str) -> str:
    return _REGISTRY[name][1] if name in _REGISTRY else ""


def _known() -> str:
    return ", ".join(scorer_names()) or "(none)"


def resolve_scorer(spec: Union[str, Callable]) -> NamedScorer:
    """The scorer for a registered name, a ``"package.module:function"`` spec, or a callable (kept,
    named by its ``name`` attribute or ``module:qualname``)."""
    if callable(spec) and not isinstance(spec, str):
        if isinstance(spec, NamedScorer):
            return spec
        name = getattr(spec, "name", None) or f"{getattr(spec, '__module__', '?')}:" \
                                              f"{getattr(spec, '__qualname__', type(spec).__name__)}"
        return NamedScorer(str(name), spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a scorer is a registered name ({_known()}), a 'package.module:function' spec or a "
                         f"callable, got {spec!r}")
    spec = spec.strip()
    if spec in _REGISTRY:
        return NamedScorer(spec, _REGISTRY[spec][0]())
    if ":" not in spec:
        raise ValueError(f"unknown scorer {spec!r}: known scorers are {_known()}; or give your own as "
                         "'package.module:function' (importable, a function score(images, cond_ids) -> [n])")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"scorer {spec!r}: cannot import module {module_name!r} ({exc}): put it on PYTHONPATH "
                         "(or install it), or use a known scorer: " + _known()) from None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"scorer {spec!r}: module {module_name!r} has no callable {attr!r}: name a function "
                         "score(images, cond_ids) -> [n] scores")
    return NamedScorer(spec, fn)


# -- the shipped generic scorers ---------------------------------------------------------------------

_LUMA = (0.299, 0.587, 0.114)


def _check_images(images: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(images).detach().to(torch.float32)
    if x.ndim != 4 or x.shape[-1] < 3 or x.shape[-2] < 3:
        raise ValueError(f"the {name} scorer takes images [n, C, H, W] with H, W >= 3, got {list(x.shape)}")
    return x


def sharpness_scorer() -> Callable:
    """Variance of the 3x3 Laplacian of the luma (3-channel images) or of the channel mean (else)."""

    def sharpness(images: torch.Tensor, cond_ids: torch.Tensor) -> torch.Tensor:
        x = _check_images(images, "sharpness")
        if x.shape[1] == 3:
            y = sum(w * x[:, c] for c, w in enumerate(_LUMA))[:, None]
        else:
            y = x.mean(dim=1, keepdim=True)
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=y.device).view(1, 1, 3, 3)
        return F.conv2d(y, kernel).flatten(1).var(dim=1).cpu()

    return sharpness


def colorfulness_scorer() -> Callable:
    """Hasler-Suesstrunk colourfulness: sqrt(var rg + var yb) + 0.3 sqrt(mean rg^2 + mean yb^2), rg = R - G,
    yb = (R + G) / 2 - B, on [0, 1] RGB (three channels needed)."""

    def colorfulness(images: torch.Tensor, cond_ids: torch.Tensor) -> torch.Tensor:
        x = _check_images(images, "colorfulness")
        if x.shape[1] != 3:
            raise ValueError(f"the colorfulness scorer needs RGB images [n, 3, H, W], got {list(x.shape)}: decode "
                             "with the model's VAE (or use the sharpness scorer on latents)")
        r, g, b = x[:, 0].flatten(1), x[:, 1].flatten(1), x[:, 2].flatten(1)
        rg, yb = r - g, 0.5 * (r + g) - b
        std = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False)).sqrt()
        mean = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2).sqrt()
        return (std + 0.3 * mean).cpu()

    return colorfulness


register_scorer("sharpness", sharpness_scorer, "variance of the Laplacian of the luma: detail / focus (not aesthetics)")
register_scorer("colorfulness", colorfulness_scorer,
                "Hasler-Suesstrunk colourfulness of RGB images: colour spread (not aesthetics)")


def aesthetic_scorer() -> Callable:
    """The LAION aesthetic score, the paper's AES (:mod:`noisecraft.train.aesthetic`; transformers + local weights)."""
    from .aesthetic import load_aesthetic_scorer

    return load_aesthetic_scorer(device="cuda" if torch.cuda.is_available() else "cpu")


register_scorer("aesthetic", aesthetic_scorer, "the LAION aesthetic score (CLIP ViT-L/14 + MLP: the paper's AES); "
                "needs transformers and its weights in $NOISECRAFT_AESTHETIC")


# -- scoring and keeping -----------------------------------------------------------------------------


def keep_count(keep: Union[int, float], total: int) -> int:
    """``keep`` as a count in 1..total: an int N, or a float fraction in (0, 1] (N = f * total rounded half up,
    at least 1; 1.0 keeps every sample)."""
    total = int(total)
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not math.isfinite(float(keep)):
        raise ValueError(f"keep must be a whole number of samples (1..{total}) or a fraction in (0, 1], got {keep!r}")
    if not isinstance(keep, numbers.Integral):
        keep = float(keep)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep {keep!r}: a fraction must lie in (0, 1] (or give a whole number of samples, an "
                             f"int in 1..{total})")
        return max(1, min(total, math.floor(keep * total + 0.5)))
    n = int(keep)
    if n < 1 or n > total:
        raise ValueError(f"keep {n}: must lie in 1..{total} (the teacher cache holds {total} samples): keep fewer, "
                         "or build a larger cache")
    return n


def top_n(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest ``scores`` (ties: the lower index first), in ascending order."""
    order = torch.sort(torch.as_tensor(scores, dtype=torch.float32), descending=True, stable=True).indices
    return torch.sort(order[: int(keep)]).values


def _as_scores(raw, n: int, name: str, start: int) -> torch.Tensor:
    try:
        s = torch.as_tensor(raw.detach() if torch.is_tensor(raw) else raw).to(torch.float32).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"the scorer {name!r} returned {type(raw).__name__}, expected {n} float scores (a tensor "
                         f"[n]) for samples {start}..{start + n - 1}") from None
    if s.ndim > 1 and s.numel() == n:  # [n, 1] and the like
        s = s.reshape(-1)
    if tuple(s.shape) != (n,):
        raise ValueError(f"the scorer {name!r} returned scores of shape {list(s.shape)} for {n} samples "
                         f"({start}..{start + n - 1}); expected one float per sample, shape [{n}]")
    bad = (~torch.isfinite(s)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"the scorer {name!r} returned NaN/inf for samples {(bad + start).tolist()[:8]} (values "
                         f"{s[bad].tolist()[:4]}): a scorer must return finite scores; fix the scorer or its input")
    return s


def score_teacher_cache(cache: TeacherCache, scorer, *, decode: Optional[Decoder] = None, batch_size: int = 16,
                        progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """The scores [M] of every sample of ``cache`` (its ``x0``, decoded by ``decode`` when given)."""
    scorer = resolve_scorer(scorer)
    missing = cache.missing_shards()
    if missing:
        raise FileNotFoundError(f"teacher cache {cache.root}: {len(missing)} shards missing; finish the build before "
                                "filtering it")
    total, step = len(cache), max(1, int(batch_size))
    conds = cache.conds
    out = []
    with torch.no_grad():
        for a in range(0, total, step):
            b = cache.get(range(a, min(a + step, total)))
            images = b.x0 if decode is None else decode(b.x0)
            prompts = [conds[int(i)] for i in b.cond] if scorer.wants_prompts else None
            out.append(_as_scores(scorer(images, b.cond, prompts=prompts), len(b), scorer.name, a))
            if progress is not None:
                progress(a + len(b), total)
    return torch.cat(out)


def _slug(text: str) -> str:
    short = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:48] or "scorer"
    return f"{short}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def scores_path(cache: TeacherCache, scorer_name: str) -> Optional[Path]:
    """Where a folder cache keeps the scores of ``scorer_name`` (None for an in-memory cache or a view)."""
    if cache.root is None or cache.filter is not None:
        return None
    return Path(cache.root) / f"scores_{_slug(scorer_name)}.safetensors"


def _saved_scores(path: Optional[Path], want: dict) -> Optional[torch.Tensor]:
    if path is None or not path.is_file():
        return None
    try:
        verify_safetensors(path, what="saved teacher scores")
        tensors, meta = read_safetensors(path, what="saved teacher scores")
    except ValueError as exc:  # damaged (checksum) or unreadable: score again
        logger.warning("%s; scoring again", exc)
        return None
    s = tensors.get("score")
    if any(meta.get(k) != v for k, v in want.items()) or s is None or s.numel() != int(want["total"]):
        logger.info("teacher filter: %s was made by another scorer, decoder or cache: scoring again", path.name)
        return None
    return s.to(torch.float32)


def filter_teacher_cache(cache: TeacherCache, scorer, keep: Union[int, float], *, decode: Optional[Decoder] = None,
                         decode_name: Optional[str] = None, batch_size: int = 16,
                         scores: Optional[torch.Tensor] = None, save_scores: bool = True,
                         progress: Optional[Callable[[int, int], None]] = None) -> TeacherCache:
    """The top-``keep`` samples of ``cache`` by ``scorer`` as a view of the same store (see the module docstring).

    Args:
        cache: a complete :class:`TeacherCache` (folder or in memory).
        scorer: a :data:`Scorer`, a registered name or a ``"module:function"`` spec (:func:`resolve_scorer`).
        keep: a count N (1..M, an int) or a fraction in (0, 1] (a float) (:func:`keep_count`).
        decode: latents -> images in [0, 1] (e.g. :func:`diffusers_vae_decoder`); None scores the x0 latents.
        decode_name: what the decoder is, for the record and the saved scores (default ``"vae"`` with a
            decoder, ``"none (latents)"`` without).
        scores: precomputed scores [M] (then nothing is scored).
        save_scores: a folder cache saves the scores (and reuses saved ones of the same scorer and decoder).
        progress: ``progress(done, total)`` after each scored batch.
    """
    total = len(cache)
    n = keep_count(keep, total)  # bad keep: refused before any scoring
    named = resolve_scorer(scorer)
    decode_name = str(decode_name or ("vae" if decode is not None else "none (latents)"))
    want = {"noisecraft.kind": "teacher_scores", "scorer": named.name, "decode": decode_name, "total": str(total)}
    path = scores_path(cache, named.name + "|" + decode_name) if save_scores else None
    if scores is not None:
        s = _as_scores(scores, total, named.name, 0)
    else:
        s = _saved_scores(path, want)
        if s is None:
            s = score_teacher_cache(cache, named, decode=decode, batch_size=batch_size, progress=progress)
            if path is not None:
                write_safetensors({"score": s}, path, want, digest=True)
        else:
            logger.info("teacher filter: reusing the scores in %s", path)
    idx = top_n(s, n)
    kept = s[idx]
    record = {"scorer": named.name, "decode": decode_name, "kept": n, "of": total,
              "threshold": float(kept.min()), "score_max": float(s.max()), "score_mean_kept": float(kept.mean()),
              "score_mean_all": float(s.mean()), "order": "top-N by score, ties to the lower sample index"}
    logger.info("teacher filter: kept %d of %d samples by %s (score >= %.6g; mean %.6g -> %.6g)", n, total,
                named.name, record["threshold"], record["score_mean_all"], record["score_mean_kept"])
    return cache.subset(idx, record)


FILTER_RECORD = "teacher_filter.json"


def check_run_filter(out_dir, cache: TeacherCache, *, resume: bool, write: bool = True) -> None:
    """A run folder remembers the filter it trains on (``teacher_filter.json``: scorer, decoder, kept N of M);
    a resume with another filter, or none, is refused (the trainer's own check sees only the sample count)."""
    path = Path(out_dir) / FILTER_RECORD
    f = cache.filter
    now = None if f is None else {k: f[k] for k in ("scorer", "decode", "kept", "of")}
    if resume and path.is_file():
        old = read_json(path, what="the teacher filter this run trained on",
                        fix="start a new output folder")
        if old != now:
            raise ValueError(f"{Path(out_dir)} was trained on the teacher filter {old} but this resume filters "
                             f"{now}: resume with the same --keep and --scorer, or choose another output folder")
    if write and (now is not None or path.is_file()):
        ensure_dir(Path(out_dir), None)
        atomic_write_json(path, now)


# -- decoding ------------------------------------------------------------------------------------------


def diffusers_vae_decoder(model_dir, *, device: Union[str, torch.device] = "cpu",
                          dtype: torch.dtype = torch.float32, config=None) -> Optional[Decoder]:
    """A :data:`Decoder` from a diffusers folder's ``vae/`` (AutoencoderKL), or None when it has none. A
    single-file checkpoint (``--model FILE``) decodes with the VAE inside it (diffusers' ``from_single_file``),
    its config from ``config`` (``--config``) or the one the file's architecture names
    (:func:`noisecraft.hosts.single_file.single_file_config`); None when the file holds no VAE."""
    from diffusers import AutoencoderKL

    if Path(model_dir).is_file():
        import contextlib

        from ..hosts.single_file import single_file_config

        from safetensors import safe_open

        with safe_open(str(model_dir), framework="pt") as f:  # the LDM layout of a checkpoint's VAE
            if not any(k.startswith(("first_stage_model.", "vae.")) for k in f.keys()):
                return None
        with contextlib.ExitStack() as stack:
            folder = Path(config) if config is not None else stack.enter_context(single_file_config(model_dir))[1]
            if not (folder / "vae" / "config.json").is_file():
                return None
            try:
                vae = AutoencoderKL.from_single_file(str(model_dir), config=str(folder), subfolder="vae",
                                                     torch_dtype=dtype)
            except (ValueError, KeyError, OSError) as exc:  # a network-only file: no VAE keys in it
                logger.info("%s: no VAE decoded from the file (%s): the scorer gets the latents", model_dir, exc)
                return None
        vae = vae.to(device).eval().requires_grad_(False)
    else:
        vae_dir = Path(model_dir) / "vae"
        if not (vae_dir / "config.json").is_file():
            return None
        vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=dtype).to(device).eval().requires_grad_(False)
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def decode(x0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = x0.to(device=device, dtype=dtype) / scale + shift
            return ((vae.decode(z).sample.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()

    decode.vae = vae  # type: ignore[attr-defined]
    return decode
