"""lambda along the trajectory. Pure Python/torch: no ComfyUI imports."""
from __future__ import annotations

from .mixing import check_lambda


class ConstantLambda:
    """The paper's setting: one lambda for every model evaluation."""

    def __init__(self, lam: float):
        self.lam = check_lambda(lam)

    def value_at(self, sigma: float, sample_sigmas=None) -> float:
        return self.lam

    @property
    def uses_reference(self) -> bool:
        return self.lam != 1.0

    @property
    def uses_aligned(self) -> bool:
        return self.lam != 0.0

    def __repr__(self):
        return f"ConstantLambda({self.lam:g})"


def as_schedule(lam_or_schedule):
    if hasattr(lam_or_schedule, "value_at"):
        return lam_or_schedule
    return ConstantLambda(lam_or_schedule)
