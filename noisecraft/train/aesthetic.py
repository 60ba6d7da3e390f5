"""The LAION aesthetic score (the paper's filter): CLIP ViT-L/14 image embeddings -> the improved-aesthetic-predictor MLP.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), App. D.2.1: the teacher images
are kept by their "AES (Schuhmann, 2022)" score, the LAION improved aesthetic predictor: a 5-layer MLP on the
L2-normalised CLIP ViT-L/14 image embedding (768 numbers), trained on SAC + LOGOS + AVA (``sac+logos+ava1-l14-
linearMSE.pth``). Registered as the scorer ``aesthetic`` (:mod:`noisecraft.train.teacher_filter`), for the filter
(``--keep N --scorer aesthetic``) and for validation (``--scorer aesthetic``).

Package: ``transformers`` (``CLIPVisionModelWithProjection``): ComfyUI already installs it, so nothing new goes
next to ComfyUI (``open_clip`` would add a second CLIP implementation and its own dependencies;
``aesthetic-predictor-v2-5`` scores with a SigLIP model, not the paper's LAION predictor). Weights are never
downloaded here: the folder ``$NOISECRAFT_AESTHETIC`` (default ``~/.cache/noisecraft/aesthetic``) holds ``clip/``
(``openai/clip-vit-large-patch14`` in Hugging Face format, the full model or its vision part) and the head as
``head.safetensors`` or the LAION ``.pth`` (read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AestheticHead", "AestheticScorer", "aesthetic_folder", "load_aesthetic_scorer"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_NAMES = ("head.safetensors", "sac+logos+ava1-l14-linearMSE.pth")


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP (its ``layers.*`` state-dict names): 768 -> 1024 -> 128 -> 64 -> 16 -> 1,
    dropout between (inactive in eval mode), no activations (as published)."""

    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)


class AestheticScorer:
    """``score(images [n, 3, H, W] in [0, 1], cond_ids) -> [n]``: resize the short side to the CLIP size (bicubic),
    centre crop, normalise with CLIP's mean/std, the projected image embedding L2-normalised, the head."""

    name = "aesthetic"

    def __init__(self, clip: nn.Module, head: AestheticHead, image_size: int = 224):
        self.clip, self.head, self.size = clip.eval().requires_grad_(False), head.eval().requires_grad_(False), image_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, cond_ids=None) -> torch.Tensor:
        p = next(self.clip.parameters())
        x = torch.as_tensor(images).to(device=p.device, dtype=torch.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"the aesthetic scorer takes decoded images [n, 3, H, W] in [0, 1], got {tuple(x.shape)}: "
                             "decode the latents with the model's VAE first (--model DIR with a vae/ folder)")
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * s)), max(self.size, round(w * s))), mode="bicubic",
                          align_corners=False, antialias=True)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size].clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        emb = self.clip(pixel_values=((x - mean) / std).to(p.dtype)).image_embeds.float()
        emb = F.normalize(emb, dim=-1)
        return self.head.to(emb.device)(emb).reshape(-1).cpu()


def aesthetic_folder() -> Path:
    """Where the weights are looked for: ``$NOISECRAFT_AESTHETIC``, else ``~/.cache/noisecraft/aesthetic``."""
    return Path(os.environ.get("NOISECRAFT_AESTHETIC") or Path.home() / ".cache" / "noisecraft" / "aesthetic")


def load_aesthetic_scorer(folder: Optional[str | os.PathLike] = None, device: str = "cpu") -> AestheticScorer:
    """The scorer from ``folder`` (default :func:`aesthetic_folder`); refuses in one line when ``transformers`` or
    a weight file is missing, naming what to install or put where."""
    if importlib.util.find_spec("transformers") is None:
        raise ValueError("the aesthetic scorer needs the transformers package: pip install transformers")
    root = Path(folder) if folder is not None else aesthetic_folder()
    head_path = next((root / n for n in HEAD_NAMES if (root / n).is_file()), None)
    if not (root / "clip" / "config.json").is_file() or head_path is None:
        raise ValueError(f"the aesthetic scorer's weights are not in {root}: put openai/clip-vit-large-patch14 (Hugging "
                         f"Face format) in {root / 'clip'} and the LAION head as {root / HEAD_NAMES[0]} or "
                         f"{root / HEAD_NAMES[1]}, or set NOISECRAFT_AESTHETIC to the folder that holds them")
    from transformers import CLIPVisionModelWithProjection

    clip = CLIPVisionModelWithProjection.from_pretrained(str(root / "clip"), local_files_only=True).to(device)
    if head_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(head_path))
    else:
        state = torch.load(str(head_path), map_location="cpu", weights_only=True)
    head = AestheticHead(int(clip.config.projection_dim))
    head.load_state_dict(state, strict=True)
    return AestheticScorer(clip, head.to(device), int(clip.config.image_size))
