"""Bad inputs at the ComfyUI node boundary (issue 9, "Clear errors"): one table row per input.

Every row runs a real node (tiny real ComfyUI models, real files in a temporary models folder
that ComfyUI's ``folder_paths`` points at for this module) under ``torch.inference_mode()`` as the
server does, and asserts that one ValueError names the node and the input (or file) to fix.
No row may write a file: the whole temporary tree is compared before and after every row.

Families: non-finite values (and an integer NOISE), empty shapes, save names, unusable files,
numeric inputs ComfyUI lets NaN through, conditioning of another model, training-node inputs.
``BrokenNoise`` is a NOISE in ComfyUI's own contract (``.seed`` and ``generate_noise(latent) ->
tensor``) that returns NaN, inf or integers: what a broken upstream NOISE node would hand over.
Rows marked ``core=True`` rely on the core's own check (the file readers of ``noisecraft.npnet`` and
``noisecraft.lora``: unreadable files, NaN/inf weights), which the loader node prefixes with its
name and the chosen file; every other row is the node's own check.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

NAN, INF = float("nan"), float("inf")
SIZE = 16  # latent size of the small NPNet and of the search-node latents
LONG = "r" * 300


class BrokenNoise:
    """A NOISE (ComfyUI's contract: ``.seed``, ``generate_noise``) whose tensor holds ``value`` at one place."""

    seed = 7

    def __init__(self, value=NAN, dtype=torch.float32):
        self.value, self.dtype = value, dtype

    def generate_noise(self, input_latent):
        shape = input_latent["samples"].shape
        if not self.dtype.is_floating_point:
            return torch.ones(shape, dtype=self.dtype)
        e = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        e.view(-1)[0] = self.value
        return e


# -- files -----------------------------------------------------------------------------------------

def _small_npnet_file(core, small: dict, path: Path) -> None:
    cfg = core.NPNetConfig(latent_channels=4, latent_size=SIZE, tokens=77, text_width=2048, **small)
    core.save_npnet_safetensors(core.random_npnet(cfg, seed=0), path)


def _with_bad_value(src: Path, dst: Path, value: float) -> None:
    """``src`` rewritten to ``dst`` with one element of its largest tensor set to ``value`` (metadata kept)."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    key = max(tensors, key=lambda k: tensors[k].numel())
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(dst), metadata=meta)


def _refiner_state(tr, model, rank=2, seed=0) -> dict:
    """A random kohya refiner LoRA on the default targets of the tiny SD1.5 UNet (Train Refiner's keys)."""
    weights = dict(model.model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, wkey in tr.lora_keys(model).items():
        w = weights[wkey]
        state[f"{key}.lora_down.weight"] = torch.randn((rank, *w.shape[1:]), generator=g) * 0.05
        state[f"{key}.lora_up.weight"] = torch.randn((w.shape[0], rank, *([1] * (w.ndim - 2))), generator=g) * 0.05
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def _unusable(folder: Path, stem: str, good: Path) -> None:
    (folder / f"{stem}_empty.safetensors").write_bytes(b"")
    (folder / f"{stem}_text.safetensors").write_text("this is a text file renamed to .safetensors\n" * 4)
    data = good.read_bytes()
    (folder / f"{stem}_truncated.safetensors").write_bytes(data[: len(data) // 2])


REFINER_META = {"noisecraft.kind": "refiner", "noisecraft.model_kind": "eps", "noisecraft.base_model": "tiny-sd15"}


@dataclass
class Ctx:
    nc: object
    npn: object
    rf: object
    tr: object
    tn: object
    root: Path

    def model(self, family="sd15"):
        return self.nc.model(family)

    def conds(self, family="sd15"):
        return self.nc.conds(family)

    def npnet(self):
        return self.npn.LoadNPNet.execute("good.safetensors", "auto").args[0]

    def refiner(self):
        return self.rf.LoadRefiner.execute("good.safetensors").args[0]

    @functools.cached_property
    def cache(self):
        """A real one-sample teacher cache from Build Teacher Cache (for the Train Refiner rows)."""
        _, neg = self.conds()
        with torch.inference_mode():
            return self.tr.BuildTeacherCache.execute(self.model(), self.nc.tiny.conditioning("sd15", 10, 1), neg,
                                                     latent(size=8), 1, 0, 7.0, 1, "normal").args[0]


@pytest.fixture(scope="module")
def ctx(nc, npn, rf, tr, tn, tmp_path_factory, model_folders):
    pack = nc.noise.__name__.split(".")[0]  # the package name the conftest imported the pack under
    core = importlib.import_module(pack + ".noisecraft.npnet")
    small = importlib.import_module(pack + ".noisecraft.train.npnet").SMALL_NPNET
    root = tmp_path_factory.mktemp("models")
    for name in ("npnet", "loras", "noise_refiners"):
        (root / name).mkdir()
    good_np = root / "npnet" / "good.safetensors"
    _small_npnet_file(core, small, good_np)
    _with_bad_value(good_np, root / "npnet" / "nan_npnet.safetensors", NAN)
    _with_bad_value(good_np, root / "npnet" / "inf_npnet.safetensors", -INF)
    _unusable(root / "npnet", "npnet", good_np)
    state = _refiner_state(tr, nc.model("sd15"))
    good_rf = root / "loras" / "good.safetensors"
    save_file(state, str(good_rf), metadata=REFINER_META)
    key = sorted(k for k in state if k.endswith(".lora_up.weight"))[0]
    prefix = key[: -len(".lora_up.weight")]
    bad = dict(state)
    bad[key] = state[key].clone()
    bad[key].view(-1)[3] = NAN
    save_file(bad, str(root / "loras" / "nan_refiner.safetensors"), metadata=REFINER_META)
    bad = dict(state, **{f"{prefix}.alpha": torch.tensor(INF)})
    save_file(bad, str(root / "loras" / "inf_alpha.safetensors"), metadata=REFINER_META)
    bad = dict(state, **{f"{prefix}.alpha": torch.tensor([2.0, 2.0])})
    save_file(bad, str(root / "loras" / "multi_alpha.safetensors"), metadata=REFINER_META)
    _unusable(root / "loras", "refiner", good_rf)
    with model_folders(root, ("npnet", "npnets"), npn), \
            model_folders(root, ("noise_refiners", "loras"), rf, set_paths=("loras",)):
        yield Ctx(nc, npn, rf, tr, tn, root)


# -- how the rows call the nodes ---------------------------------------------------------------------

def latent(batch=1, size=SIZE, height=None):
    return {"samples": torch.zeros(batch, 4, height if height is not None else size, size)}


def nan_cond(c, family="sd15", where="text"):
    """The tiny model's positive CONDITIONING with one NaN in the text embedding (or an inf in pooled_output)."""
    cond = [[t.clone(), dict(extra)] for t, extra in c.nc.tiny.conditioning(family, 1, 1)]
    if where == "text":
        cond[0][0].view(-1)[5] = NAN
    else:
        cond[0][1]["pooled_output"] = cond[0][1]["pooled_output"].clone()
        cond[0][1]["pooled_output"].view(-1)[0] = INF
    return cond


def select(c, *, lat=None, pos=None, neg=None, cfg=5.0, inversion_cfg=1.0, model="sd15"):
    p, n = c.conds(model)
    c.nc.nodes.InversionStabilitySelect.execute(c.model(model), pos if pos is not None else p,
                                                neg if neg is not None else n, lat or latent(), 0, 2, 1, cfg,
                                                inversion_cfg, "normal", 2, 1)


def optimize(c, *, lat=None, noise=None, lr=0.0, momentum=0.5, max_change=0.5, cfg=5.0):
    p, n = c.conds()
    c.nc.nodes.OptimizeNoise.execute(c.model(), p, n, lat or latent(), 0, "momentum", 1, lr, momentum, False, 1, cfg,
                                     1.0, "normal", noise=noise, max_change=max_change)


def noise_to_latent(c, *, noise=None, lat=None):
    c.nc.nodes.NoiseToLatent.execute(noise or Noise_RandomNoise(0), c.model(), lat or latent())


def golden(c, *, noise=None, positive=None, strength=1.0, lat=None):
    pos = positive if positive is not None else c.conds("sdxl")[0]
    out = c.npn.NPNetGoldenNoise.execute(noise or Noise_RandomNoise(0), c.npnet(), pos, strength, "residual",
                                         "truncate").args[0]
    out.generate_noise(lat or latent())


def refine(c, *, noise=None, positive=None, strength=1.0, lat=None):
    pos = positive if positive is not None else c.conds()[0]
    out = c.rf.RefineNoise.execute(noise or Noise_RandomNoise(0), c.model(), c.refiner(), pos, strength).args[0]
    out.generate_noise(lat or latent())


def teacher(c, *, positive=None, negative=None, lat=None, cfg=7.0):
    p, n = c.conds()
    c.tr.BuildTeacherCache.execute(c.model(), positive if positive is not None else p,
                                   negative if negative is not None else n, lat or latent(size=8), 1, 0, cfg, 1,
                                   "normal")


def collect(c, *, positive=None, negative=None, lat=None, w_l=5.0):
    p, n = c.conds("sdxl")
    c.tn.CollectNPNetPairs.execute(c.model("sdxl"), positive if positive is not None else p,
                                   negative if negative is not None else n, lat or latent(), 0, 1, w_l, 1.0, 2,
                                   "normal", 1)


def train_npnet(c, *, lr=1e-3):
    e = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pairs = c.tn.NPNetPairs(e, e.clone(), torch.zeros(1, 77, 2048), torch.zeros(2, dtype=torch.int64))
    c.tn.TrainNPNet.execute(pairs, 1, lr, 1, 0, "small", None)


def save_refiner(c, name):
    c.tr.SaveRefiner.execute(c.refiner(), name, "loras")


def save_npnet(c, name):
    c.tn.SaveNPNet.execute(c.npnet(), name, False)


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    run: Callable
    match: str  # regex searched in the message
    core: bool = False  # the node wraps the core's own check


def train_refiner(c, **kw):
    args = dict(steps=1, student_steps=1, batch_size=1, learning_rate=1e-3, rank=2, alpha=0.0, seed=0)
    args.update(kw)
    c.tr.TrainRefiner.execute(c.model(), c.cache, *args.values())


NONFINITE = "(?i:nan|non-finite|inf)"
CASES = [
    # -- non-finite values (and a wrong dtype) ------------------------------------------------------
    Case("load_npnet_nan_weights", "non-finite", lambda c: c.npn.LoadNPNet.execute("nan_npnet.safetensors", "auto"),
         rf"Load NPNet: npnet_name 'nan_npnet\.safetensors'.*nan_npnet\.safetensors.*{NONFINITE}", core=True),
    Case("load_npnet_inf_weights", "non-finite", lambda c: c.npn.LoadNPNet.execute("inf_npnet.safetensors", "auto"),
         rf"Load NPNet: npnet_name 'inf_npnet\.safetensors'.*inf_npnet\.safetensors.*{NONFINITE}", core=True),
    Case("golden_nan_positive", "non-finite", lambda c: golden(c, positive=nan_cond(c, "sdxl")),
         r"NPNet Golden Noise: positive: the CONDITIONING's text embedding \(entry 0\) contains 1 NaN/inf"),
    Case("refine_nan_positive", "non-finite", lambda c: refine(c, positive=nan_cond(c)),
         r"Refine Noise: positive: the CONDITIONING's text embedding \(entry 0\) contains 1 NaN/inf"),
    Case("select_nan_negative", "non-finite", lambda c: select(c, neg=nan_cond(c)),
         r"Inversion-Stability Select: negative: the CONDITIONING's text embedding .* NaN/inf"),
    Case("select_inf_pooled_output", "non-finite",
         lambda c: select(c, model="sdxl", pos=nan_cond(c, "sdxl", "pooled")),
         r"Inversion-Stability Select: positive: the CONDITIONING's pooled_output .* NaN/inf"),
    Case("teacher_nan_positive", "non-finite", lambda c: teacher(c, positive=nan_cond(c)),
         r"Build Teacher Cache: positive: the CONDITIONING's text embedding .* NaN/inf"),
    Case("load_refiner_nan_weights", "non-finite", lambda c: c.rf.LoadRefiner.execute("nan_refiner.safetensors"),
         rf"Load Refiner: refiner_name 'nan_refiner\.safetensors': .*nan_refiner\.safetensors.*{NONFINITE}.*"
         rf"lora_unet_\S+\.lora_up\.weight", core=True),
    Case("load_refiner_inf_alpha", "non-finite", lambda c: c.rf.LoadRefiner.execute("inf_alpha.safetensors"),
         rf"Load Refiner: refiner_name 'inf_alpha\.safetensors': .*inf_alpha\.safetensors.*{NONFINITE}.*"
         rf"lora_unet_\S+\.alpha", core=True),
    # -- unusable files -----------------------------------------------------------------------------------
    Case("load_refiner_multi_alpha", "file", lambda c: c.rf.LoadRefiner.execute("multi_alpha.safetensors"),
         r"Load Refiner: multi_alpha\.safetensors: lora_unet_\S+\.alpha has shape \[2\]; expected one number"),
    # -- numeric inputs ComfyUI lets NaN through ----------------------------------------------------------------
    Case("golden_strength_nan", "numeric", lambda c: golden(c, strength=NAN),
         r"NPNet Golden Noise: strength must be in \[0, 1\].*got nan"),
    Case("refine_strength_nan", "numeric", lambda c: refine(c, strength=NAN),
         r"Refine Noise: strength must be a finite number"),
    Case("select_cfg_nan", "numeric", lambda c: select(c, cfg=NAN),
         r"Inversion-Stability Select: cfg must be a finite number in \[0, 100\], got nan"),
    Case("select_inversion_cfg_inf", "numeric", lambda c: select(c, inversion_cfg=INF),
         r"Inversion-Stability Select: inversion_cfg must be a finite number in \[0, 100\], got inf"),
    Case("optimize_lr_nan", "numeric", lambda c: optimize(c, lr=NAN),
         r"Optimize Noise: lr must be a finite number >= 0, got nan; 0 uses the method's default"),
    Case("optimize_momentum_nan", "numeric", lambda c: optimize(c, momentum=NAN),
         r"Optimize Noise: momentum must be a finite number in \[0, 0\.99\], got nan"),
    Case("optimize_max_change_nan", "numeric", lambda c: optimize(c, max_change=NAN),
         r"Optimize Noise: max_change must be a finite number >= 0, got nan"),
    Case("optimize_cfg_nan", "numeric", lambda c: optimize(c, cfg=NAN),
         r"Optimize Noise: cfg must be a finite number"),
    Case("teacher_cfg_nan", "numeric", lambda c: teacher(c, cfg=NAN),
         r"Build Teacher Cache: cfg must be a finite number > 0, got nan"),
    Case("train_refiner_alpha_nan", "numeric", lambda c: train_refiner(c, alpha=NAN),
         r"Train Refiner: alpha must be a finite number >= 0, got nan; 0 uses alpha = rank"),
    Case("train_refiner_learning_rate_nan", "numeric", lambda c: train_refiner(c, learning_rate=NAN),
         r"Train Refiner: learning_rate must be a finite number > 0, got nan"),
    Case("collect_w_l_nan", "numeric", lambda c: collect(c, w_l=NAN),
         r"Collect NPNet Pairs: w_l and w_w must be finite numbers, got nan and 1\.0"),
    Case("train_npnet_lr_nan", "numeric", lambda c: train_npnet(c, lr=NAN),
         r"Train NPNet: lr must be a positive number .*got nan"),
    # -- training-node inputs (only where the message was unclear: an empty prompt list into Collect NPNet Pairs
    # said "got list"; a prompt of another model ended in a raw RuntimeError / KeyError) ---------------------
    Case("collect_no_prompts", "training", lambda c: collect(c, positive=[]),
         r"Collect NPNet Pairs: positive: expected a CONDITIONING with at least one prompt .*got an empty list"),
    Case("teacher_prompt_of_another_model", "training", lambda c: teacher(c, positive=c.conds("sdxl")[0]),
         r"Build Teacher Cache: positive: the CONDITIONING is 2048 wide, but this MODEL \(SD15\) reads 768-wide"),
    Case("teacher_negative_of_another_model", "training", lambda c: teacher(c, negative=c.conds("sd2v")[1]),
         r"Build Teacher Cache: negative: the CONDITIONING is 1024 wide, but this MODEL \(SD15\) reads 768-wide"),
    Case("collect_prompt_of_another_model", "training", lambda c: collect(c, positive=c.conds("sd15")[0]),
         r"Collect NPNet Pairs: positive: the CONDITIONING is 768 wide, but this MODEL \(SDXL\) reads 2048-wide"),
    # -- conditioning of another model (was a raw RuntimeError from the model's first attention layer) -------
    Case("select_prompt_of_another_model", "conditioning", lambda c: select(c, pos=c.conds("sdxl")[0]),
         r"Inversion-Stability Select: positive: the CONDITIONING is 2048 wide, but this MODEL \(SD15\)"),
    Case("refine_prompt_of_another_model", "conditioning", lambda c: refine(c, positive=c.conds("sd2v")[0]),
         r"Refine Noise: positive: the CONDITIONING is 1024 wide, but this MODEL \(SD15\) reads 768-wide"),
    Case("optimize_prompt_of_another_model_sd3", "conditioning",
         lambda c: c.nc.nodes.OptimizeNoise.execute(c.model("sd3"), c.conds("sdxl")[0], c.conds("sd3")[1],
                                                    latent(), 0, "momentum", 1, 0.0, 0.5, False, 1, 5.0, 1.0,
                                                    "normal"),
         r"Optimize Noise: positive: the CONDITIONING is 2048 wide, but this MODEL \(SD3\) reads 4096-wide"),
]


# -- a broken input NOISE (NaN, inf, an integer tensor) into every node that takes one -------------------------
BROKEN_NOISES = {"nan": (dict(value=NAN), "produced NaN/inf values"), "inf": (dict(value=-INF), "produced NaN/inf values"),
                 "integer": (dict(dtype=torch.int64), "gave a torch.int64 tensor; expected floating-point")}
NOISE_TAKERS = {"golden": (golden, "NPNet Golden Noise"), "refine": (refine, "Refine Noise"),
                "optimize": (optimize, "Optimize Noise"), "noise_to_latent": (noise_to_latent, "Noise to Latent")}
CASES += [Case(f"{node}_{bad}_noise", "non-finite", lambda c, run=run, kw=kw: run(c, noise=BrokenNoise(**kw)),
               re.escape(f"{name}: the input NOISE {msg}"))
          for node, (run, name) in NOISE_TAKERS.items() for bad, (kw, msg) in BROKEN_NOISES.items()]

# -- unusable files: both loaders name the input, the file, what is wrong with it and what was expected ---------
BAD_FILES = {"empty_file": ("empty", r"empty \(0 bytes\)"), "text_file": ("text", "text file"),
             "truncated": ("truncated", "truncated")}
LOADERS = {"load_refiner": ("Load Refiner", "refiner_name", "refiner", lambda c, name: c.rf.LoadRefiner.execute(name)),
           "load_npnet": ("Load NPNet", "npnet_name", "npnet", lambda c, name: c.npn.LoadNPNet.execute(name, "auto"))}
CASES += [Case(f"{loader}_{bad}", "file", lambda c, load=load, f=f"{stem}_{suffix}.safetensors": load(c, f),
               rf"{node}: {inp} '{stem}_{suffix}\.safetensors': .*{stem}_{suffix}\.safetensors.*{problem}.*expected",
               core=True)
          for loader, (node, inp, stem, load) in LOADERS.items() for bad, (suffix, problem) in BAD_FILES.items()]

# -- empty shapes: every node that takes a LATENT (or makes noise for one), for each empty latent -----------
EMPTY_LATENTS = {"batch_0": dict(batch=0), "0x0": dict(size=0), "height_0": dict(height=0)}
LATENT_NODES = {"select": (select, "Inversion-Stability Select: latent: the LATENT is empty"),
                "optimize": (optimize, "Optimize Noise: latent: the LATENT is empty"),
                "noise_to_latent": (noise_to_latent, "Noise to Latent: latent: the LATENT is empty"),
                "teacher": (teacher, "Build Teacher Cache: latent: the LATENT is empty"),
                "collect": (collect, "Collect NPNet Pairs: latent: the LATENT is empty")}
NOISE_NODES = {"golden": (golden, "NPNet Golden Noise: the sampler asked for noise for an empty LATENT"),
               "refine": (refine, "Refine Noise: the sampler asked for noise for an empty LATENT")}
CASES += [Case(f"{node}_{shape}", "empty", lambda c, run=run, lat=lat: run(c, lat=latent(**lat)),
               re.escape(msg) + re.escape(f" (shape {list(latent(**lat)['samples'].shape)}"))
          for node, (run, msg) in {**LATENT_NODES, **NOISE_NODES}.items() for shape, lat in EMPTY_LATENTS.items()]

# -- save names: both savers refuse every bad name the same way (nothing is written) ------------------------
BAD_SAVE_NAMES = {"300_chars": (LONG, "filename is 300 characters long; expected at most 200"),
                  "parent_dir": ("../../escaped_refiner", "filename '../../escaped_refiner' contains a folder part"),
                  "dotdot": ("..", "filename '..' contains a folder part"),
                  "absolute": ("/tmp/nc_escaped_refiner", "filename '/tmp/nc_escaped_refiner' contains a folder part"),
                  "backslash": ("sub\\refiner", "filename 'sub\\\\refiner' contains a folder part"),
                  "hidden": (".hidden", "filename '.hidden' is not a plain file name"),
                  "empty": ("   ", "filename is empty")}
SAVERS = {"save_refiner": (save_refiner, "Save Refiner"), "save_npnet": (save_npnet, "Save NPNet")}
CASES += [Case(f"{saver}_{bad}", "save name", lambda c, run=run, name=name: run(c, name), re.escape(f"{node}: {msg}"))
          for saver, (run, node) in SAVERS.items() for bad, (name, msg) in BAD_SAVE_NAMES.items()]


def _files(root: Path) -> set:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_error(ctx, case):
    top = ctx.root.parent  # the test session's temporary tree: nothing may appear anywhere in it
    before = _files(top)
    with torch.inference_mode(), pytest.raises(ValueError) as err:
        case.run(ctx)
    msg = str(err.value)
    assert err.value.__cause__ is None or err.value.__suppress_context__, "a chained library traceback"
    assert "Traceback" not in msg
    assert re.search(case.match, msg, re.S), f"\n  message: {msg}\n  expected: {case.match}"
    assert _files(top) == before, "a refused input wrote a file"
    assert not Path("/tmp/nc_escaped_refiner_00001.safetensors").exists()


def test_the_table_covers_every_family_with_enough_rows():
    per_family = {}
    for c in CASES:
        per_family[c.family] = per_family.get(c.family, 0) + 1
    assert len({c.id for c in CASES}) == len(CASES)
    assert set(per_family) == {"non-finite", "empty", "save name", "file", "numeric", "training",
                               "conditioning"}
    assert sum(per_family.values()) >= 15 and min(per_family.values()) >= 2, per_family


def test_the_good_files_and_plain_names_still_work(ctx):
    """The control rows: what the table refuses is the bad part only."""
    with torch.inference_mode():
        npnet = ctx.npnet()
        refiner = ctx.refiner()
        assert npnet.config.latent_size == SIZE and len(refiner.pairs) > 10
        name = ctx.tr.SaveRefiner.execute(refiner, "plain name-1.0", "loras").args[0]
        assert (ctx.root / "loras" / name).is_file() and name == "plain name-1.0_00001_.safetensors"
        saved = ctx.tn.SaveNPNet.execute(npnet, "my_npnet.safetensors", False).args[0]
        assert (ctx.root / "npnet" / saved).is_file() and saved == "my_npnet.safetensors"
        assert ctx.npn.LoadNPNet.execute(saved, "auto").args[0].config == npnet.config
        # the longest allowed names save (with their counter and temp names under 255 bytes)
        longest = [ctx.root / "loras" / ctx.tr.SaveRefiner.execute(refiner, "b" * 200, "loras").args[0],
                   ctx.root / "npnet" / ctx.tn.SaveNPNet.execute(npnet, "c" * 200, False).args[0]]
        assert all(p.is_file() for p in longest)
        # the checks pass finite inputs through: golden noise of a finite NOISE is finite
        g = ctx.npn.NPNetGoldenNoise.execute(Noise_RandomNoise(0), npnet, ctx.conds("sdxl")[0], 1.0, "residual",
                                             "truncate").args[0].generate_noise(latent())
        assert g.shape == (1, 4, SIZE, SIZE) and bool(torch.isfinite(g).all())
    for p in (ctx.root / "loras" / name, ctx.root / "npnet" / saved, *longest):
        p.unlink()
    assert math.isfinite(float(g.abs().max()))
