"""Calling the reward model: what the wrappers take as one (checked when a wrapper is made), and its rewards
for a batch of frames, checked, as float32 numpy [N, T] on the host."""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Optional, SupportsInt, Tuple, cast

import numpy as np
import torch


def _check_reward_model(reward_model: Any, wrapper: str) -> None:
    if not callable(reward_model):
        raise TypeError(
            f"{wrapper} needs a reward model: a CLIPReward (CLIPReward.from_pretrained(...)) or any callable "
            f"rm(frames [N, H, W, 3] uint8) -> rewards [N]; got {type(reward_model).__name__}."
        )
    _tower_size(reward_model)  # an image_size that cannot be read: said now, not at the first frame


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
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return 0
    whole = int(cast(SupportsInt, value))  # int, float, numpy and Fraction are; typeshed's numbers.Real is not
    return max(whole, 0) if value == whole else 0


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
