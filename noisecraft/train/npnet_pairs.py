"""NPNet training pairs by re-denoise sampling, with a pluggable keep-filter, in safetensors shards.

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie,
*Golden Noise for Diffusion Models: A Learning Framework*, arXiv:2411.09502 (2024), Sec. 3.1
(re-denoise sampling, data selection), Alg. 1 (noise prompt dataset collection), App. A.5
(CFG w_l 5.5 for SDXL, inverse CFG w_w 1.0, 10 inference steps for collection, HPSv2 filter with
threshold m = 0).

Re-denoise sampling (:func:`re_denoise`), for unit noise ``e`` and condition ``c``::

    x_T   = noise_to_x(e)                                   # at sigma_max = sigmas[0]
    x_T-1 = one Euler (= DDIM eta 0) step, CFG w_l, sigmas[0] -> sigmas[1]     (ode.sample)
    x'_T  = one inversion step,  CFG w_w, sigmas[1] -> sigmas[0]              (ode.invert)
    e'    = x_to_noise(x'_T)                                # the target noise

``sigmas`` is the collection schedule (the paper: the model's usual sampler with 10 steps; here
``get_sigmas(table, scheduler, steps)``), so the step is the first step of that schedule. The
inversion step uses the slope at the current latent and the current sigma (DESIGN.md, "The one
abstraction"): for w_l = w_w the pair differs only by the one-step round-trip error, and
``x'_T - x_T = (sigma_0 - sigma_1) (slope_w(x_T-1, sigma_1) - slope_l(x_T, sigma_0))`` carries the
guidance difference into the noise (the paper's Theorem E.1).

Keep-filter (Alg. 1 lines 8-13): with a ``scorer``, both noises are sampled with the collection
schedule at CFG w_l (the pipeline the pair is meant for), and the pair is kept when
``score(x0') > score(x0) + margin``. A scorer is any callable ``score(x0, cond_ids) -> [B]`` (higher
is better); :func:`noisecraft.hosts.toy.toy_confidence_scorer` (the shipped digit classifier's
probability of the target class) needs no download. Without a scorer every pair is kept and
nothing is sampled. Every pair is stored with its ``kept`` flag and both scores (NaN without a scorer), so a stricter
margin can be applied later (:meth:`PairStore.kept_indices`).

Layout of a pair folder::

    index.json               {"version", "shape", "conds", "base_seed", "total", "shard_size", "meta", "shards"}
    conds.safetensors        "embeds" [P, tokens, width] float32: the prompt embedding of condition id p
    shard_00000.safetensors  "noise", "target" [n, C, H, W] float32 (unit noise), "cond" [n] int64,
                             "seed" [n] int64, "kept" [n] uint8, "score_source", "score_target" [n] float32

As the teacher cache (:mod:`noisecraft.train.teacher_cache`): sample ``i`` has noise
``seeded_noise(base_seed + i, (1, C, H, W))`` and condition ``i % len(conds)``, so any shard can be
made by any job in any order; files are written atomically (:mod:`noisecraft.io`); a killed
collection resumes at the first missing shard (and its stale temp files are removed); identical definitions give identical bytes.
Cost per pair: 2 + 1 model passes (w_l != 1, w_w = 1), plus ``4 * filter_steps`` with a scorer.

A store can also live in memory (:meth:`PairStore.in_memory`: the same definition, shards and
checks, no folder): ComfyUI's Collect NPNet Pairs node makes one per graph run and Train NPNet reads
it through the same :meth:`PairStore.batches` as the CLI, so both train on one data structure.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from .. import ode
from ..io import ensure_dir, load_safetensors, verify_safetensors
from ..locks import folder_lock
from ..sigmas import get_sigmas, noise_to_x, x_to_noise
from .teacher_cache import ShardBatch
from .shards import INDEX_NAME, ShardedStore, check_split, epoch_generator, positioned_batches, write_safetensors

__all__ = [
    "Scorer",
    "PairStore",
    "PairBatch",
    "re_denoise",
    "collect_pairs",
    "PAIRS_VERSION",
]

logger = logging.getLogger(__name__)

PAIRS_VERSION = 1
CONDS_NAME = "conds.safetensors"

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``score(x0 [B, C, H, W], cond_ids [B]) -> [B]`` float scores, higher is better."""


def _check_sigmas(sigmas) -> torch.Tensor:
    s = ode.as_sigmas(sigmas)
    if bool(torch.any(s[1:] > s[:-1])):
        raise ValueError(f"re-denoise sampling needs a descending schedule (sampling order), got {s.tolist()}")
    if float(s[1]) <= 0.0 or float(s[1]) >= float(s[0]):
        raise ValueError(
            f"re-denoise sampling steps from sigmas[0] = {float(s[0]):g} to sigmas[1] = {float(s[1]):g}: expected "
            "0 < sigmas[1] < sigmas[0]; use a schedule of at least 2 steps (the paper collects with 10)"
        )
    return s


def re_denoise(denoiser_l: ode.Denoiser, denoiser_w: ode.Denoiser, e: torch.Tensor, sigmas, kind) -> torch.Tensor:
    """Target noise ``e'`` for unit noise ``e``: one step down at CFG w_l (``denoiser_l``), one
    inversion step back up at CFG w_w (``denoiser_w``), both between ``sigmas[0]`` and ``sigmas[1]``.

    Both denoisers close over the same conditions (one per batch item). Returns unit noise like ``e``.
    """
    s = _check_sigmas(sigmas)
    pair = s[:2]
    smax = float(s[0])
    x_t = noise_to_x(e, kind, smax)
    x_prev = ode.sample(denoiser_l, x_t, pair)
    x_back = ode.invert(denoiser_w, x_prev, pair)
    return x_to_noise(x_back, kind, smax)


@dataclass
class PairBatch(ShardBatch):
    """One training batch: source noise ``e``, target noise ``target``, condition ids, sample indices."""

    target: torch.Tensor


class PairStore(ShardedStore):
    """A folder of NPNet training pairs (see the module docstring). Open one with ``PairStore(path)``;
    make one with :meth:`create` (or :func:`collect_pairs`)."""

    _HOLDS = "NPNet pairs"
    _FOLDER = "pair folder"
    _SHARD_KEYS = ("noise", "target", "cond", "kept", "score_source", "score_target")
    _REBUILD_HINT = "run collect-pairs again with the same --out (or collect_pairs): it remakes just that shard"

    def __init__(self, root: str | os.PathLike, *, max_open_shards: int = 4):
        super().__init__(root, max_open_shards=max_open_shards)
        self._embeds: Optional[torch.Tensor] = None
        self._memory: Optional[dict[int, dict[str, torch.Tensor]]] = None  # shard k -> tensors, in memory only

    def __repr__(self) -> str:
        c, h, w = self.shape
        where = "in memory" if self.in_memory_store else str(self.root)
        return (f"PairStore({where}: {self.total} pairs of {c}x{h}x{w} latents, {len(self.conds)} prompt(s), "
                f"w_l={self.meta.get('w_l')}, w_w={self.meta.get('w_w')})")

    def _no_index_message(self) -> str:
        return (
            f"{self.root} is not an NPNet pair folder (no {INDEX_NAME}): collect pairs with "
            "noisecraft.train.collect_pairs(...) or `python -m noisecraft collect-pairs`"
        )

    def _check_index(self, index: Path) -> None:
        if self._index.get("kind") != "npnet_pairs" or self._index.get("version") != PAIRS_VERSION:
            raise ValueError(
                f"{index}: not an NPNet pair index of version {PAIRS_VERSION} (kind {self._index.get('kind')!r}, "
                f"version {self._index.get('version')!r}): collect the pairs again"
            )

    @classmethod
    def _corrupt_fix(cls, root: Path) -> str:
        return f"delete the folder {root} and run the collection again (collect-pairs / collect_pairs)"

    def _missing_shard_message(self, k: int, path: Path) -> str:
        return f"NPNet pairs {self.root}: {path.name} is missing: finish the collection (collect_pairs resumes)"

    @classmethod
    def create(cls, root: str | os.PathLike, *, shape: Sequence[int], conds: Sequence[Any], embeds: torch.Tensor,
               base_seed: int, total: int, meta: Optional[Mapping[str, Any]] = None,
               shard_size: int = 256) -> "PairStore":
        """Make (or re-open, if it has the same definition and embeddings) an empty pair folder."""
        root = Path(root)
        definition = cls._definition({"kind": "npnet_pairs", "version": PAIRS_VERSION}, shape=shape, conds=conds,
                                     base_seed=base_seed, total=total, shard_size=shard_size, meta=meta)
        embeds = _as_embeds(embeds, len(conds))
        store = cls._reopen(root, definition)
        if store is not None:
            if not torch.equal(store.embeds, embeds):
                raise ValueError(f"{root} holds pairs made with other prompt embeddings ({CONDS_NAME}): use "
                                 "another folder or delete that one")
            return store
        ensure_dir(root, None)
        write_safetensors({"embeds": embeds}, root / CONDS_NAME, {"noisecraft.kind": "npnet_pair_conds"}, digest=True)
        return cls._new(root, definition)

    @classmethod
    def in_memory(cls, *, shape: Sequence[int], conds: Sequence[Any], embeds: torch.Tensor, base_seed: int,
                  total: int, meta: Optional[Mapping[str, Any]] = None,
                  shard_size: Optional[int] = None) -> "PairStore":
        """An empty pair store held in memory: the definition of :meth:`create` (one shard of ``total``
        unless ``shard_size`` is given), filled with :meth:`write_shard`, read like a folder."""
        definition = cls._definition({"kind": "npnet_pairs", "version": PAIRS_VERSION}, shape=shape, conds=conds,
                                     base_seed=base_seed, total=total, shard_size=shard_size or total, meta=meta)
        store = cls.__new__(cls)
        store.root = Path("<memory>")
        store._index = {**definition, "shards": []}
        store._embeds = _as_embeds(embeds, len(conds))
        store._memory = {}
        store._load_shard = store._read_shard
        return store

    @property
    def base_seed(self) -> int:
        """Sample ``i`` has noise ``seeded_noise(base_seed + i)``."""
        return int(self._index["base_seed"])

    @property
    def in_memory_store(self) -> bool:
        """True for a store made by :meth:`in_memory` (no folder)."""
        return self._memory is not None

    def missing_shards(self) -> list[int]:
        if self._memory is None:
            return super().missing_shards()
        return [k for k in range(self.num_shards) if k not in self._memory]

    def reindex(self) -> None:
        if self._memory is None:
            return super().reindex()
        self._index["shards"] = [{"file": None, "start": self.shard_range(k).start, "count": len(self.shard_range(k))}
                                 for k in sorted(self._memory)]

    def _read_shard(self, k: int) -> dict[str, torch.Tensor]:
        if self._memory is None:
            return super()._read_shard(k)
        if k not in self._memory:
            raise FileNotFoundError(f"NPNet pairs in memory: shard {k} was never written: finish the collection")
        return self._memory[k]

    # -- index -------------------------------------------------------------------------------
    @property
    def embeds(self) -> torch.Tensor:
        """Prompt embeddings [P, tokens, width]: row ``p`` for condition id ``p``."""
        if self._embeds is None:
            path = self.root / CONDS_NAME
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the pair folder is incomplete; collect the pairs again")
            what = "the prompt embeddings of the pairs"
            verify_safetensors(path, what=what, fix=self._corrupt_fix(self.root))
            data = load_safetensors(path, what=what, fix=self._corrupt_fix(self.root))
            if "embeds" not in data or data["embeds"].ndim != 3:
                raise ValueError(f"{path}: expected a tensor 'embeds' [P, tokens, width], got {sorted(data)}: "
                                 f"{self._corrupt_fix(self.root)}")
            self._embeds = data["embeds"]
        return self._embeds

    def write_shard(self, k: int, noise: torch.Tensor, target: torch.Tensor, kept: torch.Tensor,
                    score_source: torch.Tensor, score_target: torch.Tensor) -> Path:
        idx = self._shard_indices(k)
        want = (len(idx), *self.shape)
        if tuple(noise.shape) != want or tuple(target.shape) != want:
            raise ValueError(f"shard {k} needs noise and target of shape {want}, got {tuple(noise.shape)} "
                             f"and {tuple(target.shape)}")
        if not bool(torch.isfinite(target).all()):
            raise FloatingPointError(f"re-denoise sampling produced non-finite target noise in shard {k}: not stored")
        tensors = {
            "noise": noise.to(torch.float32), "target": target.to(torch.float32),
            "cond": self.sample_conds(idx),
            "seed": self._sample_seeds(idx),
            "kept": kept.to(torch.uint8).reshape(-1),
            "score_source": score_source.to(torch.float32).reshape(-1),
            "score_target": score_target.to(torch.float32).reshape(-1),
        }
        bad = [key for key in self._SHARD_KEYS if tensors[key].shape[0] != len(idx)]
        if bad:
            raise ValueError(f"shard {k} needs one value per pair ({len(idx)}) in {bad}")
        path = self.shard_path(k)
        if self._memory is not None:  # plain tensors (not inference-mode ones), so autograd may read them later
            with torch.inference_mode(False):
                self._memory[k] = {key: v.detach().cpu().clone() for key, v in tensors.items()}
        else:
            write_safetensors(tensors, path, {"noisecraft.kind": "npnet_pairs_shard", "start": str(idx[0]),
                                              "count": str(len(idx))}, digest=True)
        self.reindex()
        return path

    # -- reading -----------------------------------------------------------------------------
    def column(self, key: str) -> torch.Tensor:
        """One per-sample column over the whole folder (``kept``, ``score_source``, ``cond``, ...)."""
        self._require_complete()
        return torch.cat([self._load_shard(k)[key] for k in range(self.num_shards)])

    def kept_indices(self, margin: Optional[float] = None) -> torch.Tensor:
        """Indices of the kept pairs: the stored flags, or ``score_target > score_source + margin``."""
        if margin is None:
            return self.column("kept").nonzero().flatten()
        s0, s1 = self.column("score_source"), self.column("score_target")
        if bool(torch.isnan(s0).any()):
            raise ValueError(f"{self.root} was collected without a scorer: there are no scores to filter by margin")
        return (s1 > s0 + float(margin)).nonzero().flatten()

    def _sample_seeds(self, indices: Sequence[int]) -> torch.Tensor:
        """The samples' noise seeds (64-bit unsigned, as ComfyUI's; stored as the int64 of the same bits)."""
        base = int(self._index["base_seed"])
        return torch.tensor([(((base + int(i)) & 0xFFFF_FFFF_FFFF_FFFF) ^ (1 << 63)) - (1 << 63) for i in indices],
                            dtype=torch.long)

    def identity_mse(self, margin: Optional[float] = None) -> float:
        """MSE(x_T, x'_T) over the kept pairs: the loss of the untrained (identity) NPNet."""
        b = self.get(self.kept_indices(margin))
        return float((b.e - b.target).pow(2).mean()) if len(b) else float("nan")

    def get(self, indices: Sequence[int] | torch.Tensor) -> PairBatch:
        idx = self._indices(indices, "pair")
        out = {k: torch.empty((idx.numel(), *self.shape)) for k in ("noise", "target")}
        out["cond"] = torch.empty(idx.numel(), dtype=torch.long)
        self._gather(idx, out)
        return PairBatch(e=out["noise"], target=out["target"], cond=out["cond"], index=idx)

    def _require_complete(self) -> None:
        missing = self.missing_shards()
        if missing:
            raise FileNotFoundError(
                f"NPNet pairs {self.root} are incomplete: {len(missing)} of {self.num_shards} shards missing "
                f"(first: {self.shard_path(missing[0]).name}); finish the collection first"
            )

    def epoch_order(self, pool: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        return pool[torch.randperm(pool.numel(), generator=epoch_generator(seed, epoch))]

    def batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, offset: int = 0,
                margin: Optional[float] = None, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[PairBatch, tuple[int, int]]]:
        """Endless shuffled batches of kept pairs from the data position ``(epoch, offset)``; yields
        ``(batch, next_position)``. The order is a pure function of ``(seed, epoch)`` and the kept set;
        an epoch's tail that does not fill a batch is skipped. ``batch_size`` is the global batch: with
        ``world_size > 1`` each rank gets its contiguous slice."""
        self._require_complete()
        pool = self.kept_indices(margin)
        batch_size, rank, world_size = int(batch_size), int(rank), int(world_size)
        if batch_size < 1 or batch_size > pool.numel():
            raise ValueError(f"batch size {batch_size} must lie in 1..{pool.numel()} (the kept pairs of "
                             f"{self.total}); collect more pairs or lower the batch size")
        check_split(batch_size, rank, world_size)
        yield from positioned_batches(lambda ep: self.epoch_order(pool, seed, ep), pool.numel(), self.get,
                                      batch_size, epoch=epoch, offset=offset, rank=rank, world_size=world_size)


def _as_embeds(embeds: torch.Tensor, n_conds: int) -> torch.Tensor:
    """Prompt embeddings as a CPU float32 [P, tokens, width] tensor with one row per condition."""
    with torch.inference_mode(False):
        embeds = torch.as_tensor(embeds).detach().to("cpu", torch.float32).clone().contiguous()
    if embeds.ndim != 3 or embeds.shape[0] != n_conds:
        raise ValueError(f"embeds must be [P, tokens, width] with one row per condition ({n_conds}), "
                         f"got {list(embeds.shape)}")
    if not bool(torch.isfinite(embeds).all()):
        raise FloatingPointError("the prompt embeddings of the pairs contain NaN/inf values: re-encode the prompts")
    return embeds


def collect_pairs(
    root: str | os.PathLike,
    host,
    *,
    total: int,
    w_l: float = 5.5,
    w_w: float = 1.0,
    steps: int = 10,
    scheduler: str = "normal",
    base_seed: int = 0,
    scorer: Optional[Scorer] = None,
    margin: float = 0.0,
    shard_size: int = 256,
    batch_size: int = 64,
    shards: Optional[Sequence[int]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    meta: Optional[Mapping[str, Any]] = None,
    shape: Optional[Sequence[int]] = None,
) -> PairStore:
    """Collect (or finish collecting) ``total`` re-denoise pairs into the folder ``root``.

    Args:
        host: a :class:`noisecraft.hosts.diffusers.RefinerHost`-like object: ``denoiser(cond_ids, cfg)``,
            ``conds`` [P, tokens, width] (the prompt embeddings NPNet will read), ``table``,
            ``base_model``, ``cond_labels``; :func:`noisecraft.hosts.toy.toy_host` /
            :func:`noisecraft.hosts.diffusers.diffusers_host` make one.
        w_l, w_w: CFG of the denoising step and of the inversion step (the paper: 5.5 and 1.0 on
            SDXL); ``w_w < w_l`` injects the guidance into the noise, ``w_w = w_l`` gives pairs that
            differ only by the round-trip error.
        steps, scheduler: the collection schedule (its first step is the re-denoise step; the filter
            samples with all of it).
        scorer, margin: keep-filter (see the module docstring); None keeps every pair.
        shards: only these shard numbers (parallel jobs); a killed collection resumes (and, unless
            ``shards`` is given, removes the stale temp files of killed writes).
        progress: ``progress(done, total_to_do)`` after each micro-batch.
        shape: one latent's [C, H, W]; default: the UNet config's ``in_channels`` and ``sample_size``.
    Determinism: the same arguments give byte-identical shards (on the same hardware and threads).
    """
    if not (math.isfinite(float(w_l)) and math.isfinite(float(w_w))):
        raise ValueError(f"w_l and w_w must be finite numbers, got {w_l} and {w_w}")
    if not math.isfinite(float(margin)):
        raise ValueError(f"margin must be a finite number (keep a pair when score' > score + margin), got {margin}: "
                         "with NaN no pair would be kept")
    if float(w_w) > float(w_l):
        logger.warning("re-denoise sampling with w_w = %g > w_l = %g removes guidance from the noise", w_w, w_l)
    sigmas = _check_sigmas(get_sigmas(host.table, scheduler, int(steps)))
    kind = host.table.kind
    labels = list(host.cond_labels) if host.cond_labels is not None else list(range(host.conds.shape[0]))
    definition = {
        **dict(meta or {}),
        "base_model": getattr(host, "base_model", "unknown"), "kind": kind.value, "w_l": float(w_l),
        "w_w": float(w_w), "steps": int(steps), "scheduler": scheduler, "sigma_max": float(sigmas[0]),
        "sigma_next": float(sigmas[1]), "scorer": getattr(scorer, "name", None if scorer is None else "custom"),
        "margin": float(margin), "inversion": "Euler, slope at the current latent and sigma (noisecraft.ode.invert)",
    }
    if shape is None:
        config = getattr(host.unet, "config", None)
        size = getattr(config, "sample_size", None)
        if config is None or size is None:
            raise ValueError("collect_pairs: give shape=[C, H, W] (the host's UNet has no config.sample_size)")
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (int(config.in_channels), *size)
    shape = tuple(int(v) for v in shape)
    # one writer per pair folder; a parallel job (its own ``shards``) runs under its launcher's lock
    lock = (folder_lock(root, what="NPNet pair folder", fix="wait for that collection to finish or stop it, or "
                                                            "choose another folder")
            if shards is None else contextlib.nullcontext())
    with lock:
        store = PairStore.create(root, shape=shape, conds=labels, embeds=host.conds, base_seed=base_seed, total=total,
                                 meta=definition, shard_size=shard_size)
        if shards is None:  # a parallel job (its own shard list) leaves this to a job over the whole folder
            PairStore.clean_temps(store.root)
        store.remove_damaged(shards)  # a shard whose checksum fails is remade (its pairs are a function of their seeds)
        todo = [k for k in (range(store.num_shards) if shards is None else shards) if not store.shard_path(k).is_file()]
        work = sum(len(store.shard_range(k)) for k in todo)
        done = 0
        with torch.no_grad():
            for k in todo:
                idx = list(store.shard_range(k))
                noise, cond = store.sample_noise(idx), store.sample_conds(idx)
                parts: dict[str, list] = {"target": [], "kept": [], "s0": [], "s1": []}
                for a in range(0, len(idx), int(batch_size)):
                    e, c = noise[a: a + batch_size], cond[a: a + batch_size]
                    d_l, d_w = host.denoiser(c, cfg=float(w_l)), host.denoiser(c, cfg=float(w_w))
                    target = re_denoise(d_l, d_w, e, sigmas, kind).float().cpu()
                    if scorer is None:
                        s0 = s1 = torch.full((e.shape[0],), float("nan"))
                        kept = torch.ones(e.shape[0], dtype=torch.bool)
                    else:
                        smax = float(sigmas[0])
                        x0 = ode.sample(d_l, noise_to_x(e, kind, smax), sigmas)
                        x0t = ode.sample(d_l, noise_to_x(target, kind, smax), sigmas)
                        s0 = torch.as_tensor(scorer(x0, c)).float().cpu().reshape(-1)
                        s1 = torch.as_tensor(scorer(x0t, c)).float().cpu().reshape(-1)
                        if s0.numel() != e.shape[0] or s1.numel() != e.shape[0]:
                            raise ValueError(f"the scorer returned {s0.numel()} scores for {e.shape[0]} samples; "
                                             "expected one float per sample")
                        kept = s1 > s0 + float(margin)
                    for key, v in (("target", target), ("kept", kept), ("s0", s0), ("s1", s1)):
                        parts[key].append(v)
                    done += e.shape[0]
                    if progress is not None:
                        progress(done, work)
                store.write_shard(k, noise, torch.cat(parts["target"]), torch.cat(parts["kept"]),
                                  torch.cat(parts["s0"]), torch.cat(parts["s1"]))
                logger.debug("NPNet pairs %s: shard %d written", store.root, k)
        return PairStore(store.root)
