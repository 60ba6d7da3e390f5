"""The NoiseRefine nodes: loading refiner LoRAs, refined noise as a NOISE, and errors.

Refiners are random LoRAs for the tiny SD1.5-shaped model, written by the test in the kohya
format :mod:`noisecraft.lora` exports (``lora_unet_<diffusers name>``, diffusers names from
ComfyUI's own ``comfy.utils.unet_to_diffusers`` table), into a temporary models folder that
ComfyUI's ``folder_paths`` points at for this module only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy.model_patcher
import comfy.samplers
import comfy.utils
import folder_paths
import nodes as comfy_nodes
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "ff.net.0.proj", "ff.net.2")
SEED = 3


def random_refiner(model, *, rank=2, seed=0, zero_up=False, kind="eps", ldm_names=False, scale=0.05):
    """(state dict, metadata) of a random kohya LoRA on the default targets of a ComfyUI UNet."""
    diff = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    weights = dict(model.model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    state = {}
    for dname, lname in sorted(diff.items()):
        if not dname.endswith(".weight"):
            continue
        mod = dname[: -len(".weight")]
        if not any(mod == t or mod.endswith("." + t) for t in TARGETS):
            continue
        w = weights["diffusion_model." + lname]
        key = ("diffusion_model." + lname[: -len(".weight")]) if ldm_names else "lora_unet_" + mod.replace(".", "_")
        down = torch.randn((rank, *w.shape[1:]), generator=g) * scale
        up = torch.zeros((w.shape[0], rank, *([1] * (w.ndim - 2)))) if zero_up else \
            torch.randn((w.shape[0], rank, *([1] * (w.ndim - 2))), generator=g) * scale
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(float(rank) * 2)
    meta = {"noisecraft.kind": "refiner", "noisecraft.model_kind": kind, "noisecraft.base_model": "tiny-sd15"}
    return state, meta


def write(path, state, meta):
    save_file(state, path, metadata=meta)


@pytest.fixture(scope="module")
def models_dir(rf, nc, tmp_path_factory, model_folders):
    root = tmp_path_factory.mktemp("models")
    (root / "noise_refiners").mkdir()
    (root / "loras").mkdir()
    model = nc.model("sd15")
    write(str(root / "noise_refiners" / "tiny.safetensors"), *random_refiner(model, seed=1))
    write(str(root / "loras" / "zero.safetensors"), *random_refiner(model, seed=1, zero_up=True))
    write(str(root / "loras" / "ldm.safetensors"), *random_refiner(model, seed=2, ldm_names=True))
    write(str(root / "loras" / "stock.safetensors"), *random_refiner(model, seed=1))  # = tiny, for LoraLoader
    plain, _ = random_refiner(model, seed=1)
    save_file(plain, str(root / "loras" / "plain.safetensors"))
    write(str(root / "loras" / "flowkind.safetensors"), *random_refiner(model, seed=1, kind="flow"))
    save_file({"weight": torch.ones(3)}, str(root / "loras" / "notalora.safetensors"))
    save_file(plain, str(root / "loras" / "npnet_like.safetensors"), metadata={"noisecraft.kind": "npnet"})
    (root / "loras" / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    with model_folders(root, ("noise_refiners", "loras"), rf, set_paths=("loras",)):
        yield root


def load(rf, name):
    return rf.LoadRefiner.execute(name).args[0]


def refine(rf, nc, refiner, *, strength=1.0, seed=SEED, model=None, latent=None, family="sd15"):
    pos, _ = nc.conds(family)
    noise = rf.RefineNoise.execute(Noise_RandomNoise(seed), model or nc.model(family), refiner, pos, strength).args[0]
    return noise, noise.generate_noise(latent or nc.latent(family))


def denoise_once(nc, model, e, family="sd15"):
    """D(x_T, sigma_max) at cfg 1 with the positive prompt, through ComfyUI's guider."""
    pos, _ = nc.conds(family)
    smax = nc.bridge.sigma_max(model)
    factor = nc.core_sigmas.start_factor(nc.bridge.model_kind(model), smax)

    def fn(ctx):
        return ctx.denoiser(e.to(ctx.device) * factor, torch.full((e.shape[0],), smax)).cpu()

    return nc.bridge.run_core(model, pos, pos, e, fn, sigmas=torch.tensor([smax, 0.0]), cfg=1.0), smax


def merged_by_hand(model, state):
    """A new ModelPatcher over a deep copy of the model with W += alpha/rank * up @ down per pair."""
    import comfy.lora

    base = copy.deepcopy(model.model)
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    params = dict(base.named_parameters())
    with torch.no_grad():
        for k in state:
            if not k.endswith(".lora_down.weight"):
                continue
            p = k[: -len(".lora_down.weight")]
            down, up = state[k], state[f"{p}.lora_up.weight"]
            w = params[key_map[p]]
            w += (float(state[f"{p}.alpha"]) / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    return comfy.model_patcher.ModelPatcher(base, load_device=model.load_device, offload_device=model.offload_device)


# -- loading ---------------------------------------------------------------------------------------

def test_files_are_listed_from_noise_refiners_then_loras(rf, models_dir):
    files = rf.refiner_files()
    assert files[0] == "tiny.safetensors"
    assert {"zero.safetensors", "ldm.safetensors", "plain.safetensors"} <= set(files)
    ref = load(rf, "tiny.safetensors")
    assert isinstance(ref, rf.Refiner) and ref.model_kind.value == "eps" and len(ref.pairs) > 10
    assert load(rf, "tiny.safetensors") is ref  # cached per file version


def test_plain_lora_loads_with_a_warning(rf, models_dir, caplog):
    with caplog.at_level("WARNING"):
        ref = load(rf, "plain.safetensors")
    assert ref.model_kind is None
    assert "no noisecraft.kind" in caplog.text


@pytest.mark.parametrize("name,message", [
    ("notalora.safetensors", "it is not a LoRA"),
    ("npnet_like.safetensors", "not a refiner"),
    ("broken.safetensors", "safetensors"),
    ("missing.safetensors", "not found"),
])
def test_bad_files_give_clear_errors(rf, models_dir, name, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load(rf, name)


# -- refined noise ---------------------------------------------------------------------------------

def test_strength_zero_returns_the_input_noise_object(rf, nc, models_dir):
    noise = Noise_RandomNoise(SEED)
    pos, _ = nc.conds("sd15")
    out = rf.RefineNoise.execute(noise, nc.model("sd15"), load(rf, "tiny.safetensors"), pos, 0.0).args[0]
    assert out is noise


def test_zero_lora_gives_the_input_noise(rf, nc, models_dir):
    noise, e_hat = refine(rf, nc, load(rf, "zero.safetensors"))
    assert noise.seed == SEED
    assert torch.equal(e_hat, Noise_RandomNoise(SEED).generate_noise(nc.latent("sd15")))


@pytest.mark.parametrize("name,strength", [("tiny.safetensors", 1.0), ("tiny.safetensors", 0.5),
                                           ("ldm.safetensors", 1.0)])
def test_residual_matches_two_model_calls_with_the_lora_merged_by_hand(rf, nc, models_dir, name, strength):
    model = nc.model("sd15")
    e = Noise_RandomNoise(SEED).generate_noise(nc.latent("sd15"))
    _, e_hat = refine(rf, nc, load(rf, name), strength=strength)
    state = load_file(str(next(models_dir.rglob(name))))
    d_base, smax = denoise_once(nc, model, e)
    d_lora, _ = denoise_once(nc, merged_by_hand(model, state), e)
    want = e + strength * (d_base - d_lora) / smax
    assert (e_hat - e).abs().max() > 1e-3  # the refiner does something
    torch.testing.assert_close(e_hat, want, rtol=1e-4, atol=1e-4)


def test_stock_lora_loader_maps_every_key_and_agrees(rf, nc, models_dir, caplog):
    model = nc.model("sd15")
    e = Noise_RandomNoise(SEED).generate_noise(nc.latent("sd15"))
    with caplog.at_level("WARNING"):
        patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "stock.safetensors", 1.0)[0]
    assert "lora key not loaded" not in caplog.text
    ref = load(rf, "tiny.safetensors")
    assert len(patched.patches) == len(ref.pairs)
    _, e_hat = refine(rf, nc, ref)
    d_base, smax = denoise_once(nc, model, e)
    d_stock, _ = denoise_once(nc, patched, e)
    torch.testing.assert_close(e_hat, e + (d_base - d_stock) / smax, rtol=1e-4, atol=1e-4)


def test_input_model_is_unchanged(rf, nc, models_dir):
    model = nc.model("sd15")
    e = Noise_RandomNoise(SEED).generate_noise(nc.latent("sd15"))
    d0, _ = denoise_once(nc, model, e)  # loads this patcher (an earlier test may have loaded a LoRA'd clone)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    refine(rf, nc, load(rf, "tiny.safetensors"))
    d1, _ = denoise_once(nc, model, e)
    assert torch.equal(d0, d1)
    assert model.weight_wrapper_patches == {} and model.patches == {}
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m.__dict__.get("weight_function") for m in model.model.modules())


def test_batch_and_batch_index_follow_the_input_noise(rf, nc, models_dir):
    ref = load(rf, "tiny.safetensors")
    lat2 = nc.latent("sd15", batch=2)
    _, both = refine(rf, nc, ref, latent=lat2)
    one = dict(nc.latent("sd15", batch=1), batch_index=[1])
    _, second = refine(rf, nc, ref, latent=one)
    torch.testing.assert_close(both[1:], second, rtol=1e-4, atol=1e-4)


def test_composes_with_sampler_custom_advanced_at_cfg_1(rf, nc, models_dir):
    model = nc.model("sd15")
    pos, _ = nc.conds("sd15")
    noise = rf.RefineNoise.execute(Noise_RandomNoise(SEED), model, load(rf, "tiny.safetensors"), pos, 1.0).args[0]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, pos)
    guider.set_cfg(1.0)
    sigmas = nc.bridge.get_sigmas(model, "normal", 2)
    sampler = comfy.samplers.sampler_object("euler")
    lat = nc.latent("sd15")
    out = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, lat)[0]["samples"]
    fixed = nc.noise.FixedNoise(noise.generate_noise(lat), seed=SEED)
    ref = SamplerCustomAdvanced().sample(fixed, guider, sampler, sigmas, lat)[0]["samples"]
    plain = SamplerCustomAdvanced().sample(Noise_RandomNoise(SEED), guider, sampler, sigmas, lat)[0]["samples"]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, plain)


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [-0.1, 2.5, float("nan")])
def test_strength_out_of_range(rf, nc, models_dir, strength):
    with pytest.raises(ValueError, match=r"Refine Noise: .*strength"):
        refine(rf, nc, load(rf, "tiny.safetensors"), strength=strength)


def test_refiner_for_another_model_names_both(rf, nc, models_dir):
    with pytest.raises(ValueError, match=r"tiny.safetensors \(for tiny-sd15.*does not fit this MODEL \(SDXL\)"):
        refine(rf, nc, load(rf, "tiny.safetensors"), family="sdxl")


def test_flow_model_with_an_eps_refiner(rf, nc, models_dir):
    with pytest.raises(ValueError, match=r"trained for a eps model.*is a flow model"):
        refine(rf, nc, load(rf, "tiny.safetensors"), family="sd3")


def test_eps_model_with_a_flow_refiner(rf, nc, models_dir):
    with pytest.raises(ValueError, match=r"trained for a flow model.*is a eps model"):
        refine(rf, nc, load(rf, "flowkind.safetensors"))
