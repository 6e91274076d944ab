"""Batched MuJoCo rendering into one torch tensor (CPU path, or GL -> CUDA without a host trip).

``BatchRenderer(envs_or_models_and_datas, width, height, camera, device).render()`` returns uint8
frames ``[N, H, W, 3]`` on ``device``; pass ``bottom_up=renderer.bottom_up`` to the reward model.
"""
from vlmrm_fast.render._cuda import gpu_unavailable_reason
from vlmrm_fast.render.batch import BatchRenderer

__all__ = ["BatchRenderer", "gpu_unavailable_reason"]
