"""NPNet training as ComfyUI nodes: collect re-denoise pairs, train an NPNet, save it.

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie, "Golden Noise for
Diffusion Models: A Learning Framework" (arXiv:2411.09502), Sec. 3.1-3.2, Alg. 1-2, App. A.5.
Everything but the ComfyUI plumbing is the core's, written once: the re-denoise step
(:func:`noisecraft.train.npnet_pairs.re_denoise`), the pair store
(:class:`noisecraft.train.PairStore`), the NPNet shape rule (:func:`noisecraft.train.npnet_config_for`)
and the training (:func:`noisecraft.train.train_npnet`: the NPNet method in the one loop,
:mod:`noisecraft.train.loop`). These nodes run them inside ComfyUI: the model through
:func:`nodes.bridge.run_core` (so LoRAs and patches on the MODEL apply), the training on ComfyUI's
torch device with its progress bar and Cancel button.

Choices where the issue was silent:

* Pairs (``NPNET_PAIRS``) are a :class:`~noisecraft.train.PairStore` held in memory
  (:meth:`PairStore.in_memory`: the CLI's definition, shard checks and batch interface, no folder);
  a graph run collects and trains in one go, and a graph re-run after a restart collects the same
  pairs again (same seed, same model). For large datasets, resumable collection and the classifier
  keep-filter use the CLI (``python -m noisecraft collect-pairs / train-npnet``). The node keeps
  every pair (no keep-filter: scoring needs a reward model the graph does not have).
* Noise: pair ``i`` starts from ``seeded_noise(seed + i, [1, C, H, W])``, the store's convention
  (``PairStore.sample_noise``), so the same seed gives the same pairs as the CLI.
* Prompts: the positive CONDITIONING's first entry (``cond[0][0]``; further entries are ignored
  as in NPNet Golden Noise). A batch of P prompts (a batch of texts) gives ``count`` pairs per
  prompt, pair ``i`` with prompt ``i % P`` (the store's condition rule); the negative is shared.
  Prompts longer than 77 tokens are truncated to their first 77 (the golden-noise node's default).
* Latent: only its shape is used (square; channels from the model). The schedule is ComfyUI's
  (``scheduler``, ``steps``); the re-denoise step is its first step, as in the CLI.
* Network: fine-tunes the NPNET given (a copy; the input is unchanged; it must fit the pairs'
  channels, latent size, tokens and text width), else a new one, identity-initialised from
  ``seed``, sized from the pairs by ``npnet_config_for`` with ``size`` = ``official`` (Swin-T, the
  paper's) or ``small`` (the core's ``SMALL_NPNET``, ~0.1M parameters; for small latents and CPU).
* Training: ``train_npnet`` with the node's settings; the defaults are what the node always did
  (AdamW, weight decay 0.01, constant lr without warm-up, clipping at 1, float32), ``seed`` seeds
  both the new net and the data order. The data order is the store's (an epoch's tail that does
  not fill a batch is skipped); a ``batch_size`` above the number of pairs trains on all pairs
  per step, as before. It runs under ``torch.inference_mode(False)`` (ComfyUI runs prompts in
  inference mode); the store hands out plain tensors.
* Run folder: with ``resume_from`` = NAME the run lives in ``output/noisecraft_runs/NAME``
  (checkpoint every 100 steps, on Cancel and at the end; ``loss.jsonl``, ``loss.png`` and
  ``npnet.safetensors``), and a run of the same graph continues from its checkpoint: after a Cancel,
  a crash or a killed process, with more ``steps`` to train further. Other settings than the
  checkpoint's are refused. Empty (default): a temporary folder under ComfyUI's temp folder, removed
  after the run (nothing to resume, as before).
* Progress and Cancel: every step updates a ``comfy.utils.ProgressBar``; Cancel (the engine's
  ``interrupt`` callback reads ``comfy.model_management.processing_interrupted()``, and the server's
  progress hook) stops before the next step with a checkpoint, then ComfyUI's
  ``InterruptProcessingException`` is raised. The loss history goes to the UI (``noisecraft_history``).
* Saving: ``models/npnet/<filename>.safetensors`` (the first ``npnet`` folder), so Load NPNet lists
  it after a refresh; written with the core's one NPNet writer, ``save_npnet_safetensors``, which
  writes atomically through :func:`noisecraft.io.write_safetensors` (a temporary name, renamed).
  Names (:func:`nodes.common.save_path`): with ``overwrite`` on, the plain
  ``<filename>.safetensors`` is written, replacing a file of that name; with it off (default) the
  plain name is used while it is free, as before, and an existing file is kept: the new one is
  numbered the way ComfyUI's own savers number theirs, ``<filename>_<counter:05>_.safetensors``
  (the counter one past the highest in the folder). The filename is refused (not sanitized) when
  it is empty, too long or has a folder part (:func:`nodes.common.check_save_name`), so nothing is
  written outside models/npnet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.utils
import folder_paths

from ..noisecraft.npnet import NPNet, fit_prompt, save_npnet_safetensors
from ..noisecraft.train.loop import resolve_precision
from ..noisecraft.train.npnet import SMALL_NPNET, NPNetTrainConfig, npnet_config_for, train_npnet
from ..noisecraft.train.npnet_pairs import PairStore, re_denoise
from . import bridge
from .common import (RUNS_FOLDER, SEED_MASK, check_combo, check_int, check_number, file_list_changed, node_id,
                     prompt_embedding, run_folder as common_run_folder, sampling_inputs, save_path,
                     scheduler_input, seed_input)
from .nodes_npnet import FOLDER, LOAD_NAME, LoadedNPNet, NPNetType, width_note

log = logging.getLogger(__name__)

CATEGORY = "noisecraft/npnet"
COLLECT_NAME = "Collect NPNet Pairs"
TRAIN_NAME = "Train NPNet"
SAVE_NAME = "Save NPNet"
SIZES = ["official", "small"]
PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
SCHEDULES = ["constant", "cosine"]
MAX_TOKENS = 77
CHECKPOINT_EVERY = 100

NPNetPairsType = io.Custom("NPNET_PAIRS")


def _positive_embeds(positive) -> torch.Tensor:
    """[P, tokens <= 77, width] prompt embeddings of the positive CONDITIONING (its first entry)."""
    emb = prompt_embedding(positive, COLLECT_NAME)
    if emb.shape[1] > MAX_TOKENS:
        emb = fit_prompt(emb, MAX_TOKENS, "truncate")
    return emb.detach().to("cpu", torch.float32)


def NPNetPairs(noise: torch.Tensor, target: torch.Tensor, embeds: torch.Tensor, cond: torch.Tensor,
               meta: Optional[dict] = None) -> PairStore:
    """An in-memory :class:`PairStore` of given pairs (pair ``i`` with prompt ``i % P``), as the node
    module's former ``NPNetPairs(noise, target, embeds, cond)`` took them."""
    n, p = int(noise.shape[0]), int(embeds.shape[0])
    if not torch.equal(torch.as_tensor(cond).long().reshape(-1), torch.arange(n) % p):
        raise ValueError(f"pair i must have prompt i % {p} (the store's rule), got {cond.tolist()}")
    store = PairStore.in_memory(shape=noise.shape[1:], conds=list(range(p)), embeds=embeds, base_seed=0, total=n,
                                meta=meta)
    nan = torch.full((n,), float("nan"))
    store.write_shard(0, noise, target, torch.ones(n, dtype=torch.bool), nan, nan)
    return store


# -- Collect NPNet Pairs ----------------------------------------------------------------------------

def collect(model, positive, negative, latent: dict, *, seed: int, count: int, w_l: float, w_w: float,
            steps: int, scheduler: str, batch_size: int, node_id: Optional[str] = None,
            require_gap: bool = True) -> PairStore:
    """``count`` re-denoise pairs per prompt of ``positive`` for ``model`` (see the module docstring).

    ``require_gap=False`` allows ``w_w >= w_l`` (diagnostics: w_w = w_l gives near-identity pairs); the
    node always requires ``w_w < w_l``.
    """
    count = check_int(COLLECT_NAME, "count", count, 1, hint="the number of pairs per prompt; 1 or more")
    batch_size = check_int(COLLECT_NAME, "batch_size", batch_size, 1, hint="pairs per model call; 1 or more")
    check_int(COLLECT_NAME, "steps", steps, 1, hint="the collection schedule's steps; at least 2, the paper uses 10")
    check_combo(COLLECT_NAME, "scheduler", scheduler, bridge.scheduler_names())
    w_l, w_w = float(w_l), float(w_w)
    if not (math.isfinite(w_l) and math.isfinite(w_w)):
        raise ValueError(f"{COLLECT_NAME}: w_l and w_w must be finite numbers, got {w_l} and {w_w}")
    if require_gap and w_w >= w_l:
        raise ValueError(
            f"{COLLECT_NAME}: w_w ({w_w}) must be smaller than w_l ({w_l}): the guidance gap w_l - w_w is what the "
            f"pairs teach NPNet (the paper: w_l 5.5, w_w 1.0 for SDXL). Lower w_w or raise w_l"
        )
    embeds = _positive_embeds(positive)
    bridge.check_conditioning(positive, "positive", COLLECT_NAME, model)
    bridge.check_conditioning(negative, "negative", COLLECT_NAME, model)
    lat = bridge.prepare_latent(model, latent, COLLECT_NAME)
    c, h, w = (int(s) for s in lat["samples"].shape[1:])
    if lat["samples"].ndim != 4 or h != w:
        raise ValueError(f"{COLLECT_NAME}: NPNet trains on square latents; the LATENT is {h}x{w} "
                         f"(shape {list(lat['samples'].shape)}): set the Empty Latent Image's width = height")
    sigmas = bridge.get_sigmas(model, scheduler, steps)
    if len(sigmas) < 3 or not 0 < float(sigmas[1]) < float(sigmas[0]):
        raise ValueError(f"{COLLECT_NAME}: the re-denoise step goes from sigmas[0] to sigmas[1] > 0; the "
                         f"{scheduler} schedule with {steps} steps gives {sigmas[:2].tolist()}: use 2 or more steps")
    kind = bridge.model_kind(model)
    p = int(embeds.shape[0])
    total = count * p
    meta = {"w_l": w_l, "w_w": w_w, "steps": int(steps), "scheduler": scheduler, "seed": int(seed),
            "kind": kind.value, "sigma_max": float(sigmas[0]), "sigma_next": float(sigmas[1]),
            "base_model": bridge.model_name(model), "count": count, "prompts": p}
    store = PairStore.in_memory(shape=(c, h, w), conds=list(range(p)), embeds=embeds, base_seed=int(seed),
                                total=total, meta=meta)
    noise = store.sample_noise(range(total))  # pair i: seeded_noise(seed + i), prompt i % P
    per_call = max(1, batch_size // p)  # candidates per call; a call holds per_call * P samples
    rounds = math.ceil(count / per_call)
    progress = bridge.Progress(rounds * 2, node_id=node_id)  # two denoiser calls per round

    def fn(ctx: bridge.BridgeContext):
        targets = []
        for r in range(rounds):
            # candidate-major: sample j * P + b is pair (start + j) * P + b, with prompt b
            e = noise[r * per_call * p: (r + 1) * per_call * p].to(ctx.device)
            targets.append(re_denoise(ctx.denoiser, ctx.inverse_denoiser, e, ctx.sigmas, ctx.kind).float().cpu())
        return torch.cat(targets)

    # the conditioning is prepared for a batch of P (one per prompt); ComfyUI tiles it to every call
    target = bridge.run_core(model, positive, negative, torch.zeros(p, c, h, w), fn, sigmas=sigmas, cfg=w_l,
                             inversion_cfg=w_w, seed=int(seed), progress=progress)
    nan = torch.full((total,), float("nan"))  # no keep-filter: every pair kept, no scores
    try:
        store.write_shard(0, noise, target, torch.ones(total, dtype=torch.bool), nan, nan)
    except FloatingPointError as e:
        raise ValueError(f"{COLLECT_NAME}: {e}: check the model (a NaN-producing patch or LoRA) and the "
                         f"conditioning") from None
    return store


class CollectNPNetPairs(io.ComfyNode):
    """MODEL + prompts -> NPNet training pairs by re-denoise sampling (paper Alg. 1, no keep-filter)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_CollectNPNetPairs",
            display_name=COLLECT_NAME,
            category=CATEGORY,
            description="Makes NPNet training pairs (Zhou et al., arXiv:2411.09502, Alg. 1) for any model: each "
            "noise takes one denoising step at CFG w_l and one inversion step back at CFG w_w; the result is the "
            "'golden' target. Every pair is kept. Feed Train NPNet.",
            inputs=[
                *sampling_inputs(
                    model="The model to make golden noise for (its LoRAs and patches apply). Always used.",
                    positive="The prompt(s) NPNet learns from; a batch of prompts gives count pairs per prompt. "
                    "NPNet reads this text embedding. Always used.",
                    negative="The negative prompt of the CFG steps (e.g. an empty prompt). Unused only where a cfg "
                    "is 1.",
                    latent="Only its size counts (square: width = height): the latent size NPNet is trained at, "
                    "e.g. 1024x1024 for SDXL. Always used.",
                ),
                seed_input("Pair i starts from the noise of seed + i (the CLI's convention). No value turns it off."),
                io.Int.Input("count", default=64, min=1, max=1_000_000,
                             tooltip="Pairs per prompt (the paper collects tens of thousands over many prompts). "
                             "Minimum 1; there is no off value."),
                io.Float.Input("w_l", default=5.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG of the denoising step (the paper: 5.5 for SDXL). Must be above w_w; "
                               "no value turns it off."),
                io.Float.Input("w_w", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG of the inversion step (the paper: 1.0), below w_l; the gap w_l - w_w "
                               "is what NPNet learns. Equal values would give near-identity pairs, so they are "
                               "refused."),
                io.Int.Input("steps", default=10, min=2, max=1000,
                             tooltip="Steps of the schedule the re-denoise step is the first step of (the paper: "
                             "10). No value turns it off."),
                scheduler_input("ComfyUI scheduler of that schedule (normal = the usual one). No value turns it off.",
                                bridge.scheduler_names()),
                io.Int.Input("batch_size", default=8, min=1, max=4096,
                             tooltip="Pairs per model call (memory vs. speed); does not change the pairs. No "
                             "value turns it off."),
            ],
            outputs=[NPNetPairsType.Output(display_name="pairs", tooltip="The pairs, in memory; connect Train NPNet.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, seed, count, w_l, w_w, steps, scheduler="normal",
                batch_size=8) -> io.NodeOutput:
        pairs = collect(model, positive, negative, latent, seed=seed, count=count, w_l=w_l, w_w=w_w, steps=steps,
                        scheduler=scheduler, batch_size=batch_size, node_id=node_id(cls))
        log.info("%s: %r, identity MSE %.6g", COLLECT_NAME, pairs, pairs.identity_mse())
        return io.NodeOutput(pairs)


# -- Train NPNet --------------------------------------------------------------------------------------

def _check_pairs(pairs) -> PairStore:
    if not isinstance(pairs, PairStore):
        raise ValueError(f"{TRAIN_NAME}: expected NPNET_PAIRS from {COLLECT_NAME}, got {type(pairs).__name__}")
    if not pairs.complete:
        raise ValueError(f"{TRAIN_NAME}: the pairs are incomplete ({len(pairs.missing_shards())} shards missing): "
                         f"run {COLLECT_NAME} again")
    return pairs


def _check_fits(net: NPNet, pairs: PairStore, name: str) -> None:
    cfg = net.config
    c, h, _ = pairs.shape
    _, tokens, width = pairs.embeds.shape
    if width != cfg.text_width:
        raise ValueError(
            f"{TRAIN_NAME}: the pairs' prompts are {width_note(int(width))}, but the NPNet {name} reads "
            f"{width_note(cfg.text_width)}. Fine-tune an NPNet made for this model's text encoder, or leave the "
            f"npnet input unconnected to train a new one"
        )
    if (c, h, int(tokens)) != (cfg.latent_channels, cfg.latent_size, cfg.tokens):
        raise ValueError(
            f"{TRAIN_NAME}: the NPNet {name} works on {cfg.latent_channels}x{cfg.latent_size}x{cfg.latent_size} "
            f"latents with {cfg.tokens}-token prompts, the pairs are {c}x{h}x{h} with {tokens} tokens. Collect the "
            f"pairs at the NPNet's latent size ({cfg.latent_size * 8}x{cfg.latent_size * 8} pixels for an 8x VAE), "
            f"or leave the npnet input unconnected to train a new one"
        )


def run_folder(resume_from) -> Optional[Path]:
    """``output/noisecraft_runs/<resume_from>`` (None when empty: no named run)."""
    return common_run_folder(resume_from, TRAIN_NAME, example="my_npnet_run")


@contextlib.contextmanager
def _out_dir(folder: Optional[Path]) -> Iterator[Path]:
    """The named run folder, or a temporary one under ComfyUI's temp folder (removed afterwards)."""
    if folder is not None:
        yield folder
        return
    parent = Path(folder_paths.get_temp_directory()) / RUNS_FOLDER
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="npnet_", dir=parent) as tmp:
        yield Path(tmp)


def _controls(steps: int, node: Optional[str]):
    """``progress`` (a ComfyUI progress bar) and ``interrupt`` (Cancel) callbacks for the training loop."""
    bar = comfy.utils.ProgressBar(steps, node_id=node)
    cancelled: list[int] = []

    def progress(step: int, total: int, record: dict) -> None:
        try:
            bar.update_absolute(step, total)
        except comfy.model_management.InterruptProcessingException:  # the server's hook saw Cancel
            cancelled.append(step)

    def interrupt() -> bool:
        return bool(cancelled) or comfy.model_management.processing_interrupted()

    return progress, interrupt


def train(pairs: PairStore, npnet: Optional[LoadedNPNet], *, steps: int, lr: float, batch_size: int, seed: int,
          size: str = "small", resume_from: str = "", precision: str = "fp32", lr_schedule: str = "constant",
          warmup: int = 0, max_grad_norm: float = 1.0, node_id: Optional[str] = None) -> tuple[NPNet, list[dict]]:
    """Train (a copy of) ``npnet`` or a new NPNet on ``pairs`` with the core's ``train_npnet``; returns the
    net (eval, CPU) and the loss log (resumed steps included)."""
    pairs = _check_pairs(pairs)
    steps = check_int(TRAIN_NAME, "steps", steps, 1, hint="optimizer steps; 1 or more")
    batch_size = check_int(TRAIN_NAME, "batch_size", batch_size, 1, hint="pairs per step; 1 or more")
    lr = float(lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{TRAIN_NAME}: lr must be a positive number (the paper-style default is 1e-4 to 1e-3), "
                         f"got {lr}")
    seed = check_int(TRAIN_NAME, "seed", seed, 0, SEED_MASK)
    check_combo(TRAIN_NAME, "precision", precision, PRECISIONS)
    check_combo(TRAIN_NAME, "lr_schedule", lr_schedule, SCHEDULES)
    warmup = check_int(TRAIN_NAME, "warmup", warmup, 0, hint="linear warm-up steps; 0 turns warm-up off")
    clip = check_number(TRAIN_NAME, "max_grad_norm", max_grad_norm, lo=0.0, hint="0 turns clipping off")
    folder = run_folder(resume_from)
    device = comfy.model_management.get_torch_device()
    try:
        resolve_precision(precision, device)
    except ValueError as e:
        raise ValueError(f"{TRAIN_NAME}: {e}") from None
    kept = int(pairs.kept_indices().numel())
    if batch_size > kept:  # as before: a step then sees every pair
        log.info("%s: batch_size %d > %d pairs: training on all %d pairs per step", TRAIN_NAME, batch_size, kept, kept)
        batch_size = kept
    if npnet is not None:
        if not isinstance(npnet, LoadedNPNet):
            raise ValueError(f"{TRAIN_NAME}: npnet: expected an NPNET from {LOAD_NAME} or {TRAIN_NAME}, got "
                             f"{type(npnet).__name__}")
        _check_fits(npnet.net, pairs, npnet.describe())
    else:
        check_combo(TRAIN_NAME, "size", size, SIZES)
    config = NPNetTrainConfig(steps=steps, lr=lr, batch_size=batch_size, warmup=warmup, lr_schedule=lr_schedule,
                              max_grad_norm=clip or None, precision=precision, seed=seed, init_seed=seed,
                              checkpoint_every=CHECKPOINT_EVERY if folder is not None else steps)
    progress, interrupt = _controls(steps, node_id)
    with torch.inference_mode(False), _out_dir(folder) as out:
        # built outside inference mode: plain tensors autograd may use
        initial = None
        if npnet is not None:  # a copy: the input NPNET stays as it is
            initial = NPNet(npnet.config, preset=npnet.preset)
            initial.load_state_dict({k: v.detach().clone() for k, v in npnet.net.state_dict().items()}, strict=True)
        shape = npnet.config if npnet is not None else npnet_config_for(pairs, **(SMALL_NPNET if size == "small"
                                                                               else {}))
        try:
            result = train_npnet(pairs, out, config, shape, resume=folder is not None, device=device,
                                 progress=progress, interrupt=interrupt, initial=initial,
                                 metadata={"source": npnet.describe() if npnet is not None else f"new ({size})"})
        except (ValueError, FileExistsError) as e:
            hint = f" (resume_from {resume_from.strip()!r}: give another name to start a new run)" if folder else ""
            raise ValueError(f"{TRAIN_NAME}: {e}{hint}") from None
        net = result.model.eval().to("cpu").requires_grad_(False)
    if result.interrupted:
        comfy.model_management.interrupt_current_processing(False)
        raise comfy.model_management.InterruptProcessingException()
    return net, result.records


class TrainNPNet(io.ComfyNode):
    """NPNET_PAIRS (+ an NPNet to fine-tune) -> a trained NPNET (paper Alg. 2)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_TrainNPNet",
            display_name=TRAIN_NAME,
            category=CATEGORY,
            description="Trains an NPNet (Zhou et al., arXiv:2411.09502, Alg. 2: MSE to the golden targets, AdamW, "
            "one prompt per pair) on pairs from Collect NPNet Pairs. Connect an NPNet to fine-tune it, or leave "
            "npnet empty for a new one sized from the pairs. Give resume_from a name to keep the run resumable. "
            "Feed NPNet Golden Noise or Save NPNet.",
            inputs=[
                NPNetPairsType.Input("pairs", tooltip="From Collect NPNet Pairs. Always used."),
                io.Int.Input("steps", default=200, min=1, max=1_000_000,
                             tooltip="Optimizer steps (in total, over resumes). Minimum 1; no value turns training "
                             "off."),
                io.Float.Input("lr", default=1e-3, min=1e-7, max=1.0, step=1e-5, round=1e-7,
                               tooltip="AdamW learning rate (1e-3 for a new net; lower, e.g. 1e-4, to fine-tune). "
                               "No value turns it off."),
                io.Int.Input("batch_size", default=16, min=1, max=4096,
                             tooltip="Pairs per step (the paper: 64); above the number of pairs, all pairs. No "
                             "value turns it off."),
                seed_input("Seed of the new net's weights and of the data order. No value turns it off.",
                           control_after_generate=None),
                io.Combo.Input("size", options=SIZES, default="official",
                               tooltip="Shape of a new NPNet: official (the paper's Swin-T branch, ~30M "
                               "parameters, slow on CPU) or small (~0.1M, for small latents and quick runs). "
                               "Ignored when an npnet is connected (that is the off setting)."),
                NPNetType.Input("npnet", optional=True,
                                tooltip="An NPNet to fine-tune (from Load NPNet); it must fit the pairs. Leave "
                                "unconnected (off) to train a new one."),
                io.String.Input("resume_from", default="", optional=True,
                                tooltip="A run folder name: the run is kept in output/noisecraft_runs/<name> "
                                "(checkpoints, loss log and plot) and a later run of the same graph continues "
                                "from its checkpoint, after a Cancel or a crash (raise steps to train further). "
                                "Empty (default) turns it off: a temporary run, nothing to resume."),
                io.Combo.Input("precision", options=PRECISIONS, default="fp32", optional=True,
                               tooltip="Arithmetic of the training steps: fp32 (default, as before), bf16 or fp16 "
                               "autocast (faster on GPUs; fp16 with loss scaling), auto (bf16 or fp16 on a GPU, fp32 "
                               "on the CPU). fp32 turns mixed precision off."),
                io.Combo.Input("lr_schedule", options=SCHEDULES, default="constant", optional=True,
                               tooltip="Learning rate after the warm-up: constant (default, as before) or cosine "
                               "(down to 10% of lr at the last step). constant turns the schedule off."),
                io.Int.Input("warmup", default=0, min=0, max=1_000_000, optional=True,
                             tooltip="Steps of linear learning-rate warm-up from lr / warmup to lr. 0 (default, as "
                             "before) turns it off."),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1e6, step=0.1, round=1e-4, optional=True,
                               tooltip="Clip the gradient norm of each step to this value (default 1, as before). "
                               "0 turns clipping off."),
            ],
            outputs=[NPNetType.Output(display_name="npnet", tooltip="The trained NPNet (in memory; Save NPNet "
                                      "writes it to models/npnet).")],
            hidden=[io.Hidden.unique_id],
            is_output_node=False,
        )

    @classmethod
    def execute(cls, pairs, steps, lr, batch_size, seed, size="official", npnet=None, resume_from="",
                precision="fp32", lr_schedule="constant", warmup=0, max_grad_norm=1.0) -> io.NodeOutput:
        net, history = train(pairs, npnet, steps=steps, lr=lr, batch_size=batch_size, seed=seed, size=size,
                             resume_from=resume_from, precision=precision, lr_schedule=lr_schedule, warmup=warmup,
                             max_grad_norm=max_grad_norm, node_id=node_id(cls))
        pairs_mse = pairs.identity_mse()
        first, last = history[0], history[-1]
        text = (f"{len(history)} steps on {len(pairs)} pairs: loss {first['loss']:.6g} -> {last['loss']:.6g} "
                f"(identity MSE {pairs_mse:.6g})")
        log.info("%s: %s", TRAIN_NAME, text)
        name = f"trained from {npnet.describe()}" if npnet is not None else f"trained ({size})"
        loaded = LoadedNPNet(net, name, Path("<memory>"))
        loaded.training = {"pairs": pairs.meta, "steps": len(history), "lr": float(lr), "batch_size": int(batch_size),
                           "seed": int(seed), "size": size if npnet is None else "fine-tuned",
                           "final_loss": last["loss"], "identity_mse": pairs_mse, "precision": precision,
                           "lr_schedule": lr_schedule, "warmup": int(warmup), "max_grad_norm": float(max_grad_norm),
                           "resume_from": resume_from}
        ui = {"text": [text], "noisecraft_history": [r["loss"] for r in history]}
        return io.NodeOutput(loaded, ui=ui)


# -- Save NPNet ---------------------------------------------------------------------------------------

def save(npnet: LoadedNPNet, filename: str, overwrite: bool = False) -> Path:
    if not isinstance(npnet, LoadedNPNet):
        raise ValueError(f"{SAVE_NAME}: expected an NPNET from {TRAIN_NAME} or {LOAD_NAME}, got {type(npnet).__name__}")
    # overwrite: the plain name, replaced; otherwise the plain name while free, then ComfyUI's numbering
    path = save_path(FOLDER, filename, SAVE_NAME, example="my_npnet", overwrite=bool(overwrite), plain_first=True)
    meta = {"noisecraft.source": npnet.describe()}
    training = getattr(npnet, "training", None)
    if training:
        meta["noisecraft.training"] = json.dumps(training, sort_keys=True)
        meta["noisecraft.base_model"] = str(training.get("pairs", {}).get("base_model", ""))
    save_npnet_safetensors(npnet.net, path, meta)  # atomic: temp file + fsync + os.replace
    file_list_changed(FOLDER)  # Load NPNet lists it on the next refresh
    return path


class SaveNPNet(io.ComfyNode):
    """NPNET -> models/npnet/<filename>.safetensors (loadable by Load NPNet)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_SaveNPNet",
            display_name=SAVE_NAME,
            category=CATEGORY,
            description="Saves an NPNet as safetensors in models/npnet, where Load NPNet finds it (refresh the "
            "node list). The training settings go into the file's metadata.",
            inputs=[
                NPNetType.Input("npnet", tooltip="From Train NPNet (or Load NPNet). Always used."),
                io.String.Input("filename", default="trained_npnet",
                                tooltip="File name in models/npnet, without folders (.safetensors is added). "
                                "Always used."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name; off (default) keeps it and adds a "
                                 "number (_00001_, as ComfyUI's savers number files) instead."),
            ],
            outputs=[io.String.Output(display_name="npnet_name", tooltip="The saved file's name, as Load NPNet "
                                      "lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, npnet, filename="trained_npnet", overwrite=False) -> io.NodeOutput:
        path = save(npnet, filename, overwrite)
        log.info("%s: wrote %s", SAVE_NAME, path)
        return io.NodeOutput(path.name, ui={"text": [f"saved {path}"], "noisecraft_npnet_file": [path.name]})


NODES = [CollectNPNetPairs, TrainNPNet, SaveNPNet]
