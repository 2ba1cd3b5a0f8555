"""Bounded, seeded random fuzz of the pack's node inputs through ComfyUI's real /prompt.

    python scripts/fuzz_prompts.py --prompts 200 --seed 1 [--comfyui PATH] [--timeout 120] [--sdxl]

Starts a ComfyUI server with the pack (scripts/comfy_server.py, the stand-in models of
scripts/standins.py), then posts ``--prompts`` random API prompts, one after another. Each is a
small valid graph around one of the pack's nodes (DeRaDiff KSampler, Guider +
SamplerCustomAdvanced, λ Sweep (+ Sweep Grid), Realign Model + KSampler, λ Schedule, Make Pair)
with 0-3 random mutations: an input set to a random value (NaN, ±inf, out of range, wrong
type, strange λ lists and custom schedules, odd latent sizes and batches, unknown sampler or
scheduler names), a required input left out, an input linked to a wrong output or to a node
that does not exist, an unknown input, or a broken node. Valid values are kept small (latents
up to 72 px, batch up to 3, 1-3 steps, at most 8 λ), so a run costs a few seconds a prompt on a
CPU. The same ``--seed`` gives the same prompts.

Every prompt must end in one of the accepted ways:
  success            the prompt ran;
  validation_error   /prompt answered 400 (ComfyUI's own input validation);
  execution_error    a node raised; for a pack node the message names the node (its display
                     name) and the input; for a core node any message that is not one of the
                     forbidden kinds below.
and never in a failure:
  dead_server        the server process exited or stopped answering;
  hung               the prompt did not finish within ``--timeout`` seconds (it is cancelled);
  http_error         /prompt answered something other than 200 or 400;
  bad_message        the error message is a Python traceback, or an internal torch error
                     (size mismatch, shape ... is invalid, NaN conversions, ...) that does not
                     name the pack node it came from, or a pack node's message that names no node.
It prints how the prompts ended, by kind (and errors by node and first words), then every
failure with its prompt; it exits 1 when there was a failure.

tests/test_reliability_errors.py runs a small budget of this on the test server.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

PACK_NODES = {
    "DeRaDiffLoadAlignedPair": "Load Aligned Model Pair (DeRaDiff)",
    "DeRaDiffMakePair": "Make Aligned Model Pair (DeRaDiff)",
    "DeRaDiffKSampler": "DeRaDiff KSampler",
    "DeRaDiffGuider": "DeRaDiff Guider",
    "DeRaDiffLambdaSchedule": "DeRaDiff λ Schedule",
    "DeRaDiffLambdaSweep": "DeRaDiff λ Sweep",
    "DeRaDiffSweepGrid": "DeRaDiff Sweep Grid",
    "DeRaDiffRealignModel": "DeRaDiff Realign Model",
}
SD15_REF = "sd15_reference.safetensors"
SD15_PAIRS = [(SD15_REF, "loras/sd15_aligned_lora.safetensors"),
              (SD15_REF, "diffusion_models/sd15_aligned_unet.safetensors"),
              (SD15_REF, "checkpoints/sd15_aligned.safetensors")]
SDXL_PAIRS = [("sdxl_reference.safetensors", "diffusion_models/sdxl_aligned_unet.safetensors")]
STANDIN_FILES = ["checkpoints/sd15_reference.safetensors", "checkpoints/sd15_aligned.safetensors",
                 "diffusion_models/sd15_aligned_unet.safetensors", "loras/sd15_aligned_lora.safetensors"]
SDXL_STANDIN_FILES = ["checkpoints/sdxl_reference.safetensors", "diffusion_models/sdxl_aligned_unet.safetensors"]

# dpm_adaptive picks its own number of steps (hundreds on random stand-ins): not a fixed-cost
# prompt, so random valid sampler names leave it out (a plain KSampler takes as long).
SLOW_SAMPLERS = {"dpm_adaptive"}

ACCEPTED = ("success", "validation_error", "execution_error")
FAILURES = ("dead_server", "hung", "http_error", "bad_message")

# internal errors that must never be the whole message of an error a pack node is part of
INTERNAL_ERROR = re.compile(
    r"size mismatch|shape '.*' is invalid|must match the size|mat1 and mat2|expected scalar type|"
    r"cannot convert float NaN|out of range float|index \d+ is out of bounds|not enough values to unpack|"
    r"object has no attribute|NoneType|unsupported operand|can't multiply|Sizes of tensors must match|"
    r"list index out of range|takes \d+ positional|got an unexpected keyword|KeyError|"
    r"Traceback \(most recent call last\)|\n\s+File \"", re.I)


# -- values --------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
WRONG_TYPES = [None, [1], {"a": 1}, True, "abc", ""]
FLOAT_POOL = [NAN, "nan", "NaN", INF, -INF, "inf", "-inf", -1.0, -1e-9, 0.0, 0.25, 0.5, 1.0, 1.5, 3.0,
              10.0, 10.0001, 1e308, "0.5", "1e400"] + WRONG_TYPES
SMALL_INT = {
    "steps": [0, -1, 1, 2, 3, 10001, "two", 2.7, "2"],
    "width": [0, -8, 8, 15, 16, 17, 24, 40, 64, 72, 100, 16392, "64"],
    "height": [0, -8, 8, 15, 16, 17, 24, 40, 64, 72, 100, 16392, "64"],
    "batch_size": [0, -1, 1, 2, 3, 4097],
    "max_lambdas_per_pass": [-1, 0, 1, 2, 3, 257],
    "seed": [0, -1, 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, "seed", 12345],
    "noise_seed": [0, -1, 1, 2 ** 64, 7],
    "columns": [-1, 0, 1, 2, 65],
    "preview_steps": [0, 1, 20, 1001],
}
LAMBDA_TOKENS = ["0", "0.5", "1", "1.5", "2", "3", "10", "-1", "nan", "inf", "-inf", "1e400", "1e-300",
                 "abc", "λ", "0x10", "1_0", "", ",", ";", "\n", "  ", "1,,2", "+1", ".5", "5."]
STRING_EXTRA = ["", " ", ",", "\n\n", "0" * 400, "1, 0.5, 0 ", "None", "[1, 2]", '{"a": 1}', "\x00", "λ=1"]


def random_lambda_list(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(STRING_EXTRA)
    n = rng.randint(0, 8)
    sep = rng.choice([", ", ",", " ", "; ", "\n", ",  "])
    return sep.join(rng.choice(LAMBDA_TOKENS) for _ in range(n))


def random_value(rng: random.Random, name: str, spec, combo_choices=None):
    """A random value for input ``name`` whose /object_info spec is ``spec``."""
    kind = spec[0] if spec else None
    if kind == "COMBO":  # V3 nodes' combo layout: ("COMBO", {"options": [...]})
        kind = spec[1]["options"]
    if name in SMALL_INT:
        return rng.choice(SMALL_INT[name] + WRONG_TYPES[:3])
    if isinstance(kind, list):  # combo
        choices = [c for c in (combo_choices or kind) if c not in SLOW_SAMPLERS]
        return rng.choice(choices * 3 + ["nope", "", 3, None])
    if kind == "FLOAT":
        return rng.choice(FLOAT_POOL)
    if kind == "INT":
        return rng.choice([-1, 0, 1, 2, 3, 2 ** 64, "x", 1.5, None])
    if kind == "STRING":
        return random_lambda_list(rng)
    if kind == "BOOLEAN":
        return rng.choice([True, False, "yes", 0, None])
    return rng.choice(WRONG_TYPES)


def json_safe(value):
    """How a value looks in the report (NaN/inf as in the JSON that was sent)."""
    return json.dumps(value, allow_nan=True, ensure_ascii=False)[:200]


# -- graphs ---------------------------------------------------------------------------------

class Graph(dict):
    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self) + 1)
        self[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


def _base(rng, pairs, make_pair_rate=0.2):
    """A valid pair + conditioning + latent, small and cheap."""
    g = Graph()
    ref, aligned = rng.choice(pairs)
    if rng.random() < make_pair_rate:  # Make Pair from two MODEL inputs
        ck = g.add("CheckpointLoaderSimple", ckpt_name=ref)
        if aligned.startswith("loras/"):
            al = [g.add("LoraLoaderModelOnly", model=[ck, 0], lora_name=aligned.split("/", 1)[1], strength_model=1.0), 0]
        elif aligned.startswith("diffusion_models/"):
            al = [g.add("UNETLoader", unet_name=aligned.split("/", 1)[1], weight_dtype="default"), 0]
        else:
            al = [g.add("CheckpointLoaderSimple", ckpt_name=aligned.split("/", 1)[1]), 0]
        pair = [g.add("DeRaDiffMakePair", reference=[ck, 0], aligned=al), 0]
        clip, vae = [ck, 1], [ck, 2]
    else:
        loader = g.add("DeRaDiffLoadAlignedPair", reference_ckpt_name=ref, aligned_model=aligned)
        pair, clip, vae = [loader, 0], [loader, 1], [loader, 2]
    pos = [g.add("CLIPTextEncode", clip=clip, text="a lighthouse"), 0]
    neg = [g.add("CLIPTextEncode", clip=clip, text="blurry"), 0]
    size = rng.choice([16, 24, 32, 40])
    latent = [g.add("EmptyLatentImage", width=size, height=size, batch_size=rng.choice([1, 1, 2])), 0]
    return g, pair, vae, pos, neg, latent


def _sampling(rng, seed):
    return dict(seed=seed, steps=rng.choice([1, 2]), cfg=rng.choice([1.0, 4.0, 7.5]),
                sampler_name=rng.choice(["euler", "euler_ancestral", "dpmpp_2m", "ddim", "heun"]),
                scheduler=rng.choice(["normal", "karras", "simple"]), denoise=rng.choice([1.0, 1.0, 0.6]))


def _schedule(g, rng):
    shape = rng.choice(["constant", "linear", "cosine", "ease_in", "ease_out", "interval", "custom"])
    return g.add("DeRaDiffLambdaSchedule", shape=shape, lambda_from=rng.choice([0.0, 0.5, 1.5]),
                 lambda_to=rng.choice([0.0, 1.0, 2.0]), start_percent=0.0, end_percent=rng.choice([0.5, 1.0]),
                 lambda_outside=0.0, custom_values=rng.choice(["1, 0.5", "0 1 2", "1"]))


def build_prompt(rng: random.Random, seed: int, pairs, make_pair_rate=0.2) -> tuple[Graph, str]:
    """A valid graph around one pack node; returns (graph, template name)."""
    template = rng.choice(["ksampler", "ksampler_schedule", "guider", "sweep", "sweep_grid", "realign"])
    g, pair, vae, pos, neg, latent = _base(rng, pairs, make_pair_rate)
    lam = {"lambda": rng.choice([0.0, 0.5, 1.0, 2.0])}
    if template in ("ksampler", "ksampler_schedule"):
        extra = {"lambda_schedule": [_schedule(g, rng), 0]} if template == "ksampler_schedule" else {}
        s = g.add("DeRaDiffKSampler", pair=pair, positive=pos, negative=neg, latent_image=latent,
                  **_sampling(rng, seed), **lam, **extra)
        g.add("SaveLatent", samples=[s, 0], filename_prefix="fuzz")
    elif template == "guider":
        extra = {"lambda_schedule": [_schedule(g, rng), 0]} if rng.random() < 0.3 else {}
        guider = g.add("DeRaDiffGuider", pair=pair, positive=pos, negative=neg, cfg=4.0, **lam, **extra)
        noise = g.add("RandomNoise", noise_seed=seed)
        sampler = g.add("KSamplerSelect", sampler_name=rng.choice(["euler", "dpmpp_2m"]))
        sigmas = g.add("KarrasScheduler", steps=rng.choice([1, 2]), sigma_max=14.6, sigma_min=0.03, rho=7.0)
        s = g.add("SamplerCustomAdvanced", noise=[noise, 0], guider=[guider, 0], sampler=[sampler, 0],
                  sigmas=[sigmas, 0], latent_image=latent)
        g.add("SaveLatent", samples=[s, 0], filename_prefix="fuzz")
    elif template in ("sweep", "sweep_grid"):
        s = g.add("DeRaDiffLambdaSweep", pair=pair, lambdas=rng.choice(["0, 1", "0.5", "0, 0.5, 2"]),
                  positive=pos, negative=neg, latent_image=latent, max_lambdas_per_pass=rng.choice([0, 1, 2]),
                  **_sampling(rng, seed))
        if template == "sweep":
            g.add("SaveLatent", samples=[s, 0], filename_prefix="fuzz")
        else:
            images = g.add("VAEDecode", samples=[s, 0], vae=vae)
            grid = g.add("DeRaDiffSweepGrid", images=[images, 0], labels=[s, 1], columns=0, beta=rng.choice([0.0, 5000.0]))
            g.add("PreviewImage", images=[grid, 0])
    else:
        extra = {"lambda_schedule": [_schedule(g, rng), 0]} if rng.random() < 0.3 else {}
        model = g.add("DeRaDiffRealignModel", pair=pair, **lam, **extra)
        s = g.add("KSampler", model=[model, 0], positive=pos, negative=neg, latent_image=latent,
                  **{k: v for k, v in _sampling(rng, seed).items()})
        g.add("SaveLatent", samples=[s, 0], filename_prefix="fuzz")
    return g, template


def mutate(rng: random.Random, g: Graph, object_info: dict) -> str:
    """One random change to ``g``; returns a description."""
    pack_ids = [n for n, v in g.items() if v.get("class_type") in PACK_NODES]
    targets = pack_ids * 4 + [n for n, v in g.items() if v.get("class_type") == "EmptyLatentImage"]
    if not targets:  # earlier mutations removed every node's class
        return "nothing left to mutate"
    node_id = rng.choice(targets)
    node = g[node_id]
    info = object_info.get(node["class_type"], {}).get("input", {})
    specs = {**info.get("required", {}), **info.get("optional", {})}
    kind = rng.choices(["value", "value", "value", "value", "drop", "link", "extra", "broken"],
                       weights=[1, 1, 1, 1, 0.6, 0.8, 0.3, 0.15])[0]
    if kind == "broken":
        what = rng.choice(["class", "no_inputs", "no_class"])
        if what == "class":
            node["class_type"] = "DeRaDiffNoSuchNode"
        elif what == "no_inputs":
            node.pop("inputs")
        else:
            node.pop("class_type")
        return f"node {node_id}: broken ({what})"
    if kind == "extra":
        node["inputs"]["no_such_input"] = rng.choice(FLOAT_POOL)
        return f"node {node_id} ({node['class_type']}): unknown input"
    names = list(specs) or list(node["inputs"])
    if not names:
        return "no-op"
    name = rng.choice(names)
    if kind == "drop":
        node["inputs"].pop(name, None)
        return f"node {node_id} ({node['class_type']}): '{name}' left out"
    if kind == "link":
        other = rng.choice(list(g) + ["999"])
        index = rng.choice([0, 1, 2, 5])
        node["inputs"][name] = [other, index]
        return f"node {node_id} ({node['class_type']}): '{name}' linked to [{other}, {index}]"
    value = random_value(rng, name, specs.get(name))
    node["inputs"][name] = value
    return f"node {node_id} ({node['class_type']}): '{name}' = {json_safe(value)}"


# -- client and classification --------------------------------------------------------------

class Client:
    """Posts prompts to a ComfyUI server (standard library only) and waits for their end."""

    def __init__(self, url: str, alive=None):
        self.url = url.rstrip("/")
        self.alive = alive or (lambda: None)  # raises when the server process is gone

    def _request(self, path, payload=None, timeout=60):
        data = None if payload is None else json.dumps(payload, allow_nan=True).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post_prompt(self, graph) -> tuple[int, dict | str]:
        status, body = self._request("/prompt", {"prompt": graph, "client_id": "deradiff-fuzz"})
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def wait(self, prompt_id: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive()
            _, body = self._request(f"/history/{prompt_id}", timeout=30)
            entry = json.loads(body).get(prompt_id)
            if entry and (entry.get("status", {}).get("completed") is not None or entry.get("status", {}).get("status_str")):
                return entry
            time.sleep(0.1)
        return None

    def cancel(self, prompt_id: str):
        try:
            self._request("/queue", {"delete": [prompt_id]})
            self._request("/interrupt", {"prompt_id": prompt_id})
        except OSError:
            pass

    def queue_empty(self, timeout=60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, body = self._request("/queue", timeout=30)
            q = json.loads(body)
            if not q.get("queue_running") and not q.get("queue_pending"):
                return True
            time.sleep(0.2)
        return False


def message_problem(node_type, message: str) -> str | None:
    """Why an execution error's message breaks the rules, or None."""
    text = str(message or "")
    if "Traceback (most recent call last)" in text or re.search(r'\n\s+File "', text):
        return "the message is a Python traceback"
    display = PACK_NODES.get(node_type)
    names_pack_node = any(f"{d}: input '" in text for d in PACK_NODES.values())
    if display is not None and not text.startswith(f"{display}: input '"):
        return f"the {node_type} error does not name the node and input ('{display}: input ...')"
    if INTERNAL_ERROR.search(text) and not names_pack_node:
        return "an internal error that names no node"
    if not text.strip():
        return "an empty message"
    return None


def classify(status, body, entry, timed_out=False) -> tuple[str, str]:
    """(kind, detail) of one prompt's end; kind is in ACCEPTED or FAILURES."""
    if timed_out:
        return "hung", "did not finish in time"
    if status == 400:
        if isinstance(body, dict) and (body.get("node_errors") or body.get("error")):
            errs = body.get("node_errors") or {}
            first = next(iter(errs.values()), {}).get("errors", [{}])[:1] if errs else [body.get("error", {})]
            e = first[0] if first else {}
            return "validation_error", f"{e.get('type', '?')}: {e.get('details') or e.get('message', '')}"[:160]
        return "http_error", f"400 without an error description: {str(body)[:300]}"
    if status != 200:
        return "http_error", f"/prompt answered {status}: {str(body)[:300]}"
    if isinstance(body, dict) and body.get("node_errors"):
        return "validation_error", "accepted with node_errors"  # outputs that can run still run
    messages = {k: v for k, v in entry.get("status", {}).get("messages", [])}
    err = messages.get("execution_error")
    if err:
        problem = message_problem(err.get("node_type"), err.get("exception_message", ""))
        detail = f"{err.get('node_type')}: {str(err.get('exception_message', '')).strip()[:300]}"
        if problem:
            return "bad_message", f"{problem}: {detail}"
        return "execution_error", detail
    if entry.get("status", {}).get("status_str") == "success":
        return "success", ""
    return "http_error", f"ended without success or execution_error: {json.dumps(entry.get('status'))[:300]}"


class Report:
    def __init__(self):
        self.kinds = Counter()
        self.details = Counter()
        self.failures = []  # (index, kind, detail, mutations, graph)
        self.tried = 0
        self.seconds = 0.0

    def add(self, index, kind, detail, mutations, graph):
        self.tried += 1
        self.kinds[kind] += 1
        if kind in ("validation_error", "execution_error"):
            if kind == "validation_error":
                key = detail.split(":")[0]
            else:  # the node and the input it names
                named = re.search(r"input '([^']+)'", detail)
                key = detail.split(":")[0] + (f" input '{named.group(1)}'" if named else ": " + detail.split(":", 1)[-1][:60])
            self.details[(kind, key)] += 1
        if kind in FAILURES:
            self.failures.append((index, kind, detail, mutations, graph))

    def text(self) -> str:
        lines = [f"{self.tried} prompts in {self.seconds:.0f} s", "how they ended:"]
        for kind in ACCEPTED + FAILURES:
            lines.append(f"  {kind:<18} {self.kinds.get(kind, 0)}")
        lines.append("errors by kind (first words):")
        for (kind, key), n in sorted(self.details.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {n:>4}  {kind}: {key}")
        for index, kind, detail, mutations, graph in self.failures:
            lines.append(f"FAILURE prompt {index}: {kind}: {detail}\n  mutations: {mutations}\n  prompt: "
                         f"{json.dumps(graph, allow_nan=True, ensure_ascii=False)[:3000]}")
        lines.append("result: " + ("FAILED" if self.failures else "ok, no failures"))
        return "\n".join(lines)


def run_fuzz(client: Client, prompts: int, seed: int, timeout: float = 120.0, sdxl: bool = False,
             quick: bool = False, log=print) -> Report:
    """``quick``: one pair (the SD1.5 LoRA pair) through Load Aligned Model Pair only, so that
    ComfyUI's cache keeps the loader between prompts (the test's budget); otherwise every
    stand-in pair and Make Pair too."""
    rng = random.Random(seed)
    _, body = client._request("/object_info")
    object_info = json.loads(body)
    pairs = SD15_PAIRS[:1] if quick else SD15_PAIRS + (SDXL_PAIRS if sdxl else [])
    make_pair_rate = 0.0 if quick else 0.2
    report = Report()
    start = time.monotonic()
    for index in range(prompts):
        graph, template = build_prompt(rng, seed * 100003 + index, pairs, make_pair_rate)
        k = rng.choices([0, 1, 2, 3], weights=[0.2, 0.45, 0.25, 0.1])[0]
        mutations = [mutate(rng, graph, object_info) for _ in range(k)]
        t0 = time.monotonic()
        try:
            client.alive()
            status, body = client.post_prompt(graph)
            entry, timed_out = None, False
            if status == 200 and isinstance(body, dict) and "prompt_id" in body:
                entry = client.wait(body["prompt_id"], timeout)
                if entry is None:
                    timed_out = True
                    client.cancel(body["prompt_id"])
                    client.queue_empty()
            kind, detail = classify(status, body, entry, timed_out)
        except (OSError, RuntimeError) as e:  # connection refused, process gone
            kind, detail = "dead_server", f"{type(e).__name__}: {e}"[:500]
        except ValueError as e:  # an answer that is not JSON
            kind, detail = "http_error", f"{type(e).__name__}: {e}"[:500]
        report.add(index, kind, detail, mutations, graph)
        log(f"[{index + 1}/{prompts}] {template:<17} {len(mutations)} mutation(s) -> {kind} "
            f"({time.monotonic() - t0:.1f} s){': ' + detail[:140] if detail else ''}")
        if kind == "dead_server":
            break
    report.seconds = time.monotonic() - start
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--comfyui", type=Path, help="ComfyUI tree (default: $DERADIFF_COMFYUI or .cache/comfyui)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a prompt may take before it counts as hung")
    ap.add_argument("--sdxl", action="store_true", help="also use the SDXL-family stand-in pair (slow to load)")
    ap.add_argument("--keep", action="store_true", help="keep the server's temporary directory")
    args = ap.parse_args(argv)

    import comfy_server
    import comfyui_runtime
    if args.comfyui:
        import os
        os.environ["DERADIFF_COMFYUI"] = str(args.comfyui.resolve())
    root = comfyui_runtime.comfyui_root()
    if not args.comfyui:
        root = comfyui_runtime.ensure_runtime()
    import standins
    for name in STANDIN_FILES + (SDXL_STANDIN_FILES if args.sdxl else []):
        standins.ensure_standin(name)
    workdir = Path(tempfile.mkdtemp(prefix="deradiff-fuzz-"))
    server = comfy_server.ComfyServer(root, standins.STANDIN_DIR, workdir=workdir, log_name="server.log")
    print(f"ComfyUI at {root}; server args {' '.join(server.args)}; log {server.log_path}", flush=True)
    try:
        with server:
            client = Client(server.url, alive=server.check_alive)
            report = run_fuzz(client, args.prompts, args.seed, args.timeout, args.sdxl,
                              log=lambda line: print(line, flush=True))
    finally:
        if not args.keep:
            server.remove_workdir()
    print(report.text())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
