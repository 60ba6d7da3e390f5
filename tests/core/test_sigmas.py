import math

import pytest
import torch

from noisecraft.sigmas import (
    SCHEDULERS,
    ModelKind,
    SigmaTable,
    get_sigmas,
    noise_to_x,
    scaled_linear_alphas_cumprod,
    start_factor,
    x_to_noise,
)


def test_scaled_linear_table_matches_sd_values():
    t = SigmaTable.scaled_linear()
    # SD1.x/SDXL sigma range as ComfyUI reports it
    assert t.sigma_max == pytest.approx(14.6146, abs=1e-3)
    assert t.sigma_min == pytest.approx(0.0292, abs=1e-4)
    ac = scaled_linear_alphas_cumprod()
    assert ac.shape == (1000,) and float(ac[0]) == pytest.approx(1 - 0.00085)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_every_scheduler_is_descending_and_ends_at_zero(scheduler, steps):
    s = get_sigmas(SigmaTable.scaled_linear(), scheduler, steps)
    assert s.shape == (steps + 1,)
    assert float(s[-1]) == 0.0
    assert bool(torch.all(s[1:] < s[:-1]))


def test_normal_and_karras_start_at_sigma_max():
    t = SigmaTable.scaled_linear()
    for name in ("normal", "karras", "exponential", "simple"):
        assert float(get_sigmas(t, name, 10)[0]) == pytest.approx(t.sigma_max, rel=1e-5), name


def test_karras_closed_form():
    t = SigmaTable.scaled_linear()
    s = get_sigmas(t, "karras", 3)
    rho = 7.0
    lo, hi = t.sigma_min ** (1 / rho), t.sigma_max ** (1 / rho)
    mid = (hi + 0.5 * (lo - hi)) ** rho
    assert s.tolist() == pytest.approx([t.sigma_max, mid, t.sigma_min, 0.0], rel=1e-5)


def test_timestep_sigma_roundtrip_vp():
    t = SigmaTable.scaled_linear()
    ts = torch.tensor([0.0, 1.0, 250.0, 999.0])
    assert torch.allclose(t.timestep(t.sigma(ts)), ts)
    frac = torch.tensor([10.25, 500.5])
    assert torch.allclose(t.timestep_continuous(t.sigma(frac)), frac, atol=1e-3)


def test_flow_table_is_comfyui_discrete_flow():
    f = SigmaTable.flow(shift=3.0)
    assert f.sigma_max == pytest.approx(1.0)
    assert float(f.sigma(500.0)) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    assert float(f.timestep(torch.tensor(0.25))) == pytest.approx(250.0)
    s = get_sigmas(f, "simple", 4)
    assert s.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)


@pytest.mark.parametrize("kind", list(ModelKind))
def test_unit_noise_roundtrip(kind):
    e = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    sigma_max = 1.0 if kind is ModelKind.FLOW else 14.6146
    x = noise_to_x(e, kind, sigma_max)
    assert torch.allclose(x_to_noise(x, kind, sigma_max), e)
    expected = 1.0 if kind is ModelKind.FLOW else math.sqrt(1 + sigma_max**2)
    assert start_factor(kind, sigma_max) == pytest.approx(expected)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="unknown model kind"):
        ModelKind.parse("x0")
    with pytest.raises(ValueError, match="unknown scheduler"):
        get_sigmas(SigmaTable.scaled_linear(), "nope", 10)
    with pytest.raises(ValueError, match="positive integer"):
        get_sigmas(SigmaTable.scaled_linear(), "normal", 0)
    with pytest.raises(ValueError, match="sigma_max"):
        start_factor("eps", float("nan"))
    with pytest.raises(ValueError, match="flow"):
        SigmaTable.from_alphas_cumprod(scaled_linear_alphas_cumprod(), "flow")


def test_denoise_keeps_tail_of_longer_schedule():
    t = SigmaTable.scaled_linear()
    full = get_sigmas(t, "karras", 20)
    part = get_sigmas(t, "karras", 10, denoise=0.5)
    assert torch.allclose(part, full[-11:])
