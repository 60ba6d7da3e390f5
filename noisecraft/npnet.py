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
BatchNorm is unused), so two calls on the same input give the same output. ``NPNet.forward``
feeds the singular vectors with the signs ``torch.linalg.svd`` returns on the device (LAPACK and
cuSOLVER may differ and the MLPs see the signs): that is the official function.

Beyond the official code, :func:`golden_noise` (what the nodes call) adds:

- any latent size and aspect ratio (``resolution="residual"``): the net runs at its trained size on
  a band-limited, still white, unit-variance view of the noise, and only its *change* is carried
  back (band-limited) and added to the original noise, whose higher frequencies stay untouched;
  the peers' resize-to-128-and-back is available as ``"resize"``, and ``"native"`` refuses other
  sizes (benchmarks/bench_npnet_resolution.py measures the statistics);
- prompts longer than 77 tokens (``long_prompt="truncate"`` or ``"chunks"``, :func:`fit_prompt`)
  and one prompt per batch item;
- device-independent output: ``canonical_signs=True`` fixes the sign of each singular pair
  (:func:`canonicalize_svd_signs`) before the MLPs;
- a ``strength`` (0 = off, 1 = the net's output).

The SVD always runs in float32; the rest in the module's dtype (float32 as loaded; a caller may
``.half()`` or ``.to(torch.bfloat16)`` the module). Everything here is stateless per call.

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

Security floor for ``.pth`` files: ``torch.load(weights_only=True)`` can be made to run code by a
crafted file on torch <= 2.5.1 (PyTorch advisory GHSA-53q9-r3pm-6pq6, CVE-2025-32434, fixed in
2.6.0), and its unpickler can be made to corrupt memory, again up to code execution, on every
torch before 2.10.0 (PyTorch advisory of 2026-01-26, CVE-2026-24747: opcodes and storage sizes not
validated; fixed in 2.10.0). So a ``.pth`` is read only on torch >= 2.10 (:data:`PTH_MIN_TORCH`,
:func:`check_torch_for_pth`); on older torch it is refused with a pointer to
``python -m noisecraft convert SRC.pth DST.safetensors``, run once on a machine with torch >= 2.10.
safetensors files never execute code and load on any torch.

Bad input is refused naming its source (:mod:`noisecraft.ode`'s boundary checks): a file whose
tensors hold NaN/inf (naming the file and the tensors), a directory, an empty, text or truncated
file; noise that is not floating point, empty (B = 0, a 0x0 latent) or not finite (before the
SVD); a non-finite prompt embedding (naming ``prompt_embeds``).
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ode import NonFiniteError, check_latent, check_number, check_tensors_finite

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
    "RESOLUTION_POLICIES",
    "LONG_PROMPT_POLICIES",
    "golden_noise",
    "fit_prompt",
    "to_trained_size",
    "from_trained_size",
    "band_map",
    "canonicalize_svd_signs",
    "random_npnet",
    "PTH_MIN_TORCH",
    "check_torch_for_pth",
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
        self.swin = SwinTransformer(img_size=cfg.swin_img_size, patch_size=cfg.swin_patch,
                                    embed_dim=cfg.swin_embed_dim, depths=cfg.swin_depths,
                                    num_heads=cfg.swin_heads, window_size=cfg.swin_window,
                                    num_classes=cfg.swin_classes)
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


def canonicalize_svd_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the sign of every singular pair: the largest-magnitude entry of each column of ``u`` is
    made positive, and the matching row of ``vh`` is flipped with it (``u_i -> -u_i, v_i -> -v_i``
    leaves ``U diag(s) Vh`` unchanged). ``u`` [..., m, >= k], ``vh`` [..., k, n]; columns of ``u``
    beyond k (a full U of a non-square matrix) are left alone. Two SVDs of the same matrix that
    differ only in these signs (LAPACK vs cuSOLVER) give the same pair after this.

    The convention is ambiguous only where the two largest entries of a column have nearly equal
    magnitude and opposite signs. Measured on the 256-long singular vectors of Gaussian 256x256
    matrices (benchmarks/bench_npnet_resolution.py): median gap 1.4e-2, against a float32-vs-float64
    entry difference of ~3e-6; 2 vectors in 16,384 had a gap below 1e-5, and no canonical sign
    differed between a float32 and a float64 SVD. So two devices can still disagree on about one
    pair in 10^4 (a few % of 128x128 latents have one such pair), against about half of all pairs
    without the convention.
    """
    k = vh.shape[-2]
    uk = u[..., :k]
    idx = uk.abs().argmax(dim=-2, keepdim=True)  # [..., 1, k]
    sign = torch.gather(uk, -2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    u = torch.cat([uk * sign, u[..., k:]], dim=-1) if u.shape[-1] > k else uk * sign
    return u, vh * sign.transpose(-1, -2)


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

    def forward(self, x: torch.Tensor, canonical_signs: bool = False) -> torch.Tensor:
        b, ch, h, w = x.shape
        m = self.tile(x)
        # SVD in float32 whatever the module's dtype (no half-precision SVD); a square matrix gets
        # exactly the official call (full_matrices=True), a non-square one the reduced SVD.
        square = m.shape[-1] == m.shape[-2]
        u, s, vh = torch.linalg.svd(m.float(), full_matrices=square)
        if canonical_signs:
            u, vh = canonicalize_svd_signs(u, vh)
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
        for what, t in (("noise", noise), ("prompt_embeds", prompt_embeds)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"NPNet {what}: expected a floating-point tensor, got {type(t).__name__}")
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
        check_latent(noise, "NPNet noise", ndim=4, fix="pass unit Gaussian noise (ComfyUI's NOISE output)")
        check_latent(prompt_embeds, "NPNet prompt_embeds", ndim=3,
                     fix="the text encoder's conditioning is broken (check the model's precision and the CLIP input)")

    def forward(self, noise: torch.Tensor, prompt_embeds: torch.Tensor, canonical_signs: bool = False) -> torch.Tensor:
        """Golden noise for ``noise`` [B, C, H, W] and ``prompt_embeds`` [1 or B, tokens, width].

        Computed in the parameters' dtype (float32 as loaded; the SVD always in float32) on the
        parameters' device; returned with ``noise``'s dtype and device. ``canonical_signs`` False
        (default) is the official function: the MLPs see the singular vectors with the signs the
        device's SVD returned. True applies :func:`canonicalize_svd_signs` first, which makes the
        result independent of the SVD implementation (see :func:`golden_noise`).
        """
        self._check_inputs(noise, prompt_embeds)
        dtype, device = self.alpha.dtype, self.alpha.device
        x = noise.to(device=device, dtype=dtype)
        t = self.text_modulation(x, prompt_embeds)
        out = self.unet_svd(x, canonical_signs=canonical_signs) + (2 * torch.sigmoid(self.alpha) - 1) * t
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


PTH_MIN_TORCH = (2, 10)
"""The oldest torch whose ``torch.load(weights_only=True)`` NoiseCraft trusts with a ``.pth``:
GHSA-53q9-r3pm-6pq6 / CVE-2025-32434 (remote code execution through a crafted file even with
``weights_only=True``) affects torch <= 2.5.1 and is fixed in 2.6.0; CVE-2026-24747 (the
weights_only unpickler corrupts memory on crafted opcodes / storage sizes, up to code execution)
affects every torch before 2.10.0 and is fixed in 2.10.0."""

_ADVISORY = "GHSA-53q9-r3pm-6pq6 / CVE-2025-32434, fixed in torch 2.6.0; CVE-2026-24747, fixed in torch 2.10.0"


def _torch_release(version: str) -> Optional[tuple[int, int]]:
    """(major, minor) of a torch version string ('2.5.1+cu121', '2.6.0a0+git1234', '2.10.0'), or None."""
    import re

    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_torch_for_pth(version: Optional[str] = None, path: Optional[PathLike] = None) -> None:
    """Refuse to read a ``.pth`` on a torch older than :data:`PTH_MIN_TORCH` (default: the running
    torch's ``torch.__version__``; pass ``version`` to test another). Raises ValueError naming the
    file, the advisory and the fix: convert the file once to safetensors where torch >= 2.10 runs
    (``python -m noisecraft convert SRC.pth DST.safetensors``) and load that. An unparseable
    version is refused too (it cannot be shown to be safe)."""
    version = torch.__version__ if version is None else version
    release = _torch_release(version)
    if release is not None and release >= PTH_MIN_TORCH:
        return
    need = ".".join(map(str, PTH_MIN_TORCH))
    what = f"{path}: " if path is not None else ""
    raise ValueError(
        f"{what}reading a .pth file needs torch >= {need}, this is torch {version}: before torch {need} "
        f"torch.load(weights_only=True) can be made to run code from a crafted file ({_ADVISORY}). Convert it once on a machine with torch >= {need}: `python -m noisecraft "
        f"convert SRC.pth DST.safetensors`, and use the .safetensors file (safetensors files load on any "
        f"torch); or upgrade torch to >= {need}"
    )


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Return (flat tensors, safetensors metadata, 'pth' | 'safetensors'); never unpickles.

    A ``.pth`` (zip or legacy torch.save) is read only on torch >= :data:`PTH_MIN_TORCH`
    (:func:`check_torch_for_pth`). Missing: FileNotFoundError; a directory, an unreadable, empty,
    text, truncated or corrupt file: one ValueError naming the path and what was expected."""
    from .lora import read_safetensors

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such NPNet file; expected {_HELP_FILES} (ComfyUI folder models/npnet)")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected an NPNet file inside it: {_HELP_FILES}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ValueError(f"{path}: could not read it ({type(exc).__name__}: {exc.strerror or exc}); expected an "
                         f"NPNet file: check its permissions") from None
    if size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes); expected {_HELP_FILES}: download it again")
    # safetensors: u64 little-endian header length, then a JSON object
    if len(head) >= 9 and head[8:9] == b"{":
        tensors, metadata = read_safetensors(
            path, f"an NPNet checkpoint ({_HELP_FILES})",
            f"The file ({size} bytes) is truncated or corrupt: download it again.")
        return _flatten(tensors, str(path)), metadata, "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save zip archive, or legacy pickle
        check_torch_for_pth(path=path)
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
    text = all(32 <= c < 127 or c in (9, 10, 13) for c in head)
    raise ValueError(f"{path}: neither safetensors nor a PyTorch checkpoint ({'a text file, ' if text else ''}"
                     f"first bytes {head[:8]!r}, {size} bytes); expected {_HELP_FILES}: download it again")


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
    swin = _infer_swin(flat, source)
    # the attention's head count is not visible in shapes: the official 8 unless our metadata says otherwise
    try:
        return NPNetConfig(
            latent_channels=channels, latent_size=rows // a, text_width=lin[1] // tokens, tokens=tokens,
            svd_hidden=hidden, svd_mlp4_hidden=shape("unet_svd.mlp4.0.weight", 2)[0],
            svd_heads=_meta_int(metadata, "noisecraft.svd_heads", 8, source),
            swin_classes=shape("unet_embedding.swin.head.fc.weight", 2)[0], **swin)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc


def _infer_swin(flat: Mapping[str, torch.Tensor], source: str) -> dict:
    """The Swin branch's ``swin_*`` config fields from its tensor shapes (Swin-T for the official files).

    Patch size and width from the patch embedding, depths from the block count per stage, heads and
    window from each stage's relative-position bias table ((2 win - 1)^2 rows, one column per head;
    a window clipped to a small stage's map gives the largest one seen), the input size from the
    output grid (the ``upconv``'s input channels) times the patch size and one halving per stage."""
    pe = flat.get("unet_embedding.swin.patch_embed.proj.weight")
    up = flat.get("unet_embedding.upconv.weight")
    if pe is None or pe.ndim != 4 or up is None or up.ndim != 4:
        return {}  # the layout check names what is missing
    depths: dict[int, int] = {}
    heads: dict[int, int] = {}
    window = 1
    prefix = "unet_embedding.swin.layers."
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix):].split(".")
        if len(parts) >= 4 and parts[1] == "blocks" and parts[0].isdigit() and parts[2].isdigit():
            i, j = int(parts[0]), int(parts[2])
            depths[i] = max(depths.get(i, 0), j + 1)
            if parts[3:] == ["attn", "relative_position_bias_table"] and value.ndim == 2:
                heads[i] = int(value.shape[1])
                side = math.isqrt(int(value.shape[0]))
                window = max(window, (side + 1) // 2)
    stages = sorted(depths)
    if not stages or stages != list(range(len(stages))) or set(heads) != set(stages):
        return {}
    patch = int(pe.shape[-1])
    return {"swin_img_size": int(up.shape[1]) * patch * 2 ** (len(stages) - 1), "swin_patch": patch,
            "swin_embed_dim": int(pe.shape[0]), "swin_depths": tuple(depths[i] for i in stages),
            "swin_heads": tuple(heads[i] for i in stages), "swin_window": window}


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
    Raises ValueError (naming ``source``, what was expected and got) for anything else, including
    NaN/inf tensors (:class:`~noisecraft.ode.NonFiniteError`, naming them).
    """
    flat = _flatten(state, source)
    preset = _norm_preset(preset)
    cfg, name = _resolve_config(flat, metadata or {}, preset, source)
    _check_layout(flat, cfg, preset, source)
    check_tensors_finite(flat, source, fix="download the NPNet file again, or use another one")
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
    model's NPNet, another text width than the preset's, a LoRA or unrelated file, a directory, an
    empty, text, truncated or corrupt file, NaN/inf tensors (naming them), a ``.pth`` that would
    need unpickling, and any ``.pth`` on torch < 2.10 (:func:`check_torch_for_pth`);
    FileNotFoundError if it is absent.
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
    ``dst`` is written atomically (:mod:`noisecraft.io`); stale temp files of a killed conversion in
    its folder are removed first. A folder as ``dst`` or an unusable folder raises ``ValueError``.
    """
    import os

    from .io import atomic_path, clean_stale_temps, ensure_file_target
    from .weights import sha256_file

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src} " + ("is a folder" if src.is_dir() else "does not exist")
                                + ": expected an NPNet .pth or .safetensors file to convert")
    if os.path.isdir(dst):  # (no OSError for a name too long: ensure_file_target says that)
        raise ValueError(f"{dst} is a folder: the destination must be a file name, e.g. "
                         f"{dst / (src.stem + '.safetensors')}")
    ensure_file_target(dst, "the destination", create_parent=False)
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
    ensure_file_target(dst, "the destination")  # creates its folder
    clean_stale_temps(dst.parent)  # what a killed conversion into this folder left
    # our own temp file + os.replace (not whatever the safetensors version does), fsynced
    with atomic_path(dst) as tmp:
        save_npnet_safetensors(model, tmp, extra)
    logger.info("converted %s -> %s (preset %s)", src, dst, model.preset or "unknown")
    return dst


# -- golden noise at any size, long prompts, device-independent signs ---------------------------

RESOLUTION_POLICIES = ("residual", "resize", "native")
LONG_PROMPT_POLICIES = ("truncate", "chunks")


def _dct64(n: int) -> torch.Tensor:
    """Orthonormal DCT-II, [n, n] float64 on the CPU, row k = basis vector k (pixel centres (i + 0.5) / n)."""
    k = torch.arange(n, dtype=torch.float64, device="cpu").unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64, device="cpu").unsqueeze(0)
    d = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def _dct_matrix(n: int, device: Union[str, torch.device]) -> torch.Tensor:
    return _dct64(n).to(device=device, dtype=torch.float32)


def band_map(length: int, size: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """P [size, length]: the first min(size, length) DCT coefficients of a length-``length`` signal,
    put back as the same coefficients of a length-``size`` signal (orthonormal DCTs on both sides).

    P maps the same spatial frequency (cycles per image) to the same coefficient, with the
    variance-preserving (orthonormal) scale: rows orthonormal when size <= length (P P^T = I),
    columns orthonormal when size >= length (P^T P = I). P^T is the way back.
    """
    length = check_number(length, "band_map length", lo=1, integer=True, fix="a latent side of 1 pixel or more")
    size = check_number(size, "band_map size", lo=1, integer=True, fix="the NPNet's trained size, 1 or more")
    k = min(length, size)
    return (_dct64(size)[:k].T @ _dct64(length)[:k]).to(device=device, dtype=torch.float32)


def _fill_seed(item: torch.Tensor) -> int:
    """A deterministic seed from one noise item's values (so that the fill is a function of the noise)."""
    import hashlib

    data = item.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & ((1 << 63) - 1)


def to_trained_size(noise: torch.Tensor, size: int) -> torch.Tensor:
    """A [B, C, size, size] white unit-variance view of ``noise`` [B, C, H, W] (float32, noise's device).

    Per axis, the DCT band both sizes share is copied (``band_map``): along an axis longer than
    ``size`` this is an exact band-limited downsample with the variance-preserving factor (for
    i.i.d. N(0, 1) input the output is i.i.d. N(0, 1), not the 1/k variance of a k-pixel average),
    along a shorter axis the coefficients the input does not have are filled with fresh N(0, 1)
    values from a ``torch.Generator`` seeded by a hash of that item's noise (deterministic, and
    still exactly white). Nearest or bilinear resizing would duplicate or smooth values instead.
    At ``H = W = size`` it returns the noise itself (as float32).
    """
    b, c, h, w = noise.shape
    x = noise.float()
    if (h, w) == (size, size):
        return x
    dev = x.device
    ph, pw = band_map(h, size, dev), band_map(w, size, dev)
    out = ph @ x @ pw.T
    kh, kw = min(h, size), min(w, size)
    if kh < size or kw < size:
        d = _dct_matrix(size, dev)
        missing = torch.ones(size, size, dtype=torch.bool)
        missing[:kh, :kw] = False
        z = torch.stack([torch.randn(c, size, size, generator=torch.Generator().manual_seed(_fill_seed(noise[i])))
                         for i in range(b)])
        out = out + d.T @ (z * missing).to(dev) @ d
    return out


def from_trained_size(residual: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Carry a [B, C, S, S] residual back to [B, C, height, width]: ``P_h^T r P_w`` (``band_map``), the
    transpose of :func:`to_trained_size`'s copy, i.e. band-limited (DCT zero-pad / crop) resampling.

    The residual's DCT coefficients land on the same spatial frequencies with the same values, so the
    change stays the same number of standard deviations of the noise at every size (the per-pixel
    amplitude of a smooth change scales by S / H along each axis; that is what keeps the output a
    unit-variance noise). The result has no content above the shared band, so the input's higher
    frequencies pass through unchanged. Identity at ``height = width = S``.
    """
    s = residual.shape[-1]
    if (height, width) == (s, s):
        return residual
    dev = residual.device
    return band_map(height, s, dev).T @ residual @ band_map(width, s, dev)


def fit_prompt(prompt_embeds: torch.Tensor, tokens: int, long_prompt: str = "truncate") -> torch.Tensor:
    """[B, T, W] prompt -> [B, tokens, W] for an NPNet trained on ``tokens`` tokens.

    ComfyUI encodes a long prompt as 77-token chunks, concatenated: SDXL gives [B, 77 k, 2048].

    - ``"truncate"``: the first ``tokens`` tokens, i.e. the first chunk (what the official pipeline
      sees, its tokenizer truncates at 77, and what the peer ComfyUI packs do);
    - ``"chunks"``: the token-wise mean of the ``T / tokens`` chunks. NPNet reads the prompt only
      through one affine map (scale, shift) = linear(flatten(c)), so this is exactly the mean of
      the chunks' (scale, shift), every chunk weighted equally (a padded last chunk counts fully).
      T must be a multiple of ``tokens``.

    T = ``tokens`` is returned unchanged by both; T < ``tokens`` is refused.
    """
    if long_prompt not in LONG_PROMPT_POLICIES:
        raise ValueError(f"long_prompt: expected one of {LONG_PROMPT_POLICIES}, got {long_prompt!r}")
    if prompt_embeds.ndim != 3:
        raise ValueError(f"NPNet prompt_embeds: expected [B, T, width], got {list(prompt_embeds.shape)}; pass "
                         f"the conditioning tensor of a text encoder")
    b, t, w = prompt_embeds.shape
    if t == tokens:
        return prompt_embeds
    if t < tokens:
        raise ValueError(f"NPNet prompt_embeds: {t} tokens, this NPNet reads {tokens}; expected at least "
                         f"{tokens} (ComfyUI's CLIP conditioning always has a multiple of 77): use the "
                         f"conditioning of the text encoder this NPNet was trained for")
    if long_prompt == "truncate":
        return prompt_embeds[:, :tokens]
    if t % tokens:
        raise ValueError(f"NPNet long_prompt='chunks': {t} tokens is not a multiple of {tokens}; expected "
                         f"concatenated {tokens}-token chunks (ComfyUI's long-prompt encoding): use "
                         f"long_prompt='truncate' for this conditioning")
    return prompt_embeds.float().reshape(b, t // tokens, tokens, w).mean(dim=1)


def golden_noise(model: NPNet, noise: torch.Tensor, prompt_embeds: torch.Tensor, *, strength: float = 1.0,
                 resolution: str = "residual", long_prompt: str = "truncate",
                 canonical_signs: bool = True) -> torch.Tensor:
    """Golden noise at any latent size: ``noise`` [B, C, H, W] -> same shape, dtype and device.

    Args:
        model: an NPNet (trained size S = ``model.config.latent_size``, 128 for the official ones).
        noise: unit Gaussian noise (ComfyUI's NOISE output), any H, W, batch; C must be the NPNet's.
        prompt_embeds: [1 or B, T, width] text conditioning (one prompt for all, or one per item).
        strength: 0..1; 0 returns the noise unchanged without running the net, 1 is the net's change.
            The result is ``noise + strength * change`` (a lerp toward the net's output at size S).
        resolution: how sizes other than S x S are handled (at S x S all three are the official
            output, mixed with the noise by ``strength``):

            - ``"residual"`` (ours, default): ``x = to_trained_size(noise)`` (a white unit-variance
              S x S view: band-limited resampling, see :func:`to_trained_size`), residual
              ``r = npnet(x) - x`` at the trained size, carried back by band-limited resampling
              (:func:`from_trained_size`) and added to the *original* noise:
              ``out = noise + strength * from_trained_size(r)``. So ``out - from_trained_size(r)``
              is the input noise, the frequencies above the shared band are the input's, and where
              H, W >= S, ``to_trained_size(out) = npnet(x)`` exactly (strength 1): the net's output on
              the band it saw, untouched noise elsewhere.
            - ``"resize"`` (what the peer ComfyUI packs do): nearest-exact resize of the noise to S x S,
              npnet, nearest-exact resize back; duplicates and drops values (neighbour correlation).
            - ``"native"``: only S x S, anything else is refused.
        long_prompt: ``"truncate"`` or ``"chunks"`` for T > tokens, see :func:`fit_prompt`.
        canonical_signs: True (default) fixes the singular-vector signs before the SVD branch's MLPs
            (:func:`canonicalize_svd_signs`), so CPU (LAPACK) and GPU (cuSOLVER) give the same output
            up to float rounding. The official code feeds whatever signs its device's SVD returned:
            the official output is matched exactly only where those signs already satisfy the
            convention; elsewhere each flipped pair changes the predicted singular values (the
            benchmark reports by how much). False reproduces the official function on this device.

    Precision: the SVD always runs in float32; the rest in the module's dtype (``model.half()`` /
    ``.to(torch.bfloat16)`` if the caller wants that; float32 as loaded); resampling and the residual
    in float32 on the module's device. No autograd. The function is stateless: caching the module
    (and freeing it) is the caller's job.

    Choices (the paper and the official code only run 128x128, 77 tokens):

    - The S x S view is band-limited (orthonormal DCT crop / extension), because for i.i.d. N(0, 1)
      noise it is exactly i.i.d. N(0, 1) again, for any ratio: an area average of k pixels has
      variance 1/k (a sqrt(k) factor fixes that only for integer ratios), nearest resizing
      duplicates or drops values, bilinear smooths them (std 0.4-0.7 after resize-and-back, see
      the benchmark). Along an axis shorter than S no linear map of fewer values can be white, so
      the missing coefficients are fresh noise from a generator seeded by a hash of the item.
    - The carry-back is the transpose (variance-preserving): the net's change lands coefficient by
      coefficient on the same spatial frequencies with the same values, so it stays the same number
      of the noise's standard deviations at every size and the output stays unit-variance-like. An
      amplitude-preserving resize (bilinear) would keep instead the per-pixel size of a smooth change;
      the two differ by a factor sqrt(H W) / S: 1.03 at 96x160 and within a few % for SDXL's ~1 MP
      aspect buckets, 0.67 at 192x192, 2 at 64x64.
    - ``canonical_signs`` defaults to True: the official output is no reproducible target (it depends
      on the device's SVD signs, and the official inference leaves stochastic depth on, so it
      changes at every call), and a shared workflow should give the same noise on CPU and GPU. The
      canonical pattern is one of the sign patterns the SVD can return, as the ones the net saw in
      training (cuSOLVER's, which follow the algorithm, not the data); how strongly the trained
      MLPs react to signs cannot be measured without the official weights.
    - A long prompt defaults to ``"truncate"`` (the official tokenizer and the peer packs see only the
      first 77 tokens); ``"chunks"`` averages the chunks' modulation instead.
    """
    if resolution not in RESOLUTION_POLICIES:
        raise ValueError(f"golden_noise resolution: expected one of {RESOLUTION_POLICIES}, got {resolution!r}")
    if long_prompt not in LONG_PROMPT_POLICIES:
        raise ValueError(f"golden_noise long_prompt: expected one of {LONG_PROMPT_POLICIES}, got {long_prompt!r}")
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"golden_noise strength: expected a number in [0, 1], got {strength!r}") from None
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"golden_noise strength: expected a number in [0, 1] (0 = off, 1 = the net's output), "
                         f"got {strength}")
    if not isinstance(model, NPNet):
        raise TypeError(f"golden_noise model: expected an NPNet (load_npnet(path)), got {type(model).__name__}")
    cfg = model.config
    size = cfg.latent_size
    fix = "pass unit Gaussian noise (ComfyUI's NOISE output, e.g. RandomNoise) of the latent's shape"
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"golden_noise noise: expected a floating-point tensor [B, {cfg.latent_channels}, H, W], "
                        f"got {type(noise).__name__}; {fix}")
    if noise.ndim != 4 or noise.shape[1] != cfg.latent_channels:
        raise ValueError(f"golden_noise noise: expected [B, {cfg.latent_channels}, H, W] (this NPNet was trained "
                         f"for {cfg.latent_channels}-channel latents), got {list(noise.shape)}; use the NPNet "
                         f"trained for your model's latent")
    # before the SVD: NaN would end in LinAlgError, an integer tensor would come back as integers
    check_latent(noise, "golden_noise noise", ndim=4, fix=fix)
    check_latent(prompt_embeds, "golden_noise prompt_embeds", min_dim=1,
                 fix="the text encoder's conditioning is broken (check the model's precision and the CLIP input)")
    if strength == 0.0:
        return noise.clone()
    b, _, h, w = noise.shape
    native = (h, w) == (size, size)
    if resolution == "native" and not native:
        raise ValueError(f"golden_noise resolution='native': this NPNet runs at {size}x{size} latents only, got "
                         f"{h}x{w}; use resolution='residual' (any size) or a {size * 8}x{size * 8} image")
    prompt = fit_prompt(prompt_embeds, cfg.tokens, long_prompt)
    device = model.alpha.device
    with torch.no_grad():
        x = noise.to(device=device, dtype=torch.float32)
        if native:
            out = torch.lerp(x, model(x, prompt, canonical_signs=canonical_signs).float(), strength)
        elif resolution == "resize":
            small = F.interpolate(x, size=(size, size), mode="nearest-exact")
            back = F.interpolate(model(small, prompt, canonical_signs=canonical_signs).float(), size=(h, w),
                                 mode="nearest-exact")
            out = torch.lerp(x, back, strength)
        else:
            x_s = to_trained_size(x, size)
            r = model(x_s, prompt, canonical_signs=canonical_signs).float() - x_s
            out = x + strength * from_trained_size(r, h, w)
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise NonFiniteError(
            f"golden_noise: the NPNet (preset {model.preset or 'custom'}, dtype {model.alpha.dtype}) produced "
            f"{bad} NaN/inf value(s) from finite noise and prompt_embeds: its weights were changed after loading "
            f"or its precision overflows; reload the NPNet file in float32 (load_npnet)"
        )
    return out.to(device=noise.device, dtype=noise.dtype)


def random_npnet(config: Union[NPNetConfig, str] = "sdxl", seed: int = 0,
                 device: Union[str, torch.device] = "cpu", golden_scale: float = 0.1) -> NPNet:
    """An eval-mode NPNet with seeded random weights, for tests and benchmarks (NOT a trained model).

    Weights ~ N(0, 1 / fan_in), norms ~ 1, drawn from ``torch.Generator().manual_seed(seed)`` in
    ``state_dict`` order (the global RNG is not touched). ``golden_scale`` sets the size of the net's
    change, so that the output is noise plus a modest change as a trained NPNet's is: the text
    modulation's linear is scaled so that (scale, shift) have std ~``golden_scale`` for a
    unit-variance prompt, the SVD branch's last layer (the change of the singular values) by
    ``golden_scale``, ``alpha`` gives ``2 sigmoid(alpha) - 1 = golden_scale``, ``beta = golden_scale``.
    The module is built on the CPU (so the weights do not depend on ``device``) and then moved.
    """
    if isinstance(config, str):
        preset, cfg = _norm_preset(config), _preset_config(config)
    else:
        preset, cfg = None, config
    with torch.device("meta"):
        model = NPNet(cfg, preset=preset)
    model = model.to_empty(device="cpu")
    model._fill_buffers()
    g = torch.Generator().manual_seed(seed)
    p = min(max(golden_scale, 1e-6), 1 - 1e-6)
    with torch.no_grad():
        for key, t in model.state_dict().items():  # filled in place, in state_dict order
            shape, leaf = tuple(t.shape), key.rsplit(".", 1)[-1]
            if t.dtype != torch.float32:  # BatchNorm's counter
                t.zero_()
            elif leaf == "running_var":
                t.fill_(1.0)
            elif key == "alpha":
                t.fill_(math.log((1 + p) / (1 - p)))  # 2 sigmoid(alpha) - 1 = p
            elif key == "beta":
                t.fill_(float(golden_scale))
            elif len(shape) == 1:
                t.normal_(0.0, 0.02, generator=g)
                if leaf == "weight":  # LayerNorm / BatchNorm weights ~ 1, biases ~ 0
                    t.add_(1.0)
            else:
                std = 1.0 / math.sqrt(math.prod(shape[1:]))
                if key in (f"{_TEXT}.linear.weight", "unet_svd.mlp4.2.weight"):
                    std *= golden_scale
                t.normal_(0.0, std, generator=g)
    return model.to(device).eval()
