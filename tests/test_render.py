"""vlmrm_fast.render.BatchRenderer: N MuJoCo envs -> one uint8 tensor [N, H, W, 3].

CPU path: frames equal what each env's own ``env.render()`` gives for the same state (exactly: the
same MuJoCo renderer, camera and options). GPU path (marker ``gpu``): frames equal MuJoCo's own
renderer's frames, in OpenGL row order (``bottom_up``). Tests skip with the reason where EGL
cannot make a context.
"""
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from types import SimpleNamespace

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported (headless rendering)
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

gym = pytest.importorskip("gymnasium")
mujoco = pytest.importorskip("mujoco")

from conftest import copy_sources  # noqa: E402
from vlmrm_fast.envs import HUMANOID_ENV_ID  # noqa: E402
from vlmrm_fast.render import BatchRenderer, gpu_unavailable_reason, rendering_unavailable_reason  # noqa: E402
from vlmrm_fast.render.gl_context import mujoco_major_version  # noqa: E402


_EGL = rendering_unavailable_reason()
pytestmark = pytest.mark.skipif(_EGL is not None, reason=str(_EGL))
HAS_CUDA = torch.cuda.is_available()
# Environmental reasons for the GPU path not to run on a CUDA machine (skip); any other reason fails.
_ENVIRONMENTAL = ("EGL context is not on", "EGL device display", "Cannot create an EGL context")


def _gpu_renderer(envs, **kwargs):
    r = BatchRenderer.from_envs(envs, device="cuda", **kwargs)
    if r.path != "gpu":
        reason = r.fallback_reason or ""
        r.close()
        if any(s in reason for s in _ENVIRONMENTAL):
            pytest.skip(f"GPU render path unavailable on this machine: {reason}")
        pytest.fail(f"GPU render path failed to start: {reason}")
    return r


def _make_envs(n=3, **kwargs):
    envs = [gym.make(HUMANOID_ENV_ID, **kwargs) for _ in range(n)]
    for i, e in enumerate(envs):  # different states: different seeds and numbers of random steps
        e.reset(seed=i)
        e.action_space.seed(i)
        for _ in range(2 + 3 * i):
            e.step(e.action_space.sample())
    return envs


@pytest.fixture(scope="module")
def envs():
    es = _make_envs()
    yield es
    for e in es:
        e.close()


@pytest.fixture(scope="module")
def env_frames(envs):
    return np.stack([e.render() for e in envs])  # the envs' own renders (negative row strides)


@pytest.fixture(scope="module")
def cpu_renderer(envs):
    r = BatchRenderer.from_envs(envs, device="cpu")
    yield r
    r.close()


def test_cpu_path_equals_env_render(cpu_renderer, env_frames):
    frames = cpu_renderer.render()
    assert frames.shape == (3, 224, 224, 3) and frames.dtype == torch.uint8
    assert frames.device == torch.device("cpu")
    assert cpu_renderer.bottom_up is False and cpu_renderer.path == "cpu"
    assert cpu_renderer.fallback_reason
    assert frames.is_contiguous() and all(s > 0 for s in frames.stride())
    np.testing.assert_array_equal(frames.numpy(), env_frames)
    # the three states differ, so this is not one frame compared three times
    assert not np.array_equal(env_frames[0], env_frames[2])
    # a second call gives a new tensor with the same frames
    again = cpu_renderer.render()
    assert again.data_ptr() != frames.data_ptr() and torch.equal(again, frames)


def test_env_render_unaffected(envs, env_frames):
    # gymnasium renders into whatever GL context is current: the batch renderer must restore it
    r = BatchRenderer.from_envs(envs, device="cpu")
    r.render()
    np.testing.assert_array_equal(np.stack([e.render() for e in envs]), env_frames)
    r.close()
    np.testing.assert_array_equal(np.stack([e.render() for e in envs]), env_frames)


def test_from_envs_warns_that_frames_an_env_renders_its_own_way_are_not_reproduced(envs):
    class Overlay(gym.Wrapper):  # a user's overlay on the env's frames
        def render(self):
            frame = self.env.render().copy()
            frame[:8] = 255
            return frame

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchRenderer.from_envs(envs, device="cpu").close()  # gymnasium's own: nothing to say
    with pytest.warns(UserWarning, match=r"^Overlay render frames of their own .* use env.render\(\) for those envs"):
        r = BatchRenderer.from_envs([Overlay(envs[0])], device="cpu")
    assert not np.array_equal(r.render()[0].numpy(), Overlay(envs[0]).render())  # as the warning says
    r.close()


def test_follows_env_steps(envs):
    e = _make_envs(1)[0]
    r = BatchRenderer.from_envs([e], device="cpu")
    before = r.render()
    for _ in range(5):
        e.step(e.action_space.sample())
    after = r.render()
    assert not torch.equal(before, after)
    np.testing.assert_array_equal(after[0].numpy(), e.render())
    r.close()
    e.close()


def test_out_argument(cpu_renderer, env_frames):
    out = torch.zeros((3, 224, 224, 3), dtype=torch.uint8)
    res = cpu_renderer.render(out=out)
    assert res is out
    np.testing.assert_array_equal(out.numpy(), env_frames)
    bad = {
        "shape": torch.zeros((3, 224, 224, 4), dtype=torch.uint8),
        "dtype": torch.zeros((3, 224, 224, 3), dtype=torch.float32),
        "strides": torch.zeros((3, 224, 224, 6), dtype=torch.uint8)[..., ::2],
        "device": torch.zeros((3, 224, 224, 3), dtype=torch.uint8, device="meta"),
    }
    for what, tensor in bad.items():
        with pytest.raises(ValueError, match="out must be a contiguous uint8 tensor"):
            cpu_renderer.render(out=tensor)


def test_model_data_pairs_with_camera_dict(envs, env_frames):
    cfg = envs[0].unwrapped.camera_config
    pairs = [(e.unwrapped.model, e.unwrapped.data) for e in envs]
    with BatchRenderer(pairs, width=224, height=224, camera=cfg, device="cpu") as r:
        np.testing.assert_array_equal(r.render().numpy(), env_frames)


def test_custom_size_and_reward_model_input(envs, env_frames):
    from vlmrm_fast import CLIPReward

    es = _make_envs(2, width=96, height=64)
    with BatchRenderer.from_envs(es, device="cpu") as r:
        frames = r.render()
        assert frames.shape == (2, 64, 96, 3)
        np.testing.assert_array_equal(frames.numpy(), np.stack([e.render() for e in es]))
    for e in es:
        e.close()
    # the rendered batch goes straight into the reward model
    from tests.conftest import make_tiny  # noqa: WPS433

    model, tok = make_tiny()
    rm = CLIPReward(model, tok, goal="a humanoid robot kneeling", baseline="a humanoid robot", alpha=0.5,
                    device="cpu")
    with BatchRenderer.from_envs(envs, device="cpu") as r:
        frames = r.render()
        rewards = rm(frames, bottom_up=r.bottom_up)
    assert rewards.shape == (3,) and torch.isfinite(rewards).all()
    # (not e.render() here: closing the envs above released the GL context gymnasium's envs
    # render into; gymnasium never makes its context current again. BatchRenderer does, per call.)
    torch.testing.assert_close(rewards, rm(env_frames))


def test_errors(envs):
    with pytest.raises(ValueError, match="at least one"):
        BatchRenderer([])
    with pytest.raises(TypeError, match="MuJoCo"):
        BatchRenderer.from_envs([gym.make("CartPole-v1")])
    other = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='1'/></worldbody></mujoco>")
    with pytest.raises(ValueError, match="ONE model"):
        BatchRenderer([(envs[0].unwrapped.model, envs[0].unwrapped.data), (other, mujoco.MjData(other))],
                      device="cpu")
    with pytest.raises(ValueError, match="gpu=True"):
        BatchRenderer(envs, device="cpu", gpu=True)
    r = BatchRenderer.from_envs(envs[:1], width=32, height=32, device="cpu")
    r.close()
    r.close()  # idempotent
    with pytest.raises(RuntimeError, match="close"):
        r.render()


def test_renders_from_another_thread():
    """A renderer made on one thread renders on another (an EGL context current on the first would be
    refused on the second: none is left current where none was)."""
    import threading

    from vlmrm_fast.render.gl_context import _keep_current_gl

    if os.environ.get("MUJOCO_GL") != "egl":
        pytest.skip("needs MUJOCO_GL=egl")
    from mujoco.egl import egl_ext as EGL

    es = _make_envs(2, width=32, height=32)
    with _keep_current_gl():  # whatever the other tests' envs made current comes back after
        if EGL.eglGetCurrentContext():
            EGL.eglMakeCurrent(EGL.eglGetCurrentDisplay(), EGL.EGL_NO_SURFACE, EGL.EGL_NO_SURFACE, EGL.EGL_NO_CONTEXT)
        with BatchRenderer.from_envs(es, device="cpu") as r:
            here = r.render()
            result = {}

            def render_there():
                try:
                    result["frames"] = r.render()
                except Exception as exc:  # noqa: BLE001 - reported below
                    result["error"] = exc

            thread = threading.Thread(target=render_there)
            thread.start()
            thread.join()
            assert "error" not in result, result.get("error")
            assert torch.equal(result["frames"], here) and torch.equal(r.render(), here)
    for e in es:
        e.close()


def test_an_env_that_replaced_its_data_is_refused():
    env = gym.make(HUMANOID_ENV_ID, width=32, height=32)
    env.reset(seed=0)
    with BatchRenderer.from_envs([env], device="cpu") as r:
        r.render()
        env.unwrapped.data = mujoco.MjData(env.unwrapped.model)  # the renderer would draw the old one
        with pytest.raises(RuntimeError, match="env 0 replaced its MjModel or MjData.*new BatchRenderer"):
            r.render()
    env.close()


def test_gpu_unavailable_reason_is_one_line():
    reason = gpu_unavailable_reason()
    if reason is not None:
        assert isinstance(reason, str) and "\n" not in reason


# -- GPU path ----------------------------------------------------------------------------------
def _nvcc_found() -> bool:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and os.path.exists(os.path.join(h, "bin", "nvcc")) for h in homes)


@pytest.fixture(scope="module")
def render_extension(tmp_path_factory):
    """The GL-CUDA extension: the installed one, else built here from csrc/ where nvcc is found (the
    test command's isolated install cannot build it: torch is not importable in the isolated build),
    so that CI compiles csrc/ against its torch on every run; else skip."""
    from vlmrm_fast.render import _cuda

    if _cuda.extension() is not None:
        return _cuda.extension()
    if not _nvcc_found():
        pytest.skip("the extension vlmrm_fast._render_cuda is not built, and there is no nvcc to build it")
    build = copy_sources(tmp_path_factory.mktemp("render_extension"))
    env = {**os.environ, "VLMRM_FAST_FORCE_BUILD": "1", "VLMRM_FAST_CUDA_ARCHS": "9.0"}
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=build, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"csrc/ does not build against torch {torch.__version__}:\n{result.stderr[-3000:]}"
    (library,) = (build / "vlmrm_fast").glob("_render_cuda*.so")
    spec = importlib.util.spec_from_file_location("vlmrm_fast._render_cuda", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gl_enable(cap: int) -> None:
    """glEnable through the GL library itself (PyOpenGL's wrapper would read the error flag it sets)."""
    import ctypes

    for name in ("libOpenGL.so.0", "libGL.so.1"):
        try:
            ctypes.CDLL(name).glEnable(ctypes.c_uint(cap))
            return
        except (OSError, AttributeError):
            continue
    pytest.skip("no libOpenGL.so.0 or libGL.so.1 to call glEnable from")


@pytest.mark.parametrize("size,offsamples", [((224, 224), 4), ((101, 75), 4), ((101, 75), 0)],
                         ids=["224-msaa", "odd-101x75-msaa", "odd-101x75-no-msaa"])
def test_extension_gl_readback_without_cuda(size, offsamples, render_extension):
    """The GL half of the GPU path (resolve blit, glReadPixels into a PBO): read back through
    glGetBufferSubData instead of CUDA, so it runs on any EGL (Mesa too)."""
    from vlmrm_fast.render.gl_context import _keep_current_gl

    ext = render_extension
    if os.environ.get("MUJOCO_GL") != "egl":
        pytest.skip("needs MUJOCO_GL=egl")
    from mujoco.egl import GLContext

    width, height = size
    es = _make_envs(3, width=width, height=height)
    for e in es:
        e.unwrapped.model.vis.quality.offsamples = offsamples
    with BatchRenderer.from_envs(es, device="cpu") as r:
        ref = r.render().numpy()
        cams = r.cameras
    m = es[0].unwrapped.model
    with _keep_current_gl():
        ctx = GLContext(width, height)
        ctx.make_current()
        con = mujoco.MjrContext(m, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, con)
        assert (con.offFBO_r != 0) == (offsamples > 0)
        reader = ext.PboReader(width, height, 3, -1)
        scene = mujoco.MjvScene(m, maxgeom=10000)
        rect = mujoco.MjrRect(0, 0, width, height)
        for i, e in enumerate(es):
            mujoco.mjv_updateScene(m, e.unwrapped.data, mujoco.MjvOption(), None, cams[i],
                                   mujoco.mjtCatBit.mjCAT_ALL, scene)
            mujoco.mjr_render(rect, scene, con)
            if i == 1:  # an error flag left by earlier GL calls (mjr_render checks none) is not ours to report
                _gl_enable(0xFFFF)  # GL_INVALID_ENUM
            reader.read(con.offFBO, con.offFBO_r, i)
        got = reader.download(3).numpy()
        assert not reader.registered
        with pytest.raises(RuntimeError, match="not registered"):
            reader.copy_to(torch.empty((3, height, width, 3), dtype=torch.uint8), 3)
        reader.close()
        con.free()
        ctx.free()
    np.testing.assert_array_equal(got[:, ::-1], ref)  # bottom-up rows, tightly packed

@pytest.fixture(scope="module")
def gpu_extension(request):
    """For the GPU-path tests: the extension (installed, or built here from csrc/ by render_extension)
    put where BatchRenderer looks for it, so that they run on any CUDA machine with nvcc, not only after
    a --no-build-isolation install; skip with the reason where the GPU path cannot be tried."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    from vlmrm_fast.render import _cuda

    ext = request.getfixturevalue("render_extension")
    saved = _cuda._ext
    _cuda._ext = ext
    try:
        reason = gpu_unavailable_reason("cuda")
        if reason is not None:
            pytest.skip(reason)
        yield ext
    finally:
        _cuda._ext = saved


@pytest.mark.gpu
@pytest.mark.parametrize("size", [(224, 224), (101, 75)], ids=["224", "odd-101x75"])
@pytest.mark.parametrize("offsamples", [4, 0], ids=["msaa", "no-msaa"])
def test_gpu_path_equals_mujoco_renderer(size, offsamples, gpu_extension):
    width, height = size
    es = _make_envs(3, width=width, height=height)
    for e in es:
        e.unwrapped.model.vis.quality.offsamples = offsamples
    with _gpu_renderer(es) as r:
        assert r.path == "gpu" and r.bottom_up is True and r.fallback_reason is None
        frames = r.render()
        assert frames.shape == (3, height, width, 3) and frames.dtype == torch.uint8
        assert frames.device.type == "cuda"
        gpu = frames.flip(1).cpu().numpy()  # OpenGL rows run bottom-up
    with BatchRenderer.from_envs(es, device="cpu") as cpu:  # mujoco.Renderer
        ref = cpu.render().numpy()
    np.testing.assert_array_equal(gpu, ref)
    np.testing.assert_array_equal(ref, np.stack([e.render() for e in es]))
    for e in es:
        e.close()


@pytest.mark.gpu
def test_gpu_frames_into_reward_model(envs, env_frames, gpu_extension):
    from conftest import make_tiny

    from vlmrm_fast import CLIPReward

    model, tok = make_tiny()
    rm = CLIPReward(model, tok, goal="a humanoid robot kneeling", baseline="a humanoid robot", alpha=0.5,
                    device="cuda", dtype=torch.float32)
    with _gpu_renderer(envs) as r:
        assert r.bottom_up
        frames = r.render()
        got = rm(frames, bottom_up=r.bottom_up)
        # frames stay valid across renders: a second batch into a given tensor, same content
        out = torch.empty_like(frames)
        assert r.render(out=out) is out and torch.equal(out, frames)
    np.testing.assert_array_equal(frames.flip(1).cpu().numpy(), env_frames)
    torch.testing.assert_close(got, rm(env_frames))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_device_cpu_path_fallback(envs, env_frames):
    with BatchRenderer.from_envs(envs, device="cuda", gpu=False) as r:
        assert r.path == "cpu" and not r.bottom_up
        frames = r.render()
        assert frames.device.type == "cuda"
        np.testing.assert_array_equal(frames.cpu().numpy(), env_frames)


def test_env_cameras_without_lookat_frame_the_env_after_its_reset():
    # Ant's camera config sets no lookat: gymnasium points it at the median geom position when its
    # viewer is made (first render, after reset). A renderer made before the reset must do the same.
    env = gym.make("Ant-v5", render_mode="rgb_array", width=48, height=40)
    renderer = BatchRenderer.from_envs([env], device="cpu")
    env.reset(seed=0)
    for _ in range(3):
        env.step(env.action_space.sample())
    try:
        np.testing.assert_array_equal(renderer.render()[0].numpy(), env.render())
    finally:
        renderer.close()
        env.close()


def test_none_in_a_camera_list_means_the_envs_own_camera(envs, env_frames):
    renderer = BatchRenderer.from_envs(envs, device="cpu", camera=[None] * len(envs))
    try:
        np.testing.assert_array_equal(renderer.render().numpy(), env_frames)
    finally:
        renderer.close()


def test_a_size_too_large_leaves_the_envs_renderers_working():
    [env] = _make_envs(1, width=32, height=32, render_mode="rgb_array")
    before = env.render()
    model = env.unwrapped.model
    sizes = (model.vis.global_.offwidth, model.vis.global_.offheight)
    with pytest.raises(RuntimeError, match="smaller width and height"):
        BatchRenderer.from_envs([env], width=40_000, height=8, device="cpu")
    assert (model.vis.global_.offwidth, model.vis.global_.offheight) == sizes
    np.testing.assert_array_equal(env.render(), before)
    env.close()


def test_checking_for_rendering_leaves_the_envs_renderers_working():
    # rendering_unavailable_reason opens and closes a renderer of its own: gymnasium renders into whatever
    # GL context is current, so the env's must be current again afterwards (it was not, on any MuJoCo).
    from vlmrm_fast.render import rendering_unavailable_reason

    [env] = _make_envs(1, width=32, height=32, render_mode="rgb_array")
    try:
        before = env.render()
        assert rendering_unavailable_reason() is None
        np.testing.assert_array_equal(env.render(), before)
    finally:
        env.close()


class _RecordingRenderer:
    """A stand-in for ``mujoco.Renderer`` that records the calls made on it and on its GL context."""

    calls: list = []
    close_fails = False

    failure = "Offscreen framebuffer is not complete"  # MuJoCo's, for a size past the GL driver's limit

    def __init__(self, *args, fail: bool = False) -> None:
        calls = self.calls
        self._gl_context = SimpleNamespace(make_current=lambda: calls.append("make_current"),
                                           free=lambda: calls.append("gl.free"))
        if fail:
            raise ValueError(self.failure)

    def close(self) -> None:
        self.calls.append("close")
        if self.close_fails:  # a MuJoCo whose close() reads attributes a failed __init__ never set
            raise AttributeError("_mjr_context")


@pytest.mark.parametrize("close_fails", [False, True])
def test_a_mujoco_renderer_is_closed_with_its_own_gl_context_current(monkeypatch, close_fails):
    # Before MuJoCo 4, Renderer.close freed its MjrContext in whatever GL context was current: a gymnasium
    # env's, whose env.render() then gave black frames (seen with MuJoCo 3.17; the two tests above fail
    # there without this). CI's MuJoCo frees in its own context, so the order is pinned on a stand-in.
    from vlmrm_fast.render import gl_context

    monkeypatch.setattr(_RecordingRenderer, "calls", [])
    monkeypatch.setattr(_RecordingRenderer, "close_fails", close_fails)
    gl_context.close_mujoco_renderer(_RecordingRenderer())
    assert _RecordingRenderer.calls == ["make_current", "close"] + (["gl.free"] if close_fails else [])


class _Mujoco35Renderer:
    """``mujoco.Renderer`` as MuJoCo 3.5 and 3.6 have it where ``__init__`` fails: nothing set before its GL
    context, and ``close()``, which ``__del__`` calls, reads both contexts."""

    def __init__(self, *args) -> None:
        self._gl_context = SimpleNamespace(make_current=lambda: None, free=lambda: None)
        raise ValueError(_RecordingRenderer.failure)

    def close(self) -> None:
        if self._gl_context:
            self._gl_context.free()
        self._gl_context = None
        if self._mjr_context:
            self._mjr_context.free()
        self._mjr_context = None

    def __del__(self) -> None:
        self.close()


def test_a_mujoco_renderer_that_fails_to_start_leaves_nothing_for_its_finaliser_to_raise(monkeypatch):
    # On MuJoCo 3.5 the renderer closed after its failed __init__ raised AttributeError again from
    # Renderer.__del__ ("Exception ignored in ..." on stderr; test_a_size_too_large_leaves_the_envs_renderers_working
    # warned with it); MuJoCo 4 sets both attributes first, so the finaliser is pinned on a stand-in.
    import gc
    import sys

    from vlmrm_fast.render import gl_context

    model = mujoco.MjModel.from_xml_string("<mujoco/>")
    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    monkeypatch.setattr(mujoco, "Renderer", _Mujoco35Renderer)
    with pytest.raises(ValueError, match=_RecordingRenderer.failure):
        gl_context.open_mujoco_renderer(model, 8, 8)
    gc.collect()
    assert [str(error.exc_value) for error in raised] == []


def test_a_mujoco_renderer_that_fails_to_start_is_closed_before_the_error(monkeypatch):
    [env] = _make_envs(1, width=32, height=32, render_mode="rgb_array")
    monkeypatch.setattr(_RecordingRenderer, "calls", [])
    monkeypatch.setattr(mujoco, "Renderer", type("FailingRenderer", (_RecordingRenderer,), {
        "__init__": lambda self, *args: _RecordingRenderer.__init__(self, fail=True)}))
    try:
        with pytest.raises(RuntimeError, match="smaller width and height"):
            BatchRenderer.from_envs([env], device="cpu")
        assert _RecordingRenderer.calls == ["make_current", "close"]
        # EGL without a usable GL configuration is no size problem: the rendering help, as env.render() gives.
        from vlmrm_fast.envs.humanoid import RenderingUnavailable

        monkeypatch.setattr(_RecordingRenderer, "failure", "EGL failed to find a framebuffer configuration that "
                                                           "matches the desired attributes")
        with pytest.raises(RenderingUnavailable) as unavailable:
            BatchRenderer.from_envs([env], device="cpu")
        assert "smaller width" not in str(unavailable.value)
    finally:
        env.close()


def test_envs_of_another_look_are_refused():
    # Same counts of bodies, geoms, materials and textures, other textures: one upload cannot draw both.
    textured, plain = gym.make(HUMANOID_ENV_ID), gym.make(HUMANOID_ENV_ID, textured=False)
    for env in (textured, plain):
        env.reset(seed=0)
    with pytest.raises(ValueError, match="ONE model.*tex_data"):
        BatchRenderer.from_envs([textured, plain], width=16, height=16, device="cpu")


@pytest.mark.parametrize("group,name,value", [
    ("quality", "shadowsize", 64), ("quality", "offsamples", 0), ("map", "shadowclip", 0.3), ("map", "fogend", 3.0),
    ("quality", "numslices", 8), ("quality", "numstacks", 8), ("quality", "numquads", 1), ("map", "haze", 0.9),
    ("rgba", "haze", [1.0, 0.0, 0.0, 1.0]), ("map", "shadowscale", 0.2), ("map", "fogstart", 0.1),
    ("rgba", "fog", [1.0, 0.0, 0.0, 1.0]), ("global_", "linewidth", 5.0)])
def test_envs_whose_context_settings_differ_are_refused(group, name, value):
    # mjr_makeContext copies the shadow map's size, multisampling, shadow and fog ranges, display lists'
    # detail, haze and line width from model 0 into the context every env is drawn with: env 1's frames were
    # drawn with env 0's (142 pixels off with shadow_size=64, 685 without multisampling, 289 of 64 x 64 with
    # numslices=8).
    first, second = _make_envs(2, width=16, height=16)
    target = getattr(second.unwrapped.model.vis, group)
    if isinstance(value, list):
        getattr(target, name)[:] = value
    else:
        setattr(target, name, value)
    try:
        with pytest.raises(ValueError, match=rf"ONE model.*vis\.{group}\.{name}"):
            BatchRenderer.from_envs([first, second], device="cpu")
    finally:
        first.close()
        second.close()


_MESH_XML = """<mujoco><asset>{asset}</asset><worldbody><light pos="0 0 3"/>{geom}</worldbody></mujoco>"""


@pytest.mark.parametrize("kind", ["mesh", "hfield", "plane"])
def test_envs_with_other_meshes_or_heightfields_are_refused(kind):
    # Uploaded once from model 0, like textures: same counts but other vertices, heights or floor
    # sizes (a plane's grid) would be drawn as model 0's.
    if kind == "mesh":
        asset = '<mesh name="m" vertex="0 0 0  1 0 0  0 1 0  0 0 {z}"/>'
        geom = '<geom type="mesh" mesh="m"/>'
    elif kind == "hfield":
        asset = '<hfield name="h" nrow="2" ncol="2" size="1 1 {z} 0.1" elevation="0 1 1 0"/>'
        geom = '<geom type="hfield" hfield="h"/>'
    else:
        asset, geom = "", '<geom type="plane" size="{z} {z} 0.1"/>'
    models = [mujoco.MjModel.from_xml_string(_MESH_XML.format(asset=asset.format(z=z), geom=geom.format(z=z)))
              for z in (1, 2)]
    pairs = [(m, mujoco.MjData(m)) for m in models]
    with pytest.raises(ValueError, match=f"ONE model.*{kind}"):
        BatchRenderer(pairs, width=16, height=16, device="cpu")
    BatchRenderer([pairs[0], (models[0], mujoco.MjData(models[0]))], width=16, height=16, device="cpu").close()


def test_envs_in_other_colours_and_lights_are_drawn_in_their_own():
    # Visual domain randomisation at reset (colours, materials' colours, lights) goes into each env's
    # scene from its own model: accepted, and each frame is what the env's own render gives.
    envs = _make_envs(2, width=48, height=48)
    model = envs[1].unwrapped.model
    model.geom_rgba[:, :3] = np.random.default_rng(0).uniform(0, 1, (model.ngeom, 3))
    model.mat_rgba[:, :3] = 0.3
    model.light_diffuse[:] = 0.9
    own = np.stack([e.render() for e in envs])
    assert np.abs(own[0].astype(int) - own[1].astype(int)).mean() > 5  # the look really differs
    with BatchRenderer.from_envs(envs, device="cpu") as renderer:
        np.testing.assert_array_equal(renderer.render().numpy(), own)
    for env in envs:
        env.close()


def test_envs_of_other_render_sizes_are_refused_unless_a_size_is_given():
    small, large = _make_envs(1, width=32, height=32)[0], _make_envs(1, width=48, height=24)[0]
    with pytest.raises(ValueError, match=r"different sizes \(\[\(32, 32\), \(48, 24\)\]"):
        BatchRenderer.from_envs([small, large], device="cpu")
    with BatchRenderer.from_envs([small, large], width=40, height=40, device="cpu") as renderer:
        assert tuple(renderer.render().shape) == (2, 40, 40, 3)
    for env in (small, large):
        env.close()


def test_free_camera_takes_the_lookat_of_a_viewer_made_after_it():
    # gymnasium places a free camera's lookat once, when the env's viewer is made (its first render).
    # A renderer made before that, first rendering after it (the env moved meanwhile), uses the
    # viewer's camera, so its frames still equal env.render().
    envs = [gym.make("InvertedPendulum-v5", render_mode="rgb_array", width=40, height=40) for _ in range(2)]
    renderer = BatchRenderer.from_envs(envs, device="cpu")
    for i, env in enumerate(envs):
        env.reset(seed=i)
        env.render()  # the viewer is made here, its lookat placed at this state
        env.action_space.seed(i)
        for _ in range(5):
            env.step(env.action_space.sample())
    own = np.stack([env.render() for env in envs])
    np.testing.assert_array_equal(renderer.render().numpy(), own)
    renderer.close()
    for env in envs:
        env.close()



@pytest.mark.parametrize("mode", ["rgbd_tuple", "depth_array"])
@pytest.mark.parametrize("made", ["before the viewer", "after the viewer"])
def test_an_env_rendering_rgbd_tuples_is_drawn_from_its_viewers_camera(made, mode):
    # An env made with render_mode="rgbd_tuple" (or "depth_array") keeps its viewer under that mode, not "rgb_array":
    # the renderer did not find it and aimed its free camera at the geoms' median at its own first frame, not where
    # the env's viewer had placed it: frames other than env.render()'s (Ant-v5 after 40 steps: 70% of pixels differ).
    # The frames are compared with a twin made with render_mode="rgb_array" and driven alike.
    envs = [gym.make("InvertedPendulum-v5", render_mode=m, width=40, height=40) for m in (mode, "rgb_array")]
    if mode not in envs[0].metadata["render_modes"]:
        pytest.skip(f"this gymnasium's MuJoCo envs have no {mode!r} render mode (gymnasium 1.0's have none)")
    renderer = BatchRenderer.from_envs([envs[0]], device="cpu") if made == "before the viewer" else None
    for env in envs:
        env.reset(seed=0)
        env.render()  # the viewer is made here, its lookat placed at this state
        env.action_space.seed(0)
        for _ in range(10):
            env.step(env.action_space.sample())
    renderer = renderer or BatchRenderer.from_envs([envs[0]], device="cpu")
    frame = renderer.render()[0].numpy()
    np.testing.assert_array_equal(frame, envs[1].render())
    if mode == "rgbd_tuple":
        np.testing.assert_array_equal(frame, envs[0].render()[0])
    renderer.close()
    for env in envs:
        env.close()


@pytest.mark.parametrize("env_id", ["InvertedPendulum-v5", "Ant-v5"])
def test_an_env_first_rendered_after_the_renderer_looks_where_the_scored_frames_did(env_id):
    # A researcher records a video from step k on: the env's viewer, made then, placed its free camera at the
    # geoms' median at step k, while the renderer had placed its own at its first frame (HalfCheetah runs
    # away: 255 off in half the pixels; Ant crawls). The renderer hands its lookat to the env's camera config instead.
    envs = [gym.make(env_id, render_mode="rgb_array", width=40, height=40) for _ in range(2)]
    originals = [env.unwrapped.mujoco_renderer.default_cam_config for env in envs]  # may be one shared dict
    renderer = BatchRenderer.from_envs(envs, device="cpu")
    try:
        for i, env in enumerate(envs):
            env.reset(seed=i)
            env.action_space.seed(i)
        renderer.render()  # the scored frames' camera is placed here
        for _ in range(15):
            for env in envs:
                env.step(env.action_space.sample())
        own = np.stack([env.render() for env in envs])  # the envs' viewers are made only now
        np.testing.assert_array_equal(renderer.render().numpy(), own)
        # Each env got a config of its own; a default the envs share is left as it was.
        configs = [env.unwrapped.mujoco_renderer.default_cam_config for env in envs]
        assert configs[0] is not configs[1] and all("lookat" in c for c in configs)
        assert all(o is None or "lookat" not in o for o in originals)
    finally:
        renderer.close()
        for env in envs:
            env.close()


def test_two_renderers_made_before_the_first_frame_keep_the_first_ones_aim():
    # The wrapper's renderer and a second one for videos: the second, first rendering later, took the geoms'
    # median then and handed that to the env, so the env's own frames followed it, not the scored ones.
    env = gym.make("Ant-v5", render_mode="rgb_array", width=40, height=40)
    scored, video = BatchRenderer.from_envs([env], device="cpu"), BatchRenderer.from_envs([env], device="cpu")
    try:
        env.reset(seed=0)
        env.action_space.seed(0)
        first = scored.render()
        for _ in range(15):
            env.step(env.action_space.sample())
        later = video.render()
        np.testing.assert_array_equal(later.numpy(), scored.render().numpy())
        np.testing.assert_array_equal(env.render(), later[0].numpy())
        assert not torch.equal(first, later)  # the ant moved: the frames differ, the aim does not
    finally:
        scored.close()
        video.close()
        env.close()


def test_egl_position_of_a_cuda_device():
    """MuJoCo < 4 takes MUJOCO_EGL_DEVICE_ID as a position in EGL's device list: torch's cuda:i is looked
    up there by the driver's CUDA ordinal (physical, through CUDA_VISIBLE_DEVICES, then torch's own)."""
    from vlmrm_fast.render.gl_context import _egl_cuda_ids, egl_position_of_cuda_device as position

    egl = [None, 2, 0, 3, 1]  # a software device first, then four GPUs in another order than CUDA's
    assert position(egl, 0, None) == 2 and position(egl, 3, None) == 3
    assert position(egl, 0, "3,1") == 3 and position(egl, 1, "3,1") == 4  # physical GPUs 3 and 1
    assert position([None, 1, 0], 0, "5") == 2  # ordinal 5 unknown to EGL: torch's own number, 0
    assert position(egl, 0, "GPU-8a0c1e2f") == 2  # UUIDs: no physical ordinal to look up
    assert position(egl, 2, "3,1") == 1  # an index past the list names no physical GPU: torch's own number, 2
    assert position([None], 0, None) is None  # no CUDA device behind EGL (Mesa): EGL's own order
    assert position([None, 0], 3, None) is None  # no EGL device on that GPU
    if os.environ.get("MUJOCO_GL") == "egl":
        assert all(x is None or x >= 0 for x in _egl_cuda_ids())  # the query runs on this EGL


_ORDER_SCRIPT = """
import sys
{first}
import mujoco
model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='1'/></worldbody></mujoco>")
with mujoco.Renderer(model, 8, 8) as renderer:
    renderer.update_scene(mujoco.MjData(model))
    frame = renderer.render()
print("mesa", any("/libLLVM" in line for line in open("/proc/self/maps")), flush=True)  # not vlmrm_fast's check:
import vlmrm_fast  # importing it here is the point
reward = vlmrm_fast.CLIPReward.from_pretrained("vlmrm-tiny", None, goal="a", device="cpu", backend="torch",
                                               kernels="torch")
print("reward", float(reward(frame[None])[0]), flush=True)
print("triton loaded", sys.modules.get("triton") is not None, flush=True)
"""


@pytest.mark.parametrize("interpreter", [True, False], ids=["interpreter", "no-triton-use"])
@pytest.mark.parametrize("first", ["import vlmrm_fast", ""], ids=["package-first", "frame-first"])
def test_the_cause_of_an_llvm_clash_is_named_before_it_crashes(first, interpreter):
    # Mesa's llvmpipe and Triton each bring an LLVM: Triton loaded after Mesa's GL context crashes the
    # process (a segmentation fault, no message). `import vlmrm_fast` loads Triton first. Where a frame came
    # before it: without a CUDA device or the interpreter, Triton has nothing to run and is kept out (it
    # just works); with either, a warning naming the cause and the fix comes out before Triton loads (and the
    # process may then crash). A fresh interpreter each.
    env = dict(os.environ, MUJOCO_GL="egl", PYOPENGL_PLATFORM="egl")
    env.pop("TRITON_INTERPRET", None)  # conftest sets it on CPU machines
    if interpreter:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", _ORDER_SCRIPT.format(first=first)], capture_output=True,
                            text=True, env=env, timeout=300)
    named = "import vlmrm_fast (or triton) before the first frame is rendered" in result.stderr
    kept_out = "keeps it out of this process" in result.stderr
    if first or "mesa True" not in result.stdout:  # the package first, or a GPU driver's GL: it just works
        assert result.returncode == 0 and "reward" in result.stdout and not named, result.stderr[-2000:]
    elif interpreter or HAS_CUDA:
        assert named and not kept_out and result.returncode in (0, -signal.SIGSEGV), result.stderr[-2000:]
    else:
        assert named and kept_out and result.returncode == 0 and "reward" in result.stdout, result.stderr[-2000:]
        assert "triton loaded False" in result.stdout


def test_a_fall_back_from_the_gpu_path_is_announced(envs):
    """Frames asked for on a CUDA device but rendered on the CPU path (extension not built, or built against
    another torch, EGL elsewhere): a warning with the reason, not only ``fallback_reason``. Without CUDA,
    a CUDA device is refused (test_a_cuda_device_this_machine_lacks_is_refused_at_construction); stand-ins
    for CUDA reach this warning on any machine (test_a_gpu_path_that_cannot_start_frees_what_it_made...)."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = BatchRenderer.from_envs(envs, device="cuda:0")
    r.close()
    ours = [w for w in caught if "BatchRenderer renders on the CPU path" in str(w.message)]
    if r.path == "gpu":
        assert not ours
    else:
        assert len(ours) == 1 and r.fallback_reason in str(ours[0].message) and ours[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # chosen, not fallen back to: no warning
        BatchRenderer.from_envs(envs, device="cuda:0", gpu=False).close()
        BatchRenderer.from_envs(envs, device="cpu").close()


# ---- argument checks and options a mutation audit found untested ------------------------------------

_ONE_CAMERA = """<mujoco><worldbody><light pos="0 0 3"/><camera name="cam" pos="0 -3 1" xyaxes="1 0 0 0 0.3 1"/>
<geom size="0.5" rgba="1 0 0 1"/><geom type="plane" size="2 2 0.1"/></worldbody></mujoco>"""


def _pairs(n=2):
    model = mujoco.MjModel.from_xml_string(_ONE_CAMERA)
    pairs = [(model, mujoco.MjData(model)) for _ in range(n)]
    for _, data in pairs:
        mujoco.mj_forward(model, data)
    return pairs


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(width=0), ValueError, "width and height must be positive"),
    (dict(height=-1), ValueError, "width and height must be positive"),
    (dict(camera=[None]), ValueError, "a list of 1 cameras for 2 envs"),
    (dict(camera=1), ValueError, r"camera id 1 outside \[-1, 1\)"),  # ncam is 1: ids 0 only
    (dict(camera="nope"), ValueError, "'nope' is not a camera of the model"),
    (dict(camera={"nope": 1}), ValueError, "'nope' is not an attribute of mujoco.MjvCamera"),
    (dict(gpu="yes"), ValueError, "gpu must be 'auto', True or False"),
    (dict(max_geom=0), ValueError, r"max_geom must be a positive number of geoms \(default 10000\), got 0"),  # black frames
    # Cameras MuJoCo cannot draw from: its mjv_updateScene ended the process at the first render (a C error).
    (dict(camera={"type": 2, "fixedcamid": 1}), ValueError, r"env 0's camera is fixed camera 1, not a camera.*ids 0 to 0"),
    (dict(camera=[0, {"type": 1, "trackbodyid": 3}]), ValueError, r"env 1's camera tracks body 3, not a body.*0 to 0"),
    (dict(camera={"type": 5}), ValueError, "env 0's camera has type 5"),
])
def test_bad_arguments_are_refused(kwargs, error, message):
    args = {**dict(width=16, height=16, device="cpu"), **kwargs}
    with pytest.raises(error, match=message):
        BatchRenderer(_pairs(), **args).close()


_CHANGED_CAMERA = """
import mujoco
from vlmrm_fast.render import BatchRenderer
model = mujoco.MjModel.from_xml_string('<mujoco><worldbody><camera pos="0 0 3"/><geom size="1"/></worldbody></mujoco>')
renderer = BatchRenderer([(model, mujoco.MjData(model))], 8, 8, camera=0, device="cpu")
renderer.cameras[0].fixedcamid = 4
try:
    renderer.render()
except ValueError as error:
    print(error)
"""


def test_a_camera_changed_to_one_mujoco_cannot_draw_is_refused_at_render():
    # renderer.cameras may be changed between renders; a fixed camera id past the model's ended the process
    # inside MuJoCo ("fixed camera id is outside valid range", exit status 1): a subprocess keeps pytest alive.
    result = subprocess.run([sys.executable, "-c", _CHANGED_CAMERA], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "env 0's camera is fixed camera 4, not a camera of the model (ids 0 to 0)" in result.stdout


def test_a_data_made_for_another_model_is_refused():
    # MuJoCo drew a 30-body model from the MjData of a 1-geom one without a word: a wrong frame, read past its arrays.
    many = mujoco.MjModel.from_xml_string("<mujoco><worldbody>" + "".join(
        f"<body pos='{i} 0 0'><geom size='.3'/></body>" for i in range(30)) + "</worldbody></mujoco>")
    [(one, data)] = _pairs(1)
    with pytest.raises(ValueError, match=r"data was made for another model \(model vs data: nbody 31 vs 1, ngeom 30 vs 2"):
        BatchRenderer([(many, data)], 8, 8, device="cpu")
    BatchRenderer([(one, data)], 8, 8, device="cpu").close()


def test_a_data_made_for_a_model_without_the_tendons_is_refused():
    # The same bodies, geoms, sites, cameras and lights, and a tendon the data's model lacks: the check passed it,
    # and MuJoCo drew the tendon from arrays the data does not have (a wrong frame).
    def model(tendon):
        return mujoco.MjModel.from_xml_string(
            "<mujoco><worldbody><body pos='0 0 1'><freejoint/><geom size='.2'/><site name='a'/></body>"
            "<body pos='1 0 1'><freejoint/><geom size='.2'/><site name='b'/></body></worldbody>"
            + ("<tendon><spatial><site site='a'/><site site='b'/></spatial></tendon>" if tendon else "") + "</mujoco>")

    with_tendon, without = model(True), model(False)
    with pytest.raises(ValueError, match=r"data was made for another model \(model vs data: ntendon 1 vs 0, nwrap 2 vs 0"):
        BatchRenderer([(with_tendon, mujoco.MjData(without))], 8, 8, device="cpu")
    BatchRenderer([(with_tendon, mujoco.MjData(with_tendon))], 8, 8, device="cpu").close()


def test_a_camera_given_overrides_the_envs_own():
    env = gym.make(HUMANOID_ENV_ID, width=32, height=32)
    env.reset(seed=0)
    try:
        far = {"distance": 12.0, "elevation": -60.0, "lookat": [0.0, 0.0, 0.0]}
        with BatchRenderer.from_envs([env], device="cpu", camera=far) as given, \
                BatchRenderer([(env.unwrapped.model, env.unwrapped.data)], 32, 32, camera=far, device="cpu") as pair:
            frame = given.render()
            assert torch.equal(frame, pair.render())
            assert not np.array_equal(frame[0].numpy(), env.render())
    finally:
        env.close()


def test_a_given_camera_without_a_lookat_is_aimed_by_the_renderer_not_from_or_into_the_envs_camera():
    # Only an env's own camera follows its viewer and hands its aim to the env's camera config: a camera config
    # given to the renderer looks at the geoms' median at its first frame, and leaves the env's config alone.
    env = gym.make("InvertedPendulum-v5", render_mode="rgb_array", width=32, height=32)
    try:
        env.reset(seed=0)
        original = env.unwrapped.mujoco_renderer.default_cam_config
        median = np.median(env.unwrapped.data.geom_xpos, axis=0)
        with BatchRenderer.from_envs([env], device="cpu", camera={"distance": 3.0}) as r:
            r.render()
            np.testing.assert_array_equal(r.cameras[0].lookat, median)
        assert env.unwrapped.mujoco_renderer.default_cam_config is original
        env.render()  # the env's viewer is made; aim it elsewhere
        env.unwrapped.mujoco_renderer._viewers["rgb_array"].cam.lookat[:] = [5.0, -5.0, 2.0]
        with BatchRenderer.from_envs([env], device="cpu", camera={"distance": 3.0}) as r:
            r.render()
            np.testing.assert_array_equal(r.cameras[0].lookat, median)
    finally:
        env.close()


def test_a_camera_config_without_a_lookat_on_a_model_without_geoms_looks_at_the_origin():
    model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><light pos='0 0 3'/></worldbody></mujoco>")
    with BatchRenderer([(model, mujoco.MjData(model))], 16, 16, camera={"distance": 2.0}, device="cpu") as r:
        frame = r.render()
        np.testing.assert_array_equal(r.cameras[0].lookat, 0.0)  # not the median of no geoms: NaN
    assert frame.shape == (1, 16, 16, 3)


def test_a_scene_option_applies_to_every_env():
    hidden = mujoco.MjvOption()
    hidden.geomgroup[:] = 0  # no geoms drawn: only the background
    with BatchRenderer(_pairs(), 16, 16, camera="cam", device="cpu") as plain, \
            BatchRenderer(_pairs(), 16, 16, camera="cam", device="cpu", scene_option=hidden) as bare:
        seen, empty = plain.render(), bare.render()
    assert not torch.equal(seen, empty)
    assert torch.equal(empty[0], empty[1])


def test_a_width_without_a_height_still_refuses_envs_of_other_sizes():
    small, large = (gym.make(HUMANOID_ENV_ID, width=w, height=h) for w, h in ((32, 32), (48, 24)))
    try:
        with pytest.raises(ValueError, match="different sizes"):
            BatchRenderer.from_envs([small, large], width=40, device="cpu")
        with pytest.raises(ValueError, match="different sizes"):
            BatchRenderer.from_envs([small, large], height=40, device="cpu")
    finally:
        small.close()
        large.close()


@pytest.mark.parametrize("wrap", ["VLMRewardVecEnv", "VLMRewardVectorWrapper"])
@pytest.mark.parametrize("render", ["batch", "auto", "images"])
def test_vector_wrappers_name_the_envs_sizes_when_they_differ(wrap, render):
    # In terms of the envs (not of BatchRenderer's width=/height=, which the wrappers do not take): with
    # render="batch" when the wrapper is made; otherwise at the first step, from the frames themselves
    # (a wrapper's render() may resize them), with no warning about the batch renderer first.
    import warnings

    from stable_baselines3.common.vec_env import DummyVecEnv

    import vlmrm_fast

    makers = [lambda: gym.make(HUMANOID_ENV_ID, render_mode="rgb_array", width=32, height=32),
              lambda: gym.make(HUMANOID_ENV_ID, render_mode="rgb_array", width=48, height=24)]
    envs = DummyVecEnv(makers) if wrap == "VLMRewardVecEnv" else gym.vector.SyncVectorEnv(makers)
    fix = r".*make every env with the same width= and height="
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "BatchRenderer could not be built" first
            reward = lambda frames: frames.float().mean(dim=(1, 2, 3))  # noqa: E731
            if render == "batch":
                with pytest.raises(ValueError, match=r"different sizes \[\(32, 32\), \(48, 24\)\] \(width x height\)" + fix):
                    getattr(vlmrm_fast, wrap)(envs, reward, render=render)
                return
            wrapped = getattr(vlmrm_fast, wrap)(envs, reward, render=render)
            if wrap == "VLMRewardVecEnv":  # SB3: one env's action space; gymnasium: the batch's
                wrapped.reset()
                actions = np.zeros((2,) + envs.action_space.shape, np.float32)
            else:
                wrapped.reset(seed=0)
                actions = np.zeros(envs.action_space.shape, np.float32)
            with pytest.raises(ValueError, match=r"different sizes \[\(24, 48\), \(32, 32\)\] \(height x width\)" + fix):
                wrapped.step(actions)
    finally:
        envs.close()


def test_vector_wrappers_take_envs_of_other_sizes_whose_frames_are_one_size():
    # A render() wrapper that crops or resizes makes the envs' frames alike whatever their own sizes:
    # only the frames count (render="auto" then renders the images, not through BatchRenderer).
    from stable_baselines3.common.vec_env import DummyVecEnv

    from vlmrm_fast import VLMRewardVecEnv

    class Cropped(gym.Wrapper):
        def render(self):
            return self.env.render()[:24, :24]

    makers = [lambda w=w, h=h: Cropped(gym.make(HUMANOID_ENV_ID, render_mode="rgb_array", width=w, height=h))
              for w, h in ((32, 32), (48, 24))]
    wrapped = VLMRewardVecEnv(DummyVecEnv(makers), lambda frames: np.asarray(frames, np.float32).mean(axis=(1, 2, 3)),
                              render="auto")
    try:
        wrapped.reset()
        _, rewards, _, _ = wrapped.step(np.zeros((2,) + wrapped.action_space.shape, np.float32))
        assert wrapped.render_source == "images" and rewards.shape == (2,) and np.isfinite(rewards).all()
    finally:
        wrapped.close()


def test_an_env_that_replaced_its_model_is_refused():
    env = gym.make(HUMANOID_ENV_ID, width=32, height=32)
    env.reset(seed=0)
    try:
        with BatchRenderer.from_envs([env], device="cpu") as r:
            r.render()
            model = env.unwrapped.model
            env.unwrapped.model = mujoco.MjModel.from_xml_string(_ONE_CAMERA)
            with pytest.raises(RuntimeError, match="env 0 replaced its MjModel or MjData"):
                r.render()
            env.unwrapped.model = model
    finally:
        env.close()


def test_a_camera_config_without_a_distance_sits_at_the_models_extent():
    # gymnasium's viewer starts a free camera at model.stat.extent; a config without "distance" keeps that.
    pairs = _pairs()
    extent = pairs[0][0].stat.extent
    view = {"elevation": -20.0, "azimuth": 90.0, "lookat": [0.0, 0.0, 0.0]}
    with BatchRenderer(pairs, 24, 24, camera=view, device="cpu") as implicit, \
            BatchRenderer(pairs, 24, 24, camera={**view, "distance": extent}, device="cpu") as explicit:
        assert implicit.cameras[0].distance == pytest.approx(extent)
        assert torch.equal(implicit.render(), explicit.render())


def test_an_env_rendering_from_a_fixed_camera_id_is_drawn_from_it():
    env = gym.make("Ant-v5", render_mode="rgb_array", width=32, height=32, camera_id=0)
    env.reset(seed=0)
    try:
        with BatchRenderer.from_envs([env], device="cpu") as r:
            assert r.cameras[0].type == mujoco.mjtCamera.mjCAMERA_FIXED and r.cameras[0].fixedcamid == 0
            np.testing.assert_array_equal(r.render()[0].numpy(), env.render())
    finally:
        env.close()


# ---- the GPU path's logic on stand-ins for CUDA and the extension (a mutation audit found it untested) ----
# On a machine without CUDA the GPU path's Python side (choosing it, its probe frame and fall-back, slots,
# device placement, cleanup) runs here against: a fake extension whose PboReader reads each frame with
# mjr_readPixels from the MjrContext BatchRenderer made (rows bottom-up, as glReadPixels gives them), and
# a fake torch.cuda whose "CUDA" tensors live on the CPU and say which device they were made for.


class _FakeCudaTensor(torch.Tensor):
    """A CPU tensor standing in for one on a fake CUDA device, or in pinned host memory; notes how it was
    copied into."""

    fake_device = None
    pinned = False
    copied_non_blocking = None

    @property
    def device(self):
        return self.fake_device or torch.device("cpu")

    def is_pinned(self, device=None):
        return self.pinned

    def copy_(self, src, non_blocking=False):
        self.copied_non_blocking = non_blocking
        return super().copy_(src)


def _on_fake_cuda(tensor, device=None, pinned=False):
    tensor = tensor.as_subclass(_FakeCudaTensor)
    tensor.fake_device, tensor.pinned = (torch.device(device) if device else None), pinned
    return tensor


class _FakeEvent:
    def __init__(self):
        self.recorded_on, self.pending = None, False

    def record(self, stream):
        self.recorded_on, self.pending = stream, True

    def synchronize(self):
        self.pending = False


class _FakeCuda:
    """torch.cuda with ``count`` devices; ``current``: the device of the innermost ``device()`` block."""

    def __init__(self, count=2, current_index=0):
        self.count, self.current_index, self.current = count, current_index, None
        self.synchronized, self.events = [], []

    def is_available(self):
        return True

    def device_count(self):
        return self.count

    def current_device(self):
        return self.current_index

    @contextlib.contextmanager
    def device(self, device):
        saved, self.current = self.current, torch.device(device)
        try:
            yield
        finally:
            self.current = saved

    def synchronize(self, device=None):
        self.synchronized.append(torch.device(device))

    def Event(self):  # noqa: N802 - torch.cuda.Event
        self.events.append(_FakeEvent())
        return self.events[-1]

    def current_stream(self, device=None):
        return ("stream", torch.device(device))


class _FakeTorch:
    """batch.py's ``torch``: tensors asked for on a CUDA device are made on the CPU (noted in ``made``)."""

    def __init__(self, cuda):
        self.cuda, self.made = cuda, []

    def empty(self, *size, device=None, pin_memory=False, **kwargs):
        tensor = torch.empty(*size, **kwargs)
        device = torch.device(device or "cpu")
        if device.type == "cuda" or pin_memory:
            tensor = _on_fake_cuda(tensor, device if device.type == "cuda" else None, pin_memory)
        self.made.append((device, pin_memory, tensor))
        return tensor

    def __getattr__(self, name):
        return getattr(torch, name)


def _current_gl():
    from mujoco.egl import egl_ext as EGL

    ctx = EGL.eglGetCurrentContext()
    return ctx.address if ctx else None


class _FakeReader:
    def __init__(self, ext, width, height, capacity, device_index):
        self.ext, self.args = ext, (width, height, capacity, device_index)
        self.frames = np.zeros((capacity, height, width, 3), np.uint8)
        self.reads, self.copies, self.closed = [], [], 0
        self.gl_at_read, self.gl_at_close = [], None

    def read(self, fbo, fbo_resolve, slot):
        if self.ext.fail == "read":
            raise RuntimeError("OpenGL error 0x502 in glReadPixels into the pack buffer")
        width, height, capacity, _ = self.args
        assert 0 <= slot < capacity, f"slot {slot} outside [0, {capacity})"
        con = self.ext.contexts[-1]
        assert (fbo, fbo_resolve) == (con.offFBO, con.offFBO_r)
        self.gl_at_read.append(_current_gl())
        mujoco.mjr_readPixels(self.frames[slot], None, mujoco.MjrRect(0, 0, width, height), con)
        self.reads.append(slot)

    def copy_to(self, out, n):
        assert 0 <= n <= self.args[2] and out.device == torch.device("cuda", self.args[3])
        self.copies.append((self.ext.cuda.current, n))
        out[:n] = torch.from_numpy(self.frames[:n])

    def close(self):
        self.closed += 1
        self.gl_at_close = _current_gl()
        if self.ext.fail == "close":
            raise RuntimeError("close failed")


class _FakeExtension:
    def __init__(self, cuda, torch_):
        self.cuda, self.torch = cuda, torch_
        self.devices, self.fail = [0, 1], None  # devices: what gl_cuda_devices() says
        self.readers, self.contexts, self.gl_contexts = [], [], []

    def gl_cuda_devices(self):
        return list(self.devices)

    def PboReader(self, width, height, capacity, device_index):  # noqa: N802
        self.readers.append(_FakeReader(self, width, height, capacity, device_index))
        return self.readers[-1]


@pytest.fixture
def fake_gpu(monkeypatch):
    """vlmrm_fast.render.batch on a machine with two fake CUDA devices and a fake extension."""
    if os.environ.get("MUJOCO_GL") != "egl":
        pytest.skip("needs MUJOCO_GL=egl")
    import mujoco.egl as megl

    from vlmrm_fast.render import _cuda, batch
    from vlmrm_fast.render.gl_context import _keep_current_gl

    cuda = _FakeCuda(count=2)
    fake_torch = _FakeTorch(cuda)
    ext = _FakeExtension(cuda, fake_torch)
    monkeypatch.setattr(batch, "torch", fake_torch)
    monkeypatch.setattr(_cuda, "_ext", ext)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what _cuda.gpu_unavailable_reason reads
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda.count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: cuda.current_index)  # read by checked_device
    real_context = mujoco.MjrContext

    def recording_context(*args):
        ext.contexts.append(real_context(*args))
        return ext.contexts[-1]

    class RecordingGLContext(megl.GLContext):
        def __init__(self, width, height):
            super().__init__(width, height)
            self.size, self.freed, self.address = (width, height), 0, self._context.address
            ext.gl_contexts.append(self)

        def free(self):
            self.freed += 1
            super().free()

    ext.RealGLContext = megl.GLContext
    monkeypatch.setattr(mujoco, "MjrContext", recording_context)
    monkeypatch.setattr(megl, "GLContext", RecordingGLContext)
    with _keep_current_gl():
        yield ext


def _reference_frames(n, width, height):
    envs = _make_envs(n, width=width, height=height)
    with BatchRenderer.from_envs(envs, device="cpu") as cpu:  # equals env.render() (tests above)
        ref = cpu.render().numpy()
    assert not np.array_equal(ref[0], ref[-1])  # different states: frames are not one frame repeated
    return envs, ref


def test_the_gpu_path_draws_each_env_into_its_slot_on_its_device(fake_gpu):
    envs, ref = _reference_frames(3, 40, 24)  # not square: width and height are not interchangeable
    caller = fake_gpu.RealGLContext(8, 8)  # a context the caller has current (as a gymnasium env's viewer)
    caller.make_current()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = BatchRenderer.from_envs(envs, device="cuda:1")
        assert (r.path, r.bottom_up, r.fallback_reason, r.device) == ("gpu", True, None, torch.device("cuda", 1))
        assert "path='gpu', bottom_up=True" in repr(r)
        assert _current_gl() == caller._context.address  # the caller's context is current again
        [ctx], [reader] = fake_gpu.gl_contexts, fake_gpu.readers
        assert ctx.size == (40, 24) and reader.args == (40, 24, 3, 1)
        # one frame through the whole path at construction, on cuda:1, waited for
        assert reader.reads == [0] and reader.copies == [(torch.device("cuda", 1), 1)]
        assert fake_gpu.cuda.synchronized == [torch.device("cuda", 1)]
        assert not hasattr(r, "_renderer")  # no CPU renderer besides

        fake_gpu.torch.made.clear()
        frames = r.render()
        assert _current_gl() == caller._context.address
        assert reader.reads[1:] == [0, 1, 2] and reader.copies[1:] == [(torch.device("cuda", 1), 3)]
        assert set(reader.gl_at_read) == {ctx.address}  # read with the renderer's own context current
        assert [made[0] for made in fake_gpu.torch.made] == [torch.device("cuda", 1)]
        assert frames.device == torch.device("cuda", 1) and tuple(frames.shape) == (3, 24, 40, 3)
        np.testing.assert_array_equal(frames.flip(1).numpy(), ref)  # bottom-up rows
        out = _on_fake_cuda(torch.zeros((3, 24, 40, 3), dtype=torch.uint8), "cuda:1")
        assert r.render(out=out) is out and torch.equal(out, frames)
        r.close()
        assert _current_gl() == caller._context.address
    finally:
        caller.free()
        for env in envs:
            env.close()


def test_closing_the_gpu_path_frees_its_buffer_and_contexts_once(fake_gpu):
    before = _current_gl()
    r = BatchRenderer(_pairs(), 16, 16, camera="cam", device="cuda:0")
    assert r.path == "gpu"
    [ctx], [reader], [con] = fake_gpu.gl_contexts, fake_gpu.readers, fake_gpu.contexts
    r.close()
    assert reader.closed == 1 and reader.gl_at_close == ctx.address  # the buffer is freed in its context
    assert con.offFBO == 0 and ctx.freed == 1 and _current_gl() == before
    r.close()  # idempotent
    assert reader.closed == 1 and ctx.freed == 1
    with pytest.raises(RuntimeError, match=r"render\(\) after close"):
        r.render()
    # a fault freeing the buffer still frees the EGL context, and is raised once
    fake_gpu.fail = None
    r = BatchRenderer(_pairs(), 16, 16, camera="cam", device="cuda:0")
    fake_gpu.fail = "close"
    with pytest.raises(RuntimeError, match="close failed"):
        r.close()
    assert fake_gpu.gl_contexts[-1].freed == 1
    r.close()
    assert fake_gpu.readers[-1].closed == 1


def test_a_gpu_path_renderer_dropped_unclosed_frees_its_buffer_and_context(fake_gpu):
    import gc

    r = BatchRenderer(_pairs(), 16, 16, camera="cam", device="cuda:0")
    [ctx], [reader] = fake_gpu.gl_contexts, fake_gpu.readers
    del r
    gc.collect()
    assert reader.closed == 1 and ctx.freed == 1  # freed when collected, not only at exit


def test_gpu_path_renderers_left_open_are_closed_at_exit(fake_gpu, monkeypatch):
    from vlmrm_fast.render import batch

    registered = []
    monkeypatch.setattr(batch, "_closing_at_exit", False)
    monkeypatch.setattr(batch, "_open_gpu_renderers", batch.weakref.WeakSet())
    monkeypatch.setattr(batch.atexit, "register", registered.append)
    cpu = BatchRenderer(_pairs(), 16, 16, camera="cam", device="cuda:0", gpu=False)
    assert registered == [] and len(batch._open_gpu_renderers) == 0  # the CPU path holds no CUDA buffer
    closed, left_open, failing = (BatchRenderer(_pairs(), 16, 16, camera="cam", device="cuda:0") for _ in range(3))
    assert registered == [batch._close_open_gpu_renderers]  # once, by the first GPU-path renderer
    closed.close()
    assert set(batch._open_gpu_renderers) == {left_open, failing}
    fake_gpu.fail = "close"  # the first one closed at exit fails: the other is closed all the same
    registered[0]()
    assert [reader.closed for reader in fake_gpu.readers] == [1, 1, 1]
    assert all(ctx.freed == 1 for ctx in fake_gpu.gl_contexts) and len(batch._open_gpu_renderers) == 0
    cpu.close()


@pytest.mark.parametrize("fault", ["devices", "read"])
def test_a_gpu_path_that_cannot_start_frees_what_it_made_and_falls_back(fake_gpu, fault):
    if fault == "devices":
        fake_gpu.devices = [1]  # the EGL context sits on another GPU
        reason = "RuntimeError: the EGL context is not on cuda:0 (CUDA devices behind it: [1]"
    else:
        fake_gpu.fail = "read"  # the probe frame fails
        reason = "RuntimeError: OpenGL error 0x502 in glReadPixels"
    before = _current_gl()
    with pytest.raises(RuntimeError, match=re.escape(f"BatchRenderer GPU path unavailable: {reason}")):
        BatchRenderer(_pairs(), 16, 16, camera="cam", device="cuda:0", gpu=True)
    with pytest.warns(UserWarning, match=re.escape(reason)) as caught:
        r = BatchRenderer(_pairs(), 16, 16, camera="cam", device="cuda:0")
    assert [w.filename for w in caught] == [__file__]
    assert r.path == "cpu" and not r.bottom_up and r.fallback_reason.startswith(reason)
    assert all(ctx.freed == 1 for ctx in fake_gpu.gl_contexts) and len(fake_gpu.gl_contexts) == 2
    assert fake_gpu.contexts[0].offFBO == 0 and fake_gpu.contexts[1].offFBO == 0  # the GPU path's MjrContexts
    assert all(reader.closed == 1 for reader in fake_gpu.readers) and len(fake_gpu.readers) == (fault == "read") * 2
    assert _current_gl() == before
    r.close()


def test_the_cpu_path_to_a_cuda_device_copies_from_pinned_memory_and_waits_before_reuse(fake_gpu):
    envs, ref = _reference_frames(2, 24, 16)
    fake_gpu.torch.made.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # chosen, not fallen back to: no warning
            r = BatchRenderer.from_envs(envs, device="cuda:1", gpu=False)
        assert r.path == "cpu" and r.fallback_reason == "gpu=False" and not fake_gpu.gl_contexts
        assert [made[:2] for made in fake_gpu.torch.made] == [(torch.device("cpu"), True)]  # pinned host frames
        events = fake_gpu.cuda.events
        pending_at_draw = []
        draw = r._renderer.render

        def spy(*args, **kwargs):
            pending_at_draw.append(any(e.pending for e in events))
            return draw(*args, **kwargs)

        r._renderer.render = spy
        first = r.render()
        assert first.device == torch.device("cuda", 1) and first.copied_non_blocking is True
        np.testing.assert_array_equal(first.numpy(), ref)
        assert len(events) == 1 and events[0].pending and events[0].recorded_on == ("stream", torch.device("cuda", 1))
        second = r.render()  # draws into the host buffer the first copy reads: waits for it first
        assert second.data_ptr() != first.data_ptr() and torch.equal(second, first)
        assert pending_at_draw == [False] * 4 and len(events) == 2 and events[1].pending
        r.close()  # waits for the last copy before the buffer goes
        assert not events[1].pending
    finally:
        for env in envs:
            env.close()


def test_the_default_device_and_index_come_from_torch_cuda(fake_gpu):
    fake_gpu.cuda.current_index = 1
    with BatchRenderer(_pairs(), 16, 16, camera="cam") as default, \
            BatchRenderer(_pairs(), 16, 16, camera="cam", device="cuda") as unindexed:
        for r in (default, unindexed):
            assert r.device == torch.device("cuda", 1) and r.path == "gpu"
    with BatchRenderer(_pairs(), 16, 16, camera="cam", device="cpu") as cpu:  # "auto" on the CPU: no GPU path tried
        assert cpu.fallback_reason == "device is cpu" and len(fake_gpu.gl_contexts) == 2


def test_gpu_true_where_the_gpu_path_is_unavailable_says_why():
    reason = gpu_unavailable_reason("cuda:0")
    if reason is None or not HAS_CUDA:  # without CUDA, device='cuda:0' itself is refused (the next test)
        pytest.skip("the GPU path can be tried here" if reason is None else "needs a CUDA device")
    with pytest.raises(RuntimeError, match=re.escape(f"BatchRenderer GPU path unavailable: {reason}")):
        BatchRenderer(_pairs(), 16, 16, device="cuda:0", gpu=True)


@pytest.mark.parametrize("gpu", ["auto", False, True])
def test_a_cuda_device_this_machine_lacks_is_refused_at_construction(monkeypatch, gpu):
    # Not a renderer whose first render() fails in a copy to the device: the mistake is named where it is
    # made, and the model's offscreen buffer is left as it was.
    from vlmrm_fast.render import batch

    model, data = _pairs(1)[0]
    offscreen = (model.vis.global_.offwidth, model.vis.global_.offheight)
    size = offscreen[0] + 8  # grown for the renderer, then put back
    monkeypatch.setattr(batch.torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(ValueError, match=r"device='cuda(:[01])?' but CUDA is not available here; pass device='cpu'"):
            BatchRenderer([(model, data)], size, 16, device=device, gpu=gpu)
    monkeypatch.setattr(batch.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(batch.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device='cuda:2': cuda:2 does not exist: this machine has 2 CUDA devices "
                                         r"\(cuda:0 to cuda:1\); pass one of those"):
        BatchRenderer([(model, data)], size, 16, device="cuda:2", gpu=gpu)
    assert (model.vis.global_.offwidth, model.vis.global_.offheight) == offscreen


def test_gpu_unavailable_reason_names_each_cause(monkeypatch):
    from vlmrm_fast.render import _cuda

    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.setattr(_cuda, "_import_error", "ImportError: undefined symbol _ZN3c10")
    monkeypatch.setattr(_cuda, "_ext", None)
    monkeypatch.setattr(_cuda, "_built", True)
    monkeypatch.setattr(torch.version, "cuda", "12.6")  # a CUDA build of torch (the test suite may run on a CPU one)
    reason = gpu_unavailable_reason()
    assert "is built but does not load (ImportError: undefined symbol _ZN3c10)" in reason
    # Without the variable, a machine with no GPU visible (a login node) skips the rebuild, keeping the old one.
    assert "VLMRM_FAST_FORCE_BUILD=1 pip install -e . --no-build-isolation" in reason
    with monkeypatch.context() as cpu_only:  # a CPU-only torch: setup.py refuses to rebuild, so name the torch to install
        cpu_only.setattr(torch.version, "cuda", None)
        cpu_only.setattr(_cuda, "built_against", lambda: ("2.15.0", "13.0"))
        reason = gpu_unavailable_reason()
        assert "a CPU-only build: install a CUDA build of torch (2.15.0, the one it was built against)" in reason
        assert "rebuild" not in reason
    monkeypatch.setattr(_cuda, "_built", False)
    reason = gpu_unavailable_reason()
    assert "is not built (ImportError" in reason and "VLMRM_FAST_FORCE_BUILD=1 pip install -e . --no-build-isolation" in reason
    # Where there is no GPU that comes first, the extension's state after it; a CPU device is named before both.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = gpu_unavailable_reason("cuda")
    assert reason.startswith("no CUDA device (torch.cuda.is_available() is False); also, the CUDA extension")
    assert "is not built (ImportError" in reason
    assert gpu_unavailable_reason("cpu") == "device cpu is not a CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "is not built (ImportError" in gpu_unavailable_reason("cuda:0")
    assert gpu_unavailable_reason("cuda:1") == "cuda:1 does not exist (1 CUDA devices)"
    monkeypatch.setattr(_cuda, "_ext", object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_unavailable_reason("cuda:0") == "no CUDA device (torch.cuda.is_available() is False)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpu_unavailable_reason("cpu") == "device cpu is not a CUDA device"
    assert gpu_unavailable_reason("cuda:2") == "cuda:2 does not exist (2 CUDA devices)"
    assert gpu_unavailable_reason("cuda:1") is None and gpu_unavailable_reason() is None
    monkeypatch.setenv("MUJOCO_GL", " EGL ")
    assert gpu_unavailable_reason("cuda:1") is None
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    assert gpu_unavailable_reason("cuda:1").startswith("MUJOCO_GL='osmesa': the GPU path renders through EGL")


def test_an_extension_that_is_not_there_is_reported_as_not_built():
    from vlmrm_fast.render import _cuda

    if _cuda.extension() is not None or importlib.util.find_spec("vlmrm_fast._render_cuda") is not None:
        pytest.skip("the extension is built here")
    assert _cuda._built is False and "is not built" in gpu_unavailable_reason()


def test_rendering_unavailable_reason_says_why(monkeypatch):
    def no_renderer(*args, **kwargs):
        raise RuntimeError("no EGL device")

    monkeypatch.setattr(mujoco, "Renderer", type("NoRenderer", (), {"__init__": no_renderer}))
    reason = rendering_unavailable_reason()
    assert reason == f"MuJoCo cannot render here (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): RuntimeError: no EGL device"


def test_the_egl_device_is_chosen_for_the_context_only_where_nobody_chose(monkeypatch):
    import mujoco.egl as megl

    from vlmrm_fast.render.gl_context import _egl_device_for

    monkeypatch.setattr(megl, "EGL_DISPLAY", None)  # no EGL display made yet: the device can still be chosen
    monkeypatch.delenv("MUJOCO_EGL_DEVICE_ID", raising=False)
    with _egl_device_for(1):
        if mujoco_major_version() >= 4:
            assert os.environ["MUJOCO_EGL_DEVICE_ID"] == "1"
        else:
            assert "MUJOCO_EGL_DEVICE_ID" in os.environ
    assert "MUJOCO_EGL_DEVICE_ID" not in os.environ  # only for the context made inside
    monkeypatch.setenv("MUJOCO_EGL_DEVICE_ID", "3")  # the user's choice stands
    with _egl_device_for(1):
        assert os.environ["MUJOCO_EGL_DEVICE_ID"] == "3"
    assert os.environ["MUJOCO_EGL_DEVICE_ID"] == "3"
    monkeypatch.delenv("MUJOCO_EGL_DEVICE_ID")
    monkeypatch.setattr(megl, "EGL_DISPLAY", object())  # a display made earlier fixed the device already
    with _egl_device_for(1):
        assert "MUJOCO_EGL_DEVICE_ID" not in os.environ


def test_a_size_beyond_the_models_offscreen_buffer_grows_it():
    pairs = _pairs()
    model = pairs[0][0]
    model.vis.global_.offwidth, model.vis.global_.offheight = 16, 8
    with BatchRenderer(pairs, 40, 24, camera="cam", device="cpu") as r:
        assert tuple(r.render().shape) == (2, 24, 40, 3)
    assert (model.vis.global_.offwidth, model.vis.global_.offheight) == (40, 24)


@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_each_env_is_drawn_from_its_own_camera(path, request):
    pairs = _pairs()  # one state, two cameras: the frames differ only by the camera
    with BatchRenderer(pairs[:1], 16, 16, device="cpu") as free, \
            BatchRenderer(pairs[:1], 16, 16, camera="cam", device="cpu") as fixed:
        want = torch.cat([free.render(), fixed.render()])
    assert not torch.equal(want[0], want[1])
    if path == "gpu":
        request.getfixturevalue("fake_gpu")
    with BatchRenderer(pairs, 16, 16, camera=[None, "cam"], device="cuda:0" if path == "gpu" else "cpu") as both:
        assert both.path == path
        frames = both.render()
    np.testing.assert_array_equal((frames.flip(1) if path == "gpu" else frames).numpy(), want.numpy())


def test_an_extension_whose_library_cannot_load_is_reported_with_the_loaders_error(monkeypatch):
    # A missing shared library (libcudart of another CUDA) raises OSError, not ImportError, on import:
    # the guard catches it too, and the GPU path's reason names it.
    import importlib.abc
    import importlib.machinery

    from vlmrm_fast.render import _cuda

    class MissingLibrary(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            return importlib.machinery.ModuleSpec(name, self) if name == "vlmrm_fast._render_cuda" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise OSError("libcudart.so.12: cannot open shared object file: No such file or directory")

    for name in ("_ext", "_import_error", "_built"):  # put back as they are after the reload below
        monkeypatch.setattr(_cuda, name, getattr(_cuda, name))
    monkeypatch.delitem(sys.modules, "vlmrm_fast._render_cuda", raising=False)
    # A loaded extension is also an attribute of the package, which `from vlmrm_fast import _render_cuda`
    # finds before any finder is asked (this failed wherever the extension is built).
    monkeypatch.delattr(sys.modules["vlmrm_fast"], "_render_cuda", raising=False)
    monkeypatch.setattr(sys, "meta_path", [MissingLibrary(), *sys.meta_path])
    importlib.reload(_cuda)
    assert _cuda.extension() is None and _cuda._built is True
    reason = gpu_unavailable_reason()
    assert "is built but does not load (OSError: libcudart.so.12: cannot open shared object file" in reason


# ---- vlmrm_fast.llvm_clash on stand-ins for /proc and Triton (a mutation audit found it untested) ----


def test_the_llvm_clash_warning_comes_once_and_only_when_both_hold(monkeypatch):
    from vlmrm_fast import llvm_clash

    monkeypatch.setattr(llvm_clash, "_warned", False)
    monkeypatch.setattr(llvm_clash, "_triton_needed", lambda: True)  # a CUDA device: Triton must load
    for triton_pending, mesa in [(True, False), (False, True), (False, False)]:
        monkeypatch.setattr(llvm_clash, "_triton_not_loaded", lambda: triton_pending)
        monkeypatch.setattr(llvm_clash, "mesa_llvm_loaded", lambda: mesa)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            llvm_clash.guard_triton_load()
    monkeypatch.setattr(llvm_clash, "_triton_not_loaded", lambda: True)
    monkeypatch.setattr(llvm_clash, "mesa_llvm_loaded", lambda: True)
    with pytest.warns(UserWarning, match="import vlmrm_fast .or triton. before the first frame"):
        llvm_clash.guard_triton_load()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llvm_clash.guard_triton_load()  # once a process: each kernel module asks
    assert not llvm_clash.triton_kept_out()


def test_triton_is_kept_out_where_it_may_crash_and_has_nothing_to_run(monkeypatch):
    from vlmrm_fast import llvm_clash

    monkeypatch.setattr(llvm_clash, "_kept_out", False)
    monkeypatch.setattr(llvm_clash, "_triton_needed", lambda: False)  # no CUDA device, no interpreter
    monkeypatch.setattr(llvm_clash, "_triton_not_loaded", lambda: True)
    monkeypatch.setattr(llvm_clash, "mesa_llvm_loaded", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", sys.modules.get("triton"))  # restored after the test
    with pytest.warns(UserWarning, match="keeps it out of this process: `import triton` fails from now on"):
        llvm_clash.guard_triton_load()
    assert llvm_clash.triton_kept_out() and sys.modules["triton"] is None
    from vlmrm_fast import run_info

    monkeypatch.setattr(run_info, "package_version", lambda *names: "3.9.0")
    assert run_info.library_versions("triton", "onnx") == {  # figures must not credit a Triton that never ran
        "triton": "3.9.0 (installed, kept out of this process: vlmrm_fast.llvm_clash)", "onnx": "3.9.0"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llvm_clash.guard_triton_load()  # once
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    from vlmrm_fast.ops import _triton

    monkeypatch.setattr(_triton, "HAS_TRITON", False)  # as a kept-out import leaves it
    with pytest.raises(ValueError, match="kernels='triton' needs Triton, which vlmrm_fast kept out of this process"):
        _triton.resolve_kernels("triton", torch.device("cpu"))
    assert _triton.resolve_kernels("auto", torch.device("cpu")) == "torch"


def test_a_mapped_llvm_is_told_from_proc_self_maps(monkeypatch):
    import io

    from vlmrm_fast import llvm_clash

    maps = {"yes": "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n",
            "no": "7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n"}
    for text, loaded in [("yes", True), ("no", False)]:
        monkeypatch.setattr(llvm_clash, "open", lambda path, text=text: io.StringIO(maps[text]), raising=False)
        assert llvm_clash.mesa_llvm_loaded() is loaded

    def no_proc(path):
        raise PermissionError(13, "Permission denied", path)  # a sandbox without /proc access

    monkeypatch.setattr(llvm_clash, "open", no_proc, raising=False)
    assert llvm_clash.mesa_llvm_loaded() is False


def test_no_llvm_clash_is_feared_where_triton_is_not_installed(monkeypatch):
    # Without the triton package nothing will load a second LLVM: no warning, and no import attempted.
    import sys
    import warnings

    from vlmrm_fast import llvm_clash

    monkeypatch.setattr(llvm_clash, "_warned", False)
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(llvm_clash.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(llvm_clash, "mesa_llvm_loaded", lambda: True)
    assert not llvm_clash._triton_not_loaded()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llvm_clash.guard_triton_load()
    assert not llvm_clash.triton_kept_out()


# ---- behaviours a mutation audit of the CPU rendering path found untested --------------------------


def test_camera_minus_one_is_the_free_camera():
    # gymnasium's camera_id=-1: MuJoCo's default free camera, as camera=None (the id check names -1 as valid).
    with BatchRenderer(_pairs(), 16, 16, camera=-1, device="cpu") as minus_one, \
            BatchRenderer(_pairs(), 16, 16, camera=None, device="cpu") as free:
        assert minus_one.cameras[0].type == mujoco.mjtCamera.mjCAMERA_FREE
        assert torch.equal(minus_one.render(), free.render())


def test_each_envs_visual_options_are_drawn_whether_or_not_its_viewer_was_made():
    # gymnasium's visual_options= (here: centres of mass and joints shown) go into that env's frames; the
    # batch draws them too, per env: from the env's viewer where it was made, else from its renderer's flags.
    flags = {int(mujoco.mjtVisFlag.mjVIS_COM): True, int(mujoco.mjtVisFlag.mjVIS_JOINT): True}
    envs = [_make_envs(1, width=64, height=64, **kwargs)[0] for kwargs in ({}, {"visual_options": flags},
                                                                           {"visual_options": flags})]
    try:
        envs[2].render()  # this one's viewer exists before the renderer is made; env 1's after
        with BatchRenderer.from_envs(envs, device="cpu") as r:
            frames = r.render().numpy()
        own = np.stack([e.render() for e in envs])
        assert not np.array_equal(own[0], own[1])  # the options change the frame (the same state)
        np.testing.assert_array_equal(frames, own)
    finally:
        for env in envs:
            env.close()


def test_a_camera_copied_from_an_env_viewer_or_given_keeps_its_lookat_and_projection():
    # An env rendered before the renderer is made: its viewer's free camera (lookat placed at that first
    # render, the env moved since) is the one copied. A given MjvCamera is copied field by field too.
    envs = [gym.make("InvertedPendulum-v5", render_mode="rgb_array", width=40, height=40) for _ in range(2)]
    try:
        for i, env in enumerate(envs):
            env.reset(seed=i)
            env.render()
            env.action_space.seed(i)
            for _ in range(5):
                env.step(env.action_space.sample())
        with BatchRenderer.from_envs(envs, device="cpu") as r:
            np.testing.assert_array_equal(r.render().numpy(), np.stack([env.render() for env in envs]))
    finally:
        for env in envs:
            env.close()
    view = {"lookat": [0.3, 0.2, 0.1], "distance": 3.0, "elevation": -20.0, "azimuth": 60.0, "orthographic": 1}
    cam = mujoco.MjvCamera()
    for key, value in view.items():
        if key == "lookat":
            cam.lookat[:] = value
        else:
            setattr(cam, key, value)
    with BatchRenderer(_pairs(), 24, 24, camera=cam, device="cpu") as given, \
            BatchRenderer(_pairs(), 24, 24, camera=view, device="cpu") as config, \
            BatchRenderer(_pairs(), 24, 24, camera={**view, "orthographic": 0}, device="cpu") as perspective:
        frames = given.render()
        assert torch.equal(frames, config.render())
        if mujoco_major_version() >= 4:  # before MuJoCo 4, a free camera takes the model's projection
            assert not torch.equal(frames, perspective.render())  # the projection shows


@pytest.mark.parametrize("version", ["3.5.0", None], ids=["mujoco-3", "this-mujoco"])
def test_an_orthographic_free_camera_that_mujoco_ignores_is_named(monkeypatch, version):
    # Before MuJoCo 4 a free camera's orthographic is ignored (the model's projection is drawn): the frames
    # are env.render()'s, but not what the camera asked for.
    if version is not None:
        monkeypatch.setattr(mujoco, "__version__", version)
    ignored = mujoco_major_version() < 4
    view = {"lookat": [0.3, 0.2, 0.1], "distance": 3.0, "orthographic": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BatchRenderer(_pairs(), 24, 24, camera=view, device="cpu").close()
    said = [w for w in caught if "orthographic" in str(w.message)]
    assert len(said) == int(ignored), [str(w.message) for w in said]
    if ignored:
        assert "free camera with its model's projection" in str(said[0].message)
        assert "use mujoco >= 4" in str(said[0].message)
        assert said[0].filename == __file__  # names the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no projection asked for, or a fixed camera: nothing to say
        BatchRenderer(_pairs(), 24, 24, camera={**view, "orthographic": 0}, device="cpu").close()
        BatchRenderer(_pairs(), 24, 24, camera="cam", device="cpu").close()


def test_max_geom_bounds_the_scene(monkeypatch, tmp_path):
    # max_geom=1: room for one geom of the two (a sphere on a plane), so the frame differs from the whole scene.
    monkeypatch.chdir(tmp_path)  # MuJoCo's warning of the full scene goes to MUJOCO_LOG.TXT there
    with BatchRenderer(_pairs(1), 24, 24, camera="cam", device="cpu") as whole, \
            BatchRenderer(_pairs(1), 24, 24, camera="cam", device="cpu", max_geom=1) as one:
        assert not torch.equal(whole.render(), one.render())


def test_a_size_below_the_models_offscreen_buffer_leaves_it():
    # A batch of small frames from envs not yet rendered: their offscreen buffer keeps its size, so their
    # own viewers, made afterwards at the envs' size, still fit.
    [env] = _make_envs(1, width=64, height=48)
    model = env.unwrapped.model
    sizes = (model.vis.global_.offwidth, model.vis.global_.offheight)
    try:
        with BatchRenderer.from_envs([env], width=16, height=16, device="cpu") as r:
            r.render()
        assert (model.vis.global_.offwidth, model.vis.global_.offheight) == sizes
        assert env.render().shape == (48, 64, 3)
    finally:
        env.close()


def test_an_env_without_unwrapped_is_taken_at_the_default_size():
    # Any object holding .model and .data (a simulation class of one's own, not gymnasium's) is an env;
    # without a render size of its own, from_envs draws the CLIP towers' 224 x 224.
    model, data = _pairs(1)[0]
    sim = SimpleNamespace(model=model, data=data)
    with BatchRenderer.from_envs([sim], device="cpu") as r, \
            BatchRenderer([(model, data)], 224, 224, device="cpu") as pair:
        frames = r.render()
        assert tuple(frames.shape) == (1, 224, 224, 3)
        assert torch.equal(frames, pair.render())


def test_leaving_a_with_block_closes_the_renderer():
    with BatchRenderer(_pairs(), 16, 16, camera="cam", device="cpu") as r:
        r.render()
    with pytest.raises(RuntimeError, match="after close"):
        r.render()


def test_close_closes_the_cpu_paths_mujoco_renderer():
    r = BatchRenderer(_pairs(), 16, 16, camera="cam", device="cpu")
    inner = r._renderer
    r.render()
    assert inner._gl_context is not None and inner._mjr_context is not None
    r.close()
    assert inner._gl_context is None and inner._mjr_context is None  # its GL context and MjrContext freed


def test_from_envs_of_no_envs_is_refused_by_name():
    with pytest.raises(ValueError, match="from_envs needs at least one env"):
        BatchRenderer.from_envs(iter([]), device="cpu")


def test_a_renderer_refuses_to_be_pickled_or_copied_naming_the_fix():
    # It holds this process's GL context: copy.deepcopy raised "ctypes objects containing pointers cannot be
    # pickled" (and printed an error from a half-made mujoco.Renderer), pickle "cannot pickle 'MjvCamera' object".
    import copy
    import pickle

    es = _make_envs(1, width=32, height=32)
    with BatchRenderer.from_envs(es, device="cpu") as r:
        frames = r.render()
        for copy_of in (copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=r"BatchRenderer cannot be pickled or copied.*from_envs"):
                copy_of(r)
        assert torch.equal(r.render(), frames)
    es[0].close()
