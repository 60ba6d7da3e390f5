"""Golden noise as the nodes use it: :func:`golden_noise` at any latent size, long prompts, one
prompt per batch item, device-independent signs and a strength; the band-limited resampling it
uses (:func:`band_map`, :func:`to_trained_size`, :func:`from_trained_size`) and the long-prompt
policies (:func:`fit_prompt`).

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie,
*Golden Noise for Diffusion Models: A Learning Framework*, arXiv:2411.09502 (2024). The paper and
the official code run NPNet only on 128x128 latents with 77-token prompts.

Beyond the official code, :func:`golden_noise` adds:

- any latent size and aspect ratio (``resolution="residual"``): the net runs at its trained size on
  a band-limited, still white, unit-variance view of the noise, and only its *change* is carried
  back (band-limited) and added to the original noise, whose higher frequencies stay untouched;
  the peers' resize-to-128-and-back is available as ``"resize"``, and ``"native"`` refuses other
  sizes (benchmarks/bench_npnet_resolution.py measures the statistics);
- prompts longer than 77 tokens (``long_prompt="truncate"`` or ``"chunks"``, :func:`fit_prompt`)
  and one prompt per batch item;
- device-independent output: ``canonical_signs=True`` fixes the sign of each singular pair
  (:func:`noisecraft.npnet.canonicalize_svd_signs`) before the MLPs;
- a ``strength`` (0 = off, 1 = the net's output).

The choices and their reasons are in :func:`golden_noise`'s docstring. Bad input is refused naming
its source (:mod:`noisecraft.ode`'s boundary checks): noise that is not floating point, empty
(B = 0, a 0x0 latent) or not finite, a non-finite prompt embedding, and a non-finite result.
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F

from ..ode import check_finite, check_latent, check_number
from .model import NPNet

__all__ = ["RESOLUTION_POLICIES", "LONG_PROMPT_POLICIES", "golden_noise", "fit_prompt", "to_trained_size",
           "from_trained_size", "band_map"]

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
            (:func:`~noisecraft.npnet.canonicalize_svd_signs`), so CPU (LAPACK) and GPU (cuSOLVER)
            give the same output up to float rounding. The official code feeds whatever signs its device's SVD returned:
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
    check_finite(out, f"golden_noise: what the NPNet (preset {model.preset or 'custom'}, dtype {model.alpha.dtype}) "
                      f"produced from finite noise and prompt_embeds",
                 "its weights were changed after loading or its precision overflows; reload the NPNet file in "
                 "float32 (load_npnet)")
    return out.to(device=noise.device, dtype=noise.dtype)

