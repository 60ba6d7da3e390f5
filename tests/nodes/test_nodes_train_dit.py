"""The NoiseRefine training nodes on a DiT: the tiny SD3-shaped (MMDiT) model from ComfyUI's own classes.

Build Teacher Cache -> Train Refiner -> Save Refiner -> Load Refiner / Refine Noise and ComfyUI's stock
LoraLoaderModelOnly, as test_nodes_train.py does on the UNet; the same chain on a tiny Flux-class model (built
here from ComfyUI's Flux classes: double and single blocks); the DiT's keys (diffusers transformer names
``lora_transformer_*``, the row slices of the fused ``qkv``); resume; and the bad inputs: a model the trainer
cannot handle (a tiny AuraFlow), a teacher cache from a flow model with an eps model and the reverse.
Everything runs under ``torch.inference_mode()`` like the server, on models built in inference mode.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors import safe_open

import comfy.lora
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import folder_paths
import nodes as comfy_nodes
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

FAMILY = "sd3"
SEED = 3


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def untouched(model, before: dict) -> bool:
    """The weights are ``before``'s, no patch, wrapper or weight function of ours is left on the model."""
    now = model.model.state_dict()
    return (before.keys() == now.keys() and all(torch.equal(before[k], now[k]) for k in before)
            and not model.patches and not model.weight_wrapper_patches and not model.object_patches
            and not model.model_options["transformer_options"].get("patches_replace")
            and all(not m.__dict__.get("weight_function") and not m.__dict__.get("bias_function")
                    for m in model.model.modules()))


def equal_pairs(a, b) -> bool:
    """Two REFINERs hold the same LoRA pairs (down, up, alpha), bit for bit."""
    pa, pb = a.pairs, b.pairs
    return pa.keys() == pb.keys() and all(
        torch.equal(pa[k][0], pb[k][0]) and torch.equal(pa[k][1], pb[k][1]) and pa[k][2] == pb[k][2] for k in pa)


@pytest.fixture(scope="module")
def model(nc):
    with torch.inference_mode():
        return nc.tiny.build(FAMILY, seed=0)


@pytest.fixture(scope="module")
def cl(nc):
    return importlib.import_module(nc.noise.__name__.split(".")[0] + ".nodes.comfy_lora")


@pytest.fixture(scope="module")
def core(nc):
    return importlib.import_module(nc.noise.__name__.split(".")[0] + ".noisecraft.lora")


def prompts(nc, family=FAMILY, n=2):
    pos = []
    for i in range(n):
        pos += nc.tiny.conditioning(family, 10 + i, 1)
    return pos


def build_cache(tr, nc, model, family, n=2, steps=3):
    _, neg = nc.conds(family)
    with torch.inference_mode():
        return tr.BuildTeacherCache.execute(model, prompts(nc, family), neg, nc.latent(family, size=8), n, 5, 5.0,
                                            steps, "normal").args[0]


@pytest.fixture(scope="module")
def cache(nc, tr, model):
    return build_cache(tr, nc, model, FAMILY)


def train(tr, model, cache, steps=6, **kw):
    args = dict(steps=steps, student_steps=3, batch_size=len(cache), learning_rate=3e-3, rank=4, alpha=0.0, seed=1)
    new = {k: kw.pop(k) for k in ("resume_from", "precision") if k in kw}
    args.update(kw)
    with torch.inference_mode():
        return tr.TrainRefiner.execute(model, cache, *args.values(), **new)


@pytest.fixture(scope="module")
def trained(tr, model, cache):
    return train(tr, model, cache, steps=6)


# -- keys ------------------------------------------------------------------------------------------

def expected_sd3_modules(depth: int) -> set[str]:
    """The diffusers names of the targets of an SD3 transformer of ``depth`` blocks (the last one pre-only:
    its text stream has q/k/v but no output projection and no MLP)."""
    out = set()
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        out |= {b + n for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                "attn.add_k_proj", "attn.add_v_proj", "ff.net.0.proj", "ff.net.2")}
        if i < depth - 1:
            out |= {b + n for n in ("attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2")}
    return out


def flat(modules) -> list[str]:
    return ["lora_transformer_" + m.replace(".", "_") for m in sorted(modules)]


def check_keys_are_comfyuis(model, keys: dict) -> None:
    """Every key is one ComfyUI's own LoRA key map sends to the same weight (or slice of a fused weight)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = dict(model.model.named_parameters())
    for key, entry in keys.items():
        assert key_map[key] == entry, key
        wkey = entry if isinstance(entry, str) else entry[0]
        assert wkey in weights and weights[wkey].ndim == 2


def test_sd3_keys_are_the_diffusers_transformer_names_comfyui_maps(cl, core, model):
    keys = cl.lora_keys(model)
    depth = model.model.model_config.unet_config["depth"]
    # in diffusers-name order (the core's LoRA init order: attach_lora sorts the module names)
    assert list(keys) == flat(expected_sd3_modules(depth)) and len(keys) == 21
    check_keys_are_comfyuis(model, keys)
    hidden = 64 * depth  # mmdit_to_diffusers' row offsets (SD3's hidden size is 64 x depth)
    assert keys["lora_transformer_transformer_blocks_0_attn_to_k"] == (
        "diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", (0, hidden, hidden))
    assert keys["lora_transformer_transformer_blocks_1_attn_add_v_proj"] == (
        "diffusion_model.joint_blocks.1.context_block.attn.qkv.weight", (0, 2 * hidden, hidden))
    assert keys["lora_transformer_transformer_blocks_0_ff_context_net_2"] == (
        "diffusion_model.joint_blocks.0.context_block.mlp.fc2.weight")
    assert cl.lora_targets(model) == core.TRANSFORMER_TARGETS  # the CLI's on diffusers' SD3


def patcher(base, seed: int):
    """A ModelPatcher over ``base`` with seeded random weights (normal, std 0.02; norm scales 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith(".scale") else torch.randn(p.shape, generator=g) * 0.02)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_flux(seed=0):
    """A Flux-class ModelPatcher from ComfyUI's Flux classes (hidden 64, 2 heads, one double and one single
    block, guidance embedding: Flux.1-dev-shaped)."""
    cfg = comfy.supported_models.Flux(dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=64,
        mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
        qkv_bias=True, guidance_embed=True, patch_size=2, dtype=torch.float32,
    ))
    with torch.inference_mode():
        return patcher(comfy.model_base.Flux(cfg, device=mm.unet_offload_device()), seed)


def test_flux_keys_are_the_diffusers_transformer_names_comfyui_maps(cl):
    model = tiny_flux()
    keys = cl.lora_keys(model)
    double = {f"transformer_blocks.0.{n}" for n in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2")}
    single = {f"single_transformer_blocks.0.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp",
                                                            "proj_out")}
    assert list(keys) == flat(double | single)
    check_keys_are_comfyuis(model, keys)
    assert keys["lora_transformer_single_transformer_blocks_0_proj_mlp"] == (
        "diffusion_model.single_blocks.0.linear1.weight", (0, 3 * 64, 4 * 64))
    assert cl.lora_targets(model) == cl.FLUX_TARGETS
    lora = cl.TrainableLoRA(model, 4, 4.0, seed=0)  # the trainer's adapters: one per key
    assert set(lora.pairs()) == set(keys)


def test_an_sd35_shaped_model_with_attn2_and_rms_qk_norm_trains(tr, cl, nc):
    """SD3.5's extra x-block self-attention (``attn2``: q/k/v slices of its own fused qkv) is targeted, and its
    RMS qk-norm weights (inference tensors outside ComfyUI's cast path) do not stop the backward pass."""
    cfg = comfy.supported_models.SD3(dict(
        in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=2048,
        pos_embed_scaling_factor=None, pos_embed_max_size=32, num_patches=32 * 32, qk_norm="rms",
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
        x_block_self_attn_layers=[0], dtype=torch.float32,
    ))
    with torch.inference_mode():
        model = patcher(comfy.model_base.SD3(cfg, device=mm.unet_offload_device()), 0)
    keys = cl.lora_keys(model)
    attn2 = {f"transformer_blocks.0.attn2.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")}
    assert list(keys) == flat(expected_sd3_modules(2) | attn2)
    check_keys_are_comfyuis(model, keys)
    before = state(model)
    refiner, losses = train(tr, model, build_cache(tr, nc, model, FAMILY, n=1, steps=2), steps=2).args
    assert all(torch.isfinite(torch.tensor(losses))) and untouched(model, before)
    assert all(float(refiner.pairs[k][1].abs().max()) > 0 for k in flat(attn2))


# -- training, saving, loading -----------------------------------------------------------------------

def test_training_on_sd3_lowers_the_msd_loss_and_leaves_the_model_unchanged(tr, rf, cl, core, model, cache):
    before = state(model)
    refiner, losses = train(tr, model, cache, steps=6).args
    print("SD3 MSD losses:", [round(v, 5) for v in losses])
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] * 0.98, losses
    assert isinstance(refiner, rf.Refiner) and refiner.model_kind.value == "flow"
    assert set(refiner.pairs) == set(cl.lora_keys(model))
    assert any(float(up.abs().max()) > 0 for _, up, _ in refiner.pairs.values())
    assert json.loads(refiner.metadata["noisecraft.targets"]) == list(core.TRANSFORMER_TARGETS)
    assert untouched(model, before)
    params = list(model.model.parameters())
    assert all(p.grad is None for p in params) and all(p.requires_grad for p in params)


def test_a_slice_adapter_changes_only_its_rows_of_the_fused_qkv(cl, model):
    """Training on ``to_k`` (a row slice of ``qkv``) moves those rows only, as ComfyUI's loader applies it; the
    inference switch's :class:`Target` applies the same pair the same way."""
    lora = cl.TrainableLoRA(model, 2, 2.0, seed=0)
    key = "lora_transformer_transformer_blocks_0_attn_to_k"
    a = lora.adapters[key]
    with torch.inference_mode(False):
        with torch.no_grad():
            a.lora_up.weight.fill_(0.5)
        w = dict(model.model.named_parameters())[lora.weight_keys[key]].detach().clone()
        lora.switch.enabled = True
        out = a(w)
        down, up, alpha = lora.pairs()[key]
        _, offset = cl.lora_keys(model)[key]
        torch.testing.assert_close(cl.Target(lora.weight_keys[key], down, up, alpha / 2, offset).apply(w), out)
    _, start, size = offset
    changed = (out != w).any(dim=1).nonzero().flatten()
    assert changed.min() >= start and changed.max() < start + size and len(changed) == size
    assert out.shape == w.shape


@pytest.fixture()
def loras(tmp_path, rf, model_folders):
    """ComfyUI's models/loras in a temporary folder: Save Refiner's default, read by Load Refiner and the stock
    LoRA loaders."""
    folder = tmp_path / "loras"
    folder.mkdir()
    with model_folders(tmp_path, ("noise_refiners", "loras"), rf, set_paths=("loras",)):
        yield folder


def denoise_once(nc, model, pos, e):
    """``D(x_T, sigma_max)`` at cfg 1 with the positive prompt, through ComfyUI's guider."""
    smax = nc.bridge.sigma_max(model)
    factor = nc.core_sigmas.start_factor(nc.bridge.model_kind(model), smax)

    def fn(ctx):
        return ctx.denoiser(e.to(ctx.device) * factor, torch.full((e.shape[0],), smax)).cpu()

    return nc.bridge.run_core(model, pos, pos, e, fn, sigmas=torch.tensor([smax, 0.0]), cfg=1.0), smax


def check_round_trip(tr, rf, nc, model, refiner, pos, latent, loras, caplog, name: str) -> None:
    """Save Refiner's file: Load Refiner reads the same pairs, Refine Noise applies it, and the stock
    LoraLoaderModelOnly maps every key and gives the same refined noise (``D_lora`` from the patched model)."""
    name = tr.SaveRefiner.execute(refiner, name, "loras").args[0]
    with safe_open(str(loras / name), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["noisecraft.model_kind"] == "flow" and meta["noisecraft.base_model"] == nc.bridge.model_name(model)
    assert {k.split(".")[0] for k in keys} == set(refiner.pairs)
    loaded = rf.LoadRefiner.execute(name).args[0]
    assert equal_pairs(loaded, refiner)
    core = importlib.import_module(nc.noise.__name__.split(".")[0] + ".noisecraft.lora")
    pairs, _ = core.read_refiner_pairs(loras / name)  # the core's (CLI, diffusers host) parser
    assert equal_pairs(rf.Refiner(pairs, {}, name), refiner)
    e = Noise_RandomNoise(SEED).generate_noise(latent)
    with torch.inference_mode():
        e_hat = rf.RefineNoise.execute(Noise_RandomNoise(SEED), model, loaded, pos, 1.0).args[0].generate_noise(latent)
    assert (e_hat - e).abs().max() > 1e-5  # the refiner does something

    caplog.clear()
    with caplog.at_level("WARNING"):
        patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    assert "lora key not loaded" not in caplog.text
    assert sum(len(v) for v in patched.patches.values()) == len(refiner.pairs)  # q, k, v: three on one qkv
    with torch.inference_mode():
        d_base, smax = denoise_once(nc, model, pos, e)
        d_stock, _ = denoise_once(nc, patched, pos, e)
    # The stock loader adds the same float32 delta (ComfyUI's LoRAAdapter, alpha = rank) to the same weights, so
    # D_lora agrees to the last bit; what can differ is the residual's arithmetic, e + (D_base - D_lora) / sigma_max
    # in another order: a few float32 roundings of numbers of the size of e and of the residual.
    want = e + (d_base - d_stock) / smax
    tol = 8 * torch.finfo(torch.float32).eps * float(e.abs().max() + (d_base - d_stock).abs().max() / smax)
    print(f"{nc.bridge.model_name(model)}: Refine Noise vs the stock loader's D_lora: max |diff| "
          f"{float((e_hat - want).abs().max()):.3g} (tolerance {tol:.3g})")
    torch.testing.assert_close(e_hat, want, rtol=0, atol=tol)


def test_saved_sd3_refiner_loads_in_load_refiner_refine_noise_and_the_stock_lora_loader(tr, rf, nc, model, trained,
                                                                                         loras, caplog):
    pos, _ = nc.conds(FAMILY)
    check_round_trip(tr, rf, nc, model, trained.args[0], pos, nc.latent(FAMILY, size=8, empty_4ch=False), loras,
                     caplog, "tiny_sd3_refiner")


def flux_prompt(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 8, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                     "guidance": 3.5}]]


def test_flux_trains_saves_and_refines_like_the_stock_lora_loader(tr, rf, nc, loras, caplog):
    """The same chain on a Flux-class model (double and single blocks; to_q/k/v and proj_mlp slices of fused
    weights): the loss falls, and the saved file round-trips through Load Refiner, Refine Noise and the stock
    loader."""
    model = tiny_flux()
    before, params = state(model), list(model.model.parameters())
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    with torch.inference_mode():
        cache = tr.BuildTeacherCache.execute(model, flux_prompt(1) + flux_prompt(2), flux_prompt(3), latent, 2, 5,
                                             4.0, 3, "simple").args[0]
    refiner, losses = train(tr, model, cache, steps=6, learning_rate=1e-2).args
    print("Flux MSD losses:", [round(v, 6) for v in losses])
    assert losses[-1] < losses[0] * 0.98, losses
    assert any(float(up.abs().max()) > 0 for _, up, _ in refiner.pairs.values()) and untouched(model, before)
    # the copies of the inference tensors outside ComfyUI's cast path (RMSNorm scales) are gone again
    assert all(a is b for a, b in zip(params, model.model.parameters()))
    check_round_trip(tr, rf, nc, model, refiner, flux_prompt(1), latent, loras, caplog, "tiny_flux_refiner")


def test_a_named_sd3_run_resumes_after_an_interrupt_and_equals_the_uninterrupted_run(tr, model, cache, tmp_path,
                                                                                     monkeypatch):
    """CPU float32 is deterministic: the run resumed from the interrupt's checkpoint is the full one, bit for bit."""
    monkeypatch.setattr(tr, "CHECKPOINT_EVERY", 100)  # only the interrupt writes a checkpoint
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    full, full_losses = train(tr, model, cache, steps=4, resume_from="full").args

    def cancel_at_step_2(value, total, preview, node_id=None):  # the server's hook, and a Cancel at step 2
        mm.throw_exception_if_processing_interrupted()
        mm.interrupt_current_processing(value == 2)

    comfy.utils.set_progress_bar_global_hook(cancel_at_step_2)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(tr, model, cache, steps=4, resume_from="cut")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert (tmp_path / "noisecraft_runs" / "cut" / "checkpoint.safetensors").is_file()
    before = state(model)
    resumed, losses = train(tr, model, cache, steps=4, resume_from="cut").args
    assert equal_pairs(resumed, full) and losses == full_losses and untouched(model, before)


# -- bad inputs --------------------------------------------------------------------------------------

def tiny_auraflow(seed=0):
    """An AuraFlow ModelPatcher (a DiT ComfyUI samples, but of no family the trainer supports)."""
    cfg = comfy.supported_models.AuraFlow(dict(
        max_seq=64, cond_seq_dim=64, in_channels=4, out_channels=4, dim=64, n_layers=2, n_double_layers=1,
        n_heads=2, patch_size=2, dtype=torch.float32))
    with torch.inference_mode():
        return patcher(comfy.model_base.AuraFlow(cfg, device=mm.unet_offload_device()), seed)


def test_a_model_the_trainer_cannot_handle_lists_the_supported_families(tr, nc, cache):
    model = tiny_auraflow()
    families = (r"this MODEL has no layers the refiner LoRA can target: expected a model of a family the ComfyUI "
                r"trainer supports \(UNet: SD1.x, SD2.x, SDXL; MMDiT: SD3, SD3.5; Flux-class: Flux.1 .*\), got "
                r"AuraFlow \(diffusion model MMDiT\). Connect a model of one of those families")
    with pytest.raises(ValueError, match=rf"^Train Refiner: {families}"):
        train(tr, model, cache, steps=1)
    _, neg = nc.conds(FAMILY)
    with pytest.raises(ValueError, match=rf"^Build Teacher Cache: {families}"):
        with torch.inference_mode():
            tr.BuildTeacherCache.execute(model, prompts(nc), neg, nc.latent(FAMILY, size=8), 1, 0, 5.0, 1, "normal")


def test_chroma_is_a_listed_flux_class_with_flux_keys(cl):
    """Chroma (comfy.model_base.Chroma, a Flux subclass listed by exact class) has Flux.1's blocks: the same keys,
    all of them in ComfyUI's own LoRA key map."""
    cfg = comfy.supported_models.Chroma(dict(
        image_model="chroma", in_channels=16, out_channels=16, context_in_dim=4096, hidden_size=64, mlp_ratio=4.0,
        num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
        in_dim=64, out_dim=64, hidden_dim=128, n_layers=1, dtype=torch.float32))
    with torch.inference_mode():
        model = patcher(comfy.model_base.Chroma(cfg, device=mm.unet_offload_device()), 0)
    keys = cl.lora_keys(model)
    assert list(keys) == list(cl.lora_keys(tiny_flux())) and cl.dit_family(model.model) == "flux"
    check_keys_are_comfyuis(model, keys)


class FluxNext(comfy.model_base.Flux):
    """A model class built on ComfyUI's Flux, as newer ComfyUI's Flux2 and LongCatImage are."""


class SD3Next(comfy.model_base.SD3):
    pass


@pytest.mark.parametrize("klass", [FluxNext, SD3Next])
def test_a_subclass_of_a_dit_family_is_refused_naming_it(tr, nc, cl, cache, klass):
    if klass is FluxNext:
        model = tiny_flux()
    else:
        with torch.inference_mode():
            model = nc.tiny.build(FAMILY, seed=0)
    model.model.__class__ = klass  # the same network, under a model class the trainer does not know
    name = rf"this MODEL is a {__name__}\.{klass.__name__}, a subclass of ComfyUI's {klass.__bases__[0].__name__}"
    with pytest.raises(ValueError, match=rf"^Train Refiner: {name} .*expected exactly one of SD3, Flux, Chroma"):
        cl.lora_keys(model)
    with pytest.raises(ValueError, match=rf"^Train Refiner: {name}"):
        train(tr, model, cache, steps=1)
    assert cl.dit_family(tiny_flux().model) == "flux"


def test_a_flow_models_cache_with_an_eps_model_is_refused(tr, nc, cache):
    with pytest.raises(ValueError, match=r"Train Refiner: teacher_cache: .*another model family: expected a cache "
                                         r"from a diffusion \(eps-prediction\) model like this MODEL \(SD15.*got one "
                                         r"built with a flow \(velocity-prediction\) model \(SD3.*Build the teacher "
                                         r"cache with the MODEL you train"):
        train(tr, nc.model("sd15"), cache, steps=1)


def test_an_eps_models_cache_with_a_flow_model_is_refused(tr, nc, model):
    sd15 = nc.model("sd15")
    eps_cache = build_cache(tr, nc, sd15, "sd15", n=1, steps=1)
    with pytest.raises(ValueError, match=r"Train Refiner: teacher_cache: .*expected a cache from a flow "
                                         r"\(velocity-prediction\) model like this MODEL \(SD3.*got one built with a "
                                         r"diffusion \(eps-prediction\) model \(SD15"):
        train(tr, model, eps_cache, steps=1)
