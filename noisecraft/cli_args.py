"""The command line's argument types and shared pieces: output folders (checked, one writer each), progress
callbacks, the interrupted-run line, the prompt flags of train-refiner and collect-pairs, and the fetch
command's weights table and progress line.

Numeric flags are checked before any work: each type is an argparse ``type=`` that raises
``argparse.ArgumentTypeError`` with what is allowed and what was got (argparse prints
``argument --flag: <message>``). NaN and inf are always refused.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

class Refused(Exception):
    """A bad input found by the command line itself: the message is printed as is (one line), rc 2."""


# -- argument types --------------------------------------------------------------------------------


def int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1, "a whole number >= 1")
non_negative_int = int_at_least(0, "a whole number >= 0")
two_or_more_int = int_at_least(2, "a whole number >= 2")


def float_in(what: str, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
              high_open: bool = False):
    """A finite float in [low, high] (open ends where asked); NaN and inf are always refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r} (not a finite number)")
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


finite_float = float_in("a finite number")
positive_float = float_in("a finite number > 0", 0.0, low_open=True)
non_negative_float = float_in("a finite number >= 0", 0.0)
# keep-filter margin on probability scores (the toy classifier's confidence): score' > score + m keeps
# nothing for m >= 1 and everything for m <= -1
margin_float = float_in("a number in [-1, 1) (the filter's scores are probabilities)", -1.0, 1.0, high_open=True)


# -- the prompt flags (train-refiner, collect-pairs) ------------------------------------------------

# how noisecraft.prompts names its options in messages: the flags that set them
PROMPT_FLAGS = {"column": "--prompt-column", "format": "--prompts-format", "validation": "--prompt-validation"}


def add_prompt_args(group) -> None:
    """--prompts FILE and the flags that say how to read it (:mod:`noisecraft.prompts`)."""
    from .prompts import FORMATS

    group.add_argument("--prompts", metavar="FILE",
                       help="the prompts (with --model): .txt (one per line), .csv / .tsv (a column), .json / .jsonl "
                            "(strings or objects), .parquet (needs pyarrow); MS-COCO captions_*.json, Pick-a-Pic "
                            "exports and the Golden-Noise data files read as they are")
    group.add_argument("--prompts-format", choices=["auto", *FORMATS], default="auto",
                       help="read --prompts as this format (default auto: from the extension)")
    group.add_argument("--prompt-column", metavar="NAME",
                       help="the CSV / Parquet column or JSON key that holds the prompts (default: the first of "
                            "prompt, prompts, caption, captions, text; a one-column CSV: that column)")
    group.add_argument("--prompt-limit", type=non_negative_int, default=0, metavar="N",
                       help="train on at most N prompts (after the shuffle; default 0: all)")
    group.add_argument("--prompt-shuffle", type=non_negative_int, metavar="SEED",
                       help="shuffle the prompts with this seed (a torch.Generator; default: the file's order)")
    group.add_argument("--prompt-dedupe", action="store_true",
                       help="drop repeated prompts (exact match after trimming spaces; the first is kept)")
    group.add_argument("--prompt-validation", type=non_negative_int, default=0, metavar="N",
                       help="hold N prompts out of training (the split of noisecraft.prompts); train-refiner "
                            "--validate-every validates on them (default 0: none held out)")


def read_prompt_flags(args: argparse.Namespace) -> list[str]:
    """The training prompts of ``args.prompts`` read with the prompt flags (the held-out ones go to
    ``args.validation_prompts``); a bad file raises Refused (one line naming --prompts, the file, the line or
    record, and the fix)."""
    from .prompts import PromptFileError, read_prompts

    try:
        prompt_set = read_prompts(args.prompts, format=args.prompts_format, column=args.prompt_column,
                                  limit=args.prompt_limit, shuffle_seed=args.prompt_shuffle,
                                  dedupe=args.prompt_dedupe, option_names=PROMPT_FLAGS,
                                  validation=getattr(args, "prompt_validation", 0))
    except PromptFileError as exc:
        raise Refused(f"--prompts {exc}") from None
    args.validation_prompts = prompt_set.validation  # the held-out prompts (--prompt-validation)
    return prompt_set.train


# -- fetch: the --list table and the progress line ----------------------------------------------


def _size_text(entry) -> str:
    if entry.size is not None:
        n = entry.size
        return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"
    return f"~{entry.size_approx}" if entry.size_approx else "?"


def _how_to_get(entry) -> str:
    if entry.url:
        return "fetch"
    return "in package" if entry.path else "by hand"


def format_weights_table(entries) -> str:
    header = ("name", "base model", "size", "folder", "sha256", "get")
    rows = [(e.name, e.base_model, _size_text(e), e.folder, "known" if e.sha256 else "-", _how_to_get(e))
            for e in entries]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    out = [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    out.append("")
    out.append("sha256 '-': none published: the download cannot be verified by hash; fetch checks the size where "
               "known and the file format instead (and refuses HTML/text). 'by hand': no direct URL, see `page` in "
               "the manifest.")
    return "\n".join(out)


class ProgressLine:
    """Progress on stderr, at most ~4 updates a second, only when stderr is a terminal."""

    def __init__(self, label: str):
        self.label, self.last, self.enabled = label, 0.0, sys.stderr.isatty()

    def __call__(self, done: int, total) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.25 and done != total):
            return
        self.last = now
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        tot = f" / {total / 1e6:.1f}" if total else ""
        sys.stderr.write(f"\r{self.label}: {done / 1e6:.1f}{tot} MB{pct}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.last:
            sys.stderr.write("\n")


# -- output folders and progress (the training commands) -------------------------------------------


def check_out(path, flag: str = "--out") -> Path:
    """An output folder that can be used (checked, not created); raises Refused naming the flag."""
    from .io import ensure_dir

    try:
        return ensure_dir(path, flag, create=False)
    except ValueError as exc:
        raise Refused(str(exc)) from None


def one_writer(folder: Path, flag: str, acc=None):
    """The one-writer lock of an output folder for the whole command (the main process's, under accelerate
    launch): a second run on it is refused at once, naming the run that holds it."""
    import contextlib

    from .locks import folder_lock

    if acc is not None and not acc.is_main_process:
        return contextlib.nullcontext()
    return folder_lock(folder, what=flag, fix=f"wait for that run to finish or stop it, or choose another {flag}")


def every_5s(log: logging.Logger, message: str):
    """A ``progress(done, total)`` callback that logs ``message % (done, total)`` at most every 5 s and at the end."""
    last = [0.0]

    def progress(done, total):
        if time.perf_counter() - last[0] > 5 or done == total:
            last[0] = time.perf_counter()
            log.info(message, done, total)

    return progress


def every_10_steps(log: logging.Logger, message: str, key: str):
    """A trainer's ``progress(step, total, rec)`` callback: every 10th and the last step, logs ``message`` with
    the step, total, ``rec["loss"]``, ``rec[key]`` and ``rec["wall_s"]``."""

    def progress(step, total, rec):
        if step % 10 == 0 or step == total:
            log.info(message, step, total, rec["loss"], rec[key], rec["wall_s"])

    return progress


def interrupted_resume(command: str, out: Path) -> int:
    sys.stderr.write(f"noisecraft {command}: interrupted; run the same command with --resume to continue "
                     f"from the last checkpoint in {out}\n")
    return 130
