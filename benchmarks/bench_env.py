"""Env steps/s with the VLM reward, and render-only frames/s: vlmrm_fast's path against the seed's flow.

Two paths over the same humanoid envs (``vlmrm_fast/TexturedHumanoid-v0``), measured in the same run,
timed in alternation (one repeat of one, then one of the other), so drifting load on a shared
machine cancels out of ``speedup_vs_reference``:

- ``vlmrm_fast``: a ``DummyVecEnv`` of envs rendering at the reward model's input size (224 x 224),
  wrapped by ``VLMRewardVecEnv(render="batch")``: after every step all N envs are drawn by one
  ``BatchRenderer`` into one uint8 tensor on the device (on CUDA with the GPU path, frames never
  touch the host) and scored in one ``CLIPReward`` call.
- ``reference`` (the seed's way, SPEC §1.4): the same envs rendering at 480 x 480; after every step
  ``env.render()`` per env into host numpy, frames appended to a Python list for the whole rollout,
  copied into one array at the end, moved to the device with a pageable copy, and scored once per
  rollout (in batches of at most ``--reference-batch`` frames) with the seed's preprocessing (float32
  at full resolution, torchvision bicubic resize to 224 without antialiasing, normalise), the tower in
  fp32 weights (under fp16 autocast on CUDA, as the original ran) and the explicit D x D projection.
  The seed moved frames through ``SubprocVecEnv`` pipes too (pickling ~0.7 MB per env step); that
  cost is left out here, so the reference is, if anything, flattered.

Both paths use the same tower architecture (``--model``; random weights: speed does not depend on
them) and the same goal, baseline and alpha. Actions are random, drawn once from a seeded generator
and replayed identically on both paths.

Benchmarks:

- ``render``: frames/s of rendering alone, N envs per call: a ``BatchRenderer`` into a device
  tensor (synchronised) against ``env.render()`` per env into host numpy, at 224 and 480 px. This
  runs first, so the rasterisation figure is in even if a later stage runs out of time.
- ``env_steps``: env steps/s (steps summed over the N envs, end to end including the reward) over
  rollouts of ``--steps`` vector steps, with the time per env step of each stage: ``physics``
  (``DummyVecEnv.step_wait``), ``render``, ``transfer`` (reference only: list -> one array -> device;
  on the fast path the device copy happens inside ``render``), ``reward`` (the reward model, rewards
  back on the host) and ``other`` (the rest: wrapper bookkeeping, info dicts).

Usage:
    python benchmarks/bench_env.py                     # defaults for the device found
    python benchmarks/bench_env.py --quick             # smallest sensible set (CPU: under a minute)
    python benchmarks/bench_env.py --model ViT-B-32 --csv benchmarks/results/env-h200.csv \
        --json benchmarks/results/env-h200.json
"""
from __future__ import annotations

import os

# MuJoCo picks its GL backend when first imported: headless EGL unless the caller chose otherwise.
os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, fields  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Importing vlmrm_fast loads open_clip and with it Triton, which must happen before any Mesa GL
# context exists (README, "Import order on CPU machines").
from results_io import RunFiles, check_csv, config_of, fmt  # noqa: E402  (benchmarks/, beside this script)
from vlmrm_fast.run_info import cpu_name, git_commit, gpu_driver, library_versions, package_version  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_SIZE = 480  # the original code's frames (SPEC §1.3)
RENDER_SIZES = (224, 480)
GOAL, BASELINE, ALPHA = "a humanoid robot kneeling", "a humanoid robot", 0.5
PAPER_ROLLOUT_FRAMES = 3200  # 32 envs x 100 steps, scored in one batch per rollout (SPEC §1.3)


# --------------------------------------------------------------------------- environment of a run


def gl_renderer_name() -> str:
    """GL_RENDERER of a fresh context of MuJoCo's backend ("llvmpipe ..." = software, on the CPU)."""
    try:
        import mujoco
        from OpenGL import GL

        from vlmrm_fast.render.gl_context import temporary_mujoco_renderer

        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='1'/></worldbody></mujoco>")
        with temporary_mujoco_renderer(model, 8, 8) as renderer:
            renderer._gl_context.make_current()
            name = GL.glGetString(GL.GL_RENDERER)
        return name.decode() if isinstance(name, bytes) else str(name or "")
    except Exception:  # noqa: BLE001 - informative only
        return ""


def skipped_without_rendering() -> bool:
    """Where MuJoCo cannot render here, say so and how to fix it in one line (not a traceback from deep
    inside PyOpenGL), and return True."""
    from vlmrm_fast.render import rendering_unavailable_reason

    reason = rendering_unavailable_reason()
    if reason is not None:
        print(f"skipped: {reason}. Set MUJOCO_GL=egl and PYOPENGL_PLATFORM=egl with an EGL library installed "
              "(CPU: apt-get install libegl1 libgl1-mesa-dri; GPU: the NVIDIA driver's EGL).")
    return reason is not None


def environment(device: torch.device) -> Dict[str, str]:
    """What a result depends on: commit, device, driver, versions and the GL renderer (the CSV's key columns)."""
    commit = git_commit()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        driver_version = gpu_driver()
    else:
        device_name = f"{cpu_name()} ({torch.get_num_threads()} threads)"
        driver_version = ""
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "device": device_name,
        "driver": driver_version,
        "cuda": (torch.version.cuda or "") if device.type == "cuda" else "",
        "torch": torch.__version__,
        "mujoco": package_version("mujoco"),
        "gymnasium": package_version("gymnasium"),
        "stable_baselines3": package_version("stable_baselines3"),
        **library_versions("open_clip"),
        "python": platform.python_version(),
        "mujoco_gl": os.environ.get("MUJOCO_GL", ""),
        "gl_renderer": gl_renderer_name(),
    }


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One CSV row: one (bench, path, N, size), with the run's environment."""

    timestamp: str
    commit: str
    device: str
    driver: str
    cuda: str
    torch: str
    mujoco: str
    gymnasium: str
    stable_baselines3: str
    open_clip: str
    python: str
    mujoco_gl: str
    gl_renderer: str
    bench: str  # "render" | "env_steps"
    path: str  # "vlmrm_fast" | "reference"
    render_path: str  # BatchRenderer's "gpu" / "cpu"; "host" for env.render()
    N: int
    width: int
    height: int
    model: str = ""
    dtype: str = ""
    backend: str = ""
    steps: Optional[int] = None  # vector steps per rollout (env_steps)
    repeats: int = 0
    median_ms: float = 0.0  # per rollout (env_steps) or per render call (render)
    min_ms: float = 0.0
    max_ms: float = 0.0
    steps_per_s: Optional[float] = None
    frames_per_s: Optional[float] = None
    physics_ms: Optional[float] = None  # per env step, median over the repeats
    render_ms: Optional[float] = None
    transfer_ms: Optional[float] = None
    reward_ms: Optional[float] = None
    other_ms: Optional[float] = None
    speedup_vs_reference: Optional[float] = None
    note: str = ""


COLUMNS = [f.name for f in fields(Row)]
STAGES = ("physics", "render", "transfer", "reward")


# --------------------------------------------------------------------------- options


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line; device-dependent defaults are filled in here."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the reward model runs and the batch renderer writes")
    parser.add_argument("--num-envs", nargs="+", type=int, help="N; default 1 8 32 on CUDA, 1 8 on CPU")
    parser.add_argument("--steps", type=int,
                        help="vector steps per rollout; default 100 on CUDA (the paper's episode), 4 on CPU")
    parser.add_argument("--repeats", type=int, help="timed rollouts / render calls per row; default 3")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rollouts / render calls first (default 1)")
    parser.add_argument("--render-num-envs", nargs="+", type=int,
                        help="N for the render-only rows; default: every N on CUDA, the largest on CPU")
    parser.add_argument("--render-sizes", nargs="+", type=int, default=list(RENDER_SIZES),
                        help="square frame sizes of the render-only rows (default: 224 480)")
    parser.add_argument("--no-render", action="store_true", help="skip the render-only rows")
    parser.add_argument("--no-env-steps", action="store_true", help="skip the env-steps rows")
    parser.add_argument("--model", help="open_clip model for both paths; default ViT-B-32 on CUDA, vlmrm-tiny on CPU")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="vlmrm_fast's tower precision (auto: bf16 on CUDA, fp32 on CPU); the reference is "
                             "fp32 weights under fp16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--backend", default="auto", help="vlmrm_fast's vision-tower backend (default auto)")
    parser.add_argument("--reference-batch", type=int, default=PAPER_ROLLOUT_FRAMES,
                        help="most frames per reward batch on the reference path (default 3200, the paper's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smallest sensible set")
    parser.add_argument("--csv", type=Path, help="append one row per (bench, path, N, size) to this CSV")
    parser.add_argument("--json", type=Path, help="write the whole run (environment, config, rows) as JSON")
    args = parser.parse_args(argv)

    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here.")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: only cuda and cpu are benchmarked.")
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    on_cuda = args.device.type == "cuda"
    if args.num_envs is None:
        args.num_envs = ([32] if on_cuda else [1, 4]) if args.quick else ([1, 8, 32] if on_cuda else [1, 8])
    if args.steps is None:
        args.steps = (20 if on_cuda else 2) if args.quick else (100 if on_cuda else 4)
    if args.repeats is None:
        args.repeats = 2 if (args.quick and not on_cuda) else 3
    if args.render_num_envs is None:
        args.render_num_envs = list(args.num_envs) if on_cuda else [max(args.num_envs)]
    if args.model is None:
        args.model = "ViT-B-32" if on_cuda else "vlmrm-tiny"
    if args.dtype == "auto":
        args.dtype = "bf16" if on_cuda else "fp32"
    numbers = [*args.num_envs, *args.render_num_envs, *args.render_sizes, args.steps, args.repeats,
               args.reference_batch]
    if min(numbers) < 1 or args.warmup < 0:
        parser.error("N, sizes, --steps, --repeats and --reference-batch must be at least 1; --warmup at least 0.")
    if args.warmup == 0:  # allowed for quick checks; the first rollout then builds (compiles, captures, makes GL contexts)
        print("note: --warmup 0 times the first rollout and render call with their one-off set-up (torch.compile, "
              "CUDA graphs, GL contexts): not steady-state figures.", file=sys.stderr)
    args.num_envs = sorted(set(args.num_envs))
    args.render_num_envs = sorted(set(args.render_num_envs))
    return args


# --------------------------------------------------------------------------- timing helpers


class Clock:
    """Wall-clock stage timer; on CUDA each stage ends with a synchronise, so device work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: Dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self.totals = {}

    def add(self, stage: str, seconds: float) -> None:
        self.totals[stage] = self.totals.get(stage, 0.0) + seconds

    def timed(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` wrapped so that its calls add to ``stage``."""

        def call(*a: Any, **k: Any) -> Any:
            begin = time.perf_counter()
            out = fn(*a, **k)
            self.sync()
            self.add(stage, time.perf_counter() - begin)
            return out

        return call


class TimedRewardModel:
    """Stands in for a CLIPReward inside the wrapper: same answers, calls timed as the ``reward`` stage."""

    def __init__(self, model: Any, clock: Clock) -> None:
        self._model = model
        self._call = clock.timed("reward", model.__call__)

    def __call__(self, frames: Any, *, bottom_up: bool = False) -> Any:
        # bottom_up named, as CLIPReward names it: the wrapper then passes the GPU path's OpenGL row order
        # through to the preprocessing kernel instead of flipping the frames itself first (an extra copy).
        return self._call(frames, bottom_up=bottom_up)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@dataclass
class Measured:
    """Seconds per timed repeat, and each stage's seconds per repeat."""

    times: List[float]
    stages: Dict[str, List[float]]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


# --------------------------------------------------------------------------- the reference reward


class SeedReward:
    """The original VLM-RM code's reward on a batch of frames (SPEC §1.4), the reference path's scorer.

    fp32 weights; on CUDA the preprocessing and the tower run under ``torch.autocast(float16)`` as the
    original did. Frames uint8 [N, H, W, 3] -> permute to NCHW, float32 at full resolution, / 255,
    torchvision bicubic resize to the tower's size without antialiasing, normalise; unit embeddings;
    ``1 - 0.5 |(x - g) @ M|^2`` with the explicit D x D ``M = alpha u u^T + (1 - alpha) I``, built once.
    """

    def __init__(self, model: torch.nn.Module, size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 goal: torch.Tensor, direction: torch.Tensor, alpha: float, device: torch.device) -> None:
        import torchvision.transforms.functional as tvf
        from torchvision.transforms import InterpolationMode

        self._tvf, self._bicubic = tvf, InterpolationMode.BICUBIC
        self.model = model.eval().to(device).float()
        self.size, self.mean, self.std = list(size), list(mean), list(std)
        self.device = device
        dim = goal.shape[0]
        eye = torch.eye(dim, device=device)
        self.goal = goal.to(device, torch.float32)
        u = direction.to(device, torch.float32)
        self.projection = alpha * torch.outer(u, u) + (1.0 - alpha) * eye

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            x = frames.permute(0, 3, 1, 2).float() / 255.0
            x = self._tvf.resize(x, self.size, interpolation=self._bicubic, antialias=False)
            x = self._tvf.normalize(x, self.mean, self.std)
            emb = self.model.encode_image(x)
        emb = emb.float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return 1.0 - 0.5 * ((emb - self.goal) @ self.projection).norm(dim=-1) ** 2


# --------------------------------------------------------------------------- set-up


def make_envs(count: int, width: int, seed: int, height: Optional[int] = None) -> List[Any]:
    """``count`` humanoid envs rendering ``width`` x ``height`` RGB, reset with seeds seed, seed+1, ..."""
    import gymnasium as gym

    from vlmrm_fast.envs import HUMANOID_ENV_ID

    height = width if height is None else height
    envs = [gym.make(HUMANOID_ENV_ID, render_mode="rgb_array", width=width, height=height) for _ in range(count)]
    for i, env in enumerate(envs):
        env.reset(seed=seed + i)
    return envs


def make_reward_models(args: argparse.Namespace) -> Tuple[Any, SeedReward]:
    """The package's CLIPReward and the seed's scorer: same architecture, same weights, same targets."""
    from vlmrm_fast import CLIPReward
    from vlmrm_fast.models import create_clip

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "random weights": speed does not depend on them
        torch.manual_seed(args.seed)
        model, tokenizer = create_clip(args.model, None)
        torch.manual_seed(args.seed)
        seed_model, _ = create_clip(args.model, None)
        rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=ALPHA, device=args.device,
                        dtype=dtypes[args.dtype], backend=args.backend, model_name=args.model)
    spec = rm.preprocess_spec
    seed = SeedReward(seed_model, tuple(spec.size), spec.mean, spec.std, rm.goals[0], rm.directions[0], ALPHA,
                      args.device)
    return rm, seed


def random_actions(space: Any, rollouts: int, steps: int, n: int, seed: int) -> np.ndarray:
    """Uniform random actions [rollouts, steps, n, A] in the action box, the same for both paths."""
    rng = np.random.default_rng(seed)
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)
    return rng.uniform(low, high, size=(rollouts, steps, n, low.shape[0])).astype(np.float32)


# --------------------------------------------------------------------------- render-only


def bench_render(args: argparse.Namespace, env: Dict[str, str], fast_envs: List[Any], ref_envs: Dict[int, List[Any]],
                 n: int, size: int) -> List[Row]:
    """One render call of N envs, repeated: BatchRenderer into a device tensor vs env.render() into host numpy."""
    from vlmrm_fast.render import BatchRenderer

    clock = Clock(args.device)
    renderer = BatchRenderer.from_envs(fast_envs[:n], size, size, device=args.device)
    host_envs = ref_envs[size][:n]

    def fast() -> Any:
        out = renderer.render()
        clock.sync()
        return out

    def reference() -> List[np.ndarray]:
        return [e.render() for e in host_envs]

    times: Dict[str, List[float]] = {"vlmrm_fast": [], "reference": []}
    fns = {"vlmrm_fast": fast, "reference": reference}
    try:
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        for _ in range(args.repeats):  # alternate, so drift hits both
            for name, fn in fns.items():
                begin = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - begin)
        render_path = renderer.path
        note = "" if renderer.fallback_reason is None else f"batch renderer fallback: {renderer.fallback_reason}"
    finally:
        renderer.close()

    rows = []
    for name in ("vlmrm_fast", "reference"):
        t = times[name]
        median = statistics.median(t)
        rows.append(Row(
            **env, bench="render", path=name, render_path=render_path if name == "vlmrm_fast" else "host",
            N=n, width=size, height=size, repeats=args.repeats,
            median_ms=median * 1e3, min_ms=min(t) * 1e3, max_ms=max(t) * 1e3, frames_per_s=n / median,
            note=note if name == "vlmrm_fast" else "env.render() per env, host numpy",
        ))
    rows[0].speedup_vs_reference = rows[0].frames_per_s / rows[1].frames_per_s
    return rows


# --------------------------------------------------------------------------- env steps


class FastRollout:
    """``VLMRewardVecEnv(render="batch")`` over a DummyVecEnv of envs at the tower size, stages instrumented."""

    def __init__(self, envs: List[Any], rm: Any, clock: Clock, seed: int) -> None:
        from stable_baselines3.common.vec_env import DummyVecEnv

        from vlmrm_fast.wrappers import VLMRewardVecEnv

        venv = DummyVecEnv([(lambda e=e: e) for e in envs])
        venv.seed(seed)
        self.venv = VLMRewardVecEnv(venv, rm, render="batch")
        self.venv.reset()
        self.clock = clock
        # Stage timers: instance attributes shadow the methods the wrapper calls.
        venv.step_wait = clock.timed("physics", venv.step_wait)
        # What the wrapper renders through if the batch renderer fails in use (it then drops it, with a warning).
        venv.get_images = clock.timed("render", venv.get_images)
        renderer = self.venv.renderer
        renderer.render = clock.timed("render", renderer.render)
        self.venv.reward_model = TimedRewardModel(rm, clock)
        self._render_path = renderer.path
        self._fallback_reason = renderer.fallback_reason

    @property
    def render_path(self) -> str:
        """The batch renderer's path; "host" once the wrapper has dropped it (frames from env.render() per env)."""
        return self._render_path if self.venv.renderer is not None else "host"

    @property
    def fallback_reason(self) -> Optional[str]:
        if self.venv.renderer is None:
            return "BatchRenderer.render() failed in use; the wrapper rendered through env.render() per env"
        return self._fallback_reason

    def __call__(self, actions: np.ndarray) -> None:
        for step_actions in actions:
            self.venv.step(step_actions)

    def close(self) -> None:
        # Only the renderer: the envs are shared with other rows (VecEnv.close would close them).
        if self.venv.renderer is not None:  # None if it failed and the wrapper fell back to images
            self.venv.renderer.close()


class ReferenceRollout:
    """The seed's flow over a DummyVecEnv of the 480 px envs: frames listed per rollout, scored at its end."""

    def __init__(self, envs: List[Any], seed_reward: SeedReward, clock: Clock, seed: int, batch: int) -> None:
        from stable_baselines3.common.vec_env import DummyVecEnv

        self.venv = DummyVecEnv([(lambda e=e: e) for e in envs])
        self.venv.seed(seed)
        self.venv.reset()
        self.reward, self.clock, self.batch = seed_reward, clock, batch
        self.device = seed_reward.device

    def __call__(self, actions: np.ndarray) -> np.ndarray:
        clock, venv = self.clock, self.venv
        frames: List[np.ndarray] = []
        for step_actions in actions:
            begin = time.perf_counter()
            venv.step(step_actions)
            clock.add("physics", time.perf_counter() - begin)
            begin = time.perf_counter()
            for env in venv.envs:
                frames.append(env.render())
            clock.add("render", time.perf_counter() - begin)
        begin = time.perf_counter()
        host = np.array(frames)  # the list copied into one array
        del frames
        device_frames = torch.from_numpy(host).to(self.device)  # pageable host memory
        clock.sync()
        clock.add("transfer", time.perf_counter() - begin)
        begin = time.perf_counter()
        rewards = torch.cat([self.reward(device_frames[i : i + self.batch])
                             for i in range(0, device_frames.shape[0], self.batch)]).cpu().numpy()
        clock.add("reward", time.perf_counter() - begin)
        return rewards

    def close(self) -> None:
        pass


def bench_env_steps(args: argparse.Namespace, env: Dict[str, str], rm: Any, seed_reward: SeedReward,
                    fast_envs: List[Any], ref_envs: List[Any], n: int) -> List[Row]:
    """Rollouts of ``--steps`` vector steps on both paths, alternating; steps/s and stage times per env step."""
    clocks = {"vlmrm_fast": Clock(args.device), "reference": Clock(args.device)}
    rollouts = {
        "vlmrm_fast": FastRollout(fast_envs[:n], rm, clocks["vlmrm_fast"], args.seed),
        "reference": ReferenceRollout(ref_envs[:n], seed_reward, clocks["reference"], args.seed,
                                      args.reference_batch),
    }
    actions = random_actions(fast_envs[0].action_space, args.warmup + args.repeats, args.steps, n, args.seed + n)
    measured = {name: Measured([], {s: [] for s in STAGES}) for name in rollouts}
    try:
        for r in range(args.warmup + args.repeats):
            for name, rollout in rollouts.items():
                clock = clocks[name]
                clock.sync()
                clock.reset()
                begin = time.perf_counter()
                rollout(actions[r])
                clock.sync()
                elapsed = time.perf_counter() - begin
                if r >= args.warmup:
                    measured[name].times.append(elapsed)
                    for stage in STAGES:
                        measured[name].stages[stage].append(clock.totals.get(stage, 0.0))
        fast_path, fallback = rollouts["vlmrm_fast"].render_path, rollouts["vlmrm_fast"].fallback_reason
    finally:
        for rollout in rollouts.values():
            rollout.close()

    env_steps = n * args.steps
    rows = []
    for name in ("vlmrm_fast", "reference"):
        m = measured[name]
        per_step = {s: statistics.median(v) * 1e3 / env_steps for s, v in m.stages.items()}
        other = statistics.median(
            [t - sum(m.stages[s][i] for s in STAGES) for i, t in enumerate(m.times)]) * 1e3 / env_steps
        fast = name == "vlmrm_fast"
        rows.append(Row(
            **env, bench="env_steps", path=name, render_path=fast_path if fast else "host", N=n,
            width=rm.image_size[1] if fast else REFERENCE_SIZE, height=rm.image_size[0] if fast else REFERENCE_SIZE,
            model=args.model,
            dtype=args.dtype if fast else ("fp16-autocast" if args.device.type == "cuda" else "fp32"),
            backend=rm.backend if fast else "seed", steps=args.steps, repeats=args.repeats,
            median_ms=m.median * 1e3, min_ms=min(m.times) * 1e3, max_ms=max(m.times) * 1e3,
            steps_per_s=env_steps / m.median,
            physics_ms=per_step["physics"], render_ms=per_step["render"],
            transfer_ms=per_step["transfer"] if not fast else None, reward_ms=per_step["reward"], other_ms=other,
            note=(("rewards per step; device copy inside render"
                   + ("" if fallback is None else f"; batch renderer fallback: {fallback}")) if fast
                  else "rewards per rollout; env.render() per env; list -> array -> pageable copy"),
        ))
    rows[0].speedup_vs_reference = rows[0].steps_per_s / rows[1].steps_per_s
    return rows


# --------------------------------------------------------------------------- output


def markdown_table(rows: List[Row]) -> str:
    header = ["bench", "path", "render", "N", "W x H", "median ms", "min ms", "max ms", "steps/s", "frames/s",
              "physics ms", "render ms", "transfer ms", "reward ms", "other ms", "vs reference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.bench, r.path, r.render_path, r.N, f"{r.width}x{r.height}", r.median_ms, r.min_ms, r.max_ms,
                 r.steps_per_s, r.frames_per_s, r.physics_ms, r.render_ms, r.transfer_ms, r.reward_ms, r.other_ms,
                 r.speedup_vs_reference]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.csv:
        check_csv(args.csv, COLUMNS)
    # Triton before any GL context: importing triton (as vlmrm_fast and torch.compile do) once Mesa's
    # EGL has loaded its LLVM crashes the process (seen with Mesa llvmpipe; harmless the other way round).
    import vlmrm_fast  # noqa: F401

    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    if args.device.type == "cuda":  # the envs' own contexts and the batch renderer on the benchmarked GPU
        os.environ.setdefault("MUJOCO_EGL_DEVICE_ID", str(args.device.index))
    if skipped_without_rendering():
        return
    try:
        import gymnasium  # noqa: F401
        import stable_baselines3  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        print(f"skipped: {exc.name} is not installed (pip install -e \".[train]\" torchvision).")
        return

    env = environment(args.device)
    begin = time.perf_counter()
    print(f"# vlmrm_fast env-steps benchmark on {env['device']}")
    print(" ".join(f"{k}={v}" for k, v in env.items() if v and k != "device"))
    print(f"N={args.num_envs} steps/rollout={args.steps} repeats={args.repeats} warmup={args.warmup} "
          f"model={args.model} (random weights) dtype={args.dtype} backend={args.backend} "
          f"render N={[] if args.no_render else args.render_num_envs} sizes={args.render_sizes} "
          f"reference batch<={args.reference_batch} (median, min, max of the repeats; stage times per env step)")
    if args.device.type == "cpu":
        print("note: on CPU, EGL is Mesa's software rasteriser (see gl_renderer) and the tower is tiny: "
              "these rows measure env/render/transfer costs, not GPU rendering.")
    print(flush=True)

    rm, seed_reward = make_reward_models(args)
    log(f"reward models ready ({time.perf_counter() - begin:.1f} s): vlmrm_fast {rm.backend} {args.dtype}, "
        f"reference fp32{' under fp16 autocast' if args.device.type == 'cuda' else ''}")
    n_max = max([*args.num_envs, *([] if args.no_render else args.render_num_envs)])
    fast_h, fast_w = rm.image_size  # the fast path renders at the tower's input size: no resize
    fast_envs = make_envs(n_max, fast_w, args.seed, height=fast_h)
    ref_sizes = {REFERENCE_SIZE, *([] if args.no_render else args.render_sizes)}
    # env.render() of the fast path's envs where the size matches (the fast path never calls it).
    ref_envs = {s: fast_envs if (s, s) == (fast_h, fast_w) else make_envs(n_max, s, args.seed)
                for s in sorted(ref_sizes)}
    log(f"{n_max} envs per size ready ({time.perf_counter() - begin:.1f} s)")

    # Versions the rows depend on beyond the CSV's columns: the fast path's kernels and backends, the seed's resize.
    libraries = library_versions("triton", "torchvision", "onnxruntime", "tensorrt")
    files = RunFiles(args.csv, args.json, COLUMNS,
                     {"environment": env, "libraries": libraries, "config": config_of(args)})
    try:
        with files.interruptible():
            if not args.no_render:
                for n in args.render_num_envs:
                    for size in args.render_sizes:
                        new = bench_render(args, env, fast_envs, ref_envs, n, size)
                        files.add(new)  # each row written as soon as it is measured
                        log(f"render N={n} {size}px: " + ", ".join(
                            f"{r.path} {r.frames_per_s:.1f} frames/s ({r.render_path})" for r in new)
                            + f"  [{time.perf_counter() - begin:.0f} s]")
            if not args.no_env_steps:
                for n in args.num_envs:
                    new = bench_env_steps(args, env, rm, seed_reward, fast_envs, ref_envs[REFERENCE_SIZE], n)
                    files.add(new)
                    log(f"env steps N={n}: " + ", ".join(f"{r.path} {r.steps_per_s:.1f} steps/s" for r in new)
                        + f"  [{time.perf_counter() - begin:.0f} s]")
    finally:
        for e in {id(e): e for group in ref_envs.values() for e in group}.values():
            e.close()
    elapsed = time.perf_counter() - begin

    rows = files.rows
    print(markdown_table(rows))
    print(f"\n{len(rows)} rows in {elapsed:.1f} s")
    best = max((r for r in rows if r.bench == "render" and r.path == "vlmrm_fast" and r.width == 224),
               key=lambda r: r.frames_per_s, default=None)
    if best is not None and args.device.type == "cuda":
        print(f"render target on an H200: 3000 frames/s at 224 x 224 into CUDA tensors; best here "
              f"{best.frames_per_s:.0f} frames/s (N={best.N}, {best.render_path} path, GL: {env['gl_renderer']})")
    files.finish(elapsed_s=elapsed)
    if not files.complete:
        sys.exit(130)

if __name__ == "__main__":
    main()
