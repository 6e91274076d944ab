"""Gymnasium environments of the VLM-RM paper. Importing this module registers them (idempotent).

``vlmrm_fast/TexturedHumanoid-v0``: gymnasium's Humanoid physics (frame_skip 5, never terminates)
in a textured scene, camera tracking the torso, 224 x 224 RGB frames, episodes of 100 steps
(``gymnasium.make(ENV_ID, max_episode_steps=...)`` changes it).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import gymnasium

if TYPE_CHECKING:
    from vlmrm_fast.envs.humanoid import TexturedHumanoidEnv

#: Episode length of the paper's runs (env steps; each step is ``frame_skip`` = 5 physics steps).
EPISODE_LENGTH = 100
HUMANOID_ENV_ID = "vlmrm_fast/TexturedHumanoid-v0"

__all__ = ["HUMANOID_ENV_ID", "EPISODE_LENGTH", "register_envs", "TexturedHumanoidEnv"]


def register_envs() -> None:
    """Register the package's environments with gymnasium (does nothing if already registered)."""
    if HUMANOID_ENV_ID not in gymnasium.registry:
        gymnasium.register(
            id=HUMANOID_ENV_ID,
            entry_point="vlmrm_fast.envs.humanoid:TexturedHumanoidEnv",
            max_episode_steps=EPISODE_LENGTH,
        )


if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:  # lazy: importing mujoco's env class is only needed to make the env
        if name == "TexturedHumanoidEnv":
            from vlmrm_fast.envs.humanoid import TexturedHumanoidEnv

            return TexturedHumanoidEnv
        raise AttributeError(f"module 'vlmrm_fast.envs' has no attribute {name!r}")


register_envs()
