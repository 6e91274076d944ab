"""CLIPReward end to end against the float64 reference of SPEC §1 (tests/reference.py).

Tolerance (float32): the tiny tower's float32 forward pass is within ~1e-6 of its float64 pass, the
preprocessing within ~1e-6 (tests/test_preprocess.py) and the scoring within ~1e-7, so rewards meet
the project's 1e-5 bar; a wrong prompt mean, projection or resize costs far more (the reward
spread across these noise frames is ~1e-2).
"""
import copy
import functools
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny
from reference import reference_reward, torch_own_reward
from vlmrm_fast import CLIPReward, Task
from vlmrm_fast.ops._triton import triton_runs_on

GOALS = {
    "one": (["a humanoid robot kneeling"], ["a humanoid robot"]),
    "several": (
        ["a humanoid robot kneeling", "a robot kneeling on the floor", "kneeling"],
        ["a humanoid robot", "a robot standing"],
    ),
}


def _noise(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _reward_model(kernels="triton", **kw):
    model, tokenizer = make_tiny()
    untouched = copy.deepcopy(model)
    kw.setdefault("goal", GOALS["one"][0])
    kw.setdefault("baseline", GOALS["one"][1])
    kw.setdefault("backend", "torch")  # backends are compared with each other in test_backends.py
    return CLIPReward(model, tokenizer, device="cpu", kernels=kernels, **kw), untouched, tokenizer


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("prompts", ["one", "several"])
@pytest.mark.parametrize("h,w", [(480, 480), (400, 600), (224, 224), (97, 131)])  # down, non-square, identity, odd up
def test_float32_matches_reference(kernels, prompts, h, w):
    goal, baseline = GOALS[prompts]
    rm, model, tokenizer = _reward_model(kernels, goal=goal, baseline=baseline, alpha=0.0)
    frames = _noise(3, h, w, seed=h + w)
    for alpha in (0.0, 0.3, 1.0):
        rm.alpha = alpha
        got = rm(frames)
        assert got.shape == (3,) and got.dtype == torch.float32
        want = reference_reward(model, tokenizer, frames, goal, baseline, alpha)
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-5, f"alpha={alpha}: max error {err:.3g}"


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_openclip_preprocessing_matches_reference(kernels):
    goal, baseline = GOALS["several"]
    rm, model, tokenizer = _reward_model(kernels, goal=goal, baseline=baseline, alpha=0.5, preprocess="openclip")
    frames = _noise(2, 400, 600, seed=7)
    want = reference_reward(model, tokenizer, frames, goal, baseline, 0.5, mode="openclip")
    assert (rm(frames).double() - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_at_most_twice_torchs_own(dtype):
    """At bf16/fp16 the tower's rounding dominates; both paths stay within twice PyTorch's own error
    (the exact input rounded, a plain PyTorch tower at that dtype: tests/reference.torch_own_reward)."""
    frames = _noise(4, 400, 600, seed=3)
    goal, baseline = GOALS["several"]
    for kernels in ("triton", "torch"):
        rm, model, tokenizer = _reward_model(kernels, goal=goal, baseline=baseline, alpha=0.5, dtype=dtype)
        want = reference_reward(model, tokenizer, frames, goal, baseline, 0.5)
        own = (torch_own_reward(model, tokenizer, frames, goal, baseline, 0.5, dtype) - want).abs().max().item()
        err = (rm(frames).double() - want).abs().max().item()
        assert 0 < own and err <= 2 * own, (kernels, err, own)


def test_several_tasks_score_like_one_task_each():
    tasks = [
        Task(goal=GOALS["one"][0], baseline=GOALS["one"][1], name="kneel"),
        Task(goal=GOALS["several"][0], baseline=GOALS["several"][1], alpha=1.0),
        Task(goal="a humanoid robot doing the splits"),  # no baseline: alpha 0 only
    ]
    rm, _, _ = _reward_model(goal=None, baseline=None, tasks=tasks[:2] + [Task(tasks[2].goal, alpha=0.0)], alpha=0.3)
    frames = _noise(3, 64, 48, seed=11)
    together = rm(frames)
    assert together.shape == (3, 3)
    assert rm.task_names == ["kneel", GOALS["several"][0][0], "a humanoid robot doing the splits"]
    for k, (goal, baseline, alpha) in enumerate(
        [(GOALS["one"][0], GOALS["one"][1], 0.3), (GOALS["several"][0], GOALS["several"][1], 1.0), (tasks[2].goal, None, 0.0)]
    ):
        rm.alpha = 0.0  # valid for any task; the baseline-less one rejects alpha > 0
        rm.set_tasks(goal=goal, baseline=baseline)
        rm.alpha = alpha
        alone = rm(frames)
        assert alone.shape == (3,)
        assert torch.allclose(together[:, k], alone, atol=1e-6, rtol=0)


def test_single_prompt_alpha_zero_is_cosine_similarity():
    rm, model, tokenizer = _reward_model(goal="a humanoid robot kneeling", baseline=None, alpha=0.0)
    frames = _noise(3, 224, 224, seed=5)
    emb = rm.embed(frames)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-6)
    goal = torch.nn.functional.normalize(model.encode_text(tokenizer(["a humanoid robot kneeling"])).float(), dim=-1)
    assert torch.allclose(rm(frames), (emb @ goal.T)[:, 0], atol=1e-6)


def test_goal_equal_to_baseline_at_alpha_zero():
    # No direction exists (g - b = 0), but at alpha = 0 none is needed: M = I.
    prompt = "a humanoid robot kneeling"
    rm, model, tokenizer = _reward_model("torch", goal=prompt, baseline=prompt, alpha=0.0)
    frames = _noise(3, 97, 131, seed=3)
    want = reference_reward(model, tokenizer, frames, [prompt], [prompt], 0.0)
    assert torch.isfinite(want).all()
    assert (rm(frames).double() - want).abs().max().item() <= 1e-5


def test_embed_then_score_equals_call():
    rm, _, _ = _reward_model(alpha=0.7)
    frames = _noise(5, 100, 90, seed=8)
    assert torch.allclose(rm.score(rm.embed(frames)), rm(frames), atol=1e-6)


def test_chunking_does_not_change_rewards():
    rm, _, _ = _reward_model(alpha=0.5, max_batch_size=2)
    frames = _noise(5, 50, 70, seed=9)
    chunked = rm(frames)
    rm.max_batch_size = 64
    assert torch.allclose(chunked, rm(frames), atol=1e-6, rtol=0)  # BLAS blocking may differ by batch size


def test_ten_thousand_frames_go_through_in_chunks(monkeypatch):
    rm, _, _ = _reward_model(kernels="torch", alpha=0.5, max_batch_size=1000)
    seen = []
    backend_type = type(rm.vision_backend)
    tower = backend_type.__call__

    def spy(self, pixels):
        seen.append(pixels.shape[0])
        return tower(self, pixels[:1]).expand(pixels.shape[0], -1)  # the tower's cost is not under test

    monkeypatch.setattr(backend_type, "__call__", spy)
    rewards = rm(np.random.default_rng(0).integers(0, 256, (10_000, 6, 5, 3), dtype=np.uint8))
    assert rewards.shape == (10_000,) and torch.isfinite(rewards).all()
    assert seen == [1000] * 10


def test_input_kinds_agree():
    """numpy with negative strides, lists of arrays or tensors, torch views: one answer."""
    rm, _, _ = _reward_model(alpha=0.5)
    frames = _noise(3, 40, 60, seed=10)
    want = rm(frames)
    flipped = np.ascontiguousarray(frames[:, ::-1, ::-1])[:, ::-1, ::-1]  # negative strides, same pixels
    assert flipped.strides[1] < 0
    assert torch.equal(rm(flipped), want)
    assert torch.equal(rm(list(frames)), want)
    assert torch.equal(rm([torch.from_numpy(f) for f in frames]), want)
    padded = torch.from_numpy(_noise(3, 44, 64, seed=0))
    padded[:, 2:42, 3:63] = torch.from_numpy(frames)
    assert torch.allclose(rm(padded[:, 2:42, 3:63]), want, atol=1e-6)


def test_unusual_numpy_layouts():
    """Negative strides on size-1 axes, big-endian floats and read-only arrays are read as they are."""
    rm, _, _ = _reward_model(alpha=0.5)
    frames = _noise(1, 1, 50, seed=16)
    want = rm(frames)
    assert torch.equal(rm(frames[::-1]), want)
    assert torch.equal(rm(frames[:, ::-1]), want)
    as_float = frames.astype(np.float32) / 255
    assert torch.allclose(rm(as_float.astype(">f4")), rm(as_float), atol=0)
    read_only = frames.copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(rm(read_only), want)


def _warn_once_here():
    warnings.warn("a caller's show-once warning", UserWarning)


@pytest.mark.parametrize("writeable", [True, False])
def test_numpy_frames_leave_a_callers_show_once_warnings_shown_once(writeable):
    # The conversion of numpy frames silenced torch's read-only warning under warnings.catch_warnings on every
    # call, and leaving that resets Python's record of warnings already shown: a caller's show-once warning
    # (a deprecation in their env, say) came back at every step of a training loop.
    rm, _, _ = _reward_model(alpha=0.5)
    frames = _noise(2, 5, 7, seed=3)
    frames.flags.writeable = writeable
    rm(frames)  # torch's read-only warning, once a process, may be silenced (with that reset) at a first call
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")  # show once per place, as Python does by default
        for _ in range(3):
            _warn_once_here()
            rm(frames)
    assert [str(w.message) for w in shown] == ["a caller's show-once warning"]


def _host_layouts(frames):
    """The same uint8 frames [N, H, W, 3] in every host layout callers pass: name -> input."""
    flipped = np.ascontiguousarray(frames[:, ::-1, ::-1])[:, ::-1, ::-1]  # negative strides, same pixels
    wide = torch.from_numpy(np.pad(frames, ((0, 0), (1, 2), (3, 1), (0, 0))))
    return {
        "numpy": frames,
        "numpy negative strides": flipped,
        "list of numpy views": list(flipped),
        "cpu tensor view": wide[:, 1:-2, 3:-1],
        "list of cpu tensors": [torch.from_numpy(f) for f in frames],
    }


@pytest.mark.parametrize("layout", list(_host_layouts(_noise(1, 2, 2))))
def test_host_frames_are_staged_in_one_contiguous_copy(layout):
    from vlmrm_fast.frames import staged_on_host

    frames = _noise(3, 7, 5, seed=18)
    part = _host_layouts(frames)[layout]
    staged = staged_on_host(part, torch.uint8, pin=False)
    assert staged.is_contiguous() and staged.dtype == torch.uint8
    assert torch.equal(staged, torch.from_numpy(frames))
    source = part[0] if isinstance(part, list) else part
    source = source if isinstance(source, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(source))
    assert staged.data_ptr() != source.data_ptr()  # a copy: the caller may reuse its buffer at once
    as_float = frames.astype(np.float32) / 255  # other byte orders are converted in the same copy
    assert torch.equal(staged_on_host(as_float.astype(">f4"), torch.float32, pin=False), torch.from_numpy(as_float))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_frames_reach_cuda_as_device_frames_do():
    # Host frames go through pinned memory and a non-blocking upload: the rewards must be those of
    # the same frames handed over on the device, chunk after chunk (max_batch_size 2 of 5 frames).
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOALS["one"][0], baseline=GOALS["one"][1], alpha=0.5, device="cuda",
                    dtype=torch.float32, max_batch_size=2)
    frames = _noise(5, 40, 60, seed=19)
    want = rm(torch.from_numpy(frames).cuda())
    for layout, part in _host_layouts(frames).items():
        assert torch.equal(rm(part), want), layout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_score_takes_host_embeddings_on_a_cuda_model():
    # rm.score moves embeddings to the model's device: host ones score as the same ones on the GPU do.
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOALS["one"][0], baseline=GOALS["one"][1], alpha=0.5, device="cuda",
                    dtype=torch.float32)
    embeddings = torch.randn(5, rm.embed_dim, generator=torch.Generator().manual_seed(24))
    torch.testing.assert_close(rm.score(embeddings), rm.score(embeddings.cuda()), rtol=0, atol=0)


def test_text_side_is_float32_whatever_the_model_came_in():
    # Goals are computed in full precision, also from a model handed over in half precision.
    full, tokenizer = make_tiny()
    half = copy.deepcopy(full).half()
    rm_half = CLIPReward(half, tokenizer, goal=GOALS["one"][0], baseline=GOALS["one"][1], alpha=0.5, device="cpu")
    rm_full = CLIPReward(full, tokenizer, goal=GOALS["one"][0], baseline=GOALS["one"][1], alpha=0.5, device="cpu")
    assert next(rm_half.model.transformer.parameters()).dtype == torch.float32
    # The weights were rounded to fp16 once, so the goals differ by that rounding, not by fp16 arithmetic.
    assert torch.allclose(rm_half.goals, rm_full.goals, atol=2e-3)
    assert torch.equal(rm_half.goals, CLIPReward(copy.deepcopy(half).float(), tokenizer, goal=GOALS["one"][0],
                                                 baseline=GOALS["one"][1], alpha=0.5, device="cpu").goals)
    # The tower goes to its own dtype (never through float32), the rest to float32, in the same places.
    names = list(half._modules)
    rm_bf16 = CLIPReward(copy.deepcopy(half), tokenizer, goal="a", device="cpu", dtype=torch.bfloat16, backend="torch")
    assert list(rm_bf16.model._modules) == names
    assert {p.dtype for p in rm_bf16.model.visual.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in rm_bf16.model.named_parameters() if not n.startswith("visual.")} == {torch.float32}


def test_cached_resize_tables_work_outside_inference_mode():
    rm, _, _ = _reward_model(alpha=0.5, kernels="torch")
    frames = _noise(2, 33, 35, seed=17)
    rm(frames)  # builds the tables inside the tower's inference mode
    pixels = rm.preprocess(torch.from_numpy(frames).float().div(255).requires_grad_())
    pixels.sum().backward()


def test_bottom_up_frames():
    rm, _, _ = _reward_model(alpha=0.5)
    frames = _noise(2, 224, 224, seed=12)
    assert torch.allclose(rm(np.ascontiguousarray(frames[:, ::-1]), bottom_up=True), rm(frames), atol=1e-6)


def test_float_frames_in_unit_range():
    rm, _, _ = _reward_model(alpha=0.5)
    frames = _noise(2, 30, 40, seed=13)
    assert torch.allclose(rm(frames.astype(np.float32) / 255), rm(frames), atol=1e-5)


def test_empty_batch_returns_empty_rewards():
    rm, _, _ = _reward_model()
    assert rm(np.zeros((0, 48, 48, 3), np.uint8)).shape == (0,)
    assert rm([]).shape == (0,)
    rm.set_tasks(tasks=[Task("a"), Task("b")])
    assert rm(torch.zeros((0, 10, 10, 3), dtype=torch.uint8)).shape == (0, 2)
    assert rm.embed([]).shape == (0, rm.embed_dim)


def test_alpha_change_takes_effect_on_next_call():
    rm, _, _ = _reward_model(alpha=0.0)
    frames = _noise(2, 32, 32, seed=14)
    before = rm(frames)
    rm.alpha = 1.0
    assert rm.alpha == 1.0
    assert not torch.allclose(before, rm(frames))


@pytest.mark.parametrize("key,value", [("std", float("inf")), ("std", float("nan")), ("mean", float("nan"))])
def test_a_model_whose_mean_or_std_is_not_finite_is_refused(key, value):
    # std = inf made every frame the same pixels (zeros), so every frame the same reward, with no error.
    import open_clip

    model = open_clip.create_model("vlmrm-tiny", force_preprocess_cfg={key: (value,) * 3})
    with pytest.raises(ValueError, match=r"mean and std must be finite numbers"):
        CLIPReward(model, open_clip.get_tokenizer("vlmrm-tiny"), goal="a", device="cpu")


def test_mean_and_std_come_from_the_models_open_clip_config():
    import open_clip

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 0.75)
    torch.manual_seed(0)
    model = open_clip.create_model("vlmrm-tiny", force_preprocess_cfg={"mean": mean, "std": std})
    untouched = copy.deepcopy(model)
    tokenizer = open_clip.get_tokenizer("vlmrm-tiny")
    rm = CLIPReward(model, tokenizer, goal="a", baseline="b", alpha=0.5, device="cpu", kernels="triton", backend="torch")
    assert rm.preprocess_spec.mean == mean and rm.preprocess_spec.std == std
    frames = _noise(2, 50, 50, seed=15)
    want = reference_reward(untouched, tokenizer, frames, ["a"], ["b"], 0.5, mean=mean, std=std)
    assert (rm(frames).double() - want).abs().max().item() <= 1e-5


def test_repr_and_facts():
    rm, _, _ = _reward_model()
    assert rm.image_size == (224, 224) and rm.embed_dim == 32 and rm.kernels == "triton"
    assert "kneeling" in repr(rm) and "quantize" not in repr(rm)


KNEEL = ["a humanoid robot kneeling", "a robot kneeling on the floor", "kneeling"]
STAND = ["a humanoid robot", "a robot standing"]


def _torch_reward(**kwargs) -> CLIPReward:
    model, tokenizer = make_tiny()
    return CLIPReward(model, tokenizer, device="cpu", kernels="torch", backend="torch", **kwargs)


def test_goal_and_direction_match_the_float64_reference():
    # The rewards cannot tell u from -u (M holds u u^T): the public targets are checked on their own.
    from reference import float64_model, reference_targets

    model, tokenizer = make_tiny()
    goal, direction = reference_targets(float64_model(model), tokenizer, KNEEL, STAND)
    rm = _torch_reward(goal=KNEEL, baseline=STAND, alpha=0.5)
    assert (rm.goals[0].double() - goal).abs().max() <= 1e-5
    assert (rm.directions[0].double() - direction).abs().max() <= 1e-5


def test_the_same_prompts_in_another_order_have_no_direction():
    # Their float32 means differ by rounding only (~5e-8): a unit vector made of that noise would be
    # a silent wrong reward.
    with pytest.raises(ValueError, match="same vector"):
        _torch_reward(goal=KNEEL, baseline=KNEEL[::-1], alpha=0.5)


def test_preprocess_and_embed_read_bottom_up_frames():
    rm = _torch_reward(goal="a", baseline="b", alpha=0.5)
    frames = np.random.default_rng(12).integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
    gl_rows = np.ascontiguousarray(frames[:, ::-1])
    torch.testing.assert_close(rm.preprocess(gl_rows, bottom_up=True), rm.preprocess(frames), rtol=0, atol=1e-6)
    torch.testing.assert_close(rm.embed(gl_rows, bottom_up=True), rm.embed(frames), rtol=0, atol=1e-6)


def test_low_precision_embeddings_are_normalised_in_float32():
    # Normalised in bf16, a row's norm would be off by up to ~4e-3 (bf16's half ulp at 1); in float32, ~1e-7.
    rm = _torch_reward(goal="a", dtype=torch.bfloat16)
    frames = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    embeddings = rm.embed(frames)
    assert embeddings.dtype == torch.float32
    assert (embeddings.norm(dim=1) - 1).abs().max().item() <= 1e-6


def test_goals_built_under_autocast_are_float32_unit_vectors():
    # A reward model built (or retargeted) inside a training loop's autocast: the text tower runs outside it
    # (float32 embeddings); normalised in bf16, a goal's norm would be off by up to ~4e-3.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rm = _torch_reward(goal="a red square")
    assert rm.goals.dtype == torch.float32
    assert (rm.goals.norm(dim=-1) - 1).abs().max().item() <= 1e-6


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_callers_autocast_does_not_change_goals_embeddings_or_rewards(backend):
    # A reward computed inside a training loop's mixed precision (torch.autocast on the reward's device): without
    # a guard the text tower, the resize, the tower ("torch") and the score ran in bf16, moving rewards by ~1e-3.
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model, tokenizer = make_tiny()
    kwargs = dict(goal=KNEEL, baseline=STAND, alpha=0.5, device="cpu", kernels="torch", backend=backend)
    rm = CLIPReward(model, tokenizer, **kwargs)
    frames = np.random.default_rng(0).integers(0, 256, (4, 40, 50, 3), dtype=np.uint8)
    embeddings, rewards, pixels = rm.embed(frames), rm(frames), rm.preprocess(frames)
    scores, goals, directions = rm.score(embeddings), rm.goals, rm.directions
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rm.preprocess(frames), pixels)
        assert torch.equal(rm.embed(frames), embeddings)
        assert torch.equal(rm(frames), rewards)
        assert torch.equal(rm.score(embeddings), scores)
        torch.testing.assert_close(rm.score(embeddings), rewards, rtol=0, atol=1e-6)
        rm.set_tasks(goal=KNEEL, baseline=STAND)  # encoded again, inside the autocast
    assert torch.equal(rm.goals, goals) and torch.equal(rm.directions, directions)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_reward_built_inside_a_callers_autocast_scores_as_one_built_outside(backend):
    # from_pretrained or CLIPReward(...) inside a training loop's autocast: the backend's build (the ONNX export,
    # compile's warm-up) ran inside it too, so onnxruntime refused the graph ("Type 'tensor(bfloat16)' of input
    # parameter (/conv1/Cast_output_0) of operator (Conv) ... is invalid").
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    frames = np.random.default_rng(0).integers(0, 256, (4, 40, 50, 3), dtype=np.uint8)
    kwargs = dict(goal=KNEEL, baseline=STAND, alpha=0.5, device="cpu", kernels="torch", backend=backend)
    outside = CLIPReward(*make_tiny(), **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = CLIPReward(*make_tiny(), **kwargs)
        inside.rebuild_backend()
    assert torch.equal(inside(frames), outside(frames))


def test_a_list_of_float_frames_outside_unit_range_is_refused():
    rm = _torch_reward(goal="a")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rm([np.full((8, 8, 3), 255.0, np.float32)])


@pytest.mark.parametrize("bad", [2.0, float("nan")])
@pytest.mark.parametrize("kind", ["tensor", "array", "list"])
def test_float_frames_are_range_checked_in_every_frame(kind, bad):
    # One value out of [0, 1] in the last frame of a batch, not only in the first.
    from vlmrm_fast.frames import as_frame_batch

    frames = torch.rand(3, 4, 5, 3)
    frames[2, 3, 4, 2] = bad
    given = {"tensor": frames, "array": frames.numpy(), "list": list(frames)}[kind]
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        as_frame_batch(given)


@pytest.mark.parametrize("lo, hi, hint", [(-0.03, 1.05, r"overshoot.*frames.clamp\(0, 1\)"),
                                         (0.0, 255.0, "0-255 values, pass them as uint8"), (-0.5, 1.0, "")])
def test_the_range_error_names_the_likely_cause(lo, hi, hint):
    from vlmrm_fast.frames import as_frame_batch

    frames = torch.rand(2, 4, 5, 3)
    frames[0, 0, 0], frames[1, 3, 4] = lo, hi
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] \(finite\); found values in") as error:
        as_frame_batch(frames)
    tail = str(error.value).split("]", 2)[-1]
    assert (re.search(hint, tail) is not None) if hint else ("clamp" not in tail and "uint8" not in tail), tail


def test_score_of_an_array_says_how_to_make_a_tensor(tiny):
    rm = CLIPReward(*tiny, goal="a", device="cpu")
    with pytest.raises(TypeError, match=r"torch.from_numpy\(embeddings\) makes one of an array\); got ndarray"):
        rm.score(np.zeros((2, rm.embed_dim), np.float32))


def test_a_list_of_frames_on_two_devices_is_refused(monkeypatch):
    from vlmrm_fast import frames as frames_module

    # meta stands in for a second device on a machine with one; its own refusal (no values) is set aside here.
    monkeypatch.setattr(frames_module, "check_tensor_holds_data", lambda array, what: None)
    frame = torch.zeros(4, 5, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"frames\[1\] is on meta but frames\[0\] on cpu: one device per call"):
        frames_module.as_frame_batch([frame, torch.empty_like(frame, device="meta")])


def test_numpy_float16_frames_stay_float16():
    from vlmrm_fast.frames import as_frame_batch

    assert as_frame_batch(np.zeros((1, 4, 4, 3), np.float16)).dtype == torch.float16


def test_a_prompt_longer_than_the_context_is_a_warning_not_a_silent_cut():
    """CLIP's tokenizer cuts a prompt past its 77 tokens without a word: the reward would ignore the rest."""
    model, tokenizer = make_tiny()
    fits, cut = "a " * 75, "a " * 76  # one token per word, plus the start and end tokens: 77 and 78
    assert len(tokenizer.encode(fits)) == 75 and tokenizer.context_length == 77
    with pytest.warns(UserWarning, match=r"is 78 tokens long, but the text tower reads 77: .*Shorten it to at most 75"):
        rm = CLIPReward(model, tokenizer, goal=["a humanoid robot", cut], baseline="a robot", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rm.set_tasks(goal=fits, baseline="a robot")


def test_a_prompt_longer_than_the_context_is_a_warning_with_open_clip_tokenize_too():
    # open_clip.tokenize, the function VLM-RM's code passes, has no context_length attribute: it was not measured,
    # and cut the prompt silently.
    import open_clip

    model, _ = make_tiny()
    with pytest.warns(UserWarning, match=r"is 78 tokens long, but the text tower reads 77"):
        CLIPReward(model, open_clip.tokenize, goal="a " * 76, device="cpu")


class _PaddingTokenizer:
    """Stands in for open_clip's HFTokenizer: no start token, one id per word, an end token (2), then
    padding (1) up to ``context_length``, cut there as a Hugging Face tokenizer with truncation=True."""

    context_length = 12

    def __call__(self, texts, context_length=None):
        n = context_length or self.context_length
        rows = [([5 + len(word) for word in text.split()] + [2])[:n] for text in texts]
        return torch.tensor([row + [1] * (n - len(row)) for row in rows])


def test_a_prompt_too_long_for_a_tokenizer_other_than_clips_is_a_warning_too():
    from vlmrm_fast.tasks import _warn_of_cut_prompts

    fits, cut = " ".join(["word"] * 11), " ".join(["word"] * 12)  # with the end token: 12 and 13 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_of_cut_prompts(_PaddingTokenizer(), ["", "a robot", fits])
    with pytest.warns(UserWarning, match=r"'word word .*' is 13 tokens long, but the text tower reads 12"):
        _warn_of_cut_prompts(_PaddingTokenizer(), [fits, cut])
    with pytest.warns(UserWarning, match=r"is at least 48 tokens long"):  # as far as it measures: 4x the context
        _warn_of_cut_prompts(_PaddingTokenizer(), [" ".join(["word"] * 100)])


def test_the_padding_measure_agrees_with_clips_exact_count_at_the_boundary():
    from vlmrm_fast.tasks import _padded_lengths

    _, tokenizer = make_tiny()
    for words in (0, 1, 75, 76, 77):
        prompt = "a " * words
        assert _padded_lengths(tokenizer, [prompt], 4 * 77) == [len(tokenizer.encode(prompt)) + 2] == [words + 2]


def test_a_tokenizer_that_cannot_be_measured_is_not_checked():
    from vlmrm_fast.tasks import _warn_of_cut_prompts

    class NoContextArgument:
        context_length = 4

        def __call__(self, texts):
            return torch.zeros(len(texts), 4, dtype=torch.long)

    class NoContext:
        def __call__(self, texts, context_length=None):
            raise AssertionError("a tokenizer without context_length is not called")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_of_cut_prompts(NoContextArgument(), ["a b c d e f"])
        _warn_of_cut_prompts(NoContext(), ["a b c d e f"])


# ---- behaviours a mutation audit found untested ---------------------------------------------------


def test_preprocess_of_no_frames_is_empty_in_the_towers_dtype():
    rm = _torch_reward(goal="a", dtype=torch.bfloat16)
    out = rm.preprocess(np.zeros((0, 16, 16, 3), np.uint8))
    assert out.shape == (0, 3, 224, 224) and out.dtype == torch.bfloat16


def test_a_long_prompt_given_twice_is_one_warning():
    model, tokenizer = make_tiny()
    cut = "a " * 76
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CLIPReward(model, tokenizer, tasks=[Task(cut, "a robot"), Task([cut, "a robot kneeling"])], device="cpu",
                   backend="torch")
    assert len([w for w in caught if "tokens long" in str(w.message)]) == 1


def test_the_long_prompt_warning_from_set_tasks_points_at_the_callers_line():
    rm = _torch_reward(goal="a")
    with pytest.warns(UserWarning, match="tokens long") as caught:
        rm.set_tasks(goal="a " * 76)
    assert [w.filename for w in caught if "tokens long" in str(w.message)] == [__file__]


@pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
def test_the_long_prompt_warning_from_the_constructor_points_at_the_callers_line():
    model, tokenizer = make_tiny()
    with pytest.warns(UserWarning, match="tokens long") as caught:
        CLIPReward(model, tokenizer, goal="a " * 76, device="cpu", backend="torch")
        CLIPReward.from_pretrained("vlmrm-tiny", None, goal="a " * 76, device="cpu", backend="torch")
    assert [w.filename for w in caught if "tokens long" in str(w.message)] == [__file__, __file__]


def test_preprocess_and_embed_go_through_in_chunks_as_calls_do():
    rm = _torch_reward(goal="a", max_batch_size=2)
    frames = np.random.default_rng(20).integers(0, 256, (5, 20, 30, 3), dtype=np.uint8)
    pixels, embeddings = rm.preprocess(frames), rm.embed(frames)
    assert pixels.shape == (5, 3, 224, 224) and embeddings.shape == (5, rm.embed_dim)
    rm.max_batch_size = 64
    torch.testing.assert_close(pixels, rm.preprocess(frames), rtol=0, atol=1e-6)
    torch.testing.assert_close(embeddings, rm.embed(frames), rtol=0, atol=1e-6)


def test_stacklevel_names_the_first_frame_outside_the_package_folder():
    # vlmrm_fast.callers on functions compiled as if they were files of the package, or of a folder
    # beside it whose name starts the same ("vlmrm_fast_user"), which is not the package.
    import _thread
    import os
    import queue

    from vlmrm_fast import callers

    def load(source, folder):
        namespace = {"stacklevel_outside_package": callers.stacklevel_outside_package}
        exec(compile(source, os.path.join(folder, "module.py"), "exec"), namespace)
        return namespace

    package = load("def warner():\n    return stacklevel_outside_package()\n"
                   "def wrapper(f):\n    return f()\n"
                   "def entry(out):\n    try:\n        out.put(warner())\n    except Exception as e:\n        out.put(e)\n",
                   callers._PACKAGE)
    beside = load("def user(wrapper, warner):\n    return wrapper(warner)\n", callers._PACKAGE.rstrip(os.sep) + "_user")
    assert package["warner"]() == 2  # warner, then this test
    assert package["wrapper"](package["warner"]) == 3  # warner, wrapper, then this test
    assert beside["user"](package["wrapper"], package["warner"]) == 3  # warner, wrapper, then user
    # A thread whose first frame is the package's: the stack ends inside it (no frame outside).
    out = queue.Queue()
    _thread.start_new_thread(package["entry"], (out,))
    assert out.get(timeout=10) == 2


def test_score_gives_one_column_per_task():
    # rm.score is rm(frames) from embeddings: with tasks= it is [N, T] too, each column its own task's.
    rm, _, _ = _reward_model(goal=None, baseline=None, alpha=0.5, tasks=[
        Task(GOALS["one"][0], GOALS["one"][1]), Task(GOALS["several"][0], GOALS["several"][1], alpha=1.0),
        Task("a humanoid robot doing the splits", alpha=0.0)])
    frames = _noise(4, 40, 50, seed=21)
    rewards = rm.score(rm.embed(frames))
    assert rewards.shape == (4, 3)
    torch.testing.assert_close(rewards, rm(frames), rtol=0, atol=1e-6)


def test_bfloat16_frames_score_as_their_float32_values():
    # Float frames come in every torch float dtype, bfloat16 included; bf16 -> float32 is exact, so the
    # same pixels in either dtype are the same tower input (float32 rounding of the resize at most).
    rm = _torch_reward(goal="a", baseline="b", alpha=0.5)
    frames = torch.from_numpy(np.random.default_rng(23).random((2, 20, 30, 3), dtype=np.float32)).bfloat16()
    torch.testing.assert_close(rm(frames), rm(frames.float()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernels", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_runs_on(torch.device("cpu")), reason="needs Triton's CPU interpreter"))])
def test_scores_carry_no_autograd_graph_on_either_kernel_path(kernels):
    # The Triton kernel has no backward: the torch path must not make rewards differentiable either.
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal="a", baseline="b", alpha=0.5, device="cpu", kernels=kernels, backend="torch")
    rewards = rm.score(torch.randn(3, rm.embed_dim, requires_grad=True))
    assert not rewards.requires_grad and rewards.grad_fn is None


_FORKED_WORKER = """
import multiprocessing, sys
import numpy as np, torch
from conftest import make_tiny
from vlmrm_fast import CLIPReward

torch.set_num_threads(2)  # the parent's OpenMP pool has workers (one thread would need none)
model, tokenizer = make_tiny()
rm = CLIPReward(model, tokenizer, goal="a robot kneeling", baseline="a robot", alpha=0.5, device="cpu", backend="torch")
frames = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
want = rm(frames)
context = multiprocessing.get_context("fork")
queue = context.Queue()
worker = context.Process(target=lambda: queue.put(rm(frames).tolist()))
worker.start()
worker.join(60)
if worker.is_alive():
    worker.kill()
    sys.exit("the forked worker hung")
print("equal" if queue.get() == want.tolist() else "differ")
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "register_at_fork"), reason="needs os.fork")
def test_a_forked_worker_scores_after_the_parent_did():
    # gymnasium's AsyncVectorEnv and SubprocVecEnv(start_method="fork") fork the process that made the reward
    # model: GNU OpenMP's thread pool does not survive that, and the worker's first torch op hung for ever.
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _FORKED_WORKER], capture_output=True, text=True, timeout=240,
                          cwd=tests, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "equal", done.stderr[-2000:]


def test_a_second_reward_model_may_not_cast_the_model_the_first_one_runs():
    # CLIPReward casts its model in place: a bf16 one built on a float32 one's model broke that one (a raw
    # dtype error at its next call; built back in float32, its weights had been rounded through bf16).
    import gc

    rm, _, tokenizer = _reward_model(kernels="torch")
    frames = _noise(2, 24, 24, seed=3)
    before = rm(frames)
    with pytest.raises(ValueError, match=r"in use by another CLIPReward, on cpu in torch.float32.*copy.deepcopy"):
        CLIPReward(rm.model, tokenizer, goal="a", device="cpu", dtype="bf16", backend="torch")
    assert rm.model.visual.conv1.weight.dtype == torch.float32 and torch.equal(rm(frames), before)
    same = CLIPReward(rm.model, tokenizer, goal="a", device="cpu:0", dtype="fp32", backend="torch")  # shares it
    with pytest.raises(ValueError, match=r"in torch.float32, and building one on cpu in torch.float32 with fp8 projections"):
        CLIPReward(rm.model, tokenizer, goal="a", device="cpu", backend="torch", backend_options={"quantize": "fp8"})
    for twin in (copy.deepcopy(rm), pickle.loads(pickle.dumps(rm))):  # a copy runs a model of its own, guarded too
        with pytest.raises(ValueError, match=r"in use by another CLIPReward"):
            CLIPReward(twin.model, tokenizer, goal="a", device="cpu", dtype="bf16", backend="torch")
        assert torch.equal(twin(frames), before)
    copied = CLIPReward(copy.deepcopy(rm.model), tokenizer, goal="a", device="cpu", dtype="bf16", backend="torch")
    assert copied.model.visual.conv1.weight.dtype == torch.bfloat16 and torch.equal(rm(frames), before)
    model = rm.model
    del rm, same
    gc.collect()
    CLIPReward(model, tokenizer, goal="a", device="cpu", dtype="bf16", backend="torch")  # no one else runs it now


class _TokenizerReturning:
    """The tiny model's tokenizer, its output changed by ``change`` (a custom tokenizer gone wrong)."""

    def __init__(self, change):
        import open_clip

        self.inner, self.change = open_clip.get_tokenizer("vlmrm-tiny"), change

    def __call__(self, prompts, **kwargs):
        return self.change(self.inner(prompts, **kwargs))


@pytest.mark.parametrize("change,message", [
    (lambda t: t[:1], r"returned 1 rows of tokens for 3 prompts"),  # the goal was the first prompt alone, silently
    (lambda t: t.float(), r"returned torch.float32 of shape"),
    (lambda t: t.tolist(), None),  # a list of id lists is taken as the ids
    (lambda t: torch.cat([t, t[:, :5]], dim=1), r"context length is 82, the text tower's 77"),
    (lambda t: ["a"] * len(t), r"returned a list that is no tensor of token ids"),
], ids=["rows", "float", "list", "context", "strings"])
def test_a_tokenizer_giving_something_else_than_token_ids_is_named(change, message):
    model, tokenizer = make_tiny()
    build = functools.partial(CLIPReward, model, _TokenizerReturning(change), goal=["a robot", "a dog"],
                              baseline="x", alpha=0.5, device="cpu", backend="torch")
    if message is None:
        want = CLIPReward(copy.deepcopy(model), tokenizer, goal=["a robot", "a dog"], baseline="x", alpha=0.5,
                          device="cpu", backend="torch").goals
        torch.testing.assert_close(build().goals, want)
    else:
        with pytest.raises(ValueError, match=message):
            build()


@pytest.mark.parametrize("prompt", ["\x00", "\ufeff", " \ufeff\x00 "])
def test_a_prompt_that_tokenizes_to_nothing_is_refused_as_a_blank_one(prompt):
    # A NUL or a lone byte-order mark (a UTF-8 file read with its BOM) passed the blank check and embedded as "".
    rm, _, _ = _reward_model(kernels="torch")
    with pytest.raises(ValueError, match=r"tokenizes to nothing .*give it words"):
        rm.set_tasks(goal=["a humanoid robot kneeling", prompt])
    rm.set_tasks(goal="a \ufeffrobot")  # a prompt with words keeps them


def test_a_text_tower_with_nan_weights_is_named_when_the_prompts_are_embedded():
    # NaN goals were blamed later on the vision tower, on the embeddings given to score, or on goal = baseline.
    model, tokenizer = make_tiny()
    with torch.no_grad():
        model.token_embedding.weight[:] = float("nan")
    with pytest.raises(ValueError, match=r"the text tower embeds the prompts to NaN/inf.*load good weights"):
        CLIPReward(model, tokenizer, goal="a robot", baseline="x", alpha=0.5, device="cpu", backend="torch")


def test_directions_are_unit_vectors():
    # (A mutation audit: diff / (norm + 1e-6) stayed within the float64 test's 1e-5.)
    rm, _, _ = _reward_model(kernels="torch", goal=None, baseline=None,
                             tasks=[Task(goal="a robot kneeling", baseline="a robot"),
                                    Task(goal="a dog", baseline=["a cat", "an animal"])])
    assert (rm.directions.double().norm(dim=1) - 1).abs().max().item() <= 1e-6


def test_a_goal_close_to_its_baseline_still_has_a_direction(monkeypatch):
    # Means 1e-4 apart are two prompts that differ: the "same vector" refusal is for differences of about
    # float32 rounding (1e-6 and below), not for every near pair. (A mutation audit: a 1e-3 threshold passed.)
    from vlmrm_fast import tasks

    goal = F.normalize(torch.randn(1, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    baseline = F.normalize(goal + 1e-4 * F.normalize(torch.randn(1, 32, generator=torch.Generator().manual_seed(1))), dim=-1)
    monkeypatch.setattr(tasks, "embed_prompts", lambda model, tokenizer, prompts, device: torch.cat([goal, baseline]))
    rm, _, _ = _reward_model(kernels="torch", goal="a", baseline="b", alpha=0.5)
    assert rm._encoded.has_direction == (True,)
    want = F.normalize((goal - baseline).double(), dim=-1)
    torch.testing.assert_close(rm.directions.double(), want, rtol=0, atol=1e-3)  # float32 cancellation of a 1e-4 gap


def test_a_nan_message_lists_ten_rows_without_an_ellipsis():
    rm, _, _ = _reward_model(kernels="torch")
    emb = torch.randn(12, rm.embed_dim)
    emb[:10, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\(rows 0, 1, 2, 3, 4, 5, 6, 7, 8, 9\)") as error:
        rm.score(emb)
    assert "..." not in str(error.value)


def test_a_context_length_attribute_is_no_requirement_where_the_text_tower_does_not_fix_one():
    # open_clip's Hugging Face text towers set model.context_length to the HF config's max_position_embeddings
    # (514 for roberta, 0 for mt5) while their tokenizer gives 77: only CLIP's own positional embedding fixes
    # the length. (A review found those models refused.)
    model, tokenizer = make_tiny()
    model.context_length = 514
    CLIPReward(model, tokenizer, goal="a robot", device="cpu", backend="torch")


def test_a_prompt_that_tokenizes_to_nothing_is_found_with_a_tokenizer_padding_to_the_longest_text():
    from vlmrm_fast.tasks import _first_empty_prompt

    def longest(texts):  # [SOT, one id per word, EOT], padded with 0 to the longest text
        rows = [[1, *(10 + len(word) for word in text.replace("\x00", "").split()), 2] for text in texts]
        width = max(map(len, rows))
        return torch.tensor([row + [0] * (width - len(row)) for row in rows])

    prompts = ["a robot standing up", "\x00"]
    assert _first_empty_prompt(longest, prompts, longest(prompts)) == "\x00"
    assert _first_empty_prompt(longest, prompts[:1], longest(prompts[:1])) is None


def test_rebuild_backend_keeps_the_task_axis_of_a_tasks_reward():
    # rebuild_backend encodes the tasks again: a tasks= reward keeps its [N, T] rewards, each column its own task's
    # (SPEC's reward at that task's alpha), not the first task's alone as [N]. (A mutation audit: encoding them
    # again as the single-task form went unseen; the rebuild tests had one goal= task.)
    tasks = [Task(GOALS["one"][0], GOALS["one"][1], name="kneel"), Task("a humanoid robot doing the splits", alpha=0.0)]
    rm, model, tokenizer = _reward_model(kernels="torch", goal=None, baseline=None, tasks=tasks, alpha=0.5)
    frames = _noise(3, 37, 29, seed=25)
    rm.rebuild_backend()
    rewards = rm(frames)
    assert rewards.shape == (3, 2) and rm.task_names == ["kneel", "a humanoid robot doing the splits"]
    for k, (goal, baseline, alpha) in enumerate([(GOALS["one"][0], GOALS["one"][1], 0.5), ([tasks[1].goal], None, 0.0)]):
        want = reference_reward(model, tokenizer, frames, goal, baseline, alpha)
        assert (rewards[:, k].double() - want).abs().max().item() <= 1e-5, k
    rm.set_tasks(tasks=Task(GOALS["one"][0], GOALS["one"][1]))  # one Task object: still a task axis, [N, 1]
    rm.rebuild_backend()
    assert rm(frames).shape == (3, 1) and rm.score(rm.embed(frames)).shape == (3, 1)


def test_the_tasks_encoded_are_kept_whatever_the_caller_does_to_what_it_passed():
    # A Task is frozen, but the prompt list (or alpha tensor) in it was the caller's object: appending to that list
    # afterwards changed what rm.tasks showed, and rebuild_backend encoded the new prompts without a word.
    goal, baseline, alpha = ["a humanoid robot kneeling"], ["a humanoid robot"], torch.tensor(0.5)
    rm = _torch_reward(tasks=[Task(goal, baseline, alpha=alpha, name="kneel")])
    frames = _noise(2, 16, 16, seed=3)
    want, shown = rm(frames), rm.tasks
    goal.append("a cat")
    baseline[0] = "a dog"
    alpha.fill_(1.0)
    assert rm.tasks == shown and rm.tasks[0].goal == ["a humanoid robot kneeling"] and rm.tasks[0].alpha == 0.5
    rm.rebuild_backend()
    rm.alpha = 0.25  # the task's own alpha (0.5) still overrides it
    torch.testing.assert_close(rm(frames), want)


def test_the_tasks_shown_are_copies_whose_lists_change_nothing():
    # rm.tasks handed out the Task objects the reward encodes from, lists and all: appending to
    # rm.tasks[0].goal changed what rm.tasks showed, and rebuild_backend then scored the new prompts.
    rm = _torch_reward(tasks=[Task(["a humanoid robot kneeling"], ["a humanoid robot"], alpha=0.5, name="kneel")])
    frames = _noise(2, 16, 16, seed=3)
    want = rm(frames)
    rm.tasks[0].goal.append("a cat")
    rm.tasks[0].baseline[0] = "a dog"
    assert rm.tasks == [Task(["a humanoid robot kneeling"], ["a humanoid robot"], alpha=0.5, name="kneel")]
    rm.rebuild_backend()
    torch.testing.assert_close(rm(frames), want)
    rm.set_tasks(tasks=rm.tasks)  # still the way to score them again, changed or not
    torch.testing.assert_close(rm(frames), want)


def test_a_tower_sharing_a_parameter_with_the_text_side_is_placed_not_refused():
    # _place casts the tower to its dtype, then the text side to float32: a parameter both hold ends float32, as
    # it always did (open_clip casts the class embedding to the activations' dtype). The placement check took it
    # for a tower moved to float32 and refused the model at construction, in bf16 or fp16.
    model, tokenizer = make_tiny()
    shared = torch.nn.Parameter(model.visual.class_embedding.detach().clone())
    model.visual.class_embedding = shared
    model.text_extra = torch.nn.Module()
    model.text_extra.p = shared  # a text-side module holding the same parameter
    rm = CLIPReward(model, tokenizer, goal="a robot walking", baseline="a robot", device="cpu",
                    dtype=torch.bfloat16, backend="torch", kernels="torch")
    assert torch.isfinite(rm(np.zeros((2, 64, 64, 3), np.uint8))).all()
    rm.set_tasks(goal="a robot running", baseline="a robot")
    rm.model.visual.half()  # a real move of the tower is still named
    with pytest.raises(ValueError, match=r"rm\.model\.visual is now torch\.float16 on cpu"):
        rm.set_tasks(goal="a robot walking", baseline="a robot")


def test_an_error_of_the_tower_is_not_blamed_on_a_text_side_moved_since_the_goals_were_encoded():
    # The goals are encoded: the text side may go elsewhere (the CPU, to free GPU memory; another dtype) and
    # rm(frames) still scores. An error the tower raised then (out of memory, a hook's) was replaced by "rm.model's
    # text side is now ... move it back", which was not its cause.
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal="a robot walking", baseline="a robot", device="cpu", backend="torch",
                    kernels="torch")
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    rm.model.transformer.to(torch.bfloat16)
    assert torch.isfinite(rm(frames)).all()

    def fail(module, args, out):
        raise RuntimeError("CUDA out of memory (a stand-in)")

    rm.model.visual.register_forward_hook(fail)
    for call in (rm, rm.embed):
        with pytest.raises(RuntimeError, match="out of memory"):
            call(frames)


def test_reward_models_built_on_one_model_from_two_threads_at_once(monkeypatch):
    # The registry of the reward models on each model (which refuses one that would change the model in place
    # under another) was read while another thread's new reward model added itself: "Set changed size during
    # iteration" from the constructor. Here a reader pauses mid-read until the other thread has added, or
    # 0.5 s have passed (it waits on the registry's lock instead).
    import threading
    import weakref

    from vlmrm_fast import reward as reward_module

    class Holder:
        _placement = ("cpu", torch.float32, False)

    added = threading.Event()

    class PausingSet(weakref.WeakSet):
        def __iter__(self):
            for i, item in enumerate(super().__iter__()):
                if i == 0:
                    threading.Thread(target=lambda: (reward_module._register_on_model(late, model), added.set())).start()
                    added.wait(0.5)
                yield item

    model = torch.nn.Linear(1, 1)
    early, more, late = Holder(), Holder(), Holder()
    registry = weakref.WeakKeyDictionary({model: PausingSet([early, more])})
    monkeypatch.setattr(reward_module, "_REWARDS_ON_MODEL", registry)
    reward_module._check_no_other_placement(model, Holder._placement)
    assert added.wait(5) and set(registry[model]) == {early, more, late}
