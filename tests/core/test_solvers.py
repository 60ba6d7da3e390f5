"""The teacher's deterministic solvers (noisecraft/solvers.py) against the closed-form ODE solution for Gaussian
data, their measured order, the name rule that refuses ancestral/SDE samplers, and the sampler choice of the
teacher and the teacher cache."""

import math

import pytest
import torch

from noisecraft import msd, ode, solvers
from noisecraft.analytic import GaussianData
from noisecraft.sigmas import ModelKind, SigmaTable, get_sigmas, noise_to_x
from noisecraft.train import TeacherCache, build_teacher_cache

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


def _errors(name, kind, scheduler, steps, to_zero=False):
    """Max error of ``name`` against the exact flow map, from the same noise, at each step count. Without
    ``to_zero`` the schedule stops at its last nonzero sigma: the final step to 0 is first order for every
    solver (it returns D) and leaves an error of about sigma_min^2 / (2 std) that no step count removes."""
    data, table = _data(), _table(kind)
    D = data.denoiser(kind)
    errs = []
    for n in steps:
        s = get_sigmas(table, scheduler, n).double()
        s = s if to_zero else s[:-1]
        x = noise_to_x(_noise(), kind, float(s[0]))
        exact = data.flow_map(x, float(s[0]), float(s[-1]), kind)
        errs.append(float((solvers.solve(name, D, x, s) - exact).abs().max()))
    return errs


def _orders(errs):
    return [math.log2(a / b) for a, b in zip(errs, errs[1:])]


# schedules smooth in log sigma (DPM-Solver++ steps in log sigma); on `normal` (uniform timesteps, whose
# log-sigma steps near the end do not shrink with the step count) dpmpp_2m measures order 1.2-1.4 only
CASES = [("eps", "karras"), ("v", "exponential"), ("flow", "karras")]


@pytest.mark.parametrize("kind,scheduler", CASES)
@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_second_order_solvers_converge_at_order_two_to_closed_form(name, kind, scheduler):
    errs = _errors(name, kind, scheduler, (40, 80, 160))
    orders = _orders(errs)
    # halving the step divides the error by 4 (order 2; measured 1.9-2.5), Euler's only by 2 (below)
    assert all(1.8 < o < 2.6 for o in orders), (errs, orders)
    euler = _errors("euler", kind, scheduler, (40, 80, 160))
    assert all(0.9 < o < 1.1 for o in _orders(euler)), euler
    assert errs[-1] < euler[-1] / 20, (errs, euler)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_full_denoise_to_zero_lands_on_the_closed_form(name):
    # down to sigma 0: the solver's error plus the last step's, (sigma_min = 0.029)^2 / (2 * min std 0.2) * |z|
    # (|z| <= 4 for 288 Gaussian draws) = 0.009
    err = _errors(name, "eps", "karras", (80,), to_zero=True)[0]
    assert err < 0.01 + _errors(name, "eps", "karras", (80,))[0], err


def _counting(D):
    calls = []

    def f(x, sigma):
        calls.append(float(sigma[0]))
        return D(x, sigma)

    return f, calls


def test_calls_per_step_and_euler_is_ode_sample():
    D = _data().denoiser("eps")
    s = get_sigmas(_table("eps"), "karras", 10).double()
    x = noise_to_x(_noise(), "eps", float(s[0]))
    for name, want in (("euler", 10), ("dpmpp_2m", 10), ("heun", 19)):  # heun: 2 a step, 1 on the step to 0
        f, calls = _counting(D)
        solvers.solve(name, f, x, s)
        assert len(calls) == want, (name, len(calls))
    assert torch.equal(solvers.solve("euler", D, x, s), ode.sample(D, x, s))


def test_first_dpmpp_step_is_euler_and_callback_sees_every_step():
    D = _data().denoiser("eps")
    s = get_sigmas(_table("eps"), "karras", 6).double()
    x = noise_to_x(_noise(), "eps", float(s[0]))
    one = s[:2]  # one step: DPM-Solver++(1) = DDIM = Euler in sigma space (same map, to rounding)
    assert torch.allclose(solvers.sample_dpmpp_2m(D, x, one), ode.sample(D, x, one), rtol=0, atol=1e-12)
    for name in ("heun", "dpmpp_2m"):
        seen = []
        solvers.solve(name, D, x, s, callback=lambda i, n, *_: seen.append((i, n)))
        assert seen == [(i, 6) for i in range(6)]


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_sde", "er_sde", "ddpm",
                                  "lcm", "seeds_2", "sa_solver", "sample_euler_ancestral", "res_multistep_ancestral"])
def test_stochastic_samplers_are_refused_naming_the_deterministic_ones(name):
    assert solvers.is_stochastic(name)
    with pytest.raises(ValueError, match="stochastic") as exc:
        solvers.check_sampler(name)
    assert "euler, heun, dpmpp_2m" in str(exc.value) and "function of its noise" in str(exc.value)


def test_deterministic_names():
    for name in ("euler", "heun", "dpmpp_2m", "lms", "ipndm", "deis", "uni_pc", "dpm_fast", "res_multistep", "ddim"):
        assert not solvers.is_stochastic(name), name
    assert solvers.check_sampler(" DPMPP_2M ") == "dpmpp_2m"
    with pytest.raises(ValueError, match="not one of the core's deterministic samplers: use euler, heun, dpmpp_2m"):
        solvers.check_sampler("lms")


def test_teacher_x0_takes_the_sampler_and_refuses_ancestral():
    D = _data().denoiser("eps")
    s = get_sigmas(_table("eps"), "karras", 8)
    e = _noise().float()
    x_t = noise_to_x(e, "eps", float(s[0]))
    for name in solvers.TEACHER_SAMPLERS:
        assert torch.equal(msd.teacher_x0(D, e, s, "eps", sampler=name), solvers.solve(name, D, x_t, s))
    assert torch.equal(msd.teacher_x0(D, e, s, "eps"), ode.sample(D, x_t, s))  # default: euler, as before
    with pytest.raises(ValueError, match="stochastic"):
        msd.teacher_x0(D, e, s, "eps", sampler="euler_ancestral")


def test_teacher_cache_records_a_non_default_sampler(tmp_path):
    D = _data().denoiser("eps")
    s = get_sigmas(_table("eps"), "karras", 4)
    kw = dict(shape=SHAPE, conds=[0], total=3, sigmas=s, kind="eps", shard_size=3)
    euler = build_teacher_cache(tmp_path / "euler", lambda c: D, **kw)
    assert "teacher_sampler" not in euler.meta  # a cache built before the choice existed keeps its definition
    dpm = build_teacher_cache(tmp_path / "dpm", lambda c: D, sampler="dpmpp_2m", **kw)
    assert dpm.meta["teacher_sampler"] == "dpmpp_2m"
    b = TeacherCache(tmp_path / "dpm").get([0, 1, 2])
    x_t = noise_to_x(b.e, "eps", float(s[0]))
    assert torch.allclose(b.x0, solvers.solve("dpmpp_2m", D, x_t, s).float(), rtol=0, atol=1e-6)
    assert not torch.allclose(b.x0, euler.get([0, 1, 2]).x0, atol=1e-3)
    with pytest.raises(ValueError, match="different"):  # the same folder with another sampler is another cache
        build_teacher_cache(tmp_path / "dpm", lambda c: D, sampler="heun", **kw)
    with pytest.raises(ValueError, match="stochastic"):
        build_teacher_cache(tmp_path / "anc", lambda c: D, sampler="dpmpp_2m_sde", **kw)
    assert not (tmp_path / "anc").exists()  # refused before any work


def test_cli_teacher_sampler_reaches_the_cache(tmp_path):
    """`train-refiner --teacher-sampler dpmpp_2m`: the cache is sampled with it and says so (the smallest toy run)."""
    import json
    import os
    import subprocess
    import sys

    argv = ["train-refiner", "--toy", "--samples", "4", "--batch", "4", "--student-steps", "1", "--teacher-steps", "3",
            "--rank", "1", "--shard-size", "4", "--steps", "1", "--teacher-sampler", "dpmpp_2m", "--out", "r"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "noisecraft", *argv], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((tmp_path / "r" / "teacher_cache" / "index.json").read_text())
    assert index["meta"]["teacher_sampler"] == "dpmpp_2m" and index["meta"]["teacher_steps"] == 3
