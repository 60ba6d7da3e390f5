"""One folder that lets ``benchmarks/gpu_report.py`` run on an offline GPU machine (no registry, no hub).

The GPU machines the report is meant for have Python 3.12, torch (CUDA), accelerate, peft, transformers,
safetensors, einops and timm (hence torchvision and pillow), and lack diffusers and ComfyUI's other
requirements. Built here, from the package registries and the ComfyUI checkout at ``COMFYUI_PATH``::

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu_bundle.py --out gpu_bundle     # prints its size

then copied to the GPU machine with this repository, and run there with::

    python benchmarks/gpu_report.py --bundle gpu_bundle     # installs from it offline, then the report

The folder (at most 60 MiB; ``gpu_bundle/`` is git-ignored, never committed) holds:

* ``wheels.tar.xz``: the wheels of :data:`WHEELS` (CPython 3.12, manylinux x86_64, no torch), each fetched
  with ``pip download --only-binary=:all: --no-deps``, plus any requirement of the ComfyUI checkout that is
  neither listed here, nor on the GPU machine (:data:`MACHINE`), nor unused by the report (:data:`UNUSED`),
  so a newer ComfyUI's new requirement is carried too. Wheels are zip files compressed one member at a
  time; they are stored re-zipped without compression inside one xz stream, which is what brings scipy
  and PyAV (35 MB each as downloaded) under the size limit. pip reads them as they are (the RECORD hashes
  cover the files, not the zip compression).
* ``comfyui.tar.xz``: the ComfyUI checkout's code (``*.py`` and small configuration files; no models, no
  ``.git``, tests, tokenizer vocabularies or custom nodes).
* ``manifest.json``: Python version and platform the wheels are for, each wheel's name, version, sha256 and
  requirements, the distributions expected on the machine, and the ComfyUI version.

``gpu_report.py --bundle DIR`` (:func:`install`) unpacks the folder into a temporary directory, installs
with ``pip install --no-index --no-deps --target`` the wheels whose distribution the machine lacks (the
machine's own torch, transformers, ... are never shadowed), checks every requirement of the bundled
distributions against what is installed (one line per conflict), and runs the report with that target
and this repository on ``PYTHONPATH`` and the unpacked ComfyUI as ``COMFYUI_PATH``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 60 * 2**20
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# what the report imports that the GPU machine lacks (found by running the report in an environment holding
# only the machine's packages, tests/nodes/test_gpu_bundle.py): the pack's diffusers and its requirements
# beyond huggingface_hub, ComfyUI's scipy, torchsde and PyAV (imported by comfy_api.latest)
WHEELS = ("diffusers", "requests", "urllib3", "certifi", "charset-normalizer", "idna", "importlib-metadata", "zipp",
          "lazy-importer", "scipy", "torchsde", "trampoline", "av")
# on the GPU machine: what the issue lists, and what those require (timm: torchvision, hence pillow)
MACHINE = ("torch", "torchvision", "accelerate", "peft", "transformers", "safetensors", "einops", "timm", "numpy",
           "pillow", "pyyaml", "psutil", "tqdm", "packaging", "huggingface-hub", "filelock", "regex", "tokenizers",
           "jinja2", "markupsafe", "sympy", "networkx", "fsspec", "typing-extensions")
# ComfyUI requirements the report never imports (server, frontend, video/audio nodes, optional extras)
UNUSED = ("comfyui-frontend-package", "comfyui-workflow-templates", "comfyui-embedded-docs", "torchaudio",
          "sentencepiece", "aiohttp", "yarl", "alembic", "sqlalchemy", "kornia", "spandrel", "pydantic",
          "pydantic-settings")
# what the ComfyUI copy keeps: code, and configuration files up to this size (no vocabularies, no images)
SMALL_FILE = 64 * 1024
SKIP_DIRS = {".git", ".github", "tests", "tests-unit", "models", "custom_nodes", "input", "output", "user", "temp",
             "web", "script_examples", "__pycache__", ".venv", "venv"}
SKIP_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pyc")


def norm(name: str) -> str:
    """A distribution name in PEP 503 normal form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str | None:
    line = line.split("#", 1)[0].strip()
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return norm(m.group(0)) if m and not line.startswith("-") else None


def comfy_requirements(comfy: Path) -> dict[str, str]:
    """``{normal name: requirement line}`` of the checkout's requirements.txt."""
    out = {}
    path = comfy / "requirements.txt"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        name = requirement_name(line)
        if name:
            out[name] = line.split("#", 1)[0].strip()
    return out


def pack_requirements() -> dict[str, str]:
    """``{normal name: requirement}`` of the pack's own dependencies (pyproject.toml's [project] list)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
    reqs = re.findall(r'"([^"]+)"', block.group(1)) if block else []
    return {requirement_name(r): r for r in reqs if requirement_name(r)}


def wheel_list(comfy: Path, extra=()) -> tuple[list[str], list[str]]:
    """The requirement specs to download (ComfyUI's or the pack's version range where they give one) and the
    names added from the checkout's requirements.txt beyond :data:`WHEELS`."""
    specs = {**pack_requirements(), **comfy_requirements(comfy)}
    names = [norm(n) for n in (*WHEELS, *extra)]
    known = set(names) | {norm(n) for n in (*MACHINE, *UNUSED)}
    added = [n for n in comfy_requirements(comfy) if n not in known]
    return [specs.get(n, n) for n in (*names, *added)], added


def download(specs: list[str], dest: Path, python: str, optional=()) -> None:
    """``pip download`` each spec as one wheel for CPython ``python`` on manylinux x86_64, without dependencies.
    A spec in ``optional`` (a requirement of the checkout this script does not know) that has no such wheel is
    left out with one line; any other failure stops the build."""
    abi = "cp" + python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest",
           str(dest), "--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
           "--abi", "none"]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    for spec in specs:
        if requirement_name(spec) in optional:
            if subprocess.run(cmd + [spec]).returncode != 0:
                print(f"gpu_bundle: left out {spec}: no wheel for CPython {python} on manylinux x86_64")
            continue
        subprocess.run(cmd + [spec], check=True)


def wheel_meta(path: Path) -> dict:
    """Name, version, sha256 and requirements (``Requires-Dist``) of a wheel file."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode("utf-8", "replace")
    head = text.split("\n\n", 1)[0]
    field = lambda key: [v.strip() for k, v in re.findall(r"^([\w-]+):(.*)$", head, re.M) if k == key]  # noqa: E731
    return {"file": path.name, "name": field("Name")[0], "version": field("Version")[0],
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "requires": field("Requires-Dist")}


def stored_copy(path: Path) -> bytes:
    """The wheel re-zipped without compression (same members, same order)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
    return buf.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def comfy_files(comfy: Path) -> list[Path]:
    """The checkout's code files: ``*.py``, and other files up to :data:`SMALL_FILE` bytes that are not images
    or weights, outside :data:`SKIP_DIRS`."""
    out = []
    for root, dirs, files in os.walk(comfy):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in sorted(files):
            p = Path(root) / f
            if p.is_symlink() or f.endswith(SKIP_SUFFIXES):
                continue
            if f.endswith(".py") or p.stat().st_size <= SMALL_FILE:
                out.append(p)
    return out


def comfy_version(comfy: Path) -> str:
    m = re.search(r'__version__\s*=\s*"([^"]+)"', (comfy / "comfyui_version.py").read_text(encoding="utf-8")) \
        if (comfy / "comfyui_version.py").is_file() else None
    return m.group(1) if m else "unknown"


def build(out: Path, comfy: Path, python: str = PYTHON, extra=(), preset: int = 6) -> dict:
    """Write the bundle folder ``out``; returns its manifest (with ``size_bytes``)."""
    if not (comfy / "comfy" / "samplers.py").is_file():
        raise SystemExit(f"gpu_bundle: COMFYUI_PATH={comfy} is not a ComfyUI checkout (no comfy/samplers.py): set "
                         f"COMFYUI_PATH to the ComfyUI folder the report should run against")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    specs, added = wheel_list(comfy, extra)
    for name in added:
        print(f"gpu_bundle: also carrying {name} (in {comfy / 'requirements.txt'}, not known to this script)")
    with tempfile.TemporaryDirectory(prefix="nc_bundle_") as tmp:
        download(specs, Path(tmp), python, optional=set(added))
        wheels = sorted(Path(tmp).glob("*.whl"))
        metas = [wheel_meta(w) for w in wheels]
        torch_like = [m["name"] for m in metas if norm(m["name"]) in {"torch", "nvidia-cuda-runtime-cu12"}]
        if torch_like:
            raise SystemExit(f"gpu_bundle: the bundle must not carry {torch_like}: the GPU machine has its own torch")
        with tarfile.open(out / "wheels.tar.xz", "w:xz", preset=preset) as tar:
            for w in wheels:
                add_bytes(tar, w.name, stored_copy(w))
    files = comfy_files(comfy)
    with tarfile.open(out / "comfyui.tar.xz", "w:xz", preset=preset) as tar:
        for p in files:
            add_bytes(tar, "ComfyUI/" + p.relative_to(comfy).as_posix(), p.read_bytes())
    manifest = {"python": python, "platforms": list(PLATFORMS), "wheels": metas, "machine": list(MACHINE),
                "comfyui": {"version": comfy_version(comfy), "files": len(files)},
                "created_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    manifest["size_bytes"] = sum(p.stat().st_size for p in out.iterdir())
    return manifest


# -- the GPU machine's side (gpu_report.py --bundle) ------------------------------------------------------

def installed_version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def requirement_conflicts(metas: list[dict]) -> list[str]:
    """One line per requirement of a bundled distribution that what is installed (or bundled) does not meet.
    Uses ``packaging`` (present wherever transformers is); without it, nothing is checked."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return []
    bundled = {norm(m["name"]): m["version"] for m in metas}
    lines = []
    for m in metas:
        for line in m["requires"]:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = installed_version(req.name) or bundled.get(norm(req.name))
            if have is None:
                lines.append(f"{m['name']} {m['version']} requires {line}: not installed and not in the bundle")
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                lines.append(f"{m['name']} {m['version']} requires {line}: this machine has {have}")
    return lines


def install(bundle: Path, target: Path) -> dict:
    """Unpack ``bundle`` into ``target`` (``wheels/``, ``ComfyUI/``) and install into ``target/site`` the wheels
    whose distribution is not installed; returns ``{"site", "comfyui", "installed", "present", "conflicts",
    "missing_machine"}``. Raises SystemExit with one line for a bundle made for another Python."""
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if manifest["python"] != here:
        raise SystemExit(f"gpu_report: the bundle {bundle} holds wheels for Python {manifest['python']}, this is "
                         f"Python {here}: rebuild it with benchmarks/gpu_bundle.py --python {here}")
    wheels, site = target / "wheels", target / "site"
    wheels.mkdir(parents=True, exist_ok=True)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4 / 3.12
    with tarfile.open(bundle / "wheels.tar.xz", "r:xz") as tar:
        tar.extractall(wheels, **safe)
    with tarfile.open(bundle / "comfyui.tar.xz", "r:xz") as tar:
        tar.extractall(target, **safe)
    todo = [m for m in manifest["wheels"] if installed_version(m["name"]) is None]
    present = [f"{m['name']} {installed_version(m['name'])}" for m in manifest["wheels"] if m not in todo]
    if todo and importlib.util.find_spec("pip") is None:
        print("gpu_report: this Python has no pip: unpacking the wheels into", site, flush=True)
        for m in todo:
            unpack_wheel(wheels / m["file"], site)
    elif todo:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull  # the bundle is the only source
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
               "--disable-pip-version-check", "--target", str(site), *(str(wheels / m["file"]) for m in todo)]
        print("+ pip install --no-index --no-deps --target", site, *(m["file"] for m in todo), flush=True)
        subprocess.run(cmd, check=True, env=env)
    return {"site": site, "comfyui": target / "ComfyUI", "installed": [f"{m['name']} {m['version']}" for m in todo],
            "present": present, "conflicts": requirement_conflicts(manifest["wheels"]),
            "missing_machine": [n for n in manifest["machine"] if installed_version(n) is None]}


def unpack_wheel(wheel: Path, site: Path) -> None:
    """Install a wheel without pip: its files into ``site``, ``<name>.data/purelib|platlib`` moved up (other
    ``.data`` parts, scripts and headers, are not needed by the report)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) > 2 and parts[0].endswith(".data"):
                if parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            dest = site.joinpath(*parts)
            if info.is_dir():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))
            if (info.external_attr >> 16) & 0o111:
                dest.chmod(0o755)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_bundle", help="the bundle folder to write (replaced if it exists)")
    p.add_argument("--python", default=PYTHON, help=f"the GPU machine's Python version (default {PYTHON})")
    p.add_argument("--add", action="append", default=[], metavar="REQ",
                   help="carry this requirement too (e.g. --add pillow for a machine without it); repeatable")
    a = p.parse_args(argv)
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        print("gpu_bundle: set COMFYUI_PATH to the ComfyUI checkout the report should run against (its code goes "
              "into the bundle)", file=sys.stderr)
        return 2
    manifest = build(Path(a.out), Path(comfy), a.python, a.add)
    size = manifest["size_bytes"]
    print(f"gpu_bundle: wrote {a.out}: {len(manifest['wheels'])} wheels for CPython {a.python}, ComfyUI "
          f"{manifest['comfyui']['version']} ({manifest['comfyui']['files']} files); {size / 2**20:.1f} MiB "
          f"(limit {LIMIT / 2**20:.0f} MiB)")
    if size > LIMIT:
        print(f"gpu_bundle: {a.out} is {size / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
