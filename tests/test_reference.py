"""The float64 reference's resizes agree with torch's own bicubic in float64: the reference is
checked against an independent implementation before anything is checked against it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference import antialiased_bicubic_matrix, bicubic_matrix, reference_preprocess


@pytest.mark.parametrize("in_size,out_size", [(480, 224), (600, 224), (37, 17), (17, 37), (5, 9), (224, 224)])
@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matrices_match_torch_float64(in_size, out_size, antialias):
    signal = torch.rand(1, 1, 3, in_size, dtype=torch.float64, generator=torch.Generator().manual_seed(in_size))
    ours = signal[0, 0].numpy() @ (antialiased_bicubic_matrix if antialias else bicubic_matrix)(in_size, out_size).T
    theirs = F.interpolate(signal, size=(3, out_size), mode="bicubic", align_corners=False, antialias=antialias)
    np.testing.assert_allclose(ours, theirs[0, 0].numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("height,width", [(40, 61), (51, 29)], ids=["landscape", "portrait"])
def test_openclip_mode_is_resize_shorter_side_then_centre_crop(height, width):
    frames = np.random.default_rng(0).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    ours = reference_preprocess(frames, 16, (0, 0, 0), (1, 1, 1), "openclip")
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 255
    short, long = min(height, width), max(height, width)
    size = (16, int(16 * long / short)) if height <= width else (int(16 * long / short), 16)  # torchvision truncates
    resized = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (int(round((extent - 16) / 2)) for extent in resized.shape[-2:])
    np.testing.assert_allclose(ours, resized[..., top : top + 16, left : left + 16].numpy(), atol=1e-12)
