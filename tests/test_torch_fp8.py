"""fp8 (E4M3) matmuls for the "torch" and "compile" backends (vlmrm_fast/backends/torch_fp8.py).

Per-row scaled ``torch._scaled_mm`` runs on CPU in torch 2.14 and 2.15 (on Hopper GPUs, taken from 2.6); where it does
not, the tests that multiply skip. On CPU the backends refuse fp8 (it is for Hopper GPUs), so those
tests lift the device check and nothing else.

Tolerances:
- ``quantize_rows``: every value within half an E4M3 step of the input: 2^-4 relative for normal values
  (3 mantissa bits), 2^-10 of the row's scale below E4M3's smallest normal (2^-6 of the scale; subnormal
  steps are 2^-9 of it).
- ``Float8Linear`` against the float64 product of the very E4M3 values and scales it multiplies: only
  the bf16 rounding of each output (2^-9 relative) and float32 accumulation remain; held to 2^-8 of the
  largest output.
- ``SelfAttention`` with exact projections against ``nn.MultiheadAttention``, both float64: 1e-12, the
  same maths.
- The reward, as tests/test_fp8.py argues for fp8: at most twice PyTorch's own fp8 error against the
  float64 reference. PyTorch's own fp8 here is the same layers with their inputs rounded through E4M3,
  scaled per call from each tensor's largest value (one scale per tensor, what PyTorch's fp8 recipes
  do), the weights per output row, in plain bf16 PyTorch; ours scales activations per row.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, cuda_rowwise_scaled_mm, make_model, make_tiny
from reference import reference_reward
from vlmrm_fast import CLIPReward
from vlmrm_fast.backends import BackendError, fp8_block, torch_fp8
from vlmrm_fast.backends.torch_fp8 import Float8Linear, SelfAttention, fp8_unsupported_reason, replace_projections
from vlmrm_fast.ops.quantize_rows import E4M3_MAX
from vlmrm_fast.ops.quantize_rows import quantize_rows_torch as quantize_rows

GOAL, BASELINE, ALPHA = ["a humanoid robot kneeling", "kneeling"], ["a humanoid robot"], 0.5


def _cpu_scaled_mm_problem():
    try:
        torch._scaled_mm(torch.zeros(16, 16, dtype=torch.float8_e4m3fn), torch.zeros(16, 16, dtype=torch.float8_e4m3fn).t(),
                         scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except Exception as error:  # older torch: no CPU kernel, or per-tensor scales only
        return f"per-row scaled torch._scaled_mm does not run on CPU with torch {torch.__version__}: {str(error)[:80]}"
    return None


CPU_PROBLEM = _cpu_scaled_mm_problem()


def _usable(device: str) -> None:
    if device == "cpu" and CPU_PROBLEM:
        pytest.skip(CPU_PROBLEM)
    if device == "cuda":
        reason = fp8_unsupported_reason(torch.device("cuda"), torch.bfloat16)
        if reason:
            pytest.skip(reason)


def _fp8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x through E4M3 with ``scale`` (broadcastable), back in x's dtype."""
    return ((x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


class PerTensorFp8Linear(torch.nn.Module):
    """PyTorch's own fp8 of one projection: the input rounded through E4M3 with one scale from its own
    largest value per call, the weight with one per output row, then plain ``F.linear`` at the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias) -> None:
        super().__init__()
        w = weight.detach().float()
        self.register_buffer("weight", _fp8_round(w, w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / E4M3_MAX))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = _fp8_round(x, x.detach().abs().amax().float().clamp_min(1e-12) / E4M3_MAX)
        return F.linear(xq, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class ExactLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


# ---- the parts ---------------------------------------------------------------------------------


def test_quantize_rows_rounds_each_row_to_its_own_scale():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 80, dtype=torch.float64, generator=generator) * torch.logspace(-3, 3, 37, dtype=torch.float64)[:, None]
    x[5] = 0.0  # an all-zero row: scale must stay finite, values zero
    x[6, :3] = torch.tensor([1e-9, -2e-9, 5.0])  # values far below the row's smallest normal
    q, scale = quantize_rows(x.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (37, 1)
    xb = x.to(torch.bfloat16).double()
    back = q.double() * scale.double()
    assert torch.isfinite(back).all() and torch.equal(back[5], torch.zeros(80, dtype=torch.float64))
    nonzero = torch.arange(37) != 5
    assert torch.allclose(q.double().abs().amax(dim=1)[nonzero], torch.full((36,), E4M3_MAX, dtype=torch.float64))
    normal = xb.abs() >= 2.0 ** -6 * scale.double()
    error = (back - xb).abs()
    assert (error[normal] <= 2.0 ** -4 * xb.abs()[normal] * (1 + 1e-6)).all()
    assert (error[~normal] <= (2.0 ** -10 * scale.double()).expand_as(xb)[~normal] * (1 + 1e-6)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_float8_linear_multiplies_its_e4m3_values_exactly(device, bias):
    _usable(device)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(80, 48, generator=generator).to(device, torch.bfloat16)
    b = torch.randn(80, generator=generator).to(device, torch.bfloat16) if bias else None
    x = (torch.randn(3, 13, 48, generator=generator) * 4).to(device, torch.bfloat16)  # 39 rows: not a multiple of 16
    layer = Float8Linear(weight, b, torch.bfloat16)
    got = layer(x)
    assert got.shape == (3, 13, 80) and got.dtype == torch.bfloat16
    xq, xs = quantize_rows(x.reshape(-1, 48))
    want = (xq.double() * xs.double()) @ (layer.weight_fp8.double() * layer.weight_scale.double().t()).t()
    if bias:
        want = want + b.double()
    assert (got.reshape(-1, 80).double() - want).abs().max().item() <= 2.0 ** -8 * want.abs().max().item()
    # ... and those E4M3 values are the weight's, per output row
    w_back = layer.weight_fp8.double() * layer.weight_scale.double().t()
    assert ((w_back - weight.double()).abs() <= 2.0 ** -4 * weight.double().abs() + 2.0 ** -10 * layer.weight_scale.double().t()).all()


def test_float8_linear_refuses_sizes_scaled_mm_cannot_take():
    with pytest.raises(ValueError, match="multiples of 16"):
        Float8Linear(torch.zeros(40, 24), None, torch.bfloat16)


def test_fp8_matmuls_keep_to_what_cuda_takes(monkeypatch, fp8_on_cpu):
    # torch._scaled_mm on CPU takes what it refuses on CUDA (a row-major second matrix, float32 output or
    # bias), so the CPU tests above cannot see a layout the H200 would reject: here every fp8 matmul, the
    # reward's on the tiny tower, a layer with and one without bias and attention in [L, B, E] layout, goes
    # through CUDA's rules (tests/conftest.py), in float64.
    calls = []

    def scaled_mm(*args, **kwargs):
        calls.append(1)
        return cuda_rowwise_scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=ALPHA, device="cpu", dtype="bf16",
                    backend="torch", backend_options={"quantize": "fp8"})
    layers = sum(isinstance(m, Float8Linear) for m in rm.model.visual.modules())
    assert layers > 0 and torch.isfinite(rm(_frames(6, 2))).all() and len(calls) == layers
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 13, 48, generator=generator).to(torch.bfloat16)  # 39 rows: not a multiple of 16
    for bias in (torch.randn(80, generator=generator).to(torch.bfloat16), None):
        layer = Float8Linear(torch.randn(80, 48, generator=generator).to(torch.bfloat16), bias, torch.bfloat16)
        assert layer(x).shape == (3, 13, 80)
    mha = torch.nn.MultiheadAttention(48, 3, batch_first=False).to(torch.bfloat16).eval()
    attention = SelfAttention(mha, lambda weight, bias: Float8Linear(weight.detach(), bias, torch.bfloat16))
    out, _ = attention(x, x, x, need_weights=False)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_is_multihead_attention(batch_first):
    torch.manual_seed(2)
    mha = torch.nn.MultiheadAttention(48, 3, batch_first=batch_first).double().eval()
    torch.nn.init.normal_(mha.in_proj_bias)
    torch.nn.init.normal_(mha.out_proj.bias)
    ours = SelfAttention(mha, ExactLinear)
    x = torch.randn((2, 11, 48) if batch_first else (11, 2, 48), dtype=torch.float64)
    with torch.no_grad():
        want, _ = mha(x, x, x, need_weights=False)
        got, weights = ours(x, x, x, need_weights=False)
    assert weights is None and (got - want).abs().max().item() <= 1e-12
    y = x.clone()
    with pytest.raises(ValueError, match="unmasked self-attention"):
        ours(x, y, y, need_weights=False)  # not self-attention
    with pytest.raises(ValueError, match="unmasked self-attention"):
        ours(x, x, x, need_weights=False, attn_mask=torch.zeros(11, 11, dtype=torch.float64))


def test_replace_projections_takes_the_transformer_matmuls_only():
    model, _ = make_tiny()
    visual = model.visual
    blocks = len(visual.transformer.resblocks)
    count = replace_projections(visual, PerTensorFp8Linear)
    assert count == 3 * blocks  # per block: the attention (both projections), c_fc, c_proj
    for block in visual.transformer.resblocks:
        assert isinstance(block.attn, SelfAttention) and isinstance(block.attn.in_proj, PerTensorFp8Linear)
        assert isinstance(block.attn.out_proj, PerTensorFp8Linear)
        assert isinstance(block.mlp.c_fc, PerTensorFp8Linear) and isinstance(block.mlp.c_proj, PerTensorFp8Linear)
    assert isinstance(visual.conv1, torch.nn.Conv2d) and isinstance(visual.proj, torch.nn.Parameter)  # left in bf16
    assert replace_projections(torch.nn.Linear(16, 16), PerTensorFp8Linear) == 0  # no transformer: left alone


# ---- the reward ----------------------------------------------------------------------------------


def _frames(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 231, 199, 3), dtype=np.uint8)  # odd sizes: resized


def _torch_own_fp8_reward(model, tokenizer, frames) -> torch.Tensor:
    """PyTorch's own fp8 reward: the tower in bf16 with :class:`PerTensorFp8Linear` projections, the rest
    in float64 (tests/reference.py)."""
    quantized = copy.deepcopy(model)
    replace_projections(quantized.visual, PerTensorFp8Linear)
    return reference_reward(quantized, tokenizer, frames, GOAL, BASELINE, ALPHA, tower_dtype=torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", ["vlmrm-tiny", "ViT-B-32"])
def test_fp8_rewards_within_twice_pytorchs_own_fp8_error(device, model_name, fp8_on_cpu):
    _usable(device)
    model, tokenizer = make_model(model_name)
    frames = _frames(3, 16)  # the largest error of a few frames varies too much to compare two of them
    want = reference_reward(model, tokenizer, frames, GOAL, BASELINE, ALPHA)
    own_error = (_torch_own_fp8_reward(model, tokenizer, frames) - want).abs().max().item()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=ALPHA, device=device, dtype="bf16",
                    backend="torch", backend_options={"quantize": "fp8"})
    blocks = rm.model.visual.transformer.resblocks
    assert all(isinstance(b.mlp.c_fc, Float8Linear) and isinstance(b.attn.in_proj, Float8Linear) for b in blocks)
    error = (rm(frames).double().cpu() - want).abs().max().item()
    assert 0 < own_error and error <= 2 * own_error, (error, own_error)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_rewards_with_the_quantisation_kernel(device, fp8_on_cpu, monkeypatch):
    # kernels="triton" (the default on CUDA): every fp8 layer's activations through the Triton kernel
    # (interpreted here), whose bytes equal torch's ops' (tests/test_quantize_rows.py).
    _usable(device)
    model, tokenizer = make_tiny()
    frames = _frames(5, 16)
    want = reference_reward(model, tokenizer, frames, GOAL, BASELINE, ALPHA)
    own_error = (_torch_own_fp8_reward(model, tokenizer, frames) - want).abs().max().item()
    kernel_rows = []
    real, real_norm = torch_fp8.quantize_rows_triton, fp8_block.layer_norm_quantize_triton
    monkeypatch.setattr(torch_fp8, "quantize_rows_triton",
                        lambda x, activation=None: kernel_rows.append((x.shape[0], activation)) or real(x, activation=activation))
    monkeypatch.setattr(fp8_block, "layer_norm_quantize_triton", lambda x, *args, add=None: kernel_rows.append(
        ("LayerNorm", x.numel() // x.shape[-1], add is not None)) or real_norm(x, *args, add=add))
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=ALPHA, device=device, dtype="bf16",
                    backend="torch", kernels="triton", backend_options={"quantize": "fp8"})
    error = (rm(frames).double().cpu() - want).abs().max().item()
    blocks = len(rm.model.visual.transformer.resblocks)
    # In every block: ln_1 with in_proj's quantisation, out_proj's, ln_2 with the residual add before it
    # and c_fc's quantisation (backends/fp8_block.py), then c_proj's with the MLP's GELU (fp8_gelu_mlp.py).
    tokens = 16 * 50
    assert kernel_rows == [("LayerNorm", tokens, False), (tokens, None), ("LayerNorm", tokens, True), (tokens, "gelu")] * blocks
    assert 0 < own_error and error <= 2 * own_error, (error, own_error)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fp8_rewards_within_twice_pytorchs_own_fp8_error(device, fp8_on_cpu):
    _usable(device)
    model, tokenizer = make_tiny()
    frames = _frames(4, 16)
    want = reference_reward(model, tokenizer, frames, GOAL, BASELINE, ALPHA)
    own_error = (_torch_own_fp8_reward(model, tokenizer, frames) - want).abs().max().item()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=ALPHA, device=device, dtype="bf16",
                    backend="compile", backend_options={"quantize": "fp8", "buckets": (16,)})
    blocks = rm.model.visual.transformer.resblocks
    assert all(isinstance(b.mlp.c_fc, Float8Linear) and isinstance(b.attn.in_proj, Float8Linear) for b in blocks)
    error = (rm(frames).double().cpu() - want).abs().max().item()
    assert 0 < own_error and error <= 2 * own_error, (error, own_error)


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_fp8_refusals_name_the_fix(backend):
    model, tokenizer = make_tiny()
    cases = [
        (dict(device="cpu", dtype="bf16", backend_options={"quantize": "fp8"}), "Hopper.*onnxruntime.*int8"),
        (dict(device="cpu", dtype="fp32", backend_options={"quantize": "fp8"}), "pass dtype=torch.bfloat16"),
        (dict(device="cpu", dtype="bf16", backend_options={"quantize": "int8"}), "int8 is the onnxruntime backend's"),
        (dict(device="cpu", dtype="bf16", backend_options={"quantize": "fp4"}), r"not one of \('fp8',\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BackendError, match=message):
            CLIPReward(copy.deepcopy(model), tokenizer, goal=GOAL, backend=backend, **kwargs)
        with pytest.raises(BackendError, match=message):  # before any model is loaded
            CLIPReward.from_pretrained("no-such-model", None, goal=GOAL, backend=backend, **kwargs)


def test_fp8_needs_a_hopper_gpu_and_a_torch_that_has_its_kernel(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch_fp8.torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GPU")
    for capability in ((8, 6), (8, 9), (10, 0), (12, 0)):  # Ampere, Ada, Blackwell, RTX 50xx
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert f"NVIDIA GPU is {capability[0]}.{capability[1]}: use bfloat16" in fp8_unsupported_reason(cuda, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_unsupported_reason(cuda, torch.bfloat16) is None
    monkeypatch.setattr(torch.version, "cuda", "11.8")
    assert "CUDA >= 12" in fp8_unsupported_reason(cuda, torch.bfloat16)
    monkeypatch.setattr(torch_fp8.torch, "__version__", "2.5.1+cu124")
    assert "torch >= 2.6" in fp8_unsupported_reason(cuda, torch.bfloat16)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "not ROCm" in fp8_unsupported_reason(cuda, torch.bfloat16)


def test_fp8_on_a_tower_without_a_transformer_is_refused():
    tower = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.Flatten())
    with pytest.raises(BackendError, match="no transformer matmuls"):
        torch_fp8.quantize_fp8(tower)


def test_an_fp8_tower_is_not_exported():
    # The export would trace torch._scaled_mm, which has no ONNX form: refused, naming what to export.
    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.models import preprocess_spec_of

    model, _ = make_tiny()
    torch_fp8.quantize_fp8(model.visual)
    with pytest.raises(ValueError, match="quantised to fp8.*export the model as loaded"):
        export_onnx(model.visual, "unused.onnx", preprocess_spec_of(model, "vlmrm"), input_format="pixels")


def test_a_second_fp8_reward_on_the_same_model_leaves_the_first_as_it_was(fp8_on_cpu):
    # CLIPReward casts the tower it is given in place (Module.to(dtype) casts float8 buffers too): the
    # E4M3 weights and float32 scales quantised by the first reward must come through a second one whole.
    _usable("cpu")
    model, tokenizer = make_tiny()
    frames = _frames(5, 3)
    kwargs = dict(goal=GOAL, baseline=BASELINE, alpha=ALPHA, device="cpu", dtype="bf16", backend="torch",
                  backend_options={"quantize": "fp8"})
    first = CLIPReward(model, tokenizer, **kwargs)
    before = first(frames)
    layer = first.model.visual.transformer.resblocks[0].mlp.c_fc
    weights, scales = layer.weight_fp8.clone(), layer.weight_scale.clone()
    second = CLIPReward(model, tokenizer, **kwargs)
    model.visual.float().to(torch.bfloat16)  # what a user's casts do as well
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and torch.equal(layer.weight_fp8.view(torch.uint8),
                                                                         weights.view(torch.uint8))
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scales)
    assert torch.equal(first(frames), before) and torch.equal(second(frames), before)


@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_a_reward_without_fp8_on_a_tower_quantised_by_another_is_refused(backend):
    # The first reward quantised the shared tower in place: the second would score in fp8 unasked.
    model, tokenizer = make_tiny()
    torch_fp8.quantize_fp8(model.visual)
    with pytest.raises(BackendError, match="quantised to fp8, in place, by a reward made earlier.*Load the model again"):
        CLIPReward(model, tokenizer, goal=GOAL, device="cpu", dtype="bf16", backend=backend)
