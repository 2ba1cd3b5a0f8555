"""The GPU figures of docs/benchmarks.md in one command, on any CUDA machine:

    python benchmarks/bench_gpu.py [--steps 20] [--repeats 3] [--families sd15_full,sdxl_full] [--quick]

For SD1.5 at 512x512 and SDXL at 1024x1024 (real-architecture UNets with random weights, written
on first use; ComfyUI runs them in fp16 on a GPU), with ComfyUI's Dynamic VRAM off and on (on
needs ComfyUI 0.33+ with comfy-aimdo): time per step of plain KSampler, DeRaDiff λ=0, 1, 0.5,
full_pass_every 2 and 3, the reference + LoRA pair fused and as two passes (ratios to plain
KSampler, measured side by side in one process), peak GPU memory; and a λ sweep of 8 against
8 separate runs. Each configuration runs in its own process (benchmarks/bench_sampling.py,
benchmarks/bench_sweep.py) so that one's memory never counts against another's. The output is a
markdown report (also written to --out) to paste into docs/benchmarks.md with the device name and date.
``--quick`` is a smoke run (small sizes, 2 steps); it runs on a CPU too (--device cpu).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {"sd15": 512, "sd15_full": 512, "sdxl": 1024, "sdxl_full": 1024}
SWEEP = "0,0.25,0.5,0.75,1,1.25,1.5,2"


def run(args, label):
    command = [sys.executable, *map(str, args)]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        return f"**{label}: failed (exit {done.returncode})**\n\n```\n{tail}\n```\n"
    return f"**{label}** ({time.perf_counter() - t0:.0f} s)\n\n```\n" + "\n".join(lines[-16:]) + "\n```\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="sd15_full,sdxl_full")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dynamic-vram", choices=["both", "off", "on"], default="both")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64x64 stand-ins, 2 steps, 1 repeat")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.md"))
    args = ap.parse_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu: no CUDA device here (use --device cpu --quick for a smoke run)")
        device_name = torch.cuda.get_device_name()
    else:
        device_name = "CPU"
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.dynamic_vram]
    if args.device == "cpu":
        modes = [False]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    steps, repeats = (2, 1) if args.quick else (args.steps, args.repeats)
    report = [f"# DeRaDiff GPU figures\n\nDevice: {device_name}. Command: `python benchmarks/bench_gpu.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n"]
    for family in families:
        size = 64 if args.quick else SIZES[family]
        for dynamic in modes:
            flag = ["--dynamic-vram"] if dynamic else []
            where = f"{family}, {size}x{size}, Dynamic VRAM {'on' if dynamic else 'off'}"
            report.append(run(["benchmarks/bench_sampling.py", "--family", family, "--size", size, "--steps", steps,
                               "--repeats", repeats, "--device", args.device, *flag], f"time per step: {where}"))
            print(report[-1], flush=True)
            report.append(run(["benchmarks/bench_sweep.py", "--family", family, "--size", size, "--steps", steps,
                               "--rounds", max(1, repeats - 1), "--lambdas", SWEEP, "--device", args.device, *flag],
                              f"λ sweep of 8 vs 8 runs: {where}"))
            print(report[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(report))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
