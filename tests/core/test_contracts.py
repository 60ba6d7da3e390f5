"""Contract tests: determinism, global RNG untouched, the core never imports ComfyUI, and the layers
point one way (DESIGN.md "Layout": only the demo, the CLI, scripts and tests use the toy model)."""

import ast
import subprocess
import sys
from pathlib import Path

import torch

from noisecraft import rng
from noisecraft import stability as st
from noisecraft.analytic import GaussianMixture
from noisecraft.sigmas import SigmaTable, get_sigmas

CORE = Path(__file__).resolve().parents[2] / "noisecraft"
COMFY_MODULES = {"comfy", "comfy_extras", "comfy_api", "folder_paths", "server", "nodes", "execution", "latent_preview"}


def test_seeded_noise_matches_torch_manual_seed_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    ours = rng.seeded_noise(1234, (2, 4, 8, 8))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)  # what ComfyUI's prepare_noise does
    theirs = torch.randn((2, 4, 8, 8))
    torch.set_rng_state(state)
    assert torch.equal(ours, theirs)


def test_candidates_are_per_batch_index_slices_of_comfyui_noise():
    c = rng.candidate_noises(7, 3, (2, 1, 4, 4), batch_index=1)
    assert c.shape == (3, 1, 4, 4)
    for i in range(3):
        assert torch.equal(c[i], rng.seeded_noise(7 + i, (2, 1, 4, 4))[1])


def test_same_inputs_same_outputs_and_no_global_rng_use():
    means = torch.randn((4, 1, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    D = GaussianMixture(means, 0.3).denoiser("eps")
    s = get_sigmas(SigmaTable.scaled_linear(), "karras", 5)
    cands = rng.candidate_noises(3, 5, (1, 1, 6, 6))[:, None]
    state = torch.get_rng_state()
    a = st.select(D, cands, s, "eps", micro_batch=2)
    o1 = st.optimize(D, cands[:2, 0], s, "eps", method="fixed_point", steps=3)
    o2 = st.optimize(D, cands[:2, 0], s, "eps", method="momentum", steps=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = st.select(D, cands, s, "eps", micro_batch=2)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.x0, b.x0)
    assert torch.equal(o1.noise, st.optimize(D, cands[:2, 0], s, "eps", method="fixed_point", steps=3).noise)
    assert torch.equal(o2.noise, st.optimize(D, cands[:2, 0], s, "eps", method="momentum", steps=3).noise)


def test_core_source_never_imports_comfyui():
    offenders = []
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in COMFY_MODULES]
    assert offenders == []
    assert len(list(CORE.rglob("*.py"))) >= 6


def test_core_imports_with_comfyui_blocked():
    code = (
        "import sys, importlib, pkgutil\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(COMFY_MODULES)!r}: raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import noisecraft\n"
        "for m in pkgutil.walk_packages(noisecraft.__path__, 'noisecraft.'):\n"
        "    if m.name.endswith('__main__'): continue\n"
        "    importlib.import_module(m.name)\n"
        "print('ok', len([k for k in sys.modules if k.startswith('noisecraft')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CORE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_pack_entry_imports_without_comfyui():
    """The repository folder imports as a package where ComfyUI is absent (tools, tests)."""
    root = CORE.parent
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ComfyUI_NoiseCraft', {str(root / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(root)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['ComfyUI_NoiseCraft'] = m\n"
        "spec.loader.exec_module(m)\n"
        "print(m.WEB_DIRECTORY, m.__all__, hasattr(m, 'comfy_entrypoint'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "./js ['WEB_DIRECTORY'] False"


# -- layering (DESIGN.md "Layout") ---------------------------------------------------------------

ROOT = CORE.parent
TOY_MODULES = {"noisecraft.hosts.toy", "noisecraft.toy"}
# the toy model's users inside the pack: the demo and the CLI's --toy / --filter toy-classifier
TOY_USERS = {"noisecraft.demo", "noisecraft.cli_train", "noisecraft.cli_filter", "noisecraft.hosts.toy"}


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against the
    repository root as the package root; ``from a import b`` yields both ``a`` and ``a.b``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return names


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_layers_point_one_way():
    graph = {_module(p): _imports(p) for p in CORE.rglob("*.py")}
    graph.update({_module(p): _imports(p) for p in (ROOT / "nodes").rglob("*.py")})
    assert "noisecraft.train.refiner" in graph and "noisecraft.hosts.toy" in graph and "nodes.common" in graph

    def uses(prefixes: set[str], module: str) -> list[str]:
        return sorted(n for n in graph[module] if any(n == p or n.startswith(p + ".") for p in prefixes))

    # nothing in train/ (nor nodes/, nor any core module but the demo and the CLI) imports the toy
    toy = {m: uses(TOY_MODULES, m) for m in graph if m not in TOY_USERS}
    assert {m: u for m, u in toy.items() if u} == {}
    assert uses(TOY_MODULES, "noisecraft.demo") and uses(TOY_MODULES, "noisecraft.cli_train")  # the check can see them
    # the algorithm files never import the trainers or the hosts; the hosts never import the trainers
    upper = {"noisecraft.train", "noisecraft.hosts", "noisecraft.demo", "noisecraft.__main__", "noisecraft.cli_train",
             "noisecraft.cli_validation", "noisecraft.cli_filter",
             "noisecraft.cli_cache"}  # (the CLI: train-refiner's validation set-up, its ComfyUI caches)
    algorithms = [m for m in graph if m.startswith("noisecraft") and not any(m == u or m.startswith(u + ".") for u in upper)]
    assert {m: uses(upper, m) for m in algorithms if uses(upper, m)} == {}
    hosts = [m for m in graph if m.startswith("noisecraft.hosts")]
    assert {m: uses({"noisecraft.train"}, m) for m in hosts if uses({"noisecraft.train"}, m)} == {}
    assert uses({"noisecraft.hosts.diffusers"}, "noisecraft.train.refiner")  # the trainers do use the hosts
