"""One training process per run folder: an advisory lock on ``RUN_DIR/.lock``.

Two processes in one run folder lose checkpoints: each one's start-up clears the other's
half-written ``checkpoints/.tmp-*``, and each prunes the other's checkpoints. That happens when a
cluster requeues a job whose first copy is still writing its stop checkpoint, or when a run is
started twice by mistake. The lock is ``flock(2)`` on an open file: the kernel drops it when its
process ends, however it ends (SIGKILL included), so a crashed run never leaves a stale lock behind.
The file holds the holder's pid, host and start time, for the error message only.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Iterator

from vlmrm_fast.callers import stacklevel_outside_package

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs there are not locked
    fcntl = None

LOCK_NAME = ".lock"


class RunFolderBusy(ValueError):
    """Another process trains in this run folder."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return f" ({text})" if text else ""


@contextlib.contextmanager
def hold_run_folder(run_dir: os.PathLike, *, warn_unlocked: bool = True) -> Iterator[None]:
    """Hold ``RUN_DIR/.lock`` for the duration of the block (creating ``run_dir`` if needed).

    Raises :class:`RunFolderBusy`, naming the holder, when another process (or another open of
    the same lock in this one) holds it. On a filesystem without ``flock`` (some Lustre mounts),
    runs unlocked, with a warning if ``warn_unlocked``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _lock(fd, run_dir, path, warn_unlocked):
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a new holder)


def _lock(fd: int, run_dir: Path, path: Path, warn_unlocked: bool) -> bool:
    """Take the lock on ``fd``: True; False (with a warning) where the filesystem cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderBusy(
                f"run folder '{run_dir}' is in use by another training process{_holder(path)}; wait for it to end "
                "(SIGINT or SIGTERM make it checkpoint and stop), or train in another --run-dir"
            ) from None
        if warn_unlocked:
            warnings.warn(
                f"cannot lock run folder '{run_dir}' ({exc}; the filesystem may not support flock): make sure no other "
                "process trains in it, or two runs would overwrite each other's checkpoints",
                stacklevel=stacklevel_outside_package(),
            )
        return False
