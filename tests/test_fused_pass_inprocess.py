"""One fused model call for a reference + LoRA pair (shared weights) in a real ComfyUI."""
from __future__ import annotations

import logging

import pytest
import torch

from comfy_helpers import assert_bit_identical, count_unet_calls, empty_latent, encode, ksampler, load_checkpoint

STEPS = 4


@pytest.fixture(scope="module")
def sd15(comfy, pack):
    import nodes
    ref, clip, _vae = load_checkpoint("sd15_reference.safetensors")
    lora = nodes.LoraLoader().load_lora(ref, clip, "sd15_aligned_lora.safetensors", 1.0, 0.0)[0]
    return dict(ref=ref, lora=lora, clip=clip, pos=encode(clip, "a sailing boat"), neg=encode(clip, "blurry"),
                latent=empty_latent(64, 64, batch=2), pack=pack)


def run(s, reference, aligned, lam, sampler="euler", every=1, latent=None):
    pair = s["pack"].nodes.DeRaDiffMakePair.execute(reference, aligned, 0.0)[0]
    out = s["pack"].nodes.DeRaDiffKSampler.execute(pair, 3, STEPS, 5.0, sampler, "normal", s["pos"], s["neg"],
                                                   latent or s["latent"], 1.0,
                                                   **{"lambda": lam, "full_pass_every": every})
    return out.result[0]["samples"]


def two_passes(monkeypatch):
    from comfyui_deradiff.sampler import guider as guider_mod
    monkeypatch.setattr(guider_mod, "can_fuse", lambda pair, side: False)


@pytest.mark.parametrize("lam,sampler", [(0.5, "euler"), (1.5, "dpmpp_2m_sde"), (0.25, "euler_ancestral")])
def test_fused_pass_equals_two_passes_with_one_model_call_per_evaluation(sd15, monkeypatch, lam, sampler):
    with count_unet_calls(sd15["ref"]) as fused_calls:
        fused = run(sd15, sd15["ref"], sd15["lora"], lam, sampler)
    with monkeypatch.context() as m:
        two_passes(m)
        with count_unet_calls(sd15["ref"]) as separate_calls:
            separate = run(sd15, sd15["ref"], sd15["lora"], lam, sampler)
    assert fused_calls[0] == STEPS and separate_calls[0] == 2 * STEPS
    # batch of 4 vs 2 rows: matmuls may round differently; stated tolerance 1e-5 of the range
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5 * float(separate.abs().max()))
    assert not torch.equal(run(sd15, sd15["ref"], sd15["lora"], 0.0), fused)


def test_fused_pass_works_with_difference_reuse(sd15, monkeypatch):
    fused = run(sd15, sd15["ref"], sd15["lora"], 0.6, every=2)
    two_passes(monkeypatch)
    separate = run(sd15, sd15["ref"], sd15["lora"], 0.6, every=2)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5 * float(separate.abs().max()))


def test_a_layer_that_does_not_keep_the_batch_falls_back_to_two_passes(sd15, monkeypatch, caplog):
    """If any LoRA layer sees a first dimension other than the model's batch, its rows cannot be
    told apart: the evaluation is redone as two passes and the run continues unfused."""
    from comfyui_deradiff.sampler import shared_weights
    expected = None
    with monkeypatch.context() as m:
        two_passes(m)
        expected = run(sd15, sd15["ref"], sd15["lora"], 0.5)
    monkeypatch.setattr(shared_weights.SharedWeightDelta, "_remember_batch",
                        lambda self, module, args, kwargs: setattr(self, "_batch", -1))
    with caplog.at_level(logging.INFO), count_unet_calls(sd15["ref"]) as calls:
        got = run(sd15, sd15["ref"], sd15["lora"], 0.5)
    assert "two passes for the rest of this run" in caplog.text
    assert calls[0] == 1 + 2 * STEPS  # the one failed fused call, then two passes per step
    assert_bit_identical(got, expected)


def test_pairs_that_cannot_fuse_run_two_passes(sd15, comfy):
    import nodes
    import comfy_extras.nodes_freelunch as freelunch
    freeu_ref = freelunch.FreeU().patch(sd15["ref"], 1.1, 1.2, 0.9, 0.2)[0]
    with count_unet_calls(sd15["ref"]) as calls:
        run(sd15, freeu_ref, sd15["lora"], 0.5)  # the reference has a patch the aligned MODEL lacks
    assert calls[0] == 2 * STEPS
    half = nodes.LoraLoader().load_lora(sd15["ref"], sd15["clip"], "sd15_aligned_lora.safetensors", 0.5, 0.0)[0]
    with count_unet_calls(sd15["ref"]) as calls:
        run(sd15, sd15["ref"], half, 0.5)  # strength 0.5 is still a plain LoRA: fused
    assert calls[0] == STEPS


def test_fused_lora_pair_matches_a_separately_merged_copy(sd15, comfy):
    import comfy.sd
    import folder_paths
    import nodes
    independent = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path("checkpoints", "sd15_reference.safetensors"), output_vae=False, output_clip=False)[0]
    merged = nodes.LoraLoader().load_lora(independent, sd15["clip"], "sd15_aligned_lora.safetensors", 1.0, 0.0)[0]
    for lam in (0.5, 2.0):
        want = run(sd15, sd15["ref"], merged, lam)
        got = run(sd15, sd15["ref"], sd15["lora"], lam)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # the reference alone is untouched afterwards
    before = ksampler(independent, sd15["latent"], sd15["pos"], sd15["neg"])
    assert_bit_identical(ksampler(sd15["ref"], sd15["latent"], sd15["pos"], sd15["neg"]), before)


@pytest.mark.parametrize("every", [1, 2])
def test_realign_model_fuses_the_lora_pair_too(sd15, monkeypatch, every):
    pair = sd15["pack"].nodes.DeRaDiffMakePair.execute(sd15["ref"], sd15["lora"], 0.0)[0]

    def sample():
        model = sd15["pack"].nodes.DeRaDiffRealignModel.execute(pair, **{"lambda": 0.7, "full_pass_every": every})[0]
        return ksampler(model, sd15["latent"], sd15["pos"], sd15["neg"], seed=3, steps=STEPS, sampler="euler_ancestral")

    with count_unet_calls(sd15["ref"]) as fused_calls:
        fused = sample()
    from comfyui_deradiff.sampler import realign_model
    monkeypatch.setattr(realign_model, "can_fuse", lambda pair, side: False)
    with count_unet_calls(sd15["ref"]) as separate_calls:
        separate = sample()
    # every=2 with 4 steps: steps 0 and 2 run both models, steps 1 and 3 one model
    assert fused_calls[0] == STEPS and separate_calls[0] == (2 * STEPS if every == 1 else STEPS + 2)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5 * float(separate.abs().max()))
