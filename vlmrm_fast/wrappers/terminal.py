"""Terminal steps under a vector env's auto-reset (see :mod:`vlmrm_fast.wrappers`): :class:`RenderTerminalFrame`
(each episode's last frame, in ``info``) and the MuJoCo terminal states (``MjData`` and the model fields a reset
may change) that the vector wrappers swap in to render that frame with the others."""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, SupportsFloat, Tuple

import gymnasium as gym
import numpy as np
import torch

from vlmrm_fast.env_render import render_env
from vlmrm_fast.wrappers.frame_checks import _RGB_FIX, _check_frame

TERMINAL_FRAME_KEY = "terminal_frame"


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

    env: gym.Env

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
    def spec(self) -> Any:  # type: ignore[override]  # gymnasium's Env.spec: an attribute its Wrapper makes a property
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
        elif (parts := mujoco_parts[i]) is not None and not (framed and not batch):
            shared = envs_per_model[id(parts[0])] > 1
            states[i] = envs[i] = _MujocoTerminalState(env, *parts, model_fields=not shared)
        elif not framed:
            envs[i] = _InsertedRenderTerminalFrame(env)
    return states


def _is_wrapped(env: gym.Env, wrapper_class: type) -> bool:
    while isinstance(env, gym.Wrapper):
        if isinstance(env, wrapper_class):
            return True
        env = env.env
    return False
