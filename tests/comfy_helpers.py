"""In-process helpers around ComfyUI's own nodes and model objects."""
from __future__ import annotations

import contextlib
import functools

import torch


@functools.lru_cache(maxsize=None)
def load_checkpoint(name):
    import nodes
    return nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]


@functools.lru_cache(maxsize=None)
def load_unet(name):
    import nodes
    return nodes.UNETLoader().load_unet(name, "default")[0]


def encode(clip, text):
    import nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]


def empty_latent(width=64, height=64, batch=1):
    import nodes
    return nodes.EmptyLatentImage().generate(width, height, batch)[0]


def ksampler(model, latent, positive, negative, seed=1, steps=3, cfg=5.0, sampler="euler",
             scheduler="normal", denoise=1.0):
    import nodes
    return nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative,
                                   latent, denoise=denoise)[0]["samples"]


@contextlib.contextmanager
def count_unet_calls(*patchers):
    """Counts forward calls of each patcher's diffusion model."""
    counts = [0] * len(patchers)
    handles = []
    for i, p in enumerate(patchers):
        def hook(module, args, kwargs, i=i):
            counts[i] += 1
        handles.append(p.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def capture_denoised(patcher):
    """A clone of ``patcher`` that records its post-CFG denoised output at every evaluation."""
    seen = []

    def post_cfg(args):
        seen.append(args["denoised"].clone())
        return args["denoised"]

    clone = patcher.clone()
    clone.set_model_sampler_post_cfg_function(post_cfg)
    return clone, seen


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b), f"max abs difference {float((a - b).abs().max()):.3g}"
