"""A float32 tower graph rewritten to compute in bfloat16 or float16, LayerNorm kept in float32.

TensorRT builds every engine, bf16, fp16 and fp8 (Q/DQ), as a *strongly typed* network (TensorRT 10's
advice, and the only mode TensorRT 11 keeps): every tensor runs in the type the graph gives it, so the
graph itself must say "bf16 here, fp32 in LayerNorm". This pass says it:

- A float input ("pixels") becomes half; a uint8 input ("frames") stays uint8 and is cast to float32,
  then to half. The output ("embeddings") is cast back to float32.
- Float weights and constants take the type of the computation that reads them.
- LayerNormalization reads float32 (a Cast in front of it) and keeps its scale and bias in float32:
  the mean and variance of 1,000-wide rows lose too much in 8 mantissa bits. Its result is cast back
  to half.
- Shape arithmetic stays float32: a float tensor cast from integers keeps float32 until it meets a
  half tensor, and is cast to half there.
- A Cast to float32 of a float tensor casts to half instead: the exporter writes those where the
  model casts to its own dtype (open_clip's LayerNorm casting back to its input's type, the attention
  scale cast to the queries' type), and that dtype is now half, as in a tower run in half by PyTorch.
  Where the tensor is half already (after a LayerNorm), the cast is dropped.

Type rules, node by node: an op that reads any half tensor computes in half (its float32 inputs are cast);
an op that reads only float32 tensors and constants stays float32; DequantizeLinear's scale, and so its
output, is half. The result passes ONNX's strict type inference, which the tests check, and ONNX's
reference evaluator runs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Set, Union

import numpy as np

from vlmrm_fast.backends.base import missing_extra
from vlmrm_fast.backends.onnx_export import save_graph

HALF_TYPES = ("bf16", "fp16")
_FLOAT_TYPES = (1, 10, 11, 16, 17, 18, 19, 20)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16, FLOAT8 kinds
_FLOAT32_INPUTS = {"Resize": (1, 2)}
"""Inputs that ONNX requires in float32 whatever the data's type (Resize's roi and scales)."""


def to_half_precision(source: Union[str, Path], target: Union[str, Path], half: str = "bf16",
                      external_data: Optional[bool] = None) -> Path:
    """Write the float32 graph ``source`` rewritten to compute in ``half`` ("bf16" or "fp16") to ``target``.

    Weights go to ``<target>.data`` where ``external_data``, by default where they are over 2 GB
    (ViT-bigG-14). Limits: a Cast to float32 of a float
    tensor becomes a cast to half (see above), so a deliberate float32 island other than LayerNorm
    would not survive; open_clip's ViTs have none.
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise missing_extra("onnx", "export", "Half-precision ONNX graphs") from None
    if half not in HALF_TYPES:
        raise ValueError(f"half={half!r} is not one of {HALF_TYPES}.")
    HALF = TensorProto.BFLOAT16 if half == "bf16" else TensorProto.FLOAT16
    FLOAT = TensorProto.FLOAT
    source, target = Path(source), Path(target)
    model = onnx.load(str(source), load_external_data=True)
    graph = model.graph
    elem = _inferred_types(model)

    initializers = {init.name: init for init in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"}

    def is_float_constant(name: str) -> bool:
        tensor = initializers.get(name) or (constants[name].attribute[0].t if name in constants else None)
        return tensor is not None and tensor.data_type == FLOAT

    kind: Dict[str, int] = {}  # float tensors computed so far -> FLOAT or HALF
    graph_outputs = {value.name for value in graph.output}

    def is_float(name: str) -> bool:
        return name in kind or is_float_constant(name)

    # Graphs of old IR versions list initializers among the inputs too: those are weights, not data.
    data_inputs = {value.name for value in graph.input} - set(initializers)
    for value in graph.input:
        if value.name in data_inputs and value.type.tensor_type.elem_type == FLOAT:
            value.type.tensor_type.elem_type = HALF
            kind[value.name] = HALF
    half_copies: Dict[str, str] = {}  # float constant -> its half twin
    new_initializers: List = []
    nodes: List = []
    cast_count = [0]

    def as_half_constant(name: str) -> str:
        if name not in half_copies:
            source_tensor = initializers[name] if name in initializers else constants[name].attribute[0].t
            values = numpy_helper.to_array(source_tensor).astype(np.float32)
            copy = _half_tensor(values, name + "_" + half, half)
            new_initializers.append(copy)
            half_copies[name] = copy.name
        return half_copies[name]

    def cast(name: str, to: int) -> str:
        cast_count[0] += 1
        out = f"{name}_to_{'half' if to == HALF else 'float'}_{cast_count[0]}"
        nodes.append(helper.make_node("Cast", [name], [out], to=to, name=out))
        return out

    def append_then_half(node) -> None:
        """Append ``node``, whose first output is float32, followed by a cast of that output to half
        under the output's own name (which readers further on take as half)."""
        out = node.output[0]
        node.output[0] = out + "_float"
        kind[node.output[0]], kind[out] = FLOAT, HALF
        nodes.extend([node, helper.make_node("Cast", [node.output[0]], [out], to=HALF, name=out + "_to_half")])

    same_as: Dict[str, str] = {}  # outputs of dropped identity casts -> the tensor they passed on
    for node in graph.node:
        node.input[:] = [same_as.get(name, name) for name in node.input]
        if node.op_type == "Constant" and node.output[0] in constants and is_float_constant(node.output[0]):
            kind[node.output[0]] = FLOAT  # left as is; a half reader gets a half twin
            nodes.append(node)
            continue
        if node.op_type == "Cast":
            [to] = [a for a in node.attribute if a.name == "to"]
            if to.i == FLOAT and node.input[0] in data_inputs and not is_float(node.input[0]):
                # The uint8 frames are data, not shape arithmetic: cast to float32, then to half
                # (TensorRT casts uint8 to float32 or float16 only; 0-255 are exact in all three).
                append_then_half(node)
                continue
            if to.i == FLOAT:
                if kind.get(node.input[0]) == HALF and node.output[0] not in graph_outputs:
                    same_as[node.output[0]] = node.input[0]  # a cast from half to half: dropped
                    continue
                if is_float(node.input[0]):  # open_clip's cast back to the input's type: that type is now half
                    to.i = HALF
                kind[node.output[0]] = to.i  # else from integers: shape arithmetic, stays float32
            nodes.append(node)
            continue
        if node.op_type == "LayerNormalization":
            reads_half = kind.get(node.input[0]) == HALF
            if reads_half:  # normalised in float32; scale and bias stay float32
                node.input[0] = cast(node.input[0], FLOAT)
            for name in node.output:  # the result, and the optional Mean and InvStdDev (float32)
                if name:
                    kind[name] = FLOAT
            if reads_half and node.output[0] not in graph_outputs:
                # The result cast back to half: what the model does in half, with or without a Cast of
                # its own after the LayerNorm (torch's dynamo exporter drops open_clip's cast back to
                # the input's type, a float32 no-op).
                append_then_half(node)
            else:  # shape arithmetic or a float32 input; or the graph's float32 output
                nodes.append(node)
            continue
        if node.op_type == "DequantizeLinear":
            node.input[1] = as_half_constant(node.input[1])
            kind[node.output[0]] = HALF
            nodes.append(node)
            continue
        pinned = _FLOAT32_INPUTS.get(node.op_type, ())
        float_inputs = [i for i, name in enumerate(node.input) if name and is_float(name) and i not in pinned]
        computes_half = any(kind.get(node.input[i]) == HALF for i in float_inputs)
        if computes_half:
            for i in float_inputs:
                name = node.input[i]
                if kind.get(name) == HALF:
                    continue
                if is_float_constant(name):
                    node.input[i] = as_half_constant(name)
                else:
                    node.input[i] = cast(name, HALF)
        for out in node.output:
            if elem.get(out) == FLOAT:
                kind[out] = HALF if computes_half else FLOAT
        nodes.append(node)

    for value in graph.output:
        if kind.get(value.name) == HALF:
            # Rename the producer's output so the graph output keeps its name, now float32.
            inner = value.name + "_half"
            for node in nodes:
                node.input[:] = [inner if i == value.name else i for i in node.input]
                node.output[:] = [inner if o == value.name else o for o in node.output]
            nodes.append(helper.make_node("Cast", [inner], [value.name], to=FLOAT, name=value.name + "_to_float"))
    read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or n.output[0] in read]  # replaced by half twins
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_initializers)
    used = {i for n in graph.node for i in n.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # the float32 types inferred for the source no longer hold

    # Every tensor's type must follow from the graph: what a strongly typed TensorRT build relies on.
    _inferred_types(model)
    return save_graph(model, target, external_data)


def matmul_types(path: Union[str, Path]) -> Set[str]:
    """The types ("fp32", "bf16", "fp16") the graph at ``path`` computes its MatMul and Gemm nodes in,
    by ONNX's type inference; its weights are not read."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    elem = _inferred_types(model)
    names: Dict[Optional[int], str] = {TensorProto.FLOAT: "fp32", TensorProto.BFLOAT16: "bf16",
                                       TensorProto.FLOAT16: "fp16"}
    return {names.get(elem.get(n.output[0]), "other") for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}


def _inferred_types(model) -> Dict[str, int]:
    """Every tensor's ONNX element type in ``model``, by ONNX's strict type inference (weights not copied)."""
    import onnx

    typed = onnx.shape_inference.infer_shapes(model.__class__.FromString(_without_weights(model)), strict_mode=True)
    return {v.name: v.type.tensor_type.elem_type
            for v in list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)}


def _without_weights(model) -> bytes:
    """The model's bytes with large float initializers reduced to their name, type and shape (all that
    type inference needs of them), so that graphs over 2 GB are inferred in memory without a copy of
    their weights. Integer initializers (shapes, axes) keep their values: inference may read them."""
    from onnx import ModelProto, TensorProto

    light = ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(model.graph, field))
    for init in model.graph.initializer:
        if init.data_type in _FLOAT_TYPES and (init.data_location == TensorProto.EXTERNAL or len(init.raw_data) > 4096):
            graph.initializer.append(TensorProto(name=init.name, data_type=init.data_type, dims=init.dims))
        else:
            graph.initializer.append(init)
    return light.SerializeToString()


def _half_tensor(values: np.ndarray, name: str, half: str):
    from onnx import TensorProto, helper

    if half == "fp16":
        return helper.make_tensor(name, TensorProto.FLOAT16, values.shape, values.astype(np.float16).tobytes(), raw=True)
    import torch  # numpy has no bfloat16; torch rounds to nearest even

    bits = torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16).view(torch.int16).numpy()
    return helper.make_tensor(name, TensorProto.BFLOAT16, values.shape, bits.tobytes(), raw=True)
