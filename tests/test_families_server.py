"""The model families of issue 14 through a real ComfyUI HTTP server (see server_rig.py).

One prompt per family, built as a user builds it: UNETLoader for the reference and the aligned model,
Make Aligned Model Pair, DeRaDiff KSampler, a plain KSampler, SaveLatent. The conditioning comes from the
TEST-ONLY node ``DeRaDiffTestFamilyConditioning`` (tests/family_nodes, linked into the test server by the
rig, never shipped), because the families' text encoders (OpenCLIP-H, CLIP-G, T5-XXL) are too large here;
Flux.1-dev's guidance goes through ComfyUI's own FluxGuidance node. Latents are compared bit for bit from
the files SaveLatent wrote.
"""
from __future__ import annotations

import pytest
import torch


# family -> (reference file, aligned file, conditioning family, latent channels, cfg, guidance)
FAMILIES = {
    "sd2_vpred": ("sd2_vpred_reference_unet.safetensors", "sd2_vpred_aligned_unet.safetensors", "sd2", 4, 5.0, None),
    "sdxl_vpred_ztsnr": ("sdxl_vpred_ztsnr_reference_unet.safetensors", "sdxl_vpred_ztsnr_aligned_unet.safetensors",
                         "sdxl", 4, 5.0, None),
    "sd35": ("sd35_reference.safetensors", "sd35_aligned.safetensors", "sd3", 16, 4.0, None),
    "flux_dev": ("flux1_dev_reference.safetensors", "flux1_dev_aligned.safetensors", "flux", 16, 1.0, 3.5),
    "flux_schnell": ("flux1_schnell_reference.safetensors", "flux1_schnell_aligned.safetensors", "flux", 16, 1.0, None),
}
STEPS = 2
SEED = 11


class Graph(dict):
    def add(self, class_type: str, **inputs) -> list:
        node_id = str(len(self) + 1)
        self[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]


def saved_latent(server, entry, link):
    from safetensors.torch import load_file
    files = entry["outputs"][link[0]]["latents"]
    assert len(files) == 1
    return load_file(str(server.output_dir / files[0]["subfolder"] / files[0]["filename"]))["latent_tensor"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_pair_through_the_server(comfy_server, family):
    from standins import FAMILY_STANDINS, ensure_standin
    ref, aligned, cond, channels, cfg, guidance = FAMILIES[family]
    for name in (ref, aligned):
        ensure_standin(next(n for n in FAMILY_STANDINS if n.endswith("/" + name)))
    g = Graph()
    ref_model = g.add("UNETLoader", unet_name=ref, weight_dtype="default")
    aligned_model = g.add("UNETLoader", unet_name=aligned, weight_dtype="default")
    pair = g.add("DeRaDiffMakePair", reference=ref_model, aligned=aligned_model, beta=0.0)
    pos = g.add("DeRaDiffTestFamilyConditioning", family=cond, seed=1, tokens=8)
    neg = g.add("DeRaDiffTestFamilyConditioning", family=cond, seed=2, tokens=8)
    if guidance is not None:
        pos_other = g.add("FluxGuidance", conditioning=pos, guidance=6.0)
        pos = g.add("FluxGuidance", conditioning=pos, guidance=guidance)
    if channels == 16:
        latent = g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    else:
        latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    common = dict(seed=SEED, steps=STEPS, cfg=cfg, sampler_name="euler", scheduler="normal", negative=neg,
                  latent_image=latent, denoise=1.0)

    def save(samples, prefix):
        return g.add("SaveLatent", samples=samples, filename_prefix=f"families/{family}_{prefix}")

    plain = save(g.add("KSampler", model=ref_model, positive=pos, **common), "ksampler_ref")
    lam0 = save(g.add("DeRaDiffKSampler", pair=pair, positive=pos, **common, **{"lambda": 0.0}), "lambda0")
    half = save(g.add("DeRaDiffKSampler", pair=pair, positive=pos, **common, **{"lambda": 0.5}), "lambda05")
    realigned = g.add("DeRaDiffRealignModel", pair=pair, **{"lambda": 0.5})
    via_model = save(g.add("KSampler", model=realigned, positive=pos, **common), "realign05")
    if guidance is not None:
        other = save(g.add("DeRaDiffKSampler", pair=pair, positive=pos_other, **common, **{"lambda": 0.5}),
                     "lambda05_guidance6")
    entry = comfy_server.run(g, timeout=300)
    got = {k: saved_latent(comfy_server, entry, v) for k, v in
           dict(plain=plain, lam0=lam0, half=half, via_model=via_model).items()}
    assert got["plain"].shape[1] == channels and torch.isfinite(got["half"]).all()
    assert torch.equal(got["lam0"], got["plain"])  # λ = 0 is KSampler with the reference, bit for bit
    assert not torch.allclose(got["half"], got["plain"], atol=1e-3)
    scale = float(got["half"].abs().max())
    torch.testing.assert_close(got["via_model"], got["half"], rtol=1e-4, atol=1e-4 * scale)
    if guidance is not None:  # FluxGuidance's value reaches the realigned pair
        assert not torch.allclose(saved_latent(comfy_server, entry, other), got["half"], atol=1e-3)


def test_test_only_node_is_not_part_of_the_shipped_pack(comfy_server, pack):
    info = comfy_server.object_info("DeRaDiffTestFamilyConditioning")
    assert "deradiff_test_nodes" in info["python_module"]
    assert "DeRaDiffTestFamilyConditioning" not in pack.NODE_CLASS_MAPPINGS
