"""Each fp8 MLP's GELU (or QuickGELU) in its second matmul's input quantisation (vlmrm_fast/backends/fp8_gelu_mlp.py)
against a float64 MLP written from its formula, which path runs where, and the swap's bookkeeping.

The quantisation with the activation (``quantize_rows(..., activation=...)``) is held to its float64 reference in
tests/test_quantize_rows.py; here the MLP is. Tolerance, as tests/test_torch_fp8.py argues for fp8: twice
PyTorch's own fp8 error against the float64 MLP (PyTorch's own: both matmuls' inputs rounded through E4M3
with one scale a tensor, the weights one a row, the activation between them in bf16). The fused MLP
quantises per row, and its GELU without rounding to bf16 first: no less accurate. A lost, doubled or
approximate GELU, or the wrong scale, is off by far more.
"""
import copy
import math
import warnings

import open_clip.transformer
import pytest
import torch

from conftest import DEVICES, make_tiny
from test_gelu_epilogue import mlp, reference_mlp, register_probe  # helpers only
from test_torch_fp8 import CPU_PROBLEM, PerTensorFp8Linear, _usable  # helpers only
from vlmrm_fast.backends import torch_fp8
from vlmrm_fast.backends.base import original_modules
from vlmrm_fast.backends.eager import adapt_tower
from vlmrm_fast.backends.fp8_gelu_mlp import Float8GELUMLP, is_fusable_fp8_mlp, use_fp8_gelu_fusion
from vlmrm_fast.backends.gelu_epilogue import GELUEpilogueMLP
from vlmrm_fast.backends.torch_fp8 import Float8Linear, quantize_fp8
from vlmrm_fast.backends.triton_quick_gelu import TritonQuickGELU
from vlmrm_fast.ops._triton import tower_kernels
from vlmrm_fast.ops.quantize_rows import quantize_rows_torch

cpu_fp8 = pytest.mark.skipif(CPU_PROBLEM is not None, reason=str(CPU_PROBLEM))
"""For the tests that multiply in fp8 on the CPU (torch 2.14+)."""


@pytest.fixture
def kernel_calls(monkeypatch):
    """The (rows, activation) of every quantisation the fp8 layers hand the Triton kernel (interpreted on CPU):
    how a test knows which path ran."""
    calls = []
    real = torch_fp8.quantize_rows_triton

    def recording(rows, activation=None):
        calls.append((rows.shape[0], activation))
        return real(rows, activation=activation)

    monkeypatch.setattr(torch_fp8, "quantize_rows_triton", recording)
    return calls


def with_projections(module: torch.nn.Sequential, projection, device="cpu") -> torch.nn.Sequential:
    """A bf16 copy of ``module`` on ``device`` with ``c_fc`` and ``c_proj`` made by ``projection`` (weight, bias)."""
    low = copy.deepcopy(module).to(device, torch.bfloat16)
    low.c_fc = projection(low.c_fc.weight, low.c_fc.bias)
    low.c_proj = projection(low.c_proj.weight, low.c_proj.bias)
    return low


def fp8_mlp(width: int = 32, hidden: int = 48, device="cpu", **kwargs) -> torch.nn.Sequential:
    return with_projections(mlp(width, hidden, **kwargs), lambda w, b: Float8Linear(w, b, torch.bfloat16), device)


def _x(width: int = 32, shape=(3, 5), device="cpu", seed: int = 4) -> torch.Tensor:
    return torch.randn(*shape, width, generator=torch.Generator().manual_seed(seed)).to(device, torch.bfloat16)


# (tokens shape, width, hidden): sizes multiples of 16 (fp8 matmuls), odd token counts, ViT-B-32's block
SHAPES = [((3, 37), 48, 208), ((5, 11), 32, 144), ((2, 50), 768, 3072)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,width,hidden", SHAPES)
def test_within_twice_pytorchs_own_fp8_error(shape, width, hidden, device, kernel_calls):
    _usable(device)
    exact = mlp(width, hidden)
    x = _x(width, shape, seed=1)
    want = reference_mlp(x, exact)
    with torch.inference_mode():
        own_error = (with_projections(exact, PerTensorFp8Linear, device)(x.to(device)).double().cpu() - want).abs().max()
        fused = Float8GELUMLP.from_mlp(fp8_mlp(width, hidden, device))
        with tower_kernels():
            got = fused(x.to(device))
    rows = math.prod(shape)
    assert kernel_calls == [(rows, None), (rows, "gelu")]  # c_fc's input; c_proj's, the GELU in the kernel
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    error = (got.double().cpu() - want).abs().max().item()
    assert 0 < own_error.item() and error <= 2 * own_error.item(), (error, own_error.item())


def reference_quick_gelu_mlp(x: torch.Tensor, module: torch.nn.Sequential) -> torch.Tensor:
    """float64, from the formula: c_proj(h / (1 + exp(-1.702 h))), h = c_fc(x)."""
    x = x.double()
    fc, proj = module.c_fc, module.c_proj
    h = x @ fc.weight.double().T + fc.bias.double()
    return (h / (1 + torch.exp(-1.702 * h))) @ proj.weight.double().T + proj.bias.double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", [open_clip.transformer.QuickGELU, TritonQuickGELU], ids=["open_clip", "swapped"])
def test_quick_gelu_within_twice_pytorchs_own_fp8_error(act, device, kernel_calls):
    # OpenAI's towers' QuickGELU in the quantisation kernel (as open_clip's module, or the torch backend's
    # swap for it), against a float64 MLP; PyTorch's own: open_clip's QuickGELU in bf16 between the two.
    _usable(device)
    exact = mlp(48, 208, act=open_clip.transformer.QuickGELU)
    x = _x(48, (3, 37), seed=1)
    want = reference_quick_gelu_mlp(x, exact)
    with torch.inference_mode():
        own_error = (with_projections(exact, PerTensorFp8Linear, device)(x.to(device)).double().cpu() - want).abs().max()
        fused = Float8GELUMLP.from_mlp(fp8_mlp(48, 208, device, act=act))
        with tower_kernels():
            got = fused(x.to(device))
    assert kernel_calls == [(111, None), (111, "quick_gelu")]
    error = (got.double().cpu() - want).abs().max().item()
    assert 0 < own_error.item() and error <= 2 * own_error.item(), (error, own_error.item())


def assert_the_replaced_module_runs_outside_and_compiled(fused: torch.nn.Module, x: torch.Tensor, kernel_calls) -> None:
    """Outside the backend's calls, and under ``torch.compile`` inside them (inductor fuses these ops itself;
    dynamo must see the replaced module's ops, with no graph break), a swapped module computes as the one
    it replaced, and hands no kernel anything."""
    with torch.inference_mode():
        assert torch.equal(fused(x), fused.original()(x))
        with tower_kernels(False):
            assert torch.equal(fused(x), fused.original()(x))
        with tower_kernels():
            got = torch.compile(fused, backend="eager", fullgraph=True)(x)
        assert torch.equal(got, fused.original()(x))
    assert kernel_calls == []


@cpu_fp8
def test_outside_the_backends_calls_and_compiled_it_is_the_replaced_mlp(kernel_calls):
    assert_the_replaced_module_runs_outside_and_compiled(Float8GELUMLP.from_mlp(fp8_mlp()), _x(), kernel_calls)


@cpu_fp8
@pytest.mark.parametrize("where", ["gelu", "c_proj", "c_proj pre", "every module"])
def test_hooks_on_the_gelu_or_c_proj_run_the_replaced_mlp(where, kernel_calls):
    # A probe of the GELU's output or c_proj's input must see it: the fused call would skip their hooks.
    fused, seen = Float8GELUMLP.from_mlp(fp8_mlp()), []
    handle = register_probe(fused.gelu if where == "gelu" else fused.c_proj, where, seen)
    try:
        with torch.inference_mode(), tower_kernels():
            fused(_x())
    finally:
        handle.remove()
    assert seen and kernel_calls == [(15, None), (15, None)]
    with torch.inference_mode(), tower_kernels():
        fused(_x())
    assert kernel_calls[2:] == [(15, None), (15, "gelu")]  # the hook removed: fused again


@cpu_fp8
def test_a_hook_on_c_fc_fires_and_the_gelu_stays_fused(kernel_calls):
    fused, seen = Float8GELUMLP.from_mlp(fp8_mlp()), []
    fused.c_fc.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.inference_mode(), tower_kernels():
        fused(_x())
    assert seen == [(3, 5, 48)] and kernel_calls == [(15, None), (15, "gelu")]


@cpu_fp8
def test_changed_children_run_the_replaced_mlp(kernel_calls):
    # A user's edit of the swapped MLP: what it holds now is what runs, unfused.
    for change in ("tanh", "bf16 c_proj"):
        fused = Float8GELUMLP.from_mlp(fp8_mlp())
        if change == "tanh":
            fused.gelu = torch.nn.GELU(approximate="tanh")
        else:
            fused.c_proj = torch.nn.Linear(48, 32).to(torch.bfloat16)
        with torch.inference_mode(), tower_kernels():
            assert torch.equal(fused(_x()), fused.original()(_x()))
        assert all(activation is None for _, activation in kernel_calls), change


@cpu_fp8
def test_a_kernel_that_fails_is_turned_off_with_one_warning(kernel_calls, monkeypatch):
    # No GPU has run it: a build or launch error costs speed, not the run. torch's ops then quantise the
    # GELU, still without rounding it to bf16.
    def failing(rows, activation=None):
        kernel_calls.append((rows.shape[0], activation))
        raise RuntimeError("ptxas fatal: Unresolved extern function '__nv_erff'")

    fused = Float8GELUMLP.from_mlp(fp8_mlp())
    with torch.inference_mode(), tower_kernels():
        hidden = fused.c_fc(_x())  # the kernel's c_fc, before it fails
        monkeypatch.setattr(torch_fp8, "quantize_rows_triton", failing)
        with pytest.warns(RuntimeWarning, match="quantisation kernel.*__nv_erff.*torch's ops quantise from now on"):
            got = fused.c_proj.activated_forward(hidden, "gelu")
        q, scale = quantize_rows_torch(hidden.reshape(-1, 48), activation="gelu")
        proj = fused.c_proj
        want = torch._scaled_mm(q, proj.weight_fp8.t(), scale_a=scale, scale_b=proj.weight_scale, bias=proj.bias,
                                out_dtype=torch.bfloat16)
        assert torch.equal(got.reshape(-1, 32), want)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(fused(_x()), fused.original()(_x()))  # unfused, torch's ops, no second warning
    assert kernel_calls == [(15, None), (15, "gelu")]


# ---- the swap ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", [torch.nn.ReLU, lambda: torch.nn.GELU(approximate="tanh")])
def test_only_exact_gelu_or_quick_gelu_mlps_with_fp8_c_proj_are_fused(act):
    assert is_fusable_fp8_mlp(fp8_mlp())
    assert is_fusable_fp8_mlp(fp8_mlp(act=open_clip.transformer.QuickGELU))
    assert is_fusable_fp8_mlp(fp8_mlp(act=TritonQuickGELU))  # the torch backend's swap for QuickGELU
    assert not is_fusable_fp8_mlp(fp8_mlp(act=act))
    assert not is_fusable_fp8_mlp(fp8_mlp(act=type("MyQuickGELU", (open_clip.transformer.QuickGELU,), {})))  # may differ
    assert not is_fusable_fp8_mlp(fp8_mlp(ln=True))  # open_clip's scale_fc: a LayerNorm after the GELU
    assert not is_fusable_fp8_mlp(mlp(32, 48).to(torch.bfloat16))  # not fp8
    with pytest.raises(ValueError, match="exact nn.GELU or QuickGELU, then a Float8Linear c_proj"):
        Float8GELUMLP.from_mlp(mlp(32, 48))


def test_the_swap_shares_the_layers_and_keys():
    model, _ = make_tiny()
    visual = model.visual.to(torch.bfloat16).eval()
    quantize_fp8(visual)
    keys = list(visual.state_dict())
    first = visual.transformer.resblocks[0].mlp
    assert use_fp8_gelu_fusion(visual) == 2 and use_fp8_gelu_fusion(visual) == 2  # a second call: unchanged
    swapped = visual.transformer.resblocks[0].mlp
    assert type(swapped) is Float8GELUMLP and swapped.c_fc is first.c_fc and swapped.c_proj is first.c_proj
    assert list(visual.state_dict()) == keys
    with original_modules(visual):
        assert type(visual.transformer.resblocks[0].mlp) is torch.nn.Sequential
    assert visual.transformer.resblocks[0].mlp is swapped


def test_an_mlp_a_bf16_reward_swapped_first_is_fused_too():
    # A bf16 reward on CUDA swapped the MLP for its GELU epilogue; an fp8 reward on the same model then
    # quantised its layers in place: the epilogue steps aside for them, the fp8 MLP takes over.
    epilogue = GELUEpilogueMLP.from_mlp(mlp(32, 48).to(torch.bfloat16))
    for name in ("c_fc", "c_proj"):  # what quantize_fp8 does in place
        layer = getattr(epilogue, name)
        setattr(epilogue, name, Float8Linear(layer.weight, layer.bias, torch.bfloat16))
    holder = torch.nn.Module()
    holder.mlp = epilogue
    assert is_fusable_fp8_mlp(epilogue) and use_fp8_gelu_fusion(holder) == 1
    assert type(holder.mlp) is Float8GELUMLP and holder.mlp.c_proj is epilogue.c_proj
    with original_modules(holder):
        assert type(holder.mlp) is torch.nn.Sequential


def test_the_torch_backend_fuses_with_its_kernels_only(fp8_on_cpu):
    for backend, kernels, fused in (("torch", "triton", True), ("torch", "torch", False), ("compile", "torch", False)):
        visual = make_tiny()[0].visual.to(torch.bfloat16)
        adapt_tower(visual, backend, torch.device("cpu"), torch.bfloat16, "fp8", kernels)
        kind = Float8GELUMLP if fused else torch.nn.Sequential
        assert all(type(block.mlp) is kind for block in visual.transformer.resblocks), (backend, kernels)
