"""The bridge runs the core inside ComfyUI's CFGGuider: same numbers as ComfyUI's own sampler."""

from __future__ import annotations

import pytest
import torch

import comfy.model_management as mm
import comfy.model_sampling
import comfy.sample
import comfy.samplers
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

FAMILIES = ("sd15", "sd2v", "sdxl", "sd3")


def _bridge_sample(nc, model, pos, neg, lat, seed, cfg, steps, scheduler="normal"):
    b = nc.bridge
    lat = b.prepare_latent(model, lat)
    e = Noise_RandomNoise(seed).generate_noise(lat)
    sigmas = b.get_sigmas(model, scheduler, steps)
    kind = b.model_kind(model)

    def fn(ctx):
        x = nc.core_sigmas.noise_to_x(e.to(ctx.device), kind, float(ctx.sigmas[0]))
        return nc.core_ode.sample(ctx.denoiser, x, ctx.sigmas)

    _, out = b.run_core(model, pos, neg, lat["samples"], fn, sigmas=sigmas, cfg=cfg, seed=seed,
                        return_guider_output=True)
    return out


def _comfy_euler(model, pos, neg, lat, seed, cfg, steps, scheduler="normal"):
    samples = comfy.sample.fix_empty_latent_channels(model, lat["samples"])
    noise = Noise_RandomNoise(seed).generate_noise({"samples": samples})
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    sampler = comfy.samplers.sampler_object("euler")
    return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, pos, neg, samples, seed=seed,
                                      disable_pbar=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_kind_from_model_sampling(nc, family):
    want = {"sd15": "eps", "sd2v": "v", "sdxl": "eps", "sd3": "flow"}[family]
    assert nc.bridge.model_kind(nc.model(family)).value == want


@pytest.mark.parametrize("family,batch", [("sd15", 1), ("sd15", 2), ("sd2v", 1), ("sdxl", 2), ("sd3", 1)])
def test_bridge_euler_equals_sample_custom_advanced_euler(nc, family, batch):
    model = nc.model(family)
    pos, neg = nc.conds(family, batch=1)
    lat = nc.latent(family, batch=batch)
    ours = _bridge_sample(nc, model, pos, neg, lat, seed=11, cfg=5.0, steps=4)
    theirs = _comfy_euler(model, pos, neg, lat, seed=11, cfg=5.0, steps=4)
    assert ours.shape == theirs.shape
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_inversion_cfg_one_skips_the_negative_pass_and_restores_cfg(nc):
    model = nc.model("sd15").clone()
    batches = []

    def count(apply_model, args):
        batches.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(count)
    pos, neg = nc.conds("sd15")
    lat = nc.latent("sd15")
    sigmas = nc.bridge.get_sigmas(model, "normal", 2)
    cfgs = []

    def fn(ctx):
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        s = torch.full((1,), float(ctx.sigmas[0]))
        ctx.denoiser(x, s)
        cfgs.append(ctx.model_wrap.cfg)
        ctx.inverse_denoiser(x, s)
        cfgs.append(ctx.model_wrap.cfg)

    nc.bridge.run_core(model, pos, neg, lat["samples"], fn, sigmas=sigmas, cfg=6.0, inversion_cfg=1.0)
    assert batches == [2, 1]  # cond + uncond batched, then cond only
    assert cfgs == [6.0, 6.0]


def test_flow_round_trip_is_finite(nc):
    model = nc.model("sd3")
    pos, neg = nc.conds("sd3")
    lat = nc.bridge.prepare_latent(model, nc.latent("sd3", batch=2))
    assert lat["samples"].shape[1] == 16  # SD3 empty latent widened like SamplerCustomAdvanced
    e = Noise_RandomNoise(3).generate_noise(lat)
    sigmas = nc.bridge.get_sigmas(model, "normal", 4)
    rt = nc.bridge.run_core(
        model, pos, neg, lat["samples"],
        lambda ctx: nc.core_stability.round_trip(ctx.denoiser, e, ctx.sigmas, ctx.kind, ctx.inverse_denoiser),
        sigmas=sigmas, cfg=4.0,
    )
    assert torch.isfinite(rt.e_inv).all() and torch.isfinite(rt.x0).all()
    assert torch.isfinite(rt.score).all() and rt.score.shape == (2,)


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.model.state_dict().items()},
        dict(model.patches), dict(model.object_patches), repr(model.model_options), model.patches_uuid,
    )


def _assert_same(model, snap):
    sd, patches, objs, opts, uuid = snap
    now = model.model.state_dict()
    assert now.keys() == sd.keys()
    for k in sd:
        assert torch.equal(now[k], sd[k]), k
    assert dict(model.patches) == patches and dict(model.object_patches) == objs
    assert repr(model.model_options) == opts and model.patches_uuid == uuid


def _select(nc, model, family, seed=5, k=3):
    pos, neg = nc.conds(family)
    return nc.nodes.InversionStabilitySelect.execute(
        model, pos, neg, nc.latent(family), seed, k, 2, 5.0, 1.0, "normal", 2, 2
    )


def test_interrupt_before_a_run_raises_and_the_model_stays_usable(nc):
    model = nc.model("sd15")
    before = _select(nc, model, "sd15")
    mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException):
        _select(nc, model, "sd15")
    after = _select(nc, model, "sd15")
    assert after.args[1] == before.args[1] and after.args[2] == before.args[2]


def test_interrupt_within_a_run_raises_and_the_model_stays_usable(nc):
    model = nc.model("sd15")
    snap = _snapshot(model)
    before = _select(nc, model, "sd15")
    calls = []

    def interrupt_on_third(apply_model, args):
        calls.append(1)
        if len(calls) == 3:
            mm.interrupt_current_processing(True)  # what POST /interrupt does
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.set_model_unet_function_wrapper(interrupt_on_third)
    with pytest.raises(mm.InterruptProcessingException):
        _select(nc, patched, "sd15")
    assert len(calls) == 3  # stopped at the next progress tick
    after = _select(nc, model, "sd15")
    assert after.args[2] == before.args[2]
    _assert_same(model, snap)


@pytest.mark.parametrize("family", FAMILIES)
def test_nodes_leave_the_passed_model_unchanged(nc, family):
    model = nc.model(family)
    snap = _snapshot(model)
    pos, neg = nc.conds(family)
    _select(nc, model, family, k=2)
    nc.nodes.OptimizeNoise.execute(model, pos, neg, nc.latent(family), 1, "momentum", 1, 0.0, 0.5, False,
                                      2, 5.0, 1.0, "normal")
    _assert_same(model, snap)


class _X0Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.X0):
    pass


def test_unsupported_prediction_type_names_the_model(nc):
    model = nc.model("sd15").clone()
    model.add_object_patch("model_sampling", _X0Sampling(model.model.model_config))
    with pytest.raises(ValueError, match=r"SD15.*X0"):
        nc.bridge.model_kind(model)


# Newer ComfyUI (0.38) added IMG_TO_IMG_FLOW and IMG_TO_IMG_VELOCITY as subclasses of CONST; built here the same way
# (x0 = the model output / input - output): a subclass of a supported type is refused naming it, not taken for CONST
class IMG_TO_IMG_FLOW_LIKE(comfy.model_sampling.CONST):
    def calculate_denoised(self, sigma, model_output, model_input):
        return model_output


class PlainConstSubclass(comfy.model_sampling.CONST):
    pass


class EpsSubclass(comfy.model_sampling.EPS):
    pass


class _FlowOverridingSchedule(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image


@pytest.mark.parametrize("family,schedule,pred", [
    ("sd3", comfy.model_sampling.ModelSamplingDiscreteFlow, IMG_TO_IMG_FLOW_LIKE),
    ("sd3", comfy.model_sampling.ModelSamplingDiscreteFlow, PlainConstSubclass),
    ("sd15", comfy.model_sampling.ModelSamplingDiscrete, EpsSubclass),
    ("sd3", _FlowOverridingSchedule, None),
])
def test_unknown_prediction_subclass_is_refused_naming_it(nc, family, schedule, pred):
    model = nc.model(family).clone()
    klass = schedule if pred is None else type("ModelSampling", (schedule, pred), {})  # as model_base does
    model.add_object_patch("model_sampling", klass(model.model.model_config))
    name = (pred or schedule).__name__
    with pytest.raises(ValueError, match=rf"uses {name} \(.*its own way"):
        nc.bridge.model_kind(model)


def test_comfy_model_sampling_combinations_are_decided_by_exact_class(nc):
    model = nc.model("sd15").clone()
    ms = comfy.model_sampling
    for schedule, pred, want in [(ms.ModelSamplingDiscrete, ms.EPS, "eps"),
                                 (ms.ModelSamplingDiscrete, ms.V_PREDICTION, "v"),
                                 (ms.ModelSamplingDiscreteFlow, ms.CONST, "flow"),
                                 (ms.ModelSamplingFlux, ms.CONST, "flow")]:
        m = model.clone()
        m.add_object_patch("model_sampling", type("ModelSampling", (schedule, pred), {})(model.model.model_config))
        assert nc.bridge.model_kind(m).value == want, (schedule.__name__, pred.__name__)


def test_flow_model_with_scaled_noise_is_refused(nc):
    model = nc.model("sd3").clone()
    ms = type(model.get_model_object("model_sampling"))(model.model.model_config)
    ms.noise_scale = 2.0  # newer ComfyUI's CONST.noise_scaling starts from noise_scale * e
    model.add_object_patch("model_sampling", ms)
    with pytest.raises(ValueError, match=r"noise_scale=2.0"):
        nc.bridge.model_kind(model)


def test_unknown_scheduler_is_a_clear_error(nc):
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        nc.bridge.get_sigmas(nc.model("sd15"), "nope", 4)
