"""vlmrm_fast.render.BatchRenderer: N MuJoCo envs -> one uint8 tensor [N, H, W, 3].

CPU path: frames equal what each env's own ``env.render()`` gives for the same state (exactly: the
same MuJoCo renderer, camera and options). GPU path (marker ``gpu``): frames equal MuJoCo's own
renderer's frames, in OpenGL row order (``bottom_up``). Tests skip with the reason where EGL
cannot make a context.
"""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import warnings

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

    from vlmrm_fast.render.batch import _keep_current_gl

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
    from vlmrm_fast.render.batch import _keep_current_gl

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


def test_envs_of_another_look_are_refused():
    # Same counts of bodies, geoms, materials and textures, other textures: one upload cannot draw both.
    textured, plain = gym.make(HUMANOID_ENV_ID), gym.make(HUMANOID_ENV_ID, textured=False)
    for env in (textured, plain):
        env.reset(seed=0)
    with pytest.raises(ValueError, match="ONE model.*tex_data"):
        BatchRenderer.from_envs([textured, plain], width=16, height=16, device="cpu")


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



def test_egl_position_of_a_cuda_device():
    """MuJoCo < 4 takes MUJOCO_EGL_DEVICE_ID as a position in EGL's device list: torch's cuda:i is looked
    up there by the driver's CUDA ordinal (physical, through CUDA_VISIBLE_DEVICES, then torch's own)."""
    from vlmrm_fast.render.batch import _egl_cuda_ids, egl_position_of_cuda_device as position

    egl = [None, 2, 0, 3, 1]  # a software device first, then four GPUs in another order than CUDA's
    assert position(egl, 0, None) == 2 and position(egl, 3, None) == 3
    assert position(egl, 0, "3,1") == 3 and position(egl, 1, "3,1") == 4  # physical GPUs 3 and 1
    assert position([None, 1, 0], 0, "5") == 2  # ordinal 5 unknown to EGL: torch's own number, 0
    assert position(egl, 0, "GPU-8a0c1e2f") == 2  # UUIDs: no physical ordinal to look up
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
"""


@pytest.mark.parametrize("first", ["import vlmrm_fast", ""], ids=["package-first", "frame-first"])
def test_the_cause_of_an_llvm_clash_is_named_before_it_crashes(first):
    # Mesa's llvmpipe and Triton each bring an LLVM: Triton loaded after Mesa's GL context crashes the
    # process (a segmentation fault, no message). `import vlmrm_fast` loads Triton first; where a frame
    # came before it, a warning naming the cause and the fix comes out before Triton loads (and the
    # process may then crash). A fresh interpreter each.
    env = dict(os.environ, MUJOCO_GL="egl", PYOPENGL_PLATFORM="egl")
    result = subprocess.run([sys.executable, "-c", _ORDER_SCRIPT.format(first=first)], capture_output=True,
                            text=True, env=env, timeout=300)
    named = "import vlmrm_fast (or triton) before the first frame is rendered" in result.stderr
    if first or "mesa True" not in result.stdout:  # the package first, or a GPU driver's GL: it just works
        assert result.returncode == 0 and "reward" in result.stdout and not named, result.stderr[-2000:]
    else:
        assert named and result.returncode in (0, -signal.SIGSEGV), result.stderr[-2000:]



def test_a_fall_back_from_the_gpu_path_is_announced(envs):
    """Frames asked for on a CUDA device but rendered on the CPU path (extension not built, or built against
    another torch, no CUDA, EGL elsewhere): a warning with the reason, not only ``fallback_reason``."""
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
])
def test_bad_arguments_are_refused(kwargs, error, message):
    args = {**dict(width=16, height=16, device="cpu"), **kwargs}
    with pytest.raises(error, match=message):
        BatchRenderer(_pairs(), **args).close()


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
