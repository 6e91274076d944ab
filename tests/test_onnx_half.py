"""The half-precision tower graph (:mod:`vlmrm_fast.backends.onnx_half`): what TensorRT builds every
bf16 and fp16 engine from, as a strongly typed network (TensorRT 11 keeps no other mode).

TensorRT cannot run here, so the graph runs in ONNX's reference evaluator, which computes each node in
the type the graph gives it, as a strongly typed build must. Tolerance, as for every bf16/fp16 path: at
most twice PyTorch's own error at that precision against the float64 reference (the exact tower input
rounded to the half type, a copy of the tower cast to it, the rest in float64). Measured here (the tiny
model, 6 frames): bf16 4.7e-4 (pixels) and 9.9e-4 (uint8 frames: the folded normalisation rounds the
patch weights once more) against PyTorch's 6.8e-4; fp16 1.0e-4 and 1.1e-4 against 1.3e-4. A graph left
in float32 (error 2.5e-8) fails the lower bound.
"""
import importlib.util

import numpy as np
import pytest
import torch

from conftest import EXPORTERS, make_tiny
from reference import (float64_model, reference_preprocess, reference_reward, reference_reward_from_embeddings,
                       reference_targets, torch_own_reward)
from vlmrm_fast.models import preprocess_spec_of

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnx") is None,
                                reason="needs onnx (pip install 'vlmrm-fast[export]')")
GOAL, BASELINE, ALPHA = ["a humanoid robot kneeling", "kneeling"], ["a humanoid robot"], 0.5
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "Softmax", "Erf")


def _half_types(half: str):
    """(torch dtype, numpy dtype, ONNX element type) of ``half``."""
    from onnx import TensorProto

    if half == "fp16":
        return torch.float16, np.float16, TensorProto.FLOAT16
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return torch.bfloat16, ml_dtypes.bfloat16, TensorProto.BFLOAT16


def _types(model) -> dict:
    """Every tensor's element type, by ONNX's strict type inference."""
    import onnx

    typed = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {init.name: init.data_type for init in typed.graph.initializer}  # (an exporter may cast a weight)
    types.update((v.name, v.type.tensor_type.elem_type)
                 for v in list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output))
    return types


@pytest.mark.parametrize("half", ["bf16", "fp16"])
@pytest.mark.parametrize("input_format", ["pixels", "uint8-nhwc"])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_half_tower_graph_within_twice_pytorch_half_error(tmp_path, input_format, half, exporter):
    import onnx
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator

    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.backends.onnx_half import to_half_precision

    dtype, numpy_dtype, onnx_type = _half_types(half)
    model, tokenizer = make_tiny(seed=3)
    frames = np.random.default_rng(5).integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    source = export_onnx(model.visual, tmp_path / "tower.onnx", preprocess_spec_of(model, "vlmrm"),
                         input_format=input_format, exporter=exporter)
    graph = onnx.load(str(to_half_precision(source, tmp_path / f"tower-{half}.onnx", half)))

    # Typed as a strongly typed build reads it: every matmul, the patch embedding, softmax and GELU in
    # the half type (for uint8 frames too: their cast to float is data, not shape arithmetic), every
    # LayerNorm in float32, the embeddings float32.
    types = _types(graph)
    computed = [(n.op_type, types[n.output[0]]) for n in graph.graph.node if n.op_type in _COMPUTE_OPS]
    assert {op for op, _ in computed} == set(_COMPUTE_OPS)
    assert all(t == onnx_type for _, t in computed), computed
    assert all(types[n.input[0]] == types[n.output[0]] == TensorProto.FLOAT
               for n in graph.graph.node if n.op_type == "LayerNormalization")
    assert graph.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    # The model's casts back to its own type (after each LayerNorm, in the TorchScript exporter's graphs)
    # would be half-to-half casts: none is left.
    assert not [n.name for n in graph.graph.node if n.op_type == "Cast" and types[n.input[0]] == types[n.output[0]]]
    # TensorRT casts uint8 to float32 or float16 only: the frames go to float32 first.
    input_casts = [n for n in graph.graph.node if n.op_type == "Cast" and n.input[0] == "frames"]
    assert [a.i for n in input_casts for a in n.attribute] == ([TensorProto.FLOAT] if input_format == "uint8-nhwc" else [])

    if input_format == "pixels":
        pixels = reference_preprocess(frames, 224, CLIP_MEAN, CLIP_STD)
        inputs = {"pixels": torch.from_numpy(pixels).to(dtype).float().numpy().astype(numpy_dtype)}
    else:
        inputs = {"frames": frames}
    embeddings = ReferenceEvaluator(graph).run(None, inputs)[0]
    assert embeddings.dtype == np.float32
    with torch.no_grad():
        goal, direction = reference_targets(float64_model(model), tokenizer, GOAL, BASELINE)
    ours = reference_reward_from_embeddings(torch.from_numpy(embeddings), goal, direction, ALPHA)
    want = reference_reward(model, tokenizer, frames, GOAL, BASELINE, ALPHA)
    theirs = torch_own_reward(model, tokenizer, frames, GOAL, BASELINE, ALPHA, dtype)
    assert torch.isfinite(ours).all()
    error, pytorch_error = (ours - want).abs().max().item(), (theirs - want).abs().max().item()
    assert 1e-5 < error <= 2 * pytorch_error, (error, pytorch_error)


def test_half_rewrite_leaves_initializers_listed_as_inputs_as_weights(tmp_path):
    # Graphs of old IR versions list their initializers among the inputs. Such a float weight stays a
    # float32 weight (a half twin for its half reader), and an integer one cast to float is shape
    # arithmetic (float32), not data like the uint8 frames.
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from vlmrm_fast.backends.onnx_half import to_half_precision

    weight = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["pixels", "weight"], ["product"], name="matmul"),
             helper.make_node("Cast", ["count"], ["count_float"], to=TensorProto.FLOAT, name="cast_count"),
             helper.make_node("Div", ["product", "count_float"], ["embeddings"], name="div")]
    inputs = [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [2, 4]),
              helper.make_tensor_value_info("weight", TensorProto.FLOAT, [4, 3]),
              helper.make_tensor_value_info("count", TensorProto.INT64, [])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(np.array(300), "count")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    half = onnx.load(str(to_half_precision(tmp_path / "g.onnx", tmp_path / "bf16.onnx")))
    types = _types(half)
    assert types["weight"] == types["count_float"] == TensorProto.FLOAT  # declared as stored; 300 kept exact
    assert types["product"] == TensorProto.BFLOAT16 and types["embeddings"] == TensorProto.FLOAT
    pixels = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    want = ReferenceEvaluator(str(tmp_path / "g.onnx")).run(None, {"pixels": pixels})[0]
    got = ReferenceEvaluator(half).run(None, {"pixels": pixels.astype(_half_types("bf16")[1])})[0]
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


@pytest.mark.parametrize("cast_back", [False, True], ids=["layernorm-alone", "with-the-models-cast"])
def test_a_layernorm_result_is_half_with_or_without_a_cast_of_the_models_own(tmp_path, cast_back):
    # open_clip's LayerNorm casts its result back to the input's type: a float32 Cast in a float32 export,
    # which the TorchScript exporter writes and the dynamo exporter drops. Either way the matmul after the
    # LayerNorm must compute in half, as in a tower run in half, not in float32 for the rest of the graph.
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from vlmrm_fast.backends.onnx_half import to_half_precision

    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32)
               for name, shape in (("w1", (5, 6)), ("w2", (6, 3)), ("gamma", (6,)), ("beta", (6,)))}
    nodes = [helper.make_node("MatMul", ["pixels", "w1"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1, epsilon=1e-5)]
    if cast_back:
        nodes.append(helper.make_node("Cast", ["n"], ["n_cast"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("MatMul", ["n_cast" if cast_back else "n", "w2"], ["embeddings"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    source = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))

    half = onnx.load(str(to_half_precision(source, tmp_path / "half.onnx", "fp16")))
    types = _types(half)
    matmuls = [types[n.output[0]] for n in half.graph.node if n.op_type == "MatMul"]
    assert matmuls == [TensorProto.FLOAT16, TensorProto.FLOAT16]
    [norm] = [n for n in half.graph.node if n.op_type == "LayerNormalization"]
    assert types[norm.input[0]] == types[norm.output[0]] == TensorProto.FLOAT
    pixels = rng.standard_normal((4, 5)).astype(np.float16)
    got = ReferenceEvaluator(half).run(None, {"pixels": pixels})[0]
    h = pixels.astype(np.float64) @ weights["w1"].astype(np.float16).astype(np.float64)
    h = h.astype(np.float16).astype(np.float64)  # the first matmul's result, in half
    n = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * weights["gamma"] + weights["beta"]
    want = n.astype(np.float16).astype(np.float64) @ weights["w2"].astype(np.float16).astype(np.float64)
    # The reference rounds to half where the graph does; what is left is the evaluator's half matmul and
    # the last rounding (measured 3.8e-4 of the largest value; fp16 keeps 4.9e-4): four half ulps.
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


def test_a_layernorm_that_gives_the_graph_output_or_its_statistics_stays_float32(tmp_path):
    # Its result as the graph's float32 output is not rounded to half and back; its Mean and InvStdDev
    # (float32) meet half tensors through a cast, so the graph stays strictly typed.
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from vlmrm_fast.backends.onnx_half import to_half_precision

    rng = np.random.default_rng(1)
    weights = {name: rng.standard_normal(shape).astype(np.float32)
               for name, shape in (("w", (5, 6)), ("gamma", (6,)), ("beta", (6,)))}
    nodes = [helper.make_node("MatMul", ["pixels", "w"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["embeddings", "mean", "inv_std"],
                              axis=-1, epsilon=1e-5),
             helper.make_node("Mul", ["h", "mean"], ["scaled"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 6]),
         helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", 6])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    source = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))

    half = onnx.load(str(to_half_precision(source, tmp_path / "half.onnx", "fp16")))
    types = _types(half)
    [norm] = [n for n in half.graph.node if n.op_type == "LayerNormalization"]
    assert norm.output[0] == "embeddings" and types["embeddings"] == TensorProto.FLOAT
    assert types["scaled"] == TensorProto.FLOAT and types[[n for n in half.graph.node if n.op_type == "Mul"][0].output[0]] \
        == TensorProto.FLOAT16
    pixels = rng.standard_normal((3, 5)).astype(np.float16)
    got = ReferenceEvaluator(half).run(["embeddings"], {"pixels": pixels})[0]  # a float32 Mean times half fails here
    h = (pixels.astype(np.float64) @ weights["w"].astype(np.float16).astype(np.float64)).astype(np.float16).astype(np.float64)
    want = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * weights["gamma"] + weights["beta"]
    # Only the first matmul is in half (rounded in the reference too); the LayerNorm and its output are
    # float32 (measured 6e-8 of the largest value), where a round trip through half is off by up to 4.9e-4:
    # 1e-4 tells the two apart.
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
