"""The stability nodes on every model family, their outputs, and their errors on bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

import comfy.sample
import comfy.samplers
import nodes as comfy_nodes
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

FAMILIES = ("sd15", "sd2v", "sdxl", "sd3")


def select(nc, family, *, seed=5, k=3, steps=2, batch=1, latent=None, model=None, micro_batch=2, top_k=2,
           search=None):
    pos, neg = nc.conds(family)
    lat = latent if latent is not None else nc.latent(family, batch=batch)
    extra = {} if search is None else {"search": search}  # None: an old workflow without the input
    return nc.nodes.InversionStabilitySelect.execute(
        model or nc.model(family), pos, neg, lat, seed, k, steps, 5.0, 1.0, "normal", micro_batch, top_k, **extra
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


@pytest.mark.parametrize("search", ["full", "halving"])
@pytest.mark.parametrize("batch", [1, 2])
def test_one_candidate_is_random_noise_for_both_searches(nc, search, batch):
    lat = nc.latent("sd15", batch=batch)
    noise, best_seed, scores, _ = select(nc, "sd15", seed=41, k=1, steps=3, latent=lat, search=search).args
    assert best_seed == 41 and len(scores) == 1
    assert torch.equal(noise.generate_noise(lat), Noise_RandomNoise(41).generate_noise(lat))


def test_halving_runs_and_keeps_the_better_half(nc):
    out = select(nc, "sd15", seed=9, k=4, steps=4, batch=2, search="halving", top_k=4)
    noise, best_seed, scores, top = out.args
    ui = out.ui
    assert ui["noisecraft_rung_steps"] == [2, 4]
    for b in range(2):
        rungs, sc = ui["noisecraft_rungs"][b], ui["noisecraft_scores"][b]
        assert sorted(rungs) == [0, 0, 1, 1] and all(map(math.isfinite, sc))
        finalists = [j for j in range(4) if rungs[j] == 1]
        assert ui["noisecraft_best_seeds"][b] == 9 + max(finalists, key=lambda j: sc[j])
        assert [int(x) - 9 for x in top.split("\n")[b].split(", ")][:2] == sorted(finalists, key=lambda j: -sc[j])
    assert best_seed == ui["noisecraft_best_seeds"][0]
    json.dumps(ui)
    lat = nc.latent("sd15", batch=2)
    e = noise.generate_noise(lat)
    for b in range(2):
        assert torch.equal(e[b], Noise_RandomNoise(ui["noisecraft_best_seeds"][b]).generate_noise(lat)[b])


def test_halving_that_scores_everyone_at_full_steps_equals_full_and_old_graphs_keep_full(nc):
    # K = 2 is one rung: every candidate gets the score_steps round trip, as with full
    full = select(nc, "sd15", k=2, steps=3, batch=2, search="full")
    halv = select(nc, "sd15", k=2, steps=3, batch=2, search="halving")
    old = select(nc, "sd15", k=2, steps=3, batch=2)  # a workflow saved before the input existed
    assert halv.ui["noisecraft_rung_steps"] == [3] == full.ui["noisecraft_rung_steps"]
    for other in (halv, old):
        assert other.ui["noisecraft_best_seeds"] == full.ui["noisecraft_best_seeds"]
        assert other.ui["noisecraft_scores"] == full.ui["noisecraft_scores"]
    # score_steps 1: the rungs are [1, 1] (every rung at the full steps): full's winner and scores
    full1 = select(nc, "sd15", k=4, steps=1, search="full")
    halv1 = select(nc, "sd15", k=4, steps=1, search="halving")
    assert halv1.ui["noisecraft_rung_steps"] == [1, 1]
    assert halv1.ui["noisecraft_best_seeds"] == full1.ui["noisecraft_best_seeds"]
    assert halv1.ui["noisecraft_scores"] == full1.ui["noisecraft_scores"]
    schema = nc.nodes.InversionStabilitySelect.define_schema()
    assert schema.inputs[-1].id == "search" and schema.inputs[-1].default == "full"


def test_bad_search_value_is_refused(nc):
    with pytest.raises(ValueError, match=r"Inversion-Stability Select: search: expected one of \['full', 'halving'\], "
                       r"got 'beam'"):
        select(nc, "sd15", search="beam")


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
