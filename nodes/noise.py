"""NOISE objects for ComfyUI's protocol: ``.seed`` and ``generate_noise(latent) -> CPU tensor``.

ComfyUI's samplers (SamplerCustomAdvanced) ask a NOISE for ``generate_noise(latent_dict)`` with
the sampler's own LATENT (after ``fix_empty_latent_channels``) and pass ``.seed`` on to the
guider. :class:`SeededNoise` reproduces ComfyUI's ``RandomNoise`` bit for bit, including the
per-batch-index seeding of latents that carry a ``batch_index`` (``comfy.sample.prepare_noise``),
without touching the global RNG: where the running ComfyUI has ``comfy.sample.prepare_noise_inner``
(which takes a generator; newer ComfyUI also draws float32 there and casts to the latent's dtype), it is
called with a private generator; older ComfyUI (v0.3.x) draws in the latent's dtype, as :func:`comfy_noise`.
:class:`FixedNoise` carries a tensor a search node produced.
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional, Sequence

import torch

import comfy.sample

from ..noisecraft.rng import seeded_noise
from ..noisecraft.stability import check_noise
from .common import SEED_MASK  # re-exported: nodes.noise.SEED_MASK was public before nodes.common

log = logging.getLogger(__name__)

__all__ = ["SEED_MASK", "SeededNoise", "FixedNoise", "NoiseTransform", "latent_samples", "comfy_noise",
           "candidate_stack", "check_input_noise"]



def latent_samples(input_latent) -> torch.Tensor:
    if not isinstance(input_latent, dict) or not torch.is_tensor(input_latent.get("samples")):
        raise ValueError(
            f"generate_noise expected a LATENT dict with a 'samples' tensor, got {type(input_latent).__name__}"
        )
    return input_latent["samples"]


def _noise_dtype(samples: torch.Tensor) -> torch.dtype:
    return samples.dtype if samples.dtype.is_floating_point else torch.float32


def comfy_noise(seed: int, shape: Sequence[int], batch_index: Optional[Sequence[int]] = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What ``comfy.sample.prepare_noise`` returns for a latent of ``shape``, from a private generator.

    Without ``batch_index`` one ``randn(shape)``; with it, one ``[1, ...]`` draw per index
    0..max(batch_index) in order, keeping the listed ones (repeats allowed).
    """
    seed = int(seed) & SEED_MASK
    shape = tuple(int(s) for s in shape)
    if batch_index is None:
        return seeded_noise(seed, shape, dtype=dtype)
    inds = [int(i) for i in batch_index]
    if len(inds) == 0 or min(inds) < 0:
        raise ValueError(f"LATENT batch_index must list non-negative indices, got {list(batch_index)}")
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    wanted = set(inds)
    drawn = {}
    for i in range(max(inds) + 1):
        n = torch.randn((1,) + shape[1:], generator=g, dtype=dtype, device="cpu")
        if i in wanted:
            drawn[i] = n
    return torch.cat([drawn[i] for i in inds], dim=0)


def candidate_stack(seed: int, k: int, input_latent: dict) -> torch.Tensor:
    """K candidate noises for a LATENT -> [K, B, ...]: candidate j is ``RandomNoise(seed + j)``'s noise."""
    if int(k) < 1:
        raise ValueError(f"the number of candidates K must be >= 1, got {k}: set candidates to 1 or more")
    return torch.stack([SeededNoise(int(seed) + j).generate_noise(input_latent) for j in range(int(k))])


class SeededNoise:
    """ComfyUI's ``RandomNoise(seed)``, without touching the global RNG."""

    def __init__(self, seed: int):
        self.seed = int(seed) & SEED_MASK

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = latent_samples(input_latent)
        inner = getattr(comfy.sample, "prepare_noise_inner", None)  # ComfyUI's own draw, from a given generator
        if inner is not None and samples.is_floating_point():
            g, inds = torch.Generator(device="cpu").manual_seed(self.seed), input_latent.get("batch_index")
            if samples.is_nested:  # (as prepare_noise: one generator through the parts, in order)
                nested = importlib.import_module("comfy.nested_tensor")  # (newer ComfyUI only)
                return nested.NestedTensor([inner(t, g, inds) for t in samples.unbind()])
            return inner(samples, g, inds)
        return comfy_noise(self.seed, samples.shape, input_latent.get("batch_index"), _noise_dtype(samples))

    def __repr__(self) -> str:
        return f"SeededNoise(seed={self.seed})"


class FixedNoise:
    """A NOISE that always returns the same unit-noise tensor (the result of a search node).

    ``source`` names the node that produced it, for the error raised when a sampler asks for a
    latent of another shape than the one searched.
    """

    def __init__(self, noise: torch.Tensor, seed: int = 0, source: str = "the noise search node"):
        if not torch.is_tensor(noise):
            raise ValueError(f"FixedNoise expects a tensor, got {type(noise).__name__}")
        noise = noise.detach().to("cpu", torch.float32).clone()
        bad = int((~torch.isfinite(noise)).sum())
        if bad:
            raise ValueError(f"{source} produced {bad} NaN/inf values (of {noise.numel()}) in its noise of shape "
                             f"{list(noise.shape)}: the MODEL gave non-finite predictions; check the model (e.g. run "
                             f"it in float32) and the inputs of {source}")
        check_noise(noise, f"noise from {source}")  # an empty batch or latent
        self.noise = noise
        self.seed = int(seed) & SEED_MASK
        self.source = source

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.noise.shape)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = latent_samples(input_latent)
        if tuple(samples.shape) != self.shape:
            raise ValueError(
                f"this NOISE was searched by {self.source} for a latent of shape {list(self.shape)}, but the "
                f"sampler's latent has shape {list(samples.shape)}: re-run {self.source} with the same LATENT "
                f"(size and batch) that goes into the sampler"
            )
        return self.noise.clone().to(_noise_dtype(samples))

    def __repr__(self) -> str:
        return f"FixedNoise(shape={list(self.shape)}, seed={self.seed}, source={self.source!r})"


class NoiseTransform:
    """Base of the lazy NOISE -> NOISE transforms (golden noise, refined noise).

    The work happens when the sampler asks: :meth:`base_noise` asks the input NOISE for the very
    same latent dict (so ComfyUI's per-batch-index seeding is unchanged) and checks its shape, its
    dtype (floating point) and its values (NaN/inf are refused naming this node; so is an empty
    latent); subclasses transform that tensor. ``.seed`` is the input NOISE's.
    """

    node_name = "a NoiseCraft noise node"

    def __init__(self, noise):
        self.noise = noise

    @property
    def seed(self):
        return self.noise.seed

    def base_noise(self, input_latent: dict) -> torch.Tensor:
        samples = latent_samples(input_latent)
        if samples.numel() == 0:
            raise ValueError(f"{self.node_name}: the sampler asked for noise for an empty LATENT (shape "
                             f"{list(samples.shape)}); set Empty Latent Image's batch_size to 1 or more and "
                             f"width/height to 8 pixels or more")
        base = self.noise.generate_noise(input_latent)
        if not torch.is_tensor(base) or tuple(base.shape) != tuple(samples.shape):
            got = list(base.shape) if torch.is_tensor(base) else type(base).__name__
            raise ValueError(f"{self.node_name}: the input NOISE gave {got} for a latent of shape "
                             f"{list(samples.shape)}; use a NOISE made for this latent (re-run the node that made it)")
        check_input_noise(base, self.node_name)
        return base


def check_input_noise(e: torch.Tensor, node: str) -> None:
    """Refuse a NOISE input's tensor that is not floating point or holds NaN/inf, naming ``node``."""
    if not e.is_floating_point():
        raise ValueError(f"{node}: the input NOISE gave a {e.dtype} tensor; expected floating-point unit Gaussian "
                         f"noise. Connect RandomNoise (or another NOISE node) to this node's noise input")
    finite = torch.isfinite(e)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{node}: the input NOISE produced NaN/inf values ({bad} of {e.numel()}) for a latent of "
                         f"shape {list(e.shape)}; the node connected to this node's noise input is broken or was "
                         f"fed NaN: check it, or connect RandomNoise")
