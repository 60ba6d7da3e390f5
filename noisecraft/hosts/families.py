"""Model families of the diffusers host: which network a folder holds, how it loads, how prompts become its
conditioning (SD1.x, SD2.x eps and v, SDXL, SD3-class flow transformers), for ``train-refiner --model``.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895): the refiner is a LoRA on
the diffusion model, trained on the model's own guided samples; it needs the model's conditioning exactly as
its pipeline builds it. Each family follows its diffusers pipeline (``diffusers 0.42``):

* ``sd`` (SD1.x / SD2.x, ``UNet2DConditionModel`` without ``addition_embed_type``): ``tokenizer/`` +
  ``text_encoder/`` (``CLIPTextModel``), token states = the last hidden state (StableDiffusionPipeline).
  eps or v from the scheduler's ``prediction_type``.
* ``sdxl`` (``addition_embed_type = "text_time"``): two CLIPs, ``text_encoder/`` (``CLIPTextModel``) and
  ``text_encoder_2/`` (``CLIPTextModelWithProjection``), token states = both penultimate hidden states
  concatenated on the width; ``text_embeds`` = the second encoder's pooled projection; ``time_ids`` =
  ``original size + crop (0, 0) + target size`` with both sizes the training size, latent H, W times the
  VAE scale factor (``2 ** (len(vae block_out_channels) - 1)`` from ``vae/config.json``, 8 without it).
  The negative prompt: an empty one gives zero token states and pooled embeddings when the folder's
  ``model_index.json`` says ``force_zeros_for_empty_prompt`` (SDXL's default, True), as the pipeline does.
* ``sd3`` (``transformer/`` holding an ``SD3Transformer2DModel``, ``FlowMatchEulerDiscreteScheduler`` with its
  shift): CLIP-L and CLIP-G (``text_encoder/``, ``text_encoder_2/``, both with projection), penultimate
  states concatenated and zero-padded to the T5 width (``joint_attention_dim``), then joined on the token
  axis with the T5 states; ``pooled_projections`` = the two pooled projections concatenated. T5 is
  optional: with ``text_encoder_3/`` + ``tokenizer_3/`` it encodes 256 tokens (the pipeline's default
  ``max_sequence_length``); without them the T5 part is zeros [256, joint_attention_dim], what diffusers
  does when T5 is dropped (``text_encoder_3=None``). Our choice where the pipeline leaves one: the empty
  negative prompt is encoded, not zeroed (StableDiffusion3Pipeline encodes it too).

Single-file checkpoints (``--model FILE.safetensors --config DIR``): the network comes from the file through
diffusers' own ``<network class>.from_single_file(FILE, config=DIR, subfolder=..., local_files_only=True)``
(original / ComfyUI key layouts are converted by diffusers, never downloaded); the scheduler and tokenizers
come from ``DIR``, a diffusers folder, the text encoders too where ``DIR`` holds their weights, else from the
file (a folder of configs only will do). Without ``--config``, :mod:`noisecraft.hosts.single_file` finds
``DIR`` the way diffusers does (the Hub repo of the architecture the file's keys name).

Precomputed prompts (``--prompt-embeds FILE``): ``cond`` [P, L, D] and ``uncond`` [1, L, D]; SDXL and SD3 also
need ``pooled`` [P, W] and ``uncond_pooled`` [1, W] (SDXL: the second encoder's ``text_embeds``; SD3: both
CLIPs' pooled, concatenated), and SDXL may give ``time_ids`` [1 or P, 6] (default: from the latent size).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..io import load_safetensors
from .single_file import has_weights, t5_in_single_file, text_encoder_from_single_file

__all__ = ["FAMILIES", "Conditioning", "detect_family", "load_network", "encode_prompts", "read_prompt_embeds",
           "sdxl_time_ids", "vae_scale_factor", "takes_pooled_projections", "same_token_count"]

logger = logging.getLogger(__name__)

FAMILIES = "SD1.x and SD2.x (UNet2DConditionModel, eps or v), SDXL (UNet with text_time conditioning) and " \
           "SD3-class flow transformers (SD3Transformer2DModel)"
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
_NET_DIR = {"sd": "unet", "sdxl": "unet", "sd3": "transformer"}


@dataclass
class Conditioning:
    """A family's conditioning for P prompts: token states ``cond`` [P, L, D] and ``uncond`` [1, L, D]; extra
    network inputs ``added`` ({name: [P, ...]}) and ``uncond_added`` ({name: [1, ...]}), None for SD1/SD2."""

    cond: torch.Tensor
    uncond: torch.Tensor
    added: Optional[dict] = None
    uncond_added: Optional[dict] = None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: could not read it as JSON ({exc}): save the model folder again") from None


def detect_family(root: Path) -> str:
    """``"sd"``, ``"sdxl"`` or ``"sd3"`` for a diffusers folder (from its network config); a ValueError that
    names the families the trainer handles for anything else."""
    unet, transformer = root / "unet" / "config.json", root / "transformer" / "config.json"
    if unet.is_file():
        extra = _read_json(unet).get("addition_embed_type")
        if extra in (None, "text_time"):
            return "sdxl" if extra == "text_time" else "sd"
        raise ValueError(f"{root}: its UNet has addition_embed_type {extra!r}, which train-refiner cannot "
                         f"condition; it trains {FAMILIES}")
    if transformer.is_file():
        cls = _read_json(transformer).get("_class_name")
        if cls == "SD3Transformer2DModel":
            return "sd3"
        raise ValueError(f"{root}: its transformer is a {cls}, which train-refiner cannot condition; it trains "
                         f"{FAMILIES}")
    raise FileNotFoundError(
        f"{root} is not a diffusers model folder train-refiner can use: expected unet/config.json or "
        f"transformer/config.json (and scheduler/scheduler_config.json); it trains {FAMILIES}. Save one with "
        f"pipe.save_pretrained(folder), or give a single-file checkpoint as --model FILE --config FOLDER")


def load_network(root: Path, family: str, dtype: torch.dtype, single_file: Optional[Path] = None):
    """The family's network from ``root`` (``unet/`` or ``transformer/``), or from ``single_file`` with ``root``
    as its config (diffusers' ``from_single_file(..., config=root)``, local files only)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    cls = SD3Transformer2DModel if family == "sd3" else UNet2DConditionModel
    sub = _NET_DIR[family]
    if single_file is None:
        return cls.from_pretrained(str(root), subfolder=sub, torch_dtype=dtype)
    try:
        return cls.from_single_file(str(single_file), config=str(root), subfolder=sub, torch_dtype=dtype,
                                    local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{single_file}: diffusers could not load it as a single-file {cls.__name__} with the "
                         f"config {root / sub} ({type(exc).__name__}: {str(exc)[:300]}): give the checkpoint's own "
                         f"diffusers config folder as --config") from None


def takes_pooled_projections(net: Any) -> bool:
    """True for an SD3-class transformer (its forward takes ``hidden_states, encoder_hidden_states,
    pooled_projections, timestep``), False for a UNet-style ``net(sample, timestep, encoder_hidden_states)``."""
    import inspect

    try:
        return "pooled_projections" in inspect.signature(net.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def vae_scale_factor(root: Path) -> int:
    """Pixels per latent cell: ``2 ** (len(block_out_channels) - 1)`` of ``vae/config.json``, 8 without one."""
    path = root / "vae" / "config.json"
    if not path.is_file():
        return 8
    return 2 ** (len(_read_json(path).get("block_out_channels", [0] * 4)) - 1)


def same_token_count(conds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Token-state rows ``[n, L_i, D]`` brought to one token count, the least common multiple of the ``L_i``, by
    repeating each row's tokens whole (ComfyUI's ``CONDCrossAttn.concat`` batches prompts of other lengths so:
    cross-attention over a prompt repeated k times gives the same result as over the prompt)."""
    import math

    lengths = {int(c.shape[1]) for c in conds}
    if len(lengths) < 2:
        return list(conds)
    target = math.lcm(*lengths)
    return [c.repeat(1, target // int(c.shape[1]), 1) for c in conds]


def sdxl_time_ids(latent_hw: Sequence[int], scale: int) -> torch.Tensor:
    """SDXL's ``add_time_ids`` [1, 6]: original size, crop (0, 0), target size, both sizes (H, W) * ``scale``."""
    h, w = int(latent_hw[0]) * scale, int(latent_hw[1]) * scale
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)


def _check_time_ids(net, pooled_width: int, where: str) -> None:
    """SDXL's embedding takes ``6 * addition_time_embed_dim + pooled width`` numbers (the pipeline's check)."""
    cfg = net.config
    need = getattr(cfg, "projection_class_embeddings_input_dim", None)
    got = 6 * int(cfg.addition_time_embed_dim) + int(pooled_width)
    if need is not None and int(need) != got:
        raise ValueError(f"{where}: the UNet's added embedding takes {need} numbers but 6 time ids x "
                         f"{cfg.addition_time_embed_dim} + pooled width {pooled_width} = {got}: the text encoder "
                         f"does not belong to this UNet (SDXL base needs a 1280-wide text_encoder_2 projection)")


def _need_dirs(root: Path, subs: Sequence[str], what: str) -> None:
    missing = [s for s in subs if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root}: {what} needs {' and '.join(s + '/' for s in subs)}, but "
                                f"{' and '.join(missing)} is missing: save the whole pipeline "
                                f"(pipe.save_pretrained), or pass --prompt-embeds FILE (see README)")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("encoding prompts needs the 'transformers' package (pip install transformers), which is "
                          "not installed; or encode them elsewhere and pass --prompt-embeds FILE.safetensors") from None
    return transformers


_kept: Optional[dict] = None  # the text encoders loaded inside keep_text_encoders(), by (folder, device)


@contextlib.contextmanager
def keep_text_encoders():
    """Load each text encoder once for the block (prompts encoded a chunk at a time), free them after it."""
    global _kept
    outer, _kept = _kept, ({} if _kept is None else _kept)
    try:
        yield
    finally:
        if outer is None:
            _kept = None


def _load(key: tuple, factory):
    if _kept is None:
        return factory()
    if key not in _kept:
        _kept[key] = factory()
    return _kept[key]


@torch.no_grad()
def _clip(root: Path, tok_dir: str, enc_dir: str, texts: list[str], device, projection: bool, penultimate: bool,
          single_file: Optional[Path] = None):
    """(token states [n, L, D], pooled [n, W] or None) of one CLIP text encoder, 16 prompts at a time; its weights
    from ``root/enc_dir``, or from ``single_file`` when that folder holds only a config."""
    tf = _transformers()
    cls = tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel
    tok, enc = _load((str(root), tok_dir, enc_dir, str(device), str(single_file)), lambda: (
        tf.AutoTokenizer.from_pretrained(str(root / tok_dir)),
        (text_encoder_from_single_file(cls, single_file, root, enc_dir)
         if single_file is not None and not has_weights(root / enc_dir)
         else cls.from_pretrained(str(root / enc_dir))).to(device).eval()))
    states, pooled = [], []
    for a in range(0, len(texts), 16):
        ids = tok(texts[a: a + 16], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=penultimate)
        states.append((out.hidden_states[-2] if penultimate else out[0]).float().cpu())
        if projection:
            pooled.append(out[0].float().cpu())
    return torch.cat(states), torch.cat(pooled) if projection else None


@torch.no_grad()
def _t5(root: Path, texts: list[str], device, width: int, single_file: Optional[Path] = None) -> torch.Tensor:
    """SD3's T5 token states [n, 256, width], or zeros of that shape without ``text_encoder_3/`` (T5 dropped);
    with ``single_file`` and a config-only ``text_encoder_3/``, T5 from the file (zeros if it has none)."""
    if not (root / "text_encoder_3").is_dir():
        return torch.zeros(len(texts), T5_TOKENS, width)
    enc = None
    if single_file is not None and not has_weights(root / "text_encoder_3"):
        _transformers()
        enc = _load((str(single_file), "t5"), lambda: t5_in_single_file(single_file, root))
        if enc is None:
            logger.info("%s holds no T5 (text_encoders.t5xxl.*): its part of the conditioning is zeros, as with T5 "
                        "dropped", single_file.name)
            return torch.zeros(len(texts), T5_TOKENS, width)
    _need_dirs(root, ("text_encoder_3", "tokenizer_3"), "SD3's T5 encoder")
    tf = _transformers()
    tok, enc = _load((str(root), "tokenizer_3", "text_encoder_3", str(device), str(single_file)), lambda: (
        tf.AutoTokenizer.from_pretrained(str(root / "tokenizer_3")),
        (enc or tf.T5EncoderModel.from_pretrained(str(root / "text_encoder_3"))).to(device).eval()))
    out = []
    for a in range(0, len(texts), 16):
        ids = tok(texts[a: a + 16], padding="max_length", max_length=T5_TOKENS, truncation=True,
                  add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        out.append(enc(ids)[0].float().cpu())
    return torch.cat(out)


def encode_prompts(root: Path, family: str, net, prompts: list[str], negative: str, device,
                   latent_hw: Sequence[int], single_file: Optional[Path] = None) -> Conditioning:
    """The family's conditioning for ``prompts`` and the negative prompt (module docstring), on the CPU; text
    encoders whose folder in ``root`` holds only a config come from ``single_file``."""
    texts = list(prompts) + [negative]
    p = len(prompts)
    sf = None if single_file is None else Path(single_file)
    if family == "sd":
        _need_dirs(root, ("tokenizer", "text_encoder"), "encoding the prompts")
        states, _ = _clip(root, "tokenizer", "text_encoder", texts, device, projection=False, penultimate=False,
                          single_file=sf)
        return Conditioning(states[:p], states[p:])
    _need_dirs(root, ("tokenizer", "text_encoder"), f"{family.upper()}'s first text encoder")
    _need_dirs(root, ("tokenizer_2", "text_encoder_2"), f"{family.upper()}'s second text encoder "
                                                        "(CLIPTextModelWithProjection, for the pooled embeddings)")
    s1, p1 = _clip(root, "tokenizer", "text_encoder", texts, device, projection=family == "sd3", penultimate=True,
                   single_file=sf)
    s2, p2 = _clip(root, "tokenizer_2", "text_encoder_2", texts, device, projection=True, penultimate=True,
                   single_file=sf)
    states = torch.cat([s1, s2], dim=-1)
    if family == "sdxl":
        pooled = p2
        index = root / "model_index.json"
        zeros = _read_json(index).get("force_zeros_for_empty_prompt", True) if index.is_file() else True
        if negative == "" and zeros:
            states[p:], pooled[p:] = 0.0, 0.0
        _check_time_ids(net, pooled.shape[-1], str(root))
        tid = sdxl_time_ids(latent_hw, vae_scale_factor(root))
        return Conditioning(states[:p], states[p:], {"text_embeds": pooled[:p], "time_ids": tid.expand(p, -1)},
                            {"text_embeds": pooled[p:], "time_ids": tid})
    width = int(net.config.joint_attention_dim)
    if states.shape[-1] > width:
        raise ValueError(f"{root}: the two CLIPs give {states.shape[-1]}-wide token states but the transformer's "
                         f"joint_attention_dim is {width}: the text encoders do not belong to this transformer")
    clip = torch.nn.functional.pad(states, (0, width - states.shape[-1]))
    t5 = _t5(root, texts, device, width, sf)
    if t5.shape[-1] != width:
        raise ValueError(f"{root}: the T5 encoder gives {t5.shape[-1]}-wide token states but the transformer's "
                         f"joint_attention_dim is {width}: the T5 does not belong to this transformer")
    states = torch.cat([clip, t5], dim=-2)
    pooled = torch.cat([p1, p2], dim=-1)
    return Conditioning(states[:p], states[p:], {"pooled_projections": pooled[:p]},
                        {"pooled_projections": pooled[p:]})


def read_prompt_embeds(path, family: str, net, n_prompts: int, latent_hw: Sequence[int], scale: int) -> Conditioning:
    """The conditioning from a ``--prompt-embeds`` safetensors file (keys in the module docstring)."""
    need = ["cond", "uncond"] + (["pooled", "uncond_pooled"] if family in ("sdxl", "sd3") else [])
    data = load_safetensors(path, what="prompt embeddings (--prompt-embeds)",
                            fix=f"give a safetensors with {', '.join(repr(k) for k in need)} (see README)")
    missing = [k for k in need if k not in data]
    if missing:
        raise ValueError(f"{path}: a {family.upper()} model needs tensors {need} ('pooled' [P, W] and "
                         f"'uncond_pooled' [1, W] for SDXL/SD3), missing {missing} (the file has {sorted(data)})")
    cond, uncond = data["cond"].float(), data["uncond"][:1].float()
    if cond.ndim != 3 or cond.shape[0] != n_prompts:
        raise ValueError(f"{path}: 'cond' has shape {tuple(cond.shape)}, expected [{n_prompts}, tokens, width] "
                         f"(one per prompt)")
    if family == "sd":
        return Conditioning(cond, uncond)
    pooled, upooled = data["pooled"].float(), data["uncond_pooled"][:1].float()
    if pooled.ndim != 2 or pooled.shape[0] != n_prompts or upooled.shape[-1] != pooled.shape[-1]:
        raise ValueError(f"{path}: 'pooled' {tuple(pooled.shape)} / 'uncond_pooled' {tuple(upooled.shape)}: expected "
                         f"[{n_prompts}, W] and [1, W]")
    if family == "sd3":
        return Conditioning(cond, uncond, {"pooled_projections": pooled}, {"pooled_projections": upooled})
    _check_time_ids(net, pooled.shape[-1], str(path))
    tid = data.get("time_ids")
    tid = sdxl_time_ids(latent_hw, scale) if tid is None else tid.float().reshape(-1, 6)
    if tid.shape[0] not in (1, n_prompts):
        raise ValueError(f"{path}: 'time_ids' has shape {tuple(tid.shape)}: expected [1, 6] or [{n_prompts}, 6]")
    return Conditioning(cond, uncond, {"text_embeds": pooled, "time_ids": tid.expand(n_prompts, -1)},
                        {"text_embeds": upooled, "time_ids": tid[:1]})
