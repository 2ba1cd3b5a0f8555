"""Does λ really emulate β/λ?  DeRaDiff measured in a world where the answer is known exactly.

    python benchmarks/alignment_world.py            # full run: docs/alignment_world.md + PNGs in results/
    python benchmarks/alignment_world.py --tiny --out /tmp/aw --no-readme   # seconds, for the tests

Reference data: a ring of 8 Gaussian modes in the plane; reward r(x) = w.x. The KL-regularised
optimum p_beta ~ p_ref * exp(r/beta) is again a Gaussian mixture in closed form (aw_world.py), so
every "model aligned from scratch at beta" has an exact sampler, exact expected reward and an
exact ideal denoiser at every noise level. Those denoisers are wrapped as real ComfyUI models
(aw_comfy.py) and sampled with the pack's DeRaDiff KSampler node and ComfyUI's own KSampler, so
the pack's real sampling path is what gets measured. A pair of small trained MLP denoisers adds
the cheap alternative, parameter-space (weight) interpolation.

Writes alignment_world.md, alignment_world.json and three PNGs to --out (default
benchmarks/results/) and, unless --no-readme, the markdown into docs/alignment_world.md between the
alignment-world markers. Runs on the CPU, single-threaded by default (--threads).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

import aw_world as aw  # noqa: E402

START, END = "<!-- alignment-world:start -->", "<!-- alignment-world:end -->"
RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "alignment_world.md"  # the page that holds the section between START and END
GAUSSIAN_LAMBDAS = (0.5, 1.5, 3.0)


@dataclass(frozen=True)
class Config:
    points: int = 16384  # points per sampling run (one latent 128x128)
    steps: int = 30
    scheduler: str = "karras"
    samplers: tuple = ("euler_ancestral", "euler", "dpmpp_2m", "dpmpp_2m_sde")
    lambdas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    beta: float = 1.0  # the anchor: the aligned model of the pair is p_beta
    reward_norm: float = 1.0
    reward_angle_deg: float = 75.0
    ring_modes: int = 8
    ring_radius: float = 1.3
    ring_std: tuple = (0.15, 0.2)
    seed: int = 2026
    mlp_hidden: int = 128
    mlp_depth: int = 3
    mlp_steps: int = 2500  # reference MLP training steps
    mlp_finetune_steps: int = 800  # each fine-tune of a copy (aligned at beta, and at every beta/lambda)
    mlp_batch: int = 1024
    gaussian_points: int = 1024


TINY = Config(points=256, steps=4, mlp_hidden=16, mlp_depth=2, mlp_steps=20, mlp_finetune_steps=10,
              mlp_batch=128, gaussian_points=64)


# -- the world ---------------------------------------------------------------------------
class World:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ref = aw.ring(cfg.ring_modes, cfg.ring_radius, cfg.ring_std)
        a = math.radians(cfg.reward_angle_deg)
        self.w = cfg.reward_norm * torch.tensor([math.cos(a), math.sin(a)], dtype=aw.F64)
        # modes listed best first (by w.m_k): the order of every weight vector in the report
        self.order = torch.argsort(self.ref.means @ self.w, descending=True)

    def beta_eff(self, lam: float) -> float:
        return self.cfg.beta / lam if lam > 0 else math.inf

    def target(self, lam: float) -> aw.Mixture:
        """The model aligned from scratch at beta/lam (lam = 0: the reference)."""
        return self.ref.tilt(self.w, self.beta_eff(lam))

    def reward(self, x) -> torch.Tensor:
        return x @ self.w

    def evaluate(self, x: torch.Tensor, lam: float, exact_set: torch.Tensor) -> dict:
        tgt = self.target(lam)
        weights = aw.mode_weights(x, tgt)
        return {"reward": float(self.reward(x).mean()),
                "sw": aw.sliced_wasserstein(x, exact_set),
                "tv": aw.total_variation(weights, tgt.weights),
                "weights": weights[self.order].tolist()}


# -- ComfyUI -----------------------------------------------------------------------------
def setup():
    """ComfyUI imported in this process on the CPU, and the pack loaded as a custom node."""
    import comfyui_runtime
    root = comfyui_runtime.comfyui_root()
    if not (root / "main.py").exists():
        comfyui_runtime.install_comfyui(root)
    comfyui_runtime.add_to_path(root, cpu=True)
    import conftest
    pack = conftest.load_pack()
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    return pack


def run(cfg: Config, pack, log=print) -> tuple[dict, dict]:
    """All measurements; returns (results for the report, sample sets for the plots)."""
    import aw_comfy as ac
    world = World(cfg)
    n, lams = cfg.points, cfg.lambdas
    latent = ac.empty_latent(n)
    samples = {"exact": {}, "scratch": {}, "deradiff": {}, "finetuned": {}, "interp": {}, "deradiff_mlp": {}}
    res = {"config": asdict(cfg), "lambdas": list(lams)}
    t_start = time.perf_counter()

    # exact p_(beta/lam): its closed-form reward, a reference sample set and the noise floors
    gen = torch.Generator().manual_seed(cfg.seed)
    exact_sets, exact = {}, []
    for lam in lams:
        tgt = world.target(lam)
        a, b = tgt.sample(n, gen), tgt.sample(n, gen)
        exact_sets[lam] = a
        samples["exact"][lam] = a
        r = world.reward(a)
        exact.append({"lam": lam, "beta_eff": world.beta_eff(lam), "reward": tgt.expected_reward(world.w),
                      "reward_se": float(r.std() / math.sqrt(n)), "sw_floor": aw.sliced_wasserstein(b, a),
                      "tv_floor": aw.total_variation(aw.mode_weights(b, tgt), tgt.weights),
                      "weights": tgt.weights[world.order].tolist()})
    res["exact"] = exact

    def points(patcher, latent_out):
        return ac.points_from_latent(patcher, latent_out)

    # single Gaussian: DeRaDiff must be exact (path by path, same seed)
    t0 = time.perf_counter()
    g_ref = aw.gaussian([0.4, -0.3], 0.25)
    g_pair = ac.make_pair(pack, ac.world_model(g_ref.denoise), ac.world_model(g_ref.tilt(world.w, cfg.beta).denoise),
                          cfg.beta)
    g_latent = ac.empty_latent(cfg.gaussian_points)
    g_max, g_gap, g_cases = 0.0, math.inf, 0
    for sampler in cfg.samplers:
        aligned_only = points(g_pair.reference, ac.sample_plain(g_pair.aligned, g_latent, sampler, cfg.steps, cfg.seed,
                                                                cfg.scheduler))
        for lam in GAUSSIAN_LAMBDAS:
            d = points(g_pair.reference, ac.sample_deradiff(pack, g_pair, lam, g_latent, sampler, cfg.steps, cfg.seed,
                                                            cfg.scheduler))
            truth = ac.world_model(g_ref.tilt(world.w, cfg.beta / lam).denoise)
            s = points(truth, ac.sample_plain(truth, g_latent, sampler, cfg.steps, cfg.seed, cfg.scheduler))
            g_max = max(g_max, float((d - s).abs().max()))
            g_gap = min(g_gap, float((d - aligned_only).abs().max()))
            g_cases += 1
    res["gaussian"] = {"max_abs_diff": g_max, "min_gap_to_aligned": g_gap, "cases": g_cases,
                       "lambdas": list(GAUSSIAN_LAMBDAS)}
    log(f"single Gaussian: max |DeRaDiff - from scratch| = {g_max:.2e} over {g_cases} runs "
        f"({time.perf_counter() - t0:.1f} s)")

    # the ring: ideal denoisers
    t0 = time.perf_counter()
    models = {lam: ac.world_model(world.target(lam).denoise) for lam in lams}
    pair = ac.make_pair(pack, models[0.0] if 0.0 in models else ac.world_model(world.ref.denoise),
                        models[1.0] if 1.0 in models else ac.world_model(world.target(1.0).denoise), cfg.beta)
    ideal = {}
    for si, sampler in enumerate(cfg.samplers):
        rows = []
        for lam in lams:
            xs = points(models[lam], ac.sample_plain(models[lam], latent, sampler, cfg.steps, cfg.seed, cfg.scheduler))
            xd = points(pair.reference, ac.sample_deradiff(pack, pair, lam, latent, sampler, cfg.steps, cfg.seed,
                                                           cfg.scheduler))
            rows.append({"lam": lam, "scratch": world.evaluate(xs, lam, exact_sets[lam]),
                         "deradiff": world.evaluate(xd, lam, exact_sets[lam]),
                         "path_gap": float((xd - xs).norm(dim=1).mean())})
            if si == 0:
                samples["scratch"][lam], samples["deradiff"][lam] = xs, xd
        ideal[sampler] = rows
        log(f"ideal denoisers, {sampler}: done ({time.perf_counter() - t0:.1f} s)")
    res["ideal"] = ideal

    # trained MLP denoisers: weight interpolation vs DeRaDiff on the same pair
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    sigma_data = float(((world.ref.means - world.ref.mean()) ** 2).sum(1) @ world.ref.weights / 2
                       + world.ref.weights @ world.ref.s2) ** 0.5
    ref_net = aw.MLPDenoiser(cfg.mlp_hidden, cfg.mlp_depth, sigma_data)
    ref_curve = aw.train_denoiser(ref_net, world.ref, cfg.mlp_steps, gen, batch=cfg.mlp_batch)

    def finetune(lam):
        net = copy.deepcopy(ref_net)
        curve = aw.train_denoiser(net, world.target(lam), cfg.mlp_finetune_steps, gen, batch=cfg.mlp_batch, lr=5e-4)
        return net, curve

    finetuned, ft_curves = {0.0: ref_net}, {}
    for lam in [1.0] + [x for x in lams if x not in (0.0, 1.0)]:
        finetuned[lam], ft_curves[lam] = finetune(lam)
    for net in finetuned.values():
        net.requires_grad_(False).eval()
    t_train = time.perf_counter() - t0
    log(f"MLPs trained ({t_train:.1f} s)")
    mlp_sampler = cfg.samplers[0]
    mlp_pair = ac.make_pair(pack, ac.world_model(ref_net), ac.world_model(finetuned[1.0]), cfg.beta)
    mlp_rows = []
    for lam in lams:
        ft_model = ac.world_model(finetuned[lam])
        interp_model = ac.world_model(aw.interpolate_weights(ref_net, finetuned[1.0], lam))
        xf = points(ft_model, ac.sample_plain(ft_model, latent, mlp_sampler, cfg.steps, cfg.seed, cfg.scheduler))
        xi = points(interp_model, ac.sample_plain(interp_model, latent, mlp_sampler, cfg.steps, cfg.seed,
                                                  cfg.scheduler))
        xd = points(mlp_pair.reference, ac.sample_deradiff(pack, mlp_pair, lam, latent, mlp_sampler, cfg.steps,
                                                           cfg.seed, cfg.scheduler))
        mlp_rows.append({"lam": lam, "finetuned": world.evaluate(xf, lam, exact_sets[lam]),
                         "interp": world.evaluate(xi, lam, exact_sets[lam]),
                         "deradiff": world.evaluate(xd, lam, exact_sets[lam])})
        samples["finetuned"][lam], samples["interp"][lam], samples["deradiff_mlp"][lam] = xf, xi, xd
    res["mlp"] = {"sampler": mlp_sampler, "rows": mlp_rows, "train_s": t_train,
                  "ref_final_loss": ref_curve[-1], "aligned_final_loss": ft_curves[1.0][-1],
                  "sigma_data": sigma_data}
    log(f"MLP sampling: done ({time.perf_counter() - t0:.1f} s)")
    res["measure_s"] = time.perf_counter() - t_start
    res["world"] = {"means": world.ref.means.tolist(), "s2": world.ref.s2.tolist(), "w": world.w.tolist(),
                    "order": world.order.tolist()}
    return res, samples


# -- report ------------------------------------------------------------------------------
def f3(x, signed=False):
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def lam_s(lam):
    return f"{lam:g}"


def beta_s(b):
    return "∞" if b is None or math.isinf(b) else f"{b:.3g}"


def summary_facts(res):
    """The numbers the prose quotes, computed (never typed in)."""
    lams, exact = res["lambdas"], res["exact"]
    facts = {}
    gaps, sc_err = [], []
    above_gt1 = below_lt1 = n_gt1 = n_lt1 = 0
    for sampler, rows in res["ideal"].items():
        for row, ex in zip(rows, exact):
            gap = row["deradiff"]["reward"] - row["scratch"]["reward"]
            gaps.append((abs(gap), gap, sampler, row["lam"]))
            sc_err.append((abs(row["scratch"]["reward"] - ex["reward"]), sampler, row["lam"]))
            if row["lam"] > 1:
                n_gt1 += 1
                above_gt1 += gap > 0
            elif 0 < row["lam"] < 1:
                n_lt1 += 1
                below_lt1 += gap < 0
    facts["gap"] = max(gaps)
    facts["gain"] = abs(exact[-1]["reward"] - exact[0]["reward"]) or 1.0
    ends = [row for rows in res["ideal"].values() for row in rows if row["lam"] in (0.0, 1.0)]
    facts["ends_equal"] = (bool(ends) and all(row["path_gap"] == 0.0 for row in ends), len(ends))
    facts["scratch_err"] = max(sc_err)
    facts["above_gt1"], facts["n_gt1"], facts["below_lt1"], facts["n_lt1"] = above_gt1, n_gt1, below_lt1, n_lt1
    main = next(iter(res["ideal"]))
    last = len(lams) - 1
    facts["top"] = (lams[last], exact[last]["weights"][0], res["ideal"][main][last]["scratch"]["weights"][0],
                    res["ideal"][main][last]["deradiff"]["weights"][0], main)
    tv_d = [(row["deradiff"]["tv"], s, row["lam"]) for s, rows in res["ideal"].items() for row in rows]
    tv_s = [(row["scratch"]["tv"], s, row["lam"]) for s, rows in res["ideal"].items() for row in rows]
    facts["tv_d"], facts["tv_s"] = max(tv_d), max(tv_s)
    mlp = res["mlp"]["rows"]
    facts["mlp_err"] = {k: max(abs(r[k]["reward"] - e["reward"]) for r, e in zip(mlp, exact))
                        for k in ("finetuned", "interp", "deradiff")}
    inner = [(r, e) for r, e in zip(mlp, exact) if r["lam"] not in (0.0, 1.0)]
    facts["mlp_closer"] = sum(abs(r["deradiff"]["reward"] - r["finetuned"]["reward"])
                              < abs(r["interp"]["reward"] - r["finetuned"]["reward"]) for r, _ in inner)
    facts["mlp_inner"] = len(inner)
    ideal_main = res["ideal"].get(res["mlp"]["sampler"])
    facts["mlp_vs_ideal"] = None if not ideal_main else max(
        abs(r["deradiff"]["reward"] - i["deradiff"]["reward"]) for r, i in zip(mlp, ideal_main))
    facts["mlp_sw"] = {k: sum(r[k]["sw"] for r, _ in inner) / max(len(inner), 1)
                       for k in ("finetuned", "interp", "deradiff")}
    return facts


def render(res, image_prefix="", runtime=None) -> str:
    cfg, lams, exact = res["config"], res["lambdas"], res["exact"]
    samplers = list(res["ideal"])
    main = samplers[0]
    fx = summary_facts(res)
    g = res["gaussian"]
    L = []
    tiny = " **(--tiny run: toy sizes, numbers meaningless)**" if cfg["points"] < 4096 else ""
    L.append(f"Ground truth from a world where everything is known in closed form, regenerated by "
             f"`python benchmarks/alignment_world.py`{tiny}"
             + (f" ({runtime:.0f} s on this machine's CPU)." if runtime else "."))
    L.append("")
    L.append(f"**World.** Reference data p_ref: {cfg['ring_modes']} Gaussian modes on a ring of radius "
             f"{cfg['ring_radius']:g} (std alternating {' / '.join(f'{s:g}' for s in cfg['ring_std'])}, equal "
             f"weights). Reward r(x) = w·x, |w| = {cfg['reward_norm']:g} at {cfg['reward_angle_deg']:g}°. The "
             "KL-regularised optimum p_β ∝ p_ref·exp(r/β) is again a mixture: mode k moves to m_k + s_k²w/β and "
             "its weight becomes ∝ π_k·exp(w·m_k/β + s_k²|w|²/(2β²)); its ideal denoiser at every noise "
             "level is the posterior-weighted mean of the noised mixture. The pair is (p_ref, p_β) with anchor "
             f"β = {cfg['beta']:g}; λ emulates β/λ. The ideal denoisers are wrapped as real ComfyUI models "
             "(SD1.5 eps model and noise schedule, network replaced by the closed form): each pixel of a "
             f"[1, 4, H, W] latent is one point in channels 0–1 (channels 2–3 are an independent N(0, 1) filler "
             f"with its exact denoiser), so one sampling run draws N = {cfg['points']} points. DeRaDiff is the "
             f"pack's `DeRaDiffKSampler` node; *from scratch* is ComfyUI's `KSampler` on the ideal p_(β/λ) model "
             f"with the same sampler, seed and {cfg['steps']} {cfg['scheduler']} steps (cfg 1), so it isolates the "
             "sampler's own error.")
    L.append("")
    L.append(f"**Single Gaussian (exactness check).** With a one-mode world, DeRaDiff's sample paths equal the "
             f"from-scratch p_(β/λ) paths to max |Δ| = {g['max_abs_diff']:.1e} over {g['cases']} runs "
             f"({len(samplers)} samplers × λ ∈ {{{', '.join(lam_s(x) for x in g['lambdas'])}}}), while they differ "
             f"from the aligned model's paths by at least {g['min_gap_to_aligned']:.2f}: exact up to float32.")
    L.append("")
    L.append(f"**Ring of modes, ideal denoisers, {main}.** E[r] errors are against the exact value (± = standard "
             "error of a mean over N points). SW₂ = sliced 2-Wasserstein distance to an exact sample set of the "
             "same size; mode TV = total-variation distance between the fraction of points per mode and the exact "
             "mode weights. *floor* = the same distance for an independent exact sample set (pure sampling "
             "noise).")
    L.append("")
    L.append("| λ | β/λ | E[r] exact (±) | from scratch − exact | DeRaDiff − exact | DeRaDiff − from scratch "
             "| SW₂ scratch | SW₂ DeRaDiff | SW₂ floor | mode TV scratch | mode TV DeRaDiff | TV floor |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row, ex in zip(res["ideal"][main], exact):
        sc, de = row["scratch"], row["deradiff"]
        L.append(f"| {lam_s(row['lam'])} | {beta_s(ex['beta_eff'])} | {f3(ex['reward'])} (±{ex['reward_se']:.3f}) "
                 f"| {f3(sc['reward'] - ex['reward'], True)} | {f3(de['reward'] - ex['reward'], True)} "
                 f"| {f3(de['reward'] - sc['reward'], True)} | {f3(sc['sw'])} | {f3(de['sw'])} | {f3(ex['sw_floor'])} "
                 f"| {f3(sc['tv'])} | {f3(de['tv'])} | {f3(ex['tv_floor'])} |")
    L.append("")
    L.append("**All samplers.** Each cell: E[r] error vs exact, from scratch → DeRaDiff; then mode TV, "
             "from scratch → DeRaDiff.")
    L.append("")
    L.append("| λ | " + " | ".join(f"{s}: E[r] err" for s in samplers) + " | "
             + " | ".join(f"{s}: mode TV" for s in samplers) + " |")
    L.append("|---|" + "---|" * (2 * len(samplers)))
    for i, ex in enumerate(exact):
        cells = [f"{f3(res['ideal'][s][i]['scratch']['reward'] - ex['reward'], True)} → "
                 f"{f3(res['ideal'][s][i]['deradiff']['reward'] - ex['reward'], True)}" for s in samplers]
        cells += [f"{f3(res['ideal'][s][i]['scratch']['tv'])} → {f3(res['ideal'][s][i]['deradiff']['tv'])}"
                  for s in samplers]
        L.append(f"| {lam_s(ex['lam'])} | " + " | ".join(cells) + " |")
    L.append("")
    L.append(f"**Mode weights** (%, modes sorted by reward w·m_k, best first; {main}):")
    L.append("")
    k = len(exact[0]["weights"])
    L.append("| λ | source | " + " | ".join(f"mode {j + 1}" for j in range(k)) + " |")
    L.append("|---|---|" + "---|" * k)
    show = [i for i, lam in enumerate(lams) if lam in (0.5, 1.0, 2.0, 3.0)] or list(range(len(lams)))
    for i in show:
        row = res["ideal"][main][i]
        for name, ws in (("exact", exact[i]["weights"]), ("from scratch", row["scratch"]["weights"]),
                         ("DeRaDiff", row["deradiff"]["weights"])):
            L.append(f"| {lam_s(lams[i])} | {name} | " + " | ".join(f"{100 * v:.1f}" for v in ws) + " |")
    L.append("")
    m = res["mlp"]
    L.append(f"**Trained MLP denoisers: weight interpolation vs DeRaDiff** ({m['sampler']}). A small MLP denoiser "
             f"trained on p_ref samples ({cfg['mlp_steps']} steps, {m['train_s']:.0f} s for all MLPs), a copy "
             f"fine-tuned on p_β samples ({cfg['mlp_finetune_steps']} steps); *weight interp.* samples the MLP "
             "with parameters (1-λ)·θ_ref + λ·θ_β, *DeRaDiff* mixes the two MLPs' denoisers, *fine-tuned at "
             "β/λ* is a copy of the reference MLP fine-tuned on p_(β/λ) samples with the same budget (the "
             "trained world's \"aligned from scratch\"). E[r] errors vs exact.")
    L.append("")
    L.append("| λ | β/λ | E[r] exact | fine-tuned at β/λ | weight interp. | DeRaDiff | SW₂ fine-tuned "
             "| SW₂ weight interp. | SW₂ DeRaDiff | mode TV fine-tuned | mode TV weight interp. "
             "| mode TV DeRaDiff |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row, ex in zip(m["rows"], exact):
        ft, wi, de = row["finetuned"], row["interp"], row["deradiff"]
        L.append(f"| {lam_s(row['lam'])} | {beta_s(ex['beta_eff'])} | {f3(ex['reward'])} "
                 f"| {f3(ft['reward'] - ex['reward'], True)} | {f3(wi['reward'] - ex['reward'], True)} "
                 f"| {f3(de['reward'] - ex['reward'], True)} | {f3(ft['sw'])} | {f3(wi['sw'])} | {f3(de['sw'])} "
                 f"| {f3(ft['tv'])} | {f3(wi['tv'])} | {f3(de['tv'])} |")
    L.append("")
    L.append(f"![expected reward vs λ]({image_prefix}alignment_world_reward.png)")
    L.append("")
    L.append(f"![samples]({image_prefix}alignment_world_samples.png)")
    L.append("")
    L.append("(Samples: up to 1 500 of the N points per panel; + marks the mode centres of p_(β/λ), w the reward "
             "direction. Bars: mode weights, modes sorted by reward.)")
    L.append("")
    L.append(f"![mode weights]({image_prefix}alignment_world_modes.png)")
    L.append("")
    gap_abs, gap, gap_s, gap_l = fx["gap"]
    sc_abs, sc_s, sc_l = fx["scratch_err"]
    lam_top, w_ex, w_sc, w_de, top_s = fx["top"]
    me = fx["mlp_err"]
    L.append("**What the numbers say.**")
    ends_equal, n_ends = fx["ends_equal"]
    L.append(f"- Exact where the theory says so: a single Gaussian (max |Δ| {g['max_abs_diff']:.0e} against "
             f"paths of size ~1)" + (f"; at λ = 0 and 1 (one model runs) the DeRaDiff samples are bit-identical to "
                                     f"the from-scratch ones in all {n_ends} runs." if ends_equal else
                                     "; at λ = 0 and 1, however, DeRaDiff and from-scratch samples differ "
                                     "(unexpected: see the tables)."))
    L.append(f"- Not exact when the tilt reweights modes. The per-step mix does move mass toward the rewarded "
             "modes, but not by the factor exp(r/β) prescribes: the two models' posterior responsibilities are "
             "combined linearly in λ, while the target's are tilted exponentially in 1/β. Relative to the same "
             f"sampler on the exact p_(β/λ) model, DeRaDiff's E[r] is higher for λ > 1 (over-concentration on the "
             f"best modes) in {fx['above_gt1']} of {fx['n_gt1']} sampler×λ cells and lower for 0 < λ < 1 in "
             f"{fx['below_lt1']} of {fx['n_lt1']}. Largest |E[r] DeRaDiff − from scratch|: {gap_abs:.3f} ({gap_s}, "
             f"λ = {lam_s(gap_l)}), i.e. {100 * gap_abs / fx['gain']:.0f}% of the exact gain E[r](λ = "
             f"{lam_s(lams[-1])}) − E[r](λ = 0); the sampler's own largest error (from scratch vs exact) is "
             f"{sc_abs:.3f} ({sc_s}, λ = {lam_s(sc_l)}).")
    L.append(f"- Mode weights: at λ = {lam_s(lam_top)} the best mode holds {100 * w_ex:.1f}% of p_(β/λ), "
             f"{100 * w_sc:.1f}% from scratch and {100 * w_de:.1f}% with DeRaDiff ({top_s}). Largest mode TV: "
             f"DeRaDiff {fx['tv_d'][0]:.3f} ({fx['tv_d'][1]}, λ = {lam_s(fx['tv_d'][2])}), from scratch "
             f"{fx['tv_s'][0]:.3f} ({fx['tv_s'][1]}, λ = {lam_s(fx['tv_s'][2])}).")
    L.append(f"- Trained pair: largest |E[r] error| over λ: fine-tuned at β/λ {me['finetuned']:.3f}, weight "
             f"interpolation {me['interp']:.3f}, DeRaDiff {me['deradiff']:.3f}. For λ ∉ {{0, 1}} DeRaDiff's E[r] "
             f"is closer to the fine-tuned-at-β/λ model's than weight interpolation's in {fx['mlp_closer']} of "
             f"{fx['mlp_inner']} cases; mean SW₂ there: fine-tuned {fx['mlp_sw']['finetuned']:.3f}, weight "
             f"interpolation {fx['mlp_sw']['interp']:.3f}, DeRaDiff {fx['mlp_sw']['deradiff']:.3f}."
             + ("" if fx["mlp_vs_ideal"] is None else
                f" DeRaDiff's E[r] on the trained pair stays within {fx['mlp_vs_ideal']:.3f} of DeRaDiff's on the "
                "ideal pair (same sampler and seed): its error is mostly the mixing rule's, not the MLPs'."))
    return "\n".join(L) + "\n"


def plots(res, samples, out: Path):
    import aw_plots as ap
    world = World(Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["config"].items()}))
    lams, exact = res["lambdas"], res["exact"]
    dense = [i * max(lams) / 120 for i in range(121)]
    curve = (dense, [world.target(x).expected_reward(world.w) for x in dense])
    samplers = list(res["ideal"])
    shapes = ["o", "^", "s", "x", "o"]
    ideal_series = [(f"from scratch ({samplers[0]})", ap.COLORS["scratch"], "o",
                     [r["scratch"]["reward"] for r in res["ideal"][samplers[0]]], True)]
    for i, s in enumerate(samplers):
        ideal_series.append((f"DeRaDiff ({s})", ap.SAMPLER_SHADES[i % len(ap.SAMPLER_SHADES)], shapes[i % 5],
                             [r["deradiff"]["reward"] for r in res["ideal"][s]], False))
    rows = res["mlp"]["rows"]
    mlp_series = [
        ("MLP fine-tuned at β/λ", ap.COLORS["finetuned"], "o", [r["finetuned"]["reward"] for r in rows], True),
        ("weight interpolation", ap.COLORS["interp"], "s", [r["interp"]["reward"] for r in rows], False),
        ("DeRaDiff (MLP pair)", ap.COLORS["deradiff"], "^", [r["deradiff"]["reward"] for r in rows], False)]
    ap.reward_plot(out / "alignment_world_reward.png", lams, curve,
                   [("ideal denoisers: DeRaDiff vs exact", ideal_series),
                    (f"trained MLPs ({res['mlp']['sampler']})", mlp_series)])
    col_labels = [f"λ={lam_s(x)}  β/λ={beta_s(world.beta_eff(x))}" if len(lams) <= 4 else f"λ={lam_s(x)}"
                  for x in lams]
    row_defs = [("exact p_(β/λ)", "exact"), (f"from scratch\n(ideal, {samplers[0]})", "scratch"),
                (f"DeRaDiff\n(ideal, {samplers[0]})", "deradiff"), ("MLP fine-tuned\nat β/λ", "finetuned"),
                ("MLP weight\ninterpolation", "interp"), ("DeRaDiff\n(MLP pair)", "deradiff_mlp")]
    centers = [world.target(x).means for x in lams]
    ap.samples_plot(out / "alignment_world_samples.png", col_labels,
                    [(label, [samples[key].get(x) for x in lams]) for label, key in row_defs],
                    (-2.2, 2.2), centers, (world.w / world.w.norm()).tolist())
    main = samplers[0]
    panels = []
    for i, lam in enumerate(lams):
        if lam in (0.5, 1.0, 2.0, 3.0) or len(lams) <= 2:
            row = res["ideal"][main][i]
            panels.append((f"λ = {lam_s(lam)} ({main})", [
                ("exact", ap.COLORS["exact"], exact[i]["weights"]),
                ("from scratch", ap.COLORS["scratch"], row["scratch"]["weights"]),
                ("DeRaDiff", ap.COLORS["deradiff"], row["deradiff"]["weights"])]))
    ap.mode_plot(out / "alignment_world_modes.png", panels, len(exact[0]["weights"]))


def _finite(obj):
    """JSON without Infinity: an infinite beta/lambda (lambda = 0) is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_readme(section: str, readme: Path = DOC):
    """Replace the text between START and END in ``readme`` (default: docs/alignment_world.md)."""
    text = readme.read_text(encoding="utf-8")
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"{readme}: the markers {START} ... {END} are missing")
    readme.write_text(text[:i + len(START)] + "\n" + section + text[j:], encoding="utf-8")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="few points, few steps, tiny MLP training (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the markdown, JSON and PNGs")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the section of docs/alignment_world.md")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Should have .*")  # torchsde's BrownianTree at sigma = 0
    cfg = TINY if args.tiny else Config()
    pack = setup()
    res, samples = run(cfg, pack)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    plots(res, samples, out)
    runtime = time.perf_counter() - t0
    res["runtime_s"] = runtime
    (out / "alignment_world.json").write_text(json.dumps(_finite(res), indent=1), encoding="utf-8")
    (out / "alignment_world.md").write_text(render(res, "", runtime), encoding="utf-8")
    if not args.no_readme:
        prefix = os.path.relpath(out, DOC.parent).replace(os.sep, "/") + "/"  # image links relative to the page
        write_readme(render(res, prefix, runtime))
    print(render(res, "", runtime))
    print(f"wrote {out} in {runtime:.1f} s" + ("" if args.no_readme else f" and {DOC.relative_to(REPO)}"))


if __name__ == "__main__":
    main()
