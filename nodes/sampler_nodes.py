from __future__ import annotations

import logging

from comfy_api.latest import io

from ..sampler.guider import DeRaDiffGuider
from ..sampler.sampling import realigned_ksampler
from .common import (check_full_pass_every, combo_validation, check_number, check_pair, check_sampler_inputs, check_sampling_numbers,
                     conditioning_inputs, emulated_beta_text, full_pass_input, lambda_input, lambda_or_schedule,
                     pair_input, sampler_inputs, schedule_input, schema)
from .particle_inputs import (check_particle_options, check_particles, particle_rule_input, particle_select_input,
                              particles_input, resample_ess_input)

log = logging.getLogger("DeRaDiff")


def _ui_text(pair, lam, schedule_text):
    return schedule_text or emulated_beta_text(pair.beta, lam)


def _ui(text, schedule_text):
    # The editor writes the constant-λ line itself (β comes from the pair loader's widget, which is
    # not sent to the server); it only takes the server's line for a schedule.
    return {"deradiff": [text], "deradiff_schedule": [schedule_text is not None]}


def _expert_inputs():
    return [schedule_input(), full_pass_input(), particles_input(), resample_ess_input(), particle_rule_input(),
            particle_select_input()]


class DeRaDiffKSampler(io.ComfyNode):
    NODE = "DeRaDiff KSampler"
    validate_inputs = combo_validation('sampler_name', 'scheduler', 'particle_rule')
    ABOUT = ("A drop-in KSampler that samples from the geometric mixture of a reference and an "
             "aligned model: λ dials the alignment strength at sampling time (emulating a model "
             "aligned at β/λ) without retraining.")

    @classmethod
    def define_schema(cls):
        return schema("DeRaDiffKSampler", cls.NODE, cls.ABOUT,
                      [pair_input(), lambda_input(), *sampler_inputs(), *_expert_inputs()],
                      [io.Latent.Output(tooltip="The denoised latent.")])

    @classmethod
    def execute(cls, pair, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise=1.0, **kwargs):
        check_pair(cls.NODE, pair)
        lam, schedule_text = lambda_or_schedule(cls.NODE, kwargs)
        cfg, denoise = check_sampling_numbers(cls.NODE, cfg, denoise)
        check_sampler_inputs(cls.NODE, positive, negative, latent_image)
        every = check_full_pass_every(cls.NODE, kwargs.get("full_pass_every", 1))
        text = _ui_text(pair, lam, schedule_text)
        log.info("DeRaDiff KSampler: %s", text)
        particles, resample_below = check_particles(cls.NODE, kwargs, every)
        options = check_particle_options(cls.NODE, kwargs)
        if particles > 1:
            from ..sampler.particle_sampler import particle_ksampler
            out, state = particle_ksampler(pair, lam, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                           latent_image, denoise, particles, resample_below, cls.NODE, **options)
            ui = _ui(text, schedule_text)
            ui["deradiff_particles"] = [state.summary_text()]
            return io.NodeOutput(out, ui=ui)
        out = realigned_ksampler(pair, lam, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                 latent_image, denoise, full_pass_every=every)
        return io.NodeOutput(out, ui=_ui(text, schedule_text))


class DeRaDiffGuiderNode(io.ComfyNode):
    NODE = "DeRaDiff Guider"
    validate_inputs = combo_validation('particle_rule')
    ABOUT = ("DeRaDiff realignment as a GUIDER for SamplerCustomAdvanced, so custom sigmas, "
             "samplers and noise work too.")

    @classmethod
    def define_schema(cls):
        cfg = io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                             tooltip="Classifier-free guidance scale, applied to each model separately.")
        return schema("DeRaDiffGuider", cls.NODE, cls.ABOUT,
                      [pair_input(), *conditioning_inputs(), cfg, lambda_input(), *_expert_inputs()],
                      [io.Guider.Output(tooltip="A guider that mixes the pair's two models with weight λ.")])

    @classmethod
    def execute(cls, pair, positive, negative, cfg, **kwargs):
        check_pair(cls.NODE, pair)
        lam, schedule_text = lambda_or_schedule(cls.NODE, kwargs)
        cfg = check_number(cls.NODE, "cfg", cfg)
        check_sampler_inputs(cls.NODE, positive, negative)
        every = check_full_pass_every(cls.NODE, kwargs.get("full_pass_every", 1))
        particles, resample_below = check_particles(cls.NODE, kwargs, every)
        options = check_particle_options(cls.NODE, kwargs)
        if particles > 1:  # the particle loop replaces the SAMPLER given to SamplerCustomAdvanced at run time
            from ..sampler.particle_sampler import ParticleGuider
            guider = ParticleGuider(pair, lam, cfg, particles, resample_below, cls.NODE, **options)
        else:
            guider = DeRaDiffGuider(pair, lam, cfg, every)
        guider.set_conds(positive, negative)
        ui = _ui(_ui_text(pair, lam, schedule_text), schedule_text)
        if particles > 1:
            ui["deradiff_particles"] = [f"{particles} particles per image (needs an euler_ancestral SAMPLER "
                                        "with eta 1 and s_noise 1, or ddpm); ESS in the log"]
        return io.NodeOutput(guider, ui=ui)
