"""The "torch" backend: the open_clip tower in eager PyTorch."""
from __future__ import annotations

from typing import Optional

import torch

from vlmrm_fast.backends.base import VisionBackend
from vlmrm_fast.backends.patch_embed import use_patch_matmul
from vlmrm_fast.backends.torch_fp8 import check_torch_quantize, quantize_fp8


class TorchBackend(VisionBackend):
    """Eager PyTorch in the tower's dtype. Attention goes through ``nn.MultiheadAttention``, whose
    inference fast path calls scaled-dot-product attention (flash / memory-efficient kernels on CUDA; with
    fp8, through :class:`~vlmrm_fast.backends.torch_fp8.SelfAttention` and SDPA). On CUDA a ViT's patch
    embedding runs as one matmul (:mod:`vlmrm_fast.backends.patch_embed`; ``visual.conv1`` is replaced in
    place, its parameters kept).

    Args:
        quantize: None, or "fp8": the transformer's matmuls in E4M3 (:mod:`vlmrm_fast.backends.torch_fp8`;
            Hopper GPUs, bf16; lossy, opt-in). The tower's modules are replaced in place.
    """

    name = "torch"

    def __init__(self, visual: torch.nn.Module, device, dtype, image_size, quantize: Optional[str] = None) -> None:
        super().__init__(device, dtype, image_size)
        check_torch_quantize(quantize, self.name, self.device, dtype)
        self.visual = visual
        self.quantize = quantize
        if self.device.type == "cuda":  # cuDNN's convolution is what was slow; on CPU it is not measured
            use_patch_matmul(visual)
        if quantize == "fp8":
            quantize_fp8(visual, dtype)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)
