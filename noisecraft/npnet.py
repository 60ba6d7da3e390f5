"""NPNet, the noise prompt network, compatible with the official checkpoints.

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie,
*Golden Noise for Diffusion Models: A Learning Framework*, arXiv:2411.09502 (2024),
Sec. 3.2 (architecture, Eq. 6-9) and App. A.4 (model details). Official code:
github.com/xie-lab-ml/Golden-Noise-for-Diffusion-Models (``inference/npnet_pipeline.py``,
``inference/model/{NoiseTransformer,SVDNoiseUnet}.py``). This file re-implements the same math in
pure torch; it copies no code and does not need timm or diffusers.

NPNet maps Gaussian noise ``x`` [B, C, H, W] and a prompt embedding ``c`` [B, tokens, width] to
"golden" noise::

    (scale, shift) = linear(flatten(c))                      # 2C numbers per prompt
    t   = group_norm(x, 1 group, eps 1e-6) * (1 + scale) + shift   # AdaGroupNorm, no affine
    out = svd(x) + (2 sigmoid(alpha) - 1) * t + beta * swin(x + t)

Official forward, detail by detail (checked against the official code and timm >= 0.9.6):

- everything runs in float32 (the official module is built ``.to(torch.float32)`` and casts
  ``initial_noise.float()`` / ``prompt_embeds.float()``); the prompt is flattened row-major,
  ``c.view(B, -1)``, so the linear's input index is ``token * width + feature``; ``scale`` is
  the first C outputs, ``shift`` the last C (``chunk(2, dim=1)``);
- ``svd`` (``SVDNoiseUnet``): the four 128x128 channels are tiled into one 256x256 matrix
  (``b (a c) h w -> b (a h) (c w)`` with a = c = 2: channel 0 top-left, 1 top-right, 2 bottom-left,
  3 bottom-right), ``U, s, Vh = torch.linalg.svd(m)`` (default ``full_matrices=True``, float32,
  on the module's device; the official code names ``Vh`` "V"), then
  ``z = mlp1(U^T) + mlp2(Vh) + mlp3(s)`` (rows of ``U^T`` and ``Vh`` are the singular vectors,
  ``mlp3(s)`` is broadcast over them), ``z = attention(z).mean(over the 256 vectors)`` (8 heads,
  qkv without bias, fused scaled-dot-product attention), ``s' = mlp4(z) + s`` and
  ``U diag(s') Vh`` is un-tiled. The 256-channel BatchNorm ``bn`` is never called; its five
  tensors are in the checkpoint and kept here only so that loading is strict;
- ``swin`` (``NoiseTransformer``, called without ``residual``): nearest resize (``F.interpolate``
  default mode) 128x128 -> 224x224, 1x1 conv 4 -> 3 (``downconv``), Swin-T
  ``forward_features`` (patch embed, 4 stages, final LayerNorm; timm returns it NHWC
  [B, 7, 7, 768]), nearest resize of that NHWC tensor *read as NCHW* to [128, 128]: the 7 grid rows
  act as channels, the 7 grid columns are stretched to 128 rows (source row ``floor(i * 7 / 128)``)
  and the 768 features are subsampled to 128 columns (source feature ``6 * j``: only every sixth
  feature is ever used), then a 1x1 conv 7 -> 4 (``upconv``);
- the sum is ``(svd + alpha_term) + beta * swin`` in that order; ``alpha`` and ``beta`` are [1].

Batches: a prompt batch of 1 is broadcast over the noise batch (what the official inference
does); a prompt batch equal to the noise batch gives each item its own prompt (the official
forward supports it too; only the official *training* code used one prompt per batch).

Ours differs from the official run in one way, on purpose: the official inference never calls
``eval()``, so timm's Swin-T keeps its default stochastic depth (drop_path_rate 0.1) active and
the golden noise changes at every call. This Swin-T has no stochastic depth at all: it always
computes what the official modules compute in eval mode (dropout rates are 0 everywhere, the
BatchNorm is unused), so two calls on the same input give the same output. Singular-vector signs
are whatever ``torch.linalg.svd`` returns on the device (LAPACK and cuSOLVER may differ and the
MLPs see the signs); making that device-independent is a separate step.

Checkpoint flavours read by :func:`load_npnet` (all strict, no unpickling):

- the official ``.pth``: ``torch.load(weights_only=True)`` of a nested dict
  ``{"unet_embedding": {...}, "unet_svd": {...}, "embeeding": {...}, "alpha": [1], "beta": [1]}``;
- safetensors flattened with ``text_embedding.*`` (``convert_to_safetensors.py`` of the
  ComfyUI-NPNet pack, the files at huggingface.co/asagi4/NPNet): keys ``unet_embedding.<k>``,
  ``unet_svd.<k>``, ``text_embedding.linear.{weight,bias}``, ``alpha``, ``beta``;
- safetensors flattened with ``embeeding.*`` (the loader of ComfyUI-Golden-Noise, files at
  huggingface.co/LucipherDev/Golden-Noise-NPNets): the same with ``embeeding.linear.*``.

The file kind is read from the file's first bytes, not its name. This module's own
``state_dict()`` uses the ``text_embedding.*`` names; :func:`save_npnet_safetensors` writes that
flavour with ``noisecraft.*`` metadata.
"""

from __future__ import annotations

import logging
import math
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "NPNetConfig",
    "PRESETS",
    "NPNet",
    "SwinTransformer",
    "swin_tiny_patch4_window7_224",
    "load_npnet",
    "npnet_from_state_dict",
    "official_state_dict",
    "save_npnet_safetensors",
    "convert_pth_to_safetensors",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# Sub-dictionaries of the official .pth, and the name of the text module in each flavour.
_OFFICIAL_GROUPS = ("unet_embedding", "unet_svd", "embeeding")
_OFFICIAL_TEXT = "embeeding"  # sic: the official spelling
_TEXT = "text_embedding"  # our module name and the ComfyUI-NPNet safetensors flavour
_SCALARS = ("alpha", "beta")
# timm's non-persistent buffers: derived constants, never part of a checkpoint.
_DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


# -- configuration -----------------------------------------------------------------------------


def _tiles(channels: int) -> tuple[int, int]:
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
    is always Swin-T at 224x224 (the official design).
    """

    latent_channels: int = 4
    latent_size: int = 128
    text_width: int = 2048
    tokens: int = 77
    svd_hidden: int = 64  # mlp1 / mlp2 hidden width
    svd_mlp4_hidden: int = 1024
    svd_heads: int = 8
    swin_classes: int = 1000  # the unused ImageNet head of swin_tiny_patch4_window7_224

    def __post_init__(self) -> None:
        for name in ("latent_channels", "latent_size", "text_width", "tokens", "svd_hidden",
                     "svd_mlp4_hidden", "svd_heads", "swin_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NPNetConfig.{name}: expected a positive int, got {value!r}")
        if self.svd_rank % self.svd_heads:
            raise ValueError(
                f"NPNetConfig: the SVD branch's attention width (k = {self.svd_rank} singular values "
                f"for {self.latent_channels} channels at {self.latent_size}x{self.latent_size}) must "
                f"be divisible by svd_heads = {self.svd_heads}; choose another latent_size or svd_heads"
            )

    @property
    def svd_tiles(self) -> tuple[int, int]:
        """(a, c): channel tiling of the SVD matrix, rows of tiles x columns of tiles."""
        return _tiles(self.latent_channels)

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


PRESETS: dict[str, NPNetConfig] = {
    # official checkpoints: 1024x1024 images -> 4x128x128 latents, 77-token prompts
    "sdxl": NPNetConfig(text_width=2048),  # CLIP-L + OpenCLIP-bigG penultimate states, concatenated
    "dreamshaper": NPNetConfig(text_width=2048),  # DreamShaper-XL-v2-turbo (SDXL text encoders)
    "dit": NPNetConfig(text_width=1024),  # Hunyuan-DiT, its first (BERT) text encoder
}


def _norm_preset(preset: Optional[str]) -> Optional[str]:
    """Preset names are case-insensitive, so the official ``--pipeline`` names (SDXL, DreamShaper,
    DiT) work too."""
    return preset.lower() if isinstance(preset, str) else preset


def _preset_config(preset: str) -> NPNetConfig:
    preset = _norm_preset(preset)
    if preset not in PRESETS:
        raise ValueError(f"unknown NPNet preset {preset!r}: expected one of {sorted(PRESETS)}, or None "
                         f"to read the shape from the checkpoint")
    return PRESETS[preset]


# -- Swin-T (timm >= 0.9.6 parameter layout, eval-mode math) ------------------------------------


def _relative_position_index(win_h: int, win_w: int) -> torch.Tensor:
    """[N, N] index into the (2 win_h - 1)(2 win_w - 1) bias table, N = win_h * win_w.

    Constants are built on the CPU explicitly, also inside a ``torch.device('meta')`` context
    (meta tensors here would pull in torch's slow reference-op machinery)."""
    n = torch.arange(win_h * win_w, device="cpu")
    hh, ww = n // win_w, n % win_w
    dh = hh[:, None] - hh[None, :] + (win_h - 1)
    dw = ww[:, None] - ww[None, :] + (win_w - 1)
    return dh * (2 * win_w - 1) + dw


def _partition(x: torch.Tensor, win: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * H/win * W/win, win * win, C] (windows in row-major order)."""
    b, h, w, c = x.shape
    x = x.view(b, h // win, win, w // win, win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, win * win, c)


def _unpartition(windows: torch.Tensor, win: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // win, w // win, win, win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _shift_mask(res: int, win: int, shift: int) -> torch.Tensor:
    """[nW, N, N] additive mask of shifted-window attention: -100 between tokens that came from
    different regions of the un-shifted image (timm and the reference Swin use -100, not -inf)."""
    labels = torch.zeros(1, res, res, 1, device="cpu")
    cuts = ((0, res - win), (res - win, res - shift), (res - shift, res))
    n = 0
    for h0, h1 in cuts:
        for w0, w1 in cuts:
            labels[:, h0:h1, w0:w1, :] = n
            n += 1
    lw = _partition(labels, win).squeeze(-1)  # nW, N
    diff = lw[:, None, :] - lw[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, win: int):
        super().__init__()
        self.heads, self.win = heads, win
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_position_index(win, win), persistent=False)

    def _fill_buffers(self) -> None:
        self.relative_position_index = _relative_position_index(self.win, self.win).to(
            self.relative_position_bias_table.device)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(bw, n, -1))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, res: int, win: int, shifted: bool):
        super().__init__()
        # as timm: a window as large as the feature map is not shifted and is clipped to the map
        self.win = min(win, res)
        self.shift = win // 2 if (shifted and res > win) else 0
        self.res = res
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, heads, self.win)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, 4 * dim)
        mask = _shift_mask(res, self.win, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _fill_buffers(self) -> None:
        if self.shift:
            self.attn_mask = _shift_mask(self.res, self.win, self.shift).to(self.norm1.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, H, W, C]
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(_partition(y, self.win), self.attn_mask)
        y = _unpartition(y, self.win, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y
        x = x.reshape(b, -1, c)
        x = x + self.mlp(self.norm2(x))
        return x.reshape(b, h, w, c)


class _PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C] -> [B, H/2, W/2, 2C]
        b, h, w, c = x.shape
        # concatenation order (0,0), (1,0), (0,1), (1,1) as (row, column) offsets: timm / reference
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class _SwinStage(nn.Module):
    def __init__(self, dim_in: int, depth: int, heads: int, res: int, win: int, downsample: bool):
        super().__init__()
        # timm >= 0.9: the patch merging sits at the *start* of stages 1..3 (stage 0 has none)
        self.downsample = _PatchMerging(dim_in) if downsample else nn.Identity()
        dim = 2 * dim_in if downsample else dim_in
        self.blocks = nn.Sequential(*[_SwinBlock(dim, heads, res, win, shifted=i % 2 == 1) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class _Head(nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, classes)


class SwinTransformer(nn.Module):
    """Swin Transformer (Liu et al., arXiv:2103.14030) with timm's (>= 0.9.6) parameter names and
    shapes, so that ``state_dict()`` equals timm's ``SwinTransformer.state_dict()`` key for key.

    Only :meth:`forward_features` is implemented (what NPNet uses): it equals timm's in eval mode
    (no stochastic depth, no dropout). The classifier head is kept for the checkpoint layout.
    Input must be ``img_size`` square; every stage's feature size must be a multiple of its window.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 7, num_classes: int = 1000):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = _PatchEmbed(patch_size, in_chans, embed_dim)
        res, dim = img_size // patch_size, embed_dim
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            if i > 0:
                res, dim_in, dim = res // 2, dim, dim * 2
            else:
                dim_in = dim
            if res % min(window_size, res):
                raise ValueError(f"SwinTransformer: stage {i} feature size {res} is not a multiple of the "
                                 f"window {window_size}; use img_size = 224 for Swin-T")
            stages.append(_SwinStage(dim_in, depth, heads, res, window_size, downsample=i > 0))
        self.layers = nn.Sequential(*stages)
        self.num_features = dim
        self.grid = res
        self.norm = nn.LayerNorm(dim)
        self.head = _Head(dim, num_classes)

    def _fill_buffers(self) -> None:
        for m in self.modules():
            if isinstance(m, (_WindowAttention, _SwinBlock)):
                m._fill_buffers()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, img, img] -> NHWC features [B, img/32, img/32, 8 * embed_dim] (timm's output)."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"SwinTransformer: expected a {self.img_size}x{self.img_size} input, got "
                             f"{tuple(x.shape)}")
        return self.norm(self.layers(self.patch_embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def swin_tiny_patch4_window7_224(num_classes: int = 1000) -> SwinTransformer:
    """Swin-T with timm's ``swin_tiny_patch4_window7_224`` layout: 173 tensors, 28.3M parameters."""
    return SwinTransformer(num_classes=num_classes)


# -- NPNet branches --------------------------------------------------------------------------


class _SwinBranch(nn.Module):
    """Official ``NoiseTransformer``: resize -> 1x1 conv -> Swin-T features -> resize -> 1x1 conv."""

    def __init__(self, cfg: NPNetConfig):
        super().__init__()
        self.size = cfg.latent_size
        self.swin = swin_tiny_patch4_window7_224(cfg.swin_classes)
        self.upconv = nn.Conv2d(self.swin.grid, cfg.latent_channels, kernel_size=1)
        self.downconv = nn.Conv2d(cfg.latent_channels, 3, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(x, size=(self.swin.img_size, self.swin.img_size), mode="nearest")
        f = self.swin.forward_features(self.downconv(h))  # [B, 7, 7, 768], NHWC
        # As the official code: the NHWC map goes into an NCHW resize unchanged, so the 7 grid rows
        # become the channels and (7 columns, 768 features) are resized to (size, size).
        f = F.interpolate(f, size=(self.size, self.size), mode="nearest")
        return self.upconv(f)


class _SVDAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as timm's Attention
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _SVDBranch(nn.Module):
    """Official ``SVDNoiseUnet``: predict new singular values, keep the singular vectors."""

    def __init__(self, cfg: NPNetConfig):
        super().__init__()
        rows, cols = cfg.svd_shape
        k, hid = cfg.svd_rank, cfg.svd_hidden
        self.tiles = cfg.svd_tiles
        self.mlp1 = nn.Sequential(nn.Linear(rows, hid), nn.ReLU(), nn.Linear(hid, k))
        self.mlp2 = nn.Sequential(nn.Linear(cols, hid), nn.ReLU(), nn.Linear(hid, k))
        self.mlp3 = nn.Sequential(nn.Linear(k, k))
        self.attention = _SVDAttention(k, cfg.svd_heads)
        self.bn = nn.BatchNorm2d(k)  # in the official checkpoint, never called
        self.mlp4 = nn.Sequential(nn.Linear(k, cfg.svd_mlp4_hidden), nn.ReLU(), nn.Linear(cfg.svd_mlp4_hidden, k))

    def tile(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape
        a, c = self.tiles
        return x.reshape(b, a, c, h, w).permute(0, 1, 3, 2, 4).reshape(b, a * h, c * w)

    def untile(self, m: torch.Tensor, h: int, w: int) -> torch.Tensor:
        a, c = self.tiles
        b = m.shape[0]
        return m.reshape(b, a, h, c, w).permute(0, 1, 3, 2, 4).reshape(b, a * c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape
        m = self.tile(x)
        # SVD in float32 whatever the module's dtype (no half-precision SVD); a square matrix gets
        # exactly the official call (full_matrices=True), a non-square one the reduced SVD.
        square = m.shape[-1] == m.shape[-2]
        u, s, vh = torch.linalg.svd(m.float(), full_matrices=square)
        u, s, vh = u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)
        z = self.mlp1(u.transpose(1, 2)) + self.mlp2(vh) + self.mlp3(s).unsqueeze(1)
        z = self.attention(z).mean(1)
        s_new = self.mlp4(z) + s
        return self.untile((u * s_new.unsqueeze(1)) @ vh, h, w)  # U diag(s') Vh


class _TextModulation(nn.Module):
    """diffusers ``AdaGroupNorm(tokens * width, C, num_groups=1, eps=1e-6)`` without activation."""

    def __init__(self, cfg: NPNetConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.text_features, 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, prompt_flat: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(prompt_flat)[:, :, None, None].chunk(2, dim=1)
        return F.group_norm(x, 1, eps=1e-6) * (1 + scale) + shift


class NPNet(nn.Module):
    """NPNet with the official parameter layout (see the module docstring for the math).

    ``state_dict()`` keys are the flattened official keys with ``embeeding`` spelled
    ``text_embedding``; :func:`official_state_dict` gives the nested official dict. Build one from
    a file with :func:`load_npnet`. Constructing ``NPNet(config)`` directly initialises weights
    with torch's default initialisers (the global RNG); loading does not touch any RNG.
    """

    def __init__(self, config: Union[NPNetConfig, str] = "sdxl", preset: Optional[str] = None):
        super().__init__()
        if isinstance(config, str):
            preset, config = _norm_preset(config), _preset_config(config)
        self.config = config
        self.preset = preset
        self.unet_embedding = _SwinBranch(config)
        self.unet_svd = _SVDBranch(config)
        self.text_embedding = _TextModulation(config)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def _fill_buffers(self) -> None:
        self.unet_embedding.swin._fill_buffers()

    def text_modulation(self, noise: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """t = AdaGroupNorm(noise, prompt), the term added to the noise and to the output."""
        dtype, device = self.alpha.dtype, self.alpha.device
        prompt = prompt_embeds.to(device=device, dtype=dtype).reshape(prompt_embeds.shape[0], -1)
        return self.text_embedding(noise.to(device=device, dtype=dtype), prompt)

    def _check_inputs(self, noise: torch.Tensor, prompt_embeds: torch.Tensor) -> None:
        cfg = self.config
        want = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        name = f"this NPNet ({self.preset or 'custom'})"
        if noise.ndim != 4 or tuple(noise.shape[1:]) != want:
            raise ValueError(
                f"NPNet noise: expected [B, {want[0]}, {want[1]}, {want[2]}] for {name}, got "
                f"{list(noise.shape)}; NPNet runs at its trained latent size (the golden-noise node's "
                f"resolution policy handles other sizes) and needs a model with {want[0]} latent channels"
            )
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[2] != cfg.text_width:
            raise ValueError(
                f"NPNet prompt_embeds: expected [B, {cfg.tokens}, {cfg.text_width}] for {name}, got "
                f"{list(prompt_embeds.shape)}; use the conditioning of the model this NPNet was trained "
                f"for (text width {cfg.text_width}), or load the NPNet for your model"
            )
        if prompt_embeds.shape[1] != cfg.tokens:
            raise ValueError(
                f"NPNet prompt_embeds: expected {cfg.tokens} tokens, got {prompt_embeds.shape[1]} "
                f"(shape {list(prompt_embeds.shape)}); pass exactly {cfg.tokens} tokens (e.g. the first "
                f"{cfg.tokens}; the golden-noise node has a long-prompt policy)"
            )
        bp, bn = prompt_embeds.shape[0], noise.shape[0]
        if bp not in (1, bn):
            raise ValueError(
                f"NPNet: prompt batch {bp} does not fit noise batch {bn}; expected 1 prompt (shared by "
                f"the whole batch) or one prompt per noise item ({bn})"
            )

    def forward(self, noise: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Golden noise for ``noise`` [B, C, H, W] and ``prompt_embeds`` [1 or B, tokens, width].

        Computed in the parameters' dtype (float32 as loaded; the SVD always in float32) on the
        parameters' device; returned with ``noise``'s dtype and device.
        """
        self._check_inputs(noise, prompt_embeds)
        dtype, device = self.alpha.dtype, self.alpha.device
        x = noise.to(device=device, dtype=dtype)
        t = self.text_modulation(x, prompt_embeds)
        out = self.unet_svd(x) + (2 * torch.sigmoid(self.alpha) - 1) * t
        out = out + self.beta * self.unet_embedding(x + t)
        return out.to(device=noise.device, dtype=noise.dtype)


def official_state_dict(model_or_state: Union[NPNet, Mapping[str, torch.Tensor]]) -> dict:
    """The official nested layout (what ``torch.save`` wrote for the released ``.pth`` files)."""
    flat = _flatten(model_or_state.state_dict() if isinstance(model_or_state, NPNet) else model_or_state)
    out: dict = {"unet_embedding": {}, "unet_svd": {}, _OFFICIAL_TEXT: {}}
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        if group in _SCALARS and not rest:
            out[group] = value
        elif (_OFFICIAL_TEXT if group == _TEXT else group) in out and rest:
            out[_OFFICIAL_TEXT if group == _TEXT else group][rest] = value
        else:
            raise ValueError(f"official_state_dict: {key!r} belongs to no NPNet part; expected keys under "
                             f"unet_embedding., unet_svd., text_embedding. (or embeeding.), alpha, beta")
    return out


# -- reading checkpoints ---------------------------------------------------------------------


_HELP_FILES = ("the official .pth (github.com/xie-lab-ml/Golden-Noise-for-Diffusion-Models) or a "
               "safetensors repack (huggingface.co/asagi4/NPNet, huggingface.co/LucipherDev/Golden-Noise-NPNets)")


def _flatten(state: Mapping, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Nested official dict or either flat flavour -> flat dict with ``text_embedding.*`` names."""
    flat: dict[str, torch.Tensor] = {}

    def put(key: str, value) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                put(f"{key}.{k}" if key else str(k), v)
            return
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, expected a tensor; "
                             f"this is not an NPNet checkpoint; use {_HELP_FILES}")
        if key.startswith(_OFFICIAL_TEXT + "."):
            key = _TEXT + key[len(_OFFICIAL_TEXT):]
        if key in flat:
            raise ValueError(f"{source}: {key!r} appears twice (as {_OFFICIAL_TEXT}.* and {_TEXT}.*); "
                             f"expected one of the two spellings; re-export the file from one source")
        flat[key] = value

    put("", state)
    return flat


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Return (flat tensors, safetensors metadata, 'pth' | 'safetensors'); never unpickles."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NPNet file; expected {_HELP_FILES} (ComfyUI folder models/npnet)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors: u64 little-endian header length, then a JSON object
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = struct.unpack("<Q", head[:8])[0]
        if 8 + header_len > size:
            raise ValueError(f"{path}: a safetensors header of {header_len} bytes but the file has only {size} "
                             f"bytes: it is truncated; download it again")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # SafetensorsError and friends
            raise ValueError(f"{path}: could not read it as safetensors ({type(exc).__name__}: {exc}); the "
                             f"file ({size} bytes) is truncated or corrupt: download it again") from exc
        return _flatten(tensors, str(path)), metadata, "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save zip archive, or legacy pickle
        try:
            # zip archives are memory-mapped (the tensors are copied into the module right after)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=head[:2] == b"PK")
        except pickle.UnpicklingError as exc:
            msg = str(exc)
            if "weights only" in msg.lower() or "weights_only" in msg.lower():
                # torch's own advice (weights_only=False) is what we refuse; keep only its reason
                lines = [ln.strip() for ln in msg.splitlines() if "WeightsUnpickler error" in ln]
                reason = lines[0].split(" Please use")[0] if lines else msg.strip().splitlines()[0]
                raise ValueError(
                    f"{path}: this .pth holds Python objects besides tensors, and loading it would mean "
                    f"unpickling (running code from the file), which NoiseCraft never does; expected a "
                    f"plain dict of tensors like the official NPNet .pth. Use a safetensors repack "
                    f"(huggingface.co/asagi4/NPNet), or, only if you trust the file, convert it yourself "
                    f"to safetensors in a separate Python session ({reason})"
                ) from exc
            raise ValueError(f"{path}: could not read it as a PyTorch checkpoint ({exc}); the file "
                             f"({size} bytes) is truncated or corrupt: download it again") from exc
        except Exception as exc:  # RuntimeError from the zip reader, EOFError, ...
            raise ValueError(f"{path}: could not read it as a PyTorch checkpoint ({type(exc).__name__}: "
                             f"{exc}); the file ({size} bytes) is truncated or corrupt: download it again") from exc
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: holds a {type(obj).__name__}, expected a dict of NPNet tensors; "
                             f"use {_HELP_FILES}")
        return _flatten(obj, str(path)), {}, "pth"
    raise ValueError(f"{path}: neither safetensors nor a PyTorch checkpoint (first bytes {head[:8]!r}, "
                     f"{size} bytes); expected {_HELP_FILES}")


def _meta_int(metadata: Mapping[str, str], key: str, default: int, source: str) -> int:
    value = metadata.get(key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{source}: metadata {key} = {value!r}, expected an integer; the file's metadata is "
                         f"damaged: convert the original again") from None


def _describe_unrelated(flat: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> str:
    keys = sorted(flat)
    sample = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
    kind = metadata.get("noisecraft.kind")
    if kind and kind != "npnet":
        what = f"a NoiseCraft {kind} file (metadata noisecraft.kind = {kind!r})"
    elif any("lora" in k.lower() for k in keys) or any(k.startswith("ss_") for k in metadata):
        what = "a LoRA (load it with a LoRA loader, not as an NPNet)"
    else:
        what = "not an NPNet checkpoint"
    return (f"{source}: {what}: expected the NPNet tensors unet_embedding.*, unet_svd.*, "
            f"text_embedding.* or embeeding.*, alpha and beta; got {len(keys)} tensor(s) ({sample}); "
            f"use {_HELP_FILES}")


def _infer_config(flat: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> NPNetConfig:
    """The NPNetConfig a checkpoint was built with, from its tensor shapes (and our metadata)."""
    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in flat:
            raise ValueError(f"{source}: {key!r} is missing; expected a complete NPNet checkpoint; "
                             f"the file is damaged or from another program: use {_HELP_FILES}")
        got = tuple(flat[key].shape)
        if len(got) != ndim or 0 in got:
            raise ValueError(f"{source}: {key} has shape {list(got)}, expected a non-empty {ndim}-d tensor; "
                             f"not an NPNet checkpoint NoiseCraft knows: use {_HELP_FILES}")
        return got

    lin = shape(f"{_TEXT}.linear.weight", 2)
    channels = shape("unet_embedding.upconv.weight", 4)[0]
    tokens = _meta_int(metadata, "noisecraft.tokens", 77, source)
    if tokens < 1 or lin[1] % tokens:
        raise ValueError(f"{source}: the text embedding takes {lin[1]} features, not a multiple of {tokens} "
                         f"tokens; expected tokens x width (77 x 2048 for SDXL, 77 x 1024 for Hunyuan-DiT)")
    a, c = _tiles(channels)
    hidden, rows = shape("unet_svd.mlp1.0.weight", 2)
    cols = shape("unet_svd.mlp2.0.weight", 2)[1]
    if rows % a or cols % c or rows // a != cols // c:
        raise ValueError(f"{source}: SVD branch inputs {rows} x {cols} do not fit {channels} channels tiled "
                         f"{a} x {c} on a square latent; not an NPNet layout NoiseCraft knows")
    # the attention's head count is not visible in shapes: the official 8 unless our metadata says otherwise
    try:
        return NPNetConfig(
            latent_channels=channels, latent_size=rows // a, text_width=lin[1] // tokens, tokens=tokens,
            svd_hidden=hidden, svd_mlp4_hidden=shape("unet_svd.mlp4.0.weight", 2)[0],
            svd_heads=_meta_int(metadata, "noisecraft.svd_heads", 8, source),
            swin_classes=shape("unet_embedding.swin.head.fc.weight", 2)[0])
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc


def _expected_shapes(cfg: NPNetConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with torch.device("meta"):
        model = NPNet(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _check_layout(flat: Mapping[str, torch.Tensor], cfg: NPNetConfig, preset: Optional[str], source: str) -> None:
    expected = _expected_shapes(cfg)
    got_keys = set(flat) - {k for k in flat if k.rsplit(".", 1)[-1] in _DERIVED_BUFFERS}
    missing = sorted(set(expected) - got_keys)
    unexpected = sorted(got_keys - set(expected))
    wrong = [(k, expected[k][0], tuple(flat[k].shape)) for k in sorted(set(expected) & got_keys)
             if tuple(flat[k].shape) != expected[k][0]]
    if not (missing or unexpected or wrong):
        return
    want = f"preset {preset!r}" if preset else "the shape read from its own tensors"
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape(s) differ: " + "; ".join(
            f"{k}: expected {list(e)}, got {list(g)}" for k, e, g in wrong[:4]) + ("; ..." if len(wrong) > 4 else ""))
    if missing:
        parts.append(f"{len(missing)} missing: " + ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else ""))
    if unexpected:
        hint = ""
        if any(k.startswith("unet_embedding.swin.layers.0.downsample.") for k in unexpected):
            hint = " (a pre-0.9 timm Swin layout, patch merging at the end of each stage: not supported)"
        parts.append(f"{len(unexpected)} unexpected{hint}: " + ", ".join(unexpected[:4])
                     + (", ..." if len(unexpected) > 4 else ""))
    raise ValueError(f"{source}: not the NPNet layout of {want} "
                     f"({cfg.latent_channels}x{cfg.latent_size}x{cfg.latent_size} latents, "
                     f"{cfg.tokens}x{cfg.text_width} text): " + " | ".join(parts)
                     + "; this file is an NPNet for another model or a damaged file: pick the preset that "
                       "matches the file (or none, to read it from the file) or the file for your model")


def _resolve_config(flat: Mapping[str, torch.Tensor], metadata: Mapping[str, str], preset: Optional[str],
                    source: str) -> tuple[NPNetConfig, Optional[str]]:
    if not any(k.startswith(("unet_embedding.", "unet_svd.", f"{_TEXT}.")) for k in flat):
        raise ValueError(_describe_unrelated(flat, metadata, source))
    kind = metadata.get("noisecraft.kind")
    if kind and kind != "npnet":
        raise ValueError(_describe_unrelated(flat, metadata, source))
    found = _infer_config(flat, metadata, source)
    file_preset = metadata.get("noisecraft.preset") or None
    if preset is None:
        if file_preset is None:
            matches = [name for name, cfg in PRESETS.items() if cfg == found]
            file_preset = matches[0] if len(matches) == 1 else None  # "dit"; sdxl and dreamshaper share shapes
        return found, file_preset
    cfg = _preset_config(preset)
    if (found.tokens, found.text_width) != (cfg.tokens, cfg.text_width):
        others = [n for n, c in PRESETS.items() if (c.tokens, c.text_width) == (found.tokens, found.text_width)]
        advice = f"use preset {others[0]!r}" if others else "use preset None (read from the file)"
        raise ValueError(
            f"{source}: its text embedding reads {found.tokens} x {found.text_width} prompt features, "
            f"preset {preset!r} expects {cfg.tokens} x {cfg.text_width}; this NPNet was trained for another "
            f"text encoder: {advice}, or load the NPNet file for {preset!r}"
        )
    if file_preset and file_preset != preset:
        logger.warning("%s: metadata says NPNet preset %r, loading it as %r (same shapes)", source, file_preset, preset)
    return cfg, preset


def npnet_from_state_dict(state: Mapping, preset: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                          metadata: Optional[Mapping[str, str]] = None, source: str = "<state dict>") -> NPNet:
    """Build an eval-mode :class:`NPNet` from a state dict in any of the three layouts, strictly.

    ``preset`` None reads the shape from the tensors; a preset name also checks them against it.
    Raises ValueError (naming ``source``, what was expected and got) for anything else.
    """
    flat = _flatten(state, source)
    preset = _norm_preset(preset)
    cfg, name = _resolve_config(flat, metadata or {}, preset, source)
    _check_layout(flat, cfg, preset, source)
    with torch.device("meta"):
        model = NPNet(cfg, preset=name)
    model = model.to_empty(device=device)
    model._fill_buffers()
    model.load_state_dict({k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in _DERIVED_BUFFERS},
                          strict=True)
    return model.eval()


def load_npnet(path: PathLike, preset: Optional[str] = None, device: Union[str, torch.device] = "cpu") -> NPNet:
    """Load an NPNet from an official ``.pth`` or either safetensors repack (strict; no unpickling).

    Args:
        path: the file; its kind is read from its first bytes.
        preset: ``'sdxl'``, ``'dreamshaper'``, ``'dit'`` to require that layout, or None to read the
            layout from the file (text width from the embedding weight).
        device: where the module lives.
    Returns an eval-mode module (deterministic). Raises ValueError naming the file for another
    model's NPNet, another text width than the preset's, a LoRA or unrelated file, a truncated or
    corrupt file, and a ``.pth`` that would need unpickling; FileNotFoundError if it is absent.
    """
    path = Path(path)
    flat, metadata, fmt = _read_file(path)
    model = npnet_from_state_dict(flat, preset=preset, device=device, metadata=metadata, source=str(path))
    cfg = model.config
    logger.info("loaded NPNet %s (%s, preset %s, %d channels at %d, text %d x %d) on %s", path.name, fmt,
                model.preset or "unknown", cfg.latent_channels, cfg.latent_size, cfg.tokens, cfg.text_width, device)
    return model


# -- writing ---------------------------------------------------------------------------------


def save_npnet_safetensors(model_or_state: Union[NPNet, Mapping], path: PathLike,
                           metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write an NPNet (module or state dict in any layout) as safetensors, ``text_embedding.*``
    flavour, after checking the layout strictly. Metadata: ``noisecraft.kind = npnet``, the shape
    (``noisecraft.preset``, ``text_width``, ``tokens``, ``latent_channels``, ``latent_size``,
    ``svd_heads``) and anything in ``metadata`` (string values; it may override ``noisecraft.preset``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    extra = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"save_npnet_safetensors({path}): metadata keys and values must be strings, got {bad}")
    if isinstance(model_or_state, NPNet):
        flat = dict(model_or_state.state_dict())
        cfg, name = model_or_state.config, model_or_state.preset
        if name is None:
            matches = [n for n, c in PRESETS.items() if c == cfg]
            name = matches[0] if len(matches) == 1 else None
    else:
        flat = _flatten(model_or_state)
        preset = extra.get("noisecraft.preset") or None
        cfg, name = _resolve_config(flat, extra, preset if preset in PRESETS else None, f"save_npnet_safetensors({path})")
        _check_layout(flat, cfg, name if name in PRESETS else None, f"save_npnet_safetensors({path})")
    meta = {
        "noisecraft.kind": "npnet",
        "noisecraft.preset": name or "",
        "noisecraft.text_width": str(cfg.text_width),
        "noisecraft.tokens": str(cfg.tokens),
        "noisecraft.latent_channels": str(cfg.latent_channels),
        "noisecraft.latent_size": str(cfg.latent_size),
        "noisecraft.svd_heads": str(cfg.svd_heads),
        "noisecraft.paper": "Golden Noise for Diffusion Models: A Learning Framework, arXiv:2411.09502",
    }
    meta.update(extra)
    meta["noisecraft.kind"] = "npnet"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(flat.items())
               if k.rsplit(".", 1)[-1] not in _DERIVED_BUFFERS}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=dict(sorted(meta.items())))
    return path


def convert_pth_to_safetensors(src: PathLike, dst: PathLike, preset: Optional[str] = None,
                               overwrite: bool = False) -> Path:
    """Convert an official NPNet ``.pth`` (or any flavour) to safetensors with metadata.

    The source is read with ``torch.load(weights_only=True)`` and checked strictly (against
    ``preset`` if given); ``noisecraft.source_sha256`` and ``noisecraft.source_name`` record it.
    The official SDXL and DreamShaper files have the same shapes: pass ``preset`` to record which.
    """
    from .weights import sha256_file

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; expected a new file name (or pass overwrite=True)")
    flat, metadata, fmt = _read_file(src)
    model = npnet_from_state_dict(flat, preset=preset, metadata=metadata, source=str(src))
    extra = {k: v for k, v in metadata.items() if k.startswith("noisecraft.") and k != "noisecraft.kind"}
    extra.update({
        "noisecraft.preset": model.preset or "",
        "noisecraft.source_name": src.name,
        "noisecraft.source_sha256": sha256_file(src),
        "noisecraft.source_format": fmt,
    })
    out = save_npnet_safetensors(model, dst, extra)
    logger.info("converted %s -> %s (preset %s)", src, dst, model.preset or "unknown")
    return out
