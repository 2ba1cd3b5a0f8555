// DeRaDiff front-end: shows the emulated KL strength β/λ under the λ input.
// A DOM widget (not onDrawForeground) so it also renders in the Vue node renderer.
import { app } from "../../scripts/app.js";

const SAMPLER_NODES = new Set(["DeRaDiffKSampler", "DeRaDiffGuider"]);
const PAIR_NODES = new Set(["DeRaDiffLoadAlignedPair", "DeRaDiffMakePair"]);

export function emulatedBetaText(lambda, beta) {
  const lam = Number(lambda);
  if (!Number.isFinite(lam) || lam < 0) return "λ must be a number ≥ 0";
  const role = lam === 0 ? "reference model" : lam === 1 ? "aligned model"
    : lam < 1 ? "interpolating (stronger KL)" : "extrapolating (weaker KL)";
  if (!beta) return `λ = ${lam}: ${role}`;
  if (lam === 0) return `λ = 0: reference model (β/λ = ∞)`;
  return `λ = ${lam}: ${role}, emulates β/λ = ${+(beta / lam).toPrecision(4)} (trained at β = ${beta})`;
}

function pairBeta(node) {
  const input = node.inputs?.find((i) => i.name === "pair");
  const link = input?.link != null ? node.graph?.links?.[input.link] : null;
  const origin = link ? node.graph.getNodeById(link.origin_id) : null;
  if (!origin || !PAIR_NODES.has(origin.comfyClass ?? origin.type)) return 0;
  return Number(origin.widgets?.find((w) => w.name === "beta")?.value) || 0;
}

app.registerExtension({
  name: "DeRaDiff.EmulatedBeta",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SAMPLER_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const el = document.createElement("div");
      el.className = "deradiff-beta";
      el.style.cssText = "font-size:11px;opacity:0.8;padding:2px 6px;white-space:normal;";
      const widget = this.addDOMWidget("deradiff_info", "deradiff_info", el, { serialize: false });
      widget.computeSize = () => [0, 32];
      const refresh = () => {
        const lam = this.widgets?.find((w) => w.name === "lambda")?.value;
        el.textContent = emulatedBetaText(lam, pairBeta(this));
      };
      const lamWidget = this.widgets?.find((w) => w.name === "lambda");
      if (lamWidget) {
        const cb = lamWidget.callback;
        lamWidget.callback = function () { const out = cb?.apply(this, arguments); refresh(); return out; };
      }
      this.deradiffRefresh = refresh;
      setTimeout(refresh, 0);
      return r;
    };
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const r = onConnectionsChange?.apply(this, arguments);
      this.deradiffRefresh?.();
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const text = message?.deradiff?.[0];
      const el = this.widgets?.find((w) => w.name === "deradiff_info")?.element;
      if (text && el) el.textContent = text;
      return r;
    };
  },
});
