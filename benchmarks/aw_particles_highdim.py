"""Particle realignment in high dimension: ONE latent = ONE sample, one weight per latent.

    python benchmarks/aw_particles_highdim.py              # full study: results/aw_particles_highdim.{md,json}
    python benchmarks/aw_particles_highdim.py --tiny --out /tmp/awh   # seconds, for the tests

Two worlds, each at SD1.5 size (latent 4×64×64, 16384 dimensions) and SDXL size (4×128×128, 65536),
sampled by the pack's particle path exactly as DeRaDiff KSampler runs it (weights per latent):

- *modes*: the hard world's 8 modes (radius 4, std 0.3, w = (1, 0.5)) embedded in the whole latent:
  mode means m_k = a_k·u1 + b_k·u2 for two random orthonormal directions u1, u2 spread over every
  element, isotropic std 0.3 in all dimensions, reward r = w1·(u1·x) + w2·(u2·x). A Gaussian
  mixture in 16k/65k dimensions; alignment reweights its modes.
- *product*: every pixel an independent hard-world point (channels 0-1) + filler, as in the
  per-point world, but now the whole latent is one sample of the product distribution (8^(H·W)
  modes), so its weight multiplies H·W per-pixel factors: the pessimistic case where the two
  models disagree independently everywhere in the image.

Reported per λ ∈ {0.25, 0.5, 1.5}: the ESS over the steps (mean over images, before resampling),
the number of resampling steps, and the E[r] error (per latent: E[r] of one sample; product: the
mean over its pixels) against the exact p_(β/λ), for plain DeRaDiff and N = 8 particles. For the
product world, two remedies (``REMEDIES``): tempering (Z_t^α, α < 1) and weighting and resampling
only in a window of noise levels.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

import aw_world as aw  # noqa: E402
from results_io import write_results  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# (label, window (σ_low, σ_high) or None, temper exponent)
REMEDIES = (("window σ ≥ 1", (1.0, 1e9), 1.0), ("window σ ≤ 1", (0.0, 1.0), 1.0), ("temper α = 0.05", None, 0.05))


@dataclass(frozen=True)
class Config:
    sizes: tuple = ((64, 64, 32, 8), (128, 128, 8, 2))  # (H, W, output latents: modes world, product world)
    steps: int = 30
    scheduler: str = "karras"
    sampler: str = "euler_ancestral"
    lambdas: tuple = (0.25, 0.5, 1.5)
    particles: int = 8
    worlds: tuple = ("modes", "product")
    beta: float = 1.0
    seed: int = 2026
    resample_below: float = 0.5
    remedies: bool = True


TINY = Config(sizes=((8, 8, 8, 8),), steps=6, lambdas=(0.5,), particles=4, remedies=False)


class LatentMixtureEps(torch.nn.Module):
    """eps network whose data is a Gaussian mixture over the WHOLE latent (flattened to D dimensions)."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture = mixture
        self.dtype = torch.float32

    def forward(self, x, timesteps, context=None, transformer_options={}, **kwargs):
        b = x.shape[0]
        sigma = transformer_options["sigmas"].to(torch.float64)
        sigma = sigma.repeat(b // sigma.shape[0])
        x64 = x.to(torch.float64) * torch.sqrt(sigma ** 2 + 1.0).reshape(-1, 1, 1, 1)  # undo calculate_input
        d = self.mixture.denoise(x64.reshape(b, -1), sigma).reshape(x.shape)
        return ((x64 - d) / sigma.reshape(-1, 1, 1, 1)).to(x.dtype)


def latent_world_model(mixture):
    import aw_comfy
    patcher = aw_comfy.world_model(lambda p, s: p)
    patcher.model.diffusion_model = LatentMixtureEps(mixture)
    return patcher


def modes_world(h, w, seed):
    """(reference mixture in D = 4·h·w dimensions, reward vector in D dimensions)."""
    ring = aw.ring(8, 4.0, (0.3,))
    d = 4 * h * w
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=aw.F64))
    u = q.T  # [2, D], orthonormal rows spread over every element
    ref = aw.Mixture.make(ring.means @ u, ring.s2, ring.weights)
    return ref, torch.tensor([1.0, 0.5], dtype=aw.F64) @ u


def ess_profile(state, steps):
    """Mean ESS (over images) at 5 points along the weighted steps, and the minimum."""
    rec = state.record
    if not rec:
        return []
    at = sorted({min(len(rec) - 1, round(f * (len(rec) - 1))) for f in (0, 0.25, 0.5, 0.75, 1.0)})
    return [(i, rec[i][0], rec[i][1]) for i in at]


def run_modes(pack, h, w, m, lam, cfg, log):
    import aw_comfy as ac
    import importlib
    ps = importlib.import_module(pack.__name__ + ".sampler.particle_sampler")
    ref, wv = modes_world(h, w, cfg.seed)
    target = ref.tilt(wv, cfg.beta / lam)
    exact = target.expected_reward(wv)
    sd = float(((target.means @ wv) ** 2 @ target.weights + target.s2 @ target.weights * float(wv @ wv)
                - exact ** 2) ** 0.5)
    pair = ac.make_pair(pack, latent_world_model(ref), latent_world_model(ref.tilt(wv, cfg.beta)), cfg.beta)
    latent = {"samples": torch.zeros(m, 4, h, w)}
    cond = ac.conditioning()
    lf = pair.reference.get_model_object("latent_format")

    def reward_and_modes(samples):
        x = lf.process_in(samples.to(torch.float64)).reshape(samples.shape[0], -1)
        r = x @ wv
        weights = torch.bincount(target.assign(x), minlength=target.k).to(aw.F64) / x.shape[0]
        return float(r.mean()) - exact, aw.total_variation(weights, target.weights)

    row = {"world": "modes", "size": f"4×{h}×{w}", "lam": lam, "m": m, "se": sd / math.sqrt(m)}
    t = time.perf_counter()
    plain = pack.nodes.DeRaDiffKSampler.execute(pair, cfg.seed, cfg.steps, 1.0, cfg.sampler, cfg.scheduler, cond, cond,
                                                 latent, 1.0, **{"lambda": lam}).result[0]["samples"]
    row["plain_err"], row["plain_tv"] = reward_and_modes(plain)
    out, state = ps.particle_ksampler(pair, lam, cfg.seed, cfg.steps, 1.0, cfg.sampler, cfg.scheduler, cond, cond,
                                      latent, 1.0, cfg.particles, cfg.resample_below)
    row["p_err"], row["p_tv"] = reward_and_modes(out["samples"])
    row.update(state.summary(), ess=ess_profile(state, cfg.steps), seconds=time.perf_counter() - t)
    return row


def run_product(pack, h, w, m, lam, cfg, log, window=None, temper=1.0, plain=True):
    import aw_comfy as ac
    import importlib
    ps = importlib.import_module(pack.__name__ + ".sampler.particle_sampler")
    from aw_difference_reuse import world
    ref, wv = world("hard")
    target = ref.tilt(wv, cfg.beta / lam)
    exact = target.expected_reward(wv)
    pair = ac.make_pair(pack, ac.world_model(ref.denoise), ac.world_model(ref.tilt(wv, cfg.beta).denoise), cfg.beta)
    latent = {"samples": torch.zeros(m, 4, h, w)}
    cond = ac.conditioning()

    def err(samples):
        x = ac.points_from_latent(pair.reference, samples)
        return float((x @ wv).mean()) - exact, aw.total_variation(aw.mode_weights(x, target), target.weights)

    # the Monte-Carlo error of E[r] is over m·h·w points here, far below the errors shown
    row = {"world": "product", "size": f"4×{h}×{w}", "lam": lam, "m": m, "se": None}
    t = time.perf_counter()
    if plain:
        base = pack.nodes.DeRaDiffKSampler.execute(pair, cfg.seed, cfg.steps, 1.0, cfg.sampler, cfg.scheduler, cond,
                                                    cond, latent, 1.0, **{"lambda": lam}).result[0]["samples"]
        row["plain_err"], row["plain_tv"] = err(base)
    out, state = ps.particle_ksampler(pair, lam, cfg.seed, cfg.steps, 1.0, cfg.sampler, cfg.scheduler, cond, cond,
                                      latent, 1.0, cfg.particles, cfg.resample_below, window=window, temper=temper)
    row["p_err"], row["p_tv"] = err(out["samples"])
    row.update(state.summary(), ess=ess_profile(state, cfg.steps), seconds=time.perf_counter() - t)
    return row


def run(cfg: Config, pack, log=print) -> dict:
    t0 = time.perf_counter()
    rows, remedies = [], []
    for h, w, m_modes, m_product in cfg.sizes:
        for lam in cfg.lambdas:
            for name in cfg.worlds:
                fn = run_modes if name == "modes" else run_product
                rows.append(fn(pack, h, w, m_modes if name == "modes" else m_product, lam, cfg, log))
                r = rows[-1]
                log(f"{name} 4×{h}×{w} λ={lam:g}: plain {r['plain_err']:+.3f} N={cfg.particles} {r['p_err']:+.3f} "
                    f"min ESS {r['min_ess']:.2f}, resampled {r['resamples']}x, {r['seconds']:.0f} s")
    if cfg.remedies and "product" in cfg.worlds:
        h, w, _, m = cfg.sizes[0]
        for lam in (0.5,):
            for label, window, temper in REMEDIES:
                r = run_product(pack, h, w, m, lam, cfg, log, window, temper, plain=False)
                r["remedy"] = label
                remedies.append(r)
                log(f"remedy {label} λ={lam:g}: {r['p_err']:+.3f} min ESS {r['min_ess']:.2f}")
    return {"config": asdict(cfg), "rows": rows, "remedies": remedies, "seconds": time.perf_counter() - t0}


def _ess_text(r):
    return ", ".join(f"{e:.1f}@σ{s:.2g}" for _, s, e in r["ess"]) or "–"


def render(res, command):
    cfg = res["config"]
    n = cfg["particles"]
    lines = [f"Measured by `{command}` ({res['seconds']:.0f} s on this machine's CPU): {cfg['sampler']}, "
             f"{cfg['scheduler']}, {cfg['steps']} steps, N = {n} particles per image, one weight per latent, resample "
             f"when ESS < {cfg['resample_below']:g}·N, seed {cfg['seed']}. ESS = mean over the images at 5 points of "
             "the weighted steps (σ of the step), before resampling; E[r] err against the exact p_(β/λ); "
             "TV = mode total variation.", "",
             f"| world | latent | λ | outputs | SE | E[r] err DeRaDiff | N={n} | mode TV DeRaDiff / N={n} | min ESS | "
             "resampled | ESS over the steps |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        se = f"{r['se']:.3f}" if r.get("se") else "–"
        lines.append(f"| {r['world']} | {r['size']} | {r['lam']:g} | {r['m']} | {se} | {r['plain_err']:+.3f} | "
                     f"{r['p_err']:+.3f} | {r['plain_tv']:.3f} / {r['p_tv']:.3f} | {r['min_ess']:.2f} | "
                     f"{r['resamples']} | {_ess_text(r)} |")
    if res["remedies"]:
        lines += ["", f"Remedies in the product world ({res['remedies'][0]['size']}, N = {n}):", "",
                  "| remedy | λ | E[r] err | mode TV | min ESS | resampled |", "|---|---|---|---|---|---|"]
        for r in res["remedies"]:
            lines.append(f"| {r['remedy']} | {r['lam']:g} | {r['p_err']:+.3f} | {r['p_tv']:.3f} | {r['min_ess']:.2f} | "
                         f"{r['resamples']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TINY if args.tiny else Config()
    from alignment_world import setup
    pack = setup()
    res = run(cfg, pack)
    command = "python benchmarks/aw_particles_highdim.py" + (" --tiny" if args.tiny else "")
    section = render(res, command)
    write_results(args.out, "aw_particles_highdim", section, res)
    return res


if __name__ == "__main__":
    main()
