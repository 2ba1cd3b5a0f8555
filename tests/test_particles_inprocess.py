"""Particle realignment in a real ComfyUI, in-process, on the alignment world's closed-form models
(benchmarks/aw_comfy.py: Gaussian-mixture denoisers wrapped as real ComfyUI models).

- particles = 1 is plain DeRaDiff bit for bit; the particle loop with one particle replays ComfyUI's
  own euler_ancestral and ddpm steps bit for bit (so the weights describe the kernel that really runs);
- the kernel factor (c/s)² matches ComfyUI's ddpm step, probed numerically;
- single-Gaussian world: alignment only shifts the mean, so log Z_t is the same for every particle
  (the exact value is checked): normalised weights stay uniform, ESS = N, no resampling;
- hard world: particles move E[r] toward the exact value;
- refusals name node and input; the Guider node runs particles through SamplerCustomAdvanced's
  call and equals the KSampler node."""
from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

LAM = 0.5


@pytest.fixture(scope="module")
def hard(ac, pack):
    return ac.hard_pair(pack)


def node_sample(pack, ac, pair, latent, sampler, steps=6, seed=3, lam=LAM, **extra):
    cond = ac.conditioning()
    return pack.nodes.DeRaDiffKSampler.execute(pair, seed, steps, 1.0, sampler, "karras", cond, cond, latent, 1.0,
                                               **{"lambda": lam}, **extra)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddpm", "dpmpp_2m"])
def test_particles_1_is_plain_deradiff_bit_for_bit(pack, ac, hard, sampler):
    latent = ac.empty_latent(64, batch=2)
    plain = node_sample(pack, ac, hard[2], latent, sampler).result[0]["samples"]
    one = node_sample(pack, ac, hard[2], latent, sampler, particles=1, resample_ess=0.9)
    assert "deradiff_particles" not in one.ui
    assert torch.equal(plain, one.result[0]["samples"])


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddpm"])
def test_particle_loop_with_one_particle_replays_comfyuis_step(pack, ac, hard, sampler):
    from comfyui_deradiff.sampler.particle_sampler import particle_ksampler
    latent = ac.empty_latent(64, batch=2)
    plain = node_sample(pack, ac, hard[2], latent, sampler).result[0]["samples"]
    cond = ac.conditioning()
    out, state = particle_ksampler(hard[2], LAM, 3, 6, 1.0, sampler, "karras", cond, cond, latent, 1.0, particles=1)
    assert state.summary()["weighted_steps"] == 5  # every step but the noiseless last one is weighted
    assert torch.equal(plain, out["samples"])


def test_ddpm_gain_matches_comfyuis_step():
    from comfy.k_diffusion import sampling as kds
    from comfyui_deradiff.sampler.particles import ddpm_gain, euler_ancestral_gain
    sigma, sigma_next = torch.tensor(1.7, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)

    def step(x, d, noise):  # generic_step_sampler's ddpm step in σ space
        out = kds.DDPMSampler_step(x / torch.sqrt(1 + sigma ** 2), sigma, sigma_next, (x - d) / sigma, lambda *a: noise)
        return out * torch.sqrt(1 + sigma_next ** 2)

    x, zero, one = torch.tensor([0.3], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    c = float(step(x, one, zero) - step(x, zero, zero))
    s = float(step(x, zero, one) - step(x, zero, zero))
    assert ddpm_gain(float(sigma), float(sigma_next)) == pytest.approx((c / s) ** 2, rel=1e-10)
    sd, su = kds.get_ancestral_step(sigma, sigma_next, eta=1.0)
    assert euler_ancestral_gain(1.7, 0.9) == pytest.approx(float(((1 - sd / sigma) / su) ** 2), rel=1e-10)


def _recorded(state):
    increments = []
    update = state.update

    def spy(inc, sigma):
        increments.append((inc.clone(), sigma))
        return update(inc, sigma)
    state.update = spy
    return increments


def test_single_gaussian_world_weights_stay_uniform(pack, ac, monkeypatch):
    """Reference N(m, s²I), aligned p_β = N(m + s²w/β, s²I): D_al − D_ref = s²w/β · σ²/(s²+σ²) at every x,
    so every interval's log-weight −λ(1−λ)/2·(c0·|ΔD(σ)|² + c1·|ΔD(σ')|²) (trapezoid rule) is one number for
    all particles (not 0): uniform normalised weights. The hard world (a mixture) is the control where they are not."""
    import aw_world as aw
    from comfyui_deradiff.sampler import particle_sampler, particles
    seen = []
    real_state = particles.ParticleState

    def recording_state(*a, **k):
        st = real_state(*a, **k)
        seen.append((st, _recorded(st)))
        return st
    monkeypatch.setattr(particle_sampler, "ParticleState", recording_state)
    s2, w = 0.09, torch.tensor([1.0, 0.5], dtype=aw.F64)
    ref = aw.gaussian([0.5, -0.3], s2)
    pair = ac.make_pair(pack, ac.world_model(ref.denoise), ac.world_model(ref.tilt(w, 1.0).denoise), 1.0)
    latent = ac.empty_latent(16)
    out = node_sample(pack, ac, pair, latent, "euler_ancestral", steps=8, particles=4)
    state, incs = seen[-1]
    assert len(incs) == 7  # one per interval between the 8 model calls

    def sq(sigma):  # |ΔD|² over the 16 points: |s²w|² · (σ²/(s²+σ²))² each (the filler channels agree)
        return s2 ** 2 * float(w @ w) * (sigma ** 2 / (s2 + sigma ** 2)) ** 2 * 16
    full = _karras8()
    for k, (inc, sigma) in enumerate(incs):  # the interval full[k] -> full[k+1], weighted at its end
        assert sigma == pytest.approx(full[k + 1])
        c0, c1 = particles.trapezoid_weights(full[k], full[k + 1])
        expected = -LAM * (1 - LAM) / 2 * (c0 * sq(full[k]) + c1 * sq(full[k + 1]))
        assert inc.shape == (4, 1)
        assert float(inc.std()) < 1e-4 * abs(float(inc.mean()))  # float32 model outputs
        assert float(inc.mean()) == pytest.approx(expected, rel=1e-4)
    assert state.summary()["resamples"] == 0 and state.summary()["min_ess"] == pytest.approx(4.0, abs=1e-6)
    assert "ESS min 4.0" in out.ui["deradiff_particles"][0] and "COLLAPSED" not in out.ui["deradiff_particles"][0]
    # the control: separated modes give unequal weights
    _, _, pair_hard = _hard(ac, pack)
    node_sample(pack, ac, pair_hard, latent, "euler_ancestral", steps=8, particles=4)
    assert seen[-1][0].summary()["min_ess"] < 3.5


def _hard(ac, pack):
    return ac.hard_pair(pack)


_SIGMAS = {}


def _karras8():
    if "karras8" not in _SIGMAS:
        import comfy.samplers
        import aw_comfy
        m = aw_comfy.world_model(lambda x, s: x)
        _SIGMAS["karras8"] = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "karras", 8).tolist()
    return _SIGMAS["karras8"]


def test_hard_world_particles_move_the_expected_reward_toward_exact(pack, ac):
    import aw_particles as ap
    cfg = replace(ap.Config(), points=8192, steps=50, lambdas=(LAM,), particles=(8,), worlds=("hard",),
                  reward_steering=False)
    row = ap.measure(pack, "hard", LAM, cfg, log=lambda *a: None)
    plain, part = abs(row["plain"]["err"]), abs(row["p8"]["err"])
    assert plain > 0.2, row  # the per-step mix is far off here
    # measured: plain −0.43, N = 8 +0.04 (from scratch +0.02); forgetting the weights leaves −0.43
    assert part < 0.35 * plain, row
    assert row["p8"]["tv"] < 0.5 * row["plain"]["tv"], row


def test_refusals_name_node_and_input(pack, ac, hard):
    latent = ac.empty_latent(16)
    with pytest.raises(ValueError, match="DeRaDiff KSampler: input 'sampler_name'.*stochastic"):
        node_sample(pack, ac, hard[2], latent, "euler", particles=2)
    with pytest.raises(ValueError, match="DeRaDiff KSampler: input 'particles'.*full_pass_every"):
        node_sample(pack, ac, hard[2], latent, "euler_ancestral", particles=2, full_pass_every=2)
    with pytest.raises(ValueError, match="DeRaDiff KSampler: input 'resample_ess'"):
        node_sample(pack, ac, hard[2], latent, "euler_ancestral", particles=2, resample_ess=1.5)
    import comfy.samplers
    cond = ac.conditioning()
    guider = pack.nodes.DeRaDiffGuiderNode.execute(hard[2], cond, cond, 1.0, **{"lambda": LAM},
                                                        particles=2).result[0]
    sigmas = comfy.samplers.calculate_sigmas(hard[2].reference.get_model_object("model_sampling"), "karras", 4)
    with pytest.raises(ValueError, match="DeRaDiff Guider: input 'particles'.*'euler'"):
        guider.sample(torch.randn(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), comfy.samplers.sampler_object("euler"),
                      sigmas, seed=1)
    # SamplerEulerAncestral with less than the full noise: the weights would target the wrong model
    for options in ({"eta": 0.5}, {"s_noise": 1.2}):
        sampler = comfy.samplers.ksampler("euler_ancestral", options)
        with pytest.raises(ValueError, match="DeRaDiff Guider: input 'particles'.*eta = 1, s_noise = 1"):
            guider.sample(torch.randn(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), sampler, sigmas, seed=1)


def test_guider_node_through_a_custom_sampler_equals_the_ksampler_node(pack, ac, hard):
    import comfy.sample
    import comfy.samplers
    cond = ac.conditioning()
    latent = ac.empty_latent(64, batch=2)
    ks = node_sample(pack, ac, hard[2], latent, "euler_ancestral", steps=6, seed=5, particles=3)
    assert ks.result[0]["samples"].shape == latent["samples"].shape
    guider = pack.nodes.DeRaDiffGuiderNode.execute(hard[2], cond, cond, 1.0, **{"lambda": LAM},
                                                        particles=3).result[0]
    sigmas = comfy.samplers.calculate_sigmas(hard[2].reference.get_model_object("model_sampling"), "karras", 6)
    noise = comfy.sample.prepare_noise(latent["samples"], 5)
    out = guider.sample(noise, latent["samples"], comfy.samplers.sampler_object("euler_ancestral"), sigmas, seed=5)
    assert torch.equal(out, ks.result[0]["samples"])
    assert guider.state.summary()["weighted_steps"] == 5
    # the GUIDER is cached and reused by ComfyUI: a second run leaves no trace of the first
    assert guider.prediction_observer is None
    again = guider.sample(noise, latent["samples"], comfy.samplers.sampler_object("euler_ancestral"), sigmas, seed=5)
    assert torch.equal(again, out)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddpm"])
def test_sampler_custom_advanced_denoised_output_is_the_returned_particles(pack, ac, hard, sampler):
    """SamplerCustomAdvanced's denoised_output is the x0 its callback saw last: it must be the x0 of the
    particle the run returns, not particle 0's (issue 20: off by up to 20.9). Both kernels' last step
    (to σ = 0) lands on that x0, so the two outputs are the same latent."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import RandomNoise, SamplerCustomAdvanced
    cond = ac.conditioning()
    latent = ac.empty_latent(64, batch=2)
    sigmas = comfy.samplers.calculate_sigmas(hard[2].reference.get_model_object("model_sampling"), "karras", 6)
    for seed in (1, 2, 3):
        guider = pack.nodes.DeRaDiffGuiderNode.execute(hard[2], cond, cond, 1.0, **{"lambda": LAM},
                                                            particles=4).result[0]
        noise = RandomNoise.execute(seed)[0]
        out, denoised = SamplerCustomAdvanced.execute(noise, guider, comfy.samplers.sampler_object(sampler),
                                                      sigmas, latent)[:2]
        torch.testing.assert_close(denoised["samples"], out["samples"], rtol=1e-5, atol=1e-5)


def test_two_particles_at_the_default_resample_ess_replace_a_dead_one(pack, ac, hard, monkeypatch):
    """Issue 20: with 2 particles the ESS never drops below 1 = 0.5·2, so at the default resample_ess a
    particle that had lost its weight was computed to the end. Now (threshold max(0.5·N, 1.5)) every weighted
    step with ESS < 1.5 resamples, and the node's ESS line names the steps where the weights collapsed."""
    from comfyui_deradiff.sampler import particle_sampler, particles
    states = []
    real = particles.ParticleState

    def recording_state(*a, **k):
        states.append(real(*a, **k))
        return states[-1]
    monkeypatch.setattr(particle_sampler, "ParticleState", recording_state)
    latent = ac.empty_latent(64)
    collapsed_runs = 0
    for seed in (1, 2, 3):
        out = node_sample(pack, ac, hard[2], latent, "euler_ancestral", seed=seed, particles=2)  # resample_ess: default
        record = states[-1].record
        assert any(r[2] < 1.5 for r in record), record  # the hard world's weights do drop here
        assert all(r[3] == (r[2] < 1.5) for r in record), record  # resampled exactly where ESS < 1.5
        text, k = out.ui["deradiff_particles"][0], sum(r[2] < particles.COLLAPSE_ESS for r in record)
        if k:
            assert f"weights COLLAPSED at {k} of {len(record)} steps" in text, text
        else:
            assert "COLLAPSED" not in text, text
        collapsed_runs += k > 0
    assert collapsed_runs > 0  # the line was seen saying it


def test_lambda_search_counts_collapsed_runs_by_the_same_rule(pack):
    """λ Search's ESS line counts a run as collapsed by DeRaDiff KSampler's rule (ESS < 1.11, one particle
    held over 90 %), not ESS < 1.5 (a 3:1 split of two particles is not a collapse)."""
    from comfyui_deradiff.nodes.search_nodes import particle_summary
    runs = {0.5: [{"weighted_steps": 5, "min_ess": 1.45, "mean_ess": 1.8},
                  {"weighted_steps": 5, "min_ess": 1.02, "mean_ess": 1.5}],
            1.0: [{"weighted_steps": 0, "min_ess": 2.0, "mean_ess": 2.0}]}
    text = particle_summary(2, runs)
    assert "over 2 runs" in text and "weights COLLAPSED in 1 of them" in text, text
    assert "COLLAPSED" not in particle_summary(2, {0.5: runs[0.5][:1]})
