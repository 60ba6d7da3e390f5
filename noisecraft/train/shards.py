"""The seeded, sharded safetensors store under the teacher cache and the NPNet pairs.

A store folder holds ``index.json`` (its definition: ``shape``, ``conds``, ``base_seed``, ``total``,
``shard_size``, ``meta`` and a list of ``shards``) and ``shard_00000.safetensors`` ... Sample ``i``
has noise ``seeded_noise(base_seed + i, (1, C, H, W))`` and condition id ``i % len(conds)``, so any
shard can be made by any job in any order. Every file is written under a temporary name and renamed
(``os.replace``): a file that exists under its final name is complete.

:class:`ShardedStore` is the shared part; :class:`noisecraft.train.TeacherCache` and
:class:`noisecraft.train.PairStore` add their shard contents, batches and wording.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ..rng import seeded_noise

__all__ = ["ShardedStore", "write_safetensors", "INDEX_NAME"]

INDEX_NAME = "index.json"
_SHARD = "shard_{:05d}.safetensors"


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


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of an epoch's shuffle: a pure function of ``(seed, epoch)``."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) & 0x7FFF_FFFF_FFFF_FFFF)


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
        self._index = json.loads(index.read_text(encoding="utf-8"))
        self._check_index(index)
        self._load_shard = functools.lru_cache(maxsize=max(1, int(max_open_shards)))(self._read_shard)

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
        old = json.loads(index.read_text(encoding="utf-8"))
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
        root.mkdir(parents=True, exist_ok=True)
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
        from safetensors.torch import load_file

        path = self.shard_path(k)
        if not path.is_file():
            raise FileNotFoundError(self._missing_shard_message(k, path))
        data = load_file(str(path), device="cpu")
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
