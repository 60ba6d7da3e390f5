"""Command line: ``python -m noisecraft demo [--out DIR]``."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noisecraft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every method on the shipped toy model and print the results table")
    demo.add_argument("--out", default="demo_out", help="folder for results.json and samples.png (default: demo_out)")
    demo.add_argument("--quick", action="store_true", help="a few samples and steps only (smoke test)")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
