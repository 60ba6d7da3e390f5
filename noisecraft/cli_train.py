"""The training commands of the command line: ``train-refiner``, ``collect-pairs``, ``train-npnet``.

Each builds its host (``--toy``, or ``--model DIR``: :mod:`noisecraft.hosts.diffusers`), checks every
flag and the output folder before any work (:class:`~noisecraft.cli_args.Refused`, printed as one line
by :mod:`noisecraft.__main__`), and runs the one training loop (:mod:`noisecraft.train.loop`) on
accelerate's ``Accelerator``; under ``accelerate launch`` the processes split the teacher cache's shards
and train data parallel. :func:`add_train_commands` declares their flags.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import sys
import time
from pathlib import Path

from .cli_args import (Refused, add_prompt_args, check_out, every_5s, every_10_steps, finite_float, interrupted_resume,
                       margin_float, non_negative_float, non_negative_int, one_writer, positive_float, positive_int,
                       read_prompt_flags, two_or_more_int)
from .cli_cache import SEED_BASE_DEFAULT, adopt_comfy_cache, check_model_fits, open_comfy_cache, use_comfy_cache
from .cli_filter import filter_teacher, keep_value, teacher_scorer
from .cli_validation import add_validation_args, check_preset, validation_for, validation_line

__all__ = ["add_train_commands"]

def _check_scheduler(name: str) -> None:
    from .sigmas import SCHEDULERS

    if name not in SCHEDULERS:
        raise Refused(f"--scheduler {name!r} is not a known sigma schedule: choose one of {', '.join(SCHEDULERS)}")


def _check_resume(out: Path, args: argparse.Namespace, result_name: str) -> None:
    """Before any work: an existing checkpoint needs --resume, must be readable, and must not be past --steps."""
    import json

    from .io import read_safetensors_metadata, verify_safetensors

    ckpt = out / "checkpoint.safetensors"
    if not ckpt.is_file():
        return
    if not args.resume:
        raise Refused(f"{out} already holds a checkpoint: add --resume to continue it, or choose another --out")
    what, fix = ("the training checkpoint to resume from (--resume)",
                 f"delete it to start over in {out}, or choose another --out")
    verify_safetensors(ckpt, what=what, fix=fix)  # a damaged checkpoint is refused before any work
    meta = read_safetensors_metadata(ckpt, what=what, fix=fix)
    try:
        step = int(json.loads(meta["state"])["step"])
    except (KeyError, TypeError, ValueError):
        raise Refused(f"{ckpt} is not a NoiseCraft training checkpoint (no step in its metadata): delete it to "
                       f"start over, or choose another --out") from None
    if step > args.steps:
        raise Refused(f"--resume: {ckpt} is at step {step}, but --steps is {args.steps}: a resume cannot go back. "
                       f"Give --steps {step} or more to continue training, or use {out / result_name} "
                       "if that run finished")


def _teacher_sampler(text: str) -> str:
    """--teacher-sampler: a deterministic sampler of :mod:`noisecraft.solvers` (the message names them)."""
    from .solvers import check_sampler

    try:
        return check_sampler(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """The training prompts of --prompts FILE and its --prompts-format / --prompt-* flags (noisecraft.prompts)."""
    return read_prompt_flags(args)


def _check_toy_prompts(args: argparse.Namespace) -> None:
    """--toy trains on its 10 class labels: a prompt file would be ignored, so it is refused."""
    if args.toy and args.prompts:
        raise Refused(f"--prompts {args.prompts}: the toy model's prompts are its 10 class labels: leave --prompts "
                      "out with --toy, or give --model DIR to train on your prompts")


def _check_channels(shape, host) -> None:
    want = getattr(getattr(host.unet, "config", None), "in_channels", None)
    if want is not None and int(shape[0]) != int(want):
        raise Refused(f"--latent-shape {' '.join(str(v) for v in shape)}: the model takes {want}-channel latents, "
                       f"got C = {shape[0]}: give --latent-shape {want} H W (or leave it out for the model's own size)")


# -- train-refiner --------------------------------------------------------------------------------


def _train_refiner(args: argparse.Namespace) -> int:
    import torch

    from .train.loop import make_accelerator

    log = logging.getLogger("noisecraft.train-refiner")
    if args.toy == bool(args.model):
        sys.stderr.write("noisecraft train-refiner: give either --toy or --model DIR (a local diffusers folder)\n")
        return 2
    _check_toy_prompts(args)
    comfy = open_comfy_cache(args)  # --cache built in ComfyUI: its teacher flags (noisecraft/cli_cache.py)
    if comfy is None and args.seed_base is None:
        args.seed_base = SEED_BASE_DEFAULT
    check_preset(args, log)  # --preset fills the flags not given (noisecraft/presets.py)
    if comfy is not None:
        adopt_comfy_cache(args, comfy, log)  # (and its seed base)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # several processes (accelerate launch): the Accelerator joins the launcher's group (gloo for the toy
    # model, which trains on CPU; nccl for a --model on CUDA, each process on cuda:LOCAL_RANK)
    on_cpu = bool(args.toy) or torch.device(device).type == "cpu"
    try:
        acc = make_accelerator(cpu=on_cpu)
    except (RuntimeError, ValueError, KeyError) as exc:
        sys.stderr.write(f"noisecraft train-refiner: could not join the launcher's processes ({exc}): start several "
                         "processes with `accelerate launch`, or unset WORLD_SIZE for a single process\n")
        return 2
    if acc.num_processes > 1 and not on_cpu and torch.device(device).index is None:
        device = str(acc.device)
    try:
        with one_writer(check_out(args.out), "--out", acc):
            return _train_refiner_run(args, device, acc, log, comfy)
    finally:
        if acc.num_processes > 1:
            acc.end_training()  # leaves the process group


def _refiner_teacher(args: argparse.Namespace, host, cfg_scale: float):
    """train-refiner's teacher: ``(guided_denoiser_for, cache meta)``: CFG, or with ``--pag-scale`` > 0 CFG + PAG
    (:mod:`noisecraft.hosts.pag`) on ``--pag-layers``, checked against the model before any work."""
    if not args.pag_scale:
        if args.pag_layers:
            raise Refused("--pag-layers chooses the layers PAG perturbs: give --pag-scale S (> 0, the paper's teacher "
                          "uses 3) with it, or leave --pag-layers out for the CFG teacher")
        return (lambda c: host.denoiser(c, cfg=cfg_scale)), {"guidance": "cfg"}
    from .hosts.pag import PAGDenoiser, default_pag_layers, pag_modules

    layers = list(args.pag_layers) if args.pag_layers else default_pag_layers(host.unet)
    pag_modules(host.unet, layers)  # a layer that matches no self-attention is refused here, with the layers that exist
    scale = float(args.pag_scale)
    meta = {"guidance": "cfg+pag", "pag_scale": scale, "pag_layers": layers}
    return (lambda c: PAGDenoiser(host.denoiser(c, cfg=cfg_scale), scale, layers)), meta


def _guidance_teacher(args: argparse.Namespace, host):
    """train-refiner --guidance-range LO HI: the teacher guides each sample with its own CFG scale
    (:mod:`noisecraft.guidance_embed`; the refiner learns the scale as an input)."""
    from .guidance_embed import check_guidance_range
    from .train.teacher_cache import per_sample_teacher

    if args.cfg is not None or args.pag_scale:
        raise Refused("--guidance-range LO HI draws each teacher's CFG scale from LO..HI: leave out --cfg and "
                      "--pag-scale with it (PAG teachers take one scale)")
    try:
        lo, hi = check_guidance_range(args.guidance_range, "--guidance-range")
    except ValueError as exc:
        raise Refused(str(exc)) from None
    return per_sample_teacher(host), {"guidance": "cfg, one scale per sample", "cfg": [lo, hi]}


def _train_refiner_run(args: argparse.Namespace, device: str, acc, log: logging.Logger, comfy=None) -> int:
    from .sigmas import get_sigmas
    from .hosts.toy import toy_host
    from .train import RefinerTrainConfig, TeacherCache, build_teacher_cache, train_refiner
    from .train.teacher_filter import check_run_filter

    if args.batch % acc.num_processes:
        sys.stderr.write(f"noisecraft train-refiner: --batch {args.batch} is the global batch and must divide evenly "
                         f"over the {acc.num_processes} processes\n")
        return 2
    if not acc.is_main_process:
        log.setLevel(logging.WARNING)  # one process reports
    _check_scheduler(args.scheduler)
    out = check_out(args.out)
    cache_dir = check_out(args.cache, "--cache") if args.cache else out / "teacher_cache"
    _check_resume(out, args, "refiner.safetensors")
    try:
        scorer = teacher_scorer(args)  # --keep / --scorer refused before the model loads
        if args.toy:
            host = toy_host()
            cfg_scale = 3.0 if args.cfg is None else args.cfg
        elif comfy is not None:  # the prompts and the teacher are the cache's
            host = _model_host(args, comfy.prompts, device, lazy=True)
            cfg_scale = 1.0 if args.cfg is None else args.cfg
        else:
            if not args.prompts:
                sys.stderr.write("noisecraft train-refiner: --model needs --prompts FILE (one prompt per line)\n")
                return 2
            prompts = _read_prompts(args)
            host = _model_host(args, prompts, device, lazy=True)
            cfg_scale = 7.0 if args.cfg is None else args.cfg
        teacher, teacher_meta = _refiner_teacher(args, host, cfg_scale)
        if args.guidance_range is not None:
            teacher, teacher_meta = _guidance_teacher(args, host)
    except (ImportError, FileNotFoundError, ValueError, OSError) as exc:
        sys.stderr.write(f"noisecraft train-refiner: {exc}\n")
        return 2
    if comfy is not None:
        check_model_fits(comfy, host, comfy.cache.shape, args)
    shape = _latent_shape(args, host)
    _check_cache_kind(cache_dir, host, args)
    t0 = time.perf_counter()
    cache_progress = every_5s(log, "teacher cache: %d / %d samples")

    try:
        if comfy is None and getattr(host, "encoder", None) is not None:
            _cache_conds(host, cache_dir, acc, log)

        def build(shards=None):
            return build_teacher_cache(
                cache_dir, teacher, shape=shape,
                conds=host.cond_labels or list(range(host.conds.shape[0])), total=args.samples,
                sigmas=get_sigmas(host.table, args.scheduler, args.teacher_steps), kind=host.table.kind.value,
                base_seed=args.seed_base, meta={"model": host.base_model, "cfg": cfg_scale,
                                                "scheduler": args.scheduler, **teacher_meta},
                shard_size=args.shard_size, batch_size=args.batch, progress=cache_progress, shards=shards,
                guidance_range=args.guidance_range, sampler=args.teacher_sampler)

        if comfy is not None:  # complete: read as it is, by every process
            cache = use_comfy_cache(comfy, host)
        elif acc.num_processes > 1:
            # the main process defines the cache, every process samples its share of the shards, the main
            # process indexes them; the main process holds the cache's one-writer lock throughout
            with one_writer(cache_dir, "teacher cache", acc):
                if acc.is_main_process:
                    cache = build(shards=[])
                    TeacherCache.clean_temps(cache_dir)  # stale temps of a killed run (the others wait)
                acc.wait_for_everyone()
                num_shards = TeacherCache(cache_dir).num_shards
                build(shards=list(range(acc.process_index, num_shards, acc.num_processes)))
                acc.wait_for_everyone()
                if acc.is_main_process:
                    TeacherCache(cache_dir).reindex()
                acc.wait_for_everyone()
            cache = TeacherCache(cache_dir)
        else:
            cache = build()
        log.info("teacher cache ready: %s (%d samples, %.0f s)", cache.root, cache.total, time.perf_counter() - t0)
        cache = filter_teacher(args, cache, scorer, device, acc, log)
        check_run_filter(out, cache, resume=args.resume, write=acc.is_main_process)
        config = RefinerTrainConfig(
            steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr, batch_size=args.batch,
            grad_accum=args.grad_accum, student_steps=args.student_steps, scheduler=args.scheduler,
            precision=args.precision, seed=args.seed, checkpoint_every=args.checkpoint_every,
            warmup=args.warmup, lr_schedule=args.lr_schedule, targets=tuple(host.targets),
            gradient_checkpointing=args.gradient_checkpointing,
            guidance_range=tuple(args.guidance_range) if args.guidance_range is not None else None)
        progress = every_10_steps(log, "step %d/%d  loss %.5f  residual rms %.4f  %.0f s", "residual_rms")
        validation = validation_for(args, host, lambda h: _refiner_teacher(args, h, cfg_scale)[0], shape, out, device,
                                    acc, log)  # held-out validation, trackers (noisecraft/cli_validation.py)
        result = train_refiner(host, cache, out, config, resume=args.resume, progress=progress, accelerator=acc,
                               validation=validation)
    except KeyboardInterrupt:
        return interrupted_resume("train-refiner", out)
    result.lora.remove()
    if not acc.is_main_process:
        return 0
    sys.stdout.write(f"{result.refiner_path}\n")
    sys.stdout.write(f"({result.step} steps, final loss {result.losses[-1]:.5f}; loss log {out / 'loss.jsonl'}, "
                     f"plot {out / 'loss.png'}, {time.perf_counter() - t0:.0f} s in all)\n")
    sys.stdout.write(validation_line(validation, out))
    return 0


def _model_host(args: argparse.Namespace, prompts: list[str], device: str, lazy: bool = False):
    """The --model host (a diffusers folder, or a single-file FILE with --config DIR or, without it, the configs
    diffusers infers from its keys: noisecraft.hosts.single_file; every family of noisecraft.hosts.families),
    its SDXL time ids from --latent-shape when given; ``lazy``: the prompts are encoded later, a chunk at a
    time, into the teacher cache (:func:`_cache_conds`)."""
    import torch

    from .hosts.diffusers import diffusers_host
    from .hosts.single_file import single_file_config

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[getattr(args, "weights_dtype", "fp32")]  # train-refiner's --weights-dtype

    def host(config):
        return diffusers_host(args.model, prompts, prompt_embeds=args.prompt_embeds, negative_prompt=args.negative,
                              device=device, dtype=dtype, config=config, latent_shape=args.latent_shape,
                              encode_now=not lazy)

    if args.config is not None or not Path(args.model).is_file():
        return host(args.config)
    # the config folder (a temporary copy where the file changes the scheduler) lives as long as the command: a
    # lazy host encodes the prompts from it later
    stack = contextlib.ExitStack()
    atexit.register(stack.close)
    _, config = stack.enter_context(single_file_config(args.model))
    return host(config)


def _cache_conds(host, cache_dir: Path, acc, log: logging.Logger) -> None:
    """train-refiner --model: the prompt encodings live in the cache folder (encoded a chunk at a time by the
    main process, under the cache's lock, unless complete), and every process reads a batch's rows from there."""
    from .hosts.diffusers import _module_device_dtype
    from .hosts.families import keep_text_encoders
    from .train.cond_store import CondStore, conds_for

    if acc.is_main_process:
        with keep_text_encoders():
            conds_for(cache_dir, host.cond_labels, host.encoder, dtype=_module_device_dtype(host.unet)[1],
                      progress=every_5s(log, "prompt encodings: %d / %d prompts"))
    acc.wait_for_everyone()
    host.use_conds(CondStore(cache_dir))


def _latent_shape(args: argparse.Namespace, host) -> tuple:
    """--latent-shape, else the network's in_channels x sample_size^2; checked against the network."""
    shape = tuple(int(v) for v in (args.latent_shape or ()))
    if not shape:
        size = int(host.unet.config.sample_size)
        shape = (int(host.unet.config.in_channels), size, size)
    _check_channels(shape, host)
    return shape


_KIND_NAMES = {"eps": "eps-prediction", "v": "v-prediction", "flow": "flow-matching"}


def _check_cache_kind(cache_dir: Path, host, args: argparse.Namespace) -> None:
    """Before any work: an existing --cache must come from a model of this host's kind (eps, v, flow)."""
    from .train import TeacherCache
    from .train.shards import INDEX_NAME

    if not (cache_dir / INDEX_NAME).is_file():
        return
    made = TeacherCache(cache_dir).meta.get("kind")
    kind = host.table.kind.value
    if made not in (None, kind):
        raise Refused(f"--cache {cache_dir}: this teacher cache was made with a model of kind "
                      f"{_KIND_NAMES.get(made, made)} ({made}), but {args.model or 'the toy model'} is of kind "
                      f"{_KIND_NAMES.get(kind, kind)} ({kind}): "
                      f"a refiner learns from its own model's teacher; give another --cache folder (or leave --cache "
                      f"out to build one in {Path(args.out) / 'teacher_cache'})")


def _host_from_args(args: argparse.Namespace, name: str):
    """(host, shape) for --toy or --model; raises ValueError / FileNotFoundError / ImportError."""
    import torch

    from .hosts.toy import toy_host

    if args.toy == bool(args.model):
        raise ValueError("give either --toy or --model DIR (a local diffusers folder)")
    _check_toy_prompts(args)
    if args.toy:
        host = toy_host()
    else:
        if not args.prompts:
            raise ValueError("--model needs --prompts FILE (one prompt per line)")
        prompts = _read_prompts(args)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        host = _model_host(args, prompts, device)
    return host, _latent_shape(args, host)


def _collect_pairs(args: argparse.Namespace) -> int:
    log = logging.getLogger("noisecraft.collect-pairs")
    _check_scheduler(args.scheduler)
    with one_writer(check_out(args.out), "--out"):
        return _collect_pairs_run(args, log)


def _collect_pairs_run(args: argparse.Namespace, log: logging.Logger) -> int:
    from .hosts.toy import toy_confidence_scorer
    from .train import collect_pairs

    try:
        host, shape = _host_from_args(args, "collect-pairs")
        if args.filter == "toy-classifier" and not args.toy:
            raise ValueError("--filter toy-classifier scores toy digits: use it with --toy (or --filter none)")
        scorer = toy_confidence_scorer() if args.filter == "toy-classifier" else None
        w_l = args.w_l if args.w_l is not None else (3.0 if args.toy else 5.5)
        t0 = time.perf_counter()
        progress = every_5s(log, "pairs: %d / %d")

        store = collect_pairs(args.out, host, total=args.pairs, w_l=w_l, w_w=args.w_w, steps=args.steps,
                              scheduler=args.scheduler, base_seed=args.seed_base, scorer=scorer, margin=args.margin,
                              shard_size=args.shard_size, batch_size=args.batch, progress=progress, shape=shape)
    except KeyboardInterrupt:
        sys.stderr.write(f"noisecraft collect-pairs: interrupted; run the same command again to finish {args.out}\n")
        return 130
    kept = int(store.column("kept").sum())
    sys.stdout.write(f"{store.root}\n({store.total} pairs, {kept} kept, w_l {w_l:g}, w_w {args.w_w:g}, "
                     f"{time.perf_counter() - t0:.0f} s)\n")
    return 0


def _train_npnet(args: argparse.Namespace) -> int:
    from .train.loop import make_accelerator

    log = logging.getLogger("noisecraft.train-npnet")
    out = check_out(args.out)
    _check_resume(out, args, "npnet.safetensors")
    device = args.device or "cpu"
    # under accelerate launch: data parallel (gloo on CPU); the SVD branch's unused BatchNorm needs DDP's search
    acc = make_accelerator(cpu=device == "cpu", find_unused_parameters=True)
    if not acc.is_main_process:
        log.setLevel(logging.WARNING)  # one process reports
    if acc.num_processes > 1 and device.startswith("cuda") and ":" not in device:
        device = str(acc.device)
    with one_writer(out, "--out", acc):
        return _train_npnet_run(args, out, device, acc, log)


def _train_npnet_run(args: argparse.Namespace, out: Path, device: str, acc, log: logging.Logger) -> int:
    from .train import NPNetTrainConfig, PairStore, npnet_config_for, train_npnet
    from .train.npnet import SMALL_NPNET

    try:
        pairs = PairStore(args.pairs)
        arch = args.arch or ("small" if pairs.shape[-1] <= 32 else "official")
        npnet_config = npnet_config_for(pairs, **(SMALL_NPNET if arch == "small" else {}))
        config = NPNetTrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch, lr_schedule=args.lr_schedule,
                                  warmup=args.warmup, weight_decay=args.weight_decay, margin=args.margin,
                                  seed=args.seed, init_seed=args.init_seed, checkpoint_every=args.checkpoint_every)
        t0 = time.perf_counter()
        progress = every_10_steps(log, "step %d/%d  loss %.5f  (identity %.5f)  %.0f s", "identity_mse")
        result = train_npnet(pairs, out, config, npnet_config, resume=args.resume, progress=progress,
                             device=device, metadata={"arch": arch}, accelerator=acc)
    except KeyboardInterrupt:
        return interrupted_resume("train-npnet", out)
    if not acc.is_main_process:
        return 0
    sys.stdout.write(f"{result.npnet_path}\n({result.step} steps, {arch} NPNet, final loss {result.losses[-1]:.5f}; "
                     f"loss log {out / 'loss.jsonl'}, plot {out / 'loss.png'}, {time.perf_counter() - t0:.0f} s)\n")
    return 0


def _add_model_args(parser: argparse.ArgumentParser, model_help: str, embeds_help: str, negative_help: str) -> None:
    """The "model" option group of train-refiner and collect-pairs (--toy or --model and its prompts)."""
    src = parser.add_argument_group("model")
    src.add_argument("--toy", action="store_true", help="the shipped toy digits model (the 10 class labels are the prompts)")
    src.add_argument("--model", help=model_help)
    src.add_argument("--config", help="with a single-file --model FILE.safetensors: the diffusers folder its configs "
                                      "(unet/ or transformer/, scheduler/, tokenizers; text encoders unless the file "
                                      "has them) come from. Default: the Hugging Face repo diffusers' from_single_file "
                                      "infers from the file's keys (SD1.x, SD2.x, SDXL, SD3), from the Hub cache or "
                                      "the Hub; needed with HF_HUB_OFFLINE=1 or without the Hub")
    add_prompt_args(src)
    src.add_argument("--prompt-embeds", help=embeds_help)
    src.add_argument("--negative", default="", help=negative_help)
    src.add_argument("--latent-shape", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                     help="latent size (default: the network's in_channels x sample_size^2; SDXL's time ids are "
                          "this size times the VAE scale factor)")
    src.add_argument("--device", help="cpu or cuda (default: cuda when available)")



def add_train_commands(sub) -> None:
    """Add train-refiner, collect-pairs and train-npnet to the ``sub`` parsers of the command line."""
    tr = sub.add_parser(
        "train-refiner", help="train a NoiseRefine refiner LoRA (MSD) on the toy model or a local diffusers model",
        description="Build a teacher cache (guided sampling, paid once; a killed build resumes) and train a refiner "
                    "LoRA with multistep score distillation. Writes refiner.safetensors (a kohya LoRA that ComfyUI's "
                    "LoRA loader reads), checkpoint.safetensors, loss.jsonl and loss.png into --out.")
    _add_model_args(tr, "a local diffusers folder of SD1.x, SD2.x (eps or v), SDXL or an SD3-class transformer "
                        "(unet/ or transformer/, scheduler/, and the tokenizers + text encoders unless "
                        "--prompt-embeds is given), or a single-file checkpoint with --config DIR",
                    "safetensors with 'cond' [P, L, D] and 'uncond' [1, L, D]; SDXL/SD3 also 'pooled' [P, W] and "
                    "'uncond_pooled' [1, W], SDXL optionally 'time_ids' [1, 6] (no text encoder or transformers "
                    "needed)",
                    "the unconditional prompt for the teacher's CFG (default empty)")
    tr.add_argument("--out", default="refiner_out", help="output folder (default refiner_out)")
    tr.add_argument("--cache", help="teacher cache folder (default <out>/teacher_cache); may be shared between runs. "
                                    "A cache ComfyUI's Build Teacher Cache wrote (output/noisecraft_caches/<name>) "
                                    "trains as it is: its prompts and teacher settings (--prompts not needed; a "
                                    "teacher flag given with another value is refused)")
    tr.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.safetensors")
    tr.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default 300)")
    tr.add_argument("--rank", type=positive_int, default=4,
                    help="LoRA rank (default 4; the paper uses 128 on SD2.1, 256 on SDXL)")
    tr.add_argument("--alpha", type=positive_float, help="LoRA alpha (default = rank)")
    tr.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    tr.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    tr.add_argument("--warmup", type=non_negative_int, default=10)
    tr.add_argument("--batch", type=positive_int, default=32,
                    help="samples per micro-batch over all processes (default 32; under accelerate launch / "
                         "torchrun each of N processes takes batch/N)")
    tr.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    tr.add_argument("--student-steps", type=positive_int, default=10, help="N, unguided student steps (default 10)")
    tr.add_argument("--teacher-steps", type=positive_int, default=20, help="N', guided teacher steps (default 20)")
    tr.add_argument("--teacher-sampler", type=_teacher_sampler, default="euler",
                    help="the teacher's deterministic sampler: euler (= DDIM, the paper's; default), heun or dpmpp_2m "
                         "(ancestral/SDE samplers are refused: the teacher must be a function of its noise)")
    tr.add_argument("--cfg", type=finite_float, help="teacher CFG scale (default 3 for --toy, 7 otherwise)")
    tr.add_argument("--guidance-range", type=non_negative_float, nargs=2, metavar=("LO", "HI"),
                    help="guidance-scale control: each teacher sample gets its own CFG scale in LO..HI and the refiner "
                         "takes the scale as an input (Refine Noise's guidance); excludes --cfg (default: off, one "
                         "scale)")
    tr.add_argument("--pag-scale", type=non_negative_float, default=0.0,
                    help="teacher perturbed-attention guidance (PAG) scale on top of CFG (default 0: CFG only; the "
                         "paper's teacher is --cfg 7 --pag-scale 3)")
    tr.add_argument("--pag-layers", nargs="+", metavar="LAYER",
                    help="self-attention layers PAG perturbs, as diffusers' pag_applied_layers (regular expressions "
                         "searched in the module names, e.g. mid, down_blocks.1, 'up_blocks.(0|1)'; default mid for "
                         "a UNet, blocks.1 for an SD3 transformer)")
    tr.add_argument("--scheduler", default="normal",
                    help="sigma schedule: normal, karras, exponential, sgm_uniform, simple or ddim_uniform (default normal)")
    tr.add_argument("--samples", type=positive_int, default=1024, help="teacher-cache size (default 1024)")
    tr.add_argument("--shard-size", type=positive_int, default=256)
    tr.add_argument("--seed-base", type=non_negative_int, help="sample i starts from seed seed_base + i (default 10000)")
    tr.add_argument("--seed", type=non_negative_int, default=0, help="data-order seed")
    tr.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="autocast: auto = fp32 on CPU, bf16 (else fp16) on CUDA")
    tr.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute the refiner pass's activations in backward (less memory, ~1 more forward per "
                         "step; same gradients): for SDXL at rank 256")
    tr.add_argument("--weights-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="dtype the frozen --model network is loaded in (default fp32; bf16 halves its memory: with "
                         "--precision bf16 for SDXL on 24 GB); the LoRA and AdamW state stay fp32")
    tr.add_argument("--checkpoint-every", type=positive_int, default=50)
    tr.add_argument("--keep", type=keep_value, metavar="N|FRACTION",
                    help="teacher filter: train on the top N samples of the cache (or that fraction of --samples) by "
                         "--scorer (the paper keeps the top N by an aesthetic score); default: every sample")
    tr.add_argument("--scorer", metavar="NAME|MODULE:FUNCTION",
                    help="teacher filter scorer: toy-classifier (--toy; the default there), aesthetic (the paper's LAION "
                         "score; weights in $NOISECRAFT_AESTHETIC), sharpness or colorfulness (generic, not aesthetic), "
                         "or package.module:function, a function "
                         "score(images [n,3,H,W] in [0,1], cond_ids [n]) -> [n] (higher is better); images are "
                         "decoded with the --model folder's vae/ (without one, and for --toy, it gets the latents)")
    add_validation_args(tr)  # --validate-every, --report-to, --preset, ... (noisecraft/cli_validation.py)
    tr.set_defaults(func=_train_refiner)
    cp = sub.add_parser(
        "collect-pairs", help="collect NPNet training pairs (re-denoise sampling) on the toy or a local diffusers model",
        description="Re-denoise sampling (Zhou et al., arXiv:2411.09502, Alg. 1): for each seed and prompt, one "
                    "denoising step at CFG w_l and one inversion step at CFG w_w give the target noise; optionally "
                    "kept only when a scorer prefers the image from the target noise. Writes safetensors shards and "
                    "index.json into --out; running the same command again finishes a killed collection.")
    _add_model_args(cp, "a local diffusers folder (SD1.x, SD2.x, SDXL or SD3-class, as for train-refiner), or a "
                        "single-file checkpoint with --config DIR",
                    "safetensors with 'cond' [P, L, D] and 'uncond' [1, L, D] (SDXL/SD3: also 'pooled', "
                    "'uncond_pooled', as for train-refiner)",
                    "the unconditional prompt for CFG (default empty)")
    cp.add_argument("--out", default="npnet_pairs", help="pair folder (default npnet_pairs)")
    cp.add_argument("--pairs", type=positive_int, default=1024, help="number of pairs (default 1024)")
    cp.add_argument("--w-l", type=finite_float, help="CFG of the denoising step (default 3 for --toy, 5.5 otherwise: the paper's SDXL value)")
    cp.add_argument("--w-w", type=finite_float, default=1.0, help="CFG of the inversion step (default 1, the paper's)")
    cp.add_argument("--steps", type=two_or_more_int, default=10, help="collection schedule steps (default 10, the paper's)")
    cp.add_argument("--scheduler", default="normal",
                    help="sigma schedule: normal, karras, exponential, sgm_uniform, simple or ddim_uniform (default normal)")
    cp.add_argument("--filter", choices=["none", "toy-classifier"], default="none",
                    help="keep-filter: none keeps every pair; toy-classifier (with --toy) keeps a pair when the digit "
                         "classifier is more confident on the sample from the target noise")
    cp.add_argument("--margin", type=margin_float, default=0.0, help="filter threshold m in [-1, 1): keep when score' > score + m (default 0)")
    cp.add_argument("--seed-base", type=non_negative_int, default=20_000, help="pair i starts from seed seed_base + i")
    cp.add_argument("--shard-size", type=positive_int, default=256)
    cp.add_argument("--batch", type=positive_int, default=64, help="samples per model batch (default 64)")
    cp.set_defaults(func=_collect_pairs)
    tn = sub.add_parser(
        "train-npnet", help="train an NPNet (golden noise) on a folder of collected pairs",
        description="MSE between NPNet(x_T, prompt) and the target noise, AdamW, one prompt per pair. Writes "
                    "npnet.safetensors (loads in the Load NPNet node), checkpoint.safetensors, loss.jsonl and "
                    "loss.png into --out.")
    tn.add_argument("--pairs", required=True, help="the folder collect-pairs wrote")
    tn.add_argument("--out", default="npnet_out", help="output folder (default npnet_out)")
    tn.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.safetensors")
    tn.add_argument("--arch", choices=["official", "small"],
                    help="official: Swin-T at 224 and the official SVD widths (28M parameters); small: a 2-stage Swin "
                         "at 32 (the toy NPNet's). Default: small for latents up to 32x32, else official")
    tn.add_argument("--steps", type=positive_int, default=600, help="optimizer steps (default 600)")
    tn.add_argument("--lr", type=positive_float, default=1e-3)
    tn.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    tn.add_argument("--warmup", type=non_negative_int, default=20)
    tn.add_argument("--weight-decay", type=non_negative_float, default=0.01)
    tn.add_argument("--batch", type=positive_int, default=64, help="pairs per step (default 64, the paper's)")
    tn.add_argument("--margin", type=finite_float, help="re-filter the pairs by score margin (default: the stored kept flags)")
    tn.add_argument("--seed", type=non_negative_int, default=0, help="data-order seed")
    tn.add_argument("--init-seed", type=non_negative_int, default=0, help="weight-init seed")
    tn.add_argument("--checkpoint-every", type=positive_int, default=100)
    tn.add_argument("--device", help="cpu or cuda (default cpu)")
    tn.set_defaults(func=_train_npnet)
