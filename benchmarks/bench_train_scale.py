"""Memory of refiner training as the prompt count grows: prompt encodings on disk (the CLI's way) against all
encodings in memory (the way before), on a tiny SDXL-shaped pipeline whose text encoders are wide on purpose,
so that the encodings dominate (two 768-wide CLIPs: 1536-wide token states, 16 tokens, float32: 98 KB a
prompt).

    python benchmarks/bench_train_scale.py [--prompts 1000 20000] [--steps 20]

For each prompt count and each way, a fresh process builds the teacher cache (64 samples, 2 teacher steps) and
trains 20 steps (batch 2, rank 4); it reports its peak RSS (``getrusage``, the OS's own count) and the time per
training step. "disk": ``diffusers_host(encode_now=False)`` + :func:`noisecraft.train.cond_store.conds_for` (a
chunk of prompts encoded at a time into the cache folder, a batch's rows read back); "memory": every encoding
made up front and held (``encode_now=True``). Both train with the same loop on the same cache samples.
Prints a markdown table and the ratios larger / smaller count (target: <= 1.1 for "disk").
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs=2, default=[1000, 20000], help="the two prompt counts")
    ap.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, model, prompts, work, steps = args.child
        return child(mode, model, prompts, work, int(steps))
    t_all = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
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
    print(f"({time.perf_counter() - t_all:.0f} s in all)")


if __name__ == "__main__":
    main()
