"""A tiny trained model family in SD1.5 checkpoint format, with Diffusion-DPO LoRAs at several β.

    python scripts/tiny_family.py build [--tiny] [--out DIR] [--cache DIR]   # train everything (resumable)
    python scripts/tiny_family.py materialize [--family DIR] [--models DIR]  # write ComfyUI model files
    python scripts/tiny_family.py info [--family DIR]                        # one JSON object
    python scripts/tiny_family.py score IMAGE...                             # one reward per line
    python scripts/tiny_family.py estimate [--tiny]                          # time steps, project the build

Everything is deterministic from ``Config.seed`` (on one machine and torch build; CPU reductions can
differ with the number of threads, which is fixed at 2).

**Data.** 32×32 RGB images rendered procedurally (``render``): one shape (circle, square, triangle,
cross) of one colour (red, orange, yellow, green, cyan, blue, purple, white), small or large, at one
of 9 places, on a black, grey or white background (never white on white), drawn at 4× and
box-filtered down. The prompt names all of it: "a large red circle at the top left on a black
background" (2 × 8 × 4 × 9 × 3 minus white-on-white = 1656 prompts, plus jitter of place, size and
hue), so a prompt decides what the image shows.

**VAE.** ComfyUI's TAESD architecture (``comfy.taesd.taesd.TAESD``, latent 4 channels, 8× down), trained
on the data (MSE plus a ×``vae_chroma_weight`` MSE on the chroma, each pixel minus its grey: plain
MSE learns luminance first and dropped 85 % of the colour in a 500-step build; the latent slightly
noised so that the decoder forgives a diffusion model's errors). The build stops at the VAE when its
reconstructions keep less than ``vae_min_colour`` of the data's colourfulness. Stored as ``taesd_encoder.*`` / ``taesd_decoder.*`` / ``vae_scale`` / ``vae_shift`` under
``first_stage_model.``, which ComfyUI loads as TAESD. ``vae_scale`` and ``vae_shift`` are set so that
the *model-space* latent (ComfyUI multiplies by SD1.5's 0.18215) has mean 0 and standard deviation 1
over the data. 32×32 images are 4×4×4 latents.

**Text encoder.** ComfyUI builds the full CLIP-L (123.7 M parameters) for SD1.5 whatever the file
holds, and leaves keys the file lacks uninitialised, so the checkpoint must hold every key; at fp16
that is 246 MB, too big for git. It is therefore *generated*, not trained, and not committed:
every attention output projection and MLP output projection (weights and biases) is zero, so each
of the 12 residual blocks is the identity and the conditioning is

    cond[i] = LayerNorm(token_embedding[id_i] + position_embedding[i])   (final_layer_norm: weight 1, bias 0)

i.e. a bag of token embeddings with a little position (token std 1, position std 0.2). The values come
from numpy's PCG64 raw 64-bit stream (``SeedSequence([seed, crc32(key)])``, whose output is fixed by
specification across numpy versions), turned into uniform floats with integer shifts and
multiplications only (no libm), then rounded to fp16; the UNet is trained on exactly those fp16
values. The other CLIP weights (q/k/v, fc1, text projection) get small values from the same stream;
they cannot change the output. Tokens come from ComfyUI's own SD1 tokenizer.

**UNet.** The smallest UNet ComfyUI detects as SD1.5: ``model_channels`` 320, one level, one res
block, transformer depth 1, context 768, ``use_linear_in_transformer`` False (25.8 M parameters, built
with ComfyUI's ``UNetModel`` class and plain torch layers). ε-prediction with SD1.5's schedule (betas
``scaled_linear`` 0.00085–0.012, 1000 steps), AdamW with warm-up, prompt dropped to "" 10 % of the
time (for classifier-free guidance), EMA weights kept; stored in fp16 and every later part uses the
fp16-rounded weights, so the committed reference is exactly the one the LoRAs were trained against.

**Reward.** Colourfulness: 100 × the mean over pixels of (max(R,G,B) − min(R,G,B)), i.e. how much of
the picture is saturated colour (0 for grey-scale; a large saturated shape scores about 30). A person
sees it: bigger and more saturated shapes, tinted backgrounds, white shapes turned colourful. It is
the ``torch_scorer`` kind of DeRaDiff Load Reward Model (sampler/rewards.py): a folder with a
``config.json`` naming the architecture and a ``model.safetensors`` with its parameters.

**Preference pairs.** ``pair_prompts`` prompts drawn from the data distribution, ``pair_samples``
images each from the reference (DDIM, ``sample_steps`` steps, cfg ``sample_cfg``), decoded with the
VAE and scored; the pair is (best, worst) of each prompt's images, stored as model-space latents.

**Diffusion-DPO.** The loss of Wallace et al. as in the authors' diffusers script: with the same t
and ε for both images of a pair,

    L = -log σ( -β/2 · [(‖ε-ε_θ(x_w,t)‖² - ‖ε-ε_ref(x_w,t)‖²) - (‖ε-ε_θ(x_l,t)‖² - ‖ε-ε_ref(x_l,t)‖²)] )

with ‖·‖² the *mean* over latent elements (so β here is their ``--beta_dpo``, e.g. 5000 for SD1.5; it
equals the paper's β·T for a per-element loss). Each β is trained as a rank-``lora_rank`` LoRA on
every Linear of the UNet's transformer blocks and res-block time embeddings (alpha = rank, so scale
1), with the same pairs, order, t, ε, steps and learning rate; only β differs. The reference's
losses are the same for every β, so they are computed once. LoRAs are saved with kohya
``lora_unet_<ldm key with _>`` names (``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``), which
ComfyUI's LoraLoader maps onto SD1.5 UNets. ``materialize`` also merges one β into a full UNet file
(``full_unet_beta``) for the two-model path.

**Evaluation.** For the reference and every β: ``eval_prompts`` × ``eval_seeds`` images (DDIM, the
same seeds), mean reward ± standard error, and colour adherence (the share of images whose most
saturated pixels have the prompted hue, white prompts excepted); written to ``family.json`` with a
grid image ``grid.png`` (rows: reference, then β from high to low).

**Files.** The family folder (committed; ``tiny_family/``, excluded from the registry package) holds
``family.json`` (config, seed, β list, timings, results, sha256 of each file),
``unet_reference.safetensors`` (fp16, 52 MB), ``vae_taesd.safetensors``, ``loras/dpo_beta<β>.safetensors``
and ``reward/`` (config.json + model.safetensors). ``materialize`` writes, into a ComfyUI models
folder (default: ``.cache/tiny_family/models``): ``checkpoints/deradiff_tiny/tiny_reference.safetensors``
(UNet + generated CLIP-L + TAESD, 300 MB, a few seconds), ``loras/deradiff_tiny/dpo_beta<β>.safetensors``,
``diffusion_models/deradiff_tiny/dpo_beta<β>_unet.safetensors`` and
``reward_models/deradiff_tiny_colourfulness/``.

**Resuming.** Each part (data, vae, latents, unet, pairs, dpo_<β>, eval) writes its result into
``--cache`` (default ``.cache/tiny_family_build/<config hash>/``, git-ignored) when done, and the long
ones (vae, unet, dpo) also a checkpoint every ``checkpoint_every`` steps; a killed build continues
from there. A part's random numbers are drawn from generators seeded by (seed, part, step), so a
resumed run gives the same result as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
FAMILY_DIR = REPO / "tiny_family"
CACHE_DIR = REPO / ".cache" / "tiny_family_build"
MODELS_DIR = REPO / ".cache" / "tiny_family" / "models"
SUBFOLDER = "deradiff_tiny"
CHECKPOINT_NAME = f"{SUBFOLDER}/tiny_reference.safetensors"
REWARD_NAME = "deradiff_tiny_colourfulness"
CODE_VERSION = 1  # bump when a part's results change for the same config

# -- configuration ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    seed: int = 20261205
    image_size: int = 32
    threads: int = 2
    # data
    n_data: int = 12288
    # VAE (TAESD)
    vae_steps: int = 1000  # 500 kept 63 % of the colour (the loss sits on a plateau until ~250)
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_latent_noise: float = 0.1
    vae_chroma_weight: float = 4.0  # extra weight on each pixel's deviation from its grey (the colour)
    vae_min_colour: float = 0.75  # reconstructions of held-out images must keep this share of their colourfulness
    # UNet pretraining
    unet_steps: int = 2200
    unet_batch: int = 32
    unet_lr: float = 3e-4
    unet_warmup: int = 100
    unet_ema: float = 0.998
    cond_drop: float = 0.1
    # sampling (pairs and evaluation)
    sample_steps: int = 20
    sample_cfg: float = 4.0
    sample_batch: int = 128
    # preference pairs
    pair_prompts: int = 384
    pair_samples: int = 4
    # Diffusion-DPO
    betas: tuple = (250.0, 500.0, 1000.0, 2000.0, 4000.0)
    dpo_steps: int = 200
    dpo_batch: int = 16
    dpo_lr: float = 1e-3
    lora_rank: int = 16
    full_unet_beta: float = 1000.0
    # evaluation
    eval_prompts: int = 16
    eval_seeds: int = 8
    grid_prompts: int = 6
    checkpoint_every: int = 100

    @classmethod
    def tiny(cls) -> "Config":
        """Every part runs, with the real model shapes, in seconds: for the tests."""
        return cls(n_data=64, vae_steps=2, vae_batch=4, vae_min_colour=0.0, unet_steps=2, unet_batch=4, unet_warmup=1,
                   sample_steps=2, sample_batch=8, pair_prompts=4, pair_samples=2,
                   betas=(500.0, 2000.0), dpo_steps=2, dpo_batch=2, lora_rank=2, full_unet_beta=500.0,
                   eval_prompts=2, eval_seeds=2, grid_prompts=2, checkpoint_every=1)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        d["betas"] = tuple(float(b) for b in d.get("betas", cls.betas))
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

    def part_key(self, part: str) -> str:
        """Hash of what a part depends on: the fields it and the parts before it read."""
        fields = PART_FIELDS[part]
        src = {k: getattr(self, k) for k in fields}
        src["version"] = CODE_VERSION
        src["part"] = part
        return hashlib.sha256(json.dumps(src, sort_keys=True, default=list).encode()).hexdigest()[:12]


_DATA_FIELDS = ("seed", "image_size", "n_data")
_VAE_FIELDS = _DATA_FIELDS + ("vae_steps", "vae_batch", "vae_lr", "vae_latent_noise", "vae_chroma_weight")
_UNET_FIELDS = _VAE_FIELDS + ("unet_steps", "unet_batch", "unet_lr", "unet_warmup", "unet_ema", "cond_drop")
_PAIR_FIELDS = _UNET_FIELDS + ("sample_steps", "sample_cfg", "pair_prompts", "pair_samples")
_DPO_FIELDS = _PAIR_FIELDS + ("dpo_steps", "dpo_batch", "dpo_lr", "lora_rank")
PART_FIELDS = {"data": _DATA_FIELDS, "vae": _VAE_FIELDS, "unet": _UNET_FIELDS, "pairs": _PAIR_FIELDS,
               "dpo": _DPO_FIELDS, "eval": _DPO_FIELDS + ("betas", "eval_prompts", "eval_seeds", "grid_prompts")}
PART_IDS = {"data": 1, "vae": 2, "unet": 3, "pairs": 4, "dpo": 5, "eval": 6, "clip": 7}


def rng(cfg: Config, part: str, *more: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, PART_IDS[part], *more])))


def torch_gen(cfg: Config, part: str, *more: int) -> torch.Generator:
    seed = int(rng(cfg, part, *more).bit_generator.random_raw() >> 1)
    return torch.Generator().manual_seed(seed)


# -- data ------------------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.90, 0.10, 0.10), "orange": (1.00, 0.50, 0.05), "yellow": (0.95, 0.85, 0.10),
           "green": (0.10, 0.72, 0.20), "cyan": (0.10, 0.80, 0.85), "blue": (0.15, 0.30, 0.95),
           "purple": (0.60, 0.20, 0.85), "white": (0.95, 0.95, 0.95)}
BACKGROUNDS = {"black": 0.05, "grey": 0.5, "white": 0.95}
SIZES = {"small": (0.11, 0.15), "large": (0.24, 0.31)}  # radius as a share of the image side
PLACES = {"top left": (0, 0), "top": (1, 0), "top right": (2, 0), "left": (0, 1), "middle": (1, 1),
          "right": (2, 1), "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2)}
PLACE_COORD = (0.28, 0.5, 0.72)


def prompt_text(size: str, colour: str, shape: str, place: str, bg: str) -> str:
    where = "in the middle" if place == "middle" else f"at the {place}"
    return f"a {size} {colour} {shape} {where} on a {bg} background"


def sample_attributes(g: np.random.Generator, n: int) -> list[dict]:
    out = []
    while len(out) < n:
        a = dict(size=list(SIZES)[g.integers(len(SIZES))], colour=list(COLOURS)[g.integers(len(COLOURS))],
                 shape=SHAPES[g.integers(len(SHAPES))], place=list(PLACES)[g.integers(len(PLACES))],
                 bg=list(BACKGROUNDS)[g.integers(len(BACKGROUNDS))], jitter=g.uniform(-1, 1, 5).tolist())
        if a["colour"] == "white" and a["bg"] == "white":
            continue
        a["prompt"] = prompt_text(a["size"], a["colour"], a["shape"], a["place"], a["bg"])
        out.append(a)
    return out


def render(attrs: list[dict], size: int = 32, supersample: int = 4) -> np.ndarray:
    """Images [n, 3, size, size] in 0..1 (float32)."""
    n, s = len(attrs), size * supersample
    c = (np.arange(s) + 0.5) / s
    yy, xx = np.meshgrid(c, c, indexing="ij")
    out = np.empty((n, 3, size, size), np.float32)
    for i, a in enumerate(attrs):
        j = a["jitter"]
        lo, hi = SIZES[a["size"]]
        r = lo + (hi - lo) * (j[0] + 1) / 2
        px, py = PLACES[a["place"]]
        cx, cy = PLACE_COORD[px] + 0.04 * j[1], PLACE_COORD[py] + 0.04 * j[2]
        dx, dy = xx - cx, yy - cy
        if a["shape"] == "circle":
            mask = dx * dx + dy * dy <= r * r
        elif a["shape"] == "square":
            h = r * 0.85
            mask = (np.abs(dx) <= h) & (np.abs(dy) <= h)
        elif a["shape"] == "triangle":  # pointing up, apex at cy - r, base at cy + 0.8 r
            top, base = -r, 0.8 * r
            frac = (dy - top) / (base - top)
            mask = (dy >= top) & (dy <= base) & (np.abs(dx) <= frac * r * 1.05)
        else:  # cross
            w = r * 0.36
            mask = ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
        colour = np.clip(np.array(COLOURS[a["colour"]]) + 0.04 * j[3], 0, 1)
        bg = np.clip(BACKGROUNDS[a["bg"]] + 0.04 * j[4], 0, 1)
        img = np.where(mask[None], colour[:, None, None], bg)
        out[i] = img.reshape(3, size, supersample, size, supersample).mean(axis=(2, 4))
    return out


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    """The family's reward on [N, 3, H, W] images in 0..1: 100 × mean(max − min over RGB)."""
    return 100.0 * (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2))


HUES = {k: v for k, v in COLOURS.items() if k != "white"}


def dominant_colour(image: np.ndarray) -> str:
    """The prompt colour nearest to the mean of the image's most saturated pixels ([3, H, W], 0..1)."""
    flat = image.reshape(3, -1)
    sat = flat.max(0) - flat.min(0)
    if sat.max() < 0.25:
        return "white"
    top = flat[:, sat >= 0.6 * sat.max()].mean(1)
    names = list(HUES)
    dist = [float(((top - np.array(HUES[k])) ** 2).sum()) for k in names]
    return names[int(np.argmin(dist))]


def colour_adherence(images: np.ndarray, colours: list[str]) -> float:
    """Share of images (colour prompts other than white) whose dominant colour is the prompted one."""
    hits = [dominant_colour(im) == c for im, c in zip(images, colours) if c != "white"]
    return float(np.mean(hits)) if hits else float("nan")


# -- ComfyUI pieces -------------------------------------------------------------------------------
def comfy_path():
    import importlib.util
    if importlib.util.find_spec("comfy") is None:
        import comfyui_runtime
        comfyui_runtime.add_to_path(cpu=True)


class TrainOps:
    """Plain torch layers for ComfyUI's UNetModel (comfy.ops' classes skip initialisation)."""
    Linear = torch.nn.Linear
    Conv2d = torch.nn.Conv2d
    Conv3d = torch.nn.Conv3d
    GroupNorm = torch.nn.GroupNorm
    LayerNorm = torch.nn.LayerNorm

    @staticmethod
    def conv_nd(dims, *args, **kwargs):
        assert dims == 2
        return torch.nn.Conv2d(*args, **kwargs)


def sd15_unet_config() -> dict:
    from standins import SD15_UNET
    return dict(SD15_UNET)


def new_unet(cfg: Config) -> torch.nn.Module:
    comfy_path()
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(cfg.seed)
    unet = UNetModel(**sd15_unet_config(), operations=TrainOps)
    for name, m in unet.named_modules():  # LDM's zero_module on the residual outputs
        if name == "out.2" or name.endswith("out_layers.3") or name.endswith("proj_out"):
            torch.nn.init.zeros_(m.weight)
            torch.nn.init.zeros_(m.bias)
    return unet


def new_taesd() -> torch.nn.Module:
    comfy_path()
    import comfy.taesd.taesd
    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(m)
    return vae


_TOKENIZER = None


def token_ids(prompts: list[str]) -> torch.Tensor:
    """ComfyUI's SD1 tokenizer: [n, 77] ids (start, tokens, end, padded with end)."""
    global _TOKENIZER
    comfy_path()
    if _TOKENIZER is None:
        import comfy.sd1_clip
        _TOKENIZER = comfy.sd1_clip.SD1Tokenizer(embedding_directory=None, tokenizer_data={})
    rows = []
    for p in prompts:
        chunks = _TOKENIZER.tokenize_with_weights(p)["l"]
        if len(chunks) != 1:
            raise ValueError(f"prompt longer than 75 tokens: {p!r}")
        rows.append([int(t[0]) for t in chunks[0]])
    return torch.tensor(rows, dtype=torch.int64)


# -- the generated text encoder ------------------------------------------------------------------
TOKEN_STD, POSITION_STD, OTHER_STD = 1.0, 0.2, 0.02
CLIP_PREFIX = "cond_stage_model.transformer.text_model."


def _uniform(seed: int, name: str, shape, std: float) -> np.ndarray:
    """Zero-mean uniform values of standard deviation ``std`` from PCG64's raw stream, as float16."""
    bits = np.random.PCG64(np.random.SeedSequence([seed, PART_IDS["clip"], zlib.crc32(name.encode())]))
    raw = bits.random_raw(int(np.prod(shape)))
    u = (raw >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # [0, 1), exact
    return ((u - 0.5) * (math.sqrt(12.0) * std)).astype(np.float16).reshape(shape)


def clip_shapes() -> dict:
    comfy_path()
    import comfy.sd1_clip
    with torch.device("meta"):
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    prefix = "transformer.text_model."
    out = {}
    for k, v in clip.state_dict().items():
        if k.startswith(prefix):
            out[CLIP_PREFIX + k[len(prefix):]] = tuple(v.shape)
        elif k == "transformer.text_projection.weight":
            out["cond_stage_model.transformer.text_projection.weight"] = tuple(v.shape)
    return out


def clip_tensor(seed: int, key: str, shape) -> torch.Tensor:
    short = key[len(CLIP_PREFIX):] if key.startswith(CLIP_PREFIX) else key
    if short.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if short == "embeddings.token_embedding.weight":
        return torch.from_numpy(_uniform(seed, short, shape, TOKEN_STD))
    if short == "embeddings.position_embedding.weight":
        return torch.from_numpy(_uniform(seed, short, shape, POSITION_STD))
    if ".out_proj." in short or ".mlp.fc2." in short or short.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if "layer_norm" in short:  # all LayerNorm weights (their biases are zero above)
        return torch.ones(shape, dtype=torch.float16)
    if short.endswith("text_projection.weight"):
        return torch.eye(shape[0], dtype=torch.float16)
    return torch.from_numpy(_uniform(seed, short, shape, OTHER_STD))


def clip_state_dict(seed: int) -> dict:
    return {k: clip_tensor(seed, k, s).contiguous() for k, s in sorted(clip_shapes().items())}


class TextConditioner:
    """cond = LayerNorm(token_embedding[ids] + position_embedding): what ComfyUI's CLIP-L computes
    with the generated weights (fp16 values, fp32 arithmetic)."""

    def __init__(self, seed: int):
        self.tok = torch.from_numpy(_uniform(seed, "embeddings.token_embedding.weight", (49408, 768), TOKEN_STD)).float()
        self.pos = torch.from_numpy(_uniform(seed, "embeddings.position_embedding.weight", (77, 768), POSITION_STD)).float()
        self.cache: dict[str, torch.Tensor] = {}  # prompt -> token ids

    def ids(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(self.tok[ids] + self.pos, (768,), eps=1e-5)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            self.cache.update(zip(missing, token_ids(missing)))
        return self.ids(torch.stack([self.cache[p] for p in prompts]))


# -- noise schedule and sampling --------------------------------------------------------------------
def chroma(images: torch.Tensor) -> torch.Tensor:
    """Each pixel minus its grey (the mean of its channels): the colour alone. [N, 3, H, W]."""
    return images - images.mean(dim=1, keepdim=True)


def colour_kept(vae, images: torch.Tensor) -> float:
    """Colourfulness of the VAE's reconstructions over that of the images."""
    with torch.no_grad():
        rec = vae.taesd_decoder(vae.taesd_encoder(images)).clamp(0, 1)
    return float(colourfulness(rec).mean() / colourfulness(images).mean().clamp_min(1e-6))


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


def noised(x0, eps, t, acp):
    a = acp[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


@torch.no_grad()
def ddim_sample(unet, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, steps: int, cfg: float,
                batch: int) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with classifier-free guidance; noise [n, 4, h, w] -> model latents."""
    acp = alphas_cumprod()
    ts = torch.linspace(999, 0, steps).round().long()
    outs = []
    for s in range(0, noise.shape[0], batch):
        x = noise[s:s + batch].clone()
        c = cond[s:s + batch]
        u = uncond.expand(x.shape[0], -1, -1)
        for i, t in enumerate(ts):
            tt = torch.full((x.shape[0] * 2,), float(t))
            e_u, e_c = unet(torch.cat([x, x]), tt, torch.cat([u, c])).chunk(2)
            eps = e_u + cfg * (e_c - e_u)
            a = acp[t]
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            a_next = acp[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        outs.append(x)
    return torch.cat(outs)


def decode(vae, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Model-space latents -> images [n, 3, H, W] in 0..1, as ComfyUI's VAEDecode does for TAESD."""
    with torch.no_grad():
        outs = [vae.decode(latents[i:i + batch] / 0.18215) for i in range(0, latents.shape[0], batch)]
    return (torch.cat(outs) * 0.5 + 0.5).clamp(0, 1)


def encode(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        outs = [vae.encode(images[i:i + batch] * 2 - 1) * 0.18215 for i in range(0, images.shape[0], batch)]
    return torch.cat(outs)


# -- build parts ------------------------------------------------------------------------------------
class Build:
    def __init__(self, cfg: Config, cache: Path | None = None, log=print):
        self.cfg = cfg
        self.cache = Path(cache) if cache else CACHE_DIR
        self.log = log
        self.timings: dict[str, float] = {}
        self._part = None
        self.cache.mkdir(parents=True, exist_ok=True)
        self.text = TextConditioner(cfg.seed)

    def path(self, part: str, name: str) -> Path:
        d = self.cache / f"{part}-{self.cfg.part_key(part if part in PART_FIELDS else 'dpo')}"
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    def _timed(self, name, fn):
        """Run a part; its time (summed over resumed runs: checkpoints record the time so far) is kept in
        the cache's timings.json, so a part finished by an earlier run keeps the time it took then."""
        store = self.cache / "timings.json"
        saved = json.loads(store.read_text()) if store.exists() else {}
        self._part, self._part_t0 = name, time.perf_counter()
        self._part_before = saved.get(name + " (partial)", 0.0)
        was_done = self.final_path(name).exists()
        out = fn()
        elapsed = time.perf_counter() - self._part_t0
        saved = json.loads(store.read_text()) if store.exists() else {}
        if not was_done or name not in saved:
            saved[name] = round(self._part_before + elapsed, 1)
        saved.pop(name + " (partial)", None)
        store.write_text(json.dumps(saved, indent=1))
        self.timings[name] = saved[name]
        self._part = None
        return out

    def final_path(self, name: str) -> Path:
        """The file whose presence means the part is done."""
        if name.startswith("dpo_beta"):
            return self.path("dpo", f"lora_beta{name[len('dpo_beta'):]}.pt")
        return {"data": lambda: self.path("data", "data.pt"), "vae": lambda: self.path("vae", "vae.pt"),
                "latents": lambda: self.path("vae", "latents.pt"), "unet": lambda: self.path("unet", "unet_ema_fp16.pt"),
                "pairs": lambda: self.path("pairs", "pairs.pt"), "ref_losses": lambda: self.path("dpo", "ref_losses.pt"),
                "eval": lambda: self.path("eval", "eval.json")}.get(name, lambda: self.cache / "never")()

    def _record_partial(self):
        if getattr(self, "_part", None):
            store = self.cache / "timings.json"
            saved = json.loads(store.read_text()) if store.exists() else {}
            saved[self._part + " (partial)"] = round(self._part_before + time.perf_counter() - self._part_t0, 1)
            store.write_text(json.dumps(saved, indent=1))

    # data: attributes, images, token ids -------------------------------------------------------
    def data(self):
        p = self.path("data", "data.pt")
        if not p.exists():
            attrs = sample_attributes(rng(self.cfg, "data"), self.cfg.n_data)
            images = torch.from_numpy(render(attrs, self.cfg.image_size))
            torch.save({"images": images, "prompts": [a["prompt"] for a in attrs]}, p)
        return torch.load(p)

    def held_out(self, n: int = 256) -> torch.Tensor:
        """Images the VAE never trains on (a stream of their own), to check what it keeps."""
        return torch.from_numpy(render(sample_attributes(rng(self.cfg, "data", 1), n), self.cfg.image_size))

    # VAE ------------------------------------------------------------------------------------------
    def vae(self):
        final = self.path("vae", "vae.pt")
        if final.exists():
            return self._load_vae(final)
        cfg = self.cfg
        data = self.data()["images"]
        torch.manual_seed(cfg.seed)
        vae = new_taesd()
        params = list(vae.taesd_encoder.parameters()) + list(vae.taesd_decoder.parameters())
        opt = torch.optim.Adam(params, lr=cfg.vae_lr)
        start = self._resume("vae", {"vae": vae, "opt": opt})
        held_out = self.held_out()
        t0 = time.perf_counter()
        for step in range(start, cfg.vae_steps):
            g = torch_gen(cfg, "vae", step)
            idx = torch.randint(0, data.shape[0], (cfg.vae_batch,), generator=g)
            x = data[idx]
            z = vae.taesd_encoder(x)
            z = z + cfg.vae_latent_noise * torch.randn(z.shape, generator=g)
            y = vae.taesd_decoder(z)
            # plain MSE learns luminance first and drops the colour (a 500-step build kept 15 % of the
            # data's colourfulness), so the chroma, each pixel minus its grey, is weighted up
            loss = ((y - x).pow(2).mean() + cfg.vae_chroma_weight * (chroma(y) - chroma(x)).pow(2).mean()
                    + 1e-4 * z.pow(2).mean())
            for gr in opt.param_groups:
                gr["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self._progress("vae", step, cfg.vae_steps, loss.item(), t0, start)
            if (step + 1) % 100 == 0:
                self.log(f"vae: step {step + 1} keeps {colour_kept(vae, held_out):.0%} of the colour")
            self._checkpoint("vae", step, cfg.vae_steps, {"vae": vae, "opt": opt})
        # model-space latents (×0.18215 in ComfyUI) with mean 0 and std 1 over the data
        with torch.no_grad():
            raw = torch.cat([vae.taesd_encoder(data[i:i + 256]) for i in range(0, min(4096, data.shape[0]), 256)])
        mu, sd = raw.mean().item(), raw.std().item()
        with torch.no_grad():
            vae.vae_scale.fill_(0.18215 * sd)
            vae.vae_shift.fill_(-mu / (0.18215 * sd))
        kept = colour_kept(vae, held_out)
        self.log(f"vae: reconstructions keep {kept:.0%} of the data's colourfulness")
        if kept < cfg.vae_min_colour:
            raise RuntimeError(f"the VAE keeps only {kept:.0%} of the data's colourfulness (vae_min_colour "
                               f"{cfg.vae_min_colour:.0%}): train it longer (vae_steps) or weight the chroma more "
                               "(vae_chroma_weight); nothing after it was built")
        sd16 = {k: v.detach().half() for k, v in vae.state_dict().items()}
        torch.save(sd16, final)
        return self._load_vae(final)

    def _load_vae(self, path):
        if getattr(self, "_vae", None) is not None:
            return self._vae
        vae = new_taesd()
        vae.load_state_dict({k: v.float() for k, v in torch.load(path).items()})
        self._vae = vae.eval().requires_grad_(False)
        return self._vae

    def latents(self):
        p = self.path("vae", "latents.pt")
        if not p.exists():
            data = self.data()
            lat = encode(self.vae(), data["images"])
            torch.save(lat, p)
        return torch.load(p)

    # UNet -------------------------------------------------------------------------------------------
    def unet(self):
        final = self.path("unet", "unet_ema_fp16.pt")
        if final.exists():
            return self._load_unet(final)
        cfg = self.cfg
        lat = self.latents()
        prompts = self.data()["prompts"]
        unet = new_unet(cfg)
        ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
        start = self._resume("unet", {"unet": unet, "opt": opt}, ema)
        acp = alphas_cumprod()
        uncond = self.text([""])
        t0 = time.perf_counter()
        unet.train()
        for step in range(start, cfg.unet_steps):
            g = torch_gen(cfg, "unet", step)
            idx = torch.randint(0, lat.shape[0], (cfg.unet_batch,), generator=g)
            x0 = lat[idx]
            drop = torch.rand(cfg.unet_batch, generator=g) < cfg.cond_drop
            cond = self.text([prompts[i] for i in idx.tolist()])
            cond = torch.where(drop.view(-1, 1, 1), uncond, cond)
            t = torch.randint(0, 1000, (cfg.unet_batch,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            pred = unet(noised(x0, eps, t, acp), t.float(), cond)
            loss = (pred - eps).pow(2).mean()
            lr = cfg.unet_lr * min(1.0, (step + 1) / cfg.unet_warmup)
            lr *= 0.5 * (1 + math.cos(math.pi * step / cfg.unet_steps)) * 0.9 + 0.1
            for gr in opt.param_groups:
                gr["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            decay = min(cfg.unet_ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in unet.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(decay).add_(v, alpha=1 - decay)
            self._progress("unet", step, cfg.unet_steps, loss.item(), t0, start)
            self._checkpoint("unet", step, cfg.unet_steps, {"unet": unet, "opt": opt}, ema)
        torch.save({k: v.half() for k, v in ema.items()}, final)
        return self._load_unet(final)

    def _load_unet(self, path):
        if getattr(self, "_unet", None) is not None:
            return self._unet
        unet = new_unet(self.cfg)
        unet.load_state_dict({k: v.float() for k, v in torch.load(path).items()})
        self._unet = unet.eval().requires_grad_(False)
        return self._unet

    # checkpoints -------------------------------------------------------------------------------------
    def _ckpt_path(self, part):
        return self.path(part, "checkpoint.pt") if part in PART_FIELDS else self.path("dpo", f"checkpoint-{part}.pt")

    def _checkpoint(self, part, step, total, modules, extra=None):
        every = self.cfg.checkpoint_every
        if (step + 1) % every == 0 and step + 1 < total:
            state = {k: m.state_dict() for k, m in modules.items()}
            state["step"] = step + 1
            state["extra"] = extra
            tmp = self._ckpt_path(part).with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(self._ckpt_path(part))
            self._record_partial()

    def _resume(self, part, modules, extra=None) -> int:
        p = self._ckpt_path(part)
        if not p.exists():
            return 0
        state = torch.load(p)
        for k, m in modules.items():
            m.load_state_dict(state[k])
        if extra is not None:
            for k, v in state["extra"].items():
                extra[k].copy_(v)
        self.log(f"{part}: resumed at step {state['step']}")
        return state["step"]

    def _progress(self, part, step, total, loss, t0, start):
        done = step + 1 - start
        if done in (1, 5) or (step + 1) % 50 == 0 or step + 1 == total:
            per = (time.perf_counter() - t0) / done
            self.log(f"{part}: step {step + 1}/{total} loss {loss:.4f} ({per:.2f} s/step)")

    # preference pairs ----------------------------------------------------------------------------------
    def pairs(self):
        final = self.path("pairs", "pairs.pt")
        if final.exists():
            return torch.load(final)
        cfg = self.cfg
        unet, vae = self.unet(), self.vae()
        attrs = sample_attributes(rng(cfg, "pairs"), cfg.pair_prompts)
        prompts = [a["prompt"] for a in attrs]
        k = cfg.pair_samples
        rep = [p for p in prompts for _ in range(k)]
        noise = torch.randn((len(rep), 4, cfg.image_size // 8, cfg.image_size // 8), generator=torch_gen(cfg, "pairs"))
        lat = ddim_sample(unet, self.text(rep), self.text([""]), noise, cfg.sample_steps, cfg.sample_cfg, cfg.sample_batch)
        r = colourfulness(decode(vae, lat)).view(-1, k)
        best, worst = r.argmax(1), r.argmin(1)
        lat = lat.view(-1, k, *lat.shape[1:])
        ar = torch.arange(len(prompts))
        out = {"prompts": prompts, "win": lat[ar, best].clone(), "lose": lat[ar, worst].clone(),
               "r_win": r[ar, best].clone(), "r_lose": r[ar, worst].clone(), "r_all": r}
        torch.save(out, final)
        self.log(f"pairs: {len(prompts)} prompts × {k}: reward {r.mean():.2f}; winners {out['r_win'].mean():.2f}, "
                 f"losers {out['r_lose'].mean():.2f}")
        return out

    # Diffusion-DPO --------------------------------------------------------------------------------------
    def dpo_schedule(self, step):
        """The batch, t and ε of one DPO step: the same for every β."""
        cfg = self.cfg
        g = torch_gen(cfg, "dpo", step)
        idx = torch.randint(0, cfg.pair_prompts, (cfg.dpo_batch,), generator=g)
        t = torch.randint(0, 1000, (cfg.dpo_batch,), generator=g)
        eps = torch.randn((cfg.dpo_batch, 4, cfg.image_size // 8, cfg.image_size // 8), generator=g)
        return idx, t, eps

    def ref_losses(self):
        """Per step, the reference's ‖ε − ε_ref(x, t)‖² (mean over elements) for winners and losers."""
        final = self.path("dpo", "ref_losses.pt")
        if final.exists():
            return torch.load(final)
        cfg, pairs, unet, acp = self.cfg, self.pairs(), self.unet(), alphas_cumprod()
        out = torch.empty(cfg.dpo_steps, 2, cfg.dpo_batch)
        for step in range(cfg.dpo_steps):
            idx, t, eps = self.dpo_schedule(step)
            x = torch.cat([pairs["win"][idx], pairs["lose"][idx]])
            cond = self.text([pairs["prompts"][i] for i in idx.tolist()] * 2)
            with torch.no_grad():
                pred = unet(noised(x, torch.cat([eps, eps]), torch.cat([t, t]), acp), torch.cat([t, t]).float(), cond)
            out[step] = (pred - torch.cat([eps, eps])).pow(2).mean(dim=(1, 2, 3)).view(2, -1)
        torch.save(out, final)
        return out

    def dpo(self, beta: float):
        name = f"lora_beta{beta:g}.pt"
        final = self.path("dpo", name)
        if final.exists():
            return torch.load(final)
        cfg, pairs, acp = self.cfg, self.pairs(), alphas_cumprod()
        ref = self.ref_losses()
        unet = self.unet()
        lora = LoRA(unet, cfg.lora_rank, torch_gen(cfg, "dpo", 10**6))
        opt = torch.optim.AdamW(lora.parameters(), lr=cfg.dpo_lr, weight_decay=0.0)
        tag = f"dpo_beta{beta:g}"
        start = self._resume(tag, {"lora": lora, "opt": opt})
        t0 = time.perf_counter()
        stats = []
        with lora.active():
            for step in range(start, cfg.dpo_steps):
                idx, t, eps = self.dpo_schedule(step)
                x = torch.cat([pairs["win"][idx], pairs["lose"][idx]])
                cond = self.text([pairs["prompts"][i] for i in idx.tolist()] * 2)
                e2, t2 = torch.cat([eps, eps]), torch.cat([t, t])
                pred = unet(noised(x, e2, t2, acp), t2.float(), cond)
                model_w, model_l = (pred - e2).pow(2).mean(dim=(1, 2, 3)).chunk(2)
                ref_w, ref_l = ref[step]
                inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
                loss = -torch.nn.functional.logsigmoid(inside).mean()
                for gr in opt.param_groups:
                    gr["lr"] = cfg.dpo_lr * min(1.0, (step + 1) / 10)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                stats.append(float((inside > 0).float().mean()))
                self._progress(tag, step, cfg.dpo_steps, loss.item(), t0, start)
                self._checkpoint(tag, step, cfg.dpo_steps, {"lora": lora, "opt": opt})
        sd = lora.kohya_state_dict()
        torch.save(sd, final)
        return sd

    # evaluation ----------------------------------------------------------------------------------------
    def eval_set(self):
        cfg = self.cfg
        attrs = sample_attributes(rng(self.cfg, "eval"), cfg.eval_prompts)
        prompts = [a["prompt"] for a in attrs for _ in range(cfg.eval_seeds)]
        colours = [a["colour"] for a in attrs for _ in range(cfg.eval_seeds)]
        g = torch_gen(cfg, "eval")
        seeds = torch.randn((cfg.eval_seeds, 4, cfg.image_size // 8, cfg.image_size // 8), generator=g)
        noise = seeds.repeat(cfg.eval_prompts, 1, 1, 1)
        return attrs, prompts, colours, noise

    def evaluate(self, loras: dict):
        final = self.path("eval", "eval.json")
        if final.exists():
            return json.loads(final.read_text())
        cfg, unet, vae = self.cfg, self.unet(), self.vae()
        attrs, prompts, colours, noise = self.eval_set()
        cond, uncond = self.text(prompts), self.text([""])
        rows, grid = [], []
        for beta in [None] + sorted(loras, reverse=True):
            if beta is None:
                lat = ddim_sample(unet, cond, uncond, noise, cfg.sample_steps, cfg.sample_cfg, cfg.sample_batch)
            else:
                with merged(unet, loras[beta]):
                    lat = ddim_sample(unet, cond, uncond, noise, cfg.sample_steps, cfg.sample_cfg, cfg.sample_batch)
            img = decode(vae, lat)
            r = colourfulness(img)
            rows.append({"beta": beta, "reward_mean": float(r.mean()),
                         "reward_se": float(r.std() / math.sqrt(len(r))) if len(r) > 1 else 0.0,
                         "colour_adherence": colour_adherence(img.numpy(), colours)})
            self.log(f"eval β={beta}: reward {rows[-1]['reward_mean']:.2f} ± {rows[-1]['reward_se']:.2f}, "
                     f"colour adherence {rows[-1]['colour_adherence']:.2f}")
            grid.append(img[:: cfg.eval_seeds][: cfg.grid_prompts])
        out = {"rows": rows, "prompts": [a["prompt"] for a in attrs][: cfg.grid_prompts]}
        save_grid(torch.stack(grid), self.path("eval", "grid.png"))
        final.write_text(json.dumps(out, indent=1))
        return out

    # everything ------------------------------------------------------------------------------------------
    def run(self, out: Path) -> dict:
        torch.set_num_threads(self.cfg.threads)
        steps = [("data", self.data), ("vae", self.vae), ("latents", self.latents), ("unet", self.unet),
                 ("pairs", self.pairs), ("ref_losses", self.ref_losses)]
        for name, fn in steps:
            self._timed(name, fn)
        loras = {}
        for beta in self.cfg.betas:
            loras[beta] = self._timed(f"dpo_beta{beta:g}", lambda b=beta: self.dpo(b))
        results = self._timed("eval", lambda: self.evaluate(loras))
        return self._timed("write", lambda: write_family(self, loras, results, out))


class LoRA(torch.nn.Module):
    """Rank-r adapters on the UNet's transformer-block and time-embedding Linears (up = 0 at the start)."""

    def __init__(self, unet: torch.nn.Module, rank: int, gen: torch.Generator):
        super().__init__()
        self.targets = {}
        self.down = torch.nn.ParameterDict()
        self.up = torch.nn.ParameterDict()
        for name, m in unet.named_modules():
            if isinstance(m, torch.nn.Linear) and (".transformer_blocks." in name or name.endswith("emb_layers.1")):
                key = name.replace(".", "_")
                self.targets[key] = (name, m)
                self.down[key] = torch.nn.Parameter(torch.randn(rank, m.in_features, generator=gen) / math.sqrt(m.in_features))
                self.up[key] = torch.nn.Parameter(torch.zeros(m.out_features, rank))
        self.rank = rank

    def active(self):
        lora = self

        class _Ctx:
            def __enter__(self_):
                self_.hooks = []
                for key, (name, m) in lora.targets.items():
                    def hook(mod, args, out, key=key):
                        return out + torch.nn.functional.linear(torch.nn.functional.linear(args[0], lora.down[key]), lora.up[key])
                    self_.hooks.append(m.register_forward_hook(hook))

            def __exit__(self_, *exc):
                for h in self_.hooks:
                    h.remove()
        return _Ctx()

    def kohya_state_dict(self) -> dict:
        sd = {}
        for key, (name, m) in self.targets.items():
            base = "lora_unet_" + key
            sd[base + ".lora_down.weight"] = self.down[key].detach().half().contiguous()
            sd[base + ".lora_up.weight"] = self.up[key].detach().half().contiguous()
            sd[base + ".alpha"] = torch.tensor(float(self.rank))
        return sd


def lora_deltas(unet_keys, lora_sd: dict) -> dict:
    """{ldm key: ΔW} of a kohya LoRA (fp16 factors, fp32 product, scale alpha / rank)."""
    by_name = {k[: -len(".weight")].replace(".", "_"): k for k in unet_keys if k.endswith(".weight")}
    out = {}
    for k in lora_sd:
        if k.endswith(".lora_down.weight"):
            base = k[: -len(".lora_down.weight")]
            down, up = lora_sd[k].float(), lora_sd[base + ".lora_up.weight"].float()
            alpha = float(lora_sd.get(base + ".alpha", torch.tensor(float(down.shape[0]))))
            out[by_name[base[len("lora_unet_"):]]] = (up @ down) * (alpha / down.shape[0])
    return out


class merged:
    """Temporarily add a LoRA's ΔW into the UNet's weights."""

    def __init__(self, unet, lora_sd):
        self.unet, self.deltas = unet, lora_deltas(unet.state_dict().keys(), lora_sd)

    def __enter__(self):
        sd = self.unet.state_dict()
        self.saved = {k: sd[k].clone() for k in self.deltas}
        with torch.no_grad():
            for k, d in self.deltas.items():
                sd[k].add_(d)

    def __exit__(self, *exc):
        sd = self.unet.state_dict()
        with torch.no_grad():
            for k, v in self.saved.items():
                sd[k].copy_(v)


def save_grid(images: torch.Tensor, path: Path, scale: int = 4):
    """[rows, cols, 3, H, W] -> a PNG with 2-pixel gaps, each image scaled up ``scale`` times."""
    from PIL import Image
    rows, cols, _, h, w = images.shape
    gap = 2
    canvas = np.full((rows * (h * scale + gap) + gap, cols * (w * scale + gap) + gap, 3), 255, np.uint8)
    for i in range(rows):
        for j in range(cols):
            im = (images[i, j].permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
            im = im.repeat(scale, 0).repeat(scale, 1)
            y, x = gap + i * (h * scale + gap), gap + j * (w * scale + gap)
            canvas[y:y + h * scale, x:x + w * scale] = im
    Image.fromarray(canvas).save(path)


# -- the family folder ----------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lora_file(beta: float) -> str:
    return f"loras/dpo_beta{beta:g}.safetensors"


def save_safetensors(sd: dict, path: Path, metadata: dict | None = None):
    """safetensors.torch.save_file with the same bytes every time: safetensors writes the metadata in
    hash-map order, which changes from call to call, so the header is rewritten with sorted keys
    (same length: only the order of the entries changes)."""
    from safetensors.torch import save
    raw = save(sd, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n, "a canonical safetensors header longer than the original"
    Path(path).write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:])


def write_family(build: Build, loras: dict, results: dict, out: Path) -> dict:
    save_file = save_safetensors
    out = Path(out)
    (out / "loras").mkdir(parents=True, exist_ok=True)
    (out / "reward").mkdir(parents=True, exist_ok=True)
    cfg = build.cfg
    unet_sd = {k: v.half().contiguous() for k, v in build.unet().state_dict().items()}
    save_file(unet_sd, str(out / "unet_reference.safetensors"))
    save_file({k: v.half().contiguous() for k, v in build.vae().state_dict().items()}, str(out / "vae_taesd.safetensors"))
    for beta, sd in loras.items():
        save_file(sd, out / lora_file(beta), metadata={"beta_dpo": f"{beta:g}", "format": "kohya lora_unet"})
    write_reward_folder(out / "reward")
    import shutil
    if build.path("eval", "grid.png").exists():
        shutil.copy(build.path("eval", "grid.png"), out / "grid.png")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "family.json")
    manifest = {
        "format": "deradiff tiny family v1",
        "config": cfg.as_dict(),
        "checkpoint": CHECKPOINT_NAME,
        "unet": "unet_reference.safetensors",
        "vae": "vae_taesd.safetensors",
        "text_encoder": {"generated": True, "seed": cfg.seed, "token_std": TOKEN_STD, "position_std": POSITION_STD},
        "loras": [{"file": lora_file(b), "beta": b} for b in sorted(loras)],
        "full_unet": {"beta": cfg.full_unet_beta, "file": full_unet_name(cfg.full_unet_beta)},
        "reward": {"folder": "reward", "kind": "torch_scorer", "name": "colourfulness",
                   "meaning": "100 × mean over pixels of (max(R,G,B) − min(R,G,B))"},
        "results": results,
        "timings_s": {k: round(v, 1) for k, v in build.timings.items()},
        "sha256": {f: sha256(out / f) for f in files},
    }
    (out / "family.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def write_reward_folder(folder: Path):
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "deradiff_torch_scorer", "architecture": "colourfulness", "uses_prompt": False,
        "description": "100 x mean over pixels of (max(R,G,B) - min(R,G,B)): how much of the image is saturated colour"},
        indent=1) + "\n")
    save_file({"scale": torch.tensor([100.0])}, str(folder / "model.safetensors"))


def full_unet_name(beta: float) -> str:
    return f"{SUBFOLDER}/dpo_beta{beta:g}_unet.safetensors"


def load_manifest(family: Path = FAMILY_DIR) -> dict:
    path = Path(family) / "family.json"
    if not path.exists():
        raise SystemExit(f"no tiny family in {Path(family)} (no family.json): build it with "
                         "`python scripts/tiny_family.py build` (about 40 minutes on 2 CPU cores)")
    return json.loads(path.read_text())


def materialize(family: Path = FAMILY_DIR, models: Path = MODELS_DIR, force: bool = False) -> dict:
    """Write the ComfyUI model files of a family folder (checkpoint with the generated CLIP-L, LoRAs,
    the merged full UNet, the reward folder) into ``models``; skips files already written for this family."""
    import shutil
    from safetensors.torch import load_file, save_file
    family, models = Path(family), Path(models)
    m = load_manifest(family)
    stamp = models / f"{SUBFOLDER}.json"
    tag = hashlib.sha256(json.dumps(m["sha256"], sort_keys=True).encode()).hexdigest()
    paths = {"checkpoint": models / "checkpoints" / m["checkpoint"],
             "full_unet": models / "diffusion_models" / m["full_unet"]["file"],
             "loras": [models / "loras" / SUBFOLDER / Path(x["file"]).name for x in m["loras"]],
             "reward": models / "reward_models" / REWARD_NAME}
    if not force and stamp.exists() and json.loads(stamp.read_text()).get("tag") == tag and paths["checkpoint"].exists():
        return paths
    unet = load_file(str(family / m["unet"]))
    vae = load_file(str(family / m["vae"]))
    sd = {"model.diffusion_model." + k: v for k, v in unet.items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.items()})
    sd.update(clip_state_dict(int(m["text_encoder"]["seed"])))
    paths["checkpoint"].parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(paths["checkpoint"]) + ".partial")
    os.replace(str(paths["checkpoint"]) + ".partial", paths["checkpoint"])
    for x, dst in zip(m["loras"], paths["loras"]):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(family / x["file"], dst)
    beta = m["full_unet"]["beta"]
    lora = load_file(str(family / lora_file(beta)))
    deltas = lora_deltas(unet.keys(), lora)
    full = {k: (v.float() + deltas[k]).half() if k in deltas else v for k, v in unet.items()}
    paths["full_unet"].parent.mkdir(parents=True, exist_ok=True)
    save_file(full, str(paths["full_unet"]), metadata={"beta_dpo": f"{beta:g}"})
    if paths["reward"].exists():
        shutil.rmtree(paths["reward"])
    shutil.copytree(family / m["reward"]["folder"], paths["reward"])
    stamp.write_text(json.dumps({"tag": tag}))
    return paths


def info(family: Path = FAMILY_DIR, models: Path = MODELS_DIR) -> dict:
    m = load_manifest(family)
    return {
        "family": str(Path(family)),
        "reference_checkpoint": {"name": m["checkpoint"], "path": str(Path(models) / "checkpoints" / m["checkpoint"]),
                                 "materialized": (Path(models) / "checkpoints" / m["checkpoint"]).exists()},
        "loras": [{"name": f"{SUBFOLDER}/{Path(x['file']).name}", "file": x["file"], "beta": x["beta"]} for x in m["loras"]],
        "full_unet": {"name": m["full_unet"]["file"], "beta": m["full_unet"]["beta"]},
        "reward": {"folder": m["reward"]["folder"], "name": REWARD_NAME, "kind": m["reward"]["kind"],
                   "meaning": m["reward"]["meaning"]},
        "seed": m["config"]["seed"],
        "image_size": m["config"]["image_size"],
    }


def score_files(paths: list[str]) -> list[float]:
    from PIL import Image
    out = []
    for p in paths:
        im = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0
        out.append(float(colourfulness(torch.from_numpy(im).permute(2, 0, 1)[None])[0]))
    return out


def estimate(cfg: Config, repeats: int = 3, log=print) -> dict:
    """Time a few steps of each part at the configuration's batch sizes (random inputs, no training
    that is kept) and project every part's time: {part: seconds}. Under CPU contention the figures are
    upper bounds."""
    torch.set_num_threads(cfg.threads)
    h = cfg.image_size // 8

    def timed(fn):
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats

    vae = new_taesd()
    opt = torch.optim.Adam(vae.parameters(), 1e-4)
    x = torch.rand(cfg.vae_batch, 3, cfg.image_size, cfg.image_size)

    def vae_step():
        loss = (vae.taesd_decoder(vae.taesd_encoder(x)) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    t_vae = timed(vae_step)
    xe = torch.rand(256, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        t_enc = timed(lambda: vae.taesd_encoder(xe)) / 256
    unet = new_unet(cfg)
    uopt = torch.optim.AdamW(unet.parameters(), 1e-4)
    ctx = torch.randn(cfg.unet_batch, 77, 768)
    z = torch.randn(cfg.unet_batch, 4, h, h)
    t = torch.randint(0, 1000, (cfg.unet_batch,)).float()

    def unet_step():
        loss = unet(z, t, ctx).pow(2).mean()
        uopt.zero_grad()
        loss.backward()
        uopt.step()
    t_unet = timed(unet_step)
    n = cfg.sample_batch * 2
    zs, ts, cs = torch.randn(n, 4, h, h), torch.rand(n) * 999, torch.randn(n, 77, 768)
    with torch.no_grad():
        t_eval = timed(lambda: unet(zs, ts, cs)) / n  # per image and model call
    unet.requires_grad_(False)
    lora = LoRA(unet, cfg.lora_rank, torch.Generator().manual_seed(0))
    lopt = torch.optim.AdamW(lora.parameters(), 1e-3)
    n2 = 2 * cfg.dpo_batch
    zd, td, cd = torch.randn(n2, 4, h, h), torch.rand(n2) * 999, torch.randn(n2, 77, 768)

    def dpo_step():
        with lora.active():
            loss = unet(zd, td, cd).pow(2).mean()
        lopt.zero_grad()
        loss.backward()
        lopt.step()
    t_dpo = timed(dpo_step)
    sample_calls = cfg.sample_steps * 2  # cfg: two calls per step
    parts = {
        "vae": cfg.vae_steps * t_vae,
        "latents": cfg.n_data * t_enc,
        "unet": cfg.unet_steps * t_unet,
        "pairs": cfg.pair_prompts * cfg.pair_samples * sample_calls * t_eval,
        "ref_losses": cfg.dpo_steps * n2 * t_eval,
        **{f"dpo_beta{b:g}": cfg.dpo_steps * t_dpo for b in cfg.betas},
        "eval": (1 + len(cfg.betas)) * cfg.eval_prompts * cfg.eval_seeds * sample_calls * t_eval,
    }
    per_step = {"vae_step_s": t_vae, "unet_step_s": t_unet, "dpo_step_s": t_dpo, "model_call_per_image_s": t_eval,
                "encode_per_image_s": t_enc}
    out = {"per_step": {k: round(v, 4) for k, v in per_step.items()},
           "parts_s": {k: round(v, 1) for k, v in parts.items()}, "total_s": round(sum(parts.values()), 1)}
    log(json.dumps(out))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the family (resumable) and write its folder")
    b.add_argument("--tiny", action="store_true", help="a seconds-long configuration with the real shapes (tests)")
    b.add_argument("--out", type=Path, default=None, help=f"family folder (default {FAMILY_DIR.relative_to(REPO)}; "
                                                          "with --tiny: the cache folder's family/)")
    b.add_argument("--cache", type=Path, default=None, help=f"part results and checkpoints (default {CACHE_DIR.relative_to(REPO)})")
    mat = sub.add_parser("materialize", help="write the ComfyUI model files of a family")
    mat.add_argument("--family", type=Path, default=FAMILY_DIR)
    mat.add_argument("--models", type=Path, default=MODELS_DIR)
    mat.add_argument("--force", action="store_true")
    i = sub.add_parser("info", help="print the family as one JSON object")
    i.add_argument("--family", type=Path, default=FAMILY_DIR)
    i.add_argument("--models", type=Path, default=MODELS_DIR)
    e = sub.add_parser("estimate", help="time a few steps of each part and project the build's time (JSON)")
    e.add_argument("--tiny", action="store_true")
    e.add_argument("--repeats", type=int, default=3)
    s = sub.add_parser("score", help="print the family's reward of each image, one a line")
    s.add_argument("images", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        cfg = Config.tiny() if args.tiny else Config()
        cache = args.cache or (CACHE_DIR / ("tiny" if args.tiny else "full"))
        out = args.out or (cache / "family" if args.tiny else FAMILY_DIR)
        build = Build(cfg, cache, log=lambda s: print(s, flush=True))
        t0 = time.perf_counter()
        manifest = build.run(out)
        print(json.dumps({"family": str(out), "timings_s": manifest["timings_s"],
                          "total_s": round(time.perf_counter() - t0, 1), "results": manifest["results"]["rows"]}))
    elif args.cmd == "materialize":
        paths = materialize(args.family, args.models, args.force)
        print(json.dumps({k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in paths.items()}))
    elif args.cmd == "estimate":
        estimate(Config.tiny() if args.tiny else Config(), args.repeats)
    elif args.cmd == "info":
        print(json.dumps(info(args.family, args.models)))
    elif args.cmd == "score":
        for v in score_files(args.images):
            print(f"{v:.4f}")


if __name__ == "__main__":
    main()
