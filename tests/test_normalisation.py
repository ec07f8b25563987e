"""Input normalisation: ``ghlc train`` records the per-channel mean and std it normalised the
inputs with in the artifact, the checkpoints and the ONNX metadata; ``ghlc export
--include-normalisation`` puts ``(x - mean) / std`` into the graph (checked with
onnxruntime against the file without it, fed normalised inputs)."""

import json

import numpy as np
import pytest
import torch
from test_cli import MODEL, cli

from ghlc.artifact import read_meta
from ghlc.data import load_data
from ghlc.errors import GHLError
from ghlc.normalisation import Normalisation, Normalised


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("norm")
    (d / "model.py").write_text(MODEL)
    assert cli("convert", "model.py", cwd=d).returncode == 0
    args = ("--max-steps", "2", "--eval-batches", "1", "--out", "run", "--device", "cpu")
    r = cli("train", "model.ghl", *args, cwd=d)
    assert r.returncode == 0, r.stderr
    return d


def _props(path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_training_records_the_normalisation(trained):
    ds = load_data("digits", (1, 8, 8))
    want = {"mean": list(ds.mean), "std": list(ds.std)}
    assert read_meta(trained / "run" / "model.ghl")["extra"]["normalisation"] == want
    ck = torch.load(trained / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["normalisation"] == want
    assert 0.2 < want["mean"][0] < 0.4 and 0.3 < want["std"][0] < 0.5  # digits in [0, 1]


def test_export_records_it_and_can_put_it_into_the_graph(trained):
    import onnxruntime as ort

    d = trained
    assert cli("export", "run/model.ghl", "-o", "plain.onnx", cwd=d).returncode == 0
    r = cli("export", "run/last.pt", "-o", "raw.onnx", "--include-normalisation", cwd=d)
    assert r.returncode == 0, r.stderr
    mean, std = _props(d / "plain.onnx")["input_mean"], _props(d / "plain.onnx")["input_std"]
    norm = Normalisation(json.loads(mean), json.loads(std))
    assert norm.to_dict() == read_meta(d / "run" / "model.ghl")["extra"]["normalisation"]
    assert _props(d / "plain.onnx")["input_normalisation_in_graph"] == "false"
    assert _props(d / "raw.onnx")["input_normalisation_in_graph"] == "true"
    assert _props(d / "raw.onnx")["input_mean"] == mean
    x = np.random.default_rng(0).uniform(0, 1, (5, 1, 8, 8)).astype(np.float32)  # raw pixels
    plain = ort.InferenceSession(str(d / "plain.onnx"), providers=["CPUExecutionProvider"])
    raw = ort.InferenceSession(str(d / "raw.onnx"), providers=["CPUExecutionProvider"])
    xn = (x - norm.mean[0]) / norm.std[0]
    want = plain.run(None, {"input": xn.astype(np.float32)})[0]
    got = raw.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 1e-3  # (not a trivially zero output)
    assert not np.allclose(raw.run(None, {"input": xn})[0], want, atol=1e-3)  # twice differs


def test_include_normalisation_without_a_record_is_refused(trained):
    r = cli("export", "model.ghl", "-o", "x.onnx", "--include-normalisation", cwd=trained)
    assert r.returncode != 0 and "records no input normalisation" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (trained / "x.onnx").exists()
    assert "input_mean" not in _props_or_empty(trained)


def _props_or_empty(d) -> dict[str, str]:
    r = cli("export", "model.ghl", "-o", "untrained.onnx", cwd=d)
    assert r.returncode == 0, r.stderr
    return _props(d / "untrained.onnx")


def test_eval_uses_the_recorded_normalisation(trained, monkeypatch):
    import ghlc.data

    seen = []
    real = ghlc.data.load_data
    monkeypatch.setattr(
        ghlc.data, "load_data", lambda *a, **k: seen.append(k.get("normalisation")) or real(*a, **k)
    )
    assert cli("eval", "run/model.ghl", cwd=trained).returncode == 0
    rec = read_meta(trained / "run" / "model.ghl")["extra"]["normalisation"]
    assert seen == [(tuple(rec["mean"]), tuple(rec["std"]))]


def test_load_data_with_given_statistics():
    ds = load_data("digits", (1, 8, 8))
    same = load_data("digits", (1, 8, 8), normalisation=(ds.mean, ds.std))
    assert torch.allclose(same.x_test, ds.x_test, atol=1e-6)
    other = load_data("digits", (1, 8, 8), normalisation=((0.5,), (0.25,)))
    raw = ds.x_test * ds.std[0] + ds.mean[0]
    assert torch.allclose(other.x_test, (raw - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(GHLError, match="not for 1 channels"):
        load_data("digits", (1, 8, 8), normalisation=((0.5, 0.5), (1.0, 1.0)))


@pytest.mark.parametrize(
    "bad",
    [None, {"mean": [0.1]}, {"mean": [0.1], "std": [0.0]}, {"mean": [0.1, 0.2], "std": [1.0]}],
)
def test_a_damaged_record_is_one_line(bad):
    with pytest.raises(GHLError) as e:
        Normalisation.from_dict(bad)
    assert "\n" not in str(e.value) and "normalisation" in str(e.value)


def test_normalised_module_matches_apply():
    norm = Normalisation((0.5, 0.1, -0.2), (0.25, 2.0, 1.0))
    net = torch.nn.Conv2d(3, 2, 1)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(Normalised(net, norm)(x), net(norm.apply(x)))
    with pytest.raises(GHLError, match="3 channels"):
        Normalised(net, norm)(torch.randn(4, 2, 5, 5))
