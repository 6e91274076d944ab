"""SAC (stable-baselines3) on VLM-RM rewards: what ``vlmrm-fast train`` runs (its parser and config
layering: :mod:`vlmrm_fast.train.command`).

Top to bottom: config -> frame check -> reward model -> vector env (rewards per step or deferred per
rollout) -> SAC (new, or loaded from a checkpoint) -> ``learn`` with :class:`TrainingCallback` ->
final checkpoint.

Python use::

    from vlmrm_fast.train import TrainConfig, from_preset, train
    result = train(from_preset("smoke"))
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union, overload

os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo rendering; before mujoco is imported
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import numpy as np  # noqa: E402

from vlmrm_fast.argtypes import broken_link_on_the_way, writable_folder  # noqa: E402
from vlmrm_fast.atomic import write_atomically  # noqa: E402
from vlmrm_fast.callers import stacklevel_outside_package  # noqa: E402
from vlmrm_fast.env_render import render_env  # noqa: E402
from vlmrm_fast.train import checkpoint as ckpt  # noqa: E402
from vlmrm_fast.train.config import (  # noqa: E402
    RESUMABLE_FIELDS,
    TrainConfig,
    diff_configs,
    file_digest,
    weights_file,
    with_absolute_weights_path,
)
from vlmrm_fast.train.progress_csv import csv_name, drop_rows_logged_past  # noqa: E402
from vlmrm_fast.train.run_lock import hold_run_folder, refuse_if_held, remove_unstarted_run  # noqa: E402

RGB_FIX = 'render_mode="rgb_array"'


@dataclass
class TrainResult:
    """What :func:`train` did.

    ``model`` keeps its (closed) env and through it the reward model, on its device (GB for ViT-bigG-14),
    so that a further ``learn()`` can run with per-step rewards (``reward_timing="step"``; with deferred
    ones it is refused, as nothing would score its rollouts: resume the run instead). After a deferred run
    stopped inside a rollout, that rollout's replay rows hold placeholder rewards until the resumed run
    scores it whole. In a sweep, drop the result (or its ``model``) before the next run unless you need it."""

    run_dir: Path
    num_timesteps: int
    checkpoint: Optional[Path]
    stopped_by: Optional[str]  # "SIGINT"/"SIGTERM" when a signal stopped the run, else None
    seconds: float  # this session's, set-up included
    model: object = None  # SB3's SAC; its logger writes nowhere (set_logger to log further learn() calls)
    steps_this_session: int = 0
    learn_seconds: float = 0.0  # this session's time in SB3's learn(): env steps, rewards, updates
    evaluated_only: bool = False  # no steps left, but the final evaluation (missed at a stop, or failed) made now


# --------------------------------------------------------------------------- environments


def _register_envs(env_id: str) -> None:
    if env_id.startswith("vlmrm_fast/"):
        import vlmrm_fast.envs  # noqa: F401  (registers the package's envs)


def make_env(config: TrainConfig, width: Optional[int], height: Optional[int], *, exact: Optional[bool] = None):
    """One gymnasium env rendering RGB frames of ``width`` x ``height``, episodes of ``episode_length``.

    An env that takes no width/height renders at its own size, unless ``exact`` (default: the config
    sets render_width or render_height) asks for this size: then it is an error naming the fix.
    """
    import gymnasium as gym

    _register_envs(config.env_id)
    if exact is None:
        exact = config.render_width is not None or config.render_height is not None
    kwargs = dict(config.env_kwargs)
    kwargs.setdefault("render_mode", "rgb_array")
    sized = dict(kwargs)
    if width is not None:
        sized.setdefault("width", width)
        sized.setdefault("height", height)
    try:
        return gym.make(config.env_id, max_episode_steps=config.episode_length, **sized)
    except gym.error.Error as exc:
        raise ValueError(f"cannot make env {config.env_id!r}: {exc}") from None
    except TypeError as exc:
        # Only the env refusing width/height itself: gymnasium's message also lists every kwarg (width and
        # height included), so a typo in env_kwargs must not read as "does not take width/height".
        if not re.search(r"unexpected keyword argument '(width|height)'", str(exc)):
            raise ValueError(f"cannot make env {config.env_id!r} with env_kwargs {dict(config.env_kwargs)}: {exc}; "
                             "check env_kwargs against the env's arguments") from None
        if exact:
            raise ValueError(
                f"env {config.env_id!r} does not take width/height ({exc}); leave render_width and render_height "
                "unset (none) to render at its own size, or register it with a width/height argument"
            ) from None
    # The model's input size was only a default: the frames are resized on the reward model's device.
    return gym.make(config.env_id, max_episode_steps=config.episode_length, **kwargs)


def _first_frame(env, config: TrainConfig):
    """``env.render()`` after a reset; a missing package or GL library is a ``ValueError`` naming the fix."""
    import gymnasium

    from vlmrm_fast.envs.humanoid import (
        RenderingUnavailable,
        defuse_half_made_viewer,
        looks_like_framebuffer_limit,
        looks_like_gl_error,
        rendering_help,
    )

    try:
        env.reset(seed=config.seed)
        return render_env(env)
    except (gymnasium.error.DependencyNotInstalled, RenderingUnavailable) as exc:
        # A missing package (pygame for classic-control frames) or no GL context here: a setup
        # problem whose message names the fix, not a crash.
        raise ValueError(f"env {config.env_id!r} cannot render: {exc}") from exc
    except Exception as exc:
        if looks_like_framebuffer_limit(exc):
            raise ValueError(f"env {config.env_id!r} cannot render frames of the size asked ({exc}): choose a smaller "
                             "render_width and render_height") from exc
        if not looks_like_gl_error(exc):
            raise
        defuse_half_made_viewer(exc)  # an env of gymnasium's or the user's own, which does not name the fix
        raise ValueError(f"env {config.env_id!r} cannot render: {rendering_help(exc)}") from exc


def check_env_frames(config: TrainConfig, width: Optional[int], height: Optional[int]) -> tuple[int, int]:
    """Make one env, check that SAC takes its actions, render a frame and check it is uint8 RGB [H, W, 3];
    return (H, W).

    Runs before the reward model is loaded, so a bad env fails in seconds with the fix named.
    """
    import gymnasium as gym

    env = make_env(config, width, height)
    try:
        if not isinstance(env.action_space, gym.spaces.Box):
            raise ValueError(
                f"env {config.env_id!r} has a {env.action_space} action space, and SAC takes continuous (Box) "
                "actions only: pick an env with continuous actions (MuJoCo's, the textured humanoid), or use the "
                "reward wrappers (vlmrm_fast.VLMRewardVecEnv) with an algorithm for discrete actions in your own loop"
            )
        modes = env.metadata.get("render_modes") or []
        if "rgb_array" in modes and "render_mode" in config.env_kwargs and env.render_mode != "rgb_array":
            raise ValueError(
                f"env_kwargs set render_mode={config.env_kwargs['render_mode']!r}, but VLM rewards score "
                f"rgb_array frames: leave render_mode out of env_kwargs (the env is made with {RGB_FIX})"
            )
        if "rgb_array" not in modes or env.render_mode != "rgb_array":
            raise ValueError(
                f"env {config.env_id!r} cannot render RGB frames (render modes {list(modes)}, render_mode "
                f"{env.render_mode!r}); VLM rewards score rendered frames, so the env must support "
                f'{RGB_FIX}: pick an env that does, or add an "rgb_array" render mode to it'
            )
        frame = _first_frame(env, config)
    finally:
        env.close()
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        what = "None" if frame is None else f"{type(frame).__name__} {getattr(frame, 'shape', '')} {getattr(frame, 'dtype', '')}"
        raise ValueError(
            f"env {config.env_id!r} rendered {what}, not a uint8 RGB frame [H, W, 3]; the VLM reward needs "
            f"{RGB_FIX} frames with 3 channels"
        )
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"env {config.env_id!r} rendered an empty frame {frame.shape}; set render_width/render_height >= 1")
    if width is not None and (frame.shape[0], frame.shape[1]) != (height, width):
        warnings.warn(
            f"env {config.env_id!r} renders {frame.shape[1]}x{frame.shape[0]}, not the {width}x{height} asked for"
        )
    return int(frame.shape[0]), int(frame.shape[1])


def model_input_size(model_name: str) -> Optional[tuple[int, int]]:
    """(H, W) the vision tower takes, from open_clip's config (without loading weights)."""
    try:
        import open_clip

        import vlmrm_fast.models  # noqa: F401  (registers vlmrm-tiny; `import vlmrm_fast` alone loads it lazily)

        cfg = open_clip.get_model_config(model_name)
    except Exception:  # noqa: BLE001 - unknown here: decided after loading
        return None
    size = (cfg or {}).get("vision_cfg", {}).get("image_size")
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def build_reward_model(config: TrainConfig):
    """The CLIPReward of ``config``; random weights (pretrained none) are drawn from ``seed``, so a resumed
    run gets the same model. Built under the run's ``seed``, with the global RNG restored after, so that
    whatever else draws from it while building is the same on resuming."""
    import torch

    from vlmrm_fast import CLIPReward
    from vlmrm_fast.models import random_weights_seed

    with torch.random.fork_rng(devices=[]), random_weights_seed(config.seed):
        torch.manual_seed(config.seed)
        return CLIPReward.from_pretrained(
            config.model, config.pretrained, goal=list(config.goal), baseline=list(config.baseline) or None,
            alpha=config.alpha, device=config.reward_device,
            dtype=None if config.reward_dtype == "auto" else config.reward_dtype, preprocess=config.preprocess,
            backend=config.reward_backend, max_batch_size=config.reward_batch_size,
        )


def build_vec_env(config: TrainConfig, reward_model, width, height):
    """DummyVecEnv -> VecMonitor (env-reward episode stats) -> VLM reward wrapper (per step or deferred)."""
    from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

    from vlmrm_fast.train.deferred import DeferredRewardRecorder, TimedVLMRewardVecEnv

    weight = config.reward_weight
    if config.reward_mode != "add" and weight != 1.0:
        # Named here in the config's terms: the wrapper's own warning says weight= and mode=.
        warnings.warn(f"reward_weight {weight:g} is unused with reward_mode {config.reward_mode}: it scales the VLM "
                      "reward in reward_mode add only; set reward_mode add (--reward-mode add) to add the weighted VLM "
                      "reward to the env's, or leave reward_weight out", UserWarning,
                      stacklevel=stacklevel_outside_package())
        weight = 1.0
    venv = VecMonitor(DummyVecEnv([lambda: make_env(config, width, height)] * config.n_envs))
    if config.reward_timing == "deferred":
        return DeferredRewardRecorder(venv, reward_model, capacity=config.train_freq, mode=config.reward_mode,
                                      weight=weight)
    return TimedVLMRewardVecEnv(venv, reward_model, mode=config.reward_mode, weight=weight)


def make_logger(run_dir: Path, tensorboard: bool, start_step: int):
    """SB3 logger: TensorBoard events in RUN_DIR/tb and a CSV (a new file per resumed session)."""
    from stable_baselines3.common.logger import (
        CSVOutputFormat,
        KVWriter,
        Logger,
        TensorBoardOutputFormat,
    )

    folder = run_dir / "tb"
    folder.mkdir(parents=True, exist_ok=True)
    superseded = drop_rows_logged_past(folder, start_step)
    if superseded and start_step == 0:
        kept = ", ".join(str(path.relative_to(run_dir)) for path in superseded)
        warnings.warn(f"'{run_dir}' holds an earlier run's logs but no checkpoint to resume (that run stopped "
                      f"before its first one, say): this run starts over there, its rows replacing that run's (kept as "
                      f"{kept}; TensorBoard hides that run's events).", stacklevel=stacklevel_outside_package())
    formats: list[KVWriter] = [CSVOutputFormat(str(folder / csv_name(start_step)))]
    if tensorboard:
        before = set(folder.iterdir())
        board = TensorBoardOutputFormat(str(folder))
        if start_step or any(path.name.startswith("events.out.tfevents.") for path in before):
            # A session that died after its last checkpoint (a crash, SIGKILL) logged steps this one logs
            # again, and one that died before its first checkpoint logged steps a fresh run here logs
            # again; TensorBoard hides them behind a purge mark. Not a checkpoint's own step: it was
            # logged before the checkpoint was written, and is not logged again.
            from torch.utils.tensorboard import SummaryWriter

            board.writer.close()
            for empty in set(folder.iterdir()) - before:
                empty.unlink()  # the closed writer's file, which holds no events
            board.writer = SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if start_step else 0)
        formats.append(board)
    return Logger(str(folder), formats)


# --------------------------------------------------------------------------- training


def train(config: TrainConfig, *, resume: Union[str, os.PathLike, None] = None, reward_model: Any = None) -> TrainResult:
    """Train SAC on VLM rewards as ``config`` says; continue the run in ``resume`` if given.

    ``reward_model``: an already built reward model (default: built from the config): a
    :class:`~vlmrm_fast.CLIPReward` or any callable ``rm(frames) -> rewards`` the wrappers take
    (uint8 [N, H, W, 3] in, one finite reward per frame out, as a tensor or an array).
    Returns when ``total_timesteps`` are reached, or after SIGINT/SIGTERM (checkpoint written).
    Raises :class:`~vlmrm_fast.train.run_lock.RunFolderBusy` (a ``ValueError``) when another
    process trains in the run folder.
    """
    config.validate()
    _check_sac_device(config.sac_device)
    config = with_absolute_weights_path(config)
    if resume is not None and _missing_weights_file(config.pretrained):
        raise FileNotFoundError(
            f"the run's weights file {config.pretrained!r} is not found from here: {_MISSING_WEIGHTS_FIX}")
    start = time.perf_counter()
    # A resumed run lives on in its own folder, whatever config.run_dir says.
    run_dir = Path(resume) if resume is not None else Path(config.run_dir or default_run_dir())
    config = dataclasses.replace(config, run_dir=str(run_dir))
    new_folder = resume is None and not run_dir.exists()
    if resume is not None:
        _check_resume_folder(run_dir)  # before the lock, which would make it
    else:
        writable_folder(run_dir, "--run-dir")  # a file there, or a folder that cannot be written: named
    with hold_run_folder(run_dir):  # a second process here would clear and prune this one's checkpoints
        try:
            return _train_in(run_dir, config, resume, reward_model, start)
        except BaseException:
            if new_folder:  # a set-up that failed before any log or checkpoint: the folder goes too
                with contextlib.suppress(OSError):  # the error to report is the set-up's
                    remove_unstarted_run(run_dir, keep=["config.json", WEIGHTS_RECORD])
            raise


def _train_in(run_dir: Path, config: TrainConfig, resume, reward_model, start: float) -> TrainResult:
    """:func:`train`'s work, in ``run_dir``, which this process holds."""
    from vlmrm_fast.train.callbacks import remove_partial_videos

    ckpt.clean_stale(run_dir)  # first: it puts back a checkpoint a crash left mid-overwrite
    remove_partial_videos(run_dir)
    resume_from = _resume_checkpoint(run_dir, resume)
    if resume_from is not None:
        _check_resume_config(resume_from, config)
        for path in ckpt.set_aside_newer(run_dir, resume_from):
            warnings.warn(f"resuming from '{resume_from.name}'; the newer checkpoint passed over is kept as '{path}'")
    config_json = config.to_json()
    write_atomically(run_dir / "config.json", config_json.encode())
    _record_weights(run_dir, config)

    # 1. frames: check the env renders RGB before loading a large model.
    size = (config.render_height, config.render_width)
    if None in size:
        size = model_input_size(config.model) or (None, None)
        size = (config.render_height or size[0], config.render_width or size[1])
        if None in size and size != (None, None):  # one side given, the model's size unknown: square frames
            size = (size[0] or size[1], size[1] or size[0])
    height, width = check_env_frames(config, size[1], size[0])

    # 2. the reward model, and a check that it takes these frames.
    rm = reward_model if reward_model is not None else build_reward_model(config)
    _check_model_takes_frames(rm, config, height, width)

    # 3. vector env with VLM rewards.
    env = build_vec_env(config, rm, width, height)
    recorder = env if config.reward_timing == "deferred" else None

    try:  # a set-up that fails from here closes the envs (subprocess workers, renderers) it opened
        model, extra, callback = _set_up_learning(run_dir, config, config_json, rm, env, recorder, resume_from,
                                                  (height, width))
    except BaseException:
        env.close()
        raise

    # 6. learn.
    remaining = config.total_timesteps - model.num_timesteps
    # A signal on the last step, or during its gradient steps, stops the run before its final
    # evaluation: resumed with no steps left, at a rollout's end with its gradient steps done, it
    # evaluates. (Not a stop inside a rollout that total_timesteps was lowered to: extending that run
    # must finish the rollout, as its checkpoint says.)
    final_eval_missing = bool(remaining == 0 and config.eval_every and extra is not None
                              and not extra.get("rollout_steps_done") and not extra.get("train_pending")
                              and (int(extra.get("last_eval_step", model.num_timesteps)) < model.num_timesteps
                                   or bool(extra.get("last_eval_failed"))))
    first_step, learn_seconds, evaluated_only = model.num_timesteps, 0.0, False
    try:
        if remaining > 0:
            learn_start = time.perf_counter()
            model.learn(total_timesteps=remaining, callback=callback, reset_num_timesteps=resume_from is None,
                        log_interval=None)
            learn_seconds = time.perf_counter() - learn_start
        elif final_eval_missing:  # learn() would reset the envs for nothing: the callback's own set-up
            callback.init_callback(model)
            callback.on_training_start(locals(), globals())
            callback.on_training_end()
        # The final evaluation comes before the final checkpoint, so that the checkpoint records it
        # and a run extended from there does not evaluate (and log) this step again; the checkpoint
        # is written whatever the evaluation does (an error, a second Ctrl-C).
        try:
            if callback.stop_signal is None and (remaining > 0 or final_eval_missing) and config.eval_every:
                callback.evaluate()
        finally:
            evaluated_only = (final_eval_missing and callback.last_eval_step == model.num_timesteps
                              and not callback.last_eval_failed)
            if evaluated_only:
                # The checkpoint as it was, the evaluation recorded: a session that took no step knows
                # nothing of the run's rollouts (a cut last one, say) that the checkpoint does not.
                callback.last_checkpoint = ckpt.save_checkpoint(
                    run_dir, model, config_json, dict(extra, last_eval_step=model.num_timesteps, last_eval_failed=False),
                    keep=config.keep_checkpoints)
            # Also after a signal that came too late for the callback's own checkpoint (during the last
            # gradient steps, or the evaluation): the work since the last checkpoint is saved either way.
            behind = (callback.last_checkpoint is None
                      or callback.last_checkpoint.name != ckpt.step_name(model.num_timesteps))
            if remaining > 0 and behind:
                callback.save()
        stopped = signal.Signals(callback.stop_signal).name if callback.stop_signal is not None else None
    finally:
        callback.restore_signal_handlers()  # also when learn() raised: Ctrl-C must work again
        try:
            env.close()
        finally:
            _close_logger(model)
    return TrainResult(run_dir, int(model.num_timesteps), callback.last_checkpoint or resume_from, stopped,
                       time.perf_counter() - start, model, int(model.num_timesteps - first_step), learn_seconds,
                       evaluated_only)


def _set_up_learning(run_dir: Path, config: TrainConfig, config_json: str, rm, env, recorder, resume_from,
                     render_size: tuple):
    """Steps 4 and 5 of :func:`_train_in` before learning: the SAC model (new, or loaded from
    ``resume_from``) with the run's logger, and the training callback. Returns (model, the checkpoint's
    extra state or None, callback); the logger is closed again if a later step raises."""
    from stable_baselines3 import SAC

    from vlmrm_fast.train.callbacks import TrainingCallback

    # 4. SAC: new, or exactly where the checkpoint left it.
    extra = None
    if resume_from is None:
        model = SAC(
            "MlpPolicy", env, learning_rate=config.learning_rate, buffer_size=config.buffer_size,
            learning_starts=config.learning_starts, batch_size=config.batch_size, tau=config.tau,
            gamma=config.gamma, train_freq=(config.train_freq, "step"), gradient_steps=config.gradient_steps,
            ent_coef=config.ent_coef if config.ent_coef.startswith("auto") else float(config.ent_coef),
            optimize_memory_usage=False,  # deferred rewards index the buffer by transition
            policy_kwargs=dict(net_arch=list(config.net_arch)), seed=config.seed, device=config.sac_device,
            verbose=0,
        )
    else:
        model, extra = _load_checkpoint(resume_from, env, config)
        _warn_if_reward_setup_changed(extra.get("reward_setup"), rm, model.num_timesteps)
        _warn_if_extending_a_cut_rollout(extra, model.num_timesteps, config)
    _warn_if_total_overshoots(config, model.num_timesteps)
    _warn_if_no_gradient_step(config, model.num_timesteps)
    model.set_logger(make_logger(run_dir, config.tensorboard, model.num_timesteps))
    try:
        if extra is not None and extra.get("train_pending"):
            _train_after_rollout(model)
        # 5. the callback that logs, checkpoints and evaluates as the model learns.
        callback = TrainingCallback(config, rm, run_dir, config_json, recorder=recorder, timed_env=env,
                                    resume_extra=extra, render_size=render_size)
    except BaseException:
        _close_logger(model)
        raise
    return model, extra, callback


def _close_logger(model) -> None:
    """Close the run's CSV and TensorBoard files (a sweep of ``train()`` calls in one process would
    otherwise hold a file and a writer thread per run); the model keeps a logger that writes nowhere.
    A CSV this session wrote no row to (a resume with nothing left to train) is removed."""
    from stable_baselines3.common.logger import CSVOutputFormat, Logger

    csvs = [Path(out.file.name) for out in model.logger.output_formats if isinstance(out, CSVOutputFormat)]
    model.logger.close()
    model.set_logger(Logger(folder=None, output_formats=[]))
    for path in csvs:
        if path.exists() and path.stat().st_size == 0:
            path.unlink()


def _check_sac_device(device: str) -> None:
    """SB3 trains on the CPU, silently, when given a CUDA device that is not there: say so instead."""
    import torch

    from vlmrm_fast.backends.base import missing_cuda_device, parse_device

    if device == "auto":
        return
    parsed = parse_device(device)
    if parsed is None:
        raise ValueError(f"sac_device={device!r} is not a torch device: pass auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"sac_device={device!r} but CUDA is not available here; pass --sac-device cpu (or auto)")
    why = missing_cuda_device(parsed)
    if why:
        raise ValueError(f"sac_device={device!r}: {why}; pass one of those, or --sac-device cuda (or auto)")
    if parsed.type not in ("cpu", "cuda"):  # SB3 takes any torch device (mps on a Mac): this torch must have it
        try:
            torch.zeros(1, device=parsed).add(1).item()  # meta's tensors, which hold no values, fail here
        except (RuntimeError, AssertionError, NotImplementedError) as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"sac_device={device!r} is not available here ({first_line[:200]}); pass "
                             "--sac-device cpu, cuda or auto") from None


def default_run_dir(name: str = "run") -> Path:
    # The pid too: runs of a sweep started in the same second would otherwise share a folder (and all
    # but one be refused by its lock).
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _check_resume_folder(run_dir: Path) -> None:
    if not run_dir.is_dir():
        link = broken_link_on_the_way(run_dir)  # runs -> /scratch/runs, /scratch not mounted on this node
        if link is not None:
            why, fix = link
            raise FileNotFoundError(f"no run folder '{run_dir}' to resume ({why}); {fix}")
        raise FileNotFoundError(f"no run folder '{run_dir}' to resume; check the path, or start a new run without --resume")
    folder = run_dir.resolve()  # "--resume ." inside a checkpoint has a parent too
    in_checkpoints = folder.parent.name == "checkpoints"
    if (in_checkpoints and re.fullmatch(re.escape(ckpt.PREFIX) + r"\d+", folder.name)) or (run_dir / "meta.json").is_file():
        # Refused before a lock file lands in it.
        where = (f"resume its run folder, --resume {shlex.quote(str(folder.parent.parent))}" if in_checkpoints
                 else "resume the run folder that holds it in checkpoints/")
        raise FileNotFoundError(f"'{run_dir}' is a checkpoint folder: {where}")
    if not ckpt.checkpoint_root(run_dir).is_dir():  # not a run folder: refused before a lock file lands in it
        refuse_if_held(run_dir)  # a run started there has not written its first checkpoint yet
        run = next((parent for parent in list(folder.parents)[:2]  # RUN/tb, RUN/videos/x, RUN/checkpoints
                    if ckpt.checkpoint_root(parent).is_dir() and (parent / "config.json").is_file()), None)
        fix = (f"it is inside the run folder '{run}': --resume {shlex.quote(str(run))}" if run is not None
               else "check the path, or start a new run without --resume")
        raise FileNotFoundError(f"no checkpoints folder in '{run_dir}' ({ckpt.checkpoint_root(run_dir)} is missing); {fix}")


@overload
def _resume_checkpoint(run_dir: Path, resume: os.PathLike) -> Path: ...
@overload
def _resume_checkpoint(run_dir: Path, resume: Optional[os.PathLike]) -> Optional[Path]: ...
def _resume_checkpoint(run_dir: Path, resume: Optional[os.PathLike]) -> Optional[Path]:
    """The checkpoint to continue from (``resume``), checking a new run does not overwrite one."""
    if resume is None:
        if ckpt.find_latest(run_dir) is not None:
            raise ValueError(
                f"run folder '{run_dir}' already holds checkpoints; continue it with --resume {shlex.quote(str(run_dir))}, "
                "or choose another --run-dir"
            )
        incomplete = ckpt.checkpoint_folders(run_dir)  # none complete: a new run's first saves would replace them
        if incomplete:
            raise ValueError(
                f"run folder '{run_dir}' holds checkpoints that are incomplete ({_names(incomplete)}: "
                "files cut short or missing): restore it from a copy and resume it, or choose another --run-dir"
            )
        return None
    found = ckpt.find_latest(resume, verify=True)
    if found is None:
        root = Path(resume) / "checkpoints"
        if ckpt.find_latest(resume) is not None:
            raise ValueError(
                f"every checkpoint in '{root}' is damaged (its files no longer match the checksums written with "
                "them; see the warnings above): restore the run folder from a copy, or start a new run in another "
                "--run-dir"
            )
        folders = ckpt.checkpoint_folders(resume)
        if folders:
            raise ValueError(
                f"every checkpoint in '{root}' is incomplete ({_names(folders)}: files cut short or missing, such as "
                "a copy of the run folder cut short): restore the run folder from a copy, or start a new run in "
                "another --run-dir"
            )
        raise FileNotFoundError(
            f"no complete checkpoint in '{root}'; check the path, or start a new run without --resume"
        )
    return found


def _names(folders: Sequence[Path]) -> str:
    shown = [f.name for f in folders[-3:]]
    return ", ".join(shown) + (f" and {len(folders) - 3} older" if len(folders) > 3 else "")


_MISSING_WEIGHTS_FIX = ("give its new path with --pretrained (accepted where its bytes are the run's: their SHA-256 is "
                       "in RUN_DIR/weights.json), or put the file (or a link to it) back at that path; a relative "
                       "path (runs started before vlmrm-fast saved it absolute) is read from the working folder, so "
                       "resuming from the folder the run started in finds it too")

_SIDECAR = "open_clip_config.json"  # vlmrm_fast.models.SIDECAR_CONFIG, named here without importing open_clip

WEIGHTS_RECORD = "weights.json"
"""In the run folder: the size and SHA-256 of the run's local weights file, written when the run starts (or, for a
run from before it, at its first resume), so that a resume may name another path to the same bytes."""


def _weights_record(run_dir: Path) -> Optional[dict]:
    try:
        record = json.loads((run_dir / WEIGHTS_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"size", "sha256"} <= set(record) else None


def _record_weights(run_dir: Path, config: TrainConfig) -> None:
    """Write :data:`WEIGHTS_RECORD` for a run on a local weights file, where it is missing (one read of the file), with
    the SHA-256 of the open_clip_config.json beside it (None where there is none), which sets the model's activation
    and normalisation."""
    path = _run_weights(config)
    if path is not None and _weights_record(run_dir) is None:
        size, sha256 = file_digest(path)
        record = {"size": size, "sha256": sha256, "open_clip_config": _sidecar_digest(path)}
        write_atomically(run_dir / WEIGHTS_RECORD, json.dumps(record).encode())


def _run_weights(config: TrainConfig) -> Optional[Path]:
    """The local weights file the run's reward model reads: ``pretrained``'s, or the one open_clip picks in a
    ``local-dir:`` model's folder (beside the open_clip_config.json that sets the whole model there); None for a tag,
    random weights or an ``hf-hub:`` model."""
    path = weights_file(config.model, config.pretrained)
    if path is None and config.pretrained is None:
        from vlmrm_fast.models import local_dir_weights

        path = local_dir_weights(config.model)
    return path


def _sidecar_digest(weights: Union[str, os.PathLike]) -> Optional[str]:
    """SHA-256 of the open_clip_config.json beside a weights file (its activation and normalisation), or None."""
    sidecar = Path(os.path.expanduser(weights)).with_name(_SIDECAR)
    return file_digest(sidecar)[1] if sidecar.is_file() else None


def _matches_record(record: dict, path: Union[str, os.PathLike]) -> bool:
    """Whether the weights file ``path`` (and the open_clip_config.json beside it, where the record has one) is the
    one :data:`WEIGHTS_RECORD` describes."""
    return (os.path.getsize(path) == record["size"] and file_digest(path)[1] == record["sha256"]
            and ("open_clip_config" not in record or _sidecar_digest(path) == record["open_clip_config"]))


def _same_weights(run_dir: Path, saved: Optional[str], given: Optional[str]) -> bool:
    """Whether the weights file ``given`` on resume holds the run's weights (``saved``, its path in the checkpoint):
    its bytes against the run's record, or, for a run without one, against the saved file, which must be there."""
    if not saved or not given or not os.path.isfile(os.path.expanduser(given)):
        return False
    given = os.path.expanduser(given)
    record = _weights_record(run_dir)
    if record is not None:
        return _matches_record(record, given)
    saved = os.path.expanduser(saved)
    return os.path.isfile(saved) and (os.path.samefile(saved, given) or file_digest(saved) == file_digest(given))


def _missing_weights_file(pretrained: Optional[str]) -> bool:
    """Whether ``pretrained`` names a checkpoint file (by its form, as CLIPReward tells one) that is not there."""
    from vlmrm_fast.models import names_a_file

    return pretrained is not None and names_a_file(pretrained) and not os.path.isfile(os.path.expanduser(pretrained))


def _check_resume_config(found: Path, config: TrainConfig) -> None:
    """A checkpoint continues only under its own config (bar the fields that may change on resume; the
    weights file by its bytes, not its path)."""
    saved = TrainConfig.from_dict(json.loads((found / "config.json").read_text()), f"checkpoint '{found}'")
    run_dir = found.parent.parent
    diffs = diff_configs(saved, config, same_weights=lambda a, b: _same_weights(run_dir, a, b))
    weights, record = _run_weights(config), _weights_record(run_dir)
    if (saved.pretrained == config.pretrained and saved.model == config.model and weights is not None
            and record is not None and not _matches_record(record, weights)):
        # The same path, other bytes (a fine-tune saved over it since): the rewards would change mid-run.
        raise ValueError(
            f"checkpoint '{found}': the run's weights file {str(weights)!r} has changed since the run started "
            f"(its size and SHA-256, or the {_SIDECAR} beside it, differ from those in {run_dir / WEIGHTS_RECORD}), so "
            "the reward model would not be "
            "the run's: put the run's weights back at that path, or give their path with --pretrained; or start a new "
            "run in another folder (--run-dir) with these."
        )
    if diffs:
        lines = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} given" for k, a, b in diffs)
        if any(k == "pretrained" for k, _, _ in diffs):
            lines += (f" (not the run's weights: their bytes, or the {_SIDECAR} beside them, differ)"
                      if _weights_record(run_dir) is not None else
                      f" (the checkpoint's weights file is not found from here: {_MISSING_WEIGHTS_FIX})"
                      if _missing_weights_file(saved.pretrained) else "")
        raise ValueError(
            f"checkpoint '{found}' comes from another config ({lines}). Resume with the run's own config "
            f"(vlmrm-fast train --resume {shlex.quote(str(found.parent.parent))}, without --preset/--config or those overrides), or "
            f"start a new run in another folder (--run-dir). Only these may change on resume: "
            f"{', '.join(sorted(RESUMABLE_FIELDS - {'run_dir'}))} (run_dir: the run stays in its folder)"
        )


def _train_after_rollout(model) -> None:
    """The gradient steps SB3 runs after each rollout (``OffPolicyAlgorithm.learn``), for a run that a
    signal stopped on a rollout's last step, before them; the RNG state is the one they started from."""
    if model.num_timesteps > 0 and model.num_timesteps > model.learning_starts and model.gradient_steps > 0:
        model.train(batch_size=model.batch_size, gradient_steps=model.gradient_steps)


def _warn_if_reward_setup_changed(saved: Optional[dict], rm, step: int) -> None:
    """reward_device and reward_backend may change on resume (another machine), and with them the
    tower's precision (dtype "auto": float32 on CPU, bfloat16 on CUDA): say so, as the rewards change."""
    from vlmrm_fast.train.callbacks import reward_setup

    now = reward_setup(rm)
    if saved and saved != now:
        show = lambda d: f"{d['device']} {d['dtype']} ({d['backend']} backend)"  # noqa: E731
        warnings.warn(
            f"the reward model now runs on {show(now)}, before this resume on {show(saved)}: rewards from step "
            f"{step} on are computed differently and can differ slightly from those already in the replay buffer. "
            "To keep them the same, resume with the run's reward_device and reward_backend on a machine like its own.",
            stacklevel=stacklevel_outside_package(),
        )


def _check_model_takes_frames(rm, config: TrainConfig, height: int, width: int) -> None:
    import torch

    frame = np.zeros((1, height, width, 3), dtype=np.uint8)
    try:
        out = rm(frame)
    except torch.cuda.OutOfMemoryError:
        raise  # a RuntimeError too, but no frame size fixes it; the command line names the fixes that do
    except (ValueError, TypeError, RuntimeError) as exc:
        size = getattr(rm, "image_size", None)  # CLIPReward's (height, width); a reward function's own, if any
        if isinstance(size, (tuple, list)) and tuple(size) == (height, width):
            raise  # frames of its own input size: the size is not the cause, and the error names its own fix
        raise ValueError(
            f"the reward model {config.model!r} cannot take {width}x{height} frames ({exc}); where the size is the "
            f"cause, set render_width/render_height to its input size {'' if size is None else size} or leave them "
            "unset"
        ) from None
    shape = tuple(np.shape(out))  # a tensor's own .shape; a list's or array's through numpy
    if shape not in ((1,), (1, 1)):
        raise ValueError(f"the reward model must return one reward per frame; got shape {shape} for 1 frame")


def _load_checkpoint(path: Path, env, config: TrainConfig):
    """SAC, replay buffer, RNG and env state from checkpoint ``path``."""
    from stable_baselines3 import SAC

    meta = ckpt.read_meta(path)
    env.reset()  # initialise the envs; their state is overwritten below
    model = SAC.load(path / "model.zip", env=env, device=config.sac_device, force_reset=False)
    # The env as SB3 holds it, which the checkpoint saved (SB3 puts a VecTransposeImage over an env of image
    # observations): restored from ``env`` instead, each wrapper's state would go to the layer below it.
    venv: Any = model.get_env()  # ``env``, in the wrappers SB3 put around it
    # SAC.load seeds the envs' next reset with the run's seed (VecEnv.seed): a reset of this session (envs whose
    # state is not restored, below) would draw the run's first initial states again, and restart the envs' RNG
    # streams that the checkpoint restores.
    venv.unwrapped._reset_seeds()
    model.load_replay_buffer(path / "replay_buffer.pkl")
    state = ckpt.load_state(path)
    if not ckpt.set_env_state(venv, state["env"]):
        warnings.warn("could not restore every env's simulator state; episodes in progress restart")
        model._last_obs = venv.reset()
        # Their return sums restart with them, or the next logged returns would mix in the old episodes
        # (the callback restarts them once a stop's recorded steps, which belong to those, are scored).
        state["extra"] = dict(state["extra"], episodes_restarted=True)
    ckpt.set_rng_state(model, state["rng"])
    if model.num_timesteps != meta["step"]:
        raise ValueError(f"checkpoint '{path}' is inconsistent (model at step {model.num_timesteps}, meta {meta['step']})")
    return model, state["extra"]


def _warn_if_extending_a_cut_rollout(extra: dict, step: int, config: TrainConfig) -> None:
    """A run whose total_timesteps fell inside a rollout ended with a shortened rollout and its gradient
    steps; extended, its rollouts start from there, so it is not the run one longer total would give."""
    rollout = config.n_envs * config.train_freq
    if extra.get("cut_rollout") and config.total_timesteps > step:  # not a stop's or a periodic checkpoint
        warnings.warn(
            f"this run ended at step {step}, inside a rollout of {rollout} steps (n_envs x train_freq): its last "
            f"rollout was cut short and trained on, so the extended run's rollouts and gradient steps fall "
            f"{step % rollout} steps off those of one run to {config.total_timesteps}. For runs you mean to extend, "
            "use a total_timesteps that is a multiple of the rollout.", stacklevel=stacklevel_outside_package())


def _warn_if_total_overshoots(config: TrainConfig, step: int) -> None:
    """The envs step together: a total_timesteps between multiples of n_envs is passed, not met."""
    n, total = config.n_envs, config.total_timesteps
    if step < total and total % n:
        end = -(-total // n) * n
        lower = f" (or {end - n})" if end - n > step else ""
        warnings.warn(
            f"total_timesteps={total} is not a multiple of n_envs={n}: the {n} envs step together, so the run ends "
            f"at step {end}. Pass total_timesteps={end}{lower} to make it exact.", stacklevel=stacklevel_outside_package())


def _warn_if_no_gradient_step(config: TrainConfig, step: int) -> None:
    """SAC learns only after learning_starts steps: a run that ends by then saves an agent it never trained."""
    if step < config.total_timesteps and (config.learning_starts >= config.total_timesteps or config.gradient_steps == 0):
        why = ("gradient_steps=0" if config.gradient_steps == 0 else
               f"learning_starts={config.learning_starts} is not below total_timesteps={config.total_timesteps}")
        warnings.warn(f"{why}: SAC takes no gradient step in this run, and the agent it saves is untrained (the random "
                      "actions of its first steps). Lower learning_starts (or raise total_timesteps) to train.",
                      stacklevel=stacklevel_outside_package())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vlmrm_fast.train.run ARGS``: ``vlmrm-fast train ARGS``, through the same entry point."""
    from vlmrm_fast.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
