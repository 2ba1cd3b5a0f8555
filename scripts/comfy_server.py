"""Start a real ComfyUI HTTP server with this pack installed, post API prompts, wait for results.

Used by the headless demo (scripts/run_deradiff.py) and the benchmarks; needs only the
standard library, so it runs in any Python that can start ComfyUI.
"""
from __future__ import annotations

import json
import os
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``with ComfyServer(comfy_root, models_dir) as server: server.run(graph)``"""

    def __init__(self, comfy_root, models_dir, workdir=None, cpu=True, extra_args=()):
        self.comfy_root = Path(comfy_root)
        self.models_dir = Path(models_dir)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="deradiff-comfy-"))
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.log_path = self.workdir / "comfyui.log"
        self.process = None

    def __enter__(self):
        nodes_dir = self.workdir / "custom_nodes"
        nodes_dir.mkdir(parents=True, exist_ok=True)
        link = nodes_dir / "comfyui-deradiff"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        paths = self.workdir / "extra_model_paths.yaml"
        folders = "\n".join(f"    {f}: {f}/" for f in ("checkpoints", "diffusion_models", "unet", "loras", "vae"))
        paths.write_text(f"deradiff:\n    base_path: {self.models_dir}\n{folders}\n    custom_nodes: {nodes_dir}\n")
        for d in ("output", "temp", "input", "user"):
            (self.workdir / d).mkdir(exist_ok=True)
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--extra-model-paths-config", str(paths),
               "--output-directory", str(self.workdir / "output"), "--temp-directory", str(self.workdir / "temp"),
               "--input-directory", str(self.workdir / "input"), "--user-directory", str(self.workdir / "user"),
               *(["--cpu"] if self.cpu else []), *self.extra_args]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=self.comfy_root, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start-up; see {self.log_path}:\n{self.log()[-3000:]}")
            try:
                self.get("/object_info/DeRaDiffKSampler")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start in time; see {self.log_path}")

    def __exit__(self, *exc):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
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
                files.append(self.workdir / "output" / img.get("subfolder", "") / img["filename"])
        return files


def error_message(entry) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()}"
    return json.dumps(entry.get("status"))
