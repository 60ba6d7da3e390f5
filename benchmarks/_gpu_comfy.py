"""The rows of ``benchmarks/gpu_report.py`` that run inside ComfyUI (``COMFYUI_PATH``).

The pack is loaded as ComfyUI loads a custom node (``_common.load_pack``); the models are real
ComfyUI ``ModelPatcher`` objects from ComfyUI's own classes with seeded random weights
(:func:`_gpu_rows.random_init`): full-size SD1.5 (512^2) and SDXL (1024^2) UNets built directly on
the GPU (ComfyUI's ``supported_models`` configs, :data:`FULL_UNET`), or with ``--tiny`` the tests'
tiny models (``tests/e2e/nc_test_pack/tiny_models.py``), re-initialised the same way. The weights
are made in float32 and cast, so every dtype holds the same network.

Rows:

* ``refine_cfg_ratio/<family>``: one 20-step generation (``SamplerCustomAdvanced``, euler, normal,
  batch 1) with RandomNoise -> Refine Noise (random rank-4 refiner) and a cfg-1 guider, against
  RandomNoise and a cfg-7 guider: median wall-time ratio of the sampling node (the refine passes
  run inside it, when it asks for noise). Paper: 0.58 (SD2.1), 0.60 (SDXL); the limit with two
  refine passes is (N + 2) / 2N = 0.55 at N = 20.
* ``npnet_cost/sdxl``: the same cfg-7 SDXL generation with RandomNoise -> NPNet Golden Noise
  (random SDXL-preset NPNet, float32 as the node runs it) against plain RandomNoise, and the golden
  noise alone against the plain generation. Paper: +3%.
* ``precision/<node id>``: every NoiseCraft node that outputs NOISE or LATENT, run on the SDXL model
  (and NPNet) held in fp16 and in bf16, against the same in fp32: max-abs of the output tensor, all
  finite (search nodes: their score lists too). The nodes are the source listing
  (:func:`_gpu_rows.noise_nodes`) checked against the pack's live schemas (:func:`live_noise_nodes`);
  a node without a runner in :data:`RUNNERS` fails its row, so a new node cannot go unmeasured.
* ``seeded_noise/contract``: SeededNoise equals ComfyUI's RandomNoise bit for bit for fp32, fp16 and bf16
  latents (newer ComfyUI draws float32 and casts; v0.3.x draws in the latent's dtype), RNG untouched.
* ``dynamic_vram/train_wrappers``: Train Refiner's adapters on a model loaded by newer ComfyUI's dynamic VRAM
  patcher (``ModelPatcherDynamic``, CUDA only) against the plain ``ModelPatcher``: attached, and given a
  gradient by one backward pass (:func:`dynamic_vram_wrappers`).
* ``models/comfyui``: parameter counts of the full-size UNets as built here, on the meta device
  (the check, also in the smoke run, that :data:`FULL_UNET` is the real SD1.5 / SDXL).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from _common import load_pack, setup_comfy
from _gpu_rows import CFG, DTYPES, Row, Setup, alternate, median, random_init

_COMMON_UNET = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True,
                    legacy=False, use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float32)
# ComfyUI's own configs of the two checkpoints (comfy/model_detection.py: SD15, SDXL)
FULL_UNET = {
    "sd15": dict(model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], adm_in_channels=None,
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                 transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768, num_heads=8),
    "sdxl": dict(model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], adm_in_channels=2816,
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 num_classes="sequential"),
}
REFINER_META = {"noisecraft.kind": "refiner", "noisecraft.model_kind": "eps"}
PRECISION_FAMILY = "sdxl"  # NPNet reads SDXL's 2048-wide text; every node runs on the same model


class ComfyEnv:
    """ComfyUI set up for ``setup`` (CPU or GPU), the pack's node modules, and one model at a time."""

    def __init__(self, setup: Setup):
        self.setup = setup
        setup_comfy(cpu=setup.device.type == "cpu")
        import comfy.model_management as mm
        import comfy.samplers
        from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

        self.mm, self.samplers = mm, comfy.samplers
        self.random_noise, self.sampler_node = Noise_RandomNoise, SamplerCustomAdvanced
        (self.nodes, self.rf, self.npn, self.st, self.bridge, self.nodes_noise, self.comfy_lora, self.npnet,
         self.npnet_train, self.tiny) = load_pack("nodes", "nodes.nodes_refine", "nodes.nodes_npnet",
                                                  "nodes.nodes_stability", "nodes.bridge", "nodes.noise",
                                                  "nodes.comfy_lora", "noisecraft.npnet", "noisecraft.train.npnet")
        self._key, self._model = None, None

    # -- models ---------------------------------------------------------------------------------
    def model(self, family: str, dtype: torch.dtype):
        """The random-weight ``family`` model in ``dtype`` (the previous one is unloaded first)."""
        if self._key == (family, dtype):
            return self._model
        self.free()
        self._model, self._key = self.build(family, dtype), (family, dtype)
        return self._model

    def build(self, family: str, dtype: torch.dtype, device=None):
        import comfy.model_patcher
        import comfy.supported_models as supported

        if self.setup.tiny:
            patcher = self.tiny.build(family, seed=0)
            net = patcher.model
        else:
            device = device or self.mm.get_torch_device()
            klass = {"sd15": supported.SD15, "sdxl": supported.SDXL}[family]
            net = klass({**_COMMON_UNET, **FULL_UNET[family]}).get_model({}, "", device=device)
            patcher = None
        if device != "meta":
            random_init(net.diffusion_model, seed=0, gain=1.0)
        net.diffusion_model.to(dtype)
        net.diffusion_model.dtype = dtype  # ComfyUI casts inputs to this (BaseModel.get_dtype)
        net.model_config.unet_config["dtype"] = dtype
        if patcher is None:  # built where it runs: unloading it frees it, with no copy to the CPU
            patcher = comfy.model_patcher.ModelPatcher(net.eval(), load_device=self.mm.get_torch_device(),
                                                       offload_device=device)
        return patcher

    def free(self) -> None:
        self.mm.unload_all_models()
        self._key = self._model = None
        gc.collect()  # a ModelPatcher and its model point at each other
        self.mm.soft_empty_cache()

    def npnet_for(self, dtype: torch.dtype):
        """A LoadedNPNet (what Load NPNet outputs) holding a seeded random NPNet in ``dtype``."""
        np = self.npnet
        small = self.npnet_train.SMALL_NPNET
        config = np.NPNetConfig(latent_size=8, text_width=2048, **small) if self.setup.tiny else "sdxl"
        return self.npn.LoadedNPNet(np.random_npnet(config, seed=0).to(dtype), "random-npnet", Path("random-npnet"))

    # -- inputs and the sampling node ---------------------------------------------------------------
    def conds(self, family: str):
        return self.tiny.conditioning(family, 1), self.tiny.conditioning(family, 2, empty=True)

    def latent(self, family: str) -> dict:
        side = self.setup.side(family)
        return {"samples": torch.zeros(1, 4, side, side)}

    def sample(self, model, noise, pos, neg, cfg: float, family: str) -> torch.Tensor:
        """SamplerCustomAdvanced: euler, normal schedule, ``setup.steps`` steps; the samples, checked finite."""
        guider = self.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(cfg)
        sigmas = self.bridge.get_sigmas(model, "normal", self.setup.steps)
        out = self.sampler_node().sample(noise, guider, self.samplers.sampler_object("euler"), sigmas,
                                         self.latent(family))[0]["samples"]
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"the {family} generation gave NaN/inf samples")
        return out

    def refiner(self, model):
        return self.rf.parse_refiner(self.tiny.random_refiner_lora(model, 4, seed=1), REFINER_META, "random-refiner")


# -- timed rows -------------------------------------------------------------------------------------

def refine_cfg_ratio(env: ComfyEnv, family: str) -> Row:
    s = env.setup
    row = Row(f"refine_cfg_ratio/{family}", f"{s.steps}-step generation, refined noise + cfg 1 vs cfg {CFG:g} "
              f"({family}, {s.pixels(family)}^2, {str(s.dtype)[6:]}, SamplerCustomAdvanced wall time)",
              f"paper 0.58 (SD2.1) / 0.60 (SDXL); limit (N+2)/2N = {(s.steps + 2) / (2 * s.steps):.2f}")
    model = env.model(family, s.dtype)
    pos, neg = env.conds(family)
    refiner = env.refiner(model)
    noise = env.random_noise
    refined = env.rf.RefineNoise.execute(noise(0), model, refiner, pos, 1.0).args[0]  # refines when asked

    times, _ = alternate(s, {"cfg": lambda: env.sample(model, noise(0), pos, neg, CFG, family),
                             "refined": lambda: env.sample(model, refined, pos, neg, 1.0, family)})
    t_cfg, t_ref = median(times["cfg"]), median(times["refined"])
    return row.done(f"{t_ref:.3f} / {t_cfg:.3f} s = {t_ref / t_cfg:.3f}", refined_s=t_ref, cfg_s=t_cfg,
                    ratio=t_ref / t_cfg, limit=(s.steps + 2) / (2 * s.steps), runs_refined=times["refined"],
                    runs_cfg=times["cfg"])


def npnet_cost(env: ComfyEnv) -> Row:
    s, family = env.setup, "sdxl"
    row = Row("npnet_cost/sdxl", f"{s.steps}-step cfg {CFG:g} SDXL generation ({s.pixels(family)}^2, "
              f"{str(s.dtype)[6:]}) with NPNet golden noise (float32 NPNet) vs RandomNoise", "paper: +3% (1.03)")
    model = env.model(family, s.dtype)
    pos, neg = env.conds(family)
    golden = env.npn.NPNetGoldenNoise.execute(env.random_noise(0), env.npnet_for(torch.float32), pos, 1.0).args[0]
    latent = env.latent(family)
    times, _ = alternate(s, {"plain": lambda: env.sample(model, env.random_noise(0), pos, neg, CFG, family),
                          "golden": lambda: env.sample(model, golden, pos, neg, CFG, family),
                          "npnet": lambda: golden.generate_noise(latent)})
    plain, gold, net = (median(times[k]) for k in ("plain", "golden", "npnet"))
    return row.done(f"x{gold / plain:.3f} with golden noise; golden noise alone {net * 1e3:.1f} ms = "
                    f"{100 * net / plain:.1f}% of {plain:.3f} s", ratio=gold / plain, npnet_s=net, plain_s=plain,
                    golden_s=gold, npnet_share=net / plain)


# -- precision rows ---------------------------------------------------------------------------------

def _run_refine(env, model, npnet, pos, neg, latent):
    noise = env.rf.RefineNoise.execute(env.random_noise(0), model, env.refiner(model), pos, 1.0).args[0]
    return noise.generate_noise(latent), None


def _run_golden(env, model, npnet, pos, neg, latent):
    return env.npn.NPNetGoldenNoise.execute(env.random_noise(0), npnet, pos, 1.0).args[0].generate_noise(latent), None


def _run_select(env, model, npnet, pos, neg, latent):
    out = env.st.InversionStabilitySelect.execute(model, pos, neg, latent, 0, 2, 2, CFG, 1.0, "normal", 2, 1)
    return out.args[0].generate_noise(latent), torch.tensor(out.ui["noisecraft_scores"])


def _run_optimize(env, model, npnet, pos, neg, latent):
    out = env.st.OptimizeNoise.execute(model, pos, neg, latent, 0, "fixed_point", 2, 0.0, 0.5, False, 2, CFG, 1.0,
                                       "normal")
    return out.args[0].generate_noise(latent), torch.tensor(out.ui["noisecraft_history"])


def _run_to_latent(env, model, npnet, pos, neg, latent):
    return env.st.NoiseToLatent.execute(env.random_noise(0), model, latent).args[0]["samples"], None


# node id -> runner(env, model, npnet, pos, neg, latent) -> (output tensor, score tensor or None)
RUNNERS = {"NC_RefineNoise": _run_refine, "NC_NPNetGoldenNoise": _run_golden,
           "NC_InversionStabilitySelect": _run_select, "NC_OptimizeNoise": _run_optimize,
           "NC_NoiseToLatent": _run_to_latent}


def live_noise_nodes(env: ComfyEnv) -> list[str]:
    """The node ids, from the pack's own node list and schemas, whose outputs include NOISE or LATENT."""
    import asyncio

    classes = asyncio.run(env.nodes.NoiseCraftExtension().get_node_list())
    schemas = [c.define_schema() for c in classes]
    return [s.node_id for s in schemas if {"NOISE", "LATENT"} & {o.io_type for o in s.outputs}]


def precision_rows(env: ComfyEnv, rows: dict[str, Row]) -> None:
    """Fill the ``precision/<node>`` rows (``rows``: id -> Row): every node at fp32, fp16, bf16, one model
    build per dtype. A row whose node is not among the pack's live NOISE/LATENT nodes fails, and a live node
    without a row gets one."""
    live = live_noise_nodes(env)
    for node in live:
        rows.setdefault(f"precision/{node}", precision_row(node, "the pack's node list", env.setup))
    nodes = [rid.split("/", 1)[1] for rid in rows]
    family = PRECISION_FAMILY
    pos, neg = env.conds(family)
    latent = env.latent(family)
    outputs, t0 = {}, time.perf_counter()
    for name, dtype in DTYPES.items():
        model, npnet = env.model(family, dtype), env.npnet_for(dtype)
        for node in nodes:
            if node in RUNNERS and node in live:
                try:  # one node's error fails its own row only
                    outputs[node, name] = RUNNERS[node](env, model, npnet, pos, neg, latent)
                except Exception as e:  # noqa: BLE001
                    outputs[node, name] = f"failed in {name}: {type(e).__name__}: {e}"[:300]
        env.free()
    seconds = (time.perf_counter() - t0) / max(1, len(rows))
    for node in nodes:
        row = rows[f"precision/{node}"]
        row.seconds = seconds
        if node not in live:
            row.status = f"failed: {node} is listed in nodes/*.py but not among the pack's NOISE/LATENT nodes"
            continue
        if node not in RUNNERS:
            row.status = f"failed: no runner for {node} in benchmarks/_gpu_comfy.py RUNNERS (add one)"
            continue
        errors = [outputs[node, n] for n in DTYPES if isinstance(outputs[node, n], str)]
        if errors:
            row.status = errors[0]
            continue
        ref, ref_scores = outputs[node, "fp32"]
        values, parts = {}, []
        for name in ("fp16", "bf16"):
            out, scores = outputs[node, name]
            diff = float((out.float() - ref.float()).abs().max())
            values[f"{name}_max_abs"], values[f"{name}_finite"] = diff, bool(torch.isfinite(out).all())
            part = f"{name} {diff:.2e}"
            if scores is not None:
                values[f"{name}_scores_max_abs"] = float((scores - ref_scores).abs().max())
                part += f" (scores {values[f'{name}_scores_max_abs']:.2e})"
            parts.append(part)
        finite = all(values[f"{n}_finite"] for n in ("fp16", "bf16"))
        row.done(", ".join(parts) + ("" if finite else "; NOT all finite"), **values)
        if not finite:
            row.status = "failed: non-finite output in half precision"


def precision_row(node: str, file: str, setup: Setup) -> Row:
    return Row(f"precision/{node}", f"{node} ({file}) output in fp16 and bf16 vs fp32, max-abs "
               f"({PRECISION_FAMILY}, latent {setup.side(PRECISION_FAMILY)}^2)",
               "all finite")


def comfy_models(env: ComfyEnv) -> Row:
    """Parameter counts of the full-size UNets as :meth:`ComfyEnv.build` makes them, on the meta device
    (nothing materialized): the check that :data:`FULL_UNET` are the real checkpoints' shapes."""
    tiny, env.setup.tiny = env.setup.tiny, False
    try:
        counts = {f"{f}_params": sum(p.numel() for p in env.build(f, torch.float32, device="meta").model.parameters())
                  for f in FULL_UNET}
    finally:
        env.setup.tiny = tiny
    return Row("models/comfyui", "full-size ComfyUI UNets the ComfyUI rows use on the GPU (parameters, counted "
               "on the meta device)", "SD1.5 859.5M, SDXL 2567.5M").done(
        f"SD1.5 {counts['sd15_params'] / 1e6:.1f}M, SDXL {counts['sdxl_params'] / 1e6:.1f}M", **counts)


# -- behaviour that changed between ComfyUI versions ------------------------------------------------

def seeded_noise_contract(env: ComfyEnv) -> Row:
    """SeededNoise against ComfyUI's RandomNoise, bit for bit, for fp32 / fp16 / bf16 latents with and without a
    batch_index, leaving the global CPU (and CUDA) RNG state as it was."""
    import comfy.sample

    row = Row("seeded_noise/contract", "SeededNoise vs ComfyUI's RandomNoise (fp32, fp16, bf16 latents, with and "
              "without batch_index): bit-equal, global RNG untouched", "equal, untouched")
    seeded = env.nodes_noise.SeededNoise
    path = "prepare_noise_inner" if hasattr(comfy.sample, "prepare_noise_inner") else "own draw (v0.3.x)"
    cuda = env.setup.device.type == "cuda"
    unequal, touched = [], 0
    for name, dtype in DTYPES.items():
        for inds in (None, [2, 0, 2]):
            lat = {"samples": torch.zeros(3, 4, 8, 8, dtype=dtype)}
            if inds is not None:
                lat["batch_index"] = inds
            states = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)
            ours = seeded(7).generate_noise(lat)
            after = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)
            touched += int(not all(a is None or torch.equal(a, b) for a, b in zip(states, after)))
            theirs = env.random_noise(7).generate_noise(lat)
            if not (ours.dtype == theirs.dtype and torch.equal(ours, theirs)):
                unequal.append(f"{name}{'' if inds is None else ' batch_index'}")
    summary = (f"{6 - len(unequal)}/6 equal ({path}){'; unequal: ' + ', '.join(unequal) if unequal else ''}; "
               f"global RNG touched {touched}x")
    row.done(summary, equal=6 - len(unequal), cases=6, rng_touched=touched, path=path)
    if unequal or touched:
        row.status = f"failed: {summary}"
    return row


def _wrapper_check(env: ComfyEnv, patcher) -> dict:
    """Register Train Refiner's adapters on a clone of ``patcher``, load it as the executor does (inference
    mode), and run one forward and backward pass with the adapters on, as the trainer does: how many adapters
    ComfyUI attached to their layers, and how many got a gradient (or the error of the backward pass)."""
    import comfy.utils

    clone = patcher.clone()
    lora = env.comfy_lora.TrainableLoRA(clone, 4, 4.0, seed=0)
    lora.register(clone)
    dev = env.mm.get_torch_device()
    try:
        with torch.inference_mode():
            env.mm.load_models_gpu([clone])
        base = clone.model
        missing = []
        for key, a in lora.adapters.items():
            module = comfy.utils.get_attr(base, lora.weight_keys[key].rsplit(".", 1)[0])
            if not any(f is a for f in (getattr(module, "weight_function", None) or [])):
                missing.append(key)
        ctx = base.model_config.unet_config["context_dim"]
        side = env.setup.side("sd15")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, side, side, generator=g).to(dev)
        cond = torch.randn(1, 77, ctx, generator=g).to(dev)
        error, grads = None, 0
        with torch.inference_mode(False), torch.enable_grad():
            lora.switch.enabled = True
            try:
                out = base.apply_model(x.clone(), torch.ones(1, device=dev), c_crossattn=cond.clone())
                out.float().square().mean().backward()
                grads = sum(int(a.lora_up.weight.grad is not None and bool(a.lora_up.weight.grad.abs().sum() > 0))
                            for a in lora.adapters.values())
            except Exception as e:  # noqa: BLE001 - the finding itself
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            finally:
                lora.switch.enabled = False
        return {"adapters": len(lora.adapters), "missing": missing, "grads": grads, "error": error}
    finally:
        lora.detach(clone.model)
        env.free()


def _refined(env: ComfyEnv, patcher) -> torch.Tensor:
    """Refine Noise's output (random refiner, RandomNoise(0)) on ``patcher``, which ComfyUI loads its own way."""
    pos, _ = env.conds("sd15")
    noise = env.rf.RefineNoise.execute(env.random_noise(0), patcher, env.refiner(patcher), pos, 1.0).args[0]
    try:
        return noise.generate_noise(env.latent("sd15")).float()
    finally:
        env.free()


def dynamic_vram_wrappers(env: ComfyEnv) -> Row:
    """Train Refiner's weight wrappers under ComfyUI's dynamic VRAM patcher (``ModelPatcherDynamic``, newer
    ComfyUI), against the plain ``ModelPatcher``: the dynamic patcher sets a module's ``weight_function`` only for
    modules over 16 KiB and force-loads smaller ones without their wrappers (read in its ``load``), so small
    adapted layers, and the copies that make small inference-mode weights differentiable, may be skipped there."""
    import comfy.model_patcher as mp

    row = Row("dynamic_vram/train_wrappers", "Train Refiner's adapters on an SD1.5 UNet loaded by ModelPatcherDynamic "
              "vs ModelPatcher: attached to their layers, one backward pass, adapters with a gradient; Refine "
              "Noise's output on both", "every adapter attached and given a gradient; the same refined noise")
    dynamic = getattr(mp, "ModelPatcherDynamic", None)
    skip = None
    if dynamic is None:
        skip = "not run: this ComfyUI has no ModelPatcherDynamic (dynamic VRAM came with later versions)"
    elif env.setup.device.type != "cuda":
        skip = "not run: ModelPatcherDynamic hands models on the CPU to the plain ModelPatcher (CUDA only)"
    dtype = env.setup.dtype
    found = {}
    for name, klass in (("plain", mp.ModelPatcher), ("dynamic", dynamic)):
        if name == "dynamic" and skip:
            continue  # the plain run is the control, and checks this row's code wherever it runs
        net = env.build("sd15", dtype).model
        patcher = klass(net, load_device=env.mm.get_torch_device(), offload_device=torch.device("cpu"))
        found[name] = _wrapper_check(env, patcher)
        # Refine Noise attaches its weight functions per pass, not through the loader: the same noise either way
        found[name]["refined"] = _refined(env, klass(net, load_device=env.mm.get_torch_device(),
                                                     offload_device=torch.device("cpu")))
    parts, values = [], {"plain_refined_finite": bool(torch.isfinite(found["plain"]["refined"]).all())}
    for name, f in found.items():
        parts.append(f"{name}: {f['adapters'] - len(f['missing'])}/{f['adapters']} attached, "
                     + (f"backward failed: {f['error']}" if f["error"] else f"{f['grads']} with a gradient"))
        values.update({f"{name}_adapters": f["adapters"], f"{name}_missing": len(f["missing"]),
                       f"{name}_grads": f["grads"], f"{name}_error": f["error"],
                       f"{name}_missing_keys": f["missing"][:20]})
    if "dynamic" in found:
        diff = float((found["dynamic"]["refined"] - found["plain"]["refined"]).abs().max())
        values["refine_dynamic_vs_plain_max_abs"] = diff
        parts.append(f"Refine Noise dynamic vs plain max-abs {diff:.2e}")
    row.done("; ".join(parts), **values)
    bad = [n for n, f in found.items() if f["missing"] or f["error"] or f["grads"] != f["adapters"]]
    if not values["plain_refined_finite"] or values.get("refine_dynamic_vs_plain_max_abs", 0.0) > 0.25:
        bad.append("refine")  # (unit noise: off by a quarter of its deviation is another noise)
    if bad:
        row.status = f"failed: {'; '.join(parts)}"[:300]
    elif skip:
        row.status = skip
    return row
