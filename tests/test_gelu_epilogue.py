"""Each MLP's GELU in its first matmul's epilogue (vlmrm_fast/backends/gelu_epilogue.py) against a float64
MLP written from its formula, and the swap's bookkeeping.

On CPU the epilogue is played by ``conftest.cublaslt_gelu_addmm`` (cuBLASLt's arithmetic: float32 sum,
tanh GELU, one rounding), with the module's CUDA check lifted; the ``gpu`` tests run the real one.

Tolerances. The fused MLP differs from PyTorch's own bf16 MLP (``F.linear``, rounding, exact GELU,
rounding, ``F.linear``) in one rounding fewer and the tanh GELU, within 4.7e-4 of the exact one (half a
bf16 step where the output's magnitude is above 0.1; several of the finer steps of smaller outputs, which
the next matmul sums with the rest). So the MLP and the reward are held to twice PyTorch's own bf16 error
against the float64 reference (the package's bar for bf16), which a wrong bias, a lost GELU or an
exact-GELU mix-up of another activation exceeds many times over.
"""
import contextvars
import copy
import math
import warnings
from collections import OrderedDict

import numpy as np
import open_clip.transformer
import pytest
import torch

from conftest import DEVICES, EXPORTERS, cublaslt_gelu_addmm, make_model, make_tiny
from reference import reference_reward
from vlmrm_fast import CLIPReward
from vlmrm_fast.backends import gelu_epilogue
from vlmrm_fast.backends.base import original_modules
from vlmrm_fast.backends.engine_cache import weights_digest
from vlmrm_fast.backends.gelu_epilogue import GELUEpilogueMLP, is_fusable_mlp, use_gelu_epilogue
from vlmrm_fast.backends.triton_layer_norm import TritonLayerNorm
from vlmrm_fast.ops._triton import tower_kernels

GOAL, BASELINE, ALPHA = ["a humanoid robot kneeling", "kneeling"], ["a humanoid robot"], 0.5


@pytest.fixture
def epilogue_calls(monkeypatch):
    """On CPU: the epilogue's arithmetic in place of torch's op, the CUDA check lifted; on every device,
    a list of the shapes the fused path multiplied (how a test knows which path ran). The test runs as a
    "torch" backend's own call would (inside ``tower_kernels``, here with torch's LayerNorms), the only
    calls the epilogue runs in."""
    calls = []
    real = gelu_epilogue._addmm_activation
    device_check = gelu_epilogue._epilogue_device

    def recording(bias, mat1, mat2, **kwargs):
        calls.append(tuple(mat1.shape))
        return (real if mat1.is_cuda else cublaslt_gelu_addmm)(bias, mat1, mat2, **kwargs)

    monkeypatch.setattr(gelu_epilogue, "_addmm_activation", recording)
    monkeypatch.setattr(gelu_epilogue, "_epilogue_device", lambda device: device.type == "cpu" or device_check(device))
    with tower_kernels(False):
        yield calls


def mlp(width: int, hidden: int, act=torch.nn.GELU, seed: int = 0, ln: bool = False) -> torch.nn.Sequential:
    """An open_clip MLP (float64, CPU): c_fc, the activation, optionally a LayerNorm, c_proj."""
    torch.manual_seed(seed)
    layers = [("c_fc", torch.nn.Linear(width, hidden)), ("gelu", act())]
    if ln:
        layers.append(("ln", torch.nn.LayerNorm(hidden)))
    layers.append(("c_proj", torch.nn.Linear(hidden, width)))
    return torch.nn.Sequential(OrderedDict(layers)).double().eval()


def reference_mlp(x: torch.Tensor, module: torch.nn.Sequential) -> torch.Tensor:
    """float64, from the formula: c_proj(h * (1 + erf(h / sqrt 2)) / 2), h = c_fc(x) (no LayerNorm)."""
    x = x.double()
    fc, proj = module.c_fc, module.c_proj
    h = x @ fc.weight.double().T + fc.bias.double()
    return (h * (1 + torch.erf(h / math.sqrt(2))) / 2) @ proj.weight.double().T + proj.bias.double()


# (tokens shape, width, hidden): odd sizes, 2-D and 3-D inputs, and ViT-B-32's block
SHAPES = [((3, 37), 97, 389), ((5, 11, 33), 33, 131), ((2, 50), 768, 3072)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,width,hidden", SHAPES)
def test_within_twice_pytorchs_own_bf16_error(shape, width, hidden, device, epilogue_calls):
    exact = mlp(width, hidden)
    x = torch.randn(*shape, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = reference_mlp(x, exact)
    assert (exact(x) - want).abs().max().item() <= 1e-12 * want.abs().max().item()  # the formula is the module's
    low = copy.deepcopy(exact).to(device, torch.bfloat16)
    xb = x.to(device, torch.bfloat16)
    with torch.inference_mode():
        own_error = (low(xb).double().cpu() - want).abs().max().item()
        got = GELUEpilogueMLP.from_mlp(low)(xb)
    assert epilogue_calls == [(math.prod(shape), width)]
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    error = (got.double().cpu() - want).abs().max().item()
    assert 0 < own_error and error <= 2 * own_error, (error, own_error)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_epilogue_is_the_tanh_gelu_of_the_float32_sum():
    # What the CPU tests stand in for cuBLASLt: the real op against conftest's stand-in, within a bf16
    # step of the larger output (a fast tanh in the epilogue may differ where the outputs are tiny).
    gen = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*s, generator=gen).to("cuda", torch.bfloat16) for s in ((517, 768), (3072, 768), (3072,)))
    real = torch._addmm_activation(b, x, w.t(), use_gelu=True).double()
    stand_in = cublaslt_gelu_addmm(b, x, w.t(), use_gelu=True).double()
    assert (real - stand_in).abs().max().item() <= 2 ** -8 * stand_in.abs().max().item()
    exact = torch.nn.functional.gelu(x.double() @ w.double().T + b.double())
    assert (real - exact).abs().max().item() <= 2 ** -7 * exact.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", ["vlmrm-tiny", "ViT-B-32"])
def test_rewards_within_twice_pytorchs_own_bf16_error(model_name, device, epilogue_calls):
    model, tokenizer = make_model(model_name)
    frames = np.random.default_rng(3).integers(0, 256, (16, 231, 199, 3), dtype=np.uint8)
    want = reference_reward(model, tokenizer, frames, GOAL, BASELINE, ALPHA)
    own_error = (reference_reward(model, tokenizer, frames, GOAL, BASELINE, ALPHA, tower_dtype=torch.bfloat16)
                 - want).abs().max().item()
    blocks = len(model.visual.transformer.resblocks)
    if device == "cpu":  # the backend swaps them on CUDA only
        assert use_gelu_epilogue(model.visual) == blocks
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=ALPHA, device=device, dtype="bf16",
                    backend="torch")
    assert all(type(block.mlp) is GELUEpilogueMLP for block in rm.model.visual.transformer.resblocks)
    error = (rm(frames).double().cpu() - want).abs().max().item()
    assert epilogue_calls and len(epilogue_calls) % blocks == 0  # every block, in each call of the tower
    assert 0 < own_error and error <= 2 * own_error, (error, own_error)


def outside_any_backend_call(fn, *args):
    """``fn(*args)`` in a fresh context: as the user, another reward or an export calls a model."""
    return contextvars.Context().run(fn, *args)


@pytest.mark.parametrize("device", DEVICES)
def test_the_model_called_outside_the_backend_keeps_the_exact_gelu(device, epilogue_calls):
    # The backend swaps the MLPs of the model it is given; the user's own calls of that model (an
    # embedding to log, another reward built on it) must compute what they did before the swap.
    model, tokenizer = make_model("vlmrm-tiny")
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=ALPHA, device=device, dtype="bf16",
                    backend="torch")
    if device == "cpu":  # the backend swaps them on CUDA only
        use_gelu_epilogue(rm.model.visual)
    blocks = rm.model.visual.transformer.resblocks
    assert all(type(block.mlp) is GELUEpilogueMLP for block in blocks)
    unfused = copy.deepcopy(rm.model.visual)  # the same tower (on CUDA its patch matmul too), MLPs put back
    for block in unfused.transformer.resblocks:
        block.mlp = block.mlp.original()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5)).to(device, torch.bfloat16)
    with torch.inference_mode():
        rm.embed(np.zeros((2, 32, 32, 3), np.uint8))
        assert len(epilogue_calls) == len(blocks)  # the backend's own call fuses
        epilogue_calls.clear()
        got = outside_any_backend_call(rm.model.visual, pixels)
        want = unfused(pixels)
    assert epilogue_calls == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- when it runs, and when the replaced MLP does ---------------------------------------------------


def _swapped(**kwargs) -> GELUEpilogueMLP:
    return GELUEpilogueMLP.from_mlp(mlp(24, 40, **kwargs).to(torch.bfloat16))


def _x(dtype=torch.bfloat16, **kwargs) -> torch.Tensor:
    return torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(4), **kwargs).to(dtype)


def test_strided_and_empty_inputs(epilogue_calls):
    exact = mlp(24, 40)
    fused = GELUEpilogueMLP.from_mlp(copy.deepcopy(exact).to(torch.bfloat16))
    for x in (_x()[:, ::2], _x().transpose(0, 1)):
        want = reference_mlp(x, exact)
        with torch.inference_mode():
            own_error = (fused.original()(x).double() - want).abs().max().item()
            error = (fused(x).double() - want).abs().max().item()
        assert 0 < own_error and error <= 2 * own_error, (error, own_error)
    with torch.inference_mode():
        assert fused(_x()[:0]).shape == (0, 5, 24)
    assert epilogue_calls == [(9, 24), (15, 24), (0, 24)]


def test_other_precisions_run_the_replaced_mlp(epilogue_calls):
    for dtype in (torch.float32, torch.float16, torch.float64):
        fused = GELUEpilogueMLP.from_mlp(mlp(24, 40).to(dtype))
        with torch.inference_mode():
            assert torch.equal(fused(_x(dtype)), fused.original()(_x(dtype)))
    assert epilogue_calls == []
    fused = _swapped()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="dtype"):
        fused(_x(torch.float32))  # weights bf16, input float32: torch's own error, as without the swap
    assert epilogue_calls == []


def test_autograd_and_other_devices_run_the_replaced_mlp(epilogue_calls, monkeypatch):
    fused = _swapped()
    out = fused(_x())  # grad mode, weights that require grad: the epilogue has no backward here
    assert out.requires_grad and epilogue_calls == []
    monkeypatch.setattr(gelu_epilogue, "_epilogue_device", lambda device: device.type == "cuda")
    with torch.inference_mode():
        fused(_x())
    assert epilogue_calls == []
    fused.requires_grad_(False)
    with torch.no_grad():
        fused(_x())
    assert epilogue_calls == []  # still on the CPU


def test_an_epilogue_that_fails_is_turned_off_with_one_warning(epilogue_calls, monkeypatch):
    # No GPU has run it yet: a cuBLASLt status error must cost speed, not the run.
    def failing(bias, mat1, mat2, **kwargs):
        epilogue_calls.append(tuple(mat1.shape))
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")

    monkeypatch.setattr(gelu_epilogue, "_addmm_activation", failing)
    fused, other = _swapped(), _swapped(seed=1)
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="GELU epilogue.*CUBLAS_STATUS_NOT_SUPPORTED.*F.linear then F.gelu"):
            got = fused(_x())
        assert torch.equal(got, fused.original()(_x()))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(other(_x()), other.original()(_x()))  # every MLP, no second warning
    assert epilogue_calls == [(15, 24)]


def test_out_of_memory_is_raised_and_leaves_the_epilogue_on(epilogue_calls, monkeypatch):
    def out_of_memory(bias, mat1, mat2, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(gelu_epilogue, "_addmm_activation", out_of_memory)
    with torch.inference_mode(), pytest.raises(torch.cuda.OutOfMemoryError):
        _swapped()(_x())
    assert gelu_epilogue.GELU_EPILOGUE.on


def register_probe(layer: torch.nn.Module, where: str, seen: list):
    """A hook that appends ``where`` to ``seen``: a forward pre-hook on ``layer`` where ``where`` ends in
    "pre", a forward hook on every module for "every module", else a forward hook on ``layer``; its handle."""
    if where.endswith("pre"):
        return layer.register_forward_pre_hook(lambda module, args: seen.append(where))
    if where == "every module":
        return torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(where))
    return layer.register_forward_hook(lambda module, args, out: seen.append(where))


@pytest.mark.parametrize("where", ["c_fc", "gelu", "c_fc pre", "every module"])
def test_hooks_on_its_layers_run_the_replaced_mlp(where, epilogue_calls):
    # A probe of c_fc's or the GELU's output must see it: the fused call would skip their hooks.
    fused, seen = _swapped(), []
    handle = register_probe(fused.c_fc if where.startswith("c_fc") else fused.gelu, where, seen)
    try:
        with torch.inference_mode():
            fused(_x())
    finally:
        handle.remove()
    assert seen and epilogue_calls == []
    with torch.inference_mode():
        fused(_x())
    assert epilogue_calls == [(15, 24)]  # the hook removed: fused again


def test_a_torch_without_the_op_runs_the_replaced_mlp(epilogue_calls, monkeypatch):
    monkeypatch.setattr(gelu_epilogue, "_addmm_activation", None)
    fused = _swapped()
    with torch.inference_mode():
        assert torch.equal(fused(_x()), fused.original()(_x()))


def test_compile_and_tracing_see_the_replaced_mlp(epilogue_calls):
    fused = _swapped()
    with torch.inference_mode():
        want = fused.original()(_x())
        got = torch.compile(fused, backend="eager", fullgraph=True)(_x())  # no graph break either
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation (torch >= 2.9)
            traced = torch.jit.trace(fused, _x(), check_trace=False)
    assert epilogue_calls == [] and torch.equal(got, want)
    assert "addmm_activation" not in str(traced.graph)


def test_an_fp8_c_fc_runs_the_replaced_mlp(epilogue_calls):
    # A later reward with quantize="fp8" replaces c_fc inside the fused MLP, in place.
    fused = _swapped()
    fused.c_fc = torch.nn.Identity()
    fused.c_proj = torch.nn.Linear(24, 24).to(torch.bfloat16)
    with torch.inference_mode():
        fused(_x())
    assert epilogue_calls == []


def test_an_mlp_with_a_layer_norm_after_the_gelu(epilogue_calls):
    # open_clip's scale_fc blocks: c_fc, gelu, ln, c_proj; the rest runs after the epilogue, in order.
    exact = mlp(24, 40, ln=True)
    low = copy.deepcopy(exact).to(torch.bfloat16)
    with torch.inference_mode():
        got = GELUEpilogueMLP.from_mlp(low)(_x())
        want = exact(_x().double())
        own_error = (low(_x()).double() - want).abs().max().item()
    assert epilogue_calls == [(15, 24)]
    assert (got.double() - want).abs().max().item() <= 2 * own_error


@pytest.mark.parametrize("act", [open_clip.transformer.QuickGELU, torch.nn.ReLU, torch.nn.SiLU,
                                 lambda: torch.nn.GELU(approximate="tanh")], ids=["quickgelu", "relu", "silu", "tanh"])
def test_only_gelu_mlps_are_fused(act):
    module = mlp(8, 16, act=act)
    fusable = isinstance(module.gelu, torch.nn.GELU)
    assert is_fusable_mlp(module) == fusable
    holder = torch.nn.Module()
    holder.mlp = module
    assert use_gelu_epilogue(holder) == int(fusable)
    assert (type(holder.mlp) is GELUEpilogueMLP) == fusable
    if not fusable:
        with pytest.raises(ValueError, match="not an MLP of c_fc"):
            GELUEpilogueMLP.from_mlp(module)


def test_other_sequentials_are_left_alone():
    no_bias = mlp(8, 16)
    no_bias.c_fc = torch.nn.Linear(8, 16, bias=False)
    other_names = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    module = mlp(8, 16)
    gelu_first = torch.nn.Sequential(OrderedDict([("gelu", module.gelu), ("c_fc", module.c_fc), ("c_proj", module.c_proj)]))
    subclass = type("MyMLP", (torch.nn.Sequential,), {})(OrderedDict(mlp(8, 16)._modules))
    for module in (no_bias, other_names, gelu_first, subclass, torch.nn.Linear(8, 8)):
        assert not is_fusable_mlp(module)


# ---- the swap ----------------------------------------------------------------------------------------


def test_the_swap_shares_the_layers_keys_and_hooks():
    model, _ = make_tiny()
    visual = model.visual.eval()
    keys = list(visual.state_dict())
    first = visual.transformer.resblocks[0].mlp
    seen = []
    handle = first.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    digest = weights_digest(visual)
    assert use_gelu_epilogue(visual) == 2 and use_gelu_epilogue(visual) == 2  # a second call: unchanged
    swapped = visual.transformer.resblocks[0].mlp
    assert type(swapped) is GELUEpilogueMLP and swapped.c_fc is first.c_fc and swapped.c_proj is first.c_proj
    assert list(visual.state_dict()) == keys and weights_digest(visual) == digest
    with torch.inference_mode():
        visual(torch.zeros(1, 3, 224, 224))
    assert seen == [(1, 50, 64)]
    handle.remove()
    with torch.inference_mode():
        visual(torch.zeros(1, 3, 224, 224))
    assert len(seen) == 1


def test_original_modules_puts_back_a_layer_norm_inside_it():
    # A swapped LayerNorm inside a swapped MLP: the inner one is put back first, so the MLP's original
    # holds the original LayerNorm; both are swapped again afterwards.
    holder = torch.nn.Module()
    holder.mlp = GELUEpilogueMLP.from_mlp(mlp(8, 16, ln=True).float())
    holder.mlp.ln = TritonLayerNorm.from_layer_norm(holder.mlp.ln)
    fused, norm = holder.mlp, holder.mlp.ln
    with original_modules(holder):
        assert type(holder.mlp) is torch.nn.Sequential and type(holder.mlp.ln) is torch.nn.LayerNorm
    assert holder.mlp is fused and holder.mlp.ln is norm


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_an_export_writes_the_replaced_mlp(tmp_path, exporter):
    onnx = pytest.importorskip("onnx", reason="needs onnx (pip install 'vlmrm-fast[export]')")
    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.models import preprocess_spec_of

    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    plain = export_onnx(copy.deepcopy(model.visual).eval(), tmp_path / "plain.onnx", spec, exporter=exporter)
    use_gelu_epilogue(model.visual)
    fused = export_onnx(model.visual.eval(), tmp_path / "fused.onnx", spec, exporter=exporter)
    ops = [[node.op_type for node in onnx.load(str(path)).graph.node] for path in (plain, fused)]
    assert ops[0] == ops[1]
    assert type(model.visual.transformer.resblocks[0].mlp) is GELUEpilogueMLP  # put back after the export


# (backend, dtype, swapped on CUDA): "compile" leaves the GELU to inductor; fp16 and fp32 keep the exact GELU
BACKEND_CASES = [("torch", torch.bfloat16, True), ("torch", torch.float16, False), ("torch", torch.float32, False),
                 ("compile", torch.bfloat16, False)]


@pytest.mark.parametrize("device", DEVICES)
def test_the_torch_backend_uses_it_on_cuda_in_bf16_only(device):
    from vlmrm_fast.backends import build_backend
    from vlmrm_fast.models import preprocess_spec_of

    for backend, dtype, on_cuda in BACKEND_CASES:
        model = make_tiny()[0]
        build_backend(backend, model.visual.to(device, dtype), preprocess_spec_of(model, "vlmrm"), torch.device(device),
                      dtype, max_batch_size=4)
        kind = GELUEpilogueMLP if on_cuda and device == "cuda" else torch.nn.Sequential
        assert all(type(block.mlp) is kind for block in model.visual.transformer.resblocks), (backend, dtype)


def test_the_torch_backend_chooses_it_for_cuda_on_a_machine_without_one():
    # The test above skips its CUDA half without a GPU: adapt_tower only swaps modules, so what it
    # chooses for CUDA can be checked anywhere.
    from vlmrm_fast.backends.eager import adapt_tower

    for device in (torch.device("cuda", 0), torch.device("cpu")):
        for backend, dtype, on_cuda in BACKEND_CASES:
            visual = make_tiny()[0].visual
            adapt_tower(visual, backend, device, dtype, None)
            kind = GELUEpilogueMLP if on_cuda and device.type == "cuda" else torch.nn.Sequential
            assert all(type(block.mlp) is kind for block in visual.transformer.resblocks), (device, backend, dtype)
