"""Load Prompts: a prompt set from a file, as an ``NC_PROMPTS`` for the training nodes.

The reading is the core's (:func:`noisecraft.prompts.read_prompts`), the one the CLI's ``--prompts`` uses:
txt, CSV/TSV, JSON/JSONL, Parquet (with pyarrow), MS-COCO caption files, Pick-a-Pic exports and the official
Golden-Noise data files; limit, seeded shuffle, dedupe and a held-out validation split. This node finds the
file and checks its inputs; a bad file is refused in one line (the node, the file, the line or record, the fix).

Choices where the issue was silent:

* Files: the ``file`` combo lists the files with a prompt-file extension in ComfyUI's input folder and its
  subfolders (relative paths, hidden folders skipped); a combo value must stay inside the input folder.
  ``path``, when not empty, replaces the combo: an absolute path, or one relative to the input folder. The
  combo is optional, so that ``path`` alone works when the input folder holds no prompt file.
* ``validation`` is a FLOAT: below 1 it is a fraction of the prompts, from 1 up a whole count.
* The node runs again when the file changes on disk (its fingerprint is the file's path, mtime and size with
  the options), not only when an input changes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from comfy_api.latest import io

import folder_paths

from ..noisecraft.prompts import EXTENSIONS, FORMATS, PromptSet, read_prompts
from .common import FileCache, SEED_MASK, check_combo, check_int, check_number

CATEGORY = "noisecraft/train"
LOAD_NAME = "Load Prompts"
FORMAT_OPTIONS = ["auto", *FORMATS]
MAX_LIMIT = 1_000_000_000
# how the core names the options in its messages: this node's inputs
OPTION_NAMES = {"column": "the column input", "format": "the format input", "validation": "validation"}

PromptsType = io.Custom("NC_PROMPTS")


class NodePrompts:
    """What travels on an NC_PROMPTS socket: the core's :class:`~noisecraft.prompts.PromptSet` (``train``,
    ``validation``, ``source``, ``record``)."""

    def __init__(self, prompt_set: PromptSet):
        self.prompt_set = prompt_set

    @property
    def train(self) -> list[str]:
        return self.prompt_set.train

    @property
    def validation(self) -> list[str]:
        return self.prompt_set.validation

    @property
    def record(self) -> dict:
        return self.prompt_set.record

    def __len__(self) -> int:
        return len(self.prompt_set.train)

    def __repr__(self) -> str:
        return f"NodePrompts({self.prompt_set.describe()})"


def prompt_files() -> list[str]:
    """The files with a prompt-file extension in ComfyUI's input folder and its subfolders, as sorted
    '/'-separated paths relative to it."""
    root = folder_paths.get_input_directory()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        for name in files:
            if Path(name).suffix.lower() in EXTENSIONS and not name.startswith("."):
                found.append(name if rel == "." else f"{Path(rel).as_posix()}/{name}")
    return sorted(found)


def resolve_prompt_file(file, path: str = "") -> Path:
    """The file to read: ``path`` when not empty (absolute, or relative to the input folder), else the
    combo's ``file`` inside the input folder."""
    root = Path(folder_paths.get_input_directory())
    if not isinstance(path, str) or not isinstance(file, (str, type(None))):
        raise ValueError(f"{LOAD_NAME}: file and path must be text, got {type(file).__name__} and "
                         f"{type(path).__name__}")
    if path.strip():
        return root / path.strip() if not Path(path.strip()).is_absolute() else Path(path.strip())
    if not file:
        raise ValueError(f"{LOAD_NAME}: no prompt file chosen: put one ({', '.join(EXTENSIONS)}) in ComfyUI's input "
                         f"folder ({root}) and refresh the node, or give its path in the path input")
    chosen = root / file
    if not chosen.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{LOAD_NAME}: file {file!r} is not inside ComfyUI's input folder ({root}): choose a file "
                         f"from the list, or give the path in the path input")
    return chosen


def _options(column, limit, shuffle_seed, dedupe, validation, format) -> dict:
    """The node's inputs as read_prompts keywords, each checked (one line naming the input)."""
    if not isinstance(column, str):
        raise ValueError(f"{LOAD_NAME}: column must be text (empty = automatic), got {type(column).__name__}")
    limit = check_int(LOAD_NAME, "limit", limit, 0, MAX_LIMIT, "0 = every prompt")
    seed = check_int(LOAD_NAME, "shuffle_seed", shuffle_seed, -1, SEED_MASK, "-1 = the file's order")
    if not isinstance(dedupe, bool):
        raise ValueError(f"{LOAD_NAME}: dedupe must be true or false, got {dedupe!r}")
    v = check_number(LOAD_NAME, "validation", validation, 0.0, float(MAX_LIMIT),
                     "0 = none, below 1 a fraction of the prompts, from 1 a whole count")
    if v >= 1 and v != math.floor(v):
        raise ValueError(f"{LOAD_NAME}: validation {v:g} is neither a fraction below 1 nor a whole count: give e.g. "
                         f"{math.floor(v)} prompts, or 0.05 for 5%")
    check_combo(LOAD_NAME, "format", format, FORMAT_OPTIONS)
    return {"column": column.strip() or None, "limit": limit, "shuffle_seed": None if seed < 0 else seed,
            "dedupe": dedupe, "validation": int(v) if v == 0 or v >= 1 else v, "format": format}


def load_prompts(file, path: str = "", column: str = "", limit: int = 0, shuffle_seed: int = -1,
                 dedupe: bool = False, validation: float = 0.0, format: str = "auto") -> NodePrompts:
    """Load Prompts' work: the checked inputs through :func:`noisecraft.prompts.read_prompts`."""
    options = _options(column, limit, shuffle_seed, dedupe, validation, format)
    target = resolve_prompt_file(file, path)
    try:
        return NodePrompts(read_prompts(target, option_names=OPTION_NAMES, **options))
    except ValueError as exc:  # PromptFileError and bad options alike: one line naming the node
        raise ValueError(f"{LOAD_NAME}: {exc}") from None


class LoadPrompts(io.ComfyNode):
    """A prompt file -> NC_PROMPTS (training prompts + held-out validation prompts) and the prompt count."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_LoadPrompts",
            display_name=LOAD_NAME,
            category=CATEGORY,
            description="Reads training prompts from a file: .txt (one per line), .csv / .tsv (a column), .json / "
            ".jsonl (strings or objects), .parquet (needs pyarrow); MS-COCO captions_*.json, Pick-a-Pic exports and "
            "the Golden-Noise data files read as they are. Optionally limits, shuffles (seeded), dedupes and holds "
            "out validation prompts. The same reader as the command line's --prompts.",
            inputs=[
                io.Combo.Input("file", options=prompt_files(), optional=True,  # optional: path may stand alone
                               tooltip="A prompt file in ComfyUI's input folder (subfolders too); refresh after "
                               "adding one. Ignored when path is set."),
                io.String.Input("path", default="", optional=True,
                                tooltip="A prompt file anywhere: an absolute path, or one relative to the input "
                                "folder. Empty (default) turns it off: the file input is used."),
                io.String.Input("column", default="",
                                tooltip="The CSV / Parquet column or JSON key holding the prompts. Empty (default): "
                                "automatic, the first of prompt, prompts, caption, captions, text (a one-column "
                                "CSV: that column). Not used for .txt files."),
                io.Int.Input("limit", default=0, min=0, max=MAX_LIMIT,
                             tooltip="At most this many training prompts (taken after the shuffle). 0 (default) "
                             "turns it off: every prompt."),
                io.Int.Input("shuffle_seed", default=-1, min=-1, max=SEED_MASK,
                             tooltip="Shuffles the training prompts with this seed (its own generator; the same "
                             "seed gives the same order). -1 (default) turns it off: the file's order."),
                io.Boolean.Input("dedupe", default=False,
                                 tooltip="Drops repeated prompts (exact match after trimming spaces; the first is "
                                 "kept). Off (default) keeps every copy."),
                io.Float.Input("validation", default=0.0, min=0.0, max=float(MAX_LIMIT), step=0.01,
                               tooltip="Holds prompts out of training for validation: below 1 a fraction (0.05 = "
                               "5%), from 1 a whole count. The same seed always holds out the same prompts, whatever "
                               "the limit. 0 (default) turns it off."),
                io.Combo.Input("format", options=FORMAT_OPTIONS, default="auto", optional=True,
                               tooltip="Read the file as this format. auto (default) turns the override off: the "
                               "format comes from the file's extension."),
            ],
            outputs=[
                PromptsType.Output(display_name="prompts",
                                   tooltip="The training prompts and the held-out validation prompts, with a record "
                                   "of the file and options they came from."),
                io.Int.Output(display_name="count", tooltip="How many training prompts (validation ones not counted)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, file=None, path="", column="", limit=0, shuffle_seed=-1, dedupe=False, validation=0.0,
                           format="auto"):
        # re-run when the file changes on disk, not only when the inputs change
        try:
            return FileCache.key(resolve_prompt_file(file, path), column, limit, shuffle_seed, dedupe, validation,
                                 format)
        except (OSError, ValueError):
            return float("nan")  # never equal: the node runs (and says what is wrong)

    @classmethod
    def execute(cls, file=None, path="", column="", limit=0, shuffle_seed=-1, dedupe=False, validation=0.0,
                format="auto") -> io.NodeOutput:
        prompts = load_prompts(file, path, column, limit, shuffle_seed, dedupe, validation, format)
        return io.NodeOutput(prompts, len(prompts), ui={"text": [prompts.prompt_set.describe()]})  # the core logs it


NODES = [LoadPrompts]

