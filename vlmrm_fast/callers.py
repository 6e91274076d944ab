"""Where a warning should point: the user's line that called into vlmrm_fast, not the library's own."""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Tuple

_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")

# Libraries whose base classes call into vlmrm_fast's overrides (SB3's ``VecEnv.step`` calls our
# ``step_wait``, gymnasium's wrappers and vector envs call our ``step``, torch's ``Module.__call__`` and
# open_clip's towers the swapped layers' ``forward``): their frames are not the user's line.
_CALLING_LIBRARIES = ("stable_baselines3", "gymnasium", "torch", "open_clip")


@functools.lru_cache(maxsize=None)
def _skipped_folders() -> Tuple[str, ...]:
    folders = [_PACKAGE]
    for name in _CALLING_LIBRARIES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            folders.append(os.path.join(os.path.abspath(location), ""))
    return tuple(folders)


def stacklevel_outside_package() -> int:
    """``stacklevel`` for ``warnings.warn`` in the function that calls this one, naming the first caller
    outside vlmrm_fast, however many of the package's own frames (wrappers, ``from_pretrained``,
    ``set_tasks``) lie between it and the warning, and outside the libraries whose base classes call the
    package's methods (stable-baselines3's ``VecEnv.step``, gymnasium's wrappers, torch's modules, open_clip's
    towers)."""
    skipped = _skipped_folders()
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level
