"""NPNet checkpoints: reading the three file flavours strictly, the official nested layout, and the
one writer of NPNet files (:func:`save_npnet_safetensors`, with :func:`npnet_metadata`).

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie,
*Golden Noise for Diffusion Models: A Learning Framework*, arXiv:2411.09502 (2024); official
checkpoints: github.com/xie-lab-ml/Golden-Noise-for-Diffusion-Models.

Checkpoint flavours read by :func:`load_npnet` (all strict, no unpickling):

- the official ``.pth``: ``torch.load(weights_only=True)`` of a nested dict
  ``{"unet_embedding": {...}, "unet_svd": {...}, "embeeding": {...}, "alpha": [1], "beta": [1]}``;
- safetensors flattened with ``text_embedding.*`` (``convert_to_safetensors.py`` of the
  ComfyUI-NPNet pack, the files at huggingface.co/asagi4/NPNet): keys ``unet_embedding.<k>``,
  ``unet_svd.<k>``, ``text_embedding.linear.{weight,bias}``, ``alpha``, ``beta``;
- safetensors flattened with ``embeeding.*`` (the loader of ComfyUI-Golden-Noise, files at
  huggingface.co/LucipherDev/Golden-Noise-NPNets): the same with ``embeeding.linear.*``.

The file kind is read from the file's first bytes, not its name. This module's own
``state_dict()`` uses the ``text_embedding.*`` names; :func:`save_npnet_safetensors` writes that
flavour with ``noisecraft.*`` metadata.

Security floor for ``.pth`` files: ``torch.load(weights_only=True)`` can be made to run code by a
crafted file on torch <= 2.5.1 (PyTorch advisory GHSA-53q9-r3pm-6pq6, CVE-2025-32434, fixed in
2.6.0), and its unpickler can be made to corrupt memory, again up to code execution, on every
torch before 2.10.0 (PyTorch advisory of 2026-01-26, CVE-2026-24747: opcodes and storage sizes not
validated; fixed in 2.10.0). So a ``.pth`` is read only on torch >= 2.10 (:data:`PTH_MIN_TORCH`,
:func:`check_torch_for_pth`); on older torch it is refused with a pointer to
``python -m noisecraft convert SRC.pth DST.safetensors``, run once on a machine with torch >= 2.10.
safetensors files never execute code and load on any torch.


Writing: :func:`save_npnet_safetensors` is the only writer of NPNet files in NoiseCraft (the CLI's
``convert``, the trainer's ``npnet.safetensors`` and ComfyUI's Save NPNet all go through it): the
``text_embedding.*`` flavour, written atomically and byte-for-byte reproducibly
(:func:`noisecraft.io.write_safetensors`: sorted names and metadata, temp file, fsync, rename),
with the metadata of :func:`npnet_metadata` (``noisecraft.kind = npnet``, the shape, the full
config as JSON, the paper, and the caller's entries under ``noisecraft.*``).

Bad files are refused naming their source: tensors holding NaN/inf (naming the file and the
tensors, :func:`noisecraft.ode.check_tensors_finite`), a directory, an empty, text or truncated
file, another model's NPNet, a LoRA or an unrelated file.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..io import require_file
from ..ode import check_tensors_finite
from .config import PRESETS, NPNetConfig, normalize_preset, preset_config, tile_shape
from .model import NPNet

__all__ = ["load_npnet", "npnet_from_state_dict", "official_state_dict", "npnet_metadata", "save_npnet_safetensors",
           "convert_pth_to_safetensors", "PTH_MIN_TORCH", "check_torch_for_pth"]

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# The name of the text module in each flavour, and the top-level scalars.
_OFFICIAL_TEXT = "embeeding"  # sic: the official spelling
_TEXT = "text_embedding"  # our module name and the ComfyUI-NPNet safetensors flavour
_SCALARS = ("alpha", "beta")
# timm's non-persistent buffers: derived constants, never part of a checkpoint.
_DERIVED_BUFFERS = ("relative_position_index", "attn_mask")
_PAPER = "Golden Noise for Diffusion Models: A Learning Framework, arXiv:2411.09502"


def official_state_dict(model_or_state: Union[NPNet, Mapping[str, torch.Tensor]]) -> dict:
    """The official nested layout (what ``torch.save`` wrote for the released ``.pth`` files)."""
    flat = _flatten(model_or_state.state_dict() if isinstance(model_or_state, NPNet) else model_or_state)
    out: dict = {"unet_embedding": {}, "unet_svd": {}, _OFFICIAL_TEXT: {}}
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        if group in _SCALARS and not rest:
            out[group] = value
        elif (_OFFICIAL_TEXT if group == _TEXT else group) in out and rest:
            out[_OFFICIAL_TEXT if group == _TEXT else group][rest] = value
        else:
            raise ValueError(f"official_state_dict: {key!r} belongs to no NPNet part; expected keys under "
                             f"unet_embedding., unet_svd., text_embedding. (or embeeding.), alpha, beta")
    return out



# -- reading checkpoints ---------------------------------------------------------------------


_HELP_FILES = ("the official .pth (github.com/xie-lab-ml/Golden-Noise-for-Diffusion-Models) or a "
               "safetensors repack (huggingface.co/asagi4/NPNet, huggingface.co/LucipherDev/Golden-Noise-NPNets)")


def _flatten(state: Mapping, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Nested official dict or either flat flavour -> flat dict with ``text_embedding.*`` names."""
    flat: dict[str, torch.Tensor] = {}

    def put(key: str, value) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                put(f"{key}.{k}" if key else str(k), v)
            return
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, expected a tensor; "
                             f"this is not an NPNet checkpoint; use {_HELP_FILES}")
        if key.startswith(_OFFICIAL_TEXT + "."):
            key = _TEXT + key[len(_OFFICIAL_TEXT):]
        if key in flat:
            raise ValueError(f"{source}: {key!r} appears twice (as {_OFFICIAL_TEXT}.* and {_TEXT}.*); "
                             f"expected one of the two spellings; re-export the file from one source")
        flat[key] = value

    put("", state)
    return flat


PTH_MIN_TORCH = (2, 10)
"""The oldest torch whose ``torch.load(weights_only=True)`` NoiseCraft trusts with a ``.pth``:
GHSA-53q9-r3pm-6pq6 / CVE-2025-32434 (remote code execution through a crafted file even with
``weights_only=True``) affects torch <= 2.5.1 and is fixed in 2.6.0; CVE-2026-24747 (the
weights_only unpickler corrupts memory on crafted opcodes / storage sizes, up to code execution)
affects every torch before 2.10.0 and is fixed in 2.10.0."""

_ADVISORY = "GHSA-53q9-r3pm-6pq6 / CVE-2025-32434, fixed in torch 2.6.0; CVE-2026-24747, fixed in torch 2.10.0"


def _torch_release(version: str) -> Optional[tuple[int, int]]:
    """(major, minor) of a torch version string ('2.5.1+cu121', '2.6.0a0+git1234', '2.10.0'), or None."""
    import re

    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_torch_for_pth(version: Optional[str] = None, path: Optional[PathLike] = None) -> None:
    """Refuse to read a ``.pth`` on a torch older than :data:`PTH_MIN_TORCH` (default: the running
    torch's ``torch.__version__``; pass ``version`` to test another). Raises ValueError naming the
    file, the advisory and the fix: convert the file once to safetensors where torch >= 2.10 runs
    (``python -m noisecraft convert SRC.pth DST.safetensors``) and load that. An unparseable
    version is refused too (it cannot be shown to be safe)."""
    version = torch.__version__ if version is None else version
    release = _torch_release(version)
    if release is not None and release >= PTH_MIN_TORCH:
        return
    need = ".".join(map(str, PTH_MIN_TORCH))
    what = f"{path}: " if path is not None else ""
    raise ValueError(
        f"{what}reading a .pth file needs torch >= {need}, this is torch {version}: before torch {need} "
        f"torch.load(weights_only=True) can be made to run code from a crafted file ({_ADVISORY}). Convert it once on a machine with torch >= {need}: `python -m noisecraft "
        f"convert SRC.pth DST.safetensors`, and use the .safetensors file (safetensors files load on any "
        f"torch); or upgrade torch to >= {need}"
    )


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Return (flat tensors, safetensors metadata, 'pth' | 'safetensors'); never unpickles.

    A ``.pth`` (zip or legacy torch.save) is read only on torch >= :data:`PTH_MIN_TORCH`
    (:func:`check_torch_for_pth`). Missing: FileNotFoundError; a directory, an unreadable, empty,
    text, truncated or corrupt file: one ValueError naming the path and what was expected."""
    from ..lora import read_safetensors

    require_file(path, f"no such NPNet file; expected {_HELP_FILES} (ComfyUI folder models/npnet)",
                 f"is a directory; expected an NPNet file inside it: {_HELP_FILES}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ValueError(f"{path}: could not read it ({type(exc).__name__}: {exc.strerror or exc}); expected an "
                         f"NPNet file: check its permissions") from None
    if size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes); expected {_HELP_FILES}: download it again")
    # safetensors: u64 little-endian header length, then a JSON object
    if len(head) >= 9 and head[8:9] == b"{":
        tensors, metadata = read_safetensors(
            path, f"an NPNet checkpoint ({_HELP_FILES})",
            f"The file ({size} bytes) is truncated or corrupt: download it again.")
        return _flatten(tensors, str(path)), metadata, "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save zip archive, or legacy pickle
        check_torch_for_pth(path=path)
        try:
            # zip archives are memory-mapped (the tensors are copied into the module right after)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=head[:2] == b"PK")
        except pickle.UnpicklingError as exc:
            msg = str(exc)
            if "weights only" in msg.lower() or "weights_only" in msg.lower():
                # torch's own advice (weights_only=False) is what we refuse; keep only its reason
                lines = [ln.strip() for ln in msg.splitlines() if "WeightsUnpickler error" in ln]
                reason = lines[0].split(" Please use")[0] if lines else msg.strip().splitlines()[0]
                raise ValueError(
                    f"{path}: this .pth holds Python objects besides tensors, and loading it would mean "
                    f"unpickling (running code from the file), which NoiseCraft never does; expected a "
                    f"plain dict of tensors like the official NPNet .pth. Use a safetensors repack "
                    f"(huggingface.co/asagi4/NPNet), or, only if you trust the file, convert it yourself "
                    f"to safetensors in a separate Python session ({reason})"
                ) from exc
            raise ValueError(f"{path}: could not read it as a PyTorch checkpoint ({exc}); the file "
                             f"({size} bytes) is truncated or corrupt: download it again") from exc
        except Exception as exc:  # RuntimeError from the zip reader, EOFError, ...
            raise ValueError(f"{path}: could not read it as a PyTorch checkpoint ({type(exc).__name__}: "
                             f"{exc}); the file ({size} bytes) is truncated or corrupt: download it again") from exc
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: holds a {type(obj).__name__}, expected a dict of NPNet tensors; "
                             f"use {_HELP_FILES}")
        return _flatten(obj, str(path)), {}, "pth"
    text = all(32 <= c < 127 or c in (9, 10, 13) for c in head)
    raise ValueError(f"{path}: neither safetensors nor a PyTorch checkpoint ({'a text file, ' if text else ''}"
                     f"first bytes {head[:8]!r}, {size} bytes); expected {_HELP_FILES}: download it again")


def _meta_int(metadata: Mapping[str, str], key: str, default: int, source: str) -> int:
    value = metadata.get(key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{source}: metadata {key} = {value!r}, expected an integer; the file's metadata is "
                         f"damaged: convert the original again") from None


def _describe_unrelated(flat: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> str:
    keys = sorted(flat)
    sample = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
    kind = metadata.get("noisecraft.kind")
    if kind and kind != "npnet":
        what = f"a NoiseCraft {kind} file (metadata noisecraft.kind = {kind!r})"
    elif any("lora" in k.lower() for k in keys) or any(k.startswith("ss_") for k in metadata):
        what = "a LoRA (load it with a LoRA loader, not as an NPNet)"
    else:
        what = "not an NPNet checkpoint"
    return (f"{source}: {what}: expected the NPNet tensors unet_embedding.*, unet_svd.*, "
            f"text_embedding.* or embeeding.*, alpha and beta; got {len(keys)} tensor(s) ({sample}); "
            f"use {_HELP_FILES}")


def _infer_config(flat: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> NPNetConfig:
    """The NPNetConfig a checkpoint was built with, from its tensor shapes (and our metadata)."""
    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in flat:
            raise ValueError(f"{source}: {key!r} is missing; expected a complete NPNet checkpoint; "
                             f"the file is damaged or from another program: use {_HELP_FILES}")
        got = tuple(flat[key].shape)
        if len(got) != ndim or 0 in got:
            raise ValueError(f"{source}: {key} has shape {list(got)}, expected a non-empty {ndim}-d tensor; "
                             f"not an NPNet checkpoint NoiseCraft knows: use {_HELP_FILES}")
        return got

    lin = shape(f"{_TEXT}.linear.weight", 2)
    channels = shape("unet_embedding.upconv.weight", 4)[0]
    tokens = _meta_int(metadata, "noisecraft.tokens", 77, source)
    if tokens < 1 or lin[1] % tokens:
        raise ValueError(f"{source}: the text embedding takes {lin[1]} features, not a multiple of {tokens} "
                         f"tokens; expected tokens x width (77 x 2048 for SDXL, 77 x 1024 for Hunyuan-DiT)")
    a, c = tile_shape(channels)
    hidden, rows = shape("unet_svd.mlp1.0.weight", 2)
    cols = shape("unet_svd.mlp2.0.weight", 2)[1]
    if rows % a or cols % c or rows // a != cols // c:
        raise ValueError(f"{source}: SVD branch inputs {rows} x {cols} do not fit {channels} channels tiled "
                         f"{a} x {c} on a square latent; not an NPNet layout NoiseCraft knows")
    swin = _infer_swin(flat, source)
    # the attention's head count is not visible in shapes: the official 8 unless our metadata says otherwise
    try:
        return NPNetConfig(
            latent_channels=channels, latent_size=rows // a, text_width=lin[1] // tokens, tokens=tokens,
            svd_hidden=hidden, svd_mlp4_hidden=shape("unet_svd.mlp4.0.weight", 2)[0],
            svd_heads=_meta_int(metadata, "noisecraft.svd_heads", 8, source),
            swin_classes=shape("unet_embedding.swin.head.fc.weight", 2)[0], **swin)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc


def _infer_swin(flat: Mapping[str, torch.Tensor], source: str) -> dict:
    """The Swin branch's ``swin_*`` config fields from its tensor shapes (Swin-T for the official files).

    Patch size and width from the patch embedding, depths from the block count per stage, heads and
    window from each stage's relative-position bias table ((2 win - 1)^2 rows, one column per head;
    a window clipped to a small stage's map gives the largest one seen), the input size from the
    output grid (the ``upconv``'s input channels) times the patch size and one halving per stage."""
    pe = flat.get("unet_embedding.swin.patch_embed.proj.weight")
    up = flat.get("unet_embedding.upconv.weight")
    if pe is None or pe.ndim != 4 or up is None or up.ndim != 4:
        return {}  # the layout check names what is missing
    depths: dict[int, int] = {}
    heads: dict[int, int] = {}
    window = 1
    prefix = "unet_embedding.swin.layers."
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix):].split(".")
        if len(parts) >= 4 and parts[1] == "blocks" and parts[0].isdigit() and parts[2].isdigit():
            i, j = int(parts[0]), int(parts[2])
            depths[i] = max(depths.get(i, 0), j + 1)
            if parts[3:] == ["attn", "relative_position_bias_table"] and value.ndim == 2:
                heads[i] = int(value.shape[1])
                side = math.isqrt(int(value.shape[0]))
                window = max(window, (side + 1) // 2)
    stages = sorted(depths)
    if not stages or stages != list(range(len(stages))) or set(heads) != set(stages):
        return {}
    patch = int(pe.shape[-1])
    return {"swin_img_size": int(up.shape[1]) * patch * 2 ** (len(stages) - 1), "swin_patch": patch,
            "swin_embed_dim": int(pe.shape[0]), "swin_depths": tuple(depths[i] for i in stages),
            "swin_heads": tuple(heads[i] for i in stages), "swin_window": window}


def _expected_shapes(cfg: NPNetConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with torch.device("meta"):
        model = NPNet(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _check_layout(flat: Mapping[str, torch.Tensor], cfg: NPNetConfig, preset: Optional[str], source: str) -> None:
    expected = _expected_shapes(cfg)
    got_keys = set(flat) - {k for k in flat if k.rsplit(".", 1)[-1] in _DERIVED_BUFFERS}
    missing = sorted(set(expected) - got_keys)
    unexpected = sorted(got_keys - set(expected))
    wrong = [(k, expected[k][0], tuple(flat[k].shape)) for k in sorted(set(expected) & got_keys)
             if tuple(flat[k].shape) != expected[k][0]]
    if not (missing or unexpected or wrong):
        return
    want = f"preset {preset!r}" if preset else "the shape read from its own tensors"
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape(s) differ: " + "; ".join(
            f"{k}: expected {list(e)}, got {list(g)}" for k, e, g in wrong[:4]) + ("; ..." if len(wrong) > 4 else ""))
    if missing:
        parts.append(f"{len(missing)} missing: " + ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else ""))
    if unexpected:
        hint = ""
        if any(k.startswith("unet_embedding.swin.layers.0.downsample.") for k in unexpected):
            hint = " (a pre-0.9 timm Swin layout, patch merging at the end of each stage: not supported)"
        parts.append(f"{len(unexpected)} unexpected{hint}: " + ", ".join(unexpected[:4])
                     + (", ..." if len(unexpected) > 4 else ""))
    raise ValueError(f"{source}: not the NPNet layout of {want} "
                     f"({cfg.latent_channels}x{cfg.latent_size}x{cfg.latent_size} latents, "
                     f"{cfg.tokens}x{cfg.text_width} text): " + " | ".join(parts)
                     + "; this file is an NPNet for another model or a damaged file: pick the preset that "
                       "matches the file (or none, to read it from the file) or the file for your model")


def _resolve_config(flat: Mapping[str, torch.Tensor], metadata: Mapping[str, str], preset: Optional[str],
                    source: str) -> tuple[NPNetConfig, Optional[str]]:
    if not any(k.startswith(("unet_embedding.", "unet_svd.", f"{_TEXT}.")) for k in flat):
        raise ValueError(_describe_unrelated(flat, metadata, source))
    kind = metadata.get("noisecraft.kind")
    if kind and kind != "npnet":
        raise ValueError(_describe_unrelated(flat, metadata, source))
    found = _infer_config(flat, metadata, source)
    file_preset = metadata.get("noisecraft.preset") or None
    if preset is None:
        if file_preset is None:
            matches = [name for name, cfg in PRESETS.items() if cfg == found]
            file_preset = matches[0] if len(matches) == 1 else None  # "dit"; sdxl and dreamshaper share shapes
        return found, file_preset
    cfg = preset_config(preset)
    if (found.tokens, found.text_width) != (cfg.tokens, cfg.text_width):
        others = [n for n, c in PRESETS.items() if (c.tokens, c.text_width) == (found.tokens, found.text_width)]
        advice = f"use preset {others[0]!r}" if others else "use preset None (read from the file)"
        raise ValueError(
            f"{source}: its text embedding reads {found.tokens} x {found.text_width} prompt features, "
            f"preset {preset!r} expects {cfg.tokens} x {cfg.text_width}; this NPNet was trained for another "
            f"text encoder: {advice}, or load the NPNet file for {preset!r}"
        )
    if file_preset and file_preset != preset:
        logger.warning("%s: metadata says NPNet preset %r, loading it as %r (same shapes)", source, file_preset, preset)
    return cfg, preset


def npnet_from_state_dict(state: Mapping, preset: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                          metadata: Optional[Mapping[str, str]] = None, source: str = "<state dict>") -> NPNet:
    """Build an eval-mode :class:`NPNet` from a state dict in any of the three layouts, strictly.

    ``preset`` None reads the shape from the tensors; a preset name also checks them against it.
    Raises ValueError (naming ``source``, what was expected and got) for anything else, including
    NaN/inf tensors (:class:`~noisecraft.ode.NonFiniteError`, naming them).
    """
    flat = _flatten(state, source)
    preset = normalize_preset(preset)
    cfg, name = _resolve_config(flat, metadata or {}, preset, source)
    _check_layout(flat, cfg, preset, source)
    check_tensors_finite(flat, source, fix="download the NPNet file again, or use another one")
    with torch.device("meta"):
        model = NPNet(cfg, preset=name)
    model = model.to_empty(device=device)
    model.fill_buffers()
    model.load_state_dict({k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in _DERIVED_BUFFERS},
                          strict=True)
    return model.eval()


def load_npnet(path: PathLike, preset: Optional[str] = None, device: Union[str, torch.device] = "cpu") -> NPNet:
    """Load an NPNet from an official ``.pth`` or either safetensors repack (strict; no unpickling).

    Args:
        path: the file; its kind is read from its first bytes.
        preset: ``'sdxl'``, ``'dreamshaper'``, ``'dit'`` to require that layout, or None to read the
            layout from the file (text width from the embedding weight).
        device: where the module lives.
    Returns an eval-mode module (deterministic). Raises ValueError naming the file for another
    model's NPNet, another text width than the preset's, a LoRA or unrelated file, a directory, an
    empty, text, truncated or corrupt file, NaN/inf tensors (naming them), a ``.pth`` that would
    need unpickling, and any ``.pth`` on torch < 2.10 (:func:`check_torch_for_pth`);
    FileNotFoundError if it is absent.
    """
    path = Path(path)
    flat, metadata, fmt = _read_file(path)
    model = npnet_from_state_dict(flat, preset=preset, device=device, metadata=metadata, source=str(path))
    cfg = model.config
    logger.info("loaded NPNet %s (%s, preset %s, %d channels at %d, text %d x %d) on %s", path.name, fmt,
                model.preset or "unknown", cfg.latent_channels, cfg.latent_size, cfg.tokens, cfg.text_width, device)
    return model


# -- writing ---------------------------------------------------------------------------------


def _preset_name(model: NPNet) -> Optional[str]:
    """The model's preset, else the one preset whose shape it has ("dit"; sdxl and dreamshaper share one)."""
    if model.preset is not None:
        return model.preset
    matches = [n for n, c in PRESETS.items() if c == model.config]
    return matches[0] if len(matches) == 1 else None


def _caller_metadata(extra: Optional[Mapping[str, Any]], where: str) -> dict[str, str]:
    """The caller's entries under ``noisecraft.*`` (a key without the prefix gets it); a value that is not
    a string is stored as JSON (sorted keys)."""
    out: dict[str, str] = {}
    for k, v in (extra or {}).items():
        if not isinstance(k, str):
            raise ValueError(f"{where}: metadata keys must be strings, got {k!r} ({type(k).__name__})")
        key = k if k.startswith("noisecraft.") else f"noisecraft.{k}"
        try:
            out[key] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: metadata {k!r} is a {type(v).__name__} that is neither a string nor "
                             f"JSON-serialisable ({exc}); pass a string, number, list or dict") from None
    return out


def _metadata(cfg: NPNetConfig, name: Optional[str], extra: Mapping[str, str]) -> dict[str, str]:
    meta = {
        "noisecraft.kind": "npnet",
        "noisecraft.preset": name or "",
        "noisecraft.text_width": str(cfg.text_width),
        "noisecraft.tokens": str(cfg.tokens),
        "noisecraft.latent_channels": str(cfg.latent_channels),
        "noisecraft.latent_size": str(cfg.latent_size),
        "noisecraft.svd_heads": str(cfg.svd_heads),
        "noisecraft.config": json.dumps(cfg.to_json(), sort_keys=True),
        "noisecraft.paper": _PAPER,
    }
    meta.update(extra)
    meta["noisecraft.kind"] = "npnet"
    return meta


def npnet_metadata(model: NPNet, extra: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    """The safetensors metadata of an NPNet file: ``noisecraft.kind = npnet``, the shape
    (``noisecraft.preset``, ``text_width``, ``tokens``, ``latent_channels``, ``latent_size``,
    ``svd_heads``; the loader reads ``tokens`` and ``svd_heads``, which the tensors' shapes do not
    show), the whole :class:`NPNetConfig` as JSON (``noisecraft.config``), the paper, then ``extra``:
    each key under ``noisecraft.`` (added where missing), string values as they are, other values as
    JSON; ``extra`` may override ``noisecraft.preset``, never ``noisecraft.kind``. The preset is the
    model's, else the one preset with the model's shape, else empty."""
    return _metadata(model.config, _preset_name(model), _caller_metadata(extra, "npnet_metadata"))


def save_npnet_safetensors(model: Union[NPNet, Mapping], path: PathLike,
                           metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write an NPNet as safetensors, ``text_embedding.*`` flavour, atomically and byte-for-byte
    reproducibly (:func:`noisecraft.io.write_safetensors`), with :func:`npnet_metadata`.

    ``model`` is an :class:`NPNet` or a state dict in any of the three layouts (checked strictly
    first; its shape is read from the tensors, and its preset from ``metadata``'s
    ``noisecraft.preset`` if that names one). The one writer of NPNet files: the CLI's convert,
    the trainer and ComfyUI's Save NPNet call it. Returns ``path``.
    """
    from ..io import write_safetensors

    path = Path(path)
    where = f"save_npnet_safetensors({path})"
    extra = _caller_metadata(metadata, where)
    if isinstance(model, NPNet):
        flat = dict(model.state_dict())
        meta = _metadata(model.config, _preset_name(model), extra)
    else:
        flat = _flatten(model)
        preset = extra.get("noisecraft.preset") or None
        cfg, name = _resolve_config(flat, extra, preset if preset in PRESETS else None, where)
        _check_layout(flat, cfg, name if name in PRESETS else None, where)
        meta = _metadata(cfg, name, extra)
    tensors = {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in _DERIVED_BUFFERS}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(tensors, path, meta)


def convert_pth_to_safetensors(src: PathLike, dst: PathLike, preset: Optional[str] = None,
                               overwrite: bool = False) -> Path:
    """Convert an official NPNet ``.pth`` (or any flavour) to safetensors with metadata.

    The source is read with ``torch.load(weights_only=True)`` and checked strictly (against
    ``preset`` if given); ``noisecraft.source_sha256`` and ``noisecraft.source_name`` record it.
    The official SDXL and DreamShaper files have the same shapes: pass ``preset`` to record which.
    ``dst`` is written atomically (:mod:`noisecraft.io`); stale temp files of a killed conversion in
    its folder are removed first. A folder as ``dst`` or an unusable folder raises ``ValueError``.
    """
    import os

    from ..io import clean_stale_temps, ensure_file_target
    from ..weights import sha256_file

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src} " + ("is a folder" if src.is_dir() else "does not exist")
                                + ": expected an NPNet .pth or .safetensors file to convert")
    if os.path.isdir(dst):  # (no OSError for a name too long: ensure_file_target says that)
        raise ValueError(f"{dst} is a folder: the destination must be a file name, e.g. "
                         f"{dst / (src.stem + '.safetensors')}")
    ensure_file_target(dst, "the destination", create_parent=False)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; expected a new file name (or pass overwrite=True)")
    flat, metadata, fmt = _read_file(src)
    model = npnet_from_state_dict(flat, preset=preset, metadata=metadata, source=str(src))
    extra = {k: v for k, v in metadata.items() if k.startswith("noisecraft.") and k != "noisecraft.kind"}
    extra.update({
        "noisecraft.preset": model.preset or "",
        "noisecraft.source_name": src.name,
        "noisecraft.source_sha256": sha256_file(src),
        "noisecraft.source_format": fmt,
    })
    ensure_file_target(dst, "the destination")  # creates its folder
    clean_stale_temps(dst.parent)  # what a killed conversion into this folder left
    save_npnet_safetensors(model, dst, extra)  # atomic: our own temp file, fsync, os.replace
    logger.info("converted %s -> %s (preset %s)", src, dst, model.preset or "unknown")
    return dst

