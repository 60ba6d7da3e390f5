"""NOISE objects follow ComfyUI's protocol and seeding bit for bit."""

from __future__ import annotations

import pytest
import torch

from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

SHAPE = (3, 4, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_index", [None, [0, 1, 2], [1], [2, 0], [3, 3, 1], [5]])
def test_seeded_noise_equals_random_noise_including_batch_index(nc, batch_index, dtype):
    """The contract with whichever ComfyUI runs (v0.3.x draws in the latent's dtype, newer ComfyUI in float32 cast to
    it: the two differ for half-precision latents), for fp32, fp16 and bf16 latents."""
    n = len(batch_index) if batch_index else SHAPE[0]
    lat = {"samples": torch.zeros(n, *SHAPE[1:], dtype=dtype)}
    if batch_index is not None:
        lat["batch_index"] = batch_index
    state = torch.get_rng_state()
    ours = nc.noise.SeededNoise(42).generate_noise(lat)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    theirs = Noise_RandomNoise(42).generate_noise(lat)
    assert ours.dtype == theirs.dtype and ours.device.type == "cpu"
    assert torch.equal(ours, theirs)


def test_candidate_stack_is_random_noise_of_consecutive_seeds(nc):
    lat = {"samples": torch.zeros(2, 4, 8, 8), "batch_index": [4, 7]}
    c = nc.noise.candidate_stack(10, 3, lat)
    assert c.shape == (3, 2, 4, 8, 8)
    for j in range(3):
        assert torch.equal(c[j], Noise_RandomNoise(10 + j).generate_noise(lat))


def test_candidate_stack_refuses_k_below_one(nc):
    with pytest.raises(ValueError, match="K must be >= 1"):
        nc.noise.candidate_stack(0, 0, {"samples": torch.zeros(1, 4, 8, 8)})


def test_fixed_noise_returns_its_tensor_and_names_the_node_on_shape_mismatch(nc):
    t = torch.randn(1, 4, 8, 8)
    fn = nc.noise.FixedNoise(t, seed=9, source="Inversion-Stability Select")
    assert fn.seed == 9
    out = fn.generate_noise({"samples": torch.zeros(1, 4, 8, 8)})
    assert torch.equal(out, t)
    out.add_(1)  # callers may modify what they get
    assert torch.equal(fn.generate_noise({"samples": torch.zeros(1, 4, 8, 8)}), t)
    with pytest.raises(ValueError, match=r"re-run Inversion-Stability Select.*same LATENT"):
        fn.generate_noise({"samples": torch.zeros(1, 4, 16, 16)})


def test_fixed_noise_refuses_nan_and_inf(nc):
    t = torch.randn(1, 4, 8, 8)
    t[0, 0, 0, 0] = float("nan")
    t[0, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="2 NaN/inf values"):
        nc.noise.FixedNoise(t, source="X")
