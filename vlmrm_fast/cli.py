"""The ``vlmrm-fast`` command-line tool.

Commands
--------
``vlmrm-fast score PATH --goal TEXT``
    Score every frame of a video file, a GIF, an image, or a folder of images with a CLIP
    reward and write the per-frame rewards as CSV (and, with ``--plot``, a PNG). Defined here.
``vlmrm-fast export MODEL``
    The vision tower as ONNX or a TensorRT engine (vlmrm_fast/export.py).
``vlmrm-fast bench``
    Frames/s per stage against the seed's pipeline (vlmrm_fast/profiler/).
``vlmrm-fast train``
    SAC on the VLM reward (vlmrm_fast/train/run.py).

Adding a command: write ``add_<name>_parser(subparsers)`` that registers its options and sets
``handler=`` to a function ``(args) -> int``, then call it from :func:`build_parser`. :func:`main` turns the expected error types into a one-line message
and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import logging
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, TextIO, TypeVar

import numpy as np
from tqdm import tqdm

from vlmrm_fast.argtypes import BACKEND_NAMES, dtype_choice, in_cli_terms, output_file, positive_int, writable_file
from vlmrm_fast.atomic import save_figure_atomically, write_atomically
from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.export import add_export_parser
from vlmrm_fast.profiler import add_bench_parser
from vlmrm_fast.train.run import add_train_parser

if TYPE_CHECKING:
    import torch

PROG = "vlmrm-fast"
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
DTYPES = ("float32", "bfloat16", "float16")
VIDEO_STREAM = "0:V:0"  # the first video stream that is not cover art; the frames and their times agree
NO_PTS = -(2**63)  # ffmpeg's AV_NOPTS_VALUE, as framecrc prints a packet without a timestamp
SHOW_LIBRARY_MESSAGES = ("score", "train")  # bench reports build times in its table, and has a progress bar
CLI_EXTRA_HINT = "install the CLI extra: pip install 'vlmrm-fast[cli]'"

T = TypeVar("T")

#: One decoded frame: RGB uint8 array [H, W, 3] and the text for the CSV ``source`` column.
LabelledFrame = tuple[np.ndarray, str]


class CLIError(Exception):
    """A user-facing error; :func:`main` prints its message and exits with code 2."""


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
    _add_score_parser(subparsers)
    add_export_parser(subparsers)
    add_bench_parser(subparsers)
    add_train_parser(subparsers)
    return parser


def _add_score_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``score``: rewards for every frame of a clip or image folder."""
    epilog = textwrap.dedent(
        """\
        reward (VLM-RM): with x the frame's unit CLIP embedding, g the mean of the goal
        prompts' unit embeddings and u the unit direction from baseline to goal,
          reward = 1 - 0.5 * |M (x - g)|^2,   M = alpha * u u^T + (1 - alpha) * I.
        With alpha = 0 and one goal prompt this is the cosine similarity to the goal.

        outputs: CSV columns are frame (0-based), source (image file name; for videos the
        time in seconds from the first frame) and reward; a video gives one row per frame
        stored in it. By default the CSV goes next to the input: clip.mp4 ->
        clip.rewards.csv, folder frames/ -> frames.rewards.csv (beside the folder, so a
        second run does not pick up the outputs as frames).

        examples:
          vlmrm-fast score episode.mp4 --goal "a humanoid robot kneeling" --plot
          vlmrm-fast score frames/ --goal "a cartpole with the pole upright" \\
              --baseline "a cartpole" --alpha 0.5 --out rewards.csv --plot=rewards.png
        """
    )
    p = subparsers.add_parser(
        "score",
        help="score the frames of a video or image folder against a goal prompt",
        description="Score every frame of a video, GIF, image, or folder of images with a "
        "CLIP reward and write the per-frame rewards as CSV. Use it to try prompts on "
        "your own clips before training.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "path",
        metavar="PATH",
        type=Path,
        help=f"a video file ({', '.join(VIDEO_EXTENSIONS)}), a single image, or a folder of "
        f"images ({', '.join(IMAGE_EXTENSIONS)}; taken in natural order, so frame2 comes before "
        "frame10; other files, hidden files and *.rewards.png plots are ignored)",
    )
    prompts = p.add_argument_group("reward")
    prompts.add_argument(
        "--goal",
        action="append",
        required=True,
        metavar="TEXT",
        help="goal prompt describing the desired state; repeat to average several prompts "
        "into one goal embedding",
    )
    prompts.add_argument(
        "--baseline",
        action="append",
        metavar="TEXT",
        help="baseline prompt describing the environment in general (e.g. 'a humanoid "
        "robot'); repeat to average several. Only used when --alpha > 0",
    )
    prompts.add_argument(
        "--alpha",
        type=_unit_interval,
        default=0.0,
        help="baseline regularisation strength in [0, 1]: 0 ignores the baseline, 1 keeps "
        "only the goal-baseline direction (default: %(default)s)",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="open_clip model name, e.g. ViT-B-32, ViT-L-14, ViT-bigG-14 (default: %(default)s)",
    )
    model.add_argument(
        "--pretrained",
        default=DEFAULT_PRETRAINED,
        help="open_clip pretrained tag, a local checkpoint path, or 'none' for random "
        "weights (only useful for testing) (default: %(default)s)",
    )
    model.add_argument(
        "--preprocess",
        choices=("vlmrm", "openclip"),
        default="vlmrm",
        help="how frames are fitted to the model's input: 'vlmrm' squashes the whole frame "
        "to the input size without antialiasing (as the original VLM-RM code does); "
        "'openclip' applies open_clip's own eval transform as the model's config sets it "
        "(antialiased; shorter side and centre crop, or a squash; bicubic or bilinear) "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available, else cpu)",
    )
    model.add_argument(
        "--backend",
        choices=("auto", *BACKEND_NAMES),
        default="auto",
        help="how the vision tower runs: auto (the fastest verified on the device: onnxruntime on CPU when "
        "installed, which exports the tower once per run; else torch), torch, compile, onnxruntime, tensorrt "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--dtype",
        type=dtype_choice(("auto", *DTYPES)),
        default="auto",
        help="precision of the vision tower: auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16); prompts "
        "are always embedded in float32 (default: auto = bfloat16 on CUDA, float32 on CPU)",
    )
    io = p.add_argument_group("input and output")
    io.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="frames decoded and scored per step; lower it if you run out of memory "
        "(default: the reward model's, 256 on CUDA and 32 on CPU)",
    )
    io.add_argument(
        "--out",
        default=None,
        metavar="CSV",
        help="where to write the rewards CSV, a file or a folder (one that exists, or DIR/, made if missing) "
        "(default: next to PATH, clip.mp4 -> clip.rewards.csv, folder frames/ -> frames.rewards.csv)",
    )
    io.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="also plot reward over frames to a PNG (default file: beside the CSV, <name>.rewards.png). "
        "Put --plot after PATH or write --plot=FILE.png, so PATH is not taken as its value",
    )
    io.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bar (it is shown on a terminal for runs over a second)",
    )
    p.set_defaults(handler=_run_score)


def _unit_interval(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


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
    except torch.cuda.OutOfMemoryError:
        _print_error(OUT_OF_MEMORY_FIX.get(args.command, "out of GPU memory; use a smaller --model"))
    except (CLIError, ValueError, TypeError, OSError, PretrainedWeightsError) as exc:
        _print_error(str(exc))
    except KeyboardInterrupt as exc:  # Ctrl-C; or train's second SIGINT/SIGTERM, which names its signal
        signum = getattr(exc, "signum", None)
        _print_error(str(exc) if signum else "interrupted")
        return 128 + (signum or signal.SIGINT)  # the shell's codes: 130 for SIGINT, 143 for SIGTERM
    return 2


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


# --------------------------------------------------------------------------- score


def _run_score(args: argparse.Namespace) -> int:
    """``vlmrm-fast score``: score the frames, write CSV (and PNG), print a summary."""
    source = open_frames(args.path)
    csv_path = output_file(args.out, default_csv_path(args.path))  # a folder: the default name inside it
    plot_path = _plot_path(args.plot, csv_path)
    _check_outputs(args.path, source, [p for p in (csv_path, plot_path) if p is not None])
    from vlmrm_fast.reward import CLIPReward

    try:
        rm = CLIPReward.from_pretrained(
            args.model,
            None if args.pretrained.lower() == "none" else args.pretrained,
            goal=args.goal,
            baseline=args.baseline,
            alpha=args.alpha,
            device=args.device,
            dtype=None if args.dtype == "auto" else args.dtype,
            preprocess=args.preprocess,
            backend=args.backend,
            max_batch_size=args.batch_size,
        )
    except ValueError as error:  # a BackendError too: written for Python callers, name this command's flags instead
        raise CLIError(in_cli_terms(str(error), dtype_flag="--dtype", backend_flag="--backend",
                                    batch_flag="--batch-size")) from None
    if args.baseline and args.alpha == 0:
        print("note: --baseline is unused at --alpha 0 (the default: cosine similarity to the goal); give --alpha "
              "in (0, 1] to use it", file=sys.stderr)
    start = time.perf_counter()
    rewards, labels = score_frames(rm, source, rm.max_batch_size, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    written = [write_csv(csv_path, rewards, labels)]
    if plot_path is not None:
        written.append(write_plot(plot_path, rewards, args.goal, args.baseline, args.alpha))
    print(_summary(rewards, elapsed, written))
    return 0


def _check_outputs(path: Path, source, outputs: Sequence[Path]) -> None:
    """Refuse, before any model loads or frame is scored, an output that is one of the inputs or the
    other output (it would be replaced) or a folder, and one whose folder cannot be written."""
    inputs = {p.resolve() for p in getattr(source, "files", [path])}
    for out in outputs:
        if out.resolve() in inputs:
            raise CLIError(f"'{out}' is an input of this run; writing the results there would replace it: "
                           "pass another --out/--plot")
        writable_file(out, "--out/--plot")
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise CLIError(f"--out and --plot both name '{outputs[0]}'; the plot would replace the CSV: "
                       "give them different names")


def default_csv_path(path: Path) -> Path:
    """Where the CSV goes without ``--out``: beside the input, named after it.

    ``clip.mp4 -> clip.rewards.csv``; a folder ``frames/ -> frames.rewards.csv`` beside the
    folder rather than inside it, so a later run on the folder does not see our outputs.
    """
    if path.is_dir():
        folder = path if path.name not in ("", "..") else path.resolve()
        return folder.parent / f"{folder.name or 'frames'}.rewards.csv"
    return path.with_suffix(".rewards.csv")


def _plot_path(plot: Optional[str], csv_path: Path) -> Optional[Path]:
    """Resolve ``--plot``: absent -> None, bare -> next to the CSV as ``<name>.rewards.png`` (a name a
    later run over a folder holding it skips), else the given PNG path."""
    if plot is None:
        return None
    if plot == "":
        stem = csv_path.name[: -len(".csv")] if csv_path.name.endswith(".csv") else csv_path.name
        return csv_path.with_name(stem + ".png" if stem.endswith(".rewards") else stem + ".rewards.png")
    path = Path(plot)
    if path.suffix.lower() != ".png":
        raise CLIError(f"--plot expects a .png file name, got '{plot}'; write --plot=FILE.png")
    return path


def score_frames(
    rm: Callable[[np.ndarray], torch.Tensor],
    frames: Iterable[LabelledFrame],
    batch_size: int,
    progress: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """Score ``frames`` in batches of equal-sized consecutive frames.

    Decoding runs in a background thread so that it overlaps with scoring. Returns the
    float32 rewards [N] and the source label of each frame.
    """
    total = getattr(frames, "total", None)
    chunks: list[np.ndarray] = []
    labels: list[str] = []
    with tqdm(
        total=total, unit="frame", desc="scoring", delay=1.0, disable=None if progress else True
    ) as bar:
        for batch, names in _prefetch(batched(frames, batch_size)):
            chunks.append(rm(batch).detach().float().cpu().numpy())
            labels.extend(names)
            bar.update(len(names))
    return np.concatenate(chunks), labels


def batched(
    frames: Iterable[LabelledFrame], batch_size: int
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Group consecutive frames of the same shape into uint8 batches [B, H, W, 3]."""
    buffer: list[np.ndarray] = []
    names: list[str] = []
    for frame, name in frames:
        if buffer and (len(buffer) == batch_size or frame.shape != buffer[0].shape):
            yield np.stack(buffer), names
            buffer, names = [], []
        buffer.append(frame)
        names.append(name)
    if buffer:
        yield np.stack(buffer), names


_DONE = object()


def _prefetch(items: Generator[T, None, None], depth: int = 2) -> Iterator[T]:
    """Yield from ``items``, producing up to ``depth`` items ahead in a daemon thread.

    Exceptions raised while producing are re-raised in the consumer.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            with contextlib.closing(items):  # stops an ffmpeg reader when we stop early
                for item in items:
                    if stop.is_set():
                        return
                    slots.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            slots.put(exc)
        else:
            slots.put(_DONE)

    worker = threading.Thread(target=produce, name="vlmrm-fast-decode", daemon=True)
    worker.start()
    try:
        while (item := slots.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            slots.get_nowait()  # unblock a producer waiting on a full queue


def write_csv(path: Path, rewards: np.ndarray, labels: Sequence[str]) -> Path:
    """Write ``frame,source,reward`` rows; rewards at float32 round-trip precision. Atomically: a
    crash never leaves a truncated file where an earlier run's CSV was."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["frame", "source", "reward"])
    for index, (label, reward) in enumerate(zip(labels, rewards)):
        writer.writerow([index, label, f"{float(reward):.9g}"])
    return write_atomically(path, text.getvalue().encode())


def write_plot(
    path: Path,
    rewards: np.ndarray,
    goal: Sequence[str],
    baseline: Optional[Sequence[str]],
    alpha: float,
) -> Path:
    """Plot reward over frames to a PNG, titled with the prompts."""
    figure_module = _require("matplotlib.figure", "matplotlib")
    figure = figure_module.Figure(figsize=(8, 4), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(np.arange(len(rewards)), rewards, linewidth=1.2, marker="." if len(rewards) <= 200 else None)
    ax.set_xlabel("frame")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    title = "goal: " + _quote_prompts(goal)
    if baseline and alpha > 0:
        title += f"\nbaseline: {_quote_prompts(baseline)}, alpha = {alpha:g}"
    ax.set_title(title, fontsize=10)
    return save_figure_atomically(figure, path)


def _quote_prompts(prompts: Sequence[str], width: int = 90) -> str:
    """Quote prompts for a plot title, shortened to ``width`` characters."""
    text = " + ".join(f'"{p}"' for p in prompts)
    return textwrap.shorten(text, width=width, placeholder=" ...")


def _summary(rewards: np.ndarray, elapsed: float, written: Sequence[Path]) -> str:
    """One line: frame count, reward statistics, throughput, output files."""
    n = len(rewards)
    rate = n / elapsed if elapsed > 0 else float("inf")
    return (
        f"scored {n} frame{'' if n == 1 else 's'} in {elapsed:.2f} s ({rate:.1f} frames/s): reward mean "
        f"{np.mean(rewards):.4f}, min {np.min(rewards):.4f}, max {np.max(rewards):.4f}; "
        f"wrote {', '.join(str(p) for p in written)}"
    )


# --------------------------------------------------------------------------- reading frames


def open_frames(path: Path) -> ImageFiles | VideoFile:
    """Open ``path`` as a frame source, checking it before any model is loaded."""
    if not path.exists():
        raise CLIError(f"'{path}' does not exist; give a video file or a folder of images")
    if path.is_dir():
        return ImageFiles(list_images(path))
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return ImageFiles([path])
    if suffix in VIDEO_EXTENSIONS:
        return VideoFile.open(path)
    raise CLIError(
        f"'{path}' has an unsupported file type '{path.suffix}'; give a video "
        f"({', '.join(VIDEO_EXTENSIONS)}), an image or a folder of images "
        f"({', '.join(IMAGE_EXTENSIONS)}), or convert it, e.g. ffmpeg -i '{path}' clip.mp4"
    )


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, in natural order.

    Hidden files (such as macOS ``._frame1.png`` companions) and our own ``*.rewards.png``
    plots are skipped.
    """
    images = [p for p in folder.iterdir() if _is_frame_file(p)]
    if not images:
        raise CLIError(
            f"no images found in folder '{folder}' (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "point PATH at a folder of frames or at a video file"
        )
    return sorted(images, key=natural_key)


def _is_frame_file(path: Path) -> bool:
    """Whether a folder entry is an input frame (see :func:`list_images`)."""
    name = path.name.lower()
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS
        and not name.startswith(".")
        and not name.endswith(".rewards.png")
        and path.is_file()
    )


def natural_key(path: Path) -> tuple:
    """Sort key that orders embedded numbers by value: frame2 < frame10.

    ``re.split`` with a capturing group alternates text and digits, so keys compare
    str with str and int with int at every position. Names equal by that measure (frame1 and
    frame01, Frame1 and frame1) are ordered by their plain names, not by the directory listing.
    """
    parts = re.split(r"(\d+)", path.name)
    return tuple(int(part) if i % 2 else part.casefold() for i, part in enumerate(parts)), path.name


@dataclass
class ImageFiles:
    """Frames from image files, each converted to RGB uint8; labelled by file name."""

    files: list[Path]

    @property
    def total(self) -> int:
        """Number of frames."""
        return len(self.files)

    def __iter__(self) -> Iterator[LabelledFrame]:
        for file in self.files:
            yield read_image(file), file.name


def read_image(path: Path) -> np.ndarray:
    """Read one image as RGB uint8 [H, W, 3], upright as viewers show it (EXIF orientation applied, as
    videos get their rotation), alpha dropped, greyscale expanded, 16-bit greyscale reduced to its
    high byte; 32-bit integer and float images are refused: their range is unknown."""
    image_module = _require("PIL.Image", "pillow")
    image_ops = _require("PIL.ImageOps", "pillow")
    try:
        with image_module.open(path) as opened:
            image = image_ops.exif_transpose(opened)
            if image.mode.startswith("I;16"):  # PIL's convert("RGB") would clip every value above 255
                grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            if image.mode in ("I", "F"):
                raise CLIError(
                    f"image '{path}' is {'32-bit integer' if image.mode == 'I' else 'floating point'} greyscale "
                    "(PIL mode " + image.mode + "), whose range is unknown; save it as 8-bit RGB (or 16-bit) first"
                )
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise CLIError(
            f"cannot read image '{path}' ({exc}); re-export it, or remove it from the folder"
        ) from None


@dataclass
class VideoFile:
    """Frames decoded by ffmpeg (imageio-ffmpeg), streamed: one per frame stored in the file (no frames
    repeated or dropped to reach a constant rate, which ffmpeg's default does to a GIF whose frames
    have different durations); labelled by presentation time."""

    path: Path
    fps: Optional[float]
    size: tuple[int, int]  # (width, height) of the decoded frames
    total: Optional[int]
    #: Seconds from the first frame, one per stored frame in display order, from the container's
    #: timestamps; None where they could not be read (the labels are then frame / fps).
    timestamps: Optional[list[float]] = None

    @classmethod
    def open(cls, path: Path) -> VideoFile:
        """Probe the video (size, fps, frame timestamps) so that a bad file fails early."""
        ffmpeg = _require("imageio_ffmpeg", "imageio-ffmpeg")
        with contextlib.closing(_read_frames(ffmpeg, path)) as reader:
            meta = _next_frame(reader, path)
        fps = meta.get("fps") or None
        timestamps = _frame_timestamps(ffmpeg, path)
        if timestamps is not None:
            total = len(timestamps)
        else:
            duration = meta.get("duration")
            total = round(fps * duration) if fps and duration else None
        return cls(path, fps, tuple(meta["size"]), total, timestamps)

    def __iter__(self) -> Iterator[LabelledFrame]:
        ffmpeg = _require("imageio_ffmpeg", "imageio-ffmpeg")
        width, height = self.size
        with contextlib.closing(_read_frames(ffmpeg, self.path)) as reader:
            _next_frame(reader, self.path)  # the metadata dict
            index = 0
            while (raw := _next_frame(reader, self.path, None)) is not None:
                frame = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
                yield frame, self._label(index)
                index += 1
        if index == 0:
            raise CLIError(f"no frames could be decoded from '{self.path}'; check that it plays")
        if self.timestamps is not None and index != len(self.timestamps):
            warnings.warn(
                f"ffmpeg decoded {index} frames from '{self.path}' but its container lists "
                f"{len(self.timestamps)}, so the times in the source column may be off; re-encode it "
                f"for exact ones: ffmpeg -i '{self.path}' -c:v libx264 fixed.mp4",
                stacklevel=stacklevel_outside_package(),
            )

    def _label(self, index: int) -> str:
        """The ``source`` column of frame ``index``: its time in seconds, or '' where unknown."""
        if self.timestamps is not None and index < len(self.timestamps):
            return f"{self.timestamps[index]:.4f}"
        return f"{index / self.fps:.4f}" if self.fps else ""


def _read_frames(ffmpeg, path: Path) -> Iterator:
    """imageio-ffmpeg's frame generator: a metadata dict, then raw RGB24 frames, one per stored frame."""
    options = ["-map", VIDEO_STREAM, *_passthrough_option(ffmpeg)]
    return ffmpeg.read_frames(str(path), pix_fmt="rgb24", output_params=options)


def _next_frame(reader: Iterator, path: Path, *default):
    """``next(reader)``, turning ffmpeg failures into a short :class:`CLIError`."""
    try:
        return next(reader, *default)
    except (OSError, RuntimeError) as exc:
        if "matches no streams" in str(exc):
            raise CLIError(f"'{path}' has no video stream (only audio or cover art?); give a video") from None
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(exc).__name__
        raise CLIError(
            f"cannot read video '{path}' (ffmpeg: {reason}); check that it plays, or "
            f"re-encode it: ffmpeg -i '{path}' -c:v libx264 fixed.mp4"
        ) from None


def _passthrough_option(ffmpeg) -> list[str]:
    """ffmpeg's option to pass frames through at their own times (ffmpeg 5.1 renamed ``-vsync``
    to ``-fps_mode``, and 8 removed the old name)."""
    version = ffmpeg.get_ffmpeg_version()
    match = re.match(r"n?(\d+)\.(\d+)", version)
    if match is not None and (int(match[1]), int(match[2])) < (5, 1):
        return ["-vsync", "passthrough"]
    return ["-fps_mode", "passthrough"]  # 5.1 or newer, or a development build ("N-...")


DISCARD_FLAG = 0x4
"""AV_PKT_FLAG_DISCARD, in framecrc's ``F=0x..`` field: a packet the decoder drops."""


def _frame_timestamps(ffmpeg, path: Path) -> Optional[list[float]]:
    """Presentation times of the first video stream's frames (cover art aside), in seconds from the first, sorted.

    Read from the packets of a stream copy (no decoding) in ffmpeg's framecrc format: a ``#tb 0:
    NUM/DEN`` header, then ``stream, dts, pts, duration, size, hash`` per packet, and ``F=0x..`` where
    a packet has flags. Packets flagged discard (before an edit list's start, as a stream-copied trim
    leaves them) are never decoded, so they have no frame. None where ffmpeg fails or a packet has no
    timestamp.
    """
    command = [ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path),
               "-map", VIDEO_STREAM, "-c", "copy", "-f", "framecrc", "-"]
    try:
        listing = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    timebase, pts = None, []
    for line in listing.splitlines():
        if line.startswith("#tb 0:"):
            num, den = line.split(":", 1)[1].strip().split("/")
            timebase = int(num) / int(den)
        elif line and not line.startswith("#"):
            fields = [field.strip() for field in line.split(",")]
            flags = next((field[2:] for field in fields[6:] if field.startswith("F=")), "0")
            if int(flags, 16) & DISCARD_FLAG:
                continue
            if len(fields) < 3 or not fields[2].lstrip("-").isdigit() or int(fields[2]) == NO_PTS:
                return None
            pts.append(int(fields[2]))
    if timebase is None or not pts:
        return None
    first = min(pts)
    return [(value - first) * timebase for value in sorted(pts)]


def _require(module: str, package: str):
    """Import an optional dependency of the CLI, or fail with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CLIError(f"'{package}' is needed to read frames and plot; {CLI_EXTRA_HINT}") from None


if __name__ == "__main__":
    sys.exit(main())
