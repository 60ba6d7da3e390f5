"""Guidance-scale control for a NoiseRefine refiner: the CFG scale as an extra input of the refiner pass.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 4
"Controllability" and App. A.4 (training-based control): "the model can be conditioned on an
additional guidance-scale embedding ... following the conditioning design in (Meng et al., 2023), we
inject the guidance-scale embedding into the existing timestep embedding rather than introducing a new
conditioning branch. The scale is encoded with a sinusoidal embedding and projected through a linear
layer to match the timestep-embedding dimension". Meng et al., "On Distillation of Guided Diffusion
Models" (arXiv:2210.03142); the sinusoidal form is the one of diffusers' latent-consistency pipelines
(``get_guidance_scale_embedding``, Luo et al., arXiv:2310.04378).

:class:`GuidanceEmbedding` = ``Linear(sinusoidal(scale) -> width, bias=False)``:

* ``sinusoidal``: diffusers' ``get_timestep_embedding((g - shift) * mult, freq_dim, flip_sin_to_cos=False,
  downscale_freq_shift=1)``, the LCM pipelines' guidance-scale embedding form, with ``freq_dim`` 256,
  ``shift`` 1 and (ours) ``mult`` 1 instead of LCM's 1000: with 1000, the upper ~3/4 of the frequencies wrap
  many times over a CFG range (e.g. 1.5..5) and act as noise features of the scale; with 1, every feature is a
  smooth function of g (frequencies 1e-4..1 per unit of scale). Measured on the toy
  (``benchmarks/bench_guidance_control.py``, same budget): mean MSE to CFG over g = 1.5..5 equal (0.0572 vs
  0.0573), 1 better at g = 3 (0.041 vs 0.054), 1000 better at g = 1.5 (0.019 vs 0.028). All three numbers
  are stored in the file, so a refiner made with another choice loads as it was trained.
* ``width``: the output width of the host network's timestep-embedding module (:func:`find_time_embedding`:
  diffusers UNets ``time_embedding``, SD3-class transformers ``time_text_embed``, ComfyUI UNets
  ``diffusion_model.time_embed``, ComfyUI MMDiT ``diffusion_model.t_embedder``); the projection is
  *added to that module's output* by a forward hook. Ours (the paper does not say at which end of the
  embedding MLP): the output is the one point every family has (SD3's and MMDiT's embedders take a raw
  timestep, not a sinusoid), and ComfyUI's MMDiT adds its pooled-text embedding to ``t_embedder``'s
  output afterwards, which is the same sum as diffusers' ``time_text_embed`` output plus the delta.
* zero-initialised, no bias: at initialisation (and for any scale) the conditioned refiner is exactly
  the plain refiner (the delta is 0.0 bit for bit), so training starts from today's refiner.
* the hook adds the delta only while the refiner is on (``is_on()``: the LoRA's ``enabled`` flag, or
  ComfyUI's refiner switch): base passes, the student's and the sampler's passes never see it. The scale
  is per sample ([B], or one number for all); a latent batch that is a multiple of it is tiled
  (sample ``j * n + i`` gets scale ``i``, as ComfyUI and :class:`~noisecraft.hosts.diffusers.DiffusersDenoiser`
  tile conditions). A conditioned refiner run without a scale raises :class:`GuidanceMissing` naming the fix.

File: the refiner file (:mod:`noisecraft.lora`) gains one tensor ``noisecraft_guidance.proj.weight``
[width, freq_dim] and the metadata key ``noisecraft.guidance_embedding`` (JSON: freq_dim, shift, mult,
width, range, module). Old refiner files have neither and load as plain refiners. ComfyUI's stock LoRA
loader ignores the extra tensor (it logs "lora key not loaded: noisecraft_guidance.proj.weight") and
applies the LoRA part: that is the plain refiner, without the scale input.

Teacher scales (:func:`scale_draws`): sample ``i`` of a teacher cache gets ``lo + (hi - lo) * u_i`` with
``u_i = frac(c + i * (sqrt(5) - 1) / 2)``, ``c = frac(base_seed * sqrt(2))``: a quasi-random
(golden-ratio) draw, a pure function of ``(base_seed, i)``, so any shard can be built by any job and a
killed build resumes with the same scales; any n consecutive samples cover the range within about 1/n
(independent uniform draws leave gaps of several times that at the few hundred samples of a small cache),
and with condition ``i % P`` each condition's scales are equidistributed too.

Where it is wired: :func:`noisecraft.train.train_refiner` (``RefinerTrainConfig.guidance_range``), the teacher
cache (``build_teacher_cache(..., guidance_range=)``, :func:`noisecraft.train.teacher_cache.per_sample_teacher`),
``train-refiner --guidance-range LO HI``, :class:`noisecraft.hosts.adapters.LoRASet` (``add_guidance``,
``base_and_lora(..., guidance=)``) and ComfyUI's Refine Noise (``guidance`` input). Not yet: ComfyUI's Build
Teacher Cache / Train Refiner nodes train plain refiners only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["GuidanceEmbedding", "GuidanceMissing", "META_KEY", "TENSOR_PREFIX", "WEIGHT_KEY", "DEFAULT_FREQ_DIM",
           "DEFAULT_MULT", "TIME_EMBEDDING_MODULES",
           "find_time_embedding", "embedding_width", "check_guidance", "check_guidance_range", "scale_draws",
           "cfg_per_sample"]

logger = logging.getLogger(__name__)

META_KEY = "noisecraft.guidance_embedding"
TENSOR_PREFIX = "noisecraft_guidance."
WEIGHT_KEY = TENSOR_PREFIX + "proj.weight"
TIME_EMBEDDING_MODULES: tuple[str, ...] = ("time_embedding", "time_text_embed", "time_embed", "t_embedder")
DEFAULT_FREQ_DIM = 256
DEFAULT_MULT = 1.0
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class GuidanceMissing(ValueError):
    """A guidance-conditioned refiner ran without a guidance scale."""


def check_guidance(value, what: str = "guidance") -> float:
    """A guidance scale: one finite number >= 0 (the CFG scale; 1 = no guidance)."""
    try:
        g = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number (the CFG scale to imitate, e.g. 3.0), got {value!r}") from None
    if not math.isfinite(g) or g < 0:
        raise ValueError(f"{what} must be a finite number >= 0 (the CFG scale to imitate, e.g. 3.0), got {g}")
    return g


def check_guidance_range(value, what: str = "guidance_range") -> Optional[tuple[float, float]]:
    """``None`` or ``(lo, hi)``: two finite CFG scales with ``0 <= lo <= hi``."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two CFG scales (lo, hi), e.g. (1.5, 5.0), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi < lo:
        raise ValueError(f"{what} must be two finite CFG scales with 0 <= lo <= hi, e.g. (1.5, 5.0), got {(lo, hi)}")
    return lo, hi


def scale_draws(indices: Sequence[int] | torch.Tensor, base_seed: int, guidance_range) -> torch.Tensor:
    """The teacher's CFG scale of samples ``indices`` (float32 [n]; see the module docstring)."""
    lo, hi = check_guidance_range(guidance_range)
    idx = torch.as_tensor(indices, dtype=torch.float64).reshape(-1)
    c = math.fmod(abs(int(base_seed)) * math.sqrt(2.0), 1.0)
    u = torch.remainder(c + idx * _GOLDEN, 1.0)
    return (lo + (hi - lo) * u).to(torch.float32)


def cfg_per_sample(denoiser, scales: torch.Tensor) -> Callable:
    """A CFG denoiser with one scale per sample: ``D(x, s) = u + g * (c - u)`` on the x0 predictions.

    ``denoiser``: a guided :class:`~noisecraft.hosts.diffusers.DiffusersDenoiser` (its cond, uncond and extra
    inputs; its own scalar cfg is not used), called through its public ``inputs`` / ``conditioning`` /
    ``predict`` / ``x0_from``: a cond and an uncond forward of B each (CFG's cost per sample; they may have
    different token counts)."""
    g = torch.as_tensor(scales, dtype=torch.float32).reshape(-1)

    def guided(x: torch.Tensor, sigma) -> torch.Tensor:
        xf, s, xin, t = denoiser.inputs(x, sigma)
        b = xf.shape[0]
        if g.numel() != b:
            raise ValueError(f"cfg_per_sample: {g.numel()} scales for a batch of {b}")
        c, u = (denoiser.x0_from(xf, s, denoiser.predict(xin, t, *denoiser.conditioning(b, uncond=side)).float())
                for side in (False, True))
        denoiser.passes += 2
        w = g.to(xf.device).view(b, *([1] * (x.ndim - 1)))
        return (u + w * (c - u)).to(device=x.device, dtype=x.dtype)

    return guided


def find_time_embedding(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the timestep-embedding module of a diffusers or ComfyUI network (or of a ComfyUI
    ``BaseModel``, through ``diffusion_model``); ValueError naming the names looked for."""
    for prefix in ("", "diffusion_model."):
        for name in TIME_EMBEDDING_MODULES:
            try:
                module = model.get_submodule(prefix + name)
            except AttributeError:
                continue
            if isinstance(module, nn.Module):
                return prefix + name, module
    raise ValueError(f"guidance-scale control: {type(model).__name__} has no timestep-embedding module (looked for "
                     f"{', '.join(TIME_EMBEDDING_MODULES)}, also under diffusion_model.): this model family cannot "
                     f"take a guidance-conditioned refiner; train a plain one (no guidance range)")


def embedding_width(module: nn.Module) -> int:
    """The output width of a timestep-embedding module: its last Linear's ``out_features``."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"guidance-scale control: the timestep embedding ({type(module).__name__}) has no Linear "
                         "layer to read its width from")
    return int(linears[-1].out_features)


class GuidanceEmbedding(nn.Module):
    """``proj(sinusoidal(g))``: the guidance-scale embedding added to the timestep embedding (module docstring).

    ``width``: the timestep-embedding width; ``freq_dim``, ``shift``, ``mult``: the sinusoid of
    ``(g - shift) * mult``; ``train_range``: the scales it was trained on (metadata; a scale outside logs
    a warning). ``proj`` starts at zero."""

    def __init__(self, width: int, freq_dim: int = DEFAULT_FREQ_DIM, shift: float = 1.0, mult: float = DEFAULT_MULT,
                 train_range: Optional[Sequence[float]] = None):
        super().__init__()
        if int(width) < 1 or int(freq_dim) < 4 or int(freq_dim) % 2:
            raise ValueError(f"GuidanceEmbedding needs width >= 1 and an even freq_dim >= 4, got {width}, {freq_dim}")
        self.width, self.freq_dim, self.shift, self.mult = int(width), int(freq_dim), float(shift), float(mult)
        self.train_range = check_guidance_range(train_range)
        self.proj = nn.Linear(self.freq_dim, self.width, bias=False)
        with torch.no_grad():
            self.proj.weight.zero_()
        self._scale: Optional[torch.Tensor] = None
        self._handle = None
        self.module_name: Optional[str] = None

    @classmethod
    def for_model(cls, model: nn.Module, train_range=None, **kw) -> "GuidanceEmbedding":
        """A new (zero) embedding of the width of ``model``'s timestep embedding, on its device, float32."""
        name, module = find_time_embedding(model)
        emb = cls(embedding_width(module), train_range=train_range, **kw)
        p = next(model.parameters(), None)
        if p is not None:
            emb.to(p.device)
        emb.module_name = name
        return emb

    def sinusoid(self, scale: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        w = (scale.to(torch.float32).reshape(-1) - self.shift) * self.mult
        return get_timestep_embedding(w, self.freq_dim, flip_sin_to_cos=False, downscale_freq_shift=1)

    def forward(self, scale) -> torch.Tensor:
        """``[n, width]`` float32 on the projection's device for scales ``[n]`` (or one number)."""
        dev = self.proj.weight.device
        s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).to(dev)
        return self.proj(self.sinusoid(s).to(dev, self.proj.weight.dtype)).to(torch.float32)

    # -- the scale of the next refiner passes --------------------------------------------------------
    @contextlib.contextmanager
    def at(self, scale) -> Iterator[None]:
        """Inside the block the hooked refiner pass uses ``scale`` (a number, or one per sample)."""
        s = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1).cpu()
        for v in s.tolist():
            check_guidance(v)
        if self.train_range is not None and s.numel() and (float(s.min()) < self.train_range[0] - 1e-6
                                                           or float(s.max()) > self.train_range[1] + 1e-6):
            logger.warning("guidance %s is outside the range the refiner was trained on (%g..%g): extrapolating",
                           [round(v, 3) for v in s.tolist()[:4]], *self.train_range)
        prev, self._scale = self._scale, s
        try:
            yield
        finally:
            self._scale = prev

    def delta_for(self, out: torch.Tensor) -> torch.Tensor:
        """What the hook adds to the timestep-embedding output ``out`` [B, width]."""
        if self._scale is None:
            raise GuidanceMissing(
                "this refiner was trained with guidance-scale control (noisecraft.guidance_embedding, trained on "
                f"cfg {self.train_range}) and needs the CFG scale to imitate: give guidance=<scale> (Refine Noise's "
                "guidance input, LoRASet.base_and_lora(..., guidance=...))")
        d = self(self._scale)
        b, n = out.shape[0], d.shape[0]
        if n != b:
            if n == 1 or b % n == 0:
                d = d.repeat(b // n, 1) if n > 1 else d.expand(b, -1)
            else:
                raise ValueError(f"guidance-scale control: {n} scales for a batch of {b}: give one scale, or one per "
                                 "sample")
        if out.ndim != 2 or out.shape[-1] != self.width:
            raise ValueError(f"guidance-scale control: the timestep embedding returned {tuple(out.shape)}, the "
                             f"refiner's embedding has width {self.width}: the refiner was trained for another model")
        return d.to(device=out.device, dtype=out.dtype)

    # -- the hook ---------------------------------------------------------------------------------
    def hook(self, model: nn.Module, is_on: Callable[[], bool]) -> str:
        """Add the embedding to ``model``'s timestep embedding while ``is_on()``; returns the module's name."""
        self.unhook()
        name, module = find_time_embedding(model)
        if embedding_width(module) != self.width:
            raise ValueError(f"guidance-scale control: {name} of this {type(model).__name__} has width "
                             f"{embedding_width(module)}, the refiner's embedding {self.width}: the refiner was "
                             "trained for another model")

        def add(_module, _args, out):
            return out + self.delta_for(out) if is_on() else out

        self._handle = module.register_forward_hook(add)
        self.module_name = name
        return name

    def unhook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @contextlib.contextmanager
    def hooked(self, model: nn.Module, is_on: Callable[[], bool], scale) -> Iterator[None]:
        """:meth:`hook` and :meth:`at` for the duration of the block (ComfyUI's refiner passes)."""
        self.hook(model, is_on)
        try:
            with self.at(scale):
                yield
        finally:
            self.unhook()

    # -- the refiner file ------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {WEIGHT_KEY: self.proj.weight.detach().to("cpu", torch.float32).contiguous()}

    def file_metadata(self) -> dict[str, str]:
        info = {"freq_dim": self.freq_dim, "shift": self.shift, "mult": self.mult, "width": self.width,
                "range": list(self.train_range) if self.train_range else None, "module": self.module_name,
                "form": "timestep_embedding_out += proj(get_timestep_embedding((g - shift) * mult, freq_dim, "
                        "flip_sin_to_cos=False, downscale_freq_shift=1)), while the refiner is on"}
        return {META_KEY: json.dumps(info, sort_keys=True)}

    @classmethod
    def from_file(cls, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                  label: str = "the refiner") -> Optional["GuidanceEmbedding"]:
        """The embedding stored in a refiner file's tensors + metadata, or None for a plain refiner."""
        w, raw = state.get(WEIGHT_KEY), (metadata or {}).get(META_KEY)
        if w is None and raw is None:
            return None
        try:
            info = json.loads(raw) if raw is not None else None
            if not isinstance(info, dict):
                raise ValueError
            freq_dim, width = int(info["freq_dim"]), int(info["width"])
            shift, mult = float(info["shift"]), float(info["mult"])
        except (KeyError, TypeError, ValueError):
            info = None
        if w is None or info is None or tuple(w.shape) != (width, freq_dim):
            raise ValueError(f"{label}: its guidance-scale embedding is incomplete or damaged ({WEIGHT_KEY} "
                             f"{None if w is None else list(w.shape)}, {META_KEY} {raw!r}): re-save the refiner")
        emb = cls(width, freq_dim, shift, mult, info.get("range"))
        with torch.no_grad():
            emb.proj.weight.copy_(w.to(torch.float32))
        emb.module_name = info.get("module")
        return emb
