"""Start a real ComfyUI HTTP server with this pack installed, post API prompts, wait for results.

The one server launcher of the project: the headless demo (scripts/run_deradiff.py), the
benchmarks and the tests (tests/server_rig.py, tests/browser_helpers.py) all start ComfyUI
through :class:`ComfyServer`. It needs only the standard library, so it runs in any Python
that can start ComfyUI.

``with ComfyServer(comfy_root, models_dir) as server: server.run(graph)`` starts ``main.py``
of ``comfy_root`` in a base directory of its own (``workdir``, a new temporary directory
unless given):

- ``<workdir>/custom_nodes/comfyui-deradiff`` is a symlink to this repository, handed to
  ComfyUI through the ``custom_nodes:`` key of ``<workdir>/extra_model_paths.yaml``
  (ComfyUI's own ``custom_nodes/`` folder is left untouched);
- models come from ``models_dir/<folder>`` for every folder in ``MODEL_FOLDERS``, and also
  from ``<workdir>/models/<folder>`` (empty, for files written while the server runs);
- output, temp, input and user directories are under ``<workdir>``;
- stdout + stderr go to ``<workdir>/<log_name>``; on Linux the server gets SIGTERM when the
  process that started it dies without stopping it.

Server arguments: ``--cpu`` (unless ``cpu=False``), then ``extra_args``, then the words of
the environment variable ``DERADIFF_SERVER_ARGS`` (for example ``--lowvram`` or
``--cache-ram``). ``--cache-classic`` (ComfyUI's classic cache: only the last prompt's node
outputs are kept) is added whenever the ComfyUI tree knows it and no other ``--cache-*``
option is given; newer ComfyUI defaults to a RAM-pressure cache that keeps earlier prompts'
models in memory. Whether a tree knows an option is read from its ``comfy/cli_args.py``,
and an option it does not know is refused before anything starts.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "comfyui-deradiff"
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "unet", "loras", "vae", "reward_models")
SERVER_ARGS_ENV = "DERADIFF_SERVER_ARGS"
STARTUP_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supported_options(comfy_root) -> set[str]:
    """The command-line options (``--name``) that the tree's ``comfy/cli_args.py`` defines."""
    text = (Path(comfy_root) / "comfy" / "cli_args.py").read_text(errors="replace")
    return set(re.findall(r"""add_argument\(\s*["'](--[\w-]+)["']""", text))


def env_server_args() -> list[str]:
    return shlex.split(os.environ.get(SERVER_ARGS_ENV, ""))


def server_args(comfy_root, cpu: bool = True, extra_args=()) -> list[str]:
    """``--cpu`` + extra_args + $DERADIFF_SERVER_ARGS (+ ``--cache-classic``, see the module
    docstring). Raises ValueError for an option the tree does not define."""
    args = [*(["--cpu"] if cpu else []), *extra_args, *env_server_args()]
    known = supported_options(comfy_root)
    unknown = [a.split("=", 1)[0] for a in args if a.startswith("--") and a.split("=", 1)[0] not in known]
    if unknown:
        raise ValueError(f"the ComfyUI in {comfy_root} has no option {', '.join(unknown)} "
                         f"(its comfy/cli_args.py does not define it; check {SERVER_ARGS_ENV})")
    if "--cache-classic" in known and not any(a.startswith("--cache-") for a in args):
        args.append("--cache-classic")
    return args


def _die_with_parent():
    """preexec_fn: the server gets SIGTERM if the process that started it dies without
    stopping it (a test run killed by a timeout, for example). Linux only."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class ComfyServer:
    """A ComfyUI server process with the pack (see the module docstring) and a small
    standard-library client: ``get``, ``post``, ``queue``, ``wait``, ``run``, ``output_images``."""

    def __init__(self, comfy_root, models_dir, workdir=None, cpu=True, extra_args=(), log_name="comfyui.log",
                 startup_timeout=STARTUP_TIMEOUT, env=None):
        self.comfy_root = Path(comfy_root)
        self.models_dir = Path(models_dir)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="deradiff-comfy-"))
        self.cpu = cpu
        self.args = server_args(self.comfy_root, cpu, extra_args)
        self.startup_timeout = startup_timeout
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.log_path = self.workdir / log_name
        self.custom_nodes = self.workdir / "custom_nodes"
        self.pack_path = self.custom_nodes / PACK_DIR_NAME
        self.output_dir = self.workdir / "output"
        self.input_dir = self.workdir / "input"
        self.extra_models = self.workdir / "models"  # <folder>/ under it: a second, writable model folder
        self.process = None
        self._log = None

    # -- process --------------------------------------------------------------------------
    def _prepare(self) -> Path:
        self.custom_nodes.mkdir(parents=True, exist_ok=True)
        if not self.pack_path.is_symlink():
            self.pack_path.symlink_to(REPO, target_is_directory=True)
        for d in ("output", "temp", "input", "user"):
            (self.workdir / d).mkdir(exist_ok=True)
        lines = ["deradiff:", f"    base_path: {json.dumps(str(self.models_dir))}"]
        for folder in MODEL_FOLDERS:
            (self.extra_models / folder).mkdir(parents=True, exist_ok=True)
            # one path per line; relative ones join base_path, absolute ones stay as they are
            lines += [f"    {folder}: |", f"        {folder}", f"        {self.extra_models / folder}"]
        lines.append(f"    custom_nodes: {json.dumps(str(self.custom_nodes))}")
        paths = self.workdir / "extra_model_paths.yaml"
        paths.write_text("\n".join(lines) + "\n")
        return paths

    def command(self, paths_yaml: Path) -> list[str]:
        w = self.workdir
        return [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--extra-model-paths-config", str(paths_yaml),
                "--output-directory", str(w / "output"), "--temp-directory", str(w / "temp"),
                "--input-directory", str(w / "input"), "--user-directory", str(w / "user"), *self.args]

    def start(self) -> "ComfyServer":
        """Starts the server and returns once it answers HTTP (raises if it exits or times out)."""
        cmd = self.command(self._prepare())
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            cmd, cwd=self.comfy_root, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while True:
                self.check_alive()
                try:
                    self.get("/object_info/DeRaDiffKSampler", timeout=10)
                    return self
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ComfyUI did not answer in {self.startup_timeout:.0f} s; see {self.log_path}:"
                                       f"\n{self.log()[-4000:]}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        if self._log is not None:
            self._log.close()
            self._log = None

    def remove_workdir(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def check_alive(self):
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the ComfyUI server exited with {self.process.returncode}; see {self.log_path}:"
                               f"\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- client ---------------------------------------------------------------------------
    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} failed ({e.code}): {e.read().decode(errors='replace')}") from None

    def queue(self, graph) -> str:
        return self.post("/prompt", {"prompt": graph, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id, timeout=600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.check_alive()
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:  # ComfyUI adds a prompt to the history once it has finished
                return history[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, graph, timeout=600) -> dict:
        entry = self.wait(self.queue(graph), timeout)
        if entry["status"].get("status_str") != "success":
            raise RuntimeError(f"prompt failed: {error_message(entry)}")
        return entry

    def output_images(self, entry) -> list[Path]:
        files = []
        for out in entry.get("outputs", {}).values():
            for img in out.get("images", []):
                files.append(self.output_dir / img.get("subfolder", "") / img["filename"])
        return files


def error_message(entry) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()}"
    return json.dumps(entry.get("status"))
