"""Deferred VLM rewards: keep a rollout's frames on the reward device, score them in one batch.

The paper computed CLIP rewards once per rollout, in large batches, before the gradient steps.
Here that works in three parts:

- :class:`DeferredRewardRecorder` (a :class:`~vlmrm_fast.wrappers.VLMRewardVecEnv` that renders
  but does not score): after every vector step renders all envs (the BatchRenderer where it
  works; the true terminal state on the step an episode ends, as the wrapper does) into a
  preallocated uint8 tensor ``[steps, n_envs, H, W, 3]`` on the reward device, and returns a
  placeholder reward to SB3 (0 for mode "replace", the env reward for "add"/"log").
- the training callback (:mod:`vlmrm_fast.train.callbacks`) records, at each step, the replay
  slot the transition will occupy (``replay_buffer.pos``, before SB3 stores it), and in
  ``_on_rollout_end`` (after the rollout, before ``train()``) scores all frames with one
  ``rm(frames)`` call (chunked inside the model) and writes the rewards into
  ``replay_buffer.rewards[slots]``: see :func:`score_and_write_back`.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Union, cast

import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv

from vlmrm_fast.wrappers import VLMRewardVecEnv
from vlmrm_fast.wrappers.modes import _combine
from vlmrm_fast.wrappers.scoring import _rewards_of


class DeferredRewardRecorder(VLMRewardVecEnv):
    """Record each step's frames on the reward device; hand SB3 a placeholder reward.

    A :class:`vlmrm_fast.wrappers.VLMRewardVecEnv` whose ``step_wait`` renders (same frame source,
    same exact terminal frames) but does not score: the frames go into ``self.frames[t]``, a
    preallocated uint8 tensor ``[capacity, n_envs, H, W, 3]`` on ``reward_model.device`` (the CPU for a
    model without one), and SB3 gets 0 (mode ``"replace"``) or the env reward (``"add"``/``"log"``)
    until :func:`score_and_write_back` replaces it in the replay buffer.

    Args:
        venv: the vector env.
        reward_model: the :class:`~vlmrm_fast.CLIPReward` (its device holds the frames).
        capacity: vector steps held (the rollout length, ``train_freq``).
        mode, weight: how VLM and env rewards combine (see :func:`combine`).
        render: the frame source, as for :class:`~vlmrm_fast.wrappers.VLMRewardVecEnv`.
        task: which task (index or name) of a several-task reward model drives the reward.
    """

    #: Not restored from a checkpoint's env state: the per-session timings (the first log after a resume
    #: would otherwise report the whole previous session), and the record, which travels whole through
    #: :meth:`pending` and :meth:`restore_pending` (frames included), never as loose counters beside an
    #: empty frame buffer.
    checkpoint_skip = ("env_s", "render_s", "reward_s", "_t0", "_t_render_end",
                       "count", "gt", "dones", "bottom_up", "_closed")
    #: No resize warning: train renders at the tower's size unless its config asks for another size
    #: (a choice, like the smoke preset's 64 x 64) or the env cannot take one (``check_env_frames`` says so).
    _size_checked = True

    def __init__(self, venv: VecEnv, reward_model, capacity: int, mode: str = "replace", weight: float = 1.0,
                 render: str = "auto", task: Union[int, str] = 0) -> None:
        super().__init__(venv, reward_model, mode=mode, weight=weight, render=render, task=task)
        self.capacity = int(capacity)
        self.device = torch.device(getattr(reward_model, "device", "cpu"))
        self.frames: Optional[torch.Tensor] = None  # allocated at the first step (frame size known)
        self.gt = np.zeros((self.capacity, self.num_envs), dtype=np.float32)
        self.dones = np.zeros((self.capacity, self.num_envs), dtype=bool)
        self.combined_as: list = [None] * self.capacity  # each step's (mode, weight): both may change between steps
        self.count = 0
        self.bottom_up: Optional[bool] = None  # row order of the stored frames
        self.env_s = 0.0
        self.render_s = 0.0
        self._t0 = 0.0
        self._closed = False

    def step_async(self, actions: np.ndarray) -> None:
        if self._closed:
            # A TrainResult's model keeps this env; a learn() of its own has no training callback to score
            # the rollouts, so its replay buffer would get the placeholder rewards (0 for "replace").
            raise RuntimeError(
                "this run's deferred-reward env is closed: its VLM rewards are scored at the end of each rollout "
                "by vlmrm_fast's training callback, which a learn() of your own does not run, so the replay buffer "
                "would get placeholder rewards. Continue the run with `vlmrm-fast train --resume RUN_DIR "
                "--total-timesteps N` (train(config, resume=RUN_DIR)), or train with reward_timing='step' to "
                "call model.learn() yourself"
            )
        self._t0 = time.perf_counter()
        self.venv.step_async(actions)

    def step_wait(self):
        obs, env_rewards, dones, infos = self.venv.step_wait()
        t1 = time.perf_counter()
        self.env_s += t1 - self._t0
        if self.count >= self.capacity:
            raise RuntimeError(
                f"deferred reward buffer full ({self.capacity} steps): score_and_write_back must run at the "
                "end of every rollout (is the training callback attached?)"
            )
        frames, bottom_up, _ = self._render(infos)
        if not isinstance(frames, torch.Tensor):
            frames = torch.from_numpy(np.stack([np.asarray(f) for f in frames]))
        if self.frames is None or tuple(self.frames.shape[2:]) != tuple(frames.shape[1:]):
            if self.count:
                raise ValueError(f"frame size changed mid-rollout to {tuple(frames.shape[1:3])}; give the envs one render size")
            self.frames = torch.empty((self.capacity, *frames.shape), dtype=torch.uint8, device=self.device)
        if self.count == 0:
            self.bottom_up = bool(bottom_up)
        elif bool(bottom_up) != self.bottom_up:  # the renderer fell back mid-rollout: match the row order
            frames = frames.flip(1)
        self.frames[self.count].copy_(frames, non_blocking=False)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # honest timing
        self.render_s += time.perf_counter() - t1
        gt = np.asarray(env_rewards, dtype=np.float32).reshape(self.num_envs)
        self.gt[self.count] = gt
        self.dones[self.count] = dones
        self.combined_as[self.count] = (self.mode, self.weight)
        self.count += 1
        for i, info in enumerate(infos):
            info["gt_reward"] = float(gt[i])
        placeholder = np.zeros_like(gt) if self.mode == "replace" else gt
        return obs, placeholder, dones, infos

    def close(self) -> None:
        """Close the envs and free the rollout's frame buffer (``capacity x n_envs`` frames on the reward
        device): a ``TrainResult`` keeps this env through its model. A closed recorder refuses steps."""
        try:
            super().close()
        finally:
            self.frames, self.count, self._closed = None, 0, True

    def pending(self) -> Optional[dict]:
        """The steps recorded and not yet scored, on the CPU (for a checkpoint written inside a rollout),
        else None: ``{"frames": uint8 [k, n, H, W, 3], "gt": [k, n], "dones": [k, n], "combined_as": list,
        "bottom_up": bool}``."""
        if not self.count:
            return None
        k, frames = self.count, cast(torch.Tensor, self.frames)  # allocated by the first step counted
        return {"frames": frames[:k].cpu().clone(), "gt": self.gt[:k].copy(), "dones": self.dones[:k].copy(),
                "combined_as": list(self.combined_as[:k]), "bottom_up": bool(self.bottom_up)}

    def restore_pending(self, state: dict) -> None:
        """Take back :meth:`pending`'s steps, so that the rollout they began is scored in one batch when it
        ends, as in a run never stopped (scored apart, in a batch of another size, rewards would differ in
        their last bits on CPU, and more under bf16 on a GPU, whose kernels depend on the batch size)."""
        frames = state["frames"]
        k = int(frames.shape[0])
        if k > self.capacity or tuple(frames.shape[1:2]) != (self.num_envs,):
            raise ValueError(f"the checkpoint holds {k} recorded steps of {frames.shape[1]} envs; this run records "
                             f"up to {self.capacity} steps of {self.num_envs} envs")
        self.frames = torch.empty((self.capacity, *frames.shape[1:]), dtype=torch.uint8, device=self.device)
        self.frames[:k].copy_(frames)
        self.gt[:k], self.dones[:k] = state["gt"], state["dones"]
        self.combined_as[:k] = [tuple(c) for c in state["combined_as"]]
        self.bottom_up, self.count = bool(state["bottom_up"]), k

    def pop(self):
        """The recorded ``(frames [T, n, H, W, 3], gt [T, n], dones [T, n], combined_as)``, ``combined_as[t]``
        being step t's ``(mode, weight)``; clears the record."""
        n, self.count = self.count, 0
        frames = self.frames[:n] if self.frames is not None else torch.empty((0, self.num_envs, 1, 1, 3), dtype=torch.uint8)
        return frames, self.gt[:n].copy(), self.dones[:n].copy(), list(self.combined_as[:n])


def combine(gt: np.ndarray, vlm: np.ndarray, mode: str, weight: float) -> np.ndarray:
    """The reward SAC trains on, exactly as :class:`VLMRewardVecEnv` combines it per step."""
    return np.asarray(_combine(mode, weight, gt, vlm), dtype=np.float32)


def score_frames(reward_model, frames: torch.Tensor, bottom_up: bool,
                 task_column: Callable[[int], int] = lambda width: 0) -> np.ndarray:
    """VLM rewards [T, n] for frames [T, n, H, W, 3] in one call (a CLIPReward chunks it; a plain reward
    callable gets all T * n frames, flipped top-down first if ``bottom_up``). A several-task reward model
    contributes the column ``task_column(its number of columns)`` picks (the recorder's, checked as in
    :class:`VLMRewardVecEnv`); by default the first."""
    t, n = frames.shape[:2]
    if t * n == 0:
        return np.zeros((t, n), dtype=np.float32)
    with torch.inference_mode():
        rewards = _rewards_of(reward_model, frames.reshape(t * n, *frames.shape[2:]), bottom_up)  # [t * n, T]
    return rewards[:, task_column(rewards.shape[1])].reshape(t, n)


def score_and_write_back(recorder: DeferredRewardRecorder, reward_model, replay_buffer,
                         slots: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score the recorded rollout and write its rewards into ``replay_buffer.rewards[slots]``, each step's
    combined with the env reward by the recorder's ``mode`` and ``weight`` at that step.

    ``slots[t]`` is the replay index the t-th recorded step was stored at (rows hold all envs).
    Returns ``(vlm [T, n], gt [T, n], dones [T, n])`` for logging.
    """
    frames, gt, dones, combined_as = recorder.pop()
    if len(slots) != len(gt):
        raise RuntimeError(f"recorded {len(gt)} steps but {len(slots)} replay slots; the callback missed steps")
    vlm = score_frames(reward_model, frames, bool(recorder.bottom_up), recorder._task_column)
    if len(slots):
        # In order, so a slot written twice (rollout longer than the buffer) keeps the newest.
        for t, slot in enumerate(slots):
            mode, weight = combined_as[t]
            replay_buffer.rewards[slot] = combine(gt[t], vlm[t], mode, weight)
    return vlm, gt, dones


def unwrap_recorder(venv) -> Optional[DeferredRewardRecorder]:
    """The :class:`DeferredRewardRecorder` in a wrapper chain, or None."""
    while venv is not None:
        if isinstance(venv, DeferredRewardRecorder):
            return venv
        venv = getattr(venv, "venv", None)
    return None


class TimedVLMRewardVecEnv(VLMRewardVecEnv):
    """:class:`~vlmrm_fast.wrappers.VLMRewardVecEnv` (per-step rewards) that also times its stages.

    ``env_s``: stepping the envs; ``render_s``: rendering; ``reward_s``: the reward model and
    bookkeeping. Cumulative seconds; the training callback logs their increments.
    """

    checkpoint_skip = DeferredRewardRecorder.checkpoint_skip
    _size_checked = True  # no resize warning, as DeferredRewardRecorder

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.env_s = self.render_s = self.reward_s = 0.0
        self._t0 = self._t_render_end = 0.0

    def step_async(self, actions: np.ndarray) -> None:
        self._t0 = time.perf_counter()
        self.venv.step_async(actions)

    def _render(self, infos):
        t = time.perf_counter()
        self.env_s += t - self._t0
        out = super()._render(infos)
        frames = out[0]
        if isinstance(frames, torch.Tensor) and frames.device.type == "cuda":
            torch.cuda.current_stream(frames.device).synchronize()
        self._t_render_end = time.perf_counter()
        self.render_s += self._t_render_end - t
        return out

    def step_wait(self):
        out = super().step_wait()
        self.reward_s += time.perf_counter() - self._t_render_end
        return out
