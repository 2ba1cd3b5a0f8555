"""Aligned models as LoRA, diffusers UNet (file, folder, shards) or fp32 files, in a real ComfyUI."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from comfy_helpers import assert_bit_identical, count_unet_calls, empty_latent, encode, ksampler, load_checkpoint

# The stand-ins run in fp32 on a CPU; the bound covers fp16 rounding of the on-the-fly update
# (relative to the largest latent value) so the same test holds on an fp16 GPU.
FP16_TOL = dict(rtol=2e-3, atol=0)


@pytest.fixture(scope="module")
def sd15(comfy, pack):
    ref, clip, vae = load_checkpoint("sd15_reference.safetensors")
    return dict(ref=ref, clip=clip, pos=encode(clip, "a red fox"), neg=encode(clip, "blurry"), latent=empty_latent())


def realign(pack, pair, lam, s, sampler="euler", steps=3):
    return pack.nodes.DeRaDiffKSampler.execute(pair, 5, steps, 5.0, sampler, "normal", s["pos"], s["neg"], s["latent"],
                                                1.0, **{"lambda": lam}).result[0]["samples"]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=FP16_TOL["rtol"], atol=FP16_TOL["rtol"] * float(b.abs().max()))


def merged_separate_copy(clip, strength=1.0):
    """The same LoRA merged into an independent full model (its own BaseModel)."""
    import comfy.sd
    import folder_paths
    import nodes
    independent = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path("checkpoints", "sd15_reference.safetensors"), output_vae=False, output_clip=False)[0]
    return nodes.LoraLoader().load_lora(independent, clip, "sd15_aligned_lora.safetensors", strength, 0.0)[0]


def test_lora_pair_shares_the_reference_weights_and_matches_a_merged_copy(comfy, sd15, pack, caplog):
    import comfy.model_management as mm
    with caplog.at_level(logging.INFO):
        pair, _, _ = pack.nodes.DeRaDiffLoadAlignedPair.execute("sd15_reference.safetensors",
                                                                "loras/sd15_aligned_lora.safetensors", 0.0, 0.8)
        side = pair.aligned_side()
    assert side.shared is not None and side.patcher is None
    assert "share the reference's weights" in caplog.text
    merged = pack.nodes.DeRaDiffMakePair.execute(pair.reference, merged_separate_copy(sd15["clip"], 0.8))[0]
    assert merged.aligned_side().shared is None  # two real models
    for lam in (0.0, 0.5, 1.0, 1.5):
        mm.unload_all_models()
        with count_unet_calls(pair.reference) as calls:
            got = realign(pack, pair, lam, sd15)
        resident = [lm.model.model for lm in mm.current_loaded_models if lm.model is not None]
        assert resident == [pair.reference.model]  # one UNet in memory, nothing else loaded
        assert calls[0] == 3  # λ 0/1: one model; otherwise both models in one fused call per step
        want = realign(pack, merged, lam, sd15)
        close(got, want)
        if lam > 0:
            assert not torch.allclose(got, realign(pack, merged, 0.0, sd15))
    # the on-the-fly update is gone after sampling: the reference alone is unchanged
    mm.unload_all_models()
    assert_bit_identical(realign(pack, pair, 0.0, sd15), ksampler(pair.reference, sd15["latent"], sd15["pos"],
                                                                 sd15["neg"], seed=5, steps=3))


def test_make_pair_from_loraloader_takes_the_shared_path(comfy, sd15, pack):
    import nodes
    lora = nodes.LoraLoader().load_lora(sd15["ref"], sd15["clip"], "sd15_aligned_lora.safetensors", 1.0, 1.0)[0]
    pair = pack.nodes.DeRaDiffMakePair.execute(sd15["ref"], lora)[0]
    assert pair.aligned_side().shared is not None
    close(realign(pack, pair, 0.5, sd15), realign(pack, pack.nodes.DeRaDiffMakePair.execute(
        sd15["ref"], merged_separate_copy(sd15["clip"]))[0], 0.5, sd15))
    # the realigned MODEL takes the same path
    model = pack.nodes.DeRaDiffRealignModel.execute(pair, **{"lambda": 0.5})[0]
    close(ksampler(model, sd15["latent"], sd15["pos"], sd15["neg"], seed=5, steps=3), realign(pack, pair, 0.5, sd15))


def test_loras_that_do_not_fit_are_refused_with_file_and_reason(comfy, pack, tmp_path):
    import comfy.utils
    import folder_paths
    from safetensors.torch import save_file
    loader = pack.nodes.DeRaDiffLoadAlignedPair()
    Error = pack.nodes.common.NodeInputError
    with pytest.raises(Error) as e:  # names that partly coincide, as SDXL and SD1.5 LoRAs do
        loader.execute("sd15_reference.safetensors", "loras/sdxl_aligned_lora.safetensors")
    msg = str(e.value)
    assert "input 'aligned_model'" in msg and "sdxl_aligned_lora.safetensors" in msg and "another model family" in msg
    sd15_lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", "sd15_aligned_lora.safetensors"))
    alien = {k.replace("lora_unet_", "lora_transformer_joint_"): v for k, v in sd15_lora.items()}
    misshaped = {k: (v[:7] if k.endswith("lora_up.weight") else v) for k, v in sd15_lora.items()}
    save_file(alien, tmp_path / "alien_lora.safetensors")
    save_file(misshaped, tmp_path / "misshaped_lora.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    with pytest.raises(Error, match=r"alien_lora.safetensors' matches none of the reference's layers"):
        loader.execute("sd15_reference.safetensors", "loras/alien_lora.safetensors")
    with pytest.raises(Error, match=r"misshaped_lora.safetensors' names layers .* but none of its \d+ updates fits"):
        loader.execute("sd15_reference.safetensors", "loras/misshaped_lora.safetensors")


def test_fp32_unet_is_loaded_at_the_reference_dtype(comfy, pack):
    import comfy.sd
    import folder_paths
    from safetensors import safe_open
    path = folder_paths.get_full_path("diffusion_models", "sd15_aligned_unet_fp32.safetensors")
    with safe_open(path, "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float32
    reference = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path("checkpoints", "sd15_reference.safetensors"), output_vae=False, output_clip=False,
        model_options={"dtype": torch.bfloat16})[0]
    assert reference.model_dtype() == torch.bfloat16
    node = pack.nodes.DeRaDiffLoadAlignedPair()
    aligned = node._load_aligned("diffusion_models/sd15_aligned_unet_fp32.safetensors", reference)
    assert aligned.model_dtype() == torch.bfloat16


def test_diffusers_folder_and_shards_and_other_family(comfy, sd15, pack, tmp_path):
    import comfy.utils
    import folder_paths
    from conftest import ensure_standin
    from safetensors.torch import save_file
    single = ensure_standin("diffusion_models/sd15_aligned_diffusers_unet.safetensors")
    root = tmp_path / "diffusion_models"
    (root / "dpo-sd15" / "unet").mkdir(parents=True)
    os.symlink(single, root / "dpo-sd15" / "unet" / "diffusion_pytorch_model.safetensors")
    sd = comfy.utils.load_torch_file(str(single))
    keys = sorted(sd)
    (root / "sharded").mkdir()
    save_file({k: sd[k] for k in keys[::2]}, root / "sharded" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[1::2]}, root / "sharded" / "diffusion_pytorch_model-00002-of-00002.safetensors")
    del sd
    folder_paths.add_model_folder_path("diffusion_models", str(root))
    choices = pack.nodes.pair_nodes.aligned_model_choices()
    assert "diffusion_models/dpo-sd15/unet/" in choices and "diffusion_models/sharded/" in choices
    import gc
    import comfy.model_management as mm
    import comfy_helpers

    def release():  # full-size UNets are 3.4 GB each in fp32: hold one at a time
        comfy_helpers.load_unet.cache_clear()
        mm.unload_all_models()
        gc.collect()

    release()
    loader = pack.nodes.DeRaDiffLoadAlignedPair()
    from_file = loader.execute("sd15_reference.safetensors", "diffusion_models/sd15_aligned_diffusers_unet.safetensors")[0]
    want = realign(pack, from_file, 1.0, sd15, steps=1)
    del from_file
    release()
    for choice in ("diffusion_models/dpo-sd15/unet/", "diffusion_models/sharded/"):
        pair = loader.execute("sd15_reference.safetensors", choice)[0]
        assert_bit_identical(realign(pack, pair, 1.0, sd15, steps=1), want)
        del pair
        release()
    with pytest.raises(pack.nodes.common.NodeInputError) as e:
        loader.execute("sdxl_reference.safetensors", "diffusion_models/dpo-sd15/unet/")
    msg = str(e.value)
    assert "dpo-sd15/unet/" in msg and "different model families" in msg and "SD15" in msg


def test_weight_difference_file_uses_the_weight_space_path(comfy, sd15, pack, tmp_path):
    """A "diff" (full weight difference) file cannot be applied in activation space; it goes
    through ComfyUI's on-the-fly weight patch and still matches the merged copy."""
    import comfy.sd
    import folder_paths
    import nodes
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(9)
    diff = {}
    for key, w in sd15["ref"].model.state_dict().items():
        if key.startswith("diffusion_model.") and key.endswith(".weight") and (".attn2.to_k" in key or "proj_in" in key):
            diff[key[:-len(".weight")] + ".diff"] = torch.randn(w.shape, generator=g) * 0.05
    assert diff
    save_file(diff, tmp_path / "dpo_difference.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    pair = pack.nodes.DeRaDiffLoadAlignedPair.execute("sd15_reference.safetensors", "loras/dpo_difference.safetensors")[0]
    side = pair.aligned_side()
    assert side.shared is not None and len(side.shared.weight_patches) == len(diff) and not side.shared.low_rank
    independent = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path("checkpoints", "sd15_reference.safetensors"), output_vae=False, output_clip=False)[0]
    merged = nodes.LoraLoader().load_lora(independent, sd15["clip"], "dpo_difference.safetensors", 1.0, 0.0)[0]
    merged_pair = pack.nodes.DeRaDiffMakePair.execute(pair.reference, merged)[0]
    for lam in (0.5, 1.5):
        close(realign(pack, pair, lam, sd15), realign(pack, merged_pair, lam, sd15))


@pytest.mark.parametrize("path", ["ksampler", "realign_model"])
def test_lora_factors_are_cached_during_a_run_and_dropped_by_its_cleanup(comfy, sd15, pack, monkeypatch, path):
    """The LoRA hooks keep device copies of their factors only while a run of the guider (or of the
    Realign Model's MODEL) lasts: the patcher's ON_CLEANUP callback drops them; outside a run
    ``with delta:`` caches nothing."""
    import nodes
    pair, _, _ = pack.nodes.DeRaDiffLoadAlignedPair.execute("sd15_reference.safetensors",
                                                            "loras/sd15_aligned_lora.safetensors", 0.0, 0.8)
    shared = pair.aligned_side().shared
    assert shared is not None and shared.low_rank
    seen = []
    exit_ = type(shared).__exit__

    def recording_exit(self, *exc):
        seen.append(self.cached_tensors())
        return exit_(self, *exc)
    monkeypatch.setattr(type(shared), "__exit__", recording_exit)
    if path == "ksampler":
        realign(pack, pair, 0.5, sd15)
    else:
        model = pack.nodes.DeRaDiffRealignModel.execute(pair, **{"lambda": 0.5})[0]
        nodes.KSampler().sample(model, 5, 3, 5.0, "euler", "normal", sd15["pos"], sd15["neg"], sd15["latent"])
    assert seen and max(seen) > 0, seen  # cached while the run lasted
    assert shared.cached_tensors() == 0  # dropped by the run's cleanup
    seen.clear()
    x = torch.zeros(1, 4, 8, 8)
    with shared:  # outside a run: nothing is kept
        pair.reference.model.diffusion_model(x, torch.tensor([1.0]), context=torch.zeros(1, 77, 768))
    assert seen == [0]
