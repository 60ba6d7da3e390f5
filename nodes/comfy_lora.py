"""The refiner LoRA on a ComfyUI model: the inference switch (no re-patch) and the trainable adapters.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3 (the
refiner is a LoRA on the diffusion model, on for the refinement pass only). The file format is
:mod:`noisecraft.lora`'s (kohya ``lora_unet_<diffusers name>`` keys); this module binds it to
ComfyUI's weights, with ComfyUI's own LoRA code.

* Keys: :func:`lora_keys` names the default targets of :mod:`noisecraft.lora` on a ComfyUI UNet
  with ComfyUI's ``comfy.utils.unet_to_diffusers`` table, ordered by diffusers module name (the
  core's order, so a seeded initialisation draws the same numbers as the CLI);
  :func:`map_refiner` binds any refiner's keys to weights with ``comfy.lora.model_lora_keys_unet``
  (diffusers and ldm layouts, kohya and ``diffusion_model.`` names) and checks every shape.
* Inference (:class:`Target`, :class:`RefinerSwitch`): the delta ``alpha / rank * up @ down`` is
  ComfyUI's own LoRA merge (``comfy.weight_adapter.LoRAAdapter.calculate_weight``), computed once
  per device and dtype, and applied as a weight function on ComfyUI's cast path, appended to the
  target modules only for the duration of the refiner passes and toggled by one ``enabled`` flag
  (``D_base`` off, ``D_lora`` on, one loaded model). Not ``ModelPatcher.add_weight_wrapper``: that
  re-rolls the clone's ``patches_uuid`` and makes ComfyUI unpatch and re-patch the model twice per
  generation (``benchmarks/bench_comfy_refine.py`` times both).
* Training (:class:`TrainableLoRA`): ComfyUI's trainable LoRA (``comfy.weight_adapter.lora.LoraDiff``)
  per target, registered with ``add_weight_wrapper`` on the training clone as ComfyUI's own training
  node (``comfy_extras/nodes_train.py``) does, behind the same kind of switch (the refiner's base
  pass and the student run with the adapters off). The adapters are made from our own tensors:
  ``down`` Kaiming-uniform (bound ``1 / sqrt(fan_in)``, float64 draws from ``torch.Generator(seed)``,
  layer after layer in diffusers-name order, exactly :class:`noisecraft.lora.LoRALayer`'s
  initialisation), ``up`` zero; the global RNG is left as it was (``LoraDiff`` builds its layers
  with torch's default init, under ``torch.random.fork_rng``). Every other layer whose weight or
  bias is an inference tensor (ComfyUI loads models under ``torch.inference_mode()``) gets an
  identity wrapper, so ComfyUI's cast path hands autograd a copy (norm layers save their weight for
  backward; ComfyUI's node wraps every layer for the same reason). :meth:`TrainableLoRA.detach`
  removes all of them from the modules afterwards: the input MODEL keeps no function of ours.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

import comfy.lora
import comfy.utils
from comfy.weight_adapter.lora import LoRAAdapter, LoraDiff

from ..noisecraft.lora import DEFAULT_TARGETS
from . import bridge

__all__ = ["lora_keys", "Target", "map_refiner", "RefinerSwitch", "TrainableLoRA", "SwitchedLoraDiff"]

REFINE_NAME = "Refine Noise"
TRAIN_NAME = "Train Refiner"


def lora_keys(model) -> dict[str, str]:
    """kohya key -> ComfyUI weight key of the default targets of ``model``'s UNet, in diffusers-name order."""
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    try:
        diff = comfy.utils.unet_to_diffusers(unet_config)
    except Exception:  # noqa: BLE001 - not a UNet config
        diff = {}
    mods = {}
    for dname, lname in diff.items():
        if dname.endswith(".weight"):
            mod = dname[: -len(".weight")]
            if any(mod == t or mod.endswith("." + t) for t in DEFAULT_TARGETS):
                mods[mod] = "diffusion_model." + lname
    if not mods:
        raise ValueError(
            f"{TRAIN_NAME}: this MODEL ({bridge.model_name(model)}) has no UNet layers the refiner LoRA targets "
            f"({', '.join(DEFAULT_TARGETS)}); training in ComfyUI supports UNet models (SD1.x, SD2.x, SDXL)"
        )
    return {"lora_unet_" + mod.replace(".", "_"): mods[mod] for mod in sorted(mods)}


# -- inference -------------------------------------------------------------------------------------

class Target:
    """One LoRA pair bound to a ComfyUI weight: module path, and ComfyUI's LoRA delta in its shape."""

    def __init__(self, weight_key: str, down: torch.Tensor, up: torch.Tensor, scale: float):
        self.weight_key = weight_key
        self.module_path = weight_key[: -len(".weight")]
        self.down_shape = tuple(down.shape)  # the file's shapes (kohya conv: [r, in, kh, kw], [out, r, 1, 1])
        self.up_shape = tuple(up.shape)
        self.down = down.flatten(1)
        self.up = up.flatten(1)
        self.scale = scale
        self._on: dict = {}

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.device, weight.dtype)
        if key not in self._on:
            rank = self.down.shape[0]
            adapter = LoRAAdapter(set(), (self.up, self.down, self.scale * rank, None, None, None))
            zero = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
            self._on[key] = adapter.calculate_weight(zero, self.weight_key, 1.0, 1.0, None, lambda a: a)
        return self._on[key]

    def release(self) -> None:
        self._on.clear()


def map_refiner(refiner, model) -> list[Target]:
    """Bind every LoRA pair of ``refiner`` (a REFINER: ``.pairs`` ``{key: (down, up, alpha)}``) to a weight of
    ComfyUI ``model`` (a ModelPatcher). Raises a ValueError naming the refiner and the model when a key maps
    to no weight or a shape does not fit (a refiner trained for another model)."""
    base = model.model
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    weights = dict(base.named_parameters())
    targets, unknown, bad = [], [], []
    for prefix, (down, up, alpha) in refiner.pairs.items():
        wkey = key_map.get(prefix)
        if wkey is None or wkey not in weights:
            unknown.append(prefix)
            continue
        w = weights[wkey]
        if up.shape[0] != w.shape[0] or down[0].numel() != w[0].numel() or up[0].numel() != down.shape[0]:
            bad.append(f"{prefix}: up {list(up.shape)} @ down {list(down.shape)} vs {wkey} {list(w.shape)}")
            continue
        targets.append(Target(wkey, down, up, alpha / down.shape[0]))
    if unknown or bad:
        what = []
        if unknown:
            what.append(f"{len(unknown)} of its {len(refiner.pairs)} keys name no weight of the model "
                        f"(e.g. {unknown[:3]})")
        if bad:
            what.append(f"{len(bad)} shapes do not fit (e.g. {bad[:2]})")
        raise ValueError(
            f"{REFINE_NAME}: the refiner {refiner.describe()} does not fit this MODEL ({bridge.model_name(model)}): "
            f"{'; '.join(what)}. It was trained for another model: load the refiner trained for this checkpoint, "
            f"or train one for it"
        )
    return targets


class RefinerSwitch:
    """The refiner as weight functions on a loaded ComfyUI model, toggled by ``enabled``.

    :meth:`attached` appends one function per target module to ``module.weight_function`` (the
    list ``comfy.ops`` layers apply when they cast their weight) and restores the modules' own
    lists on exit. With ``enabled`` False the function returns the weight unchanged.
    """

    def __init__(self, targets: list[Target]):
        self.targets = targets
        self.enabled = False

    def _fn(self, target: Target):
        def apply(weight: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return weight
            return weight + target.delta(weight)

        return apply

    @contextmanager
    def attached(self, base_model: torch.nn.Module):
        saved = []
        try:
            for t in self.targets:
                module = base_model.get_submodule(t.module_path)
                if not hasattr(module, "weight_function"):
                    raise ValueError(
                        f"{REFINE_NAME}: layer {t.module_path} ({type(module).__name__}) is not a ComfyUI layer with "
                        f"weight functions; the refiner cannot be attached to this model"
                    )
                prev = module.__dict__.get("weight_function", None)
                mine = [*module.weight_function, self._fn(t)]
                module.weight_function = mine
                saved.append((module, prev, mine))
            yield self
        finally:
            self.enabled = False
            for module, prev, mine in reversed(saved):
                if module.__dict__.get("weight_function") is mine:
                    if prev is None:
                        del module.weight_function
                    else:
                        module.weight_function = prev
            for t in self.targets:
                t.release()


# -- training --------------------------------------------------------------------------------------

class _Flag:
    enabled = False


class SwitchedLoraDiff(LoraDiff):
    """ComfyUI's trainable LoRA (``w + alpha / rank * up @ down``), applied only while the switch is on."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float, switch: _Flag):
        with torch.random.fork_rng(devices=[]):  # LoraDiff's layers draw torch's default init first
            super().__init__((up, down, float(alpha), None, None, None))
        self.__dict__["switch"] = switch  # a plain attribute, not a submodule

    def __call__(self, w):
        return super().__call__(w) if self.switch.enabled else w


def _copy(t: torch.Tensor) -> torch.Tensor:
    """Identity: its presence makes ComfyUI's cast path copy the (inference) tensor for autograd."""
    return t


def _inference_init(shape, generator: torch.Generator) -> torch.Tensor:
    """:class:`noisecraft.lora.LoRALayer`'s ``down`` init: Kaiming-uniform, bound 1 / sqrt(fan_in), float64 draws."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return ((torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound).to(torch.float32)


class TrainableLoRA(nn.Module):
    """The refiner being trained on a ComfyUI model: one :class:`SwitchedLoraDiff` per target (see the
    module docstring). ``adapters`` are the trainable weights (a checkpoint holds their state dict)."""

    def __init__(self, model, rank: int, alpha: float, seed: int):
        super().__init__()
        weights = dict(model.model.named_parameters())
        g = torch.Generator().manual_seed(int(seed))
        self.switch = _Flag()
        self.adapters = nn.ModuleDict()
        self.weight_keys: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        for key, wkey in lora_keys(model).items():
            w = weights[wkey]
            r = min(int(rank), w.shape[0], w[0].numel())
            down = _inference_init((r, *w.shape[1:]), g).flatten(1)
            up = torch.zeros((w.shape[0], r), dtype=torch.float32)
            self.adapters[key] = SwitchedLoraDiff(down, up, alpha, self.switch)
            self.weight_keys[key] = wkey
            self.shapes[key] = ((r, *w.shape[1:]), (w.shape[0], r, *([1] * (w.ndim - 2))))
        self.adapters.requires_grad_(True)
        for a in self.adapters.values():
            a.alpha.requires_grad_(False)
        self._wrapped: list = []

    # -- the switch (the core's LoRASet interface, used by noisecraft.train.refiner.RefinerMethod) ------
    @contextmanager
    def disabled(self) -> Iterator[None]:
        prev, self.switch.enabled = self.switch.enabled, False
        try:
            yield
        finally:
            self.switch.enabled = prev

    def base_and_lora(self, denoiser):
        """``(D_base, D_lora)`` from one denoiser over the wrapped model (adapters off / on)."""

        def base(x, sigma):
            with self.disabled():
                return denoiser(x, sigma)

        def lora(x, sigma):
            prev, self.switch.enabled = self.switch.enabled, True
            try:
                return denoiser(x, sigma)
            finally:
                self.switch.enabled = prev

        return base, lora

    # -- attaching -------------------------------------------------------------------------------
    def register(self, patcher) -> None:
        """Register the adapters (and the copy wrappers of the other inference-tensor layers) as weight
        wrappers of ``patcher`` (a clone of the MODEL: ComfyUI applies them when it loads the clone)."""
        targets = set(self.weight_keys.values())
        for key, a in self.adapters.items():
            patcher.add_weight_wrapper(self.weight_keys[key], a)
            self._wrapped.append(a)
        for name, m in patcher.model.named_modules():
            if not hasattr(m, "weight_function"):
                continue
            for attr in ("weight", "bias"):
                t = getattr(m, attr, None)
                key = f"{name}.{attr}"
                if torch.is_tensor(t) and t.is_inference() and key not in targets:
                    patcher.add_weight_wrapper(key, _copy)
        self._wrapped.append(_copy)

    def detach(self, base_model: nn.Module) -> None:
        """Remove every function :meth:`register` caused from the modules of ``base_model``."""
        mine = self._wrapped
        for m in base_model.modules():
            for fattr in ("weight_function", "bias_function"):
                fs = m.__dict__.get(fattr)
                if isinstance(fs, list) and any(any(f is x for x in mine) for f in fs):
                    kept = [f for f in fs if not any(f is x for x in mine)]
                    if kept:
                        setattr(m, fattr, kept)
                    else:
                        delattr(m, fattr)

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{kohya key: (down, up, alpha)}`` as CPU float32 copies in the standard (kohya) shapes."""
        out = {}
        for key, a in self.adapters.items():
            ds, us = self.shapes[key]
            down = a.lora_down.weight.detach().to("cpu", torch.float32).clone().reshape(ds)
            up = a.lora_up.weight.detach().to("cpu", torch.float32).clone().reshape(us)
            out[key] = (down, up, float(a.alpha))
        return out
