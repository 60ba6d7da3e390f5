"""Tier 4: the NoiseCraft frontend extension in a real headless Chromium, against the real ComfyUI
frontend served by a real ComfyUI with the pack installed (see README.md).

Needs ``COMFYUI_PATH`` (as tier 3), a Chromium binary (``NOISECRAFT_CHROMIUM``, default
``/usr/bin/chromium``), ``node`` and ``playwright-core`` installed in this folder (``npm ci``).
Without any of them the folder is skipped with one line in the summary. The server and the refiner
file are the tier-3 fixtures of ``tests/e2e`` (imported, not copied).

The frontend is the one ComfyUI's Python has installed, or the one ``NOISECRAFT_FRONTEND`` names: a version of
the ``comfyui-frontend-package`` wheel (installed once with ComfyUI's pip into ``tests/js/.frontend/<version>``,
git-ignored) or a folder holding a built frontend (its ``index.html``); ComfyUI serves it with
``--front-end-root``. The version tested is printed in the summary.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
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


def frontend_root(spec: str) -> Path:
    """The built frontend ``NOISECRAFT_FRONTEND`` names: a folder with ``index.html``, or a version of the
    ``comfyui-frontend-package`` wheel, installed with ComfyUI's Python into ``.frontend/<version>`` once."""
    if os.path.isfile(os.path.join(spec, "index.html")):
        return Path(spec).resolve()
    target = HERE / ".frontend" / spec
    static = target / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"comfyui-frontend-package=={spec}"], check=True)
    return static


def frontend_version(root: Path | None) -> str:
    """The version of the served frontend: the wheel's dist-info next to ``root``, or ComfyUI's Python's."""
    if root is not None:
        infos = sorted(root.parent.parent.glob("comfyui_frontend_package-*.dist-info"))
        return infos[0].name[: -len(".dist-info")].split("-")[1] if infos else f"a build at {root}"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('comfyui-frontend-package'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


MISSING = _missing()
FRONTEND_ROOT = None
if not MISSING and os.environ.get("NOISECRAFT_FRONTEND"):
    FRONTEND_ROOT = frontend_root(os.environ["NOISECRAFT_FRONTEND"])
    os.environ["NOISECRAFT_FRONTEND_ROOT"] = str(FRONTEND_ROOT)  # read by the tier-3 server fixture

if MISSING:
    collect_ignore_glob = ["test_*.py"]

    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_line(
            f"skipping browser frontend tests (tier 4): missing {', '.join(MISSING)}", yellow=True, bold=True)
else:
    FRONTEND = frontend_version(FRONTEND_ROOT)

    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_line(f"tier 4 ran against comfyui-frontend-package {FRONTEND}", bold=True)

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
