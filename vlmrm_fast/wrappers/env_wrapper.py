""":class:`VLMRewardWrapper`: the CLIP reward of one gymnasium env, its frame rendered and scored each step."""
from __future__ import annotations

from typing import Any, Dict, Optional, SupportsFloat, Tuple, Union

import gymnasium as gym
import numpy as np

from vlmrm_fast.env_render import release_env_gl, render_env
from vlmrm_fast.wrappers.frame_checks import _RGB_FIX, _check_frame, _declared_render_size, _frame_size, _warn_size
from vlmrm_fast.wrappers.modes import _combine, _RewardMode
from vlmrm_fast.wrappers.scoring import _check_reward_model, _rewards_of


class _SharedReference:
    """Stands for the reward model in ``env.spec``: deep copies of it are itself (the model is shared)."""

    __slots__ = ("target",)

    def __init__(self, target: Any) -> None:
        self.target = target

    def __deepcopy__(self, memo: dict) -> "_SharedReference":
        return self

    def __eq__(self, other: object) -> bool:  # specs of wrappers on the same model compare equal
        return isinstance(other, _SharedReference) and other.target is self.target

    def __hash__(self) -> int:
        return id(self.target)

    def __repr__(self) -> str:
        return f"<shared {type(self.target).__name__}>"


def _check_one_env(env: Any) -> None:
    """A TypeError naming the wrapper to use where ``env`` is not one gymnasium env (a vector env, an env id)."""
    if isinstance(env, gym.Env):
        return
    if isinstance(env, gym.vector.VectorEnv):
        fix = "for a gymnasium vector env use vlmrm_fast.VLMRewardVectorWrapper(envs, rm) (all envs in one batch)"
    elif hasattr(env, "step_wait") and hasattr(env, "num_envs"):  # stable-baselines3's VecEnv, without importing SB3
        fix = "for a stable-baselines3 VecEnv use vlmrm_fast.VLMRewardVecEnv(venv, rm) (all envs in one batch)"
    elif isinstance(env, str):
        fix = 'make the env first, gymnasium.make(env_id, render_mode="rgb_array")'
    else:
        fix = 'pass a gymnasium.Env (made with render_mode="rgb_array"); call an env factory first'
    raise TypeError(f"VLMRewardWrapper wraps one gymnasium env, not {type(env).__name__}: {fix}.")


class VLMRewardWrapper(_RewardMode, gym.Wrapper, gym.utils.RecordConstructorArgs):
    """A gymnasium wrapper whose reward is the CLIP (VLM-RM) reward of the frame rendered after each step.

    After ``env.step(action)`` the env is rendered once (``env.render()``, an RGB array) and the frame
    scored with ``reward_model``: ``r_vlm = 1 - 0.5 * |M (x - g)|^2`` for the frame's CLIP embedding ``x``
    (SPEC §1.1). The returned reward is, by ``mode``:

    - ``"replace"``: ``r_vlm``;
    - ``"add"``: ``env_reward + weight * r_vlm``;
    - ``"log"``: ``env_reward`` (``r_vlm`` only in ``info``).

    The reward is a Python float in every mode. ``info`` always gets ``"gt_reward"`` (the env's own
    reward, float) and ``"vlm_reward"`` (float); with a several-task reward model also ``"vlm_rewards"``
    (``{task name: reward}``), the task ``task`` driving the reward. On the step where the episode ends
    (terminated or truncated): ``"episode_vlm_return"`` and ``"episode_gt_return"``, the episode's sums.

    The wrapper holds ``reward_model`` itself, shared by every env it wraps, and so does an env made
    again from ``env.spec``: gymnasium deep-copies the constructor arguments it records there, and a
    copy of the CLIP model per env (or a failure, for a model holding a TensorRT engine) is never
    wanted, so the spec records a shared reference. In subprocess envs each worker holds its own copy.

    The frame may be any size (the reward model resizes it), but rendering at ``reward_model.image_size``
    skips the resize: a warning says so once when the sizes differ. One reward-model call per step; for
    many envs use :class:`VLMRewardVecEnv`, which scores them in one batch.

    Args:
        env: the environment, made with ``render_mode="rgb_array"``.
        reward_model: a :class:`~vlmrm_fast.CLIPReward`, or any callable ``rm(frames) -> rewards``: frames
            uint8 [N, H, W, 3] (a tensor or array, or a list of N [H, W, 3] arrays, as CLIPReward takes),
            rewards [N] or [N, T] (a tensor or array); ``image_size`` and ``task_names`` are read if present.
        mode: ``"replace"``, ``"add"`` or ``"log"``.
        weight: scale of the VLM reward in ``"add"`` mode (unused otherwise).
        task: which task (index or name in ``reward_model.task_names``) drives the reward.

    Raises:
        TypeError: ``env`` is not one gymnasium env (a vector env: :class:`VLMRewardVecEnv` and
            :class:`~vlmrm_fast.VLMRewardVectorWrapper` score those).
        ValueError: the env's render mode is not ``"rgb_array"``, a rendered frame is not uint8 [H, W, 3],
            or a ``NormalizeReward`` is below the wrapper outside ``"log"`` mode (it would rescale the env's
            reward and never the VLM reward: put it above; :mod:`vlmrm_fast.wrappers.normalisers`).
    """

    def __init__(
        self,
        env: gym.Env,
        reward_model: Any,
        *,
        mode: str = "replace",
        weight: float = 1.0,
        task: Union[int, str] = 0,
    ) -> None:
        _check_one_env(env)
        if isinstance(reward_model, _SharedReference):  # made again from env.spec
            reward_model = reward_model.target
        gym.utils.RecordConstructorArgs.__init__(
            self, reward_model=_SharedReference(reward_model), mode=mode, weight=weight, task=task
        )
        gym.Wrapper.__init__(self, env)
        _check_reward_model(reward_model, "VLMRewardWrapper")
        if env.render_mode != "rgb_array":
            raise ValueError(
                f"VLMRewardWrapper scores rendered frames, so the env must render RGB arrays; its render_mode is "
                f"{env.render_mode!r}. Create it with {_RGB_FIX}."
            )
        # Only RGB arrays work here; say so to tools that try every render mode (gymnasium's checker).
        self.metadata = {**env.metadata, "render_modes": ["rgb_array"]}
        self._set_reward(reward_model, mode, weight, task, below=env)
        self._size_checked = False
        size = _declared_render_size(env)
        if size is not None:
            self._size_checked = True
            _warn_size(size, reward_model, "The env")
        self._episode_vlm = 0.0
        self._episode_gt = 0.0

    def reset(
        self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None
    ) -> Tuple[Any, Dict[str, Any]]:
        self._episode_vlm = 0.0
        self._episode_gt = 0.0
        return self.env.reset(seed=seed, options=options)

    def close(self) -> None:
        release_env_gl(self.env)  # else freed later in whatever GL context is current: another env's
        super().close()

    def vlm_rewards(self) -> np.ndarray:
        """Render the env now and score the frame: float32 [T] (one entry per task of the reward model)."""
        frame = render_env(self.env)
        _check_frame(frame, "env.render()")
        if not self._size_checked:
            self._size_checked = True
            _warn_size(_frame_size(frame), self.reward_model, "The env")
        if isinstance(frame, np.ndarray):  # env.render() of gymnasium's MuJoCo envs is a negative-stride view
            frame = np.ascontiguousarray(frame)
        return _rewards_of(self.reward_model, frame[None])[0]

    def step(self, action: Any) -> Tuple[Any, SupportsFloat, bool, bool, Dict[str, Any]]:
        obs, env_reward, terminated, truncated, info = self.env.step(action)
        rewards = self.vlm_rewards()
        vlm = float(rewards[self._task_column(len(rewards))])
        try:
            gt = float(env_reward)
        except (TypeError, ValueError):
            raise TypeError(f"the env's step() returned the reward {env_reward!r} ({type(env_reward).__name__}); "
                            "gymnasium's API asks for one number (SupportsFloat) per step.") from None
        info["gt_reward"] = gt
        info["vlm_reward"] = vlm
        if len(rewards) > 1:
            info["vlm_rewards"] = {name: float(r) for name, r in zip(self._reward_keys(len(rewards)), rewards)}
        self._episode_vlm += vlm
        self._episode_gt += gt
        if terminated or truncated:
            info["episode_vlm_return"] = self._episode_vlm
            info["episode_gt_return"] = self._episode_gt
            self._episode_vlm = self._episode_gt = 0.0
        return obs, float(_combine(self.mode, self.weight, gt, vlm)), terminated, truncated, info
