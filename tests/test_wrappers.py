"""VLMRewardWrapper / VLMRewardVecEnv: rewards per mode, info keys, one batch per VecEnv step, terminal
frames under SB3's auto-reset, errors, the gymnasium and SB3 checkers, and a SAC smoke run.

Rendering is slow on CPU-only machines, so envs render small (64 x 64) frames for few steps.
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import re  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

gym = pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")
pytest.importorskip("mujoco")

from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv  # noqa: E402

from vlmrm_fast import CLIPReward, Task, VLMRewardVectorWrapper  # noqa: E402
from vlmrm_fast.env_render import make_own_context_current, render_env  # noqa: E402
from vlmrm_fast.wrappers import batch_frames  # noqa: E402  tests swap its batch renderer class
from vlmrm_fast.wrappers import RenderTerminalFrame, VLMRewardVecEnv, VLMRewardWrapper  # noqa: E402
from vlmrm_fast.wrappers.scoring import _rewards_of  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*random weights.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*is resized, which costs time.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*different from the unwrapped version.*"),
]

SIZE = 64
ENV_ID = "InvertedPendulum-v5"


def _tiny_reward(**kwargs) -> CLIPReward:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return CLIPReward.from_pretrained("vlmrm-tiny", None, alpha=0.5, device="cpu", backend="torch", **kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's batches are small: one intra-op thread avoids OpenMP stalls (hundreds of ms per
    call) when the few cores are shared with other processes (MuJoCo's renderer, parallel test runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rm() -> CLIPReward:
    return _tiny_reward(goal="a humanoid robot kneeling", baseline="a humanoid robot")


@pytest.fixture(scope="module")
def rm_tasks() -> CLIPReward:
    return _tiny_reward(tasks=[
        Task(goal="a humanoid robot kneeling", baseline="a humanoid robot", name="kneel"),
        Task(goal="a humanoid robot doing the splits", baseline="a humanoid robot", name="splits"),
    ])


def make_env(max_episode_steps=None, render_mode="rgb_array", size=SIZE) -> gym.Env:
    kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    return gym.make(ENV_ID, render_mode=render_mode, width=size, height=size, **kwargs)


def actions(n_steps: int, n_envs: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-3.0, 3.0, size=(n_steps, n_envs, 1)).astype(np.float32)


class Spy:
    """Delegates to a reward model and records the batch size of every call."""

    def __init__(self, rm):
        self.rm = rm
        self.batch_sizes = []

    def __call__(self, frames, bottom_up=False):  # named, so that bottom-up frames reach rm as they are
        self.batch_sizes.append(len(frames))
        return self.rm(frames, bottom_up=bottom_up)

    def __getattr__(self, name):
        return getattr(self.rm, name)


# Python 3.12+ warns at every fork of a process that runs threads (torch's here). The tests that fork do so
# on purpose: their envs are plain Python (no GL or torch work in the children), and forking keeps them quick.
forks_on_purpose = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")


class CountingEnv(gym.Env):
    """A non-MuJoCo env whose frame shows its step count (gray level 40 * t); episodes end at t = 3."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, render_mode="rgb_array", frame_fn=None):
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0.0, 10.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.frame_fn = frame_fn
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], dtype=np.float32), float(self.t), self.t >= 3, False, {}

    def render(self):
        frame = counting_frame(self.t)
        return frame if self.frame_fn is None else self.frame_fn(frame)


def counting_frame(t: int) -> np.ndarray:
    return np.full((32, 32, 3), 40 * t, dtype=np.uint8)


# ---- VLMRewardWrapper -----------------------------------------------------------------------------


MODES = ["replace", "add", "log"]


def test_single_env_modes(rm):
    """Each mode's reward against rm() on the reference env's frame (``mode`` switched between steps)."""
    env = VLMRewardWrapper(make_env(), rm, mode="add", weight=0.5)
    ref = make_env()
    env.reset(seed=0)
    ref.reset(seed=0)
    for step, action in enumerate(actions(4, 1)[:, 0]):
        env.mode = mode = MODES[step % 3]
        obs, reward, term, trunc, info = env.step(action)
        ref_obs, ref_reward, ref_term, ref_trunc, _ = ref.step(action)
        np.testing.assert_array_equal(obs, ref_obs)
        expected_vlm = float(rm(render_env(ref)[None])[0])
        assert info["vlm_reward"] == pytest.approx(expected_vlm, abs=1e-6)
        assert info["gt_reward"] == ref_reward
        expected = {"replace": expected_vlm, "add": ref_reward + 0.5 * expected_vlm, "log": ref_reward}[mode]
        assert reward == pytest.approx(expected, abs=1e-6)
        assert isinstance(reward, float)
        assert (term, trunc) == (ref_term, ref_trunc)
        if term or trunc:
            break
    with pytest.raises(ValueError, match="mode must be one of"):
        env.mode = "multiply"
    with pytest.raises(ValueError, match="finite"):
        env.weight = float("nan")
    env.close()
    ref.close()


def test_single_env_episode_returns_and_tasks(rm_tasks):
    env = VLMRewardWrapper(make_env(max_episode_steps=3), rm_tasks, task="splits")
    env.reset(seed=1)
    vlm, gt = [], []
    for action in actions(3, 1, seed=5)[:, 0]:
        _, reward, term, trunc, info = env.step(action)
        assert set(info["vlm_rewards"]) == {"kneel", "splits"}
        assert info["vlm_reward"] == info["vlm_rewards"]["splits"] == reward
        vlm.append(info["vlm_reward"])
        gt.append(info["gt_reward"])
        if term or trunc:
            break
    assert term or trunc
    assert info["episode_vlm_return"] == pytest.approx(sum(vlm))
    assert info["episode_gt_return"] == pytest.approx(sum(gt))
    with pytest.raises(ValueError, match="not one of the reward model's tasks"):
        VLMRewardWrapper(CountingEnv(), rm_tasks, task="lotus")
    with pytest.raises(ValueError, match="mode must be one of"):
        VLMRewardWrapper(CountingEnv(), rm_tasks, mode="multiply")
    with pytest.raises(ValueError, match="out of range"):
        VLMRewardWrapper(CountingEnv(), rm_tasks, task=2)


class Uncopyable(Spy):
    """A reward model that cannot be copied, as one holding an ONNX Runtime or TensorRT session."""

    def __deepcopy__(self, memo):
        raise TypeError("the reward model was copied")

    def __reduce_ex__(self, protocol):
        raise TypeError("the reward model was pickled")


def test_single_env_shares_the_reward_model(rm):
    """One model for all wrapped envs: never copied (gymnasium deep-copies recorded constructor
    arguments, e.g. for ``env.spec``), whatever the backend holds."""
    model = Uncopyable(rm)
    env = VLMRewardWrapper(make_env(), model, mode="add", weight=0.5)
    assert env.reward_model is model
    again = gym.make(env.spec)  # what gymnasium's checker does
    assert isinstance(again, VLMRewardWrapper) and again.reward_model is model and again.spec == env.spec
    assert (again.mode, again.weight) == ("add", 0.5)
    again.reset(seed=0)
    again.step(again.action_space.sample())
    assert model.batch_sizes == [1]


def test_single_env_needs_rgb_array(rm):
    with pytest.raises(ValueError, match=r'render_mode="rgb_array"'):
        VLMRewardWrapper(gym.make(ENV_ID), rm)


def test_single_env_bad_frames(rm):
    rgba = VLMRewardWrapper(CountingEnv(frame_fn=lambda f: np.concatenate([f, f[..., :1]], axis=-1)), rm)
    rgba.reset(seed=0)
    with pytest.raises(ValueError, match=r"uint8 RGB frame \[H, W, 3\]"):
        rgba.step(np.zeros(1, np.float32))
    floats = VLMRewardWrapper(CountingEnv(frame_fn=lambda f: f.astype(np.float32)), rm)
    floats.reset(seed=0)
    with pytest.raises(ValueError, match="uint8"):
        floats.step(np.zeros(1, np.float32))


def test_single_env_negative_strides(rm):
    # A frame that is a flipped view (negative strides on both axes) scores like its contiguous copy.
    env = VLMRewardWrapper(CountingEnv(frame_fn=lambda f: np.ascontiguousarray(f)[::-1, ::-1]), rm)
    env.reset(seed=0)
    _, reward, _, _, _ = env.step(np.zeros(1, np.float32))
    assert reward == pytest.approx(float(rm(counting_frame(1)[None])[0]), abs=1e-6)
    # gymnasium's MuJoCo renderer itself returns row-flipped views
    wrapped = VLMRewardWrapper(make_env(), rm)
    wrapped.reset(seed=0)
    frame = wrapped.render()
    _, reward, _, _, _ = wrapped.step(np.zeros(1, np.float32))
    expected = float(rm(np.ascontiguousarray(wrapped.render())[None])[0])
    assert reward == pytest.approx(expected, abs=1e-6)
    assert frame.dtype == np.uint8


def test_single_env_size_warning(rm):
    with pytest.warns(UserWarning, match=r"renders 64x64 frames \(height x width\) but the reward model's tower takes 224x224"):
        VLMRewardWrapper(make_env(), rm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VLMRewardWrapper(make_env(size=224), rm)  # no render at construction, no warning


def test_single_env_checkers(rm):
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    gym_check_env(VLMRewardWrapper(make_env(), rm, mode="add"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sb3_check_env(VLMRewardWrapper(make_env(), rm), warn=True, skip_render_check=True)


# ---- VLMRewardVecEnv ------------------------------------------------------------------------------


class FakeBatchRenderer:
    """Stands in for vlmrm_fast.render.BatchRenderer: renders each env's MjData, rows bottom-up (as GL)."""

    bottom_up = True
    device = torch.device("cpu")

    def __init__(self, envs):
        self.envs = envs
        self.closed = False

    @classmethod
    def from_envs(cls, envs, width=None, height=None):
        return cls(envs)

    def render(self):
        return torch.from_numpy(np.stack([np.ascontiguousarray(e.unwrapped.render()[::-1]) for e in self.envs]))

    def close(self):
        self.closed = True


class GLlessBatchRenderer(FakeBatchRenderer):
    """A batch renderer that builds but cannot render (its GL context is gone): the wrappers fall back."""

    def render(self):
        raise RuntimeError("no GL context")


@pytest.fixture
def fake_batch(monkeypatch):
    monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: FakeBatchRenderer)
    return FakeBatchRenderer


@pytest.fixture
def no_batch(monkeypatch):
    def missing():
        raise ImportError("no vlmrm_fast.render here")

    monkeypatch.setattr(batch_frames, "_import_batch_renderer", missing)


def run_against_reference(venv, wrapped, rm, n_envs, n_steps, seed, make, weight, modes=("replace",),
                          ref_renderer=None):
    """Step ``wrapped`` and n_envs plain reference envs with the same actions; check every reward.

    ``wrapped.mode`` cycles through ``modes``, one per step. The reference frames come from each
    reference env's ``render()``, or from ``ref_renderer(refs)()`` (frames [N, H, W, 3], top-down).
    """
    refs = [make() for _ in range(n_envs)]
    render_refs = ref_renderer(refs) if ref_renderer else (lambda: np.stack([r.render() for r in refs]))
    venv.seed(seed)
    obs = wrapped.reset()
    ref_obs = np.stack([r.reset(seed=seed + i)[0] for i, r in enumerate(refs)])
    np.testing.assert_array_equal(obs, ref_obs)
    episode = [[0.0, 0.0] for _ in range(n_envs)]
    ends = 0
    for step, action in enumerate(actions(n_steps, n_envs, seed)):
        wrapped.mode = mode = modes[step % len(modes)]
        obs, rewards, dones, infos = wrapped.step(action)
        assert rewards.dtype == np.float32 and rewards.shape == (n_envs,)
        steps = [r.step(a) for r, a in zip(refs, action)]
        frames = render_refs()  # the states this step reached, terminal or not
        gts = [st[1] for st in steps]
        ref_dones = [st[2] or st[3] for st in steps]
        ref_obs = [r.reset()[0] if done else st[0] for r, st, done in zip(refs, steps, ref_dones)]
        np.testing.assert_array_equal(dones, ref_dones)
        np.testing.assert_allclose(obs, np.stack(ref_obs), atol=1e-6)  # auto-reset state intact after the swap
        vlm = rm(frames).numpy()
        expected = {"replace": vlm, "add": np.array(gts) + weight * vlm, "log": np.array(gts)}[mode]
        np.testing.assert_allclose(rewards, expected, atol=1e-5)
        for i, info in enumerate(infos):
            assert info["gt_reward"] == pytest.approx(gts[i])
            assert info["vlm_reward"] == pytest.approx(float(vlm[i]), abs=1e-5)
            assert "terminal_frame" not in info
            episode[i][0] += info["vlm_reward"]
            episode[i][1] += info["gt_reward"]
            if dones[i]:
                ends += 1
                assert info["vlm_terminal_frame"] is True
                assert info["episode_vlm_return"] == pytest.approx(episode[i][0], abs=1e-4)
                assert info["episode_gt_return"] == pytest.approx(episode[i][1], abs=1e-4)
                episode[i] = [0.0, 0.0]
            else:
                assert "episode_vlm_return" not in info
    for r in refs:
        r.close()
    return ends


def test_vec_env_modes_one_batch(rm, no_batch):
    n_envs, n_steps = 2, 6
    venv = DummyVecEnv([make_env] * n_envs)
    spy = Spy(rm)
    wrapped = VLMRewardVecEnv(venv, spy, mode="add", weight=0.5)
    assert wrapped.render_source == "images"
    run_against_reference(venv, wrapped, rm, n_envs, n_steps, 0, make_env, 0.5, modes=MODES)
    assert spy.batch_sizes == [n_envs] * n_steps  # one reward-model call per step, all envs in it
    wrapped.close()


def real_batch_renderer_or_skip(envs):
    """The real BatchRenderer class, or skip the test where it is missing or cannot render."""
    try:
        from vlmrm_fast.render import BatchRenderer
    except ImportError as exc:
        pytest.skip(f"vlmrm_fast.render.BatchRenderer not available: {exc}")
    try:
        BatchRenderer.from_envs(envs, device="cpu").close()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"BatchRenderer cannot run here: {exc!r}")
    return BatchRenderer


def batch_reference(renderer_cls):
    """Reference frames from a BatchRenderer over the reference envs, built (like the wrapper's) before
    reset: its free-camera placement depends on when it is built, as gymnasium's own viewer's does."""

    def build(refs):
        renderer = renderer_cls.from_envs(refs, device="cpu")

        def render():
            frames = renderer.render().numpy()
            return frames[:, ::-1] if renderer.bottom_up else frames

        return render

    return build


@pytest.mark.parametrize("render", ["images", "fake-batch", "batch"])
def test_vec_env_terminal_frames_mujoco(rm, monkeypatch, render):
    """Episodes end (time limit 3, or the pole falls): the terminal step is scored on the terminal state,
    rendered in the same batch as the other envs, and the auto-reset state is intact afterwards.
    "fake-batch": a stand-in renderer giving bottom-up frames; "batch": vlmrm_fast.render.BatchRenderer."""
    n_envs = 2

    def make():
        return make_env(max_episode_steps=3)

    venv = DummyVecEnv([make] * n_envs)
    if render == "fake-batch":
        monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: FakeBatchRenderer)
    ref_renderer = None
    if render == "batch":
        ref_renderer = batch_reference(real_batch_renderer_or_skip(list(venv.envs)))
    spy = Spy(rm)
    wrapped = VLMRewardVecEnv(venv, spy, render=render.replace("fake-", ""))
    assert wrapped.render_source == render.replace("fake-", "")
    ends = run_against_reference(venv, wrapped, rm, n_envs, 7, 3, make, 1.0, ref_renderer=ref_renderer)
    assert ends >= 2 * n_envs
    assert spy.batch_sizes == [n_envs] * 7
    renderer = wrapped.renderer
    wrapped.close()
    if render == "fake-batch":
        assert renderer.closed


def _recoloured_pendulum(max_episode_steps=3):
    """InvertedPendulum with visual domain randomisation: every reset recolours its geoms, so the next
    episode's model draws the terminal state in other colours."""
    from gymnasium.envs.mujoco.inverted_pendulum_v5 import InvertedPendulumEnv

    class Recoloured(InvertedPendulumEnv):
        def reset_model(self):
            self.model.geom_rgba[:, :3] = self.np_random.uniform(0, 1, (self.model.ngeom, 3))
            return super().reset_model()

    return gym.wrappers.TimeLimit(Recoloured(render_mode="rgb_array", width=SIZE, height=SIZE), max_episode_steps)


def _relit_pendulum(max_episode_steps=3):
    """InvertedPendulum whose every reset switches its light and shadows on or off and changes the headlight."""
    from gymnasium.envs.mujoco.inverted_pendulum_v5 import InvertedPendulumEnv

    class Relit(InvertedPendulumEnv):
        def _initialize_simulation(self):  # gymnasium's scene with a light (it has none)
            import xml.etree.ElementTree as ET

            import mujoco

            root = ET.parse(self.fullpath).getroot()
            ET.SubElement(root.find("worldbody"), "light", pos="0 -1 4", dir="0 0.2 -1", castshadow="true")
            model = mujoco.MjModel.from_xml_string(ET.tostring(root, encoding="unicode"))
            model.vis.global_.offwidth, model.vis.global_.offheight = self.width, self.height
            return model, mujoco.MjData(model)

        def reset_model(self):
            model, rng = self.model, self.np_random
            model.light_active[:] = rng.integers(0, 2, model.nlight)
            model.light_castshadow[:] = rng.integers(0, 2, model.nlight)
            model.vis.headlight.active = int(rng.integers(0, 2))
            model.vis.headlight.ambient[:] = rng.uniform(0, 0.6, 3)
            return super().reset_model()

    return gym.wrappers.TimeLimit(Relit(render_mode="rgb_array", width=SIZE, height=SIZE), max_episode_steps)


@pytest.mark.parametrize("render", ["images", "batch"])
def test_vec_env_terminal_frames_keep_the_episodes_lights(rm, render):
    """As its colours, an episode's lights (on or off, shadows, the headlight) are its own in its terminal frame."""
    venv = DummyVecEnv([_relit_pendulum] * 2)
    assert venv.envs[0].unwrapped.model.nlight >= 1
    ref_renderer = batch_reference(real_batch_renderer_or_skip(list(venv.envs))) if render == "batch" else None
    wrapped = VLMRewardVecEnv(venv, rm, render=render)
    ends = run_against_reference(venv, wrapped, rm, 2, 7, 3, _relit_pendulum, 1.0, ref_renderer=ref_renderer)
    assert ends >= 4
    wrapped.close()


@pytest.mark.parametrize("render", ["images", "batch"])
def test_vec_env_terminal_frames_keep_the_episodes_colours(rm, render):
    """The terminal state is drawn with the model as it was when the episode ended, not as the auto-reset
    left it (the reference renders each terminal state before its reset)."""
    venv = DummyVecEnv([_recoloured_pendulum] * 2)
    ref_renderer = batch_reference(real_batch_renderer_or_skip(list(venv.envs))) if render == "batch" else None
    wrapped = VLMRewardVecEnv(venv, rm, render=render)
    ends = run_against_reference(venv, wrapped, rm, 2, 7, 3, _recoloured_pendulum, 1.0, ref_renderer=ref_renderer)
    assert ends >= 4
    wrapped.close()


def env_replacing_its_mjdata(max_episode_steps: int) -> gym.Env:
    """The humanoid, making a new MjData object at every reset (rather than resetting its own in place)."""
    import mujoco

    env = make_env(max_episode_steps=max_episode_steps)
    reset_model = env.unwrapped.reset_model

    def new_data_then_reset():
        env.unwrapped.data = mujoco.MjData(env.unwrapped.model)
        return reset_model()

    env.unwrapped.reset_model = new_data_then_reset
    return env


def test_vec_env_refuses_envs_that_replace_their_mujoco_data(rm, no_batch):
    """An env that makes a new MjData at reset would leave the terminal-state copy (and a BatchRenderer)
    on the old one: an error, at the first step after that reset, rather than stale frames."""
    make = lambda: env_replacing_its_mjdata(2)  # noqa: E731
    wrapped = VLMRewardVecEnv(DummyVecEnv([make]), rm)
    wrapped.reset()  # made a new MjData already, after the wrapper kept the old one
    with pytest.raises(RuntimeError, match="replaced its MjModel or MjData.*RenderTerminalFrame.*render='images'"):
        wrapped.step(np.zeros((1, 1), np.float32))
    wrapped.close()
    # The way out the error names: such envs inside RenderTerminalFrame, frames from env.render().
    wrapped = VLMRewardVecEnv(DummyVecEnv([lambda: RenderTerminalFrame(make())]), rm, render="images")
    wrapped.reset()
    for _ in range(2):
        _, rewards, dones, infos = wrapped.step(np.zeros((1, 1), np.float32))
    assert dones[0] and infos[0]["vlm_terminal_frame"] is True and np.isfinite(rewards).all()
    wrapped.close()


def test_terminal_states_of_envs_sharing_one_model_leave_its_fields_alone(rm, no_batch):
    """Envs built on one MjModel object: one env's terminal colours swapped into it would redraw the
    others in the same batch, so only their MjData is swapped."""
    envs = [_recoloured_pendulum(), _recoloured_pendulum(), _recoloured_pendulum()]
    envs[1].unwrapped.model = envs[0].unwrapped.model
    wrapped = VLMRewardVecEnv(DummyVecEnv([lambda e=e: e for e in envs]), rm)
    fields = [state._fields for state in wrapped._terminal_states]
    assert fields[0] == [] and fields[1] == [] and "geom_rgba" in fields[2]
    wrapped.close()


def test_wrapping_keeps_the_envs_specs(rm, no_batch):
    """The envs of a wrapped DummyVecEnv can still be re-made from their spec (gym.make(spec))."""
    venv = DummyVecEnv([lambda: make_env(max_episode_steps=3)])
    wrapped = VLMRewardVecEnv(venv, rm)
    spec = venv.envs[0].spec
    assert [w.name for w in spec.additional_wrappers] == []
    gym.make(spec).close()
    wrapped.close()


def test_vec_env_terminal_frames_other_envs(rm_tasks, no_batch):
    """Non-MuJoCo envs in a DummyVecEnv: RenderTerminalFrame is applied; several tasks reported by name."""
    venv = DummyVecEnv([CountingEnv] * 2)
    wrapped = VLMRewardVecEnv(venv, rm_tasks, task=1)
    wrapped.reset()
    all_expected = rm_tasks(np.stack([counting_frame(t) for t in (1, 2, 3)])).numpy()
    for t in (1, 2, 3, 1):
        _, rewards, dones, infos = wrapped.step(np.zeros((2, 1), np.float32))
        expected = all_expected[t - 1]
        np.testing.assert_allclose(rewards, [expected[1]] * 2, atol=1e-5)
        for info in infos:
            assert info["vlm_rewards"]["kneel"] == pytest.approx(float(expected[0]), abs=1e-5)
            assert info["vlm_rewards"]["splits"] == pytest.approx(float(expected[1]), abs=1e-5)
        assert dones.tolist() == [t == 3] * 2
        if t == 3:
            assert all(info["vlm_terminal_frame"] for info in infos)
            assert infos[0]["episode_gt_return"] == pytest.approx(6.0)
            assert infos[0]["episode_vlm_return"] == pytest.approx(float(all_expected[:, 1].sum()), abs=1e-4)
            assert "terminal_frame" not in infos[0]
    wrapped.close()


def test_vec_env_through_vec_wrappers(rm):
    """A DummyVecEnv under other VecEnv wrappers (VecMonitor) is still found: terminal frames, no warning."""
    from stable_baselines3.common.vec_env import VecMonitor

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = VLMRewardVecEnv(VecMonitor(DummyVecEnv([CountingEnv])), rm)
    wrapped.reset()
    for _ in range(3):
        _, rewards, dones, infos = wrapped.step(np.zeros((1, 1), np.float32))
    assert dones[0] and infos[0]["vlm_terminal_frame"]
    np.testing.assert_allclose(rewards, rm(counting_frame(3)[None]).numpy(), atol=1e-5)
    assert "episode" in infos[0]  # VecMonitor's own episode info is kept
    wrapped.close()


def _normalised_below():
    """Ways a reward normaliser ends up below a VLM reward wrapper: (wrapper class, the env it wraps, the
    normaliser's class name)."""
    from stable_baselines3.common.vec_env import VecMonitor, VecNormalize

    return [
        (VLMRewardVecEnv, VecMonitor(VecNormalize(DummyVecEnv([CountingEnv]))), "VecNormalize"),
        (VLMRewardVecEnv, DummyVecEnv([lambda: gym.wrappers.NormalizeReward(CountingEnv())]), "NormalizeReward"),
        (VLMRewardWrapper, gym.wrappers.RecordEpisodeStatistics(gym.wrappers.NormalizeReward(CountingEnv())),
         "NormalizeReward"),
        (VLMRewardVectorWrapper, gym.wrappers.vector.NormalizeReward(gym.vector.SyncVectorEnv([CountingEnv])),
         "NormalizeReward"),
        (VLMRewardVectorWrapper, gym.vector.SyncVectorEnv([lambda: gym.wrappers.NormalizeReward(CountingEnv())]),
         "NormalizeReward"),
    ]


def test_a_reward_normaliser_below_the_wrapper_is_refused_but_in_log_mode(rm, no_batch):
    # It would rescale the env's reward and never the VLM reward: in "add" the agent's reward would mix the two.
    for wrapper, env, normaliser in _normalised_below():
        for mode in ("replace", "add"):
            with pytest.raises(ValueError, match=rf"{normaliser} is below {wrapper.__name__}: .*mode='{mode}'.*"
                                                 rf"Put the normaliser above, {normaliser}\({wrapper.__name__}"):
                wrapper(env, rm, mode=mode)
        logged = wrapper(env, rm, mode="log")  # the agent gets the env's reward: normalising it is the user's choice
        with pytest.raises(ValueError, match=f"{normaliser} is below"):
            logged.mode = "add"
        assert logged.mode == "log"
        logged.close()


def test_normalisers_above_the_wrapper_and_without_norm_reward_are_fine(rm, no_batch):
    from stable_baselines3.common.vec_env import VecNormalize

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VecNormalize(VLMRewardVecEnv(DummyVecEnv([CountingEnv]), rm)).close()
        VLMRewardVecEnv(VecNormalize(DummyVecEnv([CountingEnv]), norm_reward=False), rm).close()  # observations only
        gym.wrappers.NormalizeReward(VLMRewardWrapper(CountingEnv(), rm)).close()


@forks_on_purpose
def test_vec_env_subproc(rm):
    """SubprocVecEnv: without RenderTerminalFrame a warning; with it the terminal frame is scored."""
    expected = rm(np.stack([counting_frame(t) for t in (0, 3)])).numpy()  # next episode's first frame, terminal
    with pytest.warns(UserWarning, match="RenderTerminalFrame"):
        plain = VLMRewardVecEnv(SubprocVecEnv([CountingEnv] * 2, start_method="fork"), rm)
    framed = VLMRewardVecEnv(
        SubprocVecEnv([lambda: RenderTerminalFrame(CountingEnv())] * 2, start_method="fork"), rm)
    try:
        for wrapped, (reward, terminal) in ((plain, (expected[0], False)), (framed, (expected[1], True))):
            wrapped.reset()
            for _ in range(3):
                _, rewards, dones, infos = wrapped.step(np.zeros((2, 1), np.float32))
            assert dones.all()
            np.testing.assert_allclose(rewards, [reward] * 2, atol=1e-5)
            assert [info["vlm_terminal_frame"] for info in infos] == [terminal] * 2
    finally:
        plain.close()
        framed.close()


def _pendulum_with_vlm_reward(rm: CLIPReward) -> gym.Env:
    return VLMRewardWrapper(make_env(), rm, mode="add")


def test_subprocess_envs_started_by_forkserver_render_after_this_process_did(rm):
    """README: workers forked after this process rendered through Mesa hang at their first frame; under
    context="forkserver" they start clean, and each scores its own frames with its copy of the model."""
    here = make_env()
    here.reset(seed=3)
    assert here.render().shape == (SIZE, SIZE, 3)  # this process has rendered through Mesa (EGL) by now
    here.close()
    remote = gym.vector.AsyncVectorEnv([lambda: _pendulum_with_vlm_reward(rm)], context="forkserver")
    try:
        remote.reset(seed=3)
        for action in actions(2, 1, seed=1):
            _, rewards, _, _, infos = remote.step(action)
            expected = rm(np.stack(remote.render())).numpy()  # the workers' frames, scored here
            np.testing.assert_allclose(infos["vlm_reward"], expected, atol=1e-5)
            assert np.isfinite(rewards).all()
    finally:
        remote.close()


@pytest.mark.parametrize("not_a_model", [None, "ViT-B-32"])
def test_wrappers_refuse_what_is_not_a_reward_model(not_a_model):
    # Not at the first step: at the wrapper, naming what it takes.
    with pytest.raises(TypeError, match=r"VLMRewardWrapper needs a reward model: a CLIPReward .*; got"):
        VLMRewardWrapper(make_env(), not_a_model)
    with pytest.raises(TypeError, match=r"VLMRewardVecEnv needs a reward model"):
        VLMRewardVecEnv(DummyVecEnv([make_env]), not_a_model)


def position_weighted_brightness(frames):
    """A plain reward function (no ``bottom_up=``, numpy out): the mean brightness weighted by row, column
    and channel, so frames handed over upside down, mirrored or with their channels swapped score
    differently (a weight by row alone is blind to a mirror: a flip of both axes went unseen)."""
    frames = np.stack([np.asarray(f) for f in frames]).astype(np.float64)
    height, width = frames.shape[1:3]
    weight = (np.arange(1, height + 1)[:, None, None] / height * (1 + np.arange(1, width + 1)[None, :, None] / width)
              * np.array([1.0, 2.0, 3.0]))
    return (frames * weight).mean(axis=(1, 2, 3))


class PositionWeightedModule(torch.nn.Module):
    """The same reward as a torch module: its ``__call__`` takes ``**kwargs``, its ``forward`` no ``bottom_up``."""

    def forward(self, frames):
        return torch.from_numpy(position_weighted_brightness(frames))


def position_weighted_ignoring_kwargs(frames, **kwargs):
    """A reward function that takes any keyword and ignores it: ``bottom_up=True`` must not reach it."""
    return position_weighted_brightness(frames)


REWARD_CALLABLES = {"function": position_weighted_brightness, "module": PositionWeightedModule(),
                    "kwargs": position_weighted_ignoring_kwargs}


@pytest.mark.parametrize("model", list(REWARD_CALLABLES))
@pytest.mark.parametrize("render", ["single", "images", "fake-batch"])
def test_a_plain_reward_function_gets_top_down_frames_and_may_return_numpy(render, model, monkeypatch):
    """The wrappers take any callable rm(frames) -> rewards, as their docs say: bottom-up frames from
    the batch renderer are flipped for one without a ``bottom_up`` parameter, and arrays are rewards too."""
    if render == "fake-batch":
        monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: FakeBatchRenderer)
    reward = REWARD_CALLABLES[model]
    n = 1 if render == "single" else 2
    if render == "single":
        wrapped = VLMRewardWrapper(make_env(), reward)
        wrapped.reset(seed=5)
    else:
        venv = DummyVecEnv([make_env] * n)
        wrapped = VLMRewardVecEnv(venv, reward, render="images" if render == "images" else "batch")
        venv.seed(5)
        wrapped.reset()
    ref = make_env()
    ref.reset(seed=5)
    for action in actions(3, n, seed=1):
        if render == "single":
            _, reward_value, *_ = wrapped.step(action[0])
            rewards = [reward_value]
        else:
            _, rewards, *_ = wrapped.step(action)
        ref.step(action[0])
        expected, flipped = position_weighted_brightness([render_env(ref), render_env(ref)[::-1]])
        assert abs(expected - flipped) > 0.1  # the frame is not symmetric: a flipped one would fail below
        np.testing.assert_allclose(rewards[0], expected, rtol=1e-5, atol=1e-5)
    wrapped.close()


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_bottom_up_frames_reach_a_plain_reward_function_flipped_by_rows_only(as_tensor):
    # The env frames above are near mirror-symmetric (a pendulum in the middle): a flip of both axes, or a
    # channel swap, would pass there. Random frames tell them apart.
    top_down = np.random.default_rng(7).integers(0, 256, (3, 9, 11, 3), dtype=np.uint8)
    bottom_up = np.ascontiguousarray(top_down[:, ::-1])
    if as_tensor:
        bottom_up = torch.from_numpy(bottom_up)
    want = position_weighted_brightness(top_down)
    for wrong in (bottom_up, top_down[:, :, ::-1], top_down[..., ::-1]):  # unflipped; mirrored; channels swapped
        assert np.abs(position_weighted_brightness(np.asarray(wrong)) - want).min() > 0.1
    got = _rewards_of(position_weighted_brightness, bottom_up, bottom_up=True)
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-6)


def _close_another_env_whose_context_is_current(victim) -> None:
    """An evaluation env closed: its GL context was current, and closing it leaves none; gymnasium's envs
    then render black frames unless theirs is made current."""
    other = make_env()
    other.reset(seed=0)
    assert other.render().any()
    other.close()
    assert not victim.render().any()  # gymnasium's own render() now gives a black frame


def _drop_another_env_unclosed(victim) -> None:
    """A MuJoCo env collected without close() while ``victim``'s context is current: its MjrContext is
    freed there, deleting ``victim``'s framebuffer (the same GL ids): black frames until it is rebuilt."""
    import gc

    other = make_env()
    other.reset(seed=0)
    assert other.render().any()
    assert render_env(victim).any()  # current: the victim's
    del other
    gc.collect()
    make_own_context_current(victim)
    from vlmrm_fast.render.gl_context import mujoco_major_version

    if mujoco_major_version() < 4 and victim.render().any():
        # MuJoCo 3.5 to 3.17 (the whole-suite runs at the training floors) leave the victim's framebuffer whole.
        pytest.skip(f"MuJoCo {mujoco_major_version()}: an env dropped unclosed leaves the others' frames whole")
    assert not victim.render().any()  # even in its own context


def test_in_process_envs_are_found_under_wrappers_that_leave_rendering_to_them():
    from stable_baselines3.common.vec_env import VecEnvWrapper, VecNormalize

    from vlmrm_fast.env_render import in_process_envs

    class OwnImages(VecEnvWrapper):  # may change the frames: its get_images must be called
        def reset(self):
            return self.venv.reset()

        def step_wait(self):
            return self.venv.step_wait()

        def get_images(self):
            return [frame[::-1] for frame in self.venv.get_images()]

    venv = DummyVecEnv([make_env] * 2)
    assert in_process_envs(venv) == venv.envs and in_process_envs(VecNormalize(venv)) == venv.envs
    assert in_process_envs(OwnImages(venv)) is None
    patched = DummyVecEnv([make_env])
    patched.get_images = lambda: []  # replaced on the object: it decides the frames
    assert in_process_envs(patched) is None
    assert in_process_envs(object()) is None  # a VecEnv of its own (subprocess envs render where they live)
    venv.close()


@pytest.mark.parametrize("wrapper", ["single", "vec-images", "vector-images"])
@pytest.mark.parametrize("mishap", [_close_another_env_whose_context_is_current, _drop_another_env_unclosed],
                         ids=["closed", "dropped"])
def test_frames_stay_the_envs_own_after_another_mujoco_env_is_closed_or_dropped(wrapper, mishap, no_batch):
    # Either made gymnasium's env.render() return black frames, and so a reward of black frames.
    from gymnasium.vector import SyncVectorEnv

    from vlmrm_fast import VLMRewardVectorWrapper

    n = 1 if wrapper == "single" else 2
    if wrapper == "single":
        wrapped = VLMRewardWrapper(make_env(), position_weighted_brightness)
        wrapped.reset(seed=5)
    elif wrapper == "vec-images":
        venv = DummyVecEnv([make_env] * n)
        wrapped = VLMRewardVecEnv(venv, position_weighted_brightness, render="images")
        venv.seed(5)
        wrapped.reset()
    else:
        wrapped = VLMRewardVectorWrapper(SyncVectorEnv([make_env] * n), position_weighted_brightness, render="images")
        wrapped.reset(seed=5)
    ref = make_env()
    ref.reset(seed=5)
    for step, action in enumerate(actions(2, n, seed=1)):
        if step == 1:
            mishap(wrapped.env if wrapper == "single" else (venv.envs[0] if wrapper == "vec-images"
                                                            else wrapped.env.envs[0]))
        out = wrapped.step(action[0] if wrapper == "single" else action)
        reward = out[1] if wrapper == "single" else out[1][0]
        ref.step(action[0])
        expected = position_weighted_brightness([render_env(ref)])[0]
        assert expected > 1.0  # not a black frame
        np.testing.assert_allclose(reward, expected, rtol=1e-5)
    wrapped.close()
    ref.close()


def test_a_reward_function_returning_the_wrong_number_of_rewards_is_a_clear_error(no_batch):
    venv = VLMRewardVecEnv(DummyVecEnv([make_env] * 2), lambda frames: np.zeros(len(frames) + 1))
    venv.reset()
    with pytest.raises(ValueError, match=r"returned rewards of shape \(3,\) for 2 frames; it must return \[2\]"):
        venv.step(actions(1, 2)[0])
    venv.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_reward_function_returning_nan_is_a_clear_error(no_batch, bad):
    """A NaN reward would silently poison SAC's replay buffer: the wrappers refuse it and name the frame."""
    def nan_on_second(frames):
        rewards = np.zeros(len(frames), np.float32)
        rewards[1] = bad
        return rewards

    venv = VLMRewardVecEnv(DummyVecEnv([make_env] * 3), nan_on_second)
    venv.reset()
    with pytest.raises(ValueError, match=r"NaN/inf rewards for 1 of 3 frames \(rows 1\).*return finite values"):
        venv.step(actions(1, 3)[0])
    venv.close()
    single = VLMRewardWrapper(make_env(), lambda frames: torch.full((len(frames), 2), bad))
    single.reset(seed=0)
    with pytest.raises(ValueError, match=r"NaN/inf rewards for 1 of 1 frames \(rows 0\)"):
        single.step(single.action_space.sample())
    single.close()


def test_rewards_beyond_float32_are_named_not_passed_on_as_inf(no_batch):
    # SB3 holds float32 rewards: weight=1e39 gave -inf rewards, 1e39 from the model read "NaN/inf".
    with pytest.raises(ValueError, match=r"weight must be a finite number within float32's range"):
        VLMRewardVecEnv(DummyVecEnv([make_env]), mean_brightness, mode="add", weight=1e39)
    venv = VLMRewardVecEnv(DummyVecEnv([make_env] * 2), lambda frames: np.full(len(frames), 1e37), mode="add",
                           weight=1e3)
    venv.reset()
    with pytest.raises(ValueError, match=r"in mode='add' the env reward \+ weight \* VLM reward \(weight=1000\) is "
                                         r"beyond float32's range"):
        venv.step(actions(1, 2)[0])
    venv.close()
    single = VLMRewardWrapper(make_env(), lambda frames: np.full(len(frames), 1e39))
    single.reset(seed=0)
    with pytest.raises(ValueError, match=r"returned rewards beyond float32's range \(up to 1e\+39\)"):
        single.step(single.action_space.sample())
    single.close()


class _SquareTower:
    def __init__(self, image_size):
        self.image_size = image_size

    def __call__(self, frames):
        return np.zeros(len(frames), np.float32)


def test_a_reward_callable_may_give_its_image_size_as_one_int(no_batch):
    # An int crashed every wrapper ('int' object is not iterable); something unreadable is named at construction.
    with pytest.warns(UserWarning, match=r"renders 64x64 frames \(height x width\) but the reward model's tower takes 32x32"):
        VLMRewardWrapper(make_env(), _SquareTower(32)).close()
    for same in (np.int64(SIZE), (float(SIZE), float(SIZE))):  # the render size, as a numpy int or whole floats
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            VLMRewardWrapper(make_env(), _SquareTower(same)).close()
        assert not [w for w in caught if "resized" in str(w.message)], same
    for bad in ("224", (224,), (0, 224), 2.5):
        with pytest.raises(ValueError, match=r"image_size is .*: give an int \(square\) or \(height, width\)"):
            VLMRewardVecEnv(DummyVecEnv([make_env]), _SquareTower(bad))


def test_a_plain_callable_with_several_columns_keys_them_by_index_and_task_is_checked_against_them(no_batch):
    # Without task_names, info["vlm_rewards"] was {} and an out-of-range task= an IndexError at the first step.
    def two_columns(frames):
        return np.stack([np.full(len(frames), 1.0), np.full(len(frames), 2.0)], axis=1).astype(np.float32)

    single = VLMRewardWrapper(make_env(), two_columns, task=1)
    single.reset(seed=0)
    info = single.step(single.action_space.sample())[-1]
    assert info["vlm_reward"] == 2.0 and info["vlm_rewards"] == {"0": 1.0, "1": 2.0}
    single.close()
    venv = VLMRewardVecEnv(DummyVecEnv([make_env] * 2), two_columns, task=-2)
    venv.reset()
    infos = venv.step(actions(1, 2)[0])[-1]
    assert [i["vlm_reward"] for i in infos] == [1.0, 1.0] and infos[1]["vlm_rewards"] == {"0": 1.0, "1": 2.0}
    venv.close()
    from vlmrm_fast import VLMRewardVectorWrapper

    vector = VLMRewardVectorWrapper(gym.vector.SyncVectorEnv([make_env] * 2), two_columns, render="images")
    vector.reset(seed=0)
    info = vector.step(actions(1, 2)[0])[-1]
    np.testing.assert_array_equal(info["vlm_rewards"]["1"], [2.0, 2.0])
    assert list(info["vlm_rewards"]) == ["0", "_0", "1", "_1"]
    vector.close()
    for wrapped in (VLMRewardWrapper(make_env(), two_columns, task=2), VLMRewardVecEnv(DummyVecEnv([make_env]), two_columns, task=2)):
        wrapped.reset()
        with pytest.raises(ValueError, match=r"task=2, but the reward model returns 2 reward\(s\) per frame: pass a task "
                                             r"index from 0 to 1"):
            wrapped.step(wrapped.action_space.sample() if isinstance(wrapped, gym.Env) else actions(1, 1)[0])
        wrapped.close()


def test_env_wrapper_given_a_vector_env_names_the_vector_wrappers(rm):
    # gymnasium's own check said only "Expected env to be a `gymnasium.Env`", not which wrapper takes vector envs.
    with pytest.raises(TypeError, match=r"VLMRewardWrapper wraps one gymnasium env, not DummyVecEnv: .*VLMRewardVecEnv"):
        VLMRewardWrapper(DummyVecEnv([make_env]), rm)
    envs = gym.vector.SyncVectorEnv([make_env])
    with pytest.raises(TypeError, match=r"not SyncVectorEnv: .*VLMRewardVectorWrapper"):
        VLMRewardWrapper(envs, rm)
    envs.close()
    with pytest.raises(TypeError, match=r"not str: .*gymnasium.make\(env_id, render_mode=\"rgb_array\"\)"):
        VLMRewardWrapper(ENV_ID, rm)
    with pytest.raises(TypeError, match=r"not function: pass a gymnasium.Env .*call an env factory first"):
        VLMRewardWrapper(make_env, rm)  # the factory, not its env


def test_vec_env_errors(rm, no_batch):
    with pytest.raises(ValueError, match=r'render_mode="rgb_array"'):
        VLMRewardVecEnv(DummyVecEnv([lambda: gym.make(ENV_ID)]), rm)
    with pytest.raises(ValueError, match="render must be one of"):
        VLMRewardVecEnv(DummyVecEnv([make_env]), rm, render="gpu")
    with pytest.raises(TypeError, match=r"not TimeLimit: vectorise the env first, DummyVecEnv.*VLMRewardWrapper"):
        VLMRewardVecEnv(gym.make(ENV_ID, render_mode="rgb_array"), rm)  # a gymnasium env, not a VecEnv
    with pytest.raises(TypeError, match=r"not SyncVectorEnv: a gymnasium vector env: wrap it with .*VectorWrapper"):
        VLMRewardVecEnv(gym.vector.SyncVectorEnv([make_env]), rm)
    with pytest.raises(ValueError, match="DummyVecEnv of MuJoCo envs"):
        VLMRewardVecEnv(DummyVecEnv([CountingEnv]), rm, render="batch")
    with pytest.raises(ImportError):
        VLMRewardVecEnv(DummyVecEnv([make_env]), rm, render="batch")  # renderer missing: no silent fallback
    bad = VLMRewardVecEnv(DummyVecEnv([lambda: CountingEnv(frame_fn=lambda f: f[..., 0])]), rm)
    bad.reset()
    with pytest.raises(ValueError, match=r"uint8 RGB frame \[H, W, 3\]"):
        bad.step(np.zeros((1, 1), np.float32))


def test_vec_env_auto_fallbacks(rm, monkeypatch):
    monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: GLlessBatchRenderer)
    wrapped = VLMRewardVecEnv(DummyVecEnv([make_env] * 2), rm)
    assert wrapped.render_source == "batch"
    renderer = wrapped.renderer
    wrapped.reset()
    with pytest.warns(UserWarning, match="falls back|get_images"):
        _, rewards, _, _ = wrapped.step(np.zeros((2, 1), np.float32))
    assert wrapped.render_source == "images" and np.isfinite(rewards).all()
    assert renderer.closed and wrapped.renderer is None  # the failed renderer is closed, not just dropped
    wrapped.close()

    class Unbuildable(FakeBatchRenderer):
        @classmethod
        def from_envs(cls, envs, width=None, height=None):
            raise RuntimeError("EGL device not found")

    monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: Unbuildable)
    with pytest.warns(UserWarning, match="could not be built"):
        wrapped = VLMRewardVecEnv(DummyVecEnv([make_env]), rm)
    assert wrapped.render_source == "images"
    wrapped.close()


def test_sac_learns_through_vec_env(rm):
    """SAC through VLMRewardVecEnv with render="auto" (the BatchRenderer where it runs, else get_images)."""
    from stable_baselines3 import SAC

    venv = VLMRewardVecEnv(DummyVecEnv([lambda: make_env(max_episode_steps=10)] * 2), rm)
    model = SAC("MlpPolicy", venv, learning_starts=10, batch_size=16, buffer_size=200, seed=0, device="cpu",
                policy_kwargs={"net_arch": [16, 16]})
    from vlmrm_fast.render import rendering_unavailable_reason

    assert venv.render_source == ("batch" if rendering_unavailable_reason() is None else "images")
    from stable_baselines3.common.logger import Logger

    model.set_logger(Logger(None, []))  # SB3's default logger leaves an empty /tmp/SB3-<date> folder per run
    model.learn(total_timesteps=50)
    buffer = model.replay_buffer
    stored = buffer.rewards[: buffer.pos]
    assert stored.size >= 40 and np.isfinite(stored).all()
    # the env's own reward is 1.0 per step; the stored rewards are the CLIP rewards
    assert not np.allclose(stored, 1.0)
    assert model.num_timesteps >= 50
    venv.close()


def test_set_attr_reaches_the_envs_the_wrapper_wraps_in_place(rm, no_batch):
    # SB3's set_attr sets an attribute on each env's outermost object; the wrappers VLMRewardVecEnv puts
    # around a DummyVecEnv's envs (terminal-state copies, RenderTerminalFrame) pass it on to the env,
    # where it went before.
    from gymnasium.envs.mujoco.inverted_pendulum_v5 import InvertedPendulumEnv

    venv = DummyVecEnv([lambda: InvertedPendulumEnv(render_mode="rgb_array", width=SIZE, height=SIZE)])
    wrapped = VLMRewardVecEnv(venv, rm)
    assert type(venv.envs[0]).__name__ == "_MujocoTerminalState"
    wrapped.set_attr("_reset_noise_scale", 0.0)
    assert venv.envs[0].unwrapped._reset_noise_scale == 0.0
    assert wrapped.get_attr("_reset_noise_scale") == [0.0]
    wrapped.reset()
    wrapped.step(np.zeros((1, 1), np.float32))  # the wrapper's own state still works
    assert "pending" not in venv.envs[0].unwrapped.__dict__
    wrapped.close()
    counting = DummyVecEnv([CountingEnv])
    wrapped = VLMRewardVecEnv(counting, rm)
    assert isinstance(counting.envs[0], RenderTerminalFrame) and counting.envs[0] is not counting.envs[0].unwrapped
    wrapped.set_attr("speed", 7)
    assert counting.envs[0].unwrapped.speed == 7
    wrapped.close()


def test_episode_sums_end_on_truncation_and_restart_on_reset(rm):
    # CountingEnv's reward is its step count t, and its episodes end at t = 3 (found by a mutation audit).
    env = VLMRewardWrapper(gym.wrappers.TimeLimit(CountingEnv(), 2), rm)
    env.reset(seed=0)
    env.step(np.zeros(1, np.float32))
    *_, truncated, info = env.step(np.zeros(1, np.float32))
    assert truncated and info["episode_gt_return"] == 3.0  # 1 + 2, reported on a truncation too
    env = VLMRewardWrapper(CountingEnv(), rm)
    env.reset(seed=0)
    env.step(np.zeros(1, np.float32))
    env.reset(seed=0)  # mid-episode: the step before is not part of the next episode
    for _ in range(3):
        *_, info = env.step(np.zeros(1, np.float32))
    assert info["episode_gt_return"] == 6.0
    venv = VLMRewardVecEnv(DummyVecEnv([CountingEnv]), rm)
    venv.reset()
    venv.step(np.zeros((1, 1), np.float32))
    venv.reset()
    for _ in range(3):
        _, _, dones, infos = venv.step(np.zeros((1, 1), np.float32))
    assert dones[0] and infos[0]["episode_gt_return"] == 6.0
    venv.close()


# ---- behaviours a mutation audit found untested ---------------------------------------------------


def mean_brightness(frames):
    """A plain reward function: each frame's mean gray level (numpy [N])."""
    return np.stack([np.asarray(f) for f in frames]).astype(np.float64).mean(axis=(1, 2, 3))


def test_single_env_negative_task_index_counts_from_the_end(rm_tasks):
    env = VLMRewardWrapper(CountingEnv(), rm_tasks, task=-1)
    assert env.task == 1
    env.reset(seed=0)
    _, reward, *_, info = env.step(np.zeros(1, np.float32))
    assert reward == info["vlm_rewards"]["splits"]
    with pytest.raises(ValueError, match="out of range"):
        VLMRewardWrapper(CountingEnv(), rm_tasks, task=-3)


class NamedTasks:
    """A reward callable with tasks, as a CLIPReward with ``tasks=``: column j is 1000 (j + 1) plus the
    frame's mean gray level, so a reward says which column it came from."""

    def __init__(self, names):
        self.task_names = list(names)

    def set_tasks(self, names):
        self.task_names = list(names)

    def __call__(self, frames):
        base = mean_brightness(frames)
        return np.stack([base + 1000 * (j + 1) for j in range(len(self.task_names))], axis=1)


def test_every_wrapper_follows_the_reward_models_tasks_after_set_tasks():
    # The wrapper drives its reward with the task it was given by name; set_tasks (new prompts, same
    # model) moves that name to another column and adds one: the reward and the per-task info follow.
    rm = NamedTasks(["A", "B"])
    single = VLMRewardWrapper(CountingEnv(), rm, task="B")
    vec = VLMRewardVecEnv(DummyVecEnv([CountingEnv]), rm, task="B", render="images")
    single.reset(seed=0)
    vec.reset()
    _, reward, *_, info = single.step(np.zeros(1, np.float32))
    assert reward == 2000 + 40 and info["vlm_rewards"] == {"A": 1040, "B": 2040}
    rm.set_tasks(["C", "D", "B"])
    _, reward, *_, info = single.step(np.zeros(1, np.float32))
    assert single.task == 2 and reward == 3000 + 80 and info["vlm_rewards"] == {"C": 1080, "D": 2080, "B": 3080}
    vec.step_async(np.zeros((1, 1), np.float32))
    _, rewards, _, infos = vec.step_wait()
    assert rewards[0] == 3000 + 40 and infos[0]["vlm_rewards"] == {"C": 1040, "D": 2040, "B": 3040}
    rm.set_tasks(["C"])  # the wrapper's task is gone: an error naming it, not another task's reward
    with pytest.raises(ValueError, match="'B' is not one of the reward model's tasks"):
        single.step(np.zeros(1, np.float32))
    vec.close()


def test_wrappers_refuse_a_reward_model_whose_tasks_share_a_name():
    # task= and info["vlm_rewards"] go by name: with two tasks named alike the reward came from the first
    # and info held the second's under that name. A reward model alone may have them (rm(frames) is [N, T]).
    match = r"several of the reward model's tasks are named 'A'.*give each Task its own name="
    with pytest.raises(ValueError, match=match):
        VLMRewardWrapper(CountingEnv(), NamedTasks(["A", "B", "A"]))
    with pytest.raises(ValueError, match=match):
        VLMRewardVecEnv(DummyVecEnv([CountingEnv]), NamedTasks(["A", "A"]), render="images")
    rm = NamedTasks(["A", "B"])
    single = VLMRewardWrapper(CountingEnv(), rm, task=1)
    single.reset(seed=0)
    rm.set_tasks(["A", "A"])  # after the wrapper was made: said at the next step
    with pytest.raises(ValueError, match=match):
        single.step(np.zeros(1, np.float32))


def test_single_env_gives_reward_functions_frames_torch_can_take():
    # gymnasium's MuJoCo envs render flipped views (negative strides), which torch.as_tensor refuses:
    # a reward function of the user's own gets a plain array.
    env = VLMRewardWrapper(CountingEnv(frame_fn=lambda f: f[::-1]), lambda frames: torch.as_tensor(frames).float().mean((1, 2, 3)))
    env.reset(seed=0)
    _, reward, *_ = env.step(np.zeros(1, np.float32))
    assert reward == 40


def test_single_env_frames_that_are_not_arrays_are_named():
    for frame_fn, error, message in (
        (lambda f: None, ValueError, r'returned None instead of an RGB frame: create the env with render_mode="rgb_a'),
        (lambda f: f.tolist(), TypeError, r"must return a uint8 \[H, W, 3\] numpy array or torch tensor; got list"),
        (lambda f: torch.from_numpy(f).float(), ValueError, r"uint8 RGB frame \[H, W, 3\].*torch.float32"),
    ):
        env = VLMRewardWrapper(CountingEnv(frame_fn=frame_fn), mean_brightness)
        env.reset(seed=0)
        with pytest.raises(error, match=message):
            env.step(np.zeros(1, np.float32))
    env = VLMRewardWrapper(CountingEnv(frame_fn=torch.from_numpy), mean_brightness)  # a uint8 tensor is a frame
    env.reset(seed=0)
    assert env.step(np.zeros(1, np.float32))[1] == 40.0


def test_single_env_size_warning_names_height_then_width_and_comes_once(rm):
    with pytest.warns(UserWarning, match="renders 48x96 frames.*width=224, height=224") as record:
        env = VLMRewardWrapper(gym.make(ENV_ID, render_mode="rgb_array", width=96, height=48), rm)
    env.reset(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said at construction: not again at the first frame
        env.step(np.zeros(1, np.float32))
    env.close()
    assert len(record) == 1


def test_vec_env_size_warning_comes_once(rm, no_batch):
    wrapped = VLMRewardVecEnv(DummyVecEnv([CountingEnv]), rm)
    wrapped.reset()
    with pytest.warns(UserWarning, match="renders 32x32 frames"):
        wrapped.step(np.zeros((1, 1), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once, not at every step
        wrapped.step(np.zeros((1, 1), np.float32))
    wrapped.close()


def test_low_precision_tensor_rewards_are_read_as_float32():
    """A half-precision model may return bfloat16 rewards (numpy has no such dtype)."""
    env = VLMRewardWrapper(CountingEnv(), lambda frames: torch.full((len(frames),), 0.5, dtype=torch.bfloat16))
    env.reset(seed=0)
    assert env.step(np.zeros(1, np.float32))[1] == 0.5


def test_a_reward_function_returning_a_scalar_is_a_clear_error():
    env = VLMRewardWrapper(CountingEnv(), lambda frames: np.float32(1.0))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"returned rewards of shape \(\) for 1 frames"):
        env.step(np.zeros(1, np.float32))


@pytest.mark.parametrize("returned,match", [
    (None, r"returned None for 1 frames \(a missing `return`\?\)"),
    (["bad"], r"returned list rewards that are not numbers \(could not convert string to float"),
    (np.array([object()]), r"returned ndarray rewards that are not numbers"),
    (np.array([1 + 2j]), r"returned complex rewards; it must return real ones"),  # numpy would drop the 2j, warning only
    (torch.tensor([1 + 2j]), r"returned complex rewards"),
])
def test_a_reward_function_returning_no_numbers_is_named(returned, match):
    env = VLMRewardWrapper(CountingEnv(), lambda frames: returned)
    env.reset(seed=0)
    with pytest.raises(TypeError, match=match):
        env.step(np.zeros(1, np.float32))


def test_nan_in_one_task_names_its_row(no_batch):
    def nan_in_second_task_of_row_2(frames):
        rewards = np.zeros((len(frames), 2), np.float32)
        rewards[2, 1] = np.nan
        return rewards

    venv = VLMRewardVecEnv(DummyVecEnv([CountingEnv] * 3), nan_in_second_task_of_row_2)
    venv.reset()
    with pytest.raises(ValueError, match=r"NaN/inf rewards for 1 of 3 frames \(rows 2\)"):
        venv.step(np.zeros((3, 1), np.float32))
    venv.close()


def test_a_weight_the_mode_does_not_use_is_named():
    with pytest.warns(UserWarning, match=r"weight=2 is unused in mode='log'.*mode='add' only"):
        VLMRewardWrapper(CountingEnv(), mean_brightness, mode="log", weight=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VLMRewardWrapper(CountingEnv(), mean_brightness, mode="add", weight=2.0)
        VLMRewardWrapper(CountingEnv(), mean_brightness, mode="replace")


def test_the_wrappers_warnings_name_the_users_line():
    """Guards the ``stacklevel`` of the wrappers' own warnings: the unused-weight warning (raised two calls
    below the user's constructor call) and the resize warning (three below the user's ``step``) point at the
    line that made or stepped the wrapper, not at vlmrm_fast's code or past the script (``sys:1``)."""
    from gymnasium.vector import SyncVectorEnv

    from vlmrm_fast import VLMRewardVectorWrapper

    with pytest.warns(UserWarning, match=r"weight=2 is unused") as caught:
        VLMRewardWrapper(CountingEnv(), mean_brightness, mode="log", weight=2.0)
    assert [w.filename for w in caught] == [__file__]
    with pytest.warns(UserWarning, match=r"weight=2 is unused") as caught:
        VLMRewardVectorWrapper(SyncVectorEnv([CountingEnv] * 2), mean_brightness, mode="log", weight=2.0)
    assert [w.filename for w in caught] == [__file__]

    class TowerOf16:  # a reward model whose tower takes 16 x 16 frames: CountingEnv's 32 x 32 are resized
        image_size = 16

        def __call__(self, frames):
            return mean_brightness(frames)

    env = VLMRewardWrapper(CountingEnv(), TowerOf16())
    env.reset(seed=0)
    with pytest.warns(UserWarning, match=r"renders 32x32 frames \(height x width\) but the reward model's tower takes 16x16") as caught:
        env.step(np.zeros(1, np.float32))
    assert [w.filename for w in caught] == [__file__]
    # Under VLMRewardVecEnv the warning is raised in step_wait, called by stable-baselines3's VecEnv.step:
    # it named that line of SB3's, not the user's.
    venv = VLMRewardVecEnv(DummyVecEnv([CountingEnv]), TowerOf16(), render="images")
    venv.reset()
    with pytest.warns(UserWarning, match=r"renders 32x32 frames \(height x width\)") as caught:
        venv.step(np.zeros((1, 1), np.float32))
    assert [w.filename for w in caught] == [__file__]


def test_weight_is_stored_as_a_float():
    env = VLMRewardWrapper(CountingEnv(), mean_brightness, mode="add")
    env.weight = np.float32(0.25)
    assert type(env.weight) is float and env.weight == 0.25
    with pytest.raises(ValueError, match="finite"):
        env.weight = float("inf")


def test_one_task_models_add_no_per_task_rewards(rm, no_batch):
    env = VLMRewardWrapper(CountingEnv(), rm)
    env.reset(seed=0)
    assert "vlm_rewards" not in env.step(np.zeros(1, np.float32))[-1]
    venv = VLMRewardVecEnv(DummyVecEnv([CountingEnv]), rm)
    venv.reset()
    assert "vlm_rewards" not in venv.step(np.zeros((1, 1), np.float32))[-1][0]
    venv.close()


def test_single_env_episode_vlm_sums_restart(rm):
    """Each episode's VLM return is its own: after an episode end, and after a reset mid-episode."""
    per_step = [float(r) for r in rm(np.stack([counting_frame(t) for t in (1, 2, 3)])).numpy()]
    env = VLMRewardWrapper(CountingEnv(), rm)
    env.reset(seed=0)
    env.step(np.zeros(1, np.float32))
    env.reset(seed=0)
    for _ in range(2):  # two whole episodes (CountingEnv ends at t = 3)
        for _ in range(3):
            *_, terminated, _, info = env.step(np.zeros(1, np.float32))
        assert terminated
        assert info["episode_vlm_return"] == pytest.approx(sum(per_step), abs=1e-5)
        assert info["episode_gt_return"] == 6.0
        env.reset(seed=0)

    class SelfRestarting(CountingEnv):
        """Starts its next episode by itself, without a reset (as an env under an auto-resetting wrapper)."""

        def step(self, action):
            self.t = 0 if self.t >= 3 else self.t
            return super().step(action)

    env = VLMRewardWrapper(SelfRestarting(), rm)
    env.reset(seed=0)
    for _ in range(2):
        for _ in range(3):
            *_, terminated, _, info = env.step(np.zeros(1, np.float32))
        assert terminated
        assert info["episode_vlm_return"] == pytest.approx(sum(per_step), abs=1e-5)
        assert info["episode_gt_return"] == 6.0


def test_render_terminal_frame_on_truncation_and_as_a_copy():
    """The frame comes on a truncation too, and is the env's frame as it was then, even for an env that
    renders into one buffer it reuses."""
    class OneBuffer(CountingEnv):
        buffer = np.zeros((32, 32, 3), np.uint8)

        def render(self):
            self.buffer[:] = 40 * self.t
            return self.buffer

    env = RenderTerminalFrame(gym.wrappers.TimeLimit(OneBuffer(), 2))
    env.reset(seed=0)
    assert "terminal_frame" not in env.step(np.zeros(1, np.float32))[-1]
    *_, terminated, truncated, info = env.step(np.zeros(1, np.float32))
    assert truncated and not terminated
    env.reset(seed=0)
    env.render()
    np.testing.assert_array_equal(info["terminal_frame"], counting_frame(2))
    with pytest.raises(ValueError, match=r'RenderTerminalFrame renders frames.*render_mode="rgb_array"'):
        RenderTerminalFrame(CountingEnv(render_mode=None))


def test_vec_env_terminal_frames_of_mujoco_envs_in_render_terminal_frame_with_the_batch_renderer(rm, fake_batch):
    """MuJoCo envs the user wrapped in RenderTerminalFrame, frames from the batch renderer: the terminal
    state is still swapped in (the renderer reads MjData, not the frame in info, which is dropped)."""
    def make():
        return RenderTerminalFrame(make_env(max_episode_steps=3))

    venv = DummyVecEnv([make] * 2)
    wrapped = VLMRewardVecEnv(venv, rm, render="batch")
    assert run_against_reference(venv, wrapped, rm, 2, 4, 3, make, 1.0) >= 2
    wrapped.close()


def test_batch_renderer_is_built_on_the_reward_models_device(monkeypatch):
    built = {}

    class OnDevice(FakeBatchRenderer):
        @classmethod
        def from_envs(cls, envs, device=None):
            built["device"] = device
            return cls(envs)

    class Model:
        device = torch.device("meta")

        def __call__(self, frames):
            return mean_brightness(frames)

    monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: OnDevice)
    VLMRewardVecEnv(DummyVecEnv([make_env]), Model(), render="batch").close()
    assert built["device"] == torch.device("meta")


def test_vec_env_refuses_a_renderer_giving_too_few_frames(monkeypatch):
    class OneShort(FakeBatchRenderer):
        def render(self):
            return super().render()[1:]

    monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: OneShort)
    wrapped = VLMRewardVecEnv(DummyVecEnv([make_env] * 2), mean_brightness, render="batch")
    wrapped.reset()
    with pytest.raises(ValueError, match=r"render\(\) must return uint8 \[2, H, W, 3\]"):
        wrapped.step(np.zeros((2, 1), np.float32))
    wrapped.close()


def test_vec_env_refuses_envs_of_different_render_sizes(no_batch):
    def small():
        return CountingEnv(frame_fn=lambda f: f[:16])

    for factories in ([CountingEnv, small], [CountingEnv, small, small]):
        wrapped = VLMRewardVecEnv(DummyVecEnv(factories), mean_brightness)
        wrapped.reset()
        with pytest.raises(ValueError, match=r"frames of different sizes \[\(16, 32\), \(32, 32\)\]"):
            wrapped.step(np.zeros((len(factories), 1), np.float32))
        wrapped.close()


def test_vec_env_batch_rendering_needs_all_envs_mujoco(fake_batch):
    with pytest.raises(ValueError, match="DummyVecEnv of MuJoCo envs"):
        VLMRewardVecEnv(DummyVecEnv([make_env, CountingEnv]), mean_brightness, render="batch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = VLMRewardVecEnv(DummyVecEnv([make_env, CountingEnv]), mean_brightness)
    assert wrapped.render_source == "images"
    wrapped.close()


@forks_on_purpose
def test_vec_env_warns_when_some_subprocess_envs_lack_render_terminal_frame(rm):
    with pytest.warns(UserWarning, match="RenderTerminalFrame"):
        wrapped = VLMRewardVecEnv(SubprocVecEnv([CountingEnv, lambda: RenderTerminalFrame(CountingEnv())],
                                                start_method="fork"), rm)
    try:
        assert not wrapped.terminal_frames
        wrapped.reset()
        for _ in range(3):
            _, _, dones, infos = wrapped.step(np.zeros((2, 1), np.float32))
        assert dones.all() and [info["vlm_terminal_frame"] for info in infos] == [False, True]
    finally:
        wrapped.close()


class Opaque:
    """A reward callable whose signature cannot be read (as some C extensions'): it gets top-down frames
    and no ``bottom_up=``."""

    __signature__ = "unreadable"

    def __call__(self, frames):
        return position_weighted_brightness(frames)


def test_a_reward_callable_without_a_signature_gets_top_down_frames(fake_batch):
    venv = DummyVecEnv([make_env])
    wrapped = VLMRewardVecEnv(venv, Opaque(), render="batch")
    venv.seed(5)
    wrapped.reset()
    ref = make_env()
    ref.reset(seed=5)
    _, rewards, _, _ = wrapped.step(np.zeros((1, 1), np.float32))
    ref.step(np.zeros(1, np.float32))
    np.testing.assert_allclose(rewards[0], position_weighted_brightness([render_env(ref)]), rtol=1e-5, atol=1e-5)
    wrapped.close()


def test_the_lowest_negative_task_index_is_the_first_task_and_a_bad_task_is_refused_when_set():
    # -T counts from the end to task 0, as a list index does (found by a mutation audit: only -1 and -T-1 were tried).
    for wrapped in (VLMRewardWrapper(CountingEnv(), NamedTasks(["A", "B"]), task=-2),
                    VLMRewardVecEnv(DummyVecEnv([CountingEnv]), NamedTasks(["A", "B"]), task=-2, render="images")):
        assert wrapped.task == 0
        wrapped.task = -1
        assert wrapped.task == 1
        with pytest.raises(ValueError, match="not one of the reward model's tasks"):
            wrapped.task = "C"  # refused when set, not at the next step
        assert wrapped.task == 1
        wrapped.close()


def test_a_reward_function_returning_three_dimensional_rewards_is_a_clear_error():
    # [N, T] is the most a reward model returns: [N, T, 1] is refused, not flattened into more "tasks".
    env = VLMRewardWrapper(CountingEnv(), lambda frames: np.zeros((len(frames), 2, 1), np.float32))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"returned rewards of shape \(1, 2, 1\) for 1 frames"):
        env.step(np.zeros(1, np.float32))


def test_render_terminal_frame_copies_a_torch_frame():
    """The terminal frame of an env that renders torch tensors into one buffer it reuses is the frame as it
    was when the episode ended, as for numpy frames (found by a mutation audit)."""
    class OneTensorBuffer(CountingEnv):
        buffer = torch.zeros((32, 32, 3), dtype=torch.uint8)

        def render(self):
            self.buffer.fill_(40 * self.t)
            return self.buffer

    env = RenderTerminalFrame(OneTensorBuffer())
    env.reset(seed=0)
    for _ in range(3):
        *_, terminated, _, info = env.step(np.zeros(1, np.float32))
    assert terminated
    env.reset(seed=0)
    env.render()  # the buffer now holds the next episode's first frame
    np.testing.assert_array_equal(info["terminal_frame"].numpy(), counting_frame(3))


def test_batch_rendering_refuses_mujoco_envs_of_different_render_sizes(fake_batch):
    """render="batch": MuJoCo envs rendering at different sizes are refused when the wrapper is built, naming
    the fix; render="auto" takes the images instead, without a warning (found by a mutation audit)."""
    makes = [make_env, lambda: make_env(size=SIZE + 8)]
    with pytest.raises(ValueError, match=r"render at different sizes \[\(64, 64\), \(72, 72\)\].*same width= and height="):
        VLMRewardVecEnv(DummyVecEnv(makes), mean_brightness, render="batch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = VLMRewardVecEnv(DummyVecEnv(makes), mean_brightness)
    assert wrapped.render_source == "images"
    wrapped.close()


def test_auto_rendering_without_the_batch_renderer_is_silent(no_batch):
    # The optional renderer missing is not worth a warning: render="auto" takes the images (mutation audit).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = VLMRewardVecEnv(DummyVecEnv([make_env]), mean_brightness)
    assert wrapped.render_source == "images"
    wrapped.close()


def test_a_reward_model_taking_bottom_up_gets_the_renderers_frames_as_they_are(rm, fake_batch):
    """The batch renderer's bottom-up frames go to a model with a ``bottom_up`` parameter (CLIPReward flips
    them inside its fused preprocessing) unflipped, with ``bottom_up=True``: no extra flip of every frame
    on the way (found by a mutation audit: the rewards alone cannot tell the two apart)."""
    calls = []

    class RecordsRowOrder(Spy):
        def __call__(self, frames, bottom_up=False):
            calls.append((bottom_up, frames.clone()))
            return super().__call__(frames, bottom_up=bottom_up)

    wrapped = VLMRewardVecEnv(DummyVecEnv([make_env] * 2), RecordsRowOrder(rm), render="batch")
    wrapped.reset()
    wrapped.step(np.zeros((2, 1), np.float32))
    assert len(calls) == 1 and calls[0][0] is True
    torch.testing.assert_close(calls[0][1], wrapped.renderer.render())  # the renderer's frames, rows as drawn
    wrapped.close()


class _Cropped(gym.Wrapper):
    """A user's wrapper whose render() changes the frames (the top rows cut away)."""

    def render(self):
        frame = self.env.render()
        return np.ascontiguousarray(frame[SIZE // 4:])


def test_envs_whose_wrappers_change_their_frames_are_rendered_through_them(rm):
    # The batch renderer draws each env's MuJoCo state, past its wrappers' render(): under "auto" their frames
    # come from env.render(), as the reward's own; "batch" is refused, naming them. gymnasium's checks
    # (OrderEnforcing, PassiveEnvChecker, from gym.make) leave the frames as they are.
    from vlmrm_fast.wrappers.frame_checks import _frame_changing_wrappers

    assert _frame_changing_wrappers([make_env()]) == []
    frames = _scored_through_env_render(rm, lambda: _Cropped(make_env()), "_Cropped")
    assert frames[0].shape == (SIZE - SIZE // 4, SIZE, 3)


def _scored_through_env_render(rm, make, name):
    """``render="batch"`` refused and ``"auto"`` warning, both naming ``name``, for envs from ``make``; the
    rewards of a step under "auto" are those of the envs' own ``env.render()`` frames, which are returned."""
    with pytest.raises(ValueError, match=rf"past the render\(\) of \['{name}'\].*render=\"images\""):
        VLMRewardVecEnv(DummyVecEnv([make]), rm, render="batch")
    own_render = rf"\['{name}'\] \(the envs' wrappers, or the envs\) have a render\(\) of their own"
    with pytest.warns(UserWarning, match=own_render) as caught:
        wrapped = VLMRewardVecEnv(DummyVecEnv([make] * 2), rm)
    # the warning names the line that built the wrapper (here), not vlmrm_fast's constructor
    assert {w.filename for w in caught if "render() of their own" in str(w.message)} == {__file__}
    assert wrapped.render_source == "images"
    wrapped.reset()
    _, rewards, _, _ = wrapped.step(np.zeros((2, 1), np.float32))
    frames = [env.render() for env in wrapped.venv.envs]
    assert torch.allclose(torch.as_tensor(rewards), rm(frames).cpu(), atol=1e-6)
    wrapped.close()
    return frames


class _OwnMujocoEnv(gym.Env):
    """A user's MuJoCo env written without gymnasium's MujocoEnv: an MjModel and MjData of its own, and a
    render() with its own camera (the model's free camera) and size (48 x 80), no ``mujoco_renderer``."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self):
        import os

        import mujoco
        from gymnasium.envs import mujoco as gym_mujoco

        self.model = mujoco.MjModel.from_xml_path(
            os.path.join(os.path.dirname(gym_mujoco.__file__), "assets", "inverted_pendulum.xml"))
        self.data = mujoco.MjData(self.model)
        self.render_mode = "rgb_array"
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float64)
        self.action_space = gym.spaces.Box(-3.0, 3.0, (1,), np.float32)
        self._renderer = None

    def _obs(self):
        return np.concatenate([self.data.qpos, self.data.qvel])

    def reset(self, *, seed=None, options=None):
        import mujoco

        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[:] = self.np_random.uniform(-0.1, 0.1, self.model.nq)
        mujoco.mj_forward(self.model, self.data)
        return self._obs(), {}

    def step(self, action):
        import mujoco

        self.data.ctrl[:] = action
        mujoco.mj_step(self.model, self.data, 5)
        return self._obs(), 1.0, False, False, {}

    def render(self):
        import mujoco

        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, 48, 80)
        self._renderer.update_scene(self.data)
        return self._renderer.render()

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def _overlaid_pendulum():
    """gymnasium's own MuJoCo env, subclassed with a render() that draws on its frames."""
    from gymnasium.envs.mujoco.inverted_pendulum_v5 import InvertedPendulumEnv

    class OverlaidPendulum(InvertedPendulumEnv):
        def render(self):
            frame = super().render().copy()
            frame[:8] = 255  # a user's overlay: a white band on top
            return frame

    return gym.wrappers.TimeLimit(OverlaidPendulum(render_mode="rgb_array", width=SIZE, height=SIZE), 1000)


@pytest.mark.parametrize("make, name", [(_OwnMujocoEnv, "_OwnMujocoEnv"), (_overlaid_pendulum, "OverlaidPendulum")])
def test_mujoco_envs_with_a_render_of_their_own_are_rendered_through_it(rm, make, name):
    # The batch renderer draws an env's MjData as gymnasium's MujocoEnv.render() would (its mujoco_renderer's
    # camera, size and scene options). A MuJoCo env of one's own, or a MujocoEnv subclass with its own
    # render(), has other frames: "auto" scores its env.render(), with a warning, and "batch" is refused,
    # naming it, as for wrappers that change the frames (found by a drop-in user's audit: both were drawn by
    # the batch renderer, with the free camera at 224 x 224 for the first, and scored without a word).
    from vlmrm_fast.wrappers.frame_checks import _frame_changing_wrappers

    assert _frame_changing_wrappers([make()]) == [name]
    frames = _scored_through_env_render(rm, make, name)
    if name == "OverlaidPendulum":
        assert (frames[0][:8] == 255).all()
    else:
        assert frames[0].shape == (48, 80, 3)
    # This package's humanoid words render()'s errors its own way and draws as MujocoEnv does: batch-rendered.
    assert _frame_changing_wrappers([gym.make("vlmrm_fast/TexturedHumanoid-v0", render_mode="rgb_array")]) == []


class _GridEnv(gym.Env):
    """A grid world whose ``width`` and ``height`` count cells (8 x 8), rendering 64 x 64 frames."""

    metadata = {"render_modes": ["rgb_array"]}
    width = height = 8

    def __init__(self):
        self.render_mode = "rgb_array"
        self.observation_space = gym.spaces.Discrete(64)
        self.action_space = gym.spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return 0, {}

    def step(self, action):
        return 0, 0.0, False, False, {}

    def render(self):
        return np.full((64, 64, 3), 128, np.uint8)


def test_the_render_size_is_taken_from_width_and_height_of_mujoco_envs_only(rm):
    # Other envs may call other things width and height (a grid's cells): their size is the first frame's,
    # or the wrapper would warn of 8 x 8 frames (and never of the 64 x 64 ones it resizes).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = VLMRewardWrapper(_GridEnv(), rm)
    env.reset()
    with pytest.warns(UserWarning, match=r"The env renders 64x64 frames \(height x width\) but the reward model's tower takes 224x224"):
        env.step(0)
    with pytest.warns(UserWarning, match=rf"The env renders {SIZE}x{SIZE} frames"):  # MuJoCo's: known at once
        VLMRewardWrapper(make_env(), rm)


def test_weight_and_task_of_the_wrong_kind_are_refused_naming_them(rm):
    for weight in (None, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match=rf"weight must be a finite number .*; got {re.escape(repr(weight))}\."):
            VLMRewardWrapper(make_env(), rm, mode="add", weight=weight)
    assert VLMRewardWrapper(make_env(), rm, mode="add", weight=np.float32(0.5)).weight == 0.5
    for task in (None, 0.7, True):  # 0.7 was task 0, silently
        with pytest.raises(TypeError, match=rf"task must be a task's name \(str\) or its index \(int\).*; got {task!r}\."):
            VLMRewardWrapper(make_env(), rm, task=task)
    assert VLMRewardWrapper(make_env(), rm, task=np.int64(0)).task == 0


def test_the_wrappers_nan_message_lists_ten_rows_without_an_ellipsis(no_batch):
    def nan_on_ten(frames):
        rewards = np.zeros(len(frames), np.float32)
        rewards[:10] = np.nan
        return rewards

    venv = VLMRewardVecEnv(DummyVecEnv([make_env] * 11), nan_on_ten)
    venv.reset()
    with pytest.raises(ValueError, match=r"for 10 of 11 frames \(rows 0, 1, 2, 3, 4, 5, 6, 7, 8, 9\);") as error:
        venv.step(actions(1, 11)[0])
    assert "..." not in str(error.value)
    venv.close()


class _MisnamedColumns:
    """A reward callable naming one task while returning two columns."""

    task_names = ["a"]

    def __call__(self, frames):
        return np.stack([np.full(len(frames), 1.0), np.full(len(frames), 2.0)], axis=1).astype(np.float32)


def test_rewards_keyed_by_index_where_the_names_do_not_match_the_columns(no_batch):
    # zip() of one name and two columns would drop the second column from info["vlm_rewards"].
    single = VLMRewardWrapper(make_env(), _MisnamedColumns())
    single.reset(seed=0)
    info = single.step(single.action_space.sample())[-1]
    assert info["vlm_rewards"] == {"0": 1.0, "1": 2.0}
    single.close()


def test_an_env_rendering_float_rgb_is_told_to_give_uint8_not_a_render_mode(no_batch):
    # Its render_mode is already rgb_array: the message said to use it.
    env = VLMRewardWrapper(CountingEnv(frame_fn=lambda frame: frame.astype(np.float32) / 255), mean_brightness)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"got shape \(32, 32, 3\) and dtype float32\. Give the wrapper uint8 frames") as error:
        env.step(np.zeros(1, np.float32))
    assert "render_mode" not in str(error.value)
    grey = VLMRewardWrapper(CountingEnv(frame_fn=lambda frame: frame[..., 0]), mean_brightness)
    grey.reset(seed=0)
    with pytest.raises(ValueError, match=r"Use render_mode=\"rgb_array\""):  # not RGB at all: the render mode
        grey.step(np.zeros(1, np.float32))


@pytest.mark.parametrize("frame_fn, fix", [
    (lambda frame: np.concatenate([frame, frame[..., :1]], axis=-1), r"looks like RGBA: .* returns frame\[\.\.\., :3\]\."),
    (lambda frame: np.concatenate([frame, frame[..., :1]], axis=-1) / 255.0,
     r"looks like RGBA: .* returns frame\[\.\.\., :3\], scaled to uint8 \(0-255\)\."),
    (lambda frame: np.ascontiguousarray(frame[:, :20].transpose(2, 0, 1)),
     r"looks channels-first \[C, H, W\]: .* returns frame\.transpose\(1, 2, 0\)\[\.\.\., :3\]\."),
    (lambda frame: torch.from_numpy(frame[:, :20]).permute(2, 0, 1), r"returns frame\.permute\(1, 2, 0\)\[\.\.\., :3\]\."),
], ids=["rgba", "rgba-float", "chw", "chw-tensor"])
def test_an_rgb_array_env_rendering_rgba_or_channels_first_is_told_how_to_convert_not_a_render_mode(frame_fn, fix, no_batch):
    # Both wrappers said 'Use render_mode="rgb_array"' to an env made so already.
    single = VLMRewardWrapper(CountingEnv(frame_fn=frame_fn), mean_brightness)
    single.reset(seed=0)
    with pytest.raises(ValueError, match=r"must return a uint8 RGB frame \[H, W, 3\]; got shape .*" + fix) as error:
        single.step(np.zeros(1, np.float32))
    assert "render_mode" not in str(error.value)
    vec = VLMRewardVecEnv(DummyVecEnv([lambda: CountingEnv(frame_fn=frame_fn)]), mean_brightness, render="images")
    vec.reset()
    with pytest.raises(ValueError, match=fix) as error:
        vec.step(np.zeros((1, 1), np.float32))
    assert "render_mode" not in str(error.value)


class _RewardOf(CountingEnv):
    def __init__(self, reward):
        super().__init__()
        self.reward = reward

    def step(self, action):
        obs, _, terminated, truncated, info = super().step(action)
        return obs, self.reward, terminated, truncated, info


@pytest.mark.parametrize("reward", [None, "1.0x", [1.0, 2.0]])
def test_an_env_reward_that_is_no_number_is_named(no_batch, reward):
    env = VLMRewardWrapper(_RewardOf(reward), mean_brightness, mode="add")
    env.reset(seed=0)
    with pytest.raises(TypeError, match=r"the env's step\(\) returned the reward .* gymnasium's API asks for one number"):
        env.step(np.zeros(1, np.float32))


def inverted_counting_env():
    """CountingEnv rendering its frames inverted (gray level 255 - 40 * t): another env's frames."""
    return CountingEnv(frame_fn=lambda frame: 255 - frame)


def brightness_and_darkness(frames):
    """A plain two-column reward function: each frame's mean gray level, and 255 minus it."""
    brightness = mean_brightness(frames)
    return np.stack([brightness, 255 - brightness], axis=1)


def test_each_envs_per_task_rewards_are_its_own(no_batch):
    """``info["vlm_rewards"]`` of each env holds its own frame's rewards, in VLMRewardVecEnv and
    VLMRewardVectorWrapper (mutation audit: every env's info getting env 0's went unseen, the envs' frames
    being alike). Env 1 renders inverted frames: at step t env 0 scores (40 t, 255 - 40 t), env 1 the reverse."""
    venv = VLMRewardVecEnv(DummyVecEnv([CountingEnv, inverted_counting_env]), brightness_and_darkness, task=1)
    vector = VLMRewardVectorWrapper(gym.vector.SyncVectorEnv([CountingEnv, inverted_counting_env]),
                                    brightness_and_darkness, task=1, render="images")
    venv.reset()
    vector.reset(seed=0)
    for t in (1, 2):
        _, rewards, _, infos = venv.step(np.zeros((2, 1), np.float32))
        dark = 255.0 - 40 * t
        assert rewards.tolist() == [dark, 40.0 * t]
        assert [info["vlm_rewards"] for info in infos] == [{"0": 40.0 * t, "1": dark}, {"0": dark, "1": 40.0 * t}]
        _, rewards, _, _, info = vector.step(np.zeros((2, 1), np.float32))
        assert rewards.tolist() == [dark, 40.0 * t]
        assert info["vlm_rewards"]["0"].tolist() == [40.0 * t, dark]
        assert info["vlm_rewards"]["1"].tolist() == [dark, 40.0 * t]
    venv.close()
    vector.close()


def test_fractional_env_rewards_reach_the_rewards_infos_and_returns_whole(no_batch):
    """Env rewards with a fraction (CountingEnv's t + 0.25) are added, reported and summed as they are by
    every wrapper, in mode="add" (mutation audit: env rewards cast to whole numbers went unseen, the
    tests' envs giving whole rewards). Frames score 40 t (mean brightness), weighted 0.5."""
    def make():
        return gym.wrappers.TransformReward(CountingEnv(), lambda reward: reward + 0.25)

    single = VLMRewardWrapper(make(), mean_brightness, mode="add", weight=0.5)
    venv = VLMRewardVecEnv(DummyVecEnv([make] * 2), mean_brightness, mode="add", weight=0.5)
    vector = VLMRewardVectorWrapper(gym.vector.SyncVectorEnv([make] * 2), mean_brightness, mode="add", weight=0.5,
                                    render="images")
    single.reset(seed=0)
    venv.reset()
    vector.reset(seed=0)
    for t in (1, 2, 3):
        gt, want = t + 0.25, t + 0.25 + 20.0 * t
        reward, _, _, info = single.step(np.zeros(1, np.float32))[1:]
        assert (reward, info["gt_reward"]) == (want, gt)
        rewards, _, infos = venv.step(np.zeros((2, 1), np.float32))[1:]
        assert rewards.tolist() == [want] * 2 and [i["gt_reward"] for i in infos] == [gt] * 2
        rewards, _, _, vector_info = vector.step(np.zeros((2, 1), np.float32))[1:]
        assert rewards.tolist() == [want] * 2 and vector_info["gt_reward"].tolist() == [gt] * 2
    assert info["episode_gt_return"] == 6.75
    assert [i["episode_gt_return"] for i in infos] == [6.75] * 2
    assert vector_info["episode_gt_return"].tolist() == [6.75] * 2
    for wrapped in (single, venv, vector):
        wrapped.close()


def test_episode_vlm_returns_restart_on_a_reset_mid_episode(no_batch):
    """A reset before the episode ended: the next episode's ``episode_vlm_return`` sums its own steps only, in
    every wrapper (mutation audit: VLMRewardVecEnv.reset keeping the VLM sums went unseen, only the env
    rewards' being checked). CountingEnv's frames score 40 t (mean brightness): 40 + 80 + 120 per episode."""
    single = VLMRewardWrapper(CountingEnv(), mean_brightness)
    venv = VLMRewardVecEnv(DummyVecEnv([CountingEnv] * 2), mean_brightness)
    vector = VLMRewardVectorWrapper(gym.vector.SyncVectorEnv([CountingEnv] * 2), mean_brightness, render="images")
    for reset in (lambda: single.reset(seed=0), venv.reset, lambda: vector.reset(seed=0)):
        reset()
    single.step(np.zeros(1, np.float32))
    venv.step(np.zeros((2, 1), np.float32))
    vector.step(np.zeros((2, 1), np.float32))
    single.reset(seed=1)  # mid-episode: the step before is not part of the next episode
    venv.reset()
    vector.reset(seed=1)
    for _ in range(3):
        info = single.step(np.zeros(1, np.float32))[-1]
        infos = venv.step(np.zeros((2, 1), np.float32))[-1]
        vector_info = vector.step(np.zeros((2, 1), np.float32))[-1]
    assert info["episode_vlm_return"] == 240.0
    assert [i["episode_vlm_return"] for i in infos] == [240.0] * 2
    assert vector_info["episode_vlm_return"].tolist() == [240.0] * 2
    for wrapped in (single, venv, vector):
        wrapped.close()
