"""The mixing math on its own (no ComfyUI import): loaded straight from its file."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "deradiff_mixing", Path(__file__).resolve().parent.parent / "sampler" / "mixing.py")
mixing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mixing)


def _numeric_product(mu_r, var_r, mu_a, var_a, lam):
    """Mean/variance of p_ref^(1-lam) p_al^lam by quadrature on a 1-D grid."""
    x = torch.linspace(-40, 40, 400001, dtype=torch.float64)
    logp = (1 - lam) * (-(x - mu_r) ** 2 / (2 * var_r)) + lam * (-(x - mu_a) ** 2 / (2 * var_a))
    w = torch.exp(logp - logp.max())
    w = w / w.sum()
    mean = (w * x).sum()
    return float(mean), float((w * (x - mean) ** 2).sum())


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 1.7])
def test_general_form_matches_the_normalised_product_of_densities(lam):
    mu_r, var_r, mu_a, var_a = -1.0, 2.0, 3.0, 1.0  # aligned narrower, so lam > 1 stays proper
    mean, var = mixing.geometric_mixture(torch.tensor([mu_r], dtype=torch.float64), var_r,
                                         torch.tensor([mu_a], dtype=torch.float64), var_a, lam)
    num_mean, num_var = _numeric_product(mu_r, var_r, mu_a, var_a, lam)
    assert float(mean) == pytest.approx(num_mean, abs=1e-6)
    assert float(var) == pytest.approx(num_var, rel=1e-5)


def test_per_element_variances():
    g = torch.Generator().manual_seed(0)
    mu_r, mu_a = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    var_r = torch.rand(2, 3, 4, generator=g, dtype=torch.float64) + 0.5
    var_a = torch.rand(2, 3, 4, generator=g, dtype=torch.float64) + 0.5
    mean, var = mixing.geometric_mixture(mu_r, var_r, mu_a, var_a, 0.4)
    for idx in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        m, v = _numeric_product(float(mu_r[idx]), float(var_r[idx]), float(mu_a[idx]), float(var_a[idx]), 0.4)
        assert float(mean[idx]) == pytest.approx(m, abs=1e-6)
        assert float(var[idx]) == pytest.approx(v, rel=1e-5)


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0, 1.5, 3.0])
def test_equal_variances_reduce_to_the_linear_mix(lam):
    g = torch.Generator().manual_seed(1)
    mu_r, mu_a = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    var = torch.rand(4, 8, generator=g, dtype=torch.float64) + 0.1
    mean, mixed_var = mixing.geometric_mixture(mu_r, var, mu_a, var, lam)
    torch.testing.assert_close(mean, mixing.mix_equal_variance(mu_r, mu_a, lam), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixed_var, var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_mixing_posteriors_equals_posterior_of_mixed_denoised(lam):
    """Why the hot path may mix x0 predictions: the posterior mean is affine in x0
    with coefficients that depend on the sigmas only, and the variances are equal."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * 5
    d_ref, d_al = torch.randn_like(x), torch.randn_like(x)
    sigma, sigma_next = 5.0, 2.5
    m_r, v_r = mixing.ve_posterior(x, d_ref, sigma, sigma_next)
    m_a, v_a = mixing.ve_posterior(x, d_al, sigma, sigma_next)
    mean, var = mixing.geometric_mixture(m_r, v_r, m_a, v_a, lam)
    m_mix, v_mix = mixing.ve_posterior(x, mixing.mix_equal_variance(d_ref, d_al, lam), sigma, sigma_next)
    torch.testing.assert_close(mean, m_mix, rtol=1e-10, atol=1e-10)
    assert float(var.flatten()[0]) == pytest.approx(v_mix)


def test_lambda_above_one_with_wider_aligned_kernel_is_an_error_not_nan():
    mu = torch.zeros(10)
    var_r, var_a = torch.ones(10), torch.full((10,), 4.0)
    limit = mixing.max_stable_lambda(var_r, var_a)
    assert limit == pytest.approx(4.0 / 3.0)
    mean, var = mixing.geometric_mixture(mu, var_r, mu + 1, var_a, limit * 0.99)
    assert torch.isfinite(mean).all() and (var > 0).all()
    with pytest.raises(mixing.NonPositivePrecisionError, match="lambda=2"):
        mixing.geometric_mixture(mu, var_r, mu + 1, var_a, 2.0)
    mean, var = mixing.geometric_mixture(mu, var_r, mu + 1, var_a, 2.0, nonpositive="clamp")
    assert torch.isfinite(mean).all() and torch.isfinite(var).all() and (var > 0).all()
    assert float(var.max()) <= 4.0


def test_invalid_lambda_and_variance():
    with pytest.raises(ValueError, match="lambda"):
        mixing.geometric_mixture(torch.zeros(1), 1.0, torch.zeros(1), 1.0, -0.1)
    with pytest.raises(ValueError, match="lambda"):
        mixing.check_lambda(math.nan)
    with pytest.raises(ValueError, match="variances"):
        mixing.geometric_mixture(torch.zeros(1), 0.0, torch.zeros(1), 1.0, 0.5)


def test_mix_per_sample_applies_each_lambda_to_its_batch_element():
    a, b = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    out = mixing.mix_per_sample(a, b, torch.tensor([0.0, 0.5, 2.0]))
    assert out[:, 0, 0].tolist() == [0.0, 0.5, 2.0]


def test_emulated_beta():
    assert mixing.emulated_beta(5000.0, 2.0) == 2500.0
    assert mixing.emulated_beta(5000.0, 0.0) == math.inf
