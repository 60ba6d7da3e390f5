"""train-refiner's teacher filter flags (``--keep``, ``--scorer``): the top samples of the teacher cache by a
scorer (:mod:`noisecraft.train.teacher_filter`), checked before any work; split from :mod:`noisecraft.cli_train`
to keep each file of the command line short."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .cli_args import Refused, every_5s

__all__ = ["keep_value", "teacher_scorer", "filter_teacher"]


def keep_value(text: str):
    """--keep: a whole number of samples (>= 1) or a fraction in (0, 1] (written with a point: 0.5, 1.0)."""
    try:
        value = int(text, 10)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = None
    ok = value is not None and (value >= 1 if isinstance(value, int) else 0.0 < value <= 1.0)
    if not ok:
        raise argparse.ArgumentTypeError(f"expected a whole number of samples >= 1 or a fraction in (0, 1], "
                                         f"got {text!r}")
    return value


def teacher_scorer(args: argparse.Namespace):
    """train-refiner's teacher filter (--keep, --scorer), checked before any work: the scorer, or None."""
    from .hosts.toy import toy_confidence_scorer
    from .train.teacher_filter import register_scorer, resolve_scorer

    register_scorer("toy-classifier", toy_confidence_scorer,
                    "the toy digit classifier's probability of the target digit (toy model only)")
    if args.keep is None:
        if args.scorer and not args.validate_every:  # (--validate-every: --scorer scores the validation)
            raise Refused(f"--scorer {args.scorer} ranks the teacher samples for --keep: give --keep N (or a fraction) "
                          "with it, or leave --scorer out to train on every sample")
        return None
    if isinstance(args.keep, int) and args.keep > args.samples:
        raise Refused(f"--keep {args.keep} is more than the teacher cache's --samples {args.samples}: keep at most "
                      f"{args.samples}, or raise --samples")
    name = args.scorer or ("toy-classifier" if args.toy else None)
    if name is None:
        raise Refused("--keep needs --scorer with --model: aesthetic (the paper's), sharpness, colorfulness (generic) "
                      "or your own package.module:function; see README")
    if name == "toy-classifier" and not args.toy:
        raise Refused("--scorer toy-classifier scores toy digits: use it with --toy, or choose another scorer")
    return resolve_scorer(name)


def filter_teacher(args: argparse.Namespace, cache, scorer, device: str, acc, log: logging.Logger):
    """The top --keep samples of ``cache`` by ``scorer`` (decoded by the --model folder's vae/ when it has one):
    a view of the same folder. The main process scores and saves the scores; the others reuse them."""
    from .train.teacher_filter import diffusers_vae_decoder, filter_teacher_cache

    if scorer is None:
        return cache
    decode, decode_name = None, "none (latents)"
    if args.model and not args.toy:
        decode = diffusers_vae_decoder(args.model, device=device, config=args.config)
        if decode is None:
            log.info("teacher filter: %s has no vae/ folder: the scorer gets the latents", args.model)
        else:
            decode_name = f"vae ({Path(args.model).name}{'' if Path(args.model).is_file() else '/vae'})"
    progress = every_5s(log, "teacher filter: scored %d / %d samples")

    def run():
        return filter_teacher_cache(cache, scorer, args.keep, decode=decode, decode_name=decode_name,
                                    batch_size=args.batch, progress=progress)

    if acc.num_processes > 1:  # the main process writes the scores file; the others read it after the barrier
        view = run() if acc.is_main_process else None
        acc.wait_for_everyone()
        view = view if view is not None else run()
    else:
        view = run()
    return view
