"""Tier 2: the offline GPU bundle (``benchmarks/gpu_bundle.py``) built from the registries and this ComfyUI
checkout, installed with ``pip --no-index`` in a fresh virtual environment that holds only what the GPU
machines have (torch, torchvision, accelerate, peft, transformers, safetensors, einops, timm and what those
require, taken from this test's own environment), with no network (``unshare -n`` where the test may), and
``gpu_report.py --bundle DIR --cpu --tiny`` passing there with every row of the ComfyUI smoke test; on a
Python without pip the wheels are unpacked instead, and import.

The wheels are for this interpreter's Python (the GPU machines run 3.12; the builder's ``--python`` picks it).
Without access to the package registries the test is skipped with one line.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
BUNDLER = REPO / "benchmarks" / "gpu_bundle.py"
REPORT = REPO / "benchmarks" / "gpu_report.py"
LIMIT = 60 * 2**20
# what the GPU machines have (timm requires torchvision)
MACHINE_ROOTS = ("torch", "torchvision", "accelerate", "peft", "transformers", "safetensors", "einops", "timm")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def registry_reachable(dest: Path) -> bool:
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--retries", "1", "--timeout", "20",
                               "--no-deps", "--only-binary=:all:",
                               "--dest", str(dest), "trampoline"], capture_output=True, timeout=180)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def machine_distributions() -> list[md.Distribution]:
    """The distributions of :data:`MACHINE_ROOTS` installed here and everything they require (markers
    evaluated, extras left out)."""
    seen, todo, out = set(), list(MACHINE_ROOTS), []
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        out.append(dist)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return out


def machine_venv(root: Path, pip: bool = True) -> Path:
    """A fresh virtual environment (with or without pip) that sees only :func:`machine_distributions` (links to
    this environment's files, through a .pth file); returns its python."""
    site = root / "machine-site"
    site.mkdir(parents=True)
    for dist in machine_distributions():
        tops = {Path(f).parts[0] for f in dist.files or [] if Path(f).parts and Path(f).parts[0] != ".."}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    venv = root / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv),
                    *([] if pip else ["--without-pip"])], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "gpu_machine.pth").write_text(str(site) + "\n", encoding="utf-8")
    return python


def offline_prefix() -> list[str]:
    """``unshare -n`` (a network namespace with no interfaces) where this process may create one."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The bundle for this interpreter's Python, built once (about 2.5 minutes: the xz stream)."""
    tmp = tmp_path_factory.mktemp("gpu_bundle")
    if not registry_reachable(tmp / "probe"):
        pytest.skip("pip cannot download from the package registries: skipping the offline GPU bundle test")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    out = tmp / "bundle"
    env = dict(os.environ, COMFYUI_PATH=os.environ["COMFYUI_PATH"])
    built = subprocess.run([sys.executable, str(BUNDLER), "--out", str(out), "--python", version], env=env,
                           capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def test_bundle_fits_installs_offline_and_the_report_passes(tmp_path, bundle):
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    size = sum(p.stat().st_size for p in bundle.iterdir())
    print(f"GPU bundle for CPython {version}: {size / 2**20:.1f} MiB ({size} bytes)")
    assert size <= LIMIT
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    names = {w["name"].lower() for w in manifest["wheels"]}
    assert {"diffusers", "scipy", "av", "torchsde"} <= names and not names & {"torch", "transformers"}

    python = machine_venv(tmp_path)
    lacks = subprocess.run([python, "-c", "import torch, transformers, peft, accelerate; import diffusers"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert "No module named 'diffusers'" in lacks.stderr, lacks.stderr[-2000:]  # the machine's set, no more

    out = tmp_path / "report"
    clean = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH")
             and not k.startswith("PIP_")}
    clean["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([*offline_prefix(), str(python), str(REPORT), "--bundle", str(bundle), "--cpu", "--tiny",
                           "--out", str(out)], cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=1200)
    installed = next((line for line in proc.stdout.splitlines() if line.startswith("bundle: installed")), "")
    assert "diffusers" in installed and "scipy" in installed, proc.stdout[-3000:] + proc.stderr[-3000:]

    core = _load("nc_core_test_gpu_report", REPO / "tests" / "core" / "test_gpu_report.py")
    comfy = _load("nc_nodes_test_gpu_report_comfy", REPO / "tests" / "nodes" / "test_gpu_report_comfy.py")
    nodes = core.noise_node_ids()
    expected = {r: "ok" for r in [*core.CORE_ROWS, *core.COMFY_ROWS, *(f"precision/{n}" for n in nodes)]}
    expected["dynamic_vram/train_wrappers"] = "not run: "  # CUDA only
    rows = core.check_report(out, proc, expected)
    comfy.check_comfy_rows(rows, nodes)
    report = json.loads((out / "gpu_report.json").read_text(encoding="utf-8"))
    assert Path(report["meta"]["comfyui"]).name == "ComfyUI" and "nc_gpu_bundle_" in report["meta"]["comfyui"]


def test_a_machine_without_pip_gets_the_wheels_unpacked(tmp_path, bundle):
    """``--bundle`` on a Python without pip: the wheels are unpacked into the target; the bundled distributions
    and the bundled ComfyUI import there, offline."""
    python = machine_venv(tmp_path, pip=False)
    script = (f"import sys, tempfile; from pathlib import Path; sys.path.insert(0, {str(BUNDLER.parent)!r}); "
              f"from gpu_bundle import install; done = install(Path({str(bundle)!r}), Path(tempfile.mkdtemp())); "
              "sys.path[:0] = [str(done['site']), str(done['comfyui'])]; "
              "import diffusers, scipy.stats, av, torchsde, requests; "
              "from comfy.cli_args import args; args.cpu = True; import comfy.samplers, comfy_api.latest; "
              "print('IMPORTED', len(done['installed']))")
    clean = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH")
             and not k.startswith("PIP_")}
    proc = subprocess.run([*offline_prefix(), str(python), "-c", script], cwd=tmp_path, env=clean,
                          capture_output=True, text=True, timeout=600)
    assert "this Python has no pip: unpacking the wheels" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "IMPORTED" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
