""":class:`VLMRewardVecEnv`: CLIP rewards for a stable-baselines3 VecEnv, all envs rendered and scored in one
batch per step. Without stable-baselines3 the module still imports; making one says what to install."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import gymnasium as gym
import numpy as np

from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.env_render import in_process_envs, release_env_gl, render_env
from vlmrm_fast.wrappers.batch_frames import _BatchFrames
from vlmrm_fast.wrappers.frame_checks import _RGB_FIX
from vlmrm_fast.wrappers.modes import _combine, _RewardMode
from vlmrm_fast.wrappers.scoring import _check_reward_model, _rewards_of
from vlmrm_fast.wrappers.terminal import (
    TERMINAL_FRAME_KEY,
    RenderTerminalFrame,
    _keep_terminal_states,
    _MujocoTerminalState,
)

if TYPE_CHECKING:  # SB3's own aliases for checkers (a fallback in the same branch would hide them)
    from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn
else:
    try:  # at run time too, for typing.get_type_hints
        from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn
    except ImportError:  # pragma: no cover - depends on the environment
        VecEnvObs = VecEnvStepReturn = Any
try:
    from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper
except ImportError:  # pragma: no cover - depends on the environment
    DummyVecEnv = VecEnv = None  # type: ignore[assignment,misc]
    VecEnvWrapper = object  # type: ignore[assignment,misc]
    _HAS_SB3 = False
else:
    _HAS_SB3 = True


class VLMRewardVecEnv(_RewardMode, _BatchFrames, VecEnvWrapper):
    """An SB3 VecEnv wrapper whose rewards are CLIP (VLM-RM) rewards, all envs scored in one batch per step.

    After each ``step_wait`` of the wrapped VecEnv, every env is rendered once and the N frames go through
    ``reward_model`` in one call; the rewards come back to the host as float32
    numpy [N] (SB3's convention). By ``mode``, each env's reward is ``r_vlm`` (``"replace"``),
    ``env_reward + weight * r_vlm`` (``"add"``) or ``env_reward`` (``"log"``).

    Rendering (``render=``):

    - ``"batch"``: :class:`vlmrm_fast.render.BatchRenderer` over ``venv.envs`` (the venv must be a
      ``DummyVecEnv`` of MuJoCo envs): frames stay on the GPU when the renderer runs there, and come in
      OpenGL row order (``bottom_up``), flipped inside a CLIPReward's preprocessing (by the wrapper, for a
      reward callable without a ``bottom_up`` parameter).
    - ``"images"``: ``venv.get_images()``: any VecEnv whose envs render RGB arrays; frames go through host
      memory (``SubprocVecEnv`` also pickles them through pipes; ``DummyVecEnv`` is the fast path).
    - ``"auto"`` (default): ``"batch"`` when possible (DummyVecEnv, MuJoCo envs, renderer importable and
      constructible), else ``"images"``. If the batch renderer fails at its first use, it falls back to
      ``"images"`` with a warning.

    Per-env ``info``: ``"gt_reward"`` (the env's reward), ``"vlm_reward"``, with several tasks
    ``"vlm_rewards"`` (``{task name: reward}``); on the step an episode ends, ``"episode_vlm_return"``,
    ``"episode_gt_return"`` (sums over the episode) and ``"vlm_terminal_frame"`` (whether the scored frame
    showed the terminal state: see :mod:`vlmrm_fast.wrappers` on auto-reset; ``True`` for DummyVecEnvs).

    Apply it directly on the VecEnv that steps the envs, under ``VecNormalize`` (so normalisation sees the
    VLM reward; one with ``norm_reward`` below it is refused but in ``"log"`` mode:
    :mod:`vlmrm_fast.wrappers.normalisers`) and under a ``VecMonitor``, to log the returns of the rewards it
    gives in SB3's ``ep_rew_mean`` (the ``Monitor`` that ``make_vec_env`` puts below it on each env records
    the env's own). The envs of a ``DummyVecEnv`` are wrapped in place (``venv.envs[i]``) by a wrapper that
    keeps each episode's terminal state; ``env_method``/``get_attr`` still reach the envs.

    Args:
        venv: the VecEnv; its envs made with ``render_mode="rgb_array"`` (needed for ``"images"``).
        reward_model: a :class:`~vlmrm_fast.CLIPReward`, or any reward callable (see :class:`VLMRewardWrapper`).
        mode: ``"replace"``, ``"add"`` or ``"log"``.
        weight: scale of the VLM reward in ``"add"`` mode (unused otherwise).
        render: ``"auto"``, ``"batch"`` or ``"images"``.
        task: which task (index or name in ``reward_model.task_names``) drives the reward.
    """

    def __init__(
        self,
        venv: "VecEnv",
        reward_model: Any,
        *,
        mode: str = "replace",
        weight: float = 1.0,
        render: str = "auto",
        task: Union[int, str] = 0,
    ) -> None:
        if not _HAS_SB3:  # pragma: no cover - depends on the environment
            raise ImportError("VLMRewardVecEnv needs stable-baselines3: pip install 'vlmrm-fast[train]'")
        if not isinstance(venv, VecEnv):
            if isinstance(venv, gym.vector.VectorEnv):
                fix = ("a gymnasium vector env: wrap it with vlmrm_fast.VLMRewardVectorWrapper, or build the envs as "
                       "an SB3 DummyVecEnv([make_env] * n)")
            else:
                fix = ("vectorise the env first, DummyVecEnv([make_env] * n), or wrap a single gymnasium env with "
                       "VLMRewardWrapper")
            raise TypeError(f"VLMRewardVecEnv wraps a stable-baselines3 VecEnv, not {type(venv).__name__}: {fix}.")
        _check_reward_model(reward_model, "VLMRewardVecEnv")
        super().__init__(venv)
        self._set_reward(reward_model, mode, weight, task, below=venv)
        self._episode_vlm = np.zeros(self.num_envs, dtype=np.float64)
        self._episode_gt = np.zeros(self.num_envs, dtype=np.float64)

        base = venv.unwrapped if isinstance(venv, VecEnvWrapper) else venv
        self._dummy: Optional["DummyVecEnv"] = base if isinstance(base, DummyVecEnv) else None
        mujoco_parts = self._set_up_frames(render, self._dummy.envs if self._dummy is not None else None, "DummyVecEnv")

        # Terminal frames (see vlmrm_fast.wrappers' docstring): wrap the envs of a DummyVecEnv in place.
        self._terminal_states: List[Optional[_MujocoTerminalState]] = [None] * self.num_envs
        self.terminal_frames = True
        if self._dummy is not None:
            self._terminal_states = _keep_terminal_states(self._dummy.envs, mujoco_parts, self.renderer is not None)
        else:
            try:
                wrapped = venv.env_is_wrapped(RenderTerminalFrame)
            except Exception:  # noqa: BLE001 - a VecEnv that cannot answer
                wrapped = [False] * self.num_envs
            self.terminal_frames = all(wrapped)
            if not self.terminal_frames:
                warnings.warn(
                    f"{type(venv).__name__} resets an env inside step_wait when its episode ends, so the frame "
                    "rendered after that step shows the next episode's first state: the terminal step's VLM reward "
                    "will be scored on it. Build the envs with vlmrm_fast.wrappers.RenderTerminalFrame inside "
                    "(make_vec_env(..., wrapper_class=RenderTerminalFrame)) to score the true terminal frame, or "
                    "use a DummyVecEnv.",
                    UserWarning,
                    stacklevel=stacklevel_outside_package(),
                )

    def _require_rgb_array(self) -> None:
        if self.venv.render_mode != "rgb_array":
            raise ValueError(
                f"VLMRewardVecEnv renders frames with venv.get_images(), so the envs must render RGB arrays; the "
                f"VecEnv's render_mode is {self.venv.render_mode!r}. Create the envs with render_mode=\"rgb_array\" "
                f"({_RGB_FIX}, or make_vec_env(env_id, n_envs, env_kwargs={{\"render_mode\": \"rgb_array\"}}))."
            )

    def reset(self) -> VecEnvObs:
        obs = self.venv.reset()
        self._episode_vlm[:] = 0.0
        self._episode_gt[:] = 0.0
        for state in self._terminal_states:
            if state is not None:
                state.pending = False
        return obs

    def _render(self, infos: Sequence[Dict[str, Any]]) -> Tuple[Any, bool, np.ndarray]:
        """All envs' frames (terminal states where an episode just ended): (frames, bottom_up, terminal [N] bool)."""
        with self._terminal_states_in() as terminal:
            batch = self._batch_frames()
            if batch is not None:
                for info in infos:
                    info.pop(TERMINAL_FRAME_KEY, None)
                return batch[0], batch[1], terminal
            envs = in_process_envs(self.venv)
            images = [render_env(env) for env in envs] if envs is not None else list(self.venv.get_images())
        for i, info in enumerate(infos):
            frame = info.pop(TERMINAL_FRAME_KEY, None)
            if frame is not None and not terminal[i]:
                images[i] = frame
                terminal[i] = True
        self._check_images(images, "The VecEnv")
        return images, False, terminal

    def step_wait(self) -> VecEnvStepReturn:
        obs, env_rewards, dones, infos = self.venv.step_wait()
        frames, bottom_up, terminal = self._render(infos)
        all_rewards = _rewards_of(self.reward_model, frames, bottom_up)  # [N, T]
        vlm = all_rewards[:, self._task_column(all_rewards.shape[1])]
        gt = np.asarray(env_rewards, dtype=np.float32).reshape(self.num_envs)
        rewards = _combine(self.mode, self.weight, gt, vlm).astype(np.float32)
        self._episode_vlm += vlm
        self._episode_gt += gt
        several = all_rewards.shape[1] > 1
        keys = self._reward_keys(all_rewards.shape[1])
        for i, info in enumerate(infos):
            info["gt_reward"] = float(gt[i])
            info["vlm_reward"] = float(vlm[i])
            if several:
                info["vlm_rewards"] = {name: float(r) for name, r in zip(keys, all_rewards[i])}
            if dones[i]:
                info["episode_vlm_return"] = float(self._episode_vlm[i])
                info["episode_gt_return"] = float(self._episode_gt[i])
                info["vlm_terminal_frame"] = bool(terminal[i])
                self._episode_vlm[i] = 0.0
                self._episode_gt[i] = 0.0
        return obs, rewards, dones, infos

    def close(self) -> None:
        self._close_renderer()
        for env in in_process_envs(self.venv) or ():
            release_env_gl(env)  # else freed later in whatever GL context is current: another env's
        self.venv.close()
