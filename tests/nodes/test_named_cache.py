"""Named (on-disk) teacher caches in ComfyUI (issue 17): Build Teacher Cache with a ``cache_name``, Load Teacher
Cache, and Train Refiner / Filter Teacher Cache on such a cache (nodes/train_store.py gives the design).

Tier 2 (``COMFYUI_PATH``): tiny random-weight SD1.5- and SDXL-shaped models and tiny real ComfyUI CLIPs
(``tiny_clip``: ComfyUI's own CLIP classes and tokenizers), everything under ``torch.inference_mode()`` like the
server, ComfyUI's output folder pointed at a temporary one. ``SHARD_SIZE`` / ``CHUNK`` are set to 4 / 3 so that a
cache of a few samples has several shards and several encoding chunks.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import comfy.model_management as mm
import folder_paths
from comfy_extras.nodes_custom_sampler import (BasicScheduler, CFGGuider, KSamplerSelect, Noise_RandomNoise,
                                               SamplerCustomAdvanced)
from comfy_extras.nodes_pag import PerturbedAttentionGuidance

SEED, CFG, STEPS, PER_PROMPT, SIZE = 5, 7.0, 3, 2, 8
F32_EPS = torch.finfo(torch.float32).eps
LONG = "a photo of " + ", ".join(["a small red house"] * 25)  # over 75 tokens: ComfyUI encodes it as 154
TEXTS = ["a cat on a mat", "a bowl of fruit", "a red car in the rain", LONG]  # the long one alone in chunk 1 (CHUNK 3)
WIDTH = {"sd15": 768, "sdxl": 2048}
FAMILY = {"sd15": "sd", "sdxl": "sdxl"}


def pack(nc) -> str:
    return nc.noise.__name__.split(".")[0]


@pytest.fixture(scope="module")
def ts(nc):
    return importlib.import_module(f"{pack(nc)}.nodes.train_store")


@pytest.fixture(scope="module")
def cs(nc):
    return importlib.import_module(f"{pack(nc)}.noisecraft.train.cond_store")


@pytest.fixture(scope="module")
def tcore(nc):
    return importlib.import_module(f"{pack(nc)}.noisecraft.train.teacher_cache")


@pytest.fixture(scope="module")
def pr(nc):
    return importlib.import_module(f"{pack(nc)}.nodes.nodes_prompts")


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """ComfyUI's output folder, a temporary one for this module (caches in noisecraft_caches/, runs in
    noisecraft_runs/)."""
    out = tmp_path_factory.mktemp("output")
    saved = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    try:
        yield out
    finally:
        folder_paths.set_output_directory(saved)


@pytest.fixture(autouse=True)
def small_shards(ts, output, monkeypatch):
    monkeypatch.setattr(ts, "SHARD_SIZE", 4)
    monkeypatch.setattr(ts, "CHUNK", 3)


class Tiny:
    """The tiny models and CLIPs, built once each under inference mode (as ComfyUI loads checkpoints)."""

    def __init__(self, nc):
        self.nc, self._m = nc, {}

    def _get(self, key, make):
        if key not in self._m:
            with torch.inference_mode():
                self._m[key] = make()
        return self._m[key]

    def model(self, fam, seed=0):
        return self._get(("model", fam, seed), lambda: self.nc.tiny.build(fam, seed=seed))

    def clip(self, fam):
        return self._get(("clip", fam), lambda: self.nc.tiny.tiny_clip(fam))

    def encode(self, fam, text):
        """ComfyUI's own encoding of one text (what CLIP Text Encode does): a one-entry CONDITIONING."""
        clip = self.clip(fam)
        with torch.inference_mode():
            return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    def negative(self, fam):
        return self.encode(fam, "")

    def positive(self, fam, texts=TEXTS):
        """The prompts as one CONDITIONING (CLIP Text Encode per prompt, joined by Conditioning (Combine))."""
        return [e for t in texts for e in self.encode(fam, t)]


@pytest.fixture(scope="module")
def tiny(nc):
    return Tiny(nc)


def latent(batch=1):
    return {"samples": torch.zeros(batch, 4, SIZE, SIZE)}


def build(tr, model, neg, *, name="", positive=None, prompts=None, clip=None, per=PER_PROMPT, seed=SEED, cfg=CFG,
          steps=STEPS, batch=1, sampler=None, gmin=0.0, gmax=0.0, scheduler="normal"):
    """Build Teacher Cache as ComfyUI calls it (every input by name); returns the TEACHER_CACHE."""
    with torch.inference_mode():
        return tr.BuildTeacherCache.execute(model=model, positive=positive, negative=neg, latent=latent(batch),
                                            samples_per_prompt=per, seed=seed, cfg=cfg, steps=steps,
                                            scheduler=scheduler, sampler=sampler, prompts=prompts, clip=clip,
                                            cache_name=name, guidance_min=gmin, guidance_max=gmax).args[0]


def load_prompts(pr, folder: Path, texts) -> object:
    """Load Prompts on a .txt file holding ``texts`` (one per line): an NC_PROMPTS."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"prompts_{hashlib.sha256(repr(list(texts)).encode()).hexdigest()[:12]}.txt"
    path.write_text("\n".join(texts) + "\n")
    return pr.LoadPrompts.execute(path=str(path)).args[0]


def train(tr, model, cache, steps=3, batch=4, **kw):
    """Train Refiner as a graph calls it (the required inputs, then new ones by name); returns the NodeOutput."""
    with torch.inference_mode():
        return tr.TrainRefiner.execute(model, cache, steps, 2, batch, 3e-3, 4, 0.0, 1, **kw)


def files(folder: Path) -> dict:
    """Every file of a cache folder (the lock files aside) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())
            if p.is_file() and not p.name.startswith(".noisecraft.lock")}


def cache_files(n_shards, n_chunks):
    return {"index.json", "conds.json", "conds_uncond.safetensors",
            *(f"shard_{k:05d}.safetensors" for k in range(n_shards)),
            *(f"conds_{j:05d}.safetensors" for j in range(n_chunks))}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sampler_custom_advanced(model, positive, negative, noise, cfg=CFG, steps=STEPS):
    """ComfyUI's own sampling of one sample: SamplerCustomAdvanced with CFGGuider(cfg), KSamplerSelect("euler"),
    BasicScheduler("normal", steps); the result in the model's inner latent space (the space a cache stores)."""
    with torch.inference_mode():
        guider = CFGGuider().get_guider(model, positive, negative, cfg)[0]
        sampler = KSamplerSelect().get_sampler("euler")[0]
        sigmas = BasicScheduler().get_sigmas(model, "normal", steps, 1.0)[0]
        out = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent())[0]
        return model.get_model_object("latent_format").process_in(out["samples"])


def euler_tolerance(model, noise, cfg=CFG, steps=STEPS):
    """How far the core's Euler may land from ComfyUI's on the same guided denoiser (as in test_pag_teacher):
    only rounding differs (the start latent e * sqrt(1 + sigma_max^2) in double here, float32 there; each update
    (x - D) / sigma * dt there, (x - D) * (dt / sigma) here: the last bit of values of size max|x_T|), and the
    guided denoiser (coefficients summing to 1 + cfg) carries it into the next step: 16 such roundings per step
    of (1 + cfg) max|x_T|."""
    smax = float(model.get_model_object("model_sampling").sigma_max)
    x_t = float(noise.abs().max()) * (1 + smax * smax) ** 0.5
    return 16 * steps * (1 + cfg) * F32_EPS * x_t


# -- 1. what a named cache holds ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoded(tr, pr, tiny, output, tmp_path_factory):
    """``encoded(fam)``: the named caches of TEXTS built from Load Prompts + clip and from a positive
    CONDITIONING of the same encodings (built once per family)."""
    done = {}
    folder = tmp_path_factory.mktemp("input")

    def get(fam):
        if fam not in done:  # (called inside a test: small_shards is in effect)
            model, neg = tiny.model(fam), tiny.negative(fam)
            prompts = load_prompts(pr, folder, TEXTS)
            a = build(tr, model, neg, name=f"enc_{fam}_prompts", prompts=prompts, clip=tiny.clip(fam))
            b = build(tr, model, neg, name=f"enc_{fam}_positive", positive=tiny.positive(fam))
            done[fam] = (a, b)
        return done[fam]

    return get


@pytest.mark.parametrize("fam", ["sd15", "sdxl"])
def test_the_folder_holds_the_clis_files_and_comfyuis_encodings(fam, encoded, tiny, cs):
    """Both sources give the CLI's files; each stored row is ComfyUI's own encoding of its prompt (through
    rows_from_conditioning: SDXL's pooled output and size ids with it); a 154-token prompt is stored at 154
    tokens, next to 77-token ones, and a batch mixing them repeats the 77-token rows (as ComfyUI batches)."""
    by_prompts, by_positive = encoded(fam)
    model = tiny.model(fam)
    for cache in (by_prompts, by_positive):
        assert cache.data.root.parent.name == "noisecraft_caches" and cache.folder == cache.data.root
        assert set(files(cache.folder)) == cache_files(2, 2)  # 8 samples / 4 per shard; 4 prompts / 3 per chunk
        assert len(cache) == len(TEXTS) * PER_PROMPT and cache.prompt_count == len(TEXTS) and cache.prompts is None
        meta = cache.data.meta
        assert (meta["family"], meta["cfg"], meta["steps"], meta["seed"], meta["sampler"]) == \
            (FAMILY[fam], CFG, STEPS, SEED, "euler")
        assert meta["guidance"] == "cfg" and meta["host"] == "comfyui" and meta["model_fingerprint"]
    assert by_prompts.data.conds == TEXTS  # the texts name the prompts; CONDITIONING entries by their digest
    assert all(c.startswith("conditioning sha256 ") for c in by_positive.data.conds)
    assert len(set(by_positive.data.conds)) == len(TEXTS)

    hw = (SIZE, SIZE)
    encodings = [tiny.encode(fam, t) for t in TEXTS]
    assert [e[0][0].shape[1] for e in encodings] == [77, 77, 77, 154]
    keys = {"sd15": {"cond"}, "sdxl": {"cond", "text_embeds", "time_ids"}}[fam]
    for cache in (by_prompts, by_positive):
        store = cache.store
        assert store.count == len(TEXTS) and store.num_chunks == 2 and set(store.keys) == keys
        for i, enc in enumerate(encodings):
            want = cs.rows_from_conditioning(enc, FAMILY[fam], hw)
            got = store.rows([i])
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (fam, i)
        mixed = store.rows([0, 3])["cond"]
        assert mixed.shape == (2, 154, WIDTH[fam])
        assert torch.equal(mixed[0], encodings[0][0][0][0].repeat(2, 1))
        assert torch.equal(mixed[1], encodings[3][0][0][0])
        unc = store.uncond()
        want = cs.rows_from_conditioning(tiny.negative(fam), FAMILY[fam], hw)
        assert unc.keys() == want.keys() and all(torch.equal(unc[k], want[k]) for k in want)
        if fam == "sdxl":  # ComfyUI's sampling defaults for an entry without size keys: the latent's size x 8
            assert store.rows([1])["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    assert model.model.get_dtype() == torch.float32 and by_prompts.store.dtype == torch.float32


@pytest.mark.parametrize("fam", ["sd15", "sdxl"])
def test_each_sample_is_comfyuis_own_sampling_of_its_seed_and_prompt(fam, encoded, tiny):
    """Sample i: the noise of RandomNoise(seed + i) for a batch of one, prompt i % P, and x0 = what
    SamplerCustomAdvanced gives for that noise and prompt (CFGGuider(cfg), euler, BasicScheduler); the cache from
    the positive CONDITIONING (the same encodings) holds the same bytes."""
    by_prompts, by_positive = encoded(fam)
    model, neg = tiny.model(fam), tiny.negative(fam)
    full = by_prompts.data.get(range(len(by_prompts)))
    other = by_positive.data.get(range(len(by_positive)))
    assert torch.equal(full.e, other.e) and torch.equal(full.x0, other.x0) and torch.equal(full.cond, other.cond)
    assert full.cond.tolist() == [i % len(TEXTS) for i in range(len(by_prompts))]
    for i in range(len(by_prompts)):
        noise = Noise_RandomNoise(SEED + i)
        assert torch.equal(full.e[i:i + 1], noise.generate_noise(latent())), i
        ref = sampler_custom_advanced(model, tiny.encode(fam, TEXTS[i % len(TEXTS)]), neg, noise)
        err, tol = float((full.x0[i:i + 1] - ref).abs().max()), euler_tolerance(model, full.e[i])
        assert err <= tol, (fam, i, err, tol)
    assert float((full.x0[0] - full.x0[len(TEXTS)]).abs().max()) > 100 * tol  # (the noises matter)



@pytest.mark.parametrize("fam", ["sd15", "sdxl"])
def test_micro_batches_mixing_token_counts_give_the_same_samples(fam, encoded, tr, tiny):
    """The LATENT's batch (4) is how many samples the teacher samples at once: a micro-batch then holds the
    154-token prompt with 77-token ones (repeated to 154 tokens, as ComfyUI batches them); only rounding differs
    from sampling one at a time (softmax sums over twice the tokens, other batch sizes in the network's kernels)."""
    one_at_a_time = encoded(fam)[0]
    model, neg = tiny.model(fam), tiny.negative(fam)
    four = build(tr, model, neg, name=f"enc_{fam}_batch4", positive=tiny.positive(fam), batch=4)
    assert torch.equal(four.noise, one_at_a_time.noise)
    for i in range(len(four)):
        err = float((four.x0[i] - one_at_a_time.x0[i]).abs().max())
        assert err <= euler_tolerance(model, four.noise[i]), (fam, i, err)


# -- 2. resume: an interrupt (Cancel) or a killed process leaves finished shards; the same node finishes it --------

def watch_shards(tcore, monkeypatch, interrupt_after=None) -> list:
    """The shard numbers the core writes from now on; ``interrupt_after``: press Cancel (ComfyUI's interrupt
    flag) once that many shards are written (the build's next progress call raises, as the server's does)."""
    written = []
    write = tcore.TeacherCache.write_shard

    def write_shard(self, k, x0, noise=None):
        path = write(self, k, x0, noise)
        written.append(k)
        if interrupt_after is not None and len(written) == interrupt_after:
            mm.interrupt_current_processing(True)
        return path

    monkeypatch.setattr(tcore.TeacherCache, "write_shard", write_shard)
    return written


def count_model_calls(model, monkeypatch) -> list:
    """The batch size of every call of the model's network from now on."""
    calls = []
    net = model.model.diffusion_model
    forward = net.forward

    def counted(x, *args, **kwargs):
        calls.append(int(x.shape[0]))
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(net, "forward", counted)
    return calls


SIX = [f"prompt {i}: a {c} bird on a {t}" for i, (c, t) in enumerate(zip(
    ["red", "blue", "green", "black", "white", "grey"], ["tree", "roof", "fence", "rock", "boat", "wire"]))]


def test_an_interrupted_build_resumes_with_only_the_missing_shards(tr, tcore, tiny, monkeypatch):
    """Cancel after the first of 3 shards: that shard stays; queuing the same node again samples only shards 1
    and 2 (2/3 of the model calls of a whole build) and the folder is byte for byte the one an uninterrupted build
    makes under another name; once finished, the node only opens it."""
    model, neg, pos = tiny.model("sd15"), tiny.negative("sd15"), tiny.positive("sd15", SIX)
    kw = dict(positive=pos, per=2, batch=2)  # 12 samples: 3 shards of 4, sampled 2 at a time
    calls = count_model_calls(model, monkeypatch)
    written = watch_shards(tcore, monkeypatch)
    whole = build(tr, model, neg, name="resume_whole", **kw)
    assert written == [0, 1, 2] and len(whole) == 12
    whole_calls = sum(calls)

    calls.clear()
    written = watch_shards(tcore, monkeypatch, interrupt_after=1)
    with pytest.raises(mm.InterruptProcessingException):
        build(tr, model, neg, name="resume_cut", **kw)
    folder = Path(folder_paths.get_output_directory()) / "noisecraft_caches" / "resume_cut"
    assert written == [0] and set(files(folder)) == cache_files(1, 2)  # the encodings are all there, one shard
    assert sum(calls) * 12 == whole_calls * (4 + 2)  # shard 0 and shard 1's first micro-batch (then Cancel)

    mm.interrupt_current_processing(False)  # (the server clears it before the next prompt)
    calls.clear()
    written = watch_shards(tcore, monkeypatch)
    done = build(tr, model, neg, name="resume_cut", **kw)
    assert written == [1, 2] and sum(calls) * 3 == whole_calls * 2
    assert files(folder) == files(whole.folder) and not done.data.missing_shards()
    assert torch.equal(done.x0, whole.x0)

    calls.clear()
    written = watch_shards(tcore, monkeypatch)
    again = build(tr, model, neg, name="resume_cut", **kw)  # finished: opened, nothing sampled or written
    assert written == [] and calls == [] and len(again) == 12 and files(folder) == files(whole.folder)



def test_cancel_while_the_prompts_are_encoded_keeps_the_finished_chunks(tr, pr, cs, encoded, tiny, tmp_path,
                                                                       monkeypatch):
    """Cancel right after the first of 2 encoding chunks: the build stops there (no teacher sample); queued again
    it encodes only chunk 1, then samples, and the folder equals the uninterrupted build's (encoded("sd15"))."""
    whole = encoded("sd15")[0]
    model, neg, clip = tiny.model("sd15"), tiny.negative("sd15"), tiny.clip("sd15")
    written, write = [], cs.write_safetensors

    def watched(tensors, path, *args, **kwargs):
        out = write(tensors, path, *args, **kwargs)
        written.append(Path(path).name)
        if Path(path).name == "conds_00000.safetensors":
            mm.interrupt_current_processing(True)
        return out

    monkeypatch.setattr(cs, "write_safetensors", watched)
    kw = dict(name="cancel_encoding", prompts=load_prompts(pr, tmp_path, TEXTS), clip=clip)
    with pytest.raises(mm.InterruptProcessingException):
        build(tr, model, neg, **kw)
    folder = whole.folder.parent / "cancel_encoding"
    assert written == ["conds_uncond.safetensors", "conds_00000.safetensors"]
    assert set(files(folder)) == {"index.json", "conds.json", "conds_uncond.safetensors", "conds_00000.safetensors"}
    mm.interrupt_current_processing(False)
    written.clear()
    done = build(tr, model, neg, **kw)
    assert written == ["conds_00001.safetensors"] and len(done) == 8
    want = files(whole.folder)
    assert files(folder) == {k: want[k] for k in cache_files(2, 2)}


KILL_SCRIPT = r"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, os.environ["COMFYUI_PATH"])
sys.path.insert(0, os.environ["NC_TESTS"])
import torch
torch.set_num_threads(1)
from comfy.cli_args import args
args.cpu = True
args.use_pytorch_cross_attention = True
import comfy.model_management, comfy.utils, folder_paths
comfy.utils.PROGRESS_BAR_ENABLED = False
import conftest
conftest.load_pack()
import importlib
tr = importlib.import_module(conftest.PACK_NAME + ".nodes.nodes_train")
ts = importlib.import_module(conftest.PACK_NAME + ".nodes.train_store")
pr = importlib.import_module(conftest.PACK_NAME + ".nodes.nodes_prompts")
tiny = conftest.load_tiny_models()
folder_paths.set_output_directory(os.environ["NC_OUT"])
ts.SHARD_SIZE, ts.CHUNK = 4, 3

def hook(value, total, preview, node_id=None):  # the build's progress: samples done of the work
    if value > 8:  # shard 2's first micro-batch is sampled (shards 0 and 1 are on disk): wait to be killed
        Path(os.environ["NC_OUT"], "in_shard_2").touch()
        time.sleep(600)

comfy.utils.set_progress_bar_global_hook(hook)
with torch.inference_mode():
    model = tiny.build("sd15", seed=0)
    clip = tiny.tiny_clip("sd15")
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    prompts = pr.LoadPrompts.execute(path=os.environ["NC_PROMPTS"]).args[0]
    tr.BuildTeacherCache.execute(model=model, positive=None, negative=neg, latent={"samples": torch.zeros(2, 4, 8, 8)},
                                 samples_per_prompt=2, seed=5, cfg=7.0, steps=3, scheduler="normal", prompts=prompts,
                                 clip=clip, cache_name="killed")
print("the build finished: it should have been killed")
"""


def test_a_build_killed_mid_shard_is_finished_by_the_same_node_byte_for_byte(tr, pr, tcore, tiny, output, tmp_path,
                                                                             monkeypatch):
    """A subprocess runs Build Teacher Cache (Load Prompts + CLIP, 3 shards) and is SIGKILLed while it samples
    shard 2; the same build in this process writes only shard 2, and the folder equals an uninterrupted build's."""
    assert (SEED, CFG, STEPS, PER_PROMPT) == (5, 7.0, 3, 2)  # (the script's settings)
    prompts_file = tmp_path / "six.txt"
    prompts_file.write_text("\n".join(SIX) + "\n")
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    marker = output / "in_shard_2"
    env = {**os.environ, "NC_TESTS": str(Path(__file__).parent), "NC_OUT": str(output), "NC_PROMPTS": str(prompts_file),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not marker.is_file():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the build did not reach shard 2 within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    folder = output / "noisecraft_caches" / "killed"
    assert set(files(folder)) == cache_files(2, 2)  # shards 0 and 1; shard 2 was being sampled

    model, neg, clip = tiny.model("sd15"), tiny.negative("sd15"), tiny.clip("sd15")
    prompts = pr.LoadPrompts.execute(path=str(prompts_file)).args[0]
    kw = dict(prompts=prompts, clip=clip, batch=2)
    written = watch_shards(tcore, monkeypatch)
    finished = build(tr, model, neg, name="killed", **kw)  # (the dead process's lock is gone with it)
    assert written == [2] and not finished.data.missing_shards()
    whole = build(tr, model, neg, name="killed_whole", **kw)
    assert written == [2, 0, 1, 2] and files(folder) == files(whole.folder)


# -- 3. the same cache_name with another definition is refused, the folder untouched -------------------------

def folder_state(folder: Path) -> dict:
    """Every file of the folder (lock files aside) with its bytes and modification time."""
    return {name: (data, (Path(folder) / name).stat().st_mtime_ns) for name, data in files(folder).items()}


def test_a_changed_setting_prompt_set_or_model_is_refused_naming_it(tr, pr, tiny, tmp_path):
    model, neg, clip = tiny.model("sd15"), tiny.negative("sd15"), tiny.clip("sd15")
    base = dict(name="defined", prompts=load_prompts(pr, tmp_path, TEXTS[:3]), clip=clip, per=1, steps=2)
    cache = build(tr, model, neg, **base)
    before = folder_state(cache.folder)
    assert set(before) == cache_files(1, 1)
    changes = [
        ("cfg", dict(cfg=6.0), "cfg 7.0 there, 6.0 asked"),
        ("steps", dict(steps=3), "steps 2 there, 3 asked"),
        ("samples_per_prompt", dict(per=2), "samples_per_prompt 1 there, 2 asked"),
        ("seed", dict(seed=6), "seed 5 there, 6 asked"),
        ("scheduler", dict(scheduler="karras"), "scheduler 'normal' there, 'karras' asked"),
        ("prompt set", dict(prompts=load_prompts(pr, tmp_path, [*TEXTS[:2], "another prompt"])),
         "the prompts (3 there, 3 asked)"),
        ("prompt count", dict(prompts=load_prompts(pr, tmp_path, TEXTS)), "the prompts (3 there, 4 asked)"),
        ("model", dict(model=tiny.model("sd15", seed=1)), "model weights (fingerprint)"),
    ]
    for what, change, named in changes:
        args = {**base, **change}
        with pytest.raises(ValueError) as err:
            build(tr, args.pop("model", model), neg, **args)
        msg = str(err.value)
        assert msg.startswith("Build Teacher Cache: ") and str(cache.folder) in msg and "\n" not in msg, (what, msg)
        assert f"[differs: {named}" in msg and "choose another cache_name" in msg, (what, msg)
        assert folder_state(cache.folder) == before, what
    assert len(build(tr, model, neg, **base)) == 3  # the unchanged graph still opens it
    assert folder_state(cache.folder) == before


# -- 4. Load Teacher Cache -------------------------------------------------------------------------------------

def same_refiner(a, b):
    return a.pairs.keys() == b.pairs.keys() and all(
        torch.equal(a.pairs[k][0], b.pairs[k][0]) and torch.equal(a.pairs[k][1], b.pairs[k][1]) for k in a.pairs)


def test_load_teacher_cache_by_name_and_by_path_trains_like_the_built_one(tr, ts, encoded, tiny):
    """Batches of 4 mix the 154-token prompt with 77-token ones (read from disk per batch)."""
    built = encoded("sd15")[0]
    model = tiny.model("sd15")
    name = built.folder.name
    assert name in ts.cache_names()
    assert name in next(i for i in ts.LoadTeacherCache.define_schema().inputs if i.id == "cache_name").options
    ref, ref_losses = train(tr, model, built, steps=3).args
    assert len(ref_losses) == 3 and all(torch.isfinite(torch.tensor(ref_losses)))
    for how in (dict(cache_name=name), dict(path=str(built.folder)), dict(path=name), dict(cache_name="x", path=name)):
        out = ts.LoadTeacherCache.execute(**how)
        loaded = out.args[0]
        assert isinstance(loaded, type(built)) and loaded.folder == built.folder and loaded.prompts is None, how
        assert len(loaded) == len(built) and loaded.prompt_count == len(TEXTS), how
        assert out.ui["text"] == [f"8 teacher samples (4 prompts) in {built.folder}"]
        assert torch.equal(loaded.x0, built.x0) and torch.equal(loaded.noise, built.noise)
        refiner, losses = train(tr, model, loaded, steps=3).args
        assert losses == ref_losses and same_refiner(refiner, ref), how
    stamp = ts.LoadTeacherCache.fingerprint_inputs(cache_name=name)
    assert isinstance(stamp, str) and stamp == ts.LoadTeacherCache.fingerprint_inputs(path=str(built.folder))


def test_load_teacher_cache_refuses_an_unfinished_cache_and_other_folders_in_one_line(ts, tr, tcore, tiny, encoded,
                                                                                        tmp_path, monkeypatch):
    model, neg = tiny.model("sd15"), tiny.negative("sd15")
    watch_shards(tcore, monkeypatch, interrupt_after=1)
    with pytest.raises(mm.InterruptProcessingException):
        build(tr, model, neg, name="unfinished", positive=tiny.positive("sd15"), batch=4)  # 2 shards, 1 written
    mm.interrupt_current_processing(False)
    folder = Path(folder_paths.get_output_directory()) / "noisecraft_caches" / "unfinished"

    def refused(**how) -> str:
        with pytest.raises(ValueError) as err:
            ts.LoadTeacherCache.execute(**how)
        msg = str(err.value)
        assert msg.startswith("Load Teacher Cache: ") and "\n" not in msg, msg
        return msg

    for how in (dict(cache_name="unfinished"), dict(path=str(folder))):
        msg = refused(**how)
        assert "is not finished: 1 of 2 shards missing" in msg and "queue the Build Teacher Cache graph" in msg, msg
        assert "continues where it stopped" in msg
    assert ts.LoadTeacherCache.fingerprint_inputs(cache_name="unfinished") != \
        ts.LoadTeacherCache.fingerprint_inputs(cache_name="unfinished")  # (nan: it runs, and says so, every time)
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "a.png").write_bytes(b"not a cache")
    for how in (dict(path=str(tmp_path / "pictures")), dict(cache_name="no_such_cache")):
        msg = refused(**how)
        assert "is not a teacher cache (no index.json)" in msg and "build one with Build Teacher Cache" in msg, msg
    msg = refused()
    assert "no cache: choose a cache_name" in msg
    no_conds = tmp_path / "toy_cache"  # a CLI cache without prompt encodings (--toy / --prompt-embeds)
    no_conds.mkdir()
    for p in encoded("sd15")[0].folder.iterdir():
        if p.name.startswith(("index", "shard_")):
            (no_conds / p.name).write_bytes(p.read_bytes())
    msg = refused(path=str(no_conds))
    assert "holds no prompt encodings (conds.json)" in msg and "--model" in msg, msg


def test_train_refiner_refuses_a_loaded_cache_of_another_models_text_inputs(tr, ts, encoded, tiny):
    """SD1.5 and SDXL share the prediction kind, sigma_max and latent channels (what Train Refiner checked), not
    their text inputs: a cache loaded by name for the other model is refused in one line, not a shape error."""
    for built, fam, other in ((encoded("sdxl")[0], "sdxl", "sd15"), (encoded("sd15")[0], "sd15", "sdxl")):
        loaded = ts.LoadTeacherCache.execute(cache_name=built.folder.name).args[0]
        with pytest.raises(ValueError) as err:
            train(tr, tiny.model(other), loaded, steps=1)
        msg = str(err.value)
        assert msg.startswith("Train Refiner: teacher_cache: its prompts are encoded for another model") and \
            f"text width {WIDTH[fam]}" in msg and "train with the model the cache was built with" in msg, msg
        assert "\n" not in msg



# -- 5. Train Refiner on a named cache ----------------------------------------------------------------------------

@pytest.fixture()
def temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path / "temp"))
    return tmp_path / "temp"


class interrupt_at:
    """A progress hook like the server's (it raises when Cancel was pressed) that presses Cancel at ``step``."""

    def __init__(self, step):
        self.step = step

    def hook(self, value, total, preview, node_id=None):
        mm.throw_exception_if_processing_interrupted()
        if value == self.step:
            mm.interrupt_current_processing(True)

    def __enter__(self):
        import comfy.utils

        comfy.utils.set_progress_bar_global_hook(self.hook)

    def __exit__(self, *exc):
        import comfy.utils

        comfy.utils.set_progress_bar_global_hook(None)


def test_train_refiner_on_a_named_cache_leaves_the_model_unchanged_and_resumes(tr, encoded, tiny, output,
                                                                               monkeypatch):
    cache = encoded("sd15")[0]
    model = tiny.model("sd15")
    before, uuid = snapshot(model), model.patches_uuid
    monkeypatch.setattr(tr, "CHECKPOINT_EVERY", 100)  # only the interrupt writes a checkpoint
    full, full_losses = train(tr, model, cache, steps=4, resume_from="named_full").args
    assert same(before, snapshot(model)) and model.patches_uuid == uuid and not model.patches
    params = list(model.model.parameters())
    assert all(p.grad is None for p in params) and all(p.requires_grad for p in params)
    assert full_losses[-1] < full_losses[0], full_losses
    training = json.loads(full.metadata["noisecraft.training"])
    assert training["prompts"] == 4 and training["samples"] == 8 and training["teacher"]["cfg"] == CFG
    with interrupt_at(2), pytest.raises(mm.InterruptProcessingException):
        train(tr, model, cache, steps=4, resume_from="named_cut")
    run = output / "noisecraft_runs" / "named_cut"
    assert (run / "checkpoint.safetensors").is_file() and not (run / "refiner.safetensors").exists()
    resumed, losses = train(tr, model, cache, steps=4, resume_from="named_cut").args
    assert same_refiner(resumed, full) and losses == full_losses
    assert same(before, snapshot(model)) and not model.patches


def test_validation_runs_on_a_named_cache(tr, encoded, tiny, temp_dir):
    """validate_every with held-out prompts (prepared entries after the cache's prompts) and without (the
    cache's own prompts, read from disk): the curve starts at exactly 0 (a fresh LoRA's residual is 0)."""
    cache = encoded("sd15")[0]
    model = tiny.model("sd15")
    plain, plain_losses = train(tr, model, cache, steps=2).args
    held = tiny.positive("sd15", ["a held out prompt", "another held out prompt"])
    for kw, samples in ((dict(validation_prompts=held), 2 * 2), ({}, 4 * 2)):
        out = train(tr, model, cache, steps=2, validate_every=1, validation_seeds=2, **kw)
        refiner, losses = out.args
        assert losses == plain_losses and same_refiner(refiner, plain)  # validation does not touch the training
        curve = out.ui["noisecraft_validation"]
        assert [s for s, _ in curve] == [0, 1, 2] and curve[0][1] == 0.0, curve
        assert all(torch.isfinite(torch.tensor([g for _, g in curve])))
        assert json.loads(refiner.metadata["noisecraft.validation"])["samples"] == samples
        assert (temp_dir / out.ui["images"][0]["filename"]).is_file()


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from ``obj`` through attributes, dicts, lists and tuples (modules skipped;
    as tests/core/test_families.py counts them)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, torch.nn.Module):
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _tensor_bytes(vars(obj), seen)
    return 0


def test_the_teacher_cache_holds_the_same_tensor_bytes_for_6_and_60_prompts(tr, ts, pr, tiny, tmp_path):
    """The prompts' encodings stay on disk: the TEACHER_CACHE (built, or loaded) holds the negative's row
    (77 x 768 float32) and nothing per prompt or sample, also after training on it (a batch's rows are read when
    training asks for them; the samples read sit in the core's LRU of at most 4 open shards)."""
    model, neg, clip = tiny.model("sd15"), tiny.negative("sd15"), tiny.clip("sd15")
    held, on_disk, trained = [], [], []
    for p in (6, 60):
        texts = [f"prompt {i} of {p}: a {i % 7} legged table" for i in range(p)]
        cache = build(tr, model, neg, name=f"count_{p}", prompts=load_prompts(pr, tmp_path, texts), clip=clip, per=1,
                      steps=2, batch=4)
        assert len(cache) == p and cache.store.num_chunks == p // 3
        loaded = ts.LoadTeacherCache.execute(cache_name=f"count_{p}").args[0]
        held += [_tensor_bytes(cache), _tensor_bytes(loaded)]
        on_disk.append(sum(f.stat().st_size for f in cache.folder.glob("conds_0*.safetensors")))
        _, losses = train(tr, model, loaded, steps=2, batch=4).args
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
        trained.append(_tensor_bytes(loaded))
        lru = loaded.data._load_shard.cache_info()  # the samples read: the core's few open shards, a fixed bound
        assert 0 < lru.currsize <= lru.maxsize == 4
    assert held[0] == held[1] == held[2] == held[3] == 77 * 768 * 4, held  # the negative's row, float32
    assert on_disk[1] > 9 * on_disk[0] and on_disk[0] > held[0]  # (the encodings are what stayed on disk)
    assert trained[0] == trained[1], trained


# -- 6. PAG teachers and guidance ranges --------------------------------------------------------------------------

def read_shard(folder: Path, k: int) -> dict:
    with safe_open(str(Path(folder) / f"shard_{k:05d}.safetensors"), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def test_a_pag_model_is_recorded_in_the_index_and_samples_the_pag_teacher(tr, tiny):
    """ComfyUI's PerturbedAttentionGuidance on the MODEL: the index's meta says guidance cfg+pag and its scale,
    each x0 is SamplerCustomAdvanced on the PAG model (the tolerance of euler_tolerance with PAG's coefficient
    added), and another PAG scale under the same name is refused naming pag_scale."""
    model, neg = tiny.model("sd15"), tiny.negative("sd15")
    with torch.inference_mode():
        pag = PerturbedAttentionGuidance.execute(model, 3.0).args[0]
        pag2 = PerturbedAttentionGuidance.execute(model, 2.0).args[0]
    pos = tiny.positive("sd15", TEXTS[:2])
    cache = build(tr, pag, neg, name="pag", positive=pos, per=1)
    meta = json.loads((cache.folder / "index.json").read_text())["meta"]
    assert (meta["guidance"], meta["pag_scale"], meta["pag"]) == ("cfg+pag", 3.0, "ComfyUI PerturbedAttentionGuidance")
    assert cache.settings["guidance"] == "cfg+pag" and cache.settings["pag_scale"] == 3.0
    plain = build(tr, model, neg, name="pag_off", positive=pos, per=1)
    assert json.loads((plain.folder / "index.json").read_text())["meta"]["guidance"] == "cfg"
    for i in range(2):
        ref = sampler_custom_advanced(pag, [pos[i]], neg, Noise_RandomNoise(SEED + i))
        tol = euler_tolerance(model, cache.noise[i], cfg=CFG + 3.0)
        assert float((cache.x0[i:i + 1] - ref).abs().max()) <= tol, i
        assert float((plain.x0[i] - cache.x0[i]).abs().max()) > 100 * tol  # PAG changed the teacher
    with pytest.raises(ValueError, match=r"\[differs: pag_scale 3\.0 there, 2\.0 asked"):
        build(tr, pag2, neg, name="pag", positive=pos, per=1)
    with pytest.raises(ValueError, match=r"Build Teacher Cache: guidance_min/guidance_max .*PerturbedAttention"):
        build(tr, pag, neg, name="pag_range", positive=pos, per=1, gmin=2.0, gmax=6.0)
    _, losses = train(tr, model, cache, steps=2, batch=2).args
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_a_guidance_range_stores_each_samples_scale_and_train_refiner_refuses_it(tr, nc, tiny):
    gemb = importlib.import_module(f"{pack(nc)}.noisecraft.guidance_embed")
    model, neg = tiny.model("sd15"), tiny.negative("sd15")
    pos = tiny.positive("sd15", TEXTS[:3])
    cache = build(tr, model, neg, name="grange", positive=pos, per=2, gmin=2.0, gmax=6.0)  # 6 samples: shards 4 + 2
    index = json.loads((cache.folder / "index.json").read_text())
    assert index["meta"]["guidance_range"] == [2.0, 6.0] and index["meta"]["cfg"] == [2.0, 6.0]
    scales = []
    for k, idx in ((0, [0, 1, 2, 3]), (1, [4, 5])):
        shard = read_shard(cache.folder, k)
        want = gemb.scale_draws(idx, SEED, (2.0, 6.0))
        assert torch.equal(shard["guidance"], want) and shard["seed"].tolist() == [SEED + i for i in idx], k
        scales += want.tolist()
    assert all(2.0 <= s <= 6.0 for s in scales) and len(set(scales)) == 6
    for i in (0, 5):  # each sample is CFG at its own scale (its two passes run apart here, batched there: the
        # denoiser rounds as differently as an Euler step does; measured 5% of the tolerance)
        ref = sampler_custom_advanced(model, [pos[i % 3]], neg, Noise_RandomNoise(SEED + i), cfg=scales[i])
        err, tol = float((cache.x0[i:i + 1] - ref).abs().max()), euler_tolerance(model, cache.noise[i], cfg=scales[i])
        assert err <= tol, (i, err, tol)
    with pytest.raises(ValueError) as err:
        train(tr, model, cache, steps=1)
    msg = str(err.value)
    assert msg.startswith("Train Refiner: ") and "--guidance-range 2 6" in msg and str(cache.folder) in msg, msg
    with pytest.raises(ValueError, match=r"Build Teacher Cache: guidance_min/guidance_max .* need a cache_name"):
        build(tr, model, neg, positive=pos, per=1, gmin=2.0, gmax=6.0)


# -- 7. Filter Teacher Cache on a named cache ---------------------------------------------------------------------

def test_filter_teacher_cache_on_a_named_cache_then_train_refiner(tr, ts, nc, tiny):
    tf = importlib.import_module(f"{pack(nc)}.nodes.nodes_teacher_filter")
    model = tiny.model("sd15")
    built = build(tr, model, tiny.negative("sd15"), name="to_filter", positive=tiny.positive("sd15"))  # 8 samples
    before = files(built.folder)
    for cache in (built, ts.LoadTeacherCache.execute(cache_name=built.folder.name).args[0]):
        with torch.inference_mode():
            out = tf.FilterTeacherCache.execute(cache, 5, "sharpness").args[0]
        kept = out.data.kept_from
        assert len(out) == 5 and len(cache) == 8 and out.store is cache.store and out.folder == built.folder
        assert torch.equal(out.x0, built.x0[kept]) and torch.equal(out.noise, built.noise[kept])
        assert torch.equal(out.prompt_ids, torch.tensor([i % 4 for i in kept.tolist()]))
        assert out.settings["filter"]["kept"] == 5 and out.settings["filter"]["of"] == 8
        refiner, losses = train(tr, model, out, steps=2, batch=4).args
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
        training = json.loads(refiner.metadata["noisecraft.training"])
        assert training["samples"] == 5 and training["teacher"]["filter"]["scorer"] == "sharpness"
    after = files(built.folder)  # a view: no sample copied; the scores are kept next to the shards (the core's)
    assert {k: v for k, v in after.items() if k in before} == before
    assert [k.startswith("scores_sharpness") for k in after if k not in before] == [True]  # one, used twice


# -- 8. old graphs ------------------------------------------------------------------------------------------------

def test_old_graphs_positional_call_still_gives_the_in_memory_cache(tr, tiny, output):
    """Build Teacher Cache called as graphs saved before the new inputs call it (model, positive, negative,
    latent, samples_per_prompt, seed, cfg, steps, scheduler): the in-memory cache as before (noises prompt-major
    from one torch.Generator(seed), each x0 ComfyUI's own sampling of its noise), no folder written."""
    model, neg = tiny.model("sd15"), tiny.negative("sd15")
    pos = tiny.positive("sd15", TEXTS[:2])
    caches = output / "noisecraft_caches"
    listed = sorted(p.name for p in caches.iterdir()) if caches.is_dir() else []
    with torch.inference_mode():
        out = tr.BuildTeacherCache.execute(model, pos, neg, latent(), 2, SEED, CFG, STEPS, "normal")
    cache = out.args[0]
    assert out.ui["text"] == ["4 teacher samples (2 prompts)"]
    assert cache.data.is_in_memory and cache.folder is None and cache.store is None and len(cache.prompts) == 2
    assert (sorted(p.name for p in caches.iterdir()) if caches.is_dir() else []) == listed
    want = torch.randn((4, 4, SIZE, SIZE), generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(cache.noise, want) and cache.prompt_ids.tolist() == [0, 0, 1, 1]
    assert cache.settings == {"cfg": CFG, "steps": STEPS, "scheduler": "normal", "sampler": "euler", "seed": SEED,
                              "samples_per_prompt": 2}
    for i in range(4):
        from_noise = tiny.nc.noise.FixedNoise(cache.noise[i:i + 1], seed=SEED)
        ref = sampler_custom_advanced(model, [pos[i // 2]], neg, from_noise)
        assert float((cache.x0[i:i + 1] - ref).abs().max()) <= euler_tolerance(model, cache.noise[i]), i
    _, losses = train(tr, model, cache, steps=2).args
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_load_prompts_held_out_split_is_what_train_refiner_validates_on(tr, pr, tiny, output):
    """Load Prompts' validation split reaches Train Refiner through the TEACHER_CACHE: Build Teacher Cache encodes
    the held-out prompts with its clip (CLIP Text Encode's encoding) and Train Refiner validates on them when its
    validation_prompts input is not connected (named and in-memory caches alike); a connected validation_prompts
    still wins."""
    texts = [f"split prompt {i}" for i in range(6)]
    folder = output / "split_prompts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "split.txt"
    path.write_text("\n".join(texts) + "\n")
    prompts = pr.LoadPrompts.execute(path=str(path), validation=2.0).args[0]
    assert len(prompts.train) == 4 and len(prompts.validation) == 2
    model, clip = tiny.model("sd15"), tiny.clip("sd15")
    for name in ("split_named", ""):
        cache = build(tr, model, tiny.negative("sd15"), name=name, prompts=prompts, clip=clip, per=1)
        assert cache.prompt_count == 4 and len(cache.held_out) == 2
        for held, want in zip(cache.held_out, prompts.validation):
            assert torch.equal(held[0][0], tiny.encode("sd15", want)[0][0])
        out = train(tr, model, cache, steps=1, validate_every=1, validation_seeds=3)
        assert json.loads(out.args[0].metadata["noisecraft.validation"])["samples"] == 2 * 3
        other = tiny.positive("sd15", ["one connected held-out prompt"])
        out = train(tr, model, cache, steps=1, validate_every=1, validation_seeds=3, validation_prompts=other)
        assert json.loads(out.args[0].metadata["noisecraft.validation"])["samples"] == 1 * 3
