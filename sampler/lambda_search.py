"""Bayesian search for the best λ: a 1-D Gaussian process over reward(λ) and expected improvement.

Pure torch (float64), no ComfyUI import. One idea per function:
  - ``fit_gp``: a GP with a constant mean and a squared-exponential kernel, hyperparameters chosen by
    the log marginal likelihood on a small grid (1-D: a grid is exact enough and never fails to converge);
  - ``expected_improvement``: the acquisition;
  - ``propose``: the next batch of λ (the "kriging believer" trick: each chosen λ is added as if it had
    returned the GP mean, so one batch spreads out instead of stacking on one point);
  - ``LambdaSearch``: the ask/tell loop the node drives, one batched sampling pass per ``ask``.
Each observation is a mean over prompts × seeds; its noise variance is the spread of those scores
divided by their count, so noisy λ are trusted less.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_DTYPE = torch.float64


def _kernel(a: torch.Tensor, b: torch.Tensor, lengthscale: float, signal_var: float) -> torch.Tensor:
    return signal_var * torch.exp(-0.5 * ((a[:, None] - b[None, :]) / lengthscale) ** 2)


@dataclass
class GaussianProcess:
    x: torch.Tensor
    y_mean: float
    y_scale: float
    lengthscale: float
    signal_var: float
    noise_var: torch.Tensor  # per observation, in standardised units
    chol: torch.Tensor
    alpha: torch.Tensor

    def predict(self, xs) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation of the latent reward at ``xs`` (original units)."""
        xs = torch.as_tensor(xs, dtype=_DTYPE).reshape(-1)
        k = _kernel(xs, self.x, self.lengthscale, self.signal_var)
        mean = k @ self.alpha
        v = torch.cholesky_solve(k.T, self.chol) if len(self.x) else k.T
        var = (self.signal_var - (k * v.T).sum(1)).clamp_min(1e-12)
        return self.y_mean + self.y_scale * mean, self.y_scale * var.sqrt()


def fit_gp(x, y, noise_var=None, span: tuple[float, float] | None = None) -> GaussianProcess:
    """GP posterior for observations ``y`` at ``x`` (``noise_var``: variance of each observation, or
    None to estimate one shared noise level). ``span`` is the searched range; it bounds the lengthscales.
    Every hyperparameter setting of the grid is tried at once (one batched Cholesky)."""
    x = torch.as_tensor(x, dtype=_DTYPE).reshape(-1)
    y = torch.as_tensor(y, dtype=_DTYPE).reshape(-1)
    if len(x) == 0 or len(x) != len(y) or not bool(torch.isfinite(y).all()):
        raise ValueError(f"need matching, non-empty, finite x and y (got {len(x)} and {len(y)})")
    lo, hi = span if span is not None else (float(x.min()), float(x.max()))
    width = max(hi - lo, 1e-6)
    y_mean = float(y.mean())
    y_scale = float(y.std()) if len(y) > 1 and float(y.std()) > 1e-12 else 1.0
    ys = (y - y_mean) / y_scale
    if noise_var is None:
        given, extras = torch.zeros_like(ys), [1e-4, 1e-3, 1e-2, 0.05, 0.2]
    else:  # the given noise, plus whatever extra the data asks for (misfit the spread does not explain)
        given, extras = torch.as_tensor(noise_var, dtype=_DTYPE).reshape(-1) / y_scale ** 2, [0.0, 1e-3, 1e-2, 0.05]
    ls, sv, ex = torch.meshgrid(torch.logspace(math.log10(width / 20), math.log10(width * 2), 25, dtype=_DTYPE),
                                torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0], dtype=_DTYPE),
                                torch.tensor(extras, dtype=_DTYPE), indexing="ij")
    ls, sv, ex = ls.reshape(-1), sv.reshape(-1), ex.reshape(-1)
    d2 = (x[:, None] - x[None, :]) ** 2
    noise = given[None, :] + ex[:, None] + 1e-6
    k = sv[:, None, None] * torch.exp(-0.5 * d2[None] / ls[:, None, None] ** 2) + torch.diag_embed(noise)
    chol, info = torch.linalg.cholesky_ex(k)
    ok = info == 0
    if not bool(ok.any()):
        raise ValueError("no Gaussian process fits these observations")
    chol = chol[ok]
    alpha = torch.cholesky_solve(ys[None, :, None].expand(len(chol), -1, 1), chol)[..., 0]
    lml = -0.5 * (alpha @ ys) - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    i = int(torch.argmax(lml))
    return GaussianProcess(x, y_mean, y_scale, float(ls[ok][i]), float(sv[ok][i]), noise[ok][i], chol[i], alpha[i])


def expected_improvement(mean: torch.Tensor, std: torch.Tensor, best: float, xi: float = 0.0) -> torch.Tensor:
    """E[max(f - best - xi, 0)] under N(mean, std²), for maximisation."""
    std = std.clamp_min(1e-12)
    z = (mean - best - xi) / std
    normal = torch.distributions.Normal(torch.zeros((), dtype=mean.dtype), torch.ones((), dtype=mean.dtype))
    return (mean - best - xi) * normal.cdf(z) + std * torch.exp(normal.log_prob(z))


def propose(gp: GaussianProcess, lo: float, hi: float, count: int, taken=(), grid_points: int = 401,
            min_gap: float | None = None) -> list[float]:
    """``count`` new λ in [lo, hi] by expected improvement, none closer than ``min_gap`` to another."""
    grid = torch.linspace(lo, hi, grid_points, dtype=_DTYPE)
    min_gap = (hi - lo) / (grid_points - 1) * 2 if min_gap is None else min_gap
    chosen: list[float] = []
    current = gp
    avoid = list(taken) + gp.x.tolist()
    for _ in range(count):
        mean, std = current.predict(grid)
        incumbent = float(current.predict(current.x)[0].max())
        ei = expected_improvement(mean, std, incumbent)
        for a in avoid + chosen:
            ei[(grid - a).abs() < min_gap] = -1.0
        if float(ei.max()) < 0:
            break
        pick = float(grid[int(torch.argmax(ei))])
        chosen.append(pick)
        # kriging believer: pretend the pick returned the posterior mean, so the next pick moves on
        believed_y = torch.cat([current.predict(current.x)[0], current.predict([pick])[0]])
        noise = torch.cat([current.noise_var * current.y_scale ** 2, torch.tensor([1e-6 * current.y_scale ** 2], dtype=_DTYPE)])
        current = fit_gp(torch.cat([current.x, torch.tensor([pick], dtype=_DTYPE)]), believed_y, noise, (lo, hi))
    return chosen


def initial_design(lo: float, hi: float, count: int) -> list[float]:
    """Evenly spaced λ including both ends (the GP needs the range's edges)."""
    if count <= 1:
        return [(lo + hi) / 2]
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


@dataclass
class LambdaSearch:
    """Ask for a batch of λ, sample and score them, tell the scores; repeat until the budget is spent.

    ``tell`` takes, per λ, all its scores (prompts × seeds): their mean is the observation; the
    spread of all scores, pooled over λ, gives each mean's noise variance."""
    lo: float
    hi: float
    budget: int  # λ evaluations in all
    per_pass: int = 3
    initial: int = 4
    xs: list = field(default_factory=list)
    means: list = field(default_factory=list)
    scores: list = field(default_factory=list)

    def __post_init__(self):
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.hi > self.lo):
            raise ValueError(f"the λ range must be finite with max > min, got {self.lo}..{self.hi}")
        if self.budget < 2:
            raise ValueError("the budget must allow at least 2 λ evaluations")

    @property
    def remaining(self) -> int:
        return self.budget - len(self.xs)

    def ask(self) -> list[float]:
        if self.remaining <= 0:
            return []
        if not self.xs:
            return initial_design(self.lo, self.hi, min(self.initial, self.budget))
        gp = self.gp()
        return propose(gp, self.lo, self.hi, min(self.per_pass, self.remaining), taken=self.xs)

    def tell(self, lams, scores_per_lambda):
        for lam, scores in zip(lams, scores_per_lambda):
            s = torch.as_tensor(scores, dtype=_DTYPE).reshape(-1)
            if len(s) == 0 or not bool(torch.isfinite(s).all()):
                raise ValueError(f"λ={lam}: scores must be finite and non-empty")
            self.xs.append(float(lam))
            self.means.append(float(s.mean()))
            self.scores.append(s.tolist())

    def gp(self) -> GaussianProcess:
        # The spread of a few scores is a poor estimate on its own (4 scores: often several times too
        # small), so the scores' variance is pooled over every λ: the noise of a mean is that / count.
        spreads = [torch.tensor(s, dtype=_DTYPE).var(unbiased=True) for s in self.scores if len(s) > 1]
        noise = None
        if spreads:
            pooled = float(torch.stack(spreads).mean())
            floor = 1e-9 * max(1.0, float(torch.tensor(self.means).abs().max()) ** 2)
            noise = [max(pooled / len(s), floor) for s in self.scores]
        return fit_gp(self.xs, self.means, noise, (self.lo, self.hi))

    def best(self, grid_points: int = 401) -> tuple[float, float]:
        """λ maximising the GP's posterior mean over the range, and that mean."""
        gp = self.gp()
        grid = torch.linspace(self.lo, self.hi, grid_points, dtype=_DTYPE)
        mean, _ = gp.predict(grid)
        i = int(torch.argmax(mean))
        return float(grid[i]), float(mean[i])
