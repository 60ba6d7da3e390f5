"""``D(x, sigma) -> x0`` over a diffusers ``UNet2DConditionModel`` or SD3-class transformer (CLI, tests, training).

The adapter follows ComfyUI's conventions exactly (see :mod:`noisecraft.sigmas`), so an
algorithm written against a denoiser behaves the same here and inside ComfyUI:

* eps and v models: the network sees ``x / sqrt(sigma**2 + 1)`` at the *discrete* timestep
  nearest to ``sigma`` in log-sigma (``SigmaTable.timestep``, ComfyUI's ``model_sampling``);
  eps: ``x0 = x - sigma * eps``; v: ``x0 = x / (sigma**2 + 1) - v * sigma / sqrt(sigma**2 + 1)``.
* flow models: the network sees ``x`` at timestep ``sigma * multiplier``; ``x0 = x - sigma * out``.
* the network call dispatches on its type (:meth:`DiffusersDenoiser.predict`): a UNet gets
  ``unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=...)`` (SDXL: ``text_embeds`` and
  ``time_ids``); an SD3-class transformer (a forward taking ``pooled_projections``) gets
  ``(hidden_states, encoder_hidden_states, pooled_projections, timestep)``, ``pooled_projections`` taken
  from the added conditioning. So guidance built on ``predict`` (PAG, ...) serves every family.
* classifier-free guidance (``cfg != 1``): cond and uncond run in ONE batched forward of 2B and
  combine as ``uncond + cfg * (cond - uncond)`` on the x0 prediction (the same as on eps, the
  map being affine with equal coefficients for both halves).

The adapter runs under the caller's grad mode (gradients flow to ``x`` and to any trainable
weights, e.g. a LoRA) and counts model passes per sample in :attr:`DiffusersDenoiser.passes`.

The latent is checked against the model's config before the network runs
(:func:`check_latent_shape`): its channel count must be the config's ``in_channels``, and where the
network patchifies (a ``patch_size`` in the config, SD3-class transformers) height and width must
be multiples of it (a ``UNet2DConditionModel`` takes any size: it upsamples to the skip
connections' sizes). The message says what the model expects and that the CLI's
``--latent-shape C H W`` sets the latent. The check reads shapes only (no device sync).

For the trainers (:mod:`noisecraft.train`) a model is a :class:`RefinerHost`: the module that takes
the refiner LoRA (a peft adapter, :func:`noisecraft.hosts.adapters.attach_lora`), its sigma table, and a bank of
condition embeddings indexed by condition id.
:func:`diffusers_host` builds one from a local diffusers folder or a single-file checkpoint with a local
config, for every family of :mod:`noisecraft.hosts.families` (SD1.x, SD2.x, SDXL, SD3-class), encoding the
prompts as the family's pipeline does (needs ``transformers``) or reading them precomputed from a
safetensors file; :mod:`noisecraft.hosts.toy` builds one for the shipped toy model.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..lora import DEFAULT_TARGETS, TRANSFORMER_TARGETS
from ..sigmas import ModelKind, SigmaTable
from .families import same_token_count, takes_pooled_projections

__all__ = [
    "DiffusersDenoiser",
    "sigma_table_from_scheduler",
    "alphas_cumprod_from_config",
    "latent_requirements",
    "check_latent_shape",
    "RefinerHost",
    "diffusers_host",
]

logger = logging.getLogger(__name__)

# ComfyUI's ModelSamplingDiscrete floor for zero-terminal-SNR schedules (alphas_cumprod[-1] == 0).
ZSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _config_int(config: Any, key: str) -> Optional[int]:
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def latent_requirements(unet: Any) -> dict[str, Optional[int]]:
    """What a diffusers network needs of its latent, from its ``config``: ``channels``
    (``in_channels``), ``multiple`` (H and W must be multiples of it: the ``patch_size`` of a
    patchifying transformer, else 1) and ``sample_size`` (its native latent size, for messages).
    Values the config does not give are None (channels) or 1 (multiple)."""
    config = getattr(unet, "config", None)
    if config is None:
        return {"channels": None, "multiple": 1, "sample_size": None}
    return {"channels": _config_int(config, "in_channels"), "multiple": _config_int(config, "patch_size") or 1,
            "sample_size": _config_int(config, "sample_size")}


def check_latent_shape(unet: Any, shape, what: str = "the latent", *, batched: Optional[bool] = None) -> None:
    """Raise ValueError if a latent of ``shape`` does not fit ``unet``.

    ``shape`` is a batch [B, C, ...] (``batched=True``), or one latent [C, H, W]
    (``batched=False``, e.g. the CLI's ``--latent-shape``); by default 4 or more sizes are a batch.
    Checks that no size is 0, the channel count against the config's ``in_channels``, and H, W
    against a ``patch_size``; the message says what the model expects and that the CLI's
    ``--latent-shape C H W`` sets it. Shapes only: no tensor is touched."""
    dims = [int(v) for v in shape]
    batched = len(dims) >= 4 if batched is None else batched
    item = dims[1:] if batched else dims
    req = latent_requirements(unet)
    ch, mult, size = req["channels"], req["multiple"], req["sample_size"]
    name = type(unet).__name__
    default = (f"; leave --latent-shape out for the model's own {ch}x{size}x{size}" if ch and size else "")
    if not item or any(v < 1 for v in dims):
        raise ValueError(f"{what} has shape {dims}: expected [B, C, H, W] with every size >= 1 (a batch of at "
                         f"least one latent with {ch or 'C'} channel(s); the CLI's --latent-shape C H W sets C, H, "
                         f"W){default}")
    c = item[0]
    h, w = (item[-2], item[-1]) if len(item) >= 3 else (None, None)
    if ch is not None and c != ch:
        eg = f"{ch} {h} {w}" if h is not None else f"{ch} H W"
        raise ValueError(
            f"{what} has {c} channels (shape {dims}) but this model ({name}, config in_channels = {ch}) takes "
            f"{ch}-channel latents: make the latent [B, {ch}, H, W] (the CLI's --latent-shape C H W sets it, e.g. "
            f"--latent-shape {eg}){default}"
        )
    if mult > 1 and h is not None and (h % mult or w % mult):
        raise ValueError(
            f"{what} is {h}x{w} (shape {dims}) but this model ({name}, config patch_size = {mult}) needs height and "
            f"width that are multiples of {mult}: e.g. --latent-shape {c} {max(mult, h - h % mult)} "
            f"{max(mult, w - w % mult)} (the CLI's --latent-shape C H W){default}"
        )


def _batch(t: Optional[torch.Tensor], b: int, name: str) -> Optional[torch.Tensor]:
    if t is None:
        return None
    n = t.shape[0]
    if n == b:
        return t
    if n == 1:
        return t.expand(b, *t.shape[1:])
    if n > 0 and b % n == 0:  # tile like ComfyUI: sample j * n + i gets condition i
        return t.repeat(b // n, *([1] * (t.ndim - 1)))
    raise ValueError(
        f"{name} has batch {n} but the latent batch is {b}: pass a {name} of batch 1 "
        f"(shared by every sample) or a batch that divides {b} (it is tiled)"
    )


def _batch_kwargs(kw: Optional[Mapping[str, torch.Tensor]], b: int, name: str) -> Optional[dict]:
    if kw is None:
        return None
    return {k: _batch(v, b, f"{name}[{k!r}]") for k, v in kw.items()}


def _lcm_ratio(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many times the shorter of two token-state batches repeats to reach their common token count (ComfyUI
    batches cond with uncond that way up to 4, ``CONDCrossAttn.can_concat``; beyond, in two forwards)."""
    la, lb = int(a.shape[1]), int(b.shape[1])
    return math.lcm(la, lb) // min(la, lb)


def _to(t: Optional[torch.Tensor], device, dtype) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


class DiffusersDenoiser:
    """A sigma-space denoiser over a diffusers UNet (any callable ``unet(sample, timestep,
    encoder_hidden_states=..., return_dict=False)`` returning the prediction first) or an SD3-class
    transformer (a forward taking ``pooled_projections``: pass them as ``added_cond_kwargs``).

    Args:
        unet: the network (``UNet2DConditionModel`` or compatible, e.g. with a peft adapter).
        table: the model's :class:`~noisecraft.sigmas.SigmaTable`; ``table.kind`` (eps, v, flow)
            chooses the parameterization. See :func:`sigma_table_from_scheduler`.
        cond: ``encoder_hidden_states`` [n, L, D]. A batch n that divides the latent batch B is
            tiled like ComfyUI does (sample ``j * n + i`` gets condition ``i``; n = 1 broadcasts),
            so m candidates per item laid out candidate-major line up with a condition of batch n.
        uncond: the unconditional states, same shape rules; required when ``cfg != 1``.
        cfg: guidance scale; 1 means unguided (one pass per call, ``uncond`` unused).
        added_cond_kwargs / uncond_added_cond_kwargs: optional extra conditioning
            (SDXL ``text_embeds`` / ``time_ids``, SD3 ``pooled_projections``), same batch rules as ``cond``.

    Calling ``D(x, sigma)`` with ``x`` [B, C, H, W] (any C, H, W) and ``sigma`` [B] (or a scalar)
    returns x0 in ``x``'s dtype. The network runs in the unet's own dtype and device.
    ``passes`` counts model passes per sample (2 per guided call, 1 per unguided call,
    independent of the batch size); :meth:`reset_passes` zeroes it.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        table: SigmaTable,
        cond: torch.Tensor,
        uncond: Optional[torch.Tensor] = None,
        cfg: float = 1.0,
        *,
        added_cond_kwargs: Optional[Mapping[str, torch.Tensor]] = None,
        uncond_added_cond_kwargs: Optional[Mapping[str, torch.Tensor]] = None,
    ):
        if not isinstance(table, SigmaTable):
            raise TypeError(
                f"table must be a noisecraft.sigmas.SigmaTable, got {type(table).__name__}: build one "
                "with sigma_table_from_scheduler(pipe.scheduler)"
            )
        if cond is None or cond.ndim != 3:
            raise ValueError(
                "cond must be encoder_hidden_states of shape [batch, tokens, width], got "
                f"{None if cond is None else tuple(cond.shape)}"
            )
        if uncond is not None and uncond.ndim != 3:
            raise ValueError(f"uncond must have shape [batch, tokens, width], got {tuple(uncond.shape)}")
        self.unet = unet
        self.table = table
        self.cond = cond
        self.uncond = uncond
        self.added_cond_kwargs = dict(added_cond_kwargs) if added_cond_kwargs is not None else None
        self.uncond_added_cond_kwargs = (
            dict(uncond_added_cond_kwargs) if uncond_added_cond_kwargs is not None else self.added_cond_kwargs
        )
        self.cfg = cfg
        self.passes = 0
        self._checked_shape: Optional[tuple] = None
        self._transformer = takes_pooled_projections(unet)

    @property
    def cfg(self) -> float:
        return self._cfg

    @cfg.setter
    def cfg(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"cfg must be a finite number, got {value}")
        if value != 1.0 and self.uncond is None:
            raise ValueError(
                f"cfg={value} needs an unconditional embedding: pass uncond=..., or use cfg=1.0 "
                "for unguided sampling"
            )
        self._cfg = value

    @property
    def kind(self) -> ModelKind:
        return self.table.kind

    @property
    def guided(self) -> bool:
        return self._cfg != 1.0

    def reset_passes(self) -> None:
        self.passes = 0

    # -- the network call (public: a guidance that adds passes, e.g. PAG, builds on these) ------------
    def predict(self, xin: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor, added: Optional[dict]) -> torch.Tensor:
        """One forward of the network on prepared inputs (:meth:`inputs`): its raw prediction (eps, v or
        velocity), checked to have the latent's shape."""
        if self._transformer:  # SD3-class: forward(hidden_states, encoder_hidden_states, pooled_projections, timestep)
            pooled = (added or {}).get("pooled_projections")
            if pooled is None:
                raise ValueError(f"{type(self.unet).__name__} needs pooled_projections: pass added_cond_kwargs="
                                 "{'pooled_projections': [B, W]} (the CLIPs' pooled text embeddings)")
            out = self.unet(hidden_states=xin, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=t,
                            return_dict=False)
        else:
            kwargs: dict[str, Any] = {"encoder_hidden_states": ehs, "return_dict": False}
            if added is not None:
                kwargs["added_cond_kwargs"] = added
            out = self.unet(xin, t, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif hasattr(out, "sample"):
            out = out.sample
        c = xin.shape[1]
        if out.shape[1] == 2 * c:  # learned variance (e.g. DeepFloyd IF): keep the mean prediction
            out = out[:, :c]
        if out.shape != xin.shape:
            raise ValueError(
                f"the network returned shape {tuple(out.shape)} for input {tuple(xin.shape)}: "
                "expected a prediction of the latent's shape"
            )
        return out

    def inputs(self, x: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(xf, s, xin, t)`` for a call at ``(x, sigma)``: the latent in float32 on the network's device,
        sigma broadcastable to it, the network's input (in its dtype) and timestep (ComfyUI's conventions,
        module docstring)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"DiffusersDenoiser x: expected a floating-point latent [B, C, H, W], got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if tuple(x.shape) != self._checked_shape:  # once per shape: Python ints only, no device sync
            check_latent_shape(self.unet, x.shape, batched=True)
            self._checked_shape = tuple(x.shape)
        b = x.shape[0]
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sig.ndim == 0:
            sig = sig.expand(b)
        sig = sig.reshape(-1)
        if sig.numel() != b:
            raise ValueError(f"sigma must have one value per sample ({b}), got {sig.numel()}")
        device, dtype = _module_device_dtype(self.unet)
        sig = sig.to(device)
        s = sig.view(b, *([1] * (x.ndim - 1)))
        xf = x.to(device=device, dtype=torch.float32)
        if self.kind.is_flow:
            xin = xf
            t = sig * self.table.multiplier
        else:
            xin = xf / torch.sqrt(s * s + 1.0)
            t = self.table.timestep(sig.detach().cpu()).to(device)
        return xf, s, xin.to(dtype), t

    def conditioning(self, b: int, *, uncond: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
        """``(encoder_hidden_states, added_cond_kwargs)`` for a latent batch of ``b`` (tiled as the class
        docstring says), on the network's device and dtype; ``uncond=True``: the unconditional ones."""
        device, dtype = _module_device_dtype(self.unet)
        name = "uncond" if uncond else "cond"
        ehs = _to(_batch(self.uncond if uncond else self.cond, b, name), device, dtype)
        kw = self.uncond_added_cond_kwargs if uncond else self.added_cond_kwargs
        added = _batch_kwargs(kw, b, f"{name + '_' if uncond else ''}added_cond_kwargs")
        return ehs, None if added is None else {k: _to(v, device, dtype) for k, v in added.items()}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        xf, s, xin, t = self.inputs(x, sigma)
        b = xf.shape[0]
        cond, added = self.conditioning(b)
        if self.guided:
            uncond, uadded = self.conditioning(b, uncond=True)
            if cond.shape[1:] == uncond.shape[1:] and (added is None) == (uadded is None):
                both = None
                if added is not None:
                    both = {k: torch.cat([added[k], uadded[k]]) for k in added}
                out = self.predict(torch.cat([xin, xin]), torch.cat([t, t]), torch.cat([cond, uncond]), both)
                out_c, out_u = out.float().chunk(2)
            else:  # token counts differ: two passes of B instead of one of 2B (same cost per sample)
                logger.debug("cond %s and uncond %s differ: running two forwards", tuple(cond.shape), tuple(uncond.shape))
                out_c = self.predict(xin, t, cond, added).float()
                out_u = self.predict(xin, t, uncond, uadded).float()
            x0 = self.x0_from(xf, s, out_u)
            x0 = x0 + self._cfg * (self.x0_from(xf, s, out_c) - x0)
            self.passes += 2
        else:
            x0 = self.x0_from(xf, s, self.predict(xin, t, cond, added).float())
            self.passes += 1
        return x0.to(device=x.device, dtype=x.dtype)

    def x0_from(self, x: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0 from the latent ``x`` (float32), sigma ``s`` and the network's prediction, by model kind."""
        kind = self.kind
        if kind is ModelKind.EPS or kind is ModelKind.FLOW:
            return x - s * out
        # v-prediction
        return x / (s * s + 1.0) - out * s / torch.sqrt(s * s + 1.0)


# -- schedules from diffusers configs ---------------------------------------------------------


def _config_of(scheduler_or_config: Any) -> dict:
    cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not isinstance(cfg, Mapping):
        raise TypeError(
            "expected a diffusers scheduler or its config (a mapping), got "
            f"{type(scheduler_or_config).__name__}"
        )
    return dict(cfg)


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """``alphas_cumprod`` (float64) from a diffusers DDPM-family scheduler config.

    Supports ``trained_betas`` and the ``linear``, ``scaled_linear`` and ``squaredcos_cap_v2``
    beta schedules, and ``rescale_betas_zero_snr`` (whose final 0 is floored like ComfyUI).
    """
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64)
    elif schedule == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    else:
        raise ValueError(
            f"unsupported beta_schedule {schedule!r}: expected linear, scaled_linear or squaredcos_cap_v2, "
            "or pass the scheduler object itself (its alphas_cumprod is used)"
        )
    ac = torch.cumprod(1.0 - betas, dim=0)
    if config.get("rescale_betas_zero_snr", False):
        sq = ac.sqrt()
        first, last = sq[0].clone(), sq[-1].clone()
        sq = (sq - last) * first / (first - last)
        ac = sq * sq
    return ac


def sigma_table_from_scheduler(scheduler_or_config: Any, kind: ModelKind | str | None = None) -> SigmaTable:
    """A :class:`SigmaTable` for a diffusers scheduler (object or config dict).

    The model kind comes from ``kind`` if given, else from the config: a ``FlowMatch*``
    scheduler is a flow model (shift from ``shift``; ``num_train_timesteps`` is the timestep
    multiplier), ``prediction_type`` ``epsilon`` / ``v_prediction`` otherwise. For VP models a
    scheduler object's own ``alphas_cumprod`` is used when present, else it is rebuilt from the
    config (:func:`alphas_cumprod_from_config`).
    """
    cfg = _config_of(scheduler_or_config)
    cls_name = str(cfg.get("_class_name") or type(scheduler_or_config).__name__)
    if kind is None:
        if "FlowMatch" in cls_name:
            kind = ModelKind.FLOW
        else:
            pred = cfg.get("prediction_type", "epsilon")
            mapping = {"epsilon": ModelKind.EPS, "v_prediction": ModelKind.V, "flow_prediction": ModelKind.FLOW}
            if pred not in mapping:
                raise ValueError(
                    f"unsupported prediction_type {pred!r} in {cls_name}: NoiseCraft handles epsilon, "
                    "v_prediction and flow models; pass kind=... to override"
                )
            kind = mapping[pred]
    kind = ModelKind.parse(kind)
    n = int(cfg.get("num_train_timesteps", 1000))
    if kind.is_flow:
        if cfg.get("use_dynamic_shifting", False):
            logger.warning(
                "%s uses dynamic (resolution-dependent) shifting; using the static shift %s",
                cls_name,
                cfg.get("shift", 1.0),
            )
        return SigmaTable.flow(shift=float(cfg.get("shift", 1.0)), timesteps=n, multiplier=float(n))
    ac = getattr(scheduler_or_config, "alphas_cumprod", None)
    ac = alphas_cumprod_from_config(cfg) if ac is None else torch.as_tensor(ac, dtype=torch.float64)
    ac = ac.clone()
    if float(ac[-1]) <= 0.0:
        ac[-1] = ZSNR_LAST_ALPHA_CUMPROD
    return SigmaTable.from_alphas_cumprod(ac, kind)


# -- the host for the trainers --------------------------------------------------------------


@dataclass
class RefinerHost:
    """What the trainer needs from a model.

    ``unet``: the module the refiner LoRA goes on (frozen; a diffusers ``UNet2DConditionModel`` or SD3-class
    transformer; :func:`noisecraft.hosts.adapters.attach_lora` adds it as a peft adapter);
    ``table``: its sigma table (model kind); ``conds``: condition embeddings [P, L, D], row ``i``
    for condition id ``i`` of the teacher cache; ``uncond``: [1, L, D] for guided teachers (may be
    None if the cache is already built); ``base_model``: a name written into the refiner's metadata.
    ``added`` / ``uncond_added``: the family's extra network inputs per condition, ``{name: [P, ...]}`` and
    ``{name: [1, ...]}`` (SDXL ``text_embeds`` + ``time_ids``, SD3 ``pooled_projections``; None for SD1/SD2);
    ``conds`` may also be a :class:`~noisecraft.train.cond_store.CondStore` (:meth:`use_conds`: the rows of each
    batch read from disk), or None until then for a host made with ``encode_now=False`` (its ``encoder``).
    ``targets``: the layer names the refiner LoRA goes on (:data:`noisecraft.lora.DEFAULT_TARGETS` for UNets,
    :data:`~noisecraft.lora.TRANSFORMER_TARGETS` for SD3-class transformers); ``family``: for messages.
    """

    unet: nn.Module
    table: SigmaTable
    conds: torch.Tensor
    uncond: Optional[torch.Tensor] = None
    base_model: str = "unknown"
    cond_labels: Optional[list] = None
    added: Optional[dict] = None
    uncond_added: Optional[dict] = None
    targets: tuple = DEFAULT_TARGETS
    family: str = "sd"
    encoder: Optional[Any] = None  # texts -> (rows, uncond row): prompts encoded a chunk at a time (encode_now=False)

    def use_conds(self, store) -> None:
        """Read the conditioning from ``store`` (a :class:`~noisecraft.train.cond_store.CondStore`: the prompt
        encodings on disk, a batch's rows at a time) instead of tensors in memory."""
        device, dtype = _module_device_dtype(self.unet)
        unc = store.uncond()
        self.conds = store
        self.uncond = unc["cond"].to(device=device, dtype=dtype)
        extra = {k: v.to(device=device, dtype=dtype) for k, v in unc.items() if k != "cond"}
        self.uncond_added = extra or None
        self.added = None

    def denoiser(self, cond_ids: torch.Tensor, cfg: float = 1.0) -> DiffusersDenoiser:
        ids = torch.as_tensor(cond_ids, dtype=torch.long).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.conds.shape[0]):
            raise ValueError(f"condition ids must lie in 0..{self.conds.shape[0] - 1}, got {ids.tolist()[:8]}")
        if torch.is_tensor(self.conds):
            cond = self.conds[ids.to(self.conds.device)]
            added = None if self.added is None else {k: v[ids.to(v.device)] for k, v in self.added.items()}
        else:  # a CondStore: this batch's rows from disk, to the network's device
            device, dtype = _module_device_dtype(self.unet)
            rows = {k: v.to(device=device, dtype=dtype) for k, v in self.conds.rows(ids).items()}
            cond = rows.pop("cond")
            added = rows or None
        guided = float(cfg) != 1.0
        uncond = self.uncond if guided else None
        if uncond is not None and cond.shape[1] != uncond.shape[1] and _lcm_ratio(cond, uncond) <= 4:
            cond, uncond = same_token_count([cond, uncond])  # ComfyUI's batching of a 154- with a 77-token prompt
        return DiffusersDenoiser(self.unet, self.table, cond, uncond, cfg=cfg,
                                 added_cond_kwargs=added,
                                 uncond_added_cond_kwargs=self.uncond_added if guided else None)


def diffusers_host(
    model_dir: str | os.PathLike,
    prompts: Sequence[str],
    *,
    prompt_embeds: Optional[str | os.PathLike] = None,
    negative_prompt: str = "",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: Optional[str | os.PathLike] = None,
    latent_shape: Optional[Sequence[int]] = None,
    encode_now: bool = True,
) -> RefinerHost:
    """A local diffusers model as a host, any family of :mod:`noisecraft.hosts.families` (SD1.x, SD2.x eps/v,
    SDXL, SD3-class flow transformers): ``model_dir`` is a diffusers folder (``unet/`` or ``transformer/``,
    ``scheduler/``, the tokenizers and text encoders), or a single-file checkpoint of the network with
    ``config`` the diffusers folder to read its config (and the rest) from.

    ``prompt_embeds``: a safetensors file of precomputed conditioning (``cond`` [P, L, D], ``uncond`` [1, L, D];
    SDXL/SD3 also ``pooled`` / ``uncond_pooled``, SDXL optionally ``time_ids``); then no text encoder (and no
    ``transformers``) is needed. ``latent_shape`` (C, H, W): the training latent, which sets SDXL's time ids
    (default: the network's ``sample_size``). ``encode_now=False``: encode nothing yet; the host's ``encoder``
    encodes a chunk of prompts at a time (:func:`noisecraft.train.cond_store.build_conds` writes them next to
    the teacher cache, :meth:`RefinerHost.use_conds` reads them back a batch at a time).
    """
    from . import families

    path = Path(model_dir)
    single = None
    if path.is_file():
        if config is None:
            raise ValueError(f"--model {path} is a single-file checkpoint: give --config DIR, a diffusers folder with "
                             "its configs (unet/config.json or transformer/config.json, scheduler/, and the "
                             "tokenizers + text encoders unless --prompt-embeds is given)")
        single, root = path, Path(config)
    else:
        if config is not None:
            raise ValueError(f"--config {config} is for a single-file --model FILE; {path} is a folder: leave "
                             f"--config out")
        root = path
    family = families.detect_family(root)
    sched_cfg = root / "scheduler" / "scheduler_config.json"
    if not sched_cfg.is_file():
        raise FileNotFoundError(f"{sched_cfg} is missing: the trainer needs the scheduler config for the sigma "
                                "schedule")
    if not prompts:
        raise ValueError("no prompts: give a text file with one prompt per line (--prompts FILE)")
    table = sigma_table_from_scheduler(json.loads(sched_cfg.read_text(encoding="utf-8")))
    net = families.load_network(root, family, dtype, single)
    net.to(device).eval().requires_grad_(False)
    size = int(net.config.sample_size)
    hw = tuple(latent_shape[-2:]) if latent_shape else (size, size)
    width = int(net.config.joint_attention_dim if family == "sd3" else net.config.cross_attention_dim)

    def checked(enc):
        if enc.cond.shape[-1] != width or enc.uncond.shape[-1] != width:
            what = "joint_attention_dim" if family == "sd3" else "cross_attention_dim"
            raise ValueError(f"prompt embeddings have width {enc.cond.shape[-1]} (uncond {enc.uncond.shape[-1]}) but "
                             f"the network's {what} is {width}: they were made with another text encoder")
        return enc

    def encoder(texts):  # a chunk of prompts -> (rows, the negative prompt's row), on the CPU
        enc = checked(families.encode_prompts(root, family, net, list(texts), negative_prompt, device, hw,
                                                       single_file=single))
        return {"cond": enc.cond, **(enc.added or {})}, {"cond": enc.uncond[:1], **(enc.uncond_added or {})}

    common = dict(base_model=single.stem if single is not None else root.name, cond_labels=list(prompts),
                  targets=TRANSFORMER_TARGETS if family == "sd3" else DEFAULT_TARGETS, family=family)
    if prompt_embeds is None and not encode_now:
        return RefinerHost(net, table, None, encoder=encoder, **common)
    if prompt_embeds is not None:
        enc = checked(families.read_prompt_embeds(prompt_embeds, family, net, len(prompts), hw,
                                                  families.vae_scale_factor(root)))
    else:
        enc = checked(families.encode_prompts(root, family, net, list(prompts), negative_prompt, device, hw,
                                                    single_file=single))

    def put(d):
        return None if d is None else {k: v.to(device=device, dtype=dtype) for k, v in d.items()}

    return RefinerHost(net, table, enc.cond.to(device=device, dtype=dtype),
                       enc.uncond[:1].to(device=device, dtype=dtype), added=put(enc.added),
                       uncond_added=put(enc.uncond_added), **common)
