from __future__ import annotations

import logging
import os
import re

import torch

import comfy.lora
import comfy.lora_convert
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..sampler.pair import PairError, describe, make_pair
from .common import NodeInputError, Pair, beta_input, check_number, combo_validation, schema

log = logging.getLogger("DeRaDiff")

# Prefixes of the aligned_model choices: which ComfyUI folder the file comes from.
CHECKPOINT_PREFIX = "checkpoints/"
DIFFUSION_MODEL_PREFIX = "diffusion_models/"
LORA_PREFIX = "loras/"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


def diffusers_folders():
    """Folders under models/diffusion_models (or models/unet) that hold a diffusers UNet,
    possibly sharded (diffusion_pytorch_model-00001-of-00002.safetensors), listed with a trailing '/'."""
    found = set()
    for name in folder_paths.get_filename_list("diffusion_models"):
        folder, base = os.path.split(name)
        if folder and base.startswith(DIFFUSERS_WEIGHTS) and base.endswith(".safetensors"):
            found.add(folder.replace(os.sep, "/") + "/")
    return sorted(found)


_LORA_SUFFIX = re.compile(r"\.(lora_up|lora_down|lora_A|lora_B|lora_mid|lora\.up|lora\.down|alpha|dora_scale|"
                          r"hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|diff|diff_b|set_weight|"
                          r"on_input|w_norm|b_norm|a1|a2|b1|b2|oft_blocks|rescale)(\.weight|\.bias)?$")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "lora_te1", "lora_te2", "te1", "te2")


def lora_unet_layers(lora: dict) -> set:
    """Distinct layer names a LoRA file patches, text-encoder layers left out."""
    layers = set()
    for key in lora:
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            continue
        layers.add(_LORA_SUFFIX.sub("", key))
    return layers


def lora_text_encoder_layers(lora: dict) -> set:
    return {_LORA_SUFFIX.sub("", key) for key in lora if key.startswith(_TEXT_ENCODER_PREFIXES)}


def aligned_model_choices():
    return ([CHECKPOINT_PREFIX + f for f in folder_paths.get_filename_list("checkpoints")]
            + [DIFFUSION_MODEL_PREFIX + f for f in folder_paths.get_filename_list("diffusion_models")]
            + [DIFFUSION_MODEL_PREFIX + f for f in diffusers_folders()]
            + [LORA_PREFIX + f for f in folder_paths.get_filename_list("loras")])


def _full_path(node, input_name, folder, name):
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise NodeInputError(node, input_name, f"'{name}' was not found in models/{folder}. "
                             "Put the file there, then press R in ComfyUI to refresh the list.")
    return path


class DeRaDiffLoadAlignedPair(io.ComfyNode):
    NODE = "Load Aligned Model Pair (DeRaDiff)"
    validate_inputs = combo_validation('reference_ckpt_name', 'aligned_model')
    ABOUT = ("Loads a reference checkpoint and a model aligned from it (DPO, SPO, KTO, MaPO, "
             "reward fine-tune) as a DeRaDiff pair. The aligned model can be a full checkpoint "
             "or a diffusion-model-only file (original or diffusers layout).")

    @classmethod
    def define_schema(cls):
        return schema("DeRaDiffLoadAlignedPair", cls.NODE, cls.ABOUT, [
            io.Combo.Input("reference_ckpt_name", options=folder_paths.get_filename_list("checkpoints"), tooltip=(
                "The reference (base) checkpoint, from models/checkpoints. Its CLIP "
                "and VAE are used for both models.")),
            io.Combo.Input("aligned_model", options=aligned_model_choices(), tooltip=(
                "The aligned model: a full checkpoint (checkpoints/...), a "
                "diffusion-model-only file or diffusers UNet folder from "
                "models/diffusion_models or models/unet (diffusion_models/...), e.g. "
                "Diffusion-DPO's UNet, or a LoRA / weight difference on the reference "
                "(loras/...), e.g. an SPO or DPO LoRA. LoRAs share the reference's "
                "weights: no second copy of the model in memory.")),
            beta_input(),
            io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.01, optional=True, tooltip=(
                "Only for a LoRA aligned_model: its strength on the reference (1 = as trained).")),
        ], [
            Pair.Output(display_name="pair", tooltip="The reference and aligned models, for DeRaDiff KSampler / Guider."),
            io.Clip.Output(display_name="CLIP", tooltip="The reference checkpoint's text encoder."),
            io.Vae.Output(display_name="VAE", tooltip="The reference checkpoint's VAE."),
        ])

    @classmethod
    def execute(cls, reference_ckpt_name, aligned_model, beta=0.0, lora_strength=1.0):
        beta = check_number(cls.NODE, "beta", beta, 0.0)
        lora_strength = check_number(cls.NODE, "lora_strength", lora_strength)
        ref_path = _full_path(cls.NODE, "reference_ckpt_name", "checkpoints", reference_ckpt_name)
        try:
            reference, clip, vae = comfy.sd.load_checkpoint_guess_config(
                ref_path, output_vae=True, output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
        except Exception as e:
            raise NodeInputError(cls.NODE, "reference_ckpt_name", f"could not load '{reference_ckpt_name}': {e}") from e
        aligned = cls._load_aligned(aligned_model, reference, lora_strength)
        try:
            pair = make_pair(reference, aligned, beta, reference_ckpt_name, aligned_model)
        except PairError as e:
            raise NodeInputError(cls.NODE, "aligned_model", str(e)) from None
        return io.NodeOutput(pair, clip, vae)

    @classmethod
    def _load_aligned(cls, aligned_model, reference, lora_strength=1.0):
        dtype = {"dtype": reference.model_dtype()}  # fp32 releases load at the reference's dtype
        if aligned_model.startswith(CHECKPOINT_PREFIX):
            name = aligned_model[len(CHECKPOINT_PREFIX):]
            path = _full_path(cls.NODE, "aligned_model", "checkpoints", name)
            load = lambda: comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False,
                                                                  model_options=dtype)[0]
        elif aligned_model.startswith(DIFFUSION_MODEL_PREFIX) and aligned_model.endswith("/"):
            name = aligned_model[len(DIFFUSION_MODEL_PREFIX):]
            load = lambda: cls._load_diffusers_folder(name, dtype)
        elif aligned_model.startswith(DIFFUSION_MODEL_PREFIX):
            name = aligned_model[len(DIFFUSION_MODEL_PREFIX):]
            path = _full_path(cls.NODE, "aligned_model", "diffusion_models", name)
            load = lambda: comfy.sd.load_diffusion_model(path, model_options=dtype)
        elif aligned_model.startswith(LORA_PREFIX):
            name = aligned_model[len(LORA_PREFIX):]
            path = _full_path(cls.NODE, "aligned_model", "loras", name)
            return cls._apply_lora(reference, name, path, lora_strength)
        else:
            raise NodeInputError(cls.NODE, "aligned_model",
                                 f"'{aligned_model}' must start with '{CHECKPOINT_PREFIX}', "
                                 f"'{DIFFUSION_MODEL_PREFIX}' or '{LORA_PREFIX}'")
        try:
            model = load()
        except NodeInputError:
            raise
        except Exception as e:
            raise NodeInputError(cls.NODE, "aligned_model", f"could not load '{name}': {e}") from e
        if model is None:
            raise NodeInputError(cls.NODE, "aligned_model", f"'{name}' holds no diffusion model ComfyUI recognises")
        return model

    @classmethod
    def _load_diffusers_folder(cls, folder, model_options):
        shards = sorted(f for f in folder_paths.get_filename_list("diffusion_models")
                        if f.replace(os.sep, "/").startswith(folder)
                        and os.path.basename(f).startswith(DIFFUSERS_WEIGHTS) and f.endswith(".safetensors")
                        and "/" not in f.replace(os.sep, "/")[len(folder):])
        if not shards:
            raise NodeInputError(cls.NODE, "aligned_model", f"no {DIFFUSERS_WEIGHTS}*.safetensors in '{folder}'")
        sd = {}
        for shard in shards:
            sd.update(comfy.utils.load_torch_file(folder_paths.get_full_path("diffusion_models", shard), safe_load=True))
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options)
        if model is None:
            raise NodeInputError(cls.NODE, "aligned_model", f"'{folder}' holds no diffusers UNet ComfyUI recognises")
        return model

    @classmethod
    def _apply_lora(cls, reference, name, path, strength):
        """Reference + LoRA, as LoraLoader builds it (so it takes the shared-weight path)."""
        try:
            lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(path, safe_load=True))
        except Exception as e:
            raise NodeInputError(cls.NODE, "aligned_model", f"could not read LoRA '{name}': {e}") from e
        key_map = comfy.lora.model_lora_keys_unet(reference.model, {})
        loaded = comfy.lora.load_lora(lora, key_map, log_missing=False)
        layers = lora_unet_layers(lora)
        if loaded and len(loaded) < 0.5 * len(layers):
            raise NodeInputError(
                cls.NODE, "aligned_model",
                f"the LoRA '{name}' matches only {len(loaded)} of its {len(layers)} UNet layers to the "
                f"reference ({describe(reference)}); it is for another model family or architecture "
                "(an SDXL LoRA on SD1.5, or the reverse).")
        if not loaded:
            sample = ", ".join(sorted(lora)[:3])
            raise NodeInputError(
                cls.NODE, "aligned_model",
                f"the LoRA '{name}' matches none of the reference's layers ({describe(reference)}); its "
                f"{len(lora)} keys look like: {sample}. Is it for another model family (an SDXL LoRA on "
                "SD1.5, or the reverse), or a text-encoder-only LoRA?")
        inert = cls._inert_patches(reference, loaded)
        if len(inert) == len(loaded):
            raise NodeInputError(
                cls.NODE, "aligned_model",
                f"the LoRA '{name}' names layers of the reference ({describe(reference)}) but none of its "
                f"{len(loaded)} updates fits their shapes (e.g. {inert[0]}); it is for another model family "
                "or architecture.")
        if inert:
            log.warning("DeRaDiff: %d of the %d layers in LoRA '%s' do not fit the reference's shapes and are "
                        "ignored (e.g. %s).", len(inert), len(loaded), name, inert[0])
            loaded = {k: v for k, v in loaded.items() if k not in set(inert)}
        text_encoder = lora_text_encoder_layers(lora)
        if text_encoder:
            log.warning("DeRaDiff: the LoRA '%s' also changes %d text-encoder layers. Both models of a DeRaDiff pair "
                        "use the reference's text encoder (one set of conditioning), so that part is not applied. "
                        "To include it, apply the LoRA to the CLIP output of this node with a LoraLoader "
                        "(model strength 0): both models then get the LoRA's conditioning.", name, len(text_encoder))
        aligned = reference.clone()
        aligned.add_patches(loaded, strength)
        log.info("DeRaDiff: LoRA '%s' patches %d layers of the reference (strength %g).", name, len(loaded), strength)
        return aligned


    @staticmethod
    def _inert_patches(reference, loaded):
        """Keys whose update leaves the weight unchanged: ComfyUI skips patches whose shape does
        not fit (it only logs), which would make the aligned model silently equal the reference."""
        inert = []
        model = reference.model
        for key, patch in loaded.items():
            if not isinstance(key, str):  # (key, offset) slices: checked by ComfyUI itself
                continue
            probe = torch.zeros(comfy.utils.get_attr(model, key).shape, dtype=torch.float32)
            if not comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], probe, key).any():
                inert.append(key)
        return inert


class DeRaDiffMakePair(io.ComfyNode):
    NODE = "Make Aligned Model Pair (DeRaDiff)"
    ABOUT = ("Makes a DeRaDiff pair from two MODEL inputs, so any loader (LoRA loaders, "
             "quantised loaders, merges) can feed DeRaDiff.")

    @classmethod
    def define_schema(cls):
        return schema("DeRaDiffMakePair", cls.NODE, cls.ABOUT, [
            io.Model.Input("reference", tooltip="The reference (base) model."),
            io.Model.Input("aligned", tooltip="The model aligned from the reference, e.g. the "
                                              "reference through a LoraLoader with a DPO LoRA."),
            beta_input(),
        ], [Pair.Output(display_name="pair", tooltip="The reference and aligned models, for DeRaDiff KSampler / Guider.")])

    @classmethod
    def execute(cls, reference, aligned, beta=0.0):
        beta = check_number(cls.NODE, "beta", beta, 0.0)
        for name, value in (("reference", reference), ("aligned", aligned)):
            if not (hasattr(value, "clone") and hasattr(value, "model")):  # a MODEL is a ModelPatcher
                raise NodeInputError(cls.NODE, name, f"expected a MODEL (connect a checkpoint or UNet loader), "
                                     f"got {type(value).__name__} {str(value)[:40]!r}")
        try:
            pair = make_pair(reference, aligned, beta, "reference", "aligned")
        except PairError as e:
            raise NodeInputError(cls.NODE, "aligned", str(e)) from None
        return io.NodeOutput(pair)
