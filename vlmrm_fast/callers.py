"""Where a warning should point: the user's line that called into vlmrm_fast, not the library's own."""
from __future__ import annotations

import os
import sys

_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


def stacklevel_outside_package() -> int:
    """``stacklevel`` for ``warnings.warn`` in the function that calls this one, naming the first caller
    outside vlmrm_fast, however many of the package's own frames (wrappers, ``from_pretrained``,
    ``set_tasks``) lie between it and the warning."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
