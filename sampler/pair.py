"""The model pair: a reference ModelPatcher and one aligned at some beta."""
from __future__ import annotations

import copy
import logging
import uuid
from dataclasses import dataclass, field

import torch

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.utils

log = logging.getLogger("DeRaDiff")


class PairError(ValueError):
    """The two models cannot be realigned together."""


@dataclass
class AlignedPair:
    """What flows along a DERADIFF_PAIR link."""
    reference: object  # comfy.model_patcher.ModelPatcher
    aligned: object
    beta: float | None = None
    reference_name: str = "reference"
    aligned_name: str = "aligned"
    _side: object = field(default=None, repr=False)

    def aligned_side(self) -> "AlignedSide":
        """How the aligned model runs next to the reference (decided once per pair)."""
        if self._side is None:
            self._side = _plan_aligned_side(self)
        return self._side


@dataclass
class AlignedSide:
    """Exactly one of: a separate ModelPatcher loaded next to the reference, or an update
    applied on the fly to the reference's own weights (shared)."""
    patcher: object = None
    shared: object = None  # sampler.shared_weights.SharedWeightDelta


def _plan_aligned_side(pair) -> AlignedSide:
    from .shared_weights import SharedWeightDelta, SharedWeightsUnavailable
    if not pair.reference.is_clone(pair.aligned):
        return AlignedSide(patcher=pair.aligned)
    try:
        shared = SharedWeightDelta(pair.reference, pair.aligned)
    except SharedWeightsUnavailable as why:
        copy_ = separate_copy(pair.aligned)
        log.warning(
            "DeRaDiff: '%s' and '%s' share one base model but the aligned side cannot reuse the "
            "reference's weights (%s); loading a second full copy of the diffusion model (%.0f MB).",
            pair.reference_name, pair.aligned_name, why, copy_.model_size() / 2**20)
        return AlignedSide(patcher=copy_)
    log.info("DeRaDiff: '%s' is '%s' plus %d patched layers (%.1f MB); both passes share the "
             "reference's weights and the update is applied on the fly.", pair.aligned_name,
             pair.reference_name, len(shared.patches), shared.patch_bytes() / 2**20)
    return AlignedSide(shared=shared)


def describe(patcher) -> str:
    return type(patcher.model.model_config).__name__


def _family(patcher) -> tuple:
    unet = patcher.model.model_config.unet_config
    return (type(patcher.model).__name__, unet.get("context_dim"), unet.get("adm_in_channels"),
            unet.get("in_channels"))


def _latent_format(patcher):
    fmt = patcher.get_model_object("latent_format")
    return type(fmt).__name__, fmt.latent_channels, float(fmt.scale_factor)


def _schedule(patcher):
    ms = patcher.get_model_object("model_sampling")
    sigmas = getattr(ms, "sigmas", None)
    kind = "flow" if isinstance(ms, comfy.model_sampling.CONST) else "diffusion"
    return kind, (None if sigmas is None else sigmas.detach().float().cpu()), \
        float(ms.sigma_min), float(ms.sigma_max)


def check_compatible(reference, aligned, reference_name: str, aligned_name: str):
    """Refuse pairs whose denoised predictions do not live in one space."""
    who = f"the reference '{reference_name}' ({describe(reference)}) and the aligned model '{aligned_name}' ({describe(aligned)})"
    fam_r, fam_a = _family(reference), _family(aligned)
    if fam_r != fam_a:
        raise PairError(
            f"{who} are different model families: {fam_r[0]} with text context {fam_r[1]} "
            f"vs {fam_a[0]} with text context {fam_a[1]} (adm {fam_r[2]} vs {fam_a[2]}). "
            "Pick an aligned model fine-tuned from this reference (SD1.5 with SD1.5, SDXL with SDXL).")
    lat_r, lat_a = _latent_format(reference), _latent_format(aligned)
    if lat_r != lat_a:
        raise PairError(f"{who} use different latent formats: {lat_r[0]} ({lat_r[1]} channels, scale "
                        f"{lat_r[2]:g}) vs {lat_a[0]} ({lat_a[1]} channels, scale {lat_a[2]:g}).")
    kind_r, sig_r, lo_r, hi_r = _schedule(reference)
    kind_a, sig_a, lo_a, hi_a = _schedule(aligned)
    same = kind_r == kind_a and abs(lo_r - lo_a) <= 1e-5 * max(lo_r, 1e-8) and abs(hi_r - hi_a) <= 1e-5 * hi_r
    if same and sig_r is not None and sig_a is not None:
        same = sig_r.shape == sig_a.shape and torch.allclose(sig_r, sig_a, rtol=1e-5, atol=1e-7)
    if not same:
        raise PairError(
            f"{who} use different noise schedules ({kind_r} sigma {lo_r:.4g}..{hi_r:.4g} vs "
            f"{kind_a} sigma {lo_a:.4g}..{hi_a:.4g}). DeRaDiff mixes the two models at the same "
            "noise level; remove any ModelSampling patch that applies to only one of them.")


def make_pair(reference, aligned, beta=None, reference_name="reference", aligned_name="aligned") -> AlignedPair:
    check_compatible(reference, aligned, reference_name, aligned_name)
    return AlignedPair(reference, aligned, beta if beta and beta > 0 else None, reference_name, aligned_name)


def separate_copy(patcher):
    """A ModelPatcher over its own copy of the base model with the patches merged in.

    Used when reference and aligned are clones of one model: ComfyUI patches
    weights in place, so the two could otherwise never be resident together.
    """
    base = patcher.model
    key_patches = patcher.get_key_patches()  # original weights (unpatched) + this clone's patches
    memo = {id(base.model_config): base.model_config}
    if getattr(base, "current_patcher", None) is not None:
        memo[id(base.current_patcher)] = None
    with torch.no_grad():
        model = copy.deepcopy(base, memo)
        touched = set(patcher.patches) | set(patcher.backup) | set(patcher.hook_backup)
        for key, chain in key_patches.items():
            if key not in touched:
                continue  # never patched in place: the deep copy already holds it
            original, convert = chain[0]
            target = comfy.utils.get_attr(model, key)
            weight = convert(original.to(torch.float32, copy=True), inplace=True)
            if len(chain) > 1:
                weight = comfy.lora.calculate_weight(chain[1:], weight, key)
            comfy.utils.set_attr_param(model, key, weight.to(device=patcher.offload_device, dtype=target.dtype))
    for m in model.modules():
        if hasattr(m, "weight_function"):
            m.weight_function = []
            m.bias_function = []
        if hasattr(m, "comfy_patched_weights"):
            m.comfy_patched_weights = False
    model.current_patcher = None
    model.current_weight_patches_uuid = None
    model.model_loaded_weight_memory = 0
    model.model_lowvram = False
    model.lowvram_patch_counter = 0
    model.device = patcher.offload_device
    model.to(patcher.offload_device)

    copy_patcher = patcher.clone()
    copy_patcher.model = model
    copy_patcher.size = 0
    copy_patcher.patches = {}
    copy_patcher.backup = {}
    copy_patcher.object_patches_backup = {}
    copy_patcher.hook_backup = {}
    copy_patcher.pinned = set()
    copy_patcher.parent = None
    copy_patcher.patches_uuid = uuid.uuid4()
    return copy_patcher
