"""Refined noise + cfg 1 against plain cfg inside real ComfyUI: wall time, and no re-patch cost.

Measures, side by side in one run, on small random-weight SD1.5- and SDXL-shaped models built
from ComfyUI's own classes (CPU by default), with a random refiner LoRA (rank 4 on NoiseCraft's
default targets, the kohya format ``noisecraft.lora`` exports):

* the wall time of one 20-step generation (``SamplerCustomAdvanced``, euler, normal) with
  RandomNoise -> Refine Noise and a cfg-1 guider (refine passes included: ComfyUI asks the NOISE
  while sampling), against the same seeds, size and sampler with a cfg-7 guider; the median of
  ``--repeats`` alternating runs, and the ratio (paper: 0.58 SD2.1, 0.60 SDXL; the limit with
  two refine passes is (N + 2) / 2N = 0.55 at N = 20);
* the 1st, 2nd and 3rd refined generation on a fresh model that carries a user LoRA (so a
  re-patch would cost a re-merge): with NoiseCraft's scoped weight functions, and with the
  refiner registered through ``ModelPatcher.add_weight_wrapper`` on a clone, which re-rolls the
  clone's ``patches_uuid`` and makes ComfyUI unpatch and re-patch the weights at every switch
  between the refine clone and the sampler's MODEL.

Usage (ComfyUI checkout and its interpreter; the pack need not be installed)::

    COMFYUI_PATH=<ComfyUI checkout> OMP_NUM_THREADS=1 <ComfyUI venv python> benchmarks/bench_comfy_refine.py

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895). Random
weights make the images meaningless; the timings are what this measures.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from _common import load_pack, setup_comfy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=["sd15", "sdxl"])
    p.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8); default 256")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per variant (median reported)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--gpu", action="store_true", help="let ComfyUI pick the GPU instead of --cpu")
    a = p.parse_args()
    setup_comfy(cpu=not a.gpu)
    logging.basicConfig(level=logging.WARNING)

    import torch

    import comfy.lora
    import comfy.model_management as mm
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    rf, bridge, refine, tiny = load_pack("nodes.nodes_refine", "nodes.bridge", "noisecraft.refine")
    lat_size = a.size // 8
    print(f"device {mm.get_torch_device()}, torch threads {torch.get_num_threads()}, {a.steps} steps euler/normal, "
          f"{a.size}x{a.size} px (latent {lat_size}x{lat_size}), refiner rank {a.rank}")

    def sync():
        if torch.cuda.is_available() and a.gpu:
            torch.cuda.synchronize()

    def generate(model, noise, pos, neg, cfg):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(cfg)
        sigmas = bridge.get_sigmas(model, "normal", a.steps)
        latent = {"samples": torch.zeros(1, 4, lat_size, lat_size)}
        sync()
        t0 = time.perf_counter()
        out = SamplerCustomAdvanced().sample(noise, guider, comfy.samplers.sampler_object("euler"), sigmas, latent)
        sync()
        assert torch.isfinite(out[0]["samples"]).all()
        return time.perf_counter() - t0

    def refined(model, refiner, seed, pos):
        return rf.RefineNoise.execute(Noise_RandomNoise(seed), model, refiner, pos, 1.0).args[0]

    class WrapperRefined:
        """The alternative: the refiner registered with add_weight_wrapper on a clone (re-patches)."""

        def __init__(self, model, refiner, seed, pos):
            self.seed, self.pos, self.kind = seed, pos, bridge.model_kind(model)
            self.clone = model.clone()
            self.switch = rf.RefinerSwitch(rf.map_refiner(refiner, model))
            for t in self.switch.targets:
                self.clone.add_weight_wrapper(t.weight_key, self.switch._fn(t))

        def generate_noise(self, latent):
            e = Noise_RandomNoise(self.seed).generate_noise(latent)
            smax, switch = bridge.sigma_max(self.clone), self.switch

            def fn(ctx):
                def pass_with(refiner_on: bool):
                    def d(x, s):
                        switch.enabled = refiner_on
                        out = ctx.denoiser(x, s)
                        switch.enabled = False
                        return out
                    return d

                return refine.refine_noise(e.to(ctx.device), pass_with(False), pass_with(True), self.kind, smax,
                                           1.0).cpu()

            return bridge.run_core(self.clone, self.pos, self.pos, e, fn, sigmas=torch.tensor([smax, 0.0]), cfg=1.0)

    for family in a.families:
        pos, neg = tiny.conditioning(family, 1), tiny.conditioning(family, 2, empty=True)
        model = tiny.build(family, seed=0)
        refiner = rf.parse_refiner(tiny.random_refiner_lora(model, a.rank, seed=1),
                                   {"noisecraft.kind": "refiner", "noisecraft.model_kind": "eps"}, "bench")
        generate(model, Noise_RandomNoise(0), pos, neg, a.cfg)  # warm-up (first load)
        generate(model, refined(model, refiner, 0, pos), pos, neg, 1.0)
        t_cfg, t_ref = [], []
        for r in range(a.repeats):
            t_cfg.append(generate(model, Noise_RandomNoise(r), pos, neg, a.cfg))
            t_ref.append(generate(model, refined(model, refiner, r, pos), pos, neg, 1.0))
        mc, mr = statistics.median(t_cfg), statistics.median(t_ref)
        print(f"\n[{family}] {a.steps}-step generation, median of {a.repeats} alternating runs")
        print(f"  cfg {a.cfg:g}                  {mc:7.3f} s   runs {[round(t, 3) for t in t_cfg]}")
        print(f"  refine + cfg 1          {mr:7.3f} s   runs {[round(t, 3) for t in t_ref]}")
        print(f"  ratio refined / cfg     {mr / mc:7.3f}   (paper 0.58 SD2.1, 0.60 SDXL; limit "
              f"{(a.steps + 2) / (2 * a.steps):.3f})")

        print(f"  1st/2nd/3rd refined generation on a fresh model with a user LoRA (rank 16) patched in:")
        for label, make in (("scoped weight functions (ours)", refined), ("add_weight_wrapper clone", WrapperRefined)):
            mm.unload_all_models()
            fresh = tiny.build(family, seed=0)
            key_map = comfy.lora.model_lora_keys_unet(fresh.model, {})
            fresh.add_patches(comfy.lora.load_lora(tiny.random_refiner_lora(fresh, 16, seed=7), key_map), 1.0)
            times = [generate(fresh, make(fresh, refiner, g, pos), pos, neg, 1.0) for g in range(3)]
            print(f"    {label:32s} {' / '.join(f'{t:.3f}' for t in times)} s")
        del model
        mm.unload_all_models()
        mm.soft_empty_cache()


if __name__ == "__main__":
    main()
