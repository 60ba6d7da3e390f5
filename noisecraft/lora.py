"""The refiner LoRA on a diffusers UNet: attach, toggle, export/import as a ComfyUI-readable LoRA.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3
(the noise refining network is a LoRA on the diffusion model, attached for the refinement pass
and detached afterwards) and App. D (LoRA on all attention, convolutional and feed-forward
layers; rank 128 for SD2.1, 256 for SDXL). LoRA: Hu et al., arXiv:2106.09685.

This is the diffusers-host mechanism, without peft (ComfyUI has its own: a toggled weight
wrapper, see ``nodes/``). Choices:

* Activation-space LoRA through forward hooks: ``y = layer(x) + (alpha / rank) * up(down(x))``,
  for ``nn.Linear`` (``down``/``up`` linear) and ``nn.Conv2d`` (``down`` with the layer's kernel,
  stride, padding and dilation, ``up`` 1x1), exactly the composition that a merged weight
  ``W + (alpha / rank) * up @ down`` computes (ComfyUI's LoRA patch). The UNet's modules, names
  and ``state_dict`` are untouched; :meth:`LoRASet.remove` takes the hooks off.
* ``enabled`` is one flag shared by every layer: toggling it (``lora.enabled = False``,
  ``with lora.disabled(): ...``) costs nothing and re-patches nothing. Disabled layers return the
  base output bit for bit, and so do enabled layers at initialisation (``up`` = 0).
* ``down`` is initialised like peft (Kaiming-uniform, bound ``1 / sqrt(fan_in)``) from a private
  generator seeded by ``seed`` (never the global RNG); ``up`` is zero.
* Default targets (``DEFAULT_TARGETS``): attention ``to_q``, ``to_k``, ``to_v``, ``to_out.0``;
  resnet ``conv1``, ``conv2``; feed-forward ``ff.net.0.proj``, ``ff.net.2``. Every one of them is
  in ComfyUI's diffusers -> ldm UNet map (``comfy.utils.unet_to_diffusers``), so the export below
  is read by ComfyUI's stock LoRA loader for SD1.x/SD2.x/SDXL-class UNets.
* Export format (kohya, which ComfyUI's ``comfy/lora.py`` maps as ``lora_unet_<diffusers name with
  "." -> "_">``): ``lora_unet_<name>.lora_down.weight`` [rank, in(, kh, kw)],
  ``.lora_up.weight`` [out, rank(, 1, 1)], ``.alpha`` (0-dim), plus string metadata
  (``noisecraft.kind = refiner``, the convention, rank, alpha, targets, and what the caller adds:
  base model, model kind, sigma_max, training settings).

Reading (:func:`read_safetensors`, shared with the NPNet loader; :func:`read_lora_file`,
:func:`load_lora`): a directory, an empty, text, truncated or otherwise unreadable file gives one
``ValueError`` naming the path and what was expected, never a raw safetensors error; tensors with
NaN/inf are refused at load naming the file and the tensors; an ``alpha`` must be one number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import weakref
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "DEFAULT_TARGETS",
    "CONVENTION",
    "LoRALayer",
    "LoRASet",
    "attach_lora",
    "load_lora",
    "read_lora_file",
    "read_safetensors",
    "flat_name",
]

logger = logging.getLogger(__name__)

DEFAULT_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "conv1",
    "conv2",
    "ff.net.0.proj",
    "ff.net.2",
)

CONVENTION = "noisecraft-refine-v1: e_hat = e + s * (D_base(x_T) - D_lora(x_T)) / sigma_max, x_T = noise_to_x(e)"
PREFIX = "lora_unet_"
_MARK = "_noisecraft_refiner_lora"


def flat_name(module_name: str) -> str:
    """A diffusers module name as a kohya/ComfyUI LoRA key: ``lora_unet_`` + name with ``.`` -> ``_``."""
    return PREFIX + module_name.replace(".", "_")


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _lora_pair(base: nn.Module, rank: int, dtype: torch.dtype, device) -> tuple[nn.Module, nn.Module]:
    if isinstance(base, nn.Linear):
        down = nn.utils.skip_init(nn.Linear, base.in_features, rank, bias=False, dtype=dtype, device=device)
        up = nn.utils.skip_init(nn.Linear, rank, base.out_features, bias=False, dtype=dtype, device=device)
        return down, up
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported")
        if base.padding_mode != "zeros":
            raise ValueError(f"LoRA on convolutions with padding_mode={base.padding_mode!r} is not supported")
        down = nn.utils.skip_init(
            nn.Conv2d, base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
            dilation=base.dilation, bias=False, dtype=dtype, device=device,
        )
        up = nn.utils.skip_init(nn.Conv2d, rank, base.out_channels, 1, bias=False, dtype=dtype, device=device)
        return down, up
    raise TypeError(f"LoRA targets must be nn.Linear or nn.Conv2d, got {type(base).__name__}")


class LoRALayer(nn.Module):
    """The trainable part for one layer: ``(alpha / rank) * up(down(x))``, added to the layer's output."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, dtype=None, device=None):
        super().__init__()
        if int(rank) != rank or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"LoRA alpha must be finite, got {alpha}")
        w = base.weight
        self.lora_down, self.lora_up = _lora_pair(base, int(rank), dtype or torch.float32, device or w.device)
        self.rank = int(rank)
        self.alpha = alpha

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self, generator: torch.Generator) -> None:
        """peft's init: ``down`` Kaiming-uniform (a = sqrt(5), bound 1 / sqrt(fan_in)), ``up`` zero."""
        w = self.lora_down.weight
        fan_in = w[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            w.copy_((torch.rand(w.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
            self.lora_up.weight.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_down.weight.dtype
        return self.lora_up(self.lora_down(x.to(dtype))) * self.scale


class LoRASet(nn.Module):
    """LoRA layers hooked onto a model's modules, with one shared ``enabled`` flag.

    ``layers`` is an ``nn.ModuleDict`` keyed by the export prefix (``lora_unet_<flat name>``);
    ``module_names`` maps each key to the diffusers module name. Use :func:`attach_lora` (new,
    zero-initialised) or :func:`load_lora` (from a saved refiner).
    """

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict()
        self.module_names: dict[str, str] = {}
        self.targets: tuple[str, ...] = ()
        self._enabled = True
        self._handles: list = []
        self._model_ref: Optional[weakref.ref] = None  # a weakref: the model must not become a submodule

    # -- toggling ---------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model without the LoRA inside the block (restores the previous state)."""
        prev, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = prev

    def base_and_lora(self, denoiser):
        """``(D_base, D_lora)`` for :func:`noisecraft.refine.refine_noise` from one denoiser over the
        hooked model: ``D_base`` runs with the LoRA disabled, ``D_lora`` with it enabled."""

        def base(x, sigma):
            with self.disabled():
                return denoiser(x, sigma)

        def lora(x, sigma):
            prev, self._enabled = self._enabled, True
            try:
                return denoiser(x, sigma)
            finally:
                self._enabled = prev

        return base, lora

    # -- hooks --------------------------------------------------------------------------------
    def _hook(self, key: str):
        def hook(module, args, kwargs, output):
            if not self._enabled:
                return None
            x = args[0] if args else kwargs.get("input")
            return output + self.layers[key].delta(x).to(output.dtype)

        return hook

    def _attach(self, model: nn.Module, key: str, module_name: str, layer: LoRALayer) -> None:
        module = model.get_submodule(module_name)
        self.layers[key] = layer
        self.module_names[key] = module_name
        self._handles.append(module.register_forward_hook(self._hook(key), with_kwargs=True))

    def remove(self) -> None:
        """Take every hook off the model (the LoRA weights stay in this object)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None and model.__dict__.get(_MARK) is self:
            del model.__dict__[_MARK]
        self._model_ref = None

    def _bind(self, model: nn.Module) -> None:
        current = model.__dict__.get(_MARK)
        if current is not None and current.attached:
            raise ValueError(
                f"this {type(model).__name__} already has a refiner LoRA attached ({len(current.layers)} layers): "
                "call .remove() on it first (two LoRAs would both be added)"
            )
        self._model_ref = weakref.ref(model)
        model.__dict__[_MARK] = self  # not a submodule: the model's state_dict is unchanged

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- export / import -----------------------------------------------------------------------
    def export_state_dict(self, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The kohya/ComfyUI LoRA state dict (CPU tensors; ``dtype`` defaults to the weights')."""
        out: dict[str, torch.Tensor] = {}
        for key, layer in self.layers.items():
            d = layer.lora_down.weight.detach()
            u = layer.lora_up.weight.detach()
            if dtype is not None:
                d, u = d.to(dtype), u.to(dtype)
            out[f"{key}.lora_down.weight"] = d.cpu().contiguous()
            out[f"{key}.lora_up.weight"] = u.cpu().contiguous()
            out[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
        return out

    def metadata(self, extra: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
        ranks = sorted({layer.rank for layer in self.layers.values()})
        alphas = sorted({layer.alpha for layer in self.layers.values()})
        meta = {
            "noisecraft.kind": "refiner",
            "noisecraft.convention": CONVENTION,
            "noisecraft.rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
            "noisecraft.alpha": repr(alphas[0]) if len(alphas) == 1 else json.dumps(alphas),
            "noisecraft.targets": json.dumps(list(self.targets)),
            "noisecraft.layers": str(len(self.layers)),
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks[0]) if ranks else "0",
            "ss_network_alpha": repr(alphas[0]) if alphas else "0",
        }
        for k, v in (extra or {}).items():
            key = k if "." in k or k.startswith("ss_") else f"noisecraft.{k}"
            meta[key] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        return meta

    def save(self, path: str | os.PathLike, metadata: Optional[Mapping[str, Any]] = None, dtype: Optional[torch.dtype] = None) -> Path:
        """Write a safetensors LoRA atomically (temporary file + rename). ``metadata`` adds keys such
        as ``base_model``, ``model_kind``, ``sigma_max``, ``training`` (non-strings JSON-encoded;
        plain keys get the ``noisecraft.`` prefix)."""
        from safetensors.torch import save_file

        from .io import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:  # our temp name, fsynced, renamed, folder fsynced
            save_file(self.export_state_dict(dtype), str(tmp), metadata=self.metadata(metadata))
        return path

    def load_exported(self, state: Mapping[str, torch.Tensor], source: str = "the state dict") -> None:
        """Copy an exported state dict into these layers; every key and shape must match."""
        expected = set(self.export_state_dict().keys())
        got = set(state.keys())
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source} does not match this LoRA ({len(self.layers)} layers): missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}; "
                "it was made for another model or other targets"
            )
        with torch.no_grad():
            for key, layer in self.layers.items():
                for part, param in (("lora_down", layer.lora_down.weight), ("lora_up", layer.lora_up.weight)):
                    t = state[f"{key}.{part}.weight"]
                    if tuple(t.shape) != tuple(param.shape):
                        raise ValueError(
                            f"{source}: {key}.{part}.weight has shape {tuple(t.shape)} but this model's layer "
                            f"{self.module_names[key]!r} needs {tuple(param.shape)}"
                        )
                    param.copy_(t)
                layer.alpha = _alpha(state[f"{key}.alpha"], key, source, layer.rank)


def _candidates(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    return {
        flat_name(name): (name, m)
        for name, m in model.named_modules()
        if name and isinstance(m, (nn.Linear, nn.Conv2d))
    }


def attach_lora(
    model: nn.Module,
    rank: int,
    alpha: Optional[float] = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
) -> LoRASet:
    """Hook new zero-initialised LoRA layers onto every Linear/Conv2d of ``model`` whose name is, or
    ends with ``.`` + , one of ``targets`` (diffusers names). ``alpha`` defaults to ``rank`` (scale 1).

    The model's own weights are not touched (freeze them yourself for training); the LoRA weights
    are float32 by default (``dtype``) on the model's device. Returns the :class:`LoRASet`
    (``.parameters()`` are the trainable weights).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_lora needs an nn.Module (a diffusers UNet), got {type(model).__name__}")
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one layer, e.g. noisecraft.lora.DEFAULT_TARGETS")
    alpha = float(rank if alpha is None else alpha)
    g = torch.Generator().manual_seed(int(seed))
    lora = LoRASet()
    lora.targets = targets
    lora._bind(model)
    try:
        for key, (name, module) in sorted(_candidates(model).items(), key=lambda kv: kv[1][0]):
            if not _matches(name, targets):
                continue
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                logger.debug("skipping grouped convolution %s", name)
                continue
            layer = LoRALayer(module, rank, alpha, dtype=dtype, device=module.weight.device)
            layer.reset_parameters(g)
            lora._attach(model, key, name, layer)
    except BaseException:
        lora.remove()
        raise
    if not lora.layers:
        lora.remove()
        examples = [name for _, (name, _) in list(_candidates(model).items())[:6]]
        raise ValueError(
            f"no Linear/Conv2d layer of {type(model).__name__} matches the targets {list(targets)}; "
            f"its layers are named like {examples}"
        )
    return lora


_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _safetensors_problem(path: Path, size: int) -> Optional[str]:
    """Why ``path`` is no complete safetensors file, in words, or None if its header and data fit."""
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9 or head[8:9] != b"{":
            text = head and all(32 <= c < 127 or c in (9, 10, 13) for c in head)
            what = "a text file" if text else "not a safetensors file"
            return f"is {what} ({size} bytes, starting with {head[:8]!r})"
        n = int.from_bytes(head[:8], "little")
        if n > _MAX_HEADER or 8 + n > size:
            return f"is truncated (its safetensors header needs {8 + n} bytes, the file has {size})"
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            return f"has a damaged safetensors header ({size} bytes)"
    if not isinstance(header, dict):
        return f"has a damaged safetensors header ({size} bytes)"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(v, int) for v in offsets)):
            return f"has a damaged safetensors header (entry {key!r})"
        end = max(end, offsets[1])
    if 8 + n + end > size:
        return f"is truncated (its tensors need {8 + n + end} bytes, the file has {size})"
    return None


def read_safetensors(path: str | os.PathLike, expected: str,
                     advice: str = "Download or save it again.") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, on the CPU (no unpickling, any torch).

    Raises ``FileNotFoundError`` for a missing path and one ``ValueError`` naming the path,
    ``expected`` (what the caller wanted, e.g. "a safetensors refiner LoRA") and ``advice`` for a
    directory, an unreadable, empty, text, truncated or corrupt file; never a safetensors error.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; expected {expected}")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected {expected} (a file): pass the file inside it")
    try:
        size = path.stat().st_size
        problem = _safetensors_problem(path, size)
    except OSError as exc:
        raise ValueError(f"{path}: could not read it ({type(exc).__name__}: {exc.strerror or exc}); expected "
                         f"{expected}: check its permissions") from None
    if problem is None:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return tensors, meta
        except Exception as exc:  # noqa: BLE001 - SafetensorsError, OSError, ...: one message for all
            problem = f"failed in the safetensors reader ({type(exc).__name__}: {str(exc)[:200]})"
    raise ValueError(f"{path}: could not read it as safetensors: it {problem}; expected {expected}. {advice}")


_LORA_EXPECTED = ("a safetensors LoRA (kohya/ComfyUI '<name>.lora_down.weight' / '.lora_up.weight' / '.alpha' "
                  "keys, e.g. a refiner from `python -m noisecraft train-refiner`)")


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a safetensors LoRA (CPU, no unpickling).

    A missing file is a ``FileNotFoundError``; a directory, a file without the ``.safetensors``
    suffix, an empty, text, truncated or corrupt file, and NaN/inf tensors are one ``ValueError``
    naming the path and what was expected."""
    from .ode import check_tensors_finite

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {path} does not exist; expected {_LORA_EXPECTED}")
    if not path.is_dir() and path.suffix != ".safetensors":
        raise ValueError(f"{path}: refiner LoRAs are read from .safetensors files only; expected {_LORA_EXPECTED}")
    state, meta = read_safetensors(path, _LORA_EXPECTED, "Download it again or re-save the refiner.")
    check_tensors_finite(state, str(path), fix="re-download it, or retrain it (e.g. with a lower learning rate)")
    return state, meta


def _alpha(t: Optional[torch.Tensor], key: str, label: str, rank: int) -> float:
    """A LoRA layer's alpha: one finite number (0-dim or 1 element), or the rank when absent."""
    if t is None:
        return float(rank)
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{label}: {key}.alpha has shape {shape}; expected one number (a scalar alpha per layer, "
                         f"as kohya and NoiseCraft write it): the file is damaged or no kohya LoRA; re-save it")
    alpha = float(t)
    if not math.isfinite(alpha):
        raise ValueError(f"{label}: {key}.alpha is {alpha}; expected a finite number: the file is damaged, re-save it")
    return alpha


def load_lora(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    dtype: Optional[torch.dtype] = None,
) -> LoRASet:
    """Hook a saved LoRA (path or exported state dict, kohya ``lora_unet_*`` keys) onto ``model``.

    Rank and alpha come from the file, per layer. A key that names no Linear/Conv2d of ``model``, or
    a shape that does not fit, raises a ValueError naming the key, the layer and both shapes.
    """
    if isinstance(source, Mapping):
        state, label = dict(source), "the LoRA state dict"
        from .ode import check_tensors_finite

        check_tensors_finite(state, label)
    else:
        state, meta = read_lora_file(source)
        label = str(source)
        kind = meta.get("noisecraft.kind")
        if kind is not None and kind != "refiner":
            logger.warning("%s has noisecraft.kind=%r, not 'refiner'", label, kind)
    prefixes = sorted({k.rsplit(".lora_down.weight", 1)[0] for k in state if k.endswith(".lora_down.weight")})
    if not prefixes:
        raise ValueError(f"{label} holds no '<name>.lora_down.weight' keys: it is not a LoRA in kohya/ComfyUI format")
    cands = _candidates(model)
    unknown = [p for p in prefixes if p not in cands]
    if unknown:
        raise ValueError(
            f"{label} has {len(unknown)} LoRA keys that name no Linear/Conv2d layer of this "
            f"{type(model).__name__} (e.g. {unknown[:3]}): it was trained for another model"
        )
    layers: list[tuple[str, str, LoRALayer]] = []
    for key in prefixes:  # build and check everything before touching the model
        name, module = cands[key]
        down, up = state[f"{key}.lora_down.weight"], state.get(f"{key}.lora_up.weight")
        if up is None:
            raise ValueError(f"{label}: {key}.lora_up.weight is missing")
        if not isinstance(down, torch.Tensor) or down.ndim not in (2, 4) or not isinstance(up, torch.Tensor):
            raise ValueError(f"{label}: {key}.lora_down.weight has shape "
                             f"{list(getattr(down, 'shape', ())) or type(down).__name__}; expected a 2-d (linear) or "
                             f"4-d (conv) LoRA down weight: the file is damaged or no kohya LoRA")
        rank = int(down.shape[0])
        alpha = _alpha(state.get(f"{key}.alpha"), key, label, rank)
        layer = LoRALayer(module, rank, alpha, dtype=dtype or torch.float32, device=module.weight.device)
        for part, t, param in (("lora_down", down, layer.lora_down.weight), ("lora_up", up, layer.lora_up.weight)):
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(
                    f"{label}: {key}.{part}.weight has shape {tuple(t.shape)} but layer {name!r} of this "
                    f"{type(model).__name__} needs {tuple(param.shape)}: the LoRA was trained for another model"
                )
            with torch.no_grad():
                param.copy_(t)
        layers.append((key, name, layer))
    lora = LoRASet()
    lora._bind(model)
    for key, name, layer in layers:
        lora._attach(model, key, name, layer)
    lora.targets = tuple(name for _, name, _ in layers)
    return lora
