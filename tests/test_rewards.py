"""Reward models (sampler/rewards.py) offline, with tiny randomly initialised transformers CLIP models
the test writes itself (same files and loading path as the real PickScore / CLIP / LAION folders).
The scores are checked against CLIPModel's own forward pass, an independent path."""
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "deradiff_rewards", Path(__file__).resolve().parent.parent / "sampler" / "rewards.py")
rewards = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rewards
_spec.loader.exec_module(rewards)

from standins import CLIP_PROJECTION as PROJECTION, write_aesthetic_head, write_clip_folder  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(comfy_root):
    return Path(comfy_root) / "comfy" / "sd1_tokenizer"


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, tokenizer_dir):
    return write_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip", tokenizer_dir)


def images(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 48, 40, 3, generator=g)  # not square: the processor resizes and crops


def reference_logits(folder, imgs, prompts):
    """CLIPModel's forward pass: logit_scale.exp() · cos, per (image, text) pair."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    model = CLIPModel.from_pretrained(folder).eval()
    proc_dir = folder / "processor" if (folder / "processor").is_dir() else folder
    proc = CLIPImageProcessor.from_pretrained(proc_dir)
    tok = AutoTokenizer.from_pretrained(proc_dir)
    pixels = [(im.numpy() * 255 + 0.5).clip(0, 255).astype("uint8") for im in imgs]
    t = tok(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                    pixel_values=proc(images=pixels, return_tensors="pt")["pixel_values"])
    return out.logits_per_image, float(model.logit_scale.detach().exp()), out.image_embeds


PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of fruit"]


def test_pickscore_and_clip_score_match_clipmodel_forward(clip_folder):
    imgs = images()
    logits, scale, _ = reference_logits(clip_folder, imgs, PROMPTS)
    pick = rewards.load_reward_model("pickscore", str(clip_folder)).score(imgs, PROMPTS)
    torch.testing.assert_close(pick, logits.diagonal().float(), rtol=1e-4, atol=1e-4)
    clip = rewards.load_reward_model("clip_score", str(clip_folder)).score(imgs, PROMPTS)
    torch.testing.assert_close(clip, 100 * logits.diagonal().float() / scale, rtol=1e-4, atol=1e-3)
    # the prompt matters: another prompt gives other scores
    other = rewards.load_reward_model("clip_score", str(clip_folder)).score(imgs, PROMPTS[::-1])
    assert not torch.allclose(other, clip)


def test_processor_files_in_a_subfolder(tmp_path, tokenizer_dir):
    folder = write_clip_folder(tmp_path / "PickScore_v1", tokenizer_dir, processor_subfolder=True)
    imgs = images(2)
    logits, _, _ = reference_logits(folder, imgs, PROMPTS[:2])
    torch.testing.assert_close(rewards.PickScore(str(folder)).score(imgs, PROMPTS[:2]), logits.diagonal().float(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_laion_aesthetic_is_the_mlp_on_normalised_clip_image_embeddings(clip_folder, tmp_path, suffix):
    head_path = tmp_path / f"aesthetic{suffix}"
    state = write_aesthetic_head(head_path)
    imgs = images()
    _, _, image_embeds = reference_logits(clip_folder, imgs, PROMPTS)  # already L2-normalised
    x = image_embeds.float()
    for i, layer in enumerate(("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")):
        x = x @ state[f"{layer}.weight"].T + state[f"{layer}.bias"]  # no activations: the original MLP
    got = rewards.load_reward_model("laion_aesthetic", str(clip_folder), str(head_path)).score(imgs)
    torch.testing.assert_close(got, x[:, 0], rtol=1e-4, atol=1e-4)


def test_transformers_4_and_5_feature_outputs():
    t = torch.randn(2, 4)
    assert rewards._features(t) is t  # transformers 4.x: the tensor itself

    class Output:  # 5.x: an output object with the projected embeddings as pooler_output
        pooler_output = t
    assert rewards._features(Output()) is t


def test_wrong_or_incomplete_folders_name_the_file(clip_folder, tmp_path, tokenizer_dir):
    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(clip_folder, folder)
        change(folder)
        return folder

    cases = {
        "no_config": (lambda f: (f / "config.json").unlink(), "config.json"),
        "no_weights": (lambda f: (f / "model.safetensors").unlink(), "no weights file"),
        "no_processor": (lambda f: (f / "preprocessor_config.json").unlink(), "preprocessor_config.json"),
        "no_tokenizer": (lambda f: [(f / n).unlink() for n in ("vocab.json", "tokenizer.json") if (f / n).exists()],
                         "no tokenizer files"),
        "truncated": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
                      "not a loadable transformers CLIP model"),
    }
    for name, (change, expected) in cases.items():
        folder = broken(name, change)
        with pytest.raises(rewards.RewardModelError, match=expected) as e:
            rewards.load_reward_model("clip_score", str(folder))
        assert str(folder) in str(e.value)
    with pytest.raises(rewards.RewardModelError, match="no such folder"):
        rewards.load_reward_model("pickscore", str(tmp_path / "nowhere"))

    head = tmp_path / "bad_head.safetensors"
    write_aesthetic_head(head, drop="layers.4.weight")
    with pytest.raises(rewards.RewardModelError, match="layers.4.weight") as e:
        rewards.load_reward_model("laion_aesthetic", str(clip_folder), str(head))
    assert str(head) in str(e.value)
    wide = tmp_path / "wide_head.safetensors"
    write_aesthetic_head(wide, width=768)
    with pytest.raises(rewards.RewardModelError, match="768-wide"):
        rewards.load_reward_model("laion_aesthetic", str(clip_folder), str(wide))
    with pytest.raises(rewards.RewardModelError, match="MLP head"):
        rewards.load_reward_model("laion_aesthetic", str(clip_folder), None)
    with pytest.raises(ValueError, match="prompts for"):
        rewards.ClipScore(str(clip_folder)).score(images(2), ["one prompt"])
