"""CLIP rewards inside reinforcement-learning loops: a gymnasium wrapper and a stable-baselines3 VecEnv wrapper.

Both render the environment after each step, score the frame with a :class:`~vlmrm_fast.CLIPReward` (the
VLM-RM reward, SPEC §1.1) and hand the result to the agent as its reward:

- :class:`VLMRewardWrapper` wraps one ``gymnasium.Env`` (one frame, one reward model call per step).
- :class:`VLMRewardVecEnv` wraps an SB3 ``VecEnv``: all envs are rendered once per step and scored in
  one batch. With a ``DummyVecEnv`` of MuJoCo envs the frames come from
  :class:`vlmrm_fast.render.BatchRenderer` (kept on the GPU when it renders there); otherwise from
  ``venv.get_images()`` through host memory (``SubprocVecEnv`` pickles every frame through a pipe, so
  ``DummyVecEnv`` is the fast path).
- :class:`vlmrm_fast.vector_wrapper.VLMRewardVectorWrapper` does the same for gymnasium vector envs.

Modes (both wrappers):

- ``"replace"``: reward = VLM reward (the paper's setting).
- ``"add"``: reward = env reward + ``weight`` * VLM reward.
- ``"log"``: reward = env reward, unchanged; the VLM reward is only reported in ``info``.

Every step's ``info`` gets ``"gt_reward"`` (the env's own reward, float) and ``"vlm_reward"`` (float).
With a several-task reward model (``CLIPReward(tasks=[...])``) the task chosen by ``task=`` (index or
name, default the first) drives the reward and ``info["vlm_rewards"]`` maps every task name to its
reward (a plain callable returning [N, T] names no tasks: its columns are keyed "0" to "T-1"). On the
step where an episode ends, ``info["episode_vlm_return"]`` and ``info["episode_gt_return"]`` hold the
episode's sums of the VLM and env rewards.

**Terminal steps in a VecEnv.** SB3 VecEnvs reset an env inside ``step_wait`` as soon as its episode
ends, so a frame rendered afterwards shows the *next* episode's first state, not the state the last
action reached. :class:`VLMRewardVecEnv` scores the true terminal state wherever SB3 allows it:

- ``DummyVecEnv`` of MuJoCo envs: each env is wrapped (in ``venv.envs``) by a tiny gymnasium wrapper
  that copies the MuJoCo state (``mj_copyData``) when an episode ends, before the auto-reset. At the
  next render the terminal state is swapped in, the frame rendered with all the others in the same
  batch, and the reset state swapped back (exact: the whole ``MjData`` is copied both ways, and so are
  the model's colours, sizes, materials, lights and camera angles, which visual domain randomisation
  may change at reset; textures, which the renderer uploads once, are not). An env that replaces its
  ``MjModel`` or ``MjData`` object is refused with an error at the step it does so.
- ``DummyVecEnv`` of other envs: each env is wrapped by :class:`RenderTerminalFrame`, which renders
  the terminal frame before the reset and passes it in ``info``.
- Other VecEnvs (``SubprocVecEnv``, ...): build the envs with :class:`RenderTerminalFrame` inside
  (``make_vec_env(..., wrapper_class=RenderTerminalFrame)``), and the terminal frame travels in
  ``info`` (one extra frame per episode). Without it the terminal step is scored on the next episode's
  first frame; a warning says so once, and ``info["vlm_terminal_frame"]`` is ``False`` on those steps
  (``True`` where the true terminal frame was scored).
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections import Counter
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, SupportsFloat, Tuple, Union

import numpy as np
import torch

from vlmrm_fast.argtypes import FLOAT32_MAX
from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.env_render import in_process_envs, release_env_gl, render_env

try:
    import gymnasium as gym
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vlmrm_fast.wrappers needs gymnasium (and stable-baselines3 for VLMRewardVecEnv): "
        "pip install 'vlmrm-fast[train]'"
    ) from exc

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

__all__ = ["VLMRewardWrapper", "VLMRewardVecEnv", "RenderTerminalFrame", "MODES"]

MODES = ("replace", "add", "log")
RENDER_SOURCES = ("auto", "batch", "images")
TERMINAL_FRAME_KEY = "terminal_frame"

_RGB_FIX = 'gymnasium.make(env_id, render_mode="rgb_array")'


# ---- shared helpers -----------------------------------------------------------------------------


def _check_mode(mode: str, weight: float) -> Tuple[str, float]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not abs(float(weight)) <= FLOAT32_MAX:
        raise ValueError(f"weight must be a finite number within float32's range, as the rewards are (the VLM reward's "
                         f"factor in mode='add'); got {weight!r}.")
    return mode, float(weight)


def _check_reward_model(reward_model: Any, wrapper: str) -> None:
    if not callable(reward_model):
        raise TypeError(
            f"{wrapper} needs a reward model: a CLIPReward (CLIPReward.from_pretrained(...)) or any callable "
            f"rm(frames [N, H, W, 3] uint8) -> rewards [N]; got {type(reward_model).__name__}."
        )
    _tower_size(reward_model)  # an image_size that cannot be read: said now, not at the first frame


def _task_index(reward_model: Any, task: Union[int, str]) -> int:
    """The index of ``task`` in the reward model's tasks now; refuses names that are not one each."""
    names = list(getattr(reward_model, "task_names", []) or [])
    if len(set(names)) < len(names):  # a task's name (default: its first goal prompt) keys task= and info
        shared = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"several of the reward model's tasks are named {', '.join(map(repr, shared))}, and the "
                         "wrappers' task= and info['vlm_rewards'] go by name: give each Task its own name=.")
    if isinstance(task, str):
        if task not in names:
            raise ValueError(f"task {task!r} is not one of the reward model's tasks {names}.")
        return names.index(task)
    if isinstance(task, bool) or not isinstance(task, numbers.Integral):
        raise TypeError(f"task must be a task's name (str) or its index (int) in the reward model's tasks {names}; "
                        f"got {task!r}.")
    index = int(task)
    if names and not -len(names) <= index < len(names):
        raise ValueError(f"task index {index} is out of range for the reward model's {len(names)} task(s) {names}.")
    return index % len(names) if names else index


def _combine(mode: str, weight: float, env_reward: Any, vlm_reward: Any) -> Any:
    if mode == "replace":
        return vlm_reward
    if mode == "add":
        with np.errstate(over="ignore", invalid="ignore"):
            combined = env_reward + weight * vlm_reward
            overflowed = np.isfinite(env_reward) & ~np.isfinite(np.asarray(combined, dtype=np.float32))
        if np.any(overflowed):  # SB3 and the replay buffer hold float32 rewards: an inf would reach SAC's targets
            raise ValueError(f"in mode='add' the env reward + weight * VLM reward (weight={weight:g}) is beyond "
                             "float32's range (inf): lower weight, or scale the env's rewards down.")
        return combined
    return env_reward


_ONE_SIZE = ("make every env with the same width= and height= (e.g. gymnasium.make(env_id, render_mode='rgb_array', "
             "width=224, height=224)).")


def _declared_sizes(envs: Sequence[Any]) -> List[Tuple[int, int]]:
    """The MuJoCo envs' render sizes (``width``, ``height`` of each unwrapped env), sorted, one each."""
    sizes = set()
    for env in envs:
        unwrapped = getattr(env, "unwrapped", env)
        width, height = getattr(unwrapped, "width", None), getattr(unwrapped, "height", None)
        if isinstance(width, int) and isinstance(height, int):
            sizes.add((width, height))
    return sorted(sizes)


# gymnasium's wrappers whose render() hands on the env's frames as they are (checks, display, recording).
_RENDER_PASSES_FRAMES_ON = ("OrderEnforcing", "PassiveEnvChecker", "HumanRendering", "RecordVideo", "RenderCollection")


def _renders_as_mujoco_env(env: Any) -> bool:
    """Whether an unwrapped env's ``render()`` is gymnasium ``MujocoEnv``'s (or this package's humanoid's,
    which only words its errors better): frames of its ``mujoco_renderer``'s camera, size and scene options,
    which the batch renderer reads. A MuJoCo env of one's own (``model`` and ``data``, with a ``render()`` of
    its own camera or size), or a ``MujocoEnv`` subclass with its own ``render()``, is not."""
    try:
        from gymnasium.envs.mujoco.mujoco_env import MujocoEnv

        from vlmrm_fast.envs.humanoid import TexturedHumanoidEnv
    except ImportError:  # gymnasium's MuJoCo envs need the mujoco package
        return False
    return type(env).render in (MujocoEnv.render, TexturedHumanoidEnv.render)


def _frame_changing_wrappers(envs: Sequence[Any]) -> List[str]:
    """Names of the wrappers, over the envs, whose own ``render()`` may change the frames (a crop, noise, a
    user's overlay), and of the envs under them whose ``render()`` is not gymnasium ``MujocoEnv``'s (another
    camera or size): the batch renderer draws each env's MuJoCo state as ``MujocoEnv`` would, past those, so
    its frames would not be ``env.render()``'s."""
    found: List[str] = []
    for env in envs:
        while isinstance(env, gym.Wrapper):
            cls = type(env)
            passes_on = cls.__module__.startswith("gymnasium.") and cls.__name__ in _RENDER_PASSES_FRAMES_ON
            if cls.render is not gym.Wrapper.render and not passes_on and cls.__name__ not in found:
                found.append(cls.__name__)
            env = env.env
        if not _renders_as_mujoco_env(env) and type(env).__name__ not in found:
            found.append(type(env).__name__)
    return found


def _frame_size(frame: Any) -> Tuple[int, int]:
    return int(frame.shape[0]), int(frame.shape[1])


def _check_frame(frame: Any, where: str) -> None:
    """A rendered frame must be uint8 RGB [H, W, 3] (numpy or torch)."""
    if frame is None:
        raise ValueError(
            f"{where} returned None instead of an RGB frame: create the env with render_mode=\"rgb_array\" "
            f"({_RGB_FIX})."
        )
    if not isinstance(frame, (np.ndarray, torch.Tensor)):
        raise TypeError(
            f"{where} must return a uint8 [H, W, 3] numpy array or torch tensor; got {type(frame).__name__}."
        )
    uint8 = frame.dtype == (torch.uint8 if isinstance(frame, torch.Tensor) else np.uint8)
    if frame.ndim != 3 or frame.shape[2] != 3 or not uint8:
        if frame.ndim == 3 and frame.shape[2] == 3:  # RGB, in another dtype: the env's own render does that
            fix = ("Give the wrapper uint8 frames (0-255): e.g. a gymnasium.Wrapper under it whose render() "
                   "returns (frame * 255).round().astype(np.uint8) for frames in [0, 1].")
        else:
            fix = f"Use render_mode=\"rgb_array\" ({_RGB_FIX})."
        raise ValueError(
            f"{where} must return a uint8 RGB frame [H, W, 3]; got shape {tuple(frame.shape)} and dtype {frame.dtype}. "
            f"{fix}"
        )


def _tower_size(reward_model: Any) -> Optional[Tuple[int, int]]:
    """The (H, W) a reward model's ``image_size`` names (an int: square), or None where it has none."""
    size = getattr(reward_model, "image_size", None)
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    try:
        height, width = (_whole(v) for v in size)
    except (TypeError, ValueError):
        height = width = 0
    if height <= 0 or width <= 0:
        raise ValueError(f"the reward model's image_size is {size!r}: give an int (square) or (height, width) of "
                         "positive ints, or no image_size attribute at all (it is only read to warn of resizing)")
    return height, width


def _whole(value: Any) -> int:
    """A positive whole number (224, or 224.0) as an int; 0 for anything else (a str, 2.5, True)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value != int(value):
        return 0
    return max(int(value), 0)


def _warn_size(size: Tuple[int, int], reward_model: Any, what: str) -> None:
    want = _tower_size(reward_model) or tuple(size)
    if tuple(size) != want:
        warnings.warn(
            f"{what} renders {size[0]}x{size[1]} frames (height x width) but the reward model's tower takes "
            f"{want[0]}x{want[1]}: every "
            f"frame is resized, which costs time. Render at the tower's size to skip it (for MuJoCo envs: "
            f"gymnasium.make(env_id, render_mode=\"rgb_array\", width={want[1]}, height={want[0]})).",
            UserWarning,
            stacklevel=stacklevel_outside_package(),
        )


def _declared_render_size(env: Any) -> Optional[Tuple[int, int]]:
    """(H, W) an env says it renders at, or None if unknown: ``width``/``height`` of gymnasium's MuJoCo envs,
    whose ``render()`` gives frames of that size when no wrapper's ``render()`` changes them (other envs may
    name other things so: a grid's cells)."""
    if _frame_changing_wrappers([env]):
        return None
    base = getattr(env, "unwrapped", env)
    width, height = getattr(base, "width", None), getattr(base, "height", None)
    if isinstance(width, (int, np.integer)) and isinstance(height, (int, np.integer)):
        return int(height), int(width)
    return None


def _takes_bottom_up(reward_model: Any) -> bool:
    """Whether ``reward_model`` names a ``bottom_up`` parameter (CLIPReward flips such rows itself).

    Only that name counts: a ``**kwargs`` may drop it (a torch module's ``__call__`` passes it to a
    ``forward`` that does not take it), and such a model gets the frames flipped instead.
    """
    fn = reward_model.forward if isinstance(reward_model, torch.nn.Module) else reward_model
    try:
        return "bottom_up" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without an introspectable signature (a C extension)
        return False


def _expected_rewards(n: int) -> str:
    """What a reward model must return for ``n`` frames, for the errors of :func:`_rewards_of` (built only
    when one is raised: the check runs on every step)."""
    return f"it must return [{n}] (one reward per frame) or [{n}, T] (T tasks), as CLIPReward does"


def _rewards_of(reward_model: Any, frames: Any, bottom_up: bool = False) -> np.ndarray:
    """``reward_model``'s rewards for ``frames`` [N, H, W, 3] as float32 numpy [N, T] on the host.

    ``bottom_up`` frames (OpenGL row order, from :class:`~vlmrm_fast.render.BatchRenderer`) go to a model
    that takes ``bottom_up=`` as they are; any other callable ``rm(frames)`` gets them flipped to the usual
    top-down order first. The model may return a tensor (any device) or an array, of shape [N] or [N, T],
    of finite values (a NaN would reach the replay buffer, so it is an error here).
    """
    if bottom_up and not _takes_bottom_up(reward_model):
        frames = frames.flip(1) if isinstance(frames, torch.Tensor) else np.ascontiguousarray(frames[:, ::-1])
        bottom_up = False
    rewards = reward_model(frames, bottom_up=True) if bottom_up else reward_model(frames)
    n = len(frames)
    if rewards is None:
        raise TypeError(f"the reward model returned None for {n} frames (a missing `return`?); {_expected_rewards(n)}.")
    if rewards.is_complex() if isinstance(rewards, torch.Tensor) else np.iscomplexobj(rewards):
        raise TypeError("the reward model returned complex rewards; it must return real ones (float32 or float64).")
    if isinstance(rewards, torch.Tensor):
        array = rewards.detach().to("cpu", torch.float32).numpy()
    else:
        try:
            with np.errstate(over="ignore"):  # beyond float32's range: named below
                array = np.asarray(rewards, dtype=np.float32)
        except (TypeError, ValueError) as exc:  # strings, objects, ragged lists
            raise TypeError(f"the reward model returned {type(rewards).__name__} rewards that are not numbers "
                            f"({exc}); {_expected_rewards(n)}.") from None
    if array.ndim not in (1, 2) or array.shape[0] != n:
        raise ValueError(
            f"the reward model returned rewards of shape {tuple(array.shape)} for {n} frames; {_expected_rewards(n)}."
        )
    finite = np.isfinite(array)
    if not finite.all():
        as_given = (rewards.detach().to("cpu", torch.float64).numpy() if isinstance(rewards, torch.Tensor)
                    else np.asarray(rewards, dtype=np.float64))
        if np.isfinite(as_given).all():  # finite, but not as float32
            raise ValueError(f"the reward model returned rewards beyond float32's range (up to {np.abs(as_given).max():.3g}), "
                             "the wrappers' and SB3's reward type: make the reward function return smaller values.")
        bad = np.flatnonzero(~finite.reshape(n, -1).all(axis=1)).tolist()
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"the reward model returned NaN/inf rewards for {len(bad)} of {n} frames (rows {shown}); a NaN reward "
            "would poison the replay buffer: make the reward function return finite values."
        )
    return array.reshape(n, -1)


def _mujoco_parts(env: Any) -> Optional[Tuple[Any, Any]]:
    """(MjModel, MjData) of a MuJoCo env, or None."""
    base = getattr(env, "unwrapped", env)
    model, data = getattr(base, "model", None), getattr(base, "data", None)
    if model is None or data is None:
        return None
    try:
        import mujoco
    except ImportError:
        return None
    if isinstance(model, mujoco.MjModel) and isinstance(data, mujoco.MjData):
        return model, data
    return None


class _RewardMode:
    """The reward model and the task that drives the reward; ``mode`` and ``weight`` as validated
    attributes (changing them takes effect at the next step)."""

    _mode: str = "replace"
    _weight: float = 1.0

    def _set_reward(self, reward_model: Any, mode: str, weight: float, task: Union[int, str]) -> None:
        self.reward_model = reward_model
        self._mode, self._weight = _check_mode(mode, weight)
        if self._mode != "add" and self._weight != 1.0:
            warnings.warn(f"weight={self._weight:g} is unused in mode={self._mode!r}: it scales the VLM reward in "
                          "mode='add' only. Pass mode='add' to add the weighted VLM reward to the env's, or drop "
                          "weight.", UserWarning, stacklevel=stacklevel_outside_package())
        _task_index(reward_model, task)  # checked now
        self._task_request = task

    @property
    def task_names(self) -> List[str]:
        """The reward model's task names now (``set_tasks`` may change them)."""
        return list(getattr(self.reward_model, "task_names", []) or [])

    @property
    def task(self) -> int:
        """Index of the task that drives the reward, in the model's current tasks."""
        return _task_index(self.reward_model, self._task_request)

    @task.setter
    def task(self, value: Union[int, str]) -> None:
        _task_index(self.reward_model, value)
        self._task_request = value

    def _task_column(self, width: int) -> int:
        """:attr:`task` as a column of rewards [..., width]: a reward model without ``task_names`` (a plain
        callable) is checked here, against what it returns."""
        index = self.task
        if not -width <= index < width:
            raise ValueError(f"task={self._task_request!r}, but the reward model returns {width} reward(s) per frame: "
                             f"pass a task index from 0 to {width - 1}.")
        return index % width

    def _reward_keys(self, width: int) -> List[str]:
        """The keys of ``info["vlm_rewards"]``: the task names, or the column indices as strings ("0", "1",
        ...: gymnasium's vector infos put a mask beside each key as "_" + key) for a reward model that names
        none (a plain callable)."""
        names = self.task_names
        return list(names) if len(names) == width else [str(i) for i in range(width)]

    @property
    def mode(self) -> str:
        """``"replace"``, ``"add"`` or ``"log"``; may be changed between steps."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode, _ = _check_mode(value, self._weight)

    @property
    def weight(self) -> float:
        """Scale of the VLM reward in ``"add"`` mode; may be changed between steps (e.g. annealed)."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        _, self._weight = _check_mode(self._mode, value)


# ---- the single-env wrapper ---------------------------------------------------------------------


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
        ValueError: the env's render mode is not ``"rgb_array"``, or a rendered frame is not uint8 [H, W, 3].
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
        self._set_reward(reward_model, mode, weight, task)
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


# ---- terminal frames in VecEnvs -----------------------------------------------------------------


class RenderTerminalFrame(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Renders the last frame of each episode before a VecEnv's auto-reset and passes it in ``info``.

    On the step where the episode ends (terminated or truncated), ``info["terminal_frame"]`` is the uint8
    [H, W, 3] frame of the state that step reached; :class:`VLMRewardVecEnv` scores it (and removes it from
    ``info``) instead of the next episode's first frame. Use it inside the env factory of a
    ``SubprocVecEnv`` (``make_vec_env(env_id, n_envs, vec_env_cls=SubprocVecEnv, wrapper_class=
    RenderTerminalFrame, env_kwargs={"render_mode": "rgb_array"})``); for a ``DummyVecEnv``,
    :class:`VLMRewardVecEnv` applies it (or an exact MuJoCo state copy) itself. Costs one extra render per
    episode.
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)
        if env.render_mode != "rgb_array":
            raise ValueError(
                f"RenderTerminalFrame renders frames, so the env must render RGB arrays; its render_mode is "
                f"{env.render_mode!r}. Create it with {_RGB_FIX}."
            )

    def step(self, action: Any) -> Tuple[Any, SupportsFloat, bool, bool, Dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            frame = render_env(self.env)
            _check_frame(frame, "env.render()")
            info[TERMINAL_FRAME_KEY] = frame.clone() if isinstance(frame, torch.Tensor) else np.array(frame)
        return obs, reward, terminated, truncated, info


class _PassesNewAttributesOn:
    """For the wrappers :class:`VLMRewardVecEnv` puts around a DummyVecEnv's envs: SB3's ``set_attr`` sets
    an attribute on each env's outermost object, so one this wrapper does not own goes on to the env it
    wraps, where it went before the wrapper was there."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_passes_on", False) and name not in self.__dict__ and not hasattr(type(self), name):
            setattr(self.env, name, value)
        else:
            object.__setattr__(self, name, value)


class _InsertedRenderTerminalFrame(_PassesNewAttributesOn, RenderTerminalFrame):
    """:class:`RenderTerminalFrame` as :class:`VLMRewardVecEnv` inserts it (attributes pass on)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._passes_on = True


# What a frame reads from the MjModel that an env may change at reset (visual domain randomisation); fields
# a MuJoCo version lacks are left out.
_LOOK_FIELDS = ("geom_rgba", "geom_size", "geom_matid", "mat_rgba", "mat_emission", "mat_specular", "mat_shininess",
                "mat_reflectance", "mat_metallic", "mat_roughness", "mat_texid", "mat_texrepeat", "mat_texuniform",
                "site_rgba", "site_size", "skin_matid", "light_diffuse", "light_ambient", "light_specular",
                "light_active", "light_castshadow", "light_intensity", "light_attenuation", "light_cutoff",
                "light_exponent", "light_type", "light_directional", "light_texid", "light_bulbradius", "cam_fovy",
                "vis.headlight.active", "vis.headlight.ambient", "vis.headlight.diffuse", "vis.headlight.specular")


def _look_owner(model: Any, field: str) -> Tuple[Any, str]:
    """The object holding ``field`` ("geom_rgba", "vis.headlight.ambient") and its last name; (None, name)
    where this MuJoCo has no such field."""
    *path, name = field.split(".")
    owner = model
    for part in path:
        owner = getattr(owner, part, None)
    return (owner if owner is not None and getattr(owner, name, None) is not None else None), name


def _read_look(model: Any, field: str, into: Optional[np.ndarray] = None) -> np.ndarray:
    owner, name = _look_owner(model, field)
    value = getattr(owner, name)
    if into is None:
        return np.array(value)
    np.copyto(into, value)
    return into


def _write_look(model: Any, field: str, value: np.ndarray) -> None:
    owner, name = _look_owner(model, field)
    live = getattr(owner, name)
    if isinstance(live, np.ndarray):
        np.copyto(live, value)
    else:  # a scalar field (vis.headlight.active)
        setattr(owner, name, type(live)(value.item()))


class _MujocoTerminalState(_PassesNewAttributesOn, gym.Wrapper):
    """Copies a MuJoCo env's whole state (``MjData``), and the model fields a frame reads that a reset may
    change (``_LOOK_FIELDS``), when an episode ends, before the VecEnv resets it.

    :meth:`terminal_state` swaps the copy in for rendering and swaps the live (reset) state back after.
    ``pending`` survives the auto-reset that follows (that is the point); :class:`VLMRewardVecEnv` clears it.
    """

    def __init__(self, env: gym.Env, model: Any, data: Any, model_fields: bool = True) -> None:
        super().__init__(env)
        import mujoco

        self._mujoco = mujoco
        self._model = model
        self._data = data
        self._terminal = mujoco.MjData(model)
        self._scratch = mujoco.MjData(model)
        # Not for a model other envs share: its terminal fields would redraw them in the same batch.
        self._fields = [f for f in _LOOK_FIELDS if model_fields and _look_owner(model, f)[0] is not None]
        self._terminal_look = {f: _read_look(model, f) for f in self._fields}
        self._scratch_look = {f: _read_look(model, f) for f in self._fields}
        self.pending = False
        self._passes_on = True

    @property
    def spec(self) -> Any:
        """The env's own spec: this wrapper is an implementation detail, not part of how the env is made."""
        return self.env.spec

    def step(self, action: Any) -> Tuple[Any, SupportsFloat, bool, bool, Dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        u = self.env.unwrapped
        if getattr(u, "model", None) is not self._model or getattr(u, "data", None) is not self._data:
            raise RuntimeError(
                f"{type(u).__name__} replaced its MjModel or MjData object; the VLM reward wrapper (VLMRewardVecEnv, "
                "VLMRewardVectorWrapper) keeps the terminal states of the ones the env had when it was wrapped. Reset "
                "them in place (mujoco.mj_resetData, as gymnasium's MuJoCo envs do), or wrap each env in "
                "vlmrm_fast.wrappers.RenderTerminalFrame and pass render='images' to the wrapper."
            )
        if terminated or truncated:
            self._mujoco.mj_copyData(self._terminal, self._model, self._data)
            for f in self._fields:
                _read_look(self._model, f, into=self._terminal_look[f])
            self.pending = True
        return obs, reward, terminated, truncated, info

    @contextmanager
    def terminal_state(self) -> Iterator[None]:
        """Inside the block the env holds its terminal state; the live state comes back after."""
        mj = self._mujoco
        mj.mj_copyData(self._scratch, self._model, self._data)
        mj.mj_copyData(self._data, self._model, self._terminal)
        for f in self._fields:
            _read_look(self._model, f, into=self._scratch_look[f])
            _write_look(self._model, f, self._terminal_look[f])
        try:
            yield
        finally:
            mj.mj_copyData(self._data, self._model, self._scratch)
            for f in self._fields:
                _write_look(self._model, f, self._scratch_look[f])
            self.pending = False


def _keep_terminal_states(
    envs: List[gym.Env], mujoco_parts: Sequence[Optional[Tuple[Any, Any]]], batch: bool
) -> List[Optional[_MujocoTerminalState]]:
    """Wraps the envs of a vector env that steps them in this process, in place, so that each episode's
    terminal state (MuJoCo envs) or terminal frame (others, and MuJoCo envs already wrapped in
    :class:`RenderTerminalFrame` where frames come from ``render()``) outlives the auto-reset.

    Returns each env's :class:`_MujocoTerminalState` (None where the env has none).
    """
    states: List[Optional[_MujocoTerminalState]] = [None] * len(envs)
    envs_per_model = Counter(id(p[0]) for p in mujoco_parts if p is not None)
    for i, env in enumerate(envs):
        framed = _is_wrapped(env, RenderTerminalFrame)
        if isinstance(env, _MujocoTerminalState):
            states[i] = env
        elif mujoco_parts[i] is not None and not (framed and not batch):
            shared = envs_per_model[id(mujoco_parts[i][0])] > 1
            states[i] = envs[i] = _MujocoTerminalState(env, *mujoco_parts[i], model_fields=not shared)
        elif not framed:
            envs[i] = _InsertedRenderTerminalFrame(env)
    return states


def _import_batch_renderer() -> Any:
    """The GPU batch renderer class (imported lazily: it is optional)."""
    from vlmrm_fast.render import BatchRenderer

    return BatchRenderer


def _new_batch_renderer(envs: Sequence[gym.Env], reward_model: Any) -> Any:
    """A BatchRenderer over ``envs`` (MuJoCo envs), at their render size, writing where the reward model runs."""
    renderer_cls = _import_batch_renderer()
    device = getattr(reward_model, "device", None)
    try:
        accepts_device = "device" in inspect.signature(renderer_cls.from_envs).parameters
    except (TypeError, ValueError):
        accepts_device = False
    if device is not None and accepts_device:
        return renderer_cls.from_envs(list(envs), device=device)
    return renderer_cls.from_envs(list(envs))


def _check_renderer_frames(frames: Any, num_envs: int) -> Tuple[int, int]:
    """``BatchRenderer.render()``'s output must be uint8 [num_envs, H, W, 3]; returns (H, W)."""
    if (
        not isinstance(frames, torch.Tensor)
        or frames.ndim != 4
        or frames.shape[0] != num_envs
        or frames.shape[3] != 3
        or frames.dtype != torch.uint8
    ):
        raise ValueError(
            f"BatchRenderer.render() must return uint8 [{num_envs}, H, W, 3]; got "
            f"{type(frames).__name__} {tuple(getattr(frames, 'shape', ()))} {getattr(frames, 'dtype', '')}."
        )
    return int(frames.shape[1]), int(frames.shape[2])


class _BatchFrames:
    """Frames for a vector wrapper: the :class:`~vlmrm_fast.render.BatchRenderer` while it works, else the
    vector env's own images (named by ``_images_source``), checked, with one warning about their size;
    the MuJoCo terminal states (``_terminal_states``) swapped in while rendering."""

    _images_source = "venv.get_images()"
    renderer: Any = None
    reward_model: Any
    num_envs: int
    _size_checked = False
    _terminal_states: List[Optional[_MujocoTerminalState]]  # one per env, set by the wrapper (None: no state kept)

    def _set_up_frames(
        self, render: str, envs: Optional[Sequence[gym.Env]], vector_kind: str
    ) -> List[Optional[Tuple[Any, Any]]]:
        """Picks the frame source for ``render``; ``envs`` are the envs the vector env steps in this process
        (None for others). Returns each of those envs' (MjModel, MjData), None for non-MuJoCo envs."""
        mujoco_parts = [_mujoco_parts(env) for env in envs] if envs is not None else []
        all_mujoco = bool(mujoco_parts) and all(p is not None for p in mujoco_parts)
        self.renderer = self._pick_renderer(render, list(envs) if all_mujoco else None, vector_kind)
        if self.renderer is None:
            self._require_rgb_array()
        return mujoco_parts

    def _pick_renderer(self, render: str, envs: Optional[Sequence[gym.Env]], vector_kind: str) -> Any:
        """The BatchRenderer for ``render`` ("batch", "auto" or "images"), or None to render the images.

        ``envs`` are the vector env's MuJoCo envs when it steps them in this process, else None.
        """
        if render not in RENDER_SOURCES:
            raise ValueError(f"render must be one of {RENDER_SOURCES}; got {render!r}.")
        # The batch renderer draws each env at its own size (a wrapper's render() that resizes is not
        # seen): one batch needs one. The images then decide, at the first step.
        sizes = _declared_sizes(envs) if envs is not None else []
        changing = _frame_changing_wrappers(envs) if envs is not None else []
        if render == "batch":
            if envs is None:
                raise ValueError(
                    f'render="batch" needs a {vector_kind} of MuJoCo envs (it renders their MjData directly); '
                    'use render="images" (or "auto") for other vector envs.'
                )
            if len(sizes) > 1:
                raise ValueError(f"The envs render at different sizes {sizes} (width x height), and one batch "
                                 f"holds one size: {_ONE_SIZE}")
            if changing:
                raise ValueError(
                    f'render="batch" draws each env\'s MuJoCo state directly, as gymnasium\'s MujocoEnv.render() '
                    f"does, past the render() of {changing} (wrappers, or envs with a render() of their own), so the "
                    "rewards would not be of the frames env.render() gives. Use render=\"images\" (\"auto\" does so "
                    "for these envs), or apply what those wrappers do to the frames in your reward function instead."
                )
            return _new_batch_renderer(envs, self.reward_model)
        if render == "auto" and changing and len(sizes) <= 1:  # (envs of other sizes render the images anyway)
            warnings.warn(
                f"{changing} (the envs' wrappers, or the envs) have a render() of their own, which the batch renderer "
                f"would not see: rendering through {self._images_source}.", stacklevel=stacklevel_outside_package(),
            )
            return None
        if render == "auto" and envs is not None and len(sizes) <= 1:
            try:
                return _new_batch_renderer(envs, self.reward_model)
            except ImportError:
                return None  # the optional renderer is not there: images, silently
            except Exception as exc:  # noqa: BLE001 - any failure of the optional fast path
                warnings.warn(f"BatchRenderer could not be built ({exc!r}); rendering through {self._images_source}.",
                              stacklevel=stacklevel_outside_package())
        return None

    @contextmanager
    def _terminal_states_in(self) -> Iterator[np.ndarray]:
        """Inside the block the envs whose episode just ended hold their terminal MuJoCo state (the live
        state comes back after); yields which envs those are ([N] bool)."""
        pending = [s is not None and s.pending for s in self._terminal_states]
        with ExitStack() as stack:
            for state, swap in zip(self._terminal_states, pending):
                if swap:
                    stack.enter_context(state.terminal_state())
            yield np.array(pending, dtype=bool)

    @property
    def render_source(self) -> str:
        """Where frames come from now: ``"batch"`` (BatchRenderer) or ``"images"`` (the vector env's images)."""
        return "batch" if self.renderer is not None else "images"

    def _require_rgb_array(self) -> None:
        raise NotImplementedError

    def _batch_frames(self) -> Optional[Tuple[Any, bool]]:
        """The renderer's frames and row order (``bottom_up``); None without a renderer, or when it has just
        failed (then it is closed, with a warning, and frames come from the images from now on)."""
        if self.renderer is None:
            return None
        try:
            frames = self.renderer.render()
            bottom_up = bool(getattr(self.renderer, "bottom_up", False))
        except Exception as exc:  # noqa: BLE001 - fall back to the host path
            warnings.warn(
                f"BatchRenderer.render() failed ({exc!r}); rendering through {self._images_source} from now on."
            )
            self._close_renderer()
            self._require_rgb_array()
            return None
        self._check_size(_check_renderer_frames(frames, self.num_envs), "The BatchRenderer")
        return frames, bottom_up

    def _check_images(self, images: Sequence[Any], what: str) -> None:
        for i, frame in enumerate(images):
            _check_frame(frame, f"{self._images_source}[{i}]")
        sizes = {_frame_size(f) for f in images}
        if len(sizes) > 1:
            raise ValueError(f"The envs render frames of different sizes {sorted(sizes)} (height x width), and one "
                             f"batch holds one size: {_ONE_SIZE}")
        if images:
            self._check_size(_frame_size(images[0]), what)

    def _check_size(self, size: Tuple[int, int], what: str) -> None:
        if not self._size_checked:
            self._size_checked = True
            _warn_size(size, self.reward_model, what)

    def _close_renderer(self) -> None:
        renderer, self.renderer = self.renderer, None
        if renderer is not None:
            try:
                renderer.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass


# ---- the VecEnv wrapper -------------------------------------------------------------------------


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
    showed the terminal state: see the module docstring on auto-reset; ``True`` for DummyVecEnvs).

    Apply it directly on the VecEnv that steps the envs (before ``VecNormalize``, so normalisation sees the
    VLM reward). The envs of a ``DummyVecEnv`` are wrapped in place (``venv.envs[i]``) by a wrapper that
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
        self._set_reward(reward_model, mode, weight, task)
        self._episode_vlm = np.zeros(self.num_envs, dtype=np.float64)
        self._episode_gt = np.zeros(self.num_envs, dtype=np.float64)

        base = venv.unwrapped if isinstance(venv, VecEnvWrapper) else venv
        self._dummy: Optional["DummyVecEnv"] = base if isinstance(base, DummyVecEnv) else None
        mujoco_parts = self._set_up_frames(render, self._dummy.envs if self._dummy is not None else None, "DummyVecEnv")

        # Terminal frames (see the module docstring): wrap the envs of a DummyVecEnv in place.
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


def _is_wrapped(env: gym.Env, wrapper_class: type) -> bool:
    while isinstance(env, gym.Wrapper):
        if isinstance(env, wrapper_class):
            return True
        env = env.env
    return False

