"""Filter Teacher Cache on the tiny SD1.5-shaped model: Build Teacher Cache -> Filter Teacher Cache -> Train Refiner.

The VAE is a real ComfyUI ``comfy.sd.VAE`` (the TAESD architecture, the smallest VAE ComfyUI builds from a
state dict) with seeded random weights; everything runs under ``torch.inference_mode()`` like the server.
"""

from __future__ import annotations

import asyncio
import importlib
import json

import pytest
import torch

import comfy.sd
from comfy.taesd.taesd import TAESD


def pack(nc) -> str:
    """The pack's package name, as the tier-2 conftest imports it."""
    return nc.noise.__name__.split(".")[0]


@pytest.fixture(scope="module")
def tf(nc):
    return importlib.import_module(f"{pack(nc)}.nodes.nodes_teacher_filter")


@pytest.fixture(scope="module")
def core(nc):
    return importlib.import_module(f"{pack(nc)}.noisecraft.train.teacher_filter")


@pytest.fixture(scope="module")
def model(nc):
    with torch.inference_mode():
        return nc.tiny.build("sd15", seed=0)


@pytest.fixture(scope="module")
def cache(nc, tr, model):
    pos = nc.tiny.conditioning("sd15", 10, 1) + nc.tiny.conditioning("sd15", 11, 1)
    _, neg = nc.conds("sd15")
    with torch.inference_mode():
        return tr.BuildTeacherCache.execute(model, pos, neg, nc.latent("sd15", size=8), 3, 5, 7.0, 3,
                                            "normal").args[0]


@pytest.fixture(scope="module")
def vae():
    """A ComfyUI VAE (TAESD, 4 latent channels) with seeded LeCun-normal weights, zero biases."""
    g = torch.Generator().manual_seed(0)  # (ComfyUI's TAESD layers skip weight init: every tensor is set here)
    state = {k: (torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5 if v.ndim > 1 else torch.zeros(v.shape))
             for k, v in TAESD(latent_channels=4).state_dict().items()}
    state["vae_scale"] = torch.tensor(1.0)
    return comfy.sd.VAE(sd=state)


def filtered(tf, cache, keep, scorer="sharpness", **kw):
    with torch.inference_mode():
        return tf.FilterTeacherCache.execute(cache, keep, scorer, **kw).args[0]


def test_the_node_keeps_the_best_decoded_samples_and_train_refiner_trains_on_them(tf, tr, core, model, cache, vae):
    out = filtered(tf, cache, 3, vae=vae, model=model)
    fmt = model.get_model_object("latent_format")
    with torch.inference_mode():
        images = vae.decode(fmt.process_out(cache.x0)).movedim(-1, 1)
    assert images.shape == (6, 3, 64, 64) and 0 <= float(images.min()) and float(images.max()) <= 1
    scores = core.sharpness_scorer()(images, cache.prompt_ids)
    assert out.data.kept_from.tolist() == core.top_n(scores, 3).tolist()
    assert len(out) == 3 and out.prompts is cache.prompts and len(cache) == 6  # the input cache is unchanged
    assert torch.equal(out.x0, cache.x0[out.data.kept_from]) and torch.equal(out.noise, cache.noise[out.data.kept_from])
    f = out.settings["filter"]
    assert (f["kept"], f["of"], f["scorer"], f["decode"]) == (3, 6, "sharpness", "comfyui vae")
    with torch.inference_mode():
        refiner, losses = tr.TrainRefiner.execute(model, out, 3, 2, 3, 3e-3, 2, 0.0, 1).args
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    training = json.loads(refiner.metadata["noisecraft.training"])
    assert training["samples"] == 3 and training["teacher"]["filter"]["kept"] == 3


def test_without_a_vae_the_latents_are_scored_as_the_core_does(tf, core, cache):
    out = filtered(tf, cache, 2, "sharpness")
    expected = core.top_n(core.sharpness_scorer()(cache.x0, cache.prompt_ids), 2)
    assert out.data.kept_from.tolist() == expected.tolist() and out.settings["filter"]["decode"] == "none (latents)"
    assert filtered(tf, cache, 6).data.kept_from.tolist() == list(range(6))  # keep = all: every sample


def test_a_custom_scorer_by_module_function(tf, cache, tmp_path, monkeypatch):
    (tmp_path / "nc_node_scorers.py").write_text(
        "def first_prompt(images, cond_ids):\n    return (cond_ids == 0).float() - 0.01 * images.flatten(1).mean(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = filtered(tf, cache, 3, "colorfulness", custom_scorer=" nc_node_scorers:first_prompt ")
    assert out.prompt_ids.tolist() == [0, 0, 0] and out.settings["filter"]["scorer"] == "nc_node_scorers:first_prompt"


def test_schema_registration_and_a_tooltip_on_every_input(tf, nc):
    schema = tf.FilterTeacherCache.define_schema()
    assert schema.node_id == "NC_FilterTeacherCache" and schema.category == "noisecraft/train"
    assert all(inp.tooltip and len(inp.tooltip) > 20 for inp in schema.inputs)
    assert {"sharpness", "colorfulness"} <= set(next(i for i in schema.inputs if i.id == "scorer").options)
    nodes = importlib.import_module(f"{pack(nc)}.nodes")
    ext = asyncio.run(nodes.comfy_entrypoint())
    assert tf.FilterTeacherCache in asyncio.run(ext.get_node_list())


@pytest.mark.parametrize("kw, match", [
    (dict(keep=7), r"keep 7: must lie in 1\.\.6"),
    (dict(keep=0), "keep must be an integer"),
    (dict(keep=2, scorer="no-such-scorer"), "scorer: expected one of"),
    (dict(keep=2, custom_scorer="no_such_module_q:score"), "cannot import module"),
    (dict(keep=2, custom_scorer="no-such-scorer"), "known scorers are"),
    (dict(keep=2, vae="VAE", model=None), "needs the model input"),
])
def test_bad_inputs_name_the_input_and_the_fix(tf, cache, vae, kw, match):
    kw = dict(kw)
    if kw.get("vae") == "VAE":
        kw["vae"] = vae
    keep, scorer = kw.pop("keep"), kw.pop("scorer", "sharpness")
    with pytest.raises(ValueError, match=match) as err:
        filtered(tf, cache, keep, scorer, **kw)
    assert str(err.value).startswith("Filter Teacher Cache: ")


def test_a_wrong_socket_value_is_refused(tf):
    with pytest.raises(ValueError, match="expected a TEACHER_CACHE"):
        filtered(tf, "not a cache", 2)
