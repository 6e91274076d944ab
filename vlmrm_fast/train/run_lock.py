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
from types import ModuleType
from typing import Iterable, Iterator, Optional, cast

from vlmrm_fast.atomic import in_made_folder
from vlmrm_fast.callers import stacklevel_outside_package

fcntl: Optional[ModuleType]
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs there are not locked
    fcntl = None

LOCK_NAME = ".lock"
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
"""flock's errnos for a lock another open file holds."""


class RunFolderBusy(ValueError):
    """Another process trains in this run folder."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return f" ({text})" if text else ""


def busy_holder(run_dir: os.PathLike) -> Optional[str]:
    """Who holds ``run_dir``'s lock now (pid, host and start, as the lock file says; "" if it says nothing),
    or None where no process does (or it cannot be told: no lock file, no flock)."""
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return _holder(path) if exc.errno in _HELD else None
    finally:
        os.close(fd)  # releases the lock if it was taken
    return None


def refuse_if_held(run_dir: os.PathLike) -> None:
    """Where another process holds ``run_dir`` (a run that has not written a complete checkpoint yet, found
    resuming it), raise :class:`RunFolderBusy` naming it: "no checkpoint, start a new run" would be wrong
    advice. Not for a caller holding the folder itself (its own lock would name it)."""
    holder = busy_holder(run_dir)
    if holder is not None:
        raise RunFolderBusy(
            f"run folder '{run_dir}' is in use by another training process{holder}, which has not written a complete "
            "checkpoint yet: wait for it to end (SIGINT or SIGTERM make it checkpoint and stop), then --resume it")


@contextlib.contextmanager
def hold_run_folder(run_dir: os.PathLike, *, warn_unlocked: bool = True) -> Iterator[None]:
    """Hold ``RUN_DIR/.lock`` for the duration of the block (creating ``run_dir`` if needed).

    Raises :class:`RunFolderBusy`, naming the holder, when another process (or another open of
    the same lock in this one) holds it. On a filesystem without ``flock`` (some Lustre mounts),
    runs unlocked, with a warning if ``warn_unlocked``.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    if fcntl is None:  # pragma: no cover
        run_dir.mkdir(parents=True, exist_ok=True)
        yield
        return
    while True:
        # made again if the holder of a run whose set-up failed removed the folder (remove_unstarted_run)
        fd = in_made_folder(run_dir, lambda folder: os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
        try:
            locked = _lock(fd, run_dir, path, warn_unlocked)
        except BaseException:
            os.close(fd)
            raise
        if not locked or _still_at(fd, path):
            break
        # The holder removed the lock file (with the folder of a run whose set-up failed: see
        # remove_unstarted_run) between our open and our lock: what we hold guards nothing. Again.
        os.close(fd)
    try:
        if locked:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _still_at(fd: int, path: Path) -> bool:
    """Whether the file open as ``fd`` is still the one at ``path`` (not removed, nor replaced)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def remove_unstarted_run(run_dir: os.PathLike, keep: Iterable[str] = ()) -> bool:
    """Remove the folder of a new run whose set-up failed, if it holds nothing but its lock file and the
    files named in ``keep`` (its ``config.json``): each failed start (a mistyped env id, weights that could
    not be downloaded) would otherwise leave a folder behind. Call it while holding the lock; a process
    waiting for the lock then takes a new one (:func:`hold_run_folder` checks that the file it locked is
    still there). Anything else in the folder (logs, a checkpoint) keeps it whole. True if removed."""
    run_dir = Path(run_dir)
    names = {entry.name for entry in run_dir.iterdir()}
    if not names <= {LOCK_NAME, *keep}:
        return False
    for name in names - {LOCK_NAME}:
        (run_dir / name).unlink()
    (run_dir / LOCK_NAME).unlink(missing_ok=True)  # last: until then a newcomer is refused as it should be
    try:
        run_dir.rmdir()
    except OSError:  # a file came in meanwhile (not through the lock): it stays, with its folder
        return False
    return True


def _lock(fd: int, run_dir: Path, path: Path, warn_unlocked: bool) -> bool:
    """Take the lock on ``fd``: True; False (with a warning) where the filesystem cannot lock."""
    lock = cast(ModuleType, fcntl)  # not None: hold_run_folder runs unlocked without it
    try:
        lock.flock(fd, lock.LOCK_EX | lock.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in _HELD:
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
