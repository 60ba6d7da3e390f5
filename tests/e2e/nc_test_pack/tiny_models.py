"""Tiny random-weight ComfyUI models built from ComfyUI's own classes (test-only).

No checkpoint exists on the test machines, so the tests build SD1.5-, SD2-v-, SDXL- and
SD3-shaped models with a few million random parameters from ``comfy.supported_models`` and
``comfy.model_base``, wrapped in a real ``ModelPatcher``. Needs ComfyUI on ``sys.path`` and
``comfy.cli_args.args.cpu`` set by the caller before ``comfy.model_management`` is imported.

Two ComfyUI behaviours shape this file: its layers (``comfy.ops.disable_weight_init``) skip
``reset_parameters`` (weights start as uninitialised memory), so torch.nn's own initialisers are
re-run here; and each model config overwrites parts of the unet config (heads), so those are set
again after the config is built.
"""

from __future__ import annotations

import torch

import comfy.model_base as model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models as supported

FAMILIES = ("sd15", "sd2v", "sdxl", "sd3")
LATENT_CHANNELS = {"sd15": 4, "sd2v": 4, "sdxl": 4, "sd3": 16}


def _unet(context_dim: int, linear: bool, **extra) -> dict:
    cfg = dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
        channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
        transformer_depth_middle=1, use_spatial_transformer=True, legacy=False, use_checkpoint=False,
        use_linear_in_transformer=linear, context_dim=context_dim, adm_in_channels=None,
        use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float32,
    )
    cfg.update(extra)
    return cfg


def _init(module: torch.nn.Module, seed: int) -> None:
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in module.modules():
            for klass in type(m).__mro__:
                if klass.__module__.startswith("torch.nn") and "reset_parameters" in klass.__dict__:
                    klass.reset_parameters(m)
                    break
        with torch.no_grad():
            for _, t in list(module.named_parameters()) + list(module.named_buffers()):
                if t.is_floating_point() and t.numel() and (not torch.isfinite(t).all() or t.abs().max() > 1e4):
                    t.normal_(0, 0.02)
    finally:
        torch.set_rng_state(gen_state)


def _patcher(model, seed: int):
    _init(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def build(family: str, seed: int = 0):
    """A ModelPatcher of the named family with random weights."""
    off = mm.unet_offload_device()
    if family == "sd15":
        cfg = supported.SD15(_unet(768, False))
        cfg.unet_config["num_heads"] = 2
        return _patcher(model_base.BaseModel(cfg, model_type=model_base.ModelType.EPS, device=off), seed)
    if family == "sd2v":
        cfg = supported.SD20(_unet(1024, True))
        cfg.unet_config["num_head_channels"] = 16
        return _patcher(model_base.BaseModel(cfg, model_type=model_base.ModelType.V_PREDICTION, device=off), seed)
    if family == "sdxl":
        cfg = supported.SDXL(_unet(2048, True, adm_in_channels=2816, num_classes="sequential", num_head_channels=16))
        cfg.unet_config["num_head_channels"] = 16
        return _patcher(model_base.SDXL(cfg, model_type=model_base.ModelType.EPS, device=off), seed)
    if family == "sd3":
        cfg = supported.SD3(dict(
            in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=2048,
            pos_embed_scaling_factor=None, pos_embed_max_size=32, num_patches=32 * 32,
            context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
            x_block_self_attn_layers=[], dtype=torch.float32,
        ))
        return _patcher(model_base.SD3(cfg, device=off), seed)
    raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")


def conditioning(family: str, seed: int = 0, batch: int = 1, empty: bool = False) -> list:
    """Hand-made CONDITIONING for ``family`` (what its text encoder would output, random)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        t = torch.randn(*shape, generator=g)
        return torch.zeros_like(t) if empty else t

    if family == "sd15":
        return [[rnd(batch, 77, 768), {}]]
    if family == "sd2v":
        return [[rnd(batch, 77, 1024), {}]]
    if family == "sdxl":
        return [[rnd(batch, 77, 2048), {"pooled_output": rnd(batch, 1280), "width": 1024, "height": 1024}]]
    if family == "sd3":
        return [[rnd(batch, 77, 4096), {"pooled_output": rnd(batch, 2048)}]]
    raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")


REFINER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "ff.net.0.proj", "ff.net.2")


def random_refiner_lora(model, rank: int, seed: int, scale: float = 0.05) -> dict:
    """A seeded random refiner LoRA for a UNet ModelPatcher, in the kohya format NoiseCraft exports
    (``lora_unet_<diffusers name>`` on NoiseCraft's default targets; diffusers names from ComfyUI's
    ``unet_to_diffusers`` table)."""
    import comfy.utils

    weights = dict(model.model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    state = {}
    for dname, lname in sorted(comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()):
        mod = dname[: -len(".weight")]
        if not dname.endswith(".weight") or not any(mod == t or mod.endswith("." + t) for t in REFINER_TARGETS):
            continue
        w = weights["diffusion_model." + lname]
        key = "lora_unet_" + mod.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.randn((rank, *w.shape[1:]), generator=g) * scale
        state[f"{key}.lora_up.weight"] = torch.randn((w.shape[0], rank, *([1] * (w.ndim - 2))), generator=g) * scale
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def _tiny_text_config(width: int) -> dict:
    """A CLIP text model of ``width`` (the UNet's text width), 3 layers (SDXL reads the penultimate): the real vocabulary and 77 positions, so
    ComfyUI's own CLIP tokenizer and encoding run unchanged."""
    return {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
            "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": width, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 2,
            "num_hidden_layers": 3, "pad_token_id": 1, "projection_dim": width, "torch_dtype": "float32",
            "vocab_size": 49408}


def tiny_clip(family: str, seed: int = 0):
    """A real ComfyUI ``comfy.sd.CLIP`` for ``family`` ("sd15" or "sdxl") with tiny random text models of the
    widths the tiny UNets read (SD1.5: CLIP-L 768; SDXL: CLIP-L 768 + CLIP-G 1280 with its projected pooled
    output), built from ComfyUI's own classes (SD1ClipModel / SDClipModel, SD1Tokenizer / SDXLTokenizer), so
    CLIP Text Encode and ``clip.tokenize`` + ``encode_from_tokens_scheduled`` run ComfyUI's code."""
    import functools
    from types import SimpleNamespace

    import comfy.sd
    import comfy.sd1_clip as sd1
    import comfy.sdxl_clip as sdxl

    if family == "sd15":
        model = functools.partial(sd1.SD1ClipModel, clip_model=functools.partial(
            sd1.SDClipModel, textmodel_json_config=_tiny_text_config(768), return_projected_pooled=False))
        tokenizer = sd1.SD1Tokenizer
    elif family == "sdxl":
        class TinySDXLClip(sdxl.SDXLClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):
                torch.nn.Module.__init__(self)
                self.clip_l = sd1.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                              layer_norm_hidden_state=False, model_options=model_options,
                                              textmodel_json_config=_tiny_text_config(768))
                self.clip_g = sd1.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                              textmodel_json_config=_tiny_text_config(1280),
                                              special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                              layer_norm_hidden_state=False, return_projected_pooled=True,
                                              model_options={**model_options, "model_name": "clip_g"})
                self.dtypes = {dtype}

        model, tokenizer = TinySDXLClip, sdxl.SDXLTokenizer
    else:
        raise ValueError(f"tiny_clip: no tiny CLIP for {family!r}: expected sd15 or sdxl")
    clip = comfy.sd.CLIP(SimpleNamespace(clip=model, tokenizer=tokenizer, params={}),
                         model_options={"dtype": torch.float32})
    _init(clip.cond_stage_model, seed)
    return clip
