from __future__ import annotations

import logging

import comfy.sd
import folder_paths

from ..sampler.pair import PairError, make_pair
from .common import BETA_INPUT, CATEGORY, PAIR_TYPE, NodeInputError

log = logging.getLogger("DeRaDiff")

# Prefixes of the aligned_model choices: which ComfyUI folder the file comes from.
CHECKPOINT_PREFIX = "checkpoints/"
DIFFUSION_MODEL_PREFIX = "diffusion_models/"


def aligned_model_choices():
    return ([CHECKPOINT_PREFIX + f for f in folder_paths.get_filename_list("checkpoints")]
            + [DIFFUSION_MODEL_PREFIX + f for f in folder_paths.get_filename_list("diffusion_models")])


def _full_path(node, input_name, folder, name):
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise NodeInputError(node, input_name, f"'{name}' was not found in models/{folder}. "
                             "Put the file there, then press R in ComfyUI to refresh the list.")
    return path


class DeRaDiffLoadAlignedPair:
    NODE = "Load Aligned Model Pair (DeRaDiff)"
    DESCRIPTION = ("Loads a reference checkpoint and a model aligned from it (DPO, SPO, KTO, MaPO, "
                   "reward fine-tune) as a DeRaDiff pair. The aligned model can be a full checkpoint "
                   "or a diffusion-model-only file (original or diffusers layout).")
    RETURN_TYPES = (PAIR_TYPE, "CLIP", "VAE")
    RETURN_NAMES = ("pair", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The reference and aligned models, for DeRaDiff KSampler / Guider.",
                       "The reference checkpoint's text encoder.",
                       "The reference checkpoint's VAE.")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "reference_ckpt_name": (folder_paths.get_filename_list("checkpoints"), {
                    "tooltip": "The reference (base) checkpoint, from models/checkpoints. Its CLIP "
                               "and VAE are used for both models."}),
                "aligned_model": (aligned_model_choices(), {
                    "tooltip": "The aligned model: a full checkpoint (checkpoints/...) or a "
                               "diffusion-model-only file from models/diffusion_models or "
                               "models/unet (diffusion_models/...), e.g. Diffusion-DPO's UNet."}),
            },
            "optional": {"beta": BETA_INPUT},
        }

    def load(self, reference_ckpt_name, aligned_model, beta=0.0):
        ref_path = _full_path(self.NODE, "reference_ckpt_name", "checkpoints", reference_ckpt_name)
        try:
            reference, clip, vae = comfy.sd.load_checkpoint_guess_config(
                ref_path, output_vae=True, output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
        except Exception as e:
            raise NodeInputError(self.NODE, "reference_ckpt_name", f"could not load '{reference_ckpt_name}': {e}") from e
        aligned = self._load_aligned(aligned_model, reference)
        try:
            pair = make_pair(reference, aligned, beta, reference_ckpt_name, aligned_model)
        except PairError as e:
            raise NodeInputError(self.NODE, "aligned_model", str(e)) from None
        return (pair, clip, vae)

    def _load_aligned(self, aligned_model, reference):
        if aligned_model.startswith(CHECKPOINT_PREFIX):
            name = aligned_model[len(CHECKPOINT_PREFIX):]
            path = _full_path(self.NODE, "aligned_model", "checkpoints", name)
            load = lambda: comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
        elif aligned_model.startswith(DIFFUSION_MODEL_PREFIX):
            name = aligned_model[len(DIFFUSION_MODEL_PREFIX):]
            path = _full_path(self.NODE, "aligned_model", "diffusion_models", name)
            # fp32 releases (Diffusion-DPO) are loaded at the reference's dtype
            load = lambda: comfy.sd.load_diffusion_model(path, model_options={"dtype": reference.model_dtype()})
        else:
            raise NodeInputError(self.NODE, "aligned_model",
                                 f"'{aligned_model}' must start with '{CHECKPOINT_PREFIX}' or '{DIFFUSION_MODEL_PREFIX}'")
        try:
            model = load()
        except Exception as e:
            raise NodeInputError(self.NODE, "aligned_model", f"could not load '{name}': {e}") from e
        if model is None:
            raise NodeInputError(self.NODE, "aligned_model", f"'{name}' holds no diffusion model ComfyUI recognises")
        return model


class DeRaDiffMakePair:
    NODE = "Make Aligned Model Pair (DeRaDiff)"
    DESCRIPTION = ("Makes a DeRaDiff pair from two MODEL inputs, so any loader (LoRA loaders, "
                   "quantised loaders, merges) can feed DeRaDiff.")
    RETURN_TYPES = (PAIR_TYPE,)
    RETURN_NAMES = ("pair",)
    OUTPUT_TOOLTIPS = ("The reference and aligned models, for DeRaDiff KSampler / Guider.",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "reference": ("MODEL", {"tooltip": "The reference (base) model."}),
                "aligned": ("MODEL", {"tooltip": "The model aligned from the reference, e.g. the "
                                                 "reference through a LoraLoader with a DPO LoRA."}),
            },
            "optional": {"beta": BETA_INPUT},
        }

    def make(self, reference, aligned, beta=0.0):
        try:
            pair = make_pair(reference, aligned, beta, "reference", "aligned")
        except PairError as e:
            raise NodeInputError(self.NODE, "aligned", str(e)) from None
        return (pair,)
