"""Teacher cache for NoiseRefine training: (unit noise, condition id, teacher x0) in safetensors shards.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), App. D
(the guided teacher images are generated once, with N' = 20 guided steps, and reused over the
training epochs; App. A: "dataset generation" is part of the training cost).

The teacher costs 2N' model passes per sample (CFG), the student step only N + 2 without a graph
plus one backward: paying for the teacher once, possibly in a separate job (or several), is most
of the point of this module.

Layout of a cache folder::

    index.json                 {"version", "shape", "meta", "conds", "shard_size", "total", "shards": [...]}
    shard_00000.safetensors    "noise" [n, C, H, W] float32, "x0" [n, C, H, W] float32,
                               "cond" [n] int64 (class label or prompt index), "seed" [n] int64
    shard_00001.safetensors    ...

* Sample ``i`` is fully defined by the cache's base seed and condition list: its noise is
  ``seeded_noise(base_seed + i, (1, C, H, W))`` (ComfyUI's ``RandomNoise(seed)`` for a batch of one)
  and its condition is ``conds[i % len(conds)]``. So shard ``k`` (samples ``k * shard_size ...``) can
  be produced by any job, in any order, and a build that was killed restarts at the first
  missing shard. The noise is stored as well (the reader never regenerates it).
* Every file is written to a temporary name and renamed (``os.replace``): a shard or index that
  exists under its final name is complete. The index is rewritten after each shard from a scan of
  the folder; :meth:`TeacherCache.reindex` rebuilds it after parallel jobs.
* Reading (:meth:`TeacherCache.batches`) yields shuffled batches whose order is a pure function of
  ``(seed, epoch)``: the data position ``(epoch, offset)`` is the whole reader state (what a
  training checkpoint stores). For several processes, each takes a contiguous slice of every
  global batch (``rank``, ``world_size``): the union over ranks is the single-process batch.
  Shards are read lazily (a small LRU of open shards), so caches larger than memory work.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from ..msd import check_schedule, teacher_x0
from ..rng import seeded_noise

__all__ = ["TeacherCache", "TeacherBatch", "build_teacher_cache", "write_safetensors", "INDEX_NAME", "CACHE_VERSION"]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
CACHE_VERSION = 1
_SHARD = "shard_{:05d}.safetensors"


@dataclass
class TeacherBatch:
    """One batch: unit noise ``e``, condition ids ``cond``, the teacher's ``x0`` and the sample indices."""

    e: torch.Tensor
    cond: torch.Tensor
    x0: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())


def _atomic_write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.float64: "F64"}


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file atomically and byte-for-byte reproducibly (sorted names and metadata).

    (The library writer orders ``__metadata__`` through a hash map, so identical runs can give
    different bytes; see ``scripts/train_toy.py``.)
    """
    path = Path(path)
    header: dict = {"__metadata__": {str(k): str(v) for k, v in sorted(metadata.items())}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot store {name} of dtype {t.dtype} in safetensors here")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for data in blobs:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class TeacherCache:
    """A teacher cache folder (see the module docstring). Open an existing one with
    ``TeacherCache(path)``; make one with :meth:`create` (or :func:`build_teacher_cache`)."""

    def __init__(self, root: str | os.PathLike, *, max_open_shards: int = 4):
        self.root = Path(root)
        index = self.root / INDEX_NAME
        if not index.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a teacher cache (no {INDEX_NAME}): build one with "
                "noisecraft.train.build_teacher_cache(...) or `python -m noisecraft train-refiner`"
            )
        self._index = json.loads(index.read_text(encoding="utf-8"))
        if self._index.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{index}: teacher cache version {self._index.get('version')!r}, this NoiseCraft reads "
                f"version {CACHE_VERSION}: rebuild the cache"
            )
        self._load_shard = functools.lru_cache(maxsize=max(1, int(max_open_shards)))(self._read_shard)

    # -- creation ---------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        *,
        shape: Sequence[int],
        conds: Sequence[Any],
        base_seed: int,
        total: int,
        meta: Optional[Mapping[str, Any]] = None,
        shard_size: int = 256,
    ) -> "TeacherCache":
        """Make (or re-open, if it has the same definition) an empty cache folder.

        ``shape`` is one latent's [C, H, W]; ``conds`` the condition list (class labels or prompt
        strings; sample ``i`` gets ``conds[i % len(conds)]``, stored as its index); ``total`` the
        number of samples; ``meta`` what produced the teacher (model, cfg, steps, scheduler, kind,
        sigma_max), checked when a build resumes.
        """
        root = Path(root)
        if int(shard_size) < 1 or int(total) < 1:
            raise ValueError(f"shard_size and total must be >= 1, got {shard_size} and {total}")
        if not conds:
            raise ValueError("conds is empty: give at least one class label or prompt")
        definition = {
            "version": CACHE_VERSION,
            "shape": [int(s) for s in shape],
            "conds": list(conds),
            "base_seed": int(base_seed),
            "total": int(total),
            "shard_size": int(shard_size),
            "meta": json.loads(json.dumps(dict(meta or {}), sort_keys=True)),
        }
        index = root / INDEX_NAME
        if index.is_file():
            old = json.loads(index.read_text(encoding="utf-8"))
            mismatch = [k for k in definition if old.get(k) != definition[k]]
            if mismatch:
                raise ValueError(
                    f"{root} already holds a teacher cache with different {mismatch} (e.g. {mismatch[0]}: "
                    f"{old.get(mismatch[0])!r} there, {definition[mismatch[0]]!r} asked): use another folder "
                    "or delete that one"
                )
            return cls(root)
        root.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(index, {**definition, "shards": []})
        return cls(root)

    # -- index -----------------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return dict(self._index.get("meta", {}))

    @property
    def conds(self) -> list:
        return list(self._index["conds"])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._index["shape"])

    @property
    def shard_size(self) -> int:
        return int(self._index["shard_size"])

    @property
    def total(self) -> int:
        """Samples the cache is defined to hold (see :attr:`complete`)."""
        return int(self._index["total"])

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.shard_size)

    def shard_range(self, k: int) -> range:
        start = k * self.shard_size
        return range(start, min(start + self.shard_size, self.total))

    def shard_path(self, k: int) -> Path:
        return self.root / _SHARD.format(k)

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.num_shards) if not self.shard_path(k).is_file()]

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def reindex(self) -> None:
        """Rewrite ``index.json`` from the shard files present (after parallel build jobs)."""
        shards = [
            {"file": self.shard_path(k).name, "start": self.shard_range(k).start, "count": len(self.shard_range(k))}
            for k in range(self.num_shards)
            if self.shard_path(k).is_file()
        ]
        self._index["shards"] = shards
        _atomic_write_json(self.root / INDEX_NAME, self._index)
        self._load_shard.cache_clear()

    def __len__(self) -> int:
        return self.total

    def sample_noise(self, indices: Sequence[int]) -> torch.Tensor:
        """The unit noise of samples ``indices`` (from their seeds), [n, C, H, W] float32."""
        base = int(self._index["base_seed"])
        return torch.cat([seeded_noise(base + int(i), (1, *self.shape)) for i in indices])

    def sample_conds(self, indices: Sequence[int]) -> torch.Tensor:
        n = len(self._index["conds"])
        return torch.tensor([int(i) % n for i in indices], dtype=torch.long)

    def write_shard(self, k: int, x0: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Path:
        """Store shard ``k`` (samples ``shard_range(k)``) with the teacher's x0 for them, atomically."""
        rng = self.shard_range(k)
        if len(rng) == 0:
            raise ValueError(f"shard {k} is outside this cache ({self.num_shards} shards)")
        idx = list(rng)
        noise = self.sample_noise(idx) if noise is None else noise
        if tuple(x0.shape) != (len(idx), *self.shape) or tuple(noise.shape) != tuple(x0.shape):
            raise ValueError(
                f"shard {k} needs x0 and noise of shape {(len(idx), *self.shape)}, got "
                f"{tuple(x0.shape)} and {tuple(noise.shape)}"
            )
        if not bool(torch.isfinite(x0).all()):
            raise FloatingPointError(f"the teacher produced non-finite x0 for shard {k}: not stored")
        path = self.shard_path(k)
        write_safetensors(
            {
                "noise": noise.to(torch.float32),
                "x0": x0.to(torch.float32),
                "cond": self.sample_conds(idx),
                "seed": torch.tensor([int(self._index["base_seed"]) + i for i in idx], dtype=torch.long),
            },
            path,
            {"noisecraft.kind": "teacher_cache_shard", "start": str(rng.start), "count": str(len(rng))},
        )
        self.reindex()
        return path

    # -- reading ---------------------------------------------------------------------------------
    def _read_shard(self, k: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.shard_path(k)
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher cache {self.root}: shard {path.name} (samples {self.shard_range(k).start}.."
                f"{self.shard_range(k).stop - 1}) is missing: finish the build (build_teacher_cache resumes)"
            )
        data = load_file(str(path), device="cpu")
        n = len(self.shard_range(k))
        for key in ("noise", "x0", "cond"):
            if key not in data or data[key].shape[0] != n:
                raise ValueError(f"{path}: tensor {key!r} is missing or does not hold {n} samples: rebuild this shard")
        return data

    def get(self, indices: Sequence[int] | torch.Tensor) -> TeacherBatch:
        """Samples ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.total):
            raise IndexError(f"sample index outside 0..{self.total - 1}")
        parts: dict[str, list] = {"noise": [], "x0": [], "cond": []}
        shard_of = idx // self.shard_size
        out = {k: torch.empty((idx.numel(), *self.shape) if k != "cond" else (idx.numel(),),
                              dtype=torch.long if k == "cond" else torch.float32) for k in parts}
        for k in torch.unique(shard_of).tolist():
            sel = (shard_of == k).nonzero().flatten()
            local = idx[sel] - k * self.shard_size
            data = self._load_shard(int(k))
            for key in parts:
                out[key][sel] = data[key][local]
        return TeacherBatch(e=out["noise"], cond=out["cond"], x0=out["x0"], index=idx)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """The shuffled sample order of ``epoch``: a pure function of ``(seed, epoch)``."""
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randperm(self.total, generator=g)

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        offset: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[TeacherBatch, tuple[int, int]]]:
        """Endless shuffled batches, starting at the data position ``(epoch, offset)``.

        ``batch_size`` is the *global* batch; with ``world_size > 1`` each rank gets its contiguous
        slice (``batch_size`` must divide evenly). Yields ``(batch, next_position)``: store
        ``next_position`` in a checkpoint and pass it back to resume exactly. An epoch's tail that
        does not fill a batch is skipped (every batch has the same size).
        """
        batch_size, world_size, rank = int(batch_size), int(world_size), int(rank)
        if batch_size < 1 or batch_size > self.total:
            raise ValueError(f"batch size {batch_size} must lie in 1..{self.total} (the cache's sample count)")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(
                f"global batch {batch_size} must split evenly over world_size {world_size} (rank {rank})"
            )
        per = batch_size // world_size
        missing = self.missing_shards()
        if missing:
            raise FileNotFoundError(
                f"teacher cache {self.root} is incomplete: {len(missing)} of {self.num_shards} shards missing "
                f"(first: {self.shard_path(missing[0]).name}); finish the build first"
            )
        while True:
            order = self.epoch_order(seed, epoch)
            while offset + batch_size <= self.total:
                glob = order[offset: offset + batch_size]
                offset += batch_size
                nxt = (epoch, offset) if offset + batch_size <= self.total else (epoch + 1, 0)
                yield self.get(glob[rank * per: (rank + 1) * per]), nxt
            epoch, offset = epoch + 1, 0


def build_teacher_cache(
    root: str | os.PathLike,
    guided_denoiser_for: Callable[[torch.Tensor], Callable],
    *,
    shape: Sequence[int],
    conds: Sequence[Any],
    total: int,
    sigmas,
    kind: str,
    base_seed: int = 0,
    meta: Optional[Mapping[str, Any]] = None,
    shard_size: int = 256,
    batch_size: int = 64,
    shards: Optional[Sequence[int]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> TeacherCache:
    """Produce the teacher cache: guided sampling (``teacher_x0``) of every missing shard.

    ``guided_denoiser_for(cond_ids)`` returns the guided ``D(x, sigma)`` for a batch of condition
    indices (CFG, + PAG, ...). ``sigmas`` is the teacher schedule (N' steps, ends at 0). ``shards``
    restricts the work to some shard numbers (parallel jobs: give each job its own; then
    :meth:`TeacherCache.reindex`). Killed builds resume where they stopped (finished shards are
    kept). ``progress(done_samples, total_samples)`` is called after each micro-batch.
    Cost: 2N' model passes per sample with CFG.
    """
    s = check_schedule(sigmas, "teacher")
    meta = {**dict(meta or {}), "teacher_steps": int(len(s) - 1), "sigma_max": float(s[0]), "kind": str(kind)}
    cache = TeacherCache.create(root, shape=shape, conds=conds, base_seed=base_seed, total=total,
                                meta=meta, shard_size=shard_size)
    todo = [k for k in (range(cache.num_shards) if shards is None else shards) if not cache.shard_path(k).is_file()]
    done, work = 0, sum(len(cache.shard_range(k)) for k in todo)
    for k in todo:
        idx = list(cache.shard_range(k))
        noise = cache.sample_noise(idx)
        cond = cache.sample_conds(idx)
        outs = []
        for a in range(0, len(idx), int(batch_size)):
            e, c = noise[a: a + batch_size], cond[a: a + batch_size]
            outs.append(teacher_x0(guided_denoiser_for(c), e, s, kind).detach().float().cpu())
            done += e.shape[0]
            if progress is not None:
                progress(done, work)
        cache.write_shard(k, torch.cat(outs), noise)
        logger.debug("teacher cache %s: shard %d written", cache.root, k)
    return TeacherCache(cache.root)
