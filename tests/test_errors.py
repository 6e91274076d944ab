"""Bad input at the API boundary: a TypeError or ValueError that names the problem and the fix."""
import collections
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import float64_model, reference_reward_from_embeddings, reference_targets
from vlmrm_fast import CLIPReward, Task
from vlmrm_fast.ops._triton import HAS_TRITON, interpreter_enabled


@pytest.fixture
def rm(tiny):
    model, tokenizer = tiny
    return CLIPReward(model, tokenizer, goal="a humanoid robot kneeling", baseline="a humanoid robot",
                      alpha=0.5, device="cpu", kernels="torch", backend="torch")


class _ArrayLike:
    """What numpy can convert but this API does not take as is (a PIL image, say)."""

    def __array__(self, dtype=None, copy=None):
        return np.zeros((8, 8, 3), np.uint8)


@pytest.mark.parametrize(
    "frames,error,match",
    [
        (np.zeros((2, 16, 16, 4), np.uint8), ValueError, r"RGBA.*\[\.\.\., :3\]"),
        (np.zeros((2, 3, 16, 16), np.uint8), ValueError, r"channels first.*transpose"),
        (np.zeros((2, 16, 16, 1), np.uint8), ValueError, r"1 channel.*np\.repeat\(frames, 3, axis=-1\)"),
        (np.zeros((2, 16, 17), np.uint8), ValueError, r"Grayscale frames \[N, H, W\]\?.*np\.repeat"),
        (np.zeros((3, 16, 17), np.uint8), ValueError, r"One frame channels first \[3, H, W\]\?.*transpose\(1, 2, 0\)\[None\]"),
        (np.ma.masked_array(np.zeros((2, 8, 8, 3), np.uint8), mask=True), TypeError, r"masked array.*\.filled\(0\)"),
        (torch.zeros((2, 8, 8, 3), dtype=torch.uint8).to_sparse(), TypeError, r"torch.sparse_coo tensor.*to_dense"),
        (torch.zeros((2, 8, 8, 3), dtype=torch.uint8, device="meta"), ValueError, r"meta device.*no values"),
        ([np.zeros((8, 8, 3), np.uint8), torch.zeros((8, 8, 3), dtype=torch.uint8, device="meta")], ValueError,
         r"frames\[1\] is on the meta device"),
        (np.zeros((2, 16, 16, 2), np.uint8), ValueError, r"3 channels"),
        (np.zeros((16, 16, 3), np.uint8), ValueError, r"one frame.*frames\[None\]"),
        (np.zeros((16, 16, 1), np.uint8), ValueError, r"one frame.*frames\[None\]"),  # one [H, W, 1] frame, not [N, H, W]
        (np.zeros((16, 16, 2), np.uint8), ValueError, r"one frame.*frames\[None\]"),  # not grayscale [N, H, W]
        (np.zeros((1, 2, 16, 16, 3), np.uint8), ValueError, r"rank 4"),
        (np.zeros((2, 16, 16, 3), np.int64), TypeError, r"uint8"),
        (np.zeros((2, 16, 16, 3), np.int8), TypeError, r"numpy int8.*uint8"),  # one byte, but signed: 200 reads as -56
        (np.zeros((2, 16, 16, 3), bool), TypeError, r"numpy bool.*astype\(np\.uint8\) \* 255"),  # not 0 and 1: black
        (torch.zeros((2, 16, 16, 3), dtype=torch.bool), TypeError, r"torch.bool.*to\(torch\.uint8\) \* 255"),
        (torch.zeros((2, 16, 16, 3), dtype=torch.int32), TypeError, r"uint8"),
        (np.full((2, 16, 16, 3), 255.0, np.float32), ValueError, r"\[0, 1\].*uint8"),
        (np.full((2, 16, 16, 3), -0.5, np.float32), ValueError, r"\[0, 1\]"),
        (np.full((2, 16, 16, 3), np.nan, np.float32), ValueError, r"\[0, 1\] \(finite\); found NaN or infinite"),
        (torch.full((2, 16, 16, 3), 0.5).index_put_((torch.tensor(1),), torch.tensor(float("inf"))), ValueError,
         r"found NaN or infinite values"),  # one bad frame among good ones, in torch
        (np.full((1, 16, 16, 3), 255.0, np.float32), ValueError, r"\[0, 1\].*uint8"),  # a batch of one frame too
        ("frames.png", TypeError, r"torch.Tensor or numpy.*use `vlmrm-fast score PATH`"),
        (Path("clip.mp4"), TypeError, r"torch.Tensor or numpy.*use `vlmrm-fast score PATH`"),  # a pathlib path too
        (bytearray(b"frames"), TypeError, r"torch.Tensor or numpy.*got bytearray"),
        (_ArrayLike(), TypeError, r"got _ArrayLike\. Convert it with np\.asarray"),  # a PIL image, say
        ([np.zeros((8, 8, 3), np.uint8), _ArrayLike()], TypeError, r"frames\[1\] is a _ArrayLike.*np\.asarray"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], ValueError, r"share shape"),
        ([np.zeros((8, 8, 3), np.uint8), "x"], TypeError, r"frames\[1\]"),
        ([np.zeros((1, 8, 8, 3), np.uint8)], ValueError, r"single frames \[H, W, 3\]"),
        ([np.zeros((3, 8, 8), np.uint8)], ValueError, r"\[3, H, W\].*permute\(1, 2, 0\)"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)], ValueError, "one dtype per call"),
        (np.zeros((2, 16, 0, 3), np.uint8), ValueError, "zero height or width"),
        (np.zeros((2, 0, 16, 3), np.uint8), ValueError, "zero height or width"),
        (np.zeros((1, 16, 0, 3), np.uint8), ValueError, "zero height or width"),
        ([np.zeros((0, 8, 3), np.uint8)], ValueError, "zero height or width"),
        (np.zeros((2, 16, 16, 3), np.uint16), TypeError, r"numpy uint16.*>> 8"),
        (np.zeros((2, 16, 16, 3), ">u2"), TypeError, r">> 8"),  # big-endian (a TIFF's): 16-bit all the same
        (torch.zeros((2, 16, 16, 3), dtype=torch.uint16), TypeError,  # torch's 16 bits too, a fix torch runs
         r"torch.uint16.*\(frames.to\(torch.int32\) >> 8\).to\(torch.uint8\) \(torch\)"),
        (memoryview(b"frames"), TypeError, r"torch.Tensor or numpy.*got memoryview"),  # sequences, but of bytes
        (collections.UserString("frames.png"), TypeError, r"torch.Tensor or numpy.*got UserString"),
        (np.zeros((2, 16, 16, 3), np.complex64), TypeError, r"numpy complex64"),
    ],
)
def test_bad_frames(rm, frames, error, match):
    with pytest.raises(error, match=match):
        rm(frames)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_frame_is_not_called_0_255_values(rm, bad):
    # Infinity is above 1 but is no sign of 0-255 data: the uint8 hint would send users the wrong way.
    frames = np.full((2, 16, 16, 3), 0.5, np.float32)
    frames[1, 3, 4, 0] = bad
    with pytest.raises(ValueError, match="found NaN or infinite") as raised:
        rm(frames)
    assert "uint8" not in str(raised.value)


def test_the_fixes_bad_frames_name_work(rm):
    # What the grayscale errors tell users to write must give frames rm takes, in numpy and torch.
    gray = np.random.default_rng(0).integers(0, 256, (2, 16, 17), dtype=np.uint8)
    want = rm(np.repeat(gray[..., None], 3, axis=-1))
    one_channel = gray[..., None]
    torch.testing.assert_close(rm(np.repeat(one_channel, 3, axis=-1)), want)
    torch.testing.assert_close(rm(torch.from_numpy(one_channel).expand(-1, -1, -1, 3)), want)
    torch.testing.assert_close(rm(torch.from_numpy(gray)[..., None].expand(-1, -1, -1, 3)), want)


def test_nan_and_inf_embeddings(rm):
    emb = torch.randn(4, rm.embed_dim)
    emb[1, 0] = float("nan")
    emb[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"not finite for 2 of 4 embeddings \(rows 1, 3\)"):
        rm.score(emb)
    with pytest.raises(ValueError, match="all zeros"):
        rm.score(torch.zeros(2, rm.embed_dim))
    with pytest.raises(ValueError, match=r"rows 0\).*norms float32 cannot square.*rescale"):
        rm.score(torch.randn(2, rm.embed_dim) * torch.tensor([[1e20], [1.0]]))


def test_goal_and_direction_views_are_copies(rm):
    # Editing what the properties return must not change the model's rewards (its cached |g|^2, g.u).
    emb = torch.randn(3, rm.embed_dim)
    want = rm.score(emb)
    goals, directions = rm.goals, rm.directions
    goals /= goals.norm(dim=1, keepdim=True)
    directions.zero_()
    assert torch.equal(rm.score(emb), want)


def test_non_finite_tower_output_is_reported_not_returned(rm, monkeypatch):
    monkeypatch.setattr(type(rm.vision_backend), "__call__",
                        lambda self, pixels: torch.full((pixels.shape[0], rm.embed_dim), float("nan")))
    with pytest.raises(ValueError, match="vision tower produced NaN/inf"):
        rm(np.zeros((2, 16, 16, 3), np.uint8))


def test_embed_reports_rows_it_cannot_normalise(rm, monkeypatch):
    # embed promises unit rows: a tower row of zeros (F.normalize would leave it zero), NaN, inf or a
    # norm under MIN_NORM is an error naming the rows, as __call__ gives, not a row returned as is.
    rows = torch.randn(6, rm.embed_dim)
    rows[1] = 0.0
    rows[2, 3] = float("nan")
    rows[3, 0] = float("inf")
    rows[4] = rows[4] / rows[4].norm() * 1e-13
    monkeypatch.setattr(type(rm.vision_backend), "__call__", lambda self, pixels: rows[: pixels.shape[0]])
    with pytest.raises(ValueError, match=r"Embeddings are not finite for 4 of 6 frames \(rows 1, 2, 3, 4\).*"
                                         "vision tower produced NaN/inf"):
        rm.embed(np.zeros((6, 16, 16, 3), np.uint8))
    out = rm.embed(np.zeros((1, 16, 16, 3), np.uint8))  # row 0 alone: a unit row
    assert torch.allclose(out.norm(dim=1), torch.ones(1))


@pytest.mark.parametrize(
    "emb,error,match",
    [
        (np.zeros((2, 32), np.float32), TypeError, "torch.Tensor"),
        (torch.zeros(2, 31), ValueError, r"\[N, 32\]"),
        (torch.zeros(32), ValueError, r"\[N, 32\]"),
        (torch.zeros(2, 32, dtype=torch.int64), TypeError, "floating point"),
        (torch.ones(2, 32).to_sparse(), TypeError, r"sparse_coo tensor: pass embeddings.to_dense\(\)"),
        (torch.ones(2, 32, device="meta"), ValueError, r"embeddings is on the meta device"),
    ],
)
def test_bad_embeddings(rm, emb, error, match):
    with pytest.raises(error, match=match):
        rm.score(emb)


def test_goal_equal_to_baseline(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="same vector.*alpha=0"):
        CLIPReward(model, tokenizer, goal="a humanoid robot", baseline="a humanoid robot", alpha=0.5, device="cpu")
    rm = CLIPReward(model, tokenizer, goal="a humanoid robot", baseline=["a humanoid robot"], alpha=0.0, device="cpu")
    with pytest.raises(ValueError, match="undefined"):
        rm.alpha = 0.1
    assert rm.alpha == 0.0  # a refused change leaves the model as it was


def test_alpha_without_baseline(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="no baseline"):
        CLIPReward(model, tokenizer, goal="kneeling", alpha=0.3, device="cpu")
    # The fix names where alpha=0 goes in each form (a reviewer read a bare "Use alpha=0" as ambiguous).
    rm = CLIPReward(model, tokenizer, goal="kneeling", baseline="standing", alpha=0.2, device="cpu")
    with pytest.raises(ValueError, match=r"no baseline.*Pass alpha=0 \(in Python: to from_pretrained or set_tasks, or as this Task's own alpha"):
        rm.set_tasks(goal="sitting")  # keeps rm.alpha


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf")])
def test_alpha_outside_unit_interval(rm, tiny, alpha):
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        rm.alpha = alpha
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        CLIPReward(*tiny, goal="a", baseline="b", alpha=alpha, device="cpu")
    with pytest.raises(ValueError, match=r"tasks\[0\]\.alpha"):
        rm.set_tasks(tasks=[Task("a", "b", alpha=alpha)])


def test_alpha_type(rm):
    with pytest.raises(TypeError, match="number"):
        rm.alpha = "0.5"
    for ok in (np.float32(0.25), np.int64(1), torch.tensor(0.75), torch.tensor([0.5]), np.array(0.5)):  # one-element arrays too
        rm.alpha = ok
        assert rm.alpha == float(ok)


def test_a_tasks_alpha_takes_what_the_models_alpha_takes(rm):
    # Task(alpha=...) is checked by the same check_alpha, so every value rm.alpha takes works there too and
    # scores as its float (a one-element numpy array failed in torch.tensor with "not a sequence").
    emb = torch.randn(3, rm.embed_dim)
    for ok in (np.float32(0.25), np.int64(1), torch.tensor(0.75), torch.tensor([0.5]), np.array(0.5), np.array([0.5])):
        rm.set_tasks(tasks=[Task("a humanoid robot kneeling", "a humanoid robot", alpha=ok, name="t"),
                            Task("a humanoid robot kneeling", "a humanoid robot", alpha=np.asarray(ok).item(), name="f")])
        scores = rm.score(emb)
        torch.testing.assert_close(scores[:, 0], scores[:, 1])


@pytest.mark.parametrize("bad", [0, -3, 2.5, None, True])
def test_max_batch_size_is_checked_when_set(rm, bad):
    with pytest.raises(ValueError, match="positive integer"):
        rm.max_batch_size = bad
    rm.max_batch_size = np.int64(4)
    assert rm.max_batch_size == 4


BAD_PROMPTS = [
    (dict(goal=[]), ValueError, "empty list"),
    (dict(goal="a", baseline=[]), ValueError, "baseline is an empty list"),
    (dict(goal=["a", 3]), TypeError, "strings only"),
    (dict(goal=7), TypeError, "string or a list"),
    (dict(goal=b"a robot"), TypeError, "string or a list"),
    (dict(goal=bytearray(b"a robot")), TypeError, "string or a list"),
    (dict(), ValueError, "Give a goal prompt"),
    (dict(tasks=[]), ValueError, "tasks is empty"),
    (dict(tasks=[("a", "b")]), TypeError, r"vlmrm_fast.Task"),
    (dict(goal="a", tasks=[Task("a")]), ValueError, "either goal"),
    (dict(tasks=[Task("a", "b", alpha=2.0)]), ValueError, r"tasks\[0\]\.alpha"),
    (dict(tasks=[Task("a", alpha=0.5)]), ValueError, "no baseline"),
    (dict(goal=""), ValueError, "goal has a blank prompt"),
    (dict(goal=["a", " \n"]), ValueError, "goal has a blank prompt"),
    (dict(goal="a", baseline="  "), ValueError, "baseline has a blank prompt .*baseline=None.*leave out --baseline"),
    # sys.argv's decoding of a Latin-1 'café' in a UTF-8 locale: the tokenizer embedded it as something else.
    (dict(goal="a robot", baseline="caf\udce9"), ValueError, r"baseline has a prompt that is not text \('caf\\udce9': "
                                                            r"'\\udce9' is a byte that is not UTF-8"),
]


@pytest.mark.parametrize("kwargs,match", [
    # CLIP's tokenizer reads these as its special tokens: the tower pools at the first end-of-text token, so
    # "kneeling" would count for nothing (the goal embedding that of "a robot"), and "<end_of_text>" alone is the empty text.
    (dict(goal="a robot <end_of_text> kneeling"), r"'<end_of_text>'.*special token.*take it out"),
    (dict(goal=["a robot", "<End_Of_Text>"]), r"'<end_of_text>'.*special token"),
    (dict(goal="a robot", baseline="<start_of_text> a thing"), r"'<start_of_text>'.*special token"),
])
def test_a_prompt_with_clips_special_tokens_is_refused(rm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rm.set_tasks(**kwargs)


def test_a_special_token_is_refused_through_open_clip_tokenize_too(tiny):
    # open_clip.tokenize, the function VLM-RM's code tokenizes with, is CLIP's tokenizer behind a function: the
    # check let it through, and the goal embedded as that of "a robot", without a word.
    import open_clip

    with pytest.raises(ValueError, match=r"'<end_of_text>'.*special token"):
        CLIPReward(tiny[0], open_clip.tokenize, goal="a robot <end_of_text> kneeling", device="cpu", kernels="torch",
                   backend="torch")


BAD_OPTIONS = [
    (dict(device="cuda:0"), ValueError, "CUDA is not available"),
    (dict(dtype="fp8"), ValueError, "dtype="),
    (dict(dtype=torch.int8), ValueError, "not supported"),
    (dict(dtype=torch.float64), ValueError, "not supported"),  # a float, but not a tower precision offered
    (dict(preprocess="bilinear"), ValueError, "preprocess="),
    (dict(kernels="cuda"), ValueError, "kernels="),
    (dict(max_batch_size=0), ValueError, "positive integer"),
    (dict(alpha=1.5), ValueError, r"\[0, 1\]"),
    (dict(alpha=0.5, baseline=None), ValueError, "no baseline"),
    (dict(backend="torch", backend_options={"buckets": (1, 8)}), ValueError, "not options of the 'torch' backend"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_PROMPTS)
def test_bad_prompts(rm, kwargs, error, match):
    with pytest.raises(error, match=match):
        rm.set_tasks(**kwargs)


def test_any_sequence_of_frames_or_prompts_is_taken_as_a_list_is(tiny):
    """Frames and prompts are typed Sequence: a deque of recent frames or a UserList of prompts works."""
    import collections

    model, tokenizer = tiny
    frames = list(np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    make = lambda **prompts: CLIPReward(model, tokenizer, device="cpu", kernels="torch", backend="torch", **prompts)  # noqa: E731
    rm = make(goal=["a robot kneeling", "a kneeling robot"], baseline=("a robot",))
    want = rm(frames)
    torch.testing.assert_close(rm(collections.deque(frames, maxlen=3)), want)
    torch.testing.assert_close(rm(tuple(frames)), want)
    other = make(goal=collections.UserList(["a robot kneeling", "a kneeling robot"]),
                 baseline=collections.deque(["a robot"]))
    torch.testing.assert_close(other(frames), want)
    one = make(goal="a robot kneeling", baseline="a robot")
    torch.testing.assert_close(make(goal=collections.UserString("a robot kneeling"), baseline="a robot")(frames),
                               one(frames))


@pytest.mark.parametrize("kwargs,error,match", BAD_OPTIONS)
def test_bad_options(tiny, kwargs, error, match):
    if kwargs.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    kwargs = {"device": "cpu", "goal": "a", **kwargs}
    with pytest.raises(error, match=match):
        CLIPReward(*tiny, **kwargs)


@pytest.mark.parametrize("kwargs,error,match",
                         [({"goal": "a", "baseline": "b", **k}, e, m) for k, e, m in BAD_OPTIONS] + BAD_PROMPTS)
def test_from_pretrained_checks_its_arguments_before_loading(monkeypatch, kwargs, error, match):
    # A bad alpha found after minutes of loading ViT-bigG-14 is minutes lost.
    if kwargs.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")

    def no_loading(*args, **kw):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("vlmrm_fast.reward.create_clip", no_loading)
    with pytest.raises(error, match=match):
        CLIPReward.from_pretrained("vlmrm-tiny", None, **{"device": "cpu", **kwargs})


@pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
def test_from_pretrained_takes_tasks_from_a_generator():
    # Read once: the early checks and the model would otherwise share one pass over it.
    rm = CLIPReward.from_pretrained("vlmrm-tiny", None, tasks=(Task(g, "a robot", name=g) for g in "ab"),
                                    device="cpu", backend="torch")
    assert rm.task_names == ["a", "b"]


def test_triton_without_a_gpu_names_the_fixes(monkeypatch):
    from vlmrm_fast.ops._triton import resolve_kernels

    monkeypatch.setattr("vlmrm_fast.ops._triton._INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1.*kernels='torch'"):
        resolve_kernels("triton", torch.device("cpu"))
    assert resolve_kernels("auto", torch.device("cpu")) == "torch"


def test_auto_never_picks_the_interpreter(monkeypatch):
    # "auto" is Triton on CUDA devices only: with the interpreter on (this suite's setting) CPU tensors still
    # get the torch path, whose cost is a fraction of the interpreter's (mutation audit).
    from vlmrm_fast.ops import _triton

    monkeypatch.setattr(_triton, "_INTERPRETED", True)
    assert _triton.triton_runs_on(torch.device("cpu")) == HAS_TRITON  # the interpreter could run them
    assert _triton.resolve_kernels("auto", torch.device("cpu")) == "torch"
    assert _triton.resolve_kernels("auto", torch.device("cuda", 0)) == ("triton" if HAS_TRITON else "torch")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_a_broken_triton_interpreter_is_refused_with_the_fix(monkeypatch):
    # Triton 3.0's interpreter under NumPy 2 runs kernels but drops their stores: outputs would be
    # uninitialised memory. The probe must see that, and every Triton entry point refuse to run.
    from vlmrm_fast.ops import _triton
    from vlmrm_fast.ops.preprocess import PreprocessSpec, preprocess
    from vlmrm_fast.ops.score import ScoringTargets, score

    class StoresNothing:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(_triton, "_INTERPRETED", True)
    monkeypatch.setattr(_triton, "_probe_kernel", StoresNothing())
    _triton.interpreter_problem.cache_clear()
    try:
        assert "loses kernel stores" in _triton.interpreter_problem()
        fix = r"numpy<2.*kernels='torch'"
        with pytest.raises(RuntimeError, match=fix):
            _triton.resolve_kernels("triton", torch.device("cpu"))
        targets = ScoringTargets(torch.randn(1, 8), torch.randn(1, 8), torch.tensor([0.5]))
        with pytest.raises(RuntimeError, match=fix):
            score(torch.randn(3, 8), targets, impl="triton")
        spec = PreprocessSpec(size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), mode="vlmrm")
        with pytest.raises(RuntimeError, match=fix):
            preprocess(torch.zeros((2, 12, 12, 3), dtype=torch.uint8), spec, torch.float32, impl="triton")
    finally:
        _triton.interpreter_problem.cache_clear()


@pytest.mark.skipif(not HAS_TRITON or not interpreter_enabled(), reason="the kernels are compiled here, not interpreted")
def test_this_triton_interpreter_passes_the_probe():
    from vlmrm_fast.ops._triton import interpreter_problem

    assert interpreter_problem() is None


def test_kernel_modules_keep_real_annotations():
    # Stringified annotations hide tl.constexpr from Triton 3.0's interpreter, which then fails on
    # every kernel; CI runs a newer Triton, so only this test would notice the import coming back.
    import pathlib
    import re

    import vlmrm_fast

    root = pathlib.Path(vlmrm_fast.__file__).parent
    kernel_modules = [p for p in root.rglob("*.py") if "@triton.jit" in p.read_text()]
    assert len(kernel_modules) >= 3, kernel_modules
    for path in kernel_modules:
        assert not re.search(r"^from __future__ import .*annotations", path.read_text(), re.M), path


def test_a_cuda_device_index_past_the_last_gpu_is_refused_at_the_boundary(monkeypatch):
    """cuda:1 on a one-GPU machine: a clear error naming the devices there are, before torch's
    "invalid device ordinal" from deep inside a copy. Checked without a GPU: only the count is read."""
    from vlmrm_fast import cli
    from vlmrm_fast.profiler.run import resolve_config
    from vlmrm_fast.reward import _resolve_device
    from vlmrm_fast.train.run import _check_sac_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _resolve_device("cuda:0") == torch.device("cuda", 0) and _resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"device='cuda:1': cuda:1 does not exist: this machine has 1 CUDA device "
                                         r"\(cuda:0 to cuda:0\); pass one of those, or device='cuda'"):
        _resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"--device cuda:2: cuda:2 does not exist: this machine has 1 CUDA device"):
        resolve_config(cli.build_parser().parse_args(["bench", "--device", "cuda:2"]))
    with pytest.raises(ValueError, match=r"sac_device='cuda:1': cuda:1 does not exist.*--sac-device cuda"):
        _check_sac_device("cuda:1")
    _check_sac_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"2 CUDA devices \(cuda:0 to cuda:1\)"):
        _resolve_device("cuda:2")


def test_a_name_that_is_no_device_is_refused_with_the_forms_torch_takes(tmp_path, capsys):
    # torch.device raises RuntimeError, which score's command line showed as a traceback.
    from PIL import Image

    from vlmrm_fast import cli
    from vlmrm_fast.reward import _resolve_device

    for name in ("foo", "cuda:x"):
        with pytest.raises(ValueError, match=f"device='{name}' is not a torch device: pass 'cuda', 'cuda:N' or 'cpu'"):
            _resolve_device(name)
    Image.new("RGB", (8, 8)).save(tmp_path / "frame.png")
    argv = ["score", str(tmp_path / "frame.png"), "--model", "vlmrm-tiny", "--pretrained", "none", "--goal", "a",
            "--device", "foo"]
    assert cli.main(argv) != 0
    assert "error: --device foo is not a torch device: pass 'cuda', 'cuda:N' or 'cpu'" in capsys.readouterr().err  # its option


@pytest.mark.parametrize("name", ["mps", "xpu", "meta", "hpu:0"])
def test_a_device_type_other_than_cuda_or_cpu_is_refused_by_name(name, tmp_path, capsys):
    # torch.device takes them; the model then failed deep inside torch (mps: "not linked with support",
    # xpu: a bare AssertionError, meta: "Tensor.item() cannot be called").
    from PIL import Image

    from vlmrm_fast import cli
    from vlmrm_fast.reward import _resolve_device

    kind = name.split(":")[0]
    with pytest.raises(ValueError, match=f"runs on CUDA GPUs and the CPU, not on '{kind}' devices; pass 'cuda'"):
        _resolve_device(name)
    Image.new("RGB", (8, 8)).save(tmp_path / "frame.png")
    argv = ["score", str(tmp_path / "frame.png"), "--model", "vlmrm-tiny", "--pretrained", "none", "--goal", "a",
            "--device", name]
    assert cli.main(argv) != 0
    assert f"not on '{kind}' devices" in capsys.readouterr().err


# ---- behaviours a mutation audit found untested ---------------------------------------------------


def test_default_dtype_is_bfloat16_on_cuda_and_float32_elsewhere():
    # Checked without a GPU: the choice reads only the device's type.
    from vlmrm_fast.reward import _resolve_dtype

    assert _resolve_dtype(None, torch.device("cuda", 0)) == torch.bfloat16
    assert _resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert _resolve_dtype("fp16", torch.device("cuda", 0)) == torch.float16
    assert _resolve_dtype(torch.float32, torch.device("cuda", 0)) == torch.float32


def test_default_max_batch_size_on_cpu_is_32(rm):
    assert rm.max_batch_size == 32


def test_a_refused_set_tasks_leaves_the_old_tasks(rm):
    # rm.alpha is 0.5 and these prompts give no direction: the change is refused as a whole.
    emb = torch.randn(3, rm.embed_dim)
    want, names, goals = rm.score(emb), rm.task_names, rm.goals
    with pytest.raises(ValueError, match="same vector"):
        rm.set_tasks(goal="a robot", baseline="a robot")
    assert rm.task_names == names and torch.equal(rm.goals, goals)
    assert torch.equal(rm.score(emb), want)


def test_set_tasks_takes_an_alpha_with_the_prompts(rm):
    # Prompts that give no direction need alpha 0: set_tasks takes both at once; refused, it changes neither.
    emb = torch.randn(3, rm.embed_dim)
    rm.set_tasks(goal="a robot", baseline="a robot", alpha=0.0)
    assert rm.alpha == 0.0 and rm.tasks[0].goal == "a robot"
    with pytest.raises(ValueError, match="same vector"):
        rm.set_tasks(goal="a robot", baseline="a robot", alpha=0.5)
    assert rm.alpha == 0.0
    rm.set_tasks(goal="a humanoid robot kneeling", baseline="a humanoid robot")  # no alpha: rm.alpha kept
    assert rm.alpha == 0.0
    with pytest.raises(ValueError, match=r"alpha=2.0 is outside \[0, 1\]"):
        rm.set_tasks(goal="a humanoid robot kneeling", baseline="a humanoid robot", alpha=2.0)
    rm.set_tasks(goal="a humanoid robot kneeling", baseline="a humanoid robot", alpha=0.5)
    with torch.no_grad():
        g, u = reference_targets(float64_model(rm.model), rm.tokenizer, ["a humanoid robot kneeling"],
                                 ["a humanoid robot"])
    want = reference_reward_from_embeddings(emb, g, u, 0.5)  # SPEC's reward at the new alpha
    torch.testing.assert_close(rm.score(emb).double(), want, atol=1e-5, rtol=0)


def test_alpha_true_is_not_taken_for_one(rm):
    with pytest.raises(TypeError, match="number"):
        rm.alpha = True
    assert rm.alpha == 0.5


def test_a_baseline_with_tasks_is_refused_not_ignored(rm):
    with pytest.raises(ValueError, match="either goal"):
        rm.set_tasks(baseline="a humanoid robot", tasks=[Task("a humanoid robot kneeling")])


def test_one_task_object_is_taken_as_a_list_of_one(rm):
    rm.set_tasks(tasks=Task("a humanoid robot kneeling", "a humanoid robot", name="kneel"))
    assert rm.task_names == ["kneel"]
    assert rm.score(torch.randn(2, rm.embed_dim)).shape == (2, 1)
    assert rm(np.zeros((2, 16, 16, 3), np.uint8)).shape == (2, 1)  # tasks= keeps its task axis, one task or many


def test_many_non_finite_rows_are_listed_ten_at_most(rm):
    emb = torch.randn(12, rm.embed_dim)
    emb[:, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite for 12 of 12 embeddings \(rows 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\.\)"):
        rm.score(emb)


def test_non_finite_float16_tower_output_suggests_another_dtype(tiny, monkeypatch):
    rm = CLIPReward(*tiny, goal="a", device="cpu", dtype=torch.float16, kernels="torch", backend="torch")
    monkeypatch.setattr(type(rm.vision_backend), "__call__",
                        lambda self, pixels: torch.full((pixels.shape[0], rm.embed_dim), float("inf"), dtype=torch.float16))
    with pytest.raises(ValueError, match=r"float16 can overflow: try dtype=torch\.bfloat16"):
        rm(np.zeros((2, 16, 16, 3), np.uint8))


def test_empty_batches_are_not_checked_for_size_or_range(rm):
    # No frames: no pixels to find out of range, and no frame too small (np.min of nothing would raise).
    assert rm(np.zeros((0, 16, 16, 3), np.float32)).shape == (0,)
    assert rm(np.zeros((0, 0, 0, 3), np.uint8)).shape == (0,)


def test_a_masked_array_with_nothing_masked_is_scored_as_its_data(rm):
    frames = np.random.default_rng(4).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    torch.testing.assert_close(rm(np.ma.masked_array(frames, mask=False)), rm(frames), rtol=0, atol=0)


def test_a_list_mixing_numpy_arrays_and_tensors_is_refused(rm):
    frame = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(TypeError, match=r"frames\[1\] is a Tensor but frames\[0\] a ndarray: one kind per call.*"
                                        r"torch.from_numpy"):
        rm([frame, torch.from_numpy(frame)])


def test_float64_frames_score_as_float32_ones(rm):
    frames = np.random.default_rng(2).random((2, 16, 16, 3))
    torch.testing.assert_close(rm(frames), rm(frames.astype(np.float32)), rtol=0, atol=1e-5)


def test_kernels_torch_is_honoured_even_where_triton_could_run(monkeypatch):
    # kernels='torch' is the fix the errors above name: it must hold with the interpreter on (this
    # suite's setting) and with a broken one, on CPU and CUDA devices alike.
    from vlmrm_fast.ops import _triton

    monkeypatch.setattr(_triton, "interpreter_problem", lambda: "broken")
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        assert _triton.resolve_kernels("torch", device) == "torch"


def test_triton_runs_on_cuda_and_interpreted_cpu_only(monkeypatch):
    from vlmrm_fast.ops import _triton

    monkeypatch.setattr(_triton, "_INTERPRETED", True)
    assert _triton.triton_runs_on(torch.device("cpu")) == _triton.HAS_TRITON
    assert not _triton.triton_runs_on(torch.device("meta"))  # the interpreter reads host memory only
    monkeypatch.setattr(_triton, "_INTERPRETED", False)
    assert not _triton.triton_runs_on(torch.device("cpu"))
    assert _triton.triton_runs_on(torch.device("cuda", 0)) == _triton.HAS_TRITON


def test_launches_are_made_on_the_tensors_gpu():
    # Triton launches on the current CUDA device: on cuda:1 the block must make cuda:1 current (a
    # launch on cuda:0 would read another GPU's addresses). Built without entering: no GPU needed.
    from vlmrm_fast.ops._triton import on_device

    block = on_device(torch.device("cuda", 1))
    assert isinstance(block, torch.cuda.device) and block.idx == 1
    with on_device(torch.device("cpu")):
        pass


def test_the_default_device_is_cuda_where_there_is_one(monkeypatch):
    # Checked without a GPU: the choice reads only whether CUDA is available (and the current device).
    from vlmrm_fast.reward import _resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _resolve_device(None) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("method", ["__call__", "embed", "preprocess"])
@pytest.mark.parametrize("flag", ["yes", np.array([1, 0]), 1, None])
def test_bottom_up_is_one_flag(rm, method, flag):
    # "yes" (or "no") was taken for True, an array of per-frame flags failed inside a cache lookup.
    with pytest.raises(TypeError, match="bottom_up must be True or False"):
        getattr(rm, method)(np.zeros((1, 8, 8, 3), np.uint8), bottom_up=flag)
    getattr(rm, method)(np.zeros((1, 8, 8, 3), np.uint8), bottom_up=np.bool_(True))  # numpy's bool is one


def test_the_constructor_names_a_model_name_or_a_missing_tokenizer(tiny):
    model, tokenizer = tiny
    with pytest.raises(TypeError, match=r"open_clip CLIP model.*got str.*CLIPReward.from_pretrained\('ViT-B-32'"):
        CLIPReward("ViT-B-32", tokenizer, goal="a robot")
    with pytest.raises(TypeError, match=r"open_clip CLIP model.*got Linear"):
        CLIPReward(torch.nn.Linear(2, 2), tokenizer, goal="a robot")
    with pytest.raises(TypeError, match=r"tokenizer must be .*open_clip.get_tokenizer"):
        CLIPReward(model, None, goal="a robot")


@pytest.mark.parametrize("name", [5, "  ", ""])
def test_a_task_name_is_a_non_blank_string(rm, name):
    # An int would read as a column index in the wrappers' task=, a blank name as no label at all.
    with pytest.raises(TypeError, match=r"tasks\[1\].name must be a non-blank string"):
        rm.set_tasks(tasks=[Task(goal="a robot", baseline="a thing"), Task(goal="a dog", baseline="a thing", name=name)])


@pytest.mark.parametrize("method", ["__call__", "embed"])
def test_a_tower_in_training_mode_is_refused_with_the_fix(rm, method):
    # The "torch" backend runs the tower as it is: in training mode an RN50's BatchNorm would normalise by each
    # batch (a frame's reward depending on the others) and change its running statistics for good.
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    want = getattr(rm, method)(frames)
    rm.model.train()
    with pytest.raises(ValueError, match=r"training mode.*rm\.model\.eval\(\)"):
        getattr(rm, method)(frames)
    with pytest.raises(ValueError, match=r"training mode.*rm\.model\.eval\(\)"):
        rm.set_tasks(goal="a robot")  # the text tower's dropout (Hugging Face towers) would make goals random
    rm.model.eval()
    torch.testing.assert_close(getattr(rm, method)(frames), want)
    # One layer of it alone (a partial fine-tune, model.visual.layer4.train()) was let through: its flag is not
    # the tower's.
    rm.model.visual.transformer.resblocks[1].train()
    with pytest.raises(ValueError, match=r"rm\.model\.visual\.transformer\.resblocks\.1 is in training mode.*rm\.model\.eval\(\)"):
        getattr(rm, method)(frames)
    rm.model.eval()
    torch.testing.assert_close(getattr(rm, method)(frames), want)
