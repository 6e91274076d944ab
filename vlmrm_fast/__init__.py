"""vlmrm_fast: CLIP models as fast zero-shot reward models for reinforcement learning (VLM-RM).

The public names load on first use (PEP 562), so that ``import vlmrm_fast`` and the ``vlmrm-fast``
command line (``--help``, argument errors) answer without importing torch and open_clip; the tiny
test config is added to open_clip's registry when :mod:`vlmrm_fast.models` loads (any use of
``CLIPReward``, ``create_clip`` or ``register_model_configs``). The RL pieces need the ``train``
extra (gymnasium, stable-baselines3, mujoco).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"  # the only place: pyproject.toml reads it from here

_LAZY = {
    "CLIPReward": "vlmrm_fast.reward",
    "Task": "vlmrm_fast.tasks",
    "TINY_MODEL": "vlmrm_fast.models",
    "PretrainedWeightsError": "vlmrm_fast.models",
    "create_clip": "vlmrm_fast.models",
    "register_model_configs": "vlmrm_fast.models",
    "VLMRewardWrapper": "vlmrm_fast.wrappers",
    "VLMRewardVecEnv": "vlmrm_fast.wrappers",
    "RenderTerminalFrame": "vlmrm_fast.wrappers",
    "VLMRewardVectorWrapper": "vlmrm_fast.vector_wrapper",
    "BatchRenderer": "vlmrm_fast.render",
    "BackendError": "vlmrm_fast.backends.base",
}

if TYPE_CHECKING:  # what type checkers and IDEs see
    from vlmrm_fast.backends.base import BackendError
    from vlmrm_fast.models import TINY_MODEL, PretrainedWeightsError, create_clip, register_model_configs
    from vlmrm_fast.render import BatchRenderer
    from vlmrm_fast.reward import CLIPReward
    from vlmrm_fast.tasks import Task
    from vlmrm_fast.vector_wrapper import VLMRewardVectorWrapper
    from vlmrm_fast.wrappers import RenderTerminalFrame, VLMRewardVecEnv, VLMRewardWrapper

if importlib.util.find_spec("mujoco") is not None:
    from vlmrm_fast.llvm_clash import load_triton_first

    load_triton_first()  # before any MuJoCo frame: after one rendered by Mesa, loading Triton crashes

if importlib.util.find_spec("gymnasium") is not None:
    import vlmrm_fast.envs  # noqa: F401  registers vlmrm_fast/TexturedHumanoid-v0 (gymnasium only, light)


if not TYPE_CHECKING:  # hidden from type checkers, which would otherwise take any misspelt name as Any

    def __getattr__(name: str) -> object:
        if name in _LAZY:
            value = getattr(importlib.import_module(_LAZY[name]), name)
            globals()[name] = value  # later lookups skip this function
            return value
        raise AttributeError(f"module 'vlmrm_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CLIPReward", "Task", "PretrainedWeightsError", "create_clip", "register_model_configs", "TINY_MODEL",
    "__version__", "VLMRewardWrapper", "VLMRewardVecEnv", "VLMRewardVectorWrapper",
    "RenderTerminalFrame", "BatchRenderer", "BackendError",
]
