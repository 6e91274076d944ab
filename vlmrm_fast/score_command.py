"""``vlmrm-fast score PATH --goal TEXT``: the reward of every frame of a video, a GIF, an image or a folder of
images, written as CSV (and, with ``--plot``, a PNG). The command's parser, its run, and its outputs;
the frames are read by :mod:`vlmrm_fast.frame_files`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import queue
import sys
import textwrap
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple, TypeVar

import numpy as np
from tqdm import tqdm

from vlmrm_fast.argtypes import (BACKEND_NAMES, CLIError, dtype_choice, in_cli_terms, output_file, positive_int,
                                 require_cli_extra, stdout_may_close, writable_file)
from vlmrm_fast.atomic import save_figure_atomically, write_atomically
from vlmrm_fast.frame_files import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, LabelledFrame, open_frames, printable_name

if TYPE_CHECKING:
    import torch

STDOUT = "-"
"""``--out -``: the CSV to standard output, as Unix tools take it."""
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
DTYPES = ("float32", "bfloat16", "float16")

T = TypeVar("T")


def add_score_parser(subparsers: argparse._SubParsersAction) -> None:
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
        help="where to write the rewards CSV, a file or a folder (one that exists, or DIR/, made if missing), "
        "or - for standard output (the summary then goes to standard error) "
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


def _run_score(args: argparse.Namespace) -> int:
    """``vlmrm-fast score``: score the frames, write CSV (and PNG), print a summary."""
    source = open_frames(args.path)
    to_stdout = args.out == STDOUT
    if to_stdout and args.plot == "":
        raise CLIError("--plot without a file name goes beside the CSV, which --out - sends to standard output: "
                       "give it one, --plot=FILE.png")
    # a folder: the default name inside it
    csv_path = None if to_stdout else output_file(args.out, default_csv_path(args.path))
    if csv_path is not None:
        _refuse_a_media_name(csv_path)
    plot_path = _plot_path(args.plot, csv_path or Path())
    _check_outputs(args.path, source, [p for p in (csv_path, plot_path) if p is not None])
    if plot_path is not None:
        _refuse_a_plot_among_the_frames(args.path, plot_path)
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
    first_call = _FirstCallTimer(rm)
    start = time.perf_counter()
    rewards, labels = score_frames(first_call, source, rm.max_batch_size, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    warm_up = first_call.timing(full_batch=rm.max_batch_size)
    if csv_path is None:
        with stdout_may_close():
            sys.stdout.write(csv_text(rewards, labels, line_end="\n"))
            sys.stdout.flush()
    written: List[object] = ["the CSV to standard output"] if csv_path is None else [write_csv(csv_path, rewards, labels)]
    if plot_path is not None:
        weights = ("random weights" if args.pretrained.lower() == "none" else Path(args.pretrained).name
                   if os.sep in args.pretrained else args.pretrained)  # a checkpoint by its file name
        scored = printable_name(f"{args.path.name or args.path} by {args.model}, {weights}")  # matplotlib refuses surrogates
        written.append(write_plot(plot_path, rewards, args.goal, args.baseline, args.alpha, scored))
    with stdout_may_close():
        print(_summary(rewards, elapsed, written, warm_up), file=sys.stderr if to_stdout else sys.stdout, flush=True)
    return 0


class _FirstCallTimer:
    """``rm`` that times its first call apart (where torch.compile compiles, Triton kernels build and the
    backend warms up), so that the summary does not pass that off as the scoring rate."""

    def __init__(self, rm: Callable[[np.ndarray], torch.Tensor]) -> None:
        self._rm = rm
        self._first: Optional[Tuple[int, float]] = None

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        if self._first is not None:
            return self._rm(frames)
        start = time.perf_counter()
        rewards = self._rm(frames)
        rewards = rewards.detach().float().cpu()  # what score_frames does next: the call's work is done here
        self._first = (len(frames), time.perf_counter() - start)
        return rewards

    def timing(self, full_batch: int) -> Optional[Tuple[int, float]]:
        """(frames, seconds) of the first call where it had ``full_batch`` frames; None before it, or where it
        was cut short (a folder whose first image has another size: its rate is no measure of a warm-up)."""
        return self._first if self._first is not None and self._first[0] == full_batch else None


OTHER_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".svg", ".pdf")
"""Suffixes of pictures (or a plot's formats) that ``score`` does not read, which a CSV is no more."""


def _refuse_a_media_name(csv_path: Path) -> None:
    """Refuse an ``--out`` named as an image or video (``--out r.png``): the CSV written there would pass for one
    (a viewer that cannot open it, a later ``score`` over the folder reading it as a frame)."""
    suffix = csv_path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS and suffix != ".gif":
        kind = "a video"
    elif suffix in IMAGE_EXTENSIONS or suffix in OTHER_IMAGE_EXTENSIONS:
        kind = "an image"
    else:
        return
    plot = f", and --plot={csv_path} for the plot of the rewards" if suffix == ".png" else ""
    raise CLIError(f"--out '{csv_path}' names {kind} ({suffix}), but --out is the rewards CSV: pass --out "
                   f"{csv_path.with_suffix('.csv')}{plot}")


def _check_outputs(path: Path, source, outputs: Sequence[Path]) -> None:
    """Refuse, before any model loads or frame is scored, an output that is one of the inputs or the
    other output (it would be replaced) or a folder, and one whose folder cannot be written."""
    inputs = {p.resolve() for p in getattr(source, "files", [path])}
    for out in outputs:
        writable_file(out, "--out/--plot")  # first: it names a loop of links, where resolve() raises RuntimeError (< 3.13)
        if out.resolve() in inputs:
            raise CLIError(f"'{out}' is an input of this run; writing the results there would replace it: "
                           "pass another --out/--plot")
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise CLIError(f"--out and --plot both name '{outputs[0]}'; the plot would replace the CSV: "
                       "give them different names")


def _refuse_a_plot_among_the_frames(path: Path, plot_path: Path) -> None:
    """Refuse a ``--plot`` written into the folder being scored under a name a later run reads as a frame (any
    PNG but ``*.rewards.png``): that run would score the plot too, and say nothing of it."""
    if not path.is_dir() or plot_path.name.lower().endswith(".rewards.png"):
        return
    if plot_path.resolve().parent == path.resolve():
        skipped = plot_path.with_name(plot_path.name[: -len(plot_path.suffix)] + ".rewards.png")
        raise CLIError(f"--plot '{plot_path}' is in the folder being scored, where a later score of it would read the "
                       f"plot as a frame: name it {skipped} (skipped as a frame), or write it elsewhere")


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
) -> Generator[tuple[np.ndarray, list[str]], None, None]:
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

    def put(item: object) -> None:
        # A consumer that stopped early takes nothing more: a plain put into the full queue (the last item's,
        # or _DONE's) would block for good, keeping this thread and the decoded batches in it.
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return
            except queue.Full:
                pass

    def produce() -> None:
        try:
            with contextlib.closing(items):  # stops an ffmpeg reader when we stop early
                for item in items:
                    if stop.is_set():
                        return
                    put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)
        else:
            put(_DONE)

    worker = threading.Thread(target=produce, name="vlmrm-fast-decode", daemon=True)
    worker.start()
    try:
        while (item := slots.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the producer's next put, or the one it waits in, returns


def csv_text(rewards: np.ndarray, labels: Sequence[str], line_end: str = "\r\n") -> str:
    """``frame,source,reward`` rows; rewards at float32 round-trip precision. Lines end as ``line_end``: the
    CSV standard's CRLF in files, "\\n" for a pipe (``cut`` and ``awk`` would keep the CR)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator=line_end)
    writer.writerow(["frame", "source", "reward"])
    for index, (label, reward) in enumerate(zip(labels, rewards)):
        writer.writerow([index, label, f"{float(reward):.9g}"])
    return text.getvalue()


def write_csv(path: Path, rewards: np.ndarray, labels: Sequence[str]) -> Path:
    """Write :func:`csv_text` to ``path``. Atomically: a crash never leaves a truncated file where an earlier
    run's CSV was."""
    return write_atomically(path, csv_text(rewards, labels).encode())


def write_plot(
    path: Path,
    rewards: np.ndarray,
    goal: Sequence[str],
    baseline: Optional[Sequence[str]],
    alpha: float,
    scored: str = "",
) -> Path:
    """Plot reward over frames to a PNG, titled with the prompts and ``scored`` (what was scored, by which
    model: e.g. "clip.mp4 by ViT-B-32, laion2b_s34b_b79k")."""
    figure_module = require_cli_extra("matplotlib.figure", "matplotlib")
    figure = figure_module.Figure(figsize=(8, 4), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(np.arange(len(rewards)), rewards, linewidth=1.2, marker="." if len(rewards) <= 200 else None)
    ax.set_xlabel("frame")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    title = "goal: " + _quote_prompts(goal)
    if baseline and alpha > 0:
        title += f"\nbaseline: {_quote_prompts(baseline)}, alpha = {alpha:g}"
    if scored:  # cut by characters: textwrap.shorten drops a word (a path) longer than the width whole
        title += "\n" + (scored if len(scored) <= 100 else scored[:97] + "...")
    ax.set_title(title, fontsize=10)
    return save_figure_atomically(figure, path)


def _quote_prompts(prompts: Sequence[str], width: int = 90) -> str:
    """Quote prompts for a plot title, shortened to ``width`` characters."""
    text = " + ".join(f'"{p}"' for p in prompts)
    return textwrap.shorten(text, width=width, placeholder=" ...")


#: A first call this many times slower per frame than the rest is a warm-up (a compile, a kernel build): the
#: summary gives the rate after it.
WARM_UP_FACTOR = 3.0


def _summary(rewards: np.ndarray, elapsed: float, written: Sequence[object],
             first_call: Optional[Tuple[int, float]] = None) -> str:
    """One line: frame count, reward statistics, throughput (and the rate after the first call, where that
    call was a warm-up, ``first_call`` its (frames, seconds)), outputs (files, or where else they went)."""
    n = len(rewards)
    rate = n / elapsed if elapsed > 0 else float("inf")
    rates = f"{rate:.1f} frames/s"
    if first_call is not None and n > first_call[0] and elapsed > first_call[1] > 0:
        (warm_frames, warm_s), rest = first_call, (n - first_call[0], elapsed - first_call[1])
        if warm_s / warm_frames > WARM_UP_FACTOR * rest[1] / rest[0]:
            rates += (f"; the first batch took {warm_s:.2f} s (compiling, building kernels, warming up), then "
                      f"{rest[0] / rest[1]:.1f} frames/s")
    return (
        f"scored {n} frame{'' if n == 1 else 's'} in {elapsed:.2f} s ({rates}): reward mean "
        f"{np.mean(rewards):.4f}, min {np.min(rewards):.4f}, max {np.max(rewards):.4f}; "
        f"wrote {', '.join(map(str, written))}"
    )
