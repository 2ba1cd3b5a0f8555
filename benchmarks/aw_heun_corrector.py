"""Heun's corrector under difference reuse (``full_pass_every`` = k), in the alignment world.

    python benchmarks/aw_heun_corrector.py            # results/aw_heun_corrector.md (+ .json)
    python benchmarks/aw_heun_corrector.py --tiny --out /tmp/awh   # seconds, for the tests

Heun's second evaluation of a step lands exactly on the next scheduled sigma. Three rules:
"corrector full" (the shipped one: an evaluation that is not its step's first runs both models,
as the full_pass_every tooltip says of every multi-step sampler's inner evaluations),
"corrector reuses" (the plan of the step whose sigma it lands on decides, what the sigma alone
gives) and "corrector follows its step" (the plan of the step it corrects decides: both models
only on every k-th step, the step's corrector included). Per world, λ and k: E[r] error against
the exact p_(β/λ), the same at k = 1, the from-scratch floor, and model passes per step (counted).
Uses benchmarks/aw_difference_reuse.py's worlds and measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import aw_difference_reuse as adr  # noqa: E402
from results_io import write_results  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


RULES = ("corrector full", "corrector reuses", "corrector follows its step")


@contextlib.contextmanager
def corrector_rule(rule: str):
    """How StepPlan treats an evaluation flagged 'inner' (Heun's corrector, at sigmas[i + 1] of step i)."""
    plan = adr.reuse_module().StepPlan
    original = plan.is_full
    if rule == "corrector reuses":  # the flag ignored: the plan of the step that starts at its sigma
        plan.is_full = lambda self, sigma, inner=False: original(self, sigma, False)
    elif rule == "corrector follows its step":  # the plan of step i, the one it corrects

        def own_step(self, sigma, inner=False):
            i = self.step_index(sigma) if inner else None
            return original(self, self.sigmas[i - 1] if i else sigma, inner and not i)
        plan.is_full = own_step
    try:
        yield
    finally:
        plan.is_full = original


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--points", type=int, default=4096)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = replace(adr.TINY if args.tiny else adr.Config(points=args.points), samplers=("heun",))
    lambdas = cfg.lambdas if args.tiny else (0.5, 1.5, 3.0)
    ks = (2,) if args.tiny else (2, 3)
    pack = adr.setup()
    rows, t0 = [], time.time()
    for world in cfg.worlds:
        for lam in lambdas:
            cells = {}
            for rule in RULES:
                with corrector_rule(rule):
                    cells[rule] = adr.measure(pack, world, "heun", lam, cfg, ks=ks, checks=False)
            for k in ks:
                rows.append({"world": world, "lam": lam, "k": k,
                             "scratch_err": cells["corrector full"].get("scratch_err"),
                             "se": cells["corrector full"]["se"],
                             "k1_err": cells["corrector full"]["k"][1]["err"],
                             "k1_passes": cells["corrector full"]["k"][1]["passes"],
                             **{rule: {"err": c["k"][k]["err"], "vs1_err": c["k"][k]["vs1_err"],
                                       "passes": c["k"][k]["passes"]} for rule, c in cells.items()}})
    command = "python benchmarks/aw_heun_corrector.py" + (" --tiny" if args.tiny else f" --points {args.points}")
    lines = [f"Heun, {cfg.steps} steps {cfg.scheduler}, {cfg.points} points per run, seed {cfg.seed} "
             f"(`{command}`, {time.time() - t0:.0f} s, {time.strftime('%Y-%m-%d')}).", "",
             "| world | λ | k | E[r] err k=1 | " + " | ".join(f"{rule}: err / vs k=1 / passes" for rule in RULES)
             + " | 2 SE |", "|---|---|---|---|" + "---|" * len(RULES) + "---|"]
    for r in rows:
        cells = " | ".join(f"{r[rule]['err']:+.3f} / {r[rule]['vs1_err']:+.3f} / {r[rule]['passes']:.2f}"
                           for rule in RULES)
        lines.append(f"| {r['world']} | {r['lam']:g} | {r['k']} | {r['k1_err']:+.3f} | {cells} | {2 * r['se']:.3f} |")
    lines += ["", f"k = 1 (no reuse): {rows[0]['k1_passes']:.2f} model passes per step.", ""]
    for rule in RULES[1:]:
        closer = sum(abs(r["corrector full"]["vs1_err"]) <= abs(r[rule]["vs1_err"]) for r in rows)
        worst = max(abs(r[rule]["vs1_err"]) for r in rows)
        lines.append(f"Corrector full is as close to k = 1 as \"{rule}\" or closer in {closer} of {len(rows)} "
                     f"cells; \"{rule}\" moves E[r] from k = 1 by up to {worst:.3f} "
                     f"(corrector full: {max(abs(r['corrector full']['vs1_err']) for r in rows):.3f}).")
    text = "\n".join(lines) + "\n"
    write_results(args.out, "aw_heun_corrector", text, rows)
    return rows


if __name__ == "__main__":
    main()
