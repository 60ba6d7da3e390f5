"""The base-model fingerprint is one number in both hosts, and Refine Noise tells the base from other models.

Tier 2 (ComfyUI checkout). The SDXL and SD3 networks exist twice as ``test_cross_host_families.py`` builds them:
the tiny ComfyUI model and a diffusers copy loaded through ComfyUI's own diffusers -> ldm maps. Checked: the
core's fingerprint of the diffusers copy (what ``python -m noisecraft train-refiner`` records) equals the nodes'
fingerprint of the ComfyUI model (what Train Refiner records; exact: both hash the same float32 values); Refine
Noise logs "the base" for a refiner recorded on the copy, "not the base" for the same MODEL with a LoRA on it
(ComfyUI's stock LoraLoaderModelOnly) and for a model whose weights changed, and "no base fingerprint recorded"
for a refiner file without one (files from before the fingerprint keep working); Train Refiner's metadata
holds the MODEL's fingerprint.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import nodes as comfy_nodes
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise


def _families_module():
    spec = importlib.util.spec_from_file_location("nc_cross_host_families", Path(__file__).with_name(
        "test_cross_host_families.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FAM = _families_module()
core = _FAM.core  # fixture


@pytest.fixture(scope="module")
def fpmods(nc):
    pack = nc.noise.__name__.split(".")[0]
    ns = type("FP", (), {})()
    ns.core = importlib.import_module(pack + ".noisecraft.fingerprint")
    ns.nodes = importlib.import_module(pack + ".nodes.fingerprint")
    return ns


@pytest.fixture(scope="module", params=_FAM.FAMILIES)
def pair(request, nc):
    model, net, _ = _FAM.build_pair(nc, request.param)
    return request.param, model, net


def _refiner_file(core, net, family, path: Path, fingerprint: bool) -> Path:
    """A small refiner saved by the diffusers host for ``net``; without the fingerprint when asked (an old file)."""
    targets = core.lora.TRANSFORMER_TARGETS if family == "sd3" else core.lora.DEFAULT_TARGETS
    lora = core.adapters.attach_lora(net, rank=2, seed=1, targets=targets)
    try:
        meta = {"base_model": f"tiny-{family}"}
        if fingerprint:
            meta["base_fingerprint"] = importlib.import_module(
                core.lora.__name__.rsplit(".", 1)[0] + ".fingerprint").module_fingerprint(net)
        return lora.save(path, metadata=meta)
    finally:
        lora.remove()


def test_the_same_model_has_the_same_fingerprint_in_both_hosts(fpmods, pair):
    family, model, net = pair
    cli = fpmods.core.module_fingerprint(net)
    comfy = fpmods.nodes.model_fingerprint(model)
    want = fpmods.core.TRANSFORMER_MODULES if family == "sd3" else fpmods.core.UNET_MODULES
    print(f"\n{family}: {cli['modules']} -> {cli['sha256']['float32'][:16]}")
    assert cli["modules"] == comfy["modules"] and len(cli["modules"]) >= 3
    assert set(cli["modules"]) <= set(want)
    assert cli == comfy
    # another model of the architecture: one value of one fingerprinted weight changed
    other = fpmods.core.fingerprint([(m, w.clone()) for m, w in fpmods.nodes.model_weights(model)])
    first = fpmods.nodes.model_weights(model)[0][1].clone()
    first.view(-1)[0] += 1e-3
    changed = fpmods.core.fingerprint([(cli["modules"][0], first)] + fpmods.nodes.model_weights(model)[1:])
    assert other == cli and changed["sha256"]["float32"] != cli["sha256"]["float32"]


def test_refine_noise_logs_whether_it_is_fed_the_refiners_base(nc, rf, core, pair, tmp_path, caplog, model_folders):
    family, model, net = pair
    (tmp_path / "loras").mkdir()
    new = _refiner_file(core, net, family, tmp_path / "loras" / f"new_{family}.safetensors", True)
    old = _refiner_file(core, net, family, tmp_path / "loras" / f"old_{family}.safetensors", False)
    meta = json.loads(_read_meta(new)["noisecraft.base_fingerprint"])
    assert meta["dtype"] == "float32"
    pos = nc.tiny.conditioning(family, 1, 1)

    def refine(m, name):
        caplog.clear()
        with caplog.at_level("INFO"):
            ref = rf.LoadRefiner.execute(name).args[0]
            rf.RefineNoise.execute(Noise_RandomNoise(3), m, ref, pos, 1.0)
        return [r.getMessage() for r in caplog.records if "Refine Noise" in r.getMessage()]

    with model_folders(tmp_path, ("noise_refiners", "loras"), rf, set_paths=("loras",)), torch.inference_mode():
        base_lines = refine(model, new.name)
        old_lines = refine(model, old.name)
        style = _style_lora(nc, model, family, tmp_path / "loras")  # a LoRA'd copy of the base
        lora_lines = refine(comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, style.name, 1.0)[0],
                            new.name)
    print("\n" + "\n".join(base_lines + old_lines + lora_lines))
    assert any("fed the base model the refiner" in m for m in base_lines), base_lines
    assert any("no base fingerprint recorded" in m for m in old_lines), old_lines
    assert not any("not the base" in m or "fed the base" in m for m in old_lines), old_lines
    hit = [m for m in lora_lines if "is not the base model the refiner" in m]
    assert hit and f"tiny-{family}" in hit[0], lora_lines


def _read_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _style_lora(nc, model, family, folder: Path) -> Path:
    """A plain (non-refiner) LoRA on every fingerprinted weight, as a style LoRA a user stacks on the base."""
    fp = importlib.import_module(nc.noise.__name__.split(".")[0] + ".nodes.fingerprint")
    g = torch.Generator().manual_seed(5)
    state = {}
    prefix = "lora_transformer_" if family == "sd3" else "lora_unet_"
    for module, w in fp.model_weights(model):
        key = prefix + module.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.randn((2, *w.shape[1:]), generator=g) * 0.1
        state[f"{key}.lora_up.weight"] = torch.randn((w.shape[0], 2, *([1] * (w.ndim - 2))), generator=g) * 0.1
        state[f"{key}.alpha"] = torch.tensor(2.0)
    path = folder / f"style_{family}.safetensors"
    save_file(state, str(path))
    return path


def test_a_loaded_lorad_clone_does_not_change_the_bases_fingerprint(nc, fpmods, pair, tmp_path, model_folders, rf):
    """ComfyUI patches a loaded clone's LoRA into the shared weights in place (the originals go to the shared
    ``backup``): the base MODEL's fingerprint stays the base's, the clone's is another model's, and unloading
    restores both."""
    import comfy.model_management as mm

    family, model, net = pair
    base_fp = fpmods.core.module_fingerprint(net)
    (tmp_path / "loras").mkdir()
    style = _style_lora(nc, model, family, tmp_path / "loras")
    with model_folders(tmp_path, ("noise_refiners", "loras"), rf, set_paths=("loras",)), torch.inference_mode():
        patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, style.name, 1.0)[0]
        lora_fp = fpmods.nodes.model_fingerprint(patched)
        mm.load_models_gpu([patched])  # weights patched in place (CPU: the load device)
        try:
            assert model.backup, "ComfyUI did not patch in place: the test does not test the backup"
            assert fpmods.nodes.model_fingerprint(model) == base_fp
            assert fpmods.nodes.model_fingerprint(patched) == lora_fp != base_fp
        finally:
            mm.unload_all_models()
    assert fpmods.nodes.model_fingerprint(model) == base_fp and not model.backup


def test_train_refiners_metadata_records_the_models_fingerprint(tr, fpmods, pair):
    _, model, _ = pair
    kind = tr.bridge.model_kind(model)
    pairs = {"lora_unet_conv_in": (torch.zeros(1, 4), torch.zeros(4, 1), 1.0)}
    meta = tr._metadata(pairs, model, kind, 1.0, {}, ("conv_in",))
    assert json.loads(meta["noisecraft.base_fingerprint"]) == fpmods.nodes.model_fingerprint(model)
