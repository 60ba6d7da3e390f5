"""Sigma schedules, model kinds, and unit noise <-> x at sigma_max.

Everything in NoiseCraft lives in ComfyUI's ("k-diffusion") sigma space:

* eps and v models (VP schedules): ``x = x0 + sigma * e``. A full-denoise start is
  ``x_T = e * sqrt(1 + sigma_max**2)`` (ComfyUI's ``noise_scaling`` with ``max_denoise``), so the
  network, which sees ``x / sqrt(1 + sigma**2)``, sees exactly ``e``.
* flow models (rectified flow, SD3/Flux class): ``x = (1 - sigma) * x0 + sigma * e`` with
  ``sigma_max = 1`` and ``x_T = e``.

For every kind the ODE slope is ``(x - D(x, sigma)) / sigma``, see :mod:`noisecraft.ode`.

Schedules reproduce ComfyUI's scheduler names (``normal``, ``karras``, ``exponential``,
``simple``, ``sgm_uniform``, ``ddim_uniform``, ``beta`` is not included) over a discrete table of
sigmas, built either from ``alphas_cumprod`` (VP models) or from a flow shift.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

import torch

from .ode import check_number

__all__ = [
    "ModelKind",
    "SCHEDULERS",
    "SigmaTable",
    "scaled_linear_alphas_cumprod",
    "start_factor",
    "noise_to_x",
    "x_to_noise",
    "get_sigmas",
]


class ModelKind(str, Enum):
    """How a model relates x, x0 and the noise (its ComfyUI ``model_sampling`` type)."""

    EPS = "eps"
    V = "v"
    FLOW = "flow"

    @classmethod
    def parse(cls, value: "ModelKind | str") -> "ModelKind":
        if isinstance(value, ModelKind):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(
                f"unknown model kind {value!r}: expected one of {[k.value for k in cls]}"
            ) from None

    @property
    def is_flow(self) -> bool:
        return self is ModelKind.FLOW


def start_factor(kind: ModelKind | str, sigma_max: float) -> float:
    """Factor f with ``x_T = f * e`` for a full-denoise start at ``sigma_max``.

    eps/v: ``sqrt(1 + sigma_max**2)``; flow: ``1`` (sigma_max is 1 for flow models).
    """
    kind = ModelKind.parse(kind)
    sigma_max = float(sigma_max)
    if not math.isfinite(sigma_max) or sigma_max <= 0:
        raise ValueError(f"sigma_max must be a positive finite number, got {sigma_max}")
    if kind.is_flow:
        return 1.0
    return math.sqrt(1.0 + sigma_max * sigma_max)


def noise_to_x(e: torch.Tensor, kind: ModelKind | str, sigma_max: float) -> torch.Tensor:
    """Unit noise ``e`` -> start latent ``x_T`` at ``sigma_max`` (empty latent, full denoise)."""
    return e * start_factor(kind, sigma_max)


def x_to_noise(x: torch.Tensor, kind: ModelKind | str, sigma_max: float) -> torch.Tensor:
    """Start latent ``x_T`` at ``sigma_max`` -> unit noise (the inverse of :func:`noise_to_x`).

    Note: ComfyUI's ``inverse_noise_scaling`` is *not* this inverse.
    """
    return x / start_factor(kind, sigma_max)


def scaled_linear_alphas_cumprod(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """The SD1.x/SD2.x/SDXL ``scaled_linear`` schedule (float64, length ``num_timesteps``)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _flow_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


class SigmaTable:
    """A model's discrete sigmas and its sigma <-> timestep maps (ComfyUI's ``model_sampling``).

    Build with :meth:`from_alphas_cumprod` (VP: eps or v) or :meth:`flow` (rectified flow).
    ``sigmas`` is ascending (index = timestep), float32 like ComfyUI's buffers.
    """

    def __init__(
        self, sigmas: torch.Tensor, kind: ModelKind | str, *, multiplier: float = 1.0, shift: float = 1.0
    ):
        self.kind = ModelKind.parse(kind)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
        if self.sigmas.numel() < 2 or not bool(torch.all(self.sigmas[1:] >= self.sigmas[:-1])):
            raise ValueError("a sigma table needs at least 2 ascending values")
        self.log_sigmas = self.sigmas.log()
        self.multiplier = float(multiplier)  # flow: timestep = sigma * multiplier
        self.shift = float(shift)  # flow: sigma(t) = shift * u / (1 + (shift - 1) * u), u = t / multiplier

    @classmethod
    def from_alphas_cumprod(
        cls, alphas_cumprod: torch.Tensor | Sequence[float], kind: ModelKind | str = ModelKind.EPS
    ) -> "SigmaTable":
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if bool(torch.any((ac <= 0) | (ac >= 1))):
            raise ValueError("alphas_cumprod must lie strictly inside (0, 1)")
        kind = ModelKind.parse(kind)
        if kind.is_flow:
            raise ValueError("alphas_cumprod describes a VP (eps or v) model, not a flow model")
        return cls(((1 - ac) / ac) ** 0.5, kind)

    @classmethod
    def scaled_linear(cls, kind: ModelKind | str = ModelKind.EPS) -> "SigmaTable":
        return cls.from_alphas_cumprod(scaled_linear_alphas_cumprod(), kind)

    @classmethod
    def flow(cls, shift: float = 3.0, timesteps: int = 1000, multiplier: float = 1000.0) -> "SigmaTable":
        """ComfyUI's ``ModelSamplingDiscreteFlow`` (SD3: shift 3.0)."""
        ts = _flow_shift(shift, torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps)
        return cls(ts, ModelKind.FLOW, multiplier=multiplier, shift=shift)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """sigma -> timestep. VP: nearest index in log-sigma (ComfyUI); flow: sigma * multiplier."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if self.kind.is_flow:
            return sigma * self.multiplier
        dists = sigma.log().reshape(-1)[None, :] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).reshape(sigma.shape).to(torch.float32)

    def timestep_continuous(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """sigma -> fractional timestep by log-sigma interpolation (inverse of :meth:`sigma`)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if self.kind.is_flow:
            return sigma * self.multiplier
        ls = sigma.log().clamp(self.log_sigmas[0], self.log_sigmas[-1]).reshape(-1)
        idx = torch.searchsorted(self.log_sigmas, ls).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = ((ls - lo) / (hi - lo)).clamp(0, 1)
        return ((idx - 1).to(torch.float32) + w).reshape(sigma.shape)

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """timestep -> sigma. VP: log-linear interpolation in the table (ComfyUI); flow: shifted."""
        t = torch.as_tensor(timestep, dtype=torch.float32)
        if self.kind.is_flow:
            # ModelSamplingDiscreteFlow.sigma: time_snr_shift(shift, t / multiplier)
            return _flow_shift(self.shift, t / self.multiplier)
        t = t.clamp(0, len(self.sigmas) - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()


def _karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).tolist() + [0.0]


def _exponential(n: int, sigma_min: float, sigma_max: float) -> list[float]:
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp().tolist() + [0.0]


def _normal(table: SigmaTable, steps: int, sgm: bool = False) -> list[float]:
    start = float(table.timestep(table.sigma_max))
    end = float(table.timestep(table.sigma_min))
    append_zero = True
    if sgm:
        ts = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(table.sigma(end)), 0.0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        ts = torch.linspace(start, end, steps)
    sigs = [float(table.sigma(t)) for t in ts]
    return sigs + [0.0] if append_zero else sigs


def _simple(table: SigmaTable, steps: int) -> list[float]:
    ss = len(table.sigmas) / steps
    return [float(table.sigmas[-(1 + int(i * ss))]) for i in range(steps)] + [0.0]


def _ddim_uniform(table: SigmaTable, steps: int) -> list[float]:
    ss = max(len(table.sigmas) // steps, 1)
    sigs = [float(table.sigmas[x]) for x in range(1, len(table.sigmas), ss)]
    return sigs[::-1] + [0.0]


SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")


def get_sigmas(table: SigmaTable, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """A descending sampling schedule of ``steps`` steps ending at 0, named as in ComfyUI.

    ``denoise < 1`` keeps the last ``steps`` sigmas of a ``steps / denoise`` schedule (ComfyUI's
    ``BasicScheduler``). Returns float32 of length ``steps + 1``.
    """
    steps = check_number(steps, "get_sigmas steps", lo=1, integer=True, fix="steps must be a positive integer")
    denoise = check_number(denoise, "get_sigmas denoise", lo=0, lo_open=True, hi=1,
                           fix="1.0 is a full denoise (sampling from pure noise)")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    if scheduler == "normal":
        sigs = _normal(table, total)
    elif scheduler == "sgm_uniform":
        sigs = _normal(table, total, sgm=True)
    elif scheduler == "karras":
        sigs = _karras(total, table.sigma_min, table.sigma_max)
    elif scheduler == "exponential":
        sigs = _exponential(total, table.sigma_min, table.sigma_max)
    elif scheduler == "simple":
        sigs = _simple(table, total)
    elif scheduler == "ddim_uniform":
        sigs = _ddim_uniform(table, total)
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}: expected one of {SCHEDULERS}")
    out = torch.tensor(sigs, dtype=torch.float32)
    return out[-(steps + 1):]
