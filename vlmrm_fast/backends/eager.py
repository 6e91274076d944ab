"""The "torch" backend: the open_clip tower in eager PyTorch."""
from __future__ import annotations

import torch

from vlmrm_fast.backends.base import VisionBackend
from vlmrm_fast.backends.patch_embed import use_patch_matmul


class TorchBackend(VisionBackend):
    """Eager PyTorch in the tower's dtype. Attention goes through ``nn.MultiheadAttention``, whose
    inference fast path calls scaled-dot-product attention (flash / memory-efficient kernels on CUDA);
    a ViT's patch embedding runs as one matmul (:mod:`vlmrm_fast.backends.patch_embed`; ``visual.conv1``
    is replaced in place, its parameters kept)."""

    name = "torch"

    def __init__(self, visual: torch.nn.Module, device, dtype, image_size) -> None:
        super().__init__(device, dtype, image_size)
        self.visual = visual
        use_patch_matmul(visual)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)
