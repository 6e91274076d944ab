"""int8 dynamic quantisation of an exported tower, for the "onnxruntime" backend on CPU.

The tower's FLOPs are nearly all in the transformer's weight matmuls (SPEC §2). ONNX Runtime's dynamic
quantisation stores the weights of the MatMul nodes (the attention input projections and the MLP: 11/12
of a block's weight FLOPs) as int8 and, at run time, quantises each one's input activation to uint8 with
a scale from that tensor's own range, multiplies in integer arithmetic (u8 x s8, accumulated in int32)
and rescales to float32. Everything else stays float32: the patch embedding, LayerNorm, attention
scores, softmax, GELU, the output projection, and the attention output projections (exported as Gemm,
for which dynamic quantisation has no integer kernel).

Choices, and why:
- Per-channel weight scales: one scale per output column, so a column of small weights is not rounded
  to zero by a large one elsewhere in the matrix.
- ``reduce_range`` (7-bit weights): on x86 CPUs without AVX512-VNNI, ONNX Runtime's u8 x s8 kernels add
  pairs of products in int16 (``vpmaddubsw``), which can saturate with 8-bit weights; 7-bit weights
  cannot. The same numerics on every x86 CPU is worth the bit.
- The output projection (the last matmul, whose output is the embedding) stays float32: it is a small
  share of the FLOPs and its error goes straight into the reward.

Semantics to know: the activation scale is computed over the whole input tensor of a matmul, which
holds every frame of the batch, so a frame's reward depends (slightly) on the other frames in its batch.
The accuracy of the reward is tested against the float64 reference (tests/test_quantize.py) and
measured per run by the profiler's reward-error column.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Union

from vlmrm_fast.backends.base import missing_extra
from vlmrm_fast.quiet_logging import root_records_dropped

QUANTIZE_CHOICES = ("int8",)


def weight_matmuls(model) -> List[str]:
    """Names of the MatMul nodes of an ``onnx.ModelProto`` with a constant (weight) input,
    except those whose output is a graph output (the tower's output projection)."""
    constants = {init.name for init in model.graph.initializer}  # what the quantiser can rewrite as int8
    outputs = {out.name for out in model.graph.output}
    return [
        node.name for node in model.graph.node
        if node.op_type == "MatMul" and node.input[1] in constants  # the quantiser takes input 1 as the weight
        and not outputs.intersection(node.output)
    ]


def quantize_int8(source: Union[str, Path], target: Union[str, Path]) -> Path:
    """Write an int8 dynamically quantised copy of the ONNX graph ``source`` to ``target``.

    Raises:
        BackendError: onnx or onnxruntime is missing (extra ``export``).
        ValueError: the graph has no weight matmul to quantise (not a transformer tower).
    """
    try:
        import onnx
        import onnxruntime.quantization
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise missing_extra("onnxruntime", "export", "onnxruntime") from None
    source, target = Path(source), Path(target)
    external = source.with_name(source.name + ".data").exists()
    nodes = weight_matmuls(onnx.load(str(source), load_external_data=False))
    if not nodes:
        raise ValueError(f"{source} has no MatMul with a weight input: nothing for int8 quantisation to speed up.")
    # Node names must be unique for nodes_to_quantize to mean what it says; the exporters make them so.
    # The quantiser logs generic advice ("consider pre-processing") through the root logger.
    with root_records_dropped(os.path.dirname(onnxruntime.quantization.__file__)):
        quantize_dynamic(
            str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
            nodes_to_quantize=nodes, use_external_data_format=external,
        )
    return target
