"""The Triton kernels compile for Ampere (sm_80) and Hopper (sm_90) here, without a GPU, and do not spill.

Triton's CPU interpreter, which runs the numerical tests on machines without a GPU, accepts code its
compiler rejects; benchmarks/kernel_resources.py compiles every launch variant ahead of time with the
ptxas Triton ships, so a kernel that would not build on a GPU fails here first. Register spills
(local memory, stack) would cost a memory-bound kernel bandwidth, so any in a tile the ops launch is a
failure. Arguments are typed by Triton's own launch rule, so an integer equal to 1 (a stride, a
task count) is compiled as a constant, as on a GPU.
"""
import inspect
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

triton = pytest.importorskip("triton")
from triton.compiler import ASTSource  # noqa: E402


@pytest.mark.skipif("constexprs" not in inspect.signature(ASTSource.__init__).parameters,
                    reason=f"Triton {triton.__version__} predates the ahead-of-time API the script uses (3.3+)")
def test_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout's kernels
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--archs", "80", "90", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    kernels = ("_preprocess_kernel", "_score_kernel", "_identity_flat_kernel", "_identity_words_kernel",
               "_layer_norm_kernel", "_quick_gelu_kernel")
    assert {(r["kernel"], r["arch"]) for r in rows} == (
        {(kernel, arch) for kernel in kernels for arch in (80, 90)}
        | {("_quantize_rows_kernel", 90), ("_layer_norm_quantize_kernel", 90)})  # E4M3: sm_89+
    # one preprocess tuning tile, the two identity candidates (benchmarks/identity_variants.py) and one
    # LayerNorm launch, two archs each; the fp8 quantisation's six on sm_90 (two with the GELU first, one
    # with QuickGELU), the fp8 blocks' LayerNorm and quantisation's three (two with the residual add first);
    # QuickGELU's three dtypes
    assert len(rows) == 45 and sum(not r["default_launch"] for r in rows) == 8
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        assert "ld." in r["global_memory"] and "st." in r["global_memory"], r  # the PTX was read
        if r["default_launch"]:  # tuning candidates must compile; only the tiles in use must not spill
            assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, f"spills: {r}"
        if r["kernel"] == "_layer_norm_kernel":
            # The row mean is divided with IEEE rounding (tl.div_rn): a GPU compiles float32 "/" to div.full.f32,
            # up to 2 ulp off, which the interpreter's exact division hides; a constant row's mean must be the
            # constant (tests/test_layer_norm.py: its output is then the bias exactly).
            assert "div.rn.f32" in r["divisions"], r
        if r["kernel"] == "_layer_norm_quantize_kernel":
            # the LayerNorm's mean and the quantisation's divisions (one a value) IEEE-rounded; only the
            # variance's and the root's (one or two a row) may be 2 ulp off, which
            # tests/test_layer_norm_quantize.py's bound allows
            kinds = {name: int(n) for name, n in (item.split(" x") for item in r["divisions"].split(", "))}
            assert kinds["div.rn.f32"] >= 16 and kinds.get("div.full.f32", 0) + kinds.get("div.approx.f32", 0) <= 4, r
            assert r["fp8_conversions"].startswith("cvt.rn.satfinite.e4m3x2.f32") and "," not in r["fp8_conversions"], r
        if r["kernel"] == "_quantize_rows_kernel":
            # The same bytes as torch's ops (tests/test_quantize_rows.py, interpreted): IEEE divisions only,
            # and the conversion rounds to nearest (the interpreter's cast needed help: ROUND_BY_HAND)
            assert r["divisions"].startswith("div.rn.f32") and "," not in r["divisions"], r
            assert r["fp8_conversions"].startswith("cvt.rn.satfinite.e4m3x2.f32") and "," not in r["fp8_conversions"], r
            assert "st.v4.b32" in r["global_memory"], r  # 16 E4M3 values a store
