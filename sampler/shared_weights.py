"""The aligned model as "reference weights + an update applied on the fly".

When the aligned ModelPatcher is the reference plus extra patches (a LoRA, a weight
difference: what LoraLoader or Load Aligned Model Pair's LoRA option produce), both
passes of a step can share the reference's weights. During the aligned pass each patched
layer gets ComfyUI's own on-the-fly patch function (LowVramPatch, the mechanism ComfyUI
uses in low-VRAM mode; it supports every patch type comfy.lora supports), so the patched
weight of one layer exists only while that layer runs. No second copy of the UNet.
"""
from __future__ import annotations

import comfy.model_patcher
import comfy.utils


class SharedWeightsUnavailable(Exception):
    """Why the aligned side cannot share the reference's weights (the pack falls back to a copy)."""


def delta_patches(reference, aligned) -> dict:
    """Patches the aligned patcher adds on top of the reference's, per weight key."""
    if not reference.is_clone(aligned):
        raise SharedWeightsUnavailable("the two MODELs are different base models")
    if reference.object_patches.keys() != aligned.object_patches.keys() or any(
            reference.object_patches[k] is not aligned.object_patches[k] for k in reference.object_patches):
        raise SharedWeightsUnavailable("the aligned MODEL replaces model objects the reference does not")
    delta = {}
    for key, patches in aligned.patches.items():
        base = reference.patches.get(key, [])
        if len(patches) < len(base) or any(a is not b for a, b in zip(patches, base)):
            raise SharedWeightsUnavailable(f"the reference has patches on {key} the aligned MODEL lacks")
        if len(patches) > len(base):
            delta[key] = patches[len(base):]
    missing = [k for k in reference.patches if k not in aligned.patches]
    if missing:
        raise SharedWeightsUnavailable(f"the reference has patches on {missing[0]} the aligned MODEL lacks")
    if not delta:
        raise SharedWeightsUnavailable("the aligned MODEL adds no patches: it is the reference itself")
    return delta


class SharedWeightDelta:
    """``with delta:`` evaluates the reference BaseModel as the aligned model."""

    def __init__(self, reference, aligned):
        self.patches = delta_patches(reference, aligned)
        self.targets = []  # (module, "weight_function" | "bias_function", LowVramPatch)
        model = reference.model
        for key in self.patches:
            module_path, _, attr = key.rpartition(".")
            try:
                module = comfy.utils.get_attr(model, module_path)
            except AttributeError:
                raise SharedWeightsUnavailable(f"no layer {module_path} in the reference") from None
            slot = f"{attr}_function"
            if not hasattr(module, slot):
                raise SharedWeightsUnavailable(f"layer {module_path} cannot take on-the-fly patches")
            self.targets.append((module, slot, comfy.model_patcher.LowVramPatch(key, self.patches)))
        self.aligned_model_options = aligned.model_options

    def __enter__(self):
        for module, slot, fn in self.targets:
            getattr(module, slot).append(fn)
        return self

    def __exit__(self, *exc):
        for module, slot, fn in self.targets:
            functions = getattr(module, slot)
            if functions and functions[-1] is fn:
                functions.pop()
            elif fn in functions:
                functions.remove(fn)
        return False

    def patch_bytes(self) -> int:
        """Memory of the update itself (the LoRA / difference tensors)."""
        seen, total = set(), 0

        def walk(obj):
            nonlocal total
            if hasattr(obj, "untyped_storage") and hasattr(obj, "element_size"):
                ptr = obj.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += obj.numel() * obj.element_size()
            elif isinstance(obj, (list, tuple)):
                for o in obj:
                    walk(o)
            elif hasattr(obj, "weights"):
                walk(obj.weights)
        for patches in self.patches.values():
            walk(patches)
        return total
