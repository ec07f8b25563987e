"""ghlc.export: inference ONNX from a prepared module, checked against onnxruntime."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import ghlc
from ghlc.errors import GHLError
from ghlc.export import ExportError, ExportReport, export_onnx


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


@pytest.fixture()
def prepared():
    x = torch.randn(1, 3, 16, 16)
    m = ghlc.prepare(_net(), (x,))
    # one GHL training step so the exported weights are not the initial ones
    m.train()
    loss = m(torch.randn(4, 3, 16, 16)).logsumexp(1).mean()
    loss.backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad
    return m, x


def _files(d):
    return sorted(os.listdir(d))


def test_public_api_name(prepared, tmp_path):
    m, x = prepared
    rep = ghlc.export_onnx(m, tmp_path / "api.onnx", example_inputs=(x,))
    assert rep.max_abs_diff <= 1e-4 * rep.scale and (tmp_path / "api.onnx").is_file()


def test_export_dynamic_batch_matches_onnxruntime(prepared, tmp_path):
    m, x = prepared
    out = tmp_path / "sub" / "model.onnx"
    rep = export_onnx(m, out, (x,), metadata={"source_sha256": "abc", "classes": "a,b,c"})
    assert isinstance(rep, ExportReport) and rep.path == out and out.is_file()
    assert rep.max_abs_diff <= 1e-4 * rep.scale and rep.opset > 0
    assert "CPUExecutionProvider" in rep.providers or "CUDAExecutionProvider" in rep.providers
    assert m.training  # mode restored
    assert _files(out.parent) == ["model.onnx"]  # no temp file left
    x3 = torch.randn(3, 3, 16, 16)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x3.numpy()})[0]
    m.eval()
    with torch.no_grad():
        ref = m(x3).numpy()
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    proto = onnx.load(str(out))
    md = {p.key: p.value for p in proto.metadata_props}
    assert md["ghlc_version"] == ghlc.__version__ and md["torch_version"] == torch.__version__
    assert md["source_sha256"] == "abc" and md["classes"].split(",") == ["a", "b", "c"]
    assert not any("hebb" in (n.name + n.op_type).lower() for n in proto.graph.node)


def test_static_export(prepared, tmp_path):
    m, x = prepared
    out = tmp_path / "static.onnx"
    rep = export_onnx(m, out, x, dynamic_batch=False, opset=17)
    assert rep.opset == 17
    proto = onnx.load(str(out))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 16, 16]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):  # noqa: B017 - a fixed batch of 1
        sess.run(None, {sess.get_inputs()[0].name: np.zeros((3, 3, 16, 16), np.float32)})


def test_plain_model_and_tuple_outputs(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3)

        def forward(self, x, y):
            return self.a(x), (x * y).sum(1)

    rep = export_onnx(Two(), tmp_path / "two.onnx", (torch.randn(2, 5), torch.randn(2, 5)))
    sess = ort.InferenceSession(str(rep.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_0", "input_1"]
    assert len(sess.get_outputs()) == 2


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_non_writable_dir(prepared, tmp_path):
    m, x = prepared
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores folder permissions")
        with pytest.raises(ExportError) as ei:
            export_onnx(m, ro / "model.onnx", (x,))
        assert "\n" not in str(ei.value)
        assert _files(ro) == []
    finally:
        ro.chmod(0o700)


def test_output_under_a_file(prepared, tmp_path):
    m, x = prepared
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ExportError, match="cannot write"):
        export_onnx(m, f / "model.onnx", (x,))
    assert _files(tmp_path) == ["afile"]


def test_mismatch_fails_and_leaves_nothing(prepared, tmp_path, monkeypatch):
    m, x = prepared
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    import ghlc.export as ex

    real = ex._run

    def skewed(sess, inputs, names):
        return [o + 1.0 for o in real(sess, inputs, names)]

    monkeypatch.setattr(ex, "_run", skewed)
    with pytest.raises(ExportError, match="differs from torch") as ei:
        export_onnx(m, out, (x,))
    assert isinstance(ei.value, GHLError)
    assert _files(tmp_path) == ["model.onnx"] and out.read_bytes() == b"old"


def test_unexportable_model(tmp_path):
    class Bad(nn.Module):
        def forward(self, x):
            return torch.from_numpy(np.asarray(x.detach().numpy().cumsum()))  # leaves torch

    with pytest.raises(ExportError):
        export_onnx(Bad(), tmp_path / "bad.onnx", (torch.randn(2, 3),))
    assert _files(tmp_path) == []
    with pytest.raises(ExportError, match="sequence of tensors"):
        export_onnx(Bad(), tmp_path / "bad.onnx", ("nope",))
