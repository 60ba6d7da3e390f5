"""Known weight files: the manifest, sha256 checks, safe loading (no unpickling) and downloads.

``weights_manifest.json`` at the repository root (next to the ``noisecraft`` package) lists every weight file the pack knows: name,
kind, base model, url (or in-package path), sha256, size, license and the ComfyUI folder it goes
to, with a ``source`` saying where each fact comes from. Files load only through safetensors or
``torch.load(weights_only=True)``.

:func:`download` fetches one entry over HTTP(S) with the standard library only: it writes to
``<file>.part``, resumes an interrupted transfer with an HTTP ``Range`` request (and starts over
cleanly when a server ignores the range), checks the size and sha256 the manifest gives, and only
then renames the file to its final name, so a file under its final name is always a verified one.
:func:`resolve_models_dir` says which folder a file goes to (``--dest``, else
``<ComfyUI>/models/<folder>``). ``python -m noisecraft fetch NAME`` is the command-line front end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Callable, Optional, Union

__all__ = [
    "MANIFEST_PATH",
    "WeightEntry",
    "DownloadError",
    "load_manifest",
    "load_folder_aliases",
    "find_entry",
    "sha256_file",
    "verify_file",
    "download",
    "resolve_models_dir",
    "find_comfyui_root",
    "COMFYUI_ENV",
]

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST_PATH = PACKAGE_DIR.parent / "weights_manifest.json"  # repository root (DESIGN.md)
COMFYUI_ENV = "COMFYUI_PATH"
_USER_AGENT = "noisecraft-fetch/0.1 (+python-urllib)"

PathLike = Union[str, os.PathLike]
Progress = Callable[[int, Optional[int]], None]


class DownloadError(RuntimeError):
    """A transfer failed (network error, HTTP error, connection dropped). Any partial data stays
    in ``<file>.part`` so that the same call, run again, resumes where it stopped. ``resumable`` is
    False for answers that a retry will not change (HTTP 404, a wrong Content-Range)."""

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable


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
        candidates = [Path(os.path.abspath(__file__)).parent, PACKAGE_DIR]
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


# -- download ------------------------------------------------------------------------------------


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_NETWORK_ERRORS = (urllib.error.URLError, HTTPException, ConnectionError, socket.timeout, TimeoutError)


def _mb(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _mismatch(path: Path, entry: WeightEntry) -> Optional[str]:
    """Why ``path`` is not ``entry``'s file ("expected ..., got ..."), or None when it matches."""
    got_size = path.stat().st_size
    if entry.size is not None and got_size != entry.size:
        return f"expected {entry.size} bytes, got {got_size}"
    if entry.sha256:
        got = sha256_file(path)
        if got != entry.sha256.lower():
            return f"sha256 mismatch: expected {entry.sha256}, got {got}"
    return None


def _verify_or_discard(part: Path, final: Path, entry: WeightEntry, src: str) -> None:
    """Check ``part`` against the manifest; on a mismatch delete it and raise ValueError."""
    why = _mismatch(part, entry)
    if why:
        part.unlink()
        raise ValueError(
            f"{final.name} ({entry.name!r}): {why}; the download was deleted. Either the transfer was corrupted "
            f"or the file at {src} is not the one the manifest describes. Run the same command again; if it "
            f"fails again, the hosted file has changed: report it, or get the file by hand"
            f"{' from ' + entry.page if entry.page else ''} and check it yourself")
    if entry.sha256:
        logger.info("%s: sha256 verified (%s)", final.name, entry.sha256.lower())
    else:
        logger.warning("%s: the manifest publishes no sha256 for %r, so the file cannot be verified; its sha256 "
                       "is %s", final.name, entry.name, sha256_file(part))


def _open(src: str, offset: int, timeout: float):
    req = urllib.request.Request(src, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")  # add_header: kept across redirects (HF -> CDN)
    return urllib.request.urlopen(req, timeout=timeout)


def _transfer(src: str, part: Path, entry: WeightEntry, *, chunk: int, timeout: float,
              progress: Optional[Progress]) -> None:
    """One HTTP request: append to ``part`` from its current size (or start over). Returns when the
    body is complete; raises DownloadError (keeping ``part``) when the transfer breaks."""
    offset = part.stat().st_size if part.exists() else 0
    if entry.size is not None and offset > entry.size:
        logger.info("%s is larger than the expected %d bytes: starting over", part.name, entry.size)
        part.unlink()
        offset = 0
    if entry.size is not None and offset == entry.size and offset:
        return  # all bytes are here already; verification decides
    try:
        resp = _open(src, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left after `offset`: the part is complete
            logger.info("%s: the server has no bytes after %d; checking the partial file as is", part.name, offset)
            return
        raise DownloadError(f"{entry.name!r}: {src} answered HTTP {err.code} {err.reason}; expected 200 or 206. "
                            f"Check the URL (a moved or private file?); --url URL downloads from elsewhere",
                            resumable=err.code >= 500) from err
    except _NETWORK_ERRORS as err:
        raise DownloadError(f"{entry.name!r}: cannot reach {src}: {err}. Check the network (and proxy "
                            f"settings); run the same command again") from err
    with resp:
        status = resp.getcode()
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        mode = "wb"
        if offset and status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == offset:
                mode = "ab"
                logger.info("resuming %s at %s", part.name, _mb(offset))
            else:
                raise DownloadError(f"{entry.name!r}: asked {src} for bytes {offset}- and got Content-Range "
                                    f"{resp.headers.get('Content-Range')!r}; delete {part} and run again",
                                    resumable=False)
        elif status == 200:
            if offset:
                logger.info("%s ignored the Range request (HTTP 200): starting %s over", src, part.name)
            offset = 0
        else:
            raise DownloadError(f"{entry.name!r}: {src} answered HTTP {status}; expected 200 or 206",
                                resumable=False)
        total = offset + length if length is not None else entry.size
        if entry.size is not None and total is not None and total != entry.size:
            part.unlink(missing_ok=True)
            raise ValueError(f"{entry.name!r}: expected {entry.size} bytes (the manifest), but {src} serves {total}: "
                             f"a different file, so nothing was kept. Check --url, or report the changed upload")
        done = offset
        try:
            with open(part, mode) as f:
                if progress:
                    progress(done, total)
                while True:
                    block = resp.read(chunk)
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
                f.flush()
                os.fsync(f.fileno())
        except _NETWORK_ERRORS as err:
            raise DownloadError(f"{entry.name!r}: the transfer from {src} broke after {_mb(done)} of {_mb(total)} "
                                f"({err}); {part} is kept: run the same command again to resume") from err
        if length is not None and done - offset < length:
            raise DownloadError(f"{entry.name!r}: the connection to {src} closed after {_mb(done)} of {_mb(total)}; "
                                f"{part} is kept: run the same command again to resume")


def download(entry: WeightEntry, dest_dir: PathLike, *, url: Optional[str] = None, chunk: int = 1 << 20,
             timeout: float = 30, progress: Optional[Progress] = None, retries: int = 0) -> Path:
    """Download ``entry`` into ``dest_dir`` and return the final path.

    - ``url`` overrides ``entry.url`` (a mirror, or a local server in tests).
    - Data goes to ``<file>.part``; an existing ``.part`` is resumed with ``Range: bytes=N-``. A server
      that ignores the range (HTTP 200) makes the download start over from byte 0.
    - The size and sha256 are checked when the manifest knows them; on a mismatch the downloaded
      file is deleted and ValueError names the file, the expected and the got value, and what to do.
    - Only a verified file is renamed (atomically) to its final name. A final file that is already
      there and verifies is kept without any request; one that does not verify is left alone and
      reported (it may be the user's own file).
    - ``progress(done_bytes, total_bytes_or_None)`` is called as data arrives.
    - ``retries``: how many more times a broken transfer is resumed within this call (0: raise
      :class:`DownloadError` at once, keeping the ``.part``).
    """
    src = url or entry.url
    name = entry.file_name
    if not name and src:  # an entry without a file name (e.g. an official file behind a web page) + --url
        name = urllib.parse.unquote(urllib.parse.urlsplit(src).path.rsplit("/", 1)[-1]) or None
    if not src and entry.path:
        raise ValueError(f"{entry.name!r} ships inside the noisecraft package ({entry.local_path}); there is "
                         f"nothing to download")
    if not src or not name:
        where = f" from {entry.page}" if entry.page else ""
        raise ValueError(f"{entry.name!r} has no direct download URL in the manifest: get the file by hand{where} "
                         f"and put it in {dest_dir} (or pass a URL with --url)")
    if urllib.parse.urlsplit(src).scheme not in ("http", "https"):
        raise ValueError(f"{entry.name!r}: expected an http(s) URL, got {src!r}")
    dest_dir = Path(dest_dir)
    final = dest_dir / name
    part = dest_dir / (name + ".part")

    if final.exists():
        if entry.sha256 is None and entry.size is None:
            logger.warning("%s already exists and the manifest has neither size nor sha256 for %r: keeping it "
                           "unchecked (delete it to download again)", final, entry.name)
            return final
        why = _mismatch(final, entry)
        if why:
            raise ValueError(f"{final} already exists but is not {entry.name!r} ({why}). It was left untouched: "
                             f"move or delete it and run again, or choose another folder with --dest")
        logger.info("%s is already there and verified: nothing to download", final)
        return final

    dest_dir.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %r from %s to %s", entry.name, src, final)
    attempt = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _transfer(src, part, entry, chunk=chunk, timeout=timeout, progress=progress)
            break
        except DownloadError as err:
            if attempt >= retries or not err.resumable:
                raise
            attempt += 1
            grew = part.exists() and part.stat().st_size > before
            logger.warning("transfer of %s broke (%s); resuming (retry %d of %d)", name, err, attempt, retries)
            if not grew:  # nothing came through: give the network a moment before asking again
                time.sleep(min(2.0 ** attempt, 30.0))
    _verify_or_discard(part, final, entry, src)
    os.replace(part, final)
    logger.info("saved %s (%s)", final, _mb(final.stat().st_size))
    return final
