"""The step clock of one sampling run, on ComfyUI's side (schedules.StepClock holds the rule).

It needs the sampler's per-step callback (wrapped with ``ticking``) and the run's place in the
full schedule: a KSamplerAdvanced part or a SplitSigmas half only sees its own slice of sigmas,
so the slice is looked up in the schedules ComfyUI's schedulers make for as many steps as a
custom λ schedule has values.
"""
from __future__ import annotations

import logging

import comfy.samplers

from .schedules import SIGMA_TOLERANCE, StepClock

log = logging.getLogger("DeRaDiff")

# k-diffusion samplers whose step ends with a model call at the next step's sigma (a corrector):
# heun, heunpp2, and on newer ComfyUI exp_heun_2_x0 / exp_heun_2_x0_sde (SEEDS-2 with r = 1, whose
# second evaluation is at the step's end, through a log-SNR round trip)
CORRECTOR_SAMPLERS = {"sample_heun", "sample_heunpp2", "sample_exp_heun_2_x0", "sample_exp_heun_2_x0_sde"}


def sampler_function_name(sampler) -> str:
    return getattr(getattr(sampler, "sampler_function", None), "__name__", "")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= SIGMA_TOLERANCE * max(abs(a), abs(b), 1e-12)


def _candidate_schedules(model_sampling, steps: int):
    for name in comfy.samplers.SCHEDULER_NAMES:
        try:
            full = [float(v) for v in comfy.samplers.calculate_sigmas(model_sampling, name, steps)]
            longer = [float(v) for v in comfy.samplers.calculate_sigmas(model_sampling, name, steps + 1)]
        except Exception:  # a scheduler that needs more than the model (or fails for this one)
            continue
        yield name, full
        # KSampler's rule for samplers that discard the penultimate sigma (dpm_2, uni_pc, ...)
        yield name + " (penultimate discarded)", longer[:-2] + longer[-1:]


def run_offset(model_sampling, sigmas, steps: int, what: str = "DeRaDiff") -> int:
    """Index of the run's first step in a ``steps``-step schedule: 0 for a run of that many steps
    or more, else where its sigmas sit inside a schedule one of ComfyUI's schedulers makes (the
    last sigma may be 0 instead: KSamplerAdvanced's force_full_denoise). A run found nowhere
    counts from its own first step, and the log says so."""
    run = [float(v) for v in sigmas]
    if len(run) - 1 >= steps:
        return 0
    head = run[:-1] if run and run[-1] == 0.0 else run
    offsets, schedules = set(), list(_candidate_schedules(model_sampling, steps))
    for _, full in schedules:
        for j in range(0, len(full) - len(head) + 1):
            if all(_close(a, b) for a, b in zip(full[j:j + len(head)], head)):
                offsets.add(j)
    if len(offsets) == 1:
        return offsets.pop()
    if not offsets and head and any(_close(full[0], head[0]) for _, full in schedules):
        # starts where ComfyUI's schedules start: a whole run with fewer steps than values
        log.warning("%s: a custom λ schedule has %d values but this run has only %d steps: the values "
                    "after the first %d are not used.", what, steps, len(run) - 1, len(run) - 1)
        return 0
    log.warning("%s: a custom λ schedule has %d values but this run has %d steps%s; its values are used "
                "from the run's first step.", what, steps, len(run) - 1,
                " that sit at several places of ComfyUI's schedules" if offsets else
                " that are not part of a schedule of that many steps of any ComfyUI scheduler (custom sigmas?)")
    return min(offsets) if offsets else 0


def make_clock(model_sampling, sigmas, sampler, custom_steps: int | None, what: str = "DeRaDiff") -> StepClock:
    offset = run_offset(model_sampling, sigmas, custom_steps, what) if custom_steps else 0
    return StepClock(sigmas, offset, sampler_function_name(sampler) in CORRECTOR_SAMPLERS)


def ticking(callback, clock):
    """The sampler's callback, telling ``clock`` about every step first."""
    if clock is None:
        return callback

    def tick(step, x0, x, total):
        clock.on_step(step)
        if callback is not None:
            return callback(step, x0, x, total)
    return tick
