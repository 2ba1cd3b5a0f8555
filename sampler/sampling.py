"""KSampler-shaped entry point for realigned sampling."""
from __future__ import annotations

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


def realigned_ksampler(pair, lam, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                       latent, denoise=1.0, callback=None, full_pass_every=1):
    """common_ksampler with a DeRaDiffGuider in place of the CFGGuider (``callback``: instead of its
    own progress bar and preview)."""
    reference = pair.reference
    latent_image = comfy.sample.fix_empty_latent_channels(reference, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = ksampler_sigmas(reference, steps, sampler_name, scheduler, denoise)

    guider = DeRaDiffGuider(pair, lam, cfg, full_pass_every)
    guider.set_conds(positive, negative)
    callback = callback or latent_preview.prepare_callback(reference, steps)
    samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out
