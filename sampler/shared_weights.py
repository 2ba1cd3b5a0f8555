"""The aligned model as "reference weights + an update applied on the fly".

When the aligned ModelPatcher is the reference plus extra patches (a LoRA, a weight
difference: what LoraLoader or Load Aligned Model Pair's LoRA option produce), both
passes of a step share the reference's weights; no second copy of the UNet exists.
During the aligned pass:

- plain low-rank LoRA updates are applied in activation space, y = W x + s·up(down(x)),
  by a forward hook: no weight is copied and the extra work is O(rank), far below the
  layer's own cost (measured: benchmarks/bench_shared_weights.py);
- every other patch type (LoHa, LoKr, DoRA, full differences, ...) goes through ComfyUI's
  own on-the-fly weight patch (LowVramPatch, its low-VRAM mechanism), so the patched
  weight of one layer exists only while that layer runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _low_rank_terms(patches, module):
    """[(scale, up, down)] when every patch is a plain LoRA this layer can apply to its input."""
    is_linear = isinstance(module, torch.nn.Linear)
    is_conv = isinstance(module, torch.nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
    if not (is_linear or is_conv):
        return None
    terms = []
    for strength, adapter, strength_model, offset, function in patches:
        weights = getattr(adapter, "weights", None)
        if (getattr(adapter, "name", None) != "lora" or strength_model != 1.0 or offset is not None
                or function is not None or weights is None or len(weights) < 6
                or any(w is not None for w in weights[3:6])):  # mid (Tucker), DoRA, reshape
            return None
        up, down, alpha = weights[0], weights[1], weights[2]
        rank = down.shape[0]
        if is_linear and (up.ndim != 2 or down.ndim != 2):
            return None
        if is_conv and (down.ndim != 4 or up.shape[2:] not in ((), (1, 1))):
            return None
        scale = strength * (float(alpha) / rank if alpha is not None else 1.0)
        terms.append((scale, up, down))
    return terms


class _LowRankHook:
    """Forward hook adding s·up(down(x)) to a Linear / Conv2d output."""

    def __init__(self, module, terms):
        self.module, self.terms = module, terms
        self._cast = {}

    def _weights(self, device, dtype):
        key = (device, dtype)
        if key not in self._cast:  # once per device/dtype, not per call
            self._cast[key] = [(s, up.to(device, dtype), down.to(device, dtype)) for s, up, down in self.terms]
        return self._cast[key]

    def __call__(self, module, args, output):
        x = args[0]
        for scale, up, down in self._weights(x.device, x.dtype):
            if down.ndim == 2:
                output = output + scale * F.linear(F.linear(x, down), up)
            else:
                h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
                output = output + scale * F.conv2d(h, up.reshape(up.shape[0], up.shape[1], 1, 1))
        return output


class SharedWeightDelta:
    """``with delta:`` evaluates the reference BaseModel as the aligned model."""

    def __init__(self, reference, aligned):
        self.patches = delta_patches(reference, aligned)
        self.weight_patches = []  # (module, "weight_function" | "bias_function", LowVramPatch)
        self.low_rank = []  # (module, _LowRankHook)
        model = reference.model
        for key in self.patches:
            module_path, _, attr = key.rpartition(".")
            try:
                module = comfy.utils.get_attr(model, module_path)
            except AttributeError:
                raise SharedWeightsUnavailable(f"no layer {module_path} in the reference") from None
            terms = _low_rank_terms(self.patches[key], module) if attr == "weight" else None
            if terms is not None:
                self.low_rank.append((module, _LowRankHook(module, terms)))
                continue
            slot = f"{attr}_function"
            if not hasattr(module, slot):
                raise SharedWeightsUnavailable(f"layer {module_path} cannot take on-the-fly patches")
            self.weight_patches.append((module, slot, comfy.model_patcher.LowVramPatch(key, self.patches)))
        self.aligned_model_options = aligned.model_options
        self._handles = []

    def __enter__(self):
        for module, slot, fn in self.weight_patches:
            getattr(module, slot).append(fn)
        self._handles = [module.register_forward_hook(hook) for module, hook in self.low_rank]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module, slot, fn in self.weight_patches:
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
