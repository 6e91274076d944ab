"""``vlmrm-fast bench``: frames/s per stage of the reward pipeline, against the original code's.

For every model x backend x precision x kernels (``--kernels``: the package's Triton kernels, torch's
ops, or both for an A/B) x batch size, over the same random uint8 frames, each stage is timed on its
own (median of the repeats, frames/s = N / median):

| stage | what is timed |
|---|---|
| ``h2d`` | host frames uint8 [N, H, W, 3] in pageable memory -> device, as ``rm(frames)`` moves them (one copy into pinned memory, then the upload; CUDA only) |
| ``preprocess`` | the fused preprocessing op on device frames -> [N, 3, S, S] in the tower's dtype |
| ``tower`` | ``rm.vision_backend(pixels)`` -> raw embeddings [N, D] |
| ``score`` | ``rm.score(embeddings)`` -> rewards [N] (normalises, and checks finiteness: one sync) |
| ``end_to_end`` | ``rm(frames)`` with the frames already on the device |

Each configuration's accuracy is reported beside its speed: ``reward_error`` is the largest difference
between its rewards and those of the float32 eager path of the same model, over the first
``REWARD_CHECK_FRAMES`` frames (what bf16, fp16, int8 or fp8 cost in reward). TensorRT's fp8 is calibrated
on ``FP8_CALIBRATION_FRAMES`` other random frames, never on the frames it is checked on; the torch and
compile backends' fp8 scales each call's activations from themselves.

The seed pipeline (SPEC §1.4: fp32 weights under fp16 autocast on CUDA, torchvision resize of
480 x 480 frames, a D x D projection) is measured in the same run for every model and batch size, as
the reference for ``speedup_vs_seed``: its end to end is timed in alternation with each
configuration's, so that drifting load on a shared machine cancels out of the ratio. Tower FLOPs
come from :func:`tower_gflops` (SPEC §2), and the achieved TFLOP/s is set against the device's
dense matmul throughput measured in the same run. Backend build time (ONNX export, torch.compile,
TensorRT engine) is reported apart from steady state.

With ``--kernel-profile``, each configuration's tower is also profiled at the largest batch size, and
its time split by kind of kernel against the FLOP ceiling (:mod:`.kernels`). The profiles come after
every timing of the run (their reward models are kept until then), as on CUDA the profiler's CUPTI can
stay attached and slow whatever is timed after it.

Weights are random (no downloads): speed does not depend on them.

Outputs in ``--out``: ``bench.json`` (everything), ``bench.md`` (the table, also printed) and
``bench.png`` (end-to-end frames/s against batch size). The first two are rewritten after every
configuration and the plot after every model, so a run cut short (a job's time limit, SIGTERM or
Ctrl-C) keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, cast

import torch
from tqdm import tqdm

from vlmrm_fast.argtypes import in_cli_terms, writable_file, writable_folder
from vlmrm_fast.atomic import destination_of
from vlmrm_fast.backends import BackendError
from vlmrm_fast.backends.base import missing_cuda_device, parse_device
from vlmrm_fast.backends.fast_path import declined_calls, turned_off
from vlmrm_fast.backends.torch_fp8 import fp8_unsupported_reason
from vlmrm_fast.frames import as_frame_batch
from vlmrm_fast.models import TINY_MODEL, check_model_name, preprocess_spec_of
from vlmrm_fast.ops._triton import HAS_TRITON, interpreter_enabled, resolve_kernels
from vlmrm_fast.precision import float32_convolutions, float32_matmuls
from vlmrm_fast.profiler.flops import _gflops_and_method, create_random_model
from vlmrm_fast.profiler.kernels import profile_tower
from vlmrm_fast.profiler.options import FLOAT_PRECISIONS
from vlmrm_fast.profiler.report import (
    REWARD_CHECK_FRAMES,
    Report,
    Row,
    StageTimings,
    cpu_times,
    load_average,
    _require_matplotlib,
    _stage_row,
    check_targets,
    environment,
    machine_was_busy,
    markdown_report,
    other_cpu_share,
    peak_dtype,
    write_outputs,
)
from vlmrm_fast.profiler.seed import (
    ALPHA,
    BASELINE,
    GOAL,
    SEED,
    SEED_CUDA_DTYPE,
    SEED_FRAME_SIZE,
    SeedPipeline,
)
from vlmrm_fast.profiler.timing import StageTimer, measure_peak_tflops, sigterm_as_interrupt
from vlmrm_fast.reward import CLIPReward

DTYPES = dict(zip(FLOAT_PRECISIONS, (torch.float32, torch.bfloat16, torch.float16)))
QUANTIZED = {"int8": (("onnxruntime",), torch.float32), "fp8": (("torch", "compile", "tensorrt"), torch.bfloat16)}
"""Precisions that are a quantisation option of some backends: (those backends, the tower's float dtype)."""
FP8_CALIBRATION_FRAMES = 64
PEAK_DTYPES = {**DTYPES, "fp8": torch.float8_e4m3fn}
"""The matmul precisions whose peak a run measures (fp8 as the torch backends' fp8 runs; on CUDA only)."""


# --------------------------------------------------------------------------- configuration


@dataclass
class BenchConfig:
    """The resolved options of one run (device-dependent defaults filled in)."""

    models: List[str]
    batch_sizes: List[int]
    backends: List[str]
    dtypes: List[str]
    frame_size: int
    device: torch.device
    repeats: int
    warmup: int
    time_budget: float
    seed: bool
    out: Path
    progress: bool
    plot: bool
    quick: bool
    kernel_profile: bool = False
    compile_mode: Optional[str] = None
    """torch.compile's mode for the compile backend's rows; None for the backend's default."""
    kernels: List[str] = field(default_factory=lambda: ["torch"])
    """The reward's kernels, resolved for the device ("triton", "torch" or both): every backend and
    precision is measured with each."""

    def as_json(self) -> Dict[str, Any]:
        return {key: str(value) if isinstance(value, (Path, torch.device)) else value for key, value in asdict(self).items()}


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    """Fill in the defaults for the device (and ``--quick``), and check the model names."""
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device is None:
        raise ValueError(f"--device {args.device!r} is not a device: pass cuda, cuda:N or cpu.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; pass --device cpu.")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {device}: only cuda and cpu are profiled.")
    why = missing_cuda_device(device)
    if why:
        raise ValueError(f"--device {device}: {why}.")
    on_cuda = device.type == "cuda"
    if args.quick:
        defaults: Dict[str, Any] = dict(models=[TINY_MODEL], batch_sizes=[1, 8], backends=["torch", "onnxruntime"],
                                        repeats=3)
    elif on_cuda:
        defaults = dict(models=["ViT-B-32", "ViT-L-14", "ViT-bigG-14"], batch_sizes=[1, 8, 64, 256, 1024],
                        backends=["torch", "compile"], repeats=20)
    else:
        defaults = dict(models=[TINY_MODEL, "ViT-B-32"], batch_sizes=[1, 8, 32], backends=["torch", "onnxruntime"], repeats=3)
    dtypes = args.dtypes or (["bf16"] if on_cuda else ["fp32"])  # short names: the parser spells them so
    models = list(dict.fromkeys(args.models or defaults["models"]))
    for model in models:
        check_model_name(model)  # suggests close names
    if not (math.isfinite(args.time_budget) and args.time_budget > 0):  # inf: bench.json is JSON, which has no inf
        raise ValueError(f"--time-budget must be a positive number of seconds; got {args.time_budget}.")
    kernels = []
    for choice in getattr(args, "kernels", None) or ["auto"]:
        try:
            kernels.append(resolve_kernels(choice, device))
        except ValueError as error:  # in the command's terms: "pass kernels='torch'" -> "pass --kernels torch"
            raise ValueError(re.sub(r"kernels='(\w+)'", r"--kernels \1", str(error))) from None
    backends = list(dict.fromkeys(args.backends or defaults["backends"]))
    if getattr(args, "compile_mode", None) is not None and "compile" not in backends:
        raise ValueError(f"--compile-mode {args.compile_mode} sets the compile backend's torch.compile mode, but no "
                         f"compile rows run here (--backends {' '.join(backends)}): add compile to --backends, or "
                         "leave --compile-mode out")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return BenchConfig(
        models=models,
        batch_sizes=sorted(set(args.batch_sizes or defaults["batch_sizes"])),
        backends=backends,
        dtypes=list(dict.fromkeys(dtypes)),
        frame_size=args.frame_size,
        device=device,
        repeats=args.repeats or defaults["repeats"],
        warmup=args.warmup or (3 if on_cuda else 1),
        time_budget=args.time_budget,
        seed=not args.no_seed,
        # The pid too: two runs started in the same second (a job array) shared a folder, one's files lost.
        out=args.out or Path("runs") / f"bench-{stamp}-{os.getpid()}",
        progress=not args.no_progress,
        plot=not args.no_plot,
        quick=args.quick,
        kernel_profile=args.kernel_profile,
        compile_mode=getattr(args, "compile_mode", None),
        kernels=list(dict.fromkeys(kernels)),
    )


def backend_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` at all (None when it may); precision limits are
    found when the backend is built, and reported the same way."""
    on_cuda = device.type == "cuda"
    if backend == "compile":
        if on_cuda and not HAS_TRITON:
            return "torch.compile on CUDA needs the triton package, which is not installed"
        if not on_cuda and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
            return "torch.compile on CPU needs a C++ compiler (g++ or clang++), none found"
    if backend == "onnxruntime":
        for module in ("onnxruntime", "onnx"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed (pip install 'vlmrm-fast[export]')"
        if on_cuda:
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    if backend == "tensorrt":
        if not on_cuda:
            return "TensorRT runs on CUDA devices only"
        try:
            importlib.import_module("tensorrt")
        except Exception as error:  # a broken install raises more than ImportError
            return f"tensorrt is not importable ({type(error).__name__}: {error}); pip install 'vlmrm-fast[tensorrt]'"
    return None


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """No TF32 in cuDNN convolutions (on by default) or cuBLAS matmuls while the reference runs."""
    with float32_matmuls(), float32_convolutions():
        yield


def calibration_frames(n: int, size: int) -> torch.Tensor:
    """Random uint8 frames [n, size, size, 3] on the CPU, from another seed than :class:`Frames`'."""
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@dataclass
class Frames:
    """Random uint8 frames for the largest batch, sliced for smaller ones.

    ``device`` [N, F, F, 3] at the run's frame size; on CUDA also ``host``, the same frames in pageable
    host memory, where a user's frames usually are, for the h2d stage. For the seed,
    ``seed_device`` at 480 x 480 and, on CUDA, ``seed_pageable`` in pageable host memory (the
    original's copies were pageable); both None without the seed.
    """

    device: torch.Tensor
    host: Optional[torch.Tensor]
    seed_device: Optional[torch.Tensor]
    seed_pageable: Optional[torch.Tensor]

    @classmethod
    def make(cls, n: int, size: int, device: torch.device, seed: bool) -> "Frames":
        """The frames, or a ValueError naming the batch size and the memory they need where they do not fit (also
        before trying, where they would take more than the memory available: Linux may grant the allocation and
        end the process later, as its memory runs out)."""
        host = torch.device("cpu")  # the frames are drawn in host memory first, and kept there on CUDA
        for memory in dict.fromkeys((host, device)):
            free = available_memory(memory)
            if free is not None and frame_bytes(n, size, seed) > free:
                raise ValueError(frames_do_not_fit(n, size, memory, seed, free))
        try:
            return cls._make(n, size, device, seed)
        except (RuntimeError, MemoryError) as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(error):
                raise
            failed = device if isinstance(error, torch.cuda.OutOfMemoryError) or "cuda" in str(error).lower() else host
            raise ValueError(frames_do_not_fit(n, size, failed, seed, available_memory(failed))) from None

    @classmethod
    def _make(cls, n: int, size: int, device: torch.device, seed: bool) -> "Frames":
        generator = torch.Generator().manual_seed(0)

        def noise(side: int) -> torch.Tensor:
            return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=generator)

        host = noise(size)
        seed_host = None if not seed else host if size == SEED_FRAME_SIZE else noise(SEED_FRAME_SIZE)
        on_cuda = device.type == "cuda"
        frames = host.to(device)
        return cls(
            device=frames,
            host=host if on_cuda else None,
            seed_device=None if seed_host is None else frames if seed_host is host else seed_host.to(device),
            seed_pageable=seed_host if on_cuda else None,
        )


OUT_OF_MEMORY_HINT = ("out of memory: pass smaller --batch-sizes (a configuration's activations grow with its batch), "
                      "or a lower --dtypes")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed: torch's CPU allocator ("DefaultCPUAllocator: can't allocate
    memory"), CUDA's ("CUDA out of memory"), or Python's MemoryError."""
    text = str(error).lower()
    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free on ``device`` (CUDA's free memory; on the CPU, Linux's MemAvailable), or None where unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError, IndexError):
        pass
    return None


def frame_bytes(n: int, size: int, seed: bool) -> int:
    """Bytes of :class:`Frames`' random frames for the largest batch ``n`` (one copy on the device)."""
    seed_bytes = n * SEED_FRAME_SIZE * SEED_FRAME_SIZE * 3 if seed and size != SEED_FRAME_SIZE else 0
    return n * size * size * 3 + seed_bytes


def frames_do_not_fit(n: int, size: int, device: torch.device, seed: bool, free: Optional[int]) -> str:
    """The error for a largest batch ``n`` whose random frames cannot be had on ``device`` (``free`` bytes free)."""
    seed_part = f" and at {SEED_FRAME_SIZE} x {SEED_FRAME_SIZE} for the seed" if seed and size != SEED_FRAME_SIZE else ""
    have = f" ({free / 1e9:.1f} GB available)" if free is not None else ""
    # At batch 1 only the frame size can come down; above the seed's 480, it may be what was not meant.
    fix = ("pass a smaller --frame-size" if n == 1 else "pass smaller --batch-sizes"
           + (" or a smaller --frame-size" if size > SEED_FRAME_SIZE else ""))
    return (f"out of memory at --batch-sizes {n}: its frames alone ({n} x {size} x {size} x 3 bytes{seed_part}) "
            f"take {frame_bytes(n, size, seed) / 1e9:.1f} GB, more than the {device.type} memory could give{have}; "
            f"{fix} (the tower's activations need memory besides)")


class Profiler:
    """Runs the configurations of one :class:`BenchConfig` and fills a :class:`Report`."""

    def __init__(self, config: BenchConfig, report: Report, bar: tqdm, began: float) -> None:
        self.config = config
        self.report = report
        self.bar = bar
        self.began = began
        self.device = config.device
        self.timer = StageTimer(config.device, config.warmup, config.repeats, config.time_budget)
        self.frames = Frames.make(max(config.batch_sizes), config.frame_size, config.device, config.seed)
        self.to_profile: List[tuple] = []
        """(reward model, model name, dtype, GFLOP per image) per configuration, for --kernel-profile."""

    def say(self, message: str) -> None:
        tqdm.write(message)

    def save(self, plot: bool = False) -> None:
        """Write what has been measured so far (bench.json, bench.md; bench.png with ``plot``)."""
        self.report.set_peaks()
        self.report.fast_paths_off = turned_off()
        self.report.elapsed_seconds = time.perf_counter() - self.began
        write_outputs(self.report, self.config, plot=plot and self.config.plot)

    def skip(self, what: str, reason: str) -> None:
        self.report.skipped.append({"what": what, "reason": reason})
        self.say(f"skipped {what}: {reason}")

    def fail(self, what: str, error: BaseException) -> None:
        text = f"{type(error).__name__}: {error}"
        if is_out_of_memory(error):  # the frames fitted, the tower's activations did not
            text = f"{OUT_OF_MEMORY_HINT} ({text})"
        self.report.failures.append({"what": what, "error": text[:2000]})
        self.say(f"FAILED {what}: {text[:500]}")
        self._free()

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def measure_peaks(self, dtypes: Sequence[str]) -> None:
        """One matmul measurement per dtype; taken before and after every model, so that a busy
        moment on a shared machine does not become the ceiling."""
        for name in dtypes:
            self.bar.set_description(f"matmul peak {name}")
            self.report.add_peak(name, *measure_peak_tflops(self.device, PEAK_DTYPES[name], self.timer))

    def profile_model(self, name: str, backends: Sequence[str]) -> None:
        """The seed, then every backend x dtype, over all batch sizes, for one model."""
        self.bar.set_description(f"{name}: creating")
        start = time.perf_counter()
        base, tokenizer = create_random_model(name)
        create_seconds = time.perf_counter() - start
        gflops, method = _gflops_and_method(base)
        self.report.models[name] = {"create_seconds": create_seconds, "tower_gflops": gflops, "flops_method": method}
        self.say(f"{name}: created in {create_seconds:.1f} s (random weights); tower {gflops:.4g} GFLOP/image ({method})")
        if self.device.type == "cuda":  # each configuration copies it: device copies, not host copies of up to 10 GB
            base = base.to(self.device)
        seed = self._profile_seed(name, base, gflops, method) if self.config.seed else None
        self.save()
        reference = self._reference_rewards(name, base, tokenizer)
        for backend in backends:
            for dtype in self.config.dtypes:
                for kernels in self.config.kernels:
                    self._profile_backend(name, base, tokenizer, backend, dtype, gflops, method, seed, reference,
                                          kernels=kernels)
                    self.save()
        del base, seed
        self._free()

    def _reward_model(self, base: torch.nn.Module, tokenizer: Callable, name: str, **options: Any) -> CLIPReward:
        """A CLIPReward over a copy of ``base`` with the run's task, on the run's device."""
        return CLIPReward(copy.deepcopy(base), tokenizer, goal=GOAL, baseline=BASELINE, alpha=ALPHA,
                          device=self.device, model_name=name, **options)

    def _reference_rewards(self, name: str, base: torch.nn.Module, tokenizer: Callable) -> Optional[torch.Tensor]:
        """Rewards [k] of the first ``REWARD_CHECK_FRAMES`` frames through the float32 eager path
        (torch backend and ops), against which every configuration's ``reward_error`` is taken."""
        try:
            rm = self._reward_model(base, tokenizer, name, dtype=torch.float32, backend="torch", kernels="torch")
            with torch.inference_mode(), _full_float32():
                rewards = rm(self.frames.device[:REWARD_CHECK_FRAMES])
        except Exception as error:
            self.fail(f"{name} float32 reference rewards (no reward errors)", error)
            return None
        del rm
        self._free()
        return rewards

    def _profile_seed(self, name: str, base: torch.nn.Module, gflops: float, method: str) -> Optional[SeedPipeline]:
        """The seed's rows for every batch size; the pipeline is kept for the backends' paired timings."""
        batches = self.config.batch_sizes
        what = f"{name} seed"
        if importlib.util.find_spec("torchvision") is None:
            self.skip(what, "torchvision is not installed (the seed resizes with it); no speedups")
            self.bar.update(len(batches))
            return None
        try:
            seed = SeedPipeline(copy.deepcopy(base), preprocess_spec_of(base, "vlmrm"), self.device)
        except Exception as error:
            self.fail(what, error)
            self.bar.update(len(batches))
            return None
        dtype = SEED_CUDA_DTYPE if self.device.type == "cuda" else "fp32"
        for n in batches:
            self.bar.set_description(f"{name} seed b={n}")
            try:
                self.report.rows.append(self._measure_seed(name, seed, n, dtype, gflops, method))
            except Exception as error:
                self.fail(f"{what} batch {n}", error)
            self.bar.update(1)
        return seed

    def _measure_seed(self, name: str, seed: SeedPipeline, n: int, dtype: str, gflops: float, method: str) -> Row:
        frames = cast(torch.Tensor, self.frames.seed_device)[:n]  # made where the seed runs
        pageable = self.frames.seed_pageable
        timer = self.timer
        with torch.inference_mode():
            timings: StageTimings = {"h2d": None if pageable is None else timer(lambda: pageable[:n].to(self.device))}
            pixels = seed.preprocess(frames)
            timings["preprocess"] = timer(lambda: seed.preprocess(frames))
            embeddings = seed.tower(pixels)
            timings["tower"] = timer(lambda: seed.tower(pixels))
            timings["score"] = timer(lambda: seed.score(embeddings))
            timings["end_to_end"] = timer(lambda: seed(frames))
        return _stage_row(
            model=name, backend=SEED, dtype=dtype, kernels="torch", batch=n, frame_size=SEED_FRAME_SIZE,
            timings=timings, gflops=gflops, flops_method=method, build_seconds=0.0, setup_seconds=0.0,
        )

    def _profile_backend(
        self, name: str, base: torch.nn.Module, tokenizer: Callable, backend: str, dtype: str, gflops: float,
        method: str, seed: Optional[SeedPipeline], reference: Optional[torch.Tensor], kernels: Optional[str] = None,
    ) -> None:
        """One backend at one precision with one choice of kernels (the run's first by default), over
        every batch size."""
        batches = self.config.batch_sizes
        kernels = kernels or self.config.kernels[0]
        what = f"{name} {backend} {dtype}" + (f" kernels={kernels}" if len(self.config.kernels) > 1 else "")
        if dtype in QUANTIZED and backend not in QUANTIZED[dtype][0]:
            *others, last = QUANTIZED[dtype][0]
            owners = f"{', '.join(others)} and {last} backends" if others else f"{last} backend"
            self.skip(what, f"{dtype} is a quantisation of the {owners} only")
            self.bar.update(len(batches))
            return
        options: Optional[Dict[str, Any]] = None
        if backend == "compile":
            options = {"buckets": tuple(batches)}
            if self.config.compile_mode is not None:
                options["mode"] = self.config.compile_mode
        if dtype in QUANTIZED:
            options = {**(options or {}), "quantize": dtype}
            if backend == "tensorrt":  # its fp8 scales activations statically; torch's per call
                options["calibration_frames"] = calibration_frames(FP8_CALIBRATION_FRAMES, self.config.frame_size)
        self.bar.set_description(f"{what}: building")
        start = time.perf_counter()
        try:
            rm = self._reward_model(
                base, tokenizer, name, dtype=QUANTIZED[dtype][1] if dtype in QUANTIZED else DTYPES[dtype],
                backend=backend, max_batch_size=max(batches), backend_options=options, kernels=kernels,
            )
            warmup = getattr(rm.vision_backend, "warmup", None)
            if callable(warmup):  # compile now, so that compilation is measured apart, not timed
                warmup()
        except BackendError as error:
            self.skip(what, in_cli_terms(str(error)))
            self.bar.update(len(batches))
            self._free()
            return
        except Exception as error:
            self.fail(f"{what} (build)", error)
            self.bar.update(len(batches))
            return
        setup_seconds = time.perf_counter() - start
        reward_error = None
        if reference is not None:
            try:
                with torch.inference_mode():
                    rewards = rm(self.frames.device[:REWARD_CHECK_FRAMES])
                reward_error = (rewards.double() - reference.double()).abs().max().item()
            except Exception as error:
                self.fail(f"{what} (rewards)", error)
                self.bar.update(len(batches))
                return
        for n in batches:
            self.bar.set_description(f"{what} b={n}")
            try:
                row = self._measure_reward(rm, name, dtype, n, gflops, method, setup_seconds, seed)
                row.reward_error = reward_error
                self.report.rows.append(row)
            except Exception as error:
                self.fail(f"{what} batch {n}", error)
            self.bar.update(1)
        if self.config.kernel_profile:
            self.to_profile.append((rm, name, dtype, gflops))
        del rm
        self._free()

    def profile_kernels(self) -> None:
        """The kernel profiles of the configurations kept for them, once every timing of the run is
        done: on CUDA, CUPTI can stay attached after a profile and slow what is timed after it."""
        while self.to_profile:
            rm, name, dtype, gflops = self.to_profile.pop(0)
            self._profile_kernels(rm, name, dtype, gflops)
            del rm
            self._free()
            self.save()

    def _profile_kernels(self, rm: CLIPReward, name: str, dtype: str, gflops: float) -> None:
        """The tower's kernels at the largest batch size, beside that batch's row (none if it failed)."""
        n = max(self.config.batch_sizes)
        key = (name, rm.backend, dtype, kernels_label(rm.kernels), n)
        row = next((r for r in self.report.rows if (r.model, r.backend, r.dtype, r.kernels, r.batch) == key), None)
        if row is None:
            return
        configuration = f"{name} {rm.backend} {dtype}" + (f" kernels={rm.kernels}" if len(self.config.kernels) > 1 else "")
        what = f"{configuration} batch {n} kernel profile"
        self.bar.set_description(f"{configuration} b={n}: kernel profile")
        try:
            pixels = rm._pixels(self.frames.device[:n], False)
            self.report.kernel_profiles.append(profile_tower(
                rm.vision_backend, pixels, model=name, backend=rm.backend, dtype=dtype, package_kernels=kernels_label(rm.kernels),
                wall_ms=1e3 * row.timings["tower"].median_s, gflops_per_image=gflops,
                peak_tflops=self.report.peak_tflops.get(peak_dtype(dtype)),
            ))
        except Exception as error:
            self.fail(what, error)

    def _measure_reward(
        self, rm: CLIPReward, name: str, dtype: str, n: int, gflops: float, method: str, setup_seconds: float,
        seed: Optional[SeedPipeline],
    ) -> Row:
        """Every stage of ``rm`` at batch ``n``; end to end in alternation with the seed where the
        seed ran at that batch size, so that the speedup compares calls made side by side."""
        frames = self.frames.device[:n]
        declined_before = declined_calls()
        seed_ran = any(r.backend == SEED and r.model == name and r.batch == n for r in self.report.rows)
        timer = self.timer
        with torch.inference_mode():
            timings: StageTimings = {"h2d": None}
            if self.frames.host is not None:  # the upload rm(frames) makes of host frames, staging included
                host, device = self.frames.host[:n], frames.device
                timings["h2d"] = timer(lambda: as_frame_batch(host).chunk(0, n, device))
            # The op on one chunk, as rm(frames) runs it; rm.preprocess would add a concatenation.
            pixels = rm._pixels(frames, False)
            timings["preprocess"] = timer(lambda: rm._pixels(frames, False))
            embeddings = rm.vision_backend(pixels)
            timings["tower"] = timer(lambda: rm.vision_backend(pixels))
            timings["score"] = timer(lambda: rm.score(embeddings))
            if seed is not None and seed_ran:
                seed_frames = cast(torch.Tensor, self.frames.seed_device)[:n]  # made where the seed runs
                timings["end_to_end"], timings["seed_end_to_end"] = timer.paired(
                    lambda: rm(frames), lambda: seed(seed_frames))
            else:
                timings["end_to_end"] = timer(lambda: rm(frames))
        row = _stage_row(
            model=name, backend=rm.backend, dtype=dtype, kernels=kernels_label(rm.kernels), batch=n,
            frame_size=self.config.frame_size, timings=timings, gflops=gflops, flops_method=method,
            build_seconds=rm.vision_backend.build_seconds, setup_seconds=setup_seconds,
            build_cached=rm.vision_backend.build_cached,
        )
        declined = declined_calls()
        row.fast_paths_off = sorted(name for name, count in declined.items() if count > declined_before.get(name, 0))
        if "seed_end_to_end" in timings:
            row.seed_fps = n / timings["seed_end_to_end"].median_s
            row.speedup_vs_seed = row.end_to_end_fps / row.seed_fps
        return row


def kernels_label(kernels: str) -> str:
    """How rows name a reward's kernels: "triton-interpret" where the Triton kernels ran in Triton's CPU
    interpreter (``TRITON_INTERPRET=1``), whose times measure the interpreter, not the kernels."""
    return "triton-interpret" if kernels == "triton" and interpreter_enabled() else kernels


def peak_precisions(config: BenchConfig) -> List[str]:
    """The precisions whose matmul peak a run measures: its float ones, the seed's own (fp16 autocast on
    CUDA, fp32 on CPU: its rows are set against it), and fp8 where the torch backends' fp8 can run (an fp8
    product elsewhere would fail, not skip). int8 has none: its rows show no 'of peak'."""
    seed = ["fp16" if config.device.type == "cuda" else "fp32"] if config.seed else []
    return [d for d in dict.fromkeys(config.dtypes + seed)
            if d in DTYPES or (d == "fp8" and fp8_unsupported_reason(config.device, torch.bfloat16) is None)]


def _set_targets(report: Report, config: BenchConfig) -> None:
    """The run's targets, with the load average at its end and the CPU time other processes took so far (a busy
    machine marks a speedup met)."""
    env = report.environment
    env["load_average_end"] = load_average()
    env["other_cpu_share"] = other_cpu_share(env.get("cpu_times_start"), cpu_times(), env.get("cpu_count"))
    report.targets = check_targets(report.rows, config.device, busy=machine_was_busy(env))


def earlier_run(out: Path) -> Optional[str]:
    """What an earlier bench run left in ``out`` ("a run of 5 rows from TIMESTAMP"), or None: a run into the
    same folder replaces its files, and should say so."""
    path = out / "bench.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return f"a run of {len(data['rows'])} rows from {data['environment']['timestamp']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a bench.json that could not be read"


def run_bench(args: argparse.Namespace) -> int:
    """``vlmrm-fast bench``: profile, write bench.json/.md/.png, print the table.

    Returns 0, or 1 when a configuration failed (the others are still reported) or nothing was measured.
    """
    config = resolve_config(args)
    if config.plot:
        _require_matplotlib()
    made = [folder for folder in (config.out, *config.out.parents) if not os.path.lexists(folder)]
    writable_folder(config.out, "--out")
    try:
        return _run_bench(config)
    except BaseException:  # an error before the first report was written: no empty folder of ours is left
        for folder in made:  # innermost first; one with anything in it stays, with its parents
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _run_bench(config: BenchConfig) -> int:
    """:func:`run_bench` once ``--out`` is known to be writable."""
    # A link among the reports is written through; one that cannot be is named now, not after the measuring.
    for name in ("bench.json", "bench.md", "bench.png"):
        writable_file(config.out / name, "--out")
    earlier = earlier_run(config.out)
    # An earlier run's plot in the same folder would pass for this run's (bench.json and .md are rewritten). It is
    # removed once this run can measure: a run refused before (no backend runs here, frames that do not fit) keeps
    # the earlier run's three files together.
    stale_plot = destination_of(config.out / "bench.png")
    began = time.perf_counter()
    report = Report(environment=environment(config.device), config=config.as_json())
    backends = []
    for backend in config.backends:
        reason = backend_unavailable(backend, config.device)
        if reason is None:
            backends.append(backend)
        else:
            report.skipped.append({"what": backend, "reason": reason})
    if not backends and not config.seed:
        raise ValueError("none of the chosen backends can run here: " + "; ".join(
            f"{s['what']}: {s['reason']}" for s in report.skipped))

    env = report.environment
    print(f"vlmrm-fast bench on {env['device']} (torch {env['torch']}, commit {env['commit']}): "
          f"{len(config.models)} model(s) x batch {config.batch_sizes} x {backends} x {config.dtypes} x kernels "
          f"{config.kernels}, "
          f"{config.frame_size}x{config.frame_size} frames, weights random (speed does not depend on them)")
    for skipped in report.skipped:
        print(f"skipped {skipped['what']}: {skipped['reason']}")
    if earlier:
        replaced = "bench.json, bench.md and bench.png replace it" if config.plot else \
            "bench.json and bench.md replace it, and its bench.png is removed (--no-plot)"
        print(f"note: {config.out} held {earlier}; this run's {replaced}")
    if interpreter_enabled():
        print("note: TRITON_INTERPRET=1; the Triton kernels would run in Triton's interpreter (kernels=auto picks "
              "the torch path on CPU)")

    per_model = len(config.batch_sizes) * (len(backends) * len(config.dtypes) * len(config.kernels) + int(config.seed))
    peak_dtypes = peak_precisions(config)
    try:
        with tqdm(total=per_model * len(config.models), unit="config", disable=None if config.progress else True,
                  file=sys.stderr, dynamic_ncols=True) as bar, sigterm_as_interrupt():
            profiler = Profiler(config, report, bar, began)
            stale_plot.unlink(missing_ok=True)
            profiler.measure_peaks(peak_dtypes)
            for name in config.models:
                try:
                    profiler.profile_model(name, backends)
                except Exception as error:  # model creation; the other models still run
                    profiler.fail(f"{name} (create)", error)
                profiler.measure_peaks(peak_dtypes)
                profiler.save(plot=True)
            profiler.profile_kernels()  # each saves the report with the peaks set
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (a job's time limit): keep what was measured, marked incomplete
        stale_plot.unlink(missing_ok=True)  # the new bench.json and .md replace the earlier run's (a plot with rows)
        report.set_peaks()  # the rows measured since the last save have none yet
        _set_targets(report, config)
        report.elapsed_seconds = time.perf_counter() - began
        written = write_outputs(report, config)
        print(f"interrupted after {report.elapsed_seconds:.0f} s; wrote what was measured: "
              f"{', '.join(map(str, written))}", file=sys.stderr)
        raise
    _set_targets(report, config)
    report.complete = True
    report.elapsed_seconds = time.perf_counter() - began
    written = write_outputs(report, config)
    print()
    print(markdown_report(report))
    print(f"{len(report.rows)} rows in {report.elapsed_seconds:.1f} s; wrote {', '.join(map(str, written))}")
    if not any(r.backend != SEED for r in report.rows):  # the seed's rows alone are no measurement asked for
        # No model created: the backends and dtypes were never tried, so the fix is in --models (or the network).
        uncreated = {f["what"][:-len(" (create)")] for f in report.failures if f["what"].endswith(" (create)")}
        hint = (f"no model could be created ({', '.join(config.models)}); check --models (the failure "
                "above says why)" if uncreated >= set(config.models) else
                "choose backends and --dtypes that run on this device")
        print("no configuration was measured (the seed's rows are only its reference): every one was skipped or failed "
              f"(see above); {hint}", file=sys.stderr)
        return 1
    return 1 if report.failures else 0
