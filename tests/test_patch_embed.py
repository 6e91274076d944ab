"""The patch embedding as a matmul (vlmrm_fast/backends/patch_embed.py) against the convolution it replaces.

Tolerances: in float64 both compute the same C * p_h * p_w products per output, summed in another order,
so they agree to 1e-12 (the sums here are at most 3 * 14 * 14 products of O(1) values, each rounding at
about 1e-16). In float32 and bfloat16 the matmul is held to PyTorch's own convolution's error at that
precision against the float64 convolution, at most twice it (and 1e-5 relative for float32, the
package's float32 bar); both accumulate in float32, so the only difference is the order of the sums.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, make_tiny
from vlmrm_fast.backends import build_backend
from vlmrm_fast.backends.onnx_export import Uint8VisionTower
from vlmrm_fast.backends.base import original_modules
from vlmrm_fast.backends.patch_embed import PatchMatmulConv2d, is_patch_conv, use_patch_matmul
from vlmrm_fast.models import preprocess_spec_of

# (channels in, out, kernel = stride, image H x W): odd sizes, non-square kernels, and images whose last
# rows and columns do not fill a patch (the convolution leaves them out).
SHAPES = [
    (3, 5, (7, 7), (45, 38)),
    (3, 6, (4, 6), (17, 25)),
    (3, 33, (14, 14), (56, 70)),
    (2, 7, (5, 3), (5, 3)),
]


def _conv(cin, cout, kernel, bias, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(cin, cout, kernel, kernel, bias=bias).to(dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cin,cout,kernel,size", SHAPES)
def test_equals_the_convolution_in_float64(cin, cout, kernel, size, bias):
    conv = _conv(cin, cout, kernel, bias)
    fast = PatchMatmulConv2d.from_conv(conv)
    x = torch.randn((3, cin) + size, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = F.conv2d(x, conv.weight, conv.bias, stride=kernel)
    got = fast(x)
    assert got.shape == want.shape == (3, cout, size[0] // kernel[0], size[1] // kernel[1])
    assert (got - want).abs().max().item() <= 1e-12
    assert torch.equal(fast(x[1]), conv(x[1]))  # an unbatched image goes to the convolution itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error_is_pytorchs_own(dtype):
    cin, cout, kernel, size = 3, 33, (14, 14), (57, 71)
    reference = _conv(cin, cout, kernel, bias=True)
    low = copy.deepcopy(reference).to(dtype)
    x = torch.randn((5, cin) + size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = reference(x)
    scale = want.abs().max().item()
    torch_error = (low(x.to(dtype)).double() - want).abs().max().item()
    our_error = (PatchMatmulConv2d.from_conv(low)(x.to(dtype)).double() - want).abs().max().item()
    assert our_error <= 2 * torch_error + (1e-5 * scale if dtype == torch.float32 else 0.0)
    if dtype == torch.float32:
        assert our_error <= 1e-5 * scale


def test_shares_the_parameters_and_state_dict_keys():
    conv = _conv(3, 8, (4, 4), bias=True, dtype=torch.float32)
    fast = PatchMatmulConv2d.from_conv(conv)
    assert fast.weight is conv.weight and fast.bias is conv.bias
    assert list(fast.state_dict()) == list(conv.state_dict())
    assert isinstance(fast, torch.nn.Conv2d) and fast.training == conv.training
    assert all(p.device.type == "cpu" for p in fast.parameters())  # nothing left on the meta device


def test_swap_keeps_the_users_hooks():
    # A forward hook on the tower's first layer (a probe of the patch tokens) fires after the swap, and on
    # the convolution put back for an export; its handle still removes it.
    model, _ = make_tiny()
    seen = []
    handle = model.visual.conv1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert use_patch_matmul(model.visual) and isinstance(model.visual.conv1, PatchMatmulConv2d)
    with torch.no_grad():
        model.visual(torch.zeros(1, 3, 224, 224))
        with original_modules(model.visual):
            model.visual(torch.zeros(2, 3, 224, 224))
    assert seen == [(1, 64, 7, 7), (2, 64, 7, 7)]
    handle.remove()
    with torch.no_grad():
        model.visual(torch.zeros(1, 3, 224, 224))
    assert len(seen) == 2


def test_tokens_are_a_view():
    # The tower flattens [N, D, gh, gw] to [N, D, gh * gw] and permutes to tokens; both must stay views
    # of the matmul's output, or every call pays a copy of the activations.
    fast = PatchMatmulConv2d.from_conv(_conv(3, 8, (4, 4), bias=False, dtype=torch.float32))
    out = fast(torch.randn(2, 3, 12, 16))
    tokens = out.reshape(2, 8, -1).permute(0, 2, 1)
    assert tokens.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    assert tokens.is_contiguous()


@pytest.mark.parametrize("conv", [
    torch.nn.Conv2d(3, 8, 3, 2, padding=1),  # open_clip's ModifiedResNet stem
    torch.nn.Conv2d(3, 8, 4, 2),
    torch.nn.Conv2d(3, 8, 4, 4, padding=1),
    torch.nn.Conv2d(3, 8, 2, 2, dilation=2),
    torch.nn.Conv2d(3, 6, 4, 4, groups=3),
], ids=["resnet-stem", "overlapping", "padded", "dilated", "grouped"])
def test_other_convolutions_are_left_alone(conv):
    tower = torch.nn.Module()
    tower.conv1 = conv
    assert not is_patch_conv(conv) and not use_patch_matmul(tower) and tower.conv1 is conv
    with pytest.raises(ValueError, match="stride equals its kernel"):
        PatchMatmulConv2d.from_conv(conv)
    assert not use_patch_matmul(torch.nn.Linear(2, 2))  # no conv1 at all (timm towers)


def test_the_tower_is_the_same_with_it():
    model, _ = make_tiny()
    untouched = copy.deepcopy(model.visual).eval()
    visual = model.visual.eval()
    assert use_patch_matmul(visual) and type(visual.conv1) is PatchMatmulConv2d
    assert use_patch_matmul(visual) and type(visual.conv1) is PatchMatmulConv2d  # a second call: True, unchanged
    assert visual.conv1.weight is visual.state_dict(keep_vars=True)["conv1.weight"]
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want, got = untouched(pixels), visual(pixels)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_inductor_compiles_the_tower_with_it():
    # On CUDA the compile backend compiles the tower with the patch matmul in it, and that path is the
    # default there; on the CPU it runs the convolution. Compiled here (inductor's CPU code, the same
    # tracing): a graph break in the module or an inductor failure would show on CUDA too.
    model, _ = make_tiny()
    visual = model.visual.eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = visual(pixels)
    use_patch_matmul(visual)
    with torch.inference_mode():
        tokens = torch.compile(visual.conv1, fullgraph=True)(pixels)  # no graph break inside
        got = torch.compile(visual)(pixels)
        assert torch.allclose(tokens, visual.conv1(pixels), atol=1e-5 * tokens.abs().max().item(), rtol=0)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_the_torch_backends_use_it_on_cuda_only(backend, device):
    # cuDNN's convolution is what the H200 profile found slow; on CPU the convolution is left as it is.
    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    build_backend(backend, model.visual.to(device), spec, torch.device(device), torch.float32, max_batch_size=4)
    assert type(model.visual.conv1) is (PatchMatmulConv2d if device == "cuda" else torch.nn.Conv2d)


@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_both_torch_backends_choose_it_for_cuda_on_a_machine_without_one(backend):
    # The test above skips its CUDA half without a GPU: adapt_tower only swaps modules, so what it chooses
    # for CUDA can be checked anywhere ("compile" skipping it passed every CPU test).
    from vlmrm_fast.backends.eager import adapt_tower

    for device, kind in ((torch.device("cuda", 0), PatchMatmulConv2d), (torch.device("cpu"), torch.nn.Conv2d)):
        visual = make_tiny()[0].visual
        adapt_tower(visual, backend, device, torch.float32, None)
        assert type(visual.conv1) is kind


def test_export_folds_it_back_into_a_convolution():
    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    plain = Uint8VisionTower(model.visual, spec)
    use_patch_matmul(model.visual)
    wrapped = Uint8VisionTower(model.visual, spec)
    assert wrapped.folded and type(wrapped.visual.conv1) is torch.nn.Conv2d
    frames = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(wrapped(frames), plain(frames))


def test_a_pixels_export_writes_the_convolution_back(tmp_path):
    onnx = pytest.importorskip("onnx", reason="needs onnx (pip install 'vlmrm-fast[export]')")
    from vlmrm_fast.backends.onnx_export import export_onnx

    model, _ = make_tiny()
    visual = model.visual.eval()
    use_patch_matmul(visual)
    path = export_onnx(visual, tmp_path / "tower.onnx", preprocess_spec_of(model, "vlmrm"), input_format="pixels")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 1  # one node, as ONNX Runtime and TensorRT expect a patch embedding
    assert type(visual.conv1) is PatchMatmulConv2d  # put back after the export
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmrm-fast[export]')")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels.numpy()})[0]
    with torch.inference_mode():
        want = visual(pixels)
    assert (torch.from_numpy(got) - want).abs().max().item() <= 1e-4 * want.abs().max().item()  # the export bar (issue 4 §2)
