"""Keeping a dependency's root-logger lines out of the user's output."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator


class _DropRecordsFrom(logging.Filter):
    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = os.path.join(os.path.abspath(folder), "")

    def filter(self, record: logging.LogRecord) -> bool:
        return not os.path.abspath(record.pathname).startswith(self.folder)


@contextlib.contextmanager
def root_records_dropped(folder: str) -> Iterator[None]:
    """While inside, drop root-logger records logged from files under ``folder`` (a package's
    directory). A NullHandler also stops ``logging.warning`` from configuring an unconfigured root
    logger as a side effect; both are removed on the way out."""
    root = logging.getLogger()
    guard, drop = logging.NullHandler(), _DropRecordsFrom(folder)
    root.addHandler(guard)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        root.removeHandler(guard)


@contextlib.contextmanager
def loggers_quieted(*names: str) -> Iterator[None]:
    """While inside, the named loggers pass on WARNING and above only (their own INFO lines, logged
    through them rather than the root logger); their levels are restored on the way out."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
