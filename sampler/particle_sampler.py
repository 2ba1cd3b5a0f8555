"""Particle realignment inside ComfyUI: the sampler loops and the guider that runs N particles per image.

The math (log Z_t, ESS, resampling, the output draw) is in ``particles.py``. Here:

- ``particle_loop``: ComfyUI's own ``euler_ancestral`` / ``ddpm`` step, line for line (the same
  k-diffusion helpers, same noise sampler, same order), plus a weight step: after the model call
  at x_t it reads both models' predictions from the DeRaDiffGuider's ``prediction_observer``,
  adds the log-weight of the interval since the previous model call (trapezoid rule over its two
  ends, particles.interval_log_weight) and resamples x_t (and its denoised prediction) when the
  ESS is low, before the step is taken. Run as a ``comfy.samplers.KSAMPLER``, so noise scaling, inpainting,
  the progress bar, previews and cancel work as for any sampler.
- ``ParticleGuider``: a DeRaDiffGuider whose ``sample`` runs N particles per latent (batch N·B,
  particle-major), swaps the SAMPLER it is given for the particle loop of the same kernel (refusing
  eta or s_noise != 1: ``check_full_noise``) and returns one latent per image, drawn with the final
  weights.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.samplers
from comfy.k_diffusion import sampling as kds

from .guider import DeRaDiffGuider
from .particles import (ParticleState, ddpm_gain, euler_ancestral_gain, gather_particles, gather_weights,
                        interval_log_weight, pick, site_sum,
                        squared_difference)

log = logging.getLogger("DeRaDiff")

STOCHASTIC = ("euler_ancestral", "ddpm")
WEIGHT_RULES = ("trapezoid", "start")  # particles.ParticleState.weight_rule
_FUNCTIONS = {"sample_euler_ancestral": "euler_ancestral", "sample_ddpm": "ddpm"}


class ParticleModeError(ValueError):
    """Particle mode refused, reported with the node and input (same wording as nodes/common.py)."""

    def __init__(self, node: str, input_name: str, message: str):
        super().__init__(f"{node}: input '{input_name}': {message}")


def refuse_sampler(node: str, sampler_name: str, input_name: str = "sampler_name"):
    raise ParticleModeError(node, input_name, (
        f"particles > 1 needs a stochastic sampler whose step adds fresh noise ({', '.join(STOCHASTIC)}); "
        f"'{sampler_name}' is not one of them. The particle weight is the normaliser of the two models' "
        "noisy reverse kernels; a deterministic step has none, so there is nothing to weight. Choose "
        "euler_ancestral or ddpm, or set particles to 1."))


def check_full_noise(node: str, options: dict):
    """The weights need every step to be the models' reverse-SDE step (eta = 1, s_noise = 1): only then is
    the aligned model's path the reference's tilted by exp(r/β), so that the geometric mixture of the two
    paths is the model aligned at β/λ. With eta < 1 part of each step is deterministic and the mixture of
    the paths is not that model (at eta = 0 the paths are points), so refuse rather than weight wrongly."""
    eta, s_noise = float(options.get("eta", 1.0)), float(options.get("s_noise", 1.0))
    if eta != 1.0 or s_noise != 1.0:
        raise ParticleModeError(node, "particles", (
            f"particles > 1 needs the full ancestral noise (eta = 1, s_noise = 1); the SAMPLER has eta = {eta:g}, "
            f"s_noise = {s_noise:g}. The particle weights target the model aligned at β/λ only when each step "
            "adds the reverse process's full noise. Set eta and s_noise to 1 on the sampler node, or set "
            "particles to 1."))


def check_proposal_kernel(node: str, proposal, kernel: str):
    """The proposal's kernel-ratio weight is written for euler_ancestral's Gaussian step only."""
    if proposal is not None and kernel != "euler_ancestral":
        raise ParticleModeError(node, "particle_rule", (
            f"the aligned proposal is built for euler_ancestral's step; the sampler is {kernel}. Choose "
            "euler_ancestral, or the trapezoid or start rule."))


def kernel_of(sampler):
    """('euler_ancestral' | 'ddpm', extra options) for a SAMPLER ComfyUI made for those kernels, else None."""
    fn = getattr(sampler, "sampler_function", None)
    name = getattr(fn, "__name__", None)
    if fn is None or name not in _FUNCTIONS or getattr(kds, name, None) is not fn:
        return None
    return _FUNCTIONS[name], dict(getattr(sampler, "extra_options", {}) or {})


def _scalar(lam):
    if isinstance(lam, torch.Tensor):
        if lam.numel() != 1 and not bool((lam == lam.reshape(-1)[0]).all()):
            raise ValueError("particle mode takes one λ per step (not a per-latent λ sweep)")
        return float(lam.reshape(-1)[0])
    return float(lam)


@torch.no_grad()
def particle_loop(model, x, sigmas, extra_args=None, callback=None, disable=None, *, kernel, state,
                  node="DeRaDiff KSampler", eta=1.0, s_noise=1.0, noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    guider = model.inner_model
    if not hasattr(guider, "prediction_observer"):
        raise ParticleModeError(node, "particles", "particle mode needs the DeRaDiff guider")
    import comfy.model_sampling
    if isinstance(guider.inner_model.model_sampling, comfy.model_sampling.CONST):
        raise ParticleModeError(node, "particles", "particle mode supports eps/v-prediction models (SD1.5, "
                                "SDXL); flow-matching models use another ancestral step, not implemented")
    seed = extra_args.get("seed", None)
    noise_sampler = kds.default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler
    n, site_dims = state.particles, state.site_dims
    images = x.shape[0] // n
    # the cheaper schedule changes the batch between N·B and B rows; ComfyUI's inpainting wrapper holds
    # N·B rows of its own, so with a denoise mask the particles run the whole schedule (today's rule)
    cheaper = state.cheaper and extra_args.get("denoise_mask") is None
    if state.cheaper and not cheaper:
        log.info("DeRaDiff particles: a denoise mask is set; running the particles over the whole schedule")
    full_rows = x.shape[0]
    # phases: 1 = one particle before the split, 2 = N particles, 3 = one particle after the draw
    phase = 2
    if cheaper and float(sigmas[0]) > state.split_at:
        x, phase = x[:images], 1  # particle 0 until the split: plain DeRaDiff's start noise and noise stream
    noise_samplers = {2: noise_sampler} if phase == 2 else {}

    def noise_for(rows, phase):
        if phase not in noise_samplers:  # phase 1: the seed's own stream; 2 and 3 after a split: seed + phase
            template = x.new_empty((rows, *x.shape[1:]))
            offset = 0 if phase == 1 or seed is None else phase
            noise_samplers[phase] = kds.default_noise_sampler(template, seed=None if seed is None else seed + offset)
        return noise_samplers[phase]

    s_in = x.new_ones([x.shape[0]])
    seen = []
    previous_observer = guider.prediction_observer
    guider.prediction_observer = lambda _x, _sigma, d_ref, d_al, lam: seen.append((d_ref, d_al, lam))
    last_call = None  # (σ, integrand λ(1-λ)|ΔD|² per particle/site or None) at the previous model call
    try:
        for i in kds.trange(len(sigmas) - 1, disable=disable):
            comfy.model_management.throw_exception_if_processing_interrupted()
            seen.clear()
            s_in = x.new_ones([x.shape[0]])
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            state.count_passes(2 if seen else 1, x.shape[0], images)
            sigma = float(sigmas[i])
            if kernel == "euler_ancestral":
                sigma_down, sigma_up = kds.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
            current = None
            weighting = x.shape[0] == full_rows
            if weighting and seen and state.in_window(sigma):
                d_ref, d_al, lam = seen[-1]
                lam = _scalar(lam)
                if lam * (1.0 - lam) != 0.0:
                    current = lam * (1.0 - lam) * squared_difference(d_ref, d_al, n, site_dims,
                                                                     extra_args.get("denoise_mask"))
            # the interval from the previous model call to this one, both ends known now (trapezoid
            # rule, particles.trapezoid_weights); weighted and resampled before this step is taken
            # the proposal only where λ > 1: below it the aligned model overshoots the target by more than the
            # weights can take back (benchmarks/aw_particles_cheap.py), so those steps keep the weight rule
            propose = (state.proposal is not None and kernel == "euler_ancestral" and current is not None
                       and float(sigma_down) > 0 and lam > 1.0)
            if propose:  # this step is weighted after it is taken (the weight needs its noise), below; here only
                # the trapezoid interval that ends at this call, when the step before was not a proposal
                inc = interval_log_weight(last_call[1], current, last_call[0], sigma) if last_call and weighting else None
            elif state.weight_rule == "start":  # |ΔD|² frozen at the step start
                gain = (euler_ancestral_gain(sigma, float(sigmas[i + 1]), eta, s_noise) if kernel == "euler_ancestral"
                        else ddpm_gain(sigma, float(sigmas[i + 1])))
                inc = -0.5 * gain * current if current is not None and gain > 0 else None
            else:
                inc = interval_log_weight(last_call[1], current, last_call[0], sigma) if last_call and weighting else None
            if inc is not None:
                ancestors = state.update(inc, sigma)
                if ancestors is not None:
                    x = gather_particles(x, ancestors, site_dims)
                    denoised = gather_particles(denoised, ancestors, site_dims)
                    current = None if current is None else gather_weights(current, ancestors)
                    if propose:  # the proposal below steps with both predictions of each surviving particle
                        d_ref, d_al = gather_particles(d_ref, ancestors, site_dims), gather_particles(d_al, ancestors, site_dims)
            if cheaper and phase == 1 and sigma <= state.split_at:
                # clone the one particle N ways; the copies part at this step's noise (their weights agree
                # up to here, so the first weighted interval starts at this call)
                x, denoised = x.repeat(n, *([1] * (x.dim() - 1))), denoised.repeat(n, *([1] * (x.dim() - 1)))
                phase, current = 2, None
            elif cheaper and phase == 2 and state.select_below > 0 and sigma < state.select_below:
                sites = tuple(x.shape[x.dim() - site_dims:]) if site_dims else ()
                choice = state.select((images, *sites))
                x, denoised = pick(x, choice, n, site_dims), pick(denoised, choice, n, site_dims)
                state.selected_at, phase, current = sigma, 3, None
                propose = False  # one particle per image from here: plain DeRaDiff steps
            # a proposal step weights its whole interval itself: the next trapezoid interval starts after it
            last_call = None if propose else (sigma, current)
            if callback is not None:
                callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
            step_noise = noise_for(x.shape[0], phase)
            if propose:
                # propose from the mix at λ_p = 1 + f·(λ − 1) (particles.ParticleState.proposal); the target kernel
                # is Z_λ·N(μ_λ, s²), so the weight is log Z_λ − |Δμ|²/(2s²) − ε·Δμ/s with Δμ = μ_p − μ_λ
                lam_p = 1.0 + state.proposal * (lam - 1.0)
                diff = d_al - d_ref
                d_prop = denoised + (lam_p - lam) * diff
                noise = step_noise(sigmas[i], sigmas[i + 1]) * s_noise
                x = x + kds.to_d(x, sigmas[i], d_prop) * (sigma_down - sigmas[i]) + noise * sigma_up
                s_up = float(sigma_up)
                dmu = (1.0 - float(sigma_down) / sigma) * (lam_p - lam) * diff
                gain = euler_ancestral_gain(sigma, float(sigmas[i + 1]), eta, s_noise)
                inc = (-0.5 * gain * current - site_sum(dmu * dmu, n, site_dims) / (2.0 * s_up ** 2)
                       - site_sum(noise * dmu, n, site_dims) / s_up)
                ancestors = state.update(inc, sigma)
                if ancestors is not None:
                    x = gather_particles(x, ancestors, site_dims)
            elif kernel == "euler_ancestral":  # ComfyUI's sample_euler_ancestral step
                if sigma_down == 0:
                    x = denoised
                else:
                    d = kds.to_d(x, sigmas[i], denoised)
                    dt = sigma_down - sigmas[i]
                    x = x + d * dt + step_noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
            else:  # ComfyUI's generic_step_sampler with DDPMSampler_step
                x = kds.DDPMSampler_step(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1],
                                         (x - denoised) / sigmas[i], step_noise)
                if sigmas[i + 1] != 0:
                    x *= torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    finally:
        guider.prediction_observer = previous_observer
    return x


def particle_sampler(kernel: str, state: ParticleState, node: str, extra_options=None, inpaint_options=None):
    """A KSAMPLER running ``particle_loop`` for ``kernel`` with this run's particle state."""
    def loop(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return particle_loop(model, x, sigmas, extra_args, callback, disable, kernel=kernel, state=state,
                             node=node, **options)
    loop.__name__ = f"particle_{kernel}"
    return comfy.samplers.KSAMPLER(loop, dict(extra_options or {}), dict(inpaint_options or {}))


def expand_noise(noise: torch.Tensor, particles: int, seed) -> torch.Tensor:
    """Noise for N·B latents: the given B first (particle 0 starts where plain DeRaDiff starts), the
    rest continue the same seeded stream (what ComfyUI's prepare_noise would draw for an N·B batch).
    All-zero noise (no noise added) stays zero."""
    b = noise.shape[0]
    if not bool(noise.any()):
        return noise.repeat(particles, *([1] * (noise.dim() - 1)))
    generator = torch.manual_seed(int(seed or 0))
    full = torch.randn((particles * b,) + tuple(noise.shape[1:]), dtype=noise.dtype, generator=generator,
                       device="cpu")
    return torch.cat([noise, full[b:].to(noise.device)])


def _repeat(t, particles, batch):
    if t is None or t.dim() == 0 or t.shape[0] != batch:
        return t
    return t.repeat(particles, *([1] * (t.dim() - 1)))


class ParticleGuider(DeRaDiffGuider):
    """DeRaDiffGuider running N particles per image (see the module docstring)."""

    def __init__(self, pair, lam, cfg, particles: int, resample_below: float = 0.5, node: str = "DeRaDiff KSampler",
                 full_pass_every: int = 1, site_dims: int = 0, window=None, temper: float = 1.0,
                 split_at: float = float("inf"), select_below: float = 0.0, weight_rule: str = "trapezoid",
                 proposal=None):
        if int(full_pass_every) != 1:
            raise ParticleModeError(node, "particles", "particles > 1 needs both models at every step "
                                    "(full_pass_every = 1): the weights are built from both predictions")
        super().__init__(pair, lam, cfg, 1)
        self.particles = int(particles)
        self.resample_below = float(resample_below)
        self.node = node
        self.site_dims, self.window, self.temper = site_dims, window, temper
        self.split_at, self.select_below = float(split_at), float(select_below)
        if weight_rule not in WEIGHT_RULES:
            raise ParticleModeError(node, "particles", f"weight rule '{weight_rule}' is not one of {', '.join(WEIGHT_RULES)}")
        self.weight_rule, self.proposal = weight_rule, (None if proposal is None else float(proposal))
        self.state = None

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None, *args, **kwargs):
        n = self.particles
        found = kernel_of(sampler)
        if found is None:
            name = getattr(getattr(sampler, "sampler_function", None), "__name__", type(sampler).__name__)
            refuse_sampler(self.node, name.replace("sample_", ""), "particles")
        kernel, options = found
        check_full_noise(self.node, options)
        check_proposal_kernel(self.node, self.proposal, kernel)
        if getattr(latent_image, "is_nested", False):
            raise ParticleModeError(self.node, "particles", "nested latents (several latent shapes) are not supported")
        b = latent_image.shape[0]
        self.state = ParticleState(n, int(seed or 0), self.resample_below, self.site_dims, self.window, self.temper,
                                   split_at=self.split_at, select_below=self.select_below,
                                   weight_rule=self.weight_rule, proposal=self.proposal)
        psampler = particle_sampler(kernel, self.state, self.node, options, getattr(sampler, "inpaint_options", {}))
        inner_callback, last = callback, {}
        if callback is not None:  # previews while sampling: particle 0's rows
            def callback(step, x0, x, total):
                last.update(step=step, x0=x0, x=x, total=total)
                return inner_callback(step, x0[:b], x[:b], total)
        out = super().sample(expand_noise(noise, n, seed), _repeat(latent_image, n, b), psampler, sigmas,
                             _repeat(denoise_mask, n, b), callback, disable_pbar, seed, *args, **kwargs)
        log.info("DeRaDiff particles (%s): %s", kernel, self.state.summary_text())
        if out.shape[0] == b:  # one particle per image already (drawn at select_below, or never split)
            if last:
                inner_callback(last["step"], last["x0"][:b], last["x"][:b], last["total"])
            return out
        sites = tuple(out.shape[out.dim() - self.site_dims:]) if self.site_dims else ()
        choice = self.state.choose((b, *sites))
        if last:  # the last step once more with the particle returned: the final preview and
            # SamplerCustomAdvanced's denoised_output (the x0 its callback saw last) are that particle's
            inner_callback(last["step"], pick(last["x0"], choice, n, self.site_dims),
                           pick(last["x"], choice, n, self.site_dims), last["total"])
        return pick(out, choice, n, self.site_dims)


def particle_ksampler(pair, lam, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                      denoise=1.0, particles=2, resample_below=0.5, node="DeRaDiff KSampler", callback=None,
                      site_dims=0, window=None, temper=1.0, split_at=float("inf"), select_below=0.0,
                      weight_rule="trapezoid", proposal=None):
    """``realigned_ksampler`` with N particles per image; returns (LATENT, ParticleState)."""
    import comfy.sample
    import comfy.utils
    import latent_preview
    from .sampling import finished_latent, ksampler_sigmas, prepare_latent
    if sampler_name not in STOCHASTIC:
        refuse_sampler(node, sampler_name)
    check_proposal_kernel(node, proposal, sampler_name)
    reference = pair.reference
    latent_image = prepare_latent(reference, latent)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = ksampler_sigmas(reference, steps, sampler_name, scheduler, denoise)
    guider = ParticleGuider(pair, lam, cfg, particles, resample_below, node, site_dims=site_dims, window=window,
                            temper=temper, split_at=split_at, select_below=select_below, weight_rule=weight_rule,
                            proposal=proposal)
    guider.set_conds(positive, negative)
    callback = callback or latent_preview.prepare_callback(reference, steps)
    samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return finished_latent(latent, samples), guider.state
