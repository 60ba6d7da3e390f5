"""The base-model fingerprint a refiner file records: which weights the refiner was trained on.

A refiner transfers to fine-tunes of its base best when the base refines (Ahn, Kang et al., arXiv:2412.03895,
Tab. 4; ``benchmarks/bench_transfer.py``, README "Refiners on fine-tunes"), and a name
(``noisecraft.base_model``) cannot tell a base from its fine-tunes: its weights can.

Metadata ``noisecraft.base_fingerprint`` (JSON): ``modules``, a few diffusers module names whose weights both
hosts hold (ComfyUI finds them through its own diffusers -> ldm tables, ``nodes/fingerprint.py``); ``sha256``,
per dtype (float32, float16, bfloat16) the sha256 of the names, shapes and bytes of those weights cast to it;
``dtype``, the precision they were hashed from. :func:`compare` compares at the finest precision both sides hold,
so the same checkpoint loaded in fp32 by one host and in fp16 by the other matches. Cheap: 4-5 tensors (SDXL:
about 2 M values).
"""

from __future__ import annotations

import hashlib
import json
import logging
from enum import Enum
from typing import Callable, Mapping, Optional, Sequence

import torch

__all__ = ["FINGERPRINT_KEY", "UNET_MODULES", "TRANSFORMER_MODULES", "DTYPES", "fingerprint", "module_fingerprint",
           "parse", "compare", "Match"]

logger = logging.getLogger(__name__)

FINGERPRINT_KEY = "noisecraft.base_fingerprint"
# first, middle and last layers of each family (diffusers names); the ones a model has are used, in this order
UNET_MODULES = ("conv_in", "time_embedding.linear_1", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                "conv_out")
TRANSFORMER_MODULES = ("pos_embed.proj", "x_embedder", "transformer_blocks.0.attn.to_q",
                       "transformer_blocks.0.ff.net.2", "proj_out")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Match(str, Enum):
    """The result of :func:`compare`: ``BASE`` (the same weights), ``OTHER`` (a model of the same architecture
    with other weights, e.g. a fine-tune), ``UNKNOWN`` (no fingerprint, or not comparable)."""

    BASE = "base"
    OTHER = "other"
    UNKNOWN = "unknown"


def _dtype_name(dtype: torch.dtype) -> Optional[str]:
    return next((k for k, v in DTYPES.items() if v == dtype), None)


def fingerprint(weights: Sequence[tuple[str, torch.Tensor]], dtypes: Sequence[str] = tuple(DTYPES)) -> dict:
    """The fingerprint of ``(module name, weight)`` pairs (see the module docstring), as a JSON-able dict;
    ``dtypes``: the precisions to hash (default all of :data:`DTYPES`)."""
    if not weights:
        raise ValueError("a fingerprint needs at least one weight")
    src = {_dtype_name(w.dtype) for _, w in weights}
    hashes = {}
    for name in dtypes:
        dtype = DTYPES[name]
        h = hashlib.sha256()
        for module, w in weights:
            h.update(module.encode() + b"\0" + json.dumps(list(w.shape)).encode() + b"\0")
            h.update(w.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes())
        hashes[name] = h.hexdigest()
    return {"modules": [m for m, _ in weights], "dtype": src.pop() if len(src) == 1 else None, "sha256": hashes}


def module_fingerprint(model: torch.nn.Module, modules: Optional[Sequence[str]] = None) -> Optional[dict]:
    """The fingerprint of a diffusers UNet / transformer (a peft adapter on it is looked through), or None when
    it has none of the modules. ``modules`` defaults to those of :data:`UNET_MODULES` /
    :data:`TRANSFORMER_MODULES` the model has."""
    names = dict(model.named_modules())
    if modules is None:
        modules = [m for m in (*UNET_MODULES, *TRANSFORMER_MODULES) if m in names]
    weights = []
    for m in modules:
        mod = names.get(m)
        if mod is None:
            return None
        base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        weights.append((m, base.weight))
    return fingerprint(weights) if weights else None


def parse(metadata: Mapping[str, str]) -> Optional[dict]:
    """The recorded fingerprint of a refiner's metadata, or None (none recorded, or unreadable: logged)."""
    text = metadata.get(FINGERPRINT_KEY)
    if not text:
        return None
    try:
        fp = json.loads(text)
        if isinstance(fp.get("modules"), list) and isinstance(fp.get("sha256"), dict):
            return fp
    except (ValueError, AttributeError):
        pass
    logger.warning("%s is not a fingerprint NoiseCraft wrote (%.60s...): not checked", FINGERPRINT_KEY, text)
    return None


def compare(recorded: Optional[dict], weights: Callable[[Sequence[str]], Optional[Sequence[tuple[str, torch.Tensor]]]]
            ) -> tuple[str, str]:
    """``(Match.*, why)``: whether the weights that ``weights(modules)`` returns (None: the model lacks one) are the
    ones ``recorded`` was computed from, at the finest precision both sides hold."""
    if recorded is None:
        return Match.UNKNOWN, "no base fingerprint recorded (a refiner file from before they were recorded)"
    have = weights(recorded["modules"])
    if not have:
        return Match.UNKNOWN, f"the model lacks the fingerprinted weights {recorded['modules'][:3]}"
    mine = _dtype_name(have[0][1].dtype)
    theirs = recorded.get("dtype")
    if mine is None:
        return Match.UNKNOWN, f"the model's weights are {have[0][1].dtype}, which the fingerprint does not cover"
    if theirs not in DTYPES or theirs == mine:
        at = mine
    elif "float32" in (mine, theirs):  # the other side's precision
        at = theirs if mine == "float32" else mine
    else:  # fp16 and bf16 hold neither each other: bf16 of an fp16 copy may round differently (then: OTHER)
        at = "bfloat16"
    if fingerprint(have, (at,))["sha256"][at] == recorded["sha256"].get(at):
        return Match.BASE, f"same weights as the refiner's base ({at})"
    return Match.OTHER, f"other weights than the refiner's base ({at} fingerprint differs)"
