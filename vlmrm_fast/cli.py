"""The ``vlmrm-fast`` command-line tool.

Commands
--------
``vlmrm-fast score PATH --goal TEXT``
    Score every frame of a video file, a GIF, an image, or a folder of images with a CLIP
    reward and write the per-frame rewards as CSV (and, with ``--plot``, a PNG)
    (vlmrm_fast/score_command.py; the frames are read by vlmrm_fast/frame_files.py).
``vlmrm-fast export MODEL``
    The vision tower as ONNX or a TensorRT engine (vlmrm_fast/export.py).
``vlmrm-fast bench``
    Frames/s per stage against the seed's pipeline (vlmrm_fast/profiler/).
``vlmrm-fast train``
    SAC on the VLM reward (vlmrm_fast/train/command.py; the run itself: vlmrm_fast/train/run.py).

Adding a command: write ``add_<name>_parser(subparsers)`` that registers its options and sets
``handler=`` to a function ``(args) -> int``, then call it from :func:`build_parser`. :func:`main` turns the
expected error types into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import List, Optional, TextIO

from vlmrm_fast.argtypes import CLIError, StdoutClosed
from vlmrm_fast.export import add_export_parser
from vlmrm_fast.profiler import add_bench_parser
from vlmrm_fast.score_command import add_score_parser
from vlmrm_fast.train.command import add_train_parser

__all__ = ["CLIError", "PROG", "build_parser", "main"]

PROG = "vlmrm-fast"
SHOW_LIBRARY_MESSAGES = ("score", "train")  # bench reports build times in its table, and has a progress bar


# --------------------------------------------------------------------------- arguments


def _version_line() -> str:
    """``vlmrm-fast --version``: this package's version, and the torch it runs with (what a bug report needs),
    read from torch's version file (its build, "+cu126" included): the parser stays quick, without importing torch."""
    import importlib.util

    from vlmrm_fast import __version__

    spec, torch_version = importlib.util.find_spec("torch"), "not installed"
    if spec is not None and spec.submodule_search_locations:
        try:
            text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
            torch_version = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)", text, re.M).group(1)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            torch_version = "unknown"
    return f"{PROG} {__version__} (torch {torch_version}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fast CLIP rewards for reinforcement learning (VLM-RM).",
    )
    parser.add_argument("--version", action="version", version=_version_line())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_score_parser(subparsers)
    add_export_parser(subparsers)
    add_bench_parser(subparsers)
    add_train_parser(subparsers)
    return parser


# --------------------------------------------------------------------------- entry point


OUT_OF_MEMORY_FIX = {
    "score": "out of GPU memory; lower --batch-size or use a smaller --model",
    "bench": "out of GPU memory; leave out the largest of --batch-sizes or --models",
    # train's --batch-size is SAC's minibatch: the reward model's memory is set by these.
    "train": "out of GPU memory; lower --reward-batch-size or use a smaller --model; deferred rewards keep "
             "a rollout's frames on the GPU (n_envs x train_freq of them): --reward-timing step, or fewer "
             "--n-envs or a smaller --train-freq",
    # export takes its model as MODEL: there is no --model to name.
    "export": "out of GPU memory; lower --max-batch-size or export a smaller MODEL",
}


def _refuse_unknown(parser: argparse.ArgumentParser, command: str, argv: List[str], unknown: List[str]) -> None:
    """Exit with a usage error for the ``unknown`` arguments, given by the command's parser (its usage and
    name) where they all follow the command; argparse's own gives the top level's usage, which names no option
    of the command."""
    # argparse has no public accessor for a command's parser: the subparsers action keeps them in ``choices``.
    (commands,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    after = argv[argv.index(command) + 1:]
    owner = commands[command] if all(arg in after for arg in unknown) else parser
    owner.error(f"unrecognized arguments: {' '.join(unknown)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            _refuse_unknown(parser, args.command, argv, unknown)
    except SystemExit as exc:  # --help and usage errors; return the code instead of exiting
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    # Imported after parsing, so that --help and usage errors do not wait for torch; every command
    # needs it next anyway.
    import torch

    from vlmrm_fast.models import PretrainedWeightsError

    try:
        with warnings.catch_warnings(), _library_messages_shown(args.command in SHOW_LIBRARY_MESSAGES):
            warnings.showwarning = _show_warning
            return args.handler(args)
    except StdoutClosed:  # the reader of stdout stopped (`score --out - | head`): quiet, as Unix tools are
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE  # the code a shell gives a tool SIGPIPE ended
    except torch.cuda.OutOfMemoryError:
        _print_error(OUT_OF_MEMORY_FIX.get(args.command, "out of GPU memory; use a smaller --model"))
    except (CLIError, ValueError, TypeError, OSError, PretrainedWeightsError) as exc:
        _print_error(str(exc))
    except KeyboardInterrupt as exc:  # Ctrl-C; or train's second SIGINT/SIGTERM, which names its signal
        signum = getattr(exc, "signum", None)
        _print_error(str(exc) if signum else "interrupted")
        return 128 + (signum or signal.SIGINT)  # the shell's codes: 130 for SIGINT, 143 for SIGTERM
    return 2


def _stdout_to_devnull() -> None:
    """Point stdout's file descriptor at /dev/null, so that Python's flush of stdout at exit does not fail on
    the closed pipe again (and print "Exception ignored ... BrokenPipeError")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (captured by a test, or replaced)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


@contextlib.contextmanager
def _library_messages_shown(show: bool) -> Generator[None, None, None]:
    """While inside (where ``show``), the package's INFO messages, which announce its one-off builds (an
    ONNX export, a TensorRT engine), go to stderr as ``vlmrm-fast: <message>``."""
    if not show:
        yield
        return
    logger = logging.getLogger("vlmrm_fast")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a dependency may have configured the root logger: one line each, ours
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _print_error(message: str) -> None:
    """Print ``vlmrm-fast: error: <message>`` to stderr."""
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Optional[TextIO] = None,
    line: Optional[str] = None,
) -> None:
    """Show a warning as one line, ``vlmrm-fast: warning: <message>``, without source lines."""
    print(f"{PROG}: warning: {message}", file=file or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
