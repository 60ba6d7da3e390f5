"""Stability score, selection and optimization on exact denoisers."""

import pytest
import torch

from noisecraft import stability as st
from noisecraft.analytic import GaussianData, GaussianMixture
from noisecraft.sigmas import SigmaTable, get_sigmas

SHAPE = (1, 8, 8)


def _mixture(kind="eps"):
    means = torch.randn((6, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return GaussianMixture(means, 0.3).denoiser(kind)


def _sched(kind="eps", n=6):
    table = SigmaTable.flow(3.0) if kind == "flow" else SigmaTable.scaled_linear()
    return get_sigmas(table, "normal", n)


def _noise(n, seed=1):
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def test_score_is_cosine_per_sample():
    e = _noise(3)
    assert torch.allclose(st.stability_score(e, e), torch.ones(3))
    assert torch.allclose(st.stability_score(e, -2.5 * e), -torch.ones(3))
    other = _noise(3, seed=9)
    manual = torch.stack([torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()) for a, b in zip(e, other)])
    assert torch.allclose(st.stability_score(e, other), manual, atol=1e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        st.stability_score(e, e[:2])


def test_isotropic_gaussian_is_perfectly_stable():
    D = GaussianData(0.0, 0.5, shape=SHAPE).denoiser("eps")
    rt = st.round_trip(D, _noise(4).double(), _sched(), "eps")
    assert torch.allclose(rt.score, torch.ones(4), atol=1e-6)


def test_round_trip_with_fine_steps_is_stable_and_x0_matches_sampling():
    D = _mixture()
    e = _noise(2)
    coarse = st.round_trip(D, e, _sched(n=4), "eps")
    fine = st.round_trip(D, e, _sched(n=200), "eps")
    assert bool(torch.all(fine.score > coarse.score))
    assert bool(torch.all(fine.score > 0.995))


def test_select_picks_the_most_stable_and_is_micro_batch_invariant():
    D = _mixture()
    cands = _noise(10, seed=4)[:, None]  # K=10 candidates for one item
    seen = []

    def counting(x, sigma):
        seen.append(x.shape[0])
        return D(x, sigma)

    a = st.select(counting, cands, _sched(), "eps", micro_batch=3)
    b = st.select(D, cands, _sched(), "eps", micro_batch=10)
    assert max(seen) <= 3  # bounded memory: never more than micro_batch samples at once
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    assert a.scores.shape == (10, 1)
    assert int(a.best_index[0]) == int(torch.argmax(b.scores[:, 0]))
    assert a.x0.shape == cands.shape
    direct = st.round_trip(D, cands[:, 0], _sched(), "eps").score
    assert torch.allclose(a.scores[:, 0], direct, atol=1e-6)
    assert a.top(3) == torch.argsort(direct, descending=True)[:3].tolist()
    assert torch.equal(a.best_noise(cands), cands[int(a.best_index[0]), [0]])


def test_select_scores_each_batch_item_separately():
    """K candidates for each of B items: candidate-major batches, per-item winners."""
    means = torch.randn((6, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mixes = [GaussianMixture(means, 0.3), GaussianMixture(means * 0.5, 0.6)]
    Ds = [m.denoiser("eps") for m in mixes]

    def per_item(x, sigma):  # a "condition" per batch item, tiled candidate-major
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            out[i : i + 1] = Ds[i % 2](x[i : i + 1], sigma[i : i + 1])
        return out

    cands = _noise(10, seed=6).reshape(5, 2, *SHAPE)
    res = st.select(per_item, cands, _sched(), "eps", micro_batch=2)
    for item in range(2):
        alone = st.select(Ds[item], cands[:, item : item + 1], _sched(), "eps")
        assert torch.allclose(res.scores[:, item], alone.scores[:, 0], atol=1e-6)
        assert int(res.best_index[item]) == int(alone.best_index[0])
    assert res.best_noise(cands).shape == (2, *SHAPE)


def test_select_rejects_bad_input():
    D = _mixture()
    with pytest.raises(ValueError, match="NaN"):
        st.select(D, torch.full((2, 1, *SHAPE), float("nan")), _sched(), "eps")
    with pytest.raises(ValueError, match="micro_batch"):
        st.select(D, _noise(2)[:, None], _sched(), "eps", micro_batch=0)
    with pytest.raises(ValueError, match="K, B"):
        st.select(D, torch.zeros(3, 4), _sched(), "eps")


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_both_optimizers_raise_stability(kind):
    D = _mixture(kind)
    e = _noise(6)
    s = _sched(kind)
    paper = st.optimize(D, e, s, kind, method="momentum", steps=100, lr=3000.0)
    ours = st.optimize(D, e, s, kind, method="fixed_point", steps=20, max_change=None)
    start = paper.history[0]
    assert torch.allclose(ours.history[0], start)
    assert float(paper.best_score.mean()) > float(start.mean()) + 1e-3
    assert float(ours.best_score.mean()) > float(start.mean()) + 1e-3
    # ours reaches the paper's 100-step stability within 20 steps (on average over samples)
    reached = (ours.history.mean(1) >= paper.history[-1].mean() - 1e-4).nonzero()
    assert reached.numel() > 0 and int(reached[0]) <= 20, ours.history.mean(1)
    assert paper.round_trips == 101 and ours.round_trips == 21


def test_optimizer_returns_its_best_iterate_and_scores_match_a_fresh_round_trip():
    D = _mixture()
    e, s = _noise(3), _sched()
    r = st.optimize(D, e, s, "eps", method="fixed_point", steps=8)
    fresh = st.round_trip(D, r.noise, s, "eps")
    assert torch.allclose(fresh.score, r.best_score, atol=1e-6)
    assert torch.allclose(r.history.max(0).values, r.best_score)
    assert torch.allclose(fresh.x0, r.x0, atol=1e-6)


def test_trust_region_bounds_the_distance_from_the_input():
    D = _mixture("flow")
    e, s = _noise(4), _sched("flow")
    free = st.optimize(D, e, s, "flow", method="fixed_point", steps=10, max_change=None)
    bound = st.optimize(D, e, s, "flow", method="fixed_point", steps=10)  # default: 0.5
    dist = lambda r: ((r.noise - e).reshape(4, -1).norm(dim=1) / e.reshape(4, -1).norm(dim=1))
    assert float(dist(bound).max()) <= 0.5 + 1e-5
    assert float(dist(free).max()) > 0.5
    assert float(bound.best_score.mean()) > float(bound.history[0].mean())
    with pytest.raises(ValueError, match="max_change"):
        st.optimize(D, e, s, "flow", max_change=-1.0)


def test_lr_units_follow_latent_size():
    """lr is scaled by d / 65,536: the same lr means the same relative step at any size."""
    e_small = _noise(1)
    e_inv = e_small.roll(1, dims=-1)
    g = st._stability_grad(e_small, e_inv)
    rel_step = float((100.0 * e_small[0].numel() / st.REFERENCE_NUMEL) * g.norm() / e_small.norm())
    sin = float((1 - st.stability_score(e_small, e_inv) ** 2).sqrt())
    d_over_norm2 = e_small[0].numel() / float(e_small.norm() ** 2)  # ~1 for unit Gaussian noise
    assert rel_step == pytest.approx(100.0 * sin / st.REFERENCE_NUMEL * d_over_norm2, rel=1e-4)


def test_stop_rules_and_renormalize():
    D = _mixture()
    e, s = _noise(2) * 1.7, _sched()
    first = st.round_trip(D, e, s, "eps").score
    r = st.optimize(D, e, s, "eps", method="fixed_point", steps=50, target=float(first.max()) - 1.0)
    assert r.steps == 0 and r.round_trips == 1
    r = st.optimize(D, e, s, "eps", method="momentum", steps=50, lr=1e-3, patience=3, tol=1e-3)
    assert r.steps == 3
    r = st.optimize(D, e, s, "eps", method="fixed_point", steps=3, renormalize=True)
    d = e[0].numel()
    assert torch.allclose(r.noise.reshape(2, -1).pow(2).mean(1), torch.ones(2), atol=1e-5) or r.steps == 0
    with pytest.raises(ValueError, match="momentum"):
        st.optimize(D, e, s, "eps", momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        st.optimize(D, e, s, "eps", lr=0.0)
    with pytest.raises(ValueError):
        st.optimize(D, e, s, "eps", method="adamw")
    with pytest.raises(ValueError, match="NaN"):
        st.optimize(D, e * float("inf"), s, "eps")
    assert d == 64


def test_optimize_callback_interrupts():
    D = _mixture()

    class Stop(Exception):
        pass

    calls = []

    def cb(i, n, scores):
        calls.append(i)
        if i == 2:
            raise Stop()

    with pytest.raises(Stop):
        st.optimize(D, _noise(1), _sched(), "eps", steps=10, callback=cb)
    assert calls == [1, 2]


# -- successive halving --------------------------------------------------------------------------

def _halving_setup(k=8, b=1, seed=4):
    return _mixture(), _noise(k * b, seed=seed).reshape(k, b, *SHAPE), _sched(n=6)


def test_halving_with_every_rung_at_full_steps_equals_full():
    D, cands, s = _halving_setup(k=10)
    full = st.select(D, cands, s, "eps", micro_batch=3)
    halv = st.select(D, cands, s, "eps", micro_batch=3, search="halving", rungs=[6, 6, 6])
    assert torch.equal(halv.best_index, full.best_index)
    assert torch.equal(halv.scores, full.scores)  # the same 6-step round trips, reused, not rerun
    assert halv.trips == [10, 0, 0] and halv.passes() == full.passes() == 10 * st.round_trip_passes(6)
    assert torch.equal(halv.best_noise(cands), full.best_noise(cands))


@pytest.mark.parametrize("search", ["full", "halving"])
def test_one_candidate_is_returned_unchanged_by_both_searches(search):
    D, cands, s = _halving_setup(k=1, b=2)
    res = st.select(D, cands, s, "eps", search=search)
    assert res.best_index.tolist() == [0, 0] and res.rung_steps == [6] and res.trips == [1]
    assert torch.equal(res.best_noise(cands), cands[0])  # bit for bit the input noise
    direct = st.round_trip(D, cands[0], s, "eps").score
    assert torch.allclose(res.scores[0], direct, atol=1e-6)


def test_halving_keeps_the_better_half_per_rung_and_scores_at_the_deepest_rung():
    D, cands, s = _halving_setup(k=8)
    res = st.select(D, cands, s, "eps", search="halving", micro_batch=3, keep_x0=True)
    assert res.rung_steps == st.halving_rungs(8, 6) == [2, 3, 6] and res.trips == [8, 4, 2]
    assert res.passes() == 8 * st.round_trip_passes(2) + 4 * st.round_trip_passes(3) + 2 * st.round_trip_passes(6)
    first = st.round_trip(D, cands[:, 0], st.rung_schedule(s, 2), "eps").score
    top4 = set(torch.argsort(first, descending=True)[:4].tolist())
    assert {i for i in range(8) if int(res.rung[i, 0]) >= 1} == top4
    for i in range(8):  # every score is the round trip of the rung the candidate reached
        steps = res.rung_steps[int(res.rung[i, 0])]
        rt = st.round_trip(D, cands[i : i + 1, 0], st.rung_schedule(s, steps), "eps")
        assert float(res.scores[i, 0]) == pytest.approx(float(rt.score[0]), abs=1e-6)
        assert torch.allclose(res.x0[i, 0], rt.x0[0], atol=1e-6)
    finalists = [i for i in range(8) if int(res.rung[i, 0]) == 2]
    assert len(finalists) == 2 and int(res.best_index[0]) == max(finalists, key=lambda i: float(res.scores[i, 0]))
    assert res.top(1) == [int(res.best_index[0])] and set(res.top(2)) == set(finalists)


def test_halving_is_deterministic_micro_batch_invariant_and_per_item():
    means = torch.randn((6, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Ds = [GaussianMixture(means, 0.3).denoiser("eps"), GaussianMixture(means * 0.5, 0.6).denoiser("eps")]

    def per_item(x, sigma):
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            out[i : i + 1] = Ds[i % 2](x[i : i + 1], sigma[i : i + 1])
        return out

    cands, s = _noise(16, seed=6).reshape(8, 2, *SHAPE), _sched(n=6)
    runs = [st.select(per_item, cands, s, "eps", search="halving", micro_batch=mb) for mb in (1, 3, 8, 8)]
    for r in runs[1:]:
        assert torch.equal(r.best_index, runs[0].best_index) and torch.equal(r.rung, runs[0].rung)
        assert torch.allclose(r.scores, runs[0].scores, atol=1e-6)
    assert torch.equal(runs[2].scores, runs[3].scores)  # deterministic: the same call twice, bit for bit
    for item in range(2):
        alone = st.select(Ds[item], cands[:, item : item + 1], s, "eps", search="halving")
        assert int(alone.best_index[0]) == int(runs[0].best_index[item])
        assert torch.equal(alone.rung[:, 0], runs[0].rung[:, item])


def test_halving_rungs_and_rung_schedule():
    assert st.halving_rungs(8, 20) == [2, 6, 20] and st.halving_rungs(2, 20) == [20]
    assert st.halving_rungs(16, 10) == [2, 3, 6, 10] and st.halving_rungs(8, 1) == [1, 1, 1]
    assert st.halving_rungs(27, 9, eta=3) == [2, 4, 9]
    s = _sched(n=6)
    assert torch.equal(st.rung_schedule(s, 6), s)
    sub = st.rung_schedule(s, 2)
    assert sub.tolist() == [s[0].item(), s[3].item(), s[6].item()]
    # a rung list that leaves one survivor early stops there: that candidate has won
    D, cands, _ = _halving_setup(k=4)
    res = st.select(D, cands, s, "eps", search="halving", eta=4, rungs=[2, 4, 6])
    assert res.rung_steps == [2] and res.trips == [4]
    assert int(res.best_index[0]) == int(torch.argmax(res.scores[:, 0]))


class _Bad:
    def __init__(self, id, kw, match):
        self.id, self.kw, self.match = id, kw, match


BAD_SELECT = [
    _Bad("search-unknown", {"search": "beam"}, r"search: expected one of \['full', 'halving'\].*got 'beam'"),
    _Bad("search-none", {"search": None}, r"search: expected one of \['full', 'halving'\]"),
    _Bad("rungs-with-full", {"rungs": [2, 6]}, r"rungs=\[2, 6\] only applies to search='halving'"),
    _Bad("rungs-last-not-full", {"search": "halving", "rungs": [2, 4]}, r"rungs: expected .* the last = 6.*\[2, 4\]"),
    _Bad("rungs-decreasing", {"search": "halving", "rungs": [4, 2, 6]}, r"rungs: expected a non-decreasing"),
    _Bad("rungs-too-many-steps", {"search": "halving", "rungs": [2, 7]}, r"rungs entry: expected an integer in \[1, 6\]"),
    _Bad("rungs-zero", {"search": "halving", "rungs": [0, 6]}, r"rungs entry: expected an integer in \[1, 6\]"),
    _Bad("rungs-nan", {"search": "halving", "rungs": [float("nan"), 6]}, r"rungs entry: expected a finite integer"),
    _Bad("rungs-empty", {"search": "halving", "rungs": []}, r"rungs: expected a non-decreasing .*got \[\]"),
    _Bad("rungs-not-a-list", {"search": "halving", "rungs": 6}, r"rungs: expected a non-decreasing .*got 6"),
    _Bad("eta-one", {"search": "halving", "eta": 1}, r"eta: expected an integer in \[2, inf\)"),
    _Bad("eta-fraction", {"search": "halving", "eta": 2.5}, r"eta: expected an integer"),
    _Bad("min-steps-zero", {"search": "halving", "min_steps": 0}, r"min_steps: expected an integer in \[1, inf\)"),
]


@pytest.mark.parametrize("case", BAD_SELECT, ids=[c.id for c in BAD_SELECT])
def test_select_refuses_bad_search_settings(case):
    D, cands, s = _halving_setup(k=4)
    with pytest.raises(ValueError, match=case.match):
        st.select(D, cands, s, "eps", **case.kw)
