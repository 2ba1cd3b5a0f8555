"""The tiny trained family (scripts/tiny_family.py): its build code in a seconds-long configuration with
the real model shapes, the generated text encoder, the ComfyUI files it materializes (loaded by ComfyUI's
own CheckpointLoaderSimple / LoraLoader / VAE / CLIPTextEncode and compared with the build's own
networks), the reward kind, and the `info` / `score` commands. The committed family, when present, is
checked in tests/test_tiny_family_real.py."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "tiny_family.py"


@pytest.fixture(scope="module")
def tf(comfy):
    import tiny_family
    return tiny_family


@pytest.fixture(scope="module")
def tiny(tf, tmp_path_factory):
    """A whole tiny build: (Build, family folder, manifest)."""
    root = tmp_path_factory.mktemp("tiny_family")
    build = tf.Build(tf.Config.tiny(), root / "cache", log=lambda s: None)
    manifest = build.run(root / "family")
    return build, root / "family", manifest


@pytest.fixture(scope="module")
def materialized(tf, tiny, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    paths = tf.materialize(tiny[1], models)
    import folder_paths
    for folder in ("checkpoints", "loras", "diffusion_models"):
        folder_paths.add_model_folder_path(folder, str(models / folder), is_default=True)
    return models, paths


# -- the build ---------------------------------------------------------------------------------------
def test_tiny_build_writes_the_family(tf, tiny):
    build, family, manifest = tiny
    cfg = build.cfg
    assert json.loads((family / "family.json").read_text()) == manifest
    for name in ["unet_reference.safetensors", "vae_taesd.safetensors", "reward/config.json",
                 "reward/model.safetensors", "grid.png"] + [x["file"] for x in manifest["loras"]]:
        assert (family / name).is_file(), name
        assert manifest["sha256"][name] == tf.sha256(family / name)
    assert [x["beta"] for x in manifest["loras"]] == sorted(cfg.betas)
    rows = manifest["results"]["rows"]
    assert [r["beta"] for r in rows] == [None] + sorted(cfg.betas, reverse=True)
    assert all(math.isfinite(r["reward_mean"]) for r in rows)
    for part in ("data", "vae", "unet", "pairs", "ref_losses", "eval") + tuple(f"dpo_beta{b:g}" for b in cfg.betas):
        assert manifest["timings_s"][part] >= 0


def test_lora_files_are_kohya_and_cover_the_transformer_linears(tf, tiny):
    from safetensors.torch import load_file
    build, family, manifest = tiny
    unet_keys = set(build.unet().state_dict())
    sd = load_file(str(family / manifest["loras"][0]["file"]))
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    by_name = {k[:-len(".weight")].replace(".", "_"): k for k in unet_keys if k.endswith(".weight")}
    targets = {by_name[b[len("lora_unet_"):]] for b in bases}
    assert all(".transformer_blocks." in k or "emb_layers.1" in k for k in targets)
    assert any(".attn2.to_k." in k for k in targets) and any(".ff.net.2." in k for k in targets)
    for b in bases:
        assert sd[b + ".lora_down.weight"].shape[0] == build.cfg.lora_rank
        assert sd[b + ".lora_up.weight"].dtype == torch.float16
        assert float(sd[b + ".alpha"]) == build.cfg.lora_rank


def test_dpo_lora_moves_the_model_and_differs_by_beta(tf, tiny):
    build, family, manifest = tiny
    from safetensors.torch import load_file
    ups = [torch.cat([v.float().flatten() for k, v in sorted(load_file(str(family / x["file"])).items())
                      if k.endswith("lora_up.weight")]) for x in manifest["loras"]]
    assert all(u.abs().max() > 0 for u in ups)  # trained away from up = 0
    assert not torch.equal(ups[0], ups[1])


def test_dpo_loss_is_wallace_et_al(tf):
    """At the start (policy = reference) the loss is log 2; a policy that fits the winner better than the
    reference does (and the loser worse) lowers it, more so at a larger β."""
    ref_w, ref_l = torch.tensor([0.5]), torch.tensor([0.5])

    def loss(beta, mw, ml):
        inside = -0.5 * beta * ((mw - ml) - (ref_w - ref_l))
        return float(-torch.nn.functional.logsigmoid(inside).mean())
    assert loss(1000, ref_w, ref_l) == pytest.approx(math.log(2))
    better = (torch.tensor([0.499]), torch.tensor([0.501]))
    assert loss(1000, *better) < math.log(2)
    assert loss(4000, *better) < loss(1000, *better)


def test_resumed_part_equals_an_uninterrupted_one(tf, tmp_path):
    cfg = tf.Config.tiny()
    cfg.vae_steps, cfg.checkpoint_every = 3, 1
    whole = tf.Build(cfg, tmp_path / "a", log=lambda s: None)
    whole.vae()

    class Killed(Exception):
        pass
    broken = tf.Build(cfg, tmp_path / "b", log=lambda s: None)
    real_progress = broken._progress

    def progress(part, step, *args):
        real_progress(part, step, *args)
        if step == 1:
            raise Killed
    broken._progress = progress
    with pytest.raises(Killed):
        broken.vae()
    assert broken._ckpt_path("vae").exists()  # step 0's checkpoint; killed during step 1, before its own
    messages = []
    resumed = tf.Build(cfg, tmp_path / "b", log=messages.append)
    resumed.vae()
    assert any("resumed at step 1" in m for m in messages)
    a = torch.load(whole.path("vae", "vae.pt"))
    b = torch.load(resumed.path("vae", "vae.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_part_keys_depend_only_on_earlier_settings(tf):
    a, b = tf.Config(), tf.Config(dpo_steps=999, betas=(1.0, 2.0))
    assert a.part_key("unet") == b.part_key("unet") and a.part_key("pairs") == b.part_key("pairs")
    assert a.part_key("dpo") != b.part_key("dpo")
    assert a.part_key("vae") != tf.Config(seed=1).part_key("vae")


def test_data_is_deterministic_and_prompts_name_what_is_drawn(tf):
    cfg = tf.Config()
    a1 = tf.sample_attributes(tf.rng(cfg, "data"), 40)
    a2 = tf.sample_attributes(tf.rng(cfg, "data"), 40)
    assert a1 == a2
    im = tf.render(a1)
    assert im.shape == (40, 3, 32, 32) and im.min() >= 0 and im.max() <= 1
    assert np.array_equal(im, tf.render(a2))
    assert not any(a["colour"] == "white" and a["bg"] == "white" for a in a1)
    for a, x in zip(a1, im):
        assert a["prompt"] == tf.prompt_text(a["size"], a["colour"], a["shape"], a["place"], a["bg"])
        if a["colour"] != "white":
            assert tf.dominant_colour(x) == a["colour"], a["prompt"]
    # a large shape is more colourful than a small one of the same colour, background and place
    big = dict(a1[0], size="large", colour="red", bg="black", jitter=[0.0] * 5)
    small = dict(big, size="small")
    r = tf.colourfulness(torch.from_numpy(tf.render([big, small])))
    assert r[0] > 2 * r[1]


# -- the generated text encoder -----------------------------------------------------------------------
def test_text_encoder_values_are_pinned(tf):
    """The PCG64 raw stream and the integer-only transform: these values must never change, or the
    committed UNet would no longer match its text encoder."""
    v = tf._uniform(20261205, "embeddings.token_embedding.weight", (4,), 1.0).astype(np.float32)
    assert v.dtype == np.float32
    assert np.array_equal(v, np.array([-0.295654296875, -1.568359375, 0.55712890625, -1.498046875], np.float32)), v.tolist()


def test_text_encoder_state_dict_is_complete_and_inert(tf):
    shapes = tf.clip_shapes()
    assert sum(math.prod(s) for k, s in shapes.items() if not k.endswith("position_ids")) > 120e6
    sample = {k: tf.clip_tensor(1, k, s) for k, s in shapes.items() if "layers.0." in k or "embeddings" in k
              or "final_layer_norm" in k}
    assert torch.count_nonzero(sample[tf.CLIP_PREFIX + "encoder.layers.0.self_attn.out_proj.weight"]) == 0
    assert torch.count_nonzero(sample[tf.CLIP_PREFIX + "encoder.layers.0.mlp.fc2.weight"]) == 0
    assert torch.all(sample[tf.CLIP_PREFIX + "final_layer_norm.weight"] == 1)
    tok = sample[tf.CLIP_PREFIX + "embeddings.token_embedding.weight"].float()
    assert abs(tok.std().item() - tf.TOKEN_STD) < 0.01


# -- what ComfyUI makes of the materialized files ------------------------------------------------------
def test_checkpoint_loads_as_sd15_with_taesd(tf, tiny, materialized):
    import comfy.supported_models
    from comfy_helpers import load_checkpoint
    model, clip, vae = load_checkpoint(tf.CHECKPOINT_NAME)
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert type(vae.first_stage_model).__name__ == "TAESD"
    n = sum(p.numel() for p in clip.cond_stage_model.parameters())
    assert n > 120e6


def test_clip_text_encode_is_the_build_conditioning(tf, tiny, materialized):
    from comfy_helpers import encode, load_checkpoint
    build = tiny[0]
    _, clip, _ = load_checkpoint(tf.CHECKPOINT_NAME)
    p1, p2 = "a large red circle at the top left on a black background", "a small blue cross in the middle on a white background"
    c1, c2 = encode(clip, p1)[0][0].float(), encode(clip, p2)[0][0].float()
    mine = build.text([p1, p2])
    assert torch.allclose(c1[0], mine[0], atol=2e-2), (c1[0] - mine[0]).abs().max()
    assert torch.allclose(c2[0], mine[1], atol=2e-2)
    # clearly different where the words are (the padding after the end token is the same for all prompts)
    assert (c1[0, 1:12] - c2[0, 1:12]).abs().mean() > 0.5


def test_comfy_unet_lora_and_vae_match_the_build(tf, tiny, materialized):
    import nodes
    from comfy_helpers import load_checkpoint
    build, family, manifest = tiny
    model, clip, vae = load_checkpoint(tf.CHECKPOINT_NAME)
    unet = build.unet()
    acp = tf.alphas_cumprod()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 4, 4, generator=g)
    cond = build.text(["a large red circle at the top left on a black background"] * 2)
    t = 600
    sigma = math.sqrt((1 - acp[t]) / acp[t])
    beta = manifest["loras"][0]["beta"]
    lora_name = f"{tf.SUBFOLDER}/dpo_beta{beta:g}.safetensors"
    patched = nodes.LoraLoader().load_lora(model, clip, lora_name, 1.0, 0.0)[0]
    for patcher, ctx in ((model, None), (patched, beta)):
        import comfy.model_management
        comfy.model_management.load_models_gpu([patcher])
        x_in = x * math.sqrt(1 + sigma ** 2)
        with torch.no_grad():
            den = patcher.model.apply_model(x_in, torch.full((2,), sigma), c_crossattn=cond)
        eps_comfy = (x_in - den) / sigma
        if ctx is None:
            eps_mine = unet(x, torch.full((2,), float(t)), cond)
        else:
            from safetensors.torch import load_file
            with tf.merged(unet, load_file(str(family / tf.lora_file(beta)))):
                eps_mine = unet(x, torch.full((2,), float(t)), cond)
        assert torch.allclose(eps_comfy.float(), eps_mine, atol=3e-3), (eps_comfy - eps_mine).abs().max()
    # VAE: ComfyUI's decode of model-space latents is the build's decode
    lat = x * 0.5
    ours = tf.decode(build.vae(), lat).permute(0, 2, 3, 1)
    theirs = vae.decode(model.model.process_latent_out(lat))  # LATENTs are VAE-space: model-space / 0.18215
    assert theirs.shape == ours.shape
    assert torch.allclose(theirs.float(), ours, atol=2e-2), (theirs - ours).abs().max()


def test_full_unet_file_is_the_merged_lora(tf, tiny, materialized):
    import comfy.supported_models
    from comfy_helpers import load_unet
    from safetensors.torch import load_file
    build, family, manifest = tiny
    models, paths = materialized
    full = load_file(str(paths["full_unet"]))
    ref = load_file(str(family / "unet_reference.safetensors"))
    deltas = tf.lora_deltas(ref.keys(), load_file(str(family / tf.lora_file(manifest["full_unet"]["beta"]))))
    k = next(iter(deltas))
    assert torch.allclose(full[k].float(), (ref[k].float() + deltas[k]).half().float())
    patcher = load_unet(manifest["full_unet"]["file"])
    assert type(patcher.model.model_config) is comfy.supported_models.SD15


# -- the reward ---------------------------------------------------------------------------------------
def test_reward_kind_scores_colourfulness(tf, tiny):
    import importlib.util
    spec = importlib.util.spec_from_file_location("deradiff_rewards_tf", REPO / "sampler" / "rewards.py")
    rewards = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = rewards  # dataclasses look their module up
    spec.loader.exec_module(rewards)
    scorer = rewards.load_reward_model("torch_scorer", str(tiny[1] / "reward"))
    imgs = torch.from_numpy(tf.render(tf.sample_attributes(tf.rng(tf.Config(), "eval"), 5)))
    got = scorer.score(imgs.permute(0, 2, 3, 1), [])
    assert torch.allclose(got, tf.colourfulness(imgs), atol=1e-4)
    assert not scorer.uses_prompt
    bad = tiny[1] / "reward-bad"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text('{"model_type": "something else"}')
    with pytest.raises(rewards.RewardModelError, match="not a torch scorer"):
        rewards.load_reward_model("torch_scorer", str(bad))


def test_load_reward_model_node_loads_the_family_reward(tf, tiny, pack, tmp_path):
    import folder_paths
    import shutil
    root = tmp_path / "reward_models"
    shutil.copytree(tiny[1] / "reward", root / "tiny_reward_test")
    folder_paths.add_model_folder_path("reward_models", str(root))
    node = pack.NODE_CLASS_MAPPINGS["DeRaDiffLoadRewardModel"]
    assert "torch_scorer" in node.INPUT_TYPES()["required"]["kind"][1]["options"]
    assert "tiny_reward_test" in node.INPUT_TYPES()["required"]["model"][1]["options"]
    reward = node.execute("torch_scorer", "tiny_reward_test")[0]
    imgs = torch.zeros(2, 32, 32, 3)
    imgs[1, :, :, 0] = 1.0  # pure red: fully saturated
    scores = pack.NODE_CLASS_MAPPINGS["DeRaDiffRewardScore"].execute(imgs, reward, "")
    values = scores.result[0]
    assert [round(float(v), 3) for v in values] == [0.0, 100.0]


# -- the command line -----------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, check=True,
                          timeout=300).stdout


def test_info_prints_one_json_object(tf, tiny, tmp_path):
    out = run_cli("info", "--family", tiny[1], "--models", tmp_path)
    data = json.loads(out)
    assert data["reference_checkpoint"]["name"] == tf.CHECKPOINT_NAME
    assert [x["beta"] for x in data["loras"]] == sorted(tiny[0].cfg.betas)
    assert data["reward"]["kind"] == "torch_scorer"
    assert out.strip().count("\n") == 0


def test_score_prints_one_number_per_image(tf, tmp_path):
    from PIL import Image
    attrs = tf.sample_attributes(tf.rng(tf.Config(), "eval"), 3)
    imgs = tf.render(attrs)
    paths = []
    for i, im in enumerate(imgs):
        p = tmp_path / f"{i}.png"
        Image.fromarray((im.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)).save(p)
        paths.append(p)
    lines = run_cli("score", *paths).split()
    assert len(lines) == 3
    q = torch.from_numpy((imgs * 255 + 0.5).astype(np.uint8).astype(np.float32) / 255)
    assert [float(x) for x in lines] == pytest.approx(tf.colourfulness(q).tolist(), abs=1e-3)


def test_estimate_projects_every_part(tf):
    cfg = tf.Config.tiny()
    out = tf.estimate(cfg, repeats=1, log=lambda s: None)
    assert set(out["parts_s"]) == {"vae", "latents", "unet", "pairs", "ref_losses", "eval"} | {
        f"dpo_beta{b:g}" for b in cfg.betas}
    assert out["total_s"] == pytest.approx(sum(out["parts_s"].values()), abs=1)
    assert all(v > 0 for v in out["per_step"].values())


def test_a_second_build_reuses_every_part_and_keeps_the_timings(tf, tiny, tmp_path):
    build, family, manifest = tiny
    messages = []
    again = tf.Build(build.cfg, build.cache, log=messages.append)
    second = again.run(tmp_path / "family")
    assert not [m for m in messages if "step" in m]  # nothing trained again
    assert {k: v for k, v in second["timings_s"].items() if k != "write"} == {
        k: v for k, v in manifest["timings_s"].items() if k != "write"}
    assert second["sha256"] == manifest["sha256"]


def test_lora_files_are_byte_for_byte_reproducible(tf, tmp_path):
    """safetensors writes metadata in hash-map order (it changes from call to call): the family's files
    must not, or a rebuild or a second machine gives other hashes than family.json."""
    from safetensors import safe_open
    sd = {"b.weight": torch.arange(6, dtype=torch.float16).view(2, 3), "a.alpha": torch.tensor(2.0)}
    meta = {f"key{i}": str(i) for i in range(8)}
    digests = set()
    for i in range(6):
        tf.save_safetensors(sd, tmp_path / f"{i}.safetensors", metadata=meta)
        digests.add(tf.sha256(tmp_path / f"{i}.safetensors"))
    assert len(digests) == 1
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == meta
        assert torch.equal(f.get_tensor("b.weight"), sd["b.weight"])


def test_a_vae_that_loses_the_colour_stops_the_build(tf, tmp_path):
    """A 2-step VAE keeps little of the data's colourfulness: with a real threshold the build stops at the VAE,
    naming what to change, and writes nothing after it."""
    cfg = tf.Config.tiny()
    cfg.vae_min_colour = 0.9
    build = tf.Build(cfg, tmp_path / "cache", log=lambda s: None)
    with pytest.raises(RuntimeError, match="colourfulness.*vae_steps.*vae_chroma_weight"):
        build.vae()
    assert not build.final_path("vae").exists()


def test_chroma_is_the_colour_alone(tf):
    grey = torch.full((1, 3, 2, 2), 0.4)
    assert torch.equal(tf.chroma(grey), torch.zeros_like(grey))
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 0.9
    assert torch.allclose(tf.chroma(red).flatten(), torch.tensor([0.6, -0.3, -0.3]))
