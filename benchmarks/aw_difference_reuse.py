"""Difference reuse (``full_pass_every`` = k) measured where the answer is known exactly.

    python benchmarks/aw_difference_reuse.py             # full run: table in README + results/aw_difference_reuse.*
    python benchmarks/aw_difference_reuse.py --tiny --no-readme --out /tmp/awk   # seconds, for the tests

The alignment world of benchmarks/alignment_world.py (closed-form Gaussian-mixture denoisers as
real ComfyUI models, sampled by the pack's DeRaDiff KSampler) in two versions: the README's ring
(8 overlapping modes, radius 1.3, std 0.15/0.2, reward at 75°) and a hard ring with well-separated
modes (radius 4, std 0.3, reward w = (1, 0.5)); anchor β = 1 in both. For every sampler, λ and
k = 1..4 it reports E[r], SW₂ and mode TV against the exact p_(β/λ) and against k = 1 with the
same seed (which isolates the reuse error), next to the sampler's own floor: the same sampler on
the exact p_(β/λ) model ("from scratch") against the closed form, and the Monte-Carlo standard
error of E[r].
"""
from __future__ import annotations

import argparse
import json
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

START, END = "<!-- difference-reuse:start -->", "<!-- difference-reuse:end -->"
RESULTS = REPO / "benchmarks" / "results"


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


TINY = Config(points=1024, steps=10, samplers=("dpmpp_2m",), lambdas=(0.5,), ks=(1, 2), worlds=("ring",))


def world(name: str):
    """(reference mixture, reward vector)"""
    if name == "ring":
        a = math.radians(75.0)
        return aw.ring(8, 1.3, (0.15, 0.2)), torch.tensor([math.cos(a), math.sin(a)], dtype=aw.F64)
    if name == "hard":
        return aw.ring(8, 4.0, (0.3,)), torch.tensor([1.0, 0.5], dtype=aw.F64)
    raise ValueError(name)


def setup():
    from alignment_world import setup as aw_setup
    return aw_setup()


def sample(pack, pair, lam, k, latent, sampler, cfg: Config):
    import aw_comfy as ac
    cond = ac.conditioning()
    out = pack.nodes.DeRaDiffKSampler().sample(pair, cfg.seed, cfg.steps, 1.0, sampler, cfg.scheduler, cond, cond,
                                               latent, 1.0, **{"lambda": float(lam), "full_pass_every": k})
    return ac.points_from_latent(pair.reference, out["result"][0]["samples"])


def stats(x, w, target, exact_set):
    return {"reward": float((x @ w).mean()), "sw": aw.sliced_wasserstein(x, exact_set),
            "tv": aw.total_variation(aw.mode_weights(x, target), target.weights), "weights": aw.mode_weights(x, target)}


def measure(pack, name, sampler, lam, cfg: Config) -> dict:
    """One cell: exact, from scratch, and DeRaDiff at every k (against exact and against k = 1)."""
    import aw_comfy as ac
    ref, w = world(name)
    target = ref.tilt(w, cfg.beta / lam)
    pair = ac.make_pair(pack, ac.world_model(ref.denoise), ac.world_model(ref.tilt(w, cfg.beta).denoise), cfg.beta)
    latent = ac.empty_latent(cfg.points)
    gen = torch.Generator().manual_seed(cfg.seed)
    exact_set = target.sample(cfg.points, gen)
    exact_reward = target.expected_reward(w)
    truth = ac.world_model(target.denoise)
    scratch = ac.points_from_latent(truth, ac.sample_plain(truth, latent, sampler, cfg.steps, cfg.seed, cfg.scheduler))
    s = stats(scratch, w, target, exact_set)
    cell = {"world": name, "sampler": sampler, "lam": lam, "exact_reward": exact_reward,
            "se": float((exact_set @ w).std() / math.sqrt(cfg.points)),
            "scratch_err": s["reward"] - exact_reward, "scratch_sw": s["sw"], "scratch_tv": s["tv"], "k": {}}
    first = None
    for k in cfg.ks:
        x = sample(pack, pair, lam, k, latent, sampler, cfg)
        d = stats(x, w, target, exact_set)
        if first is None:
            first = (x, d)
        cell["k"][k] = {"err": d["reward"] - exact_reward, "sw": d["sw"], "tv": d["tv"],
                        "vs1_err": d["reward"] - first[1]["reward"], "vs1_sw": aw.sliced_wasserstein(x, first[0]),
                        "vs1_tv": aw.total_variation(d["weights"], first[1]["weights"])}
    return cell


def floor_of(cell) -> float:
    """The sampler's own E[r] error in this cell: from scratch vs exact, or 2 MC standard errors."""
    return max(abs(cell["scratch_err"]), 2 * cell["se"])


def run(cfg: Config, pack, log=print) -> dict:
    cells = []
    t0 = time.perf_counter()
    for name in cfg.worlds:
        for sampler in cfg.samplers:
            for lam in cfg.lambdas:
                cells.append(measure(pack, name, sampler, lam, cfg))
                log(f"{name} {sampler} λ={lam:g}: " + ", ".join(
                    f"k={k} {v['vs1_err']:+.4f}" for k, v in cells[-1]["k"].items()))
    return {"config": asdict(cfg), "cells": cells, "seconds": time.perf_counter() - t0}


def verdict(res) -> dict:
    """Per world and k: in how many cells the reuse error |E_k − E_1| stays within the floor."""
    out = {}
    for cell in res["cells"]:
        for k, v in cell["k"].items():
            if int(k) == 1:
                continue
            key = (cell["world"], int(k))
            inside, total, worst = out.get(key, (0, 0, 0.0))
            out[key] = (inside + (abs(v["vs1_err"]) <= floor_of(cell)), total + 1, max(worst, abs(v["vs1_err"])))
    return out


def render(res, command: str) -> str:
    cfg = res["config"]
    lines = [f"Measured by `{command}` ({res['seconds']:.0f} s on this machine's CPU): {cfg['points']} points per "
             f"run, {cfg['steps']} steps, {cfg['scheduler']}, seed {cfg['seed']}, anchor β = {cfg['beta']:g}. "
             "*ring*: the README's world (8 overlapping modes); *hard*: 8 well-separated modes (radius 4, "
             "std 0.3, w = (1, 0.5)). E[r] err = E[r] − exact E[r] of p_(β/λ); \"vs k=1\" compares with k = 1 "
             "at the same seed, which isolates the reuse error. Floor = the sampler's own error: "
             "max(|E[r] from scratch − exact|, 2 Monte-Carlo standard errors).", "",
             "| world | sampler | λ | floor | k=1 E[r] err | k=2 vs k=1 | k=3 vs k=1 | k=4 vs k=1 | SW₂ vs exact k=1/2/3/4 | mode TV k=1/2/3/4 (scratch) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        ks = c["k"]
        get = lambda k, f: ks.get(k, ks.get(str(k), {})).get(f)  # noqa: E731 (JSON keys are strings)
        vs = [f"{get(k, 'vs1_err'):+.3f}" if get(k, "vs1_err") is not None else "–" for k in (2, 3, 4)]
        sw = "/".join(f"{get(k, 'sw'):.3f}" for k in (1, 2, 3, 4) if get(k, "sw") is not None)
        tv = "/".join(f"{get(k, 'tv'):.3f}" for k in (1, 2, 3, 4) if get(k, "tv") is not None)
        lines.append(f"| {c['world']} | {c['sampler']} | {c['lam']:g} | {floor_of(c):.3f} | {get(1, 'err'):+.3f} | "
                     f"{' | '.join(vs)} | {sw} | {tv} ({c['scratch_tv']:.3f}) |")
    lines.append("")
    summary = verdict(res)
    for name in cfg["worlds"]:
        parts = []
        for k in cfg["ks"]:
            if (name, k) in summary:
                inside, total, worst = summary[(name, k)]
                parts.append(f"k = {k}: {inside} of {total} cells within the floor (largest |E_k − E_1| {worst:.3f})")
        lines.append(f"- **{name}**: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def write_readme(section: str, readme: Path = REPO / "README.md"):
    text = readme.read_text()
    block = f"{START}\n{section}{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        anchor = "<!-- alignment-world:end -->"
        at = text.index(anchor) + len(anchor)
        text = text[:at] + "\n\n### Difference reuse in the alignment world\n" + block + text[at:]
    readme.write_text(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--points", type=int)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TINY if args.tiny else Config()
    if args.points:
        cfg = replace(cfg, points=args.points)
    pack = setup()
    res = run(cfg, pack)
    command = "python benchmarks/aw_difference_reuse.py" + (" --tiny" if args.tiny else "")
    section = render(res, command)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aw_difference_reuse.md").write_text(section)
    (out / "aw_difference_reuse.json").write_text(json.dumps(res, indent=1))
    if not args.no_readme:
        write_readme(section)
    print(section)
    return res


if __name__ == "__main__":
    main()
