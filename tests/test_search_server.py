"""The λ Search and reward nodes through the real ComfyUI server: reward models found through
extra_model_paths.yaml (the test server's writable models/reward_models), the best λ driving a
DeRaDiff KSampler in the same prompt, and a broken reward folder reported with node and input."""
from __future__ import annotations

from pathlib import Path

import pytest

from server_rig import combo_choices, error_message, status_of
from test_rewards import write_aesthetic_head, write_clip_folder
from test_server import (SD15_ALIGNED_CKPT, SD15_REF, SEED, Graph, empty_latent, load_pair, one_image, out,
                         assert_not_flat)


@pytest.fixture(scope="module")
def reward_models(comfy_server, comfy_root):
    folder = comfy_server.root / "models" / "reward_models"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tiny-clip").exists():
        write_clip_folder(folder / "tiny-clip", Path(comfy_root) / "comfy" / "sd1_tokenizer")
        write_aesthetic_head(folder / "tiny-aesthetic.safetensors")
        (folder / "broken-clip").mkdir()
        (folder / "broken-clip" / "config.json").write_text("{}")
    return folder


def test_reward_models_are_listed_from_extra_model_paths(comfy_server, reward_models):
    info = comfy_server.object_info("DeRaDiffLoadRewardModel")
    assert "tiny-clip" in combo_choices(info["input"]["required"]["model"])
    assert "tiny-aesthetic.safetensors" in combo_choices(info["input"]["optional"]["aesthetic_head"])


def test_lambda_search_drives_a_deradiff_ksampler(comfy_server, reward_models):
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    negative = out(g.add("CLIPTextEncode", clip=clip, text="blurry"))
    latent = empty_latent(g)
    reward = g.add("DeRaDiffLoadRewardModel", kind="clip_score", model="tiny-clip")
    watch = g.add("DeRaDiffLoadRewardModel", kind="laion_aesthetic", model="tiny-clip",
                  aesthetic_head="tiny-aesthetic.safetensors")
    search = g.add("DeRaDiffLambdaSearch", pair=pair, clip=clip, vae=vae, reward_model=out(reward),
                   watch_reward_model=out(watch), prompts="a red fox\na lighthouse", negative=negative,
                   latent_image=latent, seed=SEED, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
                   lambda_min=0.0, lambda_max=2.0, budget=4, lambdas_per_round=2, beta=5000.0)
    positive = out(g.add("CLIPTextEncode", clip=clip, text="a red fox"))
    sampler = g.add("DeRaDiffKSampler", pair=pair, seed=SEED, steps=2, cfg=5.0, sampler_name="euler",
                    scheduler="normal", positive=positive, negative=negative, latent_image=latent, denoise=1.0,
                    **{"lambda": out(search, 0)})
    image = g.add("SaveImage", images=out(g.add("VAEDecode", samples=out(sampler), vae=vae)), filename_prefix="search_best")
    plot = g.add("SaveImage", images=out(search, 1), filename_prefix="search_plot")
    best = g.add("SaveImage", images=out(search, 2), filename_prefix="search_best_images")
    entry = comfy_server.run(g, timeout=600)
    assert status_of(entry) == "success", error_message(entry)
    text = entry["outputs"][search]["text"][0]
    assert text.startswith("best λ = ") and "β/λ" in text
    best_lambda = float(text.split("best λ = ")[1].split()[0])
    assert 0.0 <= best_lambda <= 2.0
    assert len(text.splitlines()) >= 1 + 1 + 4  # the summary, the table's header, 4 evaluations
    plot_img = one_image(comfy_server, entry, plot)
    assert plot_img.shape[1] >= 400 and plot_img.shape[0] >= 200
    assert_not_flat(plot_img, "search plot")
    assert len(entry["outputs"][best]["images"]) == 2  # 2 prompts x 1 seed, at the best λ
    assert_not_flat(one_image(comfy_server, entry, image), "KSampler at the best λ")


def test_broken_reward_folder_names_node_and_input(comfy_server, reward_models):
    g = Graph()
    reward = g.add("DeRaDiffLoadRewardModel", kind="pickscore", model="broken-clip")
    scores = g.add("DeRaDiffRewardScore", images=out(g.add("EmptyImage", width=32, height=32, batch_size=1, color=0)),
                   reward_model=out(reward), prompt="x")
    assert scores  # an output node: it shows its summary
    entry = comfy_server.run(g, timeout=120, expect_success=False)
    message = error_message(entry)
    assert "DeRaDiff Load Reward Model: input 'model'" in message and "broken-clip" in message, message
    comfy_server.check_alive()


def search_graph(seed, budget, steps, prefix, size=64):
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    negative = out(g.add("CLIPTextEncode", clip=clip, text="blurry"))
    reward = g.add("DeRaDiffLoadRewardModel", kind="clip_score", model="tiny-clip")
    search = g.add("DeRaDiffLambdaSearch", pair=pair, clip=clip, vae=vae, reward_model=out(reward),
                   prompts="a red fox\na lighthouse", negative=negative, latent_image=empty_latent(g, size),
                   seed=seed, steps=steps, cfg=5.0, sampler_name="euler", scheduler="normal", lambda_min=0.0,
                   lambda_max=2.0, budget=budget, lambdas_per_round=2)
    g.add("SaveImage", images=out(search, 1), filename_prefix=prefix)
    return g, search


def test_search_reports_one_progress_bar_and_can_be_cancelled(comfy_server, reward_models):
    from test_server import json_messages
    budget, steps, prompts = 4, 2, 2
    g, search = search_graph(SEED + 1, budget, steps, "search_progress")
    prompt_id, messages = comfy_server.ws_run(g, timeout=400)
    progress = [p for p in json_messages(messages, "progress", prompt_id) if p["node"] == search]
    bar = [p for p in progress if p["max"] == budget * prompts * steps]
    # the search's own bar, over every round (then the best λ's images may add a sweep of their own)
    assert bar and bar == progress[:len(bar)], progress
    values = [p["value"] for p in bar]
    assert values == sorted(values) and values[-1] == budget * prompts * steps, values

    # cancelled inside the first sweep: stops there, and the server goes on serving
    g, search = search_graph(SEED + 2, 6, 30, "search_cancelled", size=128)
    interrupted = []

    def interrupt_on_first_progress(msg, server):
        if isinstance(msg, dict) and msg["type"] == "progress" and not interrupted:
            interrupted.append(msg["data"]["value"])
            server.interrupt(msg["data"]["prompt_id"])

    prompt_id, messages = comfy_server.ws_run(g, on_message=interrupt_on_first_progress, timeout=400)
    assert interrupted, "no progress before the end of the prompt"
    stopped = json_messages(messages, "execution_interrupted", prompt_id)
    assert stopped and stopped[0]["node_id"] == search, stopped
    values = [p["value"] for p in json_messages(messages, "progress", prompt_id)]
    assert max(values) < 6 * 2 * 30 // 2, f"the search went on after the cancel: {values[-5:]}"
    assert not list(comfy_server.output_dir.glob("search_cancelled*"))
    entry = comfy_server.run(search_graph(SEED + 3, 2, 1, "search_after_cancel")[0], timeout=300)
    assert status_of(entry) == "success"
