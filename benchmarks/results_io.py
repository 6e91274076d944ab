"""Result files shared by the benchmark scripts: one CSV per machine kind, rows appended per run."""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import torch

from vlmrm_fast.atomic import write_atomically
from vlmrm_fast.profiler.report import (BUSY_LOAD, OTHER_CPU_BUSY, cpu_times, load_average, machine_was_busy,
                                        other_cpu_share)
from vlmrm_fast.profiler.timing import sigterm_as_interrupt


def fmt(value: object) -> str:
    """Compact text for tables and CSVs: 4 significant digits, empty for None."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def check_csv(path: Path, columns: Sequence[str]) -> None:
    """Stop before benchmarking if an existing CSV has other columns than the script writes."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open(newline="") as f:
        existing = next(csv.reader(f), [])
    if existing != list(columns):
        sys.exit(f"{path} has other columns than this script writes; use a new file.\n"
                 f"  file:   {existing}\n  script: {list(columns)}")


def append_csv(path: Path, rows: Iterable[object], columns: Sequence[str]) -> None:
    """Append rows (objects with one attribute per column), writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(list(columns))
        writer.writerows([fmt(getattr(row, column)) for column in columns] for row in rows)


class RunFiles:
    """A run's rows, and its CSV and JSON kept current as they come in, so that a run stopped part way
    (SIGTERM from a time limit, Ctrl-C, a crash in a later row) keeps every row already measured.

    :meth:`add` appends the new rows to the CSV (header first when the file is new) and rewrites
    the JSON whole, atomically: ``{**header, "complete": False, "rows": [...]}``; :meth:`finish`
    rewrites it once more with ``complete`` and any extra keys (``elapsed_s``...). The JSON's ``load``
    holds the CPU count, the load average at the start and the end, and the share of the CPUs' time that
    other processes took (``machine_busy`` judges them as ``vlmrm-fast bench`` does,
    :func:`~vlmrm_fast.profiler.report.machine_was_busy`): other work on the machine slows the reference
    paths (eager torch) more than ours, so a busy run's ratios read high.
    """

    def __init__(self, csv_path: Optional[Path], json_path: Optional[Path], columns: Sequence[str],
                 header: Dict[str, Any]) -> None:
        self.csv_path, self.json_path, self.columns = csv_path, json_path, columns
        self.header = {**header, "load": {"cpu_count": os.cpu_count(), "load_average_start": load_average()}}
        self._cpu_times_start = cpu_times()
        self.rows: List[Any] = []
        self.complete = True  # False once interrupted

    def add(self, rows: Iterable[Any]) -> None:
        rows = list(rows)
        self.rows += rows
        if self.csv_path and rows:
            append_csv(self.csv_path, rows, self.columns)
        self._write_json(finished=False)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """SIGTERM or Ctrl-C inside the block ends it early, keeping the rows so far (``complete`` False)."""
        try:
            with sigterm_as_interrupt():
                yield
        except KeyboardInterrupt:
            self.complete = False
            print(f"interrupted (SIGTERM or Ctrl-C): keeping the {len(self.rows)} rows measured before")

    def finish(self, **extra: Any) -> None:
        load = self.header["load"]
        load["load_average_end"] = load_average()
        load["other_cpu_share"] = other_cpu_share(self._cpu_times_start, cpu_times(), load["cpu_count"])
        busy = machine_was_busy(load)
        if busy:
            share = load["other_cpu_share"]
            what = (f"other processes took {share:.0%} of the CPUs' time (over {OTHER_CPU_BUSY:.0%})" if share is not None
                    else f"the load average ({load['load_average_start']} at the start, {load['load_average_end']} at "
                         f"the end, on {load['cpu_count']} CPUs) was above {BUSY_LOAD:g} per CPU")
            print(f"note: {what}: other work competed for the cores, which slows the reference paths more than ours, "
                  "so the speedups read high; run again on an idle machine before quoting them.")
        self._write_json(finished=True, **extra, machine_busy=busy)
        if self.csv_path:
            print(f"appended {len(self.rows)} rows to {self.csv_path}")
        if self.json_path:
            print(f"wrote {self.json_path}")

    def _write_json(self, finished: bool, **extra: Any) -> None:
        if self.json_path:
            complete = finished and self.complete
            run = {**self.header, **extra, "complete": complete, "rows": [asdict(row) for row in self.rows]}
            write_atomically(self.json_path, (json.dumps(run, indent=2) + "\n").encode())


def config_of(args: argparse.Namespace) -> Dict[str, Any]:
    """A script's arguments as JSON values (devices and paths as text)."""
    return {key: str(value) if isinstance(value, (torch.device, Path)) else value for key, value in vars(args).items()}
