"""The alignment world's closed-form math: no ComfyUI import (usable and testable on its own).

Data: a mixture of isotropic Gaussians in the plane, sum_k pi_k N(m_k, s_k^2 I).
Reward: linear, r(x) = w.x.  The KL-regularised optimum at strength beta,

    p_beta(x)  proportional to  p_ref(x) * exp(r(x) / beta),

is again such a mixture: component k moves to N(m_k + s_k^2 w / beta, s_k^2 I) and its weight
becomes proportional to pi_k * exp(w.m_k / beta + s_k^2 |w|^2 / (2 beta^2)).  Noising with
N(0, sigma^2 I) keeps it a mixture (variances s_k^2 + sigma^2), so the ideal denoiser
E[x0 | x_sigma = x] is the posterior-weighted mean of the per-component Gaussian posteriors.
Everything here is float64.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

F64 = torch.float64


@dataclass(frozen=True)
class Mixture:
    """sum_k exp(log_w[k]) N(means[k], s2[k] I) in ``means.shape[1]`` dimensions."""
    means: torch.Tensor  # [K, D]
    s2: torch.Tensor  # [K]
    log_w: torch.Tensor  # [K], normalised: logsumexp == 0

    @staticmethod
    def make(means, s2, weights=None) -> "Mixture":
        means = torch.as_tensor(means, dtype=F64).reshape(len(means), -1)
        s2 = torch.as_tensor(s2, dtype=F64).reshape(-1).expand(means.shape[0]).clone()
        weights = torch.ones(means.shape[0], dtype=F64) if weights is None else torch.as_tensor(weights, dtype=F64)
        if bool((s2 <= 0).any()) or bool((weights <= 0).any()):
            raise ValueError("variances and weights must be > 0")
        log_w = weights.log()
        return Mixture(means, s2, log_w - torch.logsumexp(log_w, 0))

    @property
    def k(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def weights(self) -> torch.Tensor:
        return self.log_w.exp()

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    # -- the KL-regularised optimum ------------------------------------------------
    def tilt(self, w, beta: float) -> "Mixture":
        """p_beta proportional to p * exp(w.x / beta) in closed form (beta = inf: unchanged)."""
        if math.isinf(beta):
            return self
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        w = torch.as_tensor(w, dtype=F64)
        log_w = self.log_w + self.means @ w / beta + self.s2 * float(w @ w) / (2.0 * beta ** 2)
        return Mixture(self.means + self.s2[:, None] * w / beta, self.s2.clone(),
                       log_w - torch.logsumexp(log_w, 0))

    def expected_reward(self, w) -> float:
        return float(self.weights @ (self.means @ torch.as_tensor(w, dtype=F64)))

    # -- sampling and densities ----------------------------------------------------
    def sample(self, n: int, generator: torch.Generator, labels: bool = False):
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=F64)
        x = self.means[idx] + self.s2[idx].sqrt()[:, None] * eps
        return (x, idx) if labels else x

    def _component_log_prob(self, x, sigma):
        """log pi_k + log N(x; m_k, (s_k^2 + sigma^2) I), shape [n, K]; sigma scalar or [n]."""
        x = torch.as_tensor(x, dtype=F64)
        sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1)
        var = self.s2[None, :] + sigma ** 2  # [n or 1, K]
        d2 = ((x * x).sum(1, keepdim=True) - 2.0 * x @ self.means.T
              + (self.means * self.means).sum(1)[None, :]).clamp_min(0.0)  # [n, K]
        return self.log_w[None, :] - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def log_prob(self, x, sigma=0.0) -> torch.Tensor:
        """Log density of the mixture convolved with N(0, sigma^2 I)."""
        return torch.logsumexp(self._component_log_prob(x, sigma), dim=1)

    def responsibilities(self, x, sigma=0.0) -> torch.Tensor:
        return torch.softmax(self._component_log_prob(x, sigma), dim=1)

    def denoise(self, x, sigma) -> torch.Tensor:
        """The ideal denoiser E[x0 | x0 + sigma * eps = x] (sigma scalar or one per point):
        sum_k gamma_k(x) * (m_k + s_k^2 / (s_k^2 + sigma^2) * (x - m_k))."""
        x = torch.as_tensor(x, dtype=F64)
        sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1)
        gamma = self.responsibilities(x, sigma)  # [n, K]
        shrunk = gamma * (self.s2[None, :] / (self.s2[None, :] + sigma ** 2))  # gamma_k * shrink_k
        return x * shrunk.sum(1, keepdim=True) + (gamma - shrunk) @ self.means

    def assign(self, x) -> torch.Tensor:
        """Index of the component each point most likely came from."""
        return self.responsibilities(x).argmax(1)


def ring(k: int = 8, radius: float = 1.3, s=(0.15, 0.2), weights=None, phase: float = math.pi / 8) -> Mixture:
    """k modes on a circle; the mode std cycles through ``s``."""
    angles = phase + 2 * math.pi * torch.arange(k, dtype=F64) / k
    means = radius * torch.stack([angles.cos(), angles.sin()], 1)
    s2 = torch.tensor([s[i % len(s)] ** 2 for i in range(k)], dtype=F64)
    return Mixture.make(means, s2, weights)


def gaussian(mean, s2: float) -> Mixture:
    return Mixture.make([list(mean)], [s2])


# -- distances -----------------------------------------------------------------------
def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_dir: int = 90) -> float:
    """Sliced 2-Wasserstein distance of two equal-size 2-D point sets, on n_dir evenly spaced
    directions (deterministic)."""
    if a.shape != b.shape or a.shape[1] != 2:
        raise ValueError("two [n, 2] point sets of equal size")
    angles = math.pi * torch.arange(n_dir, dtype=F64) / n_dir
    dirs = torch.stack([angles.cos(), angles.sin()], 0)  # [2, n_dir]
    pa = (a.to(F64) @ dirs).sort(0).values
    pb = (b.to(F64) @ dirs).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mode_weights(x: torch.Tensor, world: Mixture) -> torch.Tensor:
    """Fraction of the points assigned to each of world's components."""
    return torch.bincount(world.assign(x), minlength=world.k).to(F64) / x.shape[0]


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return float(0.5 * (p - q).abs().sum())


# -- a small trained denoiser ----------------------------------------------------------
class MLPDenoiser(torch.nn.Module):
    """D(x, sigma) for 2-D points with EDM preconditioning: D = c_skip x + c_out F(c_in x, log sigma)."""

    def __init__(self, hidden: int = 128, depth: int = 3, sigma_data: float = 1.0):
        super().__init__()
        self.sigma_data = float(sigma_data)
        layers, width = [], 2 + 3
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        layers.append(torch.nn.Linear(width, 2))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x = x.float()
        sigma = torch.as_tensor(sigma).float().reshape(-1, 1).expand(x.shape[0], 1)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1.0 / (sigma ** 2 + sd2).sqrt()
        t = sigma.log() / 4
        feats = torch.cat([c_in * x, t, (3 * t).sin(), (3 * t).cos()], 1)
        return c_skip * x + c_out * self.net(feats)


def train_denoiser(model: MLPDenoiser, data: Mixture, steps: int, generator: torch.Generator,
                   batch: int = 1024, lr: float = 2e-3, sigma_range=(0.01, 20.0)) -> list[float]:
    """Denoising score matching on fresh samples of ``data`` (EDM loss weighting); sigma
    log-uniform over sigma_range. Returns the loss curve (one value per 50 steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr * 0.05)
    lo, hi = math.log(sigma_range[0]), math.log(sigma_range[1])
    sd = model.sigma_data
    curve, running = [], 0.0
    for step in range(steps):
        x0 = data.sample(batch, generator).float()
        sigma = (lo + (hi - lo) * torch.rand(batch, 1, generator=generator)).exp()
        noisy = x0 + sigma * torch.randn(batch, 2, generator=generator)
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        loss = (weight * (model(noisy, sigma) - x0) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += loss.detach().item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            curve.append(running / ((step % 50) + 1))
            running = 0.0
    return curve


def interpolate_weights(a: torch.nn.Module, b: torch.nn.Module, lam: float) -> torch.nn.Module:
    """Parameter-space interpolation (1-lam)*a + lam*b (lam > 1 extrapolates)."""
    out = copy.deepcopy(a)
    sb = b.state_dict()
    out.load_state_dict({k: torch.lerp(v, sb[k], lam) if v.is_floating_point() else v
                         for k, v in a.state_dict().items()})
    return out


def particle_math():
    """The pack's particle math (sampler/particles.py: pure torch, no ComfyUI import), loaded by file path
    so the pure-torch benchmarks run it without ComfyUI; loaded once per process."""
    name = "deradiff_particles_math"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "sampler" / "particles.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
