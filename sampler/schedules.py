"""λ along the denoising trajectory. Pure Python/torch: no ComfyUI imports.

A schedule maps *progress* p in [0, 1] to λ. Progress is absolute, as in ComfyUI's own
percent inputs (ConditioningSetTimestepRange, ControlNet start/end): p is the percent whose
``model_sampling.percent_to_sigma(p)`` is the sigma the model is called at. So a schedule
means the same thing however the steps are split (KSamplerAdvanced start/end steps,
SplitSigmas, two-stage sampling), and multi-call samplers (Heun, DPM++ 2S, SDE) follow the
same curve. Windows are half-open: "0 to 40 %" covers the steps that start before 40 %.

``custom`` is the exception: one value per sampler step, whatever the scheduler's spacing.
A ``StepClock`` says which step of the full schedule an evaluation belongs to (its offset
places a KSamplerAdvanced part or a SplitSigmas half; the ComfyUI side finds it).
"""
from __future__ import annotations

import math

from .mixing import check_lambda

SHAPES = ("constant", "linear", "cosine", "ease_in", "ease_out", "interval", "custom")

# Steps that start exactly on a window edge must land on one side whatever the float
# rounding of the sigma -> percent round trip.
EDGE_TOLERANCE = 1e-4


def invert_percent(percent_to_sigma, sigma: float, iterations: int = 40) -> float:
    """The percent p in [0, 1] with percent_to_sigma(p) == sigma (percent_to_sigma decreases)."""
    lo, hi = 0.0, 1.0
    if sigma >= percent_to_sigma(1e-9):
        return 0.0
    if sigma <= percent_to_sigma(1.0 - 1e-9):
        return 1.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if percent_to_sigma(mid) > sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class PercentOfSigma:
    """sigma -> absolute percent for one model's noise schedule, memoised per sigma (a run
    calls the model at a few dozen distinct sigmas)."""

    def __init__(self, percent_to_sigma):
        self.percent_to_sigma = percent_to_sigma
        self._memo = {}

    def __call__(self, sigma) -> float:
        if hasattr(sigma, "flatten"):
            sigma = sigma.flatten()[0]
        sigma = float(sigma)
        p = self._memo.get(sigma)
        if p is None:
            p = self._memo[sigma] = invert_percent(lambda q: float(self.percent_to_sigma(q)), sigma)
        return p


SIGMA_TOLERANCE = 1e-5  # relative: a sigma "equals" a scheduled one (float32 round trips)


def step_of_sigma(sigmas, sigma: float) -> int:
    """Index k of the step whose interval holds ``sigma``: the last k with sigmas[k] >= sigma (an
    evaluation exactly at sigmas[k+1] opens step k+1; a midpoint evaluation stays in step k)."""
    k = 0
    for i, s in enumerate(sigmas[:-1]):
        if s >= sigma * (1.0 - SIGMA_TOLERANCE):
            k = i
        else:
            break
    return k


class StepClock:
    """Which step of a run each model evaluation belongs to.

    Every evaluation is placed by its sigma (``step_of_sigma``), except for samplers whose step ends
    with a corrector evaluated at the next step's sigma (Heun, Heun++, the exponential Heun samplers):
    there the sampler's per-step callback, which ComfyUI's samplers call after a step's first
    evaluation, tells them apart: after the callback of step k, the first evaluation at or near
    sigmas[k+1] (nearer to it than to sigmas[k+2]: the exponential Heun samplers reach it through a
    log-SNR round trip, a float rounding away) is step k's corrector, the next one opens step k+1,
    and evaluations further down (Heun++'s second corrector, at sigmas[k+2]) are still step k.
    ``offset``: the run's first step in the full schedule.

    ``place`` is called once per evaluation of the sampler (not for the extra passes a guidance
    node makes at the same point); ``step`` and ``inner`` then describe that evaluation."""

    def __init__(self, sigmas, offset: int = 0, corrector_steps: bool = False):
        self.sigmas = [float(v) for v in sigmas]
        self.offset = int(offset)
        self.corrector_steps = corrector_steps
        self.reported = -1  # the last step the sampler's callback reported
        self._at_next = 0  # evaluations at or near sigmas[reported + 1] since that report
        self.step = offset  # of the last placed evaluation, in the full schedule
        self.inner = False  # the last placed evaluation is not its step's first (a corrector)

    def on_step(self, i: int):
        """The sampler's callback for step i (its first evaluation is done)."""
        self.reported, self._at_next = int(i), 0

    def place(self, sigma) -> int:
        sigma = float(sigma)
        last = max(0, len(self.sigmas) - 2)
        k, inner = self.reported, False
        if self.corrector_steps and 0 <= k < last:
            if sigma >= (self.sigmas[k + 1] + self.sigmas[k + 2]) / 2.0:
                self._at_next += 1
                inner = self._at_next == 1
                local = k if inner else k + 1
            else:
                local, inner = k, True
        else:
            local = min(step_of_sigma(self.sigmas, sigma), last)
        self.step, self.inner = self.offset + local, inner
        return self.step


class RunPosition:
    """Where an evaluation is in its run: absolute progress from the sigma (``PercentOfSigma``), and
    the step (a ``StepClock``, when the run counts steps)."""

    def __init__(self, percent_of, clock: StepClock | None = None):
        self.percent_of = percent_of
        self.clock = clock

    def __call__(self, sigma) -> float:
        return self.percent_of(sigma)

    def place(self, sigma):
        """Called once per sampler evaluation, before λ is read for it."""
        if self.clock is not None:
            self.clock.place(_first(sigma))

    def step(self, sigma):
        return None if self.clock is None else self.clock.step

    @property
    def inner(self) -> bool:
        return self.clock is not None and self.clock.inner


def _first(sigma):
    if hasattr(sigma, "flatten"):
        sigma = sigma.flatten()[0]
    return float(sigma)


def _window(p: float, start: float, end: float) -> float:
    if end <= start:
        return 0.0 if p < start else 1.0
    return min(1.0, max(0.0, (p - start) / (end - start)))


_EASE = {
    "constant": lambda t: 0.0,
    "linear": lambda t: t,
    "cosine": lambda t: (1.0 - math.cos(math.pi * t)) / 2.0,
    "ease_in": lambda t: t * t,
    "ease_out": lambda t: 1.0 - (1.0 - t) ** 2,
}


class LambdaSchedule:
    """λ(p). ``lambda_from``/``lambda_to`` are the ends of a ramp inside the window
    [start_percent, end_percent] (λ = from before it, to after it); ``interval`` is λ =
    ``lambda_from`` inside the window and ``lambda_outside`` outside; ``custom`` holds one
    value per step."""

    def __init__(self, shape="constant", lambda_from=1.0, lambda_to=1.0, start_percent=0.0,
                 end_percent=1.0, lambda_outside=0.0, values=None):
        if shape not in SHAPES:
            raise ValueError(f"unknown schedule shape {shape!r}; one of {', '.join(SHAPES)}")
        self.shape = shape
        self.lambda_from = check_lambda(lambda_from)
        self.lambda_to = check_lambda(lambda_to)
        self.lambda_outside = check_lambda(lambda_outside)
        if not (0.0 <= start_percent <= 1.0 and 0.0 <= end_percent <= 1.0):
            raise ValueError("start_percent and end_percent must lie in 0..1")
        if end_percent < start_percent:
            raise ValueError(f"end_percent ({end_percent}) is before start_percent ({start_percent})")
        self.start_percent, self.end_percent = float(start_percent), float(end_percent)
        self.values = [check_lambda(v) for v in (values or [])]
        if shape == "custom" and not self.values:
            raise ValueError("a custom schedule needs at least one value")

    # -- evaluation --------------------------------------------------------
    def at_progress(self, p: float) -> float:
        if self.shape == "custom":
            return self._custom(p)
        if self.shape == "interval":
            inside = self.start_percent - EDGE_TOLERANCE <= p < self.end_percent - EDGE_TOLERANCE \
                or (self.end_percent >= 1.0 and p >= self.start_percent - EDGE_TOLERANCE)
            return self.lambda_from if inside else self.lambda_outside
        t = _EASE[self.shape](_window(p, self.start_percent, self.end_percent))
        return self.lambda_from + (self.lambda_to - self.lambda_from) * t

    def _custom(self, p: float) -> float:
        # only without a step clock (the preview curve, a call outside a sampling run): the list
        # spread evenly over the progress, step k covering [k/n, (k+1)/n)
        n = len(self.values)
        return self.values[min(n - 1, int(p * n + EDGE_TOLERANCE))]

    def value_at(self, sigma, percent_of=None) -> float:
        """λ for a model call at ``sigma``; ``percent_of`` maps it to absolute progress
        (PercentOfSigma over the model's own schedule, or a RunPosition, which also knows the
        step: a custom schedule takes the value of that step, the last value past its end)."""
        if self.shape == "constant":
            return self.lambda_from
        if self.shape == "custom":
            step = getattr(percent_of, "step", None)
            k = step(sigma) if step is not None else None
            if k is not None:
                return self.values[min(k, len(self.values) - 1)]
        return self.at_progress(percent_of(sigma) if percent_of is not None else 0.0)

    @property
    def counts_steps(self) -> bool:
        return self.shape == "custom"

    def curve(self, points: int = 201) -> list[float]:
        return [self.at_progress(i / (points - 1)) for i in range(points)]

    # -- which models a run needs ----------------------------------------------
    def _all_values(self):
        if self.shape == "constant":
            return [self.lambda_from]
        if self.shape == "custom":
            return self.values
        if self.shape == "interval":
            return [self.lambda_from, self.lambda_outside] if (self.start_percent > 0 or self.end_percent < 1) \
                else [self.lambda_from]
        return self.curve(401) + [self.lambda_from, self.lambda_to]

    @property
    def uses_aligned(self) -> bool:
        return any(v != 0.0 for v in self._all_values())

    @property
    def uses_reference(self) -> bool:
        return any(v != 1.0 for v in self._all_values())

    def describe(self) -> str:
        if self.shape == "constant":
            return f"λ = {self.lambda_from:g}"
        if self.shape == "custom":
            return ("λ per sampler step: " + ", ".join(f"{v:g}" for v in self.values)
                    + f" (the last holds after step {len(self.values)})")
        window = f"{self.start_percent:.0%}–{self.end_percent:.0%}"
        if self.shape == "interval":
            return f"λ = {self.lambda_from:g} in {window}, {self.lambda_outside:g} outside"
        return f"λ {self.shape} {self.lambda_from:g} → {self.lambda_to:g} over {window}"


def ConstantLambda(lam: float) -> LambdaSchedule:
    return LambdaSchedule("constant", lambda_from=lam, lambda_to=lam)


def as_schedule(lam_or_schedule):
    if hasattr(lam_or_schedule, "value_at"):
        return lam_or_schedule
    return ConstantLambda(lam_or_schedule)


def parse_values(text: str) -> list[float]:
    """'1, 1, 0.5 0.25' -> [1.0, 1.0, 0.5, 0.25] (commas, spaces or new lines)."""
    out = []
    for token in text.replace(",", " ").replace(";", " ").split():
        try:
            out.append(float(token))
        except ValueError:
            raise ValueError(f"'{token}' is not a number") from None
    return out
