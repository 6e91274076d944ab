"""The "tensorrt" backend: a TensorRT engine built from the tower's ONNX export.

Written against the Python API that TensorRT 10 and 11 share (``build_serialized_network``, named
I/O tensors, ``execute_async_v3``); other major versions are refused with a clear error. See README
for what has been verified where. Precisions: float16, bfloat16 and float32.

Every engine is built as a *strongly typed* network: each layer runs in the type the ONNX graph gives
it. That is TensorRT 11's only mode (it removed the precision flags and per-layer precisions of weak
typing, which 10.12 deprecated) and TensorRT 10's advice. So the graph itself carries the precision:
:func:`typed_tower_graph` rewrites the float32 export to compute in bf16 or fp16 with LayerNorm in
float32, where fp16 CLIP engines lose accuracy (:mod:`vlmrm_fast.backends.onnx_half`); "fp32"
builds the export as it is, with TF32 off. The input takes the fused preprocessing op's output in
the tower's dtype; the output is float32. Engines are cached on disk
(:mod:`vlmrm_fast.backends.engine_cache`).

``quantize="fp8"`` (opt-in, Hopper GPUs or later and TensorRT 10.6 or later: per-channel fp8
matmul weights): the transformer's weight matmuls run in fp8 E4M3, with activation scales
calibrated on ``calibration_frames`` you pass (:mod:`vlmrm_fast.backends.onnx_fp8`), and the rest in
the tower's dtype (bf16 or fp16), LayerNorm in float32, typed the same way.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import numbers
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple, cast

import torch

from vlmrm_fast.backends.base import BackendError, VisionBackend, forward_hook_keys, missing_extra
from vlmrm_fast.backends.engine_cache import EngineCache, EngineKey, tensorrt_build, weights_digest
from vlmrm_fast.backends.onnx_export import OPSET, check_exporter, export_onnx
from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.frames import as_frame_batch
from vlmrm_fast.ops.preprocess import PreprocessSpec, preprocess

_log = logging.getLogger(__name__)

_PRECISIONS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SUPPORTED_MAJORS = (10, 11)
"""TensorRT's major versions whose API this code is written against."""
FP8_MIN_VERSION = (10, 6)
"""Per-channel fp8 weight scales for matmuls arrived in TensorRT 10.6."""
FP8_MIN_CAPABILITY = (9, 0)
"""Hopper: TensorRT's per-channel fp8 matmul scales are for Hopper GPUs (TensorRT 10.6 release notes)."""
BF16_MIN_CAPABILITY = (8, 0)
"""Ampere: the first GPUs with bf16 tensor cores; TensorRT has no bf16 kernels before them."""
ADDRESS_ALIGNMENT = 256
"""``IExecutionContext.setTensorAddress``: "The pointer must have at least 256-byte alignment"."""
QUANTIZE_CHOICES = ("fp8",)


def tensorrt_extra() -> str:
    """The extra that installs TensorRT's build for this torch's CUDA ("tensorrt-cu12"): plain
    `tensorrt` brings the CUDA 13 build from 10.13.2 on, which a CUDA 12 stack's driver may not run."""
    major = (torch.version.cuda or "").split(".")[0]
    return f"tensorrt-cu{major}" if major in ("12", "13") else "tensorrt"


def profile_batch_range(max_batch_size: int, opt_batch_size: Optional[int] = None) -> Tuple[int, int, int]:
    """The engine's optimisation profile over the batch axis: (min, opt, max). TensorRT picks its
    kernels for ``opt`` (default: half of ``max_batch_size``); every batch from 1 to the max runs."""
    if opt_batch_size is None:
        return 1, max(1, max_batch_size // 2), max_batch_size
    integral = isinstance(opt_batch_size, numbers.Integral) and not isinstance(opt_batch_size, bool)
    if not (integral and 1 <= opt_batch_size <= max_batch_size):
        raise BackendError(
            f"opt_batch_size={opt_batch_size!r} must be an integer from 1 to max_batch_size ({max_batch_size}): "
            f"the batch size you will score most often (e.g. your number of envs)."
        )
    return 1, int(opt_batch_size), max_batch_size


def import_tensorrt(what: str = "tensorrt"):
    """The ``tensorrt`` module, if it is installed and of a major version this code is written for."""
    try:
        import tensorrt as trt
    except ImportError:
        raise missing_extra("tensorrt", tensorrt_extra(), what) from None
    if _version(trt)[0] not in SUPPORTED_MAJORS:
        majors = " or ".join(map(str, SUPPORTED_MAJORS))
        raise BackendError(
            f"{what}: vlmrm_fast builds engines with the API of TensorRT {majors}, but TensorRT "
            f"{trt.__version__} is installed; `pip install 'vlmrm-fast[{tensorrt_extra()}]'` (TensorRT "
            f"{majors}), or use backend='compile'."
        )
    return trt


class TensorRTBackend(VisionBackend):
    name = "tensorrt"
    copies_weights = True

    def __init__(
        self,
        visual: torch.nn.Module,
        spec: PreprocessSpec,
        device,
        dtype,
        image_size,
        max_batch_size: int,
        model_name: str = "model",
        cache_dir: Optional[str] = None,
        workspace_gib: float = 8.0,
        quantize: Optional[str] = None,
        calibration_frames=None,
        opt_batch_size: Optional[int] = None,
        exporter: str = "auto",
    ) -> None:
        super().__init__(device, dtype, image_size)
        batch_range = profile_batch_range(max_batch_size, opt_batch_size)
        self.exporter = check_exporter(exporter, self.name)
        if dtype not in _PRECISIONS:
            raise BackendError(f"backend='tensorrt' supports {sorted(_PRECISIONS.values())}, not {dtype}.")
        self.quantize = quantize
        self._calibration = _check_quantize(quantize, dtype, calibration_frames)
        if device.type != "cuda":  # first: installing TensorRT would not help
            raise BackendError("backend='tensorrt' needs a CUDA device; use backend='onnxruntime' or 'torch' on CPU.")
        trt = import_tensorrt(self.name)
        device = self.device
        precision = _PRECISIONS[dtype]
        calibration = ""
        check_precision_support(dtype, device)
        if quantize == "fp8":
            _check_fp8_support(trt, device)
            precision = f"fp8-{precision}"
            calibration = calibration_digest(cast(torch.Tensor, self._calibration), spec)  # None only without fp8
        self._logger = trt.Logger(trt.Logger.WARNING)
        key = EngineKey(
            model=model_name,
            weights=weights_digest(visual),
            precision=precision,
            calibration=calibration,
            image_size=tuple(image_size),
            batch_range=batch_range,
            compute_capability=torch.cuda.get_device_capability(device),
            tensorrt_version=trt.__version__,
            tensorrt_build=tensorrt_build(),
            device_name=torch.cuda.get_device_name(device),
            torch_version=torch.__version__,
            exporter=self.exporter,
        )
        cache = EngineCache(cache_dir)
        start = time.perf_counter()
        # TensorRT builds and deserializes on the current CUDA device, which need not be ``device``.
        with torch.cuda.device(device):
            runtime = _created(trt, trt.Runtime, self._logger, "runtime")
            built = []

            def build() -> bytes:
                built.append(True)
                return self._build(visual, spec, key, workspace_gib, scratch_parent(cache.directory),
                                   cache.scratch_prefix(key))

            # A forward hook (a user's probe or ablation) is traced into the engine, but its code is in no key.
            cacheable = not forward_hook_keys(visual)
            if not cacheable:
                _log.warning("rm.model.visual runs forward hooks, which the engine cache's key cannot tell apart: "
                             "building its TensorRT engine without the cache (minutes for the large towers)")
            engine = load_or_build_engine(cache, key, runtime.deserialize_cuda_engine, build=build,
                                          io_problem=lambda engine: engine_io_problem(trt, engine, precision),
                                          cacheable=cacheable)
            self.build_cached = not built
            self._calibration = None  # only needed to build
            self.context = engine.create_execution_context()
            if self.context is None:  # the bindings return TensorRT's null pointer as None
                raise BackendError(
                    "TensorRT could not create an execution context for the engine (usually out of GPU memory; "
                    "see the TensorRT log above): free GPU memory, or lower max_batch_size."
                )
            # enqueueV3 on the legacy default stream makes TensorRT synchronise around each call.
            self._stream = torch.cuda.Stream(device)
        self._max_batch = key.batch_range[2]
        self._runtime = runtime  # TensorRT's samples keep the runtime alive as long as its engines
        self.engine = engine
        self.embed_dim = int(engine.get_tensor_shape("embeddings")[1])
        self.engine_path: Optional[Path] = cache.path(key) if cacheable else None
        self.build_seconds = time.perf_counter() - start

    def __getstate__(self) -> dict:
        raise TypeError(
            "a reward model on backend='tensorrt' cannot be pickled or copied: its engine, execution context and "
            "CUDA stream belong to this process. Score in this process (VLMRewardVecEnv scores every env's frame "
            "in one batch), or build the reward model inside each worker (the engine cache makes that quick)."
        )

    def _build(self, visual, spec, key: EngineKey, workspace_gib: float, scratch: Optional[Path],
               prefix: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix=prefix, dir=scratch) as tmp:
            from vlmrm_fast.backends.onnx_fp8 import FP8_OPSET, fp8_tower_graph, ort_providers

            # Exported in float32 whatever the tower's dtype: the typed graph rounds each weight once.
            fp32_copy = copy.deepcopy(visual).float()
            opset = FP8_OPSET if self.quantize == "fp8" else OPSET
            onnx_path = export_onnx(fp32_copy, Path(tmp) / "tower.onnx", spec, input_format="pixels",
                                    exporter=self.exporter, opset=opset)
            del fp32_copy
            torch.cuda.empty_cache()  # the copy's memory (7 GB for ViT-bigG-14) is the builder's to use
            if self.quantize == "fp8":
                pixels = _calibration_pixels(cast(torch.Tensor, self._calibration), spec)
                onnx_path = fp8_tower_graph(onnx_path, pixels, _float_precision(key.precision), ort_providers(self.device.index))
            else:
                onnx_path = typed_tower_graph(onnx_path, key.precision)
            keep_only_graph(onnx_path)
            return build_engine(onnx_path, key.precision, key.batch_range, workspace_gib=workspace_gib,
                                logger=self._logger)

    def layer_information(self) -> dict:
        """TensorRT's description of the engine's layers (fusions, tactics, input and output formats
        and precisions), as parsed JSON: where to see which layers run in fp8. A layer's tensors give
        their type under "Format/Datatype" in TensorRT 10, and under separate keys in TensorRT 11."""
        import json

        trt = import_tensorrt(self.name)
        inspector = self.engine.create_engine_inspector()
        return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != self.dtype or pixels.device != self.device:
            raise ValueError(f"the TensorRT engine takes {self.dtype} pixels on {self.device}; got {pixels.dtype} on {pixels.device}.")
        out = torch.empty((pixels.shape[0], self.embed_dim), dtype=torch.float32, device=self.device)
        if pixels.shape[0] == 0:  # the profile starts at batch 1
            return out
        largest = self._max_batch
        if pixels.shape[0] > largest:  # the engine's profile ends there
            for i in range(0, pixels.shape[0], largest):
                out[i : i + largest] = self(pixels[i : i + largest])
            return out
        pixels = aligned_contiguous(pixels)  # a slice of a larger batch can start off the alignment
        context = self.context
        if not context.set_input_shape("pixels", tuple(pixels.shape)):
            raise RuntimeError(f"TensorRT refused input shape {tuple(pixels.shape)}; see the TensorRT log above.")
        if not (context.set_tensor_address("pixels", pixels.data_ptr())
                and context.set_tensor_address("embeddings", out.data_ptr())):
            raise RuntimeError("TensorRT refused a tensor address; see the TensorRT log above.")
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)  # pixels are written on the caller's stream
        with torch.cuda.device(self.device):
            ok = context.execute_async_v3(self._stream.cuda_stream)
        # The caller's stream waits for the engine; the caching allocator must not reuse these
        # buffers before the engine's stream is done with them.
        current.wait_stream(self._stream)
        pixels.record_stream(self._stream)
        out.record_stream(self._stream)
        if not ok:
            raise RuntimeError("TensorRT execution failed; see the TensorRT log above.")
        return out


def _check_quantize(quantize: Optional[str], dtype: torch.dtype, calibration_frames) -> Optional[torch.Tensor]:
    """Validate the quantisation options (before anything needs TensorRT or a GPU); the calibration
    frames as a uint8 CPU tensor [N, H, W, 3], or None."""
    if quantize is None:
        if calibration_frames is not None:
            raise BackendError("calibration_frames are for quantize='fp8'; pass both, or neither.")
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise BackendError(f"backend_options quantize={quantize!r} is not one of {QUANTIZE_CHOICES} (or None).")
    if dtype not in (torch.bfloat16, torch.float16):
        raise BackendError(
            f"quantize='fp8' runs the layers left out of fp8 (attention, LayerNorm, GELU) in the tower's dtype, "
            f"which must be torch.bfloat16 or torch.float16, not {dtype}."
        )
    if calibration_frames is None:
        raise BackendError(
            "quantize='fp8' needs calibration frames to set its activation scales: backend_options="
            "{'quantize': 'fp8', 'calibration_frames': frames}, uint8 [N, H, W, 3], a few hundred frames like "
            "the ones you will score (e.g. renders of a random policy)."
        )
    batch = as_frame_batch(calibration_frames)  # shape, channels, any strides (env.render() output)
    if batch.dtype != torch.uint8 or batch.num_frames == 0:
        raise BackendError(
            f"calibration_frames must be uint8 [N, H, W, 3] with N >= 1 (RGB frames as rendered); "
            f"got {batch.num_frames} frames of {batch.dtype}."
        )
    return batch.chunk(0, batch.num_frames, torch.device("cpu")).detach().contiguous()


def calibration_digest(frames: torch.Tensor, spec: PreprocessSpec) -> str:
    """SHA-256 of the calibration frames and of the preprocessing that turns them into the pixels the
    scales are taken from: an fp8 engine is only valid for those scales."""
    digest = hashlib.sha256(f"{tuple(frames.shape)} {spec!r}".encode())
    digest.update(frames.numpy().tobytes())
    return digest.hexdigest()


def _calibration_pixels(frames: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """The calibration frames through the reference preprocessing, float32 [N, 3, S, S] on the CPU."""
    return torch.cat([preprocess(frames[i : i + 64], spec, torch.float32, impl="torch")
                      for i in range(0, frames.shape[0], 64)])


def _version(trt) -> Tuple[int, int]:
    """(major, minor) of the installed TensorRT."""
    parts = (str(getattr(trt, "__version__", "0")).split(".") + ["0"])[:2]
    major, minor = (int("".join(ch for ch in part if ch.isdigit()) or 0) for part in parts)
    return major, minor


def aligned_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, contiguous and starting on a TensorRT-aligned address (a copy only where needed)."""
    tensor = tensor.contiguous()
    if tensor.data_ptr() % ADDRESS_ALIGNMENT == 0:
        return tensor
    # torch's allocators align less on some devices (64 bytes on CPU), so align the copy explicitly.
    size = tensor.numel() * tensor.element_size()
    memory = torch.empty(size + ADDRESS_ALIGNMENT, dtype=torch.uint8, device=tensor.device)
    start = -memory.data_ptr() % ADDRESS_ALIGNMENT
    return memory[start : start + size].view(tensor.dtype).view(tensor.shape).copy_(tensor)


def _created(trt, factory, logger, what: str):
    """``factory(logger)`` (``trt.Runtime`` or ``trt.Builder``), or a clear error where TensorRT cannot start."""
    try:
        made = factory(logger)
    except TypeError:  # pybind11's "factory function returned nullptr"
        made = None
    if made is None:
        raise BackendError(
            f"TensorRT {trt.__version__} could not create its {what}: usually its CUDA build does not match the "
            f"driver (from 10.13.2 the `tensorrt` package installs the CUDA 13 build, which needs an R580 driver). "
            f"Replace it with the build for torch's CUDA {torch.version.cuda} (the builds overwrite each other's "
            f"files, so remove the other first): `pip uninstall -y tensorrt tensorrt-cu12 tensorrt-cu13 "
            f"tensorrt-cu12-bindings tensorrt-cu13-bindings tensorrt-cu12-libs tensorrt-cu13-libs && "
            f"pip install 'vlmrm-fast[{tensorrt_extra()}]'`; see the TensorRT log above."
        )
    return made


def load_or_build_engine(cache: EngineCache, key: EngineKey, deserialize: Callable[[bytes], object],
                         build: Callable[[], bytes], io_problem: Callable[[object], Optional[str]],
                         cacheable: bool = True):
    """The engine for ``key``: the cached one where its file deserializes and has the tower's inputs
    and outputs (``io_problem(engine)`` is None), else one built afresh (``build()``, serialized
    bytes), checked the same way, then cached. An engine that fails those checks is never cached.
    Builds hold the cache's lock on ``key`` (:meth:`EngineCache.build_lock`): a process that finds it
    held waits, then loads the engine the other one built. ``cacheable=False``: built afresh, checked,
    neither read from the cache nor written to it."""
    if not cacheable:
        return _checked_engine(build(), deserialize, io_problem)
    engine, problem = _cached_engine(cache, key, deserialize, io_problem)
    if engine is not None and problem is None:
        return engine
    with cache.build_lock(key) as held:
        if problem is None:  # another process may have built it while this one waited for the lock
            engine, problem = _cached_engine(cache, key, deserialize, io_problem)
            if engine is not None and problem is None:
                return engine
        if problem is not None:
            _log.warning("the cached TensorRT engine %s is not the tower's (%s): rebuilding it", cache.path(key), problem)
        # absent, stale, damaged, refused by this TensorRT, or not the tower's: build afresh
        if held:
            cache.remove_abandoned(key)
        _log.info("building a TensorRT engine (%s, batch %d to %d; minutes for the large towers), then "
                  "caching it in %s", key.precision, key.batch_range[0], key.batch_range[2], cache.directory)
        payload = build()
        engine = _checked_engine(payload, deserialize, io_problem)
        try:
            cache.store(key, payload)
        except OSError as error:  # a read-only cache must not throw away a built engine
            warnings.warn(f"TensorRT engine not cached ({error}); it is rebuilt next time.", stacklevel=stacklevel_outside_package())
    return engine


def _checked_engine(payload: bytes, deserialize: Callable[[bytes], object],
                    io_problem: Callable[[object], Optional[str]]) -> object:
    """The engine a build serialized, once it deserializes and has the tower's inputs and outputs."""
    engine = deserialize(payload)
    if engine is None:
        raise BackendError("TensorRT built an engine it cannot deserialize; see the TensorRT log above.")
    problem = io_problem(engine)
    if problem is not None:
        raise BackendError(f"TensorRT built an engine whose inputs and outputs are not the tower's: {problem}.")
    return engine


def _cached_engine(cache: EngineCache, key: EngineKey, deserialize: Callable[[bytes], object],
                   io_problem: Callable[[object], Optional[str]]) -> Tuple[object, Optional[str]]:
    """(engine, None) for a good cached engine, (engine, problem) for one that is not the tower's,
    (None, None) where none deserializes."""
    payload = cache.load(key)
    engine = deserialize(payload) if payload is not None else None
    return engine, (io_problem(engine) if engine is not None else None)


def _float_precision(precision: str) -> str:
    """The float type an engine's precision computes in: "fp8-bf16" -> "bf16", "fp16" -> "fp16"."""
    return precision.split("-")[-1]


def _tensor_type(trt, precision: str):
    """TensorRT's data type for the float type of ``precision`` (:func:`_float_precision`)."""
    return {"fp16": trt.float16, "bf16": trt.bfloat16, "fp32": trt.float32}[_float_precision(precision)]


def engine_io_problem(trt, engine, precision: str) -> Optional[str]:
    """None where ``engine`` has exactly the backend's tensors: input "pixels" [N, 3, H, W] in the
    dtype ``precision`` runs in ("bf16", "fp8-bf16": bfloat16; "fp16", "fp8-fp16": float16; "fp32")
    and output "embeddings" [N, D] float32; else what differs. ``__call__`` hands TensorRT raw
    pointers, so an engine with other types would read the pixels' bytes as another dtype."""
    want_in = _tensor_type(trt, precision)
    want = {"pixels": (trt.TensorIOMode.INPUT, want_in, 4), "embeddings": (trt.TensorIOMode.OUTPUT, trt.float32, 2)}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if sorted(names) != sorted(want):
        return f"tensors {names}, not {list(want)}"
    for name, (mode, dtype, rank) in want.items():
        got = (engine.get_tensor_mode(name), engine.get_tensor_dtype(name), len(engine.get_tensor_shape(name)))
        if got != (mode, dtype, rank):
            return f"{name!r} is {got[0]} {got[1]} of rank {got[2]}, not {mode} {dtype} of rank {rank}"
    return None


def scratch_parent(directory: Path) -> Optional[Path]:
    """Where an engine build writes its ONNX graphs (gigabytes for ViT-bigG-14): ``directory`` (the
    engine cache, on the disk the engine goes to) where it can be made, else None (the system's
    temporary folder, often a small tmpfs)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return directory if os.access(directory, os.W_OK) else None


def check_precision_support(dtype: torch.dtype, device: torch.device, fix: str = "use dtype=torch.float16") -> None:
    """A clear error where ``device`` has no TensorRT kernels for ``dtype``; ``fix`` is the way out."""
    capability = torch.cuda.get_device_capability(device)
    if dtype == torch.bfloat16 and capability < BF16_MIN_CAPABILITY:
        raise BackendError(
            f"TensorRT with bfloat16 needs an Ampere GPU or later (compute capability 8.0); "
            f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: {fix}."
        )


def _check_fp8_support(trt, device: torch.device) -> None:
    if _version(trt) < FP8_MIN_VERSION:
        raise BackendError(
            f"quantize='fp8' needs TensorRT >= {'.'.join(map(str, FP8_MIN_VERSION))} (per-channel fp8 weights); "
            f"{trt.__version__} is installed: `pip install -U '{tensorrt_extra()}>=10.6,<12'`."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise BackendError(
            f"quantize='fp8' needs a Hopper GPU or later (compute capability 9.0: TensorRT's per-channel fp8 "
            f"matmuls); "
            f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}. Drop quantize and use bf16."
        )


def typed_tower_graph(onnx_path: Path, precision: str) -> Path:
    """The float32 export at ``onnx_path`` (either input format), typed for a strongly typed build at
    ``precision``: "fp32" as it is; "bf16" and "fp16" rewritten to compute in that type with LayerNorm
    in float32 (:func:`~vlmrm_fast.backends.onnx_half.to_half_precision`), written beside it as
    ``<stem>-<precision>.onnx``. (fp8 graphs come from :func:`~vlmrm_fast.backends.onnx_fp8.fp8_tower_graph`.)"""
    onnx_path = Path(onnx_path)
    if precision == "fp32":
        return onnx_path
    from vlmrm_fast.backends.onnx_half import HALF_TYPES, to_half_precision

    if precision not in HALF_TYPES:
        raise BackendError(f"typed_tower_graph: precision {precision!r} is not one of fp16, bf16, fp32.")
    return to_half_precision(onnx_path, onnx_path.with_name(f"{onnx_path.stem}-{precision}.onnx"), precision)


def keep_only_graph(onnx_path: Path) -> None:
    """Remove every file beside the graph ``onnx_path`` but its own (``<name>``, ``<name>.data``): the
    float32 export and twins it was typed from are not needed by the build, which takes minutes, and
    are gigabytes for ViT-bigG-14. For a scratch folder of the build's own."""
    onnx_path = Path(onnx_path)
    for other in onnx_path.parent.iterdir():
        if other.name not in (onnx_path.name, onnx_path.name + ".data") and other.is_file():
            other.unlink()


def build_engine(
    onnx_path: Path,
    precision: str,
    batch_range: tuple,
    *,
    workspace_gib: float = 8.0,
    logger=None,
) -> bytes:
    """Build a serialized TensorRT engine from a typed ONNX graph of the tower (either input format),
    as a strongly typed network: every layer runs in the type the graph gives it.

    ``precision`` is "fp16", "bf16" or "fp32" for a graph of :func:`typed_tower_graph`, "fp8-bf16" or
    "fp8-fp16" for one of :func:`~vlmrm_fast.backends.onnx_fp8.fp8_tower_graph`. The graph's float
    input ("pixels") must be of that precision's type, or its input uint8 ("frames") and its matmuls
    of that type, and its output float32; "fp32" builds with TF32 off. ``batch_range`` is the
    optimisation profile's (min, opt, max) batch size.
    """
    trt = import_tensorrt()
    if precision not in ("fp16", "bf16", "fp32", "fp8-bf16", "fp8-fp16"):
        raise BackendError(f"TensorRT precision {precision!r} is not one of fp16, bf16, fp32, fp8-bf16, fp8-fp16.")
    if precision.startswith("fp8-") and _version(trt) < FP8_MIN_VERSION:
        raise BackendError(f"fp8 engines need TensorRT >= 10.6; {trt.__version__} is installed.")
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = _created(trt, trt.Builder, logger, "builder")
    # Explicit batch is the only mode since TensorRT 10. The flag's bit differs between 10 and 11
    # (where strong typing is always on and the flag is kept but ignored): never hard-code it.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 1024**3))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions for layer_information()
    if precision == "fp32":  # TensorRT runs float32 matmuls in TF32 unless told otherwise
        config.clear_flag(trt.BuilderFlag.TF32)
    # The graph carries the types; check that it is the graph this precision means.
    tensor_in, tensor_out = network.get_input(0), network.get_output(0)
    want = _tensor_type(trt, precision)
    problem = None
    if tensor_in.dtype not in (want, trt.uint8) or tensor_out.dtype != trt.float32:
        problem = f"input {tensor_in.dtype}, output {tensor_out.dtype}"
    elif tensor_in.dtype == trt.uint8:  # a float input's type says which precision the graph is typed for
        from vlmrm_fast.backends.onnx_half import matmul_types

        computed = matmul_types(onnx_path)
        if computed != {_float_precision(precision)}:
            problem = f"its matmuls compute in {', '.join(sorted(computed))}"
    if problem is not None:
        typed_by = "onnx_fp8.fp8_tower_graph" if precision.startswith("fp8-") else "tensorrt.typed_tower_graph"
        raise BackendError(
            f"{onnx_path} is not a {precision} tower graph ({problem}); type it with vlmrm_fast.backends.{typed_by}."
        )
    low, opt, high = batch_range
    sample = tuple(tensor_in.shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor_in.name, (low,) + sample, (opt,) + sample, (high,) + sample)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError("TensorRT failed to build the engine; see the TensorRT log above.")
    return bytes(serialized)
