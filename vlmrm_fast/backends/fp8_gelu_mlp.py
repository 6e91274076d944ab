"""Each fp8 MLP's GELU (or QuickGELU) computed as its second matmul's input is quantised, for the "torch"
backend with its Triton kernels (``quantize="fp8"``, ``kernels="triton"``: the default on CUDA).

With fp8 an open_clip MLP is ``c_proj(gelu(c_fc(x)))``, both matmuls :class:`Float8Linear`. Eager torch
writes ``c_fc``'s bf16 output [tokens, hidden], reads it back for the GELU and writes the GELU's, which
the quantisation kernel (:mod:`vlmrm_fast.ops.quantize_rows`) then reads for ``c_proj``. Here the kernel
reads ``c_fc``'s output and applies the GELU itself (``activation="gelu"``): the GELU's pass over the hidden
activations is gone, 4 of the 7 bytes each bf16 activation cost there (about 0.14 s of ViT-bigG-14's
batch-1024 call and 34 ms of ViT-L-14's at the rate torch's GELU kernel ran on the H200; not measured
fused yet). The GELU is the exact one, in float32, and is quantised without being rounded to bf16 first:
one rounding fewer than the unfused path, whose values it may differ from by one E4M3 step where bf16's
rounding moved a value across a midpoint. The towers built for OpenAI's weights have QuickGELU in its place
(``x * sigmoid(1.702 x)``, three passes in open_clip's ops, one in :mod:`vlmrm_fast.ops.quick_gelu`), which
goes into the quantisation alike (``activation="quick_gelu"``).

:class:`Float8GELUMLP` computes so inside the backend's calls, wherever the quantisation kernel runs
(:func:`~vlmrm_fast.backends.torch_fp8.kernel_quantizes`), and as the ``nn.Sequential`` it replaced
everywhere else: under ``torch.compile`` (inductor fuses the GELU itself), tracing and autograd, in a
user's own call of the tower, with forward hooks on the GELU or ``c_proj`` (which the fused call would
skip), and where its children are no longer what it was built for (the tanh GELU and other activations
are left alone).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TypeGuard

import torch

from vlmrm_fast.backends.base import SwappedModule, in_place_of, runs_forward_hooks, swap_modules
from vlmrm_fast.backends.gelu_epilogue import GELUEpilogueMLP
from vlmrm_fast.backends.torch_fp8 import Float8Linear, kernel_quantizes
from vlmrm_fast.backends.triton_quick_gelu import TritonQuickGELU, is_quick_gelu
from vlmrm_fast.ops.quantize_rows import Activation

CHILDREN = ["c_fc", "gelu", "c_proj"]
"""An open_clip MLP's children, in order (those with a LayerNorm between the GELU and ``c_proj``, the
``scale_fc`` option, are left alone)."""


class Float8GELUMLP(SwappedModule, torch.nn.Sequential):
    """An fp8 open_clip MLP (``nn.Sequential`` of ``c_fc``, an exact ``nn.GELU``, then a
    :class:`Float8Linear` ``c_proj``) whose GELU runs in ``c_proj``'s input quantisation where that kernel
    runs (module docstring), else as the ``nn.Sequential`` it replaced.

    The same children (the same modules, under the same ``state_dict`` keys). Input [..., D] -> [..., D]
    in ``c_proj``'s output dtype (bfloat16).
    """

    @classmethod
    def from_mlp(cls, mlp: torch.nn.Sequential) -> "Float8GELUMLP":
        """A module holding ``mlp``'s children (nothing is copied); see :func:`is_fusable_fp8_mlp`."""
        if not is_fusable_fp8_mlp(mlp):
            raise ValueError(f"{mlp} is not an MLP of c_fc, an exact nn.GELU or QuickGELU, then a Float8Linear c_proj.")
        return in_place_of(cls(OrderedDict(mlp._modules)), mlp)

    def original(self) -> torch.nn.Sequential:
        """An ``nn.Sequential`` of the same children (:func:`~vlmrm_fast.backends.base.original_modules`)."""
        return in_place_of(torch.nn.Sequential(OrderedDict(self._modules)), self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or not has_fusable_children(self):
            return super().forward(x)
        fc = self._modules["c_fc"]
        assert fc is not None
        return activated_projection(self, fc(x))


def activated_projection(mlp: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``c_proj(gelu(hidden))`` of an open_clip MLP, ``hidden`` its ``c_fc``'s output [..., hidden]: the
    activation in ``c_proj``'s input quantisation where the kernel applies it (:func:`fused_activation`, a
    :class:`Float8Linear` ``c_proj``, the kernel quantising these rows) and no forward hook on the two would
    be skipped; else the two called as the modules they are. Shared by :class:`Float8GELUMLP` and the fp8
    blocks (:mod:`vlmrm_fast.backends.fp8_block`)."""
    gelu, proj = mlp._modules["gelu"], mlp._modules["c_proj"]
    assert gelu is not None and proj is not None
    activation = fused_activation(gelu)
    if activation is None or not isinstance(proj, Float8Linear) or runs_forward_hooks(gelu) \
            or runs_forward_hooks(proj) or not kernel_quantizes(hidden.reshape(-1, proj.in_features)):
        return proj(gelu(hidden))
    return proj.activated_forward(hidden, activation)


def fused_activation(module: object) -> Activation:
    """The quantisation kernel's name for the activation ``module`` computes: "gelu" for an exact
    ``nn.GELU``, "quick_gelu" for open_clip's QuickGELU (or this package's swap for it), else None."""
    if type(module) is torch.nn.GELU and module.approximate == "none":
        return "gelu"
    if is_quick_gelu(module) or type(module) is TritonQuickGELU:
        return "quick_gelu"
    return None


def has_fusable_children(mlp: torch.nn.Module) -> bool:
    """Whether ``mlp``'s children are ``c_fc``, an activation the quantisation kernel applies
    (:func:`fused_activation`) and a :class:`Float8Linear` ``c_proj``."""
    return (list(mlp._modules) == CHILDREN and fused_activation(mlp._modules["gelu"]) is not None
            and isinstance(mlp._modules["c_proj"], Float8Linear))


def is_fusable_fp8_mlp(module: object) -> TypeGuard[torch.nn.Sequential]:
    """Whether ``module`` is an fp8 open_clip MLP :class:`Float8GELUMLP` computes: an ``nn.Sequential`` of
    ``c_fc``, an exact ``nn.GELU`` or QuickGELU (the tanh GELU and other activations are left alone) and a
    :class:`Float8Linear` ``c_proj``; or such an MLP a bf16 reward made earlier on the same model swapped
    for its GELU epilogue (:class:`~vlmrm_fast.backends.gelu_epilogue.GELUEpilogueMLP`, which steps aside
    for fp8 layers)."""
    return isinstance(module, torch.nn.Sequential) and type(module) in (torch.nn.Sequential, GELUEpilogueMLP) \
        and has_fusable_children(module)


def use_fp8_gelu_fusion(visual: torch.nn.Module) -> int:
    """Replace, in place, every MLP of ``visual`` that :func:`is_fusable_fp8_mlp` accepts (call
    :func:`~vlmrm_fast.backends.torch_fp8.quantize_fp8` first) with a :class:`Float8GELUMLP` holding its
    children; the number of MLPs that now run so."""
    return swap_modules(visual, Float8GELUMLP, is_fusable_fp8_mlp, Float8GELUMLP.from_mlp)
