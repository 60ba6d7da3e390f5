"""The refiner LoRA file: the ONE refiner file format (kohya keys, metadata, parse, export; reads peft files).

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3 (the
noise refining network is a LoRA on the diffusion model, attached for the refinement pass) and
App. D (LoRA on all attention, convolutional and feed-forward layers; rank 128 for SD2.1, 256 for
SDXL). LoRA: Hu et al., arXiv:2106.09685.

The refiner file (the CLI trainer, the diffusers host and the ComfyUI nodes all read and write it here):

* kohya keys, which ComfyUI's ``comfy/lora.py`` maps (``lora_unet_<diffusers name, "." -> "_">``,
  :func:`flat_name`; ``lora_transformer_<...>`` on SD3-class transformers): ``.lora_down.weight`` [rank, in(, kh, kw)], ``.lora_up.weight``
  [out, rank(, 1, 1)] (kohya's conv shapes), ``.alpha`` (0-dim); the layer computes
  ``W x + (alpha / rank) * up(down(x))``. Metadata: ``noisecraft.kind = refiner``, the
  convention, rank, alpha, targets, layers, kohya's ``ss_network_*``, and what the writer adds
  (base model, model kind, sigma_max, training settings; plain keys get ``noisecraft.``).
* In memory a refiner is ``pairs``: ``{kohya prefix: (down, up, alpha)}``. :func:`save_refiner_pairs`
  writes them atomically and byte-for-byte reproducibly (:func:`noisecraft.io.write_safetensors`) and
  refuses non-finite weights; :func:`read_refiner_pairs` reads them back, and also reads peft/diffusers
  files (``<module>.lora_A[.<adapter>].weight`` / ``lora_B``, prefixed ``base_model.model.``, ``unet.``
  or ``transformer.`` or not; alpha from a ``.alpha`` tensor, else diffusers' ``lora_adapter_metadata``,
  else = rank). Text-encoder keys and LoRA variants (DoRA, LoHa, LoKr, ...) are refused by name.
* A directory, an empty, text, truncated or otherwise unreadable file gives one ``ValueError``
  naming the path and what was expected (:func:`read_safetensors`, shared with the NPNet loader),
  never a raw safetensors error; NaN/inf tensors are refused naming the file and the tensors.

The refiner on a diffusers model (peft: :func:`noisecraft.hosts.adapters.attach_lora`,
:func:`~noisecraft.hosts.adapters.load_lora`) lives with the hosts; this module needs torch and
safetensors only.

Why the file I/O is written here: no well-kept library writes kohya files from diffusers module
names without pulling in kohya's training scripts (peft writes ``lora_A``/``lora_B``; diffusers
converts kohya to diffusers on load, not back), and ComfyUI and kohya tools expect kohya names.
peft is needed only to put a refiner on a diffusers model (training, and the diffusers/toy host's
inference, hence the demo): it is in the ``train`` and ``dev`` extras, imported on first use with an
install hint. Reading and writing refiner files (all the ComfyUI nodes do) needs torch and
safetensors only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from .io import SafetensorsHeaderError, require_file, safetensors_extent

__all__ = ["DEFAULT_TARGETS", "TRANSFORMER_TARGETS", "CONVENTION", "ADAPTER", "PREFIX", "TRANSFORMER_PREFIX",
           "read_lora_file",
           "read_safetensors", "read_refiner_pairs", "save_refiner_pairs", "parse_refiner_state",
           "refiner_metadata", "pairs_state_dict", "flat_name"]

logger = logging.getLogger(__name__)

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "ff.net.0.proj", "ff.net.2")

# SD3-class transformers (MMDiT): both streams' attention (to_q/k/v, to_out.0; add_q/k/v_proj, to_add_out) and
# feed-forward layers (ff, ff_context): all in ComfyUI's mmdit_to_diffusers map, so its stock loader reads them.
TRANSFORMER_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                        "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                        "ff_context.net.2")

CONVENTION = "noisecraft-refine-v1: e_hat = e + s * (D_base(x_T) - D_lora(x_T)) / sigma_max, x_T = noise_to_x(e)"
PREFIX = "lora_unet_"
# kohya/OneTrainer prefix of diffusers transformer (SD3, Flux) LoRAs: ComfyUI's model_lora_keys_unet maps
# ``lora_transformer_<diffusers name, "." -> "_">`` for them (``lora_unet_`` names ldm weights there)
TRANSFORMER_PREFIX = "lora_transformer_"
ADAPTER = "noisecraft_refiner"


def flat_name(module_name: str, prefix: str = PREFIX) -> str:
    """A diffusers module name as a kohya/ComfyUI LoRA key: ``prefix`` (``lora_unet_``; ``lora_transformer_``
    for SD3-class transformers) + name with ``.`` -> ``_``."""
    return prefix + module_name.replace(".", "_")




_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _safetensors_problem(path: Path, size: int) -> Optional[str]:
    """Why ``path`` is no complete safetensors file, in words, or None if its header and data fit."""
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9 or head[8:9] != b"{":
            text = head and all(32 <= c < 127 or c in (9, 10, 13) for c in head)
            what = "a text file" if text else "not a safetensors file"
            return f"is {what} ({size} bytes, starting with {head[:8]!r})"
        try:
            n, end = safetensors_extent(f, size, max_header=_MAX_HEADER)
        except SafetensorsHeaderError as exc:
            if exc.kind == "length":
                return f"is truncated (its safetensors header needs {8 + exc.n} bytes, the file has {size})"
            if exc.kind == "offsets":
                return f"has a damaged safetensors header (entry {exc.key!r})"
            return f"has a damaged safetensors header ({size} bytes)"
    if 8 + n + end > size:
        return f"is truncated (its tensors need {8 + n + end} bytes, the file has {size})"
    return None


def read_safetensors(path: str | os.PathLike, expected: str,
                     advice: str = "Download or save it again.") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, on the CPU (no unpickling, any torch).

    Raises ``FileNotFoundError`` for a missing path and one ``ValueError`` naming the path,
    ``expected`` (what the caller wanted, e.g. "a safetensors refiner LoRA") and ``advice`` for a
    directory, an unreadable, empty, text, truncated or corrupt file; never a safetensors error.
    """
    from safetensors import safe_open

    path = Path(path)
    require_file(path, f"no such file; expected {expected}",
                 f"is a directory; expected {expected} (a file): pass the file inside it")
    try:
        size = path.stat().st_size
        problem = _safetensors_problem(path, size)
    except OSError as exc:
        raise ValueError(f"{path}: could not read it ({type(exc).__name__}: {exc.strerror or exc}); expected "
                         f"{expected}: check its permissions") from None
    if problem is None:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return tensors, meta
        except Exception as exc:  # noqa: BLE001 - SafetensorsError, OSError, ...: one message for all
            problem = f"failed in the safetensors reader ({type(exc).__name__}: {str(exc)[:200]})"
    raise ValueError(f"{path}: could not read it as safetensors: it {problem}; expected {expected}. {advice}")


_LORA_EXPECTED = ("a safetensors LoRA (kohya/ComfyUI '<name>.lora_down.weight' / '.lora_up.weight' / '.alpha' "
                  "keys, or peft '<module>.lora_A.weight' / '.lora_B.weight'; e.g. a refiner from "
                  "`python -m noisecraft train-refiner` or Save Refiner)")


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a safetensors LoRA (CPU, no unpickling).

    A missing file is a ``FileNotFoundError``; a directory, a file without the ``.safetensors``
    suffix, an empty, text, truncated or corrupt file, and NaN/inf tensors are one ``ValueError``
    naming the path and what was expected."""
    from .ode import check_tensors_finite

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {path} does not exist; expected {_LORA_EXPECTED}")
    if not path.is_dir() and path.suffix != ".safetensors":
        raise ValueError(f"{path}: refiner LoRAs are read from .safetensors files only; expected {_LORA_EXPECTED}")
    state, meta = read_safetensors(path, _LORA_EXPECTED, "Download it again or re-save the refiner.")
    check_tensors_finite(state, str(path), fix="re-download it, or retrain it (e.g. with a lower learning rate)")
    return state, meta


def _alpha(t: Optional[torch.Tensor], key: str, label: str, rank: int) -> float:
    """A LoRA layer's alpha: one finite number (0-dim or 1 element), or the rank when absent."""
    if t is None:
        return float(rank)
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{label}: {key}.alpha has shape {shape}; expected one number (a scalar alpha per layer, "
                         f"as kohya and NoiseCraft write it): the file is damaged or no kohya LoRA; re-save it")
    alpha = float(t)
    if not math.isfinite(alpha):
        raise ValueError(f"{label}: {key}.alpha is {alpha}; expected a finite number: the file is damaged, re-save it")
    return alpha


# -- parsing: kohya and peft keys -> pairs -----------------------------------------------------------

_VARIANT_PARTS = (".lora_mid.weight", ".dora_scale", ".hada_w1_a", ".lokr_w1", ".diff", ".oft_blocks",
                  ".lora_magnitude_vector", ".lora_embedding_A")
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.|unet\.|transformer\.)?(?P<module>.+)\.lora_(?P<part>[AB])"
                       r"(?:\.(?P<adapter>[^.]+))?\.weight$")
_TEXT_ENCODER = ("text_encoder", "lora_te")


def _check_pair(label: str, key: str, down: Any, up: Any) -> None:
    if not isinstance(down, torch.Tensor) or not isinstance(up, torch.Tensor) or down.ndim not in (2, 4) \
            or up.ndim != down.ndim or up.shape[1] != down.shape[0] or up[0].numel() != down.shape[0]:
        shape = lambda t: list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__  # noqa: E731
        raise ValueError(f"{label}: {key} has lora_down {shape(down)} and lora_up {shape(up)}; expected down "
                         f"[rank, in(, kh, kw)] and up [out, rank(, 1, 1)] with the same rank: the file is "
                         f"damaged or no kohya/peft LoRA; re-save it")


def _peft_alpha(meta: Mapping[str, str], module: str, rank: int) -> float:
    """alpha of a peft layer from diffusers' ``lora_adapter_metadata`` (``[unet.|transformer.]lora_alpha``,
    ``alpha_pattern`` matched as peft matches it), else the rank."""
    try:
        cfg = json.loads(meta.get("lora_adapter_metadata") or "{}")
    except ValueError:
        cfg = None
    cfg = cfg if isinstance(cfg, dict) else {}
    get = lambda k: next((cfg[p + k] for p in ("", "unet.", "transformer.") if p + k in cfg), None)  # noqa: E731
    patterns = get("alpha_pattern")
    for pattern, value in (patterns.items() if isinstance(patterns, dict) else ()):
        with contextlib.suppress(re.error, TypeError, ValueError):  # an unusable entry is no match
            if re.match(rf"(.*\.)?({pattern})$", module) and math.isfinite(float(value)):
                return float(value)
    value = get("lora_alpha")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else float(rank)


def parse_refiner_state(state: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None,
                        label: str = "the LoRA state dict") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{kohya prefix: (down, up, alpha)}`` (float32) from a kohya or peft/diffusers LoRA state dict.

    Raises one ``ValueError`` naming ``label`` for: a NoiseCraft file of another kind, LoRA variants a
    refiner does not use, text-encoder keys, no LoRA keys at all, a half pair, mismatched shapes,
    an alpha that is not one finite number. (Non-finite weights: :func:`read_lora_file`.)"""
    meta = dict(metadata or {})
    kind = meta.get("noisecraft.kind")
    if kind is not None and kind != "refiner":
        raise ValueError(f"{label} is a NoiseCraft {kind!r} file, not a refiner (noisecraft.kind = {kind!r}); "
                         f"load a refiner LoRA (noisecraft.kind = 'refiner')")
    variants = sorted({k for k in state for part in _VARIANT_PARTS if k.endswith(part) or part + "." in k})
    if variants:
        raise ValueError(f"{label} uses LoRA variants a refiner does not use (e.g. {variants[:3]}); expected plain "
                         f"'<key>.lora_down.weight' / '<key>.lora_up.weight' pairs as NoiseCraft writes them")
    text = sorted(k for k in state if k.startswith(_TEXT_ENCODER))
    if text:
        raise ValueError(f"{label} holds text-encoder LoRA keys (e.g. {text[:2]}); a refiner adapts only the "
                         f"diffusion model: save the UNet/transformer part only")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for p in sorted(k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight")):
        down, up = state[f"{p}.lora_down.weight"], state.get(f"{p}.lora_up.weight")
        if up is None:
            raise ValueError(f"{label} has {p}.lora_down.weight but no {p}.lora_up.weight: the file is damaged")
        _check_pair(label, p, down, up)
        pairs[p] = (down.to(torch.float32), up.to(torch.float32), _alpha(state.get(f"{p}.alpha"), p, label,
                                                                         int(down.shape[0])))
    peft: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for k, t in state.items():
        m = _PEFT_KEY.match(k)
        if m:
            peft.setdefault(m["module"], {})[m["part"]] = t
            adapters.add(m["adapter"])
    if len(adapters) > 1:
        raise ValueError(f"{label} holds {len(adapters)} peft adapters ({sorted(map(str, adapters))}); a refiner is "
                         f"one adapter: save one of them")
    if peft and pairs:
        raise ValueError(f"{label} mixes kohya ('.lora_down.weight') and peft ('.lora_A.weight') keys; expected one "
                         f"format: re-save it")
    for module, parts in sorted(peft.items()):
        key = flat_name(module)
        if "A" not in parts or "B" not in parts:
            have, lack = ("A", "B") if "A" in parts else ("B", "A")
            raise ValueError(f"{label} has {module}.lora_{have}.weight without its lora_{lack}: the file is damaged")
        _check_pair(label, module, parts["A"], parts["B"])
        rank = int(parts["A"].shape[0])
        t = next((state[a] for a in (f"{module}.alpha", f"{key}.alpha") if a in state), None)
        alpha = _alpha(t, module, label, rank) if t is not None else _peft_alpha(meta, module, rank)
        if key in pairs:
            raise ValueError(f"{label}: two entries map to the layer {module!r}; re-save it")
        pairs[key] = (parts["A"].to(torch.float32), parts["B"].to(torch.float32), alpha)
    if not pairs:
        raise ValueError(f"{label} holds no '<key>.lora_down.weight' (kohya) or '<module>.lora_A.weight' (peft) "
                         f"tensors ({len(state)} tensors, e.g. {sorted(state)[:3]}): it is not a LoRA. Pick a "
                         f"refiner LoRA file")
    if kind is None:
        logger.warning("%s has no noisecraft.kind metadata; using it as a refiner LoRA anyway", label)
    return pairs


# -- metadata, export, the two file functions --------------------------------------------------------

def refiner_metadata(pairs: Mapping[str, tuple], extra: Optional[Mapping[str, Any]] = None,
                     targets: Optional[Sequence[str]] = None) -> dict[str, str]:
    """The refiner file's string metadata for ``pairs``: kind, convention, rank, alpha, layers, kohya's
    ``ss_network_*`` (and targets if given), then ``extra`` on top (plain keys get ``noisecraft.``,
    non-strings are JSON)."""
    ranks = sorted({int(d.shape[0]) for d, _, _ in pairs.values()})
    alphas = sorted({float(a) for _, _, a in pairs.values()})
    meta = {
        "noisecraft.kind": "refiner",
        "noisecraft.convention": CONVENTION,
        "noisecraft.rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "noisecraft.alpha": repr(alphas[0]) if len(alphas) == 1 else json.dumps(alphas),
        "noisecraft.layers": str(len(pairs)),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if ranks else "0",
        "ss_network_alpha": repr(alphas[0]) if alphas else "0",
    }
    if targets is not None:
        meta["noisecraft.targets"] = json.dumps(list(targets))
    for k, v in (extra or {}).items():
        key = k if "." in k or k.startswith("ss_") else f"noisecraft.{k}"
        meta[key] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return meta


def pairs_state_dict(pairs: Mapping[str, tuple], dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The kohya state dict of ``pairs`` (CPU, contiguous; ``dtype`` defaults to the weights')."""
    out: dict[str, torch.Tensor] = {}
    for key, (down, up, alpha) in pairs.items():
        d, u = down.detach(), up.detach()
        if dtype is not None:
            d, u = d.to(dtype), u.to(dtype)
        out[f"{key}.lora_down.weight"] = d.cpu().contiguous()
        out[f"{key}.lora_up.weight"] = u.cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def save_refiner_pairs(pairs: Mapping[str, tuple], path: str | os.PathLike,
                       metadata: Optional[Mapping[str, Any]] = None,
                       dtype: Optional[torch.dtype] = torch.float32,
                       extra_tensors: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Write ``pairs`` (``{kohya prefix: (down, up, alpha)}``) as the refiner file, atomically and
    reproducibly (:func:`noisecraft.io.write_safetensors`), as ``dtype`` (float32; None keeps the
    weights' dtype). ``metadata`` goes on top of :func:`refiner_metadata`'s defaults. Refuses (``ValueError`` naming the layer and ``path``) an empty
    refiner, bad shapes and non-finite weights or alphas: a file is never written that the loader
    would refuse. ``extra_tensors`` (e.g. the guidance-scale embedding of :mod:`noisecraft.guidance_embed`,
    ``noisecraft_guidance.*``) are stored next to the LoRA keys, float32; ComfyUI's stock LoRA loader logs
    them as "lora key not loaded" and applies the LoRA part."""
    from .io import write_safetensors

    if not pairs:
        raise ValueError(f"refusing to write {path}: the refiner has no LoRA layers")
    for key, pair in pairs.items():
        if not (isinstance(key, str) and key) or not (isinstance(pair, (tuple, list)) and len(pair) == 3):
            raise ValueError(f"refusing to write {path}: entry {key!r} is not '<prefix>': (down, up, alpha)")
        down, up, alpha = pair
        _check_pair(f"refusing to write {path}", key, down, up)
        bad = [n for n, t in (("lora_down", down), ("lora_up", up)) if not bool(torch.isfinite(t).all())]
        if bad or not math.isfinite(float(alpha)):
            raise ValueError(f"refusing to write {path}: {key} has NaN/inf in {bad or ['alpha']}; the training "
                             f"diverged: retrain it (e.g. with a lower learning rate)")
    meta = refiner_metadata(pairs, metadata)
    state = pairs_state_dict(pairs, dtype)
    for key, t in (extra_tensors or {}).items():
        if key in state or key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) \
                or not bool(torch.isfinite(t).all()):
            raise ValueError(f"refusing to write {path}: extra tensor {key!r} collides with a LoRA key or is not "
                             f"finite; retrain it (e.g. with a lower learning rate)")
        state[key] = t.detach().to("cpu", torch.float32).contiguous()
    return write_safetensors(state, path, meta)


def read_refiner_pairs(path: str | os.PathLike) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                                                         dict[str, str]]:
    """``(pairs, metadata)`` of a refiner file (kohya or peft keys; see the module docstring). Errors:
    ``FileNotFoundError`` for a missing path, else one ``ValueError`` naming the path."""
    state, meta = read_lora_file(path)
    return parse_refiner_state(state, meta, str(path)), meta
