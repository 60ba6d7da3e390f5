"""Test-only ComfyUI node pack: a checkpoint-free stand-in for loader, text encoder and VAE.

Installed only into the end-to-end test server's ``custom_nodes`` (never shipped). The example
workflows use CheckpointLoaderSimple / CLIPTextEncode / VAEDecode, as real users' graphs do; the
e2e test swaps those three node types for the ones below when converting a workflow to the API
format. Each stand-in has the same outputs and widget order as the node it replaces.

Why not a random-weight checkpoint file: a full SD1.5-layout checkpoint (CLIP-L text encoder,
VAE, UNet) is hundreds of MB to write on every run and makes each CPU generation take seconds to
minutes; the tiny models here are built in about a second and still run ComfyUI's real
ModelPatcher, CFGGuider, samplers, conditioning handling, SaveImage and the HTTP API.

The CLIP output is a real ComfyUI CLIP (``tiny_models.tiny_clip``: ComfyUI's own CLIP classes and
tokenizers, tiny random text models), so nodes that encode text themselves (Build Teacher Cache's
``clip`` input with Load Prompts) run ComfyUI's encoding. NC_Test_TextEncode still hashes its text
into a random conditioning (the examples' images stay as they were); it reads the family from the
``nc_family`` attribute set on that CLIP object.
"""

from __future__ import annotations

import hashlib

import torch
from comfy_api.latest import ComfyExtension, io

from .tiny_models import build, tiny_clip

_MODEL_CACHE: dict = {}
_CLIP_CACHE: dict = {}
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}  # the width of each family's text conditioning


def clip_for(family: str):
    """The family's tiny ComfyUI CLIP (built once per server), tagged with ``nc_family`` for NC_Test_TextEncode."""
    if family not in _CLIP_CACHE:
        clip = tiny_clip(family)
        clip.nc_family = family
        _CLIP_CACHE[family] = clip
    return _CLIP_CACHE[family]


def family_for(ckpt_name: str) -> str:
    """The tiny model standing in for a checkpoint: SDXL-shaped for names with "xl", else SD1.5."""
    return "sdxl" if "xl" in ckpt_name.lower() else "sd15"


class TinyVae:
    """Latent -> image by a fixed random 4 -> 3 projection and 8x nearest upsampling."""

    downscale = 8

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(3, 4, generator=g) * 0.5

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(samples).all():
            raise ValueError("NC_Test_VAEDecode: the latent contains NaN/inf")
        rgb = torch.einsum("oc,bchw->bohw", self.proj, samples.float())
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=self.downscale, mode="nearest")
        return torch.sigmoid(rgb).permute(0, 2, 3, 1).contiguous()  # IMAGE: [B, H, W, 3] in [0, 1]


class TinyCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NC_Test_TinyCheckpoint", display_name="NC Test Tiny Checkpoint", category="noisecraft/test",
            inputs=[io.String.Input("ckpt_name", default="tiny",
                                    tooltip="Stands in for a checkpoint name: names with 'xl' give a tiny SDXL-shaped "
                                    "model (2048-wide text), others a tiny SD1.5-shaped one; names with 'finetune' "
                                    "other random weights of that architecture (a fine-tune).")],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        family = family_for(ckpt_name)
        seed = 1 if "finetune" in ckpt_name.lower() else 0  # a "fine-tune": same architecture, other weights
        if (family, seed) not in _MODEL_CACHE:
            _MODEL_CACHE[(family, seed)] = build(family, seed=seed)
        return io.NodeOutput(_MODEL_CACHE[(family, seed)], clip_for(family), TinyVae())


class TinyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NC_Test_TextEncode", display_name="NC Test Text Encode", category="noisecraft/test",
            inputs=[io.String.Input("text", multiline=True, tooltip="Hashed into a random conditioning."),
                    io.Clip.Input("clip", tooltip="From NC Test Tiny Checkpoint.")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text, clip) -> io.NodeOutput:
        family = getattr(clip, "nc_family", None)
        if family not in CONTEXT_DIM:
            raise ValueError(f"NC_Test_TextEncode: expected the CLIP of NC Test Tiny Checkpoint, got {type(clip).__name__}")
        width = CONTEXT_DIM[family]
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        ctx = torch.randn(1, 77, width, generator=g) if text.strip() else torch.zeros(1, 77, width)
        extra = {}
        if family == "sdxl":  # SDXL's text encoder also gives a pooled output (1280 wide)
            extra["pooled_output"] = torch.randn(1, 1280, generator=g) if text.strip() else torch.zeros(1, 1280)
        return io.NodeOutput([[ctx, extra]])


class TinyVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NC_Test_VAEDecode", display_name="NC Test VAE Decode", category="noisecraft/test",
            inputs=[io.Latent.Input("samples", tooltip="Latent to decode."),
                    io.Vae.Input("vae", tooltip="From NC Test Tiny Checkpoint.")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, vae) -> io.NodeOutput:
        return io.NodeOutput(vae.decode(samples["samples"]))


class TeacherCacheInfo(io.ComfyNode):
    """An output node that makes a graph run Build Teacher Cache alone (nothing after it is an output otherwise):
    reports the cache's sample and prompt counts and its folder as UI data ``noisecraft_cache``."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NC_Test_TeacherCacheInfo", display_name="NC Test Teacher Cache Info", category="noisecraft/test",
            inputs=[io.Custom("TEACHER_CACHE").Input("teacher_cache", tooltip="From Build Teacher Cache.")],
            outputs=[], is_output_node=True,
        )

    @classmethod
    def execute(cls, teacher_cache) -> io.NodeOutput:
        folder = teacher_cache.folder
        return io.NodeOutput(ui={"noisecraft_cache": [len(teacher_cache), teacher_cache.prompt_count,
                                                      str(folder) if folder is not None else None]})


class TestPackExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinyCheckpoint, TinyTextEncode, TinyVAEDecode, TeacherCacheInfo]


async def comfy_entrypoint() -> TestPackExtension:
    return TestPackExtension()
