"""``vlmrm-fast bench``'s options: the parser and the names it offers.

Free of heavy imports, so that ``vlmrm-fast --help`` does not wait for torch; the measurement
itself is in run.py, loaded when the command runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vlmrm_fast.argtypes import BACKEND_NAMES, COMPILE_MODES, dtype_choice, positive_int

FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZED_PRECISIONS = ("int8", "fp8")
"""int8: ONNX Runtime's dynamic quantisation (CPU); fp8: the torch, compile and tensorrt backends' (Hopper)."""
PRECISIONS = (*FLOAT_PRECISIONS, *QUANTIZED_PRECISIONS)
KERNEL_OPTIONS = ("auto", "triton", "torch")
"""The reward's ``kernels`` (``vlmrm_fast.ops._triton.KERNEL_CHOICES``, not imported: it loads torch)."""
SEED_FRAME_SIZE = 480
"""The original code rendered 480 x 480 frames (SPEC §1.3): the seed pipeline always gets those, and
they are the default ``--frame-size``."""


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench``: the FPS profiler."""
    p = subparsers.add_parser(
        "bench",
        help="frames/s per stage (host to device, preprocess, tower, score, end to end) against the seed pipeline",
        description="Profile the reward pipeline: frames/s per stage over models x batch sizes x backends x "
        "precisions, the original VLM-RM pipeline measured in the same run as the reference, and the "
        "tower's achieved TFLOP/s against the device's matmul peak measured in the same run. Writes "
        "bench.json, bench.md and bench.png. Weights are random (speed does not depend on them), so it "
        "runs offline.",
        epilog="examples:\n  vlmrm-fast bench --quick\n  vlmrm-fast bench --frame-size 224\n"
        "  vlmrm-fast bench --models ViT-bigG-14 --batch-sizes 256 1024 --backends torch compile tensorrt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="open_clip model names (default: CPU vlmrm-tiny ViT-B-32; CUDA ViT-B-32 ViT-L-14 ViT-bigG-14)")
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, metavar="N",
                   help="frames per call (default: CPU 1 8 32; CUDA 1 8 64 256 1024)")
    p.add_argument("--backends", nargs="+", choices=BACKEND_NAMES,
                   help="vision-tower backends; unavailable ones are skipped with the reason "
                   "(default: CPU torch onnxruntime; CUDA torch compile)")
    p.add_argument("--dtypes", nargs="+", type=dtype_choice(PRECISIONS), metavar="DTYPE",
                   help=f"tower precisions, from {', '.join(PRECISIONS)} (float32/bfloat16/float16 too); int8 is ONNX Runtime's dynamic "
                   "quantisation, on CPU; fp8 is the torch, compile and tensorrt backends', on Hopper GPUs (default: CPU fp32; CUDA bf16)")
    p.add_argument("--kernels", nargs="+", choices=KERNEL_OPTIONS, metavar="KERNELS",
                   help="the package's own kernels: triton (the fused preprocess and score kernels, and the torch "
                   "backend's tower kernels: LayerNorms, QuickGELUs, fp8 quantisation), torch (torch's ops), or auto (triton on CUDA, torch elsewhere); "
                   "--kernels triton torch measures both in one run, an A/B of the kernels (default: auto)")
    p.add_argument("--frame-size", type=positive_int, default=SEED_FRAME_SIZE, metavar="PX",
                   help="square frames of PX x PX; 480 is the original's render size, 224 the towers' input "
                   "(the fast path: no resize). The seed always gets 480 x 480 (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available, else cpu)")
    p.add_argument("--repeats", type=positive_int, metavar="N",
                   help="timed calls per stage; the median is reported (default: CPU 3, CUDA 20)")
    p.add_argument("--warmup", type=positive_int, metavar="N", help="untimed calls first, at least 1 (the first call builds and compiles; default: CPU 1, CUDA 3)")
    p.add_argument("--time-budget", type=float, default=10.0, metavar="S",
                   help="stop repeating a stage after S seconds of timed calls, once 3 are done (default: %(default)s)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, metavar="MODE",
                   help=f"torch.compile's mode for the compile backend, from {', '.join(COMPILE_MODES)} (default: "
                   "reduce-overhead on CUDA, default on CPU); max-autotune also tries Triton matmuls with the GELU, "
                   "bias and residual adds fused in, and autotunes for minutes")
    p.add_argument("--no-seed", action="store_true", help="skip the seed pipeline (no speedups)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: runs/bench-<UTC timestamp>-<pid>/)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: vlmrm-tiny, batch sizes 1 and 8, torch and onnxruntime, 3 repeats "
                   "(options given explicitly still apply)")
    p.add_argument("--kernel-profile", action="store_true",
                   help="also profile each configuration's tower at the largest batch size with torch.profiler: "
                   "time per kind of kernel (matmul, attention, layer norm, ...), the costliest kernels, idle time, "
                   "against the FLOP ceiling (a section of bench.md; every kernel in bench.json)")
    p.add_argument("--no-plot", action="store_true", help="do not write bench.png (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on a terminal)")
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from vlmrm_fast.profiler.run import run_bench

    return run_bench(args)
