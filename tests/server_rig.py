"""A real ComfyUI HTTP server with this pack loaded, for the workflow-level tests.

``comfy_server`` (session scope) starts ``main.py`` of the ComfyUI that conftest's
``comfy_root`` provides, in a temporary base directory:

- ``<tmp>/custom_nodes/comfyui-deradiff`` is a symlink to this repository, handed to
  ComfyUI through the ``custom_nodes:`` key of an extra-model-paths YAML (ComfyUI's
  own ``custom_nodes/`` folder is left untouched);
- models come from the stand-in folder (``checkpoints``, ``diffusion_models``, ``loras``),
  plus ``<tmp>/models/diffusion_models`` for files a test writes while the server runs;
- output, temp, input and user directories are all under ``<tmp>``.

The fixture yields a :class:`ComfyServer` client (``requests`` for HTTP, ``aiohttp`` for
the websocket) and terminates the server at the end of the session. The server's
stdout + stderr go to ``<tmp>/server.log`` (copied to ``test-artifacts/comfy-server.log``
at the end); set DERADIFF_SERVER_LOG_KEEP=1 to leave the
temporary directory in place afterwards.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import REPO, STANDIN_DIR, ensure_all_standins

PACK_DIR_NAME = "comfyui-deradiff"
STARTUP_TIMEOUT = 180.0


class PromptFailed(AssertionError):
    """A prompt was refused by /prompt or did not finish successfully."""

    def __init__(self, message, entry=None, response=None):
        super().__init__(message)
        self.entry = entry
        self.response = response


def _die_with_parent():
    """preexec_fn: the server gets SIGTERM if the test process dies without its teardown
    (killed by a timeout, for example). Linux only; elsewhere a no-op."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Client for the test server: HTTP helpers, history and websocket messages."""

    def __init__(self, base: str, root: Path, log_path: Path, process: subprocess.Popen):
        self.base = base
        self.root = root
        self.log_path = log_path
        self.process = process
        self.output_dir = root / "output"
        self.input_dir = root / "input"
        self.extra_diffusion_models = root / "models" / "diffusion_models"
        self.client_id = uuid.uuid4().hex
        self.http = requests.Session()

    # -- plain HTTP -----------------------------------------------------------
    def get(self, path, **kw):
        r = self.http.get(self.base + path, timeout=kw.pop("timeout", 60), **kw)
        r.raise_for_status()
        return r.json()

    def object_info(self, node_id=None):
        info = self.get("/object_info" + (f"/{node_id}" if node_id else ""))
        return info[node_id] if node_id else info

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post_prompt(self, graph: dict, client_id: str | None = None) -> str:
        """Queues an API-format graph; returns its prompt_id. Raises PromptFailed on HTTP 400."""
        body = {"prompt": graph, "client_id": client_id or self.client_id}
        r = self.http.post(self.base + "/prompt", json=body, timeout=60)
        if r.status_code != 200:
            raise PromptFailed(f"/prompt answered {r.status_code}: {r.text}", response=r)
        data = r.json()
        if data.get("node_errors"):
            raise PromptFailed(f"/prompt node errors: {data['node_errors']}", response=r)
        return data["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """The /history entry of a prompt once it has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error") \
                    or entry and entry.get("status", {}).get("completed"):
                return entry
            if time.monotonic() > deadline:
                self.cancel(prompt_id)  # do not leave it running under the next tests' prompts
                raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")
            time.sleep(0.1)

    def run(self, graph: dict, timeout: float = 120.0, expect_success: bool = True) -> dict:
        """post_prompt + wait. With expect_success, a failed prompt raises PromptFailed."""
        entry = self.wait(self.post_prompt(graph), timeout)
        if expect_success and status_of(entry) != "success":
            raise PromptFailed(f"prompt failed: {error_message(entry)}", entry=entry)
        return entry

    def interrupt(self, prompt_id: str | None = None):
        """POST /interrupt: the given prompt if it is the one running, else whatever runs."""
        body = {"prompt_id": prompt_id} if prompt_id else {}
        self.http.post(self.base + "/interrupt", json=body, timeout=30).raise_for_status()

    def cancel(self, prompt_id: str):
        """Drops a prompt from the queue, or interrupts it if it is running."""
        try:
            self.http.post(self.base + "/queue", json={"delete": [prompt_id]}, timeout=30)
            self.interrupt(prompt_id)
        except requests.RequestException:
            pass

    def images(self, entry: dict, node_id: str | None = None) -> list[Path]:
        """Paths of the images a history entry's output nodes saved (type 'output')."""
        paths = []
        for nid, out in entry.get("outputs", {}).items():
            if node_id is not None and nid != node_id:
                continue
            for img in out.get("images", []):
                if img.get("type") == "output":
                    paths.append(self.output_dir / img.get("subfolder", "") / img["filename"])
        return paths

    def check_alive(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"the ComfyUI server exited with {self.process.returncode}; "
                               f"log tail:\n{self.log_text()[-4000:]}")

    # -- websocket ------------------------------------------------------------
    def ws_run(self, graph: dict, on_message=None, timeout: float = 180.0) -> tuple[str, list]:
        """Runs a graph while listening on /ws with a fresh client id.

        Returns (prompt_id, messages): every message the socket received until the prompt
        ended, JSON messages as dicts ({"type", "data"}) and binary frames as bytes.
        ``on_message(msg, server)`` is called for each message as it arrives (for example
        to POST /interrupt after the first progress message). If listening fails or times
        out, the prompt is cancelled so that it does not hold up the next tests.
        """
        return asyncio.run(self._ws_run(graph, on_message, timeout))

    async def _ws_run(self, graph, on_message, timeout):
        import aiohttp
        client_id = uuid.uuid4().hex
        ws_url = self.base.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url, max_msg_size=0) as ws:
                # the server greets every new socket with a status message
                first = await ws.receive(timeout=30)
                messages = [json.loads(first.data) if first.type == aiohttp.WSMsgType.TEXT else first.data]
                prompt_id = await loop.run_in_executor(None, self.post_prompt, graph, client_id)
                try:
                    await asyncio.wait_for(self._ws_listen(ws, prompt_id, messages, on_message), timeout)
                except BaseException as e:
                    await loop.run_in_executor(None, self.cancel, prompt_id)
                    if isinstance(e, asyncio.TimeoutError):
                        raise TimeoutError(f"prompt {prompt_id} did not end within {timeout} s; messages: "
                                           f"{[m['type'] for m in messages if isinstance(m, dict)][-20:]}") from None
                    raise
                return prompt_id, messages

    async def _ws_listen(self, ws, prompt_id, messages, on_message):
        import aiohttp
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                item = json.loads(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                item = bytes(msg.data)
            else:
                raise RuntimeError(f"websocket closed: {msg.type} {msg.data!r}")
            messages.append(item)
            if on_message is not None:
                result = on_message(item, self)
                if asyncio.iscoroutine(result):
                    await result
            if isinstance(item, dict) and _ends_prompt(item, prompt_id):
                return


def _ends_prompt(msg: dict, prompt_id: str) -> bool:
    data = msg.get("data") or {}
    if data.get("prompt_id") != prompt_id:
        return False
    if msg["type"] in ("execution_success", "execution_error", "execution_interrupted"):
        return True
    return msg["type"] == "executing" and data.get("node") is None


def status_of(entry: dict) -> str:
    return entry.get("status", {}).get("status_str", "?")


def status_messages(entry: dict) -> dict:
    """{event name: data} of a history entry's status messages."""
    return {name: data for name, data in entry.get("status", {}).get("messages", [])}


def error_message(entry: dict) -> str:
    err = status_messages(entry).get("execution_error")
    if not err:
        return f"status {status_of(entry)}, no execution_error"
    return f"{err.get('node_type')} (node {err.get('node_id')}): {err.get('exception_type')}: {err.get('exception_message')}"


def _write_paths_yaml(path: Path, custom_nodes: Path, extra_diffusion_models: Path):
    # base_path joins with relative entries; absolute entries (custom_nodes, the tmp
    # diffusion_models folder) are taken as they are by os.path.join.
    path.write_text(
        "deradiff_tests:\n"
        f"    base_path: {json.dumps(str(STANDIN_DIR))}\n"
        "    checkpoints: checkpoints\n"
        "    loras: loras\n"
        "    diffusion_models: |\n"
        "        diffusion_models\n"
        f"        {extra_diffusion_models}\n"
        f"    custom_nodes: {json.dumps(str(custom_nodes))}\n")


@pytest.fixture(scope="session")
def comfy_server(comfy_root):
    ensure_all_standins()
    root = Path(tempfile.mkdtemp(prefix="deradiff-server-"))
    custom_nodes = root / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / PACK_DIR_NAME).symlink_to(REPO, target_is_directory=True)
    for sub in ("output", "temp", "input", "user", "models/diffusion_models"):
        (root / sub).mkdir(parents=True)
    paths_yaml = root / "extra_model_paths.yaml"
    _write_paths_yaml(paths_yaml, custom_nodes, root / "models" / "diffusion_models")

    port = _free_port()
    log_path = root / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--extra-model-paths-config", str(paths_yaml),
           "--output-directory", str(root / "output"), "--temp-directory", str(root / "temp"),
           "--input-directory", str(root / "input"), "--user-directory", str(root / "user"),
           "--preview-method", "latent2rgb"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=str(comfy_root), stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    server = ComfyServer(f"http://127.0.0.1:{port}", root, log_path, proc)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            server.check_alive()
            try:
                if requests.get(server.base + "/object_info", timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer /object_info in {STARTUP_TIMEOUT} s; "
                                   f"log tail:\n{server.log_text()[-4000:]}")
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        log.close()
        # the log outlives the temporary directory, for a failed run's post-mortem
        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        shutil.copyfile(log_path, artifacts / "comfy-server.log")
        if os.environ.get("DERADIFF_SERVER_LOG_KEEP"):
            print(f"\nComfyUI test server files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
