"""The base-model fingerprint (:mod:`noisecraft.fingerprint`) of a ComfyUI MODEL: Train Refiner records it,
Refine Noise checks it.

The fingerprint names diffusers modules; their ComfyUI weights are found with ComfyUI's own diffusers -> ldm
tables (``comfy.utils.unet_to_diffusers`` for UNets; ``mmdit_to_diffusers`` / ``flux_to_diffusers`` for DiTs,
through :func:`nodes.comfy_lora._dit_table`, whose fused-qkv slices are cut out). The weight is the one the
MODEL samples with: the original (``ModelPatcher.backup`` when a clone has patched it in place) with this
MODEL's own patches (a LoRA from LoraLoader, ...) merged by ComfyUI's ``comfy.lora.calculate_weight`` and cast
back as ComfyUI casts it, so a base + style-LoRA MODEL is "another model", and the same base loaded by both
hosts is "the base".
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

import comfy.float
import comfy.lora
import comfy.utils
from comfy.model_patcher import string_to_seed

from ..noisecraft import fingerprint as fp
from . import bridge
from .comfy_lora import _dit_table, split_target

log = logging.getLogger(__name__)

REFINE_NAME = "Refine Noise"


def _table(base) -> tuple[dict, tuple[str, ...]]:
    """diffusers weight name -> ComfyUI entry (a key, or ``(key, (dim, start, size))``), and the module candidates."""
    dit = _dit_table(base)
    if dit is not None:
        return dit[0], fp.TRANSFORMER_MODULES
    uc = getattr(getattr(base, "model_config", None), "unet_config", None) or {}
    try:
        table = {k: "diffusion_model." + v for k, v in comfy.utils.unet_to_diffusers(uc).items()}
    except (KeyError, TypeError, ValueError, IndexError):  # not a UNet ComfyUI can name in diffusers terms
        table = {}
    return table, fp.UNET_MODULES


def _weight(model, key: str) -> torch.Tensor:
    """The weight ``key`` of ComfyUI ``model`` as it samples with it: original + this MODEL's patches."""
    bk = model.backup.get(key)
    w = bk.weight if bk is not None else comfy.utils.get_attr(model.model, key)
    patches = model.patches.get(key)
    if not patches:
        return w.detach()
    out = comfy.lora.calculate_weight(patches, w.detach().to("cpu", torch.float32, copy=True), key)
    return comfy.float.stochastic_rounding(out, w.dtype, seed=string_to_seed(key))


def model_weights(model, modules=None) -> Optional[list[tuple[str, torch.Tensor]]]:
    """``[(diffusers module name, weight)]`` of ComfyUI ``model`` for ``modules`` (default: the family's
    candidates it has), or None when one of them has no weight here."""
    table, candidates = _table(model.model)
    params = dict(model.model.named_parameters())
    pick = modules if modules is not None else [m for m in candidates if split_target(table.get(m + ".weight"))[0]
                                                in params]
    out = []
    for m in pick:
        key, offset = split_target(table.get(m + ".weight"))
        if key is None or key not in params:
            return None
        w = _weight(model, key)
        out.append((m, w.narrow(offset[0], offset[1], offset[2]) if offset is not None else w))
    return out or None


def model_fingerprint(model) -> Optional[dict]:
    """The fingerprint of ComfyUI ``model`` (None for a family without the tables)."""
    weights = model_weights(model)
    return fp.fingerprint(weights) if weights else None


def report_base(refiner, model) -> str:
    """Log whether ``model`` is the base ``refiner`` was trained on; returns :class:`noisecraft.fingerprint.Match`."""
    match, why = fp.compare(fp.parse(refiner.metadata), lambda modules: model_weights(model, modules))
    name = bridge.model_name(model)
    if match == fp.Match.BASE:
        log.info("%s: fed the base model the refiner %s was trained on (%s, %s)", REFINE_NAME, refiner.name,
                 name, why)
    elif match == fp.Match.OTHER:
        log.warning("%s: this MODEL (%s) is not the base model the refiner %s was trained on (%s), though of "
                    "its architecture (%s): a fine-tune, a merge or a LoRA'd model? The refiner works best fed its "
                    "base: load %s and connect it to Refine Noise's model, and sample with this one (README, "
                    "NoiseRefine: 'Refiners on fine-tunes')", REFINE_NAME, name, refiner.name,
                    refiner.base_model, why, refiner.base_model)
    else:
        log.info("%s: refiner %s: %s; base model not checked", REFINE_NAME, refiner.name, why)
    return match
