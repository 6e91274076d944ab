"""Which reward the agent gets: ``mode`` (``"replace"``, ``"add"``, ``"log"``), ``weight`` and ``task``, checked;
the env's and the VLM rewards combined by mode; and :class:`_RewardMode`, the mixin the reward wrappers hold
them in."""
from __future__ import annotations

import numbers
import warnings
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from vlmrm_fast.argtypes import FLOAT32_MAX
from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.wrappers.normalisers import refuse_reward_normaliser, reward_normaliser_below

MODES = ("replace", "add", "log")


def _check_mode(mode: str, weight: float) -> Tuple[str, float]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not abs(float(weight)) <= FLOAT32_MAX:
        raise ValueError(f"weight must be a finite number within float32's range, as the rewards are (the VLM reward's "
                         f"factor in mode='add'); got {weight!r}.")
    return mode, float(weight)


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


class _RewardMode:
    """The reward model and the task that drives the reward; ``mode`` and ``weight`` as validated
    attributes (changing them takes effect at the next step)."""

    _mode: str = "replace"
    _weight: float = 1.0

    _normaliser: Optional[str] = None
    """A reward normaliser below the wrapper (:mod:`vlmrm_fast.wrappers.normalisers`), refused but in "log" mode."""

    def _set_reward(self, reward_model: Any, mode: str, weight: float, task: Union[int, str], below: Any) -> None:
        self.reward_model = reward_model
        self._mode, self._weight = _check_mode(mode, weight)
        self._normaliser = reward_normaliser_below(below)
        refuse_reward_normaliser(self._normaliser, self._mode, type(self).__name__)
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
        """``"replace"``, ``"add"`` or ``"log"``; may be changed between steps, on this wrapper (a wrapper
        above it keeps a value set on it for itself: keep a reference, or for a single gymnasium env use its
        ``set_wrapper_attr``)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        mode, _ = _check_mode(value, self._weight)
        refuse_reward_normaliser(self._normaliser, mode, type(self).__name__)
        self._mode = mode

    @property
    def weight(self) -> float:
        """Scale of the VLM reward in ``"add"`` mode; may be changed between steps (e.g. annealed), on this
        wrapper, as :attr:`mode`."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        _, self._weight = _check_mode(self._mode, value)
