"""fp8 (E4M3) quantisation of the tower for TensorRT (``backend="tensorrt", quantize="fp8"``).

TensorRT cannot run here, so the graph TensorRT would build is checked on the CPU twice:
- its float32 twin (the same Q/DQ pairs and scales, the rest in float32) runs in ONNX Runtime, which
  quantises and dequantises exactly as the graph says; that isolates the cost of fp8 itself;
- the bf16 graph itself runs in ONNX's reference evaluator (tiny model: it is slow).

Tolerance, argued as for bf16/fp16 (at most twice PyTorch's own error at that precision against the
float64 reference). PyTorch's own fp8 is the same matmuls with their inputs rounded through
``torch.float8_e4m3fn``, scaled *per call* from each tensor's own largest value (dynamic scaling:
the best a per-tensor scale can do, and what PyTorch's fp8 training recipes do); ours uses static
activation scales calibrated on other frames, as a TensorRT engine must. A graph left unquantised
(error 1e-8 in float32) fails the lower bound.
Measured here (random weights, the frames below): float32 twin, ViT-B-32 5.0e-4 against PyTorch's
6.0e-4, the tiny model 2.2e-3 against 2.8e-3; the bf16 graph, ViT-B-32 3.3e-4 against 7.8e-4, the tiny
model 1.7e-3 against 3.0e-3; the fp16 graph (tiny model only in CI: numpy's float16 matmuls are slow),
ViT-B-32 7.4e-4 against 5.5e-4, the tiny model 2.0e-3 against 2.5e-3.
"""
import copy
import importlib.util

import numpy as np
import pytest
import torch

from conftest import EXPORTERS, make_model, make_tiny, tensorrt_type_text
from reference import float64_model, reference_preprocess, reference_reward_from_embeddings, reference_targets
from vlmrm_fast.backends import BackendError
from vlmrm_fast.models import preprocess_spec_of

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
pytestmark = pytest.mark.skipif(not HAS_ORT, reason="needs onnx and onnxruntime (pip install 'vlmrm-fast[export]')")
GOAL, BASELINE, ALPHA = ["a humanoid robot kneeling", "kneeling"], ["a humanoid robot"], 0.5
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
E4M3_MAX = 448.0


def _fp8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x through E4M3 with ``scale`` (broadcastable), back in x's dtype."""
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def _dynamic(x: torch.Tensor) -> torch.Tensor:
    return _fp8_round(x, x.detach().abs().amax().float().clamp_min(1e-12) / E4M3_MAX)


def _torch_fp8_tower(visual: torch.nn.Module) -> torch.nn.Module:
    """PyTorch's own fp8 of the matmuls our graph quantises: per-output-channel weights, activations
    scaled per call. The output projection stays as it is, as in ours."""
    visual = copy.deepcopy(visual).eval()
    for block in visual.transformer.resblocks:
        weights = [block.attn.in_proj_weight, block.mlp.c_fc.weight, block.mlp.c_proj.weight]
        for w in weights:  # torch weights are [out, in]: one scale per row
            w.data = _fp8_round(w.data, w.data.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX)

        def attention_inputs(module, args):
            assert args[1] is args[0] and args[2] is args[0], "self-attention reads one tensor"
            x = _dynamic(args[0])
            return (x, x, x) + tuple(args[3:])

        block.attn.register_forward_pre_hook(attention_inputs)
        block.mlp.c_fc.register_forward_pre_hook(lambda module, args: (_dynamic(args[0]),))
        block.mlp.c_proj.register_forward_pre_hook(lambda module, args: (_dynamic(args[0]),))
    return visual


def _frames(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 231, 199, 3), dtype=np.uint8)  # odd sizes: resized


def _fp8_graphs(model, tmp_path, half="bf16", exporter="auto"):
    """(float32 twin, half graph) of the tower, calibrated on 12 frames other than the test's."""
    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.backends.onnx_fp8 import FP8_OPSET, fp8_tower_graph
    from vlmrm_fast.backends.tensorrt import _calibration_pixels

    spec = preprocess_spec_of(model, "vlmrm")
    source = export_onnx(copy.deepcopy(model.visual).float(), tmp_path / "tower.onnx", spec, input_format="pixels",
                         opset=FP8_OPSET, exporter=exporter)
    pixels = _calibration_pixels(torch.from_numpy(_frames(11, 12)), spec)  # what the TensorRT backend does
    graph = fp8_tower_graph(source, pixels, half)
    return tmp_path / f"tower-fp8-{half}-float32.onnx", graph


def _ort_qdq(path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT's CPU optimiser would fuse Q/DQ + MatMul into integer kernels, which take int8 only.
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": pixels})[0]


def _reference(model, tokenizer, frames):
    model64 = float64_model(model)
    pixels = torch.from_numpy(reference_preprocess(frames, 224, CLIP_MEAN, CLIP_STD, "vlmrm"))
    with torch.no_grad():
        goal, direction = reference_targets(model64, tokenizer, GOAL, BASELINE)
        want = reference_reward_from_embeddings(model64.encode_image(pixels), goal, direction, ALPHA)
    return pixels, goal, direction, want


@pytest.fixture(scope="module", params=["vlmrm-tiny", "ViT-B-32"])
def fp8_case(request, tmp_path_factory):
    """(model, tokenizer, float32 twin, {half type: graph}) per model, built once for the tests below."""
    model, tokenizer = make_model(request.param)
    twin, bf16 = _fp8_graphs(model, tmp_path_factory.mktemp(request.param))
    graphs = {"bf16": bf16}
    if request.param == "vlmrm-tiny":  # numpy's float16 matmuls take 90 s for ViT-B-32 in the evaluator
        graphs["fp16"] = _fp8_graphs(model, tmp_path_factory.mktemp(request.param), "fp16")[1]
    return model, tokenizer, twin, graphs


def test_fp8_rewards_within_twice_pytorch_fp8_error(fp8_case):
    model, tokenizer, twin, _ = fp8_case
    pixels, goal, direction, want = _reference(model, tokenizer, _frames(7, 5))
    with torch.no_grad():
        theirs = reference_reward_from_embeddings(_torch_fp8_tower(model.visual)(pixels.float()), goal, direction, ALPHA)
    ours = reference_reward_from_embeddings(torch.from_numpy(_ort_qdq(twin, pixels.float().numpy())), goal, direction, ALPHA)
    assert torch.isfinite(ours).all()
    pytorch_error = (theirs - want).abs().max().item()
    error = (ours - want).abs().max().item()
    assert 1e-4 < error <= 2 * pytorch_error  # lossy (fp8 really ran), but no worse than twice PyTorch's fp8


@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_fp8_half_graph_within_twice_pytorch_half_fp8_error(fp8_case, half):
    """The half rewrite computes what PyTorch's half tower with the same fp8 matmuls computes. That the
    Q/DQ pairs quantise is shown above and by the graph test below; here, bf16's own error (1.8e-4 for
    ViT-B-32) would hide a missing fp8 step, so only the upper bound is asserted."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from onnx.reference import ReferenceEvaluator

    model, tokenizer, _, graphs = fp8_case
    if half not in graphs:
        pytest.skip("fp16 is checked on the tiny model: numpy's float16 matmuls are too slow for ViT-B-32")
    dtype, numpy_dtype = {"bf16": (torch.bfloat16, ml_dtypes.bfloat16), "fp16": (torch.float16, np.float16)}[half]
    # Per-frame errors spread 100x on the tiny model, so its maximum needs more frames to mean much;
    # ONNX's reference evaluator takes about 2 s a frame for ViT-B-32.
    frames = _frames(7, 8 if model.visual.transformer.width < 128 else 4)
    pixels, goal, direction, want = _reference(model, tokenizer, frames)
    with torch.no_grad():  # PyTorch's own: the tower in that half type, the same matmuls in fp8
        half_tower = _torch_fp8_tower(copy.deepcopy(model.visual).to(dtype))
        theirs = reference_reward_from_embeddings(half_tower(pixels.to(dtype)).float(), goal, direction, ALPHA)
    embeddings = ReferenceEvaluator(str(graphs[half])).run(None, {"pixels": pixels.float().numpy().astype(numpy_dtype)})[0]
    assert embeddings.dtype == np.float32
    ours = reference_reward_from_embeddings(torch.from_numpy(embeddings), goal, direction, ALPHA)
    assert torch.isfinite(ours).all()
    pytorch_error = (theirs - want).abs().max().item()
    assert (ours - want).abs().max().item() <= 2 * pytorch_error


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_fp8_graph_is_typed_for_a_strongly_typed_tensorrt_build(tmp_path, exporter):
    import onnx
    from onnx import TensorProto

    model, _ = make_tiny()
    _, half = _fp8_graphs(model, tmp_path, exporter=exporter)
    graph = onnx.load(str(half))
    assert graph.opset_import[0].version >= 19
    inits = {init.name: init for init in graph.graph.initializer}
    producers = {out: node for node in graph.graph.node for out in node.output}
    assert graph.graph.input[0].type.tensor_type.elem_type == TensorProto.BFLOAT16
    assert graph.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    quantize = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    # 2 layers x 3 weight matmuls: a Q/DQ pair on each activation, a DQ on each stored fp8 weight.
    assert len(quantize) == 6 and len(dequantize) == 12
    for node in quantize + dequantize:
        assert inits[node.input[2]].data_type == TensorProto.FLOAT8E4M3FN  # the zero point says "fp8"
        assert inits[node.input[1]].data_type == TensorProto.BFLOAT16  # the scale, in the compute type
    weights = [n for n in dequantize if n.input[0] in inits]
    assert len(weights) == 6
    for node in weights:  # fp8 weights [K, N], one scale per output column
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        assert weight.data_type == TensorProto.FLOAT8E4M3FN and len(weight.dims) == 2
        assert [a.i for a in node.attribute if a.name == "axis"] == [1] and list(scale.dims) == [weight.dims[1]]
    fed = [n for n in graph.graph.node if n.op_type == "MatMul"
           and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input[:2])]
    assert len(fed) == 6
    [output_projection] = [n for n in graph.graph.node if "embeddings_half" in n.output]
    assert output_projection.op_type == "MatMul" and output_projection.input[1] in inits  # left in bf16
    assert inits[output_projection.input[1]].data_type == TensorProto.BFLOAT16
    for node in graph.graph.node:
        if node.op_type == "LayerNormalization":  # LayerNorm in float32
            assert producers[node.input[0]].op_type == "Cast"
            for name in node.input[1:]:  # the exporter shares equal weights through Identity nodes
                while name not in inits and producers[name].op_type == "Identity":
                    name = producers[name].input[0]
                assert inits[name].data_type == TensorProto.FLOAT


def test_fp8_needs_opset_19(tmp_path):
    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.backends.onnx_fp8 import calibrate_amax, quantize_fp8

    model, _ = make_tiny()
    source = export_onnx(model.visual, tmp_path / "tower.onnx", preprocess_spec_of(model, "vlmrm"), input_format="pixels",
                         opset=17)
    amax = calibrate_amax(source, [np.zeros((1, 3, 224, 224), np.float32)])
    with pytest.raises(ValueError, match="opset=19"):
        quantize_fp8(source, tmp_path / "fp8.onnx", amax)


def test_fp8_graph_of_a_tower_with_external_weights(tmp_path):
    """ViT-bigG-14's export keeps its weights in a side file; the fp8 graphs must find them."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from onnx.reference import ReferenceEvaluator

    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.backends.onnx_fp8 import FP8_OPSET, fp8_tower_graph

    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    inline = fp8_tower_graph(export_onnx(model.visual, tmp_path / "a" / "tower.onnx", spec, input_format="pixels",
                                         opset=FP8_OPSET), torch.ones(2, 3, 224, 224), "bf16")
    source = export_onnx(model.visual, tmp_path / "b" / "tower.onnx", spec, input_format="pixels", external_data=True,
                         opset=FP8_OPSET)
    assert (tmp_path / "b" / "tower.onnx.data").exists()
    side = fp8_tower_graph(source, torch.ones(2, 3, 224, 224), "bf16")
    pixels = {"pixels": np.random.default_rng(2).standard_normal((2, 3, 224, 224)).astype(ml_dtypes.bfloat16)}
    np.testing.assert_array_equal(ReferenceEvaluator(str(side)).run(None, pixels)[0],
                                  ReferenceEvaluator(str(inline)).run(None, pixels)[0])


@pytest.mark.parametrize("scale_type,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_scales_round_up_to_representable_values(scale_type, dtype):
    from vlmrm_fast.backends.onnx_fp8 import representable_scale

    exact = np.exp(np.random.default_rng(3).uniform(-9, 2, 1001))  # positive, many binades (fp16 normals)
    scale = representable_scale(exact, scale_type)
    assert (scale.astype(np.float64) >= exact).all()  # so that amax / scale <= 448: nothing calibrated saturates
    assert torch.equal(torch.from_numpy(scale).to(dtype).float(), torch.from_numpy(scale))  # held exactly
    spacing = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    assert (scale / exact <= 1 + 2 * spacing).all()  # the nearest value up, not any larger one


def test_calibration_scales_cover_the_calibration_frames(tmp_path):
    import onnx

    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.backends.onnx_fp8 import calibrate_amax, fp8_targets

    model, _ = make_tiny()
    source = export_onnx(model.visual, tmp_path / "tower.onnx", preprocess_spec_of(model, "vlmrm"), input_format="pixels")
    pixels = np.random.default_rng(5).standard_normal((5, 3, 224, 224)).astype(np.float32)
    split = calibrate_amax(source, [pixels[:2], pixels[2:]])
    whole = calibrate_amax(source, [pixels])
    assert split.keys() == {a for _, a, _ in fp8_targets(onnx.load(str(source)))}
    assert split == pytest.approx(whole, rel=1e-6)  # a running max over batches is the max over all frames
    assert all(v > 0 for v in whole.values())
    with pytest.raises(ValueError, match="no frames"):
        calibrate_amax(source, [])


# ---- the backend's options, checked before anything needs TensorRT or a GPU ---------------------


def _backend(dtype=torch.bfloat16, **options):
    from vlmrm_fast.backends.tensorrt import TensorRTBackend

    model, _ = make_tiny()
    return TensorRTBackend(model.visual, preprocess_spec_of(model, "vlmrm"), torch.device("cuda"), dtype, (224, 224), 8,
                           **options)


@pytest.mark.parametrize("dtype,options,match", [
    (torch.bfloat16, {"quantize": "int4"}, "int4"),
    (torch.float32, {"quantize": "fp8", "calibration_frames": np.zeros((2, 8, 8, 3), np.uint8)}, "bfloat16 or torch.float16"),
    (torch.bfloat16, {"quantize": "fp8"}, "calibration_frames"),
    (torch.bfloat16, {"quantize": "fp8", "calibration_frames": np.zeros((2, 8, 8, 3), np.float32)}, "uint8"),
    (torch.bfloat16, {"quantize": "fp8", "calibration_frames": np.zeros((0, 8, 8, 3), np.uint8)}, "N >= 1"),
    (torch.bfloat16, {"calibration_frames": np.zeros((2, 8, 8, 3), np.uint8)}, "quantize='fp8'"),
])
def test_fp8_bad_options_are_clear_errors(dtype, options, match):
    with pytest.raises(BackendError, match=match):
        _backend(dtype, **options)


def test_fp8_calibration_frames_as_rendered():
    from vlmrm_fast.backends.tensorrt import _check_quantize

    rendered = _frames(3, 2)[:, ::-1]  # env.render() arrays can have negative strides
    frames = _check_quantize("fp8", torch.bfloat16, rendered)
    assert frames.dtype == torch.uint8 and frames.device.type == "cpu"
    np.testing.assert_array_equal(frames.numpy(), rendered)


def test_fp8_engines_are_keyed_by_their_calibration_frames_and_preprocessing():
    import dataclasses

    from vlmrm_fast.backends.tensorrt import calibration_digest

    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    frames = torch.from_numpy(_frames(1, 4))
    other = frames.clone()
    other[0, 0, 0, 0] ^= 1
    assert calibration_digest(frames, spec) == calibration_digest(frames.clone(), spec)
    assert calibration_digest(frames, spec) != calibration_digest(other, spec)  # other scales: another engine
    assert calibration_digest(frames[:2], spec) != calibration_digest(frames, spec)
    # The same frames preprocessed otherwise give other pixels, so other scales.
    assert calibration_digest(frames, spec) != calibration_digest(frames, dataclasses.replace(spec, mode="openclip"))


def test_fp8_needs_a_recent_tensorrt_and_an_fp8_gpu(monkeypatch):
    import types

    from vlmrm_fast.backends import tensorrt as backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    with pytest.raises(BackendError, match=r"10\.6"):
        backend._check_fp8_support(types.SimpleNamespace(__version__="10.3.0"), torch.device("cuda:0"))
    backend._check_fp8_support(types.SimpleNamespace(__version__="10.13.3.9"), torch.device("cuda:0"))  # fine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    with pytest.raises(BackendError, match="9.0"):
        backend._check_fp8_support(types.SimpleNamespace(__version__="10.13.3.9"), torch.device("cuda:0"))


# ---- on a GPU with TensorRT -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not (importlib.util.find_spec("tensorrt") and torch.cuda.is_available()
                         and torch.cuda.get_device_capability() >= (9, 0)),
                    reason="needs tensorrt and a Hopper GPU (compute capability >= 9.0)")
def test_tensorrt_fp8_rewards_within_twice_pytorch_bf16_fp8_error(tmp_path):
    from vlmrm_fast import CLIPReward

    model, tokenizer = make_model("ViT-B-32")
    frames = _frames(7, 9)
    pixels, goal, direction, want = _reference(model, tokenizer, frames)
    with torch.no_grad():
        bf16_tower = _torch_fp8_tower(copy.deepcopy(model.visual).to(torch.bfloat16)).cuda()
        embeddings = bf16_tower(pixels.to(torch.bfloat16).cuda()).float().cpu()
    theirs = reference_reward_from_embeddings(embeddings, goal, direction, ALPHA)
    rm = CLIPReward(copy.deepcopy(model), tokenizer, goal=GOAL, baseline=BASELINE, alpha=ALPHA, device="cuda",
                    dtype=torch.bfloat16, backend="tensorrt",
                    backend_options={"quantize": "fp8", "calibration_frames": _frames(11, 32), "cache_dir": str(tmp_path)})
    ours = rm(torch.from_numpy(frames).cuda()).double().cpu()
    assert torch.isfinite(ours).all()
    error, pytorch_error = (ours - want).abs().max().item(), (theirs - want).abs().max().item()
    assert 1e-4 < error <= 2 * pytorch_error
    assert rm.vision_backend.engine_path.exists() and "fp8-bf16" in rm.vision_backend.engine_path.name
    # The rewards cannot tell fp8 kernels from a dequantise-then-bf16 fallback; the engine's layers can.
    layers = rm.vision_backend.layer_information().get("Layers", [])
    formats = [tensorrt_type_text(t) for layer in layers if isinstance(layer, dict) for t in layer.get("Inputs", [])]
    assert any("FP8" in f or "FLOAT8" in f or "E4M3" in f for f in formats), formats[:20]


# ---- behaviours a mutation audit found untested ---------------------------------------------------


def _tiny_export(tmp_path, opset=None):
    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.backends.onnx_fp8 import FP8_OPSET

    model, _ = make_tiny()
    return export_onnx(model.visual, tmp_path / "tower.onnx", preprocess_spec_of(model, "vlmrm"), input_format="pixels",
                       opset=opset or FP8_OPSET)


def test_quantize_fp8_checks_its_amax_and_scales_an_all_zero_activation(tmp_path):
    import onnx
    from onnx import numpy_helper

    from vlmrm_fast.backends.onnx_fp8 import fp8_targets, quantize_fp8

    source = _tiny_export(tmp_path)
    activations = sorted({a for _, a, _ in fp8_targets(onnx.load(str(source)))})
    zeros = dict.fromkeys(activations, 0.0)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="must be finite and >= 0"):
            quantize_fp8(source, tmp_path / "bad.onnx", {**zeros, activations[0]: bad})
    with pytest.raises(ValueError, match="no calibrated amax"):
        quantize_fp8(source, tmp_path / "bad.onnx", {a: 1.0 for a in activations[1:]})
    assert not (tmp_path / "bad.onnx").exists()
    # An activation that was zero on every calibration frame still gets a positive, finite scale.
    graph = onnx.load(str(quantize_fp8(source, tmp_path / "fp8.onnx", zeros)))
    scales = [numpy_helper.to_array(i) for i in graph.graph.initializer if i.name.endswith("_fp8_scale")]
    assert len(scales) == 12 and all(np.isfinite(s).all() and (s > 0).all() for s in scales)


def test_calibration_refuses_non_finite_activations_and_leaves_only_its_source(tmp_path):
    from vlmrm_fast.backends.onnx_fp8 import calibrate_amax

    source = _tiny_export(tmp_path, opset=17)
    calibrate_amax(source, [np.zeros((1, 3, 224, 224), np.float32)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tower.onnx"]  # its probe graph is gone
    with pytest.raises(ValueError, match="inf or NaN"):
        calibrate_amax(source, [np.full((1, 3, 224, 224), np.inf, np.float32)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tower.onnx"]


def test_calibration_batches_cover_every_frame_once():
    from vlmrm_fast.backends.onnx_fp8 import calibration_batches

    pixels = torch.arange(35 * 3, dtype=torch.float32).view(35, 3, 1, 1)
    chunks = list(calibration_batches(pixels))
    assert [len(c) for c in chunks] == [16, 16, 3] and all(isinstance(c, np.ndarray) for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), pixels.numpy())
    assert [len(c) for c in calibration_batches(pixels.numpy()[:10], batch_size=5)] == [5, 5]


def test_calibration_runs_on_the_backends_gpu_where_onnxruntime_has_cuda(monkeypatch):
    import onnxruntime as ort

    from vlmrm_fast.backends.onnx_fp8 import ort_providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_providers(1) == (("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert ort_providers(1) == ("CPUExecutionProvider",)


def test_fp8_half_graph_keeps_the_twins_scales_exactly_and_stores_weights_once(tmp_path):
    # The scales are rounded up to bf16 values before the rewrite, so the bf16 graph quantises exactly as
    # its float32 twin (what ONNX Runtime checks) does; quantised weights are stored in fp8 only, and
    # no float32 original of a weight or constant the half graph replaced is left in either file.
    import onnx
    from onnx import TensorProto, numpy_helper

    from vlmrm_fast.backends.onnx_fp8 import fp8_targets

    model, _ = make_tiny()
    twin, half = _fp8_graphs(model, tmp_path)
    weights = {w for _, _, w in fp8_targets(onnx.load(str(tmp_path / "tower.onnx")))}
    twin, half = onnx.load(str(twin)).graph, onnx.load(str(half)).graph
    twin_inits = {init.name: init for init in twin.initializer}
    assert weights and not weights & set(twin_inits)
    assert all(twin_inits[w + "_fp8"].data_type == TensorProto.FLOAT8E4M3FN for w in weights)
    half_inits = {init.name: init for init in half.initializer}
    scales = [name for name in twin_inits if name.endswith("_fp8_scale")]
    assert len(scales) == 12
    for name in scales:
        np.testing.assert_array_equal(numpy_helper.to_array(half_inits[name + "_bf16"]).astype(np.float32),
                                      numpy_helper.to_array(twin_inits[name]))
    for graph in (twin, half):
        read = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        assert {init.name for init in graph.initializer} <= read
        assert all(n.output[0] in read for n in graph.node if n.op_type == "Constant")


def _half_test_graph(path):
    """pixels [1, 3, 4, 4] -> Resize x2 (float32 scales from a Constant) -> LayerNorm over the last axis
    (scale and bias initializers) -> MatMul with a Constant weight [8, 5] -> embeddings; opset 17."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    constant = lambda name, values: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, np.float32), name + "_value"))
    nodes = [
        constant("scales", [1, 1, 2, 2]),
        helper.make_node("Resize", ["pixels", "", "scales"], ["resized"], mode="nearest", name="resize"),
        helper.make_node("LayerNormalization", ["resized", "ln_scale", "ln_bias"], ["normed"], axis=-1, name="ln"),
        constant("weight", rng.standard_normal((8, 5))),
        helper.make_node("MatMul", ["normed", "weight"], ["embeddings"], name="matmul"),
    ]
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "ln_scale"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "ln_bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [1, 3, 8, 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_half_rewrite_keeps_layernorm_and_resize_scales_in_float32(tmp_path):
    # A LayerNorm read directly by a half op (no cast back after it, unlike open_clip's) and Resize,
    # whose scales ONNX requires in float32 whatever the data's type.
    import onnx
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator

    from vlmrm_fast.backends.onnx_half import to_half_precision

    source = _half_test_graph(tmp_path / "g.onnx")
    with pytest.raises(ValueError, match=r"half='fp8' is not one of \('bf16', 'fp16'\)"):
        to_half_precision(source, tmp_path / "fp8.onnx", "fp8")
    graph = onnx.load(str(to_half_precision(source, tmp_path / "fp16.onnx", "fp16"))).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    producers = {out: node for node in graph.node for out in node.output}
    inits = {init.name: init for init in graph.initializer}
    [ln] = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert producers[ln.input[0]].op_type == "Cast" and all(inits[i].data_type == TensorProto.FLOAT for i in ln.input[1:])
    [resize] = [n for n in graph.node if n.op_type == "Resize"]
    assert producers[resize.input[2]].attribute[0].t.data_type == TensorProto.FLOAT
    read = {i for node in graph.node for i in node.input}
    assert set(inits) <= read and all(n.output[0] in read for n in graph.node if n.op_type == "Constant")
    pixels = np.random.default_rng(1).standard_normal((1, 3, 4, 4)).astype(np.float32)
    want = ReferenceEvaluator(str(source)).run(None, {"pixels": pixels})[0]
    got = ReferenceEvaluator(str(tmp_path / "fp16.onnx")).run(None, {"pixels": pixels.astype(np.float16)})[0]
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("scale_type", ["fp32", "bf16", "fp16"])
def test_scales_already_representable_are_kept(scale_type):
    from vlmrm_fast.backends.onnx_fp8 import representable_scale

    exact = np.array([0.5, 2.0**-10, 3.0, 1.5 * 2.0**-6])  # held exactly by all three types
    np.testing.assert_array_equal(representable_scale(exact, scale_type), exact.astype(np.float32))


def _fp8_test_graph(path, weight_shape=(4, 3)):
    """pixels [N, 4] -> Reshape to [N, -1] (which ONNX Runtime refuses for N = 0, as in the towers) -> flat,
    read by three weight MatMuls (w1 twice, w2 once) -> Sum -> Relu -> embeddings; opset 19.
    One activation and one weight each feed more than one matmul, which open_clip's towers never do."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal(weight_shape).astype(np.float32), name) for name in ("w1", "w2")]
    inits.append(numpy_helper.from_array(np.array([0, -1]), "flat_shape"))
    nodes = [helper.make_node("Reshape", ["pixels", "flat_shape"], ["flat"], name="reshape")]
    nodes += [helper.make_node("MatMul", ["flat", w], [f"m{i}"], name=f"matmul{i}") for i, w in enumerate(["w1", "w2", "w1"])]
    nodes += [helper.make_node("Sum", ["m0", "m1", "m2"], ["summed"], name="sum"),
              helper.make_node("Relu", ["summed"], ["embeddings"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["n", weight_shape[-1]])], inits)
    # IR version 9 (opset 19's): what the exporter writes, and what this ONNX Runtime reads.
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9), str(path))
    return path


def test_calibration_takes_the_largest_magnitude_over_every_frame_it_is_given(tmp_path):
    # The largest |x|, however the frames come: the most negative value counts, an empty batch is
    # skipped, float64 frames are read as float32; and no frames at all is an error, not a zero scale.
    from vlmrm_fast.backends.onnx_fp8 import calibrate_amax

    source = _fp8_test_graph(tmp_path / "g.onnx")
    batches = [np.zeros((0, 4), np.float32), np.array([[1.0, -7.0, 2.0, 3.0]]), np.full((2, 4), 0.5, np.float32)]
    assert calibrate_amax(source, batches) == {"flat": 7.0}
    with pytest.raises(ValueError, match="no frames"):
        calibrate_amax(source, [np.zeros((0, 4), np.float32)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]


def test_quantize_fp8_gives_a_shared_activation_or_weight_one_qdq(tmp_path):
    import onnx
    from onnx import numpy_helper

    from vlmrm_fast.backends.onnx_fp8 import quantize_fp8

    source = _fp8_test_graph(tmp_path / "g.onnx")
    pixels = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    graph = onnx.load(str(quantize_fp8(source, tmp_path / "fp8.onnx", {"flat": float(np.abs(pixels).max())})))
    onnx.checker.check_model(graph, full_check=True)
    outputs = [o for node in graph.graph.node for o in node.output]
    names = [init.name for init in graph.graph.initializer]
    assert len(outputs) == len(set(outputs)) and len(names) == len(set(names))  # each tensor defined once
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 3  # flat; flat, w1, w2
    w = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(source)).graph.initializer}
    want = np.maximum(pixels @ (2 * w["w1"] + w["w2"]), 0)
    got = _ort_qdq(tmp_path / "fp8.onnx", pixels)
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()  # fp8's rounding, not another computation


def test_quantize_fp8_with_one_scale_per_weight_matrix(tmp_path):
    # per_channel=False: one scale per matrix, from its largest magnitude, negative values included.
    import onnx
    from onnx import numpy_helper

    from vlmrm_fast.backends.onnx_fp8 import quantize_fp8

    source = _fp8_test_graph(tmp_path / "g.onnx")
    graph = onnx.load(str(source))
    w = {init.name: numpy_helper.to_array(init).copy() for init in graph.graph.initializer}
    w["w2"][0, 0] = -2 * np.abs(w["w2"]).max()  # the largest magnitude is negative
    graph.graph.initializer[1].CopyFrom(numpy_helper.from_array(w["w2"], "w2"))
    onnx.save(graph, str(source))
    fp8 = onnx.load(str(quantize_fp8(source, tmp_path / "fp8.onnx", {"flat": 3.0}, per_channel=False))).graph
    inits = {init.name: numpy_helper.to_array(init) for init in fp8.initializer}
    for name in ("w1", "w2"):
        assert inits[name + "_fp8_scale"].shape == ()
        np.testing.assert_allclose(inits[name + "_fp8_scale"], np.abs(w[name]).max() / E4M3_MAX, rtol=2**-23)
    pixels = np.random.default_rng(5).uniform(-3, 3, (3, 4)).astype(np.float32)
    want = np.maximum(pixels @ (2 * w["w1"] + w["w2"]), 0)
    assert np.abs(_ort_qdq(tmp_path / "fp8.onnx", pixels) - want).max() <= 0.1 * np.abs(want).max()


def test_fp8_refuses_what_it_cannot_quantise_saying_why(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from vlmrm_fast.backends.onnx_fp8 import calibrate_amax, quantize_fp8, representable_scale

    graph = helper.make_graph([helper.make_node("Relu", ["pixels"], ["embeddings"], name="relu")], "g",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9),
              str(tmp_path / "relu.onnx"))
    with pytest.raises(ValueError, match="no MatMul with a weight input"):
        calibrate_amax(tmp_path / "relu.onnx", [np.ones((1, 4), np.float32)])
    with pytest.raises(ValueError, match="no MatMul with a weight input"):  # not a copy left in float32
        quantize_fp8(tmp_path / "relu.onnx", tmp_path / "fp8.onnx", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relu.onnx"]
    # A batched weight [2, 4, 3]: one scale per output column of a 2-D weight has no meaning for it.
    source = _fp8_test_graph(tmp_path / "batched.onnx", weight_shape=(2, 4, 3))
    with pytest.raises(ValueError, match="w1 of matmul0 is 3-D; fp8 quantises 2-D matmul weights"):
        quantize_fp8(source, tmp_path / "fp8.onnx", {"flat": 1.0})
    with pytest.raises(ValueError, match=r"scale_type='fp8' is not one of \('fp32', 'bf16', 'fp16'\)"):
        representable_scale(np.ones(2), "fp8")


def test_fp8_calibration_runs_on_the_providers_it_is_given(tmp_path, monkeypatch):
    # The TensorRT backend passes the GPU's (ort_providers): a ViT-bigG-14 tower takes a second a frame on a CPU.
    import onnxruntime as ort

    from vlmrm_fast.backends.onnx_fp8 import fp8_tower_graph

    asked, session = [], ort.InferenceSession

    def recording(path, options=None, providers=None, **kwargs):
        asked.append(providers)
        return session(path, options, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    providers = (("CPUExecutionProvider", {}),)
    graph = fp8_tower_graph(_fp8_test_graph(tmp_path / "g.onnx"), np.ones((2, 4), np.float32), "bf16", providers)
    assert graph == tmp_path / "g-fp8-bf16.onnx" and graph.exists()
    assert asked == [[("CPUExecutionProvider", {})]]


def test_fp8_and_half_passes_without_onnx_name_the_extra(tmp_path, monkeypatch):
    import sys

    from vlmrm_fast.backends.onnx_fp8 import calibrate_amax, quantize_fp8
    from vlmrm_fast.backends.onnx_half import to_half_precision

    source = _fp8_test_graph(tmp_path / "g.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(BackendError, match=r"^fp8 calibration needs the `onnxruntime` package.*vlmrm-fast\[export\]'`\.$"):
        calibrate_amax(source, [np.ones((1, 4), np.float32)])
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackendError, match=r"^fp8 quantisation .* needs the `onnx` package.*vlmrm-fast\[export\]'`\.$"):
        quantize_fp8(source, tmp_path / "fp8.onnx", {"flat": 1.0})
    with pytest.raises(BackendError, match=r"^Half-precision ONNX graphs need.* the `onnx` package.*vlmrm-fast\[export\]"):
        to_half_precision(source, tmp_path / "half.onnx")


def test_half_rewrite_rounds_bf16_weights_to_nearest(tmp_path):
    # Round to nearest even, as PyTorch's .to(torch.bfloat16) does: truncating the float32 bits would
    # double the weights' error and bias it towards zero.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vlmrm_fast.backends.onnx_half import to_half_precision

    weight = np.random.default_rng(7).standard_normal((8, 5)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["pixels", "weight"], ["embeddings"], name="matmul")], "g",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [2, 5])],
                              [numpy_helper.from_array(weight, "weight")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    half = onnx.load(str(to_half_precision(tmp_path / "g.onnx", tmp_path / "bf16.onnx")))
    [stored] = half.graph.initializer
    assert stored.data_type == TensorProto.BFLOAT16
    want = torch.from_numpy(weight).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(np.frombuffer(stored.raw_data, np.int16).reshape(want.shape), want)


def test_half_rewrite_keeps_shape_arithmetic_in_float32_and_outputs_read_inside_the_graph(tmp_path):
    # relu(pixels [1, 3, 4, 4] * sqrt(float(shape(pixels)))) -> embeddings, and embeddings + embeddings -> doubled,
    # a second output that reads the first. The source carries value_info (a shape-inferred graph),
    # whose float32 types the rewrite must not keep.
    import onnx
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from vlmrm_fast.backends.onnx_half import to_half_precision

    nodes = [helper.make_node("Shape", ["pixels"], ["dims"], name="shape"),
             helper.make_node("Cast", ["dims"], ["dims_float"], to=TensorProto.FLOAT, name="cast_dims"),
             helper.make_node("Sqrt", ["dims_float"], ["root"], name="sqrt"),
             helper.make_node("Mul", ["pixels", "root"], ["scaled"], name="mul"),
             helper.make_node("Relu", ["scaled"], ["embeddings"], name="relu"),
             helper.make_node("Add", ["embeddings", "embeddings"], ["doubled"], name="add")]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("embeddings", "doubled")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 4, 4])],
                              outputs)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert model.graph.value_info
    onnx.save(model, str(tmp_path / "g.onnx"))
    half = onnx.load(str(to_half_precision(tmp_path / "g.onnx", tmp_path / "fp16.onnx", "fp16")))
    typed = onnx.shape_inference.infer_shapes(half, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in list(typed.graph.value_info) + list(typed.graph.output)}
    assert types["root"] == TensorProto.FLOAT  # shape arithmetic in float32, cast to half where it meets pixels
    assert types["scaled"] == TensorProto.FLOAT16
    assert types["embeddings"] == types["doubled"] == TensorProto.FLOAT
    pixels = np.random.default_rng(6).standard_normal((1, 3, 4, 4)).astype(np.float32)
    want = ReferenceEvaluator(str(tmp_path / "g.onnx")).run(None, {"pixels": pixels})
    got = ReferenceEvaluator(half).run(None, {"pixels": pixels.astype(np.float16)})
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and np.abs(g - w).max() <= 1e-2 * np.abs(w).max()
