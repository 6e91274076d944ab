"""Batched MuJoCo rendering into one torch tensor (CPU path, or GL -> CUDA without a host trip).

``BatchRenderer(envs_or_models_and_datas, width, height, camera, device).render()`` returns uint8
frames ``[N, H, W, 3]`` on ``device``; pass ``bottom_up=renderer.bottom_up`` to the reward model.
"""
import os
from typing import Optional

from vlmrm_fast.render._cuda import gpu_unavailable_reason
from vlmrm_fast.render.batch import BatchRenderer
from vlmrm_fast.render.gl_context import temporary_mujoco_renderer


def rendering_unavailable_reason() -> Optional[str]:
    """None if MuJoCo can draw an RGB frame here, else why not (no EGL library, no device, ...).

    Safe to call while gymnasium envs render: their GL context is current again afterwards.
    """
    try:
        import mujoco

        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='1'/></worldbody></mujoco>")
        with temporary_mujoco_renderer(model, 8, 8) as renderer:
            renderer.update_scene(mujoco.MjData(model))
            renderer.render()
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot render here
        return f"MuJoCo cannot render here (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): {type(exc).__name__}: {exc}"
    return None


__all__ = ["BatchRenderer", "gpu_unavailable_reason", "rendering_unavailable_reason"]
