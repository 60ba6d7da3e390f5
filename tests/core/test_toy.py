"""The shipped toy model (noisecraft/assets/): integrity against the manifest, loading, the
classifier on real digits, and the guidance gap that the noise methods are measured against.

Tier 1: torch + diffusers + scikit-learn (dev extra), CPU, no ComfyUI.
"""

import shutil

import pytest
import torch

from noisecraft import ode
from noisecraft.hosts import toy
from noisecraft.sigmas import ModelKind, get_sigmas, noise_to_x
from noisecraft.weights import MANIFEST_PATH, find_entry, load_manifest, sha256_file, verify_file

TOY_ENTRIES = ("toy-unet", "toy-unet-config", "toy-classifier")
TOY_FILES = {
    "toy-unet": toy.UNET_WEIGHTS,
    "toy-unet-config": toy.UNET_CONFIG,
    "toy-classifier": toy.CLASSIFIER_WEIGHTS,
}


# -- integrity ---------------------------------------------------------------------------------


def test_manifest_lists_the_toy_files():
    assert MANIFEST_PATH.is_file(), f"{MANIFEST_PATH} is missing"
    entries = {e.name: e for e in load_manifest()}
    for name in TOY_ENTRIES:
        assert name in entries, f"{name!r} not in {MANIFEST_PATH}"
        e = entries[name]
        assert e.path and e.local_path is not None
        assert e.local_path.resolve() == TOY_FILES[name].resolve()  # the file toy.py loads
        assert e.sha256 and len(e.sha256) == 64 and int(e.sha256, 16) >= 0
        assert isinstance(e.size, int) and e.size > 0
        assert e.license and e.folder and e.kind and e.base_model


@pytest.mark.parametrize("entry", [e for e in load_manifest() if e.path], ids=lambda e: e.name)
def test_in_package_files_match_manifest(entry):
    path = entry.local_path
    assert path.is_file(), f"{entry.name}: {path} is missing"
    assert path.stat().st_size == entry.size
    assert sha256_file(path) == entry.sha256
    verify_file(path, entry)  # does not raise


def test_corrupted_unet_fails_sha256(tmp_path):
    entry = find_entry("toy-unet")
    bad = tmp_path / "toy_unet.safetensors"
    shutil.copyfile(entry.local_path, bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256") as info:
        verify_file(bad, entry)
    msg = str(info.value)
    assert str(bad) in msg and entry.sha256 in msg and "toy-unet" in msg


def test_truncated_unet_fails_size(tmp_path):
    entry = find_entry("toy-unet")
    bad = tmp_path / "toy_unet.safetensors"
    bad.write_bytes(entry.local_path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="size") as info:
        verify_file(bad, entry)
    msg = str(info.value)
    assert str(bad) in msg and str(entry.size) in msg


def test_unknown_manifest_name_raises():
    with pytest.raises(KeyError, match="toy-unet"):  # lists the known names
        find_entry("no-such-weights")


# -- loading -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return toy.load_toy()


def test_toy_loads(model):
    assert model.latent_shape == (1, 8, 8)
    assert model.num_classes == 10 and model.null_class == 10
    assert model.table.kind is ModelKind.EPS
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert not model.unet.training and not model.embedding.weight.requires_grad


def test_cond_shapes_and_bad_labels(model):
    width = model.embedding.weight.shape[1]
    assert model.cond(torch.tensor([0, 5, 9])).shape == (3, 1, width)
    assert model.cond(torch.tensor([model.null_class])).shape == (1, 1, width)
    assert model.uncond(4).shape == (4, 1, width)
    torch.testing.assert_close(model.uncond(1), model.cond(torch.tensor([model.null_class])))
    assert model.noise(5, torch.Generator().manual_seed(0)).shape == (5, 1, 8, 8)
    for bad in ([-1], [11], [0, 3, 12]):
        with pytest.raises(ValueError, match="labels"):
            model.cond(torch.tensor(bad))


def test_denoiser_runs_and_keeps_gradients(model):
    labels = torch.tensor([1, 2])
    x = noise_to_x(model.noise(2, torch.Generator().manual_seed(0)), "eps", model.table.sigma_max)
    x.requires_grad_(True)
    d = model.denoiser(labels, cfg=3.0)
    x0 = d(x, torch.full((2,), model.table.sigma_max))
    assert x0.shape == x.shape and d.passes == 2
    x0.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


# -- the classifier and the guidance gap ---------------------------------------------------------


def test_classifier_scores_real_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = toy.digits_to_x(torch.as_tensor(digits.images)).reshape(-1, 1, 8, 8)
    labels = torch.as_tensor(digits.target)
    assert x.shape == (1797, 1, 8, 8) and float(x.min()) == -1.0 and float(x.max()) == 1.0
    s = toy.score_digits(x, labels)
    assert s["accuracy"] >= 0.95, s
    classify = toy.load_classifier()
    probs = classify(x[:4])
    assert probs.shape == (4, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    with pytest.raises(ValueError, match="one label per sample"):
        toy.score_digits(x[:3], labels[:2])


def test_guidance_gap(model):
    """CFG 3 beats unguided sampling on the same noise (about 0.99 vs 0.8 on the README's
    check); the toy is undertrained on purpose so that this gap exists."""
    labels = torch.arange(10).repeat_interleave(6)
    e = model.noise(60, torch.Generator().manual_seed(1234))
    sigmas = get_sigmas(model.table, "normal", 20)
    x_t = noise_to_x(e, model.table.kind, float(sigmas[0]))
    scores = {}
    with torch.no_grad():
        for cfg in (1.0, 3.0):
            d = model.denoiser(labels, cfg=cfg)
            x0 = ode.sample(d, x_t, sigmas)
            assert d.passes == (20 if cfg == 1.0 else 40)
            assert bool(torch.isfinite(x0).all())
            scores[cfg] = toy.score_digits(x0, labels)
    unguided, guided = scores[1.0], scores[3.0]
    assert guided["accuracy"] > unguided["accuracy"], scores
    assert guided["confidence"] > unguided["confidence"], scores
    assert guided["accuracy"] >= 0.9, scores
