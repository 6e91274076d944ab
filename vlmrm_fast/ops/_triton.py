"""Where the fused Triton kernels can run, and which implementation an op uses.

Triton compiles for CUDA (and ROCm) devices. On CPU it runs only through its interpreter
(``TRITON_INTERPRET=1``, set before the kernels are defined), which is exact but slow and meant
for tests. Everywhere else the ops fall back to their plain torch path, which has the same
semantics.

Modules that define kernels do without ``from __future__ import annotations``: Triton 3.0's
interpreter recognises a ``tl.constexpr`` parameter by its annotation object, not by a string.
"""
import contextlib
import contextvars
import functools
import os
from typing import ContextManager, Iterator, Literal, Optional

import torch

from vlmrm_fast.llvm_clash import guard_triton_load, triton_kept_out

guard_triton_load()  # where loading it now may crash the process: kept out if not needed, else the cause named first

try:  # Triton ships for Linux only; without it every op uses its torch path.
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on platforms without Triton wheels
    HAS_TRITON = False

Kernels = Literal["auto", "triton", "torch"]
KERNEL_CHOICES = ("auto", "triton", "torch")


# Triton decides at kernel definition (this package's import) whether kernels are interpreted;
# setting the variable later changes nothing, so the decision is read once, here.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_enabled() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter)."""
    return _INTERPRETED


if HAS_TRITON:
    import triton.language as tl

    @triton.jit
    def _probe_kernel(out_ptr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, offsets + 1)

    @triton.jit
    def to_output(value, out_ty: tl.constexpr, ROUND_BF16: tl.constexpr):
        """float32 ``value`` cast to ``out_ty`` for a store. Triton's CPU interpreter truncates float32 ->
        bfloat16 casts where GPUs round to nearest even; kernels pass ``ROUND_BF16`` (see
        :func:`rounds_bf16_by_hand`) and the rounding is then done on the bits, so CPU tests see GPU numerics."""
        if ROUND_BF16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            value = bits.to(tl.float32, bitcast=True)
        return value.to(out_ty)

    @triton.jit
    def load_row_tile(x_ptr, stride_row, n_rows, WIDTH: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                      BLOCK_WIDTH: tl.constexpr):
        """This program's BLOCK_ROWS whole rows of ``x`` [n_rows, WIDTH] (rows ``stride_row`` apart, each
        contiguous), shared by the kernels that take rows: (the rows as float32 [BLOCK_ROWS, BLOCK_WIDTH],
        0 outside them; their indices, int64; the column indices; which rows exist; which values exist)."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_WIDTH)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < WIDTH)[None, :]
        rows = rows.to(tl.int64)  # rows x width passes 2**31 elements at ViT-bigG-14's larger batches
        x = tl.load(x_ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        return x, rows, cols, row_ok, mask


def rounds_bf16_by_hand(out_dtype: torch.dtype) -> bool:
    """The ``ROUND_BF16`` argument of :func:`to_output` for stores of ``out_dtype``: bfloat16 output
    from interpreted kernels."""
    return out_dtype == torch.bfloat16 and interpreter_enabled()


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> Optional[str]:
    """Why Triton's CPU interpreter cannot be trusted in this environment, or None if it can (or if
    the kernels are compiled, not interpreted).

    Runs a four-element store once per process. Triton 3.0's interpreter under NumPy 2 runs kernels
    without an error but loses their stores (seen here with NumPy 2.0-2.4), which would leave an
    op's output uninitialised.
    """
    import numpy

    if not interpreter_enabled():
        return None  # compiled kernels: nothing to probe here
    out = torch.zeros(4, dtype=torch.int32)
    try:
        _probe_kernel[(1,)](out, BLOCK=4)
    except Exception as error:  # noqa: BLE001 - any failure means the interpreter is unusable
        return f"a probe kernel failed in Triton {triton.__version__}'s CPU interpreter ({error!r})"
    if out.tolist() != [1, 2, 3, 4]:
        return (f"Triton {triton.__version__}'s CPU interpreter loses kernel stores under NumPy "
                f"{numpy.__version__} (Triton 3.0 predates NumPy 2)")
    return None


def require_working_interpreter() -> None:
    """Raise if the kernels are interpreted (``TRITON_INTERPRET=1``) and the interpreter is broken."""
    problem = interpreter_problem()
    if problem is not None:
        raise RuntimeError(
            f"{problem}. Install a Triton whose interpreter works here (3.6 and 3.9 pass this package's "
            "tests under NumPy 2.4) or `pip install 'numpy<2'`, or pass kernels='torch'."
        )


def on_device(device: torch.device) -> ContextManager:
    """Make ``device`` current for a launch: Triton launches on the current CUDA device and stream."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors that live on ``device``."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def resolve_kernels(kernels: str, device: torch.device) -> Literal["triton", "torch"]:
    """Map a user choice ("auto" | "triton" | "torch") to the implementation used on ``device``.

    "auto" picks Triton on CUDA and the torch path elsewhere (the interpreter is never chosen
    automatically: it is for tests). "triton" where it cannot run is an error that names the fix.
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r} is not one of {KERNEL_CHOICES}.")
    if kernels == "torch":
        return "torch"
    if kernels == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "torch"
    if triton_kept_out():
        raise ValueError(
            "kernels='triton' needs Triton, which vlmrm_fast kept out of this process: MuJoCo had rendered through "
            "Mesa's software OpenGL before it loaded, and loading it after that can crash the process "
            "(vlmrm_fast/llvm_clash.py). Import vlmrm_fast before the first frame is rendered (with "
            "TRITON_INTERPRET=1 set before it, for the CPU interpreter), or pass kernels='torch'."
        )
    if not HAS_TRITON:
        raise ValueError(
            "kernels='triton' needs the `triton` package, which is not installed (it has wheels for "
            "Linux only). Install it with `pip install triton`, or pass kernels='torch'."
        )
    if not triton_runs_on(device):
        raise ValueError(
            f"kernels='triton' cannot run on device {device}: Triton compiles for CUDA devices. "
            "Use a CUDA device, set TRITON_INTERPRET=1 before importing vlmrm_fast (it is read at import) "
            "to run the kernels in Triton's slow CPU interpreter, or pass kernels='torch'."
        )
    require_working_interpreter()  # interpreted kernels, on CPU or CUDA tensors alike
    return "triton"


_TOWER_KERNELS: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("vlmrm_fast_tower_kernels",
                                                                             default=None)
"""None outside a "torch" backend's call; inside, whether its Triton kernels run (:func:`tower_kernels`)."""


@contextlib.contextmanager
def tower_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block (in this thread or task), the layers the "torch" backend swapped into a tower
    run this package's Triton kernels (``enabled``: its LayerNorms and QuickGELUs, its fp8 matmuls'
    activation quantisation, with the MLPs' GELU and the blocks' LayerNorms in it) or torch's ops, and
    its MLPs (bf16, CUDA) run their GELU in their first matmul's epilogue either way. The backend enters
    it for its own calls, so the same model called any other way (by the user, another reward, the
    "compile" backend, an export) computes as before."""
    token = _TOWER_KERNELS.set(enabled)
    try:
        yield
    finally:
        _TOWER_KERNELS.reset(token)


def tower_kernels_enabled() -> bool:
    """Whether the caller is inside :func:`tower_kernels` (enabled)."""
    return _TOWER_KERNELS.get() is True


def in_tower_call() -> bool:
    """Whether the caller is inside :func:`tower_kernels`, enabled or not: a "torch" backend's own call."""
    return _TOWER_KERNELS.get() is not None
