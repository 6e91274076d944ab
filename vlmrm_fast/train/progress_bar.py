"""The training progress display: tqdm's bar on a terminal or in a notebook; in a log file or a pipe (a cluster
job's stderr), the same text as a line every minute, since a bar redrawn with carriage returns makes one
ever-growing line."""
from __future__ import annotations

import os
import stat
import sys
import time
from typing import Any, Union

from tqdm import tqdm

#: Seconds between two lines of :class:`ProgressLines`.
LINE_INTERVAL_S = 60.0


class ProgressLines:
    """What tqdm's bar says, as a whole line at the start, every ``interval`` seconds, and at the end.

    Takes the calls the training callback makes of a tqdm bar: ``update``, ``set_postfix``, ``write``
    and ``close``.
    """

    def __init__(self, total: int, initial: int = 0) -> None:
        self.total, self.n, self._initial = total, initial, initial
        self._postfix = ""
        self._start = self._last = time.monotonic()
        self._print()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= LINE_INTERVAL_S:
            self._print()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self._postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def write(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._print()

    def _print(self) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 and self.n > self._initial else None
        line = tqdm.format_meter(self.n, self.total, elapsed, ncols=0, prefix="train", unit="step", rate=rate,
                                 postfix=self._postfix or None, initial=self._initial)
        print(line, file=sys.stderr, flush=True)


def _stderr_is_a_log() -> bool:
    """Whether stderr is a file, a pipe or a socket (a job's log, ``2>&1 | tee``): not a terminal, and not a
    notebook's stream (no file descriptor), where tqdm's bar is the display."""
    try:
        mode = os.fstat(sys.stderr.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return False
    return stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def progress_display(total: int, initial: int) -> Union[tqdm, ProgressLines]:
    """:class:`ProgressLines` where stderr is a log (a file, a pipe, a socket), else a tqdm bar of env steps
    (a terminal, a notebook)."""
    if _stderr_is_a_log():
        return ProgressLines(total, initial)
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train", smoothing=0.05)
