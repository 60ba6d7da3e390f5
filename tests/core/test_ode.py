"""Sampling and inversion against the closed-form ODE solution for Gaussian data."""

import math

import pytest
import torch

from noisecraft import ode
from noisecraft.analytic import GaussianData, GaussianMixture
from noisecraft.sigmas import ModelKind, SigmaTable, get_sigmas, noise_to_x

SHAPE = (2, 6, 6)


def _data():
    g = torch.Generator().manual_seed(0)
    std = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 1.5 + 0.2
    mean = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.3
    return GaussianData(mean, std)


def _table(kind):
    return SigmaTable.flow(3.0) if ModelKind.parse(kind).is_flow else SigmaTable.scaled_linear(kind)


def _noise(n=4, seed=1):
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _order(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def _errors_and_orders(kind, scheduler, error):
    """``error(data, D, x, sigmas)`` at 20, 40, 80 and 160 steps from the same noise, and the observed
    orders of convergence between successive step counts."""
    data, table = _data(), _table(kind)
    D = data.denoiser(kind)
    errs = []
    for n in (20, 40, 80, 160):
        s = get_sigmas(table, scheduler, n).double()
        errs.append(error(data, D, noise_to_x(_noise(), kind, float(s[0])), s))
    return errs, _order(errs)


@pytest.mark.parametrize("kind,scheduler", [("eps", "karras"), ("v", "normal"), ("flow", "simple")])
def test_sampling_converges_first_order_to_closed_form(kind, scheduler):
    def error(data, D, x, s):
        exact = data.flow_map(x, float(s[0]), 0.0, kind)
        return float((ode.sample(D, x, s) - exact).abs().max())

    errs, orders = _errors_and_orders(kind, scheduler, error)
    assert all(0.85 < o < 1.2 for o in orders), (errs, orders)
    assert errs[-1] < 0.06


@pytest.mark.parametrize("kind,scheduler", [("eps", "karras"), ("flow", "simple")])
def test_inversion_round_trip_error_shrinks_first_order(kind, scheduler):
    def error(data, D, x, s):
        back = ode.invert(D, ode.sample(D, x, s), s)
        return float((back - x).norm() / x.norm())

    errs, orders = _errors_and_orders(kind, scheduler, error)
    # first order in the limit (flow approaches it from below: 0.74, 0.85, 0.92)
    assert all(0.6 < o < 1.25 for o in orders) and 0.85 < orders[-1] < 1.15, (errs, orders)
    assert errs[2] < 0.06  # 80 steps: ~4% (eps), ~5.5% (flow)


def test_inversion_of_exact_x0_tracks_closed_form():
    data, table = _data(), _table("eps")
    D = data.denoiser("eps")
    s = get_sigmas(table, "karras", 400).double()
    x0 = data.sample_x0(3, torch.Generator().manual_seed(5))
    exact = data.flow_map(x0, 0.0, float(s[0]), "eps")
    got = ode.invert(D, x0, s)
    assert float((got - exact).norm() / exact.norm()) < 0.02


def test_isotropic_gaussian_round_trip_is_a_pure_rescale():
    data = GaussianData(0.0, 0.7, shape=SHAPE)
    D = data.denoiser("eps")
    s = get_sigmas(SigmaTable.scaled_linear(), "normal", 8).double()
    x = noise_to_x(_noise(), "eps", float(s[0]))
    back = ode.invert(D, ode.sample(D, x, s), s)
    ratio = back / x
    assert float(ratio.std()) < 1e-10


def test_flow_inversion_from_sigma_zero_is_finite():
    means = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    D = GaussianMixture(means, 0.2).denoiser("flow")
    s = get_sigmas(SigmaTable.flow(3.0), "simple", 10)
    x0 = means[:2].clone()
    out = ode.invert(D, x0, s)
    assert bool(torch.all(torch.isfinite(out)))
    # ascending and descending schedules give the same inversion
    assert torch.allclose(out, ode.invert(D, x0, s.flip(0)))


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_mixture_sampling_converges_to_fine_reference(kind):
    means = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    D = GaussianMixture(means, 0.3).denoiser(kind)
    table = _table(kind)
    x = noise_to_x(_noise(), kind, table.sigma_max)
    ref = ode.sample(D, x, get_sigmas(table, "normal", 1280).double())
    errs = [float((ode.sample(D, x, get_sigmas(table, "normal", n).double()) - ref).abs().max()) for n in (40, 80, 160)]
    assert errs[0] > errs[1] > errs[2]
    assert all(o > 0.7 for o in _order(errs)), errs


def test_callback_sees_every_step_and_can_interrupt():
    D = _data().denoiser("eps")
    s = get_sigmas(SigmaTable.scaled_linear(), "normal", 7)
    x = noise_to_x(_noise(1).float(), "eps", float(s[0]))
    seen = []
    ode.sample(D, x, s, callback=lambda i, n, *_: seen.append((i, n)))
    assert seen == [(i, 7) for i in range(7)]
    seen.clear()
    ode.invert(D, x, s, callback=lambda i, n, *_: seen.append(i))
    assert seen == list(range(7))

    class Stop(Exception):
        pass

    def stop(i, n, *_):
        if i == 2:
            raise Stop()

    with pytest.raises(Stop):
        ode.sample(D, x, s, callback=stop)


def test_one_denoiser_call_per_step():
    calls = []
    base = _data().denoiser("eps")

    def D(x, sigma):
        calls.append(sigma.shape)
        return base(x, sigma)

    s = get_sigmas(SigmaTable.scaled_linear(), "karras", 9)
    x = noise_to_x(_noise(3).float(), "eps", float(s[0]))
    ode.invert(D, ode.sample(D, x, s), s)
    assert len(calls) == 18 and all(c == (3,) for c in calls)


def test_bad_schedules():
    D = _data().denoiser("eps")
    x = _noise(1)
    with pytest.raises(ValueError, match="at least 2"):
        ode.sample(D, x, [1.0])
    with pytest.raises(ValueError, match="finite"):
        ode.sample(D, x, [float("nan"), 0.0])
    with pytest.raises(ValueError, match="descending"):
        ode.sample(D, x, [0.0, 1.0])
    with pytest.raises(ValueError, match="monotone"):
        ode.invert(D, x, [0.0, 2.0, 1.0])
