"""Benchmark vlmrm_fast's fused ops and the tower's patch embedding and LayerNorm against the plain torch
path and the original VLM-RM code.

Ops (SPEC §1.2, §1.4, §2):
- ``preprocess``: uint8 frames [N, H, W, 3] -> normalised tower input [N, 3, 224, 224].
- ``score``: image embeddings [N, D] -> rewards [N, T].
- ``patch_embed``: a ViT's patch embedding, normalised pixels [N, 3, 224, 224] -> [N, D, 224 / p, 224 / p],
  as the ``torch`` and ``compile`` backends run it (one matmul over the patches,
  :mod:`vlmrm_fast.backends.patch_embed`) against the tower's own ``nn.Conv2d`` (the seed's way).
- ``layer_norm``: the tower's LayerNorm over N frames' tokens [N, L, D] in the benchmark's dtype, as the
  ``torch`` backend runs it with Triton kernels (:mod:`vlmrm_fast.ops.layer_norm`) against torch's own
  ``F.layer_norm`` (the seed's way, and the ``compile``-less tower's before); GB/s counts one read and
  one write of the tokens.
- ``fc1_gelu``: a transformer block's first MLP matmul and its GELU over N frames' tokens [N, L, D] ->
  [N, L, hidden], as the ``torch`` backend runs it in bf16 on CUDA (one matmul with cuBLASLt's GELU
  epilogue, :mod:`vlmrm_fast.backends.gelu_epilogue`) against ``F.linear`` then ``F.gelu`` (the seed's
  way); in the defaults on CUDA only (on CPU the package does not use it: ``--ops fc1_gelu`` asks).
- ``fp8_quantize``: the fp8 matmuls' activations, N frames' token rows [N * L, K] -> E4M3 [N * L, K] and a
  float32 scale a row, as the ``torch`` backend quantises them with ``quantize="fp8"`` on CUDA (one pass,
  :mod:`vlmrm_fast.ops.quantize_rows`) against torch's ops (four passes); GB/s counts the rows read, the
  E4M3 values and scales written. In the defaults on CUDA only (E4M3 stores need compute capability 8.9+).
  The cases ending ``-gelu`` quantise ``GELU(tokens)``, each MLP's second matmul input, as the ``torch``
  backend does (the GELU inside the kernel, :mod:`vlmrm_fast.backends.fp8_gelu_mlp`), against torch's
  GELU then torch's ops ("seed") and torch's GELU then the kernel (``triton-after-gelu``, the backend
  before the fusion); GB/s counts the same bytes for all three (their extra pass is their cost). The cases
  ending ``-ln`` and ``-add-ln`` are each fp8 block's LayerNorms with their quantisation, the second after
  the residual add (one kernel, :mod:`vlmrm_fast.ops.layer_norm_quantize`, as the ``torch`` backend runs
  them: :mod:`vlmrm_fast.backends.fp8_block`), against torch's add, ``F.layer_norm`` and torch's ops
  ("seed") and the LayerNorm kernel then the quantisation kernel (``triton-after-ln``, the backend before
  the fusion); GB/s counts the fused kernel's bytes for all three. The cases ending ``-quick-gelu``
  (ViT-B-32's and ViT-L-14's, whose OpenAI weights have it) quantise ``QuickGELU(tokens)`` in the kernel,
  against open_clip's QuickGELU then torch's ops ("seed") and the QuickGELU kernel then the quantisation
  kernel (``triton-after-quick-gelu``, the backend before the fusion).
- ``quick_gelu``: the MLPs' QuickGELU of OpenAI's towers (ViT-B-32, ViT-L-14) over N frames' hidden
  activations [N, L, hidden], as the ``torch`` backend runs it with its kernels (one pass,
  :mod:`vlmrm_fast.ops.quick_gelu`) against open_clip's ``x * torch.sigmoid(1.702 * x)`` (three passes);
  GB/s counts one read and one write. In the defaults on CUDA only.
- ``copy``: a device-to-device copy, the bandwidth ceiling the memory-bound ops (preprocess, layer_norm,
  fp8_quantize, quick_gelu) are judged against. It is measured whenever one of them is, so that their
  rows get their ``frac_of_copy``.

Providers:
- ``triton``: the fused kernel (``impl="triton"``); ``triton-interpret`` when it runs in Triton's
  CPU interpreter (``TRITON_INTERPRET=1``), whose timings say nothing about the kernel's speed.
- ``triton-16x64w8`` (with ``--preprocess-tiles 16x64w8``): the preprocess kernel launched with
  16 x 64 tiles and 8 warps instead of its default, for tuning.
- ``triton-flat1024w4``, ``triton-words1024w4`` (with ``--identity-variants``): candidate kernels for
  frames already at the tower's size (``identity_variants.py``), timed on the ``224-fast`` case only.
- ``triton-r8w8`` (with ``--layer-norm-configs 8w8``): the LayerNorm kernel launched with 8 rows a
  program and 8 warps instead of its default, for tuning.
- ``torch``: the package's plain torch path (``impl="torch"``); for ``patch_embed``, the matmul; for
  ``fc1_gelu``, the epilogue; none for ``layer_norm`` (its plain path, ``F.layer_norm`` in float32, is a
  fallback, not a contender) and ``fp8_quantize`` (its plain path is the seed's row).
- ``seed``: the original VLM-RM code's way, the baseline for ``speedup_vs_seed``; for ``patch_embed``,
  the convolution (cuDNN on CUDA) in the benchmark's dtype; for ``layer_norm``, ``F.layer_norm``; for
  ``fc1_gelu``, ``F.linear`` then the exact ``F.gelu``; for ``fp8_quantize`` (the original had no fp8),
  the same quantisation in torch's ops, which eager PyTorch would run.

Usage:
    python benchmarks/bench_kernels.py                     # defaults for the device found
    python benchmarks/bench_kernels.py --quick             # smallest sensible set
    python benchmarks/bench_kernels.py --csv benchmarks/results/kernels-h200.csv \
        --json benchmarks/results/kernels-h200.json
"""
from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

from vlmrm_fast.ops._triton import HAS_TRITON, interpreter_enabled, triton_runs_on
from results_io import RunFiles, check_csv, config_of, fmt  # noqa: E402  (benchmarks/, beside this script)
from vlmrm_fast.backends.gelu_epilogue import gelu_linear  # noqa: E402
from vlmrm_fast.backends.patch_embed import PatchMatmulConv2d  # noqa: E402
from vlmrm_fast.ops.layer_norm import launch_config, layer_norm_triton
from vlmrm_fast.ops.layer_norm_quantize import layer_norm_quantize_triton
from vlmrm_fast.ops.quantize_rows import quantize_rows_torch, quantize_rows_triton
from vlmrm_fast.ops.quick_gelu import quick_gelu_triton
from vlmrm_fast.run_info import device_name, git_commit, gpu_driver, library_versions
from vlmrm_fast.ops.preprocess import PreprocessSpec, check_tile, preprocess, preprocess_triton
from vlmrm_fast.ops.score import ScoringTargets, score

if HAS_TRITON:
    import identity_variants  # noqa: E402  (beside this script; it defines Triton kernels)

REPO_ROOT = Path(__file__).resolve().parent.parent
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TOWER_SIZE = (224, 224)
L2_FLUSH_BYTES = 256 << 20  # larger than any GPU's L2, so no repeat reads the previous one's data from cache
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("preprocess", "score", "patch_embed", "layer_norm", "fc1_gelu", "fp8_quantize", "quick_gelu", "copy")
CUDA_ONLY_OPS = ("fc1_gelu", "fp8_quantize", "quick_gelu")
"""Paths the package takes on CUDA only: on CPU, run when asked for with ``--ops``."""


def environment(device: torch.device) -> Dict[str, str]:
    """What a result depends on: commit, device, driver and versions (the CSV's key columns)."""
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_name(device),
        "driver": gpu_driver() if device.type == "cuda" else "",
        "cuda": (torch.version.cuda or "") if device.type == "cuda" else "",
        "torch": torch.__version__,
        **library_versions("triton", "open_clip", "torchvision"),
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class PreprocessCase:
    """Frames of H x W resized to the tower's 224 x 224 in ``mode`` (SPEC §1.2)."""

    name: str
    height: int
    width: int
    mode: str


@dataclass(frozen=True)
class ScoreCase:
    """Embeddings of width ``dim`` scored against ``tasks`` goals."""

    name: str
    dim: int
    tasks: int


PREPROCESS_CASES = (
    PreprocessCase("480-vlmrm", 480, 480, "vlmrm"),
    PreprocessCase("224-fast", 224, 224, "vlmrm"),
    PreprocessCase("480-openclip", 480, 480, "openclip"),
)


@dataclass(frozen=True)
class TowerShape:
    """A ViT at 224 x 224: ``patch`` x ``patch`` patches embedded to width ``width``, MLPs ``mlp_width`` wide:
    the shapes of its patch embedding, of its LayerNorms' tokens and of its MLPs' first matmul."""

    model: str
    patch: int
    width: int
    mlp_width: int

    @property
    def tokens(self) -> int:
        """Tokens a frame: the patches and the class token."""
        return (TOWER_SIZE[0] // self.patch) * (TOWER_SIZE[1] // self.patch) + 1

    @property
    def patch_embed_case(self) -> str:
        return f"{self.model}-p{self.patch}-D{self.width}"

    @property
    def layer_norm_case(self) -> str:
        return f"{self.model}-L{self.tokens}-D{self.width}"

    @property
    def fc1_gelu_case(self) -> str:
        return f"{self.model}-L{self.tokens}-D{self.width}-H{self.mlp_width}"

    def fp8_quantize_case(self, width: int) -> str:
        return f"{self.model}-L{self.tokens}-K{width}"


TOWER_SHAPES = (TowerShape("B32", 32, 768, 3072), TowerShape("L14", 14, 1024, 4096),
                TowerShape("bigG", 14, 1664, 8192))
SCORE_CASES = (
    ScoreCase("bigG-D1280-T1", 1280, 1),
    ScoreCase("B32-D512-T1", 512, 1),
    ScoreCase("bigG-D1280-T8", 1280, 8),
)


@dataclass
class Row:
    """One CSV row: one (op, case, provider, N), with the run's environment."""

    timestamp: str
    commit: str
    device: str
    driver: str
    cuda: str
    torch: str
    triton: str
    open_clip: str
    torchvision: str
    python: str
    op: str
    case: str
    provider: str
    N: Optional[int]
    H: Optional[int]
    W: Optional[int]
    dtype: str
    repeats: int
    median_ms: float
    min_ms: float
    max_ms: float
    frames_per_s: Optional[float] = None
    gb_per_s: Optional[float] = None
    frac_of_copy: Optional[float] = None
    speedup_vs_seed: Optional[float] = None
    max_abs_diff_vs_seed: Optional[float] = None


COLUMNS = [f.name for f in fields(Row)]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line; device-dependent defaults (batch sizes, repeats, dtype) are filled in here."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", choices=OPS,
                        help="default: all on CUDA, all but fc1_gelu, fp8_quantize and quick_gelu on CPU; copy is "
                        "always added with preprocess, layer_norm, fp8_quantize and quick_gelu")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="N; default 1 64 1024 on CUDA, 1 32 on CPU")
    parser.add_argument("--repeats", type=int, help="timed calls per row; default 20 on CUDA, 5 on CPU")
    parser.add_argument("--warmup", type=int, help="untimed calls first (Triton compiles); default 3 on CUDA, 1 on CPU")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="preprocess output and score input dtype; auto = bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--copy-mib", type=int, help="copy size; default 1024 on CUDA, 256 on CPU")
    parser.add_argument("--quick", action="store_true", help="smallest sensible set (one N, fewer repeats)")
    parser.add_argument("--preprocess-tiles", nargs="+", default=[], metavar="RxCwW",
                        help="also time the preprocess kernel with these tiles, e.g. 16x64w8 8x64w4 (rows x "
                        "columns, warps; powers of two), as providers triton-RxCwW (where Triton runs; in the "
                        "interpreter, triton-interpret-RxCwW, slower than its whole-frame default tile)")
    parser.add_argument("--identity-variants", nargs="+", default=[], metavar="KINDBwW",
                        help="also time candidate kernels for frames at the tower's size (224-fast only; "
                        "benchmarks/identity_variants.py), e.g. flat1024w4 words1024w4: the kind, pixels a "
                        "program and warps, as providers triton-KINDBwW")
    parser.add_argument("--layer-norm-configs", nargs="+", default=[], metavar="RwW",
                        help="also time the LayerNorm kernel with these launches, e.g. 1w4 8w8 (rows a program, "
                        "warps; powers of two), as providers triton-rRwW")
    parser.add_argument("--csv", type=Path, help="append one row per (op, case, provider, N) to this CSV")
    parser.add_argument("--json", type=Path, help="write the whole run (environment, config, rows) as JSON")
    args = parser.parse_args(argv)

    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here.")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: only cuda and cpu are benchmarked.")
    on_cuda = args.device.type == "cuda"
    if args.ops is None:
        args.ops = [op for op in OPS if on_cuda or op not in CUDA_ONLY_OPS]
    if args.batch_sizes is None:
        args.batch_sizes = ([64] if on_cuda else [8]) if args.quick else ([1, 64, 1024] if on_cuda else [1, 32])
    if args.repeats is None:
        args.repeats = (10 if on_cuda else 3) if args.quick else (20 if on_cuda else 5)
    if args.warmup is None:
        args.warmup = 3 if on_cuda else 1
    if args.copy_mib is None:
        args.copy_mib = 1024 if on_cuda else 256
    if args.dtype == "auto":
        args.dtype = "bf16" if on_cuda else "fp32"
    if {"preprocess", "layer_norm", "fp8_quantize", "quick_gelu"} & set(args.ops) and "copy" not in args.ops:
        args.ops.append("copy")
    try:
        args.preprocess_tiles = [parse_tile(t) for t in args.preprocess_tiles]
        args.layer_norm_configs = [parse_layer_norm_config(c) for c in args.layer_norm_configs]
        if args.identity_variants and not HAS_TRITON:
            raise ValueError("--identity-variants: the triton package is not installed")
        args.identity_variants = [identity_variants.parse_variant(v) for v in args.identity_variants]
    except ValueError as error:
        parser.error(str(error))
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 1 or args.copy_mib < 1:
        parser.error("batch sizes, --repeats, --warmup and --copy-mib must be at least 1 (the warm-up compiles the "
                     "kernels).")
    return args


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over the timed repeats."""

    median_ms: float
    min_ms: float
    max_ms: float


class Timer:
    """Times callables: warm-up calls first (compilation, cached tables), then one timed call per repeat.

    On CUDA each repeat is bracketed by CUDA events, after a write of 256 MiB that evicts the inputs
    from L2 (as ``triton.testing.do_bench`` does), so small batches are not read from cache.
    """

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device = device
        self.warmup = warmup
        self.repeats = repeats
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], object]) -> Timing:
        return self.alternating({"": fn})[""]

    def alternating(self, calls: Dict[str, Callable[[], object]]) -> Dict[str, Timing]:
        """Time several callables in turn, one call of each per repeat, each repeat starting one further
        along (A B C, B C A, C A B, ...), so that load drifting on a shared machine or a clock ramping
        weighs on all of them alike, not on whichever was timed last."""
        names = list(calls)
        for name in names:
            for _ in range(self.warmup):
                calls[name]()
        times: Dict[str, List[float]] = {name: [] for name in names}
        events: List[Tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for repeat in range(self.repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                if self.device.type == "cuda":
                    self.flush.zero_()
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    calls[name]()
                    end.record()
                    events.append((name, start, end))
                else:
                    begin = time.perf_counter()
                    calls[name]()
                    times[name].append((time.perf_counter() - begin) * 1e3)
        if events:
            torch.cuda.synchronize(self.device)
            for name, start, end in events:
                times[name].append(start.elapsed_time(end))
        return {name: Timing(statistics.median(t), min(t), max(t)) for name, t in times.items()}


def seed_preprocess(frames: torch.Tensor, mode: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The original VLM-RM code's preprocessing (SPEC §1.4): cast to float32 at full resolution, then resize.

    "vlmrm" mode squashes to 224 x 224 without antialiasing, as the original did; "openclip" mode is
    open_clip's eval transform on tensors (shorter side to 224, antialiased, centre crop).
    """
    import torchvision.transforms.functional as tvf
    from torchvision.transforms import InterpolationMode

    x = frames.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    if mode == "vlmrm":
        x = tvf.resize(x, list(TOWER_SIZE), interpolation=InterpolationMode.BICUBIC, antialias=False)
    else:
        x = tvf.resize(x, TOWER_SIZE[0], interpolation=InterpolationMode.BICUBIC, antialias=True)
        x = tvf.center_crop(x, list(TOWER_SIZE))
    x = tvf.normalize(x, list(OPENAI_MEAN), list(OPENAI_STD))
    return x.to(out_dtype)


def seed_projections(targets: ScoringTargets) -> List[torch.Tensor]:
    """The original's D x D matrices ``M = alpha u u^T + (1 - alpha) I``, one per task.

    The original builds M once, when the reward model is made, so this is not timed.
    """
    eye = torch.eye(targets.dim, device=targets.goals.device)
    return [a * torch.outer(u, u) + (1.0 - a) * eye for u, a in zip(targets.directions, targets.alphas.tolist())]


def seed_score(embeddings: torch.Tensor, targets: ScoringTargets, projections: List[torch.Tensor]) -> torch.Tensor:
    """The original's reward per task: normalise x, then ``1 - 0.5 |(x - g) @ M^T|^2``, a D x D matmul."""
    x = embeddings.to(torch.float32)
    x = x / x.norm(dim=-1, keepdim=True)
    rewards = [1.0 - 0.5 * ((x - g) @ m.T).norm(dim=-1) ** 2 for g, m in zip(targets.goals, projections)]
    return torch.stack(rewards, dim=1)


def providers_for(device: torch.device) -> Tuple[List[str], List[str]]:
    """The providers that run on ``device``, and a reason for each one skipped."""
    providers, skipped = ["seed", "torch"], []
    try:
        import torchvision  # noqa: F401
    except ImportError:
        providers.remove("seed")
        skipped.append("seed (torchvision is not installed; speedup_vs_seed stays empty)")
    if triton_runs_on(device):
        providers.append("triton-interpret" if device.type == "cpu" else "triton")
    elif device.type == "cpu":
        skipped.append("triton (on CPU it runs only in Triton's interpreter, which is very slow: "
                       "set TRITON_INTERPRET=1 to include it)")
    else:
        skipped.append("triton (the triton package is not installed)")
    return providers, skipped


def parse_tile(text: str) -> Tuple[int, int, int]:
    """ "16x64w8" -> (16, 64, 8)."""
    try:
        rows_cols, warps = text.lower().split("w")
        rows, cols = rows_cols.split("x")
        tile = (int(rows), int(cols), int(warps))
    except ValueError:
        raise ValueError(f"--preprocess-tiles {text!r}: write rows x columns, then w and the warps, e.g. 16x64w8") from None
    try:
        check_tile(tile)
    except ValueError as error:
        raise ValueError(f"--preprocess-tiles {text!r}: {error}") from None
    return tile


def parse_layer_norm_config(text: str) -> Tuple[int, int]:
    """ "8w8" -> (8, 8): rows a program, warps."""
    try:
        rows, warps = (int(part) for part in text.lower().split("w"))
        launch_config(768, rows, warps)  # checks both are powers of two
    except ValueError as error:
        detail = f": {error}" if "power of two" in str(error) else ""
        raise ValueError(f"--layer-norm-configs {text!r}: write rows a program, then w and the warps, e.g. 8w8"
                         f"{detail}") from None
    return rows, warps


def _triton_prefix(providers: Sequence[str]) -> Optional[str]:
    """The name extra Triton providers start with ("triton", or "triton-interpret" in the CPU
    interpreter), or None where Triton does not run at all."""
    if not any(p.startswith("triton") for p in providers):
        return None
    return "triton-interpret" if interpreter_enabled() else "triton"


def tile_providers(tiles: Sequence[Tuple[int, int, int]], providers: Sequence[str]) -> Dict[str, Tuple[int, int, int]]:
    """Provider name -> tile for the extra preprocess tiles, where Triton runs at all."""
    prefix = _triton_prefix(providers)
    return {} if prefix is None else {f"{prefix}-{r}x{c}w{w}": (r, c, w) for r, c, w in tiles}


def identity_providers(variants: Sequence[Tuple[str, int, int]], providers: Sequence[str]) -> Dict[str, Tuple[str, int, int]]:
    """Provider name -> candidate identity kernel (:mod:`identity_variants`), where Triton runs at all."""
    prefix = _triton_prefix(providers)
    return {} if prefix is None else {f"{prefix}-{kind}{block}w{w}": (kind, block, w) for kind, block, w in variants}


def layer_norm_providers(configs: Sequence[Tuple[int, int]], providers: Sequence[str]) -> Dict[str, Tuple[int, int]]:
    """Provider name -> (rows a program, warps) for the extra LayerNorm launches, where Triton runs at all."""
    prefix = _triton_prefix(providers)
    return {} if prefix is None else {f"{prefix}-r{rows}w{warps}": (rows, warps) for rows, warps in configs}


def impl_of(provider: str) -> str:
    return "triton" if provider.startswith("triton") else "torch"


def max_abs_diff(a, b) -> float:
    """The largest difference between two outputs: tensors, or tuples of them (fp8_quantize's values, scales)."""
    if isinstance(a, tuple):
        return max(max_abs_diff(x, y) for x, y in zip(a, b))
    return (a.to(torch.float32) - b.to(torch.float32)).abs().max().item()


def time_calls(timer: Timer, calls: Dict[str, Callable[[], torch.Tensor]], n: int, nbytes: Optional[int],
               **labels: object) -> List[Row]:
    """One row per provider of ``calls``, in order (a "seed" call is the reference of those after it), the
    providers timed in alternation (:meth:`Timer.alternating`): its timing, frames/s, GB/s where ``nbytes``
    (read and written) is given, and its largest difference from the seed's output. ``labels``: the row's
    other columns."""
    outputs = {provider: fn() for provider, fn in calls.items()}
    timings = timer.alternating(calls)
    rows, reference = [], None
    for provider, output in outputs.items():
        reference = output if provider == "seed" else reference
        timing = timings[provider]
        rows.append(Row(
            **labels, provider=provider, N=n, **asdict(timing), frames_per_s=n / (timing.median_ms * 1e-3),
            gb_per_s=None if nbytes is None else nbytes / (timing.median_ms * 1e-3) / 1e9,
            max_abs_diff_vs_seed=None if reference is None else max_abs_diff(output, reference),
        ))
    return rows


def bench_copy(args: argparse.Namespace, env: Dict[str, str], timer: Timer) -> Row:
    """``dst.copy_(src)`` of ``--copy-mib`` MiB of uint8; GB/s counts the bytes read and written."""
    nbytes = args.copy_mib << 20
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    timing = timer(lambda: dst.copy_(src))
    return Row(**env, op="copy", case=f"{args.copy_mib}MiB", provider="torch", N=None, H=None, W=None,
               dtype="uint8", repeats=args.repeats, **asdict(timing),
               gb_per_s=2 * nbytes / (timing.median_ms * 1e-3) / 1e9)


def bench_preprocess(
    args: argparse.Namespace, env: Dict[str, str], timer: Timer, providers: List[str],
    tiled: Dict[str, Tuple[int, int, int]], identity: Optional[Dict[str, Tuple[str, int, int]]] = None,
) -> List[Row]:
    """Every preprocess case and batch size; GB/s = (uint8 bytes read + output bytes written) / time.
    ``tiled``: extra providers, the Triton kernel with another tile (:func:`tile_providers`);
    ``identity``: candidate kernels for the case at the tower's size (:func:`identity_providers`)."""
    out_dtype = DTYPES[args.dtype]
    rows = []
    for case in PREPROCESS_CASES:
        spec = PreprocessSpec(TOWER_SIZE, OPENAI_MEAN, OPENAI_STD, case.mode)
        for n in args.batch_sizes:
            frames = torch.randint(0, 256, (n, case.height, case.width, 3), dtype=torch.uint8, device=args.device)
            nbytes = frames.numel() + n * 3 * TOWER_SIZE[0] * TOWER_SIZE[1] * out_dtype.itemsize
            candidates = (identity or {}) if (case.height, case.width) == TOWER_SIZE else {}
            calls = {}
            for provider in [*providers, *tiled, *candidates]:
                if provider == "seed":
                    calls[provider] = functools.partial(seed_preprocess, frames, case.mode, out_dtype)
                elif provider in candidates:
                    calls[provider] = functools.partial(identity_variants.preprocess_identity, frames, spec, out_dtype,
                                                        candidates[provider])
                elif provider in tiled:
                    calls[provider] = functools.partial(preprocess_triton, frames, spec, out_dtype, tile=tiled[provider])
                else:
                    calls[provider] = functools.partial(preprocess, frames, spec, out_dtype, impl=impl_of(provider))
            rows += time_calls(timer, calls, n, nbytes, **env, op="preprocess", case=case.name, H=case.height,
                               W=case.width, dtype=args.dtype, repeats=args.repeats)
    return rows


def make_targets(dim: int, tasks: int, device: torch.device) -> ScoringTargets:
    """T random tasks: goals averaged from two unit prompts (so |g| < 1), unit directions, alpha = 0.5."""
    generator = torch.Generator().manual_seed(0)
    prompts = torch.nn.functional.normalize(torch.randn(tasks, 3, dim, generator=generator), dim=2)
    goals = prompts[:, :2].mean(dim=1)
    directions = torch.nn.functional.normalize(goals - prompts[:, 2], dim=1)
    return ScoringTargets(goals.to(device), directions.to(device), torch.full((tasks,), 0.5, device=device))


def bench_score(args: argparse.Namespace, env: Dict[str, str], timer: Timer, providers: List[str]) -> List[Row]:
    """Every score case and batch size; frames/s only (the op is O(N D) and not judged in GB/s)."""
    rows = []
    for case in SCORE_CASES:
        targets = make_targets(case.dim, case.tasks, args.device)
        projections = seed_projections(targets)
        for n in args.batch_sizes:
            embeddings = torch.randn(n, case.dim, device=args.device).to(DTYPES[args.dtype])
            calls = {provider: functools.partial(seed_score, embeddings, targets, projections) if provider == "seed"
                     else functools.partial(score, embeddings, targets, impl=impl_of(provider)) for provider in providers}
            rows += time_calls(timer, calls, n, None, **env, op="score", case=case.name, H=None, W=None,
                               dtype=args.dtype, repeats=args.repeats)
    return rows


def bench_patch_embed(args: argparse.Namespace, env: Dict[str, str], timer: Timer) -> List[Row]:
    """Every patch-embedding case and batch size, convolution ("seed") then matmul ("torch"); frames/s
    only (the op is a matmul, judged by the tower's profile, not in GB/s)."""
    dtype = DTYPES[args.dtype]
    rows = []
    for case in TOWER_SHAPES:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, case.width, case.patch, case.patch, bias=False).to(args.device, dtype)
        providers = {"seed": conv, "torch": PatchMatmulConv2d.from_conv(conv)}
        for n in args.batch_sizes:
            pixels = torch.randn(n, 3, *TOWER_SIZE, device=args.device).to(dtype)
            calls = {provider: functools.partial(module, pixels) for provider, module in providers.items()}
            rows += time_calls(timer, calls, n, None, **env, op="patch_embed", case=case.patch_embed_case,
                               H=TOWER_SIZE[0], W=TOWER_SIZE[1], dtype=args.dtype, repeats=args.repeats)
    return rows


def bench_layer_norm(args: argparse.Namespace, env: Dict[str, str], timer: Timer, providers: List[str],
                     configs: Dict[str, Tuple[int, int]]) -> List[Row]:
    """Every LayerNorm case and batch size: torch's ``F.layer_norm`` ("seed") against the Triton kernel
    (and its other launches, ``configs``: :func:`layer_norm_providers`); GB/s = the tokens read and written."""
    dtype = DTYPES[args.dtype]
    rows = []
    for case in TOWER_SHAPES:
        generator = torch.Generator().manual_seed(0)
        weight = (1 + 0.1 * torch.randn(case.width, generator=generator)).to(args.device, dtype)
        bias = (0.1 * torch.randn(case.width, generator=generator)).to(args.device, dtype)
        for n in args.batch_sizes:
            tokens = (torch.randn(n, case.tokens, case.width, generator=generator) * 2 + 0.5).to(args.device, dtype)
            nbytes = 2 * tokens.numel() * tokens.element_size()
            candidates = {"seed": functools.partial(F.layer_norm, tokens, (case.width,), weight, bias, 1e-5)}
            candidates.update({p: functools.partial(layer_norm_triton, tokens, weight, bias, 1e-5)
                               for p in providers if p.startswith("triton")})
            candidates.update({p: functools.partial(layer_norm_triton, tokens, weight, bias, 1e-5, rows_per_program=r,
                                                    num_warps=w) for p, (r, w) in configs.items()})
            rows += time_calls(timer, candidates, n, nbytes, **env, op="layer_norm", case=case.layer_norm_case,
                               H=None, W=None, dtype=args.dtype, repeats=args.repeats)
    return rows


def unfused_gelu_linear(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    return F.gelu(linear(x))


def bench_fc1_gelu(args: argparse.Namespace, env: Dict[str, str], timer: Timer) -> List[Row]:
    """Every MLP case and batch size: ``F.linear`` then ``F.gelu`` ("seed") against one matmul with the GELU
    in its epilogue ("torch"); frames/s only (a matmul, judged by the tower's profile, not in GB/s)."""
    dtype = DTYPES[args.dtype]
    rows = []
    for case in TOWER_SHAPES:
        torch.manual_seed(0)
        fc = torch.nn.Linear(case.width, case.mlp_width).to(args.device, dtype)
        for n in args.batch_sizes:
            tokens = torch.randn(n, case.tokens, case.width, device=args.device).to(dtype)
            calls = {"seed": functools.partial(unfused_gelu_linear, tokens, fc),
                     "torch": functools.partial(gelu_linear, tokens, fc)}
            rows += time_calls(timer, calls, n, None, **env, op="fc1_gelu", case=case.fc1_gelu_case,
                               H=None, W=None, dtype=args.dtype, repeats=args.repeats)
    return rows


def bench_fp8_quantize(args: argparse.Namespace, env: Dict[str, str], timer: Timer,
                       providers: List[str]) -> List[Row]:
    """Every tower's two widths of fp8 matmul input (its width: attention and c_fc; its MLP's: c_proj) and
    batch size: torch's ops ("seed") against the Triton kernel; GB/s = rows read + E4M3 and scales written."""
    if args.device.type == "cuda" and torch.cuda.get_device_capability(args.device) < (8, 9):
        print(f"skipped: fp8_quantize (E4M3 needs compute capability 8.9 or more; {env['device']} has less)")
        return []
    dtype = DTYPES[args.dtype]
    rows = []
    for case in TOWER_SHAPES:
        for width in (case.width, case.mlp_width):
            generator = torch.Generator().manual_seed(0)
            for n in args.batch_sizes:
                tokens = torch.randn(n * case.tokens, width, generator=generator).to(args.device, dtype)
                nbytes = tokens.numel() * (tokens.element_size() + 1) + tokens.shape[0] * 4
                calls = {"seed": functools.partial(quantize_rows_torch, tokens)}
                calls.update({p: functools.partial(quantize_rows_triton, tokens) for p in providers if p.startswith("triton")})
                rows += time_calls(timer, calls, n, nbytes, **env, op="fp8_quantize", case=case.fp8_quantize_case(width),
                                   H=None, W=None, dtype=args.dtype, repeats=args.repeats)
                if width == case.width:  # in_proj's and c_fc's inputs: LayerNorms, the second after an add
                    rows += bench_layer_norm_quantize(args, env, timer, providers, case, tokens, n)
                if width != case.mlp_width:
                    continue
                # c_proj's input: c_fc's output, its activation first (OpenAI's towers': QuickGELU); the unfused
                # pair is the activation's own pass (torch's GELU, the QuickGELU kernel), then the kernel
                for name, own_pass, unfused_pass in (("gelu", F.gelu, F.gelu), ("quick-gelu", QuickGELU(), quick_gelu_triton)):
                    if name == "quick-gelu" and case not in QUICK_GELU_SHAPES:
                        continue
                    calls = {"seed": functools.partial(activation_then_quantize, tokens, own_pass, quantize_rows_torch)}
                    for p in providers:
                        if p.startswith("triton"):
                            calls[p] = functools.partial(quantize_rows_triton, tokens, activation=name.replace("-", "_"))
                            calls[f"{p}-after-{name}"] = functools.partial(activation_then_quantize, tokens, unfused_pass,
                                                                           quantize_rows_triton)
                    rows += time_calls(timer, calls, n, nbytes, **env, op="fp8_quantize",
                                       case=f"{case.fp8_quantize_case(width)}-{name}", H=None, W=None, dtype=args.dtype,
                                       repeats=args.repeats)
    return rows


def activation_then_quantize(tokens: torch.Tensor, activation: Callable, quantize: Callable) -> Tuple[torch.Tensor, torch.Tensor]:
    """``activation`` as a pass of its own (torch's GELU, open_clip's QuickGELU or its kernel), rounded to the
    tokens' dtype, then ``quantize``: the fp8 MLP without the fusion."""
    return quantize(activation(tokens))


def bench_layer_norm_quantize(args: argparse.Namespace, env: Dict[str, str], timer: Timer, providers: List[str],
                              case: TowerShape, tokens: torch.Tensor, n: int) -> List[Row]:
    """The fp8 block's LayerNorm and quantisation in one kernel (``-ln``: ln_1's; ``-add-ln``: ln_2's, the
    residual add first) against torch's ops ("seed") and the backend before the fusion (``-after-ln``: the
    LayerNorm kernel, then the quantisation kernel); GB/s counts the same bytes for all (the fused kernel's)."""
    generator = torch.Generator().manual_seed(1)
    weight, bias = (torch.randn(case.width, generator=generator).to(args.device, tokens.dtype) for _ in range(2))
    added = torch.randn(tokens.shape, generator=generator).to(args.device, tokens.dtype)
    seed_norm = functools.partial(F.layer_norm, normalized_shape=(case.width,), weight=weight, bias=bias, eps=1e-5)
    kernel_norm = functools.partial(layer_norm_triton, weight=weight, bias=bias, eps=1e-5)
    rows = []
    for suffix, add in (("-ln", None), ("-add-ln", added)):
        reads = 1 if add is None else 2
        writes = 0 if add is None else 1  # the stream, after the add
        nbytes = tokens.numel() * (tokens.element_size() * (reads + writes) + 1) + tokens.shape[0] * 4
        calls = {"seed": functools.partial(unfused_layer_norm_quantize, tokens, add, seed_norm, quantize_rows_torch)}
        for p in providers:
            if p.startswith("triton"):
                calls[p] = functools.partial(layer_norm_quantize_triton, tokens, weight, bias, 1e-5, add=add)
                calls[f"{p}-after-ln"] = functools.partial(unfused_layer_norm_quantize, tokens, add, kernel_norm,
                                                           quantize_rows_triton)
        rows += time_calls(timer, calls, n, nbytes, **env, op="fp8_quantize", case=case.fp8_quantize_case(case.width) + suffix,
                           H=None, W=None, dtype=args.dtype, repeats=args.repeats)
    return rows


def unfused_layer_norm_quantize(tokens: torch.Tensor, add: Optional[torch.Tensor], layer_norm: Callable,
                                quantize: Callable) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's add (with ``add``), ``layer_norm`` (rounded to the tokens' dtype), then ``quantize``: the fp8
    block without the fusion; (stream, E4M3 values, scales) as :func:`layer_norm_quantize_triton` returns."""
    total = tokens if add is None else tokens + add
    return (total, *quantize(layer_norm(total)))


QUICK_GELU_SHAPES = tuple(case for case in TOWER_SHAPES if case.model in ("B32", "L14"))
"""The towers OpenAI trained with QuickGELU (ViT-bigG-14's are open_clip's own, with the exact GELU)."""


def bench_quick_gelu(args: argparse.Namespace, env: Dict[str, str], timer: Timer, providers: List[str]) -> List[Row]:
    """Every QuickGELU tower and batch size: open_clip's three ops ("seed") against the Triton kernel; GB/s =
    the hidden activations read and written."""
    dtype = DTYPES[args.dtype]
    rows = []
    for case in QUICK_GELU_SHAPES:
        generator = torch.Generator().manual_seed(0)
        for n in args.batch_sizes:
            hidden = (torch.randn(n, case.tokens, case.mlp_width, generator=generator) * 2).to(args.device, dtype)
            calls = {"seed": functools.partial(QuickGELU(), hidden)}
            calls.update({p: functools.partial(quick_gelu_triton, hidden) for p in providers if p.startswith("triton")})
            rows += time_calls(timer, calls, n, 2 * hidden.numel() * hidden.element_size(), **env, op="quick_gelu",
                               case=case.fc1_gelu_case, H=None, W=None, dtype=args.dtype, repeats=args.repeats)
    return rows


def add_ratios(rows: List[Row]) -> None:
    """Fill ``speedup_vs_seed`` (frames/s over the seed's, same op/case/N) and ``frac_of_copy``."""
    seed = {(r.op, r.case, r.N): r.frames_per_s for r in rows if r.provider == "seed"}
    copy = next((r.gb_per_s for r in rows if r.op == "copy"), None)
    for row in rows:
        seed_rate = seed.get((row.op, row.case, row.N))
        if seed_rate and row.frames_per_s:
            row.speedup_vs_seed = row.frames_per_s / seed_rate
        if row.op in ("preprocess", "layer_norm", "fp8_quantize", "quick_gelu") and copy:
            row.frac_of_copy = row.gb_per_s / copy


def markdown_table(rows: List[Row]) -> str:
    header = ["op", "case", "provider", "N", "dtype", "median ms", "min ms", "max ms",
              "frames/s", "GB/s", "frac of copy", "vs seed", "max abs diff vs seed"]
    keys = ["op", "case", "provider", "N", "dtype", "median_ms", "min_ms", "max_ms",
            "frames_per_s", "gb_per_s", "frac_of_copy", "speedup_vs_seed", "max_abs_diff_vs_seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(getattr(row, key)) for key in keys) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.csv:
        check_csv(args.csv, COLUMNS)
    env = environment(args.device)
    providers, skipped = providers_for(args.device)
    tiled = tile_providers(args.preprocess_tiles, providers)
    identity = identity_providers(args.identity_variants, providers)
    layer_norm_configs = layer_norm_providers(args.layer_norm_configs, providers)
    begin = time.perf_counter()

    print(f"# vlmrm_fast kernel benchmark on {env['device']}")
    print(" ".join(f"{key}={value}" for key, value in env.items() if value and key != "device"))
    print(f"ops={','.join(args.ops)} N={args.batch_sizes} dtype={args.dtype} repeats={args.repeats} "
          f"warmup={args.warmup} (median, min, max of the repeats)")
    print(f"providers: {', '.join(providers)}")
    print(f"skipped: {'; '.join(skipped) if skipped else 'none'}")
    if interpreter_enabled():
        print("note: TRITON_INTERPRET=1, so the Triton kernels run in the CPU interpreter; their timings "
              "measure the interpreter, not the kernels.")
    print()

    files = RunFiles(args.csv, args.json, COLUMNS, {"environment": env, "config": config_of(args),
                                                    "providers": providers + list(tiled) + list(identity)
                                                    + list(layer_norm_configs),
                                                    "skipped": skipped})
    timer = Timer(args.device, args.warmup, args.repeats)

    def add(new: List[Row]) -> None:  # each op's rows written as soon as they are measured, ratios filled
        add_ratios(files.rows + new)
        files.add(new)

    with torch.inference_mode(), files.interruptible():
        if "copy" in args.ops:
            add([bench_copy(args, env, timer)])
        if "preprocess" in args.ops:
            add(bench_preprocess(args, env, timer, providers, tiled, identity))
        if "score" in args.ops:
            add(bench_score(args, env, timer, providers))
        if "patch_embed" in args.ops:
            add(bench_patch_embed(args, env, timer))
        if "layer_norm" in args.ops:
            add(bench_layer_norm(args, env, timer, providers, layer_norm_configs))
        if "fc1_gelu" in args.ops:
            add(bench_fc1_gelu(args, env, timer))
        if "fp8_quantize" in args.ops:
            add(bench_fp8_quantize(args, env, timer, providers))
        if "quick_gelu" in args.ops:
            add(bench_quick_gelu(args, env, timer, providers))
    elapsed = time.perf_counter() - begin

    print(markdown_table(files.rows))
    print(f"\n{len(files.rows)} rows in {elapsed:.1f} s")
    files.finish(elapsed_s=elapsed)
    if not files.complete:
        sys.exit(130)

if __name__ == "__main__":
    main()
