"""Sampling taps of the resizes, computed once per geometry on the host.

A separable resize maps each output index ``i`` along an axis to a few input indices and
weights: ``out[i] = sum_k w[i, k] * in[idx[i, k]]``. Tabulating them (float64 on the host, cast to
float32 on the device, cached) lets one kernel serve every mode: torch's bicubic without
antialiasing (a = -0.75, borders clamped), torch's antialiased bicubic and bilinear (a = -0.5 cubic
or a triangle, widened by the downscale factor, weights renormalised at the borders), a centre crop
(an offset into the resized axis) and OpenGL's bottom-up rows (mirrored indices).
"""
from __future__ import annotations

import functools
from typing import Literal, Tuple

import numpy as np
import torch

_A_PLAIN = -0.75  # torch.nn.functional.interpolate(mode="bicubic", antialias=False)
_A_ANTIALIAS = -0.5  # antialias=True (the PIL convention)

Interpolation = Literal["bicubic", "bilinear"]
INTERPOLATIONS = ("bicubic", "bilinear")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a``, support [-2, 2]."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _plain_taps(in_size: int, out_size: int, positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Four taps per output index, borders replicated (clamped indices)."""
    scale = in_size / out_size
    src = scale * (positions + 0.5) - 0.5  # cubic resampling does not clamp the source coordinate
    base = np.floor(src)
    frac = src - base
    offsets = np.arange(-1, 3)
    idx = np.clip(base[:, None].astype(np.int64) + offsets[None, :], 0, in_size - 1)
    weights = _cubic(frac[:, None] - offsets[None, :], _A_PLAIN)
    return idx, weights


def _triangle(x: np.ndarray) -> np.ndarray:
    """The bilinear (tent) kernel, support [-1, 1]."""
    return np.maximum(1.0 - np.abs(x), 0.0)


def _antialias_taps(
    in_size: int, out_size: int, positions: np.ndarray, interpolation: Interpolation
) -> Tuple[np.ndarray, np.ndarray]:
    """A filter stretched by the downscale factor; taps past the border are dropped and the rest renormalised."""
    scale = in_size / out_size
    radius = 2.0 if interpolation == "bicubic" else 1.0  # the unscaled filter's half-width
    support = radius * scale if scale >= 1.0 else radius
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (positions + 0.5)
    # Truncation toward zero, as the reference implementation casts to an integer.
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    last = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    count = last - first
    width = int(np.max(count))  # not count.max(): NumPy 2.5's stubs, read as Python 3.10, have no overload for it
    k = np.arange(width)
    idx = first[:, None] + k[None, :]
    x = (idx - center[:, None] + 0.5) * inv_scale
    weights = _cubic(x, _A_ANTIALIAS) if interpolation == "bicubic" else _triangle(x)
    weights = np.where(k[None, :] < count[:, None], weights, 0.0)
    weights = weights / weights.sum(axis=1, keepdims=True)
    return np.clip(idx, 0, in_size - 1), weights


def axis_taps(
    in_size: int,
    resized_size: int,
    out_size: int,
    crop_offset: int = 0,
    antialias: bool = False,
    mirror: bool = False,
    interpolation: Interpolation = "bicubic",
) -> Tuple[np.ndarray, np.ndarray]:
    """Taps of one axis: resize ``in_size`` -> ``resized_size``, keep ``out_size`` from ``crop_offset``.

    Returns ``(idx, weights)``, int64 and float64 arrays of shape [out_size, K]. With ``mirror`` the
    input is stored last row first (OpenGL), so index ``i`` reads memory row ``in_size - 1 - i``.
    ``interpolation="bilinear"`` needs ``antialias`` (only open_clip's transforms use it, antialiased).
    """
    positions = np.arange(out_size, dtype=np.float64) + crop_offset
    if antialias:
        idx, weights = _antialias_taps(in_size, resized_size, positions, interpolation)
    elif interpolation == "bicubic":
        idx, weights = _plain_taps(in_size, resized_size, positions)
    else:
        raise ValueError("bilinear taps are antialiased only (open_clip's transforms); pass antialias=True.")
    if mirror:
        idx = in_size - 1 - idx
    return idx, weights


def shortest_side_geometry(height: int, width: int, size: int) -> Tuple[int, int, int, int]:
    """open_clip's eval transform: shorter side to ``size`` (the longer one truncated), centre crop.

    Returns ``(resized_h, resized_w, crop_top, crop_left)``.
    """
    if width <= height:
        resized_w, resized_h = size, int(size * height / width)
    else:
        resized_h, resized_w = size, int(size * width / height)
    # Python's round (half to even) decides the centre crop's offset, as in torchvision.
    crop_top = int(round((resized_h - size) / 2.0))
    crop_left = int(round((resized_w - size) / 2.0))
    return resized_h, resized_w, crop_top, crop_left


def _host_taps(height, width, out_size, crop, antialias, bottom_up, interpolation):
    out_h, out_w = out_size
    if crop:
        if out_h != out_w:
            raise ValueError(
                f"preprocess='openclip' (shorter side + centre crop) needs a square input size; the model "
                f"takes {out_h}x{out_w}. Use preprocess='vlmrm' (a squash resize) for this model."
            )
        resized_h, resized_w, top, left = shortest_side_geometry(height, width, out_h)
    else:
        resized_h, resized_w, top, left = out_h, out_w, 0, 0
    row_idx, row_w = axis_taps(height, resized_h, out_h, top, antialias, bottom_up, interpolation)
    col_idx, col_w = axis_taps(width, resized_w, out_w, left, antialias, interpolation=interpolation)
    return row_idx, row_w, col_idx, col_w


@functools.lru_cache(maxsize=64)
def resize_tables(
    height: int,
    width: int,
    out_size: Tuple[int, int],
    *,
    crop: bool,
    antialias: bool,
    bottom_up: bool,
    device: torch.device,
    interpolation: Interpolation = "bicubic",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column taps for one geometry on ``device``: (row_idx, row_w, col_idx, col_w).

    Indices are int32 [out_h, Ky] / [out_w, Kx]; weights float32 of the same shapes. Cached: an RL
    loop renders one frame size, so the tables are built once.
    """
    row_idx, row_w, col_idx, col_w = _host_taps(height, width, out_size, crop, antialias, bottom_up, interpolation)
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode too
        return (
            torch.from_numpy(row_idx.astype(np.int32)).to(device),
            torch.from_numpy(row_w.astype(np.float32)).to(device),
            torch.from_numpy(col_idx.astype(np.int32)).to(device),
            torch.from_numpy(col_w.astype(np.float32)).to(device),
        )


def _dense(idx: np.ndarray, weights: np.ndarray, in_size: int) -> np.ndarray:
    matrix = np.zeros((idx.shape[0], in_size))
    np.add.at(matrix, (np.repeat(np.arange(idx.shape[0]), idx.shape[1]), idx.ravel()), weights.ravel())
    return matrix


#: Outputs per band of the banded torch resize. Sixteen outputs read a window of about 16 x scale + 3
#: inputs, so the products do ~16 / scale-th of the dense matrices' work (480 -> 224: 36 of 480 inputs
#: per band); smaller bands save little more and launch more, smaller products.
BAND = 16


def _bands(idx: np.ndarray, weights: np.ndarray, in_size: int, band: int) -> Tuple[np.ndarray, np.ndarray]:
    """One axis's resize as bands: each run of ``band`` outputs reads one window of ``win`` inputs.

    Returns (every band's window of input indices, flattened: int64 [K * win]; weights float64
    [K, band, win]), K = ceil(out / band); output rows past ``out`` (the last band's padding) have
    zero weights.
    """
    out = idx.shape[0]
    k = -(-out // band)
    dense = np.zeros((k * band, in_size))
    dense[:out] = _dense(idx, weights, in_size)
    firsts = [int(idx[i * band:(i + 1) * band].min()) for i in range(k)]
    lasts = [int(idx[i * band:(i + 1) * band].max()) for i in range(k)]
    win = max(b - a + 1 for a, b in zip(firsts, lasts))
    starts = [min(a, in_size - win) for a in firsts]  # every window the same width, inside the axis
    window_idx = np.concatenate([np.arange(a, a + win) for a in starts])
    band_w = np.stack([dense[i * band:(i + 1) * band, a:a + win] for i, a in enumerate(starts)])
    return window_idx, band_w


@functools.lru_cache(maxsize=64)
def resize_bands(
    height: int,
    width: int,
    out_size: Tuple[int, int],
    *,
    crop: bool,
    antialias: bool,
    bottom_up: bool,
    device: torch.device,
    interpolation: Interpolation = "bicubic",
    band: int = BAND,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same resize in bands for the torch path: (row_windows, row_w, col_windows, col_w_t).

    ``row_windows`` int64 [Ky * win_y] indexes the input rows each band of ``band`` output rows
    reads, ``row_w`` float32 [Ky, band, win_y] their weights (so a band is one small matmul);
    ``col_windows`` [Kx * win_x] and ``col_w_t`` float32 [Kx, win_x, band] likewise for columns,
    transposed for ``windows @ col_w_t``. Output rows and columns past ``out_size`` are padding.
    """
    row_idx, row_w, col_idx, col_w = _host_taps(height, width, out_size, crop, antialias, bottom_up, interpolation)
    rows, row_bw = _bands(row_idx, row_w, height, band)
    cols, col_bw = _bands(col_idx, col_w, width, band)
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode too
        return (
            torch.from_numpy(rows).to(device),
            torch.from_numpy(row_bw.astype(np.float32)).to(device),
            torch.from_numpy(cols).to(device),
            torch.from_numpy(np.ascontiguousarray(col_bw.transpose(0, 2, 1)).astype(np.float32)).to(device),
        )


def is_identity(height: int, width: int, out_size: Tuple[int, int]) -> bool:
    """Frames already at the tower's size: every mode reduces to a copy (the fast path)."""
    return (height, width) == tuple(out_size)


__all__ = ["axis_taps", "resize_tables", "resize_bands", "shortest_side_geometry", "is_identity"]
