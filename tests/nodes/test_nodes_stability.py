"""The stability nodes on every model family, their outputs, and their errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch

import comfy.sample
import comfy.samplers
import nodes as comfy_nodes
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

FAMILIES = ("sd15", "sd2v", "sdxl", "sd3")


def select(nc, family, *, seed=5, k=3, steps=2, batch=1, latent=None, model=None, micro_batch=2, top_k=2):
    pos, neg = nc.conds(family)
    lat = latent if latent is not None else nc.latent(family, batch=batch)
    return nc.nodes.InversionStabilitySelect.execute(
        model or nc.model(family), pos, neg, lat, seed, k, steps, 5.0, 1.0, "normal", micro_batch, top_k
    )


def optimize(nc, family, *, method="fixed_point", steps=1, noise=None, latent=None, batch=1, seed=1):
    pos, neg = nc.conds(family)
    lat = latent if latent is not None else nc.latent(family, batch=batch)
    return nc.nodes.OptimizeNoise.execute(
        nc.model(family), pos, neg, lat, seed, method, steps, 0.0, 0.5, False, 2, 5.0, 1.0, "normal", noise=noise
    )


@pytest.mark.parametrize("batch,batch_index", [(1, None), (2, None), (2, [3, 1])])
def test_select_with_one_candidate_is_random_noise(nc, batch, batch_index):
    lat = nc.latent("sd15", batch=batch)
    if batch_index:
        lat["batch_index"] = batch_index
    out = select(nc, "sd15", seed=77, k=1, steps=1, latent=lat)
    noise, best_seed, scores, top = out.args
    assert best_seed == 77 and noise.seed == 77 and top == "\n".join(["77"] * batch)
    assert len(scores) == 1
    assert torch.equal(noise.generate_noise(lat), Noise_RandomNoise(77).generate_noise(lat))


@pytest.mark.parametrize("family", FAMILIES)
def test_select_runs_on_every_family_and_outputs_the_winners(nc, family):
    lat = nc.latent(family, batch=2)
    out = select(nc, family, seed=5, k=3, batch=2, latent=lat)
    noise, best_seed, scores, top = out.args
    ui = out.ui
    per_item = ui["noisecraft_scores"]
    assert len(per_item) == 2 and all(len(s) == 3 for s in per_item)
    assert scores == pytest.approx(per_item[0])
    assert all(torch.isfinite(torch.tensor(per_item)).all() for _ in [0])
    json.dumps(ui)  # the UI data must be JSON-serializable
    best = ui["noisecraft_best_seeds"]
    assert best_seed == best[0] and noise.seed == best[0]
    for b in range(2):
        assert best[b] == 5 + max(range(3), key=lambda j: per_item[b][j])
    fixed_lat = comfy.sample.fix_empty_latent_channels(nc.model(family), lat["samples"])
    e = noise.generate_noise({"samples": fixed_lat})
    for b in range(2):
        assert torch.equal(e[b], Noise_RandomNoise(best[b]).generate_noise({"samples": fixed_lat})[b])
    assert [len(line.split(", ")) for line in top.split("\n")] == [2, 2]


def test_select_batching_does_not_change_scores(nc):
    a = select(nc, "sd15", k=3, micro_batch=1, batch=2).ui["noisecraft_scores"]
    b = select(nc, "sd15", k=3, micro_batch=3, batch=2).ui["noisecraft_scores"]
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["momentum", "fixed_point"])
def test_optimize_runs_on_every_family(nc, family, method):
    out = optimize(nc, family, method=method, steps=2)
    noise, best = out.args
    hist = out.ui["noisecraft_history"]
    assert len(hist) == 1 and len(hist[0]) == 3
    assert best == pytest.approx(max(hist[0]), abs=1e-6)
    lat = comfy.sample.fix_empty_latent_channels(nc.model(family), nc.latent(family)["samples"])
    assert torch.isfinite(noise.generate_noise({"samples": lat})).all()


def test_optimize_takes_a_noise_input_and_zero_steps_only_scores(nc):
    lat = nc.latent("sd15")
    out = optimize(nc, "sd15", steps=0, noise=Noise_RandomNoise(123))
    noise, _ = out.args
    assert noise.seed == 123
    assert torch.equal(noise.generate_noise(lat), Noise_RandomNoise(123).generate_noise(lat))
    assert len(out.ui["noisecraft_history"][0]) == 1


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sdxl"])
def test_noise_to_latent_then_ksampler_advanced_equals_sampler_custom_advanced(nc, family):
    model = nc.model(family)
    pos, neg = nc.conds(family)
    lat = nc.latent(family)
    noise = Noise_RandomNoise(31)
    (x_t,) = nc.nodes.NoiseToLatent.execute(noise, model, lat).args
    (via_ksampler,) = comfy_nodes.KSamplerAdvanced().sample(
        model, "disable", 0, 3, 5.0, "euler", "normal", pos, neg, x_t, 0, 10000, "disable"
    )
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
    direct = comfy.sample.sample_custom(model, noise.generate_noise(lat), 5.0, comfy.samplers.sampler_object("euler"),
                                        sigmas, pos, neg, lat["samples"], seed=31, disable_pbar=True)
    # x_T goes through process_latent_out/_in (x / 0.18215 * 0.18215): float32 round-off only
    torch.testing.assert_close(via_ksampler["samples"], direct, rtol=1e-3, atol=1e-3)


# -- bad input -----------------------------------------------------------------------------------

def test_k_below_one_is_refused(nc):
    with pytest.raises(ValueError, match=r"candidates \(K\) must be an integer >= 1"):
        select(nc, "sd15", k=0)


def test_latent_from_another_family_is_refused(nc):
    sd15_latent = {"samples": torch.randn(1, 4, 16, 16)}  # a non-empty SD1.5 latent into SD3
    with pytest.raises(ValueError, match="LATENT from a different model family.*16-channel.*4 channels"):
        select(nc, "sd3", latent=sd15_latent)
    sd3_latent = {"samples": torch.randn(1, 16, 16, 16)}
    with pytest.raises(ValueError, match="LATENT from a different model family.*4-channel.*16 channels"):
        optimize(nc, "sd15", latent=sd3_latent)


def test_noise_with_other_channels_is_refused(nc):
    class WrongChannels:
        seed = 0

        def generate_noise(self, latent):
            s = latent["samples"].shape
            return torch.randn(s[0], 16, *s[2:])

    with pytest.raises(ValueError, match="channel/shape mismatch"):
        optimize(nc, "sd15", noise=WrongChannels())
    with pytest.raises(ValueError, match="channel/shape mismatch"):
        nc.nodes.NoiseToLatent.execute(WrongChannels(), nc.model("sd15"), nc.latent("sd15"))


def test_searched_noise_on_another_latent_size_names_the_node(nc):
    noise = select(nc, "sd15", k=1, steps=1).args[0]
    with pytest.raises(ValueError, match="re-run Inversion-Stability Select"):
        nc.nodes.NoiseToLatent.execute(noise, nc.model("sd15"), nc.latent("sd15", size=24))


def test_nan_or_inf_noise_is_refused(nc):
    class NaNNoise:
        seed = 0

        def generate_noise(self, latent):
            e = torch.randn(latent["samples"].shape)
            e[0, 0, 0, 0] = float("inf")
            return e

    with pytest.raises(ValueError, match="NaN/inf"):
        optimize(nc, "sd15", noise=NaNNoise())
    with pytest.raises(ValueError, match="NaN/inf"):
        nc.nodes.NoiseToLatent.execute(NaNNoise(), nc.model("sd15"), nc.latent("sd15"))


def test_noise_to_latent_refuses_flow_models_and_points_to_sampler_custom_advanced(nc):
    with pytest.raises(ValueError, match="flow model.*SamplerCustomAdvanced"):
        nc.nodes.NoiseToLatent.execute(Noise_RandomNoise(0), nc.model("sd3"), nc.latent("sd3"))


def test_bad_combo_values_are_refused(nc):
    pos, neg = nc.conds("sd15")
    with pytest.raises(ValueError, match="scheduler: expected one of"):
        nc.nodes.InversionStabilitySelect.execute(nc.model("sd15"), pos, neg, nc.latent("sd15"), 0, 1, 1, 5.0, 1.0,
                                                  "nope", 1, 1)
    with pytest.raises(ValueError, match="method: expected one of"):
        nc.nodes.OptimizeNoise.execute(nc.model("sd15"), pos, neg, nc.latent("sd15"), 0, "adam", 1, 0.0, 0.5, False,
                                       1, 5.0, 1.0, "normal")


def test_every_input_has_a_tooltip_and_ids_are_prefixed(nc):
    for node in nc.nodes.NODES:
        schema = node.define_schema()
        assert schema.node_id.startswith("NC_") and schema.category.startswith("noisecraft/")
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
