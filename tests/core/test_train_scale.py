"""Scale of the refiner trainer (issue 11, "Scale"): gradient checkpointing, bf16 autocast on CPU, rank 256,
the AdamW implementation choice, and the memory benchmark's FakeTensor accounting.

Tier 1: torch + diffusers + peft, CPU, the shipped toy UNet (8x8, widths 16/32) and the benchmark's tiny
config. Checks: the checkpointed LoRA pass gives the same loss and LoRA gradients and saves fewer bytes
(per-block on a diffusers UNet, one segment on any other module); bf16 autocast trains (finite, loss
falls) with the LoRA and AdamW state in float32; a rank-256 LoRA on layers narrower than 256 trains and
round-trips; AdamW on CPU is torch's default (the checkpoint's param_groups are unchanged) and a
checkpoint written by a fused (CUDA) run resumes on CPU to the same bytes; the benchmark's fake-tensor
byte counts equal the real ones and its batch extrapolation is exact. bench_train_scale.py's ComfyUI half: its
table and ratios, and (with COMFYUI_PATH) its children at tiny counts: the named cache's encodings on disk, none
written by the unnamed one.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from noisecraft.hosts import toy
from noisecraft.hosts.adapters import attach_lora, load_lora
from noisecraft.hosts.diffusers import DiffusersDenoiser
from noisecraft.io import read_safetensors, write_safetensors
from noisecraft.lora import read_lora_file
from noisecraft.rng import seeded_noise
from noisecraft.sigmas import get_sigmas
from noisecraft.train import RefinerTrainConfig, build_teacher_cache, train_refiner
from noisecraft.train.loop import LoopConfig, make_adamw
from noisecraft.train.refiner import msd_step_loss

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train_memory.py"


def _bench():
    if "bench_train_memory" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_train_memory", BENCH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_train_memory"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["bench_train_memory"]


@pytest.fixture(scope="module")
def model():
    return toy.load_toy()


@pytest.fixture(scope="module")
def cache(model, tmp_path_factory):
    host = toy.toy_host(model)
    return build_teacher_cache(
        tmp_path_factory.mktemp("scale_cache") / "cache", lambda c: host.denoiser(c, cfg=3.0),
        shape=model.latent_shape, conds=list(range(10)), total=16, sigmas=get_sigmas(model.table, "normal", 4),
        kind="eps", base_seed=5, shard_size=16, batch_size=16)


def _random_lora(unet, rank=4, seed=0):
    """A LoRA with non-zero ``up`` (a fresh one has up = 0, where the ``down`` gradients vanish)."""
    lora = attach_lora(unet, rank, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in lora.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.05)
    return lora


# -- gradient checkpointing --------------------------------------------------------------------------


class _Plain(nn.Module):
    """The toy UNet behind a module without diffusers' checkpointing support (the one-segment path)."""

    def __init__(self, unet):
        super().__init__()
        self.inner = unet

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("wrap", [False, True], ids=["diffusers-blocks", "one-segment"])
def test_checkpointing_gives_the_same_gradients_and_saves_fewer_bytes(model, wrap):
    bench = _bench()
    lora = _random_lora(model.unet)
    try:
        net = _Plain(model.unet) if wrap else model.unet
        labels = torch.arange(6) % 10
        student = DiffusersDenoiser(net, model.table, model.cond(labels).detach())
        e = torch.cat([seeded_noise(i, (1, *model.latent_shape)) for i in range(6)])
        x0 = torch.cat([seeded_noise(100 + i, (1, *model.latent_shape)) for i in range(6)]) * 0.5
        sigmas = get_sigmas(model.table, "normal", 3)
        skip = frozenset(p.untyped_storage()._cdata for p in model.unet.parameters())
        out, rng = {}, torch.get_rng_state()
        for gc in (False, True):
            lora.zero_grad(set_to_none=True)
            with bench.saved_bytes(skip) as saved:
                loss, _ = msd_step_loss(lora, student, e, x0, sigmas, "eps", gradient_checkpointing=gc)
            loss.backward()
            out[gc] = (loss.detach(), [p.grad.clone() for p in lora.parameters()], saved.bytes)
        assert not model.unet.is_gradient_checkpointing  # switched on for the LoRA pass only
        assert torch.equal(torch.get_rng_state(), rng)  # the recompute draws nothing from the global RNG
        (l0, g0, b0), (l1, g1, b1) = out[False], out[True]
        # the recompute runs the same float32 ops on the same inputs: equal up to float rounding
        assert torch.allclose(l0, l1, rtol=1e-6, atol=0)
        assert any(float(g.abs().max()) > 0 for g in g0)
        for a, b in zip(g0, g1):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()) + 1e-12)
        # per block: the block inputs stay; one segment: only the pass's input stays until backward
        assert b1 < (0.6 if not wrap else 0.05) * b0, (b0, b1)
    finally:
        lora.remove()


def test_gradient_checkpointing_setting(model, cache, tmp_path):
    with pytest.raises(ValueError, match="gradient_checkpointing must be True or False"):
        RefinerTrainConfig(gradient_checkpointing="yes").check()
    assert "gradient_checkpointing" not in RefinerTrainConfig().to_json()  # files of plain runs unchanged
    assert RefinerTrainConfig(gradient_checkpointing=True).to_json()["gradient_checkpointing"] is True
    base = dict(steps=3, rank=2, lr=3e-3, batch_size=4, student_steps=3, checkpoint_every=3)
    host = toy.toy_host(model)
    runs = {}
    for gc in (False, True):
        res = train_refiner(host, cache, tmp_path / str(gc), RefinerTrainConfig(gradient_checkpointing=gc, **base))
        runs[gc] = (res.losses, {k: v.clone() for k, v in res.lora.state_dict().items()})
        res.lora.remove()
    assert runs[False][0] == pytest.approx(runs[True][0], rel=1e-5)
    for k, v in runs[False][1].items():
        assert torch.allclose(v, runs[True][1][k], rtol=1e-4, atol=1e-6), k
    # not a resume key: a run may resume with it switched
    res = train_refiner(host, cache, tmp_path / "False", RefinerTrainConfig(
        gradient_checkpointing=True, **{**base, "steps": 4}), resume=True)
    res.lora.remove()
    assert res.step == 4


# -- precision, rank, optimizer ----------------------------------------------------------------------


def test_bf16_autocast_trains_on_cpu(model, cache, tmp_path):
    host = toy.toy_host(model)
    config = RefinerTrainConfig(steps=16, rank=4, lr=1e-2, batch_size=8, student_steps=3, precision="bf16",
                                checkpoint_every=16)
    res = train_refiner(host, cache, tmp_path / "bf16", config)
    try:
        losses = res.losses
        assert all(torch.isfinite(torch.tensor(losses)))
        assert sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses
        assert all(p.dtype == torch.float32 for p in res.lora.parameters())  # weights stay float32
        tensors, _ = read_safetensors(tmp_path / "bf16" / "checkpoint.safetensors", what="checkpoint", fix="")
        moments = [v for k, v in tensors.items() if k.endswith(("exp_avg", "exp_avg_sq"))]
        assert moments and all(v.dtype == torch.float32 for v in moments)  # AdamW state float32
        # what autocast runs in bf16 on CPU: the UNet's convolutions and linears and the LoRA matmuls
        seen = {}
        def record(name):
            def hook(module, args, output):
                seen.setdefault(name, output.dtype)  # returns None: the output is kept
            return hook

        hooks = [m.register_forward_hook(record(n)) for n, m in (
            ("conv_in", model.unet.conv_in), ("lora_down", next(iter(res.lora.layers.values())).lora_down))]
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            host.denoiser(torch.tensor([1]))(torch.randn(1, *model.latent_shape, generator=torch.Generator()), 5.0)
        for h in hooks:
            h.remove()
        assert seen == {"conv_in": torch.bfloat16, "lora_down": torch.bfloat16}
    finally:
        res.lora.remove()


def test_rank_256_on_layers_narrower_than_the_rank(model, cache, tmp_path):
    host = toy.toy_host(model)
    config = RefinerTrainConfig(steps=2, rank=256, batch_size=4, student_steps=2, checkpoint_every=2,
                                gradient_checkpointing=True)
    config.check()
    res = train_refiner(host, cache, tmp_path / "r256", config)
    try:
        assert all(torch.isfinite(torch.tensor(res.losses)))
        for key, pair in res.lora.layers.items():  # peft caps nothing: down [256, fan_in], up [fan_out, 256]
            down, up = pair.lora_down.weight, pair.lora_up.weight
            assert down.shape[0] == 256 and up.shape[1] == 256 and pair.rank == 256, key
        assert any(p.lora_down.weight[0].numel() < 256 for p in res.lora.layers.values())
        x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
        d = host.denoiser(torch.tensor([2, 3]))
        with torch.no_grad():
            want = d(x, 3.0)
        res.lora.remove()
        again = load_lora(model.unet, res.refiner_path)
        try:
            assert all(p.rank == 256 for p in again.layers.values())
            with torch.no_grad():
                assert torch.allclose(d(x, 3.0), want, atol=1e-6)
        finally:
            again.remove()
    finally:
        res.lora.remove()


def test_adamw_choice_and_cross_device_resume(model, cache, tmp_path):
    params = [nn.Parameter(torch.zeros(3))]
    opt, flags = make_adamw(params, LoopConfig(), "cpu")
    assert flags == {"fused": None, "foreach": None}  # torch's default: the checkpoint bytes stay as they were
    if torch.cuda.is_available():
        _, flags = make_adamw([nn.Parameter(torch.zeros(3, device="cuda"))], LoopConfig(), "cuda")
        assert flags["fused"] is True

    host = toy.toy_host(model)
    config = RefinerTrainConfig(steps=4, rank=2, lr=3e-3, batch_size=4, student_steps=2, checkpoint_every=2)
    train_refiner(host, cache, tmp_path / "full", config).lora.remove()
    train_refiner(host, cache, tmp_path / "moved", config, stop_after=3).lora.remove()
    ckpt = tmp_path / "moved" / "checkpoint.safetensors"  # step 2; as a fused CUDA run would have written it
    tensors, meta = read_safetensors(ckpt, what="checkpoint", fix="")
    groups = json.loads(meta["param_groups"])
    assert all(g["fused"] is None and g["foreach"] is None for g in groups)
    meta["param_groups"] = json.dumps([{**g, "fused": True} for g in groups], sort_keys=True)
    meta.pop("noisecraft.sha256")  # written anew, with its own checksum, as that run would have
    write_safetensors(tensors, ckpt, meta, digest=True)
    train_refiner(host, cache, tmp_path / "moved", config, resume=True).lora.remove()
    assert (tmp_path / "moved" / "refiner.safetensors").read_bytes() == \
        (tmp_path / "full" / "refiner.safetensors").read_bytes()


# -- the memory benchmark's accounting ------------------------------------------------------------------


def test_benchmark_fake_accounting_matches_real_tensors():
    bench = _bench()
    fake = bench.FakeStep("tiny", 8, "fp32", student_steps=2)
    real = bench.FakeStep("tiny", 8, "fp32", student_steps=2, fake=False)
    assert (fake.base_params, fake.lora_params) == (real.base_params, real.lora_params)
    assert fake.base_param_bytes == real.base_param_bytes == 4 * real.base_params
    counts = {}
    for gc in (False, True):
        counts[gc] = fake.saved_bytes(2, gc)
        assert counts[gc] == real.saved_bytes(2, gc)  # the fake count is the real one
    assert counts[True] < 0.6 * counts[False]
    assert bench.saved_by_batch(fake, [3], False)[3] == (fake.saved_bytes(3, False), True)  # affine in the batch
    bf16 = bench.FakeStep("tiny", 8, "bf16", student_steps=2)
    assert bf16.base_param_bytes == 2 * bf16.base_params
    saved = bf16.saved_bytes(1, True, backward=True)  # backward (with the recompute) runs on fake tensors
    fig = bench.msd_step_figures("tiny", 8, 1, dtype="bf16", gradient_checkpointing=True, student_steps=2, repeat=1,
                                 fake=bf16)  # and the real timed step at the tiny size
    assert fig["saved_activation_bytes"] == saved > 0 and fig["estimate_bytes"] > saved
    assert fig["optimizer_bytes"] == 8 * fig["lora_params"] and fig["step_s"] > 0 and fig["peak_bytes"] is None


def test_cli_scale_flags_on_a_diffusers_folder(model, tmp_path):
    """--gradient-checkpointing, --weights-dtype bf16 and --precision bf16 reach the trainer (the SDXL recipe)."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    from noisecraft.__main__ import main

    folder = tmp_path / "model"  # the toy as a local diffusers folder, with precomputed prompt embeddings
    model.unet.save_pretrained(str(folder / "unet"))
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        str(folder / "scheduler"))
    (tmp_path / "prompts.txt").write_text("three\nseven\n")
    embeds = {"cond": model.cond(torch.tensor([3, 7])), "uncond": model.uncond(1)}
    save_file({k: v.detach().contiguous() for k, v in embeds.items()}, str(tmp_path / "embeds.safetensors"))
    args = ["train-refiner", "--model", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--cfg", "3",
            "--prompt-embeds", str(tmp_path / "embeds.safetensors"), "--out", str(tmp_path / "run"), "--steps", "2",
            "--samples", "4", "--batch", "2", "--student-steps", "2", "--teacher-steps", "2", "--rank", "2",
            "--shard-size", "4", "--device", "cpu", "--precision", "bf16", "--weights-dtype", "bf16",
            "--gradient-checkpointing"]
    assert main(args) == 0
    state, meta = read_lora_file(tmp_path / "run" / "refiner.safetensors")
    assert all(v.dtype == torch.float32 for v in state.values())  # the LoRA stays fp32 on a bf16 network
    training = json.loads(meta["noisecraft.training"])
    assert training["gradient_checkpointing"] is True and training["precision"] == "bf16"


# -- benchmarks/bench_train_scale.py's ComfyUI half ----------------------------------------------------------------

SCALE_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train_scale.py"


def _scale_bench():
    spec = importlib.util.spec_from_file_location("noisecraft_bench_train_scale", SCALE_BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scale_benchmark_comfy_table_and_ratios():
    rows = {(m, p): {"peak_rss_mib": r, "step_s": s, "loop_step_s": s / 2, "build_s": 10.0}
            for (m, p, r, s) in [("named", 10, 1000.0, 0.1), ("named", 40, 1100.0, 0.1),
                                 ("unnamed", 10, 1000.0, 0.2), ("unnamed", 40, 3000.0, 0.3)]}
    table = _scale_bench().comfy_table(rows, (10, 40)).splitlines()
    assert table[2] == "| 10 | named: on disk (now) | 1000 MiB | 10 s | 100 ms | 50 ms |"
    assert table[5] == "| 40 | unnamed: in memory (before) | 3000 MiB | 10 s | 300 ms | 150 ms |"
    assert table[6] == "named: 40 / 10 prompts: peak RSS x1.10, time per step x1.00 (loop step x1.00)"
    assert table[7] == "unnamed: 40 / 10 prompts: peak RSS x3.00, time per step x1.50 (loop step x1.50)"


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH not set: the ComfyUI half needs ComfyUI")
def test_scale_benchmark_comfy_half_runs_the_nodes(tmp_path):
    """The ComfyUI half at tiny counts (a full-size random CLIP-L, so a few seconds a child): the named cache holds
    every prompt's 77 x 768 float32 encoding on disk, the unnamed one writes nothing; both train the asked steps."""
    bench = _scale_bench()
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = bench.run_comfy(os.environ["COMFYUI_PATH"], python, (3, 6), 2, env)
    for p in (3, 6):
        named, unnamed = rows[("named", p)], rows[("unnamed", p)]
        assert named["prompts"] == unnamed["prompts"] == p and named["samples"] == unnamed["samples"] == p
        assert named["folder_bytes"] > p * 77 * 768 * 4 and unnamed["folder_bytes"] == 0
        for r in (named, unnamed):
            assert r["peak_rss_mib"] > 500 and r["step_s"] > 0 and r["loop_step_s"] > 0 and r["build_s"] > 0
    assert len(bench.comfy_table(rows, (3, 6)).splitlines()) == 8
