"""A refiner crosses hosts: CLI (diffusers UNet + :mod:`noisecraft.lora`) <-> ComfyUI (Load Refiner / Refine Noise).

The same small network exists twice: the tiny SD1.5-shaped ComfyUI model (``tiny_models.build("sd15")``)
and a diffusers ``UNet2DConditionModel`` whose config is derived from the ComfyUI ``unet_config`` and whose
weights are copied through ComfyUI's own diffusers -> ldm map (``comfy.utils.unet_to_diffusers``). The tiny
config (2 heads, all blocks with one transformer) is expressible in diffusers as is: ``attention_head_dim``
of ``UNet2DConditionModel`` is the head *count* (the SD1.x naming), so ``num_heads = 2`` maps to it.

Then (1) a refiner made on the diffusers host and saved by ``LoRASet.save`` refines ComfyUI's noise like the
core's ``refine_noise`` on ``DiffusersDenoiser`` does, and ComfyUI's stock LoRA loader maps every key; and
(2) a refiner trained (or made) in ComfyUI and written by Save Refiner, loaded with ``noisecraft.hosts.adapters.load_lora``
onto the diffusers UNet, gives the same refined noise as Refine Noise in ComfyUI; and (3) Train Refiner and the
CLI engine (``train_refiner`` on the diffusers copy) train the same LoRA from the same teacher cache and seed.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import comfy.utils
import nodes as comfy_nodes
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

SEED = 3
TOL = dict(rtol=1e-4, atol=1e-4)


def _pack(nc) -> str:
    return nc.noise.__name__.split(".")[0]


@pytest.fixture(scope="module")
def core(nc):
    pack = _pack(nc)
    ns = type("Core", (), {})()
    ns.lora = importlib.import_module(pack + ".noisecraft.lora")
    ns.adapters = importlib.import_module(pack + ".noisecraft.hosts.adapters")
    ns.refine = importlib.import_module(pack + ".noisecraft.refine")
    ns.host = importlib.import_module(pack + ".noisecraft.hosts.diffusers")
    ns.sigmas = importlib.import_module(pack + ".noisecraft.sigmas")
    return ns


@pytest.fixture(scope="module")
def model(nc):
    with torch.inference_mode():  # as after ComfyUI's checkpoint loading (weights are inference tensors)
        return nc.tiny.build("sd15", seed=0)


def diffusers_config(unet_config: dict) -> dict:
    """``UNet2DConditionModel`` kwargs for a ComfyUI SD1.x/SD2.x-style (no ADM) ``unet_config``."""
    nrb = list(unet_config["num_res_blocks"])
    if len(set(nrb)) != 1:
        raise ValueError(f"diffusers needs one layers_per_block, got num_res_blocks={nrb}")
    mc, mult = unet_config["model_channels"], unet_config["channel_mult"]
    depth = unet_config["transformer_depth"]  # one entry per resnet of the down path
    per_block = [depth[i * nrb[0]:(i + 1) * nrb[0]] for i in range(len(mult))]
    if any(len(set(d)) != 1 or d[0] > 1 for d in per_block):
        raise ValueError(f"transformer_depth {depth} is not one (0 or 1) per down block")
    down = tuple("CrossAttnDownBlock2D" if d[0] > 0 else "DownBlock2D" for d in per_block)
    heads, head_ch = unet_config.get("num_heads", -1), unet_config.get("num_head_channels", -1)
    channels = tuple(mc * m for m in mult)
    if heads and heads > 0:
        attention_heads = heads  # diffusers' attention_head_dim is the head count (SD1.x naming)
    else:  # fixed head width: a per-block head count
        attention_heads = tuple(c // head_ch for c in channels)
    return dict(
        sample_size=unet_config["image_size"], in_channels=unet_config["in_channels"],
        out_channels=unet_config["out_channels"], block_out_channels=channels, layers_per_block=nrb[0],
        cross_attention_dim=unet_config["context_dim"], attention_head_dim=attention_heads,
        down_block_types=down, up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        mid_block_type="UNetMidBlock2DCrossAttn" if unet_config.get("transformer_depth_middle", 0) else None,
        use_linear_projection=bool(unet_config["use_linear_in_transformer"]), norm_num_groups=32,
        flip_sin_to_cos=True, freq_shift=0, transformer_layers_per_block=1,
    )


@pytest.fixture(scope="module")
def unet(model):
    from diffusers import UNet2DConditionModel

    uc = model.model.model_config.unet_config
    net = UNet2DConditionModel(**diffusers_config(uc))
    ldm = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(uc)  # diffusers key -> ldm key
    target = net.state_dict()
    assert set(target) <= set(mapping), sorted(set(target) - set(mapping))[:5]
    net.load_state_dict({k: ldm[mapping[k]].clone().reshape(target[k].shape) for k in target})
    net.eval().requires_grad_(False)
    return net


@pytest.fixture(scope="module")
def table(core, model):
    return core.host.sigma_table_from_scheduler(
        {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"})


@pytest.fixture
def models_dir(tmp_path, rf, model_folders):
    (tmp_path / "loras").mkdir()
    with model_folders(tmp_path, ("noise_refiners", "loras"), rf, set_paths=("loras",)):
        yield tmp_path


def positive(nc):
    return nc.tiny.conditioning("sd15", 1, 1)  # [[ctx [1, 77, 768], {}]]


def comfy_refine(rf, nc, model, name):
    """(e, e_hat) from Load Refiner + Refine Noise on the ComfyUI model (cfg 1, positive prompt)."""
    lat = nc.latent("sd15")
    with torch.inference_mode():
        ref = rf.LoadRefiner.execute(name).args[0]
        noise = rf.RefineNoise.execute(Noise_RandomNoise(SEED), model, ref, positive(nc), 1.0).args[0]
        e_hat = noise.generate_noise(lat).clone()
    return Noise_RandomNoise(SEED).generate_noise(lat), e_hat


def cli_refine(core, unet, table, nc, lora, e):
    """The core's refine_noise on the diffusers host (DiffusersDenoiser, same conditioning, cfg 1)."""
    den = core.host.DiffusersDenoiser(unet, table, positive(nc)[0][0], cfg=1.0)
    d_base, d_lora = lora.base_and_lora(den)
    with torch.no_grad():
        return core.refine.refine_noise(e, d_base, d_lora, "eps", table.sigma_max, 1.0)


def stock_loader_maps_every_key(model, name, n_layers, caplog):
    caplog.clear()
    with caplog.at_level("WARNING"):
        patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    assert "lora key not loaded" not in caplog.text
    assert len(patched.patches) == n_layers


# -- the two UNets are one network -----------------------------------------------------------------

def test_diffusers_copy_computes_the_comfy_unet(nc, model, unet, table):
    ms = model.get_model_object("model_sampling")
    torch.testing.assert_close(table.sigmas, ms.sigmas.float(), rtol=1e-6, atol=0)
    smax = nc.bridge.sigma_max(model)
    assert abs(table.sigma_max - smax) < 1e-4 and abs(smax - 14.6146) < 1e-3
    assert float(table.timestep(smax)) == float(ms.timestep(torch.tensor([smax]))[0]) == 999.0

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 768, generator=g)
    worst = 0.0
    with torch.no_grad():
        for t in (999.0, 500.0, 0.0):
            ts = torch.full((2,), t)
            a = model.model.diffusion_model(x, ts, context=ctx)
            b = unet(x, ts, encoder_hidden_states=ctx, return_dict=False)[0]
            worst = max(worst, float((a - b).abs().max()))
    print(f"\nforward: max|comfy - diffusers| = {worst:.3g}")
    assert worst < 1e-5, worst


def test_denoisers_agree_at_sigma_max(nc, core, model, unet, table):
    e = Noise_RandomNoise(SEED).generate_noise(nc.latent("sd15"))
    smax = nc.bridge.sigma_max(model)
    factor = nc.core_sigmas.start_factor(nc.bridge.model_kind(model), smax)
    pos = positive(nc)

    def fn(ctx):
        return ctx.denoiser(e.to(ctx.device) * factor, torch.full((1,), smax)).cpu()

    d_comfy = nc.bridge.run_core(model, pos, pos, e, fn, sigmas=torch.tensor([smax, 0.0]), cfg=1.0)
    with torch.no_grad():
        d_cli = core.host.DiffusersDenoiser(unet, table, pos[0][0])(e * factor, torch.full((1,), smax))
    print(f"\nD(x_T, sigma_max): max|comfy - diffusers host| = {float((d_cli - d_comfy).abs().max()):.3g}")
    torch.testing.assert_close(d_cli, d_comfy, rtol=1e-5, atol=1e-4)


# -- (1) CLI host -> ComfyUI -------------------------------------------------------------------------

def test_cli_refiner_works_in_comfyui_and_the_stock_loader(nc, rf, core, model, unet, table, models_dir, caplog):
    lora = core.adapters.attach_lora(unet, rank=4, alpha=8.0, seed=7)
    try:
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for layer in lora.layers.values():
                w = layer.lora_up.weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
        name = "cli_refiner.safetensors"
        lora.save(models_dir / "loras" / name, metadata={"model_kind": "eps", "base_model": "tiny-sd15"})
        e, e_comfy = comfy_refine(rf, nc, model, name)
        e_cli = cli_refine(core, unet, table, nc, lora, e)
        n_layers = len(lora.layers)
    finally:
        lora.remove()
    assert float((e_cli - e).abs().max()) > 1e-2  # the refiner does something
    print(f"\nCLI -> ComfyUI: max|e_hat_comfy - e_hat_cli| = {float((e_comfy - e_cli).abs().max()):.3g}, "
          f"max|residual| = {float((e_cli - e).abs().max()):.3g}, {n_layers} layers")
    torch.testing.assert_close(e_comfy, e_cli, **TOL)
    assert len(rf.LoadRefiner.execute(name).args[0].pairs) == n_layers
    stock_loader_maps_every_key(model, name, n_layers, caplog)


# -- (2) ComfyUI -> CLI host -------------------------------------------------------------------------

def trained_refiner(nc, tr, model):
    with torch.inference_mode():
        _, neg = nc.conds("sd15")
        pos = nc.tiny.conditioning("sd15", 10, 1) + nc.tiny.conditioning("sd15", 11, 1)
        cache = tr.BuildTeacherCache.execute(model, pos, neg, nc.latent("sd15", size=8), 1, 5, 7.0, 3,
                                             "normal").args[0]
        refiner, losses = tr.TrainRefiner.execute(model, cache, 3, 2, 2, 1e-2, 4, 0.0, 1).args
    assert len(losses) == 3
    return refiner


def random_refiner(rf, tr, model):
    """A random refiner in ComfyUI key space (Train Refiner's keys and shapes, random up and down)."""
    g = torch.Generator().manual_seed(5)
    weights = dict(model.model.named_parameters())
    pairs = {}
    for key, wkey in tr.lora_keys(model).items():
        w = weights[wkey]
        down = torch.randn((4, *w.shape[1:]), generator=g) * 0.05
        up = torch.randn((w.shape[0], 4, *([1] * (w.ndim - 2))), generator=g) * 0.05
        pairs[key] = (down, up, 8.0)
    return rf.Refiner(pairs, {"noisecraft.kind": "refiner", "noisecraft.model_kind": "eps"}, "random")


@pytest.mark.parametrize("how", ["trained", "random"])
def test_comfyui_refiner_works_in_the_cli_host(nc, rf, tr, core, model, unet, table, models_dir, caplog, how):
    refiner = trained_refiner(nc, tr, model) if how == "trained" else random_refiner(rf, tr, model)
    name = tr.SaveRefiner.execute(refiner, f"comfy_{how}", "loras").args[0]
    path = models_dir / "loras" / name
    e, e_comfy = comfy_refine(rf, nc, model, name)
    lora = core.adapters.load_lora(unet, path)
    try:
        assert len(lora.layers) == len(refiner.pairs)
        e_cli = cli_refine(core, unet, table, nc, lora, e)
    finally:
        lora.remove()
    residual = float((e_cli - e).abs().max())
    assert residual > (1e-5 if how == "trained" else 1e-2), residual  # the refiner does something
    print(f"\nComfyUI ({how}) -> CLI: max|e_hat_comfy - e_hat_cli| = {float((e_comfy - e_cli).abs().max()):.3g}, "
          f"max|residual| = {residual:.3g}, {len(refiner.pairs)} layers")
    torch.testing.assert_close(e_cli, e_comfy, **TOL)
    stock_loader_maps_every_key(model, name, len(refiner.pairs), caplog)


def test_save_refiner_writes_conv_loras_in_kohya_shapes(nc, rf, tr, model, models_dir):
    """Train Refiner + Save Refiner write conv LoRAs as [rank, in, kh, kw] / [out, rank, 1, 1] (kohya), not
    flattened: other tools and noisecraft.hosts.adapters.load_lora read them (a flattened file was found and fixed)."""
    from safetensors.torch import load_file

    refiner = trained_refiner(nc, tr, model)
    name = tr.SaveRefiner.execute(refiner, "comfy_shapes", "loras").args[0]
    state = load_file(str(models_dir / "loras" / name))
    weights = dict(model.model.named_parameters())
    keys = tr.lora_keys(model)
    conv = 0
    for key in [k for k in state if k.endswith(".lora_down.weight")]:
        p = key[: -len(".lora_down.weight")]
        w = weights[keys[p]]
        if w.ndim == 4:
            conv += 1
            assert state[key].shape[1:] == w.shape[1:], key
            assert state[f"{p}.lora_up.weight"].shape == (w.shape[0], state[key].shape[0], 1, 1), key
    assert conv > 0


# -- (3) the same training on both hosts ---------------------------------------------------------------

def _relative_up_difference(a: dict, b: dict) -> float:
    """||up_a - up_b|| / ||up_a|| over every layer (the up weights start at zero: their norm is the update)."""
    diff = sum(float((a[k][1] - b[k][1]).double().pow(2).sum()) for k in a) ** 0.5
    norm = sum(float(a[k][1].double().pow(2).sum()) for k in a) ** 0.5
    assert norm > 0  # nothing was trained otherwise
    return diff / norm


def test_comfyui_training_gives_the_cli_engines_lora(nc, tr, core, model, unet, table, tmp_path):
    """Train Refiner in ComfyUI and ``train_refiner`` on the diffusers copy, same teacher cache (the node's
    in-memory one), schedule, seed and settings, give the same LoRA.

    Tolerance, from the arithmetic: the two forwards are the same float32 network evaluated in another
    order (ComfyUI merges the LoRA into the weight, ``W + s * up @ down``, peft adds it to the activation,
    ``x W^T + s * B(A x)``), so every loss and gradient agrees to a few ulps relative (u = 2^-24 ~ 6e-8;
    the loss is a mean over 4 x 4 x 8 x 8 = 1024 elements: n * u ~ 6e-5). Both LoRAs start identical (the
    same seeded init in the same layer order, up = 0; the student schedules agree to 1e-5). AdamW
    normalises each gradient component: a relative gradient error becomes a relative update error of the
    same size, except on components whose gradient lies within rounding of zero, where g / (|g| + eps)
    can move by up to 2 lr per step: the max-abs difference is not bounded by rounding, the relative L2
    of the up weights (the whole update) is: <= 1e-3, over 10x the n * u bound (measured 4e-5). The
    control, the same CLI training on other teacher data (the x0 of the samples rolled by one: what a
    data-order or key-mapping bug gives), must differ by >= 5e-2 (measured 1.2), so the comparison can
    fail.
    """
    trainer = importlib.import_module(_pack(nc) + ".noisecraft.train.refiner")
    tc = importlib.import_module(_pack(nc) + ".noisecraft.train.teacher_cache")
    steps, student, lr, rank, seed = 4, 2, 1e-2, 4, 1
    with torch.inference_mode():
        _, neg = nc.conds("sd15")
        pos = nc.tiny.conditioning("sd15", 10, 1) + nc.tiny.conditioning("sd15", 11, 1)
        cache = tr.BuildTeacherCache.execute(model, pos, neg, nc.latent("sd15", size=8), 2, 5, 7.0, 3,
                                             "normal").args[0]
        refiner, comfy_losses = tr.TrainRefiner.execute(model, cache, steps, student, 4, lr, rank, 0.0, seed).args
    comfy_sigmas = nc.bridge.get_sigmas(model, "normal", student)
    cli_sigmas = core.sigmas.get_sigmas(table, "normal", student)
    torch.testing.assert_close(cli_sigmas, comfy_sigmas, rtol=1e-5, atol=0)
    conds = torch.cat([p[0][0] for p in cache.prompts])  # [P, 77, 768], row p for condition id p
    host = core.host.RefinerHost(unet, table, conds, base_model="tiny-sd15")
    config = trainer.RefinerTrainConfig(steps=steps, lr=lr, weight_decay=0.0, batch_size=4, max_grad_norm=None,
                                        precision="fp32", seed=seed, rank=rank, alpha=float(rank),
                                        student_steps=student, scheduler="normal", lora_seed=seed,
                                        checkpoint_every=1000)

    def cli_train(data, out):
        res = trainer.train_refiner(host, data, tmp_path / out, config)
        res.lora.remove()
        return core.lora.read_refiner_pairs(res.refiner_path)[0], res.losses

    cli, cli_losses = cli_train(cache.data, "cli")
    assert cli.keys() == refiner.pairs.keys()
    rel = _relative_up_difference(cli, refiner.pairs)
    down = max(float((cli[k][0] - refiner.pairs[k][0]).abs().max()) for k in cli)
    full = cache.data.get(range(len(cache)))
    other = tc.TeacherCache.in_memory(full.e, full.x0.roll(1, 0), full.cond, conds=cache.data.conds,
                                      meta=cache.data.meta)
    control = _relative_up_difference(cli_train(other, "control")[0], refiner.pairs)
    print(f"\nComfyUI vs CLI training: relative L2 of the up weights {rel:.3g}, max|down diff| {down:.3g}, losses "
          f"{comfy_losses} vs {cli_losses}; control (other data) {control:.3g}")
    # the losses: n * u on the same weights, plus the first-order effect of the weights' difference (measured 4e-6)
    torch.testing.assert_close(torch.tensor(comfy_losses), torch.tensor(cli_losses), rtol=1e-3, atol=0)
    assert rel <= 1e-3, rel
    assert control >= 5e-2, control
