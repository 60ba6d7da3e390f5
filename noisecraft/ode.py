"""Deterministic sampling and inversion in sigma space, for any denoiser ``D(x, sigma) -> x0``.

A denoiser takes a latent batch ``x`` [B, ...] and a 1-D ``sigma`` tensor of length B and returns
its estimate of the clean latent. Condition and guidance are closed over by the caller.

* :func:`sample` is Euler on the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``.
  For eps/v models (``x = x0 + sigma * e``) Euler in sigma space *is* DDIM with eta = 0; for flow
  models (``x = (1 - sigma) x0 + sigma e``) the slope is the velocity and Euler is the usual flow
  sampler. One denoiser call per step.
* :func:`invert` runs the same Euler rule upward (approximate DDIM inversion): the slope at the
  *current* latent and the *current* sigma, then a step to the next, larger sigma. The first step
  starts from a clean x0 at sigma = 0, where the slope is undefined: it is evaluated at the first
  nonzero sigma instead, so nothing divides by zero and flow models give finite noise.
  (Using the current latent at the *next* sigma is a different, worse map in sigma space: see
  DESIGN.md.)

Both accept ``callback(step, total, x, denoised, sigma)`` after each step; a callback may raise
to interrupt (ComfyUI's interrupt does).
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

__all__ = ["Denoiser", "StepCallback", "sample", "invert", "as_sigmas"]


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        ...


StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor, float], None]


def as_sigmas(sigmas) -> torch.Tensor:
    """Validate a schedule: 1-D, finite, non-negative, at least two entries."""
    s = torch.as_tensor(sigmas, dtype=torch.float32).detach().flatten().cpu()
    if s.numel() < 2:
        raise ValueError(f"a sigma schedule needs at least 2 values (1 step), got {s.numel()}")
    if not bool(torch.all(torch.isfinite(s))) or bool(torch.any(s < 0)):
        raise ValueError(f"sigmas must be finite and >= 0, got {s.tolist()}")
    return s


def _sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma), device=x.device, dtype=torch.float32)


def sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas,
    callback: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Euler/DDIM(eta=0) sampling from ``x`` at ``sigmas[0]`` down the schedule.

    ``sigmas`` is descending (ComfyUI's convention, usually ending in 0). A step whose target is
    0 returns the denoised estimate itself (the Euler step lands there exactly). Cost: one
    denoiser call per step (with CFG inside the denoiser, two model passes per step).
    """
    s = as_sigmas(sigmas)
    if bool(torch.any(s[1:] > s[:-1])):
        raise ValueError("sample() needs a descending schedule; use invert() to go up")
    n = len(s) - 1
    for i in range(n):
        sig, nxt = float(s[i]), float(s[i + 1])
        if sig == nxt:
            continue
        if sig == 0.0:
            break
        denoised = denoiser(x, _sigma_batch(x, sig))
        if nxt == 0.0:
            x = denoised
        else:
            x = x + (x - denoised) * ((nxt - sig) / sig)
        if callback is not None:
            callback(i, n, x, denoised, sig)
    return x


def invert(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigmas,
    callback: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Approximate DDIM inversion: Euler from ``x0`` up to the largest sigma of ``sigmas``.

    ``sigmas`` may be given as the sampling schedule (descending, the usual case: the round trip
    visits the same sigmas) or already ascending. Returns the latent at the largest sigma; turn
    it into unit noise with :func:`noisecraft.sigmas.x_to_noise`. Cost: one denoiser call per step.
    """
    s = as_sigmas(sigmas)
    if bool(torch.any(s[1:] > s[:-1])):
        if bool(torch.any(s[1:] < s[:-1])):
            raise ValueError("invert() needs a monotone schedule")
    else:
        s = s.flip(0)
    nonzero = s[s > 0]
    if nonzero.numel() == 0:
        raise ValueError("invert() needs at least one nonzero sigma")
    first = float(nonzero[0])
    x = x0
    n = len(s) - 1
    for i in range(n):
        sig, nxt = float(s[i]), float(s[i + 1])
        if sig == nxt:
            continue
        at = sig if sig > 0.0 else first
        denoised = denoiser(x, _sigma_batch(x, at))
        x = x + (x - denoised) * ((nxt - sig) / at)
        if callback is not None:
            callback(i, n, x, denoised, at)
    return x
