"""Time per step of DeRaDiff KSampler against ComfyUI's plain KSampler, side by side in one run.

    python benchmarks/bench_sampling.py [--family sd15|sdxl|sd15_full|sdxl_full] [--size 256] [--steps 20]
                                        [--repeats 3] [--device cpu|cuda] [--dynamic-vram]

Targets: λ=0.5 at most 2.05x the plain KSampler (2.0x is the floor for two full models);
λ=0 and λ=1 at most 1.03x; a schedule at 0 or 1 on part of the steps pays two passes only there;
difference reuse (full_pass_every) 2 at most 1.55x and 3 at most 1.4x; the reference + LoRA pair
run as one fused batch faster than the same pair as two passes (on a GPU).

``*_full`` families are real-architecture UNets with random weights (SD1.5: 860 M parameters,
SDXL: 2.6 B), written on first use; the text encoder is the small stand-in's. ``--dynamic-vram``
turns on ComfyUI's Dynamic VRAM the way its main.py does (NVIDIA, ComfyUI with comfy-aimdo).

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


# Full-size SDXL UNet (2.6 B parameters), the config ComfyUI detects as SDXL.
SDXL_FULL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], context_dim=2048, num_heads=-1,
    num_head_channels=64, use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
    adm_in_channels=2816, num_classes="sequential", use_temporal_attention=False, use_temporal_resblock=False)
FULL_FILES = {  # family -> (small stand-in checkpoint for the text encoder, seeds)
    "sd15_full": ("sd15_reference.safetensors", (710, 720, 730)),
    "sdxl_full": ("sdxl_reference.safetensors", (740, 750, 760)),
}


def enable_dynamic_vram():
    """What ComfyUI's main.py does when Dynamic VRAM is on (0.33+, NVIDIA, comfy-aimdo installed)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        raise SystemExit("--dynamic-vram: this ComfyUI has no Dynamic VRAM (0.33 or newer needed)")
    import comfy_aimdo.control
    try:
        comfy_aimdo.control.init()
    except TypeError:
        pass
    devices = [d for d in mm.get_all_torch_devices() if getattr(d, "type", "") == "cuda"]
    if not devices or not comfy_aimdo.control.init_devices(d.index for d in devices):
        raise SystemExit("--dynamic-vram: comfy-aimdo did not initialise (NVIDIA GPU needed)")
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    import comfy.memory_management
    comfy.memory_management.aimdo_enabled = True


def setup(device, dynamic_vram=False, family="sd15"):
    import comfyui_runtime
    root = comfyui_runtime.comfyui_root()
    comfyui_runtime.install_comfyui(root) if not (root / "main.py").exists() else None
    comfyui_runtime.add_to_path(root, cpu=(device == "cpu"))
    if dynamic_vram:
        enable_dynamic_vram()
    import standins
    models = standins.ensure_all_standins()
    if family in FULL_FILES:
        standins.UNET_CONFIGS.setdefault("sdxl_full", SDXL_FULL_UNET)
        _, (ref_seed, al_seed, lora_seed) = FULL_FILES[family]
        for name, seed in ((f"{family}_reference_unet", ref_seed), (f"{family}_aligned_unet", al_seed)):
            path = models / "diffusion_models" / f"{name}.safetensors"
            if not path.exists():
                standins.write_unet(str(path), family, seed)
        lora = models / "loras" / f"{family}_lora.safetensors"
        if not lora.exists():
            standins.write_lora(str(lora), family, lora_seed, rank=32)
    import folder_paths
    for folder in ("checkpoints", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(models / folder), is_default=True)
    import conftest
    return conftest.load_pack()


def load_models(family, h):
    """(reference, aligned, reference + LoRA, clip) for a family."""
    import nodes
    if family == "sd15":
        ref, clip, _ = h.load_checkpoint("sd15_reference.safetensors")
        aligned = h.load_checkpoint("sd15_aligned.safetensors")[0]
        lora_name = "sd15_aligned_lora.safetensors"
    elif family == "sdxl":
        ref, clip, _ = h.load_checkpoint("sdxl_reference.safetensors")
        aligned = h.load_unet("sdxl_aligned_unet.safetensors")
        lora_name = "sdxl_aligned_lora.safetensors"
    else:
        clip = h.load_checkpoint(FULL_FILES[family][0])[1]
        ref = h.load_unet(f"{family}_reference_unet.safetensors")
        aligned = h.load_unet(f"{family}_aligned_unet.safetensors")
        lora_name = f"{family}_lora.safetensors"
    with_lora = nodes.LoraLoader().load_lora(ref, clip, lora_name, 1.0, 0.0)[0]
    return ref, aligned, with_lora, clip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sd15", "sdxl", "sd15_full", "sdxl_full"], default="sd15")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sampler", default="euler_ancestral")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dynamic-vram", action="store_true", help="ComfyUI's Dynamic VRAM on (CUDA, ComfyUI 0.33+)")
    ap.add_argument("--only", default="", help="comma-separated configuration names to run (default: all)")
    args = ap.parse_args()
    pack = setup(args.device, args.dynamic_vram, args.family)

    import torch
    import comfy.model_management as mm
    import comfy_helpers as h
    import nodes

    from comfyui_deradiff.sampler import guider as guider_mod
    ref, aligned, with_lora, clip = load_models(args.family, h)
    pos, neg = h.encode(clip, "a red fox in the snow"), h.encode(clip, "blurry")
    latent = h.empty_latent(args.size, args.size)
    pair = pack.nodes.DeRaDiffMakePair.execute(ref, aligned)[0]
    lora_pair = pack.nodes.DeRaDiffMakePair.execute(ref, with_lora)[0]
    sampler_node = pack.nodes.DeRaDiffKSampler()

    def plain():
        return nodes.KSampler().sample(ref, 1, args.steps, 7.0, args.sampler, "normal", pos, neg, latent)

    def realigned(lam, every=1, on=pair):
        return lambda: sampler_node.execute(on, 1, args.steps, 7.0, args.sampler, "normal", pos, neg, latent,
                                            1.0, **{"lambda": lam, "full_pass_every": every})

    def unfused(fn):
        def run():
            original = guider_mod.can_fuse
            guider_mod.can_fuse = lambda pair, side: False
            try:
                return fn()
            finally:
                guider_mod.can_fuse = original
        return run

    def scheduled(**kw):
        sched = pack.nodes.DeRaDiffLambdaSchedule.execute(preview_steps=args.steps, **kw).result[0]
        return lambda: sampler_node.execute(pair, 1, args.steps, 7.0, args.sampler, "normal", pos, neg, latent,
                                            1.0, **{"lambda": 1.0, "lambda_schedule": sched})

    half = dict(lambda_to=0.0, start_percent=0.0, end_percent=0.5, custom_values="", lambda_outside=1.0)
    configs = {"KSampler (reference only)": plain, "DeRaDiff λ=0": realigned(0.0),
               "DeRaDiff λ=1": realigned(1.0), "DeRaDiff λ=0.5": realigned(0.5),
               "schedule 0 then 1": scheduled(shape="interval", lambda_from=0.0, **half),
               "schedule 0.5 then 1": scheduled(shape="interval", lambda_from=0.5, **half),
               "λ=0.5 full_pass_every=2": realigned(0.5, 2), "λ=0.5 full_pass_every=3": realigned(0.5, 3),
               "LoRA pair λ=0.5 fused": realigned(0.5, on=lora_pair),
               "LoRA pair λ=0.5 two passes": unfused(realigned(0.5, on=lora_pair))}
    if args.only:
        wanted = {"KSampler (reference only)"} | {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - configs.keys()
        if unknown:
            raise SystemExit(f"--only: unknown configuration(s) {sorted(unknown)}; known: {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k in wanted}
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
    dtype = getattr(ref.model, "manual_cast_dtype", None) or ref.model_dtype()
    print(f"{args.family} stand-ins, {args.size}x{args.size}, {args.steps} steps, {args.sampler}, "
          f"{args.repeats} interleaved repeats, {where}, weights {dtype}"
          + (", Dynamic VRAM on" if args.dynamic_vram else ""))
    mem = "peak GPU MiB" if cuda else "peak RSS growth MiB (activations)"
    print(f"{'configuration':30s} {'s/step (median)':>16s} {'ratio':>7s}  {mem}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:30s} {med:16.4f} {med / base:7.3f}  {peaks[name] / 2**20:12.0f}")
    mm.unload_all_models()


if __name__ == "__main__":
    main()
