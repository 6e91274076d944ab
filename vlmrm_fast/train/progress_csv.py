"""The training log's CSV files (``RUN_DIR/tb/progress.csv``, ``progress-from-STEP.csv`` per resumed session),
kept to TensorBoard's view of the run: each step's row once, read in order of STEP.

A session resumed from a checkpoint at ``step`` logs again every row after it. A stop (SIGINT/SIGTERM) writes
its checkpoint at its last row, so nothing is logged twice; a crash (SIGKILL, a lost node) leaves the rows
logged after its last checkpoint. TensorBoard hides those behind a purge mark (its event files keep them);
here they are dropped from the earlier sessions' files, which are rewritten atomically, each as it was kept
first in ``tb/superseded/`` (beside the files a reader globs as ``tb/progress*.csv``).
"""
from __future__ import annotations

import csv
import itertools
import re
import shutil
from pathlib import Path
from typing import List, Optional

from vlmrm_fast.atomic import write_atomically

STEP_COLUMN = "time/total_timesteps"
_NAME = re.compile(r"progress(?:-from-(\d+))?\.csv")


def csv_name(start_step: int) -> str:
    """The CSV of the session that starts at ``start_step`` (0: a new run)."""
    return "progress.csv" if start_step == 0 else f"progress-from-{start_step}.csv"


def drop_rows_logged_past(folder: Path, step: int) -> List[Path]:
    """Remove the rows after ``step`` from the run's CSV files in ``folder``; returns where the files as
    they were are kept (``folder/superseded/NAME``, numbered where that name is taken).

    A file is cut at its first row past ``step`` (rows are in step order; one without a step, such as an
    evaluation's from before rows had one, goes with the rows around it); a resumed session's file left
    with no row is removed.
    """
    kept = []
    for path in sorted(folder.glob("progress*.csv")):
        match = _NAME.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        lines = path.read_text().splitlines(keepends=True)
        column = _step_column(lines[0]) if lines else None
        if column is None:
            continue
        keep = next((i for i, line in enumerate(lines[1:], 1) if _step_of(line, column) > step), len(lines))
        if keep == len(lines):
            continue
        aside = _free_name(folder / "superseded" / path.name)
        aside.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, aside)  # first: a crash from here on leaves both files, the rows in each
        if keep == 1 and match.group(1) is not None:
            path.unlink()
        else:
            write_atomically(path, "".join(lines[:keep]).encode())
        kept.append(aside)
    return kept


def _free_name(path: Path) -> Path:
    if not path.exists():
        return path
    return next(candidate for n in itertools.count(2)
                if not (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists())


def _step_column(header: str) -> Optional[int]:
    names = next(csv.reader([header]), [])
    return names.index(STEP_COLUMN) if STEP_COLUMN in names else None


def _step_of(line: str, column: int) -> float:
    """The row's step, or -inf where it has none (an empty cell, a line cut short by a crash)."""
    cells = next(csv.reader([line]), [])
    try:
        return float(cells[column])
    except (IndexError, ValueError):
        return float("-inf")
