"""Gradient checkpointing of Train Refiner's LoRA pass on a ComfyUI model (the ``gradient_checkpointing`` input).

The core checkpoints the refiner's one graph-keeping pass (:func:`noisecraft.train.refiner.lora_residual`)
through diffusers' interface on the network: ``enable_gradient_checkpointing(segment_func)`` makes every block a
non-reentrant ``torch.utils.checkpoint`` segment for that pass, ``disable_gradient_checkpointing()`` ends it.
ComfyUI's networks have no such switch (their ``use_checkpoint`` flags call no checkpoint), so
:class:`ComfyCheckpointing` gives that interface to a ComfyUI diffusion model: while on, each block's instance
``forward`` runs through ``segment_func`` (the block's own forward, its keyword and dict arguments frozen as they
were in the forward, so the recompute in backward sees the same ``transformer_options``); off, the class forward
is back. Blocks: ResBlocks and SpatialTransformers of the UNets (SD1.x, SD2.x, SDXL; diffusers checkpoints its
resnets and transformer blocks alike) and the joint blocks of SD3's MMDiT. Flux-class models are refused: their
blocks already run under a saved-tensor hook (:func:`nodes.comfy_lora._keep_saved_block_inputs`).

Hand-written because no library switches checkpointing on ComfyUI's modules for one pass and off again; the
checkpointing itself is torch's.
"""

from __future__ import annotations

from typing import Callable

import torch


def _blocks(diffusion_model) -> list[torch.nn.Module]:
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    joint = getattr(diffusion_model, "joint_blocks", None)
    if joint is not None:  # SD3 (MMDiT)
        return list(joint)
    return [m for m in diffusion_model.modules() if isinstance(m, (ResBlock, SpatialTransformer))]


class _Frozen:
    """``forward(*args, **kwargs)`` as a function of the positional args only, with the keyword and dict values
    frozen (copied) as they were when the segment ran."""

    def __init__(self, forward: Callable, args: tuple, kwargs: dict):
        self.forward = forward
        self.kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        self.dicts = {i: dict(a) for i, a in enumerate(args) if isinstance(a, dict)}

    def __call__(self, *args):
        args = tuple(dict(self.dicts[i]) if i in self.dicts else a for i, a in enumerate(args))
        return self.forward(*args, **{k: dict(v) if isinstance(v, dict) else v for k, v in self.kwargs.items()})


class ComfyCheckpointing:
    """diffusers' gradient-checkpointing switch on a ComfyUI diffusion model (module docstring)."""

    _supports_gradient_checkpointing = True

    def __init__(self, model, node: str):
        from .comfy_lora import dit_family

        if dit_family(model) == "flux":
            raise ValueError(f"{node}: gradient_checkpointing is available for SD1.x, SD2.x, SDXL and SD3 models; this "
                             f"Flux-class model trains without it: set gradient_checkpointing off (or lower rank / "
                             f"batch_size to fit)")
        self.blocks = _blocks(model.diffusion_model)
        if not self.blocks:
            raise ValueError(f"{node}: gradient_checkpointing found no blocks to checkpoint in this model "
                             f"({type(model).__name__}); set it off")
        self.is_gradient_checkpointing = False

    def enable_gradient_checkpointing(self, segment_func: Callable) -> None:
        for block in self.blocks:
            forward = type(block).forward.__get__(block)

            def run(*args, _forward=forward, **kwargs):
                return segment_func(_Frozen(_forward, args, kwargs), *args)

            block.forward = run  # (an instance attribute: Module.__call__ finds it first)
        self.is_gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.is_gradient_checkpointing = False
