"""The committed tiny family (tiny_family/, built by `python scripts/tiny_family.py build`): its size, that
ComfyUI loads it as SD1.5, that prompts steer the images, that its reward rises as β falls, and that
DeRaDiff's λ moves the reward the same way. Skipped while no family is committed."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
FAMILY = REPO / "tiny_family"
pytestmark = pytest.mark.skipif(not (FAMILY / "family.json").exists(), reason="no committed tiny family yet")


@pytest.fixture(scope="module")
def tf(comfy):
    import tiny_family
    return tiny_family


@pytest.fixture(scope="module")
def family(tf):
    """The manifest, with the ComfyUI model files materialized and their folders registered."""
    import folder_paths
    tf.materialize(tf.FAMILY_DIR, tf.MODELS_DIR)
    for folder in ("checkpoints", "loras", "diffusion_models"):
        folder_paths.add_model_folder_path(folder, str(tf.MODELS_DIR / folder))
    return tf.load_manifest()


def test_size_and_hashes(tf, family):
    files = [p for p in FAMILY.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 80e6
    for name, digest in family["sha256"].items():
        assert tf.sha256(FAMILY / name) == digest, name
    betas = [x["beta"] for x in family["loras"]]
    assert len(betas) >= 5 and max(betas) / min(betas) >= 16


def test_loads_as_sd15(tf, family):
    import comfy.supported_models
    from comfy_helpers import load_checkpoint
    model, clip, vae = load_checkpoint(tf.CHECKPOINT_NAME)
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert type(vae.first_stage_model).__name__ == "TAESD"


def sample(tf, model, clip, vae, prompts, seed=1, steps=20, cfg=4.0):
    import nodes
    from comfy_helpers import encode, ksampler
    outs = []
    for p in prompts:
        latent = nodes.EmptyLatentImage().generate(32, 32, 4)[0]
        lat = ksampler(model, latent, encode(clip, p), encode(clip, ""), seed=seed, steps=steps, cfg=cfg)
        outs.append(vae.decode(lat))
    return torch.cat(outs)  # [n, H, W, 3]


def test_prompts_steer_the_images(tf, family):
    """Through ComfyUI's KSampler: the colour the prompt names is the colour drawn."""
    from comfy_helpers import load_checkpoint
    model, clip, vae = load_checkpoint(tf.CHECKPOINT_NAME)
    colours = ["red", "green", "blue", "yellow"]
    prompts = [f"a large {c} circle in the middle on a black background" for c in colours]
    images = sample(tf, model, clip, vae, prompts).permute(0, 3, 1, 2).float().numpy()
    wanted = [c for c in colours for _ in range(4)]
    assert tf.colour_adherence(images, wanted) >= 0.75


def test_reward_rises_as_beta_falls(family):
    rows = family["results"]["rows"]
    ref = rows[0]
    assert ref["beta"] is None
    by_beta = sorted(rows[1:], key=lambda r: r["beta"])
    low, high = by_beta[0], by_beta[-1]
    assert low["reward_mean"] > high["reward_mean"] + 2 * math.hypot(low["reward_se"], high["reward_se"])
    assert low["reward_mean"] > ref["reward_mean"]


def test_deradiff_lambda_moves_the_reward(tf, family, pack):
    """Point 5 of issue 21: over a fixed batch the mean reward rises from λ = 0 to 1 to 2."""
    import nodes
    from comfy_helpers import encode
    anchor = sorted(x["beta"] for x in family["loras"])[len(family["loras"]) // 2]
    pair, clip, vae = pack.nodes.DeRaDiffLoadAlignedPair().load(
        tf.CHECKPOINT_NAME, f"loras/{tf.SUBFOLDER}/dpo_beta{anchor:g}.safetensors", anchor)
    prompts = ["a large red circle at the top left on a black background", "a small white square in the middle on a grey background",
               "a large blue triangle at the bottom on a white background", "a small green cross at the right on a black background"]
    sampler = pack.NODE_CLASS_MAPPINGS["DeRaDiffKSampler"]()
    means = []
    for lam in (0.0, 1.0, 2.0):
        scores = []
        for p in prompts:
            latent = nodes.EmptyLatentImage().generate(32, 32, 8)[0]
            out = sampler.sample(pair, 7, 20, 4.0, "euler", "normal", encode(clip, p), encode(clip, ""), latent,
                                 **{"lambda": lam})
            lat = (out["result"] if isinstance(out, dict) else out)[0]["samples"]
            img = vae.decode(lat).permute(0, 3, 1, 2).float()
            scores.append(tf.colourfulness(img))
        s = torch.cat(scores)
        means.append((float(s.mean()), float(s.std() / math.sqrt(len(s)))))
    for (m0, se0), (m1, se1) in zip(means, means[1:]):
        assert m1 - m0 > math.hypot(se0, se1), means
