"""Where the tower's time goes, kernel by kernel: ``vlmrm-fast bench --kernel-profile``.

``torch.profiler`` runs over a few calls of one backend's tower at one batch size. On CUDA the entries
are device kernels as CUPTI sees them, whoever launched them (cuBLAS, flash attention, Triton, TensorRT's
and ONNX Runtime's own kernels); on CPU they are torch ops' self time, except for a backend that
profiles itself where torch.profiler is blind (ONNX Runtime on CPU: its nodes' times by op type, from
its own profiler; :meth:`VisionBackend.profile_nodes`). Each entry gets a kind from its name
(:func:`kernel_kind`), and the tower's time is set against its FLOP ceiling (tower FLOPs over the
measured matmul peak):

    wall = ceiling + (matmul + attention - ceiling) + other kernels + idle

where the second term is what the matmuls and attention lose to the peak, "other kernels" are layer
norms, elementwise ops and copies (no FLOPs in the count, pure cost), and idle is the wall time (timed
without the profiler) in which no kernel ran: launch gaps, host work, synchronisation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from vlmrm_fast.backends.base import VisionBackend

KINDS = ("matmul", "attention", "layernorm", "elementwise", "copy")
"""Kinds in the order they are shown. A name gets the first kind in ``_KIND_PATTERNS`` whose pattern it
matches: attention before matmul (fused attention kernels have "gemm" in their names), layer norm and
matmul before copy (a compiler's fused kernels name the copies they absorb)."""

_KIND_PATTERNS = (
    ("attention", r"flash|fmha|mha|attention|sdpa|softmax"),
    ("layernorm", r"layer_?norm|rms_?norm|mean.*sqrt"),  # TensorRT's fused norms name their ops: ...MeanSub...Sqrt...
    ("matmul", r"gemm|xmma|cutlass|cublas|nvjet|wgmma|matmul|conv\b|\bconv_|convinteger|convolution|conv2d|fprop"
               r"|addmm|bmm|\bmm\b|_mm\b|_mm_"),
    ("copy", r"memcpy|memset|copy|\bcat\b|concat|clone|contiguous|transpose|permute|reshape|squeeze|flatten"),
)
_INDUCTOR_FUSED = re.compile(r"triton_(?:poi|per|red)_fused_(.*?)(?:_\d+)?$")
"""Inductor's pointwise and reduction kernels, named after the ops fused into them; its matmul
templates (triton_tem_) are matmuls like any other."""
_LAYOUT_OPS = {"", "to", "copy", "view", "clone", "cat", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze",
               "select", "slice", "reshape", "contiguous", "unsafe", "split", "with", "sizes", "stack"}
TOP_KERNELS = 8
"""Kernels listed per configuration in bench.md (bench.json keeps all of them)."""
DISTURBED_FACTOR = 2.0
"""A profile whose ops sum to more than this many times the tower's unprofiled wall time is marked disturbed
(:attr:`TowerProfile.disturbed`): a loaded 2-core machine gave 121 ms of matmul a call against 1.73 ms wall;
idle, the sum is within 10% of the wall."""


def kernel_kind(name: str) -> str:
    """The kind of a kernel or op by its name: one of :data:`KINDS` ("elementwise" when nothing else
    matches: activations, adds, scales, casts and fused mixes of them)."""
    lowered = name.lower()
    fused = _INDUCTOR_FUSED.match(lowered)
    if fused:  # never a matmul (a bias or an activation after one names it), a copy only if nothing else
        ops = fused.group(1)
        if re.search(r"layer_norm|rms_norm", ops):
            return "layernorm"
        if "softmax" in ops:
            return "attention"
        return "copy" if set(ops.split("_")) <= _LAYOUT_OPS else "elementwise"
    for kind, pattern in _KIND_PATTERNS:
        if re.search(pattern, lowered):
            return kind
    return "elementwise"


@dataclass
class KernelTime:
    """One kernel (CUDA) or op (CPU), summed over the profiled calls and divided by their number."""

    name: str
    kind: str
    launches: float
    """Launches per tower call."""
    ms: float
    """Milliseconds per tower call (self time: what runs inside it, not in its children)."""


@dataclass
class TowerProfile:
    """One configuration's tower at one batch size; times are milliseconds per call."""

    model: str
    backend: str
    dtype: str
    batch: int
    source: str
    """"cuda kernels", "cpu torch ops" or "onnxruntime nodes"."""
    calls: int
    wall_ms: float
    """The tower stage's median wall time, timed without the profiler."""
    gflops_per_image: float
    peak_tflops: Optional[float]
    kernels: List[KernelTime] = field(default_factory=list)
    package_kernels: str = "torch"
    """The reward's ``kernels`` ("triton" or "torch"): which ops ran this package's Triton kernels (on the
    torch backend, its LayerNorms); not the kernels listed above."""

    @property
    def busy_ms(self) -> float:
        return sum(k.ms for k in self.kernels)

    @property
    def by_kind(self) -> Dict[str, float]:
        return {kind: sum(k.ms for k in self.kernels if k.kind == kind) for kind in KINDS}

    @property
    def idle_ms(self) -> float:
        """Wall time with nothing profiled running (never below 0: the profiler's own overhead can
        make the kernels' sum exceed the unprofiled wall time on CPU)."""
        return max(0.0, self.wall_ms - self.busy_ms)

    @property
    def whole_ms(self) -> float:
        """What shares are taken of: the wall time, or the kernels' sum where the profiler's overhead
        (or a second session's, for ONNX Runtime on CPU) makes that larger, so that shares add up to 100%."""
        return max(self.wall_ms, self.busy_ms)

    @property
    def disturbed(self) -> bool:
        """Whether the profiled calls ran far slower than the timed ones (their ops' sum over
        :data:`DISTURBED_FACTOR` times the wall time): other work took the cores while profiling (a profiler's
        own overhead on CPU is tens of percent), so the times say more about the machine than the tower."""
        return self.busy_ms > DISTURBED_FACTOR * self.wall_ms

    @property
    def ceiling_ms(self) -> Optional[float]:
        """The tower's FLOPs at the measured matmul peak (GFLOP / (TFLOP/s) = ms)."""
        return self.gflops_per_image * self.batch / self.peak_tflops if self.peak_tflops else None

    @property
    def matmul_tflops(self) -> Optional[float]:
        """The tower's FLOPs over the time in matmul and attention kernels: the rate those kernels
        reach, against which the peak says how much of the gap is theirs."""
        kinds = self.by_kind
        ms = kinds["matmul"] + kinds["attention"]
        return self.gflops_per_image * self.batch / ms if ms > 0 else None

    def as_json(self) -> Dict[str, object]:
        return {
            "model": self.model, "backend": self.backend, "dtype": self.dtype, "package_kernels": self.package_kernels,
            "batch": self.batch, "source": self.source, "calls": self.calls, "wall_ms": self.wall_ms, "busy_ms": self.busy_ms,
            "idle_ms": self.idle_ms, "by_kind_ms": self.by_kind, "ceiling_ms": self.ceiling_ms,
            "gflops_per_image": self.gflops_per_image, "peak_tflops": self.peak_tflops, "disturbed": self.disturbed,
            "matmul_attention_tflops": self.matmul_tflops,
            "kernels": [vars(k) for k in self.kernels],
        }


def _self_ms(event: Any, on_cuda: bool) -> float:
    """An averaged event's self time in ms (torch < 2.4 names the device field self_cuda_time_total)."""
    if not on_cuda:
        return event.self_cpu_time_total / 1e3
    value = getattr(event, "self_device_time_total", None)
    return (event.self_cuda_time_total if value is None else value) / 1e3


_RANGES = ("## ", "Torch-Compiled Region", "TorchDynamo", "Pregraph bytecode", "AOTDispatcher", "CompiledFxGraph")
"""Names of ranges torch.compile records around its graphs (annotated, or plain ops on CPU): not kernels."""


def summarize_events(events: Iterable[Any], on_cuda: bool, calls: int) -> List[KernelTime]:
    """Averaged profiler events -> kernels per tower call, the costliest first.

    On CUDA only device events count (CPU-side ops and runtime calls are host work, which the idle
    time covers); on CPU only the ops' self time, so that nested ops are not counted twice. Annotated
    ranges are not kernels (on CUDA their "kernel" spans the range's kernels: torch.compile wraps every
    graph call in one, ``## Call CompiledFxGraph ... ##``; on CPU its guard checks and wrappers are
    plain ranges, ``TorchDynamo Cache Lookup``, ``Torch-Compiled Region: 0/1``), so they are left out;
    on CPU the code they run outside torch ops (Inductor's C++ kernels) then shows as idle time.
    """
    totals = []
    for event in events:
        is_device = str(getattr(event, "device_type", "")).endswith(("CUDA", "PrivateUse1"))
        if is_device != on_cuda or getattr(event, "is_user_annotation", False) or event.key.startswith(_RANGES):
            continue
        ms = _self_ms(event, on_cuda)
        if ms > 0:
            totals.append((event.key, ms, event.count))
    return _per_call(totals, calls)


def _per_call(totals: Iterable[tuple], calls: int) -> List[KernelTime]:
    """(name, total ms, count) over ``calls`` calls -> kernels per call, the costliest first."""
    kernels = [KernelTime(name=name, kind=kernel_kind(name), launches=count / calls, ms=ms / calls)
               for name, ms, count in totals]
    return sorted(kernels, key=lambda k: k.ms, reverse=True)


def profile_tower(
    tower: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, *, model: str, backend: str, dtype: str,
    wall_ms: float, gflops_per_image: float, peak_tflops: Optional[float], calls: int = 3, warmup: int = 1,
    package_kernels: str = "torch",
) -> TowerProfile:
    """Profile ``calls`` calls of ``tower(pixels)`` (pixels [N, 3, S, S] on the tower's device) after
    ``warmup`` unprofiled ones; ``wall_ms`` is the caller's unprofiled time per call, and
    ``package_kernels`` the reward's kernels choice, recorded with the profile."""
    from torch.profiler import ProfilerActivity, profile

    meta: Dict[str, Any] = dict(
        model=model, backend=backend, dtype=dtype, batch=pixels.shape[0], calls=calls, wall_ms=wall_ms,
        gflops_per_image=gflops_per_image, peak_tflops=peak_tflops, package_kernels=package_kernels)
    own = tower.profile_nodes(pixels, calls, warmup) if isinstance(tower, VisionBackend) else None
    if own is not None:
        return TowerProfile(source=f"{backend} nodes", kernels=_per_call(own, calls), **meta)
    on_cuda = pixels.device.type == "cuda"
    with torch.inference_mode():
        for _ in range(warmup):
            tower(pixels)
        if on_cuda:
            torch.cuda.synchronize(pixels.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(calls):
                tower(pixels)
            if on_cuda:
                torch.cuda.synchronize(pixels.device)
    kernels = summarize_events(prof.key_averages(), on_cuda, calls)
    if on_cuda and not kernels:  # not "all idle": CUPTI is missing, or another profiler holds it
        raise RuntimeError("torch.profiler recorded no CUDA kernels: CUPTI is unavailable here or taken by another "
                           "profiler (Nsight Systems, a second torch.profiler); the kernel profile needs it.")
    return TowerProfile(source="cuda kernels" if on_cuda else "cpu torch ops", kernels=kernels, **meta)


def three_digits(value: float) -> str:
    """Three significant digits, rounded to nearest; whole numbers with thousands separators once they
    reach 1,000, rounding included (999.7 ms or TFLOP/s read "1,000", never "1e+03"; 1,312 TFLOP/s, an fp8
    peak, never "1.31e+03")."""
    text = f"{value:.3g}"
    return f"{value:,.0f}" if "e+" in text else text


def _ms(value: Optional[float]) -> str:
    return "" if value is None else three_digits(value)


def _share(ms: float, wall: float) -> str:
    return f"{_ms(ms)} ({100 * ms / wall:.0f}%)" if wall > 0 else _ms(ms)


def markdown_kernel_profiles(profiles: Sequence[TowerProfile]) -> List[str]:
    """bench.md's section: one summary line per configuration, then its costliest kernels."""
    if not profiles:
        return []
    lines = [
        "", "## Where the tower's time goes", "",
        f"Milliseconds per tower call over {profiles[0].calls} profiled calls, with their share of the wall time (or of "
        "the kernels' sum where a profiler's overhead makes that larger): device "
        "kernels from `torch.profiler` on CUDA; on CPU torch ops' self time, or ONNX Runtime's nodes from its own "
        "profiler. Wall time from the table above (timed without a profiler). Ceiling: "
        "the tower's FLOPs at the measured matmul peak. 'mm+attn TFLOP/s': the tower's FLOPs over the time in "
        "matmul and attention kernels. Idle: wall time in which nothing profiled ran (on CUDA: launch gaps, "
        "host work; on CPU: time outside the ops profiled).", "",
        "| model | backend | dtype | kernels | batch | source | wall | ceiling | " + " | ".join(KINDS)
        + " | idle | mm+attn TFLOP/s |",
        "|" + "---|" * (10 + len(KINDS)),
    ]
    for p in profiles:
        kinds = p.by_kind
        lines.append(
            f"| {p.model} | {p.backend} | {p.dtype} | {p.package_kernels} | {p.batch} | {p.source} | {_ms(p.wall_ms)} | {_ms(p.ceiling_ms)} | "
            + " | ".join(_share(kinds[k], p.whole_ms) for k in KINDS)
            + f" | {_share(p.idle_ms, p.whole_ms)} | {_ms(p.matmul_tflops)} |"
        )
    for p in profiles:
        if p.disturbed:
            lines += ["", f"Disturbed: the profiled calls of {p.model} {p.backend} {p.dtype} at batch {p.batch} took "
                      f"{p.busy_ms / p.wall_ms:.0f}x the timed ones ({_ms(p.busy_ms)} ms of ops a call against "
                      f"{_ms(p.wall_ms)} ms wall): other work took the cores while profiling, so its times and shares "
                      "are of a slowed run. Profile again on an idle machine."]
    for p in profiles:
        what = "kernels" if p.source.startswith("cuda") else "ops"
        lines += ["", f"{p.model} {p.backend} {p.dtype}, kernels {p.package_kernels}, batch {p.batch}: the costliest "
                  f"{min(TOP_KERNELS, len(p.kernels))} of {len(p.kernels)} {what}", "",
                  "| kernel | kind | launches per call | ms per call | share |", "|---|---|---|---|---|"]
        for k in p.kernels[:TOP_KERNELS]:
            name = k.name if len(k.name) <= 90 else k.name[:87] + "..."
            lines.append(f"| `{name.replace('|', '/')}` | {k.kind} | {k.launches:g} | {_ms(k.ms)} | "
                         f"{100 * k.ms / p.whole_ms:.1f}% |")
    return lines
