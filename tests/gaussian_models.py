"""ComfyUI models whose data distribution is a Gaussian N(mean, var*I), so that the
ideal denoiser is known in closed form:  D(x, sigma) = mean + var/(var+sigma^2) (x - mean).

They are real comfy.model_base.BaseModel (SD1.5 config, eps prediction) objects wrapped
in ModelPatchers; only the network is replaced by the closed form.
"""
from __future__ import annotations

import torch


class IdealGaussianEps(torch.nn.Module):
    """eps-prediction network of the ideal denoiser for N(mean, var*I) data."""

    def __init__(self, mean: torch.Tensor, var: float):
        super().__init__()
        self.register_buffer("mean", mean.clone().float())
        self.var = float(var)
        self.dtype = torch.float32

    def forward(self, x, timesteps, context=None, transformer_options={}, **kwargs):
        sigma = transformer_options["sigmas"].to(x)
        sigma = sigma.repeat(x.shape[0] // sigma.shape[0]).reshape(-1, 1, 1, 1)
        x_noisy = x * torch.sqrt(sigma ** 2 + 1.0)  # undo EPS calculate_input
        denoised = self.mean + self.var / (self.var + sigma ** 2) * (x_noisy - self.mean)
        return (x_noisy - denoised) / sigma


def gaussian_model(mean: torch.Tensor, var: float):
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import standins
    config = comfy.supported_models.SD15(dict(standins.SD15_UNET))
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, unet_model=lambda **kw: IdealGaussianEps(mean, var))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def dummy_conditioning():
    return [[torch.zeros(1, 77, 768), {}]]
