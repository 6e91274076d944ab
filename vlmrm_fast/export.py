"""``vlmrm-fast export``: the vision tower as an ONNX graph or a TensorRT engine, for deployment.

The exported tower takes raw frames, uint8 [N, S, S, 3] (NHWC, as a renderer produces them), with
the CLIP normalisation folded into the patch embedding; ``--input pixels`` exports the normalised
NCHW float input instead. The batch axis is dynamic; ONNX weights over 2 GB go to ``<out>.data``.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional, cast

from vlmrm_fast.argtypes import (ONNX_EXPORTERS, ONNX_INPUT_FORMATS, CLIError, dtype_choice, in_cli_terms, output_file,
                                positive_int, writable_file)
from vlmrm_fast.atomic import destination_of, write_atomically
from vlmrm_fast.scratch import scratch_folder

if TYPE_CHECKING:
    import torch

    from vlmrm_fast.backends.onnx_export import Exporter, InputFormat

# torch, open_clip and the exporters load inside the functions: the parser (``--help``) needs none of them.

FORMATS = ("onnx", "tensorrt")
DEFAULT_MAX_BATCH_SIZE = 256
"""``--max-batch-size`` of a TensorRT engine where none is given."""
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
"""The names TensorRT engines go by (``trtexec --saveEngine``'s, TensorRT's samples')."""


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``export``."""
    p = subparsers.add_parser(
        "export",
        help="export the vision tower to ONNX or a TensorRT engine",
        description=(__doc__ or "").split("\n\n", 1)[-1],  # no docstrings under python -OO
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="open_clip model name, e.g. ViT-B-32, ViT-bigG-14")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx, or a tensorrt engine (CUDA) (default: %(default)s)")
    p.add_argument(
        "--pretrained",
        default="none",
        help="open_clip tag or local checkpoint; 'none' exports random weights, which serve for speed "
        "tests only (default: %(default)s)",
    )
    p.add_argument("--out", default=None, help="output file, or a folder (one that exists, or DIR/) to write the default "
                   "name in (default: <model>-<weights>-<input>-<dtype>.onnx/.engine)")
    p.add_argument("--input", choices=ONNX_INPUT_FORMATS, default="uint8-nhwc", help="the graph's input (default: %(default)s)")
    p.add_argument("--dtype", type=dtype_choice(("fp32", "fp16", "bf16")), default=None,
                   help="precision: ONNX fp32 or fp16 (default fp32; fp16 computes in float16 with LayerNorm in "
                   "float32, output float32); TensorRT fp16, bf16 or fp32 (default bf16); float32/float16/bfloat16 too")
    p.add_argument("--max-batch-size", type=positive_int, default=None,
                   help=f"TensorRT: largest batch of the engine's profile (default: {DEFAULT_MAX_BATCH_SIZE}); an ONNX "
                   "graph's batch axis is dynamic, so --format onnx refuses it")
    p.add_argument("--opt-batch-size", type=positive_int, default=None,
                   help="TensorRT: the batch its kernels are tuned for, the one you will run most (default: half the max)")
    p.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                   help="ONNX: weights in a side file <out>.data (auto: when over 2 GB)")
    p.add_argument("--no-verify", action="store_true", help="ONNX: skip the check against torch in ONNX Runtime")
    p.add_argument("--exporter", choices=ONNX_EXPORTERS, default="auto",
                   help="torch's ONNX exporter: torchscript, dynamo (needs onnxscript), or auto: torchscript, and "
                   "dynamo where that fails (default: %(default)s)")
    p.set_defaults(handler=run_export)


def default_out(model: str, pretrained: Optional[str], input_format: str, fmt: str, dtype: str) -> Path:
    """``<model>-<weights>-<input>-<dtype>.onnx/.engine``; weights: the tag, a checkpoint file's stem, "hub"
    or "local" for a model that brings its own (``hf-hub:org/repo``, ``local-dir:PATH``, named after the
    repo or folder), "random" for none."""
    for scheme, weights in (("hf-hub:", "hub"), ("local-dir:", "local")):
        if model.startswith(scheme):
            where = model[len(scheme):].rstrip("/" + os.sep)
            name = Path(os.path.expanduser(where)).name or "model"
            break
    else:
        name = model.replace("/", "-")
        if pretrained is None:
            weights = "random"
        elif "/" in pretrained or os.sep in pretrained or Path(pretrained).is_file():
            weights = Path(pretrained).stem
        else:
            weights = pretrained
    suffix = ".onnx" if fmt == "onnx" else ".engine"
    return Path(f"{name}-{weights}-{input_format}-{dtype}{suffix}")


def run_export(args: argparse.Namespace) -> int:
    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.models import create_clip, preprocess_spec_of

    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    dtype = args.dtype or ("fp32" if args.format == "onnx" else "bf16")
    out = output_file(args.out, default_out(args.model, pretrained, args.input, args.format, dtype))
    _check_format_options(args, out)
    batch_range = _check_before_loading(args, dtype)  # a refusal costs no download or load of the weights
    out = writable_file(out, "--out")
    _check_not_replacing_other_files(out, pretrained)
    try:
        model, _ = create_clip(args.model, pretrained)
    except ValueError as error:  # written for Python callers: in this command's terms
        raise CLIError(in_cli_terms(str(error), model_flag="MODEL")) from None
    spec = preprocess_spec_of(model, "vlmrm")
    visual = cast("torch.nn.Module", model.visual)  # an open_clip model's vision tower
    start = time.perf_counter()
    if args.format == "onnx":
        visual = visual.float()
        external = {"auto": None, "yes": True, "no": False}[args.external_data]
        errors = []

        def check(staged: Path) -> None:  # before the graph replaces anything at `out`
            errors.append(verify_onnx(staged, visual, spec, args.input))
            if not errors[-1] <= VERIFY_TOLERANCE:  # NaN fails too
                raise ValueError(
                    f"the exported graph does not match the torch tower in ONNX Runtime (max relative error "
                    f"{errors[-1]:.2e}, over {VERIFY_TOLERANCE:g}); nothing was written. Please report it with the "
                    "model name; --no-verify writes it anyway."
                )

        verify = not args.no_verify and dtype == "fp32" and _has_onnxruntime()
        if dtype == "fp16":
            path = export_float16_onnx(visual, out, spec, args.input, external, args.exporter)
        else:
            path = export_onnx(visual, out, spec, input_format=args.input, external_data=external,
                               check=check if verify else None, exporter=args.exporter)
        message = f"wrote {_written(path)} in {time.perf_counter() - start:.1f} s"
        if errors:
            message += f"; ONNX Runtime vs torch: max relative error {errors[-1]:.2e}"
        elif dtype != "fp32" and not args.no_verify:
            message += "; not checked against torch (the ONNX Runtime check is for --dtype fp32 exports)"
    else:
        batch_range = cast(tuple, batch_range)  # None for --format onnx only
        path = export_engine(visual, spec, out, dtype, args.input, batch_range, args.exporter)
        message = f"wrote {_written(path)} in {time.perf_counter() - start:.1f} s"
    height, width = spec.size
    pixels = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]  # half graphs take half pixels
    given = (f"'frames' uint8 [N, {height}, {width}, 3] (RGB, 0-255, normalisation folded in)" if args.input == "uint8-nhwc"
             else f"'pixels' {pixels} [N, 3, {height}, {width}] (normalised)")
    print(f"{message}. Input: {given}; output: 'embeddings' float32 [N, {embedding_width(visual, spec)}], not "
          "normalised (the README's export section says how to score them).")
    return 0


def embedding_width(visual: torch.nn.Module, spec) -> int:
    """D, the width of the tower's embeddings: its ``output_dim`` (open_clip's ViTs and ResNets), else the width of
    its output for one blank image (timm towers)."""
    import torch

    width = getattr(visual, "output_dim", None)
    if isinstance(width, int):
        return width
    param = next(visual.parameters())
    with torch.inference_mode():
        from vlmrm_fast.backends.base import pooled_embeddings

        return int(pooled_embeddings(visual(torch.zeros((1, 3, *spec.size), dtype=param.dtype, device=param.device))).shape[-1])


EXPORT_SUFFIXES = (".onnx", *ENGINE_SUFFIXES)
"""What an existing file at ``--out`` may be named for an export to replace it: an earlier export."""


def _check_not_replacing_other_files(out: Path, pretrained: Optional[str]) -> None:
    """Refuse an ``--out`` that is the checkpoint being exported, or an existing file that is no earlier export
    (a checkpoint, a CSV, anything else a typo points at): the export would replace it, and it is lost."""
    if pretrained is not None and Path(pretrained).expanduser().is_file() and \
            Path(pretrained).expanduser().resolve() == out.resolve():
        raise ValueError(f"--out '{out}' is the checkpoint this export reads (--pretrained); writing the graph there "
                         "would replace it: pass another --out")
    target = destination_of(out)  # written through a symbolic link: what it leads to is what would be replaced
    if target.exists() and target.suffix.lower() not in EXPORT_SUFFIXES:
        leads = f" (a symbolic link to '{target}')" if target != out else ""
        raise ValueError(f"--out '{out}'{leads} exists and is not an earlier export ({', '.join(EXPORT_SUFFIXES)}); "
                         "writing the graph there would replace it: pass another --out, or remove the file first")


def _check_format_options(args: argparse.Namespace, out: Path) -> None:
    """Refuse an ``--out`` named for the other format (an ONNX graph in ``x.engine``, an engine in ``x.onnx``: what
    reads the file by its name would fail on it), TensorRT's batch options with ``--format onnx``, which has
    none to set (its batch axis is dynamic), and the ONNX graph's options with ``--format tensorrt``: either would
    ignore them without a word."""
    suffix = out.suffix.lower()
    if args.format == "onnx" and suffix in ENGINE_SUFFIXES:
        raise ValueError(f"--out '{out}' names a TensorRT engine ({suffix}), but --format onnx (the default) writes an "
                         f"ONNX graph: pass --out {out.with_suffix('.onnx')}, or --format tensorrt for an engine")
    if args.format == "tensorrt" and suffix == ".onnx":
        raise ValueError(f"--out '{out}' names an ONNX graph (.onnx), but --format tensorrt writes a TensorRT engine: "
                         f"pass --out {out.with_suffix('.engine')}, or --format onnx for the graph")
    if args.format == "onnx":
        given = [flag for flag, value in (("--max-batch-size", args.max_batch_size),
                                          ("--opt-batch-size", args.opt_batch_size)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} a TensorRT engine's batch "
                             "profile; an ONNX graph takes any batch size (its batch axis is dynamic): leave "
                             f"{'it' if len(given) == 1 else 'them'} out, or pass --format tensorrt")
    else:
        given = [flag for flag, value in ((f"--external-data {args.external_data}", args.external_data != "auto"),
                                          ("--no-verify", args.no_verify)) if value]
        if given:
            raise ValueError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for ONNX graphs (their "
                             "weights file, their check in ONNX Runtime); a TensorRT engine is one file, not checked "
                             f"so: leave {'it' if len(given) == 1 else 'them'} out, or pass --format onnx")


def _check_before_loading(args: argparse.Namespace, dtype: str) -> Optional[tuple]:
    """Refuse what the export cannot do before the weights are loaded (gigabytes for ViT-bigG-14, and
    a download for a pretrained tag): a missing package, no CUDA, a precision the GPU lacks, a batch
    profile out of order. Returns TensorRT's (min, opt, max) batch profile, else None."""
    import importlib.util

    import torch

    from vlmrm_fast.backends.base import missing_extra

    if importlib.util.find_spec("onnx") is None:  # both formats go through an ONNX graph
        raise missing_extra("onnx", "export", f"--format {args.format}")
    if args.format == "onnx":
        if dtype == "bf16":
            raise ValueError("ONNX export supports fp32 or fp16 (ONNX Runtime has few bf16 kernels); use --dtype fp16.")
        return None
    from vlmrm_fast.backends.tensorrt import check_precision_support, import_tensorrt, profile_batch_range

    max_batch_size = DEFAULT_MAX_BATCH_SIZE if args.max_batch_size is None else args.max_batch_size
    if args.opt_batch_size is not None and args.opt_batch_size > max_batch_size:
        raise ValueError(f"--opt-batch-size {args.opt_batch_size} is over --max-batch-size {max_batch_size}: "
                         "the engine is tuned for a batch within its profile; raise --max-batch-size or lower it.")
    if not torch.cuda.is_available():
        raise ValueError("--format tensorrt needs a CUDA device; export --format onnx here and build the engine on the GPU machine.")
    import_tensorrt("--format tensorrt")
    if dtype == "bf16":
        check_precision_support(torch.bfloat16, torch.device("cuda"), "use --dtype fp16")
    return profile_batch_range(max_batch_size, args.opt_batch_size)


VERIFY_TOLERANCE = 1e-4
"""Largest max-relative error of a float32 export against the torch tower (measured: ~1e-6)."""


def _has_onnxruntime() -> bool:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        warnings.warn("onnxruntime is not installed: the export was not checked (pip install 'vlmrm-fast[export]').")
        return False
    return True


def verify_onnx(path: Path, visual: torch.nn.Module, spec, input_format: str) -> float:
    """Max relative error of ONNX Runtime against the torch tower on three random frames (batch 3:
    the batch axis is dynamic)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from vlmrm_fast.backends.base import pooled_embeddings
    from vlmrm_fast.ops.preprocess import preprocess

    frames = torch.randint(0, 256, (3,) + tuple(spec.size) + (3,), dtype=torch.uint8)
    pixels = preprocess(frames, spec, torch.float32, impl="torch")
    with torch.inference_mode():
        want = pooled_embeddings(visual.float()(pixels)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = frames.numpy() if input_format == "uint8-nhwc" else pixels.numpy()
    got = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    return float(np.abs(got - want).max() / np.abs(want).max())


def export_float16_onnx(visual, out: Path, spec, input_format: InputFormat, external_data: Optional[bool],
                        exporter: Exporter = "auto") -> Path:
    """The tower as an ONNX graph computing in float16 with LayerNorm in float32, where fp16 CLIP
    towers lose accuracy (:func:`~vlmrm_fast.backends.onnx_half.to_half_precision`, the graph TensorRT's
    fp16 engines are built from): exported in float32 beside ``out``, then rewritten into place. Input
    uint8 frames or float16 pixels; output float32 embeddings."""
    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.backends.onnx_half import to_half_precision

    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch_folder(out, "export") as tmp:
        graph = export_onnx(visual.float(), tmp / "tower.onnx", spec, input_format=input_format, exporter=exporter)
        return to_half_precision(graph, out, "fp16", external_data=external_data)


def export_engine(visual, spec, out: Path, dtype: str, input_format: InputFormat, batch_range: tuple,
                  exporter: Exporter = "auto") -> Path:
    """Build a TensorRT engine file for the (min, opt, max) ``batch_range`` (needs CUDA and tensorrt,
    checked by :func:`_check_before_loading`)."""
    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.backends.tensorrt import build_engine, keep_only_graph, typed_tower_graph

    out.parent.mkdir(parents=True, exist_ok=True)
    # The graph beside the engine rather than in the system's temporary folder (often a small tmpfs):
    # gigabytes for ViT-bigG-14.
    with scratch_folder(out, "export") as tmp:
        graph = export_onnx(visual.float(), tmp / "tower.onnx", spec, input_format=input_format, exporter=exporter)
        onnx_path = typed_tower_graph(graph, dtype)
        keep_only_graph(onnx_path)
        engine = build_engine(onnx_path, dtype, batch_range)
    return write_atomically(out, engine)  # never a half-written engine under the real name


def _written(path: Path) -> str:
    """"PATH (SIZE)" for the summary, naming where a symbolic link at ``path`` leads (the file written)."""
    target = destination_of(path)
    if target == path:
        return f"{path} ({_size(path)})"
    where = f"{path}, a symbolic link to {target} ({_size(target)})"
    if target.with_name(target.name + ".data").exists() and Path(os.path.realpath(path.parent)) != target.parent:
        # ONNX Runtime looks for the side file beside the path it opens, and refuses it outside the link's folder
        where += f"; open it as {target}: its weights file is beside it, not beside the link"
    return where


def _size(path: Path) -> str:
    data = path.with_name(path.name + ".data")
    total = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return f"{total / 1e6:.1f} MB"
