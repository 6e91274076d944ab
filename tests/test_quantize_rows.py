"""Rows to E4M3 with a scale a row (vlmrm_fast/ops/quantize_rows.py): the Triton kernel and the torch path
against a float64 reference written from the module's formula, and the fp8 layers' choice between them.

No tolerance: the formula fixes every byte. The scale is one IEEE float32 division of the row's largest
magnitude (float32 holds it exactly) by 448; each value is one IEEE float32 division by the scale, then
rounded to the nearest E4M3 value, ties to even. The reference computes the divisions in float64 and
rounds them to float32 (for the scale, ``amax / 448 = amax / 7 / 64`` never lies on a float32 midpoint,
so that is the float32 division; for the values it is the definition), then picks the nearest E4M3
value from the table of all 254 finite ones. Both implementations must give its bytes exactly.
"""
import warnings

import pytest
import torch

from conftest import DEVICES
from test_quick_gelu import float32_bound as quick_gelu_float32_bound  # helpers only
from test_quick_gelu import reference_quick_gelu
from vlmrm_fast.backends import torch_fp8
from vlmrm_fast.ops._triton import tower_kernels
from vlmrm_fast.ops.quantize_rows import MAX_WIDTH, kernel_takes, launch_config, quantize_rows

E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
FINITE = ~E4M3.isnan()
CODES = torch.arange(256)[FINITE]  # byte codes of the finite values
VALUES = E4M3[FINITE]


def reference_quantize(x: torch.Tensor):
    """float64 (module docstring) -> (E4M3 byte codes [M, K] uint8, scales [M, 1] float32)."""
    x = x.double().cpu()
    amax = x.abs().amax(dim=1, keepdim=True)
    scale = (amax.clamp_min(torch.tensor(1e-12, dtype=torch.float32).double()) / 448).float()
    return nearest_codes((x / scale.double()).float().double()), scale


def nearest_codes(v: torch.Tensor) -> torch.Tensor:
    """float64 ``v`` (|v| <= 448 (1 + 2^-23)) -> the byte codes of the nearest E4M3 values, ties to even."""
    distance = (v.clamp(-448, 448)[..., None] - VALUES).abs()
    nearest = distance == distance.min(dim=-1, keepdim=True).values
    # a tie: two neighbours; ties go to the even code (E4M3's last mantissa bit); +0 and -0 are both
    # at distance 0 from a zero: the sign of v decides
    even = (CODES % 2 == 0) & ~((VALUES == 0) & (torch.signbit(VALUES) != torch.signbit(v)[..., None]))
    pick = torch.where(nearest.sum(-1, keepdim=True) > 1, nearest & even, nearest)
    assert (pick.sum(-1) == 1).all()
    return CODES[pick.double().argmax(-1)].to(torch.uint8)


def _rows(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # rows of very different sizes (largest magnitudes about 1e-3 to 1e4, within float16's range), zeros,
    # and values below E4M3's normal range
    sizes = torch.exp(torch.randn(shape[0], 1, generator=gen, dtype=torch.float64) * 3).clamp(1e-3, 1e3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * sizes
    if shape[0] > 2:
        x[1] = 0
    if shape[0] > 3:
        tail = torch.tensor([1e-9, -3e-5, 7.0, 2e-4, -1e-3, -0.0])[: shape[1]]
        x[2, : len(tail)] = tail
    return x.to(dtype)


SHAPES = [(7, 48), (3, 1), (5, 1664), (1, 8192), (37, 97), (0, 16), (2, 3072)]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_the_float64_reference(shape, dtype, device, impl):
    x = _rows(shape, dtype, seed=sum(shape))
    q, scale = quantize_rows(x.to(device), impl=impl)
    want_q, want_scale = reference_quantize(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape and scale.shape == (shape[0], 1)
    assert torch.equal(q.view(torch.uint8).cpu(), want_q)
    assert torch.equal(scale.cpu(), want_scale)


# ---- with the GELU first (activation="gelu") ----------------------------------------------------------------
# The float32 GELU is not correctly rounded: erf is an ulp or two off (libdevice's and torch's are not the
# same bits), and 1 + erf(x / sqrt 2) cancels for negative x, where erf is near -1 and float32's steps
# there (2^-24) are all that is left of it. So the reference computes the GELU in float64, and a value
# must be the nearest E4M3 one to the float64 quotient moved by at most the float32 GELU's error bound
# over the scale plus the division's rounding: exact wherever that band holds no E4M3 midpoint, either
# neighbour where it does. The bound on |GELU32(x) - GELU64(x)|: 8 float32 ulps of the result, plus
# |x| * 2^-22 for the cancellation (|x| / 2 times 1 + erf's absolute error, at most 4 of float32's steps
# near 1). The scale must be within that bound of the float64 amax over 448, plus its own rounding.


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU, ``x / 2 (1 + erf(x / sqrt 2))``, in float64."""
    x = x.double().cpu()
    return x * 0.5 * (1 + torch.erf(x / 2 ** 0.5))


def _gelu32_error_bound(x: torch.Tensor) -> torch.Tensor:
    """A bound on a float32 GELU's distance from :func:`_gelu64` (comment above), float64."""
    g = _gelu64(x).abs()
    ulp = torch.exp2(torch.floor(torch.log2(g.clamp_min(2.0 ** -126))) - 23)
    return 8 * ulp + x.double().cpu().abs() * 2.0 ** -22


def check_quantized(values: torch.Tensor, bound: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    """Assert that ``q`` [M, K] and ``scale`` [M, 1] are the E4M3 values and scales of rows computed in
    float32 within ``bound`` (float64 [M, K]) of float64 ``values`` [M, K] (comment above); returns the
    fraction of values within the band of a midpoint."""
    scale = scale.cpu().double()
    amax = values.abs().amax(dim=1, keepdim=True)
    amax_bound = bound.amax(dim=1, keepdim=True) if values.numel() else amax  # another value may come out larger
    assert ((scale - amax.clamp_min(1e-12) / 448).abs() <= amax_bound / 448 + scale * 2.0 ** -23).all()
    v = values / scale
    band = bound / scale + v.abs() * 2.0 ** -23 + 2.0 ** -140  # the last: a zero may come back as -0
    low, high = (E4M3[nearest_codes(end).long()] for end in (v - band, v + band))
    got = E4M3[q.view(torch.uint8).cpu().long()]
    assert ((low <= got) & (got <= high)).all()  # a band wider than a step (near 0) may hold several values
    return (low != high).double().mean().item() if v.numel() else 0.0  # -0 and +0: one value, no midpoint


def check_gelu_quantized(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    """:func:`check_quantized` for rows that are GELU(x)."""
    return check_quantized(_gelu64(x), _gelu32_error_bound(x), q, scale)


GELU_SHAPES = [(7, 48), (5, 1664), (1, 8192), (37, 97), (0, 16), (3, 1)]


def check_activation_quantized(activation: str, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    """:func:`check_quantized` for rows that are ``activation``(x): the GELU's bound (above), or QuickGELU's
    (argued in tests/test_quick_gelu.py)."""
    if activation == "gelu":
        return check_gelu_quantized(x, q, scale)
    return check_quantized(reference_quick_gelu(x), quick_gelu_float32_bound(x), q, scale)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GELU_SHAPES)
@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_activation_first_equals_the_float64_reference(activation, shape, dtype, device, impl):
    x = _rows(shape, dtype, seed=sum(shape) + 1)
    q, scale = quantize_rows(x.to(device), activation=activation, impl=impl)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape and scale.shape == (shape[0], 1)
    near_midpoints = check_activation_quantized(activation, x, q, scale)
    # A band wide enough to pass anything would fail here. Random float32 values would fall in it about
    # once in 10^4; these rows, of few-bit values (bf16: 8 bits) over a scale of the same kind, with
    # GELU(x) = x in float32 above x = 5.5 or so, land on E4M3 midpoints more often (0.42% at most here).
    assert near_midpoints < 0.01


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_gelu_first_where_1_plus_erf_cancels(device, impl):
    # GELU(-3.44) = -0.0010: 1 + erf(-2.43) keeps 13 of float32's bits. oneDNN's GELU (F.gelu on CPU) was
    # 1.3 times the error bound off there and rounded this value to -1.0, not -1.125 (scale from 0.584).
    x = torch.tensor([[0.5842351317405701, -3.4403879642486572, -3.4403879642486572]])
    q, scale = quantize_rows(x.to(device), activation="gelu", impl=impl)
    assert check_gelu_quantized(x, q, scale) == 0
    assert q[0, 1].item() == -1.125


# ---- with QuickGELU first (activation="quick_gelu"), OpenAI's towers': its band is tested above ------


@pytest.mark.parametrize("device", DEVICES)
def test_quick_gelu_first_is_not_rounded_and_not_the_gelu(device):
    # What the band lets through: not open_clip's bf16 QuickGELU then the quantisation (three roundings),
    # nor the exact GELU.
    x = _rows((7, 96), torch.bfloat16, seed=6)
    q, scale = quantize_rows(x.to(device), activation="quick_gelu")
    check_quantized(reference_quick_gelu(x), quick_gelu_float32_bound(x), q, scale)
    for wrong in (quantize_rows(x * torch.sigmoid(1.702 * x)), quantize_rows(x, activation="gelu")):
        with pytest.raises(AssertionError):
            check_quantized(reference_quick_gelu(x), quick_gelu_float32_bound(x), *wrong)


def test_an_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="activation=None, 'gelu' or 'quick_gelu'; got 'relu'"):
        quantize_rows(torch.zeros(2, 16), activation="relu")


@pytest.mark.parametrize("device", DEVICES)
def test_gelu_first_is_not_rounded_to_the_input_dtype(device):
    # The row's largest GELU is 448 (x = 448): scale 1. GELU(1.203125) = 1.06540 is above the midpoint of
    # E4M3's 1 and 1.125 and goes up; rounded to bf16 first it would be 1.0625, the midpoint itself, and
    # go to the even 1. The others are such values too (found by search).
    x = torch.tensor([[448.0, 1.203125, -0.59375, 0.171875, 2.390625]], dtype=torch.bfloat16)
    q, scale = quantize_rows(x.to(device), activation="gelu")
    assert scale.item() == 1.0
    assert check_gelu_quantized(x, q, scale) == 0  # none near a midpoint
    unfused, _ = quantize_rows(torch.nn.functional.gelu(x).to(device))  # torch's GELU pass, then quantised
    assert (q.view(torch.uint8) != unfused.view(torch.uint8)).cpu().tolist() == [[False] + [True] * 4]
    assert q[0, 1].item() == 1.125 and unfused[0, 1].item() == 1.0


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_every_e4m3_value_midpoint_and_neighbour(device, impl):
    # A row whose largest magnitude is 448 has scale 1: every finite E4M3 value must come back as itself,
    # each midpoint between neighbours go to the even one, and the float32 numbers either side of it to
    # the nearer one (what a lost carry into the next binade or a truncating cast gets wrong).
    values = VALUES.float().unique()
    mid = (values[1:] + values[:-1]) / 2
    row = torch.cat([values, mid, torch.nextafter(mid, torch.tensor(1e9)), torch.nextafter(mid, torch.tensor(-1e9))])
    x = row[None, :]
    q, scale = quantize_rows(x.to(device), impl=impl)
    assert scale.item() == 1.0
    assert torch.equal(q.view(torch.uint8).cpu(), reference_quantize(x)[0])
    assert torch.equal(q[0, : len(values)].float().cpu(), values)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows(device):
    base = _rows((9, 130), torch.bfloat16, seed=3).to(device)
    for x in (base[::2, :97], base[:, 1:98], base.t()[:97, :5]):  # spaced rows; offset rows; columns (copied)
        q, scale = quantize_rows(x)
        want_q, want_scale = reference_quantize(x)
        assert torch.equal(q.view(torch.uint8).cpu(), want_q) and torch.equal(scale.cpu(), want_scale)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_more_than_2_31_elements_apart(device):
    # The third row starts past 2**31 elements: row offsets in int64. Only the rows' pages are touched.
    width, stride = 45, (1 << 30) + 4096
    storage = torch.empty(2 * stride + width, dtype=torch.float16, device=device)
    x = storage.as_strided((3, width), (stride, 1))
    want = _rows((3, width), torch.float16, seed=8)
    x.copy_(want)
    q, scale = quantize_rows(x)
    want_q, want_scale = reference_quantize(want)
    assert torch.equal(q.view(torch.uint8).cpu(), want_q) and torch.equal(scale.cpu(), want_scale)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"rows \[M, K\]"):
        quantize_rows(torch.zeros(2, 3, 4))
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
            quantize_rows(torch.zeros(2, 3, dtype=torch.float64), impl=impl)
    with pytest.raises(ValueError, match=f"1 to {MAX_WIDTH}.*impl='torch'"):
        quantize_rows(torch.zeros(1, MAX_WIDTH + 1))
    assert quantize_rows(torch.zeros(1, MAX_WIDTH + 1), impl="torch")[0].shape == (1, MAX_WIDTH + 1)


def test_launch_config_keeps_a_program_near_4096_elements():
    assert launch_config(768) == (4, 1024, 8)
    assert launch_config(1664) == (2, 2048, 8)
    assert launch_config(8192) == (1, 8192, 16)
    assert launch_config(1) == (16, 1, 4)
    assert [kernel_takes(x) for x in (torch.zeros(2, 3), torch.zeros(3, 2).t(), torch.zeros(1, MAX_WIDTH + 1))] == [
        None, "rows not contiguous", f"rows wider than {MAX_WIDTH}"]


# ---- which path the fp8 layers take -------------------------------------------------------------------


def test_fp8_layers_quantise_with_the_kernel_in_the_backends_calls_only():
    choose = torch_fp8.kernel_quantizes
    x = torch.randn(15, 48)
    assert not choose(x)  # a user's own call, another backend's, an export
    with tower_kernels():
        assert choose(x)
        assert not choose(torch.randn(48, 15).t())  # rows not contiguous: torch's ops, no copy
        assert not choose(torch.randn(2, MAX_WIDTH + 16))
        assert not choose(torch.randn(15, 48, requires_grad=True))  # the kernel has no backward
        with torch.no_grad():
            assert choose(torch.randn(15, 48, requires_grad=True))
        compiled = torch.compile(lambda t: t + int(choose(t)), backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), x)  # inductor fuses torch's ops itself
    with tower_kernels(False):
        assert not choose(x)


def test_a_kernel_that_fails_is_turned_off_with_one_warning(monkeypatch):
    # No GPU has run it yet: a Triton build or launch error must cost speed, not the run.
    calls = []

    def failing(rows, activation=None):
        calls.append(rows.shape)
        raise RuntimeError("PTX .version 8.7 does not support .target sm_100")

    monkeypatch.setattr(torch_fp8, "quantize_rows_triton", failing)
    x = _rows((15, 48), torch.bfloat16, seed=2)
    want_q, want_scale = reference_quantize(x)
    with tower_kernels():
        with pytest.warns(RuntimeWarning, match="quantisation kernel.*sm_100.*torch's ops quantise from now on"):
            q, scale = torch_fp8._quantize(x)
        assert torch.equal(q.view(torch.uint8), want_q) and torch.equal(scale, want_scale)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch_fp8._quantize(x)  # no second warning, no second try
        assert not torch_fp8.kernel_quantizes(x)
    assert calls == [(15, 48)]


def test_out_of_memory_is_raised_and_leaves_the_kernel_on(monkeypatch):
    def out_of_memory(rows, activation=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(torch_fp8, "quantize_rows_triton", out_of_memory)
    with tower_kernels(), pytest.raises(torch.cuda.OutOfMemoryError):
        torch_fp8._quantize(_rows((15, 48), torch.bfloat16, seed=2))
    assert torch_fp8.QUANTIZE_ROWS.on
