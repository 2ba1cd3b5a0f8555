"""Headless DeRaDiff generation through a real ComfyUI server.

With your own models:
    python scripts/run_deradiff.py --reference /path/sd15.safetensors \\
        --aligned-unet /path/dpo_unet.safetensors --beta 5000 --lambda 0.5 --prompt "a fox"
(--aligned-checkpoint for a full aligned checkpoint). Without --reference it uses small
generated stand-in models (random weights: the image is noise, but every step is real).
--compare also times a plain KSampler on the reference and prints the ratio.

It sets up what it needs: a ComfyUI tree (DERADIFF_COMFYUI, or ComfyUI 0.3.75 unpacked into
.cache/comfyui) and, when they are missing from this Python, that tree's requirements.
Extra ComfyUI server arguments (e.g. --lowvram): DERADIFF_SERVER_ARGS="--lowvram".
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import comfy_server  # noqa: E402
import comfyui_runtime  # noqa: E402


def deradiff_graph(ref_name, aligned_choice, args, seed):
    return {
        "1": {"class_type": "DeRaDiffLoadAlignedPair", "inputs": {
            "reference_ckpt_name": ref_name, "aligned_model": aligned_choice, "beta": args.beta}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": args.prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": args.negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": args.width, "height": args.height, "batch_size": 1}},
        "5": {"class_type": "DeRaDiffKSampler", "inputs": {
            "pair": ["1", 0], "lambda": args.lam, "seed": seed, "steps": args.steps, "cfg": args.cfg,
            "sampler_name": args.sampler, "scheduler": args.scheduler, "positive": ["2", 0],
            "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "deradiff"}},
    }


def plain_graph(ref_name, args, seed):
    g = deradiff_graph(ref_name, "", args, seed)
    g["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ref_name}}
    inputs = dict(g["5"]["inputs"], model=["1", 0])
    for k in ("pair", "lambda"):
        inputs.pop(k)
    g["5"] = {"class_type": "KSampler", "inputs": inputs}
    g["7"]["inputs"]["filename_prefix"] = "ksampler"
    return g


def link_models(args, models_dir: Path):
    """Expose the user's files (or the stand-ins) to ComfyUI; returns the names to use."""
    if args.reference is None:
        import standins
        print("No --reference given: using generated SD1.5 stand-in models (random weights; the "
              "image shows noise, the sampling path is the real one).")
        src = standins.ensure_all_standins()
        return src, "sd15_reference.safetensors", "checkpoints/sd15_aligned.safetensors"
    for sub in ("checkpoints", "diffusion_models"):
        (models_dir / sub).mkdir(parents=True, exist_ok=True)
    ref = Path(args.reference).resolve()
    (models_dir / "checkpoints" / ref.name).symlink_to(ref)
    if args.aligned_checkpoint:
        al = Path(args.aligned_checkpoint).resolve()
        folder = "checkpoints"
    elif args.aligned_unet:
        al = Path(args.aligned_unet).resolve()
        folder = "diffusion_models"
    else:
        sys.exit("give --aligned-checkpoint or --aligned-unet together with --reference")
    target = models_dir / folder / al.name
    if not target.exists():
        target.symlink_to(al)
    return models_dir, ref.name, f"{folder}/{al.name}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", help="reference checkpoint file")
    ap.add_argument("--aligned-checkpoint", help="aligned model as a full checkpoint")
    ap.add_argument("--aligned-unet", help="aligned model as a diffusion-model-only file")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=0.0, help="beta of the aligned model (for the log)")
    ap.add_argument("--prompt", default="a photograph of a red fox in the snow")
    ap.add_argument("--negative", default="blurry, low quality")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--sampler", default="euler_ancestral")
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="deradiff.png")
    ap.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    ap.add_argument("--compare", action="store_true", help="also time a plain KSampler on the reference")
    args = ap.parse_args()
    default_size = 512 if args.reference else 256
    args.width = args.width or default_size
    args.height = args.height or default_size

    root = comfyui_runtime.ensure_runtime()
    comfyui_runtime.add_to_path(root, cpu=True)  # the stand-ins are written in this process, on the CPU
    workdir = Path(tempfile.mkdtemp(prefix="deradiff-run-"))
    try:
        run(args, root, workdir)
    except BaseException:
        print(f"kept {workdir} (ComfyUI's log is in its comfy/ folder)", file=sys.stderr)
        raise
    # only links and ComfyUI's scratch files: the stand-ins stay in .cache
    shutil.rmtree(workdir, ignore_errors=True)


def run(args, root, workdir: Path):
    models_dir, ref_name, aligned_choice = link_models(args, workdir / "models")
    with comfy_server.ComfyServer(root, models_dir, workdir / "comfy", cpu=not args.gpu) as server:
        print(f"ComfyUI {root} is up; log: {server.log_path}")
        timings = {}
        graphs = {"deradiff": lambda s: deradiff_graph(ref_name, aligned_choice, args, s)}
        if args.compare:
            graphs["ksampler"] = lambda s: plain_graph(ref_name, args, s)
            for make in graphs.values():  # warm-up: loads models, so the timed runs only sample
                server.run(make(args.seed + 1000))
        for name, make in graphs.items():
            t0 = time.perf_counter()
            entry = server.run(make(args.seed))
            timings[name] = time.perf_counter() - t0
            images = server.output_images(entry)
            if name == "deradiff":
                shutil.copy(images[0], args.out)
        print(f"DeRaDiff λ={args.lam:g}, {args.steps} steps, {args.width}x{args.height}: "
              f"{timings['deradiff']:.2f} s -> {args.out}")
        if args.compare:
            print(f"plain KSampler, same settings: {timings['ksampler']:.2f} s; "
                  f"ratio DeRaDiff / KSampler = {timings['deradiff'] / timings['ksampler']:.2f}")


if __name__ == "__main__":
    main()
