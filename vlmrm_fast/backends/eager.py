"""The "torch" backend: the open_clip tower in eager PyTorch."""
from __future__ import annotations

from typing import Optional

import torch

from vlmrm_fast.backends.base import BackendError, VisionBackend, pooled_embeddings
from vlmrm_fast.backends.fp8_block import use_fp8_block_fusion
from vlmrm_fast.backends.fp8_gelu_mlp import use_fp8_gelu_fusion
from vlmrm_fast.backends.gelu_epilogue import DTYPES as GELU_EPILOGUE_DTYPES
from vlmrm_fast.backends.gelu_epilogue import use_gelu_epilogue
from vlmrm_fast.backends.patch_embed import use_patch_matmul
from vlmrm_fast.backends.torch_fp8 import check_torch_quantize, is_fp8_quantised, quantize_fp8
from vlmrm_fast.backends.triton_layer_norm import use_triton_layer_norm
from vlmrm_fast.backends.triton_quick_gelu import use_triton_quick_gelu
from vlmrm_fast.ops._triton import tower_kernels


def adapt_tower(visual: torch.nn.Module, backend: str, device: torch.device, dtype: torch.dtype,
                quantize: Optional[str], kernels: str = "torch") -> None:
    """What the "torch" and "compile" backends change in ``visual`` (in place) before running it: on CUDA,
    the patch embedding as a matmul (cuDNN's convolution was the slow one; on CPU it is not measured);
    with ``quantize="fp8"``, the transformer's matmuls in E4M3, after checking that they can run here
    (and, with ``kernels="triton"``, each MLP's GELU in its second matmul's input quantisation,
    :mod:`vlmrm_fast.backends.fp8_gelu_mlp`, and each block's LayerNorms, with the residual add before the
    second, in their matmuls' input quantisation, :mod:`vlmrm_fast.backends.fp8_block`); otherwise, for
    "torch" on CUDA in bf16, each MLP's GELU in its first matmul's epilogue
    (:mod:`vlmrm_fast.backends.gelu_epilogue`; "compile" leaves that to inductor);
    with ``kernels="triton"`` (which only "torch" passes: "compile" leaves them to inductor, which fuses
    them), the LayerNorms and OpenAI towers' QuickGELUs through Triton kernels
    (:mod:`vlmrm_fast.backends.triton_layer_norm`, :mod:`vlmrm_fast.backends.triton_quick_gelu`)."""
    check_torch_quantize(quantize, backend, device, dtype)
    if quantize != "fp8" and is_fp8_quantised(visual):
        raise BackendError(
            "this vision tower's matmuls were quantised to fp8, in place, by a reward made earlier on the same "
            "model (backend_options quantize='fp8'): it would score in fp8 unasked. Load the model again for "
            "this reward (or give it a copy.deepcopy of the model), or pass backend_options={'quantize': 'fp8'}."
        )
    if device.type == "cuda":
        use_patch_matmul(visual)
    if quantize == "fp8":
        quantize_fp8(visual, dtype)
        if kernels == "triton":
            use_fp8_gelu_fusion(visual)
            use_fp8_block_fusion(visual)
    elif device.type == "cuda" and backend == "torch" and dtype in GELU_EPILOGUE_DTYPES:
        use_gelu_epilogue(visual)
    if kernels == "triton":
        use_triton_layer_norm(visual)
        use_triton_quick_gelu(visual)


class TorchBackend(VisionBackend):
    """Eager PyTorch in the tower's dtype. Attention goes through ``nn.MultiheadAttention``, whose
    inference fast path calls scaled-dot-product attention (flash / memory-efficient kernels on CUDA; with
    fp8, through :class:`~vlmrm_fast.backends.torch_fp8.SelfAttention` and SDPA). On CUDA a ViT's patch
    embedding runs as one matmul (:mod:`vlmrm_fast.backends.patch_embed`; ``visual.conv1`` is replaced in
    place, its parameters kept), and in bf16 each MLP's GELU runs in its first matmul's epilogue
    (:mod:`vlmrm_fast.backends.gelu_epilogue`; the MLPs are replaced in place, their layers kept, and fused
    in this backend's calls only).

    Args:
        quantize: None, or "fp8": the transformer's matmuls in E4M3 (:mod:`vlmrm_fast.backends.torch_fp8`;
            Hopper GPUs, bf16; lossy, opt-in), their activations quantised by a Triton kernel with
            ``kernels="triton"``, each MLP's GELU in that kernel (:mod:`vlmrm_fast.backends.fp8_gelu_mlp`),
            each block's LayerNorms in a kernel that also quantises (:mod:`vlmrm_fast.backends.fp8_block`).
            The tower's modules are replaced in place.
        kernels: "triton" (the reward's choice on CUDA) runs the tower's LayerNorms (and OpenAI towers'
            QuickGELUs) through Triton kernels in this backend's calls
            (:mod:`vlmrm_fast.backends.triton_layer_norm`, :mod:`vlmrm_fast.backends.triton_quick_gelu`; the
            modules are replaced in place, their parameters kept, and compute as before in any other call);
            "torch" leaves them to torch.
    """

    name = "torch"

    def __init__(self, visual: torch.nn.Module, device, dtype, image_size, quantize: Optional[str] = None,
                 kernels: str = "torch") -> None:
        super().__init__(device, dtype, image_size)
        self.visual = visual
        self.quantize = quantize
        self.kernels = kernels
        adapt_tower(visual, self.name, self.device, dtype, quantize, kernels)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with tower_kernels(self.kernels == "triton"):
            return pooled_embeddings(self.visual(pixels))
