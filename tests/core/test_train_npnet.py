"""NPNet training (noisecraft.train.npnet_pairs / npnet): pairs, filter, trainer, resume, CLI, toy NPNet.

Tier 1: torch (+ diffusers for the toy), CPU, no ComfyUI. Pairs are checked on exact Gaussian
denoisers (closed-form posterior mean) so the re-denoise step can be recomputed by hand.
"""

import json

import pytest
import torch
from safetensors import safe_open

from noisecraft.hosts import toy
from noisecraft.npnet import golden_noise, load_npnet
from noisecraft.rng import seeded_noise
from noisecraft.sigmas import SigmaTable, get_sigmas
from noisecraft.train import NPNetTrainConfig, PairStore, collect_pairs, npnet_config_for, re_denoise, train_npnet
from noisecraft.train.npnet import SMALL_NPNET, init_npnet, pair_loss
from noisecraft.weights import find_entry, sha256_file, verify_file

SHAPE = (1, 8, 8)


class GaussHost:
    """Exact guided denoisers: condition p has data N(mu_p, 0.5^2) per element, the null condition
    N(0, 1); CFG mixes the two posterior means. ``conds`` are arbitrary 1x4 'prompt embeddings'."""

    table = SigmaTable.scaled_linear("eps")
    base_model = "gauss"
    cond_labels = ["minus", "plus", "zero"]
    means = torch.tensor([-0.8, 0.8, 0.0])
    conds = torch.arange(12, dtype=torch.float32).reshape(3, 1, 4) / 10

    @staticmethod
    def _posterior(x, sigma, mu, c):
        s2 = sigma.view(-1, 1, 1, 1) ** 2
        return mu + c * c / (c * c + s2) * (x - mu)

    def denoiser(self, ids, cfg=1.0):
        mu = self.means[torch.as_tensor(ids).long()].view(-1, 1, 1, 1)

        def d(x, sigma):
            cond = self._posterior(x, sigma, mu, 0.5)
            if float(cfg) == 1.0:
                return cond
            return self._posterior(x, sigma, 0.0, 1.0) + float(cfg) * (cond - self._posterior(x, sigma, 0.0, 1.0))
        return d


def _collect(root, **kw):
    args = dict(total=10, w_l=3.0, w_w=1.0, steps=6, base_seed=5, shard_size=4, batch_size=3, shape=SHAPE)
    args.update(kw)
    return collect_pairs(root, GaussHost(), **args)


def test_re_denoise_matches_the_hand_computed_step_and_cfg_gap():
    host = GaussHost()
    ids = torch.tensor([0, 1, 2, 1])
    e = seeded_noise(3, (4, *SHAPE))
    s = get_sigmas(host.table, "normal", 10)
    s0, s1 = float(s[0]), float(s[1])
    f = (1 + s0 * s0) ** 0.5
    d_l, d_w = host.denoiser(ids, 5.5), host.denoiser(ids, 1.0)
    out = re_denoise(d_l, d_w, e, s, "eps")
    # by hand: Euler down at w_l, Euler up at w_w with the slope at the current latent and sigma
    x = e * f
    x1 = x + (s1 - s0) * (x - d_l(x, torch.full((4,), s0))) / s0
    x2 = x1 + (s0 - s1) * (x1 - d_w(x1, torch.full((4,), s1))) / s1
    assert torch.allclose(out, x2 / f, atol=1e-5)
    # w_l = w_w: only the one-step round-trip error; w_l > w_w: the guidance moves the noise much more
    same = re_denoise(d_w, d_w, e, s, "eps")
    err = float((same - e).pow(2).mean().sqrt())
    gap = float((out - e).pow(2).mean().sqrt())
    assert err < 0.1 and gap > 3 * err, (err, gap)
    assert torch.equal(re_denoise(d_l, d_w, e, s, "eps"), out)  # deterministic
    with pytest.raises(ValueError, match="at least 2 steps"):
        re_denoise(d_l, d_w, e, torch.tensor([14.6, 0.0]), "eps")


def test_pair_folder_is_deterministic_resumable_and_keeps_all_by_default(tmp_path, check_resumed_build):
    store = _collect(tmp_path / "a")
    assert store.complete and store.num_shards == 3 and len(store) == 10
    assert store.meta["w_l"] == 3.0 and store.meta["scorer"] is None and store.meta["base_model"] == "gauss"
    assert torch.equal(store.embeds, GaussHost.conds)
    assert bool(store.column("kept").all()) and bool(torch.isnan(store.column("score_source")).all())
    b = store.get([7, 0])
    for j, i in enumerate([7, 0]):
        assert torch.equal(b.e[j], seeded_noise(5 + i, (1, *SHAPE))[0]) and int(b.cond[j]) == i % 3
    s = get_sigmas(GaussHost.table, "normal", 6)
    host = GaussHost()
    want = re_denoise(host.denoiser(b.cond, 3.0), host.denoiser(b.cond, 1.0), b.e, s, "eps")
    assert torch.allclose(b.target, want, atol=1e-6)
    # a second folder, built one shard first (a killed job) then finished: identical bytes
    check_resumed_build(_collect, tmp_path, first=[2], missing=[0, 1], batch=2)
    with pytest.raises(ValueError, match="different"):
        _collect(tmp_path / "b", w_l=5.5)
    with pytest.raises(FileNotFoundError, match="not an NPNet pair folder"):
        PairStore(tmp_path / "none")


def test_keep_filter_semantics(tmp_path):
    seen = []

    def scorer(x0, ids):  # prefers samples close to their condition's mean
        seen.append(x0.shape[0])
        return -(x0 - GaussHost.means[ids].view(-1, 1, 1, 1)).pow(2).mean((1, 2, 3))

    store = _collect(tmp_path / "f", scorer=scorer, margin=0.0, total=12)
    s0, s1, kept = store.column("score_source"), store.column("score_target"), store.column("kept").bool()
    assert torch.equal(kept, s1 > s0) and sum(seen) == 2 * 12  # x0 and x0' scored once each
    assert 0 < int(kept.sum()) <= 12
    assert torch.equal(store.kept_indices(), kept.nonzero().flatten())
    strict = store.kept_indices(margin=1e9)
    assert strict.numel() == 0
    with pytest.raises(ValueError, match="batch size"):
        next(store.batches(4, margin=1e9))
    order = [b.index.tolist() for (b, _), _ in zip(store.batches(1), range(int(kept.sum())))]
    assert sorted(sum(order, [])) == kept.nonzero().flatten().tolist()  # only kept pairs, each once per epoch
    with pytest.raises(ValueError, match="one float per sample"):
        _collect(tmp_path / "bad", scorer=lambda x0, ids: torch.zeros(1))
    with pytest.raises(ValueError, match="no scores"):
        _collect(tmp_path / "a").kept_indices(margin=0.0)


def test_toy_confidence_scorer_is_per_sample():
    from noisecraft.hosts.toy import toy_confidence_scorer

    x = toy.digits_to_x(torch.zeros(3, 1, 8, 8))
    scores = toy_confidence_scorer()(x, torch.tensor([0, 1, 2]))
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 1)).all())
    assert torch.allclose(scores.mean(), torch.tensor(toy.score_digits(x, torch.tensor([0, 1, 2]))["confidence"]))


@pytest.fixture(scope="module")
def gauss_pairs(tmp_path_factory):
    return _collect(tmp_path_factory.mktemp("pairs") / "p", total=128, shard_size=64, batch_size=64)


def test_short_training_lowers_the_mse(gauss_pairs, tmp_path):
    cfg = npnet_config_for(gauss_pairs, **SMALL_NPNET)
    init = init_npnet(cfg, seed=0).eval()
    x = seeded_noise(1, (2, *SHAPE))
    assert torch.allclose(init(x, gauss_pairs.embeds[:2], canonical_signs=True), x, atol=1e-5)  # starts as identity
    before, identity = pair_loss(init, gauss_pairs, range(128))
    assert before == pytest.approx(identity, rel=1e-4)
    result = train_npnet(gauss_pairs, tmp_path / "run", NPNetTrainConfig(steps=12, batch_size=16, lr=5e-3,
                                                                            checkpoint_every=6), cfg)
    after, _ = pair_loss(load_npnet(result.npnet_path), gauss_pairs, range(128))
    assert after < 0.85 * before, (before, after)
    log = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and all(r["loss"] > 0 for r in log)
    from PIL import Image

    assert Image.open(tmp_path / "run" / "loss.png").size == (640, 360)
    with safe_open(str(result.npnet_path), "pt") as f:
        meta = f.metadata()
    assert meta["noisecraft.kind"] == "npnet" and json.loads(meta["noisecraft.training"])["pairs"]["w_l"] == 3.0
    with pytest.raises(ValueError, match="does not fit"):
        train_npnet(gauss_pairs, tmp_path / "x", NPNetTrainConfig(steps=1),
                    npnet_config_for(gauss_pairs, **{**SMALL_NPNET, "text_width": 8}))


def test_resume_after_kill_equals_uninterrupted_run(gauss_pairs, tmp_path):
    cfg = npnet_config_for(gauss_pairs, **SMALL_NPNET)
    config = NPNetTrainConfig(steps=6, batch_size=16, checkpoint_every=2)
    train_npnet(gauss_pairs, tmp_path / "full", config, cfg)
    killed = train_npnet(gauss_pairs, tmp_path / "killed", config, cfg, stop_after=5)  # checkpoint at 4, killed at 5
    assert killed.stopped_early and not (tmp_path / "killed" / "npnet.safetensors").exists()
    with pytest.raises(FileExistsError, match="resume"):
        train_npnet(gauss_pairs, tmp_path / "killed", config, cfg)
    with pytest.raises(ValueError, match="other settings"):
        train_npnet(gauss_pairs, tmp_path / "killed", NPNetTrainConfig(**{**config.__dict__, "lr": 1e-2}), cfg,
                    resume=True)
    resumed = train_npnet(gauss_pairs, tmp_path / "killed", config, cfg, resume=True)
    assert resumed.step == 6
    assert (tmp_path / "full" / "npnet.safetensors").read_bytes() == (tmp_path / "killed" / "npnet.safetensors").read_bytes()
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "wall_s"} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(tmp_path / "full" / "loss.jsonl") == strip(tmp_path / "killed" / "loss.jsonl")


def _in_memory_copy(store: PairStore) -> PairStore:
    """The same pairs as ``store``, in a store held in memory (as ComfyUI's Collect NPNet Pairs makes one)."""
    mem = PairStore.in_memory(shape=store.shape, conds=store.conds, embeds=store.embeds,
                              base_seed=store.base_seed, total=store.total, meta=store.meta,
                              shard_size=store.shard_size)
    kept, s0, s1 = store.column("kept"), store.column("score_source"), store.column("score_target")
    for k in range(store.num_shards):
        idx = list(store.shard_range(k))
        b = store.get(idx)
        mem.write_shard(k, b.e, b.target, kept[idx], s0[idx], s1[idx])
    return mem


def test_in_memory_store_reads_and_trains_exactly_like_the_folder(gauss_pairs, tmp_path):
    mem = _in_memory_copy(gauss_pairs)
    assert mem.in_memory_store and not gauss_pairs.in_memory_store and mem.complete and len(mem) == 128
    assert "in memory" in repr(mem) and mem.identity_mse() == gauss_pairs.identity_mse()
    for (a, pa), (b, pb), _ in zip(mem.batches(16, seed=3), gauss_pairs.batches(16, seed=3), range(10)):
        assert pa == pb and torch.equal(a.index, b.index) and torch.equal(a.e, b.e) and torch.equal(a.target, b.target)
    assert torch.equal(mem.column("seed"), gauss_pairs.column("seed"))
    cfg, config = npnet_config_for(mem, **SMALL_NPNET), NPNetTrainConfig(steps=4, batch_size=16, seed=1)
    train_npnet(mem, tmp_path / "mem", config, cfg)
    train_npnet(gauss_pairs, tmp_path / "folder", config, cfg)
    assert (tmp_path / "mem" / "npnet.safetensors").read_bytes() == \
        (tmp_path / "folder" / "npnet.safetensors").read_bytes()


def test_in_memory_store_refuses_bad_shards_and_is_incomplete_until_written():
    mem = PairStore.in_memory(shape=SHAPE, conds=[0, 1], embeds=torch.zeros(2, 1, 4), base_seed=2**64 - 1, total=3)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        next(mem.batches(1))
    e, nan, ones = mem.sample_noise(range(3)), torch.full((3,), float("nan")), torch.ones(3)
    assert torch.equal(e[1:2], seeded_noise(0, (1, *SHAPE)))  # ComfyUI's 64-bit seeds wrap around
    with pytest.raises(ValueError, match="shape"):
        mem.write_shard(0, e[:2], e[:2], ones[:2], nan[:2], nan[:2])
    with pytest.raises(FloatingPointError, match="non-finite target"):
        mem.write_shard(0, e, e * float("nan"), ones, nan, nan)
    with pytest.raises(ValueError, match="one value per pair"):
        mem.write_shard(0, e, e, ones[:2], nan, nan)
    mem.write_shard(0, e, e, ones, nan, nan)
    assert mem.complete and mem.column("seed").tolist() == [-1, 0, 1]  # uint64 seeds as int64 bits
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        PairStore.in_memory(shape=SHAPE, conds=[0], embeds=torch.full((1, 1, 4), float("inf")), base_seed=0, total=1)
    with pytest.raises(ValueError, match="one row per condition"):
        PairStore.in_memory(shape=SHAPE, conds=[0, 1], embeds=torch.zeros(1, 1, 4), base_seed=0, total=1)


def test_fine_tuning_starts_from_the_given_net_and_precision_is_a_resume_setting(gauss_pairs, tmp_path):
    cfg = npnet_config_for(gauss_pairs, **SMALL_NPNET)
    start = init_npnet(cfg, seed=4)
    with torch.no_grad():
        start.beta.fill_(0.5)  # not the identity any more
    before = {k: v.clone() for k, v in start.state_dict().items()}
    res = train_npnet(gauss_pairs, tmp_path / "ft", NPNetTrainConfig(steps=2, batch_size=16), initial=start)
    assert res.model is start and res.model.config == cfg
    first = res.records[0]
    assert first["loss"] > 1.5 * first["identity_mse"]  # the first loss is the given net's, not the identity's
    assert any(not torch.equal(before[k], v) for k, v in start.state_dict().items())
    with pytest.raises(ValueError, match="another shape"):
        train_npnet(gauss_pairs, tmp_path / "ft2", NPNetTrainConfig(steps=1), cfg, initial=init_npnet(
            npnet_config_for(gauss_pairs, **{**SMALL_NPNET, "svd_hidden": 16})))
    bf16 = NPNetTrainConfig(steps=3, batch_size=16, precision="bf16", checkpoint_every=1)
    res = train_npnet(gauss_pairs, tmp_path / "bf16", bf16, cfg, stop_after=2)
    assert all(torch.isfinite(torch.tensor(res.losses))) and res.stopped_early
    with pytest.raises(ValueError, match=r"other settings \(precision: 'bf16' there, 'fp32' now"):
        train_npnet(gauss_pairs, tmp_path / "bf16", NPNetTrainConfig(steps=3, batch_size=16), cfg, resume=True)
    assert train_npnet(gauss_pairs, tmp_path / "bf16", bf16, cfg, resume=True).step == 3


def test_cli_collect_pairs_and_train_npnet_toy(tmp_path, capsys):
    from noisecraft.__main__ import main

    assert main(["collect-pairs", "--out", str(tmp_path / "x")]) == 2  # neither --toy nor --model
    assert main(["collect-pairs", "--model", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # no --prompts
    assert "--prompts" in capsys.readouterr().err
    pairs = tmp_path / "pairs"
    assert main(["collect-pairs", "--toy", "--out", str(pairs), "--pairs", "8", "--steps", "3", "--shard-size", "8",
                 "--filter", "toy-classifier"]) == 0
    store = PairStore(pairs)
    assert store.meta["scorer"] == "toy-classifier-confidence" and store.meta["w_l"] == 3.0
    assert store.embeds.shape == (10, 1, 32)
    args = ["train-npnet", "--pairs", str(pairs), "--out", str(tmp_path / "run"), "--steps", "2", "--batch", "2",
            "--margin", "-1"]  # margin -1 on confidences: every pair
    assert main(args) == 0
    model = load_npnet(tmp_path / "run" / "npnet.safetensors")
    assert model.config.swin_img_size == 32 and model.config.tokens == 1
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main([*args[:5], "--steps", "3", *args[7:], "--resume"]) == 0


# -- the shipped toy NPNet ---------------------------------------------------------------------------


def test_shipped_toy_npnet_matches_manifest_and_loads_strictly():
    entry = find_entry("toy-npnet")
    assert entry.local_path.resolve() == toy.NPNET_WEIGHTS.resolve()
    verify_file(toy.NPNET_WEIGHTS, entry)
    assert sha256_file(toy.NPNET_WEIGHTS) == entry.sha256 and toy.NPNET_WEIGHTS.stat().st_size < 4 << 20
    with safe_open(str(toy.NPNET_WEIGHTS), "pt") as f:
        meta = f.metadata()
    training = json.loads(meta["noisecraft.training"])
    assert training["pairs"]["w_l"] == 3.0 and training["pairs"]["w_w"] == 1.0 and training["canonical_signs"]
    model = toy.load_toy_npnet()
    cfg = model.config
    assert (cfg.latent_channels, cfg.latent_size, cfg.tokens, cfg.text_width) == (1, 8, 1, 32)
    assert (cfg.swin_img_size, cfg.swin_depths, cfg.swin_heads) == (32, (2, 2), (2, 4))
    tm = toy.load_toy()
    labels = torch.arange(10)
    e = seeded_noise(900_000, (10, *SHAPE))
    g = golden_noise(model, e, tm.cond(labels))
    change = float((g - e).pow(2).mean().sqrt())
    assert 0.005 < change < 0.5 and torch.equal(g, golden_noise(model, e, tm.cond(labels)))
