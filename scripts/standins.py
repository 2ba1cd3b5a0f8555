"""Small stand-in checkpoints that ComfyUI's own loaders detect as SD1.5 / SDXL.

The UNets are tiny but carry the config keys ComfyUI's model detection matches on;
the text encoders are full-size (ComfyUI sizes them from the family, not the file)
with random weights; the VAE is TAESD-sized. Shared by the headless demo
(scripts/run_deradiff.py), the benchmarks and the tests. Writing a stand-in needs ComfyUI's
``comfy`` package: when it is not importable yet, ``ensure_standin`` puts the ComfyUI of
``comfyui_runtime.comfyui_root()`` on ``sys.path`` first (CPU unless a GPU is present).

Random weights are drawn so that the networks do something: norm scales near 1,
other weights ~ N(0, 1/fan_in). Two stand-ins with different seeds therefore give
clearly different outputs, which the tests rely on to see a mixing bug.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_middle=1,
    transformer_depth_output=[1, 1], context_dim=768, num_heads=8, num_head_channels=-1,
    use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
)
# KOALA_700M-shaped: ComfyUI detects it as an SDXL-family model (SDXL latents, adm y).
SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1, 1],
    channel_mult=[1, 1, 1], transformer_depth=[0, 2, 5], transformer_depth_middle=5,
    transformer_depth_output=[0, 0, 2, 2, 5, 5], context_dim=2048, num_heads=-1,
    num_head_channels=64, use_linear_in_transformer=True, use_spatial_transformer=True,
    legacy=False, adm_in_channels=2816, num_classes="sequential", use_temporal_attention=False,
    use_temporal_resblock=False,
)
# Full-size SD1.5 UNet (860 M parameters): ComfyUI detects diffusers-layout UNets only
# by matching known full configs, so the diffusers-layout stand-in has to be real-sized.
SD15_FULL_UNET = dict(SD15_UNET, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                      transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                      transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
STANDIN_DIR = Path(os.environ.get("DERADIFF_STANDINS", Path(__file__).resolve().parent.parent / ".cache" / "standins-v1"))
UNET_CONFIGS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "sd15_full": SD15_FULL_UNET}


def _random_like(name: str, shape, gen: torch.Generator, dtype) -> torch.Tensor:
    if name.endswith("position_ids"):
        return torch.arange(shape[-1]).reshape(shape).to(torch.int64)
    if name.endswith("logit_scale"):
        return torch.full(shape, math.log(100.0), dtype=dtype)
    if len(shape) <= 1:
        if name.endswith("bias") or name.endswith("vae_shift"):
            return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        # norm scales (GroupNorm / LayerNorm weight), vae_scale: near 1, never 0
        return (1.0 + torch.randn(shape, generator=gen) * 0.05).to(dtype)
    if "embedding" in name:
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(dtype)


def _randomise(shapes: dict, seed: int, dtype) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: _random_like(k, tuple(v), gen, dtype).contiguous() for k, v in sorted(shapes.items())}


def _shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def unet_state_dict(family: str, seed: int, dtype=torch.float16) -> dict:
    """Original (LDM) layout UNet weights, without prefix."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        unet = UNetModel(**UNET_CONFIGS[family], operations=comfy.ops.disable_weight_init)
    return _randomise(_shapes(unet), seed, dtype)


def unet_to_diffusers_layout(family: str, sd: dict) -> dict:
    """Re-key an LDM-layout UNet state dict to the diffusers layout ComfyUI converts back."""
    import comfy.utils
    cfg = dict(UNET_CONFIGS[family])
    mapping = comfy.utils.unet_to_diffusers(cfg)  # diffusers key -> ldm key
    inverse = {v: k for k, v in mapping.items()}
    missing = [k for k in sd if k not in inverse]
    if missing:
        raise RuntimeError(f"no diffusers name for {missing[:5]}")
    return {inverse[k]: v for k, v in sd.items()}


def clip_state_dict(family: str, seed: int, dtype=torch.float16) -> dict:
    """Every text-encoder key, in checkpoint naming."""
    if family == "sd15":
        import comfy.sd1_clip
        with torch.device("meta"):
            clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
        prefix_map = {"transformer.text_model.": "cond_stage_model.transformer.text_model."}
    else:
        import comfy.sdxl_clip
        with torch.device("meta"):
            clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
        prefix_map = {"clip_l.transformer.text_model.": "conditioner.embedders.0.transformer.text_model.",
                      "clip_g.": "conditioner.embedders.1.model."}
    out = {}
    for k, v in _randomise(_shapes(clip), seed, dtype).items():
        for src, dst in prefix_map.items():
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
    return out


def taesd_state_dict(seed: int, dtype=torch.float16) -> dict:
    import comfy.taesd.taesd
    with torch.device("meta"):
        vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    return _randomise(_shapes(vae), seed, dtype)


def write_checkpoint(path: str, family: str, seed: int) -> str:
    sd = {"model.diffusion_model." + k: v for k, v in unet_state_dict(family, seed).items()}
    sd.update(clip_state_dict(family, seed + 1))
    sd.update({"first_stage_model." + k: v for k, v in taesd_state_dict(seed + 2).items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)
    return path


def write_unet(path: str, family: str, seed: int, layout: str = "ldm", dtype=torch.float16) -> str:
    sd = unet_state_dict(family, seed, dtype=dtype)
    if layout == "diffusers":
        sd = unet_to_diffusers_layout(family, sd)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)
    return path


def write_lora(path: str, family: str, seed: int, rank: int = 4, scale: float = 1.0) -> str:
    """A kohya-style LoRA on every attention projection of the stand-in UNet."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        shapes = _shapes(UNetModel(**UNET_CONFIGS[family], operations=comfy.ops.disable_weight_init))
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, w in ((k, torch.empty(v, device="meta")) for k, v in shapes.items()):
        if not (k.endswith(".weight") and w.ndim == 2 and (".attn1." in k or ".attn2." in k)):
            continue
        name = "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        out_f, in_f = w.shape
        sd[name + ".lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)).half()
        sd[name + ".lora_up.weight"] = (torch.randn(out_f, rank, generator=gen) * scale / math.sqrt(rank)).half()
        sd[name + ".alpha"] = torch.tensor(float(rank))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)
    return path


# file name -> (writer, family, seed, extra kwargs). The SDXL reference is a checkpoint and its
# aligned version a UNet-only file, as Diffusion-DPO SDXL is released.
STANDINS = {
    "checkpoints/sd15_reference.safetensors": ("checkpoint", "sd15", 100, {}),
    "checkpoints/sd15_aligned.safetensors": ("checkpoint", "sd15", 200, {}),
    "diffusion_models/sd15_aligned_unet.safetensors": ("unet", "sd15", 300, {}),
    "checkpoints/sdxl_reference.safetensors": ("checkpoint", "sdxl", 400, {}),
    "diffusion_models/sdxl_aligned_unet.safetensors": ("unet", "sdxl", 500, {}),
    "loras/sd15_aligned_lora.safetensors": ("lora", "sd15", 600, {}),
    "loras/sdxl_aligned_lora.safetensors": ("lora", "sdxl", 610, {}),
    "diffusion_models/sd15_aligned_unet_fp32.safetensors": ("unet", "sd15", 300, {"dtype": torch.float32}),
}
# Written only by the tests that need them (ensure_standin): a full-size SD1.5 UNet in the
# diffusers layout (1.7 GB), because ComfyUI recognises diffusers UNets by full configs only.
ON_DEMAND = {
    "diffusion_models/sd15_aligned_diffusers_unet.safetensors": ("unet", "sd15_full", 700, {"layout": "diffusers"}),
    # full-size models for the memory benchmark, where the UNet must dominate the footprint
    "diffusion_models/sd15_full_reference_unet.safetensors": ("unet", "sd15_full", 710, {}),
    "diffusion_models/sd15_full_aligned_unet.safetensors": ("unet", "sd15_full", 720, {}),
    "loras/sd15_full_lora.safetensors": ("lora", "sd15_full", 730, {"rank": 32}),
}


def _comfy_importable():
    """Makes ``import comfy`` work (ComfyUI on sys.path) unless it already does."""
    import importlib.util
    if importlib.util.find_spec("comfy") is None:
        import comfyui_runtime  # same folder; on sys.path wherever this module is imported from
        comfyui_runtime.add_to_path()


def ensure_standin(name: str) -> Path:
    path = STANDIN_DIR / name
    if path.exists():
        return path
    _comfy_importable()
    kind, family, seed, extra = {**STANDINS, **ON_DEMAND}[name]
    tmp = path.with_suffix(".partial")
    writer = {"checkpoint": write_checkpoint, "unet": write_unet,
              "lora": write_lora, **_FAMILY_WRITERS}[kind]
    writer(str(tmp), family, seed, **extra)
    tmp.rename(path)
    return path


def ensure_all_standins() -> Path:
    """Writes any missing stand-in into STANDIN_DIR (once per machine) and returns it."""
    for name in STANDINS:
        ensure_standin(name)
    return STANDIN_DIR


# -- reward models (λ Search): tiny random transformers CLIP folders ------------------------------
CLIP_PROJECTION = 16
CLIP_IMAGE = 32


def write_clip_folder(folder: Path, tokenizer_dir: Path, seed: int = 0, processor_subfolder: bool = False) -> Path:
    """A transformers CLIP model folder as released (config, weights, image processor, tokenizer), tiny
    and random; ``tokenizer_dir``: CLIP's BPE files (ComfyUI ships them in comfy/sd1_tokenizer)."""
    import shutil
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    folder = Path(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=CLIP_IMAGE, patch_size=8),
        projection_dim=CLIP_PROJECTION)
    CLIPModel(config).eval().save_pretrained(folder)
    processor = folder / "processor" if processor_subfolder else folder
    CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE},
                       crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE}).save_pretrained(processor)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, processor / f.name)
    return folder


AESTHETIC_LAYERS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")


def write_aesthetic_head(path: Path, width: int = CLIP_PROJECTION, seed: int = 0, drop: str | None = None) -> dict:
    """A LAION-aesthetic-v2-shaped MLP state dict (width → 1024 → 128 → 64 → 16 → 1), random."""
    path = Path(path)
    g = torch.Generator().manual_seed(seed)
    sizes = [width, 1024, 128, 64, 16, 1]
    state = {}
    for layer, (a, b) in zip(AESTHETIC_LAYERS, zip(sizes, sizes[1:])):
        state[f"{layer}.weight"] = torch.randn(b, a, generator=g) / a ** 0.5
        state[f"{layer}.bias"] = torch.randn(b, generator=g) * 0.1
    if drop:
        del state[drop]
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


REWARD_STANDINS = {"reward_models/clip-standin": 800, "reward_models/aesthetic-standin.pth": 810}


def ensure_reward_standins() -> Path:
    """A tiny CLIP folder and an aesthetic head under STANDIN_DIR/reward_models (once per machine)."""
    import shutil
    _comfy_importable()
    import comfyui_runtime
    tokenizer_dir = Path(comfyui_runtime.comfyui_root()) / "comfy" / "sd1_tokenizer"
    for name, seed in REWARD_STANDINS.items():
        path = STANDIN_DIR / name
        if path.exists():
            continue
        tmp = path.with_name("partial-" + path.name)  # same suffix: the head's format follows it
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".safetensors", ".pth"):
            write_aesthetic_head(tmp, seed=seed)
        else:
            write_clip_folder(tmp, tokenizer_dir, seed)
        tmp.rename(path)
    return STANDIN_DIR / "reward_models"


# -- more families (issue 14): SD2.x v-prediction, SDXL v-prediction + zero-terminal SNR, SD3.5 (MMDiT),
# Flux.1 dev / schnell. All are diffusion-model-only files (models/diffusion_models, read by UNETLoader);
# their text encoders (OpenCLIP-H, CLIP-G, T5-XXL) are not written: the tests feed conditioning of the
# right shapes directly, and the test server gets it from a test-only node (tests/family_nodes/).
#
# What ComfyUI's detection keys on, and how each stand-in meets it:
# - SD2.x: context_dim 1024, model_channels 320, linear transformer projections, no adm. v-prediction is
#   read from the standard deviation of output_blocks.11.1.transformer_blocks.0.norm1.bias (> 0.09), so
#   the UNet has 12 output blocks (one level of 11 res blocks) with a transformer only in the last
#   (output blocks take transformer_depth_output from its end) and one in the first input block,
#   where detection reads context_dim.
# - SDXL v-pred/ztsnr: the KOALA-shaped SDXL stand-in plus the empty marker tensors ``v_pred`` and
#   ``ztsnr`` that v-prediction SDXL releases (NoobAI-XL v-pred) carry.
# - SD3/SD3.5: MMDiT with hidden size 64 x depth (depth 2 here), 16 latent channels, 2048-wide pooled
#   vector, 4096-wide context, RMS q/k norm and one self-attention x-block as in SD3.5 Medium.
# - Flux.1: 0.3.75 fixes 24 heads of 128 channels, so the width must stay 3072; one double-stream
#   block and no single-stream block keep it at ~0.4 G parameters. dev has the guidance embedder
#   (``guidance_in``), schnell does not.
SD2_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[11],
    channel_mult=[1], transformer_depth=[1] + [0] * 10, transformer_depth_middle=-1,
    transformer_depth_output=[1] + [0] * 11, context_dim=1024, num_heads=-1, num_head_channels=64,
    use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False,
)
SD2_VPRED_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD3_MMDIT = dict(
    input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=2048,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    pos_embed_max_size=16, num_patches=256, qk_norm="rms", pos_embed_scaling_factor=None,
    x_block_self_attn_layers=[0],
)
FLUX_PARAMS = dict(
    in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
    num_heads=24, depth=1, depth_single_blocks=0, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
    qkv_bias=True, txt_ids_dims=[],
)
# conditioning shapes of each family (what its text encoder would produce): (tokens, width, pooled width)
FAMILY_CONDITIONING = {"sd2": (77, 1024, None), "sdxl": (77, 2048, 1280), "sd3": (154, 4096, 2048),
                       "flux": (256, 4096, 768)}


def _family_module(family: str, guidance: bool = True) -> torch.nn.Module:
    """The family's diffusion model on the meta device (shapes only)."""
    import dataclasses
    import comfy.ops
    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        if family in ("sd2", "sd2_vpred"):
            from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
            return UNetModel(**SD2_UNET, operations=ops)
        if family in ("sdxl", "sdxl_vpred_ztsnr"):
            from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
            return UNetModel(**SDXL_UNET, operations=ops)
        if family == "sd3":
            from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
            return OpenAISignatureMMDITWrapper(**SD3_MMDIT, operations=ops)
        if family in ("flux_dev", "flux_schnell"):
            from comfy.ldm.flux import model as flux
            known = {f.name for f in dataclasses.fields(flux.FluxParams)}
            params = {k: v for k, v in FLUX_PARAMS.items() if k in known}
            return flux.Flux(guidance_embed=family == "flux_dev", operations=ops, **params)
    raise KeyError(family)


def family_state_dict(family: str, seed: int, dtype=torch.float16) -> dict:
    """Random weights for one of the families above, as a diffusion-model-only file holds them."""
    sd = _randomise(_shapes(_family_module(family)), seed, dtype)
    if family == "sd2_vpred":  # ComfyUI's v-prediction test for SD2.x (see above)
        gen = torch.Generator().manual_seed(seed + 17)
        sd[SD2_VPRED_KEY] = (torch.randn(sd[SD2_VPRED_KEY].shape, generator=gen) * 0.3).to(dtype)
    if family == "sdxl_vpred_ztsnr":
        sd["v_pred"] = torch.tensor([])
        sd["ztsnr"] = torch.tensor([])
    return sd


def write_family_unet(path: str, family: str, seed: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(family_state_dict(family, seed), path)
    return path


def write_family_lora(path: str, family: str, seed: int, rank: int = 4, scale: float = 1.0) -> str:
    """A LoRA in the generic ``lora_unet_<key>`` naming that ComfyUI maps for every diffusion model,
    on every 2-D attention projection (qkv / proj / to_q.. / attn) of the family's stand-in."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in sorted(_shapes(_family_module(family)).items()):
        if not (k.endswith(".weight") and len(shape) == 2 and "attn" in k and "norm" not in k):
            continue
        name = "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        out_f, in_f = shape
        sd[name + ".lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)).half()
        sd[name + ".lora_up.weight"] = (torch.randn(out_f, rank, generator=gen) * scale / math.sqrt(rank)).half()
        sd[name + ".alpha"] = torch.tensor(float(rank))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)
    return path


# file name -> (writer, family, seed, extra); written on first use by the family tests
FAMILY_STANDINS = {
    "diffusion_models/sd2_eps_unet.safetensors": ("family_unet", "sd2", 900, {}),
    "diffusion_models/sd2_vpred_reference_unet.safetensors": ("family_unet", "sd2_vpred", 910, {}),
    "diffusion_models/sd2_vpred_aligned_unet.safetensors": ("family_unet", "sd2_vpred", 920, {}),
    "loras/sd2_aligned_lora.safetensors": ("family_lora", "sd2", 930, {}),
    "diffusion_models/sdxl_vpred_ztsnr_reference_unet.safetensors": ("family_unet", "sdxl_vpred_ztsnr", 940, {}),
    "diffusion_models/sdxl_vpred_ztsnr_aligned_unet.safetensors": ("family_unet", "sdxl_vpred_ztsnr", 950, {}),
    "loras/sdxl_vpred_aligned_lora.safetensors": ("family_lora", "sdxl", 960, {}),
    "diffusion_models/sd35_reference.safetensors": ("family_unet", "sd3", 970, {}),
    "diffusion_models/sd35_aligned.safetensors": ("family_unet", "sd3", 980, {}),
    "loras/sd35_aligned_lora.safetensors": ("family_lora", "sd3", 990, {}),
    "diffusion_models/flux1_dev_reference.safetensors": ("family_unet", "flux_dev", 1000, {}),
    "diffusion_models/flux1_dev_aligned.safetensors": ("family_unet", "flux_dev", 1010, {}),
    "loras/flux1_dev_aligned_lora.safetensors": ("family_lora", "flux_dev", 1020, {}),
    "diffusion_models/flux1_schnell_reference.safetensors": ("family_unet", "flux_schnell", 1030, {}),
    "diffusion_models/flux1_schnell_aligned.safetensors": ("family_unet", "flux_schnell", 1040, {}),
}
ON_DEMAND.update(FAMILY_STANDINS)
_FAMILY_WRITERS = {"family_unet": write_family_unet, "family_lora": write_family_lora}


def ensure_family_standins(prefix: str = "") -> Path:
    """Writes the family stand-ins whose file name starts with ``prefix`` (e.g. "diffusion_models/flux1_dev")."""
    for name in FAMILY_STANDINS:
        if name.split("/", 1)[1].startswith(prefix) or name.startswith(prefix):
            ensure_standin(name)
    return STANDIN_DIR
