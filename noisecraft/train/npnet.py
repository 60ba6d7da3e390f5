"""Training an NPNet on re-denoise pairs: MSE(npnet(x_T, c), x'_T), AdamW, resumable.

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie,
*Golden Noise for Diffusion Models: A Learning Framework*, arXiv:2411.09502 (2024), Sec. 3.2,
Alg. 2 (MSE between the predicted and the target noise), App. A.5 (batch 64, 30 epochs).

Choices (ours; the paper is silent or we differ on purpose):

* Per-sample prompts: every pair is trained with its own prompt embedding (the official training
  code uses one prompt for the whole batch; App. A.5 calls that a regulariser, we do not copy it).
* The NPNet is run with ``canonical_signs=True``, as :func:`noisecraft.npnet.golden_noise` runs it
  at inference by default, so the SVD branch's MLPs see the same sign convention in both.
* Initialisation from ``init_seed`` (no global RNG): the seeded weights of
  :func:`noisecraft.npnet.random_npnet`, then the three places where the net's change enters set
  to zero (the SVD branch's last layer, ``alpha``, ``beta``): the untrained net is the identity,
  so the loss starts at the pairs' own MSE(x_T, x'_T) (logged as ``identity_mse``) and every step
  has to earn its change.
* Data order: a pure function of ``(seed, epoch)`` over the kept pairs (:meth:`PairStore.batches`);
  nothing else is random, so the data position is the whole RNG state.
* The loop (AdamW, schedule, clipping, atomic checkpoints with exact resume: kill + resume equals an
  uninterrupted run bit for bit on CPU, tested; loss log and plot) is :mod:`noisecraft.train.loop`;
  this module is the method plugged into it (:class:`NPNetMethod`; the checkpoint holds the whole
  net). NPNet trains without accumulation and, by default, in float32 (``precision`` = ``fp32``, as it
  always has; ``auto`` / ``bf16`` / ``fp16`` autocast through the loop).
* The data is a :class:`PairStore`, a folder or one held in memory (:meth:`PairStore.in_memory`, what
  ComfyUI's Collect NPNet Pairs makes); ComfyUI's Train NPNet runs this same method in the same loop.
* Output ``npnet.safetensors``: the ``text_embedding.*`` flavour that :func:`noisecraft.npnet.load_npnet`
  reads strictly, with the same ``noisecraft.*`` shape metadata as ``save_npnet_safetensors`` plus
  the training settings, written byte-for-byte reproducibly.

Outputs in ``out_dir``: ``npnet.safetensors``, ``checkpoint.safetensors``, ``loss.jsonl``, ``loss.png``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from ..npnet import NPNet, NPNetConfig, random_npnet, save_npnet_safetensors
from .npnet_pairs import PairStore
from .loop import CHECKPOINT_NAME, LOG_NAME, PLOT_NAME, LoopConfig, TrainerResult, run

__all__ = ["NPNetTrainConfig", "NPNetTrainResult", "train_npnet", "init_npnet", "npnet_config_for",
           "save_trained_npnet", "pair_loss", "SMALL_NPNET", "CHECKPOINT_NAME", "NPNET_NAME", "LOG_NAME", "PLOT_NAME"]

logger = logging.getLogger(__name__)

NPNET_NAME = "npnet.safetensors"
# A small NPNet for small latents (the toy NPNet's shape): SVD MLPs 32/64 wide with 2 heads, and a
# 2-stage Swin at 32x32 input (patch 4, width 32, depths 2+2, heads 2+4, window 4), ~0.14M parameters
# at 8x8 latents instead of Swin-T's 28M. Pass as npnet_config_for(pairs, **SMALL_NPNET).
SMALL_NPNET = dict(svd_hidden=32, svd_mlp4_hidden=64, svd_heads=2, swin_classes=1, swin_img_size=32, swin_patch=4,
                   swin_embed_dim=32, swin_depths=(2, 2), swin_heads=(2, 4), swin_window=4)
_PAPER = "Golden Noise for Diffusion Models: A Learning Framework, arXiv:2411.09502"


@dataclass
class NPNetTrainConfig(LoopConfig):
    """The loop's settings (:class:`~noisecraft.train.loop.LoopConfig`, with NPNet's defaults; no gradient
    accumulation: ``grad_accum`` must stay 1 and is not recorded) and NPNet's own: the pair filter ``margin``,
    ``canonical_signs`` of the SVD branch and the weight-init seed."""

    steps: int = 600
    weight_decay: float = 0.01
    batch_size: int = 64
    precision: str = "fp32"  # auto | fp32 | bf16 | fp16 (the loop's autocast)
    checkpoint_every: int = 100
    margin: Optional[float] = None  # None: the stored kept flags; a number: re-filter by score margin
    canonical_signs: bool = True
    init_seed: int = 0  # weights

    def check(self) -> None:
        self.loop().check()
        if self.grad_accum != 1:
            raise ValueError(f"grad_accum is {self.grad_accum!r}, but NPNet training takes one micro-batch per step: "
                             "leave grad_accum at 1 and raise batch_size instead")
        if self.margin is not None and not math.isfinite(float(self.margin)):
            raise ValueError(f"margin must be a finite number or None (the stored kept flags), got {self.margin}: "
                             "with NaN no pair would be kept")

    def loop(self) -> LoopConfig:
        """The loop's part of these settings (no accumulation)."""
        return LoopConfig(**{k: getattr(self, k) for k in LoopConfig.__dataclass_fields__})

    def to_json(self) -> dict:
        d = asdict(self)
        del d["grad_accum"]  # always 1 (see the class docstring); not part of NPNet's recorded settings
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "NPNetTrainConfig":
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.9, 0.999)))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


_RESUME_KEYS = ("lr", "weight_decay", "betas", "warmup", "lr_schedule", "batch_size", "max_grad_norm", "precision",
                "margin", "canonical_signs", "seed", "init_seed")


@dataclass(kw_only=True)
class NPNetTrainResult(TrainerResult):
    model: NPNet
    npnet_path: Path
    interrupted: bool = False  # interrupt() said stop: a checkpoint was written at ``step``
    records: list = field(default_factory=list)  # the loss log (resumed steps included)


def _config_json(cfg: NPNetConfig) -> dict:
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v) for f in fields(cfg)}


def npnet_config_for(pairs: PairStore, **overrides) -> NPNetConfig:
    """An :class:`NPNetConfig` that fits a pair store: channels and size from its latents, tokens and
    text width from its prompt embeddings; everything else from ``overrides`` (else the defaults).
    The one shape rule for the CLI and ComfyUI's Train NPNet (``size`` small: ``**SMALL_NPNET``)."""
    c, h, w = pairs.shape
    if h != w:
        raise ValueError(f"NPNet trains on square latents; the pairs are {h}x{w}")
    _, tokens, width = pairs.embeds.shape
    return NPNetConfig(**{"latent_channels": c, "latent_size": h, "tokens": tokens, "text_width": width, **overrides})


def init_npnet(config: NPNetConfig, seed: int = 0) -> NPNet:
    """Seeded initial weights (no global RNG) with the identity as the initial function."""
    model = random_npnet(config, seed=seed, golden_scale=1.0)
    with torch.no_grad():
        model.unet_svd.mlp4[2].weight.zero_()
        model.unet_svd.mlp4[2].bias.zero_()
        model.alpha.zero_()
        model.beta.zero_()
    return model


def pair_loss(model: NPNet, pairs: PairStore, indices, canonical_signs: bool = True) -> tuple[float, float]:
    """(MSE of the net's output to the targets, MSE of the identity) over the pairs ``indices``."""
    b = pairs.get(indices)
    with torch.no_grad():
        out = model(b.e, pairs.embeds[b.cond], canonical_signs=canonical_signs)
    return float(F.mse_loss(out, b.target)), float(F.mse_loss(b.e, b.target))


def save_trained_npnet(model: NPNet, path: str | os.PathLike, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """The NPNet as safetensors (``text_embedding.*`` flavour, loads with ``load_npnet``), reproducibly:
    :func:`noisecraft.npnet.save_npnet_safetensors` (``metadata`` keys go under ``noisecraft.``)."""
    return save_npnet_safetensors(model, path, metadata)


class _KeptPairs:
    """The kept pairs of a store (``margin``: see :meth:`PairStore.kept_indices`) as a loop data source."""

    def __init__(self, pairs: PairStore, margin: Optional[float]):
        self.pairs, self.margin = pairs, margin

    def batches(self, batch_size: int, **position):
        return self.pairs.batches(batch_size, margin=self.margin, **position)


class NPNetMethod:
    """The NPNet step as a :class:`noisecraft.train.loop.Method`: MSE(npnet(x_T, c), x'_T), one prompt per pair."""

    kind = "npnet"
    state_prefix = "model"
    result_name = NPNET_NAME
    resume_keys = _RESUME_KEYS
    find_unused_parameters = True  # the SVD branch's BatchNorm is in the official layout but unused

    def __init__(self, model: NPNet, pairs: PairStore, config: NPNetTrainConfig, npnet_config: NPNetConfig,
                 device, metadata: Optional[Mapping[str, Any]] = None):
        self.module, self.pairs, self.config, self.npnet_config = model, pairs, config, npnet_config
        self.device = torch.device(device)
        with torch.inference_mode(False):  # a plain tensor even when built inside ComfyUI's inference mode
            self.embeds = pairs.embeds.to(self.device).clone()
        self.kept = int(pairs.kept_indices(config.margin).numel())
        self.extra = dict(metadata or {})
        self.plot_title = f"NPNet MSE to re-denoise targets ({pairs.meta.get('base_model', '?')})"

    def loss(self, batch):
        e, target = batch.e.to(self.device), batch.target.to(self.device)
        pred = self.module(e, self.embeds[batch.cond.to(self.device)], canonical_signs=self.config.canonical_signs)
        loss = F.mse_loss(pred, target)
        return loss, {"loss": float(loss.detach()), "identity_mse": float(F.mse_loss(e, target))}

    def settings(self) -> dict:
        return self.config.to_json()

    def settings_from(self, saved: Mapping[str, Any]) -> dict:
        return NPNetTrainConfig.from_json(saved).to_json()

    def identity(self) -> dict:
        return {"npnet_config": _config_json(self.npnet_config), "pairs": [self.pairs.total, self.kept]}

    def identity_error(self, saved: Mapping[str, Any]) -> str:
        return "was trained with another NPNet shape or other pairs: start a new folder"

    def record(self) -> dict:
        return {"alpha": float(self.module.alpha.detach()), "beta": float(self.module.beta.detach())}

    def finalize(self, out_dir: Path, records: list, meta: Mapping[str, Any]) -> Path:
        self.module.eval()
        full: dict[str, Any] = {
            "base_model": str(self.pairs.meta.get("base_model", "unknown")),
            "model_kind": str(self.pairs.meta.get("kind", "")),
            "training": {**self.config.to_json(), "pairs": self.pairs.meta, "pairs_total": self.pairs.total,
                         "pairs_kept": self.kept, "optimizer": "AdamW",
                         "loss": "MSE(npnet(x_T, c), x'_T), one prompt per pair", **dict(meta)},
        }
        full.update(self.extra)
        return save_trained_npnet(self.module, Path(out_dir) / NPNET_NAME, full)


def train_npnet(
    pairs: PairStore | str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Optional[NPNetTrainConfig] = None,
    npnet_config: Optional[NPNetConfig] = None,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    stop_after: Optional[int] = None,
    progress: Optional[Callable[[int, int, dict], None]] = None,
    interrupt: Optional[Callable[[], bool]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    accelerator=None,
    initial: Optional[NPNet] = None,
) -> NPNetTrainResult:
    """Train an NPNet on a complete pair folder with :func:`noisecraft.train.loop.run`; see the module docstring.

    Args:
        pairs: a :class:`PairStore` (or its folder, or one in memory); its prompt embeddings are the NPNet's
            text input.
        npnet_config: the net's shape; default :func:`npnet_config_for` (official-size SVD MLPs and
            Swin-T: give a smaller one for small models). Must fit the pairs' latents and embeddings.
        resume: continue from ``out_dir/checkpoint.safetensors`` (same settings except ``steps``);
            without it an existing checkpoint is an error.
        stop_after: stop once this step is done, without a checkpoint (like a kill): for tests.
        progress: ``progress(step, total, record)`` after each step; may raise to interrupt.
        interrupt: checked before each step; True stops with a checkpoint (``result.stopped_early`` and
            ``result.interrupted``).
        initial: fine-tune this net (trained in place: pass a copy to keep it) instead of starting from
            :func:`init_npnet`; its shape is the default ``npnet_config``. A resume loads the checkpoint's weights.
    """
    config = config or NPNetTrainConfig()
    config.check()
    pairs = pairs if isinstance(pairs, PairStore) else PairStore(pairs)
    npnet_config = npnet_config or (initial.config if initial is not None else npnet_config_for(pairs))
    want = npnet_config_for(pairs)
    if (npnet_config.latent_channels, npnet_config.latent_size, npnet_config.tokens, npnet_config.text_width) != \
            (want.latent_channels, want.latent_size, want.tokens, want.text_width):
        raise ValueError(
            f"the NPNet shape ({npnet_config.latent_channels}x{npnet_config.latent_size}x{npnet_config.latent_size} "
            f"latents, {npnet_config.tokens}x{npnet_config.text_width} text) does not fit the pairs "
            f"({want.latent_channels}x{want.latent_size}x{want.latent_size}, {want.tokens}x{want.text_width}): "
            "use npnet_config_for(pairs, ...)"
        )
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME
    if ckpt_path.is_file() and not resume:
        raise FileExistsError(f"{ckpt_path} exists: resume that run (resume=True / --resume) or choose another "
                              "output folder")
    if initial is not None:
        if initial.config != npnet_config:
            raise ValueError("the NPNet to fine-tune has another shape than npnet_config: give its own config")
        model = initial.to(device).float().train().requires_grad_(True)
    else:
        model = init_npnet(npnet_config, config.init_seed).to(device).train()
    method = NPNetMethod(model, pairs, config, npnet_config, device, metadata)
    res = run(method, _KeptPairs(pairs, config.margin), out_dir, config.loop(), resume=resume,
              accelerator=accelerator, device=device, progress=progress, interrupt=interrupt, stop_after=stop_after)
    model.eval()
    return NPNetTrainResult(model=model, npnet_path=Path(out_dir) / NPNET_NAME, step=res.step, losses=res.losses,
                            wall_s=res.wall_s, stopped_early=res.stopped_early, interrupted=res.interrupted,
                            records=res.records)
