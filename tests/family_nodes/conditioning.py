"""Conditioning of the right shapes for families whose text encoders are too large to build here.

SD2.x (OpenCLIP-H, 1024 wide), SDXL (CLIP-L + CLIP-G: 2048 wide, pooled 1280), SD3/SD3.5 (CLIP-L + CLIP-G +
T5-XXL: 4096 wide, pooled 2048) and Flux.1 (T5-XXL 4096 wide, pooled CLIP-L 768). The values are random
(seeded), the shapes are what each family's text encoder gives, so the diffusion models run exactly as
with real prompts. Used in-process by tests/test_families_inprocess.py and, through the test-only node
in this folder, by the server tests. Test code only: the shipped pack never imports it.
"""
from __future__ import annotations

import torch

# family -> (context width, pooled width or None)
WIDTHS = {"sd2": (1024, None), "sdxl": (2048, 1280), "sd3": (4096, 2048), "flux": (4096, 768)}


def family_conditioning(family: str, seed: int = 0, tokens: int = 8, guidance: float | None = None) -> list:
    """A CONDITIONING list ``[[context, {"pooled_output": ..., "guidance": ...}]]`` for ``family``."""
    if family not in WIDTHS:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(WIDTHS)}")
    width, pooled = WIDTHS[family]
    g = torch.Generator().manual_seed(int(seed))
    extra = {}
    context = torch.randn(1, int(tokens), width, generator=g)
    if pooled is not None:
        extra["pooled_output"] = torch.randn(1, pooled, generator=g)
    if guidance is not None:
        extra["guidance"] = float(guidance)
    return [[context, extra]]
