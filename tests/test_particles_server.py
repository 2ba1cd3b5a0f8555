"""Particle mode through a real ComfyUI server: the optional inputs are listed with defaults that keep
old workflows as they were, DeRaDiff KSampler and DeRaDiff Guider (SamplerCustomAdvanced) run with
particles = 2 in a graph on the stand-in models, the ESS summary reaches the node's UI output, and a
deterministic sampler is refused with the node and input named."""
from __future__ import annotations

from server_rig import error_message, status_of
from test_server import (SD15_ALIGNED_CKPT, SD15_REF, STEPS, CFG, SEED, Graph, assert_not_flat, deradiff_ksampler,
                         empty_latent, encode_pair, load_pair, one_image, out, save)


def test_particle_inputs_are_optional_with_plain_defaults(comfy_server):
    for node in ("DeRaDiffKSampler", "DeRaDiffGuider"):
        info = comfy_server.object_info(node)
        optional = info["input"]["optional"]
        assert optional["particles"][0] == "INT" and optional["particles"][1]["default"] == 1
        assert optional["resample_ess"][1]["default"] == 0.5
        assert "particles" not in info["input"]["required"]


def test_particles_in_a_graph(comfy_server):
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    pos, neg = encode_pair(g, clip)
    latent = empty_latent(g, batch=2)
    ks = deradiff_ksampler(g, pair, 0.5, pos, neg, latent, sampler="euler_ancestral")
    g[ks]["inputs"].update(particles=2, resample_ess=0.5)
    ks_img = save(g, out(ks), vae, "particles_ks")
    guider = g.add("DeRaDiffGuider", pair=pair, positive=pos, negative=neg, cfg=CFG, particles=2, **{"lambda": 0.5})
    noise = g.add("RandomNoise", noise_seed=SEED)
    sampler = g.add("KSamplerSelect", sampler_name="euler_ancestral")
    model = g.add("CheckpointLoaderSimple", ckpt_name=SD15_REF)
    sigmas = g.add("BasicScheduler", model=out(model), scheduler="normal", steps=STEPS, denoise=1.0)
    adv = g.add("SamplerCustomAdvanced", noise=out(noise), guider=out(guider), sampler=out(sampler),
                sigmas=out(sigmas), latent_image=latent)
    adv_img = save(g, out(adv), vae, "particles_guider")
    entry = comfy_server.run(g, timeout=300)
    from test_server import saved_images
    images = saved_images(comfy_server, entry, ks_img)
    assert len(images) == 2  # one output per image of the batch, not one per particle
    for img in images:
        assert_not_flat(img, "particle mode")
    assert len(saved_images(comfy_server, entry, adv_img)) == 2
    text = entry["outputs"][ks]["deradiff_particles"][0]
    assert text.startswith("2 particles: ESS min") and "resampled" in text, text


def test_a_deterministic_sampler_is_refused_with_node_and_input(comfy_server):
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    pos, neg = encode_pair(g, clip)
    ks = deradiff_ksampler(g, pair, 0.5, pos, neg, empty_latent(g), sampler="euler")
    g[ks]["inputs"]["particles"] = 2
    save(g, out(ks), vae, "particles_refused")
    entry = comfy_server.run(g, timeout=300, expect_success=False)
    assert status_of(entry) == "error"
    message = error_message(entry)
    assert "DeRaDiff KSampler: input 'sampler_name'" in message and "euler_ancestral" in message, message
