"""Triton must load before MuJoCo renders through Mesa's software OpenGL.

Triton and Mesa's llvmpipe driver each bring an LLVM. Where Mesa's has been loaded and set to work
first (MuJoCo made a GL context on a machine without a GPU driver's EGL), loading Triton's crashes
the process: a segmentation fault, no message. Loaded the other way round, both work. So
``import vlmrm_fast`` loads Triton (:func:`load_triton_first`, about 0.15 s, where MuJoCo is
installed). Where it is too late for that, :func:`guard_triton_load` (called by the package's modules
that would load Triton, its own kernels and open_clip's torchvision) does what is safe:

- without a CUDA device or Triton's interpreter asked for, Triton has no kernel to run here: it is kept
  out of the process (``import triton`` then fails, so torch, torchvision and this package take their
  paths without it), with one warning, and nothing crashes;
- with one, Triton is needed: it loads, after one warning naming the cause and the fix, so that a crash
  that follows is explained. A warning, not an error: a mapped LLVM that no GL context uses (a GL vendor
  library loaded only to list devices, say) does not crash, and must not stop the program.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

from vlmrm_fast.callers import stacklevel_outside_package

_warned = False
_kept_out = False

FIX = ("import vlmrm_fast (or triton) before the first frame is rendered, e.g. `import vlmrm_fast` at the top of "
       "the script")


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


def triton_would_crash() -> bool:
    """Whether loading Triton now may crash the process: it is installed and not loaded, and a shared LLVM is."""
    return _triton_not_loaded() and mesa_llvm_loaded()


def triton_kept_out() -> bool:
    """Whether :func:`guard_triton_load` kept Triton out of this process."""
    return _kept_out


def load_triton_first() -> None:
    """Load Triton now, unless it is loaded already, not installed, or too late to load safely (then
    :func:`guard_triton_load`)."""
    if _triton_not_loaded() and not mesa_llvm_loaded():
        try:
            import triton  # noqa: F401
        except Exception:  # noqa: BLE001 - a broken install: ops/_triton.py falls back to torch and says why
            pass
    else:
        guard_triton_load()


def _triton_needed() -> bool:
    """Whether Triton could run kernels here: a CUDA device, or its CPU interpreter asked for."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def guard_triton_load() -> None:
    """Before anything that may load Triton: where loading it now may crash the process, keep it out if it
    has nothing to run here, else warn (once) with the cause and the fix (module docstring)."""
    global _warned, _kept_out
    if _warned or _kept_out or not triton_would_crash():
        return
    if not _triton_needed():
        sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` raises ImportError from now on
        _kept_out = True
        warnings.warn(
            "MuJoCo rendered through Mesa's software OpenGL (llvmpipe) before Triton was loaded, and loading it "
            "now could crash the process (their two LLVMs clash); with no CUDA device it has no kernels to run "
            "here, so vlmrm_fast keeps it out of this process: `import triton` fails from now on, and torch's "
            f"paths run. To keep Triton importable, {FIX}.",
            stacklevel=stacklevel_outside_package(),
        )
        return
    _warned = True
    warnings.warn(
        "a shared LLVM is loaded (Mesa's software OpenGL, llvmpipe: MuJoCo rendered a frame) before Triton, "
        "which is loading now; if the process crashes here (a segmentation fault), the two LLVMs clashed: "
        f"{FIX}.",
        stacklevel=stacklevel_outside_package(),
    )
