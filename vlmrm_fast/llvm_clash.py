"""Triton must load before MuJoCo renders through Mesa's software OpenGL.

Triton and Mesa's llvmpipe driver each bring an LLVM. Where Mesa's is loaded first (MuJoCo made a GL
context on a machine without a GPU driver's EGL), loading Triton's crashes the process: a
segmentation fault, no message. Loaded the other way round, both work. So ``import vlmrm_fast``
loads Triton (:func:`load_triton_first`, about 0.15 s, where MuJoCo is installed), and the modules
that would load it later check first (:func:`check_triton_can_load`), turning the crash into an
error that names the fix.
"""
from __future__ import annotations

import importlib.util
import sys


def mesa_llvm_loaded() -> bool:
    """True when a shared LLVM (``libLLVM``, which Mesa's llvmpipe loads with its first GL context)
    is mapped into this process; False where that cannot be told (no ``/proc``)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("/libLLVM" in line for line in maps)
    except OSError:
        return False


def _triton_not_loaded() -> bool:
    return "triton" not in sys.modules and importlib.util.find_spec("triton") is not None


def load_triton_first() -> None:
    """Load Triton now, unless it is loaded already, not installed, or too late to load safely."""
    if _triton_not_loaded() and not mesa_llvm_loaded():
        import triton  # noqa: F401


def check_triton_can_load() -> None:
    """A ``RuntimeError`` naming the fix where loading Triton now would crash the process."""
    if _triton_not_loaded() and mesa_llvm_loaded():
        raise RuntimeError(
            "MuJoCo has rendered through Mesa's software OpenGL (llvmpipe) before Triton was loaded, and "
            "loading Triton now would crash the process (two LLVMs clash). Import vlmrm_fast (or triton) "
            "before the first frame is rendered: `import vlmrm_fast` at the top of the script."
        )
