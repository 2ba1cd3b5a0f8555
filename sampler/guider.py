"""DeRaDiffGuider: ComfyUI's CFGGuider with a second, aligned model mixed in.

Each model runs ComfyUI's own ``sampling_function`` (its own conds, model options
and CFG); the two denoised predictions are then mixed with the equal-variance
reduction of the geometric posterior mixture. The pair shares one noise schedule
(checked when the pair is made), so the mix is exact for every sampler.
"""
from __future__ import annotations

import contextlib

import torch

import logging

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers

from . import difference_reuse
from .difference_reuse import DifferenceMemory, StepPlan, cheaper_side
from .mixing import mix_equal_variance, mix_per_sample
from .schedules import PercentOfSigma, RunPosition, as_schedule
from .step_clock import make_clock, ticking

log = logging.getLogger("DeRaDiff")

ALIGNED_KEY = "deradiff_aligned"
_POST_CFG = "sampler_post_cfg_function"
# ComfyUI's MultiGPU (0.3x+) splits a batch across per-device clones of the model that drives
# sampling, the reference. Those clones hold neither a separate aligned model's weights nor the
# on-the-fly LoRA update of a shared pair, so aligned and fused evaluations run on the main
# device (as core's DualModelGuider does for its second model).
MULTIGPU_KEYS = ("multigpu_clones", "multigpu_thread_pool")


def without_multigpu(options: dict) -> dict:
    if not any(k in options for k in MULTIGPU_KEYS):
        return options
    return {k: v for k, v in options.items() if k not in MULTIGPU_KEYS}


def mix(d_ref, d_aligned, lam):
    """One λ for the batch (float) or one per batch element (tensor, the λ sweep)."""
    if isinstance(lam, torch.Tensor):
        return mix_per_sample(d_ref, d_aligned, lam)
    return mix_equal_variance(d_ref, d_aligned, lam)


def is_exactly(lam, value: float) -> bool:
    if isinstance(lam, torch.Tensor):
        return bool((lam == value).all())
    return lam == value


class _AlignedRun:
    """Per-sampling state of the aligned model: its BaseModel, conds and options, and the
    context that turns the reference's weights into the aligned ones (shared path)."""

    def __init__(self, model, conds, model_options, weights=None):
        self.model = model  # None: the reference's BaseModel (shared weights)
        self.conds = conds  # None: the reference's processed conds
        self.model_options = model_options
        self.weights = weights or contextlib.nullcontext()


# Wrapper types that act on one model evaluation (they travel in the aligned model's options);
# the others wrap the whole sampling run, which only the reference's MODEL drives.
EVALUATION_WRAPPERS = {"calc_cond_batch", "apply_model", "diffusion_model"}


def aligned_model_options(patcher, sample_sigmas, device=None, dtype=None):
    """The aligned model's own options for one sampling run: its model_options plus its
    wrappers and callbacks, as ComfyUI's prepare_model_patcher adds them for the model
    that drives sampling (an APPLY_MODEL wrapper such as TorchCompileModel's, a caching or
    context-window wrapper set on the aligned MODEL must run for the aligned evaluations)."""
    options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    transformer_options = options.setdefault("transformer_options", {})
    transformer_options["sample_sigmas"] = sample_sigmas
    for name, own in (("wrappers", patcher.wrappers), ("callbacks", patcher.callbacks)):
        comfy.patcher_extension.merge_nested_dicts(transformer_options.setdefault(name, {}), own, copy_dict1=False)
    if device is not None:
        comfy.samplers.cast_to_load_options(options, device=device, dtype=dtype)
    return options


def has_conditioning_hooks(conds) -> bool:
    return any(c.get("hooks") is not None for group in conds.values() if group for c in group)


@contextlib.contextmanager
def conditioning_hooks_on(aligned, conds, options, reference):
    """Hooks set on the conditioning (Create Hook LoRA -> Cond Set Props) for a separately loaded
    aligned model: ComfyUI registers a cond's hook patches on the one ModelPatcher it samples,
    so they are registered on the aligned one the same way (prepare_model_patcher, with the
    reference's hook mode) and restored when the run ends, as CFGGuider.sample does."""
    if not has_conditioning_hooks(conds):
        yield
        return
    import comfy.sampler_helpers
    own_mode = aligned.hook_mode
    aligned.set_hook_mode(reference.hook_mode)
    options.setdefault("transformer_options", {})
    try:
        comfy.sampler_helpers.prepare_model_patcher(aligned, conds, options)
        yield
    finally:
        aligned.set_hook_mode(own_mode)
        aligned.restore_hook_patches()


def run_level_wrappers_only_on(aligned, reference) -> list:
    """Wrapper types the aligned MODEL has for a whole sampling run that the reference lacks."""
    missing = []
    for wrapper_type, by_key in aligned.wrappers.items():
        if wrapper_type in EVALUATION_WRAPPERS:
            continue
        for key, fns in by_key.items():
            if fns and not reference.wrappers.get(wrapper_type, {}).get(key):
                missing.append(f"{wrapper_type}:{key}")
    return missing


def warn_run_level_wrappers(aligned, reference, aligned_name):
    missing = run_level_wrappers_only_on(aligned, reference)
    if missing:
        log.warning("DeRaDiff: the aligned model '%s' has sampling-run wrappers the reference lacks (%s); "
                    "a run has one sampling loop, driven by the reference, so these do not run. Put such "
                    "nodes (caches, context windows) on the reference, or after DeRaDiff Realign Model.",
                    aligned_name, ", ".join(missing))


def stale_rescale_for(model_sampling):
    """How a stale difference is carried to the current sigma, for this model's noise schedule."""
    import comfy.model_sampling
    flow = isinstance(model_sampling, comfy.model_sampling.CONST)
    return difference_reuse.stale_rescale(float(getattr(model_sampling, "sigma_data", 1.0)), flow)


def _evaluation_options(patcher):
    return (patcher.model_options, patcher.wrappers, patcher.callbacks)


def can_fuse(pair, side) -> bool:
    """Both models can run as ONE batch: the aligned side is the reference's own weights plus
    LoRA updates applied in activation space, and the two MODELs' options (patches, wrappers,
    callbacks) are the same, so a row of the batch differs from a reference row only by the
    LoRA update that the fused pass adds to the aligned rows."""
    from .options_delta import options_shape
    from .shared_weights import equivalent_objects
    shared = side.shared if side is not None else None
    if shared is None or not shared.fusable:
        return False
    ref, al = _evaluation_options(pair.reference), _evaluation_options(pair.aligned)
    return options_shape(ref) == options_shape(al) and equivalent_objects(ref, al)


def fits_twice(model, noise_shape, device) -> bool:
    """ComfyUI's own estimate says a batch twice the size (cond + uncond of both models) fits."""
    try:
        shape = [2 * noise_shape[0] * 2] + list(noise_shape[1:])
        needed = model.memory_required(shape)
        return needed * 1.5 < comfy.model_management.get_free_memory(device)
    except Exception:  # no estimate: keep two passes
        return False


class DeRaDiffGuider(comfy.samplers.CFGGuider):
    def __init__(self, pair, lam, cfg: float, full_pass_every: int = 1):
        self.pair = pair
        self.full_pass_every = max(1, int(full_pass_every))
        self.schedule = as_schedule(lam)
        reference = pair.reference.clone()
        self.aligned_side = pair.aligned_side() if self.schedule.uses_aligned else None
        self.aligned_patcher = self.aligned_side.patcher if self.aligned_side else None
        if self.aligned_patcher is not None:
            # attached so that prepare_sampling loads both models in one go
            reference.set_additional_models(ALIGNED_KEY, [self.aligned_patcher])
        super().__init__(reference)
        self.set_cfg(cfg)
        self._aligned_run = None
        self._percent_of = None
        # called as observer(x, sigma, d_ref, d_aligned, lam) at every evaluation that ran both
        # models (particle mode reads the two predictions from here)
        self.prediction_observer = None
        self._plan = None  # StepPlan of the current run when full_pass_every > 1
        self._memory = DifferenceMemory()
        self._fuse = False  # this run evaluates both models as one batch
        if self.aligned_side is not None:
            warn_run_level_wrappers(pair.aligned, pair.reference, pair.aligned_name)

    # -- sampling set-up -------------------------------------------------------
    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                     disable_pbar, seed, *args, **kwargs):
        model_sampling = self.inner_model.model_sampling
        custom_steps = len(self.schedule.values) if getattr(self.schedule, "counts_steps", False) else None
        clock = None
        if custom_steps or self.full_pass_every > 1:
            clock = make_clock(model_sampling, sigmas, sampler, custom_steps)
            callback = ticking(callback, clock)
        self._percent_of = RunPosition(PercentOfSigma(model_sampling.percent_to_sigma), clock)
        self._memory.forget()
        self._memory.rescale = stale_rescale_for(self.inner_model.model_sampling)
        self._plan = StepPlan(self.full_pass_every, sigmas) if self.full_pass_every > 1 else None
        if self.aligned_side is None:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask,
                                        callback, disable_pbar, seed, *args, **kwargs)
        if self.aligned_patcher is None:  # shared weights: same BaseModel and conds as the reference
            shared = self.aligned_side.shared
            shared.cache_until_cleanup(self.model_patcher)  # the run's cleanup drops the cached factors
            self._aligned_run = _AlignedRun(None, None, aligned_model_options(
                self.pair.aligned, sigmas, device, self.model_patcher.model_dtype()), shared)
            self._fuse = can_fuse(self.pair, self.aligned_side) and fits_twice(self.model_patcher.model, noise.shape, device)
            try:
                return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask,
                                            callback, disable_pbar, seed, *args, **kwargs)
            finally:
                self._aligned_run = None
                self._fuse = False
        aligned = self.aligned_patcher
        aligned.pre_run()
        try:
            run = self._aligned_run = self._prepare_aligned(aligned, noise, latent_image, device, sigmas,
                                                            denoise_mask, seed, kwargs)
            with conditioning_hooks_on(aligned, run.conds, run.model_options, self.model_patcher):
                return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask,
                                            callback, disable_pbar, seed, *args, **kwargs)
        finally:
            self._aligned_run = None
            aligned.cleanup()

    def _prepare_aligned(self, aligned, noise, latent_image, device, sigmas, denoise_mask, seed, kwargs):
        model = aligned.model
        if latent_image is not None and bool(latent_image.any()):
            latent_image = model.process_latent_in(latent_image)
        conds = {k: [c.copy() for c in v] for k, v in self.conds.items()}
        conds = comfy.samplers.process_conds(model, noise, conds, device, latent_image, denoise_mask,
                                             seed, **kwargs)
        options = aligned_model_options(aligned, sigmas, device, aligned.model_dtype())
        return _AlignedRun(model, conds, options)

    # -- one model evaluation --------------------------------------------------
    def predict_noise(self, x, timestep, model_options={}, seed=None):
        run = self._aligned_run
        self._percent_of.place(timestep)
        lam = self.schedule.value_at(timestep, self._percent_of)
        if run is None or is_exactly(lam, 0.0):
            return super().predict_noise(x, timestep, model_options, seed)
        sampler_post_cfg = model_options.get(_POST_CFG, [])[len(self.model_options.get(_POST_CFG, [])):]
        if is_exactly(lam, 1.0):
            return self._denoise_aligned(run, x, timestep, model_options, sampler_post_cfg, seed)
        if not sampler_post_cfg:
            plan = self._plan
            if (plan is not None and not plan.is_full(timestep, self._percent_of.inner)
                    and self._memory.ready(x.shape, [True])):
                return self._one_model_and_stale_difference(run, x, timestep, model_options, lam, seed)
            both = self._fused_predictions(x, timestep, model_options, seed) if self._fuse else None
            if both is not None:
                d_ref, d_al = both
            else:
                d_ref = super().predict_noise(x, timestep, model_options, seed)
                d_al = self._denoise_aligned(run, x, timestep, model_options, [], seed)
            if plan is not None:
                self._memory.remember([d_ref], [d_al], timestep)
            self._observe(x, timestep, d_ref, d_al, lam)
            return mix(d_ref, d_al, lam)
        return self._mix_with_sampler_post_cfg(run, x, timestep, model_options, sampler_post_cfg, lam, seed)

    def _fused_predictions(self, x, timestep, model_options, seed):
        """Both models in one call: the batch is [x; x], the LoRA update reaches the second half."""
        shared, b = self.aligned_side.shared, x.shape[0]
        with shared.fused(2 * b, b):
            d = super().predict_noise(torch.cat([x, x]), torch.cat([timestep, timestep]),
                                      without_multigpu(model_options), seed)
        if shared.fused_mismatch:
            self._fuse = False
            log.info("DeRaDiff: a LoRA layer of '%s' does not keep the batch in its first dimension; running "
                     "the two models as two passes for the rest of this run.", self.pair.aligned_name)
            return None
        return d[:b], d[b:]

    def _one_model_and_stale_difference(self, run, x, timestep, model_options, lam, seed):
        side = cheaper_side(lam)
        if side == "reference":
            d_one = super().predict_noise(x, timestep, model_options, seed)
        else:
            d_one = self._denoise_aligned(run, x, timestep, model_options, [], seed)
        return self._memory.complete([d_one], side, lam, timestep)[0]

    def _observe(self, x, timestep, d_ref, d_al, lam):
        if self.prediction_observer is not None:
            self.prediction_observer(x, timestep, d_ref, d_al, lam)

    def _aligned_options(self, run, model_options, post_cfg):
        options = run.model_options.copy()
        for key, value in model_options.items():  # what the sampler added (cfg1 switch, ...)
            if key not in self.model_options and key != _POST_CFG and key not in MULTIGPU_KEYS:
                options[key] = value
        if post_cfg:
            options[_POST_CFG] = run.model_options.get(_POST_CFG, []) + list(post_cfg)
            # CFG++-style samplers read both models' uncond predictions: neither may take the
            # cfg=1 shortcut (which leaves uncond empty), whichever model asked for that.
            if model_options.get("disable_cfg1_optimization") or run.model_options.get("disable_cfg1_optimization"):
                options["disable_cfg1_optimization"] = True
        return options

    def _denoise_aligned(self, run, x, timestep, model_options, post_cfg, seed):
        model = run.model or self.inner_model
        conds = run.conds or self.conds
        with run.weights:
            return comfy.samplers.sampling_function(
                model, x, timestep, conds.get("negative", None), conds.get("positive", None),
                self.cfg, model_options=self._aligned_options(run, model_options, post_cfg), seed=seed)

    def _mix_with_sampler_post_cfg(self, run, x, timestep, model_options, sampler_post_cfg, lam, seed):
        # CFG++-style samplers read cond/uncond predictions through a post-CFG hook;
        # hand them the mixed ones, not whichever model happened to run last.
        captured = []

        def capture(args):
            captured.append((args["cond_denoised"], args["uncond_denoised"]))
            return args["denoised"]

        ref_options = model_options.copy()
        ref_options[_POST_CFG] = self.model_options.get(_POST_CFG, []) + [capture]
        d_ref = super().predict_noise(x, timestep, ref_options, seed)
        d_al = self._denoise_aligned(run, x, timestep, model_options, [capture], seed)
        (c_ref, u_ref), (c_al, u_al) = captured
        self._observe(x, timestep, d_ref, d_al, lam)
        denoised = mix(d_ref, d_al, lam)
        cond = mix(c_ref, c_al, lam)
        uncond = mix(u_ref, u_al, lam)
        for fn in sampler_post_cfg:
            denoised = fn({"denoised": denoised, "cond": self.conds.get("positive"),
                           "uncond": self.conds.get("negative"), "cond_scale": self.cfg,
                           "model": self.inner_model, "uncond_denoised": uncond, "cond_denoised": cond,
                           "sigma": timestep, "model_options": model_options, "input": x})
        return denoised
