"""Tier 2: Refine Noise's ``guidance`` input (guidance-scale control, noisecraft.guidance_embed) in ComfyUI.

A guidance-conditioned refiner made on the diffusers copy of the tiny SD1.5 model (the cross-host setup of
``test_cross_host_refiner.py``: the same network in diffusers and in ComfyUI), with a random LoRA and a random
guidance projection, saved by ``LoRASet.save``: Refine Noise with ``guidance`` g refines ComfyUI's noise as
the core does on the diffusers host with ``guidance=g`` (the embedding is applied to ComfyUI's
``diffusion_model.time_embed``), and the result moves with g. ComfyUI's stock LoRA loader applies the LoRA
part and logs the one extra tensor. A plain refiner given a guidance warns and gives the same noise as
without; a conditioned refiner without one is an error naming the input.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import nodes as comfy_nodes
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

_spec = importlib.util.spec_from_file_location("nc_cross_host_refiner", Path(__file__).with_name(
    "test_cross_host_refiner.py"))
xh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(xh)
core, model, unet, table, models_dir = xh.core, xh.model, xh.unet, xh.table, xh.models_dir  # its fixtures

SEED = xh.SEED


def _guidance_module(nc):
    return importlib.import_module(xh._pack(nc) + ".noisecraft.guidance_embed")


def comfy_refine(rf, nc, model, name, guidance=None):
    lat = nc.latent("sd15")
    extra = {} if guidance is None else {"guidance": guidance}
    with torch.inference_mode():
        ref = rf.LoadRefiner.execute(name).args[0]
        noise = rf.RefineNoise.execute(Noise_RandomNoise(SEED), model, ref, xh.positive(nc), 1.0, **extra).args[0]
        return Noise_RandomNoise(SEED).generate_noise(lat), noise.generate_noise(lat).clone()


@pytest.fixture
def refiners(nc, core, unet, models_dir):
    """Write a guidance-conditioned and a plain refiner (same LoRA) into models/loras; yields the LoRASet's
    layer count."""
    gm = _guidance_module(nc)
    lora = core.adapters.attach_lora(unet, rank=4, alpha=8.0, seed=7)
    try:
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for layer in lora.layers.values():
                layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.05)
        meta = {"model_kind": "eps", "base_model": "tiny-sd15"}
        lora.save(models_dir / "loras" / "plain.safetensors", metadata=meta)
        emb = gm.GuidanceEmbedding.for_model(unet, train_range=(1.5, 5.0))
        with torch.no_grad():
            emb.proj.weight.copy_(torch.randn(emb.proj.weight.shape, generator=g) * 0.05)
        lora.add_guidance(emb)
        lora.save(models_dir / "loras" / "guided.safetensors", metadata=meta)
        yield lora
    finally:
        lora.remove()


def test_guidance_input_equals_the_core(nc, rf, core, model, unet, table, refiners):
    outs = {}
    for g in (2.0, 4.5):
        e, e_comfy = comfy_refine(rf, nc, model, "guided.safetensors", g)
        den = core.host.DiffusersDenoiser(unet, table, xh.positive(nc)[0][0], cfg=1.0)
        with torch.no_grad():
            e_core = core.refine.refine_noise(e, *refiners.base_and_lora(den, guidance=g), "eps", table.sigma_max)
        print(f"\nguidance {g:g}: max|e_hat_comfy - e_hat_core| = {float((e_comfy - e_core).abs().max()):.3g}, "
              f"max|residual| = {float((e_core - e).abs().max()):.3g}")
        torch.testing.assert_close(e_comfy, e_core, **xh.TOL)
        outs[g] = e_comfy
    assert float((outs[2.0] - outs[4.5]).abs().max()) > 1e-3  # the scale input changes the refined noise
    assert not model.model.diffusion_model.time_embed._forward_hooks  # the hook is gone after the passes


def test_stock_lora_loader_applies_the_lora_part(nc, model, refiners, caplog):
    caplog.clear()
    with caplog.at_level("WARNING"):
        patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "guided.safetensors", 1.0)[0]
    assert "lora key not loaded: noisecraft_guidance.proj.weight" in caplog.text
    assert caplog.text.count("lora key not loaded") == 1
    assert len(patched.patches) == len(refiners.layers)


def test_plain_refiner_with_guidance_warns_and_ignores_it(nc, rf, model, refiners, caplog):
    _, without = comfy_refine(rf, nc, model, "plain.safetensors")
    caplog.clear()
    with caplog.at_level("WARNING"):
        _, given = comfy_refine(rf, nc, model, "plain.safetensors", 3.0)
    assert "no guidance-scale input" in caplog.text
    assert torch.equal(given, without)
    _, zero = comfy_refine(rf, nc, model, "plain.safetensors", 0.0)  # the default: an old graph
    assert torch.equal(zero, without)


def test_conditioned_refiner_without_guidance_names_the_fix(nc, rf, model, refiners):
    for guidance in (None, 0.0):
        with pytest.raises(ValueError, match=r"Refine Noise: .*guidance-scale control.*set the guidance input"):
            comfy_refine(rf, nc, model, "guided.safetensors", guidance)
    with pytest.raises(ValueError, match="finite number >= 0"):
        comfy_refine(rf, nc, model, "guided.safetensors", float("inf"))
