"""``train-refiner``'s held-out validation, trackers and presets: flags and set-up (:mod:`noisecraft.cli_train`
calls :func:`add_validation_args`, :func:`check_preset` and :func:`validation_for`).

Held-out set: ``--toy``: the 10 class labels x ``--validation-seeds`` seeds from ``--validation-seed-base``
(far above the teacher cache's ``--seed-base`` range; an overlap is refused); ``--model``: the prompts held
out of training by ``--prompt-validation N`` (:mod:`noisecraft.prompts`' validation split), encoded once at
the start with the folder's text encoders, x ``--validation-seeds`` seeds. The teacher is train-refiner's
(CFG, or CFG + PAG); images are decoded with the folder's ``vae/`` (the toy's latents are shown as they are);
``--scorer`` (toy: the digit classifier) scores the three columns. See :mod:`noisecraft.train.validation`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from .cli_args import Refused, non_negative_int, positive_int

__all__ = ["add_validation_args", "check_preset", "validation_for", "encoded_host", "validation_line"]


def add_validation_args(tr: argparse.ArgumentParser) -> None:
    """The validation, tracker and preset flags of train-refiner (added after its other flags)."""
    from .presets import add_preset_arg
    from .train.trackers import REPORT_TO
    from .train.validation import VALIDATION_SEED_BASE

    g = tr.add_argument_group("validation and trackers")
    g.add_argument("--validate-every", type=non_negative_int, default=0, metavar="N",
                   help="held-out validation at step 0, every N steps and the last step: unguided | refined | teacher "
                        "from the same noise, the share of the latent-MSE gap closed, --scorer means, a grid in "
                        "<out>/validation/, refiner_best.safetensors (default 0: off)")
    g.add_argument("--validation-seeds", type=positive_int, metavar="K",
                   help="seeds per held-out prompt (default 10 with --toy: 100 samples; 2 with --model)")
    g.add_argument("--validation-seed-base", type=non_negative_int, default=VALIDATION_SEED_BASE, metavar="SEED",
                   help=f"first held-out seed; must lie outside the teacher cache's seeds (default {VALIDATION_SEED_BASE})")
    g.add_argument("--report-to", choices=list(REPORT_TO), default="none",
                   help="trackers through accelerate: loss, lr, gradient norm, validation figures and grids "
                        "(default none; all = every installed one; files under <out>/logs)")
    g.add_argument("--tracker-project", default="noisecraft", help="tracker project name (default noisecraft)")
    g.add_argument("--run-name", default="", help="tracker run name (default: the start time)")
    add_preset_arg(tr)


def check_preset(args: argparse.Namespace, log: logging.Logger) -> None:
    """Before any work: fill the flags of --preset (a given flag wins; each value logged with its source; --toy
    has none), then check the validation and tracker flags."""
    from .presets import apply_preset
    from .train.trackers import check_report_to
    from .train.validation import check_held_out, held_out_seeds

    if getattr(args, "preset", None) and args.toy:
        raise Refused(f"--preset {args.preset} is the paper's SD2.1 / SDXL recipe: leave it out with --toy, or give "
                      "--model DIR")
    apply_preset(args, log)
    try:
        check_report_to(args.report_to)
    except (ValueError, ImportError) as exc:
        raise Refused(str(exc)) from None
    if not args.validate_every:
        return
    if args.guidance_range is not None:
        raise Refused("--validate-every: validation of a guidance-conditioned refiner (--guidance-range) is not "
                      "supported yet: leave --validate-every out with --guidance-range")
    if not args.toy and args.prompt_embeds:
        raise Refused("--validate-every with --prompt-embeds: the held-out prompts need the model's text encoders; "
                      "leave --prompt-embeds out, or give --validate-every 0")
    if not args.toy and not args.prompt_validation:
        raise Refused("--validate-every with --model validates on held-out prompts: give --prompt-validation N (N "
                      "prompts of --prompts kept out of training)")
    _, seeds = held_out_seeds(10 if args.toy else args.prompt_validation, _seeds_per_prompt(args),
                              args.validation_seed_base)
    try:
        check_held_out(seeds, args.seed_base, args.samples)
    except ValueError as exc:
        raise Refused(f"--validation-seed-base {args.validation_seed_base}: {exc}") from None


def _seeds_per_prompt(args: argparse.Namespace) -> int:
    return args.validation_seeds or (10 if args.toy else 2)


def encoded_host(host, texts: list[str], keep_uncond: bool = False):
    """A copy of ``host`` whose conditions are ``texts``, encoded now with its text encoders (``host.encoder``);
    ``keep_uncond``: with the host's own unconditional rows (a ComfyUI cache's negative prompt,
    :mod:`noisecraft.cli_cache`) instead of the encoder's."""
    from .hosts.diffusers import _module_device_dtype

    if getattr(host, "encoder", None) is None:
        raise Refused("--prompt-validation needs the model's text encoders to encode the held-out prompts: leave "
                      "--prompt-embeds out, or --prompt-validation 0")
    device, dtype = _module_device_dtype(host.unet)
    rows, unc = host.encoder(texts)
    rows = {k: v.to(device=device, dtype=dtype) for k, v in rows.items()}
    unc = {k: v.to(device=device, dtype=dtype) for k, v in unc.items()}
    cond, uncond = rows.pop("cond"), unc.pop("cond")
    if keep_uncond:
        uncond, unc = host.uncond, dict(host.uncond_added or {})
    return dataclasses.replace(host, conds=cond, uncond=uncond, added=rows or None, uncond_added=unc or None,
                               cond_labels=list(texts), encoder=None)


def validation_for(args: argparse.Namespace, host, teacher_for, shape, out: Path, device: str, acc,
                   log: logging.Logger):
    """train-refiner's :class:`~noisecraft.train.validation.Validator` (main process; None when neither
    --validate-every nor --report-to asks for one). ``teacher_for(host)``: the guided teacher over ``host``."""
    import torch

    from .sigmas import get_sigmas
    from .train.teacher_filter import diffusers_vae_decoder, resolve_scorer
    from .train.trackers import make_trackers
    from .train.validation import ValidationSet, Validator, check_held_out, held_out_seeds

    if not acc.is_main_process or (not args.validate_every and args.report_to == "none"):
        return None
    vset = None
    if args.validate_every:  # (the flags were checked by check_preset before any work)
        if args.toy:
            vhost, texts = host, [f"digit {i}" for i in range(host.conds.shape[0])]
        else:
            texts = list(getattr(args, "validation_prompts", None) or [])
            vhost = encoded_host(host, texts, keep_uncond=getattr(args, "_comfy_cache", False))
        idx, seeds = held_out_seeds(len(texts), _seeds_per_prompt(args), args.validation_seed_base)
        check_held_out(seeds, args.seed_base, args.samples)
        decode = None if args.toy else diffusers_vae_decoder(args.model, device=device, config=args.config)
        name = args.scorer or ("toy-classifier" if args.toy else None)
        vset = ValidationSet(vhost.denoiser, teacher_for(vhost), torch.tensor(idx), seeds, tuple(shape),
                             get_sigmas(host.table, args.scheduler, args.teacher_steps), names=[texts[i] for i in idx],
                             teacher_passes=3 if args.pag_scale else 2, decode=decode,
                             scorer=resolve_scorer(name) if name else None, batch_size=min(args.batch, 32))
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("func", "validation_prompts")}
    try:
        trackers = make_trackers(args.report_to, out / "logs", project=args.tracker_project, run_name=args.run_name,
                                 config=config)
    except ImportError as exc:
        raise Refused(str(exc)) from None
    return Validator(vset, every=args.validate_every, trackers=trackers)


def validation_line(validation, out: Path) -> str:
    """train-refiner's last output line about the validation ('' without one)."""
    summary = validation.summary() if validation is not None else None
    if not summary:
        return ""
    last, best = summary["last"], summary["best"]
    return (f"(held-out validation: {100 * last['gap_closed']:.1f}% of the latent-MSE gap closed at step {last['step']}, "
            f"best {100 * best['gap_closed']:.1f}% at step {best['step']}: {out / 'refiner_best.safetensors'}; grids "
            f"in {out / 'validation'}, figures in {out / 'validation.jsonl'})\n")
