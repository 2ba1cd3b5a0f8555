"""A MODEL whose every evaluation is the DeRaDiff mix, for any sampler node.

The reference is cloned and given a calc_cond_batch function that runs both models on
the same (already processed) conds and mixes cond and uncond predictions with λ. CFG is
linear, so mixing before CFG equals giving each model its own CFG and mixing after
(up to float rounding) — unless another node adds a non-linear CFG function.

Two entry points, one mix. ComfyUI's ``sampling_function`` consults the single
``sampler_calc_cond_batch_function`` slot for the step's cond/uncond evaluation: that is
where difference reuse (``full_pass_every``) and the fused LoRA pass run. Guidance nodes
(PerturbedAttentionGuidance, SelfAttentionGuidance, SkipLayerGuidanceDiT, perp-neg and other
guiders) call ``comfy.samplers.calc_cond_batch`` themselves, and SkipLayerGuidanceDiTSimple
replaces the slot: a CALC_COND_BATCH wrapper catches every such evaluation and returns the
realigned prediction for it too (both models run, no reuse).

Nodes placed after Realign Model (FreeU, attention patches, PAG, a LoRA, ModelSampling,
TorchCompileModel, caches) clone the MODEL and add to it. What they add applies to the
realigned model, that is to both models' evaluations:

- model_options patches (``transformer_options`` patches / patches_replace) and context
  windows are found by position (see options_delta) and passed to the aligned evaluation;
- weight patches (a LoRA) and object patches land on the reference's BaseModel; a
  shared-weight aligned side runs on that same BaseModel, so it sees them too;
- a separately loaded aligned model has its own weights: a later ModelSampling patch is
  applied to it for the evaluation (the pair must share a schedule), later evaluation
  wrappers are not (TorchCompileModel's wrapper swaps in the reference's compiled UNet),
  and later weight patches cannot be: both are reported once per run in the log.
"""
from __future__ import annotations

import contextlib
import logging

import torch

import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from .difference_reuse import DifferenceMemory, StepPlan, cheaper_side
from .guider import (ALIGNED_KEY, MULTIGPU_KEYS, aligned_model_options, can_fuse, conditioning_hooks_on, fits_twice,
                     is_exactly, mix, stale_rescale_for, warn_run_level_wrappers, without_multigpu)
from .options_delta import added_since, merged, options_shape, select
from .schedules import PercentOfSigma, RunPosition, as_schedule
from .step_clock import make_clock, ticking

log = logging.getLogger("DeRaDiff")

# model_options keys that belong to one sampling run or to CFG, never to a model evaluation
_RUN_KEYS = {"sampler_calc_cond_batch_function", "to_load_options", "registered_hooks", "sampler_cfg_function",
             "sampler_post_cfg_function", "sampler_pre_cfg_function", "disable_cfg1_optimization",
             "model_function_wrapper", *MULTIGPU_KEYS}
# what later nodes add that a separately loaded aligned model can take as it is
_PORTABLE = [("transformer_options", "patches"), ("transformer_options", "patches_replace"), ("context_handler",)]


def _options_as_sampled(patcher) -> dict:
    """The patcher's model_options with its wrappers and callbacks merged in, as
    prepare_model_patcher hands them to calc_cond_batch."""
    options = dict(patcher.model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    for name, own in (("wrappers", patcher.wrappers), ("callbacks", patcher.callbacks)):
        transformer_options[name] = comfy.patcher_extension.merge_nested_dicts(
            transformer_options.get(name, {}), own)
    options["transformer_options"] = transformer_options
    return options


class RealignedCalcCondBatch:
    def __init__(self, pair, side, schedule, realigned, full_pass_every=1):
        self.pair = pair
        self.full_pass_every = max(1, int(full_pass_every))
        self._plan = None  # StepPlan of the current run when full_pass_every > 1
        self._memory = DifferenceMemory()
        self._fusable = can_fuse(pair, side)  # both models as one batch (reference + LoRA pair)
        self._fuse = None  # decided per run, from the memory estimate
        self.side = side
        self.schedule = schedule
        self.aligned_patcher = side.patcher if side.patcher is not None else pair.aligned
        self.shape = None  # options_shape of the realigned MODEL, set once this function is in place
        self.model_sampling = realigned.get_model_object("model_sampling")
        self.weight_patch_counts = {k: len(v) for k, v in realigned.patches.items()}
        self._run = None  # (sample_sigmas, aligned base options, percent_of) of the current run
        self._derived = None  # (options passed in, base, aligned options derived from them)
        self.clock = None  # StepClock of the current run (custom λ schedule, full_pass_every > 1)
        self._depth = 0  # > 0 while this object evaluates: its own calc_cond_batch calls pass through
        self.evaluations = 0  # evaluations of the current run that reached the mix
        self.extra_evaluations = 0  # ... of them through the wrapper (not sampling_function's slot)

    def __deepcopy__(self, memo):
        # ComfyUI 0.3.75's clone() deep-copies model_options; copying this would copy the
        # pair (a whole aligned UNet) and detach it from the models ComfyUI loads.
        return self

    # -- per run --------------------------------------------------------------
    def _run_state(self, options, model):
        sample_sigmas = options.get("transformer_options", {}).get("sample_sigmas")
        if self._run is None or self._run[0] is not sample_sigmas:
            base = aligned_model_options(self.aligned_patcher, sample_sigmas)
            self._run = (sample_sigmas, base, RunPosition(PercentOfSigma(model.model_sampling.percent_to_sigma),
                                                          self.clock))
            self._memory.forget()
            self._memory.rescale = stale_rescale_for(model.model_sampling)
            self._fuse = None
            self._plan = StepPlan(self.full_pass_every, sample_sigmas) if self.full_pass_every > 1 else None
        return self._run

    def _aligned_options(self, base, options):
        # samplers pass one options dict for a whole run: derive the aligned options once for it
        if self._derived is not None and self._derived[0] is options and self._derived[1] is base:
            return self._derived[2]
        later = added_since(self.shape, options)
        later = {k: v for k, v in later.items() if k not in _RUN_KEYS}
        if self.side.patcher is not None:
            later = select(later, _PORTABLE)
        result = merged(base, later)
        self._derived = (options, base, result)
        return result

    @contextlib.contextmanager
    def _separate_model_sampling(self, model, aligned_model):
        """A ModelSampling patch placed after Realign Model also applies to a separate aligned model."""
        current = model.model_sampling
        if current is self.model_sampling or aligned_model.model_sampling is current:
            yield
            return
        own = aligned_model.model_sampling
        comfy.utils.set_attr(aligned_model, "model_sampling", current)
        try:
            yield
        finally:
            comfy.utils.set_attr(aligned_model, "model_sampling", own)

    # -- one evaluation -------------------------------------------------------
    def __call__(self, args):
        """The step's cond/uncond evaluation (sampling_function's slot)."""
        conds, x, sigma, model, options = args["conds"], args["input"], args["sigma"], args["model"], args["model_options"]
        self.evaluations += 1
        with self._own_call():
            return self._evaluate(model, conds, x, sigma, options, main=True)

    def wrap_calc_cond_batch(self, executor, model, conds, x, sigma, options, *args, **kwargs):
        """CALC_COND_BATCH wrapper: any other evaluation of this MODEL (a guidance node's extra
        pass, a guider that calls calc_cond_batch itself, a node that took over the slot) gets
        the realigned prediction too. Calls this object makes itself pass straight through."""
        if self._depth > 0:
            return executor(model, conds, x, sigma, options, *args, **kwargs)
        self.evaluations += 1
        self.extra_evaluations += 1
        with self._own_call():
            return self._evaluate(model, conds, x, sigma, options, main=False,
                                  reference=lambda o: executor(model, conds, x, sigma, o, *args, **kwargs))

    @contextlib.contextmanager
    def _own_call(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def _aligned_model_and_context(self, model):
        if self.side.patcher is not None:
            aligned_model = self.side.patcher.model
            return aligned_model, self._separate_model_sampling(model, aligned_model)
        # shared weights: the reference's BaseModel with the update applied on the fly
        return model, self.side.shared

    def _evaluate(self, model, conds, x, sigma, options, main, reference=None):
        if reference is None:
            def reference(o):
                return comfy.samplers.calc_cond_batch(model, conds, x, sigma, o)
        _, base, percent_of = self._run_state(options, model)
        if main:  # extra passes a guidance node makes at the same point are not steps of the sampler
            percent_of.place(sigma)
        lam = self.schedule.value_at(sigma, percent_of)
        if is_exactly(lam, 0.0):
            return reference(options)
        aligned_options = self._aligned_options(base, options)
        if not main and "context_handler" in aligned_options:
            # a wrapper call runs inside the reference's context window already
            aligned_options = {k: v for k, v in aligned_options.items() if k != "context_handler"}
        aligned_model, context = self._aligned_model_and_context(model)
        plan = self._plan if main else None  # reuse only for the step's own evaluation
        if (plan is not None and not is_exactly(lam, 1.0) and not plan.is_full(sigma, percent_of.inner)
                and self._memory.ready(x.shape, [True] * len(conds))):
            side = cheaper_side(lam)
            if side == "reference":
                d_one = reference(options)
            else:
                with context:
                    d_one = comfy.samplers.calc_cond_batch(aligned_model, conds, x, sigma, aligned_options)
            return self._memory.complete(d_one, side, lam, sigma)
        both = None
        if self._fusable and not is_exactly(lam, 1.0):
            if self._fuse is None:
                self._fuse = fits_twice(model, x.shape, x.device)
            if self._fuse:
                both = self._fused(model, conds, x, sigma, options)
        if both is not None:
            d_ref, d_al = both
        else:
            with context:
                d_al = comfy.samplers.calc_cond_batch(aligned_model, conds, x, sigma, aligned_options)
            if is_exactly(lam, 1.0):
                return d_al
            d_ref = reference(options)
        if plan is not None:
            self._memory.remember(d_ref, d_al, sigma)
        return [None if r is None else mix(r, a, lam) for r, a in zip(d_ref, d_al)]

    def _fused(self, model, conds, x, sigma, options):
        """Both models in one call on [x; x]; the LoRA update reaches the second half. MultiGPU
        clones are left out: they are other copies of the reference, without the update."""
        shared, b = self.side.shared, x.shape[0]
        with shared.fused(2 * b, b):
            out = comfy.samplers.calc_cond_batch(model, conds, torch.cat([x, x]), torch.cat([sigma, sigma]),
                                                 without_multigpu(options))
        if shared.fused_mismatch:
            self._fuse = False
            log.info("DeRaDiff Realign Model: a LoRA layer of '%s' does not keep the batch in its first "
                     "dimension; two passes for the rest of this run.", self.pair.aligned_name)
            return None
        return [o[:b] for o in out], [o[b:] for o in out]

    # -- what a separate aligned model cannot take --------------------------------
    def report_unshared(self, patcher):
        """ON_PRE_RUN: say which later additions apply to the reference only, and which node
        took over sampling_function's calc_cond_batch slot."""
        self._run = self._derived = None
        self.evaluations = self.extra_evaluations = 0
        slot = patcher.model_options.get("sampler_calc_cond_batch_function")
        if slot is not self:
            log.warning("DeRaDiff Realign Model: %s (added after Realign Model) replaced ComfyUI's calc_cond_batch "
                        "function; DeRaDiff still mixes every evaluation it makes through its calc_cond_batch "
                        "wrapper%s.", describe_function(slot),
                        ", but full_pass_every and the fused LoRA pass are off for them"
                        if self.full_pass_every > 1 or self._fusable else "")
        if self.side.patcher is None:
            return
        grown = [k for k, v in patcher.patches.items() if len(v) > self.weight_patch_counts.get(k, 0)]
        if grown:
            log.warning("DeRaDiff Realign Model: %d weight patches (a LoRA?) were added after Realign Model; the "
                        "aligned model '%s' is a separate model, so they apply to the reference only. Apply the "
                        "LoRA to both models before making the pair instead.", len(grown), self.pair.aligned_name)
        later = added_since(self.shape, _options_as_sampled(patcher)).get("transformer_options", {}).get("wrappers", {})
        evaluation = sorted(f"{t}:{k}" for t, by_key in later.items() for k, fns in by_key.items()
                            if fns and t in ("apply_model", "diffusion_model", "calc_cond_batch"))
        if evaluation:
            log.warning("DeRaDiff Realign Model: model wrappers added after Realign Model (%s) run for the "
                        "reference's evaluations only; the aligned model '%s' is a separate model. Put them on "
                        "both models before making the pair.", ", ".join(evaluation), self.pair.aligned_name)


def describe_function(fn) -> str:
    """'SkipLayerGuidanceDiTSimple (comfy_extras.nodes_slg)' for a node's local function."""
    if fn is None:
        return "another node"
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    owner = name.split(".<locals>")[0].split(".")[0]
    return f"{owner} ({getattr(fn, '__module__', '?')})"


def check_reached(function, patcher):
    """ON_CLEANUP: a run whose evaluations never reached the mix sampled the reference alone."""
    if function.evaluations == 0:
        log.warning("DeRaDiff Realign Model: no model evaluation of this run reached DeRaDiff (a sampler or "
                    "guider evaluated the model without ComfyUI's calc_cond_batch); the image is the "
                    "reference's alone. Use the DeRaDiff KSampler / Guider, or put that node before Realign Model.")


def hooks_on_aligned(aligned):
    """OUTER_SAMPLE wrapper: the guider's conds (hooks already registered on the reference by
    CFGGuider.sample) get their hook patches registered on the separate aligned model too."""
    def wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        conds = getattr(guider, "conds", None) or {}
        with conditioning_hooks_on(aligned, conds, aligned_model_options(aligned, None), guider.model_patcher):
            return executor(*args, **kwargs)
    return wrapper


def counting_steps(function):
    """OUTER_SAMPLE wrapper: a step clock for each run (which sampler, which slice of the schedule),
    ticked by the sampler's per-step callback."""
    def wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        schedule = function.schedule
        custom_steps = len(schedule.values) if getattr(schedule, "counts_steps", False) else None
        guider = executor.class_obj
        model_sampling = guider.model_patcher.get_model_object("model_sampling")
        function.clock = make_clock(model_sampling, sigmas, sampler, custom_steps, "DeRaDiff Realign Model")
        args = list(args)
        if len(args) >= 2:  # (denoise_mask, callback, ...) positionally, as CFGGuider.sample passes them
            args[1] = ticking(args[1], function.clock)
        else:
            kwargs["callback"] = ticking(kwargs.get("callback"), function.clock)
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            function.clock = None
    return wrapper


def realigned_model(pair, lam, full_pass_every=1):
    schedule = as_schedule(lam)
    model = pair.reference.clone()
    if not schedule.uses_aligned:
        return model
    side = pair.aligned_side()
    warn_run_level_wrappers(pair.aligned, pair.reference, pair.aligned_name)
    aligned = side.patcher
    if aligned is not None:
        model.set_additional_models(ALIGNED_KEY, [aligned])
        # calc_cond_batch reads the aligned model's current_patcher, set by its pre_run()
        model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, ALIGNED_KEY,
                                    lambda patcher: aligned.pre_run())
        model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, ALIGNED_KEY,
                                    lambda patcher: aligned.cleanup())
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, ALIGNED_KEY + "_hooks",
                                   hooks_on_aligned(aligned))
    if side.shared is not None:  # cache the LoRA factors for each run of this MODEL; its cleanup drops them
        model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, ALIGNED_KEY + "_cache",
                                    side.shared.cache_until_cleanup)
    function = RealignedCalcCondBatch(pair, side, schedule, model, full_pass_every)
    model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, ALIGNED_KEY + "_report",
                                function.report_unshared)
    model.set_model_sampler_calc_cond_batch_function(function)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, ALIGNED_KEY,
                               function.wrap_calc_cond_batch)
    model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, ALIGNED_KEY + "_reached",
                                lambda patcher: check_reached(function, patcher))
    if getattr(schedule, "counts_steps", False) or function.full_pass_every > 1:
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, ALIGNED_KEY + "_steps",
                                   counting_steps(function))
    # the shape is taken with our own function in place, so only what comes after is "later"
    function.shape = options_shape(_options_as_sampled(model))
    return model
