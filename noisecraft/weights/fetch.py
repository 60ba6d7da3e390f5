"""Downloads: one manifest entry into one folder, checked before it gets its final name.

:func:`download` fetches one entry and writes only inside the destination folder: the file name
comes from the manifest entry (a name taken from ``--url`` is checked by :func:`check_file_name`),
and every path it writes must resolve inside the folder. Every download is checked before it gets
its final name (:mod:`noisecraft.weights.verify`); a file that fails is deleted.
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
``python -m noisecraft fetch NAME`` is the command-line front end.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Callable, Optional

from .manifest import PathLike, WeightEntry, check_file_name, inside_folder
from .verify import content_problem, verified_or_discard

logger = logging.getLogger(__name__)

_USER_AGENT = "noisecraft-fetch/0.1 (+python-urllib)"

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



def _url_file_name(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])


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
    part = inside_folder(final.parent, final.name + ".part")
    inside_folder(final.parent, final.name + ".part.json")
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
    verified_or_discard(part, final, entry, src, [part, _sidecar(part)])
    os.replace(part, final)
    _sidecar(part).unlink(missing_ok=True)


# -- download: Hugging Face ---------------------------------------------------------------------------


_HF_HOSTS = ("huggingface.co", "hf.co")
_HF_PATH = re.compile(r"/(?:(?P<kind>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


@dataclass(frozen=True)
class HubFile:
    endpoint: Optional[str]  # None: huggingface_hub's default (HF_ENDPOINT, else https://huggingface.co)
    repo_id: str
    repo_type: str
    revision: str
    filename: str


def hub_file(url: str) -> Optional[HubFile]:
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
    return HubFile(endpoint, m.group("repo"), kind, urllib.parse.unquote(m.group("rev")),
                   urllib.parse.unquote(m.group("file")))


def _download_hf(entry: WeightEntry, src: str, hf: HubFile, final: Path, *, timeout: float) -> None:
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
    tmp_dir = inside_folder(final.parent, final.name + ".hf-part")
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
    verified_or_discard(got, final, entry, src, [tmp_dir])
    os.replace(got, final)
    shutil.rmtree(tmp_dir, ignore_errors=True)


def _hf_get(huggingface_hub, hf_errors, entry: WeightEntry, src: str, hf: HubFile, tmp_dir: Path,
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
    final = inside_folder(dest_dir, name)
    hf = hub_file(src)
    if hf is not None:  # huggingface_hub writes <its folder>/<path in repo>: every segment must be plain too
        for segment in hf.filename.split("/"):
            check_file_name(segment, what=f"the path in the repository of {src!r} (URL-decoded)")

    if final.exists():
        why, checked = content_problem(final, entry, name)
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
    final = inside_folder(dest_dir, name)  # again, now that the folder exists (it may be a link)
    logger.info("downloading %r from %s to %s", entry.name, src, final)
    if hf is not None:
        _download_hf(entry, src, hf, final, timeout=timeout)
    else:
        _download_http(entry, src, final, chunk=chunk, timeout=timeout, progress=progress, retries=retries,
                       allow_http=allow_http)
    logger.info("saved %s (%s)", final, _mb(final.stat().st_size))
    return final
