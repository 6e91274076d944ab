"""Result rows, targets, and the outputs: markdown table, JSON, PNG plot, and the run's environment."""
from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import textwrap
import time
from dataclasses import asdict, dataclass, field
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, TypedDict, cast

import torch

from vlmrm_fast import __version__ as vlmrm_fast_version
from vlmrm_fast.atomic import save_figure_atomically, write_atomically
from vlmrm_fast.ops._triton import interpreter_enabled
from vlmrm_fast.profiler.kernels import TowerProfile, markdown_kernel_profiles, three_digits
from vlmrm_fast.profiler.seed import SEED, SEED_CUDA_DTYPE, SEED_FRAME_SIZE
from vlmrm_fast.profiler.timing import MIN_REPEATS, SWITCH_PAUSE_S, StageTiming
from vlmrm_fast.run_info import command_output, cpu_name, git_commit, library_versions

if TYPE_CHECKING:
    from vlmrm_fast.profiler.run import BenchConfig

CLI_EXTRA = "pip install 'vlmrm-fast[cli]'"
GPU_FPS_TARGETS = {"ViT-B-32": 50_000.0, "ViT-L-14": 3_900.0, "ViT-bigG-14": 650.0}
"""End-to-end frames/s on the GPU in bf16, from uint8 frames already on the GPU."""
GPU_SPEEDUP_TARGETS = {"ViT-bigG-14": 3.0}
CPU_SPEEDUP_TARGETS = {"ViT-B-32": 1.5}
REWARD_CHECK_FRAMES = 8
"""Frames whose rewards every configuration is checked on, against the float32 eager path."""


# --------------------------------------------------------------------------- results


class StageTimings(TypedDict, total=False):
    """A row's timing of each stage: ``h2d`` None where the frames are not uploaded (CPU), ``seed_end_to_end``
    only where end to end was timed in alternation with the seed."""

    h2d: Optional[StageTiming]
    preprocess: StageTiming
    tower: StageTiming
    score: StageTiming
    end_to_end: StageTiming
    seed_end_to_end: StageTiming


@dataclass
class Row:
    """One (model, backend, dtype, kernels, batch): frames/s per stage, the seed's, and the tower's FLOP rate.

    The seed pipeline's rows have ``backend == "seed"`` and ``frame_size == 480``. In the other rows
    ``seed_fps`` is the seed's end to end timed in alternation with the row's own (``timings`` keeps
    both), and ``speedup_vs_seed = end_to_end_fps / seed_fps``.
    """

    model: str
    backend: str
    dtype: str
    kernels: str
    batch: int
    frame_size: int
    h2d_fps: Optional[float]
    preprocess_fps: float
    tower_fps: float
    score_fps: float
    end_to_end_fps: float
    tower_gflops: float
    flops_method: str
    achieved_tflops: float
    peak_tflops: Optional[float]
    frac_of_peak: Optional[float]
    build_seconds: float
    setup_seconds: float
    seed_fps: Optional[float] = None
    speedup_vs_seed: Optional[float] = None
    reward_error: Optional[float] = None
    """max |r - r_fp32| over the run's first frames, r_fp32 from the float32 eager path (not for the seed)."""
    build_cached: Optional[bool] = None
    """Whether the build found its work in a cache on disk (torch.compile's graphs, a TensorRT engine): then
    ``build_seconds`` is no first build's time. None where the backend has no such cache."""
    fast_paths_off: List[str] = field(default_factory=list)
    """The tower's fast paths that had failed and turned themselves off (:mod:`vlmrm_fast.backends.fast_path`)
    and whose stand-ins answered calls of this row: it timed, in part or whole, those slower ops."""
    timings: StageTimings = field(default_factory=StageTimings)


@dataclass
class Report:
    """Everything a run produced, as written to bench.json."""

    environment: Dict[str, Any]
    config: Dict[str, Any]
    peak_tflops: Dict[str, float] = field(default_factory=dict)
    peak_samples: Dict[str, List[float]] = field(default_factory=dict)
    peak_sizes: Dict[str, int] = field(default_factory=dict)
    models: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    rows: List[Row] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    failures: List[Dict[str, Any]] = field(default_factory=list)
    targets: List[Dict[str, Any]] = field(default_factory=list)
    kernel_profiles: List[TowerProfile] = field(default_factory=list)
    fast_paths_off: Dict[str, str] = field(default_factory=dict)
    """The tower's fast paths that failed in this run: name -> first error (rows' ``fast_paths_off``)."""
    complete: bool = False
    elapsed_seconds: float = 0.0

    def add_peak(self, dtype: str, tflops: float, size: int) -> None:
        """Record one matmul measurement; the peak is the best of them (other load only lowers one), and
        ``peak_sizes`` the size of that best one: a measurement's size can differ from the last one's (it
        stops doubling once a product takes over ``PEAK_CALL_S``: CPU fp16, 2.5x faster at 512 than at 1024
        here, lands on either with load)."""
        samples = self.peak_samples.setdefault(dtype, [])
        samples.append(tflops)
        if tflops >= max(samples):
            self.peak_sizes[dtype] = size
        self.peak_tflops[dtype] = max(samples)

    def set_peaks(self) -> None:
        """Set every row's peak and fraction of it from the best matmul measurements so far."""
        for row in self.rows:
            row.peak_tflops = self.peak_tflops.get(peak_dtype(row.dtype))
            row.frac_of_peak = row.achieved_tflops / row.peak_tflops if row.peak_tflops else None
        for profile in self.kernel_profiles:
            profile.peak_tflops = self.peak_tflops.get(peak_dtype(profile.dtype))


def _stage_row(
    *, model: str, backend: str, dtype: str, kernels: str, batch: int, frame_size: int,
    timings: StageTimings, gflops: float, flops_method: str,
    build_seconds: float, setup_seconds: float, build_cached: Optional[bool] = None,
) -> Row:
    """A row from its stage timings; the peak fraction is filled in by :meth:`Report.set_peaks`."""
    def rate(timing: StageTiming) -> float:
        return batch / timing.median_s

    h2d, tower_fps = timings["h2d"], rate(timings["tower"])
    return Row(
        model=model, backend=backend, dtype=dtype, kernels=kernels, batch=batch, frame_size=frame_size,
        h2d_fps=None if h2d is None else rate(h2d), preprocess_fps=rate(timings["preprocess"]), tower_fps=tower_fps,
        score_fps=rate(timings["score"]), end_to_end_fps=rate(timings["end_to_end"]), tower_gflops=gflops,
        flops_method=flops_method, achieved_tflops=gflops * tower_fps / 1e3, peak_tflops=None,
        frac_of_peak=None, build_seconds=build_seconds, setup_seconds=setup_seconds, build_cached=build_cached,
        timings=timings,
    )


def peak_dtype(row_dtype: str) -> str:
    """The matmul precision a row's tower runs in (the seed on CUDA: fp16 under autocast)."""
    return "fp16" if row_dtype == SEED_CUDA_DTYPE else row_dtype


# --------------------------------------------------------------------------- targets and outputs


BUSY_LOAD = 1.5
"""Load average per CPU over which a machine counts as busy where the CPU time of other processes cannot be
read (:func:`machine_was_busy`). The run's own threads count: the committed runs on an idle 2-core machine
ended at 1.7-1.9; the busy one seen was 3.9-4.6."""

OTHER_CPU_BUSY = 0.25
"""Share of the CPUs' time that other processes (and a hypervisor, as stolen time) took during the run over
which the machine counts as busy (:func:`machine_was_busy`). One process spinning on one core of two is 0.5;
an idle machine a few hundredths. The load average missed that one process: 2.1-2.4 on 2 CPUs, under
:data:`BUSY_LOAD`, while ViT-B-32's ratio to the seed read 8.65x (1.51x idle)."""


def machine_was_busy(environment: Dict[str, Any]) -> bool:
    """Whether other work competed for the cores during the run: other processes took more than
    :data:`OTHER_CPU_BUSY` of the CPUs' time (``other_cpu_share``, where /proc/stat has it), else the load
    average at the start or the end exceeded :data:`BUSY_LOAD` per CPU. Load slows eager torch (the seed) far
    more than ONNX Runtime, so a ratio to the seed rises, and its two seed figures, slowed alike, do not show it
    (a loaded 2-core machine gave ViT-B-32 10.3x against 1.56x idle)."""
    share = environment.get("other_cpu_share")
    if share is not None:
        return share > OTHER_CPU_BUSY
    cpus = environment.get("cpu_count")
    loads = [environment.get("load_average_start"), environment.get("load_average_end")]
    return bool(cpus and any(load is not None and load > BUSY_LOAD * cpus for load in loads))


def cpu_times() -> Optional[List[float]]:
    """[CPU seconds the whole machine spent busy (time stolen by a hypervisor included), CPU seconds of this
    process (all its threads) and of its children that have ended and been waited for (a benchmark's worker
    processes are its own work, not other work; children still running, such as inductor's compile workers,
    count as other processes), seconds of a monotonic clock], for :func:`other_cpu_share`; None where
    /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal
        per_second = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    if not fields or fields[0] != "cpu" or len(ticks) < 5:
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # less idle and iowait (guest time is inside user already)
    import resource  # Unix only, as /proc/stat; its microseconds, as process_time's, where os.times counts ticks

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = time.process_time() + children.ru_utime + children.ru_stime
    return [busy / per_second, own, time.monotonic()]


def other_cpu_share(start: Optional[Sequence[float]], end: Optional[Sequence[float]],
                    cpus: Optional[int]) -> Optional[float]:
    """The share (0-1) of the machine's CPU time between two :func:`cpu_times` that went to other processes
    (rounded to 0.01), or None where either is missing."""
    if not start or not end or not cpus:
        return None
    wall = end[2] - start[2]
    if wall <= 0:
        return None
    others = (end[0] - start[0]) - (end[1] - start[1])
    return round(min(1.0, max(0.0, others / (wall * cpus))), 2)


def check_targets(rows: Sequence[Row], device: torch.device, busy: bool = False) -> List[Dict[str, Any]]:
    """The project's targets that this run's rows speak to, each with the best measurement.

    CUDA (bf16 rows, and fp8 rows on their own lines): end-to-end frames/s for ViT-B-32, ViT-L-14,
    ViT-bigG-14, and the speedup over the seed for ViT-bigG-14. CPU: the speedup over the seed for
    ViT-B-32, once per precision measured (so that a target met only by a lossy precision, int8 or
    fp8, says so). Each speedup target also gets a line for the largest batch with a ratio to the seed, where
    several have one: the best ratio is usually at batch 1, while the seed scored a rollout's frames in large
    batches. ``busy`` (:func:`machine_was_busy`) marks each speedup target met as unconfirmed.
    """
    on_cuda = device.type == "cuda"
    targets = []

    unsteady = {id(rows[i]) for i in unsteady_rows(rows)}
    several_kernels = len({r.kernels for r in rows if r.backend != SEED}) > 1

    def add(model: str, kind: str, required: float, key: Callable[[Row], Optional[float]], dtype: str) -> None:
        mine = [r for r in rows if r.backend != SEED and r.model == model and r.dtype == dtype and key(r) is not None]
        all_unsteady = False
        if "seed" in kind:  # a ratio whose two seed figures disagree (marked † in the table) decides nothing
            steady = [r for r in mine if id(r) not in unsteady]
            all_unsteady, mine = bool(mine) and not steady, steady
        if not any(r.model == model for r in rows):
            return
        best = max(mine, key=cast(Callable[[Row], float], key), default=None)  # mine: the rows key measures
        value = None if best is None else key(best)
        targets.append({
            "model": model, "kind": kind, "required": required,
            "measured": value,
            "where": None if best is None else (f"{best.backend} {best.dtype} batch {best.batch}, {best.frame_size} px"
                                                + (f", kernels {best.kernels}" if several_kernels else "")),
            # None where the run cannot tell: every ratio unsteady, or nothing measured (no seed, every row failed).
            "met": None if value is None else value >= required,
            # Measured, but every ratio unsteady: not the same as a target this run did not measure.
            "unsteady": all_unsteady,
            # Met on a busy machine, a speedup may owe it to the load (machine_was_busy): to be confirmed idle.
            "busy_machine": busy and "speedup" in kind,
        })

    measured = list(dict.fromkeys(r.dtype for r in rows if r.backend != SEED))
    # The GPU targets are set in bf16; fp8, where measured, gets its own lines.
    precisions = ["bf16"] + [d for d in measured if d == "fp8"] if on_cuda else measured or ["fp32"]
    for model, required in (GPU_FPS_TARGETS if on_cuda else {}).items():
        for dtype in precisions:
            add(model, f"end-to-end frames/s ({dtype})", required, lambda r: r.end_to_end_fps, dtype)
    for model, required in (GPU_SPEEDUP_TARGETS if on_cuda else CPU_SPEEDUP_TARGETS).items():
        for dtype in precisions:
            add(model, f"end-to-end speedup vs seed ({dtype})", required, lambda r: r.speedup_vs_seed, dtype)
            # The best ratio is often at batch 1 (the seed's per-call overhead); the seed scored whole rollouts in
            # large batches, so the largest batch with a ratio gets its own line where several have one (a batch
            # whose seed failed, or --no-seed, has none: it would read "cannot tell: not measured").
            batches = {r.batch for r in rows if r.backend != SEED and r.model == model and r.dtype == dtype
                       and r.speedup_vs_seed is not None}
            if len(batches) > 1:
                largest = max(batches)

                def at_largest(r: Row, b: int = largest) -> Optional[float]:
                    return r.speedup_vs_seed if r.batch == b else None

                add(model, f"end-to-end speedup vs seed ({dtype}), at the largest batch", required, at_largest, dtype)
    return targets


def _measured(target: Dict[str, Any], fmt: Callable[[float], str]) -> str:
    """A target's 'best measured' cell."""
    if target["measured"] is not None:
        return fmt(target["measured"])
    if target.get("unsteady"):
        return f"every ratio unsteady{UNSTEADY_MARK}: run again on an idle machine"
    return "not measured"


def _met(target: Dict[str, Any]) -> str:
    """A target's 'met' cell: "cannot tell" where ``met`` is None (every ratio unsteady, or not measured)."""
    if target["met"] is None:
        return f"cannot tell: unsteady{UNSTEADY_MARK}" if target.get("unsteady") else "cannot tell: not measured"
    if not target["met"]:
        return "no"
    return "yes, on a busy machine: run again idle to confirm" if target.get("busy_machine") else "yes"


def _rate(value: Optional[float]) -> str:
    """Frames/s: whole numbers with thousands separators from 1,000, three significant digits below, rounded
    down as :func:`_speedup` is: a target's "met: no" never sits beside a figure that reads as the target
    (649.96 frames/s read "650" against 650 required), and 999.7 reads "999", not "1e+03"."""
    if value is None:
        return "n/a"
    if not math.isfinite(value) or value <= 0:
        return f"{value:.3g}"
    exact = _as_written(value)
    if exact >= 1000:
        return f"{int(exact.to_integral_value(rounding=ROUND_FLOOR)):,}"
    down = exact.quantize(Decimal(1).scaleb(exact.adjusted() - 2), rounding=ROUND_FLOOR)
    return f"{down.normalize():f}"


def _as_written(value: float) -> Decimal:
    """``value`` as its shortest repr reads, for rounding down at a digit: 0.29 * 100 is 28.999..., which
    would floor to 28."""
    return Decimal(repr(float(value)))


def _num(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


TABLE_COLUMNS = (
    ("model", lambda r: r.model),
    ("backend", lambda r: r.backend),
    ("dtype", lambda r: r.dtype),
    ("kernels", lambda r: "" if r.backend == SEED else r.kernels),  # the seed runs the original code, not ours
    ("batch", lambda r: str(r.batch)),
    ("frame", lambda r: str(r.frame_size)),
    ("h2d", lambda r: _rate(r.h2d_fps)),
    ("preprocess", lambda r: _rate(r.preprocess_fps)),
    ("tower", lambda r: _rate(r.tower_fps)),
    ("score", lambda r: _rate(r.score_fps)),
    ("end to end", lambda r: _rate(r.end_to_end_fps)),
    ("seed", lambda r: _rate(r.seed_fps) if r.seed_fps else ""),
    ("vs seed", lambda r: _speedup(r.speedup_vs_seed) if r.speedup_vs_seed else ""),
    ("GFLOP/img", lambda r: f"{r.tower_gflops:.4g}"),
    ("TFLOP/s", lambda r: three_digits(r.achieved_tflops)),
    ("of peak", lambda r: _num(None if r.frac_of_peak is None else 100 * r.frac_of_peak, ".1f") + ("%" if r.frac_of_peak else "")),
    ("build s", lambda r: f"{r.build_seconds:.1f}" + (" (cached)" if r.build_cached else "")),
    ("reward err", lambda r: _num(r.reward_error, ".1e")),
)


SEED_DISAGREEMENT = 1.5
"""A row's seed figure (timed in alternation with it) and the seed's own row further apart than this
factor: the machine's load changed during the run, and the row's 'vs seed' is marked."""
UNSTEADY_MARK = " †"
FAST_PATH_OFF_MARK = " §"


def seed_disagreements(rows: Sequence[Row]) -> Dict[int, float]:
    """{row index: the factor (>= 1) by which its seed figure and the seed's own row at that model and batch
    differ, either way}, for the backends' rows that have both."""
    seed = {(r.model, r.batch): r.end_to_end_fps for r in rows if r.backend == SEED and r.end_to_end_fps}
    factors = {}
    for i, row in enumerate(rows):
        own = seed.get((row.model, row.batch))
        if row.backend != SEED and row.seed_fps and own:
            factors[i] = max(row.seed_fps / own, own / row.seed_fps)
    return factors


def disturbed_seed_pairings(rows: Sequence[Row]) -> List[int]:
    """Indices of the backends' rows whose seed figure (timed in alternation with them) took more than
    :data:`END_TO_END_EXCESS` times the seed's stages timed one by one (its own row's, at that model and batch),
    as :func:`disturbed_stages` marks an end to end: that pairing was disturbed. Its two seed figures can be
    disturbed alike and agree: 154 ms and 211 ms a call against 57 ms of stages gave the tiny model 104x
    (about 1.9x idle), unmarked."""
    stages = {}
    for row in rows:
        rates = [getattr(row, field) for field in _STAGE_COLUMNS.values()]
        if row.backend == SEED and all(rates):
            stages[(row.model, row.batch)] = sum(1 / rate for rate in rates)
    return [i for i, row in enumerate(rows)
            if row.backend != SEED and row.seed_fps and (row.model, row.batch) in stages
            and 1 / row.seed_fps > END_TO_END_EXCESS * stages[(row.model, row.batch)]]


def unsteady_rows(rows: Sequence[Row]) -> List[int]:
    """Indices of the rows whose seed figure disagrees with the seed's own row at that model and batch
    by more than :data:`SEED_DISAGREEMENT` either way, or was itself disturbed (:func:`disturbed_seed_pairings`)."""
    disagreeing = [i for i, factor in seed_disagreements(rows).items() if factor > SEED_DISAGREEMENT]
    return sorted(set(disagreeing) | set(disturbed_seed_pairings(rows)))


STAGE_EXCESS = 1.25
"""A stage timed alone slower than the whole pipeline (which runs it too) by more than this factor: its
timing was disturbed (other work on shared cores, one slow call among few), and its cell is marked."""
STAGE_MARK = " ‡"
END_TO_END_EXCESS = 2.0
"""An end to end slower than its stages timed one by one together by more than this factor: disturbed, and
marked. Not :data:`STAGE_EXCESS`: the call's own work outside the stages (checks, chunking, a thread switch)
weighs on small calls, and the committed runs on idle machines reach 1.56 (the tiny model on ONNX Runtime, a
few ms a call); a disturbed one seen on a loaded 2-core machine was 25."""
# Not h2d: end to end starts from frames already on the device, so the upload is no part of it.
_STAGE_COLUMNS = {"preprocess": "preprocess_fps", "tower": "tower_fps", "score": "score_fps"}


def disturbed_stages(row: Row) -> List[str]:
    """The table columns of ``row`` whose timing was disturbed: each stage whose frames/s is below the row's
    end-to-end frames/s by more than :data:`STAGE_EXCESS`, and "end to end" where its time per call exceeds
    the stages' times together by more than :data:`END_TO_END_EXCESS` (it runs just those stages, in turn)."""
    if not row.end_to_end_fps:
        return []
    rates = {stage: getattr(row, field) for stage, field in _STAGE_COLUMNS.items()}
    disturbed = [stage for stage, rate in rates.items() if rate and rate * STAGE_EXCESS < row.end_to_end_fps]
    if all(rates.values()) and sum(1 / rate for rate in rates.values()) * END_TO_END_EXCESS < 1 / row.end_to_end_fps:
        disturbed.append("end to end")
    return disturbed


def _first_frames(count: int) -> str:
    return "the first frame" if count == 1 else f"the first {count} frames"


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per row: frames/s per stage (median), end to end, the seed's, FLOP rate, build time."""
    flagged = set(unsteady_rows(rows))
    lines = ["| " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for i, row in enumerate(rows):
        disturbed = disturbed_stages(row)
        cells = [cell(row) + (UNSTEADY_MARK if name == "vs seed" and i in flagged else "")
                 + (STAGE_MARK if name in disturbed else "")
                 + (FAST_PATH_OFF_MARK if name == "kernels" and row.fast_paths_off else "")
                 for name, cell in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kernels_notes(rows: Sequence[Row]) -> List[str]:
    """What a row's kernels name leaves out: the interpreter, and where the tower's LayerNorm ran torch's op."""
    from vlmrm_fast.backends.triton_layer_norm import MIN_ELEMENTS

    lines = []
    if any(r.kernels == "triton-interpret" for r in rows):
        lines += ["", "'triton-interpret' rows ran the package's Triton kernels in Triton's CPU interpreter "
                      "(TRITON_INTERPRET=1): their times measure the interpreter, not the kernels."]
    if any(r.backend == "torch" and r.kernels.startswith("triton") for r in rows):
        lines += ["", f"With kernels triton, the torch backend's tower runs the package's LayerNorm kernel on calls of "
                      f"2^{MIN_ELEMENTS.bit_length() - 1} elements or more (frames x tokens x width: ViT-B-32 from 219 "
                      "frames a call, ViT-L-14 from 32, ViT-bigG-14 from 20) and torch's below, where host launches "
                      "bound the tower; the other backends' towers run torch's or their own. Preprocess and score run "
                      "the package's kernels at every size."]
    return lines


def markdown_report(report: Report) -> str:
    """bench.md: the environment, the table, the targets, what was skipped or failed."""
    env, config = report.environment, report.config
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "open_clip", "torchvision", "onnxruntime",
                                                     "tensorrt", "python") if env.get(k))
    peaks = ", ".join(f"{k} {three_digits(v)} TFLOP/s ({report.peak_sizes[k]}^3)" for k, v in report.peak_tflops.items())
    load = [env.get("load_average_start"), env.get("load_average_end")]
    repeats, before_budget = config["repeats"], min(MIN_REPEATS, config["repeats"])
    seeded = config.get("seed", True)
    checked = min(REWARD_CHECK_FRAMES, max(config["batch_sizes"]))
    lines = [
        f"# vlmrm-fast bench: {env['device']}",
        "",
        f"{env['timestamp']}, vlmrm-fast {env.get('vlmrm_fast', '?')}, commit {env['commit']}"
        + (f", driver {env['driver']}" if env.get("driver") else "") + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
        + (f", compute capability {env['compute_capability']}" if env.get("compute_capability") else "")
        + f"; {versions}.",
        f"Weights are random (no downloads); speed does not depend on them. Measured matmul peak (the best of the "
        f"measurements before and after each model): {peaks}.",
        "",
        *([f"Load average (1 min): {load[0]} at start, {'n/a' if load[1] is None else load[1]} at end, on "
           f"{env.get('cpu_count')} CPUs (this run's threads count too; above the CPU count, other work was "
           "competing for the cores and every figure is lower)."] if load[0] is not None else []),
        *([f"Other processes took {env['other_cpu_share']:.0%} of the CPUs' time during the run (over "
           f"{OTHER_CPU_BUSY:.0%}, the machine counts as busy: a speedup target met is marked to be confirmed)."]
          if env.get("other_cpu_share") is not None else []),
        "",
        markdown_table(report.rows),
        "",
        f"Frames/s = batch / median seconds per call ({repeats} repeat{'' if repeats == 1 else 's'} at most, after "
        f"{config['warmup']} warm-up" + ("; the row's end to end and the seed's, timed in alternation, one each "
                                         "after the stages' own warm-ups" if seeded and config["warmup"] != 1 else "")
        + f"; stages stop after {config['time_budget']:g} s of timed calls once "
        f"{before_budget} {'is' if before_budget == 1 else 'are'} done). Frames are uint8 "
        f"already on the device except for h2d (from pageable host memory, as rm(frames) uploads them: one copy into "
        "pinned memory, then the upload; n/a on CPU" + (
            "; the seed's rows copy from pageable memory, as the original did). The seed pipeline (the original "
            "code's) always gets 480 x 480 frames; in a backend's row, 'seed' is the seed's end to end at that batch "
            "size timed in alternation with the row's own end to end (so load on a shared machine weighs on both "
            "alike), and 'vs seed' is their ratio." if seeded else
            "). The seed pipeline was not run (--no-seed), so 'seed' and 'vs seed' are empty.")
        + " TFLOP/s = tower GFLOP/img x tower frames/s / 1,000; 'of peak' against the matmul peak in that dtype ("
        + ("fp16 for the seed on CUDA; " if seeded else "")
        + "for fp8 rows the fp8 peak, though their attention and patch embedding run in bf16). 'build s' (export, "
        "compile, engine build) is not in any frames/s. 'score' is rm.score: the rewards and its checks of the "
        "input and of the rewards' finiteness (one sync), which the seed does not run; at small batches on CPU "
        "those checks cost more than the arithmetic, so the seed's score can be faster there. 'reward err' is the largest difference between the row's "
        f"rewards and the float32 eager path's, on the same model and {_first_frames(checked)}, in one batch (random "
        "weights: a guide, not a guarantee for a pretrained checkpoint). On CPU each stage"
        + (", and each switch between the seed and the pipeline timed with it," if seeded else "")
        + f" starts after a {SWITCH_PAUSE_S:g} s pause (ONNX Runtime's threads spin after a run and slow "
        "the torch work that follows).",
    ]
    compiled = any(r.backend == "compile" for r in report.rows)
    if compiled or "compile" in config.get("backends", ()):
        mode = config.get("compile_mode") or ("reduce-overhead" if str(config.get("device", "")).startswith("cuda") else "default")
        mode += "" if config.get("compile_mode") else " (the backend's default here)"
        lines += ["", f"The compile rows ran torch.compile with mode={mode}." if compiled else
                  f"torch.compile was asked for with mode={mode}; no compile row ran (see Skipped/Failed below)."]
    if any(r.build_cached for r in report.rows):
        lines += ["", "'(cached)': that build found its work in a cache on disk, left by an earlier build of the same "
                      "graph, in this run or another (torch.compile's graphs in Inductor's cache, a TensorRT engine in "
                      "the engine cache), so its 'build s' is less than a first build's."]
    lines += kernels_notes(report.rows)
    unpeaked = sorted({r.dtype for r in report.rows if peak_dtype(r.dtype) not in report.peak_tflops})
    if unpeaked:
        lines += ["", f"'of peak' is empty for {', '.join(unpeaked)}: no matmul peak in that precision was measured on "
                      "this device (none is measured for int8; fp8's only where the torch backends' fp8 runs)."]
    if any(r.frac_of_peak is not None and r.frac_of_peak > 1 for r in report.rows):
        lines += [
            "",
            "'of peak' above 100%: that row's tower runs faster than the measured matmul in its dtype did here, so the measured "
            "peak is no ceiling for it (on CPU, bf16 and fp16 torch.mm take slow paths that compiled towers avoid; on "
            "shared cores the peak, measured before and after each model, may have met more load than the row did).",
        ]
    unsteady = [f for f in seed_disagreements(report.rows).values() if f > SEED_DISAGREEMENT]
    if unsteady:
        worst = math.ceil(max(unsteady) * 100) / 100  # up, so that it never reads as the threshold it passed
        lines += [
            "",
            f"{UNSTEADY_MARK.strip()} The seed timed with this row and the seed's own row differ by more than "
            f"{SEED_DISAGREEMENT:g}x (up to {worst:.2f}x in this run): the machine's load changed during the run "
            "(other work on shared cores), so this ratio is unsteady; run again on an idle machine before quoting it.",
        ]
    if disturbed_seed_pairings(report.rows):
        lines += [
            "",
            f"{UNSTEADY_MARK.strip()} {'Also where' if unsteady else 'Where'} the seed timed with this row took more "
            f"than {END_TO_END_EXCESS:g}x the seed's stages timed one by one: that timing was disturbed (other work on "
            "shared cores), so this ratio is unsteady; run again on an idle machine before quoting it.",
        ]
    if any(disturbed_stages(r) for r in report.rows):
        lines += [
            "",
            f"{STAGE_MARK.strip()} This stage, timed alone, was more than {STAGE_EXCESS:g}x slower than the whole "
            f"pipeline that includes it, or this end to end more than {END_TO_END_EXCESS:g}x slower than its stages timed "
            "one by one: its timing was disturbed (other work on shared cores, or one slow call among few repeats; "
            "bench.json has each stage's min and max). The row's other figures are measured apart; run again on an "
            "idle machine, or with more --repeats, before quoting the marked one.",
        ]
    if report.fast_paths_off:
        failed = "; ".join(f"{name} ({error})" for name, error in report.fast_paths_off.items())
        lines += ["", f"{FAST_PATH_OFF_MARK.strip()} A fast path of the tower failed on this machine and turned itself "
                      f"off for the rest of the run, so the rows marked timed the slower ops that stand in for it, in "
                      f"part or whole: {failed}. Please report it."]
    if report.targets:
        lines += ["", "## Targets", "", "| model | target | required | best measured | where | met |", "|---|---|---|---|---|---|"]
        for t in report.targets:
            fmt = _speedup if "speedup" in t["kind"] else _rate
            lines.append(f"| {t['model']} | {t['kind']} | {fmt(t['required'])} | "
                         f"{_measured(t, fmt)} | {t['where'] or ''} | "
                         f"{_met(t)} |")
    lines += markdown_kernel_profiles(report.kernel_profiles)
    if report.skipped:
        lines += ["", "Skipped: " + "; ".join(f"{s['what']} ({s['reason']})" for s in report.skipped) + "."]
    if report.failures:
        lines += ["", "Failed: " + "; ".join(f"{f['what']} ({f['error'][:300]})" for f in report.failures) + "."]
    if not report.complete:
        lines += ["", "The run is incomplete: these are the results so far."]
    return "\n".join(lines) + "\n"


def _require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"bench.png needs matplotlib, which is not installed: {CLI_EXTRA} (or pass --no-plot).")


TITLE_WIDTH = 100
"""Characters a line of bench.png's title holds at its size and font (8.5 in, 9 pt), with margin."""
LOG_TICK_STEPS = ((1.0, 2.0, 5.0), tuple(float(k) for k in range(1, 10)), tuple(k / 10 for k in range(10, 100)))


def log_tick_steps(values: Sequence[float]) -> Tuple[float, ...]:
    """The multiples of each power of ten that label a log axis over ``values``: 1-2-5 where that puts at
    least three labels among them, else finer steps (frames/s within one decade would otherwise get one
    or two numbers, and lines between them could not be read)."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return LOG_TICK_STEPS[0]
    low, high = min(positive), max(positive)
    decades = range(math.floor(math.log10(low)), math.floor(math.log10(high)) + 1)
    for steps in LOG_TICK_STEPS:
        if sum(low <= step * 10.0**d <= high for d in decades for step in steps) >= 3:
            return steps
    return LOG_TICK_STEPS[-1]


def write_plot(path: Path, report: Report) -> Path:
    """End-to-end frames/s against batch size, log-log: one line per (model, backend, dtype, kernels), in
    the model's colour, a line style per backend (the seed dashed), a marker per precision and, where the
    run measured both kernel paths, thin lines for torch's; dotted lines at the GPU targets."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    figure = Figure(figsize=(8.5, 5.5), layout="constrained")
    ax = figure.add_subplot()
    models = list(dict.fromkeys(r.model for r in report.rows))
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    several_kernels = len({r.kernels for r in report.rows if r.backend != SEED}) > 1
    if len({r.batch for r in report.rows}) == 1:  # one point a line: no line style tells the backends apart
        return _write_bars(figure, ax, path, report, colours, several_kernels)
    styles = {"torch": "-", "compile": "-.", "onnxruntime": (0, (5, 1, 1, 1)), "tensorrt": (0, (1, 1))}
    markers = {"fp32": "o", "bf16": "s", "fp16": "^", "int8": "D", "fp8": "v"}  # the precision: its own marker
    for key in dict.fromkeys((r.model, r.backend, r.dtype, r.kernels) for r in report.rows):
        line = sorted((r for r in report.rows if (r.model, r.backend, r.dtype, r.kernels) == key), key=lambda r: r.batch)
        model, backend, dtype, kernels = key
        thin = several_kernels and backend != SEED and kernels == "torch"
        ax.plot([r.batch for r in line], [r.end_to_end_fps for r in line], color=colours[model],
                linestyle="--" if backend == SEED else styles.get(backend, "-"), marker=markers.get(dtype, "x"),
                markersize=4, markerfacecolor="none" if backend == SEED else colours[model],
                linewidth=0.8 if thin else 1.5,
                label=_plot_label(line[0], several_kernels))
    if report.config["device"].startswith("cuda"):
        for model, target in GPU_FPS_TARGETS.items():
            if model in colours:
                ax.axhline(target, color=colours[model], linestyle=":", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({r.batch for r in report.rows})
    ax.set_xticks(batches, labels=[str(b) for b in batches])
    ax.xaxis.set_minor_locator(NullLocator())
    _log_rate_axis(ax.yaxis, ax.set_ylim, [r.end_to_end_fps for r in report.rows])
    ax.set_xlabel("batch size (frames per call)")
    ax.set_ylabel("end-to-end frames/s")
    _title(ax, report, "the seed dashed")
    ax.grid(alpha=0.3)
    if report.rows:
        ax.legend(fontsize=7, loc="best", handlelength=4)  # long enough to tell the line styles apart
    return save_figure_atomically(figure, path)


def _plot_label(row: Row, several_kernels: bool) -> str:
    """A configuration's name in the plot: model, backend, dtype, and its kernels where the run measured both."""
    kernels = f" kernels={row.kernels}" if several_kernels and row.backend != SEED else ""
    return f"{row.model} {row.backend} {row.dtype}{kernels}"


def _write_bars(figure, ax, path: Path, report: Report, colours: Dict[str, str], several_kernels: bool) -> Path:
    """:func:`write_plot` for a run at one batch size: a bar per (model, backend, dtype, kernels), labelled."""
    rows = list(reversed(report.rows))  # the table's first row on top
    labels = [_plot_label(r, several_kernels) for r in rows]
    bars = ax.barh(range(len(rows)), [r.end_to_end_fps for r in rows], color=[colours[r.model] for r in rows],
                   edgecolor="white")
    for bar, row in zip(bars, rows):
        bar.set_hatch("//" if row.backend == SEED else "")  # per bar: a list of hatches needs matplotlib 3.7
    ax.bar_label(bars, labels=[_rate(r.end_to_end_fps) for r in rows], fontsize=7, padding=2)
    ax.set_yticks(range(len(rows)), labels=labels, fontsize=7)
    ax.set_xscale("log")
    _log_rate_axis(ax.xaxis, ax.set_xlim, [r.end_to_end_fps for r in rows])
    ax.set_xlabel(f"end-to-end frames/s at batch {rows[0].batch}")
    _title(ax, report, "the seed hatched")
    ax.grid(alpha=0.3, axis="x")
    return save_figure_atomically(figure, path)


def _log_rate_axis(axis, set_limits: Callable[..., Any], values: Sequence[float]) -> None:
    """Frames/s on a log axis labelled at :func:`log_tick_steps` over the values; one value (or values within
    1.5x) gets limits 1.5x either side, and steps over those: matplotlib widened one point's axis to a decade,
    and the finest steps over it put 90 labels there."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v and v > 0 and math.isfinite(v)]
    if positive and max(positive) < 1.5 * min(positive):
        centre = math.sqrt(min(positive) * max(positive))
        values = (centre / 1.5, centre * 1.5)
        set_limits(*values)
    axis.set_major_locator(LogLocator(base=10, subs=log_tick_steps(values)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _title(ax, report: Report, seed_drawn: str) -> None:
    size = report.config["frame_size"]
    seed_size = "" if size == SEED_FRAME_SIZE else f" at {SEED_FRAME_SIZE}x{SEED_FRAME_SIZE}"
    seed = (f" ({seed_drawn}{seed_size}, timed alone; bench.md's 'vs seed' times it beside each row)"
            if any(r.backend == SEED for r in report.rows) else "")
    subtitle = textwrap.fill(f"{size}x{size} uint8 frames on the device{seed}; random weights", TITLE_WIDTH)
    ax.set_title(f"vlmrm-fast bench, {report.environment['device']}\n{subtitle}", fontsize=9)


def write_outputs(report: Report, config: BenchConfig, plot: Optional[bool] = None) -> List[Path]:
    """Write bench.json, bench.md and (unless --no-plot, or ``plot`` is False, or no row was measured: an empty
    plot) bench.png into ``config.out``."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    data = asdict(report)
    data["kernel_profiles"] = [profile.as_json() for profile in report.kernel_profiles]  # with derived figures
    # bench.md's marks, for scripts that read the JSON: † on 'vs seed', ‡ on the stages whose timing was disturbed.
    unsteady = set(unsteady_rows(report.rows))
    for i, (row, row_data) in enumerate(zip(report.rows, data["rows"])):
        row_data["speedup_unsteady"] = i in unsteady
        row_data["disturbed_stages"] = disturbed_stages(row)
    # Atomically: rewritten after every configuration, and a kill mid-write must not leave it cut short.
    write_atomically(out / "bench.json", (json.dumps(data, indent=2, default=str) + "\n").encode())
    write_atomically(out / "bench.md", markdown_report(report).encode())
    written = [out / "bench.json", out / "bench.md"]
    if (config.plot if plot is None else plot) and report.rows:
        written.append(write_plot(out / "bench.png", report))
    return written


# --------------------------------------------------------------------------- environment


def load_average() -> Optional[float]:
    """The 1-minute load average (other work on the machine shows here), where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    """What the figures depend on: device, driver, library versions, commit, time (UTC)."""
    env: Dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "vlmrm_fast": vlmrm_fast_version,
        "device": f"{cpu_name()} ({torch.get_num_threads()} threads)",
        "device_type": device.type,
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "driver": "",
        "cuda": "",
        "torch": torch.__version__,
        **library_versions("triton", "open_clip", "torchvision", "onnxruntime", "onnx", "tensorrt", "numpy"),
        "python": platform.python_version(),
        "triton_interpret": interpreter_enabled(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
        "cpu_times_start": cpu_times(),  # for other_cpu_share, set with the targets
        "weights": "random (pretrained=None): speed does not depend on them",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = (command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "").splitlines()
        env.update(
            device=torch.cuda.get_device_name(device),
            driver=driver[0].strip() if driver else "",
            cuda=torch.version.cuda or "",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
        )
    return env


def _speedup(value: float) -> str:
    """A speedup with two decimals, rounded down: "met: no" never sits beside a figure that reads as its
    target, and the table and the targets show one ratio the same way."""
    if not math.isfinite(value):  # Decimal cannot quantize inf (no real row has one)
        return f"{value}x"
    return f"{_as_written(value).quantize(Decimal('0.01'), rounding=ROUND_FLOOR)}x"
