"""Exporting the vision tower to ONNX, for ONNX Runtime, TensorRT, or your own runtime.

Two input formats:
- "uint8-nhwc": raw frames uint8 [N, S, S, 3], as a renderer produces them. The CLIP normalisation is
  folded into the patch embedding (SPEC §1.2): normalisation is affine per channel and the patch
  convolution is linear without padding, so ``conv(W, (v * a_c) + s_c) = conv(W * a_c, v) + sum W s_c``,
  exact up to rounding. The graph is a cast, a transpose and the tower.
- "pixels": normalised float [N, 3, S, S], the output of vlmrm_fast's preprocessing op; what the
  runtime backends inside CLIPReward use, so that any frame size can be resized first.

The batch axis is dynamic; everything else is fixed, and each block's self-attention is written with
its token count and head layout as constants (:class:`StaticSelfAttention`). Graphs whose weights
exceed what one protobuf can hold (2 GB; ViT-bigG-14) are written with their tensors in a side file
``<name>.data``.

Two of torch's exporters can write the graph (``exporter=``): the TorchScript-based one, which every
supported torch has and every test of the graph rewrites here (half precision, fp8, int8) runs on, and
the ``torch.export``-based "dynamo" one (torch >= 2.6 and the ``onnxscript`` package; a selection of
those tests), which torch makes its default from 2.9 and is replacing the TorchScript one with.
``"auto"`` (the default) uses the TorchScript exporter and, where it fails (a torch that no longer has
it), the dynamo one, with a warning.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, Literal, Optional, Union, cast

import torch
import torch.nn.functional as F

from vlmrm_fast.argtypes import ONNX_EXPORTERS, ONNX_INPUT_FORMATS
from vlmrm_fast.atomic import default_file_mode, destination_of, fsync_dir
from vlmrm_fast.backends.base import BackendError, missing_extra, pooled_embeddings
from vlmrm_fast.backends.base import original_modules, runs_forward_hooks
from vlmrm_fast.backends.torch_fp8 import is_fp8_quantised
from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.ops.preprocess import PreprocessSpec
from vlmrm_fast.quiet_logging import loggers_quieted
from vlmrm_fast.scratch import scratch_folder

InputFormat = Literal["uint8-nhwc", "pixels"]
Exporter = Literal["auto", "torchscript", "dynamo"]
_PROTOBUF_LIMIT = 2 * 1024**3
OPSET = 17  # export_onnx's default; the dynamo exporter writes at least _DYNAMO_MIN_OPSET
_DYNAMO_MIN_OPSET = 18
_log = logging.getLogger(__name__)


class Uint8VisionTower(torch.nn.Module):
    """uint8 frames [N, S, S, 3] -> raw embeddings [N, D], normalisation folded into ``conv1``.

    Towers whose first layer is not a plain unpadded convolution (padded, as in ResNets, dilated or grouped),
    or runs forward hooks, and towers with forward pre-hooks (hooks that see the normalised pixels), keep an
    explicit per-channel affine step instead; the result is the same.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, visual: torch.nn.Module, spec: PreprocessSpec) -> None:
        super().__init__()
        self.visual = copy.deepcopy(visual)
        scale, shift = spec.affine(torch.uint8)
        dtype = next(self.visual.parameters()).dtype
        scale_t = torch.tensor(scale, dtype=torch.float64)
        shift_t = torch.tensor(shift, dtype=torch.float64)
        conv = getattr(self.visual, "conv1", None)
        self.folded = False
        if (isinstance(conv, torch.nn.Conv2d) and conv.padding in ((0, 0), 0) and conv.in_channels == 3
                and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and not runs_forward_hooks(conv)
                and not self.visual._forward_pre_hooks):
            self.folded = True
            weight = conv.weight.detach().double()
            bias = weight.mul(shift_t.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
            if conv.bias is not None:
                bias = bias + conv.bias.detach().double()
            size, stride = cast("tuple[int, int]", conv.kernel_size), cast("tuple[int, int]", conv.stride)
            folded = torch.nn.Conv2d(3, conv.out_channels, size, stride, bias=True)
            folded.weight.data = (weight * scale_t.view(1, 3, 1, 1)).to(dtype)
            cast(torch.Tensor, folded.bias).data = bias.to(dtype)  # made with bias=True
            self.visual.conv1 = folded.to(conv.weight.device)
        self.register_buffer("scale", scale_t.to(dtype).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift_t.to(dtype).view(1, 3, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # Cast before the transpose: TensorRT's ONNX parser takes uint8 only as a graph input or
        # output, never as an intermediate tensor.
        x = frames.to(self.scale.dtype).permute(0, 3, 1, 2)
        if not self.folded:
            x = x * self.scale + self.shift
        return pooled_embeddings(self.visual(x))


class StaticSelfAttention(torch.nn.Module):
    """The export form of an ``nn.MultiheadAttention`` used as unmasked self-attention over a fixed
    number of tokens: the same weights and the same maths, tokens [B, L, E] (or [L, B, E]) in and out.

    Traced, ``nn.MultiheadAttention`` computes its reshapes and its scale from the input's shape at run
    time: about 30 Shape/Gather/Concat/Unsqueeze nodes a block once the batch axis is dynamic. Here the
    token count, heads and scale are constants, so a block's attention is a projection, one transpose,
    two batched matmuls, a softmax and the output projection (a Gemm, as before): ViT-B-32 goes from
    about 2,000 nodes to 600 and runs 2-5% faster in ONNX Runtime on CPU.
    """

    def __init__(self, attention: torch.nn.MultiheadAttention, tokens: int) -> None:
        super().__init__()
        self.attention = attention  # its parameters, shared: nothing is copied
        self.tokens = tokens
        self.batch_first = attention.batch_first
        self.heads = attention.num_heads
        self.head_dim = attention.embed_dim // attention.num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)

    @staticmethod
    def fits(attention: torch.nn.MultiheadAttention, args: tuple, kwargs: dict) -> Optional[int]:
        """The token count of a call ``attention(*args, **kwargs)`` this class computes alike, else None."""
        try:
            call = inspect.signature(type(attention).forward).bind(attention, *args, **kwargs)
        except TypeError:
            return None
        call.apply_defaults()
        given = call.arguments
        query = given["query"]
        plain = (
            attention._qkv_same_embed_dim and attention.bias_k is None and attention.bias_v is None
            and not attention.add_zero_attn and (not attention.training or attention.dropout == 0)
        )
        unmasked = given.get("attn_mask") is None and given.get("key_padding_mask") is None and not given.get("is_causal")
        self_attention = given["key"] is query and given["value"] is query and query.dim() == 3
        if not (plain and unmasked and self_attention and given.get("need_weights") is False):
            return None
        return query.shape[1 if attention.batch_first else 0]

    def forward(self, query: torch.Tensor, *args, **kwargs):
        x = query if self.batch_first else query.transpose(0, 1)
        width = self.attention.embed_dim
        qkv = F.linear(x, self.attention.in_proj_weight, self.attention.in_proj_bias)
        q, k, v = qkv.reshape(-1, self.tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        weights = torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(-1, width)
        out = F.linear(out, self.attention.out_proj.weight, self.attention.out_proj.bias).reshape(-1, self.tokens, width)
        return (out if self.batch_first else out.transpose(0, 1)), None


@contextlib.contextmanager
def static_self_attention(module: torch.nn.Module, example: torch.Tensor) -> Iterator[int]:
    """Swap, for the duration of the block, each ``nn.MultiheadAttention`` of ``module`` that a forward
    pass on ``example`` calls as unmasked self-attention for a :class:`StaticSelfAttention` (others stay
    as they are, as do those with forward hooks: the export traces those, as torch runs them); yields how
    many were swapped."""
    attentions = [m for m in module.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    tokens: Dict[torch.nn.Module, Optional[int]] = {}

    def record(attention, args, kwargs):
        seen = StaticSelfAttention.fits(attention, args, kwargs)
        tokens[attention] = seen if tokens.get(attention, seen) == seen else None

    handles = [a.register_forward_pre_hook(record, with_kwargs=True) for a in attentions]
    try:
        with torch.no_grad(), _mha_fastpath_disabled():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    swaps = [
        (parent, name, child) for parent in module.modules() for name, child in parent.named_children()
        if isinstance(child, torch.nn.MultiheadAttention) and tokens.get(child) is not None
        and not runs_forward_hooks(child)  # (ours are removed) a user's hook, an ablation say, is in the tower
    ]
    try:
        for parent, name, child in swaps:
            setattr(parent, name, StaticSelfAttention(child, cast(int, tokens[child])))
        yield len(swaps)
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` and every layer in it in eval mode for the duration of the block, then each in the mode it
    was in: an export of a tower being fine-tuned leaves it training."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    # nn.MultiheadAttention's inference fast path (one fused op) has no ONNX form; the exporter
    # must trace the plain path.
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def check_exporter(exporter: str, backend: str) -> Exporter:
    """``exporter`` as a backend's option, or a :class:`~vlmrm_fast.backends.BackendError` naming the choices."""
    if exporter not in ONNX_EXPORTERS:
        raise BackendError(f"backend_options exporter={exporter!r} is not one of {ONNX_EXPORTERS} for backend={backend!r}.")
    return cast(Exporter, exporter)


def _torchscript_kwargs() -> dict:
    # Newer torch defaults to the dynamo exporter, so ask for the TorchScript one by name.
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        return {"dynamo": False}
    return {}


def _has_onnxscript() -> bool:
    return importlib.util.find_spec("onnxscript") is not None


def _export_torchscript(module: torch.nn.Module, example: torch.Tensor, raw: Path, input_name: str, opset: int) -> None:
    # (Graphs over 2 GB come out in side files without being asked: save_graph gathers them.)
    torch.onnx.export(
        module, (example,), str(raw),
        input_names=[input_name], output_names=["embeddings"],
        dynamic_axes={input_name: {0: "batch"}, "embeddings": {0: "batch"}},
        opset_version=opset, do_constant_folding=True, **_torchscript_kwargs(),
    )


def dynamo_exporter_problem() -> Optional[Exception]:
    """The error ``export_onnx(..., exporter="dynamo")`` raises before exporting where torch's dynamo
    exporter cannot run here (a torch before 2.6, no ``onnxscript``), else None."""
    if "optimize" not in inspect.signature(torch.onnx.export).parameters:
        # torch 2.5's dynamo exporter has no graph optimiser: its graphs keep each weight's transpose as a
        # node (a Gemm of Transpose(weight)), which the int8 and fp8 rewrites find no weight matmul in.
        return RuntimeError(f"torch {torch.__version__}'s torch.onnx.export takes no optimize: vlmrm_fast's use "
                            "of the dynamo exporter needs torch >= 2.6.")
    if not _has_onnxscript():
        return missing_extra("onnxscript", "export", "torch's dynamo ONNX exporter")
    return None


def _export_dynamo(module: torch.nn.Module, example: torch.Tensor, raw: Path, input_name: str, opset: int,
                   external_data: bool) -> None:
    problem = dynamo_exporter_problem()
    if problem is not None:
        raise problem
    from torch.export import Dim

    torch.onnx.export(  # type: ignore[call-arg, unused-ignore]  # torch < 2.5 has no dynamo exporter (refused above)
        module, (example,), str(raw),
        input_names=[input_name], output_names=["embeddings"],
        # The example's batch of 2 keeps it from specialising to 1. The upper bound is for torch 2.6, whose
        # torch.export fails on an unbounded axis and whose exporter then traces a fixed-batch graph instead.
        dynamic_shapes=({0: Dim("batch", min=1, max=1 << 20)},),
        # Its lowest opset is 18: lower ones go through a version converter that warns and may fail.
        opset_version=max(opset, _DYNAMO_MIN_OPSET), external_data=external_data, dynamo=True, verbose=False,
        optimize=True,  # its graph optimiser (constant folding), not on by default in every torch
    )
    _require_dynamic_batch(raw)  # (the TorchScript exporter's dynamic_axes have held on every torch tested)


def _write_raw_graph(module: torch.nn.Module, example: torch.Tensor, raw: Path, input_name: str, opset: int,
                     external_data: bool, exporter: str) -> Optional[BaseException]:
    """Write the graph to ``raw`` (and, for large graphs, side files beside it) with ``exporter``;
    returns the TorchScript exporter's error where "auto" fell back to the dynamo one, else None."""
    args = (module, example, raw, input_name, opset)
    if exporter == "dynamo":
        _export_dynamo(*args, external_data)
        return None
    try:
        _export_torchscript(*args)
        return None
    except Exception as exc:
        if exporter == "torchscript":
            raise
        torchscript_error = exc
    for leftover in raw.parent.iterdir():  # whatever the failed export wrote
        leftover.unlink()
    try:
        _export_dynamo(*args, external_data)
    except Exception as exc:
        raise RuntimeError(
            "ONNX export failed with both of torch's exporters. TorchScript: "
            f"{type(torchscript_error).__name__}: {torchscript_error}. Dynamo: {type(exc).__name__}: {exc}"
        ) from exc
    return torchscript_error


def _require_dynamic_batch(raw: Path) -> None:
    """Refuse a dynamo export whose input or output has a fixed batch size: a backend would build for it
    and fail on every other batch. (torch 2.6's dynamo exporter wrote one for a batch axis without an
    upper bound, silently falling back to tracing the example batch.)"""
    import onnx

    graph = onnx.load(str(raw), load_external_data=False).graph
    for value in (*graph.input, *graph.output):
        batch = value.type.tensor_type.shape.dim[0]
        if not batch.dim_param:
            raise RuntimeError(
                f"torch {torch.__version__}'s dynamo ONNX exporter wrote {value.name!r} with a fixed batch size "
                f"of {batch.dim_value or '?'} instead of a dynamic batch axis. Export with exporter='torchscript' "
                "(`vlmrm-fast export --exporter torchscript`, or backend_options={'exporter': 'torchscript'}) or "
                "with another torch version."
            )


def _frames_feed_only_their_cast(raw: Path) -> None:
    """Make the graph's uint8 input feed nothing but its Cast. The dynamo exporter also reads the batch
    size off it (``Shape(frames)``), and TensorRT wants every uint8 input to go straight into a cast
    layer (its ``DataType::kUINT8`` notes); the Cast's float output has the same shape. Rewritten in
    place, only where there is such a reader (the TorchScript exporter writes none)."""
    import onnx

    model = onnx.load(str(raw), load_external_data=False)
    graph = model.graph
    frames = graph.input[0].name
    readers = [node for node in graph.node if frames in node.input]
    casts = [node for node in readers if node.op_type == "Cast"]
    shapes = [node for node in readers if node.op_type == "Shape"]
    if len(casts) != 1 or not shapes:
        return
    for node in shapes:
        node.input[:] = [casts[0].output[0] if name == frames else name for name in node.input]
    # The Cast reads only the graph's input, so it may go first: nodes must stay topologically sorted.
    cast = onnx.NodeProto()
    cast.CopyFrom(casts[0])
    graph.node.remove(casts[0])
    graph.node.insert(0, cast)
    onnx.save(model, str(raw))  # side files stay where the graph's references name them


def export_onnx(
    visual: torch.nn.Module,
    path: Union[str, Path],
    spec: PreprocessSpec,
    *,
    input_format: InputFormat = "uint8-nhwc",
    external_data: Optional[bool] = None,
    opset: int = OPSET,
    check: Optional[Callable[[Path], None]] = None,
    exporter: Exporter = "auto",
) -> Path:
    """Write the vision tower to ``path`` as ONNX; returns the path.

    Args:
        visual: the open_clip vision tower (``model.visual``), in the precision to export (float32 or
            float16), on any device.
        spec: the tower's input size and normalisation (``CLIPReward.preprocess_spec``).
        input_format: "uint8-nhwc" (normalisation folded in) or "pixels" (normalised NCHW input).
        external_data: store weights in ``<path>.data``; default: only when over 2 GB.
        check: called with the finished graph's path before it replaces anything at ``path`` (see
            :func:`save_graph`); an exception there leaves ``path`` as it was.
        exporter: "auto" (TorchScript, else dynamo with a warning), "torchscript" or "dynamo" (see the
            module's docstring). The dynamo exporter writes at least opset 18, its lowest.
    """
    try:
        import onnx
    except ImportError:
        raise missing_extra("onnx", "export", "ONNX export") from None
    if input_format not in ONNX_INPUT_FORMATS:
        raise ValueError(f"input_format={input_format!r} is not one of {ONNX_INPUT_FORMATS}.")
    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"exporter={exporter!r} is not one of {ONNX_EXPORTERS}.")
    if is_fp8_quantised(visual):
        raise ValueError("this vision tower's matmuls were quantised to fp8 for the torch backends (backend_options "
                         "quantize='fp8'), which an ONNX graph cannot hold: export the model as loaded, before a "
                         "reward quantises it (or load it again).")
    given, path = Path(path), destination_of(path)  # a symbolic link at `path` stays: its target is written
    path.parent.mkdir(parents=True, exist_ok=True)
    param = next(visual.parameters())
    height, width = spec.size
    if input_format == "uint8-nhwc":
        module: torch.nn.Module = Uint8VisionTower(visual, spec).eval()
        example = torch.zeros((2, height, width, 3), dtype=torch.uint8, device=param.device)
        input_name = "frames"
    else:
        module = visual  # exported in eval mode (:func:`_eval_mode`), the caller's modes left as they were
        example = torch.zeros((2, 3, height, width), dtype=param.dtype, device=param.device)
        input_name = "pixels"
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    if external_data is None:
        external_data = weight_bytes > _PROTOBUF_LIMIT * 0.9
    with scratch_folder(path, "export") as tmp:
        raw = tmp / "export" / "tower.onnx"
        raw.parent.mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
            # The dynamo exporter's optimiser logs each pass at INFO: hundreds of lines where a user turned
            # INFO on to see vlmrm_fast's one-off builds announced.
            with torch.inference_mode(False), torch.no_grad(), _mha_fastpath_disabled(), \
                    loggers_quieted("onnxscript", "onnx_ir", "torch.onnx"), original_modules(visual), _eval_mode(module), \
                    static_self_attention(module, example[:1]):  # one frame: the token count is all it needs
                fell_back = _write_raw_graph(module, example, raw, input_name, opset, external_data, exporter)
        if fell_back is not None:
            warnings.warn(
                f"torch's TorchScript ONNX exporter failed ({type(fell_back).__name__}: {fell_back}); the tower was "
                "exported with its dynamo exporter instead, which vlmrm_fast's graph rewrites are tested on less. "
                "exporter='dynamo' chooses it without this warning (export_onnx, `vlmrm-fast export --exporter`, "
                "or backend_options of the onnxruntime and tensorrt backends).",
                UserWarning, stacklevel=stacklevel_outside_package(),
            )
        dynamo = exporter == "dynamo" or fell_back is not None
        _log.info("exported the vision tower with torch's %s ONNX exporter", "dynamo" if dynamo else "TorchScript")
        if dynamo and input_format == "uint8-nhwc":
            _frames_feed_only_their_cast(raw)
        if not external_data and [f.name for f in raw.parent.iterdir()] == [raw.name]:
            # One self-contained file: placed as written (loading and saving it again took 2.8 s of a
            # 7.4 s ViT-B-32 export here). The exporters split graphs over 2 GB into side files.
            _check_and_place(raw, path, False, check)
        else:
            save_graph(onnx.load(str(raw), load_external_data=True), path, external_data, check=check)
    return given


def save_graph(model, path: Union[str, Path], external_data: Optional[bool] = None,
               check: Optional[Callable[[Path], None]] = None) -> Path:
    """Write an ``onnx.ModelProto`` (weights loaded) to ``path`` and check it; weights go to
    ``<path>.data`` when ``external_data``, by default when they near protobuf's 2 GB limit.

    The files are written and checked (ONNX's checker, then ``check`` if given) in a temporary folder
    beside ``path``, then renamed into place (see :func:`_check_and_place`): a failed export leaves the
    previous one whole, an interrupted one the previous one or no graph at ``path``; never half a graph
    under the final name, nor a graph beside another export's weights.
    """
    import onnx

    given, path = Path(path), destination_of(path)  # a symbolic link at `path` stays: its target is written
    if external_data is None:
        external_data = sum(init.ByteSize() for init in model.graph.initializer) > _PROTOBUF_LIMIT * 0.9
    data_name = path.name + ".data"
    path.parent.mkdir(parents=True, exist_ok=True)
    with scratch_folder(path, "export") as tmp:  # the same name as export_onnx's: one kind to clean up
        staged = tmp / path.name
        if external_data:
            # Marked here rather than by save_model(save_as_external_data=True), which refuses a location
            # that exists relative to the current folder (the previous export's side file, often).
            for tensor in model.graph.initializer:
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                    onnx.external_data_helper.set_external_data(tensor, data_name)
        onnx.save_model(model, str(staged))  # the side file goes beside `staged`
        _check_and_place(staged, path, external_data, check)
    return given


def _check_and_place(staged: Path, path: Path, external_data: bool, check: Optional[Callable[[Path], None]]) -> None:
    """Check the graph ``staged`` (with its side file ``<path>.data`` beside it if ``external_data``),
    in a folder beside ``path`` on the same file system, then make it durable and rename it to ``path``,
    side file first; without a side file, a previous export's one is removed.

    Two files cannot be swapped at once. A previous graph at ``path`` may read ``<path>.data`` at the
    offsets of its own weights, which the new side file's may match with other values (a silently wrong
    tower), so it is removed before the side file is replaced: a crash between the renames leaves no
    graph, which fails loudly, rather than that pair."""
    import onnx

    onnx.checker.check_model(str(staged))
    if check is not None:
        check(staged)
    data_name = path.name + ".data"
    files = [(staged.parent / data_name, path.parent / data_name)] if external_data else []
    files.append((staged, path))
    mode = default_file_mode(staged.parent)
    for staged_file, _ in files:
        os.chmod(staged_file, mode)  # onnx writes the side file owner-only
        with open(staged_file, "rb") as f:
            os.fsync(f.fileno())
    if external_data and (path.parent / data_name).exists():
        path.unlink(missing_ok=True)
    for staged_file, final in files:
        os.replace(staged_file, final)
    if not external_data:
        (path.parent / data_name).unlink(missing_ok=True)  # a previous export's weights, now unused
    fsync_dir(path.parent)
