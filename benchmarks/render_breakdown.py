"""Where a humanoid frame's render time goes, and whether renderers working in parallel add up.

``bench_env.py`` measures how fast ``BatchRenderer`` is; this script asks why. Each variant draws
``--num-envs`` humanoid envs (``vlmrm_fast/TexturedHumanoid-v0``, 224 x 224) per call into one uint8
tensor on the device, and reports frames/s (``N`` / the median call over ``--repeats`` calls):

| variant | what changes |
|---|---|
| ``default`` | nothing: the scene as the env defines it (``bench_env.py``'s render row) |
| ``update_scene_only`` | ``mjv_updateScene`` for every env, no drawing: the CPU cost MuJoCo pays before any GL |
| ``no_shadow``, ``no_reflection``, ``no_skybox`` | that scene flag off (one extra pass each: the shadow map, the mirrored floor, the sky) |
| ``shadowsize_S`` | ``model.vis.quality.shadowsize`` = S (MuJoCo's default is 4096: a 4096 x 4096 depth pass per frame, whatever the frame size) |
| ``offsamples_0`` | no multisampling (the XML default is 4) |
| ``threads_T`` | T renderers, each in its own thread with its own EGL context and envs; frames/s summed |
| ``processes_P`` | T renderers in P processes; frames/s summed over the same wall-clock window |

``--scene-shadow-size S`` and ``--scene-no-shadow`` change the scene every variant starts from (the
parallel ones included), to see how far a lighter scene goes with more renderers: e.g. whether 1024-texel
shadows or none in 2-8 processes reach the 3,000 frames/s target.

If frames/s barely moves with the frame size or the number of envs per call, the cost is per frame
(passes, state changes, driver work); ``threads``/``processes`` then say whether it is the CPU (they
scale) or the GPU's rasteriser (they do not). Threads that scale less than processes point at the
GIL.

Usage:
    python benchmarks/render_breakdown.py --json benchmarks/results/render-breakdown-h200.json
    python benchmarks/render_breakdown.py --quick        # CPU: Mesa, a smoke run (about a minute)
"""
from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402

from bench_env import environment, log, make_envs, skipped_without_rendering  # noqa: E402  (benchmarks/, beside this script)
from results_io import RunFiles, config_of, fmt  # noqa: E402

from vlmrm_fast.argtypes import non_negative_int, positive_int  # noqa: E402

SIZE = 224
SCENE_FLAGS = {"no_shadow": "mjRND_SHADOW", "no_reflection": "mjRND_REFLECTION", "no_skybox": "mjRND_SKYBOX"}


@dataclass
class Row:
    """One variant: frames/s over ``workers`` renderers (the median call's for one renderer, with the
    median, min and max call times; for several, all their frames over one wall-clock window)."""

    variant: str
    workers: int
    path: str = ""
    frames_per_s: Optional[float] = None
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    error: str = ""


def _set_quality(envs: Sequence[Any], **quality: int) -> None:
    """Set ``model.vis.quality`` fields on each env's model (read when a GL context is made)."""
    for env in envs:
        for name, value in quality.items():
            setattr(env.unwrapped.model.vis.quality, name, value)


def _scene_of(renderer: Any) -> Any:
    """The MjvScene a BatchRenderer draws from (its own on the GPU path, its mujoco.Renderer's on the CPU path)."""
    return renderer._scene if renderer.path == "gpu" else renderer._renderer.scene


def _renderer(envs: Sequence[Any], device: torch.device, *flags_off: Optional[str]) -> Any:
    import mujoco

    from vlmrm_fast.render import BatchRenderer

    renderer = BatchRenderer.from_envs(list(envs), SIZE, SIZE, device=device)
    for flag in flags_off:
        if flag is not None:
            _scene_of(renderer).flags[getattr(mujoco.mjtRndFlag, flag)] = 0
    return renderer


def _scene_quality(shadow_size: Optional[int]) -> Dict[str, int]:
    """``model.vis.quality`` settings of the scene every variant starts from (``--scene-shadow-size``)."""
    return {} if shadow_size is None else {"shadowsize": shadow_size}


def _scene_flag(no_shadow: bool) -> Optional[str]:
    """The scene flag every variant turns off (``--scene-no-shadow``), or None."""
    return SCENE_FLAGS["no_shadow"] if no_shadow else None


def _render_call(renderer: Any, device: torch.device) -> Callable[[], None]:
    def call() -> None:
        renderer.render()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return call


def _update_scene_call(renderer: Any, envs: Sequence[Any]) -> Callable[[], None]:
    import mujoco

    scene = _scene_of(renderer)
    cams, options = renderer.cameras, renderer._options

    def call() -> None:
        for env, cam, opt in zip(envs, cams, options):
            u = env.unwrapped
            mujoco.mjv_updateScene(u.model, u.data, opt, None, cam, mujoco.mjtCatBit.mjCAT_ALL, scene)
    return call


def _median_fps(call: Callable[[], None], frames_per_call: int, repeats: int, warmup: int) -> Dict[str, float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    median = statistics.median(times)
    return {"median_ms": median * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "frames_per_s": frames_per_call / median}


def single_variants(args: argparse.Namespace) -> Iterator[Row]:
    """The variants that change one thing in one renderer, each row as it is measured."""
    variants: List[Tuple[str, Dict[str, int], Optional[str]]] = [("default", {}, None)]
    variants += [(name, {}, flag) for name, flag in SCENE_FLAGS.items()]
    variants += [(f"shadowsize_{s}", {"shadowsize": s}, None) for s in args.shadow_sizes]
    variants += [("offsamples_0", {"offsamples": 0}, None)]
    for name, quality, flag in variants:
        envs = make_envs(args.num_envs, SIZE, args.seed)
        _set_quality(envs, **{**_scene_quality(args.scene_shadow_size), **quality})
        renderer = _renderer(envs, args.device, _scene_flag(args.scene_no_shadow), flag)
        try:
            measured = _median_fps(_render_call(renderer, args.device), args.num_envs, args.repeats, args.warmup)
            yield Row(name, 1, renderer.path, **measured)
            if name == "default":
                scene_only = _median_fps(_update_scene_call(renderer, envs), args.num_envs, args.repeats, args.warmup)
                yield Row("update_scene_only", 1, "cpu", **scene_only)
        finally:
            renderer.close()
            for env in envs:
                env.close()


START_TIMEOUT_S = 300
"""How long a worker waits at the start line for the others (their envs, renderer and warm-up calls)."""


def _worker_loop(num_envs: int, seed: int, device: str, calls: int, warmup: int, start: Any,
                 shadow_size: Optional[int] = None, no_shadow: bool = False) -> Tuple[float, float, str]:
    """Make envs and a renderer (in the ``--scene-*`` scene), wait for the others, render ``calls`` times:
    (begin, end, path). A worker that fails before the start line breaks it for the others."""
    dev = torch.device(device)
    envs: list = []
    renderer = None
    try:
        try:
            envs = make_envs(num_envs, SIZE, seed)
            _set_quality(envs, **_scene_quality(shadow_size))
            renderer = _renderer(envs, dev, _scene_flag(no_shadow))
            call = _render_call(renderer, dev)
            for _ in range(warmup):
                call()
        except BaseException:
            start.abort()  # the others' wait() raises BrokenBarrierError instead of waiting for this one
            raise
        start.wait()
        begin = time.monotonic()
        for _ in range(calls):
            call()
        return begin, time.monotonic(), renderer.path
    finally:
        if renderer is not None:
            renderer.close()
        for env in envs:
            env.close()


def _process_worker(num_envs: int, seed: int, device: str, calls: int, warmup: int, start: Any, results: Any,
                    shadow_size: Optional[int], no_shadow: bool) -> None:
    try:
        results.put(("ok", _worker_loop(num_envs, seed, device, calls, warmup, start, shadow_size, no_shadow)))
    except BaseException as error:  # the parent waits for one message a worker
        results.put(("error", f"{type(error).__name__}: {error}"))


def _first_cause(errors: Sequence[str]) -> str:
    """The error that broke the start line, rather than the others' BrokenBarrierError."""
    return next((e for e in errors if not e.startswith("BrokenBarrierError")), errors[0])


def _collect(procs: Sequence[Any], results: Any, start: Any, timeout: float) -> Tuple[List[Any], List[str]]:
    """One message a worker process: (spans, errors). A process that died without one (a crash in the
    GL driver, the OOM killer) is an error, and breaks the start line for the others."""
    import queue

    spans: List[Any] = []
    errors: List[str] = []
    deadline = time.monotonic() + timeout
    while len(spans) + len(errors) < len(procs):
        try:
            status, value = results.get(timeout=5)
        except queue.Empty:
            crashed = [p.exitcode for p in procs if not p.is_alive() and p.exitcode != 0]
            if crashed:
                start.abort()  # the others would wait at the start line for it until START_TIMEOUT_S
            if time.monotonic() > deadline or not any(p.is_alive() for p in procs):
                dead = [p.exitcode for p in procs if not p.is_alive()]
                errors.append(f"no result from {len(procs) - len(spans) - len(errors)} worker process(es) "
                              f"(exit codes of the finished ones: {dead})")
                break
            continue
        (spans if status == "ok" else errors).append(value)
    return spans, errors


def parallel_variant(args: argparse.Namespace, workers: int, kind: str) -> Row:
    """``workers`` renderers in threads or processes, each drawing ``num_envs`` envs ``repeats`` times."""
    device = str(args.device)
    errors: List[str] = []
    if kind == "threads":
        start: Any = threading.Barrier(workers, timeout=START_TIMEOUT_S)
        out: List[Any] = [None] * workers

        def run(i: int) -> None:
            try:
                out[i] = _worker_loop(args.num_envs, args.seed + 100 * i, device, args.repeats, args.warmup, start,
                                      args.scene_shadow_size, args.scene_no_shadow)
            except BaseException as error:
                errors.append(f"{type(error).__name__}: {error}")

        # Daemons, joined with a limit: a renderer hung in the driver must not hold the run (or its exit).
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + START_TIMEOUT_S + 600
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = sum(t.is_alive() for t in threads)
        if hung:
            errors.append(f"{hung} thread(s) still rendering after {START_TIMEOUT_S + 600} s")
        spans = [s for s in out if s is not None]
    else:
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(workers, timeout=START_TIMEOUT_S)
        results = ctx.Queue()
        procs = [ctx.Process(target=_process_worker,
                             args=(args.num_envs, args.seed + 100 * i, device, args.repeats, args.warmup, start, results,
                                   args.scene_shadow_size, args.scene_no_shadow))
                 for i in range(workers)]
        for p in procs:
            p.start()
        spans, errors = _collect(procs, results, start, timeout=START_TIMEOUT_S + 600)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError(f"{len(errors)} of {workers} {kind} workers failed: {_first_cause(errors)}")
    wall = max(s[1] for s in spans) - min(s[0] for s in spans)
    frames = workers * args.num_envs * args.repeats
    return Row(f"{kind}_{workers}", workers, ",".join(sorted({s[2] for s in spans})), frames / wall)


def _parallel_rows(args: argparse.Namespace) -> Iterator[Row]:
    for kind, counts in (("threads", args.threads), ("processes", args.processes)):
        for count in counts:
            try:
                yield parallel_variant(args, count, kind)
            except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
                yield Row(f"{kind}_{count}", count, error=f"{type(exc).__name__}: {exc}")


QUICK = {"num_envs": 2, "repeats": 3, "warmup": 1, "shadow_sizes": [1024], "threads": [2], "processes": [2]}
"""What --quick sets, where the command line does not."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--num-envs", type=positive_int, default=8, help="envs per renderer call (default 8)")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed calls per variant (default 20)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--shadow-sizes", type=positive_int, nargs="*", default=[2048, 1024], help="shadowsize variants")
    p.add_argument("--threads", type=positive_int, nargs="*", default=[2, 4, 8], help="thread counts (default 2 4 8)")
    p.add_argument("--processes", type=positive_int, nargs="*", default=[2, 4, 8], help="process counts (default 2 4 8)")
    p.add_argument("--scene-shadow-size", type=positive_int, default=None, metavar="S",
                   help="every variant's scene starts with this shadow-map size (default: the env's, 4096)")
    p.add_argument("--scene-no-shadow", action="store_true",
                   help="every variant's scene starts without shadows (its shadowsize variants then change nothing: "
                   "pass --shadow-sizes with no sizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="2 envs, 3 calls, 2 threads and 2 processes, where those options are not given")
    p.add_argument("--json", type=Path, help="write the environment and rows here")
    if argv is None:
        argv = sys.argv[1:]
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:  # an option given beside --quick keeps its value
        given = p.parse_args(argv, argparse.Namespace(**{name: None for name in QUICK}))
        for name, value in QUICK.items():
            if getattr(given, name) is None:
                setattr(args, name, value)
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if skipped_without_rendering():
        return
    env = environment(args.device)
    scene = ", ".join(([f"shadow map {args.scene_shadow_size}"] if args.scene_shadow_size is not None else [])
                      + (["no shadows"] if args.scene_no_shadow else [])) or "the env's"
    log(f"# render breakdown on {env['device']} (GL: {env['gl_renderer']}), {args.num_envs} envs per call, "
        f"{SIZE} x {SIZE}, {args.repeats} calls; scene: {scene}")
    # The JSON is rewritten after every row: a run stopped part way keeps what it measured.
    files = RunFiles(None, args.json, (), {"environment": env, "config": config_of(args)})
    with files.interruptible():
        for rows in (single_variants(args), _parallel_rows(args)):
            for row in rows:
                unit = "scenes/s (updated, nothing drawn)" if row.variant == "update_scene_only" else "frames/s"
                log(f"{row.variant}: " + (f"{row.frames_per_s:.1f} {unit}" if row.error == "" else row.error))
                files.add([row])
    base = next((r.frames_per_s for r in files.rows if r.variant == "default"), None)
    print("| variant | workers | path | median ms | frames/s | vs default |\n|---|---|---|---|---|---|")
    for r in files.rows:
        drawn = r.variant != "update_scene_only"  # scenes updated, nothing drawn: no frame rate to set beside one
        ratio = f"{r.frames_per_s / base:.2f}x" if r.frames_per_s and base and drawn else ""
        print(f"| {r.variant} | {r.workers} | {r.path} | {fmt(r.median_ms)} | "
              f"{fmt(r.frames_per_s) + ('' if drawn else ' scenes')} | {ratio} |"
              + (f" {r.error}" if r.error else ""))
    files.finish()


if __name__ == "__main__":
    main()
