"""Guarded import of the compiled GL -> CUDA readback extension (``vlmrm_fast._render_cuda``).

The extension is optional (setup.py builds it only where CUDA is present); everything here works
without it and says why the GPU path is unavailable.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Optional, Tuple

_ext: Any = None
_import_error: Optional[str] = None
_built = False  # the compiled file is there (it may still fail to load)

try:
    import torch  # noqa: F401  (the extension links against torch's libraries)

    from vlmrm_fast import _render_cuda as _ext  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # ImportError, or OSError from a missing shared library
    _ext = None
    _import_error = f"{type(exc).__name__}: {exc}"
    _built = importlib.util.find_spec("vlmrm_fast._render_cuda") is not None


def extension() -> Any:
    """The compiled module, or None when it is not built or cannot load."""
    return _ext


_BUILD_INFO = re.compile(rb"vlmrm_fast extension built with: torch (\d+\.\d+\.\d+), CUDA runtime (\d+)\x00")


def _release(version: str) -> str:
    """"2.6.0" of "2.6.0+cu124", "2.6.0a0+ecf3bae" (an NGC container's) or "2.8.0.dev20250601" (a nightly)."""
    found = re.match(r"\d+\.\d+\.\d+", version)
    return found.group(0) if found else version


def built_against() -> Optional[Tuple[str, str]]:
    """The torch release and CUDA runtime the compiled file was built against (("2.6.0", "12.4")), read
    from the file itself (it holds them as text), so also when it does not load; None if unknown."""
    spec = importlib.util.find_spec("vlmrm_fast._render_cuda")
    if spec is None or not spec.origin:
        return None
    try:
        with open(spec.origin, "rb") as file:
            found = _BUILD_INFO.search(file.read())
    except OSError:
        return None
    if found is None:  # built before the file recorded it
        return None
    runtime = int(found.group(2))
    return found.group(1).decode(), f"{runtime // 1000}.{runtime % 1000 // 10}"


def gpu_unavailable_reason(device: Any = None) -> Optional[str]:
    """Why the GPU render path cannot run here, in one line; None when it can be tried.

    Static checks only (extension built, CUDA device, ``MUJOCO_GL=egl``); whether the EGL context
    really sits on the CUDA device is checked when a :class:`BatchRenderer` is made (it then falls
    back to the CPU path and records the reason in ``fallback_reason``).
    """
    import torch

    dev = None if device is None else torch.device(device)
    if dev is not None and dev.type != "cuda":
        return f"device {dev} is not a CUDA device"
    extension_problem = _extension_problem()
    if not torch.cuda.is_available():  # first: on a machine without a GPU it is the reason that matters
        return "no CUDA device (torch.cuda.is_available() is False)" + (
            f"; also, {extension_problem}" if extension_problem else "")
    if dev is not None and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"{dev} does not exist ({torch.cuda.device_count()} CUDA devices)"
    if extension_problem:
        return extension_problem
    gl = os.environ.get("MUJOCO_GL", "").strip().lower()
    if gl != "egl":
        return (
            f"MUJOCO_GL={gl!r}: the GPU path renders through EGL on the CUDA device; set "
            "MUJOCO_GL=egl (and PYOPENGL_PLATFORM=egl) before importing mujoco"
        )
    return None


def _extension_problem() -> Optional[str]:
    """Why the extension cannot be used (not built, or built and not loading), with the fix; None if it loaded."""
    import torch

    if _ext is None and _built:
        built = built_against()
        if built is None:
            cause = f"usually it was built against another torch than this one ({torch.__version__})"
        else:
            cause = f"it was built against torch {built[0]} and CUDA {built[1]}"
            if built[0] != _release(torch.__version__):
                cause += f", and this is torch {torch.__version__}"
            else:  # the same torch release: another build of it (+cu124 against +cu126, say), or a library missing
                cause += (f", the release of this torch ({torch.__version__}): the error names what is missing, or it "
                          "was built against another build of it (CUDA version, C++ ABI)")
        if torch.version.cuda is None:  # no rebuild helps: setup.py refuses a CPU-only torch
            fix = (", a CPU-only build: install a CUDA build of torch"
                   + (f" ({built[0]}, the one it was built against)" if built is not None else "") + ", e.g. "
                   "`pip install torch --index-url https://download.pytorch.org/whl/cu126` (the CUDA version the "
                   "cluster's driver takes)")
        else:
            fix = (": rebuild it against this torch (`VLMRM_FAST_FORCE_BUILD=1 pip install -e . --no-build-isolation`: "
                   "without the variable a machine with no GPU visible skips the build and keeps the old one; or a "
                   "wheel built where this torch is installed, after `pip uninstall -y vlmrm-fast`: pip skips a wheel "
                   "of the version installed)")
        return f"the CUDA extension vlmrm_fast._render_cuda is built but does not load ({_import_error}); {cause}{fix}"
    if _ext is None:
        return (
            "the CUDA extension vlmrm_fast._render_cuda is not built "
            f"({_import_error}); build it where the CUDA toolkit is (a GPU is not needed): in a source checkout, "
            "`VLMRM_FAST_FORCE_BUILD=1 pip install -e . --no-build-isolation`, or a wheel with it, "
            "`VLMRM_FAST_FORCE_BUILD=1 pip wheel --no-deps --no-build-isolation -w dist .` (README: Wheels for a GPU cluster)"
        )
    return None
