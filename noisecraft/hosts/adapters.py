"""The refiner LoRA on a diffusers model, through peft.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3 and
App. D (the refiner is a LoRA on the diffusion model). LoRA: Hu et al., arXiv:2106.09685. The file
format (kohya keys, metadata, parse, export) is :mod:`noisecraft.lora`'s; this module puts a refiner
on a diffusers model (UNets, SD3-class transformers) for training and for the diffusers / toy hosts.

On a diffusers model (:func:`attach_lora`, :func:`load_lora` -> :class:`LoRASet`): a peft adapter
``noisecraft_refiner`` (``add_adapter(LoraConfig(...))``, diffusers' ``PeftAdapterMixin``: UNets and
SD3-class transformers; ``peft.inject_adapter_in_model`` for other modules). peft computes
``base(x) + up(down(x)) * (alpha / rank)`` with the input cast to the LoRA dtype (float32 by default),
the composition ComfyUI's merged ``W + (alpha / rank) * up @ down`` gives up to rounding.
Initialisation is ours: ``down`` Kaiming-uniform (bound ``1 / sqrt(fan_in)``, peft's law) from a
``torch.Generator`` seeded by ``seed``, layer by layer in module-name order; ``up`` = 0 (the refiner
starts as the identity). peft's layer constructors draw from the global RNG: its state is saved and
restored around them; peft freezes the whole model: its own ``requires_grad`` flags are put back. ``enabled`` is one flag for all layers (``with lora.disabled():``,
``base_and_lora``); it sets peft's per-layer disable flag directly, because peft's ``enable_adapters``
also rewrites ``requires_grad`` of every adapter weight (a frozen refiner would become trainable). A
disabled layer returns the base output bit for bit; :meth:`LoRASet.remove` puts the model's own
modules back. Default targets (``DEFAULT_TARGETS``): attention ``to_q/k/v``, ``to_out.0``; resnet
``conv1``, ``conv2``; feed-forward ``ff.net.0.proj``, ``ff.net.2``; all in ComfyUI's diffusers -> ldm
UNet map, so ComfyUI's stock LoRA loader reads the export for SD1.x/SD2.x/SDXL-class UNets. On SD3-class
transformers (``TRANSFORMER_TARGETS``: both streams' attention and feed-forward layers) the keys are
``lora_transformer_<diffusers name>`` (:func:`kohya_prefix`), the form ComfyUI maps for diffusers
transformers (``model_lora_keys_unet``); :func:`load_lora` accepts either prefix.

peft is in the ``train`` and ``dev`` extras, imported on first use with an install hint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import weakref
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ..lora import (ADAPTER, DEFAULT_TARGETS, PREFIX, TRANSFORMER_PREFIX, flat_name, pairs_state_dict,
                    parse_refiner_state, read_lora_file, refiner_metadata, save_refiner_pairs)

__all__ = ["LoRASet", "attach_lora", "load_lora", "kohya_prefix"]

logger = logging.getLogger(__name__)

_MARK = "_noisecraft_refiner_lora"
_PEFT_HINT = "install peft (pip install 'peft>=0.17', or the package's train extra: pip install -e '.[train]')"

def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


# -- the refiner on a diffusers model, through peft ------------------------------------------------

def _peft():
    try:
        import peft
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise ImportError(f"a refiner LoRA on a diffusers model needs peft, which is not installed: "
                          f"{_PEFT_HINT}") from None
    return peft, LoraLayer


class _Pair(nn.Module):
    """One layer's LoRA weights as kohya names them: ``lora_down`` / ``lora_up`` are peft's ``lora_A`` /
    ``lora_B`` modules of the adapter (the same parameters, not copies)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.lora_down = layer.lora_A[ADAPTER]
        self.lora_up = layer.lora_B[ADAPTER]
        self._layer = [layer]  # a list: peft's layer (holding the model's weight) is no submodule

    rank = property(lambda self: int(self._layer[0].r[ADAPTER]))
    scale = property(lambda self: float(self._layer[0].scaling[ADAPTER]))

    @property
    def alpha(self) -> float:
        return float(self._layer[0].lora_alpha[ADAPTER])

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._layer[0].lora_alpha[ADAPTER] = float(value)
        self._layer[0].scaling[ADAPTER] = float(value) / self.rank


class LoRASet(nn.Module):
    """The refiner LoRA on a model (peft adapter ``noisecraft_refiner``), with one shared ``enabled`` flag.

    ``layers`` is an ``nn.ModuleDict`` keyed by the kohya prefix (``lora_unet_<flat name>``) whose
    entries hold ``lora_down`` / ``lora_up`` (so ``state_dict`` keys are
    ``layers.<prefix>.lora_down.weight``); ``module_names`` maps each prefix to the diffusers module
    name. Made by :func:`attach_lora` (new, zero ``up``) or :func:`load_lora` (from a saved refiner).
    ``guidance``: the guidance-scale embedding of a guidance-conditioned refiner (:meth:`add_guidance`,
    :mod:`noisecraft.guidance_embed`; hooked on the model's timestep embedding, on while ``enabled``), else None.
    """

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict()
        self.module_names: dict[str, str] = {}
        self.targets: tuple[str, ...] = ()
        self._enabled = True
        self._model_ref: Optional[weakref.ref] = None  # a weakref: the model must not become a submodule
        self._attached = False
        self.guidance = None  # a noisecraft.guidance_embed.GuidanceEmbedding (a submodule) for a conditioned refiner

    # -- toggling ---------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        for pair in self.layers.values():
            pair._layer[0]._disable_adapters = not self._enabled  # peft's flag, without its requires_grad rewrite

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model without the LoRA inside the block (restores the previous state)."""
        prev, self.enabled = self._enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def base_and_lora(self, denoiser, guidance=None):
        """``(D_base, D_lora)`` for :func:`noisecraft.refine.refine_noise` from one denoiser over the
        model: ``D_base`` runs with the LoRA disabled, ``D_lora`` with it enabled. ``guidance``: the CFG
        scale (a number or one per sample) for a guidance-conditioned refiner (:meth:`guidance_scale`)."""

        def base(x, sigma):
            with self.disabled():
                return denoiser(x, sigma)

        def lora(x, sigma):
            prev, self.enabled = self._enabled, True
            try:
                with self.guidance_scale(guidance):
                    return denoiser(x, sigma)
            finally:
                self.enabled = prev

        if guidance is not None and self.guidance is None:
            logger.warning("guidance=%s given, but this refiner has no guidance-scale input (a plain refiner): "
                           "ignored; to scale a plain refiner use the strength instead", guidance)
        return base, lora

    # -- guidance-scale control (noisecraft.guidance_embed) -----------------------------------------
    def add_guidance(self, embedding) -> None:
        """Make this a guidance-conditioned refiner: ``embedding`` (a ``GuidanceEmbedding``) is added to the
        model's timestep embedding while the LoRA is enabled."""
        model = self._model_ref() if self._model_ref is not None else None
        if model is None or not self._attached:
            raise ValueError("add_guidance needs a LoRASet attached to a model (attach_lora / load_lora)")
        embedding.hook(model, lambda: self._enabled)
        self.guidance = embedding

    def guidance_scale(self, guidance):
        """A context in which the refiner passes use CFG scale ``guidance`` (None: no scale; a plain refiner
        ignores it)."""
        if guidance is None or self.guidance is None:
            return contextlib.nullcontext()
        return self.guidance.at(guidance)

    # -- attaching ----------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._attached

    def _bind(self, model: nn.Module) -> None:
        _check_free(model)
        self._model_ref = weakref.ref(model)
        model.__dict__[_MARK] = self  # not a submodule: the model's state_dict is unchanged

    def remove(self) -> None:
        """Take the adapter off: the model's own modules go back in place (the LoRA weights stay here)."""
        model = self._model_ref() if self._model_ref is not None else None
        if self.guidance is not None:
            self.guidance.unhook()
        if model is not None:
            _, LoraLayer = _peft()
            wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
            for name, layer in wrapped:
                if set(layer.lora_A.keys()) - {ADAPTER}:  # someone else's adapter shares the layer: keep it
                    layer.delete_adapter(ADAPTER)
                    continue
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
            configs = getattr(model, "peft_config", None)
            if isinstance(configs, dict):
                configs.pop(ADAPTER, None)
                if not configs:
                    del model.peft_config
                    if hasattr(model, "_hf_peft_config_loaded"):
                        model._hf_peft_config_loaded = False
            if model.__dict__.get(_MARK) is self:
                del model.__dict__[_MARK]
        self._attached = False
        self._model_ref = None

    # -- export ---------------------------------------------------------------------------------
    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{kohya prefix: (down, up, alpha)}`` (detached weights), the form :func:`save_refiner_pairs` takes."""
        return {k: (p.lora_down.weight.detach(), p.lora_up.weight.detach(), p.alpha) for k, p in self.layers.items()}

    def export_state_dict(self, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The kohya/ComfyUI LoRA state dict (CPU tensors; ``dtype`` defaults to the weights')."""
        return pairs_state_dict(self.pairs(), dtype)

    def metadata(self, extra: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
        return refiner_metadata(self.pairs(), self._with_guidance(extra), self.targets)

    def _with_guidance(self, extra: Optional[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
        return extra if self.guidance is None else {**dict(extra or {}), **self.guidance.file_metadata()}

    def save(self, path: str | os.PathLike, metadata: Optional[Mapping[str, Any]] = None,
             dtype: Optional[torch.dtype] = None) -> Path:
        """Write the refiner file (:func:`save_refiner_pairs`). ``metadata`` adds keys such as
        ``base_model``, ``model_kind``, ``sigma_max``, ``training``."""
        pairs = self.pairs()
        extra = None if self.guidance is None else self.guidance.file_tensors()
        return save_refiner_pairs(pairs, path, refiner_metadata(pairs, self._with_guidance(metadata), self.targets),
                                  dtype, extra_tensors=extra)


def _check_free(model: nn.Module) -> None:
    current = model.__dict__.get(_MARK)
    if (current is not None and current.attached) or ADAPTER in (getattr(model, "peft_config", None) or {}):
        n = len(current.layers) if current is not None else "?"
        raise ValueError(f"this {type(model).__name__} already has a refiner LoRA attached ({n} layers): "
                         "call .remove() on it first (two LoRAs would both be added)")


def kohya_prefix(model: nn.Module) -> str:
    """The kohya key prefix ComfyUI maps for ``model``'s diffusers names: ``lora_transformer_`` for a diffusers
    transformer (SD3, Flux: a class named ``*Transformer*``), ``lora_unet_`` for UNets and anything else."""
    return TRANSFORMER_PREFIX if "Transformer" in type(model).__name__ else PREFIX


def _rekey(pairs: dict, prefix: str) -> dict:
    """``pairs`` with the other known prefix swapped for ``prefix`` (a peft file parses as ``lora_unet_``)."""
    other = TRANSFORMER_PREFIX if prefix == PREFIX else PREFIX
    return {prefix + k[len(other):] if k.startswith(other) else k: v for k, v in pairs.items()}


def _candidates(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    prefix = kohya_prefix(model)
    return {
        flat_name(name, prefix): (name, m)
        for name, m in model.named_modules()
        if name and isinstance(m, (nn.Linear, nn.Conv2d))
    }


def _shapes(module: nn.Module, rank: int) -> tuple[tuple, tuple]:
    """kohya's ``(down, up)`` shapes for a LoRA of ``rank`` on ``module`` (peft's lora_A / lora_B)."""
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)


def _check_conv(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or tuple(module.dilation) != (1, 1)
                                          or module.groups != 1):
        raise ValueError(f"LoRA on convolution {name!r} (padding_mode={module.padding_mode!r}, dilation="
                         f"{tuple(module.dilation)}, groups={module.groups}) is not supported: leave it out of the "
                         f"targets")


def _inject(model: nn.Module, names: Sequence[str], ranks: Mapping[str, int], alphas: Mapping[str, float],
            dtype: torch.dtype) -> LoRASet:
    """Add the peft adapter on exactly ``names``; returns the :class:`LoRASet` over its layers."""
    peft, LoraLayer = _peft()
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = peft.LoraConfig(
        r=rank, lora_alpha=float(alphas[names[0]]), lora_dropout=0.0, init_lora_weights=False,
        target_modules="|".join(re.escape(n) for n in names),  # a string is one regex, full-matched by peft
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank},
    )
    lora = LoRASet()
    lora._bind(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with torch.random.fork_rng(devices=[]):  # peft's layer constructors draw from the global RNG
            if hasattr(model, "add_adapter") and hasattr(model, "set_adapter"):  # diffusers' PeftAdapterMixin
                model.add_adapter(config, adapter_name=ADAPTER)
            else:
                peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        lora._attached = True
        for p, flag in flags:  # peft freezes every weight but the adapter's: the model's own flags stay
            p.requires_grad_(flag)
        for name in names:
            layer = model.get_submodule(name)
            if not isinstance(layer, LoraLayer):
                raise RuntimeError(f"peft did not wrap {name!r} (got {type(layer).__name__})")
            layer.lora_A[ADAPTER].to(dtype=dtype)
            layer.lora_B[ADAPTER].to(dtype=dtype)
            key = flat_name(name, kohya_prefix(model))
            lora.layers[key] = _Pair(layer)
            lora.layers[key].alpha = alphas[name]
            lora.module_names[key] = name
    except BaseException:
        lora.remove()
        raise
    return lora


def attach_lora(
    model: nn.Module,
    rank: int,
    alpha: Optional[float] = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
) -> LoRASet:
    """Add a new refiner LoRA (peft) on every Linear/Conv2d of ``model`` whose name is, or ends with
    ``.`` + , one of ``targets`` (diffusers names). ``alpha`` defaults to ``rank`` (scale 1).

    ``down`` comes from a generator seeded by ``seed`` (see the module docstring), ``up`` is zero.
    The model's own weights are not touched (freeze them yourself for training); the LoRA weights
    are float32 by default (``dtype``) on the model's device. Returns the :class:`LoRASet`
    (``.parameters()`` are the trainable weights).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_lora needs an nn.Module (a diffusers UNet), got {type(model).__name__}")
    _check_free(model)
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one layer, e.g. noisecraft.lora.DEFAULT_TARGETS")
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    rank, alpha = int(rank), float(rank if alpha is None else alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"LoRA alpha must be finite, got {alpha}")
    names = []
    for name, module in sorted(_candidates(model).values(), key=lambda nm: nm[0]):
        if not _matches(name, targets):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            logger.debug("skipping grouped convolution %s", name)
            continue
        _check_conv(name, module)
        names.append(name)
    if not names:
        examples = [name for _, (name, _) in list(_candidates(model).items())[:6]]
        raise ValueError(
            f"no Linear/Conv2d layer of {type(model).__name__} matches the targets {list(targets)}; "
            f"its layers are named like {examples}"
        )
    lora = _inject(model, names, {n: rank for n in names}, {n: alpha for n in names}, dtype or torch.float32)
    lora.targets = targets
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for key in sorted(lora.layers, key=lambda k: lora.module_names[k]):
            pair = lora.layers[key]
            w = pair.lora_down.weight
            bound = 1.0 / math.sqrt(w[0].numel())  # Kaiming-uniform with a = sqrt(5): 1 / sqrt(fan_in)
            w.copy_((torch.rand(w.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
            pair.lora_up.weight.zero_()
    return lora


def load_lora(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    dtype: Optional[torch.dtype] = None,
) -> LoRASet:
    """Put a saved refiner (path or state dict; kohya ``lora_unet_*`` or peft keys) on ``model`` (peft).

    Rank and alpha come from the file, per layer. A key that names no Linear/Conv2d of ``model``, or
    a shape that does not fit, raises a ValueError naming the key, the layer and both shapes; nothing
    is attached then.
    """
    from ..guidance_embed import GuidanceEmbedding

    _check_free(model)
    if isinstance(source, Mapping):
        from ..ode import check_tensors_finite

        label = "the LoRA state dict"
        check_tensors_finite(dict(source), label)
        state, meta = source, {"noisecraft.kind": "refiner"}
    else:
        label = str(source)
        state, meta = read_lora_file(source)
    pairs = _rekey(parse_refiner_state(state, meta, label), kohya_prefix(model))
    guidance = GuidanceEmbedding.from_file(state, meta, label)  # None for a plain refiner
    cands = _candidates(model)
    unknown = [p for p in pairs if p not in cands]
    if unknown:
        raise ValueError(
            f"{label} has {len(unknown)} LoRA keys that name no Linear/Conv2d layer of this "
            f"{type(model).__name__} (e.g. {unknown[:3]}): it was trained for another model"
        )
    for key, (down, up, _) in pairs.items():  # check everything before touching the model
        name, module = cands[key]
        _check_conv(name, module)
        for part, t, need in zip(("lora_down", "lora_up"), (down, up), _shapes(module, int(down.shape[0]))):
            if tuple(t.shape) != tuple(need):
                raise ValueError(
                    f"{label}: {key}.{part}.weight has shape {tuple(t.shape)} but layer {name!r} of this "
                    f"{type(model).__name__} needs {tuple(need)}: the LoRA was trained for another model"
                )
    names = [cands[k][0] for k in sorted(pairs)]
    by_name = {cands[k][0]: v for k, v in pairs.items()}
    lora = _inject(model, names, {n: int(by_name[n][0].shape[0]) for n in names},
                   {n: by_name[n][2] for n in names}, dtype or torch.float32)
    with torch.no_grad():
        for name in names:
            pair = lora.layers[flat_name(name, kohya_prefix(model))]
            pair.lora_down.weight.copy_(by_name[name][0])
            pair.lora_up.weight.copy_(by_name[name][1])
    lora.targets = tuple(names)
    if guidance is not None:
        try:
            lora.add_guidance(guidance.to(next(iter(lora.layers.values())).lora_down.weight.device))
        except BaseException:
            lora.remove()
            raise
    return lora
