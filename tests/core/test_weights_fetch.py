"""The weight downloader (noisecraft.weights.download / resolve_models_dir) and `python -m noisecraft
fetch`, against a real HTTP server on 127.0.0.1: full downloads, an interrupted transfer resumed
with a Range + If-Range request (the ETag kept in the .part's sidecar), a server that ignores Range,
redirects, a hash mismatch, a wrong size, and an already-present file. Also the NPNet entries of
weights_manifest.json. The security regressions (traversal names, HTML, changed remotes, plain
http, the Hugging Face path) are in test_weights_security.py. The server is plain http, so every
download here passes allow_http=True / --allow-http.

Tier 1: standard library only (no torch needed), CPU, no network beyond 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from noisecraft.weights import (
    DownloadError,
    WeightEntry,
    download,
    find_comfyui_root,
    load_folder_aliases,
    load_manifest,
    resolve_models_dir,
)

REPO = Path(__file__).resolve().parents[2]


def safetensors_bytes(data: bytes) -> bytes:
    """A valid safetensors file holding ``data`` as one U8 tensor (built by hand: tier 1 needs no torch)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data


PAYLOAD = safetensors_bytes(random.Random(0).randbytes(300_000))
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
CHUNK = 16_384
LAST_MODIFIED = "Sun, 08 Dec 2024 10:00:00 GMT"


# -- a real HTTP server (conftest.py's ``server`` fixture runs ``Handler``) ------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``state['payload']`` at /file.bin (and any /*.safetensors), with Range support.

    Modes: ``normal``; ``drop`` (send the headers for the full answer, then close the connection
    after ``drop_after`` body bytes, once; later requests are normal); ``ignore_range`` (always a
    200 with the whole file); ``wrong`` (same length, different last bytes). ``/r/<path>`` redirects (302)
    to ``/<path>``, as Hugging Face's resolve URLs redirect to a CDN. Every request is logged.
    ``validators``: send ETag (from the content) and Last-Modified; ``if_range``: honour If-Range
    (a validator that does not match gets the whole current file with 200), else ignore it."""

    protocol_version = "HTTP/1.1"
    state: dict = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        st = self.state
        rng = self.headers.get("Range")
        entry = {"path": self.path, "range": rng, "status": None, "sent": 0}
        st["requests"].append(entry)
        if self.path.startswith("/r/"):
            entry["status"] = 302
            self.send_response(302)
            self.send_header("Location", self.path[2:])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/missing":
            entry["status"] = 404
            self.send_error(404)
            return
        data = st["payload"]
        if st["mode"] == "wrong":
            data = data[:-10] + bytes(b ^ 0xFF for b in data[-10:])
        total = len(data)
        start = 0
        etag = etag_of(data)
        entry["if_range"] = self.headers.get("If-Range")
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and st["if_range"] and entry["if_range"] not in (etag, LAST_MODIFIED):
            m = None  # RFC 9110 13.1.5: a validator that does not match -> the whole (new) file, 200
        if m and st["mode"] != "ignore_range":
            start = int(m.group(1))
            if start >= total:
                entry["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            entry["status"] = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        else:
            entry["status"] = 200
            self.send_response(200)
        body = data[start:]
        if st["validators"]:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", LAST_MODIFIED)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if st["mode"] == "drop":
            st["mode"] = "normal"
            body = body[: st["drop_after"]]
            self.wfile.write(body)
            self.wfile.flush()
            entry["sent"] = len(body)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-body
            return
        self.wfile.write(body)
        entry["sent"] = len(body)


@pytest.fixture()
def srv(server):
    """Reset the server's mode and request log for one test; yields (base_url, state)."""
    Handler.state.clear()
    Handler.state.update(payload=PAYLOAD, mode="normal", drop_after=None, requests=[], validators=True, if_range=True)
    host, port = server.server_address[:2]
    return f"http://{host}:{port}", Handler.state


def etag_of(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'


def _partial(part: Path, data: bytes, url: str, etag: str | None = None) -> None:
    """A .part as an earlier run leaves it: the bytes, and the sidecar with the validator for If-Range."""
    part.write_bytes(data)
    (part.parent / (part.name + ".json")).write_text(json.dumps({"url": url, "etag": etag or etag_of(PAYLOAD),
                                                                 "last_modified": LAST_MODIFIED}))


def _entry(**kw) -> WeightEntry:
    base = dict(name="test-npnet", kind="npnet", base_model="SDXL", sha256=PAYLOAD_SHA, size=len(PAYLOAD),
                license="Apache-2.0", folder="npnet", url=None, filename="test-npnet.safetensors")
    base.update(kw)
    return WeightEntry(**base)


# -- downloads -------------------------------------------------------------------------------------


def test_full_download_verifies_and_lands_atomically(srv, tmp_path):
    base, st = srv
    entry = _entry()
    final = tmp_path / "npnet" / "test-npnet.safetensors"
    seen = []

    def progress(done, total):
        seen.append((done, total))
        assert not final.exists()  # the final name appears only after verification

    path = download(entry, tmp_path / "npnet", url=f"{base}/file.bin", chunk=CHUNK, timeout=5, progress=progress,
                    allow_http=True)
    assert path == final and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "npnet" / "test-npnet.safetensors.part").exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(seen) > 5
    assert [(r["range"], r["status"]) for r in st["requests"]] == [(None, 200)]


def test_interrupted_transfer_resumes_with_range(srv, tmp_path):
    base, st = srv
    st.update(mode="drop", drop_after=100_000)
    entry = _entry()
    part = tmp_path / "test-npnet.safetensors.part"
    with pytest.raises(DownloadError, match="resume") as info:
        download(entry, tmp_path, url=f"{base}/file.bin", chunk=CHUNK, timeout=5, allow_http=True)
    assert str(part) in str(info.value)
    kept = part.stat().st_size if part.is_file() else 0
    assert 0 < kept <= 100_000 and PAYLOAD.startswith(part.read_bytes())  # normally exactly 100_000
    assert not (tmp_path / "test-npnet.safetensors").exists()

    path = download(entry, tmp_path, url=f"{base}/file.bin", chunk=CHUNK, timeout=5, allow_http=True)
    assert path.read_bytes() == PAYLOAD and not part.exists()
    last = st["requests"][-1]
    assert last["range"] == f"bytes={kept}-" and last["status"] == 206
    assert last["sent"] == len(PAYLOAD) - kept  # only the rest came over the wire
    assert len(st["requests"]) == 2


def test_retries_resume_within_one_call_and_through_a_redirect(srv, tmp_path):
    base, st = srv
    st.update(mode="drop", drop_after=50_000)
    path = download(_entry(), tmp_path, url=f"{base}/r/file.bin", chunk=CHUNK, timeout=5, retries=1, allow_http=True)
    assert path.read_bytes() == PAYLOAD
    got = [(r["path"], r["range"], r["status"]) for r in st["requests"]]
    kept = len(PAYLOAD) - st["requests"][-1]["sent"]  # normally exactly 50_000
    assert 0 < kept <= 50_000
    # the Range header survives the redirect (Hugging Face resolve URLs redirect to a CDN)
    assert got == [("/r/file.bin", None, 302), ("/file.bin", None, 200),
                   ("/r/file.bin", f"bytes={kept}-", 302), ("/file.bin", f"bytes={kept}-", 206)]


def test_server_ignoring_range_restarts_cleanly(srv, tmp_path):
    base, st = srv
    st["mode"] = "ignore_range"
    junk = b"\0" * 40_000  # appending to it would corrupt the file
    _partial(tmp_path / "test-npnet.safetensors.part", junk, f"{base}/file.bin")
    path = download(_entry(), tmp_path, url=f"{base}/file.bin", chunk=CHUNK, timeout=5, allow_http=True)
    assert path.read_bytes() == PAYLOAD
    assert [(r["range"], r["status"], r["sent"]) for r in st["requests"]] == [("bytes=40000-", 200, len(PAYLOAD))]


def test_complete_part_with_unknown_size_is_checked_not_refetched(srv, tmp_path):
    base, st = srv
    _partial(tmp_path / "test-npnet.safetensors.part", PAYLOAD, f"{base}/file.bin")
    path = download(_entry(size=None), tmp_path, url=f"{base}/file.bin", timeout=5, allow_http=True)
    assert path.read_bytes() == PAYLOAD
    assert [(r["range"], r["status"]) for r in st["requests"]] == [(f"bytes={len(PAYLOAD)}-", 416)]


def test_hash_mismatch_raises_and_leaves_no_file(srv, tmp_path):
    base, st = srv
    st["mode"] = "wrong"
    wrong_sha = hashlib.sha256(PAYLOAD[:-10] + bytes(b ^ 0xFF for b in PAYLOAD[-10:])).hexdigest()
    with pytest.raises(ValueError, match="sha256") as info:
        download(_entry(), tmp_path, url=f"{base}/file.bin", chunk=CHUNK, timeout=5, allow_http=True)
    msg = str(info.value)
    assert PAYLOAD_SHA in msg and wrong_sha in msg  # expected and got
    assert "test-npnet.safetensors" in msg and "again" in msg  # which file, what to do
    assert list(tmp_path.iterdir()) == []  # neither the final file nor the .part


def test_wrong_known_size_is_an_error(srv, tmp_path):
    base, st = srv
    with pytest.raises(ValueError) as info:
        download(_entry(size=len(PAYLOAD) + 1), tmp_path, url=f"{base}/file.bin", timeout=5, allow_http=True)
    msg = str(info.value)
    assert str(len(PAYLOAD) + 1) in msg and str(len(PAYLOAD)) in msg
    assert list(tmp_path.iterdir()) == []


def test_unknown_hash_and_size_still_downloads(srv, tmp_path, caplog):
    base, st = srv
    with caplog.at_level("WARNING", logger="noisecraft.weights"):
        path = download(_entry(sha256=None, size=None), tmp_path, url=f"{base}/file.bin", timeout=5, allow_http=True)
    assert path.read_bytes() == PAYLOAD
    assert PAYLOAD_SHA in caplog.text  # the computed hash is reported so that it can be pinned


def test_existing_good_file_is_skipped_without_a_request(srv, tmp_path):
    base, st = srv
    (tmp_path / "test-npnet.safetensors").write_bytes(PAYLOAD)
    path = download(_entry(), tmp_path, url=f"{base}/file.bin", timeout=5, allow_http=True)
    assert path == tmp_path / "test-npnet.safetensors"
    assert st["requests"] == []


def test_existing_bad_file_is_left_alone_and_reported(srv, tmp_path):
    base, st = srv
    bad = tmp_path / "test-npnet.safetensors"
    bad.write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(ValueError, match="already exists") as info:
        download(_entry(), tmp_path, url=f"{base}/file.bin", timeout=5, allow_http=True)
    assert PAYLOAD_SHA in str(info.value)
    assert bad.read_bytes() == PAYLOAD[:-1] + b"x" and st["requests"] == []


def test_http_error_and_missing_url(srv, tmp_path):
    base, st = srv
    with pytest.raises(DownloadError, match="404"):
        download(_entry(), tmp_path, url=f"{base}/missing", timeout=5, retries=3, allow_http=True)
    assert len(st["requests"]) == 1  # a 404 is not retried
    with pytest.raises(ValueError, match="by hand from https://example.org/page"):
        download(_entry(url=None, page="https://example.org/page"), tmp_path)


# -- where files go --------------------------------------------------------------------------------


def _fake_comfyui(root: Path) -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "models").mkdir()
    return root


def test_resolve_models_dir(tmp_path, monkeypatch):
    entry = _entry()
    comfy = _fake_comfyui(tmp_path / "ComfyUI")
    other = _fake_comfyui(tmp_path / "Other")
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))
    nowhere = tmp_path / "loose" / "noisecraft"  # a package outside any ComfyUI
    # --dest wins over everything
    assert resolve_models_dir(entry, other, dest=tmp_path / "d", package_dir=nowhere) == tmp_path / "d"
    # --comfyui wins over the environment
    assert resolve_models_dir(entry, other, package_dir=nowhere) == other / "models" / "npnet"
    # then COMFYUI_PATH
    assert resolve_models_dir(entry, package_dir=nowhere) == comfy / "models" / "npnet"
    # then the ComfyUI the pack is installed in
    monkeypatch.delenv("COMFYUI_PATH")
    pkg = comfy / "custom_nodes" / "ComfyUI-NoiseCraft" / "noisecraft"
    pkg.mkdir(parents=True)
    assert find_comfyui_root(pkg) == comfy
    assert resolve_models_dir(entry, package_dir=pkg) == comfy / "models" / "npnet"
    # none of them: a clear error
    with pytest.raises(ValueError, match="--dest") as info:
        resolve_models_dir(entry, package_dir=nowhere)
    assert "COMFYUI_PATH" in str(info.value) and "--comfyui" in str(info.value)
    # a path that is not ComfyUI
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "loose"))
    (tmp_path / "loose").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="main.py"):
        resolve_models_dir(entry, package_dir=nowhere)
    # in-package files have no ComfyUI folder
    with pytest.raises(ValueError, match="inside the noisecraft package"):
        resolve_models_dir(next(e for e in load_manifest() if e.name == "toy-unet"), comfy)


# -- the manifest ----------------------------------------------------------------------------------

HF_URL = re.compile(r"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/main/[\w./-]+")


def test_manifest_npnet_entries():
    entries = load_manifest()
    names = [e.name for e in entries]
    assert len(names) == len(set(names)), "manifest names must be unique"
    npnet = [e for e in entries if e.kind == "npnet"]
    assert len(npnet) >= 6
    for e in npnet:
        assert e.name.startswith("npnet-") and e.license and e.folder == "npnet"
        assert e.base_model in {"SDXL", "DreamShaper-XL-v2-turbo", "Hunyuan-DiT"}
        assert e.preset in {"sdxl", "dreamshaper", "dit"}
        assert e.format and e.source and isinstance(e.source, dict)
        for fact in ("url", "sha256", "size", "license", "base_model", "format"):
            assert e.source.get(fact), f"{e.name}: no source for {fact}"
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256), e.name
        assert e.size is None or (isinstance(e.size, int) and e.size > 0), e.name
        if e.url:
            assert HF_URL.fullmatch(e.url), e.url
            assert e.file_name and e.url.endswith("/" + e.file_name)
        else:
            assert e.page, f"{e.name}: no url and no page saying where to get it"
    # every base model has at least one downloadable file; files in one folder do not collide
    assert {e.base_model for e in npnet if e.url} == {"SDXL", "DreamShaper-XL-v2-turbo", "Hunyuan-DiT"}
    files = [(e.folder, e.file_name) for e in npnet if e.file_name]
    assert len(files) == len(set(files))
    assert "npnets" in load_folder_aliases()["npnet"]  # the peers' folder name


# -- the command line ------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "noisecraft", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_cli_fetch_list_and_unknown_name():
    res = _cli("fetch", "--list")
    assert res.returncode == 0, res.stderr
    assert "base model" in res.stdout and "sha256" in res.stdout
    for e in load_manifest():
        assert e.name in res.stdout
    res = _cli("fetch", "no-such-weights")
    assert res.returncode == 2
    assert "no-such-weights" in res.stderr and "npnet-sdxl-lucipherdev" in res.stderr


def test_cli_fetch_downloads_with_url_override(srv, tmp_path, capsys):
    from noisecraft.__main__ import main

    base, st = srv
    entry = next(e for e in load_manifest() if e.name == "npnet-dreamshaper-asagi4")
    assert entry.sha256 is None and entry.size is None  # nothing to check against but completeness
    assert main(["fetch", entry.name, "--url", f"{base}/file.bin", "--dest", str(tmp_path), "--timeout", "5", "--allow-http"]) == 0
    assert (tmp_path / entry.file_name).read_bytes() == PAYLOAD
    assert str(tmp_path / entry.file_name) in capsys.readouterr().out
    # an entry with a published sha256 refuses bytes that do not match it (exit 1, message on stderr)
    pinned = next(e for e in load_manifest() if e.name == "npnet-dit-asagi4")
    assert main(["fetch", pinned.name, "--url", f"{base}/file.bin", "--dest", str(tmp_path), "--timeout", "5", "--allow-http"]) == 1
    err = capsys.readouterr().err
    assert pinned.sha256 in err and PAYLOAD_SHA in err
    assert not (tmp_path / pinned.file_name).exists()
