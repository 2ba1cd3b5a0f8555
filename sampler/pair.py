"""The model pair: a reference ModelPatcher and one aligned at some beta."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch

import comfy.float
import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
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
    """What must be equal for two models to be one family. UNets (SD1.x, SD2.x, SDXL): the model class,
    text context width, adm vector and latent channels. Transformers (SD3/SD3.5 MMDiT, Flux.1 and
    other ``image_model`` configs): the model class, architecture, latent channels, text context width
    and, for Flux, whether it takes a guidance input (Flux.1-dev does, Flux.1-schnell does not)."""
    unet = patcher.model.model_config.unet_config
    name = type(patcher.model).__name__
    if "context_dim" in unet and "image_model" not in unet:
        return (name, unet.get("context_dim"), unet.get("adm_in_channels"), unet.get("in_channels"))
    context = unet.get("context_in_dim")
    embedder = unet.get("context_embedder_config")
    if context is None and isinstance(embedder, dict):
        context = embedder.get("params", {}).get("in_features")
    arch = unet.get("image_model") or ("mmdit" if "context_embedder_config" in unet or
                                       "x_block_self_attn_layers" in unet else None)
    return (name, arch, unet.get("in_channels"), context, bool(unet.get("guidance_embed", False)))


def _family_text(fam: tuple) -> str:
    if len(fam) == 4:
        return f"{fam[0]} with text context {fam[1]} (adm {fam[2]})"
    name, arch, channels, context, guidance = fam
    text = f"{name} ({arch or 'transformer'}, {channels} latent channels, text context {context}"
    if arch == "flux":
        text += ", guidance input: yes (guidance-distilled, like Flux.1-dev)" if guidance \
            else ", guidance input: no (like Flux.1-schnell)"
    return text + ")"


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
        if len(fam_r) == len(fam_a) == 4:
            what = (f"{fam_r[0]} with text context {fam_r[1]} vs {fam_a[0]} with text context {fam_a[1]} "
                    f"(adm {fam_r[2]} vs {fam_a[2]})")
        else:
            what = f"{_family_text(fam_r)} vs {_family_text(fam_a)}"
        raise PairError(
            f"{who} are different model families: {what}. Pick an aligned model fine-tuned from this "
            "reference (SD1.5 with SD1.5, SD2.x with SD2.x, SDXL with SDXL, SD3.5 with SD3.5, Flux.1-dev with "
            "Flux.1-dev, Flux.1-schnell with Flux.1-schnell).")
    lat_r, lat_a = _latent_format(reference), _latent_format(aligned)
    if lat_r != lat_a:
        raise PairError(f"{who} use different latent formats: {lat_r[0]} ({lat_r[1]} channels, scale "
                        f"{lat_r[2]:g}) vs {lat_a[0]} ({lat_a[1]} channels, scale {lat_a[2]:g}).")
    noise_r = _noising(reference.get_model_object("model_sampling"))
    noise_a = _noising(aligned.get_model_object("model_sampling"))
    if noise_r != noise_a:
        raise PairError(f"{who} use prediction types that change the meaning of the mix: "
                        f"{_schedule_origin(reference, 'reference')} vs {_schedule_origin(aligned, 'aligned model')}. "
                        f"{_NOISING[noise_r] if noise_r in _NOISING else noise_r} vs "
                        f"{_NOISING[noise_a] if noise_a in _NOISING else noise_a}: the two models do not see the "
                        "same noisy input at a noise level, so their predictions cannot be mixed. (eps-, v- and "
                        "x0-prediction models of one family with the same schedule do mix: each converts its "
                        "output to x0.) Remove the ModelSampling node that changes one of them, or give both "
                        "the same one.")
    kind_r, sig_r, lo_r, hi_r = _schedule(reference)
    kind_a, sig_a, lo_a, hi_a = _schedule(aligned)
    same = kind_r == kind_a and abs(lo_r - lo_a) <= 1e-5 * max(lo_r, 1e-8) and abs(hi_r - hi_a) <= 1e-5 * hi_r
    if same and sig_r is not None and sig_a is not None:
        same = sig_r.shape == sig_a.shape and torch.allclose(sig_r, sig_a, rtol=1e-5, atol=1e-7)
    if not same:
        raise PairError(f"{who} use different noise schedules: {_schedule_origin(reference, 'reference')} vs "
                        f"{_schedule_origin(aligned, 'aligned model')}. DeRaDiff mixes the two models at the "
                        f"same noise level. {_schedule_advice(reference, aligned)}")


# How a model's input is noised at sigma: within one group every prediction type (eps, v, x0, EDM)
# turns its output into the same x0 estimate, so two models mix; across groups they do not.
_NOISING = {"EPS": "diffusion noising x = x0 + sigma*noise (eps / v / x0 prediction)",
            "CONST": "rectified-flow noising x = (1-sigma)*x0 + sigma*noise",
            "IMG_TO_IMG": "image-to-image input (no noising)", "COSMOS_RFLOW": "Cosmos rectified-flow noising"}


def _noising(ms) -> str:
    for name in ("IMG_TO_IMG", "COSMOS_RFLOW", "CONST", "EPS"):  # most specific first
        cls = getattr(comfy.model_sampling, name, None)
        if cls is not None and isinstance(ms, cls):
            return name
    return type(ms).__name__


_PREDICTIONS = (("IMG_TO_IMG", "image-to-image"), ("V_PREDICTION_EDM", "v-prediction (EDM)"), ("V_PREDICTION_CONTINUOUS", "v-prediction (continuous)"),
                ("V_PREDICTION", "v-prediction"), ("EDM", "EDM"), ("EPS", "eps-prediction"),
                ("CONST", "flow (rectified)"), ("X0", "x0-prediction"))


def _prediction(ms) -> str:
    for name, label in _PREDICTIONS:
        cls = getattr(comfy.model_sampling, name, None)
        if cls is not None and isinstance(ms, cls):
            return label
    return type(ms).__name__


def _sampling_patched(patcher) -> bool:
    return "model_sampling" in getattr(patcher, "object_patches", {})


def _schedule_origin(patcher, role) -> str:
    """What the schedule is and where it comes from, e.g. "the reference: v-prediction,
    zero-terminal SNR, sigma 0.0292..4.5e+03, from a ModelSampling patch"."""
    ms = patcher.get_model_object("model_sampling")
    kind, sigmas, lo, hi = _schedule(patcher)
    parts = [_prediction(ms)]
    if kind == "diffusion":
        # ComfyUI's zero-terminal-SNR rescale leaves a final sigma of about 4.5e3 (a normal
        # SD schedule ends near 14.6)
        parts.append("zero-terminal SNR" if hi > 1000.0 else "no zero-terminal SNR")
    parts.append(f"sigma {lo:.4g}..{hi:.4g}")
    parts.append("from a ModelSampling patch" if _sampling_patched(patcher) else "from its checkpoint")
    return f"the {role}: " + ", ".join(parts)


def _schedule_advice(reference, aligned) -> str:
    patched = [name for name, p in (("reference", reference), ("aligned model", aligned)) if _sampling_patched(p)]
    if len(patched) == 1:
        return (f"Only the {patched[0]} has a ModelSampling patch: remove it, or apply the same ModelSampling "
                "node with the same settings to both models.")
    if patched:
        return "Both models have ModelSampling patches with different settings: give both the same settings."
    return ("Both schedules come from the checkpoints themselves (one was trained with another prediction type "
            "or zero-terminal SNR): pick an aligned model fine-tuned with the reference's schedule, or apply "
            "the same ModelSampling node (same settings) to both models.")


def make_pair(reference, aligned, beta=None, reference_name="reference", aligned_name="aligned") -> AlignedPair:
    check_compatible(reference, aligned, reference_name, aligned_name)
    return AlignedPair(reference, aligned, beta if beta and beta > 0 else None, reference_name, aligned_name)


def _patcher_class(patcher):
    """The class comfy.sd wraps a freshly loaded model in: CoreModelPatcher (ModelPatcherDynamic
    when Dynamic VRAM is on, in ComfyUI versions that have it), or ModelPatcher."""
    core = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    is_dynamic = getattr(patcher, "is_dynamic", None)
    if is_dynamic is not None and not is_dynamic():
        return comfy.model_patcher.ModelPatcher  # the aligned model was loaded without Dynamic VRAM
    return core


def _merged_weight(patcher, key, chain, device):
    """``key``'s weight with the clone's patches merged out of place, in the layer's stored format,
    as ComfyUI's own merge (ModelPatcher.patch_weight_to_device) computes it."""
    original, convert = chain[0]
    _, set_func, _ = comfy.model_patcher.get_key_weight(patcher.model, key)
    weight = convert(original.to(torch.float32, copy=True), inplace=True)
    weight = comfy.lora.calculate_weight(chain[1:], weight, key)
    from .shared_weights import string_to_seed
    seed = string_to_seed(key)
    if set_func is not None:
        weight = set_func(weight, seed=seed, return_weight=True)
    else:
        weight = comfy.float.stochastic_rounding(weight, original.dtype, seed=seed)
    return weight.to(device)


def separate_copy(patcher, disable_dynamic=False):
    """A new ModelPatcher over its own BaseModel, holding ``patcher``'s weights with its patches
    merged in.

    Used when reference and aligned are clones of one model but the aligned side cannot share
    the reference's weights: ComfyUI patches weights (and object patches) in place, so the two
    could otherwise never be resident together. The copy is built through ComfyUI's public
    loading path, as comfy.sd does: a fresh BaseModel from the model config, loaded with the
    ORIGINAL weights (``get_key_patches``: the unpatched weight heads each chain) merged with the
    clone's patches out of place, wrapped in the patcher class comfy.sd uses (so under Dynamic
    VRAM it is a ModelPatcherDynamic with its own host buffers). The base model's current
    parameters and objects, which other clones may have patched in place, are never read. The
    clone's object patches, model options, wrappers, callbacks, attachments, injections and
    additional models are carried over through public methods.

    Like a model from comfy.sd's loaders, the copy knows how to build itself again
    (``cached_patcher_init``, ComfyUI 0.3x+): ``clone(force_deepcopy=True)``, the non-dynamic
    delegate and MultiGPU's ``deepclone_multigpu`` call it for a fresh model with its own weights.
    ``disable_dynamic`` asks for a plain ModelPatcher, as those callers do.
    """
    base = patcher.model
    config = base.model_config
    prefix = "diffusion_model."
    offload = patcher.offload_device
    cls = comfy.model_patcher.ModelPatcher if disable_dynamic else _patcher_class(patcher)
    state_dict, merged = {}, set()
    with torch.no_grad():
        for key, chain in patcher.get_key_patches(prefix).items():
            if len(chain) > 1:
                state_dict[key] = _merged_weight(patcher, key, chain, offload)
                merged.add(key)
            else:
                state_dict[key] = chain[0][0]
        model = config.get_model(state_dict, prefix, device=offload)
        copy_ = cls(model, load_device=patcher.load_device, offload_device=offload)
        if "assign" in inspect.signature(model.load_model_weights).parameters:
            assign = bool(getattr(copy_, "is_dynamic", lambda: False)())
            if assign:  # the new model takes the tensors: give it its own, never the original's
                for key in state_dict.keys() - merged:
                    state_dict[key] = state_dict[key].to(offload, copy=True)
            model.load_model_weights(state_dict, prefix, assign=assign)
        else:  # loading copies the values into the new model's parameters
            model.load_model_weights(state_dict, prefix)
    del state_dict

    # the prediction type can come from keys of the checkpoint that are not model weights
    # (v_pred, ztsnr in SDXL files): keep the original model's own sampling object
    original_type = getattr(base, "model_type", None)
    if original_type is not None and getattr(model, "model_type", None) != original_type:
        copy_.add_object_patch("model_sampling", comfy.model_base.model_sampling(config, original_type))
    for name, obj in patcher.object_patches.items():
        copy_.add_object_patch(name, obj)
    copy_.model_options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    for wrapper_type, by_key in getattr(patcher, "wrappers", {}).items():
        for key, wrappers in by_key.items():
            for wrapper in wrappers:
                copy_.add_wrapper_with_key(wrapper_type, key, wrapper)
    for call_type, by_key in getattr(patcher, "callbacks", {}).items():
        for key, callbacks in by_key.items():
            for callback in callbacks:
                copy_.add_callback_with_key(call_type, key, callback)
    for key, attachment in getattr(patcher, "attachments", {}).items():
        copy_.set_attachments(key, attachment.on_model_patcher_clone()
                              if hasattr(attachment, "on_model_patcher_clone") else attachment)
    for key, injections in getattr(patcher, "injections", {}).items():
        copy_.set_injections(key, list(injections))
    for key, models in getattr(patcher, "additional_models", {}).items():
        copy_.set_additional_models(key, [m.clone() for m in models])
    if hasattr(copy_, "cached_patcher_init"):
        copy_.cached_patcher_init = (separate_copy, (patcher,))
    return copy_
