"""The rows of ``benchmarks/gpu_report.py`` that need no ComfyUI, and what every row shares.

Shared: :class:`Setup` (device, dtype, sizes, repeats: the only difference between the GPU run and
the ``--cpu --tiny`` smoke run), :class:`Row` (one line of the report: status, numbers, a one-line
summary), the synchronized timers (:func:`alternate`, :func:`peak_bytes`), the seeded random
initialisation of a full-size network built on its device (:func:`random_init`) and the static list
of NoiseCraft nodes that output NOISE or LATENT (:func:`noise_nodes`, read from ``nodes/*.py``
without importing ComfyUI, so the precision rows are listed even where ComfyUI is absent).

Core rows (torch + diffusers + peft only):

* ``models/diffusers``: parameter counts of the full-size diffusers UNets (meta device);
* ``select_micro_batch``: :func:`noisecraft.stability.select` (K = 8, 4 score steps, cfg 7,
  inversion cfg 1) on a random-weight diffusers SD1.5 UNet at 512^2 (tiny UNet at 128^2 with
  ``--tiny``): wall time per candidate at micro-batch 8 against micro-batch 1;
* ``train_step/<arch>``: one MSD training step (refiner LoRA at the paper's rank, batch 2, bf16,
  gradient checkpointing, 10 student steps), time and peak memory, from
  ``bench_train_memory.msd_step_figures`` (that benchmark's own measurement, reused);
* ``npnet_device``: golden noise of one seeded random NPNet (SDXL preset; small with ``--tiny``)
  on the CPU against the same on the device, with canonical singular-vector signs (the README's
  device-independence claim) and with the official device-dependent signs.

Random weights make images meaningless: timings, memory, and agreement between devices and dtypes
are what the rows measure.
"""

from __future__ import annotations

import ast
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
K_CANDIDATES = 8
SCORE_STEPS = 4
CFG = 7.0
# the refiner training step: the paper's ranks (App. D: 128 on SD2.1, 256 on SDXL), batch 2, bf16
TRAIN = dict(batch=2, dtype="bf16", gradient_checkpointing=True, student_steps=10)
TRAIN_RANK = {"sd15": 128, "sdxl": 256, "tiny": 4}
_TRAIN_FIGURES: dict = {}
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000, "prediction_type": "epsilon"}


@dataclass
class Setup:
    """Everything that differs between the GPU report and the ``--cpu --tiny`` smoke run."""

    device: torch.device
    tiny: bool
    dtype: torch.dtype  # the half-precision dtype of the timed rows (fp16 on CUDA)
    repeats: int = 3  # timed runs per variant, after `warmup` untimed ones (1 in the tiny smoke run)
    warmup: int = 1  # 0 in the tiny smoke run (nothing to warm up on a CPU)
    steps: int = 20
    comfy: Optional[str] = None  # why the ComfyUI rows cannot run, or None
    budget: float = math.inf  # seconds of measuring; rows that would start later are not run
    deadline: float = math.inf  # time.perf_counter() value at which the budget is used up

    def pixels(self, family: str) -> int:
        """Image side in pixels: SD1.5 512, SDXL 1024; 64 for the tiny models."""
        return 64 if self.tiny else {"sd15": 512, "sdxl": 1024}[family]

    def side(self, family: str) -> int:
        """Latent side (pixels / 8)."""
        return self.pixels(family) // 8

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Row:
    """One line of the report. ``status``: ``ok``, ``not run: <why>`` or ``failed: <error>``."""

    id: str
    what: str
    paper: str = ""
    status: str = "not run"
    summary: str = ""
    values: dict = field(default_factory=dict)
    seconds: float = 0.0

    def done(self, summary: str, **values) -> "Row":
        bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        self.status = "ok" if not bad else f"failed: non-finite {', '.join(bad)}"
        self.summary, self.values = summary, values
        return self


def alternate(setup: Setup, variants: dict[str, Callable[[], object]]) -> tuple[dict[str, list[float]], dict]:
    """Wall times of each variant: ``setup.warmup`` untimed runs of each, then ``setup.repeats`` rounds
    running every variant once in turn (drift hits all alike); the device is synchronized around each.
    Returns the times and each variant's last result."""
    for fn in variants.values():
        for _ in range(setup.warmup):
            fn()
    times, last = {name: [] for name in variants}, {}
    for _ in range(setup.repeats):
        for name, fn in variants.items():
            setup.sync()
            t0 = time.perf_counter()
            last[name] = fn()
            setup.sync()
            times[name].append(time.perf_counter() - t0)
    return times, last


def median(times: list[float]) -> float:
    return float(statistics.median(times))


@contextmanager
def peak_bytes(setup: Setup):
    """``with peak_bytes(setup) as peak:`` -> ``peak["bytes"]``, CUDA's peak allocation inside the block
    (None on other devices)."""
    peak = {"bytes": None}
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
    yield peak
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
        peak["bytes"] = int(torch.cuda.max_memory_allocated(setup.device))


def random_init(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Seeded random weights in place, on the module's own device (a full-size UNet is built on the GPU
    and never copied): matrices and kernels ~ N(0, gain^2 / fan_in), 1-D weights (norms) 1, biases 0.
    One generator per device, drawn in ``named_parameters`` order; the global RNG is not touched."""
    gens = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            if p.ndim >= 2:
                g = gens.get(p.device)
                if g is None:
                    g = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                p.normal_(0.0, gain / math.sqrt(p[0].numel()), generator=g)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return module


def noise_nodes() -> list[tuple[str, str]]:
    """``(node_id, file)`` of every node in ``nodes/*.py`` whose outputs include NOISE or LATENT, read from the
    source without importing ComfyUI: a schema call (``io.Schema(node_id=...)`` or ``node_schema("NC_...", ...)``)
    whose ``outputs`` hold an ``io.Noise.Output`` / ``io.Latent.Output``. Where ComfyUI is present the report
    checks this list against the pack's live schemas (``_gpu_comfy.live_noise_nodes``)."""
    found = []
    for path in sorted((REPO / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            first = node.args[0] if node.args else None
            ident = kw.get("node_id", first)
            if not (isinstance(ident, ast.Constant) and str(ident.value).startswith("NC_") and "outputs" in kw):
                continue
            outs = ast.dump(kw["outputs"])
            if "attr='Noise'" in outs or "attr='Latent'" in outs:
                found.append((ident.value, path.name))
    return found


# -- core rows ----------------------------------------------------------------------------------

def diffusers_sd15(setup: Setup, dtype: torch.dtype, seed: int = 0):
    """A random-weight diffusers UNet (SD1.5 layout, tiny with ``--tiny``) built on the device in
    ``dtype``, frozen, and its sigma table and text width."""
    from bench_train_memory import ARCHS  # the diffusers configs: SD1.5 (the class's defaults), tiny
    from diffusers import UNet2DConditionModel

    from noisecraft.hosts.diffusers import sigma_table_from_scheduler

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHS["tiny" if setup.tiny else "sd15"][0])
    unet = random_init(unet.to_empty(device=setup.device), seed).to(dtype).eval().requires_grad_(False)
    return unet, sigma_table_from_scheduler(SD_SCHEDULER), unet.config.cross_attention_dim


def text(setup: Setup, width: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 77, width, generator=torch.Generator().manual_seed(seed)).to(setup.device)


def select_micro_batch(setup: Setup) -> Row:
    row = Row("select_micro_batch", f"stability.select, K={K_CANDIDATES}, {SCORE_STEPS} score steps, cfg {CFG:g}: "
              "wall time per candidate at micro-batch 8 vs 1 (diffusers SD1.5 UNet, "
              f"{setup.pixels('sd15')}^2, {str(setup.dtype)[6:]})", "lower is better; ideal 1/8 = 0.125")
    from noisecraft import stability
    from noisecraft.hosts.diffusers import DiffusersDenoiser
    from noisecraft.sigmas import get_sigmas

    unet, table, width = diffusers_sd15(setup, setup.dtype)
    cond = text(setup, width, 1)
    guided = DiffusersDenoiser(unet, table, cond, torch.zeros_like(cond), cfg=CFG)
    inverse = DiffusersDenoiser(unet, table, cond, cfg=1.0)
    side = setup.side("sd15")
    cands = torch.randn(K_CANDIDATES, 1, 4, side, side, generator=torch.Generator().manual_seed(2)).to(setup.device)
    sigmas = get_sigmas(table, "normal", SCORE_STEPS)

    peaks = {}

    def run(mb):
        with peak_bytes(setup) as peak, torch.no_grad():
            res = stability.select(guided, cands, sigmas, table.kind, micro_batch=mb, inverse_denoiser=inverse,
                                   keep_x0=False)
        peaks[mb] = peak["bytes"]
        return res

    times, last = alternate(setup, {"mb1": lambda: run(1), "mb8": lambda: run(8)})
    scores = last["mb8"].scores
    t1, t8 = median(times["mb1"]) / K_CANDIDATES, median(times["mb8"]) / K_CANDIDATES
    mem = "" if peaks[8] is None else f"; peak {peaks[8] / 2**30:.2f} / {peaks[1] / 2**30:.2f} GiB"
    return row.done(f"{t8 * 1e3:.1f} / {t1 * 1e3:.1f} ms per candidate = {t8 / t1:.3f}{mem}", per_candidate_mb1_s=t1,
                    per_candidate_mb8_s=t8, ratio=t8 / t1, peak_bytes_mb1=peaks[1], peak_bytes_mb8=peaks[8],
                    scores_finite=bool(torch.isfinite(scores).all()))


def diffusers_models(setup: Setup) -> Row:
    """Parameter counts of the full-size diffusers UNets (meta device, nothing materialized)."""
    from bench_train_memory import ARCHS
    from diffusers import UNet2DConditionModel

    counts = {}
    for arch in ("sd15", "sdxl"):
        with torch.device("meta"):
            counts[f"{arch}_params"] = sum(p.numel() for p in UNet2DConditionModel(**ARCHS[arch][0]).parameters())
    return Row("models/diffusers", "full-size diffusers UNets the core rows use on the GPU (parameters, counted on "
               "the meta device)", "SD1.5 859.5M, SDXL 2567.5M").done(
        f"SD1.5 {counts['sd15_params'] / 1e6:.1f}M, SDXL {counts['sdxl_params'] / 1e6:.1f}M", **counts)


def train_step(setup: Setup, arch: str) -> Row:
    """One MSD step of ``bench_train_memory.msd_step_figures`` (the tiny arch for both rows with ``--tiny``,
    computed once)."""
    arch = "tiny" if setup.tiny else arch
    rank = TRAIN_RANK[arch]
    row = Row(f"train_step/{arch}", f"one MSD training step ({arch} UNet, rank-{rank} refiner LoRA, batch "
              f"{TRAIN['batch']}, {TRAIN['dtype']}, gradient checkpointing, {TRAIN['student_steps']} student "
              "steps): time and peak memory", "issue 11 target: SDXL at batch >= 2 within 24 GB")
    key = (arch, setup.device.type, setup.repeats)
    if key not in _TRAIN_FIGURES:
        from bench_train_memory import msd_step_figures

        _TRAIN_FIGURES[key] = msd_step_figures(arch, rank, TRAIN["batch"], device=setup.device.type,
                                               dtype=TRAIN["dtype"], repeat=setup.repeats,
                                               gradient_checkpointing=TRAIN["gradient_checkpointing"],
                                               student_steps=TRAIN["student_steps"],
                                               latent=setup.side("sd15") if setup.tiny else None)
    fig = _TRAIN_FIGURES[key]
    step, peak, est = fig.get("step_s"), fig.get("peak_bytes"), fig.get("estimate_bytes")
    summary = (f"{'n/a' if step is None else f'{step:.3f} s'}, peak "
               f"{'n/a (CUDA only)' if peak is None else f'{peak / 2**30:.2f} GiB'}, estimate "
               f"{'n/a' if est is None else f'{est / 2**30:.3f} GiB'}")
    return row.done(summary, **{k: v for k, v in fig.items() if isinstance(v, (int, float, str, bool)) or v is None})


def npnet_device(setup: Setup) -> Row:
    row = Row("npnet_device", "NPNet golden noise on CPU vs the device, canonical signs (max-abs; official "
              "device-dependent signs for contrast)", "README: same noise on CPU and GPU up to float rounding")
    from noisecraft.npnet import NPNetConfig, golden_noise, random_npnet
    from noisecraft.train.npnet import SMALL_NPNET

    config = NPNetConfig(latent_size=8, text_width=2048, **SMALL_NPNET) if setup.tiny else "sdxl"
    net = random_npnet(config, seed=0)
    size = net.config.latent_size
    noise = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(4))
    prompt = torch.randn(1, 77, 2048, generator=torch.Generator().manual_seed(5))
    out = {}
    for canonical in (True, False):
        with torch.no_grad():
            cpu = golden_noise(net, noise, prompt, canonical_signs=canonical)
            dev = golden_noise(net.to(setup.device), noise.to(setup.device), prompt.to(setup.device),
                               canonical_signs=canonical).cpu()
        net.to("cpu")
        out[canonical] = float((cpu - dev).abs().max())
        if canonical:
            change = float((cpu - noise).abs().max())
    note = "" if setup.device.type != "cpu" else " (no GPU here: CPU against itself)"
    return row.done(f"canonical {out[True]:.2e}, official signs {out[False]:.2e}; net's change {change:.2f}{note}",
                    max_abs_canonical=out[True], max_abs_official=out[False], change_max_abs=change,
                    device=str(setup.device))


# id, what it measures (the row says it in full when it runs), function
CORE_ROWS = [
    ("models/diffusers", "full-size diffusers UNets the core rows use (parameters, meta device)", diffusers_models),
    ("select_micro_batch", "stability.select time per candidate, micro-batch 8 vs 1", select_micro_batch),
    ("train_step/sd15", "one MSD training step on SD1.5: time and peak memory", lambda s: train_step(s, "sd15")),
    ("train_step/sdxl", "one MSD training step on SDXL: time and peak memory", lambda s: train_step(s, "sdxl")),
    ("npnet_device", "NPNet golden noise on CPU vs the device, canonical signs", npnet_device),
]
