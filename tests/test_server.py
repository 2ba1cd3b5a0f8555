"""Workflow tests through a real ComfyUI HTTP server (see server_rig.py).

Every prompt is a small API-format graph on the stand-in models: 64x64 images and
2-6 steps; the module takes about three minutes on two otherwise idle CPU cores (server
start included), several times that when other processes compete for the cores.
Images are compared pixel for pixel after the server saved them as PNG.

The tests are ordered so that consecutive prompts share their loaders: ComfyUI keeps a
node's output for the next prompt when that prompt has the same node with the same
inputs, so the stand-ins are loaded a few times rather than once per test.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from conftest import STANDIN_DIR
from server_rig import PACK_DIR_NAME, combo_choices, status_messages, status_of

PACK_NODES = {
    "DeRaDiffLoadAlignedPair": "Load Aligned Model Pair (DeRaDiff)",
    "DeRaDiffMakePair": "Make Aligned Model Pair (DeRaDiff)",
    "DeRaDiffKSampler": "DeRaDiff KSampler",
    "DeRaDiffGuider": "DeRaDiff Guider",
    "DeRaDiffLambdaSchedule": "DeRaDiff λ Schedule",
    "DeRaDiffLambdaSweep": "DeRaDiff λ Sweep",
    "DeRaDiffSweepGrid": "DeRaDiff Sweep Grid",
    "DeRaDiffRealignModel": "DeRaDiff Realign Model",
    "DeRaDiffLoadRewardModel": "DeRaDiff Load Reward Model",
    "DeRaDiffRewardScore": "DeRaDiff Reward Score",
    "DeRaDiffLambdaSearch": "DeRaDiff λ Search",
}
PAIR_TYPE = "DERADIFF_PAIR"

SD15_REF = "sd15_reference.safetensors"
SD15_ALIGNED_CKPT = "checkpoints/sd15_aligned.safetensors"
SD15_ALIGNED_UNET = "diffusion_models/sd15_aligned_unet.safetensors"
SDXL_REF = "sdxl_reference.safetensors"
SDXL_ALIGNED_UNET = "diffusion_models/sdxl_aligned_unet.safetensors"
SD15_LORA = "sd15_aligned_lora.safetensors"

POSITIVE = "a watercolour painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"
SIZE = 64
STEPS = 3
CFG = 5.0
SEED = 1234


# -- graph building -------------------------------------------------------------

class Graph(dict):
    """An API-format prompt. ``add`` returns the new node's id; ``out(id, i)`` links to an output."""

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self) + 1)
        self[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


def out(node_id: str, index: int = 0) -> list:
    return [node_id, index]


def encode_pair(g: Graph, clip: list) -> tuple[list, list]:
    pos = g.add("CLIPTextEncode", clip=clip, text=POSITIVE)
    neg = g.add("CLIPTextEncode", clip=clip, text=NEGATIVE)
    return out(pos), out(neg)


def empty_latent(g: Graph, size: int = SIZE, batch: int = 1) -> list:
    return out(g.add("EmptyLatentImage", width=size, height=size, batch_size=batch))


def load_pair(g: Graph, reference: str, aligned: str):
    """-> (pair, CLIP, VAE) links of a Load Aligned Model Pair node."""
    n = g.add("DeRaDiffLoadAlignedPair", reference_ckpt_name=reference, aligned_model=aligned)
    return out(n, 0), out(n, 1), out(n, 2)


def load_checkpoint(g: Graph, name: str = SD15_REF):
    """-> (MODEL, CLIP, VAE) links of a CheckpointLoaderSimple node."""
    n = g.add("CheckpointLoaderSimple", ckpt_name=name)
    return out(n, 0), out(n, 1), out(n, 2)


def deradiff_ksampler(g: Graph, pair, lam, pos, neg, latent, seed=SEED, steps=STEPS, cfg=CFG,
                      denoise=1.0, sampler="euler", scheduler="normal") -> str:
    return g.add("DeRaDiffKSampler", pair=pair, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                 scheduler=scheduler, positive=pos, negative=neg, latent_image=latent, denoise=denoise,
                 **{"lambda": lam})


def ksampler(g: Graph, model, pos, neg, latent, seed=SEED, steps=STEPS, cfg=CFG, denoise=1.0,
             sampler="euler", scheduler="normal") -> str:
    return g.add("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                 scheduler=scheduler, positive=pos, negative=neg, latent_image=latent, denoise=denoise)


def save(g: Graph, samples: list, vae: list, prefix: str) -> str:
    decoded = g.add("VAEDecode", samples=samples, vae=vae)
    return g.add("SaveImage", images=out(decoded), filename_prefix=prefix)


# -- results --------------------------------------------------------------------

def saved_images(server, entry: dict, node_id: str) -> list[np.ndarray]:
    paths = server.images(entry, node_id)
    assert paths, f"node {node_id} saved no image; outputs: {entry.get('outputs')}"
    arrays = []
    for path in paths:
        assert path.is_file(), f"{path} does not exist"
        with Image.open(path) as im:
            arrays.append(np.asarray(im.convert("RGB")).copy())
    return arrays


def one_image(server, entry: dict, node_id: str) -> np.ndarray:
    images = saved_images(server, entry, node_id)
    assert len(images) == 1, f"expected one image from node {node_id}, got {len(images)}"
    return images[0]


def saved_latent(server, entry: dict, node_id: str):
    from safetensors.torch import load_file
    files = entry["outputs"][node_id]["latents"]
    assert len(files) == 1
    path = server.output_dir / files[0]["subfolder"] / files[0]["filename"]
    return load_file(str(path))["latent_tensor"]


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape, f"{a.shape} vs {b.shape}"
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def assert_same_image(a: np.ndarray, b: np.ndarray, what: str):
    d = diff(a, b)
    assert d.max() == 0, (f"{what}: images differ; max abs difference {d.max()}/255, mean {d.mean():.3f}, "
                          f"{(d > 0).mean():.1%} of values differ")


def assert_different_images(a: np.ndarray, b: np.ndarray, what: str, min_mean: float = 1.0):
    d = diff(a, b)
    assert d.mean() >= min_mean, f"{what}: images are (nearly) the same; mean abs difference {d.mean():.3f}/255"


def assert_not_flat(img: np.ndarray, what: str):
    assert img.std() > 1.0, f"{what}: the image is flat (std {img.std():.3f}), the models did nothing visible"


def log_since(server, offset: int) -> str:
    return server.log_text()[offset:]


# -- a. the pack loads, its nodes are described ------------------------------------

def test_pack_loads_and_nodes_are_listed(comfy_server):
    log = comfy_server.log_text()
    pack_lines = [line for line in log.splitlines() if PACK_DIR_NAME in line]
    failed = [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line]
    assert not failed, "the pack failed to import:\n" + "\n".join(failed)
    # "Import times for custom nodes:" lists every custom node module it loaded
    import_times = log.split("Import times for custom nodes:", 1)
    assert len(import_times) == 2, "no custom-node import summary in the server log"
    # found through the custom_nodes: key of the extra-model-paths file, not ComfyUI's own folder
    pack_path = str(comfy_server.root / "custom_nodes" / PACK_DIR_NAME)
    loaded = [line for line in import_times[1].splitlines() if line.strip().endswith(pack_path)]
    assert loaded and "IMPORT FAILED" not in loaded[0], \
        f"the pack is not among the loaded custom nodes:\n{import_times[1][:2000]}"

    info = comfy_server.object_info()
    missing = [n for n in PACK_NODES if n not in info]
    assert not missing, f"/object_info lacks {missing}"
    for node_id, display in PACK_NODES.items():
        node = info[node_id]
        assert node["display_name"] == display
        assert node["python_module"] == "custom_nodes." + PACK_DIR_NAME, node["python_module"]
        assert node["description"].strip(), f"{node_id} has no description"
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert inputs, f"{node_id} has no inputs"
        for name, spec in inputs.items():
            options = spec[1] if len(spec) > 1 else {}
            assert str(options.get("tooltip", "")).strip(), f"{node_id} input '{name}' has no tooltip"

    assert info["DeRaDiffLoadAlignedPair"]["output"][0] == PAIR_TYPE
    assert info["DeRaDiffMakePair"]["output"] == [PAIR_TYPE]
    for node_id in ("DeRaDiffKSampler", "DeRaDiffGuider"):
        assert info[node_id]["input"]["required"]["pair"][0] == PAIR_TYPE
        assert "lambda" in info[node_id]["input"]["required"]
    assert info["DeRaDiffKSampler"]["output"] == ["LATENT"]
    assert info["DeRaDiffGuider"]["output"] == ["GUIDER"]

    # the combos list the stand-ins the server sees through the extra model paths
    pair_inputs = info["DeRaDiffLoadAlignedPair"]["input"]["required"]
    assert SD15_REF in combo_choices(pair_inputs["reference_ckpt_name"])
    aligned_choices = combo_choices(pair_inputs["aligned_model"])
    for choice in (SD15_ALIGNED_CKPT, SD15_ALIGNED_UNET, SDXL_ALIGNED_UNET):
        assert choice in aligned_choices, aligned_choices


def test_every_pack_node_is_documented(comfy_server):
    """Every node the pack registers (the four above and any later ones): a description,
    a tooltip on every input and on every output."""
    info = comfy_server.object_info()
    pack_nodes = [n for n, v in info.items() if v.get("python_module") == "custom_nodes." + PACK_DIR_NAME]
    assert set(PACK_NODES) <= set(pack_nodes), f"pack nodes per /object_info: {pack_nodes}"
    problems = []
    for node_id in pack_nodes:
        node = info[node_id]
        if not node.get("description", "").strip():
            problems.append(f"{node_id}: no description")
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        for name, spec in inputs.items():
            options = spec[1] if len(spec) > 1 else {}
            if not str(options.get("tooltip", "")).strip():
                problems.append(f"{node_id}: input '{name}' has no tooltip")
        tooltips = node.get("output_tooltips") or []
        if len(tooltips) != len(node["output"]) or not all(t.strip() for t in tooltips):
            problems.append(f"{node_id}: outputs {node['output']} have tooltips {tooltips}")
    assert not problems, "\n".join(problems)


# -- b. SD1.5 end to end ------------------------------------------------------------

def test_sd15_end_to_end(comfy_server):
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    pos, neg = encode_pair(g, clip)
    sampler = deradiff_ksampler(g, pair, 0.5, pos, neg, empty_latent(g))
    saver = save(g, out(sampler), vae, "b_sd15")
    entry = comfy_server.run(g)
    img = one_image(comfy_server, entry, saver)
    assert img.shape == (SIZE, SIZE, 3)
    assert_not_flat(img, "SD1.5 λ=0.5")
    # the node reports the λ it sampled at in its UI output
    assert entry["outputs"][sampler]["deradiff"] == ["λ = 0.5"]


# -- f. DeRaDiff Guider through SamplerCustomAdvanced --------------------------------------

def custom_advanced(g: Graph, guider: str, sigmas: list, latent: list, seed=SEED) -> str:
    noise = g.add("RandomNoise", noise_seed=seed)
    sampler = g.add("KSamplerSelect", sampler_name="euler")
    return g.add("SamplerCustomAdvanced", noise=out(noise), guider=out(guider), sampler=out(sampler),
                 sigmas=sigmas, latent_image=latent)


def test_guider_with_sampler_custom_advanced(comfy_server):
    g = Graph()
    model, clip, vae = load_checkpoint(g, SD15_REF)
    sigmas = out(g.add("BasicScheduler", model=model, scheduler="normal", steps=STEPS, denoise=1.0))
    pos, neg = encode_pair(g, clip)
    latent = empty_latent(g)
    cfg_guider = g.add("CFGGuider", model=model, positive=pos, negative=neg, cfg=CFG)
    cfg_img = save(g, out(custom_advanced(g, cfg_guider, sigmas, latent)), vae, "f_cfg_guider")

    pair, pclip, pvae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    ppos, pneg = encode_pair(g, pclip)
    platent = empty_latent(g)
    savers = {}
    for lam in (0.0, 0.5):
        guider = g.add("DeRaDiffGuider", pair=pair, positive=ppos, negative=pneg, cfg=CFG, **{"lambda": lam})
        savers[lam] = save(g, out(custom_advanced(g, guider, sigmas, platent)), pvae, f"f_guider_{lam}")
    # the same pair through DeRaDiff KSampler (same sigmas: euler / normal / STEPS)
    ks_half = save(g, out(deradiff_ksampler(g, pair, 0.5, ppos, pneg, platent)), pvae, "f_ksampler_0.5")

    entry = comfy_server.run(g, timeout=300)
    img_cfg = one_image(comfy_server, entry, cfg_img)
    img = {lam: one_image(comfy_server, entry, n) for lam, n in savers.items()}
    assert img[0.5].shape == (SIZE, SIZE, 3)
    assert_same_image(img[0.0], img_cfg, "DeRaDiff Guider λ=0 vs CFGGuider(reference)")
    assert_different_images(img[0.5], img_cfg, "DeRaDiff Guider λ=0.5 vs CFGGuider(reference)")
    assert_same_image(img[0.5], one_image(comfy_server, entry, ks_half),
                      "DeRaDiff Guider λ=0.5 vs DeRaDiff KSampler λ=0.5")


# -- h. progress, previews and cancel over the websocket -----------------------------------

def preview_frames(messages) -> list[Image.Image]:
    frames = []
    for m in messages:
        if isinstance(m, bytes):
            event, = struct.unpack(">I", m[:4])
            if event == 1:  # PREVIEW_IMAGE: 4-byte image type (1 JPEG, 2 PNG), then the image
                frames.append(Image.open(io.BytesIO(m[8:])))
    return frames


def json_messages(messages, kind, prompt_id):
    return [m["data"] for m in messages if isinstance(m, dict) and m["type"] == kind
            and m["data"].get("prompt_id") == prompt_id]


def sd15_graph(steps, size, seed, prefix, lam=0.5):
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    pos, neg = encode_pair(g, clip)
    sampler = deradiff_ksampler(g, pair, lam, pos, neg, empty_latent(g, size), seed=seed, steps=steps)
    return g, sampler, save(g, out(sampler), vae, prefix)


def test_progress_and_previews_over_websocket(comfy_server):
    steps = 6
    g, sampler, saver = sd15_graph(steps, SIZE, seed=7001, prefix="h_progress")
    prompt_id, messages = comfy_server.ws_run(g)
    progress = [p for p in json_messages(messages, "progress", prompt_id) if p["node"] == sampler]
    assert progress, f"no progress messages for the DeRaDiff KSampler: {[m['type'] for m in messages if isinstance(m, dict)]}"
    assert {p["max"] for p in progress} == {steps}, progress
    values = [p["value"] for p in progress]
    assert values == sorted(values) and values[-1] == steps, values
    frames = preview_frames(messages)
    # one latent2rgb preview per step, sent right after that step's progress message
    assert len(frames) == len(progress), f"{len(frames)} preview frames for {len(progress)} progress messages"
    for frame in frames:
        frame.load()
        assert frame.size[0] > 0 and frame.size[1] > 0
    assert json_messages(messages, "execution_success", prompt_id)
    executed = [m for m in json_messages(messages, "executed", prompt_id) if m["node"] == saver]
    assert executed and executed[0]["output"]["images"], executed


def test_cancel_over_websocket(comfy_server):
    # long enough that it cannot end before the interrupt lands (a few ms after the first
    # progress message); if no progress ever comes, ws_run cancels it at its timeout
    steps = 60
    g, sampler, saver = sd15_graph(steps, 256, seed=7002, prefix="h_cancelled")
    interrupted = []

    def interrupt_on_first_progress(msg, server):
        if isinstance(msg, dict) and msg["type"] == "progress" and not interrupted:
            interrupted.append(msg["data"]["value"])
            server.interrupt(msg["data"]["prompt_id"])

    prompt_id, messages = comfy_server.ws_run(g, on_message=interrupt_on_first_progress, timeout=120)
    assert interrupted, "no progress message arrived before the end of the prompt"
    stopped = json_messages(messages, "execution_interrupted", prompt_id)
    assert stopped, f"no execution_interrupted; got {[m['type'] for m in messages if isinstance(m, dict)]}"
    assert stopped[0]["node_id"] == sampler, stopped
    values = [p["value"] for p in json_messages(messages, "progress", prompt_id)]
    assert max(values) < steps, f"the run went to the end: {values[-5:]}"
    assert not [m for m in json_messages(messages, "executed", prompt_id) if m["node"] == saver]
    assert not list(comfy_server.output_dir.glob("h_cancelled*")), "an image was saved from the cancelled run"
    entry = comfy_server.wait(prompt_id)
    assert "execution_interrupted" in status_messages(entry), entry["status"]

    # the server goes on working after the cancel
    g, sampler, saver = sd15_graph(2, SIZE, seed=7003, prefix="h_after_cancel")
    entry = comfy_server.run(g)
    assert one_image(comfy_server, entry, saver).shape == (SIZE, SIZE, 3)


# -- i. batches, img2img and inpainting ------------------------------------------------------

def test_batch_of_two(comfy_server):
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    pos, neg = encode_pair(g, clip)
    saver = save(g, out(deradiff_ksampler(g, pair, 0.5, pos, neg, empty_latent(g, batch=2))), vae, "i_batch")
    entry = comfy_server.run(g)
    images = saved_images(comfy_server, entry, saver)
    assert len(images) == 2
    for img in images:
        assert img.shape == (SIZE, SIZE, 3)
        assert_not_flat(img, "batch image")
    assert_different_images(images[0], images[1], "the two images of a batch")


@pytest.fixture(scope="module")
def input_image(comfy_server):
    """A 64x64 RGBA picture in the server's input folder; its left half is transparent (the mask)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgba = np.stack([x * 4, y * 4, (x + y) * 2, np.where(x < SIZE // 2, 0, 255)], axis=-1).astype(np.uint8)
    name = "deradiff_test_input.png"
    Image.fromarray(rgba, "RGBA").save(comfy_server.input_dir / name)
    return name


def test_img2img(comfy_server, input_image):
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    pos, neg = encode_pair(g, clip)
    pixels = out(g.add("LoadImage", image=input_image), 0)
    latent = out(g.add("VAEEncode", pixels=pixels, vae=vae))
    savers = {d: save(g, out(deradiff_ksampler(g, pair, 0.5, pos, neg, latent, denoise=d, steps=4)), vae, f"i_img2img_{d}")
              for d in (0.5, 1.0)}
    entry = comfy_server.run(g)
    half, full = (one_image(comfy_server, entry, savers[d]) for d in (0.5, 1.0))
    assert half.shape == (SIZE, SIZE, 3)
    assert_not_flat(half, "img2img")
    # denoise 0.5 keeps the input's structure: the output depends on the input latent
    assert_different_images(half, full, "img2img denoise 0.5 vs 1.0")


def test_inpainting(comfy_server, input_image):
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    pos, neg = encode_pair(g, clip)
    loaded = g.add("LoadImage", image=input_image)
    pixels, mask = out(loaded, 0), out(loaded, 1)

    inpaint_latent = out(g.add("VAEEncodeForInpaint", pixels=pixels, vae=vae, mask=mask, grow_mask_by=6))
    inpaint_img = save(g, out(deradiff_ksampler(g, pair, 0.5, pos, neg, inpaint_latent)), vae, "i_inpaint")

    encoded = out(g.add("VAEEncode", pixels=pixels, vae=vae))
    masked = out(g.add("SetLatentNoiseMask", samples=encoded, mask=mask))
    encoded_saved = g.add("SaveLatent", samples=encoded, filename_prefix="i_encoded")
    noise_mask = {}
    for lam in (0.0, 0.5):
        s = deradiff_ksampler(g, pair, lam, pos, neg, masked)
        noise_mask[lam] = (save(g, out(s), vae, f"i_noise_mask_{lam}"),
                           g.add("SaveLatent", samples=out(s), filename_prefix=f"i_noise_mask_{lam}"))

    model, cclip, cvae = load_checkpoint(g, SD15_REF)
    cpos, cneg = encode_pair(g, cclip)
    cmasked = out(g.add("SetLatentNoiseMask", samples=out(g.add("VAEEncode", pixels=pixels, vae=cvae)), mask=mask))
    ks_img = save(g, out(ksampler(g, model, cpos, cneg, cmasked)), cvae, "i_noise_mask_ksampler")

    entry = comfy_server.run(g, timeout=300)
    img = one_image(comfy_server, entry, inpaint_img)
    assert img.shape == (SIZE, SIZE, 3)
    assert_not_flat(img, "VAEEncodeForInpaint")
    assert_same_image(one_image(comfy_server, entry, noise_mask[0.0][0]), one_image(comfy_server, entry, ks_img),
                      "noise mask: DeRaDiff λ=0 vs KSampler(reference)")

    # λ=0.5 with the noise mask: the kept (opaque, right) half of the latent is the input's,
    # the masked (transparent, left) half is new
    source = saved_latent(comfy_server, entry, encoded_saved)
    result = saved_latent(comfy_server, entry, noise_mask[0.5][1])
    assert result.shape == source.shape == (1, 4, SIZE // 8, SIZE // 8)
    half = SIZE // 16
    kept = (result[..., half:] - source[..., half:]).abs().max().item()
    changed = (result[..., :half] - source[..., :half]).abs().mean().item()
    scale = source.abs().mean().item()
    assert kept <= 1e-3 * max(scale, 1.0), f"the unmasked half changed by up to {kept:.3g}"
    assert changed > 0.1 * scale, f"the masked half barely changed ({changed:.3g}, latent scale {scale:.3g})"
# -- g. pairs that cannot be mixed are refused ------------------------------------------

def failed_prompt(server, g: Graph) -> dict:
    entry = server.run(g, timeout=300, expect_success=False)
    assert status_of(entry) == "error", f"the prompt did not fail: status {status_of(entry)}"
    err = status_messages(entry).get("execution_error")
    assert err, f"no execution_error in {entry['status']}"
    return err


def test_schedule_mismatch_is_refused(comfy_server):
    g = Graph()
    model, clip, vae = load_checkpoint(g, SD15_REF)
    # the reference itself with a zero-terminal-SNR schedule patched onto it
    aligned = g.add("ModelSamplingDiscrete", model=model, sampling="eps", zsnr=True)
    pair = out(g.add("DeRaDiffMakePair", reference=model, aligned=out(aligned)))
    pos, neg = encode_pair(g, clip)
    save(g, out(deradiff_ksampler(g, pair, 0.5, pos, neg, empty_latent(g))), vae, "g_schedule")
    err = failed_prompt(comfy_server, g)
    msg = err["exception_message"]
    assert err["node_type"] == "DeRaDiffMakePair", err
    assert msg.startswith("Make Aligned Model Pair (DeRaDiff): input 'aligned'"), msg
    assert "noise schedule" in msg, msg


def test_family_mismatch_is_refused(comfy_server):
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, SDXL_ALIGNED_UNET)
    pos, neg = encode_pair(g, clip)
    saver = save(g, out(deradiff_ksampler(g, pair, 0.5, pos, neg, empty_latent(g))), vae, "g_family")
    err = failed_prompt(comfy_server, g)
    msg = err["exception_message"]
    assert err["node_type"] == "DeRaDiffLoadAlignedPair", err
    assert msg.startswith("Load Aligned Model Pair (DeRaDiff): input 'aligned_model'"), msg
    for needle in (SD15_REF, SDXL_ALIGNED_UNET, "SD15", "SDXL", "different model families"):
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert saver not in err.get("executed", [])


# -- c. λ=0 is the reference, λ=1 the aligned model ------------------------------------

@pytest.fixture(scope="module")
def sd15_lambda_images(comfy_server):
    """Pack at λ 0 / 0.5 / 1 and plain KSampler on the reference and on the aligned UNet, one prompt."""
    g = Graph()
    pair, pclip, pvae = load_pair(g, SD15_REF, SD15_ALIGNED_UNET)
    pos, neg = encode_pair(g, pclip)
    latent = empty_latent(g)
    savers = {}
    for lam in (0.0, 0.5, 1.0):
        s = deradiff_ksampler(g, pair, lam, pos, neg, latent)
        savers[f"pack_{lam}"] = save(g, out(s), pvae, f"c_pack_{lam}")

    model, clip, vae = load_checkpoint(g, SD15_REF)
    cpos, cneg = encode_pair(g, clip)
    clatent = empty_latent(g)
    savers["ksampler_reference"] = save(g, out(ksampler(g, model, cpos, cneg, clatent)), vae, "c_ks_ref")
    unet = out(g.add("UNETLoader", unet_name=SD15_ALIGNED_UNET.split("/", 1)[1], weight_dtype="default"))
    savers["ksampler_aligned"] = save(g, out(ksampler(g, unet, cpos, cneg, clatent)), vae, "c_ks_aligned")

    entry = comfy_server.run(g, timeout=300)
    return {k: one_image(comfy_server, entry, n) for k, n in savers.items()}


def test_lambda_0_equals_ksampler_on_reference(sd15_lambda_images):
    imgs = sd15_lambda_images
    # the stand-ins must really differ, or the comparisons below prove nothing
    assert_different_images(imgs["ksampler_reference"], imgs["ksampler_aligned"], "reference vs aligned KSampler")
    assert_same_image(imgs["pack_0.0"], imgs["ksampler_reference"], "DeRaDiff λ=0 vs KSampler(reference)")


def test_lambda_1_equals_ksampler_on_aligned_unet(sd15_lambda_images):
    imgs = sd15_lambda_images
    assert_same_image(imgs["pack_1.0"], imgs["ksampler_aligned"], "DeRaDiff λ=1 vs KSampler(UNETLoader aligned)")


def test_lambda_half_differs_from_both(sd15_lambda_images):
    imgs = sd15_lambda_images
    assert_different_images(imgs["pack_0.5"], imgs["ksampler_reference"], "λ=0.5 vs reference")
    assert_different_images(imgs["pack_0.5"], imgs["ksampler_aligned"], "λ=0.5 vs aligned")


# -- e. LoRA-aligned pair -----------------------------------------------------------

LORA_TOLERANCE_MAX = 2     # per channel, out of 255
LORA_TOLERANCE_MEAN = 0.25


def write_lora_merged_unet(path, strength: float = 1.0) -> int:
    """The reference UNet with the LoRA merged in (kohya: W + strength * alpha/rank * up @ down), fp32."""
    import torch
    from safetensors.torch import load_file, save_file
    ckpt = load_file(str(STANDIN_DIR / "checkpoints" / SD15_REF))
    lora = load_file(str(STANDIN_DIR / "loras" / SD15_LORA))
    prefix = "model.diffusion_model."
    unet = {k[len(prefix):]: v.float() for k, v in ckpt.items() if k.startswith(prefix)}
    merged = 0
    for key, weight in unet.items():
        if not key.endswith(".weight"):
            continue
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        if name + ".lora_up.weight" not in lora:
            continue
        up = lora[name + ".lora_up.weight"].float()
        down = lora[name + ".lora_down.weight"].float()
        rank = down.shape[0]
        alpha = float(lora[name + ".alpha"]) if name + ".alpha" in lora else rank
        unet[key] = weight + strength * (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        merged += 1
    lora_modules = {k.split(".", 1)[0] for k in lora}
    assert merged == len(lora_modules) and merged > 0, f"merged {merged} of {len(lora_modules)} LoRA modules"
    save_file({k: v.contiguous() for k, v in unet.items()}, str(path))
    return merged


def test_lora_pair_equals_merged_unet_pair(comfy_server):
    """A LoRA-aligned pair, by every route the pack offers, gives the image of the pair whose
    aligned side is an independent UNet file with the LoRA merged in by hand.

    Routes: MakePair(reference, LoraLoader(reference)) runs the aligned side on the
    reference's own weights (the pack logs "plus N patched layers"); an extra object patch
    on the aligned side (a ModelSamplingDiscrete with the default schedule) forces the
    fallback that loads "a second full copy"; Load Aligned Model Pair takes loras/... itself.
    Tolerance: LORA_TOLERANCE_MAX / _MEAN (fp32 merge vs on-the-fly patching rounding).
    """
    merged_name = "sd15_reference_plus_lora_merged.safetensors"
    lora_layers = write_lora_merged_unet(comfy_server.extra_diffusion_models / merged_name)
    log_offset = len(comfy_server.log_text())

    g = Graph()
    model, clip, vae = load_checkpoint(g, SD15_REF)
    lora = out(g.add("LoraLoader", model=model, clip=clip, lora_name=SD15_LORA, strength_model=1.0,
                     strength_clip=0.0), 0)
    with_object_patch = out(g.add("ModelSamplingDiscrete", model=lora, sampling="eps", zsnr=False))
    pos, neg = encode_pair(g, clip)
    latent = empty_latent(g)
    shared = out(g.add("DeRaDiffMakePair", reference=model, aligned=lora))
    copied = out(g.add("DeRaDiffMakePair", reference=model, aligned=with_object_patch))
    savers = {
        "shared": save(g, out(deradiff_ksampler(g, shared, 0.5, pos, neg, latent)), vae, "e_lora_shared"),
        "reference": save(g, out(deradiff_ksampler(g, shared, 0.0, pos, neg, latent)), vae, "e_lora_zero"),
        "full_copy": save(g, out(deradiff_ksampler(g, copied, 0.5, pos, neg, latent)), vae, "e_lora_copy"),
    }
    lpair, lclip, lvae = load_pair(g, SD15_REF, "loras/" + SD15_LORA)
    lpos, lneg = encode_pair(g, lclip)
    savers["loader"] = save(g, out(deradiff_ksampler(g, lpair, 0.5, lpos, lneg, empty_latent(g))), lvae,
                            "e_lora_loader")
    entry = comfy_server.run(g, timeout=300)
    imgs = {k: one_image(comfy_server, entry, n) for k, n in savers.items()}
    log = log_since(comfy_server, log_offset)
    assert f"'aligned' is 'reference' plus {lora_layers} patched layers" in log, \
        f"no shared-weights line for the LoraLoader pair in the server log:\n{log[-3000:]}"
    assert f"'loras/{SD15_LORA}' is '{SD15_REF}' plus {lora_layers} patched layers" in log, \
        f"no shared-weights line for the loader's LoRA pair in the server log:\n{log[-3000:]}"
    assert "a second full copy" in log, f"no 'second full copy' warning in the server log:\n{log[-3000:]}"

    # the same pair with the aligned side an independent file: the LoRA merged by hand
    g = Graph()
    pair, pclip, pvae = load_pair(g, SD15_REF, "diffusion_models/" + merged_name)
    pos, neg = encode_pair(g, pclip)
    merged_half = save(g, out(deradiff_ksampler(g, pair, 0.5, pos, neg, empty_latent(g))), pvae, "e_merged_half")
    entry = comfy_server.run(g, timeout=300)
    img_merged = one_image(comfy_server, entry, merged_half)

    # the LoRA must change the picture well beyond the tolerance, or the comparison is empty
    assert_different_images(img_merged, imgs["reference"], "merged-LoRA pair λ=0.5 vs λ=0",
                            min_mean=8 * LORA_TOLERANCE_MEAN)
    for route in ("shared", "full_copy", "loader"):
        d = diff(imgs[route], img_merged)
        assert d.max() <= LORA_TOLERANCE_MAX and d.mean() <= LORA_TOLERANCE_MEAN, (
            f"LoRA pair ({route}) vs merged-UNet pair at λ=0.5: max abs difference {d.max()}/255 "
            f"(allowed {LORA_TOLERANCE_MAX}), mean {d.mean():.3f} (allowed {LORA_TOLERANCE_MEAN})")


# -- d. SDXL end to end ----------------------------------------------------------------

def test_sdxl_end_to_end(comfy_server):
    g = Graph()
    pair, clip, vae = load_pair(g, SDXL_REF, SDXL_ALIGNED_UNET)
    conds = [out(g.add("CLIPTextEncodeSDXL", clip=clip, width=SIZE, height=SIZE, crop_w=0, crop_h=0,
                       target_width=SIZE, target_height=SIZE, text_g=text, text_l=text))
             for text in (POSITIVE, NEGATIVE)]
    latent = empty_latent(g)
    savers = {lam: save(g, out(deradiff_ksampler(g, pair, lam, *conds, latent, steps=2)), vae, f"d_sdxl_{lam}")
              for lam in (0.0, 0.5)}
    entry = comfy_server.run(g, timeout=400)
    imgs = {lam: one_image(comfy_server, entry, n) for lam, n in savers.items()}
    for lam, img in imgs.items():
        assert img.shape == (SIZE, SIZE, 3)
        assert_not_flat(img, f"SDXL λ={lam}")
    assert_different_images(imgs[0.5], imgs[0.0], "SDXL λ=0.5 vs λ=0")




# -- λ Schedule, λ Sweep, Realign Model (issue: schedules and sweeps) ------------------------

def schedule_node(g: Graph, pair=None, **kw) -> str:
    inputs = dict(shape="linear", lambda_from=1.0, lambda_to=0.0, start_percent=0.0, end_percent=1.0,
                  lambda_outside=0.0, custom_values="1, 1, 0.5, 0", preview_steps=STEPS)
    inputs.update(kw)
    if pair is not None:
        inputs["pair"] = pair
    return g.add("DeRaDiffLambdaSchedule", **inputs)


@pytest.fixture(scope="module")
def issue3_images(comfy_server):
    """One prompt: DeRaDiff KSampler at λ 0 and 0.5, the same through a constant schedule, a sweep
    of both λ (+ grid), a realigned MODEL in a plain KSampler, and a schedule preview."""
    g = Graph()
    pair, pclip, pvae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    pos, neg = encode_pair(g, pclip)
    latent = empty_latent(g)
    savers = {}
    for lam in (0.0, 0.5):
        savers[f"ks_{lam}"] = save(g, out(deradiff_ksampler(g, pair, lam, pos, neg, latent)), pvae, f"i3_ks_{lam}")
    constant = schedule_node(g, shape="constant", lambda_from=0.5)
    s = g.add("DeRaDiffKSampler", pair=pair, seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
              scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0,
              lambda_schedule=out(constant), **{"lambda": 0.0})
    savers["ks_schedule_0.5"] = save(g, out(s), pvae, "i3_sched")
    sweep = g.add("DeRaDiffLambdaSweep", pair=pair, lambdas="0, 0.5", seed=SEED, steps=STEPS, cfg=CFG,
                  sampler_name="euler", scheduler="normal", positive=pos, negative=neg, latent_image=latent,
                  denoise=1.0)
    decoded = g.add("VAEDecode", samples=out(sweep, 0), vae=pvae)
    savers["sweep"] = g.add("SaveImage", images=out(decoded), filename_prefix="i3_sweep")
    grid = g.add("DeRaDiffSweepGrid", images=out(decoded), labels=out(sweep, 1), columns=0)
    savers["grid"] = g.add("SaveImage", images=out(grid), filename_prefix="i3_grid")
    model = g.add("DeRaDiffRealignModel", pair=pair, **{"lambda": 0.5})
    savers["realigned_ksampler"] = save(g, out(ksampler(g, out(model), pos, neg, latent)), pvae, "i3_realign")
    preview = schedule_node(g, pair=pair, shape="interval", lambda_from=1.5, end_percent=0.4)
    # a schedule node is not an output: feed it to a sampler so it runs
    s = g.add("DeRaDiffKSampler", pair=pair, seed=SEED, steps=STEPS, cfg=CFG, sampler_name="heun",
              scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0,
              lambda_schedule=out(preview), **{"lambda": 1.0})
    savers["interval"] = save(g, out(s), pvae, "i3_interval")
    entry = comfy_server.run(g, timeout=400)
    images = {k: saved_images(comfy_server, entry, n) for k, n in savers.items()}
    return images, entry, preview


def test_schedule_sweep_and_realigned_model_through_the_server(comfy_server, issue3_images):
    images, entry, preview_node = issue3_images
    assert_different_images(images["ks_0.0"][0], images["ks_0.5"][0], "λ 0 vs 0.5")
    assert_same_image(images["ks_schedule_0.5"][0], images["ks_0.5"][0], "constant schedule 0.5 vs λ 0.5")
    sweep = images["sweep"]
    assert len(sweep) == 2
    for got, want, what in ((sweep[0], images["ks_0.0"][0], "sweep λ 0"), (sweep[1], images["ks_0.5"][0], "sweep λ 0.5")):
        d = diff(got, want)
        assert d.max() <= 2, f"{what}: max difference {d.max()}/255 from the separate DeRaDiff KSampler run"
    grid = images["grid"][0]
    assert grid.shape[1] == 2 * SIZE and grid.shape[0] > SIZE  # two tiles side by side, labels below
    d = diff(images["realigned_ksampler"][0], images["ks_0.5"][0])
    assert d.max() <= 2, f"realigned MODEL in KSampler vs DeRaDiff KSampler: max difference {d.max()}/255"
    assert_not_flat(images["interval"][0], "interval schedule")


def test_schedule_preview_is_served_by_the_server(comfy_server, issue3_images):
    """The editor draws the preview from the curve the server sends (interval 1.5 over the first 40 %)."""
    _, entry, preview_node = issue3_images
    ui = entry["outputs"].get(preview_node, {})
    assert ui.get("deradiff") and "1.5" in ui["deradiff"][0]
    (preview,) = ui["deradiff_preview"]
    curve = np.array(preview["curve"])
    assert len(curve) > 50 and preview["custom_steps"] == 0
    progress = np.linspace(0, 1, len(curve))
    assert np.all(curve[progress < 0.39] == 1.5) and np.all(curve[progress > 0.41] == 0.0), curve


def test_changing_only_the_grid_beta_re_runs_only_the_grid(comfy_server):
    """β is display-only: the editor sends it to the Sweep Grid (not the pair loader), so a new β
    re-draws the labels from the cached sweep; the same λ-only labels, then with β/λ."""
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, SD15_ALIGNED_CKPT)
    pos, neg = encode_pair(g, clip)
    sweep = g.add("DeRaDiffLambdaSweep", pair=pair, lambdas="0, 2", seed=SEED, steps=2, cfg=CFG,
                  sampler_name="euler", scheduler="normal", positive=pos, negative=neg,
                  latent_image=empty_latent(g), denoise=1.0)
    decoded = g.add("VAEDecode", samples=out(sweep, 0), vae=vae)
    grid = g.add("DeRaDiffSweepGrid", images=out(decoded), labels=out(sweep, 1), columns=0, beta=0.0)
    saver = g.add("SaveImage", images=out(grid), filename_prefix="beta_grid")
    first = comfy_server.run(g, timeout=400)
    g[grid]["inputs"]["beta"] = 5000.0
    second = comfy_server.run(g, timeout=400)
    cached = set(status_messages(second).get("execution_cached", {}).get("nodes", []))
    assert {pair[0], sweep, decoded} <= cached, f"re-ran more than the grid: cached only {sorted(cached)}"
    assert grid not in cached and saver not in cached
    a, b = one_image(comfy_server, first, saver), one_image(comfy_server, second, saver)
    assert a.shape[1] == b.shape[1] == 2 * SIZE
    assert np.array_equal(a[:SIZE], b[:SIZE]), "the images themselves changed with β"
    assert a[SIZE:].shape != b[SIZE:].shape or not np.array_equal(a[SIZE:], b[SIZE:]), \
        "the labels did not change with β"


# -- aligned models as LoRA or diffusers UNet (issue: shared weights) ---------------------------

def test_diffusers_unet_file_and_folder_through_the_server(comfy_server):
    from conftest import ensure_standin
    single = ensure_standin("diffusion_models/sd15_aligned_diffusers_unet.safetensors")
    folder = comfy_server.root / "models" / "diffusion_models" / "dpo-sd15" / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "diffusion_pytorch_model.safetensors"
    if not link.exists():
        link.symlink_to(single)
    g = Graph()
    savers = {}
    for name, aligned in (("file", "diffusion_models/sd15_aligned_diffusers_unet.safetensors"),
                          ("folder", "diffusion_models/dpo-sd15/unet/")):
        pair, pclip, pvae = load_pair(g, SD15_REF, aligned)
        pos, neg = encode_pair(g, pclip)
        savers[name] = save(g, out(deradiff_ksampler(g, pair, 1.0, pos, neg, empty_latent(g), steps=1)), pvae, f"d_{name}")
    model, clip, vae = load_checkpoint(g, SD15_REF)
    unet = out(g.add("UNETLoader", unet_name="sd15_aligned_diffusers_unet.safetensors", weight_dtype="default"))
    cpos, cneg = encode_pair(g, clip)
    savers["unetloader"] = save(g, out(ksampler(g, unet, cpos, cneg, empty_latent(g), steps=1)), vae, "d_ul")
    entry = comfy_server.run(g, timeout=600)
    imgs = {k: one_image(comfy_server, entry, n) for k, n in savers.items()}
    assert_same_image(imgs["file"], imgs["unetloader"], "diffusers file λ=1 vs UNETLoader + KSampler")
    assert_same_image(imgs["folder"], imgs["file"], "diffusers folder vs file")
    # a diffusers UNet of another family is refused, naming the file
    g = Graph()
    pair, pclip, pvae = load_pair(g, SDXL_REF, "diffusion_models/dpo-sd15/unet/")
    pos, neg = encode_pair(g, pclip)
    save(g, out(deradiff_ksampler(g, pair, 0.5, pos, neg, empty_latent(g), steps=1)), pvae, "d_bad")
    entry = comfy_server.run(g, timeout=300, expect_success=False)
    message = error_message_of(entry)
    assert "dpo-sd15/unet/" in message and "different model families" in message
    # the full-size UNets (3.4 GB each) must not stay resident for the rest of the session
    comfy_server.http.post(comfy_server.base + "/free", json={"unload_models": True, "free_memory": True}, timeout=30)


def error_message_of(entry: dict) -> str:
    from server_rig import error_message
    return error_message(entry)
