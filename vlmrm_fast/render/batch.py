"""Render N MuJoCo envs of one model into one uint8 tensor ``[N, H, W, 3]`` on a device.

Two paths:

- CPU path (always available): one ``mujoco.Renderer``; each env's scene is drawn and read back in
  turn into a preallocated host tensor (pinned when the output goes to CUDA), rows flipped to
  top-down as ``env.render()`` gives them, then copied to the device. ``bottom_up`` is False.
- GPU path (CUDA device, the ``vlmrm_fast._render_cuda`` extension, ``MUJOCO_GL=egl``): an EGL
  context on the CUDA device; after each ``mjr_render`` the extension resolves the multisampled
  framebuffer and reads it with ``glReadPixels`` into a pixel-pack buffer registered with CUDA; one
  device-to-device copy per batch moves all frames into the output tensor. Frames never touch the
  host and keep OpenGL's bottom-up row order (``bottom_up`` is True): the reward model's
  preprocessing kernel flips them for free, ``rm(frames, bottom_up=r.bottom_up)``.
"""
from __future__ import annotations

import atexit
import warnings
import weakref
from typing import Any, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

from vlmrm_fast.backends.base import checked_device
from vlmrm_fast.callers import stacklevel_outside_package
from vlmrm_fast.render import _cuda
from vlmrm_fast.render.cameras import (CameraSpec, check_camera, _env_camera, _make_camera, _model_data_of,
                                       _mujoco_renderer, _rgb_viewer, _warn_if_projection_ignored)
from vlmrm_fast.render.gl_context import (_egl_device_for, _keep_current_gl, _mujoco, close_mujoco_renderer,
                                          open_mujoco_renderer)

__all__ = ["BatchRenderer"]


# GPU-path renderers not yet closed, closed at interpreter exit while CUDA and EGL are whole: a __del__ run
# during teardown may find mujoco's EGL module half gone and leave the context to the driver's exit.
_open_gpu_renderers: "weakref.WeakSet[BatchRenderer]" = weakref.WeakSet()
_closing_at_exit = False


def _close_open_gpu_renderers() -> None:
    """Close every GPU-path renderer still open (registered with atexit by the first one)."""
    for renderer in list(_open_gpu_renderers):
        try:
            renderer.close()
        except Exception:  # at exit: one renderer's fault must not keep the others open
            pass


def _track_gpu_renderer(renderer: "BatchRenderer") -> None:
    global _closing_at_exit
    if not _closing_at_exit:
        atexit.register(_close_open_gpu_renderers)
        _closing_at_exit = True
    _open_gpu_renderers.add(renderer)


def _is_env(obj: Any) -> bool:
    return hasattr(obj, "unwrapped") or (hasattr(obj, "model") and hasattr(obj, "data")
                                         and not isinstance(obj, tuple))


# What the GL context uploads once, from model 0 (mjr_makeContext): textures, the materials' texture
# bindings, meshes, heightfields, skins and flexes. Colours, sizes, lights and which material a geom
# uses go into each env's scene from its own model (mjv_updateScene), so envs may differ in those.
_UPLOADED_ARRAYS = ("tex_type", "tex_nchannel", "tex_colorspace", "tex_adr", "tex_data", "tex_height", "tex_width",
                    "mat_texid", "mat_texuniform", "mat_texrepeat",
                    "mesh_vertadr", "mesh_vertnum", "mesh_faceadr", "mesh_facenum", "mesh_normaladr", "mesh_texcoordadr",
                    "mesh_vert", "mesh_face", "mesh_normal", "mesh_texcoord", "mesh_facenormal", "mesh_facetexcoord",
                    "mesh_graphadr", "mesh_graph",
                    "hfield_nrow", "hfield_ncol", "hfield_adr", "hfield_data", "hfield_size",
                    "skin_face", "skin_texcoord", "geom_type")
_UPLOADED_VISUAL = (("quality", "numslices"), ("quality", "numstacks"), ("quality", "numquads"), ("map", "haze"),
                    ("rgba", "haze"), ("quality", "shadowsize"), ("quality", "offsamples"), ("map", "shadowclip"),
                    ("map", "shadowscale"), ("map", "fogstart"), ("map", "fogend"), ("rgba", "fog"),
                    ("global_", "linewidth"))
"""Fields of ``model.vis`` the context is made with: its display lists, and the shadow map, multisampling,
fog and line width that ``mjr_makeContext`` copies from model 0 for every env."""


def _uploaded_differences(m: Any, first: Any) -> List[str]:
    """What model ``m`` would have drawn as ``first``'s: the names of the uploaded fields that differ."""
    diff = [a for a in _UPLOADED_ARRAYS if hasattr(first, a) and not np.array_equal(getattr(m, a), getattr(first, a))]
    planes = np.asarray(first.geom_type) == _mujoco().mjtGeom.mjGEOM_PLANE
    if "geom_type" not in diff and not np.array_equal(m.geom_size[planes], first.geom_size[planes]):
        diff.append("geom_size (of planes: their grids are built once)")
    for group, name in _UPLOADED_VISUAL:
        if not np.array_equal(getattr(getattr(m.vis, group), name), getattr(getattr(first.vis, group), name)):
            diff.append(f"vis.{group}.{name}")
    return diff


def _check_same_model(models: Sequence[Any]) -> None:
    first = models[0]
    fields = ("nbody", "ngeom", "nmat", "ntex", "nmesh", "nlight", "ncam", "nq", "nskin", "nflex", "nhfield")
    for i, m in enumerate(models[1:], start=1):
        if m is first:
            continue
        diff = [f for f in fields if getattr(m, f, None) != getattr(first, f, None)]
        if not diff:  # same counts can still be other textures or meshes, which would be drawn as model 0's
            diff = _uploaded_differences(m, first)
        if diff:
            raise ValueError(
                f"BatchRenderer renders envs of ONE model (its textures, meshes and heightfields are uploaded "
                f"once, its GL context made with one shadow map, multisampling and fog); model {i} differs "
                f"from model 0 in {diff}: make the envs alike (the same shadow_size=, for one)"
            )


def _check_data_fits(model: Any, data: Any) -> None:
    """Refuse an ``MjData`` made for another model: MuJoCo draws it without a check, reading its arrays at the
    model's sizes (a wrong frame, or memory past their ends)."""
    sizes = {"nq": data.qpos, "nbody": data.xpos, "ngeom": data.geom_xpos, "nsite": data.site_xpos,
             "ncam": data.cam_xpos, "nlight": data.light_xpos, "nv": data.qvel, "nu": data.ctrl, "na": data.act,
             "njnt": data.xanchor, "ntendon": data.ten_length, "nwrap": data.wrap_obj, "nmocap": data.mocap_pos,
             "nflexvert": data.flexvert_xpos, "neq": data.eq_active}  # (the scene draws tendons, actuators, flexes)
    diff = [f"{name} {getattr(model, name)} vs {len(array)}" for name, array in sizes.items()
            if len(array) != getattr(model, name)]
    if diff:
        raise ValueError(f"a (model, data) pair whose data was made for another model (model vs data: "
                         f"{', '.join(diff)}): pair each MjData with the MjModel it was made from, mujoco.MjData(model)")


class BatchRenderer:
    """Render N MuJoCo envs of the same model into one uint8 tensor ``[N, H, W, 3]``.

    Args:
        sources: a list of gymnasium MuJoCo envs (``env.unwrapped.model/.data``) or of
            ``(mujoco.MjModel, mujoco.MjData)`` pairs. All must share one model (same assets); the
            datas are read at each :meth:`render`, so stepping the envs is all that is needed.
        width, height: frame size (default 224 x 224, the CLIP towers' input size). The models'
            offscreen buffer (``model.vis.global_.offwidth/offheight``) is grown to fit if smaller.
        camera: None (MuJoCo's default free camera), an id or name of a model camera, a dict of
            ``mujoco.MjvCamera`` attributes (gymnasium's ``default_camera_config``), an
            ``MjvCamera``, or a list of N of these (one per env). For envs given without a camera,
            each env's own render camera is used (as :meth:`from_envs`).
        device: where the frames go: "cpu", "cuda", "cuda:1", a torch.device; default CUDA when
            available, else CPU. A CUDA device this machine does not have is a ValueError.
        gpu: "auto" (default: the GPU path where it can run, else the CPU path, with the reason in
            ``fallback_reason``), True (the GPU path or an error saying why not), False (CPU path).
        max_geom: scene capacity (geoms).
        scene_option: a ``mujoco.MjvOption`` for all envs (default: each env's, else MuJoCo's).

    Attributes: ``device``, ``width``, ``height``, ``num_envs``, ``bottom_up`` (True on the GPU
    path: rows in OpenGL order), ``path`` ("gpu" or "cpu"), ``fallback_reason`` (why not "gpu").
    """

    def __init__(
        self,
        sources: Sequence[Any],
        width: int = 224,
        height: int = 224,
        camera: Union[CameraSpec, Sequence[CameraSpec]] = None,
        device: Union[str, torch.device, None] = None,
        *,
        gpu: Union[str, bool] = "auto",
        max_geom: int = 10000,
        scene_option: Any = None,
    ) -> None:
        mujoco = _mujoco()
        self._closed = True
        sources = list(sources)
        if not sources:
            raise ValueError("BatchRenderer needs at least one env or (model, data) pair")
        width, height = int(width), int(height)
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive, got {width} x {height}")
        if int(max_geom) < 1:  # MuJoCo draws an empty scene: black frames, a warning in its log only
            raise ValueError(f"max_geom must be a positive number of geoms (default 10000), got {max_geom}")
        models, datas, env_cams, env_opts, envs = [], [], [], [], []
        for src in sources:
            if isinstance(src, (tuple, list)) and len(src) == 2:
                m, d = src
                if not isinstance(m, mujoco.MjModel) or not isinstance(d, mujoco.MjData):
                    raise TypeError("a (model, data) pair must be (mujoco.MjModel, mujoco.MjData)")
                _check_data_fits(m, d)
                cam, opt, env = None, None, None
            elif _is_env(src):
                m, d = _model_data_of(src)
                env = getattr(src, "unwrapped", src)  # checked at each render: still these model and data
                cam, opt = _env_camera(src)  # used where no camera (or None in a list) and no scene_option is given
            else:
                raise TypeError(
                    f"BatchRenderer takes gymnasium MuJoCo envs or (MjModel, MjData) pairs, got {type(src)}"
                )
            envs.append(env)
            models.append(m)
            datas.append(d)
            env_cams.append(cam)
            env_opts.append(opt)
        _check_same_model(models)
        self._envs = envs
        n = len(models)
        if isinstance(camera, (list, tuple)):
            if len(camera) != n:
                raise ValueError(f"camera: a list of {len(camera)} cameras for {n} envs")
            specs = list(camera)
        else:
            specs = [camera] * n
        from_env = [specs[i] is None and env_cams[i] is not None for i in range(n)]
        self._cameras: List[Any] = [env_cams[i] if from_env[i] else _make_camera(models[i], datas[i], specs[i]) for i in range(n)]
        for i in range(n):
            check_camera(models[i], self._cameras[i], f"env {i}'s camera")
        _warn_if_projection_ignored([(models[i], self._cameras[i]) for i in range(n) if not from_env[i]])
        # The envs whose own camera is used: where its viewer is made later, that viewer's lookat is env.render()'s.
        self._viewer_envs = [envs[i] if from_env[i] else None for i in range(n)]
        if scene_option is not None:
            self._options = [scene_option] * n
        else:
            default = mujoco.MjvOption()
            self._options = [opt if opt is not None else default for opt in env_opts]
        offscreen = [(m.vis.global_.offwidth, m.vis.global_.offheight) for m in models]
        for m in models:  # mjr contexts size their offscreen buffers from the model
            m.vis.global_.offwidth = max(m.vis.global_.offwidth, width)
            m.vis.global_.offheight = max(m.vis.global_.offheight, height)
        try:
            self._setup(models, datas, width, height, device, gpu, max_geom)
        except BaseException:  # the envs' own renderers must keep working (a too-large size breaks them)
            for m, (w, h) in zip(models, offscreen):
                m.vis.global_.offwidth, m.vis.global_.offheight = w, h
            raise

    def _setup(self, models, datas, width, height, device, gpu, max_geom) -> None:
        """Device, path (GPU or CPU) and the renderer itself."""
        self._models, self._datas = models, datas
        self.width, self.height, self.num_envs = width, height, len(models)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device = checked_device(
            device, "pass device='cpu', or leave device unset (CUDA where there is one, else the CPU).")
        self.max_geom = int(max_geom)
        self.fallback_reason: Optional[str] = None
        self.path = "cpu"

        if gpu not in ("auto", True, False):
            raise ValueError(f"gpu must be 'auto', True or False, got {gpu!r}")
        want_gpu = gpu is True or (gpu == "auto" and device.type == "cuda")
        if gpu is True and device.type != "cuda":
            raise ValueError(f"gpu=True needs a CUDA device, got device={device}")
        if want_gpu:
            reason = _cuda.gpu_unavailable_reason(device)
            if reason is None:
                with _keep_current_gl():
                    reason = self._init_gpu()
            if reason is not None:
                if gpu is True:
                    raise RuntimeError(f"BatchRenderer GPU path unavailable: {reason}")
                self.fallback_reason = reason
                warnings.warn(  # asked for CUDA frames: a silent host round trip per frame would hide a bad install
                    f"BatchRenderer renders on the CPU path and copies the frames to {device}: the GPU path cannot "
                    f"run ({reason}). To choose the CPU path without this warning, pass gpu=False (BatchRenderer) or "
                    "render='images' (VLMRewardVecEnv, VLMRewardVectorWrapper).",
                    UserWarning,
                    stacklevel=stacklevel_outside_package(),
                )
        elif device.type == "cuda":
            self.fallback_reason = "gpu=False"
        else:
            self.fallback_reason = f"device is {device}"
        if self.path == "cpu":
            with _keep_current_gl():
                self._init_cpu()
        self._closed = False
        if self.path == "gpu":
            _track_gpu_renderer(self)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_envs(
        cls,
        envs: Iterable[Any],
        width: Optional[int] = None,
        height: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        **kwargs: Any,
    ) -> "BatchRenderer":
        """A renderer for gymnasium MuJoCo envs, with each env's camera and render size.

        ``width``/``height`` default to the first env's render size (``env.unwrapped.width/height``).
        Other keyword arguments go to :class:`BatchRenderer` (``camera`` overrides the envs' cameras).
        """
        envs = list(envs)
        if not envs:
            raise ValueError("from_envs needs at least one env")
        _model_data_of(envs[0])
        from vlmrm_fast.wrappers.frame_checks import _frame_changing_wrappers  # wrappers imports this module

        own_frames = _frame_changing_wrappers([e for e in envs if callable(getattr(e, "render", None))])
        if own_frames:
            warnings.warn(
                f"{', '.join(own_frames)} render frames of their own (a wrapper's render(), or an env's own camera or "
                "size); this renderer draws each env's MuJoCo state as gymnasium's MujocoEnv renders it, so its frames "
                "are not their env.render()'s: use env.render() for those envs", stacklevel=stacklevel_outside_package())
        sizes = [(getattr(u, "width", None) or 224, getattr(u, "height", None) or 224)
                 for u in (getattr(env, "unwrapped", env) for env in envs)]
        if (width is None or height is None) and len(set(sizes)) > 1:
            raise ValueError(
                f"the envs render at different sizes ({sorted(set(sizes))} as width x height); one batch holds one "
                "size: make them alike, or pass width= and height= (each env is then drawn at that size)"
            )
        if width is None:
            width = sizes[0][0]
        if height is None:
            height = sizes[0][1]
        return cls(envs, width=width, height=height, device=device, **kwargs)

    def _init_cpu(self) -> None:
        try:
            self._renderer = open_mujoco_renderer(self._models[0], self.height, self.width, self.max_geom)
        except Exception as exc:
            # MuJoCo's size errors; not EGL's "failed to find a framebuffer configuration" (no usable GL
            # driver), which rendering_help explains.
            message = str(exc).lower()
            if "framebuffer" in message and "configuration" not in message:
                raise RuntimeError(f"cannot make a {self.width} x {self.height} offscreen framebuffer ({exc}): "
                                   "render at a smaller width and height") from exc
            from vlmrm_fast.envs.humanoid import RenderingUnavailable, rendering_help

            raise RenderingUnavailable(rendering_help(exc)) from exc
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._host = torch.empty((self.num_envs, self.height, self.width, 3), dtype=torch.uint8, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._copy_done: Optional[torch.cuda.Event] = None
        self.path = "cpu"

    def _init_gpu(self) -> Optional[str]:
        """Set up the EGL context, MuJoCo's GL context and the CUDA-registered PBO; a reason on failure."""
        mujoco = _mujoco()
        ext = _cuda.extension()
        index = self.device.index
        gl_ctx = con = reader = None
        try:
            with _egl_device_for(index):
                from mujoco.egl import GLContext

                gl_ctx = GLContext(self.width, self.height)
            gl_ctx.make_current()
            con = mujoco.MjrContext(self._models[0], mujoco.mjtFontScale.mjFONTSCALE_150)
            mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, con)
            devices = list(ext.gl_cuda_devices())
            if index not in devices:
                raise RuntimeError(
                    f"the EGL context is not on cuda:{index} (CUDA devices behind it: {devices or 'none'}; "
                    "a software renderer, or MUJOCO_EGL_DEVICE_ID / CUDA_VISIBLE_DEVICES pointing at "
                    "another GPU, or a container without the NVIDIA driver's graphics libraries)"
                )
            reader = ext.PboReader(self.width, self.height, self.num_envs, index)
            # One frame through the whole path now, so that a fault in mapping or copying falls back
            # here, with its reason, rather than failing the first render().
            reader.read(con.offFBO, con.offFBO_r, 0)
            with torch.cuda.device(self.device):
                reader.copy_to(torch.empty((1, self.height, self.width, 3), dtype=torch.uint8, device=self.device), 1)
                torch.cuda.synchronize(self.device)
        except Exception as exc:
            try:
                if gl_ctx is not None and (reader is not None or con is not None):
                    gl_ctx.make_current()  # both free GL objects in whatever context is current
                if reader is not None:
                    reader.close()
                if con is not None:
                    con.free()
                if gl_ctx is not None:
                    gl_ctx.free()
            except Exception:
                pass
            return f"{type(exc).__name__}: {exc}"
        self._gl, self._con, self._reader = gl_ctx, con, reader
        self._scene = mujoco.MjvScene(self._models[0], maxgeom=self.max_geom)
        self._rect = mujoco.MjrRect(0, 0, self.width, self.height)
        self.path = "gpu"
        return None

    # -- rendering ------------------------------------------------------------------------------
    @property
    def bottom_up(self) -> bool:
        """True when frames come in OpenGL row order (the GPU path): ``rm(frames, bottom_up=...)``."""
        return self.path == "gpu"

    @property
    def cameras(self) -> List[Any]:
        """The ``mujoco.MjvCamera`` of each env (modifiable: takes effect on the next render)."""
        return self._cameras

    def render(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Frames of all envs in their current state: uint8 ``[N, H, W, 3]`` on ``self.device``.

        ``out``: an optional contiguous uint8 tensor of that shape on ``self.device`` to write into.
        Each call returns a new tensor otherwise (never an internal buffer).
        """
        if self._closed:
            raise RuntimeError("BatchRenderer.render() after close()")
        shape = (self.num_envs, self.height, self.width, 3)
        if out is not None:
            if (tuple(out.shape) != shape or out.dtype != torch.uint8 or out.device != self.device
                    or not out.is_contiguous()):
                raise ValueError(f"out must be a contiguous uint8 tensor of shape {shape} on {self.device}")
        self._check_envs_keep_their_state()
        for i, (model, cam) in enumerate(zip(self._models, self._cameras)):  # ``cameras`` may have been changed
            check_camera(model, cam, f"env {i}'s camera")
        self._place_lookats()
        with _keep_current_gl():
            if self.path == "gpu":
                return self._render_gpu(out)
            return self._render_cpu(out)

    def _check_envs_keep_their_state(self) -> None:
        """The envs still hold the MjModel and MjData read at construction (a frame of stale ones
        would be a silent wrong answer)."""
        for i, (env, model, data) in enumerate(zip(self._envs, self._models, self._datas)):
            if env is not None and (getattr(env, "model", None) is not model or getattr(env, "data", None) is not data):
                raise RuntimeError(
                    f"env {i} replaced its MjModel or MjData since this BatchRenderer was made, which renders the "
                    "ones it was given: reset them in place (mujoco.mj_resetData, as gymnasium's MuJoCo envs do), "
                    "or make a new BatchRenderer after such a change."
                )

    def _place_lookats(self) -> None:
        """Free cameras from a camera config without a lookat look at the median geom position when
        they first render, as gymnasium's viewer does when it is made: at construction the envs may not
        have been reset yet (every geom at the origin). Where the env's own viewer was made since, its
        camera is the one ``env.render()`` uses, placed when it was made: that one is taken. Where it was
        not, the env's camera config gets this lookat, so that a viewer the env makes later (a video
        recorded from step k on) looks where the scored frames did, not at the geoms' median at step k."""
        for cam, model, data, env in zip(self._cameras, self._models, self._datas, self._viewer_envs):
            if np.isnan(cam.lookat).any():
                viewer = _rgb_viewer(env) if env is not None else None
                if viewer is not None:
                    cam.lookat[:] = viewer.cam.lookat
                    continue
                renderer = _mujoco_renderer(env)
                config = getattr(renderer, "default_cam_config", None) or {}
                if "lookat" in config:  # handed off by another renderer's first frame: the first one's aim holds
                    cam.lookat[:] = np.asarray(config["lookat"], dtype=np.float64)
                    continue
                cam.lookat[:] = np.median(data.geom_xpos, axis=0) if model.ngeom else 0.0
                if renderer is not None and hasattr(renderer, "default_cam_config"):
                    # A new dict: gymnasium's envs share their class's DEFAULT_CAMERA_CONFIG.
                    renderer.default_cam_config = {**config, "lookat": cam.lookat.copy()}

    __call__ = render

    def _render_cpu(self, out: Optional[torch.Tensor]) -> torch.Tensor:
        mujoco = _mujoco()
        r = self._renderer
        if self._copy_done is not None:  # the previous async host->device copy still reads _host
            self._copy_done.synchronize()
            self._copy_done = None
        to_cpu = self.device.type == "cpu"
        target = out if (to_cpu and out is not None) else (
            torch.empty(self._host.shape, dtype=torch.uint8) if to_cpu else self._host)
        target_np = target.numpy()
        for i in range(self.num_envs):
            mujoco.mjv_updateScene(self._models[i], self._datas[i], self._options[i], None, self._cameras[i],
                                   mujoco.mjtCatBit.mjCAT_ALL, r.scene)
            r.render(out=target_np[i])
        if to_cpu:
            return target
        if out is None:
            out = torch.empty(self._host.shape, dtype=torch.uint8, device=self.device)
        out.copy_(self._host, non_blocking=self._host.is_pinned())
        if self._host.is_pinned():
            self._copy_done = torch.cuda.Event()
            self._copy_done.record(torch.cuda.current_stream(self.device))
        return out

    def _render_gpu(self, out: Optional[torch.Tensor]) -> torch.Tensor:
        mujoco = _mujoco()
        self._gl.make_current()
        con, scene, rect, reader = self._con, self._scene, self._rect, self._reader
        for i in range(self.num_envs):
            mujoco.mjv_updateScene(self._models[i], self._datas[i], self._options[i], None, self._cameras[i],
                                   mujoco.mjtCatBit.mjCAT_ALL, scene)
            mujoco.mjr_render(rect, scene, con)
            reader.read(con.offFBO, con.offFBO_r, i)
        if out is None:
            out = torch.empty((self.num_envs, self.height, self.width, 3), dtype=torch.uint8, device=self.device)
        with torch.cuda.device(self.device):
            reader.copy_to(out, self.num_envs)
        return out

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the GL context and buffers (idempotent)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        _open_gpu_renderers.discard(self)
        with _keep_current_gl():
            self._free()

    def _free(self) -> None:
        if self.path == "gpu":
            try:
                self._gl.make_current()
                self._reader.close()
                self._con.free()
            finally:
                self._gl.free()
                self._reader = self._con = self._gl = None
        else:
            if self._copy_done is not None:
                self._copy_done.synchronize()
            close_mujoco_renderer(self._renderer)
            self._renderer = None

    def __getstate__(self) -> dict:
        # Else the GL context's ctypes pointers, or the cameras, fail deep inside pickle with an error that names
        # neither this class nor a way out.
        raise TypeError(
            "a BatchRenderer cannot be pickled or copied (copy.deepcopy, a subprocess): it holds this process's GL "
            "context. Make one where the frames are needed, BatchRenderer.from_envs(envs) on the envs there."
        )

    def __enter__(self) -> "BatchRenderer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"BatchRenderer(num_envs={self.num_envs}, size={self.width}x{self.height}, device={self.device}, "
                f"path={self.path!r}, bottom_up={self.bottom_up})")
