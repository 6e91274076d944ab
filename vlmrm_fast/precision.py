"""cuBLAS float32 matmuls without TF32 for the length of a block, whichever TF32 setting the process uses.

torch >= 2.9 has two ways to set TF32 for matmuls: the legacy flag
(``torch.backends.cuda.matmul.allow_tf32``) and ``fp32_precision``. Once a process has set the new
one, reading the legacy flag raises, and once it has set the legacy one, setting the new one makes
later reads of the legacy flag raise. So the block below works through the API the process already
uses: the legacy flag where it can still be read, ``fp32_precision`` otherwise.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def float32_matmuls() -> Iterator[None]:
    """Inside the block, CUDA float32 matmuls run in full float32 (TF32 off); the setting is restored
    after. A no-op for CPU matmuls, which never use TF32."""
    matmul = torch.backends.cuda.matmul
    try:
        name, previous, off = "allow_tf32", matmul.allow_tf32, False
    except RuntimeError:  # the process set fp32_precision: stay on that API
        name, previous, off = "fp32_precision", matmul.fp32_precision, "ieee"
    setattr(matmul, name, off)
    try:
        yield
    finally:
        setattr(matmul, name, previous)
