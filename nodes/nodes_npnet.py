"""NPNet golden-noise nodes: load an NPNet file, turn any NOISE into golden noise.

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie, "Golden Noise for
Diffusion Models: A Learning Framework" (arXiv:2411.09502). The network, the file formats and
the resolution / long-prompt policies live in :mod:`noisecraft.npnet` (``load_npnet``,
``golden_noise``); these nodes only find the file, keep the loaded network, and wrap a NOISE.

Choices where the issue was silent:

* Folders: files are listed from ComfyUI's ``npnet`` model folder, registered
  (:func:`nodes.common.register_folders`) as ``models/npnet`` plus the folders other NPNet packs use
  (the manifest's aliases, ``npnets``), and every path registered under an alias
  (``extra_model_paths.yaml``, another pack) at listing time. A name found in several folders
  resolves to the first (``models/npnet`` first).
* Cache and memory: a loaded NPNet is kept per (file, mtime, size, preset)
  (:class:`nodes.common.FileCache`), at most ``CACHE_SIZE`` of them, so re-running a graph or
  loading the same file in a second node does not read it again; editing or replacing the file
  reloads it. The network is loaded on the CPU and wrapped in a ComfyUI ``ModelPatcher``: when
  golden noise is computed, ComfyUI's model management loads it fully (it is ~120 MB, always
  float32) onto ``get_torch_device()`` and may offload it again, like any other model, when memory
  is needed or models are freed. Golden noise is then
  moved back to the CPU, as ComfyUI's NOISE protocol requires.
* Conditioning: the prompt embedding is the tensor of the first CONDITIONING entry
  (``cond[0][0]``, [B, tokens, width]); further entries (Conditioning Combine) are ignored, with a
  log line. A batch of 1 is shared by every latent item; a batch of B gives item b its own prompt.
* Strength 0 is off: the node returns the input NOISE itself and NPNet is not run.
* Singular-vector signs: the core's default (canonical signs) is used, so the same seed gives the
  same golden noise on CPU and GPU; the official code's device-dependent signs are not offered.
* The width and the values (NaN/inf) of the conditioning are checked when the node runs (the
  error shows at this node); batch and latent channels, an empty latent and the input NOISE's
  values are checked when the sampler asks for noise (the first time the latent is known). Load
  NPNet's errors (a file that is empty, truncated, not an NPNet, or holds NaN/inf weights) start
  with the node's name and the chosen file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.model_patcher
import folder_paths

from ..noisecraft.npnet import LONG_PROMPT_POLICIES, PRESETS, RESOLUTION_POLICIES, NPNet, golden_noise, load_npnet
from . import bridge
from .common import NPNET_FOLDER as FOLDER, FileCache, check_combo, prompt_embedding, register_folders
from .noise import NoiseTransform

log = logging.getLogger(__name__)

CATEGORY = "noisecraft/npnet"
LOAD_NAME = "Load NPNet"
GOLDEN_NAME = "NPNet Golden Noise"
AUTO = "auto"
PRESET_OPTIONS = [AUTO, *PRESETS]
RESOLUTIONS = list(RESOLUTION_POLICIES)
LONG_PROMPTS = list(LONG_PROMPT_POLICIES)
CACHE_SIZE = 2
FETCH_HINT = "python -m noisecraft fetch npnet-sdxl-lucipherdev"

NPNetType = io.Custom("NPNET")

# What a text width usually means, for error messages only.
_WIDTH_MODELS = {768: "SD1.x (CLIP-L)", 1024: "SD2.x (OpenCLIP-H) or Hunyuan-DiT", 2048: "SDXL (CLIP-L + bigG)",
                 4096: "SD3/Flux (T5)"}
_OFFICIAL_BY_WIDTH = {2048: "sdxl.safetensors or dreamshaper.safetensors (SDXL, DreamShaper-XL)",
                      1024: "dit.safetensors (Hunyuan-DiT)"}


# -- folders ------------------------------------------------------------------------------------

def npnet_files() -> list[str]:
    register_folders()
    return folder_paths.get_filename_list(FOLDER)


def resolve_file(name: str) -> Path:
    register_folders()
    path = folder_paths.get_full_path(FOLDER, name) if name else None
    if path is None:
        folders = folder_paths.get_folder_paths(FOLDER)
        found = folder_paths.get_filename_list(FOLDER)
        raise FileNotFoundError(
            f"{LOAD_NAME}: NPNet file {name!r} not found; looked in {folders} (found: {found or 'nothing'}). "
            f"Put the file in one of these folders (e.g. `{FETCH_HINT}` downloads the SDXL NPNet into "
            f"models/npnet) and refresh the node's file list"
        )
    return Path(path)


# -- the loaded network -------------------------------------------------------------------------

class LoadedNPNet:
    """What travels on an NPNET socket: the network (CPU until used) and where it came from."""

    def __init__(self, net: NPNet, name: str, path: Path):
        self.name = name
        self.path = path
        self.patcher = comfy.model_patcher.ModelPatcher(
            net, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )

    @property
    def net(self) -> NPNet:
        return self.patcher.model

    @property
    def config(self):
        return self.net.config

    @property
    def preset(self) -> Optional[str]:
        return self.net.preset

    def describe(self) -> str:
        return f"{self.name} (preset {self.preset})" if self.preset else self.name

    def on_device(self) -> tuple[NPNet, torch.device]:
        """The network on ComfyUI's torch device, loaded through ComfyUI's model management."""
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        return self.net, self.patcher.load_device

    def __repr__(self) -> str:
        cfg = self.config
        return (f"LoadedNPNet({self.describe()}, {cfg.latent_channels} channels at {cfg.latent_size}, "
                f"text {cfg.tokens} x {cfg.text_width})")


CACHE = FileCache(CACHE_SIZE)


def load_cached(name: str, preset: Optional[str]) -> LoadedNPNet:
    """The NPNet in file ``name`` of the npnet folders, loaded once per file version and preset."""
    path = resolve_file(name)
    return CACHE.get(path, lambda: _read_npnet(path, name, preset), preset)


def _read_npnet(path: Path, name: str, preset: Optional[str]) -> LoadedNPNet:
    try:
        net = load_npnet(path, preset=preset, device="cpu")
    except (ValueError, OSError) as e:  # the core names the file, what was expected and the fix
        raise ValueError(f"{LOAD_NAME}: npnet_name {name!r}: {e}") from None
    loaded = LoadedNPNet(net, name, path)
    log.info("%s: loaded %r", LOAD_NAME, loaded)
    return loaded


def clear_cache() -> None:
    CACHE.clear()


# -- golden noise as a NOISE ----------------------------------------------------------------------

def width_note(width: int) -> str:
    """``"<width> wide"``, with the model family that text width usually means (for messages)."""
    model = _WIDTH_MODELS.get(int(width))
    return f"{width} wide (the text width of {model})" if model else f"{width} wide"


def prompt_embeds(positive, npnet: LoadedNPNet) -> torch.Tensor:
    """[B, tokens, width] prompt embedding of a CONDITIONING, checked against the NPNet's width."""
    emb = prompt_embedding(positive, GOLDEN_NAME)
    bridge.check_conditioning(positive, "positive", GOLDEN_NAME)  # NaN/inf values (NPNet would give NaN noise)
    want = npnet.config.text_width
    got = int(emb.shape[2])
    if got != want:
        official = _OFFICIAL_BY_WIDTH.get(got)
        target = _WIDTH_MODELS.get(want, "the model this NPNet was made for")
        instead = (f"For {got}-wide text load {official} instead." if official else
                   f"No official NPNet reads {got}-wide text: train one for your model, or use a model whose "
                   f"conditioning is {want} wide ({target}).")
        raise ValueError(
            f"{GOLDEN_NAME}: the positive conditioning is {width_note(got)}, but the NPNet "
            f"{npnet.describe()} reads {width_note(want)}. Connect the positive prompt of the model this "
            f"NPNet was made for. {instead}"
        )
    return emb.detach().to("cpu", torch.float32)


class GoldenNoise(NoiseTransform):
    """A NOISE: the input NOISE's tensor for the sampler's latent, made golden by NPNet.

    ``generate_noise`` asks the input NOISE for the same latent dict (so per-batch-index seeding is
    unchanged), then runs :func:`noisecraft.npnet.golden_noise` on ComfyUI's device and returns a
    CPU tensor of the input's dtype. ``.seed`` is the input NOISE's.
    """

    node_name = GOLDEN_NAME

    def __init__(self, noise, npnet: LoadedNPNet, prompts: torch.Tensor, strength: float,
                 resolution: str, long_prompt: str):
        super().__init__(noise)
        self.npnet = npnet
        self.prompts = prompts
        self.strength = float(strength)
        self.resolution = resolution
        self.long_prompt = long_prompt

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        base = self.base_noise(input_latent)
        if self.strength == 0:
            return base
        cfg = self.npnet.config
        if base.ndim != 4 or base.shape[1] != cfg.latent_channels:
            raise ValueError(
                f"{GOLDEN_NAME}: the latent has {base.shape[1] if base.ndim > 1 else '?'} channels "
                f"(shape {list(base.shape)}), but the NPNet {self.npnet.describe()} makes {cfg.latent_channels}-channel "
                f"noise ([batch, {cfg.latent_channels}, height, width]). Use it with the model it was made for "
                f"(the official NPNets: SDXL-class 4-channel latents), or set strength to 0"
            )
        b, bp = base.shape[0], self.prompts.shape[0]
        if bp not in (1, b):
            raise ValueError(
                f"{GOLDEN_NAME}: the conditioning has a batch of {bp} prompts, but the latent a batch of {b}; "
                f"expected 1 prompt (shared by every image) or {b} (one per image). Match the prompt batch "
                f"to the Empty Latent Image's batch_size"
            )
        comfy.model_management.throw_exception_if_processing_interrupted()
        net, device = self.npnet.on_device()
        with torch.no_grad():
            out = golden_noise(net, base.to(device, torch.float32), self.prompts.to(device), strength=self.strength,
                               resolution=self.resolution, long_prompt=self.long_prompt)
        return out.to("cpu", base.dtype)

    def __repr__(self) -> str:
        return (f"GoldenNoise({self.noise!r}, {self.npnet.describe()}, strength={self.strength}, "
                f"resolution={self.resolution!r})")


# -- nodes ----------------------------------------------------------------------------------------

class LoadNPNet(io.ComfyNode):
    """Load an NPNet file from models/npnet (or the peers' models/npnets)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_LoadNPNet",
            display_name=LOAD_NAME,
            category=CATEGORY,
            description="Loads an NPNet (Zhou et al., arXiv:2411.09502) from models/npnet (files in models/npnets "
            "are listed too): the official .pth or either safetensors repack. Loaded once and kept while the file "
            "is unchanged. Feed it to NPNet Golden Noise.",
            inputs=[
                io.Combo.Input(
                    "npnet_name", options=npnet_files(),
                    tooltip="The NPNet file (models/npnet or models/npnets), e.g. sdxl.safetensors for SDXL. "
                    "Always used; to turn golden noise off, set strength to 0 on NPNet Golden Noise.",
                ),
                io.Combo.Input(
                    "preset", options=PRESET_OPTIONS, default=AUTO,
                    tooltip="Which official layout the file must have: sdxl, dreamshaper (SDXL text, 2048 wide) or "
                    "dit (Hunyuan-DiT text, 1024 wide). auto (default) turns the check off and reads the layout "
                    "from the file.",
                ),
            ],
            outputs=[NPNetType.Output(display_name="npnet", tooltip="The loaded NPNet.")],
        )

    @classmethod
    def fingerprint_inputs(cls, npnet_name, preset=AUTO):
        # re-run when the file changes on disk, not only when the inputs change
        try:
            path = resolve_file(npnet_name)
        except FileNotFoundError:
            return None
        return FileCache.key(path, preset)

    @classmethod
    def execute(cls, npnet_name, preset=AUTO) -> io.NodeOutput:
        check_combo(LOAD_NAME, "preset", preset, PRESET_OPTIONS)
        return io.NodeOutput(load_cached(npnet_name, None if preset == AUTO else preset))


class NPNetGoldenNoise(io.ComfyNode):
    """NOISE + NPNET + positive CONDITIONING -> golden NOISE (computed when the sampler asks)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_NPNetGoldenNoise",
            display_name=GOLDEN_NAME,
            category=CATEGORY,
            description="Turns a noise into 'golden' noise for the prompt with NPNet (Zhou et al., "
            "arXiv:2411.09502), at any latent size. Connect RandomNoise (or another NOISE node) in, and the output "
            "to SamplerCustomAdvanced's noise (or to Refine Noise). Works when the sampler asks for noise.",
            inputs=[
                io.Noise.Input("noise", tooltip="The noise to improve, e.g. RandomNoise; its seed is kept. Always used."),
                NPNetType.Input("npnet", tooltip="From Load NPNet; it must match your model (SDXL NPNet for SDXL). "
                                "Always used unless strength is 0."),
                io.Conditioning.Input(
                    "positive",
                    tooltip="Your positive prompt (the same as the sampler's); NPNet reads its text embedding. "
                    "One prompt is shared by the batch; a batch of prompts gives each image its own. "
                    "Unused when strength is 0.",
                ),
                io.Float.Input(
                    "strength", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="How far to move toward NPNet's golden noise: 1 = NPNet's output, 0 turns it off (the "
                    "input noise passes through unchanged).",
                ),
                io.Combo.Input(
                    "resolution", options=RESOLUTIONS, default="residual",
                    tooltip="Latents of another size than NPNet's (128x128 = 1024px for SDXL): residual (default) "
                    "adds NPNet's low-frequency change to the original noise, keeping its statistics; resize "
                    "resizes the noise to NPNet's size and back (other packs' way); native allows NPNet's own size "
                    "only (an error otherwise). No setting turns this off; at NPNet's own size all three agree.",
                ),
                io.Combo.Input(
                    "long_prompt", options=LONG_PROMPTS, default="truncate",
                    tooltip="Prompts longer than 77 tokens (NPNet reads 77): truncate (default) uses the first 77 "
                    "tokens, as the official code and other packs do; chunks averages all 77-token chunks of the "
                    "prompt. No effect on prompts of 77 tokens or fewer (that is the off setting).",
                ),
            ],
            outputs=[io.Noise.Output(display_name="noise", tooltip="The golden noise; same seed as the input noise.")],
        )

    @classmethod
    def execute(cls, noise, npnet, positive, strength, resolution="residual", long_prompt="truncate") -> io.NodeOutput:
        check_combo(GOLDEN_NAME, "resolution", resolution, RESOLUTIONS)
        check_combo(GOLDEN_NAME, "long_prompt", long_prompt, LONG_PROMPTS)
        if not hasattr(noise, "generate_noise"):
            raise ValueError(f"{GOLDEN_NAME}: expected a NOISE (e.g. from RandomNoise), got {type(noise).__name__}")
        if not isinstance(npnet, LoadedNPNet):
            raise ValueError(f"{GOLDEN_NAME}: expected an NPNET from {LOAD_NAME}, got {type(npnet).__name__}")
        strength = float(strength)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"{GOLDEN_NAME}: strength must be in [0, 1] (0 = off, 1 = NPNet's output), got {strength}")
        if strength == 0:
            return io.NodeOutput(noise)
        prompts = prompt_embeds(positive, npnet)
        return io.NodeOutput(GoldenNoise(noise, npnet, prompts, strength, resolution, long_prompt))


register_folders()  # before ComfyUI lists the files (the schema's options)

NODES = [LoadNPNet, NPNetGoldenNoise]
