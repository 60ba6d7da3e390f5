"""Benchmark: best-of-K stability selection, full round trips vs successive halving vs partial trips.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_selection.py`` (trained toy model, CPU, 2-3
minutes on a shared 2-core machine). ``--comfy`` (with ``COMFYUI_PATH`` set, under ComfyUI's
interpreter) runs the Inversion-Stability Select node on the tiny random-weight SD1.5 model of the
tests instead (about 3.5 minutes with ``--repeats 2 --comfy-groups 8``).

For each search setting, side by side in one run:

* cost per image in model passes (cfg sampling 2 per step, cfg-1 inversion 1 per step) and in wall
  time, both relative to one 20-step cfg generation (batch 1, fastest of ``--repeats``, timed
  interleaved with the selections);
* agreement: how often the chosen seed is the one the full 20-step score picks, over disjoint
  groups of K seeds (the real ``select`` calls), and over ``--resample`` random groups drawn from
  the same seeds (the per-seed rung scores replayed through the same halving rule: a finer
  estimate of the same probability);
* the Spearman correlation, within each group, of the setting's ranking with the 20-step score's.

Rows: ``full N`` (every candidate gets an N-step round trip), ``halving N`` (successive halving,
:func:`noisecraft.stability.halving_rungs`, last rung N steps), ``partial M/20`` (the first M steps
of the 20-step schedule down and back up; offered nowhere, measured to decide). Pass counts are the
stable figure; wall times move with whatever else shares the machine.

Paper: Qi, Bai, Xiong, Xie, "Not All Noises Are Created Equally" (arXiv:2407.14041); successive
halving: Jamieson & Talwalkar (AISTATS 2016), Karnin, Koren & Somekh (ICML 2013).
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from _common import fastest, spearman

GEN_STEPS = 20


def _halving_pick(rung_scores: list[torch.Tensor], eta: int) -> torch.Tensor:
    """Replay select()'s halving rule on per-candidate scores: rung_scores[r] is [G, K] -> winners [G]."""
    g, k = rung_scores[0].shape
    alive = torch.arange(k).expand(g, k)
    for r, sc in enumerate(rung_scores):
        s = sc.gather(1, alive)
        if r == len(rung_scores) - 1:
            return alive.gather(1, s.argmax(1, keepdim=True))[:, 0]
        keep = math.ceil(alive.shape[1] / eta)
        ranked = torch.argsort(s, dim=1, descending=True, stable=True)[:, :keep]
        alive = torch.sort(alive.gather(1, ranked), dim=1).values
        if keep == 1:
            return alive[:, 0]
    raise AssertionError("unreachable")


def toy_bench(a) -> list[tuple]:
    from noisecraft import ode
    from noisecraft import stability as st
    from noisecraft.hosts.toy import load_toy
    from noisecraft.rng import seeded_noise
    from noisecraft.sigmas import get_sigmas, noise_to_x

    toy = load_toy()
    kind = toy.table.kind
    k, s_per = a.candidates, a.seeds
    groups = s_per // k
    sig = lambda n: get_sigmas(toy.table, "normal", n)
    ref_sig = sig(GEN_STEPS)
    settings = [("full", n) for n in a.full_steps] + [("halving", n) for n in a.halving_steps]
    settings += [("partial", m) for m in a.partial_steps]
    per = {}  # (setting) -> dict(winners=[...], rho=[...], passes, rung scores per class)
    refs, mismatches = {}, 0
    for lab in a.classes:
        g = toy.denoiser(torch.tensor([lab] * groups), cfg=a.cfg)
        u = toy.denoiser(torch.tensor([lab] * groups), cfg=1.0)
        g1, u1 = toy.denoiser(torch.tensor([lab]), cfg=a.cfg), toy.denoiser(torch.tensor([lab]), cfg=1.0)
        seeds = torch.stack([seeded_noise(1000 * lab + i, (1, *toy.latent_shape)) for i in range(groups * k)])
        cands = seeds.reshape(groups, k, *toy.latent_shape).transpose(0, 1).contiguous()  # [K, G, ...]
        flat = seeds  # [S, 1, ...]: every seed as its own candidate of one item

        def per_seed(sigmas, _cache={}):
            key = (lab, tuple(round(float(v), 6) for v in sigmas))
            if key not in _cache:
                _cache[key] = _per_seed(sigmas)
            return _cache[key]

        def _per_seed(sigmas):
            return st.select(g1, flat, sigmas, kind, micro_batch=a.micro_batch, inverse_denoiser=u1,
                             keep_x0=False).scores[:, 0].reshape(groups, k)

        ref = per_seed(ref_sig)  # [G, K]
        refs[lab] = ref
        for name, n in settings:
            d = per.setdefault((name, n), {"agree": 0, "rho": [], "rs_agree": 0, "rs_total": 0})
            if name == "partial":
                rung = [per_seed(ref_sig[: n + 1])]
                res = None
            else:
                res = st.select(g, cands, sig(n), kind, micro_batch=a.micro_batch, inverse_denoiser=u, keep_x0=False,
                                search=name)
                rung = [per_seed(st.rung_schedule(sig(n), m)) for m in res.rung_steps]
                d["passes"] = res.passes() / (2 * GEN_STEPS)
                d["rungs"] = res.rung_steps
            picks = _halving_pick(rung, 2) if res is None else res.best_index
            if res is not None:  # the replay must reproduce the real select()
                replay = _halving_pick(rung, 2) if name == "halving" else rung[0].argmax(1)
                mismatches += int((replay != picks).sum())  # float round-off of another batch size only
                key = res.rung.t().double() * 4 + res.scores.t().double()
            else:
                key = rung[0]
                d["passes"] = 3 * n * k / (2 * GEN_STEPS)
            d["agree"] += int((picks == ref.argmax(1)).sum())
            d["rho"] += [spearman(key[i], ref[i]) for i in range(groups)]
            # resampled groups of K out of all seeds of this class
            gen = torch.Generator().manual_seed(lab)
            sub = torch.stack([torch.randperm(groups * k, generator=gen)[:k] for _ in range(a.resample)])
            rflat = [r.reshape(-1)[sub] for r in rung]
            rpick = _halving_pick(rflat, 2) if name != "full" else rflat[0].argmax(1)
            d["rs_agree"] += int((rpick == ref.reshape(-1)[sub].argmax(1)).sum())
            d["rs_total"] += a.resample

    # wall time, batch 1, interleaved with a 20-step cfg generation
    lab = a.classes[0]
    g1, u1 = toy.denoiser(torch.tensor([lab]), cfg=a.cfg), toy.denoiser(torch.tensor([lab]), cfg=1.0)
    one = seeded_noise(0, (1, *toy.latent_shape))
    c8 = torch.stack([seeded_noise(s, (1, *toy.latent_shape)) for s in range(k)])
    gen = lambda: ode.sample(g1, noise_to_x(one, kind, float(ref_sig[0])), ref_sig)
    gen()
    rows, t_gen = [], []
    for name, n in settings:
        if name == "partial":
            run = lambda: st.round_trip(g1, c8[:, 0], ref_sig[: n + 1], kind, inverse_denoiser=u1)
        else:
            run = lambda: st.select(g1, c8, sig(n), kind, micro_batch=a.micro_batch, inverse_denoiser=u1,
                                    keep_x0=False, search=name)
        t = float("inf")
        for _ in range(a.repeats):  # interleaved: one generation, one selection
            t_gen.append(fastest(gen, 1))
            t = min(t, fastest(run, 1))
        d = per[(name, n)]
        label = {"full": f"full {n}", "halving": f"halving {n} (rungs {d.get('rungs')})",
                 "partial": f"partial {n}/{GEN_STEPS}"}[name]
        rows.append((label, d["passes"], t, 100 * d["agree"] / (groups * len(a.classes)),
                     100 * d["rs_agree"] / d["rs_total"], sum(d["rho"]) / len(d["rho"])))
    rows = [(r[0], r[1], r[2] / min(t_gen), *r[3:]) for r in rows]  # against the fastest generation of the run
    print(f"toy model (trained), classes {list(a.classes)}, {s_per} seeds each -> {groups * len(a.classes)} disjoint "
          f"groups of {k}; {a.resample} resampled groups per class; cfg {a.cfg}, inversion cfg 1, 'normal' schedule; "
          f"{torch.get_num_threads()} thread(s); one {GEN_STEPS}-step cfg generation (batch 1): "
          f"{min(t_gen) * 1e3:.1f} ms (fastest over the run); replayed picks differing from select(): {mismatches}")
    return rows


def comfy_bench(a) -> list[tuple]:
    from _common import load_pack, setup_comfy

    setup_comfy(cpu=not a.gpu)
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    nodes, tiny = load_pack("nodes.nodes_stability")
    model = tiny.build("sd15", seed=0)
    pos, neg = tiny.conditioning("sd15", seed=1), tiny.conditioning("sd15", seed=2, empty=True)
    side = a.comfy_size // 8
    k, groups = a.candidates, a.comfy_groups
    latent = {"samples": torch.zeros(1, 4, side, side)}
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", GEN_STEPS)

    def generate():
        noise = Noise_RandomNoise(1).generate_noise(latent)
        return comfy.sample.sample_custom(model, noise, 7.0, comfy.samplers.sampler_object("euler"), sigmas, pos, neg,
                                          latent["samples"], seed=1, disable_pbar=True)

    def select(seed, steps, search):
        out = nodes.InversionStabilitySelect.execute(model, pos, neg, latent, seed, k, steps, 7.0, 1.0, "normal",
                                                     a.micro_batch, k, search)
        ui = out.ui
        key = [4.0 * r + sc for r, sc in zip(ui["noisecraft_rungs"][0], ui["noisecraft_scores"][0])]
        return out.args[1], ui["noisecraft_scores"][0], key, ui["noisecraft_rung_steps"]

    generate()
    ref = [select(100 * i, GEN_STEPS, "full") for i in range(groups)]
    rows = []
    for name, n in [("full", m) for m in a.full_steps] + [("halving", m) for m in a.halving_steps]:
        picks = [select(100 * i, n, name) for i in range(groups)]
        agree = sum(p[0] == r[0] for p, r in zip(picks, ref))
        rho = [spearman(p[2], r[1]) for p, r in zip(picks, ref)]
        t_gen = fastest(generate, a.repeats)
        t = fastest(lambda: select(0, n, name), a.repeats)
        rungs = picks[0][3]
        passes = sum(c * 3 * m for c, m in zip(_counts(k, len(rungs)), rungs)) / (2 * GEN_STEPS)
        rows.append((f"{name} {n}" + (f" (rungs {rungs})" if name == "halving" else ""), passes, t / t_gen,
                     100 * agree / groups, None, sum(rho) / len(rho)))
    print(f"ComfyUI tiny random-weight SD1.5 model, {a.comfy_size}x{a.comfy_size}, cfg 7, {groups} groups of {k}, "
          f"device {model.load_device}")
    return rows


def _counts(k: int, r: int) -> list[int]:
    out, n = [], k
    for _ in range(r):
        out.append(n)
        n = math.ceil(n / 2)
    return out


def table(rows) -> str:
    lines = [f"| search | passes / gen | wall / gen | agrees with 20-step winner | (resampled) | Spearman in group |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, p, w, ag, rs, rho in rows:
        lines.append(f"| {label} | {p:.2f} | {w:.2f} | {ag:.0f}% | {'-' if rs is None else f'{rs:.0f}%'} | {rho:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", type=int, default=8, help="K, candidates per group")
    p.add_argument("--seeds", type=int, default=48, help="seeds per class (groups = seeds / K)")
    p.add_argument("--classes", type=int, nargs="+", default=[1, 3, 8])
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--full-steps", type=int, nargs="+", default=[2, 4, 6, 10])
    p.add_argument("--halving-steps", type=int, nargs="+", default=[6, 10, 20])
    p.add_argument("--partial-steps", type=int, nargs="+", default=[2, 4])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--resample", type=int, default=2000, help="random groups per class for the resampled agreement")
    p.add_argument("--repeats", type=int, default=5, help="timings keep the fastest of this many runs")
    p.add_argument("--comfy", action="store_true", help="also run the ComfyUI node (needs COMFYUI_PATH)")
    p.add_argument("--comfy-size", type=int, default=128)
    p.add_argument("--comfy-groups", type=int, default=4)
    p.add_argument("--gpu", action="store_true", help="ComfyUI part: let ComfyUI pick the GPU")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.comfy:
        rows = comfy_bench(a)
        print(table(rows))
        return
    rows = toy_bench(a)
    print(table(rows))
    print(f"\npasses: model passes per image of best-of-{a.candidates} / the {2 * GEN_STEPS} of one {GEN_STEPS}-step "
          f"cfg generation; wall: fastest of {a.repeats}, each repetition "
          f"next to a generation, against the fastest generation of the run; micro-batch {a.micro_batch}, batch 1.")


if __name__ == "__main__":
    main()
