"""A MODEL whose every evaluation is the DeRaDiff mix, for any sampler node.

The reference is cloned and given a calc_cond_batch function that runs both models on
the same (already processed) conds and mixes cond and uncond predictions with λ. CFG is
linear, so mixing before CFG equals giving each model its own CFG and mixing after
(up to float rounding) — unless another node adds a non-linear CFG function.
"""
from __future__ import annotations

import comfy.patcher_extension
import comfy.samplers

import contextlib

from .guider import ALIGNED_KEY, aligned_model_options, is_exactly, mix
from .schedules import as_schedule


class RealignedCalcCondBatch:
    def __init__(self, side, schedule):
        self.side = side
        self.schedule = schedule
        self._options_for = (None, None)  # (sample_sigmas, aligned model options) of this run

    def _aligned_options(self, sample_sigmas):
        if self._options_for[0] is not sample_sigmas:
            own = (self.side.patcher.model_options if self.side.patcher is not None
                   else self.side.shared.aligned_model_options)
            self._options_for = (sample_sigmas, aligned_model_options(own, sample_sigmas))
        return self._options_for[1]

    def __call__(self, args):
        conds, x, sigma, model, options = args["conds"], args["input"], args["sigma"], args["model"], args["model_options"]
        sample_sigmas = options.get("transformer_options", {}).get("sample_sigmas")
        lam = self.schedule.value_at(sigma, sample_sigmas)
        if is_exactly(lam, 0.0):
            return comfy.samplers.calc_cond_batch(model, conds, x, sigma, options)
        aligned_options = self._aligned_options(sample_sigmas)
        if self.side.patcher is not None:
            aligned_model, weights = self.side.patcher.model, contextlib.nullcontext()
        else:  # shared weights: the reference's BaseModel with the update applied on the fly
            aligned_model, weights = model, self.side.shared
        with weights:
            d_al = comfy.samplers.calc_cond_batch(aligned_model, conds, x, sigma, aligned_options)
        if is_exactly(lam, 1.0):
            return d_al
        d_ref = comfy.samplers.calc_cond_batch(model, conds, x, sigma, options)
        return [None if r is None else mix(r, a, lam) for r, a in zip(d_ref, d_al)]


def realigned_model(pair, lam):
    schedule = as_schedule(lam)
    model = pair.reference.clone()
    if not schedule.uses_aligned:
        return model
    side = pair.aligned_side()
    aligned = side.patcher
    if aligned is not None:
        model.set_additional_models(ALIGNED_KEY, [aligned])
        # calc_cond_batch reads the aligned model's current_patcher, set by its pre_run()
        model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, ALIGNED_KEY,
                                    lambda patcher: aligned.pre_run())
        model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, ALIGNED_KEY,
                                    lambda patcher: aligned.cleanup())
    model.set_model_sampler_calc_cond_batch_function(RealignedCalcCondBatch(side, schedule))
    return model
