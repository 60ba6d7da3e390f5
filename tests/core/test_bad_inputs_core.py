"""Bad inputs to the core library (issue 9, "Clear errors" and "Security" item 4), table-driven.

One row per bad input: the call, the exception type and substrings of the message that name the
input (which file, which tensor, which argument) and the fix. Families: non-finite values, wrong
dtype, empty shapes, wrong channels, library exception types from file readers, numeric / enum
arguments, and the torch floor for ``.pth`` files.

Tier 1: torch only, CPU. Inputs are built here: a small seeded NPNet (``random_npnet``), files
written to a temporary folder, the shipped toy model, toy refiner and toy NPNet, and exact
analytic denoisers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from noisecraft import npnet as npnet_mod
from noisecraft import ode, rng
from noisecraft import stability as st
from noisecraft.analytic import GaussianData
from noisecraft.hosts.diffusers import DiffusersDenoiser, check_latent_shape
from noisecraft.hosts.toy import NPNET_WEIGHTS, REFINER_WEIGHTS, load_toy
from noisecraft.hosts.adapters import load_lora
from noisecraft.lora import read_lora_file, read_safetensors
from noisecraft.msd import msd_loss
from noisecraft.npnet import (
    NPNetConfig,
    check_torch_for_pth,
    golden_noise,
    load_npnet,
    npnet_from_state_dict,
    official_state_dict,
    random_npnet,
)
from noisecraft.ode import NonFiniteError
from noisecraft.refine import refine_noise, refine_with
from noisecraft.sigmas import SigmaTable, get_sigmas

NAN, INF = float("nan"), float("inf")
# 77 tokens x 2 features and 8 SVD heads: what a file without metadata is read as
SMALL = NPNetConfig(latent_channels=1, latent_size=8, text_width=2, tokens=77, svd_hidden=8, svd_mlp4_hidden=16,
                    svd_heads=8, swin_classes=1, swin_img_size=32, swin_patch=4, swin_embed_dim=16,
                    swin_depths=(2, 2), swin_heads=(2, 4), swin_window=4)
SHAPE = (1, 8, 8)  # the small NPNet's and the toy model's latent


# -- inputs ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def net():
    return random_npnet(SMALL, seed=0)


@functools.lru_cache(maxsize=1)
def toy():
    return load_toy()


def noise(*shape, seed=0):
    return torch.randn(*(shape or (2, *SHAPE)), generator=torch.Generator().manual_seed(seed))


def prompt(value=None):
    p = noise(1, 77, 2, seed=1)
    if value is not None:
        p[0, 5, 1] = value
    return p


def sched(n=4):
    return get_sigmas(SigmaTable.scaled_linear(), "normal", n)


def gauss():
    return GaussianData(0.0, 0.5, shape=SHAPE).denoiser("eps")


def never(*_):
    raise AssertionError("the model must not run for a refused input")


def with_value(t, value, index=0):
    t = t.clone()
    t.view(-1)[index] = value
    return t


class Files:
    """Bad files, written once per module into a temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        state = dict(net().state_dict())
        self.npnet_nan = self._save("npnet_nan.safetensors", {**state, "unet_svd.mlp3.0.bias":
                                                               with_value(state["unet_svd.mlp3.0.bias"], NAN, 2)})
        self.npnet_inf = self._save("npnet_inf.safetensors", {**state, "alpha": torch.tensor([INF])})
        self.npnet_dir = root / "npnet_folder.safetensors"
        self.npnet_dir.mkdir()
        self.empty = root / "empty.safetensors"
        self.empty.write_bytes(b"")
        self.text = root / "notes.safetensors"
        self.text.write_text("this is a README, not weights\n" * 4)
        self.html = root / "npnet_page.pth"
        self.html.write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
        self.npnet_cut = root / "toy_npnet_cut.safetensors"
        self.npnet_cut.write_bytes(NPNET_WEIGHTS.read_bytes()[:5000])
        self.lora_cut = root / "toy_refiner_cut.safetensors"
        self.lora_cut.write_bytes(REFINER_WEIGHTS.read_bytes()[:3000])
        self.bad_header = root / "bad_header.safetensors"
        self.bad_header.write_bytes((12).to_bytes(8, "little") + b"{not json!!}")
        lora, self.lora_meta = read_lora_file(REFINER_WEIGHTS)
        self.lora = lora
        key = next(k for k in lora if k.endswith(".lora_up.weight"))
        self.lora_nan_key = key
        self.lora_nan = self._save("refiner_nan.safetensors", {**lora, key: with_value(lora[key], NAN)})
        akey = next(k for k in lora if k.endswith(".alpha"))
        self.alpha_key = akey
        self.lora_alpha = self._save("refiner_alpha2.safetensors", {**lora, akey: torch.tensor([4.0, 4.0])})
        self.lora_dir = root / "refiner_folder.safetensors"
        self.lora_dir.mkdir()
        self.pth = root / "small_npnet.pth"
        torch.save(official_state_dict(net()), self.pth)

    def _save(self, name, tensors):
        path = self.root / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return Files(tmp_path_factory.mktemp("bad_inputs"))


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    call: Callable[[Files], object]
    exc: type
    match: tuple[str, ...]  # substrings of the message, all required


def toy_denoiser():
    return toy().denoiser(torch.tensor([3]))


def refine(e, lora=None, **kw):
    return refine_noise(e, gauss(), lora or gauss(), "eps", float(sched()[0]), **kw)


CASES = [
    # -- 1. non-finite values: refused at the boundary, naming the source -------------------------
    Case("npnet-file-nan-tensor", "nonfinite", lambda f: load_npnet(f.npnet_nan), NonFiniteError,
         ("npnet_nan.safetensors", "unet_svd.mlp3.0.bias", "NaN/inf", "download")),
    Case("npnet-file-inf-alpha", "nonfinite", lambda f: load_npnet(f.npnet_inf), NonFiniteError,
         ("npnet_inf.safetensors", "alpha", "NaN/inf")),
    Case("npnet-state-dict-nan", "nonfinite",
         lambda f: npnet_from_state_dict({**net().state_dict(), "beta": torch.tensor([NAN])}, source="mine.pth"),
         NonFiniteError, ("mine.pth", "beta")),
    Case("golden-nan-prompt", "nonfinite", lambda f: golden_noise(net(), noise(), prompt(NAN)), NonFiniteError,
         ("golden_noise prompt_embeds", "1 NaN", "text encoder")),
    Case("golden-inf-prompt", "nonfinite", lambda f: golden_noise(net(), noise(), prompt(-INF)), NonFiniteError,
         ("golden_noise prompt_embeds", "1 inf")),
    Case("npnet-forward-nan-prompt", "nonfinite", lambda f: net()(noise(), prompt(NAN)), NonFiniteError,
         ("NPNet prompt_embeds",)),
    Case("golden-nan-noise-before-svd", "nonfinite",
         lambda f: golden_noise(net(), with_value(noise(), NAN), prompt()), NonFiniteError,
         ("golden_noise noise", "NaN", "NOISE")),
    Case("golden-inf-noise-resize", "nonfinite",
         lambda f: golden_noise(net(), with_value(noise(1, 1, 12, 12), INF), prompt(), resolution="resize"),
         NonFiniteError, ("golden_noise noise", "inf")),
    Case("golden-nan-weights-after-load", "nonfinite",
         lambda f: golden_noise(_poisoned(), noise(), prompt()), NonFiniteError,
         ("the NPNet", "produced", "reload the NPNet file")),
    Case("refine-nan-noise-blames-noise", "nonfinite",
         lambda f: refine_noise(with_value(noise(), NAN), never, never, "eps", 14.6), NonFiniteError,
         ("refine_noise e (the input noise", "not the refiner")),
    Case("refine-inf-noise", "nonfinite",
         lambda f: refine_noise(with_value(noise(), -INF), never, never, "eps", 14.6, strength=0.5), NonFiniteError,
         ("refine_noise e", "1 inf")),
    Case("refine-nan-residual-names-refiner", "nonfinite",
         lambda f: refine(noise(), lambda x, s: x * NAN, refiner="refiner 'toy_refiner.safetensors'"),
         NonFiniteError, ("refined noise", "input noise was finite", "toy_refiner.safetensors")),
    Case("lora-file-nan", "nonfinite", lambda f: read_lora_file(f.lora_nan), NonFiniteError,
         ("refiner_nan.safetensors", "lora_up.weight", "NaN/inf", "retrain")),
    Case("load-lora-file-nan", "nonfinite", lambda f: load_lora(toy().unet, f.lora_nan), NonFiniteError,
         ("refiner_nan.safetensors", "NaN/inf")),
    Case("load-lora-state-nan", "nonfinite",
         lambda f: load_lora(toy().unet, {**f.lora, f.lora_nan_key: with_value(f.lora[f.lora_nan_key], INF)}),
         NonFiniteError, ("the LoRA state dict", f"lora_up.weight")),
    Case("select-nan-candidate", "nonfinite",
         lambda f: st.select(gauss(), with_value(noise(3, 1, *SHAPE), NAN, 70), sched(), "eps"), NonFiniteError,
         ("select() candidate noise", "NaN")),
    Case("optimize-inf-noise", "nonfinite",
         lambda f: st.optimize(gauss(), with_value(noise(), INF), sched(), "eps"), NonFiniteError,
         ("optimize() noise e", "inf")),
    Case("round-trip-nan-noise", "nonfinite",
         lambda f: st.round_trip(gauss(), with_value(noise(), NAN), sched(), "eps"), NonFiniteError,
         ("round_trip noise e", "NaN")),
    Case("msd-nan-teacher", "nonfinite",
         lambda f: msd_loss(lambda e: e, noise(), gauss(), with_value(noise(), NAN), sched(), "eps"),
         NonFiniteError, ("msd_loss teacher_x0", "teacher cache")),
    # -- 2. wrong dtype: integer / bool noise is refused, never cast ---------------------------------
    Case("golden-int-noise", "dtype",
         lambda f: golden_noise(net(), torch.ones(1, *SHAPE, dtype=torch.int64), prompt()), TypeError,
         ("golden_noise noise", "floating-point", "torch.int64")),
    Case("golden-bool-noise", "dtype",
         lambda f: golden_noise(net(), torch.ones(1, *SHAPE, dtype=torch.bool), prompt(), strength=0.0), TypeError,
         ("golden_noise noise", "torch.bool")),
    Case("golden-int-prompt", "dtype",
         lambda f: golden_noise(net(), noise(), torch.ones(1, 77, 2, dtype=torch.int32)), TypeError,
         ("golden_noise prompt_embeds", "torch.int32")),
    Case("npnet-forward-int-noise", "dtype",
         lambda f: net()(torch.zeros(1, *SHAPE, dtype=torch.int16), prompt()), TypeError,
         ("NPNet noise", "floating-point")),
    Case("refine-int-noise", "dtype",
         lambda f: refine_noise(torch.ones(1, *SHAPE, dtype=torch.int64), never, never, "eps", 14.6), TypeError,
         ("refine_noise e", "floating-point")),
    Case("refine-with-uint8", "dtype",
         lambda f: refine_with(never, torch.ones(1, *SHAPE, dtype=torch.uint8)), TypeError,
         ("refine_with e", "torch.uint8")),
    Case("select-int-candidates", "dtype",
         lambda f: st.select(gauss(), torch.ones(2, 1, *SHAPE, dtype=torch.int64), sched(), "eps"), TypeError,
         ("select() candidate noise", "floating-point")),
    Case("optimize-bool-noise", "dtype",
         lambda f: st.optimize(gauss(), torch.ones(1, *SHAPE, dtype=torch.bool), sched(), "eps"), TypeError,
         ("optimize() noise e", "torch.bool")),
    Case("sample-int-latent", "dtype",
         lambda f: ode.sample(gauss(), torch.ones(1, *SHAPE, dtype=torch.int64), sched()), TypeError,
         ("sample() x", "floating-point")),
    Case("denoiser-int-latent", "dtype",
         lambda f: toy_denoiser()(torch.ones(1, *SHAPE, dtype=torch.int64), torch.ones(1)), TypeError,
         ("DiffusersDenoiser x", "floating-point")),
    # -- 3. empty shapes: a clear ValueError, not ZeroDivisionError ----------------------------------
    Case("golden-empty-batch", "empty", lambda f: golden_noise(net(), torch.zeros(0, *SHAPE), prompt()), ValueError,
         ("golden_noise noise", "empty batch (B = 0)")),
    Case("golden-0x0-latent", "empty", lambda f: golden_noise(net(), torch.zeros(1, 1, 0, 0), prompt()), ValueError,
         ("golden_noise noise", "size 0 on axis 2, 3", "width and height >= 1")),
    Case("golden-empty-prompt", "empty", lambda f: golden_noise(net(), noise(), torch.zeros(1, 0, 2)), ValueError,
         ("golden_noise prompt_embeds", "size 0 on axis 1")),
    Case("npnet-forward-empty-batch", "empty", lambda f: net()(torch.zeros(0, *SHAPE), prompt()), ValueError,
         ("NPNet", "B = 0")),
    Case("refine-empty-batch", "empty",
         lambda f: refine_noise(torch.zeros(0, *SHAPE), never, never, "eps", 14.6), ValueError,
         ("refine_noise e", "empty batch")),
    Case("refine-0x0", "empty",
         lambda f: refine_noise(torch.zeros(1, 1, 0, 0), never, never, "eps", 14.6), ValueError,
         ("refine_noise e", "size 0 on axis 2, 3")),
    Case("score-empty", "empty", lambda f: st.stability_score(torch.zeros(0, 4), torch.zeros(0, 4)), ValueError,
         ("stability_score noise", "empty batch")),
    Case("select-no-candidates", "empty",
         lambda f: st.select(gauss(), torch.zeros(0, 1, *SHAPE), sched(), "eps"), ValueError,
         ("at least one candidate (K >= 1)", "candidate_noises")),
    Case("select-empty-batch", "empty",
         lambda f: st.select(gauss(), torch.zeros(2, 0, *SHAPE), sched(), "eps"), ValueError,
         ("select() candidate noise", "size 0 on axis 1")),
    Case("optimize-empty-batch", "empty",
         lambda f: st.optimize(gauss(), torch.zeros(0, *SHAPE), sched(), "eps"), ValueError,
         ("optimize() noise e", "empty batch")),
    Case("sample-empty-batch", "empty", lambda f: ode.sample(never, torch.zeros(0, *SHAPE), sched()), ValueError,
         ("sample() x", "empty batch")),
    Case("invert-0x0", "empty", lambda f: ode.invert(never, torch.zeros(1, 1, 0, 0), sched()), ValueError,
         ("invert() x0", "size 0 on axis 2, 3")),
    Case("candidate-noises-zero-size", "empty", lambda f: rng.candidate_noises(0, 2, (1, 1, 0, 8)), ValueError,
         ("candidate_noises shape", "every size >= 1")),
    # -- 4. wrong channels / sizes for the model: said up front, with the flag -------------------------
    Case("toy-denoiser-4-channels", "channels", lambda f: toy_denoiser()(noise(1, 4, 8, 8), torch.ones(1)),
         ValueError, ("4 channels", "in_channels = 1", "--latent-shape 1 8 8", "--latent-shape C H W")),
    Case("toy-check-latent-shape", "channels", lambda f: toy().check_latent_shape((4, 8, 8)), ValueError,
         ("4 channels", "1-channel", "--latent-shape")),
    Case("toy-denoiser-empty-batch", "channels", lambda f: toy_denoiser()(torch.zeros(0, 1, 8, 8), torch.ones(0)),
         ValueError, ("every size >= 1", "--latent-shape C H W")),
    Case("patchified-odd-size", "channels", lambda f: check_latent_shape(_sd3(), (1, 4, 7, 8)), ValueError,
         ("7x8", "patch_size = 2", "multiples of 2", "--latent-shape 4 6 8")),
    Case("patchified-wrong-channels", "channels", lambda f: check_latent_shape(_sd3(), (1, 16, 8, 8)), ValueError,
         ("16 channels", "in_channels = 4")),
    # -- 5. library exception types: one ValueError naming the path and what was expected -------------
    Case("safetensors-bad-header", "files", lambda f: read_safetensors(f.bad_header, "a test file"), ValueError,
         ("bad_header.safetensors", "damaged safetensors header", "expected a test file")),
    Case("lora-multi-element-alpha-file", "files", lambda f: load_lora(toy().unet, f.lora_alpha), ValueError,
         ("refiner_alpha2.safetensors", ".alpha has shape [2]", "expected one number")),
    Case("lora-multi-element-alpha-state", "files",
         lambda f: load_lora(toy().unet, {**f.lora, f.alpha_key: torch.ones(3, 1)}), ValueError,
         ("the LoRA state dict", ".alpha has shape [3, 1]")),
    Case("npnet-text", "files", lambda f: load_npnet(f.html), ValueError,
         ("npnet_page.pth", "a text file", "neither safetensors nor a PyTorch checkpoint")),
    # -- 6. numeric and enum arguments: NaN refused explicitly, choices listed -------------------------
    Case("optimize-unknown-method", "numeric",
         lambda f: st.optimize(gauss(), noise(), sched(), "eps", method="adamw"), ValueError,
         ("optimize() method", "'momentum'", "'fixed_point'", "'adamw'")),
    Case("round-trip-ascending", "numeric",
         lambda f: st.round_trip(gauss(), noise(), sched().flip(0), "eps"), ValueError,
         ("round_trip sigmas", "expected the descending", "got ascending", "not flipped")),
    Case("select-ascending", "numeric",
         lambda f: st.select(gauss(), noise(2, 1, *SHAPE), sched().flip(0), "eps"), ValueError,
         ("select() sigmas", "got ascending")),
    Case("optimize-lr-nan", "numeric", lambda f: st.optimize(gauss(), noise(), sched(), "eps", lr=NAN), ValueError,
         ("optimize() lr", "finite", "nan")),
    Case("optimize-steps-negative", "numeric",
         lambda f: st.optimize(gauss(), noise(), sched(), "eps", steps=-1), ValueError,
         ("optimize() steps", "[0, inf)", "0 only scores")),
    Case("optimize-momentum-nan", "numeric",
         lambda f: st.optimize(gauss(), noise(), sched(), "eps", momentum=NAN), ValueError,
         ("optimize() momentum", "finite")),
    Case("optimize-target-nan", "numeric",
         lambda f: st.optimize(gauss(), noise(), sched(), "eps", target=NAN), ValueError, ("optimize() target",)),
    Case("optimize-patience-fraction", "numeric",
         lambda f: st.optimize(gauss(), noise(), sched(), "eps", patience=1.5), ValueError,
         ("optimize() patience", "integer")),
    Case("select-micro-batch-nan", "numeric",
         lambda f: st.select(gauss(), noise(2, 1, *SHAPE), sched(), "eps", micro_batch=NAN), ValueError,
         ("select() micro_batch", "a finite integer")),
    Case("refine-negative-strength", "numeric", lambda f: refine(noise(), strength=-0.5), ValueError,
         ("strength", "[0, 2]", "0 to turn refinement off")),
    Case("refine-nan-strength", "numeric", lambda f: refine(noise(), strength=NAN), ValueError,
         ("strength", "finite")),
    Case("golden-nan-strength", "numeric", lambda f: golden_noise(net(), noise(), prompt(), strength=NAN),
         ValueError, ("golden_noise strength", "[0, 1]")),
    Case("get-sigmas-steps-nan", "numeric",
         lambda f: get_sigmas(SigmaTable.scaled_linear(), "normal", NAN), ValueError,
         ("get_sigmas steps", "positive integer")),
    Case("get-sigmas-steps-zero", "numeric",
         lambda f: get_sigmas(SigmaTable.scaled_linear(), "normal", 0), ValueError, ("get_sigmas steps",)),
    Case("get-sigmas-denoise-nan", "numeric",
         lambda f: get_sigmas(SigmaTable.scaled_linear(), "normal", 4, denoise=NAN), ValueError,
         ("get_sigmas denoise", "finite")),
    Case("candidates-k-zero", "numeric", lambda f: rng.candidate_noises(0, 0, (1, *SHAPE)), ValueError,
         ("candidate_noises K", "[1, inf)")),
    Case("sample-ascending", "numeric", lambda f: ode.sample(gauss(), noise(), sched().flip(0)), ValueError,
         ("sample() sigmas", "expected a descending", "invert()")),
    Case("invert-not-monotone", "numeric", lambda f: ode.invert(gauss(), noise(), [0.0, 2.0, 1.0]), ValueError,
         ("invert() sigmas", "monotone", "goes down and up")),
    Case("sigmas-not-numbers", "numeric", lambda f: ode.sample(gauss(), noise(), "karras"), ValueError,
         ("sigmas", "sequence or tensor of numbers")),
    Case("toy-noise-batch-zero", "numeric", lambda f: toy().noise(0), ValueError, ("ToyModel.noise batch", ">= 1")),
    # -- 7. torch floor for .pth files (GHSA-53q9-r3pm-6pq6, CVE-2026-24747)---------------------------------------
    Case("pth-floor-2.5.1", "torch-floor", lambda f: check_torch_for_pth("2.5.1"), ValueError,
         ("torch >= 2.10", "torch 2.5.1", "GHSA-53q9-r3pm-6pq6", "CVE-2025-32434", "CVE-2026-24747",
          "python -m noisecraft convert SRC.pth DST.safetensors")),
    Case("pth-floor-2.4-cuda", "torch-floor", lambda f: check_torch_for_pth("2.4.0+cu121"), ValueError,
         ("torch 2.4.0+cu121", "safetensors files load on any torch")),
    Case("pth-floor-1.13", "torch-floor", lambda f: check_torch_for_pth("1.13.1", path="x.pth"), ValueError,
         ("x.pth", "torch 1.13.1")),
    Case("pth-floor-unparseable", "torch-floor", lambda f: check_torch_for_pth("unknown"), ValueError,
         ("torch unknown", "torch >= 2.10")),
    Case("pth-floor-2.9.1", "torch-floor", lambda f: check_torch_for_pth("2.9.1+cu128"), ValueError,
         ("torch 2.9.1+cu128", "CVE-2026-24747", "fixed in torch 2.10.0")),
]


# -- 5b. every unusable file through every weight reader: one ValueError naming the file, what is wrong with it and
# what was expected
BAD_FILES = {"empty": ("empty.safetensors", "empty (0 bytes)"), "text": ("notes.safetensors", "a text file"),
             "lora_cut": ("toy_refiner_cut.safetensors", "truncated"),
             "npnet_cut": ("toy_npnet_cut.safetensors", "truncated"), "lora_dir": ("refiner_folder.safetensors", "is a directory")}
READERS = {"read-lora": (read_lora_file, "expected a safetensors LoRA"),
           "load-lora": (lambda path: load_lora(toy().unet, path), "expected a safetensors LoRA"),
           "load-npnet": (load_npnet, "NPNet")}
CASES += [Case(f"{reader}-{bad}", "files", lambda f, read=read, bad=bad: read(getattr(f, bad)), ValueError,
               (name, problem, expected))
          for reader, (read, expected) in READERS.items() for bad, (name, problem) in BAD_FILES.items()]


def _poisoned():
    """A loaded NPNet whose weights were changed afterwards (NaN in the SVD branch's last bias)."""
    m = random_npnet(SMALL, seed=1)
    with torch.no_grad():
        m.unet_svd.mlp4[2].bias[0] = NAN
    return m


@functools.lru_cache(maxsize=1)
def _sd3():
    """A real, tiny SD3-class transformer (patch size 2, 4 channels): only its config is read."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=1, joint_attention_dim=8, caption_projection_dim=8,
                                 pooled_projection_dim=8, out_channels=4)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_a_clear_message(case, files):
    with pytest.raises(case.exc) as info:
        case.call(files)
    message = str(info.value)
    for part in case.match:
        assert part in message, f"{case.id}: {part!r} not in {message!r}"
    assert "Traceback" not in message


def test_row_counts_per_family():
    families: dict[str, int] = {}
    for c in CASES:
        families[c.family] = families.get(c.family, 0) + 1
    assert len({c.id for c in CASES}) == len(CASES)
    assert len(CASES) >= 35 and all(n >= 4 for n in families.values()), families


# -- the other side of each rule: what must keep working ---------------------------------------------


def test_pth_floor_accepts_fixed_torch_versions():
    for version in ("2.10.0", "2.10.0a0+ecf3bae40a", "2.14.1+cu130", "3.0"):
        assert check_torch_for_pth(version) is None
    check_torch_for_pth()  # the torch running these tests


def test_pth_is_refused_on_old_torch_but_safetensors_loads(files, monkeypatch, tmp_path):
    good = load_npnet(files.pth)
    assert good.config == SMALL
    st_path = tmp_path / "small.safetensors"
    npnet_mod.save_npnet_safetensors(good, st_path)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(ValueError, match=r"small_npnet\.pth: reading a \.pth file needs torch >= 2\.10.*GHSA.*CVE-2026-24747"):
        load_npnet(files.pth)
    again = load_npnet(st_path)  # safetensors never unpickles: any torch
    assert all(torch.equal(v, good.state_dict()[k]) for k, v in again.state_dict().items())


def test_finite_inputs_still_work_and_nonfinite_errors_are_value_errors(files):
    out = golden_noise(net(), noise(), prompt())
    assert out.shape == (2, *SHAPE) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    half = golden_noise(net(), noise().half(), prompt())
    assert half.dtype == torch.float16
    assert issubclass(NonFiniteError, ValueError) and issubclass(NonFiniteError, FloatingPointError)
    assert math.isfinite(float(st.round_trip(gauss(), noise(), sched(), "eps").score[0]))
    model = toy()
    lora = load_lora(model.unet, REFINER_WEIGHTS)
    try:
        d_base, d_lora = lora.base_and_lora(model.denoiser(torch.tensor([3, 5])))
        e_hat = refine_noise(noise(), d_base, d_lora, "eps", float(get_sigmas(model.table, "normal", 4)[0]))
        assert bool(torch.isfinite(e_hat).all())
    finally:
        lora.remove()
    # a UNet takes any spatial size: only the channels are checked
    check_latent_shape(model.unet, (2, 1, 7, 5))
    assert DiffusersDenoiser(model.unet, model.table, model.cond(torch.tensor([1])))(noise(1, 1, 7, 5),
                                                                                    torch.ones(1)).shape == (1, 1, 7, 5)
