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
import ctypes
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
    try:
        tensors = list(module.parameters()) + list(module.buffers())
    except Exception:
        return None
    return _storage_mib(tensors)


def _storage_mib(tensors):
    """MiB of the distinct storages under these tensors (views and shared weights counted once)."""
    seen, total = set(), 0
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
    if request.query.get("trim") == "1":  # hand the allocator's free pages back before RSS is read
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    objs = gc.get_objects()
    bases = [o for o in objs if isinstance(o, comfy.model_base.BaseModel)]
    data["live"] = {
        "BaseModel": len(bases),
        "ModelPatcher": sum(isinstance(o, comfy.model_patcher.ModelPatcher) for o in objs),
        "AlignedPair": sum(type(o).__name__ == "AlignedPair" for o in objs),
        "CLIP": sum(type(o).__name__ == "CLIP" and type(o).__module__ == "comfy.sd" for o in objs),
        "VAE": sum(type(o).__name__ == "VAE" and type(o).__module__ == "comfy.sd" for o in objs),
    }
    tensors = [o for o in objs if isinstance(o, torch.Tensor)]
    data["live"]["Tensor"] = len(tensors)
    data["live"]["tensor_mib"] = _storage_mib(tensors)
    del tensors
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


def build(kind, models, seed, lam=0.5, lambdas="0, 0.5, 1", size=SIZE, steps=STEPS):
    """API-format graph of one prompt: `kind` as in the module docstring, λ `lam` (pair, lora_pair,
    realign) or the λ list `lambdas` (sweep)."""
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
    latent = g.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    common = dict(seed=seed, steps=steps, cfg=CFG, sampler_name="euler", scheduler="normal",
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
        samples = g.add("DeRaDiffKSampler", pair=two_model_pair(), **common, **{"lambda": lam})
    elif kind == "lora_pair":
        ref = reference()
        if models == "tiny":
            lora = g.add("LoraLoader", model=ref, clip=clip, lora_name=m["lora"], strength_model=1.0,
                         strength_clip=0.0)
        else:
            lora = g.add("LoraLoaderModelOnly", model=ref, lora_name=m["lora"], strength_model=1.0)
        pair = g.add("DeRaDiffMakePair", reference=ref, aligned=lora)
        samples = g.add("DeRaDiffKSampler", pair=pair, **common, **{"lambda": lam})
    elif kind == "sweep":
        samples = g.add("DeRaDiffLambdaSweep", pair=two_model_pair(), lambdas=lambdas, **common)
    elif kind == "realign":
        model = g.add("DeRaDiffRealignModel", pair=two_model_pair(), **{"lambda": lam})
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


# ------------------------------------------------------------------ server and one prompt ------
def comfy_version(root):
    vfile = Path(root) / "comfyui_version.py"
    return vfile.read_text().split('"')[-2] if vfile.exists() else "?"


def make_server(cache, models):
    """(server, ComfyUI root, version): a not yet started ComfyServer on the stand-ins of `models`,
    with the probe node in its own custom_nodes folder and the --cache option of `cache`."""
    root = comfyui_runtime.ensure_runtime()
    import standins
    for name in STANDIN_FILES[models]:
        standins.ensure_standin(name)
    workdir = Path(tempfile.mkdtemp(prefix="deradiff-bench-mem-"))
    (workdir / "custom_nodes").mkdir()
    (workdir / "custom_nodes" / "deradiff_bench_probe.py").write_text(PROBE)
    server = comfy_server.ComfyServer(root, standins.STANDIN_DIR, workdir=workdir,
                                      extra_args=cache_args(cache), log_name="server.log")
    if cache == "default":  # ComfyUI's own default: drop the launcher's --cache-classic
        server.args = [a for a in server.args if a != "--cache-classic"]
    return server, root, comfy_version(root)


def start_probe(server, interval):
    """After server.start(): checks the probe answers and starts the RSS sampler; returns
    (sampler, idle reading)."""
    if not _probe_ok(server):
        raise SystemExit(f"the probe node did not load; see {server.log_path}")
    sampler = Sampler(server.process.pid, interval)
    sampler.start()
    return sampler, sampler.read()


def run_prompt(server, sampler, graph, settle, number, kind, trim=False):
    """Queues `graph`, follows the loaded-model count while it runs, and takes the figures
    `settle` seconds after it finished (RSS, the census). With `trim` the census first collects
    garbage and calls glibc's malloc_trim(0) in the server, and RSS is read after it: RSS then
    follows what is allocated rather than what the allocator keeps in reserve. Returns (row, census)."""
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
        raise SystemExit(f"prompt {number} ({kind}) failed: {comfy_server.error_message(entry)}")
    time.sleep(settle)
    if trim:
        census = server.get("/deradiff_bench/state?census=1&trim=1", timeout=120)
        after = sampler.read()
    else:
        after = sampler.read()
        census = server.get("/deradiff_bench/state?census=1", timeout=120)
    loaded_counts.append(len(census["loaded"]))
    window = sampler.window(t0, t1) or [after]
    row = {
        "prompt": number, "kind": kind, "seconds": round(t1 - t0, 2),
        "peak_rss_mib": round(max(s[1] for s in window) / MiB),
        "peak_anon_mib": round(max(s[2] for s in window) / MiB),
        "after_rss_mib": round(after[1] / MiB), "after_anon_mib": round(after[2] / MiB),
        "loaded_first": loaded_counts[0], "loaded_last": loaded_counts[-1],
        "loaded_peak": max(loaded_counts), "loaded_after": [e["model"] for e in census["loaded"]],
        "live": census["live"], "models_after": census["models"], "cache_entries": census["cache_entries"],
        "unowned_models": sum(m["held_by"] == ["OTHER"] for m in census["models"]),
    }
    for mdl in census["models"]:
        if mdl.get("referrers"):
            print(f"     held by nothing of ComfyUI's: {mdl['class']} {mdl.get('mb')} MB; referrers "
                  f"{mdl['referrers']}", flush=True)
    return row, census


def free_all(server, sampler, settle):
    """POST /free (unload models, free memory), then the figures once more."""
    server.post("/free", {"unload_models": True, "free_memory": True})
    time.sleep(max(settle, 3.0))
    after = sampler.read()
    census = server.get("/deradiff_bench/state?census=1", timeout=120)
    freed = {"after_rss_mib": round(after[1] / MiB), "after_anon_mib": round(after[2] / MiB),
             "loaded": len(census["loaded"]), "live": census["live"], "models_after": census["models"]}
    print(f"after POST /free: RSS {freed['after_rss_mib']} MiB (anon {freed['after_anon_mib']} MiB), "
          f"loaded {freed['loaded']}, live {census['live']}, models {held_summary(census)}", flush=True)
    return freed


# ------------------------------------------------------------------ soak ------------------------
# The soak's prompts: the kinds in turn, each with the next λ of SOAK_LAMBDAS (7 values, prime to
# the 5 kinds, so every kind meets several λ, 0 and 1 included) or the next list of SOAK_SWEEPS.
SOAK_KINDS = ["pair", "lora_pair", "sweep", "realign", "plain"]
SOAK_LAMBDAS = [0.5, 1.5, 0.25, 0.0, 2.0, 1.0, 0.75]
SOAK_SWEEPS = ["0, 0.5, 1", "0.25, 1.5", "0, 0.5, 1, 1.5, 2"]
# Bound on the growth per prompt over the soak's second half, for RSS, its anonymous part and the
# live tensors' storage. Why 2 MiB/prompt: what a soak must catch is memory kept for good on every
# prompt (or every few). The smallest thing a DeRaDiff prompt makes that is worth keeping by
# mistake is a model, a patched weight or a weight difference: the tiny stand-in UNet is 98 MiB
# (a full SD1.5 UNet 3.3 GiB), so keeping even one of them per 5-prompt cycle grows memory by
# ~20 MiB/prompt, 10x the bound. Below that, the per-prompt tensors of sampling (a 64x64 latent
# is 1 KiB, a 1024x1024 one 0.5 MiB) are too small for any RSS slope; the census counts them
# instead (live tensors, whose number must not grow either, see SOAK_TENSOR_COUNT_BOUND). On the
# other side, the allocator: glibc keeps freed heap pages, so the plain RSS after a prompt moves
# in steps of 15-100 MiB now and then (measured on 0.3.75, CPU) and a step inside a 15-prompt
# window alone reaches ~2 MiB/prompt. The soak therefore reads RSS after the census's
# gc.collect() + malloc_trim(0) (run_prompt's trim), which hands free pages back, so that RSS
# follows what is allocated; over the 15 second-half prompts of the default 30-prompt soak,
# 2 MiB/prompt is 30 MiB, about 2 % of the server's RSS. The live tensors' storage is exact
# (no allocator in it): there any growth at all is a leak, and 2 MiB/prompt is generous.
SOAK_SLOPE_BOUND_MIB = 2.0
# Bound on the growth of the number of live tensors per prompt: ComfyUI's classic cache keeps only
# the last prompt's outputs, so after prompts of the same kind the census finds the same tensors;
# one tensor more per prompt (a latent, a noise tensor, a list of steps kept by a global) exceeds it.
SOAK_TENSOR_COUNT_BOUND = 0.5
# A pair has one diffusion model more than a plain prompt (the aligned side; a LoRA pair's
# aligned side shares the reference's weights), so after any prompt ComfyUI should have loaded at
# most the plain prompts' count + 1.
PAIR_EXTRA_MODELS = 1


def soak_prompt(i):
    """(kind, λ, λ list) of the soak's prompt i (0-based)."""
    return (SOAK_KINDS[i % len(SOAK_KINDS)], SOAK_LAMBDAS[i % len(SOAK_LAMBDAS)],
            SOAK_SWEEPS[(i // len(SOAK_KINDS)) % len(SOAK_SWEEPS)])


def ls_slope(xs, ys):
    """Least-squares slope of ys over xs (None for fewer than 2 distinct xs)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else None


def within_kind_slope(points):
    """Least-squares slope common to all groups, each group with its own intercept
    (points: (group, x, y)). A repeating sequence of prompt kinds gives a periodic pattern
    whose plain slope over a window is not zero; with an intercept per kind only growth
    between prompts of the same kind counts. Groups seen once contribute nothing."""
    groups = {}
    for g, x, y in points:
        groups.setdefault(g, []).append((x, y))
    sxy = sxx = 0.0
    for pts in groups.values():
        mx = sum(p[0] for p in pts) / len(pts)
        my = sum(p[1] for p in pts) / len(pts)
        sxy += sum((x - mx) * (y - my) for x, y in pts)
        sxx += sum((x - mx) ** 2 for x, _ in pts)
    return sxy / sxx if sxx else None


SOAK_SERIES = (("RSS MiB", "after_rss_mib", SOAK_SLOPE_BOUND_MIB),
               ("RSS anon MiB", "after_anon_mib", SOAK_SLOPE_BOUND_MIB),
               ("live tensor MiB", ("live", "tensor_mib"), SOAK_SLOPE_BOUND_MIB),
               ("live tensors", ("live", "Tensor"), SOAK_TENSOR_COUNT_BOUND))


def _value(row, key):
    return row[key[0]][key[1]] if isinstance(key, tuple) else row[key]


def soak_summary(rows, overall_peak_rss_mib):
    """Figures and verdict of a soak: first / last / peak and, over the second half, the plain and
    the within-kind least-squares slopes per prompt (the bound applies to the latter), and the
    loaded models after each prompt against the plain prompts' count + PAIR_EXTRA_MODELS."""
    half = rows[len(rows) // 2:]
    series, failures = [], []
    for name, key, bound in SOAK_SERIES:
        values = [_value(r, key) for r in rows]
        plain = ls_slope([r["prompt"] for r in half], [_value(r, key) for r in half])
        within = within_kind_slope([(r["kind"], r["prompt"], _value(r, key)) for r in half])
        ok = within is not None and within < bound
        series.append({"series": name, "first": values[0], "last": values[-1], "peak": max(values),
                       "slope": plain, "slope_within_kind": within, "bound": bound, "ok": ok})
        if not ok:
            failures.append(f"{name}: within-kind slope {within} per prompt over the second half, bound {bound}")
    plain_loaded = [r["loaded_last"] for r in rows if r["kind"] == "plain"]
    loaded_bound = max(plain_loaded) + PAIR_EXTRA_MODELS if plain_loaded else None
    max_loaded = max(r["loaded_last"] for r in rows)
    if loaded_bound is None:
        failures.append("no plain prompt in the soak: no reference for the loaded-model count")
    elif max_loaded > loaded_bound:
        worst = [r["prompt"] for r in rows if r["loaded_last"] > loaded_bound]
        failures.append(f"loaded models after prompts {worst}: {max_loaded} > plain {max(plain_loaded)} "
                        f"+ {PAIR_EXTRA_MODELS}")
    unowned = sum(r["unowned_models"] for r in rows)
    if unowned:
        failures.append(f"{unowned} diffusion models alive with no ComfyUI cache or loaded list holding them")
    return {"prompts": len(rows), "second_half_from": half[0]["prompt"], "series": series,
            "peak_rss_sampled_mib": overall_peak_rss_mib,
            "loaded_after_max": max_loaded, "loaded_after_plain_max": max(plain_loaded) if plain_loaded else None,
            "loaded_bound": loaded_bound, "loaded_peak_during": max(r["loaded_peak"] for r in rows),
            "live_base_models_max": max(r["live"]["BaseModel"] for r in rows),
            "unowned_models": unowned, "failures": failures, "pass": not failures}


def print_soak_summary(summary, title):
    fmt = lambda v: "-" if v is None else (f"{v:+.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    print(f"\n{title}\nsecond half: prompts {summary['second_half_from']}-{summary['prompts']}; "
          "slopes are least-squares per prompt; the bound applies to the within-kind slope")
    print(f"{'series':<16} {'first':>8} {'last':>8} {'peak':>8} {'slope':>8} {'slope/kind':>10} {'bound':>6}  ok")
    for s in summary["series"]:
        print(f"{s['series']:<16} {s['first']:>8} {s['last']:>8} {s['peak']:>8} {fmt(s['slope']):>8} "
              f"{fmt(s['slope_within_kind']):>10} {s['bound']:>6}  {'yes' if s['ok'] else 'NO'}")
    print(f"peak RSS sampled while prompts ran: {summary['peak_rss_sampled_mib']} MiB")
    print(f"loaded models after a prompt: max {summary['loaded_after_max']} (plain prompts: "
          f"{summary['loaded_after_plain_max']}; bound plain + {PAIR_EXTRA_MODELS} = {summary['loaded_bound']}); "
          f"max while a prompt ran {summary['loaded_peak_during']}; live diffusion models max "
          f"{summary['live_base_models_max']}; held by nothing of ComfyUI's: {summary['unowned_models']}")
    print("soak:", "PASS" if summary["pass"] else "FAIL - " + "; ".join(summary["failures"]), flush=True)


# ------------------------------------------------------------------ main ------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", choices=["classic", "ram", "default"], default="classic")
    ap.add_argument("--prompts", type=int, default=len(SEQUENCE), help="prompts to run (the sequence repeats)")
    ap.add_argument("--soak", type=int, metavar="N", help="soak: N prompts of the soak sequence, then the "
                    "slopes and the verdict (exit status 1 when a bound is exceeded)")
    ap.add_argument("--models", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--size", type=int, default=SIZE, help="image size (pixels)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval, seconds")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds after a prompt before the 'after' figures")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the server's temporary directory")
    args = ap.parse_args()
    if args.soak is not None and args.soak < 2 * len(SOAK_KINDS) + 1:
        # the slopes are taken between prompts of the same kind within the second half
        ap.error(f"--soak needs at least {2 * len(SOAK_KINDS) + 1} prompts (its second half must repeat a kind)")

    server, root, version = make_server(args.cache, args.models)
    print(f"ComfyUI {version} ({root}); cache mode {args.cache}; models {args.models}; "
          f"server args: {' '.join(server.args)}", flush=True)
    if args.soak is not None:
        prompts = [soak_prompt(i) for i in range(args.soak)]
    else:
        prompts = [(SEQUENCE[i % len(SEQUENCE)], 0.5, "0, 0.5, 1") for i in range(args.prompts)]
    rows = []
    try:
        with server:
            sampler, idle = start_probe(server, args.interval)
            print(f"server up: RSS {idle[1] / MiB:.0f} MiB (anon {idle[2] / MiB:.0f} MiB)", flush=True)
            if args.soak is not None:
                print(f"{'#':>2} {'prompt':<10} {'λ':<18} {'time s':>6} {'after RSS':>9} {'anon':>6} "
                      f"{'peak RSS':>8} {'loaded':>6} {'models':>6} {'tensors':>7} {'tensor MiB':>10}")
            else:
                print(f"{'#':>2} {'prompt':<10} {'time s':>6} {'peak RSS':>9} {'peak anon':>9} {'after RSS':>9} "
                      f"{'after anon':>10}  {'loaded first/last/peak':<22} live diffusion models after [held by]")
            for i, (kind, lam, lambdas) in enumerate(prompts):
                graph = build(kind, args.models, seed=1000 + i, lam=lam, lambdas=lambdas, size=args.size,
                              steps=args.steps)
                row, census = run_prompt(server, sampler, graph, args.settle, i + 1, kind,
                                         trim=args.soak is not None)
                rows.append(row)
                if args.soak is not None:
                    row["lambda"] = lambdas if kind == "sweep" else (None if kind == "plain" else lam)
                    lam_text = "-" if row["lambda"] is None else str(row["lambda"])
                    print(f"{i + 1:>2} {kind:<10} {lam_text:<18} {row['seconds']:>6.1f} {row['after_rss_mib']:>9} "
                          f"{row['after_anon_mib']:>6} {row['peak_rss_mib']:>8} {row['loaded_last']:>6} "
                          f"{row['live']['BaseModel']:>6} {row['live']['Tensor']:>7} {row['live']['tensor_mib']:>10}",
                          flush=True)
                else:
                    print(f"{i + 1:>2} {kind:<10} {row['seconds']:>6.1f} {row['peak_rss_mib']:>9} "
                          f"{row['peak_anon_mib']:>9} {row['after_rss_mib']:>9} {row['after_anon_mib']:>10}  "
                          f"{row['loaded_first']}/{row['loaded_last']}/{row['loaded_peak']:<18} {held_summary(census)}",
                          flush=True)
            freed = free_all(server, sampler, args.settle)
            sampler.stop_event.set()
            peak = round(max(s[1] for s in sampler.samples) / MiB)
            print(f"overall peak RSS {peak} MiB; log: {server.log_path}", flush=True)
    except BaseException:
        print(f"--- end of the server log ({server.log_path}) ---\n{server.log()[-3000:]}", file=sys.stderr)
        raise
    finally:
        if not args.keep:
            server.remove_workdir()
    result = {"comfyui": version, "root": str(root), "cache": args.cache, "models": args.models,
              "server_args": server.args, "size": args.size, "steps": args.steps,
              "idle_rss_mib": round(idle[1] / MiB), "prompts": rows, "after_free": freed,
              "overall_peak_rss_mib": peak}
    status = 0
    if args.soak is not None:
        result["soak"] = soak_summary(rows, peak)
        print_soak_summary(result["soak"], f"soak: ComfyUI {version}, cache {args.cache}, {args.soak} prompts, "
                           f"{args.size}x{args.size}, {args.steps} steps")
        status = 0 if result["soak"]["pass"] else 1
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return status


def _probe_ok(server):
    try:
        server.get("/deradiff_bench/state")
        return True
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
