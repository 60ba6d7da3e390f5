"""NPNet training as ComfyUI nodes: collect re-denoise pairs, train an NPNet, save it.

Paper: Zikai Zhou, Shitong Shao, Lichen Bai, Zhiqiang Xu, Bo Han, Zeke Xie, "Golden Noise for
Diffusion Models: A Learning Framework" (arXiv:2411.09502), Sec. 3.1-3.2, Alg. 1-2, App. A.5.
The algorithms are the core's: :func:`noisecraft.train.npnet_pairs.re_denoise` (one step down at
CFG w_l, one inversion step back up at CFG w_w) and the training recipe of
:mod:`noisecraft.train.npnet_trainer` (identity initialisation ``init_npnet``, MSE, AdamW with
gradient clipping at 1, canonical singular-vector signs, one prompt per pair). These nodes only
run them inside ComfyUI (the model through :func:`nodes.bridge.run_core`, so LoRAs and patches on
the MODEL apply) and keep the data in memory.

Choices where the issue was silent:

* Pairs live in memory (``NPNET_PAIRS``: noise, target, prompt embeddings, prompt id per pair); a
  graph run collects and trains in one go. For large datasets, resumable collection and the
  classifier keep-filter use the CLI (``python -m noisecraft collect-pairs / train-npnet``).
  The node keeps every pair (no keep-filter: scoring needs a reward model the graph does not have).
* Noise: pair ``i`` starts from ``seeded_noise(seed + i, [1, C, H, W])``, the CLI's convention
  (``PairStore.sample_noise``), so the same seed gives the same pairs in both.
* Prompts: the positive CONDITIONING's first entry (``cond[0][0]``; further entries are ignored
  as in NPNet Golden Noise). A batch of P prompts (a batch of texts) gives ``count`` pairs per
  prompt, pair ``i`` with prompt ``i % P``; the negative is shared. Prompts longer than 77 tokens
  are truncated to their first 77 (the golden-noise node's default policy).
* Latent: only its shape is used (square; channels from the model). The schedule is ComfyUI's
  (``scheduler``, ``steps``); the re-denoise step is its first step, as in the CLI.
* Network: fine-tunes the NPNET given (a copy; the input is unchanged; it must fit the pairs'
  channels, latent size, tokens and text width), else a new one, identity-initialised from
  ``seed``, sized from the pairs with ``size`` = ``official`` (Swin-T, the paper's) or ``small``
  (the core's ``SMALL_NPNET``, ~0.1M parameters; use it for small latents and CPU runs).
* Training runs on ComfyUI's torch device under ``torch.inference_mode(False)`` and
  ``torch.enable_grad()`` on tensors cloned out of the inference-mode pairs; every step is a
  progress tick and an interrupt point. The loss history goes to the UI (``noisecraft_history``).
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

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from comfy_api.latest import io

import comfy.model_management

from ..noisecraft.npnet import NPNet, NPNetConfig, fit_prompt, save_npnet_safetensors
from ..noisecraft.rng import seeded_noise
from ..noisecraft.train.npnet_pairs import re_denoise
from ..noisecraft.train.npnet_trainer import SMALL_NPNET, init_npnet
from . import bridge
from .common import (SEED_MASK, check_combo, check_int, file_list_changed, node_id, prompt_embedding, sampling_inputs,
                     save_path, scheduler_input, seed_input)
from .nodes_npnet import FOLDER, LOAD_NAME, LoadedNPNet, NPNetType, width_note

log = logging.getLogger(__name__)

CATEGORY = "noisecraft/npnet"
COLLECT_NAME = "Collect NPNet Pairs"
TRAIN_NAME = "Train NPNet"
SAVE_NAME = "Save NPNet"
SIZES = ["official", "small"]
MAX_TOKENS = 77

NPNetPairsType = io.Custom("NPNET_PAIRS")


@dataclass
class NPNetPairs:
    """What travels on an NPNET_PAIRS socket (CPU float32 tensors)."""

    noise: torch.Tensor  # [N, C, H, W] unit noise (the source)
    target: torch.Tensor  # [N, C, H, W] re-denoised noise (the target)
    embeds: torch.Tensor  # [P, tokens, width] prompt embeddings
    cond: torch.Tensor  # [N] int64: prompt id of each pair
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.noise.shape[1:])  # type: ignore[return-value]

    def identity_mse(self) -> float:
        return float(F.mse_loss(self.noise, self.target))

    def __repr__(self) -> str:
        c, h, w = self.shape
        return (f"NPNetPairs({len(self)} pairs of {c}x{h}x{w} latents, {self.embeds.shape[0]} prompt(s) of "
                f"{self.embeds.shape[1]}x{self.embeds.shape[2]}, w_l={self.meta.get('w_l')}, w_w={self.meta.get('w_w')})")


def _positive_embeds(positive) -> torch.Tensor:
    """[P, tokens <= 77, width] prompt embeddings of the positive CONDITIONING (its first entry)."""
    emb = prompt_embedding(positive, COLLECT_NAME)
    if emb.shape[1] > MAX_TOKENS:
        emb = fit_prompt(emb, MAX_TOKENS, "truncate")
    return emb.detach().to("cpu", torch.float32).clone()


# -- Collect NPNet Pairs ----------------------------------------------------------------------------

def collect(model, positive, negative, latent: dict, *, seed: int, count: int, w_l: float, w_w: float,
            steps: int, scheduler: str, batch_size: int, node_id: Optional[str] = None,
            require_gap: bool = True) -> NPNetPairs:
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
    noise = torch.cat([seeded_noise((int(seed) + i) & SEED_MASK, (1, c, h, w)) for i in range(total)])
    cond = torch.arange(total, dtype=torch.int64) % p
    per_call = max(1, batch_size // p)  # candidates per call; a call holds per_call * P samples
    rounds = math.ceil(count / per_call)
    progress = bridge.Progress(rounds * 2, node_id=node_id)  # two denoiser calls per round

    def fn(ctx: bridge.BridgeContext):
        targets = []
        for r in range(rounds):
            # candidate-major: sample j * P + b is pair (start + j) * P + b, with prompt b
            lo, hi = r * per_call * p, min((r + 1) * per_call * p, total)
            e = noise[lo:hi].to(ctx.device)
            targets.append(re_denoise(ctx.denoiser, ctx.inverse_denoiser, e, ctx.sigmas, ctx.kind).float().cpu())
        return torch.cat(targets)

    # the conditioning is prepared for a batch of P (one per prompt); ComfyUI tiles it to every call
    samples = torch.zeros(p, c, h, w)
    target = bridge.run_core(model, positive, negative, samples, fn, sigmas=sigmas, cfg=w_l, inversion_cfg=w_w,
                             seed=int(seed), progress=progress)
    meta = {"w_l": w_l, "w_w": w_w, "steps": int(steps), "scheduler": scheduler, "seed": int(seed),
            "kind": kind.value, "sigma_max": float(sigmas[0]), "sigma_next": float(sigmas[1]),
            "base_model": bridge.model_name(model), "count": count, "prompts": p}
    return NPNetPairs(noise, target, embeds, cond, meta)


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

def _check_pairs(pairs) -> NPNetPairs:
    if not isinstance(pairs, NPNetPairs):
        raise ValueError(f"{TRAIN_NAME}: expected NPNET_PAIRS from {COLLECT_NAME}, got {type(pairs).__name__}")
    if len(pairs) < 1:
        raise ValueError(f"{TRAIN_NAME}: the pairs are empty: collect at least one pair (count >= 1)")
    return pairs


def config_for(pairs: NPNetPairs, size: str) -> NPNetConfig:
    """The NPNet shape for the pairs: channels and size from the latents, tokens and width from the text."""
    check_combo(TRAIN_NAME, "size", size, SIZES)
    c, h, _ = pairs.shape
    _, tokens, width = pairs.embeds.shape
    extra = SMALL_NPNET if size == "small" else {}
    return NPNetConfig(latent_channels=c, latent_size=h, tokens=int(tokens), text_width=int(width), **extra)


def _check_fits(net: NPNet, pairs: NPNetPairs, name: str) -> None:
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


def train(pairs: NPNetPairs, npnet: Optional[LoadedNPNet], *, steps: int, lr: float, batch_size: int, seed: int,
          size: str = "small", node_id: Optional[str] = None) -> tuple[NPNet, list[dict]]:
    """Train (a copy of) ``npnet`` or a new NPNet on ``pairs``; returns the net (eval, CPU) and the log."""
    pairs = _check_pairs(pairs)
    steps = check_int(TRAIN_NAME, "steps", steps, 1, hint="optimizer steps; 1 or more")
    batch_size = check_int(TRAIN_NAME, "batch_size", batch_size, 1, hint="pairs per step; 1 or more")
    lr = float(lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{TRAIN_NAME}: lr must be a positive number (the paper-style default is 1e-4 to 1e-3), "
                         f"got {lr}")
    if npnet is not None:
        if not isinstance(npnet, LoadedNPNet):
            raise ValueError(f"{TRAIN_NAME}: npnet: expected an NPNET from {LOAD_NAME} or {TRAIN_NAME}, got "
                             f"{type(npnet).__name__}")
        _check_fits(npnet.net, pairs, npnet.describe())
    else:
        config = config_for(pairs, size)
    device = comfy.model_management.get_torch_device()
    progress = bridge.Progress(steps, node_id=node_id)
    n = len(pairs)
    history: list[dict] = []
    g = torch.Generator().manual_seed(int(seed) & SEED_MASK)
    with torch.inference_mode(False), torch.enable_grad():
        # built (and cloned) outside inference mode: normal tensors autograd may use
        if npnet is not None:  # a copy: the input NPNET stays as it is
            net = NPNet(npnet.config, preset=npnet.preset)
            net.load_state_dict({k: v.detach().clone() for k, v in npnet.net.state_dict().items()}, strict=True)
        else:
            net = init_npnet(config, seed=int(seed))
        net = net.to(device).float().train()
        for prm in net.parameters():
            prm.requires_grad_(True)
        noise, target = pairs.noise.clone().to(device), pairs.target.clone().to(device)
        embeds, cond = pairs.embeds.clone().to(device), pairs.cond.clone()
        params = [prm for prm in net.parameters() if prm.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        order, pos = torch.randperm(n, generator=g), 0
        for step in range(1, steps + 1):
            if pos >= n:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos: pos + batch_size]
            pos += batch_size
            e, t = noise[idx.to(device)], target[idx.to(device)]
            prompt = embeds[cond[idx].to(device)]  # one prompt per pair
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(net(e, prompt, canonical_signs=True), t)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append({"step": step, "loss": float(loss.detach()),
                            "identity_mse": float(F.mse_loss(e, t).detach())})
            progress.tick()
        net = net.eval().to("cpu")
        for prm in net.parameters():
            prm.requires_grad_(False)
    return net, history


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
            "npnet empty for a new one sized from the pairs. Feed NPNet Golden Noise or Save NPNet.",
            inputs=[
                NPNetPairsType.Input("pairs", tooltip="From Collect NPNet Pairs. Always used."),
                io.Int.Input("steps", default=200, min=1, max=1_000_000,
                             tooltip="Optimizer steps. Minimum 1; no value turns training off."),
                io.Float.Input("lr", default=1e-3, min=1e-7, max=1.0, step=1e-5, round=1e-7,
                               tooltip="AdamW learning rate (1e-3 for a new net; lower, e.g. 1e-4, to fine-tune). "
                               "No value turns it off."),
                io.Int.Input("batch_size", default=16, min=1, max=4096,
                             tooltip="Pairs per step (the paper: 64). No value turns it off."),
                seed_input("Seed of the new net's weights and of the data order. No value turns it off.",
                           control_after_generate=None),
                io.Combo.Input("size", options=SIZES, default="official",
                               tooltip="Shape of a new NPNet: official (the paper's Swin-T branch, ~30M "
                               "parameters, slow on CPU) or small (~0.1M, for small latents and quick runs). "
                               "Ignored when an npnet is connected (that is the off setting)."),
                NPNetType.Input("npnet", optional=True,
                                tooltip="An NPNet to fine-tune (from Load NPNet); it must fit the pairs. Leave "
                                "unconnected (off) to train a new one."),
            ],
            outputs=[NPNetType.Output(display_name="npnet", tooltip="The trained NPNet (in memory; Save NPNet "
                                      "writes it to models/npnet).")],
            hidden=[io.Hidden.unique_id],
            is_output_node=False,
        )

    @classmethod
    def execute(cls, pairs, steps, lr, batch_size, seed, size="official", npnet=None) -> io.NodeOutput:
        check_combo(TRAIN_NAME, "size", size, SIZES)
        net, history = train(pairs, npnet, steps=steps, lr=lr, batch_size=batch_size, seed=seed, size=size,
                             node_id=node_id(cls))
        first, last = history[0], history[-1]
        text = (f"{len(history)} steps on {len(pairs)} pairs: loss {first['loss']:.6g} -> {last['loss']:.6g} "
                f"(identity MSE {pairs.identity_mse():.6g})")
        log.info("%s: %s", TRAIN_NAME, text)
        name = f"trained from {npnet.describe()}" if npnet is not None else f"trained ({size})"
        loaded = LoadedNPNet(net, name, Path("<memory>"))
        loaded.training = {"pairs": pairs.meta, "steps": len(history), "lr": float(lr), "batch_size": int(batch_size),
                           "seed": int(seed), "size": size if npnet is None else "fine-tuned",
                           "final_loss": last["loss"], "identity_mse": pairs.identity_mse()}
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
