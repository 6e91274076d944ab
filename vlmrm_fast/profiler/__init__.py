"""``vlmrm-fast bench``, the frames/s profiler (see run.py for what it measures).

| module | what |
|---|---|
| run.py | options, the measurement loop, the command |
| flops.py | tower FLOPs (analytic for ViTs, SPEC §2) |
| timing.py | stage timers and the measured matmul peak |
| kernels.py | ``--kernel-profile``: the tower's time per kind of kernel, against its FLOP ceiling |
| seed.py | the original code's pipeline, the reference |
| report.py | rows, targets, markdown/JSON/PNG outputs, environment |
"""
from vlmrm_fast.profiler.flops import tower_gflops
from vlmrm_fast.profiler.report import (
    Row,
    check_targets,
    markdown_report,
    markdown_table,
)
from vlmrm_fast.profiler.run import (
    BenchConfig,
    add_bench_parser,
    resolve_config,
    run_bench,
)

__all__ = [
    "BenchConfig", "Row", "add_bench_parser", "check_targets", "markdown_report", "markdown_table",
    "resolve_config", "run_bench", "tower_gflops",
]
