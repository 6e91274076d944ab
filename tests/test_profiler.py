"""Tests for the FPS profiler, ``vlmrm-fast bench`` (``vlmrm_fast.profiler``).

The FLOP counts are checked against SPEC §2's table from open_clip's configs alone (the big towers
are never instantiated). One short run of the tiny random-weights model on CPU (batch 1 and 2, one
repeat) is shared by the tests of the outputs; its timings are not checked, only that they exist
and are positive: speed on a shared 2-core machine says nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import open_clip
import pytest
import torch

from conftest import cuda_rowwise_scaled_mm
from vlmrm_fast import cli, create_clip, profiler
from vlmrm_fast.profiler import Row, check_targets, tower_gflops

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None

SPEC_GFLOPS = {
    "ViT-B-32": 8.82,
    "ViT-B-16": 35.13,
    "ViT-L-14": 162.03,
    "ViT-H-14": 334.59,
    "ViT-g-14": 534.06,
    "ViT-bigG-14": 967.5,
}


@pytest.mark.parametrize("name", SPEC_GFLOPS)
def test_tower_gflops_reproduces_spec_table_from_config(name, monkeypatch):
    def no_instantiation(*args, **kwargs):
        raise AssertionError("tower_gflops(name) must not build the model")

    monkeypatch.setattr(open_clip, "create_model", no_instantiation)
    assert tower_gflops(name) == pytest.approx(SPEC_GFLOPS[name], rel=0.01)


def test_tower_gflops_same_from_config_and_from_instantiated_tower():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, _ = create_clip("vlmrm-tiny", None)
    from_config = tower_gflops("vlmrm-tiny")
    assert tower_gflops(model) == pytest.approx(from_config, rel=1e-12)
    assert tower_gflops(model.visual) == pytest.approx(from_config, rel=1e-12)


def test_the_counter_sees_multihead_attention_in_eval_mode():
    # In eval mode under no_grad, nn.MultiheadAttention runs one fused op that torch's flop counter does
    # not know (open_clip's attentional-pool towers, CoCa, take it): every projection went uncounted.
    from vlmrm_fast.profiler.flops import counted_gflops

    class AttentionTower(torch.nn.Module):
        image_size = 8

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4, bias=False)
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.conv(x).flatten(2).transpose(1, 2)
            return self.attn(tokens, tokens, tokens, need_weights=False)[0]

    t, w = 4, 16  # multiply-adds x 2: patch embedding, q/k/v/out projections, scores and weighted sum
    expected = 2 * (t * w * 48 + t * 4 * w * w + 2 * t * t * w) / 1e9
    assert counted_gflops(AttentionTower().eval()) == pytest.approx(expected)
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is restored


def test_tower_gflops_counts_other_towers_and_warns():
    class TinyConvTower(torch.nn.Module):
        image_size = (16, 16)

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).flatten(1)

    # 4 x 4 outputs x 8 channels x (3 x 4 x 4) multiply-adds, 2 FLOPs each.
    with pytest.warns(UserWarning, match="undercount"):
        assert tower_gflops(TinyConvTower()) == pytest.approx(2 * 16 * 8 * 48 / 1e9)
    # A caller in inference mode (the profiler's own timing is) must get the same count: torch 2.4's
    # counter sees nothing under inference_mode.
    with pytest.warns(UserWarning, match="undercount"), torch.inference_mode():
        assert tower_gflops(TinyConvTower()) == pytest.approx(2 * 16 * 8 * 48 / 1e9)


# --------------------------------------------------------------------------- one short run


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """``vlmrm-fast bench`` on the tiny model: (exit code, output folder, stdout), run from an empty
    working directory (which must stay empty: profilers' traces go elsewhere)."""
    out = tmp_path_factory.mktemp("bench")
    backends = ["torch", "onnxruntime", "tensorrt"] if HAS_ORT else ["torch", "tensorrt"]
    argv = ["bench", "--models", "vlmrm-tiny", "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "1",
            "--backends", *backends, "--dtypes", "fp32", "int8", "--device", "cpu", "--out", str(out), "--no-progress",
            "--kernel-profile"]
    if not HAS_MPL:
        argv.append("--no-plot")
    stdout = io.StringIO()
    cwd, workdir = os.getcwd(), tmp_path_factory.mktemp("cwd")
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(stdout):
            code = cli.main(argv)
    finally:
        os.chdir(cwd)
    assert not list(workdir.iterdir()), list(workdir.iterdir())
    return code, out, stdout.getvalue()


@pytest.fixture(scope="module")
def results(bench_run):
    return json.loads((bench_run[1] / "bench.json").read_text())


def test_run_succeeds_and_writes_outputs(bench_run):
    code, out, stdout = bench_run
    assert code == 0, stdout
    assert {p.name for p in out.iterdir()} >= {"bench.json", "bench.md"}
    table = (out / "bench.md").read_text()
    assert "| model | backend | dtype |" in table and "| vlmrm-tiny | torch | fp32 |" in table
    assert "| model | backend | dtype |" in stdout  # the table is printed too
    assert "random" in table


@pytest.mark.skipif(not HAS_MPL, reason="the plot needs matplotlib: pip install 'vlmrm-fast[cli]'")
def test_plot_is_a_png(bench_run):
    png = (bench_run[1] / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_rows_cover_every_configuration(results):
    configurations = [("seed", "fp32"), ("torch", "fp32")] + ([("onnxruntime", "fp32"), ("onnxruntime", "int8")] if HAS_ORT else [])
    got = {(r["backend"], r["dtype"], r["batch"]) for r in results["rows"]}
    assert got == {(b, d, n) for b, d in configurations for n in (1, 2)}
    for row in results["rows"]:
        assert row["h2d_fps"] is None  # not applicable on CPU
        for stage in ("preprocess", "tower", "score", "end_to_end"):
            assert row[f"{stage}_fps"] > 0
            assert row["timings"][stage]["repeats"] == 1
        assert row["tower_gflops"] == pytest.approx(tower_gflops("vlmrm-tiny"))
        # TFLOP/s from the tower stage alone (GFLOP/img x tower frames/s), against this run's fp32 peak.
        assert row["achieved_tflops"] == pytest.approx(row["tower_gflops"] * row["tower_fps"] / 1e3)
        if row["dtype"] == "int8":
            assert row["frac_of_peak"] is None  # no int8 matmul peak is measured
        else:
            assert row["frac_of_peak"] == pytest.approx(row["achieved_tflops"] / results["peak_tflops"]["fp32"])
    assert results["peak_tflops"]["fp32"] == max(results["peak_samples"]["fp32"]) > 0
    assert len(results["peak_samples"]["fp32"]) == 2  # before and after the model
    assert results["complete"] is True and results["failures"] == []


def test_seed_rows_and_speedups(results):
    seed = [r for r in results["rows"] if r["backend"] == "seed"]
    assert [r["batch"] for r in seed] == [1, 2]
    assert all(r["frame_size"] == 480 and r["dtype"] == "fp32" for r in seed)
    for row in results["rows"]:
        if row["backend"] != "seed":  # the seed is timed again, in alternation with each row
            paired = row["timings"]["seed_end_to_end"]
            assert row["seed_fps"] == pytest.approx(row["batch"] / paired["median_s"])
            assert row["speedup_vs_seed"] == pytest.approx(row["end_to_end_fps"] / row["seed_fps"])
            assert row["speedup_vs_seed"] > 0


def test_seed_pipeline_is_the_original_computation():
    """Every speedup divides by the seed's speed, so the seed must do the original's work, no more:
    torchvision's bicubic without antialiasing at full resolution, the fp32 tower, and the reward of
    SPEC §1.1 through the D x D matrix for its own goal g and unit direction u (alpha 0.5).
    Tolerances: the resize is torch's own float32 bicubic, ~2e-4 from float64 at 480 -> 224 (an
    antialiased or otherwise different resize costs >1e-2); the tower and the score ~1e-6."""
    import numpy as np
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from conftest import make_tiny
    from reference import float64_model, reference_preprocess, reference_reward_from_embeddings
    from vlmrm_fast.models import preprocess_spec_of
    from vlmrm_fast.profiler.seed import ALPHA, SeedPipeline

    model = make_tiny(seed=2)[0]
    model64 = float64_model(model)
    seed = SeedPipeline(model, preprocess_spec_of(model, "vlmrm"), torch.device("cpu"))
    frames = np.random.default_rng(9).integers(0, 256, (3, 480, 480, 3), dtype=np.uint8)
    exact = torch.from_numpy(reference_preprocess(frames, 224, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    with torch.inference_mode():
        pixels = seed.preprocess(torch.from_numpy(frames))
        assert pixels.dtype == torch.float32 and (pixels.double() - exact).abs().max().item() < 5e-4
        embeddings = seed.tower(exact.float())
        want = torch.nn.functional.normalize(model64.encode_image(exact), dim=-1)
        assert (embeddings.double() - want).abs().max().item() < 1e-5
        # The seed's own targets, from its documented construction; its reward is SPEC's formula.
        g = seed.goal.double()
        u = torch.linalg.eigh(seed.projection.double()).eigenvectors[:, -1]  # eigenvalue 1: u (unit)
        expected = reference_reward_from_embeddings(embeddings.double(), g, u, ALPHA)
        assert (seed.score(embeddings).double() - expected).abs().max().item() < 1e-5
        assert torch.allclose(seed.projection.double(), ALPHA * torch.outer(u, u) + (1 - ALPHA) * torch.eye(len(u)),
                              atol=1e-6)


def test_onnxruntime_build_time_is_reported_apart(results):
    if not HAS_ORT:
        pytest.skip("needs onnxruntime (pip install 'vlmrm-fast[export]')")
    ort_rows = [r for r in results["rows"] if r["backend"] == "onnxruntime"]
    assert all(r["build_seconds"] > 0 for r in ort_rows)
    assert all(r["build_seconds"] == 0 for r in results["rows"] if r["backend"] == "torch")


def test_reward_error_against_the_float32_eager_path(results):
    errors = {(r["backend"], r["dtype"]): r["reward_error"] for r in results["rows"]}
    assert errors[("seed", "fp32")] is None  # the seed scores its own random goal
    assert errors[("torch", "fp32")] == 0.0  # the reference path itself, on the same frames
    if HAS_ORT:
        assert errors[("onnxruntime", "fp32")] <= 1e-5  # float32 up to summation order
        # int8 is lossy (the check would catch a silently unquantised tower) but stays small: the
        # tolerance for it against float64 is argued in tests/test_quantize.py.
        assert 1e-5 < errors[("onnxruntime", "int8")] < 1e-2


def test_quantised_precision_is_skipped_for_other_backends(results):
    reasons = {s["what"]: s["reason"] for s in results["skipped"]}
    assert "onnxruntime" in reasons["vlmrm-tiny torch int8"]


def test_environment_is_recorded(results):
    env = results["environment"]
    for key in ("timestamp", "commit", "vlmrm_fast", "device", "torch", "open_clip", "python"):
        assert env[key], key
    import vlmrm_fast  # an installed copy has no commit to name: its version says what ran

    assert env["vlmrm_fast"] == vlmrm_fast.__version__
    assert env["device_type"] == "cpu" and "random" in env["weights"]
    assert results["config"]["batch_sizes"] == [1, 2]


def test_unavailable_backend_is_skipped_with_a_reason(results, bench_run):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    [skipped] = [s for s in results["skipped"] if s["what"] == "tensorrt"]
    assert "CUDA" in skipped["reason"]
    assert "skipped tensorrt" in bench_run[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_short_cuda_run(tmp_path):
    # What the CPU run cannot reach: pinned host-to-device copies, the L2 flush, the fp16-autocast
    # seed, CUDA graphs in "compile" and bf16/fp16 matmul peaks. A cheap check before the long runs.
    argv = ["bench", "--models", "vlmrm-tiny", "--batch-sizes", "1", "8", "--repeats", "2", "--warmup", "1",
            "--backends", "torch", "compile", "--dtypes", "bf16", "fp16", "--device", "cuda", "--frame-size", "224",
            "--out", str(tmp_path), "--no-progress", "--no-plot", "--kernel-profile"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(argv) == 0, stdout.getvalue()
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["complete"] is True and results["failures"] == [], results["failures"]
    got = {(r["backend"], r["dtype"], r["batch"]) for r in results["rows"]}
    assert got == {(b, d, n) for b, d in [("seed", "fp16-autocast"), ("torch", "bf16"), ("torch", "fp16"),
                                           ("compile", "bf16"), ("compile", "fp16")] for n in (1, 8)}
    eager_error = {(r["dtype"], r["batch"]): r["reward_error"] for r in results["rows"] if r["backend"] == "torch"}
    for row in results["rows"]:
        for stage in ("h2d", "preprocess", "tower", "score", "end_to_end"):
            assert row[f"{stage}_fps"] > 0, (row["backend"], stage)
        if row["backend"] == "torch":
            # Against the float32 eager path: bf16/fp16 rounding alone, ~1e-3 on the tiny tower
            # (tests/test_reward.py measures PyTorch's own); 1e-2 is a sanity bound for the pipeline.
            assert 0 < row["reward_error"] < 1e-2 and row["speedup_vs_seed"] > 0
        elif row["backend"] == "compile":  # the bar of the compile backend's own GPU test
            assert row["reward_error"] <= 2 * eager_error[(row["dtype"], row["batch"])] + 1e-5
            assert row["speedup_vs_seed"] > 0
    assert results["peak_tflops"]["bf16"] > 0 and results["peak_tflops"]["fp16"] > 0
    assert results["environment"]["device_type"] == "cuda"
    # Kernel profiles at batch 8 from CUPTI's device kernels; eager's GEMMs and attention must be seen
    # (CUDA-graph replays of "compile" may hide theirs: that profile only has to exist).
    profiles = {(p["backend"], p["dtype"]): p for p in results["kernel_profiles"]}
    assert set(profiles) == {(b, d) for b in ("torch", "compile") for d in ("bf16", "fp16")}
    for (backend, _), p in profiles.items():
        assert p["source"] == "cuda kernels" and p["batch"] == 8 and p["ceiling_ms"] > 0
        # Annotated ranges (torch.compile's "## Call CompiledFxGraph ##" spans the graph's kernels) are
        # not counted as kernels: device time stays within the wall time (one stream; loose for jitter).
        assert not [k for k in p["kernels"] if k["name"].startswith("## ")]
        assert p["busy_ms"] <= 1.5 * p["wall_ms"], (p["busy_ms"], p["wall_ms"], p["kernels"][:5])
        if backend == "torch":
            assert p["by_kind_ms"]["matmul"] > 0 and p["by_kind_ms"]["attention"] > 0, p["kernels"][:10]


# --------------------------------------------------------------------------- options and targets


def test_quick_defaults():
    args = cli.build_parser().parse_args(["bench", "--quick", "--device", "cpu"])
    config = profiler.resolve_config(args)
    assert config.models == ["vlmrm-tiny"] and config.batch_sizes == [1, 8]
    assert config.backends == ["torch", "onnxruntime"] and config.repeats == 3 and config.dtypes == ["fp32"]
    assert config.frame_size == 480 and config.seed


def test_kernel_profile_of_the_largest_batch(results, bench_run):
    profiles = {(p["backend"], p["dtype"]): p for p in results["kernel_profiles"]}
    assert set(profiles) == {("torch", "fp32")} | ({("onnxruntime", "fp32"), ("onnxruntime", "int8")} if HAS_ORT else set())
    rows = {(r["backend"], r["dtype"], r["batch"]): r for r in results["rows"]}
    tiny = open_clip.get_model_config("vlmrm-tiny")["vision_cfg"]
    for (backend, dtype), p in profiles.items():
        # ONNX Runtime's CPU kernels are invisible to torch.profiler: its own profiler gives its nodes.
        assert p["batch"] == 2 and p["calls"] == 3
        assert p["source"] == ("onnxruntime nodes" if backend == "onnxruntime" else "cpu torch ops")
        # Every kind the tower runs is found (ONNX Runtime times nodes in whole microseconds: the tiny
        # model's softmax may read 0), and the matmuls take time.
        assert {"matmul", "attention", "layernorm"} <= {k["kind"] for k in p["kernels"]}, p["kernels"]
        assert p["by_kind_ms"]["matmul"] > 0
        # Per call, not per profiled run: two layer norms per block, one before the blocks and one after
        # (ONNX Runtime may fuse some with the residual add; torch's aten::layer_norm wraps the native op).
        norms = [k for k in p["kernels"] if k["kind"] == "layernorm" and k["name"] != "aten::layer_norm"]
        assert sum(k["launches"] for k in norms) == 2 * tiny["layers"] + 2, norms
        # Wall time is the tower stage's unprofiled median; the rest follows from the kernels.
        assert p["wall_ms"] == pytest.approx(1e3 * rows[(backend, dtype, 2)]["timings"]["tower"]["median_s"])
        assert sum(p["by_kind_ms"].values()) == pytest.approx(p["busy_ms"]) == pytest.approx(sum(k["ms"] for k in p["kernels"]))
        assert p["idle_ms"] == pytest.approx(max(0.0, p["wall_ms"] - p["busy_ms"]))
        peak = results["peak_tflops"].get(dtype)
        assert p["ceiling_ms"] == (None if peak is None else pytest.approx(tower_gflops("vlmrm-tiny") * 2 / peak))
    eager = profiles[("torch", "fp32")]
    kinds = eager["by_kind_ms"]
    assert eager["matmul_attention_tflops"] == pytest.approx(
        tower_gflops("vlmrm-tiny") * 2 / (kinds["matmul"] + kinds["attention"]))
    if HAS_ORT:  # the int8 graph's weight matmuls are integer ones, and its profile says so
        assert any("Integer" in k["name"] or "Quantize" in k["name"] for k in profiles[("onnxruntime", "int8")]["kernels"])
    table = (bench_run[1] / "bench.md").read_text()
    assert "## Where the tower's time goes" in table and "| vlmrm-tiny | torch | fp32 | torch | 2 | cpu torch ops |" in table
    # Each configuration's costliest ops, as listed in the JSON (which ops make the cut depends on timing
    # noise: layer norm's 6 launches are checked above from the JSON, not here).
    for kernel in eager["kernels"][:3]:
        assert f"| `{kernel['name']}` | {kernel['kind']} | {kernel['launches']:g} |" in table, kernel


@pytest.mark.parametrize("name, kind", [
    # cuBLAS / cuBLASLt GEMMs (Ampere, Hopper), cuDNN convolution, CUTLASS, Inductor's template matmul
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "matmul"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_bias_gelu_TNN", "matmul"),  # the GELU in its epilogue
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_gelu_aux_bias", "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn", "matmul"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "matmul"),
    ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8", "matmul"),
    ("triton_tem_fused_mm_3", "matmul"),
    ("FusedConv", "matmul"), ("QLinearConv", "matmul"), ("ConvInteger", "matmul"),  # ONNX Runtime's
    ("aten::addmm", "matmul"), ("aten::mm", "matmul"), ("aten::bmm", "matmul"), ("aten::mkldnn_convolution", "matmul"),
    ("aten::_scaled_mm", "matmul"), ("aten::_int_mm", "matmul"),  # fp8 and int8 products: no word boundary before mm
    # fused attention (their names contain "gemm" too), softmax of the unfused path
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t>>",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>::Params)",
     "attention"),
    ("_gemm_mha_v2_bf16_128_64_sm90", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("triton_per_fused__softmax_clone_5", "attention"),
    # layer norms: ATen's CUDA kernel, Inductor's fused one (which also names a copy), ONNX Runtime's
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "layernorm"),
    ("triton_per_fused_native_layer_norm_clone_2", "layernorm"),
    ("_layer_norm_kernel", "layernorm"),  # this package's (vlmrm_fast/ops/layer_norm.py), in the torch backend
    ("_layer_norm_quantize_kernel", "layernorm"),  # the fp8 blocks' (ops/layer_norm_quantize.py): mostly its norm
    ("__myl_AddCastMeanSubMulMeanAddSqrtDivMulCastMulAdd_0x1a2b", "layernorm"),  # TensorRT's fused norm
    ("void onnxruntime::cuda::cuApplyLayerNorm<float, float, float, false>", "layernorm"),
    ("aten::native_layer_norm", "layernorm"),
    # copies and layout changes
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda>>",
     "copy"),
    ("aten::cat", "copy"), ("aten::copy_", "copy"),
    ("triton_poi_fused_cat_0", "copy"), ("triton_poi_fused__to_copy_0", "copy"),
    ("Reshape", "copy"), ("Squeeze", "copy"), ("Unsqueeze", "copy"), ("Flatten", "copy"),  # ONNX Runtime's nodes
    # everything else: activations, adds, casts, fused mixes
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("triton_poi_fused_add_gelu_4", "elementwise"), ("aten::gelu", "elementwise"), ("aten::add", "elementwise"),
    ("__myl_MulAddCast_0x7f", "elementwise"),
    ("_quick_gelu_kernel", "elementwise"), ("_quantize_rows_kernel", "elementwise"),  # this package's (ops/)
    # Inductor's pointwise kernels after a cuBLAS matmul (bias, activation) are not matmuls, nor copies
    # when they only absorb a cast; "convert" is not a convolution
    ("triton_poi_fused_addmm_gelu_3", "elementwise"), ("triton_poi_fused__to_copy_gelu_view_3", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, convert_kernel>", "elementwise"),
])
def test_kernel_kind_by_name(name, kind):
    from vlmrm_fast.profiler.kernels import kernel_kind

    assert kernel_kind(name) == kind


def test_summarize_events_counts_device_kernels_per_call():
    from types import SimpleNamespace

    from vlmrm_fast.profiler.kernels import summarize_events

    def event(key, device, self_cpu_us, self_device_us, count, old_torch=False):
        fields = dict(key=key, device_type=f"DeviceType.{device}", self_cpu_time_total=self_cpu_us, count=count)
        fields["self_cuda_time_total" if old_torch else "self_device_time_total"] = self_device_us
        return SimpleNamespace(**fields)

    events = [
        event("aten::addmm", "CPU", 900.0, 0.0, 12),  # host side of a launch: not device time
        # torch.compile's range around a graph call spans its kernels: not a kernel itself
        event("## Call CompiledFxGraph fabc ##", "CUDA", 0.0, 9000.0, 3),
        event("cudaLaunchKernel", "CPU", 300.0, 0.0, 30),
        event("nvjet_tst_gemm", "CUDA", 0.0, 6000.0, 12),
        event("vectorized_layer_norm_kernel", "CUDA", 0.0, 1500.0, 15, old_torch=True),
        event("idle_kernel", "CUDA", 0.0, 0.0, 3),  # no time: left out
        # torch.compile's guard checks and wrappers on CPU: plain ranges, not ops
        event("TorchDynamo Cache Lookup", "CPU", 540.0, 0.0, 3),
        event("Torch-Compiled Region: 0/1", "CPU", 370.0, 0.0, 3),
        event("Pregraph bytecode", "CPU", 60.0, 0.0, 3),
        event("AOTDispatcher Runtime Wrapper Prologue", "CPU", 30.0, 0.0, 3),
    ]
    events.append(SimpleNamespace(key="my_range", device_type="DeviceType.CUDA", self_cpu_time_total=0.0,
                                  self_device_time_total=9000.0, count=3, is_user_annotation=True))
    gemm, norm = summarize_events(events, on_cuda=True, calls=3)
    assert (gemm.name, gemm.kind, gemm.launches, gemm.ms) == ("nvjet_tst_gemm", "matmul", 4, 2.0)
    assert (norm.name, norm.kind, norm.launches, norm.ms) == ("vectorized_layer_norm_kernel", "layernorm", 5, 0.5)
    # On CPU the ops' self time counts instead, device events are ignored, and the costliest comes first.
    addmm, launch = summarize_events(events, on_cuda=False, calls=3)
    assert (addmm.name, addmm.ms, addmm.launches) == ("aten::addmm", 0.3, 4)
    assert launch.name == "cudaLaunchKernel" and launch.ms == pytest.approx(0.1)


def test_kernel_profiles_come_after_every_timing(tmp_path, monkeypatch):
    # On CUDA the profiler's CUPTI can stay attached and slow what is timed after it.
    from vlmrm_fast.profiler import run as bench

    order = []
    measure, profile = bench.Profiler._measure_reward, bench.profile_tower
    monkeypatch.setattr(bench.Profiler, "_measure_reward", lambda *a, **k: order.append("time") or measure(*a, **k))
    monkeypatch.setattr(bench, "profile_tower", lambda *a, **k: order.append("profile") or profile(*a, **k))
    argv = ["bench", "--models", "vlmrm-tiny", "--batch-sizes", "1", "--repeats", "1", "--no-seed", "--backends", "torch",
            "--dtypes", "fp32", "bf16", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--no-plot",
            "--kernel-profile"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    assert order == ["time", "time", "profile", "profile"]
    assert [p["dtype"] for p in json.loads((tmp_path / "bench.json").read_text())["kernel_profiles"]] == ["fp32", "bf16"]


def test_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch):
    # A job's time limit (SIGTERM) or Ctrl-C in the second configuration: the first one's rows are on
    # disk, marked incomplete, and the command exits 130. They were on disk before it began, too (a
    # SIGKILL gives no chance to write).
    from vlmrm_fast.profiler import run as bench

    measure = bench.Profiler._profile_backend
    calls, on_disk = [], []

    def interrupted(self, *args, **kwargs):
        calls.append(args[3])  # the backend
        if len(calls) == 2:
            on_disk.extend(r["backend"] for r in json.loads((tmp_path / "bench.json").read_text())["rows"])
            raise KeyboardInterrupt
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(bench.Profiler, "_profile_backend", interrupted)
    argv = ["bench", "--models", "vlmrm-tiny", "--batch-sizes", "1", "2", "--repeats", "1", "--backends", "torch",
            "compile", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--no-plot"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 130
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["complete"] is False and calls == ["torch", "compile"]
    assert on_disk == ["seed", "seed", "torch", "torch"]
    assert {(r["backend"], r["batch"]) for r in results["rows"]} == {(b, n) for b in ("seed", "torch") for n in (1, 2)}
    assert "incomplete" in (tmp_path / "bench.md").read_text()


def test_sigterm_becomes_keyboard_interrupt_inside_the_run_only():
    import signal

    from vlmrm_fast.profiler.timing import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert signal.getsignal(signal.SIGTERM) is before


def test_kernel_profiles_take_the_best_peak_measured():
    from vlmrm_fast.profiler.kernels import KernelTime, TowerProfile
    from vlmrm_fast.profiler.report import Report

    report = Report(environment={}, config={})
    report.add_peak("bf16", 500.0, 8192)
    profile = TowerProfile(model="ViT-B-32", backend="torch", dtype="bf16", batch=1024, source="cuda kernels",
                           calls=3, wall_ms=300.0, gflops_per_image=8.82, peak_tflops=500.0,
                           kernels=[KernelTime("nvjet_gemm", "matmul", 72, 200.0), KernelTime("flash_fwd", "attention", 12, 25.0),
                                    KernelTime("layer_norm", "layernorm", 25, 30.0)])
    report.kernel_profiles.append(profile)
    report.add_peak("bf16", 800.0, 8192)  # a later, better measurement (the first was on a busy moment)
    report.set_peaks()
    assert profile.peak_tflops == 800.0
    assert profile.ceiling_ms == pytest.approx(8.82 * 1024 / 800.0)
    assert profile.busy_ms == 255.0 and profile.idle_ms == 45.0
    assert profile.matmul_tflops == pytest.approx(8.82 * 1024 / 225.0)
    # Shares are of the wall time, or of the kernels' sum where a profiler's overhead makes it larger.
    from vlmrm_fast.profiler.kernels import markdown_kernel_profiles

    assert "| 200 (67%) | 25 (8%) | 30 (10%) | 0 (0%) | 0 (0%) | 45 (15%) |" in "\n".join(markdown_kernel_profiles([profile]))
    profile.wall_ms = 200.0
    assert profile.whole_ms == 255.0 and profile.idle_ms == 0.0
    assert "| 200 (78%) | 25 (10%) | 30 (12%) | 0 (0%) | 0 (0%) | 0 (0%) |" in "\n".join(markdown_kernel_profiles([profile]))
    assert not profile.disturbed and "Disturbed" not in "\n".join(markdown_kernel_profiles([profile]))
    # Profiled while other work took the cores (seen on a loaded 2-core machine: 121 ms of ops a call, 1.73 ms wall).
    profile.wall_ms = 100.0
    assert profile.disturbed and profile.as_json()["disturbed"] is True
    assert ("Disturbed: the profiled calls of ViT-B-32 torch bf16 at batch 1024 took 3x the timed ones (255 ms of ops "
            "a call against 100 ms wall)") in "\n".join(markdown_kernel_profiles([profile]))


def test_unknown_model_fails_before_any_work(tmp_path, capsys):
    assert cli.main(["bench", "--models", "ViT-B-33", "--device", "cpu", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "Unknown model 'ViT-B-33'" in err and "Did you mean ViT-B-32" in err  # as score, export and train
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("free", [None, 2 * 10**9], ids=["allocation-fails", "checked-first"])
def test_frames_that_do_not_fit_name_the_batch_size_and_leave_no_folder(tmp_path, monkeypatch, capsys, free):
    # `bench --batch-sizes 100000`: its frames alone take 15 GB at 224 px. Where the memory free is known and too
    # small, refused before allocating (Linux may grant it and kill the process later); else the allocator's
    # failure (a RuntimeError) is turned into the same one line. The folders --out made are removed again.
    from vlmrm_fast.profiler import run as bench

    def allocator_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 15052800000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(bench.Frames, "_make", classmethod(allocator_fails))
    monkeypatch.setattr(bench, "available_memory", lambda device: free)
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "by" / "run", tmp_path / "kept"):
        argv = ["bench", "--models", "vlmrm-tiny", "--batch-sizes", "1", "100000", "--frame-size", "224", "--no-seed",
                "--backends", "torch", "--device", "cpu", "--out", str(out), "--no-progress", "--no-plot"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert ("error: out of memory at --batch-sizes 100000: its frames alone (100000 x 224 x 224 x 3 bytes) take "
                "15.1 GB, more than the cpu memory could give") in err and "pass smaller --batch-sizes" in err
        assert ("(2.0 GB available)" in err) == (free is not None)
    assert not (tmp_path / "by").exists() and (tmp_path / "kept").is_dir()  # made by the run: gone; given: kept


def test_frames_that_do_not_fit_name_the_frame_size_where_it_is_the_cause(monkeypatch):
    # `bench --frame-size 100000`: 30 GB a frame, which no --batch-sizes brings down (the error said to lower it).
    from vlmrm_fast.profiler import run as bench

    monkeypatch.setattr(bench, "available_memory", lambda device: 2 * 10**9)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"\(1 x 100000 x 100000 x 3 bytes\) take 30.0 GB, more than the cpu memory could "
                                         r"give \(2.0 GB available\); pass a smaller --frame-size \(the tower's"):
        bench.Frames.make(1, 100000, cpu, seed=False)
    with pytest.raises(ValueError, match="; pass smaller --batch-sizes or a smaller --frame-size "):
        bench.Frames.make(8, 20000, cpu, seed=False)
    with pytest.raises(ValueError, match=r"; pass smaller --batch-sizes \(the tower's"):
        bench.Frames.make(10**5, 224, cpu, seed=False)


def test_frames_for_a_gpu_are_checked_against_host_memory_too(monkeypatch):
    # On CUDA the frames are drawn in host memory first and kept there: host memory runs out too, and the error
    # must name the memory that did not suffice (no GPU needed: the memory figures are stand-ins).
    from vlmrm_fast.profiler import run as bench

    cuda = torch.device("cuda")
    for host_free, gpu_free, named in ((10**9, 10**12, "cpu"), (10**12, 10**9, "cuda")):
        monkeypatch.setattr(bench, "available_memory",
                            lambda device, h=host_free, g=gpu_free: h if device.type == "cpu" else g)
        with pytest.raises(ValueError, match=f"more than the {named} memory could give"):
            bench.Frames.make(100000, 224, cuda, seed=False)

    def gpu_out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.02 GiB")

    monkeypatch.setattr(bench.Frames, "_make", classmethod(gpu_out_of_memory))
    monkeypatch.setattr(bench, "available_memory", lambda device: None)
    with pytest.raises(ValueError, match="more than the cuda memory could give"):
        bench.Frames.make(8, 224, cuda, seed=False)


def test_other_runtime_errors_making_the_frames_are_not_called_out_of_memory(monkeypatch):
    from vlmrm_fast.profiler import run as bench

    def broken(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(bench.Frames, "_make", classmethod(broken))
    monkeypatch.setattr(bench, "available_memory", lambda device: None)
    with pytest.raises(RuntimeError, match="something else"):
        bench.Frames.make(8, 224, torch.device("cpu"), seed=False)


def _row(model: str, backend: str, fps: float, seed_fps: float, dtype: str = "fp32") -> Row:
    return Row(model=model, backend=backend, dtype=dtype, kernels="torch", batch=8, frame_size=480,
               h2d_fps=None, preprocess_fps=1.0, tower_fps=1.0, score_fps=1.0, end_to_end_fps=fps,
               tower_gflops=8.82, flops_method="analytic", achieved_tflops=0.1, peak_tflops=None,
               frac_of_peak=None, build_seconds=0.0, setup_seconds=0.0, seed_fps=seed_fps,
               speedup_vs_seed=fps / seed_fps)


def test_targets_take_the_best_configuration():
    rows = [_row("ViT-B-32", "torch", 12.0, 10.0), _row("ViT-B-32", "onnxruntime", 16.0, 10.0)]
    [cpu] = check_targets(rows, torch.device("cpu"))
    assert cpu["met"] and cpu["measured"] == pytest.approx(1.6) and cpu["where"].startswith("onnxruntime")
    # On CPU each precision gets its own line: a target met only in int8 does not hide fp32's miss.
    fp32, int8 = check_targets(rows + [_row("ViT-B-32", "onnxruntime", 25.0, 10.0, "int8")], torch.device("cpu"))
    assert "(fp32)" in fp32["kind"] and fp32["measured"] == pytest.approx(1.6)
    assert "(int8)" in int8["kind"] and int8["measured"] == pytest.approx(2.5) and "int8" in int8["where"]
    gpu_rows = [_row("ViT-B-32", "compile", 60_000.0, 20_000.0, "bf16"), _row("ViT-B-32", "torch", 70_000.0, 20_000.0)]
    [gpu] = check_targets(gpu_rows, torch.device("cuda"))
    assert gpu["met"] and gpu["measured"] == 60_000.0  # only bf16 rows count on the GPU
    # fp8 rows get their own GPU lines, so that bf16's result stands on its own.
    bf16, fp8 = check_targets(gpu_rows + [_row("ViT-B-32", "tensorrt", 40_000.0, 20_000.0, "fp8")], torch.device("cuda"))
    assert "(bf16)" in bf16["kind"] and bf16["measured"] == 60_000.0 and bf16["met"]
    assert "(fp8)" in fp8["kind"] and fp8["measured"] == 40_000.0 and not fp8["met"]
    # A run of both kernel paths says which one the best figure came from.
    triton_row = dataclasses.replace(_row("ViT-B-32", "torch", 65_000.0, 20_000.0, "bf16"), kernels="triton")
    [ab] = check_targets(gpu_rows + [triton_row], torch.device("cuda"))
    assert ab["measured"] == 65_000.0 and ab["where"] == "torch bf16 batch 8, 480 px, kernels triton"
    assert "kernels" not in gpu["where"]  # one path: nothing to tell apart


def test_commit_of_a_tree_without_its_git_folder(tmp_path, monkeypatch):
    """A copy of the tree sent to a GPU machine has no .git: results name the commit the session gives
    in $VLMRM_FAST_COMMIT, and "unknown" without it, never another repository's commit."""
    from vlmrm_fast import run_info

    assert run_info.git_commit() not in ("", "unknown")  # this checkout
    monkeypatch.setattr(run_info, "REPO_ROOT", tmp_path)  # not a git checkout
    monkeypatch.delenv(run_info.COMMIT_VARIABLE, raising=False)
    assert run_info.git_commit() == "unknown"
    monkeypatch.setenv(run_info.COMMIT_VARIABLE, "7a93ce9")
    assert run_info.git_commit() == "7a93ce9"


def _products_counting_timer(products: list, timed: list, repeats: int):
    """A CPU StageTimer that appends (products made during the call, its seconds) to ``timed`` for each
    timed call; ``products`` is the list a stand-in ``torch.mm`` appends to."""
    from vlmrm_fast.profiler import timing

    class CountingTimer(timing.StageTimer):
        def _time_once(self, fn):
            before = len(products)
            seconds = super()._time_once(fn)
            timed.append((len(products) - before, seconds))
            return seconds

    return CountingTimer(torch.device("cpu"), warmup=0, repeats=repeats, time_budget=1.0)


def test_matmul_peak_times_bursts_of_products(monkeypatch):
    # One product timed alone carries the synchronisation around it (1-2% of an 8192^3 bf16 product
    # on an H200): each timed repeat is a burst of about PEAK_BURST_S, and the FLOPs count all of it.
    from vlmrm_fast.profiler import timing

    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(timing.torch, "mm", lambda *a, **k: (calls.append(1), real_mm(*a, **k))[1])
    monkeypatch.setattr(timing, "PEAK_SIZE", {"cpu": 256, "cuda": 256})  # a 512^3 product: ~1 ms here
    # Bursts of up to a second: even on a loaded machine (one product taking 30 ms, not 1) a burst holds
    # more than one product; idle, PEAK_MAX_BURST caps it at a fraction of that.
    monkeypatch.setattr(timing, "PEAK_BURST_S", 1.0)
    timed = []
    tflops, n = timing.measure_peak_tflops(torch.device("cpu"), torch.float32, _products_counting_timer(calls, timed, 3))
    burst = timed[0][0]
    assert n == 512 and 1 < burst <= timing.PEAK_MAX_BURST and all(k == burst for k, _ in timed)
    median_s = sorted(s for _, s in timed)[1]
    assert tflops == pytest.approx(2 * n**3 * burst / median_s / 1e12)


def test_fp8_matmul_peak_runs_as_the_fp8_backends_do(monkeypatch):
    # fp8 rows are set against an fp8 product: torch._scaled_mm of E4M3 operands with per-row scales.
    from vlmrm_fast.profiler import run, timing

    seen = []
    monkeypatch.setattr(timing.torch, "_scaled_mm", lambda a, b, **kw: seen.append(
        (a.dtype, b.dtype, tuple(kw["scale_a"].shape), tuple(kw["scale_b"].shape), kw["out_dtype"])))
    monkeypatch.setattr(timing, "PEAK_SIZE", {"cpu": 512, "cuda": 512})
    tflops, n = timing.measure_peak_tflops(torch.device("cpu"), run.PEAK_DTYPES["fp8"], timing.StageTimer(
        torch.device("cpu"), warmup=0, repeats=1, time_budget=1.0))
    e4m3 = torch.float8_e4m3fn
    assert n == 512 and tflops > 0 and set(seen) == {(e4m3, e4m3, (512, 1), (1, 512), torch.bfloat16)}


def test_fp8_matmul_peak_keeps_to_what_cuda_takes(monkeypatch):
    # torch._scaled_mm on CPU also takes a row-major second matrix and float32 output, which CUDA refuses:
    # the peak's product goes through CUDA's rules (tests/conftest.py) here, as it would run on the H200.
    from vlmrm_fast.profiler import run, timing

    calls = []

    def scaled_mm(*args, **kwargs):
        calls.append(1)
        return cuda_rowwise_scaled_mm(*args, **kwargs)

    monkeypatch.setattr(timing.torch, "_scaled_mm", scaled_mm)
    monkeypatch.setattr(timing, "PEAK_SIZE", {"cpu": 512, "cuda": 512})
    monkeypatch.setattr(timing, "PEAK_MAX_BURST", 1)
    tflops, n = timing.measure_peak_tflops(torch.device("cpu"), run.PEAK_DTYPES["fp8"], timing.StageTimer(
        torch.device("cpu"), warmup=0, repeats=1, time_budget=1.0))
    assert n == 512 and tflops > 0 and calls


def test_fp8_peak_only_where_fp8_runs(monkeypatch, tmp_path):
    # An fp8 product on a GPU without fp8 matmuls would stop the whole run: the peak is left out there,
    # and the fp8 rows are skipped with the backends' reason.
    import dataclasses

    from vlmrm_fast.profiler import run
    from vlmrm_fast.profiler.run import peak_precisions, resolve_config

    config = resolve_config(_bench_args("--dtypes", "bf16", "fp8", "int8", "--out", str(tmp_path)))
    on_cuda = dataclasses.replace(config, device=torch.device("cuda", 0))
    monkeypatch.setattr(run, "fp8_unsupported_reason", lambda device, dtype: "an A100")
    assert peak_precisions(on_cuda) == ["bf16", "fp16"]  # fp16: the seed's autocast
    monkeypatch.setattr(run, "fp8_unsupported_reason", lambda device, dtype: None)
    assert peak_precisions(on_cuda) == ["bf16", "fp8", "fp16"]
    assert peak_precisions(dataclasses.replace(config, seed=False)) == ["bf16", "fp8"]


def test_a_seed_that_moved_during_the_run_marks_the_ratio():
    # 'vs seed' divides by the seed timed in alternation with the row; where that seed and the
    # seed's own row disagree by over 1.5x, the machine's load changed and the ratio is marked.
    import dataclasses

    from vlmrm_fast.profiler.report import Report, markdown_report, markdown_table, unsteady_rows

    seed = dataclasses.replace(_row("ViT-B-32", "seed", 10.0, 1.0), seed_fps=None, speedup_vs_seed=None)
    steady, moved = _row("ViT-B-32", "torch", 12.0, 12.0), _row("ViT-B-32", "onnxruntime", 16.0, 4.0)
    slower_seed = _row("ViT-B-32", "onnxruntime", 16.0, 16.0, "int8")
    rows = [seed, steady, moved, slower_seed]
    assert unsteady_rows(rows) == [2, 3]  # 10 against 12: steady; against 4 and 16: not
    lines = markdown_table(rows).splitlines()[2:]
    assert "1.00x †" not in lines[1] and "1.00x |" in lines[1] and "4.00x †" in lines[2] and "1.00x †" in lines[3]
    env = {"device": "cpu", "timestamp": "t", "commit": "c", "cpu_count": 2}
    config = {"repeats": 3, "warmup": 1, "time_budget": 1.0, "batch_sizes": [8]}
    assert "ratio is unsteady" in markdown_report(Report(env, config, rows=rows))
    assert "more than 1.5x (up to 2.50x in this run)" in markdown_report(Report(env, config, rows=rows))  # 10 against 4
    # Just past the threshold (10 against 6.65: 1.504x) reads as past it, not as "more than 1.5x (up to 1.5x)".
    just_past = [seed, _row("ViT-B-32", "onnxruntime", 16.0, 6.65)]
    assert "more than 1.5x (up to 1.51x in this run)" in markdown_report(Report(env, config, rows=just_past))
    assert "ratio is unsteady" not in markdown_report(Report(env, config, rows=[seed, steady]))


def test_a_seed_timed_with_a_row_far_slower_than_the_seeds_stages_marks_the_ratio(tmp_path):
    # Both seed figures disturbed alike (154 and 211 ms a call against 57 ms of stages) agree within 1.5x:
    # the tiny model read 104x (about 1.9x idle), unmarked, and a target could be met on it.
    import dataclasses

    from types import SimpleNamespace

    from vlmrm_fast.profiler.report import (Report, check_targets, disturbed_seed_pairings, markdown_report,
                                            markdown_table, unsteady_rows, write_outputs)

    seed = dataclasses.replace(_row("ViT-B-32", "seed", 8 / 0.211, 1.0), seed_fps=None, speedup_vs_seed=None,
                               preprocess_fps=8 / 0.0077, tower_fps=8 / 0.0488, score_fps=8 / 1e-4)  # 56.6 ms
    disturbed = _row("ViT-B-32", "onnxruntime", 8 / 0.0016, 8 / 0.154)  # 154 ms: 2.7x the stages
    rows = [seed, disturbed]
    assert disturbed_seed_pairings(rows) == [1] and unsteady_rows(rows) == [1]
    assert "96.25x †" in markdown_table(rows).splitlines()[3]
    env = {"device": "cpu", "timestamp": "t", "commit": "c", "cpu_count": 2}
    config = {"repeats": 3, "warmup": 1, "time_budget": 1.0, "batch_sizes": [8]}
    text = markdown_report(Report(env, config, rows=rows))
    assert "† Where the seed timed with this row took more than 2x the seed's stages timed one by one" in text
    out = tmp_path / "out"
    write_outputs(Report(env, config, rows=rows), SimpleNamespace(out=out), plot=False)
    json_rows = json.loads((out / "bench.json").read_text())["rows"]  # the marks reach scripts that read the JSON
    assert [(r["speedup_unsteady"], r["disturbed_stages"]) for r in json_rows] == [
        (False, ["end to end"]), (True, ["preprocess", "tower", "score"])]  # (_row's stages are 1 frame/s)
    assert "differ by more than 1.5x" not in text  # the two seed figures agree (1.37x)
    [target] = check_targets(rows, torch.device("cpu"))
    assert target["measured"] is None and target["unsteady"]  # not "met" on 96x
    # A seed timed at 100 ms (1.77x its stages) beside its own row's 70 ms is steady.
    idle_seed = dataclasses.replace(seed, end_to_end_fps=8 / 0.070)
    steady = _row("ViT-B-32", "torch", 8 / 0.050, 8 / 0.100)
    assert unsteady_rows([idle_seed, steady]) == []
    assert disturbed_seed_pairings([disturbed]) == []  # no seed row: nothing to set it against


def test_a_speedup_target_whose_every_ratio_is_unsteady_says_so_rather_than_not_measured(tmp_path):
    import dataclasses

    from types import SimpleNamespace

    from vlmrm_fast.profiler.report import Report, check_targets, markdown_report, write_outputs

    seed = dataclasses.replace(_row("ViT-B-32", "seed", 10.0, 1.0, "fp32"), seed_fps=None, speedup_vs_seed=None)
    moved = _row("ViT-B-32", "torch", 16.0, 4.0, "fp32")  # its seed 4 against the seed's own 10: unsteady
    [target] = check_targets([seed, moved], torch.device("cpu"))
    assert target["measured"] is None and target["unsteady"] and target["met"] is None  # cannot tell, not "no"
    env = {"device": "cpu", "timestamp": "t", "commit": "c", "cpu_count": 2}
    config = {"repeats": 3, "warmup": 1, "time_budget": 1.0, "batch_sizes": [8]}
    report = markdown_report(Report(env, config, rows=[seed, moved], targets=[target]))
    assert "every ratio unsteady †: run again" in report and "not measured" not in report
    [line] = [line for line in report.splitlines() if "speedup vs seed" in line]
    assert line.endswith("| cannot tell: unsteady † |") and "| no |" not in line, line
    [unmeasured] = check_targets([seed], torch.device("cpu"))  # no row of its own: not measured
    assert unmeasured["measured"] is None and not unmeasured["unsteady"] and unmeasured["met"] is None
    assert "| cannot tell: not measured |" in markdown_report(Report(env, config, rows=[seed], targets=[unmeasured]))
    out = tmp_path / "out"  # bench.json says the same: null, not false
    write_outputs(Report(env, config, rows=[seed, moved], targets=[target]), SimpleNamespace(out=out), plot=False)
    [written] = json.loads((out / "bench.json").read_text())["targets"]
    assert written["met"] is None and written["unsteady"] is True


def test_a_stage_slower_than_the_whole_pipeline_is_marked():
    # The pipeline runs every stage, so a stage timed alone cannot be much slower than it: where it is
    # (one slow call among few repeats, a busy moment), its cell is marked and a note says why.
    import dataclasses

    from vlmrm_fast.profiler.report import Report, disturbed_stages, markdown_report, markdown_table

    row = dataclasses.replace(_row("ViT-B-32", "torch", 20.0, 10.0), h2d_fps=400.0, preprocess_fps=300.0,
                              tower_fps=24.0, score_fps=900.0)
    assert disturbed_stages(row) == []
    slow_tower = dataclasses.replace(row, tower_fps=15.9)  # 20 / 1.25 = 16
    slow_h2d = dataclasses.replace(row, h2d_fps=5.0)  # end to end starts on the device: the upload is no part of it
    assert disturbed_stages(slow_tower) == ["tower"] and disturbed_stages(slow_h2d) == []
    cells = [c.strip() for c in markdown_table([row, slow_tower]).splitlines()[3].split("|")[1:-1]]
    assert cells[8] == "15.9 ‡" and "‡" not in "".join(cells[:8] + cells[9:])
    env = {"device": "cpu", "timestamp": "t", "commit": "c", "cpu_count": 2}
    config = {"repeats": 3, "warmup": 1, "time_budget": 1.0, "batch_sizes": [8]}
    assert "timed alone, was more than 1.25x slower" in markdown_report(Report(env, config, rows=[row, slow_tower]))
    assert "timed alone" not in markdown_report(Report(env, config, rows=[row]))
    # End to end runs just these stages: far slower than their sum, it was disturbed itself (a loaded machine
    # gave 4.9 frames/s beside stages adding up to 62); up to 2x is the call's own work on small calls.
    slow_whole = dataclasses.replace(row, end_to_end_fps=10.0)  # 0.1 s a call, the stages 0.046 s together
    near = dataclasses.replace(row, end_to_end_fps=12.0)
    assert disturbed_stages(slow_whole) == ["end to end"] and disturbed_stages(near) == []
    cells = [c.strip() for c in markdown_table([slow_whole]).splitlines()[2].split("|")[1:-1]]
    assert cells[10] == "10 ‡" and "‡" not in "".join(cells[:10] + cells[11:])
    assert "this end to end more than 2x slower than its stages" in markdown_report(Report(env, config, rows=[slow_whole]))


def test_a_run_that_measures_nothing_fails_and_leaves_no_stale_plot(tmp_path, capsys):
    (tmp_path / "bench.png").write_bytes(b"an earlier run's plot")
    argv = ["bench", "--models", "vlmrm-tiny", "--no-seed", "--dtypes", "fp8", "--batch-sizes", "1", "--device",
            "cpu", "--out", str(tmp_path), "--no-progress", "--no-plot"]
    assert cli.main(argv) == 1
    first = capsys.readouterr()
    assert "no configuration was measured" in first.err and "held" not in first.out
    assert not (tmp_path / "bench.png").exists() and json.loads((tmp_path / "bench.json").read_text())["rows"] == []
    # With the seed: its rows are the reference, not a measurement asked for; a job script must see the failure
    # (it exited 0, from a profiler user's audit).
    with_seed = [a for a in argv if a != "--no-seed"]
    assert cli.main(with_seed) == 1
    second = capsys.readouterr()
    assert "no configuration was measured" in second.err
    # The earlier run's files are replaced, and the run says so (a user-role review: it was silent).
    stamp = re.escape(str(tmp_path))
    assert re.search(f"note: {stamp} held a run of 0 rows from [0-9T:+-]+; this run's bench.json and bench.md "
                     r"replace it, and its bench.png is removed \(--no-plot\)", second.out), second.out  # said replaced
    assert {r["backend"] for r in json.loads((tmp_path / "bench.json").read_text())["rows"]} == {"seed"}


def test_reports_given_as_links_are_written_through_and_a_broken_one_is_named_before_measuring(tmp_path, capsys):
    # The stale plot was removed by unlinking OUT/bench.png: a link there (bench.png -> plots/latest.png) was
    # replaced by a plain file and plots/latest.png kept the earlier run's plot.
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "latest.png").write_bytes(b"an earlier run's plot")
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.png").symlink_to(plots / "latest.png")
    (out / "bench.md").symlink_to("../plots/latest.md")  # relative, to a file not made yet
    argv = ["bench", "--models", "vlmrm-tiny", "--no-seed", "--backends", "torch", "--dtypes", "fp32",
            "--batch-sizes", "1", "--repeats", "1", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert (out / "bench.png").is_symlink() and (out / "bench.md").is_symlink()
    assert (plots / "latest.png").read_bytes().startswith(b"\x89PNG") and "vlmrm-tiny" in (plots / "latest.md").read_text()
    # A link into a folder that does not exist is refused before any model loads (the folder was made, on
    # whatever disk holds that path while /unmounted is not mounted).
    (out / "bench.json").unlink()
    (out / "bench.json").symlink_to(tmp_path / "unmounted" / "bench.json")
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"'{out / 'bench.json'}' is a symbolic link to '{tmp_path / 'unmounted' / 'bench.json'}', whose folder does not " \
           "exist" in err and "vlmrm-fast bench on" not in err
    assert (plots / "latest.png").read_bytes().startswith(b"\x89PNG")  # nothing removed by the refused run


def test_an_earlier_run_is_described_even_when_its_json_is_unreadable(tmp_path):
    from vlmrm_fast.profiler.run import earlier_run

    assert earlier_run(tmp_path) is None
    (tmp_path / "bench.json").write_text('{"rows": [{}, {}], "environment": {"timestamp": "T"}}')
    assert earlier_run(tmp_path) == "a run of 2 rows from T"
    for text in ("{cut sho", "[]", '{"rows": 3}'):
        (tmp_path / "bench.json").write_text(text)
        assert earlier_run(tmp_path) == "a bench.json that could not be read"


def test_a_run_whose_models_all_fail_to_load_points_at_the_models(tmp_path, capsys, monkeypatch):
    """Guards the closing hint of a run that measured nothing because no model could be created (an
    ``hf-hub:`` name offline, say): it names ``--models``, not the backends and ``--dtypes``, which were
    never tried (from a profiler user's audit: the hint sent them to the wrong options)."""
    from vlmrm_fast.profiler import run as bench

    def offline(name):
        raise ValueError(f"{name!r} needs the Hugging Face hub, which is unreachable")

    monkeypatch.setattr(bench, "create_random_model", offline)
    argv = ["bench", "--models", "vlmrm-tiny", "--batch-sizes", "1", "--device", "cpu", "--out", str(tmp_path),
            "--no-progress", "--no-plot", "--backends", "torch"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "no configuration was measured" in err
    assert "no model could be created" in err and "--models" in err and "--dtypes" not in err


def test_skip_reasons_speak_in_the_commands_options():
    from vlmrm_fast.profiler.run import in_cli_terms

    assert in_cli_terms("backend='onnxruntime' on CPU runs float32, not torch.bfloat16; pass dtype=torch.float32.") == (
        "--backends onnxruntime on CPU runs float32, not bf16; pass --dtypes fp32.")
    assert in_cli_terms("quantize='fp8' runs on Hopper GPUs") == "--dtypes fp8 runs on Hopper GPUs"
    assert in_cli_terms("backend='tensorrt' needs a CUDA device; use backend='onnxruntime' or 'torch' on CPU.",
                        backend_flag="--backend") == "--backend tensorrt needs a CUDA device; use --backend onnxruntime or torch on CPU."
    assert in_cli_terms("device='cuda' but CUDA is not available here; pass device='cpu' (command line: --device cpu; "
                        "train: --reward-device cpu).") == "--device cuda but CUDA is not available here; pass --device cpu."
    assert in_cli_terms("use backend='torch' there, or pick another backend (backend='compile').") == (
        "use --backends torch there, or pick another backend (--backends compile).")
    assert in_cli_terms("on CPU, backend='onnxruntime' with quantize='int8' is the lossy fast path.") == (
        "on CPU, --backends onnxruntime --dtypes int8 is the lossy fast path.")
    assert in_cli_terms("free GPU memory, or lower max_batch_size.", batch_flag="--batch-size") == (
        "free GPU memory, or lower --batch-size.")
    assert in_cli_terms("a folder of weights: model_name='local-dir:/w' with pretrained=None.") == (
        "a folder of weights: --model local-dir:/w with --pretrained none.")


def test_an_interrupted_run_sets_the_peaks_of_rows_not_saved_yet(tmp_path, monkeypatch):
    from vlmrm_fast.profiler import run as bench

    measure = bench.Profiler._profile_backend
    monkeypatch.setattr(bench.Profiler, "save", lambda self, plot=False: None)  # rows measured since the last save

    def interrupted(self, *args, **kwargs):
        if args[3] == "compile":
            raise KeyboardInterrupt
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(bench.Profiler, "_profile_backend", interrupted)
    argv = ["bench", "--models", "vlmrm-tiny", "--batch-sizes", "1", "--repeats", "1", "--backends", "torch",
            "compile", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--no-plot", "--no-seed"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 130
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["torch"] and rows[0]["peak_tflops"] and rows[0]["frac_of_peak"]


def test_targets_leave_out_ratios_whose_seed_moved_and_the_notes_say_why():
    import dataclasses

    from vlmrm_fast.profiler.report import Report, markdown_report

    seed = dataclasses.replace(_row("ViT-B-32", "seed", 10.0, 1.0), seed_fps=None, speedup_vs_seed=None)
    moved, steady = _row("ViT-B-32", "onnxruntime", 16.0, 2.0), _row("ViT-B-32", "torch", 12.0, 10.0)
    [target] = check_targets([seed, moved, steady], torch.device("cpu"))
    assert target["measured"] == pytest.approx(1.2) and not target["met"]  # 8x from a moved seed decides nothing
    fast = dataclasses.replace(steady, frac_of_peak=1.3)
    env = {"device": "cpu", "timestamp": "t", "commit": "c", "cpu_count": 2}
    text = markdown_report(Report(env, {"repeats": 2, "warmup": 1, "time_budget": 1.0, "batch_sizes": [8]},
                                  rows=[seed, fast]))
    assert "'of peak' above 100%" in text and "once 2 are done" in text
    one = markdown_report(Report(env, {"repeats": 1, "warmup": 1, "time_budget": 1.0, "batch_sizes": [8]}, rows=[seed]))
    assert "once 1 is done" in one


def test_a_speedup_met_on_a_busy_machine_is_marked_to_be_confirmed():
    # Load slows the seed's eager torch far more than ONNX Runtime, and its two seed figures alike, so no
    # dagger shows it: a loaded 2-core machine reported ViT-B-32 at 10.3x (1.56x idle), "met: yes".
    from vlmrm_fast.profiler.report import Report, machine_was_busy, markdown_report

    env = {"device": "cpu", "timestamp": "t", "commit": "c", "cpu_count": 2, "load_average_start": 1.9,
           "load_average_end": 2.0}
    assert not machine_was_busy(env)
    assert machine_was_busy({**env, "load_average_end": 4.4}) and machine_was_busy({**env, "load_average_start": 3.1})
    assert not machine_was_busy({**env, "load_average_start": 2.9})  # the run's own threads count: idle runs end near 2
    assert not machine_was_busy({**env, "load_average_start": None, "load_average_end": None})
    # Where the CPU time of other processes is known, it decides: one process spinning on one core of two
    # kept the load at 2.1-2.4 (under 3) while ViT-B-32's ratio read 8.65x; an earlier job's load is no competitor.
    assert machine_was_busy({**env, "load_average_start": 2.08, "load_average_end": 2.38, "other_cpu_share": 0.45})
    assert not machine_was_busy({**env, "load_average_start": 3.5, "other_cpu_share": 0.03})
    rows = [_row("ViT-B-32", "onnxruntime", 16.0, 10.0)]
    config = {"repeats": 3, "warmup": 1, "time_budget": 1.0, "batch_sizes": [8]}
    [idle] = check_targets(rows, torch.device("cpu"))
    [busy] = check_targets(rows, torch.device("cpu"), busy=True)
    assert idle["met"] and busy["met"] and not idle["busy_machine"] and busy["busy_machine"]
    assert "| yes |" in markdown_report(Report(env, config, rows=rows, targets=[idle]))
    assert "| yes, on a busy machine: run again idle to confirm |" in markdown_report(
        Report(env, config, rows=rows, targets=[busy]))
    [missed] = check_targets([_row("ViT-B-32", "onnxruntime", 12.0, 10.0)], torch.device("cpu"), busy=True)
    assert "| no |" in markdown_report(Report(env, config, rows=rows, targets=[missed]))
    [fps] = [t for t in check_targets([_row("ViT-B-32", "torch", 6e4, 1e4, "bf16")], torch.device("cuda"), busy=True)
             if "frames/s" in t["kind"] and t["model"] == "ViT-B-32"]
    assert not fps["busy_machine"]  # load only lowers frames/s: a frames/s target met stands


def test_the_cpu_time_of_other_processes_is_the_machines_less_this_ones():
    from vlmrm_fast.profiler.report import Report, cpu_times, markdown_report, other_cpu_share

    # [machine busy s, this process's s, wall s]: 2 CPUs for 10 s, the machine busy 14 s of which 5 ours.
    assert other_cpu_share([100.0, 1.0, 50.0], [114.0, 6.0, 60.0], 2) == 0.45
    assert other_cpu_share([100.0, 1.0, 50.0], [104.0, 6.0, 60.0], 2) == 0.0  # clock ticks lag process time
    assert other_cpu_share(None, [1.0, 1.0, 1.0], 2) is None and other_cpu_share([0, 0, 5.0], [1, 1, 5.0], 2) is None
    start = cpu_times()
    if start is None:
        pytest.skip("no /proc/stat here")
    spin = time.process_time() + 0.05
    while time.process_time() < spin:  # this process's own work is not another's
        pass
    end = cpu_times()
    assert end[1] - start[1] >= 0.05 and end[2] > start[2] and end[0] >= start[0]
    # Nor is a child's that has ended (benchmarks/render_breakdown.py's worker processes).
    child = "import time\nt = time.process_time() + 0.2\nwhile time.process_time() < t: pass"
    subprocess.run([sys.executable, "-c", child], check=True)
    assert cpu_times()[1] - end[1] >= 0.2
    env = {"device": "cpu", "timestamp": "t", "commit": "c", "cpu_count": 2, "other_cpu_share": 0.45}
    text = markdown_report(Report(env, {"repeats": 3, "warmup": 1, "time_budget": 1.0, "batch_sizes": [8]}))
    assert "Other processes took 45% of the CPUs' time during the run (over 25%, the machine counts as busy" in text


def test_an_out_that_is_a_file_is_refused_before_measuring(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    argv = ["bench", "--quick", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "a-file")]
    assert cli.main(argv) == 2
    assert f"'{tmp_path / 'a-file'}' is a file, not a folder; pass another --out" in capsys.readouterr().err


def test_the_plot_names_the_seed_only_where_it_ran_and_is_not_written_empty(tmp_path):
    pytest.importorskip("matplotlib")
    from vlmrm_fast.profiler import report as bench_report

    titles = []
    real = bench_report.save_figure_atomically
    env = {"device": "cpu", "timestamp": "t", "commit": "c", "cpu_count": 2}
    config = {"repeats": 3, "warmup": 1, "time_budget": 1.0, "batch_sizes": [8], "frame_size": 224, "device": "cpu"}

    def keep_title(figure, path):
        titles.append(figure.axes[0].get_title())
        return real(figure, path)

    import dataclasses

    seed = dataclasses.replace(_row("ViT-B-32", "seed", 10.0, 1.0), seed_fps=None, speedup_vs_seed=None)
    ours = _row("ViT-B-32", "torch", 12.0, 10.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_report, "save_figure_atomically", keep_title)
        bench_report.write_plot(tmp_path / "a.png", bench_report.Report(env, config, rows=[seed, ours]))
        bench_report.write_plot(tmp_path / "b.png", bench_report.Report(env, config, rows=[ours]))
    assert "the seed hatched at 480x480" in titles[0] and "seed" not in titles[1]  # one batch size: bars
    from types import SimpleNamespace

    written = bench_report.write_outputs(bench_report.Report(env, config, rows=[]), SimpleNamespace(out=tmp_path / "c", plot=True))
    assert [p.name for p in written] == ["bench.json", "bench.md"] and not (tmp_path / "c" / "bench.png").exists()


@pytest.fixture
def kept_figures(monkeypatch):
    """The matplotlib figures write_plot saves (still written to their files), to look at their axes."""
    pytest.importorskip("matplotlib")
    from vlmrm_fast.profiler import report as bench_report

    figures = []
    real = bench_report.save_figure_atomically

    def keep_figure(figure, path):
        figures.append(figure)
        return real(figure, path)

    monkeypatch.setattr(bench_report, "save_figure_atomically", keep_figure)
    return figures


def test_the_plot_title_fits_the_figure_and_frames_per_s_within_a_decade_get_numbers(tmp_path, kept_figures):
    """A user-role review found bench.png's subtitle cut off at the right edge and a log axis over
    105-900 frames/s labelled only at 100, 200 and 500, so the lines above 500 could not be read."""
    import dataclasses

    from vlmrm_fast.profiler import report as bench_report

    config = {**CONFIG, "device": "cpu", "frame_size": 224, "batch_sizes": [1, 8]}
    seed = dataclasses.replace(_row("ViT-B-32", "seed", 105.0, 1.0), seed_fps=None, speedup_vs_seed=None)
    rows = [seed, dataclasses.replace(_row("ViT-B-32", "torch", 480.0, 105.0), batch=1),
            _row("ViT-B-32", "torch", 900.0, 105.0)]
    env = {**ENV, "device": "a CPU with a long name (and its thread count, 128 threads)"}
    bench_report.write_plot(tmp_path / "a.png", bench_report.Report(env, config, rows=rows))
    [figure] = kept_figures
    ax = figure.axes[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    title, box = ax.title, figure.bbox
    extent = title.get_window_extent(renderer)
    assert box.x0 <= extent.x0 and extent.x1 <= box.x1, (extent, box)
    assert "random weights" in title.get_text().replace("\n", " ")
    labelled = [t for t in ax.yaxis.get_major_locator().tick_values(105.0, 900.0) if 105.0 <= t <= 900.0]
    assert len(labelled) >= 3 and max(labelled) > 500, labelled
    # A wide range keeps the 1-2-5 labels; a narrow one gets finer steps still.
    assert bench_report.log_tick_steps([10.0, 30_000.0]) == (1.0, 2.0, 5.0)
    assert len([t for t in (310, 320, 330, 340, 350, 360, 370, 380, 390)
                if round(t / 100, 6) in bench_report.log_tick_steps([310.0, 390.0])]) == 9
    assert bench_report.log_tick_steps([]) == (1.0, 2.0, 5.0)


def test_a_plot_at_one_batch_size_tells_the_configurations_apart_and_labels_its_axis_readably(tmp_path, kept_figures):
    # A user-role review: at one batch size each line is one point, so the backends' line styles showed
    # nothing (torch and onnxruntime fp32 were both blue dots), and one point's log axis, widened to a
    # decade by matplotlib, got 90 overlapping labels.
    import dataclasses

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from vlmrm_fast.profiler import report as bench_report

    config = {**CONFIG, "device": "cpu", "frame_size": 224, "batch_sizes": [2]}
    seed = dataclasses.replace(_row("vlmrm-tiny", "seed", 129.0, 1.0), seed_fps=None, speedup_vs_seed=None, batch=2)
    torch_row = dataclasses.replace(_row("vlmrm-tiny", "torch", 7.81, 129.0), batch=2)
    ort_row = dataclasses.replace(_row("vlmrm-tiny", "onnxruntime", 1164.0, 129.0), batch=2)
    bench_report.write_plot(tmp_path / "a.png", bench_report.Report(ENV, config, rows=[seed, torch_row, ort_row]))
    bench_report.write_plot(tmp_path / "b.png", bench_report.Report(ENV, config, rows=[ort_row]))
    for figure, names in zip(kept_figures, (["vlmrm-tiny seed fp32", "vlmrm-tiny torch fp32", "vlmrm-tiny onnxruntime fp32"],
                                       ["vlmrm-tiny onnxruntime fp32"])):
        ax = figure.axes[0]
        figure.draw(FigureCanvasAgg(figure).get_renderer())
        assert [label.get_text() for label in ax.get_yticklabels()] == names[::-1]  # a bar each, named
        low, high = ax.get_xlim()
        shown = [t for t in ax.xaxis.get_major_locator().tick_values(low, high) if low <= t <= high]
        assert 2 <= len(shown) <= 12, shown
        assert "at batch 2" in ax.get_xlabel()
    assert (tmp_path / "b.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(not HAS_ORT, reason="needs onnxruntime")
def test_the_seed_is_set_against_a_peak_in_its_own_dtype(tmp_path):
    # With only int8 asked for (no int8 matmul peak), the seed (fp32 on CPU) still gets its "of peak".
    argv = ["bench", "--models", "vlmrm-tiny", "--batch-sizes", "1", "--repeats", "1", "--warmup", "1",
            "--backends", "onnxruntime", "--dtypes", "int8", "--device", "cpu", "--out", str(tmp_path),
            "--no-progress", "--no-plot"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    [seed] = [r for r in results["rows"] if r["backend"] == "seed"]
    assert "fp32" in results["peak_tflops"] and seed["frac_of_peak"] is not None


def _recorded_paired_timing(monkeypatch, repeats: int):
    """``StageTimer.paired`` of two callables "a" and "b" on CPU (one warm-up call each), with its pauses,
    calls and timed calls recorded in order: (events, (a's timing, b's timing))."""
    from vlmrm_fast.profiler import timing

    events = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: events.append("pause"))

    class Recording(timing.StageTimer):
        def _time_once(self, fn):
            events.append("timed")
            return super()._time_once(fn)

    timer = Recording(torch.device("cpu"), warmup=1, repeats=repeats, time_budget=10.0)
    return events, timer.paired(lambda: events.append("a"), lambda: events.append("b"))


def test_paired_timing_never_times_a_call_straight_after_a_pause(monkeypatch):
    # The first call after an idle pause runs about twice as slow on CPU, and the pauses fall unevenly
    # on the two callables: every timed call must follow a call of its own callable, never a pause.
    events, (first, second) = _recorded_paired_timing(monkeypatch, repeats=5)
    assert first.repeats == second.repeats == 5
    calls = [e for e in events if e != "timed"]
    for i, event in enumerate(events):
        if event == "timed":
            timed_call, before = events[i + 1], [e for e in events[:i] if e != "timed"][-1]
            assert before == timed_call, (i, events)  # warm: the same callable ran just before
    assert calls.count("pause") >= 5


# ---- the report: behaviours a mutation audit found untested ----------------------------------------

ENV = {"device": "cpu", "timestamp": "t", "commit": "c", "cpu_count": 2}
CONFIG = {"repeats": 3, "warmup": 1, "time_budget": 1.0, "batch_sizes": [8]}


def test_the_peak_is_the_best_measurement_in_any_order():
    from vlmrm_fast.profiler.report import Report

    report = Report(environment={}, config={})
    report.add_peak("fp32", 2.0, 2048)
    report.add_peak("fp32", 1.0, 2048)  # a later measurement on a busy moment
    assert report.peak_tflops == {"fp32": 2.0} and report.peak_samples == {"fp32": [2.0, 1.0]}


def test_the_cuda_seed_is_set_against_the_fp16_peak():
    # The seed on CUDA runs fp32 weights under fp16 autocast: its matmuls are fp16 ones.
    import dataclasses

    from vlmrm_fast.profiler.report import Report, peak_dtype
    from vlmrm_fast.profiler.seed import SEED_CUDA_DTYPE

    assert peak_dtype(SEED_CUDA_DTYPE) == "fp16" and peak_dtype("bf16") == "bf16"
    seed = dataclasses.replace(_row("ViT-B-32", "seed", 10.0, 1.0, SEED_CUDA_DTYPE), achieved_tflops=50.0)
    report = Report(environment={}, config={}, rows=[seed])
    report.add_peak("fp16", 500.0, 8192)
    report.set_peaks()
    assert seed.peak_tflops == 500.0 and seed.frac_of_peak == pytest.approx(0.1)


def test_stage_rows_take_each_stage_from_its_own_timing():
    from vlmrm_fast.profiler.report import _stage_row
    from vlmrm_fast.profiler.timing import StageTiming

    def t(seconds):
        return StageTiming(median_s=seconds, min_s=seconds, max_s=seconds, repeats=3)

    timings = {"h2d": None, "preprocess": t(0.01), "tower": t(0.02), "score": t(0.04), "end_to_end": t(0.08)}
    row = _stage_row(model="m", backend="torch", dtype="fp32", kernels="torch", batch=8, frame_size=224,
                     timings=timings, gflops=2.0, flops_method="analytic", build_seconds=1.0, setup_seconds=2.0)
    assert row.h2d_fps is None
    assert (row.preprocess_fps, row.tower_fps, row.score_fps, row.end_to_end_fps) == pytest.approx((800, 400, 200, 100))
    assert row.achieved_tflops == pytest.approx(2.0 * 400 / 1e3)


def test_one_ratio_reads_the_same_in_the_table_and_the_targets():
    # Both round down: a committed bench.md read 1.65x in its table and 1.64x in its targets for one 1.6457.
    from vlmrm_fast.profiler.report import Report, markdown_report

    rows = [_row("ViT-B-32", "torch", 16.457, 10.0)]
    text = markdown_report(Report(ENV, CONFIG, rows=rows, targets=check_targets(rows, torch.device("cpu"))))
    assert "| 1.64x |" in text.split("## Targets")[0] and "| 1.50x | 1.64x |" in text
    assert "1.65x" not in text


@pytest.mark.filterwarnings("default:.*failed here:RuntimeWarning")  # the failure this test makes
def test_rows_timed_after_a_fast_path_turned_itself_off_are_marked(tmp_path, monkeypatch, capsys):
    # A kernel that fails on the machine costs speed, not the run (backends/fast_path.py): the rows timed
    # after that are partly the slower ops', and the report must say so rather than pass them off as the
    # kernel's; rows that never called it (kernels=torch) are not marked.
    from vlmrm_fast.backends import triton_layer_norm
    from vlmrm_fast.profiler import run as bench

    measured = []
    measure, kernel = bench.Profiler._measure_reward, triton_layer_norm.layer_norm_triton

    def failing_from_the_second_batch(x, *args):
        if len(measured) > 1:
            raise RuntimeError("ptxas fatal: Unresolved extern function '__nv_rsqrtf'")
        return kernel(x, *args)

    monkeypatch.setattr(bench.Profiler, "_measure_reward", lambda *a, **k: measured.append(a[4]) or measure(*a, **k))
    monkeypatch.setattr(triton_layer_norm, "layer_norm_triton", failing_from_the_second_batch)
    monkeypatch.setattr(triton_layer_norm.TritonLayerNorm, "min_elements", 0)
    argv = ["bench", "--models", "vlmrm-tiny", "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "1",
            "--no-seed", "--backends", "torch", "--kernels", "triton", "torch", "--dtypes", "fp32", "--device", "cpu",
            "--out", str(tmp_path), "--no-progress", "--no-plot"]
    assert cli.main(argv) == 0
    assert "warning: the LayerNorm kernel (vlmrm_fast/ops/layer_norm.py) failed here" in capsys.readouterr().err
    results = json.loads((tmp_path / "bench.json").read_text())
    name = triton_layer_norm.LAYER_NORM.name
    assert [(row["kernels"], row["batch"], row["fast_paths_off"]) for row in results["rows"]] == [
        ("triton-interpret", 1, []), ("triton-interpret", 2, [name]), ("torch", 1, []), ("torch", 2, [])]
    assert results["fast_paths_off"] == {name: "RuntimeError: ptxas fatal: Unresolved extern function '__nv_rsqrtf'"}
    text = (tmp_path / "bench.md").read_text()
    assert "| triton-interpret |" in text and "| triton-interpret § |" in text and "| torch § |" not in text
    assert "§ A fast path of the tower failed on this machine" in text and "__nv_rsqrtf" in text


def test_a_build_found_in_a_cache_on_disk_is_marked():
    import dataclasses

    from vlmrm_fast.profiler.report import Report, markdown_report

    cold = dataclasses.replace(_row("ViT-B-32", "compile", 20.0, 10.0), build_seconds=11.44, build_cached=False)
    warm = dataclasses.replace(cold, batch=16, build_seconds=6.14, build_cached=True)
    text = markdown_report(Report(ENV, CONFIG, rows=[cold, warm]))
    assert "| 11.4 |" in text and "| 6.1 (cached) |" in text
    assert "'(cached)': that build found its work in a cache on disk" in text
    assert "(cached)" not in markdown_report(Report(ENV, CONFIG, rows=[cold]))


def test_the_compile_mode_is_named_where_compile_rows_ran():
    # Also the default mode, where --compile-mode was not given (the config then records none).
    from vlmrm_fast.profiler.report import Report, markdown_report

    compiled, eager = _row("ViT-B-32", "compile", 20.0, 10.0), _row("ViT-B-32", "torch", 20.0, 10.0)
    assert "mode=default (the backend's default here)." in markdown_report(Report(ENV, CONFIG, rows=[compiled]))
    cuda = markdown_report(Report(ENV, {**CONFIG, "device": "cuda:0"}, rows=[compiled]))
    assert "mode=reduce-overhead (the backend's default here)." in cuda
    chosen = {**CONFIG, "compile_mode": "max-autotune"}
    assert "torch.compile with mode=max-autotune." in markdown_report(Report(ENV, chosen, rows=[compiled]))
    assert "torch.compile" not in markdown_report(Report(ENV, chosen, rows=[eager]))  # no compile rows: no note


def test_the_header_names_the_cuda_build_and_the_compute_capability():
    from vlmrm_fast.profiler.report import Report, markdown_report

    env = {**ENV, "device": "NVIDIA H200", "driver": "570.1", "cuda": "12.8", "compute_capability": "9.0"}
    assert "commit c, driver 570.1, CUDA 12.8, compute capability 9.0;" in markdown_report(Report(env, CONFIG))
    assert "CUDA" not in markdown_report(Report(ENV, CONFIG)).splitlines()[2]


def test_a_speedup_target_gets_a_line_for_the_largest_batch_where_several_were_measured():
    # The committed H200 bigG run met 3x only at batch 1 (4.91x; 1.31x at 1024): a "yes" from the best ratio
    # alone reads as if the seed's way of scoring (whole rollouts, large batches) were beaten 3x.
    import dataclasses

    from vlmrm_fast.profiler.report import Report, markdown_report

    small = _row("ViT-bigG-14", "compile", 40.0, 8.0, "bf16")  # 5x at batch 8
    large = dataclasses.replace(_row("ViT-bigG-14", "torch", 520.0, 400.0, "bf16"), batch=1024)  # 1.3x
    fps, best, at_largest = check_targets([small, large], torch.device("cuda"))
    assert best["met"] and best["measured"] == pytest.approx(5.0) and "batch 8" in best["where"]
    assert at_largest["kind"] == "end-to-end speedup vs seed (bf16), at the largest batch"
    assert not at_largest["met"] and at_largest["measured"] == pytest.approx(1.3)
    assert at_largest["where"] == "torch bf16 batch 1024, 480 px"
    text = markdown_report(Report(ENV, CONFIG, rows=[small, large], targets=[fps, best, at_largest]))
    assert ("| ViT-bigG-14 | end-to-end speedup vs seed (bf16), at the largest batch | 3.00x | 1.30x | "
            "torch bf16 batch 1024, 480 px | no |") in text
    # One batch size measured: the best ratio is the one at that batch, no second line.
    assert len(check_targets([small], torch.device("cuda"))) == 2  # frames/s and the speedup
    # On CPU alike (ViT-B-32's 1.5x), each precision.
    cpu = [_row("ViT-B-32", "onnxruntime", 16.0, 10.0), dataclasses.replace(_row("ViT-B-32", "torch", 12.0, 10.0), batch=32)]
    kinds = [t["kind"] for t in check_targets(cpu, torch.device("cpu"))]
    assert kinds == ["end-to-end speedup vs seed (fp32)", "end-to-end speedup vs seed (fp32), at the largest batch"]


def test_the_largest_batch_line_takes_the_largest_batch_with_a_ratio():
    # The seed failed at the largest batch (out of memory, say): the line is the ratio at the largest batch that has
    # one, not "cannot tell: not measured"; without the seed (--no-seed) no second line says nothing again.
    import dataclasses

    small = _row("ViT-B-32", "torch", 16.0, 10.0)
    mid = dataclasses.replace(_row("ViT-B-32", "torch", 13.0, 10.0), batch=16)
    no_seed = dataclasses.replace(_row("ViT-B-32", "torch", 40.0, 10.0), batch=32, seed_fps=None, speedup_vs_seed=None)
    best, at_largest = check_targets([small, mid, no_seed], torch.device("cpu"))
    assert at_largest["measured"] == pytest.approx(1.3) and "batch 16" in at_largest["where"]
    unseeded = [dataclasses.replace(r, seed_fps=None, speedup_vs_seed=None) for r in (small, mid, no_seed)]
    [target] = check_targets(unseeded, torch.device("cpu"))
    assert target["met"] is None and "largest" not in target["kind"]


def test_a_target_reached_exactly_is_met():
    [target] = check_targets([_row("ViT-B-32", "torch", 15.0, 10.0)], torch.device("cpu"))
    assert target["measured"] == pytest.approx(1.5) and target["met"]


def test_the_targets_table():
    # Speedups round down (1.499x reads 1.49x beside "no"), frames/s as the table writes them.
    from vlmrm_fast.profiler.report import Report, markdown_report

    rows = [_row("ViT-B-32", "torch", 14.99, 10.0)]
    report = Report(ENV, CONFIG, rows=rows, targets=check_targets(rows, torch.device("cpu")))
    text = markdown_report(report)
    assert "## Targets" in text
    assert "| ViT-B-32 | end-to-end speedup vs seed (fp32) | 1.50x | 1.49x | torch fp32 batch 8, 480 px | no |" in text
    met = [_row("ViT-B-32", "torch", 30.0, 10.0)]
    text = markdown_report(Report(ENV, CONFIG, rows=met, targets=check_targets(met, torch.device("cpu"))))
    assert "| 1.50x | 3.00x | torch fp32 batch 8, 480 px | yes |" in text
    gpu = [_row("ViT-L-14", "torch", 1000.0, 10.0, "bf16")]
    text = markdown_report(Report(ENV, CONFIG, rows=gpu, targets=check_targets(gpu, torch.device("cuda"))))
    assert "| ViT-L-14 | end-to-end frames/s (bf16) | 3,900 | 1,000 | torch bf16 batch 8, 480 px | no |" in text


def test_the_report_notes_load_skips_failures_and_the_frames_checked():
    from vlmrm_fast.profiler.report import Report, markdown_report

    rows = [_row("ViT-B-32", "torch", 12.0, 10.0)]
    plain = markdown_report(Report(ENV, {**CONFIG, "batch_sizes": [1, 2]}, rows=rows, complete=True))
    assert "Load average" not in plain and "Skipped" not in plain and "Failed" not in plain
    assert "the first 2 frames" in plain and "incomplete" not in plain
    env = {**ENV, "load_average_start": 0.5, "load_average_end": None}
    text = markdown_report(Report(env, CONFIG, rows=rows, complete=True,
                                  skipped=[{"what": "tensorrt", "reason": "needs CUDA"}],
                                  failures=[{"what": "compile fp32", "error": "x" * 400}]))
    assert "Load average (1 min): 0.5 at start, n/a at end, on 2 CPUs" in text
    assert "Skipped: tensorrt (needs CUDA)." in text
    assert "Failed: compile fp32 (" + "x" * 300 + ")." in text


def test_the_report_explains_only_what_ran_the_seed_and_the_peaks():
    """A user-role review: with --no-seed, bench.md still explained the seed columns, now empty; a seed
    row showed a kernels value, which means nothing for the original code; an int8 row's empty 'of peak'
    went unexplained; and one checked frame read "the first 1 frames"."""
    import dataclasses

    from vlmrm_fast.profiler.report import Report, markdown_report

    ours = _row("ViT-B-32", "torch", 12.0, 10.0)
    seed = dataclasses.replace(_row("ViT-B-32", "seed", 10.0, 1.0), seed_fps=None, speedup_vs_seed=None)
    with_seed = markdown_report(Report(ENV, {**CONFIG, "batch_sizes": [1], "seed": True}, rows=[seed, ours],
                                       peak_tflops={"fp32": 1.0}, peak_sizes={"fp32": 2048}))
    assert "the first frame," in with_seed and "timed in alternation with the row's own end to end" in with_seed
    assert "was not run" not in with_seed and "'of peak' is empty" not in with_seed
    seed_line, own_line = [line for line in with_seed.splitlines() if line.startswith("| ViT-B-32")]
    assert seed_line.split(" | ")[3] == "" and own_line.split(" | ")[3] == "torch"
    int8 = dataclasses.replace(ours, backend="onnxruntime", dtype="int8", seed_fps=None, speedup_vs_seed=None)
    without = markdown_report(Report(ENV, {**CONFIG, "seed": False}, rows=[ours, int8], peak_tflops={"fp32": 1.0}, peak_sizes={"fp32": 2048}))
    assert "The seed pipeline was not run (--no-seed), so 'seed' and 'vs seed' are empty." in without
    assert "alternation" not in without and "switch between the seed" not in without
    assert "the first 8 frames," in without
    assert "'of peak' is empty for int8: no matmul peak in that precision was measured" in without


def test_rates_of_a_thousand_and_more_get_thousands_separators():
    from vlmrm_fast.profiler.report import _rate

    assert (_rate(1000.0), _rate(999.4), _rate(12345.6), _rate(None)) == ("1,000", "999", "12,345", "n/a")


def test_a_frames_per_second_target_missed_by_a_hair_never_reads_as_the_target():
    # Frames/s round down, as speedups do: 649.96 frames/s against 650 required read "| 650 | 650 | ... | no |".
    from vlmrm_fast.profiler.report import Report, _rate, _speedup, markdown_report

    rows = [_row("ViT-bigG-14", "torch", 649.96, 100.0, "bf16"), _row("ViT-L-14", "torch", 3899.99, 100.0, "bf16")]
    text = markdown_report(Report(ENV, CONFIG, rows=rows, targets=check_targets(rows, torch.device("cuda"))))
    assert "| ViT-bigG-14 | end-to-end frames/s (bf16) | 650 | 649 | torch bf16 batch 8, 480 px | no |" in text
    assert "| ViT-L-14 | end-to-end frames/s (bf16) | 3,900 | 3,899 | torch bf16 batch 8, 480 px | no |" in text
    assert "| 649 |" in text.split("## Targets")[0]  # the table's cell reads the same
    # Down at the digit shown, from the float as written (0.29 * 100 is 28.999...), never in e-notation.
    assert [_rate(v) for v in (999.7, 0.29, 83.75, 0.000199, 5.0)] == ["999", "0.29", "83.7", "0.000199", "5"]
    assert [_speedup(v) for v in (1.15, 0.29, 1.499)] == ["1.15x", "0.29x", "1.49x"]
    import numpy as np  # a NumPy float's repr is no number in NumPy 2 ("np.float64(649.96)")

    assert (_rate(np.float64(649.96)), _speedup(np.float64(1.15))) == ("649", "1.15x")


def test_a_bench_plot_cut_short_keeps_the_earlier_plot_and_leaves_no_temporary(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from vlmrm_fast.profiler.report import Report, write_plot

    def cut_short(figure, target, **kwargs):  # writes the start of a PNG to its target, then fails
        if isinstance(target, (str, os.PathLike)):
            Path(target).write_bytes(b"\x89PNG cut short")
        else:
            target.write(b"\x89PNG cut short")
        raise OSError("No space left on device")

    (tmp_path / "bench.png").write_bytes(b"an earlier run's plot")
    monkeypatch.setattr(Figure, "savefig", cut_short)
    report = Report(ENV, {**CONFIG, "device": "cpu", "frame_size": 224}, rows=[_row("ViT-B-32", "torch", 12.0, 10.0)])
    with pytest.raises(OSError, match="No space left"):
        write_plot(tmp_path / "bench.png", report)
    assert (tmp_path / "bench.png").read_bytes() == b"an earlier run's plot" and os.listdir(tmp_path) == ["bench.png"]


def test_write_outputs_writes_derived_kernel_figures_and_the_plot_only_when_asked(tmp_path):
    from types import SimpleNamespace

    from vlmrm_fast.profiler.kernels import KernelTime, TowerProfile
    from vlmrm_fast.profiler.report import Report, write_outputs

    report = Report(ENV, {**CONFIG, "device": "cpu", "frame_size": 224}, rows=[_row("ViT-B-32", "torch", 12.0, 10.0)])
    report.kernel_profiles.append(TowerProfile(model="ViT-B-32", backend="torch", dtype="fp32", batch=8,
                                               source="cpu torch ops", calls=3, wall_ms=10.0, gflops_per_image=8.82,
                                               peak_tflops=1.0, kernels=[KernelTime("aten::mm", "matmul", 4, 6.0)]))
    written = write_outputs(report, SimpleNamespace(out=tmp_path, plot=True), plot=False)
    assert [p.name for p in written] == ["bench.json", "bench.md"] and not (tmp_path / "bench.png").exists()
    [profile] = json.loads((tmp_path / "bench.json").read_text())["kernel_profiles"]
    assert profile["busy_ms"] == 6.0 and profile["idle_ms"] == 4.0 and profile["by_kind_ms"]["matmul"] == 6.0


def test_the_report_names_the_repeats_a_stage_stops_after():
    from vlmrm_fast.profiler.report import Report, markdown_report
    from vlmrm_fast.profiler.timing import MIN_REPEATS

    rows = [_row("ViT-B-32", "torch", 12.0, 10.0)]
    text = markdown_report(Report(ENV, {**CONFIG, "repeats": 1}, rows=rows))
    assert "(1 repeat at most" in text and "once 1 is done" in text
    text = markdown_report(Report(ENV, {**CONFIG, "repeats": 50}, rows=rows))
    assert f"once {MIN_REPEATS} are done" in text


def test_the_environment_names_the_cpu_build_of_onnxruntime():
    import importlib.metadata
    import importlib.util

    from vlmrm_fast.profiler.report import environment

    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("needs onnxruntime")
    try:
        want = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxruntime comes from another distribution (onnxruntime-gpu) here")
    env = environment(torch.device("cpu"))
    assert env["onnxruntime"] == want and env["device_type"] == "cpu"


# ---- timing, FLOPs, the seed and the run: behaviours a mutation audit found untested ---------------


def _scripted_timer(monkeypatch, seconds, **kwargs):
    """A CPU StageTimer whose timed calls "take" the given seconds in turn (the callable still runs);
    no pauses. Returns (timer, events): events lists "pause", "fn" (any call) and "timed"."""
    from vlmrm_fast.profiler import timing

    events = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: events.append("pause"))
    durations = iter(seconds)

    class Scripted(timing.StageTimer):
        def _time_once(self, fn):
            events.append("timed")
            fn()
            return next(durations)

    return Scripted(torch.device("cpu"), **kwargs), events


def test_stage_timer_reports_median_min_max_of_the_timed_calls_after_the_warmup(monkeypatch):
    timer, events = _scripted_timer(monkeypatch, [4.0, 1.0, 2.0], warmup=2, repeats=3, time_budget=100.0)
    timing = timer(lambda: events.append("fn"))
    assert (timing.median_s, timing.min_s, timing.max_s, timing.repeats) == (2.0, 1.0, 4.0, 3)  # the mean is 2.33
    # An idle pause first (CPU), then the untimed warm-up calls, then the timed ones.
    assert events == ["pause", "fn", "fn", "timed", "fn", "timed", "fn", "timed", "fn"]


def test_stage_timer_stops_once_its_time_budget_is_spent_but_not_before_three_calls(monkeypatch):
    # Calls of 0.25 s against a 1 s budget: 1.0 s after four is not over it, 1.25 s after five is.
    timer, _ = _scripted_timer(monkeypatch, [0.25] * 20, warmup=0, repeats=20, time_budget=1.0)
    assert timer(lambda: None).repeats == 5
    # Calls longer than the whole budget still make min(3, repeats) repeats: a median needs them.
    timer, _ = _scripted_timer(monkeypatch, [2.0] * 20, warmup=0, repeats=20, time_budget=1.0)
    assert timer(lambda: None).repeats == 3
    timer, _ = _scripted_timer(monkeypatch, [2.0] * 20, warmup=0, repeats=2, time_budget=1.0)
    assert timer(lambda: None).repeats == 2
    # Paired timing counts pairs the same way.
    timer, _ = _scripted_timer(monkeypatch, [0.125] * 40, warmup=0, repeats=20, time_budget=1.0)
    first, second = timer.paired(lambda: None, lambda: None)
    assert first.repeats == second.repeats == 5  # 0.25 s per pair: 1.25 s after five pairs


def test_a_timed_call_flushes_the_cache_and_waits_for_the_device_on_both_sides(monkeypatch):
    # On CUDA work is queued: without the synchronisation after the call, the time is the launch's.
    from vlmrm_fast.profiler import timing

    events = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: None)

    class Recording(timing.StageTimer):
        def synchronize(self):
            events.append("sync")

    class Flush:
        def zero_(self):
            events.append("flush")

    timer = Recording(torch.device("cpu"), warmup=0, repeats=1, time_budget=1.0)
    timer._flush = Flush()  # the 256 MiB buffer a CUDA timer writes before each call
    timer(lambda: events.append("fn"))
    assert events == ["flush", "sync", "fn", "sync"]


def test_paired_timing_alternates_which_callable_goes_first(monkeypatch):
    # first-second, second-first, ...: neither always runs straight after the other.
    from vlmrm_fast.profiler import timing

    order = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: None)

    class Recording(timing.StageTimer):
        def _time_once(self, fn):
            fn()
            order.append(last[0])
            return 0.001

    last = [None]
    timer = Recording(torch.device("cpu"), warmup=1, repeats=4, time_budget=10.0)
    timer.paired(lambda: last.__setitem__(0, "a"), lambda: last.__setitem__(0, "b"))
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_matmul_peak_size_precision_and_burst(monkeypatch):
    # The products themselves are faked (instant): what is checked is which products are timed.
    from vlmrm_fast.profiler import timing

    products = []
    monkeypatch.setattr(timing.torch, "mm", lambda a, b, out: products.append((a.shape[0], a.dtype, b.dtype)))
    monkeypatch.setattr(timing.time, "sleep", lambda s: None)

    def peak(dtype=torch.float32, timer=None):
        products.clear()
        return timing.measure_peak_tflops(torch.device("cpu"), dtype, timer or timing.StageTimer(
            torch.device("cpu"), warmup=0, repeats=1, time_budget=1.0))

    # Sizes double from 512 up to the device's largest, that one included...
    monkeypatch.setattr(timing, "PEAK_SIZE", {"cpu": 1024, "cuda": 1024})
    assert peak()[1] == 1024 and {n for n, _, _ in products} == {512, 1024}
    # ... unless one product already takes over PEAK_CALL_S (a precision without fast kernels).
    monkeypatch.setattr(timing, "PEAK_CALL_S", -1.0)
    assert peak()[1] == 512
    # The peak of a precision multiplies matrices of that precision.
    assert peak(torch.bfloat16)[1] == 512 and {(a, b) for _, a, b in products} == {(torch.bfloat16, torch.bfloat16)}
    # A burst never holds fewer than one product, however long one takes.
    monkeypatch.setattr(timing, "PEAK_BURST_S", 0.0)
    timed = []
    tflops, n = peak(timer=_products_counting_timer(products, timed, 2))
    assert [k for k, _ in timed] == [1, 1] and tflops > 0
    # Otherwise a burst is PEAK_BURST_S over one product's time, rounded, capped at PEAK_MAX_BURST: a
    # clock that advances 10 ms a reading makes one product take 10 ms.
    clock = iter(range(10**6))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock) * 0.01)
    monkeypatch.setattr(timing, "PEAK_CALL_S", 1.0)
    monkeypatch.setattr(timing, "PEAK_SIZE", {"cpu": 512, "cuda": 512})
    for burst_s, burst in [(0.126, 13), (0.134, 13), (10.0, timing.PEAK_MAX_BURST)]:
        monkeypatch.setattr(timing, "PEAK_BURST_S", burst_s)
        timed.clear()
        peak(timer=_products_counting_timer(products, timed, 1))
        assert [k for k, _ in timed] == [burst], burst_s


def test_vit_flops_formula_term_by_term():
    # t = (8/4)^2 + 1 = 5 tokens, w = 8, h = 24 (MLP ratio 3), D = 4, two layers; multiply-adds:
    # patch embedding (t - 1) w 3 p^2 = 4 * 8 * 48 = 1536; per layer t (4 w^2 + 2 w h) + 2 t^2 w
    # = 5 * (256 + 384) + 400 = 3600; projection w D = 32. FLOPs are twice that.
    from vlmrm_fast.profiler.flops import ViTShape

    shape = ViTShape(width=8, layers=2, patch=(4, 4), image=(8, 8), mlp_hidden=24, embed_dim=4)
    assert shape.tokens == 5
    assert shape.gflops() == pytest.approx(2 * (1536 + 2 * 3600 + 32) / 1e9, rel=1e-12)
    no_projection = ViTShape(width=8, layers=2, patch=(4, 4), image=(8, 8), mlp_hidden=24, embed_dim=None)
    assert no_projection.gflops() == pytest.approx(2 * (1536 + 2 * 3600) / 1e9, rel=1e-12)


def test_vit_flops_of_a_rectangular_image_and_patch():
    # Every tower above is square: a count that took one side twice passed. t = (8/4)(12/2) + 1 = 13 tokens,
    # w = 8, h = 32, one layer, no projection: (t - 1) w 3 ph pw + t (4 w^2 + 2 w h) + 2 t^2 w multiply-adds.
    from vlmrm_fast.profiler.flops import ViTShape

    shape = ViTShape(width=8, layers=1, patch=(4, 2), image=(8, 12), mlp_hidden=32, embed_dim=None)
    assert shape.tokens == 13
    assert shape.gflops() == pytest.approx(2 * (12 * 8 * 3 * 8 + 13 * (256 + 512) + 2 * 169 * 8) / 1e9, rel=1e-12)


def test_towers_that_are_not_plain_vits_get_no_analytic_count():
    from vlmrm_fast.profiler.flops import _gflops_and_method, vit_shape_from_config, vit_shape_from_tower

    # ResNets (layers per stage), timm towers and attentional pooling (CoCa) are not in the formula.
    for name in ("RN50", "convnext_base", "coca_ViT-B-32"):
        assert vit_shape_from_config(name) is None, name
    assert vit_shape_from_config("ViT-B-32").embed_dim == 512
    with pytest.raises(ValueError, match="no config"):
        vit_shape_from_config("ViT-B-33")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, _ = create_clip("vlmrm-tiny", None)
    visual = model.visual
    with_projection = vit_shape_from_tower(visual)
    assert with_projection.embed_dim == visual.proj.shape[1] and _gflops_and_method(visual)[1] == "analytic"
    visual.proj = None  # a tower without the output projection: none counted
    assert vit_shape_from_tower(visual).embed_dim is None
    visual.attn_pool = torch.nn.Identity()
    assert vit_shape_from_tower(visual) is None


def test_a_counted_tower_says_so():
    from vlmrm_fast.profiler.flops import _gflops_and_method

    class Conv(torch.nn.Module):
        image_size = 8

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, kernel_size=4, stride=4, bias=False)

        def forward(self, x):
            return self.conv(x).flatten(1)

    with pytest.warns(UserWarning, match="undercount"):
        assert _gflops_and_method(Conv()) == (pytest.approx(2 * 4 * 2 * 48 / 1e9), "flop-counter")


def test_seed_runs_under_fp16_autocast_on_cuda_only_and_its_goal_is_a_unit_vector(monkeypatch):
    # SPEC §1.4: the original ran fp32 weights under torch.autocast(float16) on CUDA.
    from conftest import make_tiny
    from vlmrm_fast.models import preprocess_spec_of
    from vlmrm_fast.profiler import seed as seed_module

    model = make_tiny(seed=2)[0]
    seed = seed_module.SeedPipeline(model, preprocess_spec_of(model, "vlmrm"), torch.device("cpu"))
    assert seed.goal.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert seed.projection.shape == (len(seed.goal), len(seed.goal))
    asked = []
    monkeypatch.setattr(seed_module.torch, "autocast",
                        lambda device, **kwargs: asked.append((device, kwargs)) or contextlib.nullcontext())
    seed._autocast()
    seed.device = torch.device("cuda")  # what it asks for on a GPU (nothing runs here)
    seed._autocast()
    assert asked == [("cuda", {"dtype": torch.float16, "enabled": False}),
                     ("cuda", {"dtype": torch.float16, "enabled": True})]


def _bench_args(*extra):
    return cli.build_parser().parse_args(["bench", "--device", "cpu", "--no-progress", "--no-plot", *extra])


def test_resolve_config_defaults_per_device_and_deduplicates(monkeypatch):
    from vlmrm_fast.profiler.run import resolve_config

    cpu = resolve_config(_bench_args())
    assert cpu.models == ["vlmrm-tiny", "ViT-B-32"] and cpu.batch_sizes == [1, 8, 32]
    assert cpu.backends == ["torch", "onnxruntime"] and cpu.dtypes == ["fp32"]
    assert (cpu.repeats, cpu.warmup, cpu.time_budget, cpu.frame_size) == (3, 1, 10.0, 480)
    assert cpu.seed and not cpu.kernel_profile and cpu.out.parent.name == "runs" and cpu.out.name.startswith("bench-")
    assert cpu.out.name.endswith(f"-{os.getpid()}")  # two runs started in the same second shared a folder
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the defaults are looked at
    gpu = resolve_config(cli.build_parser().parse_args(["bench", "--device", "cuda"]))
    assert gpu.models == ["ViT-B-32", "ViT-L-14", "ViT-bigG-14"] and gpu.batch_sizes == [1, 8, 64, 256, 1024]
    assert gpu.backends == ["torch", "compile"] and gpu.dtypes == ["bf16"] and (gpu.repeats, gpu.warmup) == (20, 3)
    # Repeated names run once; batch sizes run smallest first.
    given = resolve_config(_bench_args("--models", "vlmrm-tiny", "vlmrm-tiny", "--batch-sizes", "8", "1", "8",
                                       "--backends", "torch", "torch", "--dtypes", "fp32", "float32", "--no-seed",
                                       "--repeats", "5", "--warmup", "2", "--time-budget", "0.5", "--frame-size", "64"))
    assert given.models == ["vlmrm-tiny"] and given.batch_sizes == [1, 8]
    assert given.backends == ["torch"] and given.dtypes == ["fp32"] and not given.seed
    assert (given.repeats, given.warmup, given.time_budget, given.frame_size) == (5, 2, 0.5, 64)


def test_resolve_config_refuses_devices_it_cannot_profile(monkeypatch):
    from vlmrm_fast.profiler.run import resolve_config

    with pytest.raises(ValueError, match="only cuda and cpu"):
        resolve_config(cli.build_parser().parse_args(["bench", "--device", "meta"]))
    for name in ("foo", "cuda:x"):  # torch raises RuntimeError, which the CLI would show as a traceback
        with pytest.raises(ValueError, match=f"--device '{name}' is not a device: pass cuda, cuda:N or cpu"):
            resolve_config(cli.build_parser().parse_args(["bench", "--device", name]))
    for budget in ("0", "inf", "nan"):  # inf was taken, and bench.json said "time_budget": Infinity (no JSON)
        with pytest.raises(ValueError, match="--time-budget must be a positive number of seconds"):
            resolve_config(_bench_args("--time-budget", budget))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="pass --device cpu"):
        resolve_config(cli.build_parser().parse_args(["bench", "--device", "cuda"]))


def test_backend_unavailable_names_what_is_missing(monkeypatch):
    from vlmrm_fast.profiler import run as bench

    cpu = torch.device("cpu")
    assert "CUDA devices only" in bench.backend_unavailable("tensorrt", cpu)
    assert bench.backend_unavailable("torch", cpu) is None
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert "C++ compiler" in bench.backend_unavailable("compile", cpu)
    monkeypatch.setattr(bench.shutil, "which", lambda name: "/usr/bin/" + name)
    assert bench.backend_unavailable("compile", cpu) is None
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert bench.backend_unavailable("onnxruntime", cpu) == "onnx is not installed (pip install 'vlmrm-fast[export]')"


def test_the_seed_always_gets_480_pixel_frames():
    from vlmrm_fast.profiler.run import Frames

    cpu = torch.device("cpu")
    small = Frames.make(2, 32, cpu, seed=True)
    assert small.device.shape == (2, 32, 32, 3) and small.seed_device.shape == (2, 480, 480, 3)
    assert small.host is None and small.seed_pageable is None  # no host-to-device stage on CPU
    same = Frames.make(2, 480, cpu, seed=True)
    assert same.seed_device is same.device  # the run's frames are the seed's: no second copy
    assert Frames.make(2, 32, cpu, seed=False).seed_device is None


class _StageRecorder:
    """A stand-in for the profiler's StageTimer: calls each callable once, notes what ran inside it
    (``note``), and gives every timing its own median, 1 ms more than the last."""

    def __init__(self):
        self.ran, self.current, self.by_median = [], None, {}

    def note(self, what):
        if self.current is not None:
            self.current.append(what)

    def __call__(self, fn):
        from vlmrm_fast.profiler.timing import StageTiming

        self.current = []
        fn()
        median = 1e-3 * (len(self.by_median) + 1)
        self.by_median[median], self.current = self.current, None
        return StageTiming(median, median, median, 1)

    def paired(self, first, second):
        return self(first), self(second)

    def synchronize(self):
        pass

    def ran_in(self, timing):
        return self.by_median[timing.median_s]


@pytest.fixture
def small_profiler(tmp_path):
    """A Profiler of the tiny model at 64 px frames, batch 2, on CPU, with a recording timer; and the
    model, its tokenizer and the seed pipeline over it."""
    from tqdm import tqdm

    from vlmrm_fast.models import preprocess_spec_of
    from vlmrm_fast.profiler.flops import create_random_model
    from vlmrm_fast.profiler.report import Report
    from vlmrm_fast.profiler.run import Profiler, resolve_config
    from vlmrm_fast.profiler.seed import SeedPipeline

    config = resolve_config(_bench_args("--models", "vlmrm-tiny", "--batch-sizes", "2", "--backends", "torch",
                                        "--dtypes", "fp32", "--frame-size", "64", "--out", str(tmp_path)))
    profiler_ = Profiler(config, Report(environment={}, config={}), tqdm(disable=True), 0.0)
    profiler_.timer = _StageRecorder()
    base, tokenizer = create_random_model("vlmrm-tiny")
    seed = SeedPipeline(base, preprocess_spec_of(base, "vlmrm"), torch.device("cpu"))
    return profiler_, base, tokenizer, seed


def test_each_stage_times_its_own_step_and_the_seed_gets_its_own_frames(small_profiler, monkeypatch):
    from vlmrm_fast.profiler.seed import SeedPipeline

    profiler_, base, tokenizer, seed = small_profiler
    timer = profiler_.timer
    for method in ("preprocess", "tower", "score"):
        real = getattr(SeedPipeline, method)
        monkeypatch.setattr(SeedPipeline, method, lambda self, x, _m=method, _r=real: (
            timer.note((f"seed {_m}", tuple(x.shape[1:3]) if _m == "preprocess" else None)), _r(self, x))[1])
    seed_row = profiler_._measure_seed("vlmrm-tiny", seed, 2, "fp32", 1.0, "analytic")
    assert seed_row.frame_size == 480
    s = {stage: timer.ran_in(seed_row.timings[stage]) for stage in ("preprocess", "tower", "score", "end_to_end")}
    assert s["preprocess"] == [("seed preprocess", (480, 480))]
    assert s["tower"] == [("seed tower", None)] and s["score"] == [("seed score", None)]
    assert s["end_to_end"] == [("seed preprocess", (480, 480)), ("seed tower", None), ("seed score", None)]
    assert seed_row.timings["h2d"] is None  # CPU
    profiler_.report.rows.append(seed_row)

    rm = profiler_._reward_model(base, tokenizer, "vlmrm-tiny", dtype=torch.float32, backend="torch")
    real_pixels, real_score, backend = rm._pixels, rm.score, rm._backend

    class Tower:  # the backend, noting its calls
        def __getattr__(self, name):
            return getattr(backend, name)

        def __call__(self, pixels):
            timer.note("tower")
            return backend(pixels)

    rm._backend = Tower()
    rm._pixels = lambda frames, bottom_up: (timer.note(("pixels", tuple(frames.shape[1:3]))), real_pixels(frames, bottom_up))[1]
    rm.score = lambda embeddings: (timer.note("score"), real_score(embeddings))[1]
    row = profiler_._measure_reward(rm, "vlmrm-tiny", "fp32", 2, 1.0, "analytic", 0.5, seed)
    r = {stage: timer.ran_in(row.timings[stage]) for stage in ("preprocess", "tower", "score", "end_to_end")}
    assert r["preprocess"] == [("pixels", (64, 64))] and r["tower"] == ["tower"] and r["score"] == ["score"]
    assert r["end_to_end"] == [("pixels", (64, 64)), "tower"]  # rm(frames), at the run's frame size
    # The seed timed beside it runs on its own 480 px frames.
    assert timer.ran_in(row.timings["seed_end_to_end"]) == s["end_to_end"]
    assert row.frame_size == 64 and row.setup_seconds == 0.5
    # frames/s = N / median; the speedup is the row's end to end over the seed's, timed in the same pair.
    e2e, paired = row.timings["end_to_end"].median_s, row.timings["seed_end_to_end"].median_s
    assert row.end_to_end_fps == pytest.approx(2 / e2e) and row.seed_fps == pytest.approx(2 / paired)
    assert row.speedup_vs_seed == pytest.approx(paired / e2e)


def test_profile_backend_builds_each_precision_with_its_options(small_profiler, monkeypatch):
    from vlmrm_fast.backends import BackendError

    profiler_ = small_profiler[0]
    built = []

    def refuse(base, tokenizer, name, **options):
        built.append(options)
        raise BackendError("no; pass dtype=torch.float32.")

    monkeypatch.setattr(profiler_, "_reward_model", refuse)
    for backend, dtype in (("compile", "fp32"), ("onnxruntime", "int8"), ("tensorrt", "fp8"), ("torch", "int8"),
                           ("compile", "fp8"), ("torch", "fp8"), ("onnxruntime", "fp8")):
        profiler_._profile_backend("vlmrm-tiny", None, None, backend, dtype, 1.0, "analytic", None, None)
    compiled, int8, fp8, compiled_fp8, torch_fp8 = built  # torch int8 and onnxruntime fp8 are skipped before a build
    assert compiled == dict(dtype=torch.float32, backend="compile", max_batch_size=2, backend_options={"buckets": (2,)},
                            kernels="torch")
    # torch's fp8 scales activations per call: no calibration frames.
    assert compiled_fp8 == dict(dtype=torch.bfloat16, backend="compile", max_batch_size=2,
                                backend_options={"buckets": (2,), "quantize": "fp8"}, kernels="torch")
    assert torch_fp8 == dict(dtype=torch.bfloat16, backend="torch", max_batch_size=2, backend_options={"quantize": "fp8"},
                             kernels="torch")
    assert int8 == dict(dtype=torch.float32, backend="onnxruntime", max_batch_size=2,
                        backend_options={"quantize": "int8"}, kernels="torch")
    assert (fp8["dtype"], fp8["backend"], fp8["backend_options"]["quantize"]) == (torch.bfloat16, "tensorrt", "fp8")
    # fp8 is calibrated on frames of the run's size, never the ones it is checked on.
    calibration = fp8["backend_options"]["calibration_frames"]
    assert calibration.shape == (64, 64, 64, 3) and calibration.dtype == torch.uint8
    assert not torch.equal(calibration[:2], profiler_.frames.device[:2])
    reasons = [s["reason"] for s in profiler_.report.skipped]
    assert reasons[:3] == ["no; pass --dtypes fp32."] * 3 and "onnxruntime backend only" in reasons[3]
    assert reasons[4:6] == ["no; pass --dtypes fp32."] * 2
    assert "the torch, compile and tensorrt backends only" in reasons[6]
    assert profiler_.report.rows == [] and profiler_.report.failures == []


def test_compile_mode_reaches_the_compile_backend_and_the_report(small_profiler, monkeypatch, tmp_path):
    from vlmrm_fast.backends import BackendError
    from vlmrm_fast.profiler.report import Report, markdown_report
    from vlmrm_fast.profiler.run import resolve_config

    profiler_ = small_profiler[0]
    profiler_.config = resolve_config(_bench_args("--models", "vlmrm-tiny", "--batch-sizes", "2", "--backends", "compile",
                                                  "--compile-mode", "max-autotune", "--out", str(tmp_path)))
    built = []

    def refuse(base, tokenizer, name, **options):
        built.append(options)
        raise BackendError("no")

    monkeypatch.setattr(profiler_, "_reward_model", refuse)
    profiler_._profile_backend("vlmrm-tiny", None, None, "compile", "fp32", 1.0, "analytic", None, None)
    profiler_._profile_backend("vlmrm-tiny", None, None, "torch", "fp32", 1.0, "analytic", None, None)
    assert [b["backend_options"] for b in built] == [{"buckets": (2,), "mode": "max-autotune"}, None]
    env = {"device": "cpu", "timestamp": "t", "commit": "c", "cpu_count": 2}
    config = profiler_.config.as_json()
    # Asked for but no row ran (its build failed): the mode is named, without claiming compile rows.
    assert "torch.compile was asked for with mode=max-autotune; no compile row ran" in markdown_report(
        Report(env, config, rows=[]))
    unnamed = markdown_report(Report(env, {**config, "compile_mode": None}, rows=[]))
    assert "mode=default (the backend's default here); no compile row ran" in unnamed
    assert "compile rows ran" not in unnamed
    assert "mode=" not in markdown_report(Report(env, {**config, "backends": ["torch"]}, rows=[]))
    with pytest.raises(SystemExit):
        _bench_args("--compile-mode", "fastest")


@pytest.mark.parametrize("backends", [["--backends", "torch", "onnxruntime"], ["--quick"]])
def test_compile_mode_without_compile_rows_is_refused(backends):
    # It would go unused without a word (the report names the mode only where compile was asked for).
    from vlmrm_fast.profiler.run import resolve_config

    with pytest.raises(ValueError, match=r"--compile-mode max-autotune sets the compile backend's torch.compile mode, "
                                         r"but no compile rows run here \(--backends torch onnxruntime\): add compile "
                                         "to --backends, or leave --compile-mode out"):
        resolve_config(_bench_args(*backends, "--compile-mode", "max-autotune"))
    assert resolve_config(_bench_args("--backends", "torch", "compile", "--compile-mode", "default")).compile_mode == "default"


def test_kernels_resolve_for_the_device_and_name_the_option_where_they_cannot_run(monkeypatch):
    from vlmrm_fast.ops import _triton
    from vlmrm_fast.profiler.options import KERNEL_OPTIONS
    from vlmrm_fast.profiler.run import resolve_config

    assert KERNEL_OPTIONS == _triton.KERNEL_CHOICES  # the parser's names are the reward's
    assert resolve_config(_bench_args()).kernels == ["torch"]  # auto, on CPU
    assert resolve_config(_bench_args("--kernels", "torch", "auto")).kernels == ["torch"]  # one path: measured once
    # tests/conftest.py interprets the kernels, so that Triton runs on CPU tensors here.
    assert resolve_config(_bench_args("--kernels", "triton", "torch")).kernels == ["triton", "torch"]
    with pytest.raises(SystemExit):
        _bench_args("--kernels", "cuda")
    monkeypatch.setattr(_triton, "triton_runs_on", lambda device: False)
    with pytest.raises(ValueError, match=r"^--kernels triton cannot run on device cpu: .* or pass "
                       r"--kernels torch\.$"):
        resolve_config(_bench_args("--kernels", "torch", "triton"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the defaults are looked at
    monkeypatch.setattr(_triton, "HAS_TRITON", True)
    assert resolve_config(cli.build_parser().parse_args(["bench", "--device", "cuda"])).kernels == ["triton"]


def test_each_configuration_is_built_with_its_kernels_and_named_by_them_in_an_ab(small_profiler, monkeypatch):
    from vlmrm_fast.backends import BackendError

    profiler_ = small_profiler[0]
    built = []

    def refuse(base, tokenizer, name, **options):
        built.append(options["kernels"])
        raise BackendError("no")

    monkeypatch.setattr(profiler_, "_reward_model", refuse)
    profiler_._profile_backend("vlmrm-tiny", None, None, "torch", "fp32", 1.0, "analytic", None, None)
    profiler_.config.kernels = ["triton", "torch"]
    for kernels in ("triton", "torch"):
        profiler_._profile_backend("vlmrm-tiny", None, None, "torch", "fp32", 1.0, "analytic", None, None, kernels=kernels)
    assert built == ["torch", "triton", "torch"]
    assert [s["what"] for s in profiler_.report.skipped] == [
        "vlmrm-tiny torch fp32", "vlmrm-tiny torch fp32 kernels=triton", "vlmrm-tiny torch fp32 kernels=torch"]


def test_a_kernels_ab_measures_and_profiles_each_configuration_with_each_path(tmp_path):
    out = tmp_path / "ab"
    argv = ["bench", "--models", "vlmrm-tiny", "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "1",
            "--backends", "torch", "--dtypes", "fp32", "--kernels", "triton", "torch", "--frame-size", "64",
            "--device", "cpu", "--out", str(out), "--no-progress", "--no-plot", "--kernel-profile"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert cli.main(argv) == 0, stdout.getvalue()
    results = json.loads((out / "bench.json").read_text())
    rows = {(r["backend"], r["kernels"], r["batch"]): r for r in results["rows"]}
    # Triton's kernels ran in its interpreter here (conftest): the rows say so, not plain "triton".
    assert set(rows) == {(backend, kernels, n) for n in (1, 2)
                         for backend, kernels in (("seed", "torch"), ("torch", "triton-interpret"), ("torch", "torch"))}
    for kernels in ("triton-interpret", "torch"):  # each against the float32 eager path with torch's ops
        assert rows[("torch", kernels, 2)]["reward_error"] < 1e-5
    # Each path's profile sits beside its own row, not the first row of its backend and precision.
    profiles = {p["package_kernels"]: p for p in results["kernel_profiles"]}
    assert set(profiles) == {"triton-interpret", "torch"}
    for kernels, p in profiles.items():
        assert p["wall_ms"] == pytest.approx(1e3 * rows[("torch", kernels, 2)]["timings"]["tower"]["median_s"])
    table = (out / "bench.md").read_text()
    for kernels in ("triton-interpret", "torch"):
        assert f"| vlmrm-tiny | torch | fp32 | {kernels} | 2 |" in table
        assert f"vlmrm-tiny torch fp32, kernels {kernels}, batch 2: the costliest" in table
    assert "'triton-interpret' rows ran the package's Triton kernels in Triton's CPU interpreter" in table
    assert "runs the package's LayerNorm kernel on calls of 2^23 elements or more" in table


def test_the_kernels_notes_name_the_interpreter_and_the_layer_norm_threshold_only_where_rows_need_them():
    from vlmrm_fast.backends.triton_layer_norm import MIN_ELEMENTS
    from vlmrm_fast.profiler.report import kernels_notes

    assert MIN_ELEMENTS == 2 ** 23  # the note's figure (and its frames per model) follow from it
    for tokens, width, frames in ((50, 768, 219), (257, 1024, 32), (257, 1664, 20)):  # B-32, L-14, bigG-14 at 224
        assert -(-MIN_ELEMENTS // (tokens * width)) == frames
    torch_row = _row("ViT-B-32", "torch", 1.0, 1.0, "bf16")
    assert kernels_notes([torch_row]) == []
    notes = " ".join(kernels_notes([dataclasses.replace(torch_row, kernels="triton")]))
    assert "LayerNorm" in notes and "interpreter" not in notes
    compiled = dataclasses.replace(_row("ViT-B-32", "compile", 1.0, 1.0, "bf16"), kernels="triton")
    assert kernels_notes([compiled]) == []  # its tower runs inductor's kernels, never the swap
    notes = " ".join(kernels_notes([dataclasses.replace(torch_row, kernels="triton-interpret")]))
    assert "interpreter" in notes and "LayerNorm" in notes


def test_profile_backend_warms_up_before_timing_and_reports_the_reward_error(small_profiler, monkeypatch):
    profiler_, base, tokenizer, _ = small_profiler
    timer = profiler_.timer
    reference = profiler_._reference_rewards("vlmrm-tiny", base, tokenizer)
    assert reference.shape == (2,)  # the first REWARD_CHECK_FRAMES frames there are
    build = profiler_._reward_model

    def with_warmup(*args, **kwargs):
        rm = build(*args, **kwargs)
        rm.vision_backend.warmup = lambda: timer.note("warmup") or timer.ran.append("warmup")
        return rm

    monkeypatch.setattr(profiler_, "_reward_model", with_warmup)
    profiler_._profile_backend("vlmrm-tiny", base, tokenizer, "torch", "fp32", 1.0, "analytic", None, reference + 0.25)
    [row] = profiler_.report.rows
    assert timer.ran == ["warmup"] and all("warmup" not in ran for ran in timer.by_median.values())
    assert row.reward_error == pytest.approx(0.25, abs=1e-6)  # |rewards - reference|, largest
    assert row.seed_fps is None and profiler_.to_profile == []  # no seed here; --kernel-profile not given


def test_a_failed_configuration_is_reported_and_the_command_exits_1(tmp_path, monkeypatch):
    from vlmrm_fast.profiler import run as bench

    measure = bench.Profiler._measure_reward

    def fails_at_2(self, rm, name, dtype, n, *args):
        if n == 2:
            raise RuntimeError("out of something")
        return measure(self, rm, name, dtype, n, *args)

    monkeypatch.setattr(bench.Profiler, "_measure_reward", fails_at_2)
    argv = ["bench", "--models", "vlmrm-tiny", "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "1",
            "--backends", "torch", "--no-seed", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--no-plot"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 1
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch"] for r in results["rows"]] == [1] and results["complete"] is True
    assert results["failures"] == [{"what": "vlmrm-tiny torch fp32 batch 2", "error": "RuntimeError: out of something"}]


def test_a_configuration_out_of_memory_names_the_fix():
    # Its frames fitted (checked up front), the tower's activations at that batch did not.
    from types import SimpleNamespace

    from vlmrm_fast.profiler import run as bench

    failures = []
    profiler_ = SimpleNamespace(report=SimpleNamespace(failures=failures), say=lambda message: None,
                                _free=lambda: None)
    bench.Profiler.fail(profiler_, "ViT-L-14 torch bf16 batch 1024",
                        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"))
    assert failures[0]["error"].startswith("out of memory: pass smaller --batch-sizes")
    assert failures[0]["error"].endswith("(OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB)")


def test_a_run_with_nothing_it_can_run_stops_before_any_work(tmp_path, capsys):
    argv = ["bench", "--models", "vlmrm-tiny", "--backends", "tensorrt", "--no-seed", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--no-progress", "--no-plot"]
    assert cli.main(argv) == 2
    assert "none of the chosen backends can run here: tensorrt: TensorRT runs on CUDA devices only" in capsys.readouterr().err
    assert not (tmp_path / "out" / "bench.json").exists()


def test_a_refused_run_keeps_the_earlier_runs_plot_with_its_reports(tmp_path, monkeypatch, capsys):
    # A run refused before measuring (no backend runs here; frames that do not fit) removed the earlier run's
    # bench.png from --out and left its bench.json and bench.md: that run's plot was lost.
    from vlmrm_fast.profiler import run as bench

    earlier = {name: f"an earlier run's {name}".encode() for name in ("bench.json", "bench.md", "bench.png")}
    for name, data in earlier.items():
        (tmp_path / name).write_bytes(data)
    base = ["bench", "--models", "vlmrm-tiny", "--no-seed", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(base + ["--backends", "tensorrt"]) == 2
    monkeypatch.setattr(bench, "available_memory", lambda device: 10**6)
    assert cli.main(base + ["--backends", "torch", "--batch-sizes", "1000"]) == 2
    assert "out of memory at --batch-sizes 1000" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in earlier} == earlier
    # Interrupted as it starts, the run writes its own (empty) reports: the earlier plot goes with the others.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.Frames, "make", classmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(cli.build_parser().parse_args(base + ["--backends", "torch"]))
    assert json.loads((tmp_path / "bench.json").read_text())["complete"] is False
    assert not (tmp_path / "bench.png").exists()


def test_profile_tower_warms_up_then_profiles_the_calls_it_names():
    from vlmrm_fast.profiler.kernels import profile_tower

    calls = []
    weight = torch.ones(4, 4)

    def tower(pixels):
        calls.append(pixels.shape[0])
        return torch.mm(pixels.flatten(1)[:, :4], weight)

    profile = profile_tower(tower, torch.ones(2, 3, 4, 4), model="m", backend="torch", dtype="fp32", wall_ms=5.0,
                            gflops_per_image=1e-6, peak_tflops=None, calls=3, warmup=2)
    assert calls == [2] * 5 and profile.calls == 3 and profile.batch == 2 and profile.source == "cpu torch ops"
    [mm] = [k for k in profile.kernels if k.name == "aten::mm"]
    assert mm.kind == "matmul" and mm.launches == 1  # per call: 3 profiled launches over 3 calls
    assert profile.ceiling_ms is None and profile.wall_ms == 5.0


def test_the_kernel_table_lists_the_costliest_with_names_that_fit():
    from vlmrm_fast.profiler.kernels import TOP_KERNELS, KernelTime, TowerProfile, markdown_kernel_profiles

    long_name = "void cutlass::Kernel<cutlass::gemm::GemmUniversal<" + "x" * 80 + " | tile>>"
    kernels = [KernelTime(long_name, "matmul", 1, 1000.0), KernelTime("mul|add", "elementwise", 2, 500.0)] + [
        KernelTime(f"k{i}", "elementwise", 1, 100.0 - i) for i in range(TOP_KERNELS + 1)]
    profile = TowerProfile(model="m", backend="torch", dtype="bf16", batch=8, source="cpu torch ops", calls=3,
                           wall_ms=2500.0, gflops_per_image=1.0, peak_tflops=None, kernels=kernels)
    text = "\n".join(markdown_kernel_profiles([profile]))
    assert f"the costliest {TOP_KERNELS} of {TOP_KERNELS + 3} ops" in text  # CPU: ops, not kernels
    shown = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(shown) == TOP_KERNELS and "`k5`" in text and "`k6`" not in text  # k6 to k8 are left out
    assert shown[0] == f"| `{long_name[:87]}...` | matmul | 1 | 1,000 | 40.0% |"
    assert shown[1] == "| `mul/add` | elementwise | 2 | 500 | 20.0% |"  # no stray column separator
    assert "| m | torch | bf16 | torch | 8 | cpu torch ops | 2,500 |  |" in text  # thousands separated; no peak, no ceiling


# ---- run_info (what every result row names): behaviours a mutation audit found untested -------------


def _git(repo, *args):
    import subprocess

    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_commit_is_dirty_for_changed_tracked_files_and_new_code_only(tmp_path, monkeypatch):
    # Untracked files (results just written, caches) do not make a measurement's tree dirty; an
    # edit to a tracked file does, and so does a new module (code that may have run).
    from vlmrm_fast import run_info

    monkeypatch.delenv(run_info.COMMIT_VARIABLE, raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "one")
    monkeypatch.setattr(run_info, "REPO_ROOT", repo.resolve())
    head = run_info.command_output(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    assert head and run_info.git_commit() == head
    (repo / "results.json").write_text("{}")
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "results" / "kernels-cpu.csv").write_text("op\n")
    assert run_info.git_commit() == head
    (repo / "vlmrm_fast" / "profiler").mkdir(parents=True)
    (repo / "vlmrm_fast" / "profiler" / "new_stage.py").write_text("y = 1\n")
    assert run_info.git_commit() == head + "+dirty"
    (repo / "vlmrm_fast" / "profiler" / "new_stage.py").unlink()
    assert run_info.git_commit() == head
    (repo / "benchmarks" / "bench_more.py").write_text("z = 1\n")
    assert run_info.git_commit() == head + "+dirty"
    (repo / "benchmarks" / "bench_more.py").unlink()
    (repo / "code.py").write_text("x = 2\n")
    assert run_info.git_commit() == head + "+dirty"
    # A tree sent to a GPU machine with a git folder from an older commit: the commit the session
    # names is the tree's, not the stale folder's (nor "+dirty" against it).
    monkeypatch.setenv(run_info.COMMIT_VARIABLE, "e173084")
    assert run_info.git_commit() == "e173084"


def test_a_tree_inside_another_repository_does_not_take_its_commit(tmp_path, monkeypatch):
    # An installed or copied package whose folder lies inside some other checkout (a project that
    # vendors it, a virtual environment in a repository): that repository's commit is not ours.
    from vlmrm_fast import run_info

    repo = tmp_path / "repo"
    (repo / "site" / "vlmrm_fast_copy").mkdir(parents=True)
    (repo / "site" / "vlmrm_fast_copy" / "a.py").write_text("")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    monkeypatch.setattr(run_info, "REPO_ROOT", (repo / "site").resolve())
    monkeypatch.delenv(run_info.COMMIT_VARIABLE, raising=False)
    assert run_info.git_commit() == "unknown"
    monkeypatch.setenv(run_info.COMMIT_VARIABLE, " 7a93ce9\n")
    assert run_info.git_commit() == "7a93ce9"


def test_command_output_is_none_for_a_failing_or_missing_command(monkeypatch):
    import subprocess
    import sys

    from vlmrm_fast import run_info

    assert run_info.command_output([sys.executable, "-c", "print(' out ')"]) == "out"
    assert run_info.command_output([sys.executable, "-c", "print('partial'); raise SystemExit(3)"]) is None
    assert run_info.command_output(["/nonexistent/vlmrm-no-such-command"]) is None

    def too_slow(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], 10)

    monkeypatch.setattr(run_info.subprocess, "run", too_slow)
    assert run_info.command_output(["nvidia-smi"]) is None  # a hung driver query: no driver named, no crash


def test_gpu_driver_and_package_versions(monkeypatch):
    from importlib.metadata import version

    from vlmrm_fast import run_info

    monkeypatch.setattr(run_info, "command_output", lambda args: "550.54.15\n550.54.15")  # one line a GPU
    assert run_info.gpu_driver() == "550.54.15"
    monkeypatch.setattr(run_info, "command_output", lambda args: None)
    assert run_info.gpu_driver() == ""
    assert run_info.package_version("vlmrm-no-such-distribution", "pytest") == version("pytest")
    assert run_info.package_version("vlmrm-no-such-distribution") == ""
    assert run_info.device_name(torch.device("cpu")).endswith(f"({torch.get_num_threads()} threads)")


def test_a_command_that_fails_gives_no_output():
    # A failing command's stdout (git outside a repository, nvidia-smi without a driver) is no answer:
    # None, as for one that cannot run, so that callers fall back ("unknown", "").
    import sys

    from vlmrm_fast import run_info

    assert run_info.command_output([sys.executable, "-c", "print(' 550.54 ')"]) == "550.54"
    assert run_info.command_output([sys.executable, "-c", "print('partial'); raise SystemExit(1)"]) is None
    assert run_info.command_output(["vlmrm-no-such-command"]) is None


def test_tensorrts_version_is_found_under_its_cuda_specific_distribution_names(monkeypatch):
    # pip installs TensorRT as tensorrt-cu12 (or -cu13) beside a bare "tensorrt" shim that may be absent.
    import importlib.metadata

    from vlmrm_fast import run_info

    def version(name):
        if name != "tensorrt-cu13":
            raise importlib.metadata.PackageNotFoundError(name)
        return "10.9.0"

    monkeypatch.setattr(run_info.importlib.metadata, "version", version)
    assert run_info.library_versions("tensorrt") == {"tensorrt": "10.9.0"}


# ---- the profiler's figures: behaviours a second mutation audit found untested ----------------------


def _noting_batches(rm, timer):
    """``rm`` with its preprocessing op, tower and score noting (step, batch) to ``timer`` (a _StageRecorder)."""
    real_pixels, real_score, backend = rm._pixels, rm.score, rm._backend

    class Tower:
        def __getattr__(self, name):
            return getattr(backend, name)

        def __call__(self, pixels):
            timer.note(("tower", pixels.shape[0]))
            return backend(pixels)

    rm._backend = Tower()
    rm._pixels = lambda frames, bottom_up: (timer.note(("pixels", frames.shape[0])), real_pixels(frames, bottom_up))[1]
    rm.score = lambda embeddings: (timer.note(("score", embeddings.shape[0])), real_score(embeddings))[1]
    return rm


def test_every_stage_is_timed_on_the_whole_batch(small_profiler):
    # frames/s = N / median: a stage timed on fewer than N frames would read up to N times too fast.
    from vlmrm_fast.profiler.seed import SeedPipeline

    profiler_, base, tokenizer, _ = small_profiler
    timer = profiler_.timer

    class Seed(SeedPipeline):  # the seed, noting the batch each step gets
        def preprocess(self, frames):
            timer.note(("seed preprocess", frames.shape[0]))
            return super().preprocess(frames)

        def tower(self, pixels):
            timer.note(("seed tower", pixels.shape[0]))
            return super().tower(pixels)

        def score(self, embeddings):
            timer.note(("seed score", embeddings.shape[0]))
            return super().score(embeddings)

    from vlmrm_fast.models import preprocess_spec_of

    seed = Seed(base, preprocess_spec_of(base, "vlmrm"), torch.device("cpu"))
    seed_row = profiler_._measure_seed("vlmrm-tiny", seed, 2, "fp32", 1.0, "analytic")
    steps = [("seed preprocess", 2), ("seed tower", 2), ("seed score", 2)]
    assert [timer.ran_in(seed_row.timings[s]) for s in ("preprocess", "tower", "score", "end_to_end")] == [
        steps[:1], steps[1:2], steps[2:], steps]
    profiler_.report.rows.append(seed_row)

    rm = _noting_batches(profiler_._reward_model(base, tokenizer, "vlmrm-tiny", dtype=torch.float32, backend="torch"),
                         timer)
    row = profiler_._measure_reward(rm, "vlmrm-tiny", "fp32", 2, 1.0, "analytic", 0.0, seed)
    stages = ("preprocess", "tower", "score", "end_to_end", "seed_end_to_end")
    assert [timer.ran_in(row.timings[s]) for s in stages] == [
        [("pixels", 2)], [("tower", 2)], [("score", 2)], [("pixels", 2), ("tower", 2)], steps]


def test_a_batch_the_seed_did_not_run_at_is_timed_without_it(small_profiler):
    # Where the seed's own row is missing (it failed there: the fp32 seed runs out of memory first at
    # large batches), the row is timed alone, with no 'vs seed', rather than failing with the seed.
    import dataclasses

    profiler_, base, tokenizer, _ = small_profiler

    def seed_out_of_memory(frames):
        raise RuntimeError("CUDA out of memory")

    # The seed ran for another model at this batch size, and for this model at another one.
    profiler_.report.rows += [dataclasses.replace(_row("ViT-B-32", "seed", 10.0, 1.0), batch=2),
                              dataclasses.replace(_row("vlmrm-tiny", "seed", 10.0, 1.0), batch=1)]
    timer = profiler_.timer
    rm = _noting_batches(profiler_._reward_model(base, tokenizer, "vlmrm-tiny", dtype=torch.float32, backend="torch"),
                         timer)
    row = profiler_._measure_reward(rm, "vlmrm-tiny", "fp32", 2, 1.0, "analytic", 0.0, seed_out_of_memory)
    assert "seed_end_to_end" not in row.timings
    assert timer.ran_in(row.timings["end_to_end"]) == [("pixels", 2), ("tower", 2)]  # still rm(frames), whole
    assert row.seed_fps is None and row.speedup_vs_seed is None


def test_reward_error_is_the_largest_difference_not_a_typical_one(small_profiler):
    profiler_, base, tokenizer, _ = small_profiler
    reference = profiler_._reference_rewards("vlmrm-tiny", base, tokenizer)
    # One frame off by 0.25, the other exact: the error is 0.25 (a mean would say 0.125).
    profiler_._profile_backend("vlmrm-tiny", base, tokenizer, "torch", "fp32", 1.0, "analytic", None,
                               reference + torch.tensor([0.0, 0.25]))
    [row] = profiler_.report.rows
    assert row.reward_error == pytest.approx(0.25, abs=1e-6)


def test_the_seed_scores_through_its_d_by_d_matrix():
    # SPEC §1.4: the original multiplies by the explicit D x D matrix M (what the fast path avoids); the
    # seed's score must be that product, not the O(D) shortcut, for its 'score' figure to be the original's.
    from conftest import make_tiny
    from vlmrm_fast.models import preprocess_spec_of
    from vlmrm_fast.profiler.seed import SeedPipeline

    model = make_tiny(seed=2)[0]
    seed = SeedPipeline(model, preprocess_spec_of(model, "vlmrm"), torch.device("cpu"))
    dim = len(seed.goal)
    generator = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(4, dim, generator=generator), dim=-1)
    a = torch.randn(dim, dim, generator=generator)
    seed.projection = (a + a.T) / dim  # any matrix: the score is 1 - |(x - g) M|^2 / 2 with it
    expected = 1 - ((x - seed.goal) @ seed.projection).norm(dim=-1) ** 2 / 2
    assert torch.allclose(seed.score(x), expected, atol=1e-6)
    assert all(p.dtype == torch.float32 for p in seed.model.parameters())  # fp32 weights, as the original's


def test_the_plot_shows_end_to_end_frames_per_second_per_configuration(tmp_path, monkeypatch):
    # bench.png: one line per (model, backend, dtype, kernels), end to end frames/s against the batch size.
    from matplotlib.axes import Axes

    from vlmrm_fast.profiler.report import Report, write_plot

    lines = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, **kw: lines.append((kw["label"], list(x), list(y), kw["linewidth"]))
                        or real_plot(self, x, y, **kw))
    rows = [dataclasses.replace(_row("ViT-B-32", "torch", fps, 1.0), batch=batch, tower_fps=3 * fps, score_fps=7 * fps)
            for batch, fps in ((8, 20.0), (1, 5.0))]
    rows.append(dataclasses.replace(_row("ViT-B-32", "seed", 4.0, 1.0), tower_fps=9.0))
    config = {**CONFIG, "device": "cpu", "frame_size": 224}
    write_plot(tmp_path / "bench.png", Report(ENV, config, rows=rows))
    assert lines == [("ViT-B-32 torch fp32", [1, 8], [5.0, 20.0], 1.5), ("ViT-B-32 seed fp32", [8], [4.0], 1.5)]
    # --kernels triton torch: a line per path, named, torch's thin; the seed (always torch's ops) as before.
    lines.clear()
    rows += [dataclasses.replace(row, kernels="triton", end_to_end_fps=2 * row.end_to_end_fps) for row in rows[:2]]
    write_plot(tmp_path / "bench.png", Report(ENV, config, rows=rows))
    assert lines == [("ViT-B-32 torch fp32 kernels=torch", [1, 8], [5.0, 20.0], 0.8), ("ViT-B-32 seed fp32", [8], [4.0], 1.5),
                     ("ViT-B-32 torch fp32 kernels=triton", [1, 8], [10.0, 40.0], 1.5)]


def test_summarize_events_lists_the_costliest_first():
    from types import SimpleNamespace

    from vlmrm_fast.profiler.kernels import summarize_events

    events = [SimpleNamespace(key=name, device_type="DeviceType.CPU", self_cpu_time_total=us, count=3)
              for name, us in (("aten::gelu", 300.0), ("aten::layer_norm", 600.0), ("aten::addmm", 1500.0))]
    kernels = summarize_events(events, on_cuda=False, calls=3)
    assert [k.name for k in kernels] == ["aten::addmm", "aten::layer_norm", "aten::gelu"]
    assert [k.ms for k in kernels] == pytest.approx([0.5, 0.2, 0.1])


def test_a_ratio_is_checked_against_the_seed_at_its_own_batch_size():
    # The seed's speed depends on the batch: a row's paired seed is compared with the seed's row at
    # the same batch size, not with another batch's.
    import dataclasses

    from vlmrm_fast.profiler.report import unsteady_rows

    seed_1 = dataclasses.replace(_row("ViT-B-32", "seed", 10.0, 1.0), batch=1, seed_fps=None, speedup_vs_seed=None)
    seed_8 = dataclasses.replace(_row("ViT-B-32", "seed", 40.0, 1.0), seed_fps=None, speedup_vs_seed=None)
    row_1 = dataclasses.replace(_row("ViT-B-32", "torch", 20.0, 10.0), batch=1)
    row_8 = _row("ViT-B-32", "torch", 80.0, 40.0)
    assert unsteady_rows([seed_1, seed_8, row_1, row_8]) == []
    assert unsteady_rows([seed_8, seed_1, row_1, row_8]) == []
    assert unsteady_rows([seed_1, seed_8, dataclasses.replace(row_8, seed_fps=10.0)]) == [2]
    assert unsteady_rows([seed_8, seed_1, dataclasses.replace(row_1, seed_fps=40.0)]) == [2]


def test_paired_timing_gives_each_callable_its_own_times(monkeypatch):
    # end to end and the seed's are timed as a pair: each must get its own calls' times, or 'vs seed' inverts.
    timer, _ = _scripted_timer(monkeypatch, [1.0, 5.0, 6.0, 2.0, 3.0, 7.0], warmup=0, repeats=3, time_budget=100.0)
    first, second = timer.paired(lambda: None, lambda: None)  # timed: first, second, second, first, first, second
    assert (first.median_s, first.min_s, first.max_s) == (2.0, 1.0, 3.0)
    assert (second.median_s, second.min_s, second.max_s) == (6.0, 5.0, 7.0)


def test_the_cuda_seed_rows_name_its_fp16_autocast(small_profiler, monkeypatch):
    # On a GPU the seed runs fp32 weights under fp16 autocast: its rows say so, and are set against the
    # fp16 peak (a row labelled fp32 would be set against a peak the run does not measure on CUDA).
    from vlmrm_fast.profiler import run as bench
    from vlmrm_fast.profiler.report import peak_dtype
    from vlmrm_fast.profiler.seed import SEED_CUDA_DTYPE

    profiler_, base, _, _ = small_profiler
    labels = []
    monkeypatch.setattr(bench, "SeedPipeline", lambda model, spec, device: "a seed")
    monkeypatch.setattr(profiler_, "_measure_seed", lambda name, seed, n, dtype, *args: labels.append(dtype)
                        or _row(name, "seed", 1.0, 1.0, dtype))
    profiler_.device = torch.device("cuda")  # what it labels on a GPU (nothing runs here)
    profiler_._profile_seed("vlmrm-tiny", base, 1.0, "analytic")
    assert labels == [SEED_CUDA_DTYPE] and peak_dtype(labels[0]) == "fp16"


def test_the_table_cells_of_one_row():
    # Each figure under its own header: rates, the seed's, the ratio, the FLOP rate and 'of peak' in percent.
    import dataclasses

    from vlmrm_fast.profiler.report import markdown_table

    row = dataclasses.replace(_row("ViT-B-32", "torch", 2500.0, 1000.0), h2d_fps=9000.0, preprocess_fps=8000.0,
                              tower_fps=3000.0, score_fps=50000.0, achieved_tflops=26.46, peak_tflops=105.84,
                              frac_of_peak=0.25, build_seconds=12.34, reward_error=3e-4)
    header, _, line = markdown_table([row]).splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), line.strip("| ").split(" | ")))
    assert cells == {"model": "ViT-B-32", "backend": "torch", "dtype": "fp32", "kernels": "torch", "batch": "8",
                     "frame": "480", "h2d": "9,000", "preprocess": "8,000", "tower": "3,000", "score": "50,000",
                     "end to end": "2,500", "seed": "1,000", "vs seed": "2.50x", "GFLOP/img": "8.82", "TFLOP/s": "26.5",
                     "of peak": "25.0%", "build s": "12.3", "reward err": "3.0e-04"}


def test_a_stage_within_the_margin_of_the_pipeline_is_not_marked():
    # Timing noise of a few percent is no disturbance: only a stage over 1.25x slower than the whole is marked.
    import dataclasses

    from vlmrm_fast.profiler.report import disturbed_stages

    row = dataclasses.replace(_row("ViT-B-32", "torch", 20.0, 10.0), preprocess_fps=300.0, tower_fps=17.0,
                              score_fps=900.0)
    assert disturbed_stages(row) == []  # 17 x 1.25 > 20


# ---- what a second mutation audit of the profiler found unguarded ------------------------------------


def test_paired_timing_pauses_only_at_a_switch_of_callable(monkeypatch):
    # The exact sequence: a pause before each warm-up call (the second's too), then before every change
    # of callable, followed by an untimed warm call; consecutive calls of one callable get no pause.
    events, _ = _recorded_paired_timing(monkeypatch, repeats=2)
    assert events == ["pause", "a", "pause", "b",                        # one warm-up call each
                      "pause", "a", "timed", "a", "pause", "b", "timed", "b",  # pair 1: a then b
                      "timed", "b", "pause", "a", "timed", "a"]         # pair 2: b (no switch), then a


def test_matmul_peak_sizes_on_cpu_and_an_untimed_first_product_at_each(monkeypatch):
    # n doubles from 512 up to 2048 on CPU (the docstring's size); at every size the first product is
    # untimed (library set-up), the second times one product, and only the last size is timed in bursts.
    import collections

    from vlmrm_fast.profiler import timing

    sizes = []
    monkeypatch.setattr(timing.torch, "mm", lambda a, b, out: sizes.append(a.shape[0]))  # instant
    monkeypatch.setattr(timing.time, "sleep", lambda s: None)
    monkeypatch.setattr(timing, "PEAK_BURST_S", 0.0)  # bursts of one product
    timer = timing.StageTimer(torch.device("cpu"), warmup=0, repeats=1, time_budget=1.0)
    assert timing.measure_peak_tflops(torch.device("cpu"), torch.float32, timer)[1] == 2048
    assert collections.Counter(sizes) == {512: 2, 1024: 2, 2048: 3}


def test_a_towers_mlp_width_is_read_off_the_tower_not_assumed_four_times_its_width():
    # ViT-g-14 and ViT-bigG-14 have MLP ratios of 4.36 and 4.92: an instantiated tower's count must use
    # its own MLP width, the same as the count from a config with that ratio.
    from vlmrm_fast.profiler.flops import ViTShape, tower_gflops

    tower = open_clip.transformer.VisionTransformer(
        image_size=16, patch_size=8, width=16, layers=2, heads=2, mlp_ratio=2.0, output_dim=8)
    expected = ViTShape(width=16, layers=2, patch=(8, 8), image=(16, 16), mlp_hidden=32, embed_dim=8).gflops()
    assert tower_gflops(tower) == pytest.approx(expected, rel=1e-12)


def test_a_vit_whose_mlp_is_not_a_linear_layer_gets_no_analytic_count():
    # A tower whose first MLP is not an nn.Linear (replaced, quantised) is not the plain ViT the formula
    # describes: it is counted instead, with the warning, rather than read (or crashed on) as one.
    from vlmrm_fast.profiler.flops import vit_shape_from_tower

    tower = open_clip.transformer.VisionTransformer(
        image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_ratio=2.0, output_dim=8)
    assert vit_shape_from_tower(tower) is not None
    tower.transformer.resblocks[0].mlp.c_fc = torch.nn.Sequential(torch.nn.Linear(16, 32))
    assert vit_shape_from_tower(tower) is None
    del tower.transformer.resblocks[0].mlp
    assert vit_shape_from_tower(tower) is None


def test_random_models_are_the_same_on_every_creation():
    # Speed does not depend on the weights, but 'reward err' does: one model name gives one set of weights
    # (seed 0), whatever random numbers were drawn before.
    from vlmrm_fast.profiler.flops import create_random_model

    first, _ = create_random_model("vlmrm-tiny")
    torch.rand(7)
    second, _ = create_random_model("vlmrm-tiny")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


@pytest.mark.parametrize("option", ["--repeats", "--warmup", "--batch-sizes", "--frame-size"])
def test_bench_counts_refuse_zero_and_negatives(option, capsys):
    # --repeats 0 would silently fall back to the default (0 is falsy), and -1 would time no call at all
    # and fail on an empty median after the models were built: the parser refuses both.
    for given in ("0", "-1"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["bench", option, given])
        assert option in capsys.readouterr().err


def test_frames_per_second_are_the_batch_over_the_median_call_not_the_fastest():
    # bench.md: "Frames/s = batch / median seconds per call"; a row built from the min (or the max) of
    # uneven repeats would quote the luckiest (or unluckiest) call.
    from vlmrm_fast.profiler.report import _stage_row
    from vlmrm_fast.profiler.timing import StageTiming

    def t(median):
        return StageTiming(median_s=median, min_s=median / 2, max_s=median * 3, repeats=3)

    timings = {"h2d": t(0.005), "preprocess": t(0.01), "tower": t(0.02), "score": t(0.04), "end_to_end": t(0.08)}
    row = _stage_row(model="m", backend="torch", dtype="fp32", kernels="torch", batch=8, frame_size=224,
                     timings=timings, gflops=2.0, flops_method="analytic", build_seconds=1.0, setup_seconds=2.0)
    assert (row.h2d_fps, row.preprocess_fps, row.tower_fps, row.score_fps, row.end_to_end_fps) == pytest.approx(
        (1600, 800, 400, 200, 100))
    assert row.achieved_tflops == pytest.approx(2.0 * 400 / 1e3)


def test_the_seed_normalises_the_embeddings_it_scores_as_the_original_did():
    # The original's reward normalises x before the D x D product, whatever the tower gave: the seed's
    # 'score' stage does that work too, and a scaled embedding scores as the unit one.
    from conftest import make_tiny
    from vlmrm_fast.models import preprocess_spec_of
    from vlmrm_fast.profiler.seed import SeedPipeline

    model = make_tiny(seed=2)[0]
    seed = SeedPipeline(model, preprocess_spec_of(model, "vlmrm"), torch.device("cpu"))
    x = torch.nn.functional.normalize(torch.randn(4, len(seed.goal), generator=torch.Generator().manual_seed(3)), dim=-1)
    expected = 1 - ((x - seed.goal) @ seed.projection).norm(dim=-1) ** 2 / 2
    assert torch.allclose(seed.score(3.0 * x), expected, atol=1e-6)


def test_a_rows_setup_time_covers_its_build_and_warm_up(small_profiler, monkeypatch):
    # bench.json's setup_seconds: what the configuration cost before its first timed call (build, then the
    # warm-up that compiles), reported apart from the frames/s and not lost.
    import time

    profiler_, base, tokenizer, _ = small_profiler
    build = profiler_._reward_model

    def with_slow_warmup(*args, **kwargs):
        rm = build(*args, **kwargs)
        rm.vision_backend.warmup = lambda: time.sleep(0.2)
        return rm

    monkeypatch.setattr(profiler_, "_reward_model", with_slow_warmup)
    profiler_._profile_backend("vlmrm-tiny", base, tokenizer, "torch", "fp32", 1.0, "analytic", None, None)
    [row] = profiler_.report.rows
    assert row.setup_seconds >= 0.2 and row.build_seconds == 0.0  # the torch backend builds nothing


def test_the_seed_figure_beside_a_row_is_its_paired_median(small_profiler, monkeypatch):
    # 'seed' and 'vs seed' come from the seed's end to end timed in alternation with the row's: the batch over
    # its median, like every other frames/s, not over its fastest call.
    import dataclasses

    from vlmrm_fast.profiler.timing import StageTiming

    profiler_, base, tokenizer, seed = small_profiler
    profiler_.report.rows.append(dataclasses.replace(_row("vlmrm-tiny", "seed", 50.0, 1.0), batch=2, seed_fps=None,
                                                     speedup_vs_seed=None))
    own, seeds = StageTiming(0.02, 0.01, 0.04, 3), StageTiming(0.08, 0.02, 0.16, 3)
    monkeypatch.setattr(profiler_.timer, "paired", lambda first, second: (own, seeds))
    rm = profiler_._reward_model(base, tokenizer, "vlmrm-tiny", dtype=torch.float32, backend="torch")
    row = profiler_._measure_reward(rm, "vlmrm-tiny", "fp32", 2, 1.0, "analytic", 0.0, seed)
    assert (row.end_to_end_fps, row.seed_fps, row.speedup_vs_seed) == pytest.approx((100.0, 25.0, 4.0))
    assert row.timings["end_to_end"] is own and row.timings["seed_end_to_end"] is seeds


def test_the_reference_rewards_run_in_full_float32(small_profiler, monkeypatch):
    # On CUDA, TF32 matmuls and convolutions (cuDNN's default) in the reference would become part of every
    # row's 'reward err': the float32 eager path runs with them off (a no-op on CPU, so it is recorded here).
    from vlmrm_fast.profiler import run as bench

    profiler_, base, tokenizer, _ = small_profiler
    entered = []

    @contextlib.contextmanager
    def recording():
        entered.append("full float32")
        yield

    monkeypatch.setattr(bench, "_full_float32", recording)
    assert profiler_._reference_rewards("vlmrm-tiny", base, tokenizer).shape == (2,)
    assert entered == ["full float32"]


# ---- what a mutation audit of the report's text found unguarded ------------------------------------


def test_the_tables_separator_row_has_one_cell_per_column():
    # Markdown renders no table whose separator row has fewer cells than its header: bench.md's whole
    # table, and the kernel profile's summary, would show as plain text.
    from vlmrm_fast.profiler.kernels import KernelTime, TowerProfile, markdown_kernel_profiles
    from vlmrm_fast.profiler.report import markdown_table

    header, separator = markdown_table([_row("ViT-B-32", "torch", 12.0, 10.0)]).splitlines()[:2]
    assert separator.count("---") == header.count("|") - 1
    profile = TowerProfile(model="ViT-B-32", backend="torch", dtype="fp32", batch=8, source="cpu torch ops", calls=3,
                           wall_ms=10.0, gflops_per_image=8.8, peak_tflops=1.0,
                           kernels=[KernelTime("aten::addmm", "matmul", 12.0, 6.0)])
    lines = markdown_kernel_profiles([profile])
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            assert line.count("---") == lines[i - 1].count("|") - 1, lines[i - 1]


def test_the_layer_norm_note_gives_the_threshold_the_kernel_uses():
    # "2^23 elements": the figure the note's frames per model (219, 32, 20) follow from, read off MIN_ELEMENTS.
    from vlmrm_fast.profiler.report import kernels_notes

    row = dataclasses.replace(_row("ViT-B-32", "torch", 1.0, 1.0, "bf16"), kernels="triton")
    assert "on calls of 2^23 elements or more" in " ".join(kernels_notes([row]))


def test_the_report_gives_each_peak_with_its_matrix_size_and_the_pause_between_stages():
    # "fp32 1.23 TFLOP/s (2048^3)": the size says how the peak was measured (a CPU peak from 2048^3 products,
    # not from the GPU's); the pause figure is timing.SWITCH_PAUSE_S, not a number written beside it.
    from vlmrm_fast.profiler.report import Report, markdown_report
    from vlmrm_fast.profiler.timing import SWITCH_PAUSE_S

    report = Report(ENV, CONFIG)
    report.add_peak("fp32", 1.0, 1024)
    report.add_peak("fp32", 1.234, 2048)
    text = markdown_report(report)
    assert "before and after each model): fp32 1.23 TFLOP/s (2048^3)." in text
    assert f"starts after a {SWITCH_PAUSE_S:g} s pause" in text


def test_tflops_and_milliseconds_of_a_thousand_and_more_are_never_in_e_notation():
    # An H200's fp8 peak (over 1,000 TFLOP/s) read "fp8 1.31e+03 TFLOP/s", and 999.7 ms "1e+03".
    import dataclasses

    from vlmrm_fast.profiler.kernels import TowerProfile, markdown_kernel_profiles
    from vlmrm_fast.profiler.report import Report, markdown_report, markdown_table

    report = Report(ENV, CONFIG)
    report.add_peak("fp8", 1312.4, 8192)
    report.add_peak("bf16", 999.7, 8192)
    assert "fp8 1,312 TFLOP/s (8192^3), bf16 1,000 TFLOP/s (8192^3)." in markdown_report(report)
    row = dataclasses.replace(_row("ViT-B-32", "torch", 2500.0, 1000.0, "fp8"), achieved_tflops=1049.6)
    header, _, line = markdown_table([row]).splitlines()
    assert dict(zip(header.strip("| ").split(" | "), line.strip("| ").split(" | ")))["TFLOP/s"] == "1,050"
    profile = TowerProfile(model="m", backend="torch", dtype="fp8", batch=1024, source="cuda kernels", calls=3,
                           wall_ms=999.7, gflops_per_image=967.5, peak_tflops=1312.4)
    text = "\n".join(markdown_kernel_profiles([profile]))
    assert "| 1,000 | 755 |" in text and "e+" not in text  # wall 999.7 ms; ceiling 967.5 x 1024 / 1312.4 ms


def test_the_peak_is_named_with_the_size_of_its_own_measurement():
    # The size beside a peak is that of the measurement that gave it, not of the last one: CPU fp16 here took
    # 0.11 s at 512^3 and 2.2 s at 1024^3 (0.0025 against 0.001 TFLOP/s), and lands on either with load.
    from vlmrm_fast.profiler.report import Report, markdown_report

    report = Report(ENV, CONFIG)
    report.add_peak("fp16", 0.0025, 512)
    report.add_peak("fp16", 0.001, 1024)
    assert (report.peak_tflops["fp16"], report.peak_sizes["fp16"]) == (0.0025, 512)
    assert "fp16 0.0025 TFLOP/s (512^3)." in markdown_report(report)
    report.add_peak("fp16", 0.003, 1024)
    assert (report.peak_tflops["fp16"], report.peak_sizes["fp16"]) == (0.003, 1024)


def test_the_tflops_formula_the_report_states_gives_the_tables_figure():
    # GFLOP/img x frames/s is GFLOP/s: the note said "TFLOP/s = tower GFLOP/img x tower frames/s", 1,000x the
    # figure beside it (0.0304 GFLOP x 554 frames/s = 16.8, the column 0.0168).
    import dataclasses

    from vlmrm_fast.profiler.report import Report, _stage_row, markdown_report
    from vlmrm_fast.profiler.timing import StageTiming

    timing = StageTiming(0.5, 0.5, 0.5, 1)
    row = _stage_row(model="m", backend="torch", dtype="fp32", kernels="torch", batch=277, frame_size=480,
                     timings={"h2d": None, "preprocess": timing, "tower": timing, "score": timing, "end_to_end": timing},
                     gflops=0.0304, flops_method="analytic", build_seconds=0.0, setup_seconds=0.0)
    assert row.achieved_tflops == pytest.approx(0.0304 * 554 / 1000)
    text = markdown_report(Report(ENV, CONFIG, rows=[dataclasses.replace(row)]))
    assert "TFLOP/s = tower GFLOP/img x tower frames/s / 1,000;" in text and "| 0.0168 |" in text


def test_the_load_average_is_the_one_minute_figure_rounded(monkeypatch):
    # bench.md says "Load average (1 min)": the first of os.getloadavg()'s three, not the 5- or 15-minute one.
    from vlmrm_fast.profiler import report

    monkeypatch.setattr(report.os, "getloadavg", lambda: (1.23456, 5.0, 9.0))
    assert report.load_average() == 1.23


def test_the_cuda_environment_gives_the_gpu_memory_in_gib(monkeypatch):
    # 80 GiB is 85.9 GB: a "gpu_memory_gib" in GB would read as another card.
    import types

    from vlmrm_fast.profiler import report

    props = types.SimpleNamespace(total_memory=80 * 2**30, major=9, minor=0)
    monkeypatch.setattr(report.torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(report.torch.cuda, "get_device_name", lambda device: "NVIDIA H100")
    monkeypatch.setattr(report, "command_output", lambda args: "570.1\n570.1")
    env = report.environment(torch.device("cuda", 0))
    assert env["gpu_memory_gib"] == 80.0 and env["compute_capability"] == "9.0"
    assert env["device"] == "NVIDIA H100" and env["driver"] == "570.1"


def test_a_kernels_share_is_of_the_kernels_sum_where_that_exceeds_the_wall_time():
    # On CPU the profiler's overhead can make the ops' sum exceed the unprofiled wall time: each listed op's
    # share is then of that sum, as the summary line's are, so that shares never add up past 100%.
    from vlmrm_fast.profiler.kernels import KernelTime, TowerProfile, markdown_kernel_profiles

    kernels = [KernelTime("aten::addmm", "matmul", 12, 15.0), KernelTime("aten::gelu", "elementwise", 2, 5.0)]
    profile = TowerProfile(model="m", backend="torch", dtype="fp32", batch=8, source="cpu torch ops", calls=3,
                           wall_ms=10.0, gflops_per_image=1.0, peak_tflops=None, kernels=kernels)
    lines = markdown_kernel_profiles([profile])
    assert "| `aten::addmm` | matmul | 12 | 15 | 75.0% |" in lines
    assert "| `aten::gelu` | elementwise | 2 | 5 | 25.0% |" in lines
    assert "| cpu torch ops | 10 |  | 15 (75%) | 0 (0%) | 0 (0%) | 5 (25%) | 0 (0%) | 0 (0%) |" in "\n".join(lines)
