"""Which of torch's ONNX exporters writes the tower (``export_onnx(exporter=...)``): the TorchScript one,
the dynamo one, and "auto"'s fallback from the first to the second where torch no longer has it.

Tolerance, as for every float32 export (tests/test_backends.py): ONNX Runtime within 1e-4 relative of
the tower, here the float64 tower (measured about 1e-6 for both exporters). The graph rewrites built on
an export (half precision, fp8, int8) run on both exporters' graphs in their own test files.
"""
import copy
import functools
import importlib.util
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DYNAMO_MISSING, make_model, make_tiny
from reference import float64_model, reference_preprocess
from vlmrm_fast.models import preprocess_spec_of

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                reason="needs onnxruntime (pip install 'vlmrm-fast[export]')")
needs_dynamo = pytest.mark.skipif(bool(DYNAMO_MISSING), reason=DYNAMO_MISSING)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _relative_error_against_float64(path, model, input_format: str, n: int, seed: int) -> float:
    import onnxruntime as ort

    frames = np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    pixels = torch.from_numpy(reference_preprocess(frames, 224, CLIP_MEAN, CLIP_STD))
    with torch.no_grad():
        want = float64_model(model).visual(pixels).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = frames if input_format == "uint8-nhwc" else pixels.float().numpy()
    got = session.run(None, {session.get_inputs()[0].name: feed})[0]
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def _without_torchscript(monkeypatch, message="the TorchScript-based exporter was removed"):
    """torch.onnx.export as a torch without the TorchScript exporter would have it; returns the calls."""
    real_export = torch.onnx.export
    calls = []

    @functools.wraps(real_export)  # the signature says what the exporter takes
    def export(*args, **kwargs):
        calls.append(kwargs.get("dynamo"))
        if kwargs.get("dynamo") is False:
            Path(args[2]).write_bytes(b"half a graph")  # what an exporter failing mid-write leaves
            (Path(args[2]).parent / "onnx__Conv_1").write_bytes(b"a weight")
            raise RuntimeError(message)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    return calls


@needs_dynamo
@pytest.mark.parametrize("name,input_format", [("vlmrm-tiny", "uint8-nhwc"), ("vlmrm-tiny", "pixels"),
                                               ("ViT-B-32", "pixels")])
def test_dynamo_export_matches_the_float64_tower(tmp_path, name, input_format):
    import onnx

    from vlmrm_fast.backends.onnx_export import export_onnx

    model, _ = make_model(name)
    path = export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"), input_format=input_format,
                       exporter="dynamo")
    graph = onnx.load(str(path), load_external_data=False)
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [18]  # the exporter's lowest
    [given], [out] = graph.graph.input, graph.graph.output
    assert given.name == ("frames" if input_format == "uint8-nhwc" else "pixels") and out.name == "embeddings"
    assert given.type.tensor_type.shape.dim[0].dim_param  # the batch axis is dynamic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx"]  # no side file under 2 GB
    # TensorRT takes a uint8 input only straight into a cast layer; the exporter also read the batch size off it.
    if input_format == "uint8-nhwc":
        assert [n.op_type for n in graph.graph.node if given.name in n.input] == ["Cast"]
    for n, seed in ((1, 0), (5, 1)):  # odd batch sizes, neither the export's example batch of 2
        assert _relative_error_against_float64(path, model, input_format, n, seed) <= 1e-4


@needs_dynamo
def test_auto_falls_back_to_the_dynamo_exporter_where_torchscript_fails(tmp_path, monkeypatch, caplog):
    import logging

    from vlmrm_fast.backends import onnx_export
    from vlmrm_fast.backends.onnx_export import export_onnx

    calls = _without_torchscript(monkeypatch)

    def no_reload(*args, **kwargs):  # what the failed export's leftovers would cost, were they kept
        raise AssertionError("the dynamo exporter's single file is placed as written")

    monkeypatch.setattr(onnx_export, "save_graph", no_reload)
    model, _ = make_tiny()
    with pytest.warns(UserWarning, match=r"TorchScript ONNX exporter failed \(RuntimeError: the TorchScript-based "
                                         r"exporter was removed\).*dynamo exporter instead"), \
            caplog.at_level(logging.INFO):
        path = export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"), input_format="pixels")
    assert calls == [False, True]
    assert "torch's dynamo ONNX exporter" in caplog.text
    assert not [r for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir"))]  # its passes, kept quiet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx"]
    assert _relative_error_against_float64(path, model, "pixels", 3, 2) <= 1e-4


def test_an_exporter_asked_for_by_name_is_the_only_one_tried(tmp_path, monkeypatch):
    from vlmrm_fast.backends.onnx_export import export_onnx

    calls = _without_torchscript(monkeypatch)
    model, _ = make_tiny()
    with pytest.raises(RuntimeError, match="TorchScript-based exporter was removed"):
        export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"), exporter="torchscript")
    assert calls == [False]
    assert list(tmp_path.iterdir()) == []


def test_auto_names_both_exporters_errors_when_both_fail(tmp_path, monkeypatch):
    from vlmrm_fast.backends import onnx_export

    _without_torchscript(monkeypatch)

    def failing_dynamo(*args):
        raise ValueError("cannot trace this tower")

    monkeypatch.setattr(onnx_export, "_export_dynamo", failing_dynamo)
    model, _ = make_tiny()
    with pytest.raises(RuntimeError, match=r"both of torch's exporters\. TorchScript: RuntimeError: the TorchScript-"
                                           r"based exporter was removed\. Dynamo: ValueError: cannot trace this tower"):
        onnx_export.export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"))
    assert list(tmp_path.iterdir()) == []


def test_the_dynamo_exporter_without_onnxscript_names_the_extra(tmp_path, monkeypatch):
    from vlmrm_fast.backends import BackendError, onnx_export

    if "optimize" not in inspect.signature(torch.onnx.export).parameters:
        pytest.skip(DYNAMO_MISSING)
    monkeypatch.setattr(onnx_export, "_has_onnxscript", lambda: False)
    model, _ = make_tiny()
    spec = preprocess_spec_of(model, "vlmrm")
    with pytest.raises(BackendError, match=r"dynamo ONNX exporter needs the `onnxscript` package.*vlmrm-fast\[export\]"):
        onnx_export.export_onnx(model.visual, tmp_path / "t.onnx", spec, exporter="dynamo")
    _without_torchscript(monkeypatch)  # and where "auto" would need it
    with pytest.raises(RuntimeError, match=r"TorchScript: .*removed\. Dynamo: .*pip install 'vlmrm-fast\[export\]'"):
        onnx_export.export_onnx(model.visual, tmp_path / "t.onnx", spec)


def _torch_2_4_export(model, args, f, export_params=True, verbose=False, input_names=None, output_names=None,
                      opset_version=None, dynamic_axes=None, dynamo=False):  # its parameters, abridged
    raise AssertionError("not to be called")


def _torch_2_5_export(model, args, f, kwargs=None, export_params=True, verbose=False, input_names=None,
                      output_names=None, opset_version=None, dynamic_axes=None, dynamo=False, external_data=True,
                      dynamic_shapes=None, report=False, verify=False):  # its parameters, abridged
    raise AssertionError("not to be called")


@pytest.mark.parametrize("old_export", [_torch_2_4_export, _torch_2_5_export], ids=["torch-2.4", "torch-2.5"])
def test_the_dynamo_exporter_on_a_torch_before_2_6_says_so(tmp_path, monkeypatch, old_export):
    """torch 2.4's exporter has no dynamo path to speak of; torch 2.5's writes graphs without its optimiser,
    weights transposed by nodes, which the int8 and fp8 rewrites cannot convert."""
    from vlmrm_fast.backends.onnx_export import export_onnx

    monkeypatch.setattr(torch.onnx, "export", old_export)
    model, _ = make_tiny()
    with pytest.raises(RuntimeError, match=r"takes no optimize: vlmrm_fast's use of the dynamo exporter needs "
                                           r"torch >= 2\.6\.$"):
        export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"), exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


@needs_dynamo
@pytest.mark.parametrize("exporter", ["dynamo", "auto"])  # auto: after falling back
def test_a_dynamo_graph_with_a_fixed_batch_size_is_refused(tmp_path, monkeypatch, exporter):
    """What torch 2.6's dynamo exporter wrote for a batch axis without an upper bound: a graph traced at
    the example's batch of 2, which a backend would build for and then fail on every other batch."""
    from vlmrm_fast.backends.onnx_export import export_onnx

    if exporter == "auto":
        _without_torchscript(monkeypatch)
    real_export = torch.onnx.export

    @functools.wraps(real_export)
    def fixed_batch_export(*args, **kwargs):
        kwargs.pop("dynamic_shapes", None)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", fixed_batch_export)
    model, _ = make_tiny()
    refused = (r"dynamo ONNX exporter wrote 'frames' with a fixed batch size of 2 instead of a dynamic batch axis\. "
               r"Export with exporter='torchscript'")
    if exporter == "auto":  # after both exporters failed, the error names both
        refused = r"both of torch's exporters\. TorchScript: .*removed\. Dynamo: RuntimeError: torch .*'s " + refused
    with pytest.raises(RuntimeError, match=refused):
        export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"), exporter=exporter)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_exporter_is_refused_with_the_choices(tmp_path):
    from vlmrm_fast.backends.onnx_export import export_onnx

    model, _ = make_tiny()
    with pytest.raises(ValueError, match=r"exporter='jit' is not one of \('auto', 'torchscript', 'dynamo'\)"):
        export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"), exporter="jit")


@pytest.mark.parametrize("input_format", ["pixels", "uint8-nhwc"])
def test_an_export_leaves_each_layer_of_the_tower_in_its_mode(tmp_path, input_format):
    # The "pixels" export called visual.eval() on the caller's tower and left it so: a tower exported
    # mid-fine-tune went on training with its dropout off and BatchNorms frozen.
    from vlmrm_fast.backends.onnx_export import export_onnx

    model, _ = make_tiny()
    model.visual.train()
    model.visual.transformer.resblocks[0].eval()  # a partial fine-tune: layers in both modes
    modes = [m.training for m in model.visual.modules()]
    path = export_onnx(model.visual, tmp_path / "t.onnx", preprocess_spec_of(model, "vlmrm"), input_format=input_format)
    assert [m.training for m in model.visual.modules()] == modes
    assert _relative_error_against_float64(path, model, input_format, n=2, seed=0) <= 1e-4  # the eval tower


@needs_dynamo
def test_the_onnxruntime_backend_runs_on_a_dynamo_export_where_torchscript_fails(monkeypatch):
    from reference import reference_reward
    from vlmrm_fast import CLIPReward

    goal, baseline = ["a humanoid robot kneeling"], ["a humanoid robot"]
    calls = _without_torchscript(monkeypatch)
    model, tokenizer = make_tiny()
    untouched = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="dynamo exporter instead"):
        rm = CLIPReward(model, tokenizer, goal=goal, baseline=baseline, alpha=0.3, device="cpu", backend="onnxruntime")
    assert calls == [False, True] and rm.backend == "onnxruntime"
    frames = np.random.default_rng(4).integers(0, 256, (3, 97, 131, 3), dtype=np.uint8)  # odd sizes: resized
    want = reference_reward(untouched, tokenizer, frames, goal, baseline, 0.3)
    assert (rm(frames).double() - want).abs().max().item() <= 1e-5  # float32 rewards (tests/test_reward.py)


@needs_dynamo
def test_export_command_takes_the_exporter(tmp_path, capsys):
    from vlmrm_fast.cli import main

    out = tmp_path / "t.onnx"
    assert main(["export", "vlmrm-tiny", "--out", str(out), "--exporter", "dynamo"]) == 0
    assert "ONNX Runtime vs torch: max relative error" in capsys.readouterr().out  # checked, as any fp32 export
    import onnx

    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [18]


@needs_dynamo
def test_the_onnxruntime_backend_takes_the_exporter_as_an_option(recwarn):
    from reference import reference_reward
    from vlmrm_fast import BackendError, CLIPReward

    goal, baseline = ["a humanoid robot kneeling"], ["a humanoid robot"]
    model, tokenizer = make_tiny()
    untouched = copy.deepcopy(model)
    rm = CLIPReward(model, tokenizer, goal=goal, baseline=baseline, alpha=0.3, device="cpu", backend="onnxruntime",
                    backend_options={"exporter": "dynamo"})
    import onnx

    graph = onnx.load(str(rm.vision_backend._model_path), load_external_data=False)
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [18]  # the dynamo exporter's
    assert not [w for w in recwarn if "exporter" in str(w.message)]  # chosen, so no fallback warning
    frames = np.random.default_rng(6).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    want = reference_reward(untouched, tokenizer, frames, goal, baseline, 0.3)
    assert (rm(frames).double() - want).abs().max().item() <= 1e-5
    with pytest.raises(BackendError, match=r"exporter='jit' is not one of \('auto', 'torchscript', 'dynamo'\) for "
                                           r"backend='onnxruntime'"):
        CLIPReward(*make_tiny(), goal=goal, device="cpu", backend="onnxruntime", backend_options={"exporter": "jit"})
