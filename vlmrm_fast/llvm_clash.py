"""Triton must load before MuJoCo renders through Mesa's software OpenGL.

Triton and Mesa's llvmpipe driver each bring an LLVM. Where Mesa's has been loaded and set to work
first (MuJoCo made a GL context on a machine without a GPU driver's EGL), loading Triton's crashes
the process: a segmentation fault, no message. Loaded the other way round, both work. So
``import vlmrm_fast`` loads Triton (:func:`load_triton_first`, about 0.15 s, where MuJoCo is
installed), and the modules that would load it later first warn where a shared LLVM is already
mapped (:func:`warn_if_triton_may_crash`), so that a crash that follows has its cause and fix named.
A warning, not an error: a mapped LLVM that no GL context uses (a GL vendor library loaded only to
list devices, say) does not crash, and must not stop the program.
"""
from __future__ import annotations

import importlib.util
import sys
import warnings

from vlmrm_fast.callers import stacklevel_outside_package

_warned = False


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
        try:
            import triton  # noqa: F401
        except Exception:  # noqa: BLE001 - a broken install: ops/_triton.py falls back to torch and says why
            pass


def warn_if_triton_may_crash() -> None:
    """Warn (once) where loading Triton now may crash the process: before it happens, with the fix."""
    global _warned
    if not _warned and _triton_not_loaded() and mesa_llvm_loaded():
        _warned = True
        warnings.warn(
            "a shared LLVM is loaded (Mesa's software OpenGL, llvmpipe: MuJoCo rendered a frame) before Triton, "
            "which is loading now; if the process crashes here (a segmentation fault), the two LLVMs clashed: "
            "import vlmrm_fast (or triton) before the first frame is rendered, e.g. `import vlmrm_fast` at the "
            "top of the script.",
            stacklevel=stacklevel_outside_package(),
        )
