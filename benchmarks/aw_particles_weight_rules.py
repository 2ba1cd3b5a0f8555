"""Where in a step should the particle weight be evaluated? A study in the alignment world (pure torch).

    python benchmarks/aw_particles_weight_rules.py                 # results/aw_particles_weight_rules.{md,json}
    python benchmarks/aw_particles_weight_rules.py --tiny --out /tmp/awr   # seconds, for the tests

The particle mode (sampler/particles.py) weights an Euler-ancestral step σ → σ' by

    log Z = -λ(1-λ)/2 · gain · |D_ref(x) - D_al(x)|²,   gain = (c/s)² = 1/σ'² - 1/σ²

(the gain of the ancestral kernel is exactly ∫ ds/s² over the step, s = σ²; tests/test_particles.py),
i.e. the continuous-time weight -λ(1-λ)/2 ∫ |ΔD(x_s, s)|²/s² ds with |ΔD|² frozen at the START of
the step ("left": the discrete Gaussian chains' exact normaliser, the pack's first rule). All three
rules converge to the same continuous-time weight; they differ in the step-size error:

- left:  |ΔD|² at (x, σ);
- trapezoid: |ΔD|² linear in s between the two model calls (x, σ) and (x', σ'), integrated exactly
  against 1/s² (particles.trapezoid_weights); the step's increment is known one model call later.
  The pack's rule since this study (sampler/particle_sampler.py);
- right: |ΔD|² at (x', σ'), after the step's noise.

The sampler loop is the pack's Euler-ancestral step on exact world denoisers (float64), one particle
system per point, systematic resampling when ESS < 0.5·N, one weighted draw per point at the end; it
uses the pack's own math (ancestral step, ESS, resampling, draw). Rows average independent seeds; ±
is the standard error over seeds. Plain = DeRaDiff without weights; scratch = the same sampler on the
exact p_(β/λ).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from aw_difference_reuse import world  # noqa: E402  (the ring and hard worlds of aw_particles.py)
from aw_world import particle_math  # noqa: E402
from results_io import command_line, write_results  # noqa: E402

P = particle_math()  # the pack's sampler/particles.py

F64 = torch.float64
RULES = ("left", "trapezoid", "right")
RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Config:
    worlds: tuple = ("hard", "ring")
    lambdas: tuple = (0.25, 0.5, 1.5, 2.0, 3.0)
    particles: tuple = (8, 32)
    rules: tuple = RULES
    steps: int = 50
    points: int = 4096
    seeds: int = 4
    beta: float = 1.0
    resample_below: float = 0.5


TINY = Config(worlds=("hard",), lambdas=(0.5, 2.0), particles=(4,), steps=6, points=128, seeds=2)


def karras(steps, sigma_min=0.0291675, sigma_max=14.614642, rho=7.0):
    """ComfyUI's karras schedule with SD1.5's σ range, closed by 0."""
    ramp = torch.linspace(0, 1, steps, dtype=F64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=F64)]).tolist()


def sample(rule, d_ref, d_al, lam, n, points, sigmas, generator, resample_below=0.5, weighted=True):
    """Points [points, 2]: N particles per point under ``rule`` (weighted=False: plain DeRaDiff)."""
    x = torch.randn(n, points, 2, generator=generator, dtype=F64) * math.sqrt(1.0 + sigmas[0] ** 2)
    logw = torch.zeros(n, points, dtype=F64)
    scale = -lam * (1.0 - lam) / 2.0
    previous = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        flat = x.reshape(-1, 2)
        dr, da = d_ref(flat, sigma).reshape(x.shape), d_al(flat, sigma).reshape(x.shape)
        sq = ((da - dr) ** 2).sum(-1)
        denoised = (1.0 - lam) * dr + lam * da
        inc = None
        if weighted and scale != 0.0:
            if rule == "left":
                gain = P.euler_ancestral_gain(sigma, sigma_next)
                inc = scale * gain * sq if gain > 0 else None
            elif i > 0 and rule == "trapezoid":
                c0, c1 = P.trapezoid_weights(sigmas[i - 1], sigma)
                inc = scale * (c0 * previous + c1 * sq)
            elif i > 0 and rule == "right":
                inc = scale * (1.0 / sigma ** 2 - 1.0 / sigmas[i - 1] ** 2) * sq
        if inc is not None:
            logw = logw + inc
            if n > 1 and bool((P.ess(logw) < resample_below * n).any()):
                idx = P.systematic_resample(logw, generator)
                x = torch.take_along_dim(x, idx[..., None].expand_as(x), 0)
                denoised = torch.take_along_dim(denoised, idx[..., None].expand_as(denoised), 0)
                sq = torch.take_along_dim(sq, idx, 0)
                logw = torch.zeros_like(logw)
        previous = sq
        sigma_down, sigma_up = P.ancestral_step(sigma, sigma_next)
        if sigma_down == 0:
            x = denoised
        else:
            x = x + (x - denoised) / sigma * (sigma_down - sigma) + sigma_up * torch.randn(
                x.shape, generator=generator, dtype=F64)
    choice = P.draw_one(logw, generator)
    return x[choice, torch.arange(points)]


def mean_se(values):
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
    return m, sd / math.sqrt(len(values))


def run(cfg: Config, log=print) -> dict:
    t0 = time.perf_counter()
    sigmas = karras(cfg.steps)
    rows = []
    for name in cfg.worlds:
        ref, w = world(name)
        al = ref.tilt(w, cfg.beta)
        for lam in cfg.lambdas:
            target = ref.tilt(w, cfg.beta / lam)
            exact = target.expected_reward(w)

            def err(rule, n, weighted=True, d=None):
                out = []
                for seed in range(cfg.seeds):
                    g = torch.Generator().manual_seed(1000 * seed + 7)
                    if d is not None:  # from scratch: the exact target's denoiser, no mixing
                        pts = sample("left", d, d, 0.0, 1, cfg.points, sigmas, g, weighted=False)
                    else:
                        pts = sample(rule, ref.denoise, al.denoise, lam, n, cfg.points, sigmas, g,
                                     cfg.resample_below, weighted)
                    out.append(float((pts @ w).mean()) - exact)
                return mean_se(out)

            row = {"world": name, "lam": lam, "scratch": err("left", 1, d=target.denoise),
                   "plain": err("left", 1, weighted=False)}
            for rule in cfg.rules:
                for n in cfg.particles:
                    row[f"{rule}/{n}"] = err(rule, n)
            rows.append(row)
            log(f"{name} λ={lam:g}: scratch {row['scratch'][0]:+.3f} plain {row['plain'][0]:+.3f} " + " ".join(
                f"{r}/N={n} {row[f'{r}/{n}'][0]:+.3f}" for r in cfg.rules for n in cfg.particles))
    return {"config": asdict(cfg), "rows": rows, "seconds": time.perf_counter() - t0}


def render(res, command: str) -> str:
    cfg = res["config"]
    cols = [f"{r} N={n}" for r in cfg["rules"] for n in cfg["particles"]]
    lines = [f"Measured by `{command}` ({res['seconds']:.0f} s on this machine's CPU, one thread): euler_ancestral, "
             f"karras, {cfg['steps']} steps, {cfg['points']} points × {cfg['seeds']} seeds per figure, anchor "
             f"β = {cfg['beta']:g}, resample when ESS < {cfg['resample_below']:g}·N. E[r] error against the exact "
             "p_(β/λ), mean over seeds ± its standard error.", "",
             "| world | λ | scratch | DeRaDiff | " + " | ".join(cols) + " |",
             "|" + "---|" * (4 + len(cols))]
    for r in res["rows"]:
        cells = [r["scratch"], r["plain"]] + [r[f"{k}/{n}"] for k in cfg["rules"] for n in cfg["particles"]]
        lines.append(f"| {r['world']} | {r['lam']:g} | " + " | ".join(f"{m:+.3f} ± {se:.3f}" for m, se in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--worlds", nargs="*")
    ap.add_argument("--lambdas", type=float, nargs="*")
    ap.add_argument("--particles", type=int, nargs="*")
    ap.add_argument("--rules", nargs="*", choices=RULES)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--points", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TINY if args.tiny else Config()
    for key in ("worlds", "lambdas", "particles", "rules"):
        if getattr(args, key):
            cfg = replace(cfg, **{key: tuple(getattr(args, key))})
    for key in ("steps", "points", "seeds"):
        if getattr(args, key) is not None:
            cfg = replace(cfg, **{key: getattr(args, key)})
    res = run(cfg)
    command = command_line("aw_particles_weight_rules.py", argv)
    text = render(res, command)
    write_results(args.out, "aw_particles_weight_rules", text, res)
    return res


if __name__ == "__main__":
    main()
