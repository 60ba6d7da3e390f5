"""Single-file checkpoints (``--model FILE.safetensors`` without ``--config``): which family the file holds, and
the diffusers config folder it trains with, found the way diffusers' ``from_single_file`` finds it.

What ComfyUI users have is one safetensors file in the original (LDM / SGM / MMDiT) key layout: the diffusion
network, usually the text encoders and the VAE. Its weights determine most of the architecture but not all of
it: the attention head count (SD1: 8 heads, SD2: 64-channel heads) is in no tensor shape, and neither the
scheduler nor the tokenizer vocabulary is in the file. So, as diffusers 0.42 does
(``diffusers.loaders.single_file_utils``):

* ``infer_diffusers_model_type`` names the checkpoint from its keys and a few shapes (``v1``, ``v2``,
  ``xl_base``, ``sd3``, ``sd35_medium``, ``sd35_large``, ... ; anything unrecognised falls through to ``v1``,
  which we accept only when the file holds an LDM UNet), and ``DIFFUSERS_DEFAULT_PIPELINE_PATHS`` gives the
  diffusers repo whose configs describe it (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``).
* Those configs (``*.json``, ``*.txt``, ``*.model``: diffusers' own ``allow_patterns``, no weights) come from
  the Hugging Face cache when a former run (ours or diffusers') put them there, else from the Hub
  (``huggingface_hub.snapshot_download``, ``HF_ENDPOINT`` honoured), never with ``HF_HUB_OFFLINE`` set.
* The network loads from the file (``from_single_file(FILE, config=folder)``), the CLIP / T5 text encoders
  too (diffusers' ``create_diffusers_clip_model_from_ldm`` / ``create_diffusers_t5_model_from_checkpoint``, the
  functions ``from_single_file`` calls), with the folder's configs and tokenizers.

The no-Hub route diffusers also has, ``original_config`` (the LDM yaml, for SD1/SD2 and SDXL), is not taken:
the yaml is not in the file either (diffusers downloads it from GitHub), and it would still leave the
tokenizers to the Hub. Offline, ``--config DIR`` (any diffusers folder of the architecture) is the way.

Prediction type, where the file says more than the repo's scheduler: a ``v_pred`` key (ComfyUI's marker of
v-prediction finetunes; ``ztsnr`` adds zero-terminal-SNR betas) means v-prediction; an SD2.x UNet is
v-prediction when ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` has a standard deviation above 0.09,
else eps: ComfyUI's rule (``comfy/supported_models.py``, ``SD20.model_type``), so the refiner trains on the model
as ComfyUI will run it (diffusers' default for SD2, the 768-v repo's scheduler, is wrong for SD2-base files).
EDM checkpoints (Playground v2.5's ``edm_mean``, CosXL's ``edm_vpred.sigma_max``) are refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

__all__ = ["SingleFile", "inspect_single_file", "single_file_config", "text_encoder_from_single_file",
           "t5_in_single_file", "has_weights", "CONFIG_PATTERNS"]

logger = logging.getLogger(__name__)

#: diffusers' model types the trainer conditions, and their family in :mod:`noisecraft.hosts.families`
FAMILY_OF_TYPE = {"v1": "sd", "v2": "sd", "xl_base": "sdxl", "sd3": "sd3", "sd35_medium": "sd3", "sd35_large": "sd3"}
LABELS = {"v1": "SD1.x", "v2": "SD2.x", "xl_base": "SDXL", "sd3": "SD3", "sd35_medium": "SD3.5 medium",
          "sd35_large": "SD3.5 large"}
#: what diffusers' ``_download_diffusers_model_config_from_hub`` fetches: configs and tokenizers, no weights
CONFIG_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]
LDM_UNET = "model.diffusion_model.input_blocks.0.0.weight"
SD2_V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STD = 0.09  # ComfyUI's threshold (supported_models.SD20.model_type)
CLIP_PREFIXES = ("cond_stage_model.", "conditioner.embedders.", "text_encoders.clip_l.", "text_encoders.clip_g.")
T5_PREFIX = "text_encoders.t5xxl."
FAMILY_LIST = ("SD1.x and SD2.x (LDM UNet: model.diffusion_model.input_blocks.*), SDXL base (+ conditioner."
               "embedders.*) and SD3 / SD3.5 (MMDiT: model.diffusion_model.joint_blocks.*)")


@dataclass(frozen=True)
class SingleFile:
    """What a checkpoint is: diffusers' ``model_type``, our ``family`` (``sd``, ``sdxl``, ``sd3``), the diffusers
    ``repo`` of its configs, and the scheduler overrides the file implies (``prediction``: ``epsilon`` /
    ``v_prediction`` or None for the repo's; ``zero_snr``)."""

    path: Path
    model_type: str
    family: str
    repo: str
    prediction: Optional[str] = None
    zero_snr: bool = False

    @property
    def label(self) -> str:
        return LABELS.get(self.model_type, self.model_type)


class _LazyCheckpoint(Mapping):
    """A safetensors file as the ``{key: tensor}`` mapping diffusers' key inspection reads: keys from the
    header, a tensor read from disk only when asked for."""

    def __init__(self, handle):
        self._f = handle
        self._keys = list(handle.keys())
        self._set = set(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._set

    def __getitem__(self, key):
        if key not in self._set:
            raise KeyError(key)
        return self._f.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@contextlib.contextmanager
def _open(path: Path) -> Iterator[_LazyCheckpoint]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for a bad file
        raise ValueError(f"--model {path} is not a single-file checkpoint NoiseCraft can read ({type(exc).__name__}: "
                         f"{str(exc)[:200]}): give a .safetensors checkpoint ({FAMILY_LIST}) or a diffusers "
                         f"folder") from None
    with handle as f:
        yield _LazyCheckpoint(f)


def read_tensors(path: Path, prefixes: Sequence[str]) -> dict:
    """The tensors of ``path`` whose keys start with one of ``prefixes`` (a text encoder's share of a checkpoint)."""
    with _open(path) as ckpt:
        return {k: ckpt[k] for k in ckpt if k.startswith(tuple(prefixes))}


def inspect_single_file(path) -> SingleFile:
    """diffusers' reading of the checkpoint's keys (module docstring), or a ValueError naming the families."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    path = Path(path)
    with _open(path) as ckpt:
        if "edm_mean" in ckpt or "edm_vpred.sigma_max" in ckpt:
            raise ValueError(f"--model {path} is an EDM checkpoint (Playground v2.5 or CosXL: key "
                             f"{'edm_mean' if 'edm_mean' in ckpt else 'edm_vpred.sigma_max'}), whose schedule "
                             f"train-refiner does not train; it trains {FAMILY_LIST}")
        try:
            model_type = infer_diffusers_model_type(ckpt)
        except Exception as exc:  # a shape diffusers' checks do not expect, or a tensor safetensors cannot read
            raise ValueError(f"--model {path}: diffusers could not tell its architecture from its keys "
                             f"({type(exc).__name__}: {str(exc)[:200]}): train-refiner infers {FAMILY_LIST}; for "
                             f"anything else give --config DIR, a diffusers folder of the same architecture") from None
        if model_type == "v1" and (LDM_UNET not in ckpt or "model.diffusion_model.label_emb.0.0.weight" in ckpt):
            what = ("an LDM UNet with added embeddings (label_emb) that diffusers does not recognise (an SDXL whose "
                    "text encoders are missing or cut down?)" if LDM_UNET in ckpt else
                    f"no network diffusers recognises (first keys: {', '.join(list(ckpt)[:3]) or 'none'})")
            raise ValueError(f"--model {path} holds {what}: train-refiner infers {FAMILY_LIST}; for anything else "
                             f"give --config DIR, a diffusers folder of the same architecture")
        family = FAMILY_OF_TYPE.get(model_type)
        if family is None:
            raise ValueError(f"--model {path} is a {model_type!r} checkpoint to diffusers, which train-refiner does "
                             f"not condition: it trains {FAMILY_LIST}")
        prediction, zero_snr = None, "ztsnr" in ckpt and family != "sd3"  # flow models: the repo's scheduler
        if "v_pred" in ckpt and family != "sd3":
            prediction = "v_prediction"
        elif model_type == "v2" and SD2_V_PROBE in ckpt:
            std = float(ckpt[SD2_V_PROBE].float().std(unbiased=False))
            prediction = "v_prediction" if std > SD2_V_STD else "epsilon"
            logger.info("%s: SD2.x, %s (std %.3f of %s; ComfyUI's rule)%s", path.name, prediction, std, SD2_V_PROBE,
                        "; an eps SD2 is usually SD2-base, trained at 512 px: --latent-shape 4 64 64"
                        if prediction == "epsilon" else "")
    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    return SingleFile(path, model_type, family, repo, prediction, zero_snr)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    return (env or "").strip().upper() in {"1", "ON", "YES", "TRUE"} or (env is None and constants.HF_HUB_OFFLINE)


def _complete(folder: Path) -> bool:
    net = (folder / "unet" / "config.json").is_file() or (folder / "transformer" / "config.json").is_file()
    return net and (folder / "scheduler" / "scheduler_config.json").is_file()


def _fetch_configs(sf: SingleFile) -> Path:
    """The repo's config folder: the Hugging Face cache, else the Hub (module docstring); ValueError if neither."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    fix = (f"give --config DIR, a diffusers folder of this architecture (a download of {sf.repo} will do: "
           f"model_index.json, unet/ or transformer/, scheduler/, tokenizers and text encoder configs)")
    with contextlib.suppress(LocalEntryNotFoundError, OSError, ValueError):
        cached = Path(snapshot_download(sf.repo, allow_patterns=CONFIG_PATTERNS, local_files_only=True))
        if _complete(cached):
            logger.info("%s: %s checkpoint, configs of %s from the Hugging Face cache", sf.path.name, sf.label,
                        sf.repo)
            return cached
    if _hub_offline():
        raise ValueError(f"--model {sf.path} is a {sf.label} checkpoint whose configs diffusers takes from "
                         f"{sf.repo}, which is not in the Hugging Face cache, and HF_HUB_OFFLINE is set: {fix}")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    logger.info("%s: %s checkpoint, fetching the configs of %s from the Hugging Face Hub", sf.path.name, sf.label,
                sf.repo)
    try:
        folder = Path(snapshot_download(sf.repo, allow_patterns=CONFIG_PATTERNS, endpoint=endpoint,
                                        library_name="noisecraft"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        where = endpoint or "huggingface.co"
        gated = isinstance(exc, GatedRepoError) or getattr(getattr(exc, "response", None), "status_code", 0) == 401
        if gated:
            fix = (f"{sf.repo} is gated: accept its terms on the Hub and log in (`hf auth login`, or HF_TOKEN), or "
                   f"{fix}")
        raise ValueError(f"--model {sf.path} is a {sf.label} checkpoint, but the configs of {sf.repo} could not be "
                         f"fetched from the Hugging Face Hub ({where}: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}): {fix}") from None
    if not _complete(folder):
        raise ValueError(f"the Hub's {sf.repo} has no unet/config.json or transformer/config.json and "
                         f"scheduler/scheduler_config.json for the {sf.label} checkpoint {sf.path}: {fix}")
    return folder


@contextlib.contextmanager
def single_file_config(path) -> Iterator[tuple[SingleFile, Path]]:
    """``(what the checkpoint is, its diffusers config folder)`` for ``--model FILE`` without ``--config``: the
    cached or fetched repo folder, or, where the file decides the prediction type (module docstring), a temporary
    copy of it with the scheduler changed (removed on exit)."""
    sf = inspect_single_file(path)
    folder = _fetch_configs(sf)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text(encoding="utf-8"))
    change = {}
    if sf.prediction is not None and sched.get("prediction_type", "epsilon") != sf.prediction:
        change["prediction_type"] = sf.prediction
    if sf.zero_snr and not sched.get("rescale_betas_zero_snr", False):
        change["rescale_betas_zero_snr"] = True
    if not change:
        yield sf, folder
        return
    logger.info("%s: scheduler of %s with %s (from the checkpoint)", sf.path.name, sf.repo, change)
    with tempfile.TemporaryDirectory(prefix="noisecraft_config_") as tmp:
        copy = Path(tmp) / Path(sf.repo).name
        shutil.copytree(folder, copy)  # the cache's symlinks are followed: plain files, ours to change
        sched.update(change)
        (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2), encoding="utf-8")
        yield sf, copy


def has_weights(folder: Path) -> bool:
    """True when a transformers model folder holds weights (safetensors or bin, sharded or not)."""
    return folder.is_dir() and any(p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
                                   for p in folder.iterdir())


def text_encoder_from_single_file(cls, path: Path, root: Path, subfolder: str):
    """A CLIP text encoder (``cls``: ``CLIPTextModel`` or ``CLIPTextModelWithProjection``) from the checkpoint's
    weights and ``root/subfolder``'s config, through diffusers' ``create_diffusers_clip_model_from_ldm``."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, is_clip_model_in_single_file

    ckpt = read_tensors(path, CLIP_PREFIXES)
    if not is_clip_model_in_single_file(cls, ckpt):
        raise ValueError(f"--model {path} holds no text encoder for {subfolder}/ (no cond_stage_model.*, "
                         f"conditioner.embedders.* or text_encoders.clip_*): give --config DIR with the text "
                         f"encoders, or --prompt-embeds FILE (see README)")
    try:
        return create_diffusers_clip_model_from_ldm(cls, ckpt, subfolder=subfolder, config=str(root),
                                                    torch_dtype=torch.float32, local_files_only=True)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ValueError(f"--model {path}: diffusers could not build {subfolder}/ from its text encoder weights with "
                         f"the config in {root / subfolder} ({type(exc).__name__}: {str(exc)[:200]}): give --config "
                         f"DIR with this model's text encoders, or --prompt-embeds FILE") from None


def t5_in_single_file(path: Path, root: Path, subfolder: str = "text_encoder_3"):
    """SD3's T5 encoder from the checkpoint (``text_encoders.t5xxl.*``) with ``root/subfolder``'s config, or None
    when the file has none (then the T5 part of the conditioning is zeros, as with T5 dropped)."""
    from diffusers.loaders.single_file_utils import create_diffusers_t5_model_from_checkpoint
    from transformers import T5EncoderModel

    ckpt = read_tensors(path, (T5_PREFIX,))
    if not ckpt:
        return None
    return create_diffusers_t5_model_from_checkpoint(T5EncoderModel, ckpt, subfolder=subfolder, config=str(root),
                                                     torch_dtype=torch.float32, local_files_only=True)
