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


def test_out_of_memory_is_raised_and_leaves_it_on(path):
    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        path.run(out_of_memory, lambda: "slow")
    assert path.on


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
