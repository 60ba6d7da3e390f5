"""NoiseRefine: the refined-noise residual and its strength.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3
(noise refining network ``g_phi`` = LoRA on the diffusion model with a residual connection,
run once at ``t = T``) and Sec. 4 "Controllability" (scaling the residual is a training-free
strength control).

The paper has no official code; the convention below is ours (DESIGN.md, "NoiseRefine
conventions"). With unit noise ``e`` and the full-denoise start ``x_T = noise_to_x(e)``
(:func:`noisecraft.sigmas.noise_to_x`)::

    e_hat = e + s * (D_base(x_T, sigma_max) - D_lora(x_T, sigma_max)) / sigma_max

where ``D`` is the model's x0 prediction (what ComfyUI's model call returns) without and with
the refiner LoRA, both with the positive prompt only and no guidance (cfg 1), and ``s`` is the
strength. What the residual is, per model kind (exact algebra; the tests check each):

* eps models: ``D = x - sigma * eps``, so the residual is ``eps_lora - eps_base``, the
  difference of the eps predictions at ``x_T`` (the network sees exactly ``e``).
* v models: ``D = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)``, so the residual is
  ``(v_lora - v_base) / sqrt(sigma^2 + 1)``, which is again ``eps_lora - eps_base`` (the eps
  implied by a v prediction is ``sigma / sqrt(sigma^2 + 1) * x_in + v / sqrt(sigma^2 + 1)``).
* flow models: ``D = x - sigma * v``, so the residual is ``v_lora - v_base``, the difference
  of the velocity predictions. (The eps-equivalent of a flow model at ``sigma = 1`` is ``x``
  itself whatever the network says, so an eps difference would always be zero there.)
* At initialisation (LoRA ``up`` = 0) ``D_lora`` and ``D_base`` are the same computation, so the
  residual is exactly zero (bit for bit) for every model kind: an untrained refiner is a no-op.

Strength ``s``: 0 turns refinement off (``e`` is returned unchanged, no model call), 1 is the
trained refiner; values in between or above scale the residual (the paper's training-free
control, Fig. 13). We accept ``0 <= s <= STRENGTH_MAX`` (= 2): a negative strength pushes the
noise *away* from the guided result, and beyond 2 the refined noise leaves the region the
refiner was trained on (we have not measured anything useful there); both are rejected with an
error rather than silently clamped.

Cost: two single-cond model passes once per image (:func:`refine_noise`), against two passes
per *step* for CFG.

Bad input is refused at the entry points, naming its source (:func:`noisecraft.ode.check_latent`):
the input noise must be a non-empty floating-point tensor of finite values (NaN/inf noise is
blamed on the noise, before any model call); a non-finite *refined* noise is blamed on the
refiner (``refiner`` names the file or LoRA in the message).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .ode import Denoiser, check_finite, check_latent
from .sigmas import ModelKind, start_factor

__all__ = [
    "STRENGTH_MAX",
    "check_strength",
    "residual_from_denoisers",
    "refine_with",
    "refine_noise",
]

STRENGTH_MAX = 2.0
"""The largest accepted strength (see the module docstring for why the range is [0, 2])."""

ResidualFn = Callable[[torch.Tensor], torch.Tensor]


def check_strength(strength: float) -> float:
    """Validate a refinement strength: a finite number in ``[0, STRENGTH_MAX]``; returns it as float."""
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise TypeError(f"strength must be a number in [0, {STRENGTH_MAX:g}], got {strength!r}") from None
    if not math.isfinite(s):
        raise ValueError(
            f"strength must be a finite number in [0, {STRENGTH_MAX:g}] (0 = off, 1 = as trained), got {s}"
        )
    if s < 0.0 or s > STRENGTH_MAX:
        raise ValueError(
            f"strength {s:g} is outside [0, {STRENGTH_MAX:g}]: use 0 to turn refinement off, 1 for the "
            f"refiner as trained, up to {STRENGTH_MAX:g} to exaggerate it"
        )
    return s


def residual_from_denoisers(
    base_denoiser: Denoiser,
    lora_denoiser: Denoiser,
    kind: ModelKind | str,
    sigma_max: float,
) -> ResidualFn:
    """The refiner residual as a function of unit noise: ``r(e) = (D_base(x_T) - D_lora(x_T)) / sigma_max``.

    ``x_T = noise_to_x(e, kind, sigma_max)``; both denoisers are called once, at ``sigma_max``,
    under the caller's grad mode (in training, gradients reach the LoRA weights through
    ``D_lora``; ``D_base`` has no trainable weights, so autograd builds no graph for it unless
    ``e`` itself requires grad). The returned residual has ``e``'s dtype and device.
    ``base_denoiser`` and ``lora_denoiser`` may be one model whose LoRA is toggled by the callables.
    """
    kind = ModelKind.parse(kind)
    factor = start_factor(kind, sigma_max)  # validates sigma_max
    sigma_max = float(sigma_max)

    def residual(e: torch.Tensor) -> torch.Tensor:
        x_t = e * factor
        sig = torch.full((e.shape[0],), sigma_max, dtype=torch.float32, device=e.device)
        d_base = base_denoiser(x_t, sig)
        d_lora = lora_denoiser(x_t, sig)
        for name, d in (("base", d_base), ("refiner", d_lora)):
            if not isinstance(d, torch.Tensor) or d.shape != e.shape:
                raise ValueError(
                    f"the {name} denoiser returned {tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__} "
                    f"for a latent of shape {tuple(e.shape)}: expected an x0 prediction of the latent's shape"
                )
        r = (d_base.to(torch.float32) - d_lora.to(torch.float32)) / sigma_max
        return r.to(device=e.device, dtype=e.dtype)

    return residual


def refine_with(residual_fn: ResidualFn, e: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``e_hat = e + strength * residual_fn(e)``: refine unit noise with any residual network.

    This is the form the trainer uses (``residual_fn`` is the trainable part, e.g.
    :func:`residual_from_denoisers` over a LoRA, or a small test network). Gradients flow through
    ``residual_fn`` (and to ``e`` if it requires grad). ``strength == 0`` returns ``e``
    unchanged without calling ``residual_fn``.
    """
    s = check_strength(strength)
    check_latent(e, "refine_with e (the input noise)", finite=False)
    if s == 0.0:
        return e
    r = residual_fn(e)
    if not isinstance(r, torch.Tensor) or r.shape != e.shape:
        raise ValueError(
            f"the residual network returned {tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__} "
            f"for noise of shape {tuple(e.shape)}: a residual must have the noise's shape"
        )
    r = r.to(dtype=e.dtype, device=e.device)
    return e + r if s == 1.0 else e + s * r


def refine_noise(
    e: torch.Tensor,
    base_denoiser: Denoiser,
    lora_denoiser: Denoiser,
    kind: ModelKind | str,
    sigma_max: float,
    strength: float = 1.0,
    *,
    refiner: str = "the refiner",
) -> torch.Tensor:
    """Refined unit noise for inference (DESIGN.md convention, see the module docstring).

    Args:
        e: unit Gaussian noise [B, C, H, W] (ComfyUI's NOISE output, before any scaling).
        base_denoiser: ``D(x, sigma) -> x0`` of the model without the refiner, positive prompt
            only, cfg 1.
        lora_denoiser: the same with the refiner LoRA enabled.
        kind: the model kind (eps, v, flow), which fixes ``x_T = noise_to_x(e)``.
        sigma_max: the first sigma of the sampling schedule (flow models: 1).
        strength: 0 = off (returns ``e``, no model call), 1 = as trained, up to ``STRENGTH_MAX``.
        refiner: how to name the refiner in an error (its file name or LoRA name).

    Returns ``e_hat`` in ``e``'s dtype and device: unit-noise scale, ready to be sampled
    without guidance exactly like ``e`` would be. Cost: two single-cond passes (one call of
    each denoiser), once per image. Refuses (``TypeError`` / ``ValueError``) a non-floating,
    empty or non-finite ``e`` before any model call, naming the input noise; raises
    :class:`~noisecraft.ode.NonFiniteError` (a ``ValueError`` and a ``FloatingPointError``)
    naming ``refiner`` if the refined noise is not finite (a broken refiner, or fp16 overflow)
    instead of returning a black image.
    """
    s = check_strength(strength)
    start_factor(kind, sigma_max)  # validate kind and sigma_max even when off
    check_latent(e, "refine_noise e (the input noise, before refinement)",
                 fix="the noise source (seed / NOISE node) produced it, not the refiner")
    if s == 0.0:
        return e
    e_hat = refine_with(residual_from_denoisers(base_denoiser, lora_denoiser, kind, sigma_max), e, s)
    return check_finite(e_hat, "the refined noise",
                        f"the input noise was finite, so {refiner} (or the model in this precision) produced "
                        f"non-finite predictions at sigma_max {float(sigma_max):g}; check that {refiner} was trained "
                        f"for this model and is not damaged, or run the refiner pass in float32")
