"""The GPU figures in one command: one JSON and one markdown table, every row side by side.

On a CUDA machine, from a fresh environment (``COMFYUI_PATH`` = a ComfyUI checkout)::

    python benchmarks/gpu_report.py --install      # = pip install -e .[torch,dev] and
                                                    #   pip install -r $COMFYUI_PATH/requirements.txt, then the report
    python benchmarks/gpu_report.py                # once installed: writes gpu_report/gpu_report.{json,md}

On an offline GPU machine (no registry, no hub), from a bundle built where the registries are
(``benchmarks/gpu_bundle.py``: the wheels the machine lacks and a copy of the ComfyUI checkout's code)::

    python benchmarks/gpu_report.py --bundle gpu_bundle   # pip install --no-index to a temporary target; the report

Smoke run of the same code at tiny sizes on the CPU (CI: ``tests/core/test_gpu_report.py``)::

    python benchmarks/gpu_report.py --cpu --tiny --out /tmp/report

Rows (details in ``_gpu_rows.py``, core, and ``_gpu_comfy.py``, ComfyUI), random-weight models:

* ``refine_cfg_ratio/sd15`` and ``/sdxl``: refined noise + cfg 1 vs cfg 7, 20 steps, SD1.5 at 512^2 and
  SDXL at 1024^2 in fp16: wall-time ratio of ComfyUI's sampling node (paper 0.58 / 0.60; limit 0.55);
* ``npnet_cost/sdxl``: NPNet golden noise against one 20-step SDXL generation (paper +3%);
* ``select_micro_batch``: ``noisecraft.stability.select`` time per candidate, micro-batch 8 vs 1;
* ``precision/<node>``: every NoiseCraft node that outputs NOISE or LATENT (listed from ``nodes/*.py``),
  fp16 and bf16 against fp32: max-abs, all finite;
* ``train_step/sd15`` and ``/sdxl``: one MSD training step's time and peak memory
  (``bench_train_memory.msd_step_figures``);
* ``npnet_device``: NPNet output on CPU vs GPU with canonical singular-vector signs;
* ``seeded_noise/contract`` and ``dynamic_vram/train_wrappers``: behaviour newer ComfyUI changed (SeededNoise
  against RandomNoise in three dtypes; the trainer's weight wrappers under the dynamic VRAM patcher).

Every row is always printed with its status: ``ok``, ``not run: <why>`` (e.g. the ComfyUI rows without
``COMFYUI_PATH``) or ``failed: <error>`` (the run goes on; the exit code is then 1). Without CUDA and
without ``--cpu`` the script exits with one line saying so (exit code 2).

Time budget (within 8 minutes of GPU time by design): batch 1, 20 steps, 1 untimed warm-up run then 3
timed runs per variant (median; the variants of a row alternate), one model on the GPU at a time, built
there directly in seconds (no download, no CPU copy). Estimated for an H100/H200-class GPU: SD1.5 refine
~10 s, SDXL refine ~25 s and NPNet ~25 s (8 and 12 generations of ~1-3 s), selection ~15 s (K = 8,
4 score steps), precision ~40 s (3 SDXL builds, 5 nodes, 2 candidates or 2 steps of 2 score steps),
NPNet device ~5 s; the training rows run last, ~1.5-2.5 min (bench_train_memory's FakeTensor byte
accounting is CPU-bound: 38 s for SD1.5 and 94 s for SDXL on one busy CPU thread here, plus 4 real
steps each); about 5 minutes in all, plus the imports. A hard stop keeps it inside: rows that would
start after ``--budget`` seconds (default 450) are listed as not run, saying so. Each row's own wall
time is the table's last column and the total is printed, so every run checks the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the ComfyUI rows besides precision/<node>, with what they measure (their rows say it in full when they run)
COMFY_ROWS = {"models/comfyui": "full-size ComfyUI UNets the ComfyUI rows use (parameters, meta device)",
              "refine_cfg_ratio/sd15": "refined noise + cfg 1 vs cfg 7, SD1.5 512^2, sampling node wall time",
              "refine_cfg_ratio/sdxl": "refined noise + cfg 1 vs cfg 7, SDXL 1024^2, sampling node wall time",
              "npnet_cost/sdxl": "SDXL generation with NPNet golden noise vs RandomNoise",
              "seeded_noise/contract": "SeededNoise vs ComfyUI's RandomNoise, fp32 / fp16 / bf16 latents",
              "dynamic_vram/train_wrappers": "Train Refiner's adapters under ModelPatcherDynamic vs ModelPatcher"}


def install() -> None:
    """``pip install -e .[torch,dev]`` and ComfyUI's requirements.txt (when COMFYUI_PATH is set)."""
    cmds = [[sys.executable, "-m", "pip", "install", "-e", f"{REPO}[torch,dev]"]]
    comfy = os.environ.get("COMFYUI_PATH")
    if comfy:
        cmds.append([sys.executable, "-m", "pip", "install", "-r", str(Path(comfy) / "requirements.txt")])
    for cmd in cmds:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def run_bundled(bundle: Path, args: list[str]) -> int:
    """Install from the offline bundle ``bundle`` into a temporary target (``gpu_bundle.install``) and run the
    report in a fresh process with that target and this repository on ``PYTHONPATH`` and the bundle's ComfyUI."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_bundle import install

    if not (bundle / "manifest.json").is_file():
        print(f"gpu_report: {bundle} is not a bundle (no manifest.json): build one with benchmarks/gpu_bundle.py",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nc_gpu_bundle_") as tmp:
        done = install(bundle, Path(tmp))
        print(f"bundle: installed {', '.join(done['installed']) or 'nothing'}; already here: "
              f"{', '.join(done['present']) or 'nothing'}", flush=True)
        for line in done["conflicts"]:
            print(f"bundle: warning: {line}", flush=True)
        for name in done["missing_machine"]:
            print(f"bundle: warning: this machine lacks {name}, which the bundle expects here: rebuild the bundle "
                  f"with benchmarks/gpu_bundle.py --add {name}", flush=True)
        env = dict(os.environ, COMFYUI_PATH=str(done["comfyui"]),
                   PYTHONPATH=os.pathsep.join(p for p in (str(done["site"]), str(REPO), os.environ.get("PYTHONPATH"))
                                              if p))
        return subprocess.run([sys.executable, __file__, *args], env=env).returncode


def comfy_missing() -> str | None:
    """Why the ComfyUI rows cannot run here, or None."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return "not run: COMFYUI_PATH not set"
    if not (Path(path) / "comfy" / "samplers.py").is_file():
        return f"not run: COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/samplers.py)"
    return None


def over_budget(setup) -> str | None:
    """The 'not run' status of a row that would start after the time budget is used up, or None."""
    if time.perf_counter() > setup.deadline:
        return f"not run: the time budget (--budget {setup.budget:.0f} s) was used up before this row"
    return None


def run_row(setup, row, fn) -> None:
    """Run one row's function into ``row``, keeping the error as the row's status."""
    late = over_budget(setup)
    if late:
        row.status = late
        return
    t0 = time.perf_counter()
    try:
        done = fn()
        row.status, row.summary, row.values = done.status, done.summary, done.values
        row.what, row.paper = done.what or row.what, done.paper or row.paper
    except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
        row.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    row.seconds = time.perf_counter() - t0
    progress_line(row)


def progress_line(row) -> None:
    print(f"[{row.seconds:7.1f} s] {row.id}: {row.status}{' - ' + row.summary if row.summary else ''}", flush=True)


def finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [finite_or_none(x) for x in v]
    return v


def markdown(rows, meta) -> str:
    lines = [f"GPU report: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
             f"{'tiny models' if meta['tiny'] else 'full-size random-weight models'}, timed dtype {meta['dtype']}, "
             f"{meta['repeats']} timed runs after {meta['warmup']} warm-up, total {meta['total_s']:.0f} s", "",
             "| row | what | status | result | paper / limit | s |", "|---|---|---|---|---|---:|"]
    for r in rows:
        cells = [r.id, r.what, r.status, r.summary or "-", r.paper or "-", f"{r.seconds:.1f}"]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: the smoke run)")
    p.add_argument("--tiny", action="store_true", help="tiny random-weight models instead of full-size ones")
    p.add_argument("--out", default="gpu_report", help="output folder for gpu_report.json and gpu_report.md")
    p.add_argument("--install", action="store_true", help="pip install what the report needs first (see above)")
    p.add_argument("--bundle", metavar="DIR", default=None,
                   help="install offline from this bundle (benchmarks/gpu_bundle.py) into a temporary target first")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="dtype of the timed rows (default fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per variant after the warm-up (default 3; 1 with --tiny)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds of measuring after which the remaining rows are listed as not run (default 450)")
    a = p.parse_args(argv)
    if a.bundle:
        given = list(sys.argv[1:] if argv is None else argv)
        i = given.index("--bundle") if "--bundle" in given else None
        rest = given[:i] + given[i + 2:] if i is not None else [x for x in given if not x.startswith("--bundle=")]
        return run_bundled(Path(a.bundle), rest)
    if a.install:
        install()
        args = [x for x in (sys.argv[1:] if argv is None else argv) if x != "--install"]
        return subprocess.run([sys.executable, __file__, *args]).returncode  # fresh imports of what was installed

    import torch

    if not a.cpu and not torch.cuda.is_available():
        print(f"gpu_report: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): run it on "
              f"a CUDA machine, or pass --cpu --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    if a.cpu and not a.tiny:
        print("gpu_report: --cpu needs --tiny (full-size SDXL on the CPU would take far too long and ~10 GB)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _gpu_rows import CORE_ROWS, DTYPES, Row, Setup, noise_nodes

    device = torch.device("cpu" if a.cpu else "cuda")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    dtype = DTYPES[a.dtype or ("fp32" if a.cpu else "fp16")]
    repeats = a.repeats or (1 if a.tiny else 3)
    setup = Setup(device=device, tiny=a.tiny, dtype=dtype, repeats=repeats, warmup=0 if a.cpu else 1,
                  comfy=comfy_missing(), budget=a.budget)
    try:  # diffusers warns on every .to(dtype) of a UNet built from a config
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
    t_start = time.perf_counter()
    setup.deadline = t_start + a.budget
    from _gpu_comfy import precision_row

    rows = {rid: Row(rid, what) for rid, what, _ in CORE_ROWS}  # the table's order
    rows.update({rid: Row(rid, what) for rid, what in COMFY_ROWS.items()})
    rows.update({f"precision/{node}": precision_row(node, file, setup) for node, file in noise_nodes()})
    core = {rid: fn for rid, _, fn in CORE_ROWS}
    last = [rid for rid in core if rid.startswith("train_step/")]  # the slowest rows run last (budget)
    for rid in [r for r in core if r not in last]:
        run_row(setup, rows[rid], lambda fn=core[rid]: fn(setup))
    run_comfy_rows(setup, rows)
    for rid in last:
        run_row(setup, rows[rid], lambda fn=core[rid]: fn(setup))

    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "cpu", "torch": torch.__version__, "tiny": a.tiny,
            "dtype": str(dtype)[6:], "repeats": repeats, "warmup": setup.warmup, "steps": setup.steps,
            "comfyui": os.environ.get("COMFYUI_PATH"), "total_s": time.perf_counter() - t_start,
            "created_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    ordered = list(rows.values())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "rows": [{"id": r.id, "what": r.what, "status": r.status, "summary": r.summary,
                                      "paper": r.paper, "seconds": r.seconds,
                                      "values": {k: finite_or_none(v) for k, v in r.values.items()}}
                                     for r in ordered]}
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    table = markdown(ordered, meta)
    (out / "gpu_report.md").write_text(table, encoding="utf-8")
    print("\n" + table)
    print(f"wrote {out / 'gpu_report.json'} and {out / 'gpu_report.md'} ({meta['total_s']:.0f} s)")
    return 1 if any(r.status.startswith("failed") for r in ordered) else 0


def run_comfy_rows(setup, rows) -> None:
    """The ComfyUI rows: 'not run' with the reason when ComfyUI is missing, else each row in turn."""
    comfy_ids = [rid for rid in rows if rid in COMFY_ROWS or rid.startswith("precision/")]
    if setup.comfy:
        for rid in comfy_ids:
            rows[rid].status = setup.comfy
        return
    from _gpu_comfy import (ComfyEnv, comfy_models, dynamic_vram_wrappers, npnet_cost, precision_rows,
                            refine_cfg_ratio, seeded_noise_contract)

    t0 = time.perf_counter()
    try:
        env = ComfyEnv(setup)
    except Exception as e:  # noqa: BLE001 - a broken ComfyUI install fails its rows, not the report
        for rid in comfy_ids:
            rows[rid].status = f"failed: ComfyUI did not load: {type(e).__name__}: {e}"[:300]
        return
    print(f"[{time.perf_counter() - t0:7.1f} s] ComfyUI loaded", flush=True)
    run_row(setup, rows["models/comfyui"], lambda: comfy_models(env))
    run_row(setup, rows["seeded_noise/contract"], lambda: seeded_noise_contract(env))
    run_row(setup, rows["dynamic_vram/train_wrappers"], lambda: dynamic_vram_wrappers(env))
    env.free()
    run_row(setup, rows["refine_cfg_ratio/sd15"], lambda: refine_cfg_ratio(env, "sd15"))
    run_row(setup, rows["refine_cfg_ratio/sdxl"], lambda: refine_cfg_ratio(env, "sdxl"))
    run_row(setup, rows["npnet_cost/sdxl"], lambda: npnet_cost(env))
    env.free()
    precision = {rid: r for rid, r in rows.items() if rid.startswith("precision/")}
    try:
        late = over_budget(setup)
        if late:
            raise TimeoutError(late)
        precision_rows(env, precision)
        for r in precision.values():
            progress_line(r)
    except Exception as e:  # noqa: BLE001
        for r in precision.values():
            if r.status == "not run":
                r.status = late or f"failed: {type(e).__name__}: {e}"[:300]
    rows.update(precision)  # a live node the source listing missed has a row now
    env.free()


if __name__ == "__main__":
    sys.exit(main())
