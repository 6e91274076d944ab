"""OpenGL contexts for MuJoCo rendering: which EGL device a context is made on, the caller's current
context kept current across ours (gymnasium envs render into whatever context is current), and
``mujoco.Renderer`` opened and closed with its own context current.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, suppress
from typing import Any, List, Optional, Sequence


def _mujoco():
    import mujoco

    return mujoco


def mujoco_major_version() -> int:
    """MuJoCo's major version: 4 changed how EGL devices are numbered and how free cameras are projected."""
    return int(_mujoco().__version__.split(".")[0])


def egl_position_of_cuda_device(egl_cuda_ids: Sequence[Optional[int]], index: int,
                                visible: Optional[str]) -> Optional[int]:
    """Position in EGL's device list of the device behind torch's ``cuda:index``.

    ``egl_cuda_ids``: each EGL device's ``EGL_CUDA_DEVICE_NV`` (None where the driver gives none);
    ``visible``: ``CUDA_VISIBLE_DEVICES``. The driver's ordinal is looked up as the physical one
    (``visible`` maps torch's index to it) and then as torch's own; None where neither is there
    (a software renderer, GPUs named by UUID): the caller then keeps EGL's own order.
    """
    physical: Optional[int] = index
    if visible is not None and visible.strip():
        try:
            ids = [int(v) for v in visible.split(",") if v.strip()]
            physical = ids[index] if index < len(ids) else None
        except ValueError:  # UUIDs or MIG names
            physical = None
    for wanted in dict.fromkeys(x for x in (physical, index) if x is not None):
        if wanted in egl_cuda_ids:
            return list(egl_cuda_ids).index(wanted)
    return None


def _egl_cuda_ids() -> List[Optional[int]]:
    """``EGL_CUDA_DEVICE_NV`` of each EGL device, in ``eglQueryDevicesEXT``'s order (EGL_NV_device_cuda)."""
    import ctypes

    from mujoco.egl import egl_ext as EGL

    query = ctypes.cast(EGL.eglGetProcAddress("eglQueryDeviceAttribEXT"), ctypes.c_void_p).value
    if not query:  # no EGL_EXT_device_query
        return []
    attrib = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_ssize_t))(query)
    out: List[Optional[int]] = []
    for device in EGL.eglQueryDevicesEXT():
        value = ctypes.c_ssize_t(-1)
        handle = ctypes.cast(device, ctypes.c_void_p).value
        out.append(int(value.value) if attrib(handle, 0x323A, ctypes.byref(value)) and value.value >= 0 else None)
    EGL.eglGetError()  # a driver without EGL_NV_device_cuda refused the attribute: clear that error
    return out


@contextmanager
def _egl_device_for(index: int):
    """Point MuJoCo's EGL display at CUDA device ``index`` unless the user or an earlier context chose.

    ``MUJOCO_EGL_DEVICE_ID`` is a CUDA device number for MuJoCo >= 4 (it reads ``EGL_CUDA_DEVICE_NV``
    itself) but a position in EGL's device list before, where the two orders differ on many-GPU
    machines and under ``CUDA_VISIBLE_DEVICES``: there the position is looked up here.
    """
    created, major = False, 4
    try:
        import mujoco.egl as megl

        created = getattr(megl, "EGL_DISPLAY", None) is not None
        major = mujoco_major_version()
    except Exception:
        pass
    set_here = not created and "MUJOCO_EGL_DEVICE_ID" not in os.environ
    if set_here:
        position: Optional[int] = index
        if major < 4:
            try:
                found = egl_position_of_cuda_device(_egl_cuda_ids(), index, os.environ.get("CUDA_VISIBLE_DEVICES"))
                position = index if found is None else found
            except Exception:  # no device-query extension: EGL's own order, checked after by cudaGLGetDevices
                pass
        os.environ["MUJOCO_EGL_DEVICE_ID"] = str(position)
    try:
        yield
    finally:
        if set_here:
            os.environ.pop("MUJOCO_EGL_DEVICE_ID", None)


@contextmanager
def _keep_current_gl():
    """Restore the caller's current GL context afterwards.

    gymnasium's MuJoCo envs make their own context current once, when their viewer is created, and
    render into whatever context is current afterwards: a renderer that leaves its own context
    current (or none, after freeing it) would silently break their ``env.render()``. EGL and GLFW
    contexts are restored; with OSMesa this is best effort (nothing is restored). Where no EGL context
    was current, none is left current: an EGL context current on one thread cannot be made current
    on another, so one left current here would make rendering from another thread fail.
    """
    backend = os.environ.get("MUJOCO_GL", "").strip().lower()
    saved = None
    try:
        if backend == "egl":
            from mujoco.egl import egl_ext as EGL

            ctx = EGL.eglGetCurrentContext()
            if ctx:
                saved = ("egl", (EGL.eglGetCurrentDisplay(), EGL.eglGetCurrentSurface(EGL.EGL_DRAW),
                                 EGL.eglGetCurrentSurface(EGL.EGL_READ), ctx))
        elif backend in ("", "glfw", "glx", "enable", "enabled", "on", "true", "1"):
            import glfw

            win = glfw.get_current_context()
            if win:
                saved = ("glfw", win)
    except Exception:
        saved = None
    try:
        yield
    finally:
        if saved is None and backend == "egl":
            try:
                from mujoco.egl import egl_ext as EGL

                if EGL.eglGetCurrentContext():
                    EGL.eglMakeCurrent(EGL.eglGetCurrentDisplay(), EGL.EGL_NO_SURFACE, EGL.EGL_NO_SURFACE,
                                       EGL.EGL_NO_CONTEXT)
            except Exception:
                pass
        if saved is not None:
            kind, state = saved
            try:
                if kind == "egl":
                    from mujoco.egl import egl_ext as EGL

                    EGL.eglMakeCurrent(*state)
                else:
                    import glfw

                    glfw.make_context_current(state)
            except Exception:  # the saved context is gone (e.g. it was ours, freed by close())
                pass


def close_mujoco_renderer(renderer: Any) -> None:
    """Close a ``mujoco.Renderer`` (one whose ``__init__`` failed too) with its own GL context current.

    Before MuJoCo 4, ``Renderer.close`` frees its ``MjrContext`` in whatever context is current, deleting
    the GL objects of the same ids there (a gymnasium env's: its ``env.render()`` then returns black
    frames), and ``GLContext.free`` releases the thread's current context even when that is another's.
    Run inside :func:`_keep_current_gl`, which makes the caller's context current again afterwards.
    """
    gl = getattr(renderer, "_gl_context", None)
    try:
        if gl is not None:
            gl.make_current()
        renderer.close()
    except AttributeError:  # an __init__ that failed before setting the attributes close() reads
        if gl is not None:
            gl.free()
        # Its __del__ calls close() again: where __init__ does not set them first (MuJoCo 3.5 and 3.6; 3.10 on
        # does), that raised the same AttributeError from the garbage collector ("Exception ignored in ...").
        renderer._gl_context = renderer._mjr_context = None


def open_mujoco_renderer(model: Any, height: int, width: int, max_geom: int = 10_000) -> Any:
    """``mujoco.Renderer(model, height, width, max_geom)``; one whose ``__init__`` fails is closed by
    :func:`close_mujoco_renderer` before the error is raised (not left to the garbage collector)."""
    mujoco = _mujoco()
    renderer = mujoco.Renderer.__new__(mujoco.Renderer)
    try:
        renderer.__init__(model, height, width, max_geom)
    except Exception:
        with suppress(Exception):  # the error that matters is __init__'s
            close_mujoco_renderer(renderer)
        raise
    return renderer


@contextmanager
def temporary_mujoco_renderer(model: Any, height: int, width: int):
    """A ``mujoco.Renderer`` for a short job (a check, a query), closed on exit with the caller's GL
    context current again: gymnasium envs render into whatever context is current."""
    with _keep_current_gl():
        renderer = open_mujoco_renderer(model, height, width)
        try:
            yield renderer
        finally:
            close_mujoco_renderer(renderer)
