"""``vlmrm-fast train``: smoke runs, deferred rewards in the replay buffer, checkpoints, resume, errors.

Most tests use ``DotEnv`` below (a square moving in a 32 x 32 image: numpy rendering, instant) so
that the whole file stays within a few minutes on 2 CPU cores; one smoke run uses the textured
humanoid at 64 x 64. Subprocess runs reach it as ``test_train:VlmrmTestDot-v0`` (gymnasium imports
this module first), with this folder on PYTHONPATH.
"""
from __future__ import annotations

import dataclasses
import json
import re
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import gymnasium as gym
import numpy as np
import pytest
import torch

from vlmrm_fast.train import checkpoint as ckpt
from vlmrm_fast.train.config import (RESUMABLE_FIELDS, TrainConfig, apply_overrides, diff_configs, from_preset,
                                     load_config_file, parse_set)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOT_ID = "test_train:VlmrmTestDot-v0"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class DotEnv(gym.Env):
    """A square at ``pos`` in [-1, 1]^2, moved by the action; reward -|pos|; RGB frames."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode="rgb_array", width=32, height=32):
        self.render_mode, self.width, self.height = render_mode, width, height
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.pos = np.zeros(2, dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(-0.5, 0.5, 2).astype(np.float32)
        return self.pos.copy(), {}

    def step(self, action):
        self.pos = np.clip(self.pos + 0.2 * np.asarray(action, dtype=np.float32), -1, 1).astype(np.float32)
        return self.pos.copy(), float(-np.linalg.norm(self.pos)), False, False, {}

    def render(self):
        img = np.full((self.height, self.width, 3), 40, dtype=np.uint8)
        r = int((self.pos[1] + 1) / 2 * (self.height - 6)); c = int((self.pos[0] + 1) / 2 * (self.width - 6))
        img[r:r + 6, c:c + 6] = (250, 200, 30)
        return img


class NoRenderEnv(DotEnv):
    metadata = {"render_modes": ["human"], "render_fps": 10}


class NoGLEnv(DotEnv):
    """Fails to render as MuJoCo's EGL backend does on a machine without EGL (its own message, no fix)."""

    def render(self):
        raise RuntimeError("eglInitialize() failed: EGL_NOT_INITIALIZED")


class NeedsPygameEnv(DotEnv):
    """Renders through a package that is not installed, as gymnasium's classic-control envs without pygame."""

    def render(self):
        raise gym.error.DependencyNotInstalled('pygame is not installed, run `pip install "gymnasium[classic-control]"`')


class DiscreteDotEnv(DotEnv):
    """Frames as DotEnv's, but three discrete actions: SAC cannot drive it."""

    def __init__(self, render_mode="rgb_array", width=32, height=32):
        super().__init__(render_mode, width, height)
        self.action_space = gym.spaces.Discrete(3)

    def step(self, action):
        return super().step(np.eye(2, dtype=np.float32)[min(int(action), 1)])


class FixedSizeEnv(DotEnv):
    """Renders at its own size (24 x 40) and takes no width/height, like most gymnasium envs."""

    def __init__(self, render_mode="rgb_array"):
        super().__init__(render_mode, width=40, height=24)


class PixelDotEnv(DotEnv):
    """DotEnv observed through its frame, 8 x 8 x 3 uint8: SB3 wraps such an env in a VecTransposeImage."""

    def __init__(self, render_mode="rgb_array", width=32, height=32):
        super().__init__(render_mode, width, height)
        self.observation_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.render()[::4, ::4].copy(), {}

    def step(self, action):
        _, reward, terminated, truncated, info = super().step(action)
        return self.render()[::4, ::4].copy(), reward, terminated, truncated, info


for _id, _cls in (("VlmrmTestDot-v0", DotEnv), ("VlmrmTestNoRender-v0", NoRenderEnv), ("VlmrmTestPixelDot-v0", PixelDotEnv),
                  ("VlmrmTestFixedSize-v0", FixedSizeEnv), ("VlmrmTestNoGL-v0", NoGLEnv),
                  ("VlmrmTestNeedsPygame-v0", NeedsPygameEnv), ("VlmrmTestDiscrete-v0", DiscreteDotEnv)):
    if _id not in gym.registry:
        gym.register(_id, entry_point=_cls)


class RecordingReward:
    """Delegates to a CLIPReward and records every call's rewards."""

    def __init__(self, rm):
        self.rm = rm
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.rm, name)

    def __call__(self, frames, bottom_up=False):
        out = self.rm(frames, bottom_up=bottom_up)
        self.calls.append(out.detach().float().cpu().numpy().copy())
        return out


def dot_config(tmp_path, **kw) -> TrainConfig:
    base = dict(env_id=DOT_ID, render_width=32, render_height=32, episode_length=20, total_timesteps=120,
                train_freq=10, gradient_steps=2, learning_starts=20, batch_size=16, buffer_size=5000,
                checkpoint_every=40, video_width=32, video_height=32, progress=False, run_dir=str(tmp_path / "run"))
    base.update(kw)
    return apply_overrides(from_preset("smoke"), base)


def tiny_reward(config):
    from vlmrm_fast.train.run import build_reward_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RecordingReward(build_reward_model(config))


def train_stopped_at(step: int, config: TrainConfig, monkeypatch, resume: Optional[Path] = None, reward_model=None):
    """Train ``config`` (continuing ``resume``; with ``reward_model``, by default the tiny CLIP) as if
    SIGTERM arrived at env step ``step`` (what the handler records); the result."""
    from vlmrm_fast.train import callbacks, train

    on_step = callbacks.TrainingCallback._on_step

    def signal_at_step(self):
        if self.model.num_timesteps == step and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        return on_step(self)

    with monkeypatch.context() as patch:
        patch.setattr(callbacks.TrainingCallback, "_on_step", signal_at_step)
        return train(config, resume=resume, reward_model=reward_model or tiny_reward(config))


def tb_scalars(run_dir: Path) -> dict:
    """{tag: [(step, value), ...]} of every scalar in the run's TensorBoard files (one per session of a
    resumed run), by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict = {}
    for events in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points, key=lambda point: point[0]) for tag, points in scalars.items()}


def tb_tags(run_dir: Path) -> set:
    return set(tb_scalars(run_dir))


def load_buffer(path: Path):
    import pickle

    with open(path / "replay_buffer.pkl", "rb") as f:
        return pickle.load(f)


# --------------------------------------------------------------------------- smoke runs


def test_smoke_humanoid_deferred_rewards_reach_buffer(tmp_path):
    """The smoke preset on the textured humanoid: the buffer's rewards are the rollout-batched VLM rewards."""
    from vlmrm_fast.train import train

    config = apply_overrides(from_preset("smoke"), dict(
        total_timesteps=80, train_freq=20, learning_starts=20, checkpoint_every=40, eval_every=80,
        episode_length=15, run_dir=str(tmp_path / "run")))
    rm = tiny_reward(config)
    result = train(config, reward_model=rm)
    assert result.num_timesteps == 80 and result.stopped_by is None
    buf = result.model.replay_buffer
    calls = [c for c in rm.calls if c.shape == (20 * 2,)]  # one call per rollout (the others: checks, eval)
    assert len(calls) == 2
    vlm = np.concatenate([c.reshape(20, 2) for c in calls])
    np.testing.assert_allclose(buf.rewards[:buf.pos], vlm, rtol=0, atol=0)  # mode replace, weight 1
    assert np.all(vlm != 0) and np.ptp(vlm) > 0
    tags = tb_tags(result.run_dir)
    for tag in ("rollout/vlm_return", "rollout/gt_return", "time/steps_per_s", "time/render_s", "time/reward_s",
                "time/sac_update_s", "time/train_steps_per_s", "time/eval_s", "time/checkpoint_s", "eval/vlm_return"):
        assert tag in tags
    from vlmrm_fast.train.command import EPILOG  # `vlmrm-fast train --help` lists every tag the run logs

    assert [t for t in tags if not t.startswith("train/") and t not in " ".join(EPILOG.split())] == []
    assert ckpt.find_latest(result.run_dir).name == ckpt.step_name(80)
    videos = list((result.run_dir / "videos").glob("*.mp4"))
    assert videos and videos[0].stat().st_size > 0


def test_evaluation_logged_at_its_step_over_all_episodes(tmp_path, monkeypatch):
    """Evaluations every 40 steps: videos and TensorBoard scalars at 40 and 80; the VLM return is the
    mean over the evaluation's episodes of each episode's summed rewards, like the ground-truth one."""
    from vlmrm_fast.train import callbacks, train

    monkeypatch.setattr(callbacks, "_EVAL_CHUNK", 6)  # episodes of 15 frames: chunks of 6, 6 and 3
    config = dot_config(tmp_path, total_timesteps=80, eval_every=40, eval_episodes=2, episode_length=15,
                        checkpoint_every=0)
    rm = tiny_reward(config)
    result = train(config, reward_model=rm)
    videos = sorted(p.name for p in (result.run_dir / "videos").glob("*.mp4"))
    assert videos == [f"eval_step_{step:012d}.mp4" for step in (40, 80)]
    chunks = [c for c in rm.calls if c.shape in ((6,), (3,))]  # evaluation calls (rollouts: 20 frames)
    assert [c.shape[0] for c in chunks] == [6, 6, 3] * 4  # 2 evaluations x 2 episodes
    episodes = [sum(c.sum(dtype=np.float64) for c in chunks[i:i + 3]) for i in range(0, 12, 3)]
    logged = sorted(tb_scalars(result.run_dir)["eval/vlm_return"])
    assert [step for step, _ in logged] == [40, 80]
    for (_, value), pair in zip(logged, (episodes[:2], episodes[2:])):
        assert value == pytest.approx(np.mean(pair), rel=1e-5)
    # progress.csv: each evaluation in a row of its own, which names its step (the rows had none) and
    # its time; TensorBoard, which has the step, logs it once per row.
    import csv

    with open(result.run_dir / "tb" / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    evaluations = [row for row in rows if row["eval/vlm_return"]]
    assert [int(row["time/total_timesteps"]) for row in evaluations] == [40, 80]
    assert all(float(row["eval/seconds"]) > 0 and not row["time/steps_per_s"] for row in evaluations)
    assert [step for step, _ in tb_scalars(result.run_dir)["time/total_timesteps"]] == [20, 40, 60, 80]
    assert [step for step, _ in tb_scalars(result.run_dir)["eval/seconds"]] == [40, 80]


def vlm_of_next_observations(rm, buf) -> np.ndarray:
    """The VLM reward each stored transition should carry, computed apart from the training code: a
    DotEnv frame is a function of its position, which is the transition's next observation (SB3
    stores the true last observation on rows where an episode ended), rendered here and scored."""
    positions = buf.next_observations[:buf.pos]  # [T, n_envs, 2]
    env = DotEnv()
    frames = []
    for pos in positions.reshape(-1, 2):
        env.pos = pos
        frames.append(env.render())
    with torch.no_grad():
        return rm.rm(np.stack(frames)).float().numpy().reshape(positions.shape[:2])


def test_step_rewards_add_mode(tmp_path):
    """Per-step rewards, mode add: buffer reward = env reward + weight * the VLM reward of the frame
    after the step, on every row, the last step of an episode included."""
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, reward_timing="step", reward_mode="add", reward_weight=2.0, total_timesteps=60)
    rm = tiny_reward(config)
    result = train(config, reward_model=rm)
    buf = result.model.replay_buffer
    assert buf.pos == 30 and buf.dones[:buf.pos].any()  # episodes of 20 steps: one ends in each env
    gt = -np.linalg.norm(buf.next_observations[:buf.pos], axis=-1)
    expected = gt + 2.0 * vlm_of_next_observations(rm, buf)
    np.testing.assert_allclose(buf.rewards[:buf.pos], expected, rtol=0, atol=1e-5)
    assert {"rollout/vlm_return", "time/reward_s"} <= tb_tags(result.run_dir)


def top_heavy_brightness(frames) -> np.ndarray:
    """A plain reward function of our own (no ``bottom_up``, numpy out): the mean brightness of each
    frame's top half minus its bottom half, so a frame upside down gets the opposite reward."""
    frames = np.asarray(frames, dtype=np.float64)
    half = frames.shape[1] // 2
    return frames[:, :half].mean(axis=(1, 2, 3)) - frames[:, -half:].mean(axis=(1, 2, 3))


@pytest.mark.parametrize("timing", ["step", "deferred"])
def test_train_takes_a_plain_reward_function(tmp_path, timing):
    """train(reward_model=...) takes any callable rm(frames) -> rewards, as the wrappers do: its numpy
    rewards reach the replay buffer, top-down, in both timings, and the evaluation sums them."""
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, reward_timing=timing, reward_mode="replace", total_timesteps=40,
                        checkpoint_every=0, eval_every=40, eval_episodes=1)
    result = train(config, reward_model=top_heavy_brightness)
    buf = result.model.replay_buffer
    env = DotEnv()
    frames = []
    for pos in buf.next_observations[:buf.pos].reshape(-1, 2):
        env.pos = pos
        frames.append(env.render())
    expected = top_heavy_brightness(frames).reshape(buf.pos, -1)
    assert np.abs(expected).max() > 1.0  # the dot moves between halves: a flipped frame would fail below
    np.testing.assert_allclose(buf.rewards[:buf.pos], expected, rtol=1e-6, atol=1e-5)
    [(step, value)] = tb_scalars(result.run_dir)["eval/vlm_return"]
    assert step == 40 and np.isfinite(value)


def test_train_refuses_a_reward_function_with_several_rewards_per_frame(tmp_path):
    from vlmrm_fast.train import train

    with pytest.raises(ValueError, match=r"must return one reward per frame; got shape \(1, 2\) for 1 frame"):
        train(dot_config(tmp_path), reward_model=lambda frames: [[0.0, 1.0]] * len(frames))


def test_a_reward_model_refusing_frames_of_its_own_size_keeps_its_own_fix(tmp_path):
    # Frames of the model's input size: whatever it refuses, the render size is not the cause, so its own
    # error (here a tower left in training mode, whose fix is rm.model.eval()) goes through unchanged.
    from vlmrm_fast.train import train

    config = dot_config(tmp_path)
    rm = tiny_reward(config)
    config = dot_config(tmp_path, render_width=rm.image_size[1], render_height=rm.image_size[0])
    rm.model.train()
    with pytest.raises(ValueError, match=r"training mode.*rm\.model\.eval\(\)") as raised:
        train(config, reward_model=rm)
    assert "render_width" not in str(raised.value)


def test_a_reward_model_that_cannot_take_the_frames_names_the_render_size(tmp_path):
    # One frame is scored before anything else starts. A model that refuses it gets the render-size fix;
    # one that runs out of GPU memory is not about the size, and its error goes through unchanged (the
    # command line then names the memory fixes).
    from vlmrm_fast.train import train

    def refuses(frames):
        raise ValueError("expects 7x7 frames")

    with pytest.raises(ValueError, match=r"cannot take \d+x\d+ frames \(expects 7x7 frames\); where the size is "
                       r"the cause, set render_width/"):
        train(dot_config(tmp_path), reward_model=refuses)

    def out_of_memory(frames):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.cuda.OutOfMemoryError, match="Tried to allocate"):
        train(dot_config(tmp_path / "oom"), reward_model=out_of_memory)


@pytest.mark.parametrize("timing", ["step", "deferred"])
def test_replace_mode_trains_on_the_vlm_reward_in_both_timings(tmp_path, timing):
    """In replace mode the buffer holds the VLM reward of the frame after each step (the weight applies
    to add mode only), whether scored per step or per rollout, the last step of an episode included."""
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, reward_timing=timing, reward_mode="replace", reward_weight=2.0, total_timesteps=60,
                        eval_every=0)
    rm = tiny_reward(config)
    with pytest.warns(UserWarning, match=r"reward_weight 2 is unused with reward_mode replace: it scales the VLM reward in "
                      r"reward_mode add only; set reward_mode add \(--reward-mode add\)"):
        result = train(config, reward_model=rm)
    buf = result.model.replay_buffer
    assert buf.pos == 30 and buf.dones[:buf.pos].any()
    np.testing.assert_allclose(buf.rewards[:buf.pos], vlm_of_next_observations(rm, buf), rtol=0, atol=1e-5)
    # Both envs end an episode at their 20th step (timestep 40): TensorBoard gets the mean over the two
    # of each episode's summed VLM and ground-truth rewards, at that step, and stage times.
    scalars = tb_scalars(result.run_dir)
    vlm = buf.rewards[:20].astype(np.float64).sum(axis=0).mean()
    gt = (-np.linalg.norm(buf.next_observations[:20].astype(np.float64), axis=-1)).sum(axis=0).mean()
    assert [step for step, _ in scalars["rollout/vlm_return"]] == [40]
    assert scalars["rollout/vlm_return"][0][1] == pytest.approx(vlm, rel=1e-4)
    assert scalars["rollout/gt_return"][0][1] == pytest.approx(gt, rel=1e-4)
    for key in ("time/render_s", "time/reward_s", "time/env_s", "time/steps_per_s"):
        assert all(value > 0 for _, value in scalars[key]), key


@pytest.fixture(scope="module")
def uninterrupted_runs(tmp_path_factory):
    """One uninterrupted 100-step run per train_freq, made on first use."""
    from vlmrm_fast.train import train

    runs = {}

    def run(train_freq: int):
        if train_freq not in runs:
            path = tmp_path_factory.mktemp(f"full{train_freq}")
            config = dot_config(path, total_timesteps=100, train_freq=train_freq)
            runs[train_freq] = train(config, reward_model=tiny_reward(config))
        return runs[train_freq]

    return run


def _assert_same_run(resumed, full) -> None:
    a, b = full.model.replay_buffer, resumed.model.replay_buffer
    assert resumed.num_timesteps == full.num_timesteps and a.pos == b.pos
    # Bit for bit: a deferred rollout cut by a stop is scored whole after the resume, in the batch an
    # uninterrupted run scores it in, and SAC's updates on the CPU are deterministic.
    for name in ("observations", "actions", "rewards", "dones"):
        np.testing.assert_array_equal(getattr(b, name)[:b.pos], getattr(a, name)[:a.pos], err_msg=name)
    assert resumed.model._n_updates == full.model._n_updates
    pa, pb = full.model.policy.state_dict(), resumed.model.policy.state_dict()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=0, atol=0, msg=key)


def test_resume_continues_exactly(tmp_path, uninterrupted_runs):
    """Stop at a checkpoint and resume: the same buffer and policy as one uninterrupted run."""
    from vlmrm_fast.train import train

    half = train(dot_config(tmp_path, total_timesteps=60), reward_model=tiny_reward(dot_config(tmp_path)))
    saved = load_buffer(half.checkpoint)
    resumed = train(dot_config(tmp_path, total_timesteps=100), resume=half.run_dir,
                    reward_model=tiny_reward(dot_config(tmp_path)))
    b = resumed.model.replay_buffer
    np.testing.assert_array_equal(b.observations[:saved.pos], saved.observations[:saved.pos])
    np.testing.assert_array_equal(b.rewards[:saved.pos], saved.rewards[:saved.pos])
    _assert_same_run(resumed, uninterrupted_runs(10))


def test_resume_of_a_replay_buffer_that_wrapped_continues_exactly(tmp_path):
    # buffer_size 50: 25 rows per env, wrapped at step 50 and again mid-rollout; the checkpoint at 80
    # holds a full buffer (pos 15). Loaded as not full, SAC would sample only rows [0, pos).
    from vlmrm_fast.train import train

    def config(path, total):
        return dot_config(path, total_timesteps=total, buffer_size=50)

    full = train(config(tmp_path / "full", 100), reward_model=tiny_reward(config(tmp_path, 100)))
    first = train(config(tmp_path, 80), reward_model=tiny_reward(config(tmp_path, 80)))
    saved = load_buffer(first.checkpoint)
    assert saved.full and saved.pos == 15
    nothing_left = train(config(tmp_path, 80), resume=first.run_dir, reward_model=tiny_reward(config(tmp_path, 80)))
    loaded = nothing_left.model.replay_buffer
    assert (loaded.full, loaded.pos) == (saved.full, saved.pos)
    for name in ("observations", "next_observations", "actions", "rewards", "dones"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(saved, name), err_msg=name)
    resumed = train(config(tmp_path, 100), resume=first.run_dir, reward_model=tiny_reward(config(tmp_path, 100)))
    a, b = full.model.replay_buffer, resumed.model.replay_buffer
    assert a.full and b.full and a.pos == b.pos
    for name in ("observations", "actions", "rewards", "dones"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
    pa, pb = full.model.policy.state_dict(), resumed.model.policy.state_dict()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=0, atol=0, msg=key)


# 2 envs: with train_freq 10, rollouts end at 20, 40, 60, ... timesteps; 54 is mid-rollout, 60 a
# rollout's last step (its gradient steps not yet run), 100 the run's last step. With train_freq 1
# every step is a rollout's last.
@pytest.mark.parametrize("train_freq,stop_at", [(10, 54), (10, 60), (1, 56), (10, 100)],
                         ids=["mid-rollout", "last-step-of-rollout", "train-freq-1", "last-step-of-run"])
def test_signal_then_resume_continues_exactly(tmp_path, monkeypatch, uninterrupted_runs, train_freq, stop_at):
    """A stop signal at any step stops there (with a checkpoint); --resume then gives the same buffer,
    update count and policy as one uninterrupted run."""
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=100, train_freq=train_freq, checkpoint_every=0)
    stopped = train_stopped_at(stop_at, config, monkeypatch)
    assert stopped.stopped_by == "SIGTERM" and stopped.num_timesteps == stop_at
    assert stopped.checkpoint.name == ckpt.step_name(stop_at)
    resumed = train(config, resume=stopped.run_dir, reward_model=tiny_reward(config))
    _assert_same_run(resumed if stop_at < 100 else stopped, uninterrupted_runs(train_freq))


@pytest.mark.parametrize("checkpoint_every,crash_at", [(40, 78), (1000, 70)],
                         ids=["after-its-checkpoint", "before-any-checkpoint"])
def test_tensorboard_hides_what_a_crashed_session_logged_past_where_the_next_one_starts(
        tmp_path, monkeypatch, checkpoint_every, crash_at):
    # Crashed at 78 (checkpoint at 40, rows logged up to 60): the resumed session logs 60 again, and
    # 40 (logged before its checkpoint) must stay. Crashed at 70 before any checkpoint: --resume refuses
    # the folder and says to start a new run there, which logs 20, 40 and 60 again. TensorBoard, reading
    # the folder, must show each step once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlmrm_fast.train import callbacks, train

    on_step = callbacks.TrainingCallback._on_step

    def crash(self):
        if self.model.num_timesteps == crash_at:
            raise MemoryError("simulated out of memory")
        return on_step(self)

    config = dot_config(tmp_path, total_timesteps=100, checkpoint_every=checkpoint_every)
    monkeypatch.setattr(callbacks.TrainingCallback, "_on_step", crash)
    with pytest.raises(MemoryError, match="simulated"):
        train(config, reward_model=tiny_reward(config))
    monkeypatch.setattr(callbacks.TrainingCallback, "_on_step", on_step)
    checkpoint = ckpt.find_latest(Path(config.run_dir))
    if checkpoint_every == 40:
        assert checkpoint.name == ckpt.step_name(40)
        train(config, resume=config.run_dir, reward_model=tiny_reward(config))
    else:
        assert checkpoint is None
        with pytest.warns(UserWarning, match=r"holds an earlier run's logs but no checkpoint to resume .*"
                                             r"kept as tb/superseded/progress\.csv"):
            train(config, reward_model=tiny_reward(config))
    board = EventAccumulator(str(Path(config.run_dir) / "tb"))  # the folder, as TensorBoard loads it
    board.Reload()
    assert [e.step for e in board.Scalars("time/total_timesteps")] == [20, 40, 60, 80, 100]
    assert [e.step for e in board.Scalars("rollout/vlm_return")] == [40, 80]  # episodes of 20 steps x 2 envs
    assert len(list((Path(config.run_dir) / "tb").glob("events.out.tfevents.*"))) == 2  # one per session
    # The CSVs, read in order of their sessions' first steps, show what TensorBoard shows: step 60 of the
    # crashed session was in progress.csv beside the resumed session's 60. Its file as it was is kept.
    tb = Path(config.run_dir) / "tb"
    assert [step for name in csv_files_in_order(tb) for step in csv_steps(tb / name)] == [20, 40, 60, 80, 100]
    assert csv_steps(tb / "superseded" / "progress.csv") == [20, 40, 60]


def test_rows_logged_past_a_resumed_sessions_start_leave_the_csvs_and_are_kept_aside(tmp_path):
    from vlmrm_fast.train.progress_csv import drop_rows_logged_past

    header = "eval/vlm_return,time/total_timesteps,time/steps_per_s\n"
    (tmp_path / "progress.csv").write_text(header + "1.5,,\n,20,9.5\n2.5,,\n,40,9.0\n,60,8.5\n3.5,,\n")
    (tmp_path / "progress-from-40.csv").write_text(header + ",60,7.0\n,80,7.5\n,100,7")  # a last line cut short
    (tmp_path / "progress-from-100.csv").write_text(header + ",120,7.0\n")  # a session after the crash point
    (tmp_path / "notes.csv").write_text(header + ",500,1\n")  # not a session's file
    (tmp_path / "superseded").mkdir()
    (tmp_path / "superseded" / "progress.csv").write_text("an earlier crash's\n")
    kept = drop_rows_logged_past(tmp_path, 80)
    # Cut at the first row past 80; an evaluation's row without a step goes with the rows around it.
    assert (tmp_path / "progress.csv").read_text() == header + "1.5,,\n,20,9.5\n2.5,,\n,40,9.0\n,60,8.5\n3.5,,\n"
    assert (tmp_path / "progress-from-40.csv").read_text() == header + ",60,7.0\n,80,7.5\n"
    assert not (tmp_path / "progress-from-100.csv").exists()  # no row left: the session's file goes
    assert (tmp_path / "notes.csv").read_text() == header + ",500,1\n"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in kept) == [
        "superseded/progress-from-100.csv", "superseded/progress-from-40.csv"]
    assert (tmp_path / "superseded" / "progress-from-40.csv").read_text() == header + ",60,7.0\n,80,7.5\n,100,7"
    kept = drop_rows_logged_past(tmp_path, 30)  # an older checkpoint: the earlier copy of the name stays
    assert (tmp_path / "progress.csv").read_text() == header + "1.5,,\n,20,9.5\n2.5,,\n"
    assert sorted(p.name for p in kept) == ["progress-2.csv", "progress-from-40-2.csv"]
    assert (tmp_path / "superseded" / "progress.csv").read_text() == "an earlier crash's\n"
    assert drop_rows_logged_past(tmp_path, 30) == []  # nothing past 30 now: nothing rewritten


def csv_files_in_order(folder: Path) -> list:
    """The run's CSV files, in the order of their sessions: progress.csv, then progress-from-STEP.csv by STEP."""
    names = [p.name for p in folder.glob("progress*.csv")]
    return sorted(names, key=lambda name: int(name[len("progress-from-"):-4]) if "-from-" in name else 0)


def csv_steps(path: Path) -> list:
    import csv

    with open(path) as f:
        return [int(float(row["time/total_timesteps"])) for row in csv.DictReader(f)]


def _same_fields(a, b) -> bool:
    """Checkpoint ``extra`` dicts equal, nested dicts, lists and tensors (a stop's recorded frames) included."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_fields(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_fields, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return np.array_equal(a, b)


@pytest.mark.parametrize("stop_at,total", [(100, 100), (None, 110)], ids=["last-step", "last-gradient-steps"])
def test_a_run_stopped_before_its_final_evaluation_evaluates_when_resumed(tmp_path, monkeypatch, stop_at, total):
    # A signal on the last env step (or during the last rollout's gradient steps) ends the run with no
    # final evaluation; resumed, with no steps left, it evaluates and records that in its checkpoint,
    # once, every other field kept (at 110 the last rollout is cut to 5 steps: an extension must know).
    from vlmrm_fast.train import callbacks, train
    from vlmrm_fast.train.run import main

    config = dot_config(tmp_path, total_timesteps=total, eval_every=40, checkpoint_every=0)
    if stop_at is not None:
        stopped = train_stopped_at(stop_at, config, monkeypatch)
    else:
        on_rollout_end = callbacks.TrainingCallback._on_rollout_end

        def signal_during_the_last_update(self):
            on_rollout_end(self)
            if self.model.num_timesteps == total:
                self.stop_signal = signal.SIGTERM

        with monkeypatch.context() as patch:
            patch.setattr(callbacks.TrainingCallback, "_on_rollout_end", signal_during_the_last_update)
            stopped = train(config, reward_model=tiny_reward(config))
    assert stopped.stopped_by == "SIGTERM" and stopped.num_timesteps == total
    before = ckpt.load_state(stopped.checkpoint)["extra"]
    assert before["cut_rollout"] == (total == 110)
    videos = Path(config.run_dir) / "videos"
    assert sorted(p.name for p in videos.glob("*.mp4")) == [f"eval_step_{s:012d}.mp4" for s in (40, 80)]
    resumed = train(config, resume=config.run_dir, reward_model=tiny_reward(config))
    assert resumed.stopped_by is None and resumed.steps_this_session == 0 and resumed.evaluated_only
    assert sorted(p.name for p in videos.glob("*.mp4")) == [f"eval_step_{s:012d}.mp4" for s in (40, 80, total)]
    assert [step for step, _ in tb_scalars(Path(config.run_dir))["eval/vlm_return"]] == [40, 80, total]
    assert resumed.checkpoint.name == ckpt.step_name(total)
    assert _same_fields(ckpt.load_state(resumed.checkpoint)["extra"], dict(before, last_eval_step=total))
    (videos / f"eval_step_{total:012d}.mp4").unlink()
    assert main(["--resume", config.run_dir]) == 0  # the checkpoint recorded it: nothing to do
    assert not (videos / f"eval_step_{total:012d}.mp4").exists()


def test_a_signal_before_the_missed_final_evaluation_leaves_it_missing(tmp_path, monkeypatch):
    # Stopped again before that evaluation starts: the checkpoint must not record an evaluation that
    # did not run, so the next resume still makes it.
    from vlmrm_fast.train import callbacks, train

    config = dot_config(tmp_path, total_timesteps=100, eval_every=40, checkpoint_every=0)
    stopped = train_stopped_at(100, config, monkeypatch)
    before = ckpt.load_state(stopped.checkpoint)["extra"]
    on_training_start = callbacks.TrainingCallback._on_training_start

    def signal_at_start(self):
        on_training_start(self)
        self.stop_signal = signal.SIGTERM

    with monkeypatch.context() as patch:
        patch.setattr(callbacks.TrainingCallback, "_on_training_start", signal_at_start)
        again = train(config, resume=config.run_dir, reward_model=tiny_reward(config))
    assert again.stopped_by == "SIGTERM"
    assert _same_fields(ckpt.load_state(ckpt.find_latest(Path(config.run_dir)))["extra"], before)
    assert train(config, resume=config.run_dir, reward_model=tiny_reward(config)).evaluated_only


def test_a_stop_inside_a_rollout_that_total_timesteps_is_lowered_to_is_not_taken_for_the_end(tmp_path, monkeypatch,
                                                                                              uninterrupted_runs):
    # Stopped at 50, inside the rollout 40-60, and resumed with total_timesteps=50: no steps left, but no
    # end of a run either. Its checkpoint must stay as it is, so that extending it to 100 finishes that
    # rollout and gives the uninterrupted run.
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=100, eval_every=40, checkpoint_every=0)
    stopped = train_stopped_at(50, config, monkeypatch)
    before = ckpt.load_state(stopped.checkpoint)["extra"]
    assert before["rollout_steps_done"] > 0
    at_50 = train(dataclasses.replace(config, total_timesteps=50), resume=config.run_dir,
                  reward_model=tiny_reward(config))
    assert at_50.steps_this_session == 0 and not at_50.evaluated_only
    assert _same_fields(ckpt.load_state(ckpt.find_latest(Path(config.run_dir)))["extra"], before)
    resumed = train(config, resume=config.run_dir, reward_model=tiny_reward(config))
    _assert_same_run(resumed, uninterrupted_runs(10))


def _record_evaluations_and_checkpoints(monkeypatch) -> list:
    """("eval" | "save", step) for every evaluation and checkpoint from here on, in order."""
    from vlmrm_fast.train import callbacks

    events = []
    evaluate, save = callbacks.TrainingCallback.evaluate, callbacks.TrainingCallback.save
    monkeypatch.setattr(callbacks.TrainingCallback, "evaluate",
                        lambda self: (events.append(("eval", self.model.num_timesteps)), evaluate(self))[1])
    monkeypatch.setattr(callbacks.TrainingCallback, "save",
                        lambda self, mid_rollout=False: (events.append(("save", self.model.num_timesteps)),
                                                         save(self, mid_rollout))[1])
    return events


def test_a_run_resumed_mid_rollout_evaluates_and_checkpoints_on_the_uninterrupted_schedule(tmp_path, monkeypatch):
    # Rollouts of 20 steps (2 envs x 10); evaluations and checkpoints every 30 fall at the first
    # boundary past each multiple (40, 60; not 40, 80: the schedule does not drift) and the end. Stopped
    # at 54, the resumed run's first (partial) rollout starts at 54, not on a boundary: the evaluation
    # and checkpoint due at 60 stay there.
    from vlmrm_fast.train import train

    events = _record_evaluations_and_checkpoints(monkeypatch)

    def config_in(folder):
        return dot_config(folder, total_timesteps=100, eval_every=30, checkpoint_every=30, eval_episodes=1)

    train(config_in(tmp_path / "full"), reward_model=tiny_reward(config_in(tmp_path)))
    uninterrupted, events[:] = list(events), []
    assert uninterrupted == [("eval", 40), ("save", 40), ("eval", 60), ("save", 60), ("eval", 100), ("save", 100)]

    config = config_in(tmp_path / "stopped")
    assert train_stopped_at(54, config, monkeypatch).num_timesteps == 54
    train(config, resume=config.run_dir, reward_model=tiny_reward(config))
    assert events == uninterrupted[:2] + [("save", 54)] + uninterrupted[2:]


# --------------------------------------------------------------------------- signals and crashes


def _spawn(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]))
    args = ["--preset", "smoke", "--env-id", DOT_ID, "--render-width", "32", "--render-height", "32",
            "--episode-length", "20", "--train-freq", "10", "--gradient-steps", "2", "--learning-starts", "20",
            "--batch-size", "16", "--buffer-size", "20000", "--checkpoint-every", "20", "--total-timesteps", "20000",
            "--run-dir", str(run_dir), *extra]
    return subprocess.Popen([sys.executable, "-m", "vlmrm_fast.train.run", *args], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, min_step: int = 40, timeout: float = 90) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = ckpt.find_latest(run_dir)
        if found is not None and ckpt.read_meta(found)["step"] >= min_step:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no checkpoint in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["sigterm", "sigint", "sigkill"])
def test_killed_run_resumes_from_last_checkpoint(tmp_path, sig):
    from vlmrm_fast.train.command import config_from_args
    from vlmrm_fast.train.run import train

    run_dir = tmp_path / "run"
    proc = _spawn(run_dir)
    _wait_for_checkpoint(proc, run_dir)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    found = ckpt.find_latest(run_dir)
    step = ckpt.read_meta(found)["step"]
    if sig in (signal.SIGTERM, signal.SIGINT):  # a checkpoint, then the shell's exit codes 128 + signal
        assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], out
        assert "continue with: vlmrm-fast train --resume" in out
        train_freq = json.loads((found / "config.json").read_text())["train_freq"]
        assert 0 <= ckpt.load_state(found)["extra"]["rollout_steps_done"] < train_freq
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")] or sig == signal.SIGKILL
    saved, saved_extra = load_buffer(found), ckpt.load_state(found)["extra"]
    assert saved.pos * 2 == step  # every stored transition is a step (2 envs), no more, no less
    total = step + 40
    import argparse

    args = argparse.Namespace(set=[f"total_timesteps={total}"], preset=None, config=None, resume=run_dir,
                              print_config=False, **{f"field_{k}": None for k in TrainConfig.__dataclass_fields__})
    config, resume = config_from_args(args)
    assert config.n_envs == 2 and config.total_timesteps == total
    result = train(config, resume=resume)
    assert result.num_timesteps == total
    buf = result.model.replay_buffer
    assert buf.pos * 2 == total
    # A stop inside a rollout leaves its steps' rewards to the resumed run (scored with the whole
    # rollout); they hold the placeholder (0, mode "replace") in the checkpoint's buffer until then.
    pending = saved_extra["deferred_pending"]
    unscored = pending["slots"] if pending else []
    scored = np.setdiff1d(np.arange(saved.pos), unscored)
    assert len(unscored) == saved_extra["rollout_steps_done"]
    for name in ("observations", "actions"):
        np.testing.assert_array_equal(getattr(buf, name)[:saved.pos], getattr(saved, name)[:saved.pos])
    np.testing.assert_array_equal(buf.rewards[scored], saved.rewards[scored])
    assert np.all(saved.rewards[unscored] == 0) and np.all(buf.rewards[unscored] != 0)
    assert not np.any(buf.rewards[:buf.pos] == 0)


def test_a_second_process_in_a_run_folder_is_refused_and_the_first_keeps_its_checkpoints(tmp_path):
    # A requeued job starting while its first copy still trains would clear that copy's half-written
    # checkpoint and prune its checkpoints; it is refused instead, naming the holder.

    from vlmrm_fast.train.command import config_from_args
    from vlmrm_fast.train.run import train
    from vlmrm_fast.train.run_lock import RunFolderBusy

    run_dir = tmp_path / "run"
    proc = _spawn(run_dir)
    try:
        _wait_for_checkpoint(proc, run_dir, min_step=20)
        half_written = run_dir / "checkpoints" / ".tmp-step_000000999999-1-cafe"
        half_written.mkdir()
        args = _resume_args(run_dir)
        config, resume = config_from_args(args)  # reads (--print-config works beside a run), clears nothing
        assert resume == run_dir and half_written.is_dir()
        with pytest.raises(RunFolderBusy, match=rf"in use by another training process \(pid {proc.pid} on .*--run-dir"):
            train(config, resume=run_dir)
        config = dot_config(tmp_path)
        with pytest.raises(RunFolderBusy, match=f"pid {proc.pid}"):
            train(config)  # a new run into the same folder
        assert half_written.is_dir()  # nobody cleared the holder's work
        half_written.rmdir()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, out
    step = ckpt.read_meta(ckpt.find_latest(run_dir))["step"]
    result = train(dataclasses.replace(config_from_args(args)[0], total_timesteps=step + 20),
                   resume=run_dir)  # the lock went with its process
    assert result.num_timesteps == step + 20


def _resume_args(run_dir: Path, *overrides: str):
    import argparse

    return argparse.Namespace(set=list(overrides), preset=None, config=None, resume=run_dir, print_config=False,
                              **{f"field_{k}": None for k in TrainConfig.__dataclass_fields__})


def test_a_filesystem_without_flock_warns_once_and_trains_unlocked(tmp_path, monkeypatch):
    import errno

    from vlmrm_fast.train import run_lock
    from vlmrm_fast.train.command import config_from_args
    from vlmrm_fast.train.run import train

    first = train(dot_config(tmp_path, total_timesteps=40), reward_model=tiny_reward(dot_config(tmp_path)))

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, resume = config_from_args(_resume_args(first.run_dir, "total_timesteps=60"))
        result = train(config, resume=resume, reward_model=tiny_reward(config))
    assert result.num_timesteps == 60
    said = [str(w.message) for w in caught if "cannot lock run folder" in str(w.message)]
    assert len(said) == 1 and "no other process trains in it" in said[0], said


def test_resume_reads_a_run_folder_it_cannot_write(tmp_path, monkeypatch):
    # --print-config of someone else's run, or of one on a read-only mount: the lock file cannot be
    # made, and the config is read all the same.
    import errno

    from vlmrm_fast.train import run_lock
    from vlmrm_fast.train.command import config_from_args
    from vlmrm_fast.train.run import train

    first = train(dot_config(tmp_path, total_timesteps=40), reward_model=tiny_reward(dot_config(tmp_path)))
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(run_lock.LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_lock.os, "open", read_only)
    config, resume = config_from_args(_resume_args(first.run_dir))
    assert resume == first.run_dir and config.total_timesteps == 40


def test_resuming_a_folder_that_does_not_exist_creates_nothing(tmp_path):
    from vlmrm_fast.train.run import train

    with pytest.raises(FileNotFoundError, match="no run folder .* check the path"):
        train(dot_config(tmp_path), resume=tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_resuming_through_a_link_to_a_missing_disk_names_the_link(tmp_path):
    # --resume runs/x with runs -> /scratch/runs on a node where /scratch is not mounted: "check the path" alone
    # sends the user looking for a typo; the link and its target are named.
    from vlmrm_fast.train.run import train

    (tmp_path / "runs").symlink_to(tmp_path / "scratch" / "runs")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"no run folder '{tmp_path / 'runs' / 'x'}' to resume ('{tmp_path / 'runs'}' is a symbolic link to "
            f"'{tmp_path / 'scratch' / 'runs'}', which does not exist); make it (is its disk mounted?)")):
        train(dot_config(tmp_path), resume=tmp_path / "runs" / "x")
    assert not (tmp_path / "scratch").exists()


def test_env_state_leaves_out_wall_clock_times():
    # Episode times after a resume count from the new process, not across the downtime.
    from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

    venv = VecMonitor(DummyVecEnv([lambda: gym.wrappers.RecordEpisodeStatistics(DotEnv())]))
    venv.reset()
    venv.step(np.zeros((1, 2), dtype=np.float32))
    state = ckpt.env_state(venv)
    assert "t_start" not in state["wrappers"][0] and "episode_returns" in state["wrappers"][0]
    layers = state["envs"][0]["layers"]
    # gymnasium 1.x names the single-env wrapper's start time in the singular (the vector one's in the plural).
    clock = "episode_start_time" if hasattr(gym.wrappers.RecordEpisodeStatistics(DotEnv()), "episode_start_time") \
        else "episode_start_times"
    assert all(clock not in layer for layer in layers)
    assert any("episode_returns" in layer for layer in layers)


def _humanoid_venv():
    """A DummyVecEnv of one textured humanoid (episodes of 50 steps), seeded 0 and reset."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    import vlmrm_fast.envs  # noqa: F401  (registers it)

    env = DummyVecEnv([lambda: gym.make("vlmrm_fast/TexturedHumanoid-v0", max_episode_steps=50)])
    env.seed(0)
    env.reset()
    return env


def test_humanoid_env_state_restores_the_next_reward_exactly():
    # The humanoid's reward reads body positions its previous step left behind (x-velocity from
    # xipos): a restored env must give the same next rewards, not only the same physics.

    def rollout(venv, actions):
        return [venv.step(action)[:2] for action in actions]

    actions = np.random.default_rng(0).uniform(-0.4, 0.4, (8, 1, 17)).astype(np.float32)
    running = _humanoid_venv()
    rollout(running, actions[:5])
    state = ckpt.env_state(running)
    restored = _humanoid_venv()
    assert ckpt.set_env_state(restored, state)
    want, got = rollout(running, actions[5:]), rollout(restored, actions[5:])
    for (obs, reward), (obs_restored, reward_restored) in zip(want, got):
        np.testing.assert_array_equal(obs_restored, obs)
        np.testing.assert_array_equal(reward_restored, reward)
    # Without the saved MjData (a checkpoint from another MuJoCo version): the physics still continues
    # exactly from the integration state.
    for entry in state["envs"]:
        entry["mujoco_data"] = None
    fallback = _humanoid_venv()
    assert ckpt.set_env_state(fallback, state)
    for (obs, _), (obs_fallback, _) in zip(want, rollout(fallback, actions[5:])):
        np.testing.assert_array_equal(obs_fallback, obs)


def test_resume_without_env_state_restarts_episode_sums(tmp_path, monkeypatch):
    # Envs that cannot be restored are reset: their episodes restart, and so do the return sums.
    from vlmrm_fast.train import train
    from vlmrm_fast.train.run import _load_checkpoint, build_vec_env

    config = dot_config(tmp_path, total_timesteps=50, episode_length=30)
    rm = tiny_reward(config)
    path = ckpt.find_latest(train(config, reward_model=rm).run_dir)
    saved = ckpt.load_state(path)["extra"]
    assert np.any(saved["ep_vlm"] != 0)  # episodes were in progress at the checkpoint
    env = build_vec_env(config, rm, 32, 32)
    _, extra = _load_checkpoint(path, env, config)
    np.testing.assert_array_equal(extra["ep_vlm"], saved["ep_vlm"])  # restored: the sums go on
    monkeypatch.setattr(ckpt, "set_env_state", lambda venv, state: False)
    with pytest.warns(UserWarning, match="episodes in progress restart"):
        _, extra = _load_checkpoint(path, env, config)
    assert extra["episodes_restarted"] and extra["step"] == saved["step"]


def test_episodes_restarted_by_a_resume_after_a_stop_inside_a_rollout_log_their_own_returns(tmp_path, monkeypatch):
    # Stopped at 44, inside the rollout 40-60, with 2 vector steps recorded and unscored; the resume cannot
    # restore the envs and resets them. Those 2 steps belong to the old episodes: the new ones (20 steps,
    # reward 1 a frame) must log 20, not 22.
    from vlmrm_fast.train import train

    def one_a_frame(frames):
        return np.ones(len(frames))

    config = dot_config(tmp_path, total_timesteps=100, checkpoint_every=0, eval_every=0)
    stopped = train_stopped_at(44, config, monkeypatch, reward_model=one_a_frame)
    assert len(ckpt.load_state(stopped.checkpoint)["extra"]["deferred_pending"]["slots"]) == 2
    monkeypatch.setattr(ckpt, "set_env_state", lambda venv, state: False)  # another MuJoCo version, say
    with pytest.warns(UserWarning, match="episodes in progress restart"):
        train(config, resume=stopped.run_dir, reward_model=one_a_frame)
    assert tb_scalars(stopped.run_dir)["rollout/vlm_return"] == [(40, 20.0), (100, 20.0)]


def test_the_schedule_stays_on_the_multiples_of_its_interval():
    # The paper's run: rollouts of 3,200 steps (32 envs x 100), an evaluation every 100k over 10M steps.
    # One at the first boundary past each multiple: 100 of them (counting from the last one drifted to 97).
    from vlmrm_fast.train.callbacks import _due

    last, at = 0, []
    for step in range(3_200, 10_000_001, 3_200):
        if _due(step, last, 100_000):
            last = step
            at.append(step)
    assert len(at) == 100 and at[0] == 102_400 and at[-1] == 10_000_000  # the last: the run's end
    assert all(step - 3_200 < k * 100_000 <= step for k, step in enumerate(at, 1))
    assert not _due(5_000, 0, 0)  # 0: never


def test_checkpoint_records_the_evaluation_of_its_own_step(tmp_path):
    # Evaluation and checkpoint due at the same step: the checkpoint knows the evaluation was done,
    # so a run resumed from it does not evaluate (and log) that step twice.
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=60, checkpoint_every=40, eval_every=40)
    run_dir = train(config, reward_model=tiny_reward(config)).run_dir
    assert ckpt.load_state(run_dir / "checkpoints" / ckpt.step_name(40))["extra"]["last_eval_step"] == 40
    # The run's final evaluation too: extended from its last checkpoint, the run evaluates at 80 (the
    # next multiple of 40) and at its end, not at 60 again.
    assert ckpt.load_state(run_dir / "checkpoints" / ckpt.step_name(60))["extra"]["last_eval_step"] == 60
    train(dot_config(tmp_path, total_timesteps=100, checkpoint_every=40, eval_every=40), resume=run_dir,
          reward_model=tiny_reward(config))
    assert [step for step, _ in tb_scalars(run_dir)["eval/gt_return"]] == [40, 60, 80, 100]


def test_a_signal_during_the_final_checkpoint_lets_it_finish(tmp_path, monkeypatch):
    # The run's last checkpoint is written after learn() returns; a SIGTERM then (a job scheduler's
    # time limit) must stop the run after that write, not kill it with the write half done.
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=0)
    real_save, handlers = ckpt.save_checkpoint, []

    def save_while_signalled(run_dir, model, *args, **kwargs):
        handler = signal.getsignal(signal.SIGTERM)
        handlers.append(handler)
        if type(getattr(handler, "__self__", None)).__name__ == "TrainingCallback":  # else it would kill pytest
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(run_dir, model, *args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(ckpt, "save_checkpoint", save_while_signalled)
    result = train(config, reward_model=tiny_reward(config))
    assert len(handlers) == 1 and type(getattr(handlers[0], "__self__", None)).__name__ == "TrainingCallback"
    assert result.stopped_by == "SIGTERM" and result.num_timesteps == 40
    assert result.checkpoint.name == ckpt.step_name(40) and ckpt.is_complete(result.checkpoint)
    assert signal.getsignal(signal.SIGTERM) == before  # and Ctrl-C / SIGTERM behave as before afterwards


def test_a_failing_final_evaluation_still_leaves_the_final_checkpoint(tmp_path, monkeypatch):
    from vlmrm_fast.train import callbacks, train

    def broken(*args, **kwargs):
        raise ValueError("evaluation broke (simulated)")

    monkeypatch.setattr(callbacks, "evaluate_policy_video", broken)
    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=0, eval_every=40)
    with pytest.raises(ValueError, match="simulated"):
        train(config, reward_model=tiny_reward(config))
    assert ckpt.find_latest(tmp_path / "run").name == ckpt.step_name(40)


@pytest.mark.parametrize("fails", [False, True])
def test_train_closes_its_log_files_and_the_model_logs_nowhere_after(tmp_path, monkeypatch, fails):
    """A sweep of train() calls in one process must not keep a CSV file and a TensorBoard writer
    thread per run open, also when the run raised; the returned model's logger takes further writes."""
    from vlmrm_fast.train import callbacks, run, train

    loggers = []
    make_logger = run.make_logger
    monkeypatch.setattr(run, "make_logger", lambda *a: loggers.append(make_logger(*a)) or loggers[-1])
    if fails:
        def broken(*args, **kwargs):
            raise ValueError("evaluation broke (simulated)")

        monkeypatch.setattr(callbacks, "evaluate_policy_video", broken)
    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=0, eval_every=40 if fails else 0)
    if fails:
        with pytest.raises(ValueError, match="simulated"):
            train(config, reward_model=tiny_reward(config))
    else:
        result = train(config, reward_model=tiny_reward(config))
        result.model.logger.record("extra", 1.0)
        result.model.logger.dump(41)  # a further learn() logs: no "closed file" error
        assert result.model.logger is not loggers[0]
        assert "time/reward_s" in tb_tags(tmp_path / "run")  # what was logged reached the file
    csv, board = loggers[0].output_formats
    assert csv.file.closed and board.writer.all_writers is None


def test_a_learn_of_its_own_after_a_deferred_run_is_refused_before_a_reward_reaches_the_buffer(tmp_path):
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=0, eval_every=0)
    assert config.reward_timing == "deferred"
    result = train(config, reward_model=tiny_reward(config))
    buffer = result.model.replay_buffer
    pos, rewards = buffer.pos, buffer.rewards.copy()
    with pytest.raises(RuntimeError, match="deferred-reward env is closed.*--resume RUN_DIR.*reward_timing='step'"):
        result.model.learn(20, reset_num_timesteps=False)
    assert buffer.pos == pos and np.array_equal(buffer.rewards, rewards)
    # With per-step rewards, nothing is left to score after learn(): a learn() of its own goes on.
    step = train(dot_config(tmp_path, total_timesteps=40, checkpoint_every=0, eval_every=0, reward_timing="step",
                            run_dir=str(tmp_path / "step")), reward_model=tiny_reward(config))
    step.model.learn(20, reset_num_timesteps=False)
    assert step.model.num_timesteps == 60 and np.count_nonzero(step.model.replay_buffer.rewards[40 // 2:60 // 2])


@pytest.mark.parametrize("failing", ["SAC", "TrainingCallback"])
def test_a_set_up_that_fails_after_the_envs_are_open_closes_them(tmp_path, monkeypatch, failing):
    """The envs are built before the SAC model and the callback: when either fails (a checkpoint SB3 cannot
    load into these envs, a CUDA device out of memory, Ctrl-C), the envs' subprocess workers and renderers
    are closed, and the run's log files, not left to the garbage collector in a notebook's sweep."""
    import stable_baselines3

    from vlmrm_fast.train import callbacks, run, train

    closed, loggers = [], []
    build, make_logger = run.build_vec_env, run.make_logger

    def recorded(*args, **kwargs):
        env = build(*args, **kwargs)
        close = env.close
        env.close = lambda: closed.append(True) or close()
        return env

    def broken(*args, **kwargs):
        raise MemoryError(f"{failing} broke (simulated)")

    monkeypatch.setattr(run, "build_vec_env", recorded)
    monkeypatch.setattr(run, "make_logger", lambda *a: loggers.append(make_logger(*a)) or loggers[-1])
    monkeypatch.setattr(stable_baselines3 if failing == "SAC" else callbacks, failing, broken)
    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=0, eval_every=0)
    with pytest.raises(MemoryError, match="simulated"):
        train(config, reward_model=tiny_reward(config))
    assert closed == [True]
    if failing == "TrainingCallback":  # the logger came before it
        csv, board = loggers[0].output_formats
        assert csv.file.closed and board.writer.all_writers is None
    else:
        assert loggers == []


def test_train_frees_the_rollout_frame_buffer(tmp_path):
    """The returned model keeps its (closed) env: the deferred recorder's frames (train_freq x n_envs frames on
    the reward device, 480 MB for the kneeling preset) must not stay allocated with it."""
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=0, eval_every=0)
    result = train(config, reward_model=tiny_reward(config))
    assert result.model.get_env().frames is None


@pytest.mark.parametrize("timing", ["deferred", "step"])
def test_each_rows_sac_update_time_is_its_own_rollouts(tmp_path, monkeypatch, timing):
    # SAC's gradient steps follow a rollout; its row waits for them, so that every rollout's update
    # time is in the row of its own step, the last one included. Each update phase sleeps 100 ms and
    # its own duration is recorded (on a loaded machine the gradient steps alone can take a second).
    from stable_baselines3 import SAC

    from vlmrm_fast.train import train

    real_train, pause, durations = SAC.train, 0.1, []

    def slow_train(self, *args, **kwargs):
        start = time.perf_counter()
        time.sleep(pause)
        result = real_train(self, *args, **kwargs)
        durations.append(time.perf_counter() - start)
        return result

    monkeypatch.setattr(SAC, "train", slow_train)
    config = dot_config(tmp_path, total_timesteps=60, train_freq=10, learning_starts=0, checkpoint_every=0,
                        eval_every=0, reward_timing=timing)  # 2 envs: rollouts of 20 steps
    updates = tb_scalars(train(config, reward_model=tiny_reward(config)).run_dir)["time/sac_update_s"]
    assert [step for step, _ in updates] == [20, 40, 60] and len(durations) == 3
    # Each row holds its own rollout's update (plus SB3's few statements around it), not the next
    # rollout's (0 in the first row) nor a running total (another whole update, >= pause, in the later rows).
    assert all(own - 1e-3 <= seconds < own + 0.9 * pause for (_, seconds), own in zip(updates, durations)), (
        updates, durations)


def test_a_stops_checkpoint_time_includes_copying_the_rollouts_frames_out(tmp_path, monkeypatch):
    # A stop inside a deferred rollout writes the rollout's frames so far into its checkpoint: copying them
    # off the reward device (up to a rollout's, 480 MB for the kneeling preset) is part of the checkpoint's
    # time, and so left out of time/train_steps_per_s, not counted as training. Here the copy sleeps 300 ms.
    from vlmrm_fast.train.deferred import DeferredRewardRecorder

    real_pending, pause = DeferredRewardRecorder.pending, 0.3

    def slow_pending(self):
        time.sleep(pause)
        return real_pending(self)

    monkeypatch.setattr(DeferredRewardRecorder, "pending", slow_pending)
    config = dot_config(tmp_path, total_timesteps=60, checkpoint_every=0, eval_every=0)  # rollouts of 20 steps
    stopped = train_stopped_at(54, config, monkeypatch)
    assert stopped.num_timesteps == 54
    [(step, seconds)] = [point for point in tb_scalars(stopped.run_dir)["time/checkpoint_s"] if point[0] == 54]
    assert seconds >= pause, seconds


def test_tensorboard_rows_keep_to_the_multiples_of_log_every(tmp_path):
    # Rollouts of 20 steps (2 envs x train_freq 10), log_every=50: a row at the first rollout boundary
    # past each multiple of 50 (60, 100, 160) and the run's tail (200), not every 60 steps of drift
    # (60, 120, 180), which would put a resumed run's rows elsewhere than the uninterrupted run's.
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=200, log_every=50, checkpoint_every=0)
    got = tb_scalars(train(config, reward_model=tiny_reward(config)).run_dir)
    assert [step for step, _ in got["time/steps_per_s"]] == [60, 100, 160, 200]


@pytest.mark.parametrize("timing", ["deferred", "step"])
def test_every_episode_and_the_runs_tail_reach_tensorboard_across_a_stop(tmp_path, monkeypatch, timing):
    # log_every=60 over 100 steps (2 envs, episodes of 20 steps end at 40 and 80): the steps after the
    # last interval are logged when the run ends, and the episodes that ended before a stop at 54 are
    # logged before it stops; a resumed run then logs what the uninterrupted one does.
    from vlmrm_fast.train import train

    def config_in(folder):
        return dot_config(folder, total_timesteps=100, log_every=60, checkpoint_every=0, reward_timing=timing)

    full = tb_scalars(train(config_in(tmp_path / "full"), reward_model=tiny_reward(config_in(tmp_path))).run_dir)
    assert [step for step, _ in full["time/steps_per_s"]] == [60, 100]
    assert [step for step, _ in full["rollout/vlm_return"]] == [60, 100]

    config = config_in(tmp_path / "stopped")
    stopped = train_stopped_at(54, config, monkeypatch)
    assert stopped.num_timesteps == 54
    train(config, resume=stopped.run_dir, reward_model=tiny_reward(config))
    got = tb_scalars(stopped.run_dir)
    for tag in ("rollout/vlm_return", "rollout/gt_return"):
        assert [step for step, _ in got[tag]] == [54, 100], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in full[tag]], rel=1e-5), tag


def test_a_resume_restores_the_env_wrappers_state_under_sbs_image_transpose(tmp_path, monkeypatch):
    # Image observations: SB3 puts a VecTransposeImage over the run's env, and the checkpoint saves the chain
    # from there. Restored from the run's env instead, each wrapper got the state of the one above it, and
    # the episode under way at the stop (ending at step 60) logged only its steps after the resume.
    from vlmrm_fast.train import train

    def config_in(folder):
        return dot_config(folder, env_id="test_train:VlmrmTestPixelDot-v0", total_timesteps=60, episode_length=30,
                          checkpoint_every=0, reward_timing="step")

    full = train(config_in(tmp_path / "full"), reward_model=tiny_reward(config_in(tmp_path)))
    assert type(full.model.get_env()).__name__ == "VecTransposeImage"
    config = config_in(tmp_path / "stopped")
    stopped = train_stopped_at(54, config, monkeypatch)
    train(config, resume=stopped.run_dir, reward_model=tiny_reward(config))
    want, got = tb_scalars(full.run_dir), tb_scalars(stopped.run_dir)
    for tag in ("rollout/vlm_return", "rollout/gt_return"):
        assert [step for step, _ in got[tag]] == [step for step, _ in want[tag]] == [60], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-5), tag


def test_a_run_resumed_after_a_crash_logs_the_episodes_its_checkpoint_had_not_logged(tmp_path, monkeypatch):
    # log_every=100, checkpoints every 40, episodes of 10 steps (2 envs): the episodes ending by step 40
    # are in the checkpoint's pending rows, not yet in TensorBoard, when the process dies at step 78.
    # The resumed run logs them in the row at 100, as the uninterrupted run does.
    from vlmrm_fast.train import callbacks, train

    def config_in(folder):
        return dot_config(folder, total_timesteps=120, checkpoint_every=40, log_every=100, episode_length=10)

    full = tb_scalars(train(config_in(tmp_path / "full"), reward_model=tiny_reward(config_in(tmp_path))).run_dir)
    config = config_in(tmp_path / "crashed")
    on_step = callbacks.TrainingCallback._on_step

    def crash_at_78(self):
        if self.model.num_timesteps == 78:
            raise RuntimeError("the node went down")
        return on_step(self)

    monkeypatch.setattr(callbacks.TrainingCallback, "_on_step", crash_at_78)
    with pytest.raises(RuntimeError, match="went down"):
        train(config, reward_model=tiny_reward(config))
    monkeypatch.setattr(callbacks.TrainingCallback, "_on_step", on_step)
    assert ckpt.read_meta(ckpt.find_latest(Path(config.run_dir)))["step"] == 40
    train(config, resume=Path(config.run_dir), reward_model=tiny_reward(config))
    got = tb_scalars(Path(config.run_dir))
    for tag in ("rollout/vlm_return", "rollout/gt_return"):
        assert [step for step, _ in got[tag]] == [step for step, _ in full[tag]] == [100, 120], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in full[tag]], rel=1e-5), tag


def test_extending_a_run_that_ended_inside_a_rollout_warns(tmp_path, monkeypatch):
    # 2 envs x train_freq 10: rollouts of 20 steps. A run to 90 cut its last rollout short (and trained
    # on it), so its extension to 140 is not the run to 140: said when it is extended. The extension's
    # own checkpoints (130, off the rollout grid since) resume exactly after a crash and say nothing;
    # nor do runs ending on a rollout boundary.
    from vlmrm_fast.train import callbacks, train

    cut = dot_config(tmp_path / "cut", total_timesteps=90)
    train(cut, reward_model=tiny_reward(cut))
    on_step = callbacks.TrainingCallback._on_step

    def crash_at_134(self):
        if self.model.num_timesteps == 134:
            raise RuntimeError("the node went down")
        return on_step(self)

    longer = dataclasses.replace(cut, total_timesteps=140)
    monkeypatch.setattr(callbacks.TrainingCallback, "_on_step", crash_at_134)
    with pytest.warns(UserWarning, match=r"ended at step 90, inside a rollout of 20 steps.*10 steps off.*to 140"):
        with pytest.raises(RuntimeError, match="went down"):
            train(longer, resume=Path(cut.run_dir), reward_model=tiny_reward(cut))
    monkeypatch.setattr(callbacks.TrainingCallback, "_on_step", on_step)
    assert ckpt.read_meta(ckpt.find_latest(Path(cut.run_dir)))["step"] == 130
    whole = dot_config(tmp_path / "whole", total_timesteps=80)
    train(whole, reward_model=tiny_reward(whole))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*inside a rollout.*")
        train(longer, resume=Path(cut.run_dir), reward_model=tiny_reward(cut))
        train(dataclasses.replace(whole, total_timesteps=120), resume=Path(whole.run_dir), reward_model=tiny_reward(whole))


def test_crash_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    from vlmrm_fast.train import train

    result = train(dot_config(tmp_path, total_timesteps=40), reward_model=tiny_reward(dot_config(tmp_path)))
    good = ckpt.find_latest(result.run_dir)
    original = ckpt._write_files

    def half_then_crash(folder, model, config_json, extra):
        (folder / "config.json").write_text(config_json)
        model.save(folder / "model.zip")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_write_files", half_then_crash)
    result.model.num_timesteps += 2
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(result.run_dir, result.model, "{}", {})
    root = result.run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == good.name
    assert ckpt.find_latest(result.run_dir) == good
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    # A half-written folder under a final name (e.g. copied by hand) is never picked up either.
    monkeypatch.setattr(ckpt, "_write_files", original)
    fake = root / ckpt.step_name(10_000)
    fake.mkdir()
    (fake / "model.zip").write_bytes(b"partial")
    (root / "latest").write_text(fake.name)
    with pytest.warns(UserWarning, match="incomplete"):
        assert ckpt.find_latest(result.run_dir) == good


def test_interrupted_overwrite_and_stale_pointer_recover_the_newest_checkpoint(tmp_path, monkeypatch):
    from vlmrm_fast.train import train

    result = train(dot_config(tmp_path, total_timesteps=40, checkpoint_every=20), reward_model=tiny_reward(dot_config(tmp_path)))
    root = result.run_dir / "checkpoints"
    newest = ckpt.find_latest(result.run_dir)
    older = sorted(p for p in root.glob(ckpt.PREFIX + "*") if p != newest)[-1]
    # A crash after ``latest`` was written for the older one but before it moved on: the newest wins.
    (root / "latest").write_text(older.name)
    assert ckpt.find_latest(result.run_dir) == newest
    # A crash between the two renames of a same-step overwrite: the complete old folder comes back.
    os.rename(newest, root / f".old-{newest.name}-0123abcd")
    ckpt.clean_stale(result.run_dir)
    assert ckpt.is_complete(newest) and ckpt.find_latest(result.run_dir) == newest
    # --resume puts it back before choosing the checkpoint to continue from, not after.
    import argparse

    from vlmrm_fast.train.command import config_from_args
    from vlmrm_fast.train.run import _resume_checkpoint

    os.rename(newest, root / f".old-{newest.name}-0123abcd")
    args = argparse.Namespace(set=[], preset=None, config=None, resume=result.run_dir, print_config=False,
                              **{f"field_{k}": None for k in TrainConfig.__dataclass_fields__})
    config_from_args(args)
    assert ckpt.find_latest(result.run_dir) == newest
    chosen = []
    monkeypatch.setattr("vlmrm_fast.train.run._resume_checkpoint", lambda *a: chosen.append(_resume_checkpoint(*a)) or chosen[-1])
    os.rename(newest, root / f".old-{newest.name}-0123abcd")
    train(dot_config(tmp_path, total_timesteps=40, checkpoint_every=20), resume=result.run_dir,
          reward_model=tiny_reward(dot_config(tmp_path)))
    assert chosen == [newest]


def test_a_kill_while_pruning_old_checkpoints_leaves_nothing_behind(tmp_path, monkeypatch):
    # keep_checkpoints=2: the third checkpoint deletes the first. Killed half-way through that
    # deletion, the run leaves no half-deleted checkpoint folder once cleaned up.
    from vlmrm_fast.train import train

    real_rmtree = ckpt.shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if ckpt.PREFIX.strip("_") in Path(path).name and not Path(path).name.startswith(".tmp-"):
            (Path(path) / "meta.json").unlink()
            raise KeyboardInterrupt("killed while deleting (simulated)")
        return real_rmtree(path, *args, **kwargs)

    config = dot_config(tmp_path, total_timesteps=60, checkpoint_every=20, keep_checkpoints=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt, match="simulated"):
        train(config, reward_model=tiny_reward(config))
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    root = tmp_path / "run" / "checkpoints"
    ckpt.clean_stale(tmp_path / "run")
    left = sorted(p.name for p in root.iterdir() if p.name != "latest")
    assert left and all(ckpt.is_complete(root / name) for name in left), left


# --------------------------------------------------------------------------- errors and config


def test_env_without_rgb_rendering_is_a_clear_error(tmp_path):
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, env_id="test_train:VlmrmTestNoRender-v0")
    with pytest.raises(ValueError, match='render_mode="rgb_array"'):
        train(config)


def test_an_env_with_discrete_actions_is_refused_before_the_reward_model_loads(tmp_path, monkeypatch):
    # SAC's own assertion came after the reward model had loaded (minutes for ViT-bigG-14), as a traceback.
    from vlmrm_fast.train import run, train

    monkeypatch.setattr(run, "build_reward_model", lambda *a, **k: pytest.fail("the reward model loaded first"))
    config = dot_config(tmp_path, env_id="test_train:VlmrmTestDiscrete-v0")
    with pytest.raises(ValueError, match=r"has a Discrete\(3\) action space, and SAC takes continuous \(Box\) actions only"):
        train(config)


def test_env_that_cannot_make_a_gl_context_is_a_clear_error(tmp_path, monkeypatch, capsys):
    # No EGL on a headless machine: one line naming the fix from the command line, not a traceback.
    from vlmrm_fast.cli import main
    from vlmrm_fast.train.run import check_env_frames

    fix = r"cannot render: MuJoCo cannot render rgb_array frames.*EGL_NOT_INITIALIZED.*MUJOCO_GL=egl.*apt-get install"
    config = dot_config(tmp_path, env_id="test_train:VlmrmTestNoGL-v0")
    with pytest.raises(ValueError, match=fix):
        check_env_frames(config, 32, 32)
    assert main(["train", "--preset", "smoke", "--env-id", "test_train:VlmrmTestNoGL-v0",
                 "--run-dir", str(tmp_path / "cli"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmrm-fast: error: env 'test_train:VlmrmTestNoGL-v0' cannot render") and "Traceback" not in err
    # The textured humanoid's own message (it names the fix already) is passed on once.
    from gymnasium.envs.mujoco.mujoco_env import MujocoEnv

    monkeypatch.setattr(MujocoEnv, "render", NoGLEnv.render)
    with pytest.raises(ValueError, match=fix) as error:
        check_env_frames(dot_config(tmp_path, env_id="vlmrm_fast/TexturedHumanoid-v0"), 32, 32)
    assert str(error.value).count("MuJoCo cannot render") == 1


def test_env_setup_mistakes_are_clear_errors(tmp_path, monkeypatch):
    from vlmrm_fast.train import train
    from vlmrm_fast.train.run import check_env_frames

    # A package the env renders with, missing: gymnasium's message, as an error rather than a traceback.
    with pytest.raises(ValueError, match=r"'test_train:VlmrmTestNeedsPygame-v0' cannot render: pygame is not installed"):
        check_env_frames(dot_config(tmp_path, env_id="test_train:VlmrmTestNeedsPygame-v0"), 32, 32)
    # env_kwargs overriding the render mode: that, not the env, is what to fix.
    with pytest.raises(ValueError, match=r"env_kwargs set render_mode='human'.*leave render_mode out of env_kwargs"):
        check_env_frames(dot_config(tmp_path, env_kwargs={"render_mode": "human"}), 32, 32)
    # SAC on a CUDA device that is not there: SB3 would train on the CPU without a word.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"sac_device='cuda:1' but CUDA is not available here; pass --sac-device cpu"):
        train(dot_config(tmp_path, sac_device="cuda:1"))
    with pytest.raises(ValueError, match=r"sac_device='CPU' is not a torch device: pass auto, cpu, cuda or cuda:N"):
        train(dot_config(tmp_path, sac_device="CPU"))  # torch's own error lists twenty device types
    if not torch.backends.mps.is_available():  # SB3 takes mps on a Mac; elsewhere torch failed inside SAC
        with pytest.raises(ValueError, match=r"sac_device='mps' is not available here \(.*\); pass --sac-device cpu"):
            train(dot_config(tmp_path, sac_device="mps"))
    with pytest.raises(ValueError, match=r"sac_device='meta' is not available here \(.*\); pass --sac-device cpu"):
        train(dot_config(tmp_path, sac_device="meta"))
    with pytest.raises(ValueError, match=r"reward_device='meta': vlmrm_fast runs on CUDA GPUs and the CPU"):
        train(dot_config(tmp_path, reward_device="meta"))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_a_viewer_left_without_a_gl_context_is_freed_quietly(monkeypatch):
    # gymnasium's OffScreenViewer, when EGL fails in its __init__, has no context to free, and its
    # __del__ printed a second traceback under the clear error.
    import gc

    from vlmrm_fast.envs.humanoid import defuse_half_made_viewer

    class OffScreenViewer:
        def __init__(self):
            raise RuntimeError("eglInitialize() failed")

        def __del__(self):
            self.opengl_context.free()

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    try:
        try:
            OffScreenViewer()
        except RuntimeError as exc:
            raise ValueError("the clear error") from exc
    except ValueError as error:
        defuse_half_made_viewer(error)
    gc.collect()
    assert unraisable == []


def test_out_of_gpu_memory_in_train_names_the_reward_models_knobs(monkeypatch, capsys):
    # train's --batch-size is SAC's minibatch: it does not touch the reward model's memory.
    from vlmrm_fast.cli import main
    from vlmrm_fast.train import command

    def out_of_memory(config, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(command, "train", out_of_memory)
    assert main(["train", "--preset", "smoke", "--run-dir", "unused"]) == 2
    err = capsys.readouterr().err
    assert "--reward-batch-size" in err and "--reward-timing step" in err and "--batch-size " not in err


def test_summary_counts_this_sessions_steps(tmp_path, capsys):
    # The closing line's steps/s is this session's steps over its training time; a resume of a
    # finished run says there is nothing to train and how to continue.
    import argparse

    from vlmrm_fast.train import train
    from vlmrm_fast.train.command import run_train_command

    first = train(dot_config(tmp_path, total_timesteps=40), reward_model=tiny_reward(dot_config(tmp_path)))
    assert (first.steps_this_session, first.num_timesteps) == (40, 40) and 0 < first.learn_seconds < first.seconds

    def resume(total):
        args = argparse.Namespace(set=[f"total_timesteps={total}"], preset=None, config=None, resume=first.run_dir,
                                  print_config=False, **{f"field_{k}": None for k in TrainConfig.__dataclass_fields__})
        assert run_train_command(args) == 0
        return capsys.readouterr().out

    assert "trained 20 steps, to step 60, in " in resume(60)
    out = resume(50)
    assert "already at step 60, at or past total_timesteps (50)" in out and "--total-timesteps N (N > 60)" in out
    assert "steps/s" not in out
    # A session with nothing to train leaves no empty progress-from-60.csv beside the sessions' CSVs.
    assert sorted(p.name for p in (first.run_dir / "tb").glob("*.csv")) == ["progress-from-40.csv", "progress.csv"]


def test_env_without_a_size_argument_renders_at_its_own_size(tmp_path):
    # Most envs take no width/height. With the render size left unset (the model's input size is
    # then only a default) they render at their own size; a size asked for explicitly is an error
    # that names the way out.
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, env_id="test_train:VlmrmTestFixedSize-v0", render_width=None, render_height=None,
                        total_timesteps=20, checkpoint_every=0, eval_every=20)
    rm = tiny_reward(config)
    result = train(config, reward_model=rm)
    assert result.num_timesteps == 20 and len(rm.calls) >= 1
    assert list((result.run_dir / "videos").glob("*.mp4"))  # the evaluation video at the env's own size
    with pytest.raises(ValueError, match="does not take width/height.*leave render_width and render_height unset"):
        train(dot_config(tmp_path / "sized", env_id="test_train:VlmrmTestFixedSize-v0", total_timesteps=20),
              reward_model=rm)


def test_bad_render_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="render_width"):
        dot_config(tmp_path, render_width=0).validate()


def test_buffer_smaller_than_a_rollout_is_a_clear_error(tmp_path):
    # SB3 keeps buffer_size // n_envs rows of n_envs transitions; a rollout is train_freq rows.
    dot_config(tmp_path, buffer_size=20, train_freq=10, n_envs=2).validate()
    with pytest.raises(ValueError, match=r"buffer_size \(19 transitions\).*train_freq x n_envs = 10 x 2"):
        dot_config(tmp_path, buffer_size=19, train_freq=10, n_envs=2).validate()


def test_resume_with_another_reward_setup_warns(tmp_path):
    """reward_device/reward_backend may change on resume, but the rewards change with them: a warning."""
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=40)
    first = train(config, reward_model=tiny_reward(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(dot_config(tmp_path, total_timesteps=60), resume=first.run_dir, reward_model=tiny_reward(config))
    assert not [w for w in caught if "now runs on" in str(w.message)]  # the same setup: no warning
    other = dot_config(tmp_path, total_timesteps=80, reward_backend="onnxruntime")
    with pytest.warns(UserWarning, match=r"now runs on cpu torch.float32 \(onnxruntime backend\), before this resume on "
                                         r"cpu torch.float32 \(torch backend\)"):
        train(other, resume=first.run_dir, reward_model=tiny_reward(other))


def test_a_run_on_a_local_weights_file_resumes_from_any_folder(tmp_path, monkeypatch):
    # A relative pretrained path is read from the working folder, and a requeued cluster job starts in
    # another: the run saves the path absolute, and takes another path to the same bytes on resume.
    import open_clip

    from vlmrm_fast.train import train

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.save(open_clip.create_model("vlmrm-tiny").state_dict(), start / "tiny.pt")
    monkeypatch.chdir(start)
    first = train(dot_config(tmp_path, total_timesteps=20, checkpoint_every=20, pretrained="tiny.pt"))
    assert json.loads((first.run_dir / "config.json").read_text())["pretrained"] == str(start / "tiny.pt")
    monkeypatch.chdir(elsewhere)
    shutil.copy(start / "tiny.pt", elsewhere / "copy.pt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        torch.save(open_clip.create_model("vlmrm-tiny").state_dict(), elsewhere / "other.pt")
    with pytest.raises(ValueError, match=r"pretrained: '.*start/tiny.pt' in the checkpoint, '.*elsewhere/other.pt' "
                                         r"given \(not the run's weights: their bytes, or the open_clip_config.json beside them, differ\)"):
        train(dot_config(tmp_path, total_timesteps=40, pretrained="other.pt"), resume=first.run_dir)
    resumed = train(dot_config(tmp_path, total_timesteps=40, pretrained="copy.pt"), resume=first.run_dir)
    assert resumed.num_timesteps == 40
    saved = json.loads((first.run_dir / "config.json").read_text())
    assert saved["pretrained"] == str(elsewhere / "copy.pt")  # where the run reads its weights now
    import argparse

    from vlmrm_fast.train.command import config_from_args

    args = argparse.Namespace(set=[f"pretrained={start / 'tiny.pt'}"], preset=None, config=None, resume=first.run_dir,
                              print_config=False, **{f"field_{k}": None for k in TrainConfig.__dataclass_fields__})
    assert config_from_args(args)[0].pretrained == str(start / "tiny.pt")  # the command line's too
    # Weights moved away from the saved path (another node's mount): the new path is checked against the bytes
    # recorded when the run started, not against the file that is gone.
    (elsewhere / "copy.pt").rename(elsewhere / "moved.pt")
    with pytest.raises(FileNotFoundError, match="the run's weights file .* is not found from here: give its new path"):
        train(TrainConfig.from_dict({**saved, "total_timesteps": 60}), resume=first.run_dir)
    assert train(dot_config(tmp_path, total_timesteps=60, pretrained="moved.pt"), resume=first.run_dir).num_timesteps == 60
    # A run from before the record: the saved file is what the given one is compared with, so it must be there.
    (first.run_dir / "weights.json").unlink()
    (elsewhere / "moved.pt").rename(elsewhere / "gone.pt")
    with pytest.raises(ValueError, match="weights file is not found from here: .*put the file"):
        train(dot_config(tmp_path, total_timesteps=80, pretrained=str(start / "tiny.pt")), resume=first.run_dir)
    assert not (first.run_dir / "weights.json").exists()
    (elsewhere / "gone.pt").rename(elsewhere / "moved.pt")
    assert train(dot_config(tmp_path, total_timesteps=80, pretrained=str(start / "tiny.pt")),
                 resume=first.run_dir).num_timesteps == 80
    assert json.loads((first.run_dir / "weights.json").read_text())["size"] == (start / "tiny.pt").stat().st_size


def test_a_weights_file_changed_at_its_path_since_the_run_started_is_refused_on_resume(tmp_path):
    # Only another path was checked against the bytes recorded at the start: a fine-tune saved over the run's file
    # resumed with other reward weights, silently.
    import open_clip

    from vlmrm_fast.train import train

    def save_weights(seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.save(open_clip.create_model("vlmrm-tiny").state_dict(), tmp_path / "tiny.pt")

    save_weights(1)
    first = train(dot_config(tmp_path, total_timesteps=20, checkpoint_every=20, pretrained=str(tmp_path / "tiny.pt")))
    save_weights(2)
    with pytest.raises(ValueError, match=r"weights file '.*tiny.pt' has changed since the run started .*weights.json"):
        train(dot_config(tmp_path, total_timesteps=40, pretrained=str(tmp_path / "tiny.pt")), resume=first.run_dir)
    save_weights(1)  # the run's own bytes again
    assert train(dot_config(tmp_path, total_timesteps=40, pretrained=str(tmp_path / "tiny.pt")),
                 resume=first.run_dir).num_timesteps == 40


@pytest.mark.skipif(int(__import__("open_clip").__version__.split(".")[0]) < 3,
                    reason="open_clip < 3 has no local-dir: models")
def test_a_local_dir_models_weights_changed_since_the_run_started_are_refused_on_resume(tmp_path):
    # A local-dir: model's weights (and config) are in its folder, not in pretrained: none of them was recorded.
    import open_clip

    from vlmrm_fast.train import train

    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("vlmrm-tiny"), "preprocess_cfg": {}}))

    def save_weights(seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.save(open_clip.create_model("vlmrm-tiny").state_dict(), folder / "open_clip_pytorch_model.bin")

    save_weights(1)
    config = dict(model=f"local-dir:{folder}", pretrained=None)
    first = train(dot_config(tmp_path, total_timesteps=20, checkpoint_every=20, **config))
    save_weights(2)
    with pytest.raises(ValueError, match=r"weights file '.*open_clip_pytorch_model.bin' has changed since the run"):
        train(dot_config(tmp_path, total_timesteps=40, **config), resume=first.run_dir)
    save_weights(1)
    assert train(dot_config(tmp_path, total_timesteps=40, **config), resume=first.run_dir).num_timesteps == 40


def test_the_open_clip_config_beside_the_weights_is_the_runs_on_resume(tmp_path):
    # It sets the model's activation and normalisation: the same bytes at another path without it (or with another)
    # resumed with other rewards, silently.
    import open_clip

    from vlmrm_fast import models
    from vlmrm_fast.train import run, train

    assert run._SIDECAR == models.SIDECAR_CONFIG
    first_dir, copy_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir(), copy_dir.mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.save(open_clip.create_model("vlmrm-tiny").state_dict(), first_dir / "tiny.pt")
    sidecar = json.dumps({"model_cfg": {"quick_gelu": True}, "preprocess_cfg": {}})
    (first_dir / models.SIDECAR_CONFIG).write_text(sidecar)
    first = train(dot_config(tmp_path, total_timesteps=20, checkpoint_every=20, pretrained=str(first_dir / "tiny.pt")))
    shutil.copy(first_dir / "tiny.pt", copy_dir / "tiny.pt")
    with pytest.raises(ValueError, match=r"not the run's weights: their bytes, or the open_clip_config.json beside them"):
        train(dot_config(tmp_path, total_timesteps=40, pretrained=str(copy_dir / "tiny.pt")), resume=first.run_dir)
    (first_dir / models.SIDECAR_CONFIG).unlink()
    with pytest.raises(ValueError, match=r"has changed since the run started .*open_clip_config.json beside it"):
        train(dot_config(tmp_path, total_timesteps=40, pretrained=str(first_dir / "tiny.pt")), resume=first.run_dir)
    (copy_dir / models.SIDECAR_CONFIG).write_text(sidecar)
    assert train(dot_config(tmp_path, total_timesteps=40, pretrained=str(copy_dir / "tiny.pt")),
                 resume=first.run_dir).num_timesteps == 40


def test_resume_with_another_config_names_fields_and_fix(tmp_path):
    import argparse

    from vlmrm_fast.train import train
    from vlmrm_fast.train.command import config_from_args

    result = train(dot_config(tmp_path, total_timesteps=40), reward_model=tiny_reward(dot_config(tmp_path)))
    fields = {f"field_{k}": None for k in TrainConfig.__dataclass_fields__}
    fields.update(field_n_envs="3", field_env_id=DOT_ID)
    args = argparse.Namespace(set=["alpha=0.5"], preset="smoke", config=None, resume=result.run_dir,
                              print_config=False, **fields)
    with pytest.raises(ValueError) as err:
        config_from_args(args)
    text = str(err.value)
    assert "n_envs: 2 in the checkpoint, 3 given" in text and "alpha" in text and "--resume" in text
    # The checkpoint's own config, with a longer run: accepted.
    args = argparse.Namespace(set=["total_timesteps=80"], preset=None, config=None, resume=result.run_dir,
                              print_config=False, **{f"field_{k}": None for k in TrainConfig.__dataclass_fields__})
    config, _ = config_from_args(args)
    assert config.total_timesteps == 80 and config.n_envs == 2
    # The run continues in its own folder: another one named with --resume is refused, not ignored.
    for run_dir, refused in ((tmp_path / "elsewhere", True), (result.run_dir, False)):
        args = argparse.Namespace(set=[], preset=None, config=None, resume=result.run_dir, print_config=False,
                                  **{f"field_{k}": None for k in TrainConfig.__dataclass_fields__})
        args.field_run_dir = str(run_dir)
        if refused:
            with pytest.raises(ValueError, match=r"continues the run in its own folder, but run_dir '.*elsewhere'"):
                config_from_args(args)
        else:
            assert config_from_args(args)[0].run_dir == str(result.run_dir)
    # With the preset it was made from: the fields a resume may change keep the run's own values
    # unless given, not the preset's (its 300 steps, checkpoint every 100, 64 x 64 videos).
    fields = {f"field_{k}": None for k in TrainConfig.__dataclass_fields__}
    fields.update(field_env_id=DOT_ID, field_render_width="32", field_render_height="32", field_episode_length="20",
                  field_train_freq="10", field_gradient_steps="2", field_learning_starts="20", field_batch_size="16",
                  field_buffer_size="5000")
    args = argparse.Namespace(set=[], preset="smoke", config=None, resume=result.run_dir, print_config=False, **fields)
    with pytest.warns(UserWarning, match=r"--preset smoke on --resume .* checkpoint_every=100, total_timesteps=300, "
                                         r"video_height=64, video_width=64 do not change the run, which keeps its "
                                         r"checkpoint_every=40, total_timesteps=40, video_height=32, video_width=32"):
        config, _ = config_from_args(args)
    assert (config.total_timesteps, config.checkpoint_every, config.video_width) == (40, 40, 32)
    args.set = ["total_timesteps=300", "checkpoint_every=40", "video_width=32", "video_height=32"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of the preset's is left unapplied
        assert config_from_args(args)[0].total_timesteps == 300
    # A config file changes what it sets, and only that.
    saved = json.loads((ckpt.find_latest(result.run_dir) / "config.json").read_text())
    for key in ("total_timesteps", "checkpoint_every"):
        del saved[key]
    (tmp_path / "own.json").write_text(json.dumps({**saved, "video_width": 48}))
    args = argparse.Namespace(set=[], preset=None, config=tmp_path / "own.json", resume=result.run_dir,
                              print_config=False, **{f"field_{k}": None for k in TrainConfig.__dataclass_fields__})
    config, _ = config_from_args(args)
    assert (config.total_timesteps, config.checkpoint_every, config.video_width) == (40, 40, 48)
    # A file of only the fields to change (as the README has it): the rest are the run's, not defaults.
    (tmp_path / "longer.toml").write_text("total_timesteps = 80\n")
    args.config = tmp_path / "longer.toml"
    config, _ = config_from_args(args)
    assert config.total_timesteps == 80 and config.n_envs == 2 and config.env_id == DOT_ID
    (tmp_path / "reseed.toml").write_text("seed = 5\n")
    args.config = tmp_path / "reseed.toml"
    with pytest.raises(ValueError, match="seed: 0 in the checkpoint, 5 given"):
        config_from_args(args)
    # Through the Python API too.
    with pytest.raises(ValueError, match="n_envs: 2 in the checkpoint, 3 given"):
        train(dot_config(tmp_path, total_timesteps=80, n_envs=3), resume=result.run_dir)
    # A new run into a folder with checkpoints: refused, naming --resume.
    with pytest.raises(ValueError, match="--resume"):
        train(dot_config(tmp_path, total_timesteps=40))


def test_config_reaches_sac(tmp_path):
    """Every SAC setting of the config is the one SAC runs with (none left at SB3's defaults)."""
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=20, learning_rate=3e-4, gamma=0.9, tau=0.02, batch_size=8,
                        train_freq=5, gradient_steps=3, learning_starts=6, buffer_size=300, net_arch=[16, 8],
                        checkpoint_every=0)
    model = train(config, reward_model=tiny_reward(config)).model
    assert (model.gamma, model.tau, model.batch_size, model.gradient_steps, model.learning_starts) == (0.9, 0.02, 8, 3, 6)
    assert (model.train_freq.frequency, model.train_freq.unit.value) == (5, "step")
    assert model.buffer_size == 300 and model.replay_buffer.buffer_size == 300 // config.n_envs
    assert all(group["lr"] == 3e-4 for group in model.actor.optimizer.param_groups)
    assert [layer.out_features for layer in model.actor.latent_pi if isinstance(layer, torch.nn.Linear)] == [16, 8]


def test_deferred_rewards_combine_each_step_by_its_own_mode_and_weight(tmp_path):
    """VLMRewardVecEnv's mode and weight may change between steps (e.g. an annealed weight); the deferred
    write-back combines each step as the per-step wrapper would have at that step."""
    from types import SimpleNamespace

    from stable_baselines3.common.vec_env import DummyVecEnv

    from vlmrm_fast.train.deferred import DeferredRewardRecorder, score_and_write_back

    rm = tiny_reward(dot_config(tmp_path))
    recorder = DeferredRewardRecorder(DummyVecEnv([lambda: DotEnv()] * 2), rm, capacity=3, render="images")
    recorder.seed(0)
    recorder.reset()
    steps = [("replace", 1.0), ("add", 0.5), ("log", 2.0)]
    for mode, weight in steps:
        recorder.mode, recorder.weight = mode, weight
        recorder.step(np.full((2, 2), 0.3, np.float32))
    buffer = SimpleNamespace(rewards=np.full((8, 2), np.nan, np.float32))
    vlm, gt, _ = score_and_write_back(recorder, rm, buffer, [5, 6, 7])
    assert np.isfinite(vlm).all() and not np.allclose(vlm, gt)
    np.testing.assert_allclose(buffer.rewards[5:], [vlm[0], gt[1] + 0.5 * vlm[1], gt[2]], rtol=1e-6)
    recorder.close()


def test_a_runs_random_reward_weights_follow_its_seed(tmp_path):
    # pretrained none: drawn from the run's seed, as before random weights got a seed of their own, so that a run
    # started then resumes with the same reward model.
    from vlmrm_fast.train.run import build_reward_model

    def proj(seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return build_reward_model(dot_config(tmp_path, seed=seed)).model.visual.proj.detach().clone()

    assert torch.equal(proj(3), proj(3)) and not torch.equal(proj(3), proj(0))


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "vlmrm-tiny"\nn_envs = 4\n[sac]\nlearning_rate = 1e-3\ntotal_timesteps = 1e6\n')
    config = apply_overrides(TrainConfig(), load_config_file(path))
    config = apply_overrides(config, parse_set(["alpha=0.5", "goal=a robot", "pretrained=none", "net_arch=[64, 64]"]))
    assert (config.n_envs, config.learning_rate, config.total_timesteps) == (4, 1e-3, 1_000_000)
    assert config.goal == ["a robot"] and config.pretrained is None and config.net_arch == [64, 64]
    with pytest.raises(ValueError, match="unknown config key.*did you mean 'n_envs' for 'n_env'"):
        apply_overrides(config, {"n_env": 3})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) in overrides: zzz\. Valid keys are listed"):
        apply_overrides(config, {"zzz": 3})  # no guess: still a sentence
    with pytest.raises(ValueError, match=r"in checkpoint 'ckpt': zzz\. It was written by another version of "
                                         r"vlmrm_fast: resume it with that version\."):
        TrainConfig.from_dict({"zzz": 3}, "checkpoint 'ckpt'")  # a newer version's field, not a typo
    # Sections are flattened: one key in two places is an error, not a silent last-one-wins.
    for text, match in (("gamma = 0.9\n[sac]\ngamma = 0.99\n", r"sets 'gamma' twice, in the top level and in \[sac\]"),
                        ("[a]\ntau = 0.1\n[b]\ntau = 0.2\n", r"sets 'tau' twice, in \[a\] and in \[b\]")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_config_file(path)
    as_json = tmp_path / "run.json"
    as_json.write_text('{"seed": 1, "sac": {"gamma": 0.9}, "seed": 2}')
    with pytest.raises(ValueError, match=r"sets 'seed' twice in one object"):
        load_config_file(as_json)
    path.write_text('model = "vlmrm-tiny"\nn_envs = 4\n[sac]\nlearning_rate = 1e-3\ntotal_timesteps = 1e6\n')
    # Command-line values read as TOML literals still reach their field's type.
    config = apply_overrides(config, parse_set(["net_arch=64,32", "progress=1", "run_dir=2024-05-01"]))
    assert (config.net_arch, config.progress, config.run_dir) == ([64, 32], True, "2024-05-01")
    with pytest.raises(ValueError, match="net_arch.*positive layer sizes"):
        apply_overrides(config, parse_set(["net_arch=64,0"]))
    # An empty value (an unset shell variable) is not none: for pretrained that would mean random weights.
    for empty in ("pretrained=", "pretrained= ", "run_dir=", "goal="):
        with pytest.raises(ValueError, match=empty.split("=")[0] + r" in the command line is empty: give a value"):
            apply_overrides(config, parse_set([empty]), "the command line")
    # A list in brackets that is not TOML (unquoted items) is refused, not taken as one prompt "[a, b]".
    with pytest.raises(ValueError, match=r"goal in overrides must be a list of quoted strings"):
        apply_overrides(config, parse_set(["goal=[a robot, a humanoid]"]))
    assert apply_overrides(config, parse_set(['goal=["a robot", "a humanoid"]'])).goal == ["a robot", "a humanoid"]
    # none unsets the baseline, as it does other fields (not the prompt "none"): with alpha > 0, an error.
    for given in (parse_set(["baseline=none"]), {"baseline": ["None"]}, {"baseline": "null"}):  # --set, --baseline, TOML
        assert apply_overrides(config, {**given, "alpha": 0.0}).baseline == []
        with pytest.raises(ValueError, match="alpha > 0 needs a baseline prompt"):
            apply_overrides(config, given).validate()
    for bad, match in (("gamma=nan", "gamma"), ("tau=-3", "tau"), ("learning_rate=0", "learning_rate")):
        with pytest.raises(ValueError, match=match):
            apply_overrides(config, parse_set([bad])).validate()
    # What SB3 would only refuse (or train on as NaN) after the env and the reward model are built.
    for bad in ("ent_coef=auto_-1", "ent_coef=auto_0", "ent_coef=auto_abc", "ent_coef=nan", "ent_coef=-0.1",
                "ent_coef=inf", "seed=-1", f"seed={2**40}"):
        with pytest.raises(ValueError, match=bad.split("=")[0] + " must be"):
            apply_overrides(config, parse_set([bad])).validate()
    for good in ("ent_coef=auto", "ent_coef=auto_0.1", "ent_coef=0", "ent_coef=0.05", f"seed={2**32 - 1}"):
        apply_overrides(config, parse_set([good])).validate()
    kneel = from_preset("kneeling").validate()
    # Every value SPEC §1.3 gives for the paper-scale run.
    assert (kneel.model, kneel.pretrained, kneel.n_envs, kneel.episode_length, kneel.reward_timing) == (
        "ViT-bigG-14", "laion2b_s39b_b160k", 32, 100, "deferred")
    assert (kneel.train_freq * kneel.n_envs, kneel.reward_batch_size) == (3200, 3200)  # one batch per rollout
    assert (kneel.batch_size, kneel.gradient_steps, kneel.train_freq) == (512, 100, 100)  # 100 per 100 steps
    assert (kneel.learning_rate, kneel.gamma, kneel.tau, kneel.learning_starts) == (6e-4, 0.95, 0.005, 50_000)
    assert (kneel.total_timesteps, kneel.alpha) == (10_000_000, 0.0)
    assert (kneel.goal, kneel.baseline) == (["a humanoid robot kneeling"], ["a humanoid robot"])
    json.loads(kneel.to_json())


@pytest.mark.parametrize("given", ["64,32", "64 32"])
def test_net_arch_flag_takes_layer_sizes(given):
    import argparse

    from vlmrm_fast.train.command import add_train_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    config, _ = config_from_args(parser.parse_args(["train", "--preset", "smoke", "--net-arch", given]))
    assert config.net_arch == [64, 32]


# --------------------------------------------------------------------------- from a mutation audit
# Each test below kills a hand-made mutant that every other test let through.


@pytest.mark.parametrize("stops,kw", [
    ([24], dict(total_timesteps=60, learning_starts=50)),  # before learning_starts: actions from the action space's RNG
    ([20], dict(total_timesteps=60, learning_starts=20)),  # on learning_starts, a rollout's last step
    ([54, 56], dict(total_timesteps=100)),  # stopped twice within one rollout
], ids=["before-learning-starts", "on-learning-starts", "twice-in-one-rollout"])
def test_stops_anywhere_then_resume_continue_exactly(tmp_path, monkeypatch, stops, kw):
    from vlmrm_fast.train import train

    def config_in(folder):
        return dot_config(folder, checkpoint_every=0, **kw)

    full = train(config_in(tmp_path / "full"), reward_model=tiny_reward(config_in(tmp_path)))
    config = config_in(tmp_path / "stopped")
    for i, step in enumerate(stops):
        stopped = train_stopped_at(step, config, monkeypatch, resume=None if i == 0 else Path(config.run_dir))
        assert stopped.num_timesteps == step
    resumed = train(config, resume=Path(config.run_dir), reward_model=tiny_reward(config))
    _assert_same_run(resumed, full)


def test_total_timesteps_not_a_multiple_of_the_envs_rounds_up_once(tmp_path):
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=61, checkpoint_every=0)  # 2 envs
    with pytest.warns(UserWarning, match=r"total_timesteps=61 is not a multiple of n_envs=2.*ends at step 62.*"
                                         r"total_timesteps=62 \(or 60\)"):
        assert train(config, reward_model=tiny_reward(config)).num_timesteps == 62


@pytest.mark.parametrize("kw,why", [(dict(learning_starts=40), "learning_starts=40 is not below total_timesteps=40"),
                                     (dict(gradient_steps=0), "gradient_steps=0")])
def test_a_run_that_would_take_no_gradient_step_says_so(tmp_path, kw, why):
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=0, eval_every=0, **kw)
    with pytest.warns(UserWarning, match=rf"{why}: SAC takes no gradient step in this run") as caught:
        result = train(config, reward_model=tiny_reward(config))
    assert result.model._n_updates == 0
    assert any(w.filename == __file__ for w in caught)  # names the line that called train()


def test_each_logged_gt_return_is_its_own_episodes(tmp_path):
    # Episodes of 20 steps on 2 envs: the second pair ends at step 80, and its return is the sum of
    # its own env rewards, not one carried on from the first episodes.
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=100, eval_every=0, checkpoint_every=0)
    result = train(config, reward_model=tiny_reward(config))
    buf = result.model.replay_buffer
    gt = -np.linalg.norm(buf.next_observations[20:40].astype(np.float64), axis=-1)  # rows of steps 41-80
    logged = dict(tb_scalars(result.run_dir)["rollout/gt_return"])
    assert logged[80] == pytest.approx(gt.sum(axis=0).mean(), rel=1e-4)


def test_evaluation_episodes_start_from_different_states(tmp_path, monkeypatch):
    from vlmrm_fast.train import callbacks, train

    monkeypatch.setattr(callbacks, "_EVAL_CHUNK", 6)
    config = dot_config(tmp_path, total_timesteps=40, eval_every=40, eval_episodes=2, episode_length=15,
                        checkpoint_every=0)
    rm = tiny_reward(config)
    train(config, reward_model=rm)
    chunks = [c for c in rm.calls if c.shape == (6,)]
    assert not np.allclose(chunks[0], chunks[2])  # the first chunk of episode 0, and of episode 1


def test_a_second_signal_stops_at_once_and_restores_the_handler(tmp_path):
    from vlmrm_fast.train.callbacks import TrainingCallback

    before = signal.getsignal(signal.SIGTERM)
    callback = TrainingCallback(dot_config(tmp_path), None, tmp_path, "{}")
    callback._install_signal_handlers()
    try:
        callback._handle_signal(signal.SIGTERM, None)
        with pytest.raises(KeyboardInterrupt) as stopped:
            callback._handle_signal(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == before
        assert stopped.value.signum == signal.SIGTERM  # vlmrm-fast train then exits 143, as for one SIGTERM
    finally:
        callback.restore_signal_handlers()


def _slow_env_steps(monkeypatch) -> None:
    """DotEnv steps of 4 ms: env time that dominates a row's timing noise."""
    step = DotEnv.step

    def slow_step(self, action):
        time.sleep(0.004)
        return step(self, action)

    monkeypatch.setattr(DotEnv, "step", slow_step)


def test_stage_times_are_per_row_not_running_totals(tmp_path, monkeypatch):
    from vlmrm_fast.train import train

    _slow_env_steps(monkeypatch)
    config = dot_config(tmp_path, total_timesteps=80, checkpoint_every=0, eval_every=0, learning_starts=0)
    rows = [v for _, v in tb_scalars(train(config, reward_model=tiny_reward(config)).run_dir)["time/env_s"]]
    assert len(rows) >= 3 and max(rows) < 2 * min(rows), rows


def test_evaluation_and_checkpoint_time_is_logged_apart_from_training_steps_per_s(tmp_path, monkeypatch):
    # Rollouts of 20 env steps (2 envs, train_freq 10), a row each. The evaluation and checkpoint at step 40
    # come after row 40 is written, so row 60 holds them: a slow evaluation (0.3 s) and checkpoint (+0.2 s)
    # show there as eval_s and checkpoint_s, and train_steps_per_s is steps/s without them.
    from vlmrm_fast.train import callbacks, train

    save = callbacks.ckpt.save_checkpoint

    def slow_save(*args, **kwargs):
        time.sleep(0.2)
        return save(*args, **kwargs)

    def slow_evaluation(model, config, reward_model, run_dir, render_size=None):
        time.sleep(0.3)
        return None, 1.0, 2.0

    monkeypatch.setattr(callbacks.ckpt, "save_checkpoint", slow_save)
    monkeypatch.setattr(callbacks, "evaluate_policy_video", slow_evaluation)
    config = dot_config(tmp_path, total_timesteps=80, train_freq=10, learning_starts=0, eval_every=40,
                        checkpoint_every=40, log_every=0)
    rows = tb_scalars(train(config, reward_model=tiny_reward(config)).run_dir)
    by_step = {tag: dict(rows[tag]) for tag in ("time/eval_s", "time/checkpoint_s", "time/steps_per_s",
                                                "time/train_steps_per_s")}
    assert sorted(by_step["time/eval_s"]) == [20, 40, 60, 80]
    for step in (20, 40, 60, 80):
        eval_s, checkpoint_s = by_step["time/eval_s"][step], by_step["time/checkpoint_s"][step]
        if step == 60:
            assert 0.3 <= eval_s < 0.3 + 0.25 and 0.2 <= checkpoint_s < 0.2 + 1.0, (eval_s, checkpoint_s)
        else:
            assert eval_s == checkpoint_s == 0.0, (step, eval_s, checkpoint_s)
        # 20 steps over the row's wall clock, and over that clock less the evaluation and checkpoint
        wall, training = 20 / by_step["time/steps_per_s"][step], 20 / by_step["time/train_steps_per_s"][step]
        assert wall - training == pytest.approx(eval_s + checkpoint_s, abs=1e-4), (step, wall, training)


def test_env_state_from_the_integration_fallback_recomputes_derived_quantities():
    # A checkpoint from another MuJoCo version restores only the integration state: what MuJoCo derives
    # from it (body positions, read by the renderer and the next observation) must follow.
    import mujoco

    actions = np.random.default_rng(0).uniform(-0.4, 0.4, (8, 1, 17)).astype(np.float32)
    running = _humanoid_venv()
    for a in actions[:5]:
        running.step(a)
    state = ckpt.env_state(running)
    for entry in state["envs"]:
        entry["mujoco_data"] = None  # as from another MuJoCo version
    restored = _humanoid_venv()
    for a in actions[::-1][:3]:
        restored.step(a)  # somewhere else first
    assert ckpt.set_env_state(restored, state)
    base = restored.envs[0].unwrapped
    fresh = mujoco.MjData(base.model)
    mujoco.mj_copyData(fresh, base.model, base.data)
    mujoco.mj_forward(base.model, fresh)
    np.testing.assert_allclose(base.data.xipos, fresh.xipos, atol=1e-9)


@pytest.fixture
def one_checkpoint(tmp_path):
    """(run result, its checkpoint at step 40)."""
    from vlmrm_fast.train import train

    result = train(dot_config(tmp_path, total_timesteps=40), reward_model=tiny_reward(dot_config(tmp_path)))
    return result, ckpt.find_latest(result.run_dir)


def test_a_checkpoint_with_any_file_one_byte_short_is_incomplete(tmp_path, one_checkpoint):
    _, path = one_checkpoint
    for name in ("model.zip", "replay_buffer.pkl", "state.pt", "config.json"):
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(path, copy)
        with open(copy / name, "r+b") as f:
            f.truncate((copy / name).stat().st_size - 1)
        assert not ckpt.is_complete(copy), name


def _flip_a_byte(path: Path) -> None:
    """Damage ``path`` as a disk fault would: one byte changed, the size kept."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def _write_meta(path: Path, meta: dict) -> None:
    """meta.json as the package writes it: with the checksum of its fields (format 2)."""
    meta = {k: v for k, v in meta.items() if k != "meta_sha256"}
    (path / "meta.json").write_text(json.dumps(dict(meta, meta_sha256=ckpt._fields_digest(meta))))


def test_a_checkpoint_with_any_file_changed_in_place_is_found_damaged(tmp_path, one_checkpoint):
    _, path = one_checkpoint
    assert ckpt.damaged_files(path) == []
    for name in ckpt.FILES:
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(path, copy)
        _flip_a_byte(copy / name)
        assert ckpt.is_complete(copy), name  # the sizes alone cannot tell
        assert ckpt.damaged_files(copy) == [name]
    # A checkpoint written before checksums were kept (format 1) is taken as it is.
    old = tmp_path / "no-checksums"
    shutil.copytree(path, old)
    meta = ckpt.read_meta(old)
    (old / "meta.json").write_text(json.dumps({"format": 1, "step": meta["step"], "files": meta["files"]}))
    assert ckpt.is_complete(old) and ckpt.damaged_files(old) == []
    # A format-2 meta.json without its checksums (its own digest recomputed) is no complete checkpoint.
    unhashed = tmp_path / "no-sha256"
    shutil.copytree(path, unhashed)
    _write_meta(unhashed, {k: v for k, v in ckpt.read_meta(unhashed).items() if k != "sha256"})
    assert not ckpt.is_complete(unhashed)


def test_a_checkpoint_file_that_cannot_be_read_counts_as_damaged(one_checkpoint, monkeypatch):
    # Passed over like a changed one, not handed to SB3's loader. (A mutation audit found this unguarded.)
    _, path = one_checkpoint
    real = ckpt._sha256

    def unreadable(file):
        if Path(file).name == "state.pt":
            raise PermissionError(13, "Permission denied", str(file))
        return real(file)

    monkeypatch.setattr(ckpt, "_sha256", unreadable)
    assert ckpt.damaged_files(path) == ["state.pt"]


@pytest.mark.parametrize("change", [("\"step\": 40", "\"step\": 50"), ("\"sha256\"", "\"sha257\""),
                                    ("\"format\": 2", "\"format\": 1")],
                         ids=["step", "checksums-key", "format"])
def test_a_checkpoint_whose_meta_json_changed_is_incomplete_and_a_resume_takes_the_one_before(tmp_path, change):
    # One bit each ('0' ^ 1 is '1', '6' ^ 1 is '7'; '2' ^ 3 is '1', two bits): meta.json's own checksum finds
    # it, where the step read 50 (and the resume failed) or the checksums went unread.
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=20)
    result = train(config, reward_model=tiny_reward(config))
    newest = ckpt.find_latest(result.run_dir)
    text = (newest / "meta.json").read_text()
    assert text.count(change[0]) == 1
    (newest / "meta.json").write_text(text.replace(change[0], change[1]))
    assert not ckpt.is_complete(newest)
    resumed = train(dataclasses.replace(config, total_timesteps=60), resume=result.run_dir,
                    reward_model=tiny_reward(config))
    assert resumed.num_timesteps == 60 and ckpt.find_latest(result.run_dir, verify=True).name == ckpt.step_name(60)


def test_resume_passes_over_a_damaged_checkpoint_for_the_newest_intact_one_and_keeps_it(tmp_path):
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=20)
    result = train(config, reward_model=tiny_reward(config))
    root = result.run_dir / "checkpoints"
    older, newest = ckpt.checkpoint_root(result.run_dir) / ckpt.step_name(20), ckpt.find_latest(result.run_dir)
    assert newest.name == ckpt.step_name(40) and ckpt.is_complete(older)
    _flip_a_byte(newest / "replay_buffer.pkl")
    damaged_bytes = (newest / "replay_buffer.pkl").read_bytes()
    assert ckpt.find_latest(result.run_dir) == newest  # by size alone it would be loaded
    with pytest.warns(UserWarning, match=r"step_000000000040.* is damaged: replay_buffer.pkl"):
        assert ckpt.find_latest(result.run_dir, verify=True) == older

    with pytest.warns(UserWarning) as caught:
        resumed = train(dataclasses.replace(config, total_timesteps=60), resume=result.run_dir,
                        reward_model=tiny_reward(config))
    said = " | ".join(str(w.message) for w in caught)
    assert "is damaged: replay_buffer.pkl" in said and "kept as" in said, said
    assert resumed.model.num_timesteps == 60
    # Resumed from step 20; the damaged checkpoint is set aside as it was (not overwritten at step 40,
    # not pruned), and the run's own checkpoints are intact.
    kept = root / f"damaged-{ckpt.step_name(40)}"
    assert (kept / "replay_buffer.pkl").read_bytes() == damaged_bytes
    assert ckpt.find_latest(result.run_dir, verify=True).name == ckpt.step_name(60)
    assert ckpt.damaged_files(root / ckpt.step_name(40)) == []


def test_a_checkpoint_is_hashed_once_per_process_until_it_changes(tmp_path, one_checkpoint, monkeypatch):
    # --resume chooses the checkpoint (to read its config) and train() chooses it again: gigabytes of replay
    # buffer read twice. A file changed since is read again.
    import hashlib

    _, path = one_checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(ckpt.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    assert ckpt.damaged_files(copy) == [] and ckpt.damaged_files(copy) == []
    assert len(hashed) == len(ckpt.FILES)
    _flip_a_byte(copy / "state.pt")
    assert ckpt.damaged_files(copy) == ["state.pt"] and len(hashed) == len(ckpt.FILES) + 1


def test_setting_a_damaged_checkpoint_aside_points_latest_at_the_one_resumed_from(tmp_path):
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=20)
    result = train(config, reward_model=tiny_reward(config))
    root = ckpt.checkpoint_root(result.run_dir)
    assert (root / "latest").read_text().strip() == ckpt.step_name(40)
    moved = ckpt.set_aside_newer(result.run_dir, root / ckpt.step_name(20))
    assert moved == [root / f"damaged-{ckpt.step_name(40)}"] and moved[0].is_dir()
    assert (root / "latest").read_text().strip() == ckpt.step_name(20)  # it named the one set aside
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "named by latest is incomplete" on the next resume
        assert ckpt.find_latest(result.run_dir, verify=True) == root / ckpt.step_name(20)


def test_a_checkpoint_set_aside_twice_under_one_name_keeps_both(tmp_path, one_checkpoint):
    # Two resumes that each pass over a damaged step 40 (the run went on to write another step 40 in between):
    # the second set-aside must neither fail on the first's folder (rename onto a non-empty folder) nor replace it.
    result, path = one_checkpoint
    root = ckpt.checkpoint_root(result.run_dir)
    first = root / f"damaged-{path.name}"
    first.mkdir()
    (first / "model.zip").write_bytes(b"the first one")
    older = tmp_path / "older"
    shutil.copytree(path, older)  # any folder that sorts before step 40 will do as the one resumed from
    chosen = root / ckpt.step_name(20)
    os.rename(older, chosen)
    moved = ckpt.set_aside_newer(result.run_dir, chosen)
    assert len(moved) == 1 and moved[0].name.startswith(f"damaged-{path.name}-") and moved[0].is_dir()
    assert (first / "model.zip").read_bytes() == b"the first one"
    assert ckpt.damaged_files(moved[0]) == []  # the second one, as it was


def test_a_checkpoint_written_twice_at_one_step_leaves_only_the_new_one(one_checkpoint):
    # A SIGTERM right after a periodic save writes the same step again: the old folder is renamed aside,
    # the new one takes its place, and nothing of the old one is left for the disk to fill with.
    result, path = one_checkpoint
    root = ckpt.checkpoint_root(result.run_dir)
    written = ckpt.save_checkpoint(result.run_dir, result.model, '{"again": true}', {})
    assert written == path and (path / "config.json").read_text() == '{"again": true}'
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    assert ckpt.find_latest(result.run_dir, verify=True) == path


def test_a_checkpoint_file_replaced_by_one_of_the_same_size_and_time_is_hashed_again(tmp_path, one_checkpoint):
    # The digest is remembered per (path, size, mtime, inode): a copy restored over a file, keeping its size and
    # mtime (rsync -t, cp -p), is another inode, so it is read again, not taken for the file it replaced.
    _, path = one_checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    assert ckpt.damaged_files(copy) == []
    target = copy / "state.pt"
    st = target.stat()
    other = tmp_path / "other.pt"
    shutil.copyfile(target, other)
    _flip_a_byte(other)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, target)
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert ckpt.damaged_files(copy) == ["state.pt"]


def test_resume_with_every_checkpoint_damaged_names_the_problem(tmp_path, one_checkpoint):
    from vlmrm_fast.train import train

    result, path = one_checkpoint
    _flip_a_byte(path / "model.zip")
    config = dot_config(tmp_path, total_timesteps=60)
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged.*restore the run folder from a copy"):
        train(config, resume=result.run_dir, reward_model=tiny_reward(config))
    assert ckpt.damaged_files(path) == ["model.zip"]  # left in place for the user


def test_a_run_whose_checkpoints_are_all_cut_short_is_named_and_a_new_run_there_refused(tmp_path, one_checkpoint):
    # It said "no complete checkpoint ...; start a new run without --resume", and that new run replaced the
    # cut checkpoint of its step, whose model and buffer were whole.
    from vlmrm_fast.train import train

    result, path = one_checkpoint
    with open(path / "state.pt", "r+b") as f:
        f.truncate(1000)
    before = sorted((p.name, p.stat().st_size) for p in path.iterdir())
    config = dot_config(tmp_path, total_timesteps=60)
    with pytest.raises(ValueError, match=r"every checkpoint in .* is incomplete \(step_0+40: files cut short.*restore "
                                         r"the run folder from a copy, or start a new run in another --run-dir"):
        train(config, resume=result.run_dir, reward_model=tiny_reward(config))
    with pytest.raises(ValueError, match=r"holds checkpoints that are incomplete \(step_0+40.*choose another --run-dir"):
        train(dataclasses.replace(config, run_dir=str(result.run_dir)), reward_model=tiny_reward(config))
    assert sorted((p.name, p.stat().st_size) for p in path.iterdir()) == before


def test_an_error_about_many_checkpoint_folders_names_the_newest_three():
    from vlmrm_fast.train.run import _names

    folders = [Path(ckpt.step_name(step)) for step in (20, 40, 60, 80, 100)]  # oldest first, as listed
    assert _names(folders) == f"{ckpt.step_name(60)}, {ckpt.step_name(80)}, {ckpt.step_name(100)} and 2 older"
    assert _names(folders[:3]) == f"{ckpt.step_name(20)}, {ckpt.step_name(40)}, {ckpt.step_name(60)}"


def test_resume_of_a_checkpoint_folder_names_its_run_folder_and_leaves_no_lock_in_it(tmp_path, one_checkpoint, monkeypatch):
    from vlmrm_fast.train import train

    result, path = one_checkpoint
    before = sorted(p.name for p in path.iterdir())
    config = dot_config(tmp_path, total_timesteps=60)
    with pytest.raises(FileNotFoundError, match=f"is a checkpoint folder: resume its run folder, --resume {re.escape(str(result.run_dir))}$"):
        train(config, resume=path, reward_model=tiny_reward(config))
    monkeypatch.chdir(path)
    with pytest.raises(FileNotFoundError, match=f"'.' is a checkpoint folder: resume its run folder, --resume {re.escape(str(result.run_dir.resolve()))}$"):
        train(config, resume=".", reward_model=tiny_reward(config))
    monkeypatch.chdir(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == before
    named_alike = dot_config(tmp_path, run_dir=str(tmp_path / "step_size_sweep"), total_timesteps=40)  # a run, not a checkpoint
    first = train(named_alike, reward_model=tiny_reward(named_alike))
    assert train(dataclasses.replace(named_alike, total_timesteps=60), resume=first.run_dir,
                 reward_model=tiny_reward(named_alike)).num_timesteps == 60
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="'.*a-file' is a file, not a folder; pass another --run-dir"):
        train(dataclasses.replace(config, run_dir=str(tmp_path / "a-file")), reward_model=tiny_reward(config))


def test_a_checkpoint_folder_moved_out_of_its_run_is_named_a_checkpoint_folder_when_resumed(tmp_path, one_checkpoint):
    # Outside checkpoints/ its name says nothing, but its meta.json does: named as such, no lock left in it.
    from vlmrm_fast.train import train

    _, path = one_checkpoint
    moved = tmp_path / "kept"
    shutil.copytree(path, moved)
    config = dot_config(tmp_path, total_timesteps=60)
    with pytest.raises(FileNotFoundError, match=f"^'{re.escape(str(moved))}' is a checkpoint folder: resume the run "
                                                "folder that holds it in checkpoints/$"):
        train(config, resume=moved, reward_model=tiny_reward(config))
    assert sorted(p.name for p in moved.iterdir()) == sorted(p.name for p in path.iterdir())


def test_a_resume_refused_for_another_config_leaves_the_runs_config_json_as_it_was(tmp_path, one_checkpoint):
    # The run's config.json is the config it runs under: a refused resume must not put the other one there.
    from vlmrm_fast.train import train

    result, _ = one_checkpoint
    before = (result.run_dir / "config.json").read_bytes()
    other = dot_config(tmp_path, total_timesteps=80, n_envs=3)
    with pytest.raises(ValueError, match="n_envs: 2 in the checkpoint, 3 given"):
        train(other, resume=result.run_dir, reward_model=tiny_reward(other))
    assert (result.run_dir / "config.json").read_bytes() == before


def test_resume_of_a_folder_that_is_no_run_folder_leaves_no_lock_and_names_the_run_folder_it_is_in(
        tmp_path, one_checkpoint):
    # The lock was taken before the folder was refused: an empty folder, RUN/tb or RUN/checkpoints given
    # to --resume kept a .lock; RUN/checkpoints was said to lack RUN/checkpoints/checkpoints.
    from vlmrm_fast.train import train
    from vlmrm_fast.train.command import config_from_args

    result, _ = one_checkpoint
    config = dot_config(tmp_path, total_timesteps=60)
    (tmp_path / "empty").mkdir()
    (tmp_path / "home" / "checkpoints").mkdir(parents=True)  # a parent with a checkpoints/ of its own, no run
    (tmp_path / "home" / "typo").mkdir()
    for folder, fix in ((tmp_path / "empty", "check the path, or start a new run without --resume"),
                        (tmp_path / "home" / "typo", "check the path, or start a new run without --resume"),
                        (result.run_dir / "tb", f"it is inside the run folder '{result.run_dir.resolve()}': --resume "),
                        (result.run_dir / "checkpoints", f"it is inside the run folder '{result.run_dir.resolve()}'")):
        before = sorted(p.name for p in folder.iterdir())
        message = rf"no checkpoints folder in '{re.escape(str(folder))}' \(.* is missing\); {re.escape(fix)}"
        with pytest.raises(FileNotFoundError, match=message):
            train(config, resume=folder, reward_model=tiny_reward(config))
        with pytest.raises(FileNotFoundError, match=message):
            config_from_args(_resume_args(folder))
        assert sorted(p.name for p in folder.iterdir()) == before  # no .lock


def test_a_crash_while_overwriting_a_checkpoint_of_the_same_step_keeps_it(one_checkpoint, monkeypatch):
    result, path = one_checkpoint
    real = os.rename

    def fails_into_place(src, dst):
        if Path(src).name.startswith(".tmp-") and Path(dst).name == path.name:
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", fails_into_place)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_checkpoint(result.run_dir, result.model, "{}", {})
    monkeypatch.setattr(os, "rename", real)
    ckpt.clean_stale(result.run_dir)
    assert ckpt.find_latest(result.run_dir) == path


def test_every_checkpoint_file_reaches_the_disk_before_the_checkpoint_is_renamed_into_place(one_checkpoint, monkeypatch):
    # os.fsync itself is watched, not the helper around it: a helper that stopped flushing would pass.
    result, _ = one_checkpoint
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    result.model.num_timesteps += 2
    final = ckpt.save_checkpoint(result.run_dir, result.model, "{}", {})
    into_place = next(i for i, e in enumerate(events) if e[0] == "rename" and Path(e[2]) == final)
    tmp = Path(events[into_place][1])
    tmp = tmp.parent.resolve() / tmp.name  # as /proc names it: through no link
    synced = {path for kind, path, *_ in events[:into_place] if kind == "fsync"}
    written = sorted(p.name for p in final.iterdir())
    assert written == sorted([*ckpt.FILES, "meta.json"])
    assert {str(tmp / name) for name in written} <= synced, (written, synced)


def test_without_env_state_the_policy_starts_from_the_reset_observations(tmp_path, monkeypatch):
    from vlmrm_fast.train import train
    from vlmrm_fast.train.run import _load_checkpoint, build_vec_env

    config = dot_config(tmp_path, total_timesteps=50, episode_length=30)
    rm = tiny_reward(config)
    path = ckpt.find_latest(train(config, reward_model=rm).run_dir)
    env = build_vec_env(config, rm, 32, 32)
    monkeypatch.setattr(ckpt, "set_env_state", lambda venv, state: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = _load_checkpoint(path, env, config)
    np.testing.assert_array_equal(model._last_obs, np.stack(env.get_attr("pos")))


def test_envs_reset_by_a_resume_draw_from_their_restored_rng_not_the_runs_seed_again(tmp_path, monkeypatch):
    # SAC.load seeds the envs' next reset with the run's seed: the envs that a resume resets started the
    # run's first episodes over (the same initial states), their restored RNG streams discarded.
    from vlmrm_fast.train import train
    from vlmrm_fast.train.run import _load_checkpoint, build_vec_env

    config = dot_config(tmp_path, total_timesteps=50, episode_length=30)
    rm = tiny_reward(config)
    result = train(config, reward_model=rm)
    path = ckpt.find_latest(result.run_dir)
    restore = ckpt.set_env_state
    monkeypatch.setattr(ckpt, "set_env_state", lambda venv, state: restore(venv, state) and False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = _load_checkpoint(path, build_vec_env(config, rm, 32, 32), config)
    want = []
    for entry in ckpt.load_state(path)["env"]["envs"]:  # DotEnv.reset's draw, from each env's restored RNG
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = entry["np_random"]
        want.append(rng.uniform(-0.5, 0.5, 2).astype(np.float32))
    np.testing.assert_array_equal(model._last_obs, np.stack(want))
    assert not np.array_equal(model._last_obs, result.model.replay_buffer.observations[0])


class _BottomUpRenderer:
    """A BatchRenderer stand-in giving frames bottom up (as OpenGL reads them); ``fail_at``: the call
    that raises, as a lost GL context would, so the recorder falls back to ``get_images``."""

    bottom_up = True
    fail_at: Optional[int] = None

    def __init__(self, envs):
        self.envs, self.calls = envs, 0

    @classmethod
    def from_envs(cls, envs, **kwargs):
        return cls(envs)

    def render(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("GL context lost")
        return torch.from_numpy(np.stack([np.ascontiguousarray(e.unwrapped.render()[::-1]) for e in self.envs]))

    def close(self):
        pass


@pytest.mark.parametrize("fail_at", [None, 3], ids=["batch", "fallback-mid-rollout"])
def test_deferred_rewards_score_bottom_up_frames_the_right_way_up(tmp_path, monkeypatch, fail_at):
    from stable_baselines3.common.vec_env import DummyVecEnv

    from vlmrm_fast.train.deferred import DeferredRewardRecorder, score_and_write_back
    from vlmrm_fast.wrappers import batch_frames

    monkeypatch.setattr(_BottomUpRenderer, "fail_at", fail_at)
    monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: _BottomUpRenderer)
    venv = DummyVecEnv([lambda: gym.make("InvertedPendulum-v5", render_mode="rgb_array", width=32, height=32)] * 2)
    rm = tiny_reward(dot_config(tmp_path))
    recorder = DeferredRewardRecorder(venv, rm, capacity=4, render="batch")
    recorder.seed(0)
    recorder.reset()
    upright = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            recorder.step(np.zeros((2, 1), np.float32))
            upright.append(np.stack([np.ascontiguousarray(e.unwrapped.render()) for e in venv.envs]))
        vlm, _, _ = score_and_write_back(recorder, rm, SimpleNamespace(rewards=np.zeros((4, 2), np.float32)),
                                         [0, 1, 2, 3])
    want = rm.rm(np.concatenate(upright)).float().numpy().reshape(4, 2)
    np.testing.assert_allclose(vlm, want, atol=1e-5)
    recorder.close()


def test_deferred_rewards_follow_the_chosen_task_of_a_several_task_model():
    from stable_baselines3.common.vec_env import DummyVecEnv

    from vlmrm_fast import CLIPReward, Task
    from vlmrm_fast.train.deferred import DeferredRewardRecorder, score_and_write_back

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rm = CLIPReward.from_pretrained("vlmrm-tiny", None, device="cpu", backend="torch", alpha=0.5, tasks=[
            Task("a yellow square", "a square", name="yellow"), Task("a dark image", "an image", name="dark")])
    scored = {}
    for task in ("yellow", "dark"):
        venv = DummyVecEnv([DotEnv] * 2)
        recorder = DeferredRewardRecorder(venv, rm, capacity=3, task=task)
        recorder.seed(0)
        recorder.reset()
        frames = []
        for _ in range(3):
            recorder.step(np.full((2, 2), 0.5, np.float32))
            frames.append(np.stack(venv.get_images()))
        vlm, _, _ = score_and_write_back(recorder, rm, SimpleNamespace(rewards=np.zeros((3, 2), np.float32)), [0, 1, 2])
        want = rm(np.concatenate(frames)).numpy()[:, rm.task_names.index(task)].reshape(3, 2)
        np.testing.assert_allclose(vlm, want, atol=1e-6)
        scored[task] = vlm
    assert not np.allclose(scored["yellow"], scored["dark"])
    # A plain callable names no tasks: task= is checked against the columns it returns, as the wrappers do.
    recorder = DeferredRewardRecorder(DummyVecEnv([DotEnv] * 2), lambda frames: np.zeros((len(frames), 2)), capacity=1,
                                      task=2)
    recorder.reset()
    recorder.step(np.full((2, 2), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"task=2, but the reward model returns 2 reward\(s\) per frame"):
        score_and_write_back(recorder, recorder.reward_model, SimpleNamespace(rewards=np.zeros((1, 2), np.float32)), [0])


def test_the_lock_file_names_only_its_holder(tmp_path):
    from vlmrm_fast.train import run_lock

    (tmp_path / run_lock.LOCK_NAME).write_text("x" * 300)  # a longer text from an earlier holder
    with run_lock.hold_run_folder(tmp_path):
        text = (tmp_path / run_lock.LOCK_NAME).read_text()
    assert text.startswith(f"pid {os.getpid()} on ") and "xxxxx" not in text


def test_deferred_scoring_hands_a_plain_reward_function_top_down_frames():
    """Deferred rewards take any callable rm(frames) -> rewards, as the wrappers do: bottom-up frames are
    flipped for one without ``bottom_up=``, and passed as they are, with the flag, to one that has it."""
    from vlmrm_fast.train.deferred import score_frames

    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 2, 7, 5, 3), dtype=np.uint8))

    def position_weighted(batch):  # numpy out, no bottom_up=; weighted by row, column and channel, so that
        # a frame mirrored too (a flip of both axes) or with its channels swapped scores differently
        height, width = batch.shape[1:3]
        weight = (torch.arange(1, height + 1, dtype=torch.float64)[:, None, None] / height
                  * (1 + torch.arange(1, width + 1, dtype=torch.float64)[None, :, None] / width)
                  * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        return (batch.double() * weight).mean(dim=(1, 2, 3)).numpy()

    def takes_flag(batch, bottom_up=False):
        return torch.from_numpy(position_weighted(batch.flip(1) if bottom_up else batch))

    top_down = frames.flip(2).reshape(6, 7, 5, 3)
    want = position_weighted(top_down).reshape(3, 2)
    for wrong in (frames, frames.flip(3), frames.flip(4)):  # bottom-up; top-down but mirrored; channels swapped
        assert not np.allclose(want, position_weighted(wrong.reshape(6, 7, 5, 3)).reshape(3, 2))
    np.testing.assert_allclose(score_frames(position_weighted, frames, bottom_up=True), want, rtol=1e-6)
    np.testing.assert_allclose(score_frames(takes_flag, frames, bottom_up=True), want, rtol=1e-6)


# The next ones come from a second audit, of checkpoint.py, config.py, run_lock.py and deferred.py.


@pytest.mark.parametrize("bad,match", [
    (dict(n_envs=0), "n_envs must be >= 1"),
    (dict(episode_length=0), "episode_length must be >= 1"),
    (dict(video_width=0), "video_width/video_height must be positive"),
    (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
    (dict(alpha=-0.1), r"alpha must be in \[0, 1\]"),
    (dict(reward_mode="multiply"), "reward_mode must be one of replace, add, log"),
    (dict(reward_timing="later"), "reward_timing must be one of step, deferred"),
    (dict(reward_dtype="int8"), "reward_dtype must be one of"),
    (dict(preprocess="resize"), "preprocess must be vlmrm or openclip"),
    (dict(goal=[]), "goal needs at least one prompt, none blank"),
    (dict(goal=[" "]), "goal needs at least one prompt, none blank"),
    (dict(baseline=["\t"]), "baseline prompts must be non-blank"),
    (dict(alpha=0.5, baseline=[]), "alpha > 0 needs a baseline prompt"),
    (dict(reward_batch_size=0), "reward_batch_size must be >= 1"),
    (dict(reward_weight=float("inf")), "reward_weight must be finite"),
    (dict(reward_weight=1e39), "reward_weight must be finite and within float32's range"),
    (dict(batch_size=0), "batch_size and train_freq must be >= 1"),
    (dict(gradient_steps=-1), "gradient_steps >= 0"),
    (dict(learning_starts=-1), "learning_starts must be >= 0"),
    (dict(net_arch=[]), "net_arch must be positive layer sizes"),
    (dict(total_timesteps=0), "total_timesteps must be >= 1"),
    (dict(log_every=-1), "log_every must be >= 0"),
    (dict(keep_checkpoints=0), "keep_checkpoints must be >= 1"),
    (dict(eval_episodes=0), "eval_episodes must be >= 1"),
    (dict(video_length=0), "video_length must be >= 1"),
    (dict(seed=2**32), r"seed must be in \[0, 2\*\*32\)"),
    # From a mutation audit: each bound below was unguarded by a test.
    (dict(gamma=0.0), r"gamma \(discount\) must be in \(0, 1\]"),
    (dict(tau=0.0), r"tau \(target smoothing\) must be in \(0, 1\]"),  # 0 freezes the target networks
    (dict(learning_rate=float("inf")), "learning_rate must be > 0"),
    (dict(checkpoint_every=-1), "checkpoint_every, eval_every and log_every must be >= 0"),
    (dict(eval_every=-1), "checkpoint_every, eval_every and log_every must be >= 0"),
    (dict(video_height=0), "video_width/video_height must be positive"),
    (dict(render_height=0), "render_height must be a positive number of pixels"),
    (dict(train_freq=0), "batch_size and train_freq must be >= 1"),
    (dict(reward_device="cuda:x"), "reward_device 'cuda:x' is not a torch device: pass cuda, cuda:N or cpu"),
])
def test_each_bad_value_is_refused_naming_its_field(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(dot_config(tmp_path), **bad).validate()


def test_the_ends_of_each_allowed_range_are_accepted(tmp_path):
    for edge in (dict(alpha=0.0), dict(alpha=1.0), dict(gamma=1.0), dict(tau=1.0), dict(gradient_steps=0),
                 dict(learning_starts=0), dict(keep_checkpoints=1), dict(checkpoint_every=0, eval_every=0, log_every=0),
                 dict(seed=0), dict(n_envs=1), dict(video_length=1), dict(reward_batch_size=1)):
        dataclasses.replace(dot_config(tmp_path), **edge).validate()


def test_configs_do_not_share_their_list_and_dict_defaults():
    a, b = TrainConfig(), TrainConfig()
    a.goal.append("a humanoid robot sitting")
    a.net_arch[0] = 8
    a.env_kwargs["frame_skip"] = 2
    assert (b.goal, b.net_arch, b.env_kwargs) == (["a humanoid robot kneeling"], [256, 256], {})
    assert TrainConfig().goal == ["a humanoid robot kneeling"]


def test_a_config_file_table_named_like_a_field_is_that_field(tmp_path):
    # [env_kwargs] is the dict field, not a section to flatten; a .JSON file is JSON whatever its case.
    path = tmp_path / "run.toml"
    path.write_text('n_envs = 4\n[env_kwargs]\nframe_skip = 2\n[sac]\ngamma = 0.9\n')
    config = apply_overrides(TrainConfig(), load_config_file(path))
    assert (config.env_kwargs, config.n_envs, config.gamma) == ({"frame_skip": 2}, 4, 0.9)
    upper = tmp_path / "RUN.JSON"
    upper.write_text('{"n_envs": 3, "env_kwargs": {"frame_skip": 3}}')
    assert load_config_file(upper) == {"n_envs": 3, "env_kwargs": {"frame_skip": 3}}
    upper.write_text('[1, 2]')
    with pytest.raises(ValueError, match="must hold key = value pairs"):
        load_config_file(upper)


def test_overrides_reach_their_fields_type_or_are_refused():
    base = TrainConfig()
    # --set takes flag spellings (dashes) and values holding '='.
    config = apply_overrides(base, parse_set(["total-timesteps=5000", "goal=a robot, arms = up"]))
    assert config.total_timesteps == 5000 and config.goal == ["a robot, arms = up"]
    # A text field takes what TOML reads as a number or a boolean as typed, as its flag does (--run-dir 0123).
    config = apply_overrides(base, parse_set(["run_dir=0123", "model=5", "goal=true", "pretrained=1e3", "ent_coef=1e-3"]))
    assert (config.run_dir, config.model, config.goal, config.pretrained) == ("0123", "5", ["true"], "1e3")
    assert config.ent_coef == "0.001" and parse_set(["pretrained=none", "alpha=1"]) == {"pretrained": None, "alpha": 1}
    assert base.total_timesteps == 10_000_000  # a copy: the base config is left as it was
    # Command-line flags arrive as strings.
    config = apply_overrides(base, {"n_envs": "8", "buffer_size": "1_000", "progress": "off", "tensorboard": "on",
                                    "reward_batch_size": "none", "reward_dtype": "bf16", "env_kwargs": '{"frame_skip": 2}',
                                    "goal": "a robot", "ent_coef": 0.1})
    assert (config.n_envs, config.buffer_size, config.progress, config.tensorboard) == (8, 1000, False, True)
    assert (config.reward_batch_size, config.reward_dtype, config.env_kwargs) == (None, "bfloat16", {"frame_skip": 2})
    assert (config.goal, config.ent_coef) == (["a robot"], "0.1")
    # Exactly, past float's 2**53 too (--total-timesteps 10000000000000001 was read as 10000000000000000), and 1e3.
    config = apply_overrides(base, {"total_timesteps": "10000000000000001", "buffer_size": "1e3"})
    assert (config.total_timesteps, config.buffer_size) == (10_000_000_000_000_001, 1000)
    for values, match in (({"n_envs": True}, "n_envs .* must be an integer"),
                          ({"n_envs": 1.5}, "n_envs .* must be an integer"),
                          ({"n_envs": "1.5"}, "n_envs .* must be an integer"),
                          ({"alpha": True}, "alpha .* must be a number"),
                          ({"model": 5}, "model .* must be a string"),
                          ({"env_kwargs": "frame_skip=2"}, "env_kwargs .* must be a JSON object"),
                          ({"n_envs": None}, "n_envs .* cannot be none"),
                          ({"reward_batch_size": ""}, "reward_batch_size .* is empty: give a value, or none")):
        with pytest.raises(ValueError, match=match):
            apply_overrides(base, values, "the command line")
    with pytest.raises(ValueError, match="unknown preset 'kneel'; choose one of kneeling, smoke"):
        from_preset("kneel")


def test_a_resume_may_change_only_what_leaves_the_run_the_same(tmp_path):
    from vlmrm_fast.train.config import diff_configs

    saved = dot_config(tmp_path)
    given = apply_overrides(saved, {"seed": 1, "learning_rate": 1e-3, "total_timesteps": 10**6, "progress": True,
                                    "run_dir": "elsewhere", "sac_device": "cuda", "eval_every": 7})
    assert diff_configs(saved, given) == [("learning_rate", saved.learning_rate, 1e-3), ("seed", 0, 1)]
    # Each field the README calls resumable, changed alone (a mutation audit found five unguarded).
    changes = dict(keep_checkpoints=9, video_length=3, reward_batch_size=7, log_every=11, eval_episodes=4,
                   checkpoint_every=13, video_width=48, video_height=40, tensorboard=not saved.tensorboard,
                   reward_device="cpu", reward_backend="torch")
    for name, value in changes.items():
        assert diff_configs(saved, dataclasses.replace(saved, **{name: value})) == [], name


def test_rng_state_restores_every_generator_it_names():
    import random

    model = SimpleNamespace(action_space=gym.spaces.Box(-1.0, 1.0, (3,), np.float32))
    model.action_space.seed(0)

    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item(), model.action_space.sample().tolist()

    state = ckpt.rng_state(model)
    first = draws()
    draws()
    ckpt.set_rng_state(model, state)
    assert draws() == first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_state_restores_the_cuda_generators():
    # SAC on CUDA draws its noise there: a resume must continue those draws, not the fresh generator's.
    model = SimpleNamespace(action_space=gym.spaces.Box(-1.0, 1.0, (3,), np.float32))
    state = ckpt.rng_state(model)
    assert state["torch_cuda"] is not None and len(state["torch_cuda"]) == torch.cuda.device_count()
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    first = [torch.rand(4, device=device).cpu() for device in devices]
    for device in devices:
        torch.rand(4, device=device)
    ckpt.set_rng_state(model, state)
    again = [torch.rand(4, device=device).cpu() for device in devices]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rng_state_hands_the_cuda_generators_back_and_keeps_them_on_another_gpu_count(monkeypatch):
    # The CUDA part of the round trip above, on any machine: torch.cuda stood in for by a recorder.
    model = SimpleNamespace(action_space=gym.spaces.Box(-1.0, 1.0, (3,), np.float32))
    saved = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    handed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in saved])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", handed.append)
    state = ckpt.rng_state(model)
    ckpt.set_rng_state(model, state)
    assert len(handed) == 1 and all(torch.equal(a, b) for a, b in zip(handed[0], saved))

    def one_gpu_only(states):
        raise IndexError("list index out of range")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", one_gpu_only)
    ckpt.set_rng_state(model, state)  # the fresh state kept, no error


def test_checkpoints_are_ordered_by_step_and_only_the_newest_kept(one_checkpoint):
    result, first = one_checkpoint  # step 40
    root, model = first.parent, result.model
    written = {}
    for step in (100, 1000):  # names of more digits than the first's: their order is still the steps'
        model.num_timesteps = step
        written[step] = ckpt.save_checkpoint(result.run_dir, model, "{}", {}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == sorted(["latest", ckpt.step_name(100), ckpt.step_name(1000)])
    assert ckpt.find_latest(result.run_dir) == written[1000]
    assert (root / "latest").read_text().strip() == written[1000].name
    # The checkpoint just written is never pruned, even behind a newer one.
    model.num_timesteps = 60
    behind = ckpt.save_checkpoint(result.run_dir, model, "{}", {}, keep=1)
    assert ckpt.is_complete(behind) and ckpt.is_complete(written[1000]) and not written[100].exists()


def test_pruning_counts_only_complete_checkpoints_and_leaves_incomplete_ones_alone(one_checkpoint):
    # An incomplete folder (a copy cut short) is no checkpoint to keep: counted, it would push a complete
    # one out. Nor does pruning delete it: as with a damaged checkpoint set aside, that is left to the user.
    result, first = one_checkpoint  # step 40
    root, model = first.parent, result.model
    cut_short = []
    for step in (20, 50):  # one older than every complete checkpoint, one between two
        shutil.copytree(first, root / ckpt.step_name(step))
        with open(root / ckpt.step_name(step) / "model.zip", "r+b") as f:
            f.truncate(10)
        cut_short.append(root / ckpt.step_name(step))
    model.num_timesteps = 60
    newest = ckpt.save_checkpoint(result.run_dir, model, "{}", {}, keep=2)
    assert ckpt.is_complete(first) and ckpt.is_complete(newest)
    assert all(path.is_dir() and not ckpt.is_complete(path) for path in cut_short)
    model.num_timesteps = 80
    newer = ckpt.save_checkpoint(result.run_dir, model, "{}", {}, keep=2)
    assert not first.exists() and ckpt.is_complete(newest) and ckpt.is_complete(newer)
    assert all(path.is_dir() for path in cut_short)


def test_a_checkpoint_whose_meta_lists_fewer_files_or_whose_file_grew_is_incomplete(tmp_path, one_checkpoint):
    _, path = one_checkpoint
    meta = ckpt.read_meta(path)
    fewer = tmp_path / "fewer"
    shutil.copytree(path, fewer)
    del meta["files"]["state.pt"]
    _write_meta(fewer, meta)
    assert ckpt.is_complete(path) and not ckpt.is_complete(fewer)
    grown = tmp_path / "grown"
    shutil.copytree(path, grown)
    with open(grown / "replay_buffer.pkl", "ab") as f:
        f.write(b"\0")
    assert not ckpt.is_complete(grown)


def test_a_crash_while_latest_is_written_leaves_the_old_pointer(tmp_path, monkeypatch):
    # The disk fills half-way through the write: the old name stays under ``latest``, not half the new one.
    import errno

    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text(ckpt.step_name(40) + "\n")
    real_write_bytes = Path.write_bytes

    def half_then_full(self, data):
        data = data.encode() if isinstance(data, str) else data
        real_write_bytes(self, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", half_then_full)
        patch.setattr(Path, "write_text", half_then_full)
        with pytest.raises(OSError, match="simulated"):
            ckpt._write_latest(root, ckpt.step_name(60))
    assert sorted(p.name for p in root.iterdir()) == ["latest"]
    assert (root / "latest").read_text() == ckpt.step_name(40) + "\n"
    ckpt._write_latest(root, ckpt.step_name(60))
    assert (root / "latest").read_text() == ckpt.step_name(60) + "\n"


def test_a_stale_pointer_to_a_complete_checkpoint_is_no_warning(one_checkpoint):
    result, path = one_checkpoint
    result.model.num_timesteps = 60
    newest = ckpt.save_checkpoint(result.run_dir, result.model, "{}", {})
    (path.parent / "latest").write_text(path.name)  # a crash between the rename and the pointer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.find_latest(result.run_dir) == newest


def test_clean_stale_removes_every_leftover_and_puts_back_only_a_complete_checkpoint(one_checkpoint):
    result, path = one_checkpoint
    root = path.parent
    (root / ".latest.x1y2z3.tmp").write_text("step_")  # write_atomically's temporary file of ``latest``
    (root / f".tmp-{ckpt.step_name(60)}-1-abcd1234").mkdir()
    (root / f".trash-{ckpt.step_name(20)}-1").mkdir()
    shutil.copytree(path, root / f".old-{path.name}-0123abcd")  # its checkpoint is in place: a leftover
    half = root / f".old-{ckpt.step_name(80)}-4567cdef"  # incomplete: deleted, not put back
    half.mkdir()
    (half / "model.zip").write_bytes(b"partial")
    ckpt.clean_stale(result.run_dir)
    assert sorted(p.name for p in root.iterdir()) == sorted(["latest", path.name])
    assert ckpt.find_latest(result.run_dir) == path


def test_env_state_of_other_envs_is_reported_not_restored():
    from stable_baselines3.common.vec_env import DummyVecEnv

    def venv(*makers):
        env = DummyVecEnv(list(makers))
        env.seed(0)
        env.reset()
        return env

    # Another number of envs.
    assert ckpt.set_env_state(venv(DotEnv, DotEnv), ckpt.env_state(venv(DotEnv))) is False
    # No simulator state for a MuJoCo env.
    pendulum = venv(lambda: gym.make("InvertedPendulum-v5"))
    assert ckpt.set_env_state(venv(lambda: gym.make("InvertedPendulum-v5")), ckpt.env_state(venv(DotEnv))) is False
    # The simulator state of another MuJoCo model (another state size).
    assert ckpt.set_env_state(venv(lambda: gym.make("Hopper-v5")), ckpt.env_state(pendulum)) is False


def test_the_simulator_data_of_another_model_of_the_same_data_size_is_not_restored():
    # mj_copyData refuses only data buffers of another size: a second motor fits the same buffer, and
    # would be copied in (its ctrl and actuator rows read as this model's) unless the sizes are compared.
    import pickle

    import mujoco

    def model(motors: int):
        motor = '<motor joint="j"/>'
        return mujoco.MjModel.from_xml_string(
            '<mujoco><worldbody><body><joint name="j" type="hinge"/><geom size=".1"/></body></worldbody>'
            f'<actuator>{motor * motors}</actuator></mujoco>')

    one, two = model(1), model(2)
    saved = mujoco.MjData(two)
    saved.qpos[:], saved.ctrl[:] = 0.3, (0.5, -0.5)
    data = mujoco.MjData(one)
    assert data.nbuffer == saved.nbuffer, "the premise: a copy mj_copyData takes (this MuJoCo pads otherwise)"
    assert ckpt._restore_mjdata(mujoco, one, data, pickle.dumps(saved)) is False
    assert data.qpos[0] == 0 and data.ctrl[0] == 0
    same = mujoco.MjData(one)
    same.qpos[:], same.ctrl[:] = 0.3, 0.5
    assert ckpt._restore_mjdata(mujoco, one, data, pickle.dumps(same)) is True
    assert data.qpos[0] == 0.3 and data.ctrl[0] == 0.5


def test_a_run_folder_is_held_by_one_holder_at_a_time(tmp_path):
    from vlmrm_fast.train import run_lock

    run_dir = tmp_path / "new" / "run"  # made by the lock
    with run_lock.hold_run_folder(run_dir):
        with pytest.raises(run_lock.RunFolderBusy, match=rf"in use by another training process \(pid {os.getpid()} on "):
            with run_lock.hold_run_folder(run_dir):
                pass
    with run_lock.hold_run_folder(run_dir):  # released when its block ends
        pass


def test_resuming_a_run_folder_whose_run_has_no_checkpoint_yet_names_its_holder(tmp_path):
    # A requeued job resumes while its first copy is still starting: "no checkpoints folder, start a new run"
    # would be wrong advice (a new run there is refused too); the holder is named, as a new run's error does.
    import argparse

    from vlmrm_fast.train import run_lock
    from vlmrm_fast.train.command import config_from_args
    from vlmrm_fast.train.run import _check_resume_folder

    run_dir = tmp_path / "run"
    with run_lock.hold_run_folder(run_dir):
        with pytest.raises(run_lock.RunFolderBusy, match=rf"in use by another training process \(pid {os.getpid()} on "
                                                         r".*not written a complete checkpoint yet.*then --resume it"):
            _check_resume_folder(run_dir)
        # Its first checkpoint being written: checkpoints/ holds a .tmp- folder only.
        (run_dir / "checkpoints" / ".tmp-step_000000000040-1-abcd").mkdir(parents=True)
        args = argparse.Namespace(set=[], preset=None, config=None, resume=run_dir, print_config=False,
                                  **{f"field_{k}": None for k in TrainConfig.__dataclass_fields__})
        with pytest.raises(run_lock.RunFolderBusy, match="not written a complete checkpoint yet"):
            config_from_args(args)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):  # the holder gone: the usual error
        config_from_args(args)
    shutil.rmtree(run_dir / "checkpoints")
    assert run_lock.busy_holder(run_dir) is None  # the holder gone: the usual error
    with pytest.raises(FileNotFoundError, match="no checkpoints folder"):
        _check_resume_folder(run_dir)


def test_a_lock_file_its_holder_removed_is_not_what_the_next_process_holds(tmp_path, monkeypatch):
    # Between a newcomer's open of .lock and its flock, the holder gives up a run whose set-up failed and
    # removes the folder. The newcomer's lock on the removed file would guard nothing: it must take a new one.
    from vlmrm_fast.train import run_lock

    run_dir = tmp_path / "run"
    opened, real_open = [], os.open

    def open_then_lose_it(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened and str(path).endswith(run_lock.LOCK_NAME):
            opened.append(path)
            assert run_lock.remove_unstarted_run(run_dir)  # the holder's clean-up, just after our open
        return fd

    with run_lock.hold_run_folder(run_dir):
        pass
    monkeypatch.setattr(run_lock.os, "open", open_then_lose_it)
    with run_lock.hold_run_folder(run_dir):
        assert opened and (run_dir / run_lock.LOCK_NAME).is_file()
        with pytest.raises(run_lock.RunFolderBusy):  # the file at the path is the one held
            with run_lock.hold_run_folder(run_dir):
                pass


@pytest.mark.parametrize("lost_in", ["open", "mkdir"])
def test_a_run_folder_its_holder_removes_while_a_newcomer_makes_it_is_made_again(tmp_path, monkeypatch, lost_in):
    # The holder of a run whose set-up failed removes the folder (remove_unstarted_run) just after a newcomer's
    # mkdir found it ("open": the open of .lock then raised FileNotFoundError), or inside that mkdir (EEXIST,
    # then no folder: pathlib raised FileExistsError). The newcomer is not refused, nor told a file is missing:
    # it makes the folder again and holds it.
    from vlmrm_fast.train import run_lock

    run_dir = tmp_path / "run"
    with run_lock.hold_run_folder(run_dir):
        pass
    removed = []

    def removed_first(real, target, error=None):
        def call(path, *args):
            if not removed and Path(path) == target:
                removed.append(path)
                assert run_lock.remove_unstarted_run(run_dir)  # the holder's clean-up, just before
                if error is not None:
                    raise error
            return real(path, *args)
        return call

    if lost_in == "open":
        monkeypatch.setattr(run_lock.os, "open", removed_first(os.open, run_dir / run_lock.LOCK_NAME))
    else:
        lose_it = removed_first(os.mkdir, run_dir, FileExistsError(17, "File exists"))
        monkeypatch.setattr(run_lock.os, "mkdir", lose_it)
        accessor = getattr(pathlib, "_normal_accessor", None)  # Python 3.10's Path.mkdir calls os.mkdir through it
        if accessor is not None:
            monkeypatch.setattr(accessor, "mkdir", lose_it)
    with run_lock.hold_run_folder(run_dir):
        assert removed and (run_dir / run_lock.LOCK_NAME).is_file()
        with pytest.raises(run_lock.RunFolderBusy):  # the file at the path is the one held
            with run_lock.hold_run_folder(run_dir):
                pass


def test_a_lock_file_that_cannot_be_made_is_an_error_not_a_loop(tmp_path):
    # hold_run_folder tries again when the folder vanished under it (a holder's clean-up), a bounded number of
    # times: a .lock that links into a missing folder, or a file at run_dir, fail every time.
    from vlmrm_fast.train import run_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / run_lock.LOCK_NAME).symlink_to(tmp_path / "missing" / "lock")
    with pytest.raises(FileNotFoundError):
        with run_lock.hold_run_folder(run_dir):
            pass
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        with run_lock.hold_run_folder(tmp_path / "file"):
            pass


def test_a_new_run_whose_set_up_fails_leaves_no_folder_behind(tmp_path):
    # Each failed start (a mistyped env id, weights that could not be downloaded) left a folder with
    # config.json and .lock. A folder that existed before, or holds anything else, stays as it was.
    from vlmrm_fast.train import train
    from vlmrm_fast.train.run_lock import remove_unstarted_run

    bad = dict(env_id="test_train:VlmrmTestNoRender-v0")
    config = dot_config(tmp_path, run_dir=str(tmp_path / "runs" / "new"), **bad)
    with pytest.raises(ValueError, match='render_mode="rgb_array"'):
        train(config)
    assert not (tmp_path / "runs" / "new").exists() and (tmp_path / "runs").is_dir()

    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(ValueError, match='render_mode="rgb_array"'):
        train(dot_config(tmp_path, run_dir=str(mine), **bad))
    assert mine.is_dir()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert remove_unstarted_run(kept, keep=["config.json"]) is False and (kept / "notes.txt").read_text() == "mine"


def test_env_state_is_a_snapshot_not_a_view_of_the_running_envs():
    from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

    venv = VecMonitor(DummyVecEnv([DotEnv]))
    venv.seed(0)
    venv.reset()
    venv.step(np.full((1, 2), 0.5, np.float32))
    state = ckpt.env_state(venv)
    returns = state["wrappers"][0]["episode_returns"].copy()
    venv.step(np.full((1, 2), 0.5, np.float32))  # VecMonitor adds to its returns in place
    np.testing.assert_array_equal(state["wrappers"][0]["episode_returns"], returns)


def test_the_deferred_recorder_holds_one_rollout_and_hands_sac_placeholders(tmp_path):
    from stable_baselines3.common.vec_env import DummyVecEnv

    from vlmrm_fast.train.deferred import DeferredRewardRecorder, score_and_write_back

    rm = tiny_reward(dot_config(tmp_path))
    recorder = DeferredRewardRecorder(DummyVecEnv([lambda: gym.wrappers.TimeLimit(DotEnv(), 2)] * 2), rm, capacity=2,
                                      render="images")
    recorder.seed(0)
    recorder.reset()
    action = np.full((2, 2), 0.3, np.float32)
    buffer = SimpleNamespace(rewards=np.full((4, 2), np.nan, np.float32))
    nothing = score_and_write_back(recorder, rm, buffer, [])  # an empty rollout scores nothing
    assert [a.shape for a in nothing] == [(0, 2)] * 3 and np.isnan(buffer.rewards).all()
    _, placeholder, _, infos = recorder.step(action)
    assert (placeholder == 0).all() and all(info["gt_reward"] < 0 for info in infos)  # "replace": 0 until scored
    adding = DeferredRewardRecorder(DummyVecEnv([lambda: gym.wrappers.TimeLimit(DotEnv(), 2)] * 2), rm, capacity=2,
                                    render="images", mode="add")
    adding.reset()
    _, held, _, infos = adding.step(action)  # "add"/"log": the env reward until scored (a mutation audit: 0 passed)
    np.testing.assert_array_equal(held, [info["gt_reward"] for info in infos])
    assert (held < 0).all()
    adding.close()
    recorder.step(action)
    with pytest.raises(RuntimeError, match=r"deferred reward buffer full \(2 steps\)"):
        recorder.step(action)
    with pytest.raises(RuntimeError, match="recorded 2 steps but 1 replay slots"):
        score_and_write_back(recorder, rm, buffer, [0])
    recorder.reset()
    recorder.step(action)
    recorder.step(action)
    vlm, gt, dones = score_and_write_back(recorder, rm, buffer, [3, 3])  # one slot twice: the newest step wins
    np.testing.assert_array_equal(buffer.rewards[3], vlm[1])
    assert not dones[0].any() and dones[1].all()  # the 2-step episodes end on the second step
    kept = gt.copy(), dones.copy()
    for e in recorder.venv.envs:
        e.unwrapped.width = e.unwrapped.height = 24
    recorder.step(action)  # the next rollout: a new frame size is fine at its start, and leaves the last one's results alone
    np.testing.assert_array_equal(gt, kept[0])
    np.testing.assert_array_equal(dones, kept[1])
    for e in recorder.venv.envs:
        e.unwrapped.width = e.unwrapped.height = 32
    with pytest.raises(ValueError, match="frame size changed mid-rollout"):
        recorder.step(action)
    recorder.close()


# The next ones come from a third audit, of run.py and callbacks.py.


def _train_parser():
    import argparse

    from vlmrm_fast.train.command import add_train_parser

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser


def test_every_config_field_has_a_flag_that_reaches_it(tmp_path):
    # --no-progress / --no-tensorboard are False, not "not given"; --goal and --baseline repeat.
    import argparse

    from vlmrm_fast.train.command import add_train_parser, config_from_args

    parser = argparse.ArgumentParser()
    flags = set(add_train_parser(parser.add_subparsers(dest="command"))._option_string_actions)
    assert {"--" + name.replace("_", "-") for name in TrainConfig.__dataclass_fields__} <= flags
    config, resume = config_from_args(parser.parse_args([
        "train", "--preset", "smoke", "--no-progress", "--no-tensorboard", "--goal", "a red dot", "--goal", "a dot",
        "--baseline", "a square", "--alpha", "0.5", "--seed", "7", "--env-kwargs", '{"width": 40}']))
    assert resume is None and (config.progress, config.tensorboard) == (False, False)
    assert (config.goal, config.baseline, config.alpha, config.seed) == (["a red dot", "a dot"], ["a square"], 0.5, 7)
    assert config.env_kwargs == {"width": 40}
    assert config_from_args(parser.parse_args(["train", "--preset", "smoke", "--progress"]))[0].progress is True


def test_the_command_line_beats_the_config_file_which_beats_the_preset(tmp_path):
    from vlmrm_fast.train.command import config_from_args

    path = tmp_path / "run.toml"
    path.write_text('seed = 3\ngamma = 0.9\n[sac]\ntau = 0.5\n')
    config, _ = config_from_args(_train_parser().parse_args(
        ["train", "--preset", "smoke", "--config", str(path), "--seed", "5", "--set", "tau=0.25"]))
    assert (config.seed, config.tau, config.gamma, config.model) == (5, 0.25, 0.9, "vlmrm-tiny")
    # A preset run gets its own dated folder (runs/smoke-...) unless one is given; other runs name theirs in train().
    assert Path(config.run_dir).parent == Path("runs") and Path(config.run_dir).name.startswith("smoke-")
    config, _ = config_from_args(_train_parser().parse_args(["train", "--preset", "smoke", "--run-dir", "mine"]))
    assert config.run_dir == "mine"
    assert config_from_args(_train_parser().parse_args(["train", "--config", str(path)]))[0].run_dir is None


def test_resume_refuses_another_run_dir_from_the_config_file(tmp_path):
    # Checked before the folder is read: no run is needed.
    from vlmrm_fast.train.command import config_from_args

    path = tmp_path / "run.toml"
    path.write_text(f'run_dir = "{tmp_path / "elsewhere"}"\n')
    with pytest.raises(ValueError, match=r"run_dir '.*elsewhere' is given in '.*run.toml': drop it"):
        config_from_args(_train_parser().parse_args(["train", "--config", str(path), "--resume", str(tmp_path / "run")]))


def test_a_second_config_preset_or_resume_is_refused(tmp_path, capsys):
    # argparse keeps the last: `--config base.toml --config sweep.toml` trained without base.toml's settings.
    from vlmrm_fast.train.run import main

    first, second = tmp_path / "base.toml", tmp_path / "sweep.toml"
    first.write_text("gamma = 0.9\n")
    second.write_text("alpha = 0.5\n")
    assert main(["--preset", "smoke", "--config", str(first), "--config", str(second), "--print-config"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"vlmrm-fast train: error: --config is given twice ({first} and {second}); it takes one: give the "
                   "other's settings as flags (--set KEY=VALUE), which win over the file's")
    for argv in (["--preset", "smoke", "--preset", "kneeling"], ["--resume", "a", "--resume", "b"]):
        assert main([*argv, "--print-config"]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"vlmrm-fast train: error: {argv[0]} is given twice; give it once"
    assert main(["--preset", "smoke", "--config", str(first), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["gamma"] == 0.9


def test_fields_given_but_unused_are_named(tmp_path):
    # As score's note on --baseline at --alpha 0: a value given that the run does not use, not a preset's or a default.
    from vlmrm_fast.train.command import config_from_args

    def warned(*argv: str) -> list:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config_from_args(_train_parser().parse_args(["train", *argv]))
        return [str(w.message) for w in caught]

    assert warned("--preset", "smoke", "--baseline", "a robot") == [
        "baseline is unused at alpha 0 (the default: the reward is the cosine similarity to the goal); give --alpha "
        "in (0, 1] to use it"]
    path = tmp_path / "run.toml"
    path.write_text('baseline = "a robot"\nvideo_length = 5\n')
    assert warned("--preset", "smoke", "--config", str(path), "--eval-episodes", "2")[1] == (
        "eval_episodes, video_length are unused at eval_every 0 (no evaluations); give --eval-every N to evaluate "
        "every N steps")
    assert warned("--preset", "smoke", "--config", str(path), "--alpha", "0.5", "--eval-every", "100") == []
    assert warned("--preset", "smoke", "--baseline", "none") == warned("--preset", "smoke", "--goal", "a robot kneeling") == []
    assert warned("--preset", "kneeling") == []  # the preset's own baseline at alpha 0, the paper's


def test_resume_compares_a_date_like_run_dir_as_the_config_reads_it(tmp_path, monkeypatch):
    # TOML and --set read an unquoted 2024-05-01 as a date; the comparison with --resume raised TypeError.
    from vlmrm_fast.train.command import config_from_args

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.toml"
    path.write_text("run_dir = 2024-05-01\n")
    with pytest.raises(ValueError, match=r"run_dir '2024-05-01' is given in '.*run.toml': drop it"):
        config_from_args(_train_parser().parse_args(["train", "--config", str(path), "--resume", "elsewhere"]))
    with pytest.raises(FileNotFoundError, match="no run folder .2024-05-01. to resume") as same_folder:  # past it
        config_from_args(_train_parser().parse_args(["train", "--set", "run_dir=2024-05-01", "--resume", "2024-05-01"]))
    assert "is given on the command line" not in str(same_folder.value)


def test_the_command_line_entry_point_answers_with_exit_codes(tmp_path, capsys, monkeypatch):
    from vlmrm_fast.train.run import main

    assert main(["--help"]) == 0
    assert main(["--preset", "nope"]) == 2  # argparse's own refusal
    capsys.readouterr()
    # --print-config refuses what train would refuse; a missing file (an OSError) is an error line, not a traceback.
    assert main(["--preset", "smoke", "--set", "alpha=2", "--print-config"]) == 2
    assert "alpha must be in [0, 1]" in capsys.readouterr().err
    assert main(["--preset", "smoke", "--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmrm-fast: error: config file") and "does not exist" in err
    # A folder, or a file that is not UTF-8 (a binary picked by mistake): named, with the file.
    assert main(["--preset", "smoke", "--config", str(tmp_path), "--print-config"]) == 2
    assert capsys.readouterr().err == (f"vlmrm-fast: error: config file '{tmp_path}' is a folder; pass the TOML (or "
                                       ".json) file in it\n")
    (tmp_path / "run.toml").write_bytes(b'alpha = 0.5\ngoal = "caf\xe9"\n')  # Latin-1
    assert main(["--preset", "smoke", "--config", str(tmp_path / "run.toml"), "--print-config"]) == 2
    assert capsys.readouterr().err == (f"vlmrm-fast: error: config file '{tmp_path / 'run.toml'}' is not UTF-8 text "
                                       "(invalid continuation byte on line 2); save it as UTF-8 TOML (or .json)\n")
    assert main(["--preset", "smoke", "--seed", "4", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 4

    import io

    class ClosedPipe(io.StringIO):  # `--print-config | head -3`, head gone: quiet, with the code for SIGPIPE
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["--preset", "smoke", "--print-config"]) == 141
    assert capsys.readouterr().err == ""
    # A backend or SAC device that the run would refuse (the backend only once the env had rendered) is refused here.
    assert main(["--preset", "smoke", "--reward-backend", "onxruntime", "--print-config"]) == 2
    assert capsys.readouterr().err == ("vlmrm-fast: error: reward_backend must be one of auto, torch, compile, "
                                       "onnxruntime, tensorrt, got 'onxruntime'\n")
    assert main(["--preset", "smoke", "--goal", "caf\udce9", "--print-config"]) == 2  # argv's Latin-1 'café'
    assert capsys.readouterr().err == ("vlmrm-fast: error: the prompt 'caf\\udce9' is not text: it holds a byte that is "
                                       "not UTF-8, from a terminal or file in another encoding; retype it as UTF-8\n")
    assert main(["--preset", "smoke", "--sac-device", "gpu", "--print-config"]) == 2
    assert capsys.readouterr().err == ("vlmrm-fast: error: sac_device='gpu' is not a torch device: pass auto, cpu, "
                                       "cuda or cuda:N\n")


@pytest.mark.parametrize("argv,said", [
    (["--reward-backend", "onnxruntime", "--reward-dtype", "bf16"],
     "--reward-backend onnxruntime on CPU runs float32, not bf16; pass --reward-dtype fp32."),
    (["--reward-backend", "tensorrt"], "--reward-backend tensorrt needs a CUDA device; use --reward-backend onnxruntime "
                                       "or torch on CPU."),
    (["--goal", "a robot", "--baseline", "a robot", "--alpha", "0.5"], "Pass --alpha 0, or give a --baseline that "
                                                                        "differs from the goal."),
], ids=["dtype", "backend", "alpha"])
def test_the_reward_models_errors_name_the_train_flags(monkeypatch, capsys, argv, said):
    # CLIPReward's errors are written for Python callers (backend='onnxruntime', dtype=torch.float32): the command
    # names its own flags, as score does. The reward model is built as train builds it, without the envs.
    from vlmrm_fast import cli
    from vlmrm_fast.train import command
    from vlmrm_fast.train.run import build_reward_model

    monkeypatch.setattr(command, "train", lambda config, resume: build_reward_model(config))
    assert cli.main(["train", "--preset", "smoke", "--reward-device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("vlmrm-fast: error: ") and err.endswith(said), err
    assert "=" not in err  # no Python keyword left
    # Names that end in a translated one are the fields' own, kept: sac_device='...' is not --device.
    from vlmrm_fast.argtypes import in_cli_terms

    assert in_cli_terms("sac_device='x' and reward_backend='y'; device='cpu'", device_flag="--reward-device") == (
        "sac_device='x' and reward_backend='y'; --reward-device cpu")


def test_a_second_signal_exits_with_the_shells_code_for_it(tmp_path, monkeypatch, capsys):
    # Through both entry points: the vlmrm-fast console script (vlmrm_fast.cli) and python -m vlmrm_fast.train.run.
    import copy

    from vlmrm_fast import cli
    from vlmrm_fast.train import command, run
    from vlmrm_fast.train.callbacks import StoppedAtOnce

    argv = ["--preset", "smoke", "--run-dir", str(tmp_path / "run")]
    for main in (run.main, lambda argv: cli.main(["train", *argv])):
        for raised, code, said in ((StoppedAtOnce(signal.SIGTERM), 143, "SIGTERM again: stopped at once"),
                                   (StoppedAtOnce(signal.SIGINT), 130, "SIGINT again: stopped at once"),
                                   (KeyboardInterrupt(), 130, "error: interrupted")):
            def train(config, resume=None, raised=raised):
                raise raised

            monkeypatch.setattr(command, "train", train)
            assert main(argv) == code, raised
            assert said in capsys.readouterr().err, raised
    assert copy.copy(StoppedAtOnce(signal.SIGTERM)).signum == signal.SIGTERM


def test_a_size_asked_for_in_one_dimension_is_exact_too(tmp_path):
    from vlmrm_fast.train.run import check_env_frames

    config = dot_config(tmp_path, env_id="test_train:VlmrmTestFixedSize-v0", render_width=32, render_height=None)
    with pytest.raises(ValueError, match="does not take width/height"):
        check_env_frames(config, 32, 32)
    # Only the model's input size (nothing set): rendered at the env's own size, with a note.
    config = dataclasses.replace(config, render_width=None)
    with pytest.warns(UserWarning, match="renders 40x24, not the 32x32 asked for"):
        assert check_env_frames(config, 32, 32) == (24, 40)


class FloatFrameEnv(DotEnv):
    def render(self):
        return super().render().astype(np.float32) / 255


def test_frames_that_are_not_uint8_are_a_clear_error(tmp_path):
    from vlmrm_fast.train.run import check_env_frames

    if "VlmrmTestFloatFrames-v0" not in gym.registry:
        gym.register("VlmrmTestFloatFrames-v0", entry_point=FloatFrameEnv)
    with pytest.raises(ValueError, match=r"rendered ndarray \(32, 32, 3\) float32, not a uint8 RGB frame"):
        check_env_frames(dot_config(tmp_path, env_id="VlmrmTestFloatFrames-v0"), 32, 32)


def test_a_run_renders_its_width_and_height_and_gives_sac_its_ent_coef(tmp_path):
    from vlmrm_fast.train import train

    shapes = []

    def brightness(frames):
        shapes.append(tuple(np.shape(frames)[1:]))
        return np.asarray(frames, dtype=np.float64).mean(axis=(1, 2, 3))

    config = dot_config(tmp_path, render_width=40, render_height=24, ent_coef="0.05", total_timesteps=20,
                        checkpoint_every=0)
    result = train(config, reward_model=brightness)
    assert shapes and set(shapes) == {(24, 40, 3)}
    assert result.model.log_ent_coef is None and float(result.model.ent_coef_tensor) == pytest.approx(0.05)
    # RUN_DIR/config.json: the effective config.
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved == json.loads(dataclasses.replace(config, run_dir=str(result.run_dir)).to_json())


def test_each_session_logs_to_its_own_csv_and_tensorboard_can_be_turned_off(tmp_path):
    import csv

    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=0)
    first = train(config, reward_model=top_heavy_brightness)
    train(dataclasses.replace(config, total_timesteps=80, tensorboard=False), resume=first.run_dir,
          reward_model=top_heavy_brightness)
    tb = first.run_dir / "tb"

    def steps(name):
        with open(tb / name) as f:
            return [int(float(row["time/total_timesteps"])) for row in csv.DictReader(f)]

    assert steps("progress.csv") == [20, 40] and steps("progress-from-40.csv") == [60, 80]
    assert [step for step, _ in tb_scalars(first.run_dir)["time/total_timesteps"]] == [20, 40]  # none from session 2


def test_a_row_holds_per_rollout_stage_times_and_this_intervals_steps_per_s(tmp_path, monkeypatch):
    from vlmrm_fast.train import callbacks

    recorded, dumps = {}, []
    logger = SimpleNamespace(record=recorded.__setitem__, dump=dumps.append)
    callback = callbacks.TrainingCallback(dot_config(tmp_path), None, tmp_path, "{}",
                                          timed_env=SimpleNamespace(env_s=7.0, render_s=5.0, reward_s=3.0))
    callback.model = SimpleNamespace(num_timesteps=1040, logger=logger)
    callback._stage.update(sac_update_s=0.8, eval_s=1.2, checkpoint_s=0.8)
    callback._stage_seen = {"render_s": 1.0, "reward_s": 1.0, "env_s": 1.0}  # counted in the previous row
    callback._rollouts, callback._log_t = 2, 100.0
    callback._log_step = callback._rate_step = 1000  # a resumed run: steps from 1000 on
    callback._done_vlm, callback._done_gt = [1.0, 2.0], [-3.0, -5.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: 104.0)
    callback._log()
    # 40 steps in 4 s of wall clock, 2 s of them in the evaluation and checkpoint writes
    assert recorded == {"rollout/vlm_return": 1.5, "rollout/gt_return": -4.0, "time/steps_per_s": 10.0,
                        "time/train_steps_per_s": 20.0, "time/render_s": 2.0, "time/reward_s": 1.0, "time/env_s": 3.0,
                        "time/sac_update_s": 0.4, "time/eval_s": 0.6, "time/checkpoint_s": 0.4,
                        "time/total_timesteps": 1040}
    assert dumps == [1040]


def test_training_in_another_thread_keeps_the_signal_handlers_alone(tmp_path):
    # A notebook or a GUI may train in a worker thread: Python allows signal handlers only in the main one.
    import threading

    from vlmrm_fast.train.callbacks import TrainingCallback

    before = signal.getsignal(signal.SIGTERM)
    callback, errors = TrainingCallback(dot_config(tmp_path), None, tmp_path, "{}"), []

    def install():
        try:
            callback._install_signal_handlers()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    worker = threading.Thread(target=install)
    worker.start()
    worker.join()
    callback.restore_signal_handlers()
    assert errors == [] and signal.getsignal(signal.SIGTERM) == before


def test_an_evaluation_that_cannot_write_its_video_is_skipped_with_a_warning(tmp_path, monkeypatch):
    # No ffmpeg, a full disk: training goes on and keeps its checkpoints.
    from vlmrm_fast.train import callbacks, train

    def no_ffmpeg(*args, **kwargs):
        raise OSError("no ffmpeg (simulated)")

    monkeypatch.setattr(callbacks, "evaluate_policy_video", no_ffmpeg)
    config = dot_config(tmp_path, total_timesteps=40, eval_every=20, checkpoint_every=20)
    with pytest.warns(UserWarning, match=r"evaluation at step 20 skipped: OSError: no ffmpeg \(simulated\); training goes on"):
        result = train(config, reward_model=top_heavy_brightness)
    assert result.num_timesteps == 40 and result.checkpoint.name == ckpt.step_name(40)
    assert not {"eval/gt_return", "eval/vlm_return"} & tb_tags(result.run_dir)
    # The final evaluation failed too: a resume with no steps left makes it (it was counted done), once ffmpeg
    # is back; failing again, it is not reported done.
    with pytest.warns(UserWarning, match="evaluation at step 40 skipped"):
        assert not train(config, resume=result.run_dir, reward_model=top_heavy_brightness).evaluated_only
    monkeypatch.undo()
    again = train(config, resume=result.run_dir, reward_model=top_heavy_brightness)
    assert again.evaluated_only and (result.run_dir / "videos" / "eval_step_000000000040.mp4").exists()
    assert {"eval/gt_return", "eval/vlm_return"} <= tb_tags(result.run_dir)
    done = train(config, resume=result.run_dir, reward_model=top_heavy_brightness)
    assert not done.evaluated_only  # recorded in the checkpoint: a further resume does not evaluate again


class FatalError(Exception):
    """Stands for mujoco.FatalError (a plain Exception), matched by its name as MuJoCo's is."""


def test_a_size_gl_cannot_render_is_an_error_naming_the_size_to_change(tmp_path, monkeypatch):
    # MuJoCo's offscreen framebuffer past GL's size limit: a traceback at start-up (training size) or mid-run,
    # losing the steps since the last checkpoint (video size, at an evaluation).
    from vlmrm_fast.train import callbacks, train
    from vlmrm_fast.train.run import check_env_frames

    with pytest.raises(ValueError, match=r"cannot render frames of the size asked \(Offscreen framebuffer is not "
                                         r"complete.*choose a smaller render_width and render_height"):
        check_env_frames(dot_config(tmp_path, env_id="vlmrm_fast/TexturedHumanoid-v0", render_width=70000,
                                    render_height=8), 70000, 8)  # past every GL's limit (32768 at most)

    def too_large(*args, **kwargs):
        raise FatalError("Offscreen framebuffer is not complete, error 0x8cd6")

    monkeypatch.setattr(callbacks, "evaluate_policy_video", too_large)
    config = dot_config(tmp_path, total_timesteps=40, eval_every=20, checkpoint_every=40)
    with pytest.warns(UserWarning, match=r"evaluation at step 20 skipped: FatalError: Offscreen framebuffer.*choose a "
                                         r"smaller video_width and video_height"):
        result = train(config, reward_model=top_heavy_brightness)
    assert result.checkpoint.name == ckpt.step_name(40)

    def a_bug(*args, **kwargs):
        raise FatalError("mj_step: bad state")  # not a size: the evaluation's own error stops the run

    monkeypatch.setattr(callbacks, "evaluate_policy_video", a_bug)
    with pytest.raises(FatalError, match="bad state"):
        train(dot_config(tmp_path / "b", total_timesteps=40, eval_every=20), reward_model=top_heavy_brightness)


def test_the_evaluation_video_is_the_first_episode_at_the_envs_frame_rate(tmp_path):
    import imageio.v2 as imageio

    from vlmrm_fast.train import train
    from vlmrm_fast.train.callbacks import evaluate_policy_video

    config = dot_config(tmp_path, total_timesteps=20, checkpoint_every=0, episode_length=15, eval_episodes=2)
    model = train(config, reward_model=top_heavy_brightness).model

    def video(**kw):
        path, _, _ = evaluate_policy_video(model, dataclasses.replace(config, **kw), top_heavy_brightness,
                                           tmp_path / str(kw.get("video_length", "whole")))
        reader = imageio.get_reader(path)
        try:
            return reader.count_frames(), reader.get_meta_data()["fps"]
        finally:
            reader.close()

    assert video() == (15, 10)  # one episode of 15 frames, not both; DotEnv's render_fps
    assert video(video_length=6) == (6, 10)
    assert video(video_length=30) == (15, 10)  # longer than an episode: still the first episode only


def test_an_evaluation_video_cut_short_is_never_left_under_its_name(tmp_path, monkeypatch):
    # imageio wrote straight to videos/eval_step_N.mp4: a full disk or a crash mid-encode left a short or broken
    # mp4 under the step's name, read as that step's evaluation. Now the encoder writes a temporary file
    # (ending in .mp4: ffmpeg picks the format by extension), renamed into place once complete.
    import imageio.v2 as imageio

    from vlmrm_fast.train import train
    from vlmrm_fast.train.callbacks import evaluate_policy_video

    config = dot_config(tmp_path, total_timesteps=20, checkpoint_every=0, episode_length=7, eval_episodes=1)
    model = train(config, reward_model=top_heavy_brightness).model
    videos = tmp_path / "v" / "videos"
    real_mimwrite = imageio.mimwrite

    def disk_full_after_two_frames(uri, frames, **kwargs):
        real_mimwrite(uri, frames[:2], **kwargs)
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(imageio, "mimwrite", disk_full_after_two_frames)
    with pytest.raises(OSError, match="No space left"):
        evaluate_policy_video(model, config, top_heavy_brightness, tmp_path / "v")
    assert list(videos.iterdir()) == []  # neither a short video nor the temporary file
    monkeypatch.undo()
    path, _, _ = evaluate_policy_video(model, config, top_heavy_brightness, tmp_path / "v")
    assert list(videos.iterdir()) == [path] and path.name == "eval_step_000000000020.mp4"
    assert len(imageio.mimread(path)) == 7
    # A kill mid-encode leaves the hidden temporary file: the next session in the run folder removes it, and
    # nothing else there.
    partial = videos / ".eval_step_000000000040.mp4.k1ll3d.tmp.mp4"
    partial.write_bytes(b"the first frames of a video")
    (videos / ".notes").write_text("a user's file")
    train(dataclasses.replace(config, run_dir=str(tmp_path / "v"), total_timesteps=1, eval_every=0),
          reward_model=top_heavy_brightness)
    assert sorted(p.name for p in videos.iterdir()) == [".notes", path.name]


@pytest.mark.parametrize("height,width,written", [(60, 100, (60, 100)), (27, 33, (28, 34))])
def test_the_evaluation_video_keeps_its_size_and_pixels(tmp_path, height, width, written):
    # imageio resized every frame to a multiple of 16 (60 x 100 became 64 x 112, the dot stretched); H.264 takes
    # even sizes, so an odd one gains a copy of its last row or column and keeps every pixel.
    import imageio.v2 as imageio

    from vlmrm_fast.train import train
    from vlmrm_fast.train.callbacks import evaluate_policy_video

    config = dot_config(tmp_path, total_timesteps=20, checkpoint_every=0, episode_length=5, eval_episodes=1,
                        video_width=width, video_height=height, render_width=width, render_height=height)
    model = train(config, reward_model=top_heavy_brightness).model
    path, _, _ = evaluate_policy_video(model, config, top_heavy_brightness, tmp_path / "v")
    frames = np.stack(imageio.mimread(path))
    assert frames.shape[1:] == written + (3,)
    env = DotEnv(width=width, height=height)  # the evaluation's first episode, its first frame
    obs, _ = env.reset(seed=config.seed + 1_000_003)
    env.step(model.predict(obs, deterministic=True)[0])
    expected = env.render()  # the background and the dot's colours survive H.264 within its loss
    assert np.abs(frames[0, :height, :width].astype(int) - expected.astype(int)).mean() < 12


def test_evaluations_are_scored_at_the_training_frame_size_and_filmed_at_the_video_size(tmp_path):
    # Rendered at 32 x 32 for training and 48 x 48 for the video: eval/vlm_return must score the frames
    # the reward model sees in training (a frame resized from the video size is another frame).
    import imageio.v2 as imageio

    from vlmrm_fast.train import train

    def width_reward(frames) -> np.ndarray:
        return np.full(len(frames), float(np.shape(frames)[2]))

    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=0, eval_every=40, episode_length=15,
                        eval_episodes=1, video_width=48, video_height=48)
    result = train(config, reward_model=width_reward)
    assert dict(tb_scalars(result.run_dir)["eval/vlm_return"]) == {40: 15 * 32.0}
    logged_gt = dict(tb_scalars(result.run_dir)["eval/gt_return"])[40]
    reader = imageio.get_reader(result.run_dir / "videos" / f"eval_step_{40:012d}.mp4")
    try:
        frames = [np.asarray(f) for f in reader]
    finally:
        reader.close()
    assert len(frames) == 15 and frames[0].shape == (48, 48, 3)
    # The video is the first scored episode, filmed from a second env in step: the square (DotEnv's
    # position) sits where the scored episode's last observation puts it.
    env = DotEnv(width=48, height=48)
    env.reset(seed=config.seed + 1_000_003)
    gt = 0.0
    for _ in range(15):
        action, _ = result.model.predict(env.pos, deterministic=True)
        gt += env.step(action)[1]
    def square_at(frame):  # the centre of the bright square (the mp4 blurs its edges)
        return np.argwhere(frame[..., 0] > 150).mean(axis=0)

    np.testing.assert_allclose(square_at(frames[-1]), square_at(env.render()), atol=1.0)
    assert np.abs(square_at(frames[-1]) - square_at(frames[0])).max() > 2  # it moved: a test that can fail
    assert logged_gt == pytest.approx(gt, rel=1e-6)


def test_an_env_that_renders_at_its_own_size_is_filmed_from_the_scored_episode(tmp_path, monkeypatch):
    # It ignores the video size, so a second env would only film the same frames again.
    from vlmrm_fast.train import run, train
    from vlmrm_fast.train.callbacks import evaluate_policy_video

    config = dot_config(tmp_path, env_id="test_train:VlmrmTestFixedSize-v0", render_width=None, render_height=None,
                        total_timesteps=20, checkpoint_every=0, eval_every=0, episode_length=10, eval_episodes=1,
                        video_width=32, video_height=32)
    result = train(config, reward_model=top_heavy_brightness)
    made, make_env = [], run.make_env
    monkeypatch.setattr(run, "make_env", lambda *a, **kw: made.append(make_env(*a, **kw)) or made[-1])
    steps = []
    monkeypatch.setattr(FixedSizeEnv, "step", lambda self, action: steps.append(id(self)) or DotEnv.step(self, action))
    frame = FixedSizeEnv().render()
    evaluate_policy_video(result.model, config, top_heavy_brightness, tmp_path / "v", frame.shape[:2])
    assert len(made) == 2 and set(steps) == {id(made[0].unwrapped)} and len(steps) == 10  # the scored env's only


def test_the_progress_bar_counts_env_steps_and_a_resumed_run_starts_at_its_step(tmp_path, capsys):
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=40, checkpoint_every=0, progress=True)
    first = train(config, reward_model=top_heavy_brightness)
    assert "40/40" in capsys.readouterr().err  # 2 envs: 2 steps per vector step
    train(dataclasses.replace(config, total_timesteps=60), resume=first.run_dir, reward_model=top_heavy_brightness)
    bar = capsys.readouterr().err
    assert "40/60" in bar and "60/60" in bar and "20/60" not in bar


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log_file(tmp_path, monkeypatch):
    # A cluster job's stderr is a file: a bar redrawn with \r there makes one line growing all run long.
    import io

    from tqdm import tqdm

    from vlmrm_fast.train import progress_bar

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)  # a notebook's stream: no file descriptor, tqdm's bar
    notebook = progress_bar.progress_display(total=100, initial=20)
    assert isinstance(notebook, tqdm)
    notebook.close()
    log.seek(0), log.truncate()
    log_file = open(tmp_path / "job.log", "w+")  # a job's log (a pipe is the same): lines
    monkeypatch.setattr(log, "fileno", log_file.fileno, raising=False)
    clock = iter(range(0, 1000, 25))  # each reading of the clock 25 s after the last
    monkeypatch.setattr(progress_bar.time, "monotonic", lambda: float(next(clock)))
    lines = progress_bar.progress_display(total=100, initial=20)
    assert isinstance(lines, progress_bar.ProgressLines)
    for _ in range(4):
        lines.update(10)  # at 25, 50, 75, 100 s: a line once 60 s have passed since the last
    lines.set_postfix(vlm_return="0.5")
    lines.write("SIGTERM: checkpointing")
    lines.close()
    text = log.getvalue()
    assert "\r" not in text
    assert [line.split(" [")[0] for line in text.splitlines()] == [
        "train:  20% 20/100", "train:  50% 50/100", "SIGTERM: checkpointing", "train:  60% 60/100"]
    assert text.splitlines()[-1].endswith("/step, vlm_return=0.5]")
    master, terminal = os.openpty()  # a terminal: the bar
    monkeypatch.setattr(log, "fileno", lambda: terminal, raising=False)
    bar = progress_bar.progress_display(total=100, initial=20)
    assert isinstance(bar, tqdm) and bar.n == 20
    bar.close()
    for fd in (master, terminal):
        os.close(fd)
    log_file.close()


def test_a_checkpoint_whose_model_and_meta_disagree_on_the_step_is_refused(tmp_path, one_checkpoint):
    # E.g. model.zip copied in from another checkpoint: resuming would misplace every schedule.
    from vlmrm_fast.train.run import _load_checkpoint, build_vec_env

    result, path = one_checkpoint
    meta = ckpt.read_meta(path)
    _write_meta(path, {**meta, "step": 60})
    config = dot_config(tmp_path)
    with pytest.raises(ValueError, match=r"is inconsistent \(model at step 40, meta 60\)"):
        _load_checkpoint(path, build_vec_env(config, top_heavy_brightness, 32, 32), config)


def test_help_names_every_tag_a_run_logs(tmp_path, capsys):
    # README sends readers to `vlmrm-fast train --help` for the full tag list: a tag added to the
    # callback must be added there too (SB3's own train/* tags are named as a group).
    from vlmrm_fast.train import train
    from vlmrm_fast.train.run import main

    result = train(dot_config(tmp_path, total_timesteps=40, eval_every=40, eval_episodes=1, checkpoint_every=0),
                   reward_model=top_heavy_brightness)
    tags = set(tb_scalars(result.run_dir))
    assert {"rollout/vlm_return", "time/steps_per_s", "eval/gt_return"} <= tags
    assert main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert sorted(t for t in tags if not t.startswith("train/") and t not in help_text) == []
    assert "SB3's train/*" in help_text


def test_a_field_given_as_a_flag_and_through_set_is_refused():
    from vlmrm_fast.train.command import config_from_args

    parser = _train_parser()
    with pytest.raises(ValueError, match=r"alpha is given twice on the command line \(--alpha and --set alpha=...\)"):
        config_from_args(parser.parse_args(["train", "--alpha", "0.5", "--set", "alpha=0.25"]))
    with pytest.raises(ValueError, match=r"n_envs is given twice .*\(--n-envs and --set n_envs=...\)"):
        config_from_args(parser.parse_args(["train", "--set", "n-envs=2", "--n-envs", "2"]))
    config, _ = config_from_args(parser.parse_args(["train", "--alpha", "0.5", "--set", "n_envs=3"]))
    assert (config.alpha, config.n_envs) == (0.5, 3)


@pytest.mark.parametrize("timing", ["step", "deferred"])
def test_a_render_size_the_config_chose_is_not_warned_about(tmp_path, timing):
    # The wrappers warn when frames need a resize to the tower's size; in train that size is the config's
    # choice (the smoke preset renders 64 x 64 on purpose), so the warning would only be noise.
    from vlmrm_fast.train import train

    class TowerOf224:
        image_size = (224, 224)

        def __call__(self, frames):
            return top_heavy_brightness(frames)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(dot_config(tmp_path, reward_timing=timing, total_timesteps=8, checkpoint_every=0), reward_model=TowerOf224())
    assert not [str(w.message) for w in caught if "resized" in str(w.message)]


def test_help_gives_every_fields_default(capsys):
    from vlmrm_fast.train.config import TrainConfig
    from vlmrm_fast.train.run import main

    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(the paper) (default: deferred)" in text and "regularisation strength in [0, 1] (default: 0.0)" in text
    assert "(default: a humanoid robot kneeling)" in text and "(default: 256, 256)" in text
    assert "(default: true)" in text and "(default: {})" in text
    assert text.count("(default:") >= len(dataclasses.fields(TrainConfig))


def test_the_readmes_config_file_example_is_a_valid_config(tmp_path):
    import re

    from conftest import ROOT

    from vlmrm_fast.train.command import config_from_args

    [example] = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (tmp_path / "run.toml").write_text(example)
    config, _ = config_from_args(_train_parser().parse_args(["train", "--config", str(tmp_path / "run.toml")]))
    config.validate()
    assert (config.model, config.n_envs, config.goal) == ("ViT-B-32", 8, ["a humanoid robot kneeling"])


# The next ones come from a fourth audit (mutations) of checkpoint.py, deferred.py, callbacks.py, run.py
# and atomic.py.


def test_a_stop_past_a_multiple_keeps_the_uninterrupted_runs_checkpoints_evaluations_and_rows(tmp_path, monkeypatch):
    # Rollouts of 20 steps (2 envs x 10); every=50: evaluation, checkpoint and row at 60 (the first boundary
    # past 50) and the end. A stop at 54 is already past 50: its checkpoint is extra and its row is the
    # last one before 100, so the resumed run still evaluates and checkpoints at 60 (not at 54, where its
    # partial rollout starts) and writes its next row at 100.
    from vlmrm_fast.train import train

    events = _record_evaluations_and_checkpoints(monkeypatch)

    def config_in(folder):
        return dot_config(folder, total_timesteps=100, eval_every=50, checkpoint_every=50, log_every=50,
                          eval_episodes=1)

    full = train(config_in(tmp_path / "full"), reward_model=tiny_reward(config_in(tmp_path)))
    uninterrupted, events[:] = list(events), []
    assert uninterrupted == [("eval", 60), ("save", 60), ("eval", 100), ("save", 100)]
    assert [step for step, _ in tb_scalars(full.run_dir)["time/total_timesteps"]] == [60, 100]

    config = config_in(tmp_path / "stopped")
    assert train_stopped_at(54, config, monkeypatch).num_timesteps == 54
    train(config, resume=config.run_dir, reward_model=tiny_reward(config))
    assert events == [("save", 54)] + uninterrupted
    got = tb_scalars(Path(config.run_dir))
    assert [step for step, _ in got["time/total_timesteps"]] == [54, 100]
    assert [step for step, _ in got["eval/gt_return"]] == [60, 100]


def test_evaluations_leave_the_training_run_alone(tmp_path, uninterrupted_runs):
    # eval_every may change on resume: evaluating (deterministic actions, its own env) must not draw from
    # the training RNG, or a run would depend on how often it was evaluated.
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=100, eval_every=40, eval_episodes=2)
    evaluated = train(config, reward_model=tiny_reward(config))
    assert [step for step, _ in tb_scalars(evaluated.run_dir)["eval/gt_return"]] == [40, 80, 100]
    _assert_same_run(evaluated, uninterrupted_runs(10))


def test_a_new_run_in_a_folder_that_holds_checkpoints_is_refused(tmp_path):
    # A second new run there would prune the first one's checkpoints (keep_checkpoints) and mix two runs.
    from vlmrm_fast.train import train

    config = dot_config(tmp_path, total_timesteps=40)
    first = train(config, reward_model=tiny_reward(config))
    with pytest.raises(ValueError, match=r"already holds checkpoints; continue it with --resume .*or choose another --run-dir"):
        train(dataclasses.replace(config, total_timesteps=80), reward_model=tiny_reward(config))
    assert ckpt.find_latest(first.run_dir) == first.checkpoint and first.checkpoint.name == ckpt.step_name(40)


def test_a_session_with_less_than_a_rollout_to_go_stops_at_total_timesteps(tmp_path):
    # Rollouts of 20 steps (2 envs x 10): a run of 10 steps, or a resumed run with 10 steps left, cuts its
    # only rollout short rather than running a whole one past total_timesteps.
    from vlmrm_fast.train import train

    short = dot_config(tmp_path / "short", total_timesteps=10, checkpoint_every=0)
    assert train(short, reward_model=tiny_reward(short)).num_timesteps == 10
    config = dot_config(tmp_path / "extended", total_timesteps=80, checkpoint_every=0)
    train(config, reward_model=tiny_reward(config))
    extended = train(dataclasses.replace(config, total_timesteps=90), resume=config.run_dir,
                     reward_model=tiny_reward(config))
    assert extended.num_timesteps == 90 and extended.checkpoint.name == ckpt.step_name(90)


def test_a_stop_inside_the_runs_cut_last_rollout_resumes_exactly_on_the_runs_own_train_freq(tmp_path, monkeypatch):
    # total 90 with rollouts of 20: the last rollout (80-90) is cut to 5 steps. Stopped at 84 in it, the
    # resumed run finishes it as the uninterrupted run does, and the run keeps train_freq 10 (what its
    # final checkpoint saves, and what an extension's rollouts use), not the shortened rollout's.
    from vlmrm_fast.train import train

    def config_in(folder):
        return dot_config(folder, total_timesteps=90, checkpoint_every=0)

    full = train(config_in(tmp_path / "full"), reward_model=tiny_reward(config_in(tmp_path)))
    config = config_in(tmp_path / "stopped")
    assert train_stopped_at(84, config, monkeypatch).num_timesteps == 84
    resumed = train(config, resume=Path(config.run_dir), reward_model=tiny_reward(config))
    _assert_same_run(resumed, full)
    assert resumed.model.train_freq.frequency == full.model.train_freq.frequency == 10


def test_the_first_row_after_a_resume_times_its_own_steps(tmp_path, monkeypatch):
    # Stage times are per row; a resumed session must not restore the last session's running totals from
    # the checkpoint (its first row would report the whole earlier session's env, render and reward time).
    from vlmrm_fast.train import train

    _slow_env_steps(monkeypatch)
    for timing in ("deferred", "step"):
        config = dot_config(tmp_path / timing, total_timesteps=120, checkpoint_every=0, eval_every=0,
                            learning_starts=0, reward_timing=timing)
        train(config, reward_model=tiny_reward(config))
        train(dataclasses.replace(config, total_timesteps=160), resume=config.run_dir,
              reward_model=tiny_reward(config))
        rows = dict(tb_scalars(Path(config.run_dir))["time/env_s"])
        assert sorted(rows) == [20, 40, 60, 80, 100, 120, 140, 160]
        # Restored totals would make the first row at least the six before it together (the earlier
        # session's whole env time); a row of its own is one of ~7 alike rows (the sleep dominates).
        earlier = sum(rows[step] for step in (20, 40, 60, 80, 100, 120))
        assert rows[140] < earlier, (timing, rows)


def test_the_checkpoint_folders_entries_reach_the_disk_before_it_is_renamed_into_place(one_checkpoint, monkeypatch):
    # Its files' data is flushed (test above), and the folder's entries too: else a power cut after the
    # rename (and the pruning of the older checkpoints) could leave a folder without its files.
    result, _ = one_checkpoint
    events = []
    real_fsync_dir, real_rename = ckpt._fsync_dir, os.rename
    monkeypatch.setattr(ckpt, "_fsync_dir", lambda path: (events.append(("fsync", Path(path).name)), real_fsync_dir(path))[1])
    monkeypatch.setattr(os, "rename", lambda src, dst: (events.append(("rename", Path(src).name)), real_rename(src, dst))[1])
    result.model.num_timesteps += 2
    ckpt.save_checkpoint(result.run_dir, result.model, "{}", {})
    into_place = next(i for i, e in enumerate(events) if e[0] == "rename" and e[1].startswith(".tmp-"))
    assert ("fsync", events[into_place][1]) in events[:into_place]


def test_a_checkpoint_of_another_format_is_not_taken(tmp_path, one_checkpoint):
    _, path = one_checkpoint
    other = tmp_path / "other"
    shutil.copytree(path, other)
    meta = ckpt.read_meta(other)
    _write_meta(other, dict(meta, format=ckpt.FORMAT + 1))
    assert ckpt.is_complete(path) and not ckpt.is_complete(other)


def test_files_written_atomically_get_the_permissions_of_a_plain_open_under_any_umask(tmp_path):
    # RUN_DIR/config.json, checkpoints/latest: readable by the group when the umask says so (0o002: 0o664).
    from vlmrm_fast.atomic import write_atomically

    for umask in (0o002, 0o077):
        old = os.umask(umask)
        try:
            write_atomically(tmp_path / f"written-{umask:o}", b"x")
            with open(tmp_path / f"plain-{umask:o}", "w"):
                pass
        finally:
            os.umask(old)
        mode = (tmp_path / f"written-{umask:o}").stat().st_mode & 0o777
        assert mode == (tmp_path / f"plain-{umask:o}").stat().st_mode & 0o777 == 0o666 & ~umask, oct(mode)


def test_an_episode_length_given_in_env_kwargs_is_refused_naming_episode_length(tmp_path):
    # gymnasium.make said "got multiple values for keyword argument 'max_episode_steps'", once the run had started.
    with pytest.raises(ValueError, match=r"env_kwargs sets max_episode_steps=10, .* give episode_length instead "
                                         r"\(--episode-length N, or --set episode_length=N\)"):
        dot_config(tmp_path, env_kwargs={"max_episode_steps": 10}).validate()


def test_a_typo_in_env_kwargs_is_named_as_such_not_as_a_render_size_refusal():
    # gymnasium's TypeError for an unknown keyword lists every keyword, width and height among them: that read
    # as "the env does not take width/height" (from a training user's audit).
    from vlmrm_fast.train.run import make_env

    config = apply_overrides(from_preset("smoke"), dict(render_width=32, render_height=32,
                                                        env_kwargs={"shadowsize": 1024}))
    with pytest.raises(ValueError, match=r"with env_kwargs \{'shadowsize': 1024\}: .*shadowsize.*check env_kwargs") as info:
        make_env(config, 32, 32)
    assert "does not take width/height" not in str(info.value)


def test_the_tiny_models_input_size_is_known_in_a_fresh_process():
    # `import vlmrm_fast` registers vlmrm-tiny lazily: train() with one render side set made the env with the
    # other side None (from a training user's audit).
    import subprocess
    import sys

    code = "from vlmrm_fast.train.run import model_input_size; print(model_input_size('vlmrm-tiny'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(224, 224)"


def test_default_run_folders_of_runs_started_in_the_same_second_differ():
    # A sweep started in one second shared a folder, and its lock refused all runs but one (a training user's audit).
    import os

    from vlmrm_fast.train.run import default_run_dir

    assert default_run_dir("smoke").name.endswith(f"-{os.getpid()}")


def test_the_start_up_warnings_stay_quiet_where_nothing_is_wrong(tmp_path):
    # (A mutation audit: each boundary below was unguarded.) Unit calls, no training.
    from vlmrm_fast.train import run

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # A finished run resumed (for its final evaluation, say): no step left, no "no gradient step" warning.
        done = dot_config(tmp_path, total_timesteps=40, learning_starts=40)
        run._warn_if_no_gradient_step(done, 40)
        # 61 on 2 envs, resumed at 60: the run ends at 62; "(or 60)", the step it is at, is no advice.
        run._warn_if_total_overshoots(dot_config(tmp_path, total_timesteps=62), 60)
        # A checkpoint from before reward_setup was recorded: nothing to compare, nothing to say.
        run._warn_if_reward_setup_changed(None, SimpleNamespace(), 0)
    with pytest.warns(UserWarning, match=r"ends at step 62\. Pass total_timesteps=62 to make it exact\.$"):
        run._warn_if_total_overshoots(dot_config(tmp_path, total_timesteps=61), 60)
    with pytest.warns(UserWarning, match=r"learning_starts=40 is not below total_timesteps=40"):
        run._warn_if_no_gradient_step(done, 20)


# From a mutation audit of train/ (each failed no surviving mutant before: the ground-truth sum not restarted,
# a field that changes the run made resumable, the preset's or the defaults' env and reward, "yes" read as false).


def test_restarted_episodes_log_their_own_gt_return_too(tmp_path, monkeypatch):
    # As test_episodes_restarted_by_a_resume_after_a_stop_inside_a_rollout_log_their_own_returns, for the
    # ground-truth sum: the new episodes (rows 22..41 of the buffer) log the sum of their own env rewards,
    # not that plus the 2 recorded steps (rows 20, 21) of the episodes the reset ended.
    from vlmrm_fast.train import train

    def one_a_frame(frames):
        return np.ones(len(frames))

    config = dot_config(tmp_path, total_timesteps=100, checkpoint_every=0, eval_every=0)
    stopped = train_stopped_at(44, config, monkeypatch, reward_model=one_a_frame)
    monkeypatch.setattr(ckpt, "set_env_state", lambda venv, state: False)
    with pytest.warns(UserWarning, match="episodes in progress restart"):
        result = train(config, resume=stopped.run_dir, reward_model=one_a_frame)
    buf = result.model.replay_buffer
    assert buf.dones[41].all() and not buf.dones[22:41].any()
    gt = -np.linalg.norm(buf.next_observations[22:42].astype(np.float64), axis=-1)  # DotEnv's reward: -|pos|
    logged = dict(tb_scalars(stopped.run_dir)["rollout/gt_return"])
    assert logged[100] == pytest.approx(gt.sum(axis=0).mean(), rel=1e-4)


def test_every_field_outside_resumable_fields_is_refused_by_a_resume(tmp_path):
    # The README: a resume may change only what does not alter the run. Each field that alters it, changed
    # alone, is reported (only seed and learning_rate were checked).
    documented = {"total_timesteps", "run_dir", "checkpoint_every", "keep_checkpoints", "eval_every",
                  "eval_episodes", "video_width", "video_height", "video_length", "tensorboard", "log_every",
                  "progress", "reward_device", "reward_backend", "reward_batch_size", "sac_device"}
    assert RESUMABLE_FIELDS == documented
    saved = dot_config(tmp_path)
    changed = dict(env_id="Other-v0", env_kwargs={"a": 1}, n_envs=3, episode_length=21, render_width=33,
                   render_height=31, model="ViT-B-32", pretrained="openai", goal=["x"], baseline=["y"], alpha=0.5,
                   preprocess="openclip", reward_mode="add", reward_weight=2.0, reward_timing="step",
                   reward_dtype="bfloat16", learning_rate=1e-3, batch_size=17, gamma=0.9, tau=0.01,
                   learning_starts=21, train_freq=11, gradient_steps=3, buffer_size=5001, ent_coef="0.1",
                   net_arch=[8], seed=1)
    assert set(changed) | documented == {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in changed.items():
        assert [d[0] for d in diff_configs(saved, dataclasses.replace(saved, **{name: value}))] == [name], name


# SPEC §1.3's paper-scale run; reward_mode "replace": VLM-RM trains on the CLIP reward alone.
SPEC_1_3 = dict(env_id="vlmrm_fast/TexturedHumanoid-v0", n_envs=32, episode_length=100, model="ViT-bigG-14",
                pretrained="laion2b_s39b_b160k", alpha=0.0, reward_mode="replace", reward_timing="deferred",
                batch_size=512, learning_rate=6e-4, gamma=0.95, tau=0.005, learning_starts=50_000, train_freq=100,
                gradient_steps=100, total_timesteps=10_000_000)


def test_the_kneeling_preset_is_the_papers_env_and_reward():
    kneel = from_preset("kneeling")
    assert {k: getattr(kneel, k) for k in SPEC_1_3} == SPEC_1_3


def test_the_defaults_are_the_papers_setup():
    # config.py: "Defaults are the paper's humanoid setup (SPEC §1.3)"; `vlmrm-fast train` without --preset
    # runs them, and the preset restating every value could not show a changed default.
    default = TrainConfig()
    assert {k: getattr(default, k) for k in SPEC_1_3} == SPEC_1_3


@pytest.mark.parametrize("text,value", [("true", True), ("yes", True), ("1", True), ("on", True), ("YES", True),
                                        ("false", False), ("no", False), ("0", False), ("off", False)])
def test_every_bool_spelling_reaches_its_value(text, value):
    config = apply_overrides(TrainConfig(), {"progress": text, "tensorboard": text})
    assert (config.progress, config.tensorboard) == (value, value)
