"""CLIP rewards inside reinforcement-learning loops: a gymnasium wrapper and a stable-baselines3 VecEnv wrapper.

Both render the environment after each step, score the frame with a :class:`~vlmrm_fast.CLIPReward` (the
VLM-RM reward, SPEC §1.1) and hand the result to the agent as its reward:

- :class:`VLMRewardWrapper` wraps one ``gymnasium.Env`` (one frame, one reward model call per step).
- :class:`VLMRewardVecEnv` wraps an SB3 ``VecEnv``: all envs are rendered once per step and scored in
  one batch. With a ``DummyVecEnv`` of MuJoCo envs the frames come from
  :class:`vlmrm_fast.render.BatchRenderer` (kept on the GPU when it renders there); otherwise from
  ``venv.get_images()`` through host memory (``SubprocVecEnv`` pickles every frame through a pipe, so
  ``DummyVecEnv`` is the fast path).
- :class:`vlmrm_fast.vector_wrapper.VLMRewardVectorWrapper` does the same for gymnasium vector envs.

Modes (both wrappers):

- ``"replace"``: reward = VLM reward (the paper's setting).
- ``"add"``: reward = env reward + ``weight`` * VLM reward.
- ``"log"``: reward = env reward, unchanged; the VLM reward is only reported in ``info``.

Every step's ``info`` gets ``"gt_reward"`` (the env's own reward, float) and ``"vlm_reward"`` (float).
With a several-task reward model (``CLIPReward(tasks=[...])``) the task chosen by ``task=`` (index or
name, default the first) drives the reward and ``info["vlm_rewards"]`` maps every task name to its
reward (a plain callable returning [N, T] names no tasks: its columns are keyed "0" to "T-1"). On the
step where an episode ends, ``info["episode_vlm_return"]`` and ``info["episode_gt_return"]`` hold the
episode's sums of the VLM and env rewards.

**Terminal steps in a VecEnv.** SB3 VecEnvs reset an env inside ``step_wait`` as soon as its episode
ends, so a frame rendered afterwards shows the *next* episode's first state, not the state the last
action reached. :class:`VLMRewardVecEnv` scores the true terminal state wherever SB3 allows it:

- ``DummyVecEnv`` of MuJoCo envs: each env is wrapped (in ``venv.envs``) by a tiny gymnasium wrapper
  that copies the MuJoCo state (``mj_copyData``) when an episode ends, before the auto-reset. At the
  next render the terminal state is swapped in, the frame rendered with all the others in the same
  batch, and the reset state swapped back (exact: the whole ``MjData`` is copied both ways, and so are
  the model's colours, sizes, materials, lights and camera angles, which visual domain randomisation
  may change at reset; textures, which the renderer uploads once, are not). An env that replaces its
  ``MjModel`` or ``MjData`` object is refused with an error at the step it does so.
- ``DummyVecEnv`` of other envs: each env is wrapped by :class:`RenderTerminalFrame`, which renders
  the terminal frame before the reset and passes it in ``info``.
- Other VecEnvs (``SubprocVecEnv``, ...): build the envs with :class:`RenderTerminalFrame` inside
  (``make_vec_env(..., wrapper_class=RenderTerminalFrame)``), and the terminal frame travels in
  ``info`` (one extra frame per episode). Without it the terminal step is scored on the next episode's
  first frame; a warning says so once, and ``info["vlm_terminal_frame"]`` is ``False`` on those steps
  (``True`` where the true terminal frame was scored).

Modules:

| module | what |
|---|---|
| env_wrapper.py | :class:`VLMRewardWrapper` (one gymnasium env) |
| vec_env.py | :class:`VLMRewardVecEnv` (an SB3 VecEnv) |
| terminal.py | :class:`RenderTerminalFrame`, and the MuJoCo terminal states kept past a VecEnv's auto-reset |
| batch_frames.py | a vector wrapper's frames: the batch renderer, or the envs' own images |
| modes.py | ``mode``, ``weight`` and ``task``: their checks, the rewards combined, the mixin that holds them |
| normalisers.py | reward normalisers below a wrapper, found so that it can refuse them |
| scoring.py | calling the reward model: what it must be, and its rewards checked as float32 [N, T] |
| frame_checks.py | rendered frames and render sizes, and which envs the batch renderer draws as ``env.render()`` does |

:class:`vlmrm_fast.vector_wrapper.VLMRewardVectorWrapper` is built from the same parts.
"""

try:
    import gymnasium  # noqa: F401  every module here needs it: checked once, before any of them loads
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vlmrm_fast.wrappers needs gymnasium (and stable-baselines3 for VLMRewardVecEnv): "
        "pip install 'vlmrm-fast[train]'"
    ) from exc

from vlmrm_fast.wrappers.env_wrapper import VLMRewardWrapper
from vlmrm_fast.wrappers.modes import MODES
from vlmrm_fast.wrappers.terminal import RenderTerminalFrame
from vlmrm_fast.wrappers.vec_env import VLMRewardVecEnv

__all__ = ["VLMRewardWrapper", "VLMRewardVecEnv", "RenderTerminalFrame", "MODES"]
