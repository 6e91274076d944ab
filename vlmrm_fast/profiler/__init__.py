"""``vlmrm-fast bench``, the frames/s profiler (see run.py for what it measures).

| module | what |
|---|---|
| options.py | the command's options and the names it offers (no torch: ``--help`` stays fast) |
| run.py | resolving the options, the measurement loop, the command |
| flops.py | tower FLOPs (analytic for ViTs, SPEC §2) |
| timing.py | stage timers and the measured matmul peak |
| kernels.py | ``--kernel-profile``: the tower's time per kind of kernel, against its FLOP ceiling |
| seed.py | the original code's pipeline, the reference |
| report.py | rows, targets, markdown/JSON/PNG outputs, environment |

The names below load on first use, so that building the command line's parser imports no torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vlmrm_fast.profiler.options import add_bench_parser

_LAZY = {
    "tower_gflops": "vlmrm_fast.profiler.flops",
    "Row": "vlmrm_fast.profiler.report",
    "check_targets": "vlmrm_fast.profiler.report",
    "markdown_report": "vlmrm_fast.profiler.report",
    "markdown_table": "vlmrm_fast.profiler.report",
    "BenchConfig": "vlmrm_fast.profiler.run",
    "resolve_config": "vlmrm_fast.profiler.run",
    "run_bench": "vlmrm_fast.profiler.run",
}

if TYPE_CHECKING:
    from vlmrm_fast.profiler.flops import tower_gflops
    from vlmrm_fast.profiler.report import Row, check_targets, markdown_report, markdown_table
    from vlmrm_fast.profiler.run import BenchConfig, resolve_config, run_bench


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmrm_fast.profiler' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BenchConfig", "Row", "add_bench_parser", "check_targets", "markdown_report", "markdown_table",
    "resolve_config", "run_bench", "tower_gflops",
]
