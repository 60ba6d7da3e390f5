"""The diffusers host: ``DiffusersDenoiser`` over a UNet, and sigma tables from schedulers.

Tier 1 (torch + diffusers, CPU, no ComfyUI). Parameterization is checked two ways: an oracle
network that knows the true x0 (so every kind must recover it exactly), and the raw algebra on
a random network output. The toy model is then sampled with ``ode.sample`` and compared with
diffusers' own ``DDIMScheduler`` (eta 0). The refiner LoRA goes on through peft (``add_adapter``):
on an SD3-class transformer too, and on a bf16 UNet with float32 LoRA weights.
"""

import math

import pytest
import torch
from torch import nn

from noisecraft import ode
from noisecraft.hosts.diffusers import (
    DiffusersDenoiser,
    alphas_cumprod_from_config,
    sigma_table_from_scheduler,
)
from noisecraft.sigmas import ModelKind, SigmaTable, noise_to_x, scaled_linear_alphas_cumprod

SHAPE = (2, 4, 4)
TOKENS, WIDTH = 3, 5


def _table(kind):
    kind = ModelKind.parse(kind)
    return SigmaTable.flow(3.0) if kind.is_flow else SigmaTable.scaled_linear(kind)


def _cond(n=1, seed=0, tokens=TOKENS):
    return torch.randn((n, tokens, WIDTH), generator=torch.Generator().manual_seed(seed))


class Oracle(nn.Module):
    """Knows the clean x0 ([B, ...], or one shared sample) and answers what a perfect network of
    ``table.kind`` would: the timestep is mapped back to sigma and the network input unscaled, so
    the adapter must get both the input scaling and the timestep right to recover x0."""

    def __init__(self, table: SigmaTable, x0: torch.Tensor):
        super().__init__()
        self.table = table
        self.register_buffer("x0", x0)
        self.calls = []

    def forward(self, xin, t, encoder_hidden_states=None, return_dict=True):
        self.calls.append((xin.shape[0], t.detach().clone(), encoder_hidden_states))
        b = xin.shape[0]
        x0 = self.x0.expand(b, *self.x0.shape[1:]) if self.x0.shape[0] == 1 else self.x0.repeat(b // self.x0.shape[0], 1, 1, 1)
        if self.table.kind.is_flow:
            s = (t / self.table.multiplier).view(b, 1, 1, 1)
            e = (xin - (1 - s) * x0) / s
            out = e - x0
        else:
            s = self.table.sigmas[t.long()].view(b, 1, 1, 1)
            x = xin * torch.sqrt(1 + s * s)
            e = (x - x0) / s
            if self.table.kind is ModelKind.EPS:
                out = e
            else:  # v = alpha * eps - sigma_vp * x0, alpha = 1/sqrt(1+s^2), sigma_vp = s/sqrt(1+s^2)
                out = (e - s * x0) / torch.sqrt(1 + s * s)
        return (out,)


class Recorder(nn.Module):
    """Returns a fixed output and records what it was called with."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.calls = []

    def forward(self, xin, t, encoder_hidden_states=None, return_dict=True):
        self.calls.append({"xin": xin.detach().clone(), "t": t.detach().clone(), "ehs": encoder_hidden_states})
        return (self.out.expand_as(xin).to(xin.dtype),)


class CondNet(nn.Module):
    """A small differentiable network whose output depends on x, t and the condition tokens."""

    def __init__(self, channels=SHAPE[0], width=WIDTH, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = nn.Linear(width, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.batches = []

    def forward(self, xin, t, encoder_hidden_states=None, return_dict=True):
        self.batches.append(xin.shape[0])
        c = self.proj(encoder_hidden_states.mean(1))[:, :, None, None]
        return (torch.tanh(self.conv(xin)) + c * torch.cos(t.to(xin.dtype) / 300.0)[:, None, None, None],)


# -- parameterization ------------------------------------------------------------------------


def _on_table_sigmas(table, b, seed=0):
    """b sigmas that sit exactly on table entries (eps/v) or anywhere in (0, 1) (flow)."""
    g = torch.Generator().manual_seed(seed)
    if table.kind.is_flow:
        return torch.rand(b, generator=g) * 0.9 + 0.05
    return table.sigmas[torch.randint(1, len(table.sigmas), (b,), generator=g)]


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_oracle_network_recovers_x0(kind):
    table = _table(kind)
    g = torch.Generator().manual_seed(1)
    b = 6
    x0 = torch.randn((b, *SHAPE), generator=g)
    e = torch.randn((b, *SHAPE), generator=g)
    sig = _on_table_sigmas(table, b)
    s = sig.view(b, 1, 1, 1)
    x = (1 - s) * x0 + s * e if table.kind.is_flow else x0 + s * e
    D = DiffusersDenoiser(Oracle(table, x0), table, _cond())
    out = D(x, sig)
    assert out.shape == x.shape and out.dtype == x.dtype
    rel = float((out - x0).abs().max() / x0.abs().max())
    assert rel < 1e-4, rel


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_network_input_timestep_and_x0_algebra(kind):
    table = _table(kind)
    g = torch.Generator().manual_seed(2)
    b = 5
    x = torch.randn((b, *SHAPE), generator=g) * 3
    out = torch.randn((b, *SHAPE), generator=g)
    # off-table sigmas too: the timestep must be the nearest table entry in log-sigma
    sig = torch.rand(b, generator=g) * (0.9 if table.kind.is_flow else 10.0) + 0.05
    net = Recorder(out)
    x0 = DiffusersDenoiser(net, table, _cond())(x, sig)
    (call,) = net.calls
    s = sig.view(b, 1, 1, 1)
    if kind == "flow":
        torch.testing.assert_close(call["xin"], x)
        torch.testing.assert_close(call["t"], sig * 1000.0)
        want = x - s * out
    else:
        torch.testing.assert_close(call["xin"], x / torch.sqrt(1 + s * s))
        nearest = (sig.log()[None, :] - table.sigmas.log()[:, None]).abs().argmin(0).float()
        torch.testing.assert_close(call["t"], nearest)
        torch.testing.assert_close(call["t"], table.timestep(sig))
        assert torch.equal(call["t"], call["t"].round())  # discrete, like ComfyUI
        want = x - s * out if kind == "eps" else x / (s * s + 1) - out * s / torch.sqrt(s * s + 1)
    torch.testing.assert_close(x0, want, rtol=1e-5, atol=1e-5)


def test_scalar_sigma_broadcasts_and_wrong_length_raises():
    table = _table("eps")
    x = torch.randn((3, *SHAPE))
    net = Recorder(torch.zeros(1, *SHAPE))
    D = DiffusersDenoiser(net, table, _cond())
    torch.testing.assert_close(D(x, 2.0), D(x, torch.full((3,), 2.0)))
    with pytest.raises(ValueError, match="one value per sample"):
        D(x, torch.ones(2))


# -- classifier-free guidance and condition batching ---------------------------------------


def test_cfg_is_one_batched_pass_and_matches_two_unguided_calls():
    table = _table("eps")
    g = torch.Generator().manual_seed(3)
    b, cfg = 3, 4.5
    x = torch.randn((b, *SHAPE), generator=g) * 2
    sig = _on_table_sigmas(table, b, seed=3)
    cond, uncond = _cond(b, seed=4), _cond(1, seed=5)
    net = CondNet()
    guided = DiffusersDenoiser(net, table, cond, uncond, cfg=cfg)
    with torch.no_grad():
        y = guided(x, sig)
    assert net.batches == [2 * b]  # one forward of 2B
    assert guided.passes == 2
    net.batches.clear()
    with torch.no_grad():
        c = DiffusersDenoiser(net, table, cond)(x, sig)
        u = DiffusersDenoiser(net, table, uncond)(x, sig)
    assert net.batches == [b, b]
    torch.testing.assert_close(y, u + cfg * (c - u), rtol=1e-5, atol=1e-5)


def test_cfg_batch_order_is_cond_then_uncond():
    table = _table("eps")
    net = Recorder(torch.zeros(1, *SHAPE))
    cond, uncond = _cond(2, seed=6), _cond(2, seed=7)
    D = DiffusersDenoiser(net, table, cond, uncond, cfg=2.0)
    D(torch.randn((2, *SHAPE)), torch.full((2,), 1.0))
    (call,) = net.calls
    torch.testing.assert_close(call["ehs"], torch.cat([cond, uncond]))
    assert call["t"].shape == (4,)
    torch.testing.assert_close(call["xin"][:2], call["xin"][2:])


def test_cfg_with_different_token_counts_runs_two_passes():
    table = _table("v")
    g = torch.Generator().manual_seed(8)
    x = torch.randn((2, *SHAPE), generator=g)
    sig = _on_table_sigmas(table, 2, seed=8)
    cond, uncond = _cond(1, seed=9, tokens=3), _cond(1, seed=10, tokens=7)
    net = CondNet()
    with torch.no_grad():
        y = DiffusersDenoiser(net, table, cond, uncond, cfg=3.0)(x, sig)
        c = DiffusersDenoiser(net, table, cond)(x, sig)
        u = DiffusersDenoiser(net, table, uncond)(x, sig)
    assert net.batches[:2] == [2, 2]
    torch.testing.assert_close(y, u + 3.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_passes_count_per_call():
    table = _table("eps")
    net = Recorder(torch.zeros(1, *SHAPE))
    D = DiffusersDenoiser(net, table, _cond(), _cond(seed=1), cfg=1.0)
    x, sig = torch.randn((4, *SHAPE)), torch.ones(4)
    D(x, sig)
    D(x, sig)
    assert D.passes == 2 and not D.guided  # batch size does not count
    D.cfg = 2.0
    D(x, sig)
    assert D.passes == 4 and D.guided
    D.reset_passes()
    assert D.passes == 0


def test_cfg_without_uncond_raises():
    table = _table("eps")
    net = Recorder(torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="uncond"):
        DiffusersDenoiser(net, table, _cond(), cfg=2.0)
    D = DiffusersDenoiser(net, table, _cond())
    with pytest.raises(ValueError, match="uncond"):
        D.cfg = 3.0
    with pytest.raises(ValueError, match="finite"):
        DiffusersDenoiser(net, table, _cond(), _cond(), cfg=float("nan"))


def test_bad_cond_shapes_and_table_type_raise():
    net = Recorder(torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="cond"):
        DiffusersDenoiser(net, _table("eps"), torch.zeros(2, WIDTH))
    with pytest.raises(ValueError, match="uncond"):
        DiffusersDenoiser(net, _table("eps"), _cond(), torch.zeros(2, WIDTH), cfg=2.0)
    with pytest.raises(TypeError, match="SigmaTable"):
        DiffusersDenoiser(net, torch.ones(1000), _cond())


def test_cond_of_batch_one_broadcasts():
    table = _table("eps")
    net = Recorder(torch.zeros(1, *SHAPE))
    cond = _cond(1)
    DiffusersDenoiser(net, table, cond)(torch.randn((4, *SHAPE)), torch.ones(4))
    ehs = net.calls[0]["ehs"]
    assert ehs.shape == (4, TOKENS, WIDTH)
    for j in range(4):
        torch.testing.assert_close(ehs[j], cond[0])


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_cond_of_batch_n_tiles_candidate_major(cfg):
    table = _table("eps")
    net = Recorder(torch.zeros(1, *SHAPE))
    n, m = 2, 3
    cond, uncond = _cond(n, seed=11), _cond(n, seed=12)
    D = DiffusersDenoiser(net, table, cond, uncond, cfg=cfg)
    D(torch.randn((m * n, *SHAPE)), torch.ones(m * n))
    ehs = net.calls[0]["ehs"]
    assert ehs.shape[0] == (m * n if cfg == 1.0 else 2 * m * n)
    for j in range(m):
        for i in range(n):
            torch.testing.assert_close(ehs[j * n + i], cond[i])  # sample j*n+i gets condition i
            if cfg != 1.0:
                torch.testing.assert_close(ehs[m * n + j * n + i], uncond[i])


@pytest.mark.parametrize("n_cond,b", [(2, 3), (4, 2), (3, 4)])
def test_cond_batch_mismatch_raises(n_cond, b):
    net = Recorder(torch.zeros(1, *SHAPE))
    D = DiffusersDenoiser(net, _table("eps"), _cond(n_cond))
    with pytest.raises(ValueError, match="batch"):
        D(torch.randn((b, *SHAPE)), torch.ones(b))


def test_uncond_batch_mismatch_raises():
    net = Recorder(torch.zeros(1, *SHAPE))
    D = DiffusersDenoiser(net, _table("eps"), _cond(1), _cond(2), cfg=2.0)
    with pytest.raises(ValueError, match="uncond"):
        D(torch.randn((3, *SHAPE)), torch.ones(3))


# -- dtype and gradients ---------------------------------------------------------------------


def test_bf16_unet_returns_x_dtype_and_stays_close():
    table = _table("eps")
    g = torch.Generator().manual_seed(13)
    x = torch.randn((3, *SHAPE), generator=g) * 3
    sig = _on_table_sigmas(table, 3, seed=13)
    net32 = CondNet()
    net16 = CondNet().to(torch.bfloat16)
    cond, uncond = _cond(1), _cond(1, seed=1)
    with torch.no_grad():
        ref = DiffusersDenoiser(net32, table, cond, uncond, cfg=2.0)(x, sig)
        y = DiffusersDenoiser(net16, table, cond, uncond, cfg=2.0)(x, sig)
        y64 = DiffusersDenoiser(net16, table, cond, uncond, cfg=2.0)(x.double(), sig)
    assert y.dtype == torch.float32 and y64.dtype == torch.float64
    assert float((y - ref).abs().max()) < 0.1 * (1 + float(ref.abs().max()))


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_gradients_flow_to_x(cfg):
    table = _table("eps")
    net = CondNet().requires_grad_(False)
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(14)).requires_grad_(True)
    D = DiffusersDenoiser(net, table, _cond(), _cond(seed=1) if cfg != 1.0 else None, cfg=cfg)
    D(x, torch.full((2,), 1.5)).square().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0


def test_gradients_flow_to_x_through_bf16_unet():
    table = _table("eps")
    net = CondNet().to(torch.bfloat16).requires_grad_(False)
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(15)).requires_grad_(True)
    y = DiffusersDenoiser(net, table, _cond())(x, torch.full((2,), 1.5))
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and float(x.grad.abs().sum()) > 0


# -- sampling the toy model against diffusers' DDIMScheduler -------------------------------


@pytest.fixture(scope="module")
def toy():
    from noisecraft.hosts.toy import load_toy

    return load_toy()


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_ode_sample_matches_diffusers_ddim(toy, cfg):
    """Euler in sigma space is DDIM (eta 0) when the schedule sits on table entries.

    DDIM "trailing" with 20 steps visits integer timesteps 999, 949, ..., 49 and steps each to
    t - 50; the last step goes to t < 0, i.e. alphas_cumprod 1 (``set_alpha_to_one``), which is
    sigma = 0 (the denoised estimate). The sigma schedule is ``table.sigmas`` at the same integer
    timesteps, then 0. (ComfyUI's own "normal" schedule lands on fractional timesteps
    linspace(999, 0, n), which the discrete timestep rounds, so it is not exactly DDIM.)
    DDIM starts from unit noise in VP space; sigma space starts from e * sqrt(1 + sigma_max^2).
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )
    sched.set_timesteps(20)
    ts = sched.timesteps.clone()
    assert ts[0] == 999 and ts[-1] == 49 and len(ts) == 20

    labels = torch.tensor([0, 3, 7, 9])
    e = toy.noise(4, torch.Generator().manual_seed(21))
    cond = toy.cond(labels)
    uncond = toy.uncond(1).expand_as(cond)

    sigmas = torch.cat([toy.table.sigmas[ts.long()], torch.zeros(1)])
    D = toy.denoiser(labels, cfg=cfg)
    with torch.no_grad():
        ours = ode.sample(D, noise_to_x(e, "eps", float(sigmas[0])), sigmas)
        x = e.clone()
        for t in ts:
            if cfg == 1.0:
                eps = toy.unet(x, t, encoder_hidden_states=cond).sample
            else:
                both = toy.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
                eps_c, eps_u = both.chunk(2)
                eps = eps_u + cfg * (eps_c - eps_u)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    assert D.passes == (20 if cfg == 1.0 else 40)
    err = float((ours - x).abs().max())
    assert err < 1e-5, err  # float32 round-off through 20 steps (about 2e-6); values are O(1)
    assert float(x.abs().max()) > 0.5  # a real sample, not a degenerate zero


# -- sigma tables from schedulers ------------------------------------------------------------


def test_sigma_table_from_ddim_scaled_linear():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ref = SigmaTable.scaled_linear()
    # the config alone is rebuilt in float64, like ComfyUI: the same float32 table
    table = sigma_table_from_scheduler(dict(sched.config))
    assert table.kind is ModelKind.EPS
    torch.testing.assert_close(table.sigmas, ref.sigmas, rtol=1e-6, atol=0)
    # the object's own alphas_cumprod buffer is float32: 1 - ac loses digits near t = 0
    table = sigma_table_from_scheduler(sched)
    assert table.kind is ModelKind.EPS
    torch.testing.assert_close(table.sigmas, ref.sigmas, rtol=3e-5, atol=0)
    sig = torch.cat([ref.sigmas[::37], ref.sigmas[-1:]])
    assert torch.equal(table.timestep(sig), ref.timestep(sig))  # same discrete timesteps
    ac = alphas_cumprod_from_config(sched.config)
    torch.testing.assert_close(ac, scaled_linear_alphas_cumprod(), rtol=1e-12, atol=0)


def test_sigma_table_from_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    table = sigma_table_from_scheduler(sched)
    ref = SigmaTable.flow(3.0)
    assert table.kind is ModelKind.FLOW
    assert table.multiplier == 1000.0 and table.shift == 3.0
    torch.testing.assert_close(table.sigmas, ref.sigmas, rtol=1e-6, atol=0)
    # diffusers' own training sigmas (shifted linspace 1..1/1000, no terminal 0) are the same
    # table, descending
    torch.testing.assert_close(sched.sigmas.flip(0).float(), ref.sigmas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sched.timesteps.flip(0).float(), ref.sigmas * 1000.0, rtol=1e-5, atol=1e-4)


def test_sigma_table_kinds_from_config():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    v = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    assert sigma_table_from_scheduler(v).kind is ModelKind.V
    assert sigma_table_from_scheduler(dict(v.config)).kind is ModelKind.V
    eul = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert sigma_table_from_scheduler(eul).kind is ModelKind.EPS
    assert sigma_table_from_scheduler(eul, kind="v").kind is ModelKind.V  # explicit override
    with pytest.raises(ValueError, match="prediction_type"):
        sigma_table_from_scheduler({"prediction_type": "sample"})
    with pytest.raises(TypeError):
        sigma_table_from_scheduler(42)


def test_sigma_table_linear_and_zero_snr():
    from diffusers import DDPMScheduler

    lin = DDPMScheduler(beta_schedule="linear")
    torch.testing.assert_close(
        sigma_table_from_scheduler(dict(lin.config)).sigmas,
        sigma_table_from_scheduler(lin).sigmas,
        rtol=1e-4,  # the object's alphas_cumprod buffer is float32
        atol=0,
    )
    z = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    for src in (z, dict(z.config)):
        table = sigma_table_from_scheduler(src)
        assert math.isfinite(table.sigma_max) and table.sigma_max > 1000  # floored, not inf
    cos = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(
        alphas_cumprod_from_config(cos.config), cos.alphas_cumprod.double(), rtol=1e-5, atol=1e-7
    )


# -- the refiner LoRA through peft ----------------------------------------------------------------

def _randomize_up(lora, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * scale)


def test_refiner_lora_on_an_sd3_transformer_through_peft():
    """diffusers' PeftAdapterMixin serves SD3Transformer2DModel as it serves UNets: the default targets
    are its attention and feed-forward layers; zero init and the disabled flag are the base bit for bit;
    the adapter equals ComfyUI's merged weight W + alpha / rank * up @ down. Tolerance: merged and
    adapted differ only by float32 rounding of W x + s B (A x) against (W + s B A) x, a few ulps of the
    activations (|out| ~ 1) per layer through one block: 1e-5 absolute is ~100 ulps."""
    from diffusers import SD3Transformer2DModel

    from noisecraft.hosts.adapters import attach_lora

    config = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                  pos_embed_max_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SD3Transformer2DModel(**config).eval()
    g = torch.Generator().manual_seed(0)
    x, c, p = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)

    def run():
        with torch.no_grad():
            return model(hidden_states=x, encoder_hidden_states=c, pooled_projections=p,
                         timestep=torch.tensor([500.0, 20.0]), return_dict=False)[0]

    base = run()
    own = list(model.parameters())
    lora = attach_lora(model, rank=2, alpha=4.0, seed=1)
    assert all(p.requires_grad for p in own)  # the model's own flags are kept (peft would freeze them)
    ends = {n.split("attn.")[-1].split("ff.")[-1] for n in lora.module_names.values()}
    assert ends == {"to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"}
    assert "noisecraft_refiner" in model.peft_config
    assert torch.equal(run(), base)
    _randomize_up(lora, seed=2)
    adapted = run()
    assert float((adapted - base).abs().max()) > 1e-3
    with lora.disabled():
        assert torch.equal(run(), base)
    state = lora.export_state_dict()
    lora.remove()
    assert not hasattr(model, "peft_config") and torch.equal(run(), base)
    with torch.no_grad():
        for key, name in lora.module_names.items():
            w = model.get_submodule(name).weight
            down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
            w += float(state[f"{key}.alpha"]) / down.shape[0] * (up @ down)
    torch.testing.assert_close(run(), adapted, rtol=0, atol=1e-5)


def test_refiner_lora_on_a_bf16_unet_keeps_float32_weights():
    """The LoRA weights stay float32 on a bf16 UNet (its input is cast up, its output back to bf16), and
    at zero init the bf16 output is the base output bit for bit (bf16 -> float32 -> bf16 is exact)."""
    from noisecraft.hosts import toy
    from noisecraft.hosts.adapters import attach_lora

    model = toy.load_toy()
    unet = model.unet.to(torch.bfloat16)
    x = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    c = model.cond(torch.arange(2)).to(torch.bfloat16)

    def run():
        with torch.no_grad():
            return unet(x, torch.tensor([999.0, 500.0]), encoder_hidden_states=c, return_dict=False)[0]

    base = run()
    lora = attach_lora(unet, rank=2)
    assert {p.dtype for p in lora.parameters()} == {torch.float32}
    out = run()
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)
    _randomize_up(lora, seed=4)
    assert not torch.equal(run(), base)
    lora.remove()
