"""DeRaDiff inside a real ComfyUI process: its loaders, samplers and model management."""
from __future__ import annotations

import logging

import pytest
import torch

from comfy_helpers import (assert_bit_identical, capture_denoised, count_unet_calls, empty_latent, encode,
                           ksampler, load_checkpoint, load_unet)

STEPS = 3


@pytest.fixture(scope="module")
def sd15(comfy, pack):
    ref, clip, vae = load_checkpoint("sd15_reference.safetensors")
    aligned = load_checkpoint("sd15_aligned.safetensors")[0]
    return dict(ref=ref, aligned=aligned, clip=clip, vae=vae, pos=encode(clip, "a red fox in snow"),
                neg=encode(clip, "blurry"), latent=empty_latent())


def realign(pack, pair, lam, s, latent=None, sampler="euler", scheduler="normal", seed=7, steps=STEPS,
            cfg=5.0, denoise=1.0):
    node = pack.nodes.DeRaDiffKSampler()
    out = node.execute(pair, seed, steps, cfg, sampler, scheduler, s["pos"], s["neg"],
                       latent or s["latent"], denoise, **{"lambda": lam})
    return out.result[0]["samples"]


def make_pair(pack, ref, aligned, beta=0.0):
    return pack.nodes.DeRaDiffMakePair.execute(ref, aligned, beta)[0]


def test_stand_ins_really_differ(sd15):
    a = ksampler(sd15["ref"], sd15["latent"], sd15["pos"], sd15["neg"])
    b = ksampler(sd15["aligned"], sd15["latent"], sd15["pos"], sd15["neg"])
    assert (a - b).abs().mean() > 1e-2 * a.abs().mean()


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpmpp_2m_sde", "uni_pc", "ddim"])
def test_lambda_0_and_1_are_the_single_models_bit_for_bit_without_running_the_other(sd15, pack, sampler):
    ref, aligned = sd15["ref"], sd15["aligned"]
    pair = make_pair(pack, ref, aligned)
    for lam, alone, idle in [(0.0, ref, 1), (1.0, aligned, 0)]:
        expected = ksampler(alone, sd15["latent"], sd15["pos"], sd15["neg"], seed=7, steps=STEPS, sampler=sampler)
        with count_unet_calls(ref, aligned) as calls:
            got = realign(pack, pair, lam, sd15, sampler=sampler)
        assert_bit_identical(got, expected)
        assert calls[idle] == 0 and calls[1 - idle] > 0, calls


@pytest.mark.parametrize("sampler,lam", [("euler", 0.5), ("heun", 0.3), ("dpmpp_2s_ancestral", 2.0),
                                         ("dpmpp_sde", 0.7), ("euler_cfg_pp", 0.5), ("res_multistep", 1.5)])
def test_every_evaluation_is_the_explicit_mix(sd15, pack, monkeypatch, sampler, lam):
    from comfyui_deradiff.sampler import guider as guider_mod
    ref, seen_ref = capture_denoised(sd15["ref"])
    aligned, seen_al = capture_denoised(sd15["aligned"])
    outputs = []
    original = guider_mod.DeRaDiffGuider.predict_noise

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        outputs.append(out.clone())
        return out

    monkeypatch.setattr(guider_mod.DeRaDiffGuider, "predict_noise", recording)
    with count_unet_calls(ref, aligned) as calls:
        realign(pack, make_pair(pack, ref, aligned), lam, sd15, sampler=sampler)
    assert len(outputs) >= STEPS and len(seen_ref) == len(seen_al) == len(outputs)
    assert calls[0] == calls[1] > 0
    for out, d_ref, d_al in zip(outputs, seen_ref, seen_al):
        expected = (1 - lam) * d_ref + lam * d_al
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4 * float(expected.abs().max()))
        assert not torch.equal(d_ref, d_al)


def test_every_sampler_and_scheduler_runs(comfy, sd15, pack):
    import comfy.samplers
    pair = make_pair(pack, sd15["ref"], sd15["aligned"])
    end_points = [realign(pack, pair, lam, sd15, steps=2) for lam in (0.0, 1.0)]
    failures = []
    for sampler in comfy.samplers.KSampler.SAMPLERS:
        out = realign(pack, pair, 0.5, sd15, sampler=sampler, steps=2)
        if not torch.isfinite(out).all() or any(torch.equal(out, e) for e in end_points):
            failures.append(sampler)
    for scheduler in comfy.samplers.KSampler.SCHEDULERS:
        out = realign(pack, pair, 0.5, sd15, scheduler=scheduler, steps=2)
        if not torch.isfinite(out).all():
            failures.append(scheduler)
    assert failures == []


def test_both_models_load_in_one_call_and_are_released(comfy, sd15, pack, monkeypatch):
    import comfy.model_management as mm
    ref, aligned = sd15["ref"], sd15["aligned"]
    calls = []
    real_load = mm.load_models_gpu

    def spy(models, *args, **kwargs):
        calls.append(list(models))
        return real_load(models, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", spy)
    realign(pack, make_pair(pack, ref, aligned), 0.5, sd15)
    sampling_loads = [c for c in calls if any(m.model is ref.model for m in c)]
    assert len(sampling_loads) == 1
    loaded_bases = {id(m.model) for m in sampling_loads[0]}
    assert {id(ref.model), id(aligned.model)} <= loaded_bases
    resident = {id(lm.model.model) for lm in mm.current_loaded_models if lm.model is not None}
    assert {id(ref.model), id(aligned.model)} <= resident
    assert getattr(aligned.model, "current_patcher", None) is None  # cleaned up after the run
    mm.unload_all_models()
    resident = {id(lm.model.model) for lm in mm.current_loaded_models if lm.model is not None}
    assert id(ref.model) not in resident and id(aligned.model) not in resident


def test_gaussian_pair_gives_exactly_the_gaussian_aligned_at_beta_over_lambda(comfy, pack):
    """Data N(m, s^2 I), reward r(x) = w.x: the KL-optimum at beta is N(m + s^2 w / beta, s^2 I),
    and the ideal denoisers are known in closed form. DeRaDiff(ref, aligned at beta, lam) must
    sample the model aligned at beta/lam."""
    import gaussian_models as gm
    beta, s2 = 2.0, 0.25
    g = torch.Generator().manual_seed(3)
    m_ref = torch.randn(4, 8, 8, generator=g)
    w = torch.randn(4, 8, 8, generator=g)
    aligned_at = lambda b: gm.gaussian_model(m_ref + s2 * w / b, s2)
    ref, aligned = gm.gaussian_model(m_ref, s2), aligned_at(beta)
    pair = make_pair(pack, ref, aligned)
    cond = gm.dummy_conditioning()
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    for sampler in ("euler", "euler_ancestral", "dpmpp_2m"):
        for lam in (0.5, 1.5, 3.0):
            got = pack.nodes.DeRaDiffKSampler.execute(pair, 11, 6, 1.0, sampler, "karras", cond, cond, latent,
                                                       1.0, **{"lambda": lam}).result[0]["samples"]
            truth_model = aligned_at(beta / lam)
            want = ksampler(truth_model, latent, cond, cond, seed=11, steps=6, cfg=1.0, sampler=sampler,
                            scheduler="karras")
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            # and it is not trivially equal to either end point
            assert not torch.allclose(got, ksampler(aligned, latent, cond, cond, seed=11, steps=6, cfg=1.0,
                                                    sampler=sampler, scheduler="karras"), atol=1e-2)


def test_lora_clone_pair_matches_a_separately_merged_copy(comfy, sd15, pack, caplog):
    """Reference + LoraLoader output: both wrap one base model. The pack shares the reference's
    weights (update applied on the fly) and must equal the LoRA merged into a separate copy."""
    import comfy.sd
    import folder_paths
    import nodes
    ref, clip = sd15["ref"], sd15["clip"]
    lora_clone = nodes.LoraLoader().load_lora(ref, clip, "sd15_aligned_lora.safetensors", 1.0, 0.0)[0]
    assert ref.is_clone(lora_clone)
    independent = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path("checkpoints", "sd15_reference.safetensors"), output_vae=False, output_clip=False)[0]
    lora_separate = nodes.LoraLoader().load_lora(independent, clip, "sd15_aligned_lora.safetensors", 1.0, 0.0)[0]
    before = ksampler(ref, sd15["latent"], sd15["pos"], sd15["neg"])
    with caplog.at_level(logging.INFO):
        got = {lam: realign(pack, make_pair(pack, ref, lora_clone), lam, sd15) for lam in (0.0, 0.5, 1.0, 1.5)}
    assert "share the reference's weights" in caplog.text and "second full copy" not in caplog.text
    for lam, out in got.items():
        want = realign(pack, make_pair(pack, ref, lora_separate), lam, sd15)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert not torch.allclose(got[1.0], before)
    # the reference itself is untouched afterwards
    assert_bit_identical(ksampler(ref, sd15["latent"], sd15["pos"], sd15["neg"]), before)


def test_clones_that_cannot_share_weights_fall_back_to_a_logged_copy(comfy, sd15, pack, caplog):
    """Reference = base + LoRA A, aligned = base + LoRA B (not reference + something): no shared
    path exists, so the pack loads a merged copy, says so, and stays correct."""
    import comfy.sd
    import folder_paths
    import nodes
    ref, clip = sd15["ref"], sd15["clip"]
    styled = nodes.LoraLoader().load_lora(ref, clip, "sd15_aligned_lora.safetensors", 0.5, 0.0)[0]
    other = nodes.LoraLoader().load_lora(ref, clip, "sd15_aligned_lora.safetensors", -0.7, 0.0)[0]
    with caplog.at_level(logging.WARNING):
        got = realign(pack, make_pair(pack, styled, other), 0.5, sd15)
    assert "second full copy" in caplog.text and "lacks" in caplog.text
    independent = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path("checkpoints", "sd15_reference.safetensors"), output_vae=False, output_clip=False)[0]
    other_separate = nodes.LoraLoader().load_lora(independent, clip, "sd15_aligned_lora.safetensors", -0.7, 0.0)[0]
    want = realign(pack, make_pair(pack, styled, other_separate), 0.5, sd15)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_batch_img2img_and_noise_mask(comfy, sd15, pack):
    import nodes
    ref, aligned = sd15["ref"], sd15["aligned"]
    pair = make_pair(pack, ref, aligned)
    batch = empty_latent(batch=2)
    g = torch.Generator().manual_seed(5)
    init = {"samples": torch.randn(1, 4, 8, 8, generator=g)}
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0
    masked = nodes.SetLatentNoiseMask().set_mask(init, mask)[0]
    for latent, denoise in [(batch, 1.0), (init, 0.6), (masked, 1.0), (masked, 0.7)]:
        for lam, alone in [(0.0, ref), (1.0, aligned)]:
            want = ksampler(alone, latent, sd15["pos"], sd15["neg"], seed=7, denoise=denoise)
            assert_bit_identical(realign(pack, pair, lam, sd15, latent=latent, denoise=denoise), want)
        mixed = realign(pack, pair, 0.5, sd15, latent=latent, denoise=denoise)
        assert mixed.shape == latent["samples"].shape and torch.isfinite(mixed).all()
    # unmasked half of the inpainting latent is kept exactly
    out = realign(pack, pair, 0.5, sd15, latent=masked)
    torch.testing.assert_close(out[..., :4], init["samples"][..., :4])
    assert not torch.allclose(out[..., 4:], init["samples"][..., 4:])


def test_sdxl_adm_vector_reaches_both_models(comfy, pack):
    import node_helpers
    ref, clip, _ = load_checkpoint("sdxl_reference.safetensors")
    aligned = load_unet("sdxl_aligned_unet.safetensors")
    pair = make_pair(pack, ref, aligned)

    text = encode(clip, "a fox")  # CLIP-G on a CPU is slow: encode once

    def sdxl_cond(width):  # what CLIPTextEncodeSDXL attaches: size and crop conditioning
        sizes = dict(width=width, height=width, crop_w=0, crop_h=0, target_width=width, target_height=width)
        return node_helpers.conditioning_set_values(text, sizes)

    def run(width, lam):
        seen = {0: [], 1: []}
        handles = []
        for i, p in enumerate((ref, aligned)):
            handles.append(p.model.diffusion_model.register_forward_pre_hook(
                lambda m, a, kw, i=i: seen[i].append(kw["y"].clone()), with_kwargs=True))
        try:
            s = dict(pos=sdxl_cond(width), neg=sdxl_cond(width), latent=empty_latent())
            realign(pack, pair, lam, s, steps=1)
        finally:
            for h in handles:
                h.remove()
        return seen

    a = run(1024, 0.5)
    assert a[0] and len(a[0]) == len(a[1])
    assert all(torch.equal(x, y) for x, y in zip(a[0], a[1]))
    assert a[0][0].shape[-1] == 2816
    b = run(512, 0.5)
    assert not torch.equal(a[0][0], b[0][0]) and not torch.equal(a[1][0], b[1][0])


def test_incompatible_pairs_are_refused_with_both_names(comfy, pack):
    import comfy.latent_formats
    NodeInputError = pack.nodes.common.NodeInputError
    sd_ref = load_checkpoint("sd15_reference.safetensors")[0]
    xl = load_unet("sdxl_aligned_unet.safetensors")
    with pytest.raises(NodeInputError) as e:
        pack.nodes.DeRaDiffLoadAlignedPair.execute("sd15_reference.safetensors",
                                                   "diffusion_models/sdxl_aligned_unet.safetensors")
    msg = str(e.value)
    assert "sd15_reference.safetensors" in msg and "sdxl_aligned_unet.safetensors" in msg
    assert "SD15" in msg and "KOALA_700M" in msg and "aligned_model" in msg
    with pytest.raises(NodeInputError, match="different model families"):
        make_pair(pack, sd_ref, xl)

    other_latent = sd_ref.clone()
    other_latent.add_object_patch("latent_format", comfy.latent_formats.SD3())
    with pytest.raises(NodeInputError, match="latent formats"):
        make_pair(pack, sd_ref, other_latent)

    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    zsnr = ModelSamplingDiscrete().patch(sd_ref, "eps", True)[0]
    with pytest.raises(NodeInputError, match="noise schedules"):
        make_pair(pack, sd_ref, zsnr)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_lambda_names_node_and_input(sd15, pack, bad):
    pair = make_pair(pack, sd15["ref"], sd15["aligned"])
    with pytest.raises(pack.nodes.common.NodeInputError, match=r"DeRaDiff KSampler: input 'lambda'"):
        realign(pack, pair, bad, sd15)


def test_diffusers_layout_unet_loads_as_the_aligned_model(comfy, sd15, pack):
    from conftest import ensure_standin
    ensure_standin("diffusion_models/sd15_aligned_diffusers_unet.safetensors")
    pair = pack.nodes.DeRaDiffLoadAlignedPair.execute(
        "sd15_reference.safetensors", "diffusion_models/sd15_aligned_diffusers_unet.safetensors", 5000.0)[0]
    assert type(pair.aligned.model.model_config).__name__ == "SD15"
    assert pair.beta == 5000.0
    unet = load_unet("sd15_aligned_diffusers_unet.safetensors")
    want = ksampler(unet, sd15["latent"], sd15["pos"], sd15["neg"], seed=7, steps=1)
    assert_bit_identical(realign(pack, pair, 1.0, sd15, steps=1), want)
    mixed = realign(pack, pair, 0.5, sd15, steps=1)
    assert torch.isfinite(mixed).all() and not torch.equal(mixed, want)
    del pair, unet
    load_unet.cache_clear()  # a full-size UNet: do not keep it for the rest of the session


@pytest.mark.parametrize("fp16_intermediates", [False, True])
def test_lambda_0_follows_core_ksampler_latent_handling(sd15, pack, monkeypatch, fp16_intermediates):
    """Core's common_ksampler on newer ComfyUI (0.3x) rescales an empty latent recorded at another
    VAE's downscale ratio, drops the ratio keys from its output and casts the samples to the
    intermediate dtype (--fp16-intermediates): DeRaDiff KSampler, λ Sweep and the particle mode follow
    the same path, so λ=0 stays KSampler bit for bit on each ComfyUI version (the particle mode:
    the same shape, dtype and keys)."""
    import comfy.cli_args
    import nodes
    if fp16_intermediates:
        monkeypatch.setattr(comfy.cli_args.args, "fp16_intermediates", True, raising=False)
    # an empty latent made for a 16x VAE: core resizes it for SD1.5's 8x where it knows the ratio
    latent = {"samples": torch.zeros(1, 4, 4, 4), "downscale_ratio_spacial": 16}
    pair = make_pair(pack, sd15["ref"], sd15["aligned"])
    want = nodes.KSampler().sample(sd15["ref"], 7, STEPS, 5.0, "euler_ancestral", "normal", sd15["pos"], sd15["neg"],
                                   latent, denoise=1.0)[0]
    runs = {
        "DeRaDiffKSampler": pack.nodes.DeRaDiffKSampler.execute(
            pair, 7, STEPS, 5.0, "euler_ancestral", "normal", sd15["pos"], sd15["neg"], latent, 1.0,
            **{"lambda": 0.0}).result[0],
        "DeRaDiffLambdaSweep": pack.nodes.DeRaDiffLambdaSweep.execute(
            pair, "0", 7, STEPS, 5.0, "euler_ancestral", "normal", sd15["pos"], sd15["neg"], latent, 1.0)[0],
        "particles": pack.nodes.DeRaDiffKSampler.execute(
            pair, 7, STEPS, 5.0, "euler_ancestral", "normal", sd15["pos"], sd15["neg"], latent, 1.0,
            **{"lambda": 0.0, "particles": 2}).result[0],
    }
    for name, got in runs.items():
        assert sorted(got) == sorted(want), name
        if name == "particles":  # N particles and a weighted draw: the same latent handling, other noise
            assert got["samples"].shape == want["samples"].shape and got["samples"].dtype == want["samples"].dtype
        else:
            assert_bit_identical(got["samples"], want["samples"])
