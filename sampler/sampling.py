"""KSampler-shaped entry point for realigned sampling."""
from __future__ import annotations

import inspect

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from .guider import DeRaDiffGuider


def ksampler_sigmas(model, steps, sampler_name, scheduler, denoise):
    """Exactly the sigmas ComfyUI's KSampler would use (denoise, discard-penultimate rules)."""
    return comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                   scheduler=scheduler, denoise=denoise,
                                   model_options=model.model_options).sigmas


_LATENT_RATIOS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def _core_knows_latent_ratios() -> bool:
    """Newer ComfyUI (0.3x) records a VAE's downscale ratios in empty latents; its KSampler rescales
    such a latent for the model and drops the ratios from its output. 0.3.75 does neither."""
    return "downscale_ratio_spacial" in inspect.signature(comfy.sample.fix_empty_latent_channels).parameters


def prepare_latent(model, latent):
    """The latent image as core's common_ksampler prepares it for ``model``: empty latents get the
    model's channels and, where this ComfyUI knows them, its spatial/temporal scale from the
    latent's recorded downscale ratios."""
    if _core_knows_latent_ratios():
        return comfy.sample.fix_empty_latent_channels(model, latent["samples"],
                                                      *(latent.get(name) for name in _LATENT_RATIOS))
    return comfy.sample.fix_empty_latent_channels(model, latent["samples"])


def finished_latent(latent, samples, exclude=()):
    """The LATENT core's KSampler returns: samples on the intermediate device, in the intermediate
    dtype where this ComfyUI has one (--fp16-intermediates), without the ratios where core drops
    them (the samples are at the model's own scale now)."""
    target = {"device": comfy.model_management.intermediate_device()}
    if hasattr(comfy.model_management, "intermediate_dtype"):
        target["dtype"] = comfy.model_management.intermediate_dtype()
    dropped = set(exclude) | (set(_LATENT_RATIOS) if _core_knows_latent_ratios() else set())
    out = {k: v for k, v in latent.items() if k not in dropped}
    out["samples"] = samples.to(**target)
    return out


def realigned_ksampler(pair, lam, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                       latent, denoise=1.0, callback=None, full_pass_every=1):
    """common_ksampler with a DeRaDiffGuider in place of the CFGGuider (``callback``: instead of its
    own progress bar and preview)."""
    reference = pair.reference
    latent_image = prepare_latent(reference, latent)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = ksampler_sigmas(reference, steps, sampler_name, scheduler, denoise)

    guider = DeRaDiffGuider(pair, lam, cfg, full_pass_every)
    guider.set_conds(positive, negative)
    callback = callback or latent_preview.prepare_callback(reference, steps)
    samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return finished_latent(latent, samples)
