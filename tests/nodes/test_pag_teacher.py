"""Build Teacher Cache on a MODEL patched by ComfyUI's stock Perturbed Attention Guidance node: the paper's
CFG + PAG teacher (Ahn, Kang et al., arXiv:2412.03895: CFG 7 + PAG 3) inside ComfyUI.

Tier 2 (``COMFYUI_PATH``), tiny random-weight SD1.5-shaped model, under ``torch.inference_mode()`` like the
server. Build Teacher Cache samples inside ``CFGGuider.sample`` (nodes/bridge.py), so the model's post-CFG
functions (PAG's) run at every step: each cached sample equals what SamplerCustomAdvanced gives for the
same MODEL, noise, CFGGuider(cfg), KSamplerSelect("euler") and BasicScheduler(scheduler, steps), and the
PAG cache differs from the plain CFG one.
"""

from __future__ import annotations

import pytest
import torch

from comfy_extras.nodes_custom_sampler import BasicScheduler, CFGGuider, KSamplerSelect, Noise_RandomNoise
from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced
from comfy_extras.nodes_pag import PerturbedAttentionGuidance

CFG, PAG, STEPS, SEED, PER_PROMPT = 7.0, 3.0, 4, 5, 2
F32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def model(nc):
    with torch.inference_mode():
        return nc.tiny.build("sd15", seed=0)


@pytest.fixture(scope="module")
def pag_model(model):
    with torch.inference_mode():
        return PerturbedAttentionGuidance.execute(model, PAG).args[0]


def _prompts(nc):
    return nc.tiny.conditioning("sd15", 10, 1) + nc.tiny.conditioning("sd15", 11, 1)


def _cache(tr, nc, model):
    _, neg = nc.conds("sd15")
    with torch.inference_mode():
        return tr.BuildTeacherCache.execute(model, _prompts(nc), neg, nc.latent("sd15", size=8), PER_PROMPT, SEED, CFG,
                                            STEPS, "normal").args[0]


def _sampler_custom_advanced(nc, model, positive, noise):
    """SamplerCustomAdvanced with CFGGuider(cfg), KSamplerSelect("euler"), BasicScheduler("normal", steps): the
    final latent in the model's inner space (the space the teacher cache stores)."""
    _, neg = nc.conds("sd15")
    with torch.inference_mode():
        guider = CFGGuider().get_guider(model, [positive], neg, CFG)[0]
        sampler = KSamplerSelect().get_sampler("euler")[0]
        sigmas = BasicScheduler().get_sigmas(model, "normal", STEPS, 1.0)[0]
        out = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, nc.latent("sd15", size=8))[0]
        return model.get_model_object("latent_format").process_in(out["samples"])


def test_the_pag_teacher_cache_is_sampler_custom_advanced_on_the_pag_model(tr, nc, model, pag_model):
    """Sample by sample: the same guided denoiser at every step (ComfyUI's CFG + PAG's post-CFG function), the
    same Euler steps. Only rounding differs: the start latent (e * sqrt(1 + sigma_max^2) in double here, in
    float32 there) and each Euler update ((x - D) / sigma * dt there, (x - D) * (dt / sigma) here) round
    differently in the last bit of values of size max|x_T|, and the guided denoiser (coefficients summing to
    1 + cfg + pag) carries that into the next step. We allow 16 such roundings per step of
    (1 + cfg + pag) max|x_T|, far below the PAG term (checked: the CFG cache is > 100x that away)."""
    cache = _cache(tr, nc, pag_model)
    plain = _cache(tr, nc, model)
    prompts = _prompts(nc)
    assert len(cache) == 2 * PER_PROMPT and torch.equal(cache.noise, plain.noise)
    lat = nc.latent("sd15", size=8)
    assert torch.equal(cache.noise[:1], Noise_RandomNoise(SEED).generate_noise(lat))  # the node's seed
    smax = float(model.get_model_object("model_sampling").sigma_max)
    for i in range(len(cache)):
        noise = nc.noise.FixedNoise(cache.noise[i:i + 1], seed=SEED)
        ref = _sampler_custom_advanced(nc, pag_model, prompts[i // PER_PROMPT], noise)
        x_t = float(cache.noise[i].abs().max()) * (1 + smax * smax) ** 0.5
        tol = 16 * STEPS * (1 + CFG + PAG) * F32_EPS * x_t
        err = float((cache.x0[i:i + 1] - ref).abs().max())
        assert err <= tol, (i, err, tol)
        assert float((plain.x0[i] - cache.x0[i]).abs().max()) > 100 * tol  # PAG changed the teacher
        cfg_ref = _sampler_custom_advanced(nc, model, prompts[i // PER_PROMPT], noise)
        assert float((plain.x0[i:i + 1] - cfg_ref).abs().max()) <= tol


def test_pag_scale_0_is_the_cfg_teacher(tr, nc, model):
    with torch.inference_mode():
        off = PerturbedAttentionGuidance.execute(model, 0.0).args[0]
    assert torch.equal(_cache(tr, nc, off).x0, _cache(tr, nc, model).x0)
