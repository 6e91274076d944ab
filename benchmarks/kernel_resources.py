"""Compile the fused Triton kernels for a GPU architecture on any machine, and report their resources.

Triton compiles ahead of time with the ptxas its wheel ships; cuobjdump (shipped too) reads each
cubin's registers per thread, local memory and stack (spills) and shared memory. No GPU is needed. On
a CPU-only machine this checks what Triton's interpreter lets through (the compiler's type rules and
its lowering to each architecture) and shows register pressure before a GPU is at hand.

The kernels are compiled exactly as the ops launch them: each variant runs the real launcher
(``preprocess_triton`` / ``score_triton``) on CPU tensors with the kernel replaced by a recorder, and
the recorded arguments give the signature and the compile-time constants. Argument types come from
Triton's own launch-time rule (``triton.runtime.jit.mangle_type``), so an integer equal to 1 becomes a
compile-time constant as it does on a GPU (code that only works on a runtime integer fails here). The
divisibility hints Triton adds at launch (a 16-byte aligned pointer, an integer divisible by 16) are
added too, as they decide how wide loads and stores are vectorised; the table shows those widths.

    python benchmarks/kernel_resources.py                 # sm_80 and sm_90, a table
    python benchmarks/kernel_resources.py --archs 90 --json resources.json

Needs Triton >= 3.3 (its ahead-of-time API) and must run without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

_TYPES = {torch.uint8: "u8", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv"}
FP8_MIN_ARCH = 89
"""E4M3 conversions compile from Ada / Hopper on (the fp8 matmuls run on Hopper only)."""


@dataclass
class Resources:
    kernel: str
    variant: str
    default_launch: bool  # False: a tuning candidate (another tile), not what the op launches today
    arch: int
    registers: int
    local_bytes: int
    stack_bytes: int
    shared_bytes: int
    global_memory: str  # the global loads and stores in the PTX by width, e.g. "ld.b8 x6, st.v4.b32 x3"
    compile_s: float
    divisions: str = ""  # the float divisions in the PTX by rounding, e.g. "div.full.f32 x2, div.rn.f32 x1"
    fp8_conversions: str = ""  # the float32 -> E4M3 conversions in the PTX, e.g. "cvt.rn.satfinite.e4m3x2.f32 x4"


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call and runs nothing."""

    def __init__(self) -> None:
        self.calls: List[Tuple[tuple, dict]] = []

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@contextlib.contextmanager
def _recording(module: Any, name: str) -> Iterator[_Recorder]:
    recorder, kernel = _Recorder(), getattr(module, name)
    setattr(module, name, recorder)
    try:
        yield recorder
    finally:
        setattr(module, name, kernel)


def _variants() -> List[Tuple[str, Any, Callable[[], None], bool]]:
    """(name, JITFunction, its launch on CPU tensors, whether the ops launch it so) for each variant (the
    fp8 ones are compiled for :data:`FP8_MIN_ARCH` and up only)."""
    # The modules, not the functions of the same names that vlmrm_fast.ops exports.
    pre = importlib.import_module("vlmrm_fast.ops.preprocess")
    sc = importlib.import_module("vlmrm_fast.ops.score")

    spec = pre.PreprocessSpec(size=(224, 224), mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), mode="vlmrm")
    crop = pre.PreprocessSpec(size=(224, 224), mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), mode="openclip")
    u8 = lambda side: torch.zeros((2, side, side, 3), dtype=torch.uint8)  # noqa: E731

    def targets(t: int, d: int) -> Any:
        return sc.ScoringTargets(torch.randn(t, d), torch.randn(t, d), torch.rand(t))

    ln = importlib.import_module("vlmrm_fast.ops.layer_norm")
    kernel_pre, kernel_score, kernel_ln = pre._preprocess_kernel, sc._score_kernel, ln._layer_norm_kernel

    def norm(width: int, dtype: torch.dtype, **launch: int) -> Callable[[], None]:
        return lambda: ln.layer_norm_triton(torch.zeros((8, width), dtype=dtype), torch.ones(width, dtype=dtype),
                                            torch.zeros(width, dtype=dtype), 1e-5, **launch)
    qr = importlib.import_module("vlmrm_fast.ops.quantize_rows")
    quant = lambda width, dtype, act=None: lambda: qr.quantize_rows_triton(torch.zeros((8, width), dtype=dtype), activation=act)  # noqa: E731
    lnq = importlib.import_module("vlmrm_fast.ops.layer_norm_quantize")

    def norm_quant(width: int, add: bool) -> Callable[[], None]:
        x = torch.zeros((8, width), dtype=torch.bfloat16)
        return lambda: lnq.layer_norm_quantize_triton(x, torch.ones(width), torch.zeros(width), 1e-5,
                                                      add=torch.zeros_like(x) if add else None)
    qg = importlib.import_module("vlmrm_fast.ops.quick_gelu")
    quick = lambda dtype: lambda: qg.quick_gelu_triton(torch.zeros((8, 3072), dtype=dtype))  # noqa: E731
    ident = importlib.import_module("identity_variants")  # beside this script: candidates, not the op's path
    bf16_224 = lambda variant: lambda: ident.preprocess_identity(u8(224), spec, torch.bfloat16, variant, bottom_up=True)  # noqa: E731
    return [
        ("480 squash resize -> bf16", kernel_pre, lambda: pre.preprocess_triton(u8(480), spec, torch.bfloat16), True),
        ("480 squash resize, 16 x 64 tile -> bf16", kernel_pre,  # the default before the H200's tile sweep
         lambda: pre.preprocess_triton(u8(480), spec, torch.bfloat16, tile=(16, 64, 4)), False),
        ("224 identity, bottom-up -> bf16", kernel_pre,
         lambda: pre.preprocess_triton(u8(224), spec, torch.bfloat16, bottom_up=True), True),
        ("480 float, crop + antialias -> fp16", kernel_pre,
         lambda: pre.preprocess_triton(torch.zeros((2, 480, 480, 3)), crop, torch.float16), True),
        ("480 planar (NCHW storage) resize -> bf16", kernel_pre,  # stride_w == 1, stride_c == H * W
         lambda: pre.preprocess_triton(torch.zeros((2, 3, 480, 480), dtype=torch.uint8).permute(0, 2, 3, 1), spec,
                                       torch.bfloat16), True),
        ("400x600 squash resize -> fp32", kernel_pre,
         lambda: pre.preprocess_triton(torch.zeros((2, 400, 600, 3), dtype=torch.uint8), spec, torch.float32), True),
        ("224 identity flat 1024 px, 4 warps", ident._identity_flat_kernel, bf16_224(("flat", 1024, 4)), False),
        ("224 identity words 1024 px, 4 warps", ident._identity_words_kernel, bf16_224(("words", 1024, 4)), False),
        ("bf16 D=1280 T=1", kernel_score, lambda: sc.score_triton(torch.zeros((4, 1280), dtype=torch.bfloat16), targets(1, 1280)), True),
        ("fp16 D=768 T=3", kernel_score, lambda: sc.score_triton(torch.zeros((4, 768), dtype=torch.float16), targets(3, 768)), True),
        ("fp32 D=512 T=8", kernel_score, lambda: sc.score_triton(torch.zeros((4, 512)), targets(8, 512)), True),
        ("bf16 D=768 (ViT-B-32)", kernel_ln, norm(768, torch.bfloat16), True),
        ("bf16 D=1664 (ViT-bigG-14)", kernel_ln, norm(1664, torch.bfloat16), True),
        ("fp16 D=1024 (ViT-L-14)", kernel_ln, norm(1024, torch.float16), True),
        ("bf16 D=768, 8 rows, 8 warps", kernel_ln, norm(768, torch.bfloat16, rows_per_program=8, num_warps=8), False),
        ("bf16 K=768 (ViT-B-32's attention, c_fc)", qr._quantize_rows_kernel, quant(768, torch.bfloat16), True),
        ("bf16 K=8192 (ViT-bigG-14's c_proj, unfused)", qr._quantize_rows_kernel, quant(8192, torch.bfloat16), True),
        ("bf16 K=8192, GELU first (ViT-bigG-14's c_proj)", qr._quantize_rows_kernel, quant(8192, torch.bfloat16, "gelu"), True),
        ("bf16 K=3072, GELU first (ViT-B-32's c_proj)", qr._quantize_rows_kernel, quant(3072, torch.bfloat16, "gelu"), True),
        ("bf16 K=4096, QuickGELU first (ViT-L-14's c_proj, OpenAI's)", qr._quantize_rows_kernel,
         quant(4096, torch.bfloat16, "quick_gelu"), True),
        ("fp32 K=1664 (ViT-bigG-14's width)", qr._quantize_rows_kernel, quant(1664, torch.float32), True),
        ("bf16", qg._quick_gelu_kernel, quick(torch.bfloat16), True),
        ("fp16", qg._quick_gelu_kernel, quick(torch.float16), True),
        ("fp32", qg._quick_gelu_kernel, quick(torch.float32), True),
        ("bf16 D=768 (ViT-B-32's ln_1)", lnq._layer_norm_quantize_kernel, norm_quant(768, False), True),
        ("bf16 D=768, add first (ViT-B-32's ln_2)", lnq._layer_norm_quantize_kernel, norm_quant(768, True), True),
        ("bf16 D=1664, add first (ViT-bigG-14's ln_2)", lnq._layer_norm_quantize_kernel, norm_quant(1664, True), True),
    ]


def _launch_type(value: Any) -> str:
    """The type Triton's launcher gives a scalar argument: ``mangle_type(value, True)``, whose
    specialisation makes an integer equal to 1 a constant. Triton 3.3 to 3.5's ``mangle_type`` raises a
    TypeError when asked to specialise (its stand-in hook is called with one argument more than it
    takes); there the same rule is applied to the unspecialised type."""
    from triton.runtime.jit import mangle_type

    try:
        return mangle_type(value, True)
    except TypeError:
        if isinstance(value, int) and not isinstance(value, bool) and value == 1:
            return "constexpr"
        return mangle_type(value)


def _signature(kernel: Any, args: tuple, kwargs: dict) -> Tuple[Dict[str, str], Dict[str, Any], Dict[str, Any], Dict[Any, Any]]:
    """(signature, compile-time constants, compile options such as num_warps, attributes) of a recorded launch.

    The attributes are the divisibility hints Triton's launcher adds on a GPU: a pointer aligned to 16
    bytes, or an integer divisible by 16, is marked so (``tt.divisibility``), which is what lets the
    compiler vectorise loads and stores. Pointers get the mark when their tensor is 16-byte aligned here
    (fresh allocations are, on a GPU and on the CPU alike)."""
    names = [p.name for p in kernel.params]
    values = dict(zip(names, args), **kwargs)
    options = {key: value for key, value in kwargs.items() if key not in names}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif param.is_constexpr or _launch_type(value) == "constexpr":  # the latter: an int equal to 1
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        else:
            signature[param.name] = _launch_type(value)
            aligned = isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0
        if aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, options, attrs


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    fields = dict(item.split(":", 1) for item in line.split())
    return {key: int(fields[key]) for key in ("REG", "STACK", "SHARED", "LOCAL")}


def _tally(instructions: List[str]) -> str:
    """Instructions counted by name, sorted: "ld.b8 x6, st.v4.b32 x3"."""
    return ", ".join(f"{name} x{n}" for name, n in sorted(collections.Counter(instructions).items()))


def _global_memory(ptx: str) -> str:
    """The kernel's global load and store instructions by width ("ld.b8 x6, st.v4.b32 x3"): how wide
    its accesses are vectorised, counted in the code (a loop body once), not per thread at run time."""
    return _tally([op + width for op, width in
                   re.findall(r"\b(ld|st)\.global(?:\.[\w:]+)*?((?:\.v[248])?\.[bfsu]\d+)\b", ptx)])


def _divisions(ptx: str) -> str:
    """The kernel's float divisions by kind ("div.full.f32 x2, div.rn.f32 x1"): ``/`` on float32 compiles to
    div.full.f32 (up to 2 ulp off) or div.approx, only ``tl.div_rn`` to the IEEE-rounded div.rn."""
    return _tally(re.findall(r"\bdiv\.(?:full|approx|rn|rz|rm|rp)(?:\.ftz)?\.f(?:32|64)\b", ptx))


def _fp8_conversions(ptx: str) -> str:
    """The kernel's conversions to E4M3 by rounding and saturation ("cvt.rn.satfinite.e4m3x2.f32 x4")."""
    return _tally(re.findall(r"\bcvt(?:\.\w+)*?\.e4m3x2\.f(?:32|16)\b", ptx))


def compile_all(archs: List[int]) -> List[Resources]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        raise SystemExit(f"Triton {triton.__version__} predates the ahead-of-time API used here (3.3+)")
    rows = []
    for variant, kernel, launch, default_launch in _variants():
        module = sys.modules[kernel.fn.__module__]
        with _recording(module, kernel.fn.__name__) as recorder:
            launch()
        ((args, kwargs),) = recorder.calls
        signature, constexprs, options, attrs = _signature(kernel, args, kwargs)
        fp8 = any(value is torch.float8_e4m3fn or getattr(value, "dtype", None) == torch.float8_e4m3fn
                  for value in (*args, *kwargs.values()))
        for arch in archs:
            if fp8 and arch < FP8_MIN_ARCH:
                continue
            start = time.perf_counter()
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
            seconds = time.perf_counter() - start
            usage = _resource_usage(compiled.asm["cubin"])
            rows.append(Resources(kernel.fn.__name__, variant, default_launch, arch, usage["REG"], usage["LOCAL"], usage["STACK"],
                                  max(usage["SHARED"], int(compiled.metadata.shared)),
                                  _global_memory(compiled.asm["ptx"]), round(seconds, 2),
                                  _divisions(compiled.asm["ptx"]), _fp8_conversions(compiled.asm["ptx"])))
    return rows


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", type=int, default=[80, 90], help="compute capabilities x 10 (default: 80 90)")
    parser.add_argument("--json", type=Path, help="write the rows, with the Triton and torch versions, here")
    args = parser.parse_args(argv)
    import triton

    rows = compile_all(args.archs)
    print(f"Triton {triton.__version__}, torch {torch.__version__}: registers per thread, spills, shared memory, "
          "global loads and stores by width")
    print(f"{'kernel':<22} {'variant':<42} {'sm':>3} {'regs':>5} {'local B':>8} {'stack B':>8} {'shared B':>9} {'compile s':>9}  "
          "global ld/st")
    for r in rows:
        print(f"{r.kernel:<22} {r.variant + ('' if r.default_launch else ' *'):<42} {r.arch:>3} {r.registers:>5} {r.local_bytes:>8} {r.stack_bytes:>8} "
              f"{r.shared_bytes:>9} {r.compile_s:>9.2f}  {r.global_memory}")
    print("* a tuning candidate, not the tile the op launches; compile s is 0 where Triton's cache held the kernel")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"triton": triton.__version__, "torch": torch.__version__,
                                         "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
