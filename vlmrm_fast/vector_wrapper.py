"""CLIP rewards for gymnasium vector envs (``gymnasium.vector.SyncVectorEnv``, ``AsyncVectorEnv``, ...).

:class:`VLMRewardVectorWrapper` is to gymnasium's vector API (cleanrl-style loops) what
:class:`~vlmrm_fast.wrappers.VLMRewardVecEnv` is to stable-baselines3's: every env is rendered once per
step and the N frames are scored in one reward-model call. Rewards, modes and info keys follow
:mod:`vlmrm_fast.wrappers`, in gymnasium's vector layout (arrays over envs, each key with its ``_key`` mask).

**Auto-reset.** gymnasium vector envs reset an env whose episode ended in one of three ways
(``envs.metadata["autoreset_mode"]``), and the wrapper scores the terminal step's true frame in each:

- ``NEXT_STEP`` (the default): the env is reset by the *next* ``step`` call, which ignores its action and
  gives reward 0. The frame rendered after the terminal step shows the terminal state. On the reset step
  the VLM reward is 0 too and its ``_vlm_reward``/``_gt_reward`` masks are False: that row is no
  transition (skip it, as for the env's own reward).
- ``SAME_STEP``: the env is reset inside the terminal step. In a ``SyncVectorEnv`` the wrapper keeps each
  episode's terminal state (MuJoCo envs, exact) or frame (other envs) itself, as
  :class:`~vlmrm_fast.wrappers.VLMRewardVecEnv` does for a ``DummyVecEnv``. Other vector envs need
  :class:`~vlmrm_fast.wrappers.RenderTerminalFrame` inside each env (its frame arrives in
  ``info["final_info"]``); without it the terminal step is scored on the next episode's first frame, a
  warning says so once and ``info["vlm_terminal_frame"]`` is False on those steps.
- ``DISABLED``: the caller resets envs (``envs.reset(options={"reset_mask": mask})``); the frame after the
  terminal step is the terminal state, and the episode sums of the envs reset start again.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.env_render import in_process_envs, release_env_gl, render_env
from vlmrm_fast.wrappers.batch_frames import _BatchFrames
from vlmrm_fast.wrappers.modes import _combine, _RewardMode
from vlmrm_fast.wrappers.scoring import _check_reward_model, _rewards_of
from vlmrm_fast.wrappers.terminal import TERMINAL_FRAME_KEY, _keep_terminal_states, _MujocoTerminalState

import gymnasium as gym  # after vlmrm_fast.wrappers, whose import says which extra to install when it is missing

__all__ = ["VLMRewardVectorWrapper"]

NEXT_STEP, SAME_STEP, DISABLED = "next_step", "same_step", "disabled"


def reset_mode_of(envs: "gym.vector.VectorEnv") -> str:
    """``"next_step"``, ``"same_step"`` or ``"disabled"``: how ``envs`` resets an env whose episode ended.

    gymnasium < 1.1 has only next-step auto-reset and does not record the mode.
    """
    mode = (envs.metadata or {}).get("autoreset_mode", NEXT_STEP)
    key = str(getattr(mode, "name", mode)).replace("_", "").lower()  # AutoresetMode.NEXT_STEP, "NextStep", ...
    modes = {m.replace("_", ""): m for m in (NEXT_STEP, SAME_STEP, DISABLED)}
    if key not in modes:
        raise ValueError(f"{type(envs).__name__} has an unknown autoreset_mode {mode!r}.")
    return modes[key]


class VLMRewardVectorWrapper(_RewardMode, _BatchFrames, gym.vector.VectorWrapper):
    """A gymnasium vector-env wrapper whose rewards are CLIP (VLM-RM) rewards, all envs scored in one batch.

    After each ``step`` of the wrapped vector env, every env is rendered once and the N frames go through
    ``reward_model`` in one call. By ``mode``, each env's reward is ``r_vlm``
    (``"replace"``), ``env_reward + weight * r_vlm`` (``"add"``) or ``env_reward`` (``"log"``); rewards
    come back as numpy [N] in the env rewards' float dtype (float64 for gymnasium's own vector envs).

    Rendering (``render=``):

    - ``"batch"``: :class:`vlmrm_fast.render.BatchRenderer` over the envs of a ``SyncVectorEnv`` of MuJoCo
      envs: frames stay on the GPU when the renderer runs there (OpenGL row order, flipped inside a
      CLIPReward's preprocessing, or by the wrapper for a reward callable without ``bottom_up``).
    - ``"images"``: ``envs.render()``: any vector env made with ``render_mode="rgb_array"``; frames go
      through host memory (``AsyncVectorEnv`` also pickles them through pipes).
    - ``"auto"`` (default): ``"batch"`` when possible, else ``"images"``; a batch renderer that fails at
      its first use falls back to ``"images"`` with a warning.

    ``info`` (arrays over envs, each with its ``_key`` mask): ``"gt_reward"`` (the env's reward) and
    ``"vlm_reward"``, with several tasks ``"vlm_rewards"`` (``{task name: [N]}``); where an episode ends,
    ``"episode_vlm_return"``, ``"episode_gt_return"`` (float64 sums over the episode) and
    ``"vlm_terminal_frame"`` (whether the scored frame showed the terminal state). See the module
    docstring for each auto-reset mode; ``reset_mode`` says which one the wrapped env uses
    (``"next_step"``, ``"same_step"`` or ``"disabled"``).

    Apply it on the vector env that steps the envs, before wrappers that read rewards (normalisation,
    episode statistics), so they see the VLM reward (a ``NormalizeReward`` below it is refused but in
    ``"log"`` mode: :mod:`vlmrm_fast.wrappers.normalisers`). The envs of a ``SyncVectorEnv`` may be wrapped in place
    (``envs.envs[i]``) by a wrapper that keeps each episode's terminal state; ``call``/``get_attr`` still
    reach the envs.

    Args:
        envs: the gymnasium vector env (``gymnasium.make_vec(env_id, n, render_mode="rgb_array")``, or
            ``SyncVectorEnv``/``AsyncVectorEnv`` of such envs).
        reward_model: a :class:`~vlmrm_fast.CLIPReward`, or any reward callable (see
            :class:`~vlmrm_fast.wrappers.VLMRewardWrapper`).
        mode: ``"replace"``, ``"add"`` or ``"log"``.
        weight: scale of the VLM reward in ``"add"`` mode (unused otherwise).
        render: ``"auto"``, ``"batch"`` or ``"images"``.
        task: which task (index or name in ``reward_model.task_names``) drives the reward.
    """

    _images_source = "envs.render()"

    def __init__(
        self,
        envs: "gym.vector.VectorEnv",
        reward_model: Any,
        *,
        mode: str = "replace",
        weight: float = 1.0,
        render: str = "auto",
        task: Union[int, str] = 0,
    ) -> None:
        if not isinstance(envs, gym.vector.VectorEnv):
            if isinstance(envs, gym.Env):
                fix = ("vectorise it first, gymnasium.vector.SyncVectorEnv([make_env] * n), or wrap the single env "
                       "with vlmrm_fast.VLMRewardWrapper")
            else:
                fix = "for a stable-baselines3 VecEnv use vlmrm_fast.VLMRewardVecEnv"
            raise TypeError(
                f"VLMRewardVectorWrapper wraps a gymnasium vector env, not {type(envs).__name__}: {fix}."
            )
        _check_reward_model(reward_model, "VLMRewardVectorWrapper")
        super().__init__(envs)
        self.renderer: Any = None  # before anything can fail: gymnasium 1.0 closes half-built wrappers too
        self._set_reward(reward_model, mode, weight, task, below=envs)
        # A name of its own: gymnasium's vector envs have `autoreset_mode`, an AutoresetMode enum.
        self.reset_mode = reset_mode_of(envs)
        n = self.num_envs
        self._episode_vlm = np.zeros(n, dtype=np.float64)
        self._episode_gt = np.zeros(n, dtype=np.float64)
        self._resetting = np.zeros(n, dtype=bool)  # NEXT_STEP: envs the next step resets instead of stepping
        self._warned_terminal = False

        base = envs.unwrapped
        self._sync: Optional["gym.vector.SyncVectorEnv"] = (
            base if isinstance(base, gym.vector.SyncVectorEnv) else None
        )
        mujoco_parts = self._set_up_frames(render, self._sync.envs if self._sync is not None else None, "SyncVectorEnv")

        # Terminal states: needed where the env is reset inside the terminal step; with the batch renderer
        # also otherwise, for the check that the env keeps its MjModel and MjData objects.
        self._terminal_states: List[Optional[_MujocoTerminalState]] = [None] * n
        if self._sync is not None and (self.reset_mode == SAME_STEP or self.renderer is not None):
            self._terminal_states = _keep_terminal_states(self._sync.envs, mujoco_parts, self.renderer is not None)

    def _require_rgb_array(self) -> None:
        if self.env.render_mode != "rgb_array":
            raise ValueError(
                f"VLMRewardVectorWrapper renders frames with envs.render(), so the envs must render RGB arrays; the "
                f"vector env's render_mode is {self.env.render_mode!r}. Create it with "
                f"gymnasium.make_vec(env_id, num_envs, render_mode=\"rgb_array\") (or each env with "
                f"gymnasium.make(env_id, render_mode=\"rgb_array\"))."
            )

    def reset(
        self, *, seed: Optional[Union[int, List[int]]] = None, options: Optional[Dict[str, Any]] = None
    ) -> Tuple[Any, Dict[str, Any]]:
        mask = (options or {}).get("reset_mask")  # read first: SyncVectorEnv.reset pops it from options
        # A copy: SyncVectorEnv pops reset_mask, which wrappers above (RecordEpisodeStatistics) read after us.
        obs, info = self.env.reset(
            seed=seed,  # type: ignore[arg-type]  # gymnasium's VectorEnv.reset types no list; SyncVectorEnv's takes one
            options=None if options is None else dict(options),
        )
        rows = np.ones(self.num_envs, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        self._episode_vlm[rows] = 0.0
        self._episode_gt[rows] = 0.0
        self._resetting[rows] = False
        for i, state in enumerate(self._terminal_states):
            if state is not None and rows[i]:
                state.pending = False
        return obs, info

    def _render(self, infos: Dict[str, Any], ended: np.ndarray) -> Tuple[Any, bool, np.ndarray]:
        """All envs' frames, terminal states where an episode just ended: (frames, bottom_up, terminal [N] bool)."""
        final_frames = _pop_terminal_frames(infos)
        with self._terminal_states_in() as terminal:
            if self.reset_mode != SAME_STEP:
                terminal |= ended  # the env is not reset yet: the frame after the step is the terminal state
            batch = self._batch_frames()
            if batch is not None:
                return batch[0], batch[1], terminal
            envs = in_process_envs(self.env)
            images = [render_env(env) for env in envs] if envs is not None else list(self.env.render() or ())
        if len(images) != self.num_envs:
            raise ValueError(
                f"envs.render() returned {len(images)} frames for {self.num_envs} envs; VLMRewardVectorWrapper needs "
                "one RGB frame per env (a vector env made with render_mode=\"rgb_array\")."
            )
        if self.reset_mode == SAME_STEP:
            for i, frame in final_frames.items():
                if not terminal[i]:
                    images[i], terminal[i] = frame, True
        self._check_images(images, "The vector env")
        return images, False, terminal

    # gymnasium < 1.4 types VectorWrapper.step with type variables it never binds
    def step(  # type: ignore[override, unused-ignore]
        self, actions: Any
    ) -> Tuple[Any, np.ndarray, np.ndarray, np.ndarray, Dict[str, Any]]:
        obs, env_rewards, terminations, truncations, infos = self.env.step(actions)
        n = self.num_envs
        stepped = ~self._resetting  # NEXT_STEP: the rows this call reset are no transitions
        ended = np.asarray(terminations, dtype=bool).reshape(n) | np.asarray(truncations, dtype=bool).reshape(n)
        frames, bottom_up, terminal = self._render(infos, ended)
        all_rewards = _rewards_of(self.reward_model, frames, bottom_up)  # [N, T] float32
        all_rewards = np.where(stepped[:, None], all_rewards, np.float32(0.0))
        vlm = all_rewards[:, self._task_column(all_rewards.shape[1])]
        env_rewards = np.asarray(env_rewards)
        gt = env_rewards.astype(np.float64).reshape(n)
        rewards = _combine(self.mode, self.weight, gt, vlm.astype(np.float64))
        rewards = rewards.astype(np.result_type(env_rewards.dtype, np.float32)).reshape(env_rewards.shape)
        if self.reset_mode == SAME_STEP and not self._warned_terminal and (ended & ~terminal).any():
            self._warned_terminal = True
            warnings.warn(
                f"{type(self.env.unwrapped).__name__} resets an env inside the step that ends its episode "
                "(autoreset_mode SAME_STEP), so the frame rendered after it shows the next episode's first state: the "
                "terminal step's VLM reward is scored on it. Wrap each env in vlmrm_fast.wrappers.RenderTerminalFrame "
                "(its frame arrives in info['final_info']), use a SyncVectorEnv, or NEXT_STEP auto-reset.",
                UserWarning,
                stacklevel=stacklevel_outside_package(),
            )

        self._episode_vlm[stepped] += vlm[stepped]
        self._episode_gt[stepped] += gt[stepped]
        _set(infos, "gt_reward", gt, stepped)
        _set(infos, "vlm_reward", vlm, stepped)
        if all_rewards.shape[1] > 1:
            per_task: Dict[str, Any] = {}
            for j, name in enumerate(self._reward_keys(all_rewards.shape[1])):
                _set(per_task, name, all_rewards[:, j], stepped)
            _set(infos, "vlm_rewards", per_task, stepped)
        if ended.any():
            _set(infos, "episode_vlm_return", np.where(ended, self._episode_vlm, 0.0), ended)
            _set(infos, "episode_gt_return", np.where(ended, self._episode_gt, 0.0), ended)
            _set(infos, "vlm_terminal_frame", terminal & ended, ended)
            self._episode_vlm[ended] = 0.0
            self._episode_gt[ended] = 0.0
        if self.reset_mode == NEXT_STEP:
            self._resetting = ended
        return obs, rewards, terminations, truncations, infos

    def close(self, **kwargs: Any) -> None:
        self._close_renderer()
        for env in in_process_envs(self.env) or ():
            release_env_gl(env)  # else freed later in whatever GL context is current: another env's
        self.env.close(**kwargs)


def _set(infos: Dict[str, Any], key: str, value: Any, mask: np.ndarray) -> None:
    """``infos[key]`` and its mask ``infos["_" + key]``, in gymnasium's vector-info layout."""
    infos[key] = value
    infos["_" + key] = np.array(mask, dtype=bool)


def _pop_terminal_frames(infos: Dict[str, Any]) -> Dict[int, Any]:
    """Removes :class:`RenderTerminalFrame`'s frames from vector infos; returns those of ``final_info`` by env.

    The frame is in ``infos`` itself where the env was not reset in the step (NEXT_STEP, DISABLED: not
    needed, the frame rendered after the step is the same), and in ``infos["final_info"]`` where it was.
    """
    infos.pop(TERMINAL_FRAME_KEY, None)
    infos.pop("_" + TERMINAL_FRAME_KEY, None)
    final = infos.get("final_info")
    if not isinstance(final, dict) or TERMINAL_FRAME_KEY not in final:
        return {}
    frames, mask = final.pop(TERMINAL_FRAME_KEY), final.pop("_" + TERMINAL_FRAME_KEY, None)
    if mask is None:
        return {}
    return {int(i): frames[i] for i in np.flatnonzero(mask)}
