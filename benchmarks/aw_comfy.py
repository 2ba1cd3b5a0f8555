"""The alignment world inside ComfyUI: point denoisers wrapped as real ComfyUI models.

Latent layout (documented in docs/alignment_world.md): a latent [B, 4, H, W] holds B*H*W independent points.
At every pixel, channels 0 and 1 are the 2-D point; channels 2 and 3 are a trivial
N(0, 1) "filler" with its exact denoiser x / (1 + sigma^2), independent of the point. The data
distribution of the whole latent is therefore the product over pixels of (2-D mixture) x N(0, I_2),
whose ideal denoiser acts pixel by pixel, so a whole batch of points is one ComfyUI sampling run.
All of this lives in ComfyUI's *model* space (after the latent format's process_in: the SD1.5
scale factor); ``points_from_latent`` converts a sampled LATENT back.

The models are real comfy.model_base.BaseModel objects (SD1.5 config, eps prediction, its
discrete noise schedule) in ModelPatchers, as in tests/gaussian_models.py; only the network
is replaced: it undoes the eps model's input scaling, evaluates the point denoiser at the exact
sigma ComfyUI passes in ``transformer_options["sigmas"]``, and returns eps = (x - D) / sigma.
Needs ComfyUI importable.
"""
from __future__ import annotations

import copy

import torch

FILLER_VAR = 1.0


class PointWorldEps(torch.nn.Module):
    """eps network of the model whose per-pixel data is (2-D point ~ denoiser's data) x N(0, I_2).

    ``denoiser(points [n, 2], sigma [n]) -> [n, 2]``: aw_world.Mixture.denoise (exact, float64)
    or a trained aw_world.MLPDenoiser (registered as a submodule, so it is part of the model)."""

    def __init__(self, denoiser):
        super().__init__()
        if isinstance(denoiser, torch.nn.Module):
            self.point_net = copy.deepcopy(denoiser).requires_grad_(False)
            self._fn = None
        else:
            self._fn = denoiser
        self.dtype = torch.float32

    def point_denoise(self, points, sigma):
        with torch.no_grad():
            return (self._fn or self.point_net)(points, sigma)

    def forward(self, x, timesteps, context=None, transformer_options={}, **kwargs):
        b, c, h, w = x.shape
        sigma = transformer_options["sigmas"].to(torch.float64)
        sigma = sigma.repeat(b // sigma.shape[0])  # cond/uncond chunks are concatenated
        x64 = x.to(torch.float64) * torch.sqrt(sigma ** 2 + 1.0).reshape(-1, 1, 1, 1)  # undo calculate_input
        points = x64[:, :2].permute(0, 2, 3, 1).reshape(-1, 2)
        d_points = self.point_denoise(points, sigma.repeat_interleave(h * w)).to(torch.float64)
        d_points = d_points.reshape(b, h, w, 2).permute(0, 3, 1, 2)
        s2 = (sigma ** 2).reshape(-1, 1, 1, 1)
        d_filler = x64[:, 2:] * (FILLER_VAR / (FILLER_VAR + s2))
        denoised = torch.cat([d_points, d_filler], 1)
        return ((x64 - denoised) / sigma.reshape(-1, 1, 1, 1)).to(x.dtype)


def world_model(denoiser):
    """A ComfyUI ModelPatcher around PointWorldEps(denoiser)."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import standins
    config = comfy.supported_models.SD15(dict(standins.SD15_UNET))
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, unet_model=lambda **kw: PointWorldEps(denoiser))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def conditioning():
    """Any conditioning does (the networks ignore it); a one-token context keeps it small."""
    return [[torch.zeros(1, 1, 768), {}]]


def empty_latent(n_points: int, batch: int = 1):
    """A zero latent holding n_points points per batch element (n_points = H*W, H*W as square as possible)."""
    h = int(n_points ** 0.5)
    while n_points % h:
        h -= 1
    return {"samples": torch.zeros(batch, 4, h, n_points // h)}


def points_from_latent(patcher, samples: torch.Tensor) -> torch.Tensor:
    """[B*H*W, 2] float64 points (model space) from a sampled LATENT tensor."""
    model_space = patcher.get_model_object("latent_format").process_in(samples.to(torch.float64))
    return model_space[:, :2].permute(0, 2, 3, 1).reshape(-1, 2)


def filler_from_latent(patcher, samples: torch.Tensor) -> torch.Tensor:
    model_space = patcher.get_model_object("latent_format").process_in(samples.to(torch.float64))
    return model_space[:, 2:].permute(0, 2, 3, 1).reshape(-1, 2)


def sample_plain(model, latent, sampler, steps, seed, scheduler="karras"):
    """ComfyUI's own KSampler (cfg 1: the conditioning is irrelevant)."""
    import nodes
    cond = conditioning()
    return nodes.KSampler().sample(model, seed, steps, 1.0, sampler, scheduler, cond, cond, latent,
                                   denoise=1.0)[0]["samples"]


def sample_deradiff(pack, pair, lam, latent, sampler, steps, seed, scheduler="karras"):
    """The pack's DeRaDiff KSampler node (DeRaDiffGuider through ComfyUI's samplers)."""
    cond = conditioning()
    out = pack.nodes.DeRaDiffKSampler.execute(pair, seed, steps, 1.0, sampler, scheduler, cond, cond, latent,
                                              1.0, **{"lambda": float(lam)})
    return out.result[0]["samples"]


def make_pair(pack, reference, aligned, beta=0.0):
    return pack.nodes.DeRaDiffMakePair.execute(reference, aligned, beta)[0]


def hard_pair(pack, wrap=None):
    """(reference world, reward weights, pair) of the hard world (8-mode ring, radius 4, std 0.3; the aligned
    model tilted by rewards [1, 0.5] at β 1). ``wrap``: applied to each model's denoiser (e.g. to count calls)."""
    import aw_world as aw
    wrap = wrap or (lambda denoise: denoise)
    ref = aw.ring(8, 4.0, (0.3,))
    w = torch.tensor([1.0, 0.5], dtype=aw.F64)
    return ref, w, make_pair(pack, world_model(wrap(ref.denoise)), world_model(wrap(ref.tilt(w, 1.0).denoise)), 1.0)
