"""fp8 (E4M3) matmuls for the "torch" and "compile" backends: ``backend_options={"quantize": "fp8"}``.

The ViT's matmuls (each block's attention projections and MLP) are nearly all of its FLOPs, and on the
H200 ViT-bigG-14's already run at about the bf16 matmul peak measured beside them (670 of 683 TFLOP/s,
benchmarks/results/profile-h200-bigg), while the frames/s targets sit within 10% of the towers' bf16 FLOP
ceilings. fp8 tensor cores have twice bf16's dense peak on paper (how much of it these matmuls get is not
measured yet). Here each such ``nn.Linear`` (and each ``nn.MultiheadAttention``'s two projections) whose
sizes are multiples of 16 becomes a :class:`Float8Linear` (others stay bf16):

- weights: E4M3, one scale per output row (its largest magnitude maps to 448, E4M3's largest value);
- activations: E4M3, one scale per row (per token), computed on every call (dynamic scaling: nothing to
  calibrate, and no frame is clipped by scales set on other frames);
- ``torch._scaled_mm`` multiplies them, accumulating in float32, and adds the bias in its epilogue,
  writing bfloat16.

Everything else stays bf16: the patch embedding, LayerNorm, attention itself (SDPA's two matmuls and
softmax), GELU and the output projection ``visual.proj``. The "torch" backend (with its Triton kernels,
the default on CUDA) quantises each activation in one pass (:mod:`vlmrm_fast.ops.quantize_rows`; torch's
ops take four), with each MLP's GELU or QuickGELU (:mod:`vlmrm_fast.backends.fp8_gelu_mlp`) and each block's
LayerNorms (:mod:`vlmrm_fast.backends.fp8_block`) in that pass; with ``"compile"``, inductor fuses torch's
ops itself (not yet seen on a GPU).

torchao's float8 inference quantisation does the same, but refuses devices below compute capability 8.9
(so CI, on CPU, could not test it) and is tied to particular torch versions; hence this module. Per-row
scaled ``torch._scaled_mm`` runs on Hopper GPUs (compute capability 9.x; taken from torch 2.6, CUDA 12
builds) and on CPU in torch 2.14 and 2.15 (2.14.1 checked); CPU use is for tests only
(:func:`fp8_unsupported_reason` refuses it).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, cast

import torch
import torch.nn.functional as F

from vlmrm_fast.backends.base import BackendError
from vlmrm_fast.backends.fast_path import FastPath
from vlmrm_fast.ops._triton import tower_kernels_enabled, triton_runs_on
from vlmrm_fast.ops.quantize_rows import Activation, kernel_takes, quantize_rows_torch, quantize_rows_triton

HOPPER = 9
"""The compute capability major this runs on: torch's per-row fp8 kernel is a Hopper (sm90) kernel; on
Blackwell and consumer GPUs it depends on the torch build, and ROCm's fp8 is another type (e4m3fnuz)."""
MIN_TORCH = (2, 6)
"""torch 2.5's per-row fp8 kernel was reported to read past its scales when the rows are not a multiple
of 256 (pytorch/pytorch#133334), as a batch of tokens usually is."""
MIN_CUDA = 12
"""torch builds for CUDA 11 leave the per-row fp8 kernel out."""


class Float8Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``x`` and ``W`` in E4M3, each scaled per row (module docstring).

    Input [..., K] in any float dtype; output [..., N] in ``out_dtype`` (bfloat16 on CUDA, where per-row
    scales require it), on the weight's device. K and N must be multiples of 16 (``torch._scaled_mm``).
    """

    weight_fp8_bytes: torch.Tensor
    weight_scale_bytes: torch.Tensor
    bias_bytes: Optional[torch.Tensor]

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if not _fits_fp8(weight):
            raise ValueError(f"fp8 matmuls need both sizes to be multiples of 16; this weight is {tuple(weight.shape)}.")
        self.out_dtype = out_dtype
        weight_fp8, weight_scale = quantize_rows_torch(weight.detach())
        # Held as raw bytes: Module.to(dtype), .half() and .float() cast every floating-point buffer,
        # float8 included, which would round the E4M3 values and the float32 scales away (a second
        # CLIPReward on the same model casts its tower so).
        self.register_buffer("weight_fp8_bytes", _as_bytes(weight_fp8))
        self.register_buffer("weight_scale_bytes", _as_bytes(weight_scale.reshape(1, -1)))  # [1, N]: per column of W.T
        self.register_buffer("bias_bytes", None if bias is None else _as_bytes(bias.detach().to(out_dtype)))

    @property
    def weight_fp8(self) -> torch.Tensor:
        """[N, K] float8_e4m3fn."""
        return self.weight_fp8_bytes.view(torch.float8_e4m3fn)

    @property
    def weight_scale(self) -> torch.Tensor:
        """[1, N] float32: column ``j`` of ``W.T`` is ``weight_fp8[j] * weight_scale[0, j]``."""
        return self.weight_scale_bytes.view(torch.float32)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """[N] in ``out_dtype``, or None."""
        return None if self.bias_bytes is None else self.bias_bytes.view(self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, None)

    def activated_forward(self, x: torch.Tensor, activation: Activation) -> torch.Tensor:
        """``forward(activation(x))``, the activation ("gelu": the exact GELU; "quick_gelu") computed in
        float32 as the activations are quantised, not rounded to ``x``'s dtype first
        (:mod:`vlmrm_fast.ops.quantize_rows`): an fp8 MLP's second matmul
        (:mod:`vlmrm_fast.backends.fp8_gelu_mlp`)."""
        return self._matmul(x, activation)

    def quantized_forward(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The layer on activations quantised already: E4M3 rows ``q`` [M, K] (row-major) with float32
        scales [M, 1] -> [M, N] in ``out_dtype`` (an fp8 block's LayerNorm quantises them:
        :mod:`vlmrm_fast.backends.fp8_block`)."""
        # torch < 2.5 types it as an (out, amax) pair; fp8 needs torch >= 2.6 (fp8_unsupported_reason)
        return cast(torch.Tensor, torch._scaled_mm(q, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                                                   bias=self.bias, out_dtype=self.out_dtype))

    def _matmul(self, x: torch.Tensor, activation: Activation) -> torch.Tensor:
        q, scale = _quantize(x.reshape(-1, self.in_features), activation)
        return self.quantized_forward(q, scale).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, out_dtype={self.out_dtype}"


QUANTIZE_ROWS = FastPath("the fp8 activations' quantisation kernel (vlmrm_fast/ops/quantize_rows.py)",
                         "torch's ops quantise")
"""The Triton quantisation of :func:`_quantize`, and whether it has failed in this process."""


def _quantize(rows: torch.Tensor, activation: Activation = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rows' (or their ``activation``'s) E4M3 values and scales: the Triton kernel where
    :func:`kernel_quantizes` (while :data:`QUANTIZE_ROWS` is on), else torch's ops (the same bytes; with an
    activation, bar where the two float32 erfs' or exps' last bits move a value across an E4M3 midpoint)."""
    if kernel_quantizes(rows):
        return QUANTIZE_ROWS.run(lambda: quantize_rows_triton(rows, activation=activation),
                                 lambda: quantize_rows_torch(rows, activation=activation))
    return quantize_rows_torch(rows, activation=activation)


def kernel_quantizes(rows: torch.Tensor) -> bool:
    """Whether the activation rows go through the Triton kernel (one pass; torch's ops take four): inside
    the "torch" backend's calls (:func:`~vlmrm_fast.ops._triton.tower_kernels`), outside ``torch.compile``
    and tracing (inductor fuses torch's ops itself), on a device Triton runs on, without autograd."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not tower_kernels_enabled():
        return False
    if type(rows) is not torch.Tensor or kernel_takes(rows) is not None or not triton_runs_on(rows.device):
        return False
    return not (torch.is_grad_enabled() and rows.requires_grad) and QUANTIZE_ROWS.takes_call()


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as uint8 (its last axis times its element size), which no dtype cast touches."""
    return tensor.contiguous().view(torch.uint8)


Projection = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.nn.Module]
"""Makes a projection module from a weight [N, K] and a bias [N] (or None)."""


class SelfAttention(torch.nn.Module):
    """An ``nn.MultiheadAttention``'s unmasked self-attention, with its two projections as the modules
    ``projection`` makes from its weights (:class:`Float8Linear` for fp8), attention through
    ``F.scaled_dot_product_attention``. Called as open_clip's blocks call the module it replaces:
    ``attn(x, x, x, need_weights=False, attn_mask=None)`` -> (out, None), tokens [B, L, E] (or [L, B, E]
    when the original was not ``batch_first``)."""

    def __init__(self, attention: torch.nn.MultiheadAttention, projection: Projection) -> None:
        super().__init__()
        if not is_plain_attention(attention):
            raise ValueError("only an nn.MultiheadAttention with one input projection, no bias_k/bias_v and no "
                             "add_zero_attn can be replaced.")
        self.heads = attention.num_heads
        self.head_dim = attention.embed_dim // attention.num_heads
        self.batch_first = attention.batch_first
        self.in_proj = projection(attention.in_proj_weight, attention.in_proj_bias)
        self.out_proj = projection(attention.out_proj.weight, attention.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        if key is not query or value is not query or key_padding_mask is not None or attn_mask is not None \
                or need_weights or is_causal or query.dim() != 3:
            raise ValueError("this attention was replaced for fp8 as unmasked self-attention over batched tokens "
                             "(attn(x, x, x, need_weights=False)); it cannot take other calls. Build the reward "
                             "without quantize='fp8' for this model.")
        x = query if self.batch_first else query.transpose(0, 1)
        out = self.out_proj(self.attend(self.in_proj(x), *x.shape[:2]))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def attend(self, qkv: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        """The attention of ``in_proj``'s output ``qkv`` ([batch * tokens, 3E] or [batch, tokens, 3E], the
        tokens batch-first) -> [batch, tokens, E], ``out_proj``'s input."""
        q, k, v = qkv.view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)


def is_plain_attention(module: object) -> bool:
    """An ``nn.MultiheadAttention`` that :class:`SelfAttention` computes alike (given plain calls)."""
    return (isinstance(module, torch.nn.MultiheadAttention) and module._qkv_same_embed_dim
            and module.bias_k is None and module.bias_v is None and not module.add_zero_attn)


def _fits_fp8(weight: torch.Tensor) -> bool:
    """Whether ``torch._scaled_mm`` takes this [N, K] weight: both sizes multiples of 16."""
    return weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0


def replace_projections(visual: torch.nn.Module, projection: Projection) -> int:
    """In ``visual.transformer``, replace each ``nn.Linear`` and each plain ``nn.MultiheadAttention``
    whose weights ``projection`` can take (sizes multiples of 16) by its ``projection`` form, in place;
    returns how many modules were replaced. Towers without a ``transformer`` (ResNets) are left alone."""
    transformer = getattr(visual, "transformer", None)
    if transformer is None:
        return 0
    swaps = []
    for parent in transformer.modules():
        if isinstance(parent, torch.nn.MultiheadAttention):
            continue  # its out_proj goes with the attention, below
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear) and _fits_fp8(child.weight):
                swaps.append((parent, name, projection(child.weight, child.bias)))
            elif is_plain_attention(child) and _fits_fp8(child.in_proj_weight) and _fits_fp8(child.out_proj.weight):
                swaps.append((parent, name, SelfAttention(child, projection)))
    for parent, name, module in swaps:
        setattr(parent, name, module.train(getattr(parent, name).training))  # new modules train by default
    return len(swaps)


def quantize_fp8(visual: torch.nn.Module, out_dtype: torch.dtype = torch.bfloat16) -> int:
    """Turn ``visual``'s transformer matmuls into :class:`Float8Linear` in place (their bf16 weights are
    freed); returns how many modules were replaced, or raises a :class:`~vlmrm_fast.backends.BackendError`
    where there is none (a ResNet or timm tower): fp8 asked for is never silently bf16. Call
    :func:`fp8_unsupported_reason` first."""
    count = replace_projections(visual, lambda weight, bias: Float8Linear(weight, bias, out_dtype))
    if count == 0 and is_fp8_quantised(visual):
        return 0  # quantised already (a second backend on the same tower)
    if count == 0:
        raise BackendError(f"quantize='fp8' found no transformer matmuls to quantise in this vision tower "
                           f"({type(visual).__name__}); drop quantize, or use a ViT.")
    return count


def is_fp8_quantised(visual: torch.nn.Module) -> bool:
    """Whether :func:`quantize_fp8` has turned any of ``visual``'s matmuls into :class:`Float8Linear`."""
    return any(isinstance(m, Float8Linear) for m in visual.modules())


TORCH_QUANTIZE_CHOICES = ("fp8",)


def check_torch_quantize(quantize: Optional[str], backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """A :class:`~vlmrm_fast.backends.BackendError` unless ``quantize`` is None, or "fp8" where it can run."""
    if quantize is None:
        return
    if quantize not in TORCH_QUANTIZE_CHOICES:
        also = "; int8 is the onnxruntime backend's, on CPU" if quantize == "int8" else ""
        raise BackendError(f"backend_options quantize={quantize!r} is not one of {TORCH_QUANTIZE_CHOICES} (or None) "
                           f"for backend={backend!r}{also}.")
    reason = fp8_unsupported_reason(device, dtype)
    if reason:
        raise BackendError(reason + ".")


def fp8_unsupported_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``quantize="fp8"`` cannot run on ``device`` with a tower in ``dtype``, or None."""
    if dtype != torch.bfloat16:
        return f"quantize='fp8' computes in bfloat16 around its fp8 matmuls; pass dtype=torch.bfloat16, not {dtype}"
    if device.type != "cuda":
        return ("quantize='fp8' runs on Hopper GPUs (CUDA, compute capability 9.x), not on "
                f"{device.type}; on CPU, backend='onnxruntime' with quantize='int8' is the lossy fast path")
    if torch.version.hip is not None:
        return "quantize='fp8' runs on NVIDIA Hopper GPUs, not ROCm (whose fp8 is float8_e4m3fnuz): use bfloat16"
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        return (f"quantize='fp8' needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (per-row scaled fp8 matmuls); this is "
                f"torch {torch.__version__}")
    cuda_major = int((torch.version.cuda or "0").split(".")[0])
    if cuda_major < MIN_CUDA:
        return (f"quantize='fp8' needs a torch build for CUDA >= {MIN_CUDA} (those for {torch.version.cuda} have no "
                "per-row fp8 matmul)")
    capability = torch.cuda.get_device_capability(device)
    if capability[0] != HOPPER:
        return (f"quantize='fp8' runs on Hopper GPUs (compute capability 9.x), where torch's per-row fp8 matmul "
                f"is built; {torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: use bfloat16")
    return None
