"""Talking to a ComfyUI server with the standard library: the HTTP routes run-graph uses, and a websocket reader.

Results come from ``GET /history/<prompt id>`` (the record ComfyUI keeps of a finished prompt). Progress exists
only as websocket events (``executing``, ``progress``, ``execution_cached``): ComfyUI has no HTTP route for it,
and the websocket-client package is not a dependency, so :class:`WebSocketReader` is the small part of RFC 6455
a listener needs (the handshake, reading frames, answering ping and close). The ``*_lines`` functions turn the
server's answers into one-line messages for the command line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import socket
import ssl
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class RunGraphError(Exception):
    """Ends the command: ``lines`` go to stderr one by one, the return code is ``rc`` (1 failed, 2 bad input)."""

    def __init__(self, *lines: str, rc: int = 1):
        super().__init__(lines[0] if lines else "")
        self.lines, self.rc = [" ".join(str(x).split()) for x in lines], rc


# -- HTTP --------------------------------------------------------------------------------------------------


class ComfyClient:
    """The few ComfyUI routes run-graph uses, over urllib."""

    def __init__(self, url: str, timeout: float = 60):
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise RunGraphError(f"--server {url!r}: expected an http(s) URL such as http://127.0.0.1:8188", rc=2)
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self.timeout = timeout

    def _call(self, path: str, payload: Optional[dict] = None, timeout: Optional[float] = None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body.strip() else None)
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body)
            except ValueError:
                return err.code, {"error": {"message": body.decode(errors="replace")[:300]}}

    def get(self, path: str, timeout: Optional[float] = None):
        try:
            status, body = self._call(path, timeout=timeout)
        except ValueError:
            raise RunGraphError(f"{self.url} answered GET {path} with something that is not JSON: is this a ComfyUI "
                                f"server? fix --server") from None
        except (urllib.error.URLError, OSError) as err:
            raise RunGraphError(f"cannot reach ComfyUI at {self.url} ({getattr(err, 'reason', err)}): start it, "
                                f"or fix --server") from None
        if status != 200:
            raise RunGraphError(f"ComfyUI at {self.url} answered GET {path} with HTTP {status}: is this a ComfyUI "
                                f"server? fix --server")
        return body

    def post(self, path: str, payload: dict):
        try:
            return self._call(path, payload)
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise RunGraphError(f"cannot reach ComfyUI at {self.url} ({getattr(err, 'reason', err)}): start it, "
                                f"or fix --server") from None

    def alive(self) -> bool:
        try:
            return self._call("/system_stats", timeout=5)[0] == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def queue(self, prompt: dict, client_id: str, workflow: Optional[dict]) -> str:
        payload = {"prompt": prompt, "client_id": client_id}
        if workflow is not None:  # as the browser does: saved images carry the workflow
            payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        status, body = self.post("/prompt", payload)
        if status == 200 and isinstance(body, dict) and "prompt_id" in body:
            return str(body["prompt_id"])
        raise RunGraphError(*refusal_lines(body if isinstance(body, dict) else {}, prompt, status))

    def history(self, prompt_id: str) -> Optional[dict]:
        entry = (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)
        status = (entry or {}).get("status") or {}
        return entry if status.get("completed") is not None or status.get("status_str") else None

    def cancel(self, prompt_id: str) -> None:
        """Stop ``prompt_id``: interrupt it if it runs, take it off the queue if it waits."""
        for path, payload in (("/interrupt", {"prompt_id": prompt_id}), ("/queue", {"delete": [prompt_id]})):
            try:
                self._call(path, payload, timeout=10)
            except (urllib.error.URLError, OSError, ValueError):
                pass


def node_label(prompt: dict, node_id) -> str:
    node = prompt.get(str(node_id)) or {}
    kind = node.get("class_type", "?")
    title = (node.get("_meta") or {}).get("title")
    return f"node {node_id} ({kind}{f' {title!r}' if title and title != kind else ''})"


def refusal_lines(body: dict, prompt: dict, status: int) -> list[str]:
    """``POST /prompt`` refused the graph (validation): one line for the error, one per node error."""
    err = body.get("error") or {}
    if isinstance(err, str):
        err = {"message": err}
    head = err.get("message") or f"HTTP {status}"
    details = err.get("details")
    lines = [f"ComfyUI refused the graph: {head}{f': {details}' if details else ''}"]
    for node_id, rec in (body.get("node_errors") or {}).items():
        for e in (rec or {}).get("errors") or []:
            detail = e.get("details")
            lines.append(f"{node_label(prompt, node_id)}: {e.get('message')}{f': {detail}' if detail else ''}")
    return lines


def failure_lines(entry: dict, prompt: dict) -> list[str]:
    """The error lines of a finished prompt whose status is not success (none if it succeeded)."""
    status = entry.get("status") or {}
    if status.get("status_str") == "success":
        return []
    lines = []
    for event, data in status.get("messages") or []:
        if event == "execution_error":
            kind = data.get("exception_type", "error").rsplit(".", 1)[-1]
            lines.append(f"{node_label(prompt, data.get('node_id'))} failed: {kind}: "
                         f"{data.get('exception_message', '').strip()}")
        elif event == "execution_interrupted":
            lines.append(f"interrupted at {node_label(prompt, data.get('node_id'))}")
    return lines or [f"the prompt ended with status {status.get('status_str')!r} and no error message"]


def output_lines(entry: dict, prompt: dict) -> list[str]:
    """What each output node produced: files as ``<type>/<subfolder>/<name>``, texts, other values as JSON."""
    lines = []

    def order(item):
        return (0, int(item[0])) if str(item[0]).isdigit() else (1, str(item[0]))

    for node_id, out in sorted((entry.get("outputs") or {}).items(), key=order):
        label = node_label(prompt, node_id)
        for key, value in (out or {}).items():
            items = value if isinstance(value, list) else [value]
            if items and all(isinstance(v, dict) and "filename" in v for v in items):
                for v in items:
                    parts = [v.get("type") or "output", v.get("subfolder") or "", v["filename"]]
                    lines.append(f"{label}: {'/'.join(p for p in parts if p)}")
            elif items and all(isinstance(v, str) for v in items):
                lines.extend(f"{label}: {key}: {' / '.join(v.strip().splitlines())}" for v in items)
            else:
                text = json.dumps(value)
                lines.append(f"{label}: {key}: {text if len(text) <= 300 else text[:297] + '...'}")
    return lines


# -- websocket (reading only) ------------------------------------------------------------------------------


class WebSocketReader:
    """A websocket client for reading ComfyUI's events: handshake, unmasked server frames, ping/close."""

    def __init__(self, http_url: str, client_id: str, timeout: float = 10):
        parts = urllib.parse.urlsplit(http_url)
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        self.sock, self.buf = sock, b""
        key = base64.b64encode(os.urandom(16)).decode()
        path = f"{parts.path.rstrip('/')}/ws?clientId={urllib.parse.quote(client_id)}"
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = sock.recv(4096)
            if not chunk or len(self.buf) > 65536:
                raise OSError("the server closed the connection during the websocket handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            raise OSError(f"the server did not upgrade to a websocket ({lines[0]})")
        self.closed = False

    def _fill(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("the websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)  # a client masks every frame (RFC 6455 5.3)
        head = bytes([0x80 | opcode, 0x80 | len(payload)])  # control frames only: payload < 126
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _ready(self, timeout: float) -> bool:
        if self.buf or (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            return True
        return bool(select.select([self.sock], [], [], timeout)[0])

    def receive(self, timeout: float) -> Optional[dict]:
        """The next JSON text message, or None if none came within ``timeout`` s (binary previews are skipped)."""
        end = time.monotonic() + timeout
        message, opcode = b"", None
        while not self.closed:
            if not message and not self._ready(max(0.0, end - time.monotonic())):
                return None
            b0, b1 = self._fill(2)
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._fill(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._fill(8))[0]
            mask = self._fill(4) if b1 & 0x80 else None
            payload = self._fill(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            op = b0 & 0x0F
            if op == 0x8:  # close
                self.closed = True
                return None
            if op == 0x9:  # ping
                self._send(0xA, payload)
                continue
            if op == 0xA:
                continue
            opcode = op if op else opcode
            message += payload
            if b0 & 0x80:  # final fragment
                if opcode == 0x1:
                    try:
                        return json.loads(message)
                    except ValueError:
                        pass
                message, opcode = b"", None
                if time.monotonic() > end:
                    return None
        return None

    def close(self) -> None:
        try:
            if not self.closed:
                self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        finally:
            self.closed = True
            self.sock.close()
