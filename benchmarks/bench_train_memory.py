"""Benchmark: memory and time of one MSD refiner step at SD1.5 / SDXL size, and teacher-cache throughput.

Run: ``python benchmarks/bench_train_memory.py`` (CPU, a few minutes: byte accounting of the full-size
architectures without materialising them, step time at a reduced size, cache throughput on the toy
model); ``--device cuda`` builds the random-weight UNets on the GPU and measures step time and
``torch.cuda.max_memory_allocated`` for real. ``--quick``: one rank and batch (a smoke run).

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), App. D: rank-128
LoRA on SD2.1, rank 256 on SDXL, N = 10 student steps, N' = 20 teacher steps. Target (issue 11): an
SDXL refiner trains at batch >= 2 within 24 GB.

What one MSD step holds (:func:`noisecraft.train.refiner.msd_step_loss`, the trainer's own code):

* parameters: the frozen UNet (counted on the meta device: fp32, or bf16 with ``--dtype bf16`` where the
  frozen weights are stored in bf16) and the LoRA (fp32 always) with its fp32 gradient;
* optimizer state: AdamW's two fp32 moments per LoRA weight (no fp32 master copy: the LoRA is fp32);
* saved activations: what autograd keeps from the LoRA pass for backward (the only pass with a graph;
  the N student steps run without one), counted by running the refiner pass under torch's
  ``FakeTensorMode`` (no memory, real shapes and dtypes; CPU kernels, so attention is SDPA's flash
  kernel, which saves q, k, v, out and the log-sum-exp like CUDA's) with ``saved_tensors_hooks`` summing
  every distinct storage that is not a weight. With gradient checkpointing: the block inputs the
  checkpoints keep plus the largest block's recompute (the peak inside backward).
* not counted in the estimate: the transient activations of the no-grad passes (the base pass and the
  student steps free them layer by layer) and the allocator's slack; the CUDA peak includes both.

bf16 means: frozen UNet weights stored in bf16 and the step under ``torch.autocast(bfloat16)``; the LoRA
weights, their gradients and AdamW state are fp32 (autocast casts the LoRA weights per op), the student
chain and the loss are fp32 (:func:`noisecraft.msd.msd_loss`).

:func:`msd_step_figures` is the function ``benchmarks/gpu_report.py`` imports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fastest  # noqa: E402

from noisecraft.hosts.adapters import attach_lora  # noqa: E402
from noisecraft.hosts.diffusers import DiffusersDenoiser  # noqa: E402
from noisecraft.sigmas import ModelKind, SigmaTable, get_sigmas, start_factor  # noqa: E402
from noisecraft.train.loop import LoopConfig, make_adamw  # noqa: E402
from noisecraft.train.refiner import lora_residual, msd_step_loss  # noqa: E402

_SD15 = dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are the SD1.x UNet (860M)
_SDXL = dict(
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)  # the SDXL base UNet (2.6B)
_TINY = dict(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
    attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
# name -> (UNet config, latent side, (tokens, text width), SDXL pooled width or None)
ARCHS = {
    "sd15": (_SD15, 64, (77, 768), None),
    "sdxl": (_SDXL, 128, (77, 2048), 1280),
    "tiny": (_TINY, 16, (7, 32), None),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KIND = ModelKind.EPS


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, weights excluded (``skip``: storage ids of
    the parameters): the count of a :func:`saved_bytes` block. Works on real and fake tensors."""

    def __init__(self, skip=frozenset()):
        self.bytes, self._seen, self._skip = 0, set(), skip

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        key = st._cdata
        if key not in self._seen and key not in self._skip:
            self._seen.add(key)
            self.bytes += st.nbytes()
        return t


@contextlib.contextmanager
def saved_bytes(skip=frozenset()):
    """``with saved_bytes(skip) as counter:``: counts what autograd saves inside the block (``counter.bytes``)."""
    counter = SavedBytes(skip)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        yield counter


class MeasuringCheckpoint:
    """A ``checkpoint`` for :func:`lora_residual` that also records the bytes one block saves when it is
    recomputed in backward (by running it once more with a graph, result dropped); the largest is the
    peak that checkpointing adds to the block inputs."""

    def __init__(self, skip=frozenset()):
        self.largest, self._skip = 0, skip

    def __call__(self, fn, *args):
        from torch.utils.checkpoint import checkpoint

        with saved_bytes(self._skip) as seg:
            fn(*args)
        self.largest = max(self.largest, seg.bytes)
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def build_unet(arch: str, device, dtype: torch.dtype):
    """The architecture with diffusers' random init (on ``device``; "meta" allocates nothing), frozen."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]), torch.device(device):  # the init draws from the global RNG
        unet = UNet2DConditionModel(**ARCHS[arch][0])
    return (unet if dtype == torch.float32 else unet.to(dtype=dtype)).requires_grad_(False)


def step_inputs(arch: str, batch: int, latent: int, device, generator: torch.Generator):
    """Random noise, teacher x0 and conditioning of the right shapes for ``arch``."""
    _, _, (tokens, width), pooled = ARCHS[arch]

    def rnd(*shape):
        return torch.randn(shape, generator=generator).to(device)

    e, x0, cond = rnd(batch, 4, latent, latent), rnd(batch, 4, latent, latent), rnd(batch, tokens, width)
    px = float(latent * 8)
    added = None if pooled is None else {
        "text_embeds": rnd(batch, pooled),
        "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]] * batch, device=device)}
    return e, x0, cond, added


def _fake_module(module: torch.nn.Module, mode) -> None:
    """Replace every meta parameter and buffer of ``module`` by a fake CPU tensor of ``mode``."""
    from torch._subclasses.fake_tensor import FakeTensor

    cpu = torch.device("cpu")
    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[k] = torch.nn.Parameter(FakeTensor(mode, p, cpu), requires_grad=p.requires_grad)
        for k, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[k] = FakeTensor(mode, b, cpu)


def _autocast(device_type: str, dtype: str):
    return torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


class _LoRAPassOnly:
    """The student denoiser for the accounting: the base pass keeps no graph (no trainable weight is on)
    and saves nothing, so it is skipped (zeros) to halve the fake forward time."""

    def __init__(self, student, lora):
        self.student, self.lora, self.unet = student, lora, student.unet

    def __call__(self, x, sigma):
        return self.student(x, sigma) if self.lora.enabled else torch.zeros_like(x)


class FakeStep:
    """One architecture + LoRA on the meta device turned into fake tensors: parameter counts and the
    saved-activation bytes of the refiner pass for any batch, dtype mode and checkpointing.
    ``fake=False`` builds it for real on the CPU instead (the tests compare the two on the tiny config)."""

    def __init__(self, arch: str, rank: int, dtype: str, student_steps: int = 10, fake: bool = True):
        from torch._subclasses.fake_tensor import FakeTensorMode

        if not fake and arch != "tiny":
            raise ValueError(f"only the tiny config is built for real on the CPU, not {arch!r}")
        self.arch, self.rank, self.dtype = arch, rank, dtype
        unet = build_unet(arch, "meta" if fake else "cpu", DTYPES[dtype])
        self.base_params = sum(p.numel() for p in unet.parameters())
        self.base_param_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
        self.lora = attach_lora(unet, rank)
        self.lora_params = sum(p.numel() for p in self.lora.parameters())
        self.mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
        if fake:
            _fake_module(unet, self.mode)
        self.unet = unet
        self.skip = frozenset(p.untyped_storage()._cdata for p in unet.parameters())
        self.table = SigmaTable.scaled_linear(KIND)
        self.sigma_max = float(get_sigmas(self.table, "normal", student_steps)[0])

    def saved_bytes(self, batch: int, gradient_checkpointing: bool, latent: int | None = None,
                    backward: bool = False) -> int:
        """Saved-activation bytes of the refiner pass at ``batch`` (``backward``: also run the backward,
        with the recompute, to prove the graph is whole)."""
        latent = latent or ARCHS[self.arch][1]
        with self.mode, torch.enable_grad():
            e, x0, cond, added = step_inputs(self.arch, batch, latent, "cpu", torch.Generator().manual_seed(0))
            student = _LoRAPassOnly(DiffusersDenoiser(self.unet, self.table, cond, added_cond_kwargs=added), self.lora)
            ckpt = MeasuringCheckpoint(self.skip)
            residual = lora_residual(self.lora, student, KIND, self.sigma_max,
                                     gradient_checkpointing=gradient_checkpointing, checkpoint=ckpt)
            with saved_bytes(self.skip) as saved, _autocast("cpu", self.dtype):
                e_hat = e + residual(e)  # refine_with's arithmetic without its value checks
                delta = torch.zeros_like(x0)  # the student chain's constant offset (no graph)
                loss = torch.nn.functional.mse_loss(e_hat.float() * start_factor(KIND, self.sigma_max) + delta, x0)
            if backward:  # proves the graph (and the recompute) runs; costs nothing real
                loss.backward()
                self.lora.zero_grad(set_to_none=True)
        return saved.bytes + ckpt.largest


def saved_by_batch(fake: FakeStep, batches, gradient_checkpointing: bool, exact: bool = False) -> dict:
    """``{batch: (saved bytes, extrapolated)}``: counted at batch 1 and 2, the others (unless ``exact``)
    extrapolated affinely (every saved tensor has the batch as a factor or does not depend on it: the
    tests check the extrapolation against the count)."""
    out = {}
    for b in sorted(set(batches) | ({1, 2} if not exact else set())):
        if exact or b <= 2:
            out[b] = (fake.saved_bytes(b, gradient_checkpointing), False)
        else:
            one, two = out[1][0], out[2][0]
            out[b] = (two + (b - 2) * (two - one), True)
    return {b: out[b] for b in batches}


def _figures(arch, rank, batch, device, dtype, gradient_checkpointing, student_steps, latent, fake: FakeStep,
             saved=None):
    lora_bytes = fake.lora_params * 4
    out = dict(arch=arch, rank=rank, batch=batch, device=str(device), dtype=dtype,
               gradient_checkpointing=gradient_checkpointing, student_steps=student_steps,
               latent=latent or ARCHS[arch][1], base_params=fake.base_params, base_param_bytes=fake.base_param_bytes,
               lora_params=fake.lora_params, lora_param_bytes=lora_bytes, grad_bytes=lora_bytes,
               optimizer_bytes=2 * lora_bytes,
               optimizer="fused" if torch.device(device).type == "cuda" else "default",
               saved_activation_bytes=fake.saved_bytes(batch, gradient_checkpointing, latent) if saved is None
               else int(saved),
               peak_bytes=None, step_s=None, oom=None)
    out["estimate_bytes"] = (out["base_param_bytes"] + lora_bytes * 2 + out["optimizer_bytes"]
                             + out["saved_activation_bytes"])
    return out


def measure_step(arch: str, rank: int, batch: int, device, dtype: str, gradient_checkpointing: bool,
                 student_steps: int = 10, repeat: int = 3, latent: int | None = None) -> dict:
    """Build the architecture for real on ``device`` and time full MSD steps (forward, N student steps,
    backward, AdamW): ``{"step_s": fastest, "peak_bytes": CUDA peak or None, "oom": bool, "optimizer": ...}``
    (out of memory in the warm-up step: ``oom`` True, time and peak None)."""
    device = torch.device(device)
    latent = latent or ARCHS[arch][1]
    unet = build_unet(arch, device, DTYPES[dtype])
    lora = attach_lora(unet, rank)
    try:
        with torch.no_grad():  # a non-zero LoRA, as after some training (up = 0 would be a special case)
            for pair in lora.layers.values():
                pair.lora_up.weight.fill_(1e-4)
        params = [p for p in lora.parameters() if p.requires_grad]
        opt, flags = make_adamw(params, LoopConfig(lr=1e-5), device)
        g = torch.Generator().manual_seed(0)
        e, x0, cond, added = step_inputs(arch, batch, latent, device, g)
        table = SigmaTable.scaled_linear(KIND)
        student = DiffusersDenoiser(unet, table, cond, added_cond_kwargs=added)
        sigmas = get_sigmas(table, "normal", student_steps)

        def step():
            opt.zero_grad(set_to_none=True)
            with _autocast(device.type, dtype):
                loss, _ = msd_step_loss(lora, student, e, x0, sigmas, KIND,
                                        gradient_checkpointing=gradient_checkpointing)
            loss.backward()
            opt.step()

        cuda = device.type == "cuda"
        try:
            step()  # warm-up (kernels, allocator)
        except torch.cuda.OutOfMemoryError:
            return {"step_s": None, "peak_bytes": None, "oom": True,
                    "optimizer": "fused" if flags.get("fused") else "default"}
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        return {"step_s": best, "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None, "oom": False,
                "optimizer": "fused" if flags.get("fused") else "foreach" if flags.get("foreach") else "default"}
    finally:
        lora.remove()
        del unet
        if device.type == "cuda":
            torch.cuda.empty_cache()


def msd_step_figures(arch: str, rank: int, batch: int, *, device: str = "cpu", dtype: str = "fp32",
                     gradient_checkpointing: bool = False, student_steps: int = 10, repeat: int = 3,
                     latent: int | None = None, fake: FakeStep | None = None,
                     saved_activation_bytes: int | None = None) -> dict:
    """One MSD step's memory (parameters, optimizer state, saved activations: FakeTensor accounting) and,
    on CUDA (or for ``arch="tiny"``, which is small enough for any device), its measured time and peak.
    Full-size architectures are never materialised on a CPU. ``fake`` / ``saved_activation_bytes``: reuse
    a :class:`FakeStep` of the same arch, rank and dtype / a count already made.

    Returns plain numbers: the arguments, ``base_params``, ``base_param_bytes``, ``lora_params``,
    ``lora_param_bytes``, ``grad_bytes``, ``optimizer_bytes`` (AdamW's two fp32 moments), ``optimizer``
    (fused / foreach / default), ``saved_activation_bytes``, ``estimate_bytes`` (their sum), and measured
    ``peak_bytes`` (CUDA ``max_memory_allocated``, else None), ``step_s`` and ``oom`` (None: not measured).
    """
    if arch not in ARCHS or dtype not in DTYPES:
        raise ValueError(f"arch must be one of {sorted(ARCHS)} and dtype fp32 or bf16, got {arch!r}, {dtype!r}")
    fake = fake or FakeStep(arch, rank, dtype, student_steps)
    out = _figures(arch, rank, batch, device, dtype, gradient_checkpointing, student_steps, latent, fake,
                   saved_activation_bytes)
    if torch.device(device).type == "cuda" or arch == "tiny":
        out.update(measure_step(arch, rank, batch, device, dtype, gradient_checkpointing, student_steps, repeat,
                                latent))
    return out


# -- teacher-cache throughput ----------------------------------------------------------------------------


def cache_throughput(total: int = 64, batch: int = 32, teacher_steps: int = 20, device="cpu", repeat: int = 3) -> dict:
    """samples/s of :func:`build_teacher_cache` against a plain loop of batched CFG sampling (``teacher_x0``)
    of the same samples with the same guided denoiser and batch, on the shipped toy model; and how fast
    training reads the cache back (fastest of ``repeat`` after a warm-up)."""
    import tempfile

    from noisecraft.hosts.toy import load_toy, toy_host
    from noisecraft.msd import teacher_x0
    from noisecraft.rng import seeded_noise
    from noisecraft.train import TeacherCache, build_teacher_cache

    model = load_toy(device=device)
    host = toy_host(model)
    sigmas = get_sigmas(model.table, "normal", teacher_steps)
    conds = list(range(10))

    def plain():
        for start in range(0, total, batch):
            idx = range(start, min(total, start + batch))
            e = torch.cat([seeded_noise(1000 + i, (1, *model.latent_shape)) for i in idx]).to(device)
            ids = torch.tensor([i % len(conds) for i in idx])
            teacher_x0(host.denoiser(ids, cfg=3.0), e, sigmas, "eps")

    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(1000))

        def build():
            return build_teacher_cache(Path(tmp) / f"cache{next(runs)}", lambda c: host.denoiser(c, cfg=3.0),
                                       shape=model.latent_shape, conds=conds, total=total, sigmas=sigmas, kind="eps",
                                       base_seed=1000, shard_size=batch, batch_size=batch)

        plain()  # warm-up
        t_plain, t_cache = fastest(plain, repeat), fastest(build, repeat)
        cache = TeacherCache(build().root)
        t_read = fastest(lambda: [cache.get(range(s, min(total, s + batch))) for s in range(0, total, batch)], repeat)
    return {"samples": total, "batch": batch, "teacher_steps": teacher_steps, "plain_sps": total / t_plain,
            "cache_sps": total / t_cache, "read_sps": total / max(t_read, 1e-9)}


# -- the table ---------------------------------------------------------------------------------------------


def _gb(b) -> str:
    """Bytes as GiB ("G") or, below 0.1 GiB, MiB ("M")."""
    if b is None:
        return "-"
    return f"{b / 2**30:.2f}G" if b >= 2**30 / 10 else f"{b / 2**20:.1f}M"


WIDTHS = (8, 8, 8, 8, 8, 8, 8, 9, 7, 7)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (accounting only; timing at the tiny size) or cuda")
    p.add_argument("--archs", nargs="+", default=["sd15", "sdxl"], choices=sorted(ARCHS))
    p.add_argument("--ranks", nargs="+", type=int, default=[128, 256])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--student-steps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="rank 128, batch 2 only, no cache throughput")
    p.add_argument("--exact", action="store_true", help="count every batch (slower) instead of extrapolating")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if args.quick:
        args.ranks, args.batches = args.ranks[:1], [2]
    dev = torch.device(args.device)
    timed = dev.type == "cuda"
    print(f"one MSD step (N = {args.student_steps}), device {dev}; params = frozen UNet + LoRA + "
          "its grads; opt = AdamW moments; act = saved activations of the LoRA pass (FakeTensor accounting); "
          "est = their sum; G = GiB, M = MiB; peak/time: "
          + (f"measured on {dev}" if timed else "GPU only (tiny rows: measured on the CPU)"))
    names = ("params", "opt", "act", "act+ckpt", "est", "est+ckpt", "peak", "peak+ckpt", "s/step", "s+ckpt")
    head = f"{'arch':>5} {'rank':>4} {'dtype':>5} {'batch':>5} {'LoRA M':>7} " + " ".join(
        f"{n:>{w}}" for n, w in zip(names, WIDTHS))
    print(head)
    archs = list(args.archs) + ([] if "tiny" in args.archs else ["tiny"])
    for arch in archs:
        for rank in ([8] if arch == "tiny" else args.ranks):
            for dtype in args.dtypes:
                fake = FakeStep(arch, rank, dtype, args.student_steps)
                saved = {gc: saved_by_batch(fake, args.batches, gc, exact=args.exact) for gc in (False, True)}
                for batch in args.batches:
                    a, b = (msd_step_figures(arch, rank, batch, device=str(dev), dtype=dtype, gradient_checkpointing=gc,
                                             student_steps=args.student_steps, fake=fake,
                                             saved_activation_bytes=saved[gc][batch][0]) for gc in (False, True))
                    mark = "*" if saved[False][batch][1] else " "
                    params = a["base_param_bytes"] + a["lora_param_bytes"] + a["grad_bytes"]
                    t = [("-" if f["step_s"] is None else f"{f['step_s']:7.3f}") for f in (a, b)]
                    cells = [_gb(v) for v in (params, a["optimizer_bytes"], a["saved_activation_bytes"],
                                              b["saved_activation_bytes"], a["estimate_bytes"], b["estimate_bytes"],
                                              a["peak_bytes"], b["peak_bytes"])] + t
                    print(f"{arch:>5} {rank:>4} {dtype:>5} {batch:>4}{mark} {a['lora_params'] / 1e6:7.1f} "
                          + " ".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS)), flush=True)
    print("* activations extrapolated from batch 1 and 2 (affine in the batch; --exact counts them)")
    if not args.quick:
        c = cache_throughput(device="cpu")
        print(f"\nteacher cache on the toy model (CPU, {c['samples']} samples, batch {c['batch']}, CFG N' = "
              f"{c['teacher_steps']}): build_teacher_cache {c['cache_sps']:.1f} samples/s, plain batched CFG "
              f"{c['plain_sps']:.1f} samples/s (ratio {c['cache_sps'] / c['plain_sps']:.2f}); reading it back "
              f"{c['read_sps']:.0f} samples/s ({c['read_sps'] / c['plain_sps']:.0f}x generating them)")


if __name__ == "__main__":
    main()
