"""The TensorRT backend's host-side logic, with TensorRT and CUDA stood in for (no TensorRT, no GPU).

What a user relies on and a stand-in can show: every precision built strongly typed (TensorRT 10 and
11) from the graph typed for it (fp32 with TF32 off), no weak-typing API used, the I/O types and the
dynamic batch profile's (min, opt, max), the engine cache's key and its refusal of a damaged file,
the errors that name the fix, and ``__call__``'s split of large batches over the profile, its
aligned input and its stream handling. The stood-in parser reads real ONNX graphs where a test gives
it one, so what TensorRT would be handed (types, LayerNorm in float32) is the real rewrite's. Whether
TensorRT itself builds and runs these engines is for the GPU tests in test_backends.py and test_fp8.py.
"""
import ctypes
import enum
import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmrm_fast.backends import BackendError
from vlmrm_fast.backends import tensorrt as backend
from vlmrm_fast.ops.preprocess import PreprocessSpec
from test_engine_cache import FakeEngine

# ---- a stand-in for TensorRT 10's and 11's documented Python API -------------------------------------
# Only what vlmrm_fast/backends/tensorrt.py calls, under the names TensorRT documents (Builder,
# INetworkDefinition, OnnxParser, IBuilderConfig, IOptimizationProfile, Runtime, ICudaEngine,
# IExecutionContext). It records what it is asked and builds nothing: a "plan" it returns
# deserializes to an engine whose I/O tensors are the network's. TensorRT's defaults are kept where
# the backend depends on them: a new builder config has TF32 on, and STRONGLY_TYPED is bit 1 of
# create_network's flags in TensorRT 10 (bit 0, EXPLICIT_BATCH, is ignored) and bit 0 in TensorRT 11
# (which removed EXPLICIT_BATCH and weak typing's builder flags). Tensor types are the graph's and
# read-only, and layers take no precision or output type, as in a strongly typed network.

DataType = enum.Enum("DataType", "FLOAT HALF BF16 UINT8 FP8")
BuilderFlag = enum.Enum("BuilderFlag",
                        "FP16 BF16 FP8 INT8 TF32 OBEY_PRECISION_CONSTRAINTS PREFER_PRECISION_CONSTRAINTS")
BuilderFlag11 = enum.Enum("BuilderFlag", "TF32 REFIT VERSION_COMPATIBLE")  # weak typing's flags removed
LayerType = enum.Enum("LayerType", "CONVOLUTION MATRIX_MULTIPLY NORMALIZATION ELEMENTWISE SOFTMAX")
TORCH_DTYPES = {DataType.FLOAT: torch.float32, DataType.HALF: torch.float16, DataType.BF16: torch.bfloat16,
                DataType.UINT8: torch.uint8}


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class NetworkDefinitionCreationFlag11(enum.IntEnum):
    STRONGLY_TYPED = 0  # kept, ignored: strong typing is always on
    PREFER_JIT_PYTHON_PLUGINS = 1


class Logger:
    VERBOSE, INFO, WARNING, ERROR = range(4)

    def __init__(self, min_severity=WARNING):
        self.min_severity = min_severity


class Tensor:
    """ITensor: name, dtype (read-only: the graph's) and shape (-1 for the batch axis)."""

    def __init__(self, name, dtype, shape):
        self.name, self._dtype, self.shape = name, dtype, tuple(shape)

    dtype = property(lambda self: self._dtype)


class Layer:
    """ILayer: its type and its first output's type, as the graph gives them. No ``precision`` or
    ``set_output_type``: a strongly typed network refuses them, and TensorRT 11 removed them."""

    __slots__ = ("type", "output_dtype")

    def __init__(self, type, output_dtype):
        self.type, self.output_dtype = type, output_dtype


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
    def __init__(self, tf32):
        self.flags = {tf32}  # TensorRT's default
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


# A stand-in graph file (what the stood-in exporter and rewrites write): a float32 tower export with two
# LayerNorms between matmuls, each layer with its output's type.
TOWER = {"input": ("pixels", DataType.FLOAT, (-1, 3, 16, 16)), "output": ("embeddings", DataType.FLOAT, (-1, 4)),
         "layers": ((LayerType.CONVOLUTION, DataType.FLOAT), (LayerType.NORMALIZATION, DataType.FLOAT),
                    (LayerType.MATRIX_MULTIPLY, DataType.FLOAT), (LayerType.NORMALIZATION, DataType.FLOAT),
                    (LayerType.MATRIX_MULTIPLY, DataType.FLOAT))}


def typed(graph, dtype):
    """``graph`` as the half rewrite types it: a float input and every layer but LayerNorm in ``dtype``."""
    name, input_dtype, shape = graph["input"]
    return {**graph, "input": (name, dtype if input_dtype == DataType.FLOAT else input_dtype, shape),
            "layers": tuple((kind, DataType.FLOAT if kind == LayerType.NORMALIZATION else dtype)
                            for kind, _ in graph["layers"])}


def write_graph(path, graph=TOWER):
    """Write a stand-in graph file for the stood-in parser; returns ``path``."""
    Path(path).write_text(json.dumps({
        "input": [graph["input"][0], graph["input"][1].name, graph["input"][2]],
        "output": [graph["output"][0], graph["output"][1].name, graph["output"][2]],
        "layers": [[kind.name, dtype.name] for kind, dtype in graph["layers"]]}))
    return Path(path)


ONNX_TYPES = {1: DataType.FLOAT, 2: DataType.UINT8, 10: DataType.HALF, 16: DataType.BF16}
ONNX_LAYERS = {"Conv": LayerType.CONVOLUTION, "MatMul": LayerType.MATRIX_MULTIPLY, "Gemm": LayerType.MATRIX_MULTIPLY,
               "LayerNormalization": LayerType.NORMALIZATION, "Softmax": LayerType.SOFTMAX}


def read_graph(path):
    """(input, output, layers) of the graph file at ``path``: a stand-in graph, or a real ONNX graph
    (its I/O tensors, and a layer per Conv, MatMul, Gemm, LayerNorm and Softmax node, with the type
    ONNX's strict type inference gives its output; other nodes are left out)."""
    blob = Path(path).read_bytes()
    if blob.startswith(b"{"):
        graph = json.loads(blob)
        tensor = lambda entry: Tensor(entry[0], DataType[entry[1]], entry[2])  # noqa: E731
        return (tensor(graph["input"]), tensor(graph["output"]),
                [Layer(LayerType[kind], DataType[dtype]) for kind, dtype in graph["layers"]])
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False), strict_mode=True)
    graph = model.graph
    types_ = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.output)}

    def tensor(value):
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        return Tensor(value.name, ONNX_TYPES[value.type.tensor_type.elem_type], shape)

    layers = [Layer(ONNX_LAYERS[n.op_type], ONNX_TYPES[types_[n.output[0]]]) for n in graph.node if n.op_type in ONNX_LAYERS]
    given = graph.input[0]
    if ONNX_TYPES[given.type.tensor_type.elem_type] == DataType.UINT8:  # DataType::kUINT8's notes in NvInferRuntimeBase.h
        readers = [n.op_type for n in graph.node if given.name in n.input]
        assert readers == ["Cast"], f"TensorRT takes a uint8 input only straight into a cast layer; it feeds {readers}"
    return tensor(graph.input[0]), tensor(graph.output[0]), layers


def tensorrt_stand_in(version="10.13.3.9", parse_errors=(), build_fails=False, runtime_starts=True,
                      context_starts=True, set_input_shape_ok=True, execute_ok=True):
    """A ``tensorrt`` module for sys.modules, of TensorRT 10's API or, from ``version`` 11 on, 11's;
    what it was asked is in its ``record``."""
    trt = types.ModuleType("tensorrt")
    record = types.SimpleNamespace(networks=[], configs=[], parsed=[], plans={}, deserialized=[], builds=0,
                                   executions=[], devices=[], beside=[])
    trt.__version__, trt.record = version, record
    eleven = int(version.split(".")[0]) >= 11
    trt.DataType, trt.LayerType = DataType, LayerType
    trt.BuilderFlag = BuilderFlag11 if eleven else BuilderFlag
    trt.float32, trt.float16, trt.bfloat16, trt.uint8 = DataType.FLOAT, DataType.HALF, DataType.BF16, DataType.UINT8
    trt.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag11 if eleven else NetworkDefinitionCreationFlag
    trt.Logger = Logger
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
            record.configs.append(BuilderConfig(trt.BuilderFlag.TF32))
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
            record.beside.append(sorted(p.name for p in Path(path).parent.iterdir()))  # the folder as parsed
            if parse_errors:
                self.num_errors = len(parse_errors)
                return False
            tensor_in, tensor_out, self.network.layers = read_graph(path)
            self.network.inputs, self.network.outputs = [tensor_in], [tensor_out]
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
    """A CUDA device (an H200 unless a test says otherwise) whose TensorRT work is recorded. The
    exporter and the graph rewrites are stood in for too: they write stand-in graph files (the
    export: ``gpu.graph``), typed as the real ones are."""
    gpu = types.SimpleNamespace(name="NVIDIA H200", capability=(9, 0), graph=TOWER, exports=[], half_graphs=[],
                                fp8_graphs=[])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu.name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu.capability)
    monkeypatch.setattr(torch.cuda, "device", CudaDevice)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    caller = Stream(name="caller")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: Stream.log.append(
        f"{tuple(tensor.shape)} recorded on {stream.name}"))
    monkeypatch.setattr(Stream, "log", [])

    halves = {"bf16": DataType.BF16, "fp16": DataType.HALF}

    def export_onnx(module, path, spec, input_format="uint8-nhwc", opset=17, exporter="auto"):
        gpu.exports.append(types.SimpleNamespace(dtype=next(module.parameters()).dtype, path=path,
                                                 input_format=input_format, opset=opset, exporter=exporter))
        return write_graph(path, gpu.graph)

    def to_half_precision(source, target, half):
        gpu.half_graphs.append(types.SimpleNamespace(source=source, target=target, half=half))
        return write_graph(target, typed(gpu.graph, halves[half]))

    def fp8_tower_graph(source, pixels, half, providers):
        gpu.fp8_graphs.append(types.SimpleNamespace(source=source, pixels=pixels, half=half))
        return write_graph(source.with_name("tower-fp8.onnx"), typed(gpu.graph, halves[half]))

    monkeypatch.setattr(backend, "export_onnx", export_onnx)
    monkeypatch.setattr("vlmrm_fast.backends.onnx_half.to_half_precision", to_half_precision)
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
    assert backend.profile_batch_range(256, 8) == (1, 8, 256)  # opt_batch_size: the batch you score most
    assert backend.profile_batch_range(8, 8) == (1, 8, 8) and backend.profile_batch_range(8, 1) == (1, 1, 8)
    assert type(backend.profile_batch_range(8, np.int64(3))[1]) is int  # for the engine key's JSON
    for bad in (0, 9, 2.5, True, "8"):
        with pytest.raises(BackendError, match=rf"opt_batch_size={bad!r} must be an integer from 1 to max_batch_size "
                                               r"\(8\): the batch size you will score most often"):
            backend.profile_batch_range(8, bad)


def test_the_backend_tunes_its_engine_for_opt_batch_size_and_keys_it(monkeypatch, tmp_path, fake_cuda):
    trt = tensorrt_stand_in()
    rm = make_backend(monkeypatch, trt, tmp_path, max_batch_size=64, opt_batch_size=8)
    assert trt.record.configs[0].profiles[0].shapes["pixels"] == ((1, 3, 16, 16), (8, 3, 16, 16), (64, 3, 16, 16))
    assert cached_key(rm.engine_path)["batch_range"] == [1, 8, 64] and rm._max_batch == 64
    other = make_backend(monkeypatch, trt, tmp_path, max_batch_size=64)  # the default opt is another engine
    assert trt.record.builds == 2 and cached_key(other.engine_path)["batch_range"] == [1, 32, 64]
    with pytest.raises(BackendError, match=r"opt_batch_size=65 must be an integer from 1 to max_batch_size \(64\)"):
        make_backend(monkeypatch, trt, tmp_path, max_batch_size=64, opt_batch_size=65)
    assert trt.record.builds == 2


def test_the_backend_exports_with_the_exporter_asked_for_and_keys_it(monkeypatch, tmp_path, fake_cuda):
    trt = tensorrt_stand_in()
    rm = make_backend(monkeypatch, trt, tmp_path, exporter="dynamo")
    assert [e.exporter for e in fake_cuda.exports] == ["dynamo"] and cached_key(rm.engine_path)["exporter"] == "dynamo"
    other = make_backend(monkeypatch, trt, tmp_path)  # "auto" by default: another engine
    assert [e.exporter for e in fake_cuda.exports] == ["dynamo", "auto"] and trt.record.builds == 2
    assert cached_key(other.engine_path)["exporter"] == "auto"
    with pytest.raises(BackendError, match=r"exporter='jit' is not one of \('auto', 'torchscript', 'dynamo'\) for "
                                           r"backend='tensorrt'"):
        make_backend(monkeypatch, trt, tmp_path, exporter="jit")
    assert trt.record.builds == 2


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """The tiny tower's float32 exports, {input format: path}: real graphs for the stood-in parser."""
    pytest.importorskip("onnx")
    from conftest import make_tiny
    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.models import preprocess_spec_of

    model, _ = make_tiny()
    folder, spec = tmp_path_factory.mktemp("exports"), preprocess_spec_of(model, "vlmrm")
    return {fmt: export_onnx(model.visual, folder / f"{fmt}.onnx", spec, input_format=fmt) for fmt in ("pixels", "uint8-nhwc")}


def layer_types(network) -> dict:
    """{layer type: the set of its layers' output types}."""
    found = {}
    for layer in network.layers:
        found.setdefault(layer.type, set()).add(layer.output_dtype)
    return found


VERSIONS = ["10.13.3.9", "11.1.0.106"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision,dtype", [("fp16", DataType.HALF), ("bf16", DataType.BF16), ("fp32", DataType.FLOAT)])
def test_every_precision_builds_strongly_typed_from_its_typed_graph(monkeypatch, tiny_exports, version, precision,
                                                                    dtype):
    trt = tensorrt_stand_in(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    source = tiny_exports["pixels"]
    graph = backend.typed_tower_graph(source, precision)
    assert graph == (source if precision == "fp32" else source.with_name(f"pixels-{precision}.onnx"))
    plan = backend.build_engine(graph, precision, (1, 4, 8), workspace_gib=1.5)
    [network], [config] = trt.record.networks, trt.record.configs
    assert plan == b"plan 1" and type(plan) is bytes
    assert trt.record.parsed == [str(graph)]
    assert network.flags == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED  # bit 1 in 10, bit 0 in 11
    # No precision flags (11 has none); TF32 cleared for fp32 only: "fp32" means float32 matmuls.
    assert config.flags == (set() if precision == "fp32" else {trt.BuilderFlag.TF32})
    # What TensorRT is handed: the precision's type in, every matmul, the patch embedding and softmax
    # computed in it, LayerNorm in float32, float32 out.
    assert network.get_input(0).dtype == dtype and network.get_output(0).dtype == DataType.FLOAT
    assert layer_types(network) == {LayerType.CONVOLUTION: {dtype}, LayerType.MATRIX_MULTIPLY: {dtype},
                                    LayerType.SOFTMAX: {dtype}, LayerType.NORMALIZATION: {DataType.FLOAT}}
    [profile] = config.profiles
    assert profile.shapes == {"pixels": ((1, 3, 224, 224), (4, 3, 224, 224), (8, 3, 224, 224))}
    assert config.pool_limits == {trt.MemoryPoolType.WORKSPACE: int(1.5 * 2**30)}
    assert config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED  # layer_information() needs it


@pytest.mark.parametrize("version", VERSIONS)
def test_a_uint8_frames_graph_stays_uint8_in_and_computes_in_the_precision(monkeypatch, tiny_exports, version):
    # `vlmrm-fast export --format tensorrt` builds the uint8 frames export (the default --input).
    trt = tensorrt_stand_in(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    backend.build_engine(backend.typed_tower_graph(tiny_exports["uint8-nhwc"], "fp16"), "fp16", (1, 2, 4))
    [network], [config] = trt.record.networks, trt.record.configs
    assert network.get_input(0).dtype == DataType.UINT8 and network.get_output(0).dtype == DataType.FLOAT
    assert layer_types(network)[LayerType.CONVOLUTION] == layer_types(network)[LayerType.MATRIX_MULTIPLY] == {DataType.HALF}
    assert config.profiles[0].shapes == {"frames": ((1, 224, 224, 3), (2, 224, 224, 3), (4, 224, 224, 3))}


def test_typed_tower_graph_takes_the_float_precisions_only(tmp_path):
    with pytest.raises(BackendError, match=r"precision 'fp8-bf16' is not one of fp16, bf16, fp32"):
        backend.typed_tower_graph(tmp_path / "tower.onnx", "fp8-bf16")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision,input_dtype", [("fp8-bf16", DataType.BF16), ("fp8-fp16", DataType.HALF)])
def test_fp8_builds_strongly_typed_with_no_precision_flags(monkeypatch, tmp_path, version, precision, input_dtype):
    trt = tensorrt_stand_in(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    graph = write_graph(tmp_path / "tower-fp8.onnx", typed(TOWER, input_dtype))
    backend.build_engine(graph, precision, (1, 4, 8))
    [network], [config] = trt.record.networks, trt.record.configs
    assert network.flags == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert config.flags == {trt.BuilderFlag.TF32}  # as TensorRT made it
    assert network.get_input(0).dtype == input_dtype
    assert config.profiles[0].shapes == {"pixels": ((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))}


@pytest.mark.parametrize("precision,tensor,dtype,typed_by", [
    ("fp8-bf16", "input", DataType.FLOAT, "onnx_fp8.fp8_tower_graph"),
    ("fp8-bf16", "input", DataType.HALF, "onnx_fp8.fp8_tower_graph"),
    ("fp8-bf16", "output", DataType.BF16, "onnx_fp8.fp8_tower_graph"),
    ("bf16", "input", DataType.FLOAT, "tensorrt.typed_tower_graph"),  # the float32 export, not rewritten
    ("fp16", "input", DataType.BF16, "tensorrt.typed_tower_graph"),
    ("fp32", "input", DataType.HALF, "tensorrt.typed_tower_graph"),
    ("fp16", "output", DataType.HALF, "tensorrt.typed_tower_graph"),
])
def test_a_build_refuses_a_graph_not_typed_for_its_precision(monkeypatch, tmp_path, precision, tensor, dtype, typed_by):
    want = {"fp8-bf16": DataType.BF16, "bf16": DataType.BF16, "fp16": DataType.HALF, "fp32": DataType.FLOAT}[precision]
    right = typed(TOWER, want)
    name, _, shape = right[tensor]
    graph = write_graph(tmp_path / "tower.onnx", {**right, tensor: (name, dtype, shape)})
    trt = tensorrt_stand_in()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(BackendError, match=rf"is not a {precision} tower graph.*{re.escape(typed_by)}"):
        backend.build_engine(graph, precision, (1, 4, 8))
    assert trt.record.builds == 0


@pytest.mark.parametrize("typed_as,precision", [("fp32", "bf16"), ("fp16", "bf16"), ("bf16", "fp32")])
def test_a_uint8_frames_graph_is_refused_where_its_matmuls_are_not_the_precisions(monkeypatch, tiny_exports, typed_as,
                                                                                  precision):
    # Its uint8 input cannot say which precision the graph was typed for; its matmuls can.
    trt = tensorrt_stand_in()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    graph = backend.typed_tower_graph(tiny_exports["uint8-nhwc"], typed_as)
    with pytest.raises(BackendError, match=rf"is not a {precision} tower graph \(its matmuls compute in {typed_as}\); "
                                           r"type it with vlmrm_fast\.backends\.tensorrt\.typed_tower_graph"):
        backend.build_engine(graph, precision, (1, 4, 8))
    assert trt.record.builds == 0


def test_keep_only_graph_keeps_the_graph_and_its_weights_file(tmp_path):
    # ViT-bigG-14's graphs keep their weights in <name>.data: the typed graph's must stay for the build.
    for name in ("tower.onnx", "tower.onnx.data", "tower-bf16.onnx", "tower-bf16.onnx.data"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    backend.keep_only_graph(tmp_path / "tower-bf16.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "tower-bf16.onnx", "tower-bf16.onnx.data"]


def test_build_engine_errors_name_the_cause(monkeypatch, tmp_path):
    onnx = write_graph(tmp_path / "tower.onnx", typed(TOWER, DataType.BF16))
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
    # Built once, from a float32 export written under the cache folder and rewritten to bf16 beside
    # it, inside the backend's device.
    [export], [half] = fake_cuda.exports, fake_cuda.half_graphs
    assert export.dtype == torch.float32 and export.input_format == "pixels" and export.opset == 17
    assert export.path.parent.parent == cache_dir  # not the system's (often small) temporary folder
    assert (half.source, half.target, half.half) == (export.path, export.path.with_name("tower-bf16.onnx"), "bf16")
    assert trt.record.parsed == [str(half.target)]
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


def test_the_backends_key_names_tensorrts_cuda_build(monkeypatch, tmp_path, fake_cuda):
    # TensorRT's CUDA 12 and 13 wheels share a version: environments of both sharing a cache would load
    # each other's engines. The test above runs where no such wheel is installed (the build is "").
    trt = tensorrt_stand_in()
    monkeypatch.setattr(backend, "tensorrt_build", lambda: "tensorrt-cu12-libs 10.13.3.9")
    cu12 = make_backend(monkeypatch, trt, tmp_path)
    assert cached_key(cu12.engine_path)["tensorrt_build"] == "tensorrt-cu12-libs 10.13.3.9"
    monkeypatch.setattr(backend, "tensorrt_build", lambda: "tensorrt-cu13-libs 10.13.3.9")
    cu13 = make_backend(monkeypatch, trt, tmp_path)
    assert cu13.engine_path != cu12.engine_path and trt.record.builds == 2  # not the cu12 engine loaded


@pytest.mark.parametrize("dtype,half", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_an_fp8_backend_builds_from_its_calibrated_graph_and_keys_the_frames(monkeypatch, tmp_path, fake_cuda, dtype,
                                                                              half):
    trt = tensorrt_stand_in()
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
    assert not fake_cuda.half_graphs  # fp8_tower_graph types the graph itself
    assert trt.record.beside == [["tower-fp8.onnx"]]
    assert rm._calibration is None  # the frames are not kept once the engine is built


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype,parsed,trt_dtype", [(torch.float32, "tower.onnx", DataType.FLOAT),
                                                    (torch.float16, "tower-fp16.onnx", DataType.HALF),
                                                    (torch.bfloat16, "tower-bf16.onnx", DataType.BF16)])
def test_the_backend_builds_from_the_graph_typed_for_its_dtype(monkeypatch, tmp_path, fake_cuda, version, dtype, parsed,
                                                               trt_dtype):
    trt = tensorrt_stand_in(version)
    rm = make_backend(monkeypatch, trt, tmp_path, dtype=dtype)
    [export] = fake_cuda.exports
    assert trt.record.parsed == [str(export.path.with_name(parsed))]
    assert trt.record.beside == [[parsed]]  # the float32 export removed before the build when not built from
    rewritten = {torch.float32: [], torch.float16: ["fp16"], torch.bfloat16: ["bf16"]}[dtype]
    assert [h.half for h in fake_cuda.half_graphs] == rewritten  # fp32 builds the export as it is
    assert trt.record.networks[0].flags == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert rm.engine.get_tensor_dtype("pixels") == trt_dtype  # what __call__ hands it
    key = cached_key(rm.engine_path)
    assert (key["tensorrt_version"], key["recipe"]) == (version, 3)  # weakly typed engines (recipe 2) are rebuilt


def test_export_checks_opt_batch_size_against_max_batch_size_before_loading_weights(monkeypatch, tmp_path, capsys):
    from vlmrm_fast.cli import main

    monkeypatch.setattr("vlmrm_fast.models.create_clip", lambda *a, **k: pytest.fail("weights loaded first"))
    args = ["export", "vlmrm-tiny", "--format", "tensorrt", "--max-batch-size", "4", "--opt-batch-size", "5"]
    assert main(args + ["--out", str(tmp_path / "x.engine")]) == 2
    assert "--opt-batch-size 5 is over --max-batch-size 4" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def export_on_an_h200_stand_in(monkeypatch):
    """The TensorRT stand-in (11.1) as ``tensorrt``, on what looks like an H200 to ``vlmrm-fast export``."""
    trt = tensorrt_stand_in("11.1.0.106")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return trt


@pytest.mark.parametrize("dtype,parsed,trt_dtype", [(None, "tower-bf16.onnx", DataType.BF16),  # the default
                                                    ("fp16", "tower-fp16.onnx", DataType.HALF),
                                                    ("fp32", "tower.onnx", DataType.FLOAT)])
def test_export_format_tensorrt_writes_the_engine_of_the_typed_frames_graph(monkeypatch, tmp_path, dtype, parsed,
                                                                           trt_dtype):
    pytest.importorskip("onnx")
    from vlmrm_fast.cli import main

    trt = export_on_an_h200_stand_in(monkeypatch)
    out = tmp_path / "tiny.engine"
    args = ["export", "vlmrm-tiny", "--format", "tensorrt", "--max-batch-size", "6", "--opt-batch-size", "2", "--out", str(out)]
    assert main(args + (["--dtype", dtype] if dtype else [])) == 0
    assert out.read_bytes() == b"plan 1"
    [network], [config] = trt.record.networks, trt.record.configs
    assert [Path(p).name for p in trt.record.parsed] == [parsed]
    assert trt.record.beside == [[parsed]]  # the float32 export removed before the build when not built from
    assert network.get_input(0).dtype == DataType.UINT8 and network.get_output(0).dtype == DataType.FLOAT
    assert layer_types(network)[LayerType.MATRIX_MULTIPLY] == {trt_dtype}
    assert (trt.BuilderFlag.TF32 in config.flags) == (dtype != "fp32")
    assert trt.record.configs[0].profiles[0].shapes == {"frames": ((1, 224, 224, 3), (2, 224, 224, 3), (6, 224, 224, 3))}
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.engine"]  # the graphs went with their folder


def test_export_format_tensorrt_never_leaves_a_half_written_engine_under_its_name(monkeypatch, tmp_path):
    # The engine goes to a temporary file renamed into place: a failed rename (a full disk, an interrupt)
    # keeps the previous engine whole and leaves no temporary beside it.
    pytest.importorskip("onnx")
    import os

    from vlmrm_fast.cli import main

    export_on_an_h200_stand_in(monkeypatch)
    out = tmp_path / "tiny.engine"
    out.write_bytes(b"previous engine")
    replace = os.replace

    def full_disk(src, dst, **kwargs):
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    args = ["export", "vlmrm-tiny", "--format", "tensorrt", "--dtype", "fp16", "--max-batch-size", "2", "--out", str(out)]
    try:
        assert main(args) != 0
    except OSError:
        pass
    assert out.read_bytes() == b"previous engine"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.engine"]


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
        trt = tensorrt_stand_in(version=version)
        make_backend(monkeypatch, trt, tmp_path / version, quantize="fp8",
                     calibration_frames=np.zeros((1, 8, 8, 3), np.uint8))
        assert trt.record.builds == 1


def _host_backend(monkeypatch, tmp_path, fake_cuda, max_batch_size, dtype=torch.float32, **stand_in):
    """A backend whose stood-in engine reads and writes host memory: ``__call__`` on CPU tensors.
    Its frames are 3 x 15 x 15 (1350 bytes in bf16), so a slice of a batch starts off TensorRT's alignment."""
    fake_cuda.graph = {**TOWER, "input": ("pixels", DataType.FLOAT, (-1, 3, 15, 15))}
    rm = make_backend(monkeypatch, tensorrt_stand_in(**stand_in), tmp_path, dtype=dtype,
                      max_batch_size=max_batch_size)
    rm.device = torch.device("cpu")
    return rm


def test_call_splits_a_large_batch_over_the_profile_and_hands_tensorrt_aligned_inputs(monkeypatch, tmp_path, fake_cuda):
    rm = _host_backend(monkeypatch, tmp_path, fake_cuda, max_batch_size=2, dtype=torch.bfloat16)
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
    rm = _host_backend(monkeypatch, tmp_path, fake_cuda, max_batch_size=4)
    with pytest.raises(ValueError, match=r"takes torch.float32 pixels on cpu; got torch.float16 on cpu"):
        rm(torch.zeros(1, 3, 15, 15, dtype=torch.float16))
    rm = _host_backend(monkeypatch, tmp_path / "shape", fake_cuda, max_batch_size=4, set_input_shape_ok=False)
    with pytest.raises(RuntimeError, match=r"refused input shape \(2, 3, 15, 15\)"):
        rm(torch.zeros(2, 3, 15, 15))
    rm = _host_backend(monkeypatch, tmp_path / "run", fake_cuda, max_batch_size=4, execute_ok=False)
    with pytest.raises(RuntimeError, match="TensorRT execution failed"):
        rm(torch.zeros(2, 3, 15, 15))


def test_tensorrt_inspector_types_are_read_in_either_versions_layout():
    # The GPU tests read layer types from TensorRT's inspector JSON: 10 writes "Format/Datatype",
    # 11 split it. bf16 ("BFloat16") is not float32 in either.
    from conftest import tensorrt_is_float32, tensorrt_type_text

    ten = {"Format/Datatype": "Row major linear FP32 format (kLINEAR)"}
    eleven = {"Format": "Row major linear format (kLINEAR)", "DataType": "Float"}
    assert tensorrt_is_float32(ten) and tensorrt_is_float32(eleven)
    assert not tensorrt_is_float32({"Format/Datatype": "Row major linear BF16 format (kLINEAR)"})
    assert not tensorrt_is_float32({"Format": "Row major linear format (kLINEAR)", "DataType": "BFloat16"})
    assert not tensorrt_is_float32({"Name": "x"})
    assert tensorrt_type_text({"Format/Datatype": "Channel major FP8 format"}) == "CHANNEL MAJOR FP8 FORMAT"


@pytest.mark.parametrize("flags,profile", [([], (1, 128, 256)),  # the defaults: max 256, opt half of it
                                           (["--max-batch-size", "4", "--opt-batch-size", "4"], (1, 4, 4))])
def test_export_tensorrt_batch_profile_defaults_and_an_opt_batch_equal_to_the_max(monkeypatch, tmp_path, flags, profile):
    pytest.importorskip("onnx")
    from vlmrm_fast.cli import main

    trt = export_on_an_h200_stand_in(monkeypatch)
    out = tmp_path / "tiny.engine"
    assert main(["export", "vlmrm-tiny", "--format", "tensorrt", "--out", str(out), *flags]) == 0
    shapes = trt.record.configs[0].profiles[0].shapes["frames"]
    assert tuple(shape[0] for shape in shapes) == profile


def test_a_tower_with_forward_hooks_is_built_without_the_cache(monkeypatch, tmp_path, fake_cuda, caplog):
    # The engine runs the hooks traced into it, but a hook's code is in no key: cached, a hooked tower's engine
    # would be loaded for the same weights unhooked (or the other way round) in a later process.
    trt = tensorrt_stand_in()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)

    def build(hooked):
        visual = tower(torch.bfloat16)
        if hooked:
            visual.register_forward_hook(lambda m, args, out: out * 0)
        return backend.TensorRTBackend(visual, SPEC, torch.device("cuda"), torch.bfloat16, (16, 16), 8,
                                       model_name="ViT-tiny/16", cache_dir=tmp_path)

    with caplog.at_level("WARNING", logger="vlmrm_fast.backends.tensorrt"):
        hooked = build(True)
    assert "forward hooks" in caplog.text and "without the cache" in caplog.text
    assert hooked.engine_path is None and not hooked.build_cached and list(tmp_path.glob("*.engine")) == []
    build(True)
    assert trt.record.builds == 2  # never read from the cache either
    plain = build(False)
    assert trt.record.builds == 3 and plain.engine_path is not None and plain.engine_path.exists()
    build(True)
    assert trt.record.builds == 4  # the unhooked tower's cached engine is not the hooked one's
