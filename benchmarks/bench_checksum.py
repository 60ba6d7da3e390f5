"""What the checksums cost: sha256 of a 1 GiB teacher-cache shard, against reading it, and what that adds to
resuming a training on a 10 GiB cache (the loop checks every shard once before its first step).

    python benchmarks/bench_checksum.py [--gib 1] [--folder DIR]

Writes one shard of ``--gib`` GiB of float32 x0/noise (as ``TeacherCache.write_shard`` lays it out) with its
checksum into a temporary folder on the disk given by ``--folder`` (default: the system's temp folder), then
times, best of 3 with the file in the page cache: a plain read of the whole file, ``verify_safetensors``
(read + sha256), and the hashes hashlib offers for comparison on the same bytes in memory. Prints MB/s and the
seconds added to resuming a 10 GiB cache (10 GiB / the verify rate; with a cold cache the disk's read rate
bounds both). The file is removed afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch

from _common import fastest

from noisecraft.io import verify_safetensors, write_safetensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="shard size in GiB (default 1)")
    ap.add_argument("--folder", default=None, help="where to write the shard (default: the temp folder)")
    args = ap.parse_args()
    n = max(1, int(args.gib * (1 << 30) / (2 * 4 * 4 * 128 * 128)))  # samples of two [4, 128, 128] float32
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        path = Path(tmp) / "shard_00000.safetensors"
        tensors = {"noise": torch.randn(n, 4, 128, 128, generator=g), "x0": torch.randn(n, 4, 128, 128, generator=g),
                   "cond": torch.arange(n), "seed": torch.arange(n)}
        t0 = time.perf_counter()
        write_safetensors(tensors, path, {"noisecraft.kind": "teacher_cache_shard"}, digest=True)
        write_s = time.perf_counter() - t0
        del tensors
        size = path.stat().st_size
        mb = size / 1e6

        def read():
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(8 << 20)
                while f.readinto(buf):
                    pass

        read_s = fastest(read)
        verify_s = fastest(lambda: verify_safetensors(path))
        data = path.read_bytes()
        hashes = {name: fastest(lambda name=name: hashlib.new(name, data).digest()) for name in
                  ("sha256", "blake2b", "sha1", "md5")}
        del data
    print(f"shard: {mb:.0f} MB ({n} samples of 2 x [4, 128, 128] float32), written with its checksum in {write_s:.1f} s")
    print(f"| what | seconds | MB/s |\n|---|---:|---:|")
    print(f"| plain read (page cache) | {read_s:.2f} | {mb / read_s:.0f} |")
    print(f"| verify_safetensors (read + sha256) | {verify_s:.2f} | {mb / verify_s:.0f} |")
    for name, s in hashes.items():
        print(f"| hashlib {name} (in memory) | {s:.2f} | {mb / s:.0f} |")
    per_10gib = 10 * (1 << 30) / size * verify_s
    print(f"resuming a 10 GiB cache: + {per_10gib:.1f} s to check every shard once (CPU: {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
