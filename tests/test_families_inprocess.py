"""DeRaDiff on the model families beyond SD1.5/SDXL (issue 14), inside a real ComfyUI process.

Families: SD2.x v-prediction, SDXL v-prediction + zero-terminal SNR (NoobAI-style), SD3.5 (MMDiT, flow),
Flux.1-dev (guidance-distilled, cfg 1 with the guidance input) and Flux.1-schnell. Each stand-in is a tiny
random diffusion-model file (scripts/standins.py, FAMILY_STANDINS) that ComfyUI's own UNETLoader detects as
the family; the conditioning has the family's shapes (tests/family_nodes/conditioning.py) because the real
text encoders are too large for this machine. Per family:

- detection: ComfyUI's model_config class, prediction type and latent format are the family's;
- λ = 0 / 1 are KSampler with that model alone, bit for bit, and the other model never runs;
- 0 < λ < 1 and λ > 1: every evaluation is (1-λ)·D_ref + λ·D_aligned of the two post-CFG x0 predictions
  at the same sigma (flow models included);
- reference + LoRA (shared weights, LoRA applied on the fly) equals the LoRA merged into a separate copy;
- the λ Sweep equals separate DeRaDiff KSampler runs; Realign Model works in a plain KSampler.

Tests are grouped by family (module-scoped parametrised fixture), so one family's models are loaded at a
time; 2 steps on an 8x8 latent keep the CPU time small.
"""
from __future__ import annotations

import gc

import pytest
import torch

from comfy_helpers import assert_bit_identical, capture_denoised, count_unet_calls, ksampler
from family_nodes.conditioning import family_conditioning

STEPS = 2
SEED = 3

# family -> stand-in files, ComfyUI's model_config class, prediction, latent channels, conditioning, cfg
FAMILIES = {
    "sd2_vpred": dict(ref="sd2_vpred_reference_unet.safetensors", aligned="sd2_vpred_aligned_unet.safetensors",
                      lora="sd2_aligned_lora.safetensors", config="SD20", model_type="V_PREDICTION",
                      latent_format="SD15", channels=4, cond="sd2", cfg=5.0),
    "sdxl_vpred_ztsnr": dict(ref="sdxl_vpred_ztsnr_reference_unet.safetensors",
                             aligned="sdxl_vpred_ztsnr_aligned_unet.safetensors",
                             lora="sdxl_vpred_aligned_lora.safetensors", config="KOALA_700M",
                             model_type="V_PREDICTION", latent_format="SDXL", channels=4, cond="sdxl", cfg=5.0,
                             ztsnr=True, batch_rel=1e-3),
    "sd35": dict(ref="sd35_reference.safetensors", aligned="sd35_aligned.safetensors",
                 lora="sd35_aligned_lora.safetensors", config="SD3", model_type="FLOW", latent_format="SD3",
                 channels=16, cond="sd3", cfg=4.0),
    "flux_dev": dict(ref="flux1_dev_reference.safetensors", aligned="flux1_dev_aligned.safetensors",
                     lora="flux1_dev_aligned_lora.safetensors", config="Flux", model_type="FLUX",
                     latent_format="Flux", channels=16, cond="flux", cfg=1.0, guidance=3.5),
    "flux_schnell": dict(ref="flux1_schnell_reference.safetensors", aligned="flux1_schnell_aligned.safetensors",
                         lora="flux1_dev_aligned_lora.safetensors", config="FluxSchnell", model_type="FLOW",
                         latent_format="Flux", channels=16, cond="flux", cfg=1.0),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: the stand-ins' layers are tiny, and on a shared 2-core machine
    torch's thread pool spends more time waiting for a busy core than computing (measured on the SD3.5
    stand-in under a load of ~3.5: 0.8 s per 2-step KSampler with the default threads, 0.02 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_unet_file(name):
    """A fresh ModelPatcher from a stand-in file, through ComfyUI's UNETLoader (no cache)."""
    import nodes
    return nodes.UNETLoader().load_unet(name, "default")[0]


def release():
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, comfy, pack):
    from standins import FAMILY_STANDINS, ensure_standin
    spec = dict(FAMILIES[request.param], name=request.param)
    for key in ("ref", "aligned", "lora"):
        ensure_standin(next(n for n in FAMILY_STANDINS if n.endswith("/" + spec[key])))
    guidance = spec.get("guidance")
    spec.update(
        ref_model=load_unet_file(spec["ref"]), aligned_model=load_unet_file(spec["aligned"]),
        pos=family_conditioning(spec["cond"], seed=1, guidance=guidance),
        neg=family_conditioning(spec["cond"], seed=2, guidance=guidance),
        latent={"samples": torch.zeros(1, spec["channels"], 8, 8)})
    yield spec
    spec.clear()
    release()


def make_pair(pack, ref, aligned):
    return pack.nodes.DeRaDiffMakePair.execute(ref, aligned, 0.0)[0]


def deradiff(pack, f, pair, lam, latent=None, pos=None):
    out = pack.nodes.DeRaDiffKSampler.execute(pair, SEED, STEPS, f["cfg"], "euler", "normal", pos or f["pos"],
                                              f["neg"], latent or f["latent"], 1.0, **{"lambda": lam})
    return out.result[0]["samples"]


def plain(f, model, pos=None):
    return ksampler(model, f["latent"], pos or f["pos"], f["neg"], seed=SEED, steps=STEPS, cfg=f["cfg"])


def close(got, want, rel=1e-4):
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


def test_family_detected_by_comfyui_and_stand_ins_differ(fam):
    import comfy.model_base
    for key in ("ref_model", "aligned_model"):
        model = fam[key].model
        assert type(model.model_config).__name__ == fam["config"]
        assert model.model_type == getattr(comfy.model_base.ModelType, fam["model_type"])
        assert type(model.latent_format).__name__ == fam["latent_format"]
        sigma_max = float(fam[key].get_model_object("model_sampling").sigma_max)
        assert (sigma_max > 1000.0) == bool(fam.get("ztsnr"))  # zero-terminal SNR: sigma_max ~4.5e3
    a, b = plain(fam, fam["ref_model"]), plain(fam, fam["aligned_model"])
    assert torch.isfinite(a).all() and (a - b).abs().mean() > 1e-2 * a.abs().mean()


def test_lambda_0_and_1_are_the_single_models_bit_for_bit_without_running_the_other(fam, pack):
    ref, aligned = fam["ref_model"], fam["aligned_model"]
    pair = make_pair(pack, ref, aligned)
    for lam, alone, idle in [(0.0, ref, 1), (1.0, aligned, 0)]:
        expected = plain(fam, alone)
        with count_unet_calls(ref, aligned) as calls:
            got = deradiff(pack, fam, pair, lam)
        assert_bit_identical(got, expected)
        assert calls[idle] == 0 and calls[1 - idle] > 0, calls


@pytest.mark.parametrize("lam", [0.4, 1.7])
def test_every_evaluation_is_the_explicit_mix_of_x0_predictions(fam, pack, monkeypatch, lam):
    from comfyui_deradiff.sampler import guider as guider_mod
    ref, seen_ref = capture_denoised(fam["ref_model"])
    aligned, seen_al = capture_denoised(fam["aligned_model"])
    outputs, sigmas = [], []
    original = guider_mod.DeRaDiffGuider.predict_noise

    def recording(self, x, timestep, *args, **kwargs):
        out = original(self, x, timestep, *args, **kwargs)
        outputs.append(out.clone())
        sigmas.append(timestep.clone())
        return out

    monkeypatch.setattr(guider_mod.DeRaDiffGuider, "predict_noise", recording)
    with count_unet_calls(ref, aligned) as calls:
        deradiff(pack, fam, make_pair(pack, ref, aligned), lam)
    assert len(outputs) == STEPS and len(seen_ref) == len(seen_al) == len(outputs)
    assert calls[0] == calls[1] > 0
    for out, d_ref, d_al in zip(outputs, seen_ref, seen_al):
        expected = (1 - lam) * d_ref + lam * d_al
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        assert not torch.equal(d_ref, d_al)
    assert sigmas[0].item() > sigmas[-1].item() > 0


def test_reference_plus_lora_shared_weights_equals_the_merged_pair(fam, pack):
    """The LoRA pair shares the reference's weights (update applied on the fly, one model in memory);
    the same LoRA merged into an independently loaded copy gives the same samples (to 1e-4 of the
    output range: two summation orders in float32)."""
    import nodes
    ref = fam["ref_model"]
    lora_clone = nodes.LoraLoaderModelOnly().load_lora_model_only(ref, fam["lora"], 1.0)[0]
    shared_pair = make_pair(pack, ref, lora_clone)
    assert shared_pair.aligned_side().shared is not None
    independent = load_unet_file(fam["ref"])
    merged = nodes.LoraLoaderModelOnly().load_lora_model_only(independent, fam["lora"], 1.0)[0]
    merged_pair = make_pair(pack, ref, merged)
    assert merged_pair.aligned_side().patcher is merged
    try:  # λ 1.5: both models run, the aligned one extrapolated
        got = deradiff(pack, fam, shared_pair, 1.5)
        close(got, deradiff(pack, fam, merged_pair, 1.5))
        assert not torch.allclose(got, plain(fam, ref), atol=1e-3)
    finally:
        del merged_pair, merged, independent
        release()


def test_lambda_sweep_equals_separate_runs(fam, pack):
    pair = make_pair(pack, fam["ref_model"], fam["aligned_model"])
    lambdas = (0.0, 0.5, 1.5)
    swept = pack.nodes.DeRaDiffLambdaSweep.execute(pair, ", ".join(map(str, lambdas)), SEED, STEPS, fam["cfg"],
                                                   "euler", "normal", fam["pos"], fam["neg"], fam["latent"])[0]
    swept = swept["samples"]
    assert swept.shape[0] == len(lambdas)
    # batching changes float rounding: 1e-4 of the output range, 1e-3 with zero-terminal SNR, whose first
    # step starts from noise of sigma ~4.5e3 (measured: 7.8e-4 at one element of 256, the rest below 1e-4)
    rel = fam.get("batch_rel", 1e-4)
    for i, lam in enumerate(lambdas):
        close(swept[i:i + 1], deradiff(pack, fam, pair, lam), rel)
    spread = (swept[1] - swept[0]).abs().max() / swept.abs().max()
    assert spread > 100 * rel  # the λ really differ far beyond the tolerance


def test_realign_model_in_a_plain_ksampler(fam, pack):
    pair = make_pair(pack, fam["ref_model"], fam["aligned_model"])
    realign = pack.nodes.DeRaDiffRealignModel.execute
    assert_bit_identical(plain(fam, realign(pair, **{"lambda": 0.0})[0]), plain(fam, fam["ref_model"]))
    close(plain(fam, realign(pair, **{"lambda": 0.5})[0]), deradiff(pack, fam, pair, 0.5))


def test_flux_guidance_reaches_both_models(fam, pack):
    """FluxGuidance puts ``guidance`` in the conditioning: both models must receive it, and changing it
    must change both models' predictions (Flux.1-dev; schnell has no guidance input)."""
    if fam["name"] != "flux_dev":
        pytest.skip("only Flux.1-dev takes a guidance input")
    import node_helpers
    seen = {0: [], 1: []}
    denoised = {}
    for g in (2.0, 6.0):
        ref, d_ref = capture_denoised(fam["ref_model"])
        aligned, d_al = capture_denoised(fam["aligned_model"])
        handles = [p.model.diffusion_model.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen[i].append(float(kw["guidance"].flatten()[0])), with_kwargs=True)
            for i, p in enumerate((ref, aligned))]
        try:  # the FluxGuidance node's own operation
            pos = node_helpers.conditioning_set_values(fam["pos"], {"guidance": g})
            deradiff(pack, fam, make_pair(pack, ref, aligned), 0.5, pos=pos)
        finally:
            for h in handles:
                h.remove()
        denoised[g] = (d_ref, d_al)
    assert seen[0] == seen[1] == [2.0] * STEPS + [6.0] * STEPS
    for side in (0, 1):
        assert not torch.allclose(denoised[2.0][side][0], denoised[6.0][side][0])


# -- which pairs are accepted and which refused ------------------------------------------------------
def _with_sampling(patcher, model_type, shift=None):
    """``patcher`` with ComfyUI's sampling object for another prediction type (what a ModelSampling node does)."""
    import comfy.model_base
    ms = comfy.model_base.model_sampling(patcher.model.model_config, getattr(comfy.model_base.ModelType, model_type))
    if shift is not None:
        ms.set_parameters(shift=shift)
    clone = patcher.clone()
    clone.add_object_patch("model_sampling", ms)
    return clone


def test_pairs_that_only_look_different_are_accepted(comfy, pack):
    """eps reference + v-prediction aligned model of one family with one schedule: each model turns its own
    output into x0, so the mix is valid. SD2.x 512 (eps) + 768-v, and SDXL eps + v-prediction (no ztsnr)."""
    from standins import ensure_standin
    from comfyui_deradiff.sampler.pair import make_pair as pair_of
    for name in ("diffusion_models/sd2_eps_unet.safetensors", "diffusion_models/sd2_vpred_aligned_unet.safetensors"):
        ensure_standin(name)
    eps, vpred = load_unet_file("sd2_eps_unet.safetensors"), load_unet_file("sd2_vpred_aligned_unet.safetensors")
    assert eps.model.model_type.name == "EPS" and vpred.model.model_type.name == "V_PREDICTION"
    f = dict(FAMILIES["sd2_vpred"], pos=family_conditioning("sd2", 1), neg=family_conditioning("sd2", 2),
             latent={"samples": torch.zeros(1, 4, 8, 8)})
    pair = pair_of(eps, vpred, None, "sd2_eps_unet.safetensors", "sd2_vpred_aligned_unet.safetensors")
    assert_bit_identical(deradiff(pack, f, pair, 1.0), plain(f, vpred))
    assert_bit_identical(deradiff(pack, f, pair, 0.0), plain(f, eps))
    half = deradiff(pack, f, pair, 0.5)
    assert torch.isfinite(half).all() and not torch.allclose(half, plain(f, eps), atol=1e-3)
    del pair, eps, vpred
    xl = load_unet_file("sdxl_aligned_unet.safetensors")
    pair_of(xl, _with_sampling(xl, "V_PREDICTION"), None, "sdxl eps", "sdxl v-pred")  # no error
    del xl
    release()


REFUSED = [  # (reference file, aligned file or (file, sampling patch), words the message must contain)
    ("sd2_vpred_reference_unet.safetensors", "sd15_aligned_unet.safetensors", ["different model families", "SD20", "SD15"]),
    ("sd35_reference.safetensors", "flux1_dev_aligned.safetensors", ["different model families", "SD3", "Flux"]),
    ("flux1_dev_reference.safetensors", "flux1_schnell_aligned.safetensors",
     ["different model families", "guidance input: yes", "guidance input: no"]),
    ("sdxl_aligned_unet.safetensors", "sdxl_vpred_ztsnr_aligned_unet.safetensors",
     ["noise schedules", "no zero-terminal SNR", "v-prediction, zero-terminal SNR"]),
    ("sd35_reference.safetensors", ("sd35_aligned.safetensors", "FLOW", 6.0), ["noise schedules", "ModelSampling"]),
    ("sd2_eps_unet.safetensors", ("sd2_vpred_aligned_unet.safetensors", "FLOW", 1.0),
     ["prediction types that change the meaning of the mix", "flow (rectified)", "rectified-flow noising"]),
]


@pytest.mark.parametrize("ref_name,aligned,words", REFUSED, ids=[f"{r.split('_')[0]}-{(a if isinstance(a, str) else a[0]).split('_')[0]}-{w[0].split()[0]}"
                                                                for r, a, w in REFUSED])
def test_pairs_across_families_or_noising_are_refused_naming_both_models(comfy, pack, ref_name, aligned, words):
    from standins import FAMILY_STANDINS, ensure_standin
    from comfyui_deradiff.sampler.pair import PairError
    from comfyui_deradiff.sampler.pair import make_pair as pair_of
    aligned_name, patch = (aligned, None) if isinstance(aligned, str) else (aligned[0], aligned[1:])
    for name in (ref_name, aligned_name):
        full = "diffusion_models/" + name
        if full in FAMILY_STANDINS:
            ensure_standin(full)
    ref, al = load_unet_file(ref_name), load_unet_file(aligned_name)
    if patch:
        al = _with_sampling(al, *patch)
    try:
        with pytest.raises(PairError) as e:
            pair_of(ref, al, None, ref_name, aligned_name)
        msg = str(e.value)
        assert f"'{ref_name}'" in msg and f"'{aligned_name}'" in msg, msg
        for w in words:
            assert w in msg, (w, msg)
        with pytest.raises(pack.nodes.common.NodeInputError, match="Make Aligned Model Pair"):
            make_pair(pack, ref, al)  # the node names itself and its input
    finally:
        del ref, al
        release()
