"""The tower's QuickGELUs through the Triton kernel of :mod:`vlmrm_fast.ops.quick_gelu`, for the "torch"
backend with its kernels (``kernels="triton"``: the default on CUDA).

open_clip's ``QuickGELU`` modules (towers built for OpenAI's weights) are swapped in place for
:class:`TritonQuickGELU`, which has no parameters and runs the kernel only inside
:func:`~vlmrm_fast.ops._triton.tower_kernels`, which the backend enters for its own calls. Everywhere else
it computes as open_clip's module: the same model called any other way, under ``torch.compile`` (inductor
fuses the three ops itself), ``torch.export`` and tracing, when autograd needs a graph, for tensor
subclasses, non-contiguous inputs, devices Triton does not run on and small inputs (below
:data:`~vlmrm_fast.backends.triton_layer_norm.MIN_ELEMENTS`, where a Triton launch costs the host more
than the three eager kernels cost the GPU). Its result is rounded once, not three times: within half a
unit in the last place plus float32's error of the exact value, where open_clip's eager bf16 is up to
about one and a half off. A kernel that fails to build or launch (no GPU has run it yet) is turned off
for the process with one warning.
"""
from __future__ import annotations

from typing import TypeGuard

import torch
from open_clip.transformer import QuickGELU

from vlmrm_fast.backends.base import SwappedModule, in_place_of, swap_modules
from vlmrm_fast.backends.fast_path import FastPath
from vlmrm_fast.backends.triton_layer_norm import MIN_ELEMENTS
from vlmrm_fast.ops._triton import tower_kernels_enabled, triton_runs_on
from vlmrm_fast.ops.quick_gelu import DTYPES, quick_gelu_triton

QUICK_GELU = FastPath("the QuickGELU kernel (vlmrm_fast/ops/quick_gelu.py)", "open_clip's ops run")
"""The kernel of :class:`TritonQuickGELU`, and whether it has failed in this process."""


def is_quick_gelu(module: object) -> TypeGuard[QuickGELU]:
    """Whether ``module`` is open_clip's ``QuickGELU`` (that class exactly: a subclass may compute otherwise)."""
    return type(module) is QuickGELU


class TritonQuickGELU(SwappedModule, QuickGELU):
    """open_clip's ``QuickGELU``, ``x * sigmoid(1.702 x)``, computed by the Triton kernel inside
    :func:`~vlmrm_fast.ops._triton.tower_kernels` where that applies (module docstring), else by
    open_clip's ops. Input any shape, float32/bfloat16/float16 -> the same shape and dtype."""

    min_elements: int = MIN_ELEMENTS

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "TritonQuickGELU":
        """A module in ``module``'s place (with its hooks and mode); see :func:`is_quick_gelu`."""
        if not is_quick_gelu(module):
            raise ValueError(f"{module} is not open_clip's QuickGELU.")
        return in_place_of(cls(), module)

    def original(self) -> QuickGELU:
        """open_clip's ``QuickGELU`` (:func:`~vlmrm_fast.backends.base.original_modules`)."""
        return in_place_of(QuickGELU(), self)

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or not tower_kernels_enabled():
            return False
        if type(x) is not torch.Tensor or x.numel() < self.min_elements or x.dtype not in DTYPES:
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        return triton_runs_on(x.device) and x.is_contiguous() and QUICK_GELU.takes_call()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_applies(x):
            return QUICK_GELU.run(lambda: quick_gelu_triton(x), lambda: QuickGELU.forward(self, x))
        return super().forward(x)


def use_triton_quick_gelu(visual: torch.nn.Module) -> int:
    """Replace, in place, every open_clip ``QuickGELU`` of ``visual`` with a :class:`TritonQuickGELU`; the
    number that now run so."""
    return swap_modules(visual, TritonQuickGELU, is_quick_gelu, TritonQuickGELU.from_module)
