"""Security regressions of `fetch` (issue 9), against a real HTTP server on 127.0.0.1:

- it writes only inside the destination folder: traversal names from --url and from manifest
  entries are refused with nothing written anywhere (the parent folder is compared before/after);
- every download is checked before its final name: HTML/text, a wrong format, a wrong size or
  sha256 are refused and the .part (and its sidecar) removed;
- a remote that changes between a partial download and its resume restarts (If-Range), also
  when the server ignores If-Range or sends no validator;
- plain http is refused without --allow-http / allow_http=True;
- Hugging Face URLs go through huggingface_hub.hf_hub_download against a loopback server that
  speaks the Hub's HEAD/GET /<repo>/resolve/<rev>/<file> protocol (X-Repo-Commit, ETag, sizes);
- the CLI, run as a subprocess, answers every failure with rc != 0 and no traceback.

Tier 1: CPU, no torch, no network beyond 127.0.0.1; every server loop is bounded by the test's
requests and the server is shut down by its fixture.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import urllib.parse
import zipfile
from pathlib import Path

import pytest

from noisecraft.weights import DownloadError, WeightEntry, check_file_name, download, load_manifest

REPO = Path(__file__).resolve().parents[2]
COMMIT = "41bc467" + "0" * 33  # a 40-hex commit id, as the Hub sends in X-Repo-Commit
LAST_MODIFIED = "Sun, 08 Dec 2024 10:00:00 GMT"


def safetensors_bytes(data: bytes) -> bytes:
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data


def torch_zip_bytes() -> bytes:
    """The layout torch.save writes (a zip with <name>/data.pkl), built without torch."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


OLD = safetensors_bytes(random.Random(1).randbytes(200_000))
NEW = safetensors_bytes(random.Random(2).randbytes(200_000))
HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in</body></html>\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def etag_of(data: bytes) -> str:
    return '"' + sha(data)[:16] + '"'


# -- a real HTTP server (plain files and the Hub's resolve protocol) ---------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    """``state['files']``: path -> bytes. Any path is served with Range support and, when
    ``validators``, an ETag (from the content) and Last-Modified. ``if_range``: honour If-Range
    (a validator that does not match gets the whole current file, 200), else ignore it (a 206 of
    the current bytes, with the current ETag). ``drop_after``: the next GET closes the connection
    after that many body bytes. Paths ``/<org>/<repo>/resolve/<rev>/<file>`` also answer HEAD the
    way the Hub does (X-Repo-Commit, ETag, Content-Length). Every request is logged."""

    protocol_version = "HTTP/1.1"
    state: dict = {}

    def log_message(self, *args):
        pass

    def _answer(self, head_only: bool):
        st = self.state
        rec = {"method": self.command, "path": self.path, "range": self.headers.get("Range"),
               "if_range": self.headers.get("If-Range"), "status": None}
        st["requests"].append(rec)
        data = st["files"].get(self.path)
        if data is None:
            rec["status"] = 404
            body = b'{"error": "Entry not found"}'
            self.send_response(404)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head_only:
                self.wfile.write(body)
            return
        etag = etag_of(data)
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rec["range"] or "")
        if m and st["if_range"] and rec["if_range"] not in (etag, LAST_MODIFIED):
            m = None
        if m and int(m.group(1)) < len(data):
            start = int(m.group(1))
            rec["status"] = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            rec["status"] = 200
            self.send_response(200)
        body = data[start:]
        if st["validators"]:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", LAST_MODIFIED)
        if "/resolve/" in self.path:
            self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Type", "text/html" if data.startswith(b"<") else "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head_only:
            return
        if st["drop_after"] is not None:
            body, st["drop_after"] = body[: st["drop_after"]], None
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def do_GET(self):
        self._answer(head_only=False)

    def do_HEAD(self):
        self._answer(head_only=True)


@pytest.fixture()
def srv(server):
    Handler.state.clear()
    Handler.state.update(files={"/w.safetensors": OLD}, requests=[], validators=True, if_range=True,
                          drop_after=None)
    host, port = server.server_address[:2]
    return f"http://{host}:{port}", Handler.state


@pytest.fixture()
def hub(srv, monkeypatch, tmp_path):
    """The loopback server as the Hugging Face endpoint (HF_ENDPOINT), hub online, cache in tmp."""
    from huggingface_hub import constants

    base, st = srv
    monkeypatch.setenv("HF_ENDPOINT", base)  # noisecraft reads it at call time and passes endpoint=
    # huggingface_hub read its environment at import: online, cache in tmp, and a fresh cached copy of
    # its agent registry, which it otherwise fetches from its import-time endpoint (huggingface.co)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(_fresh_agent_registry(tmp_path / "hf")))
    return base, st


def _fresh_agent_registry(hf_home: Path) -> Path:
    path = hf_home / ".agent_harnesses.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"standardEnvVars": [], "harnesses": {}}))
    return path


def _entry(**kw) -> WeightEntry:
    base = dict(name="test-npnet", kind="npnet", base_model="SDXL", sha256=None, size=None, license="Apache-2.0",
                folder="npnet", url=None, filename="w.safetensors")
    base.update(kw)
    return WeightEntry(**base)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- 1. only inside the destination folder ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Name:
    id: str
    name: str
    msg: str


BAD_NAMES = [
    Name("encoded-slash", "..%2Fevil.safetensors", "path separator"),
    Name("dotdot", "..", "'..'"),
    Name("dotdot-inside", "a..b.safetensors", "'..'"),
    Name("absolute", "/tmp/evil.safetensors", "path separator"),
    Name("hidden", ".bashrc", "hidden name"),
    Name("backslash", "..\\evil.safetensors", "path separator"),
    Name("drive", "C:evil.safetensors", "drive path"),
    Name("empty", "", "empty"),
    Name("nul", "evil\0.safetensors", "control character"),
    Name("newline", "evil\n.safetensors", "control character"),
    Name("too-long", "x" * 256 + ".safetensors", "255 bytes"),
]


@pytest.mark.parametrize("case", BAD_NAMES, ids=[c.id for c in BAD_NAMES])
def test_bad_file_names_are_refused(case):
    with pytest.raises(ValueError, match=re.escape(case.msg)) as info:
        check_file_name(urllib.parse.unquote(case.name), what="the last segment of the URL")
    assert "nothing was written" in str(info.value) and "Fix:" in str(info.value)


# The same bad names as the last segment of a download URL, percent-encoded (every byte outside the unreserved
# set, so "/" travels as %2F): the name the URL decodes to is checked before anything is requested or written.
URL_CASES = [Name(c.id, urllib.parse.quote(urllib.parse.unquote(c.name), safe=""), c.msg) for c in BAD_NAMES]


MANIFEST_CASES = [
    Name("dotdot", "../evil.safetensors", "path separator"),
    Name("absolute", "/tmp/evil.safetensors", "path separator"),
    Name("hidden", ".evil.safetensors", "hidden name"),
    Name("backslash", "sub\\evil.safetensors", "path separator"),
    Name("url-encoded", "", "path separator"),  # no filename; the url's last segment decodes to ../evil
]
TRAVERSAL = [("url", c) for c in URL_CASES] + [("manifest", c) for c in MANIFEST_CASES]


@pytest.mark.parametrize("where, case", TRAVERSAL, ids=[f"{w}-{c.id}" for w, c in TRAVERSAL])
def test_traversal_names_write_nothing(srv, tmp_path, where, case):
    """A bad name from the URL's last segment (no file name in the manifest: the URL's is used, and checked)
    or from the manifest is refused before any request, and nothing appears anywhere."""
    base, st = srv
    dest = tmp_path / "models" / "npnet"
    dest.mkdir(parents=True)
    before = _tree(tmp_path)
    if where == "url":
        entry, url = _entry(filename=None), f"{base}/x/{case.name}"
    elif case.name:
        entry, url = _entry(filename=case.name, url=f"{base}/w.safetensors"), None
    else:
        entry, url = _entry(filename=None, url=f"{base}/x/..%2Fevil.safetensors"), None
    with pytest.raises(ValueError, match=re.escape(case.msg)) as info:
        download(entry, dest, url=url, timeout=5, allow_http=True)
    assert where == "url" or "manifest" in str(info.value) or "URL" in str(info.value)
    assert _tree(tmp_path) == before and st["requests"] == []


def test_a_link_under_the_final_name_pointing_outside_is_refused(srv, tmp_path):
    base, st = srv
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside.safetensors"
    (dest / "w.safetensors.part").symlink_to(outside)  # planted: writing the .part would write outside
    with pytest.raises(ValueError, match="outside the destination folder"):
        download(_entry(url=f"{base}/w.safetensors"), dest, timeout=5, allow_http=True)
    assert not outside.exists() and st["requests"] == []


def test_every_manifest_file_name_is_plain_and_stays_inside(tmp_path):
    from noisecraft.weights.manifest import inside_folder as _inside

    checked = 0
    for e in load_manifest():
        if e.file_name is None:
            assert not e.url, f"{e.name}: a url but no file name"
            continue
        assert check_file_name(e.file_name, what=f"the manifest's file name for {e.name!r}") == e.file_name
        assert _inside(tmp_path, e.file_name).parent == tmp_path.resolve()
        checked += 1
    assert checked >= 10


# -- 2. verified before the final name --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Content:
    id: str
    body: bytes
    msg: str
    filename: str = "w.safetensors"
    size: int | None = None
    sha256: str | None = None


CONTENT_CASES = [
    Content("html-doctype", HTML, "sent a web page, not the weight file"),
    Content("html-lowercase", b"<html><body>404</body></html>", "sent a web page"),
    Content("html-leading-space", b"\n\n   <head></head>", "sent a web page"),
    Content("json-error", b'{"error": "Repository not found"}' * 3, "sent text, not the weight file"),
    Content("plain-text", b"Access denied. " * 20, "sent text"),
    Content("not-safetensors", random.Random(3).randbytes(5000), "expected a safetensors file"),
    Content("truncated-safetensors", OLD[:-1000], "truncated"),
    Content("pth-not-zip", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8" + bytes(500), "torch zip archive",
            filename="w.pth"),
    Content("pth-zip-without-data", b"PK\x03\x04" + bytes(100), "torch zip archive", filename="w.pth"),
    Content("size-mismatch", OLD, f"expected {len(OLD) + 8} bytes", size=len(OLD) + 8),
    Content("sha256-mismatch", OLD, f"sha256 mismatch: expected {sha(NEW)}, got {sha(OLD)}", sha256=sha(NEW)),
    Content("html-with-sha256", HTML, "the server sent a web page", sha256=sha(NEW)),
]


@pytest.mark.parametrize("case", CONTENT_CASES, ids=[c.id for c in CONTENT_CASES])
def test_bad_content_is_refused_and_the_part_removed(srv, tmp_path, case):
    base, st = srv
    st["files"] = {"/f": case.body}
    entry = _entry(filename=case.filename, size=case.size, sha256=case.sha256)
    with pytest.raises(ValueError, match=re.escape(case.msg)) as info:
        download(entry, tmp_path, url=f"{base}/f", timeout=5, allow_http=True)
    assert "nothing was saved" in str(info.value) or "nothing was kept" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no final file, no .part, no .part.json


def test_real_safetensors_files_pass_the_format_check():
    """The shipped toy assets (written by the safetensors library) pass the check used without sha256."""
    from noisecraft.weights.verify import content_problem as _content_problem

    files = [e for e in load_manifest() if e.path and e.path.endswith(".safetensors")]
    assert len(files) >= 3
    for e in files:
        bare = dataclasses.replace(e, sha256=None)
        assert _content_problem(e.local_path, bare, e.file_name) == (None, "size, safetensors header, not HTML/text")
        unsized = dataclasses.replace(e, sha256=None, size=None)  # the header alone accounts for every byte
        assert _content_problem(e.local_path, unsized, e.file_name)[0] is None


def test_good_torch_zip_without_sha256_is_accepted_with_a_warning(srv, tmp_path, caplog):
    base, st = srv
    st["files"] = {"/f": torch_zip_bytes()}
    with caplog.at_level("WARNING", logger="noisecraft.weights"):
        path = download(_entry(filename="w.pth"), tmp_path, url=f"{base}/f", timeout=5, allow_http=True)
    assert path.read_bytes() == torch_zip_bytes()
    assert "cannot be verified by hash" in caplog.text and "torch zip archive" in caplog.text


def test_no_sha256_warns_what_was_checked(srv, tmp_path, caplog):
    base, st = srv
    with caplog.at_level("WARNING", logger="noisecraft.weights"):
        download(_entry(size=len(OLD)), tmp_path, url=f"{base}/w.safetensors", timeout=5, allow_http=True)
    assert "cannot be verified by hash" in caplog.text
    assert "size, safetensors header" in caplog.text and sha(OLD) in caplog.text


# -- a remote that changes between a partial download and its resume ------------------------------------


@dataclasses.dataclass(frozen=True)
class Change:
    id: str
    validators: bool
    if_range: bool
    sha256: str | None
    second: list  # (range sent?, status) of the requests of the second call


CHANGE_CASES = [
    # If-Range honoured: the changed remote answers 200 with the whole new file; the .part is truncated
    Change("if-range", True, True, None, [(True, 200)]),
    Change("if-range-sha256", True, True, sha(NEW), [(True, 200)]),
    # a server that ignores If-Range but sends the new ETag with its 206: we notice and restart
    Change("if-range-ignored", True, False, None, [(True, 206), (False, 200)]),
    # no ETag / Last-Modified at all: nothing to check a resume against, so restart from zero
    Change("no-validators", False, True, None, [(False, 200)]),
]


@pytest.mark.parametrize("case", CHANGE_CASES, ids=[c.id for c in CHANGE_CASES])
def test_changed_remote_restarts_and_ends_verified(srv, tmp_path, case):
    base, st = srv
    st.update(validators=case.validators, if_range=case.if_range, drop_after=80_000)
    entry = _entry(sha256=case.sha256)
    part = tmp_path / "w.safetensors.part"
    with pytest.raises(DownloadError, match="resume"):
        download(entry, tmp_path, url=f"{base}/w.safetensors", timeout=5, allow_http=True)
    assert 0 < part.stat().st_size <= 80_000 and OLD.startswith(part.read_bytes())
    sidecar = json.loads((tmp_path / "w.safetensors.part.json").read_text())
    assert sidecar["etag"] == (etag_of(OLD) if case.validators else None)

    st["files"] = {"/w.safetensors": NEW}  # the upload changes while we are away
    n = len(st["requests"])
    path = download(entry, tmp_path, url=f"{base}/w.safetensors", timeout=5, allow_http=True)
    assert path.read_bytes() == NEW
    second = st["requests"][n:]
    assert [(r["range"] is not None, r["status"]) for r in second] == case.second
    if case.validators:
        assert second[0]["if_range"] == etag_of(OLD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no .part, no sidecar


def test_unchanged_remote_resumes_with_if_range(srv, tmp_path):
    base, st = srv
    st["drop_after"] = 80_000
    with pytest.raises(DownloadError):
        download(_entry(sha256=sha(OLD)), tmp_path, url=f"{base}/w.safetensors", timeout=5, allow_http=True)
    kept = (tmp_path / "w.safetensors.part").stat().st_size
    download(_entry(sha256=sha(OLD)), tmp_path, url=f"{base}/w.safetensors", timeout=5, allow_http=True)
    last = st["requests"][-1]
    assert (last["range"], last["if_range"], last["status"]) == (f"bytes={kept}-", etag_of(OLD), 206)
    assert (tmp_path / "w.safetensors").read_bytes() == OLD


# -- plain http -----------------------------------------------------------------------------------


def test_plain_http_is_refused_without_the_flag_and_accepted_with_it(srv, tmp_path):
    base, st = srv
    with pytest.raises(ValueError, match="allow-http") as info:
        download(_entry(), tmp_path, url=f"{base}/w.safetensors", timeout=5)
    assert "allow_http=True" in str(info.value) and "https://" in str(info.value)
    assert st["requests"] == [] and list(tmp_path.iterdir()) == []
    path = download(_entry(sha256=sha(OLD)), tmp_path, url=f"{base}/w.safetensors", timeout=5, allow_http=True)
    assert path.read_bytes() == OLD


# -- 3. Hugging Face entries through huggingface_hub -----------------------------------------------------

HF_PATH = "/LucipherDev/Golden-Noise-NPNets/resolve/main/sdxl.safetensors"


def test_hub_entry_downloads_through_huggingface_hub(hub, tmp_path):
    base, st = hub
    st["files"] = {HF_PATH: NEW}
    dest = tmp_path / "npnet"
    entry = _entry(filename="sdxl.safetensors", sha256=sha(NEW), url=f"{base}{HF_PATH}")
    path = download(entry, dest, timeout=5, allow_http=True)
    assert path == dest.resolve() / "sdxl.safetensors" and path.read_bytes() == NEW
    # the Hub protocol: HEAD for the metadata (commit, ETag, size), then GET; nothing else
    assert [(r["method"], r["path"]) for r in st["requests"]] == [("HEAD", HF_PATH), ("GET", HF_PATH)]
    assert _tree(dest) == ["sdxl.safetensors"]  # our temporary folder is gone


@pytest.mark.parametrize("case", [c for c in CONTENT_CASES if c.filename == "w.safetensors"][:4] +
                         [c for c in CONTENT_CASES if c.id == "sha256-mismatch"],
                         ids=lambda c: c.id)
def test_hub_entry_with_bad_content_is_refused_and_cleaned(hub, tmp_path, case):
    base, st = hub
    st["files"] = {HF_PATH: case.body}
    entry = _entry(filename="sdxl.safetensors", sha256=case.sha256, size=case.size, url=f"{base}{HF_PATH}")
    with pytest.raises(ValueError, match=re.escape(case.msg)):
        download(entry, tmp_path / "npnet", timeout=5, allow_http=True)
    assert _tree(tmp_path / "npnet") == []
    assert any(r["method"] == "GET" for r in st["requests"])  # it went through the Hub path


def test_hub_missing_file_and_offline_mode(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    base, st = hub
    st["files"] = {}
    entry = _entry(filename="sdxl.safetensors", url=f"{base}{HF_PATH}")
    with pytest.raises(DownloadError, match="404") as info:
        download(entry, tmp_path / "npnet", timeout=5, allow_http=True)
    assert not info.value.resumable and _tree(tmp_path / "npnet") == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="unset HF_HUB_OFFLINE"):
        download(entry, tmp_path / "npnet", timeout=5, allow_http=True)


@pytest.mark.parametrize("tail", ["..%2F..%2Fevil.safetensors", "sub/..%2F..%2F..%2Fevil.safetensors",
                                  "%2Ftmp%2Fevil.safetensors", ".hidden/x.safetensors"])
def test_hub_path_in_repo_cannot_leave_the_folder(hub, tmp_path, tail):
    base, st = hub
    dest = tmp_path / "a" / "b" / "npnet"
    before = _tree(tmp_path)
    entry = _entry(filename="sdxl.safetensors")  # a good final name; the repo path is the attack
    with pytest.raises(ValueError, match="path in the repository"):
        download(entry, dest, url=f"{base}/org/repo/resolve/main/{tail}", timeout=5, allow_http=True)
    assert _tree(tmp_path) == before and st["requests"] == []


def test_hub_url_detection():
    from noisecraft.weights.fetch import hub_file as _hf_file

    f = _hf_file("https://huggingface.co/LucipherDev/Golden-Noise-NPNets/resolve/main/Old_pth/sdxl.pth")
    assert (f.endpoint, f.repo_id, f.repo_type, f.revision, f.filename) == (
        None, "LucipherDev/Golden-Noise-NPNets", "model", "main", "Old_pth/sdxl.pth")
    assert _hf_file("https://huggingface.co/datasets/a/b/resolve/v1/x.bin").repo_type == "dataset"
    for other in ("https://example.org/a/b/resolve/main/x.safetensors", "http://huggingface.co/a/b/resolve/main/x",
                  "https://huggingface.co/a/b/blob/main/x.safetensors"):
        assert _hf_file(other) is None, other
    for e in load_manifest():
        if e.url:
            assert _hf_file(e.url) is not None, e.name  # every manifest download goes through huggingface_hub


# -- the CLI: every failure is one message, no traceback ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cli:
    id: str
    name: str
    path: str  # served at this path
    body: bytes | None
    msg: str
    extra: tuple = ()
    allow_http: bool = True
    hub: bool = False


CLI_CASES = [
    Cli("traversal", "npnet-dit-official", "/x/..%2F..%2Fevil.safetensors", OLD, "path separator"),
    Cli("http-refused", "npnet-sdxl-asagi4", "/w.safetensors", OLD, "--allow-http", allow_http=False),
    Cli("html-no-sha256", "npnet-sdxl-asagi4", "/w.safetensors", HTML, "sent a web page"),
    Cli("sha256-mismatch", "npnet-dit-asagi4", "/w.safetensors", OLD, "sha256 mismatch"),
    Cli("size-mismatch", "toy-unet", "/w.safetensors", OLD, "expected 1741540 bytes"),
    Cli("http-404", "npnet-sdxl-asagi4", "/missing", None, "404"),
    Cli("hub-html", "npnet-sdxl-asagi4", HF_PATH, HTML, "sent a web page", hub=True),
    Cli("hub-404", "npnet-sdxl-asagi4", HF_PATH, None, "404", hub=True),
    Cli("hub-offline", "npnet-sdxl-asagi4", HF_PATH, OLD, "HF_HUB_OFFLINE", hub=True, extra=("offline",)),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_failures_have_no_traceback(srv, tmp_path, case):
    base, st = srv
    st["files"] = {case.path: case.body} if case.body is not None else {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    _fresh_agent_registry(tmp_path / "hf")
    if case.hub:
        env["HF_ENDPOINT"] = base
    env["HF_HUB_OFFLINE"] = "1" if "offline" in case.extra else "0"
    dest = tmp_path / "dest"
    args = [sys.executable, "-m", "noisecraft", "fetch", case.name, "--url", f"{base}{case.path}",
            "--dest", str(dest), "--timeout", "5", "--retries", "0"]
    if case.allow_http:
        args.append("--allow-http")
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    assert case.msg in res.stderr, res.stderr
    assert not any(r["path"].startswith("/api/") for r in st["requests"])  # only the file was asked for
    assert not dest.exists() or _tree(dest) == []  # nothing kept, no temporary file or folder
    assert {p.name for p in tmp_path.iterdir()} <= {"dest", "hf"}  # nothing written beside it


def test_an_html_page_saved_by_an_older_version_is_reported_not_kept_silently(srv, tmp_path):
    base, st = srv
    (tmp_path / "w.safetensors").write_bytes(HTML)  # what the old fetch saved with rc 0
    with pytest.raises(ValueError, match="already exists but is not") as info:
        download(_entry(), tmp_path, url=f"{base}/w.safetensors", timeout=5, allow_http=True)
    assert "web page" in str(info.value) and "left untouched" in str(info.value)
    assert (tmp_path / "w.safetensors").read_bytes() == HTML and st["requests"] == []
