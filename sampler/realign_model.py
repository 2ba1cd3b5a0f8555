"""A MODEL whose every evaluation is the DeRaDiff mix, for any sampler node.

The reference is cloned and given a calc_cond_batch function that runs both models on
the same (already processed) conds and mixes cond and uncond predictions with λ. CFG is
linear, so mixing before CFG equals giving each model its own CFG and mixing after
(up to float rounding) — unless another node adds a non-linear CFG function.
"""
from __future__ import annotations

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers

from .guider import ALIGNED_KEY, is_exactly, mix
from .schedules import as_schedule


class RealignedCalcCondBatch:
    def __init__(self, aligned, schedule):
        self.aligned = aligned
        self.schedule = schedule
        self._options_for = (None, None)  # (sample_sigmas, aligned model options) of this run

    def _aligned_options(self, sample_sigmas):
        if self._options_for[0] is not sample_sigmas:
            options = comfy.model_patcher.create_model_options_clone(self.aligned.model_options)
            options.setdefault("transformer_options", {})["sample_sigmas"] = sample_sigmas
            self._options_for = (sample_sigmas, options)
        return self._options_for[1]

    def __call__(self, args):
        conds, x, sigma, model, options = args["conds"], args["input"], args["sigma"], args["model"], args["model_options"]
        sample_sigmas = options.get("transformer_options", {}).get("sample_sigmas")
        lam = self.schedule.value_at(sigma, sample_sigmas)
        if is_exactly(lam, 0.0):
            return comfy.samplers.calc_cond_batch(model, conds, x, sigma, options)
        aligned_options = self._aligned_options(sample_sigmas)
        d_al = comfy.samplers.calc_cond_batch(self.aligned.model, conds, x, sigma, aligned_options)
        if is_exactly(lam, 1.0):
            return d_al
        d_ref = comfy.samplers.calc_cond_batch(model, conds, x, sigma, options)
        return [None if r is None else mix(r, a, lam) for r, a in zip(d_ref, d_al)]


def realigned_model(pair, lam):
    schedule = as_schedule(lam)
    model = pair.reference.clone()
    if not schedule.uses_aligned:
        return model
    aligned = pair.aligned_for_sampling()
    model.set_additional_models(ALIGNED_KEY, [aligned])
    # calc_cond_batch reads the aligned model's current_patcher, set by its pre_run()
    model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, ALIGNED_KEY,
                                lambda patcher: aligned.pre_run())
    model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, ALIGNED_KEY,
                                lambda patcher: aligned.cleanup())
    model.set_model_sampler_calc_cond_batch_function(RealignedCalcCondBatch(aligned, schedule))
    return model
