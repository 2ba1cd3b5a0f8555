"""A real ComfyUI HTTP server with this pack loaded, for the workflow-level tests.

``comfy_server`` (session scope) starts the ComfyUI that conftest's ``comfy_root`` provides
through the project's one launcher, ``scripts/comfy_server.py`` (read its docstring for the
layout: the pack symlinked under ``<tmp>/custom_nodes`` and handed to ComfyUI by the
``custom_nodes:`` key of an extra-model-paths YAML, models from the stand-in folder plus
``<tmp>/models/<folder>`` for files a test writes while the server runs, output/temp/input/user
under ``<tmp>``, ``--cpu``, and extra server arguments from ``DERADIFF_SERVER_ARGS``, e.g.
``DERADIFF_SERVER_ARGS="--cache-ram"``). Previews are asked for as ``latent2rgb``.

The fixture yields a :class:`ServerClient` (``requests`` for HTTP, ``aiohttp`` for the websocket)
and stops the server at the end of the session. The server's stdout + stderr go to
``<tmp>/server.log`` (copied to ``test-artifacts/comfy-server.log`` at the end); set
DERADIFF_SERVER_LOG_KEEP=1 to leave the temporary directory in place afterwards.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from comfy_server import PACK_DIR_NAME, ComfyServer  # noqa: F401  (PACK_DIR_NAME: re-exported for the tests)
from conftest import REPO, STANDIN_DIR, ensure_all_standins


class PromptFailed(AssertionError):
    """A prompt was refused by /prompt or did not finish successfully."""

    def __init__(self, message, entry=None, response=None):
        super().__init__(message)
        self.entry = entry
        self.response = response


class ServerClient:
    """Client for the test server: HTTP helpers, history and websocket messages, on top of
    the launcher (``server``, a started scripts/comfy_server.py ComfyServer)."""

    def __init__(self, server: ComfyServer):
        self.server = server
        self.base = server.url
        self.root = server.workdir
        self.log_path = server.log_path
        self.process = server.process
        self.output_dir = server.output_dir
        self.input_dir = server.input_dir
        self.extra_diffusion_models = server.extra_models / "diffusion_models"
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

    def free(self):
        """POST /free: ComfyUI unloads every model and drops its node cache before its next prompt
        (the same as the Manager's "Unload models" / "Free model and node cache" buttons). Called
        between test modules, so one module's models do not stay resident beside the next one's."""
        try:
            self.http.post(self.base + "/free", json={"unload_models": True, "free_memory": True},
                           timeout=30).raise_for_status()
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
        self.server.check_alive()

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


def combo_choices(spec: list) -> list:
    """The choices of a combo input in /object_info: V3 nodes write ("COMBO", {"options": [...]}),
    V1 nodes ([...], {})."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


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


@pytest.fixture(scope="session")
def comfy_server(comfy_root):
    ensure_all_standins()
    root = Path(tempfile.mkdtemp(prefix="deradiff-server-"))
    server = ComfyServer(comfy_root, STANDIN_DIR, root, extra_args=["--preview-method", "latent2rgb"],
                         log_name="server.log")
    # test-only custom nodes next to the pack (tests/family_nodes: conditioning of a family's shapes for
    # families whose text encoders are too large here); the shipped pack never registers them
    server.custom_nodes.mkdir(parents=True, exist_ok=True)
    (server.custom_nodes / "deradiff_test_nodes").symlink_to(REPO / "tests" / "family_nodes", target_is_directory=True)
    try:
        server.start()
        yield ServerClient(server)
    finally:
        server.stop()
        # the log outlives the temporary directory, for a failed run's post-mortem
        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        if server.log_path.exists():
            shutil.copyfile(server.log_path, artifacts / "comfy-server.log")
        if os.environ.get("DERADIFF_SERVER_LOG_KEEP"):
            print(f"\nComfyUI test server files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
