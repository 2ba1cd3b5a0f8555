// DeRaDiff front-end: the emulated KL strength β/λ under the λ input, the λ-schedule preview, and
// the β the sweep grid labels with.
// β (on the pair nodes) and preview_steps (on the schedule) only change what is drawn here, so they
// are kept out of the prompt: changing them re-runs nothing. Saved workflows still keep them.
// DOM widgets (not onDrawForeground) so they also render in the Vue node renderer.
import { app } from "../../scripts/app.js";

const SAMPLER_NODES = new Set(["DeRaDiffKSampler", "DeRaDiffGuider"]);
const PAIR_NODES = new Set(["DeRaDiffLoadAlignedPair", "DeRaDiffMakePair"]);
const SCHEDULE_NODE = "DeRaDiffLambdaSchedule";
const SWEEP_NODE = "DeRaDiffLambdaSweep";
const GRID_NODE = "DeRaDiffSweepGrid";
const SEARCH_NODE = "DeRaDiffLambdaSearch";
const TEXT_NODES = new Set([SEARCH_NODE, "DeRaDiffRewardScore"]);  // show the server's summary
export const SCHEDULE_PENDING = "λ follows the connected λ Schedule (described here after a run).";
const EDITOR_ONLY = { [SCHEDULE_NODE]: ["preview_steps"] };
for (const name of PAIR_NODES) EDITOR_ONLY[name] = ["beta"];

export function emulatedBetaText(lambda, beta) {
  const lam = Number(lambda);
  if (!Number.isFinite(lam) || lam < 0) return "λ must be a number ≥ 0";
  const role = lam === 0 ? "reference model" : lam === 1 ? "aligned model"
    : lam < 1 ? "interpolating (stronger KL)" : "extrapolating (weaker KL)";
  if (!beta) return `λ = ${lam}: ${role}`;
  if (lam === 0) return `λ = 0: reference model (β/λ = ∞)`;
  return `λ = ${lam}: ${role}, emulates β/λ = ${+(beta / lam).toPrecision(4)} (trained at β = ${beta})`;
}

const classOf = (node) => node?.comfyClass ?? node?.type;
const widget = (node, name) => node?.widgets?.find((w) => w.name === name);

// Graph access through LiteGraph's public node accessors (present in front ends 1.32 and 1.49), not
// the deprecated indexed `graph.links[id]` proxy.
function upstream(node, inputName) {
  const slot = node?.inputs?.findIndex((i) => i.name === inputName) ?? -1;
  if (slot < 0 || node.inputs[slot].link == null) return null;
  if (typeof node.getInputNode === "function") return node.getInputNode(slot);
  const link = node.graph?.getLink?.(node.inputs[slot].link) ?? node.graph?.links?.get?.(node.inputs[slot].link);
  return link ? node.graph.getNodeById(link.origin_id) : null;
}

// The nodes fed by one of this node's outputs.
function downstream(node, slot) {
  if (typeof node?.getOutputNodes === "function") return node.getOutputNodes(slot) ?? [];
  return (node?.outputs?.[slot]?.links ?? []).map((id) => node.graph?.getLink?.(id) ?? node.graph?.links?.get?.(id))
    .filter(Boolean).map((link) => node.graph.getNodeById(link.target_id)).filter(Boolean);
}

// β of the pair node feeding this node's `pair` input (0 when unknown).
function pairBeta(node) {
  const origin = upstream(node, "pair");
  if (!origin || !PAIR_NODES.has(classOf(origin))) return 0;
  return Number(widget(origin, "beta")?.value) || 0;
}

// The schedule's own pair input, else the pair of the first sampler it feeds.
function scheduleBeta(node) {
  const own = pairBeta(node);
  if (own) return own;
  for (const target of downstream(node, 0)) {
    const beta = pairBeta(target);
    if (beta) return beta;
  }
  return 0;
}

// The grid's β: its own widget when set, else the pair loader's behind the sweep that made the labels.
function gridBeta(node) {
  const own = Number(widget(node, "beta")?.value) || 0;
  if (own) return own;
  const sweep = upstream(node, "labels");
  return classOf(sweep) === SWEEP_NODE ? pairBeta(sweep) : 0;
}

// Every drawing in the graph that may show this β (the pair's own graph: a subgraph, or the root).
function refreshAll(graph) {
  const g = graph ?? app.graph;
  for (const node of g?.nodes ?? []) node.deradiffRefresh?.();
}

function chain(obj, key, after) {
  const before = obj[key];
  obj[key] = function () {
    const r = before?.apply(this, arguments);
    after.apply(this, arguments);
    return r;
  };
}

function fmt(v) {
  if (v === Infinity) return "∞";
  return Math.abs(v) < 1e4 ? String(+v.toPrecision(4)) : v.toFixed(0);
}

// The λ curve over the denoising progress, a mark per step, β/λ at both ends when β is known.
// A custom list is one value per sampler step: drawn over the sampler's steps (preview_steps, or
// the list's length if longer), the last value held past its end, as the samplers use it.
export function drawSchedule(canvas, preview, steps, beta, text) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(120, canvas.clientWidth || 400), h = Math.max(80, canvas.clientHeight || 200);
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.fillStyle = "rgb(24,24,28)";
  g.fillRect(0, 0, w, h);
  g.font = "11px sans-serif";
  g.fillStyle = "rgb(220,220,230)";
  if (!preview?.curve?.length) {
    g.fillText("Queue the prompt to draw the λ curve.", 8, 18);
    return;
  }
  const values = preview.custom_values;
  const marks = values?.length ? Math.max(values.length, steps) : preview.custom_steps || steps;
  // per step: the value at both ends of the step's interval, so the drawing is a staircase
  const curve = values?.length
    ? Array.from({ length: 2 * marks }, (_, i) => values[Math.min(i >> 1, values.length - 1)])
    : preview.curve;
  const at = values?.length ? (i) => ((i >> 1) + (i & 1)) / marks : (i) => i / (curve.length - 1);
  const [left, right, top, bottom] = [44, 12, 24, 30];
  const hi = Math.max(1, ...curve) * 1.1;
  const px = (p) => left + p * (w - left - right);
  const py = (v) => top + (1 - v / hi) * (h - top - bottom);
  g.strokeStyle = "rgb(90,90,100)";
  g.strokeRect(left, top, w - left - right, h - top - bottom);
  g.strokeStyle = "rgb(120,120,130)";
  g.beginPath();
  for (let k = 0; k <= marks; k++) {
    const x = px(k / marks);
    g.moveTo(x, h - bottom);
    g.lineTo(x, h - bottom + (k % 5 ? 4 : 7));
  }
  g.stroke();
  g.fillStyle = "rgb(170,170,180)";
  for (const v of hi > 2 ? [0, 1, 2] : [0, 1]) {
    g.strokeStyle = "rgb(60,60,70)";
    g.beginPath();
    g.moveTo(left, py(v));
    g.lineTo(w - right, py(v));
    g.stroke();
    g.fillText(`λ=${v}`, 4, py(v) + 4);
  }
  g.strokeStyle = "rgb(255,170,60)";
  g.lineWidth = 2;
  g.beginPath();
  curve.forEach((v, i) => (i ? g.lineTo : g.moveTo).call(g, px(at(i)), py(v)));
  g.stroke();
  g.lineWidth = 1;
  g.fillText(values?.length
    ? `step 1 … ${marks}: one λ per sampler step${marks > values.length ? `, the last held from step ${values.length + 1}` : ""}`
    : `0 %   denoising progress (${marks} steps)   100 %`, left, h - bottom + 20);
  g.fillStyle = "rgb(220,220,230)";
  const ends = (v) => (v === 0 ? "∞" : fmt(beta / v));
  g.fillText(beta ? `β = ${beta}; β/λ: start ${ends(curve[0])}, end ${ends(curve[curve.length - 1])}`
    : (text || "λ schedule (connect a pair with β to see β/λ)"), left, 16);
}

// A DOM box that shows text or a drawing only: never saved in the workflow (`serialize = false` keeps it
// out of widgets_values; the option keeps it out of the prompt). Its height comes from the DOM-widget
// options both renderers read (LiteGraph lays nodes out with them; Vue nodes size the element by its CSS),
// not from a computeSize override, which the Vue renderer ignores.
const BOX_MARGIN = 4;  // LiteGraph insets a DOM box by this on every side (its default, 10, cut the text short)

function addDisplayBox(node, name, el, minHeight, maxHeight) {
  const box = node.addDOMWidget(name, name, el, {
    serialize: false,
    margin: BOX_MARGIN,
    getMinHeight: minHeight,
    ...(maxHeight ? { getMaxHeight: maxHeight } : {}),
  });
  box.serialize = false;
  return box;
}

// LiteGraph sizes a node once from its widgets' minimum heights: a box whose text grew (the ESS summary
// after a run) makes its node taller, never smaller than the user made it. (Vue nodes grow with the DOM.)
function fitNodeHeight(node) {
  if (app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled")) return;
  const needed = node.computeSize?.()[1];
  if (needed > node.size[1]) node.setSize([node.size[0], needed]);
  node.graph?.setDirtyCanvas?.(true, true);
}

function addInfoBox(node) {
  const el = document.createElement("div");
  el.className = "deradiff-beta";
  el.style.cssText = "font-size:11px;line-height:13px;opacity:0.8;padding:2px 6px;white-space:normal;min-height:28px;"
    + "box-sizing:border-box;";
  // the text in a block of its own: its height is the text's, whatever height the renderer gives the box
  const text = document.createElement("div");
  el.appendChild(text);
  const height = () => Math.max(32, Math.ceil(text.offsetHeight) + 4 + 2 * BOX_MARGIN);
  addDisplayBox(node, "deradiff_info", el, height, height);
  if (typeof ResizeObserver === "function") {  // more lines (a longer text, a narrower node): a taller node
    const observer = new ResizeObserver(() => fitNodeHeight(node));
    observer.observe(text);
    chain(node, "onRemoved", () => observer.disconnect());
  }
  // With a schedule connected the constant λ is unused: show the schedule's own description (from
  // the last run) instead of a misleading λ line.
  const refresh = () => {
    text.textContent = (upstream(node, "lambda_schedule")
      ? node.deradiffScheduleText ?? SCHEDULE_PENDING
      : emulatedBetaText(widget(node, "lambda")?.value, pairBeta(node)))
      + (node.deradiffParticlesText ? ` · ${node.deradiffParticlesText}` : "");
  };
  const lam = widget(node, "lambda");
  if (lam) chain(lam, "callback", refresh);
  node.deradiffRefresh = refresh;
  setTimeout(refresh, 0);
}

function addSummaryBox(node) {
  const el = document.createElement("pre");
  el.className = "deradiff-summary";
  el.style.cssText = "font-size:11px;opacity:0.85;padding:2px 6px;margin:0;white-space:pre-wrap;overflow:auto;"
    + "min-height:86px;box-sizing:border-box;";
  addDisplayBox(node, "deradiff_summary", el, () => 90);
}

function addSchedulePreview(node) {
  // The canvas sits absolutely inside a box the renderer sizes, so the drawing's own pixel size never
  // feeds back into the layout; a ResizeObserver redraws it whenever the node (and so the box) is resized.
  const holder = document.createElement("div");
  holder.className = "deradiff-schedule-box";
  holder.style.cssText = "position:relative;width:100%;height:100%;min-height:200px;";
  const canvas = document.createElement("canvas");
  canvas.className = "deradiff-schedule";
  canvas.style.cssText = "position:absolute;inset:0;width:100%;height:100%;display:block;";
  holder.appendChild(canvas);
  addDisplayBox(node, "deradiff_preview", holder, () => 206);
  const redraw = () => drawSchedule(canvas, node.deradiffPreview, Number(widget(node, "preview_steps")?.value) || 20,
    scheduleBeta(node), node.deradiffText);
  const steps = widget(node, "preview_steps");
  if (steps) chain(steps, "callback", redraw);
  node.deradiffRefresh = redraw;
  if (typeof ResizeObserver === "function") {
    let drawn = "";
    const observer = new ResizeObserver(() => {
      const size = `${canvas.clientWidth}x${canvas.clientHeight}`;
      if (size !== drawn && canvas.clientWidth && canvas.clientHeight) {
        drawn = size;
        redraw();
      }
    });
    observer.observe(holder);
    chain(node, "onRemoved", () => observer.disconnect());
  }
  setTimeout(redraw, 0);
}

app.registerExtension({
  name: "DeRaDiff.EmulatedBeta",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData.name;
    if (nodeData.input?.optional?.full_pass_every || nodeData.input?.optional?.particles) {
      // Workflows saved before full_pass_every / particles existed hold the info or summary box's value
      // where they now sit (widgets load by position): such a value is not a count, so it becomes the default.
      chain(nodeType.prototype, "onConfigure", function () {
        const w = widget(this, "full_pass_every");
        const v = Number(w?.value);
        if (w && (w.value === "" || w.value == null || !Number.isInteger(v) || v < 1)) w.value = 1;
        // the same for the particle mode's inputs, added after it
        const p = widget(this, "particles");
        if (p && (p.value === "" || p.value == null || !Number.isInteger(Number(p.value)) || Number(p.value) < 1)) p.value = 1;
        const r = widget(this, "resample_ess");
        const rv = Number(r?.value);
        if (r && (r.value === "" || r.value == null || !(rv >= 0 && rv <= 1))) r.value = 0.5;
        // and particle_rule / particle_select_sigma, added after those
        const rule = widget(this, "particle_rule");
        const rules = rule?.options?.values;
        if (rule && Array.isArray(rules) && !rules.includes(rule.value)) rule.value = "trapezoid";
        const sel = widget(this, "particle_select_sigma");
        const sv = Number(sel?.value);
        if (sel && (sel.value === "" || sel.value == null || !(sv >= 0) || !Number.isFinite(sv))) sel.value = 0;
      });
    }
    const relevant = SAMPLER_NODES.has(name) || PAIR_NODES.has(name) || name === SCHEDULE_NODE || name === GRID_NODE
      || TEXT_NODES.has(name);
    if (!relevant) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      for (const inputName of EDITOR_ONLY[name] ?? []) {
        const w = widget(this, inputName);
        if (!w) continue;
        if (w.options) w.options.serialize = false;  // saved in the workflow, not sent to the server
        else w.options = { serialize: false };
        chain(w, "callback", () => refreshAll(this.graph));
      }
      if (SAMPLER_NODES.has(name)) addInfoBox(this);
      if (name === SCHEDULE_NODE) addSchedulePreview(this);
      if (name === GRID_NODE) {
        const beta = widget(this, "beta");
        if (beta) beta.serializeValue = () => gridBeta(this);
      }
      if (name === SEARCH_NODE) {  // its β/λ axis: its own β, else the pair loader's
        const beta = widget(this, "beta");
        if (beta) beta.serializeValue = () => Number(beta.value) || pairBeta(this);
      }
      if (TEXT_NODES.has(name)) addSummaryBox(this);
    });
    chain(nodeType.prototype, "onConnectionsChange", function () {
      if (PAIR_NODES.has(name)) refreshAll(this.graph);
      else this.deradiffRefresh?.();
    });
    chain(nodeType.prototype, "onExecuted", function (message) {
      if (name === SCHEDULE_NODE) {
        this.deradiffPreview = message?.deradiff_preview?.[0];
        this.deradiffText = message?.deradiff?.[0];
        this.deradiffRefresh?.();
      } else if (TEXT_NODES.has(name)) {
        const el = widget(this, "deradiff_summary")?.element;
        if (el) el.textContent = message?.text?.[0] ?? "";
      } else if (SAMPLER_NODES.has(name)) {
        // a schedule's own description; a constant λ's line is written here, with the editor's β
        this.deradiffScheduleText = message?.deradiff_schedule?.[0] ? message.deradiff?.[0] : undefined;
        this.deradiffParticlesText = message?.deradiff_particles?.[0];  // particle mode: the ESS summary
        this.deradiffRefresh?.();
      }
    });
  },
});
