"""The refiner LoRA on a ComfyUI model: the inference switch (no re-patch) and the trainable adapters.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3 (the
refiner is a LoRA on the diffusion model, on for the refinement pass only). The file format is
:mod:`noisecraft.lora`'s (kohya ``lora_unet_<diffusers name>`` keys); this module binds it to
ComfyUI's weights, with ComfyUI's own LoRA code.

* Keys: :func:`lora_keys` names the default targets of :mod:`noisecraft.lora` on a ComfyUI UNet
  with ComfyUI's ``comfy.utils.unet_to_diffusers`` table, ordered by diffusers module name (the
  core's order, so a seeded initialisation draws the same numbers as the CLI). On SD3 (MMDiT) and
  Flux-class models (DiTs) the keys are ``lora_transformer_<diffusers transformer name>`` on
  the DiT targets inside the blocks (attention q/k/v/out of the image and the text stream, both
  MLPs: the core's ``TRANSFORMER_TARGETS``, the CLI's on diffusers' SD3; plus Flux's single-block
  ``proj_mlp``/``proj_out``, :data:`FLUX_TARGETS`; not norms, adaLN modulation or embedders),
  found with ComfyUI's ``mmdit_to_diffusers`` / ``flux_to_diffusers`` tables: the form ComfyUI's
  ``model_lora_keys_unet`` maps for both, so the stock LoRA loaders read the file, and the names a
  diffusers ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` has. diffusers' separate q, k, v
  are row slices of ComfyUI's fused ``qkv`` (``(dim, start, size)`` in ComfyUI's key map): a LoRA
  pair on a slice changes only those rows (:func:`splice`), as ComfyUI's loader applies it. Any
  other model gets one error listing the supported families (:data:`FAMILIES`).
  :func:`map_refiner` binds any refiner's keys to weights with ``comfy.lora.model_lora_keys_unet``
  (diffusers and ldm layouts, kohya and ``diffusion_model.`` names, fused-weight slices) and checks
  every shape.
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
  backward; ComfyUI's node wraps every layer for the same reason); other inference tensors of the
  network (Flux's RMSNorm scales, SD3's positional embedding) get a normal copy as an object patch
  of the clone. On Flux-class models each block runs under a ``saved_tensors_hooks`` that keeps a
  copy of its hidden-state inputs (ComfyUI's Flux blocks update them in place after a norm saved
  them). :meth:`TrainableLoRA.detach` removes all of them from the modules afterwards: the input
  MODEL keeps no function or tensor of ours.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch
from torch import nn

import comfy.lora
import comfy.utils
from comfy.weight_adapter.lora import LoRAAdapter, LoraDiff

from ..noisecraft.lora import DEFAULT_TARGETS, TRANSFORMER_PREFIX, TRANSFORMER_TARGETS
from . import bridge

__all__ = ["lora_keys", "lora_targets", "dit_family", "DIT_CLASSES", "split_target", "splice", "DIT_TARGETS",
           "FLUX_TARGETS", "FAMILIES", "Target", "map_refiner",
           "RefinerSwitch", "TrainableLoRA", "SwitchedLoraDiff"]

REFINE_NAME = "Refine Noise"
TRAIN_NAME = "Train Refiner"


# SD3 (MMDiT): the core's TRANSFORMER_TARGETS (the CLI's, on a diffusers SD3Transformer2DModel); Flux-class: the same
# in the double blocks, plus the single blocks' fused linears (to_q/k/v and proj_mlp of linear1; proj_out = linear2)
FLUX_TARGETS: tuple[str, ...] = (*TRANSFORMER_TARGETS, "proj_mlp", "proj_out")
DIT_TARGETS = FLUX_TARGETS  # every DiT target name
DIT_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")  # diffusers names of the DiT's blocks
DIT_PREFIX = TRANSFORMER_PREFIX  # "lora_transformer_"
FAMILIES = "UNet: SD1.x, SD2.x, SDXL; MMDiT: SD3, SD3.5; Flux-class: Flux.1 dev/schnell, Chroma"


def split_target(entry) -> tuple[Optional[str], Optional[tuple[int, int, int]]]:
    """A value of ComfyUI's LoRA key map as ``(weight key, (dim, start, size) or None)``: a plain weight, or a
    slice of a fused one (SD3/Flux ``to_q``/``to_k``/``to_v`` of ``qkv``); ``(None, None)`` for anything else
    (a weight ComfyUI maps through a conversion function)."""
    if isinstance(entry, str):
        return entry, None
    if (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], tuple)
            and len(entry[1]) == 3):
        return entry[0], tuple(int(v) for v in entry[1])
    return None, None


def sliced_shape(shape, offset) -> tuple[int, ...]:
    """``shape`` narrowed by ``offset`` (``(dim, start, size)`` or None)."""
    out = list(shape)
    if offset is not None:
        out[offset[0]] = offset[2]
    return tuple(out)


def splice(weight: torch.Tensor, offset, part: torch.Tensor) -> torch.Tensor:
    """``weight`` with its ``offset`` slice replaced by ``part`` (out of place; autograd flows into ``part``)."""
    dim, start, size = offset
    rest = weight.shape[dim] - start - size
    return torch.cat([weight.narrow(dim, 0, start), part, weight.narrow(dim, start + size, rest)], dim)


# The comfy.model_base classes of the DiT families, by exact class: a subclass (Flux2 and LongCatImage of newer
# ComfyUI, ChromaRadiance, a custom node's own) may lay its blocks out otherwise (Flux.2's fused rows are not
# Flux.1's), so it is refused naming it instead of being trained with its parent's row offsets
DIT_CLASSES = {"SD3": "mmdit", "Flux": "flux", "Chroma": "flux"}


def dit_family(base, node: str = TRAIN_NAME) -> Optional[str]:
    """``"mmdit"`` or ``"flux"`` for a ComfyUI model (``ModelPatcher.model``) of exactly one of :data:`DIT_CLASSES`,
    None for a model of neither class tree; a ValueError (starting with ``node``) naming the class for a subclass."""
    import comfy.model_base

    klass = type(base)
    if klass.__name__ in DIT_CLASSES and getattr(comfy.model_base, klass.__name__, None) is klass:
        return DIT_CLASSES[klass.__name__]
    parents = [getattr(comfy.model_base, n) for n in DIT_CLASSES if hasattr(comfy.model_base, n)]
    parent = next((p for p in parents if isinstance(base, p)), None)
    if parent is None:
        return None
    raise ValueError(
        f"{node}: this MODEL is a {klass.__module__}.{klass.__name__}, a subclass of ComfyUI's {parent.__name__} that "
        f"the trainer does not know (its layers may be laid out otherwise): expected exactly one of "
        f"{', '.join(DIT_CLASSES)} (comfy.model_base) among DiTs ({FAMILIES}). Connect a model of one of those "
        f"families"
    )


def _dit_table(base, node: str = TRAIN_NAME) -> Optional[tuple[dict, tuple[str, ...]]]:
    """ComfyUI's diffusers-name table and the target names of an SD3 (MMDiT) or Flux-class model, None for
    other models (:func:`dit_family`: a subclass of those is refused)."""
    family = dit_family(base, node)
    cfg = getattr(getattr(base, "model_config", None), "unet_config", None) or {}
    if family == "mmdit":
        return comfy.utils.mmdit_to_diffusers(cfg, output_prefix="diffusion_model."), TRANSFORMER_TARGETS
    if family == "flux":
        return comfy.utils.flux_to_diffusers(cfg, output_prefix="diffusion_model."), FLUX_TARGETS
    return None


def _dit_modules(base, table: dict, targets: tuple[str, ...]) -> dict:
    """diffusers module name -> ComfyUI target (a weight key or ``(key, (dim, start, size))``) of the DiT's
    ``targets`` inside its blocks, that exist in this model (a pre-only last block has no context MLP) and
    whose slice fits the fused weight."""
    weights = dict(base.named_parameters())
    mods = {}
    for dname, entry in table.items():
        mod = dname[: -len(".weight")]
        if not dname.endswith(".weight") or not mod.startswith(DIT_BLOCKS) \
                or not any(mod.endswith("." + t) for t in targets):
            continue
        wkey, offset = split_target(entry)
        w = weights.get(wkey) if wkey is not None else None
        if w is None or w.ndim != 2 or (offset is not None and offset[1] + offset[2] > w.shape[offset[0]]):
            continue
        mods[mod] = entry
    return mods


def lora_keys(model, node: str = TRAIN_NAME) -> dict[str, object]:
    """kohya key -> ComfyUI target of the default targets of ``model``, in diffusers-name order.

    UNets (SD1.x/SD2.x/SDXL): ``lora_unet_<diffusers UNet name>`` -> weight key (:data:`DEFAULT_TARGETS`).
    SD3 (MMDiT) and Flux-class models: ``lora_transformer_<diffusers transformer name>`` (the form ComfyUI's
    ``model_lora_keys_unet`` maps for both) -> weight key, or ``(weight key, (dim, start, size))`` for the
    slices of a fused ``qkv`` (SD3: ``TRANSFORMER_TARGETS``, Flux: :data:`FLUX_TARGETS`). Raises a ValueError
    (starting with ``node``) listing the supported families for any other model."""
    dit = _dit_table(model.model, node)
    if dit is not None:
        mods, prefix = _dit_modules(model.model, *dit), DIT_PREFIX
    else:
        unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
        try:
            diff = comfy.utils.unet_to_diffusers(unet_config)
        except Exception:  # noqa: BLE001 - not a UNet config
            diff = {}
        mods, prefix = {}, "lora_unet_"
        for dname, lname in diff.items():
            if dname.endswith(".weight"):
                mod = dname[: -len(".weight")]
                if any(mod == t or mod.endswith("." + t) for t in DEFAULT_TARGETS):
                    mods[mod] = "diffusion_model." + lname
    if not mods:
        net = type(getattr(model.model, "diffusion_model", None)).__name__
        raise ValueError(
            f"{node}: this MODEL has no layers the refiner LoRA can target: expected a model of a family the "
            f"ComfyUI trainer supports ({FAMILIES}), got {bridge.model_name(model)} (diffusion model {net}). Connect "
            f"a model of one of those families"
        )
    return {prefix + mod.replace(".", "_"): mods[mod] for mod in sorted(mods)}


def lora_targets(model, node: str = TRAIN_NAME) -> tuple[str, ...]:
    """The target layer names (diffusers names) of ``model``'s family, for the refiner's metadata; raises
    :func:`lora_keys`'s error for a model the trainer cannot handle."""
    lora_keys(model, node)
    dit = _dit_table(model.model, node)
    return dit[1] if dit is not None else DEFAULT_TARGETS


# -- inference -------------------------------------------------------------------------------------

class Target:
    """One LoRA pair bound to a ComfyUI weight (or the ``offset`` = ``(dim, start, size)`` slice of a fused one):
    module path, and ComfyUI's LoRA delta in its shape."""

    def __init__(self, weight_key: str, down: torch.Tensor, up: torch.Tensor, scale: float, offset=None):
        self.weight_key = weight_key
        self.offset = offset
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
            zero = torch.zeros(sliced_shape(weight.shape, self.offset), dtype=weight.dtype, device=weight.device)
            self._on[key] = adapter.calculate_weight(zero, self.weight_key, 1.0, 1.0, None, lambda a: a)
        return self._on[key]

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` plus the delta (on its slice for a fused weight)."""
        if self.offset is None:
            return weight + self.delta(weight)
        dim, start, size = self.offset
        return splice(weight, self.offset, weight.narrow(dim, start, size) + self.delta(weight))

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
        wkey, offset = split_target(key_map.get(prefix))
        if wkey is None or wkey not in weights:
            unknown.append(prefix)
            continue
        shape = sliced_shape(weights[wkey].shape, offset)
        if offset is not None and (offset[0] != 0 or offset[1] + offset[2] > weights[wkey].shape[0]):
            bad.append(f"{prefix}: slice {offset} of {wkey} {list(weights[wkey].shape)}")
            continue
        if up.shape[0] != shape[0] or down[0].numel() != math.prod(shape[1:]) or up[0].numel() != down.shape[0]:
            where = wkey if offset is None else f"{wkey}[{offset[1]}:{offset[1] + offset[2]}]"
            bad.append(f"{prefix}: up {list(up.shape)} @ down {list(down.shape)} vs {where} {list(shape)}")
            continue
        targets.append(Target(wkey, down, up, alpha / down.shape[0], offset))
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
    lists on exit. With ``enabled`` False the function returns the weight unchanged. ``guidance``: a
    guidance-conditioned refiner's ``noisecraft.guidance_embed.GuidanceEmbedding`` and ``scale`` its CFG scale:
    while attached, a forward hook on the model's timestep embedding (``diffusion_model.time_embed`` /
    ``t_embedder``) adds it whenever ``enabled`` is on (the ``D_lora`` pass only).
    """

    def __init__(self, targets: list[Target], guidance=None, scale: Optional[float] = None):
        self.targets = targets
        self.enabled = False
        self.guidance, self.scale = guidance, scale

    def _fn(self, target: Target):
        def apply(weight: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return weight
            return target.apply(weight)

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
            with self._guidance_hook(base_model):
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

    def _guidance_hook(self, base_model: torch.nn.Module):
        if self.guidance is None:
            return nullcontext()
        return self.guidance.hooked(base_model, lambda: self.enabled, self.scale)


# -- training --------------------------------------------------------------------------------------

class _Flag:
    enabled = False


class SwitchedLoraDiff(LoraDiff):
    """ComfyUI's trainable LoRA (``w + alpha / rank * up @ down``), applied only while the switch is on; with
    ``offset`` = ``(dim, start, size)`` on that slice of a fused weight (SD3/Flux ``qkv``)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float, switch: _Flag, offset=None):
        with torch.random.fork_rng(devices=[]):  # LoraDiff's layers draw torch's default init first
            super().__init__((up, down, float(alpha), None, None, None))
        self.__dict__["switch"] = switch  # a plain attribute, not a submodule
        self.__dict__["offset"] = offset

    def __call__(self, w):
        if not self.switch.enabled:
            return w
        if self.offset is None:
            return super().__call__(w)
        dim, start, size = self.offset
        return splice(w, self.offset, super().__call__(w.narrow(dim, start, size)))


def _copy(t: torch.Tensor) -> torch.Tensor:
    """Identity: its presence makes ComfyUI's cast path copy the (inference) tensor for autograd."""
    return t


def _inference_init(shape, generator: torch.Generator) -> torch.Tensor:
    """:class:`noisecraft.lora.LoRALayer`'s ``down`` init: Kaiming-uniform, bound 1 / sqrt(fan_in), float64 draws."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return ((torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound).to(torch.float32)


def _keep_saved_block_inputs(patcher) -> None:
    """Make a Flux-class model's blocks differentiable: ComfyUI's Flux blocks add their output to their input
    in place (``txt += ...``, ``x += ...``) after a norm saved that input for backward, which autograd refuses.
    Each block runs (as a ``dit`` block-replace patch of the training clone, around any patch already there)
    under a ``saved_tensors_hooks`` that saves a copy of any tensor sharing the storage of the block's ``img``
    or ``txt`` input, so backward sees the values the norm saw (torch does no version check on hooked saved
    tensors). Costs one copy of the hidden states per block; the forward values are unchanged."""
    net = getattr(patcher.model, "diffusion_model", None)
    if dit_family(patcher.model) != "flux":
        return
    dit = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for block, blocks in (("double_block", "double_blocks"), ("single_block", "single_blocks")):
        for i in range(len(getattr(net, blocks, ()))):
            patcher.set_model_patch_replace(_saving_copies(dit.get((block, i))), "dit", block, i)


def _saving_copies(previous):
    """A ``dit`` block-replace patch: ``previous`` (or the original block) with copies of the saved block inputs."""

    def patch(args, extra):
        live = {t.untyped_storage().data_ptr() for t in (args.get("img"), args.get("txt")) if torch.is_tensor(t)}

        def pack(t):
            return t.clone() if t.untyped_storage().data_ptr() in live else t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return previous(args, extra) if previous is not None else extra["original_block"](args)

    return patch


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
        for key, entry in lora_keys(model).items():
            wkey, offset = split_target(entry)
            shape = sliced_shape(weights[wkey].shape, offset)
            r = min(int(rank), shape[0], math.prod(shape[1:]))
            down = _inference_init((r, *shape[1:]), g).flatten(1)
            up = torch.zeros((shape[0], r), dtype=torch.float32)
            self.adapters[key] = SwitchedLoraDiff(down, up, alpha, self.switch, offset)
            self.weight_keys[key] = wkey
            self.shapes[key] = ((r, *shape[1:]), (shape[0], r, *([1] * (len(shape) - 2))))
        self.adapters.requires_grad_(True)
        for a in self.adapters.values():
            a.alpha.requires_grad_(False)
        self._wrapped: list = []
        self._objects: dict = {}  # object-patch key -> (the model's inference tensor, our copy)

    # -- the switch (the core's LoRASet interface, used by noisecraft.train.refiner.RefinerMethod) ------
    @property
    def enabled(self) -> bool:
        return self.switch.enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self.switch.enabled = bool(on)

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
        wrappers of ``patcher`` (a clone of the MODEL: ComfyUI applies them when it loads the clone).

        An inference tensor outside ComfyUI's cast path (no ``weight_function``: e.g. the ``scale`` of
        Flux's RMSNorm, read with ``cast_to``) gets a normal copy as an object patch of the clone
        (``add_object_patch``, set by ComfyUI when it loads the clone); :meth:`detach` puts the
        original back."""
        targets = set(self.weight_keys.values())
        for key, a in self.adapters.items():
            patcher.add_weight_wrapper(self.weight_keys[key], a)
            self._wrapped.append(a)
        cast = set(targets)
        for name, m in patcher.model.named_modules():
            if not hasattr(m, "weight_function"):
                continue
            for attr in ("weight", "bias"):
                t = getattr(m, attr, None)
                key = f"{name}.{attr}"
                cast.add(key)
                if torch.is_tensor(t) and t.is_inference() and key not in targets:
                    patcher.add_weight_wrapper(key, _copy)
        self._wrapped.append(_copy)
        tensors = [*patcher.model.named_parameters(), *patcher.model.named_buffers()]
        for key, t in tensors:  # (the network's only: model_sampling may be another node's object patch)
            if key.startswith("diffusion_model.") and key not in cast and t.is_inference():
                copy = nn.Parameter(t.clone(), requires_grad=False) if isinstance(t, nn.Parameter) else t.clone()
                patcher.add_object_patch(key, copy)
                self._objects[key] = (t, copy)
        _keep_saved_block_inputs(patcher)

    def check_attached(self, base_model: nn.Module, node: str = TRAIN_NAME) -> None:
        """Once ComfyUI has loaded the clone: every adapter is a weight function of its layer, or a ValueError
        (starting with ``node``) names the layers. Newer ComfyUI's dynamic VRAM loader (``ModelPatcherDynamic``)
        attaches weight wrappers only to modules over 16 KiB and loads smaller ones without them (its ``load``);
        a refiner trained so would silently leave those layers out (GPU report: ``dynamic_vram/train_wrappers``)."""
        missing = []
        for key, a in self.adapters.items():
            module = comfy.utils.get_attr(base_model, self.weight_keys[key].rsplit(".", 1)[0])
            if not any(f is a for f in (getattr(module, "weight_function", None) or [])):
                missing.append(key)
        if missing:
            raise ValueError(
                f"{node}: ComfyUI loaded the MODEL without the refiner's weight wrappers on {len(missing)} of "
                f"{len(self.adapters)} layers (e.g. {', '.join(missing[:3])}); ComfyUI's dynamic VRAM loader attaches "
                f"them only to layers over 16 KiB. Start ComfyUI with --disable-dynamic-vram to train a refiner"
            )

    def detach(self, base_model: nn.Module) -> None:
        """Remove every function and tensor copy :meth:`register` caused from the modules of ``base_model``."""
        for key, (original, copy) in self._objects.items():
            if comfy.utils.get_attr(base_model, key) is copy:
                comfy.utils.set_attr(base_model, key, original)
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
