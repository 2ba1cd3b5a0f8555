"""Particle realignment: the pure math (no ComfyUI import, so it is unit-testable on its own).

DeRaDiff samples every step from the normalised geometric mixture of the two models' Gaussian
reverse kernels. With equal variances s² the unnormalised product

    N(x'; μ_ref, s²)^(1-λ) · N(x'; μ_al, s²)^λ = Z_t(x_t) · N(x'; (1-λ)μ_ref + λμ_al, s²)

has the closed-form normaliser

    log Z_t(x_t) = -λ(1-λ) |μ_ref - μ_al|² / (2 s²)          (summed over elements)

which plain DeRaDiff drops. The geometric mixture of the two PATH distributions is the path
distribution of the model aligned at β/λ, so carrying Π_t Z_t as an importance weight over N
particles (sequential Monte Carlo) targets p_(β/λ) itself.

For a sampler whose step is x' = a·x + c·D + s·ε (D the mixed denoised prediction, ε ~ N(0, I)),
μ_ref - μ_al = c·(D_ref - D_al), so log Z_t = -λ(1-λ) · (c/s)² · |D_ref - D_al|² / 2. ``gain``
below is (c/s)² for each supported kernel. A step with s = 0 (deterministic samplers, the last
step) has no such factor: weights need a stochastic kernel.

For both supported kernels (with their full noise) the gain is exactly ∫ ds/s² over the step
(s = σ²), so Π Z_t is the continuous-time weight -λ(1-λ)/2 ∫ |ΔD|²/s² ds with |ΔD|² frozen at the
start of each step: first order in the step size. The particle loop uses the trapezoid rule
instead (|ΔD|² linear in s between two model calls, integrated exactly against 1/s²): second
order, and measured closer to p_(β/λ) overall (benchmarks/aw_particles_weight_rules.py). The
weight of the interval σ → σ' is known once both predictions at σ' are: the sampler weights and,
when the effective sample size is low, resamples x_σ' before taking the step from it.

Layout of a particle batch: the sampler's batch is N·B latents, particle-major (rows
j·B .. j·B+B-1 are particle j of images 0..B-1), so a conditioning batch of B tiles over it.
Log-weights have shape [N, B, *sites]: one weight per latent (sites = ()) for real images; the
alignment-world benchmarks use one weight per pixel (sites = (H, W)) because each pixel of their
latents is an independent sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


# -- the per-step factor of each kernel ------------------------------------------------------
def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0):
    """(sigma_down, sigma_up) of k-diffusion's ancestral step (the same formula ComfyUI uses)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def euler_ancestral_gain(sigma: float, sigma_next: float, eta: float = 1.0, s_noise: float = 1.0) -> float:
    """(c/s)² of x' = x·σ_down/σ + D·(1 - σ_down/σ) + s_noise·σ_up·ε; 0 when the step adds no noise."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
    s = float(s_noise) * sigma_up
    if sigma_down == 0 or s <= 0:
        return 0.0
    c = 1.0 - sigma_down / sigma
    return (c / s) ** 2


def ddpm_gain(sigma: float, sigma_next: float) -> float:
    """(c/s)² of ComfyUI's ``ddpm`` step (DDPM posterior in VP space, mapped back to σ space):
    c = sqrt(1+σ'²)·(1-α)/(sqrt(α)·σ·sqrt(1-ᾱ)), s = sqrt(1+σ'²)·sqrt((1-α)(1-ᾱ')/(1-ᾱ)),
    ᾱ = 1/(1+σ²), ᾱ' = 1/(1+σ'²), α = ᾱ/ᾱ'. The common factor sqrt(1+σ'²) cancels."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma_next <= 0:
        return 0.0
    acp, acp_prev = 1.0 / (sigma * sigma + 1.0), 1.0 / (sigma_next * sigma_next + 1.0)
    alpha = acp / acp_prev
    c = (1.0 - alpha) / (math.sqrt(alpha) * sigma * math.sqrt(1.0 - acp))
    s2 = (1.0 - alpha) * (1.0 - acp_prev) / (1.0 - acp)
    return c * c / s2 if s2 > 0 else 0.0


def squared_difference(d_ref: torch.Tensor, d_al: torch.Tensor, particles: int, site_dims: int = 0,
                       mask=None) -> torch.Tensor:
    """|D_ref - D_al|² per particle and site, shape [N, B, *sites], float64.

    ``site_dims`` = how many trailing dimensions are separate sites (0: one weight per latent,
    2: one per pixel). ``mask``: the inpainting denoise mask (only the denoised region moves)."""
    delta = (d_ref.to(torch.float64) - d_al.to(torch.float64))
    if mask is not None:
        delta = delta * mask.to(torch.float64)
    sq = delta * delta
    n_total = sq.shape[0]
    sq = sq.reshape(particles, n_total // particles, *sq.shape[1:])
    keep = sq.dim() - site_dims
    sq = sq.sum(dim=tuple(range(2, keep))) if keep > 2 else sq
    return sq.cpu()  # the weights live on the CPU, next to the seeded resampling generator


def site_sum(t: torch.Tensor, particles: int, site_dims: int = 0) -> torch.Tensor:
    """t [N·B, C, ...] summed per particle and site, shape [N, B, *sites], float64 on the CPU."""
    t = t.to(torch.float64)
    t = t.reshape(particles, t.shape[0] // particles, *t.shape[1:])
    keep = t.dim() - site_dims
    return (t.sum(dim=tuple(range(2, keep))) if keep > 2 else t).cpu()


def log_normaliser(d_ref: torch.Tensor, d_al: torch.Tensor, lam: float, gain: float,
                   particles: int, site_dims: int = 0, mask=None) -> torch.Tensor:
    """log Z_t per particle and site, shape [N, B, *sites]: -λ(1-λ)·gain·|D_ref - D_al|²/2."""
    return (-lam * (1.0 - lam) * gain / 2.0) * squared_difference(d_ref, d_al, particles, site_dims, mask)


# -- the weight of one interval between two model calls ---------------------------------------
def trapezoid_weights(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(c0, c1) with ∫ f(s)/s² ds over s = σ'²..σ² equal to c0·f(σ²) + c1·f(σ'²) for f linear in s.

    Both kernels' gain (c/s)² is exactly ∫ ds/s² = 1/σ'² - 1/σ² over their step (tested), so
    -λ(1-λ)/2·gain·|ΔD|² is the continuous-time weight -λ(1-λ)/2 ∫ |ΔD(x_s, s)|²/s² ds with |ΔD|²
    frozen at the start of the step. The particle loop integrates |ΔD|² linearly in s between two
    consecutive model calls instead (the trapezoid rule, exact against 1/s²): second order in the
    step, and measured closer to p_(β/λ) overall (benchmarks/aw_particles_weight_rules.py)."""
    s0, s1 = float(sigma) ** 2, float(sigma_next) ** 2
    if not s0 > s1 > 0:
        return 0.0, 0.0
    r = s0 / s1
    c0 = (math.log(r) - 1.0 + 1.0 / r) / ((r - 1.0) * s1)
    return c0, (1.0 - 1.0 / r) / s1 - c0


def interval_log_weight(previous, current, sigma_prev: float, sigma: float):
    """log-weight of the interval σ_prev → σ from the integrand λ(1-λ)|ΔD|² at its two ends
    (None = 0 there: λ ∈ {0, 1}, outside the window, no prediction); None when both ends are 0."""
    if previous is None and current is None:
        return None
    c0, c1 = trapezoid_weights(sigma_prev, sigma)
    if c0 == 0.0 and c1 == 0.0:
        return None
    inc = 0.0
    if previous is not None:
        inc = inc - 0.5 * c0 * previous
    if current is not None:
        inc = inc - 0.5 * c1 * current
    return inc


# -- weights ---------------------------------------------------------------------------
def normalised(logw: torch.Tensor) -> torch.Tensor:
    """Weights summing to 1 over the particle dimension (dim 0)."""
    return torch.softmax(logw, dim=0)


def ess(logw: torch.Tensor) -> torch.Tensor:
    """Effective sample size (Σw)²/Σw² over dim 0, per group/site (between 1 and N)."""
    w = normalised(logw)
    return 1.0 / (w * w).sum(0)


def systematic_resample(logw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Ancestor indices [N, ...] per group/site: one uniform per column, N evenly spaced points
    through the cumulative weights (unbiased: E[#copies of i] = N·w_i; less variance than
    multinomial)."""
    n = logw.shape[0]
    w = normalised(logw.to(torch.float64))
    cols = w.reshape(n, -1).T.contiguous()  # [columns, N]
    cdf = cols.cumsum(1)
    cdf[:, -1] = 1.0
    u = (torch.rand(cols.shape[0], 1, generator=generator, dtype=torch.float64)
         + torch.arange(n, dtype=torch.float64)[None, :]) / n
    idx = torch.searchsorted(cdf, u).clamp_max(n - 1)
    return idx.T.reshape(logw.shape)


def multinomial_resample(logw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = logw.shape[0]
    cols = normalised(logw.to(torch.float64)).reshape(n, -1).T
    idx = torch.multinomial(cols, n, replacement=True, generator=generator)
    return idx.T.reshape(logw.shape)


def draw_one(logw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One particle index per group/site, drawn with the final weights (shape logw.shape[1:]).

    A weighted draw, not the highest weight: the drawn particle is distributed as the SMC
    approximation of the target, which converges to p_(β/λ) as N grows; the arg-max would pick
    the top of the weight distribution (biased: for λ > 1 the particle the models disagree on most)."""
    n = logw.shape[0]
    cols = normalised(logw.to(torch.float64)).reshape(n, -1).T
    return torch.multinomial(cols, 1, generator=generator)[:, 0].reshape(logw.shape[1:])


def gather_weights(values: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """Per-particle values [N, B, *sites] (e.g. the last integrand) after resampling."""
    return torch.take_along_dim(values, ancestors.to(values.device), dim=0)


def gather_particles(x: torch.Tensor, ancestors: torch.Tensor, site_dims: int = 0) -> torch.Tensor:
    """x [N·B, C, ...] with every (group, site) column replaced by its ancestors' rows."""
    n = ancestors.shape[0]
    xs = x.reshape(n, x.shape[0] // n, *x.shape[1:])  # [N, B, C, ...]
    idx = ancestors.to(x.device)
    if site_dims == 0:
        idx = idx.reshape(n, -1, *([1] * (xs.dim() - 2))).expand_as(xs)
    else:
        idx = idx.unsqueeze(2).expand_as(xs)  # the channel dimension sits between group and sites
    return torch.take_along_dim(xs, idx, dim=0).reshape(x.shape)


def pick(x: torch.Tensor, choice: torch.Tensor, particles: int, site_dims: int = 0) -> torch.Tensor:
    """The output [B, C, ...]: for every group/site the row of the chosen particle."""
    return gather_particles(x, choice.unsqueeze(0).expand(particles, *choice.shape), site_dims
                            ).reshape(particles, x.shape[0] // particles, *x.shape[1:])[0]


# -- the weights of one run ------------------------------------------------------------------
# "Collapsed": ESS below 1/COLLAPSE_SHARE², which one particle holding more than COLLAPSE_SHARE of the
# normalised weight always gives, whatever N (and ESS >= 1/max weight, so the largest share is then > 0.90).
COLLAPSE_SHARE = 0.95
COLLAPSE_ESS = 1.0 / COLLAPSE_SHARE ** 2


@dataclass
class ParticleState:
    """Log-weights, adaptive resampling and the ESS record of one sampling run.

    ``resample_below``: resample when ESS < max(resample_below·N, 1 + resample_below)
    (``resample_threshold``; 0: never, importance weights only; 1: every weighted step).
    ``window``: (σ_low, σ_high); the weight integrand counts only at model calls whose σ lies
    inside (None: every step), so no weight and no resampling outside it.
    ``temper``: exponent on the weights (1 = the exact target; below 1 flattens them, a
    bias/variance trade-off used only in the studies).
    ``split_at`` / ``select_below``: the cheaper schedule (benchmarks/aw_particles_cheap.py). The
    log-weights' variance accrues at middle noise levels (about σ 6 → 0.3 on SD1.5's scale), so one
    particle runs while σ > split_at and is cloned N ways at the first model call at or below it; at
    the first model call below select_below one particle per image is drawn with the weights and the
    rest of the run is plain DeRaDiff on it. inf / 0 (the defaults): N particles over the whole run.
    Bias: the weights outside [select_below, split_at] are dropped.
    ``weight_rule``: "trapezoid" (|ΔD|² linear in s between two model calls; the default) or "start" (|ΔD|²
    frozen at the start of each step: the discrete Gaussian chains' own normaliser), see
    benchmarks/aw_particles_weight_rules.py and aw_particles_cheap.py.
    ``proposal`` = f (euler_ancestral only): the particles step with the mix at λ_p = 1 + f·(λ − 1) instead of
    λ, and each step is weighted by the exact ratio of the target kernel Z_λ·N(μ_λ, s²) to the proposal's
    N(μ_p, s²) (per-step, like "start"). f < 1 at λ > 1 proposes from a less concentrated mix, which reaches
    the low-reward modes the target puts weight back on. Only at steps with λ > 1: at λ < 1 a proposal nearer the
    aligned model overshoots the target (measured), so there the particles step with the mix, weighted by
    ``weight_rule``. None: propose at λ (today)."""
    particles: int
    seed: int
    resample_below: float = 0.5
    site_dims: int = 0
    window: tuple | None = None
    temper: float = 1.0
    method: str = "systematic"
    split_at: float = math.inf
    select_below: float = 0.0
    weight_rule: str = "trapezoid"
    proposal: float | None = None
    logw: torch.Tensor | None = None
    record: list = field(default_factory=list)  # per weighted step: (σ, mean ESS, min ESS, resampled, increment var)
    passes: float = 0.0  # model evaluations per image over the run (both models on every particle row)
    model_calls: int = 0
    selected_at: float | None = None  # σ of the model call where one particle was drawn (select_below)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(int(self.seed) % (2 ** 63))

    @property
    def resample_threshold(self) -> float:
        """Resample when the ESS falls below this: resample_below·N, but never 1 or less (the ESS is
        at least 1, so such a threshold could never fire: with N = 2 and the default 0.5 a dead
        particle would be carried to the end); then 1 + resample_below. 0 still never resamples."""
        if self.resample_below <= 0:
            return 0.0
        return max(self.resample_below * self.particles, 1.0 + self.resample_below)

    @property
    def cheaper(self) -> bool:
        """The split / select schedule is on (not the neutral inf / 0)."""
        return self.particles > 1 and (self.split_at < math.inf or self.select_below > 0)

    def count_passes(self, models: int, rows: int, images: int):
        """One model call: ``models`` models (2, or 1 at λ = 0 or 1) on ``rows`` latents for ``images`` images."""
        self.passes += models * rows / images
        self.model_calls += 1

    def passes_per_step(self) -> float:
        return self.passes / self.model_calls if self.model_calls else 0.0

    def select(self, batch_shape) -> torch.Tensor:
        """Draw the one particle per image/site that the rest of the run continues (select_below)."""
        choice = self.choose(batch_shape)
        self.logw = None
        return choice

    def in_window(self, sigma: float) -> bool:
        return self.window is None or self.window[0] <= sigma <= self.window[1]

    def update(self, increment: torch.Tensor, sigma: float):
        """Add one step's log Z; returns ancestor indices when it resamples, else None."""
        inc = increment * self.temper
        self.logw = inc if self.logw is None else self.logw + inc
        e = ess(self.logw)
        resample = bool((e < self.resample_threshold).any()) and self.particles > 1
        spread = float(inc.var(0).mean()) if self.particles > 1 else 0.0  # where the weights' variance accrues
        self.record.append((float(sigma), float(e.mean()), float(e.min()), resample, spread))
        if not resample:
            return None
        fn = systematic_resample if self.method == "systematic" else multinomial_resample
        ancestors = fn(self.logw, self.generator)
        self.logw = torch.zeros_like(self.logw)
        return ancestors

    def choose(self, batch_shape) -> torch.Tensor:
        logw = self.logw if self.logw is not None else torch.zeros(self.particles, *batch_shape, dtype=torch.float64)
        return draw_one(logw, self.generator)

    def summary(self) -> dict:
        cost = {"passes_per_step": self.passes_per_step(), "selected_at": self.selected_at}
        if not self.record:
            return {"weighted_steps": 0, "resamples": 0, "min_ess": float(self.particles),
                    "mean_ess": float(self.particles), **cost}
        return {"weighted_steps": len(self.record), "resamples": sum(r[3] for r in self.record),
                "min_ess": min(r[2] for r in self.record),
                "mean_ess": sum(r[1] for r in self.record) / len(self.record), **cost}

    def summary_text(self) -> str:
        s = self.summary()
        if not s["weighted_steps"]:
            return f"{self.particles} particles: weights uniform (λ = 0 or 1, or no noisy step)"
        collapsed = self.collapsed_steps()
        text = (f"{self.particles} particles: ESS min {s['min_ess']:.1f}, mean {s['mean_ess']:.1f} over "
                f"{s['weighted_steps']} steps; resampled {s['resamples']}x")
        if self.proposal is not None:
            text += "; proposed from the aligned model" if self.proposal == 0 else f"; proposal f {self.proposal:g}"
        elif self.weight_rule != "trapezoid":
            text += f"; {self.weight_rule} weight rule"
        if self.split_at < math.inf:
            text += f"; particles from σ {self.split_at:g}"
        if self.selected_at is not None:
            text += f"; one drawn at σ {self.selected_at:.3g}"
        if self.model_calls:
            text += f"; {self.passes_per_step():.1f} model passes per step"
        if collapsed:
            text += (f"; weights COLLAPSED at {collapsed} of {s['weighted_steps']} steps (ESS < "
                     f"{COLLAPSE_ESS:.2f}: one particle held over {math.floor(100 * COLLAPSE_SHARE ** 2)} % of an "
                     "image's weight)")
        return text

    def collapsed_steps(self) -> int:
        """Weighted steps at which one particle carried (nearly) all the weight of some image: ESS below
        COLLAPSE_ESS, the same for every N (such a run has an ESS of about 1 whatever N)."""
        return sum(1 for r in self.record if r[2] < COLLAPSE_ESS)
