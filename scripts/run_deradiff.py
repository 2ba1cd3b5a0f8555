"""Headless DeRaDiff generation through a real ComfyUI server.

Without arguments: the tiny trained family committed in tiny_family/ (an SD1.5-format model
trained here on 32×32 coloured shapes, with Diffusion-DPO LoRAs at several β that reward
colourfulness). One DeRaDiff λ Sweep (λ = 0, 0.5, 1, 2, 4 from the β = 1000 LoRA, four seeds)
runs through the server and a labelled grid is written to deradiff_lambda_grid.png: a row per λ,
a column per seed, with the family's reward of each row printed.

With your own models:
    python scripts/run_deradiff.py --reference /path/sd15.safetensors \\
        --aligned-unet /path/dpo_unet.safetensors --beta 5000 --lambda 0.5 --prompt "a fox"
(--aligned-checkpoint for a full aligned checkpoint): one image at --lambda.
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

# the tiny family's prompt for the λ grid (the README's image; the browser test's tiny workflow too)
TINY_PROMPT = "a large white circle in the middle on a grey background"


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


def sweep_graph(ref_name, aligned_choice, args, seed):
    """λ Sweep → VAE Decode → nearest upscale (the family's images are 32×32) → Sweep Grid → Save."""
    g = deradiff_graph(ref_name, aligned_choice, args, seed)
    g["4"]["inputs"]["batch_size"] = args.seeds
    g["5"] = {"class_type": "DeRaDiffLambdaSweep", "inputs": dict(
        {k: v for k, v in g["5"]["inputs"].items() if k != "lambda"}, lambdas=args.lambdas)}
    g["8"] = {"class_type": "ImageScale", "inputs": {
        "image": ["6", 0], "upscale_method": "nearest-exact", "width": args.width * args.zoom,
        "height": args.height * args.zoom, "crop": "disabled"}}
    g["9"] = {"class_type": "DeRaDiffSweepGrid", "inputs": {"images": ["8", 0], "labels": ["5", 1],
                                                           "columns": args.seeds}}
    g["7"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "deradiff_grid"}}
    g["10"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "deradiff_cells"}}
    return g


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
    """Expose the user's files (or the tiny family) to ComfyUI; returns the names to use."""
    if args.reference is None:
        import tiny_family
        print(f"No --reference given: the tiny trained family ({tiny_family.FAMILY_DIR.relative_to(tiny_family.REPO)}/, "
              f"SD1.5 format, 32×32 shapes), aligned LoRA β = {args.beta:g}.")
        paths = tiny_family.materialize()
        lora = f"{tiny_family.SUBFOLDER}/{tiny_family.lora_file(args.beta).split('/')[-1]}"
        if not (tiny_family.MODELS_DIR / "loras" / lora).exists():
            sys.exit(f"the tiny family has no LoRA at β = {args.beta:g}; its β: "
                     + ", ".join(f"{x['beta']:g}" for x in tiny_family.load_manifest()["loras"]))
        return tiny_family.MODELS_DIR, tiny_family.CHECKPOINT_NAME, "loras/" + lora
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
    ap.add_argument("--lambda", dest="lam", type=float, default=0.5, help="λ of the single image (own models, --compare)")
    ap.add_argument("--lambdas", default="0, 0.5, 1, 2, 4", help="tiny family: the λ of the grid's rows")
    ap.add_argument("--seeds", type=int, default=4, help="tiny family: the grid's columns")
    ap.add_argument("--beta", type=float, default=None,
                    help="β of the aligned model (labels β/λ); tiny family: which LoRA (default 1000)")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--negative", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--sampler", default="euler_ancestral")
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: deradiff_lambda_grid.png (tiny family), deradiff.png")
    ap.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    ap.add_argument("--compare", action="store_true", help="also time a plain KSampler on the reference")
    args = ap.parse_args()
    tiny = args.reference is None
    defaults = (dict(size=32, beta=1000.0, cfg=4.0, out="deradiff_lambda_grid.png", negative="",
                     prompt=TINY_PROMPT) if tiny else
                dict(size=512, beta=0.0, cfg=7.0, out="deradiff.png", negative="blurry, low quality",
                     prompt="a photograph of a red fox in the snow"))
    args.width = args.width or defaults["size"]
    args.height = args.height or defaults["size"]
    for key in ("beta", "cfg", "out", "negative", "prompt"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.tiny, args.zoom = tiny, 4

    t0 = time.perf_counter()
    root = comfyui_runtime.ensure_runtime()
    comfyui_runtime.add_to_path(root, cpu=True)  # the family's files are written in this process, on the CPU
    workdir = Path(tempfile.mkdtemp(prefix="deradiff-run-"))
    try:
        run(args, root, workdir)
    except BaseException:
        print(f"kept {workdir} (ComfyUI's log is in its comfy/ folder)", file=sys.stderr)
        raise
    # only links and ComfyUI's scratch files: the family's model files stay in .cache
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")


def run(args, root, workdir: Path):
    models_dir, ref_name, aligned_choice = link_models(args, workdir / "models")
    with comfy_server.ComfyServer(root, models_dir, workdir / "comfy", cpu=not args.gpu) as server:
        print(f"ComfyUI {root} is up; log: {server.log_path}")
        if args.tiny:
            grid(server, ref_name, aligned_choice, args)
            if not args.compare:
                return
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
            if name == "deradiff" and not args.tiny:
                shutil.copy(images[0], args.out)
        print(f"DeRaDiff λ={args.lam:g}, {args.steps} steps, {args.width}x{args.height}: "
              f"{timings['deradiff']:.2f} s" + ("" if args.tiny else f" -> {args.out}"))
        if args.compare:
            print(f"plain KSampler, same settings: {timings['ksampler']:.2f} s; "
                  f"ratio DeRaDiff / KSampler = {timings['deradiff'] / timings['ksampler']:.2f}")


def grid(server, ref_name, aligned_choice, args):
    """The λ Sweep grid of the tiny family, and the family's reward of each λ's images."""
    import torch
    import tiny_family
    t0 = time.perf_counter()
    entry = server.run(sweep_graph(ref_name, aligned_choice, args, args.seed))
    files = server.output_images(entry)
    grid_file = next(f for f in files if f.name.startswith("deradiff_grid"))
    cells = sorted(f for f in files if f.name.startswith("deradiff_cells"))
    shutil.copy(grid_file, args.out)
    rewards = torch.tensor(tiny_family.score_files([str(f) for f in cells]))
    lambdas = [float(v) for v in args.lambdas.split(",")]
    print(f"DeRaDiff λ Sweep, prompt '{args.prompt}', {args.seeds} seeds, {args.steps} steps {args.sampler}, "
          f"cfg {args.cfg:g}: {time.perf_counter() - t0:.1f} s -> {args.out}")
    print("λ      β/λ     reward (colourfulness, mean ± SE over the row)")
    for i, lam in enumerate(lambdas):
        r = rewards[i * args.seeds:(i + 1) * args.seeds]
        se = float(r.std() / len(r) ** 0.5) if len(r) > 1 else 0.0
        emulated = "∞ (ref)" if lam == 0 else f"{args.beta / lam:g}"
        print(f"{lam:<6g} {emulated:<7} {float(r.mean()):6.2f} ± {se:.2f}")


if __name__ == "__main__":
    main()
