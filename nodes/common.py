"""Node plumbing shared by every node module: node ids, validators, the prompt embedding of a
CONDITIONING, the loaded-file cache, the pack's model folders, save paths and shared inputs.

* :func:`node_id`: the executing node's id (for progress bars), ``None`` when ``execute()`` is
  called directly; :data:`SEED_MASK`: ComfyUI seeds are unsigned 64-bit.
* Validators (messages start with the node's name and name the input): ComfyUI checks an INT or
  FLOAT input against its ``min``/``max``, but a NaN passes every comparison and ``/prompt`` does
  not check V3 combo values at the ComfyUI version we target, so the nodes check those inputs
  here (:func:`check_number`, :func:`check_int`, :func:`check_combo`).
* :class:`FileCache`: what a loader read from a file, kept per file version (resolved path,
  mtime, size, plus the loader's own options) for at most ``size`` versions; editing or replacing
  the file reloads it. Load Refiner and Load NPNet each keep one.
* :func:`register_folders`: the model folders the pack uses, registered with ComfyUI's
  ``folder_paths`` (``noise_refiners``; ``npnet`` with the folders other NPNet packs use, from the
  manifest's aliases, e.g. ``npnets``, and every path registered under an alias). Idempotent.
* :func:`save_path`: where a save node writes, numbered the way ComfyUI's own savers do
  (``folder_paths.get_save_image_path``: ``<name>_<counter:05>_.safetensors``, the counter one past
  the highest in the folder), in the first folder of the folder name. Names are refused, never
  sanitized (:func:`check_save_name`): empty names, names longer than ``MAX_NAME_CHARS`` (the
  255-byte limit of common file systems, with room for the counter and the temporary suffix) and
  names with a folder part ('/', '\\', '..'), so nothing is ever written outside that folder and
  the saved name is the one typed; :func:`inside` checks the final path once more. With
  ``overwrite`` the plain ``<name>.safetensors`` is used (replaced if it exists); with
  ``plain_first`` the plain name is used while it is free, numbering only after that (Save NPNet's
  behaviour from before the numbering, kept for old workflows).
* :func:`run_folder`: the run folder ``<output>/noisecraft_runs/<name>`` of a training node's
  ``resume_from`` (Train Refiner, Train NPNet), the name checked like a save name.
* Shared inputs (:func:`seed_input`, :func:`scheduler_input`, :func:`sampling_inputs`): the
  schema lines several nodes repeat; the caller gives the tooltip, which stays the node's own.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from comfy_api.latest import io

import folder_paths

from ..noisecraft.io import clean_stale_temps, ensure_dir
from ..noisecraft.weights import load_folder_aliases

log = logging.getLogger(__name__)

__all__ = ["SEED_MASK", "MAX_NAME_CHARS", "REFINER_FOLDER", "NPNET_FOLDER", "node_id", "check_number", "check_int",
           "check_combo", "prompt_embedding", "FileCache", "npnet_folder_names", "register_folders",
           "check_save_name", "inside", "save_path", "file_list_changed", "seed_input", "scheduler_input",
           "sampling_inputs"]

SEED_MASK = 0xFFFF_FFFF_FFFF_FFFF  # ComfyUI seeds are unsigned 64-bit

T = TypeVar("T")


def node_id(cls) -> Optional[str]:
    """The unique id of the node ComfyUI is executing (``hidden.unique_id``); None when a test or
    another node calls ``execute()`` directly."""
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


# -- validators ------------------------------------------------------------------------------------

def _tail(hint: str) -> str:
    return f"; {hint}" if hint else ""


def check_number(node: str, name: str, value, lo: Optional[float] = None, hi: Optional[float] = None,
                 hint: str = "", *, above: Optional[float] = None) -> float:
    """A FLOAT input as a finite float in [lo, hi] (and > ``above``); ComfyUI lets NaN through its own
    range check."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{node}: {name} must be a number, got {value!r}{_tail(hint)}") from None
    if (not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi)
            or (above is not None and v <= above)):
        if above is not None:
            rng = f" > {above:g}" + (f" and <= {hi:g}" if hi is not None else "")
        elif lo is not None and hi is not None:
            rng = f" in [{lo:g}, {hi:g}]"
        else:
            rng = f" >= {lo:g}" if lo is not None else (f" <= {hi:g}" if hi is not None else "")
        raise ValueError(f"{node}: {name} must be a finite number{rng}, got {value!r}{_tail(hint)}")
    return v


def check_int(node: str, name: str, value, lo: int = 1, hi: Optional[int] = None, hint: str = "") -> int:
    """An INT input as an int in [lo, hi]: booleans, fractions, NaN and text are refused too."""
    ok = not isinstance(value, bool)
    try:
        ok = ok and int(value) == value
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or int(value) < lo or (hi is not None and int(value) > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}"
        raise ValueError(f"{node}: {name} must be an integer{rng}, got {value!r}{_tail(hint)}")
    return int(value)


def check_combo(node: str, name: str, value, options: Sequence[str]) -> str:
    """A COMBO input as one of ``options`` (``/prompt`` does not validate V3 combo values here)."""
    if value not in options:
        raise ValueError(f"{node}: {name}: expected one of {list(options)}, got {value!r}")
    return value


def prompt_embedding(positive, node: str, name: str = "positive") -> torch.Tensor:
    """The text embedding [batch, tokens, width] of a CONDITIONING's first entry (``cond[0][0]``).

    Further entries (Conditioning Combine) are ignored, with a log line: NPNet reads one prompt.
    """
    if (not isinstance(positive, (list, tuple)) or not positive or not isinstance(positive[0], (list, tuple))
            or not positive[0] or not torch.is_tensor(positive[0][0])):
        got = ("an empty list (no prompts)" if isinstance(positive, (list, tuple)) and not positive
               else type(positive).__name__)
        raise ValueError(f"{node}: {name}: expected a CONDITIONING with at least one prompt (e.g. from CLIP Text "
                         f"Encode), got {got}")
    if len(positive) > 1:
        log.info("%s: the conditioning has %d entries; NPNet reads the first one's prompt", node, len(positive))
    emb = positive[0][0]
    if emb.ndim != 3 or emb.shape[0] < 1 or emb.shape[1] < 1:
        raise ValueError(f"{node}: expected the conditioning tensor as [batch, tokens, width], got "
                         f"{list(emb.shape)}")
    return emb


# -- loaded files -----------------------------------------------------------------------------------

class FileCache:
    """Objects loaded from files, kept per file version: (resolved path, mtime, size, *options).

    :meth:`get` returns the kept object while the file is unchanged, else loads it again (and
    drops the older versions of that file with the same options); at most ``size`` are kept,
    the least recently used go first.
    """

    def __init__(self, size: int):
        self.size = int(size)
        self._items: "OrderedDict[tuple, Any]" = OrderedDict()

    @staticmethod
    def key(path: Path, *options) -> tuple:
        """The version key of ``path`` (also a node's ``fingerprint_inputs``: it changes with the file)."""
        st = Path(path).stat()
        return (str(Path(path).resolve()), st.st_mtime_ns, st.st_size, *options)

    def get(self, path: Path, load: Callable[[], T], *options) -> T:
        key = self.key(path, *options)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = load()
        for old in [k for k in self._items if k[0] == key[0] and k[3:] == key[3:]]:  # older versions
            del self._items[old]
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


# -- folders ----------------------------------------------------------------------------------------

REFINER_FOLDER = "noise_refiners"
NPNET_FOLDER = "npnet"
_FOLDER_EXTENSIONS = {REFINER_FOLDER: {".safetensors"}, NPNET_FOLDER: {".safetensors", ".sft", ".pth", ".pt"}}


def npnet_folder_names() -> list[str]:
    """``npnet`` and the folder names other packs use for the same files (``npnets``)."""
    return [NPNET_FOLDER, *load_folder_aliases().get(NPNET_FOLDER, [])]


def register_folders() -> None:
    """Register ``models/noise_refiners`` and ``models/npnet`` (+ ``models/<alias>`` and the paths
    registered under an alias, e.g. by ``extra_model_paths.yaml`` or another pack) with ComfyUI.

    Safe to call any number of times: a path already registered is not added again.
    """
    names = {REFINER_FOLDER: [REFINER_FOLDER], NPNET_FOLDER: npnet_folder_names()}
    for folder, exts in _FOLDER_EXTENSIONS.items():
        if folder not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[folder] = ([], set(exts))
        for name in names[folder]:
            folder_paths.add_model_folder_path(folder, os.path.join(folder_paths.models_dir, name))
        for alias in names[folder][1:]:
            entry = folder_paths.folder_names_and_paths.get(alias)
            for path in (entry[0] if entry else []):
                folder_paths.add_model_folder_path(folder, path)


# -- save paths -------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9 ._-]*$")
MAX_NAME_CHARS = 200  # + "_00001_.safetensors" and the temp suffix stays under the usual 255-byte limit
SUFFIX = ".safetensors"


def check_save_name(filename, node: str, example: str) -> str:
    """A save node's ``filename`` input as a plain stem (no folders, no '..', not hidden, not too long).

    Refused (never sanitized), with a message naming ``node`` and the input, so that nothing can be
    written outside the node's folder and the saved name is the one the user typed.
    """
    if not isinstance(filename, str):
        raise ValueError(f"{node}: filename must be text, got {type(filename).__name__}")
    stem = filename.strip()
    if stem.endswith(SUFFIX):
        stem = stem[: -len(SUFFIX)]
    rule = (f"a plain file name (letters, digits, space, '.', '_', '-'; no folders), "
            f"e.g. '{example}'")
    if not stem:
        raise ValueError(f"{node}: filename is empty; expected {rule}")
    if len(stem) > MAX_NAME_CHARS:
        raise ValueError(f"{node}: filename is {len(stem)} characters long; expected at most {MAX_NAME_CHARS} (file "
                         f"systems limit a name to 255 bytes): shorten it")
    if "/" in stem or "\\" in stem or ".." in stem:
        raise ValueError(f"{node}: filename {filename!r} contains a folder part ('/', '\\' or '..'); the file is "
                         f"always written into the node's models folder, so expected {rule}")
    if not _NAME_RE.match(stem):
        raise ValueError(f"{node}: filename {filename!r} is not {rule}")
    return stem


RUNS_FOLDER = "noisecraft_runs"  # the training nodes' run folders, under ComfyUI's output folder


def run_folder(name, node: str, *, example: str = "my_run") -> Optional[Path]:
    """``<ComfyUI output>/noisecraft_runs/<name>`` for a training node's ``resume_from`` input;
    ``None`` when it is empty (or not given): no named run.

    The name is checked like a save name (:func:`check_save_name`: no folder part, no '..', not
    hidden, not too long) and refused, never sanitized, with a message naming ``node`` and
    ``resume_from``; :func:`inside` checks the final path once more."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise ValueError(f"{node}: resume_from must be text (a run folder name), got {type(name).__name__}")
    if not name.strip():
        return None
    try:
        stem = check_save_name(name, node, example)
    except ValueError as e:
        msg = str(e).replace(": filename", ": resume_from", 1)
        raise ValueError(msg.replace("the file is always written into the node's models folder",
                                     f"the run folder is always made in ComfyUI's output/{RUNS_FOLDER}")) from None
    root = Path(folder_paths.get_output_directory()).absolute() / RUNS_FOLDER
    return inside(root, root / stem, node)


def inside(root: Path, path: Path, node: str) -> Path:
    """``path`` if it names a file directly in ``root``; a clear error otherwise (a final guard).

    The folder is compared resolved (a symlinked models folder is fine); the file name itself is
    not resolved, so overwriting a symlink in the folder replaces the link, not its target."""
    if path.parent.resolve() != root.resolve() or path.name in ("", ".", "..") or "/" in path.name:
        raise ValueError(f"{node}: refusing to write {path}: it is not inside {root}; use a plain file name")
    return path


def save_path(folder: str, prefix, node: str, *, example: str = "my_file", overwrite: bool = False,
              plain_first: bool = False) -> Path:
    """The file a save node writes in the first path of ComfyUI folder ``folder`` (see the module
    docstring for the naming); the folder is created, and leftover temp files of killed saves
    (:func:`noisecraft.io.clean_stale_temps`) are removed from it. Write it with
    :mod:`noisecraft.io` (``atomic_path``, ``write_safetensors``)."""
    stem = check_save_name(prefix, node, example)
    register_folders()
    root = Path(os.path.abspath(folder_paths.get_folder_paths(folder)[0]))
    ensure_dir(root, f"{node}: the {folder} folder")
    clean_stale_temps(root)
    plain = root / f"{stem}{SUFFIX}"
    if overwrite or (plain_first and not plain.exists()):
        return inside(root, plain, node)
    out_dir, name, counter, _, _ = folder_paths.get_save_image_path(stem, str(root))
    return inside(root, Path(out_dir) / f"{name}_{counter:05}_{SUFFIX}", node)


def file_list_changed(folder: str) -> None:
    """After a save: drop ComfyUI's cached file list of ``folder``, so loaders list the new file on
    the next refresh."""
    folder_paths.filename_list_cache.pop(folder, None)


# -- shared inputs ----------------------------------------------------------------------------------

def seed_input(tooltip: str, *, control_after_generate: Optional[bool] = True) -> io.Int.Input:
    """The ``seed`` INT input (0 .. 2^64 - 1, ComfyUI's range); ``control_after_generate=None`` leaves
    the widget without ComfyUI's after-generate control (Train NPNet's seed, as it always was)."""
    return io.Int.Input("seed", default=0, min=0, max=SEED_MASK, control_after_generate=control_after_generate,
                        tooltip=tooltip)


def scheduler_input(tooltip: str, names: Sequence[str]) -> io.Combo.Input:
    """The ``scheduler`` COMBO input over ComfyUI's scheduler ``names``, default ``normal``."""
    return io.Combo.Input("scheduler", options=list(names), default="normal", tooltip=tooltip)


def sampling_inputs(*, model: str, positive: str, negative: str, latent: str) -> list:
    """The ``model``, ``positive``, ``negative`` and ``latent`` inputs of a node that samples, with
    the node's own tooltips."""
    return [
        io.Model.Input("model", tooltip=model),
        io.Conditioning.Input("positive", tooltip=positive),
        io.Conditioning.Input("negative", tooltip=negative),
        io.Latent.Input("latent", tooltip=latent),
    ]
