"""Teacher caches cross hosts (issue 17): a ComfyUI-built cache trains from the shell, a CLI-built one reads in ComfyUI.

Tier 1 (torch + diffusers + transformers + peft, CPU, no ComfyUI, nothing downloaded). The ComfyUI side is the
core code its nodes run (``nodes/train_store.py``): ComfyUI's CONDITIONING entries (``[cond [1, L, D], dict]``)
become stored rows with :func:`~noisecraft.train.cond_store.rows_from_conditioning`, and a batch of stored rows
becomes one CONDITIONING entry with :func:`~noisecraft.train.cond_store.conditioning_from_rows` (Train Refiner's
``stored_denoiser``); the CLI side reads the same rows through ``RefinerHost.use_conds`` / ``denoiser``.

* A CLI-built cache's rows (the folder's text encoders, as ``train-refiner --model`` encodes them) through the
  node path and back are the same rows, for SD1, SDXL and SD3; the CLI's batch and the node's batch of the same
  ids hold the same tensors.
* A cache written in ComfyUI's layout (rows from ComfyUI-shaped entries, 77- and 154-token prompts, one chunk
  mixing both; meta ``host: comfyui`` as Build Teacher Cache writes it) trains from ``python -m noisecraft
  train-refiner --model DIR --cache CACHE`` with no ``--prompts`` (a subprocess: rc 0, the refiner written, the
  cache untouched); a guidance-range one trains a guidance-conditioned refiner, a PAG one with its PAG scale;
  ``--validate-every`` works with ``--prompts`` whose training prompts are the cache's. The guided teacher over
  154-token rows and a 77-token negative runs them at one token count (ComfyUI's batching).
* The refusals (one line, rc 2, no traceback): a model of another kind, another conditioning width, other
  ``--prompts``, a teacher flag with another value than the cache's, an unfinished cache.

The tiny pipelines are ``tests/core/test_families.py``'s (random weights, CLIP width 32).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from noisecraft.__main__ import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FAMILY = {"sd1": "sd", "sdxl": "sdxl", "sd3": "sd3"}
CFG, STEPS, SEED, PER_PROMPT = 5.0, 2, 7, 2
TEXTS = ["a red cat", "a very long prompt about a blue dog", "a green bird"]


def _families_module():
    spec = importlib.util.spec_from_file_location("nc_test_families", Path(__file__).with_name("test_families.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FAM = _families_module()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """``pipelines(family)``: that tiny pipeline's diffusers folder, made once per module."""
    d = tmp_path_factory.mktemp("interchange")
    done: dict = {}

    def get(family: str) -> Path:
        if family not in done:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("HF_HUB_OFFLINE", "1")
                _FAM.build_pipeline(family, d / family)
            done[family] = d / family
        return done[family]

    return get


def _same_rows(a: dict, b: dict) -> None:
    assert set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _split(entry: list) -> list:
    """One CONDITIONING entry of a batch of n as n entries of one prompt each (ComfyUI's form per prompt)."""
    cond, extra = entry
    return [[cond[i:i + 1], {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in extra.items()}]
            for i in range(cond.shape[0])]


# -- the same rows and batches on both sides -------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_a_cli_built_cache_read_by_the_node_path_and_back_gives_the_same_rows_and_batches(family, pipelines, tmp_path):
    """The CLI's encodings (``conds_for`` with the host's encoder, as train-refiner --model writes them) read as
    ComfyUI's Train Refiner reads them (``conditioning_from_rows``) and written back as Build Teacher Cache
    writes them (``rows_from_conditioning``) are the same rows, bit for bit (SDXL's time ids through ComfyUI's
    integer size keys); the CLI host's batch of those ids holds the same tensors as the node's entry."""
    from noisecraft.hosts.diffusers import diffusers_host
    from noisecraft.train.cond_store import conditioning_from_rows, conds_for, rows_from_conditioning

    root = pipelines(family)
    host = diffusers_host(root, TEXTS, encode_now=False)
    store = conds_for(tmp_path / "c", TEXTS, host.encoder, chunk=2)
    ids = [2, 0, 1]
    rows = store.rows(ids)
    entry = conditioning_from_rows(rows)
    hw = (8, 8)  # the tiny networks' sample_size
    _same_rows(rows_from_conditioning(_split(entry), FAMILY[family], hw), rows)
    _same_rows(rows_from_conditioning(_split(conditioning_from_rows(store.uncond())), FAMILY[family], hw),
               store.uncond())
    if family == "sdxl":  # the CLI's time ids (latent 8 x the tiny VAE's factor 2) as ComfyUI's size keys
        assert {k: entry[1][k] for k in ("height", "width", "crop_h", "crop_w")} == dict(
            height=16, width=16, crop_h=0, crop_w=0)
    host.use_conds(store)
    d = host.denoiser(torch.tensor(ids), cfg=CFG)
    assert torch.equal(d.cond, entry[0])
    pooled = {"sd1": None, "sdxl": "text_embeds", "sd3": "pooled_projections"}[family]
    if pooled is None:
        assert d.added_cond_kwargs is None and set(entry[1]) == set()
    else:
        assert torch.equal(d.added_cond_kwargs[pooled], entry[1]["pooled_output"])


def _comfy_entries(width: int, lengths, seed: int = 0, pooled: int = 0, sizes: dict | None = None) -> list:
    """CONDITIONING entries shaped like ComfyUI's CLIP Text Encode output: ``[cond [1, L, D], dict]`` (SD1's
    CLIP also gives a pooled_output, which the sd layout does not store)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        extra = {"pooled_output": torch.randn(1, pooled or width, generator=g)}
        out.append([torch.randn(1, n, width, generator=g), {**extra, **(sizes or {})}])
    return out


def test_a_comfyui_layout_cache_gives_the_node_batches_its_entries(tmp_path):
    """The reverse direction: entries of 77 and 154 tokens stored in chunks of 2 (chunk 0 mixes both) read back
    as the entries themselves (a batch brought to one token count by repetition, as ComfyUI batches them), for
    the node path and for the CLI's rows; SDXL's pooled output and size keys come back as given."""
    from noisecraft.train.cond_store import (CondStore, build_conds, conditioning_from_rows, rows_from_conditioning,
                                             same_token_count)

    sizes = dict(height=64, width=64, crop_h=0, crop_w=0, target_height=64, target_width=64)
    for family, sz in (("sd", None), ("sdxl", sizes)):
        entries = _comfy_entries(32, (77, 154, 77), pooled=16, sizes=sz)
        neg = _comfy_entries(32, (77,), seed=1, pooled=16, sizes=sz)
        labels = [f"p{i}" for i in range(3)]
        where = {t: i for i, t in enumerate(labels)}
        store = build_conds(tmp_path / family, labels, lambda t: (
            rows_from_conditioning([entries[where[x]] for x in t], family, (8, 8)),
            rows_from_conditioning(neg, family, (8, 8))), chunk=2)
        from safetensors import safe_open

        counts = []
        for j in range(2):
            with safe_open(str(CondStore(tmp_path / family).chunk_path(j)), framework="pt") as f:
                counts.append(f.get_slice("cond").get_shape()[1])
        assert counts == [154, 77]  # chunk 0 mixes a 77- and a 154-token prompt; each chunk keeps its own count
        for ids in ([0, 1], [2], [2, 1, 0]):
            entry = conditioning_from_rows(store.rows(ids))
            want = torch.cat(same_token_count([entries[i][0] for i in ids]))
            assert torch.equal(entry[0], want)
            if family == "sdxl":
                assert torch.equal(entry[1]["pooled_output"], torch.cat([entries[i][1]["pooled_output"] for i in ids]))
                assert {k: entry[1][k] for k in sizes} == sizes
            else:
                assert entry[1] == {}


def test_the_guided_teacher_meets_a_77_token_negative_at_the_rows_token_count(pipelines, tmp_path):
    """The CLI host's guided denoiser over stored rows of 154 tokens and a 77-token negative runs cond and uncond
    at one token count (154: the negative repeated, as ComfyUI batches them) in one forward; the result is the
    two-forward one (cross-attention over a prompt repeated twice is the same) to float rounding."""
    from noisecraft.hosts.diffusers import DiffusersDenoiser, diffusers_host
    from noisecraft.train.cond_store import build_conds, rows_from_conditioning

    entries, neg = _comfy_entries(32, (77, 154)), _comfy_entries(32, (77,), seed=1)
    store = build_conds(tmp_path / "c", ["a", "b"], lambda t: (
        rows_from_conditioning([entries[0 if x == "a" else 1] for x in t], "sd", (8, 8)),
        rows_from_conditioning(neg, "sd", (8, 8))), chunk=2)
    host = diffusers_host(pipelines("sd1"), ["a", "b"], encode_now=False)
    host.use_conds(store)
    d = host.denoiser(torch.tensor([0, 1]), cfg=CFG)
    assert d.cond.shape[1] == d.uncond.shape[1] == 154
    assert torch.equal(d.uncond, neg[0][0].repeat(1, 2, 1))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 5
    two = DiffusersDenoiser(host.unet, host.table, d.cond, host.uncond, cfg=CFG)  # 77-token uncond: two forwards
    with torch.no_grad():
        one_out, two_out = d(x, torch.full((2,), 5.0)), two(x, torch.full((2,), 5.0))
    assert d.passes == two.passes == 2
    # float32 rounding of another attention length (2x the keys), x CFG 5 on outputs of size ~5: measured 1.8e-5
    torch.testing.assert_close(one_out, two_out, rtol=1e-4, atol=1e-4)


# -- a ComfyUI-built cache trains from the shell ----------------------------------------------------------------

COMFY_META = {"model": "BaseModel", "model_name": "BaseModel", "host": "comfyui", "model_fingerprint": None,
              "cfg": CFG, "scheduler": "normal", "steps": STEPS, "seed": SEED, "family": "sd",
              "samples_per_prompt": PER_PROMPT, "sampler": "euler", "guidance": "cfg"}


def comfy_cache(root: Path, model: Path, labels, entries, negative, *, kind=None, guidance_range=None,
                teacher: str = "model", meta: dict | None = None) -> Path:
    """A teacher cache written as Build Teacher Cache with a cache_name writes it (``nodes/train_store.py``
    ``build_named``): rows from the entries in chunks of 2, the teacher sampled on the stored rows with CFG, the
    meta of a ComfyUI build. ``teacher="zero"``: a stand-in teacher (for caches that only get refused)."""
    from noisecraft.hosts.diffusers import diffusers_host
    from noisecraft.sigmas import get_sigmas
    from noisecraft.train import build_teacher_cache
    from noisecraft.train.cond_store import build_conds, rows_from_conditioning
    from noisecraft.train.teacher_cache import per_sample_teacher

    where = {t: i for i, t in enumerate(labels)}
    store = build_conds(root, labels, lambda t: (
        rows_from_conditioning([entries[where[x]] for x in t], "sd", (8, 8)),
        rows_from_conditioning(negative, "sd", (8, 8))), chunk=2)
    host = diffusers_host(model, labels, encode_now=False)
    host.use_conds(store)
    if teacher == "zero":
        guided = lambda c, *s: (lambda x, sigma: torch.zeros_like(x))  # noqa: E731
    elif guidance_range is not None:
        guided = per_sample_teacher(host)
    else:
        guided = lambda c: host.denoiser(c, cfg=CFG)  # noqa: E731
    meta = {**COMFY_META, **(meta or {})}
    if guidance_range is not None:
        meta["cfg"] = list(guidance_range)
    build_teacher_cache(root, guided, shape=(4, 8, 8), conds=list(labels), total=len(labels) * PER_PROMPT,
                        sigmas=get_sigmas(host.table, "normal", STEPS), kind=kind or host.table.kind.value,
                        base_seed=SEED, meta=meta, shard_size=4, batch_size=3, guidance_range=guidance_range)
    return root


def _cli_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


TRAIN = ("--steps", 2, "--batch", 2, "--student-steps", 2, "--checkpoint-every", 1, "--lr", 1e-2, "--device", "cpu")


@pytest.fixture(scope="module")
def sd1_cache(pipelines, tmp_path_factory):
    """(model folder, a ComfyUI-layout cache of 3 prompts: 77, 154 and 77 tokens; chunk 0 mixes 77 and 154)."""
    model = pipelines("sd1")
    root = comfy_cache(tmp_path_factory.mktemp("comfy") / "cache", model, TEXTS,
                       _comfy_entries(32, (77, 154, 77)), _comfy_entries(32, (77,), seed=1))
    return model, root


def test_a_comfyui_built_cache_trains_from_the_shell_as_it_is(sd1_cache, tmp_path):
    """``python -m noisecraft train-refiner --model DIR --cache CACHE`` (no --prompts; --cfg equal to the cache's
    is accepted): rc 0, refiner.safetensors written, its metadata records the cache's ComfyUI teacher; the cache
    folder is unchanged (nothing sampled or encoded again). A batch mixes 77- and 154-token rows and the guided
    teacher's 154-token rows meet a 77-token negative (brought to one count)."""
    from noisecraft.io import read_safetensors_metadata

    model, root = sd1_cache
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "noisecraft", "train-refiner", "--model", str(model), "--cache",
                           str(root), "--out", str(out), "--cfg", "5", *map(str, TRAIN)],
                          capture_output=True, text=True, env=_cli_env(), cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "refiner.safetensors").is_file() and str(out / "refiner.safetensors") in proc.stdout
    assert "built in ComfyUI" in proc.stderr
    training = json.loads(read_safetensors_metadata(out / "refiner.safetensors", what="refiner", fix="")[
        "noisecraft.training"])
    assert training["teacher"]["host"] == "comfyui" and training["cache_samples"] == len(TEXTS) * PER_PROMPT
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before


def test_a_comfyui_guidance_range_cache_trains_a_guidance_conditioned_refiner(pipelines, tmp_path):
    """A cache built with guidance_min/max (one CFG scale per sample) trains with --guidance-range equal to it,
    given or taken from the cache."""
    from noisecraft.lora import read_refiner_pairs

    model = pipelines("sd1")
    root = comfy_cache(tmp_path / "cache", model, TEXTS[:2], _comfy_entries(32, (77, 154)),
                       _comfy_entries(32, (77,), seed=1), guidance_range=(2.0, 6.0))
    assert main(["train-refiner", "--model", str(model), "--cache", str(root), "--out", str(tmp_path / "a"),
                 *map(str, TRAIN)]) == 0
    assert main(["train-refiner", "--model", str(model), "--cache", str(root), "--out", str(tmp_path / "b"),
                 "--guidance-range", "2", "6", *map(str, TRAIN)]) == 0
    _, meta = read_refiner_pairs(tmp_path / "a" / "refiner.safetensors")
    assert json.loads(meta["noisecraft.training"])["guidance_range"] == [2.0, 6.0]


def test_a_comfyui_pag_cache_trains_and_its_pag_scale_is_the_caches(pipelines, tmp_path, capsys):
    """A cache whose teacher ran ComfyUI's Perturbed Attention Guidance (meta guidance cfg+pag, pag_scale, no
    layers) trains; --pag-scale other than its scale, and --pag-layers, are refused."""
    model = pipelines("sd1")
    meta = {"guidance": "cfg+pag", "pag_scale": 3.0, "pag": "ComfyUI PerturbedAttentionGuidance"}
    root = comfy_cache(tmp_path / "pag", model, TEXTS[:2], _comfy_entries(32, (77, 77)),
                       _comfy_entries(32, (77,), seed=1), teacher="zero", meta=meta)
    base = ["train-refiner", "--model", str(model), "--cache", str(root), *map(str, TRAIN)]
    assert main([*base, "--out", str(tmp_path / "a"), "--pag-scale", "3"]) == 0
    assert "--pag-scale 3" in _refused(capsys, *base, "--out", tmp_path / "b", "--pag-scale", 0)
    assert "--pag-layers" in _refused(capsys, *base, "--out", tmp_path / "c", "--pag-layers", "mid")


def test_validation_on_a_comfyui_cache_holds_out_prompts_encoded_by_the_folders_encoders(sd1_cache, tmp_path, capsys):
    """--validate-every with --prompts FILE --prompt-validation 1: the file's other prompts are the cache's; the
    held-out one is encoded by the folder's text encoders and validated against the cache's teacher."""
    from noisecraft.prompts import split_prompts

    model, root = sd1_cache
    # the file as Load Prompts / --prompt-validation 1 split it: its training prompts are the cache's
    lines = next(t for pos in range(len(TEXTS) + 1) for t in [TEXTS[:pos] + ["a held out prompt"] + TEXTS[pos:]]
                 if split_prompts(t, validation=1)[0] == TEXTS)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(lines) + "\n")
    rc = main(["train-refiner", "--model", str(model), "--cache", str(root), "--out", str(tmp_path / "out"),
               "--prompts", str(prompts), "--prompt-validation", "1", "--validate-every", "2",
               "--validation-seeds", "1", *map(str, TRAIN)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]


def test_validation_is_refused_for_a_cache_of_conditioning_entries_and_without_prompts(pipelines, sd1_cache, tmp_path,
                                                                                     capsys):
    model, root = sd1_cache
    args = ["train-refiner", "--model", str(model), "--out", str(tmp_path / "o"), "--validate-every", "2",
            "--prompt-validation", "1", *map(str, TRAIN)]
    assert main([*args, "--cache", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prompts FILE" in err
    digests = ["conditioning sha256 " + c * 32 for c in "ab"]
    other = comfy_cache(tmp_path / "entries", model, digests, _comfy_entries(32, (77, 77)),
                        _comfy_entries(32, (77,), seed=1), teacher="zero")
    assert main([*args, "--cache", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CONDITIONING entries" in err


# -- refusals ------------------------------------------------------------------------------------------------

def _refused(capsys, *argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_model_of_another_kind_or_width_is_refused_naming_both(pipelines, tmp_path, capsys):
    model = pipelines("sd1")
    v = comfy_cache(tmp_path / "v", model, TEXTS[:2], _comfy_entries(32, (77, 77)), _comfy_entries(32, (77,)),
                    kind="v", teacher="zero")
    err = _refused(capsys, "train-refiner", "--model", model, "--cache", v, "--out", tmp_path / "o1", *TRAIN)
    assert "eps-prediction (eps)" in err and "v-prediction (v)" in err and "--model the diffusers folder" in err
    wide = comfy_cache(tmp_path / "w", model, TEXTS[:2], _comfy_entries(48, (77, 77)), _comfy_entries(48, (77,)),
                       teacher="zero")
    err = _refused(capsys, "train-refiner", "--model", model, "--cache", wide, "--out", tmp_path / "o2", *TRAIN)
    assert "48 wide" in err and "cross_attention_dim is 32" in err


def test_other_prompts_or_teacher_flags_than_the_caches_are_refused(sd1_cache, tmp_path, capsys):
    model, root = sd1_cache
    base = ("train-refiner", "--model", model, "--cache", root, "--out", tmp_path / "o", *TRAIN)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na very long prompt about a blue cow\na green bird\n")
    err = _refused(capsys, *base, "--prompts", prompts)
    assert "training prompt 2 is 'a very long prompt about a blue cow'" in err and "blue dog" in err
    prompts.write_text("a red cat\n")
    assert "1 training prompts" in _refused(capsys, *base, "--prompts", prompts)
    for flag, value, cached in (("--cfg", 3, "--cfg 5"), ("--teacher-steps", 4, "--teacher-steps 2"),
                                ("--samples", 5, "--samples 6"), ("--seed-base", 10_000, "--seed-base 7"),
                                ("--scheduler", "karras", "--scheduler normal")):
        err = _refused(capsys, *base, flag, value)
        assert err.startswith(f"noisecraft train-refiner: {flag} {value}:") and cached in err, err
    assert "--negative" in _refused(capsys, *base, "--negative", "ugly")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_an_unfinished_comfyui_cache_is_refused(pipelines, sd1_cache, tmp_path, capsys):
    import shutil

    model, root = sd1_cache
    part = tmp_path / "part"
    shutil.copytree(root, part)
    (part / "shard_00001.safetensors").unlink()
    err = _refused(capsys, "train-refiner", "--model", model, "--cache", part, "--out", tmp_path / "o", *TRAIN)
    assert "not finished (1 of 2 shards missing)" in err and "Build Teacher Cache" in err
