"""NoiseRefine nodes: load a refiner LoRA, turn any NOISE into refined noise for cfg-1 sampling.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895). The residual,
its strength and the model kinds live in :mod:`noisecraft.refine` (``refine_noise``); the file
format is the one :mod:`noisecraft.lora` writes (kohya ``lora_unet_<diffusers name>`` keys). These
nodes find the file, map its keys onto the ComfyUI model, and run the two refiner passes
(``D_base`` and ``D_lora`` at ``sigma_max``, positive prompt only, cfg 1) through
:func:`nodes.bridge.run_core`, so ComfyUI prepares the conditioning and the model's own patches.

Choices where the issue was silent:

* Folders: files are listed from ``models/noise_refiners`` (registered as ComfyUI's
  ``noise_refiners`` folder by :func:`nodes.common.register_folders`) and then ``models/loras``; a
  name in both resolves to ``noise_refiners``. Only ``.safetensors`` (never unpickled).
* What counts as a refiner: a safetensors file with plain LoRA pairs (``<key>.lora_down.weight``,
  ``<key>.lora_up.weight``, optional ``<key>.alpha``). Metadata ``noisecraft.kind = refiner`` is
  expected; a LoRA *without* ``noisecraft.kind`` loads with a warning in the log (it may come
  from another trainer); one that declares another kind, a file with no LoRA pairs, or LoRA
  variants (LoCon ``mid``, DoRA, LoHa/LoKr) are refused with an error, as are NaN/inf tensors, an
  alpha of more than one number, and a file that is empty, truncated or no safetensors (the
  message names the node, the file and what was expected). ``noisecraft.model_kind``
  (eps/v/flow) is checked against the MODEL when Refine Noise runs: flow against eps/v is an error,
  eps against v a warning (both refine by an eps difference).
* Keys and attaching: :mod:`nodes.comfy_lora` (``map_refiner``: ComfyUI's own key table
  ``comfy.lora.model_lora_keys_unet``, every key must map and every shape fit, or the error names
  the refiner and the model; ``RefinerSwitch``: ComfyUI's LoRA merge as a scoped weight function on
  the loaded model, ``D_base`` with it off, ``D_lora`` with it on, removed after the two passes -
  not ``add_weight_wrapper``, which makes ComfyUI unpatch and re-patch twice per generation;
  ``benchmarks/bench_comfy_refine.py`` times both ways over three generations).
* Strength: 0 is off (the input NOISE itself is returned, no model call); the accepted range is
  ``noisecraft.refine``'s [0, 2]. The residual uses the model's ``sigma_max`` (the start of every
  full-denoise schedule), also for img2img latents: the refiner was trained on pure noise.
* Base model (:mod:`nodes.fingerprint`): a refiner file records a fingerprint of the weights it was trained on
  (``noisecraft.base_fingerprint``); Refine Noise logs whether its MODEL is that base, another model of the
  architecture (a warning naming the base: a refiner transfers to fine-tunes best when the base refines and the
  fine-tune samples, ``benchmarks/bench_transfer.py``) or cannot tell (a file without one: one info line).
  Another architecture is refused by the key mapping, as before.
* Guidance (guidance-scale control, :mod:`noisecraft.guidance_embed`): a refiner file with a
  ``noisecraft_guidance.proj.weight`` tensor was trained with the CFG scale as an input; the optional
  ``guidance`` input (default 0 = not given, so old graphs run exactly as before) is the CFG scale its
  cfg-1 result should imitate. Such a refiner without a guidance is an error naming the input; a plain
  refiner given one logs a warning and ignores it (its output is the same as without).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from comfy_api.latest import io

import folder_paths

from ..noisecraft.guidance_embed import GuidanceEmbedding, check_guidance
from ..noisecraft.lora import read_lora_file
from ..noisecraft.refine import STRENGTH_MAX, check_strength, refine_noise
from ..noisecraft.sigmas import ModelKind
from . import bridge
from .comfy_lora import RefinerSwitch, Target, map_refiner  # noqa: F401 - public here (Train Refiner, benchmarks)
from .common import REFINER_FOLDER as FOLDER, FileCache, register_folders
from .fingerprint import report_base
from .noise import NoiseTransform

log = logging.getLogger(__name__)

CATEGORY = "noisecraft/refine"
LOAD_NAME = "Load Refiner"
REFINE_NAME = "Refine Noise"
LORA_FOLDER = "loras"
EXTENSIONS = {".safetensors"}
CACHE_SIZE = 4
_UNSUPPORTED_PARTS = (".lora_mid.weight", ".dora_scale", ".hada_w1_a", ".lokr_w1", ".diff", ".oft_blocks",
                      ".lora_A.weight", ".lora_B.weight")

RefinerType = io.Custom("REFINER")


# -- folders ------------------------------------------------------------------------------------

def _safetensors(names: list[str]) -> list[str]:
    return [n for n in names if Path(n).suffix in EXTENSIONS]


def refiner_files() -> list[str]:
    """Refiner files of ``models/noise_refiners`` then ``models/loras`` (each name once)."""
    register_folders()
    out: list[str] = []
    for folder in (FOLDER, LORA_FOLDER):
        for n in _safetensors(folder_paths.get_filename_list(folder)):
            if n not in out:
                out.append(n)
    return out


def resolve_file(name: str) -> Path:
    register_folders()
    for folder in (FOLDER, LORA_FOLDER):
        path = folder_paths.get_full_path(folder, name) if name else None
        if path is not None:
            return Path(path)
    folders = folder_paths.get_folder_paths(FOLDER) + folder_paths.get_folder_paths(LORA_FOLDER)
    raise FileNotFoundError(
        f"{LOAD_NAME}: refiner file {name!r} not found; looked in {folders} (found: {refiner_files() or 'nothing'}). "
        f"Put the .safetensors refiner (from `python -m noisecraft train-refiner` or NoiseCraft's training nodes) "
        f"in models/noise_refiners or models/loras and refresh the node's file list"
    )


# -- the refiner file ----------------------------------------------------------------------------

class Refiner:
    """What travels on a REFINER socket: the LoRA pairs of a refiner file and its metadata.

    ``pairs`` maps each LoRA key prefix to ``(down, up, alpha)`` (CPU tensors, alpha a float);
    ``guidance`` the guidance-scale embedding of a guidance-conditioned refiner (else None).
    """

    def __init__(self, pairs: dict, metadata: dict, name: str, guidance: Optional[GuidanceEmbedding] = None):
        self.pairs = pairs
        self.metadata = metadata
        self.name = name
        self.guidance = guidance

    @property
    def model_kind(self) -> Optional[ModelKind]:
        kind = self.metadata.get("noisecraft.model_kind")
        try:
            return ModelKind.parse(kind) if kind else None
        except ValueError:
            return None

    @property
    def base_model(self) -> str:
        return self.metadata.get("noisecraft.base_model", "unknown base model")

    def describe(self) -> str:
        return f"{self.name} (for {self.base_model}, {len(self.pairs)} layers)"

    def __repr__(self) -> str:
        return f"Refiner({self.describe()})"


def parse_refiner(state: dict, metadata: dict, name: str) -> Refiner:
    """Check a LoRA state dict + metadata and return a :class:`Refiner`; clear errors otherwise."""
    kind = metadata.get("noisecraft.kind")
    if kind is not None and kind != "refiner":
        raise ValueError(
            f"{LOAD_NAME}: {name} is a NoiseCraft {kind!r} file, not a refiner (noisecraft.kind = {kind!r}); "
            f"load a refiner LoRA (noisecraft.kind = 'refiner')"
        )
    variants = sorted({k for k in state for part in _UNSUPPORTED_PARTS if k.endswith(part)})
    if variants:
        raise ValueError(
            f"{LOAD_NAME}: {name} uses LoRA variants a refiner does not use (e.g. {variants[:3]}); expected plain "
            f"'<key>.lora_down.weight' / '<key>.lora_up.weight' pairs as NoiseCraft writes them"
        )
    prefixes = sorted(k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight"))
    if not prefixes:
        raise ValueError(
            f"{LOAD_NAME}: {name} holds no '<key>.lora_down.weight' tensors ({len(state)} tensors, e.g. "
            f"{sorted(state)[:3]}): it is not a LoRA. Pick a refiner LoRA file; checkpoints go to Load Checkpoint"
        )
    pairs = {}
    for p in prefixes:
        down, up = state[f"{p}.lora_down.weight"], state.get(f"{p}.lora_up.weight")
        if up is None:
            raise ValueError(f"{LOAD_NAME}: {name} has {p}.lora_down.weight but no {p}.lora_up.weight")
        if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0] or up[0].numel() != down.shape[0]:
            raise ValueError(
                f"{LOAD_NAME}: {name}: {p} has lora_down {list(down.shape)} and lora_up {list(up.shape)}; expected "
                f"down [rank, in(, kh, kw)] and up [out, rank(, 1, 1)] with the same rank"
            )
        alpha_t = state.get(f"{p}.alpha")
        if alpha_t is not None and alpha_t.numel() != 1:
            raise ValueError(f"{LOAD_NAME}: {name}: {p}.alpha has shape {list(alpha_t.shape)}; expected one number "
                             f"(a scalar alpha per layer, as kohya and NoiseCraft write it): re-save the refiner")
        alpha = float(alpha_t) if alpha_t is not None else float(down.shape[0])
        pairs[p] = (down.to(torch.float32), up.to(torch.float32), alpha)
    if kind is None:
        log.warning("%s: %s has no noisecraft.kind metadata; using it as a refiner LoRA anyway", LOAD_NAME, name)
    return Refiner(pairs, metadata, name, GuidanceEmbedding.from_file(state, metadata, f"{LOAD_NAME}: {name}"))


CACHE = FileCache(CACHE_SIZE)


def load_cached(name: str) -> Refiner:
    """The refiner in file ``name`` (models/noise_refiners, then models/loras), read once per file version."""
    path = resolve_file(name)
    return CACHE.get(path, lambda: _read_refiner(path, name))


def _read_refiner(path: Path, name: str) -> Refiner:
    try:
        state, meta = read_lora_file(path)  # refuses empty, text, truncated files and NaN/inf tensors
    except ValueError as e:  # the core's message names the file, what was expected and the fix
        raise ValueError(f"{LOAD_NAME}: refiner_name {name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a library error type (e.g. a permission error) the core passed on
        raise ValueError(
            f"{LOAD_NAME}: refiner_name {name!r}: {path} could not be read ({type(e).__name__}: {e}); expected a "
            f"readable .safetensors refiner LoRA (from Save Refiner or `python -m noisecraft train-refiner`): check "
            f"the file's permissions, re-download or re-save it, or pick another file"
        ) from None
    refiner = parse_refiner(state, meta, name)
    log.info("%s: loaded %r", LOAD_NAME, refiner)
    return refiner


def clear_cache() -> None:
    CACHE.clear()


# -- mapping onto a ComfyUI model: nodes/comfy_lora.py (Target, map_refiner, RefinerSwitch) -------------

def check_kind(refiner: Refiner, kind: ModelKind, model) -> None:
    want = refiner.model_kind
    if want is None or want == kind:
        return
    if want.is_flow != kind.is_flow:
        raise ValueError(
            f"{REFINE_NAME}: the refiner {refiner.describe()} was trained for a {want.value} model "
            f"(noisecraft.model_kind), but this MODEL ({bridge.model_name(model)}) is a {kind.value} model; a refiner "
            f"predicts {'a velocity' if want.is_flow else 'an eps'} difference and cannot be used across eps/v and "
            f"flow models. Use a refiner trained for this model"
        )
    log.warning("%s: refiner %s was trained for a %s model, this MODEL is %s", REFINE_NAME, refiner.name,
                want.value, kind.value)


# -- refined noise as a NOISE ----------------------------------------------------------------------

class RefinedNoise(NoiseTransform):
    """A NOISE: the input NOISE's tensor for the sampler's latent, refined by the refiner LoRA.

    ``generate_noise`` asks the input NOISE for the same latent dict, then runs the two refiner
    passes (:func:`noisecraft.refine.refine_noise`) at the model's ``sigma_max`` with cfg 1 and
    the positive prompt, through :func:`nodes.bridge.run_core`. ``.seed`` is the input NOISE's.
    """

    node_name = REFINE_NAME

    def __init__(self, noise, model, refiner: Refiner, targets: list[Target], positive, strength: float,
                 kind: ModelKind, guidance: Optional[float] = None):
        super().__init__(noise)
        self.guidance = guidance  # the CFG scale of a guidance-conditioned refiner, else None
        self.model = model
        self.refiner = refiner
        self.targets = targets
        self.positive = positive
        self.strength = float(strength)
        self.kind = kind

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        base = self.base_noise(input_latent)
        latent = bridge.prepare_latent(self.model, {"samples": base}, REFINE_NAME)
        smax = bridge.sigma_max(self.model)
        sigmas = torch.tensor([smax, 0.0], dtype=torch.float32)
        switch = RefinerSwitch(self.targets, self.refiner.guidance if self.guidance is not None else None,
                               self.guidance)
        kind, strength = self.kind, self.strength
        label = f"{REFINE_NAME}: refiner {self.refiner.name!r}"
        progress = bridge.Progress(2)

        def fn(ctx: bridge.BridgeContext) -> torch.Tensor:
            def d_base(x, sigma):
                switch.enabled = False
                return ctx.denoiser(x, sigma)

            def d_lora(x, sigma):
                switch.enabled = True
                try:
                    return ctx.denoiser(x, sigma)
                finally:
                    switch.enabled = False

            with switch.attached(ctx.model_wrap.inner_model):
                e = base.to(ctx.device, torch.float32)
                return refine_noise(e, d_base, d_lora, kind, smax, strength, refiner=label).to("cpu")

        out = bridge.run_core(self.model, self.positive, self.positive, latent["samples"], fn, sigmas=sigmas,
                              cfg=1.0, seed=self.seed, progress=progress)
        return out.to(base.dtype)

    def __repr__(self) -> str:
        return f"RefinedNoise({self.noise!r}, {self.refiner.describe()}, strength={self.strength})"


# -- nodes ----------------------------------------------------------------------------------------

class LoadRefiner(io.ComfyNode):
    """Load a refiner LoRA from models/noise_refiners or models/loras."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_LoadRefiner",
            display_name=LOAD_NAME,
            category=CATEGORY,
            description="Loads a NoiseRefine refiner LoRA (Ahn, Kang et al., arXiv:2412.03895) from "
            "models/noise_refiners or models/loras (.safetensors). Feed it to Refine Noise, then sample with cfg 1.",
            inputs=[
                io.Combo.Input(
                    "refiner_name", options=refiner_files(),
                    tooltip="The refiner LoRA trained for your checkpoint, or for the base model your fine-tune was "
                    "made from (then feed Refine Noise that base model). From models/noise_refiners, then "
                    "models/loras. Always used; to turn refinement off, set strength to 0 on Refine Noise.",
                ),
            ],
            outputs=[RefinerType.Output(display_name="refiner", tooltip="The loaded refiner LoRA.")],
        )

    @classmethod
    def fingerprint_inputs(cls, refiner_name):
        try:
            return FileCache.key(resolve_file(refiner_name))
        except FileNotFoundError:
            return None

    @classmethod
    def execute(cls, refiner_name) -> io.NodeOutput:
        return io.NodeOutput(load_cached(refiner_name))


class RefineNoise(io.ComfyNode):
    """NOISE + MODEL + REFINER + positive -> refined NOISE (computed when the sampler asks)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_RefineNoise",
            display_name=REFINE_NAME,
            category=CATEGORY,
            description="Refines a noise with a refiner LoRA so that sampling WITHOUT guidance (cfg 1, one model pass "
            "per step) looks close to the guided image (NoiseRefine, Ahn, Kang et al., arXiv:2412.03895). Costs two "
            "single-prompt model passes once per image. Connect RandomNoise (or NPNet Golden Noise) in, the output to "
            "SamplerCustomAdvanced's noise, and use a CFGGuider with cfg 1.0.",
            inputs=[
                io.Noise.Input("noise", tooltip="The noise to refine, e.g. RandomNoise; its seed is kept. Always used."),
                io.Model.Input("model", tooltip="The base model the refiner was trained on (e.g. the SDXL base "
                               "checkpoint), also when you sample with a fine-tune of it: refining with the base and "
                               "sampling the refined noise with the fine-tune transfers best (README, 'Refiners on "
                               "fine-tunes'). The log says whether this is the refiner's base. Not modified. Unused when "
                               "strength is 0."),
                RefinerType.Input("refiner", tooltip="From Load Refiner; trained on this model (the base of your "
                                  "fine-tune). Unused when strength is 0."),
                io.Conditioning.Input("positive", tooltip="Your positive prompt (the same as the sampler's). Unused "
                                      "when strength is 0."),
                io.Float.Input(
                    "strength", default=1.0, min=0.0, max=STRENGTH_MAX, step=0.05,
                    tooltip=f"How much of the refiner's change to apply: 1 = as trained, 0 turns it off (the input noise "
                    f"passes through unchanged), up to {STRENGTH_MAX:g} exaggerates it.",
                ),
                io.Float.Input(
                    "guidance", default=0.0, min=0.0, max=100.0, step=0.1, optional=True,
                    tooltip="For a refiner trained with guidance-scale control (train-refiner --guidance-range): the "
                    "CFG scale whose look the cfg-1 result should have, e.g. 3 to 7. 0 = not given (plain refiners; "
                    "they ignore any other value, with a warning).",
                ),
            ],
            outputs=[io.Noise.Output(display_name="noise", tooltip="The refined noise; same seed as the input noise. "
                                     "Sample it with cfg 1.")],
        )

    @classmethod
    def execute(cls, noise, model, refiner, positive, strength=1.0, guidance=0.0) -> io.NodeOutput:
        if not hasattr(noise, "generate_noise"):
            raise ValueError(f"{REFINE_NAME}: expected a NOISE (e.g. from RandomNoise), got {type(noise).__name__}")
        try:
            strength = check_strength(strength)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{REFINE_NAME}: {e}") from None
        if strength == 0:
            return io.NodeOutput(noise)
        if not isinstance(refiner, Refiner):
            raise ValueError(f"{REFINE_NAME}: expected a REFINER from {LOAD_NAME}, got {type(refiner).__name__}")
        bridge.check_conditioning(positive, "positive", REFINE_NAME, model)
        kind = bridge.model_kind(model)
        check_kind(refiner, kind, model)
        targets = map_refiner(refiner, model)
        report_base(refiner, model)  # logs: its base, or another model of the architecture (a fine-tune?)
        scale = _guidance_for(refiner, guidance)
        return io.NodeOutput(RefinedNoise(noise, model, refiner, targets, positive, strength, kind, scale))


def _guidance_for(refiner: Refiner, guidance) -> Optional[float]:
    """The CFG scale for the refiner pass: a number for a guidance-conditioned refiner, None for a plain one."""
    try:
        g = check_guidance(0.0 if guidance is None else guidance, "guidance")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{REFINE_NAME}: {e}") from None
    emb = refiner.guidance
    if emb is None:
        if g != 0:
            log.warning("%s: guidance %g given, but the refiner %s has no guidance-scale input (a plain refiner): "
                        "ignored; use strength to scale a plain refiner", REFINE_NAME, g, refiner.describe())
        return None
    if g == 0:
        lo, hi = emb.train_range or (1.0, 7.0)
        raise ValueError(f"{REFINE_NAME}: the refiner {refiner.describe()} was trained with guidance-scale control "
                         f"(CFG {lo:g}..{hi:g}) and needs the CFG scale to imitate: set the guidance input to a scale "
                         f"in that range (e.g. {(lo + hi) / 2:g}); 0 means not given")
    return g


register_folders()  # before ComfyUI lists the files (the schema's options)

NODES = [LoadRefiner, RefineNoise]
