"""Difference reuse: fewer than two model passes per step. Pure torch, no ComfyUI import.

The two models' denoised predictions differ by Δ = D_aligned − D_reference, and Δ changes
slowly along a trajectory. With ``full_pass_every = k`` both models run only on every k-th
step (and wherever the plan below says so); in between ONE model runs and the last Δ
completes the mix:

    D = D_ref + λ·Δ_stale          (the reference ran; the stale term is weighted by λ)
    D = D_al − (1 − λ)·Δ_stale     (the aligned model ran; weighted by 1 − λ)

whichever weight is smaller, so the error a stale Δ makes is as small as it can be. The stale
Δ is first carried from the noise level it was taken at to the current one by the factor a
Gaussian data model predicts (``prior_weight``): the two models' predictions converge as the
noise falls, so Δ shrinks, and reusing it as it is overshoots (in the alignment world this
carrying cuts the reuse error 3-10x: docs/difference_reuse.md). k = 1 is the exact method; no state is kept then.

Which evaluations always run both models, and why:
- the first step: there is no Δ yet;
- evaluations at a noise level that is not one of the run's scheduled sigmas: the inner
  evaluations of multi-evaluation samplers (dpm_2, dpmpp_sde, ...), whose extrapolation
  amplifies an error in one evaluation;
- optionally the last ``final_full`` scheduled steps. The default is 0: in the alignment
  world forcing the last 1 or 2 steps full changed E[r] by at most 5e-05 with the stale Δ
  carried (0.0015 when reused as it is), so it is not worth a pass (docs/difference_reuse.md).
"""
from __future__ import annotations

import torch

# Carry a stale Δ to the current noise level with prior_weight (measured: docs/difference_reuse.md).
RESCALE_STALE = True


def stale_rescale(sigma_data: float = 1.0, flow: bool = False):
    """The ``rescale`` function for DifferenceMemory, or None when RESCALE_STALE is off."""
    if not RESCALE_STALE:
        return None
    return lambda sigma: prior_weight(sigma, sigma_data, flow)


# The default number of final steps that always run both models (measured: docs/difference_reuse.md).
FINAL_FULL_STEPS = 0


def _as_float(sigma) -> float:
    if isinstance(sigma, torch.Tensor):
        return float(sigma.flatten()[0])
    return float(sigma)


class StepPlan:
    """For one sampling run: which evaluations must run both models."""

    def __init__(self, every: int, sigmas, final_full: int = FINAL_FULL_STEPS):
        self.every = max(1, int(every))
        self.sigmas = [] if sigmas is None else [_as_float(s) for s in torch.as_tensor(sigmas).flatten()]
        self.final_full = max(0, int(final_full))
        # steps are the intervals sigmas[i] -> sigmas[i+1]; the model is evaluated at sigmas[i]
        self.steps = max(0, len(self.sigmas) - 1)

    def step_index(self, sigma):
        """i with sigmas[i] == sigma (relative tolerance for float rounding), else None."""
        s = _as_float(sigma)
        for i in range(self.steps):
            if abs(self.sigmas[i] - s) <= 1e-6 * max(abs(s), 1e-12):
                return i
        return None

    def is_full(self, sigma, inner: bool = False) -> bool:
        """``inner``: an evaluation inside a step that is not the step's first (Heun's corrector lands
        exactly on the next scheduled sigma, so only the sampler's step count can tell)."""
        if self.every == 1 or inner:
            return True
        i = self.step_index(sigma)
        if i is None:
            return True
        return i % self.every == 0 or i >= self.steps - self.final_full

    def full_steps(self) -> list:
        """Scheduled step indices that run both models (for logs, tests and benchmarks)."""
        return [i for i in range(self.steps) if self.is_full(self.sigmas[i])]


def cheaper_side(lam) -> str:
    """Which model to run on a reuse step: 'reference' when λ ≤ 1 − λ in size (the stale Δ is
    then weighted by λ), else 'aligned' (weighted by 1 − λ). One λ per batch element: the side
    whose largest stale weight over the batch is smaller."""
    if isinstance(lam, torch.Tensor):
        ref_weight, al_weight = float(lam.abs().max()), float((1 - lam).abs().max())
    else:
        ref_weight, al_weight = abs(lam), abs(1 - lam)
    return "reference" if ref_weight <= al_weight else "aligned"


def _weight(lam, like: torch.Tensor):
    if isinstance(lam, torch.Tensor):
        return lam.to(like).reshape((-1,) + (1,) * (like.ndim - 1))
    return lam


def complete(d_one: torch.Tensor, side: str, delta: torch.Tensor, lam) -> torch.Tensor:
    """The mix from one model's prediction and a stale Δ (see module docstring)."""
    w = _weight(lam, d_one)
    if side == "reference":
        return d_one + w * delta.to(d_one)
    return d_one - (1 - w) * delta.to(d_one)


def prior_weight(sigma: float, sigma_data: float = 1.0, flow: bool = False) -> float:
    """How much of a Gaussian-data posterior mean is the prior mean at noise level ``sigma``.

    For data N(μ, s²) with s = ``sigma_data`` the denoised prediction is
    D = (1 − c)·(data term in x) + c·μ, so two models that differ in μ differ by c(σ)·Δμ:
    c = σ²/(σ² + s²) for x = x0 + σ·ε (eps, v: ComfyUI's k-diffusion sigmas) and
    c = σ²/(σ² + (1−σ)²·s²) for rectified flow x = (1−σ)·x0 + σ·ε. The difference of two
    models therefore shrinks toward 0 as σ → 0 (both denoise to x)."""
    sigma = float(sigma)
    signal = (1.0 - sigma) if flow else 1.0
    denom = sigma * sigma + signal * signal * sigma_data * sigma_data
    return sigma * sigma / denom if denom > 0 else 1.0


class DifferenceMemory:
    """The last Δ per output slot (the guider has one slot, Realign Model one per cond).

    With ``rescale`` (a function σ -> c(σ), e.g. ``prior_weight``) a stale Δ taken at σ_full is
    carried to the current σ as Δ·c(σ)/c(σ_full): the change a Gaussian data model predicts."""

    def __init__(self, rescale=None):
        self.deltas = None
        self.sigma = None
        self.rescale = rescale

    def forget(self):
        self.deltas = None
        self.sigma = None

    def remember(self, d_refs, d_als, sigma=None):
        self.deltas = [None if r is None or a is None else (a - r) for r, a in zip(d_refs, d_als)]
        self.sigma = None if sigma is None else _as_float(sigma)

    def factor(self, sigma) -> float:
        if self.rescale is None or sigma is None or self.sigma is None:
            return 1.0
        then = self.rescale(self.sigma)
        return self.rescale(_as_float(sigma)) / then if then > 0 else 1.0

    def ready(self, shape, present) -> bool:
        """A stale Δ of ``shape`` exists for every slot that will produce an output
        (``present``: one flag per slot; an uncond slot is absent under the cfg=1 shortcut)."""
        if self.deltas is None or len(self.deltas) != len(present):
            return False
        return all(d is not None and tuple(d.shape) == tuple(shape)
                   for d, wanted in zip(self.deltas, present) if wanted)

    def complete(self, outputs, side, lam, sigma=None):
        f = self.factor(sigma)
        return [None if o is None else complete(o, side, d if f == 1.0 else d * f, lam)
                for o, d in zip(outputs, self.deltas)]
