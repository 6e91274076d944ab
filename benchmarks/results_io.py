"""Result files shared by the benchmark scripts: one CSV per machine kind, rows appended per run."""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Iterable, Sequence


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
