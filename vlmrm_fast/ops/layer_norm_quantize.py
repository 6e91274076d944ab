"""A residual add, then LayerNorm, then rows to E4M3 (fp8) with one float32 scale a row: what each block
of an fp8 tower does between its residual stream and the next fp8 matmul
(:mod:`vlmrm_fast.backends.fp8_block`).

For rows ``x`` [..., D] (and ``add``, the same shape and dtype, or None), LayerNorm weight ``w`` and bias
``b``:

    total = x + add     (in x's dtype: computed in float32, rounded once, as torch adds; x without add)
    y     = LayerNorm(total)      (float32: vlmrm_fast/ops/layer_norm.py's formula and arithmetic)
    q, s  = quantize_rows(y)      (vlmrm_fast/ops/quantize_rows.py's formula, on y unrounded)

``y`` is quantised as computed, not rounded to ``x``'s dtype first (as the LayerNorm's own output would
be): one rounding fewer. Its float32 arithmetic (and so, where it moves a value across an E4M3 rounding
midpoint, a byte) may differ between the kernel and the torch path, whose reductions add in other
orders.

Why a kernel: in an fp8 block, each LayerNorm wrote its bf16 output only for the quantisation kernel to
read it back, and the residual add before the second LayerNorm wrote the stream only for that LayerNorm
to read it back. Per bf16 element of the stream, the first LayerNorm and its quantisation moved 7 bytes
and the add, the second LayerNorm and its quantisation 13; this kernel moves 3 and 7, in 2 launches, not
5. At ViT-bigG-14's batch 1024 (48 blocks, 263,168 tokens of 1,664) that is 0.21 TB less a tower call,
about 70 ms at 3 TB/s (an estimate: not measured on a GPU yet).
"""
from typing import Literal, Optional, Tuple

import torch

from vlmrm_fast.ops._triton import (HAS_TRITON, interpreter_enabled, on_device, require_working_interpreter,
                                    rounds_bf16_by_hand)
from vlmrm_fast.ops.layer_norm import check_layer_norm_args, contiguous_rows
from vlmrm_fast.ops.quantize_rows import launch_config, quantize_rows_torch

if HAS_TRITON:
    import triton
    import triton.language as tl

    from vlmrm_fast.ops._triton import load_row_tile, to_output
    from vlmrm_fast.ops.layer_norm import normalise_rows
    from vlmrm_fast.ops.quantize_rows import quantize_tile

    @triton.jit
    def _layer_norm_quantize_kernel(
        x_ptr,
        add_ptr,
        total_ptr,
        weight_ptr,
        bias_ptr,
        q_ptr,
        scale_ptr,
        n_rows,
        stride_x_row,
        stride_add_row,
        eps,
        WIDTH: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_WIDTH: tl.constexpr,
        ADD: tl.constexpr,
        ROUND_BF16: tl.constexpr,
        ROUND_BY_HAND: tl.constexpr,
    ):
        # One program: BLOCK_ROWS whole rows, read once and kept in registers for the add, both LayerNorm
        # passes and the quantisation.
        x, rows, cols, row_ok, mask = load_row_tile(x_ptr, stride_x_row, n_rows, WIDTH, BLOCK_ROWS, BLOCK_WIDTH)
        if ADD:
            x += tl.load(add_ptr + rows[:, None] * stride_add_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            total = to_output(x, total_ptr.dtype.element_ty, ROUND_BF16)
            tl.store(total_ptr + rows[:, None] * WIDTH + cols[None, :], total, mask=mask)
            x = total.to(tl.float32)  # the LayerNorm's input is the stream as stored, rounded
        y = normalise_rows(x, mask, weight_ptr, bias_ptr, eps, WIDTH, BLOCK_ROWS, BLOCK_WIDTH)
        q, scale = quantize_tile(y, BLOCK_ROWS, BLOCK_WIDTH, ROUND_BY_HAND)  # padding: y = 0 (w = b = 0 there)
        tl.store(q_ptr + rows[:, None] * WIDTH + cols[None, :], q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=row_ok)


Quantized = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(total [..., D] in x's dtype; E4M3 values [M, D]; float32 scales [M, 1]), M the number of rows."""


def check_layer_norm_quantize_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                   add: Optional[torch.Tensor]) -> None:
    """A ``ValueError`` naming the problem unless the op takes these tensors."""
    check_layer_norm_args(x, weight, bias)
    if add is not None and (add.shape != x.shape or add.dtype != x.dtype or add.device != x.device):
        raise ValueError(f"layer_norm_quantize adds `add` to x as they are: give it x's shape, dtype and device "
                         f"({tuple(x.shape)} {x.dtype} on {x.device}); got {tuple(add.shape)} {add.dtype} on {add.device}.")


def layer_norm_quantize_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
                               add: Optional[torch.Tensor] = None) -> Quantized:
    """Launch the kernel: one program per few rows (:func:`~vlmrm_fast.ops.quantize_rows.launch_config`).

    Args:
        x: [..., D] float32/bfloat16/float16, 1 <= D <= 16384, on a device Triton runs on (E4M3 stores
            need compute capability 8.9 or more); any view that keeps whole rows (else a copy is made).
        weight, bias: [D] float (any of the three types), on ``x``'s device.
        eps: added to the variance.
        add: None, or [..., D] like ``x``: the LayerNorm's input is then ``x + add``.
    Returns:
        (``x + add`` [..., D] contiguous in ``x``'s dtype, or ``x`` itself without ``add``; E4M3 values
        [M, D] contiguous; float32 scales [M, 1]), M = x.numel() // D, on ``x``'s device.
    """
    require_working_interpreter()
    check_layer_norm_quantize_args(x, weight, bias, add)
    flat = contiguous_rows(x)
    n_rows, width = flat.shape
    total = x if add is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    q = torch.empty((n_rows, width), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return total, q, scale
    add_rows = flat if add is None else contiguous_rows(add)  # without ADD the kernel reads neither it nor total
    # the quantisation kernel's launch (the LayerNorm kernel's rows, twice its warps: 16 values a thread;
    # with 32, Triton 3.6 put ViT-B-32's ln_1 on a stack frame, benchmarks/kernel_resources.py)
    rows, block_width, warps = launch_config(width)
    with on_device(x.device):
        _layer_norm_quantize_kernel[(triton.cdiv(n_rows, rows),)](
            flat, add_rows, total, weight.contiguous(), bias.contiguous(), q, scale, n_rows, flat.stride(0),
            add_rows.stride(0), float(eps), WIDTH=width, BLOCK_ROWS=rows, BLOCK_WIDTH=block_width,
            ADD=add is not None, ROUND_BF16=rounds_bf16_by_hand(x.dtype), ROUND_BY_HAND=interpreter_enabled(),
            num_warps=warps,
            enable_fp_fusion=True,  # pinned, as in ops/preprocess.py
        )
    return total, q, scale


def layer_norm_quantize_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
                              add: Optional[torch.Tensor] = None) -> Quantized:
    """The same in torch ops (any device): the fallback."""
    check_layer_norm_quantize_args(x, weight, bias, add)
    total = x if add is None else x + add
    y = torch.nn.functional.layer_norm(total.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    q, scale = quantize_rows_torch(y.reshape(-1, x.shape[-1]))
    return total, q, scale


def layer_norm_quantize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
                        add: Optional[torch.Tensor] = None, impl: Literal["triton", "torch"] = "triton") -> Quantized:
    """``x + add`` (or ``x``), and the E4M3 values and scales of its LayerNorm: see the module docstring."""
    if impl == "triton":
        return layer_norm_quantize_triton(x, weight, bias, eps, add=add)
    return layer_norm_quantize_torch(x, weight, bias, eps, add=add)
