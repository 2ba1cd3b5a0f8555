"""Workflows saved by the V1 nodes (tests/fixtures/v1_workflows, made by scripts/save_v1_fixtures.py) still
load and run unchanged, with the same outputs (issue 22: the nodes move to ComfyUI's V3 schema).

- ``test_stored_prompt_gives_the_golden_outputs``: each stored ``<NodeId>.api.json`` (the prompt the front end
  queued) runs on the test server and its latents (|Δ| <= 1e-4), images (<= 1/255) and UI outputs (text equal,
  numbers in it to 1e-4) match the golden ones of the running ComfyUI version; skipped when the fixture has no
  golden outputs for that version.
- ``test_saved_workflow_loads_in_front_end``: each ``<NodeId>.json`` dropped on the real front end's canvas
  (Chromium) loads with no missing node types or models, no node errors, no console errors, the widget values
  as saved, and ``graphToPrompt()`` gives the stored ``.api.json`` (class types, inputs and values per node).

Both use the session's test server (server_rig.comfy_server) with the committed tiny family linked into its
writable models folder.
"""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

import browser_helpers as bh
import object_info_compat as compat
from save_v1_fixtures import FIXTURES, GRAPHS, collect_outputs, png_pixels

NODE_IDS = list(GRAPHS)
pytestmark = pytest.mark.skipif(not bh.tiny_family_present(), reason="the fixtures run the committed tiny family, "
                                "and tiny_family/family.json is missing")


def test_every_node_has_a_fixture():
    # the pack's node ids, read from its mapping (importing it would clash with ComfyUI's own "nodes" module)
    mapping = (bh.REPO / "nodes" / "__init__.py").read_text().split("NODE_CLASS_MAPPINGS = {", 1)[1].split("}", 1)[0]
    assert sorted(NODE_IDS) == sorted(re.findall(r'"(\w+)":', mapping))
    for node_id in NODE_IDS:
        for suffix in (".json", ".api.json", ".expected.safetensors", ".expected.json"):
            assert (FIXTURES / f"{node_id}{suffix}").exists(), f"{node_id}{suffix} is missing"


@pytest.fixture(scope="module")
def tiny_server(comfy_server):
    bh.link_tiny_family(comfy_server.root / "models")  # the server's writable model folders
    return comfy_server


@pytest.fixture(scope="module")
def comfy_version(tiny_server):
    return tiny_server.get("/system_stats")["system"]["comfyui_version"]


# -- comparing outputs -------------------------------------------------------------------------

NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def ui_differences(got, want, where="ui") -> list[str]:
    """Where two UI outputs differ: structure and text exactly, numbers (also inside text) to 1e-4."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or sorted(got) != sorted(want):
            return [f"{where}: keys {sorted(got) if isinstance(got, dict) else got!r} != {sorted(want)}"]
        return [d for k in want for d in ui_differences(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where}: {got!r} != {want!r}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in ui_differences(g, w, f"{where}[{i}]")]
    if isinstance(want, str) and isinstance(got, str):
        if NUMBER.sub("#", got) != NUMBER.sub("#", want):
            return [f"{where}: text {got!r} != {want!r}"]
        pairs = zip((float(x) for x in NUMBER.findall(got)), (float(x) for x in NUMBER.findall(want)))
        return [f"{where}: {got!r} != {want!r}" for g, w in pairs if not math.isclose(g, w, rel_tol=1e-4, abs_tol=1e-4)][:1]
    if isinstance(want, (int, float)) and not isinstance(want, bool) and isinstance(got, (int, float)):
        return [] if math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4) else [f"{where}: {got!r} != {want!r}"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def tensor_differences(got: dict, want: dict) -> list[str]:
    if sorted(got) != sorted(want):
        return [f"outputs {sorted(got)} != golden {sorted(want)}"]
    found = []
    for key, expected in want.items():
        actual = got[key]
        if "/image_png/" in key:
            actual, expected, tol = png_pixels(actual).float(), png_pixels(expected).float(), 1.0  # 1/255 in 8 bit
        else:
            tol = 1e-4
        if actual.shape != expected.shape:
            found.append(f"{key}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
            continue
        delta = (actual - expected).abs().max().item() if expected.numel() else 0.0
        if not delta <= tol:
            found.append(f"{key}: max |Δ| {delta:.6g} > {tol:g}")
    return found


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_stored_prompt_gives_the_golden_outputs(node_id, tiny_server, comfy_version):
    from safetensors.torch import load_file
    golden = {k: v for k, v in load_file(str(FIXTURES / f"{node_id}.expected.safetensors")).items()
              if k.startswith(comfy_version + "/")}
    golden_ui = json.loads((FIXTURES / f"{node_id}.expected.json").read_text())
    if comfy_version not in golden_ui:
        pytest.skip(f"no golden outputs of {node_id} for ComfyUI {comfy_version} (have {sorted(golden_ui)}); "
                    "add them with scripts/save_v1_fixtures.py --golden-only under that ComfyUI")
    prompt = json.loads((FIXTURES / f"{node_id}.api.json").read_text())
    entry = tiny_server.run(prompt, timeout=300)
    tensors, ui = collect_outputs(entry, tiny_server.output_dir, comfy_version)
    problems = tensor_differences(tensors, golden) + ui_differences(ui, golden_ui[comfy_version])
    assert not problems, f"{node_id}: the stored V1 prompt no longer gives its golden outputs:\n" + "\n".join(problems)


def test_comparison_sees_changes():
    """The comparisons can fail: a changed latent, pixel, number or word is reported."""
    lat = torch.zeros(1, 4, 4, 4)
    assert tensor_differences({"v/latent/1/0": lat + 2e-4}, {"v/latent/1/0": lat})
    assert not tensor_differences({"v/latent/1/0": lat + 5e-5}, {"v/latent/1/0": lat})
    assert ui_differences({"6": {"text": ["mean 2.096 ± 0.2"]}}, {"6": {"text": ["mean 2.097 ± 0.2"]}})
    assert ui_differences({"6": {"text": ["mean 2.096 ± 0.2"]}}, {"6": {"text": ["best 2.096 ± 0.2"]}})
    assert not ui_differences({"3": {"curve": [1.5, 0.0]}}, {"3": {"curve": [1.5, 0.0]}})


# -- the front end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def front_end(tiny_server):
    missing = bh.browser_available()
    if missing:
        pytest.fail(f"the front-end test needs Chromium and Playwright: {missing}")
    from playwright.sync_api import sync_playwright
    from test_browser import Console
    tiny_server.http.post(tiny_server.base + "/api/settings", json=bh.UI_SETTINGS, timeout=30).raise_for_status()
    with sync_playwright() as p:
        context, profile = bh.launch_browser(p)
        try:
            page = context.new_page()
            console = Console(page)
            bh.open_front_end(page, tiny_server.base)
            yield page, console
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_saved_workflow_loads_in_front_end(node_id, front_end):
    from test_browser import DROP_JS, STATE_JS
    page, console = front_end
    console.mark()
    text = (FIXTURES / f"{node_id}.json").read_text()
    data = json.loads(text)
    seen = page.evaluate(DROP_JS, [node_id, text])  # as a user drops the file on the canvas
    assert seen["missingNodes"] == [], f"{node_id}: the front end reports missing nodes {seen['missingNodes']}"
    assert seen["missingModels"] == [], f"{node_id}: the front end reports missing models {seen['missingModels']}"
    state = page.evaluate(STATE_JS)
    # newer front ends report node ids as strings, the saved file has numbers: compare as text
    assert sorted(str(n["id"]) for n in state["nodes"]) == sorted(str(n["id"]) for n in data["nodes"])
    for node in state["nodes"]:
        assert node["registered"] and not node["hasErrors"], f"{node_id}: {node['type']} did not load as a real node"
    saved = {str(n["id"]): n for n in state["saved"]["nodes"]}
    for node in data["nodes"]:
        # a node without widgets is saved with no widgets_values or an empty list: the same
        before, after = node.get("widgets_values") or [], saved[str(node["id"])].get("widgets_values") or []
        # inputs added after the V1 file come last, at their defaults (a display box's '' that lands on
        # one is reset by js/deradiff.js)
        added = list(compat.ADDED_INPUTS.get(node["type"], {}).values())
        kept = after[:len(after) - len(added)]
        assert after[len(kept):] == added, f"{node_id}: {node['type']}'s added inputs load as {after[len(kept):]}"
        # V1 files end with the '' of the pack's display boxes (β/λ line, plot, summary), which are no
        # longer saved: those, and only those, may be gone; every real widget keeps its value
        dropped = before[len(kept):]
        assert kept == before[:len(kept)] and all(v == "" for v in dropped), (
            f"{node_id}: {node['type']}'s widget values changed on load: {before} -> {after}")
        assert not dropped or node["type"].startswith("DeRaDiff"), (node_id, node["type"], dropped)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    stored = json.loads((FIXTURES / f"{node_id}.api.json").read_text())
    assert sorted(prompt) == sorted(stored), f"{node_id}: prompt nodes {sorted(prompt)} != stored {sorted(stored)}"
    for key, want in stored.items():
        got = prompt[key]
        assert got["class_type"] == want["class_type"], (key, got["class_type"], want["class_type"])
        # inputs added after the V1 file are queued at their defaults (the same run as without them)
        want_inputs = {**compat.ADDED_INPUTS.get(want["class_type"], {}), **want["inputs"]}
        assert got["inputs"] == want_inputs, (
            f"{node_id}: node {key} ({want['class_type']}) queues {got['inputs']}, the saved prompt had {want['inputs']}")
    assert console.errors() == [], f"{node_id}: errors while loading: {console.errors()}"
