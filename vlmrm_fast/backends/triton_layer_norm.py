"""The tower's LayerNorms through the Triton kernel of :mod:`vlmrm_fast.ops.layer_norm`, for the "torch"
backend on CUDA.

The modules are swapped in place for :class:`TritonLayerNorm`, which shares their parameters (the same
tensors, under the same ``state_dict`` keys). It runs the kernel only inside
:func:`~vlmrm_fast.ops._triton.tower_kernels`, which the backend enters for its own calls: the same model
called any other way (by the user, by a reward with ``kernels="torch"``, by the "compile" backend, by an
ONNX export) runs the replaced class's own ``forward``. Inside too, torch's op stays wherever the kernel
is not the right tool: under ``torch.compile``, ``torch.export`` and tracing, when autograd needs a graph
(the kernel has no backward), for tensor subclasses (fake tensors have no data), on devices Triton does
not run on, and for small inputs, where a Triton launch costs the host more than torch's kernel costs
the GPU. A kernel that fails to build or launch is turned off for the process with one warning
(:mod:`vlmrm_fast.backends.fast_path`).
"""
from __future__ import annotations

import functools
from typing import Tuple, Type, TypeGuard, TypeVar

import torch

from vlmrm_fast.backends.base import SwappedModule, in_place_of, swap_modules
from vlmrm_fast.backends.fast_path import FastPath
from vlmrm_fast.ops._triton import tower_kernels_enabled, triton_runs_on
from vlmrm_fast.ops.layer_norm import DTYPES, MAX_WIDTH, check_layer_norm_args, layer_norm_triton, rows_of

LayerNormT = TypeVar("LayerNormT", bound=torch.nn.LayerNorm)

MIN_ELEMENTS = 1 << 23
"""Inputs smaller than this (in elements) go to torch's kernel. The eager tower is bound by the host's
launches up to a few hundred ViT-B-32 frames a call (H200: about 5 ms a call from batch 1 to 64), where
each Triton launch would add host time; from 2**23 elements (ViT-B-32: 219 frames, ViT-L-14: 32,
ViT-bigG-14: 20) the GPU's time dominates."""

LAYER_NORM = FastPath("the LayerNorm kernel (vlmrm_fast/ops/layer_norm.py)", "the replaced LayerNorm's forward runs")
"""The kernel of :class:`TritonLayerNorm`, and whether it has failed in this process."""


@functools.lru_cache(maxsize=None)  # once: asked for every module of every tower swapped
def _replaceable_types() -> Tuple[Type[torch.nn.LayerNorm], ...]:
    """The LayerNorm classes whose forward is the float32-computed LayerNorm the kernel gives: torch's
    own and open_clip's two (one casts its input to float32 first, both return the input's dtype)."""
    types = [torch.nn.LayerNorm]
    try:
        from open_clip.transformer import LayerNorm, LayerNormFp32

        types += [LayerNorm, LayerNormFp32]
    except ImportError:  # pragma: no cover - open_clip is a dependency; the classes moved in some version
        pass
    return tuple(types)


class TritonLayerNorm(SwappedModule, torch.nn.LayerNorm):
    """A LayerNorm of the tower computed by the Triton kernel inside
    :func:`~vlmrm_fast.ops._triton.tower_kernels`, where that applies (see the module's docstring), else
    by the forward of the class it replaced (``base``).

    Input [..., D] float32/bfloat16/float16 -> [..., D] in the input's dtype, computed in float32.
    """

    min_elements: int = MIN_ELEMENTS
    base: Type[torch.nn.LayerNorm]

    @classmethod
    def from_layer_norm(cls, norm: torch.nn.LayerNorm) -> "TritonLayerNorm":
        """A module sharing ``norm``'s weight and bias (nothing is copied); see :func:`is_replaceable`."""
        if not is_replaceable(norm):
            raise ValueError(f"{norm} is not a LayerNorm over one dimension with a weight and a bias.")
        new = _sharing(cls, norm)
        new.base = type(norm)
        return new

    def original(self) -> torch.nn.LayerNorm:
        """A ``base`` module sharing this one's parameters (:func:`~vlmrm_fast.backends.base.original_modules`)."""
        return _sharing(self.base, self)

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        # torch.compile, torch.export, ONNX export; asked before the context variable, which dynamo cannot
        # trace before torch 2.14 (a graph break at every LayerNorm of a swapped tower compiled later)
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or not tower_kernels_enabled():
            return False
        if type(x) is not torch.Tensor or x.numel() < self.min_elements or x.dtype not in DTYPES:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad):
            return False
        return triton_runs_on(x.device) and rows_of(x) is not None and LAYER_NORM.takes_call()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_applies(x):
            check_layer_norm_args(x, self.weight, self.bias)  # a caller's mistake is raised, not taken for a failure
            return LAYER_NORM.run(lambda: layer_norm_triton(x, self.weight, self.bias, self.eps),
                                  lambda: self.base.forward(self, x))
        return self.base.forward(self, x)


def _sharing(cls: Type[LayerNormT], norm: torch.nn.LayerNorm) -> LayerNormT:
    """A ``cls`` (a LayerNorm class) with ``norm``'s shape, eps, weight and bias (the same tensors: made on
    the meta device, nothing is allocated), hooks and training mode."""
    new = cls(list(norm.normalized_shape), eps=norm.eps, device="meta")
    new.weight, new.bias = norm.weight, norm.bias
    return in_place_of(new, norm)


def is_replaceable(module: object) -> TypeGuard[torch.nn.LayerNorm]:
    """Whether ``module`` is one of the LayerNorm classes :class:`TritonLayerNorm` computes as they do,
    over one dimension of at most :data:`~vlmrm_fast.ops.layer_norm.MAX_WIDTH`, with a weight and a bias."""
    return (isinstance(module, torch.nn.LayerNorm) and type(module) in _replaceable_types()
            and len(module.normalized_shape) == 1 and module.normalized_shape[0] <= MAX_WIDTH
            and module.weight is not None and module.bias is not None)


def use_triton_layer_norm(visual: torch.nn.Module) -> int:
    """Replace, in place, every LayerNorm of ``visual`` that :func:`is_replaceable` accepts with a
    :class:`TritonLayerNorm` sharing its parameters; the number of LayerNorms that now run so."""
    return swap_modules(visual, TritonLayerNorm, is_replaceable, TritonLayerNorm.from_layer_norm)
