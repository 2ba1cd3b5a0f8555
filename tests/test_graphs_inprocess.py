"""DeRaDiff nodes combined with other nodes, as users combine them (issue "correct in any graph").

Each test builds the graph in a real ComfyUI process with ComfyUI's own loaders and
samplers; the MODEL patches are made the way the named core nodes make them (clone, then a
public ModelPatcher setter), so the tests hold on every ComfyUI version whatever API the
core node classes use.
"""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from comfy_helpers import empty_latent, encode, ksampler, load_checkpoint

STEPS = 3
CFG = 5.0


@pytest.fixture(scope="module")
def sd15(comfy, pack):
    import nodes
    ref, clip, vae = load_checkpoint("sd15_reference.safetensors")
    separate = load_checkpoint("sd15_aligned.safetensors")[0]
    shared = nodes.LoraLoaderModelOnly().load_lora_model_only(ref, "sd15_aligned_lora.safetensors", 1.0)[0]
    return dict(ref=ref, clip=clip, aligned={"separate": separate, "shared": shared},
                pos=encode(clip, "a red fox"), neg=encode(clip, "blurry"), latent=empty_latent())


def close(a, b, rtol=1e-3):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


def far(a, b):
    return float((a - b).abs().max()) > 1e-2 * float(b.abs().max())


def plain(s, model, sampler="euler", cfg=CFG, seed=5, latent=None):
    return ksampler(model, latent or s["latent"], s["pos"], s["neg"], seed=seed, steps=STEPS, cfg=cfg, sampler=sampler)


def deradiff(pack, s, pair, lam, sampler="euler", cfg=CFG, seed=5, latent=None, steps=STEPS, schedule=None):
    kwargs = {"lambda": lam} if schedule is None else {"lambda": lam, "lambda_schedule": schedule}
    return pack.nodes.DeRaDiffKSampler.execute(pair, seed, steps, cfg, sampler, "normal", s["pos"], s["neg"],
                                                latent or s["latent"], 1.0, **kwargs).result[0]["samples"]


def make_pair(pack, ref, aligned):
    return pack.nodes.DeRaDiffMakePair.execute(ref, aligned)[0]


def realign(pack, pair, lam):
    return pack.nodes.DeRaDiffRealignModel.execute(pair, **{"lambda": lam})[0]


# -- MODEL patches as core nodes make them ---------------------------------------
def freeu_like(model):
    """FreeU's mechanism: clone, then an output-block patch on the skip features."""
    m = model.clone()
    m.set_model_output_block_patch(lambda h, hsp, transformer_options: (h * 1.3, hsp * 0.8))
    return m


def v_prediction(model):
    """ModelSamplingDiscrete(v_prediction): clone, then a model_sampling object patch."""
    import comfy.model_sampling

    class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass
    m = model.clone()
    m.add_object_patch("model_sampling", ModelSamplingAdvanced(model.model.model_config))
    return m


def lora(model, strength):
    import nodes
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, "sd15_aligned_lora.safetensors", strength)[0]


def counting_apply_model_wrapper(model):
    """An APPLY_MODEL wrapper (what TorchCompileModel and caching nodes add) that counts its calls."""
    import comfy.patcher_extension
    calls = []

    def wrapper(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)
    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "deradiff_test_counter", wrapper)
    return m, calls


# -- 1. Realign Model followed by nodes that clone the MODEL ------------------------
@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_realign_model_then_a_model_patch_applies_to_both_models(sd15, pack, kind):
    ref, aligned = sd15["ref"], sd15["aligned"][kind]
    pair = make_pair(pack, ref, aligned)
    got_1 = plain(sd15, freeu_like(realign(pack, pair, 1.0)))
    want_1 = plain(sd15, freeu_like(aligned))
    close(got_1, want_1)
    assert far(got_1, plain(sd15, freeu_like(ref)))  # λ is not ignored
    got_half = plain(sd15, freeu_like(realign(pack, pair, 0.5)))
    want_half = deradiff(pack, sd15, make_pair(pack, freeu_like(ref), freeu_like(aligned)), 0.5)
    close(got_half, want_half)
    assert far(got_half, deradiff(pack, sd15, pair, 0.5))  # the patch really acts


def test_cloning_the_realigned_model_does_not_copy_the_pair(sd15, pack):
    realigned = realign(pack, make_pair(pack, sd15["ref"], sd15["aligned"]["separate"]), 0.5)
    clone = freeu_like(realigned).clone()
    key = "sampler_calc_cond_batch_function"
    assert clone.model_options[key] is realigned.model_options[key]
    assert clone.model_options[key].side.patcher.model is sd15["aligned"]["separate"].model


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_realign_model_then_model_sampling_patch(sd15, pack, kind):
    aligned = sd15["aligned"][kind]
    got = plain(sd15, v_prediction(realign(pack, make_pair(pack, sd15["ref"], aligned), 1.0)))
    close(got, plain(sd15, v_prediction(aligned)))
    assert far(got, plain(sd15, aligned))


def test_realign_model_then_lora_shared_pair_applies_to_both(sd15, pack):
    pair = make_pair(pack, sd15["ref"], sd15["aligned"]["shared"])
    got = plain(sd15, lora(realign(pack, pair, 1.0), 0.5))
    close(got, plain(sd15, lora(sd15["aligned"]["shared"], 0.5)), rtol=2e-3)
    assert far(got, plain(sd15, sd15["aligned"]["shared"]))


def test_realign_model_then_lora_separate_pair_says_what_it_applies_to(sd15, pack, caplog):
    aligned = sd15["aligned"]["separate"]
    with caplog.at_level(logging.WARNING):
        got = plain(sd15, lora(realign(pack, make_pair(pack, sd15["ref"], aligned), 1.0), 0.5))
    assert "apply to the reference only" in caplog.text
    close(got, plain(sd15, aligned))  # the aligned model's own weights, as the warning says


# -- 4. the aligned model's own wrappers --------------------------------------------
@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_aligned_models_own_wrappers_run_for_its_evaluations(sd15, pack, kind):
    wrapped, calls = counting_apply_model_wrapper(sd15["aligned"][kind])
    want = plain(sd15, wrapped)
    plain_calls = len(calls)
    assert plain_calls == STEPS
    pair = make_pair(pack, sd15["ref"], wrapped)
    for lam in (1.0, 0.5):
        calls.clear()
        got = deradiff(pack, sd15, pair, lam)
        assert len(calls) == plain_calls, f"DeRaDiff KSampler λ={lam}"
        if lam == 1.0:
            close(got, want)
        calls.clear()
        plain(sd15, realign(pack, pair, lam))
        assert len(calls) == plain_calls, f"Realign Model λ={lam}"


# -- 7. CFG++ at cfg 1 when the reference disables the cfg-1 shortcut ---------------------
def test_cfg_pp_at_cfg_1_with_disable_cfg1_on_the_reference(sd15, pack):
    ref = sd15["ref"].clone()
    ref.model_options["disable_cfg1_optimization"] = True  # what SAG sets
    aligned = sd15["aligned"]["separate"]
    got = deradiff(pack, sd15, make_pair(pack, ref, aligned), 1.0, sampler="euler_cfg_pp", cfg=1.0)
    close(got, plain(sd15, aligned, sampler="euler_cfg_pp", cfg=1.0), rtol=1e-4)


# -- 5. λ Sweep memory bound ----------------------------------------------------
def sweep(pack, s, pair, lambdas, sampler="euler", latent=None, max_per_pass=0, seed=5):
    return pack.nodes.DeRaDiffLambdaSweep.execute(pair, lambdas, seed, STEPS, CFG, sampler, "normal", s["pos"],
                                                  s["neg"], latent or s["latent"], 1.0,
                                                  max_lambdas_per_pass=max_per_pass)[0]["samples"]


def test_sweep_splits_into_passes_with_the_same_results(sd15, pack):
    pair = make_pair(pack, sd15["ref"], sd15["aligned"]["separate"])
    batch_sizes = []
    hook = pair.reference.model.diffusion_model.register_forward_pre_hook(
        lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        split = sweep(pack, sd15, pair, "0.25, 0.5, 1.5, 2, 3", max_per_pass=2)
    finally:
        hook.remove()
    assert max(batch_sizes) <= 2 * 2  # 2 λ x (cond + uncond)
    whole = sweep(pack, sd15, pair, "0.25, 0.5, 1.5, 2, 3")
    close(split, whole, rtol=1e-4)
    close(split[4:5], deradiff(pack, sd15, pair, 3.0), rtol=1e-4)


def test_sweep_passes_follow_comfyuis_memory_estimate(sd15, pack, monkeypatch):
    import comfy.model_management as mm
    import comfy.sampler_helpers
    from comfyui_deradiff.sampler.sweep import lambdas_per_pass
    pair = make_pair(pack, sd15["ref"], sd15["aligned"]["separate"])
    shape = list(sd15["latent"]["samples"].shape)
    conds = {"positive": comfy.sampler_helpers.convert_cond(sd15["pos"]),
             "negative": comfy.sampler_helpers.convert_cond(sd15["neg"])}
    per_lambda = comfy.sampler_helpers.estimate_memory(pair.reference, shape, conds)[0]
    weights = pair.reference.model_size() + pair.aligned.model_size()
    for fits in (1, 3, 8):
        total = weights + mm.minimum_inference_memory() + (fits + 0.5) * per_lambda
        monkeypatch.setattr(mm, "get_total_memory", lambda *a, **k: total)
        assert lambdas_per_pass(pair, shape, sd15["pos"], sd15["neg"], 8) == fits
    assert lambdas_per_pass(pair, shape, sd15["pos"], sd15["neg"], 8, max_per_pass=3) == 3


# -- 6. λ Sweep with ddim and an inpainting mask -----------------------------------------
def test_sweep_with_ddim_and_a_noise_mask_equals_separate_runs(sd15, pack):
    pair = make_pair(pack, sd15["ref"], sd15["aligned"]["separate"])
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32] = 1.0
    latent = {"samples": image, "noise_mask": mask}
    swept = sweep(pack, sd15, pair, "0.5, 1.5", sampler="ddim", latent=latent)
    for i, lam in enumerate((0.5, 1.5)):
        close(swept[i:i + 1], deradiff(pack, sd15, pair, lam, sampler="ddim", latent=latent), rtol=1e-4)


# -- 9. λ Schedule over two-stage sampling ------------------------------------------
def test_schedule_is_absolute_across_two_stage_sampling(sd15, pack):
    import comfy.samplers
    from comfyui_deradiff.sampler.guider import DeRaDiffGuider
    from comfyui_deradiff.sampler.sampling import ksampler_sigmas
    pair = make_pair(pack, sd15["ref"], sd15["aligned"]["separate"])
    out = pack.nodes.DeRaDiffLambdaSchedule.execute("interval", 1.5, 0.0, 0.0, 0.4, 0.0, "", 10)
    schedule = out.result[0]
    seen = []
    value_at = schedule.value_at
    schedule.value_at = lambda sigma, percent_of=None: seen.append(value_at(sigma, percent_of)) or seen[-1]
    sigmas = ksampler_sigmas(pair.reference, 10, "euler", "normal", 1.0)
    latent = sd15["latent"]["samples"]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))

    def run(part, x, noise):
        guider = DeRaDiffGuider(pair, schedule, CFG)
        guider.set_conds(sd15["pos"], sd15["neg"])
        return guider.sample(noise, x, comfy.samplers.sampler_object("euler"), part, seed=1)

    one = run(sigmas, latent, noise)
    one_stage, seen[:] = list(seen), []
    first = run(sigmas[:6], latent, noise)
    two = run(sigmas[5:], first, torch.zeros_like(noise))
    assert one_stage == [1.5] * 4 + [0.0] * 6  # 'first 40 %' of 10 steps: 4 steps, not 5
    assert seen == one_stage
    close(two, one, rtol=1e-4)


# -- 10. LoRA files: GLoRA, text-encoder parts ---------------------------------------
def _unet_linear_shapes(model, limit=12):
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    shapes = {}
    for lora_key, weight_key in key_map.items():
        if isinstance(weight_key, str) and lora_key.startswith("lora_unet_") and (".attn1." in weight_key or ".attn2." in weight_key):
            w = model.model.state_dict()[weight_key]
            if w.ndim == 2:
                shapes[lora_key] = tuple(w.shape)
        if len(shapes) >= limit:
            break
    return shapes


def test_glora_file_is_accepted_and_equals_lora_loader(comfy, sd15, pack):
    import folder_paths
    import nodes
    from conftest import STANDIN_DIR
    gen = torch.Generator().manual_seed(11)
    rank, sd = 2, {}
    for key, (out_f, in_f) in _unet_linear_shapes(sd15["ref"]).items():
        sd[f"{key}.a1.weight"] = torch.randn(in_f, rank, generator=gen) * 0.05
        sd[f"{key}.a2.weight"] = torch.randn(rank, in_f, generator=gen) * 0.05
        sd[f"{key}.b1.weight"] = torch.randn(out_f, rank, generator=gen) * 0.05
        sd[f"{key}.b2.weight"] = torch.randn(rank, in_f, generator=gen) * 0.05
    name = "test_glora.safetensors"
    save_file(sd, str(STANDIN_DIR / "loras" / name))
    try:
        pair = pack.nodes.DeRaDiffLoadAlignedPair.execute("sd15_reference.safetensors", "loras/" + name, 0.0, 1.0)[0]
        merged = nodes.LoraLoaderModelOnly().load_lora_model_only(pair.reference, name, 1.0)[0]
        got = deradiff(pack, sd15, pair, 1.0)
        close(got, plain(sd15, merged), rtol=2e-3)
        assert far(got, plain(sd15, pair.reference))
    finally:
        (STANDIN_DIR / "loras" / name).unlink()
        folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None


def test_lora_text_encoder_part_is_reported(comfy, sd15, pack, caplog):
    import folder_paths
    from conftest import STANDIN_DIR
    from safetensors.torch import load_file
    src = load_file(str(STANDIN_DIR / "loras" / "sd15_aligned_lora.safetensors"))
    src["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 768)
    src["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(768, 4)
    name = "test_lora_with_te.safetensors"
    save_file(src, str(STANDIN_DIR / "loras" / name))
    try:
        with caplog.at_level(logging.WARNING):
            pack.nodes.DeRaDiffLoadAlignedPair.execute("sd15_reference.safetensors", "loras/" + name, 0.0, 1.0)
        assert "text-encoder" in caplog.text and name in caplog.text
    finally:
        (STANDIN_DIR / "loras" / name).unlink()
        folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None
