"""Difference reuse, pure math (sampler/difference_reuse.py imports nothing from ComfyUI)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "difference_reuse", Path(__file__).resolve().parent.parent / "sampler" / "difference_reuse.py")
dr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dr)

SIGMAS = torch.tensor([14.6, 7.0, 3.5, 1.7, 0.8, 0.3, 0.0])  # 6 steps


@pytest.mark.parametrize("every,full", [(1, [0, 1, 2, 3, 4, 5]), (2, [0, 2, 4]), (3, [0, 3]),
                                        (4, [0, 4]), (8, [0])])
def test_plan_runs_both_models_on_every_kth_step(every, full):
    assert dr.StepPlan(every, SIGMAS).full_steps() == full


def test_plan_final_full_steps_and_off_schedule_sigmas():
    assert dr.StepPlan(2, SIGMAS, final_full=1).full_steps() == [0, 2, 4, 5]
    assert dr.StepPlan(3, SIGMAS, final_full=2).full_steps() == [0, 3, 4, 5]
    plan = dr.StepPlan(2, SIGMAS)
    assert not plan.is_full(torch.tensor([7.0, 7.0]))  # a batch of sigmas: step 1
    assert plan.is_full(torch.tensor(5.0))  # inner evaluation of a multi-step sampler
    assert plan.is_full(7.0 * (1 + 1e-4)) and not plan.is_full(7.0 * (1 + 1e-8))
    assert dr.StepPlan(2, None).is_full(7.0)  # no schedule known: always both


@pytest.mark.parametrize("lam,side", [(0.0, "reference"), (0.3, "reference"), (0.5, "reference"),
                                      (0.51, "aligned"), (1.0, "aligned"), (1.5, "aligned"), (3.0, "aligned")])
def test_the_model_whose_stale_term_is_smaller_runs(lam, side):
    assert dr.cheaper_side(lam) == side
    assert dr.cheaper_side(torch.tensor([lam, lam])) == side


def test_per_sample_lambda_side_minimises_the_largest_stale_weight():
    assert dr.cheaper_side(torch.tensor([0.2, 0.4])) == "reference"
    assert dr.cheaper_side(torch.tensor([0.2, 2.0])) == "aligned"  # max |λ| 2 vs max |1-λ| 1


@pytest.mark.parametrize("lam", [0.25, 0.5, 0.75, 1.5, 3.0])
def test_completion_is_exact_when_the_difference_is_not_stale(lam):
    g = torch.Generator().manual_seed(0)
    d_ref, d_al = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    exact = torch.lerp(d_ref, d_al, lam)
    memory = dr.DifferenceMemory()
    memory.remember([d_ref], [d_al])
    side = dr.cheaper_side(lam)
    one = d_ref if side == "reference" else d_al
    torch.testing.assert_close(memory.complete([one], side, lam)[0], exact, rtol=1e-5, atol=1e-5)


def test_completion_error_is_the_stale_change_times_the_smaller_weight():
    d_ref, d_al = torch.zeros(1, 4), torch.ones(1, 4)
    memory = dr.DifferenceMemory()
    memory.remember([d_ref], [d_al])  # Δ = 1
    new_ref, new_al = torch.zeros(1, 4), torch.full((1, 4), 3.0)  # Δ is now 3
    for lam, one, side in [(0.25, new_ref, "reference"), (0.75, new_al, "aligned"), (2.0, new_al, "aligned")]:
        err = memory.complete([one], side, lam)[0] - torch.lerp(new_ref, new_al, lam)
        # reference: λ·(Δ_stale − Δ_now); aligned: (1 − λ)·(Δ_now − Δ_stale)
        expected = -2.0 * lam if side == "reference" else 2.0 * (1 - lam)
        torch.testing.assert_close(err, torch.full((1, 4), expected))


def test_per_sample_lambda_completion():
    d_ref, d_al = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    lams = torch.tensor([0.1, 0.3, 0.5])
    memory = dr.DifferenceMemory()
    memory.remember([d_ref], [d_al])
    got = memory.complete([d_ref], "reference", lams)[0]
    torch.testing.assert_close(got, torch.lerp(d_ref, d_al, lams.reshape(-1, 1, 1)))


@pytest.mark.parametrize("flow", [False, True])
def test_prior_weight_is_how_two_gaussian_models_difference_shrinks(flow):
    """Two Gaussian data models N(μ₁, s²), N(μ₂, s²): the exact difference of their denoised
    predictions at the same x changes between noise levels by prior_weight's ratio."""
    s, mu1, mu2 = 0.8, 0.3, -1.1
    x = torch.tensor(0.7, dtype=torch.float64)

    def denoised(mu, sigma):
        a = (1 - sigma) if flow else 1.0  # x = a·x0 + σ·ε
        return mu + a * s * s / (a * a * s * s + sigma * sigma) * (x - a * mu)

    for hi, lo in [(0.9, 0.4), (0.6, 0.05)] if flow else [(14.6, 3.0), (2.0, 0.1)]:
        ratio = (denoised(mu2, lo) - denoised(mu1, lo)) / (denoised(mu2, hi) - denoised(mu1, hi))
        expected = dr.prior_weight(lo, s, flow) / dr.prior_weight(hi, s, flow)
        assert float(ratio) == pytest.approx(expected, rel=1e-9)


def test_memory_carries_the_stale_difference_with_its_rescale():
    memory = dr.DifferenceMemory(rescale=lambda s: s * s / (s * s + 1))
    memory.remember([torch.zeros(1, 2)], [torch.ones(1, 2)], sigma=torch.tensor([3.0]))
    f = (1 / 2) / (9 / 10)  # c(1) / c(3)
    torch.testing.assert_close(memory.complete([torch.zeros(1, 2)], "reference", 0.5, sigma=1.0)[0],
                               torch.full((1, 2), 0.5 * f))
    assert memory.factor(None) == 1.0 and dr.DifferenceMemory().factor(1.0) == 1.0


def test_memory_is_ready_only_for_matching_shapes_and_slots():
    memory = dr.DifferenceMemory()
    assert not memory.ready((1, 4), [True])
    memory.remember([torch.zeros(1, 4), torch.zeros(1, 4)], [torch.ones(1, 4), torch.ones(1, 4)])
    assert memory.ready((1, 4), [True, True])
    assert not memory.ready((2, 4), [True, True])
    assert not memory.ready((1, 4), [True])
    memory.remember([torch.zeros(1, 4), None], [torch.ones(1, 4), None])
    assert memory.ready((1, 4), [True, False]) and not memory.ready((1, 4), [True, True])
    memory.forget()
    assert not memory.ready((1, 4), [True, True])
