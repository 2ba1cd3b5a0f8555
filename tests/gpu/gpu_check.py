"""The pack's core guarantees on a CUDA GPU, with ComfyUI's Dynamic VRAM on and off and in its
low-VRAM and no-VRAM modes.

    python tests/gpu/gpu_check.py                     # CUDA: Dynamic VRAM on, off, --lowvram, --novram
    python tests/gpu/gpu_check.py --device cpu        # the same checks on the CPU (dry run)
    DERADIFF_COMFYUI=/path/to/ComfyUI python tests/gpu/gpu_check.py   # e.g. the newest ComfyUI

Each mode runs in its own Python process, initialised the way ComfyUI's main.py initialises
itself (comfy-aimdo, then ``comfy.model_patcher.CoreModelPatcher = ModelPatcherDynamic`` when
Dynamic VRAM is on; ``--disable-dynamic-vram`` turns it off; ``--lowvram`` / ``--novram`` set
before comfy.model_management is imported, which reads them once). The runs on CUDA:

  dynamic_on   Dynamic VRAM on (where the ComfyUI has it), normal VRAM
  normal       Dynamic VRAM off, normal VRAM: the reference run of the comparison below
  lowvram      Dynamic VRAM off, --lowvram (newer ComfyUI ignores --lowvram while Dynamic VRAM
               is on, so it is checked with Dynamic VRAM off: the classic partial loading)
  novram       Dynamic VRAM off (--novram turns it off anyway), --novram

Checks, in every run:
  1. λ=0 and λ=1 equal plain KSampler on the reference / aligned model, bit for bit;
  2. reference + {LoRA, LoHa, LoKr, DoRA, full difference} (shared weights) equals the pair
     with the same file merged into an independent copy, at λ = 0.5 and 1;
  3. plain KSampler on the reference is unchanged after DeRaDiff prompts (no weight drift);
  4. a λ sweep equals separate runs.
and, across runs: the latents of every other run (a plain KSampler on the reference, the pair
at λ = 0.5 in a sweep, the reference + LoRA pair at λ = 0.5, the whole sweep) equal those of the
``normal`` run within TOL (low/no VRAM patch LoRA weights layer by layer at cast time instead of
once in place, which may round fp16/bf16 weights differently; bit-identity is reported too).
On the CPU (``--device cpu``) ComfyUI uses no VRAM mode at all (its state is DISABLED): the dry
run does the ``normal`` and ``lowvram`` runs, which exercises the whole logic, comparison included.
Exit status 0 when every check passes, or (with a message) when there is no CUDA device;
1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOL = 2e-3  # relative to the largest latent value (fp16 / bf16 rounding of the update)
# run name -> (Dynamic VRAM requested, VRAM flag)
RUNS = {"dynamic_on": (True, None), "normal": (False, None), "lowvram": (False, "lowvram"),
        "novram": (False, "novram")}
REFERENCE_RUN = "normal"


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


# --------------------------------------------------------------------- child process ---------
def _init_comfyui(device: str, dynamic: bool, vram: str | None = None):
    sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]
    import comfyui_runtime
    root = comfyui_runtime.comfyui_root()
    comfyui_runtime.add_to_path(root)
    import comfy.cli_args
    args = comfy.cli_args.args
    if device == "cpu":
        args.cpu = True
    if hasattr(args, "disable_dynamic_vram"):
        args.disable_dynamic_vram = not dynamic
    if vram is not None:  # main.py would refuse it with --cpu; ComfyUI ignores it on the CPU anyway
        setattr(args, vram, True)
    dynamic_on = False
    enables = getattr(comfy.cli_args, "enables_dynamic_vram", None)
    if enables is not None and enables():  # main.py's order: aimdo before model_management
        import comfy_aimdo.control
        try:
            comfy_aimdo.control.init()
        except Exception as e:  # noqa: BLE001
            print(f"comfy-aimdo init failed: {e}", file=sys.stderr)
    import comfy.model_management as mm
    import comfy.model_patcher
    if enables is not None and enables() and mm.is_nvidia():
        import comfy_aimdo.control
        try:
            ok = comfy_aimdo.control.init_devices((d.index, int(getattr(args, "vram_headroom", 0) * 1024 ** 3))
                                                  for d in mm.get_all_torch_devices())
        except TypeError:
            ok = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
        if ok:
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            import comfy.memory_management
            comfy.memory_management.aimdo_enabled = True
            dynamic_on = True
    import folder_paths
    from standins import ensure_all_standins
    standin_dir = ensure_all_standins()
    for folder in ("checkpoints", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(standin_dir / folder), is_default=True)
    import nodes  # noqa: F401
    return root, dynamic_on


def _load_pack():
    import importlib.util
    spec = importlib.util.spec_from_file_location("comfyui_deradiff", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_deradiff"] = module
    spec.loader.exec_module(module)
    return module


def run_checks(device: str, dynamic: bool, vram: str | None = None, latents_path: str | None = None) -> dict:
    root, dynamic_on = _init_comfyui(device, dynamic, vram)
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import folder_paths
    import nodes
    from comfy_helpers import empty_latent, encode, ksampler
    from test_copy_and_patches_inprocess import write_adapters
    pack = _load_pack()
    results = {"device": str(mm.get_torch_device()), "comfyui": str(root), "dynamic_vram": dynamic_on,
               "vram_state": mm.vram_state.name, "patcher_class": None, "checks": {}}
    latents = {}  # compared across runs by the parent
    checks = results["checks"]

    def record(name, ok, detail=""):
        checks[name] = {"ok": bool(ok), "detail": detail}

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    ckpt = folder_paths.get_full_path("checkpoints", "sd15_reference.safetensors")
    ref, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint("sd15_reference.safetensors")
    aligned = nodes.CheckpointLoaderSimple().load_checkpoint("sd15_aligned.safetensors")[0]
    results["patcher_class"] = type(ref).__name__
    s = dict(pos=encode(clip, "a red fox"), neg=encode(clip, "blurry"), latent=empty_latent())

    def realign(pair, lam):
        return pack.nodes.DeRaDiffKSampler.execute(pair, 5, 3, 5.0, "euler", "normal", s["pos"], s["neg"], s["latent"],
                                                    1.0, **{"lambda": lam}).result[0]["samples"]

    def alone(model):
        return ksampler(model, s["latent"], s["pos"], s["neg"], seed=5, steps=3)

    def make(r, a):
        return pack.nodes.DeRaDiffMakePair.execute(r, a)[0]

    with torch.inference_mode():
        before = alone(ref)
        latents["plain_reference"] = before
        # 1. identities
        pair = make(ref, aligned)
        for lam, model in ((0.0, ref), (1.0, aligned)):
            got, want = realign(pair, lam), alone(model)
            record(f"identity_lambda_{lam:g}", torch.equal(got, want), f"max diff {float((got - want).abs().max()):.3g}")
        # 2. ref + adapter (shared) = merged pair
        with tempfile.TemporaryDirectory() as tmp:
            names = write_adapters(Path(tmp), ref)
            folder_paths.add_model_folder_path("loras", tmp)
            for kind, name in names.items():
                clone = nodes.LoraLoader().load_lora(ref, clip, name, 1.0, 0.0)[0]
                shared_pair = make(ref, clone)
                shared = shared_pair.aligned_side().shared is not None
                got = {lam: realign(shared_pair, lam) for lam in (0.5, 1.0)}
                if kind == "lora":
                    latents["lora_pair_lambda_0.5"] = got[0.5]
                mm.unload_all_models()
                independent = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=False)[0]
                merged = nodes.LoraLoader().load_lora(independent, clip, name, 1.0, 0.0)[0]
                merged_pair = make(ref, merged)
                errs = {lam: rel(got[lam], realign(merged_pair, lam)) for lam in got}
                record(f"shared_{kind}_equals_merged", shared and max(errs.values()) <= TOL,
                       f"shared path {shared}, errors {errs}")
                del independent, merged, merged_pair
                mm.unload_all_models()
        # 3. the reference is unchanged after all that
        after = alone(ref)
        record("plain_ksampler_unchanged", torch.equal(after, before), f"max diff {float((after - before).abs().max()):.3g}")
        # 4. λ sweep = separate runs
        lams = [0.0, 0.5, 1.0, 1.5]
        sweep = pack.nodes.DeRaDiffLambdaSweep.execute(pair, ", ".join(map(str, lams)), 5, 3, 5.0, "euler", "normal",
                                                       s["pos"], s["neg"], s["latent"])
        out = sweep[0]["samples"]
        errs = [rel(out[i:i + 1], realign(pair, lam)) for i, lam in enumerate(lams)]
        record("sweep_equals_separate_runs", max(errs) <= TOL, f"errors {errs}")
        latents["pair_lambda_0.5"] = out[1:2]
        latents["sweep"] = out
    if latents_path:
        torch.save({k: v.detach().cpu().clone() for k, v in latents.items()}, latents_path)
    return results


def compare_latents(got: dict, want: dict) -> dict:
    """{name: {"ok", "detail"}}: each latent of a run against the reference run's, within TOL."""
    import torch
    out = {}
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape:
            out[name] = {"ok": False, "detail": f"missing or shape {None if g is None else tuple(g.shape)} "
                                                f"!= {tuple(w.shape)}"}
            continue
        err = float((g.float() - w.float()).abs().max() / w.float().abs().max())
        out[name] = {"ok": err <= TOL, "detail": f"bit-identical {torch.equal(g, w)}, relative error {err:.3g}"}
    return out


# --------------------------------------------------------------------- parent ----------------
def plan_runs(device: str, dynamic_vram: str, vram_modes: str | None) -> list[str]:
    """The runs (keys of RUNS) to do, the reference run first when it is among them."""
    modes = [m.strip() for m in (vram_modes or ("normal,lowvram,novram" if device == "cuda" else
                                                "normal,lowvram")).split(",") if m.strip()]
    unknown = set(modes) - {"normal", "lowvram", "novram"}
    if unknown:
        raise SystemExit(f"gpu_check: unknown VRAM mode(s) {sorted(unknown)}")
    low = [m for m in ("lowvram", "novram") if m in modes]
    runs = []
    # "normal" (Dynamic VRAM off) is the reference of the comparison: always there with a low/no-VRAM run
    if "normal" in modes and (dynamic_vram != "on" or device == "cpu") or low:
        runs.append("normal")
    if "normal" in modes and dynamic_vram != "off" and device == "cuda":
        runs.append("dynamic_on")  # ComfyUI never uses Dynamic VRAM on the CPU
    return runs + low


def _report(r: dict, checks: dict) -> bool:
    """Prints a run's checks; True when one failed."""
    failed = False
    for name, c in checks.items():
        print(f"{'PASS' if c['ok'] else 'FAIL'}  run={r['run']:10} dynamic_vram={r['dynamic_vram']!s:5} "
              f"vram={r['vram_state']:11} {r['patcher_class']:22} {name}: {c['detail']}")
        failed |= not c["ok"]
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dynamic-vram", choices=["on", "off", "both"], default="both",
                        help="which Dynamic VRAM runs (the low/no-VRAM runs are always without it)")
    parser.add_argument("--vram-modes", default=None,
                        help="comma-separated VRAM modes: normal, lowvram, novram (default: all on CUDA, "
                             "normal,lowvram on the CPU)")
    parser.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--latents", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args(argv)
    if a.child:
        dynamic, vram = RUNS[a.child]
        print("DERADIFF_RESULTS " + json.dumps(run_checks(a.device, dynamic, vram, a.latents)))
        return 0
    if a.device == "cuda" and not _cuda_available():
        print("gpu_check: no CUDA device here; nothing to check (run with --device cpu for a dry run).")
        return 0
    runs = plan_runs(a.device, a.dynamic_vram, a.vram_modes)
    results, failed = [], False
    with tempfile.TemporaryDirectory(prefix="deradiff-gpu-check-") as tmp:
        latents = {}
        for run in runs:
            path = Path(tmp) / f"{run}.pt"
            proc = subprocess.run([sys.executable, __file__, "--device", a.device, "--child", run,
                                   "--latents", str(path)], capture_output=True, text=True, cwd=REPO)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("DERADIFF_RESULTS ")]
            if proc.returncode != 0 or not lines:
                print(f"gpu_check: run {run}: the run failed (exit {proc.returncode})\n{proc.stderr[-6000:]}")
                failed = True
                continue
            r = json.loads(lines[-1][len("DERADIFF_RESULTS "):])
            r["run"] = run
            r["requested_dynamic_vram"] = "on" if RUNS[run][0] else "off"
            results.append(r)
            latents[run] = path
            if run == "dynamic_on" and a.device == "cuda" and not r["dynamic_vram"]:
                print("gpu_check: Dynamic VRAM was requested but ComfyUI did not enable it "
                      "(ComfyUI older than Dynamic VRAM, or comfy-aimdo unavailable): checked without it.")
            failed |= _report(r, r["checks"])
        if REFERENCE_RUN in latents:
            import torch
            want = torch.load(latents[REFERENCE_RUN])
            for r in results:
                if r["run"] != REFERENCE_RUN:
                    got = torch.load(latents[r["run"]])
                    r["vs_normal"] = {f"same_as_normal_{k}": v for k, v in compare_latents(got, want).items()}
                    failed |= _report(r, r["vs_normal"])
        elif len(runs) > 1:
            print(f"gpu_check: no '{REFERENCE_RUN}' run to compare the others with")
            failed = True
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print("gpu_check:", "FAILED" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
