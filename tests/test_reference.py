"""The float64 reference's resizes agree with torch's own bicubic in float64: the reference is
checked against an independent implementation before anything is checked against it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference import antialiased_matrix, bicubic_matrix, reference_preprocess


@pytest.mark.parametrize("in_size,out_size", [(480, 224), (600, 224), (37, 17), (17, 37), (5, 9), (224, 224)])
@pytest.mark.parametrize("mode", ["bicubic", "bicubic-antialiased", "bilinear-antialiased"])
def test_resize_matrices_match_torch_float64(in_size, out_size, mode):
    signal = torch.rand(1, 1, 3, in_size, dtype=torch.float64, generator=torch.Generator().manual_seed(in_size))
    interpolation, antialias = mode.split("-")[0], mode.endswith("antialiased")
    matrix = antialiased_matrix(in_size, out_size, interpolation) if antialias else bicubic_matrix(in_size, out_size)
    ours = signal[0, 0].numpy() @ matrix.T
    theirs = F.interpolate(signal, size=(3, out_size), mode=interpolation, align_corners=False, antialias=antialias)
    np.testing.assert_allclose(ours, theirs[0, 0].numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("height,width", [(40, 61), (51, 29), (9, 13)], ids=["landscape", "portrait", "upscale"])
def test_openclip_mode_is_open_clips_own_eval_transform(resize_mode, interpolation, height, width):
    """open_clip's transform, built by open_clip for these settings, run on float64 tensors."""
    import open_clip

    mean, std = (0.3, 0.5, 0.4), (0.2, 0.3, 0.25)
    transform = open_clip.image_transform(
        16, is_train=False, mean=mean, std=std, resize_mode=resize_mode, interpolation=interpolation
    )
    frames = np.random.default_rng(height).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    theirs = torch.stack([transform(f) for f in torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 255])
    ours = reference_preprocess(frames, 16, mean, std, "openclip", resize_mode=resize_mode, interpolation=interpolation)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-12)


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
