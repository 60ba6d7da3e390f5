"""Seeded Gaussian noise that matches ComfyUI's, without touching the global RNG.

ComfyUI's ``RandomNoise`` / ``comfy.sample.prepare_noise`` draws the whole latent batch
``[B, C, H, W]`` from one CPU generator seeded with ``seed`` (it calls ``torch.manual_seed``, which
reseeds the *global* generator; we use a private ``torch.Generator`` with the same seed, which
yields the same numbers and leaves the global state alone).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .ode import check_number

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
    k = check_number(k, "candidate_noises K (the number of candidates)", lo=1, integer=True,
                     fix="K = 1 is the seed itself")
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2 or any(n < 1 for n in shape):
        raise ValueError(f"candidate_noises shape: expected a latent batch shape [B, C, ...] with every size >= 1, "
                         f"got {list(shape)}")
    batch_index = check_number(batch_index, "candidate_noises batch_index", lo=0, integer=True)
    if batch_index >= shape[0]:
        raise ValueError(f"batch_index {batch_index} outside a batch of {shape[0]}: expected 0..{shape[0] - 1}")
    return torch.stack([seeded_noise(seed + i, shape)[batch_index] for i in range(k)])
