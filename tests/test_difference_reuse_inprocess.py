"""Difference reuse (``full_pass_every``) inside a real ComfyUI: which model runs at each
evaluation, that every output is the reuse formula, and that k = 1 is today's method."""
from __future__ import annotations

import pytest
import torch

from comfy_helpers import (assert_bit_identical, count_unet_calls, empty_latent, encode, ksampler,
                           load_checkpoint)

STEPS = 6


@pytest.fixture(scope="module")
def sd15(comfy, pack):
    ref, clip, _vae = load_checkpoint("sd15_reference.safetensors")
    aligned = load_checkpoint("sd15_aligned.safetensors")[0]
    return dict(ref=ref, aligned=aligned, clip=clip, pos=encode(clip, "a lighthouse at dusk"),
                neg=encode(clip, "blurry"), latent=empty_latent(), pack=pack)


def make_pair(pack, ref, aligned):
    return pack.nodes.DeRaDiffMakePair.execute(ref, aligned, 0.0)[0]


def recording(patcher, log, name):
    """A clone of ``patcher`` that appends (name, sigma, post-CFG denoised) at every evaluation."""
    def post_cfg(args):
        log.append((name, float(args["sigma"].flatten()[0]), args["denoised"].clone()))
        return args["denoised"]
    clone = patcher.clone()
    clone.set_model_sampler_post_cfg_function(post_cfg)
    return clone


def run(s, pair, lam, every=None, sampler="euler", steps=STEPS, seed=5):
    extra = {} if every is None else {"full_pass_every": every}
    out = s["pack"].nodes.DeRaDiffKSampler.execute(pair, seed, steps, 5.0, sampler, "normal", s["pos"], s["neg"],
                                                   s["latent"], 1.0, **{"lambda": lam}, **extra)
    return out.result[0]["samples"]


def sigmas_of(s, steps=STEPS, sampler="euler"):
    from comfyui_deradiff.sampler.sampling import ksampler_sigmas
    return [float(v) for v in ksampler_sigmas(s["ref"], steps, sampler, "normal", 1.0)]


def test_every_one_is_bit_identical_to_the_exact_method_and_runs_both_models_every_step(sd15):
    pair = make_pair(sd15["pack"], sd15["ref"], sd15["aligned"])
    with count_unet_calls(sd15["ref"], sd15["aligned"]) as calls:
        exact = run(sd15, pair, 0.6)
    with count_unet_calls(sd15["ref"], sd15["aligned"]) as calls_1:
        got = run(sd15, pair, 0.6, every=1)
    assert_bit_identical(got, exact)
    assert calls == calls_1 == [STEPS, STEPS]


@pytest.mark.parametrize("every,lam,sampler", [(2, 0.3, "euler"), (3, 0.7, "euler_ancestral"),
                                               (2, 1.5, "dpmpp_2m"), (4, 0.5, "dpmpp_2m_sde")])
def test_each_evaluation_is_one_model_plus_the_stale_difference(sd15, monkeypatch, every, lam, sampler):
    from comfyui_deradiff.sampler import guider as guider_mod
    seen = []
    ref, aligned = recording(sd15["ref"], seen, "ref"), recording(sd15["aligned"], seen, "al")
    outputs = []
    original = guider_mod.DeRaDiffGuider.predict_noise

    def keep(self, x, timestep, *args, **kwargs):
        out = original(self, x, timestep, *args, **kwargs)
        outputs.append((float(timestep.flatten()[0]), out.clone()))
        return out

    monkeypatch.setattr(guider_mod.DeRaDiffGuider, "predict_noise", keep)
    with count_unet_calls(sd15["ref"], sd15["aligned"]) as calls:
        run(sd15, make_pair(sd15["pack"], ref, aligned), lam, every=every, sampler=sampler)
    sigmas = sigmas_of(sd15, sampler=sampler)
    # the plan, stated independently: step i runs both iff i % k == 0
    full = {i for i in range(STEPS) if i % every == 0}
    one_side = "ref" if lam <= 0.5 else "al"
    by_sigma = {}
    for name, sigma, d in seen:
        by_sigma.setdefault(sigma, {})[name] = d
    assert len(outputs) == STEPS and calls[0] + calls[1] == STEPS + len(full)
    delta = full_sigma = None
    prior = lambda s: s * s / (s * s + 1.0)  # noqa: E731  SD1.5 (eps, sigma_data 1): Gaussian prior weight
    for i, (sigma, out) in enumerate(outputs):
        assert sigma == pytest.approx(sigmas[i], rel=1e-6)
        ran = by_sigma[sigma]
        if i in full:
            assert set(ran) == {"ref", "al"}
            expected = torch.lerp(ran["ref"], ran["al"], lam)
            delta, full_sigma = ran["al"] - ran["ref"], sigma
        else:
            assert set(ran) == {one_side}, (i, set(ran))
            carried = delta * (prior(sigma) / prior(full_sigma))  # the stale Δ carried to this sigma
            expected = ran["ref"] + lam * carried if one_side == "ref" else ran["al"] - (1 - lam) * carried
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_inner_evaluations_of_multi_step_samplers_run_both_models(sd15):
    pair = make_pair(sd15["pack"], sd15["ref"], sd15["aligned"])
    seen = []
    ref, aligned = recording(sd15["ref"], seen, "ref"), recording(sd15["aligned"], seen, "al")
    run(sd15, make_pair(sd15["pack"], ref, aligned), 0.4, every=2, sampler="dpm_2")
    sigmas = sigmas_of(sd15, sampler="dpm_2")
    on_schedule = lambda s: any(abs(s - v) <= 1e-6 * s for v in sigmas[:-1])  # noqa: E731
    names_at = {}
    for name, sigma, _ in seen:
        names_at.setdefault(sigma, set()).add(name)
    inner = [s for s in names_at if not on_schedule(s)]
    assert inner, (sorted(names_at), sigmas)
    assert all(names_at[s] == {"ref", "al"} for s in inner)
    assert any(names_at[s] == {"ref"} for s in names_at if on_schedule(s))
    del pair


@pytest.mark.parametrize("path", ["ksampler", "realign_model"])
@pytest.mark.parametrize("sampler", ["heun", "exp_heun_2_x0"])
def test_heun_corrector_runs_both_models(sd15, sampler, path):
    """Heun's corrector (and the exponential Heun sampler's, ComfyUI 0.33) lands on the next step's sigma;
    it runs both models whatever that step's plan (measured: benchmarks/results/aw_heun_corrector.md).
    The evaluations, stated independently: step i at sigmas[i] (both models iff i % k == 0), then its
    corrector at sigmas[i + 1] unless that is the end (0)."""
    import comfy.samplers
    if sampler not in comfy.samplers.KSAMPLER_NAMES:
        pytest.skip(f"{sampler} is not in this ComfyUI")
    every, lam = 2, 0.4  # λ <= 0.5: the reuse steps run the reference
    pack = sd15["pack"]
    sigmas = sigmas_of(sd15, sampler=sampler)
    correctors = [sigmas[i + 1] for i in range(STEPS) if sigmas[i + 1] > 0]
    want_aligned = sorted([sigmas[i] for i in range(STEPS) if i % every == 0] + correctors)
    seen = []
    ref, aligned = recording(sd15["ref"], seen, "ref"), recording(sd15["aligned"], seen, "al")
    pair = make_pair(pack, ref, aligned)
    with count_unet_calls(sd15["ref"], sd15["aligned"]) as calls:
        if path == "ksampler":
            run(sd15, pair, lam, every=every, sampler=sampler)
        else:
            model = pack.nodes.DeRaDiffRealignModel.execute(pair, **{"lambda": lam, "full_pass_every": every})[0]
            ksampler(model, sd15["latent"], sd15["pos"], sd15["neg"], seed=5, steps=STEPS, sampler=sampler)
    assert calls == [STEPS + len(correctors), len(want_aligned)]
    if path == "ksampler":  # the aligned model's own post-CFG hook sees each of its evaluations' sigma
        got = sorted(s for name, s, _ in seen if name == "al")
        assert got == pytest.approx(want_aligned, rel=1e-4)


@pytest.mark.parametrize("lam,idle", [(0.0, 1), (1.0, 0)])
def test_lambda_0_and_1_still_run_one_model_bit_for_bit(sd15, lam, idle):
    ref, aligned = sd15["ref"], sd15["aligned"]
    expected = ksampler(ref if lam == 0 else aligned, sd15["latent"], sd15["pos"], sd15["neg"], seed=5,
                        steps=STEPS)
    with count_unet_calls(ref, aligned) as calls:
        got = run(sd15, make_pair(sd15["pack"], ref, aligned), lam, every=3)
    assert_bit_identical(got, expected)
    assert calls[idle] == 0


@pytest.mark.parametrize("lam,sampler", [(0.3, "euler"), (1.5, "dpmpp_2m")])
def test_realign_model_and_guider_node_agree_with_the_ksampler(sd15, lam, sampler):
    import comfy.samplers
    import comfy.sample
    pack, pair = sd15["pack"], make_pair(sd15["pack"], sd15["ref"], sd15["aligned"])
    want = run(sd15, pair, lam, every=2, sampler=sampler)
    model = pack.nodes.DeRaDiffRealignModel.execute(pair, **{"lambda": lam, "full_pass_every": 2})[0]
    with count_unet_calls(sd15["ref"], sd15["aligned"]) as calls:
        got = ksampler(model, sd15["latent"], sd15["pos"], sd15["neg"], seed=5, steps=STEPS, sampler=sampler)
    assert sum(calls) == STEPS + 3  # steps 0, 2 and 4 run both
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    guider = pack.nodes.DeRaDiffGuiderNode.execute(pair, sd15["pos"], sd15["neg"], 5.0,
                                                        **{"lambda": lam, "full_pass_every": 2}).result[0]
    latent = sd15["latent"]["samples"]
    noise = comfy.sample.prepare_noise(latent, 5)
    from comfyui_deradiff.sampler.sampling import ksampler_sigmas
    sigmas = ksampler_sigmas(sd15["ref"], STEPS, sampler, "normal", 1.0)
    got = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, seed=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_sweep_with_reuse_equals_separate_runs_and_splits_passes_by_side(sd15):
    pack, pair = sd15["pack"], make_pair(sd15["pack"], sd15["ref"], sd15["aligned"])
    lambdas = [0.0, 0.3, 0.7, 1.0, 1.5]
    latents = pack.nodes.DeRaDiffLambdaSweep.execute(pair, ", ".join(map(str, lambdas)), 5, STEPS, 5.0,
                                                     "euler_ancestral", "normal", sd15["pos"], sd15["neg"],
                                                     sd15["latent"], 1.0, 0, 3)[0]["samples"]
    for i, lam in enumerate(lambdas):
        want = run(sd15, pair, lam, every=3, sampler="euler_ancestral")
        err = float((latents[i:i + 1] - want).abs().max() / want.abs().max())
        assert err < 5e-4, (lam, err)
    from comfyui_deradiff.sampler.sweep import plan_passes
    assert plan_passes(lambdas, 8, 3) == [([0, 1], [0.0, 0.3]), ([2, 3, 4], [0.7, 1.0, 1.5])]
    assert plan_passes(lambdas, 2, 1) == [([0, 1], [0.0, 0.3]), ([2, 3], [0.7, 1.0]), ([4], [1.5])]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "x"])
def test_bad_full_pass_every_names_node_and_input(sd15, bad):
    pair = make_pair(sd15["pack"], sd15["ref"], sd15["aligned"])
    with pytest.raises(ValueError, match=r"DeRaDiff KSampler: input 'full_pass_every'"):
        run(sd15, pair, 0.5, every=bad)
