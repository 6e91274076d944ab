"""vlmrm_fast: CLIP models as fast zero-shot reward models for reinforcement learning (VLM-RM)."""
import importlib
import importlib.util

from vlmrm_fast.models import TINY_MODEL, PretrainedWeightsError, create_clip, register_model_configs
from vlmrm_fast.reward import CLIPReward
from vlmrm_fast.tasks import Task

__version__ = "0.1.0"  # the only place: pyproject.toml reads it from here

register_model_configs()

# The RL pieces need the `train` extra (gymnasium, stable-baselines3, mujoco); they load on first use
# so that `import vlmrm_fast` stays light and works without them.
_LAZY = {
    "VLMRewardWrapper": "vlmrm_fast.wrappers",
    "VLMRewardVecEnv": "vlmrm_fast.wrappers",
    "RenderTerminalFrame": "vlmrm_fast.wrappers",
    "BatchRenderer": "vlmrm_fast.render",
}

if importlib.util.find_spec("gymnasium") is not None:
    import vlmrm_fast.envs  # noqa: F401  registers vlmrm_fast/TexturedHumanoid-v0


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmrm_fast' has no attribute {name!r}")


__all__ = [
    "CLIPReward", "Task", "PretrainedWeightsError", "create_clip", "TINY_MODEL", "__version__",
    "VLMRewardWrapper", "VLMRewardVecEnv", "RenderTerminalFrame", "BatchRenderer",
]
