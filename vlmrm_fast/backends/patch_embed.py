"""A ViT's patch embedding run as one matmul over its patches instead of a convolution.

A ViT's first layer (open_clip's ``visual.conv1``) is a convolution whose kernel equals its stride: every
output pixel is the dot product of one non-overlapping patch with a filter, so the whole layer is the
matmul ``patches [N * gh * gw, C * p * p] @ weight.T [C * p * p, D]``. cuDNN does not see it that way: on
the H200 (``benchmarks/results/profile-h200-b32``) it ran ViT-B-32's bf16 patch embedding at batch 1024
with an implicit-GEMM kernel (``precomputed_convolve_sgemm``) in 8.55 ms, 28% of the tower, for 0.24
TFLOP that a matmul at the measured peak does in 0.35 ms (10 ms and 19 ms for ViT-L-14 and ViT-bigG-14).
"""
from __future__ import annotations

from typing import Type, TypeGuard, TypeVar, cast

import torch
import torch.nn.functional as F

from vlmrm_fast.backends.base import SwappedModule, in_place_of

Conv2dT = TypeVar("Conv2dT", bound=torch.nn.Conv2d)


class PatchMatmulConv2d(SwappedModule, torch.nn.Conv2d):
    """An unpadded ``nn.Conv2d`` whose stride equals its kernel, computed as one matmul over the patches.

    Same parameters (the same tensors, under the same ``state_dict`` keys) and the same sums, in another
    order. Input [N, C, H, W] (any float dtype and device) -> [N, D, H // p_h, W // p_w], as the
    convolution gives, with rows and columns past the last whole patch left out as the convolution leaves
    them. The result is a permuted view of a [N, gh, gw, D] tensor, so the flatten to tokens
    [N, gh * gw, D] that follows in the tower is a view, not a copy.
    """

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d) -> "PatchMatmulConv2d":
        """A module sharing ``conv``'s weight and bias (nothing is copied); see :func:`is_patch_conv`."""
        if not is_patch_conv(conv):
            raise ValueError(f"{conv} is not an unpadded convolution whose stride equals its kernel.")
        return _sharing(cls, conv)

    def original(self) -> torch.nn.Conv2d:
        """A plain ``nn.Conv2d`` sharing this layer's parameters (:func:`~vlmrm_fast.backends.base.original_modules`)."""
        return _sharing(torch.nn.Conv2d, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # an unbatched image: not the tower's case, and the convolution handles it
            return super().forward(x)
        n, c, h, w = x.shape
        ph, pw = self.kernel_size
        gh, gw = h // ph, w // pw
        patches = (x[:, :, : gh * ph, : gw * pw]
                   .reshape(n, c, gh, ph, gw, pw)
                   .permute(0, 2, 4, 1, 3, 5)  # [N, gh, gw, C, p_h, p_w]: the weight's (C, p_h, p_w) order
                   .reshape(n * gh * gw, c * ph * pw))
        tokens = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return tokens.view(n, gh, gw, self.out_channels).permute(0, 3, 1, 2)


def _sharing(cls: Type[Conv2dT], conv: torch.nn.Conv2d) -> Conv2dT:
    """An unpadded ``cls`` (a Conv2d class) with ``conv``'s sizes, weight and bias (the same tensors:
    made on the meta device, nothing is allocated), hooks and training mode."""
    # torch types a Conv2d's sizes as any _ConvNd's, Tuple[int, ...]
    new = cls(conv.in_channels, conv.out_channels, cast("tuple[int, int]", conv.kernel_size),
              cast("tuple[int, int]", conv.stride), bias=conv.bias is not None, device="meta")
    new.weight, new.bias = conv.weight, conv.bias
    return in_place_of(new, conv)


def is_patch_conv(module: object) -> TypeGuard[torch.nn.Conv2d]:
    """Whether ``module`` is an ``nn.Conv2d`` that a :class:`PatchMatmulConv2d` computes exactly: no
    padding, no dilation, one group, stride equal to the kernel."""
    return (isinstance(module, torch.nn.Conv2d) and tuple(module.stride) == tuple(module.kernel_size)
            and module.padding in (0, (0, 0), "valid") and tuple(module.dilation) == (1, 1) and module.groups == 1)


def use_patch_matmul(visual: torch.nn.Module) -> bool:
    """Replace ``visual.conv1`` (open_clip's ViT patch embedding) in place with a
    :class:`PatchMatmulConv2d` sharing its parameters; True if the tower now has one.

    Towers without such a layer (open_clip's ModifiedResNet, timm towers) are left as they are.
    """
    conv = getattr(visual, "conv1", None)
    if isinstance(conv, PatchMatmulConv2d):
        return True
    if not is_patch_conv(conv):
        return False
    visual.conv1 = PatchMatmulConv2d.from_conv(conv)
    return True
