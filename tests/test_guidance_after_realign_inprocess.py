"""Guidance nodes that evaluate the model themselves, placed after DeRaDiff Realign Model (issue 20, item 1).

PerturbedAttentionGuidance, SelfAttentionGuidance and SkipLayerGuidanceDiT call ComfyUI's
``calc_cond_batch`` from a post-CFG function; SkipLayerGuidanceDiTSimple takes over
``sampling_function``'s calc_cond_batch slot, where Realign Model installs its mix. Each of
those evaluations must see the realigned prediction: at λ=1 the node on the realigned MODEL
equals the node on the aligned model alone, at λ=0 the node on the reference; for the nodes
whose guidance term is linear in the evaluations (PAG, both skip-layer nodes) λ=0.5 equals
DeRaDiff sampling of the pair (node(reference), node(aligned)). The core node classes
themselves are used (their ``execute``), as a user's graph runs them.
"""
from __future__ import annotations

import gc
import logging

import pytest
import torch

from comfy_helpers import empty_latent, encode, ksampler, load_checkpoint

STEPS = 3
CFG = 5.0
SEED = 7


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(a, b, rel=1e-3):
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


def far(a, b):
    return float((a - b).abs().max()) > 1e-2 * float(b.abs().max())


def make_pair(pack, ref, aligned):
    return pack.nodes.DeRaDiffMakePair.execute(ref, aligned)[0]


def realign(pack, pair, lam):
    return pack.nodes.DeRaDiffRealignModel.execute(pair, **{"lambda": lam})[0]


def pag(model):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    return PerturbedAttentionGuidance.execute(model, 3.0)[0]


def sag(model):
    from comfy_extras.nodes_sag import SelfAttentionGuidance
    return SelfAttentionGuidance.execute(model, 0.5, 2.0)[0]


def slg(model):
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT
    return SkipLayerGuidanceDiT.execute(model, 3.0, 0.0, 1.0, double_layers="1", single_layers="")[0]


def slg_simple(model):
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiTSimple
    return SkipLayerGuidanceDiTSimple.execute(model, 0.0, 1.0, double_layers="1", single_layers="")[0]


# -- SD1.5: PAG and SAG -----------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15(comfy, pack):
    import nodes
    ref, clip, _ = load_checkpoint("sd15_reference.safetensors")
    separate = load_checkpoint("sd15_aligned.safetensors")[0]
    shared = nodes.LoraLoaderModelOnly().load_lora_model_only(ref, "sd15_aligned_lora.safetensors", 1.0)[0]
    return dict(ref=ref, aligned={"separate": separate, "shared": shared},
                pos=encode(clip, "a red fox"), neg=encode(clip, "blurry"), latent=empty_latent())


def sample15(s, model):
    return ksampler(model, s["latent"], s["pos"], s["neg"], seed=SEED, steps=STEPS, cfg=CFG)


@pytest.mark.parametrize("kind", ["separate", "shared"])
@pytest.mark.parametrize("node", [pag, sag], ids=["PAG", "SAG"])
def test_unet_guidance_node_after_realign_model_at_lambda_0_and_1(sd15, pack, kind, node):
    ref, aligned = sd15["ref"], sd15["aligned"][kind]
    pair = make_pair(pack, ref, aligned)
    want_aligned = sample15(sd15, node(aligned))
    want_reference = sample15(sd15, node(ref))
    assert far(want_aligned, want_reference)  # the two models differ under the node
    close(sample15(sd15, node(realign(pack, pair, 1.0))), want_aligned)
    close(sample15(sd15, node(realign(pack, pair, 0.0))), want_reference)


@pytest.mark.parametrize("kind", ["separate", "shared"])
def test_pag_after_realign_model_is_the_pair_of_pag_models_mixed(sd15, pack, kind):
    """PAG's guidance term is linear in the evaluations, so PAG on the realigned model at λ
    is DeRaDiff at λ over (PAG on the reference, PAG on the aligned model)."""
    ref, aligned = sd15["ref"], sd15["aligned"][kind]
    got = sample15(sd15, pag(realign(pack, make_pair(pack, ref, aligned), 0.5)))
    want = pack.nodes.DeRaDiffKSampler.execute(
        make_pair(pack, pag(ref), pag(aligned)), SEED, STEPS, CFG, "euler", "normal", sd15["pos"], sd15["neg"],
        sd15["latent"], 1.0, **{"lambda": 0.5}).result[0]["samples"]
    close(got, want)


def test_extra_evaluations_go_through_the_mix_and_steps_through_the_slot(sd15, pack):
    """The wrapper counts PAG's extra pass (one per step); the step's own evaluation still comes
    through sampling_function's slot, where full_pass_every and the fused pass live."""
    realigned = realign(pack, make_pair(pack, sd15["ref"], sd15["aligned"]["separate"]), 0.5)
    function = realigned.model_options["sampler_calc_cond_batch_function"]
    sample15(sd15, pag(realigned))
    assert function.evaluations == 2 * STEPS and function.extra_evaluations == STEPS


# -- SD3.5: skip-layer guidance -----------------------------------------------------------
@pytest.fixture(scope="module")
def sd3(comfy, pack):
    import nodes
    from family_nodes.conditioning import family_conditioning
    from standins import FAMILY_STANDINS, ensure_standin
    for name in ("sd35_reference.safetensors", "sd35_aligned.safetensors"):
        ensure_standin(next(n for n in FAMILY_STANDINS if n.endswith("/" + name)))
    s = dict(ref=nodes.UNETLoader().load_unet("sd35_reference.safetensors", "default")[0],
             aligned=nodes.UNETLoader().load_unet("sd35_aligned.safetensors", "default")[0],
             pos=family_conditioning("sd3", seed=1), neg=family_conditioning("sd3", seed=2),
             latent={"samples": torch.zeros(1, 16, 8, 8)})
    yield s
    s.clear()
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()


def sample3(s, model):
    return ksampler(model, s["latent"], s["pos"], s["neg"], seed=SEED, steps=STEPS, cfg=4.0)


@pytest.mark.parametrize("node", [slg, slg_simple], ids=["SkipLayerGuidanceDiT", "SkipLayerGuidanceDiTSimple"])
def test_skip_layer_guidance_after_realign_model(sd3, pack, node):
    ref, aligned = sd3["ref"], sd3["aligned"]
    pair = make_pair(pack, ref, aligned)
    want_aligned, want_reference = sample3(sd3, node(aligned)), sample3(sd3, node(ref))
    assert far(want_aligned, want_reference)
    assert far(sample3(sd3, node(ref)), sample3(sd3, ref))  # the node really acts on the stand-in
    close(sample3(sd3, node(realign(pack, pair, 1.0))), want_aligned)
    close(sample3(sd3, node(realign(pack, pair, 0.0))), want_reference)
    want_half = pack.nodes.DeRaDiffKSampler.execute(
        make_pair(pack, node(ref), node(aligned)), SEED, STEPS, 4.0, "euler", "normal", sd3["pos"], sd3["neg"],
        sd3["latent"], 1.0, **{"lambda": 0.5}).result[0]["samples"]
    close(sample3(sd3, node(realign(pack, pair, 0.5))), want_half)


def test_a_node_that_takes_over_the_slot_is_named(sd3, pack, caplog):
    realigned = realign(pack, make_pair(pack, sd3["ref"], sd3["aligned"]), 0.5)
    with caplog.at_level(logging.WARNING, logger="DeRaDiff"):
        sample3(sd3, slg_simple(realigned))
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "SkipLayerGuidanceDiTSimple" in text and "Realign Model" in text


def test_a_sampler_that_bypasses_calc_cond_batch_is_reported(sd15, pack, caplog):
    """A node replacing the slot with a function that never calls calc_cond_batch (here: the
    reference's own apply_model) would sample the reference alone: say so."""
    realigned = realign(pack, make_pair(pack, sd15["ref"], sd15["aligned"]["separate"]), 0.5)
    bypass = realigned.clone()

    def reference_only(args):
        model, x, sigma = args["model"], args["input"], args["sigma"]
        return [None if c is None else
                model.apply_model(x, sigma, c_crossattn=c[0]["model_conds"]["c_crossattn"].cond.to(x))
                for c in args["conds"]]

    bypass.set_model_sampler_calc_cond_batch_function(reference_only)
    with caplog.at_level(logging.WARNING, logger="DeRaDiff"):
        sample15(sd15, bypass)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "no model evaluation of this run reached DeRaDiff" in text


# -- conditioning hooks (issue 20, item 2) --------------------------------------------------
def hooked(cond, hooks):
    from comfy_extras.nodes_hooks import ConditioningSetProperties
    return ConditioningSetProperties().set_properties(cond, 1.0, "default", hooks=hooks)[0]


@pytest.fixture(scope="module")
def hook_conds(sd15, comfy):
    from comfy_extras.nodes_hooks import CreateHookLora
    hooks = CreateHookLora().create_hook("sd15_aligned_lora.safetensors", 0.8, 0.0)[0]
    return hooked(sd15["pos"], hooks), hooked(sd15["neg"], hooks)


def sample_hooked(s, model, conds):
    return ksampler(model, s["latent"], conds[0], conds[1], seed=SEED, steps=STEPS, cfg=CFG)


@pytest.mark.parametrize("kind", ["separate", "shared"])
@pytest.mark.parametrize("path", ["DeRaDiffKSampler", "RealignModel"])
def test_conditioning_hooks_reach_both_models(sd15, pack, hook_conds, kind, path):
    """Create Hook LoRA -> Cond Set Props on positive and negative: λ=1 is KSampler on the aligned
    model with the hooked conds (not with plain ones), λ=0 KSampler on the reference with them."""
    ref, aligned = sd15["ref"], sd15["aligned"][kind]
    pair = make_pair(pack, ref, aligned)

    def run(lam):
        if path == "RealignModel":
            return sample_hooked(sd15, realign(pack, pair, lam), hook_conds)
        return pack.nodes.DeRaDiffKSampler.execute(
            pair, SEED, STEPS, CFG, "euler", "normal", hook_conds[0], hook_conds[1], sd15["latent"], 1.0,
            **{"lambda": lam}).result[0]["samples"]

    before = sample15(sd15, aligned)
    want_aligned = sample_hooked(sd15, aligned, hook_conds)
    assert far(want_aligned, before)  # the hook really changes the aligned model's output
    close(run(1.0), want_aligned)
    close(run(0.0), sample_hooked(sd15, ref, hook_conds))
    # and the hooks leave nothing behind: the aligned model samples as before afterwards
    torch.testing.assert_close(sample15(sd15, aligned), before, rtol=0, atol=0)


# -- MultiGPU (issue 20, item 3) ----------------------------------------------------------------
def with_multigpu_clone(model):
    """What ComfyUI 0.3x's MultiGPU node does, through the same public calls, with the extra "device"
    being this CPU again: a fresh deep clone of the model becomes its "multigpu" additional model, and
    the sampler then sends the reference's evaluations to that clone (model_options["multigpu_clones"]).
    The clone is a copy of the reference alone: an evaluation of the aligned model that reached it
    would come out as the reference's."""
    m = model.clone()
    clone = m.deepclone_multigpu(new_load_device=m.load_device)
    clone.is_multigpu_base_clone = True
    m.set_additional_models("multigpu", [clone])
    m.match_multigpu_clones()
    return m


@pytest.mark.parametrize("kind", ["separate", "shared"])
def test_multigpu_clones_never_run_the_aligned_evaluations(sd15, pack, kind):
    import comfy.model_patcher
    if not hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu"):
        pytest.skip("this ComfyUI has no MultiGPU (0.3.75)")
    import nodes
    ref = with_multigpu_clone(sd15["ref"])
    if kind == "shared":
        aligned = nodes.LoraLoaderModelOnly().load_lora_model_only(ref, "sd15_aligned_lora.safetensors", 1.0)[0]
    else:
        aligned = sd15["aligned"]["separate"]
    pair = make_pair(pack, ref, aligned)
    want = {lam: pack.nodes.DeRaDiffKSampler.execute(
        make_pair(pack, sd15["ref"], sd15["aligned"][kind]), SEED, STEPS, CFG, "euler", "normal", sd15["pos"],
        sd15["neg"], sd15["latent"], 1.0, **{"lambda": lam}).result[0]["samples"] for lam in (0.5, 1.0)}
    for lam in (0.5, 1.0):
        close(sample15(sd15, realign(pack, pair, lam)), want[lam])
        got = pack.nodes.DeRaDiffKSampler.execute(pair, SEED, STEPS, CFG, "euler", "normal", sd15["pos"], sd15["neg"],
                                                   sd15["latent"], 1.0, **{"lambda": lam}).result[0]["samples"]
        close(got, want[lam])
