"""Inputs and checks of the particle mode (optional inputs of DeRaDiff KSampler and DeRaDiff Guider)."""
from __future__ import annotations

import math

from comfy_api.latest import io

from .common import NodeInputError
from .v3_features import advanced

PARTICLES_TOOLTIP = ("Particle realignment (sequential Monte Carlo): run N particles per image, weight them with the "
               "closed-form normaliser the per-step mix drops, resample when the effective sample size (ESS) is "
               "low, and return one particle per image, drawn with the final weights. Corrects the mode weights "
               "the plain mix gets wrong when alignment reweights separate modes. Costs N times the model calls "
               "and N times the memory. Needs euler_ancestral (eta 1, s_noise 1) or ddpm. 1 = plain DeRaDiff (unchanged). "
               "Weights can collapse in high dimension: in a test world where the two models disagree "
               "independently all over the latent, the ESS fell to about 1 by mid-schedule (then the mode only "
               "selects greedily); the node shows the ESS after each run. The weights carry a step-size error: in a "
               "test world with separated modes, at λ < 1 and 50 steps 32 particles went slightly past the target, "
               "at 100 steps they were within sampling error, so use 50 or more steps. On a small trained model (the "
               "tiny family: 64-number latents, 20 steps) the weights collapsed at the first step at λ 2 (ESS 1.2–1.3 "
               "for 4, 8 and 16 particles) and the reward moved by less than its noise against plain DeRaDiff. See "
               "docs/particles.md.")

RESAMPLE_ESS_TOOLTIP = ("Resample when the effective sample size (ESS, between 1 and the number of particles N) falls "
               "below this fraction of N, or below 1 + this value where that is higher: the threshold is "
               "max(resample_ess × N, 1 + resample_ess), so small N resample too (the ESS never drops below 1, "
               "so 0.5 × 2 could never be crossed; at 0.5, 2 particles resample when one holds under about "
               "21 % of the weight, and N >= 4 below N/2 as before). 0.5 is the usual choice; 1 = every step, "
               "0 = never (importance weights only). Only used when particles > 1.")


PARTICLE_RULES = ("trapezoid", "start", "aligned proposal")

PARTICLE_RULE_TOOLTIP = (
    "How the particles are stepped and weighted (only used when particles > 1). "
    "trapezoid (default): step with the λ mix, weight each interval by the trapezoid rule over its two model "
    "calls. start: the same step, |ΔD|² taken at the start of each step. aligned proposal (euler_ancestral "
    "only; for λ > 1): at steps with λ > 1 step with the aligned model (λ 1) and weight each step by the exact "
    "ratio of the λ mix's kernel to the aligned one's, which reaches the modes the target puts weight back on "
    "and the plain mix misses; at λ ≤ 1 it is the trapezoid rule (proposing from the aligned model "
    "there overshoots the target). Measured in two test worlds with 32 particles (benchmarks/aw_particles_cheap.py, "
    "docs/particles.md): the error left at λ 2 was 6–7 % of plain DeRaDiff's with the aligned proposal "
    "against 38 % with trapezoid, at λ 3 7 % / 1 % against 37 % / 75 %. Not for real images yet: on a small "
    "trained model (64-number latents) its weights collapsed at every step (ESS 1.1–2.4 of 8), because the "
    "kernel ratio's variance grows with the latent's size; there keep trapezoid. Only used when particles > 1.")

PARTICLE_SELECT_TOOLTIP = (
    "Cheaper particles: at the first step below this noise level σ, draw one particle per image with the "
    "weights and finish as plain DeRaDiff (2 model passes per step instead of 2 × particles). 0 = particles to "
    "the end. The weights barely move at low noise: in the test worlds nearly all their variance accrued "
    "between σ 6 and 0.3, and 4 particles until σ 0.5 (karras, 50 steps) cost 6.0 passes per step against "
    "8.0 for running them to the end, with the same error within 1.2 standard errors (λ 0.25 and 0.5); on a "
    "small trained model it also skipped the last step, where the weights collapse. On SD1.5-type models σ runs "
    "from about 14.6 down to 0.03. Only used when particles > 1.")


def particle_rule_input():
    return io.Combo.Input("particle_rule", options=list(PARTICLE_RULES), default="trapezoid", optional=True,
                          tooltip=PARTICLE_RULE_TOOLTIP, **advanced())


def particle_select_input():
    return io.Float.Input("particle_select_sigma", default=0.0, min=0.0, max=1000.0, step=0.05, optional=True,
                          tooltip=PARTICLE_SELECT_TOOLTIP, **advanced())


def check_particle_options(node: str, kwargs) -> dict:
    """ParticleGuider keyword options from particle_rule and particle_select_sigma (defaults: today's run)."""
    rule = kwargs.get("particle_rule", "trapezoid")
    if rule is None:
        rule = "trapezoid"
    if rule not in PARTICLE_RULES:
        raise NodeInputError(node, "particle_rule", f"expected one of {', '.join(PARTICLE_RULES)}, got {rule!r}")
    raw = kwargs.get("particle_select_sigma", 0.0)
    try:
        select = float(0.0 if raw is None else raw)
    except (TypeError, ValueError):
        raise NodeInputError(node, "particle_select_sigma", f"expected a noise level σ >= 0, got {raw!r}") from None
    if not math.isfinite(select) or select < 0:
        raise NodeInputError(node, "particle_select_sigma", f"expected a noise level σ >= 0 (0 = off), got {raw!r}")
    if rule == "aligned proposal":
        return {"select_below": select, "weight_rule": "trapezoid", "proposal": 0.0}
    return {"select_below": select, "weight_rule": rule, "proposal": None}


def particles_input(tooltip=PARTICLES_TOOLTIP):
    return io.Int.Input("particles", default=1, min=1, max=64, optional=True, tooltip=tooltip, **advanced())


def resample_ess_input():
    return io.Float.Input("resample_ess", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                          tooltip=RESAMPLE_ESS_TOOLTIP, **advanced())


def check_particles(node: str, kwargs, full_pass_every: int = 1):
    """(particles, resample threshold) from the optional inputs; particles > 1 needs full_pass_every = 1."""
    value = kwargs.get("particles", 1)
    try:
        particles = int(value)
    except (TypeError, ValueError):
        raise NodeInputError(node, "particles", f"expected a whole number >= 1, got {value!r}") from None
    if particles < 1 or (particles != value and not isinstance(value, str)):
        raise NodeInputError(node, "particles", f"expected a whole number >= 1 (1 = plain DeRaDiff), got {value!r}")
    raw = kwargs.get("resample_ess", 0.5)
    try:
        below = float(raw)
    except (TypeError, ValueError):
        raise NodeInputError(node, "resample_ess", f"expected a number in 0..1, got {raw!r}") from None
    if not math.isfinite(below) or not 0.0 <= below <= 1.0:
        raise NodeInputError(node, "resample_ess", f"expected a number in 0..1, got {raw!r}")
    if particles > 1 and full_pass_every != 1:
        raise NodeInputError(node, "particles", f"particles > 1 needs both models at every step; set "
                             f"full_pass_every to 1 (got {full_pass_every})")
    return particles, below
