"""Writing a file so that a crash never leaves a half-written one under its real name, and making a file in a
folder that another process may remove meanwhile."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar, Union

T = TypeVar("T")

MAKE_ATTEMPTS = 100
""":func:`in_made_folder`'s tries to make the folder and a file in it while other processes remove it."""


def fsync_dir(path: Union[str, Path]) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def default_file_mode(folder: Union[str, Path]) -> int:
    """The permissions a plain ``open`` gives a new file in ``folder`` (0o666 less the umask), read
    from a probe file: unlike ``os.umask``, nothing process-wide changes, even for a moment."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".mode-probe.")  # a unique name (the file is owner-only)
    os.close(fd)
    os.unlink(probe)
    try:
        with open(probe, "x"):
            pass
        return os.stat(probe).st_mode & 0o777
    finally:
        Path(probe).unlink(missing_ok=True)


def in_made_folder(folder: Path, create: Callable[[Path], T]) -> T:
    """``create(folder)`` (make or open a file in it), after making ``folder`` where it is missing. Made again
    and retried while another process removes the folder between the two (a failed training run's clean-up,
    :func:`vlmrm_fast.train.run_lock.remove_unstarted_run`): ``create`` then raises FileNotFoundError, or
    mkdir raises FileExistsError when the folder it found was gone before it checked it is a folder. At most
    :data:`MAKE_ATTEMPTS` times, then the last error is raised: a dangling link fails so every time."""
    attempts_left = MAKE_ATTEMPTS
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return create(folder)
        except (FileNotFoundError, FileExistsError):
            attempts_left -= 1
            if attempts_left == 0:
                raise


def destination_of(path: Union[str, Path]) -> Path:
    """The file that writing ``path`` replaces: where ``path`` leads when it is a symbolic link (``out.csv ->
    /data/scores.csv``), as a plain ``open`` writes through the link, else ``path`` itself. A rename onto the
    link would replace the link, leaving its target as it was."""
    path = Path(path)
    if not os.path.islink(path):
        return path
    target = Path(os.path.realpath(path))
    if os.path.islink(target):  # realpath leaves a loop of links unresolved: replacing it would drop the link
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
    return target


@contextlib.contextmanager
def replaced_when_written(path: Union[str, Path], suffix: str = ".tmp") -> Iterator[Path]:
    """A new, empty temporary file to write in place of ``path``, for a writer that needs a path of its own
    (an encoder writing a video by name). It sits in the folder of the file ``path`` leads to
    (:func:`destination_of`), named ``.NAME.XXXXXXXX`` + ``suffix`` (an encoder that picks its format by
    extension needs ``suffix`` to end in it). When the block ends without error it is fsynced, given the
    permissions a plain ``open`` would (umask), renamed into place, and the rename flushed too (else a power
    cut can lose it); on any error it is removed and the file at ``path`` is as it was. Writers running side
    by side each get their own temporary file."""
    target = destination_of(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)  # the writer may have replaced the file: flush the one now at ``tmp``
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, default_file_mode(target.parent))  # mkstemp's file is owner-only
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:  # ENOSPC from a write names no file
            exc.filename = str(path)
        raise
    fsync_dir(target.parent)


def write_atomically(path: Union[str, Path], data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`replaced_when_written`: a crash never leaves a half-written
    file under its real name. A symbolic link at ``path`` stays: the file it leads to is written. Returns
    ``path``."""
    with replaced_when_written(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_figure_atomically(figure: Any, path: Union[str, Path], dpi: int = 120) -> Path:
    """Save a matplotlib ``Figure`` as a PNG at ``path`` through :func:`write_atomically`: rendered in
    memory first, so a crash mid-save never leaves a cut-short image where an earlier one was."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return write_atomically(path, buffer.getvalue())
