"""``float32_matmuls`` turns TF32 off and back through whichever TF32 API the process used (on torch
>= 2.9, reading the legacy flag raises once the new one is set, and the other way round)."""
import pytest
import torch

from vlmrm_fast.precision import float32_matmuls

MATMUL = torch.backends.cuda.matmul
HAS_NEW_API = hasattr(MATMUL, "fp32_precision")


@pytest.fixture
def restore_tf32():
    """Put the process's TF32 setting back after a test changes it (through the API it then uses)."""
    try:
        name, value = "allow_tf32", MATMUL.allow_tf32
    except RuntimeError:
        name, value = "fp32_precision", MATMUL.fp32_precision
    yield
    setattr(MATMUL, name, value)


def test_legacy_flag_is_turned_off_and_restored(restore_tf32):
    MATMUL.allow_tf32 = True
    with float32_matmuls():
        assert MATMUL.allow_tf32 is False
    assert MATMUL.allow_tf32 is True  # and still readable: the new API was not touched


@pytest.mark.skipif(not HAS_NEW_API, reason="torch < 2.9 has only the legacy allow_tf32 flag")
def test_new_api_is_turned_off_and_restored(restore_tf32):
    MATMUL.fp32_precision = "tf32"
    with float32_matmuls():
        assert MATMUL.fp32_precision == "ieee"
    assert MATMUL.fp32_precision == "tf32"
