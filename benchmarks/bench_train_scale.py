"""Memory of refiner training as the prompt count grows: prompt encodings on disk (the CLI's way) against all
encodings in memory (the way before), on a tiny SDXL-shaped pipeline whose text encoders are wide on purpose,
so that the encodings dominate (two 768-wide CLIPs: 1536-wide token states, 16 tokens, float32: 98 KB a
prompt); and the same in ComfyUI, a named teacher cache (on disk, now) against an unnamed one (in memory, before).

    python benchmarks/bench_train_scale.py [--prompts 1000 20000] [--steps 20]
        [--comfyui PATH] [--comfyui-python PYTHON] [--comfy-prompts 500 5000] [--only cli|comfyui]

For each prompt count and each way, a fresh process builds the teacher cache (64 samples, 2 teacher steps) and
trains 20 steps (batch 2, rank 4); it reports its peak RSS (``getrusage``, the OS's own count) and the time per
training step. "disk": ``diffusers_host(encode_now=False)`` + :func:`noisecraft.train.cond_store.conds_for` (a
chunk of prompts encoded at a time into the cache folder, a batch's rows read back); "memory": every encoding
made up front and held (``encode_now=True``). Both train with the same loop on the same cache samples.
Prints a markdown table and the ratios larger / smaller count (target: <= 1.1 for "disk").

ComfyUI half (``--comfyui``, default ``$COMFYUI_PATH``; skipped with a line without it): ComfyUI imported in-process
on the CPU (as the tier-2 tests import it) by ``--comfyui-python`` (default ``$COMFYUI_PYTHON``, else this Python),
the pack imported as ComfyUI imports a custom node. The text encoder is a FULL-SIZE SD1.5 CLIP-L with random weights
(``comfy.sd.CLIP`` around ComfyUI's ``SD1ClipModel`` / ``SD1Tokenizer`` with its default config, 123M parameters,
initialised like the test pack's tiny models: ``tiny_models._init``), so a prompt's encoding is ComfyUI's real
77 x 768 float32 (236,544 bytes); the UNet is the test pack's tiny SD1.5-shaped one (64x64 images, 8x8 latents).
For each prompt count and each way, a fresh process runs the nodes as ComfyUI would (under ``inference_mode``):
Load Prompts' reader on a prompt file, Build Teacher Cache (prompts + clip, 1 sample per prompt, 2 teacher
steps, cfg 5, the LATENT's batch 64 = the named cache's micro-batch) with ``cache_name`` "bench" ("named": the
encodings and the samples in output/noisecraft_caches/bench) or empty ("unnamed": every CONDITIONING held in
memory), then Train Refiner (``--steps`` steps, batch 2, rank 4, 2 student steps, a named run). It reports its
peak RSS, the cache build's time, Train Refiner's wall time per step (the CLI half's measure: set-up included) and
the loop's own median step (from the run's loss log).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKENS = 16
REPO = Path(__file__).resolve().parents[1]
COMFY_BATCH = 64  # Build Teacher Cache's LATENT batch: the named cache's micro-batch


def build_pipeline(root: Path) -> None:
    """A tiny random SDXL pipeline with wide text encoders (768 + 768 = 1536-wide token states)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase + string.digits:
            vocab[c + suffix] = len(vocab)
    tdir = root.parent / "vocab"
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "vocab.json").write_text(json.dumps(vocab))
    (tdir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(str(tdir), model_max_length=TOKENS)
    torch.manual_seed(0)

    def clip(projection):
        cfg = CLIPTextConfig(hidden_size=768, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                             vocab_size=len(vocab), max_position_embeddings=TOKENS, projection_dim=32,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1536,
                                attention_head_dim=2, norm_num_groups=4, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=6 * 4 + 32).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    StableDiffusionXLPipeline(vae=vae, text_encoder=clip(False), text_encoder_2=clip(True), tokenizer=tok,
                              tokenizer_2=tok, unet=unet, scheduler=sched).save_pretrained(str(root))


def child(mode: str, model: str, prompts_file: str, work: str, steps: int) -> None:
    """One measured run (in its own process)."""
    import torch

    torch.set_num_threads(1)
    from noisecraft.hosts.diffusers import diffusers_host
    from noisecraft.hosts.families import keep_text_encoders
    from noisecraft.sigmas import get_sigmas
    from noisecraft.train import RefinerTrainConfig, build_teacher_cache, train_refiner
    from noisecraft.train.cond_store import conds_for

    prompts = Path(prompts_file).read_text().splitlines()
    work = Path(work)
    host = diffusers_host(model, prompts, encode_now=mode == "memory", latent_shape=(4, 8, 8))
    cache_dir = work / "cache"
    if mode == "disk":
        from noisecraft.train.cond_store import CondStore

        with keep_text_encoders():
            conds_for(cache_dir, prompts, host.encoder)  # the CLI's chunk (256 prompts)
        host.use_conds(CondStore(cache_dir))
    cache = build_teacher_cache(cache_dir, lambda c: host.denoiser(c, cfg=5.0), shape=(4, 8, 8),
                                conds=list(range(len(prompts))), total=64,
                                sigmas=get_sigmas(host.table, "normal", 2), kind=host.table.kind.value, shard_size=32,
                                batch_size=16, meta={"model": "bench"})
    config = RefinerTrainConfig(steps=steps, rank=4, lr=1e-3, batch_size=2, student_steps=2, checkpoint_every=10_000,
                                targets=tuple(host.targets))
    t0 = time.perf_counter()
    result = train_refiner(host, cache, work / "run", config)
    step_s = (time.perf_counter() - t0) / steps
    result.lora.remove()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    print(json.dumps({"peak_rss_mib": peak, "step_s": step_s}))


# -- the ComfyUI half ------------------------------------------------------------------------------------------

def _load_file(name: str, path: Path, package: bool = False):
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path, **({"submodule_search_locations": [str(path.parent)]}
                                                                 if package else {}))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def full_clip_l(tiny_models):
    """A full-size SD1.5 CLIP-L with random weights: ComfyUI's ``comfy.sd.CLIP`` around ``SD1ClipModel`` (its default
    config: 12 layers, 768 wide, 49408 tokens) and ``SD1Tokenizer``, initialised like the test pack's tiny models."""
    from types import SimpleNamespace

    import torch

    import comfy.sd
    import comfy.sd1_clip as sd1

    clip = comfy.sd.CLIP(SimpleNamespace(clip=sd1.SD1ClipModel, tokenizer=sd1.SD1Tokenizer, params={}),
                         model_options={"dtype": torch.float32})
    tiny_models._init(clip.cond_stage_model, 0)  # ComfyUI's layers skip reset_parameters: real initialisers
    return clip


def comfy_child(mode: str, comfyui: str, prompts_file: str, work: str, steps: int) -> None:
    """One measured ComfyUI run (in its own process): Build Teacher Cache + Train Refiner through the nodes."""
    sys.path.insert(0, str(Path(comfyui).resolve()))
    import torch

    torch.set_num_threads(1)
    from comfy.cli_args import args  # before comfy.model_management

    args.cpu = True
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401
    import comfy.utils
    import folder_paths

    comfy.utils.PROGRESS_BAR_ENABLED = False
    work = Path(work)
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_temp_directory(str(work / "temp"))
    _load_file("noisecraft_pack", REPO / "__init__.py", package=True)
    import importlib

    tr = importlib.import_module("noisecraft_pack.nodes.nodes_train")
    nodes_prompts = importlib.import_module("noisecraft_pack.nodes.nodes_prompts")
    tiny = _load_file("noisecraft_bench_tiny_models", REPO / "tests" / "e2e" / "nc_test_pack" / "tiny_models.py")
    model = tiny.build("sd15", seed=0)
    clip = full_clip_l(tiny)
    name = "bench" if mode == "named" else ""
    with torch.inference_mode():  # as ComfyUI runs nodes
        prompts = nodes_prompts.load_prompts(None, path=str(prompts_file))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = {"samples": torch.zeros(COMFY_BATCH, 4, 8, 8)}
        t0 = time.perf_counter()
        cache = tr.BuildTeacherCache.execute(model, negative=negative, latent=latent, samples_per_prompt=1, seed=0,
                                             cfg=5.0, steps=2, scheduler="normal", prompts=prompts, clip=clip,
                                             cache_name=name).args[0]
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        losses = tr.TrainRefiner.execute(model, cache, steps, 2, 2, 1e-3, 4, 0.0, 0, resume_from="bench_run").args[1]
        train_s = time.perf_counter() - t0
    assert len(losses) == steps
    log = [json.loads(line) for line in (work / "output" / "noisecraft_runs" / "bench_run" / "loss.jsonl")
           .read_text().splitlines()]
    walls = [r["wall_s"] for r in log]
    diffs = sorted(b - a for a, b in zip(walls, walls[1:]))
    folder = work / "output" / "noisecraft_caches" / "bench"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    print(json.dumps({"peak_rss_mib": peak, "step_s": train_s / steps, "loop_step_s": diffs[len(diffs) // 2],
                      "build_s": build_s, "samples": len(cache), "prompts": cache.prompt_count,
                      "folder_bytes": sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0}))


def run_comfy(comfyui: str, python: str, counts, steps: int, env: dict) -> dict:
    """The ComfyUI half: {(mode, prompts): the child's figures}."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for p in counts:
            pf = tmp / f"prompts_{p}.txt"
            pf.write_text("\n".join(f"a photo number {i} of a cat" for i in range(p)) + "\n")
            for mode in ("named", "unnamed"):
                out = subprocess.run([python, __file__, "--comfy-child", mode, comfyui, str(pf), str(tmp / f"{mode}_{p}"),
                                      str(steps)], env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"bench_train_scale: the ComfyUI child ({mode}, {p} prompts) failed:\n"
                                     f"{out.stderr[-3000:]}")
                rows[(mode, p)] = json.loads(out.stdout.strip().splitlines()[-1])
    return rows


def comfy_table(rows: dict, counts) -> str:
    small, large = counts
    lines = ["| prompts | Build Teacher Cache | peak RSS | cache build | time per training step (node) | loop step |",
             "|---:|---|---:|---:|---:|---:|"]
    for mode in ("named", "unnamed"):
        what = "named: on disk (now)" if mode == "named" else "unnamed: in memory (before)"
        for p in (small, large):
            r = rows[(mode, p)]
            lines.append(f"| {p} | {what} | {r['peak_rss_mib']:.0f} MiB | {r['build_s']:.0f} s | "
                         f"{r['step_s'] * 1000:.0f} ms | {r['loop_step_s'] * 1000:.0f} ms |")
    for mode in ("named", "unnamed"):
        a, b = rows[(mode, small)], rows[(mode, large)]
        lines.append(f"{mode}: {large} / {small} prompts: peak RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}, "
                     f"time per step x{b['step_s'] / a['step_s']:.2f} (loop step x"
                     f"{b['loop_step_s'] / a['loop_step_s']:.2f})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs=2, default=[1000, 20000], help="the two prompt counts (CLI half)")
    ap.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"),
                    help="a ComfyUI checkout for the ComfyUI half (default $COMFYUI_PATH; none: the half is skipped)")
    ap.add_argument("--comfyui-python", default=os.environ.get("COMFYUI_PYTHON") or sys.executable,
                    help="the Python with ComfyUI's requirements (default $COMFYUI_PYTHON, else this one)")
    ap.add_argument("--comfy-prompts", type=int, nargs=2, default=[500, 5000],
                    help="the two prompt counts of the ComfyUI half (default 500 5000)")
    ap.add_argument("--only", choices=("cli", "comfyui"), help="run one half")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--comfy-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, model, prompts, work, steps = args.child
        return child(mode, model, prompts, work, int(steps))
    if args.comfy_child:
        mode, comfyui, prompts, work, steps = args.comfy_child
        return comfy_child(mode, comfyui, prompts, work, int(steps))
    t_all = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if args.only != "comfyui":
        run_cli(args, env)
    if args.only != "cli":
        if not args.comfyui:
            print("ComfyUI half skipped: no --comfyui (or $COMFYUI_PATH)")
        else:
            rows = run_comfy(args.comfyui, args.comfyui_python, args.comfy_prompts, args.steps, env)
            print(f"\nComfyUI (full-size random CLIP-L, tiny UNet, {args.steps} training steps):")
            print(comfy_table(rows, args.comfy_prompts))
    print(f"({time.perf_counter() - t_all:.0f} s in all)")


def run_cli(args, env: dict) -> None:
    """The CLI half (diffusers pipeline): its table and ratios."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "tiny_sdxl_wide"
        build_pipeline(model)
        for p in args.prompts:
            pf = tmp / f"prompts_{p}.txt"
            pf.write_text("\n".join(f"a photo number {i} of a cat" for i in range(p)) + "\n")
            for mode in ("disk", "memory"):
                work = tmp / f"{mode}_{p}"
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(model), str(pf), str(work),
                                      str(args.steps)], env=env, capture_output=True, text=True, check=True)
                rows[(mode, p)] = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = args.prompts
    print(f"| prompts | conditioning | peak RSS | time per training step |\n|---:|---|---:|---:|")
    for mode in ("disk", "memory"):
        for p in (small, large):
            r = rows[(mode, p)]
            print(f"| {p} | {'on disk (now)' if mode == 'disk' else 'in memory (before)'} | {r['peak_rss_mib']:.0f} MiB "
                  f"| {r['step_s'] * 1000:.0f} ms |")
    for mode in ("disk", "memory"):
        a, b = rows[(mode, small)], rows[(mode, large)]
        print(f"{mode}: {large} / {small} prompts: peak RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}, "
              f"time per step x{b['step_s'] / a['step_s']:.2f}")


if __name__ == "__main__":
    main()
