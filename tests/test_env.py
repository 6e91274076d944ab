"""vlmrm_fast/TexturedHumanoid-v0: the paper's humanoid (SPEC §1.3).

Physics and stepping tests need no OpenGL; rendering tests need EGL (MUJOCO_GL=egl) and skip with
the reason where it cannot make a context.
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported (headless rendering)
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import pickle  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

gym = pytest.importorskip("gymnasium")
mujoco = pytest.importorskip("mujoco")

import vlmrm_fast.envs as envs_mod  # noqa: E402
from vlmrm_fast.render import rendering_unavailable_reason  # noqa: E402
from vlmrm_fast.envs import EPISODE_LENGTH, HUMANOID_ENV_ID, register_envs  # noqa: E402


_EGL = rendering_unavailable_reason()
needs_egl = pytest.mark.skipif(_EGL is not None, reason=str(_EGL))


@pytest.fixture
def env():
    e = gym.make(HUMANOID_ENV_ID)
    yield e
    e.close()


def test_registered_idempotent():
    register_envs()
    register_envs()
    assert HUMANOID_ENV_ID in gym.registry
    spec = gym.spec(HUMANOID_ENV_ID)
    assert spec.max_episode_steps == EPISODE_LENGTH == 100


@pytest.mark.filterwarnings("ignore:.*infinity")
def test_check_env(env):
    from gymnasium.utils.env_checker import check_env

    check_env(env.unwrapped, skip_render_check=True)  # its render check tries "human" too: a window


def test_frame_skip_and_physics_are_gymnasiums(env):
    u = env.unwrapped
    assert u.frame_skip == 5
    assert u.dt == pytest.approx(0.015)
    ref = gym.make("Humanoid-v5").unwrapped  # same humanoid.xml physics
    for field in ("nq", "nv", "nu", "nbody", "njnt"):
        assert getattr(u.model, field) == getattr(ref.model, field)
    np.testing.assert_array_equal(u.model.body_mass, ref.model.body_mass)
    np.testing.assert_array_equal(u.model.actuator_gear, ref.model.actuator_gear)
    assert u.model.opt.timestep == ref.model.opt.timestep
    assert u.observation_space.shape == (376,)  # v4 observations, as in the original code
    ref.close()


@pytest.mark.parametrize("length", [7, None])
def test_fixed_episode_length_never_terminates(length):
    kwargs = {} if length is None else {"max_episode_steps": length}
    e = gym.make(HUMANOID_ENV_ID, **kwargs)
    expected = EPISODE_LENGTH if length is None else length
    e.reset(seed=0)
    e.action_space.seed(0)
    fell = False
    for episode in range(2):
        for t in range(1, expected + 1):
            _, _, terminated, truncated, _ = e.step(e.action_space.sample())
            fell = fell or not e.unwrapped.is_healthy
            assert not terminated  # not even once the humanoid has fallen (unhealthy)
            assert truncated == (t == expected), (episode, t)
        e.reset()
    if length is None:
        assert fell  # 100 random steps topple it; the episode still ran to the end
    e.close()


def test_textured_scene_in_model(env):
    m = env.unwrapped.model
    assert m.ntex >= 3
    tex_types = [int(t) for t in m.tex_type]
    assert int(mujoco.mjtTexture.mjTEXTURE_SKYBOX) in tex_types
    floor = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "floor")
    mat = m.geom_matid[floor]
    assert mat >= 0
    floor_tex = m.mat_texid[mat].max()
    assert floor_tex >= 0 and m.tex_type[floor_tex] == mujoco.mjtTexture.mjTEXTURE_2D
    assert m.mat_texrepeat[mat][0] > 1  # a tiled floor
    # every robot geom (all but the floor) carries the textured material of the default class
    robot = [g for g in range(m.ngeom) if g != floor]
    mats = {int(m.geom_matid[g]) for g in robot}
    assert len(mats) == 1 and mats.pop() >= 0
    assert m.mat_texid[m.geom_matid[robot[0]]].max() >= 0
    # the changed light
    light = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_LIGHT, "key")
    assert light >= 0 and m.light_castshadow[light]


def test_camera_config(env):
    u = env.unwrapped
    cfg = u.camera_config
    assert cfg["type"] == mujoco.mjtCamera.mjCAMERA_TRACKING
    assert cfg["trackbodyid"] == 1
    assert cfg["distance"] == 3.5 and cfg["elevation"] == -10.0 and cfg["azimuth"] == 180.0
    np.testing.assert_array_equal(cfg["lookat"], [0.0, 0.0, 1.0])
    assert u.mujoco_renderer.default_cam_config is cfg
    assert u.render_mode == "rgb_array" and (u.width, u.height) == (224, 224)


def test_untextured_option_keeps_physics_and_camera():
    e = gym.make(HUMANOID_ENV_ID, textured=False)
    ref = gym.make("Humanoid-v5").unwrapped
    assert e.unwrapped.model.ntex == ref.model.ntex
    assert e.unwrapped.camera_config["trackbodyid"] == 1
    e.close()
    ref.close()


def test_pickle_roundtrip():
    e = gym.make(HUMANOID_ENV_ID, width=64, height=48, camera_config={"distance": 5.0}).unwrapped
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.width, e2.height) == (64, 48)
    assert e2.camera_config["distance"] == 5.0 and e2.unwrapped.frame_skip == 5
    e.close()
    e2.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="MjvCamera"):
        gym.make(HUMANOID_ENV_ID, camera_config={"no_such_field": 1})
    with pytest.raises(TypeError, match="frame_skip"):
        gym.make(HUMANOID_ENV_ID, frame_skip=2)
    # Values MuJoCo cannot draw from: the env's first render ended the process (a C error, exit status 1).
    with pytest.raises(ValueError, match=r"camera_config tracks body 30, not a body of the model \(ids 0 to 13\)"):
        gym.make(HUMANOID_ENV_ID, camera_config={"trackbodyid": 30})
    with pytest.raises(ValueError, match=r"camera_config is fixed camera 5, not a camera of the model"):
        gym.make(HUMANOID_ENV_ID, camera_config={"type": int(mujoco.mjtCamera.mjCAMERA_FIXED), "fixedcamid": 5})


def test_render_mode_none_is_a_clear_error():
    e = gym.make(HUMANOID_ENV_ID, render_mode=None, disable_env_checker=True)
    e.reset(seed=0)
    with pytest.raises(RuntimeError, match="render_mode"):
        e.unwrapped.render()
    e.close()


def test_envs_import_is_light():
    # registering must not need mujoco's env classes until an env is made
    assert hasattr(envs_mod, "register_envs")
    assert envs_mod.TexturedHumanoidEnv.__name__ == "TexturedHumanoidEnv"


@needs_egl
def test_render_default_224(env):
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
    assert frame.std() > 10  # a textured scene, not a blank frame
    u = env.unwrapped
    cam = u.mujoco_renderer.viewer.cam
    assert cam.type == mujoco.mjtCamera.mjCAMERA_TRACKING and cam.trackbodyid == 1
    # a tracking camera looks at the torso's subtree centre of mass
    np.testing.assert_allclose(cam.lookat, u.data.subtree_com[1])
    # the camera follows the body: step until it moves, the view stays centred on it
    for _ in range(20):
        env.step(env.action_space.sample())
    env.render()
    np.testing.assert_allclose(cam.lookat, u.data.subtree_com[1])


@needs_egl
def test_render_custom_size():
    e = gym.make(HUMANOID_ENV_ID, width=96, height=64)
    e.reset(seed=0)
    frame = e.render()
    assert frame.shape == (64, 96, 3) and frame.dtype == np.uint8
    e.close()


def test_no_egl_is_a_clear_error_naming_the_fix(monkeypatch):
    """Where no GL context can be made (a headless machine without EGL), rendering fails with the fix:
    MUJOCO_GL=egl and the EGL packages, both for the env and for the batch renderer."""
    from gymnasium.envs.mujoco.mujoco_env import MujocoEnv

    from vlmrm_fast.render import BatchRenderer

    def no_context(*args, **kwargs):
        raise RuntimeError("eglInitialize() failed: EGL_NOT_INITIALIZED")  # what MuJoCo's EGL backend raises

    fix = r"MUJOCO_GL=egl and PYOPENGL_PLATFORM=egl.*apt-get install libegl1"
    monkeypatch.setattr(MujocoEnv, "render", no_context)
    env = gym.make(HUMANOID_ENV_ID, render_mode="rgb_array")
    env.reset(seed=0)
    with pytest.raises(RuntimeError, match=fix):
        env.render()
    env.close()
    monkeypatch.setattr(mujoco, "Renderer", type("NoContextRenderer", (), {"__init__": no_context}))
    model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='1'/></worldbody></mujoco>")
    with pytest.raises(RuntimeError, match=fix):
        BatchRenderer([(model, mujoco.MjData(model))], width=8, height=8, device="cpu")


# ---- behaviours a mutation audit found untested ---------------------------------------------------


def test_camera_overrides_stay_with_their_env():
    import copy

    from vlmrm_fast.envs.humanoid import DEFAULT_CAMERA_CONFIG

    before = copy.deepcopy(DEFAULT_CAMERA_CONFIG)
    e = gym.make(HUMANOID_ENV_ID, camera_config={"distance": 5.0, "azimuth": 90.0})
    fresh = gym.make(HUMANOID_ENV_ID)
    assert (e.unwrapped.camera_config["distance"], e.unwrapped.camera_config["azimuth"]) == (5.0, 90.0)
    assert (fresh.unwrapped.camera_config["distance"], fresh.unwrapped.camera_config["azimuth"]) == (3.5, 180.0)
    assert DEFAULT_CAMERA_CONFIG.keys() == before.keys()
    assert all(np.array_equal(DEFAULT_CAMERA_CONFIG[k], before[k]) for k in before)
    e.close()
    fresh.close()


@needs_egl
def test_render_larger_than_mujocos_default_framebuffer():
    # MuJoCo's offscreen buffer is 640 x 480 unless the model asks for more: the env asks for its size.
    e = gym.make(HUMANOID_ENV_ID, width=700, height=500)
    m = e.unwrapped.model
    assert (m.vis.global_.offwidth, m.vis.global_.offheight) == (700, 500)
    e.reset(seed=0)
    assert e.render().shape == (500, 700, 3)
    e.close()


def test_pickle_keeps_the_scene_termination_and_base_options():
    e = gym.make(HUMANOID_ENV_ID, textured=False, terminate_when_unhealthy=True, ctrl_cost_weight=0.5).unwrapped
    e2 = pickle.loads(pickle.dumps(e))
    assert e2._textured is False and e2.model.ntex == e.model.ntex
    assert e2._terminate_when_unhealthy is True and e2._ctrl_cost_weight == 0.5
    e.close()
    e2.close()


@pytest.mark.parametrize("key", ["camera_id", "camera_name", "default_camera_config", "xml_file", "frame_skip"])
def test_arguments_the_env_sets_itself_are_refused(key):
    with pytest.raises(TypeError, match=f"does not take {key!r}"):
        gym.make(HUMANOID_ENV_ID, **{key: None})


def test_a_failed_gl_context_leaves_no_second_traceback(monkeypatch):
    # gymnasium's viewer, left without a GL context, would raise again from __del__ ("Exception ignored
    # in ...") under the clear error; the env hands it a context to free.
    import gc
    import sys

    from gymnasium.envs.mujoco import mujoco_rendering

    from vlmrm_fast.envs.humanoid import RenderingUnavailable

    def no_context(width, height):
        raise RuntimeError("eglInitialize() failed: EGL_NOT_INITIALIZED")

    monkeypatch.setitem(mujoco_rendering._ALL_RENDERERS, os.environ["MUJOCO_GL"], no_context)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    e = gym.make(HUMANOID_ENV_ID)
    e.reset(seed=0)
    with pytest.raises(RenderingUnavailable, match="MUJOCO_GL=egl") as info:
        e.render()
    del info
    e.close()
    gc.collect()
    assert unraisable == []


@needs_egl
def test_shadow_size_reaches_the_model_the_pickle_and_the_frames():
    default = gym.make(HUMANOID_ENV_ID, width=96, height=96)
    small = gym.make(HUMANOID_ENV_ID, width=96, height=96, shadow_size=128)
    assert default.unwrapped.model.vis.quality.shadowsize == 4096  # MuJoCo's, the paper's look
    assert small.unwrapped.model.vis.quality.shadowsize == 128
    copy = pickle.loads(pickle.dumps(small.unwrapped))
    assert copy.model.vis.quality.shadowsize == 128
    frames = []
    for e in (default, small):
        e.reset(seed=0)
        frames.append(e.render().astype(np.int16))
    diff = np.abs(frames[0] - frames[1])
    # The same scene (most pixels equal); only the shadow's edge changes with a coarser map.
    assert 0 < (diff.max(axis=-1) > 0).mean() < 0.25, (diff.max(axis=-1) > 0).mean()
    for e in (default, small, copy):
        e.close()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "1024"])
def test_a_bad_shadow_size_is_refused_naming_the_default(bad):
    with pytest.raises(ValueError, match="shadow_size must be a positive integer.*4096"):
        gym.make(HUMANOID_ENV_ID, shadow_size=bad)


@pytest.mark.parametrize("name", ["width", "height"])
@pytest.mark.parametrize("bad", [0, -3, 10.5, True, "224"])
def test_a_bad_render_size_is_refused_when_the_env_is_made(name, bad):
    # 10.5 was truncated to 10 without a word, and 0 made (224, 0, 3) frames that only the wrappers refused.
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer number of pixels \(default 224"):
        gym.make(HUMANOID_ENV_ID, **{name: bad})


def test_a_render_size_may_be_a_numpy_integer():
    env = gym.make(HUMANOID_ENV_ID, width=np.int64(33), height=np.int32(17))
    env.reset(seed=0)
    assert env.render().shape == (17, 33, 3)
    env.close()


def test_registering_again_changes_nothing():
    # Re-registering would replace the spec, with gymnasium's "Overriding environment" warning each time.
    import warnings

    spec = gym.spec(HUMANOID_ENV_ID)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_envs()
    assert gym.spec(HUMANOID_ENV_ID) is spec


def test_an_unknown_name_of_the_envs_module_is_an_attribute_error():
    # The lazy attribute hook answers for TexturedHumanoidEnv only: a typo is not a silent None.
    with pytest.raises(AttributeError, match="no attribute 'TexturedHumanoid'"):
        envs_mod.TexturedHumanoid  # noqa: B018
    with pytest.raises(ImportError):
        from vlmrm_fast.envs import NoSuchEnv  # noqa: F401


def test_textured_scene_sky_headlight_and_robot_colour(env):
    m = env.unwrapped.model
    sky = next(t for t in range(m.ntex) if m.tex_type[t] == mujoco.mjtTexture.mjTEXTURE_SKYBOX)
    size = m.tex_width[sky] * m.tex_height[sky] * m.tex_nchannel[sky]
    texels = m.tex_data[m.tex_adr[sky]:m.tex_adr[sky] + size].reshape(-1, m.tex_nchannel[sky])
    assert len(np.unique(texels, axis=0)) > 16  # a gradient sky, not a flat colour
    np.testing.assert_allclose(m.vis.headlight.ambient, [0.3] * 3, rtol=1e-6)
    np.testing.assert_allclose(m.vis.headlight.diffuse, [0.4] * 3, rtol=1e-6)
    floor = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "floor")
    robot = [g for g in range(m.ngeom) if g != floor]
    # no rgba of their own: MuJoCo draws a geom's own rgba over its material's unless it is the default
    np.testing.assert_allclose(m.geom_rgba[robot], np.tile([0.5, 0.5, 0.5, 1.0], (len(robot), 1)), rtol=1e-6)
    np.testing.assert_allclose(m.geom_rgba[floor], [0.5, 0.5, 0.5, 1.0], rtol=1e-6)


def test_a_small_render_size_keeps_mujocos_default_framebuffer():
    # Other renderers of the model (mujoco.Renderer at up to 640 x 480) keep working: the size only grows it.
    e = gym.make(HUMANOID_ENV_ID, width=64, height=48)
    m = e.unwrapped.model
    assert (m.vis.global_.offwidth, m.vis.global_.offheight) == (640, 480)
    e.close()


def test_untextured_keeps_gymnasiums_scene():
    plain, gymnasiums = gym.make(HUMANOID_ENV_ID, textured=False), gym.make("Humanoid-v5")
    m, ref = plain.unwrapped.model, gymnasiums.unwrapped.model
    assert mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_LIGHT, "key") == -1  # not the textured scene's light
    np.testing.assert_array_equal(m.tex_data, ref.tex_data)
    np.testing.assert_array_equal(m.mat_texrepeat, ref.mat_texrepeat)
    plain.close()
    gymnasiums.close()


def _texels(m, tex):
    size = m.tex_width[tex] * m.tex_height[tex] * m.tex_nchannel[tex]
    return m.tex_data[m.tex_adr[tex]:m.tex_adr[tex] + size].reshape(-1, m.tex_nchannel[tex])


def test_the_floor_and_the_robot_are_checkered_not_flat():
    # SPEC §1.3: "a tiled floor and a texture on the robot's geoms"; a flat texture (one colour) passed
    # every test of test_env.py.
    import mujoco

    env = gym.make(HUMANOID_ENV_ID)
    m = env.unwrapped.model
    floor = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "floor")
    robot = next(g for g in range(m.ngeom) if g != floor)
    for geom in (floor, robot):
        tex = m.mat_texid[m.geom_matid[geom]].max()
        _, counts = np.unique(_texels(m, tex), axis=0, return_counts=True)
        top_two = np.sort(counts)[-2:] / counts.sum()
        # a checker: two colours in about equal shares (a flat texture is one colour, edge marks aside;
        # a flat cube has one colour on its top and another on its sides: 1 to 5)
        assert len(counts) >= 2 and top_two.min() > 0.3, (geom, top_two)
    env.close()
