"""Exact denoisers for Gaussian and Gaussian-mixture data, in sigma space.

These make sampling, inversion and stability checkable against closed forms: for data
``x0 ~ N(mu, diag(c^2))`` the posterior mean ``E[x0 | x]`` is linear in ``x`` and the
probability-flow ODE has an exact solution, for both noise conventions:

* VP models seen in sigma space (eps and v): ``x = x0 + sigma * e``, ``Var x = c^2 + sigma^2``.
* flow models: ``x = (1 - sigma) * x0 + sigma * e``, ``Var x = (1 - sigma)^2 c^2 + sigma^2``.

In both cases the ODE keeps the standardized coordinate ``z = (x - a(sigma) mu) / std(sigma)``
constant (``a = 1`` for VP, ``1 - sigma`` for flow), which :meth:`GaussianData.flow_map` uses.

For a mixture the denoiser is exact (posterior-weighted component means) but the ODE has no
closed form; tests compare against a fine-step reference instead.
"""

from __future__ import annotations

import math

import torch

from .sigmas import ModelKind

__all__ = ["GaussianData", "GaussianMixture"]


def _coeffs(kind: ModelKind, sigma: torch.Tensor):
    """(a, b) with x = a * x0 + b * e."""
    if kind.is_flow:
        return 1.0 - sigma, sigma
    return torch.ones_like(sigma), sigma


def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x)


class GaussianData:
    """``x0 ~ N(mean, diag(std^2))`` over latents of shape ``mean.shape``.

    ``mean`` and ``std`` broadcast to the latent shape (without the batch dimension).
    """

    def __init__(self, mean: torch.Tensor | float, std: torch.Tensor | float, shape=None):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        std = torch.as_tensor(std, dtype=torch.float64)
        if shape is not None:
            mean = mean.expand(shape).clone()
            std = std.expand(shape).clone()
        if bool(torch.any(std <= 0)):
            raise ValueError("std must be positive")
        self.mean, self.std = torch.broadcast_tensors(mean, std)

    def denoiser(self, kind: ModelKind | str = ModelKind.EPS):
        kind = ModelKind.parse(kind)

        def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            s = _expand(sigma.to(torch.float64), x)
            a, b = _coeffs(kind, s)
            mu, c2 = self.mean.to(x.device), (self.std**2).to(x.device)
            var = a * a * c2 + b * b
            out = mu + (a * c2 / var) * (x.to(torch.float64) - a * mu)
            return out.to(x.dtype)

        return D

    def flow_map(self, x: torch.Tensor, sigma_from: float, sigma_to: float, kind: ModelKind | str = ModelKind.EPS):
        """The exact probability-flow ODE solution from ``sigma_from`` to ``sigma_to``."""
        kind = ModelKind.parse(kind)
        mu, c2 = self.mean.to(x.device), (self.std**2).to(x.device)
        sf = torch.tensor(float(sigma_from), dtype=torch.float64)
        st = torch.tensor(float(sigma_to), dtype=torch.float64)
        af, bf = _coeffs(kind, sf)
        at, bt = _coeffs(kind, st)
        z = (x.to(torch.float64) - af * mu) / torch.sqrt(af * af * c2 + bf * bf)
        return (at * mu + z * torch.sqrt(at * at * c2 + bt * bt)).to(x.dtype)

    def sample_x0(self, n: int, generator: torch.Generator) -> torch.Tensor:
        e = torch.randn((n, *self.mean.shape), generator=generator, dtype=torch.float64)
        return self.mean + self.std * e


class GaussianMixture:
    """Isotropic mixture: ``x0 ~ sum_m w_m N(means[m], std^2 I)``; ``means`` is [M, *shape]."""

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() < 2:
            raise ValueError("means must be [M, *latent_shape]")
        self.std = float(std)
        m = self.means.shape[0]
        w = torch.full((m,), 1.0 / m, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.log_w = (w / w.sum()).log()

    def denoiser(self, kind: ModelKind | str = ModelKind.EPS):
        kind = ModelKind.parse(kind)

        def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            xd = x.to(torch.float64)
            s = sigma.to(torch.float64).reshape(-1, 1)
            a, b = _coeffs(kind, s)
            var = a * a * self.std**2 + b * b  # [B, 1]
            flat = xd.reshape(xd.shape[0], -1)  # [B, d]
            mus = self.means.reshape(self.means.shape[0], -1).to(x.device)  # [M, d]
            d = flat.shape[1]
            # log N(x; a mu_m, var I) per component
            sq = ((flat[:, None, :] - a[:, :, None] * mus[None]) ** 2).sum(-1)  # [B, M]
            logp = self.log_w.to(x.device)[None] - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
            r = torch.softmax(logp, dim=1)  # [B, M]
            post = mus[None] + (a * self.std**2 / var)[:, :, None] * (flat[:, None, :] - a[:, :, None] * mus[None])
            out = (r[:, :, None] * post).sum(1)
            return out.reshape(xd.shape).to(x.dtype)

        return D

    def sample_x0(self, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        e = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=torch.float64)
        return self.means[idx] + self.std * e
