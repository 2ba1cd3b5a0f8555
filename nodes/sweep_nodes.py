from __future__ import annotations

import math
import re

import torch

from ..sampler.plots import fmt_number, labelled_grid
from ..sampler.realign_model import realigned_model
from ..sampler.schedules import parse_values
from ..sampler.sweep import lambda_sweep
from .common import (CATEGORY, FULL_PASS_INPUT, LAMBDA_INPUT, PAIR_INPUT, SCHEDULE_INPUT, NodeInputError,
                     check_full_pass_every, check_pair,
                     check_sampler_inputs, check_sampling_numbers, lambda_or_schedule, sampler_inputs)



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


class DeRaDiffLambdaSweep:
    NODE = "DeRaDiff λ Sweep"
    DESCRIPTION = ("The DeRaDiff evaluation protocol: several λ with one seed, in ONE batched sampling "
                   "pass (every model call carries all λ). Each λ gives exactly what DeRaDiff KSampler "
                   "gives for that λ and seed. Feed the images and labels to DeRaDiff Sweep Grid.")
    RETURN_TYPES = ("LATENT", "STRING", "FLOAT")
    RETURN_NAMES = ("latents", "labels", "lambdas")
    OUTPUT_IS_LIST = (False, False, True)
    OUTPUT_TOOLTIPS = ("All results as one batch, λ-major (all images of the first λ, then the next, ...).",
                       "One label per image (λ and, when β is known, β/λ), one per line, for the grid.",
                       "The λ values, in order.")
    FUNCTION = "sweep"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pair": PAIR_INPUT,
                "lambdas": ("STRING", {"default": "0, 0.5, 1, 1.5, 2", "tooltip":
                                       "λ values to compare, separated by commas. 0 = reference, 1 = aligned."}),
                **sampler_inputs(),
            },
            "optional": {
                "max_lambdas_per_pass": ("INT", {
                    "default": 0, "min": 0, "max": 256,
                    "tooltip": "How many λ one batched sampling pass may carry. 0 = automatic: as many as "
                               "fit in free GPU memory by ComfyUI's own estimate (every model call carries "
                               "λ count x batch images; 8 λ of SDXL at 1024x1024 need several GB). Lower it "
                               "if you run out of memory; results are the same either way."}),
                "full_pass_every": FULL_PASS_INPUT,
            },
        }

    def sweep(self, pair, lambdas, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
              denoise=1.0, max_lambdas_per_pass=0, full_pass_every=1):
        check_pair(self.NODE, pair)
        try:
            values = parse_values(lambdas)
        except ValueError as e:
            raise NodeInputError(self.NODE, "lambdas", f"{e}; write λ values separated by commas, e.g. '0, 0.5, 1, 2'") from None
        if not values:
            raise NodeInputError(self.NODE, "lambdas", "give at least one λ value")
        bad = [v for v in values if not (v >= 0 and math.isfinite(v))]
        if bad:
            raise NodeInputError(self.NODE, "lambdas", f"λ must be a finite number >= 0, got {bad[0]:g}")
        cfg, denoise = check_sampling_numbers(self.NODE, cfg, denoise)
        check_sampler_inputs(self.NODE, positive, negative, latent_image)
        every = check_full_pass_every(self.NODE, full_pass_every)
        out = lambda_sweep(pair, values, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                           latent_image, denoise, max_per_pass=max_lambdas_per_pass, full_pass_every=every)
        per_lambda = latent_image["samples"].shape[0]
        labels = [sweep_label(v, pair.beta) for v in values for _ in range(per_lambda)]
        return (out, "\n".join(labels), values)


class DeRaDiffSweepGrid:
    NODE = "DeRaDiff Sweep Grid"
    DESCRIPTION = "Lays out decoded sweep images in a grid with a label (λ, β/λ) under each."
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("All sweep images in one grid, each labelled with its λ (and β/λ).",)
    FUNCTION = "grid"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The decoded sweep latents (VAE Decode of the sweep's latents)."}),
                "labels": ("STRING", {"forceInput": True, "tooltip": "The sweep's labels output."}),
                "columns": ("INT", {"default": 0, "min": 0, "max": 64,
                                    "tooltip": "Images per row; 0 = automatic (one row up to 8 images, else about square)."}),
            },
            "optional": {
                # The pair loader's β is not sent to the server (so changing it re-runs nothing
                # expensive); the editor fills this one from it, and only the grid re-runs.
                "beta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 0.1,
                                   "tooltip": "β the aligned model was trained at, to label each image with "
                                              "the emulated β/λ. 0 = the β of the pair loader feeding the "
                                              "sweep (or none). Changing it only redraws the grid."}),
            },
        }

    def grid(self, images, labels, columns, beta=0.0):
        if getattr(images, "ndim", 0) != 4:
            raise NodeInputError(self.NODE, "images", f"expected an IMAGE batch (VAE Decode of the sweep's "
                                 f"latents), got {type(images).__name__}")
        if not isinstance(labels, str):
            raise NodeInputError(self.NODE, "labels", f"expected the sweep's labels (text), got {type(labels).__name__}")
        if not (beta >= 0 and math.isfinite(beta)):
            raise NodeInputError(self.NODE, "beta", f"β must be a finite number >= 0, got {beta}")
        lines = [with_beta(line, beta) for line in labels.split("\n")] if labels else []
        if len(lines) != images.shape[0]:
            raise NodeInputError(self.NODE, "labels", f"{len(lines)} labels for {images.shape[0]} images; connect "
                                 "the labels output of the same λ Sweep whose latents were decoded")
        grid = labelled_grid(images.cpu().float().numpy(), lines, columns)
        return (torch.from_numpy(grid),)


class DeRaDiffRealignModel:
    NODE = "DeRaDiff Realign Model"
    DESCRIPTION = ("Returns a MODEL whose every evaluation is the DeRaDiff mix of the pair, for use in "
                   "KSampler, KSamplerAdvanced, SamplerCustom, detailers and upscalers of other packs. "
                   "The aligned model is attached so ComfyUI loads both together.")
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The realigned model.",)
    FUNCTION = "realign"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"pair": PAIR_INPUT, "lambda": LAMBDA_INPUT},
            "optional": {"lambda_schedule": SCHEDULE_INPUT, "full_pass_every": FULL_PASS_INPUT},
        }

    def realign(self, pair, **kwargs):
        check_pair(self.NODE, pair)
        lam, _ = lambda_or_schedule(self.NODE, kwargs)
        every = check_full_pass_every(self.NODE, kwargs.get("full_pass_every", 1))
        return (realigned_model(pair, lam, every),)
