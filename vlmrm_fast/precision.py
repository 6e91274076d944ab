"""Blocks that compute in the precision asked for, whatever the process set: no caller's autocast
(:func:`without_autocast`), and full float32 (TF32 off) in cuBLAS matmuls and cuDNN convolutions
(:func:`float32_matmuls`, :func:`float32_convolutions`) for the length of a block, whichever TF32
setting the process uses, and exactly as it was afterwards.

torch >= 2.9 has two ways to set TF32: the legacy flags (``torch.backends.cuda.matmul.allow_tf32``,
``torch.backends.cudnn.allow_tf32``) and ``fp32_precision`` (per backend and operator, or globally
as ``torch.backends.fp32_precision``). For matmuls the two do not mix: once a process has set the new
API, reading the legacy flag raises, and once it has set the legacy flag, the operator is pinned in
the new API (no longer "none", which follows the global setting). So matmuls go through the new API
where the legacy flag cannot be read or nothing was set ("none"), and through the legacy flag where
that is what the process set. cuDNN convolutions always go through the new API where it exists: a
legacy write does not reach them once the global setting is used, and the legacy flag stays
readable and consistent after a new-API write.

Reading an operator's ``fp32_precision`` gives the value in force: its own, or where that is "none",
the one it inherits (``torch.backends.fp32_precision``). A matmul setting that reads the same as the
inherited one is taken to be inherited and restored as "none", so that a later global change still
reaches matmuls (restoring the value read would pin it). Beside a global "tf32", a matmul setting
pinned through the legacy flag (``torch.set_float32_matmul_precision("high")``) keeps the legacy flag
readable, and the legacy flag is restored instead. The one case this gets wrong, a matmul setting
pinned through the new API to the very value the global one has, then follows later global changes.
cuDNN convolutions are restored to the value read: their untouched default reads "tf32" without
being "none", and writing "none" would turn their TF32 off.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator, Union

import torch

_SETTING = threading.RLock()
"""Held for the length of a TF32-off block: the settings are the process's, so blocks entered from two threads at
once restored each other's values out of order, leaving TF32 off for good (a user's "tf32" lost) and the later
block's matmuls in TF32 (a reward model's CUDA frames scored from two threads)."""


def _setting_lock_anew() -> None:
    global _SETTING
    _SETTING = threading.RLock()  # free in a child forked while another thread held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_setting_lock_anew)


def _inherited_precision() -> str:
    """What an operator of the CUDA backend inherits: the backend's setting, or the global one."""
    # torch >= 2.9 only: called where the new API exists
    return torch._C._get_fp32_precision_getter("cuda", "all")  # type: ignore[attr-defined, unused-ignore]


@contextlib.contextmanager
def _tf32_off(legacy_owner: Any, new_owner: Any, new_api_always: bool) -> Iterator[None]:
    with _SETTING:
        with _tf32_off_unlocked(legacy_owner, new_owner, new_api_always):
            yield


@contextlib.contextmanager
def _tf32_off_unlocked(legacy_owner: Any, new_owner: Any, new_api_always: bool) -> Iterator[None]:
    current = getattr(new_owner, "fp32_precision", None)  # None: torch < 2.9, no new API
    try:
        legacy = legacy_owner.allow_tf32
    except RuntimeError:  # the new API is in use
        legacy = None
    inherited = _inherited_precision() if current is not None and not new_api_always else None
    # Beside a global "tf32", the legacy flag reads only where it pinned matmuls itself: keep to it then.
    legacy_pinned = legacy is not None and inherited == "tf32"
    off: Union[str, bool]  # the new API's "ieee", the legacy flag's False
    if current is not None and not legacy_pinned and (
            new_api_always or legacy is None or current == "none" or inherited != "none"):
        # A global new-API setting is in use (inherited != "none") or nothing is set: new API.
        previous = "none" if current == inherited else current
        owner, name, off = new_owner, "fp32_precision", "ieee"
    else:
        owner, name, previous, off = legacy_owner, "allow_tf32", legacy, False
    # A matmul precision set by name ("medium") no longer reads after a legacy write (torch raises on the
    # mix): it is set again by name after the block.
    named = _matmul_precision() if owner is torch.backends.cuda.matmul and name == "allow_tf32" else None
    setattr(owner, name, off)
    try:
        yield
    finally:
        setattr(owner, name, previous)
        if named is not None and _matmul_precision() != named:  # raises (torch >= 2.9) or reads 'high' (< 2.9)
            torch.set_float32_matmul_precision(named)


def _matmul_precision() -> Any:
    """``torch.get_float32_matmul_precision()``, or None where it raises (the two TF32 APIs mixed)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def float32_matmuls() -> "contextlib.AbstractContextManager[None]":
    """Inside the block, CUDA float32 matmuls run in full float32 (TF32 off); the setting is restored
    after. A no-op for CPU matmuls, which never use TF32."""
    return _tf32_off(torch.backends.cuda.matmul, torch.backends.cuda.matmul, new_api_always=False)


def float32_convolutions() -> "contextlib.AbstractContextManager[None]":
    """Inside the block, cuDNN float32 convolutions run in full float32 (TF32 off, which is on by
    default); the setting is restored after."""
    return _tf32_off(torch.backends.cudnn, getattr(torch.backends.cudnn, "conv", None), new_api_always=True)


def without_autocast(device: torch.device) -> torch.autocast:
    """A block that a caller's ``torch.autocast`` on ``device``'s type (a training loop's mixed precision) does
    not reach: what runs inside computes in the dtypes it was given (a reward model's tower in its ``dtype``,
    the rest in float32)."""
    return torch.autocast(device.type, enabled=False)
