"""NPNet shapes: :class:`NPNetConfig` and :data:`PRESETS`, the shapes of the official checkpoints.

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie,
*Golden Noise for Diffusion Models: A Learning Framework*, arXiv:2411.09502 (2024),
Sec. 3.2 and App. A.4 (model details).

The official NPNets (SDXL, DreamShaper-XL-turbo, Hunyuan-DiT) all read 4x128x128 latents and
77-token prompts and use timm's Swin-T at 224x224; they differ only in the prompt width (2048 for
the SDXL text encoders, 1024 for Hunyuan-DiT's BERT). The config also describes smaller NPNets
trained here (e.g. the toy NPNet: 8x8 latents, a 2-stage Swin at 32x32), whose shape
:func:`noisecraft.npnet.load_npnet` reads back from the checkpoint's tensors.

Helpers used across the package: :func:`tile_shape` (channel tiling of the SVD matrix),
:func:`normalize_preset` and :func:`preset_config` (case-insensitive preset names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

__all__ = ["NPNetConfig", "PRESETS", "tile_shape", "normalize_preset", "preset_config"]


def tile_shape(channels: int) -> tuple[int, int]:
    """(a, c) with a * c = channels, a the largest divisor not above sqrt(channels): 4 -> (2, 2)."""
    a = max(d for d in range(1, math.isqrt(channels) + 1) if channels % d == 0)
    return a, channels // a


@dataclass(frozen=True)
class NPNetConfig:
    """Shape of an NPNet. The official checkpoints are ``PRESETS['sdxl' | 'dreamshaper' | 'dit']``.

    ``latent_channels`` C and ``latent_size`` (square, in latent pixels) fix the SVD branch: the C
    channels are tiled ``a x c`` (a the largest divisor of C not above sqrt(C); 2 x 2 for C = 4)
    into one (a H) x (c W) matrix whose k = min of both sides singular values are predicted.
    ``tokens`` x ``text_width`` is the prompt embedding the text modulation reads. The Swin branch
    is Swin-T at 224x224 by default (the official design, every preset); the ``swin_*`` fields make
    a smaller one for small models trained here (e.g. the toy NPNet: 32x32 input, 2 stages), read
    back from a checkpoint's shapes when it is loaded.
    """

    latent_channels: int = 4
    latent_size: int = 128
    text_width: int = 2048
    tokens: int = 77
    svd_hidden: int = 64  # mlp1 / mlp2 hidden width
    svd_mlp4_hidden: int = 1024
    svd_heads: int = 8
    swin_classes: int = 1000  # the unused ImageNet head of swin_tiny_patch4_window7_224
    # the Swin branch's shape (defaults: timm's swin_tiny_patch4_window7_224, the official one)
    swin_img_size: int = 224
    swin_patch: int = 4
    swin_embed_dim: int = 96
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window: int = 7

    def __post_init__(self) -> None:
        for name in ("latent_channels", "latent_size", "text_width", "tokens", "svd_hidden",
                     "svd_mlp4_hidden", "svd_heads", "swin_classes", "swin_img_size", "swin_patch",
                     "swin_embed_dim", "swin_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NPNetConfig.{name}: expected a positive int, got {value!r}")
        for name in ("swin_depths", "swin_heads"):
            value = tuple(getattr(self, name))
            if not value or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value):
                raise ValueError(f"NPNetConfig.{name}: expected a non-empty tuple of positive ints, got {value!r}")
            object.__setattr__(self, name, value)
        if len(self.swin_depths) != len(self.swin_heads):
            raise ValueError(f"NPNetConfig: swin_depths {self.swin_depths} and swin_heads {self.swin_heads} "
                             f"need one entry per stage")
        grid = self.swin_img_size // self.swin_patch
        if self.swin_img_size % self.swin_patch or grid % (2 ** (len(self.swin_depths) - 1)):
            raise ValueError(f"NPNetConfig: swin_img_size {self.swin_img_size} must be swin_patch "
                             f"{self.swin_patch} x a multiple of 2^{len(self.swin_depths) - 1} (one halving "
                             f"per stage after the first)")
        if self.svd_rank % self.svd_heads:
            raise ValueError(
                f"NPNetConfig: the SVD branch's attention width (k = {self.svd_rank} singular values "
                f"for {self.latent_channels} channels at {self.latent_size}x{self.latent_size}) must "
                f"be divisible by svd_heads = {self.svd_heads}; choose another latent_size or svd_heads"
            )

    @property
    def svd_tiles(self) -> tuple[int, int]:
        """(a, c): channel tiling of the SVD matrix, rows of tiles x columns of tiles."""
        return tile_shape(self.latent_channels)

    @property
    def svd_shape(self) -> tuple[int, int]:
        a, c = self.svd_tiles
        return a * self.latent_size, c * self.latent_size

    @property
    def svd_rank(self) -> int:
        return min(self.svd_shape)

    @property
    def text_features(self) -> int:
        return self.tokens * self.text_width

    def to_json(self) -> dict:
        """The fields as a JSON-ready dict (tuples as lists), as stored in ``noisecraft.config`` metadata."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


PRESETS: dict[str, NPNetConfig] = {
    # official checkpoints: 1024x1024 images -> 4x128x128 latents, 77-token prompts
    "sdxl": NPNetConfig(text_width=2048),  # CLIP-L + OpenCLIP-bigG penultimate states, concatenated
    "dreamshaper": NPNetConfig(text_width=2048),  # DreamShaper-XL-v2-turbo (SDXL text encoders)
    "dit": NPNetConfig(text_width=1024),  # Hunyuan-DiT, its first (BERT) text encoder
}


def normalize_preset(preset: Optional[str]) -> Optional[str]:
    """Preset names are case-insensitive, so the official ``--pipeline`` names (SDXL, DreamShaper,
    DiT) work too."""
    return preset.lower() if isinstance(preset, str) else preset


def preset_config(preset: str) -> NPNetConfig:
    """The :data:`PRESETS` entry for ``preset`` (case-insensitive); ValueError naming the choices."""
    preset = normalize_preset(preset)
    if preset not in PRESETS:
        raise ValueError(f"unknown NPNet preset {preset!r}: expected one of {sorted(PRESETS)}, or None "
                         f"to read the shape from the checkpoint")
    return PRESETS[preset]

