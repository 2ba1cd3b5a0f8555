"""Test rig: a real ComfyUI (in-process for the model-level tests, its HTTP server for
the workflow tests) plus stand-in checkpoints generated on first use.

DERADIFF_COMFYUI=/path/to/ComfyUI tests against an existing ComfyUI instead of the
one `scripts/comfyui_runtime.py` unpacks into .cache/comfyui.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import comfyui_runtime  # noqa: E402

PACK_MODULE = "comfyui_deradiff"
STANDIN_DIR = Path(os.environ.get("DERADIFF_STANDINS", REPO / ".cache" / "standins-v1"))

# file name -> (writer, family, seed, extra kwargs). The SDXL reference is a checkpoint and its
# aligned version a UNet-only file, as Diffusion-DPO SDXL is released.
STANDINS = {
    "checkpoints/sd15_reference.safetensors": ("checkpoint", "sd15", 100, {}),
    "checkpoints/sd15_aligned.safetensors": ("checkpoint", "sd15", 200, {}),
    "diffusion_models/sd15_aligned_unet.safetensors": ("unet", "sd15", 300, {}),
    "checkpoints/sdxl_reference.safetensors": ("checkpoint", "sdxl", 400, {}),
    "diffusion_models/sdxl_aligned_unet.safetensors": ("unet", "sdxl", 500, {}),
    "loras/sd15_aligned_lora.safetensors": ("lora", "sd15", 600, {}),
}


def ensure_standin(name: str) -> Path:
    import standins
    path = STANDIN_DIR / name
    if path.exists():
        return path
    kind, family, seed, extra = STANDINS[name]
    tmp = path.with_suffix(".partial")
    writer = {"checkpoint": standins.write_checkpoint, "unet": standins.write_unet,
              "lora": standins.write_lora}[kind]
    writer(str(tmp), family, seed, **extra)
    tmp.rename(path)
    return path


def ensure_all_standins() -> Path:
    for name in STANDINS:
        ensure_standin(name)
    return STANDIN_DIR


def load_pack():
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def comfy_root():
    root = comfyui_runtime.comfyui_root()
    if not os.environ.get("DERADIFF_COMFYUI"):
        comfyui_runtime.install_comfyui(root)
    return root


@pytest.fixture(scope="session")
def comfy(comfy_root):
    """ComfyUI imported in this process (CPU unless a GPU is present), models from the stand-ins."""
    comfyui_runtime.add_to_path(comfy_root)
    ensure_all_standins()
    import folder_paths
    for folder in ("checkpoints", "diffusion_models", "loras"):
        (STANDIN_DIR / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(STANDIN_DIR / folder), is_default=True)
    import comfy.model_management  # noqa: F401  (after the cpu flag)
    import nodes  # ComfyUI's own nodes.py: the reference behaviour we compare against
    return nodes


@pytest.fixture(scope="session")
def pack(comfy):
    return load_pack()
