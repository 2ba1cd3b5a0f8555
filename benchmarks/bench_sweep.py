"""λ Sweep in one batched pass vs. one DeRaDiff KSampler run per λ, side by side in one run.

    python benchmarks/bench_sweep.py [--lambdas "0,0.5,1,1.5,2"] [--size 128] [--steps 10] [--rounds 3] [--device cpu|cuda]
                                     [--family sd15|sdxl|sd15_full|sdxl_full] [--dynamic-vram]

Same pair (SD1.5 stand-ins unless --family), seed and settings; rounds alternate the two ways so machine drift
hits both. Prints the median wall time of each and the speed-up, and checks that both give the
same latents.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_sampling import load_models, setup  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lambdas", default="0,0.5,1,1.5,2")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sampler", default="euler_ancestral")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--family", choices=["sd15", "sdxl", "sd15_full", "sdxl_full"], default="sd15")
    ap.add_argument("--dynamic-vram", action="store_true")
    args = ap.parse_args()
    pack = setup(args.device, args.dynamic_vram, args.family)
    import torch
    import comfy.utils
    import comfy_helpers as h
    comfy.utils.PROGRESS_BAR_ENABLED = False
    ref, aligned, _, clip = load_models(args.family, h)
    pair = pack.nodes.DeRaDiffMakePair.execute(ref, aligned)[0]
    pos, neg = h.encode(clip, "a red fox"), h.encode(clip, "blurry")
    latent = h.empty_latent(args.size, args.size)
    lambdas = [float(v) for v in args.lambdas.split(",")]
    common = (1, args.steps, 7.0, args.sampler, "normal", pos, neg, latent, 1.0)

    def batched():
        return pack.nodes.DeRaDiffLambdaSweep.execute(pair, args.lambdas, *common)[0]["samples"]

    def separate():
        return torch.cat([pack.nodes.DeRaDiffKSampler.execute(pair, *common, **{"lambda": lam}).result[0]["samples"]
                          for lam in lambdas])

    a, b = batched(), separate()  # warm-up, and the equality check
    err = float((a - b).abs().max() / b.abs().max())
    times = {"batched sweep": [], "separate runs": []}
    for _ in range(args.rounds):
        for name, fn in (("batched sweep", batched), ("separate runs", separate)):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    tb, ts = statistics.median(times["batched sweep"]), statistics.median(times["separate runs"])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        batched()
        torch.cuda.synchronize()
        peak = f", sweep peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    else:
        peak = ""
    print(f"λ sweep {lambdas} on {args.family} stand-ins, {args.size}x{args.size}, {args.steps} steps, {args.sampler}, "
          f"{args.rounds} rounds, {args.device}{' (CPU-only figures)' if args.device == 'cpu' else ''}"
          f"{', Dynamic VRAM on' if args.dynamic_vram else ''}{peak}")
    print(f"batched sweep: {tb:.2f} s   separate runs: {ts:.2f} s   speed-up: {ts / tb:.2f}x   "
          f"max relative difference of the latents: {err:.1e}")


if __name__ == "__main__":
    main()
