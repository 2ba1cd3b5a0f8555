"""λ Schedule, λ Sweep and Realign Model inside a real ComfyUI process."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from comfy_helpers import assert_bit_identical, capture_denoised, count_unet_calls, empty_latent, encode, ksampler, \
    load_checkpoint

STEPS = 4


@pytest.fixture(scope="module")
def sd15(comfy, pack):
    ref, clip, vae = load_checkpoint("sd15_reference.safetensors")
    aligned = load_checkpoint("sd15_aligned.safetensors")[0]
    pair = pack.nodes.DeRaDiffMakePair.execute(ref, aligned, 5000.0)[0]
    return dict(ref=ref, aligned=aligned, clip=clip, vae=vae, pair=pair, pos=encode(clip, "a red fox"),
                neg=encode(clip, "blurry"), latent=empty_latent())


def schedule(pack, shape="linear", lambda_from=1.0, lambda_to=0.0, start=0.0, end=1.0, outside=0.0,
             custom="1, 1, 0.5, 0", floats=None, pair=None):
    out = pack.nodes.DeRaDiffLambdaSchedule.execute(shape, lambda_from, lambda_to, start, end, outside, custom,
                                                    STEPS, custom_floats=floats, pair=pair)
    return out.result[0], out.ui


def realign(pack, s, sampler="euler", lam=1.0, sched=None, latent=None, denoise=1.0, seed=3, pair=None, steps=STEPS):
    kwargs = {"lambda": lam}
    if sched is not None:
        kwargs["lambda_schedule"] = sched
    out = pack.nodes.DeRaDiffKSampler.execute(pair or s["pair"], seed, steps, 5.0, sampler, "normal", s["pos"],
                                              s["neg"], latent or s["latent"], denoise, **kwargs)
    return out.result[0]["samples"]


@pytest.mark.parametrize("sampler,denoise", [("euler", 1.0), ("heun", 1.0), ("dpmpp_2s_ancestral", 1.0),
                                             ("dpmpp_sde", 1.0), ("euler", 0.6)])
def test_schedule_is_evaluated_from_the_sigma_of_every_call(sd15, pack, monkeypatch, sampler, denoise):
    from comfyui_deradiff.sampler import guider as guider_mod
    from comfyui_deradiff.sampler.schedules import PercentOfSigma
    percent_of = PercentOfSigma(sd15["ref"].get_model_object("model_sampling").percent_to_sigma)
    sched, _ = schedule(pack, "cosine", 1.5, 0.0)
    ref, seen_ref = capture_denoised(sd15["ref"])
    aligned, seen_al = capture_denoised(sd15["aligned"])
    pair = pack.nodes.DeRaDiffMakePair.execute(ref, aligned)[0]
    calls = []
    original = guider_mod.DeRaDiffGuider.predict_noise

    def recording(self, x, timestep, model_options={}, seed=None):
        out = original(self, x, timestep, model_options, seed)
        calls.append((float(timestep[0]), out.clone()))
        return out

    monkeypatch.setattr(guider_mod.DeRaDiffGuider, "predict_noise", recording)
    realign(pack, sd15, sampler=sampler, sched=sched, latent=sd15["latent"], denoise=denoise, pair=pair)
    # both models run at every call here (λ is never exactly 0 or 1 before the end)
    full_len = len(calls)
    assert full_len >= STEPS
    lams = []
    ref_i = al_i = 0
    for sigma, out in calls:
        lam = sched.at_progress(percent_of(sigma))
        lams.append(lam)
        if lam == 0.0:
            torch.testing.assert_close(out, seen_ref[ref_i])
            ref_i += 1
            continue
        expected = (1 - lam) * seen_ref[ref_i] + lam * seen_al[al_i]
        ref_i += 1
        al_i += 1
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4 * float(expected.abs().max()))
    assert ref_i == len(seen_ref) and al_i == len(seen_al)
    assert all(a >= b - 1e-6 for a, b in zip(lams, lams[1:]))
    if denoise == 1.0:
        assert lams[0] == pytest.approx(1.5)
    else:  # percents are absolute: img2img starts part-way along the curve, not at its start
        assert lams[0] == pytest.approx(sched.at_progress(1.0 - denoise), abs=0.05) and lams[0] < 1.4


def test_steps_at_exactly_0_or_1_run_one_model(sd15, pack):
    sched, _ = schedule(pack, "custom", custom="0, 0, 1, 1")
    with count_unet_calls(sd15["ref"], sd15["aligned"]) as calls:
        out = realign(pack, sd15, sched=sched)
    assert calls == [2, 2]  # euler: one call per step, each step only the model its λ needs
    with count_unet_calls(sd15["ref"], sd15["aligned"]) as calls:
        realign(pack, sd15, sched=schedule(pack, "custom", custom="0, 0, 0, 0")[0])
    assert calls == [4, 0]
    assert torch.isfinite(out).all()


def test_floats_input_and_preview_data(sd15, pack, comfy):
    """The editor draws the preview from the curve, the custom list's length and the pair's β."""
    sched, ui = schedule(pack, "custom", floats=[1.0, 0.5, 0.25, 0.0], pair=sd15["pair"])
    assert sched.values == [1.0, 0.5, 0.25, 0.0]
    (preview,) = ui["deradiff_preview"]
    assert preview["custom_steps"] == 4 and preview["beta"] == 5000.0
    assert preview["custom_values"] == [1.0, 0.5, 0.25, 0.0]  # drawn one per sampler step, the last held
    assert preview["curve"] == sched.curve() and preview["curve"][0] == 1.0 and preview["curve"][-1] == 0.0
    json.dumps(ui)  # what the server sends to the editor
    # preview_steps only changes the drawing: leaving it out (as the editor does) builds the same schedule
    bare = pack.nodes.DeRaDiffLambdaSchedule.execute("custom", 1.0, 0.0, 0.0, 1.0, 0.0, "1, 1, 0.5, 0")
    assert bare.result[0].values == [1.0, 1.0, 0.5, 0.0]
    with pytest.raises(pack.nodes.common.NodeInputError, match="input 'custom_values'"):
        schedule(pack, "custom", custom="1, oops")
    with pytest.raises(pack.nodes.common.NodeInputError, match="input 'end_percent'"):
        schedule(pack, "linear", start=0.8, end=0.2)


def sweep(pack, s, lambdas, sampler="euler", latent=None, denoise=1.0, seed=3, steps=STEPS):
    return pack.nodes.DeRaDiffLambdaSweep.execute(s["pair"], lambdas, seed, steps, 5.0, sampler, "normal",
                                                  s["pos"], s["neg"], latent or s["latent"], denoise)


def test_sweep_equals_separate_runs_for_every_sampler(comfy, sd15, pack):
    import comfy.samplers
    lambdas = [0.0, 0.5, 1.5]
    mismatched = {}
    for sampler in comfy.samplers.KSampler.SAMPLERS:
        latents, labels, values = sweep(pack, sd15, ", ".join(map(str, lambdas)), sampler=sampler, steps=2)
        got = latents["samples"]
        assert got.shape[0] == len(lambdas) and values == lambdas
        for i, lam in enumerate(lambdas):
            want = realign(pack, sd15, sampler=sampler, lam=lam, steps=2)
            err = float((got[i:i + 1] - want).abs().max() / want.abs().max())
            if err > 5e-4:  # batched vs single matmuls round differently
                mismatched[sampler] = err
    assert mismatched == {}


def test_sweep_batches_all_lambdas_into_each_call_and_handles_batches_and_masks(sd15, pack, comfy):
    import nodes
    with count_unet_calls(sd15["ref"], sd15["aligned"]) as calls:
        latents, labels, _ = sweep(pack, sd15, "0, 1, 2", sampler="euler_ancestral")
    assert calls == [STEPS, STEPS]  # one call per model per step, whatever the number of λ
    assert labels.split("\n") == ["λ=0  β/λ=∞", "λ=1  β/λ=5000", "λ=2  β/λ=2500"]
    batch = empty_latent(batch=2)
    mask = torch.zeros(1, 64, 64)
    mask[:, 32:] = 1
    init = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    masked = nodes.SetLatentNoiseMask().set_mask(init, mask)[0]
    for latent, denoise in [(batch, 1.0), (masked, 0.8)]:
        out, labels, _ = sweep(pack, sd15, "0.5, 1.5", sampler="dpmpp_2m_sde", latent=latent, denoise=denoise)
        assert out["samples"].shape[0] == 4 and len(labels.split("\n")) == 4
        for i, lam in enumerate((0.5, 1.5)):
            want = realign(pack, sd15, sampler="dpmpp_2m_sde", lam=lam, latent=latent, denoise=denoise)
            torch.testing.assert_close(out["samples"][2 * i:2 * i + 2], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_sweep_grid_labels_every_image(pack, comfy):
    images = torch.rand(4, 32, 48, 3)
    grid = pack.nodes.DeRaDiffSweepGrid.execute(images, "λ=0\nλ=0.5\nλ=1\nλ=2", 2)[0]
    assert grid.shape[0] == 1 and grid.shape[2] == 96 and grid.shape[1] > 64
    # the label strips (below each tile) contain light text pixels
    strip = grid[0, 32:grid.shape[1] // 2]
    assert (strip > 0.8).any()
    with pytest.raises(pack.nodes.common.NodeInputError, match="input 'labels'"):
        pack.nodes.DeRaDiffSweepGrid.execute(images, "λ=0\nλ=1", 0)


def test_sweep_grid_adds_beta_over_lambda_to_lambda_only_labels(pack, comfy):
    with_beta = sys.modules[f"{pack.__name__}.nodes.sweep_nodes"].with_beta
    assert with_beta("λ=2", 5000.0) == "λ=2  β/λ=2500"
    assert with_beta("λ=0", 5000.0) == "λ=0  β/λ=∞"
    assert with_beta("λ=0.5", 0.0) == "λ=0.5"
    for other in ("λ=2  β/λ=10", "my label", "λ=abc"):  # labels it did not make stay as they are
        assert with_beta(other, 5000.0) == other
    images = torch.rand(2, 32, 48, 3)
    grid = pack.nodes.DeRaDiffSweepGrid()
    plain, with_b = grid.execute(images, "λ=0.5\nλ=2", 0)[0], grid.execute(images, "λ=0.5\nλ=2", 0, beta=5000.0)[0]
    assert torch.equal(plain[0, :32], with_b[0, :32]) and not torch.equal(plain, with_b)
    with pytest.raises(pack.nodes.common.NodeInputError, match="input 'beta'"):
        grid.execute(images, "λ=0.5\nλ=2", 0, beta=float("nan"))


@pytest.mark.parametrize("lam,sampler", [(0.5, "euler"), (1.7, "dpmpp_2m"), (0.0, "euler"), (1.0, "heun")])
def test_realigned_model_in_plain_ksampler_equals_deradiff_ksampler(sd15, pack, comfy, lam, sampler):
    model = pack.nodes.DeRaDiffRealignModel.execute(sd15["pair"], **{"lambda": lam})[0]
    got = ksampler(model, sd15["latent"], sd15["pos"], sd15["neg"], seed=3, steps=STEPS, sampler=sampler)
    want = realign(pack, sd15, sampler=sampler, lam=lam)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    if lam in (0.0, 1.0):
        assert_bit_identical(got, ksampler(sd15["ref"] if lam == 0 else sd15["aligned"], sd15["latent"], sd15["pos"],
                                           sd15["neg"], seed=3, steps=STEPS, sampler=sampler))


def test_realigned_model_loads_both_models_and_follows_a_schedule(sd15, pack, comfy, monkeypatch):
    import comfy.model_management as mm
    sched, _ = schedule(pack, "custom", custom="0, 0, 1, 1")
    model = pack.nodes.DeRaDiffRealignModel.execute(sd15["pair"], **{"lambda": 0.5, "lambda_schedule": sched})[0]
    loads = []
    real = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **k: (loads.append(list(models)), real(models, *a, **k))[1])
    with count_unet_calls(sd15["ref"], sd15["aligned"]) as calls:
        got = ksampler(model, sd15["latent"], sd15["pos"], sd15["neg"], seed=3, steps=STEPS)
    assert calls == [2, 2]
    assert any({id(sd15["ref"].model), id(sd15["aligned"].model)} <= {id(m.model) for m in c} for c in loads)
    torch.testing.assert_close(got, realign(pack, sd15, sched=sched), rtol=1e-4, atol=1e-3)


# -- a custom schedule is one value per sampler step (issue 20, item 6) ----------------------------
@pytest.fixture
def lambdas_used(pack, monkeypatch):
    """The λ each sampler evaluation got (what LambdaSchedule.value_at returned), in call order."""
    from comfyui_deradiff.sampler.schedules import LambdaSchedule
    seen = []
    original = LambdaSchedule.value_at

    def recording(self, sigma, percent_of=None):
        value = original(self, sigma, percent_of)
        seen.append(value)
        return value
    monkeypatch.setattr(LambdaSchedule, "value_at", recording)
    return seen


def custom(pack, values):
    return schedule(pack, "custom", custom=", ".join(f"{v:g}" for v in values))[0]


@pytest.mark.parametrize("scheduler", ["karras", "normal", "exponential", "sgm_uniform", "beta"])
def test_custom_schedule_gives_each_step_its_own_value(sd15, pack, lambdas_used, scheduler):
    values = [1, 1, 0.5, 0]
    pack.nodes.DeRaDiffKSampler.execute(sd15["pair"], 3, 4, 5.0, "euler", scheduler, sd15["pos"], sd15["neg"],
                                        sd15["latent"], 1.0, **{"lambda": 1.0, "lambda_schedule": custom(pack, values)})
    assert lambdas_used == values
    lambdas_used.clear()
    many = [round(0.05 * i, 2) for i in range(20)]
    pack.nodes.DeRaDiffKSampler.execute(sd15["pair"], 3, 20, 5.0, "euler", scheduler, sd15["pos"], sd15["neg"],
                                        sd15["latent"], 1.0, **{"lambda": 1.0, "lambda_schedule": custom(pack, many)})
    assert lambdas_used == many


# λ of each evaluation over 4 karras steps with values '1, 0.5, 0.25, 0', by the sampler's own loop: Heun and the
# exponential Heun samplers (ComfyUI 0.33: SEEDS-2 with r = 1) evaluate each step twice, the second time at the
# next step's sigma, and the last step (to sigma 0) once; Heun++ adds a third evaluation at the sigma after that
# while two steps remain.
CORRECTOR_RUNS = {"heun": [1, 1, 0.5, 0.5, 0.25, 0.25, 0],
                  "exp_heun_2_x0": [1, 1, 0.5, 0.5, 0.25, 0.25, 0],
                  "exp_heun_2_x0_sde": [1, 1, 0.5, 0.5, 0.25, 0.25, 0],
                  "heunpp2": [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0]}


@pytest.mark.parametrize("sampler", sorted(CORRECTOR_RUNS))
def test_custom_schedule_heun_corrector_belongs_to_its_step(sd15, pack, lambdas_used, sampler):
    """Every evaluation of a step, the corrector at the next step's sigma included, takes the step's value."""
    import comfy.samplers
    if sampler not in comfy.samplers.KSAMPLER_NAMES:
        pytest.skip(f"{sampler} is not in this ComfyUI")
    values = [1, 0.5, 0.25, 0]
    pack.nodes.DeRaDiffKSampler.execute(sd15["pair"], 3, 4, 5.0, sampler, "karras", sd15["pos"], sd15["neg"],
                                        sd15["latent"], 1.0, **{"lambda": 1.0, "lambda_schedule": custom(pack, values)})
    assert lambdas_used == CORRECTOR_RUNS[sampler]


def test_custom_schedule_longer_than_the_run_says_which_values_are_unused(sd15, pack, lambdas_used, caplog):
    import logging
    caplog.set_level(logging.WARNING, logger="DeRaDiff")
    values = [1, 0.5, 0.25, 0, 0.75, 0.75]
    pack.nodes.DeRaDiffKSampler.execute(sd15["pair"], 3, 4, 5.0, "euler", "karras", sd15["pos"], sd15["neg"],
                                        sd15["latent"], 1.0, **{"lambda": 1.0, "lambda_schedule": custom(pack, values)})
    assert lambdas_used == values[:4]
    assert "6 values but this run has only 4 steps: the values after the first 4 are not used" in caplog.text


def test_custom_schedule_in_parts_counts_the_full_schedules_steps(sd15, pack, lambdas_used):
    """KSamplerAdvanced's start/end steps (Realign Model) and SplitSigmas halves (DeRaDiff Guider)
    run a slice of the schedule: the values are those of the slice's own steps."""
    import nodes
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import RandomNoise, SamplerCustomAdvanced
    values = [1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    sched = custom(pack, values)
    realigned = pack.nodes.DeRaDiffRealignModel.execute(sd15["pair"], **{"lambda": 1.0, "lambda_schedule": sched})[0]
    nodes.KSamplerAdvanced().sample(realigned, "enable", 3, 8, 5.0, "euler", "karras", sd15["pos"], sd15["neg"],
                                    sd15["latent"], 3, 6, "enable")
    assert lambdas_used == values[3:6]
    lambdas_used.clear()
    guider = pack.nodes.DeRaDiffGuiderNode.execute(sd15["pair"], sd15["pos"], sd15["neg"], 5.0,
                                                        **{"lambda": 1.0, "lambda_schedule": sched}).result[0]
    sigmas = comfy.samplers.calculate_sigmas(sd15["ref"].get_model_object("model_sampling"), "exponential", 8)
    SamplerCustomAdvanced.execute(RandomNoise.execute(3)[0], guider, comfy.samplers.sampler_object("euler"),
                                  sigmas[5:], sd15["latent"])
    assert lambdas_used == values[5:]
