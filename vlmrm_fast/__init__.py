"""vlmrm_fast: CLIP models as fast zero-shot reward models for reinforcement learning (VLM-RM)."""
from vlmrm_fast.models import TINY_MODEL, PretrainedWeightsError, create_clip, register_model_configs
from vlmrm_fast.reward import CLIPReward
from vlmrm_fast.tasks import Task

__version__ = "0.1.0"

register_model_configs()

__all__ = ["CLIPReward", "Task", "PretrainedWeightsError", "create_clip", "TINY_MODEL", "__version__"]
