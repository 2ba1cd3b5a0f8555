"""Saves a front-end workflow of every DeRaDiff node, as today's V1 nodes make it, with its golden outputs.

The fixtures in ``tests/fixtures/v1_workflows/`` pin the public API of the nodes before they move to
ComfyUI's V3 schema: a workflow saved today must load and run unchanged, with the same latents
(``tests/test_v1_fixtures.py`` checks it). For each node id of ``nodes/__init__.py`` there are:

- ``<NodeId>.json``: ``app.graph.serialize()`` of a small graph centred on that node, built in the real
  ComfyUI front end (LiteGraph's ``createNode`` / ``connect``, widgets set by name), i.e. what Save writes;
- ``<NodeId>.api.json``: ``(await app.graphToPrompt()).output``, the prompt the front end queues;
- ``<NodeId>.expected.safetensors``: what that prompt produced, keyed ``<ComfyUI version>/latent/<node>/<i>``
  (every LATENT, through SaveLatent) and ``<version>/image_png/<node>/<i>`` (every IMAGE, through SaveImage, as
  a PNG without metadata, stored as a
  uint8 tensor of its bytes: lossless, and small); ``<NodeId>.expected.json``: ``{version: {node: ui}}``, the other UI outputs of the run
  (text, numbers, the λ Schedule's preview data).

The graphs use the committed tiny family (tiny_family/: 32x32 px, 4 steps), so each runs in seconds on CPU.

    .venv/bin/python scripts/save_v1_fixtures.py                # 0.3.75: builds in the browser, runs, saves
    DERADIFF_COMFYUI=$PWD/.cache/comfyui-0.33.0 .venv033/bin/python scripts/save_v1_fixtures.py --golden-only

``--golden-only`` (implied on any ComfyUI but 0.3.75) runs the stored ``.api.json`` prompts and adds that
version's golden outputs, leaving the workflows as 0.3.75's front end saved them. Node ids as arguments
limit the run to those nodes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "v1_workflows"
FRONT_END_VERSION = "0.3.75"  # the ComfyUI whose front end saves the workflows
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))

import browser_helpers as bh  # noqa: E402  (tests/: the front-end helpers and the tiny family's names)

REF, BETA = bh.TINY_REF, bh.TINY_BETA
LORA = f"{bh.tiny_family.SUBFOLDER}/dpo_beta1000.safetensors"
LORA_2000 = f"{bh.tiny_family.SUBFOLDER}/dpo_beta2000.safetensors"
REWARD = bh.tiny_family.REWARD_NAME
PROMPT = "a large red square in the middle on a black background"
STEPS = 4


def _n(key, type_, x, y, widgets=None):
    return bh._node(key, type_, (x, y), widgets)


def _seeded(seed, **more):
    return {"seed": seed, "control_after_generate": "fixed", **more}


def _text(pos_key="pos", neg_key="neg", clip_src=("pair", "CLIP"), prompt=PROMPT):
    nodes = [_n(pos_key, "CLIPTextEncode", 400, 0, {"text": prompt}),
             _n(neg_key, "CLIPTextEncode", 400, 200, {"text": "blurry"})]
    links = [(clip_src[0], clip_src[1], pos_key, "clip"), (clip_src[0], clip_src[1], neg_key, "clip")]
    return nodes, links


def _loaded_pair(strength=0.8, beta=BETA):
    return _n("pair", "DeRaDiffLoadAlignedPair", 0, 0, {"reference_ckpt_name": REF, "aligned_model": f"loras/{LORA}",
                                                       "beta": beta, "lora_strength": strength})


def _latent(batch=2):
    return _n("latent", "EmptyLatentImage", 400, 400, {"width": 32, "height": 32, "batch_size": batch})


def _ksampler(lam, seed, more=None, **widgets):
    w = {"lambda": lam, **_seeded(seed), "steps": STEPS, "cfg": 4.5, "sampler_name": "euler",
         "scheduler": "normal", "denoise": 1.0, **(more or {})}
    w.update(widgets)
    return _n("sampler", "DeRaDiffKSampler", 800, 0, w)


def _sampler_links(pair_src=("pair", "pair")):
    return [(pair_src[0], pair_src[1], "sampler", "pair"), ("pos", "CONDITIONING", "sampler", "positive"),
            ("neg", "CONDITIONING", "sampler", "negative"), ("latent", "LATENT", "sampler", "latent_image")]


def _save_latent(key, src, out="LATENT", name=None):
    return ([_n(key, "SaveLatent", 1200, 0, {"filename_prefix": f"v1fixtures/{name or key}"})],
            [(src, out, key, "samples")])


def _save_image(key, src, out="IMAGE"):
    return ([_n(key, "SaveImage", 1200, 300, {"filename_prefix": f"v1fixtures/{key}"})], [(src, out, key, "images")])


def _join(*parts):
    nodes, links = [], []
    for n, l in parts:
        nodes += n
        links += l
    return nodes, links


def load_aligned_pair():
    return _join(([_loaded_pair(), _latent(), _ksampler(1.5, 7)], _sampler_links()), _text(),
                 _save_latent("save", "sampler"))


def make_pair():
    nodes = [_n("ckpt", "CheckpointLoaderSimple", 0, 0, {"ckpt_name": REF}),
             _n("lora", "LoraLoader", 0, 200, {"lora_name": LORA_2000, "strength_model": 1.2, "strength_clip": 0.0}),
             _n("pair", "DeRaDiffMakePair", 0, 400, {"beta": 2000.0}), _latent(), _ksampler(0.5, 3)]
    links = [("ckpt", "MODEL", "lora", "model"), ("ckpt", "CLIP", "lora", "clip"),
             ("ckpt", "MODEL", "pair", "reference"), ("lora", "MODEL", "pair", "aligned")]
    return _join((nodes, links + _sampler_links()), _text(clip_src=("ckpt", "CLIP")), _save_latent("save", "sampler"))


def ksampler():
    sampler = _ksampler(2.0, 11, {"particles": 2, "resample_ess": 0.7, "full_pass_every": 1},
                        sampler_name="euler_ancestral", cfg=3.5)
    return _join(([_loaded_pair(strength=1.0), _latent(batch=1), sampler], _sampler_links()), _text(),
                 _save_latent("save", "sampler"))


def guider():
    nodes = [_loaded_pair(), _latent(),
             _n("guider", "DeRaDiffGuider", 800, 0, {"cfg": 3.0, "lambda": 1.25, "full_pass_every": 2}),
             _n("noise", "RandomNoise", 800, 300, {"noise_seed": 5, "control_after_generate": "fixed"}),
             _n("ksel", "KSamplerSelect", 800, 400, {"sampler_name": "euler"}),
             _n("sigmas", "KarrasScheduler", 800, 500, {"steps": STEPS, "sigma_max": 14.6, "sigma_min": 0.03, "rho": 7.0}),
             _n("custom", "SamplerCustomAdvanced", 1000, 0)]
    links = [("pair", "pair", "guider", "pair"), ("pos", "CONDITIONING", "guider", "positive"),
             ("neg", "CONDITIONING", "guider", "negative"), ("noise", "NOISE", "custom", "noise"),
             ("guider", "GUIDER", "custom", "guider"), ("ksel", "SAMPLER", "custom", "sampler"),
             ("sigmas", "SIGMAS", "custom", "sigmas"), ("latent", "LATENT", "custom", "latent_image")]
    return _join((nodes, links), _text(), _save_latent("save", "custom", "output"),
                 _save_latent("save_denoised", "custom", "denoised_output"))


def lambda_schedule():
    schedule = _n("schedule", "DeRaDiffLambdaSchedule", 400, 600,
                  {"shape": "interval", "lambda_from": 1.5, "lambda_to": 0.25, "start_percent": 0.0, "end_percent": 0.4,
                   "lambda_outside": 0.0, "custom_values": "1, 1, 1, 0.5, 0", "preview_steps": STEPS})
    links = [("pair", "pair", "schedule", "pair"), ("schedule", "lambda_schedule", "sampler", "lambda_schedule")]
    return _join(([_loaded_pair(), _latent(), schedule, _ksampler(1.0, 9)], _sampler_links() + links), _text(),
                 _save_latent("save", "sampler"))


def _sweep_graph(lambdas, columns, grid_beta):
    nodes = [_loaded_pair(), _latent(batch=1),
             _n("sweep", "DeRaDiffLambdaSweep", 800, 0,
                {"lambdas": lambdas, **_seeded(21), "steps": STEPS, "cfg": 4.0, "sampler_name": "euler",
                 "scheduler": "karras", "denoise": 1.0, "max_lambdas_per_pass": 2, "full_pass_every": 1}),
             _n("decode", "VAEDecode", 1000, 0),
             _n("grid", "DeRaDiffSweepGrid", 1000, 200, {"columns": columns, "beta": grid_beta})]
    links = [("pair", "pair", "sweep", "pair"), ("pos", "CONDITIONING", "sweep", "positive"),
             ("neg", "CONDITIONING", "sweep", "negative"), ("latent", "LATENT", "sweep", "latent_image"),
             ("sweep", "latents", "decode", "samples"), ("pair", "VAE", "decode", "vae"),
             ("decode", "IMAGE", "grid", "images"), ("sweep", "labels", "grid", "labels")]
    return _join((nodes, links), _text(), _save_latent("save", "sweep", "latents"), _save_image("save_grid", "grid", "grid"))


def lambda_sweep():
    return _sweep_graph("0, 1, 2.5", 3, BETA)


def sweep_grid():
    return _sweep_graph("0.5, 1.5", 1, 0.0)


def realign_model():
    nodes = [_loaded_pair(), _latent(),
             _n("realign", "DeRaDiffRealignModel", 800, 0, {"lambda": 1.75, "full_pass_every": 2}),
             _n("sampler", "KSampler", 1000, 0, {**_seeded(13), "steps": STEPS, "cfg": 5.0, "sampler_name": "euler",
                                                 "scheduler": "simple", "denoise": 1.0})]
    links = [("pair", "pair", "realign", "pair"), ("realign", "MODEL", "sampler", "model"),
             ("pos", "CONDITIONING", "sampler", "positive"), ("neg", "CONDITIONING", "sampler", "negative"),
             ("latent", "LATENT", "sampler", "latent_image")]
    return _join((nodes, links), _text(), _save_latent("save", "sampler"))


def _reward_graph(prompt, seed):
    nodes = [_n("ckpt", "CheckpointLoaderSimple", 0, 0, {"ckpt_name": REF}), _latent(),
             _n("sampler", "KSampler", 800, 0, {**_seeded(seed), "steps": STEPS, "cfg": 4.0, "sampler_name": "euler",
                                                "scheduler": "normal", "denoise": 1.0}),
             _n("decode", "VAEDecode", 1000, 0),
             _n("reward", "DeRaDiffLoadRewardModel", 0, 300, {"kind": "torch_scorer", "model": REWARD,
                                                              "aesthetic_head": "none"}),
             _n("score", "DeRaDiffRewardScore", 1200, 0, {"prompt": prompt})]
    links = [("ckpt", "MODEL", "sampler", "model"), ("pos", "CONDITIONING", "sampler", "positive"),
             ("neg", "CONDITIONING", "sampler", "negative"), ("latent", "LATENT", "sampler", "latent_image"),
             ("sampler", "LATENT", "decode", "samples"), ("ckpt", "VAE", "decode", "vae"),
             ("decode", "IMAGE", "score", "images"), ("reward", "reward_model", "score", "reward_model")]
    return _join((nodes, links), _text(clip_src=("ckpt", "CLIP"), prompt=prompt))


def load_reward_model():
    return _reward_graph(PROMPT, 17)


def reward_score():
    return _reward_graph("a small green circle in the middle on a white background", 19)


def lambda_search():
    nodes = [_loaded_pair(), _latent(batch=1),
             _n("reward", "DeRaDiffLoadRewardModel", 0, 300, {"kind": "torch_scorer", "model": REWARD,
                                                              "aesthetic_head": "none"}),
             _n("search", "DeRaDiffLambdaSearch", 800, 0,
                {"prompts": PROMPT, **_seeded(23), "steps": STEPS, "cfg": 4.0, "sampler_name": "euler",
                 "scheduler": "normal", "lambda_min": 0.5, "lambda_max": 2.5, "budget": 2, "lambdas_per_round": 2,
                 "beta": BETA, "max_lambdas_per_pass": 1})]
    links = [("pair", "pair", "search", "pair"), ("pair", "CLIP", "search", "clip"), ("pair", "VAE", "search", "vae"),
             ("reward", "reward_model", "search", "reward_model"), ("neg", "CONDITIONING", "search", "negative"),
             ("latent", "LATENT", "search", "latent_image")]
    text_nodes, text_links = _text()
    neg_only = ([n for n in text_nodes if n["key"] == "neg"], [l for l in text_links if l[2] == "neg"])
    return _join((nodes, links), neg_only, _save_image("save_plot", "search", "plot"),
                 _save_image("save_best", "search", "best_images"))


GRAPHS = {
    "DeRaDiffLoadAlignedPair": load_aligned_pair,
    "DeRaDiffMakePair": make_pair,
    "DeRaDiffKSampler": ksampler,
    "DeRaDiffGuider": guider,
    "DeRaDiffLambdaSchedule": lambda_schedule,
    "DeRaDiffLambdaSweep": lambda_sweep,
    "DeRaDiffSweepGrid": sweep_grid,
    "DeRaDiffRealignModel": realign_model,
    "DeRaDiffLoadRewardModel": load_reward_model,
    "DeRaDiffRewardScore": reward_score,
    "DeRaDiffLambdaSearch": lambda_search,
}


def spec(node_id):
    nodes, links = GRAPHS[node_id]()
    return {"nodes": nodes, "links": [list(l) for l in links], "not_here": []}


# -- running a prompt and reading its outputs -----------------------------------------------

def comfy_version(server) -> str:
    return server.get("/system_stats")["system"]["comfyui_version"]


def png_bytes(image):
    """The pixels as a PNG without metadata, as a uint8 tensor: lossless and far smaller than raw
    pixels (the λ Search plot is 640x360)."""
    import io
    import torch
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).clone()


def png_pixels(tensor):
    """png_bytes' inverse: [H, W, 3] uint8 pixels."""
    import io
    import numpy as np
    import torch
    from PIL import Image
    return torch.from_numpy(np.array(Image.open(io.BytesIO(tensor.numpy().tobytes())).convert("RGB")))


def collect_outputs(entry, output_dir: Path, version: str):
    """(tensors, ui) of a finished prompt: every saved latent and image (type 'output') as a tensor
    under '<version>/latent|image/<node>/<i>', and the other UI outputs per node."""
    from PIL import Image
    from safetensors.torch import load_file
    tensors, ui = {}, {}
    for node, out in sorted(entry.get("outputs", {}).items()):
        for i, item in enumerate(out.get("latents", [])):
            path = output_dir / item.get("subfolder", "") / item["filename"]
            tensors[f"{version}/latent/{node}/{i}"] = load_file(str(path))["latent_tensor"].float().contiguous()
        images = [x for x in out.get("images", []) if x.get("type") == "output"]
        for i, item in enumerate(images):
            path = output_dir / item.get("subfolder", "") / item["filename"]
            tensors[f"{version}/image_png/{node}/{i}"] = png_bytes(Image.open(path).convert("RGB"))
        rest = {k: v for k, v in out.items() if k not in ("latents", "images")}
        if rest:
            ui[node] = rest
    return tensors, ui


def store_golden(node_id, version, tensors, ui):
    """Adds one version's outputs to the node's golden files (other versions' entries stay)."""
    from safetensors.torch import load_file, save_file
    st = FIXTURES / f"{node_id}.expected.safetensors"
    js = FIXTURES / f"{node_id}.expected.json"
    old = {k: v for k, v in (load_file(str(st)) if st.exists() else {}).items() if not k.startswith(version + "/")}
    save_file({**old, **tensors}, str(st), metadata={"versions": "see keys: <ComfyUI version>/<kind>/<node>/<i>"})
    data = json.loads(js.read_text()) if js.exists() else {}
    data[version] = ui
    js.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def run_and_store(server, node_id, prompt, version):
    entry = server.run(prompt, timeout=600)
    tensors, ui = collect_outputs(entry, server.output_dir, version)
    if not tensors and not ui:
        raise RuntimeError(f"{node_id}: the run produced no output to compare")
    store_golden(node_id, version, tensors, ui)
    print(f"{node_id}: {len(tensors)} tensors, ui of {sorted(ui)}")


def build_in_front_end(page, node_id):
    data = json.loads(page.evaluate(bh.BUILD_JS, spec(node_id)))
    data["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"deradiff-v1-fixture/{node_id}"))  # stable across reruns
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    (FIXTURES / f"{node_id}.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    (FIXTURES / f"{node_id}.api.json").write_text(json.dumps(prompt, indent=1, ensure_ascii=False) + "\n")
    return prompt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("nodes", nargs="*", help="node ids (default: all)")
    parser.add_argument("--golden-only", action="store_true",
                        help="run the stored .api.json prompts and add this ComfyUI's golden outputs")
    args = parser.parse_args(argv)
    import comfyui_runtime
    node_ids = args.nodes or list(GRAPHS)
    unknown = [n for n in node_ids if n not in GRAPHS]
    if unknown:
        parser.error(f"unknown node ids {unknown}; known: {list(GRAPHS)}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="deradiff-v1-fixtures-"))
    try:
        with bh.comfy_with_pack(comfyui_runtime.comfyui_root(), work) as server:
            version = comfy_version(server)
            golden_only = args.golden_only or version != FRONT_END_VERSION
            print(f"ComfyUI {version}: {'golden outputs only' if golden_only else 'workflows + golden outputs'}")
            if golden_only:
                for node_id in node_ids:
                    prompt = json.loads((FIXTURES / f"{node_id}.api.json").read_text())
                    run_and_store(server, node_id, prompt, version)
                return
            from playwright.sync_api import sync_playwright
            with sync_playwright() as p:
                context, profile = bh.launch_browser(p)
                try:
                    page = bh.open_front_end(context.new_page(), server.url)
                    for node_id in node_ids:
                        run_and_store(server, node_id, build_in_front_end(page, node_id), version)
                finally:
                    context.close()
                    shutil.rmtree(profile, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
