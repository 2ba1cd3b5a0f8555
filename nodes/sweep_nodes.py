from __future__ import annotations

import math
import re

import torch

from comfy_api.latest import io

from ..sampler.plots import fmt_number, labelled_grid
from ..sampler.realign_model import realigned_model
from ..sampler.schedules import parse_values
from ..sampler.sweep import lambda_sweep
from .common import (NodeInputError, check_full_pass_every, combo_validation, check_pair, check_sampler_inputs, check_sampling_numbers,
                     full_pass_input, lambda_input, lambda_or_schedule, pair_input, sampler_inputs, schedule_input,
                     schema)
from .v3_features import advanced



def sweep_label(lam: float, beta) -> str:
    if not beta:
        return f"λ={lam:g}"
    return f"λ={lam:g}  β/λ={'∞' if lam == 0 else fmt_number(beta / lam)}"


_LAMBDA_ONLY = re.compile(r"^\s*λ=([0-9.eE+-]+)\s*$")


def with_beta(label: str, beta) -> str:
    """A λ-only sweep label with β/λ added; any other label as it is."""
    m = _LAMBDA_ONLY.match(label)
    if not beta or m is None:
        return label
    try:
        return sweep_label(float(m.group(1)), beta)
    except ValueError:
        return label


class DeRaDiffLambdaSweep(io.ComfyNode):
    NODE = "DeRaDiff λ Sweep"
    validate_inputs = combo_validation('sampler_name', 'scheduler')
    ABOUT = ("The DeRaDiff evaluation protocol: several λ with one seed, in ONE batched sampling "
             "pass (every model call carries all λ). Each λ gives exactly what DeRaDiff KSampler "
             "gives for that λ and seed. Feed the images and labels to DeRaDiff Sweep Grid.")

    @classmethod
    def define_schema(cls):
        return schema("DeRaDiffLambdaSweep", cls.NODE, cls.ABOUT, [
            pair_input(),
            io.String.Input("lambdas", default="0, 0.5, 1, 1.5, 2", tooltip=(
                "λ values to compare, separated by commas. 0 = reference, 1 = aligned.")),
            *sampler_inputs(),
            io.Int.Input("max_lambdas_per_pass", default=0, min=0, max=256, optional=True, tooltip=(
                "How many λ one batched sampling pass may carry. 0 = automatic: as many as "
                "fit in free GPU memory by ComfyUI's own estimate (every model call carries "
                "λ count x batch images; 8 λ of SDXL at 1024x1024 need several GB). Lower it "
                "if you run out of memory; results are the same either way."), **advanced()),
            full_pass_input(),
        ], [
            io.Latent.Output(display_name="latents", tooltip=(
                "All results as one batch, λ-major (all images of the first λ, then the next, ...).")),
            io.String.Output(display_name="labels", tooltip=(
                "One label per image (λ and, when β is known, β/λ), one per line, for the grid.")),
            io.Float.Output(display_name="lambdas", is_output_list=True, tooltip="The λ values, in order."),
        ])

    @classmethod
    def execute(cls, pair, lambdas, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise=1.0, max_lambdas_per_pass=0, full_pass_every=1):
        check_pair(cls.NODE, pair)
        try:
            values = parse_values(lambdas)
        except ValueError as e:
            raise NodeInputError(cls.NODE, "lambdas", f"{e}; write λ values separated by commas, e.g. '0, 0.5, 1, 2'") from None
        if not values:
            raise NodeInputError(cls.NODE, "lambdas", "give at least one λ value")
        bad = [v for v in values if not (v >= 0 and math.isfinite(v))]
        if bad:
            raise NodeInputError(cls.NODE, "lambdas", f"λ must be a finite number >= 0, got {bad[0]:g}")
        cfg, denoise = check_sampling_numbers(cls.NODE, cfg, denoise)
        check_sampler_inputs(cls.NODE, positive, negative, latent_image)
        every = check_full_pass_every(cls.NODE, full_pass_every)
        out = lambda_sweep(pair, values, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                           latent_image, denoise, max_per_pass=max_lambdas_per_pass, full_pass_every=every)
        per_lambda = latent_image["samples"].shape[0]
        labels = [sweep_label(v, pair.beta) for v in values for _ in range(per_lambda)]
        return io.NodeOutput(out, "\n".join(labels), values)


class DeRaDiffSweepGrid(io.ComfyNode):
    NODE = "DeRaDiff Sweep Grid"
    ABOUT = "Lays out decoded sweep images in a grid with a label (λ, β/λ) under each."

    @classmethod
    def define_schema(cls):
        return schema("DeRaDiffSweepGrid", cls.NODE, cls.ABOUT, [
            io.Image.Input("images", tooltip="The decoded sweep latents (VAE Decode of the sweep's latents)."),
            io.String.Input("labels", force_input=True, tooltip="The sweep's labels output."),
            io.Int.Input("columns", default=0, min=0, max=64, tooltip=(
                "Images per row; 0 = automatic (one row up to 8 images, else about square).")),
            # The pair loader's β is not sent to the server (so changing it re-runs nothing
            # expensive); the editor fills this one from it, and only the grid re-runs.
            io.Float.Input("beta", default=0.0, min=0.0, max=1e6, step=0.1, optional=True, tooltip=(
                "β the aligned model was trained at, to label each image with "
                "the emulated β/λ. 0 = the β of the pair loader feeding the "
                "sweep (or none). Changing it only redraws the grid.")),
        ], [io.Image.Output(display_name="grid",
                            tooltip="All sweep images in one grid, each labelled with its λ (and β/λ).")])

    @classmethod
    def execute(cls, images, labels, columns, beta=0.0):
        if getattr(images, "ndim", 0) != 4:
            raise NodeInputError(cls.NODE, "images", f"expected an IMAGE batch (VAE Decode of the sweep's "
                                 f"latents), got {type(images).__name__}")
        if not isinstance(labels, str):
            raise NodeInputError(cls.NODE, "labels", f"expected the sweep's labels (text), got {type(labels).__name__}")
        if not (beta >= 0 and math.isfinite(beta)):
            raise NodeInputError(cls.NODE, "beta", f"β must be a finite number >= 0, got {beta}")
        lines = [with_beta(line, beta) for line in labels.split("\n")] if labels else []
        if len(lines) != images.shape[0]:
            raise NodeInputError(cls.NODE, "labels", f"{len(lines)} labels for {images.shape[0]} images; connect "
                                 "the labels output of the same λ Sweep whose latents were decoded")
        grid = labelled_grid(images.cpu().float().numpy(), lines, columns)
        return io.NodeOutput(torch.from_numpy(grid))


class DeRaDiffRealignModel(io.ComfyNode):
    NODE = "DeRaDiff Realign Model"
    ABOUT = ("Returns a MODEL whose every evaluation is the DeRaDiff mix of the pair, for use in "
             "KSampler, KSamplerAdvanced, SamplerCustom, detailers and upscalers of other packs. "
             "The aligned model is attached so ComfyUI loads both together.")

    @classmethod
    def define_schema(cls):
        return schema("DeRaDiffRealignModel", cls.NODE, cls.ABOUT,
                      [pair_input(), lambda_input(), schedule_input(), full_pass_input()],
                      [io.Model.Output(tooltip="The realigned model.")])

    @classmethod
    def execute(cls, pair, **kwargs):
        check_pair(cls.NODE, pair)
        lam, _ = lambda_or_schedule(cls.NODE, kwargs)
        every = check_full_pass_every(cls.NODE, kwargs.get("full_pass_every", 1))
        return io.NodeOutput(realigned_model(pair, lam, every))
