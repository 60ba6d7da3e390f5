"""The seeded, sharded safetensors store under the teacher cache and the NPNet pairs.

A store folder holds ``index.json`` (its definition: ``shape``, ``conds``, ``base_seed``, ``total``,
``shard_size``, ``meta`` and a list of ``shards``) and ``shard_00000.safetensors`` ... Sample ``i``
has noise ``seeded_noise(base_seed + i, (1, C, H, W))`` and condition id ``i % len(conds)``, so any
shard can be made by any job in any order. Every file is written atomically (:mod:`noisecraft.io`: a
temp file of our own naming, fsynced, ``os.replace``, folder fsynced): a file that exists under its
final name is complete; :meth:`ShardedStore.clean_temps` removes what a killed write left. A corrupt
``index.json`` or shard raises ``ValueError`` naming the file and the fix.

:class:`ShardedStore` is the shared part; :class:`noisecraft.train.TeacherCache` and
:class:`noisecraft.train.PairStore` add their shard contents and wording. Both read batches through
:func:`positioned_batches`: the one batch interface of the training loop (:mod:`noisecraft.train.loop`),
resumable from a data position ``(epoch, offset)``, with per-process slices of every global batch.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from ..io import (ChecksumError, atomic_write_json, clean_stale_temps, ensure_dir, load_safetensors, read_json,
                  verify_json, verify_safetensors, write_safetensors)
from ..rng import seeded_noise

__all__ = ["ShardedStore", "positioned_batches", "write_safetensors", "INDEX_NAME"]

INDEX_NAME = "index.json"
_SHARD = "shard_{:05d}.safetensors"

logger = logging.getLogger(__name__)


def _atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_json(path, payload, digest=True)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of an epoch's shuffle: a pure function of ``(seed, epoch)``."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) & 0x7FFF_FFFF_FFFF_FFFF)


def positioned_batches(order_of: Callable[[int], torch.Tensor], pool: int, get: Callable, batch_size: int, *,
                       epoch: int, offset: int, rank: int, world_size: int) -> Iterator[tuple[Any, tuple[int, int]]]:
    """Endless batches over ``pool`` items from the data position ``(epoch, offset)``; ``order_of(epoch)`` is
    the epoch's shuffled order. ``batch_size`` is the global batch: with ``world_size > 1`` process
    ``rank`` gets its contiguous slice (the union over ranks is the single-process batch). Yields
    ``(get(slice), next_position)``; an epoch's tail that does not fill a batch is skipped."""
    per = batch_size // world_size
    while True:
        order = order_of(epoch)
        while offset + batch_size <= pool:
            glob = order[offset: offset + batch_size]
            offset += batch_size
            nxt = (epoch, offset) if offset + batch_size <= pool else (epoch + 1, 0)
            yield get(glob[rank * per: (rank + 1) * per]), nxt
        epoch, offset = epoch + 1, 0


def check_split(batch_size: int, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
        raise ValueError(f"global batch {batch_size} must split evenly over world_size {world_size} (rank {rank})")


_noticed: set = set()
# shard file -> ((size, mtime_ns, inode), checked) for the files whose checksum this process has checked
# (checked None: the file has none): each file version is read for its checksum once per process
_verified: dict[str, tuple] = {}


def _notice_once(root: Path, kind: str, text: str) -> None:
    """Log ``text`` once per process, store folder and ``kind`` (the notices about files without checksums)."""
    key = (os.path.realpath(root), kind)
    if key not in _noticed:
        _noticed.add(key)
        logger.info("%s", text)


class ShardedStore:
    """An index plus seeded shards (see the module docstring). Subclasses set the wording and the
    tensors every shard must hold, and check their index in :meth:`_check_index`."""

    _HOLDS = "a sharded store"        # "{root} already holds ... with different [...]"
    _FOLDER = "store"                 # "shard k is outside this ..."
    _SHARD_KEYS: tuple[str, ...] = ()  # tensors a shard must hold, one row per sample
    _REBUILD_HINT = "rebuild this shard"

    def __init__(self, root: str | os.PathLike, *, max_open_shards: int = 4):
        self.root = Path(root)
        index = self.root / INDEX_NAME
        if not index.is_file():
            raise FileNotFoundError(self._no_index_message())
        self._index = self._read_index(self.root)
        self._check_index(index)
        self._load_shard = functools.lru_cache(maxsize=max(1, int(max_open_shards)))(self._read_shard)

    _REQUIRED = ("shape", "conds", "base_seed", "total", "shard_size")

    @classmethod
    def _corrupt_fix(cls, root: Path) -> str:
        return f"delete the folder {root} and run the same command again to rebuild it"

    @classmethod
    def _read_index(cls, root: Path) -> dict:
        """``index.json`` as a dict with the common fields; a corrupt one raises ValueError naming it."""
        index = root / INDEX_NAME
        data = read_json(index, what=f"the index of {cls._HOLDS}", fix=cls._corrupt_fix(root))
        missing = [k for k in cls._REQUIRED if k not in data] if isinstance(data, dict) else list(cls._REQUIRED)
        if missing:
            raise ValueError(f"{index} is not an index of {cls._HOLDS} (missing {missing}): "
                             f"{cls._corrupt_fix(root)}")
        if verify_json(index, data, what=f"the index of {cls._HOLDS}", fix=cls._corrupt_fix(root)) is None:
            _notice_once(root, "index", f"{root}: written by an older NoiseCraft without checksums: its files are not "
                               "verified; the index and every shard written from now on carry one")
        return data

    @staticmethod
    def clean_temps(root: str | os.PathLike) -> list[Path]:
        """Remove stale temp files of killed writes in a store folder (see :func:`noisecraft.io.clean_stale_temps`)."""
        return clean_stale_temps(root)

    # -- hooks -----------------------------------------------------------------------------------
    def _no_index_message(self) -> str:
        return f"{self.root} is not a {self._FOLDER} (no {INDEX_NAME})"

    def _check_index(self, index: Path) -> None:
        """Raise if the loaded ``self._index`` is not of the subclass's kind and version."""

    def _missing_shard_message(self, k: int, path: Path) -> str:
        return f"{self.root}: {path.name} is missing"

    # -- creation ---------------------------------------------------------------------------------
    @staticmethod
    def _definition(head: Mapping[str, Any], *, shape: Sequence[int], conds: Sequence[Any], base_seed: int,
                    total: int, shard_size: int, meta: Optional[Mapping[str, Any]]) -> dict:
        """The index's definition: ``head`` (kind, version) first, then the common fields."""
        if int(shard_size) < 1 or int(total) < 1:
            raise ValueError(f"shard_size and total must be >= 1, got {shard_size} and {total}")
        if not conds:
            raise ValueError("conds is empty: give at least one class label or prompt")
        return {
            **head,
            "shape": [int(s) for s in shape],
            "conds": list(conds),
            "base_seed": int(base_seed),
            "total": int(total),
            "shard_size": int(shard_size),
            "meta": json.loads(json.dumps(dict(meta or {}), sort_keys=True)),
        }

    @classmethod
    def _reopen(cls, root: Path, definition: Mapping[str, Any]):
        """The store at ``root`` if it has this definition, None if there is none; raise if it differs."""
        index = root / INDEX_NAME
        if not index.is_file():
            return None
        old = cls._read_index(root)
        mismatch = [k for k in definition if old.get(k) != definition[k]]
        if mismatch:
            raise ValueError(f"{root} already holds {cls._HOLDS} with different {mismatch} ({_differs(old, definition, mismatch[0])}): "
                             "use another folder or delete that one")
        return cls(root)

    @classmethod
    def _ready(cls, root: Path, definition: Mapping[str, Any]):
        """The store at ``root`` if it holds ``definition`` and is complete (its index checked, each shard is
        checked as it is first read), else None: then a build takes the folder's one-writer lock to finish or
        repair it. So runs that only read a finished store take no lock and may share it."""
        store = cls._reopen(Path(root), definition)
        return store if store is not None and store.complete else None

    @classmethod
    def _new(cls, root: Path, definition: Mapping[str, Any]):
        """Make the folder and write an index without shards."""
        ensure_dir(root, None)
        _atomic_write_json(root / INDEX_NAME, {**definition, "shards": []})
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
        """Samples the store is defined to hold (see :attr:`complete`)."""
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

    def __len__(self) -> int:
        return self.total

    def reindex(self) -> None:
        """Rewrite ``index.json`` from the shard files present (after parallel jobs)."""
        self._index["shards"] = [
            {"file": self.shard_path(k).name, "start": self.shard_range(k).start, "count": len(self.shard_range(k))}
            for k in range(self.num_shards) if self.shard_path(k).is_file()
        ]
        _atomic_write_json(self.root / INDEX_NAME, self._index)
        self._load_shard.cache_clear()

    def sample_noise(self, indices: Sequence[int]) -> torch.Tensor:
        """The unit noise of samples ``indices`` (from their seeds), [n, C, H, W] float32."""
        base = int(self._index["base_seed"])
        return torch.cat([seeded_noise(base + int(i), (1, *self.shape)) for i in indices])

    def sample_conds(self, indices: Sequence[int]) -> torch.Tensor:
        n = len(self._index["conds"])
        return torch.tensor([int(i) % n for i in indices], dtype=torch.long)

    def _sample_seeds(self, indices: Sequence[int]) -> torch.Tensor:
        base = int(self._index["base_seed"])
        return torch.tensor([base + int(i) for i in indices], dtype=torch.long)

    # -- shards ----------------------------------------------------------------------------------
    def _shard_indices(self, k: int) -> list[int]:
        """The samples of shard ``k``; raise if there is no such shard."""
        rng = self.shard_range(k)
        if len(rng) == 0:
            raise ValueError(f"shard {k} is outside this {self._FOLDER} ({self.num_shards} shards)")
        return list(rng)

    # -- checksums -------------------------------------------------------------------------------
    def verify_shard(self, k: int) -> None:
        """Check shard ``k`` against the checksum recorded when it was written (once per process and file
        version); :class:`~noisecraft.io.ChecksumError` naming the file and the fix if it does not match."""
        path = self.shard_path(k)
        st = path.stat()
        key, stamp = os.path.realpath(path), (st.st_size, st.st_mtime_ns, st.st_ino)
        if _verified.get(key, (None,))[0] == stamp:
            return
        ok = verify_safetensors(path, what=f"shard {k} of {self.root}", fix=self._REBUILD_HINT)
        _verified[key] = (stamp, ok)

    def _on_disk(self) -> bool:
        return self.root is not None and getattr(self, "_memory", None) is None

    def verify(self) -> None:
        """Check every shard present before the data is used (one read of each: sha256 at about 1.7 GB/s);
        raise :class:`~noisecraft.io.ChecksumError` for the first damaged one. Nothing to do in memory."""
        if not self._on_disk():
            return
        unverifiable = 0
        for k in range(self.num_shards):
            if self.shard_path(k).is_file():
                self.verify_shard(k)
                unverifiable += _verified[os.path.realpath(self.shard_path(k))][1] is None
        if unverifiable:
            _notice_once(self.root, "shards", f"{self.root}: {unverifiable} shard(s) written by an older NoiseCraft without "
                                    "checksums are not verified; shards written from now on carry one")

    def damaged_path(self, k: int) -> Path:
        """Where a reader sets shard ``k`` aside when its checksum fails (the build then remakes the shard)."""
        return self.shard_path(k).with_name(self.shard_path(k).name + ".damaged")

    def remove_damaged(self, shards: Optional[Sequence[int]] = None) -> list[int]:
        """Before a build: delete the shards present (of ``shards``, default all) whose checksum fails, and the
        ones a reader set aside as damaged, each logged, so that the build remakes them; returns their numbers."""
        bad = []
        for k in (range(self.num_shards) if shards is None else shards):
            if not self._on_disk():
                break
            aside = self.damaged_path(k)
            if aside.is_file():
                logger.warning("%s: %s was set aside as damaged by a reader: remaking it (its samples are a "
                               "function of their seeds)", self.root, self.shard_path(k).name)
                aside.unlink()
                bad.append(k)
            if not self.shard_path(k).is_file():
                continue
            try:
                self.verify_shard(k)
            except ChecksumError as exc:
                logger.warning("%s: %s is damaged (its checksum does not match): remaking it (its samples are a "
                               "function of their seeds)", self.root, exc.path.name)
                exc.path.unlink()
                bad.append(k)
        if bad:
            self._load_shard.cache_clear()
        return bad

    def _read_shard(self, k: int) -> dict[str, torch.Tensor]:
        path = self.shard_path(k)
        if not path.is_file():
            raise FileNotFoundError(self._missing_shard_message(k, path))
        try:  # the first read of each shard (file version) in this process checks its checksum
            self.verify_shard(k)
        except ChecksumError as exc:  # set aside, so that the next build (a rerun) remakes just this shard
            os.replace(path, self.damaged_path(k))
            raise ChecksumError(path, f"{exc} (set aside as {self.damaged_path(k).name})") from None
        data = load_safetensors(path, what=f"shard {k} of {self.root}", fix=self._REBUILD_HINT)
        n = len(self.shard_range(k))
        for key in self._SHARD_KEYS:
            if key not in data or data[key].shape[0] != n:
                raise ValueError(f"{path}: tensor {key!r} is missing or does not hold {n} samples: {self._REBUILD_HINT}")
        return data

    def _indices(self, indices: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.total):
            raise IndexError(f"{what} index outside 0..{self.total - 1}")
        return idx

    def _gather(self, idx: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fill ``out[key][j]`` with ``key`` of sample ``idx[j]``, reading each shard once."""
        shard_of = idx // self.shard_size
        for k in torch.unique(shard_of).tolist():
            sel = (shard_of == k).nonzero().flatten()
            local = idx[sel] - k * self.shard_size
            data = self._load_shard(int(k))
            for key in out:
                out[key][sel] = data[key][local]
        return out


def _differs(old: Mapping[str, Any], new: Mapping[str, Any], key: str) -> str:
    """What differs in ``key`` between a store's definition and the one asked, in words: the keys of a dict that
    differ (a teacher's settings), the first differing item of a list (a prompt set), else both values."""
    a, b = old.get(key), new[key]
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return "; ".join(f"{key}.{k}: {a.get(k)!r} there, {b.get(k)!r} asked" for k in keys[:4])
    if isinstance(a, list) and isinstance(b, list):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        what = (f"item {first}: {a[first]!r} there, {b[first]!r} asked" if first < min(len(a), len(b))
                else "the same items")
        return f"{key}: {len(a)} there, {len(b)} asked; {what}"
    return f"e.g. {key}: {a!r} there, {b!r} asked"
