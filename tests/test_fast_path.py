"""The switch every tower fast path runs through (vlmrm_fast/backends/fast_path.py): the first failure turns
the path off for the process with one warning pointing at the caller's line; out-of-memory errors and
errors it is not meant to catch propagate and leave it on."""
import warnings

import pytest
import torch

from vlmrm_fast.backends import fast_path
from vlmrm_fast.backends.fast_path import FAST_PATHS, FastPath, turned_off


@pytest.fixture
def path(monkeypatch):
    """A fast path of its own, out of the registry again after the test."""
    monkeypatch.setattr(fast_path, "FAST_PATHS", list(FAST_PATHS))
    return FastPath("the test kernel (tests/test_fast_path.py)", "the slow ops run")


def test_it_runs_the_fast_path_while_on(path):
    assert path.run(lambda: "fast", lambda: "slow") == "fast" and path.on and path.name not in turned_off()


def test_the_first_failure_turns_it_off_with_one_warning_at_the_callers_line(path):
    calls = []

    def failing():
        calls.append("fast")
        raise RuntimeError("PTX .version 8.7 does not support .target sm_100" + "x" * 500)

    with pytest.warns(RuntimeWarning, match=r"the test kernel \(tests/test_fast_path.py\) failed here \(RuntimeError: "
                      r"PTX .version 8.7 .*\); the slow ops run from now on \(slower\)") as record:
        assert path.run(failing, lambda: "slow") == "slow"
    assert record[0].filename == __file__  # the caller's line, not the package's
    assert not path.on and len(path.failure) < 320 and turned_off() == {path.name: path.failure}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert path.run(failing, lambda: "slow") == "slow"  # no second try, no second warning
    assert calls == ["fast"]
    assert "off: RuntimeError" in repr(path)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("Triton Error [CUDA]: out of memory")])  # Triton's, loading a kernel
def test_out_of_memory_is_raised_and_leaves_it_on(path, error):
    def out_of_memory():
        raise error

    with pytest.raises(type(error), match="out of memory"):
        path.run(out_of_memory, lambda: "slow")
    assert path.on and path.declined_calls == 0


def test_an_error_the_stand_in_raises_too_is_not_the_paths_and_leaves_it_on(path):
    # A sticky CUDA error, or one an earlier kernel left: the slower ops fail as well, so the fast path is
    # not to blame. Its error is raised, from the fast path's, and nothing is turned off or warned about.
    def failing(what):
        def call():
            raise RuntimeError(f"CUDA error: an illegal memory access was encountered ({what})")
        return call

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match=r"\(stand-in\)") as raised:
            path.run(failing("fast"), failing("stand-in"))
    assert "(fast)" in str(raised.value.__cause__) and path.on


def test_declined_calls_count_the_calls_its_stand_in_answered(path):
    assert path.takes_call() and path.declined_calls == 0  # on: nothing counted
    with pytest.warns(RuntimeWarning, match="failed here"):
        path.run(lambda: 1 / 0, lambda: "slow")
    assert path.declined_calls == 1  # the call that failed
    assert not path.takes_call() and path.run(lambda: "fast", lambda: "slow") == "slow"
    assert fast_path.declined_calls()[path.name] == 3


def test_the_warning_names_the_users_line_through_a_tower_call(monkeypatch):
    # The call goes through torch's Module.__call__ and open_clip's tower into the swapped layer: the warning
    # names the line that called the tower, not either library's.
    from conftest import make_tiny
    from vlmrm_fast.backends import triton_layer_norm
    from vlmrm_fast.backends.triton_layer_norm import TritonLayerNorm, use_triton_layer_norm
    from vlmrm_fast.ops._triton import tower_kernels

    def failing(x, *args):
        raise RuntimeError("ptxas fatal: Unresolved extern function '__nv_rsqrtf'")

    monkeypatch.setattr(triton_layer_norm, "layer_norm_triton", failing)
    monkeypatch.setattr(TritonLayerNorm, "min_elements", 0)
    visual = make_tiny()[0].visual
    assert use_triton_layer_norm(visual) > 0
    with torch.inference_mode(), tower_kernels(), pytest.warns(RuntimeWarning, match="LayerNorm kernel") as record:
        visual(torch.zeros(1, 3, 224, 224))
    assert [w.filename for w in record] == [__file__]


def test_only_the_errors_named_turn_it_off(monkeypatch):
    monkeypatch.setattr(fast_path, "FAST_PATHS", list(FAST_PATHS))
    narrow = FastPath("the epilogue", "the unfused ops run", errors=(RuntimeError,))

    def wrong_type():
        raise TypeError("a bug of the caller's, not the path's")

    with pytest.raises(TypeError, match="caller's"):
        narrow.run(wrong_type, lambda: "slow")
    assert narrow.on


def test_every_tower_fast_path_is_registered():
    from vlmrm_fast.backends import fp8_block, gelu_epilogue, torch_fp8, triton_layer_norm, triton_quick_gelu

    paths = [triton_layer_norm.LAYER_NORM, triton_quick_gelu.QUICK_GELU, gelu_epilogue.GELU_EPILOGUE,
             torch_fp8.QUANTIZE_ROWS, fp8_block.LAYER_NORM_QUANTIZE]
    assert all(path in FAST_PATHS for path in paths) and len({path.name for path in paths}) == len(paths)
