"""The teacher filter (noisecraft.train.teacher_filter): keep the top-N teacher samples by a pluggable scorer.

Tier 1: torch + diffusers, CPU, no ComfyUI, nothing downloaded. Checks: the view keeps exactly the N best
(ties to the lower index) and reads the stored samples; scores of a folder cache are saved and reused;
training on a filtered cache runs, records the filter in the refiner, and resumes bit for bit; a user
scorer through a ``module:function`` spec (with the prompts keyword); the CLI flags; bad inputs (keep out
of range, scorers returning the wrong shape or NaN, unknown names listing the known ones).
"""

import json

import pytest
import torch

from noisecraft.hosts import toy
from noisecraft.hosts.toy import toy_confidence_scorer, toy_host
from noisecraft.lora import read_lora_file
from noisecraft.sigmas import get_sigmas
from noisecraft.train import RefinerTrainConfig, TeacherCache, build_teacher_cache, train_refiner
from noisecraft.train.teacher_filter import (colorfulness_scorer, filter_teacher_cache, keep_count,
                                             register_scorer, resolve_scorer, scorer_names, sharpness_scorer, top_n)

SHAPE = (1, 4, 4)


def _fake_guided(cond_ids):
    c = cond_ids.float().view(-1, 1, 1, 1)
    return lambda x, s: x / (1 + s.view(-1, 1, 1, 1)) + c


def _cache(root, total=10):
    return build_teacher_cache(root, _fake_guided, shape=SHAPE, conds=["a", "b", "c"], total=total,
                               sigmas=torch.tensor([4.0, 1.0, 0.0]), kind="eps", base_seed=7, shard_size=4,
                               batch_size=3, meta={"model": "fake"})


def mean_score(images, cond_ids):
    return images.flatten(1).mean(1)


def test_top_n_keeps_exactly_the_n_best_in_a_deterministic_order(tmp_path):
    cache = _cache(tmp_path / "c")
    every = cache.get(range(10))
    scores = every.x0.flatten(1).mean(1)
    best = sorted(range(10), key=lambda i: (-float(scores[i]), i))[:4]
    view = filter_teacher_cache(cache, mean_score, 4)
    assert view.kept_from.tolist() == sorted(best) and len(view) == view.total == 4
    got = view.get(range(4))
    assert torch.equal(got.x0, every.x0[sorted(best)]) and torch.equal(got.e, every.e[sorted(best)])
    assert torch.equal(got.cond, every.cond[sorted(best)]) and got.index.tolist() == [0, 1, 2, 3]
    f = view.filter
    assert (f["kept"], f["of"]) == (4, 10) and f["scorer"].endswith("test_teacher_filter:mean_score")
    assert f["threshold"] == pytest.approx(float(scores[best[-1]])) and view.meta["filter"] == f
    assert view.meta["model"] == "fake" and cache.filter is None and len(cache) == 10
    # ties go to the lower index; the kept set is listed in store order
    assert top_n(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 2).tolist() == [1, 2]
    # batches and positions over the kept samples only, a pure function of the seed
    seen = [b.index.tolist() for (b, _), _ in zip(view.batches(2, seed=3), range(4))]
    assert sorted(seen[0] + seen[1]) == [0, 1, 2, 3]
    assert seen == [b.index.tolist() for (b, _), _ in zip(view.batches(2, seed=3), range(4))]
    # a folder cache saves the scores; the next filter with that scorer reuses them (no scoring)
    saved = list((tmp_path / "c").glob("scores_*.safetensors"))
    assert len(saved) == 1

    def never(images, cond_ids):
        raise AssertionError("scored again")

    never.name = f["scorer"]  # the same scorer name: the saved scores are reused
    again = filter_teacher_cache(TeacherCache(tmp_path / "c"), never, 0.2)
    assert again.kept_from.tolist() == sorted(best[:2])
    # a view of a view maps to the stored samples; views never write
    inner = again.subset([1], {"scorer": "by hand"})
    assert inner.kept_from.tolist() == [sorted(best[:2])[1]]
    with pytest.raises(ValueError, match="view"):
        view.reindex()
    with pytest.raises(ValueError, match="no folder"):
        view.write_shard(0, every.x0[:4])
    with pytest.raises(ValueError, match="no repeats"):
        cache.subset([1, 1], {})


def test_shipped_generic_scorers_measure_what_they_say():
    flat = torch.full((1, 3, 16, 16), 0.5)
    noisy = (flat + 0.2 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    sharp = sharpness_scorer()(torch.cat([flat, noisy]), torch.zeros(2))
    assert sharp[0] == 0 and sharp[1] > 0
    grey, red = torch.full((1, 3, 8, 8), 0.4), torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    col = colorfulness_scorer()(torch.cat([grey, red]), torch.zeros(2))
    # a constant image: the mean term only; pure red: rg = 1, yb = 0.5 -> 0.3 * sqrt(1.25)
    assert col[0] == pytest.approx(0.0, abs=1e-6) and col[1] == pytest.approx(0.3 * 1.25 ** 0.5, rel=1e-5)
    assert {"sharpness", "colorfulness"} <= set(scorer_names())
    with pytest.raises(ValueError, match="RGB"):
        colorfulness_scorer()(torch.zeros(1, 4, 8, 8), torch.zeros(1))


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    model = toy.load_toy()
    host = toy_host(model)
    root = tmp_path_factory.mktemp("toy_filter") / "cache"
    cache = build_teacher_cache(root, lambda c: host.denoiser(c, cfg=3.0), shape=model.latent_shape,
                                conds=list(range(10)), total=16, sigmas=get_sigmas(model.table, "normal", 4),
                                kind="eps", base_seed=321, shard_size=8, batch_size=16)
    return host, cache


def test_training_on_a_filtered_cache_runs_and_resumes_exactly(toy_cache, tmp_path):
    host, cache = toy_cache
    register_scorer("toy-classifier", toy_confidence_scorer)
    view = filter_teacher_cache(cache, "toy-classifier", 10)
    every = cache.get(range(16))
    conf = toy.digit_confidence(every.x0, every.cond)
    assert view.kept_from.tolist() == top_n(conf, 10).tolist()
    assert float(conf[view.kept_from].min()) >= float(conf.sort().values[-10])
    config = RefinerTrainConfig(steps=6, rank=2, lr=3e-3, batch_size=4, student_steps=2, checkpoint_every=2)
    full = train_refiner(host, view, tmp_path / "full", config)
    full.lora.remove()
    killed = train_refiner(host, view, tmp_path / "killed", config, stop_after=5)
    killed.lora.remove()
    # a new process: the same filter on the reopened folder (its saved scores) gives the same view
    again = filter_teacher_cache(TeacherCache(cache.root), "toy-classifier", 10)
    assert again.kept_from.tolist() == view.kept_from.tolist()
    resumed = train_refiner(host, again, tmp_path / "killed", config, resume=True)
    resumed.lora.remove()
    assert (tmp_path / "full" / "refiner.safetensors").read_bytes() == \
           (tmp_path / "killed" / "refiner.safetensors").read_bytes()
    _, meta = read_lora_file(tmp_path / "full" / "refiner.safetensors")
    training = json.loads(meta["noisecraft.training"])
    assert training["cache_samples"] == 10 and training["teacher"]["filter"]["scorer"] == "toy-classifier"
    assert training["teacher"]["filter"]["of"] == 16
    # a resume on another kept set is refused (other sample count)
    with pytest.raises(ValueError, match="another teacher cache"):
        train_refiner(host, filter_teacher_cache(cache, "toy-classifier", 8), tmp_path / "killed",
                      RefinerTrainConfig(**{**config.__dict__, "steps": 8}), resume=True)


USER_MODULE = '''
import torch
calls = []

def score(images, cond_ids, prompts=None):
    calls.append(list(prompts))
    return -images.flatten(1).mean(1)

def wrong_shape(images, cond_ids):
    return torch.zeros(len(cond_ids) + 1)

def with_nan(images, cond_ids):
    s = torch.zeros(len(cond_ids))
    s[0] = float("nan")
    return s

not_callable = 3
'''


def test_a_user_scorer_plugs_in_by_module_function_spec(tmp_path, monkeypatch):
    (tmp_path / "nc_user_scorers.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cache = _cache(tmp_path / "c")
    view = filter_teacher_cache(cache, "nc_user_scorers:score", 3, batch_size=4)
    scores = -cache.get(range(10)).x0.flatten(1).mean(1)
    assert view.kept_from.tolist() == top_n(scores, 3).tolist() and view.filter["scorer"] == "nc_user_scorers:score"
    import nc_user_scorers

    assert nc_user_scorers.calls[0] == ["a", "b", "c", "a"]  # prompts = cache.conds of each sample
    assert resolve_scorer("nc_user_scorers:score").name == "nc_user_scorers:score"


def test_bad_inputs_are_refused_with_the_fix(tmp_path, monkeypatch):
    (tmp_path / "nc_user_scorers2.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cache = _cache(tmp_path / "c")
    for keep, match in ((11, "1..10"), (0, "1..10"), (-1, "1..10"), (1.5, r"\(0, 1\]"), (0.0, r"\(0, 1\]"),
                        (float("nan"), "whole number"), (True, "whole number"), ("3", "whole number")):
        with pytest.raises(ValueError, match=match):
            filter_teacher_cache(cache, mean_score, keep)
    assert keep_count(1.0, 10) == 10 and keep_count(0.25, 10) == 3 and keep_count(0.01, 10) == 1
    with pytest.raises(ValueError, match=r"shape \[11\] for 10 samples"):
        filter_teacher_cache(cache, "nc_user_scorers2:wrong_shape", 2, batch_size=16, save_scores=False)
    with pytest.raises(ValueError, match=r"NaN/inf for samples \[0\]"):
        filter_teacher_cache(cache, "nc_user_scorers2:with_nan", 2, save_scores=False)
    with pytest.raises(ValueError, match="known scorers are .*colorfulness.*sharpness"):
        filter_teacher_cache(cache, "no-such-scorer", 2)
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        resolve_scorer("no_such_module_xyz:score")
    with pytest.raises(ValueError, match="no callable 'not_callable'"):
        resolve_scorer("nc_user_scorers2:not_callable")
    with pytest.raises(ValueError, match="registered already"):
        register_scorer("sharpness", colorfulness_scorer)
    assert not list((tmp_path / "c").glob("scores_*"))  # nothing saved by the failed filters


def test_cli_keep_and_scorer_flags(tmp_path, capsys, monkeypatch):
    from noisecraft.__main__ import main

    (tmp_path / "nc_user_scorers3.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["train-refiner", "--toy", "--steps", "2", "--samples", "8", "--batch", "4", "--student-steps", "2",
              "--teacher-steps", "3", "--rank", "2", "--shard-size", "8"]
    for bad, match in ((["--keep", "0"], "whole number"), (["--keep", "1.5"], "fraction"),
                       (["--scorer", "sharpness"], "give --keep"), (["--keep", "9"], "more than"),
                       (["--keep", "4", "--scorer", "nope"], "known scorers are")):
        assert main([*common, "--out", str(tmp_path / "bad"), *bad]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "bad" / "teacher_cache").exists()  # refused before any work
    assert main([*common, "--out", str(tmp_path / "toy"), "--keep", "0.5"]) == 0
    _, meta = read_lora_file(tmp_path / "toy" / "refiner.safetensors")
    f = json.loads(meta["noisecraft.training"])["teacher"]["filter"]
    assert (f["scorer"], f["kept"], f["of"]) == ("toy-classifier", 4, 8)
    assert json.loads((tmp_path / "toy" / "teacher_filter.json").read_text())["scorer"] == "toy-classifier"
    more = [*common[:2], "--steps", "3", *common[4:], "--out", str(tmp_path / "toy"), "--resume"]
    for other in (["--keep", "4", "--scorer", "sharpness"], []):  # another filter (same N), or none: refused
        assert main([*more, *other]) == 2
        assert "was trained on the teacher filter" in capsys.readouterr().err
    assert main([*more, "--keep", "0.5"]) == 0  # the same filter resumes
    assert main([*common, "--out", str(tmp_path / "user"), "--keep", "4", "--scorer", "nc_user_scorers3:score"]) == 0
    _, meta = read_lora_file(tmp_path / "user" / "refiner.safetensors")
    assert json.loads(meta["noisecraft.training"])["teacher"]["filter"]["scorer"] == "nc_user_scorers3:score"


def test_a_diffusers_folder_with_vae_is_decoded_for_the_scorer(tmp_path, capsys):
    """--model DIR with a vae/ (a tiny AutoencoderKL): the scorer gets its decoded images in [0, 1]."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from safetensors.torch import save_file

    from noisecraft.__main__ import main
    from noisecraft.train.teacher_filter import diffusers_vae_decoder

    model, folder = toy.load_toy(), tmp_path / "model"  # the toy UNet as a diffusers folder, plus a tiny VAE
    model.unet.save_pretrained(str(folder / "unet"))
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        str(folder / "scheduler"))
    assert diffusers_vae_decoder(folder) is None  # no vae/: the scorer gets the latents
    with torch.random.fork_rng(devices=[]):  # diffusers' default init, seeded; the outer RNG state is restored
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=1, block_out_channels=(8,),
                            norm_num_groups=4, layers_per_block=1, scaling_factor=0.5)
    vae.save_pretrained(str(folder / "vae"))
    decode = diffusers_vae_decoder(folder)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ((vae.decode(z / 0.5).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(decode(z), want, atol=1e-6) and decode(z).shape == (2, 3, 8, 8)

    (tmp_path / "prompts.txt").write_text("five\nnine\n")
    embeds = {"cond": model.cond(torch.tensor([5, 9])), "uncond": model.uncond(1)}
    save_file({k: v.contiguous() for k, v in embeds.items()}, str(tmp_path / "embeds.safetensors"))
    args = ["train-refiner", "--model", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--prompt-embeds",
            str(tmp_path / "embeds.safetensors"), "--cfg", "3", "--steps", "1", "--samples", "6", "--batch", "2",
            "--student-steps", "2", "--teacher-steps", "2", "--rank", "2", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a"), "--keep", "2"]) == 2
    assert "--keep needs --scorer with --model" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "a"), "--keep", "2", "--scorer", "toy-classifier"]) == 2
    assert "use it with --toy" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "a"), "--keep", "2", "--scorer", "colorfulness"]) == 0
    _, meta = read_lora_file(tmp_path / "a" / "refiner.safetensors")
    f = json.loads(meta["noisecraft.training"])["teacher"]["filter"]
    assert (f["kept"], f["of"], f["decode"]) == (2, 6, "vae (model/vae)")
    cache = TeacherCache(tmp_path / "a" / "teacher_cache")
    every = cache.get(range(6))
    scores = colorfulness_scorer()(decode(every.x0), every.cond)
    assert f["threshold"] == pytest.approx(float(scores.sort().values[-2]), rel=1e-5)
