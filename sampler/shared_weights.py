"""The aligned model as "reference weights + an update applied on the fly".

When the aligned ModelPatcher is the reference plus extra patches (a LoRA, a weight
difference: what LoraLoader or Load Aligned Model Pair's LoRA option produce), both
passes of a step share the reference's weights; no second copy of the UNet exists.
During the aligned pass:

- plain low-rank LoRA updates are applied in activation space, y = W x + s·up(down(x)),
  by a forward hook: no weight is copied and the extra work is O(rank), far below the
  layer's own cost (measured: benchmarks/bench_shared_weights.py);
- every other patch type (LoHa, LoKr, DoRA, full differences, ...) is computed by a
  per-layer weight function (the slot ComfyUI's own on-the-fly patches use) into a NEW
  tensor with ``comfy.lora.calculate_weight``: the weight it receives is never written
  (under Dynamic VRAM that tensor can be the cached device copy of the reference's weight),
  and layers that store their weight in scaled units (scaled-fp8 checkpoints in ComfyUI
  0.3.x) are patched in real units through the layer's own convert/set functions, as
  ComfyUI's merge does. The patched weight of one layer exists only while that layer runs.

Device copies of the LoRA factors live only for one sampling run: they are dropped by an
ON_CLEANUP callback on the patcher that runs sampling, so nothing stays on the GPU outside
ComfyUI's memory management.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

import comfy.lora
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils

_CLEANUP_KEY = "deradiff_shared_weights"


def string_to_seed(key):
    """ComfyUI's per-key rounding seed (comfy.utils in 0.33, comfy.model_patcher in 0.3.x)."""
    fn = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed
    return fn(key)


class SharedWeightsUnavailable(Exception):
    """Why the aligned side cannot share the reference's weights (the pack falls back to a copy)."""


def delta_patches(reference, aligned) -> dict:
    """Patches the aligned patcher adds on top of the reference's, per weight key."""
    if not reference.is_clone(aligned):
        raise SharedWeightsUnavailable("the two MODELs are different base models")
    if reference.object_patches.keys() != aligned.object_patches.keys() or any(
            not equivalent_objects(reference.object_patches[k], aligned.object_patches[k])
            for k in reference.object_patches):
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


_CLASS_BOOKKEEPING = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__firstlineno__",
                      "__static_attributes__", "__orig_bases__", "__parameters__"}


def _same_function(a, b, depth) -> bool:
    if a is b:
        return True
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    if code_a is None or code_a is not code_b:
        return False
    cells_a, cells_b = a.__closure__ or (), b.__closure__ or ()
    return len(cells_a) == len(cells_b) and all(
        _equivalent(x.cell_contents, y.cell_contents, depth + 1) for x, y in zip(cells_a, cells_b))


def _same_type(ta, tb, depth) -> bool:
    """Equal types, or two instances of one class statement (nodes such as
    ModelSamplingDiscrete define their class inside the node function, once per call)."""
    if ta is tb:
        return True
    if (ta.__qualname__ != tb.__qualname__ or ta.__module__ != tb.__module__
            or ta.__bases__ != tb.__bases__):
        return False
    da = {k: v for k, v in vars(ta).items() if k not in _CLASS_BOOKKEEPING}
    db = {k: v for k, v in vars(tb).items() if k not in _CLASS_BOOKKEEPING}
    if da.keys() != db.keys():
        return False
    for k in da:
        va, vb = da[k], db[k]
        va, vb = getattr(va, "__func__", va), getattr(vb, "__func__", vb)  # static/class methods
        if not (va is vb or _same_function(va, vb, depth) or _equivalent(va, vb, depth + 1)):
            return False
    return True


def _equivalent(a, b, depth=0) -> bool:
    if a is b:
        return True
    if depth > 8 or not _same_type(type(a), type(b), depth):
        return False
    if isinstance(a, torch.Tensor):
        return (a.shape == b.shape and a.dtype == b.dtype
                and bool(torch.equal(a.detach().cpu(), b.detach().cpu())))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (bool, int, complex, str, bytes, type(None), torch.dtype, torch.device)):
        return a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equivalent(x, y, depth + 1) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equivalent(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, (set, frozenset)):
        return a == b
    if callable(a) and hasattr(a, "__code__"):
        return _same_function(a, b, depth)
    if hasattr(a, "__dict__"):  # modules: parameters, buffers, submodules and plain attributes
        return _equivalent(vars(a), vars(b), depth + 1)
    return False


def equivalent_objects(a, b) -> bool:
    """Whether two object patches do the same thing: the same object, or objects of the same
    type (or of one class statement) whose state (tensors, attributes, submodules) is equal.
    Two nodes applying the same settings (e.g. ModelSamplingDiscrete on the reference and on the
    aligned model) give equivalent objects; anything not provably equal counts as different."""
    try:
        return _equivalent(a, b)
    except Exception:  # an object whose state cannot be compared: be conservative
        return False


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
    """Forward hook adding s·up(down(x)) to a Linear / Conv2d output.

    The factors are cast to the activation's device/dtype once per sampling run (``caching``
    is switched on by SharedWeightDelta while a patcher's run is known to end with an
    ON_CLEANUP callback that calls ``release``); otherwise per call, keeping nothing."""

    def __init__(self, module, terms, owner=None):
        self.module, self.terms = module, terms
        self.owner = owner  # the SharedWeightDelta: its ``rows`` says which rows are aligned
        self._cast = {}
        self.caching = False

    def _weights(self, device, dtype):
        key = (device, dtype)
        cast = self._cast.get(key)
        if cast is None:
            cast = [(s, up.to(device, dtype), down.to(device, dtype)) for s, up, down in self.terms]
            if self.caching:
                self._cast[key] = cast
        return cast

    def release(self):
        self._cast.clear()

    def _update(self, module, x):
        out = None
        for scale, up, down in self._weights(x.device, x.dtype):
            if down.ndim == 2:
                term = scale * F.linear(F.linear(x, down), up)
            else:
                h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
                term = scale * F.conv2d(h, up.reshape(up.shape[0], up.shape[1], 1, 1))
            out = term if out is None else out + term
        return out

    def __call__(self, module, args, output):
        x = args[0]
        rows = None if self.owner is None else self.owner.aligned_rows(x)
        if rows is None:  # an ordinary aligned pass: every row
            return output + self._update(module, x)
        if rows is False:  # fused pass, but this layer's rows are not the model's batch rows
            return output
        return output.index_add(0, rows, self._update(module, x.index_select(0, rows)).to(output.dtype))


class _OutOfPlaceWeightPatch:
    """A weight function computing the patched weight into a new tensor.

    ComfyUI's LowVramPatch adds the update onto the tensor it is given; on the Dynamic VRAM
    cast path that tensor can be the cached device copy of the reference's weight, which then
    drifts evaluation after evaluation. This copies first (in float32) and never writes its
    input. ``set_func`` is given when the tensor a weight function receives is in the layer's
    stored units (scaled fp8 in ComfyUI 0.3.x: the layer multiplies by ``scale_weight`` after
    the weight functions): the update is then applied in real units (``convert_func``) and the
    result converted back with the layer's own ``set_func``, exactly as ComfyUI's merge does."""

    def __init__(self, key, patches, convert_func=None, set_func=None):
        self.key, self.patches = key, patches
        self.convert_func, self.set_func = convert_func, set_func

    def __call__(self, weight):
        out_dtype = weight.dtype
        w = weight.to(torch.float32, copy=True)
        if self.set_func is not None:
            w = self.convert_func(w, inplace=True)
        w = comfy.lora.calculate_weight(self.patches[self.key], w, self.key, intermediate_dtype=torch.float32)
        if self.set_func is not None:
            w = self.set_func(w, seed=string_to_seed(self.key), return_weight=True)
        return w.to(out_dtype)


def _stored_units(convert_func, weight) -> bool:
    """Whether the layer's weight, as handed to its weight functions, is not in real units:
    its convert function changes a plain float tensor (ComfyUI 0.3.x scaled-fp8 layers).
    Layers whose convert function only dequantizes QuantizedTensors (mixed-precision ops,
    where the cast path dequantizes before the weight functions) are in real units."""
    if convert_func is None or weight is None:
        return False
    probe = torch.ones(tuple(weight.shape), dtype=torch.float32)
    out = convert_func(probe.clone(), inplace=False)
    return not (isinstance(out, torch.Tensor) and out.shape == probe.shape
                and torch.equal(out.to(device="cpu", dtype=torch.float32), probe))


class SharedWeightDelta:
    """``with delta:`` evaluates the reference BaseModel as the aligned model."""

    def __init__(self, reference, aligned):
        self.patches = delta_patches(reference, aligned)
        self.weight_patches = []  # (module, "weight_function" | "bias_function", _OutOfPlaceWeightPatch)
        self.low_rank = []  # (module, _LowRankHook)
        self._caching = False  # set by cache_until_cleanup for the length of one run
        model = reference.model
        for key in self.patches:
            module_path, _, attr = key.rpartition(".")
            try:
                module = comfy.utils.get_attr(model, module_path)
            except AttributeError:
                raise SharedWeightsUnavailable(f"no layer {module_path} in the reference") from None
            terms = _low_rank_terms(self.patches[key], module) if attr == "weight" else None
            if terms is not None:
                self.low_rank.append((module, _LowRankHook(module, terms, self)))
                continue
            slot = f"{attr}_function"
            if not hasattr(module, slot):
                raise SharedWeightsUnavailable(f"layer {module_path} cannot take on-the-fly patches")
            weight, set_func, convert_func = comfy.model_patcher.get_key_weight(model, key)
            if set_func is not None and _stored_units(convert_func, weight):
                fn = _OutOfPlaceWeightPatch(key, self.patches, convert_func, set_func)
            else:
                fn = _OutOfPlaceWeightPatch(key, self.patches)
            self.weight_patches.append((module, slot, fn))
        self.model = model
        self._handles = []
        self._fused = None  # (rows per chunk, first aligned row in a chunk) during a fused pass
        self._batch = None  # the diffusion model's input batch size in the current fused call
        self.fused_mismatch = False

    # -- one batch for both models -----------------------------------------------------
    @property
    def fusable(self) -> bool:
        """Every patched layer is a plain LoRA applied in activation space, so one batch can
        carry both models: the update goes to the aligned rows only."""
        return bool(self.low_rank) and not self.weight_patches

    def aligned_rows(self, x):
        """Row indices of ``x`` that belong to the aligned model in a fused pass; None outside
        one; False when the layer's first dimension is not the model's batch (then the fused
        result cannot be trusted: ``fused_mismatch`` is set and the caller runs two passes)."""
        if self._fused is None:
            return None
        chunk, start = self._fused
        n = x.shape[0] if x.ndim else 0
        if self._batch is None or n != self._batch or n % chunk:
            self.fused_mismatch = True
            return False
        index = torch.arange(n, device=x.device)
        return index[(index % chunk) >= start]

    def _remember_batch(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        self._batch = None if x is None else x.shape[0]

    @contextlib.contextmanager
    def fused(self, chunk: int, start: int):
        """Within this context one model call evaluates both models: ComfyUI's batch is made of
        chunks of ``chunk`` rows (one per cond), rows ``start``..``chunk`` of each being the
        aligned copies of the input. Sets ``fused_mismatch`` if any LoRA layer saw other rows."""
        self._fused, self._batch, self.fused_mismatch = (chunk, start), None, False
        handle = self.model.diffusion_model.register_forward_pre_hook(self._remember_batch, with_kwargs=True)
        try:
            with self:
                yield self
        finally:
            handle.remove()
            self._fused = self._batch = None

    def cache_until_cleanup(self, patcher):
        """Let the LoRA hooks keep their device copies while ``patcher`` runs (the MODEL the
        guider or Realign Model samples with); its ON_CLEANUP callback drops them at the run's end.
        Outside such a run the hooks cast their factors per call and keep nothing."""
        if not self.low_rank or not hasattr(patcher, "add_callback_with_key"):
            return
        kind = comfy.patcher_extension.CallbacksMP.ON_CLEANUP
        if not any(cb == self.release for cb in patcher.get_all_callbacks(kind)):
            patcher.add_callback_with_key(kind, _CLEANUP_KEY, self.release)
        self._caching = True

    def release(self, *_patcher):
        """Drop every device copy of the LoRA factors (ON_CLEANUP callback)."""
        self._caching = False
        for _, hook in self.low_rank:
            hook.caching = False
            hook.release()

    def cached_tensors(self) -> int:
        return sum(len(t) * 2 for _, hook in self.low_rank for t in hook._cast.values())

    def __enter__(self):
        for module, slot, fn in self.weight_patches:  # a new list: never the class-level default
            setattr(module, slot, list(getattr(module, slot)) + [fn])
        for _, hook in self.low_rank:
            hook.caching = self._caching  # set only while a run that will clean up is on
        self._handles = [module.register_forward_hook(hook) for module, hook in self.low_rank]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module, slot, fn in self.weight_patches:
            setattr(module, slot, [f for f in getattr(module, slot) if f is not fn])
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
