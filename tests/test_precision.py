"""``float32_matmuls`` / ``float32_convolutions`` turn TF32 off for a block and leave the process's
setting exactly as it was, whichever TF32 API the process used (on torch >= 2.9 reading a legacy flag
raises once the new API is set, and setting a legacy flag pins that operator in the new API).

Each case runs in a fresh interpreter: TF32 settings are process-wide and cannot be reset."""
import subprocess
import sys
import textwrap

import pytest
import torch

HAS_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")
needs_new_api = pytest.mark.skipif(not HAS_NEW_API, reason="torch < 2.9 has only the legacy allow_tf32 flags")

PRELUDE = """
import torch
from vlmrm_fast.precision import float32_convolutions, float32_matmuls
matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
"""


def _run(body: str) -> None:
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_legacy_flags_are_turned_off_and_restored():
    _run("""
        matmul.allow_tf32 = True
        with float32_matmuls(), float32_convolutions():
            assert matmul.allow_tf32 is False  # (cuDNN's legacy flag is unreadable while conv and RNN differ)
        assert matmul.allow_tf32 is True and cudnn.allow_tf32 is True  # cuDNN's default is on
    """)


@needs_new_api
def test_untouched_settings_stay_untouched():
    # Left at "none" (follow the global setting), not pinned by a legacy write on the way.
    _run("""
        with float32_matmuls(), float32_convolutions():
            assert matmul.fp32_precision == "ieee" and cudnn.conv.fp32_precision == "ieee"
            assert matmul.allow_tf32 is False  # (cuDNN's legacy flag is unreadable while conv and RNN differ)
        assert matmul.fp32_precision == "none" and matmul.allow_tf32 is False
        assert cudnn.conv.fp32_precision == "tf32" and cudnn.allow_tf32 is True  # cuDNN's default is on
        torch.backends.fp32_precision = "tf32"  # a later global choice still reaches matmuls
        assert matmul.fp32_precision == "tf32"
    """)


@needs_new_api
def test_new_api_settings_are_turned_off_and_restored():
    _run("""
        matmul.fp32_precision = "tf32"
        with float32_matmuls():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    """)


@needs_new_api
def test_global_new_api_setting():
    # torch.backends.fp32_precision makes cuDNN's legacy flag unreadable (torch.backends.cudnn.flags raises).
    _run("""
        torch.backends.fp32_precision = "tf32"
        with float32_matmuls(), float32_convolutions():
            assert matmul.fp32_precision == "ieee" and cudnn.conv.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32" and cudnn.conv.fp32_precision == "tf32"
    """)


RESTORES = {
    # Matmuls inherit torch.backends.fp32_precision: the block must not pin them to the value it read, or
    # a later global change no longer reaches them ("ieee" keeps the legacy flag readable, "tf32" not).
    "global tf32": ('torch.backends.fp32_precision = "tf32"', "tf32", "ieee", 'matmul.fp32_precision == "ieee"'),
    "global ieee": ('torch.backends.fp32_precision = "ieee"', "ieee", "tf32", 'matmul.fp32_precision == "tf32"'),
    # A matmul setting of its own stays its own.
    "own setting": ('matmul.fp32_precision = "tf32"; torch.backends.fp32_precision = "ieee"', "tf32", "none",
                    'matmul.fp32_precision == "tf32"'),
    # set_float32_matmul_precision("high") pins matmuls through the legacy flag; beside a global "tf32" that
    # flag stays readable and is what the block restores (as "none", a later global "ieee" would take TF32
    # away and make the legacy flag unreadable).
    "legacy pin": ('torch.backends.fp32_precision = "tf32"; torch.set_float32_matmul_precision("high")', "tf32",
                   "ieee", 'matmul.fp32_precision == "tf32" and matmul.allow_tf32 is True'),
}


@needs_new_api
@pytest.mark.parametrize("setup,after,later,then", RESTORES.values(), ids=RESTORES.keys())
def test_matmul_settings_are_restored_as_they_were_set(setup, after, later, then):
    _run(f"""
        {setup}
        with float32_matmuls():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "{after}"
        torch.backends.fp32_precision = "{later}"
        assert {then}
    """)


def test_a_matmul_precision_set_by_name_still_reads_after_the_block():
    # torch.set_float32_matmul_precision("medium") keeps the legacy flag readable, so the block goes through
    # it; writing it back mixed the two APIs, and torch.get_float32_matmul_precision() raised from then on.
    _run("""
        torch.set_float32_matmul_precision("medium")
        with float32_matmuls():
            assert matmul.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "medium" and matmul.allow_tf32 is True
    """)


# ---- behaviours a mutation audit found untested ---------------------------------------------------


def test_torch_without_the_new_api_goes_through_the_legacy_flag():
    # torch < 2.9 (this package supports 2.4 on) has no fp32_precision: the legacy flag is turned off and
    # restored, even where the new API would always be used (cuDNN convolutions), and nothing new is set.
    # Stand-in objects: the process's own flags are not touched.
    import types

    from vlmrm_fast.precision import _tf32_off

    for new_api_always in (False, True):
        owner = types.SimpleNamespace(allow_tf32=True)
        with _tf32_off(owner, owner, new_api_always=new_api_always):
            assert owner.allow_tf32 is False
        assert vars(owner) == {"allow_tf32": True}


def test_a_setting_is_restored_when_the_block_raises():
    import types

    from vlmrm_fast.precision import _tf32_off

    legacy, new = types.SimpleNamespace(allow_tf32=True), types.SimpleNamespace(fp32_precision="tf32")
    with pytest.raises(KeyError):
        with _tf32_off(legacy, new, new_api_always=True):
            assert new.fp32_precision == "ieee" and legacy.allow_tf32 is True
            raise KeyError("in the block")
    assert new.fp32_precision == "tf32" and legacy.allow_tf32 is True


def test_blocks_from_two_threads_leave_the_setting_as_it_was():
    # The settings are the process's: a block entered from a second thread while the first one's ran (two
    # threads scoring CUDA frames on the torch path) read "ieee", the first restored "tf32" under it, and the
    # second then wrote "ieee" back for good. Stand-in objects: the process's own flags are not touched.
    import threading
    import time
    import types

    from vlmrm_fast.precision import _tf32_off

    legacy, new = types.SimpleNamespace(allow_tf32=True), types.SimpleNamespace(fp32_precision="tf32")
    first_in, second_started, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first():
        with _tf32_off(legacy, new, new_api_always=True):
            first_in.set()
            second_started.wait(10)
            time.sleep(0.2)  # room for the second to enter, were it let in
        first_out.set()

    def second():
        first_in.wait(10)
        second_started.set()
        with _tf32_off(legacy, new, new_api_always=True):
            seen.append(new.fp32_precision)
            first_out.wait(10)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == ["ieee"] and new.fp32_precision == "tf32"
