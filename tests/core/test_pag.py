"""CFG + PAG teacher (noisecraft.hosts.pag): equal to diffusers' own PAG pipeline, wired into train-refiner.

Tier 1: torch + diffusers + transformers, CPU, tiny random-weight models, nothing downloaded (the CLIP
tokenizer's vocabulary is written here). Checks: our guided prediction equals the combined noise prediction
of ``StableDiffusionPAGPipeline`` (captured where the pipeline hands it to its scheduler) at every step; the
attention processors are restored after each call, also when the forward raises; PAG without CFG and the
two-forward path (cond and uncond of different token counts) and an SDXL-shaped UNet's extra conditioning
(text_embeds, time_ids) equal the three-way combine of separate calls; bad layer names
and networks without self-attention are refused with the layers that exist; ``train-refiner --pag-scale``
trains end to end and records the teacher, and ``--pag-scale 0`` is the CFG teacher byte for byte.
"""

from __future__ import annotations

import json

import pytest
import torch

from noisecraft.hosts.diffusers import DiffusersDenoiser, sigma_table_from_scheduler
from noisecraft.hosts.pag import PAGDenoiser, default_pag_layers, pag_modules, self_attention_layers
from noisecraft.sigmas import SigmaTable, scaled_linear_alphas_cumprod

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

F32_EPS = torch.finfo(torch.float32).eps


def _tokenizer(folder):
    """A CLIP tokenizer over single bytes (no merges): vocab.json + merges.txt written here."""
    from transformers import CLIPTokenizer

    # GPT-2's byte -> unicode table (byte-level BPE), every byte one symbol
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]
    vocab = {tok: i for i, tok in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *[c + "</w>" for c in chars]])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=16), len(vocab)


def _unet(seed=0, **config):
    """A tiny SD-shaped UNet (``config`` overrides): 4 channels, 8x8, 32-wide text, one attention level."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)  # diffusers' init draws from the global RNG: seeded here, in the test only
    config = {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), **config}
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
                                **config).eval()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPAGPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = _tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(1)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1)  # integer timesteps
    p = StableDiffusionPAGPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=_unet(), scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                   pag_applied_layers=["mid"])
    p.set_progress_bar_config(disable=True)
    return p


def _run_pipeline(pipe, cfg, pag, steps=3, seed=0, layers=None):
    """(model_output, timestep, sample) of every scheduler step: the pipeline's combined noise prediction."""
    seen = []
    step = pipe.scheduler.step

    def capture(model_output, timestep, sample, *args, **kwargs):
        seen.append((model_output.detach().clone(), timestep, sample.detach().clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = capture
    if layers is not None:
        pipe.set_pag_applied_layers(layers)
    try:
        with torch.no_grad():
            pipe("a red fox", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=cfg, pag_scale=pag,
                 height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(seed))
    finally:
        del pipe.scheduler.step
        pipe.set_pag_applied_layers(["mid"])
    return seen, [float(s) for s in pipe.scheduler.sigmas]


def _ours(pipe, cfg, pag, layers=None):
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a red fox", torch.device("cpu"), 1, True, "blurry")
    table = sigma_table_from_scheduler(pipe.scheduler)
    return PAGDenoiser(DiffusersDenoiser(pipe.unet, table, cond, uncond, cfg=cfg), pag, layers)


@pytest.mark.parametrize("cfg,pag,layers", [(7.0, 3.0, None), (5.0, 2.0, ["down_blocks.0", "up_blocks.1"])])
def test_guided_prediction_equals_diffusers_pag_pipeline(pipe, cfg, pag, layers):
    """At each step, eps from our x0-space combine equals the pipeline's eps-space combine up to rounding.

    Both run the same network on the same batch [uncond, cond, cond] with the same processors; the input
    scaling x / sqrt(sigma^2 + 1) may round differently in its last bit. Ours combines x0 = x - sigma eps, values
    of size max|x| + sigma max|eps|, with coefficients summing to at most 1 + cfg + pag, and maps back with
    eps = (x - D) / sigma: a few float32 roundings of (1 + cfg + pag) (max|x| / sigma + max|eps|) in eps. We
    allow 16 of them, a bound far below any change of guidance (checked last: the CFG-only prediction)."""
    seen, sigmas = _run_pipeline(pipe, cfg, pag, layers=layers)
    ours = _ours(pipe, cfg, pag, layers)
    procs = dict(pipe.unet.attn_processors)
    assert len(seen) == 3
    tols = []
    for i, (eps, t, x) in enumerate(seen):
        sigma = torch.full((x.shape[0],), sigmas[i])
        assert torch.equal(ours.base.inputs(x, sigma)[3].float(), torch.full((x.shape[0],), float(t)))
        with torch.no_grad():
            d = ours(x, sigma)
        eps_ours = (x - d) / sigmas[i]
        tol = 16 * (1 + cfg + pag) * F32_EPS * (float(x.abs().max()) / sigmas[i] + float(eps.abs().max()))
        err = float((eps_ours - eps).abs().max())
        assert err <= tol, (i, err, tol)
        tols.append(tol)
    assert ours.passes == 3 * 3
    assert dict(pipe.unet.attn_processors) == procs  # restored after each call
    # the PAG term is really there: the CFG-only prediction is far from it
    with torch.no_grad():
        cfg_only = ours.base(seen[0][2], torch.full((1,), sigmas[0]))
    assert float(((seen[0][2] - cfg_only) / sigmas[0] - seen[0][0]).abs().max()) > 1e3 * tols[0]


def test_pag_without_cfg_and_the_two_forward_path_equal_the_combine(pipe):
    """cfg 1: ``D_c + pag (D_c - D_p)`` from one forward of [cond, cond]. With CFG, the one forward of
    [uncond, cond, cond] and, where cond and uncond differ in token count, the uncond forward alone plus
    [cond, cond], both equal ``D_u + cfg (D_c - D_u) + (PAG alone - D_c)`` built from separate calls: the
    same network rows, so only float rounding of values of size max|x| (coefficients summing to <= 1 + cfg +
    pag, and batch-size dependent kernels) separates them; we allow 16 such roundings."""
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a red fox", torch.device("cpu"), 1, True, "blurry")
    table = sigma_table_from_scheduler(pipe.scheduler)
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g) * 3.0, torch.tensor([2.5, 0.7])
    long_uncond = torch.cat([uncond, uncond[:, -1:]], dim=1)  # 17 tokens against 16: two forwards
    cfg, pag = 6.0, 2.0
    with torch.no_grad():
        pag_only = PAGDenoiser(DiffusersDenoiser(pipe.unet, table, cond), pag)
        one = PAGDenoiser(DiffusersDenoiser(pipe.unet, table, cond, uncond, cfg=cfg), pag)
        two = PAGDenoiser(DiffusersDenoiser(pipe.unet, table, cond, long_uncond, cfg=cfg), pag)
        d_p, d_one, d_two = pag_only(x, sigma), one(x, sigma), two(x, sigma)
        d_c, d_u, d_ul = (DiffusersDenoiser(pipe.unet, table, c)(x, sigma) for c in (cond, uncond, long_uncond))
    assert (pag_only.passes, one.passes, two.passes) == (2, 3, 3)
    tol = 16 * (1 + cfg + pag) * F32_EPS * float(x.abs().max())
    assert float((d_one - (d_u + cfg * (d_c - d_u) + (d_p - d_c))).abs().max()) <= tol
    assert float((d_two - (d_ul + cfg * (d_c - d_ul) + (d_p - d_c))).abs().max()) <= tol
    assert float((d_p - d_c).abs().max()) > 100 * tol  # the perturbation is not a no-op


def test_sdxl_extra_conditioning_goes_with_its_rows():
    """An SDXL-shaped UNet (text_embeds + time_ids): in the one forward of [uncond, cond, cond] each row gets its
    own added conditioning, so the result equals the combine of separate calls (tolerance as above)."""
    unet = _unet(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8)
    table = SigmaTable.from_alphas_cumprod(scaled_linear_alphas_cumprod(), "eps")
    g = torch.Generator().manual_seed(4)
    cond, uncond = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    uadded = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": added["time_ids"]}
    x, sigma = torch.randn(2, 4, 8, 8, generator=g) * 3.0, torch.tensor([2.5, 0.7])
    cfg, pag = 5.0, 3.0
    with torch.no_grad():
        one = PAGDenoiser(DiffusersDenoiser(unet, table, cond, uncond, cfg=cfg, added_cond_kwargs=added,
                                            uncond_added_cond_kwargs=uadded), pag)(x, sigma)
        d_p = PAGDenoiser(DiffusersDenoiser(unet, table, cond, added_cond_kwargs=added), pag)(x, sigma)
        d_c = DiffusersDenoiser(unet, table, cond, added_cond_kwargs=added)(x, sigma)
        d_u = DiffusersDenoiser(unet, table, uncond, added_cond_kwargs=uadded)(x, sigma)
    tol = 16 * (1 + cfg + pag) * F32_EPS * float(x.abs().max())
    assert float((one - (d_u + cfg * (d_c - d_u) + (d_p - d_c))).abs().max()) <= tol
    assert float((d_p - d_c).abs().max()) > 100 * tol


def test_processors_are_restored_when_the_forward_raises(pipe):
    procs = dict(pipe.unet.attn_processors)
    ours = _ours(pipe, 7.0, 3.0)
    with pytest.raises(ValueError, match="channels"):
        ours(torch.zeros(1, 3, 8, 8), torch.ones(1))  # refused before the network runs
    bad = torch.zeros(1, 4, 8, 8)
    ours.base.cond = torch.zeros(1, 16, 31)  # the wrong width: the network raises inside the perturbed forward
    with pytest.raises(RuntimeError):
        ours(bad, torch.ones(1))
    assert dict(pipe.unet.attn_processors) == procs


def test_layer_selection_is_diffusers_and_bad_layers_list_what_exists(pipe):
    unet = pipe.unet
    names = [n for n, _ in self_attention_layers(unet)]
    assert names and all(n.endswith("attn1") for n in names)
    assert default_pag_layers(unet) == ["mid"]
    assert [n for n, _ in pag_modules(unet)] == [n for n in names if n.startswith("mid_block")]
    with pytest.raises(ValueError) as exc:
        pag_modules(unet, ["down.block_7"])
    msg = str(exc.value)
    assert "'down.block_7' matches no self-attention" in msg and "mid_block" in msg and "--pag-layers" in msg
    assert "--pag-scale 0" in msg
    with pytest.raises(ValueError, match="not a regular expression"):
        pag_modules(unet, ["mid("])
    with pytest.raises(ValueError, match="pag_scale must be a finite number >= 0"):
        _ours(pipe, 7.0, -1.0)


def test_a_model_without_self_attention_is_refused():
    unet = _unet(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 mid_block_type=None)
    with pytest.raises(ValueError, match="has no self-attention layers.*--pag-scale 0"):
        pag_modules(unet)


# -- the CLI ---------------------------------------------------------------------------------------


COMMON = ["--steps", "2", "--samples", "4", "--batch", "4", "--student-steps", "2", "--teacher-steps", "2",
          "--rank", "2", "--shard-size", "4"]


def test_cli_pag_teacher_trains_and_pag_0_is_the_cfg_teacher(tmp_path, capsys):
    from noisecraft.__main__ import main
    from noisecraft.lora import read_lora_file
    from noisecraft.train import TeacherCache

    assert main(["train-refiner", "--toy", "--out", str(tmp_path / "cfg"), *COMMON]) == 0
    assert main(["train-refiner", "--toy", "--pag-scale", "0", "--out", str(tmp_path / "pag0"), *COMMON]) == 0
    for f in ("teacher_cache/index.json", "teacher_cache/shard_00000.safetensors", "refiner.safetensors"):
        assert (tmp_path / "cfg" / f).read_bytes() == (tmp_path / "pag0" / f).read_bytes(), f
    assert main(["train-refiner", "--toy", "--pag-scale", "3", "--out", str(tmp_path / "pag"), *COMMON]) == 0
    cache, plain = TeacherCache(tmp_path / "pag" / "teacher_cache"), TeacherCache(tmp_path / "cfg" / "teacher_cache")
    assert (cache.meta["guidance"], cache.meta["pag_scale"], cache.meta["pag_layers"]) == ("cfg+pag", 3.0, ["mid"])
    assert plain.meta["guidance"] == "cfg" and "pag_scale" not in plain.meta
    a, b = cache.get(range(4)), plain.get(range(4))
    assert torch.equal(a.e, b.e) and torch.isfinite(a.x0).all() and float((a.x0 - b.x0).abs().max()) > 1e-3
    _, meta = read_lora_file(tmp_path / "pag" / "refiner.safetensors")
    assert "cfg+pag" in meta["noisecraft.training"]
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "pag" / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    capsys.readouterr()
    assert main(["train-refiner", "--toy", "--pag-scale", "3", "--pag-layers", "nothing_here",
                 "--out", str(tmp_path / "bad"), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "'nothing_here' matches no self-attention" in err and "mid_block" in err and "--pag-layers" in err
    assert not (tmp_path / "bad" / "teacher_cache").exists()  # refused before any sampling
    assert main(["train-refiner", "--toy", "--pag-layers", "mid", "--out", str(tmp_path / "bad"), *COMMON]) == 2
    assert "give --pag-scale S" in capsys.readouterr().err
