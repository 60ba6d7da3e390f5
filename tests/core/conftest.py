"""Fixtures shared by the core tests: a real HTTP server on 127.0.0.1 for the download tests, and the
check that a sharded store (teacher cache, NPNet pairs) built in parts matches one built at once."""

from __future__ import annotations

import http.server
import threading

import pytest


@pytest.fixture(scope="module")
def server(request):
    """A threaded HTTP server on 127.0.0.1 (a free port) answering with the test module's ``Handler``
    class; shut down when the module's tests are done."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), request.module.Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _check_resumed_build(build, root, first: list[int], missing: list[int], batch: int, shards: int = 3):
    """Build ``root / "b"`` with only the ``first`` shards (a killed job): it lists ``missing`` as missing,
    refuses to give batches, and, finished by a second build, holds the same shard bytes as ``root / "a"``."""
    part = build(root / "b", shards=first)
    assert part.missing_shards() == missing and not part.complete
    with pytest.raises(FileNotFoundError, match="incomplete"):
        next(part.batches(batch))
    build(root / "b")
    for k in range(shards):
        name = f"shard_{k:05d}.safetensors"
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes()


@pytest.fixture
def check_resumed_build():
    """:func:`_check_resumed_build`, for the store tests."""
    return _check_resumed_build
