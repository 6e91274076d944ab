"""``env.render()`` that does not hand black frames to a reward model.

gymnasium's MuJoCo envs render into whatever OpenGL context is current on the thread: their own, which
their first render makes current, as long as nothing changed it since. Two things in the same process
change it without a word, and the env's ``render()`` then returns black frames:

- closing or collecting another MuJoCo env whose context was current leaves none current;
- collecting one that was never closed frees its ``MjrContext`` in whatever context is current: another
  env's, whose GL objects of the same ids (its framebuffer) are deleted for good.

:func:`render_env` makes the env's own context current first, and where a gymnasium MuJoCo env still
returns an all-black frame (its GL objects gone; a lit MuJoCo scene is never all black), rebuilds its
renderer, with a warning, and renders again. :func:`release_env_gl` frees an env's GL objects with its
own context current, so that closing one of this package's envs (an evaluation's) cannot do the above.
"""
from __future__ import annotations

import warnings
from typing import Any, List, Optional

import numpy as np

from vlmrm_fast.callers import stacklevel_outside_package


_CAMERA_FIELDS = ("type", "fixedcamid", "trackbodyid", "lookat", "distance", "azimuth", "elevation", "orthographic")
"""``mujoco.MjvCamera``'s state."""


def _mujoco_renderer(env: Any) -> Any:
    return getattr(getattr(env, "unwrapped", env), "mujoco_renderer", None)


def make_own_context_current(env: Any) -> None:
    """Make a gymnasium MuJoCo env's rendering context current (nothing for other envs, and for one that
    has not rendered yet: its first render makes its new context current)."""
    make_current = getattr(getattr(_mujoco_renderer(env), "viewer", None), "make_context_current", None)
    if make_current is not None:
        try:
            make_current()
        except RuntimeError:  # current on another thread: the render below finds out, and rebuilds
            pass


def release_env_gl(env: Any) -> None:
    """Free a gymnasium MuJoCo env's viewers (their ``MjrContext`` and GL context) with each one's own
    context current, and forget them (a later render makes new ones). The caller's current context stays
    current. Nothing for other envs."""
    renderer = _mujoco_renderer(env)
    viewers = getattr(renderer, "_viewers", None)
    if not viewers:
        return
    from vlmrm_fast.render.gl_context import _keep_current_gl

    with _keep_current_gl():
        for viewer in list(viewers.values()):
            try:
                viewer.make_context_current()
                con = getattr(viewer, "con", None)
                if con is not None:
                    con.free()
                viewer.free()
            except Exception:  # a viewer of another kind, or a context already gone: nothing left to spare
                pass
    viewers.clear()
    renderer.viewer = None


def render_env(env: Any) -> Any:
    """``env.render()``, with the env's own GL context made current first, and a gymnasium MuJoCo env's
    renderer rebuilt where its frame comes back all black (see the module docstring)."""
    make_own_context_current(env)
    frame = env.render()
    renderer = _mujoco_renderer(env)
    if isinstance(frame, np.ndarray) and frame.size and renderer is not None and not frame.any():
        # The camera as it is (a tracking camera keeps the offset it started with), for the new viewer.
        cam = getattr(getattr(renderer, "viewer", None), "cam", None)
        saved = {k: np.copy(getattr(cam, k)) for k in _CAMERA_FIELDS if hasattr(cam, k)}
        release_env_gl(env)
        env.render()  # makes the new viewer
        new_cam = getattr(getattr(renderer, "viewer", None), "cam", None)
        for key, value in saved.items() if new_cam is not None else ():
            setattr(new_cam, key, value.item() if value.ndim == 0 else value)
        frame = env.render()
        if isinstance(frame, np.ndarray) and frame.any():
            warnings.warn(
                f"{type(getattr(env, 'unwrapped', env)).__name__} rendered a black frame: its GL objects were freed "
                "by another MuJoCo env (one dropped without close() while this env's context was current, say); "
                "its renderer was rebuilt. Close MuJoCo envs you no longer need (env.close()) to avoid it.",
                stacklevel=stacklevel_outside_package(),
            )
    return frame


def in_process_envs(venv: Any) -> Optional[List[Any]]:
    """The envs of an SB3 ``DummyVecEnv`` or a gymnasium ``SyncVectorEnv``, under wrappers that leave
    rendering to them, else None (subprocess envs render in processes of their own, one env each)."""
    layer = venv
    while True:
        if {"get_images", "render"} & getattr(layer, "__dict__", {}).keys():
            return None  # render() or get_images() replaced on the object: they decide the frames
        if type(layer).__name__ in ("DummyVecEnv", "SyncVectorEnv"):
            envs = getattr(layer, "envs", None)
            return list(envs) if envs is not None else None
        own_render = any(name in type(layer).__dict__ for name in ("get_images", "render"))
        inner = getattr(layer, "venv", None) or getattr(layer, "env", None)
        if inner is None or inner is layer or own_render:
            return None
        layer = inner
