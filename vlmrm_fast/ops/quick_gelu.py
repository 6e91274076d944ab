"""QuickGELU, the activation of OpenAI's CLIP towers: ``x * sigmoid(1.702 x)``, elementwise, computed in
float32 and rounded once to ``x``'s dtype.

open_clip builds its towers with QuickGELU wherever the weights were trained with it (OpenAI's ViT-B-32,
ViT-B-16 and ViT-L-14 among them) and computes it as ``x * torch.sigmoid(1.702 * x)``: three eager kernels,
each reading and writing every hidden activation of the MLP (12 bytes per bf16 element), each rounding to
the tensor's dtype. cuBLASLt has no QuickGELU epilogue (the bf16 MLPs' exact GELU goes there:
:mod:`vlmrm_fast.backends.gelu_epilogue`), so the kernel below does it in one pass (4 bytes per bf16
element). At ViT-L-14's batch 1024 the MLPs' hidden activations are 26 billion elements a tower call: the
three passes move 0.31 TB, about 100 ms at 3 TB/s, beside the 263 ms a call the ViT-L-14 target leaves
(estimates: not measured on a GPU yet); one pass moves a third of that.
"""
from typing import Literal

import torch

from vlmrm_fast.ops._triton import HAS_TRITON, on_device, require_working_interpreter, rounds_bf16_by_hand

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 4096
"""Elements a program (16 a thread at :data:`WARPS`: two 16-byte loads of bf16)."""
WARPS = 8

if HAS_TRITON:
    import triton
    import triton.language as tl

    from vlmrm_fast.ops._triton import to_output

    @triton.jit
    def quick_gelu_f32(x):
        """QuickGELU of float32 ``x``, float32 (0 at 0: padding stays 0); shared by the kernels that apply it."""
        # sigmoid(z) as 1 / (1 + e) or e / (1 + e), e = exp(-|z|) <= 1: no overflow, and small results keep
        # their relative accuracy. 1.702 rounded to float32, as torch's scalar multiply takes it. An IEEE
        # division (a GPU's plain '/' may be 2 ulp off): the quantisation kernel, which applies this too,
        # divides only so.
        z = 1.702 * x
        e = tl.exp(-tl.abs(z))
        return tl.math.div_rn(tl.where(z >= 0, x, x * e), 1.0 + e)

    @triton.jit
    def _quick_gelu_kernel(x_ptr, out_ptr, n_elements, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
        # int64 offsets: ViT-bigG-14's hidden activations pass 2**31 elements at batch 1024
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        y = quick_gelu_f32(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
        tl.store(out_ptr + offsets, to_output(y, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


def check_quick_gelu_args(x: torch.Tensor) -> None:
    """A ``ValueError`` naming the problem unless the op takes ``x``."""
    if x.dtype not in DTYPES:
        raise ValueError(f"quick_gelu takes float32, bfloat16 or float16 input; got {x.dtype}.")


def quick_gelu_triton(x: torch.Tensor) -> torch.Tensor:
    """Launch the kernel: one program per :data:`BLOCK` elements.

    Args:
        x: any shape, float32/bfloat16/float16, on a device Triton runs on (a non-contiguous tensor is
            copied first).
    Returns:
        ``x``'s shape, dtype and device, contiguous.
    """
    require_working_interpreter()
    check_quick_gelu_args(x)
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    with on_device(x.device):
        _quick_gelu_kernel[(triton.cdiv(x.numel(), BLOCK),)](
            x, out, x.numel(), BLOCK=BLOCK, ROUND_BF16=rounds_bf16_by_hand(x.dtype), num_warps=WARPS,
            enable_fp_fusion=True,  # pinned, as in ops/preprocess.py
        )
    return out


def quick_gelu_float32(x: torch.Tensor) -> torch.Tensor:
    """QuickGELU of ``x`` in float32 ops -> float32, unrounded (the torch paths' formula)."""
    y = x.float()
    return y * torch.sigmoid(1.702 * y)


def quick_gelu_torch(x: torch.Tensor) -> torch.Tensor:
    """The same semantics in torch ops (float32, rounded once): the fallback."""
    check_quick_gelu_args(x)
    return quick_gelu_float32(x).to(x.dtype)


def quick_gelu(x: torch.Tensor, *, impl: Literal["triton", "torch"] = "triton") -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` elementwise, computed in float32 and rounded once to ``x``'s dtype."""
    if impl == "triton":
        return quick_gelu_triton(x)
    return quick_gelu_torch(x)
