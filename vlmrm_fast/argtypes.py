"""argparse value types, the names the ``vlmrm-fast`` commands offer, and the commands' error type.

Free of heavy imports (torch, open_clip): the parsers are built from it before ``--help`` answers.
"""
import argparse
import contextlib
import errno
import importlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from vlmrm_fast.atomic import destination_of, in_made_folder

BACKEND_NAMES = ("torch", "compile", "onnxruntime", "tensorrt")
"""The concrete vision-tower backends (``"auto"`` picks one of them)."""

FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32, the rewards' type in SB3 and the wrappers (a weight or reward past it is inf there)."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile's modes, which the "compile" backend's ``mode`` option takes."""

ONNX_INPUT_FORMATS = ("uint8-nhwc", "pixels")
"""An exported tower's input: uint8 frames [N, H, W, 3] with the preprocessing folded in, or
preprocessed float pixels [N, 3, H, W]."""

ONNX_EXPORTERS = ("auto", "torchscript", "dynamo")
"""Which of torch's ONNX exporters writes a graph (:func:`vlmrm_fast.backends.onnx_export.export_onnx`)."""

CLI_EXTRA_HINT = "install the CLI extra: pip install 'vlmrm-fast[cli]'"


class CLIError(Exception):
    """A user-facing error of a command; :func:`vlmrm_fast.cli.main` prints its message and exits with code 2."""


class StdoutClosed(Exception):
    """The reader of a command's standard output stopped reading (``score --out - | head``): :func:`vlmrm_fast.cli.main`
    ends quietly, as Unix tools do. Raised only around writes to stdout, so that another broken pipe (a socket, a
    subprocess) is still reported."""


@contextlib.contextmanager
def stdout_may_close() -> Iterator[None]:
    """Turn a broken pipe inside the block, which writes to stdout, into :class:`StdoutClosed`."""
    try:
        yield
    except BrokenPipeError as error:
        raise StdoutClosed() from error


def require_cli_extra(module: str, package: str):
    """Import ``module``, an optional dependency of the CLI (``package`` on PyPI), or fail with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CLIError(f"'{package}' is needed to read frames and plot; {CLI_EXTRA_HINT}") from None


SHORT_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""torch's dtype names and the short ones; every command takes both."""
_LONG_DTYPE_NAMES = {short: name for name, short in SHORT_DTYPE_NAMES.items()}


def undecoded_byte(text: str) -> Optional[str]:
    """The first lone surrogate in ``text``, or None: a byte of a command line or file typed in another encoding
    than the locale's, which Python passes on as such (``--goal $'caf\\xe9'`` in a UTF-8 locale). It is no text:
    CLIP's tokenizer would drop or mangle it without a word, and no plot title can draw it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return text[exc.start]
    return None


def dtype_name(text: str, long: bool) -> str:
    """``text`` (fp32 or float32, bf16 or bfloat16, fp16 or float16, any case) as torch's long name
    (``long``) or the short one; other text comes back lower-cased, for the caller's own check."""
    text = text.strip().lower()
    short = SHORT_DTYPE_NAMES.get(text, text)
    if not long:
        return short
    return _LONG_DTYPE_NAMES.get(short, text)


def dtype_choice(choices: Sequence[str]) -> Callable[[str], str]:
    """An argparse type taking either spelling of ``choices`` (given in one spelling) and returning it
    in that spelling."""
    long = any(c in SHORT_DTYPE_NAMES for c in choices)

    def parse(text: str) -> str:
        value = dtype_name(text, long)
        if value not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def output_file(given: Optional[str], default: Path) -> Path:
    """Where an ``--out FILE`` (given as typed, a ``str``) writes: ``default`` when not given; inside a
    folder, ``default``'s name, the folder being one that exists or a name ending in a separator
    (``runs/new/``: made by the caller's first write; a ``Path`` would drop that separator and make
    the file ``runs/new``); else the file named."""
    if given is None:
        return default
    if given.endswith(("/", os.sep)) or Path(given).is_dir():
        return Path(given) / default.name
    return Path(given)


def writable_folder(folder: Path, flag: str) -> Path:
    """``folder``, made where missing, once a file can be written in it; else a ValueError naming ``flag``:
    before a command loads a model (gigabytes) or measures for minutes only to fail at its first write."""
    is_a_file = ValueError(f"'{folder}' is a file, not a folder; pass another {flag}")
    if not _is_folder_or_missing(folder):
        raise is_a_file
    try:
        fd, probe = in_made_folder(folder, lambda f: tempfile.mkstemp(dir=f, prefix=".vlmrm-fast-", suffix=".probe"))
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if not _is_folder_or_missing(folder):  # put there meanwhile
            raise is_a_file from None
        link = broken_link_on_the_way(folder)
        if link is not None:
            why, fix = link
            raise ValueError(f"cannot write in '{folder}' ({why}); {fix}, or pass another {flag}") from None
        blocker = _file_on_the_way(folder)
        why = f"'{blocker}' is a file" if blocker is not None else exc.strerror or str(exc)
        raise ValueError(f"cannot write in '{folder}' ({why}); pass another {flag}") from None
    return folder


MAKE_THE_TARGET = "make it (is its disk mounted?)"
"""The fix for a symbolic link whose target, or its folder, does not exist (``runs -> /scratch/runs``)."""


def broken_link_on_the_way(folder: Path) -> Optional[tuple[str, str]]:
    """What is wrong with the nearest of ``folder`` and its parents that is a symbolic link leading nowhere
    (``runs -> /scratch/runs`` on a node where /scratch is not mounted), and the fix; None if there is none.
    mkdir only says "File exists" there."""
    for path in (folder, *folder.parents):
        try:
            if not stat.S_ISLNK(os.lstat(path).st_mode):
                continue
            target = os.readlink(path)
        except OSError:  # missing, or cannot be looked at: the caller's other checks name it
            continue
        try:
            os.stat(path)
        except FileNotFoundError:
            # A relative target, or one through more links (runs -> scratch/runs, scratch -> /mnt/gone), is
            # named where it ends too: that is what to make.
            resolved = os.path.realpath(path)
            leads = f"'{target}'" if resolved == target else f"'{target}' (leading to '{resolved}')"
            return f"'{path}' is a symbolic link to {leads}, which does not exist", MAKE_THE_TARGET
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"'{path}' is a symbolic link to '{target}', a loop of links", "point it at a folder"
    return None


def _file_on_the_way(folder: Path) -> Optional[Path]:
    """The nearest of ``folder``'s parents that exists and is no folder, if any (parents that cannot be looked
    at are passed over: the caller's error names what went wrong)."""
    return next((parent for parent in folder.parents if not _is_folder_or_missing(parent)), None)


def _is_folder_or_missing(path: Path) -> bool:
    # One stat, not exists() then is_dir(): a folder removed between the two would pass for a file. A path
    # that cannot be looked at (missing, or behind a folder we may not enter) is left to mkdir to name.
    try:
        return stat.S_ISDIR(path.stat().st_mode)
    except OSError:
        return True


def writable_file(path: Path, flag: str) -> Path:
    """``path``, once it is no folder and a file can be written beside it (:func:`writable_folder`), or beside
    the file it leads to when it is a symbolic link (written through: :func:`vlmrm_fast.atomic.destination_of`)."""
    if path.is_dir():
        raise ValueError(f"'{path}' is a folder; give a file name ({flag})")
    try:
        target = destination_of(path)
    except OSError as exc:  # a loop of links: written, it replaced the link with a file
        if exc.errno != errno.ELOOP:
            raise
        raise ValueError(f"'{path}' is a symbolic link to '{os.readlink(path)}', a loop of links; point it at a "
                         f"file, or pass another {flag}") from None
    if target != path:  # latest.csv -> /scratch/runs/r7.csv, /scratch not mounted: not made behind the user's back
        try:
            os.stat(target.parent)
        except FileNotFoundError:
            raise ValueError(f"'{path}' is a symbolic link to '{target}', whose folder does not exist; "
                             f"{MAKE_THE_TARGET}, or pass another {flag}") from None
        except OSError:  # cannot be looked at: writable_folder names it
            pass
    writable_folder(target.parent, flag)
    return path


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_from(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_from(text, 0, "an integer >= 0")


def _int_from(text: str, lowest: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def in_cli_terms(message: str, dtype_flag: str = "--dtypes", backend_flag: str = "--backends",
                 batch_flag: str = "--batch-sizes", device_flag: str = "--device", model_flag: str = "--model") -> str:
    """A backend's error, written for ``CLIPReward`` callers, in a command's options: with ``bench``'s
    flags (the defaults), "pass dtype=torch.float32" becomes "pass --dtypes fp32", "backend='torch'"
    "--backends torch", "quantize='int8'" "--dtypes int8" (bench's precisions), "device='cpu'" "--device
    cpu" and "lower max_batch_size" "lower --batch-sizes"; ``score`` passes its ``--dtype``, ``--backend``
    and ``--batch-size``, ``train`` its ``--reward-*`` flags; "model_name='local-dir:x'" becomes
    "--model local-dir:x" (``export``: its MODEL argument). Names that end in these (``sac_device='x'``)
    are left as they are."""
    def short(match: re.Match) -> str:
        return SHORT_DTYPE_NAMES.get(match.group(1), match.group(1))

    message = re.sub(r"\bdtype=torch\.(\w+)", lambda m: f"{dtype_flag} {short(m)}", message)
    message = re.sub(r"\btorch\.(float32|bfloat16|float16)\b", short, message)
    message = re.sub(r"\bbackend='(\w+)' with quantize='(\w+)'", rf"{backend_flag} \1 {dtype_flag} \2", message)
    message = re.sub(r"\bbackend='(\w+)'( or '(\w+)')?", lambda m: f"{backend_flag} {m.group(1)}"
                     + (f" or {m.group(3)}" if m.group(3) else ""), message)
    message = re.sub(r"\bquantize='(\w+)'", rf"{dtype_flag} \1", message)
    message = re.sub(r"\bdevice='([^']*)'", rf"{device_flag} \1", message)
    message = re.sub(r" \(command line: [^)]*\)", "", message)  # what the Python message adds for these commands
    message = re.sub(r" \(in Python: [^)]*\)", "", message)  # and what it says for Python callers alone
    message = message.replace("pretrained=None", "--pretrained none")
    message = re.sub(r"\bmodel_name='([^']*)'", lambda m: f"{model_flag} {m.group(1)}", message)
    message = re.sub(r"\balpha=(\d+(?:\.\d+)?)", r"--alpha \1", message).replace("give a baseline", "give a --baseline")
    return re.sub(r"\bmax_batch_size\b", batch_flag, message)
