"""Vision-tower backends behind one interface (:class:`VisionBackend`): pixels in, embeddings out.

| backend | devices | precisions | notes |
|---|---|---|---|
| "torch" | any | fp32, bf16, fp16; fp8 opt-in (Hopper) | eager PyTorch, SDPA attention, patch embedding as a matmul and LayerNorms through Triton (on CUDA) |
| "compile" | any | fp32, bf16, fp16; fp8 opt-in (Hopper) | torch.compile per batch bucket, CUDA graphs on CUDA; patch embedding and fp8 as "torch" |
| "onnxruntime" | CPU, CUDA (onnxruntime-gpu) | fp32, int8 opt-in (CPU); fp32, fp16 (CUDA) | extra `export` |
| "tensorrt" | CUDA | fp16, bf16, fp32; fp8 opt-in (Hopper) | extra `tensorrt`; engines cached on disk |

"auto" picks the fastest backend *verified* on that kind of device (README, "Status"): ONNX Runtime
on CPU for float32 when it is installed, else torch. On CUDA it is "torch": on the H200
(benchmarks/results/profile-h200-*) "compile" was 2.1-4.1x faster end to end at batch 1 but no
faster at 1024, and took 45-130 s to compile the three buckets of those runs (1, 64, 1024) together;
TensorRT has no GPU results yet.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Dict, Mapping, Optional, Tuple, cast

import torch

from vlmrm_fast.backends.base import BACKEND_NAMES, BackendError, VisionBackend, check_compile_mode
from vlmrm_fast.ops.preprocess import PreprocessSpec

BACKEND_CHOICES = ("auto", *BACKEND_NAMES)
BACKEND_OPTIONS = {
    "torch": ("quantize",),
    "compile": ("buckets", "mode", "quantize"),
    "onnxruntime": ("quantize", "exporter"),
    "tensorrt": ("cache_dir", "workspace_gib", "quantize", "calibration_frames", "opt_batch_size", "exporter"),
}
"""The ``backend_options`` each backend takes."""


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for a choice, a device and a precision."""
    if backend not in BACKEND_CHOICES:
        raise BackendError(f"backend={backend!r} is not one of {BACKEND_CHOICES}.")
    if backend != "auto":
        return backend
    if (device.type == "cpu" and dtype == torch.float32 and importlib.util.find_spec("onnxruntime") is not None
            and importlib.util.find_spec("onnx") is not None):  # onnxruntime alone cannot export the tower
        return "onnxruntime"
    return "torch"


def check_backend_options(
    backend: str, options: Optional[Dict[str, Any]], device: torch.device, requested: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """A :class:`BackendError` for ``options`` that the resolved ``backend``'s constructor does not take;
    given ``dtype``, also for a ``quantize`` the "torch" or "compile" backend cannot run there (checked
    before a model is loaded; the constructors check it again when built directly)."""
    if options is not None and not isinstance(options, Mapping):
        raise BackendError(f"backend_options must be a dict of option names and values (e.g. {{'quantize': 'int8'}}), "
                           f"or None; got {type(options).__name__} {options!r}.")
    unknown = sorted(set(options or {}) - set(BACKEND_OPTIONS.get(backend, ())))
    if unknown:
        takes = ", ".join(BACKEND_OPTIONS.get(backend, ())) or "none"
        picked = f" (which backend={requested!r} picked on {device.type})" if requested not in (None, backend) else ""
        owners = sorted({b for b, names in BACKEND_OPTIONS.items() for name in unknown if name in names})
        hint = f"; they are options of {', '.join(repr(b) for b in owners)}: pass that backend by name" if owners else ""
        raise BackendError(f"backend_options {unknown} are not options of the {backend!r} backend{picked}, "
                           f"whose options are: {takes}{hint}.")
    if backend == "compile":  # before a model loads
        check_compile_mode((options or {}).get("mode"))
    if dtype is not None and backend in ("torch", "compile"):
        from vlmrm_fast.backends.torch_fp8 import check_torch_quantize

        check_torch_quantize((options or {}).get("quantize"), backend, device, dtype)


def build_backend(
    backend: str,
    visual: torch.nn.Module,
    spec: PreprocessSpec,
    device: torch.device,
    dtype: torch.dtype,
    *,
    max_batch_size: int,
    model_name: str = "model",
    options: Optional[Dict[str, Any]] = None,
    requested: Optional[str] = None,
    kernels: str = "torch",
) -> VisionBackend:
    """Build a resolved backend around ``visual`` (already on ``device`` in ``dtype``).

    ``options`` go to the backend's constructor (:data:`BACKEND_OPTIONS`): ``buckets``/``mode`` for
    "compile" (and ``quantize`` for both it and "torch"), ``cache_dir``/``workspace_gib``/``quantize``/``calibration_frames``/``opt_batch_size``/``exporter``
    for "tensorrt", ``quantize``/``exporter`` for "onnxruntime". ``requested`` is the caller's choice ("auto"), for
    error messages. ``kernels``: the reward's resolved choice ("triton" or "torch"); with "triton" the "torch"
    backend runs the tower's LayerNorms through the Triton kernel.
    """
    check_backend_options(backend, options, device, requested)
    options = dict(options or {})
    image_size = cast(Tuple[int, int], tuple(spec.size))  # spec.size is (height, width)
    if backend == "torch":
        from vlmrm_fast.backends.eager import TorchBackend

        return TorchBackend(visual, device, dtype, image_size, kernels=kernels, **options)
    if backend == "compile":
        from vlmrm_fast.backends.compiled import CompileBackend

        return CompileBackend(visual, device, dtype, image_size, max_batch_size, **options)
    if backend == "onnxruntime":
        from vlmrm_fast.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(visual, spec, device, dtype, image_size, **options)
    if backend == "tensorrt":
        from vlmrm_fast.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(visual, spec, device, dtype, image_size, max_batch_size, model_name=model_name, **options)
    raise BackendError(f"backend={backend!r} is not one of {BACKEND_CHOICES[1:]} (resolve 'auto' first).")


__all__ = ["BACKEND_CHOICES", "BackendError", "VisionBackend", "build_backend", "check_backend_options", "resolve_backend"]
