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
        # first in the search order: test_tiny_family.py registers a tiny-config family under the same names
        folder_paths.add_model_folder_path(folder, str(tf.MODELS_DIR / folder), is_default=True)
    found = Path(folder_paths.get_full_path("checkpoints", tf.CHECKPOINT_NAME)).resolve()
    assert found.is_relative_to(tf.MODELS_DIR.resolve()), found
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
        outs.append(vae.decode(lat).detach())
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
    """Point 5 of issue 21: over a fixed batch the mean reward rises from λ = 0 to 1 to 2, each step by more than
    its standard error (paired: every λ starts from the same noise, so the SE is that of the per-image change).
    The anchor is the family's highest β, whose λ = 2 emulates the next β down."""
    import nodes
    from comfy_helpers import encode
    anchor = max(x["beta"] for x in family["loras"])
    pair, clip, vae = pack.nodes.DeRaDiffLoadAlignedPair.execute(
        tf.CHECKPOINT_NAME, f"loras/{tf.SUBFOLDER}/dpo_beta{anchor:g}.safetensors", anchor)
    prompts = ["a large red circle at the top left on a black background", "a small white square in the middle on a grey background",
               "a large blue triangle at the bottom on a white background", "a small green cross at the right on a black background"]
    sampler = pack.NODE_CLASS_MAPPINGS["DeRaDiffKSampler"]()
    scores = []
    for lam in (0.0, 1.0, 2.0):
        per_prompt = []
        for p in prompts:
            latent = nodes.EmptyLatentImage().generate(32, 32, 8)[0]
            out = sampler.execute(pair, 7, 20, 4.0, "euler", "normal", encode(clip, p), encode(clip, ""), latent,
                                  **{"lambda": lam})
            lat = out.result[0]["samples"]
            img = vae.decode(lat).detach().permute(0, 3, 1, 2).float()
            per_prompt.append(tf.colourfulness(img))
        scores.append(torch.cat(per_prompt))
    means = [float(s.mean()) for s in scores]
    for lo, hi in zip(scores, scores[1:]):
        d = hi - lo
        assert float(d.mean()) > float(d.std() / math.sqrt(len(d))), (means, float(d.mean()), float(d.std()))


def test_main_job_writes_a_labelled_lambda_grid_of_real_images(tf, family, comfy_root, tmp_path):
    """Point 4 of issue 21: `python scripts/run_deradiff.py` without model arguments draws the family's λ grid
    through the ComfyUI server, one labelled row per λ, and the printed reward rises with λ."""
    import os
    import re
    import subprocess
    import sys
    from PIL import Image
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "scripts/run_deradiff.py", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, DERADIFF_COMFYUI=str(comfy_root)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = re.findall(r"^([\d.]+)\s+(\S+(?: \(ref\))?)\s+([\d.]+) ± ([\d.]+)$", proc.stdout, re.M)
    assert [float(r[0]) for r in rows] == [0.0, 0.5, 1.0, 2.0, 4.0], proc.stdout
    reward = {float(lam): (float(m), float(se)) for lam, _, m, se in rows}
    (m0, se0), (m2, se2) = reward[0.0], reward[2.0]
    assert m2 - m0 > 2 * math.hypot(se0, se2), reward
    grid = Image.open(out)
    # 4 seeds of 32 px ×4 wide; 5 rows of 128 px plus a label strip each
    assert grid.width == 4 * 128 and grid.height > 5 * 128, grid.size
    cells = torch.from_numpy(__import__("numpy").asarray(grid.convert("RGB"))).float()
    assert float(cells.std()) > 10  # pictures, not a flat image
