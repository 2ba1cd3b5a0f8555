"""Difference reuse (``full_pass_every`` = k) measured where the answer is known exactly.

    python benchmarks/aw_difference_reuse.py --threads 1     # full run (~10 min on 2 busy cores):
                                                             # docs/difference_reuse.md + results/aw_difference_reuse.*
    python benchmarks/aw_difference_reuse.py --tiny --no-readme --out /tmp/awk   # seconds, for the tests

The alignment world of benchmarks/alignment_world.py (closed-form Gaussian-mixture denoisers as
real ComfyUI models, sampled by the pack's DeRaDiff KSampler node) in two versions: the alignment
world's ring (8 overlapping modes, radius 1.3, std 0.15/0.2, reward at 75°) and a hard ring with
well-separated modes (radius 4, std 0.3, reward w = (1, 0.5)); anchor β = 1 in both. For every
sampler, λ and k = 1..4 it reports E[r], SW₂ and mode TV against the exact p_(β/λ) and against
k = 1 with the same seed (which isolates the reuse error), next to the floors: the same sampler on
the exact p_(β/λ) model ("from scratch") against the closed form, DeRaDiff at k = 1 against it,
and the Monte-Carlo standard error of E[r] for a sample of the same size.

Design checks (λ ∈ {0.5, 1.5}, k ∈ {2, 3}): how many final steps must run both models
(``final_full`` 0 / 1 / 2, the StepPlan argument; the shipped default is
sampler/difference_reuse.py FINAL_FULL_STEPS) and carrying the stale Δ to the current noise level
(RESCALE_STALE on / off). Model passes per step are counted from the model calls of each run.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

import aw_world as aw  # noqa: E402
from results_io import write_results  # noqa: E402

START, END = "<!-- difference-reuse:start -->", "<!-- difference-reuse:end -->"
RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "difference_reuse.md"  # the page that holds the section between START and END
PACK = "comfyui_deradiff"


@dataclass(frozen=True)
class Config:
    points: int = 16384
    steps: int = 30
    scheduler: str = "karras"
    samplers: tuple = ("euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde")
    lambdas: tuple = (0.25, 0.5, 1.5, 3.0)
    ks: tuple = (1, 2, 3, 4)
    worlds: tuple = ("ring", "hard")
    beta: float = 1.0
    seed: int = 2026
    # design checks: final_full variants and the stale-Δ carrying, at these λ and k
    check_lambdas: tuple = (0.5, 1.5)
    check_ks: tuple = (2, 3)
    final_fulls: tuple = (0, 1, 2)
    rescale_check: bool = True
    scratch: bool = True


TINY = Config(points=2048, steps=20, samplers=("dpmpp_2m",), lambdas=(0.5,), ks=(1, 2, 3), worlds=("ring",),
              check_lambdas=(0.5,), check_ks=(2,), final_fulls=(0, 1), rescale_check=False)


def world(name: str):
    """(reference mixture, reward vector)"""
    if name == "ring":
        a = math.radians(75.0)
        return aw.ring(8, 1.3, (0.15, 0.2)), torch.tensor([math.cos(a), math.sin(a)], dtype=aw.F64)
    if name == "hard":
        return aw.ring(8, 4.0, (0.3,)), torch.tensor([1.0, 0.5], dtype=aw.F64)
    if name == "hex":  # a second hard world: 6 separated modes of two widths, another radius and reward
        a = math.radians(110.0)
        return (aw.ring(6, 2.5, (0.25, 0.4), phase=0.3),
                1.4 * torch.tensor([math.cos(a), math.sin(a)], dtype=aw.F64))
    raise ValueError(name)


def setup():
    from alignment_world import setup as aw_setup
    return aw_setup()


def reuse_module():
    return sys.modules[f"{PACK}.sampler.difference_reuse"]


def default_final_full() -> int:
    return reuse_module().FINAL_FULL_STEPS


@contextlib.contextmanager
def final_full_steps(n):
    """Every StepPlan built meanwhile (DeRaDiff Guider, Realign Model) forces the last n steps full.
    (StepPlan's default argument is bound at import, so patching FINAL_FULL_STEPS alone would not.)"""
    if n is None:
        yield
        return
    plan = reuse_module().StepPlan
    users = [sys.modules[f"{PACK}.sampler.{m}"] for m in ("guider", "realign_model")]
    saved = [u.StepPlan for u in users]
    try:
        for u in users:
            u.StepPlan = functools.partial(plan, final_full=n)
        yield
    finally:
        for u, s in zip(users, saved):
            u.StepPlan = s


@contextlib.contextmanager
def rescale_stale(on):
    if on is None:
        yield
        return
    mod = reuse_module()
    saved = mod.RESCALE_STALE
    mod.RESCALE_STALE = bool(on)
    try:
        yield
    finally:
        mod.RESCALE_STALE = saved


class Counted:
    """A point denoiser that counts its calls (one call = one model pass over the batch)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.fn(x, sigma)


def sample(pack, pair, lam, k, latent, sampler, cfg: Config):
    import aw_comfy as ac
    cond = ac.conditioning()
    out = pack.nodes.DeRaDiffKSampler.execute(pair, cfg.seed, cfg.steps, 1.0, sampler, cfg.scheduler, cond, cond,
                                              latent, 1.0, **{"lambda": float(lam), "full_pass_every": k})
    return ac.points_from_latent(pair.reference, out.result[0]["samples"])


def stats(x, w, target, exact_set):
    return {"reward": float((x @ w).mean()), "sw": aw.sliced_wasserstein(x, exact_set),
            "tv": aw.total_variation(aw.mode_weights(x, target), target.weights), "weights": aw.mode_weights(x, target)}


def measure(pack, name, sampler, lam, cfg: Config, ks=None, final_full=None, rescale=None, checks=True) -> dict:
    """One cell: exact, from scratch, and DeRaDiff at every k (against exact and against k = 1);
    with ``checks`` and λ in cfg.check_lambdas also the design checks (final_full, carrying)."""
    import aw_comfy as ac
    ks = tuple(cfg.ks if ks is None else ks)
    ref, w = world(name)
    target = ref.tilt(w, cfg.beta / lam)
    calls = (Counted(ref.denoise), Counted(ref.tilt(w, cfg.beta).denoise))
    pair = ac.make_pair(pack, ac.world_model(calls[0]), ac.world_model(calls[1]), cfg.beta)
    latent = ac.empty_latent(cfg.points)
    gen = torch.Generator().manual_seed(cfg.seed)
    exact_set = target.sample(cfg.points, gen)
    second_set = target.sample(cfg.points, gen)  # independent: the pure sampling-noise floor
    exact_reward = target.expected_reward(w)
    cell = {"world": name, "sampler": sampler, "lam": lam, "exact_reward": exact_reward,
            "se": float((exact_set @ w).std() / math.sqrt(cfg.points)),
            "sw_floor": aw.sliced_wasserstein(second_set, exact_set),
            "tv_floor": aw.total_variation(aw.mode_weights(second_set, target), target.weights), "k": {}}
    if cfg.scratch:
        truth = ac.world_model(target.denoise)
        scratch = ac.points_from_latent(truth, ac.sample_plain(truth, latent, sampler, cfg.steps, cfg.seed,
                                                               cfg.scheduler))
        s = stats(scratch, w, target, exact_set)
        cell.update(scratch_err=s["reward"] - exact_reward, scratch_sw=s["sw"], scratch_tv=s["tv"])

    first = None

    def one(k, ff=None, rs=None):
        nonlocal first
        before = sum(c.calls for c in calls)
        with final_full_steps(ff), rescale_stale(rs):
            x = sample(pack, pair, lam, k, latent, sampler, cfg)
        passes = (sum(c.calls for c in calls) - before) / cfg.steps
        d = stats(x, w, target, exact_set)
        if first is None:
            first = (x, d)
        return {"err": d["reward"] - exact_reward, "sw": d["sw"], "tv": d["tv"], "passes": passes,
                "vs1_err": d["reward"] - first[1]["reward"], "vs1_sw": aw.sliced_wasserstein(x, first[0]),
                "vs1_tv": aw.total_variation(d["weights"], first[1]["weights"])}

    if 1 not in ks:
        ks = (1,) + ks
    for k in ks:
        cell["k"][k] = one(k, final_full, rescale)
    if checks and lam in cfg.check_lambdas:
        default = default_final_full()
        cell["final_full"] = {}
        for k in cfg.check_ks:
            for ff in cfg.final_fulls:
                # the shipped default is the main run above (same plan, same seed)
                cell["final_full"][f"{k}/{ff}"] = cell["k"][k] if ff == default and k in cell["k"] else one(k, ff)
        if cfg.rescale_check:
            cell["as_is"] = {k: one(k, rs=False) for k in cfg.check_ks}
    return cell


def floor_of(cell) -> float:
    """The sampler's own E[r] error in this cell: from scratch vs exact, or 2 MC standard errors."""
    return max(abs(cell.get("scratch_err", 0.0)), 2 * cell["se"])


def run(cfg: Config, pack, log=print) -> dict:
    cells = []
    t0 = time.perf_counter()
    for name in cfg.worlds:
        for sampler in cfg.samplers:
            for lam in cfg.lambdas:
                cells.append(measure(pack, name, sampler, lam, cfg))
                log(f"[{time.perf_counter() - t0:.0f} s] {name} {sampler} λ={lam:g}: " + ", ".join(
                    f"k={k} {v['vs1_err']:+.4f}" for k, v in cells[-1]["k"].items()))
    return {"config": asdict(cfg), "final_full_default": default_final_full(),
            "rescale_default": reuse_module().RESCALE_STALE, "cells": cells,
            "seconds": time.perf_counter() - t0}


def _k(cell, k):
    ks = cell["k"]
    return ks.get(k, ks.get(str(k)))  # JSON keys are strings


def verdict(res) -> dict:
    """Per world and k: cells whose reuse error |E_k − E_1| is within 2 MC standard errors, within the
    sampler's floor (from scratch vs exact, at least 2 SE), within DeRaDiff's own error |E_1 − exact|
    (at least 2 SE); of how many; the largest |E_k − E_1|."""
    out = {}
    for cell in res["cells"]:
        for k in res["config"]["ks"]:
            v = _k(cell, k)
            if int(k) == 1 or v is None:
                continue
            key = (cell["world"], int(k))
            se2, e = 2 * cell["se"], abs(v["vs1_err"])
            row = out.setdefault(key, {"se": 0, "floor": 0, "own": 0, "total": 0, "worst": 0.0, "outside": []})
            row["se"] += e <= se2
            row["floor"] += e <= floor_of(cell)
            if e > floor_of(cell):
                row["outside"].append(f"{cell['sampler']} λ = {cell['lam']:g}: {v['vs1_err']:+.3f} vs {floor_of(cell):.3f}")
            row["own"] += e <= max(abs(_k(cell, 1)["err"]), se2)
            row["total"] += 1
            row["worst"] = max(row["worst"], e)
    return out


def _f(x, fmt="+.3f"):
    return "–" if x is None else format(x, fmt)


def render(res, command: str) -> str:
    cfg = res["config"]
    ks = [k for k in cfg["ks"] if k != 1]
    lines = [f"Measured by `{command}` ({res['seconds']:.0f} s on this machine's 2 shared CPU cores): "
             f"{cfg['points']} points per run (one ComfyUI sampling run), {cfg['steps']} steps, {cfg['scheduler']}, "
             f"seed {cfg['seed']} for every run, anchor β = {cfg['beta']:g}, the pack's DeRaDiff KSampler node with "
             f"`full_pass_every` = k (shipped plan: first step full, last {res['final_full_default']} step(s) "
             f"forced full, stale Δ carried to the current σ: {res['rescale_default']}). *ring*: the alignment world's "
             "ring (8 overlapping modes); *hard*: 8 well-separated modes (radius 4, std 0.3, w = (1, 0.5)). "
             "These three samplers make one model evaluation per step, so no off-schedule inner evaluation occurs.",
             "",
             "**E[r].** ± = Monte-Carlo standard error (SE) of a mean of this many exact samples. *scratch* = "
             "ComfyUI's KSampler with the same sampler on the exact p_(β/λ) model (the sampler's own error); "
             "*k = 1* = DeRaDiff without reuse; \"− k=1\" = E[r] at k minus E[r] at k = 1, same seed: the reuse "
             "error alone.", "",
             "| world | sampler | λ | exact E[r] (±SE) | scratch − exact | k=1 − exact | "
             + " | ".join(f"k={k} − exact" for k in ks) + " | " + " | ".join(f"k={k} − k=1" for k in ks) + " |",
             "|" + "---|" * (6 + 2 * len(ks))]
    for c in res["cells"]:
        lines.append(f"| {c['world']} | {c['sampler']} | {c['lam']:g} | {c['exact_reward']:.3f} (±{c['se']:.3f}) | "
                     f"{_f(c.get('scratch_err'))} | {_f(_k(c, 1)['err'])} | "
                     + " | ".join(_f((_k(c, k) or {}).get("err")) for k in ks) + " | "
                     + " | ".join(_f((_k(c, k) or {}).get("vs1_err")) for k in ks) + " |")
    lines += ["", "**SW₂ and mode TV.** Against exact: k = 1/2/3/4 (scratch; floor = an independent exact sample "
              "set of the same size). Against k = 1 (same seed): k = 2/3/4.", "",
              "| world | sampler | λ | SW₂ vs exact | SW₂ vs k=1 | mode TV vs exact | mode TV vs k=1 |",
              "|---|---|---|---|---|---|---|"]
    allk = list(cfg["ks"])
    for c in res["cells"]:
        sw = "/".join(_f(_k(c, k)["sw"], ".3f") for k in allk)
        tv = "/".join(_f(_k(c, k)["tv"], ".3f") for k in allk)
        sw1 = "/".join(_f(_k(c, k)["vs1_sw"], ".3f") for k in ks)
        tv1 = "/".join(_f(_k(c, k)["vs1_tv"], ".3f") for k in ks)
        lines.append(f"| {c['world']} | {c['sampler']} | {c['lam']:g} | {sw} ({_f(c.get('scratch_sw'), '.3f')}; "
                     f"floor {c['sw_floor']:.3f}) | {sw1} | {tv} ({_f(c.get('scratch_tv'), '.3f')}; floor "
                     f"{c['tv_floor']:.3f}) | {tv1} |")

    checked = [c for c in res["cells"] if "final_full" in c]
    if checked:
        ffs, cks = cfg["final_fulls"], cfg["check_ks"]
        lines += ["", "**Which final steps must run both models** (E[r] at k minus E[r] at k = 1, same seed; "
                  f"`final_full` = n forces the last n of the {cfg['steps']} steps full; passes = model passes per "
                  "step, counted)" + (", and **carrying the stale Δ** (*as is* = RESCALE_STALE off, with the "
                                      "shipped final_full)" if cfg["rescale_check"] else "") + ".", ""]
        head = [f"k={k} ff={ff}" for k in cks for ff in ffs] + ([f"k={k} as is" for k in cks] if cfg["rescale_check"] else [])
        lines += ["| world | sampler | λ | " + " | ".join(head) + " |", "|" + "---|" * (3 + len(head))]
        for c in checked:
            vals = [c["final_full"][f"{k}/{ff}"]["vs1_err"] for k in cks for ff in ffs]
            if cfg["rescale_check"]:
                vals += [(c["as_is"].get(k) or c["as_is"].get(str(k)))["vs1_err"] for k in cks]
            lines.append(f"| {c['world']} | {c['sampler']} | {c['lam']:g} | " + " | ".join(_f(v) for v in vals) + " |")
        c0 = checked[0]
        lines.append("| passes per step | | | " + " | ".join(
            f"{c0['final_full'][f'{k}/{ff}']['passes']:.2f}" for k in cks for ff in ffs)
            + (" | " + " | ".join(f"{(c0['as_is'].get(k) or c0['as_is'].get(str(k)))['passes']:.2f}" for k in cks)
               if cfg["rescale_check"] else "") + " |")
        lines += ["", *final_full_summary(res)]
    lines += ["", "**Within the floor?** Counts of cells (sampler × λ) whose reuse error |E[r]_k − E[r]_1| is at "
              "most: 2 SE (indistinguishable from the sampling noise of one exact sample set) / the sampler's floor "
              "max(|scratch − exact|, 2 SE) / DeRaDiff's own error max(|k=1 − exact|, 2 SE).", ""]
    summary = verdict(res)
    for name in cfg["worlds"]:
        parts = []
        for k in ks:
            if (name, k) in summary:
                r = summary[(name, k)]
                outside = f"; outside the sampler's floor: {', '.join(r['outside'])}" if r["outside"] else ""
                parts.append(f"k = {k} ({passes_of(res, k)} passes/step): {r['se']} / {r['floor']} / {r['own']} "
                             f"of {r['total']} (largest |E_k − E_1| {r['worst']:.3f}{outside})")
        lines.append(f"- **{name}**: " + "; ".join(parts) + ".")
    lines.append("")
    return "\n".join(lines) + "\n"


def passes_of(res, k) -> str:
    vals = sorted({round(_k(c, k)["passes"], 2) for c in res["cells"] if _k(c, k)})
    return "/".join(f"{v:.2f}" for v in vals)


def final_full_summary(res) -> list:
    """Largest |E[r](final_full = n) − E[r](shipped default)| per k, next to the reuse error itself."""
    cfg, out = res["config"], []
    default = res["final_full_default"]
    for k in cfg["check_ks"]:
        parts = []
        base = [c["final_full"][f"{k}/{default}"]["vs1_err"] for c in res["cells"] if "final_full" in c]
        for ff in cfg["final_fulls"]:
            if ff == default:
                continue
            diffs = [abs(c["final_full"][f"{k}/{ff}"]["vs1_err"] - c["final_full"][f"{k}/{default}"]["vs1_err"])
                     for c in res["cells"] if "final_full" in c]
            improved = sum(abs(c["final_full"][f"{k}/{ff}"]["vs1_err"]) < abs(c["final_full"][f"{k}/{default}"]["vs1_err"])
                           for c in res["cells"] if "final_full" in c)
            sw = [abs(c["final_full"][f"{k}/{ff}"]["vs1_sw"] - c["final_full"][f"{k}/{default}"]["vs1_sw"])
                  for c in res["cells"] if "final_full" in c]
            parts.append(f"final_full = {ff} moves E[r] by at most {max(diffs):.1e} and SW₂ to k = 1 by at most "
                         f"{max(sw):.1e}, and brings E[r] closer to k = 1 in {improved} of {len(diffs)} cells")
        out.append(f"- k = {k}: against the shipped final_full = {default} (largest |E_k − E_1| "
                   f"{max(abs(b) for b in base):.3f}), " + "; ".join(parts) + ".")
    return out


def write_readme(section: str, readme: Path = DOC):
    """Replace the text between START and END in ``readme`` (default: docs/difference_reuse.md); a page
    without the markers gets the section appended under its own heading."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else "# Difference reuse\n"
    block = f"{START}\n{section}{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Difference reuse in the alignment world\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--points", type=int)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the section of docs/difference_reuse.md")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TINY if args.tiny else Config()
    if args.points:
        cfg = replace(cfg, points=args.points)
    pack = setup()
    res = run(cfg, pack)
    command = "python benchmarks/aw_difference_reuse.py" + (" --tiny" if args.tiny else "") + \
        (f" --points {args.points}" if args.points else "") + f" --threads {args.threads}"
    section = render(res, command)
    write_results(args.out, "aw_difference_reuse", section, res)
    if not args.no_readme:
        write_readme(section)
    return res


if __name__ == "__main__":
    main()
