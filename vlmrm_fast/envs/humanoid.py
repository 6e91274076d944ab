"""The VLM-RM paper's humanoid: gymnasium's MuJoCo Humanoid physics in a textured scene (SPEC §1.3).

Physics, observations and the env's own reward are gymnasium's ``Humanoid`` (the v4 class, as in the
original code; the v5 class where v4 is gone). What changes:

- ``terminate_when_unhealthy=False`` by default: episodes never terminate, they are truncated at the
  fixed length set at registration (``max_episode_steps``, 100 by default).
- The scene is textured with MuJoCo's built-in procedural textures (no image files): a gradient sky
  box, a checker floor tiled with ``texrepeat``, a checker texture on every robot geom (through the
  default class's material) and a changed light. The XML is gymnasium's ``humanoid.xml`` edited at
  load time (:func:`textured_humanoid_xml`).
- The camera tracks body 1 (the torso) at distance 3.5, elevation -10, azimuth 180, lookat (0, 0, 1)
  (with a tracking camera MuJoCo moves lookat to the tracked body's subtree centre of mass each frame).
- ``render_mode="rgb_array"`` and 224 x 224 frames by default: the CLIP towers' input size, so the
  reward model's resize is the identity.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Any, Dict, Optional

import mujoco
import numpy as np
from gymnasium.utils import EzPickle

from vlmrm_fast.envs import EPISODE_LENGTH  # 100 env steps, as in the paper's runs

try:  # the paper's physics; gymnasium still ships the v4 class (deprecated in the registry only)
    from gymnasium.envs.mujoco.humanoid_v4 import HumanoidEnv as _HumanoidBase
except ImportError:  # pragma: no cover - a gymnasium without v4
    from gymnasium.envs.mujoco.humanoid_v5 import HumanoidEnv as _HumanoidBase  # type: ignore[assignment]  # v5's in v4's place

__all__ = ["TexturedHumanoidEnv", "textured_humanoid_xml", "DEFAULT_CAMERA_CONFIG", "EPISODE_LENGTH"]

DEFAULT_SIZE = 224

#: gymnasium ``default_camera_config`` (attributes of ``mujoco.MjvCamera``). ``type`` is set so that
#: ``trackbodyid`` takes effect (a free camera ignores it).
DEFAULT_CAMERA_CONFIG: Dict[str, Any] = {
    "type": int(mujoco.mjtCamera.mjCAMERA_TRACKING),
    "trackbodyid": 1,
    "distance": 3.5,
    "lookat": np.array((0.0, 0.0, 1.0)),
    "elevation": -10.0,
    "azimuth": 180.0,
}


def _gymnasium_humanoid_xml_path() -> str:
    import gymnasium.envs.mujoco as gm

    return os.path.join(os.path.dirname(gm.__file__), "assets", "humanoid.xml")


def _set(elem: ET.Element, **attrs: str) -> None:
    for k, v in attrs.items():
        elem.set(k, v)


def textured_humanoid_xml(source_path: Optional[str] = None) -> str:
    """gymnasium's ``humanoid.xml`` with the paper's textured scene, as an XML string.

    Only visual elements change (textures, materials, colours, light); bodies, joints, actuators
    and contact parameters are untouched, so the physics is gymnasium's.
    """
    tree = ET.parse(source_path or _gymnasium_humanoid_xml_path())
    root = tree.getroot()
    asset = root.find("asset")
    if asset is None:
        asset = ET.SubElement(root, "asset")
    # Replace the textures/materials of the original scene.
    for child in list(asset):
        if child.tag in ("texture", "material"):
            asset.remove(child)
    ET.SubElement(asset, "texture", name="sky", type="skybox", builtin="gradient",
                  rgb1="0.55 0.75 0.95", rgb2="0.05 0.1 0.25", width="256", height="1536")
    ET.SubElement(asset, "texture", name="texplane", type="2d", builtin="checker",
                  rgb1="0.25 0.3 0.35", rgb2="0.6 0.62 0.6", mark="edge", markrgb="0.1 0.1 0.1",
                  width="256", height="256")
    ET.SubElement(asset, "material", name="MatPlane", texture="texplane", texrepeat="8 8",
                  texuniform="true", reflectance="0.2", shininess="0.3", specular="0.3")
    ET.SubElement(asset, "texture", name="texgeom", type="cube", builtin="checker",
                  rgb1="0.85 0.6 0.4", rgb2="0.65 0.42 0.28", mark="random", random="0.02",
                  markrgb="1 1 1", width="128", height="128")
    ET.SubElement(asset, "material", name="geom", texture="texgeom", texuniform="true",
                  texrepeat="2 2", shininess="0.2", specular="0.2")

    # The robot's geoms take their colour from the textured material of the default class.
    default = root.find("default")
    if default is not None:
        geom_default = default.find("geom")
        if geom_default is not None:
            geom_default.attrib.pop("rgba", None)
            geom_default.set("material", "geom")

    worldbody = root.find("worldbody")
    assert worldbody is not None, "humanoid.xml without a worldbody"
    for geom in worldbody.findall("geom"):
        if geom.get("name") == "floor" or geom.get("type") == "plane":
            geom.attrib.pop("rgba", None)
            geom.set("material", "MatPlane")
    # A changed light: a brighter directional key light from above and in front, with shadows.
    for light in worldbody.findall("light"):
        worldbody.remove(light)
    light = ET.Element("light", name="key", directional="true", castshadow="true", pos="2 -1 6",
                       dir="-0.3 0.15 -1", diffuse="0.85 0.85 0.8", specular="0.2 0.2 0.2")
    worldbody.insert(0, light)

    visual = root.find("visual")
    if visual is None:
        visual = ET.SubElement(root, "visual")
    headlight = visual.find("headlight")
    if headlight is None:
        headlight = ET.SubElement(visual, "headlight")
    _set(headlight, ambient="0.3 0.3 0.3", diffuse="0.4 0.4 0.4", specular="0.1 0.1 0.1")
    return ET.tostring(root, encoding="unicode")


def _is_positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and bool(value >= 1)


class TexturedHumanoidEnv(_HumanoidBase):
    """gymnasium's Humanoid (frame_skip 5) in the paper's textured scene, rendering 224 x 224 RGB.

    Registered as ``vlmrm_fast/TexturedHumanoid-v0`` (fixed episode length through
    ``max_episode_steps``). Keyword arguments other than the ones below go to gymnasium's
    ``HumanoidEnv`` (``ctrl_cost_weight``, ``reset_noise_scale``, ...).

    Args:
        render_mode: ``"rgb_array"`` (default), ``"depth_array"``, ``"rgbd_tuple"``, ``"human"`` or None.
        width, height: frame size in pixels (default 224 x 224).
        camera_config: overrides of :data:`DEFAULT_CAMERA_CONFIG` (``mujoco.MjvCamera`` attributes).
        textured: False keeps gymnasium's original scene (same physics, same camera).
        terminate_when_unhealthy: default False (the paper's setting).
        shadow_size: side of the light's shadow map in texels (``model.vis.quality.shadowsize``);
            None keeps MuJoCo's 4096, the look the paper's frames had. Drawing that map is most of a
            frame's render time on a GPU whatever the frame size: on an H200, 8 envs at 224 x 224
            render at about 380 frames/s with 4096, 1,020 with 2048, 1,860 with 1024
            (benchmarks/results/render-breakdown-h200.md). Smaller maps blur and alias the
            shadow's edge, so the frames, and the rewards, change a little.
    """

    def __init__(
        self,
        render_mode: Optional[str] = "rgb_array",
        width: int = DEFAULT_SIZE,
        height: int = DEFAULT_SIZE,
        camera_config: Optional[Dict[str, Any]] = None,
        textured: bool = True,
        terminate_when_unhealthy: bool = False,
        shadow_size: Optional[int] = None,
        **kwargs: Any,
    ):
        for key in ("camera_id", "camera_name", "default_camera_config", "xml_file", "frame_skip"):
            if key in kwargs:
                raise TypeError(f"TexturedHumanoidEnv does not take {key!r} (see camera_config / textured)")
        for name, value in (("width", width), ("height", height)):
            if not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive integer number of pixels (default {DEFAULT_SIZE}: "
                                 f"the input size of CLIP's ViT towers, so frames need no resize); got {value!r}.")
        if shadow_size is not None and not _is_positive_int(shadow_size):
            raise ValueError(f"shadow_size must be a positive integer (texels; MuJoCo's default is 4096) or None; "
                             f"got {shadow_size!r}.")
        self._textured = bool(textured)
        self._shadow_size = None if shadow_size is None else int(shadow_size)
        cam = dict(DEFAULT_CAMERA_CONFIG)
        if camera_config:
            unknown = [k for k in camera_config if not hasattr(mujoco.MjvCamera(), k)]
            if unknown:
                raise ValueError(f"camera_config: not attributes of mujoco.MjvCamera: {unknown}")
            cam.update(camera_config)
        self.camera_config = cam
        super().__init__(
            terminate_when_unhealthy=terminate_when_unhealthy,
            render_mode=render_mode,
            width=int(width),
            height=int(height),
            **kwargs,
        )
        # The base class recorded its own positional arguments for pickling; record ours (keywords
        # only) so that copies (pickling, async vector envs) rebuild this env.
        EzPickle.__init__(
            self, render_mode=render_mode, width=width, height=height, camera_config=camera_config,
            textured=textured, terminate_when_unhealthy=terminate_when_unhealthy, shadow_size=shadow_size, **kwargs,
        )
        if camera_config:  # a camera MuJoCo cannot draw from ends the process at the first render: refuse it now
            from vlmrm_fast.render.cameras import check_camera, _make_camera  # imports torch: only for overrides

            check_camera(self.model, _make_camera(self.model, self.data, cam), "camera_config")
        renderer = self.mujoco_renderer
        renderer.default_cam_config = cam
        # gymnasium renders with camera_id -1 when no camera is named, and then forces a *free*
        # camera on every frame, which ignores trackbodyid. None leaves the camera type to the
        # config above (set once when the viewer is created).
        renderer.camera_id = None

    def _initialize_simulation(self):
        if self._textured:
            model = mujoco.MjModel.from_xml_string(textured_humanoid_xml(self.fullpath))
        else:
            model = mujoco.MjModel.from_xml_path(self.fullpath)
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        if self._shadow_size is not None:
            model.vis.quality.shadowsize = self._shadow_size
        data = mujoco.MjData(model)
        return model, data

    def render(self):
        if self.render_mode is None:
            raise RuntimeError(
                "TexturedHumanoidEnv was made with render_mode=None; make it with "
                "render_mode='rgb_array' to get frames"
            )
        try:
            return super().render()
        except Exception as exc:  # context creation failures: name the fix
            if looks_like_gl_error(exc):
                defuse_half_made_viewer(exc)
                raise RenderingUnavailable(rendering_help(exc)) from exc
            raise


class RenderingUnavailable(RuntimeError):
    """MuJoCo cannot make an OpenGL context here (no EGL, no display); the message names the fix."""


def defuse_half_made_viewer(exc: BaseException) -> None:
    """gymnasium's OffScreenViewer, when its GL context could not be made, is left without one, and its
    ``__del__`` then prints a second traceback under the clear error; give it a context to free."""
    current: Optional[BaseException] = exc
    while current is not None:
        tb = current.__traceback__
        while tb is not None:
            # Only constructors' frames: reading a running frame's locals would keep them alive.
            if tb.tb_frame.f_code.co_name == "__init__":
                viewer: Any = tb.tb_frame.f_locals.get("self")
                if type(viewer).__name__ == "OffScreenViewer" and not hasattr(viewer, "opengl_context"):
                    viewer.opengl_context = _NoContext()
            tb = tb.tb_next
        current = current.__cause__ or current.__context__


class _NoContext:
    def free(self) -> None:
        pass


def looks_like_gl_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in ("egl", "opengl", "gl context", "glfw", "osmesa", "display", "pyopengl"))


def looks_like_framebuffer_limit(exc: BaseException) -> bool:
    """MuJoCo's error for an offscreen framebuffer GL will not allocate: a render size past the GL
    implementation's limit (Mesa's llvmpipe: 16384 pixels a side), not a missing GL."""
    return type(exc).__name__ == "FatalError" and "framebuffer" in str(exc).lower()


def rendering_help(exc: Optional[BaseException] = None) -> str:
    """A one-paragraph explanation of why MuJoCo cannot render RGB frames here, and the fix."""
    gl = os.environ.get("MUJOCO_GL")
    msg = (
        f"MuJoCo cannot render rgb_array frames (MUJOCO_GL={gl!r}"
        + (f"; {type(exc).__name__}: {exc}" if exc is not None else "")
        + "). Headless: set MUJOCO_GL=egl and PYOPENGL_PLATFORM=egl before importing mujoco, with "
        "an EGL library installed (Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri for CPU "
        "rendering, the NVIDIA driver's EGL for GPU rendering), or MUJOCO_GL=osmesa with libosmesa6."
    )
    return msg
