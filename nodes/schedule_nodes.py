from __future__ import annotations

from comfy_api.latest import io

from ..sampler.schedules import SHAPES, LambdaSchedule, parse_values
from .common import NodeInputError, Schedule, combo_validation, check_lambda_input, check_number, pair_input, schema


def _lambda(name, default, tooltip):
    return io.Float.Input(name, default=default, min=0.0, max=10.0, step=0.05, round=0.001, tooltip=tooltip)


class DeRaDiffLambdaSchedule(io.ComfyNode):
    NODE = "DeRaDiff λ Schedule"
    validate_inputs = combo_validation('shape')
    ABOUT = ("λ along the denoising trajectory, for DeRaDiff KSampler / Guider / Realign Model "
             "(replaces their constant λ). Percents are absolute, like ComfyUI's own start/end "
             "percent inputs: λ is evaluated from the sigma each model call is made at, on the "
             "model's noise schedule, so multi-call samplers, img2img and two-stage sampling "
             "(KSamplerAdvanced start/end steps, SplitSigmas) all follow the same curve. custom "
             "is one value per sampler step instead (whatever the scheduler; a split run takes its "
             "own steps' values). Steps where λ is exactly 0 or 1 run only the model they need.")

    @classmethod
    def define_schema(cls):
        return schema("DeRaDiffLambdaSchedule", cls.NODE, cls.ABOUT, [
            io.Combo.Input("shape", options=list(SHAPES), default="linear", tooltip=(
                "constant: λ from. linear / cosine / ease_in / ease_out: from → to inside the "
                "window (from before it, to after it). interval: λ from inside the window, λ outside "
                "elsewhere. custom: one value per sampler step from custom_values or custom_floats.")),
            _lambda("lambda_from", 1.0, "λ at the start of the ramp, the constant λ, or λ inside the interval."),
            _lambda("lambda_to", 0.0, "λ at the end of the ramp."),
            io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=(
                "Start of the window, as a fraction of the whole denoising (0 = pure noise), "
                "like ComfyUI's start_percent inputs: the same for every way of splitting the steps.")),
            io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=(
                "End of the window (1 = the end of denoising). Half-open: '0 to 0.4' covers "
                "the steps that start before 40 %, e.g. 8 of 20 steps.")),
            _lambda("lambda_outside", 0.0, "interval only: λ outside the window."),
            io.String.Input("custom_values", default="1, 1, 1, 0.5, 0", multiline=False, tooltip=(
                "custom only: one λ per sampler step, separated by commas: the "
                "k-th value is the k-th step's, for every scheduler (Heun's "
                "corrector takes its step's value; a KSamplerAdvanced part or "
                "SplitSigmas half takes its own steps' values). Past the last "
                "value the last one holds; values past the sampler's last step are not used.")),
            # Drawn in the editor only: the front end leaves it out of the prompt, so changing it
            # re-runs nothing.
            io.Int.Input("preview_steps", default=20, min=1, max=1000, optional=True, tooltip=(
                "Steps to mark on the preview (the sampler's steps). Only changes the drawing: nothing is re-run.")),
            io.Custom("FLOATS").Input("custom_floats", optional=True, tooltip=(
                "custom only: one λ per sampler step from another node (as custom_values); overrides custom_values.")),
            pair_input(optional=True, tooltip="Optional: the pair, to show the emulated β/λ when its β is known."),
        ], [Schedule.Output(display_name="lambda_schedule",
                            tooltip="Connect to the lambda_schedule input of a DeRaDiff sampler node.")])

    @classmethod
    def execute(cls, shape, lambda_from, lambda_to, start_percent, end_percent, lambda_outside, custom_values,
                preview_steps=None, custom_floats=None, pair=None):
        # NaN passes ComfyUI's min/max validation: every number is checked here, by input name
        lambda_from, lambda_to, lambda_outside = (check_lambda_input(cls.NODE, v, name) for v, name in (
            (lambda_from, "lambda_from"), (lambda_to, "lambda_to"), (lambda_outside, "lambda_outside")))
        start_percent = check_number(cls.NODE, "start_percent", start_percent, 0.0, 1.0)
        end_percent = check_number(cls.NODE, "end_percent", end_percent, 0.0, 1.0)
        values = None
        if shape == "custom":
            if custom_floats is not None:
                try:
                    values = [float(v) for v in (custom_floats.tolist() if hasattr(custom_floats, "tolist") else custom_floats)]
                except (TypeError, ValueError):
                    raise NodeInputError(cls.NODE, "custom_floats", "expected a list of numbers") from None
                where = "custom_floats"
            else:
                try:
                    values = parse_values(custom_values)
                except ValueError as e:
                    raise NodeInputError(cls.NODE, "custom_values", f"{e}; write numbers separated by commas, e.g. '1, 1, 0.5, 0'") from None
                where = "custom_values"
            if not values:
                raise NodeInputError(cls.NODE, where, "a custom schedule needs at least one λ value")
            bad = [v for v in values if not v >= 0 or v == float("inf")]
            if bad:
                raise NodeInputError(cls.NODE, where, f"λ values must be finite and >= 0, got {bad[0]:g}")
        if end_percent < start_percent:
            raise NodeInputError(cls.NODE, "end_percent", f"end_percent ({end_percent}) is before start_percent ({start_percent})")
        schedule = LambdaSchedule(shape, lambda_from, lambda_to, start_percent, end_percent, lambda_outside, values)
        # The editor draws the preview from the curve (step marks and β/λ are its own, so they
        # change without a run); a custom list is drawn per sampler step from its values (the last
        # one held up to preview_steps, as the samplers hold it).
        preview = {"curve": schedule.curve(), "custom_steps": len(values) if shape == "custom" else 0,
                   "beta": float(getattr(pair, "beta", 0.0) or 0.0)}
        if shape == "custom":
            preview["custom_values"] = list(values)
        return io.NodeOutput(schedule, ui={"deradiff": [schedule.describe()], "deradiff_preview": [preview]})
