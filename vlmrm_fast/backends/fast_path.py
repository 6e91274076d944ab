"""Fast paths of the tower that turn themselves off on their first failure.

The "torch" backend runs the tower's layers through kernels of this package (Triton LayerNorm,
QuickGELU, fp8 quantisation) and cuBLASLt's GELU epilogue. Each stands in for torch's or open_clip's
ops, which compute the same thing more slowly, and some have not yet run on every GPU they may meet. A
build or launch error there should cost speed, not the run: the first one turns that path off for the
process, with one warning that names it and the error, and the slower ops run from then on.

An out-of-memory error is re-raised instead: the caller's to handle (a smaller batch), not the path's
fault; so is an error the slower ops then raise too. Which paths have turned off, and why, is
:func:`turned_off`; ``vlmrm-fast bench`` marks the rows that ran the slower ops in their place
(:func:`declined_calls`).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Tuple, Type, TypeVar

import torch

from vlmrm_fast.callers import stacklevel_outside_package

T = TypeVar("T")

FAST_PATHS: List["FastPath"] = []
"""Every fast path defined, in the order their modules were imported."""


class FastPath:
    """One fast path: :meth:`run` calls it until it first fails, then its stand-in.

    The modules that use it ask :meth:`takes_call` last, once everything else says the path applies to a
    call, so that the calls its stand-in answered for it are counted (:attr:`declined_calls`): how
    ``vlmrm-fast bench`` tells which rows it touched.

    Args:
        name: what it is and where it lives, for the warning ("the LayerNorm kernel (vlmrm_fast/ops/layer_norm.py)").
        instead: what runs once it is off, completing "... from now on" ("torch's LayerNorm runs").
        errors: the exceptions that turn it off (others propagate); default any ``Exception``, since
            Triton's compile and launch errors have no common base.
        report: the versions a bug report needs.
    """

    def __init__(self, name: str, instead: str, errors: Tuple[Type[BaseException], ...] = (Exception,),
                 report: str = "GPU, torch and Triton versions") -> None:
        self.name, self.instead, self.errors, self.report = name, instead, errors, report
        self.failure: Optional[str] = None
        """The first error (type and message, shortened), or None while the path is on."""
        self.declined_calls = 0
        """Calls it applied to that its stand-in answered, since it turned off."""
        FAST_PATHS.append(self)

    @property
    def on(self) -> bool:
        """Whether the path has not failed in this process."""
        return self.failure is None

    def takes_call(self) -> bool:
        """For a call the path applies to: True while it is on; once it is off, False, and the call is
        counted in :attr:`declined_calls`."""
        if self.failure is None:
            return True
        self.declined_calls += 1
        return False

    def run(self, fast: Callable[[], T], instead: Callable[[], T]) -> T:
        """``fast()`` while the path is on; ``instead()`` (the same results, slower) once it is off, including
        on the call whose error turned it off. An error of ``fast()`` turns the path off only where
        ``instead()`` then succeeds: where that fails too (a sticky CUDA error, an error left by an earlier
        kernel), the fault is not the path's, and its error is raised (from the fast path's) with the path
        left on. Out-of-memory errors are raised as they are, the path left on: the caller's to handle."""
        if not self.takes_call():
            return instead()
        try:
            return fast()
        except torch.cuda.OutOfMemoryError:
            raise
        except self.errors as error:
            if _out_of_memory(error):
                raise
            try:
                result = instead()
            except Exception as also:
                raise also from error
            self.turn_off(error)
            self.declined_calls += 1
            return result

    def turn_off(self, error: BaseException) -> None:
        """Turn the path off for the process, with one warning naming ``error``."""
        self.failure = f"{type(error).__name__}: {str(error)[:300]}"
        warnings.warn(f"{self.name} failed here ({self.failure}); {self.instead} from now on (slower). Please "
                      f"report it with your {self.report}.", RuntimeWarning, stacklevel=stacklevel_outside_package())

    def __repr__(self) -> str:
        return f"FastPath({self.name!r}, {'on' if self.on else 'off: ' + str(self.failure)})"


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device out of memory that is no ``torch.cuda.OutOfMemoryError`` (Triton's own,
    loading a kernel: ``RuntimeError: Triton Error [CUDA]: out of memory``)."""
    return "out of memory" in str(error).lower()


def declined_calls() -> Dict[str, int]:
    """Every fast path's :attr:`~FastPath.declined_calls`, by name: compare two to see which paths a stretch
    of work ran without."""
    return {path.name: path.declined_calls for path in FAST_PATHS}


def turned_off() -> Dict[str, str]:
    """The fast paths that have failed in this process: name -> first error."""
    return {path.name: path.failure for path in FAST_PATHS if path.failure is not None}
