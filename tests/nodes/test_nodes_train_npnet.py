"""The NPNet training nodes: Collect NPNet Pairs -> Train NPNet -> Save NPNet -> Load NPNet -> Golden Noise.

On the tiny SDXL-shaped model (2048-wide text) with 16x16 latents and the small NPNet, under
``torch.inference_mode()`` as ComfyUI runs prompts. ComfyUI's ``folder_paths`` is pointed at a
temporary models folder (and output folder, for the run folders of ``resume_from``) for this module only.
Train NPNet is the core's ``train_npnet`` in the one loop: its NPNet equals the core's bit for bit on the
CPU, and a run resumed after a Cancel or a SIGKILL equals the uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import comfy.model_management as mm
import folder_paths
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

SIZE = 16
SEED = 5


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models_dir(npn, tmp_path_factory, model_folders):
    root = tmp_path_factory.mktemp("models")
    with model_folders(root, ("npnet", "npnets"), npn, set_paths=()):
        yield root


@pytest.fixture
def output_dir(tmp_path):
    """ComfyUI's output folder (where resume_from's run folders live) and temp folder pointed at fresh folders."""
    saved = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    try:
        yield tmp_path / "output"
    finally:
        folder_paths.set_output_directory(saved[0])
        folder_paths.set_temp_directory(saved[1])


def everything(pairs):
    """All pairs of a store as one batch (e, target, cond)."""
    return pairs.get(range(len(pairs)))


def latent(size: int = SIZE, batch: int = 1, width: int | None = None) -> dict:
    return {"samples": torch.zeros(batch, 4, size, width or size)}


def collect(tn, nc, *, count=4, w_l=5.0, w_w=1.0, steps=10, positive=None, lat=None, batch_size=8, seed=SEED):
    pos, neg = nc.conds("sdxl")
    with torch.inference_mode():
        return tn.CollectNPNetPairs.execute(nc.model("sdxl"), positive if positive is not None else pos, neg,
                                            lat or latent(), seed, count, w_l, w_w, steps, "normal",
                                            batch_size).args[0]


@pytest.fixture(scope="module")
def pairs(tn, nc):
    return collect(tn, nc, count=8)


def train(tn, pairs, *, steps=15, lr=3e-3, batch=4, npnet=None, size="small", seed=0, **optional):
    with torch.inference_mode():
        return tn.TrainNPNet.execute(pairs, steps, lr, batch, seed, size, npnet, **optional)


def state(out):
    return out.args[0].net.state_dict()


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- schema ------------------------------------------------------------------------------------------


def test_schema_ids_category_and_a_tooltip_on_every_input(tn):
    ids = {"NC_CollectNPNetPairs", "NC_TrainNPNet", "NC_SaveNPNet"}
    assert {n.define_schema().node_id for n in tn.NODES} == ids
    for node in tn.NODES:
        schema = node.define_schema()
        assert schema.category == "noisecraft/npnet" and not schema.display_name.startswith("NC")
        for inp in schema.inputs:
            assert inp.tooltip and len(inp.tooltip) > 20, f"{schema.node_id}.{inp.id} has no tooltip"


# -- pairs ---------------------------------------------------------------------------------------------


def test_pairs_have_the_right_shapes_and_seeded_sources(tn, nc, pairs):
    from noisecraft_pack.noisecraft.rng import seeded_noise

    assert isinstance(pairs, tn.PairStore) and pairs.in_memory_store and pairs.complete  # the core's store
    b = everything(pairs)
    assert len(pairs) == 8 and pairs.shape == (4, SIZE, SIZE)
    assert b.e.shape == b.target.shape == (8, 4, SIZE, SIZE)
    assert pairs.embeds.shape == (1, 77, 2048) and b.cond.tolist() == [0] * 8
    assert torch.equal(b.e[3:4], seeded_noise(SEED + 3, (1, 4, SIZE, SIZE)))
    assert torch.isfinite(b.target).all() and not torch.equal(b.target, b.e)
    assert bool(pairs.column("kept").all()) and not b.e.is_inference()  # plain tensors: autograd may use them
    assert pairs.meta["w_l"] == 5.0 and pairs.meta["w_w"] == 1.0 and pairs.meta["kind"] == "eps"
    pos, _ = nc.conds("sdxl")
    assert torch.equal(pairs.embeds, pos[0][0])


def test_equal_cfgs_give_near_identity_targets(tn, nc):
    # a fine schedule (50 steps) so the one-step round-trip error is small; the guidance gap then shows
    pos, neg = nc.conds("sdxl")
    with torch.inference_mode():
        same, guided = (tn.collect(nc.model("sdxl"), pos, neg, latent(), seed=SEED, count=4, w_l=5.0, w_w=w_w,
                                   steps=50, scheduler="normal", batch_size=8, require_gap=False)
                        for w_w in (5.0, 1.0))
    assert torch.equal(everything(same).e, everything(guided).e)
    assert same.identity_mse() < 1e-3  # unit noise: the targets are the sources to within ~3% of a std
    assert guided.identity_mse() > 2 * same.identity_mse()  # w_l > w_w injects the guidance into the noise


def test_batch_size_does_not_change_the_pairs_and_a_prompt_batch_gives_pairs_per_prompt(tn, nc, pairs):
    again = collect(tn, nc, count=8, batch_size=3)
    assert torch.allclose(everything(again).target, everything(pairs).target, atol=1e-5)
    two = nc.tiny.conditioning("sdxl", 7, 2)
    multi = collect(tn, nc, count=2, positive=two)
    assert len(multi) == 4 and everything(multi).cond.tolist() == [0, 1, 0, 1] and multi.embeds.shape == (2, 77, 2048)


def test_bad_collect_inputs_are_clear_errors(tn, nc):
    with pytest.raises(ValueError, match=r"count must be an integer >= 1"):
        collect(tn, nc, count=0)
    with pytest.raises(ValueError, match=r"w_w \(5.0\) must be smaller than w_l \(5.0\)"):
        collect(tn, nc, w_l=5.0, w_w=5.0)
    with pytest.raises(ValueError, match=r"square latents.*16x24"):
        collect(tn, nc, lat=latent(16, width=24))
    with pytest.raises(ValueError, match=r"16 channels"):
        collect(tn, nc, lat={"samples": torch.ones(1, 16, SIZE, SIZE)})  # not empty: not widened
    with pytest.raises(ValueError, match=r"expected a CONDITIONING"):
        collect(tn, nc, positive="a prompt")


def test_interrupt_raises_and_the_model_is_unchanged(tn, nc):
    model = nc.model("sdxl")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    patches = len(model.patches)
    mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException):
        collect(tn, nc, count=2)
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(model.patches) == patches
    assert len(collect(tn, nc, count=1)) == 1  # usable afterwards


# -- training --------------------------------------------------------------------------------------------


def test_a_few_steps_lower_the_mse_and_the_ui_carries_the_history(tn, npn, pairs):
    out = train(tn, pairs, steps=20, lr=1e-3, batch=8)  # full batch: the loss is the training-set MSE
    net = out.args[0]
    hist = out.ui["noisecraft_history"]
    assert isinstance(net, npn.LoadedNPNet) and len(hist) == 20
    assert hist[0] == pytest.approx(pairs.identity_mse(), rel=1e-4)  # the untrained net is the identity
    assert hist[-1] < hist[0]
    assert net.config.latent_size == SIZE and net.config.text_width == 2048 and net.config.swin_embed_dim == 32
    assert not any(p.requires_grad for p in net.net.parameters()) and not net.net.training
    b = everything(pairs)
    with torch.no_grad():
        pred = net.net(b.e, pairs.embeds[b.cond], canonical_signs=True)
    mse = float((pred - b.target).pow(2).mean())
    assert mse < hist[0], (mse, hist[0])
    assert "loss" in out.ui["text"][0]


def test_fine_tuning_copies_the_input_npnet(tn, pairs):
    first = train(tn, pairs, steps=3).args[0]
    before = {k: v.clone() for k, v in first.net.state_dict().items()}
    tuned = train(tn, pairs, steps=3, lr=1e-3, npnet=first).args[0]
    assert tuned.net is not first.net
    assert all(torch.equal(before[k], v) for k, v in first.net.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.net.state_dict().items())


def test_interrupting_training_raises(tn, pairs):
    mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException):
        train(tn, pairs, steps=5)


def test_bad_train_inputs_are_clear_errors(tn, nc, npn, pairs):
    with pytest.raises(ValueError, match=r"expected NPNET_PAIRS"):
        train(tn, "pairs")
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1"):
        train(tn, pairs, steps=0)
    with pytest.raises(ValueError, match=r"size: expected one of"):
        train(tn, pairs, size="huge")
    from noisecraft_pack.noisecraft.npnet import NPNetConfig, random_npnet
    from noisecraft_pack.noisecraft.train.npnet import SMALL_NPNET

    sd15 = random_npnet(NPNetConfig(latent_size=SIZE, text_width=768, **SMALL_NPNET))
    with pytest.raises(ValueError, match=r"768 wide.*2048 wide|2048 wide.*768 wide"):
        train(tn, pairs, npnet=npn.LoadedNPNet(sd15, "sd15-ish", folder_paths.models_dir))
    big = random_npnet(NPNetConfig(latent_size=32, **SMALL_NPNET))
    with pytest.raises(ValueError, match=r"4x32x32 latents.*4x16x16"):
        train(tn, pairs, npnet=npn.LoadedNPNet(big, "32px", folder_paths.models_dir))


# -- saving, loading, using ----------------------------------------------------------------------------


def test_saved_file_loads_with_load_npnet_and_feeds_golden_noise(tn, npn, pairs, models_dir):
    trained = train(tn, pairs, steps=5).args[0]
    with torch.inference_mode():
        out = tn.SaveNPNet.execute(trained, "tiny_xl", False)
        again = tn.SaveNPNet.execute(trained, "tiny_xl", False)
    assert out.args[0] == "tiny_xl.safetensors" and again.args[0] == "tiny_xl_00001_.safetensors"
    assert (models_dir / "npnet" / "tiny_xl.safetensors").is_file()
    assert not [p for p in (models_dir / "npnet").iterdir() if p.name.endswith(".tmp")]
    assert "tiny_xl.safetensors" in npn.npnet_files()
    with torch.inference_mode():
        loaded = npn.LoadNPNet.execute("tiny_xl.safetensors", "auto").args[0]
    for k, v in trained.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[k], v), k
    from safetensors import safe_open

    with safe_open(str(models_dir / "npnet" / "tiny_xl.safetensors"), "pt") as f:
        assert '"w_l": 5.0' in f.metadata()["noisecraft.training"]
    pos = [[pairs.embeds, {}]]
    lat = latent()
    with torch.inference_mode():
        noise = npn.NPNetGoldenNoise.execute(Noise_RandomNoise(SEED), loaded, pos, 1.0, "native", "truncate").args[0]
        g = noise.generate_noise(lat)
        e = Noise_RandomNoise(SEED).generate_noise(lat)
        with torch.no_grad():
            want = trained.net(e, pairs.embeds, canonical_signs=True)
    assert torch.allclose(g, want, atol=1e-5) and not torch.equal(g, e)


def test_save_refuses_bad_names_and_overwrites_on_request(tn, pairs, models_dir):
    trained = train(tn, pairs, steps=1).args[0]
    with pytest.raises(ValueError, match=r"plain file name"):
        tn.SaveNPNet.execute(trained, "../escape", False)
    with pytest.raises(ValueError, match=r"expected an NPNET"):
        tn.SaveNPNet.execute("net", "x", False)
    assert tn.SaveNPNet.execute(trained, "same", True).args[0] == "same.safetensors"
    assert tn.SaveNPNet.execute(trained, "same.safetensors", True).args[0] == "same.safetensors"
    plain = models_dir / "npnet" / "same.safetensors"
    before = (plain.stat().st_ino, plain.stat().st_mtime_ns)  # an atomic replace would give a new inode
    # overwrite off keeps the existing file; the new one is numbered like ComfyUI's savers
    assert tn.SaveNPNet.execute(trained, "same", False).args[0] == "same_00001_.safetensors"
    assert tn.SaveNPNet.execute(trained, "same", False).args[0] == "same_00002_.safetensors"
    assert (plain.stat().st_ino, plain.stat().st_mtime_ns) == before


# -- the node on the core engine: same NPNet as the CLI, resume, precision, new inputs -------------------


def test_new_inputs_are_optional_after_the_old_ones_with_defaults_that_keep_old_behaviour(tn):
    inputs = tn.TrainNPNet.define_schema().inputs
    assert [i.id for i in inputs] == ["pairs", "steps", "lr", "batch_size", "seed", "size", "npnet", "resume_from",
                                      "precision", "lr_schedule", "warmup", "max_grad_norm"]
    new = {i.id: i for i in inputs[7:]}
    assert all(i.optional for i in new.values())
    # the old node: float32, constant lr, no warm-up, clipping at 1, no run folder
    assert {k: i.default for k, i in new.items()} == {"resume_from": "", "precision": "fp32",
                                                      "lr_schedule": "constant", "warmup": 0, "max_grad_norm": 1.0}
    assert all("off" in i.tooltip for i in new.values())


def test_node_npnet_equals_the_core_train_npnet_bit_for_bit(tn, pairs, tmp_path):
    from noisecraft_pack.noisecraft.train import NPNetTrainConfig, npnet_config_for, train_npnet
    from noisecraft_pack.noisecraft.train.npnet import SMALL_NPNET

    node = train(tn, pairs, steps=7, lr=2e-3, batch=3, seed=11)
    config = NPNetTrainConfig(steps=7, lr=2e-3, batch_size=3, seed=11, init_seed=11)
    core = train_npnet(pairs, tmp_path / "core", config, npnet_config_for(pairs, **SMALL_NPNET))
    assert bitwise_equal(state(node), core.model.state_dict())  # the same code path: equal on the CPU
    assert node.ui["noisecraft_history"] == core.losses
    # a non-default schedule, warm-up and clipping reach the core unchanged
    opts = dict(lr_schedule="cosine", warmup=3, max_grad_norm=0.0)
    node = train(tn, pairs, steps=6, lr=2e-3, batch=4, seed=2, **opts)
    core = train_npnet(pairs, tmp_path / "core2", NPNetTrainConfig(steps=6, lr=2e-3, batch_size=4, seed=2, init_seed=2,
                                                                   lr_schedule="cosine", warmup=3, max_grad_norm=None),
                       npnet_config_for(pairs, **SMALL_NPNET))
    assert bitwise_equal(state(node), core.model.state_dict())
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "core2" / "loss.jsonl").read_text().splitlines()]
    assert lrs[:3] == pytest.approx([2e-3 / 3, 4e-3 / 3, 2e-3])  # the warm-up happened


def test_a_batch_above_the_number_of_pairs_trains_on_all_pairs_as_before(tn, pairs):
    assert bitwise_equal(state(train(tn, pairs, steps=2, batch=100)), state(train(tn, pairs, steps=2, batch=8)))


class _CancelAt:
    """A progress hook like the server's (main.py ``hijack_progress``): Cancel pressed at ``step``, then the
    hook raises ComfyUI's interrupt exception, as the server's does."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, value, total, preview, prompt_id=None, node_id=None):
        if value == self.step:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()


def test_resume_after_a_cancel_equals_the_uninterrupted_run(tn, pairs, output_dir):
    import comfy.utils

    full = train(tn, pairs, steps=8, resume_from="full")
    saved = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(_CancelAt(3))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(tn, pairs, steps=8, resume_from="cancelled")
    finally:
        comfy.utils.set_progress_bar_global_hook(saved)
    run = output_dir / "noisecraft_runs" / "cancelled"
    ckpt_meta = _checkpoint_state(run)
    assert ckpt_meta["step"] == 3 and not (run / "npnet.safetensors").exists()
    again = train(tn, pairs, steps=8, resume_from="cancelled")  # the same graph, queued again
    assert bitwise_equal(state(again), state(full))
    assert again.ui["noisecraft_history"] == full.ui["noisecraft_history"] and len(full.ui["noisecraft_history"]) == 8
    assert (run / "npnet.safetensors").read_bytes() == (output_dir / "noisecraft_runs" / "full" /
                                                        "npnet.safetensors").read_bytes()
    # more steps continue the finished run; other settings are refused, naming the fix
    assert len(train(tn, pairs, steps=10, resume_from="cancelled").ui["noisecraft_history"]) == 10
    with pytest.raises(ValueError, match=r"Train NPNet: .*other settings \(lr: .*resume_from 'cancelled': give "
                                         r"another name"):
        train(tn, pairs, steps=10, lr=1e-2, resume_from="cancelled")

def test_without_resume_from_nothing_is_left_in_the_output_or_temp_folder(tn, pairs, output_dir):
    train(tn, pairs, steps=2)
    assert not output_dir.exists()
    assert list((output_dir.parent / "temp" / "noisecraft_runs").iterdir()) == []  # its temporary run is removed


def _checkpoint_state(run: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        return json.loads(f.metadata()["state"])


_KILLED_RUN = textwrap.dedent("""
    import importlib, sys, torch
    sys.path.insert(0, {nodes!r})
    import conftest  # ComfyUI as a library on the CPU, the pack imported as ComfyUI imports it
    import folder_paths
    c = conftest.Comfy()
    tn = importlib.import_module(conftest.PACK_NAME + ".nodes.nodes_train_npnet")
    tn.CHECKPOINT_EVERY = {every}
    folder_paths.set_output_directory({out!r})
    pos, neg = c.conds("sdxl")
    with torch.inference_mode():
        lat = {{"samples": torch.zeros(1, 4, {size}, {size})}}
        pairs = tn.CollectNPNetPairs.execute(c.model("sdxl"), pos, neg, lat, {seed}, 8, 5.0, 1.0, 10, "normal",
                                             8).args[0]
        tn.TrainNPNet.execute(pairs, 1_000_000, 3e-3, 4, 0, "small", None, "killed")
""")


def test_resume_after_a_process_kill_equals_the_uninterrupted_run(tn, pairs, output_dir, monkeypatch):
    """A real ComfyUI-as-library process runs the node and is SIGKILLed after its first checkpoint; the
    same node then resumes the run folder and ends bit for bit where an uninterrupted run ends."""
    every = 5
    monkeypatch.setattr(tn, "CHECKPOINT_EVERY", every)
    run = output_dir / "noisecraft_runs" / "killed"
    script = _KILLED_RUN.format(nodes=str(REPO / "tests" / "nodes"), every=every, out=str(output_dir), size=SIZE,
                                seed=SEED)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=str(REPO), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint.safetensors").is_file():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before its first checkpoint: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    step = _checkpoint_state(run)["step"]
    assert step >= every and step % every == 0
    total = step + 3
    resumed = train(tn, pairs, steps=total, resume_from="killed")
    full = train(tn, pairs, steps=total, resume_from="uninterrupted")
    assert bitwise_equal(state(resumed), state(full))
    assert resumed.ui["noisecraft_history"] == full.ui["noisecraft_history"]


@pytest.mark.parametrize("precision", ["bf16", "auto"])
def test_mixed_precision_trains_with_finite_losses(tn, pairs, precision):
    out = train(tn, pairs, steps=6, precision=precision)
    hist = out.ui["noisecraft_history"]
    assert len(hist) == 6 and all(torch.isfinite(torch.tensor(hist)))
    assert hist[0] == pytest.approx(pairs.identity_mse(), rel=0.05)  # the identity start, to bf16 rounding
    net = out.args[0].net
    assert all(p.dtype == torch.float32 for p in net.parameters())  # weights stay float32
    assert out.args[0].training["precision"] == precision
    if precision == "auto":  # float32 on the CPU: the fp32 run exactly
        assert bitwise_equal(state(out), state(train(tn, pairs, steps=6)))


@dataclass(frozen=True)
class Bad:
    id: str
    kwargs: dict
    match: str


BAD_TRAIN = [
    Bad("precision_unknown", {"precision": "fp8"}, r"Train NPNet: precision: expected one of \['auto', 'fp32'"),
    Bad("lr_schedule_unknown", {"lr_schedule": "linear"}, r"Train NPNet: lr_schedule: expected one of \['constant'"),
    Bad("warmup_negative", {"warmup": -1}, r"Train NPNet: warmup must be an integer >= 0, got -1; .*0 turns"),
    Bad("warmup_fraction", {"warmup": 1.5}, r"Train NPNet: warmup must be an integer >= 0, got 1\.5"),
    Bad("max_grad_norm_nan", {"max_grad_norm": float("nan")}, r"Train NPNet: max_grad_norm must be a finite number "
        r">= 0, got nan; 0 turns clipping off"),
    Bad("max_grad_norm_negative", {"max_grad_norm": -1.0}, r"Train NPNet: max_grad_norm must be a finite number >= 0"),
    Bad("resume_from_folder_part", {"resume_from": "../elsewhere"}, r"Train NPNet: resume_from '\.\./elsewhere' "
        r"contains a folder part"),
    Bad("resume_from_not_text", {"resume_from": 3}, r"Train NPNet: resume_from must be text"),
]


@pytest.mark.parametrize("case", BAD_TRAIN, ids=[c.id for c in BAD_TRAIN])
def test_bad_new_train_inputs_are_clear_errors(tn, pairs, output_dir, case):
    with pytest.raises(ValueError, match=case.match):
        train(tn, pairs, steps=1, **case.kwargs)
    assert not (output_dir / "noisecraft_runs").exists()  # refused before anything is written
