"""CFG + perturbed-attention guidance (PAG) over a diffusers denoiser: the NoiseRefine paper's teacher.

Papers: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895): the refiner's
teacher samples with CFG 7 + PAG 3; Ahn et al., "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance" (arXiv:2403.17377): PAG replaces the self-attention map of chosen
layers by the identity (each token attends only to itself, so the layer outputs ``to_out(to_v(h))``)
and guides away from that perturbed prediction.

:class:`PAGDenoiser` wraps a :class:`~noisecraft.hosts.diffusers.DiffusersDenoiser` and uses only
its public methods (``inputs``, ``conditioning``, ``predict``, ``x0_from``). Design choices, all
taken from diffusers' PAG pipelines (``diffusers.pipelines.pag``) so that our teacher is theirs:

* Layers: ``pag_applied_layers`` strings, each a regular expression searched in the network's module
  names; every self-attention module (a diffusers ``Attention`` that is not cross-attention) whose name
  matches is perturbed, except "fake integral" matches (``blocks.1`` does not take ``blocks.10``).
  The default is diffusers' default: ``["mid"]`` for a UNet (the mid block's self-attention),
  ``["blocks.1"]`` for a transformer without a mid block (the SD3 PAG pipeline's). A string that
  matches no self-attention, or a network without any, is refused with a message that lists the
  layers that exist.
* Processors: diffusers' own ``PAGCFGIdentitySelfAttnProcessor2_0`` (batch ``[uncond, cond, cond]``,
  the last third perturbed) with CFG, ``PAGIdentitySelfAttnProcessor2_0`` (``[cond, cond]``) without,
  and their joint-attention versions for joint-attention (MMDiT, SD3) layers (chosen by the layer's
  current processor; the SD3 path is not yet compared with diffusers' StableDiffusion3PAGPipeline in
  the tests, the UNet path is). They are set for the one forward of a call and the previous processors
  restored afterwards, also when the forward raises.
* Guidance on x0: ``D = D_u + cfg (D_c - D_u) + pag (D_c - D_p)``. The x0 map is affine in the network's
  prediction with the same coefficients for the three, so this equals diffusers' eps-space combine
  (``eps_u + cfg (eps_c - eps_u) + pag (eps_c - eps_p)``) up to float rounding. The scale is constant
  over the steps (diffusers' ``pag_adaptive_scale = 0``).
* Cost: one forward of 3B per call with CFG (3 passes per sample), 2B without. Where cond and uncond
  have different token counts the uncond half runs as its own forward of B (unperturbed), as the
  base denoiser does for CFG.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .diffusers import DiffusersDenoiser

__all__ = ["PAGDenoiser", "DEFAULT_PAG_LAYERS", "default_pag_layers", "self_attention_layers", "pag_modules",
           "perturbed_attention"]

DEFAULT_PAG_LAYERS = ("mid",)  # diffusers' StableDiffusion(XL)PAGPipeline default
_TRANSFORMER_PAG_LAYERS = ("blocks.1",)  # diffusers' StableDiffusion3PAGPipeline default
_FIX = "give --pag-layers with names from that list (each a regular expression searched in the module names, " \
       "as diffusers' pag_applied_layers), or --pag-scale 0 for the CFG teacher"


def _attention_class():
    from diffusers.models.attention_processor import Attention

    return Attention


def self_attention_layers(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every self-attention of ``network`` (a diffusers ``Attention`` that is not
    cross-attention: what diffusers' PAG pipelines may perturb), in module order."""
    attention = _attention_class()
    return [(n, m) for n, m in network.named_modules() if isinstance(m, attention) and not m.is_cross_attention]


def default_pag_layers(network: nn.Module) -> list[str]:
    """diffusers' default ``pag_applied_layers`` for this kind of network: ``["mid"]`` for a UNet (a
    ``mid_block``), ``["blocks.1"]`` for a transformer (SD3)."""
    has_mid = getattr(network, "mid_block", None) is not None
    transformer = not has_mid and hasattr(network, "transformer_blocks")
    return list(_TRANSFORMER_PAG_LAYERS if transformer else DEFAULT_PAG_LAYERS)


def _fake_integral_match(layer: str, name: str) -> bool:
    # diffusers' PAGMixin: "blocks.1" must not take "blocks.10" (both end in a number that differs)
    a, b = layer.split(".")[-1], name.split(".")[-1]
    return a.isnumeric() and b.isnumeric() and a == b


def _summary(layers: list[tuple[str, nn.Module]]) -> str:
    """The self-attention layers for a message: their blocks with counts, and the full names if few."""
    if len(layers) <= 8:
        return ", ".join(n for n, _ in layers)
    blocks: dict[str, int] = {}
    for n, _ in layers:
        head = n.split(".attentions.")[0] if ".attentions." in n else ".".join(n.split(".")[:2])
        blocks[head] = blocks.get(head, 0) + 1
    return (", ".join(f"{b} ({k})" for b, k in blocks.items()) + f"; {len(layers)} in all, e.g. {layers[0][0]}")


def pag_modules(network: nn.Module, layers: Optional[Sequence[str]] = None) -> list[tuple[str, nn.Module]]:
    """The self-attention modules ``layers`` selects in ``network``, as diffusers' PAG pipelines select
    them (module docstring); ``layers=None``: :func:`default_pag_layers`.

    Raises ValueError for a network without self-attention, a string that is not a regular expression,
    or one that matches no self-attention (the message lists the layers that exist and the fix)."""
    layers = default_pag_layers(network) if layers is None else list(layers)
    found = self_attention_layers(network)
    name = type(network).__name__
    if not found:
        raise ValueError(f"PAG perturbs self-attention, but this model ({name}) has no self-attention layers "
                         f"(diffusers Attention modules that are not cross-attention): use --pag-scale 0 (the CFG "
                         f"teacher)")
    if not layers:
        raise ValueError(f"PAG needs at least one layer; this model ({name}) has the self-attention layers "
                         f"{_summary(found)}: {_FIX}")
    chosen: dict[int, tuple[str, nn.Module]] = {}
    for layer in layers:
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"PAG layer {layer!r}: expected a non-empty string (e.g. 'mid'); {_FIX}")
        try:
            pattern = re.compile(layer)
        except re.error as exc:
            raise ValueError(f"PAG layer {layer!r} is not a regular expression ({exc}); {_FIX}") from None
        hits = [(n, m) for n, m in found if pattern.search(n) and not _fake_integral_match(layer, n)]
        if not hits:
            raise ValueError(f"PAG layer {layer!r} matches no self-attention layer of this model ({name}); it has "
                             f"{_summary(found)}: {_FIX}")
        chosen.update((id(m), (n, m)) for n, m in hits)
    return list(chosen.values())


def _processors(module: nn.Module):
    """diffusers' PAG processor pair (with CFG, without) for one attention module."""
    from diffusers.models import attention_processor as ap

    if "Joint" in type(module.processor).__name__:  # MMDiT (SD3) joint attention
        return ap.PAGCFGJointAttnProcessor2_0, ap.PAGJointAttnProcessor2_0
    return ap.PAGCFGIdentitySelfAttnProcessor2_0, ap.PAGIdentitySelfAttnProcessor2_0


@contextlib.contextmanager
def perturbed_attention(modules: Sequence[tuple[str, nn.Module]], cfg: bool) -> Iterator[None]:
    """Set diffusers' PAG processors on ``modules`` (with ``cfg``: the batch is ``[uncond, cond, cond]``,
    else ``[cond, cond]``; the last part is perturbed) and restore the previous ones on exit, also when
    the body raises."""
    saved = [(m, m.processor) for _, m in modules]
    try:
        for _, m in modules:
            with_cfg, without = _processors(m)
            m.set_processor(with_cfg() if cfg else without())
        yield
    finally:
        for m, proc in saved:
            m.set_processor(proc)


class PAGDenoiser:
    """``D(x, sigma) -> x0`` with CFG + PAG over a :class:`~noisecraft.hosts.diffusers.DiffusersDenoiser`.

    Args:
        base: the CFG denoiser (its ``cfg``, conditioning and network); ``cfg == 1`` gives PAG alone.
        pag_scale: the PAG scale (>= 0; the paper's teacher uses 3). 0 returns ``base``'s prediction.
        layers: ``pag_applied_layers`` (module docstring); None: diffusers' default for the network.

    ``passes`` counts model passes per sample: 3 per call with CFG, 2 without (1 / 2 at ``pag_scale 0``).
    """

    def __init__(self, base: DiffusersDenoiser, pag_scale: float, layers: Optional[Sequence[str]] = None):
        if not isinstance(base, DiffusersDenoiser):
            raise TypeError(f"PAGDenoiser wraps a DiffusersDenoiser, got {type(base).__name__}")
        scale = float(pag_scale)
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"pag_scale must be a finite number >= 0 (the paper's teacher uses 3), got {pag_scale}")
        self.base = base
        self.pag_scale = scale
        self.modules = pag_modules(base.unet, layers)
        self.layers = default_pag_layers(base.unet) if layers is None else list(layers)
        self.passes = 0

    @property
    def kind(self):
        return self.base.kind

    def reset_passes(self) -> None:
        self.passes = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        d = self.base
        if self.pag_scale == 0.0:
            before = d.passes
            out = d(x, sigma)
            self.passes += d.passes - before
            return out
        xf, s, xin, t = d.inputs(x, sigma)
        b = xf.shape[0]
        cond, added = d.conditioning(b)
        out_u = None
        if d.guided:
            uncond, uadded = d.conditioning(b, uncond=True)
            if cond.shape[1:] == uncond.shape[1:] and (added is None) == (uadded is None):
                both = None if added is None else {k: torch.cat([uadded[k], added[k], added[k]]) for k in added}
                with perturbed_attention(self.modules, cfg=True):
                    out = d.predict(torch.cat([xin] * 3), torch.cat([t] * 3), torch.cat([uncond, cond, cond]), both)
                return self._combine(x, xf, s, *out.float().chunk(3))
            out_u = d.predict(xin, t, uncond, uadded).float()  # token counts differ: uncond alone, unperturbed
        both = None if added is None else {k: torch.cat([added[k], added[k]]) for k in added}
        with perturbed_attention(self.modules, cfg=False):
            out = d.predict(torch.cat([xin] * 2), torch.cat([t] * 2), torch.cat([cond, cond]), both)
        return self._combine(x, xf, s, out_u, *out.float().chunk(2))

    def _combine(self, x, xf, s, out_u, out_c, out_p) -> torch.Tensor:
        """``D_u + cfg (D_c - D_u) + pag (D_c - D_p)`` (``D_c + pag (D_c - D_p)`` without CFG), in x's dtype."""
        d = self.base
        x0_c, x0_p = d.x0_from(xf, s, out_c), d.x0_from(xf, s, out_p)
        if out_u is None:
            x0 = x0_c + self.pag_scale * (x0_c - x0_p)
            self.passes += 2
        else:
            x0_u = d.x0_from(xf, s, out_u)
            x0 = x0_u + d.cfg * (x0_c - x0_u) + self.pag_scale * (x0_c - x0_p)
            self.passes += 3
        return x0.to(device=x.device, dtype=x.dtype)
