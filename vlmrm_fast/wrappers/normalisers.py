"""Reward normalisers below a VLM reward wrapper, found so that the wrapper can refuse them.

A normaliser under the wrapper (SB3's ``VecNormalize`` with ``norm_reward``, gymnasium's ``NormalizeReward``)
rescales the env's own reward before the wrapper sees it, and never the VLM reward: in ``mode="add"`` the
agent gets a normalised env reward plus a raw VLM reward, in ``"replace"`` the ground truth the wrapper
records (``info["gt_reward"]``) is rescaled and the VLM reward unnormalised. The fix is the other order:
the normaliser above the reward wrapper.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, cast

import gymnasium as gym

try:
    from stable_baselines3.common.vec_env import DummyVecEnv, VecEnvWrapper, VecNormalize

    _SB3_VEC_WRAPPERS: tuple = (VecEnvWrapper,)
    _SB3_IN_PROCESS: tuple = (DummyVecEnv,)
    _SB3_NORMALISERS: tuple = (VecNormalize,)
except ImportError:  # pragma: no cover - the SB3 wrapper cannot be made without it; gymnasium's can
    _SB3_VEC_WRAPPERS = _SB3_IN_PROCESS = _SB3_NORMALISERS = ()


def _chain(env: Any) -> Iterator[Any]:
    """``env``, the wrappers and envs under it, and the envs of an in-process vector env at its bottom."""
    while True:
        yield env
        if isinstance(env, _SB3_VEC_WRAPPERS):
            env = env.venv
        elif isinstance(env, (gym.Wrapper, gym.vector.VectorWrapper)):
            env = env.env
        else:
            break
    if isinstance(env, (*_SB3_IN_PROCESS, gym.vector.SyncVectorEnv)):
        for sub_env in cast(Any, env).envs:
            yield from _chain(sub_env)


def _normalises_rewards(env: Any) -> bool:
    if isinstance(env, (gym.wrappers.NormalizeReward, gym.wrappers.vector.NormalizeReward)):
        return True
    return isinstance(env, _SB3_NORMALISERS) and bool(env.norm_reward)


def reward_normaliser_below(env: Any) -> Optional[str]:
    """The class name of the first reward normaliser in ``env``'s chain (its wrappers, and the envs of a
    ``DummyVecEnv`` or ``SyncVectorEnv`` at the bottom), or None. ``AsyncVectorEnv`` and ``SubprocVecEnv``
    workers are not searched."""
    return next((type(e).__name__ for e in _chain(env) if _normalises_rewards(e)), None)


def refuse_reward_normaliser(normaliser: Optional[str], mode: str, wrapper: str) -> None:
    """A ``ValueError`` naming the fix where ``normaliser`` sits under ``wrapper`` and ``mode`` gives the agent
    the VLM reward (module docstring); ``"log"`` gives it the env's reward, which may be normalised."""
    if normaliser is None or mode == "log":
        return
    effect = ("the agent would get a normalised env reward plus a raw VLM reward" if mode == "add" else
              "the VLM reward the agent gets would not be normalised, and info['gt_reward'] would be")
    raise ValueError(f"{normaliser} is below {wrapper}: it rescales the env's own reward before {wrapper} sees it, and "
                     f"never the VLM reward, so in mode={mode!r} {effect}. Put the normaliser above, "
                     f"{normaliser}({wrapper}(...)), or pass mode='log'.")
