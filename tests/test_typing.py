"""The package ships ``py.typed``: its annotations must hold (mypy, configured in pyproject.toml), and a
user's type checker must see the public API's real types, not Any.

mypy's verdicts change between its releases, so the dev extra pins the version these tests were written
against; bump it deliberately. The verdicts also depend on the installed torch, NumPy, gymnasium and
stable-baselines3 (their own annotations): the checks are kept clean for the versions ``.ci/run`` installs and
for the NumPy each supported Python gets (2.2 on 3.10, 2.5 from 3.12: their stubs differ).
"""
from __future__ import annotations

import pathlib
import textwrap

import pytest

api = pytest.importorskip("mypy.api", reason="mypy is not installed (it comes with the dev extra)")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mypy(*args: str) -> tuple[str, int]:
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), *args])
    return stdout + stderr, status


def test_the_package_type_checks():
    out, status = _mypy(str(ROOT / "vlmrm_fast"))
    assert status == 0, f"mypy finds errors in vlmrm_fast (run `mypy` at the repository root):\n{out}"


USER_CODE = """
    import numpy as np
    import torch
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env

    import vlmrm_fast
    from vlmrm_fast import BatchRenderer, CLIPReward, Task, VLMRewardVecEnv, VLMRewardVectorWrapper, VLMRewardWrapper

    rm = CLIPReward.from_pretrained("vlmrm-tiny", None, goal="a humanoid robot kneeling",
                                    baseline="a humanoid robot", alpha=0.5, dtype=torch.float32)
    rewards: torch.Tensor = rm(np.zeros((2, 224, 224, 3), dtype=np.uint8))
    several = CLIPReward.from_pretrained("vlmrm-tiny", None, tasks=[Task("a robot", alpha=0.0)])
    env = VLMRewardWrapper(gym.make("vlmrm_fast/TexturedHumanoid-v0", render_mode="rgb_array"), rm, mode="add")
    venv = VLMRewardVecEnv(make_vec_env("vlmrm_fast/TexturedHumanoid-v0", n_envs=2), several, task="a robot")
    size: tuple[int, int] = rm.image_size
    renderer = BatchRenderer([gym.make("vlmrm_fast/TexturedHumanoid-v0") for _ in range(2)], width=224, height=224)
    frames: torch.Tensor = renderer.render()
    vector = VLMRewardVectorWrapper(gym.make_vec("vlmrm_fast/TexturedHumanoid-v0", num_envs=2), rm, mode="log")
"""

#: Mistakes a type checker should catch in a user's code, each with the mypy error code it gives.
USER_MISTAKES = {
    'CLIPReward.from_pretrained("vlmrm-tiny", None, goal="a robot", alpha="0.5")': "arg-type",
    'reward: np.ndarray = rm(np.zeros((1, 224, 224, 3), dtype=np.uint8))': "assignment",
    'CLIPReward.from_pretrained("vlmrm-tiny", None, goal="a robot", devcie="cpu")': "call-arg",
    "vlmrm_fast.CLIPRewards": "attr-defined",
    'BatchRenderer([], width="224")': "arg-type",
    "VLMRewardVecEnv(venv, rm, weight=None)": "arg-type",
}


def test_a_users_code_is_checked_against_the_public_api(tmp_path):
    """Correct use of the public API passes ``mypy --strict``; each mistake is an error of its own code on its
    own line, so the public names are typed, not Any (one mypy run: each costs tens of seconds)."""
    source = tmp_path / "user_code.py"
    source.write_text("\n".join([textwrap.dedent(USER_CODE), *USER_MISTAKES, ""]))
    out, status = _mypy("--strict", "--no-warn-unused-ignores", str(source))
    written = source.read_text().splitlines()
    expected = {written.index(line) + 1: code for line, code in USER_MISTAKES.items()}
    errors = {}
    for message in out.splitlines():
        if ": error: " in message:
            number = int(message.split("user_code.py:")[1].split(":")[0])
            errors[number] = message.rsplit("[", 1)[-1].rstrip("]")
    assert errors == expected, f"expected errors (line: code) {expected}, mypy said:\n{out}"
    assert status == 1
