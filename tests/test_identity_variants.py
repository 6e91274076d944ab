"""The candidate identity kernels (benchmarks/identity_variants.py) against the op and the float64 reference.

They do the op's arithmetic (one float32 ``v * scale + shift`` a value, then the cast) on the same
inputs, so their outputs must equal the op's exactly; the reference check (tolerances as in
tests/test_preprocess.py) keeps an op and a candidate from agreeing on a wrong answer. Frames are
small and odd-sized, and the pixels a program few, so that every frame spans several programs and the
last one is partial.
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEVICES
from reference import reference_preprocess
from test_preprocess import MEAN, STD, _check
from vlmrm_fast.ops._triton import triton_runs_on
from vlmrm_fast.ops.preprocess import PreprocessSpec, preprocess_triton

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def variants():
    spec = importlib.util.spec_from_file_location("_bench_identity_variants", BENCHMARKS / "identity_variants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _frames(n, h, w, seed):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def _needs_triton(device):
    if not triton_runs_on(torch.device(device)):
        pytest.skip("Triton cannot run here")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["flat", "words"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bottom_up", [False, True])
def test_equals_the_op_and_the_float64_reference(variants, device, kind, dtype, bottom_up):
    _needs_triton(device)
    h, w = 13, 20  # 260 pixels: four programs of 64, the last with 4 (words: rows of 5 groups)
    frames = _frames(3, h, w, seed=1).to(device)
    spec = PreprocessSpec((h, w), MEAN, STD, "vlmrm")
    out = variants.preprocess_identity(frames, spec, dtype, (kind, 64, 2), bottom_up=bottom_up)
    assert torch.equal(out, preprocess_triton(frames, spec, dtype, bottom_up=bottom_up))
    _check(out.cpu(), _reference(frames, bottom_up), dtype)


def _reference(frames, bottom_up=False):
    # SPEC §1.2 at the tower's size: no resize, so (v / 255 - mean) / std, channels first, in float64.
    # (tests/reference.py's reference_preprocess takes square outputs only.)
    x = frames.cpu().numpy().astype(np.float64)
    x = x / 255.0 if frames.dtype == torch.uint8 else x
    if bottom_up:
        x = x[:, ::-1]
    mean = np.asarray(MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(STD).reshape(1, 3, 1, 1)
    return (x.transpose(0, 3, 1, 2) - mean) / std


def test_reference_agrees_with_the_shared_one_on_square_frames():
    frames = _frames(2, 9, 9, seed=2)
    np.testing.assert_allclose(_reference(frames, True), reference_preprocess(frames.numpy(), 9, MEAN, STD, bottom_up=True),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_flat_reads_any_strides_and_float_frames(variants, device):
    _needs_triton(device)
    spec = PreprocessSpec((15, 15), MEAN, STD, "vlmrm")
    view = _frames(4, 50, 70, seed=3)[::2, 3:18, 5:35:2]  # cropped and subsampled
    planar = _frames(2, 15, 15, seed=4).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # NCHW storage
    floats = _frames(2, 15, 15, seed=5).to(torch.float32) / 255  # [0, 1] floats: the op's other input
    for frames in (view, planar, floats):
        frames = frames.to(device)
        out = variants.preprocess_identity(frames, spec, torch.float32, ("flat", 32, 1))
        assert torch.equal(out, preprocess_triton(frames, spec, torch.float32))
        _check(out.cpu(), _reference(frames), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_words_reads_padded_rows_and_later_frames_of_a_view(variants, device):
    # Rows 24 pixels apart holding 20 (72 bytes, word aligned), frames 15 rows apart holding 13, from
    # the second frame on: the kernel must take the row and frame strides in words, not assume packing.
    _needs_triton(device)
    frames = _frames(4, 15, 24, seed=6).to(device)[1:, 2:, 4:]
    assert frames.shape == (3, 13, 20, 3) and frames.stride() == (15 * 24 * 3, 24 * 3, 3, 1)
    assert frames.data_ptr() % 4 == 0
    spec = PreprocessSpec((13, 20), MEAN, STD, "vlmrm")
    for bottom_up in (False, True):
        out = variants.preprocess_identity(frames, spec, torch.float32, ("words", 16, 1), bottom_up=bottom_up)
        assert torch.equal(out, preprocess_triton(frames, spec, torch.float32, bottom_up=bottom_up))


def test_words_refuses_what_it_cannot_read_as_words(variants):
    spec = PreprocessSpec((13, 20), MEAN, STD, "vlmrm")
    frames = _frames(2, 13, 24, seed=7)
    cases = {
        "multiple of 4 pixels": (_frames(2, 13, 19, seed=7), PreprocessSpec((13, 19), MEAN, STD, "vlmrm")),
        "packed RGB": (frames[:, :, :20].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), spec),
        "4-byte aligned": (frames[:, :, 1:21], spec),
        "uint8": (frames[:, :, :20].float() / 255, spec),
        "need a resize": (frames, spec),
    }
    for message, (bad, bad_spec) in cases.items():
        with pytest.raises(ValueError, match=message):
            variants.preprocess_identity(bad, bad_spec, torch.float32, ("words", 16, 1))


def test_words_refuses_frames_or_rows_that_start_off_a_word(variants):
    # Frames whose first pixel is aligned but whose frame (or row) stride is no multiple of 4 bytes: the second
    # frame (row) would start off a word boundary.
    base = torch.zeros(2 * 13 * 64 * 3, dtype=torch.uint8)
    odd_frames = base.as_strided((2, 13, 20, 3), (13 * 60 + 2, 60, 3, 1))
    odd_rows = base.as_strided((2, 13, 20, 3), (13 * 64, 62, 3, 1))
    for bad in (odd_frames, odd_rows):
        assert variants.words_unsupported_reason(bad) == "words needs 4-byte aligned rows and frames"
    assert variants.words_unsupported_reason(base.as_strided((2, 13, 20, 3), (13 * 64, 64, 3, 1))) == ""


def test_parse_variant(variants):
    assert variants.parse_variant("flat1024w4") == ("flat", 1024, 4)
    assert variants.parse_variant("Words512W8") == ("words", 512, 8)
    for bad in ("tile1024w4", "flat1000w4", "flat1024", "words2w1", "flat1024w64", "flat1024w3"):
        with pytest.raises(ValueError, match=repr(bad)):
            variants.parse_variant(bad)
