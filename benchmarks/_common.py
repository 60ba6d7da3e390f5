"""What the benchmarks share: the fastest-of-N timer, the rank correlation, and (for the two
ComfyUI benchmarks) putting a ComfyUI checkout on ``sys.path`` and loading the pack and the tiny
random-weight models of the tests from this repository without installing them.

The benchmarks run as scripts (``python benchmarks/bench_x.py``), which puts this folder on
``sys.path``: they import this module as ``_common``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACK = "noisecraft_pack"  # the package name the ComfyUI benchmarks load the pack under


def fastest(fn, repeat: int = 3) -> float:
    """The fastest wall time of ``repeat`` calls of ``fn`` (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def spearman(a, b) -> float:
    """Spearman's rank correlation of two sequences of numbers (0 where one of them is constant)."""
    ra = torch.argsort(torch.argsort(torch.as_tensor(a, dtype=torch.float64))).double()
    rb = torch.argsort(torch.argsort(torch.as_tensor(b, dtype=torch.float64))).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


# -- ComfyUI benchmarks --------------------------------------------------------------------------------

def setup_comfy(cpu: bool) -> None:
    """Put the checkout named by COMFYUI_PATH on ``sys.path`` and set ComfyUI's flags before
    ``comfy.model_management`` is imported: CPU or GPU, PyTorch attention, no progress bars."""
    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "comfy" / "samplers.py").is_file():
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (the folder with main.py and comfy/)")
    sys.path.insert(0, str(Path(path).resolve()))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from comfy.cli_args import args  # must precede comfy.model_management

    args.cpu = cpu
    args.use_pytorch_cross_attention = True
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False


def load_module(name: str, path: Path, package: bool = False):
    """Import the file ``path`` as module ``name`` (a package when ``package``: its folder is searched)."""
    kw = {"submodule_search_locations": [str(path.parent)]} if package else {}
    spec = importlib.util.spec_from_file_location(name, path, **kw)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_pack(*modules: str):
    """After :func:`setup_comfy`: the pack's ``modules`` (e.g. ``"nodes.bridge"``) and the tests' tiny
    models (``tests/e2e/nc_test_pack/tiny_models.py``), in that order."""
    load_module(PACK, REPO / "__init__.py", package=True)
    loaded = [importlib.import_module(f"{PACK}.{m}") for m in modules]
    tiny = load_module("noisecraft_bench_tiny_models", REPO / "tests" / "e2e" / "nc_test_pack" / "tiny_models.py")
    return (*loaded, tiny)
