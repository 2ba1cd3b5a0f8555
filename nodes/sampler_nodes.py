from __future__ import annotations

import logging

from ..sampler.guider import DeRaDiffGuider
from ..sampler.sampling import realigned_ksampler
from .particle_inputs import PARTICLES_INPUT, RESAMPLE_ESS_INPUT, check_particles
from .common import (CATEGORY, FULL_PASS_INPUT, LAMBDA_INPUT, check_full_pass_every, PAIR_INPUT, SCHEDULE_INPUT, check_number, check_pair,
                     check_sampler_inputs, check_sampling_numbers, emulated_beta_text, lambda_or_schedule, sampler_inputs)

log = logging.getLogger("DeRaDiff")



def _ui_text(pair, lam, schedule_text):
    return schedule_text or emulated_beta_text(pair.beta, lam)


def _ui(text, schedule_text):
    # The editor writes the constant-λ line itself (β comes from the pair loader's widget, which is
    # not sent to the server); it only takes the server's line for a schedule.
    return {"deradiff": [text], "deradiff_schedule": [schedule_text is not None]}


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
                **sampler_inputs(),
            },
            "optional": {"lambda_schedule": SCHEDULE_INPUT, "full_pass_every": FULL_PASS_INPUT,
                         "particles": PARTICLES_INPUT, "resample_ess": RESAMPLE_ESS_INPUT},
        }

    def sample(self, pair, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0, **kwargs):
        check_pair(self.NODE, pair)
        lam, schedule_text = lambda_or_schedule(self.NODE, kwargs)
        cfg, denoise = check_sampling_numbers(self.NODE, cfg, denoise)
        check_sampler_inputs(self.NODE, positive, negative, latent_image)
        every = check_full_pass_every(self.NODE, kwargs.get("full_pass_every", 1))
        text = _ui_text(pair, lam, schedule_text)
        log.info("DeRaDiff KSampler: %s", text)
        particles, resample_below = check_particles(self.NODE, kwargs, every)
        if particles > 1:
            from ..sampler.particle_sampler import particle_ksampler
            out, state = particle_ksampler(pair, lam, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                           latent_image, denoise, particles, resample_below, self.NODE)
            ui = _ui(text, schedule_text)
            ui["deradiff_particles"] = [state.summary_text()]
            return {"ui": ui, "result": (out,)}
        out = realigned_ksampler(pair, lam, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                 latent_image, denoise, full_pass_every=every)
        return {"ui": _ui(text, schedule_text), "result": (out,)}


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
            },
            "optional": {"lambda_schedule": SCHEDULE_INPUT, "full_pass_every": FULL_PASS_INPUT,
                         "particles": PARTICLES_INPUT, "resample_ess": RESAMPLE_ESS_INPUT},
        }

    def get_guider(self, pair, positive, negative, cfg, **kwargs):
        check_pair(self.NODE, pair)
        lam, schedule_text = lambda_or_schedule(self.NODE, kwargs)
        cfg = check_number(self.NODE, "cfg", cfg)
        check_sampler_inputs(self.NODE, positive, negative)
        every = check_full_pass_every(self.NODE, kwargs.get("full_pass_every", 1))
        particles, resample_below = check_particles(self.NODE, kwargs, every)
        if particles > 1:  # the particle loop replaces the SAMPLER given to SamplerCustomAdvanced at run time
            from ..sampler.particle_sampler import ParticleGuider
            guider = ParticleGuider(pair, lam, cfg, particles, resample_below, self.NODE)
        else:
            guider = DeRaDiffGuider(pair, lam, cfg, every)
        guider.set_conds(positive, negative)
        ui = _ui(_ui_text(pair, lam, schedule_text), schedule_text)
        if particles > 1:
            ui["deradiff_particles"] = [f"{particles} particles per image (needs an euler_ancestral SAMPLER "
                                        "with eta 1 and s_noise 1, or ddpm); ESS in the log"]
        return {"ui": ui, "result": (guider,)}
