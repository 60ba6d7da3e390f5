"""Fixtures shared by the core tests: a real HTTP server on 127.0.0.1 for the download tests."""

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
