"""Geometric mixture of two Gaussian reverse kernels (DeRaDiff).

Pure torch; imports nothing from ComfyUI so it can be tested on its own.

For one denoising step the reference and the aligned model each define a Gaussian
posterior N(mu, var). DeRaDiff samples from p_ref^(1-lam) * p_aligned^lam, which is
again Gaussian with

    precision = (1-lam)/var_ref + lam/var_aligned
    mean      = ((1-lam)*mu_ref/var_ref + lam*mu_aligned/var_aligned) / precision

When both models share the noise schedule the variances are equal and this
reduces to mean = lerp(mu_ref, mu_aligned, lam). Because every sampler's posterior
mean is the same affine function of the denoised (x0) prediction for both models,
the mix can then be applied to the denoised prediction itself, which is what lets
every ComfyUI sampler use it unchanged.
"""
from __future__ import annotations

import math

import torch


class NonPositivePrecisionError(ValueError):
    """lam > 1 with unequal variances made the mixed precision <= 0 somewhere."""


def check_lambda(lam: float) -> float:
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0.0:
        raise ValueError(f"lambda must be a finite number >= 0, got {lam!r}")
    return lam


def mixed_precision(var_ref, var_aligned, lam: float):
    """Precision (1/variance) of the geometric mixture; may be <= 0 for lam > 1."""
    return (1.0 - lam) / var_ref + lam / var_aligned


def geometric_mixture(mu_ref, var_ref, mu_aligned, var_aligned, lam: float, nonpositive: str = "error"):
    """Mean and variance of N(mu_ref, var_ref)^(1-lam) * N(mu_aligned, var_aligned)^lam.

    Variances may be Python floats or tensors broadcastable to the means
    (per-element variances). Where lam > 1 and var_aligned > var_ref the mixed
    precision can be <= 0, i.e. the product is not a normalisable Gaussian.
    ``nonpositive="error"`` (default) raises NonPositivePrecisionError;
    ``nonpositive="clamp"`` floors the precision at the smaller of the two input
    precisions, so the mixed kernel is never wider than the widest input kernel.
    """
    lam = check_lambda(lam)
    var_ref = torch.as_tensor(var_ref, dtype=mu_ref.dtype, device=mu_ref.device)
    var_aligned = torch.as_tensor(var_aligned, dtype=mu_ref.dtype, device=mu_ref.device)
    if bool((var_ref <= 0).any()) or bool((var_aligned <= 0).any()):
        raise ValueError("variances must be > 0")
    precision = mixed_precision(var_ref, var_aligned, lam)
    bad = precision <= 0
    if bool(bad.any()):
        if nonpositive == "clamp":
            floor = torch.minimum(1.0 / var_ref, 1.0 / var_aligned)
            precision = torch.where(bad, floor, precision)
        else:
            fraction = bad.float().mean().item()
            raise NonPositivePrecisionError(
                f"lambda={lam:g} extrapolates too far: the mixed precision is <= 0 for "
                f"{fraction:.1%} of the elements because the aligned kernel is wider than "
                f"the reference one there. Use a lambda of at most "
                f"{max_stable_lambda(var_ref, var_aligned):.4g}, or nonpositive='clamp'.")
    var = 1.0 / precision
    mean = var * ((1.0 - lam) * mu_ref / var_ref + lam * mu_aligned / var_aligned)
    return mean, var.expand_as(mean) if var.shape != mean.shape else var


def max_stable_lambda(var_ref, var_aligned) -> float:
    """Largest lam for which the mixed precision stays positive everywhere."""
    var_ref = torch.as_tensor(var_ref, dtype=torch.float64)
    var_aligned = torch.as_tensor(var_aligned, dtype=torch.float64)
    p_ref, p_al = 1.0 / var_ref, 1.0 / var_aligned
    # (1-lam)*p_ref + lam*p_al > 0  <=>  lam < p_ref / (p_ref - p_al) where p_ref > p_al
    shrinking = p_ref > p_al
    if not bool(shrinking.any()):
        return math.inf
    limits = p_ref[shrinking] / (p_ref[shrinking] - p_al[shrinking])
    return float(limits.min())


def mix_equal_variance(x_ref: torch.Tensor, x_aligned: torch.Tensor, lam: float) -> torch.Tensor:
    """The equal-variance reduction: (1-lam)*x_ref + lam*x_aligned.

    Valid for posterior means and, with a shared schedule, for eps, v or x0
    predictions. lam > 1 extrapolates past the aligned model.
    """
    return torch.lerp(x_ref, x_aligned, lam)


def mix_per_sample(x_ref: torch.Tensor, x_aligned: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
    """mix_equal_variance with one lam per batch element (leading dimension)."""
    weight = lams.to(x_ref).reshape((-1,) + (1,) * (x_ref.ndim - 1))
    return torch.lerp(x_ref, x_aligned, weight)


def ve_posterior(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float):
    """Gaussian posterior q(x_next | x, x0=denoised) of the variance-exploding
    process x_sigma = x0 + sigma * eps (ComfyUI's k-diffusion parameterisation).

    Its mean is an affine function of ``denoised`` whose coefficients depend on the
    sigmas only, which is why mixing means equals mixing denoised predictions.
    """
    ratio = (sigma_next / sigma) ** 2
    mean = ratio * x + (1.0 - ratio) * denoised
    var = sigma_next ** 2 * (1.0 - ratio)
    return mean, var


def emulated_beta(beta: float, lam: float) -> float:
    """KL strength the realigned model emulates: beta/lam (infinite at lam=0)."""
    if lam == 0:
        return math.inf
    return beta / lam
