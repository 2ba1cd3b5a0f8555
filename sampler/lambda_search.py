"""Bayesian search for the best λ: a 1-D Gaussian process over reward(λ) and the knowledge gradient.

Pure torch (float64), no ComfyUI import. One idea per function:
  - ``fit_gp``: a GP with a constant mean and a squared-exponential kernel, hyperparameters chosen by
    the log marginal likelihood on a small grid (1-D: a grid is exact enough and never fails to converge);
  - ``score_variance``: the variance of one score (one prompt × seed) as a smooth function of λ: a GP on
    the log of each λ's sample variance (the scores' noise differs a lot between λ);
  - ``knowledge_gradient``: the acquisition: how much evaluating a λ, with the noise expected there, would
    raise the maximum of the GP mean (the final choice), so noisy λ are worth less than precise ones;
  - ``propose``: the next batch of λ (each chosen λ conditions the GP as if observed with its noise, so
    one batch spreads out instead of stacking on one point);
  - ``LambdaSearch``: the ask/tell loop the node drives, one batched sampling pass per ``ask``.
Each observation is a mean over prompts × seeds; its noise variance is the variance of one score at that
λ (``score_variance``) divided by the number of scores, so noisy λ are trusted less.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_DTYPE = torch.float64
GRID_POINTS = 401  # the λ grid on which the best λ is chosen
PROPOSAL_POINTS = 201  # the coarser λ grid (every other point of it) on which the next λ are chosen


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

    def covariance(self, xs) -> torch.Tensor:
        """Posterior covariance of the latent reward at ``xs``, in standardised units."""
        xs = torch.as_tensor(xs, dtype=_DTYPE).reshape(-1)
        k = _kernel(xs, self.x, self.lengthscale, self.signal_var)
        return _kernel(xs, xs, self.lengthscale, self.signal_var) - k @ torch.cholesky_solve(k.T, self.chol)


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


def _normal_rule(step: float = 0.125, limit: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights for E[g(Z)], Z ~ N(0, 1): the trapezoid rule on [-limit, limit] with the normal
    density. g is a maximum of lines here, with kinks, where Gauss-Hermite rules are poor (32 nodes: errors
    of 3-12 % of E[max(a, b + sZ)] - max(a, b)); this rule's are about 1 % or less."""
    nodes = torch.arange(-limit, limit + step / 2, step, dtype=_DTYPE)
    weights = torch.exp(-0.5 * nodes ** 2)
    return nodes, weights / weights.sum()


def knowledge_gradient(mean: torch.Tensor, cov: torch.Tensor, noise_var: torch.Tensor,
                       rule: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """For every point c of a grid: E[max_l mean'_l] - max_l mean_l, where mean' is the GP mean after one
    more observation at c with noise variance ``noise_var[c]`` (``mean``, ``cov``: the posterior on the grid).
    mean' = mean + cov[:, c] / sqrt(cov[c, c] + noise_var[c]) * Z with Z ~ N(0, 1); the expectation by
    quadrature over Z (``_normal_rule``)."""
    nodes, weights = rule if rule is not None else _normal_rule()
    step = cov / (torch.diagonal(cov).clamp_min(0.0) + noise_var).clamp_min(1e-18).sqrt()[None, :]  # [l, c]
    best = torch.stack([(mean[:, None] + step * z).amax(0) for z in nodes.tolist()], 1)  # [c, nodes]
    return best @ weights - float(mean.max())


def propose(gp: GaussianProcess, lo: float, hi: float, count: int, taken=(), noise_var=None,
            grid_points: int | None = None, min_gap: float | None = None) -> list[float]:
    """``count`` new λ in [lo, hi] by the knowledge gradient, none closer than ``min_gap`` to another or to
    ``taken``. ``noise_var``: the noise variance of a new observation at each grid λ (original units; a
    tensor over the grid, or a function of it); None: the GP's own mean noise level. Each chosen λ
    conditions the GP as if it had been observed with that noise (the mean is unchanged: it is what the
    GP expects there), so the next choice moves to where information is still missing."""
    grid_points = PROPOSAL_POINTS if grid_points is None else grid_points
    grid = torch.linspace(lo, hi, grid_points, dtype=_DTYPE)
    min_gap = (hi - lo) / (grid_points - 1) * 2 if min_gap is None else min_gap
    scale2 = gp.y_scale ** 2
    if noise_var is None:
        tau2 = torch.full_like(grid, float(gp.noise_var.mean()))
    else:
        tau2 = (noise_var(grid) if callable(noise_var) else torch.as_tensor(noise_var, dtype=_DTYPE)) / scale2
    mean = (gp.predict(grid)[0] - gp.y_mean) / gp.y_scale
    cov = gp.covariance(grid)
    rule = _normal_rule()
    blocked = torch.zeros_like(grid, dtype=torch.bool)
    for a in list(taken) + gp.x.tolist():
        blocked |= (grid - a).abs() < min_gap
    chosen: list[float] = []
    for _ in range(count):
        if bool(blocked.all()):
            break
        kg = knowledge_gradient(mean, cov, tau2, rule)
        kg[blocked] = -math.inf
        c = int(torch.argmax(kg))
        chosen.append(float(grid[c]))
        blocked |= (grid - grid[c]).abs() < min_gap
        kc = cov[:, c].clone()
        cov = cov - kc[:, None] * kc[None, :] / (kc[c] + tau2[c]).clamp_min(1e-18)
    return chosen


def score_variance(xs, scores, span: tuple[float, float]):
    """The variance of one score as a function of λ, or None when no λ has two scores.

    Each λ's sample variance s² of its n scores is noisy (n = 8: often half or twice the truth), so the
    log variances are smoothed by a GP over λ: under normal scores log s² has mean log σ² + ψ(ν/2) -
    log(ν/2) and variance ψ'(ν/2), ν = n - 1 (ψ: digamma). Variances below 1e-6 of the largest count
    as that (a λ with equal scores must not be trusted without limit)."""
    pairs = [(float(x), torch.as_tensor(s, dtype=_DTYPE).reshape(-1)) for x, s in zip(xs, scores)]
    pairs = [(x, s) for x, s in pairs if len(s) > 1]
    if not pairs:
        return None
    var = torch.stack([s.var(unbiased=True) for _, s in pairs])
    mean_scale = max(1.0, max(float(s.abs().max()) for _, s in pairs)) ** 2
    var = var.clamp_min(max(1e-6 * float(var.max()), 1e-12 * mean_scale))
    nu = torch.tensor([len(s) - 1 for _, s in pairs], dtype=_DTYPE)
    z = var.log() - (torch.digamma(nu / 2) - torch.log(nu / 2))
    log_var = fit_gp([x for x, _ in pairs], z, torch.polygamma(1, nu / 2), span)
    return lambda at: log_var.predict(at)[0].exp()


def initial_design(lo: float, hi: float, count: int) -> list[float]:
    """Evenly spaced λ including both ends (the GP needs the range's edges)."""
    if count <= 1:
        return [(lo + hi) / 2]
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


@dataclass
class LambdaSearch:
    """Ask for a batch of λ, sample and score them, tell the scores; repeat until the budget is spent.

    ``tell`` takes, per λ, all its scores (prompts × seeds): their mean is the observation, and the
    variance of one score at that λ (``score_variance``, smoothed over λ) divided by their count is its
    noise variance."""
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
        variance = self.variance()
        gp = self._fit(variance)
        noise = None
        if variance is not None:  # a new λ gets as many scores as the last one did
            count = len(self.scores[-1])
            noise = lambda at: variance(at) / count  # noqa: E731
        return propose(gp, self.lo, self.hi, min(self.per_pass, self.remaining), taken=self.xs, noise_var=noise)

    def tell(self, lams, scores_per_lambda):
        for lam, scores in zip(lams, scores_per_lambda):
            s = torch.as_tensor(scores, dtype=_DTYPE).reshape(-1)
            if len(s) == 0 or not bool(torch.isfinite(s).all()):
                raise ValueError(f"λ={lam}: scores must be finite and non-empty")
            self.xs.append(float(lam))
            self.means.append(float(s.mean()))
            self.scores.append(s.tolist())

    def _fit(self, variance) -> GaussianProcess:
        noise = None
        if variance is not None:
            counts = torch.tensor([len(s) for s in self.scores], dtype=_DTYPE)
            noise = variance(self.xs) / counts
        return fit_gp(self.xs, self.means, noise, (self.lo, self.hi))

    def variance(self):
        """The variance of one score as a function of λ (``score_variance``), or None."""
        return score_variance(self.xs, self.scores, (self.lo, self.hi))

    def gp(self) -> GaussianProcess:
        return self._fit(self.variance())

    def best(self, grid_points: int | None = None) -> tuple[float, float]:
        """λ maximising the GP's posterior mean over the range, and that mean."""
        gp = self.gp()
        grid = torch.linspace(self.lo, self.hi, GRID_POINTS if grid_points is None else grid_points, dtype=_DTYPE)
        mean, _ = gp.predict(grid)
        i = int(torch.argmax(mean))
        return float(grid[i]), float(mean[i])
