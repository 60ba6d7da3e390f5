"""Validators shared by the nodes: FLOAT inputs ComfyUI lets NaN through, and save-node file names.

ComfyUI checks a FLOAT input against its ``min``/``max``, but a NaN passes every comparison, so
the nodes check those inputs here (:func:`check_number`) and say which node and which input.
Save nodes take a plain file name only (:func:`check_save_name`): empty names, names longer than
``MAX_NAME_CHARS`` (the 255-byte limit of common file systems, with room for the counter and the
temporary suffix) and names with a folder part ('/', '\\', '..') are refused, not sanitized, so
nothing is ever written outside the node's models folder and the saved name is the one typed;
:func:`inside` checks the final path once more.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

__all__ = ["MAX_NAME_CHARS", "check_number", "check_save_name", "inside"]


def check_number(node: str, name: str, value, lo: Optional[float] = None, hi: Optional[float] = None,
                 hint: str = "") -> float:
    """A FLOAT input as a finite float in [lo, hi]; ComfyUI lets NaN through its own range check."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{node}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else (
            f" >= {lo:g}" if lo is not None else (f" <= {hi:g}" if hi is not None else ""))
        raise ValueError(f"{node}: {name} must be a finite number{rng}, got {value!r}{'; ' + hint if hint else ''}")
    return v


_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9 ._-]*$")
MAX_NAME_CHARS = 200  # + "_00001.safetensors" and the temp suffix stays under the usual 255-byte file-name limit


def check_save_name(filename, node: str, example: str) -> str:
    """A save node's ``filename`` input as a plain stem (no folders, no '..', not hidden, not too long).

    Refused (never sanitized), with a message naming ``node`` and the input, so that nothing can be
    written outside the node's folder and the saved name is the one the user typed.
    """
    if not isinstance(filename, str):
        raise ValueError(f"{node}: filename must be text, got {type(filename).__name__}")
    stem = filename.strip()
    if stem.endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
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


def inside(root: Path, path: Path, node: str) -> Path:
    """``path`` if it names a file directly in ``root``; a clear error otherwise (a final guard).

    The folder is compared resolved (a symlinked models folder is fine); the file name itself is
    not resolved, so overwriting a symlink in the folder replaces the link, not its target."""
    if path.parent.resolve() != root.resolve() or path.name in ("", ".", "..") or "/" in path.name:
        raise ValueError(f"{node}: refusing to write {path}: it is not inside {root}; use a plain file name")
    return path
