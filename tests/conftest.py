"""Test setup: Triton's CPU interpreter where there is no GPU, devices, and the tiny model.

TRITON_INTERPRET must be set before any kernel is defined, so before vlmrm_fast is imported. On a
CUDA machine it is left unset: there the same tests run the compiled kernels (marker ``gpu``).
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo rendering (Mesa EGL on CPU machines)
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import open_clip  # noqa: E402
import pytest  # noqa: E402

from vlmrm_fast.backends.fast_path import FAST_PATHS  # noqa: E402
from vlmrm_fast.backends.onnx_export import dynamo_exporter_problem  # noqa: E402
from vlmrm_fast.models import TINY_MODEL  # noqa: E402  (importing it registers the tiny config with open_clip)

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
    ),
]


DYNAMO_MISSING = str(dynamo_exporter_problem() or "")
"""Why torch's dynamo ONNX exporter cannot run here (the error it would raise), or ""."""
EXPORTERS = [
    pytest.param("auto", id="auto"),  # the TorchScript exporter, where torch has it
    pytest.param("dynamo", id="dynamo", marks=pytest.mark.skipif(bool(DYNAMO_MISSING), reason=DYNAMO_MISSING)),
]
"""``export_onnx(exporter=...)`` values for the tests of what is built on an export."""


@pytest.fixture(autouse=True)
def fast_paths_on(monkeypatch):
    """Every fast path on, as in a new process, and on again after the test: one that a test makes fail
    turns itself off for the process (backends/fast_path.py), which must not reach the next test."""
    for path in FAST_PATHS:
        monkeypatch.setattr(path, "failure", None)


def make_model(name: str, seed: int = 0):
    """A random-init open_clip model (float32, CPU, eval mode) and its tokenizer, with reproducible weights: drawn
    from torch's global RNG seeded with ``seed``, so that seeds give different weights (``create_clip(name, None)``
    always gives seed 0's, from a generator of its own)."""
    torch.manual_seed(seed)
    return open_clip.create_model(name).eval(), open_clip.get_tokenizer(name)


ROOT = Path(__file__).resolve().parents[1]


def copy_sources(dest: Path) -> Path:
    """What setup.py builds from (metadata, csrc/, the package; no build outputs), copied to ``dest``:
    builds in tests run there, so the checkout gets no build/ folder or stray extension."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "setup.py", "README.md", "STATUS.md", "MANIFEST.in", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("vlmrm_fast", "csrc"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


TINY_COCA = {  # open_clip's CoCa, shrunk: a tower with an attentional pool that returns (pooled, tokens)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


def make_tiny(seed: int = 0):
    """The tiny random-init CLIP (float32, CPU) and its tokenizer, with reproducible weights."""
    return make_model(TINY_MODEL, seed)


@pytest.fixture
def tiny():
    """A fresh tiny model per test (CLIPReward moves and casts the model it is given)."""
    return make_tiny()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def tensorrt_type_text(tensor: dict) -> str:
    """The data type of a layer's input or output in TensorRT's engine-inspector JSON, upper case: its
    own key where TensorRT 11 split "Format/Datatype" ("FLOAT", "BF16", ...), else TensorRT 10's
    combined text ("ROW MAJOR LINEAR FP32 FORMAT (KLINEAR)")."""
    for key in ("Datatype", "DataType", "Format/Datatype"):
        if key in tensor:
            return str(tensor[key]).upper()
    return ""


def tensorrt_is_float32(tensor: dict) -> bool:
    text = tensorrt_type_text(tensor)
    return text in ("FLOAT", "FP32", "FLOAT32") or "FP32" in text.split()


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """Lift the backends' refusal of fp8 on CPU (the dtype check stays): per-row scaled ``torch._scaled_mm``
    runs on CPU in torch 2.14+, where the fp8 tests multiply (tests/test_torch_fp8.py)."""
    from vlmrm_fast.backends import torch_fp8

    check = torch_fp8.fp8_unsupported_reason
    monkeypatch.setattr(torch_fp8, "fp8_unsupported_reason",
                        lambda device, dtype: check(device, dtype) if device.type == "cuda" or dtype != torch.bfloat16 else None)


def cuda_rowwise_scaled_mm(a, b, *, scale_a, scale_b, bias=None, out_dtype=None, **kwargs):
    """``torch._scaled_mm`` with per-row scales as CUDA runs it on Hopper (torch 2.6 to 2.11), for CPU tests:
    what CUDA refuses and torch's CPU kernel takes (a row-major second matrix, float32 output, a float32
    bias) raises here, with CUDA's wording where it has one; the rest is the product in float64, rounded
    once to ``out_dtype``. CUDA's rules: E4M3 operands, the first row-major and the second column-major,
    K and N multiples of 16; float32 scales [M, 1] and [1, N], contiguous; bfloat16 output and bias [N]."""
    e4m3 = torch.float8_e4m3fn
    assert a.dtype == e4m3 and b.dtype == e4m3 and a.dim() == 2 and b.dim() == 2, (a.dtype, b.dtype)
    (m, k), n = a.shape, b.shape[1]
    assert b.shape[0] == k, (a.shape, b.shape)
    assert a.stride(1) == 1, "mat_a must be a row major tensor"
    assert b.stride(0) == 1, "mat_b must be a column major tensor"
    assert k % 16 == 0 and n % 16 == 0, f"mat2 shape {tuple(b.shape)} must be divisible by 16"
    assert tuple(scale_a.shape) == (m, 1) and tuple(scale_b.shape) == (1, n), (scale_a.shape, scale_b.shape)
    assert scale_a.dtype == scale_b.dtype == torch.float32, (scale_a.dtype, scale_b.dtype)
    assert scale_a.is_contiguous() and scale_b.is_contiguous(), \
        "Both scale_a and scale_b must be contiguous for RowWise scaling."
    assert out_dtype == torch.bfloat16, "Only bf16 high precision output types are supported for row-wise scaling."
    if bias is not None:
        assert bias.dtype == torch.bfloat16 and tuple(bias.shape) == (n,), (bias.dtype, bias.shape)
    out = (a.double() * scale_a.double()) @ (b.double() * scale_b.double())
    return (out if bias is None else out + bias.double()).to(out_dtype)


def cublaslt_gelu_addmm(bias, mat1, mat2, *, beta=1, alpha=1, use_gelu=False):
    """``torch._addmm_activation`` as CUDA runs it through cuBLASLt's epilogue, for CPU tests: the product
    (in float64, nearly float32's accumulation) plus the bias, rounded to float32, then the tanh GELU
    (``CUBLASLT_EPILOGUE_GELU_BIAS``) or ReLU in float32, rounded once to the inputs' dtype. What the
    epilogue path takes is asserted: 2-D operands of one dtype, a contiguous bias [N], beta = alpha = 1."""
    assert mat1.dim() == 2 and mat2.dim() == 2 and mat1.shape[1] == mat2.shape[0], (mat1.shape, mat2.shape)
    assert bias.dim() == 1 and bias.shape[0] == mat2.shape[1] and bias.is_contiguous(), bias.shape
    assert mat1.dtype == mat2.dtype == bias.dtype, (mat1.dtype, mat2.dtype, bias.dtype)
    assert beta == 1 and alpha == 1, (beta, alpha)
    out = (mat1.double() @ mat2.double() + bias.double()).float()
    out = torch.nn.functional.gelu(out, approximate="tanh") if use_gelu else torch.relu(out)
    return out.to(mat1.dtype)
