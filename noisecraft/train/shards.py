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
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from ..io import atomic_write_json, clean_stale_temps, ensure_dir, load_safetensors, read_json, write_safetensors
from ..rng import seeded_noise

__all__ = ["ShardedStore", "positioned_batches", "write_safetensors", "INDEX_NAME"]

INDEX_NAME = "index.json"
_SHARD = "shard_{:05d}.safetensors"


def _atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_json(path, payload)


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
            raise ValueError(
                f"{root} already holds {cls._HOLDS} with different {mismatch} (e.g. {mismatch[0]}: "
                f"{old.get(mismatch[0])!r} there, {definition[mismatch[0]]!r} asked): use another folder "
                "or delete that one"
            )
        return cls(root)

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

    def _read_shard(self, k: int) -> dict[str, torch.Tensor]:
        path = self.shard_path(k)
        if not path.is_file():
            raise FileNotFoundError(self._missing_shard_message(k, path))
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
