"""Checks of rendered frames and render sizes (uint8 RGB [H, W, 3], one size per batch, a warning where it is
not the reward model's tower size), and which envs the batch renderer draws as their ``env.render()`` does."""
from __future__ import annotations

import warnings
from typing import Any, List, Optional, Sequence, Tuple

import gymnasium as gym
import numpy as np
import torch

from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.wrappers.scoring import _tower_size

_RGB_FIX = 'gymnasium.make(env_id, render_mode="rgb_array")'

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
        raise ValueError(
            f"{where} must return a uint8 RGB frame [H, W, 3]; got shape {tuple(frame.shape)} and dtype {frame.dtype}. "
            f"{_frame_fix(frame, uint8)}"
        )


def _frame_fix(frame: Any, uint8: bool) -> str:
    """The fix for a rendered frame that is not uint8 [H, W, 3]: an env in ``rgb_array`` mode that renders
    RGBA, channels first or floats needs a wrapper that converts its frames, not another render mode."""
    under = "a gymnasium.Wrapper around the env whose render() returns"
    scale = "" if uint8 else ", scaled to uint8 (0-255)"
    if frame.ndim == 3 and frame.shape[2] == 4:
        return f"The frame looks like RGBA: give the wrapper its RGB channels, e.g. {under} frame[..., :3]{scale}."
    if frame.ndim == 3 and frame.shape[0] in (3, 4) and frame.shape[2] not in (3, 4):
        permute = "frame.permute(1, 2, 0)" if isinstance(frame, torch.Tensor) else "frame.transpose(1, 2, 0)"
        return (f"The frame looks channels-first [C, H, W]: give the wrapper [H, W, 3], e.g. {under} "
                f"{permute}[..., :3]{scale}.")
    if frame.ndim == 3 and frame.shape[2] == 3:  # RGB, in another dtype: the env's own render does that
        return (f"Give the wrapper uint8 frames (0-255): e.g. {under} (frame * 255).round().astype(np.uint8) for "
                f"frames in [0, 1].")
    return f"Use render_mode=\"rgb_array\" ({_RGB_FIX})."


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
