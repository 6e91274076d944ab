"""fp8 (E4M3) quantisation of an exported tower as explicit Q/DQ pairs, for TensorRT on Hopper GPUs.

The tower's FLOPs are nearly all in the transformer's weight matmuls (SPEC §2); Hopper's tensor cores
run them at twice the bf16 rate in fp8. TensorRT takes fp8 as *explicit* quantisation: a
QuantizeLinear/DequantizeLinear pair in the ONNX graph on each matmul input that should be fp8, with
its scale. This module writes that graph:

- Which matmuls: the weight MatMuls of every block (attention input projection, MLP in and out), as
  for int8 (:func:`vlmrm_fast.backends.onnx_quantize.weight_matmuls`). The output projection stays in
  the float precision (its error goes straight into the reward), as do the attention output
  projection (a Gemm), attention itself, LayerNorm, GELU and the patch embedding.
- Weights: one scale per output column, ``amax / 448`` (448 is E4M3's largest finite value), so a
  column of small weights keeps its 3 mantissa bits whatever the rest of the matrix holds. They are
  stored quantised (E4M3 initializers, then a DequantizeLinear), a quarter of their float32 size.
- Activations: one static scale per tensor, ``amax / 448``, with amax the largest magnitude seen over
  *calibration* frames (:func:`calibrate_amax`). A frame brighter than any calibration frame saturates
  at +-448 x scale instead of overflowing; calibrate on frames like the ones you will score.

The graph must be opset 19 or later (E4M3 types): export it with ``export_onnx(..., opset=19)``. ONNX Runtime runs it on CPU by quantising and dequantising
in float32 (with ``session.disable_quant_qdq``: its integer Q/DQ fusions take int8 only), which is how
the tests check its accuracy against the float64 reference without a GPU.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple, Union

import numpy as np

from vlmrm_fast.backends.base import missing_extra
from vlmrm_fast.backends.onnx_quantize import weight_matmuls

FP8_E4M3_MAX = 448.0
FP8_OPSET = 19  # QuantizeLinear/DequantizeLinear with float8 types
_TINY = 1e-12  # an all-zero tensor still needs a positive scale


def _onnx():
    try:
        import onnx
    except ImportError:
        raise missing_extra("onnx", "export", "fp8 quantisation (quantize='fp8')") from None
    return onnx


def fp8_targets(model) -> List[Tuple[str, str, str]]:
    """``(node name, activation input, weight initializer)`` for each matmul to run in fp8."""
    chosen = set(weight_matmuls(model))
    return [(n.name, n.input[0], n.input[1]) for n in model.graph.node if n.name in chosen]


def calibrate_amax(
    source: Union[str, Path], pixel_batches: Iterable[np.ndarray], providers: Tuple = ("CPUExecutionProvider",),
) -> Dict[str, float]:
    """The largest magnitude of each fp8 matmul's activation input over ``pixel_batches``.

    Args:
        source: the tower's float32 "pixels" export (:func:`~vlmrm_fast.backends.onnx_export.export_onnx`).
        pixel_batches: float32 arrays [n, 3, S, S], the preprocessed calibration frames.
        providers: ONNX Runtime execution providers (names, or (name, options) pairs) for the float32 graph.
    Returns:
        activation tensor name -> amax (finite, >= 0).
    """
    onnx = _onnx()
    try:
        import onnxruntime as ort
    except ImportError:
        raise missing_extra("onnxruntime", "export", "fp8 calibration") from None
    source = Path(source)
    model = onnx.load(str(source), load_external_data=False)
    activations = sorted({activation for _, activation, _ in fp8_targets(model)})
    if not activations:
        raise ValueError(f"{source} has no MatMul with a weight input: nothing to run in fp8.")
    del model.graph.output[:]  # only the amax outputs: the embeddings are not needed
    for i, name in enumerate(activations):
        model.graph.node.extend([
            onnx.helper.make_node("Abs", [name], [f"vlmrm_abs_{i}"]),
            onnx.helper.make_node("ReduceMax", [f"vlmrm_abs_{i}"], [f"vlmrm_amax_{i}"], keepdims=0),
        ])
        model.graph.output.append(onnx.helper.make_tensor_value_info(f"vlmrm_amax_{i}", onnx.TensorProto.FLOAT, []))
    # Next to the source, so that its external weights (ViT-bigG-14) resolve from the same folder.
    probe = source.with_name(source.stem + "-calibration.onnx")
    onnx.save_model(model, str(probe))
    try:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(probe), options, providers=list(providers))
        amax: np.ndarray = np.zeros(len(activations), dtype=np.float64)  # NumPy 2.2 types it 1-D, np.maximum N-D
        seen = 0
        for pixels in pixel_batches:
            pixels = np.ascontiguousarray(pixels, dtype=np.float32)
            if pixels.shape[0] == 0:
                continue
            amax = np.maximum(amax, np.array(session.run(None, {"pixels": pixels}), dtype=np.float64))
            seen += pixels.shape[0]
    finally:
        probe.unlink(missing_ok=True)
    if seen == 0:
        raise ValueError("fp8 calibration got no frames; pass at least one (a few hundred like the ones you score is better).")
    if not np.isfinite(amax).all():
        raise ValueError("fp8 calibration: the float32 tower produced inf or NaN activations on the calibration frames.")
    return dict(zip(activations, amax.tolist()))


def quantize_fp8(
    source: Union[str, Path],
    target: Union[str, Path],
    amax: Dict[str, float],
    *,
    per_channel: bool = True,
    scale_type: str = "fp32",
) -> Path:
    """Write ``source`` (a float32 tower export, opset >= 19) with its weight matmuls in fp8 to ``target``.

    Each weight becomes an E4M3 initializer read through a DequantizeLinear (TensorRT's form for
    pre-quantised weights: a quarter of the float32 bytes); each matmul's activation input goes
    through a QuantizeLinear/DequantizeLinear pair.

    Args:
        amax: activation tensor name -> calibrated largest magnitude (:func:`calibrate_amax`).
        per_channel: one weight scale per output column (else one per matrix).
        scale_type: "fp32", or the half type ("bf16", "fp16") the graph will compute in
            (:func:`~vlmrm_fast.backends.onnx_half.to_half_precision`): scales are rounded up to values
            that type holds exactly, so the rewrite keeps them exact and no calibrated value exceeds
            448 x scale.
    """
    onnx = _onnx()
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from vlmrm_fast.backends.onnx_export import save_graph

    source, target = Path(source), Path(target)
    model = onnx.load(str(source), load_external_data=True)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < FP8_OPSET:
        raise ValueError(f"{source} is opset {opset}; fp8 Q/DQ needs opset >= {FP8_OPSET}: "
                         f"export it with export_onnx(..., opset={FP8_OPSET}).")
    targets = fp8_targets(model)
    if not targets:
        raise ValueError(f"{source} has no MatMul with a weight input: nothing to run in fp8.")
    missing = sorted({a for _, a, _ in targets} - set(amax))
    if missing:
        raise ValueError(f"no calibrated amax for activation(s) {missing[:3]}; calibrate this graph with calibrate_amax.")
    initializers = {init.name: init for init in model.graph.initializer}
    new_initializers, replacements, inserted = [], {}, {}

    def scale_and_zero(name: str, amax_values: np.ndarray) -> Tuple[np.ndarray, str, str]:
        scale = representable_scale(np.maximum(amax_values, _TINY) / FP8_E4M3_MAX, scale_type)
        new_initializers.append(numpy_helper.from_array(scale, f"{name}_fp8_scale"))
        # E4M3 zero points are zeros (symmetric); their bytes are 0x00, whatever the shape.
        new_initializers.append(helper.make_tensor(f"{name}_fp8_zero", TensorProto.FLOAT8E4M3FN, list(scale.shape),
                                                   [0.0] * scale.size))
        return scale, f"{name}_fp8_scale", f"{name}_fp8_zero"

    for node_name, activation, weight in targets:
        if activation not in inserted:
            value = float(amax[activation])
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"amax for {activation} is {value}; it must be finite and >= 0.")
            _, scale, zero = scale_and_zero(activation, np.array(value, dtype=np.float64))
            inserted[activation] = [
                helper.make_node("QuantizeLinear", [activation, scale, zero], [f"{activation}_fp8"], name=f"{activation}_fp8_q"),
                helper.make_node("DequantizeLinear", [f"{activation}_fp8", scale, zero], [f"{activation}_fp8_dq"],
                                 name=f"{activation}_fp8_dq"),
            ]
        if weight not in inserted:
            values = numpy_helper.to_array(initializers[weight]).astype(np.float32)  # [K, N]
            if values.ndim != 2:
                raise ValueError(f"weight {weight} of {node_name} is {values.ndim}-D; fp8 quantises 2-D matmul weights.")
            column_amax = np.abs(values).max(axis=0) if per_channel else np.array(np.abs(values).max())
            scale_values, scale, zero = scale_and_zero(weight, column_amax.astype(np.float64))
            # Round to nearest even, as QuantizeLinear does; |values / scale| <= 448 by construction.
            quantized = (torch.from_numpy(values) / torch.from_numpy(scale_values)).to(torch.float8_e4m3fn)
            new_initializers.append(helper.make_tensor(f"{weight}_fp8", TensorProto.FLOAT8E4M3FN, list(values.shape),
                                                       quantized.view(torch.uint8).numpy().tobytes(), raw=True))
            kwargs: Dict[str, Any] = {"axis": 1} if per_channel else {}  # make_node's node attributes
            inserted[weight] = [helper.make_node("DequantizeLinear", [f"{weight}_fp8", scale, zero], [f"{weight}_fp8_dq"],
                                                 name=f"{weight}_fp8_dq", **kwargs)]
        replacements[node_name] = (f"{activation}_fp8_dq", f"{weight}_fp8_dq")

    # Each new node goes just before the first node that reads it, which keeps the list topological.
    nodes, placed = [], set()
    for node in model.graph.node:
        if node.name in replacements:
            for tensor in (node.input[0], node.input[1]):
                if tensor not in placed:
                    nodes.extend(inserted[tensor])
                    placed.add(tensor)
            node.input[0], node.input[1] = replacements[node.name]
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    read = {i for node in nodes for i in node.input}
    kept = [init for init in model.graph.initializer if init.name in read]  # float32 weights now stored as fp8
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_initializers)
    return save_graph(model, target)


def representable_scale(scale: np.ndarray, scale_type: str) -> np.ndarray:
    """``scale`` (float64, > 0) rounded *up* to the nearest value of ``scale_type``, as float32."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if scale_type not in dtypes:
        raise ValueError(f"scale_type={scale_type!r} is not one of {tuple(dtypes)}.")
    exact = torch.from_numpy(np.asarray(scale, dtype=np.float64))
    rounded = exact.to(dtypes[scale_type])
    low = rounded.double() < exact
    if low.any():  # positive values: the next representable value up is one unit more in the bits
        bits = rounded.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[rounded.dtype])
        rounded = torch.where(low, (bits + 1).view(rounded.dtype), rounded)
    return rounded.float().numpy()


def calibration_batches(pixels, batch_size: int = 16) -> Iterable[np.ndarray]:
    """Slices of a float32 pixel array or tensor [N, 3, S, S] of at most ``batch_size`` frames."""
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size]
        yield chunk.numpy() if hasattr(chunk, "numpy") else np.asarray(chunk)


def ort_providers(device_index: int = 0) -> Tuple:
    """ONNX Runtime providers for calibration: the GPU ``device_index`` where the GPU build of ONNX
    Runtime is installed (a ViT-bigG-14 tower takes about a second a frame on a CPU), else the CPU."""
    try:
        import onnxruntime as ort
    except ImportError:  # calibrate_amax names the extra to install
        return ("CPUExecutionProvider",)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return (("CUDAExecutionProvider", {"device_id": device_index}), "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def fp8_tower_graph(
    source: Union[str, Path], calibration_pixels, half: str = "bf16", providers: Tuple = ("CPUExecutionProvider",),
) -> Path:
    """The graph TensorRT builds an fp8 engine from: ``source`` (a float32 "pixels" export, opset >= 19)
    calibrated on ``calibration_pixels`` (float32 [N, 3, S, S], array or CPU tensor), its weight matmuls
    in fp8, the rest computing in ``half`` with LayerNorm in float32. Written next to ``source``, as is
    its float32 twin ``<stem>-fp8-<half>-float32.onnx`` (the same Q/DQ pairs and scales, the rest in
    float32: ONNX Runtime runs it on CPU)."""
    from vlmrm_fast.backends.onnx_half import to_half_precision

    source = Path(source)
    amax = calibrate_amax(source, calibration_batches(calibration_pixels), providers)
    twin = quantize_fp8(source, source.with_name(source.stem + f"-fp8-{half}-float32.onnx"), amax, scale_type=half)
    return to_half_precision(twin, source.with_name(source.stem + f"-fp8-{half}.onnx"), half)
