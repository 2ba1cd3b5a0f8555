"""Time per step of DeRaDiff KSampler against ComfyUI's plain KSampler, side by side in one run.

    python benchmarks/bench_sampling.py [--family sd15|sdxl] [--size 256] [--steps 20] [--repeats 3] [--device cpu|cuda]

Targets: λ=0.5 at most 2.05x the plain KSampler (2.0x is the floor for two full models);
λ=0 and λ=1 at most 1.03x; a schedule at 0 or 1 on part of the steps pays two passes only there.

Runs in one process through ComfyUI's own loaders and samplers on the generated stand-in
models (or --reference/--aligned checkpoint names in models/checkpoints and diffusion_models).
Configurations are interleaved (A B C D A B C D ...) so that drift in machine speed hits all of
them alike; the figures quoted are medians and ratios to the plain KSampler.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))


def setup(device):
    import comfyui_runtime
    root = comfyui_runtime.comfyui_root()
    comfyui_runtime.install_comfyui(root) if not (root / "main.py").exists() else None
    comfyui_runtime.add_to_path(root, cpu=(device == "cpu"))
    import standins
    models = standins.ensure_all_standins()
    import folder_paths
    for folder in ("checkpoints", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(models / folder), is_default=True)
    import conftest
    return conftest.load_pack()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sampler", default="euler_ancestral")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    pack = setup(args.device)

    import torch
    import comfy.model_management as mm
    import comfy_helpers as h
    import nodes

    if args.family == "sd15":
        ref, clip, _ = h.load_checkpoint("sd15_reference.safetensors")
        aligned = h.load_checkpoint("sd15_aligned.safetensors")[0]
    else:
        ref, clip, _ = h.load_checkpoint("sdxl_reference.safetensors")
        aligned = h.load_unet("sdxl_aligned_unet.safetensors")
    pos, neg = h.encode(clip, "a red fox in the snow"), h.encode(clip, "blurry")
    latent = h.empty_latent(args.size, args.size)
    pair = pack.nodes.DeRaDiffMakePair().make(ref, aligned)[0]
    sampler_node = pack.nodes.DeRaDiffKSampler()

    def plain():
        return nodes.KSampler().sample(ref, 1, args.steps, 7.0, args.sampler, "normal", pos, neg, latent)

    def realigned(lam):
        return lambda: sampler_node.sample(pair, 1, args.steps, 7.0, args.sampler, "normal", pos, neg, latent,
                                           1.0, **{"lambda": lam})

    def scheduled(**kw):
        sched = pack.nodes.DeRaDiffLambdaSchedule().build(preview_steps=args.steps, **kw)["result"][0]
        return lambda: sampler_node.sample(pair, 1, args.steps, 7.0, args.sampler, "normal", pos, neg, latent,
                                           1.0, **{"lambda": 1.0, "lambda_schedule": sched})

    half = dict(lambda_to=0.0, start_percent=0.0, end_percent=0.5, custom_values="", lambda_outside=1.0)
    configs = {"KSampler (reference only)": plain, "DeRaDiff λ=0": realigned(0.0),
               "DeRaDiff λ=1": realigned(1.0), "DeRaDiff λ=0.5": realigned(0.5),
               "schedule 0 then 1": scheduled(shape="interval", lambda_from=0.0, **half),
               "schedule 0.5 then 1": scheduled(shape="interval", lambda_from=0.5, **half)}
    cuda = args.device == "cuda"
    from bench_shared_weights import PeakRSS, rss_bytes
    times = {k: [] for k in configs}
    peaks = {k: 0 for k in configs}
    for fn in configs.values():  # warm-up: loads both models once
        fn()
    for _ in range(args.repeats):
        for name, fn in configs.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                watcher, start = PeakRSS(), rss_bytes()
                watcher.start()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
            else:
                watcher.running = False
                watcher.join()
                peaks[name] = max(peaks[name], watcher.peak - start)
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["KSampler (reference only)"])
    where = torch.cuda.get_device_name() if cuda else "CPU (figures are CPU-only)"
    print(f"{args.family} stand-ins, {args.size}x{args.size}, {args.steps} steps, {args.sampler}, "
          f"{args.repeats} interleaved repeats, {where}")
    mem = "peak GPU MiB" if cuda else "peak RSS growth MiB (activations)"
    print(f"{'configuration':28s} {'s/step (median)':>16s} {'ratio':>7s}  {mem}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28s} {med:16.4f} {med / base:7.3f}  {peaks[name] / 2**20:12.0f}")
    mm.unload_all_models()


if __name__ == "__main__":
    main()
