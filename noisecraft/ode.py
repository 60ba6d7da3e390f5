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

Boundary checks (used by every core entry point: sampling, refinement, NPNet, stability, the file
readers), one rule per family so that no entry point words them differently:

* :func:`check_latent`: a latent / noise batch must be a floating tensor (``TypeError`` otherwise:
  integer or bool noise is refused, never silently cast), of at least ``min_dim`` dimensions with
  no empty axis (``ValueError``: an empty batch or a 0x0 latent), and, with ``finite=True``,
  free of NaN/inf (:class:`NonFiniteError`). Messages name the input (``what``) and the fix.
* :func:`check_tensors_finite`: every floating tensor of a loaded file or state dict is finite;
  the message names the file and the first offending tensors.
* :func:`check_number`: a numeric knob is a finite number (NaN is refused explicitly: ``x < 0`` is
  False for NaN) within its range, optionally an integer.

A finiteness check is one reduction (one device sync) per *call* of an entry point, never per
sampler step: :func:`sample` and :func:`invert` check shape and dtype only (no sync).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Optional, Protocol

import torch

__all__ = [
    "Denoiser",
    "StepCallback",
    "sample",
    "invert",
    "as_sigmas",
    "NonFiniteError",
    "check_latent",
    "check_finite",
    "check_tensors_finite",
    "check_number",
]


# -- boundary checks ------------------------------------------------------------------------------


class NonFiniteError(ValueError, FloatingPointError):
    """NaN or inf where finite values are needed: a ``ValueError`` (bad input), and a
    ``FloatingPointError`` for callers that catch that (non-finite model output)."""


def _fix(fix: Optional[str]) -> str:
    return f"; {fix}" if fix else ""


def check_finite(x: torch.Tensor, what: str, fix: Optional[str] = None) -> torch.Tensor:
    """Raise :class:`NonFiniteError` naming ``what`` (and counting the bad values) if ``x`` holds
    NaN or inf; returns ``x``. One reduction, one device sync."""
    if x.is_floating_point() or x.is_complex():
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            nan = int(torch.isnan(x).sum())
            raise NonFiniteError(
                f"{what} contains {bad} NaN/inf values ({nan} NaN, {bad - nan} inf) in shape "
                f"{list(x.shape)}: expected finite numbers{_fix(fix)}"
            )
    return x


def check_latent(
    x,
    what: str,
    *,
    min_dim: int = 2,
    ndim: Optional[int] = None,
    finite: bool = True,
    fix: Optional[str] = None,
) -> torch.Tensor:
    """Validate a latent / noise batch ``[B, ...]`` at an entry point; returns it unchanged.

    ``TypeError`` for a non-tensor or a non-floating tensor (integer/bool noise is refused, not
    cast); ``ValueError`` for fewer than ``min_dim`` dimensions (or not exactly ``ndim``) or an
    empty axis (B = 0, a 0x0 latent); :class:`NonFiniteError` for NaN/inf when ``finite``.
    ``what`` names the input in the message (e.g. ``"golden_noise noise"``), ``fix`` says what to do.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a floating-point tensor [B, ...], got {type(x).__name__}{_fix(fix)}")
    if not x.is_floating_point():
        raise TypeError(
            f"{what}: expected a floating-point tensor (float32/float16/bfloat16/float64), got dtype "
            f"{x.dtype} (shape {list(x.shape)}); Gaussian noise and latents are floating point (integer or "
            f"bool values are not cast: .float() them yourself only if they really are the values you mean)"
            f"{_fix(fix)}"
        )
    want = f"{ndim}-d" if ndim is not None else f"at least {min_dim}-d"
    if (ndim is not None and x.ndim != ndim) or x.ndim < min_dim:
        raise ValueError(f"{what}: expected a {want} batch [B, ...], got shape {list(x.shape)}{_fix(fix)}")
    if x.numel() == 0:
        axes = ", ".join(str(i) for i, n in enumerate(x.shape) if n == 0)
        thing = "an empty batch (B = 0)" if x.shape[0] == 0 else f"an empty tensor (size 0 on axis {axes})"
        raise ValueError(
            f"{what}: got {thing}, shape {list(x.shape)}; expected at least one sample and every size >= 1 "
            f"(e.g. a latent of width and height >= 1){_fix(fix)}"
        )
    if finite:
        check_finite(x, what, fix)
    return x


def check_tensors_finite(tensors: Mapping, source: str, fix: Optional[str] = None) -> None:
    """Raise :class:`NonFiniteError` naming ``source`` and the first tensors that hold NaN/inf.

    For weights at load time (NPNet, refiner LoRA): every floating tensor is checked once."""
    bad = []
    for key, t in tensors.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                bad.append(f"{key} ({int((~finite).sum())} of {t.numel()})")
    if bad:
        raise NonFiniteError(
            f"{source}: {len(bad)} tensor(s) hold NaN/inf values: {', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''}; expected finite weights: the file is damaged or came from "
            f"a training run that diverged{_fix(fix or 'download it again or use another file')}"
        )


def check_number(
    value,
    name: str,
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
    fix: Optional[str] = None,
):
    """A finite number in ``[lo, hi]`` (``lo_open`` / ``hi_open`` exclude the bound), as float, or as
    int with ``integer=True`` (then ``2.0`` is accepted, ``2.5``, ``True`` and NaN are not). Raises
    ``ValueError`` naming ``name``, the range and the value."""
    rng = (f"{'(' if lo_open else '['}{'-inf' if lo is None else f'{lo:g}'}, "
           f"{'inf' if hi is None else f'{hi:g}'}{')' if hi_open or hi is None else ']'}")
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name}: expected {kind} in {rng}, got {value!r}{_fix(fix)}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind} in {rng}, got {value!r}{_fix(fix)}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite {'integer' if integer else 'number'} in {rng}, got {v}{_fix(fix)}")
    if integer and v != int(v):
        raise ValueError(f"{name}: expected an integer in {rng}, got {value!r}{_fix(fix)}")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi)):
        raise ValueError(f"{name}: expected {kind} in {rng}, got {value!r}{_fix(fix)}")
    return int(v) if integer else v


# -- schedules, sampling, inversion ------------------------------------------------------------------


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        ...


StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor, float], None]


def as_sigmas(sigmas) -> torch.Tensor:
    """Validate a schedule: 1-D, finite, non-negative, at least two entries."""
    try:
        s = torch.as_tensor(sigmas, dtype=torch.float32).detach().flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"sigmas: expected a 1-D sequence or tensor of numbers (a sampling schedule), got "
                         f"{type(sigmas).__name__} {sigmas!r:.80}") from None
    if s.numel() < 2:
        raise ValueError(f"a sigma schedule needs at least 2 values (1 step), got {s.numel()}")
    if not bool(torch.all(torch.isfinite(s))) or bool(torch.any(s < 0)):
        raise ValueError(f"sigmas must be finite and >= 0, got {s.tolist()}")
    return s


def _show(s: torch.Tensor, n: int = 6) -> str:
    v = [round(float(a), 4) for a in s.tolist()]
    if len(v) <= n:
        return str(v)
    return f"[{', '.join(map(str, v[:3]))}, ..., {', '.join(map(str, v[-2:]))}] ({len(v)} values)"


def _sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma), device=x.device, dtype=torch.float32)


def descending_steps(s: torch.Tensor):
    """``(i, n, sigma, next sigma)`` for each step of the descending schedule ``s`` (``n`` steps in all): a
    repeated sigma is skipped and a step from sigma 0 ends the walk. The samplers of this module and of
    :mod:`noisecraft.solvers` share it."""
    n = len(s) - 1
    for i in range(n):
        sig, nxt = float(s[i]), float(s[i + 1])
        if sig == nxt:
            continue
        if sig == 0.0:
            break
        yield i, n, sig, nxt


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
        raise ValueError(
            f"sample() sigmas: expected a descending schedule (sigma_max first, down to 0, as ComfyUI's "
            f"SIGMAS), got {_show(s)}; pass the sampling schedule as it is (e.g. get_sigmas(...)), or use "
            f"invert() to go up"
        )
    check_latent(x, "sample() x (the start latent)", finite=False)
    for i, n, sig, nxt in descending_steps(s):
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
    check_latent(x0, "invert() x0 (the clean latent)", finite=False)
    if bool(torch.any(s[1:] > s[:-1])):
        if bool(torch.any(s[1:] < s[:-1])):
            raise ValueError(
                f"invert() sigmas: expected a monotone schedule (the descending sampling schedule, or it "
                f"flipped), got {_show(s)} which goes down and up; pass the sampler's sigmas unchanged"
            )
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
