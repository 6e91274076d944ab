"""`vlmrm-fast export`: files that ONNX Runtime runs and that agree with torch."""
import importlib.util
import re

import numpy as np
import pytest
import torch

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
