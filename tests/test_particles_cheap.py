"""The cheaper particle schedule (ParticleState.split_at / select_below) in a real ComfyUI, in-process, on the
alignment world's closed-form models (benchmarks/aw_comfy.py):

- at its neutral setting (split_at = inf, select_below = 0) it is today's particle mode bit for bit;
- model passes are counted from the rows the two world models really evaluate, and match the state's count
  and the schedule's arithmetic (2 per step outside the particle window, 2N inside);
- one particle that never splits is plain DeRaDiff bit for bit (it starts where plain DeRaDiff starts);
- the schedule returns one latent per image, runs through the Guider path with a denoise mask (falling back
  to the whole schedule), and the pure-torch benchmark runs (--tiny)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

LAM = 0.5
H = 8  # latent side: 64 points per latent


@pytest.fixture(scope="module")
def counted(ac, pack):
    """(pair, counter): the hard world's pair whose two models count the latent rows they evaluate."""
    counter = {"rows": 0}

    def counting(denoise):
        def fn(points, sigma):
            counter["rows"] += points.shape[0] // (H * H)
            return denoise(points, sigma)
        return fn

    return ac.hard_pair(pack, wrap=counting)[2], counter


def run(ac, pair, n, steps=10, batch=2, seed=5, **kw):
    from comfyui_deradiff.sampler.particle_sampler import particle_ksampler
    cond = ac.conditioning()
    out, state = particle_ksampler(pair, LAM, seed, steps, 1.0, "euler_ancestral", "karras", cond, cond,
                                   ac.empty_latent(H * H, batch=batch), 1.0, n, **kw)
    return out["samples"], state


def karras(steps):
    import comfy.samplers
    import aw_comfy
    m = aw_comfy.world_model(lambda x, s: x)
    return comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "karras", steps).tolist()


def test_neutral_setting_is_todays_particle_mode_bit_for_bit(ac, counted):
    pair, counter = counted
    today, state_today = run(ac, pair, 4)
    counter["rows"] = 0
    neutral, state = run(ac, pair, 4, split_at=float("inf"), select_below=0.0)
    assert torch.equal(today, neutral)
    assert state.summary() == state_today.summary()
    above, _ = run(ac, pair, 4, split_at=1e9)  # a split above σ_max: particles from the first call, as today
    assert torch.equal(today, above)
    counter["rows"] //= 2  # two runs of the same shape since the reset
    # both models on all 4 particles at every one of the 10 steps, 2 images
    assert counter["rows"] == 2 * 4 * 2 * 10
    assert state.passes_per_step() == pytest.approx(8.0)


def test_cheaper_schedule_counts_its_passes(ac, counted):
    pair, counter = counted
    steps, n, split, select = 12, 4, 4.0, 0.5
    sigmas = karras(steps)[:-1]
    # the split call runs one particle, calls after it N until (and including) the first call below `select`
    calls = []
    phase = 1
    for s in sigmas:
        calls.append(1 if phase != 2 else n)
        if phase == 1 and s <= split:
            phase = 2
        elif phase == 2 and s < select:
            phase = 3
    expected = 2 * sum(calls) / steps
    assert 2.0 < expected < 2 * n  # the schedule really has all three phases
    counter["rows"] = 0
    out, state = run(ac, pair, n, steps=steps, batch=2, split_at=split, select_below=select)
    assert out.shape[0] == 2  # one latent per image
    assert counter["rows"] / (2 * steps) == pytest.approx(expected)
    assert state.passes_per_step() == pytest.approx(expected)
    assert state.selected_at is not None and state.selected_at < select
    assert "model passes per step" in state.summary_text()


def test_one_particle_that_never_splits_is_plain_deradiff(ac, counted, pack):
    pair, _ = counted
    cond = ac.conditioning()
    latent = ac.empty_latent(H * H, batch=2)
    plain = pack.nodes.DeRaDiffKSampler.execute(pair, 5, 10, 1.0, "euler_ancestral", "karras", cond, cond, latent,
                                                1.0, **{"lambda": LAM}).result[0]["samples"]
    never, state = run(ac, pair, 4, split_at=1e-6)  # below every σ of the schedule
    assert torch.equal(plain, never)
    assert state.passes_per_step() == pytest.approx(2.0) and state.summary()["weighted_steps"] == 0


def test_with_a_denoise_mask_the_particles_run_the_whole_schedule(ac, counted):
    from comfyui_deradiff.sampler.particle_sampler import particle_ksampler
    pair, counter = counted
    cond = ac.conditioning()
    latent = dict(ac.empty_latent(H * H, batch=1))
    mask = torch.zeros(1, 1, H, H)
    mask[..., :, : H // 2] = 1.0
    latent["noise_mask"] = mask
    counter["rows"] = 0
    out, state = particle_ksampler(pair, LAM, 5, 8, 1.0, "euler_ancestral", "karras", cond, cond, latent, 1.0, 4,
                                   split_at=4.0, select_below=0.5)
    assert out["samples"].shape[0] == 1
    assert state.passes_per_step() == pytest.approx(8.0) and counter["rows"] == 2 * 4 * 8


def test_cheap_benchmark_tiny_runs(tmp_path):
    import aw_particles_cheap as apc
    res = apc.main(["--tiny", "--out", str(tmp_path)])
    row = res["rows"][0]
    # counted passes: today's rule 2N per step; the windowed rule fewer
    assert row["today N=8"]["passes_per_step"] == pytest.approx(16.0)
    assert 2.0 <= row["N=8 until σ 1"]["passes_per_step"] < 16.0
    assert (tmp_path / "aw_particles_cheap.md").exists()


def test_start_rule_weights_each_step_by_its_own_gain(ac, counted, monkeypatch):
    """weight_rule="start": the increment of a step is -λ(1-λ)/2·gain(σ, σ')·|ΔD|² at its start (the discrete chains'
    normaliser), checked against the particle state's input; the default trapezoid differs."""
    from comfyui_deradiff.sampler import particles as pm
    pair, _ = counted
    seen = []
    original = pm.ParticleState.update

    def spy(self, inc, sigma):
        seen.append((sigma, inc.clone()))
        return original(self, inc, sigma)

    monkeypatch.setattr(pm.ParticleState, "update", spy)
    start, state = run(ac, pair, 4, steps=6, weight_rule="start")
    sigmas = karras(6)
    assert [s for s, _ in seen] == pytest.approx(sigmas[:5])  # every step with noise, weighted at its start
    gain0 = pm.euler_ancestral_gain(sigmas[0], sigmas[1])
    # at the first call all 4 particles' |ΔD|² is known from their common start: the increment is ≤ 0 at λ = 0.5
    assert bool((seen[0][1] <= 0).all()) and gain0 > 0
    seen.clear()
    trapezoid, _ = run(ac, pair, 4, steps=6)
    assert [s for s, _ in seen] == pytest.approx(sigmas[1:6])  # the trapezoid adds each interval at its end
    assert not torch.equal(start, trapezoid)
    with pytest.raises(ValueError, match="weight rule"):
        run(ac, pair, 4, weight_rule="middle")


def test_proposal_at_lambda_itself_is_the_start_rule(ac, counted):
    """proposal f: step with the mix at λ_p = 1 + f·(λ − 1), weight by the exact kernel ratio. At f = 1 (λ_p = λ)
    the ratio terms vanish and, without resampling (which the two rules time differently), the run is the
    start rule's bit for bit; f = 0.5 at λ = 2 proposes from another mix and changes the result."""
    from comfyui_deradiff.sampler.particle_sampler import particle_ksampler
    pair, _ = counted
    cond = ac.conditioning()
    latent = ac.empty_latent(H * H, batch=2)

    def go(**kw):
        out, state = particle_ksampler(pair, 2.0, 5, 10, 1.0, "euler_ancestral", "karras", cond, cond, latent, 1.0, 4,
                                       resample_below=0.0, **kw)
        return out["samples"], state

    start, s0 = go(weight_rule="start")
    same, s1 = go(proposal=1.0)
    assert torch.equal(start, same)
    assert torch.equal(s0.logw, s1.logw)
    other, s2 = go(proposal=0.5)
    assert not torch.equal(start, other) and s2.summary()["weighted_steps"] == s0.summary()["weighted_steps"]


def ksampler_node(pack, ac, pair, lam=LAM, sampler="euler_ancestral", **inputs):
    cond = ac.conditioning()
    return pack.nodes.DeRaDiffKSampler.execute(pair, 5, 10, 1.0, sampler, "karras", cond, cond,
                                               ac.empty_latent(H * H, batch=2), 1.0, **{"lambda": lam}, **inputs)


def test_node_inputs_reach_the_particle_run(ac, counted, pack):
    """particle_select_sigma and particle_rule on DeRaDiff KSampler give the particle run of those options,
    bit for bit; at their defaults the node is today's particle mode; the ESS line says what ran."""
    pair, _ = counted
    today, _ = run(ac, pair, 4)
    node = ksampler_node(pack, ac, pair, particles=4, particle_rule="trapezoid", particle_select_sigma=0.0)
    assert torch.equal(node.result[0]["samples"], today)
    cheap, state = run(ac, pair, 4, select_below=0.5)
    node = ksampler_node(pack, ac, pair, particles=4, particle_select_sigma=0.5)
    assert torch.equal(node.result[0]["samples"], cheap) and not torch.equal(cheap, today)
    line = node.ui["deradiff_particles"][0]
    assert line == state.summary_text() and "one drawn at σ" in line and "from σ inf" not in line
    assert state.passes_per_step() < 8.0
    proposed, state = run(ac, pair, 4, proposal=0.0)
    node = ksampler_node(pack, ac, pair, particles=4, particle_rule="aligned proposal")
    assert torch.equal(node.result[0]["samples"], proposed) and "proposed from the aligned model" in state.summary_text()
    started, _ = run(ac, pair, 4, weight_rule="start")
    node = ksampler_node(pack, ac, pair, particles=4, particle_rule="start")
    assert torch.equal(node.result[0]["samples"], started)


def test_guider_node_passes_the_particle_options(ac, counted, pack):
    pair, _ = counted
    cond = ac.conditioning()
    guider = pack.nodes.DeRaDiffGuiderNode.execute(pair, cond, cond, 1.0, **{"lambda": 2.0}, particles=4,
                                                   particle_rule="aligned proposal",
                                                   particle_select_sigma=0.3).result[0]
    assert (guider.particles, guider.proposal, guider.select_below) == (4, 0.0, 0.3)
    plain = pack.nodes.DeRaDiffGuiderNode.execute(pair, cond, cond, 1.0, **{"lambda": 2.0}, particles=4).result[0]
    assert (plain.proposal, plain.select_below, plain.weight_rule) == (None, 0.0, "trapezoid")


@pytest.mark.parametrize("inputs, sampler, message", [
    ({"particle_rule": "middle"}, "euler_ancestral", "input 'particle_rule': expected one of"),
    ({"particle_select_sigma": -1.0}, "euler_ancestral", "input 'particle_select_sigma'"),
    ({"particle_select_sigma": float("nan")}, "euler_ancestral", "input 'particle_select_sigma'"),
    ({"particle_rule": "aligned proposal"}, "ddpm", "input 'particle_rule': the aligned proposal is built for"),
])
def test_bad_particle_options_name_node_and_input(ac, counted, pack, inputs, sampler, message):
    pair, _ = counted
    with pytest.raises(ValueError, match="DeRaDiff KSampler: " + message):
        ksampler_node(pack, ac, pair, sampler=sampler, particles=4, **inputs)


def test_aligned_proposal_below_lambda_one_is_todays_rule(ac, counted):
    """particle_rule "aligned proposal" proposes only at steps with λ > 1; at λ = 0.5 the run is today's trapezoid
    rule bit for bit, resampling included (proposing from the aligned model there overshoots the target)."""
    pair, _ = counted
    today, s0 = run(ac, pair, 4)
    proposal, s1 = run(ac, pair, 4, proposal=0.0)
    assert torch.equal(today, proposal) and torch.equal(s0.logw, s1.logw)
    assert s0.summary()["resamples"] == s1.summary()["resamples"]


def test_lambda_schedule_across_one_weights_each_interval_once(ac, counted, monkeypatch):
    """With a λ schedule that crosses 1 and the aligned proposal, steps with λ > 1 propose and weight their own
    interval, the others use the trapezoid rule: no interval is weighted twice (the trapezoid interval after a
    proposal step is skipped) and every weighted call has λ ≠ 0, 1."""
    from comfyui_deradiff.sampler import particles as pm
    from comfyui_deradiff.sampler.particle_sampler import particle_ksampler
    pair, _ = counted
    cond = ac.conditioning()
    steps = 8
    from comfyui_deradiff.sampler.schedules import LambdaSchedule
    lams = LambdaSchedule("custom", values=[0.5, 0.5, 2.0, 2.0, 2.0, 0.5, 0.5, 0.5])  # λ per step
    seen = []
    original = pm.ParticleState.update

    def spy(self, inc, sigma):
        seen.append(float(sigma))
        return original(self, inc, sigma)

    monkeypatch.setattr(pm.ParticleState, "update", spy)
    out, state = particle_ksampler(pair, lams, 5, steps, 1.0, "euler_ancestral", "karras", cond, cond,
                                   ac.empty_latent(H * H, batch=1), 1.0, 4, proposal=0.0)
    sigmas = karras(steps)
    # trapezoid at calls 1 (interval 0→1) and 2 (1→2); proposals at calls 2, 3, 4 weight 2→3, 3→4, 4→5;
    # call 5 (λ 0.5) has no left end after a proposal: skipped; calls 6 and 7 weight 5→6 and 6→7
    assert seen == pytest.approx([sigmas[1], sigmas[2], sigmas[2], sigmas[3], sigmas[4], sigmas[6], sigmas[7]]), (seen, sigmas)
    assert out["samples"].shape[0] == 1


def test_aligned_proposal_with_an_early_draw(ac, counted, pack):
    """particle_rule "aligned proposal" with particle_select_sigma at λ 2: the particles propose from the aligned
    model until the draw, then one particle per image finishes as plain DeRaDiff; resampling before a proposal
    step keeps each particle's own predictions (resample at every step to exercise it)."""
    pair, counter = counted
    counter["rows"] = 0
    node = ksampler_node(pack, ac, pair, lam=2.0, particles=4, particle_rule="aligned proposal",
                         particle_select_sigma=0.5, resample_ess=1.0)
    out = node.result[0]["samples"]
    assert out.shape[0] == 2 and bool(torch.isfinite(out).all())
    line = node.ui["deradiff_particles"][0]
    assert "proposed from the aligned model" in line and "one drawn at σ" in line, line
    sigmas = karras(10)[:-1]
    after = sum(1 for s in sigmas if s < 0.5) - 1  # calls after the one that draws (it still runs 4 particles)
    assert counter["rows"] == 2 * 2 * (4 * (10 - after) + after)


def test_resampling_before_a_proposal_step_keeps_each_particles_predictions(ac, pack, monkeypatch):
    """A λ schedule crossing 1 with the aligned proposal and resampling at every weighted step: the step that
    proposes after a resample must use the resampled particles' own predictions. Models whose predictions are
    read off x (reference 0, aligned x/2 on the two point channels) make that checkable: a proposal step steps
    with the aligned prediction, so its D is x/2 row for row; a plain step at λ 0.5 with x/4."""
    from comfyui_deradiff.sampler import particle_sampler as psm
    from comfyui_deradiff.sampler.schedules import LambdaSchedule
    pair = ac.make_pair(pack, ac.world_model(lambda p, s: torch.zeros_like(p)), ac.world_model(lambda p, s: 0.5 * p),
                        1.0)
    steps = []
    to_d = psm.kds.to_d
    monkeypatch.setattr(psm.kds, "to_d", lambda x, sigma, d: steps.append((x.clone(), d.clone())) or to_d(x, sigma, d))
    moved = []
    gather = psm.gather_particles
    monkeypatch.setattr(psm, "gather_particles", lambda t, a, s: moved.append(
        not torch.equal(a.reshape(a.shape[0], -1)[:, 0], torch.arange(a.shape[0]))) or gather(t, a, s))
    cond = ac.conditioning()
    lams = LambdaSchedule("custom", values=[0.5, 0.5, 2.0, 2.0, 0.5, 0.5])
    psm.particle_ksampler(pair, lams, 5, 6, 1.0, "euler_ancestral", "karras", cond, cond,
                          ac.empty_latent(H * H, batch=1), 1.0, 4, resample_below=1.0, proposal=0.0)
    assert any(moved)  # some resample really reordered the particles
    assert len(steps) == 5  # one Euler step per noisy step (the last step is x = D)
    for i, (x, d) in enumerate(steps):
        want = (0.5 if i in (2, 3) else 0.25) * x[:, :2]
        assert torch.allclose(d[:, :2], want, atol=1e-4 * float(x.abs().max())), i
