"""The shipped toy model: class-conditional 8x8 digits (scikit-learn's ``load_digits``).

A tiny diffusers ``UNet2DConditionModel`` (eps-prediction, SD's ``scaled_linear`` 1000-step
schedule) conditioned by cross-attention on one learned class token, trained with label dropout
to a null class so that classifier-free guidance works; and a small MLP digit classifier that
scores generated x0. Both are small enough to run many samples per second on one CPU thread, so
tests and demos can measure guidance, noise refinement and noise selection end to end.

Pixel scaling: ``x = pixel / 8 - 1`` (``load_digits`` values 0..16 -> [-1, 1]), one channel, 8x8.
The UNet takes any H, W but only 1 channel: a latent of another channel count is refused before
the network runs (:meth:`ToyModel.check_latent_shape`), naming ``--latent-shape 1 H W``.
Weights are safetensors in ``noisecraft/assets/`` (reproduce them with ``scripts/train_toy.py``).

For the trainers the toy is a host like any other: :func:`toy_host` is its
:class:`~noisecraft.hosts.diffusers.RefinerHost` (condition id = digit label) and
:func:`toy_confidence_scorer` its classifier as an NPNet pair keep-filter and as the teacher filter's
``toy-classifier`` scorer (:mod:`noisecraft.train.teacher_filter`; the CLI registers it: the toy's
"image" is its 8x8 x0 itself, no VAE). Only the demo, the CLI (``--toy``, ``--filter toy-classifier``,
``--keep``), ``scripts/``, ``benchmarks/`` and the tests use this
module; ``noisecraft.train`` and ``nodes/`` never import it.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from ..ode import check_number
from ..sigmas import ModelKind, SigmaTable
from .diffusers import DiffusersDenoiser, RefinerHost, check_latent_shape

__all__ = [
    "ASSETS",
    "UNET_WEIGHTS",
    "UNET_CONFIG",
    "CLASSIFIER_WEIGHTS",
    "ToyModel",
    "DigitClassifier",
    "load_toy",
    "load_classifier",
    "load_toy_refiner",
    "REFINER_WEIGHTS",
    "score_digits",
    "digit_confidence",
    "load_toy_npnet",
    "NPNET_WEIGHTS",
    "digits_to_x",
    "toy_host",
    "toy_confidence_scorer",
]

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # noisecraft/assets/
UNET_WEIGHTS = ASSETS / "toy_unet.safetensors"
UNET_CONFIG = ASSETS / "toy_unet_config.json"
CLASSIFIER_WEIGHTS = ASSETS / "toy_classifier.safetensors"
REFINER_WEIGHTS = ASSETS / "toy_refiner.safetensors"
NPNET_WEIGHTS = ASSETS / "toy_npnet.safetensors"

_REPRODUCE = "run `python scripts/train_toy.py` from the repository root to rebuild noisecraft/assets/"


def digits_to_x(pixels: torch.Tensor) -> torch.Tensor:
    """``load_digits`` pixels (0..16) -> model space [-1, 1]."""
    return pixels.to(torch.float32) / 8.0 - 1.0


def _need(path: Path) -> Path:
    if path.is_dir():
        raise ValueError(f"toy model file {path} is a directory, expected a file: {_REPRODUCE}")
    if not path.is_file():
        raise FileNotFoundError(f"toy model file {path} is missing: {_REPRODUCE}")
    return path


@dataclass
class ToyModel:
    """The loaded toy model. ``unet`` and ``embedding`` are frozen (``requires_grad=False``) and
    in eval mode; gradients still flow through them to the latent."""

    unet: nn.Module
    embedding: nn.Embedding
    table: SigmaTable
    num_classes: int
    null_class: int
    latent_shape: tuple[int, int, int]

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def cond(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels [B] (0..9, or ``null_class`` for unconditional) -> states [B, 1, D]."""
        labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.null_class):
            raise ValueError(
                f"labels must lie in 0..{self.num_classes - 1} (or {self.null_class} for the null class), "
                f"got {labels.tolist()}"
            )
        return self.embedding(labels)[:, None, :]

    def uncond(self, batch: int = 1) -> torch.Tensor:
        """The null-class states [batch, 1, D]."""
        return self.cond(torch.full((batch,), self.null_class, dtype=torch.long))

    def denoiser(self, labels: torch.Tensor, cfg: float = 1.0) -> DiffusersDenoiser:
        """``D(x, sigma)`` for these labels; ``cfg != 1`` guides against the null class."""
        cond = self.cond(labels)
        uncond = self.uncond(1) if float(cfg) != 1.0 else None
        return DiffusersDenoiser(self.unet, self.table, cond, uncond, cfg=cfg)

    def check_latent_shape(self, shape, what: str = "the latent") -> None:
        """Raise ValueError if a latent of ``shape`` ([B, C, H, W] or [C, H, W]) does not fit the toy
        UNet: it takes 1 channel (any H, W >= 1); the message names the CLI's ``--latent-shape C H W``.
        Every :meth:`denoiser` call checks this too (shapes only, no sync)."""
        check_latent_shape(self.unet, shape, what)

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Unit Gaussian noise [batch, C, H, W] on the CPU (ComfyUI's NOISE convention)."""
        batch = check_number(batch, "ToyModel.noise batch", lo=1, integer=True, fix="the number of samples, >= 1")
        return torch.randn((batch, *self.latent_shape), generator=generator, dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def _read_config() -> dict:
    with open(_need(UNET_CONFIG), "r", encoding="utf-8") as f:
        return json.load(f)


def load_toy(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ToyModel:
    """Load the toy diffusion model from ``noisecraft/assets/`` (safetensors only)."""
    from diffusers import UNet2DConditionModel

    config = dict(_read_config())
    toy = config.get("_noisecraft_toy", {})
    unet = UNet2DConditionModel.from_config(config)
    state = load_file(str(_need(UNET_WEIGHTS)), device="cpu")
    emb_w = state.pop("class_embedding.weight", None)
    if emb_w is None:
        raise ValueError(f"{UNET_WEIGHTS} has no 'class_embedding.weight': {_REPRODUCE}")
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    missing, unexpected = unet.load_state_dict(unet_state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{UNET_WEIGHTS} does not match {UNET_CONFIG}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            + _REPRODUCE
        )
    embedding = nn.Embedding(emb_w.shape[0], emb_w.shape[1])
    embedding.weight.data.copy_(emb_w)
    for m in (unet, embedding):
        m.to(device=device)
        if dtype != torch.float32:
            m.to(dtype=dtype)
        m.eval().requires_grad_(False)
    num_classes = int(toy.get("num_classes", emb_w.shape[0] - 1))
    c = int(config["in_channels"])
    s = int(config["sample_size"])
    return ToyModel(
        unet=unet,
        embedding=embedding,
        table=SigmaTable.scaled_linear(ModelKind(toy.get("prediction", "eps"))),
        num_classes=num_classes,
        null_class=int(toy.get("null_class", num_classes)),
        latent_shape=(c, s, s),
    )


def load_toy_refiner(model: ToyModel | None = None, path: str | Path | None = None):
    """Put the shipped NoiseRefine refiner LoRA on the toy UNet (a peft adapter, so peft must be
    installed: the ``dev``/``train`` extras); returns ``(model, lora)``.

    ``lora`` is a :class:`noisecraft.hosts.adapters.LoRASet` (enabled); use ``lora.base_and_lora(denoiser)``
    with :func:`noisecraft.refine.refine_noise`, and ``lora.disabled()`` for plain sampling.
    Made by ``scripts/train_toy_refiner.py`` (MSD, teacher cfg 3 / 20 steps, student cfg 1 / 10 steps).
    """
    from .adapters import load_lora

    model = model or load_toy()
    path = Path(path) if path is not None else REFINER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"toy refiner {path} is missing: run `python scripts/train_toy_refiner.py` from the repository root"
        )
    return model, load_lora(model.unet, path)


def load_toy_npnet(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """The shipped toy NPNet (``noisecraft/assets/toy_npnet.safetensors``), eval mode.

    A small NPNet (1 channel, 8x8, one 32-wide class token, a 2-stage Swin at 32x32) trained by
    ``scripts/train_toy_npnet.py`` on re-denoise pairs of this toy model (w_l 3, w_w 1). Use it with
    :func:`noisecraft.npnet.golden_noise` and ``ToyModel.cond(labels)`` as the prompt.
    """
    from ..npnet import load_npnet

    path = Path(path) if path is not None else NPNET_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"toy NPNet {path} is missing: run `python scripts/train_toy_npnet.py` from the repository root"
        )
    return load_npnet(path, device=device)


class DigitClassifier(nn.Module):
    """MLP on flattened [-1, 1] digits: Linear-GELU blocks, then a 10-way head (logits)."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (256, 256), num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1).clamp(-1.0, 1.0))


def load_classifier(device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """The digit classifier: ``x0`` [B, 1, 8, 8] (model space) -> class probabilities [B, 10].

    Inputs are clamped to [-1, 1]. Runs under the caller's grad mode (weights are frozen).
    """
    state = load_file(str(_need(CLASSIFIER_WEIGHTS)), device="cpu")
    linears = sorted({int(k.split(".")[1]) for k in state if k.startswith("net.") and k.endswith(".weight")})
    shapes = [tuple(state[f"net.{i}.weight"].shape) for i in linears]
    model = DigitClassifier(shapes[0][1], tuple(s[0] for s in shapes[:-1]), shapes[-1][0])
    model.load_state_dict(state, strict=True)
    model.to(device).eval().requires_grad_(False)
    in_features = shapes[0][1]

    def classify(x0: torch.Tensor) -> torch.Tensor:
        if x0[0].numel() != in_features:
            raise ValueError(f"the digit classifier takes [B, 1, 8, 8] x0 ({in_features} values each), got {tuple(x0.shape)}")
        dev = next(model.parameters()).device
        return model(x0.to(device=dev, dtype=torch.float32)).softmax(dim=-1)

    classify.model = model  # type: ignore[attr-defined]
    return classify


@functools.lru_cache(maxsize=4)
def _cached_classifier(device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return load_classifier(device)


@torch.no_grad()
def digit_confidence(x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample classifier probability of the target class, [B] float32 on the CPU."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.numel() != x0.shape[0]:
        raise ValueError(f"need one label per sample: {x0.shape[0]} samples, {labels.numel()} labels")
    probs = _cached_classifier(str(x0.device))(x0)
    return probs.gather(1, labels.to(probs.device)[:, None]).squeeze(1).float().cpu()


@torch.no_grad()
def score_digits(x0: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Classifier accuracy and confidence (mean probability of the target class) of x0."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.numel() != x0.shape[0]:
        raise ValueError(f"need one label per sample: {x0.shape[0]} samples, {labels.numel()} labels")
    probs = _cached_classifier(str(x0.device))(x0)
    labels = labels.to(probs.device)
    return {
        "accuracy": float((probs.argmax(-1) == labels).float().mean()),
        "confidence": float(probs.gather(1, labels[:, None]).mean()),
    }


# -- the toy for the trainers --------------------------------------------------------------------


def toy_host(toy: ToyModel | None = None) -> RefinerHost:
    """The shipped toy model as a host: condition id = digit label (0..9), uncond = null class."""
    toy = toy or load_toy()
    with torch.no_grad():
        conds = toy.cond(torch.arange(toy.num_classes)).detach()
        uncond = toy.uncond(1).detach()
    return RefinerHost(toy.unet, toy.table, conds, uncond, base_model="noisecraft-toy-digits-8x8",
                       cond_labels=list(range(toy.num_classes)))


def toy_confidence_scorer() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The shipped toy digit classifier's probability of the target class, per sample (no download):
    a scorer ``score(x0, cond_ids) -> [B]`` for :func:`noisecraft.train.collect_pairs` and for the teacher
    filter (:func:`noisecraft.train.teacher_filter.filter_teacher_cache`, as ``toy-classifier``).

    Condition id = digit label (as :func:`toy_host` numbers them)."""

    def score(x0: torch.Tensor, cond_ids: torch.Tensor) -> torch.Tensor:
        return digit_confidence(x0, cond_ids)

    score.name = "toy-classifier-confidence"  # type: ignore[attr-defined]
    return score
