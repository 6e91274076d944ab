"""`vlmrm-fast export`: files that ONNX Runtime runs and that agree with torch."""
import copy
import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from conftest import make_tiny
from reference import float64_model, reference_preprocess
from vlmrm_fast.backends import onnx_export
from vlmrm_fast.cli import main

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*random weights:UserWarning"),
    pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime"),
]


@pytest.mark.parametrize("input_format,external", [("uint8-nhwc", "no"), ("pixels", "yes")])
def test_export_onnx(tmp_path, capsys, input_format, external):
    out = tmp_path / "tower.onnx"
    code = main(["export", "vlmrm-tiny", "--out", str(out), "--input", input_format, "--external-data", external])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert (tmp_path / "tower.onnx.data").exists() == (external == "yes")
    assert float(re.search(r"max relative error ([0-9.e+-]+\d)", printed).group(1)) <= 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shape = (3, 224, 224, 3) if input_format == "uint8-nhwc" else (3, 3, 224, 224)
    dtype = np.uint8 if input_format == "uint8-nhwc" else np.float32
    (embeddings,) = session.run(None, {session.get_inputs()[0].name: np.zeros(shape, dtype)})
    assert embeddings.shape == (3, 32) and np.isfinite(embeddings).all()


def test_export_of_a_tower_that_returns_its_tokens_too(tmp_path, capsys, monkeypatch):
    # CoCa's tower returns (pooled, tokens): the graph has the pooled embedding as its one output, and
    # export's check against torch compares that (it failed on the tuple).
    from open_clip import factory

    from conftest import TINY_COCA

    monkeypatch.setitem(factory._MODEL_CONFIGS, "test-tiny-coca", TINY_COCA)
    out = tmp_path / "coca.onnx"
    assert main(["export", "test-tiny-coca", "--pretrained", "none", "--out", str(out)]) == 0
    assert float(re.search(r"max relative error ([0-9.e+-]+\d)", capsys.readouterr().out).group(1)) <= 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.shape[1] for o in session.get_outputs()] == [32]


def _session(path, dtype):
    import onnxruntime as ort

    # Default options (every graph optimisation) for float16 graphs too: what a user's session gets.
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("input_format", ["uint8-nhwc", "pixels"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_matches_an_independent_tower(tmp_path, input_format, dtype):
    """The written file, run by ONNX Runtime on random frames, against the float64 tower on the float64
    reference preprocessing (nothing of the package's own preprocessing or checks): float32 within
    1e-4 relative (the issue's bar); float16 within twice PyTorch's own float16 error (the exact input
    rounded to float16 through a float16 copy of the tower)."""
    model = make_tiny(seed=3)[0].eval()
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "tower.onnx"
    assert main(["export", "vlmrm-tiny", "--pretrained", str(checkpoint), "--out", str(out), "--input", input_format,
                 "--dtype", dtype, "--no-verify"]) == 0
    frames = np.random.default_rng(5).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    exact = torch.from_numpy(reference_preprocess(frames, 224, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    with torch.no_grad():
        want = float64_model(model).visual(exact)
        half = copy.deepcopy(model.visual).to(torch.float16)(exact.to(torch.float16)).double()
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    session = _session(out, dtype)
    inputs = frames if input_format == "uint8-nhwc" else exact.numpy().astype(np_dtype)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs})[0]).double()
    err = ((got - want).abs().max() / want.abs().max()).item()
    bound = 1e-4 if dtype == "fp32" else 2 * ((half - want).abs().max() / want.abs().max()).item()
    assert err <= bound, (err, bound)


def test_export_splits_large_graphs_into_external_data(tmp_path, monkeypatch):
    # The default (--external-data auto) keeps weights apart where a graph would pass protobuf's 2 GB
    # limit (ViT-bigG-14); here the limit is made small enough for the tiny tower to pass it.
    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", 64 * 1024)
    out = tmp_path / "tower.onnx"
    assert main(["export", "vlmrm-tiny", "--out", str(out), "--no-verify"]) == 0
    assert (tmp_path / "tower.onnx.data").stat().st_size > out.stat().st_size
    session = _session(out, "fp32")
    (embeddings,) = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 224, 224, 3), np.uint8)})
    assert embeddings.shape == (2, 32) and np.isfinite(embeddings).all()
    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", 2 * 1024**3)
    small = tmp_path / "small.onnx"
    assert main(["export", "vlmrm-tiny", "--out", str(small), "--no-verify"]) == 0
    assert not (tmp_path / "small.onnx.data").exists()


def test_export_default_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "vlmrm-tiny", "--no-verify"]) == 0
    assert (tmp_path / "vlmrm-tiny-random-uint8-nhwc-fp32.onnx").exists()


def test_export_errors(tmp_path, capsys):
    assert main(["export", "vlmrm-tiny", "--dtype", "bf16", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "use --dtype fp16" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["export", "vlmrm-tiny", "--format", "tensorrt", "--out", str(tmp_path / "x.engine")]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["export", "ViT-Z-99"]) == 2
    assert "Unknown model" in capsys.readouterr().err


def test_an_interrupted_or_failed_export_leaves_the_previous_one_whole(tmp_path, monkeypatch, capsys):
    # Written and checked beside the target, then renamed into place: a crash while writing the
    # weights, or a graph that fails its check against torch, never replaces a good export.
    import onnx

    from vlmrm_fast import export

    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", 64 * 1024)  # weights in tower.onnx.data
    out = tmp_path / "tower.onnx"
    assert main(["export", "vlmrm-tiny", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"tower.onnx", "tower.onnx.data"}
    real_save = onnx.save_model

    def killed_while_writing(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)
        with open(path, "r+b") as f:  # half of it on disk when the process dies
            f.truncate(f.seek(0, 2) // 2)
        raise KeyboardInterrupt("killed (simulated)")

    monkeypatch.setattr(onnx, "save_model", killed_while_writing)
    assert main(["export", "vlmrm-tiny", "--out", str(out)]) != 0
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(onnx, "save_model", real_save)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no leftovers either
    monkeypatch.setattr(export, "verify_onnx", lambda *args: 0.5)
    assert main(["export", "vlmrm-tiny", "--out", str(out)]) == 2
    assert "does not match the torch tower" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # The side file gets the permissions a plain file would (onnx writes it owner-only).
    old_umask = os.umask(0o022)
    try:
        monkeypatch.setattr(export, "verify_onnx", lambda *args: 0.0)
        assert main(["export", "vlmrm-tiny", "--out", str(tmp_path / "shared[v1].onnx")]) == 0
    finally:
        os.umask(old_umask)
    assert (tmp_path / "shared[v1].onnx.data").stat().st_mode & 0o777 == 0o644
    printed = capsys.readouterr().out  # read once: a second readouterr() holds only what came after
    assert "MB)" in printed and "(0.0 MB)" not in printed


def test_a_one_file_export_is_checked_before_it_replaces_the_previous_one(tmp_path, monkeypatch, capsys):
    # A graph under 2 GB is placed as the exporter wrote it, not loaded and saved again: after the same
    # checks, and removing the side file of an earlier export with external data.
    from vlmrm_fast import export

    out = tmp_path / "tower.onnx"
    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "_PROTOBUF_LIMIT", 64 * 1024)
        assert main(["export", "vlmrm-tiny", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tower.onnx", "tower.onnx.data"]
    assert main(["export", "vlmrm-tiny", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"tower.onnx"}
    monkeypatch.setattr(export, "verify_onnx", lambda *args: 0.5)
    assert main(["export", "vlmrm-tiny", "--out", str(out)]) == 2
    assert "does not match the torch tower" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no leftovers either


@pytest.mark.parametrize("external,files", [("auto", ["t.onnx"]), ("no", ["t.onnx"]), ("yes", ["t.onnx", "t.onnx.data"])])
def test_a_graph_the_exporter_splits_into_files_is_saved_whole(tmp_path, monkeypatch, external, files):
    # Over 2 GB the exporter writes a file per tensor beside the graph: such a graph is not one file
    # to place as written, but is loaded whole and saved as --external-data says.
    import functools

    import onnx
    import onnxruntime as ort

    real_export = torch.onnx.export

    @functools.wraps(real_export)  # its signature says which exporter to use (onnx_export._export_kwargs)
    def splitting_export(*args, **kwargs):
        real_export(*args, **kwargs)
        onnx.save_model(onnx.load(args[2]), args[2], save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=1024)

    monkeypatch.setattr(torch.onnx, "export", splitting_export)
    out = tmp_path / "t.onnx"
    assert main(["export", "vlmrm-tiny", "--out", str(out), "--external-data", external]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # after the export's folder is gone
    frames = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    assert np.isfinite(session.run(None, {"frames": frames})[0]).all()


def test_export_into_a_folder_takes_the_default_name(tmp_path):
    assert main(["export", "vlmrm-tiny", "--out", str(tmp_path), "--no-verify"]) == 0
    assert (tmp_path / "vlmrm-tiny-random-uint8-nhwc-fp32.onnx").exists()
    # One not there yet, named with a trailing separator: made, not taken for a file name.
    assert main(["export", "vlmrm-tiny", "--out", str(tmp_path / "new") + os.sep, "--no-verify"]) == 0
    assert (tmp_path / "new" / "vlmrm-tiny-random-uint8-nhwc-fp32.onnx").is_file()


def test_an_export_removes_the_scratch_folders_killed_exports_left_beside_its_output(tmp_path):
    # SIGKILL or the OOM killer mid-export runs no clean-up: the float32 graph (gigabytes for
    # ViT-bigG-14) stayed beside the output for good, under a name nothing would remove.
    import subprocess

    from vlmrm_fast.scratch import this_host

    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "t.onnx"
    left = [tmp_path / f".t.onnx.export-{this_host()}-{dead.pid}-{rand}" for rand in ("abc123", "def456")]
    for folder in left:
        (folder / "export").mkdir(parents=True)
        (folder / "export" / "tower.onnx").write_bytes(b"half a graph")
    running = tmp_path / f".t.onnx.export-{this_host()}-{os.getpid()}-live"  # this process: alive
    elsewhere = tmp_path / f".t.onnx.export-node17-{dead.pid}-x"  # another node's, maybe running
    unrelated = tmp_path / f".u.onnx.export-{this_host()}-{dead.pid}-y"  # another output's: its own export's to remove
    for folder in (running, elsewhere, unrelated):
        folder.mkdir()
    assert main(["export", "vlmrm-tiny", "--out", str(out), "--no-verify"]) == 0
    assert out.is_file() and not any(folder.exists() for folder in left)
    assert running.exists() and elsewhere.exists() and unrelated.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, running.name, elsewhere.name, unrelated.name])


@pytest.mark.parametrize("model,pretrained,name", [
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None, "CLIP-ViT-B-32-laion2B-s34B-b79K-hub"),
    ("local-dir:/data/clips/my-clip/", None, "my-clip-local"),  # their own weights, not "random"
    ("ViT-B-32", None, "ViT-B-32-random"),
    ("ViT-B-32", "laion2b_s34b_b79k", "ViT-B-32-laion2b_s34b_b79k"),
    ("ViT-B-32", "/data/w/open_clip_model.safetensors", "ViT-B-32-open_clip_model"),
])
def test_the_default_export_name_says_whose_weights(model, pretrained, name):
    from vlmrm_fast.export import default_out

    assert default_out(model, pretrained, "uint8-nhwc", "onnx", "fp32") == Path(f"{name}-uint8-nhwc-fp32.onnx")


def test_exporting_again_into_the_current_folder_with_external_data(tmp_path, monkeypatch):
    # The previous export's side file sits in the current folder (a relative --out, as the default
    # name is); onnx's own external-data conversion refuses such a location.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", 64 * 1024)
    for _ in range(2):
        assert main(["export", "vlmrm-tiny", "--out", "tower.onnx"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tower.onnx", "tower.onnx.data"]


def test_a_verification_that_gives_nan_does_not_pass(tmp_path, monkeypatch, capsys):
    from vlmrm_fast import export

    monkeypatch.setattr(export, "verify_onnx", lambda *args: float("nan"))
    assert main(["export", "vlmrm-tiny", "--out", str(tmp_path / "t.onnx")]) == 2
    assert "does not match" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_tensorrt_export_checks_bf16_and_tensorrt_before_exporting(tmp_path, monkeypatch, capsys):
    # The default --dtype bf16 on a pre-Ampere GPU, or no TensorRT: said before the weights load (a
    # download and gigabytes for ViT-bigG-14) and minutes of export, not by TensorRT afterwards.
    import sys
    import types

    monkeypatch.setattr("vlmrm_fast.models.create_clip", lambda *a, **k: pytest.fail("weights loaded first"))
    exported = []
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: exported.append(a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    out = str(tmp_path / "x.engine")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed
    assert main(["export", "vlmrm-tiny", "--format", "tensorrt", "--out", out]) == 2
    assert "needs the `tensorrt` package" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.3.9"))
    assert main(["export", "vlmrm-tiny", "--format", "tensorrt", "--out", out]) == 2
    assert "Tesla T4 is 7.5: use --dtype fp16" in capsys.readouterr().err
    assert not exported and not os.listdir(tmp_path)


@pytest.mark.parametrize("fmt,missing,cuda,said", [
    ("onnx", "onnx", False, "--format onnx needs the `onnx` package, which is not installed. Install it with "
                            "`pip install 'vlmrm-fast[export]'`"),
    ("tensorrt", "onnx", True, "--format tensorrt needs the `onnx` package"),
    ("tensorrt", None, False, "--format tensorrt needs a CUDA device"),
])
def test_export_refuses_what_it_cannot_do_before_loading_weights(tmp_path, monkeypatch, capsys, fmt, missing, cuda,
                                                                  said):
    import sys

    monkeypatch.setattr("vlmrm_fast.models.create_clip", lambda *a, **k: pytest.fail("weights loaded first"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if missing:
        monkeypatch.setitem(sys.modules, missing, None)  # not installed
    args = ["export", "ViT-bigG-14", "--pretrained", "laion2b_s39b_b160k", "--format", fmt]
    assert main(args + ["--out", str(tmp_path / "x")]) == 2
    assert said in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_an_out_that_cannot_be_written_is_refused_before_loading_weights(tmp_path, monkeypatch, capsys):
    # It was an OSError from the first write, after the model had loaded (gigabytes for ViT-bigG-14), naming
    # the export's scratch file or printing "[Errno 17] File exists".
    monkeypatch.setattr("vlmrm_fast.models.create_clip", lambda *a, **k: pytest.fail("weights loaded first"))
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    for out, said in [(tmp_path / "a-file" / "x.onnx", "'{}' is a file, not a folder; pass another --out"),
                      (str(tmp_path / "a-file") + "/", "'{}' is a file, not a folder; pass another --out")]:
        assert main(["export", "ViT-bigG-14", "--pretrained", "laion2b_s39b_b160k", "--out", str(out)]) == 2
        assert said.format(tmp_path / "a-file") in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]
    from vlmrm_fast.argtypes import writable_file

    assert writable_file(tmp_path / "a-folder" / "x.onnx", "--out") == tmp_path / "a-folder" / "x.onnx"
    assert [p.name for p in (tmp_path / "a-folder").iterdir()] == []  # the probe file it wrote is gone
    with pytest.raises(ValueError, match=r"a-folder' is a folder; give a file name \(--out\)"):
        writable_file(tmp_path / "a-folder", "--out")


# ---- behaviours a mutation audit found untested ---------------------------------------------------


def test_default_names_of_checkpoints_and_engines():
    from vlmrm_fast.export import default_out

    assert default_out("ViT-B-32", "/ckpts/run-3/tiny.pt", "pixels", "onnx", "fp16") == Path("ViT-B-32-tiny-pixels-fp16.onnx")
    assert default_out("ViT-B-32", None, "uint8-nhwc", "tensorrt", "bf16") == Path("ViT-B-32-random-uint8-nhwc-bf16.engine")


@pytest.mark.parametrize("input_format", ["uint8-nhwc", "pixels"])
def test_a_float16_export_is_written_unverified(tmp_path, capsys, input_format):
    # The check against torch is for float32 graphs; a float16 one is written without it, and says so.
    out = tmp_path / "t.onnx"
    assert main(["export", "vlmrm-tiny", "--dtype", "fp16", "--input", input_format, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and "max relative error" not in printed
    assert "not checked against torch (the ONNX Runtime check is for --dtype fp32 exports)" in printed


@pytest.mark.parametrize("input_format", ["uint8-nhwc", "pixels"])
def test_a_float16_export_keeps_layernorm_in_float32(tmp_path, input_format):
    # fp16 CLIP towers lose accuracy in LayerNorm (SPEC §3), and a strongly typed runtime (TensorRT) runs each
    # layer in the type the graph gives it: the file is the typed graph the tensorrt backend builds from.
    import onnx
    from onnx import TensorProto

    out = tmp_path / "t.onnx"
    assert main(["export", "vlmrm-tiny", "--dtype", "fp16", "--input", input_format, "--out", str(out)]) == 0
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out)), strict_mode=True)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert norms and {types[n.input[0]] for n in norms} == {types[n.output[0]] for n in norms} == {TensorProto.FLOAT}
    assert matmuls and {types[n.output[0]] for n in matmuls} == {TensorProto.FLOAT16}
    given = TensorProto.UINT8 if input_format == "uint8-nhwc" else TensorProto.FLOAT16
    assert (types[graph.input[0].name], types[graph.output[0].name]) == (given, TensorProto.FLOAT)


def test_no_verify_skips_the_check(tmp_path, monkeypatch, capsys):
    from vlmrm_fast import export

    monkeypatch.setattr(export, "verify_onnx", lambda *args: 0.5)  # would fail the export if run
    assert main(["export", "vlmrm-tiny", "--out", str(tmp_path / "t.onnx"), "--no-verify"]) == 0
    assert "max relative error" not in capsys.readouterr().out and (tmp_path / "t.onnx").exists()


def test_an_export_without_onnxruntime_says_it_was_not_checked(tmp_path, monkeypatch, capsys):
    import importlib.util as util

    from vlmrm_fast import export

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    monkeypatch.setattr(export, "verify_onnx", lambda *args: pytest.fail("verified without onnxruntime"))
    assert main(["export", "vlmrm-tiny", "--out", str(tmp_path / "t.onnx")]) == 0
    assert "onnxruntime is not installed: the export was not checked" in capsys.readouterr().err


@pytest.mark.parametrize("input_format,dtype,shape", [
    ("uint8-nhwc", "fp32", "'frames' uint8 [N, 224, 224, 3] (RGB, 0-255, normalisation folded in)"),
    ("pixels", "fp32", "'pixels' float32 [N, 3, 224, 224] (normalised)"),
    ("pixels", "fp16", "'pixels' float16 [N, 3, 224, 224] (normalised)"),
])
def test_the_summary_names_the_graphs_input_and_output(tmp_path, capsys, input_format, dtype, shape):
    # The graph's own names, types and shapes, D included (32 for vlmrm-tiny), as a user of the file outside this
    # package needs them; and its output is the tower's, not normalised, as it says.
    import onnxruntime as ort

    out = tmp_path / "t.onnx"
    assert main(["export", "vlmrm-tiny", "--out", str(out), "--input", input_format, "--dtype", dtype, "--no-verify"]) == 0
    assert (f"Input: {shape}; output: 'embeddings' float32 [N, 32], not normalised"
            in capsys.readouterr().out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    [given], [output] = session.get_inputs(), session.get_outputs()
    assert (given.name, output.name, output.type, output.shape[1]) == (shape.split("'")[1], "embeddings", "tensor(float)", 32)
    assert given.type == {"uint8-nhwc": "tensor(uint8)", "fp32": "tensor(float)", "fp16": "tensor(float16)"}[
        input_format if input_format == "uint8-nhwc" else dtype]
    frames = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    if input_format == "uint8-nhwc":
        (embeddings,) = session.run(None, {given.name: frames})
        assert not np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-3)


def test_the_embedding_width_of_a_tower_without_output_dim_is_its_outputs():
    from vlmrm_fast.export import embedding_width
    from vlmrm_fast.ops.preprocess import PreprocessSpec

    class Tower(torch.nn.Module):  # as timm towers in open_clip: no output_dim
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 24)

        def forward(self, pixels):
            return self.proj(pixels.mean(dim=(2, 3)))

    assert embedding_width(make_tiny()[0].visual, None) == 32
    assert embedding_width(Tower(), PreprocessSpec(size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)) == 24


@pytest.mark.parametrize("argv,said", [
    (["--out", "{tmp}/x.engine"], "--out '{tmp}/x.engine' names a TensorRT engine (.engine), but --format onnx (the "
                                   "default) writes an ONNX graph: pass --out {tmp}/x.onnx, or --format tensorrt"),
    (["--out", "{tmp}/x.PLAN"], "names a TensorRT engine (.plan)"),
    (["--format", "tensorrt", "--out", "{tmp}/x.onnx"], "--out '{tmp}/x.onnx' names an ONNX graph (.onnx), but "
                                                        "--format tensorrt writes a TensorRT engine: pass --out "
                                                        "{tmp}/x.engine, or --format onnx"),
    (["--max-batch-size", "8", "--out", "{tmp}/x.onnx"], "--max-batch-size sets a TensorRT engine's batch profile; an "
                                                         "ONNX graph takes any batch size (its batch axis is dynamic): "
                                                         "leave it out, or pass --format tensorrt"),
    (["--opt-batch-size", "4", "--max-batch-size", "8"], "--max-batch-size and --opt-batch-size set a TensorRT"),
    (["--format", "tensorrt", "--external-data", "yes"], "--external-data yes is for ONNX graphs (their weights file, "
                                                         "their check in ONNX Runtime); a TensorRT engine is one file, "
                                                         "not checked so: leave it out, or pass --format onnx"),
    (["--format", "tensorrt", "--no-verify", "--external-data", "no"], "--external-data no and --no-verify are for "
                                                                       "ONNX graphs"),
], ids=["onnx-as-engine", "onnx-as-plan", "engine-as-onnx", "max-batch-onnx", "both-batches-onnx",
        "external-data-engine", "onnx-options-engine"])
def test_an_export_refuses_a_name_or_option_of_the_other_format(tmp_path, monkeypatch, capsys, argv, said):
    # Before anything is loaded or exported (a TensorRT export is refused so without CUDA or TensorRT too).
    monkeypatch.setattr("vlmrm_fast.models.create_clip", lambda *a, **k: pytest.fail("weights loaded first"))
    monkeypatch.chdir(tmp_path)
    assert main(["export", "vlmrm-tiny", *[a.format(tmp=tmp_path) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert said.format(tmp=tmp_path) in err and err.count("\n") == 1, err
    assert not os.listdir(tmp_path)


def test_verify_onnx_reports_the_error_relative_to_the_embeddings(tmp_path):
    # A graph whose embeddings are all 1000x the tower's: the relative error is 999, whatever their scale.
    import copy

    import torch

    from conftest import make_tiny
    from vlmrm_fast.backends.onnx_export import export_onnx
    from vlmrm_fast.export import verify_onnx
    from vlmrm_fast.models import preprocess_spec_of

    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    scaled = copy.deepcopy(model.visual)
    with torch.no_grad():
        scaled.proj.mul_(1000.0)
    path = export_onnx(scaled, tmp_path / "t.onnx", spec, input_format="pixels")
    assert verify_onnx(path, model.visual, spec, "pixels") == pytest.approx(999.0, rel=1e-3)
    assert verify_onnx(path, scaled, spec, "pixels") <= 1e-4


def test_the_size_printed_counts_the_side_file(tmp_path, capsys):
    # (The existing check `"(0.0 MB)" not in capsys.readouterr().out` reads the output a second time, when it
    # is already empty: it can never fail.)
    out = tmp_path / "t.onnx"
    assert main(["export", "vlmrm-tiny", "--out", str(out), "--external-data", "yes", "--no-verify"]) == 0
    total = out.stat().st_size + (tmp_path / "t.onnx.data").stat().st_size
    assert f"({total / 1e6:.1f} MB)" in capsys.readouterr().out


def test_external_data_no_keeps_a_large_graph_in_one_file(tmp_path, monkeypatch):
    from vlmrm_fast.backends import onnx_export

    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", 64 * 1024)  # "auto" would split the tiny tower
    assert main(["export", "vlmrm-tiny", "--out", str(tmp_path / "t.onnx"), "--external-data", "no", "--no-verify"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx"]


def test_an_export_refuses_to_replace_its_checkpoint_or_a_file_that_is_no_export(tmp_path, capsys):
    # `--out` onto the --pretrained checkpoint replaced it with a graph (exit 0); so did a typo onto any file.
    model, _ = make_tiny()
    checkpoint = tmp_path / "w.pt"
    torch.save(model.state_dict(), checkpoint)
    saved = checkpoint.read_bytes()
    assert main(["export", "vlmrm-tiny", "--pretrained", str(checkpoint), "--out", str(checkpoint)]) == 2
    assert "is the checkpoint this export reads (--pretrained)" in capsys.readouterr().err
    notes = tmp_path / "notes.csv"
    notes.write_text("step,reward\n")
    assert main(["export", "vlmrm-tiny", "--out", str(notes)]) == 2
    assert "exists and is not an earlier export (.onnx, .engine" in capsys.readouterr().err
    assert checkpoint.read_bytes() == saved and notes.read_text() == "step,reward\n"
    assert main(["export", "vlmrm-tiny", "--pretrained", str(checkpoint), "--out", str(tmp_path / "w.onnx")]) == 0


@pytest.mark.parametrize("none", ["None", "NONE"])
def test_export_pretrained_none_in_any_case_means_random_weights(tmp_path, monkeypatch, none):
    # As for score: --pretrained none in any case is random weights, not a tag or a file named "None".
    monkeypatch.chdir(tmp_path)
    assert main(["export", "vlmrm-tiny", "--pretrained", none, "--no-verify"]) == 0
    assert (tmp_path / "vlmrm-tiny-random-uint8-nhwc-fp32.onnx").is_file()


def test_export_names_its_own_arguments_in_a_loading_error(tmp_path, capsys):
    # create_clip's errors are written for Python callers (model_name='local-dir:...' with pretrained=None), which
    # export printed as they were.
    assert main(["export", "vlmrm-tiny", "--pretrained", str(tmp_path), "--out", str(tmp_path / "t.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"MODEL local-dir:{tmp_path} with --pretrained none" in err and "=" not in err, err


def test_an_earlier_export_named_in_capitals_may_be_replaced(tmp_path):
    # EXPORT_SUFFIXES are compared case-blind: T.ONNX is an earlier export, not a file to protect.
    out = tmp_path / "T.ONNX"
    out.write_bytes(b"an earlier export")
    assert main(["export", "vlmrm-tiny", "--out", str(out), "--no-verify"]) == 0
    assert out.read_bytes() != b"an earlier export"


@pytest.mark.parametrize("error,written", [(2e-4, False), (5e-5, True)])
def test_a_verification_is_held_to_one_part_in_ten_thousand(tmp_path, monkeypatch, capsys, error, written):
    # A float32 graph off the torch tower by more than 1e-4 relative (measured: ~1e-6) gives other rewards:
    # refused, nothing written; within it, written with the error reported.
    from vlmrm_fast import export

    monkeypatch.setattr(export, "verify_onnx", lambda *args: error)
    assert main(["export", "vlmrm-tiny", "--out", str(tmp_path / "t.onnx")]) == (0 if written else 2)
    captured = capsys.readouterr()
    assert (tmp_path / "t.onnx").exists() == written
    assert ("does not match" in captured.err) != written
    assert (f"max relative error {error:.2e}" in captured.out) == written


def test_export_takes_the_fixed_transform_whatever_the_models_config_says(tmp_path, monkeypatch):
    # The graph takes frames of the tower's size, so no resize happens in it: a config open_clip's own
    # transform letterboxes ('longest', which preprocess='openclip' refuses) exports all the same.
    from vlmrm_fast import models

    create = models.create_clip

    def letterboxing(*args, **kwargs):
        model, tokenizer = create(*args, **kwargs)
        model.visual.preprocess_cfg = {**getattr(model.visual, "preprocess_cfg", {}), "resize_mode": "longest"}
        return model, tokenizer

    monkeypatch.setattr(models, "create_clip", letterboxing)
    assert main(["export", "vlmrm-tiny", "--out", str(tmp_path / "t.onnx")]) == 0
    assert (tmp_path / "t.onnx").exists()


def test_a_float16_export_with_no_verify_has_no_note_on_the_check(tmp_path, capsys):
    # --no-verify asked for no check: the note on why a float16 graph is unchecked is for those who did not.
    out = tmp_path / "t.onnx"
    assert main(["export", "vlmrm-tiny", "--dtype", "fp16", "--out", str(out), "--no-verify"]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and "not checked against torch" not in printed


@pytest.mark.parametrize("external,files", [("yes", ["t.onnx", "t.onnx.data"]), ("no", ["t.onnx"])])
def test_a_float16_export_follows_external_data(tmp_path, monkeypatch, external, files):
    # --external-data applies to the float16 graph too: "yes" splits the tiny tower that "auto" keeps whole,
    # "no" keeps whole a graph that "auto" would split (here: the limit made small).
    from vlmrm_fast.backends import onnx_export

    if external == "no":
        monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", 64 * 1024)
    assert main(["export", "vlmrm-tiny", "--dtype", "fp16", "--out", str(tmp_path / "t.onnx"),
                 "--external-data", external]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == files


@pytest.mark.parametrize("external,dtype", [("no", "fp32"), ("yes", "fp32"), ("yes", "fp16")])
def test_an_out_that_is_a_symbolic_link_is_written_through(tmp_path, capsys, external, dtype):
    # --out latest.onnx -> exports/tower.onnx: the graph (and its side file) land where the link leads, as a
    # plain open writes; the link stays. A rename onto the link replaced it and left the old graph in place.
    exports = tmp_path / "exports"
    exports.mkdir()
    graph = exports / "tower.onnx"
    graph.write_bytes(b"an earlier export")
    link = tmp_path / "latest.onnx"
    link.symlink_to(graph)
    assert main(["export", "vlmrm-tiny", "--out", str(link), "--external-data", external, "--dtype", dtype,
                 "--no-verify"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(graph)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "latest.onnx"]
    assert sorted(p.name for p in exports.iterdir()) == ["tower.onnx"] + ["tower.onnx.data"] * (external == "yes")
    printed = capsys.readouterr().out
    size = graph.stat().st_size + ((exports / "tower.onnx.data").stat().st_size if external == "yes" else 0)
    assert f"wrote {link}, a symbolic link to {graph} ({size / 1e6:.1f} MB)" in printed
    # ONNX Runtime refuses a side file outside the folder of the path it opens: the summary says to open the target.
    assert (f"open it as {graph}" in printed) == (external == "yes")
    session = _session(graph if external == "yes" else link, dtype)
    frames = np.zeros((2, 224, 224, 3), np.uint8)
    (embeddings,) = session.run(None, {session.get_inputs()[0].name: frames})
    assert embeddings.shape == (2, 32) and np.isfinite(embeddings).all()


def test_an_out_linked_to_a_file_that_is_no_export_is_refused(tmp_path, capsys):
    # Written through, a link named like an export would replace what it leads to: the check looks there.
    notes = tmp_path / "notes.csv"
    notes.write_text("step,reward\n")
    link = tmp_path / "tower.onnx"
    link.symlink_to(notes)
    assert main(["export", "vlmrm-tiny", "--out", str(link)]) == 2
    assert (f"--out '{link}' (a symbolic link to '{notes}') exists and is not an earlier export"
            in capsys.readouterr().err)
    assert notes.read_text() == "step,reward\n" and link.is_symlink()


def test_a_link_beside_its_target_is_not_sent_to_the_target(tmp_path):
    # latest.onnx -> tower.onnx in one folder: ONNX Runtime finds tower.onnx.data opening the link, so the summary
    # does not tell the user to open the target instead.
    from vlmrm_fast.export import _written

    (tmp_path / "tower.onnx").write_bytes(b"g")
    (tmp_path / "tower.onnx.data").write_bytes(b"w")
    (tmp_path / "latest.onnx").symlink_to("tower.onnx")
    assert "open it as" not in _written(tmp_path / "latest.onnx")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "latest.onnx").symlink_to(tmp_path / "tower.onnx")
    assert f"open it as {tmp_path / 'tower.onnx'}" in _written(tmp_path / "elsewhere" / "latest.onnx")


def test_the_exported_files_embeddings_scored_as_the_readme_says_give_the_reward_models_rewards(tmp_path):
    # README's export section: the file's output, normalised, into How it works' formula with rm.goals and
    # rm.directions (or rm.score on the raw rows) gives rm(frames). Random weights are the same in every build.
    import onnxruntime as ort

    from vlmrm_fast import CLIPReward

    out = tmp_path / "t.onnx"
    assert main(["export", "vlmrm-tiny", "--out", str(out), "--no-verify"]) == 0
    frames = np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    (raw,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"frames": frames})
    rm = CLIPReward.from_pretrained("vlmrm-tiny", None, goal="a cat", baseline="an animal", alpha=0.5,
                                    device="cpu", backend="torch")
    x = torch.from_numpy(raw).double()
    x = x / x.norm(dim=1, keepdim=True)
    g, u = rm.goals[0].double(), rm.directions[0].double()
    v = x - g
    rewards = 1 - 0.5 * ((1 - 0.5) ** 2 * (v * v).sum(1) + 0.5 * (2 - 0.5) * (v @ u) ** 2)
    expected = rm(frames).double()
    assert torch.allclose(rewards, expected, atol=1e-4) and torch.allclose(rm.score(torch.from_numpy(raw)).double(), expected, atol=1e-4)
