"""The NPNet training nodes: Collect NPNet Pairs -> Train NPNet -> Save NPNet -> Load NPNet -> Golden Noise.

On the tiny SDXL-shaped model (2048-wide text) with 16x16 latents and the small NPNet, under
``torch.inference_mode()`` as ComfyUI runs prompts. ComfyUI's ``folder_paths`` is pointed at a
temporary models folder for this module only.
"""

from __future__ import annotations


import pytest
import torch

import comfy.model_management as mm
import folder_paths
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

SIZE = 16
SEED = 5


@pytest.fixture(scope="module")
def models_dir(npn, tmp_path_factory, model_folders):
    root = tmp_path_factory.mktemp("models")
    with model_folders(root, ("npnet", "npnets"), npn, set_paths=()):
        yield root


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


def train(tn, pairs, *, steps=15, lr=3e-3, batch=4, npnet=None, size="small"):
    with torch.inference_mode():
        return tn.TrainNPNet.execute(pairs, steps, lr, batch, 0, size, npnet)


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

    assert len(pairs) == 8 and pairs.shape == (4, SIZE, SIZE)
    assert pairs.noise.shape == pairs.target.shape == (8, 4, SIZE, SIZE)
    assert pairs.embeds.shape == (1, 77, 2048) and pairs.cond.tolist() == [0] * 8
    assert torch.equal(pairs.noise[3:4], seeded_noise(SEED + 3, (1, 4, SIZE, SIZE)))
    assert torch.isfinite(pairs.target).all() and not torch.equal(pairs.target, pairs.noise)
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
    assert torch.equal(same.noise, guided.noise)
    assert same.identity_mse() < 1e-3  # unit noise: the targets are the sources to within ~3% of a std
    assert guided.identity_mse() > 2 * same.identity_mse()  # w_l > w_w injects the guidance into the noise


def test_batch_size_does_not_change_the_pairs_and_a_prompt_batch_gives_pairs_per_prompt(tn, nc, pairs):
    again = collect(tn, nc, count=8, batch_size=3)
    assert torch.allclose(again.target, pairs.target, atol=1e-5)
    two = nc.tiny.conditioning("sdxl", 7, 2)
    multi = collect(tn, nc, count=2, positive=two)
    assert len(multi) == 4 and multi.cond.tolist() == [0, 1, 0, 1] and multi.embeds.shape == (2, 77, 2048)


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
    with torch.no_grad():
        pred = net.net(pairs.noise, pairs.embeds[pairs.cond], canonical_signs=True)
    mse = float((pred - pairs.target).pow(2).mean())
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
    from noisecraft_pack.noisecraft.train.npnet_trainer import SMALL_NPNET

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
