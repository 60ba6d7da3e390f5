"""Tier 4: the NoiseCraft frontend extension in a real headless Chromium, against the real ComfyUI
frontend served by a real ComfyUI with the pack installed (see README.md).

Needs ``COMFYUI_PATH`` (as tier 3), a Chromium binary (``NOISECRAFT_CHROMIUM``, default
``/usr/bin/chromium``), ``node`` and ``playwright-core`` installed in this folder (``npm ci``).
Without any of them the folder is skipped with one line in the summary. The server and the refiner
file are the tier-3 fixtures of ``tests/e2e`` (imported, not copied).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
E2E = HERE.parent / "e2e"
CHROMIUM = os.environ.get("NOISECRAFT_CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")


def _missing() -> list[str]:
    missing = []
    if not os.environ.get("COMFYUI_PATH"):
        missing.append("COMFYUI_PATH")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"chromium ({CHROMIUM})")
    if not NODE:
        missing.append("node")
    if not (HERE / "node_modules" / "playwright-core" / "package.json").is_file():
        missing.append("playwright-core (npm ci in tests/js)")
    return missing


MISSING = _missing()

if MISSING:
    collect_ignore_glob = ["test_*.py"]

    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_line(
            f"skipping browser frontend tests (tier 4): missing {', '.join(MISSING)}", yellow=True, bold=True)
else:
    def _load(name: str, path: Path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    # the tier-3 server fixture (a real ComfyUI on 127.0.0.1 with the pack and nc_test_pack linked into
    # custom_nodes of a temporary --base-directory) and its random refiner LoRA in models/loras
    _e2e_conftest = _load("noisecraft_js_e2e_conftest", E2E / "conftest.py")
    _e2e_tests = _load("noisecraft_js_e2e_workflows", E2E / "test_example_workflows.py")
    server = _e2e_conftest.server
    refiner_files = _e2e_tests.refiner_files
