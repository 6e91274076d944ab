"""The LayerNorm op (vlmrm_fast/ops/layer_norm.py) against a float64 LayerNorm written from its formula, and
the tower's LayerNorms swapped for it (vlmrm_fast/backends/triton_layer_norm.py).

Tolerances. Both paths compute in float32 from inputs that float32 holds exactly, so in float32 the error
is float32 rounding over the row's sums (mean, variance: about sqrt(D) * 6e-8 relative for D <= 2049) and
a few operations per element: the bound is 1e-5 relative to the output (the package's float32 bar), where
a wrong term (biased variance, eps outside the root, a lost bias) costs 1e-3 or more. In bf16 and fp16 the
float32 result is rounded once to the output type, as PyTorch's own ``F.layer_norm`` rounds it: each
element is within half a unit in the last place (ulp) of the exact value, plus float32's error; where
the exact value lies within that error of a midpoint between two neighbours, the other neighbour may be
chosen, so each element is held to one ulp, and the largest error to twice PyTorch's own largest
error against the float64 reference (it is nearly always equal to it).
"""
import copy
import warnings

import open_clip.transformer
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import DEVICES, EXPORTERS, make_tiny
from vlmrm_fast import CLIPReward
from vlmrm_fast.backends.triton_layer_norm import LAYER_NORM, TritonLayerNorm, is_replaceable, use_triton_layer_norm
from vlmrm_fast.ops._triton import tower_kernels
from vlmrm_fast.ops.layer_norm import MAX_WIDTH, launch_config, layer_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 37, 97), (5, 768), (2, 7, 1664), (1, 1), (4, 3), (0, 13), (2, 2049)]


def reference_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """float64: (x - mean) / sqrt(var + eps) * weight + bias over the last dimension, var the biased variance."""
    x = x.double()
    mean = x.sum(dim=-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(dim=-1, keepdim=True) / x.shape[-1]
    return (x - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


def _inputs(shape, dtype, seed=0, weight_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    width = shape[-1]
    x = (torch.randn(shape, generator=gen) * 3 + 1.5).to(dtype)  # an offset mean, as residual streams have
    weight = (torch.randn(width, generator=gen) + 1).to(weight_dtype or dtype)
    bias = torch.randn(width, generator=gen).to(weight_dtype or dtype)
    return x, weight, bias


MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at ``values`` (float64; the smallest normal spacing near zero)."""
    exponent = torch.floor(torch.log2(values.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def assert_close_to_reference(got, x, weight, bias, eps, dtype):
    want = reference_layer_norm(x, weight, bias, eps)
    assert got.dtype == x.dtype and got.shape == x.shape
    if got.numel() == 0:
        return
    error = (got.cpu().double() - want).abs()
    if dtype == torch.float32:
        assert (error <= 1e-5 * (1 + want.abs())).all(), error.max().item()
        return
    assert (error <= ulp(want, dtype) * (1 + 1e-5) + 1e-6).all(), error.max().item()
    torch_error = (F.layer_norm(x, x.shape[-1:], weight.to(dtype), bias.to(dtype), eps).double() - want).abs().max()
    assert error.max() <= 2 * torch_error, (error.max().item(), torch_error.item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_float64_formula(device, impl, dtype, shape):
    x, weight, bias = _inputs(shape, dtype)
    got = layer_norm(x.to(device), weight.to(device), bias.to(device), 1e-5, impl=impl)
    assert got.device.type == device
    assert_close_to_reference(got, x, weight, bias, 1e-5, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_large_eps_and_constant_rows(device):
    # eps inside the root matters where the variance is small; a constant row is the bias exactly.
    x, weight, bias = _inputs((6, 45), torch.float32, seed=3)
    x = x * 1e-3
    x[2] = 7.0
    got = layer_norm(x.to(device), weight.to(device), bias.to(device), 0.5)
    assert_close_to_reference(got, x, weight, bias, 0.5, torch.float32)
    assert torch.equal(got[2].cpu(), bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [30.0, -30.0])
def test_rows_far_from_zero_lose_nothing_to_cancellation(device, impl, dtype, offset):
    # A residual stream's channels can sit far from zero. The variance as mean(x^2) - mean^2 (one pass over
    # the row) cancels there: 4e-4 off at an offset of 30 in float32, where the centred sum is 6e-6 off,
    # within the bounds above; the rows of _inputs (mean 1.5) could not tell the two apart.
    x, weight, bias = _inputs((5, 769), dtype, seed=6)
    x = (x.float() + offset).to(dtype)
    got = layer_norm(x.to(device), weight.to(device), bias.to(device), 1e-5, impl=impl)
    assert_close_to_reference(got, x, weight, bias, 1e-5, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_weight_dtype(device):
    # bf16 activations with float32 parameters (a tower kept in float32 LayerNorms): computed in float32.
    x, weight, bias = _inputs((9, 130), torch.bfloat16, seed=4, weight_dtype=torch.float32)
    got = layer_norm(x.to(device), weight.to(device), bias.to(device), 1e-6)
    want = reference_layer_norm(x, weight, bias, 1e-6)
    assert got.dtype == torch.bfloat16
    assert ((got.cpu().double() - want).abs() <= ulp(want, torch.bfloat16) * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["pooled-token", "row-slice", "transposed", "column-major"])
def test_strided_inputs(device, view):
    # Views the tower makes (the class token of [N, L, D] has a row stride of L * D), and ones whose rows
    # are not evenly spaced (transposed) or not contiguous (column-major), which are copied first.
    base, weight, bias = _inputs((4, 11, 57), torch.float32, seed=5)
    x = {"pooled-token": base[:, 0], "row-slice": base[:, 2:9:3], "transposed": base.transpose(0, 1),
         "column-major": base[:, 0].t().contiguous().t()}[view]
    got = layer_norm(x.to(device), weight.to(device), bias.to(device), 1e-5)
    assert got.is_contiguous()
    assert_close_to_reference(got, x, weight, bias, 1e-5, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_more_than_2_31_elements_apart(device):
    # The row stride fits in int32 (a launch argument of that type), but the third row starts past 2**31
    # elements: the kernel must compute row offsets in int64. Only the rows' pages are touched.
    width, stride = 45, (1 << 30) + 4096
    storage = torch.empty(2 * stride + width, dtype=torch.float16, device=device)
    x = storage.as_strided((3, width), (stride, 1))
    want_x, weight, bias = _inputs((3, width), torch.float16, seed=8)
    x.copy_(want_x)
    got = layer_norm(x, weight.to(device), bias.to(device), 1e-5)
    assert_close_to_reference(got, want_x, weight, bias, 1e-5, torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_weight_and_bias(device):
    # The kernel reads weight and bias as dense [D] vectors: views with a stride (every other value of a
    # longer parameter) must be read by their strides or copied, never read as if contiguous (mutation audit).
    x, weight, bias = _inputs((5, 45), torch.float32, seed=9)
    wide_weight, wide_bias = torch.stack([weight, -weight], 1).reshape(-1), torch.stack([bias, bias + 3], 1).reshape(-1)
    weight_view, bias_view = wide_weight[::2], wide_bias[::2]
    assert not weight_view.is_contiguous() and torch.equal(weight_view, weight) and torch.equal(bias_view, bias)
    got = layer_norm(x.to(device), weight_view.to(device), bias_view.to(device), 1e-5)
    assert_close_to_reference(got, x, weight, bias, 1e-5, torch.float32)


def test_default_eps_is_torchs():
    # layer_norm(x, weight, bias) without eps is F.layer_norm's (and nn.LayerNorm's) default, 1e-5: rows of a
    # small variance (about 1e-5 here), where eps decides the scale, tell it from another (mutation audit).
    x, weight, bias = _inputs((4, 45), torch.float32, seed=10)
    x = x * 1e-3
    assert_close_to_reference(layer_norm(x, weight, bias), x, weight, bias, 1e-5, torch.float32)


def test_the_widest_row_is_taken():
    # launch_config plans rows of up to 16384 values (one row a program, 16 warps); the op must take them,
    # not refuse them as too wide (mutation audit).
    x, weight, bias = _inputs((2, 16384), torch.float32, seed=11)
    assert_close_to_reference(layer_norm(x, weight, bias, 1e-5), x, weight, bias, 1e-5, torch.float32)


@pytest.mark.parametrize("rows,warps", [(1, 4), (8, 8), (2, 16)])
def test_other_launch_configs(rows, warps):
    from vlmrm_fast.ops.layer_norm import layer_norm_triton

    x, weight, bias = _inputs((7, 3, 100), torch.bfloat16, seed=6)
    got = layer_norm_triton(x, weight, bias, 1e-5, rows_per_program=rows, num_warps=warps)
    assert_close_to_reference(got, x, weight, bias, 1e-5, torch.bfloat16)


def test_launch_config():
    assert launch_config(768) == (4, 1024, 4)  # ViT-B-32: four rows a program
    assert launch_config(1664) == (2, 2048, 4)  # ViT-bigG-14
    assert launch_config(64) == (16, 64, 4)
    assert launch_config(16384) == (1, 16384, 16)
    with pytest.raises(ValueError, match="rows_per_program must be a power of two"):
        launch_config(768, rows_per_program=3)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        launch_config(768, num_warps=6)
    with pytest.raises(ValueError, match="rows_per_program must be a power of two; got 0"):
        launch_config(768, rows_per_program=0)  # not the default under another name


def test_bad_input_names_the_problem():
    x, weight, bias = _inputs((3, 10), torch.float32)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 input; got torch.float64"):
        layer_norm(x.double(), weight, bias)
    with pytest.raises(ValueError, match=r"weight must be a float tensor of shape \(10,\); got \(9,\)"):
        layer_norm(x, weight[:9], bias)
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(10,\)"):
        layer_norm(x, weight, bias.to(torch.int32))
    with pytest.raises(ValueError, match=f"rows of 1 to {MAX_WIDTH} values; got a last dimension of {MAX_WIDTH + 1}"):
        layer_norm(torch.zeros(1, MAX_WIDTH + 1), torch.zeros(MAX_WIDTH + 1), torch.zeros(MAX_WIDTH + 1))
    with pytest.raises(ValueError, match="rows of 1 to"):
        layer_norm(torch.zeros(()), torch.zeros(1), torch.zeros(1), impl="torch")
    with pytest.raises(ValueError, match="weight is on meta and the input on cpu"):
        layer_norm(x, weight.to("meta"), bias)


# ---- the tower's modules -----------------------------------------------------------------------------

NORM_CLASSES = [torch.nn.LayerNorm, open_clip.transformer.LayerNorm, open_clip.transformer.LayerNormFp32]


@pytest.fixture
def kernel_always(monkeypatch):
    """The kernel for every input size (the tests' inputs are smaller than the launch threshold)."""
    monkeypatch.setattr(TritonLayerNorm, "min_elements", 0)


@pytest.mark.parametrize("cls", NORM_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_computes_as_the_class_it_replaces(cls, dtype, kernel_always, monkeypatch):
    torch.manual_seed(0)
    # open_clip's LayerNormFp32 casts its input to float32, for float32 parameters under bf16 activations
    norm = cls(37, eps=1e-6).to(torch.float32 if cls is open_clip.transformer.LayerNormFp32 else dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5)
        norm.bias.normal_()
    fast = TritonLayerNorm.from_layer_norm(norm)
    x = (torch.randn(3, 5, 37) * 2 + 1).to(dtype)
    launched = []
    monkeypatch.setattr("vlmrm_fast.backends.triton_layer_norm.layer_norm_triton",
                        lambda *a, **k: launched.append(1) or layer_norm(*a, **k))
    with torch.inference_mode():
        with tower_kernels():
            got = fast(x)
        want = norm(x)
    assert launched == [1]
    assert got.dtype == want.dtype == dtype
    assert_close_to_reference(got, x, norm.weight, norm.bias, 1e-6, dtype)
    # Both round a float32 result once: equal but where they fall on either side of a midpoint, one ulp apart.
    limit = 1e-5 * (1 + want.double().abs()) if dtype == torch.float32 else ulp(want.double(), dtype)
    assert ((got.double() - want.double()).abs() <= limit).all()


def test_module_shares_parameters_and_state_dict_keys():
    norm = open_clip.transformer.LayerNorm(24)
    fast = TritonLayerNorm.from_layer_norm(norm.eval())
    assert fast.weight is norm.weight and fast.bias is norm.bias
    assert list(fast.state_dict()) == list(norm.state_dict())
    assert not fast.training and fast.eps == norm.eps and fast.base is open_clip.transformer.LayerNorm
    assert all(p.device.type == "cpu" for p in fast.parameters())
    assert copy.deepcopy(fast).base is open_clip.transformer.LayerNorm


def test_only_known_layer_norms_are_replaced():
    class Custom(torch.nn.LayerNorm):  # a subclass whose forward may do anything else
        pass

    assert is_replaceable(torch.nn.LayerNorm(8)) and is_replaceable(open_clip.transformer.LayerNormFp32(8))
    assert not is_replaceable(Custom(8))
    assert not is_replaceable(torch.nn.LayerNorm(8, elementwise_affine=False))
    assert not is_replaceable(torch.nn.LayerNorm(8, bias=False))
    assert not is_replaceable(torch.nn.LayerNorm((4, 8)))
    assert not is_replaceable(torch.nn.LayerNorm(MAX_WIDTH + 1))
    with pytest.raises(ValueError, match="is not a LayerNorm over one dimension"):
        TritonLayerNorm.from_layer_norm(Custom(8))


def _spy_kernel(monkeypatch):
    launched = []
    real = layer_norm

    def spy(*args, **kwargs):
        launched.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr("vlmrm_fast.backends.triton_layer_norm.layer_norm_triton", spy)
    return launched


def test_module_falls_back_where_the_kernel_does_not_fit(kernel_always, monkeypatch):
    norm = torch.nn.LayerNorm(16)
    fast = TritonLayerNorm.from_layer_norm(norm)
    launched = _spy_kernel(monkeypatch)
    x = torch.randn(4, 16)
    with torch.no_grad():
        fast(x)  # outside tower_kernels: a user's own call, another backend's, an export
        assert launched == []
    with tower_kernels():
        _falls_back_inside(fast, norm, x, launched, monkeypatch)
    assert len(launched) == 1


def _falls_back_inside(fast, norm, x, launched, monkeypatch):
    # Autograd needs a graph: parameters that require grad, or an input that does.
    y = fast(x)
    assert y.grad_fn is not None and launched == []
    y.sum().backward()
    assert norm.weight.grad is not None

    with torch.no_grad():
        with tower_kernels(False):
            fast(x)
        assert launched == []
        fast(x)
        assert len(launched) == 1
        TritonLayerNorm.from_layer_norm(torch.nn.LayerNorm(16).double())(x.double())  # a dtype the kernel does not take
        fast(x.t().contiguous().t())  # a column-major input: no row view without a copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation (torch >= 2.9)
            traced = torch.jit.trace(fast, x, check_trace=False)  # exporters and tracers see the plain op
        assert "layer_norm" in str(traced.graph)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # torch.export's non-strict tracing, FLOP counters: no data to read
            assert fast(mode.from_tensor(x)).shape == x.shape
        with monkeypatch.context() as patch:  # a tower swapped on CUDA, moved to where Triton does not run
            patch.setattr("vlmrm_fast.backends.triton_layer_norm.triton_runs_on", lambda device: False)
            assert torch.equal(fast(x), norm(x))
        assert torch.equal(torch.compile(fast, backend="eager", fullgraph=True)(x), norm(x))  # dynamo: the plain op
        monkeypatch.setattr(TritonLayerNorm, "min_elements", x.numel() + 1)
        fast(x)


def test_a_kernel_that_fails_is_turned_off_with_one_warning(kernel_always, monkeypatch):
    # No GPU may have run it yet: a Triton build or launch error must cost speed, not the run.
    calls = []

    def failing(x, *args):
        calls.append(tuple(x.shape))
        raise RuntimeError("ptxas fatal: Unresolved extern function '__nv_rsqrtf'")

    monkeypatch.setattr("vlmrm_fast.backends.triton_layer_norm.layer_norm_triton", failing)
    norm = open_clip.transformer.LayerNorm(19)
    fast, other = TritonLayerNorm.from_layer_norm(norm), TritonLayerNorm.from_layer_norm(torch.nn.LayerNorm(19))
    x = torch.randn(3, 19)
    with torch.inference_mode(), tower_kernels():
        with pytest.warns(RuntimeWarning, match="LayerNorm kernel.*__nv_rsqrtf.*LayerNorm's forward runs from now on"):
            assert torch.equal(fast(x), norm(x))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(other(x), other.original()(x))  # every LayerNorm, no second warning
    assert calls == [(3, 19)]


def test_a_callers_mistake_is_raised_and_leaves_the_kernel_on(kernel_always):
    fast = TritonLayerNorm.from_layer_norm(torch.nn.LayerNorm(16))
    with torch.inference_mode(), tower_kernels(), pytest.raises(ValueError, match="weight is on meta"):
        fast.weight = torch.nn.Parameter(torch.ones(16, device="meta"), requires_grad=False)
        fast(torch.randn(2, 16))
    assert LAYER_NORM.on


def test_swaps_every_layer_norm_of_a_tower(kernel_always):
    model, _ = make_tiny()
    visual = model.visual
    want = dict(visual.state_dict())
    count = use_triton_layer_norm(visual)
    # ln_pre, ln_1 and ln_2 of each of the 2 blocks, ln_post
    assert count == 6 == sum(isinstance(m, TritonLayerNorm) for m in visual.modules())
    assert use_triton_layer_norm(visual) == 6  # again: nothing more to swap
    assert all(torch.equal(want[k], v) for k, v in visual.state_dict().items()) and list(want) == list(visual.state_dict())
    assert not any(isinstance(m, TritonLayerNorm) for m in model.transformer.modules())  # the text tower untouched


def test_leaves_other_norms_alone():
    class Custom(torch.nn.LayerNorm):
        pass

    tower = torch.nn.Sequential(torch.nn.LayerNorm(8), Custom(8), torch.nn.LayerNorm(8, elementwise_affine=False),
                                torch.nn.Sequential(open_clip.transformer.LayerNormFp32(8)))
    assert use_triton_layer_norm(tower) == 2
    assert [type(m).__name__ for m in tower.modules()][1:] == [
        "TritonLayerNorm", "Custom", "LayerNorm", "Sequential", "TritonLayerNorm"]


def _frames(n, seed=0):
    return torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("device", DEVICES)
def test_reward_with_triton_kernels_swaps_and_agrees(device, kernel_always, monkeypatch):
    model, tokenizer = make_tiny()
    reference = CLIPReward(copy.deepcopy(model), tokenizer, goal="a humanoid kneeling", baseline="a humanoid",
                           alpha=0.5, device=device, dtype=torch.float32, kernels="torch", backend="torch")
    rm = CLIPReward(model, tokenizer, goal="a humanoid kneeling", baseline="a humanoid", alpha=0.5, device=device,
                    dtype=torch.float32, kernels="triton", backend="torch")
    assert not any(isinstance(m, TritonLayerNorm) for m in reference.model.visual.modules())
    assert sum(isinstance(m, TritonLayerNorm) for m in rm.model.visual.modules()) == 6
    launched = _spy_kernel(monkeypatch)
    frames = _frames(3)
    got, want = rm(frames), reference(frames)
    assert len(launched) == 6
    assert (got - want).abs().max().item() <= 1e-5
    # The swapped modules compute as before in any other call: a reward with kernels="torch" on the same
    # model, the user's own call of the tower.
    plain = CLIPReward(model, tokenizer, goal="a humanoid kneeling", baseline="a humanoid", alpha=0.5, device=device,
                       dtype=torch.float32, kernels="torch", backend="torch")
    assert (plain(frames) - want).abs().max().item() <= 1e-6
    with torch.no_grad():
        model.visual(torch.zeros(1, 3, 224, 224, device=device))
    assert len(launched) == 6


def test_compile_backend_leaves_layer_norms_to_inductor(kernel_always, monkeypatch):
    model, tokenizer = make_tiny()
    reference = CLIPReward(copy.deepcopy(model), tokenizer, goal="a", device="cpu", kernels="torch", backend="torch")
    compiled_first = copy.deepcopy(model)
    CLIPReward(compiled_first, tokenizer, goal="a", device="cpu", kernels="triton", backend="compile")
    assert not any(isinstance(m, TritonLayerNorm) for m in compiled_first.visual.modules())
    # A model a "torch" reward swapped, compiled later: inductor traces the replaced class's forward.
    CLIPReward(model, tokenizer, goal="a", device="cpu", kernels="triton", backend="torch")
    compiled = CLIPReward(model, tokenizer, goal="a", device="cpu", kernels="triton", backend="compile",
                          backend_options={"buckets": (2,)})
    launched = _spy_kernel(monkeypatch)
    frames = _frames(2, seed=1)
    assert (compiled(frames) - reference(frames)).abs().max().item() <= 1e-5
    assert launched == []


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_after_a_swap_writes_the_same_graph(exporter, kernel_always, tmp_path):
    # A "torch" reward swaps the tower's modules in place; an ONNX export of the same model later traces the
    # replaced class's forward: the same nodes as the export of an untouched copy.
    onnx = pytest.importorskip("onnx")
    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.models import preprocess_spec_of

    model, tokenizer = make_tiny()
    untouched = copy.deepcopy(model)
    CLIPReward(model, tokenizer, goal="a", device="cpu", dtype=torch.float32, kernels="triton", backend="torch")
    assert any(isinstance(m, TritonLayerNorm) for m in model.visual.modules())
    spec = preprocess_spec_of(model, "vlmrm")
    graphs = [onnx.load(str(export_onnx(m.visual, tmp_path / f"{i}.onnx", spec, exporter=exporter))).graph
              for i, m in enumerate((model, untouched))]
    ops = [[node.op_type for node in graph.node] for graph in graphs]
    assert ops[0] == ops[1] and "LayerNormalization" in ops[0]


def test_swap_keeps_the_engine_cache_key_and_the_users_hooks():
    # A TensorRT engine built from a tower a "torch" reward swapped is the engine of the untouched tower: one key.
    # A forward hook the user put on a LayerNorm (a feature probe) keeps firing on the user's own calls, and its
    # handle still removes it.
    from vlmrm_fast.backends.engine_cache import weights_digest

    model, _ = make_tiny()
    before = weights_digest(model.visual)
    seen = []
    handle = model.visual.ln_post.register_forward_hook(lambda module, args, out: seen.append(1))
    use_triton_layer_norm(model.visual)
    assert weights_digest(model.visual) == before
    assert isinstance(model.visual.ln_post, TritonLayerNorm)  # swapped back after the digest
    with torch.no_grad():
        model.visual(torch.zeros(1, 3, 224, 224))
    assert seen == [1]
    handle.remove()
    with torch.no_grad():
        model.visual(torch.zeros(1, 3, 224, 224))
    assert seen == [1]
