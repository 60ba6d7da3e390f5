"""The paper's training recipes as presets of ``train-refiner`` (``--preset paper-sd21 | paper-sdxl``).

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895; the full text is in the
project's shared papers folder): App. D.1 (architecture), App. D.2.1 (training data and guidance), App. A
(training cost: M, E, N', N). Every value carries its source; a value the paper does not state is ours and
carries the reason. A flag given on the command line always wins over the preset (:func:`apply_preset`).

Flow models (SD3-class, Flux-class): the paper trained SiT-XL/2 (a class-conditional flow model, CFG 4, Euler
20 steps, no filter: App. D.2.1) but no text-to-image flow model, so there is no flow preset: start from
``paper-sdxl``'s rank and steps, the teacher at the model's usual CFG, and watch the held-out validation.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from .solvers import CHEAPEST_TEACHER

__all__ = ["Setting", "PRESETS", "PRESET_FLAGS", "add_preset_arg", "apply_preset", "describe_preset"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """One preset value: the flag's destination, the value and where it comes from (``paper`` True: a
    section of the paper; False: ours, ``source`` saying why)."""

    dest: str
    value: Any
    source: str
    paper: bool = True


# The teacher: the paper's is DDIM (= Euler in sigma space) with N' = 20 steps on the model's schedule (App. D.1).
# Ours is the cheapest teacher measured to keep the refiner within 2 points of that one (noisecraft.solvers.
# CHEAPEST_TEACHER, benchmarks/bench_teacher.py): half the teacher passes. Give --teacher-sampler euler
# --teacher-steps 20 --scheduler normal for the paper's own.
_TEACHER, _T_STEPS, _T_SCHEDULE = CHEAPEST_TEACHER
_WHY = ("ours: the paper's teacher is DDIM with N' = 20 steps (App. D.1); DPM-Solver++(2M) with 10 steps on karras "
        "kept the toy refiner within 0.3 points of it at half the passes (benchmarks/bench_teacher.py, README "
        "'Teacher sampler'); --teacher-sampler euler --teacher-steps 20 --scheduler normal gives the paper's")
_SHARED = (
    Setting("teacher_sampler", _TEACHER, _WHY, paper=False),
    Setting("teacher_steps", _T_STEPS, _WHY, paper=False),
    Setting("student_steps", 10, "App. D.1: the default denoising step N is set to 10"),
    Setting("cfg", 7.0, "App. D.2.1: CFG scale 7.0 for all generated images"),
    Setting("pag_scale", 3.0, "App. D.2.1: PAG scale 3.0 (SDXL: 'the same CFG and PAG scales as for SD 2.1')"),
    Setting("scheduler", _T_SCHEDULE, "ours: the teacher's schedule, which the student shares (the paper: DDIM's "
                                      "uniform timesteps from T = 999, App. D.1); a karras student held too "
                                      "(+0.1 points, benchmarks/bench_teacher.py --student-scheduler karras)",
            paper=False),
    Setting("lr", 1e-4, "ours: the paper states no learning rate; 1e-4 is the usual LoRA rate of diffusers' "
                        "training scripts", paper=False),
    Setting("lr_schedule", "constant", "ours: no schedule is stated", paper=False),
    Setting("warmup", 100, "ours: a short warmup keeps the first AdamW steps of a rank-128/256 LoRA small",
            paper=False),
    Setting("validate_every", 500, "ours: held-out validation (noisecraft.train.validation) every 500 steps",
            paper=False),
    Setting("prompt_validation", 16, "ours: 16 prompts of --prompts held out for the validation (the paper evaluates "
                                     "on prompts disjoint from training, Sec. 4.1)", paper=False),
)

PRESETS: dict[str, tuple[Setting, ...]] = {
    "paper-sd21": _SHARED + (
        Setting("rank", 128, "App. D.1: LoRA rank of 128 on all attention, convolutional and feed-forward layers"),
        Setting("samples", 50_000, "App. D.2.1 / App. A: 20K MS COCO + 30K Pick-a-Pic prompts, M = 50K samples"),
        Setting("batch", 8, "ours: the batch is not stated; 8 fits SD2.1 at rank 128 on a 24 GB card (the paper "
                            "used RTX 3090s)", paper=False),
        Setting("steps", 37_500, "ours: App. A's E = 6 epochs of M = 50K at our batch 8 (6 x 50,000 / 8)",
                paper=False),
    ),
    "paper-sdxl": _SHARED + (
        Setting("rank", 256, "App. D.1: SDXL uses SD2.1's configs except the LoRA rank, 256"),
        Setting("samples", 181_000, "App. D.2.1: 55K MS COCO + 36K Pick-a-Pic + 90K LAION prompts"),
        Setting("batch", 2, "ours: not stated; 2 fits SDXL at rank 256 in 24 GB with bf16 and gradient "
                            "checkpointing (README, GPU report)", paper=False),
        Setting("grad_accum", 4, "ours: 4 micro-batches of 2 give the SD2.1 preset's 8 samples per step",
                paper=False),
        Setting("steps", 135_750, "ours: App. A's 6 epochs (stated for SD2.1) of 181K at 8 samples per step",
                paper=False),
        Setting("precision", "bf16", "ours: bf16 autocast for 24 GB", paper=False),
        Setting("weights_dtype", "bf16", "ours: the frozen SDXL UNet in bf16 for 24 GB", paper=False),
        Setting("gradient_checkpointing", True, "ours: the LoRA pass checkpointed for 24 GB", paper=False),
    ),
}

# every flag a preset may fill: its default when neither the preset nor the command line gives it
PRESET_FLAGS = sorted({s.dest for settings in PRESETS.values() for s in settings})


def add_preset_arg(parser: argparse.ArgumentParser) -> None:
    """``--preset``; the flags a preset fills get the default None, so :func:`apply_preset` can tell a given flag
    (which wins) from a default (which the preset replaces); their own defaults are kept for it."""
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="the paper's recipe (arXiv:2412.03895, App. D): paper-sd21 (LoRA rank 128) or paper-sdxl "
                             "(rank 256), CFG 7 + PAG 3, 10 student steps; values the paper does not state (lr, "
                             "batch, steps) are ours, and so is the teacher (dpmpp_2m, 10 steps, karras: within 0.3 "
                             "points of the paper's Euler-20 at half the passes, README 'Teacher sampler'); each is logged with its source at the start; a flag "
                             "you give wins. Flow models: no preset (the paper trained none); see noisecraft/presets.py")
    own = {d: parser.get_default(d) for d in PRESET_FLAGS}
    parser.set_defaults(_preset_defaults=own, **{d: None for d in PRESET_FLAGS})


def apply_preset(args: argparse.Namespace, log_to: logging.Logger = log) -> list[str]:
    """Fill ``args``: a flag given on the command line stays, else the preset's value, else the flag's own
    default. Logs each preset value with its source (or that a given flag won); returns those lines."""
    own: Mapping[str, Any] = getattr(args, "_preset_defaults", {})
    lines = []
    settings = {s.dest: s for s in PRESETS.get(getattr(args, "preset", None) or "", ())}
    if settings:
        lines.append(f"--preset {args.preset} (A Noise is Worth Diffusion Guidance, arXiv:2412.03895):")
    for dest in PRESET_FLAGS:
        given = getattr(args, dest, None)
        s = settings.get(dest)
        if given is not None:
            if s is not None:
                lines.append(f"  {_flag(dest)} {given}: given on the command line (the preset's {s.value} not used)")
            continue
        if s is None:
            setattr(args, dest, own.get(dest))
            continue
        setattr(args, dest, s.value)
        lines.append(f"  {_flag(dest)} {s.value}: {'paper, ' if s.paper else ''}{s.source}")
    if settings:
        lines.append("  teacher filter: the paper keeps the top N by the LAION aesthetic score (App. D.2.1): give "
                     "--keep N --scorer aesthetic to filter (its weights in $NOISECRAFT_AESTHETIC; see README)")
    for line in lines:
        log_to.info("%s", line)
    return lines


def describe_preset(name: str) -> list[tuple[str, Any, str]]:
    """``(flag, value, source)`` of every value of preset ``name`` (a source starting "ours:" is not the paper's)."""
    return [(_flag(s.dest), s.value, s.source) for s in PRESETS[name]]


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")
