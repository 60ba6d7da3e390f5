"""Command line.

``python -m noisecraft demo [--out DIR]``: every method on the shipped toy model.
``python -m noisecraft fetch NAME [--dest DIR] [--comfyui DIR] [--url URL]``: download a weight file
from the manifest (resumable, sha256-checked) into the right ComfyUI folder.
``python -m noisecraft fetch --list``: the known weight files.
``python -m noisecraft convert SRC DST [--preset P]``: an NPNet .pth as safetensors with metadata.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_table, run_demo

    config = DemoConfig()
    if args.quick:
        config = DemoConfig(per_class=1, candidates=2, paper_steps=3, fixed_point_steps=3, score_steps=4)
    t0 = time.perf_counter()
    rows = run_demo(Path(args.out), config)
    total = time.perf_counter() - t0
    sys.stdout.write(format_table(rows) + "\n")
    sys.stdout.write(f"\nwrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'samples.png'} "
                     f"({total:.1f} s in all)\n")
    return 0


# -- fetch -----------------------------------------------------------------------------------------


def _size_text(entry) -> str:
    if entry.size is not None:
        n = entry.size
        return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"
    return f"~{entry.size_approx}" if entry.size_approx else "?"


def _how_to_get(entry) -> str:
    if entry.url:
        return "fetch"
    return "in package" if entry.path else "by hand"


def _format_weights_table(entries) -> str:
    header = ("name", "base model", "size", "folder", "sha256", "get")
    rows = [(e.name, e.base_model, _size_text(e), e.folder, "known" if e.sha256 else "-", _how_to_get(e))
            for e in entries]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    out = [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    out.append("")
    out.append("sha256 '-': none published, the download is checked for completeness only. "
               "'by hand': no direct URL, see `page` in the manifest.")
    return "\n".join(out)


class _ProgressLine:
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


def _fetch(args: argparse.Namespace) -> int:
    from .weights import DownloadError, download, load_manifest, resolve_models_dir

    entries = load_manifest()
    if args.list:
        sys.stdout.write(_format_weights_table(entries) + "\n")
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
    bar = _ProgressLine(entry.file_name or entry.name)
    try:
        path = download(entry, dest, url=args.url, timeout=args.timeout, retries=args.retries, progress=bar)
    except KeyboardInterrupt:
        bar.close()
        sys.stderr.write(f"noisecraft fetch: interrupted; the partial file in {dest} is kept, run the same "
                         f"command again to resume\n")
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
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        sys.stderr.write(f"noisecraft convert: {exc}\n")
        return 2
    sys.stdout.write(f"{out}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noisecraft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every method on the shipped toy model and print the results table")
    demo.add_argument("--out", default="demo_out", help="folder for results.json and samples.png (default: demo_out)")
    demo.add_argument("--quick", action="store_true", help="a few samples and steps only (smoke test)")
    demo.set_defaults(func=_demo)
    fetch = sub.add_parser(
        "fetch", help="download a weight file from weights_manifest.json into the right ComfyUI folder",
        description="Download a weight file listed in weights_manifest.json: resumes interrupted transfers, "
                    "checks the published size and sha256, and only then gives the file its final name. "
                    "The folder is --dest, else <ComfyUI>/models/<folder> with ComfyUI from --comfyui, "
                    "$COMFYUI_PATH, or the ComfyUI this pack is installed in.")
    fetch.add_argument("name", nargs="?", help="manifest name, e.g. npnet-sdxl-lucipherdev (see --list)")
    fetch.add_argument("--list", action="store_true", help="list the known weight files and exit")
    fetch.add_argument("--dest", help="download into this folder exactly (wins over --comfyui and $COMFYUI_PATH)")
    fetch.add_argument("--comfyui", help="the ComfyUI folder; the file goes to <this>/models/<folder>")
    fetch.add_argument("--url", help="download from this URL instead of the manifest's (a mirror); "
                                     "the manifest's size and sha256 are still checked")
    fetch.add_argument("--retries", type=int, default=3,
                       help="resume a broken transfer this many times before giving up (default 3; 0: never)")
    fetch.add_argument("--timeout", type=float, default=30, help="network timeout in seconds (default 30)")
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
