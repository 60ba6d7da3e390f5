"""Benchmark: memory of MSD training against backpropagation through the whole student chain.

Run: ``python benchmarks/bench_msd_memory.py`` (toy model, CPU, ~1 minute; on a CUDA machine add
``--device cuda`` to also report ``torch.cuda.max_memory_allocated``).

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3.
One training step of a rank-4 LoRA refiner on the shipped toy model, batch 32, for N = 1, 5, 10
student steps, measured side by side in one run:

* ``msd``: :func:`noisecraft.msd.msd_loss` (student chain without a graph, detached slopes);
* ``full``: the same loss with autograd through every student step (no detaching).

Memory is the total size of the tensors autograd saves for backward (``saved_tensors_hooks``),
which is what grows with N; on CUDA, the peak allocated memory of the step as well. Targets
(DESIGN.md): msd(N=10) / msd(N=1) <= 1.2 and full(N=10) / msd(N=10) >= 5.
"""

from __future__ import annotations

import argparse

import torch

from noisecraft import ode
from noisecraft.hosts.adapters import attach_lora
from noisecraft.msd import msd_loss, teacher_x0
from noisecraft.refine import refine_noise
from noisecraft.rng import seeded_noise
from noisecraft.sigmas import get_sigmas, noise_to_x
from noisecraft.hosts.toy import load_toy


class SavedBytes:
    """Counts the bytes autograd saves for backward inside the block."""

    def __init__(self):
        self.bytes = 0
        self._seen = set()

    def pack(self, t: torch.Tensor):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in self._seen:  # the same storage saved twice costs once
            self._seen.add(key)
            self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    dev = torch.device(args.device)
    toy = load_toy(device=dev)
    lora = attach_lora(toy.unet, rank=args.rank)
    with torch.no_grad():  # a non-zero LoRA, as after some training
        g = torch.Generator().manual_seed(0)
        for prm in lora.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.01)
    labels = torch.arange(args.batch) % toy.num_classes
    student = toy.denoiser(labels, cfg=1.0)
    guided = toy.denoiser(labels, cfg=3.0)
    kind = toy.table.kind
    e = seeded_noise(0, (args.batch, *toy.latent_shape)).to(dev)
    teacher = teacher_x0(guided, e, get_sigmas(toy.table, "normal", 20), kind)
    base, with_lora = lora.base_and_lora(student)

    def refiner(noise):
        return refine_noise(noise, base, with_lora, kind, float(get_sigmas(toy.table, "normal", 1)[0]))

    def full_loss(n):  # autograd through every student step
        s = get_sigmas(toy.table, "normal", n)
        x = noise_to_x(refiner(e), kind, float(s[0]))
        with lora.disabled():
            x0 = ode.sample(student, x, s)
        return torch.nn.functional.mse_loss(x0, teacher)

    rows = []
    for n in (1, 5, 10):
        for name in ("msd", "full"):
            lora.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            with SavedBytes() as saved:
                if name == "msd":
                    with lora.disabled():
                        loss, _ = msd_loss(refiner, e, student, teacher, get_sigmas(toy.table, "normal", n), kind)
                else:
                    loss = full_loss(n)
            loss.backward()
            peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
            rows.append((n, name, saved.bytes, peak))

    by = {(n, name): b for n, name, b, _ in rows}
    print(f"toy model, rank-{args.rank} LoRA refiner, batch {args.batch}, device {dev}")
    print(f"{'N':>3} {'method':>6} {'saved for backward':>20}" + (f" {'CUDA peak':>12}" if dev.type == "cuda" else ""))
    for n, name, b, peak in rows:
        extra = f" {peak / 2**20:10.1f} MB" if peak is not None else ""
        print(f"{n:>3} {name:>6} {b / 2**20:17.2f} MB{extra}")
    print(f"\nmsd N=10 / msd N=1: {by[(10, 'msd')] / by[(1, 'msd')]:.2f} (target <= 1.2)")
    print(f"full N=10 / msd N=10: {by[(10, 'full')] / by[(10, 'msd')]:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
