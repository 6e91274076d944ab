"""``vlmrm-fast bench``: frames/s per stage of the reward pipeline, against the original code's.

For every model x backend x precision x batch size, over the same random uint8 frames, each stage is
timed on its own (median of the repeats, frames/s = N / median):

| stage | what is timed |
|---|---|
| ``h2d`` | pinned host frames uint8 [N, H, W, 3] -> device (CUDA only; not applicable on CPU) |
| ``preprocess`` | the fused preprocessing op on device frames -> [N, 3, S, S] in the tower's dtype |
| ``tower`` | ``rm.vision_backend(pixels)`` -> raw embeddings [N, D] |
| ``score`` | ``rm.score(embeddings)`` -> rewards [N] (normalises, and checks finiteness: one sync) |
| ``end_to_end`` | ``rm(frames)`` with the frames already on the device |

The seed pipeline (SPEC §1.4: fp32 weights under fp16 autocast on CUDA, torchvision resize of
480 x 480 frames, a D x D projection) is measured in the same run for every model and batch size, as
the reference for ``speedup_vs_seed``: its end to end is timed in alternation with each
configuration's, so that drifting load on a shared machine cancels out of the ratio. Tower FLOPs
come from :func:`tower_gflops` (SPEC §2), and the achieved TFLOP/s is set against the device's
dense matmul throughput measured in the same run. Backend build time (ONNX export, torch.compile,
TensorRT engine) is reported apart from steady state.

Weights are random (no downloads): speed does not depend on them.

Outputs in ``--out``: ``bench.json`` (everything), ``bench.md`` (the table, also printed) and
``bench.png`` (end-to-end frames/s against batch size). They are rewritten after every model, so a
run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlmrm_fast.backends import BackendError
from vlmrm_fast.models import TINY_MODEL, create_clip, preprocess_spec_of, register_model_configs
from vlmrm_fast.ops._triton import HAS_TRITON, interpreter_enabled
from vlmrm_fast.ops.preprocess import PreprocessSpec, preprocess
from vlmrm_fast.reward import CLIPReward
from vlmrm_fast.run_info import command_output, cpu_name, git_commit, package_version

BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

SEED_FRAME_SIZE = 480
"""The original code rendered 480 x 480 frames (SPEC §1.3); the seed is always measured on those."""
SEED = "seed"
SEED_CUDA_DTYPE = "fp16-autocast"  # fp32 weights under torch.autocast(float16), as the original ran
GOAL, BASELINE, ALPHA = "a humanoid robot kneeling", "a humanoid robot", 0.5

MIN_REPEATS = 3
SWITCH_PAUSE_S = 0.1
"""On CPU, an idle pause before each stage's timing and at each switch between two pipelines timed in
alternation: ONNX Runtime's worker threads spin for tens of milliseconds after a run and halve the
speed of the torch work that follows, which would otherwise be charged to the next stage or pipeline."""
L2_FLUSH_BYTES = 256 << 20  # more than any GPU's L2: no repeat reads the previous one's data from cache
PEAK_SIZE = {"cuda": 8192, "cpu": 2048}
PEAK_CALL_S = 0.2
CLI_EXTRA = "pip install 'vlmrm-fast[cli]'"
REPO_ROOT = Path(__file__).resolve().parent.parent

GPU_FPS_TARGETS = {"ViT-B-32": 50_000.0, "ViT-L-14": 3_900.0, "ViT-bigG-14": 650.0}
"""End-to-end frames/s on the GPU in bf16, from uint8 frames already on the GPU."""
GPU_SPEEDUP_TARGETS = {"ViT-bigG-14": 3.0}
CPU_SPEEDUP_TARGETS = {"ViT-B-32": 1.5}


# --------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class ViTShape:
    """What an open_clip VisionTransformer's cost depends on."""

    width: int
    layers: int
    patch: Tuple[int, int]
    image: Tuple[int, int]
    mlp_hidden: int
    embed_dim: Optional[int]  # None: no output projection

    @property
    def tokens(self) -> int:
        """Patches plus the class token."""
        return (self.image[0] // self.patch[0]) * (self.image[1] // self.patch[1]) + 1

    def gflops(self) -> float:
        """GFLOP per image, FLOPs = 2 x multiply-adds (open_clip's profile convention, SPEC §2).

        Per layer: the q, k, v and output projections (4 w^2 per token), the MLP (2 w h per token)
        and attention itself (QK^T and AV, t^2 w each). Layer norms, softmax and GELU are left out,
        as in the published table.
        """
        t, w = self.tokens, self.width
        patch_embed = (t - 1) * w * 3 * self.patch[0] * self.patch[1]
        per_layer = t * (4 * w * w + 2 * w * self.mlp_hidden) + 2 * t * t * w
        projection = w * self.embed_dim if self.embed_dim else 0
        return 2 * (patch_embed + self.layers * per_layer + projection) / 1e9


def _pair(value: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def vit_shape_from_config(model_name: str) -> Optional[ViTShape]:
    """The tower's shape from open_clip's config alone (nothing instantiated); None for towers that
    are not open_clip VisionTransformers (ResNets, timm towers, attentional pooling)."""
    register_model_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"open_clip has no config for model {model_name!r}.")
    vision = config["vision_cfg"]
    if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)) or vision.get("attentional_pool"):
        return None
    width = int(vision["width"])
    return ViTShape(
        width=width,
        layers=int(vision["layers"]),
        patch=_pair(vision["patch_size"]),
        image=_pair(vision["image_size"]),
        mlp_hidden=int(width * vision.get("mlp_ratio", 4.0)),  # open_clip truncates the same way
        embed_dim=int(config["embed_dim"]),
    )


def vit_shape_from_tower(visual: torch.nn.Module) -> Optional[ViTShape]:
    """The shape read off an instantiated tower; None when it is not a plain open_clip ViT."""
    if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None:
        return None
    fc = getattr(getattr(visual.transformer.resblocks[0], "mlp", None), "c_fc", None)
    if not isinstance(fc, torch.nn.Linear):
        return None
    return ViTShape(
        width=int(visual.transformer.width),
        layers=int(visual.transformer.layers),
        patch=_pair(visual.patch_size),
        image=_pair(visual.image_size),
        mlp_hidden=int(fc.out_features),
        embed_dim=None if visual.proj is None else int(visual.proj.shape[1]),
    )


def counted_gflops(visual: torch.nn.Module) -> float:
    """GFLOP per image counted by ``torch.utils.flop_counter`` over one forward pass at the tower's
    input size. It counts matmuls and convolutions only, so it may undercount (custom kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    height, width = _pair(getattr(visual, "image_size", 224))
    parameter = next(visual.parameters())
    pixels = torch.zeros((1, 3, height, width), dtype=parameter.dtype, device=parameter.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        visual(pixels)
    return counter.get_total_flops() / 1e9


def _gflops_and_method(model: Union[str, torch.nn.Module]) -> Tuple[float, str]:
    """(GFLOP per image, "analytic" or "flop-counter") for a model name, a CLIP model or its tower."""
    if isinstance(model, str):
        shape = vit_shape_from_config(model)
        if shape is not None:
            return shape.gflops(), "analytic"
        model, _ = _create_model(model)
    visual = getattr(model, "visual", model)
    shape = vit_shape_from_tower(visual)
    if shape is not None:
        return shape.gflops(), "analytic"
    warnings.warn(
        f"{type(visual).__name__} is not an open_clip VisionTransformer: its FLOPs are counted by "
        "torch.utils.flop_counter, which may undercount (it sees matmuls and convolutions only).",
        UserWarning,
        stacklevel=3,
    )
    return counted_gflops(visual), "flop-counter"


def tower_gflops(model: Union[str, torch.nn.Module]) -> float:
    """Vision-tower GFLOP per image (2 x multiply-adds), for a model name, a CLIP model or its tower.

    open_clip VisionTransformers are counted analytically, from the config for a name (nothing is
    instantiated) or from the instantiated tower: with tokens t = (S/p)^2 + 1, width w, MLP hidden h,

        patch embedding (t - 1) w 3 p^2 + layers x [t (4 w^2 + 2 w h) + 2 t^2 w] + projection w D

    multiply-adds, which reproduces SPEC §2's table. Other towers (ResNets, timm) fall back to
    ``torch.utils.flop_counter`` with a warning that it may undercount.
    """
    return _gflops_and_method(model)[0]


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
        pays for the other's after-effects; consecutive calls of the same callable keep whatever they
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
                if index != last:
                    self._pause()
                last = index
                times[index].append(self._time_once(callables[index]))
                spent += times[index][-1]
        return _timing(times[0]), _timing(times[1])

    def _pause(self) -> None:
        if self.device.type == "cpu":
            time.sleep(SWITCH_PAUSE_S)

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
    well under 1 GFLOP/s) must not take minutes.
    """
    largest = PEAK_SIZE["cuda" if device.type == "cuda" else "cpu"]
    generator = torch.Generator(device=device).manual_seed(0)
    n = 512
    with torch.inference_mode():
        while True:
            a = torch.randn((n, n), device=device, dtype=dtype, generator=generator)
            b = torch.randn((n, n), device=device, dtype=dtype, generator=generator)
            out = torch.empty((n, n), device=device, dtype=dtype)
            torch.mm(a, b, out=out)  # the first call at a size may pay for library set-up (cuBLAS handles)
            timer.synchronize()
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            timer.synchronize()
            if n >= largest or time.perf_counter() - start > PEAK_CALL_S:
                break
            n *= 2
        timing = timer(lambda: torch.mm(a, b, out=out))
    return 2 * n**3 / timing.median_s / 1e12, n


# --------------------------------------------------------------------------- the seed pipeline


class SeedPipeline:
    """The original VLM-RM code's reward path (SPEC §1.4), the reference for ``speedup_vs_seed``.

    fp32 weights; on CUDA preprocessing and the tower run under ``torch.autocast(float16)`` as the
    original did (plain fp32 on CPU). Frames uint8 [N, H, W, 3] are permuted to NCHW, cast to
    float32 at full resolution, divided by 255, resized with torchvision's bicubic (no antialiasing)
    and normalised; the embedding is normalised; the reward is ``1 - 0.5 |(x - g) @ M|^2`` with the
    explicit D x D matrix ``M = alpha u u^T + (1 - alpha) I``, built once (random g and unit u).
    """

    def __init__(self, model: torch.nn.Module, spec: PreprocessSpec, device: torch.device) -> None:
        import torchvision.transforms.functional as tvf
        from torchvision.transforms import InterpolationMode

        self._tvf, self._bicubic = tvf, InterpolationMode.BICUBIC
        self.model = model.eval().to(device)
        self.spec = spec
        self.device = device
        with torch.inference_mode():
            dim = self.tower(torch.zeros((1, 3) + tuple(spec.size), device=device)).shape[1]
        generator = torch.Generator().manual_seed(0)
        goal = F.normalize(torch.randn(dim, generator=generator), dim=0)
        direction = F.normalize(torch.randn(dim, generator=generator), dim=0)
        projection = ALPHA * torch.outer(direction, direction) + (1.0 - ALPHA) * torch.eye(dim)
        self.goal, self.projection = goal.to(device), projection.to(device)

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> normalised float32 [N, 3, S, S]."""
        with self._autocast():
            x = frames.permute(0, 3, 1, 2).float() / 255.0
            x = self._tvf.resize(x, list(self.spec.size), interpolation=self._bicubic, antialias=False)
            return self._tvf.normalize(x, list(self.spec.mean), list(self.spec.std))

    def tower(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> unit embeddings [N, D] (float16 under autocast)."""
        with self._autocast():
            return self.model.encode_image(pixels, normalize=True)

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N, D] -> rewards [N], through the D x D matrix."""
        x = embeddings / embeddings.norm(dim=-1, keepdim=True)
        return 1.0 - ((x - self.goal) @ self.projection).norm(dim=-1) ** 2 / 2

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        return self.score(self.tower(self.preprocess(frames)))


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

    def as_json(self) -> Dict[str, Any]:
        return {key: str(value) if isinstance(value, (Path, torch.device)) else value for key, value in asdict(self).items()}


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench``: the FPS profiler."""
    p = subparsers.add_parser(
        "bench",
        help="frames/s per stage (host to device, preprocess, tower, score, end to end) against the seed pipeline",
        description="Profile the reward pipeline: frames/s per stage over models x batch sizes x backends x "
        "precisions, the original VLM-RM pipeline measured in the same run as the reference, and the "
        "tower's achieved TFLOP/s against the device's matmul peak measured in the same run. Writes "
        "bench.json, bench.md and bench.png. Weights are random (speed does not depend on them), so it "
        "runs offline.",
        epilog="examples:\n  vlmrm-fast bench --quick\n  vlmrm-fast bench --frame-size 224\n"
        "  vlmrm-fast bench --models ViT-bigG-14 --batch-sizes 256 1024 --backends torch compile tensorrt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="open_clip model names (default: CPU vlmrm-tiny ViT-B-32; CUDA ViT-B-32 ViT-L-14 ViT-bigG-14)")
    p.add_argument("--batch-sizes", nargs="+", type=_positive_int, metavar="N",
                   help="frames per call (default: CPU 1 8 32; CUDA 1 8 64 256 1024)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS,
                   help="vision-tower backends; unavailable ones are skipped with the reason "
                   "(default: CPU torch onnxruntime; CUDA torch compile)")
    p.add_argument("--dtypes", nargs="+", choices=(*DTYPES, *DTYPE_ALIASES), metavar="DTYPE",
                   help=f"tower precisions, from {', '.join(DTYPES)} (default: CPU fp32; CUDA bf16)")
    p.add_argument("--frame-size", type=_positive_int, default=SEED_FRAME_SIZE, metavar="PX",
                   help="square frames of PX x PX; 480 is the original's render size, 224 the towers' input "
                   "(the fast path: no resize). The seed always gets 480 x 480 (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available, else cpu)")
    p.add_argument("--repeats", type=_positive_int, metavar="N",
                   help="timed calls per stage; the median is reported (default: CPU 3, CUDA 20)")
    p.add_argument("--warmup", type=_positive_int, metavar="N", help="untimed calls first (default: CPU 1, CUDA 3)")
    p.add_argument("--time-budget", type=float, default=10.0, metavar="S",
                   help="stop repeating a stage after S seconds of timed calls, once 3 are done (default: %(default)s)")
    p.add_argument("--no-seed", action="store_true", help="skip the seed pipeline (no speedups)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: runs/bench-<UTC timestamp>/)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: vlmrm-tiny, batch sizes 1 and 8, torch and onnxruntime, 2 repeats "
                   "(options given explicitly still apply)")
    p.add_argument("--no-plot", action="store_true", help="do not write bench.png (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on a terminal)")
    p.set_defaults(handler=run_bench)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    """Fill in the defaults for the device (and ``--quick``), and check the model names."""
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; pass --device cpu.")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {device}: only cuda and cpu are profiled.")
    on_cuda = device.type == "cuda"
    if args.quick:
        defaults = dict(models=[TINY_MODEL], batch_sizes=[1, 8], backends=["torch", "onnxruntime"], repeats=2)
    elif on_cuda:
        defaults = dict(models=["ViT-B-32", "ViT-L-14", "ViT-bigG-14"], batch_sizes=[1, 8, 64, 256, 1024],
                        backends=["torch", "compile"], repeats=20)
    else:
        defaults = dict(models=[TINY_MODEL, "ViT-B-32"], batch_sizes=[1, 8, 32], backends=["torch", "onnxruntime"], repeats=3)
    dtypes = [DTYPE_ALIASES.get(d, d) for d in (args.dtypes or (["bf16"] if on_cuda else ["fp32"]))]
    models = list(dict.fromkeys(args.models or defaults["models"]))
    register_model_configs()
    known = open_clip.list_models()
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}: `open_clip.list_models()` lists the names "
                         f"(the tiny test model is {TINY_MODEL!r}).")
    if not args.time_budget > 0:
        raise ValueError(f"--time-budget must be positive; got {args.time_budget}.")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return BenchConfig(
        models=models,
        batch_sizes=sorted(set(args.batch_sizes or defaults["batch_sizes"])),
        backends=list(dict.fromkeys(args.backends or defaults["backends"])),
        dtypes=list(dict.fromkeys(dtypes)),
        frame_size=args.frame_size,
        device=device,
        repeats=args.repeats or defaults["repeats"],
        warmup=args.warmup or (3 if on_cuda else 1),
        time_budget=args.time_budget,
        seed=not args.no_seed,
        out=args.out or Path("runs") / f"bench-{stamp}",
        progress=not args.no_progress,
        plot=not args.no_plot,
        quick=args.quick,
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


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One (model, backend, dtype, batch): frames/s per stage, the seed's, and the tower's FLOP rate.

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
    timings: Dict[str, Optional[StageTiming]] = field(default_factory=dict)


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
    complete: bool = False
    elapsed_seconds: float = 0.0

    def add_peak(self, dtype: str, tflops: float, size: int) -> None:
        """Record one matmul measurement; the peak is the best of them (other load only lowers one)."""
        self.peak_sizes[dtype] = size
        self.peak_samples.setdefault(dtype, []).append(tflops)
        self.peak_tflops[dtype] = max(self.peak_samples[dtype])

    def set_peaks(self) -> None:
        """Set every row's peak and fraction of it from the best matmul measurements so far."""
        for row in self.rows:
            row.peak_tflops = self.peak_tflops.get(peak_dtype(row.dtype))
            row.frac_of_peak = row.achieved_tflops / row.peak_tflops if row.peak_tflops else None


def _stage_row(
    *, model: str, backend: str, dtype: str, kernels: str, batch: int, frame_size: int,
    timings: Dict[str, Optional[StageTiming]], gflops: float, flops_method: str,
    build_seconds: float, setup_seconds: float,
) -> Row:
    """A row from its stage timings; the peak fraction is filled in by :meth:`Report.set_peaks`."""
    rate = {stage: None if t is None else batch / t.median_s for stage, t in timings.items()}
    return Row(
        model=model, backend=backend, dtype=dtype, kernels=kernels, batch=batch, frame_size=frame_size,
        h2d_fps=rate["h2d"], preprocess_fps=rate["preprocess"], tower_fps=rate["tower"],
        score_fps=rate["score"], end_to_end_fps=rate["end_to_end"], tower_gflops=gflops,
        flops_method=flops_method, achieved_tflops=gflops * rate["tower"] / 1e3, peak_tflops=None,
        frac_of_peak=None, build_seconds=build_seconds, setup_seconds=setup_seconds, timings=timings,
    )


def peak_dtype(row_dtype: str) -> str:
    """The matmul precision a row's tower runs in (the seed on CUDA: fp16 under autocast)."""
    return "fp16" if row_dtype == SEED_CUDA_DTYPE else row_dtype


# --------------------------------------------------------------------------- the run


@dataclass
class Frames:
    """Random uint8 frames for the largest batch, sliced for smaller ones.

    ``device`` [N, F, F, 3] at the run's frame size; on CUDA also ``pinned``, the same frames in
    pinned host memory, and ``landing``, their device destination for the h2d stage. For the seed,
    ``seed_device`` at 480 x 480 and, on CUDA, ``seed_pageable`` in pageable host memory (the
    original's copies were pageable); both None without the seed.
    """

    device: torch.Tensor
    pinned: Optional[torch.Tensor]
    landing: Optional[torch.Tensor]
    seed_device: Optional[torch.Tensor]
    seed_pageable: Optional[torch.Tensor]

    @classmethod
    def make(cls, n: int, size: int, device: torch.device, seed: bool) -> "Frames":
        generator = torch.Generator().manual_seed(0)

        def noise(side: int) -> torch.Tensor:
            return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=generator)

        host = noise(size)
        seed_host = None if not seed else host if size == SEED_FRAME_SIZE else noise(SEED_FRAME_SIZE)
        on_cuda = device.type == "cuda"
        frames = host.to(device)
        return cls(
            device=frames,
            pinned=host.pin_memory() if on_cuda else None,
            landing=torch.empty_like(frames) if on_cuda else None,
            seed_device=None if seed_host is None else frames if seed_host is host else seed_host.to(device),
            seed_pageable=seed_host if on_cuda else None,
        )


class Profiler:
    """Runs the configurations of one :class:`BenchConfig` and fills a :class:`Report`."""

    def __init__(self, config: BenchConfig, report: Report, bar: tqdm) -> None:
        self.config = config
        self.report = report
        self.bar = bar
        self.device = config.device
        self.timer = StageTimer(config.device, config.warmup, config.repeats, config.time_budget)
        self.frames = Frames.make(max(config.batch_sizes), config.frame_size, config.device, config.seed)

    def say(self, message: str) -> None:
        tqdm.write(message)

    def skip(self, what: str, reason: str) -> None:
        self.report.skipped.append({"what": what, "reason": reason})
        self.say(f"skipped {what}: {reason}")

    def fail(self, what: str, error: BaseException) -> None:
        text = f"{type(error).__name__}: {error}"
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
            self.report.add_peak(name, *measure_peak_tflops(self.device, DTYPES[name], self.timer))

    def profile_model(self, name: str, backends: Sequence[str]) -> None:
        """The seed, then every backend x dtype, over all batch sizes, for one model."""
        self.bar.set_description(f"{name}: creating")
        start = time.perf_counter()
        base, tokenizer = _create_model(name)
        create_seconds = time.perf_counter() - start
        gflops, method = _gflops_and_method(base)
        self.report.models[name] = {"create_seconds": create_seconds, "tower_gflops": gflops, "flops_method": method}
        self.say(f"{name}: created in {create_seconds:.1f} s (random weights); tower {gflops:.4g} GFLOP/image ({method})")
        seed = self._profile_seed(name, base, gflops, method) if self.config.seed else None
        for backend in backends:
            for dtype in self.config.dtypes:
                self._profile_backend(name, base, tokenizer, backend, dtype, gflops, method, seed)
        del base, seed
        self._free()

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
        frames = self.frames.seed_device[:n]
        timer = self.timer
        with torch.inference_mode():
            timings: Dict[str, Optional[StageTiming]] = {
                "h2d": None if self.frames.seed_pageable is None
                else timer(lambda: self.frames.seed_pageable[:n].to(self.device)),
            }
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
        method: str, seed: Optional[SeedPipeline],
    ) -> None:
        batches = self.config.batch_sizes
        what = f"{name} {backend} {dtype}"
        self.bar.set_description(f"{what}: building")
        start = time.perf_counter()
        try:
            rm = CLIPReward(
                copy.deepcopy(base), tokenizer, goal=GOAL, baseline=BASELINE, alpha=ALPHA, device=self.device,
                dtype=DTYPES[dtype], backend=backend, max_batch_size=max(batches), model_name=name,
                backend_options={"buckets": tuple(batches)} if backend == "compile" else None,
            )
            warmup = getattr(rm.vision_backend, "warmup", None)
            if callable(warmup):  # compile now, so that compilation is measured apart, not timed
                warmup()
        except BackendError as error:
            self.skip(what, str(error))
            self.bar.update(len(batches))
            self._free()
            return
        except Exception as error:
            self.fail(f"{what} (build)", error)
            self.bar.update(len(batches))
            return
        setup_seconds = time.perf_counter() - start
        for n in batches:
            self.bar.set_description(f"{what} b={n}")
            try:
                row = self._measure_reward(rm, name, dtype, n, gflops, method, setup_seconds, seed)
                self.report.rows.append(row)
            except Exception as error:
                self.fail(f"{what} batch {n}", error)
            self.bar.update(1)
        del rm
        self._free()

    def _measure_reward(
        self, rm: CLIPReward, name: str, dtype: str, n: int, gflops: float, method: str, setup_seconds: float,
        seed: Optional[SeedPipeline],
    ) -> Row:
        """Every stage of ``rm`` at batch ``n``; end to end in alternation with the seed where the
        seed ran at that batch size, so that the speedup compares calls made side by side."""
        frames = self.frames.device[:n]
        seed_ran = any(r.backend == SEED and r.model == name and r.batch == n for r in self.report.rows)
        timer = self.timer
        spec, tower_dtype, impl = rm.preprocess_spec, rm.dtype, rm.kernels
        with torch.inference_mode():
            timings: Dict[str, Optional[StageTiming]] = {"h2d": None}
            if self.frames.pinned is not None:
                pinned, landing = self.frames.pinned[:n], self.frames.landing[:n]
                timings["h2d"] = timer(lambda: landing.copy_(pinned, non_blocking=True))
            # The op itself, as rm(frames) runs it per chunk; rm.preprocess would add a concatenation.
            pixels = preprocess(frames, spec, tower_dtype, impl=impl)
            timings["preprocess"] = timer(lambda: preprocess(frames, spec, tower_dtype, impl=impl))
            embeddings = rm.vision_backend(pixels)
            timings["tower"] = timer(lambda: rm.vision_backend(pixels))
            timings["score"] = timer(lambda: rm.score(embeddings))
            if seed is not None and seed_ran:
                seed_frames = self.frames.seed_device[:n]
                timings["end_to_end"], timings["seed_end_to_end"] = timer.paired(
                    lambda: rm(frames), lambda: seed(seed_frames))
            else:
                timings["end_to_end"] = timer(lambda: rm(frames))
        row = _stage_row(
            model=name, backend=rm.backend, dtype=dtype, kernels=rm.kernels, batch=n,
            frame_size=self.config.frame_size, timings=timings, gflops=gflops, flops_method=method,
            build_seconds=rm.vision_backend.build_seconds, setup_seconds=setup_seconds,
        )
        if "seed_end_to_end" in timings:
            row.seed_fps = n / timings["seed_end_to_end"].median_s
            row.speedup_vs_seed = row.end_to_end_fps / row.seed_fps
        return row


def _create_model(name: str) -> Tuple[torch.nn.Module, Callable]:
    """The model with random weights (seed 0), float32 on CPU, without the random-weights warning."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*random weights", category=UserWarning)
        return create_clip(name, None)


def run_bench(args: argparse.Namespace) -> int:
    """``vlmrm-fast bench``: profile, write bench.json/.md/.png, print the table.

    Returns 0, or 1 when a configuration failed (the others are still reported).
    """
    config = resolve_config(args)
    if config.plot:
        _require_matplotlib()
    config.out.mkdir(parents=True, exist_ok=True)
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
          f"{len(config.models)} model(s) x batch {config.batch_sizes} x {backends} x {config.dtypes}, "
          f"{config.frame_size}x{config.frame_size} frames, weights random (speed does not depend on them)")
    for skipped in report.skipped:
        print(f"skipped {skipped['what']}: {skipped['reason']}")
    if interpreter_enabled():
        print("note: TRITON_INTERPRET=1; the Triton kernels would run in Triton's interpreter (kernels=auto picks "
              "the torch path on CPU)")

    per_model = len(config.batch_sizes) * (len(backends) * len(config.dtypes) + int(config.seed))
    peak_dtypes = list(dict.fromkeys(config.dtypes + (["fp16"] if config.seed and config.device.type == "cuda" else [])))
    with tqdm(total=per_model * len(config.models), unit="config", disable=None if config.progress else True,
              file=sys.stderr, dynamic_ncols=True) as bar:
        profiler = Profiler(config, report, bar)
        profiler.measure_peaks(peak_dtypes)
        for name in config.models:
            try:
                profiler.profile_model(name, backends)
            except Exception as error:  # model creation; the other models still run
                profiler.fail(f"{name} (create)", error)
            profiler.measure_peaks(peak_dtypes)
            report.set_peaks()
            report.elapsed_seconds = time.perf_counter() - began
            write_outputs(report, config)
    report.targets = check_targets(report.rows, config.device)
    report.complete = True
    report.elapsed_seconds = time.perf_counter() - began
    report.environment["load_average_end"] = _load_average()
    written = write_outputs(report, config)
    print()
    print(markdown_report(report))
    print(f"{len(report.rows)} rows in {report.elapsed_seconds:.1f} s; wrote {', '.join(map(str, written))}")
    return 1 if report.failures else 0


# --------------------------------------------------------------------------- targets and outputs


def check_targets(rows: Sequence[Row], device: torch.device) -> List[Dict[str, Any]]:
    """The project's targets that this run's rows speak to, each with the best measurement.

    CUDA (bf16 rows): end-to-end frames/s for ViT-B-32, ViT-L-14, ViT-bigG-14, and the speedup over
    the seed for ViT-bigG-14. CPU: the speedup over the seed for ViT-B-32.
    """
    on_cuda = device.type == "cuda"
    candidates = [r for r in rows if r.backend != SEED and (r.dtype == "bf16" or not on_cuda)]
    targets = []

    def add(model: str, kind: str, required: float, key: Callable[[Row], Optional[float]]) -> None:
        mine = [r for r in candidates if r.model == model and key(r) is not None]
        if not any(r.model == model for r in rows):
            return
        best = max(mine, key=key, default=None)
        targets.append({
            "model": model, "kind": kind, "required": required,
            "measured": None if best is None else key(best),
            "where": None if best is None else f"{best.backend} {best.dtype} batch {best.batch}, {best.frame_size} px",
            "met": best is not None and key(best) >= required,
        })

    for model, required in (GPU_FPS_TARGETS if on_cuda else {}).items():
        add(model, "end-to-end frames/s (bf16)", required, lambda r: r.end_to_end_fps)
    for model, required in (GPU_SPEEDUP_TARGETS if on_cuda else CPU_SPEEDUP_TARGETS).items():
        add(model, "end-to-end speedup vs seed" + (" (bf16)" if on_cuda else ""), required, lambda r: r.speedup_vs_seed)
    return targets


def _rate(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def _num(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


TABLE_COLUMNS = (
    ("model", lambda r: r.model),
    ("backend", lambda r: r.backend),
    ("dtype", lambda r: r.dtype),
    ("kernels", lambda r: r.kernels),
    ("batch", lambda r: str(r.batch)),
    ("frame", lambda r: str(r.frame_size)),
    ("h2d", lambda r: _rate(r.h2d_fps)),
    ("preprocess", lambda r: _rate(r.preprocess_fps)),
    ("tower", lambda r: _rate(r.tower_fps)),
    ("score", lambda r: _rate(r.score_fps)),
    ("end to end", lambda r: _rate(r.end_to_end_fps)),
    ("seed", lambda r: _rate(r.seed_fps) if r.seed_fps else ""),
    ("vs seed", lambda r: _num(r.speedup_vs_seed, ".2f") + ("x" if r.speedup_vs_seed else "")),
    ("GFLOP/img", lambda r: f"{r.tower_gflops:.4g}"),
    ("TFLOP/s", lambda r: f"{r.achieved_tflops:.3g}"),
    ("of peak", lambda r: _num(None if r.frac_of_peak is None else 100 * r.frac_of_peak, ".1f") + ("%" if r.frac_of_peak else "")),
    ("build s", lambda r: f"{r.build_seconds:.1f}"),
)


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per row: frames/s per stage (median), end to end, the seed's, FLOP rate, build time."""
    lines = ["| " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(row) for _, cell in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(report: Report) -> str:
    """bench.md: the environment, the table, the targets, what was skipped or failed."""
    env, config = report.environment, report.config
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "open_clip", "torchvision", "onnxruntime",
                                                     "tensorrt", "python") if env.get(k))
    peaks = ", ".join(f"{k} {v:.3g} TFLOP/s ({report.peak_sizes[k]}^3)" for k, v in report.peak_tflops.items())
    load = [env.get("load_average_start"), env.get("load_average_end")]
    lines = [
        f"# vlmrm-fast bench: {env['device']}",
        "",
        f"{env['timestamp']}, commit {env['commit']}" + (f", driver {env['driver']}" if env.get("driver") else "")
        + f"; {versions}.",
        f"Weights are random (no downloads); speed does not depend on them. Measured matmul peak (the best of the "
        f"measurements before and after each model): {peaks}.",
        "",
        *([f"Load average (1 min): {load[0]} at start, {'n/a' if load[1] is None else load[1]} at end, on "
           f"{env.get('cpu_count')} CPUs (this run's threads count too; above the CPU count, other work was "
           "competing for the cores and every figure is lower)."] if load[0] is not None else []),
        "",
        markdown_table(report.rows),
        "",
        f"Frames/s = batch / median seconds per call ({config['repeats']} repeats at most, after {config['warmup']} "
        f"warm-up; stages stop after {config['time_budget']:g} s of timed calls once 3 are done). Frames are uint8 "
        f"already on the device except for h2d (pinned host to device; n/a on CPU; the seed's rows copy from pageable "
        "memory, as the original did). The seed pipeline (SPEC §1.4) always gets 480 x 480 frames; in a backend's row, "
        "'seed' is the seed's end to end at that batch size timed in alternation with the row's own end to end (so "
        "load on a shared machine weighs on both alike), and 'vs seed' is their ratio. TFLOP/s = tower GFLOP/img x "
        "tower frames/s; 'of peak' against the matmul peak in that dtype (fp16 for the seed on CUDA). 'build s' (export, compile, "
        "engine build) is not in any frames/s. On CPU each stage, and each switch between the seed and the pipeline "
        f"timed with it, starts after a {SWITCH_PAUSE_S:g} s pause (ONNX Runtime's threads spin after a run and slow "
        "the torch work that follows).",
    ]
    if report.targets:
        lines += ["", "## Targets", "", "| model | target | required | best measured | where | met |", "|---|---|---|---|---|---|"]
        for t in report.targets:
            fmt = (lambda v: f"{v:.2f}x") if "speedup" in t["kind"] else _rate
            lines.append(f"| {t['model']} | {t['kind']} | {fmt(t['required'])} | "
                         f"{'not measured' if t['measured'] is None else fmt(t['measured'])} | {t['where'] or ''} | "
                         f"{'yes' if t['met'] else 'no'} |")
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


def write_plot(path: Path, report: Report) -> Path:
    """End-to-end frames/s against batch size, log-log: one line per (model, backend, dtype), the
    seed dashed, in the model's colour; dotted lines at the GPU targets."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.5, 5.5), layout="constrained")
    ax = figure.add_subplot()
    models = list(dict.fromkeys(r.model for r in report.rows))
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    styles = {"torch": "-", "compile": "-.", "onnxruntime": (0, (5, 1, 1, 1)), "tensorrt": (0, (1, 1))}
    for key in dict.fromkeys((r.model, r.backend, r.dtype) for r in report.rows):
        line = sorted((r for r in report.rows if (r.model, r.backend, r.dtype) == key), key=lambda r: r.batch)
        model, backend, dtype = key
        ax.plot([r.batch for r in line], [r.end_to_end_fps for r in line], color=colours[model],
                linestyle="--" if backend == SEED else styles.get(backend, "-"), marker="o", markersize=3.5,
                label=f"{model} {backend} {dtype}")
    if report.config["device"].startswith("cuda"):
        for model, target in GPU_FPS_TARGETS.items():
            if model in colours:
                ax.axhline(target, color=colours[model], linestyle=":", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({r.batch for r in report.rows})
    ax.set_xticks(batches, labels=[str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("batch size (frames per call)")
    ax.set_ylabel("end-to-end frames/s")
    size = report.config["frame_size"]
    seed_size = "" if size == SEED_FRAME_SIZE else f" at {SEED_FRAME_SIZE}x{SEED_FRAME_SIZE}"
    ax.set_title(f"vlmrm-fast bench, {report.environment['device']}\n{size}x{size} uint8 frames on the device "
                 f"(the seed dashed{seed_size}); random weights", fontsize=9)
    ax.grid(alpha=0.3)
    if report.rows:
        ax.legend(fontsize=7, loc="best")
    figure.savefig(path, dpi=120)
    return path


def write_outputs(report: Report, config: BenchConfig) -> List[Path]:
    """Write bench.json, bench.md and (unless --no-plot) bench.png into ``config.out``."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    (out / "bench.md").write_text(markdown_report(report))
    written = [out / "bench.json", out / "bench.md"]
    if config.plot:
        written.append(write_plot(out / "bench.png", report))
    return written


# --------------------------------------------------------------------------- environment


def _load_average() -> Optional[float]:
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
        "device": f"{cpu_name()} ({torch.get_num_threads()} threads)",
        "device_type": device.type,
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "driver": "",
        "cuda": "",
        "torch": torch.__version__,
        "triton": package_version("triton", "pytorch-triton"),
        "open_clip": package_version("open_clip_torch"),
        "torchvision": package_version("torchvision"),
        "onnxruntime": package_version("onnxruntime", "onnxruntime-gpu"),
        "onnx": package_version("onnx"),
        "tensorrt": package_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
        "numpy": package_version("numpy"),
        "python": platform.python_version(),
        "triton_interpret": interpreter_enabled(),
        "cpu_count": os.cpu_count(),
        "load_average_start": _load_average(),
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
