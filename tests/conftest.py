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
sys.path.insert(0, str(REPO / "tests"))
import comfyui_runtime  # noqa: E402

PACK_MODULE = "comfyui_deradiff"

from standins import STANDIN_DIR, STANDINS, ensure_all_standins, ensure_standin  # noqa: E402,F401
# The shared ComfyUI server, defined HERE once: a session fixture imported into several test modules
# is a separate fixture per module, and every copy would keep its own server alive to the end.
from server_rig import comfy_server  # noqa: E402,F401


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
    standin_dir = ensure_all_standins()
    import folder_paths
    for folder in ("checkpoints", "diffusion_models", "loras"):
        (standin_dir / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(standin_dir / folder), is_default=True)
    import comfy.model_management  # noqa: F401  (after the cpu flag)
    import nodes  # ComfyUI's own nodes.py: the reference behaviour we compare against
    return nodes


@pytest.fixture(scope="session")
def pack(comfy):
    return load_pack()


def pytest_report_header(config):
    """Which ComfyUI the run tests, and the server arguments the workflow tests get."""
    root = comfyui_runtime.comfyui_root()
    version_file = root / "comfyui_version.py"
    version = version_file.read_text().split('"')[-2] if version_file.exists() else "not installed yet"
    line = f"ComfyUI {version} at {root}"
    if (root / "comfy" / "cli_args.py").exists():
        import comfy_server
        try:
            line += f"; server arguments: {' '.join(comfy_server.server_args(root))}"
        except ValueError as why:
            line += f"; {why}"
    return line


def pytest_runtest_teardown(item, nextitem):
    """After the last test of a module that used the shared ComfyUI server: free the server's
    models and node cache (the CI machine has 24 GiB for this process, the server and Chromium)."""
    server = getattr(item, "funcargs", {}).get("comfy_server")
    if server is not None and (nextitem is None or nextitem.module is not item.module):
        server.free()


@pytest.fixture(scope="module")
def ac(comfy, pack):
    """benchmarks/aw_comfy.py: the alignment world's closed-form models as ComfyUI models (progress bars off)."""
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    import aw_comfy
    return aw_comfy


@pytest.fixture(scope="module", autouse=True)
def release_models_after_module():
    """Models a module loaded (comfy_helpers' per-name caches included) are dropped when it ends, so
    the in-process modules do not pile up: SDXL, the diffusers-layout UNet and the family stand-ins
    together held about 7 GB in this process before this was added."""
    yield
    if "comfy.model_management" not in sys.modules:
        return
    import gc
    import comfy_helpers
    comfy_helpers.load_checkpoint.cache_clear()
    comfy_helpers.load_unet.cache_clear()
    sys.modules["comfy.model_management"].unload_all_models()
    gc.collect()
    sys.modules["comfy.model_management"].soft_empty_cache()
    try:  # give the freed heap back to the system (glibc keeps it otherwise)
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
