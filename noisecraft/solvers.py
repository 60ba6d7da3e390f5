"""Deterministic solvers of the probability-flow ODE in sigma space, by name, for any ``D(x, sigma) -> x0``.

* ``euler``: :func:`noisecraft.ode.sample` (DDIM with eta = 0 for eps/v models), 1 call per step.
* ``heun``: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models"
  (arXiv:2206.00364), Alg. 1 with no churn: Euler predictor, trapezoidal corrector; 2 calls per step
  (1 on the last step, to sigma 0, which is an Euler step).
* ``dpmpp_2m``: Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
  Models" (arXiv:2211.01095), Alg. 2 (multistep second order, data prediction) in sigma space: with
  ``h = log(sigma_i / sigma_{i+1})`` and ``r = h_{i-1} / h``, ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i +
  (1 - sigma_{i+1} / sigma_i) ((1 + 1/(2r)) D_i - 1/(2r) D_{i-1})``; the first step and the step to sigma 0
  are first order (the latter returns ``D`` itself). 1 call per step.

The ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` holds for eps, v and flow models alike (DESIGN.md,
"Model kinds"), so one formula serves every kind. The update rules are k-diffusion's ``sample_heun`` /
``sample_dpmpp_2m`` (ComfyUI's samplers of those names: a teacher built here lands where ComfyUI's
sampler lands, tested), written out because these few lines come from no small library without heavy
dependencies (k-diffusion pulls in its training stack; diffusers' schedulers step in one noise
schedule's timesteps, not on a denoiser in sigma space).

Only deterministic solvers: a teacher must be a function of its noise (the cache stores the noise and
the refiner learns a map from it). :func:`check_sampler` refuses ancestral and SDE samplers by name,
naming the deterministic ones; :func:`is_stochastic` is the one name rule (the ComfyUI node uses it for
a SAMPLER's function name too). Which teacher is cheapest while keeping the refiner's quality is
measured by ``benchmarks/bench_teacher.py`` (README, "Teacher sampler").
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from . import ode
from .ode import Denoiser, StepCallback, _sigma_batch, _show, as_sigmas, check_latent, descending_steps

__all__ = ["TEACHER_SAMPLERS", "DEFAULT_SAMPLER", "PAPER_TEACHER", "CHEAPEST_TEACHER", "check_sampler", "is_stochastic", "solve", "sample_heun",
           "sample_dpmpp_2m"]

DEFAULT_SAMPLER = "euler"

# ancestral and SDE samplers re-inject fresh noise at every step (ComfyUI's names, without "sample_")
_STOCHASTIC = frozenset({"ddpm", "lcm", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "restart"})
_STOCHASTIC_WORDS = ("ancestral", "sde")


def is_stochastic(name: str) -> bool:
    """True for an ancestral or SDE sampler name (ComfyUI's, e.g. ``euler_ancestral``, ``dpmpp_2m_sde_gpu``,
    ``er_sde``, ``ddpm``, ``lcm``, ``seeds_2``, ``sa_solver``), with or without k-diffusion's ``sample_`` prefix."""
    n = str(name).strip().lower().removeprefix("sample_")
    return n in _STOCHASTIC or any(w in n for w in _STOCHASTIC_WORDS)


def _descending(sigmas, who: str) -> torch.Tensor:
    s = as_sigmas(sigmas)
    if bool(torch.any(s[1:] > s[:-1])):
        raise ValueError(f"{who} sigmas: expected a descending schedule (sigma_max first, down to 0, as ComfyUI's "
                         f"SIGMAS), got {_show(s)}; pass the sampling schedule as it is (e.g. get_sigmas(...))")
    return s


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Heun (Karras et al. 2022, Alg. 1, no churn) from ``x`` at ``sigmas[0]`` down the schedule; 2 denoiser
    calls per step, 1 for a step to sigma 0 (an Euler step, which lands on ``D``)."""
    s = _descending(sigmas, "sample_heun()")
    check_latent(x, "sample_heun() x (the start latent)", finite=False)
    for i, n, sig, nxt in descending_steps(s):
        denoised = denoiser(x, _sigma_batch(x, sig))
        d = (x - denoised) / sig
        if nxt == 0.0:
            x = denoised
        else:
            x2 = x + d * (nxt - sig)
            d2 = (x2 - denoiser(x2, _sigma_batch(x, nxt))) / nxt
            x = x + (d + d2) * ((nxt - sig) / 2)
        if callback is not None:
            callback(i, n, x, denoised, sig)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas,
                    callback: Optional[StepCallback] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2) from ``x`` at ``sigmas[0]`` down the schedule
    (formula in the module docstring); 1 denoiser call per step."""
    s = _descending(sigmas, "sample_dpmpp_2m()")
    check_latent(x, "sample_dpmpp_2m() x (the start latent)", finite=False)
    old, h_last = None, None
    for i, n, sig, nxt in descending_steps(s):
        denoised = denoiser(x, _sigma_batch(x, sig))
        if nxt == 0.0:
            x = denoised
        else:
            h = math.log(sig / nxt)
            target = denoised
            if old is not None:
                r = h_last / h
                target = denoised * (1 + 1 / (2 * r)) - old * (1 / (2 * r))
            x = x * (nxt / sig) + target * (1 - nxt / sig)
            h_last = h
        old = denoised
        if callback is not None:
            callback(i, n, x, denoised, sig)
    return x


# The teacher of the paper (Ahn, Kang et al., App. D: 20 DDIM steps) and the cheapest one measured to keep a refiner
# within 2 points of it (share of the unguided -> guided latent-MSE gap closed on 500 held-out toy samples, against
# a converged guided result; benchmarks/bench_teacher.py, README "Teacher sampler"): DPM-Solver++(2M), 10 steps on
# karras (-0.3 points at the toy's full recipe, half the passes). Euler 15 (-1.0) held too; Euler 10 (-3.0) did not;
# dpmpp_2m on `normal` is worse than Euler there. (sampler, steps, scheduler); noisecraft.presets uses it.
PAPER_TEACHER = ("euler", 20, "normal")
CHEAPEST_TEACHER = ("dpmpp_2m", 10, "karras")

_SOLVERS: dict[str, Callable] = {"euler": ode.sample, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}
TEACHER_SAMPLERS = tuple(_SOLVERS)  # the core's deterministic samplers, by ComfyUI's names


def check_sampler(name) -> str:
    """``name`` as one of :data:`TEACHER_SAMPLERS` (case and spaces ignored), else ``ValueError``: ancestral / SDE
    samplers are refused as such, other names as unknown; both messages list the deterministic ones."""
    n = str(name).strip().lower()
    choices = ", ".join(TEACHER_SAMPLERS)
    if n in _SOLVERS:
        return n
    if is_stochastic(n):
        raise ValueError(f"sampler {name!r} is stochastic (ancestral/SDE: it adds fresh noise at every step), but a "
                         f"teacher must be a function of its noise: use a deterministic one: {choices}")
    raise ValueError(f"sampler {name!r} is not one of the core's deterministic samplers: use {choices} (in ComfyUI, "
                     f"Build Teacher Cache's sampler input takes any deterministic SAMPLER)")


def solve(sampler: str, denoiser: Denoiser, x: torch.Tensor, sigmas,
          callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Sample from ``x`` at ``sigmas[0]`` down the schedule with the named deterministic sampler
    (:data:`TEACHER_SAMPLERS`; :func:`check_sampler` names the choices)."""
    return _SOLVERS[check_sampler(sampler)](denoiser, x, sigmas, callback=callback)
