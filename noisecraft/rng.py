"""Seeded Gaussian noise that matches ComfyUI's, without touching the global RNG.

ComfyUI's ``RandomNoise`` / ``comfy.sample.prepare_noise`` draws the whole latent batch
``[B, C, H, W]`` from one CPU generator seeded with ``seed`` (it calls ``torch.manual_seed``, which
reseeds the *global* generator; we use a private ``torch.Generator`` with the same seed, which
yields the same numbers and leaves the global state alone).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["seeded_noise", "candidate_noises"]


def seeded_noise(seed: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.randn(shape)`` from a fresh CPU generator seeded with ``seed`` (ComfyUI's noise)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randn(tuple(int(s) for s in shape), generator=g, dtype=dtype, device="cpu")


def candidate_noises(seed: int, k: int, shape: Sequence[int], batch_index: int = 0) -> torch.Tensor:
    """K candidates for batch item ``batch_index`` of a latent batch of ``shape`` [B, ...].

    Candidate i is item ``batch_index`` of ``seeded_noise(seed + i, shape)``: exactly what
    ComfyUI's ``RandomNoise(seed + i)`` gives that item. Returns [K, *shape[1:]].
    """
    if k < 1:
        raise ValueError(f"the number of candidates K must be >= 1, got {k}")
    if not 0 <= batch_index < shape[0]:
        raise ValueError(f"batch_index {batch_index} outside a batch of {shape[0]}")
    return torch.stack([seeded_noise(seed + i, shape)[batch_index] for i in range(k)])
