"""The example workflows in the real ComfyUI front end, in headless Chromium.

A real ComfyUI server runs with this pack installed (scripts/comfy_server.py) and a models
folder whose files carry the public names the workflows expect (v1-5-pruned-emaonly.safetensors,
sd_xl_base_1.0.safetensors, the Diffusion-DPO UNets), each a symlink to the stand-in model of
the same family, plus the real tiny family's files (deradiff_tiny/...). Debian's Chromium (driven by Playwright, no browser download) opens the real
front end and, for every file in example_workflows/:

- drops the file on the canvas, as a user does, and checks that the front end reports no
  missing node and no missing model, that every node type is registered, that every widget
  the file names exists on the loaded node and kept the file's value, and that every combo
  value is one of the choices the server offers;
- checks the pack's JS extension ran (the "λ = …" info line of DeRaDiff KSampler);
- lets the front end convert the graph to an API prompt (``app.graphToPrompt()``) and checks
  that prompt against ``/object_info``: class types, input names, link types, combo values,
  numeric ranges;
- makes it small (64x64, 2 steps), presses Run, waits for the prompt to finish and checks the
  saved images, the images shown on the canvas, the λ Schedule's plot and the info line the
  server sent back;
- runs ``deradiff_tiny_family`` as saved (32x32, 20 steps) on the committed tiny family
  (scripts/tiny_family.py, materialized into the server's models folder; skipped while
  tiny_family/family.json is missing) and checks its sweep grid holds real images: a labelled
  cell per image, the reference's white circle on grey, and the family's reward (colourfulness)
  higher at λ = 2 than at λ = 0;
- keeps screenshots in test-artifacts/browser/ (DERADIFF_UPDATE_EXAMPLE_IMAGES=1 also writes the
  template thumbnails example_workflows/*.jpg and the README screenshots docs/*.png).

Every example workflow runs in both node renderers: LiteGraph (classic) and the Vue renderer ("Nodes 2.0",
setting Comfy.VueNodes.Enabled, set through the front end's settings API before the load), with what a user
sees checked in each (the β/λ line, the schedule plot and its redraw on resize, the λ Search summary, the
ESS line, no overlapping or clipped widgets) and screenshots of both (<name>-vue-*.png for Vue). The tiny
family's run is repeated in Vue only with DERADIFF_BROWSER_BOTH_RENDERERS_SLOW=1. The subgraph blueprint
(subgraphs/) is found in the node search and run.

It also checks the server's template routes and the templates browser (Templates → Extensions →
comfyui-deradiff shows every workflow with its thumbnail and loads it on click), and that no
error reached the browser console while workflows were loaded and run.

Needs /usr/bin/chromium (apt-get install -y chromium) and the Python package playwright.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from browser_helpers import (ARTIFACTS, DOCS, EXAMPLES, FIT_VIEW_JS, FRAME_JS, LOCAL_MODEL_FILES, MODEL_FILES,
                             NEEDS_TINY_FAMILY, PACK_DIR_NAME, THUMBNAILS, WORKFLOWS,
                             browser_available, comfy_with_pack, launch_browser, model_files_used, open_front_end,
                             prompt_problems, tiny_family_present, NOT_HERE, uses_files_not_here)

SHOTS = ARTIFACTS / "browser"
UPDATE_IMAGES = os.environ.get("DERADIFF_UPDATE_EXAMPLE_IMAGES") == "1"
EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))
# README screenshots (docs/<name>.png): the graph as loaded, or after its run
DOC_IMAGES = {"deradiff_sd15_dpo": "loaded", "deradiff_lambda_sweep_grid": "ran", "deradiff_lambda_schedule": "ran",
              "deradiff_lambda_search": "ran", "deradiff_tiny_family": "ran"}
RUN_SIZE = 64
RUN_STEPS = 2
# Workflows run as saved, not made small: the tiny family's UNet was trained at 32×32 (SHRINK_JS would
# sample 64×64, a size it never saw) and its 20 steps on 4×4 latents take about a minute on a CPU.
RUN_AS_SAVED = set(NEEDS_TINY_FAMILY)


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(comfy_root, tmp_path_factory):
    missing = browser_available()
    if missing:
        pytest.fail(f"the browser test needs Chromium and Playwright: {missing}")
    with comfy_with_pack(comfy_root, tmp_path_factory.mktemp("browser")) as srv:
        yield srv
    (ARTIFACTS).mkdir(exist_ok=True)
    shutil.copy(srv.log_path, ARTIFACTS / "comfy-server-browser.log")


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


class Console:
    """Everything the page reported: console messages, uncaught errors, failed requests."""

    # Requests the front end makes that this server does not serve; not errors of the pack.
    OPTIONAL = ("/user.css", "/api/userdata", "api.comfy.org")

    def __init__(self, page):
        self.entries = []
        self.start = 0
        page.on("console", lambda m: self.entries.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.entries.append(("pageerror", str(e))))
        page.on("response", lambda r: r.status >= 400 and not any(o in r.url for o in self.OPTIONAL)
                and self.entries.append(("http", f"{r.status} {r.request.method} {r.url}")))
        # a request the page cancelled itself (ERR_ABORTED: the core templates' previews when the
        # templates dialog closes) is no error, unless it was one of the pack's
        page.on("requestfailed", lambda r: not any(o in r.url for o in self.OPTIONAL)
                and ("ERR_ABORTED" not in (r.failure or "") or "deradiff" in r.url)
                and self.entries.append(("requestfailed", f"{r.url} {r.failure}")))

    def mark(self):
        self.start = len(self.entries)

    def errors(self, since_mark=True):
        found = []
        for kind, text in self.entries[self.start if since_mark else 0:]:
            if kind == "error" and text.startswith("Failed to load resource"):
                continue  # the request itself is judged by its "http"/"requestfailed" entry
            if kind in ("error", "pageerror", "http", "requestfailed"):
                found.append(f"{kind}: {text}")
        return found


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        context, profile = launch_browser(p)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def ui(browser, server):
    page = browser.new_page()
    console = Console(page)
    open_front_end(page, server.url)
    # open_front_end waited for the app; errors logged while it started are the front end's own
    # (it looks for the network and user files) unless they name the pack.
    page.wait_for_timeout(500)
    startup = [e for e in console.errors(since_mark=False) if "deradiff" in e.lower()]
    assert not startup, f"errors about the pack while the front end started: {startup}"
    console.mark()
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield page, console
    (SHOTS / "console.log").write_text("\n".join(f"{k}: {t}" for k, t in console.entries))


# -- front-end snippets ---------------------------------------------------------------------

# Drops a workflow file on the canvas (what a user does with a .json file) and records what
# the front end reports: missing node types and missing models (its own dialogs).
DROP_JS = r"""
async ([name, text]) => {
  const seen = {missingNodes: [], missingModels: []};
  const origNodes = app.showMissingNodesError, origModels = app.showMissingModelsError;
  app.showMissingNodesError = function (m) {
    seen.missingNodes.push(...m.map((x) => (typeof x === "string" ? x : x.type)));
    return origNodes.apply(this, arguments);
  };
  app.showMissingModelsError = function (m) {
    seen.missingModels.push(...m.map((x) => `${x.directory}/${x.name}`));
    return origModels.apply(this, arguments);
  };
  try {
    app.graph.clear();
    const file = new File([text], `${name}.json`, {type: "application/json"});
    const dt = new DataTransfer();
    dt.items.add(file);
    const target = document.querySelector("#graph-canvas") ?? app.canvasEl;
    target.dispatchEvent(new DragEvent("drop", {bubbles: true, cancelable: true, dataTransfer: dt}));
    const t0 = Date.now();
    while (app.graph.nodes.length === 0 && Date.now() - t0 < 20000) await new Promise((r) => setTimeout(r, 50));
    await new Promise((r) => setTimeout(r, 500));
    // Newer front ends (1.4x) no longer call app.showMissingModelsError: they check the models in
    // the background and keep what is missing in their "missingModel" store (the right side panel).
    const store = document.querySelector("#vue-app")?.__vue_app__?.config.globalProperties.$pinia?._s.get("missingModel");
    if (store) {
      const t1 = Date.now();
      let missing = [];
      while (Date.now() - t1 < 2500) {
        missing = (store.missingModelCandidates ?? []).filter((c) => c.isMissing !== false);
        if (missing.length) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      seen.missingModels.push(...missing.map((c) => `${c.directory}/${c.name}`));
    }
  } finally {
    app.showMissingNodesError = origNodes;
    app.showMissingModelsError = origModels;
  }
  return seen;
}
"""

# The loaded graph as the front end holds it.
STATE_JS = r"""
() => {
  const saved = app.graph.serialize();
  return {
    saved,
    nodes: app.graph.nodes.map((n) => ({
      id: n.id, type: n.type, title: n.title, registered: n.type in LiteGraph.registered_node_types, hasErrors: !!n.has_errors,
      widgets: (n.widgets ?? []).map((w) => ({name: w.name, type: w.type, value: w.value,
        choices: w.type === "combo" ? (typeof w.options.values === "function" ? w.options.values() : w.options.values) : null})),
      info: n.widgets?.find((w) => w.name === "deradiff_info")?.element?.textContent ?? null,
    })),
  };
}
"""

INFO_BOX_JS = r"""
() => [...document.querySelectorAll(".deradiff-beta")].map((e) => {
  const r = e.getBoundingClientRect();
  const style = getComputedStyle(e.closest(".dom-widget") ?? e);
  return {text: e.textContent, w: r.width, h: r.height, visible: style.display !== "none" && style.visibility !== "hidden"};
})
"""

# The λ Schedule's plot, drawn by the pack's JS on a canvas: how much of it is the curve's colour,
# and a digest of all its pixels.
SCHEDULE_CANVAS_JS = r"""
(id) => {
  const n = app.graph.getNodeById(id);
  const box = n?.widgets?.find((w) => w.name === "deradiff_preview")?.element;
  const c = box?.querySelector("canvas") ?? box;
  if (!c || !c.width) return null;
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let curve = 0, digest = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.abs(d[i] - 255) + Math.abs(d[i + 1] - 170) + Math.abs(d[i + 2] - 60) < 40) curve++;
    digest = (digest * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) % 1000000007;
  }
  const r = c.getBoundingClientRect();
  return {curve, digest, w: r.width, h: r.height, pw: c.width, ph: c.height, cw: c.clientWidth, ch: c.clientHeight};
}
"""

# Sets a widget as the user would (value, then the widget's callback).
SET_WIDGET_JS = r"""
([id, name, value]) => {
  const w = app.graph.getNodeById(id).widgets.find((w) => w.name === name);
  w.value = value;
  w.callback?.(value, app.canvas, app.graph.getNodeById(id));
  app.graph.setDirtyCanvas(true, true);
}
"""

PROMPT_JS = "async () => (await app.graphToPrompt()).output"

# What a user does before pressing Run here: small images, few steps.
SHRINK_JS = r"""
([size, steps]) => {
  for (const n of app.graph.nodes) for (const w of n.widgets ?? []) {
    if (n.type === "EmptyLatentImage" && (w.name === "width" || w.name === "height")) w.value = size;
    if (w.name === "steps") w.value = steps;
    if (n.type === "DeRaDiffLambdaSearch" && w.name === "budget") w.value = 4;
  }
  app.graph.setDirtyCanvas(true, true);
}
"""

# A dialog: PrimeVue's (front end 1.2x-1.3x) or any ARIA dialog (1.4x's own dialogs and modals).
DIALOG = ".p-dialog, [role=dialog], [role=alertdialog]"

# Warning and error toasts ("Invalid workflow against zod schema", "Prompt outputs failed
# validation", ...) and open dialogs (missing nodes or models, error reports).
ALERTS_JS = r"""
(dialogs) => ({
  toasts: [...document.querySelectorAll(".p-toast-message")]
    .filter((e) => /p-toast-message-(error|warn)/.test(e.className)).map((e) => e.innerText.slice(0, 800)),
  dialogs: [...document.querySelectorAll(dialogs)].filter((e) => e.getClientRects().length)
    .filter((e, i, all) => !all.some((o) => o !== e && o.contains(e)))  // a dialog inside another: once
    .map((e) => e.innerText.slice(0, 800)),
})
"""

CLOSE_ALERTS_JS = r"""
(dialogs) => {
  for (const b of document.querySelectorAll(".p-toast-close-button, .p-dialog .p-dialog-close-button")) b.click();
  for (const d of document.querySelectorAll(dialogs))
    if (d.getClientRects().length) d.querySelector("button[aria-label='Close'], button[aria-label='close']")?.click();
}
"""


def assert_no_alerts(page, when):
    alerts = page.evaluate(ALERTS_JS, DIALOG)
    assert alerts == {"toasts": [], "dialogs": []}, f"the front end showed alerts {when}: {alerts}"


# -- the two node renderers ----------------------------------------------------------------

# LiteGraph draws nodes on its canvas ("classic"); the Vue renderer ("Nodes 2.0", setting
# Comfy.VueNodes.Enabled, in front ends 1.27.1 and later: 1.32.9 with ComfyUI 0.3.75 and 1.49.6 with 0.33.0)
# makes every node a DOM element and moves the pack's DOM boxes into it.
RENDERERS = ["litegraph", "vue"]
# Every example workflow runs in both renderers. Those that take long (the tiny family's 20 steps) run
# in the second renderer only with DERADIFF_BROWSER_BOTH_RENDERERS_SLOW=1: the Vue run is a second copy of
# a minute of sampling that checks nothing the shorter workflows' Vue runs do not.
SLOW_IN_BOTH = os.environ.get("DERADIFF_BROWSER_BOTH_RENDERERS_SLOW") == "1"
SLOW_WORKFLOWS = {"deradiff_tiny_family"}

SET_RENDERER_JS = r"""
async (vue) => {
  await app.extensionManager.setting.set("Comfy.VueNodes.Enabled", vue);
  return app.extensionManager.setting.get("Comfy.VueNodes.Enabled");
}
"""


def use_renderer(page, renderer):
    """Switches the renderer through the front end's settings API (before a workflow is loaded)."""
    got = page.evaluate(SET_RENDERER_JS, renderer == "vue")
    assert got is (renderer == "vue"), f"the setting Comfy.VueNodes.Enabled did not take: {got}"
    page.wait_for_timeout(300)


def wait_for_renderer(page, renderer, timeout=20_000):
    """After a load: in the Vue renderer every node of the graph is a DOM element; in LiteGraph none is."""
    if renderer == "vue":
        page.wait_for_function("() => app.graph.nodes.length > 0 && app.graph.nodes.every("
                               "(n) => document.querySelector(`[data-node-id='${n.id}']`))", timeout=timeout)
    else:
        page.wait_for_function("() => !document.querySelector('[data-node-id]')", timeout=timeout)
    page.wait_for_timeout(300)


# What a user sees of each node's widgets. LiteGraph: the layout LiteGraph computed (widget.y and
# computedHeight in node units, after a draw). Vue: the DOM rectangles of the node and of its widget rows,
# and of the pack's own boxes (in page pixels).
LAYOUT_JS = r"""
(vue) => {
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  const out = [];
  if (!vue) {
    for (const n of app.graph.nodes) {
      if (n.flags?.collapsed) continue;
      const widgets = (n.widgets ?? []).filter((w) => !w.hidden && w.type !== "hidden" && !w.options?.hidden)
        .map((w) => ({name: w.name, top: w.y, bottom: w.y + (w.computedHeight
          ?? (w.computeSize ? w.computeSize(n.size[0])[1] : LiteGraph.NODE_WIDGET_HEIGHT))}));
      // the pack's boxes as drawn (page pixels) against the node as drawn
      const [x, y] = app.canvasPosToClientPos(n.pos), s = app.canvas.ds.scale;
      const contents = (n.widgets ?? []).filter((w) => w.element?.isConnected && /deradiff/.test(w.element.className)
        && w.element.getClientRects().length).map((w) => {
          const e = w.element.firstElementChild ?? w.element, r = e.getBoundingClientRect();
          return {name: w.name, left: r.left, right: r.right, top: r.top, bottom: r.bottom};
        });
      out.push({id: String(n.id), type: n.type, box: {left: 0, right: n.size[0], top: 0, bottom: n.size[1]}, widgets,
                client_box: {left: x, top: y, right: x + n.size[0] * s, bottom: y + n.size[1] * s}, contents});
    }
    return out;
  }
  const rect = (e) => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; };
  for (const n of app.graph.nodes) {
    const el = document.querySelector(`[data-node-id='${n.id}']`);
    if (!el) { out.push({id: String(n.id), type: n.type, missing: true}); continue; }
    const rows = [...el.querySelectorAll(".lg-node-widget")]
      .filter((r) => r.getClientRects().length && !r.parentElement.closest(".lg-node-widget"));
    const widgets = rows.map((r, i) => ({name: `row ${i}: ${r.innerText.slice(0, 40)}`, ...rect(r)}));
    for (const box of el.querySelectorAll(".deradiff-beta, .deradiff-summary, .deradiff-schedule-box"))
      widgets.push({name: box.className, ...rect(box), inner: true});
    out.push({id: String(n.id), type: n.type, box: rect(el), widgets});
  }
  return out;
}
"""


def layout_problems(layout) -> list[str]:
    """Widgets of a node that overlap one another, or reach past the node's bounds (clipped)."""
    problems = []
    for node in layout:
        where = f"{node['type']} {node['id']}"
        if node.get("missing"):
            problems.append(f"{where}: no DOM element in the Vue renderer")
            continue
        box, rows = node["box"], node["widgets"]
        for w in rows:
            if w["bottom"] - w["top"] <= 0:
                continue
            if w["top"] < box["top"] - 1 or w["bottom"] > box["bottom"] + 1 or \
                    w.get("left", box["left"]) < box["left"] - 1 or w.get("right", box["right"]) > box["right"] + 1:
                problems.append(f"{where}: widget {w['name']!r} {w} is clipped by the node's bounds {box}")
        cbox = node.get("client_box")
        for c in node.get("contents", []):  # what the pack's boxes show, as drawn
            if c["top"] < cbox["top"] - 2 or c["bottom"] > cbox["bottom"] + 2 or c["left"] < cbox["left"] - 2 \
                    or c["right"] > cbox["right"] + 2:
                problems.append(f"{where}: the text of {c['name']!r} {c} reaches past the node {cbox}")
        flat = sorted((w for w in rows if not w.get("inner") and w["bottom"] - w["top"] > 0), key=lambda w: w["top"])
        for a, b in zip(flat, flat[1:]):
            if b["top"] < a["bottom"] - 1:
                problems.append(f"{where}: widgets {a['name']!r} and {b['name']!r} overlap ({a['bottom']} > {b['top']})")
    return problems


def assert_layout(page, renderer, when):
    problems = layout_problems(page.evaluate(LAYOUT_JS, renderer == "vue"))
    assert not problems, f"overlapping or clipped widgets in the {renderer} renderer {when}:\n" + "\n".join(problems)


# The images a SaveImage node shows: LiteGraph keeps them on the node (node.imgs, drawn on its canvas); the
# Vue renderer shows them as <img> elements in the node.
IMAGES_SHOWN_JS = r"""
([id, vue]) => {
  if (!vue) {
    const n = app.graph.getNodeById(id);
    return !!(n?.imgs?.length && n.imgs.every((i) => i.complete && i.naturalWidth > 0));
  }
  const imgs = [...(document.querySelector(`[data-node-id='${id}']`)?.querySelectorAll("img") ?? [])];
  return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0 && i.getClientRects().length);
}
"""


# -- helpers -------------------------------------------------------------------------------

def run_in_browser(page, server) -> dict:
    """Presses the front end's Run button; the /history entry of the prompt it queued, once finished."""
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST",
                              timeout=60_000) as response:
        page.locator("button:has-text('Run')").first.click()
    assert response.value.status == 200, response.value.text()
    return server.wait(response.value.json()["prompt_id"], timeout=600)


def forget_cached_outputs(server):
    """Makes the next prompt run every node again: the same workflow run in the other renderer would
    otherwise come from the server's cache, without the nodes' ui outputs the pack's boxes show."""
    server.post("/free", {"free_memory": True, "unload_models": False})
    time.sleep(1.5)  # the server's worker applies the flag when it next wakes (every second when idle)


def load_example(page, name):
    return page.evaluate(DROP_JS, [name, (EXAMPLES / f"{name}.json").read_text()])


def screenshot(page, path: Path, crop_graph=False, frame=None):
    """The page; or, with the UI hidden (focus mode), the whole graph fitted to the canvas
    (crop_graph) or a square around the nodes of the types in ``frame``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (crop_graph or frame):
        page.screenshot(path=str(path))
        return path
    toggle = "() => app.extensionManager.command.execute('Workspace.ToggleFocusMode')"
    page.evaluate(CLOSE_ALERTS_JS, DIALOG)
    page.evaluate(toggle)
    ds = page.evaluate("() => ({scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset]})")
    try:
        page.wait_for_timeout(400)
        if frame:
            x0, y0, x1, y1 = page.evaluate(FRAME_JS, [frame, 1.12])
            pad = 0
        else:
            x0, y0, x1, y1 = page.evaluate(FIT_VIEW_JS, 0.92)
            pad = 16
        page.wait_for_timeout(400)
        vw, vh = page.viewport_size["width"], page.viewport_size["height"]
        x0, y0 = max(0, x0 - pad), max(0, y0 - pad)
        x1, y1 = min(vw, x1 + pad), min(vh, y1 + pad)
        page.screenshot(path=str(path), clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
    finally:
        page.evaluate(toggle)
        page.evaluate("(ds) => { app.canvas.ds.scale = ds.scale; app.canvas.ds.offset = ds.offset; "
                      "app.canvas.setDirty(true, true); }", ds)
    return path


def write_thumbnail(png: Path, jpg: Path, size=512):
    """A square JPG (the templates browser shows .jpg thumbnails, in square cards)."""
    img = Image.open(png).convert("RGB")
    side = max(img.size)
    square = Image.new("RGB", (side, side), img.getpixel((2, 2)))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    square.resize((size, size), Image.LANCZOS).save(jpg, "JPEG", quality=88, optimize=True)


def write_doc_image(png: Path, dest: Path, max_width=1400):
    img = Image.open(png).convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.save(dest, "PNG", optimize=True)


def expected_info_text(lam, beta):
    """What js/deradiff.js shows under λ before a run (kept independent of the JS on purpose)."""
    lam_txt = f"{lam:g}"
    role = ("reference model" if lam == 0 else "aligned model" if lam == 1
            else "interpolating (stronger KL)" if lam < 1 else "extrapolating (weaker KL)")
    if not beta:
        return f"λ = {lam_txt}: {role}"
    if lam == 0:
        return "λ = 0: reference model (β/λ = ∞)"
    return f"λ = {lam_txt}: {role}, emulates β/λ = {float(f'{beta / lam:.4g}'):g} (trained at β = {beta:g})"


def node_of(data, node_type):
    return [n for n in data["nodes"] if n["type"] == node_type]


def match_nodes(file_nodes, graph_nodes):
    """The file's node id -> the node the front end holds for it (a dict from STATE_JS).

    By id where the graph has a node of the same type under that id (ids compared as text:
    front end 1.4x keeps the loaded ids as strings, ``serialize()`` writes numbers); the rest by
    type, the same title first, in order (a front end that renumbers nodes on load). A file node
    with no counterpart is left out (the caller reports it)."""
    matched, used = {}, set()
    by_id = {str(n["id"]): n for n in graph_nodes}
    for node in file_nodes:
        got = by_id.get(str(node["id"]))
        if got is not None and got["type"] == node["type"]:
            matched[node["id"]] = got
            used.add(str(got["id"]))
    for node in file_nodes:
        if node["id"] in matched:
            continue
        free = [n for n in graph_nodes if n["type"] == node["type"] and str(n["id"]) not in used]
        titled = [n for n in free if node.get("title") and n.get("title") == node["title"]]
        if titled or free:
            got = (titled or free)[0]
            matched[node["id"]] = got
            used.add(str(got["id"]))
    return matched


# -- the prompt check itself (no browser) ----------------------------------------------------

FAKE_INFO = {
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}]}}, "output": ["MODEL", "CLIP"]},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}], "steps": ["INT", {"min": 1, "max": 100}],
                                       "lambda": ["FLOAT", {"min": 0.0, "max": 10.0}],
                                       "mode": ["COMBO", {"options": ["x", "y"]}]},
                          "optional": {"labels": ["STRING", {"forceInput": True}]}},
                "output": ["LATENT"]},
}
GOOD_PROMPT = {"1": {"class_type": "Loader", "inputs": {"name": "a.safetensors"}},
               "2": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "steps": 4, "lambda": 1.5, "mode": "x"}}}


@pytest.mark.parametrize("change, expected", [
    (lambda p: p["2"]["inputs"].__setitem__("lam", p["2"]["inputs"].pop("lambda")), "'lam' is not an input"),
    (lambda p: p["2"]["inputs"].pop("steps"), "required input 'steps' is missing"),
    (lambda p: p["2"]["inputs"].__setitem__("steps", 0), "below its minimum"),
    (lambda p: p["2"]["inputs"].__setitem__("steps", 2.5), "not an integer"),
    (lambda p: p["2"]["inputs"].__setitem__("lambda", 11.0), "above its maximum"),
    (lambda p: p["2"]["inputs"].__setitem__("mode", "z"), "'mode' = 'z' is not one of"),
    (lambda p: p["1"]["inputs"].__setitem__("name", "c.safetensors"), "is not one of its 2 choices"),
    (lambda p: p["2"]["inputs"].__setitem__("model", ["1", 1]), "(MODEL) is linked to output 1 of Loader (CLIP)"),
    (lambda p: p["2"]["inputs"].__setitem__("model", ["9", 0]), "node 9, which is not in the prompt"),
    (lambda p: p["2"]["inputs"].__setitem__("labels", "typed in"), "must be linked (forceInput)"),
    (lambda p: p["2"].__setitem__("class_type", "SamplerV2"), "class_type is not in /object_info"),
])
def test_prompt_problems_finds(change, expected):
    assert prompt_problems(GOOD_PROMPT, FAKE_INFO) == []
    prompt = json.loads(json.dumps(GOOD_PROMPT))
    change(prompt)
    problems = prompt_problems(prompt, FAKE_INFO)
    assert any(expected in p for p in problems), problems


def test_match_nodes_by_id_then_by_type_and_title():
    file_nodes = [{"id": 1, "type": "Note"}, {"id": 3, "type": "CLIPTextEncode", "title": "Positive prompt"},
                  {"id": 4, "type": "CLIPTextEncode", "title": "Negative prompt"}, {"id": 6, "type": "KSampler"}]
    # ids kept, as strings (front end 1.4x)
    same = [{"id": str(n["id"]), "type": n["type"], "title": n.get("title", n["type"])} for n in file_nodes]
    assert {k: v["id"] for k, v in match_nodes(file_nodes, same).items()} == {1: "1", 3: "3", 4: "4", 6: "6"}
    # renumbered (and reordered): by type, the same title first
    renumbered = [{"id": 10, "type": "KSampler", "title": "KSampler"},
                  {"id": 11, "type": "CLIPTextEncode", "title": "Negative prompt"},
                  {"id": 12, "type": "CLIPTextEncode", "title": "Positive prompt"},
                  {"id": 13, "type": "Note", "title": "Note"}]
    assert {k: v["id"] for k, v in match_nodes(file_nodes, renumbered).items()} == {1: 13, 3: 12, 4: 11, 6: 10}
    # a node the graph lost is left out
    assert 6 not in match_nodes(file_nodes, renumbered[1:])


def test_layout_problems_finds_overlapping_and_clipped_widgets():
    box = {"left": 0, "right": 300, "top": 0, "bottom": 200}
    fine = [{"id": "1", "type": "T", "box": box, "widgets": [
        {"name": "a", "top": 30, "bottom": 54}, {"name": "b", "top": 54, "bottom": 90},
        {"name": "deradiff-beta", "top": 60, "bottom": 80, "left": 10, "right": 290, "inner": True}]}]
    assert layout_problems(fine) == []
    overlap = json.loads(json.dumps(fine))
    overlap[0]["widgets"][1]["top"] = 40
    assert any("overlap" in p for p in layout_problems(overlap))
    clipped = json.loads(json.dumps(fine))
    clipped[0]["widgets"][1]["bottom"] = 230
    assert any("clipped" in p for p in layout_problems(clipped))
    wide = json.loads(json.dumps(fine))
    wide[0]["widgets"][2]["right"] = 320
    assert any("clipped" in p for p in layout_problems(wide))
    assert any("no DOM element" in p for p in layout_problems([{"id": "2", "type": "T", "missing": True}]))
    drawn = json.loads(json.dumps(fine))
    drawn[0].update(client_box={"left": 100, "right": 400, "top": 100, "bottom": 300},
                    contents=[{"name": "deradiff_info", "left": 110, "right": 390, "top": 280, "bottom": 320}])
    assert any("reaches past the node" in p for p in layout_problems(drawn))


# -- the server's template routes ---------------------------------------------------------

def test_examples_exist():
    assert set(EXAMPLE_NAMES) == set(WORKFLOWS), (
        f"example_workflows/ holds {EXAMPLE_NAMES}, tests/browser_helpers.py builds {sorted(WORKFLOWS)}")


def test_workflow_template_routes(server):
    listed = server.get("/workflow_templates")
    assert sorted(listed.get(PACK_DIR_NAME, [])) == EXAMPLE_NAMES, listed
    import urllib.request
    for name in EXAMPLE_NAMES:
        base = f"{server.url}/api/workflow_templates/{PACK_DIR_NAME}/{name}"
        with urllib.request.urlopen(base + ".json") as r:
            assert json.loads(r.read()) == json.loads((EXAMPLES / f"{name}.json").read_text())
        with urllib.request.urlopen(base + ".jpg") as r:
            assert r.headers["Content-Type"] == "image/jpeg"
            assert r.read() == (EXAMPLES / f"{name}.jpg").read_bytes()


# -- each example workflow in the browser -------------------------------------------------

@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_workflow_in_browser(name, renderer, ui, server, object_info):
    page, console = ui
    if renderer != RENDERERS[0] and name in SLOW_WORKFLOWS and not SLOW_IN_BOTH:
        pytest.skip(f"{name} takes about a minute to sample: it runs in the {RENDERERS[0]} renderer, and in "
                    f"{renderer} only with DERADIFF_BROWSER_BOTH_RENDERERS_SLOW=1")
    use_renderer(page, renderer)
    vue = renderer == "vue"
    tag = "" if renderer == RENDERERS[0] else f"-{renderer}"  # screenshot names: LiteGraph's as before
    console.mark()
    page.evaluate(CLOSE_ALERTS_JS, DIALOG)  # left open by an earlier test that failed
    page.wait_for_timeout(300)
    assert_no_alerts(page, "before the workflow was loaded")
    data = json.loads((EXAMPLES / f"{name}.json").read_text())
    if name in NEEDS_TINY_FAMILY and not tiny_family_present():
        pytest.skip(f"{name} runs the committed tiny family, and tiny_family/family.json is missing "
                    "(build it: python scripts/tiny_family.py build)")

    # 1. drop the file on the canvas
    seen = load_example(page, name)
    wait_for_renderer(page, renderer)
    assert seen["missingNodes"] == [], f"the front end reports missing nodes: {seen['missingNodes']}"
    # newer front ends also report loader values absent on the server: only the NOT_HERE files may be
    not_here = uses_files_not_here(data)
    missing = [m for m in seen["missingModels"] if m.rsplit("/", 1)[-1] not in not_here]
    assert missing == [], f"the front end reports missing models: {seen['missingModels']}"
    assert_no_alerts(page, f"when {name} was loaded")
    state = page.evaluate(STATE_JS)
    assert sorted(n["type"] for n in state["nodes"]) == sorted(n["type"] for n in data["nodes"])
    loaded = match_nodes(data["nodes"], state["nodes"])
    saved = match_nodes(data["nodes"], state["saved"]["nodes"])
    unmatched = [(n["id"], n["type"]) for n in data["nodes"] if n["id"] not in loaded or n["id"] not in saved]
    assert not unmatched, f"nodes of the file the loaded graph does not hold: {unmatched}"
    # the id each file node has in the loaded graph (what the API prompt and getNodeById use)
    live_id = {node_id: got["id"] for node_id, got in loaded.items()}
    for node in data["nodes"]:
        got = loaded[node["id"]]
        # a loader of a NOT_HERE file is flagged by newer front ends (its file is missing): registered is enough
        flagged_ok = bool(uses_files_not_here({"nodes": [node]}))
        assert got["registered"] and (flagged_ok or not got["hasErrors"]), f"{node['type']} did not load as a real node"
        names = [w["name"] for w in got["widgets"]]
        for inp in node.get("inputs", []):
            if inp.get("widget"):
                assert inp["widget"]["name"] in names, (
                    f"{node['type']}: the workflow has a widget '{inp['widget']['name']}' the node no longer has "
                    f"(its widgets: {names})")
        if "widgets_values" in node:
            assert saved[node["id"]].get("widgets_values") == node["widgets_values"], (
                f"{node['type']}: the front end changed the widget values on load: "
                f"{node['widgets_values']} -> {saved[node['id']].get('widgets_values')}")
        for w in got["widgets"]:
            if w["choices"] is not None and w["value"] not in NOT_HERE:  # NOT_HERE: see browser_helpers
                assert w["value"] in w["choices"], (
                    f"{node['type']}.{w['name']} = {w['value']!r} is not one of the server's choices {w['choices']}")
    # the Note names every model file the graph uses; the workflow's models list (the front end offers
    # their download) holds only used files with a download URL: not those made in this repository
    # (LOCAL_MODEL_FILES), nor a MODEL_FILES entry that is a repository rather than a file (SD35M_FLOWGRPO)
    note = "\n".join(n["widgets_values"][0] for n in node_of(data, "Note"))
    used = model_files_used(data)
    assert used, f"{name} uses no model file of MODEL_FILES or LOCAL_MODEL_FILES"
    for folder, file in used:
        assert f"models/{folder}/{file}" in note, f"the Note does not name models/{folder}/{file}"
    listed = {(m["directory"], m["name"]) for m in data["models"]}
    assert listed <= set(used), f"the models list names files the graph does not use: {listed - set(used)}"
    for model in data["models"]:
        assert model["name"] in MODEL_FILES and model["url"] == MODEL_FILES[model["name"]][2], model
    if any(n in LOCAL_MODEL_FILES for _, n in used):
        assert "python scripts/tiny_family.py materialize" in note, "the Note does not say how to make its files"

    # 2. the pack's JS extension: the info line under λ
    boxes = page.evaluate(INFO_BOX_JS)
    samplers = node_of(data, "DeRaDiffKSampler")
    assert len(boxes) == len(samplers), f"info lines {boxes} for {len(samplers)} DeRaDiff KSampler nodes"
    for node, box in zip(samplers, boxes):
        pair = next(n for n in data["nodes"] if n["type"] in ("DeRaDiffLoadAlignedPair", "DeRaDiffMakePair"))
        lam = next(w["value"] for w in loaded[node["id"]]["widgets"] if w["name"] == "lambda")
        beta = next(w["value"] for w in loaded[pair["id"]]["widgets"] if w["name"] == "beta")
        assert box["visible"] and box["w"] > 50 and box["h"] > 5, box
        assert box["text"] == (SCHEDULE_PENDING if scheduled(node) else expected_info_text(lam, beta))
    assert_layout(page, renderer, f"when {name} was loaded")
    loaded_shot = screenshot(page, SHOTS / f"{name}{tag}-loaded.png", crop_graph=True)
    frame_types, thumb_after_run = THUMBNAILS[name]
    thumb_after_run = thumb_after_run or vue  # thumbnails: LiteGraph's only (thumb stays None in Vue)
    thumb = None
    if not thumb_after_run:
        thumb = screenshot(page, SHOTS / f"{name}-thumbnail.png", frame=frame_types)

    # 3. the API prompt the front end makes, against /object_info
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert {v["class_type"] for v in prompt.values()} == {
        n["type"] for n in data["nodes"] if n["type"] not in ("Note", "MarkdownNote")}
    problems = [p for p in prompt_problems(prompt, object_info)
                if not any(f"= {f!r} is not one of" in p for f in not_here)]
    assert not problems, "the prompt does not match /object_info:\n" + "\n".join(problems)
    check_editor_only_inputs(page, data, loaded, live_id, prompt)
    assert console.errors() == [], f"errors while loading {name}: {console.errors()}"
    if not_here:  # text encoders / VAEs with no stand-in (browser_helpers.NOT_HERE): everything above
        # was checked; the run needs them, and tests/test_families_server.py runs the graph without them
        if UPDATE_IMAGES and thumb:
            write_thumbnail(thumb, EXAMPLES / f"{name}.jpg")
        print(f"{name}: not run here, it loads {', '.join(not_here)} (no stand-in)")
        return

    # 4. run it, small (or as saved: RUN_AS_SAVED)
    if name not in RUN_AS_SAVED:
        page.evaluate(SHRINK_JS, [RUN_SIZE, RUN_STEPS])
    forget_cached_outputs(server)
    t0 = time.monotonic()
    entry = run_in_browser(page, server)
    run_s = time.monotonic() - t0
    status = entry["status"]
    assert status.get("status_str") == "success", f"{name} failed: {json.dumps(status)[:2000]}"
    outputs = entry["outputs"]
    saves = node_of(data, "SaveImage")
    assert saves
    for save in saves:
        images = outputs.get(str(live_id[save["id"]]), {}).get("images", [])
        assert images, f"SaveImage {save['id']} saved nothing: {outputs}"
        for img in images:
            path = server.workdir / "output" / img["subfolder"] / img["filename"]
            assert path.exists(), path
            w, h = Image.open(path).size
            if node_of(data, "DeRaDiffSweepGrid"):
                assert w > RUN_SIZE and h > RUN_SIZE, (w, h)  # a grid with labels
                if name in NEEDS_TINY_FAMILY:
                    check_tiny_family_grid(data, loaded, path)
            elif fed_by(data, save, "DeRaDiffLambdaSearch", "plot"):
                assert w >= 400 and h >= 200, (w, h)  # the search's plot
            else:
                assert (w, h) == (RUN_SIZE, RUN_SIZE)
        page.wait_for_function(IMAGES_SHOWN_JS, arg=[live_id[save["id"]], vue], timeout=30_000)
    for sched in node_of(data, "DeRaDiffLambdaSchedule"):
        sid = live_id[sched["id"]]
        ui_out = outputs.get(str(sid), {})
        assert ui_out.get("deradiff_preview") and ui_out.get("deradiff"), ui_out
        page.wait_for_function(f"() => ({SCHEDULE_CANVAS_JS})({sid})?.curve > 50", timeout=30_000)
        drawn = page.evaluate(SCHEDULE_CANVAS_JS, sid)
        assert drawn["w"] >= 100 and drawn["h"] >= 60, drawn
        # preview_steps only re-draws the marks: the plot changes, the prompt does not
        before = page.evaluate(PROMPT_JS)
        steps = next(w["value"] for w in loaded[sched["id"]]["widgets"] if w["name"] == "preview_steps")
        page.evaluate(SET_WIDGET_JS, [sid, "preview_steps", steps + 7])
        redrawn = page.evaluate(SCHEDULE_CANVAS_JS, sid)
        assert redrawn["digest"] != drawn["digest"] and redrawn["curve"] > 50, (drawn, redrawn)
        assert page.evaluate(PROMPT_JS) == before, "preview_steps reached the prompt"
        page.evaluate(SET_WIDGET_JS, [sid, "preview_steps", steps])
        check_schedule_follows_resize(page, sid, vue)
    for node in samplers:  # a schedule's own description from the server, else the editor's β/λ line
        ui_out = outputs[str(live_id[node["id"]])]
        lam = next(w["value"] for w in loaded[node["id"]]["widgets"] if w["name"] == "lambda")
        text = ui_out["deradiff"][0] if ui_out.get("deradiff_schedule", [False])[0] else expected_info_text(lam, pair_beta(data, loaded))
        page.wait_for_function("(t) => [...document.querySelectorAll('.deradiff-beta')].some((e) => e.textContent === t)",
                               arg=text, timeout=10_000)
    for search in node_of(data, "DeRaDiffLambdaSearch"):  # its summary, as the server sent it
        text = outputs[str(live_id[search["id"]])]["text"][0]
        assert "λ" in text, text
        page.wait_for_function(SUMMARY_SHOWN_JS, arg=[live_id[search["id"]], text], timeout=10_000)
    page.wait_for_timeout(300)
    assert_no_alerts(page, f"when {name} ran")
    assert_layout(page, renderer, f"after {name} ran")
    ran = screenshot(page, SHOTS / f"{name}{tag}-ran.png", crop_graph=True)
    if thumb_after_run and not vue:
        thumb = screenshot(page, SHOTS / f"{name}-thumbnail.png", frame=frame_types)
    assert console.errors() == [], f"errors while running {name}: {console.errors()}"
    print(f"{name} ({renderer}): ran in {run_s:.1f} s")

    if UPDATE_IMAGES and not vue:
        write_thumbnail(thumb, EXAMPLES / f"{name}.jpg")
        if name in DOC_IMAGES:
            write_doc_image(loaded_shot if DOC_IMAGES[name] == "loaded" else ran, DOCS / f"{name}.png")


# The λ Search summary box shows the server's text and is visible (not a collapsed or zero-height box).
SUMMARY_SHOWN_JS = r"""
([id, text]) => {
  const el = app.graph.getNodeById(id)?.widgets?.find((w) => w.name === "deradiff_summary")?.element;
  if (!el || el.textContent !== text || !el.isConnected) return false;
  const r = el.getBoundingClientRect();
  return r.width > 50 && r.height > 20;
}
"""

# Resizes a node as a drag of its corner ends: LiteGraph's setSize (the Vue renderer follows the node's size).
RESIZE_JS = r"""
([id, dw, dh]) => {
  const n = app.graph.getNodeById(id);
  n.setSize([n.size[0] + dw, n.size[1] + dh]);
  app.graph.setDirtyCanvas(true, true);
  return [...n.size];
}
"""


def resize_node(page, node_id, dw, dh, vue):
    """Resizes a node as a user does: in the Vue renderer a drag of its bottom-right resize handle (page
    pixels), in LiteGraph the node's own setSize (canvas units; what LiteGraph's corner drag calls)."""
    if not vue:
        page.evaluate(RESIZE_JS, [node_id, dw, dh])
        return
    # the node in view, with room right and below for the drag
    page.evaluate("(id) => { const n = app.graph.getNodeById(id); const [x, y] = n.pos, [w, h] = n.size; "
                  "app.canvas.ds.fitToBounds([x - 40, y - 80, w + 400, h + 400], {zoom: 0.9}); app.canvas.setDirty(true, true); }",
                  node_id)
    page.wait_for_timeout(300)
    node = page.locator(f"[data-node-id='{node_id}']")
    node.hover()
    handle = node.locator("[role=button][aria-label*='bottom-right' i]").first
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dw / 2, y + dh / 2, steps=4)
    page.mouse.move(x + dw, y + dh, steps=4)
    page.mouse.up()
    page.evaluate("() => { app.canvas.deselectAll(); app.canvas.setDirty(true, true); }")  # no selection toolbox in the shots


def check_schedule_follows_resize(page, sid, vue):
    """The plot is redrawn at the new size when the node is resized (and back)."""
    drawn = page.evaluate(SCHEDULE_CANVAS_JS, sid)
    resize_node(page, sid, 160, 120, vue)
    try:
        page.wait_for_function(f"([w, h]) => {{ const d = ({SCHEDULE_CANVAS_JS})({sid}); "
                               "return d && d.cw > w + 50 && d.curve > 50; }", arg=[drawn["cw"], drawn["ch"]], timeout=10_000)
        bigger = page.evaluate(SCHEDULE_CANVAS_JS, sid)
        dpr = page.evaluate("() => window.devicePixelRatio || 1")
        assert abs(bigger["pw"] - round(bigger["cw"] * dpr)) <= 1 and abs(bigger["ph"] - round(bigger["ch"] * dpr)) <= 1, (
            "the plot was not redrawn at its new size", drawn, bigger)
        assert bigger["digest"] != drawn["digest"], (drawn, bigger)
        if not vue:  # LiteGraph gives the plot the node's new height too (Vue: its rows keep their height)
            assert bigger["ch"] > drawn["ch"] + 50, (drawn, bigger)
    finally:
        resize_node(page, sid, -160, -120, vue)


def widget_value(data, loaded, node_type, name):
    """The value of a widget of the (first) node of a type, as the front end loaded it."""
    node = node_of(data, node_type)[0]
    return next(w["value"] for w in loaded[node["id"]]["widgets"] if w["name"] == name)


def check_tiny_family_grid(data, loaded, path: Path):
    """The tiny family's sweep grid holds real images: one row of cells per λ, each with its label
    strip, the reference (λ = 0) draws the prompt's white circle in the middle of a grey background, and
    the family's own reward (colourfulness, the reward its DPO LoRA was trained for) is higher at λ = 2
    than at λ = 0 over the row's seeds, by more than twice the standard error of the difference."""
    import math

    import numpy as np
    import torch
    import tiny_family

    lambdas = [float(x) for x in widget_value(data, loaded, "DeRaDiffLambdaSweep", "lambdas").split(",")]
    per_lambda = widget_value(data, loaded, "EmptyLatentImage", "batch_size")
    scale = round(widget_value(data, loaded, "ImageScaleBy", "scale_by"))
    cell = widget_value(data, loaded, "EmptyLatentImage", "width") * scale
    columns = widget_value(data, loaded, "DeRaDiffSweepGrid", "columns")
    assert columns == per_lambda, "one row per λ"
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    rows = len(lambdas)
    h, w, _ = grid.shape
    assert w == columns * cell and h % rows == 0 and h // rows > cell, (
        f"a {w}x{h} grid for {rows} rows of {columns} cells of {cell} px with a label strip under each")
    strip = h // rows - cell
    cells = np.stack([grid[r * (cell + strip): r * (cell + strip) + cell, c * cell: (c + 1) * cell]
                      for r in range(rows) for c in range(columns)])  # [λ-major, cell, cell, 3]
    labels = np.stack([grid[r * (cell + strip) + cell: (r + 1) * (cell + strip), c * cell: (c + 1) * cell]
                       for r in range(rows) for c in range(columns)])
    assert all((lab.min(axis=2) > 0.6).sum() > 20 for lab in labels), "a cell without its label"
    reference = cells[:per_lambda].mean(axis=3)  # λ = 0, grey levels
    yy, xx = np.mgrid[:cell, :cell] / cell - 0.5
    middle, border = np.hypot(yy, xx) < 0.15, np.maximum(abs(yy), abs(xx)) > 0.42
    for img in reference:
        assert img[middle].mean() > 0.8 and 0.25 < img[border].mean() < 0.75, (
            f"the reference's image is no white circle in the middle on grey: middle {img[middle].mean():.2f}, "
            f"border {img[border].mean():.2f}")
    reward = tiny_family.colourfulness(torch.from_numpy(cells).permute(0, 3, 1, 2)).reshape(rows, per_lambda)
    mean = {lam: float(r.mean()) for lam, r in zip(lambdas, reward)}
    se = {lam: float(r.std() / math.sqrt(per_lambda)) for lam, r in zip(lambdas, reward)}
    print("tiny family, mean colourfulness per λ:", {f"{k:g}": f"{v:.3f} ± {se[k]:.3f}" for k, v in mean.items()})
    assert mean[2.0] - mean[0.0] > 2 * math.hypot(se[0.0], se[2.0]), (
        f"the reward at λ = 2 ({mean[2.0]:.3f} ± {se[2.0]:.3f}) is not above λ = 0 ({mean[0.0]:.3f} ± {se[0.0]:.3f})")


# The pack's JS line under λ when a schedule drives the sampler and has not run yet.
SCHEDULE_PENDING = "λ follows the connected λ Schedule (described here after a run)."


def scheduled(node) -> bool:
    """A sampler node of the workflow file whose λ comes from a connected schedule."""
    return any(inp["name"] == "lambda_schedule" and inp.get("link") is not None for inp in node.get("inputs", []))


def fed_by(data, node, source_type, output_name) -> bool:
    """Whether a node of the workflow file takes its first input from ``source_type``'s named output."""
    link_id = node["inputs"][0].get("link")
    link = next((l for l in data["links"] if l[0] == link_id), None)
    source = next((n for n in data["nodes"] if link and n["id"] == link[1]), None)
    return bool(source and source["type"] == source_type and source["outputs"][link[2]]["name"] == output_name)


def pair_beta(data, loaded):
    pair = next(n for n in data["nodes"] if n["type"] in ("DeRaDiffLoadAlignedPair", "DeRaDiffMakePair"))
    return next(w["value"] for w in loaded[pair["id"]]["widgets"] if w["name"] == "beta")


def check_editor_only_inputs(page, data, loaded, live_id, prompt):
    """β and preview_steps only change drawings: they are saved in the workflow (checked above) but
    not sent, so changing them re-runs nothing. The Sweep Grid gets the pair's β instead."""
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    for cls, name in (("DeRaDiffLoadAlignedPair", "beta"), ("DeRaDiffMakePair", "beta"),
                      ("DeRaDiffLambdaSchedule", "preview_steps")):
        for inputs in by_type.get(cls, []):
            assert name not in inputs, f"{cls}.{name} is in the prompt: changing it would re-run the graph"
    beta = pair_beta(data, loaded)
    assert beta > 0 or node_of(data, "DeRaDiffMakePair")  # β of the release (0: SRPO has no KL term)
    takes_beta = ("DeRaDiffSweepGrid", "DeRaDiffLambdaSearch")  # their β draws labels and axes
    for cls in takes_beta:
        for inputs in by_type.get(cls, []):
            assert inputs.get("beta") == beta, f"{cls} got β {inputs.get('beta')}, the pair loader has {beta}"
    # a new β: the info lines follow at once, and only the grid's input changes in the prompt
    pair = next(n for n in data["nodes"] if n["type"] in ("DeRaDiffLoadAlignedPair", "DeRaDiffMakePair"))
    original, beta = beta, beta or 2500.0  # a pair without β: set one
    page.evaluate(SET_WIDGET_JS, [live_id[pair["id"]], "beta", beta * 2])
    try:
        changed = page.evaluate(PROMPT_JS)
        for node_id, node in prompt.items():
            if node["class_type"] in takes_beta:
                assert changed[node_id]["inputs"]["beta"] == beta * 2
                changed[node_id]["inputs"]["beta"] = beta
        assert changed == prompt, "a new β changed more of the prompt than the grid's and search's β"
        texts = sorted(b["text"] for b in page.evaluate(INFO_BOX_JS))
        samplers = [n for n in data["nodes"] if n["type"] == "DeRaDiffKSampler"]
        for node in samplers:
            if scheduled(node):
                continue
            lam = next(w["value"] for w in loaded[node["id"]]["widgets"] if w["name"] == "lambda")
            assert expected_info_text(lam, beta * 2) in texts, (lam, texts)
    finally:
        page.evaluate(SET_WIDGET_JS, [live_id[pair["id"]], "beta", original])


# -- the templates browser ------------------------------------------------------------------

# Whether the templates browser's card titled ``name`` shows its thumbnail: an image in the card (the
# title's ancestors up to the first that also holds another card's title), loaded and decoded.
CARD_THUMBNAIL_JS = r"""
([sel, pack, name, names]) => {
  const d = [...document.querySelectorAll(sel)].find((e) => e.getClientRects().length && e.innerText.includes(pack));
  const title = d && [...d.querySelectorAll("*")].find((e) => e.childElementCount === 0 && e.textContent.trim() === name);
  const others = names.filter((n) => n !== name);
  for (let e = title; e && e !== d && !others.some((n) => e.textContent.includes(n)); e = e.parentElement) {
    const img = e.querySelector("img");
    if (img) return img.complete && img.naturalWidth > 0;
  }
  return false;
}
"""


def test_templates_browser_lists_and_loads_the_examples(ui, server):
    page, console = ui
    use_renderer(page, "litegraph")
    console.mark()
    page.evaluate(CLOSE_ALERTS_JS, DIALOG)
    page.evaluate("() => app.graph.clear()")
    fetched = {}
    prefix = f"/api/workflow_templates/{PACK_DIR_NAME}/"
    page.on("response", lambda r: prefix in r.url and fetched.__setitem__(r.url.split(prefix)[1], r.status))
    # the Templates button: "Templates" in the menu bar or side bar of 1.2x-1.3x; 1.4x's side bar
    # button reads "Tem\u00adplates" (a soft hyphen) and is named by its aria-label
    page.locator("button:has-text('Templates'), [aria-label*='Templates']").first.click()
    # the templates browser: a PrimeVue dialog (1.2x-1.3x) or 1.4x's own modal (role=dialog);
    # the pack's folder is an entry under Extensions in its side nav
    dialog = page.locator(DIALOG).filter(has=page.get_by_text(PACK_DIR_NAME, exact=True)).first
    nav = dialog.get_by_text(PACK_DIR_NAME, exact=True).first
    nav.wait_for(timeout=30_000)
    nav.click()
    for name in EXAMPLE_NAMES:
        dialog.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
    # every card shows its thumbnail: fetched from the pack's template route and decoded. Front end 1.4x
    # mounts a card's image only while the card is in view (two rows of four here), so each card in turn
    for name in EXAMPLE_NAMES:
        dialog.get_by_text(name, exact=True).first.scroll_into_view_if_needed()
        page.wait_for_function(CARD_THUMBNAIL_JS, arg=[DIALOG, PACK_DIR_NAME, name, EXAMPLE_NAMES], timeout=30_000)
    assert {k: v for k, v in fetched.items() if k.endswith(".jpg")} == {f"{n}.jpg": 200 for n in EXAMPLE_NAMES}, fetched
    dialog.get_by_text(EXAMPLE_NAMES[0], exact=True).first.scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    dialog.screenshot(path=str(SHOTS / "templates-browser.png"))
    if UPDATE_IMAGES:
        write_doc_image(SHOTS / "templates-browser.png", DOCS / "templates_browser.png")
    # a click on a card loads that workflow
    name = "deradiff_lambda_sweep_grid"
    data = json.loads((EXAMPLES / f"{name}.json").read_text())
    dialog.get_by_text(name, exact=True).first.click()
    page.wait_for_function("(n) => app.graph.nodes.length === n", arg=len(data["nodes"]), timeout=30_000)
    page.wait_for_timeout(500)
    assert fetched.get(f"{name}.json") == 200, fetched
    types = page.evaluate("() => app.graph.nodes.map((n) => n.type).sort()")
    assert types == sorted(n["type"] for n in data["nodes"])
    assert_no_alerts(page, "when a template was loaded")
    assert console.errors() == [], console.errors()


def test_workflow_saved_before_full_pass_every_loads_with_its_default(ui, server, object_info):
    """Saved workflows hold widget values by position; one saved before the optional
    full_pass_every existed has the info box's value where full_pass_every now sits. It must load
    with full_pass_every = 1 (the exact method) and send a valid prompt."""
    page, console = ui
    use_renderer(page, "litegraph")
    console.mark()
    page.evaluate(CLOSE_ALERTS_JS, DIALOG)
    name = "deradiff_sd15_dpo"
    data = json.loads((EXAMPLES / f"{name}.json").read_text())
    old = json.loads(json.dumps(data))
    sampler = node_of(old, "DeRaDiffKSampler")[0]
    optional = object_info["DeRaDiffKSampler"]["input_order"].get("optional", [])
    later = optional[optional.index("full_pass_every"):]  # inputs added since (particles, ...)
    # what the pack saved before: the widget values up to denoise, then the info box's "" (the files no
    # longer hold the box: it is not serialised)
    assert sampler["widgets_values"][-1] != "" and len(sampler["widgets_values"]) > len(later)
    sampler["widgets_values"] = sampler["widgets_values"][:-len(later)] + [""]
    sampler["inputs"] = [i for i in sampler["inputs"] if i["name"] not in later]
    page.evaluate(DROP_JS, [name + "_old", json.dumps(old)])
    page.wait_for_timeout(500)
    state = page.evaluate(STATE_JS)
    got = next(n for n in state["nodes"] if n["type"] == "DeRaDiffKSampler")
    widgets = {w["name"]: w["value"] for w in got["widgets"]}
    assert widgets["full_pass_every"] == 1 and widgets["lambda"] == sampler["widgets_values"][0], widgets
    assert widgets["particle_rule"] == "trapezoid" and widgets["particle_select_sigma"] == 0, widgets
    assert got["info"], "the info line under λ is still drawn"
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    inputs = next(v["inputs"] for v in prompt.values() if v["class_type"] == "DeRaDiffKSampler")
    assert inputs.get("full_pass_every", 1) == 1 and inputs["denoise"] == 1
    assert not prompt_problems(prompt, object_info)
    assert console.errors() == [], console.errors()


@pytest.mark.parametrize("renderer", RENDERERS)
def test_particle_mode_shows_the_ess_on_the_node(renderer, ui, server):
    """particles > 1: after a run the KSampler's info line gains the ESS summary the server sent
    (ui output ``deradiff_particles``), and a later run with particles = 1 removes it."""
    page, console = ui
    use_renderer(page, renderer)
    console.mark()
    page.evaluate(CLOSE_ALERTS_JS, DIALOG)
    name = "deradiff_sd15_dpo"
    data = json.loads((EXAMPLES / f"{name}.json").read_text())
    load_example(page, name)
    wait_for_renderer(page, renderer)
    state = page.evaluate(STATE_JS)
    live_id = {node_id: got["id"] for node_id, got in match_nodes(data["nodes"], state["nodes"]).items()}
    sampler = live_id[node_of(data, "DeRaDiffKSampler")[0]["id"]]
    before = page.evaluate(INFO_BOX_JS)[0]["text"]
    assert "particles" not in before, before
    page.evaluate(SHRINK_JS, [RUN_SIZE, RUN_STEPS])
    page.evaluate(SET_WIDGET_JS, [sampler, "sampler_name", "euler_ancestral"])
    page.evaluate(SET_WIDGET_JS, [sampler, "particles", 3])

    def run():
        entry = run_in_browser(page, server)
        assert entry["status"].get("status_str") == "success", json.dumps(entry["status"])[:2000]
        return entry["outputs"].get(str(sampler), {})

    sent = run().get("deradiff_particles", [None])[0]
    assert sent and sent.startswith("3 particles: ESS min "), sent
    page.wait_for_function("(t) => [...document.querySelectorAll('.deradiff-beta')].some((e) => e.textContent.endsWith(t))",
                           arg=" · " + sent, timeout=30_000)
    texts = [b["text"] for b in page.evaluate(INFO_BOX_JS)]
    assert any(t == before + " · " + sent for t in texts), (before, sent, texts)
    shown = [b for b in page.evaluate(INFO_BOX_JS) if b["text"].endswith(sent)]
    assert shown and shown[0]["visible"] and shown[0]["w"] > 50 and shown[0]["h"] > 5, shown
    assert_layout(page, renderer, "with the ESS line")
    screenshot(page, SHOTS / f"particles-{renderer}.png", frame=["DeRaDiffKSampler"])
    # back to one particle: the summary goes away after the next run
    page.evaluate(SET_WIDGET_JS, [sampler, "particles", 1])
    assert "deradiff_particles" not in run()
    page.wait_for_function("(b) => [...document.querySelectorAll('.deradiff-beta')].some((e) => e.textContent === b)",
                           arg=before, timeout=30_000)
    assert console.errors() == [], console.errors()


def test_lambda_search_saved_before_particles_loads_with_its_defaults(ui, server, object_info):
    """The same for λ Search, whose optional particles / resample_ess came after its summary box's
    value was first saved: an old workflow loads with particles = 1 and resample_ess = 0.5."""
    page, console = ui
    use_renderer(page, "litegraph")
    console.mark()
    page.evaluate(CLOSE_ALERTS_JS, DIALOG)
    name = "deradiff_lambda_search"
    old = json.loads((EXAMPLES / f"{name}.json").read_text())
    search = node_of(old, "DeRaDiffLambdaSearch")[0]
    optional = object_info["DeRaDiffLambdaSearch"]["input_order"].get("optional", [])
    later = optional[optional.index("particles"):]
    assert search["widgets_values"][-1] != ""
    kept = search["widgets_values"][:-len(later)]
    search["widgets_values"] = kept + [""]
    search["inputs"] = [i for i in search["inputs"] if i["name"] not in later]
    def search_widgets():
        page.wait_for_timeout(500)
        got = next(n for n in page.evaluate(STATE_JS)["nodes"] if n["type"] == "DeRaDiffLambdaSearch")
        return {w["name"]: w["value"] for w in got["widgets"]}
    load_example(page, name)
    current = search_widgets()
    page.evaluate(DROP_JS, [name + "_old", json.dumps(old)])
    widgets = search_widgets()
    assert widgets["particles"] == 1 and widgets["resample_ess"] == 0.5, widgets
    assert widgets == current  # every other widget as the current file loads it
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    inputs = next(v["inputs"] for v in prompt.values() if v["class_type"] == "DeRaDiffLambdaSearch")
    assert inputs.get("particles", 1) == 1 and inputs.get("resample_ess", 0.5) == 0.5
    assert not prompt_problems(prompt, object_info)
    assert console.errors() == [], console.errors()


# The DOM boxes the pack adds (deradiff_info, deradiff_summary, deradiff_preview).
DOM_BOXES = {"DeRaDiffKSampler": "deradiff_info", "DeRaDiffLambdaSchedule": "deradiff_preview",
             "DeRaDiffLambdaSearch": "deradiff_summary"}


@pytest.mark.parametrize("renderer", RENDERERS)
def test_dom_boxes_are_not_saved_and_files_with_their_old_values_load(renderer, ui, server, object_info):
    """Workflows saved before the DOM boxes were left out of widgets_values end in one "" per box; the
    committed examples no longer do. Both load with the same widget values, show the boxes, and save
    without the box values."""
    page, console = ui
    use_renderer(page, renderer)
    console.mark()
    page.evaluate(CLOSE_ALERTS_JS, DIALOG)
    for name in ("deradiff_lambda_schedule", "deradiff_lambda_search"):
        data = json.loads((EXAMPLES / f"{name}.json").read_text())
        old = json.loads(json.dumps(data))
        boxed = [n for n in old["nodes"] if n["type"] in DOM_BOXES]
        assert boxed
        for node in boxed:
            assert node["widgets_values"][-1] != "", f"{name}: {node['type']} still saves its DOM box's value"
            node["widgets_values"] = node["widgets_values"] + [""]
        got = {}
        for label, workflow in (("without", data), ("with", old)):
            page.evaluate(DROP_JS, [f"{name}_{label}", json.dumps(workflow)])
            wait_for_renderer(page, renderer)
            state = page.evaluate(STATE_JS)
            loaded = match_nodes(data["nodes"], state["nodes"])
            saved = match_nodes(data["nodes"], state["saved"]["nodes"])
            got[label] = {n["id"]: [(w["name"], w["value"]) for w in loaded[n["id"]]["widgets"]
                                    if w["name"] not in DOM_BOXES.values()] for n in data["nodes"]}
            for node in data["nodes"]:
                if "widgets_values" in node:
                    assert saved[node["id"]]["widgets_values"] == node["widgets_values"], (
                        f"{name} ({label} the old values): {node['type']} saves {saved[node['id']]['widgets_values']}")
            for node in boxed:
                names = [w["name"] for w in loaded[node["id"]]["widgets"]]
                assert DOM_BOXES[node["type"]] in names, (label, node["type"], names)
            prompt = page.evaluate(PROMPT_JS)
            assert not prompt_problems(prompt, object_info), (label, prompt_problems(prompt, object_info))
            assert_no_alerts(page, f"when {name} ({label} the old values) was loaded")
            assert_layout(page, renderer, f"when {name} ({label} the old values) was loaded")
        assert got["with"] == got["without"], f"{name}: the trailing DOM values changed what loaded"
    assert console.errors() == [], console.errors()


# -- the subgraph blueprint ----------------------------------------------------------------

# Connects a node's named output to another node's named input (LiteGraph's own connect).
CONNECT_JS = r"""
([links]) => {
  const byId = (id) => app.graph.getNodeById(id);
  for (const [src, out, dst, inp] of links) {
    const a = byId(src), b = byId(dst);
    const o = a.outputs.findIndex((x) => x.name === out), i = b.inputs.findIndex((x) => x.name === inp);
    if (o < 0 || i < 0) throw new Error(`no slot for ${a.type}.${out} -> ${b.type}.${inp}`);
    if (!a.connect(o, b, i)) throw new Error(`could not connect ${a.type}.${out} -> ${b.type}.${inp}`);
  }
  app.graph.setDirtyCanvas(true, true);
}
"""


def test_sweep_grid_blueprint_is_offered_and_runs(ui, server):
    """subgraphs/DeRaDiff Lambda Sweep Grid.json (made in the front end: python tests/browser_helpers.py --blueprint)
    is served by ComfyUI as a blueprint of this pack, the node search offers it under Subgraph Blueprints, and,
    added from there to a graph of the tiny family's pair, prompts and latent, it runs and saves a grid."""
    from browser_helpers import BLUEPRINT_CATEGORY, BLUEPRINT_DIR, BLUEPRINT_NAME, workflow_spec, BUILD_JS
    page, console = ui
    blueprint = json.loads((BLUEPRINT_DIR / f"{BLUEPRINT_NAME}.json").read_text())
    (definition,) = blueprint["definitions"]["subgraphs"]
    assert [n["type"] for n in blueprint["nodes"]] == [definition["id"]], "a blueprint is one subgraph node"
    assert sorted(n["type"] for n in definition["nodes"]) == ["DeRaDiffLambdaSweep", "DeRaDiffSweepGrid", "VAEDecode"]
    listed = [v for v in server.get("/global_subgraphs").values() if v["name"] == BLUEPRINT_NAME]
    assert listed and listed[0]["info"]["node_pack"] == f"custom_nodes.{PACK_DIR_NAME}", listed
    if not tiny_family_present():
        pytest.skip("the blueprint runs on the committed tiny family, and tiny_family/family.json is missing")
    use_renderer(page, "litegraph")
    console.mark()
    page.evaluate(CLOSE_ALERTS_JS, DIALOG)
    # the tiny family's graph without the group the blueprint replaces
    spec = workflow_spec("deradiff_tiny_family")
    group = {"sweep", "decode", "scale", "grid"}
    spec["nodes"] = [n for n in spec["nodes"] if n["key"] not in group]
    spec["links"] = [l for l in spec["links"] if l[0] not in group and l[2] not in group]
    for n in spec["nodes"]:
        if n["type"] == "EmptyLatentImage":
            n["widgets"]["batch_size"] = 1  # one image per λ: a short run
    page.evaluate(BUILD_JS, spec)
    page.evaluate(FIT_VIEW_JS, 0.8)
    ids = {t: page.evaluate("(t) => app.graph.nodes.filter((n) => n.type === t).map((n) => n.id)", t)
           for t in ("DeRaDiffLoadAlignedPair", "CLIPTextEncode", "EmptyLatentImage", "SaveImage")}
    before = set(page.evaluate("() => app.graph.nodes.map((n) => n.id)"))
    # where users find blueprints: the node search (double click on the canvas), under Subgraph Blueprints
    x, y = page.evaluate("() => app.canvasPosToClientPos([1000, 300])")
    page.mouse.dblclick(x, y)
    page.keyboard.type("Lambda Sweep Grid", delay=20)
    option = page.locator("[role=option], li").filter(has_text=BLUEPRINT_NAME).filter(has_text="Subgraph Blueprints").first
    option.wait_for(timeout=15_000)
    assert BLUEPRINT_CATEGORY in option.inner_text(), option.inner_text()
    option.click()
    page.wait_for_function("(n) => app.graph.nodes.length === n", arg=len(before) + 1, timeout=15_000)
    added = page.evaluate("(before) => { const n = app.graph.nodes.find((n) => !before.includes(n.id)); "
                          "return {id: n.id, title: n.title, subgraph: !!n.subgraph, inputs: n.inputs.map((i) => i.name), "
                          "outputs: n.outputs.map((o) => o.name)}; }", list(before))
    assert added["subgraph"] and added["title"] == BLUEPRINT_NAME, added
    assert {"pair", "positive", "negative", "latent_image", "vae"} <= set(added["inputs"]) and added["outputs"] == ["grid"], added
    pair, (pos, neg), latent, save = (ids["DeRaDiffLoadAlignedPair"][0], ids["CLIPTextEncode"],
                                      ids["EmptyLatentImage"][0], ids["SaveImage"][0])
    # the positive prompt is the first CLIPTextEncode of the spec (its Note names it so)
    bp = added["id"]
    page.evaluate(CONNECT_JS, [[[pair, "pair", bp, "pair"], [pos, "CONDITIONING", bp, "positive"],
                                [neg, "CONDITIONING", bp, "negative"], [latent, "LATENT", bp, "latent_image"],
                                [pair, "VAE", bp, "vae"], [bp, "grid", save, "images"]]])
    # a short run: 4 steps, set on the λ Sweep inside the subgraph (where a user edits the sweep's settings)
    page.evaluate("(id) => { const s = app.graph.getNodeById(id).subgraph.nodes.find((n) => n.type === 'DeRaDiffLambdaSweep'); "
                  "s.widgets.find((w) => w.name === 'steps').value = 4; }", bp)
    forget_cached_outputs(server)
    entry = run_in_browser(page, server)
    assert entry["status"].get("status_str") == "success", json.dumps(entry["status"])[:2000]
    images = [img for out in entry["outputs"].values() for img in out.get("images", []) if img.get("type") == "output"]
    assert len(images) == 1, entry["outputs"]
    w, h = Image.open(server.workdir / "output" / images[0]["subfolder"] / images[0]["filename"]).size
    lambdas = [n for n in definition["nodes"] if n["type"] == "DeRaDiffLambdaSweep"][0]["widgets_values"][0].split(",")
    assert (w // 32) * (h // 32) >= len(lambdas) and h % 32, ("a grid of a labelled 32×32 cell per λ", w, h, lambdas)
    page.wait_for_function(IMAGES_SHOWN_JS, arg=[save, False], timeout=30_000)
    screenshot(page, SHOTS / "blueprint-sweep-grid.png", crop_graph=True)
    assert_no_alerts(page, "when the blueprint ran")
    assert console.errors() == [], console.errors()
