"""Held-out validation on the toy model: does it track the final evaluation, what does it cost, and does it
leave the training alone?

Runs ``python -m noisecraft train-refiner --toy`` twice with the README's toy recipe (300 steps, rank 4,
1024 cached teacher samples, one shared teacher cache): once with ``--validate-every 50 --report-to
tensorboard``, once without. Prints

* the validation curve (share of the unguided -> teacher latent-MSE gap closed on the 100 held-out samples,
  10 digits x 10 seeds) and the held-out evaluation of the final refiner on 500 samples
  (``scripts/train_toy_refiner.py``'s ``evaluate``: seeds 500000.., 20-step sampling: the README's figure);
* the cost: model passes per validation and the wall-time share of validation in the 300-step run;
* whether the two refiners hold the same tensor bytes (the data section of the safetensors files; the
  metadata differs by the validation figures only).

    OMP_NUM_THREADS=1 python benchmarks/bench_validation.py [--work /tmp/nc_bench_validation] [--steps 300]

Writes ``<work>/with`` (README's validation grid and loss.png come from there) and ``<work>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import torch  # noqa: E402

from noisecraft.__main__ import main as cli  # noqa: E402


def data_section(path: Path) -> bytes:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw[8 + n:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/nc_bench_validation"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--eval-samples", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "teacher_cache"
    common = ["train-refiner", "--toy", "--cache", str(cache), "--steps", str(args.steps)]
    walls = {}
    for name, extra in (("with", ["--validate-every", str(args.every), "--report-to", "tensorboard",
                                  "--run-name", "bench"]), ("without", [])):
        out = args.work / name
        if (out / "refiner.safetensors").is_file():
            walls[name] = json.loads((out / "wall.json").read_text())["wall_s"]
            continue
        cli([*common, "--out", str(out), *extra])  # builds the shared cache on the first run
        rec = [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines() if x.strip()]
        walls[name] = rec[-1]["wall_s"]  # the training loop's wall time (the cache build excluded)
        (out / "wall.json").write_text(json.dumps({"wall_s": walls[name]}))

    from train_toy_refiner import EVAL_SEED_BASE, evaluate  # scripts/ (the README's held-out evaluation)
    from noisecraft.hosts import toy

    model, lora = toy.load_toy_refiner(path=args.work / "with" / "refiner.safetensors")
    t0 = time.perf_counter()
    ev = evaluate(model, lora, args.eval_samples, EVAL_SEED_BASE)
    vals = [json.loads(x) for x in (args.work / "with" / "validation.jsonl").read_text().splitlines() if x.strip()]
    same = data_section(args.work / "with" / "refiner.safetensors") == data_section(
        args.work / "without" / "refiner.safetensors")
    passes = json.loads(__import__("safetensors").safe_open(
        str(args.work / "with" / "refiner.safetensors"), "pt").metadata()["noisecraft.validation"])
    share = vals[-1]["wall_s"] / walls["with"]
    summary = {"validation": [{k: v[k] for k in ("step", "gap_closed", "score_unguided", "score_refined",
                                                 "score_teacher")} for v in vals],
               "eval_500": {"gap_closed_mse": ev["gap_closed_mse"], "gap_closed_accuracy": ev["gap_closed_accuracy"],
                            "seconds": time.perf_counter() - t0},
               "passes_per_validation": passes["passes_per_validation"], "samples": passes["samples"],
               "validation_s": vals[-1]["wall_s"], "wall_with_s": walls["with"], "wall_without_s": walls["without"],
               "validation_share": share, "same_tensor_bytes": same}
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"toy refiner, {args.steps} steps, validation every {args.every} on {passes['samples']} held-out samples "
          f"({passes['passes_per_validation']} model passes per validation):")
    print("  step  gap closed  classifier confidence unguided | refined | teacher")
    for v in vals:
        print(f"  {v['step']:4d}  {100 * v['gap_closed']:9.1f}%  {v['score_unguided']:.3f} | {v['score_refined']:.3f} | "
              f"{v['score_teacher']:.3f}")
    print(f"held-out evaluation of the final refiner ({args.eval_samples} samples, 20 steps): latent-MSE gap closed "
          f"{100 * ev['gap_closed_mse']:.1f}% (last validation {100 * vals[-1]['gap_closed']:.1f}%, difference "
          f"{100 * abs(ev['gap_closed_mse'] - vals[-1]['gap_closed']):.1f} points)")
    print(f"validation wall time {vals[-1]['wall_s']:.1f} s of {walls['with']:.1f} s ({100 * share:.1f}%); "
          f"run without validation {walls['without']:.1f} s")
    print(f"same refiner tensor bytes with and without validation: {same}")


if __name__ == "__main__":
    main()
