"""Server memory over a sequence of prompts: does the pack keep models alive longer than ComfyUI
keeps a plain model?

    python benchmarks/bench_server_memory.py [--cache classic|ram|default] [--prompts N]
        [--models tiny|full] [--interval 0.05] [--settle 1.5] [--json results.json]

Starts the real ComfyUI server through the project's launcher (scripts/comfy_server.py) with the
stand-in models of the tests (scripts/standins.py) and runs, one prompt after another (the
sequence repeats when --prompts is longer; every prompt has its own seed, so the samplers run
again while unchanged loaders may come from ComfyUI's cache):

  1 plain      CheckpointLoaderSimple -> KSampler
  2 pair       a pair of two full models -> DeRaDiff KSampler (λ 0.5)
  3 lora_pair  reference + LoraLoader(reference) -> Make Pair -> DeRaDiff KSampler (shared weights)
  4 sweep      the two-model pair -> λ Sweep (0, 0.5, 1)
  5 realign    the two-model pair -> Realign Model (λ 0.5) -> KSampler
  6 plain      as 1

--models tiny: the SD1.5 stand-in checkpoints (tiny UNet, full-size CLIP-L, TAESD; the pair
is Load Aligned Model Pair of two checkpoints). --models full: full-size SD1.5 UNets (860 M
parameters, 3.4 GB each in fp32 on the CPU) through UNETLoader, so that the UNets dominate; the
pair is Make Aligned Model Pair of two UNETLoaders, the LoRA one LoraLoaderModelOnly (rank 32).

--cache: classic = --cache-classic (only the last prompt's outputs are kept; the launcher's
default); ram = --cache-ram (RAM-pressure cache: ComfyUI 0.33's default, opt-in on 0.3.75);
default = no --cache option at all, i.e. ComfyUI's own default (0.3.75: classic, 0.33: RAM
pressure).

While a prompt runs, the server's RSS (and its anonymous part, RssAnon) is read from /proc every
--interval seconds; --settle seconds after it finished, the "after" figures are taken. A probe
(a one-file custom node the benchmark writes into the server's own custom_nodes folder, not into
the pack) reports what ComfyUI has loaded (comfy.model_management.current_loaded_models), and,
after each prompt, every diffusion model (BaseModel) still alive and what holds it: an entry of
ComfyUI's node-output cache ("out:<node class>"), the cache of node instances ("obj:<node
class>"), the loaded-model list ("loaded"), or nothing ComfyUI owns ("OTHER" - that would be
something of the pack or a leak keeping it alive). At the end POST /free {"unload_models": true,
"free_memory": true} and the figures once more.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import comfy_server  # noqa: E402
import comfyui_runtime  # noqa: E402

SIZE, STEPS, CFG = 64, 3, 5.0
POSITIVE, NEGATIVE = "a watercolour painting of a lighthouse at dusk", "blurry, low quality"
MODELS = {
    "tiny": {"ref_ckpt": "sd15_reference.safetensors", "aligned_ckpt": "sd15_aligned.safetensors",
             "lora": "sd15_aligned_lora.safetensors"},
    "full": {"ref_ckpt": "sd15_reference.safetensors", "ref_unet": "sd15_full_reference_unet.safetensors",
             "aligned_unet": "sd15_full_aligned_unet.safetensors", "lora": "sd15_full_lora.safetensors"},
}
STANDIN_FILES = {
    "tiny": ["checkpoints/sd15_reference.safetensors", "checkpoints/sd15_aligned.safetensors",
             "loras/sd15_aligned_lora.safetensors"],
    "full": ["checkpoints/sd15_reference.safetensors", "diffusion_models/sd15_full_reference_unet.safetensors",
             "diffusion_models/sd15_full_aligned_unet.safetensors", "loras/sd15_full_lora.safetensors"],
}
SEQUENCE = ["plain", "pair", "lora_pair", "sweep", "realign", "plain"]
MiB = 2 ** 20

PROBE = r'''
"""deradiff_bench_probe: written by benchmarks/bench_server_memory.py into a temporary server's
custom_nodes folder. GET /deradiff_bench/state[?census=1] reports loaded and live models."""
import gc
import types

import torch
from aiohttp import web

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import server

NODE_CLASS_MAPPINGS = {}


def _mb(module):
    seen, total = set(), 0
    try:
        tensors = list(module.parameters()) + list(module.buffers())
    except Exception:
        return None
    for t in tensors:
        try:
            key = t.untyped_storage().data_ptr()
            size = t.untyped_storage().nbytes()
        except Exception:
            key, size = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += size
    return round(total / 2 ** 20, 1)


def _loaded():
    out = []
    for lm in list(mm.current_loaded_models):
        try:
            patcher = lm.model
            out.append({"model": type(patcher.model).__name__ if patcher is not None else None,
                        "patcher": id(patcher) if patcher is not None else None,
                        "base": id(patcher.model) if patcher is not None else None})
        except Exception as e:
            out.append({"model": f"? {e}"})
    return out


def _class_of_key(key):
    # output cache keys: frozenset((index, item)); item 0 is the node's own signature, whose
    # item 0 is its class_type. object cache keys: (node_id, class_type).
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], str):
        return key[1]
    try:
        own = dict(key)[0]
        return dict(own)[0]
    except Exception:
        return "?"


def _entries(cache, prefix):
    yield from ((prefix + _class_of_key(k), v) for k, v in list(getattr(cache, "cache", {}).items()))
    for sub in list(getattr(cache, "subcaches", {}).values()):
        yield from _entries(sub, prefix)


_SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
         str, bytes, int, float, torch.Tensor, torch.dtype, torch.device)


def _reaches(root, targets, limit=400000):
    found, seen, stack, n = set(), set(), [root], 0
    while stack and n < limit:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        n += 1
        if id(o) in targets:
            found.add(id(o))
            continue
        if isinstance(o, _SKIP) or (isinstance(o, dict) and "__builtins__" in o):
            continue
        stack.extend(gc.get_referents(o))
    return found


@server.PromptServer.instance.routes.get("/deradiff_bench/state")
async def state(request):
    data = {"loaded": _loaded()}
    if request.query.get("census") != "1":
        return web.json_response(data)
    gc.collect()
    objs = gc.get_objects()
    bases = [o for o in objs if isinstance(o, comfy.model_base.BaseModel)]
    data["live"] = {
        "BaseModel": len(bases),
        "ModelPatcher": sum(isinstance(o, comfy.model_patcher.ModelPatcher) for o in objs),
        "AlignedPair": sum(type(o).__name__ == "AlignedPair" for o in objs),
        "CLIP": sum(type(o).__name__ == "CLIP" and type(o).__module__ == "comfy.sd" for o in objs),
        "VAE": sum(type(o).__name__ == "VAE" and type(o).__module__ == "comfy.sd" for o in objs),
    }
    executors = [o for o in objs if type(o).__name__ == "PromptExecutor"]
    del objs
    targets = {id(b): b for b in bases}
    holders = {i: [] for i in targets}
    n_entries = 0
    for ex in executors:
        caches = getattr(ex, "caches", None)
        for cache, prefix in ((getattr(caches, "outputs", None), "out:"), (getattr(caches, "objects", None), "obj:")):
            if cache is None:
                continue
            for name, value in _entries(cache, prefix):
                n_entries += 1
                for i in _reaches(value, targets):
                    holders[i].append(name)
    loaded_bases = {e.get("base") for e in data["loaded"]}
    data["cache_entries"] = n_entries
    data["models"] = []
    for i, b in targets.items():
        held = sorted(set(holders[i])) + (["loaded"] if i in loaded_bases else [])
        data["models"].append({"class": type(b).__name__, "mb": _mb(b), "held_by": held or ["OTHER"]})
    if any(m["held_by"] == ["OTHER"] for m in data["models"]):
        # name the referrers of models nothing of ComfyUI's holds (one level)
        for m, b in zip(data["models"], targets.values()):
            if m["held_by"] == ["OTHER"]:
                m["referrers"] = sorted({type(r).__module__ + "." + type(r).__qualname__
                                         for r in gc.get_referrers(b) if r is not targets})[:12]
    return web.json_response(data)
'''


class Sampler(threading.Thread):
    """Reads VmRSS / RssAnon of a process every `interval` seconds."""

    def __init__(self, pid, interval):
        super().__init__(daemon=True)
        self.path = f"/proc/{pid}/status"
        self.interval = interval
        self.samples = []  # (time, rss bytes, anon bytes)
        self.stop_event = threading.Event()

    def read(self):
        rss = anon = 0
        try:
            with open(self.path) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon = int(line.split()[1]) * 1024
        except OSError:
            pass
        return time.monotonic(), rss, anon

    def run(self):
        while not self.stop_event.is_set():
            self.samples.append(self.read())
            time.sleep(self.interval)

    def window(self, t0, t1):
        return [s for s in self.samples if t0 <= s[0] <= t1]


class Graph(dict):
    def add(self, class_type, **inputs):
        node_id = str(len(self) + 1)
        self[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]


def build(kind, models, seed):
    """API-format graph of one prompt of the sequence."""
    g = Graph()
    m = MODELS[models]
    uses_pair_loader = models == "tiny" and kind in ("pair", "sweep", "realign")
    if uses_pair_loader:  # Load Aligned Model Pair gives the reference's CLIP and VAE too
        loader = g.add("DeRaDiffLoadAlignedPair", reference_ckpt_name=m["ref_ckpt"],
                       aligned_model="checkpoints/" + m["aligned_ckpt"])
    else:
        loader = g.add("CheckpointLoaderSimple", ckpt_name=m["ref_ckpt"])
    clip, vae = [loader[0], 1], [loader[0], 2]
    pos = g.add("CLIPTextEncode", clip=clip, text=POSITIVE)
    neg = g.add("CLIPTextEncode", clip=clip, text=NEGATIVE)
    latent = g.add("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)
    common = dict(seed=seed, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal",
                  positive=pos, negative=neg, latent_image=latent, denoise=1.0)

    def reference():
        if models == "tiny":
            return loader
        return g.add("UNETLoader", unet_name=m["ref_unet"], weight_dtype="default")

    def two_model_pair():
        if models == "tiny":
            return loader
        aligned = g.add("UNETLoader", unet_name=m["aligned_unet"], weight_dtype="default")
        return g.add("DeRaDiffMakePair", reference=reference(), aligned=aligned)

    if kind == "plain":
        samples = g.add("KSampler", model=reference(), **common)
    elif kind == "pair":
        samples = g.add("DeRaDiffKSampler", pair=two_model_pair(), **common, **{"lambda": 0.5})
    elif kind == "lora_pair":
        ref = reference()
        if models == "tiny":
            lora = g.add("LoraLoader", model=ref, clip=clip, lora_name=m["lora"], strength_model=1.0,
                         strength_clip=0.0)
        else:
            lora = g.add("LoraLoaderModelOnly", model=ref, lora_name=m["lora"], strength_model=1.0)
        pair = g.add("DeRaDiffMakePair", reference=ref, aligned=lora)
        samples = g.add("DeRaDiffKSampler", pair=pair, **common, **{"lambda": 0.5})
    elif kind == "sweep":
        samples = g.add("DeRaDiffLambdaSweep", pair=two_model_pair(), lambdas="0, 0.5, 1", **common)
    elif kind == "realign":
        model = g.add("DeRaDiffRealignModel", pair=two_model_pair(), **{"lambda": 0.5})
        samples = g.add("KSampler", model=model, **common)
    else:
        raise ValueError(kind)
    decoded = g.add("VAEDecode", samples=samples, vae=vae)
    g.add("SaveImage", images=decoded, filename_prefix=f"mem_{kind}")
    return dict(g)


def cache_args(mode):
    return {"classic": ["--cache-classic"], "ram": ["--cache-ram"], "default": []}[mode]


def held_summary(census):
    """'2 [out:CheckpointLoaderSimple+loaded, out:DeRaDiffLoadAlignedPair]' style text."""
    if not census:
        return "-"
    parts = []
    for mdl in census.get("models", []):
        parts.append("+".join(mdl["held_by"]) + (f" {mdl['mb']:.0f}MB" if mdl.get("mb") else ""))
    return f"{len(parts)} [" + ", ".join(parts) + "]"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", choices=["classic", "ram", "default"], default="classic")
    ap.add_argument("--prompts", type=int, default=len(SEQUENCE), help="prompts to run (the sequence repeats)")
    ap.add_argument("--models", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval, seconds")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds after a prompt before the 'after' figures")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the server's temporary directory")
    args = ap.parse_args()

    root = comfyui_runtime.ensure_runtime()
    import standins
    for name in STANDIN_FILES[args.models]:
        standins.ensure_standin(name)
    version = "?"
    vfile = root / "comfyui_version.py"
    if vfile.exists():
        version = vfile.read_text().split('"')[-2]

    workdir = Path(tempfile.mkdtemp(prefix="deradiff-bench-mem-"))
    (workdir / "custom_nodes").mkdir()
    (workdir / "custom_nodes" / "deradiff_bench_probe.py").write_text(PROBE)
    server = comfy_server.ComfyServer(root, standins.STANDIN_DIR, workdir=workdir,
                                      extra_args=cache_args(args.cache), log_name="server.log")
    if args.cache == "default":  # ComfyUI's own default: drop the launcher's --cache-classic
        server.args = [a for a in server.args if a != "--cache-classic"]
    print(f"ComfyUI {version} ({root}); cache mode {args.cache}; models {args.models}; "
          f"server args: {' '.join(server.args)}", flush=True)
    rows = []
    with server:
        if not _probe_ok(server):
            raise SystemExit(f"the probe node did not load; see {server.log_path}")
        sampler = Sampler(server.process.pid, args.interval)
        sampler.start()
        idle = sampler.read()
        print(f"server up: RSS {idle[1] / MiB:.0f} MiB (anon {idle[2] / MiB:.0f} MiB)", flush=True)
        print(f"{'#':>2} {'prompt':<10} {'time s':>6} {'peak RSS':>9} {'peak anon':>9} {'after RSS':>9} "
              f"{'after anon':>10}  {'loaded first/last/peak':<22} live diffusion models after [held by]")
        for i in range(args.prompts):
            kind = SEQUENCE[i % len(SEQUENCE)]
            graph = build(kind, args.models, seed=1000 + i)
            loaded_counts = []
            t0 = time.monotonic()
            prompt_id = server.queue(graph)
            entry = None
            while entry is None:
                loaded_counts.append(len(server.get("/deradiff_bench/state")["loaded"]))
                history = server.get(f"/history/{prompt_id}")
                entry = history.get(prompt_id)
                if entry is None:
                    server.check_alive()
                    time.sleep(0.2)
            t1 = time.monotonic()
            if entry["status"].get("status_str") != "success":
                raise SystemExit(f"prompt {i + 1} ({kind}) failed: {comfy_server.error_message(entry)}")
            time.sleep(args.settle)
            after = sampler.read()
            census = server.get("/deradiff_bench/state?census=1", timeout=120)
            loaded_counts.append(len(census["loaded"]))
            window = sampler.window(t0, t1) or [after]
            row = {
                "prompt": i + 1, "kind": kind, "seconds": round(t1 - t0, 2),
                "peak_rss_mib": round(max(s[1] for s in window) / MiB),
                "peak_anon_mib": round(max(s[2] for s in window) / MiB),
                "after_rss_mib": round(after[1] / MiB), "after_anon_mib": round(after[2] / MiB),
                "loaded_first": loaded_counts[0], "loaded_last": loaded_counts[-1],
                "loaded_peak": max(loaded_counts), "loaded_after": [e["model"] for e in census["loaded"]],
                "live": census["live"], "models_after": census["models"], "cache_entries": census["cache_entries"],
            }
            rows.append(row)
            print(f"{i + 1:>2} {kind:<10} {row['seconds']:>6.1f} {row['peak_rss_mib']:>9} {row['peak_anon_mib']:>9} "
                  f"{row['after_rss_mib']:>9} {row['after_anon_mib']:>10}  "
                  f"{row['loaded_first']}/{row['loaded_last']}/{row['loaded_peak']:<18} {held_summary(census)}",
                  flush=True)
            for mdl in census["models"]:
                if mdl.get("referrers"):
                    print(f"     held by nothing of ComfyUI's: {mdl['class']} {mdl.get('mb')} MB; referrers "
                          f"{mdl['referrers']}", flush=True)
        server.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(max(args.settle, 3.0))
        after = sampler.read()
        census = server.get("/deradiff_bench/state?census=1", timeout=120)
        freed = {"after_rss_mib": round(after[1] / MiB), "after_anon_mib": round(after[2] / MiB),
                 "loaded": len(census["loaded"]), "live": census["live"], "models_after": census["models"]}
        print(f"after POST /free: RSS {freed['after_rss_mib']} MiB (anon {freed['after_anon_mib']} MiB), "
              f"loaded {freed['loaded']}, live {census['live']}, models {held_summary(census)}", flush=True)
        sampler.stop_event.set()
        peak = max(s[1] for s in sampler.samples)
        print(f"overall peak RSS {peak / MiB:.0f} MiB; log: {server.log_path}", flush=True)
    result = {"comfyui": version, "root": str(root), "cache": args.cache, "models": args.models,
              "server_args": server.args, "idle_rss_mib": round(idle[1] / MiB), "prompts": rows,
              "after_free": freed, "overall_peak_rss_mib": round(peak / MiB)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not args.keep:
        server.remove_workdir()


def _probe_ok(server):
    try:
        server.get("/deradiff_bench/state")
        return True
    except Exception:
        return False


if __name__ == "__main__":
    main()
