"""Swin-T for NPNet's residual branch, with timm's (>= 0.9.6) parameter names and shapes.

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie,
*Golden Noise for Diffusion Models: A Learning Framework*, arXiv:2411.09502 (2024), Sec. 3.2 and
App. A.4: NPNet's residual branch is timm's ``swin_tiny_patch4_window7_224`` (Swin Transformer:
Liu et al., arXiv:2103.14030). The official checkpoints store it in timm's >= 0.9.6 layout (patch
merging at the *start* of stages 1..3, 173 tensors with the ImageNet head, no
``relative_position_index`` or ``attn_mask``).

Our own module, not timm at run time: timm's layout changes broke the official loader for its
users (official repository issue #15), and ComfyUI does not ship timm. ``state_dict()`` equals
timm's key for key (tests/core/test_npnet.py checks names, shapes and the eval-mode output against
timm where timm is installed). Only ``forward_features`` is implemented, in eval-mode math: no
stochastic depth, no dropout, so the output is deterministic (the official inference leaves timm's
drop_path_rate 0.1 active; see :mod:`noisecraft.npnet`).

The derived constants (relative-position index, shifted-window mask) are non-persistent buffers;
after ``to_empty`` (building on the meta device) :meth:`SwinTransformer.fill_buffers` rebuilds them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SwinTransformer", "swin_tiny_patch4_window7_224"]


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

    def fill_buffers(self) -> None:
        """Rebuild the derived non-persistent buffers (after ``to_empty``), on the parameters' device."""
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
