"""Experiment trackers through accelerate's tracking API (TensorBoard, Weights & Biases).

As diffusers' training scripts report (``--report_to``; ``accelerator.init_trackers`` then ``log`` and the
tracker's images): :func:`make_trackers` builds accelerate's own tracker classes
(:class:`accelerate.tracking.TensorBoardTracker`, :class:`~accelerate.tracking.WandBTracker`), starts them
and stores the run's settings; the :class:`~noisecraft.train.validation.Validator` logs every step's
loss, learning rate and gradient norm and every validation's figures and grid to them. The trackers
are made directly rather than through ``Accelerator(log_with=...)``: the CLI's Accelerator exists before
the run folder is known, and one ComfyUI process trains many times with one accelerate state.

Files: TensorBoard writes ``<logging_dir>/<project>/<run_name>/`` (``tensorboard --logdir <logging_dir>``);
wandb its ``wandb/`` folder under ``<logging_dir>`` (``WANDB_MODE=offline`` keeps it local).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["REPORT_TO", "check_report_to", "make_trackers", "log_image", "flat_config"]

logger = logging.getLogger(__name__)

REPORT_TO = ("none", "tensorboard", "wandb", "all")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(_PACKAGES[name]) is not None


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict:
    """``config`` as one level of str/int/float/bool values (what TensorBoard's hparams take): nested dicts
    joined with '/', anything else as JSON text."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_config(v, key + "/"))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str)
    return out


def check_report_to(report_to: str) -> list[str]:
    """The tracker names of ``report_to``; refuses an unknown value or a tracker whose package is missing."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}: --report-to "
                         f"{' | '.join(REPORT_TO)}")
    if report_to == "none":
        return []
    names = [n for n in ("tensorboard", "wandb") if _installed(n)] if report_to == "all" else [report_to]
    for n in names:
        if not _installed(n):
            raise ImportError(f"--report-to {n} needs the {_PACKAGES[n]} package: pip install {_PACKAGES[n]} "
                              f"(or --report-to none)")
    return names


def make_trackers(report_to: str, logging_dir: str | os.PathLike, *, project: str = "noisecraft",
                  run_name: str = "", config: Mapping[str, Any] | None = None) -> list:
    """Started accelerate trackers for ``report_to`` (none | tensorboard | wandb | all; all = the installed
    ones of the two), with ``config`` stored as the run's settings. ``run_name``: default the time."""
    names = check_report_to(report_to)
    if not names:
        return []
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    run_name = run_name or time.strftime("run-%Y%m%d-%H%M%S")
    logging_dir = Path(logging_dir)
    logging_dir.mkdir(parents=True, exist_ok=True)
    trackers = []
    for n in names:
        if n == "tensorboard":
            t = TensorBoardTracker(run_name, logging_dir / project)
        else:
            t = WandBTracker(project, name=run_name, dir=str(logging_dir))
        t.start()
        if config:
            t.store_init_configuration(flat_config(config))
        trackers.append(t)
        logger.info("tracker %s: project %s, run %s (%s)", n, project, run_name, logging_dir)
    return trackers


def log_image(trackers: Sequence[Any], name: str, image, step: int) -> None:
    """One PIL image to every tracker (TensorBoard as an NHWC batch of one, wandb as a ``wandb.Image``)."""
    import numpy as np

    for t in trackers:
        if t.name == "tensorboard":
            t.log_images({name: np.asarray(image)[None]}, step=step, dataformats="NHWC")
        else:
            t.log_images({name: [image]}, step=step)
