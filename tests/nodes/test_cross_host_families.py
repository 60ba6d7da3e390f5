"""A CLI refiner loads where its family runs: SDXL and SD3 refiners from the diffusers host, in ComfyUI.

Tier 2 (ComfyUI checkout). For each family the same small network exists twice: the tiny ComfyUI model
(``tiny_models.build``: SDXL UNet with ADM, SD3 MMDiT) and a diffusers copy (``UNet2DConditionModel`` with
``text_time`` conditioning / ``SD3Transformer2DModel``) whose weights come through ComfyUI's own diffusers ->
ldm maps (``comfy.utils.unet_to_diffusers`` / ``mmdit_to_diffusers``, whose qkv slices and scale/shift swap
are undone here). Checked: the two networks compute the same; ``D(x_T, sigma_max)`` of the diffusers host
(``DiffusersDenoiser`` with SDXL ``text_embeds`` + ``time_ids`` / SD3 ``pooled_projections``) equals ComfyUI's
(its own conditioning processing inside ``CFGGuider.sample``); and a refiner saved by the diffusers host
(``LoRASet.save``: ``lora_unet_*`` on SDXL, ``lora_transformer_*`` on SD3) is loaded by ComfyUI's stock
``LoraLoaderModelOnly`` with every key mapped, and the refined noise made with the patched ComfyUI model equals
the core's ``refine_noise`` on the diffusers host, as does NoiseCraft's Load Refiner + Refine Noise.

Tolerances: the copies are the same float32 networks evaluated in another op order (ComfyUI's fused qkv,
its attention), measured max-abs differences are ~1e-6 on outputs of size ~1; 1e-4 leaves 100x margin.
The stock loader merges ``W + s * up @ down`` where peft adds ``s * B(A x)``: the same rounding order of size.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

import comfy.lora
import comfy.utils
import nodes as comfy_nodes
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise


def _sd1_test_module():
    """tests/nodes/test_cross_host_refiner.py (its ComfyUI -> diffusers UNet config), imported by path (pytest runs
    with --import-mode=importlib: test modules are not importable by name)."""
    spec = importlib.util.spec_from_file_location("nc_cross_host_refiner", Path(__file__).with_name(
        "test_cross_host_refiner.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SD1 = _sd1_test_module()
diffusers_config = _SD1.diffusers_config

TOL = dict(rtol=1e-4, atol=1e-4)
SEED = 3
FAMILIES = ("sdxl", "sd3")


core = _SD1.core  # the fixture: the pack's noisecraft.lora, .hosts.adapters, .refine, .hosts.diffusers modules


def _copy(net, ldm: dict, mapping: dict) -> None:
    """Load ``net`` (diffusers) from ComfyUI's ldm weights through a diffusers -> ldm key map (a key, a
    ``(key, (dim, offset, size))`` slice of a fused weight, or ``(key, None, fn)`` with a self-inverse fn)."""
    target = net.state_dict()
    missing = sorted(set(target) - set(mapping))
    assert not missing, missing[:5]
    out = {}
    for k, shape in ((k, v.shape) for k, v in target.items()):
        to = mapping[k]
        if isinstance(to, str):
            t = ldm[to]
        elif to[1] is None:
            t = to[2](ldm[to[0]])
        else:
            dim, off, size = to[1]
            t = ldm[to[0]].narrow(dim, off, size)
        out[k] = t.clone().reshape(shape)
    net.load_state_dict(out)
    net.eval().requires_grad_(False)


def build_pair(nc, family: str):
    """(ComfyUI ModelPatcher, the diffusers copy of its network, the diffusers host's sigma table)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel

    with torch.inference_mode():
        model = nc.tiny.build(family, seed=0)
    uc = model.model.model_config.unet_config
    ldm = {k: v.clone() for k, v in model.model.state_dict().items()}  # diffusion_model.* keys
    if family == "sdxl":
        cfg = diffusers_config(uc)
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=uc["adm_in_channels"])
        net = UNet2DConditionModel(**cfg)
        mapping = {k: "diffusion_model." + v for k, v in comfy.utils.unet_to_diffusers(uc).items()}
        table = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                 "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}
    else:
        hidden = 64 * uc["depth"]
        net = SD3Transformer2DModel(sample_size=uc["pos_embed_max_size"], patch_size=uc["patch_size"],
                                    in_channels=uc["in_channels"], out_channels=uc["out_channels"],
                                    num_layers=uc["depth"], attention_head_dim=64, num_attention_heads=uc["depth"],
                                    joint_attention_dim=uc["context_embedder_config"]["params"]["in_features"],
                                    caption_projection_dim=hidden, pooled_projection_dim=uc["adm_in_channels"],
                                    pos_embed_max_size=uc["pos_embed_max_size"])
        mapping = comfy.utils.mmdit_to_diffusers(uc, output_prefix="diffusion_model.")
        table = FlowMatchEulerDiscreteScheduler(shift=float(model.model.model_sampling.shift))
    _copy(net, ldm, mapping)
    return model, net, table


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, nc, core):
    model, net, sched = build_pair(nc, request.param)
    return request.param, model, net, core.host.sigma_table_from_scheduler(sched)


def diffusers_conditioning(family: str, pos):
    """The diffusers host's inputs for a ComfyUI CONDITIONING ``[[ctx, {pooled_output, width, height}]]``:
    SDXL ``text_embeds`` + ``time_ids`` (original = target = width x height, crop 0: what ComfyUI's SDXL
    ``encode_adm`` embeds), SD3 ``pooled_projections``."""
    ctx, extra = pos[0]
    pooled = extra["pooled_output"]
    if family == "sdxl":
        h, w = extra["height"], extra["width"]
        return ctx, {"text_embeds": pooled, "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)}
    return ctx, {"pooled_projections": pooled}


def _latent(model, size=16):
    return {"samples": torch.zeros(1, model.model.latent_format.latent_channels, size, size)}


def _noise(model):
    return Noise_RandomNoise(SEED).generate_noise(_latent(model))


def comfy_d(nc, model, pos, e):
    """ComfyUI's D(x_T, sigma_max) for unit noise ``e`` (positive prompt, cfg 1)."""
    smax = nc.bridge.sigma_max(model)
    factor = nc.core_sigmas.start_factor(nc.bridge.model_kind(model), smax)

    def fn(ctx):
        return ctx.denoiser(e.to(ctx.device) * factor, torch.full((1,), smax)).cpu()

    return nc.bridge.run_core(model, pos, pos, e, fn, sigmas=torch.tensor([smax, 0.0]), cfg=1.0)


def test_the_diffusers_copy_denoises_like_comfyui(nc, core, pair):
    family, model, net, table = pair
    smax = nc.bridge.sigma_max(model)
    assert abs(table.sigma_max - smax) < 1e-4 * max(1.0, smax)
    pos = nc.tiny.conditioning(family, 1, 1)
    e = _noise(model)
    cond, added = diffusers_conditioning(family, pos)
    factor = nc.core_sigmas.start_factor(nc.bridge.model_kind(model), smax)
    with torch.no_grad():
        den = core.host.DiffusersDenoiser(net, table, cond, added_cond_kwargs=added)
        d_cli = den(e * factor, torch.full((1,), smax))
        # control: the extra conditioning matters (SDXL time ids of 512 px, SD3 pooled text of zero)
        wrong = {k: (v * 0.5 if k == "time_ids" else torch.zeros_like(v)) if k != "text_embeds" else v
                 for k, v in added.items()}
        d_wrong = core.host.DiffusersDenoiser(net, table, cond, added_cond_kwargs=wrong)(e * factor,
                                                                                        torch.full((1,), smax))
    d_comfy = comfy_d(nc, model, pos, e)
    control = float((d_wrong - d_comfy).abs().max())
    print(f"\n{family}: max|D_comfy - D_diffusers host| = {float((d_cli - d_comfy).abs().max()):.3g} "
          f"(control, other extra conditioning: {control:.3g})")
    torch.testing.assert_close(d_cli, d_comfy, **TOL)
    assert control > 1e-3, control


def test_a_cli_refiner_loads_in_comfyuis_stock_loader_and_refines_alike(nc, rf, core, pair, tmp_path, caplog,
                                                                       model_folders):
    family, model, net, table = pair
    lora = core.adapters.attach_lora(net, rank=4, alpha=8.0, seed=7,
                                     targets=core.lora.TRANSFORMER_TARGETS if family == "sd3" else
                                     core.lora.DEFAULT_TARGETS)
    try:
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for layer in lora.layers.values():
                layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.05)
        (tmp_path / "loras").mkdir()
        path = lora.save(tmp_path / "loras" / f"cli_{family}.safetensors", metadata={"base_model": f"tiny-{family}"})
        keys = set(lora.layers)
        pos = nc.tiny.conditioning(family, 1, 1)
        cond, added = diffusers_conditioning(family, pos)
        e = _noise(model)
        smax = nc.bridge.sigma_max(model)
        kind = nc.bridge.model_kind(model)
        with torch.no_grad():
            d_base, d_lora = lora.base_and_lora(core.host.DiffusersDenoiser(net, table, cond, added_cond_kwargs=added))
            e_cli = core.refine.refine_noise(e, d_base, d_lora, kind, smax, 1.0)
    finally:
        lora.remove()
    prefix = "lora_transformer_" if family == "sd3" else "lora_unet_"
    assert all(k.startswith(prefix) for k in keys)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert keys <= set(key_map), sorted(keys - set(key_map))[:5]

    caplog.clear()
    with model_folders(tmp_path, ("noise_refiners", "loras"), rf, set_paths=("loras",)), \
            caplog.at_level("WARNING"), torch.inference_mode():
        patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, path.name, 1.0)[0]
        ref = rf.LoadRefiner.execute(path.name).args[0]  # NoiseCraft's own nodes read it too
        e_node = rf.RefineNoise.execute(Noise_RandomNoise(SEED), model, ref, pos, 1.0).args[0].generate_noise(
            _latent(model)).clone()
    assert "lora key not loaded" not in caplog.text
    targets = {key_map[k][0] if isinstance(key_map[k], tuple) else key_map[k] for k in keys}
    assert set(patched.patches) == targets  # every layer patched (SD3's q, k, v share one fused weight)
    e_comfy = e + (comfy_d(nc, model, pos, e) - comfy_d(nc, patched, pos, e)) / smax
    residual = float((e_cli - e).abs().max())
    print(f"\n{family}: {len(keys)} layers, max|e_hat_comfy - e_hat_cli| = {float((e_comfy - e_cli).abs().max()):.3g}, "
          f"max|residual| = {residual:.3g}")
    assert residual > 1e-2
    torch.testing.assert_close(e_comfy, e_cli, **TOL)
    torch.testing.assert_close(e_node, e_cli, **TOL)
