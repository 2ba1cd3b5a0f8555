"""Memory and time of the three ways to hold a pair, side by side in one run:

  reference alone            plain KSampler on the reference UNet
  shared-weight pair         reference + LoRA: one UNet, the update applied on the fly
  two-full-models pair       reference UNet + a second full aligned UNet

    python benchmarks/bench_shared_weights.py [--size 64] [--steps 4] [--rounds 2] [--device cpu|cuda]

Each configuration runs in its own process (so peak memory is its own), in rounds
(A B C A B C ...) so that drift in machine speed hits all alike. Memory: on CUDA the peak of
torch's allocator; on a CPU the peak resident set size above the process's size before any
diffusion model was loaded (a sampling thread reads /proc), both taken while sampling after a
warm-up run, so the weights, activations and on-the-fly updates count, and the transient of
reading a file at load time does not. Models: full-size SD1.5 UNet
stand-ins (860 M parameters, random weights) so the weights, not Python, dominate; prompts are
random conditioning tensors, so no text encoder is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))
CONFIGS = ("reference alone", "shared-weight pair (LoRA)", "two-full-models pair")
FILES = ("diffusion_models/sd15_full_reference_unet.safetensors",
         "diffusion_models/sd15_full_aligned_unet.safetensors", "loras/sd15_full_lora.safetensors")
# --tiny: the small SD1.5 stand-ins, to check that the benchmark runs (figures not meaningful)
TINY_FILES = ("diffusion_models/sd15_aligned_unet.safetensors",
              "diffusion_models/sd15_aligned_unet_fp32.safetensors", "loras/sd15_aligned_lora.safetensors")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)


def one(config: str, size: int, steps: int, device: str, files=FILES) -> dict:
    import comfyui_runtime
    comfyui_runtime.add_to_path(cpu=(device == "cpu"))
    import standins
    import folder_paths
    for folder in ("checkpoints", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(standins.STANDIN_DIR / folder), is_default=True)
    import torch
    import conftest
    import nodes
    pack = conftest.load_pack()
    cuda = device == "cuda"
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0)), {}]]
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    ref = nodes.UNETLoader().load_unet(os.path.basename(files[0]), "default")[0]
    if config == CONFIGS[1]:
        pair = pack.nodes.DeRaDiffLoadAlignedPair()._apply_lora(ref, "lora", str(standins.STANDIN_DIR / files[2]), 1.0)
        pair = pack.nodes.DeRaDiffMakePair.execute(ref, pair)[0]
        assert pair.aligned_side().shared is not None
    elif config == CONFIGS[2]:
        aligned = nodes.UNETLoader().load_unet(os.path.basename(files[1]), "default")[0]
        pair = pack.nodes.DeRaDiffMakePair.execute(ref, aligned)[0]

    def run():
        if config == CONFIGS[0]:
            return nodes.KSampler().sample(ref, 1, steps, 5.0, "euler", "normal", cond, cond, latent)
        return pack.nodes.DeRaDiffKSampler.execute(pair, 1, steps, 5.0, "euler", "normal", cond, cond, latent,
                                                   1.0, **{"lambda": 0.5})
    run()  # warm-up (loads to the device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # peak while sampling (weights + activations + on-the-fly updates), not the transient
    # of reading a file at load time
    watcher = PeakRSS()
    watcher.start()
    t0 = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    watcher.running = False
    watcher.join()
    peak = torch.cuda.max_memory_allocated() if cuda else watcher.peak
    return {"config": config, "s_per_step": seconds, "peak_bytes": peak - base}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tiny", action="store_true", help="small stand-ins: checks the benchmark runs")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    files = TINY_FILES if args.tiny else FILES
    if args.one:
        print(json.dumps(one(args.one, args.size, args.steps, args.device, files)))
        return
    import comfyui_runtime
    comfyui_runtime.add_to_path(cpu=True)
    import standins
    for name in files:
        standins.ensure_standin(name)
    results = {c: [] for c in CONFIGS}
    for _ in range(args.rounds):
        for config in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--one", config, "--size", str(args.size), "--steps",
                                  str(args.steps), "--device", args.device] + (["--tiny"] if args.tiny else []),
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{config} failed:\n{out.stderr[-3000:]}")
            results[config].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref_m = statistics.median(r["peak_bytes"] for r in results[CONFIGS[0]])
    two_t = statistics.median(r["s_per_step"] for r in results[CONFIGS[2]])
    print(f"{'tiny' if args.tiny else 'full-size'} SD1.5 UNet stand-ins, {args.size}x{args.size}, {args.steps} steps, λ=0.5, euler, "
          f"{args.rounds} rounds, {args.device}{' (CPU-only figures)' if args.device == 'cpu' else ''}")
    print(f"{'configuration':28s} {'s/step':>8s} {'peak MiB':>9s} {'mem/ref':>8s} {'time/two-full':>14s}")
    for config in CONFIGS:
        t = statistics.median(r["s_per_step"] for r in results[config])
        m = statistics.median(r["peak_bytes"] for r in results[config])
        print(f"{config:28s} {t:8.3f} {m / 2**20:9.0f} {m / ref_m:8.3f} {t / two_t:14.3f}")


if __name__ == "__main__":
    main()
