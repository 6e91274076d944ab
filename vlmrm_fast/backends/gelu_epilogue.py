"""Each transformer block's MLP with its GELU in the first matmul's epilogue, for the "torch" backend on
CUDA in bf16.

An open_clip block's MLP is ``c_proj(gelu(c_fc(x)))``. Eager PyTorch writes ``c_fc``'s output [tokens,
hidden] to memory, reads it back for the GELU and writes it again: on the H200
(``benchmarks/results/profile-h200-b32``, bf16, batch 1024, at cb02e91) that pass took 2.5 ms of ViT-B-32's
30.8 ms tower, bandwidth bound (315 MB each way per block). ``torch._addmm_activation(..., use_gelu=True)``
hands the GELU to cuBLASLt's epilogue (``CUBLASLT_EPILOGUE_GELU_BIAS``): bias and GELU are applied to the
float32 accumulator before its one rounding to bf16, and the pass is gone.

cuBLASLt's GELU is the tanh approximation, ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``, which is
within 4.7e-4 of the exact (erf) GELU everywhere (largest near x = 2.7, where the output is 2.69 and a bf16
step is 0.016). That is at most half a bf16 step where the output's magnitude is above 0.1; below it the
same absolute gap spans several of bf16's finer steps (up to 8 near outputs of -0.01), small beside the
activations the next matmul sums them with. It is used for bf16 only: fp16's steps are 8 times finer,
and there the approximation would be of the order of the rounding. The tests hold the MLP and the reward
to twice PyTorch's own bf16 error against the exact GELU in float64. The approximation is what the
epilogue computes, not a choice; towers whose GELU is already the tanh one get it exactly, and QuickGELU
towers (``x * sigmoid(1.702 x)``) keep their own.

The fused path runs only inside :func:`~vlmrm_fast.ops._triton.tower_kernels`, which the backend enters
for its own calls (whichever ``kernels`` it has): the same model called any other way (by the user, by
another reward, by an export) computes its own GELU (exact or tanh) as before.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, TypeGuard

import torch

from vlmrm_fast.backends.base import SwappedModule, in_place_of, runs_forward_hooks, swap_modules
from vlmrm_fast.backends.fast_path import FastPath
from vlmrm_fast.ops._triton import in_tower_call

DTYPES = (torch.bfloat16,)
"""Where the approximation is well below the rounding (module docstring)."""
_addmm_activation = getattr(torch, "_addmm_activation", None)
"""torch's addmm with a ReLU or GELU epilogue (private; since torch 1.13): None where a torch lacks it."""
GELU_EPILOGUE = FastPath("cuBLASLt's GELU epilogue (torch._addmm_activation)",
                         "the tower's MLPs run F.linear then F.gelu, as without it",
                         errors=(RuntimeError,), report="GPU and torch versions")
"""The fused matmul of :class:`GELUEpilogueMLP`, and whether it has failed in this process. Only
``RuntimeError`` turns it off: a cuBLASLt status, where the unfused ops are right too."""


class GELUEpilogueMLP(SwappedModule, torch.nn.Sequential):
    """An open_clip MLP (``nn.Sequential`` of ``c_fc``, ``gelu``, optionally ``ln``, then ``c_proj``) whose
    ``c_fc`` and ``gelu`` run as one cuBLASLt matmul with a GELU epilogue where :meth:`epilogue_applies`,
    else as the ``nn.Sequential`` it replaced.

    The same children (the same modules, under the same ``state_dict`` keys). Input [..., D] -> [..., D]
    in the input's dtype; on the fused path [..., D] is taken as [M, D] rows (a view where the input is
    contiguous) and the hidden activations [M, hidden] are the epilogue's output.
    """

    @classmethod
    def from_mlp(cls, mlp: torch.nn.Sequential) -> "GELUEpilogueMLP":
        """A module holding ``mlp``'s children (nothing is copied); see :func:`is_fusable_mlp`."""
        if not is_fusable_mlp(mlp):
            raise ValueError(f"{mlp} is not an MLP of c_fc (nn.Linear with a bias), an exact or tanh nn.GELU, "
                             f"then the rest.")
        return in_place_of(cls(OrderedDict(mlp._modules)), mlp)

    def original(self) -> torch.nn.Sequential:
        """An ``nn.Sequential`` of the same children (:func:`~vlmrm_fast.backends.base.original_modules`)."""
        return in_place_of(torch.nn.Sequential(OrderedDict(self._modules)), self)

    def epilogue_applies(self, x: torch.Tensor) -> bool:
        """Whether this call takes the fused path: a "torch" backend's own call (module docstring), CUDA,
        bf16 input and weights, no autograd graph wanted, outside ``torch.compile`` and tracing (which get
        the replaced module's ops to fuse or export), the children still what :func:`is_fusable_mlp`
        accepted (an fp8 reward replaces ``c_fc`` in place), no forward hooks on ``c_fc`` or ``gelu`` (a
        probe of their outputs), and no failure before."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or _addmm_activation is None or not in_tower_call():
            return False
        fc = self._modules.get("c_fc")
        if type(fc) is not torch.nn.Linear or fc.bias is None or not _is_gelu(self._modules.get("gelu")):
            return False
        if not _epilogue_device(x.device) or x.dtype not in DTYPES:
            return False
        if fc.weight.dtype != x.dtype or fc.bias.dtype != x.dtype or x.shape[-1] != fc.in_features:
            return False
        if runs_forward_hooks(fc) or runs_forward_hooks(self._modules["gelu"]):  # the fused call would skip them
            return False
        if torch.is_grad_enabled() and (x.requires_grad or fc.weight.requires_grad or fc.bias.requires_grad):
            return False
        return GELU_EPILOGUE.takes_call()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.epilogue_applies(x):
            return super().forward(x)
        fc, gelu = self._modules["c_fc"], self._modules["gelu"]
        assert isinstance(fc, torch.nn.Linear) and gelu is not None
        hidden = GELU_EPILOGUE.run(lambda: gelu_linear(x, fc), lambda: gelu(fc(x)))
        for name, module in self._modules.items():
            if name not in ("c_fc", "gelu"):
                hidden = module(hidden)
        return hidden


def gelu_linear(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """``gelu(linear(x))`` as one matmul with cuBLASLt's GELU epilogue (the tanh GELU; see the module's
    docstring): x [..., D_in] -> [..., D_out], in x's dtype (that of ``linear``'s weight and bias too).
    The fused path of :class:`GELUEpilogueMLP`, and what ``benchmarks/bench_kernels.py`` times."""
    if _addmm_activation is None or linear.bias is None:
        raise ValueError("gelu_linear needs torch._addmm_activation (torch >= 1.13) and a Linear with a bias")
    hidden = _addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
    return hidden.view(*x.shape[:-1], linear.out_features)


def _epilogue_device(device: torch.device) -> bool:
    """Whether ``torch._addmm_activation`` runs cuBLASLt's epilogue on ``device``: CUDA (NVIDIA's; ROCm's
    hipBLASLt has one too, not measured). The tests stand CPU in for it, with the epilogue's arithmetic."""
    return device.type == "cuda" and torch.version.hip is None


def _is_gelu(module: Optional[torch.nn.Module]) -> bool:
    return type(module) is torch.nn.GELU and module.approximate in ("none", "tanh")


def is_fusable_mlp(module: object) -> TypeGuard[torch.nn.Sequential]:
    """Whether ``module`` is an open_clip MLP :class:`GELUEpilogueMLP` computes: an ``nn.Sequential``
    whose first two children are ``c_fc`` (an ``nn.Linear`` with a bias) and ``gelu`` (``nn.GELU``, exact
    or tanh: QuickGELU and other activations are left alone)."""
    if type(module) is not torch.nn.Sequential:
        return False
    names = list(module._modules)
    fc = module._modules.get("c_fc")
    return (names[:2] == ["c_fc", "gelu"] and type(fc) is torch.nn.Linear and fc.bias is not None
            and _is_gelu(module._modules["gelu"]))


def use_gelu_epilogue(visual: torch.nn.Module) -> int:
    """Replace, in place, every MLP of ``visual`` that :func:`is_fusable_mlp` accepts with a
    :class:`GELUEpilogueMLP` holding its children; the number of MLPs that now run so."""
    return swap_modules(visual, GELUEpilogueMLP, is_fusable_mlp, GELUEpilogueMLP.from_mlp)

