"""A float64 reference of the whole VLM-RM reward, written from SPEC §1 and nothing else.

Deliberately plain and slow: dense resampling matrices built from the bicubic formulas one entry at
a time, the explicit D x D projection matrix M, prompt means without re-normalisation. It shares no
code with vlmrm_fast; tests/test_reference.py checks its resizes against torch's own in float64.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch


def cubic_weight(distance: float, a: float) -> float:
    """Keys' cubic convolution kernel (a = -0.75 plain bicubic, -0.5 antialiased)."""
    d = abs(distance)
    if d < 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of bicubic resampling without antialiasing (half-pixel centres, edges replicated)."""
    m = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        left = math.floor(src)
        for j in range(left - 1, left + 3):
            m[i, min(max(j, 0), in_size - 1)] += cubic_weight(src - j, -0.75)
    return m


def triangle_weight(distance: float) -> float:
    """The bilinear (tent) kernel."""
    return max(1.0 - abs(distance), 0.0)


def antialiased_matrix(in_size: int, out_size: int, interpolation: str = "bicubic") -> np.ndarray:
    """[out, in] matrix of antialiased bicubic (a = -0.5, radius 2) or bilinear (radius 1): the
    kernel widened by the downscale factor, truncated at the borders and renormalised (the PIL/torch
    antialias convention)."""
    kernel, radius = {"bicubic": (lambda d: cubic_weight(d, -0.5), 2), "bilinear": (triangle_weight, 1)}[interpolation]
    m = np.zeros((out_size, in_size))
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo = max(int(centre - radius * stretch + 0.5), 0)
        hi = min(int(centre + radius * stretch + 0.5), in_size)
        for j in range(lo, hi):
            m[i, j] = kernel((j + 0.5 - centre) / stretch)
        m[i] /= m[i].sum()
    return m


def antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of antialiased bicubic (see :func:`antialiased_matrix`)."""
    return antialiased_matrix(in_size, out_size, "bicubic")


def reference_preprocess(
    frames: np.ndarray,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    mode: str = "vlmrm",
    bottom_up: bool = False,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float64 [N, 3, size, size] (SPEC §1.2).

    ``resize_mode`` ("shortest" or "squash") and ``interpolation`` ("bicubic" or "bilinear") shape
    mode "openclip" as open_clip's eval transform does (torchvision's antialiased Resize)."""
    x = np.asarray(frames, dtype=np.float64)
    if frames.dtype == np.uint8:
        x = x / 255.0
    if bottom_up:
        x = x[:, ::-1]
    x = x.transpose(0, 3, 1, 2)  # N, 3, H, W
    h, w = x.shape[2:]
    if mode == "vlmrm":
        rows, cols = bicubic_matrix(h, size), bicubic_matrix(w, size)
        x = rows @ x @ cols.T
    elif mode == "openclip" and resize_mode == "squash":
        x = antialiased_matrix(h, size, interpolation) @ x @ antialiased_matrix(w, size, interpolation).T
    elif mode == "openclip" and resize_mode == "shortest":
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_h, new_w = size, int(size * w / h)
        x = antialiased_matrix(h, new_h, interpolation) @ x @ antialiased_matrix(w, new_w, interpolation).T
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
        x = x[:, :, top : top + size, left : left + size]
    else:
        raise ValueError((mode, resize_mode))
    mean = np.asarray(mean, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(std, dtype=np.float64).reshape(1, 3, 1, 1)
    return (x - mean) / std


def reference_targets(
    model64: torch.nn.Module, tokenizer: Callable, goal: List[str], baseline: Optional[List[str]]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Goal g and unit direction u (None without baseline), float64."""

    def mean_unit(prompts: List[str]) -> torch.Tensor:
        e = model64.encode_text(tokenizer(prompts)).double()
        return (e / e.norm(dim=-1, keepdim=True)).mean(dim=0)

    g = mean_unit(goal)
    if baseline is None:
        return g, None
    d = g - mean_unit(baseline)
    return g, d / d.norm()


def reference_reward_from_embeddings(x: torch.Tensor, g: torch.Tensor, u: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    """r = 1 - 0.5 |M (x/|x| - g)|^2 with the explicit D x D matrix M = alpha u u^T + (1 - alpha) I."""
    x = x.double()
    x = x / x.norm(dim=-1, keepdim=True)
    dim = x.shape[1]
    m = (1 - alpha) * torch.eye(dim, dtype=torch.float64)
    if u is not None and alpha != 0:  # at alpha = 0, M = I whatever u is (NaN for goal = baseline)
        m = m + alpha * torch.outer(u, u)
    v = x - g
    return 1 - 0.5 * ((v @ m.T) ** 2).sum(dim=1)


def float64_model(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).double().cpu().eval()


@torch.no_grad()
def reference_reward(
    model: torch.nn.Module,
    tokenizer: Callable,
    frames: np.ndarray,
    goal: List[str],
    baseline: Optional[List[str]],
    alpha: float,
    mode: str = "vlmrm",
    mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
    std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
    tower_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The whole reward in float64: [N] for uint8 frames [N, H, W, 3].

    ``tower_dtype`` (see :func:`torch_own_reward`): the tower alone runs at that precision instead.
    """
    model64 = float64_model(model)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    pixels = torch.from_numpy(reference_preprocess(frames, size, mean, std, mode))
    if tower_dtype is None:
        x = model64.encode_image(pixels)
    else:
        x = copy.deepcopy(model.visual).cpu().eval().to(tower_dtype)(pixels.to(tower_dtype))
    g, u = reference_targets(model64, tokenizer, goal, baseline)
    return reference_reward_from_embeddings(x, g, u, alpha)


def torch_own_reward(model, tokenizer, frames, goal, baseline, alpha, dtype: torch.dtype, **kwargs) -> torch.Tensor:
    """PyTorch's own reward at ``dtype``, for the "twice PyTorch's own error" bars: the exact (float64)
    tower input rounded to ``dtype``, a copy of the tower cast to ``dtype`` in plain PyTorch, and the
    rest in float64. Nothing of the package runs, so its error is PyTorch's rounding alone."""
    return reference_reward(model, tokenizer, frames, goal, baseline, alpha, tower_dtype=dtype, **kwargs)
