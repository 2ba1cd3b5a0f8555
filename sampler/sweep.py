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
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import latent_preview
from comfy.k_diffusion import sampling as k_sampling

from .difference_reuse import cheaper_side
from .guider import DeRaDiffGuider
from .mixing import check_lambda
from .sampling import finished_latent, ksampler_sigmas, prepare_latent

log = logging.getLogger("DeRaDiff")

# k-diffusion samplers whose default noise is a Brownian tree (and where it lives)
_BROWNIAN_CPU = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}
_BROWNIAN_GPU = {"dpmpp_sde_gpu", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde_gpu"}


class PerSampleLambda:
    """λ for each batch element: ``lambdas`` repeated over a latent batch of ``group``."""

    def __init__(self, lambdas, group: int):
        self.lambdas = [check_lambda(v) for v in lambdas]
        self.tensor = torch.tensor(self.lambdas, dtype=torch.float32).repeat_interleave(group)

    def value_at(self, sigma, percent_of=None):
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


class TiledInpaintNoise:
    """For samplers whose inpainting re-noises the kept region with fresh noise (ddim:
    ``inpaint_options={"random": True}``, drawn from seed + 1 for the whole batch): draw it
    for ONE λ group, as a separate run would, and tile it."""

    def __init__(self, sampler_function, copies):
        self.sampler_function, self.copies = sampler_function, copies

    def __call__(self, model_k, x, sigmas, *args, **kwargs):
        tiled = getattr(model_k, "noise", None)
        if tiled is not None:
            group = (tiled.shape[0] // self.copies,) + tuple(tiled.shape[1:])
            generator = torch.manual_seed(kwargs.get("extra_args", {}).get("seed", 41) + 1)
            one = torch.randn(group, generator=generator, device="cpu").to(tiled.dtype).to(tiled.device)
            model_k.noise = _tile(one, self.copies)
        return self.sampler_function(model_k, x, sigmas, *args, **kwargs)


def batched_sampler(sampler_name, template, seed, sigmas, copies):
    fn = getattr(k_sampling, f"sample_{sampler_name}", None)
    if (sampler_name in comfy.samplers.KSAMPLER_NAMES and fn is not None
            and sampler_name not in ("dpm_fast", "dpm_adaptive")
            and "noise_sampler" in inspect.signature(fn).parameters):
        return comfy.samplers.KSAMPLER(fn, extra_options={
            "noise_sampler": TiledNoiseSampler(sampler_name, template, seed, sigmas, copies)})
    sampler = comfy.samplers.sampler_object(sampler_name)  # draws no noise per step
    if getattr(sampler, "inpaint_options", {}).get("random", False) and copies > 1:
        options = {k: v for k, v in sampler.inpaint_options.items() if k != "random"}
        sampler = comfy.samplers.KSAMPLER(TiledInpaintNoise(sampler.sampler_function, copies),
                                          extra_options=sampler.extra_options, inpaint_options=options)
    return sampler


def _tile(t, copies):
    return t.repeat((copies,) + (1,) * (t.ndim - 1))


# Adaptive step-size control looks at the error of the whole batch, so batching λ together
# would change every λ's steps: these run one λ after another instead.
SEQUENTIAL_SAMPLERS = {"dpm_adaptive"}


def lambda_sweep(pair, lambdas, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                 denoise=1.0, max_per_pass=0, callback=None, full_pass_every=1):
    """Returns a LATENT holding len(lambdas) x batch samples, λ-major. ``callback(step, x0, x, total)``
    replaces the sweep's own progress bar and preview (a caller that runs several sweeps under one bar)."""
    if sampler_name in SEQUENTIAL_SAMPLERS:
        from .sampling import realigned_ksampler
        log.info("DeRaDiff λ Sweep: %s adapts its steps to the whole batch; running the %d λ one "
                 "after another so each equals its own DeRaDiff KSampler run.", sampler_name, len(lambdas))
        runs = [realigned_ksampler(pair, lam, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                   latent, denoise, callback=None if callback is None else
                                   _offset_callback(callback, i * steps, steps * len(lambdas)),
                                   full_pass_every=full_pass_every)
                for i, lam in enumerate(lambdas)]
        out = dict(runs[0])
        out["samples"] = torch.cat([r["samples"] for r in runs])
        out.pop("batch_index", None)
        if "noise_mask" in out and out["noise_mask"].shape[0] == latent["samples"].shape[0] > 1:
            out["noise_mask"] = _tile(out["noise_mask"], len(lambdas))
        return out
    reference = pair.reference
    latent_image = prepare_latent(reference, latent)
    group = latent_image.shape[0]
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = ksampler_sigmas(reference, steps, sampler_name, scheduler, denoise)
    mask = latent.get("noise_mask")
    per_pass = lambdas_per_pass(pair, latent_image.shape, positive, negative, len(lambdas), max_per_pass)
    passes = plan_passes(lambdas, per_pass, full_pass_every)
    if len(passes) > 1:
        log.info("DeRaDiff λ Sweep: %d λ in %d passes of up to %d (memory per pass: %d images per model call)",
                 len(lambdas), len(passes), per_pass, 2 * per_pass * group)
    progress = callback or latent_preview.prepare_callback(reference, steps * len(passes))
    results = [None] * len(lambdas)
    for index, (positions, chunk) in enumerate(passes):
        comfy.model_management.throw_exception_if_processing_interrupted()
        callback = _offset_callback(progress, index * steps, steps * len(passes))
        samples = _sweep_pass(pair, chunk, group, seed, cfg, sampler_name, positive, negative, noise,
                              latent_image, sigmas, mask, callback, full_pass_every)
        for position, part in zip(positions, samples.split(group)):
            results[position] = part
    out = finished_latent(latent, torch.cat(results), exclude=("batch_index", "noise_mask"))
    if mask is not None:
        out["noise_mask"] = _tile(mask, len(lambdas)) if mask.shape[0] == group and group > 1 else mask
    return out


def plan_passes(lambdas, per_pass, full_pass_every=1):
    """The sweep's passes as (positions in ``lambdas``, λ values). With difference reuse the
    steps between full ones run the reference for λ ≤ 0.5 and the aligned model above (the
    side whose stale term is smaller); a batched pass runs one model for all its rows, so λ of
    the two sides go to separate passes, and each λ still gets exactly its own KSampler run."""
    indexed = list(enumerate(lambdas))
    groups = [indexed]
    if full_pass_every > 1:
        groups = [[(i, v) for i, v in indexed if cheaper_side(v) == side] for side in ("reference", "aligned")]
    passes = []
    for members in groups:
        for start in range(0, len(members), per_pass):
            chunk = members[start:start + per_pass]
            passes.append(([i for i, _ in chunk], [v for _, v in chunk]))
    return passes


def _sweep_pass(pair, lambdas, group, seed, cfg, sampler_name, positive, negative, noise, latent_image,
                sigmas, mask, callback, full_pass_every=1):
    copies = len(lambdas)
    device = pair.reference.load_device
    template = torch.zeros_like(noise, dtype=torch.float32, device=device)
    sampler = batched_sampler(sampler_name, template, seed, sigmas.to(device), copies)
    if mask is not None and mask.shape[0] == group and group > 1:
        mask = _tile(mask, copies)
    guider = DeRaDiffGuider(pair, PerSampleLambda(lambdas, group), cfg, full_pass_every)
    guider.set_conds(positive, negative)
    return guider.sample(_tile(noise, copies), _tile(latent_image, copies), sampler, sigmas,
                         denoise_mask=mask, callback=callback,
                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)


def _offset_callback(callback, offset, total):
    """One progress bar (and live preview) over all passes of a sweep."""
    return lambda step, x0, x, total_steps: callback(offset + step, x0, x, total)


def lambdas_per_pass(pair, latent_shape, positive, negative, count, max_per_pass=0) -> int:
    """How many λ one batched pass may carry: ``max_per_pass`` when given, else as many as fit
    in the sampling device's memory by ComfyUI's own estimate (the model's memory_required for
    cond + uncond of the whole batch), after the weights of both models."""
    if max_per_pass and max_per_pass > 0:
        return max(1, min(count, int(max_per_pass)))
    reference = pair.reference
    device = reference.load_device
    try:
        conds = {"positive": comfy.sampler_helpers.convert_cond(positive),
                 "negative": comfy.sampler_helpers.convert_cond(negative)}
        per_lambda, _ = comfy.sampler_helpers.estimate_memory(reference, list(latent_shape), conds)
    except Exception as e:  # an estimate we cannot make must not stop the sweep
        log.debug("DeRaDiff λ Sweep: no memory estimate (%s); one pass", e)
        return count
    weights = reference.model_size()
    side = pair.aligned_side()
    if side.patcher is not None:
        weights += side.patcher.model_size()
    budget = (comfy.model_management.get_total_memory(device) - weights
              - comfy.model_management.minimum_inference_memory())
    return max(1, min(count, int(budget // max(per_lambda, 1))))
