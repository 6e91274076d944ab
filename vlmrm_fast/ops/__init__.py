"""The fused ops, each a Triton kernel with a plain torch path of the same semantics."""
from vlmrm_fast.ops._triton import HAS_TRITON, resolve_kernels, triton_runs_on
from vlmrm_fast.ops.layer_norm import layer_norm, layer_norm_torch, layer_norm_triton
from vlmrm_fast.ops.preprocess import PreprocessSpec, preprocess, preprocess_torch, preprocess_triton
from vlmrm_fast.ops.score import ScoringTargets, score, score_torch, score_triton

__all__ = [
    "HAS_TRITON", "resolve_kernels", "triton_runs_on",
    "PreprocessSpec", "preprocess", "preprocess_torch", "preprocess_triton",
    "ScoringTargets", "score", "score_torch", "score_triton",
    "layer_norm", "layer_norm_torch", "layer_norm_triton",
]
