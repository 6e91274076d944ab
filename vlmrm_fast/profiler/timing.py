"""Timing stages (medians over repeats, CUDA-synchronised) and the device's measured matmul peak."""
from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Sequence, Tuple

import torch

MIN_REPEATS = 3
SWITCH_PAUSE_S = 0.1
"""On CPU, an idle pause before each stage's timing and at each switch between two pipelines timed in
alternation: ONNX Runtime's worker threads spin for tens of milliseconds after a run and halve the
speed of the torch work that follows, which would otherwise be charged to the next stage or pipeline."""
L2_FLUSH_BYTES = 256 << 20  # more than any GPU's L2: no repeat reads the previous one's data from cache
PEAK_SIZE = {"cuda": 8192, "cpu": 2048}
PEAK_CALL_S = 0.2
PEAK_BURST_S = 0.02
"""Each timed repeat of the peak runs products back to back for about this long, so that the
synchronisation around it (~10-30 us, 1-2% of one 8192^3 bf16 product on an H200) does not lower the peak."""
PEAK_MAX_BURST = 64


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class StageTiming:
    """Seconds per call over the timed repeats."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int


class StageTimer:
    """Times a callable: ``warmup`` untimed calls, then up to ``repeats`` timed ones.

    On CUDA each timed call is synchronised on both sides and preceded by a 256 MiB write that evicts
    the inputs from L2, so it is the wall time a caller waits for the result. Timing stops early once
    ``time_budget`` seconds have gone into timed calls and at least min(3, repeats) were made: a few
    long calls of a big model give a steady median already.
    """

    def __init__(self, device: torch.device, warmup: int, repeats: int, time_budget: float) -> None:
        self.device = device
        self.warmup = warmup
        self.repeats = repeats
        self.time_budget = time_budget
        self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def synchronize(self) -> None:
        """Wait for the device's queued work (a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> StageTiming:
        self._pause()
        for _ in range(self.warmup):
            fn()
        times: List[float] = []
        spent = 0.0
        while self._more(len(times), spent):
            times.append(self._time_once(fn))
            spent += times[-1]
        return _timing(times)

    def paired(self, first: Callable[[], object], second: Callable[[], object]) -> Tuple[StageTiming, StageTiming]:
        """Time two callables in alternation (first-second, second-first, first-second, ...), after
        one warm-up call each, so that load drifting on a shared machine weighs on both alike.

        On CPU a pause (``SWITCH_PAUSE_S``) comes before every change of callable, so that neither
        pays for the other's after-effects, and an untimed call follows it: the first call after an
        idle pause runs about twice as slow (measured: 11.6 against 4.9 ms for the tiny model), and
        the pauses fall unevenly on the two. Consecutive calls of the same callable keep whatever they
        inflict on themselves. Stops as :meth:`__call__` does, counting pairs.
        """
        callables = (first, second)
        self._pause()
        first()
        self._pause()
        second()
        last, spent = 1, 0.0
        times: Tuple[List[float], List[float]] = ([], [])
        while self._more(len(times[0]), spent):
            for index in (0, 1) if len(times[0]) % 2 == 0 else (1, 0):
                if index != last and self._pause():
                    callables[index]()  # warm again after the pause, untimed
                last = index
                times[index].append(self._time_once(callables[index]))
                spent += times[index][-1]
        return _timing(times[0]), _timing(times[1])

    def _pause(self) -> bool:
        """Pause on CPU (see ``SWITCH_PAUSE_S``); whether it did."""
        if self.device.type == "cpu":
            time.sleep(SWITCH_PAUSE_S)
            return True
        return False

    def _more(self, done: int, spent: float) -> bool:
        """Whether to time another call after ``done`` calls that took ``spent`` seconds."""
        return done < self.repeats and (done < min(MIN_REPEATS, self.repeats) or spent <= self.time_budget)

    def _time_once(self, fn: Callable[[], object]) -> float:
        if self._flush is not None:
            self._flush.zero_()
        self.synchronize()
        start = time.perf_counter()
        fn()
        self.synchronize()
        return time.perf_counter() - start


def _timing(times: Sequence[float]) -> StageTiming:
    return StageTiming(statistics.median(times), min(times), max(times), len(times))


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, timer: StageTimer) -> Tuple[float, int]:
    """Dense matmul throughput: (TFLOP/s, n) for n x n @ n x n of random ``dtype`` data.

    n is 8192 on CUDA and 2048 on CPU, or the first power of two from 512 whose product takes over
    ``PEAK_CALL_S``: a precision without fast kernels on a CPU (bf16 without AVX512-BF16 runs at
    well under 1 GFLOP/s) must not take minutes. Each timed repeat is a burst of products lasting
    about ``PEAK_BURST_S``.
    """
    largest = PEAK_SIZE["cuda" if device.type == "cuda" else "cpu"]
    generator = torch.Generator(device=device).manual_seed(0)
    n = 512
    with torch.inference_mode():
        while True:
            product = _square_product(n, device, dtype, generator)
            product()  # the first call at a size may pay for library set-up (cuBLAS handles)
            timer.synchronize()
            start = time.perf_counter()
            product()
            timer.synchronize()
            single_s = time.perf_counter() - start
            if n >= largest or single_s > PEAK_CALL_S:
                break
            n *= 2
        burst = max(1, min(PEAK_MAX_BURST, round(PEAK_BURST_S / max(single_s, 1e-9))))

        def products() -> None:
            for _ in range(burst):
                product()

        timing = timer(products)
    return 2 * n**3 * burst / timing.median_s / 1e12, n


def _square_product(n: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> Callable[[], object]:
    """One n x n @ n x n product of random ``dtype`` data, as a call. float8_e4m3fn runs as
    ``quantize="fp8"`` does (:mod:`vlmrm_fast.backends.torch_fp8`): ``torch._scaled_mm`` with per-row
    scales, bf16 out."""
    if dtype == torch.float8_e4m3fn:
        a = torch.randn((n, n), device=device, generator=generator).to(dtype)
        b = torch.randn((n, n), device=device, generator=generator).to(dtype)
        scale_a = torch.ones((n, 1), device=device)
        scale_b = torch.ones((1, n), device=device)
        return lambda: torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    a = torch.randn((n, n), device=device, dtype=dtype, generator=generator)
    b = torch.randn((n, n), device=device, dtype=dtype, generator=generator)
    out = torch.empty((n, n), device=device, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block (main thread only; elsewhere nothing changes),
    so that a benchmark stopped by ``timeout`` writes what it measured, as after Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
