"""Each fp8 block's LayerNorms in the quantisation of the matmul after them, the residual add before the
second one too, for the "torch" backend with its Triton kernels (``quantize="fp8"``, ``kernels="triton"``:
the default on CUDA).

An open_clip block is ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``. With fp8, eager torch writes each
LayerNorm's bf16 output only for the quantisation kernel to read it back before ``attn.in_proj`` and
``mlp.c_fc``, and writes the stream after the first residual add only for ``ln_2`` to read it back. Here
one kernel (:mod:`vlmrm_fast.ops.layer_norm_quantize`) normalises and quantises ``ln_1``'s rows, and
another adds the attention's output, writes the stream, normalises and quantises ``ln_2``'s: 10 bytes
fewer per bf16 element of the stream a block, 3 launches fewer (about 70 ms of ViT-bigG-14's batch-1024
call, not measured on a GPU yet). The LayerNorms' float32 outputs are quantised as computed, not rounded
to bf16 first: one rounding fewer than the unfused path, whose values they may differ from by one E4M3
step where bf16's rounding moved a value across a midpoint. Between ``c_fc`` and ``c_proj``, an exact GELU
or QuickGELU goes into ``c_proj``'s quantisation (:mod:`vlmrm_fast.backends.fp8_gelu_mlp`); another
activation is called as the module it is.

:class:`Float8Block` computes so inside the backend's calls, wherever the quantisation kernel runs
(:func:`~vlmrm_fast.backends.torch_fp8.kernel_quantizes`), and as the open_clip block it replaced
everywhere else: under ``torch.compile`` (inductor fuses these itself), tracing and autograd, in a user's
own call of the tower, with forward hooks on the modules the fused call skips (the LayerNorms, the
attention and its input projection, the MLP and ``c_fc``; with hooks on the activation or ``c_proj``,
those two are called as modules), with cross-attention inputs or a mask, and where its children are no
longer what it was built for (other classes, or sizes that do not fit together).
"""
from __future__ import annotations

from typing import Any, Optional, Type, TypeGuard, TypeVar

import torch
from open_clip.transformer import ResidualAttentionBlock

from vlmrm_fast.backends.base import SwappedModule, in_place_of, runs_forward_hooks, swap_modules
from vlmrm_fast.backends.fast_path import FastPath
from vlmrm_fast.backends.fp8_gelu_mlp import Float8GELUMLP, activated_projection
from vlmrm_fast.backends.gelu_epilogue import GELUEpilogueMLP
from vlmrm_fast.backends.torch_fp8 import Float8Linear, SelfAttention, kernel_quantizes
from vlmrm_fast.backends.triton_layer_norm import TritonLayerNorm, is_replaceable
from vlmrm_fast.ops.layer_norm import rows_of
from vlmrm_fast.ops.layer_norm_quantize import (check_layer_norm_quantize_args, layer_norm_quantize_torch,
                                                 layer_norm_quantize_triton)

CHILDREN = ["ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"]
"""An open_clip block's children, in order (cross-attention blocks, with ``ln_1_kv``, are left alone)."""

BlockT = TypeVar("BlockT", bound=torch.nn.Module)

LAYER_NORM_QUANTIZE = FastPath(
    "the fp8 blocks' LayerNorm and quantisation kernel (vlmrm_fast/ops/layer_norm_quantize.py)",
    "torch's ops normalise and quantise")
"""The fused LayerNorm of :class:`Float8Block`, and whether it has failed in this process."""


class Float8Block(SwappedModule, ResidualAttentionBlock):
    """An open_clip ``ResidualAttentionBlock`` of an fp8 tower whose LayerNorms (and the residual add before
    the second) run in the quantisation of the matmul after them where that kernel runs (module docstring),
    else as the block it replaced (its own ``forward``).

    The same children (the same modules, under the same ``state_dict`` keys). Tokens [B, L, D] in
    bfloat16 -> [B, L, D] bfloat16.
    """

    @classmethod
    def from_block(cls, block: ResidualAttentionBlock) -> "Float8Block":
        """A module holding ``block``'s children (nothing is copied); see :func:`is_fusable_fp8_block`."""
        if not is_fusable_fp8_block(block):
            raise ValueError(f"{type(block).__name__} is not an open_clip ResidualAttentionBlock with fp8 projections, "
                             "plain LayerNorms, no layer scale and an MLP of an fp8 c_fc, an activation and c_proj.")
        return _holding_children(cls, block)

    def original(self) -> ResidualAttentionBlock:
        """A ``ResidualAttentionBlock`` of the same children (:func:`~vlmrm_fast.backends.base.original_modules`)."""
        return _holding_children(ResidualAttentionBlock, self)

    def forward(self, q_x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # k_x, v_x and attn_mask, all None from open_clip's Transformer (positional under grad checkpointing)
        if any(value is not None for value in (*args, *kwargs.values())) or not self._fuses(q_x):
            return super().forward(q_x, *args, **kwargs)
        attn, mlp = self.attn, self.mlp
        assert isinstance(attn, SelfAttention) and isinstance(attn.in_proj, Float8Linear)  # _fuses's checks
        assert isinstance(mlp.c_fc, Float8Linear)
        batch, tokens, _ = q_x.shape
        _, q, scale = _normalised(q_x, self.ln_1)
        hidden = attn.out_proj(attn.attend(attn.in_proj.quantized_forward(q, scale), batch, tokens))
        x, q, scale = _normalised(q_x, self.ln_2, add=hidden)
        return x + activated_projection(mlp, mlp.c_fc.quantized_forward(q, scale)).view_as(x)

    def _fuses(self, x: torch.Tensor) -> bool:
        """Whether this call of the block runs fused (module docstring)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or not _fusable_children(self):
            return False
        attn = self.attn
        rows = rows_of(x) if x.dim() == 3 and x.shape[-1] == attn.in_proj.in_features else None  # else: its error
        if rows is None or x.dtype != attn.out_proj.out_dtype or not kernel_quantizes(rows):
            return False
        norms = (self.ln_1, self.ln_2)
        if torch.is_grad_enabled() and any(p.requires_grad for norm in norms for p in (norm.weight, norm.bias)):
            return False
        skipped = (*norms, attn, attn.in_proj, self.ls_1, self.ls_2, self.mlp, self.mlp.c_fc)
        if any(runs_forward_hooks(module) for module in skipped):
            return False
        return LAYER_NORM_QUANTIZE.takes_call()  # once it is off, the replaced block's Triton LayerNorms are faster


def _normalised(x: torch.Tensor, norm: torch.nn.LayerNorm, add: Optional[torch.Tensor] = None):
    """:mod:`vlmrm_fast.ops.layer_norm_quantize` of ``x`` (plus ``add``) with ``norm``'s parameters: the
    kernel, or torch's ops once it has failed (:data:`LAYER_NORM_QUANTIZE`)."""
    args = (x, norm.weight, norm.bias, norm.eps)
    check_layer_norm_quantize_args(*args[:3], add)  # a caller's mistake is raised, not taken for a kernel failure
    return LAYER_NORM_QUANTIZE.run(lambda: layer_norm_quantize_triton(*args, add=add),
                                   lambda: layer_norm_quantize_torch(*args, add=add))


def _holding_children(cls: Type[BlockT], block: torch.nn.Module) -> BlockT:
    """A ``cls`` holding ``block``'s children (the same modules, in order), with its hooks and mode; built
    without ``cls.__init__``, which would make layers of its own."""
    new = cls.__new__(cls)
    torch.nn.Module.__init__(new)
    for name, child in block.named_children():
        new.add_module(name, child)
    return in_place_of(new, block)


def _is_layer_norm(module: object, width: int) -> bool:
    """A LayerNorm the kernel computes as the block's own would (the Triton one, or one it replaces)."""
    return (isinstance(module, TritonLayerNorm) or is_replaceable(module)) and \
        tuple(module.normalized_shape) == (width,)


MLP_CHILDREN = ["c_fc", "gelu", "c_proj"]
MLP_TYPES = (torch.nn.Sequential, Float8GELUMLP, GELUEpilogueMLP)
"""The MLP's classes: open_clip's, and those this package swaps in for it (which compute as it does)."""


def _fusable_children(block: torch.nn.Module) -> bool:
    """Whether ``block``'s children are those :class:`Float8Block` fuses: plain LayerNorms, an fp8
    batch-first :class:`~vlmrm_fast.backends.torch_fp8.SelfAttention`, no layer scale and an MLP of an fp8
    ``c_fc``, an activation and ``c_proj``, of sizes that fit together."""
    modules = block._modules
    attn, mlp = modules.get("attn"), modules.get("mlp")
    if list(modules) != CHILDREN or block._parameters or block._buffers or type(attn) is not SelfAttention:
        return False
    width = attn.heads * attn.head_dim
    in_proj, out_proj = attn.in_proj, attn.out_proj
    if not (attn.batch_first and _is_linear(in_proj, width, 3 * width, fp8=True)
            and _is_linear(out_proj, width, width, fp8=True)
            and all(_is_layer_norm(modules[name], width) for name in ("ln_1", "ln_2"))
            and all(type(modules[name]) is torch.nn.Identity for name in ("ls_1", "ls_2"))):
        return False
    if mlp is None or type(mlp) not in MLP_TYPES or list(mlp._modules) != MLP_CHILDREN:
        return False
    fc, proj = mlp._modules["c_fc"], mlp._modules["c_proj"]
    if not isinstance(fc, Float8Linear):
        return False
    return _is_linear(fc, width, fc.out_features, fp8=True) and _is_linear(proj, fc.out_features, width)


def _is_linear(module: object, in_features: int, out_features: int, fp8: bool = False) -> bool:
    """A :class:`~vlmrm_fast.backends.torch_fp8.Float8Linear` (or, unless ``fp8``, an ``nn.Linear``) of these sizes."""
    kinds = (Float8Linear,) if fp8 else (Float8Linear, torch.nn.Linear)
    return (isinstance(module, kinds) and module.in_features == in_features
            and module.out_features == out_features)


def is_fusable_fp8_block(module: object) -> TypeGuard[ResidualAttentionBlock]:
    """Whether ``module`` is an open_clip ``ResidualAttentionBlock`` (that class exactly) whose children
    :class:`Float8Block` fuses (call :func:`~vlmrm_fast.backends.torch_fp8.quantize_fp8` first)."""
    return isinstance(module, torch.nn.Module) and type(module) is ResidualAttentionBlock and _fusable_children(module)


def use_fp8_block_fusion(visual: torch.nn.Module) -> int:
    """Replace, in place, every block of ``visual`` that :func:`is_fusable_fp8_block` accepts with a
    :class:`Float8Block` holding its children; the number of blocks that now run so."""
    return swap_modules(visual, Float8Block, is_fusable_fp8_block, Float8Block.from_block)
