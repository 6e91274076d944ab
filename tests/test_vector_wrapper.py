"""VLMRewardVectorWrapper (gymnasium vector envs): rewards against one VLMRewardWrapper per env under each
auto-reset mode and frame source, one batch per step, terminal frames, info layout, errors.

The reference for every reward is :class:`VLMRewardWrapper` on a plain env stepped with the same actions
(itself checked against ``rm`` on the env's own frame in test_wrappers.py). The vector wrapper scores the
same frames in one batch, so the rewards agree to fp32 rounding of a batched forward pass (1e-5).
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import contextlib  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

gym = pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")
pytest.importorskip("mujoco")
AutoresetMode = getattr(gym.vector, "AutoresetMode", None)  # gymnasium 1.0: next-step auto-reset only, no modes

from stable_baselines3.common.vec_env import DummyVecEnv  # noqa: E402
from test_wrappers import (  # noqa: E402  helpers only (its fixtures stay there)
    ENV_ID, MODES, SIZE, CountingEnv, FakeBatchRenderer, GLlessBatchRenderer, Spy, _tiny_reward, actions,
    counting_frame, env_replacing_its_mjdata, forks_on_purpose, inverted_counting_env, make_env, mean_brightness,
    position_weighted_brightness, real_batch_renderer_or_skip,
)

from vlmrm_fast import Task, VLMRewardVectorWrapper, VLMRewardWrapper  # noqa: E402
from vlmrm_fast.env_render import render_env  # noqa: E402
from vlmrm_fast.vector_wrapper import reset_mode_of  # noqa: E402
from vlmrm_fast.wrappers import batch_frames  # noqa: E402  tests swap its batch renderer class
from vlmrm_fast.wrappers import RenderTerminalFrame  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*random weights.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*is resized, which costs time.*:UserWarning"),
]

NO_MODES = pytest.mark.skipif(AutoresetMode is None, reason="gymnasium < 1.1 has no AutoresetMode (next-step only)")
RESET_MODES = ["next_step", pytest.param("same_step", marks=NO_MODES), pytest.param("disabled", marks=NO_MODES)]


@pytest.fixture(scope="module")
def rm():
    return _tiny_reward(goal="a humanoid robot kneeling", baseline="a humanoid robot")


def reset_kwargs(reset_mode):
    """The vector env's auto-reset argument (none on gymnasium 1.0, whose only mode is next-step)."""
    return {} if AutoresetMode is None else {"autoreset_mode": getattr(AutoresetMode, reset_mode.upper())}


def sync_envs(make, n, reset_mode="next_step"):
    return gym.vector.SyncVectorEnv([make] * n, **reset_kwargs(reset_mode))


def short_env():
    return make_env(max_episode_steps=4)


@pytest.mark.parametrize("render", ["images", "fake_batch", "batch"])
@pytest.mark.parametrize("reset_mode", RESET_MODES)
def test_rewards_match_one_wrapper_per_env(rm, reset_mode, render, monkeypatch):
    """Every step's reward, episode returns and terminal-frame flags against VLMRewardWrapper on each env.

    Episodes end by falling (terminated) and by each env's own step limit (3, 4, 5: truncated) within 13
    steps, so each mode's reset path is crossed: NEXT_STEP's reset rows (reward 0, masked out), SAME_STEP's
    terminal state kept across the reset, DISABLED's partial resets (some envs, not all).
    """
    n, steps, seeds = 3, 13, [11, 12, 13]
    makes = [lambda limit=limit: make_env(max_episode_steps=limit) for limit in (3, 4, 5)]
    if render == "fake_batch":  # bottom-up rows, flipped by the reward model
        monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: FakeBatchRenderer)
    if render == "batch":
        real_batch_renderer_or_skip([short_env()])
    spy = Spy(rm)
    envs = VLMRewardVectorWrapper(gym.vector.SyncVectorEnv(makes, **reset_kwargs(reset_mode)), spy,
                                  render="images" if render == "images" else "batch")
    assert envs.reset_mode == reset_mode and envs.render_source == ("images" if render == "images" else "batch")
    refs = [VLMRewardWrapper(make(), rm) for make in makes]
    envs.reset(seed=seeds)
    for ref, seed in zip(refs, seeds):
        ref.reset(seed=seed)
    acts = actions(steps, n, seed=1)
    resetting = np.zeros(n, dtype=bool)
    seen = {"terminated": 0, "truncated": 0, "reset rows": 0, "partial resets": 0}
    for t in range(steps):
        _, rewards, terminated, truncated, info = envs.step(acts[t])
        assert rewards.dtype == np.float64 and rewards.shape == (n,)
        for i, ref in enumerate(refs):
            if resetting[i]:  # NEXT_STEP: this call reset env i instead of stepping it
                ref.reset()
                seen["reset rows"] += 1
                assert rewards[i] == 0.0 and info["vlm_reward"][i] == 0.0
                assert not info["_vlm_reward"][i] and not info["_gt_reward"][i]
                continue
            _, reward, ref_term, ref_trunc, ref_info = ref.step(acts[t, i])
            assert (ref_term, ref_trunc) == (terminated[i], truncated[i])
            assert info["_vlm_reward"][i] and info["_gt_reward"][i]
            assert rewards[i] == pytest.approx(reward, abs=1e-5)
            assert info["vlm_reward"][i] == pytest.approx(ref_info["vlm_reward"], abs=1e-5)
            assert info["gt_reward"][i] == ref_info["gt_reward"]
            if ref_term or ref_trunc:
                seen["terminated" if ref_term else "truncated"] += 1
                assert info["_episode_vlm_return"][i] and info["vlm_terminal_frame"][i]
                assert info["episode_vlm_return"][i] == pytest.approx(ref_info["episode_vlm_return"], abs=1e-4)
                assert info["episode_gt_return"][i] == ref_info["episode_gt_return"]
                if reset_mode != "next_step":
                    ref.reset()
            elif "_episode_vlm_return" in info:  # another env's episode ended: gymnasium's zero fill here
                assert not info["_episode_vlm_return"][i] and info["episode_vlm_return"][i] == 0.0
        ended = terminated | truncated
        if reset_mode == "next_step":
            resetting = ended
        if reset_mode == "disabled" and ended.any():
            seen["partial resets"] += not ended.all()
            envs.reset(options={"reset_mask": ended})
        assert "terminal_frame" not in info and "terminal_frame" not in info.get("final_info", {})
    assert spy.batch_sizes == [n] * steps  # one call per step, all envs
    assert seen["terminated"] and seen["truncated"]
    assert bool(seen["reset rows"]) == (reset_mode == "next_step")
    assert bool(seen["partial resets"]) == (reset_mode == "disabled")
    envs.close()


@pytest.mark.parametrize("mode", MODES)
def test_modes_tasks_and_info_layout(mode):
    """``mode``/``weight``, a several-task model's per-task rewards, and gymnasium's vector-info layout."""
    rm2 = _tiny_reward(tasks=[Task(goal="kneeling", baseline="a robot", name="kneel"),
                              Task(goal="the splits", baseline="a robot", name="splits")])
    # weight=0.25 in every mode: "replace" and "log" must not use it (and say so)
    unused = pytest.warns(UserWarning, match="weight=0.25 is unused") if mode != "add" else contextlib.nullcontext()
    with unused:
        envs = VLMRewardVectorWrapper(sync_envs(lambda: make_env(max_episode_steps=50), 2), rm2, mode=mode,
                                      weight=0.25, render="images", task="splits")
    envs.reset(seed=0)
    _, rewards, _, _, info = envs.step(np.zeros((2, 1), np.float32))
    frames = np.stack(envs.env.render())
    want = rm2(frames).numpy().astype(np.float64)  # [2, 2]: the frames the step scored (nothing moved since)
    np.testing.assert_allclose(info["vlm_reward"], want[:, 1], atol=1e-6)
    np.testing.assert_allclose(info["vlm_rewards"]["kneel"], want[:, 0], atol=1e-6)
    assert info["_vlm_rewards"].all() and info["vlm_rewards"]["_splits"].all()
    expected = {"replace": want[:, 1], "add": info["gt_reward"] + 0.25 * want[:, 1], "log": info["gt_reward"]}[mode]
    np.testing.assert_allclose(rewards, expected, atol=1e-6)
    assert "episode_vlm_return" not in info  # no episode ended
    envs.close()


def test_full_reset_after_an_episode_ended(rm):
    """NEXT_STEP: an env whose episode just ended would be reset by the next step; a reset of all envs in
    between does it instead, so the next step is a real transition for every env (scored, masks True)."""
    envs = VLMRewardVectorWrapper(sync_envs(lambda: make_env(max_episode_steps=2), 2), rm, render="images")
    envs.reset(seed=0)
    for _ in range(2):
        _, _, _, truncated, _ = envs.step(np.zeros((2, 1), np.float32))
    assert truncated.all()
    envs.reset(seed=1)
    _, rewards, _, _, info = envs.step(np.zeros((2, 1), np.float32))
    assert info["_vlm_reward"].all() and (rewards != 0).all()
    np.testing.assert_allclose(rewards, rm(np.stack(envs.env.render())).numpy(), atol=1e-5)
    envs.close()


def test_gymnasium_episode_statistics_see_the_vlm_reward(rm):
    """gymnasium's RecordEpisodeStatistics over the wrapper sums the VLM rewards (the wrapper's own return)."""
    envs = gym.wrappers.vector.RecordEpisodeStatistics(VLMRewardVectorWrapper(sync_envs(short_env, 2), rm))
    envs.reset(seed=3)
    for t in range(6):
        _, _, terminated, truncated, info = envs.step(actions(6, 2, seed=4)[t])
        if "_episode" in info:
            ended = info["_episode"]
            np.testing.assert_allclose(info["episode"]["r"][ended], info["episode_vlm_return"][ended], atol=1e-5)
            assert (info["_episode_vlm_return"] == ended).all()
    envs.close()


@NO_MODES
def test_episode_statistics_of_partial_resets_see_the_reset_mask():
    # DISABLED autoreset: the caller resets ended envs with options={"reset_mask": ...}. SyncVectorEnv
    # pops the mask from the dict it is given; RecordEpisodeStatistics above reads it after the call, so
    # the wrapper must pass a copy, or the statistics clear every env's sums (gymnasium's own bug).
    envs = gym.wrappers.vector.RecordEpisodeStatistics(
        VLMRewardVectorWrapper(sync_envs(lambda: CountingEnv(), 2, "disabled"), mean_brightness, render="images"))
    envs.reset(seed=0)
    envs.step(np.zeros((2, 1), np.float32))
    envs.reset(options={"reset_mask": np.array([True, False])})  # env 1 stays mid-episode at t = 1
    for _ in range(2):
        _, _, terminated, _, info = envs.step(np.zeros((2, 1), np.float32))
    assert terminated.tolist() == [False, True] and info["_episode"].tolist() == [False, True]
    assert info["episode"]["r"][1] == info["episode_vlm_return"][1] == 40 + 80 + 120
    envs.close()


@forks_on_purpose
@pytest.mark.parametrize("vector", ["sync", "async"])
@pytest.mark.parametrize("reset_mode", RESET_MODES)
def test_terminal_frame_of_non_mujoco_envs(rm, vector, reset_mode):
    """CountingEnv's frame shows its step count; an episode ends at t = 3, so the terminal step must be
    scored on frame 3 (frame 0 is the next episode's first state).

    A SyncVectorEnv always scores frame 3 (under SAME_STEP the wrapper inserts RenderTerminalFrame itself).
    An AsyncVectorEnv under SAME_STEP needs RenderTerminalFrame inside its envs: without it the terminal step
    is scored on frame 0, with a warning and ``vlm_terminal_frame`` False.
    """
    terminal_frame, next_first_frame = rm(np.stack([counting_frame(3), counting_frame(0)])).numpy()
    cases = [(CountingEnv, True)]
    if vector == "async":
        cases = [(CountingEnv, reset_mode != "same_step"), (lambda: RenderTerminalFrame(CountingEnv()), True)]
    for make, scored_terminal in cases:
        if vector == "sync":
            base = gym.vector.SyncVectorEnv([make] * 2, **reset_kwargs(reset_mode))
        else:
            base = gym.vector.AsyncVectorEnv([make] * 2, context="fork", **reset_kwargs(reset_mode))
        envs = VLMRewardVectorWrapper(base, rm)
        envs.reset()
        try:
            for t in range(3):
                if t == 2 and not scored_terminal:
                    with pytest.warns(UserWarning, match="RenderTerminalFrame"):
                        _, rewards, terminated, _, info = envs.step(np.zeros((2, 1), np.float32))
                else:
                    _, rewards, terminated, _, info = envs.step(np.zeros((2, 1), np.float32))
            assert terminated.all()
            want = terminal_frame if scored_terminal else next_first_frame
            np.testing.assert_allclose(rewards, [want] * 2, atol=1e-5)
            assert info["vlm_terminal_frame"].tolist() == [scored_terminal] * 2
            assert "terminal_frame" not in info and "terminal_frame" not in info.get("final_info", {})
        finally:
            envs.close()


def test_batch_renderer_failure_falls_back_to_images(rm, monkeypatch):
    monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: GLlessBatchRenderer)
    envs = VLMRewardVectorWrapper(sync_envs(make_env, 2), rm)
    assert envs.render_source == "batch"
    envs.reset(seed=0)
    with pytest.warns(UserWarning, match="envs.render"):
        _, rewards, _, _, _ = envs.step(np.zeros((2, 1), np.float32))
    assert envs.render_source == "images" and np.isfinite(rewards).all()
    envs.close()


@pytest.mark.parametrize("render", ["images", "fake_batch"])
def test_a_plain_reward_function_gets_top_down_frames(render, monkeypatch):
    """Any callable rm(frames) -> rewards (numpy here, no ``bottom_up=``): the batch renderer's bottom-up
    frames reach it flipped; its rewards are each env's own frame's."""
    if render == "fake_batch":
        monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: FakeBatchRenderer)
    envs = VLMRewardVectorWrapper(sync_envs(make_env, 2), position_weighted_brightness,
                                  render="images" if render == "images" else "batch")
    refs = [make_env() for _ in range(2)]
    envs.reset(seed=[3, 4])
    for ref, seed in zip(refs, [3, 4]):
        ref.reset(seed=seed)
    for action in actions(3, 2, seed=2):
        _, rewards, _, _, _ = envs.step(action)
        for ref, a in zip(refs, action):
            ref.step(a)
        expected = position_weighted_brightness([render_env(ref) for ref in refs])
        np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-5)
    envs.close()


def test_errors(rm):
    with pytest.raises(TypeError, match=r"not DummyVecEnv: for a stable-baselines3 VecEnv use .*VLMRewardVecEnv"):
        VLMRewardVectorWrapper(DummyVecEnv([make_env]), rm)
    with pytest.raises(TypeError, match=r"not TimeLimit: vectorise it first, .*SyncVectorEnv.*VLMRewardWrapper"):
        VLMRewardVectorWrapper(make_env(), rm)
    with pytest.raises(TypeError, match="needs a reward model"):
        VLMRewardVectorWrapper(sync_envs(make_env, 1), "a robot kneeling")
    with pytest.raises(ValueError, match=r'render_mode is None.*make_vec\(env_id, num_envs, render_mode="rgb_array"'):
        VLMRewardVectorWrapper(gym.vector.SyncVectorEnv([lambda: gym.make(ENV_ID)]), rm, render="images")
    with pytest.raises(ValueError, match="render must be one of"):
        VLMRewardVectorWrapper(sync_envs(make_env, 1), rm, render="gpu")
    with pytest.raises(ValueError, match="SyncVectorEnv of MuJoCo envs"):
        VLMRewardVectorWrapper(sync_envs(CountingEnv, 1), rm, render="batch")
    with pytest.raises(ValueError, match="mode must be one of"):
        VLMRewardVectorWrapper(sync_envs(make_env, 1), rm, mode="sum")
    with pytest.raises(ValueError, match="not one of the reward model's tasks"):
        VLMRewardVectorWrapper(sync_envs(make_env, 1), rm, task="splits")
    sizes = gym.vector.SyncVectorEnv([make_env, lambda: make_env(size=SIZE + 8)])
    envs = VLMRewardVectorWrapper(sizes, rm, render="images")
    envs.reset(seed=0)
    with pytest.raises(ValueError, match="frames of different sizes"):
        envs.step(np.zeros((2, 1), np.float32))


@NO_MODES
def test_reset_mode_names():
    """The mode as gymnasium records it (an enum, or its value), and gymnasium 1.0's missing key."""
    class Fake:
        def __init__(self, metadata):
            self.metadata = metadata

    assert reset_mode_of(Fake({"autoreset_mode": AutoresetMode.SAME_STEP})) == "same_step"
    assert reset_mode_of(Fake({"autoreset_mode": "Disabled"})) == "disabled"
    assert reset_mode_of(Fake({})) == "next_step"
    with pytest.raises(ValueError, match="unknown autoreset_mode"):
        reset_mode_of(Fake({"autoreset_mode": "sometimes"}))


# ---- behaviours a mutation audit found untested ---------------------------------------------------


def test_a_reset_mid_episode_starts_the_episode_sums_again(rm):
    """A reset of all envs before their episodes ended: the next episode's returns count its own steps only."""
    envs = VLMRewardVectorWrapper(sync_envs(lambda: make_env(max_episode_steps=3), 2), rm, render="images")
    envs.reset(seed=0)
    envs.step(np.full((2, 1), 0.5, np.float32))  # an episode cut short by the reset below
    envs.reset(seed=1)
    vlm, gt = np.zeros(2), np.zeros(2)
    for _ in range(3):
        _, _, _, truncated, info = envs.step(np.zeros((2, 1), np.float32))
        vlm += info["vlm_reward"]
        gt += info["gt_reward"]
    assert truncated.all()
    np.testing.assert_allclose(info["episode_vlm_return"], vlm, atol=1e-5)
    np.testing.assert_allclose(info["episode_gt_return"], gt, rtol=1e-12)
    envs.close()


def test_a_vector_env_that_renders_too_few_frames_is_refused(rm):
    """envs.render() with fewer frames than envs: an error, never one frame's reward broadcast over all envs."""
    base = sync_envs(CountingEnv, 2)
    base.render = lambda: [counting_frame(0)]
    envs = VLMRewardVectorWrapper(base, rm, render="images")
    envs.reset()
    with pytest.raises(ValueError, match="returned 1 frames for 2 envs"):
        envs.step(np.zeros((2, 1), np.float32))
    envs.close()


@forks_on_purpose
@NO_MODES
def test_the_missing_terminal_frame_warning_comes_once(rm):
    """AsyncVectorEnv under SAME_STEP without RenderTerminalFrame: one warning, however many episodes end."""
    base = gym.vector.AsyncVectorEnv([CountingEnv] * 2, context="fork", **reset_kwargs("same_step"))
    envs = VLMRewardVectorWrapper(base, rm)
    envs.reset()
    try:
        with pytest.warns(UserWarning, match="RenderTerminalFrame") as caught:
            for _ in range(6):  # two episodes end in every env
                _, _, terminated, _, info = envs.step(np.zeros((2, 1), np.float32))
        assert terminated.all() and not info["vlm_terminal_frame"].any()
        assert sum("RenderTerminalFrame" in str(w.message) for w in caught) == 1
    finally:
        envs.close()


def test_per_task_rewards_of_reset_rows_are_masked_out():
    """NEXT_STEP with a several-task model: on the step that resets an env, each task's mask is False too."""
    rm2 = _tiny_reward(tasks=[Task(goal="kneeling", baseline="a robot", name="kneel"),
                              Task(goal="the splits", baseline="a robot", name="splits")])
    envs = VLMRewardVectorWrapper(sync_envs(lambda: make_env(max_episode_steps=2), 2), rm2, render="images")
    envs.reset(seed=0)
    for _ in range(2):
        _, _, _, truncated, info = envs.step(np.zeros((2, 1), np.float32))
    assert truncated.all() and info["vlm_rewards"]["_kneel"].all()
    _, rewards, _, _, info = envs.step(np.zeros((2, 1), np.float32))  # resets both envs
    assert not info["_vlm_reward"].any() and (rewards == 0).all()
    assert not info["_gt_reward"].any()  # the env's reward of that row is no transition's either
    for name in ("kneel", "splits"):
        assert not info["vlm_rewards"]["_" + name].any() and (info["vlm_rewards"][name] == 0).all()
    envs.close()


def test_one_task_models_add_no_per_task_rewards(rm):
    envs = VLMRewardVectorWrapper(sync_envs(lambda: make_env(max_episode_steps=50), 2), rm, render="images")
    envs.reset(seed=0)
    _, _, _, _, info = envs.step(np.zeros((2, 1), np.float32))
    assert "vlm_rewards" not in info and "_vlm_rewards" not in info
    envs.close()


def test_episode_gt_return_of_running_envs_is_zero_filled(rm):
    """Where one env's episode ends, the others' episode returns read 0 (masked out), the gt ones too."""
    makes = [lambda: make_env(max_episode_steps=2), lambda: make_env(max_episode_steps=50)]
    envs = VLMRewardVectorWrapper(gym.vector.SyncVectorEnv(makes), rm, render="images")
    envs.reset(seed=0)
    for _ in range(2):
        _, _, _, truncated, info = envs.step(np.zeros((2, 1), np.float32))
    assert truncated.tolist() == [True, False]
    assert info["_episode_gt_return"].tolist() == [True, False] and info["episode_gt_return"][1] == 0.0
    assert info["_episode_vlm_return"].tolist() == [True, False] and info["episode_vlm_return"][1] == 0.0
    assert info["_vlm_terminal_frame"].tolist() == [True, False]
    envs.close()


@forks_on_purpose
@pytest.mark.parametrize("reset_mode", ["next_step", pytest.param("same_step", marks=NO_MODES)])
def test_render_terminal_frame_leaves_no_keys_behind(rm, reset_mode):
    """RenderTerminalFrame's frame and its mask are removed from the infos (and from final_info)."""
    base = gym.vector.AsyncVectorEnv([lambda: RenderTerminalFrame(CountingEnv())] * 2, context="fork",
                                     **reset_kwargs(reset_mode))
    envs = VLMRewardVectorWrapper(base, rm)
    envs.reset()
    try:
        for _ in range(3):
            _, _, terminated, _, info = envs.step(np.zeros((2, 1), np.float32))
        assert terminated.all()
        for where in (info, info.get("final_info", {})):
            assert not [k for k in where if "terminal_frame" in k and k != "vlm_terminal_frame"
                        and k != "_vlm_terminal_frame"], sorted(where)
    finally:
        envs.close()


def test_close_closes_the_batch_renderer(rm, monkeypatch):
    monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: FakeBatchRenderer)
    envs = VLMRewardVectorWrapper(sync_envs(make_env, 2), rm, render="batch")
    renderer = envs.renderer
    envs.close()
    assert renderer.closed and envs.renderer is None


def test_env_rewards_keep_float64_precision(rm):
    """The env's reward goes to info and the episode sums in float64, unrounded (1/3 is not a float32)."""
    third = lambda: gym.wrappers.TransformReward(CountingEnv(), lambda r: r / 3)  # noqa: E731
    envs = VLMRewardVectorWrapper(sync_envs(third, 2), rm, mode="log")
    envs.reset()
    for _ in range(3):
        _, rewards, _, _, info = envs.step(np.zeros((2, 1), np.float32))
    assert info["gt_reward"].tolist() == [3 / 3] * 2 and rewards.dtype == np.float64
    assert info["episode_gt_return"].tolist() == [1 / 3 + 2 / 3 + 3 / 3] * 2
    envs.close()


def test_batch_rendering_refuses_envs_that_replace_their_mujoco_data(rm, monkeypatch):
    """NEXT_STEP with the batch renderer: an env that makes a new MjData at reset would leave the renderer
    drawing the old one; an error at the first step after that reset, not stale frames (mutation audit)."""
    monkeypatch.setattr(batch_frames, "_import_batch_renderer", lambda: FakeBatchRenderer)
    envs = VLMRewardVectorWrapper(sync_envs(lambda: env_replacing_its_mjdata(50), 1), mean_brightness, render="batch")
    envs.reset(seed=0)  # made a new MjData, after the wrapper (and its renderer) took the old one
    with pytest.raises(RuntimeError, match="replaced its MjModel or MjData"):
        envs.step(np.zeros((1, 1), np.float32))
    envs.close()


@NO_MODES
def test_a_sync_vector_env_under_same_step_gives_no_missing_frame_warning(rm):
    """SAME_STEP in a SyncVectorEnv: the wrapper keeps the terminal frame itself, so the warning about
    missing terminal frames (meant for other vector envs) must not come (mutation audit)."""
    envs = VLMRewardVectorWrapper(sync_envs(CountingEnv, 2, "same_step"), mean_brightness, render="images")
    envs.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            _, rewards, terminated, _, info = envs.step(np.zeros((2, 1), np.float32))
    assert terminated.all() and info["vlm_terminal_frame"].all() and (rewards == 120).all()
    envs.close()


def test_info_masks_of_a_step_stay_as_returned_after_a_reset():
    """The ``_key`` masks handed back in ``info`` are the wrapper's to give away: a reset after the step that
    ended the episodes (NEXT_STEP: it clears the envs to be reset) must not change a kept info's masks
    (mutation audit: a mask that aliased the wrapper's own array read False after the reset)."""
    envs = VLMRewardVectorWrapper(sync_envs(CountingEnv, 2), mean_brightness, render="images")
    envs.reset(seed=0)
    for _ in range(3):
        _, _, terminated, _, info = envs.step(np.zeros((2, 1), np.float32))
    assert terminated.all()
    kept = {key: np.array(value) for key, value in info.items() if key.startswith("_")}
    assert kept["_episode_vlm_return"].all() and kept["_vlm_terminal_frame"].all()
    envs.reset(seed=1)
    for key, mask in kept.items():
        assert np.array_equal(info[key], mask), key
    envs.close()


@pytest.mark.parametrize("reset_mode", ["next_step", pytest.param("same_step", marks=NO_MODES)])
def test_each_auto_reset_episode_returns_its_own_sums(reset_mode):
    """Episodes that follow one another by auto-reset (no reset() call between them): each one's
    ``episode_vlm_return``/``episode_gt_return`` sums its own steps, not the episodes' before it
    (mutation audit). CountingEnv's steps score 40, 80 and 120 (mean brightness) with env rewards 1, 2, 3."""
    envs = VLMRewardVectorWrapper(sync_envs(CountingEnv, 2, reset_mode), mean_brightness, render="images")
    envs.reset(seed=0)
    returns = []
    for _ in range(7 if reset_mode == "next_step" else 6):  # NEXT_STEP: one more step, the reset between them
        _, _, _, _, info = envs.step(np.zeros((2, 1), np.float32))
        if "episode_vlm_return" in info:
            assert info["_episode_vlm_return"].all() and info["_episode_gt_return"].all()
            returns.append((info["episode_vlm_return"].tolist(), info["episode_gt_return"].tolist()))
    assert returns == [([240.0, 240.0], [6.0, 6.0])] * 2
    envs.close()


@NO_MODES
def test_each_env_is_scored_on_its_own_final_info_terminal_frame():
    """SAME_STEP with RenderTerminalFrame inside the envs: each env's terminal step is scored on the frame in
    its own row of ``info["final_info"]`` (mutation audit: every env was scored on env 0's). Env 1 renders
    its CountingEnv frames inverted, so at the terminal step (t = 3) env 0 scores 120 and env 1 255 - 120."""
    makes = [lambda: RenderTerminalFrame(CountingEnv()), lambda: RenderTerminalFrame(inverted_counting_env())]
    envs = VLMRewardVectorWrapper(gym.vector.SyncVectorEnv(makes, **reset_kwargs("same_step")), mean_brightness,
                                  render="images")
    envs.reset(seed=0)
    for _ in range(3):
        _, rewards, terminated, _, info = envs.step(np.zeros((2, 1), np.float32))
    assert terminated.all() and info["vlm_terminal_frame"].all()
    assert rewards.tolist() == [120.0, 135.0]
    envs.close()
