"""``train-refiner --model FILE.safetensors`` without ``--config``: the architecture from the file's keys (diffusers'
``infer_diffusers_model_type``), the configs from the Hugging Face cache or the Hub, the text encoders from the file.

Tier 1 (torch + diffusers + transformers + peft, CPU, no ComfyUI, no network beyond 127.0.0.1). The Hub is a
loopback HTTP server (``HF_ENDPOINT``) speaking the part of the Hub protocol ``huggingface_hub.snapshot_download``
uses (repo info, tree listing, resolve); the Hugging Face cache is a temporary folder per test. Each family is a
tiny random pipeline built here; its single file is the pipeline's weights in the original key layout (LDM UNet,
``cond_stage_model`` / ``conditioner.embedders`` CLIP and OpenCLIP, MMDiT ``joint_blocks`` and ``text_encoders.*``),
written by the inverse of diffusers' own conversions; the loopback Hub serves the pipeline's configs (no weights)
under the repo id diffusers infers for the file, as the real Hub serves the full-size ones. Sizes are chosen so
diffusers' key checks name the family: SD2's cross-attention is 1024 wide (its text encoder OpenCLIP-layout),
SDXL's OpenCLIP has 10 layers (``resblocks.9``), the SD3 transformer has 38 (``joint_blocks.37``: diffusers reads
it as SD3.5 large), the two CLIPs of SDXL and SD3 have different widths (diffusers tells them apart by width).
The SD2 prediction rule and real-size SD3 medium are checked on files holding only the tensors looked at.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import re
import socket
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

from noisecraft.hosts.single_file import CONFIG_PATTERNS, inspect_single_file, single_file_config  # noqa: E402

_spec = importlib.util.spec_from_file_location("nc_test_families", Path(__file__).with_name("test_families.py"))
fam = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fam)  # the family tests' tiny pipelines, LDM UNet layout, CLI runner and refusal check

PROMPTS = fam.PROMPTS
COMMIT = "5f1e0c0" + "0" * 33
SD1_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the repos diffusers names for these files
XL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SD35L_REPO = "stabilityai/stable-diffusion-3.5-large"
SD2_REPO = "stabilityai/stable-diffusion-2-1"
KINDS = {"sd1": "eps", "sd2": "v", "sdxl": "eps", "sd3": "flow"}


# -- a loopback Hugging Face Hub ------------------------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    """``state['repos']``: repo id -> {path in repo: bytes}. Answers ``/api/models/<repo>/revision/<rev>`` (repo
    info with its commit), ``/api/models/<repo>/tree/<rev>`` (every file, one page) and, GET and HEAD,
    ``/<repo>/resolve/<rev>/<path>`` (X-Repo-Commit, ETag, Content-Length); 404 otherwise. Paths are logged."""

    protocol_version = "HTTP/1.1"
    state: dict = {}

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, head_only: bool, ctype: str = "application/json", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _answer(self, head_only: bool):
        path = unquote(urlparse(self.path).path)
        self.state["requests"].append(path)
        repos = self.state["repos"]
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        if m and m.group(1) in self.state["gated"]:  # what the Hub answers for a gated repo without a login
            return self._send(401, b'{"error": "gated"}', head_only,
                              headers=[("X-Error-Code", "GatedRepo"), ("X-Error-Message", "Access restricted")])
        if m and m.group(1) in repos:
            files = repos[m.group(1)]
            if m.group(2) == "revision":
                data = {"id": m.group(1), "sha": COMMIT, "siblings": [{"rfilename": f} for f in sorted(files)]}
            else:
                data = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for f, b in sorted(files.items())]
            return self._send(200, json.dumps(data).encode(), head_only)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and m.group(3) in repos.get(m.group(1), {}):
            body = repos[m.group(1)][m.group(3)]
            return self._send(200, body, head_only, "application/octet-stream",
                              [("X-Repo-Commit", COMMIT), ("ETag", '"' + hashlib.sha1(body).hexdigest() + '"')])
        code = "EntryNotFound" if "/resolve/" in path else "RepoNotFound"
        self._send(404, b'{"error": "not found"}', head_only, headers=[("X-Error-Code", code)])

    def do_GET(self):
        self._answer(head_only=False)

    def do_HEAD(self):
        self._answer(head_only=True)


@pytest.fixture()
def hub(server, monkeypatch, tmp_path):
    """The loopback server as the Hub (HF_ENDPOINT), online, an empty Hugging Face cache in tmp; yields its state."""
    from huggingface_hub import constants

    Handler.state.clear()
    Handler.state.update(repos={}, requests=[], gated=set())
    host, port = server.server_address[:2]
    monkeypatch.setenv("HF_ENDPOINT", f"http://{host}:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    registry = tmp_path / "hf" / ".agent_harnesses.json"  # else huggingface_hub fetches it from huggingface.co
    registry.parent.mkdir(parents=True, exist_ok=True)
    registry.write_text(json.dumps({"standardEnvVars": [], "harnesses": {}}))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(registry))
    return Handler.state


def serve(state: dict, repo: str, folder: Path) -> None:
    """Serve ``folder``'s configs and tokenizer files (diffusers' allow_patterns: no weights) as ``repo``."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and p.suffix in (".json", ".txt", ".model")}
    state["repos"][repo] = files


# -- tiny pipelines and their single files ----------------------------------------------------------------


def _clip(width: int, layers: int, projection: bool, seed: int, proj_dim=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=layers,
                         vocab_size=54, max_position_embeddings=fam.TOKENS, projection_dim=proj_dim or width,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def hf_clip(enc, prefix: str) -> dict:
    """A transformers CLIP's weights under ``prefix`` in the HF layout (``<prefix>text_model.*``)."""
    return {prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in enc.state_dict().items()}


def open_clip(enc, prefix: str) -> dict:
    """A transformers CLIP's weights in the OpenCLIP layout (inverse of diffusers' ``convert_open_clip_checkpoint``:
    fused in_proj, resblocks, ln_1/ln_2, c_fc/c_proj; with a projection, text_projection [W, P])."""
    sd = {k.removeprefix(prefix): v for k, v in hf_clip(enc, prefix).items()}
    out = {prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T
    for i in range(enc.config.num_hidden_layers):
        a, b = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for t in ("weight", "bias"):
            out[b + f"attn.in_proj_{t}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{t}"] for x in "qkv"])
            for new, old in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[b + f"{new}.{t}"] = sd[a + f"{old}.{t}"]
    return out


def ldm_unet(unet) -> dict:
    """The tiny UNets' weights in the LDM layout (test_families' converter; SDXL's add_embedding -> label_emb)."""
    out = {}
    layers = unet.config.layers_per_block
    for k, v in fam.diffusers_to_ldm_unet(unet.state_dict(), layers=layers, blocks=2, attn_up={1}).items():
        for i, j in ((1, 0), (2, 2)):
            k = k.replace(f".add_embedding.linear_{i}.", f".label_emb.0.{j}.")
        out[k] = v
    return out


def _swap(w):
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def mmdit(net) -> dict:
    """An ``SD3Transformer2DModel``'s weights in the original MMDiT layout (inverse of diffusers'
    ``convert_sd3_transformer_checkpoint_to_diffusers``: fused qkv, the last block context-pre-only, the final
    and last-context modulations with scale and shift swapped)."""
    sd, n, out = net.state_dict(), net.config.num_layers, {}
    pairs = [("pos_embed", "pos_embed.pos_embed")]
    for t in ("weight", "bias"):
        pairs += [(f"x_embedder.proj.{t}", f"pos_embed.proj.{t}"), (f"context_embedder.{t}", f"context_embedder.{t}"),
                  (f"t_embedder.mlp.0.{t}", f"time_text_embed.timestep_embedder.linear_1.{t}"),
                  (f"t_embedder.mlp.2.{t}", f"time_text_embed.timestep_embedder.linear_2.{t}"),
                  (f"y_embedder.mlp.0.{t}", f"time_text_embed.text_embedder.linear_1.{t}"),
                  (f"y_embedder.mlp.2.{t}", f"time_text_embed.text_embedder.linear_2.{t}"),
                  (f"final_layer.linear.{t}", f"proj_out.{t}")]
        out[f"final_layer.adaLN_modulation.1.{t}"] = _swap(sd[f"norm_out.linear.{t}"])
    for i in range(n):
        a, b, last = f"transformer_blocks.{i}.", f"joint_blocks.{i}.", i == n - 1
        for t in ("weight", "bias"):
            out[b + f"x_block.attn.qkv.{t}"] = torch.cat([sd[a + f"attn.to_{x}.{t}"] for x in "qkv"])
            out[b + f"context_block.attn.qkv.{t}"] = torch.cat([sd[a + f"attn.add_{x}_proj.{t}"] for x in "qkv"])
            ctx = sd[a + f"norm1_context.linear.{t}"]
            out[b + f"context_block.adaLN_modulation.1.{t}"] = _swap(ctx) if last else ctx
            pairs += [(b + f"x_block.attn.proj.{t}", a + f"attn.to_out.0.{t}"),
                      (b + f"x_block.adaLN_modulation.1.{t}", a + f"norm1.linear.{t}"),
                      (b + f"x_block.mlp.fc1.{t}", a + f"ff.net.0.proj.{t}"),
                      (b + f"x_block.mlp.fc2.{t}", a + f"ff.net.2.{t}")]
            if not last:
                pairs += [(b + f"context_block.attn.proj.{t}", a + f"attn.to_add_out.{t}"),
                          (b + f"context_block.mlp.fc1.{t}", a + f"ff_context.net.0.proj.{t}"),
                          (b + f"context_block.mlp.fc2.{t}", a + f"ff_context.net.2.{t}")]
        if a + "attn.norm_q.weight" in sd:
            pairs += [(b + "x_block.attn.ln_q.weight", a + "attn.norm_q.weight"),
                      (b + "x_block.attn.ln_k.weight", a + "attn.norm_k.weight"),
                      (b + "context_block.attn.ln_q.weight", a + "attn.norm_added_q.weight"),
                      (b + "context_block.attn.ln_k.weight", a + "attn.norm_added_k.weight")]
    out.update({new: sd[old] for new, old in pairs})
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def build(family: str, root: Path):
    """``(pipeline saved at root, its single file's tensors, the repo id diffusers infers for that file)``."""
    from diffusers import (EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionXLPipeline)

    if family == "sd1":
        pipe = fam.build_pipeline("sd1", root)
        return pipe, {**ldm_unet(pipe.unet), **hf_clip(pipe.text_encoder, "cond_stage_model.transformer.")}, SD1_REPO
    if family == "sd2":  # diffusers' v2 check: a 1024-wide cross-attention key at input_blocks.2.1 (2 layers)
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            enc = _clip(1024, 2, False, 1)
            unet = fam._unet(cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=(2, 4),
                             layers_per_block=2)
            sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                  clip_sample=False, prediction_type="v_prediction")
            pipe = StableDiffusionPipeline(vae=fam._vae(4), text_encoder=enc, unet=unet, scheduler=sched,
                                           tokenizer=fam._tokenizer(root.parent / f"{root.name}_vocab"),
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(root))
        return pipe, {**ldm_unet(unet), **open_clip(enc, "cond_stage_model.model.")}, SD2_REPO
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = fam._tokenizer(root.parent / f"{root.name}_vocab")
        if family == "sdxl":  # CLIP-L 32 wide, OpenCLIP 48 wide with 10 layers and a 40-wide projection
            enc1, enc2 = _clip(32, 2, False, 1), _clip(48, 10, True, 2, proj_dim=40)
            unet = fam._unet(cross_attention_dim=80, use_linear_projection=True, addition_embed_type="text_time",
                             addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 40)
            sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1)
            pipe = StableDiffusionXLPipeline(vae=fam._vae(4), text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok,
                                             tokenizer_2=tok, unet=unet, scheduler=sched)
            tensors = {**ldm_unet(unet), **hf_clip(enc1, "conditioner.embedders.0.transformer."),
                       **open_clip(enc2, "conditioner.embedders.1.model.")}
            repo = XL_REPO
        else:  # SD3.5-large-shaped: 38 joint blocks with qk norms; CLIP-L (identity projection, as diffusers
            # builds it from an SD3 file) 32 wide, CLIP-G 48 wide; no T5 in the file
            enc1, enc2 = _clip(32, 2, True, 1), _clip(48, 2, True, 2)
            with torch.no_grad():
                enc1.text_projection.weight.copy_(torch.eye(32))
            net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=96,
                                        caption_projection_dim=16, pooled_projection_dim=80, pos_embed_max_size=16,
                                        qk_norm="rms_norm").eval()
            pipe = StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                            vae=fam._vae(16), text_encoder=enc1, tokenizer=tok, text_encoder_2=enc2,
                                            tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
            clip_l = {k: v for k, v in hf_clip(enc1, "text_encoders.clip_l.transformer.").items()
                      if not k.endswith("text_projection.weight")}
            tensors = {**mmdit(net), **clip_l, **hf_clip(enc2, "text_encoders.clip_g.transformer.")}
            repo = SD35L_REPO
    pipe.save_pretrained(str(root))
    return pipe, tensors, repo


class Model:
    def __init__(self, family, root, pipe, ckpt, repo):
        self.family, self.root, self.pipe, self.ckpt, self.repo = family, root, pipe, ckpt, repo


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("single_file")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return d


@pytest.fixture(scope="module")
def models(workdir):
    """``models(family)``: the family's tiny pipeline folder and single file, made once per module."""
    done: dict = {}

    def get(family: str) -> Model:
        if family not in done:
            root = workdir / family
            pipe, tensors, repo = build(family, root)
            ckpt = workdir / f"tiny_{family}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(ckpt))
            done[family] = Model(family, root, pipe, ckpt, repo)
        return done[family]

    return get


@pytest.fixture(params=["sd1", "sd2", "sdxl", "sd3"])
def model(request, models):
    return models(request.param)


# -- each family from its single file alone ----------------------------------------------------------------


def test_the_file_names_its_family_and_the_repo_diffusers_takes_its_configs_from(model):
    sf = inspect_single_file(model.ckpt)
    assert (sf.family, sf.repo) == ({"sd1": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3"}[model.family], model.repo)
    assert sf.prediction is None and not sf.zero_snr  # the repo's scheduler decides


def test_single_file_host_equals_the_pipelines_network_and_conditioning(model, hub):
    """Configs fetched from the loopback Hub under the inferred repo id; the network from the file equals the
    pipeline's tensor for tensor; the text encoders from the file give the pipeline's own ``encode_prompt``
    conditioning (to rounding, 1e-6: same modules, same float32 ops)."""
    from noisecraft.hosts.diffusers import diffusers_host

    serve(hub, model.repo, model.root)
    with single_file_config(model.ckpt) as (sf, folder):
        assert sf.repo == model.repo and not any(folder.rglob("*.safetensors"))  # configs only
        host = diffusers_host(model.ckpt, PROMPTS, config=folder)
    assert any(p.startswith(f"/api/models/{model.repo}/") for p in hub["requests"])
    assert host.base_model == f"tiny_{model.family}"
    ref = (model.pipe.transformer if model.family == "sd3" else model.pipe.unet).state_dict()
    got = host.unet.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    tol = dict(rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        if model.family in ("sd1", "sd2"):
            cond, uncond = model.pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * len(PROMPTS))
        elif model.family == "sdxl":
            cond, uncond, pooled, upooled = model.pipe.encode_prompt(PROMPTS, device="cpu")
            torch.testing.assert_close(host.added["text_embeds"], pooled, **tol)
            torch.testing.assert_close(host.uncond_added["text_embeds"], upooled[:1], **tol)
        else:
            cond, uncond, pooled, upooled = model.pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                                     negative_prompt="")
            assert not cond[:, fam.TOKENS:].any()  # no T5 in the file: zeros, as the pipeline without T5
            torch.testing.assert_close(host.added["pooled_projections"], pooled, **tol)
    torch.testing.assert_close(host.conds, cond, **tol)
    torch.testing.assert_close(host.uncond, uncond[:1], **tol)


def test_cli_trains_from_the_single_file_alone_then_offline_from_the_cache(model, hub, workdir, tmp_path, monkeypatch):
    """``train-refiner --model FILE`` (no --config) trains (rc 0) with the configs from the loopback Hub; with
    HF_HUB_OFFLINE=1 the same command runs from the Hugging Face cache and asks the Hub nothing."""
    from noisecraft.lora import read_refiner_pairs

    serve(hub, model.repo, model.root)
    rc = fam.run_cli(*fam.train_args(model.ckpt, workdir / "prompts.txt", tmp_path / "out"))
    assert rc == 0
    _, meta = read_refiner_pairs(tmp_path / "out" / "refiner.safetensors")
    assert meta["noisecraft.model_kind"] == KINDS[model.family]  # SD2: the repo's v (no ComfyUI probe weight)
    if model.family != "sd1":
        return  # the offline rerun is the same code for every family
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub["requests"].clear()
    rc = fam.run_cli(*fam.train_args(model.ckpt, workdir / "prompts.txt", tmp_path / "out2"))
    assert rc == 0 and (tmp_path / "out2" / "refiner.safetensors").is_file() and hub["requests"] == []


# -- what the file decides beyond the repo: prediction type ----------------------------------------------


def _keys_file(path: Path, tensors: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _sd2(path: Path, probe_std=None, extra=None) -> Path:
    """The tensors diffusers and ComfyUI look at in an SD2.x file: conv_in, a 1024-wide cross-attention key
    (diffusers' v2 check) and, when ``probe_std``, ComfyUI's v-prediction probe with that standard deviation."""
    d = "model.diffusion_model."
    t = {d + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
         d + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024)}
    if probe_std is not None:
        t[d + "output_blocks.11.1.transformer_blocks.0.norm1.bias"] = torch.tensor([-1.0, 1.0] * 4) * probe_std
    return _keys_file(path, {**t, **(extra or {})})


@pytest.mark.parametrize("std,prediction", [(0.2, "v_prediction"), (0.03, "epsilon"), (None, None)])
def test_sd2_prediction_type_follows_comfyuis_rule(tmp_path, std, prediction):
    """SD2.x: v-prediction when output_blocks.11.1...norm1.bias has std > 0.09, else eps (ComfyUI's rule); a
    file without that weight leaves it to the repo's scheduler (diffusers' stable-diffusion-2-1: v)."""
    sf = inspect_single_file(_sd2(tmp_path / "sd2.safetensors", std))
    assert (sf.model_type, sf.family, sf.repo) == ("v2", "sd", "stabilityai/stable-diffusion-2-1")
    assert sf.prediction == prediction


def test_v_pred_and_ztsnr_keys_mean_v_prediction_with_zero_terminal_snr(models, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(models("sdxl").ckpt))
    tensors.update(v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    sf = inspect_single_file(_keys_file(tmp_path / "vpred.safetensors", tensors))
    assert (sf.family, sf.prediction, sf.zero_snr) == ("sdxl", "v_prediction", True)


def test_the_scheduler_the_file_implies_is_a_temporary_copy_of_the_repos(hub, tmp_path):
    """An eps SD2 file under diffusers' v repo: the folder handed out is a copy whose scheduler says epsilon
    (everything else equal), the cached repo is untouched, and the copy is gone after the block."""
    sched = {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "beta_schedule": "scaled_linear"}
    hub["repos"]["stabilityai/stable-diffusion-2-1"] = {
        "unet/config.json": json.dumps({"_class_name": "UNet2DConditionModel", "cross_attention_dim": 1024}).encode(),
        "scheduler/scheduler_config.json": json.dumps(sched).encode(), "tokenizer/vocab.json": b"{}"}
    with single_file_config(_sd2(tmp_path / "sd2.safetensors", 0.03)) as (sf, folder):
        got = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert got == {**sched, "prediction_type": "epsilon"}
        assert (folder / "tokenizer" / "vocab.json").read_bytes() == b"{}"
        cached = [p for p in Path(tmp_path / "hf").rglob("scheduler_config.json")]
        assert cached and all(json.loads(p.read_text())["prediction_type"] == "v_prediction" for p in cached)
    assert not folder.exists()


def test_real_size_sd3_medium_is_named_from_its_shapes(tmp_path):
    d = "model.diffusion_model."
    path = _keys_file(tmp_path / "sd3m.safetensors", {d + "joint_blocks.0.context_block.adaLN_modulation.1.bias":
                                                      torch.zeros(9216), d + "pos_embed": torch.zeros(1, 36864, 1)})
    sf = inspect_single_file(path)
    assert (sf.model_type, sf.family, sf.repo) == ("sd3", "sd3", "stabilityai/stable-diffusion-3-medium-diffusers")


# -- refused: one line, rc 2, before the model loads -------------------------------------------------------


@pytest.mark.parametrize("tensors,words", [
    ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(4)},
     ["'flux-schnell'", "SD1.x", "SDXL", "SD3"]),
    ({"first_stage_model.decoder.conv_in.weight": torch.zeros(4)}, ["no network diffusers recognises", "SD1.x",
                                                                     "--config DIR"]),
    ({"edm_mean": torch.zeros(4), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)},
     ["EDM", "edm_mean", "SDXL"]),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)},  # a 1-D conv_in: diffusers' check fails
     ["could not tell its architecture", "IndexError", "--config DIR"]),
], ids=["flux", "vae-only", "playground", "odd-shape"])
def test_a_file_of_no_known_architecture_is_refused_naming_the_families(hub, workdir, tmp_path, capsys, tensors,
                                                                         words):
    ckpt = _keys_file(tmp_path / "other.safetensors", tensors)
    fam._refused(capsys, fam.train_args(ckpt, workdir / "prompts.txt", tmp_path / "o"), *words)
    assert hub["requests"] == []  # refused from the keys, before asking the Hub


def test_offline_without_cached_configs_is_refused_naming_config(models, hub, workdir, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    serve(hub, SD1_REPO, models("sd1").root)
    fam._refused(capsys, fam.train_args(models("sd1").ckpt, workdir / "prompts.txt", tmp_path / "o"),
                 "HF_HUB_OFFLINE", SD1_REPO, "--config DIR")
    assert hub["requests"] == []


def test_an_unreachable_hub_is_refused_naming_config(models, hub, workdir, tmp_path, capsys, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    err = fam._refused(capsys, fam.train_args(models("sd1").ckpt, workdir / "prompts.txt", tmp_path / "o"),
                       "could not be fetched", SD1_REPO, "--config DIR")
    assert f"127.0.0.1:{port}" in err
    assert not (tmp_path / "o" / "teacher_cache").exists()


def test_a_hub_without_the_repo_is_refused_naming_config(models, hub, workdir, tmp_path, capsys):
    fam._refused(capsys, fam.train_args(models("sd1").ckpt, workdir / "prompts.txt", tmp_path / "o"),
                 "could not be fetched", SD1_REPO, "--config DIR")
    assert any(p.startswith(f"/api/models/{SD1_REPO}/") for p in hub["requests"])


def test_a_gated_repo_is_refused_naming_the_login_and_config(models, hub, workdir, tmp_path, capsys):
    hub["gated"].add(SD1_REPO)
    fam._refused(capsys, fam.train_args(models("sd1").ckpt, workdir / "prompts.txt", tmp_path / "o"),
                 "GatedRepoError", "is gated", "hf auth login", "--config DIR")


def test_an_unreadable_file_is_refused(workdir, tmp_path, capsys):
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"not a safetensors file")
    fam._refused(capsys, fam.train_args(bad, workdir / "prompts.txt", tmp_path / "o"), "single-file", "safetensors")


def test_config_patterns_are_diffusers_own():
    """The files fetched are those diffusers' from_single_file fetches (a cache either fills serves both)."""
    import inspect as _inspect

    from diffusers.loaders import single_file

    src = _inspect.getsource(single_file._download_diffusers_model_config_from_hub)
    assert f"allow_patterns = {CONFIG_PATTERNS!r}".replace("'", '"') in src


def test_config_folder_of_configs_only_takes_the_text_encoders_from_the_file(models, workdir, tmp_path, capsys):
    """``--config DIR`` where DIR holds no weights (what a Hub download of configs gives): the text encoders come
    from the file (the CLI trains, nothing asked of any Hub: HF_HUB_OFFLINE=1); a file without text encoders is
    then refused naming --prompt-embeds."""
    import shutil

    m = models("sd1")
    configs = tmp_path / "configs"
    shutil.copytree(m.root, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    argv = fam.train_args(m.ckpt, workdir / "prompts.txt", tmp_path / "out", "--config", configs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert fam.run_cli(*argv) == 0 and (tmp_path / "out" / "refiner.safetensors").is_file()
        from safetensors.torch import load_file

        unet_only = {k: v for k, v in load_file(str(m.ckpt)).items() if k.startswith("model.diffusion_model.")}
        bare = _keys_file(tmp_path / "unet_only.safetensors", unet_only)
        fam._refused(capsys, fam.train_args(bare, workdir / "prompts.txt", tmp_path / "o", "--config", configs),
                     "no text encoder", "--prompt-embeds")


def test_sd3_t5_in_the_file_is_its_t5(models, hub, tmp_path):
    """An SD3 file with ``text_encoders.t5xxl.*`` (and a repo with text_encoder_3/ + tokenizer_3/ configs): the T5
    part of the conditioning is that T5's, as StableDiffusion3Pipeline.encode_prompt builds it (test_families'
    tolerance for T5: 3e-5, batch-shape rounding)."""
    from diffusers import StableDiffusion3Pipeline

    from noisecraft.hosts.diffusers import diffusers_host

    base = models("sd3")
    from transformers import T5Config, T5EncoderModel

    _, tok3 = fam._t5(tmp_path)  # its character tokenizer; a T5 as wide as this transformer's joint_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        enc3 = T5EncoderModel(T5Config(vocab_size=32, d_model=96, d_kv=8, d_ff=37, num_layers=2, num_heads=2)).eval()
    parts = {k: getattr(base.pipe, k) for k in ("transformer", "scheduler", "vae", "text_encoder", "tokenizer",
                                                "text_encoder_2", "tokenizer_2")}
    pipe = StableDiffusion3Pipeline(**parts, text_encoder_3=enc3, tokenizer_3=tok3)
    pipe.save_pretrained(str(tmp_path / "sd3_t5"))
    serve(hub, SD35L_REPO, tmp_path / "sd3_t5")
    from safetensors.torch import load_file

    tensors = {**load_file(str(base.ckpt)),
               **{"text_encoders.t5xxl.transformer." + k: v.clone() for k, v in enc3.state_dict().items()}}
    ckpt = _keys_file(tmp_path / "sd3_t5.safetensors", tensors)
    with single_file_config(ckpt) as (_, folder):
        assert (folder / "text_encoder_3" / "config.json").is_file() and not any(folder.rglob("*.safetensors"))
        host = diffusers_host(ckpt, PROMPTS, config=folder)
    with torch.no_grad():
        cond, uncond, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt="")
    assert cond[:, fam.TOKENS:].abs().max() > 0
    tol = dict(rtol=1e-6, atol=3e-5)
    torch.testing.assert_close(host.conds, cond, **tol)
    torch.testing.assert_close(host.uncond, uncond[:1], **tol)
    torch.testing.assert_close(host.added["pooled_projections"], pooled, **tol)


def test_a_network_only_single_file_has_no_vae_to_decode_with(models, hub):
    """The teacher filter and validation decode with the VAE inside ``--model FILE``; a file without VAE keys (as
    these test files are) gives no decoder (the scorer gets the latents, logged), never a randomly initialised VAE."""
    from noisecraft.train.teacher_filter import diffusers_vae_decoder

    m = models("sd1")
    assert diffusers_vae_decoder(m.ckpt) is None
    assert diffusers_vae_decoder(m.root) is not None  # the diffusers folder's vae/
