"""Train Refiner's gradient_checkpointing on ComfyUI models (nodes/train_checkpointing.py).

Tier 2 (``COMFYUI_PATH``): tiny random-weight SD1.5-, SDXL- and SD3-shaped models built from ComfyUI's classes,
under ``torch.inference_mode()`` like the server. Checkpointing recomputes each block of the LoRA pass in backward
with the same inputs, weights and LoRA state, running the same kernels on the same values, so the losses and the
trained weights are the same bit for bit (CPU, one thread); what autograd keeps outside the recomputed segments
falls (counted with a saved-tensor hook, not timed).
"""

from __future__ import annotations

import pytest
import torch

FAMILIES = ("sd15", "sdxl", "sd3")


def _cache(nc, tr, fam):
    pos = []
    for i in range(2):
        pos += nc.tiny.conditioning(fam, 20 + i, 1)
    neg = nc.tiny.conditioning(fam, 99, 1, empty=True)
    model = nc.tiny.build(fam, seed=0)
    with torch.inference_mode():
        cache = tr.BuildTeacherCache.execute(model, pos, neg, nc.latent(fam, size=8), 1, 5, 5.0, 2, "normal").args[0]
    return model, cache


def _train(tr, model, cache, on: bool):
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.inference_mode(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tr.TrainRefiner.execute(model, cache, 2, 2, 2, 1e-3, 4, 0.0, 1, gradient_checkpointing=on)
    return out.args[0], out.args[1], saved[0]


@pytest.mark.parametrize("fam", FAMILIES)
def test_checkpointing_gives_the_same_training_and_keeps_less(nc, tr, fam):
    model, cache = _cache(nc, tr, fam)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    plain, plain_losses, plain_saved = _train(tr, model, cache, False)
    ckpt, ckpt_losses, ckpt_saved = _train(tr, model, cache, True)
    assert ckpt_losses == plain_losses
    assert plain.pairs.keys() == ckpt.pairs.keys()
    for k in plain.pairs:
        assert torch.equal(plain.pairs[k][0], ckpt.pairs[k][0]) and torch.equal(plain.pairs[k][1], ckpt.pairs[k][1]), k
    assert 0 < ckpt_saved < plain_saved, (ckpt_saved, plain_saved)
    print(f"{fam}: saved outside the segments {ckpt_saved / plain_saved:.3f} of the plain run")
    assert "gradient_checkpointing" in ckpt.metadata["noisecraft.training"]
    assert "gradient_checkpointing" not in plain.metadata["noisecraft.training"]
    # the MODEL is left as it was: its weights, and no block keeps a forward of ours
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    assert not any("forward" in m.__dict__ for m in model.model.modules())


def test_checkpoint_every_sets_the_named_runs_checkpoints(nc, tr, tmp_path, monkeypatch):
    """checkpoint_every (default 50, as before): a named run writes its checkpoint at each multiple; 0 is refused."""
    import folder_paths
    from safetensors import safe_open

    from noisecraft.train.loop import CHECKPOINT_NAME

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    model, cache = _cache(nc, tr, "sd15")
    steps_seen = []
    real = tr.run

    def spy(method, data, out_dir, config, **kw):
        steps_seen.append(config.checkpoint_every)
        return real(method, data, out_dir, config, **kw)

    monkeypatch.setattr(tr, "run", spy)
    with torch.inference_mode():
        tr.TrainRefiner.execute(model, cache, 3, 2, 2, 1e-3, 4, 0.0, 1, resume_from="ck", checkpoint_every=2)
    assert steps_seen == [2]
    with safe_open(str(tmp_path / "noisecraft_runs" / "ck" / CHECKPOINT_NAME), "pt") as f:
        assert f.metadata()  # written (at step 2 and at the last step)
    with pytest.raises(ValueError, match="checkpoint_every"), torch.inference_mode():
        tr.TrainRefiner.execute(model, cache, 3, 2, 2, 1e-3, 4, 0.0, 1, resume_from="ck2", checkpoint_every=0)
