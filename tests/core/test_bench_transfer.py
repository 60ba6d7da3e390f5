"""``benchmarks/bench_transfer.py``'s fine-tunes: the restyled data and the merged LoRA fine-tune (a few steps)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

from noisecraft.hosts import toy
from noisecraft.lora import DEFAULT_TARGETS

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("nc_bench_transfer", REPO / "benchmarks" / "bench_transfer.py")
    mod = importlib.util.module_from_spec(spec)
    # scripts/ and benchmarks/ each have a `_common` module: the benchmark imports the scripts' one; whatever
    # another test imported under that name is put back afterwards (and the scripts' one is not left behind)
    saved = sys.modules.pop("_common", None)
    try:
        spec.loader.exec_module(mod)
    finally:
        if str(REPO / "scripts") in sys.path:
            sys.path.remove(str(REPO / "scripts"))
        sys.modules.pop("_common", None)
        if saved is not None:
            sys.modules["_common"] = saved
    return mod


def test_restyled_digits_stay_in_range_and_change_the_strokes_only():
    bench = _bench()
    pixels = torch.tensor([[0.0, 4.0, 16.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 1, 2, 4)
    x = pixels / 8 - 1
    bright = bench.restyle(x, "contrast")
    thick = bench.restyle(x, "thick")
    for y in (bright, thick):
        assert float(y.min()) >= -1 and float(y.max()) <= 1
    assert torch.allclose(bright, (16 * (pixels / 16).sqrt()) / 8 - 1)  # 4 -> 8, 16 stays, background stays
    # each pixel: max(itself, 0.75 x the largest of its 3x3 neighbourhood)
    want = torch.tensor([[3.0, 12.0, 16.0, 12.0], [3.0, 12.0, 12.0, 12.0]]).reshape(1, 1, 2, 4)
    assert torch.equal(thick, want / 8 - 1)


def test_the_lora_fine_tune_is_merged_into_the_target_layers_only():
    bench = _bench()
    base = toy.load_toy()
    x = torch.zeros(8, 1, 8, 8)
    y = torch.arange(8) % 10
    args = types.SimpleNamespace(ft_steps=3, ft_batch=4, ft_lr=5e-4)
    tuned = bench.finetune(base, x, y, args, seed=0, lora_rank=2)
    assert tuned.unet is not base.unet and tuned.embedding is base.embedding
    before, after = base.unet.state_dict(), tuned.unet.state_dict()
    assert set(before) == set(after)  # merged: no peft wrapper keys left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".weight") and any(k[: -len(".weight")].endswith(t) for t in DEFAULT_TARGETS)
                           for k in changed), sorted(changed)[:5]
    assert bench.weight_change(base, base) == 0 and bench.weight_change(base, tuned) > 0
