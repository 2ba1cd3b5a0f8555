"""λ Search precision measured where the optimum is known: the alignment world, noisy repetitions.

    python benchmarks/aw_lambda_search.py --compare-commit 2df238a   # full run (~5 min on 2 busy cores):
                                  # results/aw_lambda_search.{md,json}; also the search as of commit 2df238a
                                  # (before issue 20, item 8) on the same samples
    python benchmarks/aw_lambda_search.py --fresh-reps 120 --bank /tmp/awl_bank.pt --out DIR
                                  # more repetitions with new seeds; --bank keeps the swept samples for reruns
    python benchmarks/aw_lambda_search.py --tiny --out /tmp/awl      # seconds, for the tests

The world is not the ring of docs/alignment_world.md (8 modes, radius 1.3, std 0.15/0.2, reward at 75°, β = 1): here 5
modes on a circle of radius 2 with std 0.35/0.25, the pair's reward w = 1.2·(cos 20°, sin 20°) and
anchor β = 0.8. Its closed-form Gaussian-mixture denoisers are real ComfyUI models (aw_comfy.py) and
every sample comes from the pack's batched λ sweep (sampler/sweep.py, what λ Search runs), dpmpp_2m,
20 karras steps.

Samples: every λ a search can ask for or return (sampler/lambda_search.py's GRID_POINTS grid over [lo, hi],
whose every other point is its proposal grid, and the first pass's evenly spaced λ) is swept once with
one seed for a latent batch of ``reps`` × ``groups`` elements ("images") of ``points_per_group`` points
each; as in the node, element j starts from the same noise at every λ. One search repetition is given
``groups`` of these elements (2 prompts × 4 seeds by default): one score per element = the mean objective
over its points, what the node's evaluate() hands the search (one score per prompt × seed). Two noise regimes:
  - *node*: repetition r owns its ``groups`` elements at every λ (one seed for the whole search, as the
    node samples: the scores at nearby λ are strongly correlated);
  - *fresh*: every evaluation is given ``groups`` elements drawn at random (new seeds for every λ:
    independent noise, the Gaussian process's own assumption; an element recurs in another evaluation
    with probability 1/reps each).
Objectives (per point; exact = the mean over every swept point at that λ, the realised optimum its
argmax on the grid):
  - *target*: −|x − t|², t = the exact mean of p_(β/λ_t) at λ_t = ``target_lambda`` (noise large near
    λ = 0, where the samples spread over the ring, small near the optimum);
  - *reward−KL*: u·x − γ·log(p_(β/λ)(x)/p_ref(x)) with a gold reward u = 1.2·(cos 55°, sin 55°) that
    is not the pair's (the log ratio is closed form in this world: w·x·λ/β − log Z(β/λ)); its mean is
    E[u·x] − γ·KL(p_(β/λ) ‖ p_ref) on the exact tilted family, flat near its maximum.
Criteria (issue 20, item 8): target: |λ̂ − λ*| ≤ 0.05; reward−KL: J(λ*) − J(λ̂) ≤ one evaluation's
standard error at λ* (the spread of the ``groups`` scores at λ* / √groups, over every repetition).
For scale, per repetition in the node regime: the argmax of its own mean scores at every swept λ (an
unlimited budget with the same seeds, no smoothing).
Optimisers: this checkout's sampler/lambda_search.py; the same with one score variance pooled over λ
(what the per-λ variance adds); and any --compare-commit / --compare-module version.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import tempfile
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
PACK = "comfyui_deradiff"
F64 = aw.F64


@dataclass(frozen=True)
class Config:
    modes: int = 5
    radius: float = 2.0
    stds: tuple = (0.35, 0.25)
    phase: float = 0.3
    reward_norm: float = 1.2
    reward_angle_deg: float = 20.0
    beta: float = 0.8
    sampler: str = "dpmpp_2m"
    scheduler: str = "karras"
    steps: int = 20
    seed: int = 2027
    lo: float = 0.0
    hi: float = 3.0
    reps: int = 30
    groups: int = 8  # scores per λ evaluation: 2 prompts x 4 seeds
    points_per_group: int = 256  # points per score ("image")
    budget: int = 12
    per_pass: int = 3
    initial: int = 4
    target_lambda: float = 0.8
    gold_norm: float = 1.2
    gold_angle_deg: float = 55.0
    kl_gamma: float = 0.5
    lambdas_per_sweep: int = 25
    search_seed: int = 1  # the fresh regime's draws


TINY = Config(steps=10, reps=3, points_per_group=4, lambdas_per_sweep=101)


# -- the world and its objectives --------------------------------------------------------------
class World:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ref = aw.ring(cfg.modes, cfg.radius, cfg.stds, phase=cfg.phase)
        a = math.radians(cfg.reward_angle_deg)
        self.w = cfg.reward_norm * torch.tensor([math.cos(a), math.sin(a)], dtype=F64)
        g = math.radians(cfg.gold_angle_deg)
        self.u = cfg.gold_norm * torch.tensor([math.cos(g), math.sin(g)], dtype=F64)
        self.t = self.target(cfg.target_lambda).mean()

    def beta_eff(self, lam: float) -> float:
        return self.cfg.beta / lam if lam > 0 else math.inf

    def target(self, lam: float) -> aw.Mixture:
        return self.ref.tilt(self.w, self.beta_eff(lam))

    def log_z(self, lam: float) -> float:
        """log E_ref[exp(w.x / (β/λ))]: the tilt's normaliser."""
        if lam == 0:
            return 0.0
        b = self.beta_eff(lam)
        r = self.ref
        return float(torch.logsumexp(r.log_w + r.means @ self.w / b + r.s2 * float(self.w @ self.w) / (2 * b * b), 0))

    def score(self, objective: str, x: torch.Tensor, lam: float) -> torch.Tensor:
        """Per-point objective at λ (x: [..., 2] float64)."""
        if objective == "target":
            return -((x - self.t) ** 2).sum(-1)
        if objective == "reward_kl":
            log_ratio = (x @ self.w) * lam / self.cfg.beta - self.log_z(lam) if lam > 0 else torch.zeros_like(x[..., 0])
            return x @ self.u - self.cfg.kl_gamma * log_ratio
        raise ValueError(objective)

    def closed_form(self, objective: str, lam: float) -> float:
        """The objective's mean on the exact p_(β/λ) (not what the sampler draws)."""
        p = self.target(lam)
        if objective == "target":
            d2 = ((p.means - self.t) ** 2).sum(1) + p.dim * p.s2
            return -float(p.weights @ d2)
        kl = (p.expected_reward(self.w) * lam / self.cfg.beta - self.log_z(lam)) if lam > 0 else 0.0
        return p.expected_reward(self.u) - self.cfg.kl_gamma * kl


OBJECTIVES = ("target", "reward_kl")


# -- the samples ---------------------------------------------------------------------------------
def setup():
    from alignment_world import setup as aw_setup
    return aw_setup()


def search_grid(cfg: Config, search_mod) -> list[float]:
    n = getattr(search_mod, "GRID_POINTS", 401)
    return torch.linspace(cfg.lo, cfg.hi, n, dtype=F64).tolist()


def sample_bank(cfg: Config, pack, grid: list[float], log=print) -> torch.Tensor:
    """[len(grid), reps * groups, points_per_group, 2] float32: every grid λ swept with one seed."""
    import aw_comfy as ac
    sweep = sys.modules[f"{PACK}.sampler.sweep"]
    world = World(cfg)
    pair = ac.make_pair(pack, ac.world_model(world.ref.denoise), ac.world_model(world.target(1.0).denoise), cfg.beta)
    cond = ac.conditioning()
    elements = cfg.reps * cfg.groups
    latent = ac.empty_latent(cfg.points_per_group, batch=elements)
    parts, t0 = [], time.perf_counter()
    for i in range(0, len(grid), cfg.lambdas_per_sweep):
        lams = grid[i:i + cfg.lambdas_per_sweep]
        out = sweep.lambda_sweep(pair, lams, cfg.seed, cfg.steps, 1.0, cfg.sampler, cfg.scheduler, cond, cond,
                                 latent)["samples"]
        parts.append(ac.points_from_latent(pair.reference, out).reshape(len(lams), elements, -1, 2).float())
        log(f"[{time.perf_counter() - t0:.0f} s] swept λ {lams[0]:.3f}..{lams[-1]:.3f}")
    return torch.cat(parts)


def bank_lambdas(cfg: Config, search_mod) -> list[float]:
    """Every λ a search can evaluate or return: its grid, and the first pass's evenly spaced λ."""
    lams = set(search_grid(cfg, search_mod)) | set(search_mod.initial_design(cfg.lo, cfg.hi, cfg.initial))
    return sorted(lams)


# -- the searches --------------------------------------------------------------------------------
def load_search_module(path: Path | None = None, source: str | None = None, name: str = "aw_search_under_test"):
    """sampler/lambda_search.py (pure torch) from a file, or from source text (another commit's)."""
    if source is not None:
        path = Path(tempfile.mkdtemp(prefix="aw_lambda_search_")) / f"{name}.py"
        path.write_text(source)
    path = Path(path) if path is not None else REPO / "sampler" / "lambda_search.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def pooled_variant(search_mod):
    """The same search with one score variance pooled over every λ (the variance model before issue 20,
    item 8), to measure what the per-λ variance adds; None when the module has no per-λ variance."""
    if not hasattr(search_mod.LambdaSearch, "variance"):
        return None

    class Pooled(search_mod.LambdaSearch):
        def variance(self):
            spreads = [float(torch.tensor(s, dtype=F64).var(unbiased=True)) for s in self.scores if len(s) > 1]
            if not spreads:
                return None
            pooled = max(sum(spreads) / len(spreads), 1e-12)
            return lambda at: torch.full((len(torch.as_tensor(at).reshape(-1)),), pooled, dtype=F64)
    return Pooled


def run_searches(search_cls, scores: torch.Tensor, lams: list[float], cfg: Config, regime: str, reps: int) -> list[float]:
    """One search per repetition on the per-element scores [len(lams), elements]; the λ each returned."""
    index = {lam: i for i, lam in enumerate(lams)}
    lam_t = torch.tensor(lams, dtype=F64)
    elements = scores.shape[1]
    found = []
    for r in range(reps):
        gen = torch.Generator().manual_seed(cfg.search_seed * 100003 + r)

        def evaluate(batch):
            out = []
            for lam in batch:
                i = index.get(lam)
                if i is None:  # the search's grid, rebuilt: equal up to rounding
                    i = int(torch.argmin((lam_t - lam).abs()))
                    if abs(lams[i] - lam) > 1e-9:
                        raise ValueError(f"λ={lam} was not sampled (nearest {lams[i]})")
                if regime == "node":
                    chosen = torch.arange(r * cfg.groups, (r + 1) * cfg.groups)
                else:
                    chosen = torch.randperm(elements, generator=gen)[:cfg.groups]
                out.append(scores[i, chosen].tolist())
            return out

        search = search_cls(cfg.lo, cfg.hi, cfg.budget, cfg.per_pass, cfg.initial)
        while batch := search.ask():
            search.tell(batch, evaluate(batch))
        if len(search.xs) != cfg.budget:
            raise RuntimeError(f"the search evaluated {len(search.xs)} λ, budget {cfg.budget}")
        found.append(search.best()[0])
    return found


def nearest(lams: list[float], lam: float) -> int:
    i = min(range(len(lams)), key=lambda k: abs(lams[k] - lam))
    if abs(lams[i] - lam) > 1e-9:
        raise ValueError(f"λ={lam} was not sampled")
    return i


def measure(cfg: Config, bank: torch.Tensor, lams: list[float], optimisers: dict, points: tuple, fresh_reps: int | None = None,
            log=print) -> dict:
    """Every objective x points per score x optimiser x noise regime: ``cfg.reps`` searches in the node regime
    (each its own elements), ``fresh_reps`` (default the same) in the fresh one (new draws each)."""
    world = World(cfg)
    fresh_reps = cfg.reps if fresh_reps is None else fresh_reps
    res = {"config": asdict(cfg), "fresh_reps": fresh_reps, "lambdas": len(lams), "objectives": {}, "rows": []}
    lam_t = torch.tensor(lams, dtype=F64)
    for objective in OBJECTIVES:
        per_point = torch.stack([world.score(objective, bank[i].to(F64), lam) for i, lam in enumerate(lams)])
        exact = per_point.mean((1, 2))  # the realised objective: every swept point
        star = int(exact.argmax())
        gen = torch.Generator().manual_seed(cfg.seed)
        boot = []
        for _ in range(100):  # resampling the elements: how well the sweep pins λ* down
            pick = torch.randint(0, per_point.shape[1], (per_point.shape[1],), generator=gen)
            boot.append(lams[int(per_point[:, pick].mean((1, 2)).argmax())])
        closed = torch.tensor([world.closed_form(objective, lam) for lam in lams], dtype=F64)
        info = {"lambda_star": lams[star], "exact_at_star": float(exact[star]), "range": float(exact.max() - exact.min()),
                "bootstrap_sd": statistics.pstdev(boot), "closed_form_argmax": lams[int(closed.argmax())],
                "loss_at_0.05": float(exact[star] - exact[(lam_t - lams[star]).abs() <= 0.05 + 1e-12].min()),
                "levels": {}}
        res["objectives"][objective] = info
        for m in points:
            scores = per_point[:, :, :m].mean(-1)  # [λ, elements]: one score per element ("image")
            se = scores.std(1) / math.sqrt(cfg.groups)
            se_star = float(se[star])
            own = [lams[int(scores[:, r * cfg.groups:(r + 1) * cfg.groups].mean(1).argmax())] for r in range(cfg.reps)]
            info["levels"][m] = {"se_at_0": float(se[0]), "se_at_star": se_star,
                                 "se_max_over_min": float(se.max() / se.min()),
                                 "every_lambda_same_seeds": own}
            for name, cls in optimisers.items():
                for regime in ("node", "fresh"):
                    t0 = time.perf_counter()
                    reps = cfg.reps if regime == "node" else fresh_reps
                    found = run_searches(cls, scores, lams, cfg, regime, reps)
                    errors = [abs(f - lams[star]) for f in found]
                    losses = [float(exact[star] - exact[nearest(lams, f)]) for f in found]
                    hits = (sum(e <= 0.05 + 1e-9 for e in errors) if objective == "target"
                            else sum(loss <= se_star for loss in losses))
                    row = {"points": m, "objective": objective, "regime": regime, "optimiser": name, "found": found,
                           "hits": hits, "reps": reps, "within_0.05": sum(e <= 0.05 + 1e-9 for e in errors),
                           "within_0.1": sum(e <= 0.1 + 1e-9 for e in errors),
                           "median_error": statistics.median(errors), "p90_error": sorted(errors)[int(0.9 * (len(errors) - 1))],
                           "mean_signed_error": statistics.fmean(f - lams[star] for f in found),
                           "median_loss": statistics.median(losses), "se_at_star": se_star,
                           "seconds": time.perf_counter() - t0}
                    res["rows"].append(row)
                    log(f"{m:4d} points  {objective:9s} {regime:5s} {name:28s} criterion met {hits:2d}/{reps}  "
                        f"within 0.05: {row['within_0.05']:2d}  median |λ̂ − λ*| {row['median_error']:.3f}  "
                        f"median loss {row['median_loss']:.4f} (SE {se_star:.4f})")
    return res


# -- the report ----------------------------------------------------------------------------------
def render(res: dict, command: str, seconds: float, reused: bool = False) -> str:
    cfg = res["config"]
    lines = [f"Measured by `{command}` ({seconds:.0f} s on this machine's 2 shared CPU cores, 1 thread"
             + ("; the samples read from the --bank file, swept by an earlier run with the same configuration" if reused
                else "") + ").", "",
             f"World: {cfg['modes']} modes on a circle of radius {cfg['radius']:g}, std {'/'.join(f'{s:g}' for s in cfg['stds'])}, "
             f"the pair's reward w = {cfg['reward_norm']:g}·(cos {cfg['reward_angle_deg']:g}°, sin {cfg['reward_angle_deg']:g}°), "
             f"β = {cfg['beta']:g}; the pack's batched λ sweep, {cfg['sampler']}, {cfg['steps']} {cfg['scheduler']} steps, "
             f"every one of the {res['lambdas']} λ a search can ask for (its grid on [{cfg['lo']:g}, {cfg['hi']:g}] and the first "
             f"pass's λ) swept once for {cfg['reps']} × {cfg['groups']} elements. A search: budget {cfg['budget']} "
             f"({cfg['initial']} λ, then {cfg['per_pass']} per pass), {cfg['groups']} scores per λ (2 prompts × 4 seeds), each "
             f"the mean objective over one element's points. *node*: one seed set per search, shared by all its λ (as the "
             f"node samples), {cfg['reps']} repetitions per row; *fresh*: new seeds for every evaluated λ, "
             f"{res['fresh_reps']} repetitions per row.", ""]
    for objective, info in res["objectives"].items():
        what = ("target −|x − t|²: criterion |λ̂ − λ*| ≤ 0.05" if objective == "target" else
                "reward−KL u·x − γ·log(p_(β/λ)/p_ref): criterion loss J(λ*) − J(λ̂) ≤ one evaluation's SE at λ*")
        lines.append(f"- **{what}.** Realised optimum λ* = {info['lambda_star']:.4f} (bootstrap sd over the sweep's "
                     f"elements {info['bootstrap_sd']:.4f}; on the exact p_(β/λ) {info['closed_form_argmax']:.4f}); the "
                     f"objective spans {info['range']:.3f} over the range and loses {info['loss_at_0.05']:.4f} within ±0.05 "
                     "of λ*. " + "; ".join(
                         f"{m} points per score: one evaluation's SE {lv['se_at_0']:.4f} at λ = 0, {lv['se_at_star']:.4f} "
                         f"at λ* (largest/smallest over λ {lv['se_max_over_min']:.1f}), the argmax of the same seeds at every "
                         f"λ within 0.05 in {sum(abs(v - info['lambda_star']) <= 0.05 + 1e-9 for v in lv['every_lambda_same_seeds'])}"
                         f"/{len(lv['every_lambda_same_seeds'])}"
                         for m, lv in info["levels"].items()) + ".")
    lines += ["", "| points per score | objective | noise | optimiser | criterion met | within 0.05 | within 0.1 | "
              "median \\|λ̂ − λ*\\| | 90th pct | mean λ̂ − λ* | median loss | SE at λ* |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        pct = 100 * r["hits"] / r["reps"]
        lines.append(f"| {r['points']} | {r['objective']} | {r['regime']} | {r['optimiser']} | **{r['hits']}/{r['reps']}** "
                     f"({pct:.0f} %) | {r['within_0.05']} | {r['within_0.1']} | {r['median_error']:.3f} | "
                     f"{r['p90_error']:.3f} | {r['mean_signed_error']:+.3f} | {r['median_loss']:.4f} | {r['se_at_star']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="few points, few steps, 3 repetitions (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for aw_lambda_search.md and .json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--points", default=None, help="points per score to report, comma-separated (default: 256,64; "
                                                   "each at most the swept points_per_group)")
    ap.add_argument("--compare-commit", action="append", default=[],
                    help="also measure sampler/lambda_search.py as of this git commit (same samples)")
    ap.add_argument("--compare-module", action="append", default=[], type=Path,
                    help="also measure the search in this file (same samples)")
    ap.add_argument("--fresh-reps", type=int, help="repetitions in the fresh regime (default: as many as in the node "
                                                     "regime, which has one disjoint seed set per repetition)")
    ap.add_argument("--bank", type=Path, help="reuse the swept samples from this file (written there when absent)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TINY if args.tiny else Config()
    points = tuple(int(p) for p in args.points.split(",")) if args.points else (
        (cfg.points_per_group,) if args.tiny else (cfg.points_per_group, 64))
    if any(not 0 < p <= cfg.points_per_group for p in points):
        raise SystemExit(f"--points: each between 1 and {cfg.points_per_group}")
    t0 = time.perf_counter()
    current = load_search_module()
    optimisers = {"this checkout": current.LambdaSearch}
    pooled = pooled_variant(current)
    if pooled is not None:
        optimisers["this checkout, variance pooled"] = pooled
    for i, commit in enumerate(args.compare_commit):
        import subprocess
        source = subprocess.run(["git", "show", f"{commit}:sampler/lambda_search.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        optimisers[f"commit {commit}"] = load_search_module(source=source, name=f"aw_search_commit_{i}").LambdaSearch
    for i, path in enumerate(args.compare_module):
        optimisers[f"file {path.name}"] = load_search_module(path, name=f"aw_search_file_{i}").LambdaSearch
    lams = bank_lambdas(cfg, current)
    bank, reused = None, False
    if args.bank is not None and args.bank.exists():
        saved = torch.load(args.bank)
        if saved["lambdas"] == lams and saved["config"] == asdict(cfg):
            bank = saved["bank"]
            print(f"samples from {args.bank}")
            reused = True
    if bank is None:
        pack = setup()
        bank = sample_bank(cfg, pack, lams)
        if args.bank is not None:
            torch.save({"lambdas": lams, "config": asdict(cfg), "bank": bank}, args.bank)
    res = measure(cfg, bank, lams, optimisers, points, args.fresh_reps)
    seconds = time.perf_counter() - t0
    command = "python benchmarks/aw_lambda_search.py" + (" --tiny" if args.tiny else "") + \
        (f" --points {args.points}" if args.points else "") + \
        (f" --fresh-reps {args.fresh_reps}" if args.fresh_reps else "") + \
        "".join(f" --compare-commit {c}" for c in args.compare_commit) + \
        "".join(f" --compare-module {p}" for p in args.compare_module) + f" --threads {args.threads}"
    res["command"], res["seconds"], res["samples_reused"] = command, seconds, reused
    section = render(res, command + (f" --bank {args.bank}" if args.bank else ""), seconds, reused)
    write_results(args.out, "aw_lambda_search", section, res)
    return res


if __name__ == "__main__":
    main()
