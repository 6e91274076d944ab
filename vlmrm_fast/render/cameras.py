"""Cameras for :class:`~vlmrm_fast.render.BatchRenderer`: a camera spec (None, an id or name, gymnasium's
``default_camera_config`` dict, an ``MjvCamera``) made into an ``mujoco.MjvCamera``, and the camera and
scene options an env's own ``render()`` uses, so that the batch draws what ``env.render()`` draws.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.render.gl_context import _mujoco, mujoco_major_version

CameraSpec = Union[None, int, str, Dict[str, Any], Any]  # Any: mujoco.MjvCamera

_CAMERA_FIELDS = ("type", "fixedcamid", "trackbodyid", "lookat", "distance", "azimuth", "elevation",
                  "orthographic")


def _model_data_of(env: Any) -> Tuple[Any, Any]:
    mujoco = _mujoco()
    u = getattr(env, "unwrapped", env)
    model, data = getattr(u, "model", None), getattr(u, "data", None)
    if not isinstance(model, mujoco.MjModel) or not isinstance(data, mujoco.MjData):
        raise TypeError(
            f"{type(u).__name__} is not a MuJoCo env: BatchRenderer needs env.unwrapped.model "
            "(mujoco.MjModel) and env.unwrapped.data (mujoco.MjData)"
        )
    return model, data


def _copy_camera(src: Any) -> Any:
    mujoco = _mujoco()
    cam = mujoco.MjvCamera()
    for name in _CAMERA_FIELDS:
        value = getattr(src, name)
        if name == "lookat":
            cam.lookat[:] = value
        else:
            setattr(cam, name, value)
    return cam


def _make_camera(model: Any, data: Any, spec: CameraSpec) -> Any:
    """An ``mujoco.MjvCamera`` from a camera spec (see :class:`BatchRenderer`)."""
    mujoco = _mujoco()
    if isinstance(spec, mujoco.MjvCamera):
        return _copy_camera(spec)
    cam = mujoco.MjvCamera()
    if spec is None or (isinstance(spec, (int, np.integer)) and int(spec) == -1):
        cam.type = mujoco.mjtCamera.mjCAMERA_FREE
        cam.fixedcamid = -1
        mujoco.mjv_defaultFreeCamera(model, cam)
        return cam
    if isinstance(spec, str):
        cam_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, spec)
        if cam_id == -1:
            raise ValueError(f"camera {spec!r} is not a camera of the model")
        spec = cam_id
    if isinstance(spec, (int, np.integer)):
        if not 0 <= int(spec) < model.ncam:
            raise ValueError(f"camera id {spec} outside [-1, {model.ncam})")
        cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
        cam.fixedcamid = int(spec)
        return cam
    if isinstance(spec, dict):
        # gymnasium's default_camera_config: attributes set on a free camera that gymnasium first
        # points at the median geom position from the model's extent.
        cam.type = mujoco.mjtCamera.mjCAMERA_FREE
        cam.fixedcamid = -1
        cam.lookat[:] = np.nan  # unless the config sets it: placed at the first render (see _place_lookats)
        cam.distance = model.stat.extent
        for key, value in spec.items():
            if not hasattr(cam, key):
                raise ValueError(f"camera config key {key!r} is not an attribute of mujoco.MjvCamera")
            if key == "lookat":
                cam.lookat[:] = np.asarray(value, dtype=np.float64)
            else:
                setattr(cam, key, value)
        return cam
    raise TypeError(
        "camera must be None (free camera), an int id or name of a model camera, a dict of "
        f"mujoco.MjvCamera attributes (gymnasium's default_camera_config) or an MjvCamera; got {type(spec)}"
    )


def check_camera(model: Any, cam: Any, what: str) -> None:
    """Refuse an ``mujoco.MjvCamera`` that MuJoCo cannot draw from: its ``mjv_updateScene`` ends the whole process
    (a C error, no Python exception) on an unknown ``type``, a fixed camera's ``fixedcamid`` outside the model's
    cameras or a tracking camera's ``trackbodyid`` outside its bodies. ``what`` names the camera ("env 0's camera")."""
    types = _mujoco().mjtCamera
    kind = int(cam.type)
    if kind == types.mjCAMERA_FIXED and not 0 <= cam.fixedcamid < model.ncam:
        where = f"ids 0 to {model.ncam - 1}" if model.ncam else "it has none"
        raise ValueError(f"{what} is fixed camera {cam.fixedcamid}, not a camera of the model ({where}); "
                         "set fixedcamid to one of them (or give a camera id or name), or use a free camera")
    if kind == types.mjCAMERA_TRACKING and not 0 <= cam.trackbodyid < model.nbody:
        raise ValueError(f"{what} tracks body {cam.trackbodyid}, not a body of the model (ids 0 to "
                         f"{model.nbody - 1}); set trackbodyid to one of them")
    if kind not in (types.mjCAMERA_FREE, types.mjCAMERA_TRACKING, types.mjCAMERA_FIXED):
        raise ValueError(f"{what} has type {kind}; MuJoCo's renderers draw from mjCAMERA_FREE (0), "
                         "mjCAMERA_TRACKING (1) or mjCAMERA_FIXED (2) cameras: set type to one of them")


def _warn_if_projection_ignored(cameras: Sequence[Tuple[Any, Any]]) -> None:
    """Warn where a given free camera asks for an orthographic projection that this MuJoCo ignores: before
    MuJoCo 4, a free camera is drawn with its model's projection (``model.vis.global_.orthographic``).
    ``cameras``: (MjModel, MjvCamera) pairs."""
    if mujoco_major_version() >= 4:
        return
    mujoco = _mujoco()
    for model, cam in cameras:
        if (cam.type == mujoco.mjtCamera.mjCAMERA_FREE and bool(cam.orthographic)
                != bool(model.vis.global_.orthographic)):
            warnings.warn(
                f"MuJoCo {mujoco.__version__} draws a free camera with its model's projection "
                f"(model.vis.global_.orthographic = {int(model.vis.global_.orthographic)}), not the camera's "
                f"orthographic = {int(cam.orthographic)}, as env.render() does; set it on the model, or use "
                "mujoco >= 4", stacklevel=stacklevel_outside_package())
            return


def _mujoco_renderer(env: Any) -> Optional[Any]:
    """A gymnasium MuJoCo env's ``MujocoRenderer`` (past its wrappers), or None."""
    return getattr(env.unwrapped if hasattr(env, "unwrapped") else env, "mujoco_renderer", None)


_OFFSCREEN_MODES = ("rgb_array", "rgbd_tuple", "depth_array")
"""gymnasium's render modes drawn by an offscreen viewer: each places its camera the same way when it is made."""


def _rgb_viewer(env: Any) -> Optional[Any]:
    """The offscreen viewer a gymnasium MuJoCo env renders its frames with, once it was made: the rgb_array one,
    else that of rgbd_tuple (whose RGB half is the frame) or depth_array (the same camera)."""
    viewers = getattr(_mujoco_renderer(env), "_viewers", None) or {}
    return next((viewers[mode] for mode in _OFFSCREEN_MODES if mode in viewers), None)


def _env_camera(env: Any) -> Tuple[CameraSpec, Optional[Any]]:
    """The camera and scene options an env's own ``render()`` uses (gymnasium MujocoEnv)."""
    mujoco = _mujoco()
    r = _mujoco_renderer(env)
    if r is None:
        return None, None
    camera_id = getattr(r, "camera_id", -1)
    viewer = _rgb_viewer(env)
    vopt = None
    if viewer is not None:
        cam = _copy_camera(viewer.cam)
        vopt = viewer.vopt
    else:
        config = dict(getattr(r, "default_cam_config", None) or {})
        model, data = _model_data_of(env)
        cam = _make_camera(model, data, config)
        flags = getattr(r, "_vopt", None)
        if flags:
            vopt = mujoco.MjvOption()
            for flag, value in flags.items():
                vopt.flags[flag] = value
    # gymnasium's render: camera_id -1 forces a free camera, >= 0 a fixed one, None keeps the type.
    if camera_id is not None:
        if camera_id == -1:
            cam.type = mujoco.mjtCamera.mjCAMERA_FREE
        else:
            cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
        cam.fixedcamid = camera_id
    return cam, vopt
