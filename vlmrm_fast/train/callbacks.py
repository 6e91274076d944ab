"""The training callback: deferred rewards, logging, checkpoints, signals, evaluation videos, progress.

SB3's off-policy loop calls, per rollout (``train_freq`` vector steps)::

    on_rollout_start -> (env.step -> on_step -> store transition) x train_freq -> on_rollout_end -> train()

so :class:`TrainingCallback` does:

- ``on_rollout_start``: the state is consistent here (the last ``train()`` is done, every transition
  stored and rewarded): periodic checkpoints and evaluation videos; the time since the previous
  ``on_rollout_end`` is the SAC update time.
- ``on_step``: notes the replay slot of the transition about to be stored (deferred rewards),
  collects episode returns (step rewards), advances the progress bar; after SIGINT/SIGTERM it stores
  the step itself, scores the partial rollout, writes a checkpoint and stops training. A resumed run
  finishes that rollout (or, stopped on its last step, first runs the gradient steps that were due),
  so it continues exactly as an uninterrupted one.
- ``on_rollout_end``: deferred rewards: scores the rollout's frames in one batch and writes them into
  the replay buffer, before ``train()`` samples it; then logs to TensorBoard.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch
from numpy.typing import ArrayLike
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit

from vlmrm_fast.atomic import replaced_when_written
from vlmrm_fast.env_render import release_env_gl, render_env
from vlmrm_fast.train import checkpoint as ckpt
from vlmrm_fast.train.config import TrainConfig
from vlmrm_fast.train.deferred import DeferredRewardRecorder, score_and_write_back
from vlmrm_fast.train.progress_bar import ProgressLines, progress_display
from vlmrm_fast.wrappers.scoring import _rewards_of

if TYPE_CHECKING:
    from tqdm import tqdm
    from stable_baselines3.common.buffers import ReplayBuffer
    from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

    class _SetUpOffPolicyAlgorithm(OffPolicyAlgorithm):
        """An off-policy algorithm (SAC) once ``_setup_model`` has run, as the callback sees it."""

        train_freq: TrainFreq  # type: ignore[assignment]  # SB3 types it as the argument; _setup_model makes it this
        replay_buffer: ReplayBuffer


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT/SIGTERM during training: stop without a checkpoint. ``signum`` says which, so that
    ``vlmrm-fast train`` exits with the shell's code for it (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} again: stopped at once, without a checkpoint")
        self.signum = signum

    def __reduce__(self):  # copied or pickled from its signal, not from its message
        return type(self), (self.signum,)


def _due(step: int, last: int, every: int) -> bool:
    """Whether a rollout boundary at ``step`` is the first one past a multiple of ``every`` since ``last``:
    the schedule stays on the multiples (100 evaluations in 10M steps for every 100k, with rollouts of
    3,200), rather than drifting by a rollout's remainder each time (``step - last >= every``: 97).
    Evaluations, checkpoints and TensorBoard rows all keep to it, so a resumed run's fall where the
    uninterrupted run's do."""
    return every > 0 and step // every > last // every


class TrainingCallback(BaseCallback):
    """Everything around SB3's SAC loop for a VLM-RM run (see the module docstring).

    Args:
        config: the run's config.
        reward_model: the CLIPReward (deferred scoring and evaluation).
        run_dir: the run folder (checkpoints, videos).
        config_json: the config text stored in checkpoints.
        recorder: the :class:`DeferredRewardRecorder` for deferred rewards, else None (per-step).
        timed_env: the env wrapper with ``env_s``/``render_s``/``reward_s`` counters.
        resume_extra: the ``extra`` dict of the checkpoint resumed from, if any.
        render_size: ``(height, width)`` of the training frames, at which evaluations are scored too
            (default: the video size).
    """

    model: _SetUpOffPolicyAlgorithm

    def __init__(self, config: TrainConfig, reward_model, run_dir: Path, config_json: str,
                 recorder: Optional[DeferredRewardRecorder] = None, timed_env=None,
                 resume_extra: Optional[dict] = None, render_size: Optional[tuple] = None) -> None:
        super().__init__(verbose=0)
        self.render_size = render_size
        self.config = config
        self.reward_model = reward_model
        self.run_dir = Path(run_dir)
        self.config_json = config_json
        self.recorder = recorder
        self.timed_env = timed_env if timed_env is not None else recorder
        self.resume_extra = resume_extra or {}
        self.stop_signal: Optional[int] = None
        self.last_checkpoint: Optional[Path] = None
        self._slots: list = []
        self._rollout_steps = 0
        self._rollout_offset = int(self.resume_extra.get("rollout_steps_done", 0))
        self._restored_slots: list = []  # the replay slots of the resumed rollout's steps already recorded
        self._restart_points: set = set()  # recorded steps at which the episode sums restart (see _on_training_start)
        self._cut_rollout = False  # the run's last rollout shortened to end at total_timesteps
        self._train_freq_original: Optional[TrainFreq] = None
        self._previous_handlers: dict = {}
        self._bar: Optional[Union[tqdm, ProgressLines]] = None
        self._update_t0: Optional[float] = None
        # Seconds per stage since the last log. eval_s and checkpoint_s are outside training proper
        # (time/train_steps_per_s leaves them out); save() and evaluate() may run after learn() too.
        self._stage = {"render_s": 0.0, "reward_s": 0.0, "env_s": 0.0, "sac_update_s": 0.0, "eval_s": 0.0,
                       "checkpoint_s": 0.0}

    # ------------------------------------------------------------------ lifecycle

    def _on_training_start(self) -> None:
        n = self.model.num_timesteps
        extra = self.resume_extra
        self._last_ckpt_step = int(extra.get("last_checkpoint_step", n))
        self._last_eval_step = int(extra.get("last_eval_step", n))
        self._last_eval_failed = bool(extra.get("last_eval_failed", False))
        n_envs = self.training_env.num_envs
        self._ep_vlm = np.asarray(extra.get("ep_vlm", np.zeros(n_envs)), dtype=np.float64).copy()
        self._ep_gt = np.asarray(extra.get("ep_gt", np.zeros(n_envs)), dtype=np.float64).copy()
        # Episode returns not yet logged when the checkpoint was written, and the step of the last row,
        # so that a run resumed after a crash logs the same rows as an uninterrupted one.
        self._done_vlm: list = list(extra.get("pending_vlm_returns", []))
        self._done_gt: list = list(extra.get("pending_gt_returns", []))
        self._stage_seen = {"render_s": 0.0, "reward_s": 0.0, "env_s": 0.0}
        self._rollouts = 0
        self._log_step = int(extra.get("log_step", n))
        self._log_t, self._rate_step = time.perf_counter(), n  # rates count this session's steps only
        pending = extra.get("deferred_pending")
        if pending is not None and self.recorder is not None:
            self.recorder.restore_pending(pending["recorded"])
            self._restored_slots = list(pending["slots"])
        # Envs whose state could not be restored were reset: the episodes in progress end there, after the
        # recorded steps of theirs (episodes that ended within those are still logged). A stop before those
        # steps are scored keeps the points in its checkpoint.
        self._restart_points = set(extra.get("episode_restart_points", ()))
        if extra.get("episodes_restarted"):
            self._restart_points.add(len(self._restored_slots))
        if 0 in self._restart_points:
            self._restart_points.discard(0)
            self._restart_episode_sums()
        if self._rollout_offset:
            # Resumed mid-rollout (after a signal): finish that rollout, so gradient steps fall
            # on the same env steps as in an uninterrupted run.
            freq = self.model.train_freq
            self._train_freq_original = freq
            self.model.train_freq = TrainFreq(max(1, freq.frequency - self._rollout_offset), TrainFrequencyUnit.STEP)
        self._trim_last_rollout(n)
        self._install_signal_handlers()
        if self.config.progress:
            self._bar = progress_display(self.config.total_timesteps, n)

    def _on_training_end(self) -> None:
        # The signal handlers stay until train() has written its final checkpoint (it restores them):
        # a signal during that write must not kill the process with the write half done.
        self._end_update_timer()  # the last rollout's gradient steps
        if self.model.num_timesteps > self._log_step or self._done_vlm:
            self._log()  # the tail since the last log (log_every), and episodes that ended before a stop
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ per rollout and step

    def _on_rollout_start(self) -> None:
        self._end_update_timer()
        # A rollout's row is written once its gradient steps are done, so that every stage in a row
        # (render, reward, env, SAC update) belongs to the same rollouts.
        every = self.config.log_every
        if self._rollouts and (not every or _due(self.model.num_timesteps, self._log_step, every)):
            self._log()
        self._rollout_steps = 0
        self._slots, self._restored_slots = self._restored_slots, []
        if self._rollout_offset:
            return  # resumed mid-rollout: the schedule runs at rollout boundaries, as it did before the stop
        n = self.model.num_timesteps
        # Evaluate first, so that a checkpoint at the same step records it: a run resumed from there
        # does not evaluate (and log) that step again. Evaluation leaves the training RNG alone.
        if _due(n, self._last_eval_step, self.config.eval_every):
            self.evaluate()
        if _due(n, self._last_ckpt_step, self.config.checkpoint_every):
            self.save()

    def _trim_last_rollout(self, n: int) -> None:
        """Shorten the final rollout so the run ends exactly at ``total_timesteps`` (when n_envs divides it)."""
        n_envs = self.training_env.num_envs
        steps_left = -(-(self.config.total_timesteps - n) // n_envs)
        freq = self.model.train_freq
        if 0 < steps_left < freq.frequency:
            self._cut_rollout = True
            if self._train_freq_original is None:
                self._train_freq_original = freq
            self.model.train_freq = TrainFreq(steps_left, TrainFrequencyUnit.STEP)

    def _on_step(self) -> bool:
        if self.recorder is not None:
            self._slots.append(self.model.replay_buffer.pos)  # where SB3 stores this step next
        else:
            for info in self.locals["infos"]:
                if "episode_vlm_return" in info:
                    self._done_vlm.append(info["episode_vlm_return"])
                    self._done_gt.append(info["episode_gt_return"])
        self._rollout_steps += 1
        if self._bar is not None:
            self._bar.update(self.training_env.num_envs)
        # On the run's last step, stopping would only skip its final gradient steps: finish instead.
        if self.stop_signal is not None and self.model.num_timesteps < self.config.total_timesteps:
            self._store_current_step()
            if self._rollout_complete():
                self._flush_rewards()
            # else (deferred): the recorded steps go into the checkpoint unscored, and the resumed run
            # scores the whole rollout in one batch, as an uninterrupted run does (see save()).
            self.save(mid_rollout=True)
            return False
        return True

    def _on_rollout_end(self) -> None:
        self._flush_rewards()
        if self._train_freq_original is not None:
            self.model.train_freq = self._train_freq_original
            self._train_freq_original = None
            self._rollout_offset = 0
        self._rollouts += 1
        n = self.model.num_timesteps
        self._trim_last_rollout(n)  # SB3 reads train_freq before on_rollout_start: set it for the next one
        self._update_t0 = time.perf_counter()  # SB3's gradient steps come next

    def _end_update_timer(self) -> None:
        """Add the time since the last rollout ended (SB3's gradient steps) to ``sac_update_s``."""
        if self._update_t0 is not None:
            self._stage["sac_update_s"] += time.perf_counter() - self._update_t0
            self._update_t0 = None

    # ------------------------------------------------------------------ rewards and logs

    def _flush_rewards(self) -> None:
        """Deferred: score the recorded frames, write rewards into the replay buffer."""
        if self.recorder is None or self.recorder.count == 0:
            self._slots = []
            return
        t = time.perf_counter()
        vlm, gt, dones = score_and_write_back(self.recorder, self.reward_model, self.model.replay_buffer, self._slots)
        self._stage["reward_s"] += time.perf_counter() - t
        self._slots = []
        for step in range(len(vlm)):
            if step in self._restart_points:
                self._restart_episode_sums()
            self._ep_vlm += vlm[step]
            self._ep_gt += gt[step]
            for i in np.flatnonzero(dones[step]):
                self._done_vlm.append(float(self._ep_vlm[i]))
                self._done_gt.append(float(self._ep_gt[i]))
                self._ep_vlm[i] = self._ep_gt[i] = 0.0
        if any(point >= len(vlm) for point in self._restart_points):
            self._restart_episode_sums()  # the rollout ended with the recorded steps (a cut last one)
        self._restart_points = set()

    def _restart_episode_sums(self) -> None:
        self._ep_vlm[:] = 0.0
        self._ep_gt[:] = 0.0

    def _log(self) -> None:
        now, n = time.perf_counter(), self.model.num_timesteps
        env = self.timed_env
        if env is not None:
            for key in self._stage_seen:
                value = float(getattr(env, key, 0.0))
                if key != "reward_s" or self.recorder is None:  # deferred: reward time measured here
                    self._stage[key] += value - self._stage_seen[key]
                self._stage_seen[key] = value
        rollouts = max(1, self._rollouts)
        record = self.logger.record
        if self._done_vlm:
            record("rollout/vlm_return", float(np.mean(self._done_vlm)))
            record("rollout/gt_return", float(np.mean(self._done_gt)))
            if self._bar is not None:
                self._bar.set_postfix(vlm_return=f"{np.mean(self._done_vlm):.3g}", refresh=False)
        wall = now - self._log_t
        record("time/steps_per_s", (n - self._rate_step) / max(wall, 1e-9))
        paused = self._stage["eval_s"] + self._stage["checkpoint_s"]
        record("time/train_steps_per_s", (n - self._rate_step) / max(wall - paused, 1e-9))
        for key, value in self._stage.items():
            record(f"time/{key}", value / rollouts)  # seconds per rollout
        record("time/total_timesteps", n)
        self.logger.dump(n)
        self._done_vlm, self._done_gt = [], []
        self._stage = {k: 0.0 for k in self._stage}
        self._rollouts = 0
        self._log_t, self._log_step, self._rate_step = now, n, n

    # ------------------------------------------------------------------ checkpoints and signals

    def _rollout_complete(self) -> bool:
        """Whether this session's steps end the rollout (SB3's train_freq, shortened for a resumed or cut one)."""
        return self._rollout_steps >= self.model.train_freq.frequency

    def _store_current_step(self) -> None:
        """Store the step SB3 would store after ``on_step`` (it returns early when we stop)."""
        m, loc = self.model, self.locals
        m._update_info_buffer(loc["infos"], loc["dones"])
        m._store_transition(m.replay_buffer, loc["buffer_actions"], loc["new_obs"], loc["rewards"], loc["dones"],
                            loc["infos"])
        m._update_current_progress_remaining(m.num_timesteps, m._total_timesteps)
        m._on_step()
        m._episode_num += int(np.sum(loc["dones"]))

    def save(self, mid_rollout: bool = False) -> Path:
        """Write a checkpoint of the current state (see :mod:`vlmrm_fast.train.checkpoint`)."""
        n = self.model.num_timesteps
        # From here: a stop's checkpoint copies the rollout's frames so far off the reward device first.
        start = time.perf_counter()
        # Stopped on a rollout's last step: the rollout is complete but its gradient steps are not
        # done; the resumed run does them first (train_pending), then starts the next rollout.
        complete = mid_rollout and self._rollout_complete()
        recorded = self.recorder.pending() if self.recorder is not None and mid_rollout and not complete else None
        extra = {
            "step": n,
            "rollout_steps_done": (self._rollout_offset + self._rollout_steps) if mid_rollout and not complete else 0,
            "train_pending": complete,
            # A stop's checkpoint is extra: the periodic ones stay where an uninterrupted run puts them.
            "last_checkpoint_step": self._last_ckpt_step if mid_rollout else n,
            "last_eval_step": self._last_eval_step,
            # The schedule counts a failed evaluation as done; a resume with no steps left tries the final one again.
            "last_eval_failed": self._last_eval_failed,
            "ep_vlm": self._ep_vlm.copy(),
            "ep_gt": self._ep_gt.copy(),
            # A stop logs what is pending before it exits (_on_training_end); a periodic checkpoint
            # keeps it for a resume after a crash, which would otherwise never log those episodes.
            "pending_vlm_returns": [] if mid_rollout else list(self._done_vlm),
            "pending_gt_returns": [] if mid_rollout else list(self._done_gt),
            "log_step": n if mid_rollout else self._log_step,
            # The run ended here inside a rollout, which was trained on: extending it is not the longer run.
            "cut_rollout": self._cut_rollout and not mid_rollout and n >= self.config.total_timesteps,
            "reward_setup": reward_setup(self.reward_model),
            # Deferred, stopped inside a rollout: its steps so far, frames included (at most a rollout's),
            # with the replay slots whose placeholder rewards they replace once the rollout ends.
            "deferred_pending": None if recorded is None else {"recorded": recorded, "slots": list(self._slots)},
            "episode_restart_points": sorted(self._restart_points) if recorded is not None else [],
        }
        current = self.model.train_freq
        if self._train_freq_original is not None:
            self.model.train_freq = self._train_freq_original  # save the run's own schedule
        try:
            path = ckpt.save_checkpoint(self.run_dir, self.model, self.config_json, extra,
                                        keep=self.config.keep_checkpoints)
        finally:
            self.model.train_freq = current
            self._stage["checkpoint_s"] += time.perf_counter() - start
        if not mid_rollout:
            self._last_ckpt_step = n
        self.last_checkpoint = path
        return path

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.signal(sig, self._handle_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def _handle_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # a second signal: stop now, without a checkpoint
            self.restore_signal_handlers()
            raise StoppedAtOnce(signum)
        self.stop_signal = signum
        message = (f"{signal.Signals(signum).name}: checkpointing after this step, then stopping "
                   "(send it again to stop at once)")
        if self._bar is not None:
            self._bar.write(message)
        else:  # no progress bar, or after training (the final evaluation and checkpoint)
            print(message, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ evaluation

    @property
    def last_eval_step(self) -> int:
        """The step of the run's last evaluation (from the checkpoint until this session evaluates)."""
        return self._last_eval_step

    @property
    def last_eval_failed(self) -> bool:
        """Whether the evaluation at :attr:`last_eval_step` failed (a warning said why)."""
        return self._last_eval_failed

    def evaluate(self) -> Optional[Path]:
        """Run ``eval_episodes`` deterministic episodes in a separate env; write the first as mp4.

        An evaluation that fails for want of something outside the run (a package, a file system, a GL
        framebuffer of the video size) warns and returns None: training goes on."""
        from vlmrm_fast.envs.humanoid import looks_like_framebuffer_limit

        self._last_eval_step = self.model.num_timesteps
        self._last_eval_failed = True
        start = time.perf_counter()
        try:
            path, gt, vlm = evaluate_policy_video(self.model, self.config, self.reward_model, self.run_dir,
                                                  self.render_size)
        except Exception as exc:
            too_large = looks_like_framebuffer_limit(exc)
            if not (too_large or isinstance(exc, (ImportError, OSError, RuntimeError))):
                raise
            also = ": choose a smaller video_width and video_height" if too_large else ""
            warnings.warn(f"evaluation at step {self._last_eval_step} skipped: {type(exc).__name__}: {exc}{also}; training goes "
                          "on (a failed final evaluation is tried again by --resume)")
            return None
        finally:
            self._stage["eval_s"] += time.perf_counter() - start
        self._last_eval_failed = False
        self.logger.record("eval/gt_return", gt)
        self.logger.record("eval/vlm_return", vlm)
        self.logger.record("eval/seconds", time.perf_counter() - start)  # the final one is in no row's eval_s
        # The CSV row needs its step (TensorBoard has it from dump()); TensorBoard has the step's once already.
        self.logger.record("time/total_timesteps", self.model.num_timesteps, exclude=("tensorboard",))
        self.logger.dump(self.model.num_timesteps)  # at the step evaluated, not at the next log
        return path


def reward_setup(reward_model) -> dict:
    """Where and how the reward model computes: device, tower dtype and backend (as strings)."""
    return {key: str(getattr(reward_model, key, None)) for key in ("device", "dtype", "backend")}


#: Evaluation frames per reward-model call: memory stays one chunk of frames, not a whole episode.
_EVAL_CHUNK = 64

#: How the encoder's temporary file of an evaluation video ends (ffmpeg picks the format by extension).
_PARTIAL_VIDEO_SUFFIX = ".tmp.mp4"


def remove_partial_videos(run_dir: Path) -> None:
    """Remove what a crash mid-encode left in ``run_dir/videos``: the encoder's temporary files
    (``.eval_step_*.mp4.*.tmp.mp4``), never a finished video. Call it while holding the run folder (no other
    process encodes there)."""
    videos = Path(run_dir) / "videos"
    if videos.is_dir():
        for partial in videos.glob(f".eval_step_*{_PARTIAL_VIDEO_SUFFIX}"):
            partial.unlink(missing_ok=True)


def evaluate_policy_video(model, config: TrainConfig, reward_model, run_dir: Path,
                          render_size: Optional[tuple] = None):
    """Deterministic episodes in a fresh env; returns (mp4 path of the first episode, mean ground-truth
    return, mean VLM return).

    The episodes are rendered and scored at ``render_size`` (``(height, width)``, the training frames'
    size; default: the video size), so that ``eval/vlm_return`` compares with the training returns, in
    chunks of up to 64 frames as each episode runs. The video is rendered at the video size: where that
    differs, by a second env run beside the first episode, from the same seed and on its own observations
    (the same episode for a deterministic env such as MuJoCo's); an env that renders at its own size,
    whatever it is asked, is filmed at that size from the scored episode.
    """
    import imageio.v2 as imageio

    from vlmrm_fast.train.run import make_env

    video_size = (config.video_height, config.video_width)
    height, width = render_size or video_size
    env = make_env(config, width, height, exact=False)
    video_env = make_env(config, video_size[1], video_size[0], exact=False) if (height, width) != video_size else None
    length = config.video_length or config.episode_length
    video, gt_returns, vlm_returns = [], [], []
    try:
        for episode in range(config.eval_episodes):
            seed = config.seed + 1_000_003 + episode
            obs, _ = env.reset(seed=seed)
            filming = episode == 0 and length > 0
            if filming and video_env is not None:
                video_obs, _ = video_env.reset(seed=seed)
                if np.shape(render_env(video_env)) == np.shape(render_env(env)):  # an env that renders at its own size
                    release_env_gl(video_env)
                    video_env.close()
                    video_env = None
            gt, vlm, done, pending = 0.0, 0.0, False, []
            while not done:
                action, _ = model.predict(obs, deterministic=True)
                obs, reward, terminated, truncated, _ = env.step(action)
                gt += float(reward)
                done = terminated or truncated
                frame = np.asarray(render_env(env))
                pending.append(frame)
                if filming and video_env is not None:
                    video_action, _ = model.predict(video_obs, deterministic=True)
                    video_obs, _, video_terminated, video_truncated, _ = video_env.step(video_action)
                    video.append(np.asarray(render_env(video_env)))
                    filming = len(video) < length and not (video_terminated or video_truncated)
                elif filming:
                    video.append(frame)
                    filming = len(video) < length
                if len(pending) == _EVAL_CHUNK or done:
                    with torch.inference_mode():
                        vlm += float(_rewards_of(reward_model, np.stack(pending))[:, 0].sum(dtype=np.float64))
                    pending = []
            gt_returns.append(gt)
            vlm_returns.append(vlm)
        fps = int(env.metadata.get("render_fps") or 30)
    finally:
        for opened in (env, video_env):
            if opened is not None:
                release_env_gl(opened)  # with its own context current: not the training envs' GL objects
                opened.close()
    out = Path(run_dir) / "videos" / f"eval_step_{model.num_timesteps:012d}.mp4"
    # H.264 in yuv420p takes even sizes only: an odd one gets a copy of its last row or column, so that the
    # frames keep their pixels (imageio would resize them all, to a multiple of 16 by default).
    padded: list[ArrayLike] = [np.pad(f, ((0, f.shape[0] % 2), (0, f.shape[1] % 2), (0, 0)), mode="edge")
                               for f in video]
    with replaced_when_written(out, suffix=_PARTIAL_VIDEO_SUFFIX) as partial:  # a crash mid-encode leaves no cut-short video
        imageio.mimwrite(partial, padded, fps=fps, macro_block_size=1)
    return out, float(np.mean(gt_returns)), float(np.mean(vlm_returns))
