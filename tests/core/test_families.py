"""train-refiner on every model family of the diffusers host: SD1.x (eps), SD2.x (v), SDXL, SD3-class (flow).

Tier 1 (torch + diffusers + transformers + peft, CPU, no ComfyUI, nothing downloaded: HF_HUB_OFFLINE=1).
Each family is a tiny random-weight diffusers *pipeline* built from diffusers/transformers classes here (CLIP
width 32, 2 layers, a 54-token CLIP vocabulary written in the test), saved with ``save_pretrained``; the real
CLI (``noisecraft.__main__.main``) trains a refiner on it. Then: the conditioning the host builds equals the
family pipeline's own ``encode_prompt`` (SDXL: + its time ids); the refiner file loads back onto the same
network (``load_lora``) with the family's key prefix and nonzero weights; and its refined noise equals the one
of the trainer's in-memory LoRA at the last step (the checkpoint's weights, put on the network as the trainer
holds them). Also: a single-file SD1 UNet (original ldm keys) with ``--config DIR``; and the bad inputs.
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from noisecraft.__main__ import main  # noqa: E402

PROMPTS = ["a red cat", "a blue dog"]
TOKENS = 16  # the tiny tokenizer's model_max_length (CLIP's max_position_embeddings here)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # loading must never touch the network


def _tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(tmp), model_max_length=TOKENS)


def _clip(projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=54, max_position_embeddings=TOKENS, projection_dim=32, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=channels, norm_num_groups=4,
                         layers_per_block=1, sample_size=16)


def _unet(**extra):
    from diffusers import UNet2DConditionModel

    cfg = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
    cfg.update(extra)
    return UNet2DConditionModel(**cfg).eval()


def build_pipeline(family: str, root: Path):
    """A tiny random pipeline of ``family`` saved to ``root`` (weights from the global RNG, seeded here in a fork)."""
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                           SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = _tokenizer(root.parent / f"{root.name}_vocab")
        sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
        if family in ("sd1", "sd2v"):
            v = family == "sd2v"
            unet = _unet(use_linear_projection=v, attention_head_dim=(2, 4) if v else 2)
            pipe = StableDiffusionPipeline(vae=_vae(4), text_encoder=_clip(False, 1), tokenizer=tok, unet=unet,
                                           scheduler=DDIMScheduler(**sd, clip_sample=False,
                                                                   prediction_type="v_prediction" if v else "epsilon"),
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        elif family == "sdxl":
            unet = _unet(cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                         addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 32)
            pipe = StableDiffusionXLPipeline(vae=_vae(4), text_encoder=_clip(False, 1), text_encoder_2=_clip(True, 2),
                                             tokenizer=tok, tokenizer_2=tok, unet=unet,
                                             scheduler=EulerDiscreteScheduler(**sd))
        else:
            net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16)
            pipe = StableDiffusion3Pipeline(transformer=net.eval(),
                                            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16),
                                            text_encoder=_clip(True, 1), tokenizer=tok,
                                            text_encoder_2=_clip(True, 2), tokenizer_2=tok, text_encoder_3=None,
                                            tokenizer_3=None)
    pipe.save_pretrained(str(root))
    return pipe


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def train_args(model, prompts, out, *extra):
    return ["train-refiner", "--model", model, "--prompts", prompts, "--steps", 2, "--samples", 4, "--batch", 2,
            "--teacher-steps", 2, "--student-steps", 2, "--checkpoint-every", 1, "--lr", 1e-2, "--device", "cpu",
            "--out", out, *extra]


class Run:
    """One family's pipeline folder and CLI training run."""

    def __init__(self, family, root, pipe, out, rc):
        self.family, self.root, self.pipe, self.out, self.rc = family, root, pipe, out, rc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return d


@pytest.fixture(scope="module")
def runs(workdir):
    """``runs(family)``: that family's pipeline folder and CLI run, made once per module."""
    done: dict = {}

    def get(family: str) -> Run:
        if family not in done:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("HF_HUB_OFFLINE", "1")
                root = workdir / family
                pipe = build_pipeline(family, root)
                out = workdir / f"out_{family}"
                rc = run_cli(*train_args(root, workdir / "prompts.txt", out))
            done[family] = Run(family, root, pipe, out, rc)
        return done[family]

    return get


@pytest.fixture(params=["sd1", "sd2v", "sdxl", "sd3"])
def family_run(request, runs):
    return runs(request.param)


def _host(run, **kw):
    from noisecraft.hosts.diffusers import diffusers_host

    return diffusers_host(run.root, PROMPTS, **kw)


# -- training on each family, and what the refiner file holds -------------------------------------------

def test_cli_trains_a_refiner_that_loads_back_and_refines_like_the_training_lora(family_run):
    """The CLI run ends (rc 0) with a refiner whose keys carry the family's prefix (ComfyUI's: lora_unet_ for
    UNets, lora_transformer_ for SD3), nonzero up weights equal to the trainer's in-memory LoRA at the last step
    (the checkpoint stores exactly the trained module), and refined noise through noisecraft.refine that is
    the in-memory LoRA's bit for bit. Tolerance 0: both paths put the same float32 weights on the same network
    through peft and run the same computation (the file stores float32 weights unchanged)."""
    from noisecraft.hosts.adapters import attach_lora, load_lora
    from noisecraft.io import load_safetensors
    from noisecraft.lora import read_refiner_pairs
    from noisecraft.refine import refine_noise
    from noisecraft.sigmas import get_sigmas

    run = family_run
    assert run.rc == 0
    pairs, meta = read_refiner_pairs(run.out / "refiner.safetensors")
    prefix = "lora_transformer_" if run.family == "sd3" else "lora_unet_"
    assert pairs and all(k.startswith(prefix) for k in pairs)
    assert meta["noisecraft.model_kind"] == {"sd1": "eps", "sd2v": "v", "sdxl": "eps", "sd3": "flow"}[run.family]
    assert max(float(up.abs().max()) for _, up, _ in pairs.values()) > 0  # trained: up starts at zero
    if run.family == "sd3":  # both streams' attention and feed-forward layers
        names = set(pairs)
        assert any(k.endswith("attn_add_q_proj") for k in names) and any("ff_context" in k for k in names)
    ckpt = load_safetensors(run.out / "checkpoint.safetensors", what="checkpoint", fix="")
    for key, (down, up, _) in pairs.items():
        assert torch.equal(down, ckpt[f"lora.layers.{key}.lora_down.weight"])
        assert torch.equal(up, ckpt[f"lora.layers.{key}.lora_up.weight"])

    host = _host(run)
    smax = float(get_sigmas(host.table, "normal", 2)[0])
    kind = host.table.kind
    c, h, w = int(host.unet.config.in_channels), 8, 8
    e = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(5))

    def refined(lora):
        d_base, d_lora = lora.base_and_lora(host.denoiser(torch.tensor([0, 1])))
        with torch.no_grad():
            return refine_noise(e, d_base, d_lora, kind, smax, 1.0)

    loaded = load_lora(host.unet, run.out / "refiner.safetensors")
    try:
        assert set(loaded.layers) == set(pairs)
        from_file = refined(loaded)
    finally:
        loaded.remove()
    memory = attach_lora(host.unet, int(meta["noisecraft.rank"]), targets=host.targets)
    try:
        with torch.no_grad():
            for key, pair in memory.layers.items():
                pair.lora_down.weight.copy_(ckpt[f"lora.layers.{key}.lora_down.weight"])
                pair.lora_up.weight.copy_(ckpt[f"lora.layers.{key}.lora_up.weight"])
        in_memory = refined(memory)
    finally:
        memory.remove()
    assert float((from_file - e).abs().max()) > 0  # the refiner does something
    assert torch.equal(from_file, in_memory)


def test_host_conditioning_is_the_pipelines_own(family_run):
    """The host's token states, pooled embeddings and time ids are what the family's diffusers pipeline builds
    (``encode_prompt``; SDXL ``_get_add_time_ids`` at the training size 8 x vae scale 2 = 16). Same modules, same
    float32 ops: equal to rounding (1e-6)."""
    run, pipe = family_run, family_run.pipe
    host = _host(run)
    tol = dict(rtol=1e-6, atol=1e-6)
    if run.family in ("sd1", "sd2v"):
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * len(PROMPTS))
        assert host.added is None
    elif run.family == "sdxl":
        cond, uncond, pooled, upooled = pipe.encode_prompt(PROMPTS, device="cpu")  # negative None: zeros
        torch.testing.assert_close(host.added["text_embeds"], pooled, **tol)
        torch.testing.assert_close(host.uncond_added["text_embeds"], upooled[:1], **tol)
        tid = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                     text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        assert torch.equal(host.added["time_ids"], tid.expand(2, -1))
        assert torch.equal(host.uncond_added["time_ids"], tid)
    else:
        cond, uncond, pooled, upooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt="")
        assert cond.shape == (2, TOKENS + 256, 64) and not cond[:, TOKENS:].any()  # T5 dropped: zeros
        torch.testing.assert_close(host.added["pooled_projections"], pooled, **tol)
        torch.testing.assert_close(host.uncond_added["pooled_projections"], upooled[:1], **tol)
    torch.testing.assert_close(host.conds, cond, **tol)
    torch.testing.assert_close(host.uncond, uncond[:1], **tol)


def _t5(tmp: Path):
    """A tiny T5 encoder (width 64 = the SD3 transformer's joint_attention_dim) and a character-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(string.ascii_lowercase)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        enc = T5EncoderModel(T5Config(vocab_size=32, d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=2)).eval()
    return enc, tok


def test_sd3_with_t5_encodes_like_the_pipeline(runs, tmp_path):
    """With text_encoder_3/ + tokenizer_3/ the T5 part of SD3's token states is T5's 256 tokens (not zeros), as
    StableDiffusion3Pipeline.encode_prompt builds them (to rounding, 1e-6)."""
    from diffusers import StableDiffusion3Pipeline

    base = runs("sd3").pipe
    enc, tok = _t5(tmp_path)
    parts = {k: getattr(base, k) for k in ("transformer", "scheduler", "vae", "text_encoder", "tokenizer",
                                           "text_encoder_2", "tokenizer_2")}
    pipe = StableDiffusion3Pipeline(**parts, text_encoder_3=enc, tokenizer_3=tok)
    pipe.save_pretrained(str(tmp_path / "sd3_t5"))
    from noisecraft.hosts.diffusers import diffusers_host

    host = diffusers_host(tmp_path / "sd3_t5", PROMPTS)
    with torch.no_grad():
        cond, uncond, pooled, upooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt="")
    assert cond.shape == (2, TOKENS + 256, 64) and cond[:, TOKENS:].abs().max() > 0
    print(f"\nT5 part: max|x| = {float(cond[:, TOKENS:].abs().max()):.3g}, "
          f"max|host - pipeline| = {float((host.conds - cond).abs().max()):.3g}")
    # the host encodes prompts + negative as one batch of 3, the pipeline as 2 and 1: BLAS blocks the float32
    # GEMMs otherwise, and T5 (attention over 256 tokens, RMSNorm, 2 layers) sums more terms than CLIP: at
    # |x| <= 3.4 an ulp is 2e-7; measured 6.7e-6 (~30 ulps), allowed 3e-5 (~150 ulps)
    tol = dict(rtol=1e-6, atol=3e-5)
    torch.testing.assert_close(host.conds, cond, **tol)
    torch.testing.assert_close(host.uncond, uncond[:1], **tol)
    torch.testing.assert_close(host.added["pooled_projections"], pooled, **tol)


def test_prompt_embeds_file_gives_the_same_host(family_run, tmp_path):
    """--prompt-embeds with the documented keys (cond/uncond; SDXL/SD3 + pooled/uncond_pooled) builds the same
    conditioning as the text encoders; without 'pooled' an SDXL/SD3 file is refused naming it."""
    from safetensors.torch import save_file

    run = family_run
    host = _host(run)
    data = {"cond": host.conds, "uncond": host.uncond}
    if host.added is not None:
        key = "pooled_projections" if run.family == "sd3" else "text_embeds"
        data.update(pooled=host.added[key], uncond_pooled=host.uncond_added[key])
    save_file({k: v.contiguous() for k, v in data.items()}, str(tmp_path / "emb.safetensors"))
    other = _host(run, prompt_embeds=tmp_path / "emb.safetensors")
    assert torch.equal(other.conds, host.conds) and torch.equal(other.uncond, host.uncond)
    for a, b in ((other.added, host.added), (other.uncond_added, host.uncond_added)):
        assert (a is None) == (b is None) and (a is None or all(torch.equal(a[k], b[k]) for k in b))
    if host.added is not None:
        save_file({"cond": host.conds, "uncond": host.uncond}, str(tmp_path / "bare.safetensors"))
        with pytest.raises(ValueError, match="pooled"):
            _host(run, prompt_embeds=tmp_path / "bare.safetensors")


# -- single-file checkpoints -------------------------------------------------------------------------

def diffusers_to_ldm_unet(state: dict, layers: int, blocks: int, attn_up: set) -> dict:
    """The original (ldm) key layout of a diffusers UNet2DConditionModel state dict, ``model.diffusion_model.``
    prefixed as in a single-file checkpoint (the inverse of diffusers' ``convert_ldm_unet_checkpoint`` for this
    layout: ``layers`` resnets per down block, ``blocks`` blocks, up blocks in ``attn_up`` with attention)."""
    res = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
    top = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
           ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    prefixes = []
    for i in range(blocks):
        for j in range(layers):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * (layers + 1) + j + 1}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * (layers + 1) + j + 1}.1."))
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op."))
        for j in range(layers + 1):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (layers + 1) + j}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (layers + 1) + j}.1."))
        prefixes.append((f"up_blocks.{i}.upsamplers.0.",
                         f"output_blocks.{i * (layers + 1) + layers}.{2 if i in attn_up else 1}."))
    prefixes += [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
                 ("mid_block.resnets.1.", "middle_block.2.")]
    out = {}
    for k, v in state.items():
        new = k
        for a, b in top:
            new = new.replace(a + ".", b + ".") if new.startswith(a + ".") else new
        for a, b in prefixes:
            if new.startswith(a):
                rest = new[len(a):]
                if "resnets" in a:
                    for x, y in res:
                        rest = y + rest[len(x):] if rest.startswith(x + ".") else rest
                new = b + rest
                break
        out["model.diffusion_model." + new] = v
    return out


def test_single_file_unet_with_a_local_config(runs, workdir, tmp_path):
    """``--model FILE.safetensors --config DIR``: the UNet comes from an original-layout (ldm) single file through
    diffusers' ``from_single_file(FILE, config=DIR)`` (offline), equal weight for weight to the folder's, and the
    CLI trains on it; without --config the file is refused naming the flag."""
    from safetensors.torch import save_file

    run = runs("sd1")
    unet = run.pipe.unet
    ldm = diffusers_to_ldm_unet(unet.state_dict(), layers=1, blocks=2, attn_up={1})
    ckpt = tmp_path / "tiny_sd1.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(ckpt))
    from noisecraft.hosts.diffusers import diffusers_host

    host = diffusers_host(ckpt, PROMPTS, config=run.root)
    assert host.base_model == "tiny_sd1"
    ref = unet.state_dict()
    got = host.unet.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    rc = run_cli(*train_args(ckpt, workdir / "prompts.txt", tmp_path / "out", "--config", run.root))
    assert rc == 0 and (tmp_path / "out" / "refiner.safetensors").is_file()


def test_unreadable_single_file_and_config_with_a_folder_are_refused(runs, workdir, tmp_path, capsys):
    """(A readable file without --config takes its configs from the Hub: test_single_file.py.)"""
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"x")
    _refused(capsys, train_args(ckpt, workdir / "prompts.txt", tmp_path / "o"), "single-file", "safetensors")
    _refused(capsys, train_args(runs("sd1").root, workdir / "prompts.txt", tmp_path / "o", "--config",
                                runs("sd1").root), "--config", "leave")


# -- bad inputs: one line, rc 2 ---------------------------------------------------------------------

def _refused(capsys, argv, *words):
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    ours = [ln for ln in err.splitlines() if ln.startswith("noisecraft ")]  # transformers may draw progress bars
    assert len(ours) == 1 and err.endswith(ours[0]), err
    err = ours[0]
    for w in words:
        assert w in err, (w, err)
    return err


def test_a_folder_of_another_family_is_refused_naming_the_families(workdir, tmp_path, capsys):
    bad = tmp_path / "flux"
    (bad / "transformer").mkdir(parents=True)
    (bad / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    _refused(capsys, train_args(bad, workdir / "prompts.txt", tmp_path / "o"), "FluxTransformer2DModel", "SD1.x",
             "SDXL", "SD3")
    _refused(capsys, train_args(tmp_path, workdir / "prompts.txt", tmp_path / "o"), "unet/config.json", "SD3")


def test_sdxl_without_its_second_text_encoder_is_refused(runs, workdir, tmp_path, capsys):
    broken = tmp_path / "sdxl"
    shutil.copytree(runs("sdxl").root, broken)
    shutil.rmtree(broken / "text_encoder_2")
    shutil.rmtree(broken / "tokenizer_2")
    _refused(capsys, train_args(broken, workdir / "prompts.txt", tmp_path / "o"), "text_encoder_2", "tokenizer_2",
             "--prompt-embeds")


@pytest.mark.parametrize("cache_of,model", [("sd3", "sd1"), ("sd1", "sd3")])
def test_a_teacher_cache_of_another_model_kind_is_refused(runs, workdir, tmp_path, capsys, cache_of, model):
    kinds = {"sd1": "eps", "sd3": "flow"}
    err = _refused(capsys, train_args(runs(model).root, workdir / "prompts.txt", tmp_path / "o", "--cache",
                                      runs(cache_of).out / "teacher_cache"), f"({kinds[cache_of]}), but",
                   f"({kinds[model]}):", "another --cache")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir()), err


def test_an_sd3_transformer_without_pooled_projections_is_refused(runs):
    """predict dispatches on the network: an SD3-class transformer needs pooled_projections, said by name."""
    from noisecraft.hosts.diffusers import DiffusersDenoiser

    host = _host(runs("sd3"))
    den = DiffusersDenoiser(host.unet, host.table, host.conds[:1])
    with pytest.raises(ValueError, match="pooled_projections"):
        den(torch.zeros(1, 16, 8, 8), torch.ones(1))


# -- prompt encodings on disk ---------------------------------------------------------------------------------

def test_the_cli_keeps_the_prompt_encodings_in_the_cache_and_they_are_the_hosts(family_run):
    """train-refiner --model encodes the prompts a chunk at a time into the teacher cache (conds.json +
    conds_*.safetensors) and trains from there: the stored rows are the eager host's conditioning exactly
    (same encoders, same batches of 16 texts), the family's extra inputs and the negative prompt's row too."""
    from noisecraft.train.cond_store import CondStore

    run = family_run
    assert run.rc == 0
    store = CondStore(run.out / "teacher_cache")
    host = _host(run)
    assert len(store) == len(PROMPTS) and store.shape == tuple(host.conds.shape)
    rows = store.rows(torch.arange(len(PROMPTS) - 1, -1, -1))  # any order
    assert torch.equal(rows.pop("cond"), host.conds.flip(0))
    assert set(rows) == set(host.added or {})
    for k, v in rows.items():
        assert torch.equal(v, host.added[k].flip(0)), k
    unc = store.uncond()
    assert torch.equal(unc.pop("cond"), host.uncond)
    for k, v in unc.items():
        assert torch.equal(v, host.uncond_added[k]), k


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from ``obj`` through attributes, dicts, lists and tuples (modules skipped)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, torch.nn.Module):
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _tensor_bytes(vars(obj), seen)
    return 0


def test_the_conditioning_held_in_memory_does_not_grow_with_the_prompt_count(runs, tmp_path):
    """With the encodings on disk the host holds the unconditional row and nothing per prompt: the tensor bytes
    reachable from it, and those a batch's rows allocate, are the same for 6 and for 96 prompts."""
    from noisecraft.hosts.diffusers import diffusers_host
    from noisecraft.train.cond_store import CondStore, build_conds

    run = runs("sdxl")
    held, batch, fresh = [], [], []
    for p in (6, 96):
        prompts = [f"prompt number {i}" for i in range(p)]
        host = diffusers_host(run.root, prompts, encode_now=False)
        assert host.conds is None  # nothing encoded yet (the host holds its sigma table)
        fresh.append(_tensor_bytes(host))
        build_conds(tmp_path / str(p), prompts, host.encoder, chunk=16)
        host.use_conds(CondStore(tmp_path / str(p)))
        held.append(_tensor_bytes(host))
        d = host.denoiser(torch.tensor([0, p - 1]), cfg=3.0)
        batch.append(_tensor_bytes(d))
        assert d.cond.shape[0] == 2
    assert fresh[0] == fresh[1] and held[0] == held[1] > fresh[0] and batch[0] == batch[1]


def test_an_interrupted_or_damaged_encoding_resumes_with_just_the_missing_chunk(runs, tmp_path):
    from noisecraft import io as ncio
    from noisecraft.hosts.diffusers import diffusers_host
    from noisecraft.train.cond_store import CondStore, build_conds, conds_for

    prompts = [f"a prompt {i}" for i in range(40)]
    host = diffusers_host(runs("sd1").root, prompts, encode_now=False)
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return host.encoder(texts)

    store = build_conds(tmp_path / "c", prompts, encode, chunk=16)
    assert calls == [16, 16, 8] and store.num_chunks == 3
    files = [store.chunk_path(j) for j in range(3)]
    before = [f.read_bytes() for f in files]
    files[1].unlink()  # a kill before chunk 1 was written
    raw = bytearray(files[2].read_bytes())
    raw[-1] ^= 0x10  # and a changed byte in chunk 2
    files[2].write_bytes(bytes(raw))
    with pytest.raises(ncio.ChecksumError, match=r"conds_00002\.safetensors is damaged"):
        CondStore(tmp_path / "c").rows([39])
    calls.clear()
    conds_for(tmp_path / "c", prompts, encode, chunk=16)
    assert calls == [16, 8], calls  # chunk 1 (missing) and chunk 2 (damaged) only
    assert [f.read_bytes() for f in files] == before
    with pytest.raises(ValueError, match="another prompt set"):
        conds_for(tmp_path / "c", prompts[:-1], encode, chunk=16)
