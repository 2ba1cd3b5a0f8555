"""λ along the denoising trajectory. Pure Python/torch: no ComfyUI imports.

A schedule maps *progress* p in [0, 1] to λ. Progress is read off the sigma the model is
called at, interpolated against the sampler's own sigmas (ComfyUI hands them to the model
as ``transformer_options["sample_sigmas"]``), never by counting calls: Heun, DPM++ 2S and
the SDE samplers call the model more than once per step, and img2img (denoise < 1) runs
only the tail of the schedule, yet all follow the same curve.
"""
from __future__ import annotations

import bisect
import math

from .mixing import check_lambda

SHAPES = ("constant", "linear", "cosine", "ease_in", "ease_out", "interval", "custom")


_float_cache = [None, None]  # (the sigmas object last seen, its values as floats)


def _as_floats(sample_sigmas) -> list:
    """The sampler's sigmas as Python floats, converted once per sampling run rather than at
    every model call (on a GPU each element read is a device sync)."""
    if _float_cache[0] is not sample_sigmas:
        _float_cache[0], _float_cache[1] = sample_sigmas, [float(s) for s in sample_sigmas]
    return _float_cache[1]


def progress_at(sigma: float, sample_sigmas) -> float:
    """Fractional step index of ``sigma`` in the (descending) sampler sigmas, scaled to [0, 1].

    Between two sampler sigmas it interpolates linearly in log-sigma (where the
    schedulers space their steps); the final 0 is handled linearly.
    """
    if sample_sigmas is None:
        return 0.0
    sigmas = _as_floats(sample_sigmas)
    n = len(sigmas) - 1
    if n <= 0:
        return 0.0
    sigma = float(sigma)
    if sigma >= sigmas[0]:
        return 0.0
    if sigma <= sigmas[-1]:
        return 1.0
    # sigmas descend; find i with sigmas[i] >= sigma > sigmas[i+1]
    ascending = [-s for s in sigmas]
    i = max(0, bisect.bisect_right(ascending, -sigma) - 1)
    hi, lo = sigmas[i], sigmas[i + 1]
    if lo > 0 and sigma > 0:
        frac = (math.log(hi) - math.log(sigma)) / (math.log(hi) - math.log(lo))
    else:
        frac = (hi - sigma) / (hi - lo)
    return min(1.0, (i + frac) / n)


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
            inside = self.start_percent <= p <= self.end_percent
            return self.lambda_from if inside else self.lambda_outside
        t = _EASE[self.shape](_window(p, self.start_percent, self.end_percent))
        return self.lambda_from + (self.lambda_to - self.lambda_from) * t

    def _custom(self, p: float) -> float:
        # one value per step: step k covers progress [k/n, (k+1)/n)
        n = len(self.values)
        return self.values[min(n - 1, int(p * n + 1e-9))]

    def value_at(self, sigma, sample_sigmas=None) -> float:
        if self.shape == "constant":
            return self.lambda_from
        if hasattr(sigma, "flatten"):
            sigma = float(sigma.flatten()[0])
        return self.at_progress(progress_at(sigma, sample_sigmas))

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
            return "λ per step: " + ", ".join(f"{v:g}" for v in self.values)
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
