"""Known weight files: the manifest, sha256 checks and safe loading (no unpickling).

``weights_manifest.json`` at the repository root (next to the ``noisecraft`` package) lists every weight file the pack knows: name,
kind, base model, url (or in-package path), sha256, size, license and the ComfyUI folder it goes
to. Files load only through safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["MANIFEST_PATH", "WeightEntry", "load_manifest", "find_entry", "sha256_file", "verify_file"]

PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST_PATH = PACKAGE_DIR.parent / "weights_manifest.json"  # repository root (DESIGN.md)


@dataclass(frozen=True)
class WeightEntry:
    name: str
    kind: str
    base_model: str
    sha256: Optional[str]
    size: Optional[int]
    license: str
    folder: str
    url: Optional[str] = None
    path: Optional[str] = None  # in-package file, relative to the noisecraft package

    @property
    def local_path(self) -> Optional[Path]:
        return PACKAGE_DIR / self.path if self.path else None


def load_manifest(path: Path = MANIFEST_PATH) -> list[WeightEntry]:
    data = json.loads(Path(path).read_text())
    fields = WeightEntry.__dataclass_fields__
    return [WeightEntry(**{k: v for k, v in item.items() if k in fields}) for item in data["weights"]]


def find_entry(name: str, path: Path = MANIFEST_PATH) -> WeightEntry:
    entries = load_manifest(path)
    for entry in entries:
        if entry.name == name:
            return entry
    raise KeyError(f"no weight file named {name!r} in the manifest; known: {[e.name for e in entries]}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, entry: WeightEntry) -> None:
    """Raise ValueError naming the file and both hashes when ``path`` does not match ``entry``."""
    if entry.size is not None and Path(path).stat().st_size != entry.size:
        raise ValueError(
            f"{path}: size {Path(path).stat().st_size} bytes, the manifest says {entry.size} for "
            f"{entry.name!r}: the file is truncated or a different file; download it again"
        )
    if entry.sha256:
        got = sha256_file(path)
        if got != entry.sha256:
            raise ValueError(
                f"{path}: sha256 {got} does not match the manifest's {entry.sha256} for "
                f"{entry.name!r}: the file is corrupt or a different file; download it again"
            )
