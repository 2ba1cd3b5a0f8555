"""Shared input definitions and error wording for the node classes."""
from __future__ import annotations

import inspect
import math

from comfy_api.latest import io

from ..sampler.plots import fmt_number
from .v3_features import advanced, search_aliases

CATEGORY = "sampling/DeRaDiff"
PAIR_TYPE = "DERADIFF_PAIR"
SCHEDULE_TYPE = "DERADIFF_SCHEDULE"

# The pack's own socket types: same type strings as the V1 nodes had, so saved links still fit.
Pair = io.Custom(PAIR_TYPE)
Schedule = io.Custom(SCHEDULE_TYPE)

# Words a user may type in the node search for any DeRaDiff node (newer ComfyUI only).
SEARCH_ALIASES = ("alignment strength", "DPO", "realign", "beta", "KL")

LAMBDA_TOOLTIP = ("λ (lambda), the realignment strength. 0 = the reference model, 1 = the aligned "
                  "model, between 0 and 1 = interpolates, above 1 = extrapolates (emulates a weaker "
                  "KL penalty, β/λ; can degrade past 2-3). λ 0 and 1 cost one model pass per step, "
                  "other values two.")
FULL_PASS_TOOLTIP = ("Run both models only on every k-th step; the steps in between run ONE model and reuse "
                     "the last difference between the two (the first step and the inner evaluations of "
                     "multi-step samplers, Heun's corrector included, always run both). 1 = exact DeRaDiff, two "
                     "passes per step; 2 = 1.5 "
                     "passes; 3 ≈ 1.33. Faster, slightly approximate: docs/difference_reuse.md "
                     "gives the measured error. No effect at λ = 0 or 1 (one model anyway).")


def pair_input(optional=False, tooltip="The reference + aligned model pair, from Load / Make Aligned Model Pair."):
    return Pair.Input("pair", optional=optional, tooltip=tooltip)


def schedule_input():
    return Schedule.Input("lambda_schedule", optional=True, tooltip=(
        "Optional λ schedule (DeRaDiff λ Schedule); when connected it replaces the constant λ."))


def lambda_input():
    return io.Float.Input("lambda", default=1.0, min=0.0, max=10.0, step=0.05, round=0.001, tooltip=LAMBDA_TOOLTIP)


def full_pass_input():
    return io.Int.Input("full_pass_every", default=1, min=1, max=8, optional=True, tooltip=FULL_PASS_TOOLTIP,
                        **advanced())


def beta_input():
    return io.Float.Input("beta", default=0.0, min=0.0, max=1e6, step=0.1, optional=True, tooltip=(
        "Optional: the β (KL strength) the aligned model was trained at, e.g. 5000 for "
        "Diffusion-DPO. Only used to show the emulated β/λ; 0 = unknown."))


def schema(node_id, display_name, description, inputs, outputs, **flags):
    """A DeRaDiff node's V3 schema: the pack's category and search words on every node."""
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                     inputs=inputs, outputs=outputs, **flags, **search_aliases(*SEARCH_ALIASES))


def combo_validation(*names):
    """A ``validate_inputs`` that checks these combo inputs against their current choices.

    ComfyUI 0.3.75's server checks a V1 combo's value at queue time but lets any value of a V3 combo
    through to ``execute``; this restores the queue-time refusal on every version, naming the node
    and the input. Its signature lists only these inputs, so ComfyUI still checks the others itself."""
    def validate_inputs(cls, **values):
        choices = {i.id: i.options for i in cls.define_schema().inputs if i.id in names}
        for name, value in values.items():
            if value is None or value in choices[name]:  # None: linked, checked when it runs
                continue
            return (f"{cls.NODE}: input '{name}': {value!r} is not in its list of choices "
                    f"({len(choices[name])}). For a model file: put it in ComfyUI's models folder and press R "
                    "to refresh the lists.")
        return True
    parameters = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for name in names]
    validate_inputs.__signature__ = inspect.Signature(parameters)  # what ComfyUI reads to pick the inputs
    return classmethod(validate_inputs)


class NodeInputError(ValueError):
    """Bad input, reported with the node and input it belongs to."""

    def __init__(self, node: str, input_name: str, message: str):
        super().__init__(f"{node}: input '{input_name}': {message}")


def check_lambda_input(node: str, value, input_name: str = "lambda") -> float:
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise NodeInputError(node, input_name, f"expected a number, got {value!r}") from None
    if not math.isfinite(lam) or lam < 0:
        raise NodeInputError(node, input_name, f"λ must be a finite number >= 0, got {value!r} "
                             "(0 = reference, 1 = aligned, >1 extrapolates)")
    return lam


def check_number(node: str, input_name: str, value, minimum=None, maximum=None) -> float:
    """A FLOAT input as a finite float inside [minimum, maximum].

    ComfyUI's prompt validation checks min/max, but NaN passes every comparison (a client
    can send NaN in the prompt's JSON, or the string "nan", which validation turns into a
    float), so the node itself refuses it: a NaN cfg or denoise would otherwise give a NaN
    image or an error from deep inside ComfyUI's sampler set-up."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise NodeInputError(node, input_name, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise NodeInputError(node, input_name, f"expected a finite number, got {value!r}")
    if minimum is not None and number < minimum or maximum is not None and number > maximum:
        low = "-∞" if minimum is None else f"{minimum:g}"
        high = "∞" if maximum is None else f"{maximum:g}"
        raise NodeInputError(node, input_name, f"{number:g} is outside {low}..{high}")
    return number


def check_sampling_numbers(node: str, cfg, denoise=None):
    """cfg and denoise as KSampler takes them (finite; denoise in 0..1)."""
    cfg = check_number(node, "cfg", cfg)
    if denoise is None:
        return cfg, None
    return cfg, check_number(node, "denoise", denoise, 0.0, 1.0)


def check_full_pass_every(node: str, value) -> int:
    """``full_pass_every`` as an int >= 1 (a client can send 0, a float or a string)."""
    try:
        every = int(value)
    except (TypeError, ValueError):
        raise NodeInputError(node, "full_pass_every", f"expected a whole number >= 1, got {value!r}") from None
    if every < 1 or every != value and not isinstance(value, str):
        raise NodeInputError(node, "full_pass_every", f"expected a whole number >= 1 (1 = both models on every "
                             f"step), got {value!r}")
    return every


def check_pair(node: str, pair):
    if not hasattr(pair, "reference") or not hasattr(pair, "aligned"):
        raise NodeInputError(node, "pair", f"expected a DERADIFF_PAIR, got {type(pair).__name__}")
    return pair


def check_conditioning(node: str, input_name: str, value):
    """A CONDITIONING is a list of [tensor, dict] entries. ComfyUI's validation lets a plain value
    through where a link was expected; without this check it would fail deep in the sampler."""
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(c, (list, tuple)) and len(c) >= 2 and hasattr(c[0], "shape") and isinstance(c[1], dict)
        for c in value)
    if not ok:
        raise NodeInputError(node, input_name, f"expected a CONDITIONING (connect a CLIP Text Encode), got "
                             f"{type(value).__name__} {str(value)[:40]!r}")
    return value


def check_latent(node: str, input_name: str, value):
    samples = value.get("samples") if isinstance(value, dict) else None
    if not hasattr(samples, "shape") or len(samples.shape) < 4:
        raise NodeInputError(node, input_name, f"expected a LATENT (e.g. from Empty Latent Image), got "
                             f"{type(value).__name__} {str(value)[:40]!r}")
    return value


def check_sampler_inputs(node: str, positive, negative, latent_image=None):
    check_conditioning(node, "positive", positive)
    check_conditioning(node, "negative", negative)
    if latent_image is not None:
        check_latent(node, "latent_image", latent_image)


def lambda_or_schedule(node: str, kwargs):
    """The schedule when one is connected, else the checked constant λ; plus a line for the UI."""
    schedule = kwargs.get("lambda_schedule")
    if schedule is not None:
        if not hasattr(schedule, "value_at"):
            raise NodeInputError(node, "lambda_schedule", f"expected a DERADIFF_SCHEDULE, got {type(schedule).__name__}")
        return schedule, schedule.describe()
    return check_lambda_input(node, kwargs.get("lambda", 1.0)), None


def emulated_beta_text(beta, lam: float) -> str:
    if not beta:
        return f"λ = {lam:g}"
    if lam == 0:
        return f"λ = 0: the reference model (β/λ = ∞, trained at β = {beta:g})"
    return f"λ = {lam:g}: emulates β/λ = {fmt_number(beta / lam)} (trained at β = {beta:g})"


def conditioning_inputs():
    return [io.Conditioning.Input("positive", tooltip="What to include in the image (used by both models)."),
            io.Conditioning.Input("negative", tooltip="What to exclude from the image (used by both models).")]


def sampler_inputs(names=None):
    """KSampler's own inputs, same names and ranges, so DeRaDiff nodes are drop-in (``names``: a subset, in order)."""
    import comfy.samplers
    inputs = [
        io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                     tooltip="The random seed used for creating the noise."),
        io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of denoising steps."),
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale, applied to each model "
                               "separately before the two are mixed."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                       tooltip="The sampling algorithm. Every ComfyUI sampler works."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="The noise schedule."),
        *conditioning_inputs(),
        io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="The amount of denoising; below 1 keeps the input's structure (img2img)."),
    ]
    return inputs if names is None else [i for i in inputs if i.id in names]
