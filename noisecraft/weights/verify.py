"""Checks that a file is the weight file the manifest describes, before it gets its final name.

sha256 where the manifest has it (:func:`sha256_file`); otherwise the size where known and the
format (a safetensors header that parses and accounts for every byte; a torch zip archive for
.pth/.pt/.ckpt), refusing HTML and text (what a server sends instead of the file: an error or login
page). :func:`verify_file` raises on a mismatch; :func:`verified_or_discard` also deletes the
download that failed. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Optional

from ..io import SafetensorsHeaderError, safetensors_extent
from .manifest import WeightEntry

logger = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()



_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt")
_TEXT_SUFFIXES = (".json", ".txt", ".yaml", ".yml")  # text by design: the HTML/text refusal does not apply
_SNIFF = 512


def _looks_like_text(head: bytes) -> Optional[str]:
    """'a web page' / 'text' when the first bytes are HTML or mostly printable text, else None."""
    if not head:
        return "an empty answer"
    if head.lstrip()[:1] == b"<":  # <!DOCTYPE, <html, <?xml, after any leading whitespace
        return "a web page"
    if b"\0" not in head:
        printable = sum(1 for b in head if 32 <= b < 127 or b in (9, 10, 13))
        if printable >= 0.95 * len(head):
            return "text"
    return None


def _check_safetensors(path: Path, size: int) -> Optional[str]:
    with open(path, "rb") as f:
        try:
            n, end = safetensors_extent(f, size, min_header=2, max_header=100_000_000)
        except SafetensorsHeaderError as exc:
            return {
                "short": f"expected a safetensors file (8-byte header length + JSON), got {size} bytes",
                "length": f"expected a safetensors file, got a header length of {exc.n} in a file of {size} bytes",
                "json": "expected a safetensors file, got a header that is not JSON",
                "not_object": "expected a safetensors file, got a JSON header that is not an object",
                "offsets": f"expected a safetensors file, got tensor {exc.key!r} without valid data_offsets",
            }[exc.kind]
    if 8 + n + end != size:
        return (f"expected a safetensors file of {8 + n + end} bytes (from its own header), got {size}: "
                f"truncated or not one file")
    return None


def _check_torch_zip(path: Path, size: int) -> Optional[str]:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        return f"expected a torch zip archive (starts with PK\\x03\\x04), got first bytes {magic!r}"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"expected a torch zip archive, got a broken zip ({err})"
    if bad is not None:
        return f"expected a torch zip archive, got a corrupt member {bad!r}"
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "expected a torch zip archive (with a data.pkl member), got a zip without one"
    return None


def content_problem(path: Path, entry: WeightEntry, name: str) -> tuple[Optional[str], str]:
    """(why ``path`` is not ``entry``'s file, or None; what was checked). sha256 where the manifest has
    it; otherwise the size where known, and the format from the file name: a safetensors header that
    parses and accounts for every byte, or a torch zip archive for .pth/.pt/.ckpt. HTML or text is
    refused as what a server sends instead of the file (an error or login page)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    text = _looks_like_text(head)
    if entry.size is not None and size != entry.size:
        extra = f" (the server sent {text}, not the weight file)" if text else ""
        return f"wrong size: expected {entry.size} bytes, got {size}{extra}", "size"
    if entry.sha256:
        got = sha256_file(path)
        if got != entry.sha256.lower():
            extra = f"; the server sent {text}, not the weight file" if text else ""
            return f"sha256 mismatch: expected {entry.sha256}, got {got}{extra}", "sha256"
        return None, "sha256"
    checked = ["size"] if entry.size is not None else []
    if name.lower().endswith(_TEXT_SUFFIXES):
        return None, ", ".join(checked) or "nothing (a text file without sha256 or size)"
    if text:
        return (f"the server sent {text}, not the weight file (first bytes {head[:40]!r}); it is probably an "
                f"error or login page"), ", ".join(checked + ["content type"])
    lower = name.lower()
    if lower.endswith(".safetensors"):
        checked.append("safetensors header")
        why = _check_safetensors(path, size)
    elif lower.endswith(_TORCH_SUFFIXES):
        checked.append("torch zip archive")
        why = _check_torch_zip(path, size)
    else:
        why = None
    return why, ", ".join(checked + ["not HTML/text"])


def verify_file(path: Path, entry: WeightEntry) -> None:
    """Raise ValueError naming the file when ``path`` does not match ``entry`` (size and sha256 where
    the manifest has them, otherwise also the file format; see :func:`download`)."""
    why, _ = content_problem(Path(path), entry, Path(path).name)
    if why:
        raise ValueError(f"{path}: {why} for {entry.name!r}: the file is corrupt, truncated or a different file; "
                         f"download it again")


def verified_or_discard(tmp: Path, final: Path, entry: WeightEntry, src: str, litter: list[Path]) -> None:
    """Check ``tmp`` against the manifest; on a mismatch delete ``litter`` (the .part and its sidecar,
    or our temporary folder) and raise ValueError; without a manifest sha256, warn what was checked."""
    why, checked = content_problem(tmp, entry, final.name)
    if why:
        for p in litter:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        raise ValueError(
            f"{final.name} ({entry.name!r}): {why}; the download was deleted and nothing was saved. Either the "
            f"transfer was corrupted or {src} does not serve the file the manifest describes. Run the same command "
            f"again; if it fails again, check --url, or get the file by hand"
            f"{' from ' + entry.page if entry.page else ''}")
    if entry.sha256:
        logger.info("%s: sha256 verified (%s)", final.name, entry.sha256.lower())
    else:
        logger.warning("%s: the manifest publishes no sha256 for %r, so its content cannot be verified by hash; "
                       "checked instead: %s. Its sha256 is %s", final.name, entry.name, checked, sha256_file(tmp))
