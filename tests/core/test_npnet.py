"""NPNet (Zhou et al., "Golden Noise for Diffusion Models: A Learning Framework", arXiv:2411.09502):
the official checkpoint layout, the three file flavours, the forward checked against an
independent path written here, and the errors for wrong files.

Nothing is downloaded: the test writes an official-layout checkpoint with seeded random weights.
The layout below is written from DESIGN.md and timm's swin_tiny_patch4_window7_224, not taken
from noisecraft. Tier 1: torch + safetensors, CPU. One test also needs timm (skipped without it).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from noisecraft import npnet as nn_mod
from noisecraft.npnet import (
    NPNet,
    NPNetConfig,
    convert_pth_to_safetensors,
    load_npnet,
    npnet_from_state_dict,
    official_state_dict,
    save_npnet_safetensors,
)

SWIN_DIMS = (96, 192, 384, 768)
SWIN_DEPTHS = (2, 2, 6, 2)
SWIN_HEADS = (3, 6, 12, 24)


# -- the official layout, written independently -------------------------------------------------


def official_layout(width: int = 2048, tokens: int = 77, channels: int = 4, size: int = 128) -> dict:
    """{group: {key: shape}} of the official .pth (shape () marks the int64 BatchNorm counter)."""
    emb: dict = {"upconv.weight": (channels, 7, 1, 1), "upconv.bias": (channels,),
                 "downconv.weight": (3, channels, 1, 1), "downconv.bias": (3,)}
    sw = {"patch_embed.proj.weight": (96, 3, 4, 4), "patch_embed.proj.bias": (96,),
          "patch_embed.norm.weight": (96,), "patch_embed.norm.bias": (96,)}
    for i, (d, depth, h) in enumerate(zip(SWIN_DIMS, SWIN_DEPTHS, SWIN_HEADS)):
        if i > 0:  # timm >= 0.9: patch merging at the start of stages 1..3
            p = SWIN_DIMS[i - 1]
            sw[f"layers.{i}.downsample.norm.weight"] = (4 * p,)
            sw[f"layers.{i}.downsample.norm.bias"] = (4 * p,)
            sw[f"layers.{i}.downsample.reduction.weight"] = (d, 4 * p)
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            sw.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                       b + "attn.relative_position_bias_table": (169, h),
                       b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                       b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                       b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                       b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    sw.update({"norm.weight": (768,), "norm.bias": (768,), "head.fc.weight": (1000, 768), "head.fc.bias": (1000,)})
    emb.update({f"swin.{k}": v for k, v in sw.items()})
    k = channels // 2 * size  # 256 for 4 x 128 x 128 (2 x 2 tiles)
    svd = {}
    for name in ("mlp1", "mlp2"):
        svd.update({f"{name}.0.weight": (64, k), f"{name}.0.bias": (64,), f"{name}.2.weight": (k, 64), f"{name}.2.bias": (k,)})
    svd.update({"mlp3.0.weight": (k, k), "mlp3.0.bias": (k,), "attention.qkv.weight": (3 * k, k),
                "attention.proj.weight": (k, k), "attention.proj.bias": (k,),
                "bn.weight": (k,), "bn.bias": (k,), "bn.running_mean": (k,), "bn.running_var": (k,),
                "bn.num_batches_tracked": (),
                "mlp4.0.weight": (1024, k), "mlp4.0.bias": (1024,), "mlp4.2.weight": (k, 1024), "mlp4.2.bias": (k,)})
    text = {"linear.weight": (2 * channels, tokens * width), "linear.bias": (2 * channels,)}
    return {"unet_embedding": emb, "unet_svd": svd, "embeeding": text, "alpha": (1,), "beta": (1,)}


def random_tensor(key: str, shape: tuple, g: torch.Generator) -> torch.Tensor:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.tensor(4321, dtype=torch.long)
    if leaf == "running_var":
        return 0.5 + torch.rand(shape, generator=g)
    if key in ("alpha", "beta"):
        return torch.randn(shape, generator=g)
    if leaf == "relative_position_bias_table":
        return 0.5 * torch.randn(shape, generator=g)
    if len(shape) == 1 and ("norm" in key or key.startswith("bn.")) and leaf == "weight":
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:
        return 0.05 * torch.randn(shape, generator=g)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def official_checkpoint(width: int = 2048, seed: int = 0) -> dict:
    """Nested dict as torch.save wrote the official file: OrderedDict state dicts with _metadata."""
    g = torch.Generator().manual_seed(seed)
    out: dict = {}
    for group, spec in official_layout(width).items():
        if isinstance(spec, dict):
            sd = OrderedDict((k, random_tensor(k, s, g)) for k, s in spec.items())
            sd._metadata = OrderedDict({"": {"version": 1}})  # what Module.state_dict() attaches
            out[group] = sd
        else:
            out[group] = random_tensor(group, spec, g)
    out["alpha"] = out["alpha"].abs() * 0.3 + 0.1
    return out


def flat(ckpt: dict, text_name: str) -> dict:
    out = {}
    for group, value in ckpt.items():
        if isinstance(value, dict):
            name = text_name if group == "embeeding" else group
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[group] = value
    return out


@pytest.fixture(scope="module")
def ckpt():
    return official_checkpoint()


@pytest.fixture(scope="module")
def files(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("npnet")
    paths = {"pth": d / "sdxl.pth", "text_embedding": d / "sdxl_te.safetensors", "embeeding": d / "sdxl_em.safetensors"}
    torch.save(ckpt, paths["pth"])
    save_file(flat(ckpt, "text_embedding"), str(paths["text_embedding"]))  # ComfyUI-NPNet repack
    save_file(flat(ckpt, "embeeding"), str(paths["embeeding"]))  # ComfyUI-Golden-Noise repack
    return paths


@pytest.fixture(scope="module")
def model(ckpt):
    return npnet_from_state_dict(ckpt, preset="sdxl")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 128, 128, generator=g), torch.randn(2, 77, 2048, generator=g)


# -- layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,width", [("sdxl", 2048), ("dreamshaper", 2048), ("dit", 1024)])
def test_module_has_the_official_layout(preset, width):
    with torch.device("meta"):
        m = NPNet(preset)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == flat(official_layout(width), "text_embedding")
    assert sum(k.startswith("unet_embedding.swin.") for k in got) == 173
    assert sum(k.startswith("unet_svd.") for k in got) == 22
    assert not any("relative_position_index" in k or "attn_mask" in k for k in got)
    assert got["text_embedding.linear.weight"] == (8, 77 * width)


# -- the three flavours ------------------------------------------------------------------------


def test_three_flavours_load_strictly_and_agree(files, ckpt, inputs):
    rng = torch.random.get_rng_state()
    models = {name: load_npnet(p, preset=preset) for (name, p), preset in zip(files.items(), ("sdxl", "SDXL", "sdxl"))}
    assert torch.equal(rng, torch.random.get_rng_state())  # loading touches no RNG
    ref = flat(ckpt, "text_embedding")
    for name, m in models.items():
        assert not m.training, name
        sd = m.state_dict()
        assert set(sd) == set(ref), name
        assert all(torch.equal(sd[k], ref[k]) for k in ref), name
    noise, prompt = inputs
    with torch.no_grad():
        outs = [m(noise[:1], prompt[:1]) for m in models.values()]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert torch.isfinite(outs[0]).all() and outs[0].shape == (1, 4, 128, 128)


def test_no_preset_reads_the_shape_from_the_tensors(ckpt):
    auto = npnet_from_state_dict(ckpt)  # SDXL and DreamShaper share shapes: no preset name
    assert auto.config == NPNetConfig(text_width=2048) and auto.preset is None
    del auto
    dit = dict(ckpt)
    g = torch.Generator().manual_seed(3)
    dit["embeeding"] = {"linear.weight": torch.randn(8, 77 * 1024, generator=g) * 0.003,
                        "linear.bias": torch.zeros(8)}
    m = npnet_from_state_dict(dit)
    assert m.preset == "dit" and m.config.text_width == 1024 and m.config.tokens == 77
    with pytest.raises(ValueError, match=r"77 x 1024 .*preset 'sdxl' expects 77 x 2048.*use preset 'dit'"):
        npnet_from_state_dict(dit, preset="sdxl", source="dit.safetensors")


# -- golden numbers: the forward against an independent path -----------------------------------


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _svd_by_hand(x, sd):
    """SVDNoiseUnet by hand: 2x2 channel tiling, torch.linalg.svd, the MLPs and 8-head attention."""
    top = torch.cat([x[:, 0], x[:, 1]], dim=-1)
    bottom = torch.cat([x[:, 2], x[:, 3]], dim=-1)
    m = torch.cat([top, bottom], dim=-2)  # [B, 256, 256]
    u, s, vh = torch.linalg.svd(m)
    relu = torch.relu
    z = (_lin(relu(_lin(u.transpose(1, 2), sd, "mlp1.0")), sd, "mlp1.2")
         + _lin(relu(_lin(vh, sd, "mlp2.0")), sd, "mlp2.2")
         + _lin(s, sd, "mlp3.0")[:, None, :])
    b, n, c = z.shape
    q, k, v = (z @ sd["attention.qkv.weight"].T).split(c, dim=-1)
    heads = lambda t: t.reshape(b, n, 8, c // 8).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // 8), dim=-1) @ v
    z = _lin(att.transpose(1, 2).reshape(b, n, c), sd, "attention.proj").mean(dim=1)
    s_new = _lin(relu(_lin(z, sd, "mlp4.0")), sd, "mlp4.2") + s
    pred = u @ torch.diag_embed(s_new) @ vh
    h = x.shape[-1]
    return torch.stack([pred[:, :h, :h], pred[:, :h, h:], pred[:, h:, :h], pred[:, h:, h:]], dim=1)


def _modulation_by_hand(x, prompt, sd):
    """AdaGroupNorm(77*width, 4, 1 group, eps 1e-6): per-sample normalisation over C, H, W."""
    e = prompt.reshape(prompt.shape[0], -1) @ sd["linear.weight"].T + sd["linear.bias"]
    scale, shift = e[:, :4, None, None], e[:, 4:, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + 1e-6) * (1 + scale) + shift


def test_golden_numbers_against_an_independent_path(model, ckpt, inputs):
    noise, prompt = inputs  # two different prompts, one per batch item
    svd_sd, text_sd, emb_sd = ckpt["unet_svd"], ckpt["embeeding"], ckpt["unet_embedding"]
    seen = {}
    hooks = [
        model.unet_embedding.register_forward_hook(lambda m, a, o: seen.update(branch_in=a[0], branch_out=o)),
        model.unet_embedding.swin.patch_embed.register_forward_hook(lambda m, a, o: seen.update(swin_in=a[0])),
        model.unet_embedding.swin.norm.register_forward_hook(lambda m, a, o: seen.update(swin_out=o)),
    ]
    try:
        with torch.no_grad():
            out = model(noise, prompt)
    finally:
        for h in hooks:
            h.remove()

    t = _modulation_by_hand(noise, prompt, text_sd)
    torch.testing.assert_close(model.text_modulation(noise, prompt), t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["branch_in"], noise + t, rtol=1e-5, atol=1e-5)

    # Swin branch glue: nearest 128 -> 224 (source floor(i * 128 / 224)), 1x1 conv 4 -> 3
    idx = torch.arange(224) * 128 // 224
    up = seen["branch_in"][:, :, idx[:, None], idx[None, :]]
    down = torch.einsum("oc,bchw->bohw", emb_sd["downconv.weight"][:, :, 0, 0], up) + emb_sd["downconv.bias"][:, None, None]
    torch.testing.assert_close(seen["swin_in"], down, rtol=1e-5, atol=1e-5)
    # ... and back: NHWC [B, 7, 7, 768] read as NCHW, nearest to 128 x 128: channel = grid row,
    # output row i <- grid column floor(7 i / 128), output column j <- feature 6 j; then 1x1 conv 7 -> 4
    f = seen["swin_out"]
    assert f.shape == (2, 7, 7, 768)
    rows, cols = torch.arange(128) * 7 // 128, torch.arange(128) * 6
    g = f[:, :, rows[:, None], cols[None, :]]  # [B, 7, 128, 128]
    branch = torch.einsum("or,brhw->bohw", emb_sd["upconv.weight"][:, :, 0, 0], g) + emb_sd["upconv.bias"][:, None, None]
    torch.testing.assert_close(seen["branch_out"], branch, rtol=1e-5, atol=1e-5)

    svd = _svd_by_hand(noise, svd_sd)
    torch.testing.assert_close(model.unet_svd(noise), svd, rtol=1e-5, atol=1e-5)
    a = 2 * torch.sigmoid(ckpt["alpha"]) - 1
    want = svd + a * t + ckpt["beta"] * branch
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the parts are not degenerate: each moves the output
    assert (a * t).abs().mean() > 1e-3 and (ckpt["beta"] * branch).abs().mean() > 1e-3
    assert (svd - noise).abs().mean() > 1e-3


def test_eval_mode_is_deterministic(model, inputs):
    noise, prompt = inputs
    with torch.no_grad():
        a = model(noise[1:], prompt[1:])
        b = model(noise[1:], prompt[1:])
        model.train()  # no stochastic depth or dropout anywhere: train mode computes the same
        try:
            c = model(noise[1:], prompt[1:])
        finally:
            model.eval()
    assert torch.equal(a, b) and torch.equal(a, c)


def test_one_prompt_is_shared_by_the_batch(model, inputs):
    noise, prompt = inputs
    shared = model.text_modulation(noise, prompt[:1])
    torch.testing.assert_close(shared, model.text_modulation(noise, prompt[:1].expand(2, -1, -1)))
    assert not torch.allclose(shared, model.text_modulation(noise, prompt))


@pytest.mark.parametrize("noise_shape,prompt_shape,match", [
    ((1, 4, 64, 64), (1, 77, 2048), r"expected \[B, 4, 128, 128\].*got \[1, 4, 64, 64\]"),
    ((1, 16, 128, 128), (1, 77, 2048), r"expected \[B, 4, 128, 128\]"),
    ((1, 4, 128, 128), (1, 77, 1024), r"expected \[B, 77, 2048\].*got \[1, 77, 1024\]"),  # SD2 width
    ((1, 4, 128, 128), (1, 154, 2048), r"expected 77 tokens, got 154"),
    ((3, 4, 128, 128), (2, 77, 2048), r"prompt batch 2 does not fit noise batch 3"),
])
def test_wrong_inputs_are_refused(model, noise_shape, prompt_shape, match):
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(noise_shape), torch.zeros(prompt_shape))


# -- wrong files -------------------------------------------------------------------------------


def test_another_models_npnet_is_refused(ckpt):
    # a 16-channel NPNet (a flow-model latent): shapes only, no memory
    spec = official_layout(channels=16)
    other = {g: ({k: torch.zeros(()).expand(s) for k, s in v.items()} if isinstance(v, dict)
                 else torch.zeros(v)) for g, v in spec.items()}
    with pytest.raises(ValueError, match=r"other\.pth: not the NPNet layout of preset 'sdxl'.*"
                                         r"unet_embedding\.downconv\.weight: expected \[3, 4, 1, 1\], got \[3, 16, 1, 1\]"):
        npnet_from_state_dict(other, preset="sdxl", source="other.pth")
    # a missing tensor is named
    broken = {g: (dict(v) if isinstance(v, dict) else v) for g, v in ckpt.items()}
    del broken["unet_svd"]["bn.running_var"]
    with pytest.raises(ValueError, match=r"1 missing: unet_svd\.bn\.running_var"):
        npnet_from_state_dict(broken, preset="sdxl")


def test_lora_and_unrelated_safetensors_are_refused(tmp_path):
    lora = tmp_path / "refiner_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_down_blocks_0_attentions_0.lora_down.weight": torch.zeros(2, 4)},
              str(lora), metadata={"ss_network_module": "networks.lora"})
    with pytest.raises(ValueError, match=r"refiner_lora\.safetensors: a LoRA .*expected the NPNet tensors"):
        load_npnet(lora)
    other = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match=r"vae\.safetensors: not an NPNet checkpoint.*'decoder\.conv_in\.weight'"):
        load_npnet(other)
    ours = tmp_path / "refiner.safetensors"
    save_file({"diffusion_model.x.lora_up.weight": torch.zeros(2, 2)}, str(ours), metadata={"noisecraft.kind": "refiner"})
    with pytest.raises(ValueError, match=r"a NoiseCraft refiner file"):
        load_npnet(ours)


def test_truncated_and_garbage_files_are_refused(files, tmp_path):
    for name in ("pth", "text_embedding"):
        cut = tmp_path / f"cut_{files[name].name}"
        with open(files[name], "rb") as f:
            cut.write_bytes(f.read(1 << 20))
        with pytest.raises(ValueError, match=rf"{cut.name}: could not read it as .*truncated or corrupt: download it again"):
            load_npnet(cut)
    junk = tmp_path / "notes.pth"
    junk.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.pth: neither safetensors nor a PyTorch checkpoint"):
        load_npnet(junk)
    with pytest.raises(FileNotFoundError, match=r"absent\.pth: no such NPNet file"):
        load_npnet(tmp_path / "absent.pth")


_UNPICKLED = []


def _side_effect():
    _UNPICKLED.append(True)
    return {}


class _Payload:
    def __reduce__(self):  # unpickling this would call _side_effect
        return (_side_effect, ())


def test_a_pth_that_needs_unpickling_is_refused_without_running_it(tmp_path):
    path = tmp_path / "npnet_with_objects.pth"
    torch.save({"unet_svd": {"mlp3.0.bias": torch.zeros(2)}, "config": _Payload()}, path)
    with pytest.raises(ValueError, match=r"npnet_with_objects\.pth: .*unpickling.*NoiseCraft never does"):
        load_npnet(path)
    assert not _UNPICKLED


# -- writing -----------------------------------------------------------------------------------


def test_convert_pth_to_safetensors_with_metadata(files, ckpt, tmp_path):
    dst = tmp_path / "npnet_sdxl.safetensors"
    convert_pth_to_safetensors(files["pth"], dst, preset="sdxl")
    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["noisecraft.kind"] == "npnet" and meta["noisecraft.preset"] == "sdxl"
    assert meta["noisecraft.text_width"] == "2048" and meta["noisecraft.tokens"] == "77"
    assert meta["noisecraft.source_sha256"] == hashlib.sha256(files["pth"].read_bytes()).hexdigest()
    assert meta["noisecraft.source_name"] == "sdxl.pth"
    assert keys == set(flat(ckpt, "text_embedding"))  # the ComfyUI-NPNet flavour
    m = load_npnet(dst)
    assert m.preset == "sdxl"  # from the metadata
    ref = flat(ckpt, "text_embedding")
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())
    with pytest.raises(FileExistsError, match="exists"):
        convert_pth_to_safetensors(files["pth"], dst)
    # a state dict in the official layout round-trips through save and official_state_dict
    again = tmp_path / "from_state.safetensors"
    save_npnet_safetensors(official_state_dict(m), again, {"noisecraft.preset": "dreamshaper"})
    with safe_open(str(again), "pt") as f:
        assert f.metadata()["noisecraft.preset"] == "dreamshaper"


# -- against timm (only where timm is installed) -------------------------------------------------


def test_swin_equals_timm_in_eval_mode(model):
    timm = pytest.importorskip("timm")
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    ours = nn_mod.swin_tiny_patch4_window7_224()
    ours.load_state_dict(ref.state_dict(), strict=True)  # strict both ways: same names and shapes
    ref.load_state_dict(model.unet_embedding.swin.state_dict(), strict=True)  # the NPNet's seeded weights
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.unet_embedding.swin.forward_features(x), ref.forward_features(x),
                                   rtol=1e-5, atol=1e-5)
        # the official NoiseTransformer glue around timm's features, as the official code calls it
        noise = torch.randn(1, 4, 128, 128, generator=g)
        emb = model.unet_embedding
        official = emb.upconv(F.interpolate(ref.forward_features(emb.downconv(F.interpolate(noise, [224, 224]))),
                                            [128, 128]))
        torch.testing.assert_close(emb(noise), official, rtol=1e-5, atol=1e-5)


def test_cli_convert_writes_safetensors_and_refuses_overwrite(tmp_path):
    import subprocess
    import sys

    from safetensors import safe_open

    src = tmp_path / "npnet.pth"
    torch.save(official_checkpoint(), src)
    dst = tmp_path / "npnet.safetensors"
    run = lambda *a: subprocess.run([sys.executable, "-m", "noisecraft", "convert", *a], capture_output=True, text=True)
    out = run(str(src), str(dst), "--preset", "sdxl")
    assert out.returncode == 0, out.stderr
    with safe_open(str(dst), "pt") as f:
        assert f.metadata()["noisecraft.kind"] == "npnet"
    again = run(str(src), str(dst))
    assert again.returncode == 2 and "exists" in again.stderr
