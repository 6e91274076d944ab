"""LayerNorm over the last dimension: rows of a CLIP tower's tokens, computed in float32.

For a row ``x`` of width D, weight ``w`` and bias ``b``:

    y = (x - mean(x)) / sqrt(var(x) + eps) * w + b,    var the biased variance (divide by D)

computed in float32 whatever the storage types, and rounded once to ``x``'s dtype, as torch's
``F.layer_norm`` does for bf16 and fp16 inputs (and open_clip's ``LayerNormFp32`` by casting).

Why a kernel of our own: on the H200 torch's ``vectorized_layer_norm_kernel`` ran the towers' bf16
LayerNorms at 1.4 to 1.7 TB/s of the 4.8 TB/s HBM peak, one row a thread block
(``benchmarks/results/profile-h200-*``: 9% of ViT-B-32's and ViT-L-14's tower time at batch 1024, 5% of
ViT-bigG-14's). The kernel below reads each row once, keeps it in registers for both passes (mean, then
the centred variance, which loses nothing to cancellation) and handles several short rows a program.
"""
from typing import Literal, Optional, Tuple

import torch

from vlmrm_fast.ops._triton import HAS_TRITON, on_device, require_working_interpreter, rounds_bf16_by_hand

MAX_WIDTH = 16384
"""The widest row the kernel takes (a row is held in registers; CLIP towers are 768 to 1664 wide)."""

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ELEMENTS_PER_PROGRAM = 4096
"""Rows are packed into a program up to this many elements (a 768 or 1024 wide row: 4 rows a program),
keeping 32 float32 values a thread at the warps chosen in :func:`launch_config`."""


if HAS_TRITON:
    import triton
    import triton.language as tl

    from vlmrm_fast.ops._triton import load_row_tile, to_output

    @triton.jit
    def normalise_rows(x, mask, weight_ptr, bias_ptr, eps, WIDTH: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK_WIDTH: tl.constexpr):
        """The LayerNorm (module docstring) of float32 rows ``x`` [BLOCK_ROWS, BLOCK_WIDTH] (``mask``: the
        real values; the others must be 0), float32; shared by the kernels that normalise rows."""
        cols = tl.arange(0, BLOCK_WIDTH)
        col_ok = cols < WIDTH
        # An IEEE division: a GPU's plain float32 '/' (div.full.f32) may be 2 ulp off, and a constant row's
        # mean must be the constant (centred values 0, output the bias exactly), as in torch's LayerNorm.
        # (Both operands float32 tensors: some Triton 3 releases do not convert an integer divisor here.)
        mean = tl.math.div_rn(tl.sum(x, axis=1), tl.full((BLOCK_ROWS,), WIDTH, tl.float32))
        centred = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / WIDTH
        inv_std = 1.0 / tl.sqrt(var + eps)
        w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        return centred * inv_std[:, None] * w[None, :] + b[None, :]

    @triton.jit
    def _layer_norm_kernel(
        x_ptr,
        weight_ptr,
        bias_ptr,
        out_ptr,
        n_rows,
        stride_x_row,
        eps,
        WIDTH: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_WIDTH: tl.constexpr,
        ROUND_BF16: tl.constexpr,
    ):
        # One program: BLOCK_ROWS whole rows. The row width is a compile-time constant (one per model).
        x, rows, cols, _, mask = load_row_tile(x_ptr, stride_x_row, n_rows, WIDTH, BLOCK_ROWS, BLOCK_WIDTH)
        y = normalise_rows(x, mask, weight_ptr, bias_ptr, eps, WIDTH, BLOCK_ROWS, BLOCK_WIDTH)
        tl.store(out_ptr + rows[:, None] * WIDTH + cols[None, :], to_output(y, out_ptr.dtype.element_ty, ROUND_BF16),
                 mask=mask)


def launch_config(width: int, rows_per_program: Optional[int] = None, num_warps: Optional[int] = None) -> Tuple[int, int, int]:
    """(rows a program, columns a program (``width`` rounded up to a power of two), warps) for rows of
    ``width``; ``rows_per_program`` and ``num_warps`` override the defaults (powers of two), for tuning."""
    block_width = 1 << (width - 1).bit_length()  # the next power of two (plain Python: no triton needed to plan)
    rows = max(1, min(16, ELEMENTS_PER_PROGRAM // block_width)) if rows_per_program is None else rows_per_program
    warps = max(4, min(16, rows * block_width // 1024)) if num_warps is None else num_warps
    for name, value in (("rows_per_program", rows), ("num_warps", warps)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two; got {value}.")
    return rows, block_width, warps


def check_layer_norm_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """A ``ValueError`` naming the problem unless the kernel can take these tensors."""
    width = x.shape[-1] if x.dim() else 0
    if x.dtype not in DTYPES:
        raise ValueError(f"layer_norm takes float32, bfloat16 or float16 input; got {x.dtype}.")
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"layer_norm normalises rows of 1 to {MAX_WIDTH} values; got a last dimension of {width}.")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (width,) or t.dtype not in DTYPES:
            raise ValueError(f"layer_norm's {name} must be a float tensor of shape ({width},); got "
                             f"{tuple(t.shape)} {t.dtype}.")
        if t.device != x.device:
            raise ValueError(f"layer_norm's {name} is on {t.device} and the input on {x.device}: move them together.")


def rows_of(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``x`` [..., D] as a [rows, D] view whose rows are evenly spaced and each contiguous, or None
    where no such view exists (then a copy would be needed)."""
    if x.dim() == 0 or (x.shape[-1] > 1 and x.stride(-1) != 1):
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., D] as evenly spaced contiguous rows [M, D]: :func:`rows_of`'s view, or a copy where none exists."""
    flat = rows_of(x)
    return x.contiguous().view(-1, x.shape[-1]) if flat is None else flat


def layer_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
    rows_per_program: Optional[int] = None, num_warps: Optional[int] = None,
) -> torch.Tensor:
    """Launch the kernel: one program per few rows (:func:`launch_config`).

    Args:
        x: [..., D] float32/bfloat16/float16, on a device Triton runs on, each row contiguous and the
            rows evenly spaced (any view of a contiguous tensor that keeps whole rows; else a copy is made).
        weight, bias: [D] float (any of the three types), on ``x``'s device.
        eps: added to the variance.
    Returns:
        [..., D] contiguous, ``x``'s dtype and device.
    """
    require_working_interpreter()
    check_layer_norm_args(x, weight, bias)
    flat = contiguous_rows(x)
    n_rows, width = flat.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return out
    rows, block_width, warps = launch_config(width, rows_per_program, num_warps)
    with on_device(x.device):
        _layer_norm_kernel[(triton.cdiv(n_rows, rows),)](
            flat, weight.contiguous(), bias.contiguous(), out, n_rows, flat.stride(0), float(eps),
            WIDTH=width, BLOCK_ROWS=rows, BLOCK_WIDTH=block_width,
            ROUND_BF16=rounds_bf16_by_hand(x.dtype), num_warps=warps,
            enable_fp_fusion=True,  # pinned, as in ops/preprocess.py: Triton 3.10 changes the default
        )
    return out


def layer_norm_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The same semantics through ``F.layer_norm`` in float32, rounded to ``x``'s dtype: the fallback."""
    check_layer_norm_args(x, weight, bias)
    y = torch.nn.functional.layer_norm(x.to(torch.float32), (x.shape[-1],), weight.to(torch.float32),
                                       bias.to(torch.float32), eps)
    return y.to(x.dtype)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
    impl: Literal["triton", "torch"] = "triton",
) -> torch.Tensor:
    """LayerNorm of ``x`` [..., D] over its last dimension -> [..., D] in ``x``'s dtype (computed in float32)."""
    if impl == "triton":
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_torch(x, weight, bias, eps)
