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

  A cache built with a ``guidance_range`` (guidance-scale control, :mod:`noisecraft.guidance_embed`) has
  ``meta["guidance_range"] = [lo, hi]`` and a ``"guidance"`` [n] float32 tensor per shard: sample ``i``'s
  teacher CFG scale, :func:`~noisecraft.guidance_embed.scale_draws` of ``(base_seed, i)`` (reproducible,
  any shard by any job, resumable); the teacher guides each sample with its own scale and batches carry
  it (``TeacherBatch.guidance``; None for a cache without a range, whose files are unchanged).

* Sample ``i`` is fully defined by the cache's base seed and condition list: its noise is
  ``seeded_noise(base_seed + i, (1, C, H, W))`` (ComfyUI's ``RandomNoise(seed)`` for a batch of one)
  and its condition is ``conds[i % len(conds)]``. So shard ``k`` (samples ``k * shard_size ...``) can
  be produced by any job, in any order, and a build that was killed restarts at the first
  missing shard. The noise is stored as well (the reader never regenerates it).
* Every file is written atomically (:mod:`noisecraft.io`: a temp file of our own naming, fsynced,
  renamed, folder fsynced): a shard or index that exists under its final name is complete, and a
  build that starts or resumes removes the temp files a killed one left. The index is rewritten after each shard from a scan of
  the folder; :meth:`TeacherCache.reindex` rebuilds it after parallel jobs.
* Reading (:meth:`TeacherCache.batches`) yields shuffled batches whose order is a pure function of
  ``(seed, epoch)``: the data position ``(epoch, offset)`` is the whole reader state (what a
  training checkpoint stores). For several processes, each takes a contiguous slice of every
  global batch (``rank``, ``world_size``): the union over ranks is the single-process batch.
  Shards are read lazily (a small LRU of open shards), so caches larger than memory work.
* Filtered (:meth:`TeacherCache.subset`, made by :func:`noisecraft.train.teacher_filter.filter_teacher_cache`):
  a view of some stored samples as a cache of its own (sample ``i`` = stored sample ``keep[i]``; the
  ``keep`` list and the filter record in its index); no shard is copied or rewritten, and batches,
  positions and resume are the same code as for the whole cache.
* In memory (:meth:`TeacherCache.in_memory`): the same store without a folder, for a teacher that
  lives in one process (the ComfyUI Build Teacher Cache node): the given noise, condition ids and
  x0 form one shard, so :meth:`TeacherCache.batches` (and a training checkpoint's data position)
  is the same code and the same order as for a folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from ..locks import folder_lock
from ..msd import check_schedule, teacher_x0
from ..solvers import DEFAULT_SAMPLER, check_sampler
from .shards import INDEX_NAME, ShardedStore, check_split, epoch_generator, positioned_batches, write_safetensors

__all__ = ["TeacherCache", "TeacherBatch", "build_teacher_cache", "teacher_meta", "per_sample_teacher",
           "write_safetensors", "INDEX_NAME", "CACHE_VERSION"]

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class ShardBatch:
    """What a batch of a sharded store holds: unit noise ``e``, condition ids ``cond`` and the sample indices
    (:class:`TeacherBatch` adds the teacher's ``x0``, the NPNet pairs' batch its ``target``)."""

    e: torch.Tensor
    cond: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())


@dataclass
class TeacherBatch(ShardBatch):
    """One batch: unit noise ``e``, condition ids ``cond``, the teacher's ``x0`` and the sample indices
    (and the teacher's per-sample CFG scale ``guidance`` [n] for a guidance-range cache, else None)."""

    x0: torch.Tensor
    guidance: Optional[torch.Tensor] = None


class TeacherCache(ShardedStore):
    """A teacher cache folder (see the module docstring). Open an existing one with
    ``TeacherCache(path)``; make one with :meth:`create` (or :func:`build_teacher_cache`)."""

    _HOLDS = "a teacher cache"
    _FOLDER = "cache"
    _SHARD_KEYS = ("noise", "x0", "cond")

    @property
    def guidance_range(self) -> Optional[tuple[float, float]]:
        """``(lo, hi)`` of the teachers' CFG scales for a guidance-range cache, else None."""
        r = self.meta.get("guidance_range")
        return None if r is None else (float(r[0]), float(r[1]))

    def sample_guidance(self, indices: Sequence[int]) -> torch.Tensor:
        """The teacher CFG scale of samples ``indices`` (float32 [n]); needs a guidance-range cache."""
        from ..guidance_embed import scale_draws

        if self.guidance_range is None:
            raise ValueError(f"teacher cache {self.root} has no guidance range: it was built with one CFG scale")
        return scale_draws(indices, int(self._index["base_seed"]), self.guidance_range)
    _REBUILD_HINT = ("run the build again (train-refiner with the same cache folder, or build_teacher_cache): it "
                     "remakes just that shard")

    def _no_index_message(self) -> str:
        return (
            f"{self.root} is not a teacher cache (no {INDEX_NAME}): build one with "
            "noisecraft.train.build_teacher_cache(...) or `python -m noisecraft train-refiner`"
        )

    def _check_index(self, index: Path) -> None:
        if self._index.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{index}: teacher cache version {self._index.get('version')!r}, this NoiseCraft reads "
                f"version {CACHE_VERSION}: rebuild the cache"
            )

    @classmethod
    def _corrupt_fix(cls, root: Path) -> str:
        return f"delete the folder {root} and run the build again (train-refiner / build_teacher_cache remakes it)"

    def _missing_shard_message(self, k: int, path: Path) -> str:
        return (
            f"teacher cache {self.root}: shard {path.name} (samples {self.shard_range(k).start}.."
            f"{self.shard_range(k).stop - 1}) is missing: finish the build (build_teacher_cache resumes)"
        )

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
        definition = cls._definition({"version": CACHE_VERSION}, shape=shape, conds=conds, base_seed=base_seed,
                                     total=total, shard_size=shard_size, meta=meta)
        cache = cls._reopen(root, definition)
        return cls._new(root, definition) if cache is None else cache

    @classmethod
    def ready(cls, root: str | os.PathLike, *, shape: Sequence[int], conds: Sequence[Any], base_seed: int, total: int,
              meta: Optional[Mapping[str, Any]] = None, shard_size: int = 256) -> Optional["TeacherCache"]:
        """The cache at ``root`` if it has this definition (else ``ValueError``, as :meth:`create`), is complete
        and sound (every shard's checksum); None when a build has work to do there."""
        definition = cls._definition({"version": CACHE_VERSION}, shape=shape, conds=conds, base_seed=base_seed,
                                     total=total, shard_size=shard_size, meta=meta)
        return cls._ready(Path(root), definition)

    @classmethod
    def in_memory(cls, noise: torch.Tensor, x0: torch.Tensor, cond: torch.Tensor, *, conds: Sequence[Any],
                  meta: Optional[Mapping[str, Any]] = None, guidance: Optional[torch.Tensor] = None) -> "TeacherCache":
        """A cache held in memory (no folder): sample ``i`` is ``(noise[i], cond[i], x0[i])``, ``cond[i]``
        an index into ``conds`` (``guidance[i]`` its teacher's CFG scale, with ``meta["guidance_range"]``).
        Reading (:meth:`get`, :meth:`batches`) is the folder cache's code."""
        n = int(noise.shape[0]) if torch.is_tensor(noise) and noise.ndim >= 2 else 0
        if n < 1 or not torch.is_tensor(x0) or tuple(x0.shape) != tuple(noise.shape):
            raise ValueError(f"an in-memory teacher cache needs noise and x0 of one shape [n >= 1, C, H, W], got "
                             f"{tuple(getattr(noise, 'shape', ()))} and {tuple(getattr(x0, 'shape', ()))}")
        cond = torch.as_tensor(cond, dtype=torch.long).reshape(-1).cpu()
        if cond.numel() != n or (n and (int(cond.min()) < 0 or int(cond.max()) >= len(conds))):
            raise ValueError(f"an in-memory teacher cache needs {n} condition ids in 0..{len(conds) - 1}, got "
                             f"{cond.tolist()[:8]}")
        if not bool(torch.isfinite(x0).all()) or not bool(torch.isfinite(noise).all()):
            raise FloatingPointError("the teacher cache's noise or x0 contain NaN/inf: not stored")
        self = cls.__new__(cls)
        self.root = None
        self._index = {**cls._definition({"version": CACHE_VERSION}, shape=noise.shape[1:], conds=conds,
                                          base_seed=0, total=n, shard_size=n, meta=meta), "shards": []}
        data = {"noise": noise.detach().to("cpu", torch.float32), "x0": x0.detach().to("cpu", torch.float32),
                "cond": cond}
        if (guidance is None) != (self.guidance_range is None):
            raise ValueError("an in-memory teacher cache with per-sample CFG scales needs both guidance [n] and "
                             "meta['guidance_range'] (or neither)")
        if guidance is not None:
            data["guidance"] = torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).cpu()
            if data["guidance"].numel() != n:
                raise ValueError(f"an in-memory teacher cache needs {n} guidance scales, got {data['guidance'].numel()}")
        self._load_shard = lambda k: data
        return self

    @property
    def is_in_memory(self) -> bool:
        """True for a cache made by :meth:`in_memory` (no folder)."""
        return self.root is None

    def missing_shards(self) -> list[int]:
        if self._source is not None:  # a filtered view: its store's shards
            return self._source.missing_shards()
        return [] if self.root is None else super().missing_shards()

    # -- filtered views (noisecraft.train.teacher_filter) -------------------------------------------
    _source: Optional["TeacherCache"] = None  # the store a filtered view reads
    _keep: Optional[torch.Tensor] = None      # view sample i = stored sample _keep[i]

    def subset(self, keep: Sequence[int] | torch.Tensor, record: Mapping[str, Any]) -> "TeacherCache":
        """A view of the stored samples ``keep`` (distinct indices) as a cache of ``len(keep)`` samples:
        sample ``i`` of the view is stored sample ``keep[i]``; nothing is copied. Its index holds ``keep``
        and the filter ``record`` (also ``meta["filter"]``, so the trainer records it); :meth:`get`,
        :meth:`batches` and a training checkpoint's data position work on it as on any cache."""
        idx = self._indices(keep, "kept sample")
        if idx.numel() < 1 or torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"a filtered teacher cache needs at least one kept sample and no repeats, got "
                             f"{idx.numel()} indices ({torch.unique(idx).numel()} distinct)")
        source, stored = (self, idx) if self._source is None else (self._source, self._keep[idx])
        record = json.loads(json.dumps(dict(record), sort_keys=True))
        view = copy.copy(self)
        view._source, view._keep = source, stored
        view._index = {**self._index, "total": int(idx.numel()), "keep": stored.tolist(), "filter": record,
                       "meta": {**self.meta, "filter": record}}
        return view

    @property
    def filter(self) -> Optional[dict]:
        """The filter record of a filtered view (scorer, kept N of M, threshold, ...); None for a whole cache."""
        return None if self._source is None else dict(self._index["filter"])

    @property
    def kept_from(self) -> torch.Tensor:
        """The stored sample index of each sample of this cache (``arange(total)`` for a whole cache)."""
        return torch.arange(self.total) if self._keep is None else self._keep.clone()

    def verify(self) -> None:
        if self._source is not None:  # a filtered view: the shards of the store it reads
            return self._source.verify()
        return super().verify()

    def reindex(self) -> None:
        if self._source is not None:
            raise ValueError("a filtered teacher cache is a view: reindex the cache it was filtered from")
        super().reindex()

    # -- shards ----------------------------------------------------------------------------------
    def write_shard(self, k: int, x0: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Path:
        """Store shard ``k`` (samples ``shard_range(k)``) with the teacher's x0 for them, atomically."""
        if self.root is None or self._source is not None:
            raise ValueError("an in-memory or filtered teacher cache has no folder to write shards to: build a folder "
                             "cache with TeacherCache.create(...) / build_teacher_cache(...)")
        idx = self._shard_indices(k)
        noise = self.sample_noise(idx) if noise is None else noise
        if tuple(x0.shape) != (len(idx), *self.shape) or tuple(noise.shape) != tuple(x0.shape):
            raise ValueError(
                f"shard {k} needs x0 and noise of shape {(len(idx), *self.shape)}, got "
                f"{tuple(x0.shape)} and {tuple(noise.shape)}"
            )
        if not bool(torch.isfinite(x0).all()):
            raise FloatingPointError(f"the teacher produced non-finite x0 for shard {k}: not stored")
        path = self.shard_path(k)
        tensors = {
            "noise": noise.to(torch.float32),
            "x0": x0.to(torch.float32),
            "cond": self.sample_conds(idx),
            "seed": self._sample_seeds(idx),
        }
        if self.guidance_range is not None:
            tensors["guidance"] = self.sample_guidance(idx)
        write_safetensors(
            tensors,
            path,
            {"noisecraft.kind": "teacher_cache_shard", "start": str(idx[0]), "count": str(len(idx))},
            digest=True,
        )
        self.reindex()
        return path

    # -- reading ---------------------------------------------------------------------------------
    def get(self, indices: Sequence[int] | torch.Tensor) -> TeacherBatch:
        """Samples ``indices`` (in that order)."""
        idx = self._indices(indices, "sample")
        if self._source is not None:  # a filtered view: the stored samples, numbered as in the view
            batch = self._source.get(self._keep[idx])
            batch.index = idx
            return batch
        keys = ("noise", "x0", "cond") + (("guidance",) if self.guidance_range is not None else ())
        out = self._gather(idx, {k: torch.empty((idx.numel(), *self.shape) if k in ("noise", "x0") else (idx.numel(),),
                                                dtype=torch.long if k == "cond" else torch.float32)
                                 for k in keys})
        return TeacherBatch(e=out["noise"], cond=out["cond"], x0=out["x0"], index=idx, guidance=out.get("guidance"))

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """The shuffled sample order of ``epoch``: a pure function of ``(seed, epoch)``."""
        return torch.randperm(self.total, generator=epoch_generator(seed, epoch))

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
        check_split(batch_size, rank, world_size)
        missing = self.missing_shards()
        if missing:
            raise FileNotFoundError(
                f"teacher cache {self.root} is incomplete: {len(missing)} of {self.num_shards} shards missing "
                f"(first: {self.shard_path(missing[0]).name}); finish the build first"
            )
        yield from positioned_batches(lambda ep: self.epoch_order(seed, ep), self.total, self.get, batch_size,
                                      epoch=epoch, offset=offset, rank=rank, world_size=world_size)


_BUSY_FIX = ("wait for that build to finish (once complete, any number of runs can train from the cache at the "
             "same time), or give another cache folder")


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
    guidance_range: Optional[Sequence[float]] = None,
    sampler: str = DEFAULT_SAMPLER,
) -> TeacherCache:
    """Produce the teacher cache: guided sampling (``teacher_x0``) of every missing shard.

    ``guided_denoiser_for(cond_ids)`` returns the guided ``D(x, sigma)`` for a batch of condition
    indices (CFG, + PAG, ...). ``sigmas`` is the teacher schedule (N' steps, ends at 0). ``shards``
    restricts the work to some shard numbers (parallel jobs: give each job its own; then
    :meth:`TeacherCache.reindex`). Killed builds resume where they stopped (finished shards are
    kept; stale temp files of killed writes are removed, except by a parallel job with its own
    ``shards``). ``progress(done_samples, total_samples)`` is called after each micro-batch.
    Cost: 2N' model passes per sample with CFG.

    ``guidance_range`` ``(lo, hi)`` (guidance-scale control): each sample gets its own teacher CFG scale
    (:meth:`TeacherCache.sample_guidance`, stored per shard) and ``guided_denoiser_for(cond_ids, scales)``
    is called with the scales [n] as well (:func:`per_sample_teacher` makes one for a host).

    ``sampler``: the teacher's deterministic solver (:data:`noisecraft.solvers.TEACHER_SAMPLERS`); other than
    euler it is recorded as ``meta["teacher_sampler"]`` (a cache without that key was sampled with euler, so
    caches built before the choice existed keep their definition and resume).
    """
    from ..guidance_embed import check_guidance_range

    s = check_schedule(sigmas, "teacher")
    meta = teacher_meta(meta, s, kind, sampler, guidance_range)
    sampler, guidance_range = check_sampler(sampler), check_guidance_range(guidance_range)
    if shards is None:  # a finished, sound cache is only read: no lock, so several runs can share it
        ready = TeacherCache.ready(root, shape=shape, conds=conds, base_seed=base_seed, total=total, meta=meta,
                                   shard_size=shard_size)
        if ready is not None:
            TeacherCache.clean_temps(ready.root)  # a killed writer's temp files (only dead processes': no lock needed)
            return ready
    # one writer per cache folder; a parallel job (its own ``shards``) runs under its launcher's lock
    lock = folder_lock(root, what="teacher cache", fix=_BUSY_FIX) if shards is None else contextlib.nullcontext()
    with lock:
        cache = TeacherCache.create(root, shape=shape, conds=conds, base_seed=base_seed, total=total,
                                    meta=meta, shard_size=shard_size)
        if shards is None:  # a parallel job (its own shard list) leaves this to the job that defines the cache
            TeacherCache.clean_temps(cache.root)
        cache.remove_damaged(shards)  # a shard whose checksum fails is remade (its samples are a function of their seeds)
        todo = [k for k in (range(cache.num_shards) if shards is None else shards) if not cache.shard_path(k).is_file()]
        done, work = 0, sum(len(cache.shard_range(k)) for k in todo)
        for k in todo:
            idx = list(cache.shard_range(k))
            noise = cache.sample_noise(idx)
            cond = cache.sample_conds(idx)
            scales = cache.sample_guidance(idx) if guidance_range is not None else None
            outs = []
            for a in range(0, len(idx), int(batch_size)):
                e, c = noise[a: a + batch_size], cond[a: a + batch_size]
                guided = guided_denoiser_for(c) if scales is None else guided_denoiser_for(c, scales[a: a + batch_size])
                outs.append(teacher_x0(guided, e, s, kind, sampler=sampler).detach().float().cpu())
                done += e.shape[0]
                if progress is not None:
                    progress(done, work)
            cache.write_shard(k, torch.cat(outs), noise)
            logger.debug("teacher cache %s: shard %d written", cache.root, k)
        return TeacherCache(cache.root)


def teacher_meta(meta: Optional[Mapping[str, Any]], sigmas, kind: str, sampler: str = DEFAULT_SAMPLER,
                 guidance_range: Optional[Sequence[float]] = None) -> dict:
    """The cache definition's ``meta`` that :func:`build_teacher_cache` records for a teacher: ``meta`` plus the
    schedule's step count and sigma_max, the model kind, the sampler (when not euler) and the guidance range (when
    given). A caller that defines the cache before building it (ComfyUI's named caches) uses the same."""
    from ..guidance_embed import check_guidance_range

    s = check_schedule(sigmas, "teacher")
    out = {**dict(meta or {}), "teacher_steps": int(len(s) - 1), "sigma_max": float(s[0]), "kind": str(kind)}
    sampler = check_sampler(sampler)
    if sampler != DEFAULT_SAMPLER:
        out["teacher_sampler"] = sampler
    guidance_range = check_guidance_range(guidance_range)
    if guidance_range is not None:
        out["guidance_range"] = list(guidance_range)
    return out


def per_sample_teacher(host) -> Callable[[torch.Tensor, torch.Tensor], Callable]:
    """``guided_denoiser_for(cond_ids, scales)`` for :func:`build_teacher_cache` with a ``guidance_range``: CFG
    with one scale per sample on a :class:`~noisecraft.hosts.diffusers.RefinerHost`
    (:func:`noisecraft.guidance_embed.cfg_per_sample` over the host's guided denoiser, so the family's extra
    inputs, e.g. SDXL's pooled text and time ids, come with it)."""
    from ..guidance_embed import cfg_per_sample

    def teacher(cond_ids, scales):
        if host.uncond is None:  # (a host whose prompts are encoded later has it once they are)
            raise ValueError("a guided teacher needs the host's unconditional embedding (host.uncond is None)")
        # cfg 2: any scale != 1 makes the host's denoiser carry the uncond inputs; cfg_per_sample uses its own scales
        return cfg_per_sample(host.denoiser(cond_ids, cfg=2.0), scales)

    return teacher
