"""QuickGELU (vlmrm_fast/ops/quick_gelu.py) against a float64 reference written from its formula, and the
towers' QuickGELUs swapped for it (vlmrm_fast/backends/triton_quick_gelu.py).

Tolerances. The op computes ``x / (1 + e)`` (``x e / (1 + e)`` for negative x), ``e = exp(-|1.702 x|)``, in
float32 from inputs float32 holds exactly. exp's argument carries float32's rounding of the constant and
of the product, and a GPU's exp rounds once more as it scales its argument by log2(e) before its ex2
approximation: together about 2 * 1.702 |x| u of relative error in e (u = 2^-24; CUDA documents its fast
expf as 2 + 1.173 |x| ulp, the same thing), and so in the result. ex2 itself (2 ulp), the product, the
add and the (IEEE) division add at most 16 u. So in float32 each value is within (3.5 |x| + 16) u of the
exact one, relative (a constant off by 1e-4 is 13 times that off at x = 1); results below float32's normal
range, where that relative error grows, are held to 2^-126 absolute. In bf16 and fp16 that float32 value
is rounded once: each element within one unit in the last place (ulp) of the exact value (half of one,
plus float32's error, which near a midpoint may pick the other neighbour), and the largest error at most
twice PyTorch's own (open_clip's ``x * torch.sigmoid(1.702 * x)`` in the same dtype, rounding three times).
"""
import copy
import warnings

import open_clip.transformer
import pytest
import torch

from conftest import DEVICES, make_tiny
from reference import reference_reward
from test_layer_norm import ulp  # helpers only
from vlmrm_fast import CLIPReward
from vlmrm_fast.backends import triton_quick_gelu
from vlmrm_fast.backends.base import original_modules
from vlmrm_fast.backends.eager import adapt_tower
from vlmrm_fast.backends.triton_quick_gelu import TritonQuickGELU, is_quick_gelu, use_triton_quick_gelu
from vlmrm_fast.ops._triton import tower_kernels
from vlmrm_fast.ops.quick_gelu import BLOCK, quick_gelu

U = 2.0 ** -24
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 37, 97), (2, BLOCK + 3), (1,), (0, 13)]
QuickGELU = open_clip.transformer.QuickGELU


def reference_quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """float64: x * sigmoid(1.702 x)."""
    x = x.double().cpu()
    return x / (1 + torch.exp(-1.702 * x))


def _inputs(shape, dtype, seed):
    """Values over the activations' range (the MLP's hidden: a few units), some large and tiny ones, and zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    flat = x.view(-1)
    extremes = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 12.0, -12.0, 40.0, -40.0, -60.0, 65000.0, -65000.0])
    flat[: min(len(extremes), flat.numel())] = extremes[: flat.numel()]
    return x.to(dtype)


def float32_bound(x: torch.Tensor) -> torch.Tensor:
    """The float32 op's largest distance from :func:`reference_quick_gelu` (module docstring), float64."""
    x = x.double().cpu()
    return (3.5 * x.abs() + 16) * U * reference_quick_gelu(x).abs() + 2.0 ** -126


def assert_close_to_reference(got: torch.Tensor, x: torch.Tensor) -> None:
    want = reference_quick_gelu(x)
    error = (got.double().cpu() - want).abs()
    assert got.dtype == x.dtype and got.shape == x.shape and not got.isnan().any()
    if x.dtype == torch.float32 or x.numel() == 0:
        assert (error <= float32_bound(x)).all(), error.max()
        return
    assert (error <= ulp(want, x.dtype) + float32_bound(x)).all(), (error / ulp(want, x.dtype)).max()
    own = (QuickGELU()(x).double() - want).abs().max()
    assert error.max() <= 2 * own, (error.max(), own)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_within_its_error_bound_of_the_float64_reference(shape, dtype, device, impl):
    x = _inputs(shape, dtype, seed=sum(shape))
    assert_close_to_reference(quick_gelu(x.to(device), impl=impl), x)


@pytest.mark.parametrize("device", DEVICES)
def test_a_wrong_formula_fails_the_check(device):
    # What the bounds let through: not another constant (1.7, or 1.702 rounded to bf16), nor the exact GELU.
    x = _inputs((5, 301), torch.float32, seed=3)
    assert_close_to_reference(quick_gelu(x.to(device)), x)
    for wrong in (x * torch.sigmoid(1.7 * x), x * torch.sigmoid(torch.tensor(1.702).bfloat16().float() * x),
                  torch.nn.functional.gelu(x)):
        with pytest.raises(AssertionError):
            assert_close_to_reference(wrong, x)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input_is_copied(device):
    x = _inputs((40, 70), torch.bfloat16, seed=5).to(device)
    for view in (x.t(), x[::3, 1:]):
        got = quick_gelu(view)
        assert got.is_contiguous()
        assert_close_to_reference(got, view.cpu())


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        quick_gelu(torch.zeros(3, dtype=torch.int32))


# ---- the swap ----------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernel for every input size (the tests' inputs are smaller than the launch threshold); the
    shapes it was handed."""
    calls = []
    real = triton_quick_gelu.quick_gelu_triton
    monkeypatch.setattr(TritonQuickGELU, "min_elements", 0)
    monkeypatch.setattr(triton_quick_gelu, "quick_gelu_triton", lambda x: calls.append(tuple(x.shape)) or real(x))
    return calls


def quick_gelu_tiny():
    """The tiny model with open_clip's QuickGELU in its tower's MLPs (as for OpenAI's weights)."""
    model, tokenizer = make_tiny()
    for block in model.visual.transformer.resblocks:
        block.mlp.gelu = QuickGELU()
    return model, tokenizer


def test_the_module_runs_the_kernel_in_the_backends_calls_only(kernel_calls):
    fast, x = TritonQuickGELU.from_module(QuickGELU()), _inputs((3, 50, 64), torch.bfloat16, seed=1)
    with torch.inference_mode():
        assert torch.equal(fast(x), QuickGELU()(x))  # outside: open_clip's ops
        with tower_kernels():
            inside = fast(x)
            assert torch.equal(fast(x.transpose(0, 1)), QuickGELU()(x.transpose(0, 1)))  # not contiguous
            assert torch.equal(torch.compile(fast, backend="eager", fullgraph=True)(x), QuickGELU()(x))
    assert kernel_calls == [(3, 50, 64)]
    assert torch.equal(inside, quick_gelu(x))
    with tower_kernels():
        grad = x.float().requires_grad_()
        assert torch.equal(fast(grad), QuickGELU()(grad)) and fast(grad).requires_grad  # autograd: torch's
    assert len(kernel_calls) == 1


def test_small_inputs_run_open_clips_ops(kernel_calls, monkeypatch):
    x = _inputs((2, 8), torch.bfloat16, seed=2)
    monkeypatch.setattr(TritonQuickGELU, "min_elements", x.numel() + 1)
    with torch.inference_mode(), tower_kernels():
        assert torch.equal(TritonQuickGELU()(x), QuickGELU()(x))
    assert kernel_calls == []


def test_a_kernel_that_fails_is_turned_off_with_one_warning(kernel_calls, monkeypatch):
    def failing(x):
        kernel_calls.append(tuple(x.shape))
        raise RuntimeError("ptxas fatal: Unresolved extern function '__nv_expf'")

    monkeypatch.setattr(triton_quick_gelu, "quick_gelu_triton", failing)
    fast, x = TritonQuickGELU(), _inputs((4, 9), torch.bfloat16, seed=4)
    with torch.inference_mode(), tower_kernels():
        with pytest.warns(RuntimeWarning, match="QuickGELU kernel.*__nv_expf.*open_clip's ops run from now on"):
            assert torch.equal(fast(x), QuickGELU()(x))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(fast(x), QuickGELU()(x))
    assert kernel_calls == [(4, 9)]


def test_the_swap_keeps_hooks_and_gives_the_module_back():
    model, _ = quick_gelu_tiny()
    visual = model.visual
    seen = []
    visual.transformer.resblocks[0].mlp.gelu.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert use_triton_quick_gelu(visual) == 2 and use_triton_quick_gelu(visual) == 2  # again: nothing more
    assert all(type(b.mlp.gelu) is TritonQuickGELU for b in visual.transformer.resblocks)
    with torch.no_grad():
        visual(torch.zeros(1, 3, 224, 224))
    assert seen == [(1, 50, 256)]
    with original_modules(visual):
        assert all(type(b.mlp.gelu) is QuickGELU for b in visual.transformer.resblocks)
    assert not is_quick_gelu(TritonQuickGELU()) and not is_quick_gelu(torch.nn.GELU())
    with pytest.raises(ValueError, match="is not open_clip's QuickGELU"):
        TritonQuickGELU.from_module(torch.nn.GELU())


def test_the_torch_backend_swaps_with_its_kernels_only():
    for backend, kernels, swapped in (("torch", "triton", True), ("torch", "torch", False), ("compile", "torch", False)):
        visual = quick_gelu_tiny()[0].visual
        adapt_tower(visual, backend, torch.device("cpu"), torch.float32, None, kernels)
        kind = TritonQuickGELU if swapped else QuickGELU
        assert all(type(b.mlp.gelu) is kind for b in visual.transformer.resblocks), (backend, kernels)


@pytest.mark.parametrize("device", DEVICES)
def test_rewards_with_the_kernel_equal_the_float64_reference(device, kernel_calls):
    # fp32, within 1e-5 (the package's float32 bar) of the float64 reference (whose tower runs open_clip's
    # QuickGELU in float64; on CPU, where float32 matmuls are float32) and of the same reward with torch's
    # ops (on either device); the kernel ran on every block's hidden activations
    model, tokenizer = quick_gelu_tiny()
    frames = (torch.rand(3, 224, 224, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    goal, baseline = "a humanoid robot kneeling", "a humanoid robot"
    want = reference_reward(copy.deepcopy(model), tokenizer, frames, [goal], [baseline], 0.5)
    plain = CLIPReward(copy.deepcopy(model), tokenizer, goal=goal, baseline=baseline, alpha=0.5, device=device,
                       dtype=torch.float32, backend="torch", kernels="torch")
    rm = CLIPReward(model, tokenizer, goal=goal, baseline=baseline, alpha=0.5, device=device, dtype=torch.float32,
                    backend="torch", kernels="triton")
    got = rm(frames).double().cpu()
    assert kernel_calls == [(3, 50, 256)] * 2
    assert torch.allclose(got, plain(frames).double().cpu(), rtol=0, atol=1e-5)
    if device == "cpu":
        assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
