from __future__ import annotations

import logging

import comfy.samplers

from ..sampler.guider import DeRaDiffGuider
from ..sampler.sampling import realigned_ksampler
from .common import CATEGORY, LAMBDA_INPUT, PAIR_TYPE, NodeInputError, check_lambda_input, emulated_beta_text

log = logging.getLogger("DeRaDiff")

PAIR_INPUT = (PAIR_TYPE, {"tooltip": "The reference + aligned model pair, from Load / Make Aligned "
                                     "Model Pair."})


def _check_pair(node, pair):
    if not hasattr(pair, "reference") or not hasattr(pair, "aligned"):
        raise NodeInputError(node, "pair", f"expected a DERADIFF_PAIR, got {type(pair).__name__}")
    return pair


class DeRaDiffKSampler:
    NODE = "DeRaDiff KSampler"
    DESCRIPTION = ("A drop-in KSampler that samples from the geometric mixture of a reference and an "
                   "aligned model: λ dials the alignment strength at sampling time (emulating a model "
                   "aligned at β/λ) without retraining.")
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pair": PAIR_INPUT,
                "lambda": LAMBDA_INPUT,
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                                 "tooltip": "The random seed used for creating the noise."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                                  "tooltip": "The number of denoising steps."}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale, applied to each model "
                                             "separately before the two are mixed."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampling algorithm. Every ComfyUI sampler works."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The noise schedule."}),
                "positive": ("CONDITIONING", {"tooltip": "What to include in the image (used by both models)."}),
                "negative": ("CONDITIONING", {"tooltip": "What to exclude from the image (used by both models)."}),
                "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "The amount of denoising; below 1 keeps the input's structure (img2img)."}),
            }
        }

    def sample(self, pair, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0, **kwargs):
        _check_pair(self.NODE, pair)
        lam = check_lambda_input(self.NODE, kwargs.get("lambda", 1.0))
        log.info("DeRaDiff KSampler: %s", emulated_beta_text(pair.beta, lam))
        out = realigned_ksampler(pair, lam, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                 latent_image, denoise)
        return {"ui": {"deradiff": [emulated_beta_text(pair.beta, lam)]}, "result": (out,)}


class DeRaDiffGuiderNode:
    NODE = "DeRaDiff Guider"
    DESCRIPTION = ("DeRaDiff realignment as a GUIDER for SamplerCustomAdvanced, so custom sigmas, "
                   "samplers and noise work too.")
    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("A guider that mixes the pair's two models with weight λ.",)
    FUNCTION = "get_guider"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pair": PAIR_INPUT,
                "positive": ("CONDITIONING", {"tooltip": "What to include in the image (used by both models)."}),
                "negative": ("CONDITIONING", {"tooltip": "What to exclude from the image (used by both models)."}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale, applied to each model separately."}),
                "lambda": LAMBDA_INPUT,
            }
        }

    def get_guider(self, pair, positive, negative, cfg, **kwargs):
        _check_pair(self.NODE, pair)
        lam = check_lambda_input(self.NODE, kwargs.get("lambda", 1.0))
        guider = DeRaDiffGuider(pair, lam, cfg)
        guider.set_conds(positive, negative)
        return {"ui": {"deradiff": [emulated_beta_text(pair.beta, lam)]}, "result": (guider,)}
