"""Tier 2: what the pack takes from ComfyUI exists in the running ComfyUI with the parameters the pack passes.

Run against each ComfyUI a user may have (``COMFYUI_PATH``): every symbol the pack imports or calls, with the
parameter names it uses (read from ComfyUI's own signatures); every ``io.<Type>.Input/Output``, ``io.Schema`` and
``io.NodeOutput`` call in ``nodes/*.py`` (found by parsing the files) binds to the running ``comfy_api.latest``;
and the trainer's guard against ComfyUI loaders that leave its weight wrappers out (newer ComfyUI's dynamic VRAM
loader skips modules up to 16 KiB) names the layers.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch

import comfy.model_management as mm

REPO = Path(__file__).resolve().parents[2]

# module, attribute path, parameter names the pack passes (None: a class or constant, existence only)
SYMBOLS = [
    ("comfy.samplers", "SCHEDULER_NAMES", None),
    ("comfy.samplers", "calculate_sigmas", ["model_sampling", "scheduler_name", "steps"]),
    ("comfy.samplers", "sampler_object", ["name"]),
    ("comfy.samplers", "Sampler", None),
    ("comfy.samplers", "CFGGuider", ["model_patcher"]),
    ("comfy.samplers", "CFGGuider.set_conds", ["self", "positive", "negative"]),
    ("comfy.samplers", "CFGGuider.set_cfg", ["self", "cfg"]),
    ("comfy.samplers", "CFGGuider.sample", ["self", "noise", "latent_image", "sampler", "sigmas", "denoise_mask",
                                            "callback", "disable_pbar", "seed"]),
    ("comfy.samplers", "CFGGuider.predict_noise", ["self", "x", "timestep", "model_options", "seed"]),
    ("comfy.sample", "fix_empty_latent_channels", ["model", "latent_image"]),
    ("comfy.sample", "prepare_noise", ["latent_image", "seed", "noise_inds"]),
    ("comfy.utils", "ProgressBar", ["total", "node_id"]),
    ("comfy.utils", "ProgressBar.update_absolute", ["self", "value", "total"]),
    ("comfy.utils", "unet_to_diffusers", ["unet_config"]),
    ("comfy.utils", "mmdit_to_diffusers", ["mmdit_config", "output_prefix"]),
    ("comfy.utils", "flux_to_diffusers", ["mmdit_config", "output_prefix"]),
    ("comfy.utils", "get_attr", ["obj", "attr"]),
    ("comfy.utils", "set_attr", ["obj", "attr", "value"]),
    ("comfy.lora", "model_lora_keys_unet", ["model", "key_map"]),
    ("comfy.weight_adapter.lora", "LoraDiff", ["weights"]),
    ("comfy.weight_adapter.lora", "LoRAAdapter", ["loaded_keys", "weights"]),
    ("comfy.weight_adapter.lora", "LoRAAdapter.calculate_weight", ["self", "weight", "key", "strength",
                                                                   "strength_model", "offset", "function"]),
    ("comfy.model_patcher", "ModelPatcher", ["model", "load_device", "offload_device"]),
    ("comfy.model_patcher", "ModelPatcher.clone", ["self"]),
    ("comfy.model_patcher", "ModelPatcher.add_weight_wrapper", ["self", "name", "function"]),
    ("comfy.model_patcher", "ModelPatcher.add_object_patch", ["self", "name", "obj"]),
    ("comfy.model_patcher", "ModelPatcher.set_model_patch_replace", ["self", "patch", "name", "block_name",
                                                                     "number"]),
    ("comfy.model_patcher", "ModelPatcher.get_model_object", ["self", "name"]),
    ("comfy.model_management", "get_torch_device", []),
    ("comfy.model_management", "unet_offload_device", []),
    ("comfy.model_management", "load_models_gpu", ["models", "force_full_load"]),
    ("comfy.model_management", "processing_interrupted", []),
    ("comfy.model_management", "throw_exception_if_processing_interrupted", []),
    ("comfy.model_management", "interrupt_current_processing", ["value"]),
    ("comfy.model_management", "InterruptProcessingException", None),
    ("comfy.model_management", "unload_all_models", []),
    ("comfy.model_management", "soft_empty_cache", []),
    ("comfy.model_sampling", "EPS", None),
    ("comfy.model_sampling", "V_PREDICTION", None),
    ("comfy.model_sampling", "CONST", None),
    ("comfy.model_base", "SD3", None),
    ("comfy.model_base", "Flux", None),
    ("comfy.model_base", "Chroma", None),
    ("comfy.ldm.modules.diffusionmodules.mmdit", "MMDiT", None),
    ("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel", None),
    ("comfy_api.latest", "ComfyExtension", None),
    ("comfy_api.latest", "io.ComfyNode", None),
    ("comfy_api.latest", "io.Hidden.unique_id", None),
]


def _resolve(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("module,path,params", SYMBOLS, ids=[f"{m}.{p}" for m, p, _ in SYMBOLS])
def test_symbol_exists_with_the_parameters_the_pack_passes(module, path, params):
    obj = _resolve(module, path)
    if params is None:
        return
    sig = inspect.signature(obj)
    names = list(sig.parameters)
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    missing = [p for p in params if p not in names and not takes_kwargs]
    assert not missing, f"{module}.{path}{sig}: no parameter {missing}"
    if params and params[0] == "self":  # positional order matters where the pack passes positionally
        assert names[: len(params)] == params or takes_kwargs, f"{module}.{path}{sig}"


def test_our_sampler_takes_what_comfyui_passes_to_a_sampler(nc):
    """CFGGuider calls ``sampler.sample(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
    disable_pbar)`` positionally: the bridge's Sampler takes ComfyUI's own sampler's parameters in that order."""
    import comfy.samplers

    ours = list(inspect.signature(nc.bridge._CoreSampler.sample).parameters)
    theirs = list(inspect.signature(comfy.samplers.KSAMPLER.sample).parameters)
    assert ours == theirs


def _io_calls() -> list[tuple[str, int, list[str], str]]:
    """``(io.X.Y, positional count, keyword names, where)`` of every ``io.*`` call in ``nodes/*.py``."""
    calls = []
    for path in sorted((REPO / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            parts, fn = [], node.func
            while isinstance(fn, ast.Attribute):
                parts.append(fn.attr)
                fn = fn.value
            if isinstance(fn, ast.Name) and fn.id == "io" and parts:
                calls.append((".".join(reversed(parts)), len(node.args), [k.arg for k in node.keywords if k.arg],
                              f"{path.name}:{node.lineno}"))
    return calls


def test_every_io_call_of_the_nodes_binds_to_this_comfy_api():
    from comfy_api.latest import io

    calls = _io_calls()
    assert len(calls) > 100  # the parse found the nodes' schemas
    bad = []
    for name, npos, kws, where in calls:
        obj = io
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            bad.append(f"{where}: io.{name} does not exist")
            continue
        try:
            inspect.signature(obj).bind(*([None] * npos), **{k: None for k in kws})
        except TypeError as e:
            bad.append(f"{where}: io.{name}({npos} positional, {kws}): {e}")
    assert not bad, "\n".join(bad)


def test_the_trainer_refuses_a_load_that_left_its_wrappers_out(nc):
    import comfy.utils

    cl = importlib.import_module(f"{nc.bridge.__package__}.comfy_lora")
    with torch.inference_mode():
        model = nc.tiny.build("sd15", seed=0)
    clone = model.clone()
    lora = cl.TrainableLoRA(clone, 4, 4.0, seed=0)
    lora.register(clone)
    try:
        mm.load_models_gpu([clone])
        lora.check_attached(clone.model)  # ComfyUI's ModelPatcher attached every adapter
        # what the dynamic VRAM loader does to a module of 16 KiB or less: loaded without its weight functions
        key = next(iter(lora.adapters))
        module = comfy.utils.get_attr(clone.model, lora.weight_keys[key].rsplit(".", 1)[0])
        module.weight_function = [f for f in module.weight_function if f is not lora.adapters[key]]
        with pytest.raises(ValueError, match=rf"^Train Refiner: ComfyUI loaded the MODEL without the refiner's "
                                             rf"weight wrappers on 1 of {len(lora.adapters)} layers \(e\.g\. {key}\).*"
                                             rf"--disable-dynamic-vram"):
            lora.check_attached(clone.model)
    finally:
        lora.detach(clone.model)
        mm.unload_all_models()
