"""λ sweep in one batched sampling pass.

Every model call carries all λ at once (batch = len(λ) x latent batch, λ-major); each
sample is mixed with its own λ; every λ starts from the seed's initial noise. Samplers that
inject noise during sampling get a noise sampler that draws the noise of ONE λ group and
tiles it, so each λ sees exactly the noise a separate DeRaDiff KSampler run would.
"""
from __future__ import annotations

import inspect
import logging

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy.k_diffusion import sampling as k_sampling

from .guider import DeRaDiffGuider
from .mixing import check_lambda
from .sampling import ksampler_sigmas

log = logging.getLogger("DeRaDiff")

# k-diffusion samplers whose default noise is a Brownian tree (and where it lives)
_BROWNIAN_CPU = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}
_BROWNIAN_GPU = {"dpmpp_sde_gpu", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde_gpu"}


class PerSampleLambda:
    """λ for each batch element: ``lambdas`` repeated over a latent batch of ``group``."""

    def __init__(self, lambdas, group: int):
        self.lambdas = [check_lambda(v) for v in lambdas]
        self.tensor = torch.tensor(self.lambdas, dtype=torch.float32).repeat_interleave(group)

    def value_at(self, sigma, sample_sigmas=None):
        return self.tensor

    @property
    def uses_aligned(self):
        return any(v != 0.0 for v in self.lambdas)

    @property
    def uses_reference(self):
        return any(v != 1.0 for v in self.lambdas)


class TiledNoiseSampler:
    """The sampler's own default noise for one λ group, repeated for every group."""

    def __init__(self, sampler_name, template, seed, sigmas, copies):
        if sampler_name in _BROWNIAN_CPU or sampler_name in _BROWNIAN_GPU:
            positive = sigmas[sigmas > 0]
            self.inner = k_sampling.BrownianTreeNoiseSampler(
                template, positive.min(), sigmas.max(), seed=seed, cpu=sampler_name in _BROWNIAN_CPU)
        else:
            self.inner = k_sampling.default_noise_sampler(template, seed=seed)
        self.copies = copies

    def __call__(self, sigma, sigma_next):
        noise = self.inner(sigma, sigma_next)
        return noise.repeat((self.copies,) + (1,) * (noise.ndim - 1))


def batched_sampler(sampler_name, template, seed, sigmas, copies):
    fn = getattr(k_sampling, f"sample_{sampler_name}", None)
    if (sampler_name in comfy.samplers.KSAMPLER_NAMES and fn is not None
            and sampler_name not in ("dpm_fast", "dpm_adaptive")
            and "noise_sampler" in inspect.signature(fn).parameters):
        return comfy.samplers.KSAMPLER(fn, extra_options={
            "noise_sampler": TiledNoiseSampler(sampler_name, template, seed, sigmas, copies)})
    return comfy.samplers.sampler_object(sampler_name)  # draws no noise per step


def _tile(t, copies):
    return t.repeat((copies,) + (1,) * (t.ndim - 1))


# Adaptive step-size control looks at the error of the whole batch, so batching λ together
# would change every λ's steps: these run one λ after another instead.
SEQUENTIAL_SAMPLERS = {"dpm_adaptive"}


def lambda_sweep(pair, lambdas, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                 denoise=1.0):
    """Returns a LATENT holding len(lambdas) x batch samples, λ-major."""
    if sampler_name in SEQUENTIAL_SAMPLERS:
        from .sampling import realigned_ksampler
        log.info("DeRaDiff λ Sweep: %s adapts its steps to the whole batch; running the %d λ one "
                 "after another so each equals its own DeRaDiff KSampler run.", sampler_name, len(lambdas))
        runs = [realigned_ksampler(pair, lam, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                   latent, denoise) for lam in lambdas]
        out = dict(runs[0])
        out["samples"] = torch.cat([r["samples"] for r in runs])
        out.pop("batch_index", None)
        if "noise_mask" in out and out["noise_mask"].shape[0] == latent["samples"].shape[0] > 1:
            out["noise_mask"] = _tile(out["noise_mask"], len(lambdas))
        return out
    reference = pair.reference
    latent_image = comfy.sample.fix_empty_latent_channels(reference, latent["samples"])
    group, copies = latent_image.shape[0], len(lambdas)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = ksampler_sigmas(reference, steps, sampler_name, scheduler, denoise)
    device = reference.load_device
    template = torch.zeros_like(noise, dtype=torch.float32, device=device)
    sampler = batched_sampler(sampler_name, template, seed, sigmas.to(device), copies)

    mask = latent.get("noise_mask")
    if mask is not None and mask.shape[0] == group and group > 1:
        mask = _tile(mask, copies)
    guider = DeRaDiffGuider(pair, PerSampleLambda(lambdas, group), cfg)
    guider.set_conds(positive, negative)
    callback = latent_preview.prepare_callback(reference, steps)
    samples = guider.sample(_tile(noise, copies), _tile(latent_image, copies), sampler, sigmas,
                            denoise_mask=mask, callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = {k: v for k, v in latent.items() if k not in ("batch_index", "noise_mask")}
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    if mask is not None:
        out["noise_mask"] = mask
    return out
