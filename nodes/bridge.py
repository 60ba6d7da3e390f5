"""ComfyUI MODEL + CONDITIONING -> the core's denoiser ``D(x, sigma) -> x0``.

The core algorithms (:mod:`noisecraft.ode`, :mod:`noisecraft.stability`) are written against a
denoiser in sigma space. Inside ComfyUI that denoiser is the CFG'd ``model_wrap`` a sampler
receives, so we run the core *inside* ``comfy.samplers.CFGGuider.sample(...)`` with a custom
:class:`comfy.samplers.Sampler`: by the time its ``sample()`` runs, ComfyUI has loaded the model,
processed the conditioning (SDXL size embeddings, masks, ControlNets) and applied the model's
patches (LoRAs, PAG, ...). Nothing of that preparation is re-implemented here.

Batching: the guider prepares the conditioning for the batch of the latent it is given (B), and
ComfyUI tiles every condition to the batch of each model call (``repeat_to_batch_size``, and
ControlNet's ``broadcast_image_to``), so a call on ``m * B`` samples laid out candidate-major
(sample ``j * B + b`` is candidate j of item b, the layout of :func:`noisecraft.stability.select`)
sees condition b for every sample of item b.

Inversion runs with its own guidance scale: the inverse denoiser sets the guider's ``cfg`` for
the duration of one call (``CFGGuider.predict_noise`` reads ``self.cfg`` at every call, and at
cfg 1 ``sampling_function`` skips the negative pass, so a cfg-1 inversion costs one pass per step).

Input checks shared by the nodes live here too: :func:`prepare_latent` (an empty, non-float or
wrong-channel LATENT) and :func:`check_conditioning` (an empty CONDITIONING, NaN/inf embeddings,
or a text width the MODEL does not read, :func:`context_width`), with messages that start with
the node's name and name the input.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils

from ..noisecraft.ode import Denoiser
from ..noisecraft.sigmas import ModelKind
from ..noisecraft.solvers import is_stochastic

log = logging.getLogger(__name__)

__all__ = [
    "BridgeContext",
    "Progress",
    "model_name",
    "model_kind",
    "prediction_type",
    "sigma_max",
    "scheduler_names",
    "get_sigmas",
    "prepare_latent",
    "context_width",
    "check_conditioning",
    "run_core",
    "sampler_name",
    "run_sampler",
]


def model_name(model) -> str:
    """A ComfyUI MODEL's model class name (e.g. ``SDXL``, ``SD15``), for messages and metadata."""
    inner = getattr(model, "model", None)
    cfg = getattr(inner, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(inner).__name__


# ComfyUI's prediction types the core supports, by exact class (comfy.model_sampling): a subclass (IMG_TO_IMG_FLOW
# and IMG_TO_IMG_VELOCITY of CONST, X0 and IMG_TO_IMG of EPS, EDM of V_PREDICTION, a custom node's own) computes x0
# or the start latent its own way, so it is refused naming it instead of being taken for its parent
PREDICTION_KINDS = {"EPS": ModelKind.EPS, "V_PREDICTION": ModelKind.V, "CONST": ModelKind.FLOW}
# the methods that make a prediction type: a class of the schedule side overriding one of them is one of its own
_PREDICTION_METHODS = ("calculate_input", "calculate_denoised", "noise_scaling", "inverse_noise_scaling")


def prediction_type(ms) -> type:
    """The prediction-type class of a ComfyUI ``model_sampling`` object. ComfyUI combines a schedule (an
    ``nn.Module``: ``ModelSamplingDiscrete``, ``ModelSamplingDiscreteFlow``, ...) and a prediction type (a plain
    class: ``EPS``, ``CONST``, ...) into one class; the prediction type is the first class of its MRO that is not a
    module, or an earlier (schedule-side) class that overrides a prediction method itself."""
    for klass in type(ms).__mro__:
        if not issubclass(klass, torch.nn.Module) or any(name in vars(klass) for name in _PREDICTION_METHODS):
            return klass
    return type(ms)


def model_kind(model) -> ModelKind:
    """The core's model kind of a ComfyUI MODEL (a ``ModelPatcher``), from its ``model_sampling``.

    Decided by the exact prediction-type class (:func:`prediction_type`, :data:`PREDICTION_KINDS`): eps, v and
    CONST (flow) with unit noise scale. Anything else, a subclass of those included, is refused naming the class.
    """
    ms = model.get_model_object("model_sampling")
    pred = prediction_type(ms)
    kind = PREDICTION_KINDS.get(pred.__name__) if getattr(comfy.model_sampling, pred.__name__, None) is pred else None
    scale = getattr(ms, "noise_scale", 1.0)
    if kind is ModelKind.FLOW and scale != 1.0:
        raise ValueError(
            f"NoiseCraft's flow models start from unit noise (x_T = e); this MODEL ({model_name(model)}) scales its "
            f"noise by noise_scale={scale!r}. Remove the node that sets the noise scale (or set it to 1.0)"
        )
    if kind is not None:
        return kind
    where = pred.__module__
    raise ValueError(
        f"NoiseCraft supports the eps, v-prediction and flow (CONST) prediction types of comfy.model_sampling, "
        f"exactly; this MODEL ({model_name(model)}) uses {pred.__name__} ({where}), which computes its prediction "
        f"its own way. Use an SD1.x/SD2.x/SDXL or SD3/Flux-class model, or a ModelSampling node that sets eps, "
        f"v_prediction or flow."
    )


def sigma_max(model) -> float:
    """The model's largest sigma (14.6 for the SD1/SD2/SDXL schedule, 1 for flow models)."""
    return float(model.get_model_object("model_sampling").sigma_max)


def scheduler_names() -> list[str]:
    return list(comfy.samplers.SCHEDULER_NAMES)


def get_sigmas(model, scheduler: str, steps: int) -> torch.Tensor:
    """ComfyUI's own schedule for this model: ``steps + 1`` descending sigmas (CPU float32)."""
    names = scheduler_names()
    if scheduler not in names:
        raise ValueError(f"unknown scheduler {scheduler!r}: expected one of {names}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    ms = model.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(ms, scheduler, int(steps)).detach().cpu().to(torch.float32)


def _prefix(node: Optional[str]) -> str:
    return f"{node}: " if node else ""


def prepare_latent(model, latent: dict, node: Optional[str] = None) -> dict:
    """A copy of a LATENT dict whose samples fit ``model``; raises a clear error otherwise.

    Empty latents get the model's channel count the way SamplerCustomAdvanced does
    (``fix_empty_latent_channels``: SD3's 16 channels from a 4-channel EmptyLatentImage).
    ``node`` (the node's display name) starts every message, which names the ``latent`` input.
    """
    at = _prefix(node)
    if not isinstance(latent, dict) or not torch.is_tensor(latent.get("samples")):
        raise ValueError(
            f"{at}latent: expected a LATENT (a dict with a 'samples' tensor), got {type(latent).__name__}: "
            f"connect an Empty Latent Image or a VAE Encode output"
        )
    samples = latent["samples"]
    if samples.dim() < 4:
        raise ValueError(
            f"{at}latent: expected LATENT samples of shape [batch, channels, height, width], got "
            f"{list(samples.shape)}: connect an image latent (Empty Latent Image or VAE Encode)"
        )
    if samples.numel() == 0:
        raise ValueError(
            f"{at}latent: the LATENT is empty (shape {list(samples.shape)}: batch, channels, height and width must "
            f"all be >= 1); set Empty Latent Image's batch_size to 1 or more and width/height to 8 pixels or more"
        )
    if not samples.is_floating_point():
        raise ValueError(f"{at}latent: expected floating-point LATENT samples, got {samples.dtype}; connect an Empty "
                         f"Latent Image or a VAE Encode output")
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    want = int(model.get_model_object("latent_format").latent_channels)
    if samples.shape[1] != want:
        raise ValueError(
            f"{at}latent: LATENT from a different model family: this MODEL ({model_name(model)}) uses "
            f"{want}-channel latents, the LATENT has {samples.shape[1]} channels. Make the latent "
            f"for this model (an empty latent node, or VAE Encode with this model's VAE)."
        )
    out = dict(latent)
    out["samples"] = samples
    return out


def context_width(model) -> Optional[int]:
    """The text-embedding width the MODEL reads, where it is certain: ComfyUI's UNet (SD1.x/SD2.x/SDXL:
    ``context_dim``) and MMDiT (SD3: the context embedder's input width); None for anything else."""
    inner = getattr(model, "model", None)
    net = getattr(inner, "diffusion_model", None)
    try:
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    except ImportError:  # pragma: no cover - another ComfyUI layout: no check
        return None
    if isinstance(net, UNetModel):
        cfg = getattr(getattr(inner, "model_config", None), "unet_config", None) or {}
        width = cfg.get("context_dim")
        return int(width) if isinstance(width, int) else None
    if isinstance(net, MMDiT):
        width = getattr(getattr(net, "context_embedder", None), "in_features", None)
        return int(width) if isinstance(width, int) else None
    return None


def check_conditioning(cond, name: str, node: Optional[str] = None, model=None) -> None:
    """A CONDITIONING input: a non-empty list of [tensor, dict] entries with finite values.

    With ``model``, the embedding width is checked against the model's cross-attention width
    where it is known (:func:`context_width`). Messages start with ``node`` and name the input.
    """
    at = _prefix(node)
    if not isinstance(cond, list) or len(cond) == 0:
        got = "an empty list" if isinstance(cond, list) else type(cond).__name__
        raise ValueError(
            f"{at}{name}: expected CONDITIONING (a non-empty list from a text encoder), got "
            f"{got}; connect a CLIP Text Encode output"
        )
    if node is None and model is None:
        return
    want = context_width(model) if model is not None else None
    for i, entry in enumerate(cond):
        if not isinstance(entry, (list, tuple)) or len(entry) < 1 or not torch.is_tensor(entry[0]):
            raise ValueError(f"{at}{name}: entry {i} of the CONDITIONING is not a [tensor, dict] pair; connect a "
                             f"CLIP Text Encode output")
        emb = entry[0]
        extra = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        for what, t in (("text embedding", emb), ("pooled_output", extra.get("pooled_output"))):
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(
                    f"{at}{name}: the CONDITIONING's {what} (entry {i}) contains {bad} NaN/inf values of "
                    f"{t.numel()}; check the text encoder and the conditioning nodes that feed {name} "
                    f"(re-encode the prompt)"
                )
        if emb.ndim < 2 or emb.numel() == 0:
            raise ValueError(f"{at}{name}: entry {i} of the CONDITIONING has shape {list(emb.shape)}; expected "
                             f"[batch, tokens, width] from a text encoder")
        if want is not None and emb.ndim == 3 and int(emb.shape[-1]) != want:
            raise ValueError(
                f"{at}{name}: the CONDITIONING is {int(emb.shape[-1])} wide, but this MODEL ({model_name(model)}) "
                f"reads {want}-wide text embeddings; encode the prompt with this checkpoint's CLIP (the prompt "
                f"is from another model family)"
            )


class Progress:
    """A ComfyUI progress bar that is also an interrupt point at every tick.

    In the server, every ``ProgressBar`` update goes through a hook that raises ComfyUI's
    ``InterruptProcessingException`` when the user pressed Cancel; we also check the flag
    directly, so interrupts work where no hook is installed (scripts, tests).
    """

    def __init__(self, total: int, node_id: Optional[str] = None):
        self.total = max(int(total), 1)
        self.done = 0
        self.bar = comfy.utils.ProgressBar(self.total, node_id=node_id)

    def tick(self, n: int = 1) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.done = min(self.done + n, self.total)
        self.bar.update_absolute(self.done, self.total)


@dataclass
class BridgeContext:
    """What a core function gets inside the sampler: denoisers, device, schedule and model kind."""

    denoiser: Denoiser  # CFG'd x0 prediction with the guider's cfg
    inverse_denoiser: Denoiser  # the same with the inversion cfg
    device: torch.device
    sigmas: torch.Tensor  # CPU float32, the schedule passed to run_core
    kind: ModelKind
    model_wrap: Any  # the CFGGuider itself (for advanced use)


class _CoreSampler(comfy.samplers.Sampler):
    """A ComfyUI sampler that runs ``fn(ctx)`` and stashes its result on ``self.result``."""

    def __init__(self, fn: Callable[[BridgeContext], Any], kind: ModelKind, sigmas: torch.Tensor,
                 inversion_cfg: float, progress: Optional[Progress]):
        self.fn = fn
        self.kind = kind
        self.sigmas = sigmas
        self.inversion_cfg = float(inversion_cfg)
        self.progress = progress
        self.result = None
        self.ran = False

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model_options = extra_args["model_options"]
        seed = extra_args.get("seed")
        device = noise.device
        progress = self.progress

        def denoiser(x, sigma):
            out = model_wrap(x.to(device), sigma.to(device), model_options=model_options, seed=seed)
            if progress is not None:
                progress.tick()
            return out

        def inverse_denoiser(x, sigma):
            old = model_wrap.cfg
            model_wrap.cfg = self.inversion_cfg
            try:
                return denoiser(x, sigma)
            finally:
                model_wrap.cfg = old

        ctx = BridgeContext(denoiser, inverse_denoiser, device, self.sigmas, self.kind, model_wrap)
        # Like ComfyUI's own samplers: no autograd graph (inside the server this is inference mode
        # anyway). A core function that needs gradients opts in with torch.enable_grad().
        with torch.no_grad():
            self.result = self.fn(ctx)
        self.ran = True
        if torch.is_tensor(self.result) and self.result.shape == noise.shape:
            return self.result.to(device)  # e.g. a sample, so the guider's output is usable
        return latent_image if latent_image is not None else torch.zeros_like(noise)


def run_core(
    model,
    positive,
    negative,
    latent_samples: torch.Tensor,
    fn: Callable[[BridgeContext], Any],
    *,
    sigmas: torch.Tensor,
    cfg: float,
    inversion_cfg: float = 1.0,
    seed: Optional[int] = None,
    progress: Optional[Progress] = None,
    return_guider_output: bool = False,
):
    """Run ``fn(ctx)`` inside ``CFGGuider(model).sample(...)`` and return what it returned.

    ``latent_samples`` (already through :func:`prepare_latent`) sets the batch B the conditioning
    is prepared for; ``fn`` may call the denoisers on any multiple of B (candidate-major). The
    latents the denoisers see and return live in the model's *inner* space (after
    ``process_latent_in``); unit noise maps to the start latent with
    :func:`noisecraft.sigmas.noise_to_x`. With ``return_guider_output`` the guider's output is
    returned too: when ``fn`` returns a latent of B's shape it is that latent after
    ``process_latent_out`` (a LATENT's samples), otherwise meaningless.

    The MODEL passed in is not modified: the guider runs on a clone.
    """
    check_conditioning(positive, "positive")
    check_conditioning(negative, "negative")
    if not (math.isfinite(cfg) and math.isfinite(inversion_cfg)):
        raise ValueError(f"cfg and inversion_cfg must be finite numbers, got {cfg} and {inversion_cfg}")
    kind = model_kind(model)
    guider = comfy.samplers.CFGGuider(model.clone())
    guider.set_conds(positive, negative)
    guider.set_cfg(float(cfg))
    sampler = _CoreSampler(fn, kind, sigmas.detach().cpu().to(torch.float32), inversion_cfg, progress)
    # The guider only needs a latent and a noise of the right shape; the core builds its own x.
    zeros = torch.zeros_like(latent_samples, dtype=torch.float32, device="cpu")
    out = guider.sample(zeros, zeros, sampler, sigmas.to(torch.float32), disable_pbar=True, seed=seed)
    if not sampler.ran:
        raise RuntimeError("ComfyUI's guider returned without running the NoiseCraft sampler (empty sigmas?)")
    if return_guider_output:
        return sampler.result, out
    return sampler.result


# -- ComfyUI's own sampling with a SAMPLER (e.g. Build Teacher Cache's teacher) ---------------------------

def sampler_name(sampler, node: Optional[str] = None) -> str:
    """The name of a ComfyUI SAMPLER (a ``KSAMPLER``'s function without ``sample_``, e.g. ``dpmpp_2m``; another
    ``Sampler`` class's name), refusing stochastic ones: ancestral / SDE samplers by name
    (:func:`noisecraft.solvers.is_stochastic`) and any with ``eta`` or ``s_churn`` > 0 in its options. Where the
    result must be a function of the noise (a teacher), the message names ComfyUI's deterministic samplers."""
    at = _prefix(node)
    if not isinstance(sampler, comfy.samplers.Sampler):
        raise ValueError(f"{at}sampler: expected a SAMPLER (KSamplerSelect or another sampler node), got "
                         f"{type(sampler).__name__}")
    fn = getattr(sampler, "sampler_function", None)
    name = getattr(fn, "__name__", None) or type(sampler).__name__
    name = name.removeprefix("sample_").removesuffix("_function")
    options = getattr(sampler, "extra_options", None) or {}
    noisy = [k for k in ("eta", "s_churn") if isinstance(options.get(k), (int, float)) and options[k] > 0]
    if is_stochastic(name) or noisy:
        why = f"{name} with {', '.join(f'{k}={options[k]:g}' for k in noisy)}" if noisy and not is_stochastic(name) \
            else f"{name!r} (ancestral/SDE)"
        good = ", ".join(n for n in comfy.samplers.SAMPLER_NAMES if not is_stochastic(n))
        raise ValueError(f"{at}sampler: {why} adds fresh noise at every step, but the result must be a function of "
                         f"the noise: connect KSamplerSelect with a deterministic sampler ({good})")
    if fn is None:
        log.warning("%ssampler %s is not a KSAMPLER: NoiseCraft cannot check that it is deterministic", at, name)
    return name


class _Recording(comfy.samplers.Sampler):
    """Runs ``sampler`` unchanged and keeps its output in the model's inner latent space (before the guider's
    ``process_latent_out``), the space the core's denoisers and a teacher cache use."""

    def __init__(self, sampler):
        self.sampler, self.result = sampler, None

    def max_denoise(self, model_wrap, sigmas):
        return self.sampler.max_denoise(model_wrap, sigmas)

    def sample(self, *args, **kwargs):
        self.result = self.sampler.sample(*args, **kwargs)
        return self.result


def run_sampler(model, positive, negative, noise: torch.Tensor, sampler, *, sigmas: torch.Tensor, cfg: float,
                seed: Optional[int] = None, progress: Optional[Progress] = None) -> torch.Tensor:
    """ComfyUI's own sampling: ``CFGGuider(model)`` at ``cfg`` with ``sampler`` down ``sigmas`` from the unit
    ``noise`` [B, C, H, W] on an empty latent, exactly as SamplerCustomAdvanced runs it (RandomNoise ->
    ``noise``, Empty Latent -> zeros). Returns the x0 in the model's inner latent space (CPU float32), as
    :func:`run_core`'s denoisers see latents. ``progress`` ticks once per step. The MODEL is not modified."""
    guider = comfy.samplers.CFGGuider(model.clone())
    guider.set_conds(positive, negative)
    guider.set_cfg(float(cfg))
    rec = _Recording(sampler)
    callback = None if progress is None else (lambda step, x0, x, total: progress.tick())
    guider.sample(noise.float().cpu(), torch.zeros_like(noise, dtype=torch.float32, device="cpu"), rec,
                  sigmas.to(torch.float32), callback=callback, disable_pbar=True, seed=seed)
    return rec.result.float().cpu()
