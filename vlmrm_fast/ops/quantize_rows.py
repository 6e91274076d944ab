"""Rows of activations to E4M3 (fp8) with one float32 scale a row, for the fp8 matmuls of the "torch"
backend (:mod:`vlmrm_fast.backends.torch_fp8`).

For a row ``x`` of width K:

    amax = max_i |x_i|  (float32),   s = max(amax, 1e-12) / 448,   q_i = e4m3(x_i / s)

with IEEE float32 divisions and ``e4m3`` rounding to nearest, ties to even: row ``x`` is about ``q * s``,
its largest magnitude mapped to 448, E4M3's largest finite value. No clamp is needed: ``s`` is within
2^-24 of ``amax / 448``, so ``|x_i / s|`` is at most ``448 (1 + 2^-23)``, which rounds to 448, far below
464, where float8_e4m3fn (no infinity) would turn to NaN. The kernel and the torch path give the same
bytes.

With ``activation="gelu"`` the row quantised is ``GELU(x)`` instead, the exact GELU as torch writes it,
``x * 0.5 * (1 + erf(x / sqrt(2)))``, computed in float32 and quantised as it is (not rounded to ``x``'s
dtype first, as eager torch's own GELU pass would): the input of each fp8 MLP's second matmul, straight
from the first matmul's bf16 output. Eager torch spends a pass on the GELU, reading and writing the
hidden activations (4 bytes per bf16 element: about 0.14 s of ViT-bigG-14's batch-1024 call and 34 ms of
ViT-L-14's, at the 3 TB/s torch's GELU kernel moved in the H200 profile of ViT-B-32); here it costs only
the arithmetic. The two paths' float32 ``erf`` (libdevice's, torch's) may differ in their last bits
(times |x| / 2 in the GELU), so their bytes may differ where that moves a value across an E4M3 rounding
midpoint. ``activation="quick_gelu"`` does the same with OpenAI's towers' QuickGELU, ``x * sigmoid(1.702
x)`` (:mod:`vlmrm_fast.ops.quick_gelu`'s formula: 12 bytes per element in open_clip's three ops, 4 in
that op's kernel, none here; the kernel's exp and torch's sigmoid may differ in their last bits too).

Why a kernel of our own: eager torch computes this in four passes (the row maxima; a float32 copy; the
division; the cast), moving about 21 bytes per bf16 element, before every fp8 matmul. At ViT-bigG-14's
batch 1024 the matmuls' inputs are 166 billion elements a tower call, 3.5 TB of traffic: about 0.8 s at
the H200's measured copy bandwidth (4.2 TB/s), beside a 1.94 s bf16 tower whose matmuls take 1.45 s
(``benchmarks/results/profile-h200-bigg``), so even twice as fast fp8 matmuls would leave eager fp8 no
faster than bf16. The kernel reads each row once and writes one byte an element (3 bytes per bf16
element: about 0.12 s).
"""
from typing import Literal, Optional, Tuple

import torch

from vlmrm_fast.ops._triton import HAS_TRITON, interpreter_enabled, on_device, require_working_interpreter
from vlmrm_fast.ops.quick_gelu import quick_gelu_float32

E4M3_MAX = 448.0
"""The largest finite float8_e4m3fn value."""
TINY_AMAX = 1e-12
"""An all-zero row gets this largest magnitude instead (its scale must not be 0)."""
MAX_WIDTH = 16384
"""The widest row the kernel takes (a row is held in registers; the towers' matmul inputs are 768 to 8192 wide)."""
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Activation = Optional[Literal["gelu", "quick_gelu"]]
ACTIVATIONS = (None, "gelu", "quick_gelu")
"""What may be applied to the rows before they are quantised; the kernel's ``ACTIVATION`` is the index."""
ELEMENTS_PER_PROGRAM = 4096
"""Rows are packed into a program up to this many elements (16 float32 values a thread at the warps of
:func:`launch_config`)."""


if HAS_TRITON:
    import triton
    import triton.language as tl

    from vlmrm_fast.ops._triton import load_row_tile
    from vlmrm_fast.ops.quick_gelu import quick_gelu_f32

    @triton.jit
    def quantize_tile(x, BLOCK_ROWS: tl.constexpr, BLOCK_WIDTH: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
        """Float32 rows ``x`` [BLOCK_ROWS, BLOCK_WIDTH] (padding 0) -> (their E4M3 values, still float32 and
        exact in E4M3 once cast; their scales [BLOCK_ROWS]): the module docstring's formula, shared by
        the kernels that quantise rows."""
        amax = tl.max(tl.abs(x), axis=1)
        # IEEE divisions (a GPU's plain float32 '/' may be 2 ulp off), as torch divides: the same bytes.
        # 1e-12 and 448 are TINY_AMAX and E4M3_MAX (a kernel reads no plain module globals)
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), tl.full((BLOCK_ROWS,), 448.0, tl.float32))
        q = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], (BLOCK_ROWS, BLOCK_WIDTH)))  # |q| < 464: no clamp
        if ROUND_BY_HAND:
            q = _round_to_e4m3(q)
        return q, scale

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr,
        q_ptr,
        scale_ptr,
        n_rows,
        stride_x_row,
        WIDTH: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_WIDTH: tl.constexpr,
        ACTIVATION: tl.constexpr,
        ROUND_BY_HAND: tl.constexpr,
    ):
        # One program: BLOCK_ROWS whole rows, each read once and kept in registers.
        x, rows, cols, row_ok, mask = load_row_tile(x_ptr, stride_x_row, n_rows, WIDTH, BLOCK_ROWS, BLOCK_WIDTH)
        if ACTIVATION == 1:  # torch's GELU formula and order; 0.7071... is 1 / sqrt(2) in float32; 0 where masked
            x = x * 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        elif ACTIVATION == 2:
            x = quick_gelu_f32(x)
        q, scale = quantize_tile(x, BLOCK_ROWS, BLOCK_WIDTH, ROUND_BY_HAND)
        tl.store(q_ptr + rows[:, None] * WIDTH + cols[None, :], q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=row_ok)

    @triton.jit
    def _round_to_e4m3(q):
        """float32 ``q`` (|q| < 464) rounded to the nearest E4M3 value, ties to even, still float32.
        Triton's CPU interpreter (3.9) loses the carry when a value rounds up into the next binade (124.7
        became 64, not 128), where GPUs convert right; interpreted kernels round first, so that the cast
        has nothing left to round."""
        bits = q.to(tl.uint32, bitcast=True)
        # normal values: 3 mantissa bits kept of float32's 23, the carry running into the exponent
        normal = ((bits + (((bits >> 20) & 1) + 0x7FFFF)) & 0xFFF00000).to(tl.float32, bitcast=True)
        # below 2**-6, E4M3's steps are 2**-9: float32's own rounding at 1.5 * 2**14 has that step (on the
        # magnitude, the sign put back after: what rounds to zero keeps it, as a GPU's conversion does)
        magnitude = (tl.abs(q) + 24576.0) - 24576.0
        subnormal = (magnitude.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)
        return tl.where(tl.abs(q) < 0.015625, subnormal, normal)


def launch_config(width: int) -> Tuple[int, int, int]:
    """(rows a program, columns a program (``width`` rounded up to a power of two), warps)."""
    block_width = 1 << (width - 1).bit_length()
    rows = max(1, min(16, ELEMENTS_PER_PROGRAM // block_width))
    warps = max(4, min(16, rows * block_width // 512))
    return rows, block_width, warps


def check_quantize_args(x: torch.Tensor, activation: Activation = None) -> None:
    """A ``ValueError`` naming the problem unless ``x`` is a [M, K] float tensor the op takes, and
    ``activation`` one it applies."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"quantize_rows applies activation=None, 'gelu' or 'quick_gelu'; got {activation!r}.")
    if x.dim() != 2:
        raise ValueError(f"quantize_rows takes rows [M, K]; got a tensor of shape {tuple(x.shape)}.")
    if x.dtype not in DTYPES:
        raise ValueError(f"quantize_rows takes float32, bfloat16 or float16 rows; got {x.dtype}.")


def quantize_rows_triton(x: torch.Tensor, *, activation: Activation = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: one program per few rows (:func:`launch_config`).

    Args:
        x: [M, K] float32/bfloat16/float16, 1 <= K <= :data:`MAX_WIDTH`, on a device Triton runs on
            (E4M3 stores need compute capability 8.9 or more), each row contiguous.
        activation: None, or "gelu" or "quick_gelu": quantise that of ``x``, computed in float32 (module
            docstring).
    Returns:
        ([M, K] float8_e4m3fn, contiguous; [M, 1] float32 scales), on ``x``'s device.
    """
    require_working_interpreter()
    check_quantize_args(x, activation)
    n_rows, width = x.shape
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"quantize_rows_triton takes rows of 1 to {MAX_WIDTH} values; got {width}: use "
                         f"quantize_rows(x, impl='torch').")
    if width > 1 and x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((n_rows, width), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return q, scale
    rows, block_width, warps = launch_config(width)
    with on_device(x.device):
        _quantize_rows_kernel[(triton.cdiv(n_rows, rows),)](
            x, q, scale, n_rows, x.stride(0), WIDTH=width, BLOCK_ROWS=rows, BLOCK_WIDTH=block_width,
            ACTIVATION=ACTIVATIONS.index(activation), ROUND_BY_HAND=interpreter_enabled(), num_warps=warps,
            enable_fp_fusion=True,  # pinned, as in ops/preprocess.py
        )
    return q, scale


def quantize_rows_torch(x: torch.Tensor, *, activation: Activation = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same in torch ops (any device and width): the fallback, and the weights' quantiser."""
    check_quantize_args(x, activation)
    if activation == "gelu":  # the kernel's formula: F.gelu on CPU is oneDNN's, whose erf is several ulp further off
        x = x.float()
        x = x * 0.5 * (1 + torch.erf(x * 0.7071067811865476))
    elif activation == "quick_gelu":
        x = quick_gelu_float32(x)
    amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    # 448 as a tensor on x's device: CUDA divides by a Python number as a multiplication by its float32
    # reciprocal, which may be a bit off the IEEE quotient (and so a scale and the bytes after it)
    scale = amax.clamp_min(TINY_AMAX) / amax.new_full((), E4M3_MAX)
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def quantize_rows(x: torch.Tensor, *, activation: Activation = None,
                  impl: Literal["triton", "torch"] = "triton") -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x`` [M, K] (or their ``activation``) -> (E4M3 values [M, K], float32 scales [M, 1]); see the
    module docstring."""
    if impl == "triton":
        return quantize_rows_triton(x, activation=activation)
    return quantize_rows_torch(x, activation=activation)


def kernel_takes(x: torch.Tensor) -> Optional[str]:
    """Why :func:`quantize_rows_triton` would refuse ``x`` [M, K] (or copy it), or None."""
    if x.dim() != 2 or x.dtype not in DTYPES:
        return "not [M, K] float rows"
    if not 1 <= x.shape[1] <= MAX_WIDTH:
        return f"rows wider than {MAX_WIDTH}"
    if x.shape[1] > 1 and x.stride(1) != 1:
        return "rows not contiguous"
    return None
