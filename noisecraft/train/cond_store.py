"""Prompt encodings on disk, next to a teacher cache: what lets training scale in the prompt count.

Paper scale is 50K to 181K prompts; one SDXL encoding is 77 x 2048 values (315 KB in bf16, 57 GB for 181K
prompts) and one SD3 encoding with T5 is (77 + 256) x 4096 (2.7 MB), so no host may hold them all. A
:class:`CondStore` keeps them as safetensors shards of ``chunk`` prompts each, written while the cache is
built (encoded a chunk at a time) and read a batch's rows at a time (memory-mapped slices: only those rows
are read). Host memory and device memory do not grow with the number of prompts.

Layout, in the cache folder::

    conds.json                 {"kind": "noisecraft_conds", "version", "count", "chunk", "keys": {name: [shape]},
                                "dtype", "prompts_sha256", "sha256"}
    conds_00000.safetensors    every key's rows [start, start + n): "cond" [n, L, D] and the family's extra
                               inputs ("text_embeds" [n, W] + "time_ids" [n, 6] for SDXL,
                               "pooled_projections" [n, W] for SD3)
    conds_uncond.safetensors   the same keys, one row: the unconditional (negative) prompt

Each file records its checksum (:mod:`noisecraft.io`) and is checked at its first read in a process; a
build resumes at the first missing chunk (finished ones are kept) and remakes a damaged one. The format is
the same whichever host wrote it (the CLI with the folder's text encoders, ComfyUI with its CLIP input).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..hosts.families import same_token_count  # (here for the nodes and the store's readers: one function)
from ..io import (ChecksumError, atomic_write_json, ensure_dir, read_json, verify_json, verify_safetensors,
                  write_safetensors)

__all__ = ["CondStore", "build_conds", "conds_for", "prompts_digest", "CONDS_INDEX", "same_token_count",
           "rows_from_conditioning", "conditioning_from_rows"]

CONDS_INDEX = "conds.json"
CONDS_VERSION = 1
_CHUNK_NAME = "conds_{:05d}.safetensors"
_UNCOND_NAME = "conds_uncond.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CondStore:
    """The prompt encodings of a cache folder (see the module docstring): ``rows(ids)`` and ``uncond()``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        index = self.root / CONDS_INDEX
        fix = "run the build again (it re-encodes the prompts)"
        data = read_json(index, what="the prompt encodings' index", fix=fix)
        if not isinstance(data, dict) or data.get("kind") != "noisecraft_conds" or data.get("version") != CONDS_VERSION:
            raise ValueError(f"{index} is not a NoiseCraft prompt-encoding index of version {CONDS_VERSION}: {fix}")
        verify_json(index, data, what="the prompt encodings' index", fix=fix)
        self._index = data
        self._checked: dict[int, tuple] = {}

    @property
    def count(self) -> int:
        return int(self._index["count"])

    @property
    def chunk(self) -> int:
        return int(self._index["chunk"])

    @property
    def keys(self) -> dict:
        return {k: tuple(v) for k, v in self._index["keys"].items()}

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self._index["dtype"]]

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple:
        """``(count, *shape of one "cond" row)``, as a [P, L, D] tensor of encodings would have."""
        return (self.count, *self.keys["cond"])

    def chunk_path(self, j: int) -> Path:
        return self.root / _CHUNK_NAME.format(j)

    @property
    def num_chunks(self) -> int:
        return -(-self.count // self.chunk)

    def _checked_file(self, j: int, path: Path) -> Path:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the prompt encodings are incomplete; run the build again")
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        if self._checked.get(j) != stamp:
            verify_safetensors(path, what="prompt encodings", fix="run the build again: it re-encodes that chunk")
            self._checked[j] = stamp
        return path

    def rows(self, ids: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """``{key: [len(ids), ...]}`` for the prompts ``ids`` (in that order), read from the memory-mapped
        shards: only these rows are read. Chunks written by ComfyUI may hold "cond" rows of other token counts
        (a prompt over 75 tokens is 154 tokens there): a batch mixing them gets every row repeated to the least
        common multiple of its token counts, as ComfyUI batches such prompts itself (``CONDCrossAttn.concat``)."""
        from safetensors import safe_open

        idx = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.count):
            raise IndexError(f"prompt ids must lie in 0..{self.count - 1}, got {idx.tolist()[:8]}")
        got: dict[str, list] = {k: [None] * idx.numel() for k in self.keys}
        chunk_of = idx // self.chunk
        for j in torch.unique(chunk_of).tolist():
            sel = (chunk_of == j).nonzero().flatten().tolist()
            path = self._checked_file(int(j), self.chunk_path(int(j)))
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in got:
                    sl = f.get_slice(k)
                    for pos in sel:
                        r = int(idx[pos]) - int(j) * self.chunk
                        got[k][pos] = sl[r: r + 1]
        if not idx.numel():
            return {k: torch.empty((0, *shape), dtype=self.dtype) for k, shape in self.keys.items()}
        got["cond"] = same_token_count(got["cond"])
        return {k: torch.cat(v).to(self.dtype) for k, v in got.items()}

    def uncond(self) -> dict[str, torch.Tensor]:
        """``{key: [1, ...]}``: the unconditional prompt's encoding."""
        path = self._checked_file(-1, self.root / _UNCOND_NAME)
        from ..io import load_safetensors

        return load_safetensors(path, what="the unconditional prompt's encoding")


Encoder = Callable[[list], tuple]  # texts -> ({key: [len(texts), ...]}, {key: [1, ...]} of the negative prompt)


def build_conds(root: str | os.PathLike, prompts: Sequence[str], encode: Encoder, *, chunk: int = 256,
                dtype: torch.dtype = torch.float32, progress: Optional[Callable[[int, int], None]] = None) -> CondStore:
    """Encode ``prompts`` into ``root`` a ``chunk`` at a time with the host's ``encode(texts) -> (rows, uncond)``
    (``"cond"``: the token states; the family's extra inputs by their network names), keeping the negative
    prompt's row once; resumes at the first missing chunk and remakes a damaged one. The caller holds the
    folder's one-writer lock."""
    root = Path(root)
    chunk = int(chunk)
    if chunk < 1 or not prompts:
        raise ValueError(f"build_conds needs at least one prompt and chunk >= 1, got {len(prompts)} and {chunk}")
    name = {v: k for k, v in _DTYPES.items()}.get(dtype)
    if name is None:
        raise ValueError(f"prompt encodings are stored as {', '.join(_DTYPES)}, got {dtype}")
    ensure_dir(root, None)
    index = root / CONDS_INDEX
    store = first_rows = None
    if index.is_file():
        try:
            store = CondStore(root)
        except ChecksumError:
            store = None
        if store is not None and (store._index.get("prompts_sha256") != prompts_digest(prompts)
                                  or store.chunk != chunk or store._index["dtype"] != name):
            store = None  # another prompt set or layout (the cache's definition decides; here: encode again)
    if store is None:
        first_rows, uncond = encode(list(prompts[:chunk]))
        uncond = {k: v[:1].to(dtype) for k, v in uncond.items()}
        if "cond" not in uncond:
            raise ValueError(f"the encoder must return the token states as 'cond', got {sorted(uncond)}")
        write_safetensors(uncond, root / _UNCOND_NAME, {"noisecraft.kind": "conds_uncond"}, digest=True)
        atomic_write_json(index, {"kind": "noisecraft_conds", "version": CONDS_VERSION, "count": len(prompts),
                                  "chunk": chunk, "dtype": name, "prompts_sha256": prompts_digest(prompts),
                                  "keys": {k: list(v.shape[1:]) for k, v in sorted(uncond.items())}}, digest=True)
        for old in root.glob("conds_[0-9]*.safetensors"):
            old.unlink()
        store = CondStore(root)
    keys = store.keys
    for j in range(store.num_chunks):
        path = store.chunk_path(j)
        if path.is_file():
            try:
                verify_safetensors(path)
                continue
            except ChecksumError:
                path.unlink()
        texts = list(prompts[j * chunk: (j + 1) * chunk])
        enc, first_rows = (first_rows if j == 0 and first_rows is not None else encode(texts)[0]), None
        bad = {k: tuple(enc[k].shape) for k in keys if k not in enc or enc[k].shape[0] != len(texts)
               or tuple(enc[k].shape[2 if k == "cond" else 1:]) != keys[k][1 if k == "cond" else 0:]}
        if bad or set(enc) != set(keys):
            raise ValueError(f"the encoder returned {({k: tuple(v.shape) for k, v in enc.items()})} for {len(texts)} "
                             f"prompts; expected the keys and row shapes {keys} (any token count for 'cond')")
        write_safetensors({k: v.detach().to("cpu", dtype) for k, v in enc.items()}, path,
                          {"noisecraft.kind": "conds_chunk", "start": str(j * chunk), "count": str(len(texts))},
                          digest=True)
        if progress is not None:
            progress(min((j + 1) * chunk, len(prompts)), len(prompts))
    return store


def prompts_digest(prompts: Sequence[str]) -> str:
    """The sha256 of the prompt list (one per line), recorded in ``conds.json``."""
    import hashlib

    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def conds_for(root: str | os.PathLike, prompts: Sequence[str], encode: Encoder, *, chunk: int = 256,
              dtype: torch.dtype = torch.float32, progress: Optional[Callable[[int, int], None]] = None) -> CondStore:
    """The cache folder's prompt encodings of ``prompts``: read as they are when complete (no lock: runs that
    train from a finished cache share it), else encoded under the folder's one-writer lock
    (:func:`build_conds`). A folder holding the encodings of another prompt set is refused."""
    from ..locks import folder_lock

    root = Path(root)
    digest = prompts_digest(prompts)
    if (root / CONDS_INDEX).is_file():
        store = CondStore(root)
        if store._index.get("prompts_sha256") != digest:
            raise ValueError(f"{root} holds the prompt encodings of another prompt set ({store.count} prompts, "
                             f"{len(prompts)} given): use another cache folder, or delete that one")
        if all(store.chunk_path(j).is_file() for j in range(store.num_chunks)):
            return store
    with folder_lock(root, what="teacher cache", fix="wait for that build to finish (once complete, any number of "
                                                     "runs can train from the cache at the same time), or give "
                                                     "another cache folder"):
        return build_conds(root, prompts, encode, chunk=chunk, dtype=dtype, progress=progress)


# -- ComfyUI's CONDITIONING <-> stored rows ----------------------------------------------------------------
# The store names the family's extra inputs as the diffusers networks do (the CLI's host passes them as they
# are); ComfyUI's conditioning dict names them its own way. These two functions are the one mapping, used by
# the nodes (nodes/train_store.py) to write and read a cache, and by the tests without ComfyUI.

SDXL_SIZE_KEYS = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")  # = diffusers' time_ids


def rows_from_conditioning(entries: Sequence, family: str, latent_hw: Sequence[int]) -> dict[str, torch.Tensor]:
    """The stored rows of ComfyUI CONDITIONING entries (one ``[cond [1, L, D], dict]`` per prompt): ``"cond"``
    (repeated to one token count, :func:`same_token_count`) and, by ``family``, SDXL's ``"text_embeds"`` (the
    ``pooled_output``) and ``"time_ids"`` (the size keys in diffusers' order, with the defaults ComfyUI's
    sampling gives an entry without them: the latent's size x 8, crop 0, target = size), SD3's
    ``"pooled_projections"``; ``"sd"`` (SD1.x/SD2.x) keeps only ``"cond"``. ``latent_hw``: the latent's H, W."""
    conds = same_token_count([torch.as_tensor(e[0]).reshape(1, *e[0].shape[-2:]) for e in entries])
    rows = {"cond": torch.cat(conds)}
    extras = [dict(e[1]) if len(e) > 1 else {} for e in entries]
    if family in ("sdxl", "sd3"):
        missing = [i for i, d in enumerate(extras) if not torch.is_tensor(d.get("pooled_output"))]
        if missing:
            raise ValueError(f"prompt {missing[0]}'s conditioning has no pooled_output, which {family} needs: encode "
                             f"the prompts with this model's CLIP (CLIP Text Encode / the clip input)")
        pooled = torch.cat([d["pooled_output"].reshape(1, -1) for d in extras])
        rows["text_embeds" if family == "sdxl" else "pooled_projections"] = pooled
    if family == "sdxl":
        h, w = int(latent_hw[0]) * 8, int(latent_hw[1]) * 8

        def ids(d):
            height, width = d.get("height", h), d.get("width", w)
            return [height, width, d.get("crop_h", 0), d.get("crop_w", 0), d.get("target_height", height),
                    d.get("target_width", width)]

        rows["time_ids"] = torch.tensor([ids(d) for d in extras], dtype=torch.float32)
    elif family not in ("sd", "sd3"):
        raise ValueError(f"prompt encodings are stored for the families sd, sdxl and sd3, got {family!r}")
    return rows


def conditioning_from_rows(rows: dict[str, torch.Tensor]) -> list:
    """ONE ComfyUI CONDITIONING entry for a batch of stored rows (``[cond [n, L, D], dict]``: ComfyUI gives row
    ``i`` to sample ``i`` of a batch of n), the inverse of :func:`rows_from_conditioning`, whichever host wrote
    the rows: ``text_embeds`` / ``pooled_projections`` become ``pooled_output``, ``time_ids`` the six size keys
    (one value for the batch: rows with other sizes need batches of their own)."""
    rows = dict(rows)
    cond = rows.pop("cond")
    extra: dict = {}
    pooled = rows.pop("text_embeds", None)
    pooled = rows.pop("pooled_projections", pooled)
    if pooled is not None:
        extra["pooled_output"] = pooled
    ids = rows.pop("time_ids", None)
    if ids is not None:
        if not bool((ids == ids[:1]).all()):
            raise ValueError("a batch of SDXL rows with different size conditioning (time_ids) cannot share one "
                             "ComfyUI conditioning entry: group the rows by their time_ids")
        extra.update({k: int(round(float(v))) for k, v in zip(SDXL_SIZE_KEYS, ids[0].tolist())})
    if rows:
        raise ValueError(f"stored prompt encodings with inputs {sorted(rows)} have no ComfyUI equivalent here")
    return [cond, extra]
