"""The manifest of known weight files, and where a file may go.

``weights_manifest.json`` at the repository root (next to the ``noisecraft`` package) lists every weight file the pack knows: name,
kind, base model, url (or in-package path), sha256, size, license and the ComfyUI folder it goes
to, with a ``source`` saying where each fact comes from (:class:`WeightEntry`, :func:`load_manifest`).
:func:`resolve_models_dir` says which folder a file goes to (``--dest``, else
``<ComfyUI>/models/<folder>``). A download writes only inside that folder: :func:`check_file_name`
refuses any name that is not a plain file name, and :func:`inside_folder` any path that does not
resolve inside the folder.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the noisecraft package
MANIFEST_PATH = PACKAGE_DIR.parent / "weights_manifest.json"  # repository root (DESIGN.md)
COMFYUI_ENV = "COMFYUI_PATH"

PathLike = Union[str, os.PathLike]


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
    filename: Optional[str] = None  # name on disk; default: the last part of ``url`` (or ``path``)
    preset: Optional[str] = None  # NPNet preset the file is for ("sdxl", "dreamshaper", "dit")
    format: Optional[str] = None  # file layout, e.g. "safetensors, embeeding.* keys"
    page: Optional[str] = None  # where a person can get the file when there is no direct url
    size_approx: Optional[str] = None  # size as a host displays it ("122 MB") when bytes are unknown
    source: Optional[dict] = field(default=None, compare=False, hash=False)  # fact -> where it came from

    @property
    def local_path(self) -> Optional[Path]:
        return PACKAGE_DIR / self.path if self.path else None

    @property
    def file_name(self) -> Optional[str]:
        """The file's name on disk: ``filename``, else the last segment of ``url`` or ``path``."""
        if self.filename:
            return self.filename
        if self.url:
            tail = urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1])
            return tail or None
        if self.path:
            return Path(self.path).name
        return None


def load_manifest(path: Path = MANIFEST_PATH) -> list[WeightEntry]:
    data = json.loads(Path(path).read_text())
    fields = WeightEntry.__dataclass_fields__
    return [WeightEntry(**{k: v for k, v in item.items() if k in fields}) for item in data["weights"]]


def load_folder_aliases(path: Path = MANIFEST_PATH) -> dict[str, list[str]]:
    """ComfyUI model folder -> other folder names that hold the same files in other node packs
    (the manifest's ``folders`` table; e.g. ``npnet`` -> ``["npnets"]``). Loaders should look in
    all of them; :func:`download` always writes to the canonical one."""
    data = json.loads(Path(path).read_text())
    return {name: list(info.get("aliases", [])) for name, info in data.get("folders", {}).items()}


def find_entry(name: str, path: Path = MANIFEST_PATH) -> WeightEntry:
    entries = load_manifest(path)
    for entry in entries:
        if entry.name == name:
            return entry
    raise KeyError(f"no weight file named {name!r} in the manifest; known: {[e.name for e in entries]}")


# -- where files go ------------------------------------------------------------------------------


def _looks_like_comfyui(root: Path) -> bool:
    return (root / "main.py").is_file() and (root / "comfy").is_dir()


def find_comfyui_root(package_dir: Optional[PathLike] = None) -> Optional[Path]:
    """The ComfyUI folder this package is installed in, or None.

    The pack lives in ``<ComfyUI>/custom_nodes/<pack>/`` with this package at ``<pack>/noisecraft``,
    so ComfyUI is two levels above the pack: recognised by its ``main.py`` and ``comfy/``. Both the
    path as imported and its symlink-resolved form are tried (a pack symlinked into custom_nodes)."""
    if package_dir is not None:
        candidates = [Path(package_dir)]
    else:
        candidates = [Path(os.path.abspath(__file__)).parent.parent, PACKAGE_DIR]
    for pkg in candidates:
        pack = pkg.parent
        root = pack.parent.parent
        if pack.parent.name == "custom_nodes" and _looks_like_comfyui(root):
            return root
    return None


def _check_comfyui_dir(root: Path, where: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"{where} is {str(root)!r}, which is not a folder: expected your ComfyUI folder "
                         f"(the one with main.py and models/); fix the path, or give --dest DIR")
    if not (_looks_like_comfyui(root) or (root / "models").is_dir()):
        raise ValueError(f"{where} is {str(root)!r}, which has neither main.py + comfy/ nor models/: expected "
                         f"your ComfyUI folder; fix the path, or give --dest DIR to choose the folder yourself")
    return root


def resolve_models_dir(entry: WeightEntry, comfyui_dir: Optional[PathLike] = None, *,
                       dest: Optional[PathLike] = None, package_dir: Optional[PathLike] = None) -> Path:
    """The folder ``entry``'s file goes to.

    ``dest`` (the CLI's ``--dest``) wins. Otherwise ``<ComfyUI>/models/<entry.folder>``, where the
    ComfyUI folder is ``comfyui_dir`` (``--comfyui``), else the ``COMFYUI_PATH`` environment variable,
    else the ComfyUI this package is installed in (:func:`find_comfyui_root`). With none of these,
    a ValueError says what to pass. The folder is not created here.
    """
    if dest is not None:
        return Path(dest).expanduser()
    if entry.folder == "in-package" or not entry.folder:
        raise ValueError(f"{entry.name!r} ships inside the noisecraft package ({entry.path}); it has no "
                         f"ComfyUI models folder and needs no download")
    if comfyui_dir is not None:
        root = _check_comfyui_dir(Path(comfyui_dir), "--comfyui")
    elif os.environ.get(COMFYUI_ENV):
        root = _check_comfyui_dir(Path(os.environ[COMFYUI_ENV]), f"${COMFYUI_ENV}")
    else:
        root = find_comfyui_root(package_dir)
        if root is None:
            where = Path(package_dir) if package_dir is not None else PACKAGE_DIR
            raise ValueError(
                f"cannot tell where ComfyUI is: noisecraft runs from {where}, which is not inside "
                f"<ComfyUI>/custom_nodes/<pack>/, and {COMFYUI_ENV} is not set. Give --comfyui DIR or set "
                f"{COMFYUI_ENV}=DIR (the ComfyUI folder), or --dest DIR for the exact folder "
                f"(normally <ComfyUI>/models/{entry.folder})")
    return root / "models" / entry.folder


# -- file names: only inside the destination folder ------------------------------------------------


_MAX_NAME_BYTES = 255  # the common file-name limit (ext4, NTFS, APFS)


def check_file_name(name: Optional[str], *, what: str) -> str:
    """Return ``name`` if it is a plain file name that stays in its folder, else raise ValueError.

    Refused: empty names, any ``/`` or ``\\`` separator, ``..``, absolute or drive paths (``:``),
    hidden names (a leading ``.``, which also covers ``.`` and ``..``), NUL and other control
    characters, and names over 255 bytes. ``what`` says where the name came from (the manifest
    entry, or the last segment of ``--url`` after URL-decoding) for the message."""
    fix = ("give the entry a plain `filename` in weights_manifest.json" if "manifest" in what
           else "use a URL whose last segment is a plain file name, or a manifest entry with a `filename`")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: expected a file name, got {name!r} (empty), so nothing was written. Fix: {fix}")
    problems = []
    if "/" in name or "\\" in name:
        problems.append("a path separator")
    if ".." in name:
        problems.append("'..'")
    if os.path.isabs(name) or ":" in name:
        problems.append("an absolute or drive path")
    if name.startswith("."):
        problems.append("a hidden name (leading '.')")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        problems.append("a NUL or control character")
    if len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
        problems.append(f"more than {_MAX_NAME_BYTES} bytes")
    if problems:
        raise ValueError(f"{what}: {name!r} is not a plain file name ({', '.join(problems)}); a download may only "
                         f"create a file inside its destination folder, so nothing was written. Fix: {fix}")
    return name


def inside_folder(dest_dir: Path, name: str) -> Path:
    """``dest_dir / name``, refused (ValueError) unless its resolved form lies inside the resolved folder
    (this also catches a symlink planted under that name that points elsewhere)."""
    root = Path(dest_dir).expanduser().resolve()
    path = root / name
    if path.resolve() == root or not path.resolve().is_relative_to(root):
        raise ValueError(f"{path} resolves to {path.resolve()}, which is outside the destination folder {root}; "
                         f"nothing was written. Remove that link, or choose another folder with --dest")
    return path
