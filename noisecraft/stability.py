"""Inversion-stability score, noise selection and noise optimization.

Paper: Qi, Bai, Xiong, Xie, "Not All Noises Are Created Equally: Diffusion Noise Selection and
Optimization" (arXiv:2407.14041).

* stability ``s(e) = cos(e, e')`` with ``e' = F(e) = invert(sample(e))`` (Def. 1), the cosine
  over all latent elements of one sample.
* :func:`select` (Alg. 1): score K candidate noises, keep the most stable one. Candidates go
  through in micro-batches, so memory is bounded by ``micro_batch`` whatever K is.
  ``search="halving"`` (ours; successive halving, Jamieson & Talwalkar 2016, Karnin et al. 2013)
  scores all K with a short round trip, keeps the better half, rescores it with a longer one, and
  so on up to the full score steps.
* :func:`optimize` (Alg. 2): gradient descent on ``J(e) = 1 - cos(e, e')`` with ``e'`` held
  constant at each step (so no gradient flows through the model), momentum ``beta`` and a
  cosine-annealed learning rate; plus our faster ``fixed_point`` method.

Cost, in denoiser calls, for a schedule of N steps: one round trip = N sampling calls + N
inversion calls. With CFG in the sampling denoiser and cfg 1 in the inversion denoiser (the
usual choice) that is 2N + N = 3N model passes. Full selection costs K round trips; halving
costs ``sum_r n_r * 3 N_r`` (``SelectResult.passes``: K = 8, rungs 2/6/20 steps is 8*6 + 4*18 +
2*60 = 240 passes against full's 480); every optimization step costs one round trip, plus one
round trip to score the final noise.

Our choices where the paper is silent (measured by ``benchmarks/bench_stability.py``):

* Learning-rate units. ``|grad J| = sin(angle) / |e|`` and ``|e| ~ sqrt(d)``, so a fixed lr is a
  step of ``lr * sin / d`` relative to ``|e|``: the paper's lr = 100 for SDXL latents
  (d = 4*128*128 = 65,536) would be a 1000x larger relative step on an 8x8 latent. We scale the
  step by ``d / 65,536`` (``REFERENCE_NUMEL``), so lr = 100 means the paper's relative step at
  every latent size and equals the paper exactly on SDXL.
* ``fixed_point`` (default for speed): the paper's gradient with ``e'`` constant points from ``e``
  towards ``e'`` (orthogonal part). We move along ``e' - e`` directly,
  ``e <- e + alpha (e'|e|/|e'| - e)`` (alpha = 1 is plain fixed-point iteration ``e <- F(e)``;
  alpha > 1 over-relaxes), starting at ``alpha = lr`` (default 2), and backtrack per sample: a
  step that lowers that sample's stability is undone and its alpha halved; a step that raises
  it grows alpha by 1.5x (capped at 4). Same cost per step as the paper's method. (Measured on
  a Gaussian mixture: alpha0 = 1 can stall on a plateau that alpha0 = 2 passes.)
* Both methods return the most stable noise seen (the paper returns the last one); the history
  lists the stability of every iterate.
* Stop rule: stop when every sample reaches ``target`` stability, or when no sample improved by
  more than ``tol`` for ``patience`` consecutive steps.
* Trust region (``max_change``, fixed_point default 0.5): measured on the shipped toy model (20
  samples, 10-step round trips), fixed-point iteration without a limit reaches stability 0.9999
  in 5 steps but moves the noise 2.0x its own norm away, and 90% of the sample pixels saturate
  (|x0| > 1.05; 31% from the input noise); within 0.5 it reaches 0.733 in 10 steps (the paper's
  method at lr 100: 0.63 after 100 steps in the demo) with 39% saturated pixels.
* ``renormalize``: rescale each sample to unit second moment (``|e| = sqrt(d)``) after each step,
  so the optimized noise keeps a Gaussian's scale.

Inputs are checked once per call of :func:`round_trip`, :func:`select` and :func:`optimize`, never
per step (:func:`check_noise`, :func:`noisecraft.ode.check_number`): the noise must be a non-empty
floating-point batch of finite values (named in the message), ``sigmas`` the descending sampling
schedule (an ascending one is refused saying so), ``method`` one of :class:`OptimizeMethod` and
``search`` one of :class:`SelectSearch` (the messages list them), ``rungs`` a non-decreasing list of
step counts ending at the schedule's steps, and every numeric knob a finite number in its range (NaN is refused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional

import torch

from .ode import Denoiser, as_sigmas, check_latent, check_number, invert, sample
from .sigmas import ModelKind, noise_to_x, x_to_noise

__all__ = [
    "REFERENCE_NUMEL",
    "OptimizeMethod",
    "SelectSearch",
    "RoundTrip",
    "SelectResult",
    "OptimizeResult",
    "stability_score",
    "round_trip",
    "round_trip_passes",
    "select",
    "halving_rungs",
    "rung_schedule",
    "optimize",
    "check_noise",
]

REFERENCE_NUMEL = 4 * 128 * 128  # SDXL 1024px latent: where the paper's lr = 100 was set
FIXED_POINT_MAX_ALPHA = 4.0


class OptimizeMethod(str, Enum):
    MOMENTUM = "momentum"  # the paper's Algorithm 2
    FIXED_POINT = "fixed_point"  # ours: backtracking steps along e' - e


DEFAULT_LR = {OptimizeMethod.MOMENTUM: 100.0, OptimizeMethod.FIXED_POINT: 2.0}
# Trust region: the largest distance |e - e_input| / |e_input| an iterate may reach.
DEFAULT_MAX_CHANGE = {OptimizeMethod.MOMENTUM: None, OptimizeMethod.FIXED_POINT: 0.5}


def check_noise(e: torch.Tensor, what: str = "noise") -> None:
    """Raise a clear error for non-floating, empty or NaN/inf noise (:func:`noisecraft.ode.check_latent`):
    TypeError for a non-floating tensor, ValueError for an empty batch or latent, NonFiniteError
    (a ValueError) for NaN/inf, each naming ``what``."""
    check_latent(e, what, fix="check the node or seed that produced it")


def _schedule(sigmas, what: str) -> torch.Tensor:
    """The descending sampling schedule of a round trip: sigma_max > 0 first, going down."""
    s = as_sigmas(sigmas)
    if bool(torch.any(s[1:] > s[:-1])) or float(s[0]) <= 0.0:
        order = "ascending" if bool(torch.all(s[1:] >= s[:-1])) else "not monotone"
        shown = [round(float(v), 4) for v in s.tolist()]
        shown = shown if len(shown) <= 6 else shown[:3] + ["..."] + shown[-2:]
        raise ValueError(
            f"{what} sigmas: expected the descending sampling schedule (sigma_max > 0 first, down to 0; the "
            f"round trip samples down it and inverts back up it itself), got {order} {shown}; pass the "
            f"sampler's sigmas as they are (e.g. noisecraft.sigmas.get_sigmas(...)), not flipped"
        )
    return s


def stability_score(e: torch.Tensor, e_inv: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``e`` and ``e_inv`` over all elements of each sample -> [B] (float32)."""
    if e.shape != e_inv.shape:
        raise ValueError(f"shape mismatch: noise {tuple(e.shape)} vs inverted noise {tuple(e_inv.shape)}")
    check_latent(e, "stability_score noise", finite=False)
    a = e.reshape(e.shape[0], -1).to(torch.float64)
    b = e_inv.reshape(e_inv.shape[0], -1).to(torch.float64)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).to(torch.float32)


@dataclass
class RoundTrip:
    x0: torch.Tensor  # the sample generated from e
    e_inv: torch.Tensor  # unit noise recovered by inversion
    score: torch.Tensor  # [B] stability


def round_trip(
    denoiser: Denoiser,
    e: torch.Tensor,
    sigmas,
    kind: ModelKind | str,
    inverse_denoiser: Optional[Denoiser] = None,
) -> RoundTrip:
    """``e -> x0 -> e'``: sample from unit noise ``e`` over ``sigmas``, invert back, score.

    ``sigmas`` is the descending sampling schedule; ``sigmas[0]`` is the start sigma (sigma_max
    for a full denoise). ``inverse_denoiser`` defaults to ``denoiser`` (pass an unguided one for
    the usual cfg-1 inversion). ``e`` is checked (floating, non-empty, finite) once here.
    """
    check_noise(e, "round_trip noise e")
    return _round_trip(denoiser, e, _schedule(sigmas, "round_trip"), kind, inverse_denoiser)


def _round_trip(denoiser: Denoiser, e: torch.Tensor, s: torch.Tensor, kind, inverse_denoiser) -> RoundTrip:
    """:func:`round_trip` without the input checks (callers checked once, not per step)."""
    sigma_max = float(s[0])
    x0 = sample(denoiser, noise_to_x(e, kind, sigma_max), s)
    xt = invert(inverse_denoiser or denoiser, x0, s)
    e_inv = x_to_noise(xt, kind, sigma_max)
    return RoundTrip(x0=x0, e_inv=e_inv, score=stability_score(e, e_inv))


def round_trip_passes(steps: int, cfg_sampling: bool = True, cfg_inversion: bool = False) -> int:
    """Model passes per sample of one round trip with ``steps`` steps each way."""
    return steps * (2 if cfg_sampling else 1) + steps * (2 if cfg_inversion else 1)


class SelectSearch(str, Enum):
    FULL = "full"  # the paper's Algorithm 1: every candidate gets the full round trip
    HALVING = "halving"  # successive halving: short round trips first, the full one for the survivors


@dataclass
class SelectResult:
    best_index: torch.Tensor  # [B] the winning candidate per batch item
    scores: torch.Tensor  # [K, B] each candidate's score at the deepest rung it reached
    x0: Optional[torch.Tensor]  # [K, B, ...] on CPU (from that same rung), or None when keep_x0=False
    order: torch.Tensor  # [K, B] candidate indices best first: deepest rung first, then by score
    rung: Optional[torch.Tensor] = None  # [K, B] the deepest rung each candidate reached (0 = first)
    rung_steps: list[int] = field(default_factory=list)  # round-trip steps of each rung
    trips: list[int] = field(default_factory=list)  # round trips per batch item run at each rung

    def best_noise(self, candidates: torch.Tensor) -> torch.Tensor:
        """The winning candidate of every batch item -> [B, ...]."""
        b = torch.arange(candidates.shape[1])
        return candidates[self.best_index.to(candidates.device), b]

    def top(self, k: int, item: int = 0) -> list[int]:
        """The ``k`` best candidate indices of batch item ``item``."""
        return [int(i) for i in self.order[:k, item]]

    def passes(self, cfg_sampling: bool = True, cfg_inversion: bool = False) -> int:
        """Model passes spent per batch item (see :func:`round_trip_passes`)."""
        return sum(t * round_trip_passes(n, cfg_sampling, cfg_inversion) for n, t in zip(self.rung_steps, self.trips))


def rung_schedule(sigmas, steps: int) -> torch.Tensor:
    """The schedule of a halving rung: ``steps`` steps of the N-step schedule ``sigmas``: N+1 sigmas sampled at evenly spaced indices
    (first and last kept; ``steps == N`` is ``s`` itself)."""
    s = as_sigmas(sigmas)
    n = len(s) - 1
    steps = check_number(steps, "rung_schedule() steps", lo=1, hi=n, integer=True, fix=f"1..{n}, the schedule's steps")
    if steps == n:
        return s
    idx = torch.round(torch.linspace(0, n, steps + 1, dtype=torch.float64)).long()
    return s[idx]


def halving_rungs(k: int, steps: int, *, eta: int = 2, min_steps: int = 2) -> list[int]:
    """The default successive-halving schedule for ``k`` candidates and ``steps`` score steps:
    ``max(1, ceil(log_eta k))`` rungs whose step counts grow geometrically from ``min_steps`` (at most
    ``steps``) to ``steps``; rung r keeps ``ceil(n / eta)`` of its n candidates."""
    r = max(1, math.ceil(math.log(k) / math.log(eta) - 1e-9)) if k > 1 else 1
    lo = min(min_steps, steps)
    if r == 1:
        return [steps]
    return [max(1, min(steps, round(lo * (steps / lo) ** (i / (r - 1))))) for i in range(r)]


def _check_rungs(rungs, steps: int) -> list[int]:
    fix = (f"a non-decreasing list of round-trip step counts, each 1..{steps} (the schedule's steps), the last "
           f"= {steps}; None for the default")
    if isinstance(rungs, (str, bytes)) or not hasattr(rungs, "__iter__"):
        raise ValueError(f"select() rungs: expected {fix}, got {rungs!r}")
    out = [check_number(v, "select() rungs entry", lo=1, hi=steps, integer=True, fix=fix) for v in rungs]
    if not out or out[-1] != steps or any(b < a for a, b in zip(out, out[1:])):
        raise ValueError(f"select() rungs: expected {fix}, got {list(rungs)!r}")
    return out


def select(
    denoiser: Denoiser,
    candidates: torch.Tensor,
    sigmas,
    kind: ModelKind | str,
    *,
    micro_batch: int = 8,
    inverse_denoiser: Optional[Denoiser] = None,
    keep_x0: bool = True,
    callback: Optional[Callable[[int, int], None]] = None,
    search: SelectSearch | str = SelectSearch.FULL,
    rungs=None,
    eta: int = 2,
    min_steps: int = 2,
) -> SelectResult:
    """Score K candidate unit noises per batch item and pick the most stable of each item.

    ``candidates`` is [K, B, ...]: K candidates for each of B batch items (B = 1 for a single
    image). The denoisers see batches of ``m * B`` samples laid out candidate-major (sample
    ``j * B + b`` is candidate j of item b), so a condition of batch B tiled m times lines up
    (ComfyUI and :class:`~noisecraft.hosts.diffusers.DiffusersDenoiser` both tile).

    ``search="full"`` (the paper's Algorithm 1) gives every candidate the round trip over ``sigmas``
    (N steps): K round trips per item. ``search="halving"`` is successive halving (Jamieson &
    Talwalkar, AISTATS 2016; Karnin, Koren & Somekh, ICML 2013): rung r scores its candidates with
    a round trip of ``rungs[r]`` steps (the N-step schedule sampled at evenly spaced indices) and
    keeps the best ``ceil(n / eta)`` of each item's n; the last rung is the full N steps and its best
    candidate wins. ``rungs=None`` takes :func:`halving_rungs` (from ``min_steps`` up to N). A rung
    with the steps of the rung before reuses its scores. Rungs that all equal N give ``full``'s
    winner. ``scores`` holds every candidate's score at the deepest rung it reached (``rung``).
    (We measured a *partial* round trip, the first M of the N steps down and back up, as a cheaper
    score: it ranks worse than a full round trip of M steps at the same cost, so it is not offered;
    ``benchmarks/bench_selection.py``.)

    ``micro_batch`` is how many candidates run at once (``micro_batch * B`` samples), so memory is
    bounded whatever K is; round-trip x0s move to the CPU as they come. ``callback(done, total)``
    runs after each micro-batch (``total``: round trips per item over all rungs; raise from it to
    interrupt).
    """
    if not isinstance(candidates, torch.Tensor) or candidates.dim() < 3:
        raise ValueError(
            f"candidates must be [K, B, ...] (K candidates per batch item), got shape "
            f"{tuple(getattr(candidates, 'shape', ())) or type(candidates).__name__}"
        )
    if candidates.shape[0] == 0:
        raise ValueError(f"select() needs at least one candidate (K >= 1), got candidates of shape "
                         f"{list(candidates.shape)}: generate K >= 1 noises (e.g. noisecraft.rng.candidate_noises)")
    check_noise(candidates, "select() candidate noise")
    k, b = candidates.shape[0], candidates.shape[1]
    micro_batch = check_number(micro_batch, "select() micro_batch", lo=1, integer=True,
                               fix="the number of candidates scored at once, 1 or more")
    try:
        search = SelectSearch(search.lower() if isinstance(search, str) else search)
    except ValueError:
        raise ValueError(f"select() search: expected one of {[m.value for m in SelectSearch]} ('full' = every "
                         f"candidate gets the full round trip, 'halving' = successive halving), got {search!r}") from None
    s = _schedule(sigmas, "select()")
    n = len(s) - 1
    if search is SelectSearch.FULL:
        if rungs is not None:
            raise ValueError(f"select() rungs={rungs!r} only applies to search='halving'; pass search='halving' "
                             f"or leave rungs None")
        plan = [n]
    else:
        eta = check_number(eta, "select() eta", lo=2, integer=True, fix="keep 1/eta of the candidates per rung; 2 halves")
        min_steps = check_number(min_steps, "select() min_steps", lo=1, integer=True,
                                 fix="the round-trip steps of the first rung, 1 or more")
        plan = halving_rungs(k, n, eta=eta, min_steps=min_steps) if rungs is None else _check_rungs(rungs, n)
    shape = candidates.shape[2:]
    scores = torch.empty(k, b, dtype=torch.float32)
    rung_of = torch.zeros(k, b, dtype=torch.long)
    x0s = torch.empty(k, b, *shape, dtype=candidates.dtype) if keep_x0 else None
    alive = torch.arange(k)[:, None].expand(k, b).clone()  # [n, B] surviving candidate indices per item
    plan, trips = _plan(k, eta, plan)
    done, total = 0, sum(trips)
    items = torch.arange(b)
    for r, steps in enumerate(plan):
        m_alive = alive.shape[0]
        if trips[r]:
            sub = rung_schedule(s, steps)
            for start in range(0, m_alive, micro_batch):
                idx = alive[start : start + micro_batch]  # [m, B]
                m = idx.shape[0]
                chunk = candidates[idx.to(candidates.device), items.to(candidates.device)]  # [m, B, ...]
                rt = _round_trip(denoiser, chunk.reshape(m * b, *shape), sub, kind, inverse_denoiser)
                scores[idx, items] = rt.score.detach().cpu().reshape(m, b)
                if keep_x0:
                    x0s[idx, items] = rt.x0.detach().cpu().reshape(m, b, *shape).to(x0s.dtype)
                done += m
                if callback is not None:
                    callback(done, total)
        rung_of[alive, items] = r
        if r < len(plan) - 1:
            ranked = torch.argsort(scores[alive, items], dim=0, descending=True, stable=True)
            alive = torch.sort(torch.gather(alive, 0, ranked[: math.ceil(m_alive / eta)]), dim=0).values
    # best first: deepest rung, then score, then candidate index
    key = rung_of.double() * 4.0 + scores.double()  # scores are cosines in [-1, 1]
    order = torch.argsort(key, dim=0, descending=True, stable=True)
    return SelectResult(
        best_index=order[0].clone(), scores=scores, x0=x0s, order=order, rung=rung_of,
        rung_steps=list(plan), trips=trips,
    )


def _plan(k: int, eta: int, rungs: list[int]) -> tuple[list[int], list[int]]:
    """The rungs that run (halving stops once one candidate is left) and the round trips per item
    of each (0 where a rung has the steps of the one before: its scores are reused)."""
    plan, trips, n = [], [], k
    for r, steps in enumerate(rungs):
        plan.append(steps)
        trips.append(0 if r and steps == rungs[r - 1] else n)
        if r == len(rungs) - 1 or n == 1:
            break
        n = math.ceil(n / eta)
        if n == 1:  # the one survivor has won
            break
    return plan, trips


@dataclass
class OptimizeResult:
    noise: torch.Tensor  # the most stable iterate per sample
    history: torch.Tensor  # [iterates, B] stability of every iterate (row 0: the input noise)
    best_score: torch.Tensor  # [B]
    x0: torch.Tensor  # sample generated from the returned noise
    steps: int  # update steps taken
    round_trips: int  # round trips run (cost: see module docstring)


def _flat_norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))


def _renorm(e: torch.Tensor) -> torch.Tensor:
    d = e[0].numel()
    return e * (math.sqrt(d) / _flat_norm(e).clamp_min(1e-12))


def _project(e: torch.Tensor, center: torch.Tensor, radius: float) -> torch.Tensor:
    """Pull each sample back into the ball ``|e - center| <= radius * |center|``."""
    delta = e - center
    limit = radius * _flat_norm(center)
    n = _flat_norm(delta)
    return center + delta * torch.clamp(limit / n.clamp_min(1e-12), max=1.0)


def _stability_grad(e: torch.Tensor, e_inv: torch.Tensor) -> torch.Tensor:
    """Gradient of ``1 - cos(e, e')`` w.r.t. ``e`` with ``e'`` constant (closed form)."""
    ne = _flat_norm(e).clamp_min(1e-12)
    ni = _flat_norm(e_inv).clamp_min(1e-12)
    cos = (e * e_inv).reshape(e.shape[0], -1).sum(1).reshape(ne.shape) / (ne * ni)
    return -(e_inv / (ne * ni) - cos * e / (ne * ne))


def optimize(
    denoiser: Denoiser,
    e: torch.Tensor,
    sigmas,
    kind: ModelKind | str,
    *,
    method: OptimizeMethod | str = OptimizeMethod.MOMENTUM,
    steps: int = 100,
    lr: Optional[float] = None,
    momentum: float = 0.5,
    cosine_lr: bool = True,
    renormalize: bool = False,
    max_change: Optional[float] | str = "default",
    target: Optional[float] = None,
    patience: int = 0,
    tol: float = 1e-6,
    inverse_denoiser: Optional[Denoiser] = None,
    reference_numel: int = REFERENCE_NUMEL,
    callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> OptimizeResult:
    """Raise the inversion stability of the unit noise ``e`` [B, ...].

    ``method="momentum"`` is the paper's Algorithm 2: ``m = momentum * m + grad``,
    ``e -= lr_t * (d / reference_numel) * m`` with ``lr_t`` cosine-annealed from ``lr`` to 0
    (``cosine_lr=False`` keeps it constant). ``method="fixed_point"`` moves along ``e' - e`` with
    per-sample backtracking; there ``lr`` is the initial fraction alpha of the way to ``e'``
    (default 2, capped at ``FIXED_POINT_MAX_ALPHA`` = 4) and ``momentum`` is unused. ``lr=None``
    takes the method's default (100 for momentum, the paper's value).

    ``max_change`` keeps every iterate within ``|e - e_input| <= max_change * |e_input|`` (a
    projection after each step); ``None`` is no limit, ``"default"`` is the method's default (no
    limit for the paper's method, 0.5 for fixed_point: unconstrained fixed-point iteration finds
    near-perfectly stable noises far from the Gaussian shell that give saturated samples).

    Every step costs one round trip (see module docstring); the returned noise is the most
    stable iterate seen per sample. ``callback(step, steps, scores)`` runs after each step's
    round trip (raise from it to interrupt). ``steps=0`` only scores ``e``.
    """
    check_noise(e, "optimize() noise e")
    if not isinstance(method, OptimizeMethod):
        try:
            method = OptimizeMethod(str(method).lower() if isinstance(method, str) else method)
        except ValueError:
            raise ValueError(f"optimize() method: expected one of {[m.value for m in OptimizeMethod]} "
                             f"('momentum' = the paper's Algorithm 2, 'fixed_point' = ours, faster), "
                             f"got {method!r}") from None
    if lr is None:
        lr = DEFAULT_LR[method]
    if isinstance(max_change, str):
        if max_change != "default":
            raise ValueError(f"max_change must be a number, None (no limit) or 'default', got {max_change!r}")
        max_change = DEFAULT_MAX_CHANGE[method]
    steps = check_number(steps, "optimize() steps", lo=0, integer=True, fix="0 only scores the noise")
    lr = check_number(lr, "optimize() lr", lo=0, lo_open=True,
                      fix=f"a positive step size, None for the method's default ({DEFAULT_LR[method]:g})")
    momentum = check_number(momentum, "optimize() momentum", lo=0, hi=1, hi_open=True, fix="0 turns momentum off")
    tol = check_number(tol, "optimize() tol", lo=0, fix="the smallest stability gain that counts as progress")
    patience = check_number(patience, "optimize() patience", lo=0, integer=True, fix="0 turns early stopping off")
    if target is not None:
        target = check_number(target, "optimize() target", lo=-1, hi=1, fix="a stability (cosine) to stop at, "
                              "or None to run every step")
    if max_change is not None:
        max_change = check_number(max_change, "optimize() max_change", lo=0, lo_open=True,
                                  fix="a positive fraction of the noise's norm, or None for no limit")
    reference_numel = check_number(reference_numel, "optimize() reference_numel", lo=1, integer=True,
                                   fix=f"the latent size the lr is set for ({REFERENCE_NUMEL} = SDXL)")
    s = _schedule(sigmas, "optimize()")
    d = e[0].numel()
    scale = d / float(reference_numel)

    cur = e.detach().clone()
    if renormalize:
        cur = _renorm(cur)
    start = cur
    rt = _round_trip(denoiser, cur, s, kind, inverse_denoiser)
    history = [rt.score.clone()]
    best, best_score, best_x0 = cur.clone(), rt.score.clone(), rt.x0.detach().clone()
    m = torch.zeros_like(cur)
    alpha = torch.full((cur.shape[0],), min(float(lr), FIXED_POINT_MAX_ALPHA), dtype=torch.float32, device=cur.device)
    prev, prev_score, prev_inv = cur, rt.score, rt.e_inv
    stale = 0
    taken = 0
    trips = 1
    for i in range(steps):
        if target is not None and bool(torch.all(best_score >= target)):
            break
        if method is OptimizeMethod.MOMENTUM:
            g = _stability_grad(prev, prev_inv)
            m = momentum * m + g
            lr_t = lr * (0.5 * (1.0 + math.cos(math.pi * i / steps)) if cosine_lr else 1.0)
            cur = prev - (lr_t * scale) * m
        else:
            a = alpha.reshape(-1, *([1] * (prev.dim() - 1))).to(prev)
            toward = prev_inv * (_flat_norm(prev) / _flat_norm(prev_inv).clamp_min(1e-12))
            cur = prev + a * (toward - prev)
        if max_change is not None:
            cur = _project(cur, start, max_change)
        if renormalize:
            cur = _renorm(cur)
        rt = _round_trip(denoiser, cur, s, kind, inverse_denoiser)
        trips += 1
        taken += 1
        score = rt.score
        history.append(score.clone())
        improved = score > best_score + tol
        if bool(torch.any(improved)):
            stale = 0
        else:
            stale += 1
        better = score > best_score
        if bool(torch.any(better)):
            sel = better.reshape(-1, *([1] * (cur.dim() - 1)))
            best = torch.where(sel, cur, best)
            best_x0 = torch.where(sel, rt.x0.detach(), best_x0)
            best_score = torch.where(better, score, best_score)
        if method is OptimizeMethod.FIXED_POINT:
            up = score >= prev_score
            alpha = torch.where(up, (alpha * 1.5).clamp(max=FIXED_POINT_MAX_ALPHA), alpha * 0.5)
            keep = up.reshape(-1, *([1] * (cur.dim() - 1)))
            # accept improving steps; undo the others (retry from the previous iterate)
            prev = torch.where(keep, cur, prev)
            prev_inv = torch.where(keep, rt.e_inv, prev_inv)
            prev_score = torch.where(up, score, prev_score)
        else:
            prev, prev_score, prev_inv = cur, score, rt.e_inv
        if callback is not None:
            callback(i + 1, steps, score)
        if patience and stale >= patience:
            break
    return OptimizeResult(
        noise=best,
        history=torch.stack(history),
        best_score=best_score,
        x0=best_x0,
        steps=taken,
        round_trips=trips,
    )
