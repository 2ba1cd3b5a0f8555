"""Helpers for the browser test (tests/test_browser.py) and the example workflows.

- ``MODEL_FILES``: the public model files the example workflows expect, where they go and
  where they are published; the browser test places the stand-in models under these names.
  ``LOCAL_MODEL_FILES``: files made in this repository (the tiny family, no download URL), which
  ``make_models_dir`` links in from ``scripts/tiny_family.py materialize`` when the family is committed.
- ``WORKFLOWS``: how each example workflow in ``example_workflows/`` is built. The JSON files
  are made by the real ComfyUI front end (LiteGraph's own ``createNode`` / ``connect`` /
  ``graph.serialize()``), so they are exactly what the canvas saves and loads:

      python tests/browser_helpers.py            # rewrites example_workflows/*.json

  (starts ComfyUI with the pack and the stand-in models, and headless Debian Chromium).
  The thumbnails (``example_workflows/*.jpg``) and the README screenshots (``docs/*.png``)
  are written by the browser test when ``DERADIFF_UPDATE_EXAMPLE_IMAGES=1`` is set.
- ``prompt_problems``: checks an API prompt (what the front end queues) against
  ``/object_info``, so a renamed input, a widget value out of range or a combo value that
  is not in the list is reported before anything runs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "example_workflows"
DOCS = REPO / "docs"
ARTIFACTS = REPO / "test-artifacts"
sys.path.insert(0, str(REPO / "scripts"))
from comfy_server import PACK_DIR_NAME  # noqa: E402  (the folder name the launcher links the pack under)
from run_deradiff import TINY_PROMPT  # noqa: E402  (the main job's prompt, shown in the tiny workflow)
from run_tests import find_chromium  # noqa: E402

# $DERADIFF_CHROMIUM, else /usr/bin/chromium or chromium-browser (scripts/run_tests.py installs Debian's)
CHROMIUM = find_chromium() or os.environ.get("DERADIFF_CHROMIUM", "/usr/bin/chromium")
# Debian's Chromium on a machine without a screen or outside network (no browser is downloaded).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}

HF = "https://huggingface.co"
SD15_REF = "v1-5-pruned-emaonly.safetensors"
SDXL_REF = "sd_xl_base_1.0.safetensors"
SD15_DPO = "dpo-sd1.5-text2image-v1.safetensors"
SDXL_DPO = "dpo-sdxl-text2image-v1.safetensors"
# Diffusion-DPO's β: --beta_dpo 5000 in the authors' SD1.5 and SDXL launchers
# (github.com/SalesforceAIResearch/DiffusionDPO, launchers/sd15.sh and launchers/sdxl.sh).
DPO_BETA = 5000.0

# public file name -> (ComfyUI model folder, stand-in in scripts/standins.py, download URL)
MODEL_FILES = {
    SD15_REF: ("checkpoints", "checkpoints/sd15_reference.safetensors",
               f"{HF}/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors"),
    SDXL_REF: ("checkpoints", "checkpoints/sdxl_reference.safetensors",
               f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"),
    SD15_DPO: ("diffusion_models", "diffusion_models/sd15_aligned_unet.safetensors",
               f"{HF}/mhdang/dpo-sd1.5-text2image-v1/resolve/main/unet/diffusion_pytorch_model.safetensors"),
    SDXL_DPO: ("diffusion_models", "diffusion_models/sdxl_aligned_unet.safetensors",
               f"{HF}/mhdang/dpo-sdxl-text2image-v1/resolve/main/unet/diffusion_pytorch_model.safetensors"),
}

# Flux.1-dev + SRPO and SD3.5 Medium + Flow-GRPO (issue 14): diffusion-model files, each with a stand-in
FLUX_DEV = "flux1-dev.safetensors"
SRPO = "srpo-flux1-dev.safetensors"
SD35M = "sd3.5_medium.safetensors"
SD35M_FLOWGRPO = "sd3.5m-flowgrpo-pickscore.safetensors"
FLOWGRPO_PICKSCORE_BETA = 0.01  # config.train.beta of pickscore_sd3 in Flow-GRPO's config/grpo.py
MODEL_FILES.update({
    FLUX_DEV: ("diffusion_models", "diffusion_models/flux1_dev_reference.safetensors",
               f"{HF}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"),
    SRPO: ("diffusion_models", "diffusion_models/flux1_dev_aligned.safetensors",
           f"{HF}/tencent/SRPO/resolve/main/diffusion_pytorch_model.safetensors"),
    SD35M: ("diffusion_models", "diffusion_models/sd35_reference.safetensors",
            f"{HF}/stabilityai/stable-diffusion-3.5-medium/resolve/main/sd3.5_medium.safetensors"),
    # the repository, not a file: its file layout was not verified, so the workflow does not offer a download
    SD35M_FLOWGRPO: ("diffusion_models", "diffusion_models/sd35_aligned.safetensors",
                     f"{HF}/jieliu/SD3.5M-FlowGRPO-PickScore"),
})
# The text encoders and VAEs these two examples load: T5-XXL (4.7 G parameters), CLIP-G, CLIP-L and the
# 16-channel VAEs. ComfyUI builds a text encoder at its real size whatever the file holds, so no stand-in
# fits this machine: the browser test checks everything about these loaders except that their file is
# present (the combo value and the prompt's choice check), and does not run the two examples; the same
# graphs without the text encoders run in tests/test_families_server.py. file name -> (folder, what it is)
NOT_HERE = {
    "clip_l.safetensors": ("text_encoders", "CLIP-L text encoder"),
    "t5xxl_fp16.safetensors": ("text_encoders", "T5-XXL text encoder"),
    "clip_g.safetensors": ("text_encoders", "CLIP-G text encoder"),
    "ae.safetensors": ("vae", "Flux.1 VAE"),
    "sd3.5_vae.safetensors": ("vae", "SD3.5 VAE"),
}


def uses_files_not_here(data) -> list[str]:
    """The NOT_HERE files a workflow's nodes name (their loaders cannot run on the stand-ins)."""
    return sorted({v for n in data.get("nodes", []) for v in n.get("widgets_values", []) or []
                   if isinstance(v, str) and v in NOT_HERE})


# reward model (folder or file) in models/reward_models -> its stand-in (scripts/standins.py); for λ Search
PICKSCORE, CLIP_L, AESTHETIC = "PickScore_v1", "clip-vit-large-patch14", "sac+logos+ava1-l14-linearMSE.pth"
REWARD_FILES = {PICKSCORE: "reward_models/clip-standin", CLIP_L: "reward_models/clip-standin",
                AESTHETIC: "reward_models/aesthetic-standin.pth"}


# The tiny family trained in this repository (scripts/tiny_family.py; the trained weights are committed in
# tiny_family/): its ComfyUI files have no download URL, ``python scripts/tiny_family.py materialize``
# writes them (into .cache/tiny_family/models). A workflow lists them in its Note, not in its ``models``
# (the front end's missing-models dialog could only offer a download). file name -> (model folder, what it is)
import tiny_family  # noqa: E402  (scripts/)

TINY_REF = tiny_family.CHECKPOINT_NAME
TINY_BETA = 1000.0
TINY_DPO = f"{tiny_family.SUBFOLDER}/dpo_beta{TINY_BETA:g}.safetensors"
LOCAL_MODEL_FILES = {
    TINY_REF: ("checkpoints", "the tiny family's reference (UNet, generated CLIP-L, TAESD)"),
    TINY_DPO: ("loras", f"the tiny family's Diffusion-DPO LoRA at β = {TINY_BETA:g}"),
}
# workflows that need the committed tiny family to run (skipped without it)
NEEDS_TINY_FAMILY = {"deradiff_tiny_family"}


def tiny_family_present() -> bool:
    return (tiny_family.FAMILY_DIR / "family.json").exists()


# Prefixes of DeRaDiff Load Aligned Pair's aligned_model values (the folder the file comes from).
_FOLDER_PREFIXES = ("checkpoints/", "diffusion_models/", "loras/")


def model_files_used(data) -> list[tuple[str, str]]:
    """(model folder, file name) of every file of MODEL_FILES or LOCAL_MODEL_FILES a workflow's nodes name,
    also where an aligned_model value carries its folder ("loras/<name>")."""
    known = {**{n: f for n, (f, _, _) in MODEL_FILES.items()}, **{n: f for n, (f, _) in LOCAL_MODEL_FILES.items()}}
    used = set()
    for node in data.get("nodes", []):
        for v in node.get("widgets_values", []) or []:
            if not isinstance(v, str):
                continue
            prefix = next((p for p in _FOLDER_PREFIXES if v.startswith(p) and v[len(p):] in known), "")
            name = v[len(prefix):]
            if name in known and (not prefix or prefix[:-1] == known[name]):
                used.add((known[name], name))
    return sorted(used)


def models_metadata(*names):
    """The workflow's top-level ``models`` list: the front end checks these files exist and,
    when one is missing, offers its download in the missing-models dialog."""
    return [{"name": n, "url": MODEL_FILES[n][2], "directory": MODEL_FILES[n][0]} for n in names]


def make_models_dir(dest: Path, standin_dir: Path) -> Path:
    """A ComfyUI models folder whose files carry the public names, each a symlink to the
    stand-in of the same family (checkpoints/, diffusion_models/, loras/)."""
    for sub in ("checkpoints", "diffusion_models", "loras"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for name, (folder, standin, _) in MODEL_FILES.items():
        target = standin_dir / standin
        if not target.exists():
            from standins import ON_DEMAND, ensure_standin
            if standin in ON_DEMAND:  # the family stand-ins are written on first use
                ensure_standin(standin)
        if not target.exists():
            raise FileNotFoundError(f"stand-in {target} is missing")
        link = dest / folder / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    link_tiny_family(dest)
    from standins import ensure_reward_standins
    ensure_reward_standins()
    (dest / "reward_models").mkdir(exist_ok=True)
    for name, standin in REWARD_FILES.items():
        link = dest / "reward_models" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(standin_dir / standin, target_is_directory=(standin_dir / standin).is_dir())
    return dest


def link_tiny_family(dest: Path) -> bool:
    """The committed tiny family's ComfyUI files (``tiny_family.materialize`` into its default folder,
    .cache/tiny_family/models; skipped when already written) linked into the models folder ``dest``
    under their own names (checkpoints/deradiff_tiny/, loras/deradiff_tiny/, diffusion_models/deradiff_tiny/,
    reward_models/deradiff_tiny_colourfulness/). False, and nothing linked, while no family is committed."""
    if not tiny_family_present():
        return False
    tiny_family.materialize(tiny_family.FAMILY_DIR, tiny_family.MODELS_DIR)
    for folder, name in (("checkpoints", tiny_family.SUBFOLDER), ("loras", tiny_family.SUBFOLDER),
                         ("diffusion_models", tiny_family.SUBFOLDER), ("reward_models", tiny_family.REWARD_NAME)):
        (dest / folder).mkdir(parents=True, exist_ok=True)
        link = dest / folder / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(tiny_family.MODELS_DIR / folder / name, target_is_directory=True)
    return True


# -- the example workflows ----------------------------------------------------------------

def _node(key, type_, pos, widgets=None, size=None, title=None):
    return {"key": key, "type": type_, "pos": list(pos), "widgets": widgets or {}, "size": size, "title": title}


MODELS_HELP = (
    "Put the files here, then press R in ComfyUI (or restart it) to refresh the lists.\n"
    "A diffusers UNet is always called diffusion_pytorch_model.safetensors: save it under the name "
    "shown, so two of them can sit side by side.")

LAMBDA_HELP = (
    "λ: 0 = the reference, 1 = the aligned model, between = a stronger KL penalty (β/λ > β), "
    "above 1 = a weaker one (β/λ < β: more alignment; may degrade past 2-3).")


def _sd15_models_note(extra=""):
    return (
        "Model files\n"
        f"• models/checkpoints/{SD15_REF}\n"
        "   the reference: Stable Diffusion 1.5, huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5\n"
        f"• models/diffusion_models/{SD15_DPO}\n"
        "   the aligned model: Diffusion-DPO SD1.5, huggingface.co/mhdang/dpo-sd1.5-text2image-v1, "
        "file unet/diffusion_pytorch_model.safetensors (3.4 GB), renamed\n\n"
        f"{MODELS_HELP}\n\n"
        f"β = 5000: Diffusion-DPO trained SD1.5 at β = 5000 (--beta_dpo 5000).\n{LAMBDA_HELP}{extra}")


def _sd15_graph(sampler_node, sampler_widgets, note_title, note_text, save_prefix, extra_nodes=(), extra_links=(),
                pair_widgets=None):
    """Load pair + prompts + empty latent + a sampler + decode + save, SD1.5 sized."""
    nodes = [
        _node("note", "Note", (0, 0), {"text": note_text}, size=(470, 430), title=note_title),
        _node("pair", "DeRaDiffLoadAlignedPair", (0, 470),
              pair_widgets or {"reference_ckpt_name": SD15_REF, "aligned_model": f"diffusion_models/{SD15_DPO}",
                               "beta": DPO_BETA, "lora_strength": 1.0}, size=(470, None)),
        _node("pos", "CLIPTextEncode", (510, 0), {"text": "a red fox in the snow, detailed fur, golden hour light"},
              size=(400, 170), title="Positive prompt"),
        _node("neg", "CLIPTextEncode", (510, 210), {"text": "blurry, low quality, deformed"}, size=(400, 130),
              title="Negative prompt"),
        _node("latent", "EmptyLatentImage", (510, 380), {"width": 512, "height": 512, "batch_size": 1}, size=(400, None)),
        _node("sampler", sampler_node, (950, 0), sampler_widgets, size=(330, None)),
        _node("decode", "VAEDecode", (1320, 0), size=(220, None)),
        _node("save", "SaveImage", (1320, 90), {"filename_prefix": save_prefix}, size=(420, 470)),
        *extra_nodes,
    ]
    links = [
        ("pair", "CLIP", "pos", "clip"), ("pair", "CLIP", "neg", "clip"),
        ("pos", "CONDITIONING", "sampler", "positive"), ("neg", "CONDITIONING", "sampler", "negative"),
        ("latent", "LATENT", "sampler", "latent_image"),
        ("sampler", "LATENT", "decode", "samples"), ("pair", "VAE", "decode", "vae"),
        ("decode", "IMAGE", "save", "images"),
        *extra_links,
    ]
    return nodes, links


SAMPLER_WIDGETS = {"seed": 42, "control_after_generate": "fixed", "steps": 25, "cfg": 7.5,
                   "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}


def _sd15_dpo():
    nodes, links = _sd15_graph(
        "DeRaDiffKSampler", {"lambda": 1.5, **SAMPLER_WIDGETS},
        "DeRaDiff: SD1.5 + Diffusion-DPO",
        _sd15_models_note("\n\nA full aligned checkpoint works the same way: put it in models/checkpoints and "
                          "pick checkpoints/<file> as aligned_model."),
        "DeRaDiff/sd15_dpo")
    links.insert(0, ("pair", "pair", "sampler", "pair"))
    return nodes, links, models_metadata(SD15_REF, SD15_DPO)


def _sdxl_dpo():
    note = (
        "Model files\n"
        f"• models/checkpoints/{SDXL_REF}\n"
        "   the reference: SDXL 1.0 base, huggingface.co/stabilityai/stable-diffusion-xl-base-1.0\n"
        f"• models/diffusion_models/{SDXL_DPO}\n"
        "   the aligned model: Diffusion-DPO SDXL, huggingface.co/mhdang/dpo-sdxl-text2image-v1, "
        "file unet/diffusion_pytorch_model.safetensors (10.3 GB, fp32; loaded at the reference's dtype), renamed\n\n"
        f"{MODELS_HELP}\n\n"
        f"β = 5000: Diffusion-DPO trained SDXL at β = 5000 (--beta_dpo 5000).\n{LAMBDA_HELP}")
    nodes, links = _sd15_graph(
        "DeRaDiffKSampler", {"lambda": 1.5, **dict(SAMPLER_WIDGETS, steps=30, cfg=7.0)},
        "DeRaDiff: SDXL + Diffusion-DPO UNet", note, "DeRaDiff/sdxl_dpo",
        pair_widgets={"reference_ckpt_name": SDXL_REF, "aligned_model": f"diffusion_models/{SDXL_DPO}",
                      "beta": DPO_BETA, "lora_strength": 1.0})
    for n in nodes:
        if n["key"] == "latent":
            n["widgets"] = {"width": 1024, "height": 1024, "batch_size": 1}
    links.insert(0, ("pair", "pair", "sampler", "pair"))
    return nodes, links, models_metadata(SDXL_REF, SDXL_DPO)


def _lambda_sweep():
    nodes, links = _sd15_graph(
        "DeRaDiffLambdaSweep", {"lambdas": "0, 0.5, 1, 1.5, 2", **SAMPLER_WIDGETS},
        "DeRaDiff: λ sweep grid (SD1.5 + Diffusion-DPO)",
        _sd15_models_note("\n\nThe sweep samples every λ with the same seed in one batched pass; the grid "
                          "labels each image with λ and the emulated β/λ."),
        "DeRaDiff/lambda_sweep",
        extra_nodes=[_node("grid", "DeRaDiffSweepGrid", (1320, 90), {"columns": 0, "beta": 0.0}, size=(260, None))])
    for n in nodes:
        if n["key"] == "save":
            n["pos"] = [1320, 200]
            n["size"] = [620, 360]
    links = [("sampler", "latents", "decode", "samples") if link == ("sampler", "LATENT", "decode", "samples") else link
             for link in links if link != ("decode", "IMAGE", "save", "images")]
    links += [("pair", "pair", "sampler", "pair"), ("decode", "IMAGE", "grid", "images"),
              ("sampler", "labels", "grid", "labels"), ("grid", "grid", "save", "images")]
    return nodes, links, models_metadata(SD15_REF, SD15_DPO)


def _realign_model():
    nodes, links = _sd15_graph(
        "KSampler", dict(SAMPLER_WIDGETS),
        "DeRaDiff: realigned MODEL in a plain KSampler",
        _sd15_models_note("\n\nDeRaDiff Realign Model turns the pair into a MODEL, so any sampler node (KSampler, "
                          "KSamplerAdvanced, SamplerCustom, detailers, upscalers) samples the realigned model. "
                          "In a KSampler it gives what DeRaDiff KSampler gives."),
        "DeRaDiff/realign_model",
        extra_nodes=[_node("realign", "DeRaDiffRealignModel", (950, 380), {"lambda": 1.5}, size=(330, None))])
    links += [("pair", "pair", "realign", "pair"), ("realign", "MODEL", "sampler", "model")]
    return nodes, links, models_metadata(SD15_REF, SD15_DPO)


def _lambda_schedule():
    nodes, links = _sd15_graph(
        "DeRaDiffKSampler", {"lambda": 1.0, **SAMPLER_WIDGETS},
        "DeRaDiff: λ schedule along the trajectory",
        _sd15_models_note("\n\nThe schedule replaces the sampler's constant λ. Here: λ 1.5 for the first 40 % of "
                          "the denoising (the aligned model's composition, extrapolated), then λ 0 (the reference's "
                          "details). The node plots λ over the steps when it runs."),
        "DeRaDiff/lambda_schedule",
        extra_nodes=[_node("schedule", "DeRaDiffLambdaSchedule", (510, 560),
                           {"shape": "interval", "lambda_from": 1.5, "lambda_to": 0.0, "start_percent": 0.0,
                            "end_percent": 0.4, "lambda_outside": 0.0, "custom_values": "1, 1, 1, 0.5, 0",
                            "preview_steps": 25}, size=(400, 560))])
    links += [("pair", "pair", "sampler", "pair"), ("pair", "pair", "schedule", "pair"),
              ("schedule", "lambda_schedule", "sampler", "lambda_schedule")]
    return nodes, links, models_metadata(SD15_REF, SD15_DPO)


def _lambda_search():
    note = _sd15_models_note(
        "\n\nReward models, in models/reward_models (nothing is downloaded; README 'λ Search'):\n"
        f"• {PICKSCORE}/: huggingface.co/yuvalkirstain/PickScore_v1 (config.json, model.safetensors) plus the "
        "processor files of huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K\n"
        f"• {CLIP_L}/: huggingface.co/openai/clip-vit-large-patch14\n"
        f"• {AESTHETIC}: github.com/christophschuhmann/improved-aesthetic-predictor\n\n"
        "λ Search samples a few λ per round for both prompts and 2 seeds (the latent's batch), scores them with "
        "PickScore, fits a Gaussian process and picks the next λ by the knowledge gradient; the aesthetic score "
        "is watched for reward hacking. Connect best_lambda to a DeRaDiff KSampler's λ to use it.")
    nodes = [
        _node("note", "Note", (0, 0), {"text": note}, size=(470, 520), title="DeRaDiff: find λ automatically"),
        _node("pair", "DeRaDiffLoadAlignedPair", (0, 560),
              {"reference_ckpt_name": SD15_REF, "aligned_model": f"diffusion_models/{SD15_DPO}",
               "beta": DPO_BETA, "lora_strength": 1.0}, size=(470, None)),
        _node("neg", "CLIPTextEncode", (510, 0), {"text": "blurry, low quality, deformed"}, size=(400, 130),
              title="Negative prompt"),
        _node("latent", "EmptyLatentImage", (510, 170), {"width": 512, "height": 512, "batch_size": 2}, size=(400, None)),
        _node("reward", "DeRaDiffLoadRewardModel", (510, 330), {"kind": "pickscore", "model": PICKSCORE},
              size=(400, None), title="Reward to maximise"),
        _node("watch", "DeRaDiffLoadRewardModel", (510, 470),
              {"kind": "laion_aesthetic", "model": CLIP_L, "aesthetic_head": AESTHETIC}, size=(400, None),
              title="Reward to watch"),
        _node("search", "DeRaDiffLambdaSearch", (950, 0),
              {"prompts": "a red fox in the snow, detailed fur, golden hour light\na lighthouse on a cliff at dusk",
               **SAMPLER_WIDGETS, "lambda_min": 0.0, "lambda_max": 3.0, "budget": 10, "lambdas_per_round": 3,
               "beta": 0.0, "max_lambdas_per_pass": 0}, size=(400, None)),
        _node("plot", "SaveImage", (1390, 0), {"filename_prefix": "DeRaDiff/lambda_search_plot"}, size=(680, 460)),
        _node("best", "SaveImage", (1390, 500), {"filename_prefix": "DeRaDiff/lambda_search_best"}, size=(680, 420)),
    ]
    nodes[6]["widgets"].pop("denoise")
    links = [
        ("pair", "CLIP", "neg", "clip"), ("pair", "pair", "search", "pair"), ("pair", "CLIP", "search", "clip"),
        ("pair", "VAE", "search", "vae"), ("reward", "reward_model", "search", "reward_model"),
        ("neg", "CONDITIONING", "search", "negative"), ("latent", "LATENT", "search", "latent_image"),
        ("watch", "reward_model", "search", "watch_reward_model"),
        ("search", "plot", "plot", "images"), ("search", "best_images", "best", "images"),
    ]
    return nodes, links, models_metadata(SD15_REF, SD15_DPO)


# name (file base name) -> builder
def _flux_dev_srpo():
    note = (
        "Model files\n"
        f"• models/diffusion_models/{FLUX_DEV}\n"
        "   the reference: FLUX.1-dev, huggingface.co/black-forest-labs/FLUX.1-dev\n"
        f"• models/diffusion_models/{SRPO}\n"
        "   the aligned model: SRPO, huggingface.co/tencent/SRPO, file diffusion_pytorch_model.safetensors "
        "(a replacement for FLUX.1-dev's transformer), renamed\n"
        "• models/text_encoders/clip_l.safetensors and t5xxl_fp16.safetensors (Flux's text encoders)\n"
        "• models/vae/ae.safetensors (FLUX.1-dev's VAE)\n\n"
        f"{MODELS_HELP}\n\n"
        "Flux.1-dev is guidance-distilled: cfg 1, no negative prompt (the negative input is unused at cfg 1), "
        "and the guidance comes from FluxGuidance; it reaches both models.\n"
        "β = 0: SRPO has no KL term (it regularises with negative rewards), so β/λ is not defined.\n"
        f"{LAMBDA_HELP}")
    nodes = [
        _node("note", "Note", (0, 0), {"text": note}, size=(470, 470), title="DeRaDiff: Flux.1-dev + SRPO"),
        _node("ref", "UNETLoader", (0, 510), {"unet_name": FLUX_DEV, "weight_dtype": "default"}, size=(470, None),
              title="Reference: FLUX.1-dev"),
        _node("aligned", "UNETLoader", (0, 640), {"unet_name": SRPO, "weight_dtype": "default"}, size=(470, None),
              title="Aligned: SRPO"),
        _node("pair", "DeRaDiffMakePair", (0, 770), {"beta": 0.0}, size=(470, None)),
        _node("clip", "DualCLIPLoader", (510, 0), {"clip_name1": "clip_l.safetensors",
                                                    "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"},
              size=(400, None)),
        _node("pos", "CLIPTextEncode", (510, 160), {"text": "a red fox in the snow, detailed fur, golden hour light"},
              size=(400, 170), title="Prompt"),
        _node("guidance", "FluxGuidance", (510, 370), {"guidance": 3.5}, size=(400, None)),
        _node("neg", "ConditioningZeroOut", (510, 470), size=(400, None), title="No negative prompt (cfg 1)"),
        _node("latent", "EmptySD3LatentImage", (510, 560), {"width": 1024, "height": 1024, "batch_size": 1},
              size=(400, None)),
        _node("sampler", "DeRaDiffKSampler", (950, 0),
              {"lambda": 1.5, "seed": 42, "control_after_generate": "fixed", "steps": 20, "cfg": 1.0,
               "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}, size=(330, None)),
        _node("vae", "VAELoader", (1320, 0), {"vae_name": "ae.safetensors"}, size=(300, None)),
        _node("decode", "VAEDecode", (1320, 110), size=(220, None)),
        _node("save", "SaveImage", (1320, 200), {"filename_prefix": "DeRaDiff/flux1_dev_srpo"}, size=(420, 470)),
    ]
    links = [
        ("ref", "MODEL", "pair", "reference"), ("aligned", "MODEL", "pair", "aligned"),
        ("pair", "pair", "sampler", "pair"), ("clip", "CLIP", "pos", "clip"),
        ("pos", "CONDITIONING", "guidance", "conditioning"), ("guidance", "CONDITIONING", "sampler", "positive"),
        ("pos", "CONDITIONING", "neg", "conditioning"), ("neg", "CONDITIONING", "sampler", "negative"),
        ("latent", "LATENT", "sampler", "latent_image"), ("sampler", "LATENT", "decode", "samples"),
        ("vae", "VAE", "decode", "vae"), ("decode", "IMAGE", "save", "images"),
    ]
    return nodes, links, models_metadata(FLUX_DEV, SRPO)


def _sd35_flowgrpo():
    note = (
        "Model files\n"
        f"• models/diffusion_models/{SD35M}\n"
        "   the reference: Stable Diffusion 3.5 Medium, huggingface.co/stabilityai/stable-diffusion-3.5-medium\n"
        f"• models/diffusion_models/{SD35M_FLOWGRPO}\n"
        "   the aligned model: Flow-GRPO on SD3.5 Medium (PickScore), huggingface.co/jieliu/SD3.5M-FlowGRPO-PickScore; "
        "if it comes as a LoRA, load the reference through LoraLoaderModelOnly instead of this loader\n"
        "• models/text_encoders/clip_g.safetensors, clip_l.safetensors, t5xxl_fp16.safetensors\n"
        "• models/vae/sd3.5_vae.safetensors (the vae/ folder of the SD3.5 Medium repository)\n\n"
        f"{MODELS_HELP}\n\n"
        f"β = {FLOWGRPO_PICKSCORE_BETA:g}: the KL coefficient of Flow-GRPO's PickScore recipe "
        "(config.train.beta; 0.04 for GenEval and OCR).\n"
        f"{LAMBDA_HELP}")
    nodes = [
        _node("note", "Note", (0, 0), {"text": note}, size=(470, 470), title="DeRaDiff: SD3.5 Medium + Flow-GRPO"),
        _node("ref", "UNETLoader", (0, 510), {"unet_name": SD35M, "weight_dtype": "default"}, size=(470, None),
              title="Reference: SD3.5 Medium"),
        _node("aligned", "UNETLoader", (0, 640), {"unet_name": SD35M_FLOWGRPO, "weight_dtype": "default"},
              size=(470, None), title="Aligned: Flow-GRPO"),
        _node("pair", "DeRaDiffMakePair", (0, 770), {"beta": FLOWGRPO_PICKSCORE_BETA}, size=(470, None)),
        _node("clip", "TripleCLIPLoader", (510, 0), {"clip_name1": "clip_g.safetensors", "clip_name2": "clip_l.safetensors",
                                                      "clip_name3": "t5xxl_fp16.safetensors"}, size=(400, None)),
        _node("pos", "CLIPTextEncode", (510, 180), {"text": "a red fox in the snow, detailed fur, golden hour light"},
              size=(400, 170), title="Positive prompt"),
        _node("neg", "CLIPTextEncode", (510, 390), {"text": "blurry, low quality, deformed"}, size=(400, 130),
              title="Negative prompt"),
        _node("latent", "EmptySD3LatentImage", (510, 560), {"width": 1024, "height": 1024, "batch_size": 1},
              size=(400, None)),
        _node("sampler", "DeRaDiffKSampler", (950, 0),
              {"lambda": 1.5, "seed": 42, "control_after_generate": "fixed", "steps": 40, "cfg": 4.5,
               "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0}, size=(330, None)),
        _node("vae", "VAELoader", (1320, 0), {"vae_name": "sd3.5_vae.safetensors"}, size=(300, None)),
        _node("decode", "VAEDecode", (1320, 110), size=(220, None)),
        _node("save", "SaveImage", (1320, 200), {"filename_prefix": "DeRaDiff/sd35_flowgrpo"}, size=(420, 470)),
    ]
    links = [
        ("ref", "MODEL", "pair", "reference"), ("aligned", "MODEL", "pair", "aligned"),
        ("pair", "pair", "sampler", "pair"), ("clip", "CLIP", "pos", "clip"), ("clip", "CLIP", "neg", "clip"),
        ("pos", "CONDITIONING", "sampler", "positive"), ("neg", "CONDITIONING", "sampler", "negative"),
        ("latent", "LATENT", "sampler", "latent_image"), ("sampler", "LATENT", "decode", "samples"),
        ("vae", "VAE", "decode", "vae"), ("decode", "IMAGE", "save", "images"),
    ]
    return nodes, links, models_metadata(SD35M)


TINY_LAMBDAS = "0, 0.5, 1, 2, 4"
TINY_SIZE, TINY_BATCH, TINY_UPSCALE = 32, 4, 4


def _tiny_family():
    note = (
        "The DeRaDiff tiny family\n"
        "A tiny SD1.5-format model family trained in this repository (scripts/tiny_family.py), small enough to "
        "try DeRaDiff on a CPU in a minute: a 26 M-parameter UNet for 32×32 pictures of one coloured shape "
        "(circle, square, triangle or cross) on a black, grey or white background, prompted like "
        f"\"{TINY_PROMPT}\"; a TAESD VAE; a generated CLIP-L; and Diffusion-DPO LoRAs trained at "
        "β = 250 … 4000 for a colourfulness reward (100 × the mean over pixels of max(R,G,B) − min(R,G,B)).\n\n"
        "Model files\n"
        f"• models/checkpoints/{TINY_REF}\n"
        "   the reference (UNet + CLIP-L + TAESD)\n"
        f"• models/loras/{TINY_DPO}\n"
        f"   the aligned model: the Diffusion-DPO LoRA trained at β = {TINY_BETA:g}\n\n"
        "Nothing to download: the trained weights are in the repository (tiny_family/, not in the registry "
        "package). In a clone, run\n"
        "   python scripts/tiny_family.py materialize\n"
        "which writes the ComfyUI files into .cache/tiny_family/models (checkpoints/, loras/, diffusion_models/, "
        "reward_models/). Point ComfyUI at that folder in its extra_model_paths.yaml:\n"
        "   deradiff_tiny:\n"
        "      base_path: <your clone>/.cache/tiny_family/models\n"
        "      checkpoints: checkpoints\n"
        "      loras: loras\n"
        "      diffusion_models: diffusion_models\n"
        "      reward_models: reward_models\n"
        "or copy those folders' contents into ComfyUI's models/ folder; then press R in ComfyUI (or restart it).\n\n"
        f"Keep the latent at {TINY_SIZE}×{TINY_SIZE}, the size the model was trained at; the images are scaled "
        f"×{TINY_UPSCALE} (nearest) for the grid. One row per λ, the same {TINY_BATCH} seeds in every row.\n"
        f"β = {TINY_BETA:g}: the LoRA's Diffusion-DPO β.\n{LAMBDA_HELP}")
    nodes = [
        _node("note", "Note", (0, 0), {"text": note}, size=(470, 480), title="DeRaDiff: the tiny family (λ sweep)"),
        _node("pair", "DeRaDiffLoadAlignedPair", (0, 520),
              {"reference_ckpt_name": TINY_REF, "aligned_model": f"loras/{TINY_DPO}", "beta": TINY_BETA,
               "lora_strength": 1.0}, size=(470, None)),
        _node("pos", "CLIPTextEncode", (510, 0), {"text": TINY_PROMPT}, size=(400, 150), title="Positive prompt"),
        _node("neg", "CLIPTextEncode", (510, 190), {"text": ""}, size=(400, 110), title="Negative prompt"),
        _node("latent", "EmptyLatentImage", (510, 340),
              {"width": TINY_SIZE, "height": TINY_SIZE, "batch_size": TINY_BATCH}, size=(400, None)),
        _node("sweep", "DeRaDiffLambdaSweep", (950, 0),
              {"lambdas": TINY_LAMBDAS, "seed": 42, "control_after_generate": "fixed", "steps": 20, "cfg": 4.0,
               "sampler_name": "euler_ancestral", "scheduler": "normal", "denoise": 1.0}, size=(330, None)),
        _node("decode", "VAEDecode", (1320, 0), size=(260, None)),
        _node("scale", "ImageScaleBy", (1320, 90), {"upscale_method": "nearest-exact", "scale_by": float(TINY_UPSCALE)},
              size=(260, None), title=f"Upscale ×{TINY_UPSCALE} (nearest)"),
        _node("grid", "DeRaDiffSweepGrid", (1320, 230), {"columns": TINY_BATCH, "beta": 0.0}, size=(260, None)),
        _node("save", "SaveImage", (1620, 0), {"filename_prefix": "DeRaDiff/tiny_family_sweep"}, size=(500, 860)),
    ]
    links = [
        ("pair", "pair", "sweep", "pair"), ("pair", "CLIP", "pos", "clip"), ("pair", "CLIP", "neg", "clip"),
        ("pos", "CONDITIONING", "sweep", "positive"), ("neg", "CONDITIONING", "sweep", "negative"),
        ("latent", "LATENT", "sweep", "latent_image"),
        ("sweep", "latents", "decode", "samples"), ("pair", "VAE", "decode", "vae"),
        ("decode", "IMAGE", "scale", "image"), ("scale", "IMAGE", "grid", "images"),
        ("sweep", "labels", "grid", "labels"), ("grid", "grid", "save", "images"),
    ]
    return nodes, links, []  # no models metadata: the files have no download URL (LOCAL_MODEL_FILES)


WORKFLOWS = {
    "deradiff_sd15_dpo": _sd15_dpo,
    "deradiff_sdxl_dpo_unet": _sdxl_dpo,
    "deradiff_lambda_sweep_grid": _lambda_sweep,
    "deradiff_realign_model_ksampler": _realign_model,
    "deradiff_lambda_schedule": _lambda_schedule,
    "deradiff_lambda_search": _lambda_search,
    "deradiff_flux1_dev_srpo": _flux_dev_srpo,
    "deradiff_sd35_flowgrpo": _sd35_flowgrpo,
    "deradiff_tiny_family": _tiny_family,
}


# What each template thumbnail frames (node types), and whether it is taken after a run
# (the λ Schedule's plot only exists once the node has run).
THUMBNAILS = {
    "deradiff_sd15_dpo": (["DeRaDiffKSampler"], False),
    "deradiff_sdxl_dpo_unet": (["DeRaDiffLoadAlignedPair"], False),
    "deradiff_lambda_sweep_grid": (["DeRaDiffLambdaSweep", "DeRaDiffSweepGrid"], False),
    "deradiff_realign_model_ksampler": (["DeRaDiffRealignModel", "KSampler"], False),
    "deradiff_lambda_schedule": (["DeRaDiffLambdaSchedule"], True),
    "deradiff_lambda_search": (["DeRaDiffLambdaSearch", "SaveImage"], True),
    "deradiff_flux1_dev_srpo": (["DeRaDiffMakePair", "FluxGuidance", "DeRaDiffKSampler"], False),
    "deradiff_sd35_flowgrpo": (["DeRaDiffMakePair", "DeRaDiffKSampler"], False),
    "deradiff_tiny_family": (["DeRaDiffSweepGrid", "SaveImage"], True),  # the real images, once they exist
}


def workflow_spec(name):
    nodes, links, models = WORKFLOWS[name]()
    return {"nodes": nodes, "links": [list(link) for link in links], "models": models, "not_here": sorted(NOT_HERE)}


# -- front-end snippets --------------------------------------------------------------------

# Builds a graph from a spec with LiteGraph's own API and returns app.graph.serialize().
BUILD_JS = r"""
async (spec) => {
  const g = app.graph;
  g.clear();
  const byKey = {};
  for (const s of spec.nodes) {
    const n = LiteGraph.createNode(s.type);
    if (!n) throw new Error(`node type ${s.type} is not registered`);
    n.pos = s.pos;
    if (s.title) n.title = s.title;
    g.add(n);
    for (const [name, value] of Object.entries(s.widgets)) {
      const w = n.widgets?.find((w) => w.name === name);
      if (!w) throw new Error(`${s.type} has no widget ${name}`);
      if (w.type === "combo" && !w.options.values.includes(value) && !(spec.not_here ?? []).includes(value))
        throw new Error(`${s.type}.${name}: ${value} is not one of ${w.options.values}`);
      w.value = value;
      w.callback?.(value);
    }
    byKey[s.key] = n;
  }
  for (const [src, out, dst, inp] of spec.links) {
    const a = byKey[src], b = byKey[dst];
    const o = a.outputs.findIndex((x) => x.name === out);
    const i = b.inputs.findIndex((x) => x.name === inp);
    if (o < 0 || i < 0) throw new Error(`no slot for link ${src}.${out} -> ${dst}.${inp}`);
    if (!a.connect(o, b, i)) throw new Error(`could not connect ${src}.${out} -> ${dst}.${inp}`);
  }
  await new Promise((r) => setTimeout(r, 200));
  for (const s of spec.nodes) {
    const n = byKey[s.key], min = n.computeSize();
    const [w, h] = s.size ?? [null, null];
    n.setSize([Math.max(w ?? 0, min[0]), Math.max(h ?? 0, min[1])]);
  }
  const data = g.serialize();
  data.models = spec.models;
  return JSON.stringify(data);  // as the front end saves it: properties that are undefined are left out
}
"""

# Fits the whole graph into the canvas, as the "fit view" button does.
FIT_VIEW_JS = r"""
(zoom) => {
  const nodes = app.graph.nodes;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    const [x, y] = n.pos, [w, h] = n.size, t = LiteGraph.NODE_TITLE_HEIGHT;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y - t); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom});
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  const a = app.canvasPosToClientPos([x0, y0]), b = app.canvasPosToClientPos([x1, y1]);
  return [a[0], a[1], b[0], b[1]];
}
"""


# Frames the nodes of the given types in a square (fitted to the canvas) and returns that
# square in page coordinates.
FRAME_JS = r"""
([types, margin]) => {
  const nodes = app.graph.nodes.filter((n) => types.includes(n.type));
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    const [x, y] = n.pos, [w, h] = n.size, t = LiteGraph.NODE_TITLE_HEIGHT;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y - t); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  const side = Math.max(x1 - x0, y1 - y0) * margin, cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  app.canvas.ds.fitToBounds([cx - side / 2, cy - side / 2, side, side], {zoom: 0.95});
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  const a = app.canvasPosToClientPos([cx - side / 2, cy - side / 2]);
  const b = app.canvasPosToClientPos([cx + side / 2, cy + side / 2]);
  return [a[0], a[1], b[0], b[1]];
}
"""


# -- checking an API prompt against /object_info ------------------------------------------

def _is_link(value):
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _combo_values(spec):
    kind = spec[0]
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return (spec[1] if len(spec) > 1 else {}).get("options", [])
    return None


def _types_match(out_type, in_type):
    if out_type == "*" or in_type == "*":
        return True
    outs = set(str(out_type).split(","))
    ins = set(str(in_type).split(","))
    return bool(outs & ins)


def prompt_problems(prompt: dict, object_info: dict) -> list[str]:
    """Everything in an API prompt that /object_info says is wrong: unknown class types,
    unknown or missing inputs, links to missing nodes or outputs, output/input type mismatch,
    combo values not in the list, numbers out of range or of the wrong kind."""
    problems = []
    for node_id, node in prompt.items():
        cls = node.get("class_type")
        info = object_info.get(cls)
        where = f"node {node_id} ({cls})"
        if info is None:
            problems.append(f"{where}: class_type is not in /object_info")
            continue
        required = info["input"].get("required", {})
        optional = info["input"].get("optional", {})
        declared = {**required, **optional}
        inputs = node.get("inputs", {})
        for name in required:
            if name not in inputs:
                problems.append(f"{where}: required input '{name}' is missing")
        for name, value in inputs.items():
            spec = declared.get(name)
            if spec is None:
                problems.append(f"{where}: input '{name}' is not an input of {cls} "
                                f"(it has {sorted(declared)})")
                continue
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if _is_link(value):
                src = prompt.get(value[0])
                if src is None:
                    problems.append(f"{where}: input '{name}' links to node {value[0]}, which is not in the prompt")
                    continue
                src_info = object_info.get(src["class_type"])
                if src_info is None:
                    continue  # reported for that node
                outs = src_info["output"]
                if not 0 <= value[1] < len(outs):
                    problems.append(f"{where}: input '{name}' links to output {value[1]} of {src['class_type']}, "
                                    f"which has {len(outs)} outputs")
                    continue
                want = "COMBO" if isinstance(kind, list) else kind
                if not _types_match(outs[value[1]], want):
                    problems.append(f"{where}: input '{name}' ({want}) is linked to output {value[1]} of "
                                    f"{src['class_type']} ({outs[value[1]]})")
                continue
            values = _combo_values(spec)
            if values is not None:
                if value not in values:
                    problems.append(f"{where}: '{name}' = {value!r} is not one of its {len(values)} choices")
            elif kind in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    problems.append(f"{where}: '{name}' = {value!r} is not a number")
                    continue
                if kind == "INT" and value != int(value):
                    problems.append(f"{where}: '{name}' = {value!r} is not an integer")
                if "min" in opts and value < opts["min"]:
                    problems.append(f"{where}: '{name}' = {value!r} is below its minimum {opts['min']}")
                if "max" in opts and value > opts["max"]:
                    problems.append(f"{where}: '{name}' = {value!r} is above its maximum {opts['max']}")
            elif kind == "STRING":
                if not isinstance(value, str):
                    problems.append(f"{where}: '{name}' = {value!r} is not a string")
                elif opts.get("forceInput"):
                    problems.append(f"{where}: '{name}' must be linked (forceInput), got a value")
            elif kind == "BOOLEAN":
                if not isinstance(value, bool):
                    problems.append(f"{where}: '{name}' = {value!r} is not a boolean")
            else:
                problems.append(f"{where}: '{name}' of type {kind} must be linked, got the value {value!r}")
    return problems


# -- browser and server ---------------------------------------------------------------------

def browser_available() -> str | None:
    """None when the test can drive Chromium, else what is missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install playwright; no browser download needed)"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (python scripts/run_tests.py installs Debian's chromium; or set DERADIFF_CHROMIUM)"
    return None


def launch_browser(playwright):
    """Debian's Chromium, headless, with a fresh profile (returns a persistent context)."""
    profile = tempfile.mkdtemp(prefix="deradiff-chromium-")
    context = playwright.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT)
    # The "Nodes 2.0" banner would cover the top of the canvas in the screenshots.
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    return context, profile


# Settings of a returning user: no first-run templates dialog, no minimap over the canvas.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


@contextmanager
def comfy_with_pack(comfy_root, workdir: Path):
    """The real ComfyUI server with the pack, the public model names linked to the stand-ins."""
    from comfy_server import ComfyServer
    from standins import ensure_all_standins

    models = make_models_dir(workdir / "models", ensure_all_standins())
    with ComfyServer(comfy_root, models, workdir / "comfy") as server:
        server.post("/api/settings", UI_SETTINGS)
        yield server


def open_front_end(page, url):
    page.goto(url)
    page.wait_for_function("() => !!(window.app && window.app.graph && window.LiteGraph && "
                           "LiteGraph.registered_node_types['DeRaDiffKSampler'])", timeout=120_000)
    page.wait_for_timeout(1000)
    return page


def write_workflows(comfy_root=None, names=None):
    """Rebuilds example_workflows/*.json in the real front end (``names``: only these)."""
    from playwright.sync_api import sync_playwright
    import comfyui_runtime
    root = comfy_root or comfyui_runtime.comfyui_root()
    work = Path(tempfile.mkdtemp(prefix="deradiff-examples-"))
    try:
        with comfy_with_pack(root, work) as server, sync_playwright() as p:
            context, profile = launch_browser(p)
            try:
                page = open_front_end(context.new_page(), server.url)
                EXAMPLES.mkdir(exist_ok=True)
                for name in (names or WORKFLOWS):
                    data = json.loads(page.evaluate(BUILD_JS, workflow_spec(name)))
                    page.evaluate(FIT_VIEW_JS, 0.9)
                    ds = page.evaluate("({scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset]})")
                    data.setdefault("extra", {})["ds"] = ds
                    data["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/deradiff/comfyui-deradiff/{name}"))
                    (EXAMPLES / f"{name}.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
                    print("wrote", EXAMPLES / f"{name}.json")
            finally:
                context.close()
                shutil.rmtree(profile, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)




# -- the subgraph blueprint ----------------------------------------------------------------
# ComfyUI (0.3.75 and 0.33.0, app/subgraph_manager.py) serves every custom_nodes/<pack>/subgraphs/*.json at
# /global_subgraphs; the front end lists each under "Subgraph Blueprints" in its node library and search, named
# after the file. A blueprint is a workflow whose only node is an instance of a subgraph in definitions.subgraphs.
BLUEPRINT_DIR = REPO / "subgraphs"
BLUEPRINT_NAME = "DeRaDiff Lambda Sweep Grid"
BLUEPRINT_SOURCE = "deradiff_lambda_sweep_grid"  # the example workflow the group is taken from
BLUEPRINT_TYPES = ["DeRaDiffLambdaSweep", "VAEDecode", "DeRaDiffSweepGrid"]
BLUEPRINT_CATEGORY = "DeRaDiff"
BLUEPRINT_DESCRIPTION = (
    "DeRaDiff λ Sweep → VAE Decode → DeRaDiff Sweep Grid: several λ with one seed in one batched pass, decoded "
    "and laid out as one grid labelled with λ (and β/λ when β is set on the grid inside). Connect a DeRaDiff pair, "
    "the prompts, an empty latent and the VAE; the λ list and the sampler settings are on the λ Sweep inside.")

# Selects the nodes of the given types in the example graph on the canvas, converts them to a subgraph with the
# front end's own command (what "Convert to Subgraph" in the node menu does), keeps only that subgraph node and
# returns the graph as the front end serialises it.
BLUEPRINT_JS = r"""
async ([types, title]) => {
  const g = app.graph;
  const inner = g.nodes.filter((n) => types.includes(n.type));
  if (inner.length !== types.length) throw new Error(`expected ${types}, found ${inner.map((n) => n.type)}`);
  app.canvas.deselectAll();
  app.canvas.selectItems(inner);
  await app.extensionManager.command.execute("Comfy.Graph.ConvertToSubgraph");
  const node = g.nodes.find((n) => n.subgraph || n.isSubgraphNode?.());
  if (!node) throw new Error("the front end made no subgraph node");
  node.title = title;
  for (const other of g.nodes.filter((n) => n !== node)) g.remove(other);
  await new Promise((r) => setTimeout(r, 200));
  return JSON.stringify(g.serialize());
}
"""


def write_blueprint(comfy_root=None):
    """Builds subgraphs/<BLUEPRINT_NAME>.json in the real front end: the example graph, the group converted to a
    subgraph by the front end, serialised; then the subgraph's name, category and description are set."""
    from playwright.sync_api import sync_playwright
    import comfyui_runtime
    root = comfy_root or comfyui_runtime.comfyui_root()
    work = Path(tempfile.mkdtemp(prefix="deradiff-blueprint-"))
    try:
        with comfy_with_pack(root, work) as server, sync_playwright() as p:
            context, profile = launch_browser(p)
            try:
                page = open_front_end(context.new_page(), server.url)
                page.evaluate(BUILD_JS, workflow_spec(BLUEPRINT_SOURCE))
                data = json.loads(page.evaluate(BLUEPRINT_JS, [BLUEPRINT_TYPES, BLUEPRINT_NAME]))
            finally:
                context.close()
                shutil.rmtree(profile, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (definition,) = data["definitions"]["subgraphs"]
    assert len(data["nodes"]) == 1 and data["nodes"][0]["type"] == definition["id"], data["nodes"]
    definition.update(name=BLUEPRINT_NAME, category=BLUEPRINT_CATEGORY, description=BLUEPRINT_DESCRIPTION)
    data.pop("models", None)
    data["extra"] = {k: v for k, v in (data.get("extra") or {}).items() if k != "ds"}
    BLUEPRINT_DIR.mkdir(exist_ok=True)
    path = BLUEPRINT_DIR / f"{BLUEPRINT_NAME}.json"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print("wrote", path)
    return path


def write_icon(path: Path = DOCS / "icon.png", size=400):
    """The registry icon ([tool.comfy] Icon): a λ on a dial, square, 400x400."""
    from PIL import Image, ImageDraw, ImageFont
    scale = 4  # drawn large, scaled down: smooth edges
    s = size * scale
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    bg = Image.new("RGBA", (s, s))
    top, bottom = (32, 44, 92), (96, 40, 120)
    px = bg.load()
    for y in range(s):
        t = y / (s - 1)
        c = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)) + (255,)
        for x in range(s):
            px[x, y] = c
    mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(mask).rounded_rectangle([0, 0, s - 1, s - 1], radius=s // 7, fill=255)
    img.paste(bg, (0, 0), mask)
    overlay = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    m, w = s // 8, s // 22
    box = [m, m, s - m, s - m]
    draw.arc(box, start=135, end=405, fill=(255, 255, 255, 70), width=w)      # the dial
    draw.arc(box, start=135, end=300, fill=(255, 196, 84, 255), width=w)      # set past 1: λ > 1
    font = ImageFont.truetype("DejaVuSans-Bold.ttf", int(s * 0.5))
    draw.text((s / 2, s / 2 + s * 0.02), "λ", font=font, fill=(255, 255, 255, 255), anchor="mm")
    img = Image.alpha_composite(img, overlay)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.resize((size, size), Image.LANCZOS).save(path, optimize=True)
    return path


if __name__ == "__main__":
    if "--icon" in sys.argv:
        print("wrote", write_icon())
    elif "--blueprint" in sys.argv:  # with the front end of DERADIFF_COMFYUI (the blueprint is made on 0.33.0)
        write_blueprint()
    else:
        write_workflows(names=[a for a in sys.argv[1:] if not a.startswith("-")] or None)
