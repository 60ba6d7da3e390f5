"""Multistep score distillation (MSD): the NoiseRefine training loss.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3
(Eq. 4-5: ``L_MSD = d(F_1(... F_T(g_phi(x_T))), x0_guide)`` with
``F_t(x) = a_t x_t + b_t SG(eps_theta(x))``), App. B.2-B.3 (Proposition 2: the MSD gradient is
the full-backprop gradient up to a factor ``k`` in (0, 1) when the denoiser Jacobian is close to
a multiple of the identity) and App. D (latent MSE, teacher with N' = 20 guided steps, student
with N = 10 unguided steps).

* Teacher (:func:`teacher_x0`): guided sampling (CFG, optionally + PAG: whatever the guided
  denoiser does) from ``x_T = noise_to_x(e)`` for N' steps, without gradients.
* Student (:func:`msd_loss`): the refiner maps ``e`` to ``e_hat``; unguided Euler sampling for N
  steps from ``x_T_hat = noise_to_x(e_hat)`` with the *slope* of every step detached, and the
  latent MSE (mean over all elements) to the teacher's x0.

Why the slope and not ``D`` (DESIGN.md, "NoiseRefine conventions"). One Euler step in sigma
space is ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * (x_i - D(x_i, sigma_i)) / sigma_i``; its
slope is the eps (eps and v models) or the velocity (flow models), the quantity the paper
detaches. With the slope detached, ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * SG(slope)`` so
``d x_{i+1} / d x_i = 1`` and ``d x0_hat / d x_T_hat = 1``: the gradient of the latent MSE reaches
the refiner as ``2 / n * (x0_hat - x0_teacher) * start_factor`` (``n`` = number of latent
elements). This is the paper's MSD: in VP coordinates its DDIM step ``a_t x_t + b_t SG(eps)``
has Jacobian ``a_t``, whose product is the same constant factor. Detaching ``D`` instead
(``x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (1 - sigma_{i+1}/sigma_i) SG(D)``) multiplies the
gradient by ``sigma_{i+1} / sigma_i`` per step, whose product is ``sigma_N / sigma_0 = 0`` for a
schedule that ends at 0: the refiner would receive no gradient at all.

Memory does not grow with N: since ``x0_hat - x_T_hat`` does not depend on ``x_T_hat`` through
autograd (every slope is a constant), the student chain runs once under ``torch.no_grad()``
(the very :func:`noisecraft.ode.sample` used at inference) to get the constant
``delta = x0_student - x_T_hat``, and ``x0_hat = x_T_hat + delta`` carries the graph, which
consists of the refiner's forward and a few elementwise ops. Value and gradient equal those of
the step-by-step detached chain (tests check both to 1e-5 against an unrolled autograd
reference, and the saved-tensor count for N = 1, 5, 10).

Cost per training sample: one refiner call (two single-cond passes for a LoRA refiner, one
of them with a graph) + N unguided passes without a graph + one backward through the refiner;
the teacher costs 2N' passes (CFG), once per (seed, prompt) if cached.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import ode
from .ode import Denoiser, StepCallback, check_latent
from .sigmas import ModelKind, start_factor
from .solvers import DEFAULT_SAMPLER, solve

__all__ = ["msd_loss", "teacher_x0", "check_schedule"]

Refiner = Callable[[torch.Tensor], torch.Tensor]


def check_schedule(sigmas, what: str) -> torch.Tensor:
    """A full-denoise sampling schedule: descending, first sigma > 0, last sigma 0."""
    s = ode.as_sigmas(sigmas)
    if bool(torch.any(s[1:] > s[:-1])):
        raise ValueError(f"the {what} schedule must be descending (sigma_max first), got {s.tolist()}")
    if float(s[0]) <= 0.0:
        raise ValueError(f"the {what} schedule must start at sigma_max > 0, got {s.tolist()}")
    if float(s[-1]) != 0.0:
        raise ValueError(
            f"the {what} schedule must end at sigma 0 (a full denoise to x0), got last sigma {float(s[-1]):g}: "
            "build it with noisecraft.sigmas.get_sigmas(table, scheduler, steps) (denoise 1.0)"
        )
    return s


def _need_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "msd_loss needs autograd but runs under torch.inference_mode() (ComfyUI runs every node "
            "that way): wrap the training step in `with torch.inference_mode(False), torch.enable_grad():` "
            "and pass cloned inputs"
        )


@torch.no_grad()
def teacher_x0(
    guided_denoiser: Denoiser,
    e: torch.Tensor,
    sigmas,
    kind: ModelKind | str,
    callback: Optional[StepCallback] = None,
    sampler: str = DEFAULT_SAMPLER,
) -> torch.Tensor:
    """The teacher's x0: guided sampling from ``x_T = noise_to_x(e)`` down ``sigmas`` (N' steps).

    ``guided_denoiser`` closes over the prompt and the guidance (CFG, + PAG, ...). ``sampler`` is a
    deterministic solver of :mod:`noisecraft.solvers` (euler, the paper's DDIM, by default; heun,
    dpmpp_2m; ancestral/SDE ones are refused). Runs without gradients; cost: N' guided calls (2N'
    model passes with CFG; heun about twice that). The result is what a teacher cache stores per
    (seed, prompt).
    """
    s = check_schedule(sigmas, "teacher")
    check_latent(e, "teacher_x0 e (the teacher's start noise)")
    x_t = e.detach() * start_factor(kind, float(s[0]))
    return solve(sampler, guided_denoiser, x_t, s, callback=callback)


def msd_loss(
    refiner: Refiner,
    e: torch.Tensor,
    student_denoiser: Denoiser,
    teacher_x0: torch.Tensor,
    sigmas,
    kind: ModelKind | str,
    callback: Optional[StepCallback] = None,
) -> tuple[torch.Tensor, dict]:
    """The MSD loss of a refiner on a batch of unit noises ``e`` (see the module docstring).

    Args:
        refiner: ``e -> e_hat`` (unit-noise scale), differentiable in its parameters, e.g.
            ``functools.partial(refine_with, residual_fn)`` from :mod:`noisecraft.refine`.
        e: unit Gaussian noise [B, ...], the same noise the teacher started from.
        student_denoiser: unguided ``D(x, sigma) -> x0`` (positive prompt, cfg 1, refiner off).
        teacher_x0: the teacher's x0 for ``e`` (:func:`teacher_x0`), same shape as ``e``.
        sigmas: the student's schedule (N steps, descending from sigma_max to 0); its first
            sigma must be the teacher's sigma_max.
        kind: the model kind (eps, v, flow): fixes ``x_T = start_factor * e``.
        callback: passed to :func:`noisecraft.ode.sample` for the student steps (progress,
            interruption).

    Returns ``(loss, stats)``: ``loss`` is a 0-dim tensor (float32, or float64 for float64
    inputs) with a graph through the refiner only; ``stats`` holds floats ``loss``,
    ``residual_rms`` (RMS of ``e_hat - e``), ``start_factor`` and the int ``steps`` (N). The
    student chain runs on a float32 (or wider) latent even when the refiner returns fp16/bf16.
    Memory does not depend on N.
    """
    _need_autograd()
    s = check_schedule(sigmas, "student")
    check_latent(e, "msd_loss e (the unit noise batch)")
    if not isinstance(teacher_x0, torch.Tensor) or teacher_x0.shape != e.shape:
        raise ValueError(
            f"teacher_x0 has shape {tuple(getattr(teacher_x0, 'shape', ()))} but the noise batch is "
            f"{tuple(e.shape)}: pass the teacher x0 computed from this very noise (teacher_x0(...))"
        )
    check_latent(teacher_x0, "msd_loss teacher_x0", fix="rebuild the teacher cache (its x0 are damaged)")
    factor = start_factor(kind, float(s[0]))
    if e.is_inference():  # e.g. a ComfyUI NOISE made under inference mode: autograd cannot save it
        e = e.clone()

    e_hat = refiner(e)
    if not isinstance(e_hat, torch.Tensor) or e_hat.shape != e.shape:
        raise ValueError(
            f"the refiner returned {tuple(getattr(e_hat, 'shape', ()))} for noise of shape {tuple(e.shape)}: "
            "a refiner maps unit noise to refined unit noise of the same shape"
        )
    x_t = e_hat * factor

    work = torch.promote_types(x_t.dtype, torch.float32)  # fp16/bf16 refiners: chain and loss in float32

    # The student chain: no graph, constant offset from the start latent.
    with torch.no_grad():
        x_t_const = x_t.detach().to(work)
        x0_student = ode.sample(student_denoiser, x_t_const, s, callback=callback)
        delta = x0_student.to(work) - x_t_const

    x0_hat = x_t.to(work) + delta  # d x0_hat / d x_t = 1 (detached slopes)
    target = teacher_x0.detach().to(device=x0_hat.device, dtype=work)
    if target.is_inference():
        target = target.clone()
    loss = F.mse_loss(x0_hat, target, reduction="mean")

    with torch.no_grad():
        residual_rms = float((e_hat.detach().float() - e.detach().float()).pow(2).mean().sqrt())
    stats = {
        "loss": float(loss.detach()),
        "residual_rms": residual_rms,
        "start_factor": factor,
        "steps": int(sum(1 for a, b in zip(s[:-1].tolist(), s[1:].tolist()) if a != b)),
    }
    return loss, stats
