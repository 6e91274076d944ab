"""Two candidate kernels for preprocessing frames already at the tower's size, to time against the op's own.

The op (:func:`vlmrm_fast.ops.preprocess.preprocess_triton`) runs frames that need no resize (the
renderer's 224 x 224, the case the package is built around) through its tiled kernel: 4 x 128 outputs
a program, three byte loads a pixel. On the H200 that reached 60% of the copy bandwidth for 1024
frames to bf16 (``benchmarks/results/kernels-h200.csv``; 39-60% over 12 tiles); the target is 80%. Two
guesses at what holds it back, each a kernel here, so that one GPU run can tell (``bench_kernels.py
--identity-variants``) before either replaces the op's path:

- ``flat``: the frame's pixels as one flat range, ``BLOCK`` a program. A 224-wide frame leaves no
  lane masked (64-wide tiles mask 32 of every 256 columns), at the cost of a division a pixel for
  the row (any strides, bottom-up rows too).
- ``words``: four pixels (12 bytes) as three 32-bit loads, unpacked with shifts and interleaved in
  registers: a quarter of the load instructions, each 4-byte aligned. Needs whole pixels packed
  (``stride_w == 3``, ``stride_c == 1``), rows of a multiple of 4 pixels, and 4-byte aligned rows and
  frames.

Both compute exactly what the op computes (the same float32 ``v * scale + shift`` and rounding);
``tests/test_identity_variants.py`` checks them against the op and the float64 reference.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from vlmrm_fast.ops._triton import on_device as _on_device
from vlmrm_fast.ops._triton import rounds_bf16_by_hand, to_output
from vlmrm_fast.ops.preprocess import PreprocessSpec
from vlmrm_fast.ops.resize_taps import is_identity

VARIANTS = ("flat", "words")


@triton.jit
def _identity_flat_kernel(
    src_ptr, out_ptr,
    scale0, scale1, scale2, shift0, shift1, shift2,
    stride_n, stride_h, stride_w, stride_c,
    height, width,
    BOTTOM_UP: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    frame = tl.program_id(0).to(tl.int64)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    plane = height * width
    mask = pix < plane
    y = pix // width
    x = pix - y * width
    if BOTTOM_UP:
        y = height - 1 - y
    stride_c = tl.cast(stride_c, tl.int64)  # an argument equal to 1 arrives as a plain int (see the op's kernel)
    p = src_ptr + frame * stride_n + y.to(tl.int64) * stride_h + x.to(tl.int64) * stride_w
    r = tl.load(p, mask=mask, other=0).to(tl.float32)
    g = tl.load(p + stride_c, mask=mask, other=0).to(tl.float32)
    b = tl.load(p + 2 * stride_c, mask=mask, other=0).to(tl.float32)
    dst = out_ptr + frame * 3 * plane + pix
    out_ty = out_ptr.dtype.element_ty
    tl.store(dst, to_output(r * scale0 + shift0, out_ty, ROUND_BF16), mask=mask)
    tl.store(dst + plane, to_output(g * scale1 + shift1, out_ty, ROUND_BF16), mask=mask)
    tl.store(dst + 2 * plane, to_output(b * scale2 + shift2, out_ty, ROUND_BF16), mask=mask)


@triton.jit
def _byte(word, shift: tl.constexpr):
    return ((word >> shift) & 0xFF).to(tl.float32)


@triton.jit
def _four_pixels(v0, v1, v2, v3, GROUPS: tl.constexpr):
    # [GROUPS] x 4 -> [4 * GROUPS] in pixel order: join(join(v0, v2), join(v1, v3)) is [GROUPS, 2, 2]
    # with v0, v1, v2, v3 at [g, 0, 0], [g, 0, 1], [g, 1, 0], [g, 1, 1].
    return tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), [4 * GROUPS])


@triton.jit
def _identity_words_kernel(
    src_ptr, out_ptr,
    scale0, scale1, scale2, shift0, shift1, shift2,
    frame_words, row_words,
    height, width,
    BOTTOM_UP: tl.constexpr, ROUND_BF16: tl.constexpr, GROUPS: tl.constexpr,
):
    # src_ptr: the frames as int32 words. Four RGB pixels are three little-endian words:
    # w0 = R0 G0 B0 R1, w1 = G1 B1 R2 G2, w2 = B2 R3 G3 B3 (first byte lowest).
    frame = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    plane = height * width
    groups_per_row = width // 4
    mask = group < plane // 4
    y = group // groups_per_row
    x_group = group - y * groups_per_row
    if BOTTOM_UP:
        y = height - 1 - y
    word = src_ptr + frame * frame_words + y.to(tl.int64) * row_words + 3 * x_group.to(tl.int64)
    w0 = tl.load(word, mask=mask, other=0)
    w1 = tl.load(word + 1, mask=mask, other=0)
    w2 = tl.load(word + 2, mask=mask, other=0)
    r = _four_pixels(_byte(w0, 0), _byte(w0, 24), _byte(w1, 16), _byte(w2, 8), GROUPS)
    g = _four_pixels(_byte(w0, 8), _byte(w1, 0), _byte(w1, 24), _byte(w2, 16), GROUPS)
    b = _four_pixels(_byte(w0, 16), _byte(w1, 8), _byte(w2, 0), _byte(w2, 24), GROUPS)
    pix = tl.program_id(1) * (4 * GROUPS) + tl.arange(0, 4 * GROUPS)
    out_mask = pix < plane
    dst = out_ptr + frame * 3 * plane + pix
    out_ty = out_ptr.dtype.element_ty
    tl.store(dst, to_output(r * scale0 + shift0, out_ty, ROUND_BF16), mask=out_mask)
    tl.store(dst + plane, to_output(g * scale1 + shift1, out_ty, ROUND_BF16), mask=out_mask)
    tl.store(dst + 2 * plane, to_output(b * scale2 + shift2, out_ty, ROUND_BF16), mask=out_mask)


def words_unsupported_reason(frames: torch.Tensor) -> str:
    """Why ``frames`` cannot be read as 32-bit words by ``words``; empty when they can."""
    _, _, width, _ = frames.shape
    stride_n, stride_h, stride_w, stride_c = frames.stride()
    if frames.dtype != torch.uint8:
        return f"words reads uint8 frames; these are {frames.dtype}"
    if (stride_w, stride_c) != (3, 1):
        return f"words needs packed RGB pixels (stride_w 3, stride_c 1); these have {stride_w}, {stride_c}"
    if width % 4:
        return f"words needs rows of a multiple of 4 pixels; these are {width} wide"
    if stride_h % 4 or stride_n % 4 or frames.data_ptr() % 4:
        return "words needs 4-byte aligned rows and frames"
    return ""


def _as_words(frames: torch.Tensor) -> torch.Tensor:
    """The bytes from the first pixel of ``frames`` to the end of its last row, as int32 words (the same
    memory; packed rows of a multiple of 4 pixels end on a word boundary)."""
    n, height, width, _ = frames.shape
    stride_n, stride_h, _, _ = frames.stride()
    span = (n - 1) * stride_n + (height - 1) * stride_h + 3 * width
    return torch.as_strided(frames, (span,), (1,)).view(torch.int32)


def parse_variant(text: str) -> Tuple[str, int, int]:
    """ "flat1024w4" -> ("flat", 1024, 4): the kernel, pixels a program (a power of two, at least 4 for
    ``words``) and warps (a power of two, at most 32)."""
    kind = next((v for v in VARIANTS if text.lower().startswith(v)), None)
    try:
        if kind is None:
            raise ValueError
        block, warps = (int(v) for v in text.lower()[len(kind):].split("w"))
    except ValueError:
        raise ValueError(f"{text!r}: write {' or '.join(VARIANTS)}, the pixels a program, w and the warps, "
                         "e.g. flat1024w4") from None
    if block < 4 or block & (block - 1) or warps < 1 or warps > 32 or warps & (warps - 1):
        raise ValueError(f"{text!r}: pixels a program (at least 4) and warps (at most 32) must be powers of two")
    return kind, block, warps


def preprocess_identity(
    frames: torch.Tensor, spec: PreprocessSpec, out_dtype: torch.dtype, variant: Tuple[str, int, int],
    bottom_up: bool = False,
) -> torch.Tensor:
    """What ``preprocess_triton`` gives for frames of the tower's size, through a candidate kernel.

    Args:
        frames: [N, S_h, S_w, 3] uint8 (``words``) or uint8/float in [0, 1] (``flat``), any strides
            ``flat`` takes (``words``: see :func:`words_unsupported_reason`), on a CUDA device (or
            CPU under ``TRITON_INTERPRET=1``).
        variant: (kind, pixels a program, warps) from :func:`parse_variant`.
    Returns:
        [N, 3, S_h, S_w] contiguous ``out_dtype`` on ``frames.device``.
    """
    kind, block, warps = variant
    n, height, width, _ = frames.shape
    if not is_identity(height, width, spec.size):
        raise ValueError(f"{kind}: frames of {height} x {width} need a resize to {spec.size}; these kernels only "
                         "take frames of the tower's size.")
    why = words_unsupported_reason(frames) if kind == "words" else ""
    if why:
        raise ValueError(why)
    out = torch.empty((n, 3, height, width), dtype=out_dtype, device=frames.device)
    if n == 0:
        return out
    scale, shift = spec.affine(frames.dtype)
    launch = dict(
        BOTTOM_UP=bottom_up, ROUND_BF16=rounds_bf16_by_hand(out_dtype),
        num_warps=warps, enable_fp_fusion=True,
    )
    with _on_device(frames.device):
        if kind == "flat":
            grid = (n, triton.cdiv(height * width, block))
            _identity_flat_kernel[grid](
                frames, out, *scale, *shift, *frames.stride(), height, width, BLOCK=block, **launch)
        else:
            stride_n, stride_h, _, _ = frames.stride()
            grid = (n, triton.cdiv(height * width, block))
            _identity_words_kernel[grid](
                _as_words(frames), out, *scale, *shift, stride_n // 4, stride_h // 4, height, width, GROUPS=block // 4, **launch)
    return out
