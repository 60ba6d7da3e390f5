"""NPNet, the noise prompt network, compatible with the official checkpoints.

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie,
*Golden Noise for Diffusion Models: A Learning Framework*, arXiv:2411.09502 (2024),
Sec. 3.2 (architecture, Eq. 6-9) and App. A.4 (model details). Official code:
github.com/xie-lab-ml/Golden-Noise-for-Diffusion-Models. Pure torch: no timm, no diffusers.

NPNet maps Gaussian noise [B, C, H, W] and a prompt embedding [B, tokens, width] to "golden" noise:
``svd(x) + (2 sigmoid(alpha) - 1) * t + beta * swin(x + t)`` with ``t`` the prompt's modulation of
the noise (the math, detail by detail, is in :mod:`noisecraft.npnet.model`).

The package:

- :mod:`.config`: :class:`NPNetConfig` (the shape of a net) and :data:`PRESETS` (the official ones);
- :mod:`.swin`: our Swin-T with timm's parameter names (eval-mode math, tested equal to timm);
- :mod:`.model`: :class:`NPNet` and its branches, :func:`canonicalize_svd_signs`,
  :func:`random_npnet` (seeded weights for tests and training);
- :mod:`.checkpoint`: :func:`load_npnet` (official ``.pth`` on torch >= 2.10, and both safetensors
  repacks, strictly), :func:`official_state_dict`, :func:`convert_pth_to_safetensors`, and the one
  writer of NPNet files, :func:`save_npnet_safetensors` (metadata: :func:`npnet_metadata`);
- :mod:`.golden`: :func:`golden_noise` (what the nodes call: any latent size, long prompts,
  device-independent signs, strength) and its resampling and prompt policies.

Everything public is importable from ``noisecraft.npnet`` (the nodes and users import it from here).
"""

from __future__ import annotations

from .checkpoint import (
    PTH_MIN_TORCH,
    check_torch_for_pth,
    convert_pth_to_safetensors,
    load_npnet,
    npnet_from_state_dict,
    npnet_metadata,
    official_state_dict,
    save_npnet_safetensors,
)
from .config import PRESETS, NPNetConfig
from .golden import (
    LONG_PROMPT_POLICIES,
    RESOLUTION_POLICIES,
    band_map,
    fit_prompt,
    from_trained_size,
    golden_noise,
    to_trained_size,
)
from .model import NPNet, canonicalize_svd_signs, random_npnet
from .swin import SwinTransformer, swin_tiny_patch4_window7_224

__all__ = [
    "NPNetConfig",
    "PRESETS",
    "NPNet",
    "SwinTransformer",
    "swin_tiny_patch4_window7_224",
    "load_npnet",
    "npnet_from_state_dict",
    "official_state_dict",
    "npnet_metadata",
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
