"""NPNet's modules with the official parameter layout: the SVD branch, the Swin-T residual branch, the
text modulation, and :class:`NPNet` itself; :func:`canonicalize_svd_signs`; :func:`random_npnet`.

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
the golden noise changes at every call. Our Swin-T (:mod:`noisecraft.npnet.swin`) has no
stochastic depth at all: it always computes what the official modules compute in eval mode
(dropout rates are 0 everywhere, the BatchNorm is unused), so two calls on the same input give the
same output. ``NPNet.forward`` feeds the singular vectors with the signs ``torch.linalg.svd``
returns on the device (LAPACK and cuSOLVER may differ and the MLPs see the signs): that is the
official function; ``canonical_signs=True`` (:func:`canonicalize_svd_signs`, what
:func:`noisecraft.npnet.golden_noise` uses by default) makes it device-independent.

:func:`random_npnet` gives seeded random weights (no global RNG) for tests, benchmarks and the
trainer's initialisation; it is not a trained model.

The SVD always runs in float32; the rest in the module's dtype (float32 as loaded; a caller may
``.half()`` or ``.to(torch.bfloat16)`` the module). Everything here is stateless per call. Bad
input is refused naming its source (:mod:`noisecraft.ode`'s boundary checks): noise that is not
floating point or not finite (before the SVD), a non-finite prompt embedding (``prompt_embeds``).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ode import check_latent
from .config import NPNetConfig, normalize_preset, preset_config
from .swin import SwinTransformer

__all__ = ["NPNet", "canonicalize_svd_signs", "random_npnet"]


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
    ``text_embedding``; :func:`~noisecraft.npnet.official_state_dict` gives the nested official
    dict. Build one from a file with :func:`~noisecraft.npnet.load_npnet`. Constructing
    ``NPNet(config)`` directly initialises weights with torch's default initialisers (the global
    RNG); loading does not touch any RNG.
    """

    def __init__(self, config: Union[NPNetConfig, str] = "sdxl", preset: Optional[str] = None):
        super().__init__()
        if isinstance(config, str):
            preset, config = normalize_preset(config), preset_config(config)
        self.config = config
        self.preset = preset
        self.unet_embedding = _SwinBranch(config)
        self.unet_svd = _SVDBranch(config)
        self.text_embedding = _TextModulation(config)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def fill_buffers(self) -> None:
        """Rebuild the Swin branch's derived non-persistent buffers (after ``to_empty``)."""
        self.unet_embedding.swin.fill_buffers()

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
        result independent of the SVD implementation (see :func:`~noisecraft.npnet.golden_noise`).
        """
        self._check_inputs(noise, prompt_embeds)
        dtype, device = self.alpha.dtype, self.alpha.device
        x = noise.to(device=device, dtype=dtype)
        t = self.text_modulation(x, prompt_embeds)
        out = self.unet_svd(x, canonical_signs=canonical_signs) + (2 * torch.sigmoid(self.alpha) - 1) * t
        out = out + self.beta * self.unet_embedding(x + t)
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
        preset, cfg = normalize_preset(config), preset_config(config)
    else:
        preset, cfg = None, config
    with torch.device("meta"):
        model = NPNet(cfg, preset=preset)
    model = model.to_empty(device="cpu")
    model.fill_buffers()
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
                if key in ("text_embedding.linear.weight", "unet_svd.mlp4.2.weight"):
                    std *= golden_scale
                t.normal_(0.0, std, generator=g)
    return model.to(device).eval()
