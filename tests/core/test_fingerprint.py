"""The base-model fingerprint (noisecraft/fingerprint.py) on the toy model: what the CLI trainer records, and
how a recorded fingerprint compares with the same model at another precision, a fine-tune and an old file."""

from __future__ import annotations

import copy
import json
import logging

import torch

from noisecraft import fingerprint as fp
from noisecraft.hosts import toy
from noisecraft.hosts.adapters import load_lora
from noisecraft.hosts.toy import toy_host
from noisecraft.lora import read_lora_file
from noisecraft.sigmas import get_sigmas
from noisecraft.train import RefinerTrainConfig, build_teacher_cache, train_refiner


def _weights(unet):
    """What a host hands :func:`fp.compare`: ``modules -> [(name, weight)]``."""
    return lambda modules: [(m, unet.get_submodule(m).weight) for m in modules]


def test_the_toy_fingerprint_names_its_layers_and_ignores_an_attached_lora():
    model = toy.load_toy()
    got = fp.module_fingerprint(model.unet)
    assert got["modules"] == list(fp.UNET_MODULES) and got["dtype"] == "float32"
    assert set(got["sha256"]) == {"float32", "float16", "bfloat16"}
    assert fp.module_fingerprint(toy.load_toy().unet) == got  # deterministic
    lora = load_lora(model.unet, toy.REFINER_WEIGHTS)  # peft wraps the layers: their base weights are hashed
    try:
        assert fp.module_fingerprint(model.unet) == got
    finally:
        lora.remove()


def test_compare_tells_the_base_at_another_precision_from_a_fine_tune():
    model = toy.load_toy()
    recorded = json.loads(json.dumps(fp.module_fingerprint(model.unet)))  # as read back from a file
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # the same checkpoint loaded at another precision
        unet = copy.deepcopy(model.unet).to(dtype)
        assert fp.compare(recorded, _weights(unet))[0] == fp.Match.BASE, dtype
    tuned = copy.deepcopy(model.unet)  # a fine-tune: one fingerprinted weight moved by 1e-3 of its size
    with torch.no_grad():
        w = tuned.get_submodule(fp.UNET_MODULES[2]).weight
        w.view(-1)[0] += 1e-3 * float(w.abs().max())
    match, why = fp.compare(recorded, _weights(tuned))
    assert match == fp.Match.OTHER and "float32" in why
    # recorded from fp16 weights (e.g. a half-precision trainer), checked against the fp32 original: compared at fp16
    half = fp.module_fingerprint(copy.deepcopy(model.unet).to(torch.float16))
    assert half["dtype"] == "float16" and fp.compare(half, _weights(model.unet))[0] == fp.Match.BASE
    assert fp.compare(half, _weights(tuned.to(torch.float16)))[0] == fp.Match.OTHER


def test_old_and_unreadable_records_are_unknown(caplog):
    model = toy.load_toy()
    _, meta = read_lora_file(toy.REFINER_WEIGHTS)  # the shipped toy refiner predates the fingerprint
    assert fp.parse(meta) is None
    match, why = fp.compare(None, _weights(model.unet))
    assert match == fp.Match.UNKNOWN and "no base fingerprint recorded" in why
    with caplog.at_level(logging.WARNING):
        assert fp.parse({fp.FINGERPRINT_KEY: "not json"}) is None
    assert fp.FINGERPRINT_KEY in caplog.text
    other_arch = {"modules": ["no_such_layer"], "dtype": "float32", "sha256": {}}
    assert fp.compare(other_arch, lambda modules: None)[0] == fp.Match.UNKNOWN


def test_the_cli_trainer_records_the_fingerprint_of_its_model(tmp_path):
    model = toy.load_toy()
    host = toy_host(model)
    cache = build_teacher_cache(
        tmp_path / "cache", lambda c: host.denoiser(c, cfg=3.0), shape=model.latent_shape, conds=list(range(10)),
        total=8, sigmas=get_sigmas(model.table, "normal", 3), kind="eps", base_seed=1, shard_size=8, batch_size=8)
    result = train_refiner(host, cache, tmp_path / "run",
                           RefinerTrainConfig(steps=1, rank=2, batch_size=4, student_steps=2, checkpoint_every=1))
    result.lora.remove()
    _, meta = read_lora_file(result.refiner_path)
    recorded = fp.parse(meta)
    assert recorded == fp.module_fingerprint(toy.load_toy().unet)
    assert fp.compare(recorded, _weights(model.unet))[0] == fp.Match.BASE
