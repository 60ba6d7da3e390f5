"""Command line.

``python -m noisecraft demo [--out DIR]``: every method on the shipped toy model.
``python -m noisecraft fetch NAME [--dest DIR] [--comfyui DIR] [--url URL] [--allow-http]``: download a
weight file from the manifest (verified before it gets its name; https only) into the right ComfyUI folder.
``python -m noisecraft fetch --list``: the known weight files.
``python -m noisecraft convert SRC DST [--preset P]``: an NPNet .pth as safetensors with metadata.
``python -m noisecraft train-refiner (--toy | --model DIR --prompts FILE) [--out DIR] [--resume] ...``:
train a NoiseRefine refiner LoRA with MSD (teacher cache first, then the trainer).
``python -m noisecraft collect-pairs (--toy | --model DIR --prompts FILE) [--out DIR] ...``: NPNet
training pairs by re-denoise sampling (safetensors shards, resumable), optionally filtered.
``python -m noisecraft train-npnet --pairs DIR [--out DIR] [--resume] ...``: train an NPNet on them.
``python -m noisecraft run-graph WORKFLOW.json [--comfyui DIR | --server URL] [--set NODE.INPUT=VALUE ...]``: run a
ComfyUI workflow without a browser (see :mod:`noisecraft.run_graph`).
Under ``accelerate launch`` (several processes, GPUs or machines) train-refiner and train-npnet run data
parallel on accelerate's ``Accelerator``; see :mod:`noisecraft.train.loop` for the launch commands.

Failures print one line, ``noisecraft <command>: <message>``, on stderr and no traceback: return code
2 for bad input (flags are checked before any work), 1 for a failure while running, 130 for Ctrl-C.
Set ``NOISECRAFT_DEBUG=1`` to get the full traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .cli_args import ProgressLine, Refused, check_out, format_weights_table, non_negative_int, positive_float
from .cli_train import add_train_commands
from .run_graph import add_run_graph_command


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``noisecraft <command>: <message> (see --help)``, rc 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_gap, format_table, gap_summary, run_demo

    check_out(args.out)
    config = DemoConfig()
    if args.quick:
        config = DemoConfig(per_class=1, candidates=2, paper_steps=3, fixed_point_steps=3, score_steps=4)
    t0 = time.perf_counter()
    rows = run_demo(Path(args.out), config)
    total = time.perf_counter() - t0
    sys.stdout.write(format_table(rows) + "\n")
    sys.stdout.write(format_gap(gap_summary(rows)) + "\n")
    sys.stdout.write(f"\nwrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'samples.png'} "
                     f"({total:.1f} s in all)\n")
    return 0


# -- fetch -----------------------------------------------------------------------------------------


def _fetch(args: argparse.Namespace) -> int:
    from .weights import DownloadError, download, load_manifest, resolve_models_dir

    entries = load_manifest()
    if args.list:
        sys.stdout.write(format_weights_table(entries) + "\n")
        return 0
    if not args.name:
        sys.stderr.write("noisecraft fetch: expected a NAME (or --list); known names: "
                         + ", ".join(e.name for e in entries if e.url) + "\n")
        return 2
    by_name = {e.name: e for e in entries}
    entry = by_name.get(args.name)
    if entry is None:
        sys.stderr.write(f"noisecraft fetch: no weight file named {args.name!r} in the manifest. Known names:\n"
                         + "".join(f"  {e.name}\n" for e in entries)
                         + "(`python -m noisecraft fetch --list` shows them with their base models)\n")
        return 2
    if entry.path and not args.url:
        sys.stdout.write(f"{entry.name} ships inside the noisecraft package ({entry.local_path}); "
                         f"nothing to download\n")
        return 0
    if not entry.url and not args.url:
        sys.stderr.write(f"noisecraft fetch: {entry.name} has no direct download URL (see {entry.page}); get it by "
                         f"hand and put it in <ComfyUI>/models/{entry.folder}, or give --url URL\n")
        return 2
    try:
        dest = resolve_models_dir(entry, args.comfyui, dest=args.dest)
    except ValueError as err:
        sys.stderr.write(f"noisecraft fetch: {err}\n")
        return 2
    for noisy in ("httpx2", "httpx"):  # huggingface_hub's client logs every request at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    bar = ProgressLine(entry.file_name or entry.name)
    try:
        path = download(entry, dest, url=args.url, timeout=args.timeout, retries=args.retries, progress=bar,
                        allow_http=args.allow_http)
    except KeyboardInterrupt:
        bar.close()
        sys.stderr.write(f"noisecraft fetch: interrupted; nothing got its final name in {dest}. Run the same "
                         f"command again (a plain-URL download resumes its .part; a Hugging Face one starts over)\n")
        return 130
    except (DownloadError, ValueError, OSError) as err:
        bar.close()
        sys.stderr.write(f"noisecraft fetch: {err}\n")
        return 1
    bar.close()
    sys.stdout.write(f"{path}\n")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .npnet import convert_pth_to_safetensors

    try:
        out = convert_pth_to_safetensors(args.src, args.dst, preset=args.preset, overwrite=args.overwrite)
    except FileExistsError:
        sys.stderr.write(f"noisecraft convert: {args.dst} exists: give a new file name, or add --overwrite to "
                         "replace it\n")
        return 2
    sys.stdout.write(f"{out}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="noisecraft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every method on the shipped toy model and print the results table")
    demo.add_argument("--out", default="demo_out", help="folder for results.json and samples.png (default: demo_out)")
    demo.add_argument("--quick", action="store_true", help="a few samples and steps only (smoke test)")
    demo.set_defaults(func=_demo)
    fetch = sub.add_parser(
        "fetch", help="download a weight file from weights_manifest.json into the right ComfyUI folder",
        description="Download a weight file listed in weights_manifest.json into one folder (the file name comes "
                    "from the manifest; nothing is written outside the folder). Hugging Face files go through "
                    "huggingface_hub (HF_TOKEN for gated repos), other URLs resume with Range + If-Range. Every "
                    "download is checked before it gets its final name: the published sha256, else the size and "
                    "the file format (HTML/text refused); a file that fails is deleted. https only, unless "
                    "--allow-http. "
                    "The folder is --dest, else <ComfyUI>/models/<folder> with ComfyUI from --comfyui, "
                    "$COMFYUI_PATH, or the ComfyUI this pack is installed in.")
    fetch.add_argument("name", nargs="?", help="manifest name, e.g. npnet-sdxl-lucipherdev (see --list)")
    fetch.add_argument("--list", action="store_true", help="list the known weight files and exit")
    fetch.add_argument("--dest", help="download into this folder exactly (wins over --comfyui and $COMFYUI_PATH)")
    fetch.add_argument("--comfyui", help="the ComfyUI folder; the file goes to <this>/models/<folder>")
    fetch.add_argument("--url", help="download from this URL instead of the manifest's (a mirror); "
                                     "the manifest's size and sha256 are still checked")
    fetch.add_argument("--retries", type=non_negative_int, default=3,
                       help="resume a broken transfer this many times before giving up (default 3; 0: never)")
    fetch.add_argument("--timeout", type=positive_float, default=30, help="network timeout in seconds (default 30)")
    fetch.add_argument("--allow-http", action="store_true",
                       help="accept a plain http:// URL (or a redirect to one); refused by default because anyone on "
                            "the network can alter it. Use only for a local mirror you trust")
    fetch.set_defaults(func=_fetch)
    convert = sub.add_parser(
        "convert", help="convert an NPNet .pth (official layout) to safetensors with metadata",
        description="Read an NPNet checkpoint (official .pth via torch.load(weights_only=True), or a safetensors "
                    "repack), check it strictly, and write it as safetensors with noisecraft.* metadata.")
    convert.add_argument("src", help="the .pth or .safetensors to read")
    convert.add_argument("dst", help="the .safetensors to write (must not exist unless --overwrite)")
    convert.add_argument("--preset", choices=["sdxl", "dreamshaper", "dit"],
                         help="which official NPNet this is (SDXL and DreamShaper files have the same shapes)")
    convert.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    convert.set_defaults(func=_convert)
    add_train_commands(sub)
    add_run_graph_command(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad flag (one line already printed) or --help: a return code, not an exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return _run(args)


# Expected failures and their return codes: bad input 2, runtime failure 1, Ctrl-C 130.
_BAD_INPUT = (Refused, ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
              PermissionError)
_RUNTIME = (OSError, FloatingPointError, RuntimeError, MemoryError, ImportError)


def _run(args: argparse.Namespace) -> int:
    """Run the command; every failure becomes one line ``noisecraft <command>: <message>`` on stderr."""
    command = getattr(args, "command", "")

    def say(text: str) -> None:
        text = " ".join(part.strip() for part in text.strip().splitlines() if part.strip())  # one line
        sys.stderr.write(f"noisecraft {command}: {text}\n")

    debug = bool(os.environ.get("NOISECRAFT_DEBUG"))

    try:
        return args.func(args)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except _BAD_INPUT as exc:
        say(str(exc) or type(exc).__name__)
        return 2
    except _RUNTIME as exc:
        if debug:
            raise
        hint = " (NOISECRAFT_DEBUG=1 shows the traceback)" if isinstance(exc, RuntimeError) else ""
        say(f"{type(exc).__name__ if isinstance(exc, RuntimeError) else 'failed'}: {exc or type(exc).__name__}{hint}")
        return 1
    except Exception as exc:  # a bug: still one line, the traceback on request
        if debug:
            raise
        say(f"unexpected error, {type(exc).__name__}: {exc} (this is a bug, please report it; run again with "
            f"NOISECRAFT_DEBUG=1 for the full traceback)")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
