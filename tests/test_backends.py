"""Vision-tower backends: each against the float64 reference (through CLIPReward) or against the
eager tower, plus ONNX export (uint8 input with folded normalisation) checked in ONNX Runtime.

Tolerances: float32 rewards within 1e-5 of the float64 reference (as tests/test_reward.py argues);
ONNX Runtime against torch on raw embeddings within 1e-4 relative (the issue's bar: ORT reorders
float32 sums, and folding the normalisation into the patch weights rounds them once more).
"""
import functools
import re
import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import DEVICES, EXPORTERS, TINY_COCA, make_tiny, tensorrt_is_float32
from reference import reference_reward
from vlmrm_fast import CLIPReward, create_clip
from vlmrm_fast.backends import BackendError, resolve_backend
from vlmrm_fast.models import preprocess_spec_of
from vlmrm_fast.ops.preprocess import preprocess

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="needs onnxruntime (pip install 'vlmrm-fast[export]')")
GOAL, BASELINE = ["a humanoid robot kneeling", "kneeling"], ["a humanoid robot"]


def _noise(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@needs_ort
@pytest.mark.parametrize("kernels", ["triton", "torch"])  # the fused ops run around every backend
@pytest.mark.parametrize("h,w", [(480, 480), (224, 224)])
def test_onnxruntime_rewards_match_reference(h, w, kernels):
    model, tokenizer = make_tiny()
    untouched = __import__("copy").deepcopy(model)
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu",
                    kernels=kernels, backend="onnxruntime")
    assert rm.backend == "onnxruntime" and rm.vision_backend.build_seconds > 0
    frames = _noise(3, h, w, seed=h)
    want = reference_reward(untouched, tokenizer, frames, GOAL, BASELINE, 0.3)
    assert (rm(frames).double() - want).abs().max().item() <= 1e-5


@needs_ort
@pytest.mark.parametrize("backend,options", [("onnxruntime", {}), ("onnxruntime", {"quantize": "int8"}), ("torch", {})])
def test_a_cpu_reward_model_pickles_and_copies(backend, options):
    # What subprocess envs (SB3's SubprocVecEnv, gymnasium's AsyncVectorEnv) and copy.deepcopy do to a
    # wrapper holding it; ONNX Runtime's session itself cannot be pickled, so the copy starts its own.
    import copy
    import pickle

    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend=backend,
                    backend_options=options)
    frames = _noise(3, 40, 40, seed=5)
    want = rm(frames)
    for copied in (pickle.loads(pickle.dumps(rm)), copy.deepcopy(rm)):
        assert copied.backend == backend and copied.vision_backend is not rm.vision_backend
        assert torch.equal(copied(frames), want)
    if backend == "onnxruntime":  # a copy keeps no graph files, so it cannot be copied again
        with pytest.raises(TypeError, match="copy.*the original"):
            pickle.dumps(copied)
        assert copied.vision_backend.profile_nodes(torch.zeros(1, 3, 32, 32), calls=1) is None


def _load_other_weights(visual):
    visual.load_state_dict(make_tiny(seed=7)[0].visual.state_dict())


def _sgd_step(visual):
    opt = torch.optim.SGD(visual.parameters(), lr=0.5)
    for p in visual.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


def _shift_in_place(visual):
    with torch.no_grad():
        visual.ln_post.bias.add_(0.5)


@needs_ort
@pytest.mark.parametrize("change", [_load_other_weights, _sgd_step, _shift_in_place])
def test_onnxruntime_refuses_frames_once_the_towers_weights_changed_until_rebuilt(change):
    # Its graph holds a copy of the weights: after a change it would score with the old ones (silently
    # unlike "torch" on the same model), while the prompts use the text tower as it is now.
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend="onnxruntime")
    frames = _noise(3, 40, 40, seed=9)
    before = rm(frames)
    copied = __import__("copy").deepcopy(rm)  # a copy watches its own tensors
    change(rm.model.visual)
    with pytest.raises(ValueError, match=r"weights changed.*rm\.rebuild_backend\(\)"):
        rm(frames)
    with pytest.raises(ValueError, match="weights changed"):
        rm.embed(frames)
    assert torch.equal(copied(frames), before)
    for stale in (__import__("copy").deepcopy(rm), __import__("pickle").loads(__import__("pickle").dumps(rm))):
        with pytest.raises(ValueError, match="weights changed"):  # it carries the graph of the old weights
            stale(frames)
    rm.rebuild_backend()
    want = reference_reward(__import__("copy").deepcopy(rm.model), tokenizer, frames, GOAL, BASELINE, 0.3)
    assert (rm(frames).double() - want).abs().max().item() <= 1e-5
    assert (before.double() - want).abs().max().item() > 1e-3  # the change mattered


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=needs_ort)])
def test_a_change_of_the_text_side_refuses_rewards_until_the_tasks_are_encoded_again(backend):
    # The goal and baseline embeddings are the text tower's output, computed once: after a checkpoint
    # loaded into rm.model they would be the old model's, while the image side is the new one's.
    import copy

    model, tokenizer = make_tiny()
    other = make_tiny(seed=7)[0]
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend=backend)
    frames = _noise(3, 40, 40, seed=12)
    before = rm(frames)
    rm.model.load_state_dict(other.state_dict())
    for call in (lambda: rm(frames), lambda: rm.score(torch.randn(2, rm.embed_dim))):
        with pytest.raises(ValueError, match=r"text-side weights changed.*rm\.rebuild_backend\(\).*rm\.set_tasks"):
            call()
    want = reference_reward(copy.deepcopy(other), tokenizer, frames, GOAL, BASELINE, 0.3)
    rm.rebuild_backend()
    assert (rm(frames).double() - want).abs().max().item() <= 1e-5
    assert (before.double() - want).abs().max().item() > 1e-3  # the change mattered
    with torch.no_grad():
        rm.model.text_projection.mul_(2.0)  # the text side alone: set_tasks is enough
    with pytest.raises(ValueError, match="text-side weights changed"):
        rm(frames)
    rm.set_tasks(goal=GOAL, baseline=BASELINE)
    assert (rm(frames).double() - want).abs().max().item() <= 1e-5  # a scaled projection: the same unit goals
    assert rm(frames).shape == (3,)  # one task, as it was


def test_what_the_text_tower_does_not_read_may_change_and_what_replaces_its_weights_is_seen(tiny):
    # A vision fine-tune with open_clip's locked text tower still steps and clamps logit_scale in place.
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend="torch")
    frames = _noise(2, 40, 40, seed=13)
    with torch.no_grad():
        rm.model.logit_scale.clamp_(0, 4.6052)
    rm(frames)
    # load_state_dict(assign=True) puts new tensors in place of the watched ones: no version counter moves.
    rm.model.load_state_dict(make_tiny(seed=7)[0].state_dict(), assign=True)
    with pytest.raises(ValueError, match="text-side weights changed"):
        rm(frames)
    # A tensor the text side shares with the image tower is watched as part of the text side.
    model, tokenizer = make_tiny()
    model.text_projection = model.visual.proj
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend="torch")
    with torch.no_grad():
        rm.model.visual.proj.add_(0.1)
    with pytest.raises(ValueError, match="text-side weights changed"):
        rm(frames)


@needs_ort
def test_weights_moved_into_shared_memory_are_no_change(tiny):
    # torch's multiprocessing pickler (a reward model sent to a Process or an mp.Queue) moves CPU storage into
    # shared memory in place, in the sending process: same values, new addresses.
    import io
    from multiprocessing.reduction import ForkingPickler

    model, tokenizer = tiny
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend="onnxruntime")
    frames = _noise(2, 40, 40, seed=11)
    before = rm(frames)
    ForkingPickler(io.BytesIO()).dump(rm.model.visual)
    rm.model.visual.share_memory()
    assert torch.equal(rm(frames), before)


def test_backends_reading_the_weights_live_need_no_rebuild(tiny):
    model, tokenizer = tiny
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend="torch")
    frames = _noise(2, 40, 40, seed=10)
    _load_other_weights(rm.model.visual)
    want = reference_reward(__import__("copy").deepcopy(rm.model), tokenizer, frames, GOAL, BASELINE, 0.3)
    assert (rm(frames).double() - want).abs().max().item() <= 1e-5


@needs_ort
def test_an_unpickled_onnxruntime_backend_leaves_no_files(tiny, tmp_path, monkeypatch):
    # Subprocess envs' workers end with os._exit, which no cleanup outlives: a copy's graph files
    # (gigabytes for ViT-bigG-14) would stay behind once per worker and run.
    import pickle
    import tempfile

    backend = CLIPReward(*tiny, goal="a", device="cpu", backend="onnxruntime").vision_backend
    blob = pickle.dumps(backend)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    copied = pickle.loads(blob)
    assert list(tmp_path.iterdir()) == [] and copied.session is not None
    assert backend._model_path.exists()  # the original keeps its own until it goes


@needs_ort
def test_an_onnxruntime_backend_removes_its_graph_when_collected_without_a_resource_warning(tiny):
    # The folder lives as long as the backend; TemporaryDirectory's finaliser warned "Implicitly
    # cleaning up" for every reward model collected.
    import gc
    import warnings

    backend = CLIPReward(*tiny, goal="a", device="cpu", backend="onnxruntime").vision_backend
    folder = backend._model_path.parent
    assert folder.is_dir()
    with warnings.catch_warnings(record=True) as caught:  # raised from a finaliser, a warning is only printed
        warnings.simplefilter("always")
        del backend
        gc.collect()
    assert not folder.exists()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]

@needs_ort
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_a_forked_child_leaves_the_parents_onnx_graph_alone(tiny):
    # A forked child (AsyncVectorEnv, SubprocVecEnv(start_method="fork")) that let its inherited backend go, here by
    # rm.rebuild_backend(), hung for ever in ONNX Runtime's freeing of the session, and the inherited finaliser had
    # removed the parent's graph folder: the parent's next copy (a spawn worker, copy.deepcopy) raised FileNotFoundError.
    import copy
    import multiprocessing

    rm = CLIPReward(*tiny, goal="a", baseline="b", alpha=0.5, device="cpu", backend="onnxruntime")
    frames = _noise(2, 32, 32, seed=4)
    want = rm(frames)
    folder = rm.vision_backend._model_path.parent
    child = multiprocessing.get_context("fork").Process(target=rm.rebuild_backend)
    child.start()
    child.join(90)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0 and folder.is_dir()
    assert torch.equal(copy.deepcopy(rm)(frames), want)


def test_a_tensorrt_reward_model_refuses_pickling_naming_the_fix():
    import pickle

    from vlmrm_fast.backends.tensorrt import TensorRTBackend

    with pytest.raises(TypeError, match="backend='tensorrt' cannot be pickled.*build the reward model inside each worker"):
        pickle.dumps(object.__new__(TensorRTBackend))


def test_compile_backend_buckets_pad_and_split():
    model, tokenizer = make_tiny()
    eager = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.5, device="cpu", backend="torch")
    compiled = CLIPReward(make_tiny()[0], tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.5, device="cpu",
                          backend="compile", backend_options={"buckets": (4,)})
    frames = _noise(9, 224, 224, seed=1)  # 4 + 4 + 1: two full buckets and one padded
    assert torch.allclose(compiled(frames), eager(frames), atol=1e-5, rtol=0)
    backend = compiled.vision_backend
    assert backend.buckets == (4,) and set(backend.compile_seconds) == {4} and backend.build_seconds > 0


@pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
@pytest.mark.parametrize("backend", ["torch", "compile", pytest.param("onnxruntime", marks=needs_ort)])
def test_a_tower_that_returns_its_tokens_too_is_scored_on_its_pooled_embedding(monkeypatch, backend):
    # CoCa's tower returns (pooled, tokens); its encode_image keeps the pooled one. "torch" and "compile"
    # failed on the tuple.
    import copy

    from open_clip import factory

    monkeypatch.setitem(factory._MODEL_CONFIGS, "test-tiny-coca", TINY_COCA)
    torch.manual_seed(0)
    model, tokenizer = create_clip("test-tiny-coca", None)
    assert isinstance(model.visual(torch.zeros(1, 3, 64, 64)), tuple)
    want = reference_reward(copy.deepcopy(model), tokenizer, _noise(3, 70, 50, seed=2), GOAL, BASELINE, 0.3)
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend=backend,
                    backend_options={"buckets": (4,)} if backend == "compile" else None)
    assert (rm(_noise(3, 70, 50, seed=2)).double() - want).abs().max().item() <= 1e-5


@pytest.fixture
def counting_compile(monkeypatch):
    """torch.compile through a pass-through compiler backend that counts the graphs it compiles and the
    calls that run one: (compiled, runs), two growing lists (``compiled`` holds each graph's batch sizes
    of 224 x 224 images). Dynamo's caches are cleared around it."""
    import torch._dynamo

    compiled, runs = [], []

    def counting_backend(gm, example_inputs):
        compiled.append(sorted(t.shape[0] for t in example_inputs if t.dim() == 4 and t.shape[1:] == (3, 224, 224)))

        def run(*args):
            runs.append(1)
            return gm.forward(*args)
        return run

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=counting_backend, dynamic=False))
    torch._dynamo.reset()
    yield compiled, runs
    torch._dynamo.reset()


def test_compile_backend_compiles_every_bucket_of_every_instance(counting_compile):
    # Dynamo's graph limits are per function, and every tower shares its class's forward: two towers of
    # 5 buckets each need 10 graphs, against limits set here to 8 (recompiles) and 9 (accumulated; 256
    # by default). Every call must run a compiled graph (counted by a pass-through compiler backend).
    import torch._dynamo

    from vlmrm_fast.backends.compiled import CompileBackend

    config = torch._dynamo.config
    new_names = hasattr(config, "recompile_limit")
    limits = {"recompile_limit": 8, "accumulated_recompile_limit": 9} if new_names else {
        "cache_size_limit": 8, "accumulated_cache_size_limit": 9}
    _, graph_runs = counting_compile
    with config.patch(limits):  # (pytest's monkeypatch leaves torch 2.11's dynamo config broken after its undo)
        for buckets in [(1, 2, 3, 4, 5), (6, 7, 9, 10, 11)]:  # distinct shapes: no graph can be shared
            visual = make_tiny()[0].visual.eval()
            backend = CompileBackend(visual, torch.device("cpu"), torch.float32, (224, 224), max_batch_size=11,
                                     buckets=buckets)
            for bucket in buckets:
                before = len(graph_runs)
                backend(torch.zeros((bucket, 3, 224, 224)))
                assert len(graph_runs) == before + 1, f"bucket {bucket} of {buckets} ran eagerly"


def test_compile_backends_built_in_turn_compile_every_bucket(counting_compile):
    # A sweep (vlmrm-fast bench over models and dtypes) builds a backend, uses it and drops it before the next.
    # Dynamo keeps a dropped backend's graphs cached on the shared forward: they count against the limits, so
    # the third backend's buckets must still compile, not run eagerly (the limits are never lowered).
    import gc

    import torch._dynamo

    from vlmrm_fast.backends.compiled import CompileBackend

    config = torch._dynamo.config
    names = ("recompile_limit", "accumulated_recompile_limit") if hasattr(config, "recompile_limit") else (
        "cache_size_limit", "accumulated_cache_size_limit")
    _, graph_runs = counting_compile
    with config.patch({names[0]: 8, names[1]: 256}):
        for buckets in [(1, 2, 3, 4, 5), (6, 7, 9, 10, 11), (12, 13, 14, 15, 16)]:
            backend = CompileBackend(make_tiny()[0].visual.eval(), torch.device("cpu"), torch.float32, (224, 224),
                                     max_batch_size=16, buckets=buckets)
            for bucket in buckets:
                before = len(graph_runs)
                backend(torch.zeros((bucket, 3, 224, 224)))
                assert len(graph_runs) == before + 1, f"bucket {bucket} of {buckets} ran eagerly"
            del backend
            gc.collect()


def test_compile_backend_warmup_compiles_the_graphs_real_calls_run(counting_compile):
    # CLIPReward's calls bring inference tensors (preprocessed under inference mode); dynamo guards on
    # that, so a warm-up on other tensors would compile graphs no call runs, and every bucket twice.
    compiled, runs = counting_compile
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.5, device="cpu",
                    backend="compile", backend_options={"buckets": (2, 4)})
    assert rm.vision_backend.warmup([3]) == {4: pytest.approx(rm.vision_backend.build_seconds)}  # 3 is in bucket 4
    seconds = rm.vision_backend.warmup()
    assert sorted(seconds) == [2, 4] and sorted(compiled) == [[2], [4]]
    assert rm.vision_backend.build_seconds == pytest.approx(sum(seconds.values()))
    frames = _noise(7, 224, 224)
    before = len(runs)
    rm(frames)  # 4 + 3 (padded to 4)
    rm(frames[:2])
    rm.vision_backend(torch.zeros((4, 3, 224, 224)))  # a tensor made outside inference mode, as a user may pass
    assert len(compiled) == 2 and len(runs) == before + 4  # no further graph; every call ran a compiled one
    assert rm.vision_backend.warmup() == seconds  # nothing left to compile


def test_compile_backend_sees_hooks_registered_or_removed_after_its_graphs(counting_compile):
    # Dynamo does not guard against forward hooks being added (skip_nnmodule_hook_guards): a graph traced without
    # them ran on without a hook registered since (on a layer of the tower, or a global one), scoring silently
    # otherwise than "torch" and the model itself do.
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.5, device="cpu",
                    backend="compile", backend_options={"buckets": (4,)})
    frames = _noise(3, 224, 224, seed=3)
    pixels = rm.preprocess(frames)

    def tower():
        with torch.inference_mode():
            return rm.model.visual(pixels)

    def double(module, args):
        return (args[0] * 2,)

    plain = tower()
    handle = rm.model.visual.transformer.resblocks[1].register_forward_pre_hook(double)
    hooked = tower()
    assert (hooked - plain).abs().max() > 1e-2
    assert torch.allclose(rm.embed(frames), torch.nn.functional.normalize(hooked, dim=-1), atol=1e-5)
    handle.remove()
    assert torch.allclose(rm.embed(frames), torch.nn.functional.normalize(plain, dim=-1), atol=1e-5)
    for register in (rm.model.visual.transformer.resblocks[1].register_forward_pre_hook,
                     torch.nn.modules.module.register_module_forward_pre_hook):
        handle = register(lambda module, args: double(module, args) if module is rm.model.visual.transformer.resblocks[1]
                          else None)
        try:
            assert torch.allclose(rm.embed(frames), torch.nn.functional.normalize(hooked, dim=-1), atol=1e-5)
        finally:
            handle.remove()
    assert torch.allclose(rm.embed(frames), torch.nn.functional.normalize(plain, dim=-1), atol=1e-5)


def test_compile_backend_walks_the_tower_for_hooks_only_after_one_was_registered(counting_compile, monkeypatch):
    # The walk costs about 25 us a call for ViT-B-32: it runs again only once a hook handle has been made since
    # the last walk that found none, and while one it found is still there; otherwise the compiled graph runs.
    from vlmrm_fast.backends import compiled as compiled_module

    _, runs = counting_compile
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.5, device="cpu",
                    backend="compile", backend_options={"buckets": (4,)})
    walks = []
    real_walk = compiled_module._inner_hooks
    monkeypatch.setattr(compiled_module, "_inner_hooks", lambda visual: walks.append(1) or real_walk(visual))
    frames = _noise(3, 224, 224, seed=4)

    def embed_counting():
        walks.clear()
        runs.clear()
        rm.embed(frames)
        return len(walks), len(runs)

    embed_counting()
    assert embed_counting() == (0, 1)  # nothing registered since: no walk, the compiled graph
    handle = rm.model.visual.transformer.resblocks[0].register_forward_hook(lambda module, args, out: None)
    assert embed_counting() == (1, 0) and embed_counting() == (1, 0)  # eager while the hook is there
    handle.remove()
    assert embed_counting() == (1, 1) and embed_counting() == (0, 1)
    other = torch.nn.Linear(2, 2).register_forward_hook(lambda module, args, out: None)  # not the tower's
    assert embed_counting() == (1, 1) and embed_counting() == (0, 1)
    other.remove()


def _errors_against_reference(frames, dtype, backend, device="cuda", **backend_kwargs):
    """(the ``backend`` reward model, its largest reward error, eager torch's) against the float64
    reference, both at ``dtype`` on ``device``: the bar "within twice eager's own error" of the GPU
    tests below (argued in tests/test_reward.py)."""
    model, tokenizer = make_tiny()
    want = reference_reward(model, tokenizer, frames, GOAL, BASELINE, 0.5)  # before CLIPReward casts the model
    common = dict(goal=GOAL, baseline=BASELINE, alpha=0.5, device=device, dtype=dtype)
    eager = CLIPReward(make_tiny()[0], tokenizer, backend="torch", **common)
    rm = CLIPReward(model, tokenizer, backend=backend, **backend_kwargs, **common)
    on_device = torch.from_numpy(frames).to(device)
    errors = [(r(on_device).double().cpu() - want).abs().max().item() for r in (rm, eager)]
    return rm, errors[0], errors[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_backend_with_cuda_graphs_within_twice_eager_bf16_error():
    # bf16 on the GPU, the compile backend's real use: CUDA graphs ("reduce-overhead") over a padded
    # bucket. Inductor fuses and reorders, so it may round differently from eager, but not worse than
    # twice eager's own bf16 error against the float64 reference.
    frames = _noise(9, 224, 224, seed=5)  # 4 + 4 + 1 (padded): three replays of one graph
    compiled, err_compiled, err_eager = _errors_against_reference(
        frames, torch.bfloat16, "compile", backend_options={"buckets": (4,)})
    assert compiled.vision_backend.mode == "reduce-overhead"
    assert err_compiled <= 2 * err_eager + 1e-6, (err_compiled, err_eager)
    on_gpu = torch.from_numpy(frames).cuda()
    got = compiled(on_gpu)
    kept = got.clone()
    compiled(on_gpu[:3])  # another replay must not write into the rewards handed back before
    assert torch.equal(got, kept)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_backend_results_survive_replays_of_every_bucket():
    # Each bucket's CUDA graph owns a static output buffer that its next replay overwrites: what the
    # backend hands back must stay as it was through calls into the same bucket, another bucket and
    # a split over the largest one.
    import copy

    from vlmrm_fast.backends.compiled import CompileBackend

    model, _ = make_tiny()
    exact = copy.deepcopy(model.visual).double().eval()  # the float64 reference, on the CPU
    visual = model.visual.to("cuda", torch.bfloat16).eval()
    size = tuple(visual.image_size)
    backend = CompileBackend(visual, torch.device("cuda"), torch.bfloat16, size, 4, buckets=(2, 4))
    generator = torch.Generator(device="cuda").manual_seed(3)
    with torch.inference_mode():
        batches = [torch.randn((n, 3) + size, device="cuda", generator=generator).to(torch.bfloat16) for n in (3, 2, 9)]
        first = [backend(b) for b in batches]
        kept = [f.clone() for f in first]
        again = [backend(b) for b in reversed(batches)][::-1]
        eager = [visual(b).float() for b in batches]
        want = [exact(b.double().cpu()) for b in batches]
    assert backend.mode == "reduce-overhead"
    for got, was, rerun in zip(first, kept, again):
        assert torch.equal(got, was) and torch.equal(rerun, was)
    for got, fast, ref in zip(first, eager, want):  # inductor rounds its own way in bf16, no worse than eager's twice
        assert (got.double().cpu() - ref).abs().max() <= 2 * (fast.double().cpu() - ref).abs().max() + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_auto_picks_a_verified_backend(device):
    device = torch.device(device)
    if device.type == "cpu":
        assert resolve_backend("auto", device, torch.float32) == ("onnxruntime" if HAS_ORT else "torch")
        assert resolve_backend("auto", device, torch.bfloat16) == "torch"
    else:
        assert resolve_backend("auto", device, torch.bfloat16) == "torch"
    assert resolve_backend("tensorrt", device, torch.float16) == "tensorrt"  # never chosen, only asked for
    with pytest.raises(BackendError, match="not one of"):
        resolve_backend("openvino", device, torch.float32)


@needs_ort
def test_onnxruntime_preprocesses_small_cpu_chunks_on_one_torch_thread(tiny, monkeypatch):
    """Small chunks are preprocessed on one torch thread (torch's spinning OpenMP workers would take
    the cores ONNX Runtime needs next); large ones on all of them; the count is restored after each
    chunk, also when preprocessing fails."""
    from vlmrm_fast import reward as reward_module
    from vlmrm_fast.backends import onnxruntime as ort_backend

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rm = CLIPReward(*tiny, goal="a", device="cpu", backend="onnxruntime", max_batch_size=64)
        seen = []

        def spy(frames, *args, **kwargs):
            seen.append((frames.shape[0], torch.get_num_threads()))
            if frames.shape[0] == 5:
                raise RuntimeError("preprocessing failed")
            return preprocess(frames, *args, **kwargs)

        monkeypatch.setattr(reward_module, "preprocess", spy)
        per_frame = 224 * 224 * 3
        small = ort_backend.ONE_THREAD_BYTES // per_frame
        rm(_noise(small, 224, 224))
        rm(_noise(small + 1, 224, 224))
        with pytest.raises(RuntimeError, match="preprocessing failed"):
            rm(_noise(5, 224, 224))
        assert seen == [(small, 1), (small + 1, 2), (5, 1)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@needs_ort
def test_onnxruntime_threads_follow_torch_whatever_omp_num_threads_says(tiny, monkeypatch):
    # "2,1" is valid OpenMP (nested levels); the session takes torch's thread count, which already
    # follows OMP_NUM_THREADS, instead of parsing the variable again.
    monkeypatch.setenv("OMP_NUM_THREADS", "2,1")
    rm = CLIPReward(*tiny, goal="a", device="cpu", backend="onnxruntime")
    assert rm.vision_backend._session_options().intra_op_num_threads == torch.get_num_threads()


@needs_ort
def test_auto_takes_onnxruntime_only_where_the_tower_can_be_exported(monkeypatch):
    # onnxruntime does not depend on onnx: with onnxruntime alone, "auto" must not pick a backend that
    # then fails for want of onnx.
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setattr(util, "find_spec", real)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "onnxruntime"


@needs_ort
def test_onnxruntime_refuses_other_devices_and_a_cuda_provider_that_did_not_start(monkeypatch):
    import onnxruntime as ort

    from vlmrm_fast.backends.onnxruntime import OnnxRuntimeBackend

    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    with pytest.raises(BackendError, match="runs on CPU or CUDA, not mps"):
        OnnxRuntimeBackend(model.visual, spec, torch.device("mps"), torch.float32, (224, 224))
    # A GPU build that cannot load its CUDA libraries falls back to the CPU provider with a log line;
    # the backend would then hand CUDA memory to a CPU session.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendError, match="could not start its CUDA provider"):
        OnnxRuntimeBackend(model.visual, spec, torch.device("cuda", 0), torch.float32, (224, 224))


def test_a_missing_package_is_named_with_what_needs_it(monkeypatch, tmp_path):
    from vlmrm_fast.backends.onnx_export import export_onnx

    model, _ = make_tiny()
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackendError, match=r"^ONNX export needs the `onnx` package.*vlmrm-fast\[export\]'`\.$"):
        export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"))


def test_onnxruntime_on_cpu_refuses_half_precision(tiny):
    with pytest.raises(BackendError, match="CPU runs float32.*dtype=torch.float32"):
        CLIPReward(*tiny, goal="a", device="cpu", dtype=torch.bfloat16, backend="onnxruntime")


def test_backend_options_are_checked_against_the_backend(tiny):
    from vlmrm_fast.backends.compiled import CompileBackend

    model, tokenizer = tiny
    with pytest.raises(BackendError, match=r"\['buckets'\] are not options of the 'torch' backend, whose options are: "
                                           r"quantize; they are options of 'compile'"):
        CLIPReward(model, tokenizer, goal="a", device="cpu", backend="torch", backend_options={"buckets": (1, 8)})
    if importlib.util.find_spec("onnxruntime") is not None:  # "auto" takes ONNX Runtime on CPU
        with pytest.raises(BackendError, match=r"'onnxruntime' backend \(which backend='auto' picked on cpu\), whose "
                                               r"options are: quantize, exporter; they are options of 'compile'"):
            CLIPReward(model, tokenizer, goal="a", device="cpu", backend_options={"mode": "default"})
    for buckets in ([2.5], (4, True), (0, 8), 8, (b for b in (1, 8)), []):
        with pytest.raises(BackendError, match="buckets must be a list of positive integers"):
            CLIPReward(model, tokenizer, goal="a", device="cpu", backend="compile", backend_options={"buckets": buckets})
    # Not a dict: named (dict() of a string said "dictionary update sequence element #0 has length 1").
    for build in (functools.partial(CLIPReward.from_pretrained, "vlmrm-tiny", None),
                  functools.partial(CLIPReward, model, tokenizer)):
        with pytest.raises(BackendError, match=r"backend_options must be a dict of option names.*got str 'quantize'"):
            build(goal="a", device="cpu", backend="torch", backend_options="quantize")
    # A mode torch.compile does not have: before the model loads, not at the first call.
    with pytest.raises(BackendError, match=r"mode='nope' is not one of torch.compile's modes: default, reduce-overhead"):
        CLIPReward.from_pretrained("no-such-model-is-loaded", None, goal="a", device="cpu", backend="compile",
                                   backend_options={"mode": "nope"})
    with pytest.raises(BackendError, match=r"mode='nope' is not one of torch.compile's modes"):
        CompileBackend(model.visual, torch.device("cpu"), torch.float32, (224, 224), 4, mode="nope")


def test_backend_options_list_each_constructors_keywords():
    """BACKEND_OPTIONS (checked before a backend is built) names exactly the keywords each constructor
    takes beyond what build_backend passes itself, so no option is refused or lost on the way."""
    import inspect

    from vlmrm_fast.backends import BACKEND_OPTIONS
    from vlmrm_fast.backends.compiled import CompileBackend
    from vlmrm_fast.backends.eager import TorchBackend
    from vlmrm_fast.backends.onnxruntime import OnnxRuntimeBackend
    from vlmrm_fast.backends.tensorrt import TensorRTBackend

    passed_by_builder = {"self", "visual", "spec", "device", "dtype", "image_size", "max_batch_size", "model_name",
                         "kernels"}
    classes = {"torch": TorchBackend, "compile": CompileBackend, "onnxruntime": OnnxRuntimeBackend,
               "tensorrt": TensorRTBackend}
    assert set(classes) == set(BACKEND_OPTIONS)
    for name, cls in classes.items():
        keywords = set(inspect.signature(cls.__init__).parameters) - passed_by_builder
        assert keywords == set(BACKEND_OPTIONS[name]), name


def test_missing_extra_names_it(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(BackendError, match=r"pip install 'vlmrm-fast\[export\]'"):
        CLIPReward(*tiny, goal="a", device="cpu", backend="onnxruntime")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_fp8_with_onnxruntime_points_to_tensorrt(tiny):
    with pytest.raises(BackendError, match=r"quantize='fp8' is not one of \('int8',\).*fp8 needs backend='tensorrt'"):
        CLIPReward(*tiny, goal="a", device="cpu", backend="onnxruntime", backend_options={"quantize": "fp8"})


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_tensorrt_missing_names_the_extra(tiny):
    from vlmrm_fast.backends.tensorrt import import_tensorrt

    with pytest.raises(BackendError, match=r"backend='tensorrt' needs the `tensorrt` package.*vlmrm-fast\[tensorrt"):
        import_tensorrt("tensorrt")
    # On a CPU device the device is what to fix, TensorRT or not.
    with pytest.raises(BackendError, match=r"needs a CUDA device; use backend='onnxruntime' or 'torch' on CPU"):
        CLIPReward(*tiny, goal="a", device="cpu", backend="tensorrt")


@pytest.mark.parametrize("cuda,extra", [("12.8", "tensorrt-cu12"), ("13.0", "tensorrt-cu13"), ("11.8", "tensorrt"),
                                        (None, "tensorrt")])
def test_tensorrt_extra_follows_torchs_cuda(monkeypatch, cuda, extra):
    # Plain `tensorrt` brings the CUDA 13 build from 10.13.2 on: a CUDA 12 stack is told the cu12 one.
    from vlmrm_fast.backends.tensorrt import tensorrt_extra

    monkeypatch.setattr(torch.version, "cuda", cuda)
    assert tensorrt_extra() == extra


@pytest.mark.parametrize("version", ["12.0.0", "9.3.0"])
def test_tensorrt_of_another_major_version_is_refused(tiny, monkeypatch, version, tmp_path):
    import types

    from vlmrm_fast.backends.tensorrt import build_engine

    from vlmrm_fast.backends.tensorrt import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    with pytest.raises(BackendError, match=rf"{version} is installed; `pip install 'vlmrm-fast\[tensorrt"):
        import_tensorrt("tensorrt")
    with pytest.raises(BackendError, match=version):
        build_engine(tmp_path / "tower.onnx", "bf16", (1, 2, 4))


class _FakeLogger:
    WARNING = 2

    def __init__(self, level=None):
        self.level = level


def test_tensorrt_that_cannot_start_names_the_build_to_install(monkeypatch, tmp_path):
    # A TensorRT build for a newer CUDA than the driver's: its bindings give back a null Builder or
    # Runtime (pybind11 raises TypeError, or None comes back) instead of an error that says why.
    import types

    from vlmrm_fast.backends.tensorrt import build_engine

    def null_factory(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    for factory in (null_factory, lambda logger: None):
        fake = types.SimpleNamespace(__version__="10.13.3.9", Builder=factory, Logger=_FakeLogger)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        with pytest.raises(BackendError, match=r"could not create its builder.*CUDA 12\.8.*pip uninstall -y tensorrt "
                                               r".*pip install 'vlmrm-fast\[tensorrt-cu12\]'"):
            build_engine(tmp_path / "tower.onnx", "bf16", (1, 2, 4))


def test_tensorrt_bf16_needs_an_ampere_gpu(monkeypatch):
    from vlmrm_fast.backends import tensorrt as backend

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(BackendError, match=r"compute capability 8\.0.*Tesla T4 is 7\.5: use dtype=torch.float16"):
        backend.check_precision_support(torch.bfloat16, torch.device("cuda:0"))
    backend.check_precision_support(torch.float16, torch.device("cuda:0"))  # fp16 runs there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    backend.check_precision_support(torch.bfloat16, torch.device("cuda:0"))


def test_tensorrt_input_is_moved_to_an_aligned_address_only_when_needed():
    # TensorRT wants 256-byte aligned tensor addresses; a slice of a larger batch (frames of
    # 3 x 378 x 378 bf16, as the split over the engine's largest batch makes) can start off it.
    from vlmrm_fast.backends.tensorrt import ADDRESS_ALIGNMENT, aligned_contiguous

    size = 5 * 3 * 37 * 37 * 2
    memory = torch.empty(size + ADDRESS_ALIGNMENT, dtype=torch.uint8)
    start = -memory.data_ptr() % ADDRESS_ALIGNMENT
    pixels = memory[start : start + size].view(torch.bfloat16).view(5, 3, 37, 37)
    pixels.copy_(torch.randn(5, 3, 37, 37))
    assert pixels.data_ptr() % ADDRESS_ALIGNMENT == 0
    assert pixels[1:].data_ptr() % ADDRESS_ALIGNMENT  # the case to fix
    moved = aligned_contiguous(pixels[1:])
    assert moved.data_ptr() % ADDRESS_ALIGNMENT == 0 and torch.equal(moved, pixels[1:])
    assert aligned_contiguous(pixels).data_ptr() == pixels.data_ptr()  # no copy when already fine
    strided = aligned_contiguous(pixels.transpose(2, 3))
    assert strided.is_contiguous() and strided.data_ptr() % ADDRESS_ALIGNMENT == 0


def _ort_has_cuda() -> bool:
    if not HAS_ORT:
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@needs_ort
@pytest.mark.skipif(_ort_has_cuda(), reason="onnxruntime-gpu is installed here")
def test_onnxruntime_on_cuda_names_the_gpu_build():
    from vlmrm_fast.backends.onnxruntime import OnnxRuntimeBackend

    model, _ = make_tiny()
    with pytest.raises(BackendError, match="pip install onnxruntime-gpu"):  # checked before a GPU is touched
        OnnxRuntimeBackend(model.visual, preprocess_spec_of(model, "vlmrm"), torch.device("cuda"), torch.float16,
                           (224, 224))


@pytest.mark.gpu
@pytest.mark.skipif(not (_ort_has_cuda() and torch.cuda.is_available()), reason="needs onnxruntime-gpu and a CUDA device")
def test_onnxruntime_cuda_fp16_within_twice_eager_fp16_error():
    # ONNX Runtime's CUDA provider, inputs and outputs bound to torch's memory: fp16, within twice
    # eager fp16's own error against the float64 reference.
    _, err_ort, err_eager = _errors_against_reference(_noise(5, 224, 224, seed=4), torch.float16, "onnxruntime")
    assert err_ort <= 2 * err_eager + 1e-6, (err_ort, err_eager)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()), reason="needs tensorrt and a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensorrt_within_twice_eager_error_and_cached(dtype, tmp_path, monkeypatch):
    # Within twice eager's own error at that precision against the float64 reference; LayerNorm kept
    # in float32 where the engine shows normalisation layers; a second build served from the cache.
    from vlmrm_fast.backends.tensorrt import TensorRTBackend

    options = {"backend_options": {"cache_dir": str(tmp_path)}}
    trt, err_trt, err_eager = _errors_against_reference(_noise(5, 224, 224, seed=6), dtype, "tensorrt", **options)
    assert err_trt <= 2 * err_eager + 1e-6, (err_trt, err_eager)
    layers = [layer for layer in trt.vision_backend.layer_information().get("Layers", []) if isinstance(layer, dict)]
    norms = [layer for layer in layers if "normalization" in str(layer.get("LayerType", "")).lower()]
    for layer in norms:  # fused into larger kernels, they are not listed, and this checks nothing more
        assert all(tensorrt_is_float32(t) for t in layer.get("Outputs", [])), layer

    def no_build(*args, **kwargs):
        raise AssertionError("the engine was built again instead of loaded from the cache")

    monkeypatch.setattr(TensorRTBackend, "_build", no_build)
    again = CLIPReward(*make_tiny(), goal=GOAL, baseline=BASELINE, alpha=0.5, device="cuda", dtype=dtype,
                       backend="tensorrt", **options)
    assert again.vision_backend.engine_path == trt.vision_backend.engine_path


# ---- export ---------------------------------------------------------------------------------


def _ort_embeddings(path, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


@needs_ort
@pytest.mark.parametrize("model_name", ["vlmrm-tiny", "ViT-B-32"])
def test_uint8_export_matches_torch(model_name, tmp_path):
    from vlmrm_fast.backends.onnx_export import export_onnx

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random weights"):
        model, _ = create_clip(model_name, None)
    spec = preprocess_spec_of(model, "vlmrm")
    path = export_onnx(model.visual, tmp_path / "tower.onnx", spec, input_format="uint8-nhwc")
    frames = torch.from_numpy(_noise(3, 224, 224, seed=2))
    with torch.inference_mode():
        want = model.visual(preprocess(frames, spec, torch.float32, impl="torch")).numpy()
    got = _ort_embeddings(path, frames.numpy())
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


@needs_ort
@pytest.mark.parametrize("input_format", ["uint8-nhwc", "pixels"])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_external_data_and_dynamic_batch(input_format, exporter, tmp_path):
    from vlmrm_fast.backends.onnx_export import export_onnx

    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    path = export_onnx(model.visual, tmp_path / "t.onnx", spec, input_format=input_format, external_data=True,
                       exporter=exporter)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx", "t.onnx.data"]
    assert (tmp_path / "t.onnx.data").stat().st_size > 100_000  # the weights live beside the graph
    for n in (1, 5):  # one graph, any batch size
        frames = torch.from_numpy(_noise(n, 224, 224, seed=n))
        pixels = preprocess(frames, spec, torch.float32, impl="torch")
        with torch.inference_mode():
            want = model.visual(pixels).numpy()
        got = _ort_embeddings(path, frames.numpy() if input_format == "uint8-nhwc" else pixels.numpy())
        assert got.shape == want.shape and np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_folding_is_exact_in_float64():
    """The folded patch embedding equals normalise-then-convolve, in float64 to 1e-12."""
    from vlmrm_fast.backends.onnx_export import Uint8VisionTower

    model, _ = make_tiny()
    visual = model.visual.double()
    spec = preprocess_spec_of(model, "vlmrm")
    tower = Uint8VisionTower(visual, spec)
    assert tower.folded
    frames = torch.from_numpy(_noise(2, 224, 224, seed=3))
    pixels = (frames.permute(0, 3, 1, 2).double() / 255 - torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        assert (tower(frames) - visual(pixels)).abs().max().item() < 1e-12


class _Block(torch.nn.Module):
    """Self-attention called as open_clip calls it, or (``cross``/``masked``) in ways the static form
    must leave alone."""

    def __init__(self, batch_first, cross=False, masked=False, bias=True):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(24, 3, batch_first=batch_first, bias=bias)
        self.cross, self.masked = cross, masked

    def forward(self, x):
        key = x.flip(1 if self.attn.batch_first else 0) if self.cross else x
        mask = torch.zeros(x.shape[1 if self.attn.batch_first else 0], x.shape[1 if self.attn.batch_first else 0])
        return self.attn(x, key, key, need_weights=False, attn_mask=mask if self.masked else None)[0]


@pytest.mark.parametrize("batch_first,bias", [(True, True), (False, True), (True, False)])
def test_static_self_attention_computes_what_multihead_attention_does(batch_first, bias):
    """In float64 to 1e-12, on 7 tokens and 5 frames; swapped only inside the block, also on error."""
    from vlmrm_fast.backends.onnx_export import StaticSelfAttention, static_self_attention

    torch.manual_seed(0)
    block = _Block(batch_first, bias=bias).double().eval()
    x = torch.randn((5, 7, 24) if batch_first else (7, 5, 24), dtype=torch.float64)
    with torch.no_grad():
        want = block(x)
        with static_self_attention(block, x) as swapped:
            assert swapped == 1 and isinstance(block.attn, StaticSelfAttention)
            got = block(x)
        assert isinstance(block.attn, torch.nn.MultiheadAttention)
        assert (got - want).abs().max().item() < 1e-12
        with pytest.raises(RuntimeError, match="export failed"), static_self_attention(block, x):
            raise RuntimeError("export failed")
        assert isinstance(block.attn, torch.nn.MultiheadAttention)


class _Calls(torch.nn.Module):
    """Calls its attention as ``call(attention, x)`` says (a list of calls: each is made)."""

    def __init__(self, calls, dropout=0.0):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(24, 3, batch_first=True, dropout=dropout)
        self.calls = calls

    def forward(self, x):
        return [call(self.attn, x) for call in self.calls]


_MASK = torch.zeros(2, 7, dtype=torch.bool)
_LEFT_ALONE = {
    "pooler: key is value, not query": [lambda a, x: a(x[:, :1] * 2, x, x, need_weights=False)],
    "positional key_padding_mask": [lambda a, x: a(x, x, x, _MASK, False)],
    "need_weights left at its default": [lambda a, x: a(x, x, x)],
    "is_causal": [lambda a, x: a(x, x, x, need_weights=False, attn_mask=torch.zeros(7, 7), is_causal=True)],
    "unbatched 2-D tokens": [lambda a, x: a(x[0], x[0], x[0], need_weights=False)],
    # One slice for all three arguments: three slices would be three tensors, left alone as cross-attention
    # before the token counts are compared.
    "two token counts": [lambda a, x: a(x, x, x, need_weights=False),
                         lambda a, x: (lambda s: a(s, s, s, need_weights=False))(x[:, :5])],
    "value is another tensor": [lambda a, x: a(x, x, x * 2, need_weights=False)],
}


@pytest.mark.parametrize("how", list(_LEFT_ALONE) + ["cross", "masked", "training with dropout"])
def test_static_self_attention_leaves_other_attention_alone(how):
    from vlmrm_fast.backends.onnx_export import static_self_attention

    if how in ("cross", "masked"):
        block = _Block(True, **{how: True}).eval()
    elif how == "training with dropout":
        block = _Calls([lambda a, x: a(x, x, x, need_weights=False)], dropout=0.1).train()
    else:
        block = _Calls(_LEFT_ALONE[how]).eval()
    with static_self_attention(block, torch.randn(2, 7, 24)) as swapped:
        assert swapped == 0 and isinstance(block.attn, torch.nn.MultiheadAttention)


def test_static_self_attention_takes_positional_query_key_value():
    from vlmrm_fast.backends.onnx_export import static_self_attention

    block = _Calls([lambda a, x: a(x, x, x, None, False)]).eval()
    with static_self_attention(block, torch.randn(2, 7, 24)) as swapped:
        assert swapped == 1


@needs_ort
@pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
def test_onnxruntime_keeps_a_forward_hook_on_an_attention_layer():
    # The export swapped every self-attention for StaticSelfAttention, which has none of its hooks: a
    # user's ablation of a block's attention changed the "torch" rewards and not the "onnxruntime" ones.
    import copy

    model, tokenizer = make_tiny()
    model.visual.transformer.resblocks[0].attn.register_forward_hook(lambda m, args, out: (out[0] * 0, out[1]))
    kwargs = dict(goal=GOAL, baseline=BASELINE, alpha=0.5, device="cpu")
    eager = CLIPReward(copy.deepcopy(model), tokenizer, backend="torch", kernels="torch", **kwargs)
    ort = CLIPReward(model, tokenizer, backend="onnxruntime", **kwargs)
    frames = _noise(2, 224, 224, seed=3)
    unhooked = CLIPReward(make_tiny()[0], tokenizer, backend="torch", kernels="torch", **kwargs)(frames)
    assert (eager(frames) - unhooked).abs().max().item() > 1e-3  # the hook changes the rewards
    assert (ort(frames) - eager(frames)).abs().max().item() <= 1e-5



@needs_ort
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_a_child_forked_while_another_thread_preprocesses_scores(tiny):
    # Subprocess envs forked while an evaluation thread was in a one-torch-thread block: the child inherited the
    # block's lock held by a thread the fork did not copy, and its first score of a few frames waited for ever.
    import multiprocessing
    import threading

    from vlmrm_fast.backends.base import ONE_TORCH_THREAD
    from vlmrm_fast.backends.onnxruntime import _torch_uses_openmp

    if not _torch_uses_openmp():
        pytest.skip("the block is taken only where torch runs on OpenMP")
    rm = CLIPReward(*tiny, goal="a", baseline="b", alpha=0.5, device="cpu", backend="onnxruntime")
    frames = _noise(2, 32, 32, seed=6)
    want = rm(frames).tolist()
    inside, leave = threading.Event(), threading.Event()

    def evaluate():
        with ONE_TORCH_THREAD:
            inside.set()
            leave.wait(60)

    evaluator = threading.Thread(target=evaluate)
    evaluator.start()
    try:
        assert inside.wait(60)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=lambda: queue.put(rm(frames).tolist()))
        child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
            child.join()
    finally:
        leave.set()
        evaluator.join()
    assert child.exitcode == 0 and queue.get(timeout=10) == want

def test_one_torch_thread_blocks_from_two_threads_run_one_at_a_time():
    """A second thread waits for the first one's block to end, and each restores what it found: the
    count of threads that start torch work afterwards is the one from before (overlapping
    save-and-restore would leave it at one)."""
    import threading

    from vlmrm_fast.backends.base import ONE_TORCH_THREAD

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first_in, first_may_leave, second_in = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def first():
            with ONE_TORCH_THREAD:
                seen["first"] = torch.get_num_threads()
                first_in.set()
                first_may_leave.wait(5)

        def second():
            first_in.wait(5)
            with ONE_TORCH_THREAD:
                second_in.set()
                seen["second"] = torch.get_num_threads()

        def fresh():
            seen["fresh thread after"] = torch.get_num_threads()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        first_in.wait(5)
        assert not second_in.wait(0.3), "the second block ran inside the first"
        first_may_leave.set()
        for t in threads:
            t.join(10)
        after = threading.Thread(target=fresh)
        after.start()
        after.join(10)
        assert seen == {"first": 1, "second": 1, "fresh thread after": 2}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@needs_ort
def test_exported_attention_has_no_shape_arithmetic(tmp_path):
    """Only the batch axis is dynamic: the graph reads the input's shape a fixed number of times, not
    once per block (the tiny tower has 2 blocks; ViT-bigG-14 has 48)."""
    import onnx

    from vlmrm_fast.backends.onnx_export import export_onnx

    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    nodes = onnx.load(str(export_onnx(model.visual, tmp_path / "t.onnx", spec, input_format="pixels"))).graph.node
    shape_reads = sum(node.op_type == "Shape" for node in nodes)
    assert shape_reads <= 4, shape_reads
    assert sum(node.op_type == "Softmax" for node in nodes) == 2


def test_cuda_device_gets_an_index(monkeypatch):
    # Tensors report cuda:0, which is not equal to torch.device("cuda"): backends that check where
    # their inputs live need the index.
    from vlmrm_fast.reward import _resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a machine where cuda:1 exists
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _resolve_device("cuda") == torch.device("cuda", 1)
    assert _resolve_device(None) == torch.device("cuda", 1)
    assert _resolve_device("cuda:0") == torch.device("cuda", 0)


# ---- behaviours a mutation audit found untested ---------------------------------------------------


@needs_ort
def test_onnxruntime_refuses_int8_and_bfloat16_on_cuda_before_any_work(monkeypatch):
    # Both are checked before ONNX Runtime's CUDA provider or a GPU is touched (here the provider is
    # said to be there: the GPU build's check must not be what refuses them).
    import onnxruntime as ort

    from vlmrm_fast.backends.onnxruntime import OnnxRuntimeBackend

    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendError, match="quantize='int8' runs on CPU with dtype=torch.float32.*not cuda"):
        OnnxRuntimeBackend(model.visual, spec, torch.device("cuda", 0), torch.float32, (224, 224), quantize="int8")
    with pytest.raises(BackendError, match="runs float32 or float16 on CUDA, not torch.bfloat16"):
        OnnxRuntimeBackend(model.visual, spec, torch.device("cuda", 0), torch.bfloat16, (224, 224))


@needs_ort
def test_a_copy_of_an_onnxruntime_backend_carries_external_weights(monkeypatch):
    # Towers over 2 GB (ViT-bigG-14) keep their weights in tower.onnx.data: a pickled copy must carry it.
    import pickle

    from vlmrm_fast.backends import onnx_export

    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", 64 * 1024)  # the tiny tower's weights go to a side file
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend="onnxruntime")
    path = rm.vision_backend._model_path
    assert path.with_name(path.name + ".data").exists()
    frames = _noise(2, 40, 40, seed=6)
    assert torch.equal(pickle.loads(pickle.dumps(rm))(frames), rm(frames))


@needs_ort
def test_onnxruntime_cpu_sessions_optimise_fully_and_do_not_spin(tiny):
    import onnxruntime as ort

    options = CLIPReward(*tiny, goal="a", device="cpu", backend="onnxruntime").vision_backend._session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@needs_ort
def test_one_torch_thread_up_to_exactly_one_thread_bytes_and_only_under_openmp(tiny, monkeypatch):
    from vlmrm_fast.backends import onnxruntime as ort_backend
    from vlmrm_fast.backends.base import ONE_TORCH_THREAD

    backend = CLIPReward(*tiny, goal="a", device="cpu", backend="onnxruntime").vision_backend
    at_limit = torch.zeros(ort_backend.ONE_THREAD_BYTES, dtype=torch.uint8)
    over = torch.zeros(ort_backend.ONE_THREAD_BYTES + 1, dtype=torch.uint8)
    monkeypatch.setattr(ort_backend, "_torch_uses_openmp", lambda: True)
    assert backend.preprocessing(at_limit) is ONE_TORCH_THREAD
    assert backend.preprocessing(over) is not ONE_TORCH_THREAD
    monkeypatch.setattr(ort_backend, "_torch_uses_openmp", lambda: False)  # torch's own pool does not spin
    assert backend.preprocessing(at_limit) is not ONE_TORCH_THREAD


@needs_ort
def test_onnxruntime_cuda_session_runs_on_the_backends_gpu(monkeypatch):
    # cuda:1 must give ONNX Runtime's CUDA provider device_id 1 (checked with a stand-in session: no GPU needed).
    import onnxruntime as ort

    from vlmrm_fast.backends.onnxruntime import OnnxRuntimeBackend

    seen = []

    class Session:
        def __init__(self, path, options, providers):
            seen.append(providers)

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_outputs(self):
            return [type("Output", (), {"shape": ["batch", 32]})()]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    model, _ = make_tiny()
    backend = OnnxRuntimeBackend(model.visual, preprocess_spec_of(model, "vlmrm"), torch.device("cuda", 1),
                                 torch.float16, (224, 224))
    assert seen == [[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]] and backend.embed_dim == 32


@needs_ort
def test_onnxruntime_cuda_calls_bind_their_tensors_on_the_backends_gpu(monkeypatch):
    # The session runs on cuda:1 (above); its inputs and outputs must be bound as memory of cuda:1 too, or
    # ONNX Runtime reads cuda:1's pointers as cuda:0's. Checked with stand-ins for the session and CUDA.
    import onnxruntime as ort

    from vlmrm_fast.backends.onnxruntime import OnnxRuntimeBackend

    bound = []

    class Binding:
        def bind_input(self, name, device, index, *rest):
            bound.append((name, device, index))

        bind_output = bind_input

    class Session:
        def __init__(self, path, options, providers):
            pass

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_outputs(self):
            return [type("Output", (), {"shape": ["batch", 32]})()]

        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, binding):
            pass

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    model, _ = make_tiny()
    backend = OnnxRuntimeBackend(model.visual, preprocess_spec_of(model, "vlmrm"), torch.device("cuda", 1),
                                 torch.float16, (224, 224))
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, device=None, **kwargs: empty(*args, **kwargs))  # on the CPU
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("Stream", (), {"synchronize": lambda self: None})())
    out = backend(torch.zeros(2, 3, 224, 224, dtype=torch.float16))
    assert out.shape == (2, 32) and bound == [("pixels", "cuda", 1), ("embeddings", "cuda", 1)]


class _ConvTower(torch.nn.Module):
    """A tower whose first layer is ``conv1`` (as open_clip's ViTs), padded, dilated, grouped or with a bias
    as asked."""

    image_size = (32, 32)

    def __init__(self, padding=0, bias=False, dilation=1, groups=1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 9, kernel_size=4, stride=4, padding=padding, bias=bias, dilation=dilation,
                                     groups=groups)

    def forward(self, x):
        return self.conv1(x).flatten(1)


@pytest.mark.parametrize("padding,bias,dilation,groups,hooked,folded", [
    (0, True, 1, 1, None, True), (1, False, 1, 1, None, False), (1, True, 1, 1, None, False),
    (0, False, 2, 1, None, False), (0, True, 1, 3, None, False), (0, True, 1, 1, "conv", False),
    (0, True, 1, 1, "tower", False),
])
def test_uint8_tower_normalises_exactly_whether_folded_or_not(padding, bias, dilation, groups, hooked, folded):
    """A padded first convolution pads with zeros after normalising, which folding cannot express: the
    affine step stays explicit, as for a dilated or grouped one (the folded convolution is a plain one),
    for one with a forward hook (folded, the hook was dropped: the uint8 export left out a user's change to
    the patch embeddings) and for a tower with a forward pre-hook (folded, it saw 0-255 values, not the
    normalised pixels). A convolution's own bias is kept when folding. In float64 to 1e-12."""
    import dataclasses

    from vlmrm_fast.backends.onnx_export import Uint8VisionTower

    model, _ = make_tiny()
    spec = dataclasses.replace(preprocess_spec_of(model, "vlmrm"), size=(32, 32))
    torch.manual_seed(0)
    visual = _ConvTower(padding, bias, dilation, groups).double()
    if hooked == "conv":
        visual.conv1.register_forward_hook(lambda module, args, out: out * 0.5)
    elif hooked == "tower":
        visual.register_forward_pre_hook(lambda module, args: (args[0].clamp(-1, 1),))
    tower = Uint8VisionTower(visual, spec)
    assert tower.folded == folded
    frames = torch.from_numpy(_noise(2, 32, 32, seed=3))
    mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    pixels = (frames.permute(0, 3, 1, 2).double() / 255 - mean) / std
    with torch.no_grad():
        assert (tower(frames) - visual(pixels)).abs().max().item() < 1e-12


@pytest.mark.parametrize("how", ["add_bias_kv", "add_zero_attn"])
def test_static_self_attention_leaves_attention_with_extra_keys_alone(how):
    from vlmrm_fast.backends.onnx_export import static_self_attention

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(24, 3, batch_first=True, **{how: True})

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    block = Block().eval()
    with static_self_attention(block, torch.randn(2, 7, 24)) as swapped:
        assert swapped == 0 and isinstance(block.attn, torch.nn.MultiheadAttention)


@needs_ort
def test_export_refuses_an_unknown_input_format(tmp_path):
    from vlmrm_fast.backends.onnx_export import export_onnx

    model, _ = make_tiny()
    with pytest.raises(ValueError, match="input_format='nchw' is not one of"):
        export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"), input_format="nchw")
    assert not list(tmp_path.iterdir())


@needs_ort
def test_an_export_without_external_data_removes_the_previous_side_file(tmp_path):
    from vlmrm_fast.backends.onnx_export import export_onnx

    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    export_onnx(model.visual, tmp_path / "t.onnx", spec, external_data=True)
    assert (tmp_path / "t.onnx.data").exists()
    export_onnx(model.visual, tmp_path / "t.onnx", spec, external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx"]


@needs_ort
@pytest.mark.parametrize("crash_at", [1, 2])
def test_an_export_interrupted_between_its_renames_leaves_no_mixed_pair(tmp_path, monkeypatch, crash_at):
    # Re-exporting the same tower with another input format writes weights of the same sizes at the same
    # offsets: the old graph would read the new side file without an error and compute another tower.
    # The old graph goes before the side file is replaced: interrupted at either rename, no graph is
    # left at the path (loading fails), never that pair. (A failed check, before, leaves it whole.)
    import os

    from vlmrm_fast.backends import onnx_export

    model, _ = make_tiny()
    spec, out = preprocess_spec_of(model, "vlmrm"), tmp_path / "t.onnx"
    onnx_export.export_onnx(model.visual, out, spec, input_format="uint8-nhwc", external_data=True)
    moved, real_replace = [], os.replace

    def replace(source, target):  # the renames into tmp_path, not those inside an exporter's own folder
        if os.path.dirname(os.path.abspath(target)) == str(tmp_path):
            moved.append(os.path.basename(target))
            if len(moved) == crash_at:
                raise KeyboardInterrupt
        return real_replace(source, target)

    monkeypatch.setattr(onnx_export.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(model.visual, out, spec, input_format="pixels", external_data=True)
    assert moved == ["t.onnx.data", "t.onnx"][:crash_at]
    assert not out.exists()


def test_save_graph_refuses_an_invalid_graph_and_writes_nothing(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from vlmrm_fast.backends.onnx_export import save_graph

    node = helper.make_node("NoSuchOp", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx.checker.ValidationError):
        save_graph(model, tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())


@needs_ort
def test_exported_output_batch_axis_is_dynamic(tmp_path):
    import onnx

    from vlmrm_fast.backends.onnx_export import export_onnx

    model, _ = make_tiny()
    graph = onnx.load(str(export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm")))).graph
    for value in (graph.input[0], graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value


def test_auto_on_cuda_is_torch_at_every_precision():
    # No GPU is touched: the choice only reads the device's type. Float32 on CUDA must not take the
    # CPU's pick (ONNX Runtime), whose CUDA path has no GPU results committed.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert resolve_backend("auto", torch.device("cuda", 0), dtype) == "torch"


def test_compile_backend_counts_compile_and_capture_as_build_time(monkeypatch):
    # On CUDA ("reduce-overhead") the first call of a bucket compiles, the second records the CUDA graph
    # and the third replays it, all three timed as build_seconds and synchronised; later calls run once.
    # Checked without a GPU: a stand-in for torch.compile counts the calls (CPU tensors, device "cuda").
    from vlmrm_fast.backends.compiled import CompileBackend

    modes, calls, synced = [], [], []

    def fake_compile(model, mode=None, dynamic=None):
        modes.append(mode)

        def run(pixels):
            calls.append(pixels.shape[0])
            return pixels.flatten(1)[:, :4] * 2
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    visual = torch.nn.Identity()
    cpu = CompileBackend(visual, torch.device("cpu"), torch.float32, (2, 2), 4, buckets=(2, 4))
    cuda = CompileBackend(visual, torch.device("cuda"), torch.float32, (2, 2), 4, buckets=(2, 4))
    chosen = CompileBackend(visual, torch.device("cuda"), torch.float32, (2, 2), 4, mode="max-autotune")
    assert modes == ["default", "reduce-overhead", "max-autotune"] and chosen.mode == "max-autotune"
    x = torch.randn(3, 3, 2, 2)
    assert torch.equal(cuda(x), x.flatten(1)[:, :4] * 2)  # padded to 4 and sliced back
    assert calls == [4, 4, 4] and len(synced) == 1 and set(cuda.compile_seconds) == {4}
    built = cuda.build_seconds
    cuda(x)  # steady state: one run, no more build time
    assert calls == [4, 4, 4, 4] and cuda.build_seconds == built and len(synced) == 1
    del calls[:]
    cpu(x)
    cpu(x)
    assert calls == [4, 4] and set(cpu.compile_seconds) == {4}  # on CPU nothing to capture: one call compiles
    # On CUDA without CUDA graphs there is nothing to record or replay either: two more calls would be
    # steady-state runs counted as compile time (a GPU-path desk review).
    for mode, first_calls in (("default", 1), ("max-autotune-no-cudagraphs", 1), ("max-autotune", 3)):
        del calls[:]
        backend = CompileBackend(visual, torch.device("cuda"), torch.float32, (2, 2), 4, buckets=(4,), mode=mode)
        backend(x)
        assert len(calls) == first_calls and set(backend.compile_seconds) == {4}, (mode, calls)


def test_a_compile_backend_says_when_its_graphs_came_from_the_cache_on_disk():
    # 'build s' of a build that took its graphs from Inductor's cache is no first build's time: the bench
    # marks it. After dynamo forgets the first backend's graph, a second backend on the same module compiles
    # the same graph, which Inductor then finds in its cache.
    from torch._inductor import config as inductor_config

    from vlmrm_fast.backends.compiled import CompileBackend

    if not getattr(inductor_config, "fx_graph_cache", False):
        pytest.skip("this torch does not cache Inductor's graphs by default")
    torch.manual_seed(0)
    visual = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    x = torch.randn(3, 3, 2, 2)
    first = CompileBackend(visual, torch.device("cpu"), torch.float32, (2, 2), 4, buckets=(4,))
    assert first.build_cached is None  # nothing built yet
    first(x)
    assert isinstance(first.build_cached, bool)  # True where an earlier process cached this graph
    torch._dynamo.reset()
    second = CompileBackend(visual, torch.device("cpu"), torch.float32, (2, 2), 4, buckets=(4,))
    torch.testing.assert_close(second(x), visual(x), rtol=1e-5, atol=1e-6)
    assert second.build_cached is True


def test_compile_backend_buckets_are_sorted_and_end_at_max_batch_size(monkeypatch):
    from vlmrm_fast.backends.compiled import CompileBackend, default_buckets

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # nothing to compile here
    assert default_buckets(64) == (1, 8, 32, 64) and default_buckets(100) == (1, 8, 32, 64, 100)
    assert default_buckets(1) == (1,)
    visual = torch.nn.Identity()
    assert CompileBackend(visual, torch.device("cpu"), torch.float32, (2, 2), 100).buckets == (1, 8, 32, 64, 100)
    backend = CompileBackend(visual, torch.device("cpu"), torch.float32, (2, 2), 8, buckets=[8, 2])
    assert backend.buckets == (2, 8)
    assert [backend.bucket_for(n) for n in (1, 2, 3, 8, 9)] == [2, 2, 8, 8, 8]


def test_missing_extra_messages_name_the_install_and_the_way_out():
    from vlmrm_fast.backends.base import missing_extra

    assert str(missing_extra("onnxruntime", "export", "onnxruntime")) == (
        "backend='onnxruntime' needs the `onnxruntime` package, which is not installed. Install it with "
        "`pip install 'vlmrm-fast[export]'`, or pick another backend (backend='torch').")
    assert str(missing_extra("onnx", "export", "ONNX export")) == (
        "ONNX export needs the `onnx` package, which is not installed. Install it with `pip install 'vlmrm-fast[export]'`.")


def test_one_torch_thread_blocks_nest_in_one_thread():
    from vlmrm_fast.backends.base import ONE_TORCH_THREAD

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ONE_TORCH_THREAD:
            with ONE_TORCH_THREAD:  # re-entrant: no deadlock
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1  # the inner block restores what it found
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@needs_ort
@pytest.mark.parametrize("input_format,shape,elem", [("uint8-nhwc", ["batch", 224, 224, 3], "UINT8"),
                                                     ("pixels", ["batch", 3, 224, 224], "FLOAT")])
def test_exported_graph_names_opset_inputs_and_outputs(input_format, shape, elem, tmp_path):
    # What another runtime (TensorRT's parser, a user's own) reads of the graph: opset 17 (LayerNormalization
    # as one op), the input's name, type and shape, float embeddings [batch, D]; uint8 frames are cast
    # before anything else touches them (TensorRT takes uint8 only as a graph input or output).
    import onnx

    from vlmrm_fast.backends.onnx_export import export_onnx

    model, _ = make_tiny()
    path = export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"), input_format=input_format)
    graph_model = onnx.load(str(path))
    assert [o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    graph = graph_model.graph
    name = "frames" if input_format == "uint8-nhwc" else "pixels"
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]  # noqa: E731
    [given] = graph.input
    assert given.name == name and dims(given) == shape
    assert given.type.tensor_type.elem_type == getattr(onnx.TensorProto, elem)
    [out] = graph.output
    assert out.name == "embeddings" and dims(out) == ["batch", 32]
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    if input_format == "uint8-nhwc":
        assert {node.op_type for node in graph.node if name in node.input} == {"Cast"}


def test_export_leaves_multihead_attentions_fast_path_as_it_was():
    # The exporter traces with the fused fast path off; the process's own setting comes back after.
    from vlmrm_fast.backends.onnx_export import _mha_fastpath_disabled

    mha = torch.backends.mha
    previous = mha.get_fastpath_enabled()
    try:
        for setting in (True, False):
            mha.set_fastpath_enabled(setting)
            with _mha_fastpath_disabled():
                assert mha.get_fastpath_enabled() is False
            assert mha.get_fastpath_enabled() is setting
    finally:
        mha.set_fastpath_enabled(previous)


@needs_ort
def test_weights_near_protobufs_limit_go_to_a_side_file(tmp_path, monkeypatch):
    # The graph's structure and protobuf's framing come on top of the weights: from 90% of the limit
    # they go to <name>.data, not only past it.
    from vlmrm_fast.backends import onnx_export

    model, _ = make_tiny()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.visual.parameters())
    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", int(weight_bytes / 0.95))
    onnx_export.export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"), input_format="pixels")
    assert (tmp_path / "t.onnx.data").exists()


def test_rebuild_backend_takes_new_options_over_the_ones_it_was_built_with(tiny):
    # (A mutation audit: the merge the other way round kept the old value, silently.)
    rm = CLIPReward(*tiny, goal="a", device="cpu", backend="compile", backend_options={"buckets": (1, 8)})
    assert rm.vision_backend.buckets == (1, 8)
    rm.rebuild_backend({"buckets": (1, 16)})
    assert rm.vision_backend.buckets == (1, 16)
    rm.rebuild_backend()  # without options: those of the last build
    assert rm.vision_backend.buckets == (1, 16)


def test_a_logit_bias_is_not_watched_as_the_text_side(tiny):
    # SigLIP-style models train a logit_bias beside logit_scale; encode_text reads neither, so a change of
    # it must not refuse rewards as a text-side change would. (The tiny model has none: one is added.)
    model, tokenizer = tiny
    model.logit_bias = torch.nn.Parameter(torch.zeros(1))
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend="torch")
    frames = _noise(2, 24, 24, seed=4)
    before = rm(frames)
    with torch.no_grad():
        rm.model.logit_bias.add_(1.0)
        rm.model.logit_scale.add_(1.0)
    assert torch.equal(rm(frames), before)
    with torch.no_grad():
        rm.model.token_embedding.weight.mul_(2.0)  # while a change encode_text does read is still seen
    with pytest.raises(ValueError, match="text-side weights changed"):
        rm(frames)


@pytest.mark.parametrize("name", ["transformer.resblocks.1.mlp.c_proj.weight", "ln_final.bias", "positional_embedding"])
def test_a_change_anywhere_in_the_text_tower_is_seen(tiny, name):
    # A text fine-tune that trains the transformer's blocks alone (not the token embedding or the projection the
    # tests above change) leaves the goals stale all the same. (A mutation audit: leaving "transformer" out of
    # the text-side watch went unseen.)
    model, tokenizer = tiny
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend="torch")
    frames = _noise(2, 24, 24, seed=4)
    rm(frames)
    with torch.no_grad():
        rm.model.get_parameter(name).add_(0.1)
    with pytest.raises(ValueError, match="text-side weights changed"):
        rm(frames)
    rm.set_tasks(goal=GOAL, baseline=BASELINE)  # encoded again from the changed tower: scored again
    assert rm(frames).shape == (2,)


@pytest.mark.parametrize("change", ["double", "meta", "new last parameter", "layer swapped out", "in place"])
def test_the_weights_watch_sees_each_kind_of_change(change):
    # (A mutation audit: leaving out the dtype/device part, or the last tensor's identity, or a removed layer,
    # went unseen by the tests, which changed weights in place only.)
    from vlmrm_fast.backends.base import WeightsWatch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    watch = WeightsWatch(module)
    assert not watch.changed()
    if change == "double":
        module.double()  # same Parameters, same version counters: only the dtype tells
    elif change == "meta":
        module.to("meta")
    elif change == "new last parameter":
        module[2].bias = torch.nn.Parameter(module[2].bias.detach().clone())
    elif change == "layer swapped out":
        module[2] = torch.nn.Identity()
    else:
        with torch.no_grad():
            module[0].weight.add_(1.0)
    assert watch.changed()


@needs_ort
def test_onnxruntime_refuses_frames_once_the_towers_hooks_changed_until_rebuilt():
    # Its graph runs the hooks the tower had when it was exported: a hook registered since (an ablation, a
    # probe that edits the features) or removed since would silently not be what "torch" runs.
    import copy

    from torch.nn.modules.module import register_module_forward_hook

    model, tokenizer = make_tiny()
    kwargs = dict(goal=GOAL, baseline=BASELINE, alpha=0.5, device="cpu")
    rm = CLIPReward(model, tokenizer, backend="onnxruntime", **kwargs)
    frames = _noise(2, 224, 224, seed=5)
    unhooked = rm(frames)
    model.text_projection.register_hook(lambda g: g)  # not a forward hook of the tower: no change
    handle = model.transformer.register_forward_hook(lambda m, args, out: out)  # the text tower's: no change
    assert torch.equal(rm(frames), unhooked)
    handle.remove()
    ablate = model.visual.transformer.resblocks[0].attn.register_forward_hook(lambda m, args, out: (out[0] * 0, out[1]))
    for call in (lambda: rm(frames), lambda: rm.embed(frames), lambda: copy.deepcopy(rm)(frames)):
        with pytest.raises(ValueError, match=r"forward hooks on rm\.model\.visual.*registered or removed.*"
                                             r"rm\.rebuild_backend\(\)"):
            call()
    rm.rebuild_backend()
    hooked = CLIPReward(copy.deepcopy(model), tokenizer, backend="torch", kernels="torch", **kwargs)(frames)
    assert (hooked - unhooked).abs().max().item() > 1e-3  # the hook matters
    assert (rm(frames) - hooked).abs().max().item() <= 1e-5
    assert (copy.deepcopy(rm)(frames) - hooked).abs().max().item() <= 1e-5  # a copy holds the same hooks
    ablate.remove()
    with pytest.raises(ValueError, match="registered or removed"):  # the graph still ablates
        rm(frames)
    rm.rebuild_backend()
    assert (rm(frames) - unhooked).abs().max().item() <= 1e-6
    every = register_module_forward_hook(lambda m, args, out: out)  # a global hook runs inside the tower too
    try:
        with pytest.raises(ValueError, match="registered or removed"):
            rm(frames)
    finally:
        every.remove()
    assert (rm(frames) - unhooked).abs().max().item() <= 1e-6  # back to the hooks it was exported with


def test_the_hooks_watch_costs_a_walk_only_after_a_hook_handle_was_made(monkeypatch):
    from vlmrm_fast.backends import base

    tower = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU()))
    watch = base.HooksWatch(tower)
    walks = []
    real = base.forward_hook_keys
    monkeypatch.setattr(base, "forward_hook_keys", lambda module: walks.append(1) or real(module))
    assert not watch.changed() and not watch.changed() and walks == []
    torch.nn.Linear(1, 1).register_forward_hook(lambda *a: None)  # elsewhere: one walk, then none again
    assert not watch.changed() and not watch.changed() and len(walks) == 1
    handle = tower[1][0].register_forward_pre_hook(lambda *a: None)
    assert watch.changed()
    handle.remove()
    assert not watch.changed()


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=needs_ort)])
@pytest.mark.parametrize("change, moved", [
    (lambda model: model.visual.half(), "rm.model.visual is now torch.float16 on cpu"),
    (lambda model: model.visual.double(), "rm.model.visual is now torch.float64 on cpu"),
    (lambda model: model.transformer.to(torch.bfloat16), "rm.model's text side is now torch.bfloat16 on cpu"),
])
def test_a_model_moved_to_another_dtype_is_named_not_scored_and_not_rebuilt(backend, change, moved):
    # The reward model's preprocessing, backend and kernels are set up for the tower's dtype and device, and
    # the goals are encoded in float32: after rm.model.half() torch's own error (or ONNX Runtime's, after a
    # rebuild) said nothing of the cause, and a rebuild encoded the goals with a bf16 text side.
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.3, device="cpu", backend=backend)
    frames = _noise(2, 40, 40, seed=14)
    change(rm.model)
    match = re.escape(moved) + r" \(rm\.model\..*\), where this reward model runs it in torch\.float32 on cpu.*move it back.*or build a new CLIPReward"
    calls = [rm.rebuild_backend, lambda: rm.set_tasks(goal=GOAL, baseline=BASELINE)]
    if "visual" in moved:  # (the goals encoded before a change of the text side alone are still good)
        calls.append(lambda: rm(frames))
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
    rm.model.float()
    rm.rebuild_backend()
    want = reference_reward(__import__("copy").deepcopy(rm.model), tokenizer, frames, GOAL, BASELINE, 0.3)
    assert (rm(frames).double() - want).abs().max().item() <= 1e-5


@needs_ort
def test_onnxruntime_removes_the_graph_folders_killed_runs_of_this_host_left(monkeypatch, tmp_path):
    # The exported graph (gigabytes for the large towers) is in the system's temporary folder, removed when the
    # backend goes or at exit; a SIGKILL or the OOM killer runs neither, and no later run removed it.
    import os
    import subprocess

    from vlmrm_fast.backends import onnxruntime as ort_backend
    from vlmrm_fast.scratch import this_host

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    base = ort_backend._SCRATCH_BASE
    killed = tmp_path / f"{base}{this_host()}-{int(gone.stdout)}-abc"
    live = tmp_path / f"{base}{this_host()}-{os.getppid()}-abc"  # pytest's parent: a live process, a long run's
    elsewhere = tmp_path / f"{base}node17-123-abc"  # another host's or container's: not this host's to judge
    for folder in (killed, live, elsewhere):
        folder.mkdir()
        (folder / "tower.onnx").write_bytes(b"graph")
        os.utime(folder, (0, 0))  # days old
    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, device="cpu", backend="onnxruntime")
    assert not killed.exists() and live.exists() and elsewhere.exists()
    [own] = [f for f in tmp_path.iterdir() if f not in (live, elsewhere)]
    assert own.name.startswith(f"{base}{this_host()}-{os.getpid()}-") and (own / "tower.onnx").exists()
    del rm
    import gc

    gc.collect()
    assert not own.exists()


@pytest.mark.parametrize("backend", ["torch", "compile", pytest.param("onnxruntime", marks=needs_ort)])
def test_one_reward_model_called_from_three_threads_at_once(backend):
    # A data-loader thread and an evaluator scoring with one reward model: each thread's rewards equal those of
    # the same frames scored one call at a time. Frame sizes and batch sizes differ between the threads
    # (compile: two buckets, one padded), so a buffer or bucket shared between calls would show.
    import threading

    model, tokenizer = make_tiny()
    rm = CLIPReward(model, tokenizer, goal=GOAL, baseline=BASELINE, alpha=0.5, device="cpu", backend=backend,
                    backend_options={"buckets": (2, 4)} if backend == "compile" else None)
    batches = [_noise(n, h, w, seed=n) for n, h, w in ((1, 50, 70), (3, 224, 224), (4, 61, 33))]
    want = [rm(frames) for frames in batches]
    start = threading.Barrier(len(batches))
    got: dict = {}

    def score(i: int) -> None:
        start.wait()
        got[i] = [rm(batches[i]) for _ in range(4)]

    threads = [threading.Thread(target=score, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(got) == [0, 1, 2]
    for i, rewards in got.items():
        for reward in rewards:
            # fp32's 1e-5: torch's thread count, shared by the threads, may change the sums' order
            assert reward.shape == want[i].shape and torch.allclose(reward, want[i], rtol=0, atol=1e-5), (i, reward, want[i])
