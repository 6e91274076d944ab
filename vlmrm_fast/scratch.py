"""Scratch folders beside a large output (ONNX graphs of gigabytes, which a small tmpfs could not hold)
whose names say which host and process made them, so that a later run removes what a killed one
(SIGKILL, the OOM killer: no clean-up ran) left behind.

Name: ``.<output name>.<purpose>-<host>-<pid>-<random>``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

_log = logging.getLogger(__name__)

ABANDONED_AFTER_S = 24 * 3600.0
"""Age after which a scratch folder that no live process of this host owns is abandoned (another host's
process cannot be asked; a day is far longer than any build)."""


def this_host() -> str:
    """The host name, and the PID namespace where there is one: containers on one host (``--net=host``)
    share its name but not their process ids."""
    try:
        namespace = f"@{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        namespace = ""
    return socket.gethostname() + namespace


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host (PID namespace) runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def scratch_prefix(base: str) -> str:
    """``base`` followed by this host and process: the prefix of this process's scratch folders."""
    return f"{base}{this_host()}-{os.getpid()}-"


def is_abandoned(name: str, base: str, age_s: float, max_age_s: Optional[float] = ABANDONED_AFTER_S) -> bool:
    """Whether a scratch folder ``name`` (starting with ``base``) was left by a process gone from this
    host, or is older than ``max_age_s`` (None: never abandoned for its age alone)."""
    owner, _, pid = name[len(base):].rpartition("-")[0].rpartition("-")
    return ((owner == this_host() and pid.isdigit() and not alive(int(pid)))
            or (max_age_s is not None and age_s > max_age_s))


def remove_abandoned(folder: Path, base: str, max_age_s: Optional[float] = ABANDONED_AFTER_S) -> None:
    """Remove the abandoned (:func:`is_abandoned`) scratch folders named ``base...`` in ``folder``; with
    ``max_age_s=None``, only those of this host's processes gone (a folder only this host uses, such as
    its temporary one, where a day-old folder may be a long run's)."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(base):
            continue
        try:
            age = now - entry.stat().st_mtime
        except OSError:
            continue
        if entry.is_dir() and is_abandoned(entry.name, base, age, max_age_s):
            _log.info("removing %s, left by a process that was killed", entry)
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def scratch_folder(beside: Path, purpose: str) -> Iterator[Path]:
    """A temporary folder in ``beside``'s folder, removed on exit; what killed runs writing ``beside``
    for the same ``purpose`` left there is removed first."""
    beside = Path(beside)
    base = f".{beside.name}.{purpose}-"
    remove_abandoned(beside.parent, base)
    with tempfile.TemporaryDirectory(prefix=scratch_prefix(base), dir=beside.parent) as tmp:
        yield Path(tmp)
