"""Shared input definitions and error wording for the node classes."""
from __future__ import annotations

CATEGORY = "sampling/DeRaDiff"
PAIR_TYPE = "DERADIFF_PAIR"

LAMBDA_INPUT = ("FLOAT", {
    "default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "round": 0.001,
    "tooltip": "λ (lambda), the realignment strength. 0 = the reference model, 1 = the aligned "
               "model, between 0 and 1 = interpolates, above 1 = extrapolates (emulates a weaker "
               "KL penalty, β/λ; can degrade past 2-3). λ 0 and 1 cost one model pass per step, "
               "other values two."})

BETA_INPUT = ("FLOAT", {
    "default": 0.0, "min": 0.0, "max": 1e6, "step": 0.1,
    "tooltip": "Optional: the β (KL strength) the aligned model was trained at, e.g. 5000 for "
               "Diffusion-DPO. Only used to show the emulated β/λ; 0 = unknown."})


class NodeInputError(ValueError):
    """Bad input, reported with the node and input it belongs to."""

    def __init__(self, node: str, input_name: str, message: str):
        super().__init__(f"{node}: input '{input_name}': {message}")


def check_lambda_input(node: str, value) -> float:
    import math
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise NodeInputError(node, "lambda", f"expected a number, got {value!r}") from None
    if not math.isfinite(lam) or lam < 0:
        raise NodeInputError(node, "lambda", f"λ must be a finite number >= 0, got {value!r} "
                             "(0 = reference, 1 = aligned, >1 extrapolates)")
    return lam


def emulated_beta_text(beta, lam: float) -> str:
    if not beta:
        return f"λ = {lam:g}"
    if lam == 0:
        return f"λ = 0: the reference model (β/λ = ∞, aligned at β = {beta:g})"
    return f"λ = {lam:g}: emulates β/λ = {beta / lam:.4g} (aligned at β = {beta:g})"
