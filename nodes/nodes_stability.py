"""Inversion-stability nodes: pick the most stable of K seeds, optimize a noise, noise -> latent.

Paper: Qi, Bai, Xiong, Xie, "Not All Noises Are Created Equally: Diffusion Noise Selection and
Optimization" (arXiv:2407.14041). The algorithms live in :mod:`noisecraft.stability`; these nodes
only turn ComfyUI inputs into a denoiser (:mod:`.bridge`) and the results into NOISE objects
(:mod:`.noise`).

Choices where the issue was silent:

* The LATENT of the search nodes gives the shape (and ``batch_index``) only: scoring always
  starts from pure noise at sigma_max (a full denoise), whatever the latent holds.
* ``scores`` (an output list) holds the K scores of batch item 0 in seed order (seed, seed+1,
  ...); the node's UI data holds all of them, one list per batch item.
* ``top_seeds`` lists the best seeds best-first, comma-separated, one line per batch item.
* ``search`` (last input, default ``full``): ``halving`` runs :func:`noisecraft.stability.select`'s
  successive halving with its default rungs (:func:`~noisecraft.stability.halving_rungs`, eta 2,
  first rung 2 steps). The default stays ``full`` so that a workflow saved before the input existed
  (which has no value for it) keeps its chosen seed; with halving, ``scores`` and the UI scores are
  each candidate's score at the deepest rung it reached (the UI also lists the rungs).
* ``best_stability`` of Optimize Noise is the mean over batch items (the value itself for one image).
* Inputs ComfyUI does not check itself are checked here, naming the node and the input: NaN/inf
  in the FLOAT inputs (its range check lets NaN through), an empty LATENT, NaN/inf conditioning or
  conditioning of another text width than the MODEL reads, and an integer or NaN/inf NOISE.
"""

from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io

from ..noisecraft import stability
from ..noisecraft.sigmas import ModelKind, noise_to_x
from . import bridge
from .common import (SEED_MASK, check_combo, check_int, check_number, node_id, sampling_inputs, scheduler_input,
                     seed_input)
from .noise import FixedNoise, SeededNoise, candidate_stack, check_input_noise

log = logging.getLogger(__name__)

CATEGORY = "noisecraft/stability"
NOISE_CATEGORY = "noisecraft/noise"
SELECT_NAME = "Inversion-Stability Select"
OPTIMIZE_NAME = "Optimize Noise"
METHODS = [m.value for m in stability.OptimizeMethod]
SEARCHES = [m.value for m in stability.SelectSearch]


# -- shared inputs -------------------------------------------------------------------------------

def _model_inputs() -> list:
    return sampling_inputs(
        model="The model you will sample with; scores depend on it. Always used.",
        positive="Positive prompt, as for your sampler. Always used.",
        negative="Negative prompt, as for your sampler. Only used where cfg (or inversion_cfg) is not 1.",
        latent="The latent you will sample (e.g. Empty Latent Image): only its size and batch are used. Always used.",
    )


def _scoring_inputs(default_steps: int = 4) -> list:
    return [
        io.Int.Input(
            "score_steps", default=default_steps, min=1, max=200,
            tooltip="Steps of the scoring round trip (sample down, invert back up). More steps score closer to "
            "a full generation but cost more (about 3 model passes per step per noise). Cannot be off; 1 is cheapest.",
        ),
        io.Float.Input(
            "cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
            tooltip="Guidance scale of the scoring sampler; use your sampler's cfg. 1 turns guidance off "
            "(one model pass per step instead of two).",
        ),
        io.Float.Input(
            "inversion_cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
            tooltip="Guidance scale of the inversion. 1 (default, the usual choice) turns guidance off for "
            "the inversion: one model pass per step.",
        ),
        scheduler_input("ComfyUI scheduler of the scoring schedule; use your sampler's. Cannot be off.",
                        bridge.scheduler_names()),
    ]


def _check_model_inputs(node: str, model, positive, negative, latent, cfg,
                        inversion_cfg) -> tuple[dict, float, float]:
    """The shared inputs of the search nodes, checked with messages naming ``node`` and the input."""
    lat = bridge.prepare_latent(model, latent, node)
    bridge.check_conditioning(positive, "positive", node, model)
    bridge.check_conditioning(negative, "negative", node, model)
    cfg = check_number(node, "cfg", cfg, 0.0, 100.0, "use your sampler's cfg (1 turns guidance off)")
    inversion_cfg = check_number(node, "inversion_cfg", inversion_cfg, 0.0, 100.0,
                                 "1 (default) turns guidance off for the inversion")
    return lat, cfg, inversion_cfg


def _calls_per_round_trip(sigmas: torch.Tensor) -> int:
    return 2 * (len(sigmas) - 1)


def _fmt(x: float) -> str:
    return f"{x:.5f}"


# -- Inversion-Stability Select ------------------------------------------------------------------

class InversionStabilitySelect(io.ComfyNode):
    """Score seeds seed..seed+K-1 by inversion stability and keep the best one per batch item."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_InversionStabilitySelect",
            display_name=SELECT_NAME,
            category=CATEGORY,
            description="Picks, per image, the seed whose noise survives a generate-then-invert round trip best "
            "(Qi et al., arXiv:2407.14041). Feed the NOISE to SamplerCustomAdvanced, or the seed to any sampler.",
            inputs=[
                *_model_inputs(),
                seed_input("First candidate seed: candidates are seed, seed+1, ..., seed+K-1. "
                           "With candidates = 1 the output is exactly RandomNoise(seed)."),
                io.Int.Input(
                    "candidates", default=8, min=1, max=4096,
                    tooltip="K, how many seeds to score. 1 turns the selection off (just RandomNoise(seed)).",
                ),
                *_scoring_inputs(),
                io.Int.Input(
                    "micro_batch", default=4, min=1, max=256,
                    tooltip="How many candidates run through the model at once (times the latent batch). "
                    "Higher is faster on GPU and uses more memory; 1 turns batching off.",
                ),
                io.Int.Input(
                    "top_k", default=3, min=0, max=4096,
                    tooltip="How many of the best seeds to list in top_seeds. 0 leaves top_seeds empty.",
                ),
                io.Combo.Input(  # optional: graphs saved before this input existed run as before (full)
                    "search", options=SEARCHES, default=stability.SelectSearch.FULL.value, optional=True,
                    tooltip="full (default, the paper): every candidate gets the score_steps round trip. halving: "
                    "successive halving, short round trips for all, then longer ones for the better half, up to "
                    "score_steps for the last few; picks about the same seed for a fraction of the cost at high "
                    "score_steps (e.g. 10-20). full turns halving off.",
                ),
            ],
            outputs=[
                io.Noise.Output(display_name="noise", tooltip="The winning noise of every batch item."),
                io.Int.Output(display_name="best_seed", tooltip="The winning seed of batch item 0."),
                io.Float.Output(display_name="scores", is_output_list=True,
                                tooltip="Stability of every candidate of batch item 0, in seed order."),
                io.String.Output(display_name="top_seeds",
                                 tooltip="The top_k seeds, best first; one line per batch item."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, seed, candidates, score_steps, cfg, inversion_cfg,
                scheduler, micro_batch, top_k, search=stability.SelectSearch.FULL.value) -> io.NodeOutput:
        check_combo(SELECT_NAME, "scheduler", scheduler, bridge.scheduler_names())
        check_combo(SELECT_NAME, "search", search, SEARCHES)
        check_int(SELECT_NAME, "candidates (K)", candidates, 1, hint="set it to 1 or more")
        check_int(SELECT_NAME, "micro_batch", micro_batch, 1, hint="set it to 1 or more")
        check_int(SELECT_NAME, "top_k", top_k, 0, hint="0 leaves top_seeds empty")
        kind = bridge.model_kind(model)
        lat, cfg, inversion_cfg = _check_model_inputs(SELECT_NAME, model, positive, negative, latent, cfg,
                                                      inversion_cfg)
        k = int(candidates)
        cands = candidate_stack(seed, k, lat)  # [K, B, ...]
        stability.check_noise(cands, "candidate noise")
        sigmas = bridge.get_sigmas(model, scheduler, score_steps)
        n = len(sigmas) - 1
        rungs = stability.halving_rungs(k, n) if search == stability.SelectSearch.HALVING.value else [n]
        mb, alive, calls = int(micro_batch), k, 0
        for r, steps in enumerate(rungs):  # progress: model calls of every micro-batch of every rung
            if r == 0 or steps != rungs[r - 1]:
                calls += math.ceil(alive / mb) * 2 * steps
            alive = math.ceil(alive / 2)
        progress = bridge.Progress(calls, node_id=node_id(cls))

        def fn(ctx: bridge.BridgeContext):
            return stability.select(
                ctx.denoiser, cands.to(ctx.device), ctx.sigmas, ctx.kind, micro_batch=mb,
                inverse_denoiser=ctx.inverse_denoiser, keep_x0=False, search=search,
            )

        res = bridge.run_core(model, positive, negative, lat["samples"], fn, sigmas=sigmas, cfg=cfg,
                              inversion_cfg=inversion_cfg, seed=seed, progress=progress)
        base = int(seed)
        best = [(base + int(i)) & SEED_MASK for i in res.best_index]
        winners = res.best_noise(cands)
        noise = FixedNoise(winners, seed=best[0], source=f"{SELECT_NAME} (NC_InversionStabilitySelect)")
        scores = res.scores  # [K, B]
        n_top = min(int(top_k), k)
        top_lines = [", ".join(str((base + i) & SEED_MASK) for i in res.top(n_top, b)) for b in range(scores.shape[1])]
        per_item = scores.t().tolist()
        text = "\n".join(
            f"item {b}: best seed {best[b]} (stability {_fmt(per_item[b][int(res.best_index[b])])}); "
            f"scores {', '.join(_fmt(s) for s in per_item[b])}"
            for b in range(len(per_item))
        )
        log.info("%s: %s (kind %s, %d score steps, search %s, rungs %s)", SELECT_NAME, text.replace("\n", " | "),
                 kind.value, n, search, res.rung_steps)
        ui = {
            "text": [text],
            "noisecraft_scores": per_item,
            "noisecraft_seeds": [[(base + j) & SEED_MASK for j in range(k)]],
            "noisecraft_best_seeds": best,
            "noisecraft_rungs": res.rung.t().tolist(),  # per item: the deepest halving rung of each candidate
            "noisecraft_rung_steps": res.rung_steps,
        }
        return io.NodeOutput(noise, best[0], [float(s) for s in scores[:, 0]], "\n".join(top_lines), ui=ui)


# -- Optimize Noise ------------------------------------------------------------------------------

class OptimizeNoise(io.ComfyNode):
    """Raise the inversion stability of a noise by iterating round trips (paper's or ours)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_OptimizeNoise",
            display_name=OPTIMIZE_NAME,
            category=CATEGORY,
            description="Optimizes a noise for inversion stability (Qi et al., arXiv:2407.14041): 'momentum' is the "
            "paper's gradient descent, 'fixed_point' our faster step toward the inverted noise. Every step costs "
            "one scoring round trip.",
            inputs=[
                *_model_inputs(),
                seed_input("Seed of the starting noise (RandomNoise(seed)) when no noise is connected; "
                           "ignored when a noise is connected."),
                io.Combo.Input(
                    "method", options=METHODS, default=stability.OptimizeMethod.FIXED_POINT.value,
                    tooltip="momentum: the paper's Algorithm 2 (100 steps, lr 100, momentum 0.5). fixed_point: ours, "
                    "moves toward the inverted noise with backtracking; reaches the paper's result in far fewer steps. "
                    "Set steps to 0 to turn optimization off.",
                ),
                io.Int.Input(
                    "steps", default=10, min=0, max=1000,
                    tooltip="Optimization steps (one round trip each). 0 turns optimization off (the noise is only scored).",
                ),
                io.Float.Input(
                    "lr", default=0.0, min=0.0, max=10000.0, step=0.01, round=0.001,
                    tooltip="Learning rate. 0 (default) uses the method's default: momentum 100 (the paper's SDXL value; "
                    "scaled by latent size so it means the same relative step at every resolution), fixed_point 2 "
                    "(fraction of the way to the inverted noise, capped at 4).",
                ),
                io.Float.Input(
                    "momentum", default=0.5, min=0.0, max=0.99, step=0.01,
                    tooltip="Momentum of the paper's method (0.5 in the paper). 0 turns momentum off. "
                    "Unused by fixed_point.",
                ),
                io.Boolean.Input(
                    "renormalize", default=False,
                    tooltip="Rescale the noise to a unit Gaussian's norm after every step, so it keeps a noise's "
                    "scale. Off (default) follows the paper.",
                ),
                io.Float.Input(
                    "max_change", default=0.5, min=0.0, max=100.0, step=0.01,
                    tooltip="Trust region: the optimized noise stays within this distance of the starting noise, "
                    "relative to the noise's norm (0.5 = half of it). Unlimited fixed-point steps find very stable "
                    "but saturated noises. 0 turns the limit off.",
                ),
                *_scoring_inputs(),
                io.Noise.Input(
                    "noise", optional=True,
                    tooltip="Noise to optimize (e.g. from Inversion-Stability Select or RandomNoise). "
                    "Leave unconnected to start from RandomNoise(seed).",
                ),
            ],
            outputs=[
                io.Noise.Output(display_name="noise", tooltip="The most stable noise found, per batch item."),
                io.Float.Output(display_name="best_stability",
                                tooltip="Stability of the returned noise (mean over batch items)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, seed, method, steps, lr, momentum, renormalize,
                score_steps, cfg, inversion_cfg, scheduler, noise=None, max_change=0.5) -> io.NodeOutput:
        check_combo(OPTIMIZE_NAME, "scheduler", scheduler, bridge.scheduler_names())
        check_combo(OPTIMIZE_NAME, "method", method, METHODS)
        check_int(OPTIMIZE_NAME, "steps", steps, 0, hint="0 turns optimization off")
        lr = check_number(OPTIMIZE_NAME, "lr", lr, 0.0, None, "0 uses the method's default")
        momentum = check_number(OPTIMIZE_NAME, "momentum", momentum, 0.0, 0.99, "0 turns momentum off")
        max_change = check_number(OPTIMIZE_NAME, "max_change", max_change, 0.0, None, "0 turns the limit off")
        kind = bridge.model_kind(model)
        lat, cfg, inversion_cfg = _check_model_inputs(OPTIMIZE_NAME, model, positive, negative, latent, cfg,
                                                      inversion_cfg)
        source = noise if noise is not None else SeededNoise(seed)
        e = _noise_for(source, lat, OPTIMIZE_NAME)
        sigmas = bridge.get_sigmas(model, scheduler, score_steps)
        progress = bridge.Progress((int(steps) + 1) * _calls_per_round_trip(sigmas), node_id=node_id(cls))

        def fn(ctx: bridge.BridgeContext):
            return stability.optimize(
                ctx.denoiser, e.to(ctx.device), ctx.sigmas, ctx.kind, method=method, steps=int(steps),
                lr=float(lr) if lr > 0 else None, momentum=float(momentum), renormalize=bool(renormalize),
                max_change=float(max_change) if max_change > 0 else None,
                inverse_denoiser=ctx.inverse_denoiser,
            )

        out_seed = int(getattr(source, "seed", seed) or 0)
        res = bridge.run_core(model, positive, negative, lat["samples"], fn, sigmas=sigmas, cfg=cfg,
                              inversion_cfg=inversion_cfg, seed=out_seed, progress=progress)
        best = float(res.best_score.mean())
        history = res.history.t().tolist()  # [B][iterates]
        text = "\n".join(
            f"item {b}: stability {_fmt(h[0])} -> {_fmt(max(h))} in {res.steps} steps ({method}); "
            f"history {', '.join(_fmt(v) for v in h)}"
            for b, h in enumerate(history)
        )
        log.info("%s: %s (kind %s)", OPTIMIZE_NAME, text.replace("\n", " | "), kind.value)
        out = FixedNoise(res.noise, seed=out_seed, source=f"{OPTIMIZE_NAME} (NC_OptimizeNoise)")
        ui = {"text": [text], "noisecraft_history": history, "noisecraft_best": res.best_score.tolist()}
        return io.NodeOutput(out, best, ui=ui)


# -- Noise to Latent -----------------------------------------------------------------------------

class NoiseToLatent(io.ComfyNode):
    """NOISE -> the start latent x_T, for KSamplerAdvanced with add_noise disabled (eps/v models)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NC_NoiseToLatent",
            display_name="Noise to Latent",
            category=NOISE_CATEGORY,
            description="Turns a NOISE into the starting latent of a full denoise, for KSamplerAdvanced with "
            "add_noise 'disable' (start_at_step 0). eps and v-prediction models only; for flow models (SD3, Flux) "
            "connect the NOISE to SamplerCustomAdvanced instead.",
            inputs=[
                io.Noise.Input("noise", tooltip="The noise to start from (e.g. from Inversion-Stability Select). "
                               "Always used."),
                io.Model.Input("model", tooltip="The model you will sample with: sets the noise scale (sigma_max). "
                               "Always used."),
                io.Latent.Input("latent", tooltip="The empty latent you would have sampled: sets size and batch. "
                                "Always used."),
            ],
            outputs=[io.Latent.Output(display_name="latent",
                                      tooltip="Start latent; sample it with add_noise disabled, denoise 1.")],
        )

    @classmethod
    def execute(cls, noise, model, latent) -> io.NodeOutput:
        kind = bridge.model_kind(model)
        if kind is ModelKind.FLOW:
            raise ValueError(
                "Noise to Latent only works for eps and v-prediction models: this MODEL is a flow model "
                "(SD3/Flux class), whose samplers multiply a start latent by zero. Connect the NOISE directly "
                "to SamplerCustomAdvanced's noise input instead."
            )
        lat = bridge.prepare_latent(model, latent, "Noise to Latent")
        e = _noise_for(noise, lat, "Noise to Latent")
        x_t = noise_to_x(e, kind, bridge.sigma_max(model))
        out = dict(lat)
        # KSampler applies process_latent_in to a non-empty latent: store x_T in the LATENT's space.
        out["samples"] = model.model.process_latent_out(x_t).to(torch.float32).cpu()
        out.pop("noise_mask", None)
        return io.NodeOutput(out)


def _noise_for(noise, lat: dict, node: str) -> torch.Tensor:
    if not hasattr(noise, "generate_noise"):
        raise ValueError(f"{node}: expected a NOISE (e.g. from RandomNoise), got {type(noise).__name__}")
    e = noise.generate_noise(lat)
    want = tuple(lat["samples"].shape)
    if not torch.is_tensor(e) or tuple(e.shape) != want:
        got = tuple(e.shape) if torch.is_tensor(e) else type(e).__name__
        raise ValueError(
            f"{node}: channel/shape mismatch: the NOISE gave {got} for a latent of shape {want}. "
            f"Use a NOISE made for this latent and model (re-run the node that produced it)."
        )
    check_input_noise(e, node)
    return e.detach().to("cpu", torch.float32)


NODES = [InversionStabilitySelect, OptimizeNoise, NoiseToLatent]
