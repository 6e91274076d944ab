"""A residual add, LayerNorm and rows to E4M3 in one op (vlmrm_fast/ops/layer_norm_quantize.py): the
Triton kernel and the torch path against float64 references written from the formulas.

The sum is exact: float32 adds two values of x's dtype and the result is rounded once to that dtype, the
float64 sum rounded so. The LayerNorm is computed in float32 and quantised unrounded, so, as for the GELU in
tests/test_quantize_rows.py, each byte must be the nearest E4M3 value to the float64 LayerNorm over the
scale moved by at most a bound on the float32 LayerNorm's error: exact wherever that band holds no E4M3
midpoint, either neighbour where it does, and few values in the band.

The bound on the float32 LayerNorm of a row t of width D (u = 2^-24), to first order. A float32 sum of
values is within n u sum|values| of the exact one, n the depth of its additions. The kernel's reductions
add at most 32 of a row's values in turn in each thread (16 up to a width of 8,192: a program holds 4,096
values, or one row where that is wider, over 8 to 16 warps), then in a tree over at most 512 threads:
n <= 41. The bound takes n = 64, and the slack covers what the terms below leave out (each centred
value's and each square's rounding in the variance, about 3 u). The torch path is held to the same bound:
on the CPU its reductions are cascades over vector lanes, shallower still (on CUDA, where its Welford
reduction is not a plain sum, it has not run yet). Taking n = D, the bound for any order, would put a
tenth of a 1,664-wide row's values near a midpoint:
- the mean: dm <= n u mean|t| + u |mean| (the division's rounding: none by a power of two), times 1.01
  for gamma's denominator (n at most D - 1: a row of one value has an exact mean);
- each centred value c_i: dm, plus u |c_i| from its subtraction;
- the variance: a shift of every c_i by the same dm adds dm^2 only (sum c_i = 0), the sum of squares and
  the division (a GPU's float32 '/' may be 2 ulp off, 4 u) at most (n + 4) u relative; with eps added,
  ((n + 4) u var + dm^2) / (var + eps) + u relative;
- 1 / sqrt: half that, plus 8 u for the root and the division (2 ulp each on a GPU);
- y_i = c_i r w_i + b_i: |w_i| r (dc_i) + |c_i r w_i| (the root's error + 3 u) + 2 u (|y_i| + |b_i|).
A wrong formula (the unbiased variance, eps outside the root, a lost bias, a bf16-rounded LayerNorm) is off
by far more, and a test below shows each fails. The float32 LayerNorm's actual error here is at most a
tenth of the bound.
"""
import pytest
import torch

from conftest import DEVICES
from test_layer_norm import reference_layer_norm  # helpers only
from test_quantize_rows import check_quantized, nearest_codes
from vlmrm_fast.ops.layer_norm_quantize import layer_norm_quantize
from vlmrm_fast.ops.quantize_rows import quantize_rows_torch

U = 2.0 ** -24
DEPTH = 64
"""The depth of the float32 reductions' additions the bound allows (module docstring)."""
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 37, 97), (5, 768), (2, 7, 1664), (4, 3), (0, 13), (3, 1), (1, 2049)]


def float32_layer_norm_bound(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """A bound on a float32 LayerNorm's distance from the float64 one of rows ``t`` (module docstring), float64."""
    t, w, b = t.double(), weight.double(), bias.double()
    mean = t.mean(dim=-1, keepdim=True)
    c = t - mean
    var = (c * c).mean(dim=-1, keepdim=True)
    r = 1 / torch.sqrt(var + eps)
    y = c * r * w + b
    width = t.shape[-1]
    division = 0 if width & (width - 1) == 0 else U  # by a power of two: exact
    dm = 1.01 * (min(DEPTH, width - 1) * U * t.abs().mean(dim=-1, keepdim=True) + division * mean.abs())
    dc = dm + U * c.abs()
    root = (((DEPTH + 4) * U * var + dm * dm) / (var + eps) + U) / 2 + 8 * U
    return 1.01 * ((w.abs() * r * dc) * (1 + root) + (c * r * w).abs() * (root + 3 * U) + 2 * U * (y.abs() + b.abs()))


def _inputs(shape, dtype, seed):
    """Residual-stream-like rows (an offset mean, a few large values), an addend, and LayerNorm parameters
    near CLIP's (weights about 1, small biases); one row all zeros and one constant, where they fit."""
    gen = torch.Generator().manual_seed(seed)
    width = shape[-1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.7
    x += (torch.rand(shape, generator=gen, dtype=torch.float64) < 0.01) * 40  # outlier features
    rows = x.view(-1, width)
    if rows.shape[0] > 2:
        rows[1] = 0
        rows[2] = 0.1
    add = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(width, generator=gen, dtype=torch.float64) * 0.3 + 1
    bias = torch.randn(width, generator=gen, dtype=torch.float64) * 0.1
    return x.to(dtype), add.to(dtype), weight.to(dtype), bias.to(dtype)


def check(x, add, weight, bias, eps, total, q, scale) -> float:
    """Assert the op's outputs against the float64 references (module docstring); returns the fraction
    of values near an E4M3 midpoint."""
    width = x.shape[-1]
    want_total = x if add is None else (x.double() + add.double()).float().to(x.dtype)
    assert total.dtype == x.dtype and total.shape == x.shape and torch.equal(total.cpu(), want_total)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (x.numel() // max(width, 1), width)
    assert scale.dtype == torch.float32 and scale.shape == (q.shape[0], 1)
    rows = want_total.reshape(-1, width)
    y, bound = reference_layer_norm(rows, weight, bias, eps), float32_layer_norm_bound(rows, weight, bias, eps)
    check_quantized(y, bound, q, scale)
    # The fraction leaves out constant rows: their sums are exact (so their outputs the bias, exactly), which
    # the bound does not know, and it puts a tenth of their values near a midpoint.
    varied = (rows != rows[:, :1]).any(dim=-1)
    kept = q.view(torch.uint8)[varied.to(q.device)].view(q.dtype)  # (torch 2.4 cannot index E4M3 itself)
    return check_quantized(y[varied], bound[varied], kept, scale[varied.to(scale.device)])


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_add", [True, False])
def test_equals_the_float64_reference(with_add, shape, dtype, device, impl):
    x, add, weight, bias = _inputs(shape, dtype, seed=sum(shape) + with_add)
    add = add if with_add else None
    on = [t.to(device) if t is not None else None for t in (x, add, weight, bias)]
    total, q, scale = layer_norm_quantize(on[0], on[2], on[3], 1e-5, add=on[1], impl=impl)
    assert with_add or total is on[0]  # without the add nothing is written: x itself
    near_midpoints = check(x, add, weight, bias, 1e-5, total, q, scale)
    # A band wide enough to pass anything would fail here: these rows put about 0.1% of values in it.
    assert near_midpoints < 0.005


@pytest.mark.parametrize("device", DEVICES)
def test_a_wrong_layer_norm_fails_the_check(device):
    # What the band lets through: not the unbiased variance, eps outside the root, a lost bias, or the
    # LayerNorm rounded to bf16 before it is quantised (the unfused path's extra rounding).
    x, add, weight, bias = _inputs((6, 48), torch.bfloat16, seed=11)
    total, q, scale = layer_norm_quantize(x.to(device), weight.to(device), bias.to(device), 1e-5, add=add.to(device))
    check(x, add, weight, bias, 1e-5, total, q, scale)
    t = total.float().cpu()
    mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True, unbiased=True)
    wrong = {
        "unbiased variance": (t - mean) / torch.sqrt(var + 1e-5) * weight.float() + bias.float(),
        "eps outside the root": (t - mean) / (t.std(-1, keepdim=True, unbiased=False) + 1e-5) * weight.float() + bias.float(),
        "no bias": torch.nn.functional.layer_norm(t, (48,), weight.float(), None, 1e-5),
        "rounded to bf16 first": torch.nn.functional.layer_norm(t, (48,), weight.float(), bias.float(), 1e-5).bfloat16(),
    }
    for name, y in wrong.items():
        q_wrong, scale_wrong = quantize_rows_torch(y.float())
        with pytest.raises(AssertionError):
            check(x, add, weight, bias, 1e-5, total, q_wrong, scale_wrong)
            pytest.fail(name)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_an_addend_of_another_layout(device):
    x, add, weight, bias = _inputs((9, 130), torch.bfloat16, seed=5)
    base, add_t = x.to(device), add.to(device).t().contiguous().t()  # add: column-major, copied for the kernel
    for rows in (base[::2, :97], base[:, 1:98]):  # spaced rows; offset rows
        addend = add_t[: rows.shape[0], : rows.shape[1]]
        total, q, scale = layer_norm_quantize(rows, weight[:97].to(device), bias[:97].to(device), 1e-5, add=addend)
        check(rows.cpu(), addend.cpu(), weight[:97], bias[:97], 1e-5, total, q, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_the_parameters_dtype_may_differ(device):
    # open_clip's LayerNormFp32 keeps float32 parameters in a bf16 tower
    x, add, weight, bias = _inputs((5, 64), torch.bfloat16, seed=9)
    weight, bias = weight.float(), bias.float()
    total, q, scale = layer_norm_quantize(x.to(device), weight.to(device), bias.to(device), 1e-6, add=add.to(device))
    check(x, add, weight, bias, 1e-6, total, q, scale)


@pytest.mark.parametrize("value", [0.0, 0.10009765625, -3.0])
def test_a_constant_row_quantises_the_bias(value):
    # The sums of 20 equal bf16 values are exact in float32, so is their mean: the centred values are 0
    # and the output is the bias exactly, quantised with its own scale.
    x = torch.full((1, 20), value, dtype=torch.bfloat16)
    bias = torch.linspace(-1, 1, 20, dtype=torch.bfloat16)
    for impl in ("triton", "torch"):
        _, q, scale = layer_norm_quantize(x, torch.ones(20, dtype=torch.bfloat16), bias, impl=impl)
        want = nearest_codes((bias.double() / (bias.double().abs().max() / 448)).float().double())
        assert torch.equal(q.view(torch.uint8)[0], want) and scale.item() == pytest.approx(1 / 448, rel=1e-7)


def test_bad_input_names_the_problem():
    x, w = torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(8)
    with pytest.raises(ValueError, match="give it x's shape, dtype and device"):
        layer_norm_quantize(x, w, w, add=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="give it x's shape, dtype and device"):
        layer_norm_quantize(x, w, w, add=torch.zeros(2, 9, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"weight must be a float tensor of shape \(8,\)"):
        layer_norm_quantize(x, torch.ones(7), w)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        layer_norm_quantize(x.to(torch.int32), w, w)
