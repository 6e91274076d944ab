"""Frame preprocessing: uint8 (or [0, 1] float) NHWC frames -> normalised NCHW tower input.

One fused op: layout change, cast, bicubic resize (squash or shorter side + centre crop, with or
without antialiasing), an optional flip of bottom-up (OpenGL) rows, and the CLIP normalisation, in a
single pass over the frames. Because resizing is linear with weights that sum to one, the
normalisation ``(v / 255 - mean) / std`` is applied once to the resampled value as ``v * scale +
shift``.

Semantics (SPEC §1.2), shared by the Triton kernel and the torch path:
- "vlmrm": frames / 255 -> resize to (S, S), bicubic, no antialiasing (aspect ratio not kept) -> normalise.
- "openclip": open_clip's eval transform, as the model's preprocess config sets it: frames / 255 ->
  shorter side to S with antialiasing -> centre crop S x S (``resize_mode="shortest"``, the default),
  or straight to (S_h, S_w) with antialiasing (``"squash"``); bicubic (the default) or bilinear
  (``interpolation``) -> normalise.
- Frames already S x S: both reduce to the cast and the normalisation (the fast path).
"""
import contextlib
import math
from dataclasses import dataclass
from typing import ContextManager, Literal, Optional, Sequence, Tuple

import torch

from vlmrm_fast.ops._triton import HAS_TRITON, interpreter_enabled, require_working_interpreter, rounds_bf16_by_hand
from vlmrm_fast.ops._triton import on_device as _on_device
from vlmrm_fast.ops.resize_taps import INTERPOLATIONS, Interpolation, is_identity, resize_bands, resize_tables
from vlmrm_fast.precision import float32_matmuls

PreprocessMode = Literal["vlmrm", "openclip"]
PREPROCESS_MODES = ("vlmrm", "openclip")
ResizeMode = Literal["shortest", "squash"]
RESIZE_MODES = ("shortest", "squash")


def check_preprocess_mode(mode: str) -> None:
    """A ``ValueError`` naming the choices unless ``mode`` is one of :data:`PREPROCESS_MODES`."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"preprocess={mode!r} is not one of {PREPROCESS_MODES} (README: How it works).")


@dataclass(frozen=True)
class PreprocessSpec:
    """What a vision tower expects: its input size and normalisation, and how frames get there.

    Attributes:
        size: (height, width) of the tower's input.
        mean, std: per-channel normalisation of [0, 1] RGB values.
        mode: "vlmrm" (bicubic squash, no antialiasing: the paper's) or "openclip" (open_clip's eval
            transform, antialiased, shaped by the two fields below).
        resize_mode: "openclip" mode only: "shortest" (shorter side to S, centre crop) or "squash".
        interpolation: "openclip" mode only: "bicubic" or "bilinear".
    """

    size: Tuple[int, int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    mode: PreprocessMode = "vlmrm"
    resize_mode: ResizeMode = "shortest"
    interpolation: Interpolation = "bicubic"

    def __post_init__(self) -> None:
        check_preprocess_mode(self.mode)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB); got {self.mean} and {self.std}.")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):  # inf std: every frame the same pixels
            raise ValueError(f"mean and std must be finite numbers; got {self.mean} and {self.std}.")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive; got {self.std}.")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"resize_mode={self.resize_mode!r} is not one of {RESIZE_MODES}; open_clip's 'longest' (a "
                "letterbox with padding) is not supported: use preprocess='vlmrm' (a squash resize) for this model."
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r} is not one of {INTERPOLATIONS}.")
        if self.mode == "vlmrm" and (self.resize_mode, self.interpolation) != ("shortest", "bicubic"):
            raise ValueError(
                f"resize_mode={self.resize_mode!r} and interpolation={self.interpolation!r} apply to "
                "mode='openclip' only; mode='vlmrm' is the paper's fixed transform (bicubic squash, no "
                "antialiasing). Leave them at their defaults, or use mode='openclip'."
            )
        if self.crops and self.size[0] != self.size[1]:  # here, not at the first frames to resize
            raise ValueError(
                f"preprocess='openclip' (shorter side + centre crop) needs a square input size; the model "
                f"takes {self.size[0]}x{self.size[1]}. Use preprocess='vlmrm' (a squash resize) for this model."
            )

    @property
    def crops(self) -> bool:
        """Whether frames are resized by their shorter side and centre-cropped (else squashed)."""
        return self.mode == "openclip" and self.resize_mode == "shortest"

    def resample_options(self) -> dict:
        """The keyword arguments of :func:`resize_tables` and :func:`resize_bands` for this spec."""
        return {"crop": self.crops, "antialias": self.mode == "openclip", "interpolation": self.interpolation}

    def affine(self, frames_dtype: torch.dtype) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """Per-channel (scale, shift) mapping a stored value v to ``(v / range - mean) / std``."""
        value_range = 255.0 if frames_dtype == torch.uint8 else 1.0
        scale = tuple(1.0 / (value_range * s) for s in self.std)
        shift = tuple(-m / s for m, s in zip(self.mean, self.std))
        return scale, shift


if HAS_TRITON:
    import triton
    import triton.language as tl

    from vlmrm_fast.ops._triton import to_output

    @triton.jit
    def _preprocess_kernel(
        src_ptr,
        out_ptr,
        row_idx_ptr,
        row_w_ptr,
        col_idx_ptr,
        col_w_ptr,
        scale0, scale1, scale2,
        shift0, shift1, shift2,
        stride_n, stride_h, stride_w, stride_c,
        height,
        out_h,
        out_w,
        TAPS_Y: tl.constexpr,
        TAPS_X: tl.constexpr,
        RESAMPLE: tl.constexpr,
        BOTTOM_UP: tl.constexpr,
        ROUND_BF16: tl.constexpr,
        BLOCK_Y: tl.constexpr,
        BLOCK_X: tl.constexpr,
    ):
        # One program: a BLOCK_Y x BLOCK_X tile of one frame's output, all three channels. Frames run
        # along grid axis 0 (no 65535 limit there). Offsets are int64: a strided view (a mosaic of all
        # envs, a planar buffer) can put one frame's pixels more than 2**31 bytes apart.
        frame = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        tiles_x = tl.cdiv(out_w, BLOCK_X)
        oy = (tile // tiles_x) * BLOCK_Y + tl.arange(0, BLOCK_Y)
        ox = (tile % tiles_x) * BLOCK_X + tl.arange(0, BLOCK_X)
        in_y = oy < out_h
        in_x = ox < out_w
        mask = in_y[:, None] & in_x[None, :]
        src = src_ptr + frame * stride_n
        # tl.cast, not .to(): a GPU launch turns an integer argument equal to 1 (stride_c of every
        # NHWC frame tensor) into a compile-time constant, a plain int with no .to method.
        stride_c = tl.cast(stride_c, tl.int64)

        if RESAMPLE:
            # Tap counts are compile-time constants: a frame size has one pair (4 x 4 for the squash
            # resize), the loops get known trip counts, and the CPU interpreter of Triton 3.0-3.6 (3.9's
            # is fixed) cannot take a runtime integer as a loop bound under NumPy >= 2.4.
            acc0 = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
            acc1 = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
            for ky in range(TAPS_Y):
                iy = tl.load(row_idx_ptr + oy * TAPS_Y + ky, mask=in_y, other=0).to(tl.int64)
                wy = tl.load(row_w_ptr + oy * TAPS_Y + ky, mask=in_y, other=0.0)
                row0 = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
                row1 = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
                row2 = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
                for kx in range(TAPS_X):
                    ix = tl.load(col_idx_ptr + ox * TAPS_X + kx, mask=in_x, other=0).to(tl.int64)
                    wx = tl.load(col_w_ptr + ox * TAPS_X + kx, mask=in_x, other=0.0)[None, :]
                    p = src + iy[:, None] * stride_h + ix[None, :] * stride_w
                    row0 += wx * tl.load(p, mask=mask, other=0).to(tl.float32)
                    row1 += wx * tl.load(p + stride_c, mask=mask, other=0).to(tl.float32)
                    row2 += wx * tl.load(p + 2 * stride_c, mask=mask, other=0).to(tl.float32)
                acc0 += wy[:, None] * row0
                acc1 += wy[:, None] * row1
                acc2 += wy[:, None] * row2
        else:
            if BOTTOM_UP:
                iy = (height - 1 - oy).to(tl.int64)
            else:
                iy = oy.to(tl.int64)
            p = src + iy[:, None] * stride_h + ox.to(tl.int64)[None, :] * stride_w
            acc0 = tl.load(p, mask=mask, other=0).to(tl.float32)
            acc1 = tl.load(p + stride_c, mask=mask, other=0).to(tl.float32)
            acc2 = tl.load(p + 2 * stride_c, mask=mask, other=0).to(tl.float32)

        plane = out_h * out_w
        dst = out_ptr + frame * 3 * plane + oy[:, None] * out_w + ox[None, :]
        out_ty = out_ptr.dtype.element_ty
        tl.store(dst, to_output(acc0 * scale0 + shift0, out_ty, ROUND_BF16), mask=mask)
        tl.store(dst + plane, to_output(acc1 * scale1 + shift1, out_ty, ROUND_BF16), mask=mask)
        tl.store(dst + 2 * plane, to_output(acc2 * scale2 + shift2, out_ty, ROUND_BF16), mask=mask)


_RESIZE_TILE = (4, 64)
"""The resizes' GPU tile, with 4 warps (2 outputs a thread): the fastest of 12 tiles timed on an H200 for
both resizes at 1024 frames, 1.8-2.0x faster than 16 x 64 (benchmarks/results/kernels-h200.csv: the
sweep at e173084, confirmed in one run at cd6449d)."""
_IDENTITY_TILE = (4, 128)
"""The identity path's (frames at the tower's size), with 4 warps (4 outputs a thread): the fastest of
the same 12 for 1024 frames at 224, 0.182 and 0.180 ms against 4 x 64's 0.197 in the two runs (60% of
the copy bandwidth against 55%)."""


def _tile_shape(out_h: int, out_w: int, resample: bool) -> Tuple[int, int]:
    """The GPU tile of a resize or of the identity path; in the CPU interpreter, whose cost is per
    operation rather than per element, one tile covers the whole frame."""
    if interpreter_enabled():
        return triton.next_power_of_2(out_h), triton.next_power_of_2(out_w)
    return _RESIZE_TILE if resample else _IDENTITY_TILE


MAX_GRID_Y = 65535
"""CUDA's limit on a launch grid's second axis, where the preprocess kernel puts the tiles of a frame."""


def check_tile(tile: Tuple[int, int, int]) -> None:
    """Raise ValueError unless ``tile`` is (rows, columns, warps), powers of two, at most 32 warps."""
    if not (
        len(tile) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0 for v in tile)
        and tile[2] <= 32
    ):
        raise ValueError(f"tile must be (rows, columns, warps), each a power of two, at most 32 warps; got {tile!r}.")


def preprocess_triton(
    frames: torch.Tensor,
    spec: PreprocessSpec,
    out_dtype: torch.dtype,
    bottom_up: bool = False,
    *,
    tile: Optional[Tuple[int, int, int]] = None,
) -> torch.Tensor:
    """Launch the fused kernel: one program per output tile per frame (on a GPU 4 x 64 for a resize,
    4 x 128 for frames at the tower's size).

    Args:
        frames: [N, H, W, 3] uint8 or float in [0, 1], any strides, on a CUDA device (or CPU under
            ``TRITON_INTERPRET=1``).
        tile: (rows, columns, warps) of one program instead of the default, for tuning
            (``benchmarks/bench_kernels.py --preprocess-tiles``); rows and columns powers of two.
    Returns:
        [N, 3, S_h, S_w] contiguous, ``out_dtype``, on ``frames.device``.
    """
    require_working_interpreter()
    if tile is not None:
        check_tile(tile)
    frames = frames.resolve_neg()  # a view with the negative bit (x.conj().imag) holds -x in memory: the kernel reads that
    n, height, width, _ = frames.shape
    out_h, out_w = spec.size
    out = torch.empty((n, 3, out_h, out_w), dtype=out_dtype, device=frames.device)
    if n == 0:
        return out
    resample = not is_identity(height, width, spec.size)
    if resample:
        row_idx, row_w, col_idx, col_w = resize_tables(
            height, width, spec.size, bottom_up=bottom_up, device=frames.device, **spec.resample_options()
        )
        taps_y, taps_x = row_idx.shape[1], col_idx.shape[1]
    else:  # the tables are not read on the fast path; any int32/float32 pointers do
        row_idx = col_idx = torch.empty(1, dtype=torch.int32, device=frames.device)
        row_w = col_w = torch.empty(1, dtype=torch.float32, device=frames.device)
        taps_y = taps_x = 0
    scale, shift = spec.affine(frames.dtype)
    block_y, block_x = _tile_shape(out_h, out_w, resample) if tile is None else tile[:2]
    # FMA contraction pinned on: Triton 3.10 turns its default off (and 3.9 warns that it will).
    launch = {"enable_fp_fusion": True} if tile is None else {"enable_fp_fusion": True, "num_warps": tile[2]}
    grid = (n, triton.cdiv(out_h, block_y) * triton.cdiv(out_w, block_x))
    if grid[1] > MAX_GRID_Y:
        raise ValueError(
            f"tile {tile!r} cuts a {out_h} x {out_w} output into {grid[1]} tiles, over CUDA's {MAX_GRID_Y} "
            "programs on a grid's second axis: use more rows or columns per tile."
        )
    with _on_device(frames.device):
        _preprocess_kernel[grid](
            frames, out, row_idx, row_w, col_idx, col_w,
            *scale, *shift,
            *frames.stride(),
            height, out_h, out_w,
            TAPS_Y=taps_y, TAPS_X=taps_x, RESAMPLE=resample, BOTTOM_UP=bottom_up,
            ROUND_BF16=rounds_bf16_by_hand(out_dtype),
            BLOCK_Y=block_y, BLOCK_X=block_x, **launch,
        )
    return out


def _full_precision_matmul(device: torch.device) -> ContextManager[None]:
    # TF32 (if a user enabled it) would cost ~1e-3 here; the resize is cheap next to the tower.
    return float32_matmuls() if device.type == "cuda" else contextlib.nullcontext()


def _resample_banded(frames: torch.Tensor, bands: Tuple[torch.Tensor, ...], out_size: Tuple[int, int]) -> torch.Tensor:
    """[N, H, W, 3] frames (any strides) -> [N, 3, S_h, S_w] float32, resampled with ``resize_bands``.

    Rows first, while the frames are still uint8 and channels-last: gathering each band's window of
    rows copies whole pixel rows, and the product runs over W * 3 contiguous values. Then columns.
    """
    rows, row_w, cols, col_w_t = bands
    n, _, width, _ = frames.shape
    out_h, out_w = out_size
    k_y, band, win_y = row_w.shape
    k_x, win_x, _ = col_w_t.shape
    x = frames.index_select(1, rows).to(torch.float32).reshape(n, k_y, win_y, width * 3)
    x = torch.matmul(row_w, x)  # [N, Ky, band, W * 3]
    x = x.view(n, k_y * band, width, 3)[:, :out_h].permute(0, 3, 1, 2)  # [N, 3, S_h, W]
    x = x.index_select(3, cols).reshape(n * 3 * out_h, k_x, win_x).transpose(0, 1)  # [Kx, N * 3 * S_h, win_x]
    x = torch.bmm(x, col_w_t)  # [Kx, N * 3 * S_h, band]
    return x.transpose(0, 1).reshape(n, 3, out_h, k_x * band)[..., :out_w]


_CPU_SLICE_BYTES = 4 << 20


def _resample_banded_in_slices(frames: torch.Tensor, bands: Tuple[torch.Tensor, ...], out_size: Tuple[int, int]) -> torch.Tensor:
    """:func:`_resample_banded` over slices of the batch on CPU, whole on a GPU.

    On CPU the window rows of one 480 x 480 frame are already 2.9 MB of float32; a whole batch runs
    out of cache, and slices of about 4 MB are 2-4x faster at batch 8-32.
    """
    n, _, width, _ = frames.shape
    k_y, _, win_y = bands[1].shape
    per_frame = k_y * win_y * width * 3 * 4
    step = n if frames.device.type != "cpu" else max(1, _CPU_SLICE_BYTES // per_frame)
    if step >= n:
        return _resample_banded(frames, bands, out_size)
    out = torch.empty((n, 3) + tuple(out_size), dtype=torch.float32, device=frames.device)
    for i in range(0, n, step):
        out[i : i + step] = _resample_banded(frames[i : i + step], bands, out_size)
    return out


def preprocess_torch(
    frames: torch.Tensor, spec: PreprocessSpec, out_dtype: torch.dtype, bottom_up: bool = False
) -> torch.Tensor:
    """The same op in plain torch, float32: the fallback where Triton cannot run.

    The resize is banded matrix products: each run of 16 output rows (then columns) is one small
    product with the window of inputs it reads, built from the same taps as the kernel's
    (:func:`~vlmrm_fast.ops.resize_taps.resize_bands`). torch's own float32 bicubic drifts ~2e-4
    from float64 at 480 -> 224; these stay within ~1e-6, at about a quarter of the dense products' time.
    """
    n, height, width, _ = frames.shape
    if n > 0 and not is_identity(height, width, spec.size):
        bands = resize_bands(
            height, width, spec.size, bottom_up=bottom_up, device=frames.device, **spec.resample_options()
        )
        with _full_precision_matmul(frames.device):
            x = _resample_banded_in_slices(frames, bands, spec.size)
    else:
        # Transposing the uint8 frames first moves a quarter of the bytes a float32 transpose would.
        x = frames.permute(0, 3, 1, 2).contiguous().to(torch.float32)
        if bottom_up:
            x = x.flip(2)
    if n == 0:
        x = x.new_empty((0, 3) + tuple(spec.size))
    scale, shift = spec.affine(frames.dtype)
    scale_t = torch.tensor(scale, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    shift_t = torch.tensor(shift, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return torch.addcmul(shift_t, x, scale_t).to(out_dtype).contiguous()


def preprocess(
    frames: torch.Tensor,
    spec: PreprocessSpec,
    out_dtype: torch.dtype = torch.float32,
    *,
    bottom_up: bool = False,
    impl: Literal["triton", "torch"] = "triton",
) -> torch.Tensor:
    """Frames [N, H, W, 3] (uint8, or float in [0, 1]) -> tower input [N, 3, S_h, S_w] in ``out_dtype``.

    ``bottom_up`` reads the rows last-first (frames straight from ``glReadPixels``). ``impl`` picks
    the fused Triton kernel or the plain torch path; inputs are assumed validated (see
    :func:`vlmrm_fast.frames.as_frame_batch`).
    """
    if impl == "triton":
        return preprocess_triton(frames, spec, out_dtype, bottom_up)
    return preprocess_torch(frames, spec, out_dtype, bottom_up)


def mean_std_of(values: Sequence[float]) -> Tuple[float, float, float]:
    """Three floats from a config entry (open_clip stores mean/std as lists or tuples)."""
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"expected 3 per-channel values, got {len(out)}: {out}")
    return out
