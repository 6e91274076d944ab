"""Tower FLOPs: the analytic count for open_clip ViTs (SPEC §2), FlopCounterMode for the rest."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import open_clip
import torch

from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.models import create_clip  # its import registers vlmrm-tiny with open_clip

# --------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class ViTShape:
    """What an open_clip VisionTransformer's cost depends on."""

    width: int
    layers: int
    patch: Tuple[int, int]
    image: Tuple[int, int]
    mlp_hidden: int
    embed_dim: Optional[int]  # None: no output projection

    @property
    def tokens(self) -> int:
        """Patches plus the class token."""
        return (self.image[0] // self.patch[0]) * (self.image[1] // self.patch[1]) + 1

    def gflops(self) -> float:
        """GFLOP per image, FLOPs = 2 x multiply-adds (open_clip's profile convention, SPEC §2).

        Per layer: the q, k, v and output projections (4 w^2 per token), the MLP (2 w h per token)
        and attention itself (QK^T and AV, t^2 w each). Layer norms, softmax and GELU are left out,
        as in the published table.
        """
        t, w = self.tokens, self.width
        patch_embed = (t - 1) * w * 3 * self.patch[0] * self.patch[1]
        per_layer = t * (4 * w * w + 2 * w * self.mlp_hidden) + 2 * t * t * w
        projection = w * self.embed_dim if self.embed_dim else 0
        return 2 * (patch_embed + self.layers * per_layer + projection) / 1e9


def _pair(value: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def vit_shape_from_config(model_name: str) -> Optional[ViTShape]:
    """The tower's shape from open_clip's config alone (nothing instantiated); None for towers that
    are not open_clip VisionTransformers (ResNets, timm towers, attentional pooling)."""
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"open_clip has no config for model {model_name!r}.")
    vision = config["vision_cfg"]
    if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)) or vision.get("attentional_pool"):
        return None
    width = int(vision["width"])
    return ViTShape(
        width=width,
        layers=int(vision["layers"]),
        patch=_pair(vision["patch_size"]),
        image=_pair(vision["image_size"]),
        mlp_hidden=int(width * vision.get("mlp_ratio", 4.0)),  # open_clip truncates the same way
        embed_dim=int(config["embed_dim"]),
    )


def vit_shape_from_tower(visual: torch.nn.Module) -> Optional[ViTShape]:
    """The shape read off an instantiated tower; None when it is not a plain open_clip ViT."""
    if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None:
        return None
    fc = getattr(getattr(visual.transformer.resblocks[0], "mlp", None), "c_fc", None)
    if not isinstance(fc, torch.nn.Linear):
        return None
    return ViTShape(
        width=int(visual.transformer.width),
        layers=int(visual.transformer.layers),
        patch=_pair(visual.patch_size),
        image=_pair(visual.image_size),
        mlp_hidden=int(fc.out_features),
        embed_dim=None if visual.proj is None else int(visual.proj.shape[1]),
    )


def counted_gflops(visual: torch.nn.Module) -> float:
    """GFLOP per image counted by ``torch.utils.flop_counter`` over one forward pass at the tower's
    input size. It counts matmuls and convolutions only, so it may undercount (custom kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    height, width = _pair(getattr(visual, "image_size", 224))
    parameter = next(visual.parameters())
    counter = FlopCounterMode(display=False)
    # nn.MultiheadAttention's fast path (eval, no grad) is one fused op the counter does not know:
    # every projection and the attention would go uncounted (a third of a CoCa tower).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    # Out of inference_mode (a caller's too), under no_grad: torch 2.4's counter sees no ops in it,
    # nor on an input made in it.
    try:
        with torch.inference_mode(False), torch.no_grad():
            pixels = torch.zeros((1, 3, height, width), dtype=parameter.dtype, device=parameter.device)
            # The math backend: attention as matmuls the counter sees (before torch 2.15 it had no
            # formula for the CPU's fused attention op, and counted none of it).
            with sdpa_kernel(SDPBackend.MATH), counter:
                visual(pixels)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / 1e9


def _gflops_and_method(model: Union[str, torch.nn.Module]) -> Tuple[float, str]:
    """(GFLOP per image, "analytic" or "flop-counter") for a model name, a CLIP model or its tower."""
    if isinstance(model, str):
        shape = vit_shape_from_config(model)
        if shape is not None:
            return shape.gflops(), "analytic"
        model, _ = create_random_model(model)
    visual = getattr(model, "visual", model)
    shape = vit_shape_from_tower(visual)
    if shape is not None:
        return shape.gflops(), "analytic"
    warnings.warn(
        f"{type(visual).__name__} is not a plain open_clip ViT (a ResNet, a timm tower, or a ViT with an "
        "attentional pool): its FLOPs are counted by "
        "torch.utils.flop_counter, which may undercount (it sees matmuls and convolutions only).",
        UserWarning,
        stacklevel=stacklevel_outside_package(),
    )
    return counted_gflops(visual), "flop-counter"


def tower_gflops(model: Union[str, torch.nn.Module]) -> float:
    """Vision-tower GFLOP per image (2 x multiply-adds), for a model name, a CLIP model or its tower.

    open_clip VisionTransformers are counted analytically, from the config for a name (nothing is
    instantiated) or from the instantiated tower: with tokens t = (S/p)^2 + 1, width w, MLP hidden h,

        patch embedding (t - 1) w 3 p^2 + layers x [t (4 w^2 + 2 w h) + 2 t^2 w] + projection w D

    multiply-adds, which reproduces SPEC §2's table. Other towers (ResNets, timm) fall back to
    ``torch.utils.flop_counter`` with a warning that it may undercount.
    """
    return _gflops_and_method(model)[0]


def create_random_model(name: str) -> Tuple[torch.nn.Module, Callable]:
    """The model with random weights (``create_clip``'s, the same every run), float32 on CPU, without the
    random-weights warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*random weights", category=UserWarning)
        return create_clip(name, None)
