"""The preprocess op (Triton kernel and torch path) against the float64 reference of SPEC §1.2.

Tolerances. float32: outputs are O(4) after normalisation; the op is a weighted sum of at most
~120 taps plus one affine map in float32 (relative error a few 1e-7), so 1e-5 absolute has room to
spare and still catches any wrong tap, weight, crop offset or flip (those cost >1e-2).
bfloat16/float16: the output is that float32 value rounded to nearest. Element by element it can
differ from PyTorch's own rounding of the exact answer (``ref.to(dtype)``, half an ulp at most) only
where the exact answer lies within the float32 error of a rounding midpoint, and then its error exceeds
PyTorch's by at most twice that distance: so each element's error may exceed PyTorch's own by 2e-5
at most. (A bound of twice the largest rounding error over the tensor would let truncation through.)
"""
import importlib

import numpy as np
import pytest
import torch

from conftest import DEVICES
from reference import reference_preprocess
from vlmrm_fast.ops._triton import triton_runs_on
from vlmrm_fast.ops.preprocess import PreprocessSpec, preprocess, preprocess_triton

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
GEOMETRIES = [  # (H, W, S): downscale, upscale in one axis, odd sizes, and the identity fast path
    (37, 53, 17),
    (9, 40, 16),
    (61, 29, 31),
    (23, 23, 23),
]


def _frames(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _check(out: torch.Tensor, ref: np.ndarray, dtype: torch.dtype):
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    exact = torch.from_numpy(ref)
    err = (out.double().cpu() - exact).abs()
    if dtype == torch.float32:
        assert err.max().item() <= 1e-5, f"max error {err.max().item():.3g} > 1e-5"
    else:
        own = (exact.to(dtype).double() - exact).abs()  # PyTorch's rounding, element by element
        excess = (err - own).max().item()
        assert excess <= 2e-5, f"an element's error exceeds PyTorch's own rounding error by {excess:.3g} > 2e-5"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["vlmrm", "openclip"])
@pytest.mark.parametrize("h,w,s", GEOMETRIES)
def test_matches_float64_reference(device, impl, mode, h, w, s):
    frames = _frames(3, h, w)
    spec = PreprocessSpec((s, s), MEAN, STD, mode)
    out = preprocess(torch.from_numpy(frames).to(device), spec, torch.float32, impl=impl)
    _check(out, reference_preprocess(frames, s, MEAN, STD, mode), torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("mode,h,w,bottom_up", [("vlmrm", 480, 480, False), ("openclip", 400, 601, True),
                                               ("vlmrm", 1080, 1920, True)])
def test_at_render_sizes(mode, h, w, bottom_up, impl):
    # Real frame sizes: for the torch path many bands (14 per axis at 224) with windows clamped at both
    # borders; for both, an antialiased filter spanning ~9 inputs per output and 16-tap tables.
    frames = _frames(1, h, w, seed=h)
    spec = PreprocessSpec((224, 224), MEAN, STD, mode)
    stored = np.ascontiguousarray(frames[:, ::-1]) if bottom_up else frames
    out = preprocess(torch.from_numpy(stored), spec, torch.float32, bottom_up=bottom_up, impl=impl)
    _check(out, reference_preprocess(frames, 224, MEAN, STD, mode), torch.float32)


@pytest.mark.parametrize("frames_a_slice", [1, 2])
def test_torch_path_in_slices_of_the_batch(monkeypatch, frames_a_slice):
    # On CPU the torch path resamples a large batch in slices (for the cache): force one or two frames a
    # slice; with two, 5 frames end in a partial slice (2, 2, 1), which must be written too.
    from vlmrm_fast.ops.resize_taps import resize_bands

    module = importlib.import_module("vlmrm_fast.ops.preprocess")  # not the function of that name
    frames = _frames(5, 37, 53, seed=5)
    for mode in ("vlmrm", "openclip"):
        bands = resize_bands(37, 53, (17, 17), crop=mode == "openclip", antialias=mode == "openclip",
                             bottom_up=False, device=torch.device("cpu"))
        k_y, _, win_y = bands[1].shape
        monkeypatch.setattr(module, "_CPU_SLICE_BYTES", frames_a_slice * k_y * win_y * 53 * 3 * 4)
        spec = PreprocessSpec((17, 17), MEAN, STD, mode)
        out = preprocess(torch.from_numpy(frames), spec, torch.float32, impl="torch")
        _check(out, reference_preprocess(frames, 17, MEAN, STD, mode), torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("h,w,s", [(51, 29, 13), (19, 16, 16)])
def test_bottom_up_portrait_frames_keep_the_centre_crop(impl, h, w, s):
    # Portrait frames are cropped in rows (top 4 of 9, and 2 of 3): stored bottom-up, the crop must be
    # taken from the image's top, not mirrored with it. Landscape frames crop columns only.
    frames = _frames(2, h, w, seed=9)
    spec = PreprocessSpec((s, s), MEAN, STD, "openclip")
    for bottom_up in (False, True):
        stored = np.ascontiguousarray(frames[:, ::-1]) if bottom_up else frames
        out = preprocess(torch.from_numpy(stored), spec, torch.float32, bottom_up=bottom_up, impl=impl)
        _check(out, reference_preprocess(frames, s, MEAN, STD, "openclip"), torch.float32)


def test_the_crop_offset_rounds_half_to_even_as_open_clip():
    # 19 x 16 to 16: 3 rows to crop, 1.5 on top, rounded to 2 (floor would give 1).
    from vlmrm_fast.ops.resize_taps import shortest_side_geometry

    assert shortest_side_geometry(19, 16, 16) == (19, 16, 2, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_frames_more_than_2_31_bytes_apart(device):
    # The batch stride fits in int32 (a launch argument of that type), but the third frame starts past
    # 2**31 bytes: the kernel must compute frame offsets in int64. Only the frames' bytes are touched.
    h, w = 13, 11
    stride_n = (1 << 30) + 4096
    storage = torch.empty(2 * stride_n + h * w * 3, dtype=torch.uint8, device=device)
    frames = storage.as_strided((3, h, w, 3), (stride_n, w * 3, 3, 1))
    expected = _frames(3, h, w, seed=11)
    frames.copy_(torch.from_numpy(expected))
    spec = PreprocessSpec((7, 7), MEAN, STD, "vlmrm")
    _check(preprocess(frames, spec, torch.float32, impl="triton"), reference_preprocess(expected, 7, MEAN, STD),
           torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_of_a_frame_more_than_2_31_bytes_apart(device):
    # Within one frame: a row stride that fits in int32 (a mosaic's, a planar buffer's), with the last rows
    # past 2**31 bytes from the first. The resize must compute row offsets in int64 too (mutation audit: the
    # test above, whose frames are small, passes with int32 row offsets). Only the rows' bytes are touched.
    h, w = 9, 11
    stride_h = (1 << 28) + 4096
    storage = torch.empty((h - 1) * stride_h + w * 3, dtype=torch.uint8, device=device)
    frames = storage.as_strided((1, h, w, 3), (h * stride_h, stride_h, 3, 1))
    expected = _frames(1, h, w, seed=12)
    frames.copy_(torch.from_numpy(expected))
    spec = PreprocessSpec((7, 7), MEAN, STD, "vlmrm")
    _check(preprocess(frames, spec, torch.float32, impl="triton"), reference_preprocess(expected, 7, MEAN, STD),
           torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_output_rounds_ties_to_even(device):
    # 0.5 + 2**-9 lies halfway between two bfloat16 values (0.5 and 0.5 + 2**-8): the op must round it
    # to even (0.5), as the GPU's cast and PyTorch's do, not away from zero. Float frames at the tower's
    # size with mean 0 and std 1: the output is the input, exactly, before the cast.
    frames = torch.full((1, 5, 5, 3), 0.25, dtype=torch.float32)
    frames[0, 2, 3, 1] = 0.5 + 2 ** -9
    spec = PreprocessSpec((5, 5), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "vlmrm")
    out = preprocess(frames.to(device), spec, torch.bfloat16, impl="triton").cpu()
    assert torch.equal(out, frames.permute(0, 3, 1, 2).to(torch.bfloat16)) and out[0, 1, 2, 3].item() == 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_output_rounds_ties_up_to_an_even_neighbour(device):
    # The other half of ties to even: 0.5 + 3 * 2**-9 lies halfway between 0.5 + 2**-8 (odd) and 0.5 + 2**-7
    # (even), so it rounds up; below a tie it rounds down, above one up. A rounding that sends every tie
    # down passes the test above, whose even neighbour is the lower one (mutation audit).
    values = [0.5 + 3 * 2 ** -9, 0.5 + 3 * 2 ** -9 - 2 ** -20, 0.5 + 2 ** -9 + 2 ** -20]
    frames = torch.full((1, 5, 5, 3), 0.25, dtype=torch.float32)
    frames[0, 0, :3, 0] = torch.tensor(values)
    spec = PreprocessSpec((5, 5), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "vlmrm")
    out = preprocess(frames.to(device), spec, torch.bfloat16, impl="triton").cpu()
    assert out[0, 0, 0, :3].tolist() == [0.5 + 2 ** -7, 0.5 + 2 ** -8, 0.5 + 2 ** -8]
    assert torch.equal(out, frames.permute(0, 3, 1, 2).to(torch.bfloat16))


def test_bands_hold_every_tap():
    # The bands reassemble into the dense resampling matrices exactly (every tap in its band's window).
    from vlmrm_fast.ops.resize_taps import _dense, _host_taps, resize_bands

    for h, w, s, crop, interpolation in [(480, 480, 224, False, "bicubic"), (37, 53, 17, False, "bicubic"),
                                         (9, 40, 16, True, "bicubic"), (1080, 1920, 224, True, "bicubic"),
                                         (37, 53, 17, True, "bilinear")]:
        row_idx, row_taps, col_idx, col_taps = _host_taps(h, w, (s, s), crop, crop, True, interpolation)
        rows = torch.from_numpy(_dense(row_idx, row_taps, h).astype(np.float32))
        cols = torch.from_numpy(_dense(col_idx, col_taps, w).astype(np.float32))
        row_windows, row_w, col_windows, col_w_t = resize_bands(
            h, w, (s, s), crop=crop, antialias=crop, bottom_up=True, device=torch.device("cpu"),
            interpolation=interpolation)
        for dense, windows, weights in [(rows, row_windows, row_w), (cols, col_windows, col_w_t.transpose(1, 2))]:
            k, band, win = weights.shape
            rebuilt = torch.zeros(k * band, dense.shape[1])
            for i in range(k):
                rebuilt[i * band:(i + 1) * band].index_add_(1, windows[i * win:(i + 1) * win], weights[i])
            assert torch.equal(rebuilt[:s], dense) and not rebuilt[s:].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,h,w,s", [("vlmrm", 37, 53, 17), ("openclip", 61, 29, 31), ("vlmrm", 23, 23, 23)])
def test_low_precision_outputs(device, impl, dtype, mode, h, w, s):
    frames = _frames(3, h, w, seed=1)
    spec = PreprocessSpec((s, s), MEAN, STD, mode)
    out = preprocess(torch.from_numpy(frames).to(device), spec, dtype, impl=impl)
    _check(out, reference_preprocess(frames, s, MEAN, STD, mode), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("mode,h,w,s", [("vlmrm", 37, 53, 17), ("openclip", 40, 61, 16), ("vlmrm", 19, 19, 19)])
def test_bottom_up_rows_are_flipped(device, impl, mode, h, w, s):
    frames = _frames(2, h, w, seed=2)
    spec = PreprocessSpec((s, s), MEAN, STD, mode)
    gl_order = np.ascontiguousarray(frames[:, ::-1])  # what glReadPixels returns
    out = preprocess(torch.from_numpy(gl_order).to(device), spec, torch.float32, bottom_up=True, impl=impl)
    _check(out, reference_preprocess(frames, s, MEAN, STD, mode), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("h,w,s", [(37, 53, 17), (19, 19, 19)])
def test_a_view_with_the_negative_bit_is_read_as_its_values(device, impl, h, w, s):
    # x.conj().imag is a view of -x's memory with the negative bit set; it passes the [0, 1] check (its values
    # are x's), and the kernel read the memory: -x, another frame altogether.
    frames = _frames(2, h, w, seed=5)
    x = torch.from_numpy(frames).float() / 255
    view = torch.complex(torch.zeros_like(x), -x).to(device).conj().imag
    assert view.is_neg() and torch.equal(view.cpu(), x)
    out = preprocess(view, PreprocessSpec((s, s), MEAN, STD, "vlmrm"), torch.float32, impl=impl)
    _check(out, reference_preprocess(frames, s, MEAN, STD, "vlmrm"), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_strided_views_are_read_in_place(device, impl):
    big = torch.from_numpy(_frames(4, 50, 70, seed=3)).to(device)
    view = big[::2, 3:44, 5::2]  # every other frame, a crop, every other column
    assert not view.is_contiguous()
    spec = PreprocessSpec((15, 15), MEAN, STD, "vlmrm")
    out = preprocess(view, spec, torch.float32, impl=impl)
    _check(out, reference_preprocess(view.cpu().numpy(), 15, MEAN, STD, "vlmrm"), torch.float32)
    planar = torch.from_numpy(np.ascontiguousarray(_frames(2, 41, 37, seed=4).transpose(0, 3, 1, 2))).to(device)
    planar = planar.permute(0, 2, 3, 1)  # NCHW storage seen as NHWC: channel stride H * W, column stride 1
    out = preprocess(planar, spec, torch.float32, impl=impl)
    _check(out, reference_preprocess(planar.cpu().numpy(), 15, MEAN, STD, "vlmrm"), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("frame_dtype", [torch.float32, torch.float64, torch.float16])
def test_float_frames_in_unit_range(device, impl, frame_dtype):
    frames = _frames(2, 29, 31, seed=4)
    as_float = (torch.from_numpy(frames).to(torch.float64) / 255).to(frame_dtype)
    spec = PreprocessSpec((13, 13), MEAN, STD, "openclip")
    out = preprocess(as_float.to(device), spec, torch.float32, impl=impl)
    _check(out, reference_preprocess(as_float.double().numpy(), 13, MEAN, STD, "openclip"), torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_mean_and_std_come_from_the_spec(impl):
    frames = _frames(2, 21, 21, seed=5)
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.75, 1.5)
    out = preprocess(torch.from_numpy(frames), PreprocessSpec((11, 11), mean, std, "vlmrm"), torch.float32, impl=impl)
    _check(out, reference_preprocess(frames, 11, mean, std, "vlmrm"), torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_empty_batch(impl):
    spec = PreprocessSpec((8, 8), MEAN, STD, "vlmrm")
    out = preprocess(torch.zeros((0, 12, 9, 3), dtype=torch.uint8), spec, torch.bfloat16, impl=impl)
    assert out.shape == (0, 3, 8, 8) and out.dtype == torch.bfloat16


def test_spec_rejects_unknown_mode():
    with pytest.raises(ValueError, match="preprocess="):
        PreprocessSpec((8, 8), MEAN, STD, "bilinear")


def test_openclip_mode_of_a_non_square_tower_is_refused_at_once():
    # At construction, not at the first frames that need resizing (after an export or engine build).
    with pytest.raises(ValueError, match="openclip.*square input size.*6x8.*preprocess='vlmrm'"):
        PreprocessSpec((6, 8), MEAN, STD, "openclip")
    PreprocessSpec((6, 8), MEAN, STD, "vlmrm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,h,w,s", [("vlmrm", 37, 53, 17), ("vlmrm", 19, 19, 19)])
def test_other_tiles_give_the_same_output(device, mode, h, w, s):
    # The tile is a tuning knob: the per-pixel arithmetic is the same in any tile, so outputs must
    # match exactly, edges (partial tiles on the odd sizes) included.
    if not triton_runs_on(torch.device(device)):
        pytest.skip("Triton cannot run here")
    frames = torch.from_numpy(_frames(2, h, w, seed=4)).to(device)
    spec = PreprocessSpec((s, s), MEAN, STD, mode)
    default = preprocess_triton(frames, spec, torch.float32)
    for tile in [(8, 16, 4), (4, 32, 8)]:
        assert torch.equal(preprocess_triton(frames, spec, torch.float32, tile=tile), default), tile
    with pytest.raises(ValueError, match="power of two"):
        preprocess_triton(frames, spec, torch.float32, tile=(12, 64, 4))


def test_a_tile_too_small_for_cudas_grid_is_refused_before_launch():
    # Tiles of one frame go on the grid's second axis, which CUDA caps at 65535 programs: a 1 x 1
    # tile over a 336 x 336 output would be 112,896 of them and the launch would fail in the driver.
    if not triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton cannot run here")
    frames = torch.zeros((1, 336, 336, 3), dtype=torch.uint8)
    spec = PreprocessSpec((336, 336), MEAN, STD, "vlmrm")
    with pytest.raises(ValueError, match=r"112896 tiles, over CUDA's 65535.*more rows or columns"):
        preprocess_triton(frames, spec, torch.float32, tile=(1, 1, 1))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_identity_size_reads_any_strides(impl):
    # At the tower's size no resampling runs, and the copy path addresses pixels itself: a cropped,
    # subsampled view and planar (channel-first) storage seen as NHWC must both be read right.
    spec = PreprocessSpec((15, 15), MEAN, STD, "vlmrm")
    view = torch.from_numpy(_frames(4, 50, 70, seed=3))[::2, 3:18, 5:35:2]
    planar = torch.from_numpy(np.ascontiguousarray(_frames(2, 15, 15, seed=4).transpose(0, 3, 1, 2))).permute(0, 2, 3, 1)
    for frames in (view, planar):
        assert frames.shape[1:] == (15, 15, 3) and frames.stride()[1:] != (45, 3, 1)
        _check(preprocess(frames, spec, torch.float32, impl=impl), reference_preprocess(frames.numpy(), 15, MEAN, STD),
               torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_openclip_mode_portrait_frames(impl):
    # 51 x 29 (taller than wide) to 13: the short side goes to 13, the long one to int(13 * 51 / 29) = 22
    # (torchvision truncates; rounding would give 23), then a centre crop.
    frames = _frames(2, 51, 29, seed=6)
    spec = PreprocessSpec((13, 13), MEAN, STD, "openclip")
    _check(preprocess(torch.from_numpy(frames), spec, torch.float32, impl=impl),
           reference_preprocess(frames, 13, MEAN, STD, "openclip"), torch.float32)


# ---- behaviours a mutation audit found untested ---------------------------------------------------


def test_spec_rejects_bad_mean_and_std():
    with pytest.raises(ValueError, match="3 values"):
        PreprocessSpec((8, 8), MEAN[:2], STD, "vlmrm")
    with pytest.raises(ValueError, match="3 values"):
        PreprocessSpec((8, 8), MEAN, STD + (0.5,), "vlmrm")
    with pytest.raises(ValueError, match="std must be positive"):  # not a ZeroDivisionError at the first frames
        PreprocessSpec((8, 8), MEAN, (0.25, 0.0, 0.25), "vlmrm")


def test_check_tile_refuses_what_cannot_launch():
    from vlmrm_fast.ops.preprocess import check_tile

    check_tile((8, 16, 32))
    for bad in [(8, 16, 64), (True, 16, 4), (8, 16), (8, 16, 4, 1), (0, 16, 4), (8.0, 16, 4)]:
        with pytest.raises(ValueError, match="power of two"):
            check_tile(bad)


def test_mean_std_of_needs_three_values():
    from vlmrm_fast.ops.preprocess import mean_std_of

    assert mean_std_of([0.5, 0.25, 1]) == (0.5, 0.25, 1.0)
    with pytest.raises(ValueError, match="3 per-channel"):
        mean_std_of([0.5, 0.25])


def test_a_tile_count_one_past_cudas_grid_is_refused():
    # 256 x 256 one-pixel tiles: 65536 programs, one more than the grid's second axis holds.
    if not triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton cannot run here")
    spec = PreprocessSpec((256, 256), MEAN, STD, "vlmrm")
    with pytest.raises(ValueError, match=r"65536 tiles, over CUDA's 65535"):
        preprocess_triton(torch.zeros((1, 256, 256, 3), dtype=torch.uint8), spec, torch.float32, tile=(1, 1, 1))


def test_a_tile_count_at_cudas_grid_limit_is_launched(monkeypatch):
    # 255 x 257 one-pixel tiles: exactly 65535 programs, the most the grid's second axis holds. The
    # launch is recorded, not run (65535 interpreted programs would take half a minute).
    preprocess_module = importlib.import_module("vlmrm_fast.ops.preprocess")  # the package exports a function of that name
    if not triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton cannot run here")
    grids = []

    class RecordingKernel:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(preprocess_module, "_preprocess_kernel", RecordingKernel())
    spec = PreprocessSpec((255, 257), MEAN, STD, "vlmrm")
    preprocess_triton(torch.zeros((1, 255, 257, 3), dtype=torch.uint8), spec, torch.float32, tile=(1, 1, 1))
    assert grids == [(1, 65535)]


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_openclip_centre_crop_rounds_half_to_even_on_both_axes(impl):
    # 16 x 21 (wider than tall) to 16: the long side stays 21 and the crop starts at round(5 / 2) = 2
    # (Python's and torchvision's round, half to even; rounding half up would give 3). The portrait
    # case above checks the rows' offset, this one the columns'.
    from vlmrm_fast.ops.resize_taps import shortest_side_geometry

    assert shortest_side_geometry(16, 21, 16) == (16, 21, 0, 2)
    assert shortest_side_geometry(21, 16, 16) == (21, 16, 2, 0)
    frames = _frames(2, 16, 21, seed=7)
    spec = PreprocessSpec((16, 16), MEAN, STD, "openclip")
    _check(preprocess(torch.from_numpy(frames), spec, torch.float32, impl=impl),
           reference_preprocess(frames, 16, MEAN, STD, "openclip"), torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_a_non_square_tower_resizes_frames_of_its_transposed_size(impl):
    # A 15 x 20 tower fed 20 x 15 frames: same pixel count, other shape, so the frames must be resized
    # (rows 20 -> 15, columns 15 -> 20), never taken for the copy path's frames of the tower's size.
    from reference import bicubic_matrix

    frames = _frames(2, 20, 15, seed=8)
    spec = PreprocessSpec((15, 20), MEAN, STD, "vlmrm")
    x = (frames.astype(np.float64) / 255.0).transpose(0, 3, 1, 2)
    x = bicubic_matrix(20, 15) @ x @ bicubic_matrix(15, 20).T
    ref = (x - np.asarray(MEAN).reshape(1, 3, 1, 1)) / np.asarray(STD).reshape(1, 3, 1, 1)
    _check(preprocess(torch.from_numpy(frames), spec, torch.float32, impl=impl), ref, torch.float32)


OPEN_CLIP_RESAMPLINGS = [("shortest", "bilinear"), ("squash", "bicubic"), ("squash", "bilinear")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("resize_mode,interpolation", OPEN_CLIP_RESAMPLINGS)
@pytest.mark.parametrize("h,w,s", [(37, 53, 17), (9, 40, 16)])
def test_openclip_mode_follows_the_models_resize_mode_and_interpolation(device, impl, resize_mode, interpolation, h, w, s):
    # open_clip's DFN, SigLIP, CLIPA and PE tags squash, and MobileCLIP, CLIPA and PE resize bilinearly:
    # a shortest-side bicubic crop for them differs by >1e-2.
    frames = _frames(3, h, w, seed=s)
    spec = PreprocessSpec((s, s), MEAN, STD, "openclip", resize_mode=resize_mode, interpolation=interpolation)
    out = preprocess(torch.from_numpy(frames).to(device), spec, torch.float32, impl=impl)
    ref = reference_preprocess(frames, s, MEAN, STD, "openclip", resize_mode=resize_mode, interpolation=interpolation)
    _check(out, ref, torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_openclip_squash_takes_a_non_square_tower_and_bottom_up_rows(impl):
    from reference import antialiased_matrix

    frames = _frames(2, 29, 41, seed=5)
    spec = PreprocessSpec((15, 20), MEAN, STD, "openclip", resize_mode="squash", interpolation="bilinear")
    out = preprocess(torch.from_numpy(np.ascontiguousarray(frames[:, ::-1])), spec, torch.bfloat16,
                     bottom_up=True, impl=impl)
    x = (frames.astype(np.float64) / 255.0).transpose(0, 3, 1, 2)
    x = antialiased_matrix(29, 15, "bilinear") @ x @ antialiased_matrix(41, 20, "bilinear").T
    ref = (x - np.asarray(MEAN).reshape(1, 3, 1, 1)) / np.asarray(STD).reshape(1, 3, 1, 1)
    _check(out, ref, torch.bfloat16)


def test_resampling_options_that_the_spec_cannot_honour_are_refused():
    with pytest.raises(ValueError, match="'longest'.*letterbox.*preprocess='vlmrm'"):
        PreprocessSpec((8, 8), MEAN, STD, "openclip", resize_mode="longest")
    with pytest.raises(ValueError, match="interpolation='nearest' is not one of"):
        PreprocessSpec((8, 8), MEAN, STD, "openclip", interpolation="nearest")
    with pytest.raises(ValueError, match="mode='openclip' only.*paper's fixed transform"):
        PreprocessSpec((8, 8), MEAN, STD, "vlmrm", interpolation="bilinear")
    with pytest.raises(ValueError, match="mode='openclip' only"):
        PreprocessSpec((8, 8), MEAN, STD, "vlmrm", resize_mode="squash")
    with pytest.raises(ValueError, match="square input size"):
        PreprocessSpec((6, 8), MEAN, STD, "openclip", resize_mode="shortest", interpolation="bilinear")


@pytest.mark.parametrize("cfg,expected", [
    ({}, ("shortest", "bicubic")),
    ({"resize_mode": "squash", "interpolation": "bilinear"}, ("squash", "bilinear")),
    ({"resize_mode": "shortest", "interpolation": "random"}, ("shortest", "bicubic")),  # open_clip's eval reading
])
def test_the_models_preprocess_config_sets_the_openclip_resampling(tiny, cfg, expected):
    from vlmrm_fast.models import preprocess_spec_of

    model, _ = tiny
    model.visual.preprocess_cfg = {**getattr(model.visual, "preprocess_cfg", {}), **cfg}
    spec = preprocess_spec_of(model, "openclip")
    assert (spec.resize_mode, spec.interpolation) == expected
    assert (preprocess_spec_of(model, "vlmrm").resize_mode, preprocess_spec_of(model, "vlmrm").interpolation) == (
        "shortest", "bicubic")  # the paper's transform whatever the config says
    model.visual.preprocess_cfg["resize_mode"] = "longest"
    with pytest.raises(ValueError, match="'longest'"):
        preprocess_spec_of(model, "openclip")
