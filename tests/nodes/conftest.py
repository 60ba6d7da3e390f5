"""Tier 2: the nodes inside a ComfyUI checkout (``COMFYUI_PATH``), on tiny random-weight models.

Without ``COMFYUI_PATH`` the whole folder is skipped with one line in the summary. With it,
ComfyUI is imported as a library on the CPU and the pack is imported the way ComfyUI imports
a custom node: the repository folder as a package (here named ``noisecraft_pack``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
SKIP_LINE = "COMFYUI_PATH not set: skipping ComfyUI node tests (tier 2)"
PACK_NAME = "noisecraft_pack"

if not COMFYUI_PATH:
    collect_ignore_glob = ["test_*.py"]

    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_line(SKIP_LINE, yellow=True, bold=True)

else:
    if not (Path(COMFYUI_PATH) / "comfy" / "samplers.py").is_file():
        raise pytest.UsageError(f"COMFYUI_PATH={COMFYUI_PATH!r} is not a ComfyUI checkout (no comfy/samplers.py)")
    sys.path.insert(0, str(Path(COMFYUI_PATH).resolve()))
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from comfy.cli_args import args  # must precede comfy.model_management

    args.cpu = True
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False


def load_pack():
    """Import the repository as ComfyUI would (a package named after its folder)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def load_tiny_models():
    name = "noisecraft_test_tiny_models"
    if name in sys.modules:
        return sys.modules[name]
    path = REPO / "tests" / "e2e" / "nc_test_pack" / "tiny_models.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Comfy:
    """Handles to the pack modules and tiny models, shared by the tests."""

    def __init__(self):
        load_pack()
        self.bridge = importlib.import_module(f"{PACK_NAME}.nodes.bridge")
        self.noise = importlib.import_module(f"{PACK_NAME}.nodes.noise")
        self.nodes = importlib.import_module(f"{PACK_NAME}.nodes.nodes_stability")
        self.core_ode = importlib.import_module(f"{PACK_NAME}.noisecraft.ode")
        self.core_sigmas = importlib.import_module(f"{PACK_NAME}.noisecraft.sigmas")
        self.core_stability = importlib.import_module(f"{PACK_NAME}.noisecraft.stability")
        self.tiny = load_tiny_models()
        self._models = {}

    def model(self, family: str):
        if family not in self._models:
            self._models[family] = self.tiny.build(family, seed=0)
        return self._models[family]

    def conds(self, family: str, batch: int = 1):
        return self.tiny.conditioning(family, 1, batch), self.tiny.conditioning(family, 2, batch, empty=True)

    def latent(self, family: str, batch: int = 1, size: int = 16, empty_4ch: bool = True):
        import torch

        ch = 4 if empty_4ch else self.tiny.LATENT_CHANNELS[family]
        return {"samples": torch.zeros(batch, ch, size, size)}


@pytest.fixture(scope="session")
def nc():
    return Comfy()


@contextlib.contextmanager
def _swap_model_folders(root, names, node_module, set_paths=()):
    """Point ComfyUI's ``folder_paths`` at ``root`` for the folder ``names`` (restored afterwards);
    ``set_paths`` are set to ``root/<name>`` directly, then the node module registers its own."""
    import folder_paths

    saved_dir = folder_paths.models_dir
    saved = {k: folder_paths.folder_names_and_paths.pop(k, None) for k in names}
    folder_paths.models_dir = str(root)
    for k in set_paths:
        folder_paths.folder_names_and_paths[k] = ([str(Path(root) / k)], set(folder_paths.supported_pt_extensions))
    for k in names:
        folder_paths.filename_list_cache.pop(k, None)
    node_module.clear_cache()
    try:
        node_module.register_folders()
        yield root
    finally:
        folder_paths.models_dir = saved_dir
        for k, v in saved.items():
            folder_paths.folder_names_and_paths.pop(k, None)
            if v is not None:
                folder_paths.folder_names_and_paths[k] = v
            folder_paths.filename_list_cache.pop(k, None)
        node_module.clear_cache()


@pytest.fixture(scope="session")
def model_folders():
    """``with model_folders(root, names, node_module, set_paths=()):`` -- see ``_swap_model_folders``."""
    return _swap_model_folders


def _node_module_fixture(name: str, module: str):
    """A session fixture ``name``: the pack's ``nodes/<module>.py`` as ComfyUI imports it."""

    def fixture(nc):
        return importlib.import_module(f"{PACK_NAME}.nodes.{module}")

    fixture.__doc__ = f"nodes/{module}.py as ComfyUI imports it."
    return pytest.fixture(scope="session", name=name)(fixture)


rf = _node_module_fixture("rf", "nodes_refine")
tr = _node_module_fixture("tr", "nodes_train")
npn = _node_module_fixture("npn", "nodes_npnet")
tn = _node_module_fixture("tn", "nodes_train_npnet")


@pytest.fixture(autouse=True)
def _clear_interrupt():
    import comfy.model_management as mm

    mm.interrupt_current_processing(False)
    yield
    mm.interrupt_current_processing(False)
