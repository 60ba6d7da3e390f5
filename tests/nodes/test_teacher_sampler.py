"""Build Teacher Cache's optional SAMPLER: the teacher sampled by ComfyUI's own sampling with the user's sampler.

Tier 2 (``COMFYUI_PATH``), tiny random-weight SD1.5-shaped model, under ``torch.inference_mode()`` like the
server. With a SAMPLER from KSamplerSelect, every cached x0 is what SamplerCustomAdvanced gives for the same
MODEL, noise, CFGGuider(cfg), that SAMPLER and BasicScheduler(scheduler, steps); without one the node keeps its
Euler teacher; ancestral / SDE samplers are refused naming the deterministic ones. The core's solvers
(noisecraft/solvers.py) are also checked against ComfyUI's k-diffusion functions of the same names.
"""

from __future__ import annotations

import pytest
import torch

import comfy.k_diffusion.sampling as kd
from comfy_extras.nodes_custom_sampler import (BasicScheduler, CFGGuider, KSamplerSelect, SamplerCustomAdvanced,
                                               SamplerDPMPP_2M_SDE, SamplerEulerAncestral)

CFG, STEPS, SEED, PER_PROMPT = 7.0, 4, 5, 2
F32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def model(nc):
    with torch.inference_mode():
        return nc.tiny.build("sd15", seed=0)


def _prompts(nc):
    return nc.tiny.conditioning("sd15", 10, 1) + nc.tiny.conditioning("sd15", 11, 1)


def _cache(tr, nc, model, scheduler="normal", sampler=None):
    _, neg = nc.conds("sd15")
    extra = {} if sampler is None else {"sampler": sampler}
    with torch.inference_mode():
        return tr.BuildTeacherCache.execute(model, _prompts(nc), neg, nc.latent("sd15", size=8), PER_PROMPT, SEED, CFG,
                                            STEPS, scheduler, **extra).args[0]


def _select(name):
    return KSamplerSelect().get_sampler(name)[0]


@pytest.mark.parametrize("name,scheduler", [("dpmpp_2m", "karras"), ("heun", "normal"), ("euler", "karras")])
def test_a_sampler_teacher_is_sampler_custom_advanced_with_that_sampler(tr, nc, model, name, scheduler):
    """Each prompt's batch of noises through SamplerCustomAdvanced (the node's noises as a fixed NOISE, the same
    batch): the same guider, sampler and sigmas run the same ops, so only the final process_latent_out /
    process_in round trip (x / 0.18215 * 0.18215) may round: 4 float32 roundings of max|x0|."""
    cache = _cache(tr, nc, model, scheduler, _select(name))
    assert cache.data.meta["sampler"] == name and cache.settings["sampler"] == name
    _, neg = nc.conds("sd15")
    lat = nc.latent("sd15", batch=PER_PROMPT, size=8)
    for p, positive in enumerate(_prompts(nc)):
        rows = slice(p * PER_PROMPT, (p + 1) * PER_PROMPT)
        with torch.inference_mode():
            guider = CFGGuider().get_guider(model, [positive], neg, CFG)[0]
            sigmas = BasicScheduler().get_sigmas(model, scheduler, STEPS, 1.0)[0]
            noise = nc.noise.FixedNoise(cache.noise[rows], seed=SEED)
            out = SamplerCustomAdvanced().sample(noise, guider, _select(name), sigmas, lat)[0]["samples"]
            ref = model.get_model_object("latent_format").process_in(out)
        x0 = cache.x0[rows]
        err = float((x0 - ref).abs().max())
        assert err <= 4 * F32_EPS * float(ref.abs().max()), (name, p, err)


def test_without_a_sampler_the_teacher_is_the_core_euler_as_before(tr, nc, model):
    """Not connected: the core's Euler (saved graphs unchanged); ComfyUI's euler from the same noise lands on it up
    to rounding (the Euler update is written in another order there, see test_pag_teacher.py: 16 roundings per
    step of (1 + cfg) max|x_T|)."""
    plain = _cache(tr, nc, model)
    comfy_euler = _cache(tr, nc, model, sampler=_select("euler"))
    assert plain.data.meta["sampler"] == "euler" and torch.equal(plain.noise, comfy_euler.noise)
    smax = float(model.get_model_object("model_sampling").sigma_max)
    x_t = float(plain.noise.abs().max()) * (1 + smax * smax) ** 0.5
    tol = 16 * STEPS * (1 + CFG) * F32_EPS * x_t
    assert float((plain.x0 - comfy_euler.x0).abs().max()) <= tol
    dpm = _cache(tr, nc, model, sampler=_select("dpmpp_2m"))
    assert float((plain.x0 - dpm.x0).abs().max()) > 100 * tol  # the sampler input does change the teacher


@pytest.mark.parametrize("make,what", [
    (lambda: _select("euler_ancestral"), "'euler_ancestral' (ancestral/SDE)"),
    (lambda: _select("dpmpp_2m_sde"), "'dpmpp_2m_sde' (ancestral/SDE)"),
    (lambda: _select("ddpm"), "'ddpm' (ancestral/SDE)"),
    (lambda: SamplerEulerAncestral().get_sampler(1.0, 1.0)[0], "'euler_ancestral' (ancestral/SDE)"),
    (lambda: SamplerDPMPP_2M_SDE().get_sampler("midpoint", 1.0, 1.0, "cpu")[0], "'dpmpp_2m_sde' (ancestral/SDE)"),
], ids=["select-euler-ancestral", "select-dpmpp-2m-sde", "select-ddpm", "node-euler-ancestral", "node-2m-sde"])
def test_stochastic_samplers_are_refused_naming_the_deterministic_ones(tr, nc, model, make, what):
    with pytest.raises(ValueError) as exc:
        _cache(tr, nc, model, sampler=make())
    msg = str(exc.value)
    assert msg.startswith("Build Teacher Cache: sampler: ") and what in msg, msg
    assert "function of the noise" in msg and "KSamplerSelect" in msg
    good = msg.split("deterministic sampler (")[1]
    assert all(n in good for n in ("euler", "heun", "dpmpp_2m", "lms", "uni_pc")) and "ancestral" not in good


def test_a_noise_adding_option_is_refused_too(tr, nc, model):
    import comfy.samplers

    churn = comfy.samplers.ksampler("euler", {"s_churn": 0.5})  # Euler with churn re-noises every step
    with pytest.raises(ValueError, match=r"sampler: euler with s_churn=0.5 adds fresh noise"):
        _cache(tr, nc, model, sampler=churn)


@pytest.mark.parametrize("scheduler", ["karras", "normal"])
def test_core_solvers_equal_comfyui_k_diffusion(nc, scheduler):
    """noisecraft/solvers.py and ComfyUI's k-diffusion samplers of the same name on one exact Gaussian denoiser, in
    float64: the same update rules, so the same result up to float64 rounding."""
    from noisecraft_pack.noisecraft import solvers
    from noisecraft_pack.noisecraft.analytic import GaussianData

    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 4)
    data = GaussianData(torch.randn(shape, generator=g, dtype=torch.float64) * 0.3,
                        torch.rand(shape, generator=g, dtype=torch.float64) + 0.3)
    D = data.denoiser("eps")
    table = nc.core_sigmas.SigmaTable.scaled_linear("eps")
    s = nc.core_sigmas.get_sigmas(table, scheduler, 12).double()
    x = torch.randn((3, *shape), generator=g, dtype=torch.float64) * float(s[0])
    for name, fn in (("euler", kd.sample_euler), ("heun", kd.sample_heun), ("dpmpp_2m", kd.sample_dpmpp_2m)):
        ours = solvers.solve(name, D, x, s)
        theirs = fn(lambda xx, sig: D(xx, sig), x, s, disable=True)
        assert float((ours - theirs).abs().max()) <= 1e-12 * float(x.abs().max()), name
