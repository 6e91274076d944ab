"""The TensorRT backend's host-side logic, with TensorRT and CUDA stood in for (no TensorRT, no GPU).

What a user relies on and a stand-in can show: the precision flags each precision builds with
(fp16, bf16, fp32 without TF32; fp8 strongly typed, without flags), LayerNorm kept in float32, the
I/O types and the dynamic batch profile's (min, opt, max), the engine cache's key and its refusal
of a damaged file, the errors that name the fix, and ``__call__``'s split of large batches over
the profile, its aligned input and its stream handling. Whether TensorRT itself builds and runs
these engines is for the GPU tests in test_backends.py and test_fp8.py.
"""
import ctypes
import enum
import json
import math
import re
import sys
import types

import numpy as np
import pytest
import torch

from vlmrm_fast.backends import BackendError
from vlmrm_fast.backends import tensorrt as backend
from vlmrm_fast.ops.preprocess import PreprocessSpec
from test_engine_cache import FakeEngine

# ---- a stand-in for TensorRT 10's documented Python API ----------------------------------------------
# Only what vlmrm_fast/backends/tensorrt.py calls, under the names TensorRT 10 documents (Builder,
# INetworkDefinition, OnnxParser, IBuilderConfig, IOptimizationProfile, Runtime, ICudaEngine,
# IExecutionContext). It records what it is asked and builds nothing: a "plan" it returns
# deserializes to an engine whose I/O tensors are the network's as the backend left them. TensorRT's
# defaults are kept where the backend depends on them: a new builder config has TF32 on, and
# STRONGLY_TYPED is bit 1 of create_network's flags (bit 0, EXPLICIT_BATCH, is ignored in TensorRT 10).

DataType = enum.Enum("DataType", "FLOAT HALF BF16 UINT8 FP8")
BuilderFlag = enum.Enum("BuilderFlag",
                        "FP16 BF16 FP8 INT8 TF32 OBEY_PRECISION_CONSTRAINTS PREFER_PRECISION_CONSTRAINTS")
LayerType = enum.Enum("LayerType", "CONVOLUTION MATRIX_MULTIPLY NORMALIZATION ELEMENTWISE SOFTMAX")
TORCH_DTYPES = {DataType.FLOAT: torch.float32, DataType.HALF: torch.float16, DataType.BF16: torch.bfloat16,
                DataType.UINT8: torch.uint8}


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class Logger:
    VERBOSE, INFO, WARNING, ERROR = range(4)

    def __init__(self, min_severity=WARNING):
        self.min_severity = min_severity


class Tensor:
    """ITensor: name, dtype (settable, as the bindings allow) and shape (-1 for the batch axis)."""

    def __init__(self, name, dtype, shape):
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)


class Layer:
    """ILayer; ``precision`` None stands for "not set" (precisionIsSet() false)."""

    def __init__(self, type):
        self.type, self.precision, self.output_types = type, None, {}

    def set_output_type(self, index, dtype):
        self.output_types[index] = dtype


class Network:
    def __init__(self, flags):
        self.flags, self.inputs, self.outputs, self.layers = flags, [], [], []

    num_layers = property(lambda self: len(self.layers))

    def get_input(self, index):
        return self.inputs[index]

    def get_output(self, index):
        return self.outputs[index]

    def get_layer(self, index):
        return self.layers[index]


class BuilderConfig:
    def __init__(self):
        self.flags = {BuilderFlag.TF32}  # TensorRT's default
        self.pool_limits, self.profiles, self.profiling_verbosity = {}, [], None

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool, size):
        self.pool_limits[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1


class OptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, input, min, opt, max):
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class ParserError:
    def __init__(self, desc):
        self.desc = desc

    def __str__(self):
        return f"In node -1 with name: and operator: (parseGraph): {self.desc}"


# What the stood-in OnnxParser finds in any graph: a tower with two LayerNorms between matmuls.
TOWER = {"input": ("pixels", DataType.FLOAT, (-1, 3, 16, 16)), "output": ("embeddings", DataType.FLOAT, (-1, 4)),
         "layers": (LayerType.CONVOLUTION, LayerType.NORMALIZATION, LayerType.MATRIX_MULTIPLY,
                    LayerType.NORMALIZATION, LayerType.MATRIX_MULTIPLY)}


def tensorrt_stand_in(version="10.13.3.9", graph=TOWER, parse_errors=(), build_fails=False, runtime_starts=True,
                      context_starts=True, set_input_shape_ok=True, execute_ok=True):
    """A ``tensorrt`` module for sys.modules; what it was asked is in its ``record``."""
    trt = types.ModuleType("tensorrt")
    record = types.SimpleNamespace(networks=[], configs=[], parsed=[], plans={}, deserialized=[], builds=0,
                                   executions=[], devices=[])
    trt.__version__, trt.record = version, record
    trt.DataType, trt.BuilderFlag, trt.LayerType = DataType, BuilderFlag, LayerType
    trt.float32, trt.float16, trt.bfloat16, trt.uint8 = DataType.FLOAT, DataType.HALF, DataType.BF16, DataType.UINT8
    trt.NetworkDefinitionCreationFlag, trt.Logger = NetworkDefinitionCreationFlag, Logger
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM")
    trt.ProfilingVerbosity = enum.Enum("ProfilingVerbosity", "LAYER_NAMES_ONLY NONE DETAILED")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
    trt.LayerInformationFormat = enum.Enum("LayerInformationFormat", "ONELINE JSON")

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            record.networks.append(Network(flags))
            return record.networks[-1]

        def create_builder_config(self):
            record.configs.append(BuilderConfig())
            return record.configs[-1]

        def create_optimization_profile(self):
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            record.builds += 1
            record.devices.append(("build", CudaDevice.current))
            if build_fails:
                return None
            plan = f"plan {record.builds}".encode()
            low, _, high = config.profiles[0].shapes[network.get_input(0).name]
            record.plans[plan] = {t.name: (mode, t.dtype, (-1,) + t.shape[1:]) for t, mode in
                                  ((network.get_input(0), trt.TensorIOMode.INPUT),
                                   (network.get_output(0), trt.TensorIOMode.OUTPUT))}, (low[0], high[0])
            return memoryview(plan)  # IHostMemory: a buffer, not bytes

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            record.parsed.append(path)
            if parse_errors:
                self.num_errors = len(parse_errors)
                return False
            self.network.inputs = [Tensor(*graph["input"])]
            self.network.outputs = [Tensor(*graph["output"])]
            self.network.layers = [Layer(kind) for kind in graph["layers"]]
            return True

        def get_error(self, index):
            return ParserError(parse_errors[index])

    class Engine(FakeEngine):  # its named I/O tensors as test_engine_cache stands them in, and a context
        def __init__(self, tensors, batch_range):
            super().__init__(tensors)
            self.batch_range = batch_range

        def create_execution_context(self):
            return ExecutionContext(self) if context_starts else None

        def create_engine_inspector(self):
            layers = {"Layers": [{"Name": "ln_1", "Precision": "FLOAT"}]}
            formats = {trt.LayerInformationFormat.JSON: json.dumps(layers), trt.LayerInformationFormat.ONELINE: "ln_1"}
            return types.SimpleNamespace(get_engine_information=formats.__getitem__)

    class ExecutionContext:
        """Runs "the tower" on host memory through the pointers it is given: embeddings are each
        frame's first values, so a wrong pointer, shape or stride shows in the output."""

        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            low, high = self.engine.batch_range
            self.shapes[name] = tuple(shape)
            fits = low <= shape[0] <= high and tuple(shape[1:]) == self.engine.get_tensor_shape(name)[1:]
            return set_input_shape_ok and fits

        def set_tensor_address(self, name, address):
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle):
            shape = self.shapes["pixels"]
            width = self.engine.get_tensor_shape("embeddings")[1]
            dtype = TORCH_DTYPES[self.engine.get_tensor_dtype("pixels")]
            pixels = host_tensor(self.addresses["pixels"], dtype, shape)
            embeddings = host_tensor(self.addresses["embeddings"], torch.float32, (shape[0], width))
            embeddings.copy_(pixels.flatten(1)[:, :width])
            record.executions.append((shape, self.addresses["pixels"], stream_handle))
            return execute_ok

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan):
            record.deserialized.append(bytes(plan))
            record.devices.append(("deserialize", CudaDevice.current))
            found = record.plans.get(bytes(plan))
            return None if found is None else Engine(*found)

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    trt.Runtime = Runtime if runtime_starts else (lambda logger: None)  # the bindings' null pointer
    return trt


def host_tensor(address, dtype, shape):
    """The tensor of ``shape`` and ``dtype`` at host ``address`` (what a device pointer is to an engine)."""
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * size).from_address(address), dtype=dtype).view(shape)


# ---- torch.cuda stood in for: the device context, streams, device properties --------------------------


class CudaDevice:
    """torch.cuda.device(...): which device TensorRT work runs under."""

    current = None

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.before, CudaDevice.current = CudaDevice.current, self.device

    def __exit__(self, *exc):
        CudaDevice.current = self.before


class Stream:
    """torch.cuda.Stream: records which stream waited for which, in order, in ``log``."""

    log = []

    def __init__(self, device=None, name="engine"):
        self.name, self.cuda_stream = name, id(self)  # cudaStream_t, as an int

    def wait_stream(self, other):
        Stream.log.append(f"{self.name} waits for {other.name}")


SPEC = PreprocessSpec(size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device (an H200 unless a test says otherwise) whose TensorRT work is recorded."""
    gpu = types.SimpleNamespace(name="NVIDIA H200", capability=(9, 0), exports=[], fp8_graphs=[])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu.name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu.capability)
    monkeypatch.setattr(torch.cuda, "device", CudaDevice)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    caller = Stream(name="caller")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: Stream.log.append(
        f"{tuple(tensor.shape)} recorded on {stream.name}"))
    monkeypatch.setattr(Stream, "log", [])

    def export_onnx(module, path, spec, input_format="uint8-nhwc", opset=17):
        gpu.exports.append(types.SimpleNamespace(dtype=next(module.parameters()).dtype, path=path,
                                                 input_format=input_format, opset=opset))
        return path

    def fp8_tower_graph(source, pixels, half, providers):
        gpu.fp8_graphs.append(types.SimpleNamespace(source=source, pixels=pixels, half=half))
        return source.with_name("tower-fp8.onnx")

    monkeypatch.setattr(backend, "export_onnx", export_onnx)
    monkeypatch.setattr("vlmrm_fast.backends.onnx_fp8.fp8_tower_graph", fp8_tower_graph)
    return gpu


def tower(dtype):
    """A stand-in vision tower, the same weights every time."""
    visual = torch.nn.Linear(4, 4)
    with torch.no_grad():
        visual.weight.copy_(torch.arange(16.0).view(4, 4))
        visual.bias.zero_()
    return visual.to(dtype)


def make_backend(monkeypatch, trt, cache_dir, dtype=torch.bfloat16, max_batch_size=8, **options):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return backend.TensorRTBackend(tower(dtype), SPEC, torch.device("cuda"), dtype, (16, 16), max_batch_size,
                                   model_name="ViT-tiny/16", cache_dir=cache_dir, **options)


def cached_key(path):
    """The key in a cached engine file's header (engine_cache's format: magic line, JSON header, engine)."""
    return json.loads(path.read_bytes().split(b"\n", 2)[1])["key"]


# ---- behaviours a mutation audit found untested ---------------------------------------------------


def test_the_batch_profile_runs_from_one_through_half_to_the_largest_batch():
    assert backend.profile_batch_range(8) == (1, 4, 8)
    assert backend.profile_batch_range(9) == (1, 4, 9)
    assert backend.profile_batch_range(1) == (1, 1, 1)  # opt is a batch the profile holds


@pytest.mark.parametrize("precision,flags,input_dtype", [
    ("fp16", {BuilderFlag.FP16, BuilderFlag.TF32}, DataType.HALF),
    ("bf16", {BuilderFlag.BF16, BuilderFlag.TF32}, DataType.BF16),
    ("fp32", set(), DataType.FLOAT),  # TF32 cleared: "fp32" means float32 matmuls
])
def test_build_engine_sets_the_precisions_flags_and_keeps_layernorm_float32(monkeypatch, tmp_path, precision, flags,
                                                                            input_dtype):
    trt = tensorrt_stand_in()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    plan = backend.build_engine(tmp_path / "tower.onnx", precision, (1, 4, 8), workspace_gib=1.5)
    [network], [config] = trt.record.networks, trt.record.configs
    assert plan == b"plan 1" and type(plan) is bytes
    assert trt.record.parsed == [str(tmp_path / "tower.onnx")]
    assert network.flags == 0  # weakly typed: the flags choose the precisions
    assert config.flags == flags | {BuilderFlag.OBEY_PRECISION_CONSTRAINTS}
    for layer in network.layers:
        if layer.type == LayerType.NORMALIZATION:
            assert layer.precision == DataType.FLOAT and layer.output_types == {0: DataType.FLOAT}
        else:
            assert layer.precision is None and layer.output_types == {}
    assert network.get_input(0).dtype == input_dtype and network.get_output(0).dtype == DataType.FLOAT
    [profile] = config.profiles
    assert profile.shapes == {"pixels": ((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))}
    assert config.pool_limits == {trt.MemoryPoolType.WORKSPACE: int(1.5 * 2**30)}
    assert config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED  # layer_information() needs it


def test_build_engine_keeps_a_uint8_input_uint8_and_makes_the_output_float32(monkeypatch, tmp_path):
    # build_engine takes either export format (`vlmrm-fast export --format tensorrt`), of any float type.
    frames = {**TOWER, "input": ("frames", DataType.UINT8, (-1, 16, 16, 3)),
              "output": ("embeddings", DataType.HALF, (-1, 4))}
    trt = tensorrt_stand_in(graph=frames)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    backend.build_engine(tmp_path / "tower.onnx", "fp16", (1, 2, 4))
    [network], [config] = trt.record.networks, trt.record.configs
    assert network.get_input(0).dtype == DataType.UINT8 and network.get_output(0).dtype == DataType.FLOAT
    assert config.profiles[0].shapes == {"frames": ((1, 16, 16, 3), (2, 16, 16, 3), (4, 16, 16, 3))}


@pytest.mark.parametrize("precision,input_dtype", [("fp8-bf16", DataType.BF16), ("fp8-fp16", DataType.HALF),
                                                   ("fp8-bf16", DataType.UINT8)])
def test_fp8_builds_strongly_typed_with_no_precision_flags(monkeypatch, tmp_path, precision, input_dtype):
    # Strongly typed networks take their types from the graph; TensorRT refuses precision flags,
    # layer precisions and output types on them.
    trt = tensorrt_stand_in(graph={**TOWER, "input": ("pixels", input_dtype, (-1, 3, 16, 16))})
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    backend.build_engine(tmp_path / "tower.onnx", precision, (1, 4, 8))
    [network], [config] = trt.record.networks, trt.record.configs
    assert network.flags == 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert config.flags == {BuilderFlag.TF32}  # as TensorRT made it
    assert all(layer.precision is None and not layer.output_types for layer in network.layers)
    assert network.get_input(0).dtype == input_dtype
    assert config.profiles[0].shapes == {"pixels": ((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))}


@pytest.mark.parametrize("tensor,dtype", [("input", DataType.FLOAT), ("input", DataType.HALF),
                                          ("output", DataType.BF16)])
def test_fp8_build_refuses_a_graph_of_other_types(monkeypatch, tmp_path, tensor, dtype):
    fp8_bf16 = {**TOWER, "input": ("pixels", DataType.BF16, (-1, 3, 16, 16))}  # what fp8_tower_graph writes
    name, _, shape = fp8_bf16[tensor]
    trt = tensorrt_stand_in(graph={**fp8_bf16, tensor: (name, dtype, shape)})
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(BackendError, match=r"is not a fp8-bf16 tower graph.*onnx_fp8\.fp8_tower_graph"):
        backend.build_engine(tmp_path / "tower.onnx", "fp8-bf16", (1, 4, 8))
    assert trt.record.builds == 0


def test_build_engine_errors_name_the_cause(monkeypatch, tmp_path):
    onnx = tmp_path / "tower.onnx"
    for trt, precision, match in [
        (tensorrt_stand_in(parse_errors=("no importer for op Foo", "bad initializer")), "bf16",
         rf"could not parse {re.escape(str(onnx))}: .*no importer for op Foo; .*bad initializer$"),
        (tensorrt_stand_in(build_fails=True), "bf16", "failed to build the engine; see the TensorRT log above"),
        (tensorrt_stand_in(), "int8", "precision 'int8' is not one of fp16, bf16, fp32, fp8-bf16, fp8-fp16"),
        (tensorrt_stand_in(version="10.5.0"), "fp8-bf16", r"fp8 engines need TensorRT >= 10\.6; 10\.5\.0 is installed"),
    ]:
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        with pytest.raises(BackendError, match=match):
            backend.build_engine(onnx, precision, (1, 4, 8))


def test_the_backend_keys_its_engine_builds_it_once_and_rebuilds_a_damaged_file(monkeypatch, tmp_path, fake_cuda):
    trt = tensorrt_stand_in()
    cache_dir = tmp_path / "engines"
    rm = make_backend(monkeypatch, trt, cache_dir, workspace_gib=2.0)
    key = cached_key(rm.engine_path)
    assert rm.engine_path.parent == cache_dir
    assert (key["model"], key["precision"], key["batch_range"]) == ("ViT-tiny/16", "bf16", [1, 4, 8])
    assert (key["compute_capability"], key["device_name"]) == ([9, 0], "NVIDIA H200")
    assert (key["tensorrt_version"], key["torch_version"], key["calibration"]) == ("10.13.3.9", torch.__version__, "")
    assert key["weights"] == backend.weights_digest(tower(torch.bfloat16))
    # Built once, from a float32 export written under the cache folder, inside the backend's device.
    [export] = fake_cuda.exports
    assert export.dtype == torch.float32 and export.input_format == "pixels" and export.opset == 17
    assert export.path.parent.parent == cache_dir  # not the system's (often small) temporary folder
    assert trt.record.builds == 1 and trt.record.configs[0].pool_limits[trt.MemoryPoolType.WORKSPACE] == 2 * 2**30
    assert {device for _, device in trt.record.devices} == {rm.device}  # cuda:0 where CUDA is real
    assert rm.embed_dim == 4 and rm._max_batch == 8
    # Loaded from the cache, not rebuilt.
    make_backend(monkeypatch, trt, cache_dir)
    assert trt.record.builds == 1 and trt.record.deserialized == [b"plan 1", b"plan 1"]
    # A damaged file is rebuilt, never used, and replaced.
    blob = rm.engine_path.read_bytes()
    rm.engine_path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    make_backend(monkeypatch, trt, cache_dir)
    assert trt.record.builds == 2 and trt.record.deserialized[-1] == b"plan 2"
    assert rm.engine_path.read_bytes().endswith(b"plan 2")
    # Another GPU or batch range is another engine.
    fake_cuda.capability = (9, 1)
    other = make_backend(monkeypatch, trt, cache_dir, max_batch_size=16)
    assert trt.record.builds == 3 and other.engine_path != rm.engine_path
    assert cached_key(other.engine_path)["compute_capability"] == [9, 1]
    assert cached_key(other.engine_path)["batch_range"] == [1, 8, 16] and other._max_batch == 16


@pytest.mark.parametrize("dtype,half", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_an_fp8_backend_builds_from_its_calibrated_graph_and_keys_the_frames(monkeypatch, tmp_path, fake_cuda, dtype,
                                                                              half):
    trt_dtype = {"bf16": DataType.BF16, "fp16": DataType.HALF}[half]
    trt = tensorrt_stand_in(graph={**TOWER, "input": ("pixels", trt_dtype, (-1, 3, 16, 16))})
    frames = np.random.default_rng(0).integers(0, 256, (3, 12, 20, 3), dtype=np.uint8)
    rm = make_backend(monkeypatch, trt, tmp_path, dtype=dtype, quantize="fp8", calibration_frames=frames)
    key = cached_key(rm.engine_path)
    assert key["precision"] == f"fp8-{half}"
    assert key["calibration"] == backend.calibration_digest(torch.from_numpy(frames), SPEC)
    [export], [graph] = fake_cuda.exports, fake_cuda.fp8_graphs
    assert export.dtype == torch.float32 and export.opset == 19  # QuantizeLinear with float8 types
    assert graph.source == export.path and graph.half == half and graph.pixels.shape == (3, 3, 16, 16)
    assert trt.record.parsed == [str(export.path.with_name("tower-fp8.onnx"))]
    assert trt.record.networks[0].flags == 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert rm._calibration is None  # the frames are not kept once the engine is built


@pytest.mark.parametrize("stand_in,gpu,dtype,options,match", [
    ({"runtime_starts": False}, None, torch.bfloat16, {}, r"could not create its runtime.*pip uninstall -y tensorrt"),
    ({"context_starts": False}, None, torch.bfloat16, {},
     r"could not create an execution context.*lower max_batch_size"),
    ({}, None, torch.float64, {}, r"supports \['bf16', 'fp16', 'fp32'\], not torch.float64"),
    ({}, ("Tesla T4", (7, 5)), torch.bfloat16, {}, r"Ampere GPU or later.*Tesla T4 is 7\.5: use dtype=torch.float16"),
    ({}, ("NVIDIA L40S", (8, 9)), torch.bfloat16, {"quantize": "fp8"}, r"Hopper GPU.*L40S is 8\.9\. Drop quantize"),
    ({"version": "10.5.0"}, None, torch.bfloat16, {"quantize": "fp8"},
     r"needs TensorRT >= 10\.6.*10\.5\.0 is installed"),
])
def test_the_backends_errors_name_the_fix(monkeypatch, tmp_path, fake_cuda, stand_in, gpu, dtype, options, match):
    if gpu:
        fake_cuda.name, fake_cuda.capability = gpu
    if options.get("quantize"):
        options["calibration_frames"] = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(BackendError, match=match):
        make_backend(monkeypatch, tensorrt_stand_in(**stand_in), tmp_path, dtype=dtype, **options)


def test_layer_information_is_tensorrts_json_description(monkeypatch, tmp_path, fake_cuda):
    rm = make_backend(monkeypatch, tensorrt_stand_in(), tmp_path)
    assert rm.layer_information() == {"Layers": [{"Name": "ln_1", "Precision": "FLOAT"}]}


def test_fp8_is_allowed_from_tensorrt_10_6_on(monkeypatch, tmp_path, fake_cuda):
    # Versions compare as numbers: 10.10 is after 10.6.
    for version in ("10.6.0", "10.10.0.31"):
        trt = tensorrt_stand_in(version=version, graph={**TOWER, "input": ("pixels", DataType.BF16, (-1, 3, 16, 16))})
        make_backend(monkeypatch, trt, tmp_path / version, quantize="fp8",
                     calibration_frames=np.zeros((1, 8, 8, 3), np.uint8))
        assert trt.record.builds == 1


def _host_backend(monkeypatch, tmp_path, max_batch_size, dtype=torch.float32, **stand_in):
    """A backend whose stood-in engine reads and writes host memory: ``__call__`` on CPU tensors.
    Its frames are 3 x 15 x 15 (1350 bytes in bf16), so a slice of a batch starts off TensorRT's alignment."""
    graph = {**TOWER, "input": ("pixels", DataType.FLOAT, (-1, 3, 15, 15))}
    rm = make_backend(monkeypatch, tensorrt_stand_in(graph=graph, **stand_in), tmp_path, dtype=dtype,
                      max_batch_size=max_batch_size)
    rm.device = torch.device("cpu")
    return rm


def test_call_splits_a_large_batch_over_the_profile_and_hands_tensorrt_aligned_inputs(monkeypatch, tmp_path, fake_cuda):
    rm = _host_backend(monkeypatch, tmp_path, max_batch_size=2, dtype=torch.bfloat16)
    trt = sys.modules["tensorrt"]
    pixels = torch.randn(5, 3, 15, 15).to(torch.bfloat16)
    Stream.log.clear()
    out = rm(pixels)
    assert out.dtype == torch.float32 and torch.equal(out, pixels.flatten(1)[:, :4].float())
    assert [shape[0] for shape, _, _ in trt.record.executions] == [2, 2, 1]
    assert all(address % backend.ADDRESS_ALIGNMENT == 0 for _, address, _ in trt.record.executions)
    assert {handle for _, _, handle in trt.record.executions} == {rm._stream.cuda_stream}
    # Each call: the engine's stream waits for the caller's writes, then the caller for the engine,
    # and the caching allocator keeps both buffers until the engine's stream is done with them.
    one_call = ["engine waits for caller", "caller waits for engine",
                "(2, 3, 15, 15) recorded on engine", "(2, 4) recorded on engine"]
    assert Stream.log[:4] == one_call and len(Stream.log) == 12
    assert rm(pixels[:0]).shape == (0, 4) and len(trt.record.executions) == 3  # nothing to run
    assert torch.equal(rm(pixels[:3]), out[:3])  # one past the profile's end
    assert [shape[0] for shape, _, _ in trt.record.executions[3:]] == [2, 1]


def test_call_errors_say_what_tensorrt_refused(monkeypatch, tmp_path, fake_cuda):
    rm = _host_backend(monkeypatch, tmp_path, max_batch_size=4)
    with pytest.raises(ValueError, match=r"takes torch.float32 pixels on cpu; got torch.float16 on cpu"):
        rm(torch.zeros(1, 3, 15, 15, dtype=torch.float16))
    rm = _host_backend(monkeypatch, tmp_path / "shape", max_batch_size=4, set_input_shape_ok=False)
    with pytest.raises(RuntimeError, match=r"refused input shape \(2, 3, 15, 15\)"):
        rm(torch.zeros(2, 3, 15, 15))
    rm = _host_backend(monkeypatch, tmp_path / "run", max_batch_size=4, execute_ok=False)
    with pytest.raises(RuntimeError, match="TensorRT execution failed"):
        rm(torch.zeros(2, 3, 15, 15))
