"""The NPNet nodes: loading from the npnet folders, caching, golden noise as a NOISE, and errors.

NPNet files are official-layout checkpoints with seeded random weights, written by the test into a
temporary models folder (``official_checkpoint`` of tests/core/test_npnet.py); ComfyUI's
``folder_paths`` is pointed at that folder for this module only.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import comfy.model_management as mm
import folder_paths
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

CORE_TESTS = Path(__file__).resolve().parents[1] / "core" / "test_npnet.py"
SDXL_FILE = "sdxl.safetensors"
DIT_FILE = "dit.pth"  # in the peers' folder name, models/npnets
SEED = 11


def _pack(nc) -> str:
    return nc.noise.__name__.split(".")[0]  # the package name the conftest imported the pack under


def _core_test_helpers():
    name = "noisecraft_core_test_npnet"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CORE_TESTS)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def core(nc):
    return importlib.import_module(_pack(nc) + ".noisecraft.npnet")


@pytest.fixture(scope="module")
def models_dir(npn, tmp_path_factory, model_folders):
    """A models folder with models/npnet/sdxl.safetensors and models/npnets/dit.pth; folder_paths points at it."""
    helpers = _core_test_helpers()
    root = tmp_path_factory.mktemp("models")
    (root / "npnet").mkdir()
    (root / "npnets").mkdir()
    save_file(helpers.flat(helpers.official_checkpoint(2048, seed=0), "embeeding"), str(root / "npnet" / SDXL_FILE))
    torch.save(helpers.official_checkpoint(1024, seed=1), root / "npnets" / DIT_FILE)
    with model_folders(root, ("npnet", "npnets"), npn, set_paths=()):
        yield root


@pytest.fixture(scope="module")
def sdxl_npnet(npn, models_dir):
    return npn.LoadNPNet.execute(SDXL_FILE, "auto").args[0]


def sdxl_cond(batch: int = 1, seed: int = 3, tokens: int = 77, width: int = 2048) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, width, generator=g),
             {"pooled_output": torch.randn(batch, 1280, generator=g), "width": 1024, "height": 1024}]]


def latent(batch: int = 1, size: int = 128, channels: int = 4) -> dict:
    return {"samples": torch.zeros(batch, channels, size, size)}


def golden(npn, npnet, cond, *, strength=1.0, resolution="residual", long_prompt="truncate", seed=SEED, noise=None):
    src = noise if noise is not None else Noise_RandomNoise(seed)
    return npn.NPNetGoldenNoise.execute(src, npnet, cond, strength, resolution, long_prompt).args[0]


# -- schema and loading ------------------------------------------------------------------------


def test_schema_ids_category_and_a_tooltip_on_every_input(npn):
    for node, node_id in ((npn.LoadNPNet, "NC_LoadNPNet"), (npn.NPNetGoldenNoise, "NC_NPNetGoldenNoise")):
        schema = node.define_schema()
        assert schema.node_id == node_id and schema.category == "noisecraft/npnet"
        assert not schema.display_name.startswith("NC")
        for inp in schema.inputs:
            assert inp.tooltip and len(inp.tooltip) > 20, f"{node_id}.{inp.id} has no tooltip"


def test_files_are_listed_from_npnet_and_the_peers_npnets_folder(npn, models_dir):
    assert {SDXL_FILE, DIT_FILE} <= set(npn.npnet_files())
    assert set(npn.LoadNPNet.define_schema().inputs[0].options) >= {SDXL_FILE, DIT_FILE}
    if core_release() >= (2, 10):
        dit = npn.LoadNPNet.execute(DIT_FILE, "dit").args[0]
        assert dit.config.text_width == 1024 and dit.path.parent.name == "npnets"
    else:  # ComfyUI's torch 2.9: weights_only is not safe there (CVE-2026-24747), the .pth is refused
        with pytest.raises(ValueError) as info:
            npn.LoadNPNet.execute(DIT_FILE, "dit")
        for part in ("Load NPNet", DIT_FILE, "torch >= 2.10", "CVE-2026-24747", "python -m noisecraft convert"):
            assert part in str(info.value), (part, str(info.value))


def core_release() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def test_paths_another_pack_registers_under_the_alias_are_listed_too(npn, models_dir, tmp_path):
    (tmp_path / "extra_npnet.safetensors").write_bytes(b"")  # listed only, never loaded
    folder_paths.add_model_folder_path("npnets", str(tmp_path))
    assert "extra_npnet.safetensors" in npn.npnet_files()
    assert npn.resolve_file("extra_npnet.safetensors").parent == tmp_path


def test_registering_the_folders_again_changes_nothing(npn, models_dir):
    """nodes.common.register_folders (npnet + the npnets alias, noise_refiners) is idempotent."""
    npn.register_folders()
    before = {k: list(folder_paths.get_folder_paths(k)) for k in ("npnet", "noise_refiners")}
    assert str(models_dir / "npnet") == before["npnet"][0] and str(models_dir / "npnets") in before["npnet"]
    npn.register_folders()
    npn.register_folders()
    assert {k: folder_paths.get_folder_paths(k) for k in before} == before


def test_a_second_load_returns_the_same_object_until_the_file_changes(npn, models_dir, sdxl_npnet):
    again = npn.LoadNPNet.execute(SDXL_FILE, "auto").args[0]
    assert again is sdxl_npnet and again.net is sdxl_npnet.net
    assert next(sdxl_npnet.net.parameters()).device.type == "cpu"  # on the CPU until used
    assert sdxl_npnet.config.text_width == 2048 and sdxl_npnet.config.latent_size == 128
    fp = npn.LoadNPNet.fingerprint_inputs(SDXL_FILE, "auto")
    assert npn.LoadNPNet.fingerprint_inputs(SDXL_FILE, "auto") == fp
    path = models_dir / "npnet" / SDXL_FILE
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert npn.LoadNPNet.fingerprint_inputs(SDXL_FILE, "auto") != fp
        reloaded = npn.LoadNPNet.execute(SDXL_FILE, "auto").args[0]
        assert reloaded is not sdxl_npnet
        assert npn.LoadNPNet.execute(SDXL_FILE, "auto").args[0] is reloaded
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_missing_file_bad_preset_and_wrong_preset_are_clear_errors(npn, models_dir):
    with pytest.raises(FileNotFoundError, match=r"'nope.safetensors' not found.*npnets.*fetch"):
        npn.LoadNPNet.execute("nope.safetensors", "auto")
    with pytest.raises(ValueError, match=r"preset: expected one of"):
        npn.LoadNPNet.execute(SDXL_FILE, "sd15")
    with pytest.raises(ValueError, match=r"1024|2048"):
        npn.LoadNPNet.execute(SDXL_FILE, "dit")


# -- golden noise ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_index", [None, [2, 0]])
def test_strength_zero_passes_random_noise_through_exactly(npn, sdxl_npnet, batch_index):
    lat = latent(batch=2, size=32)
    if batch_index:
        lat["batch_index"] = batch_index
    src = Noise_RandomNoise(SEED)
    out = golden(npn, sdxl_npnet, sdxl_cond(), strength=0.0, noise=src)
    assert out.seed == SEED
    assert torch.equal(out.generate_noise(lat), Noise_RandomNoise(SEED).generate_noise(lat))


def test_strength_one_at_npnets_size_is_the_official_forward(npn, core, sdxl_npnet):
    cond = sdxl_cond()
    lat = latent(size=128)
    out = golden(npn, sdxl_npnet, cond).generate_noise(lat)
    e = Noise_RandomNoise(SEED).generate_noise(lat)
    assert out.shape == e.shape and out.dtype == torch.float32 and out.device.type == "cpu"
    with torch.no_grad():
        official = sdxl_npnet.net(e, cond[0][0], canonical_signs=True)
        direct = core.golden_noise(sdxl_npnet.net, e, cond[0][0], strength=1.0)
    assert torch.equal(out, direct)
    assert torch.allclose(out, official, atol=1e-5, rtol=1e-5)
    assert (out - e).abs().max() > 0.1  # it did something
    assert sdxl_npnet.patcher in mm.loaded_models()  # run through ComfyUI's model management


def test_any_size_feeds_sampler_custom_advanced_on_sdxl(npn, nc, sdxl_npnet):
    model = nc.model("sdxl")
    pos, neg = sdxl_cond(seed=3), sdxl_cond(seed=4)
    lat = latent(size=32)  # 256px: the residual policy carries NPNet's change from 128x128
    noise = golden(npn, sdxl_npnet, pos)
    e = Noise_RandomNoise(SEED).generate_noise(lat)
    g = noise.generate_noise(lat)
    assert g.shape == e.shape and torch.isfinite(g).all() and not torch.equal(g, e)
    guider = comfy_cfg_guider(model, pos, neg)
    import comfy.samplers

    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2)
    out, _ = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, lat)
    ref, _ = SamplerCustomAdvanced().sample(Noise_RandomNoise(SEED), guider, sampler, sigmas, lat)
    assert out["samples"].shape == (1, 4, 32, 32) and torch.isfinite(out["samples"]).all()
    assert not torch.allclose(out["samples"], ref["samples"])


def comfy_cfg_guider(model, pos, neg, cfg: float = 5.0):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    return guider


def test_batch_of_prompts_gives_each_item_its_own_and_one_prompt_is_shared(npn, core, sdxl_npnet):
    lat = latent(batch=2, size=128)
    lat["batch_index"] = [1, 0]
    e = Noise_RandomNoise(SEED).generate_noise(lat)
    cond2 = sdxl_cond(batch=2)
    per_item = golden(npn, sdxl_npnet, cond2).generate_noise(lat)
    shared = golden(npn, sdxl_npnet, sdxl_cond(batch=1)).generate_noise(lat)
    with torch.no_grad():
        for b in range(2):
            one = core.golden_noise(sdxl_npnet.net, e[b:b + 1], cond2[0][0][b:b + 1])
            assert torch.allclose(per_item[b:b + 1], one, atol=1e-5)
            one_shared = core.golden_noise(sdxl_npnet.net, e[b:b + 1], sdxl_cond(batch=1)[0][0])
            assert torch.allclose(shared[b:b + 1], one_shared, atol=1e-5)
    with pytest.raises(ValueError, match=r"batch of 3 prompts.*batch of 2"):
        golden(npn, sdxl_npnet, sdxl_cond(batch=3)).generate_noise(latent(batch=2, size=32))


def test_long_prompt_policies_on_a_two_chunk_prompt(npn, core, sdxl_npnet):
    lat = latent(size=128)
    e = Noise_RandomNoise(SEED).generate_noise(lat)
    long = sdxl_cond(tokens=154)
    with torch.no_grad():
        first = core.golden_noise(sdxl_npnet.net, e, long[0][0][:, :77])
        mean = core.golden_noise(sdxl_npnet.net, e, (long[0][0][:, :77] + long[0][0][:, 77:]) / 2)
    assert torch.allclose(golden(npn, sdxl_npnet, long).generate_noise(lat), first, atol=1e-5)
    assert torch.allclose(golden(npn, sdxl_npnet, long, long_prompt="chunks").generate_noise(lat), mean, atol=1e-5)
    with pytest.raises(ValueError, match=r"long_prompt: expected one of"):
        golden(npn, sdxl_npnet, long, long_prompt="nope")


@pytest.mark.parametrize("width,model,hint", [(768, "SD1.x", "No official NPNet reads 768-wide text"),
                                              (1024, "SD2.x", "load dit.safetensors")])
def test_a_conditioning_of_another_width_is_refused_naming_both_widths(npn, sdxl_npnet, width, model, hint):
    with pytest.raises(ValueError, match=rf"is {width} wide.*reads 2048 wide") as err:
        golden(npn, sdxl_npnet, sdxl_cond(width=width))
    assert model in str(err.value) and hint in str(err.value)


def test_a_16_channel_latent_is_refused(npn, sdxl_npnet):
    with pytest.raises(ValueError, match=r"16 channels.*4-channel"):
        golden(npn, sdxl_npnet, sdxl_cond()).generate_noise(latent(size=32, channels=16))


def test_bad_combo_values_and_strength_are_refused(npn, sdxl_npnet):
    with pytest.raises(ValueError, match=r"resolution: expected one of"):
        golden(npn, sdxl_npnet, sdxl_cond(), resolution="nope")
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        golden(npn, sdxl_npnet, sdxl_cond(), strength=1.5)
    with pytest.raises(ValueError, match=r"expected an NPNET"):
        golden(npn, "not an npnet", sdxl_cond())


def test_composes_with_inversion_stability_select(npn, nc, core, sdxl_npnet):
    lat = latent(size=32)
    pos, neg = sdxl_cond(seed=3), sdxl_cond(seed=4)
    sel = nc.nodes.InversionStabilitySelect.execute(nc.model("sdxl"), pos, neg, lat, 5, 2, 1, 5.0, 1.0, "normal", 2, 1)
    picked = sel.args[0]
    noise = golden(npn, sdxl_npnet, pos, noise=picked)
    assert noise.seed == picked.seed == sel.args[1]
    out = noise.generate_noise(lat)
    with torch.no_grad():
        want = core.golden_noise(sdxl_npnet.net, picked.generate_noise(lat), pos[0][0])
    assert torch.equal(out, want)
