"""Known weight files: the manifest, checks, safe loading (no unpickling) and downloads.

``weights_manifest.json`` at the repository root (next to the ``noisecraft`` package) lists every weight file the pack knows: name,
kind, base model, url (or in-package path), sha256, size, license and the ComfyUI folder it goes
to, with a ``source`` saying where each fact comes from. Files load only through safetensors or
``torch.load(weights_only=True)``.

:func:`download` fetches one entry and writes only inside the destination folder: the file name
comes from the manifest entry (a name taken from ``--url`` is checked by :func:`check_file_name`),
and every path it writes must resolve inside the folder. Every download is checked before it gets
its final name: sha256 where the manifest has it, otherwise the size where known and the format
(safetensors header / torch zip archive), refusing HTML and text; a file that fails is deleted.
Plain ``http://`` needs ``allow_http=True`` (``--allow-http``).

Two transports. Hugging Face entries (``.../<repo>/resolve/<rev>/<file>``) go through
``huggingface_hub.hf_hub_download`` (installed with diffusers: redirects to the CDN, ETags, retries,
HF_TOKEN for gated repos) into a temporary folder of ours inside the destination, then through our
checks, then ``os.replace``. Every other URL (a mirror given with ``--url``) goes through the
standard library's urllib, by hand, because no well-kept library serves generic resumable,
verified HTTP downloads without adding a dependency (``requests``/``httpx`` give a stream, not
resume + validation; huggingface_hub only speaks the Hub's API). That path writes ``<file>.part``
and resumes it with ``Range`` + ``If-Range`` (the ETag, else Last-Modified, kept in
``<file>.part.json``), so a remote file that changed restarts from zero; a server that sends
neither validator restarts from zero too rather than splice two versions.
:func:`resolve_models_dir` says which folder a file goes to (``--dest``, else
``<ComfyUI>/models/<folder>``). ``python -m noisecraft fetch NAME`` is the command-line front end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
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
    "check_file_name",
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
    """A transfer failed (network error, HTTP error, connection dropped). On the plain-HTTP path any
    partial data stays in ``<file>.part`` (with its validator in ``<file>.part.json``) so that the
    same call, run again, resumes where it stopped (if the remote file is unchanged); the Hugging
    Face path keeps nothing. ``resumable`` is False for answers that a retry will not change (HTTP
    404, a gated repository, offline mode)."""

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


def _inside(dest_dir: Path, name: str) -> Path:
    """``dest_dir / name``, refused (ValueError) unless its resolved form lies inside the resolved folder
    (this also catches a symlink planted under that name that points elsewhere)."""
    root = Path(dest_dir).expanduser().resolve()
    path = root / name
    if path.resolve() == root or not path.resolve().is_relative_to(root):
        raise ValueError(f"{path} resolves to {path.resolve()}, which is outside the destination folder {root}; "
                         f"nothing was written. Remove that link, or choose another folder with --dest")
    return path


def _url_file_name(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])


# -- content checks --------------------------------------------------------------------------------


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
        raw = f.read(8)
        if len(raw) < 8:
            return f"expected a safetensors file (8-byte header length + JSON), got {size} bytes"
        n = int.from_bytes(raw, "little")
        if n < 2 or n > min(size - 8, 100_000_000):
            return f"expected a safetensors file, got a header length of {n} in a file of {size} bytes"
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return "expected a safetensors file, got a header that is not JSON"
    if not isinstance(header, dict):
        return "expected a safetensors file, got a JSON header that is not an object"
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"expected a safetensors file, got tensor {key!r} without valid data_offsets"
        end = max(end, offsets[1])
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


def _content_problem(path: Path, entry: WeightEntry, name: str) -> tuple[Optional[str], str]:
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
    why, _ = _content_problem(Path(path), entry, Path(path).name)
    if why:
        raise ValueError(f"{path}: {why} for {entry.name!r}: the file is corrupt, truncated or a different file; "
                         f"download it again")


def _verified_or_discard(tmp: Path, final: Path, entry: WeightEntry, src: str, litter: list[Path]) -> None:
    """Check ``tmp`` against the manifest; on a mismatch delete ``litter`` (the .part and its sidecar,
    or our temporary folder) and raise ValueError; without a manifest sha256, warn what was checked."""
    why, checked = _content_problem(tmp, entry, final.name)
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


# -- download: plain HTTP(S) ------------------------------------------------------------------------


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)
_NETWORK_ERRORS = (urllib.error.URLError, HTTPException, ConnectionError, socket.timeout, TimeoutError)
_HTTP_FIX = "pass --allow-http (CLI) or allow_http=True (API) only if you trust the network, or use an https:// URL"


def _mb(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but not from https to plain http (unless allowed)."""

    def __init__(self, allow_http: bool):
        self.allow_http = allow_http

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme
        if scheme not in ("http", "https") or (scheme == "http" and not self.allow_http):
            raise DownloadError(f"{req.full_url} redirected to {newurl!r}: refused (plain http or another scheme); "
                                f"{_HTTP_FIX}", resumable=False)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(src: str, offset: int, validator: Optional[str], timeout: float, allow_http: bool):
    req = urllib.request.Request(src, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")  # add_header: kept across redirects (HF -> CDN)
        req.add_header("If-Range", validator)  # a changed remote answers 200 (the whole new file)
    return urllib.request.build_opener(_NoDowngrade(allow_http)).open(req, timeout=timeout)


def _sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_sidecar(part: Path, src: str) -> Optional[str]:
    """The If-Range validator stored for ``part`` (strong ETag, else Last-Modified), or None."""
    try:
        data = json.loads(_sidecar(part).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("url") != src:
        return None
    etag, modified = data.get("etag"), data.get("last_modified")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag
    return modified if isinstance(modified, str) and modified else None


def _write_sidecar(part: Path, src: str, headers) -> None:
    data = {"url": src, "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}
    _sidecar(part).write_text(json.dumps(data))


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _sidecar(part).unlink(missing_ok=True)


def _transfer(src: str, part: Path, entry: WeightEntry, *, chunk: int, timeout: float,
              progress: Optional[Progress], allow_http: bool, _restarted: bool = False) -> None:
    """One HTTP request: append to ``part`` from its current size (or start over). Returns when the
    body is complete; raises DownloadError (keeping ``part``) when the transfer breaks.

    A ``.part`` resumes only with the validator (ETag, else Last-Modified) stored in its sidecar
    ``<file>.part.json``, sent as ``If-Range``: a changed remote answers 200 and the ``.part`` is
    truncated. Without a stored validator (a server that sends neither header, or a ``.part`` of
    unknown origin) the ``.part`` is discarded and the download starts from zero: splicing bytes of
    two versions would give a file that no check short of sha256 can catch."""
    offset = part.stat().st_size if part.exists() else 0
    validator = _read_sidecar(part, src) if offset else None
    if offset and validator is None:
        logger.info("%s: no ETag/Last-Modified stored for it, so a resume could splice two versions of the remote "
                    "file: starting over", part.name)
        _discard(part)
        offset = 0
    if entry.size is not None and offset > entry.size:
        logger.info("%s is larger than the expected %d bytes: starting over", part.name, entry.size)
        _discard(part)
        offset, validator = 0, None
    if entry.size is not None and offset == entry.size and offset:
        return  # all bytes are here already; verification decides
    try:
        resp = _open(src, offset, validator, timeout, allow_http)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # If-Range matched and nothing is left after `offset`
            m = _UNSATISFIED_RANGE.match(err.headers.get("Content-Range", "") if err.headers else "")
            if m and int(m.group(1)) != offset and not _restarted:
                logger.info("%s: the server's file has %s bytes, the partial file %d: starting over",
                            part.name, m.group(1), offset)
                _discard(part)
                return _transfer(src, part, entry, chunk=chunk, timeout=timeout, progress=progress,
                                 allow_http=allow_http, _restarted=True)
            logger.info("%s: the server has no bytes after %d; checking the partial file as is", part.name, offset)
            return
        raise DownloadError(f"{entry.name!r}: {src} answered HTTP {err.code} {err.reason}; expected 200 or 206. "
                            f"Check the URL (a moved or private file?); --url URL downloads from elsewhere",
                            resumable=err.code >= 500) from None
    except DownloadError:
        raise
    except _NETWORK_ERRORS as err:
        raise DownloadError(f"{entry.name!r}: cannot reach {src}: {err}. Check the network (and proxy "
                            f"settings); run the same command again") from None
    with resp:
        status = resp.getcode()
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        mode = "wb"
        if offset and status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            now = resp.headers.get("ETag" if validator.startswith('"') else "Last-Modified")
            if now and now != validator and not _restarted:
                # a server that ignores If-Range but says the file changed: the bytes would not fit
                logger.info("%s: the server sent a part of a changed file (%s, was %s): starting over",
                            part.name, now, validator)
                resp.close()
                _discard(part)
                return _transfer(src, part, entry, chunk=chunk, timeout=timeout, progress=progress,
                                 allow_http=allow_http, _restarted=True)
            if m and int(m.group(1)) == offset:
                mode = "ab"
                logger.info("resuming %s at %s", part.name, _mb(offset))
            else:
                _discard(part)
                raise DownloadError(f"{entry.name!r}: asked {src} for bytes {offset}- and got Content-Range "
                                    f"{resp.headers.get('Content-Range')!r}; the partial file was deleted: run the "
                                    f"same command again to start over", resumable=True)
        elif status == 200:
            if offset:
                logger.info("%s answered the whole file (HTTP 200: changed, or no range support): starting %s "
                            "from zero", src, part.name)
            offset = 0
        else:
            raise DownloadError(f"{entry.name!r}: {src} answered HTTP {status}; expected 200 or 206",
                                resumable=False)
        total = offset + length if length is not None else entry.size
        if entry.size is not None and total is not None and total != entry.size:
            _discard(part)
            raise ValueError(f"{entry.name!r}: expected {entry.size} bytes (the manifest), got {total} from {src}: "
                             f"a different file, so nothing was kept. Check --url, or report the changed upload")
        if mode == "wb":
            _write_sidecar(part, src, resp.headers)
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
                                f"({err}); {part} is kept: run the same command again to resume") from None
        if length is not None and done - offset < length:
            raise DownloadError(f"{entry.name!r}: the connection to {src} closed after {_mb(done)} of {_mb(total)}; "
                                f"{part} is kept: run the same command again to resume")


def _download_http(entry: WeightEntry, src: str, final: Path, *, chunk: int, timeout: float,
                   progress: Optional[Progress], retries: int, allow_http: bool) -> None:
    part = _inside(final.parent, final.name + ".part")
    _inside(final.parent, final.name + ".part.json")
    attempt = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _transfer(src, part, entry, chunk=chunk, timeout=timeout, progress=progress, allow_http=allow_http)
            break
        except DownloadError as err:
            if attempt >= retries or not err.resumable:
                raise
            attempt += 1
            grew = part.exists() and part.stat().st_size > before
            logger.warning("transfer of %s broke (%s); resuming (retry %d of %d)", final.name, err, attempt, retries)
            if not grew:  # nothing came through: give the network a moment before asking again
                time.sleep(min(2.0 ** attempt, 30.0))
    _verified_or_discard(part, final, entry, src, [part, _sidecar(part)])
    os.replace(part, final)
    _sidecar(part).unlink(missing_ok=True)


# -- download: Hugging Face ---------------------------------------------------------------------------


_HF_HOSTS = ("huggingface.co", "hf.co")
_HF_PATH = re.compile(r"/(?:(?P<kind>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


@dataclass(frozen=True)
class _HfFile:
    endpoint: Optional[str]  # None: huggingface_hub's default (HF_ENDPOINT, else https://huggingface.co)
    repo_id: str
    repo_type: str
    revision: str
    filename: str


def _hf_file(url: str) -> Optional[_HfFile]:
    """The Hub file behind a ``<endpoint>/<repo>/resolve/<rev>/<file>`` URL, or None for other URLs.
    The endpoint is huggingface.co / hf.co, or the origin ``HF_ENDPOINT`` names (a mirror)."""
    parts = urllib.parse.urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}".lower()
    env = os.environ.get("HF_ENDPOINT", "").rstrip("/").lower()
    if (parts.hostname or "").lower() in _HF_HOSTS and parts.scheme == "https":
        endpoint = None
    elif env and origin == env:
        endpoint = env
    else:
        return None
    m = _HF_PATH.fullmatch(parts.path)
    if not m or parts.query:
        return None
    kind = {"datasets": "dataset", "spaces": "space"}.get(m.group("kind") or "", "model")
    return _HfFile(endpoint, m.group("repo"), kind, urllib.parse.unquote(m.group("rev")),
                   urllib.parse.unquote(m.group("file")))


def _download_hf(entry: WeightEntry, src: str, hf: _HfFile, final: Path, *, timeout: float) -> None:
    """hf_hub_download into our own temporary folder ``<file>.hf-part/`` inside the destination (it
    handles redirects, ETags, in-call resumes and HF_TOKEN for gated repos), then our checks, then
    ``os.replace`` to the final name. The folder is removed on success and on a failed check."""
    try:
        import huggingface_hub
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise ValueError(f"{entry.name!r} is hosted on Hugging Face and is downloaded with huggingface_hub, which is "
                         f"not installed: pip install huggingface_hub (it comes with diffusers)") from None
    if hf_constants.is_offline_mode():
        raise DownloadError(f"{entry.name!r}: HF_HUB_OFFLINE is set, so huggingface_hub will not download {src}; "
                            f"unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) and run again", resumable=False)
    tmp_dir = _inside(final.parent, final.name + ".hf-part")
    try:
        got = _hf_get(huggingface_hub, hf_errors, entry, src, hf, tmp_dir, timeout)
    except BaseException:
        # huggingface_hub keeps nothing resumable across calls here (its partial file is process-unique
        # and deleted on failure), so leave no folder behind
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if not got.resolve().is_relative_to(tmp_dir.resolve()):
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise ValueError(f"{entry.name!r}: huggingface_hub wrote {got}, outside {tmp_dir}; nothing was saved")
    _verified_or_discard(got, final, entry, src, [tmp_dir])
    os.replace(got, final)
    shutil.rmtree(tmp_dir, ignore_errors=True)


def _hf_get(huggingface_hub, hf_errors, entry: WeightEntry, src: str, hf: _HfFile, tmp_dir: Path,
            timeout: float) -> Path:
    """hf_hub_download with its exceptions turned into one DownloadError message each."""
    try:
        got = huggingface_hub.hf_hub_download(
            hf.repo_id, hf.filename, repo_type=hf.repo_type, revision=hf.revision, local_dir=tmp_dir,
            endpoint=hf.endpoint, etag_timeout=timeout, library_name="noisecraft")
    except hf_errors.GatedRepoError:
        raise DownloadError(f"{entry.name!r}: {hf.repo_id} is a gated repository: accept its terms on "
                            f"https://huggingface.co/{hf.repo_id}, then set HF_TOKEN (or run `hf auth login`) and "
                            f"run again", resumable=False) from None
    except hf_errors.RepositoryNotFoundError:
        raise DownloadError(f"{entry.name!r}: repository {hf.repo_id} not found (or private: set HF_TOKEN) at {src}; "
                            f"check --url", resumable=False) from None
    except (hf_errors.RevisionNotFoundError, hf_errors.RemoteEntryNotFoundError) as err:
        raise DownloadError(f"{entry.name!r}: {src}: HTTP 404, no such revision or file in {hf.repo_id} "
                            f"({type(err).__name__}); check --url", resumable=False) from None
    except hf_errors.HfHubHTTPError as err:
        code = getattr(getattr(err, "response", None), "status_code", None)
        raise DownloadError(f"{entry.name!r}: {src} answered HTTP {code}: {str(err).splitlines()[0]}; run the same "
                            f"command again later", resumable=code is None or code >= 500) from None
    except (OSError, RuntimeError, ValueError) as err:  # network errors, size consistency, missing ETag, ...
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DownloadError(f"{entry.name!r}: the download of {src} failed ({type(err).__name__}: {msg}); check "
                            f"the network and run the same command again") from None
    except Exception as err:  # httpx2 errors do not derive from OSError
        raise DownloadError(f"{entry.name!r}: cannot reach {src} ({type(err).__name__}: {err}); check the network "
                            f"and run the same command again") from None
    return Path(got)


# -- download ------------------------------------------------------------------------------------


def download(entry: WeightEntry, dest_dir: PathLike, *, url: Optional[str] = None, chunk: int = 1 << 20,
             timeout: float = 30, progress: Optional[Progress] = None, retries: int = 0,
             allow_http: bool = False) -> Path:
    """Download ``entry`` into ``dest_dir`` and return the final path.

    - ``url`` overrides ``entry.url`` (a mirror, or a local server in tests).
    - The file name is the manifest entry's (``filename``, else the last segment of its url); only an
      entry without one takes the last segment of ``url``. Either is checked by
      :func:`check_file_name` (after URL-decoding), as is every segment of a Hugging Face path in
      the repository; the final path, the ``.part`` and every temporary path must resolve inside
      ``dest_dir``: nothing is written elsewhere.
    - Plain ``http://`` is refused unless ``allow_http`` (the CLI's ``--allow-http``); so is a
      redirect from https to http.
    - Hugging Face URLs (``https://huggingface.co/<repo>/resolve/<rev>/<file>``, or under the origin
      ``HF_ENDPOINT`` names) go through ``huggingface_hub.hf_hub_download`` into ``<file>.hf-part/``;
      other URLs through urllib into ``<file>.part`` (see :func:`_transfer` for resumes).
    - Every download is checked before it gets its final name: sha256 where the manifest has it;
      otherwise the size where known and the format (a safetensors header that parses and accounts
      for every byte; a torch zip archive for .pth/.pt/.ckpt), and HTML/text is refused. On a
      failed check the download is deleted and ValueError says why; without a sha256 a warning says
      the content cannot be verified by hash and what was checked instead.
    - Only a verified file is renamed (atomically) to its final name. A final file that is already
      there and verifies is kept without any request; one that does not verify is left alone and
      reported (it may be the user's own file).
    - ``progress(done_bytes, total_bytes_or_None)`` is called as data arrives (urllib path;
      huggingface_hub shows its own progress bar).
    - ``retries``: how many more times a broken transfer is resumed within this call (0: raise
      :class:`DownloadError` at once, keeping the ``.part``).
    """
    src = url or entry.url
    if not src and entry.path:
        raise ValueError(f"{entry.name!r} ships inside the noisecraft package ({entry.local_path}); there is "
                         f"nothing to download")
    if not src:
        where = f" from {entry.page}" if entry.page else ""
        raise ValueError(f"{entry.name!r} has no direct download URL in the manifest: get the file by hand{where} "
                         f"and put it in {dest_dir} (or pass a URL with --url)")
    if entry.file_name:
        name = check_file_name(entry.file_name, what=f"the manifest's file name for {entry.name!r}")
    else:  # an entry without a file name (e.g. an official file behind a web page) + --url
        name = check_file_name(_url_file_name(src), what=f"the last segment of the URL {src!r} (URL-decoded)")
    scheme = urllib.parse.urlsplit(src).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"{entry.name!r}: expected an https:// URL, got {src!r}")
    if scheme == "http" and not allow_http:
        raise ValueError(f"{entry.name!r}: {src} is plain http://, which anyone on the network can alter; refused. "
                         f"Fix: {_HTTP_FIX}")
    dest_dir = Path(dest_dir).expanduser()
    final = _inside(dest_dir, name)
    hf = _hf_file(src)
    if hf is not None:  # huggingface_hub writes <its folder>/<path in repo>: every segment must be plain too
        for segment in hf.filename.split("/"):
            check_file_name(segment, what=f"the path in the repository of {src!r} (URL-decoded)")

    if final.exists():
        why, checked = _content_problem(final, entry, name)
        if why:
            raise ValueError(f"{final} already exists but is not {entry.name!r} ({why}). It was left untouched: "
                             f"move or delete it and run again, or choose another folder with --dest")
        if entry.sha256:
            logger.info("%s is already there and verified: nothing to download", final)
        else:
            logger.warning("%s is already there; the manifest publishes no sha256 for %r, so it cannot be verified "
                           "by hash (checked: %s); keeping it (delete it to download again)", final, entry.name,
                           checked)
        return final

    dest_dir.mkdir(parents=True, exist_ok=True)
    final = _inside(dest_dir, name)  # again, now that the folder exists (it may be a link)
    logger.info("downloading %r from %s to %s", entry.name, src, final)
    if hf is not None:
        _download_hf(entry, src, hf, final, timeout=timeout)
    else:
        _download_http(entry, src, final, chunk=chunk, timeout=timeout, progress=progress, retries=retries,
                       allow_http=allow_http)
    logger.info("saved %s (%s)", final, _mb(final.stat().st_size))
    return final
