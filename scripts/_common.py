"""What the toy-asset scripts share: one CPU thread, the repository on ``sys.path``, the flags of
the trained assets, the weights_manifest.json update and the closing sha256 line.

Import it before torch (it sets ``OMP_NUM_THREADS`` to 1 unless the caller chose). The files
themselves are written with ``noisecraft.io.write_safetensors`` (sorted names and metadata), so a
rerun with the same seeds gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MANIFEST = ROOT / "weights_manifest.json"


def parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_asset_flags(ap: argparse.ArgumentParser, asset: Path, work: Path, work_help: str) -> None:
    """The flags every trained-asset script takes: evaluation size, work folder, output, manifest."""
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--work", type=Path, default=work, help=f"{work_help} (emptied first)")
    ap.add_argument("--out", type=Path, default=asset)
    ap.add_argument("--no-manifest", action="store_true", help="do not touch weights_manifest.json")


def deterministic(work: Path | None = None) -> float:
    """One thread, deterministic kernels, ``work`` emptied; returns the start time."""
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if work is not None and work.exists():
        shutil.rmtree(work)
    return time.perf_counter()


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def update_manifest(entry: dict) -> None:
    """Replace the manifest entry named ``entry["name"]`` (or add it after the other toy files); every
    other entry is kept as it is."""
    from noisecraft.io import atomic_write_text

    data = json.loads(MANIFEST.read_text(encoding="utf-8"))
    weights = data["weights"]
    names = [w.get("name") for w in weights]
    if entry["name"] in names:
        weights[names.index(entry["name"])] = entry
    else:
        last_toy = max((i for i, w in enumerate(weights) if str(w.get("name", "")).startswith("toy-")),
                       default=len(weights) - 1)
        weights.insert(last_toy + 1, entry)
    atomic_write_text(MANIFEST, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def finish(args: argparse.Namespace, asset: Path, name: str, kind: str, script: str, t_all: float) -> None:
    """Record ``args.out`` in the manifest (when it is the shipped asset) and print its sha256."""
    from noisecraft.weights import sha256_file

    digest = sha256_file(args.out)
    if not args.no_manifest and args.out.resolve() == asset.resolve():
        update_manifest({
            "name": name,
            "kind": kind,
            "base_model": "toy-digits-8x8",
            "sha256": digest,
            "size": args.out.stat().st_size,
            "license": "Apache-2.0",
            "folder": "in-package",
            "url": None,
            "path": f"assets/{asset.name}",
            "made_by": f"python scripts/{script} (seeds fixed, 1 thread)",
        })
    print(f"total wall time {time.perf_counter() - t_all:.0f}s")
    print(f"{digest}  {shown(args.out)}  ({args.out.stat().st_size} bytes)")
