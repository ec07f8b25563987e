"""ghlc.save / ghlc.load round-trip exactly: same outputs, same GHL gradients, same graph."""

import pytest
import torch
import torch.nn as nn

import ghlc
from ghlc.artifact import ArtifactError


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, groups=3), nn.Flatten(), nn.Linear(6 * 6 * 6, 4))


def test_round_trip_outputs_and_gradients(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    cfg = ghlc.GHLConfig(temperature={"0": 0.5, "3": 2.0}, competition="hard")
    m = ghlc.prepare(net(), (x[:1],), cfg)
    m(x).sum().backward()  # change BN statistics so that buffers matter
    ghlc.save(m, tmp_path / "m.ghl")
    other = net()
    for p in other.parameters():
        nn.init.normal_(p)
    loaded = ghlc.load(tmp_path / "m.ghl", model=other)
    m.eval(), loaded.eval()
    assert torch.equal(m(x), loaded(x))
    m.train(), loaded.train()
    m.zero_grad(), loaded.zero_grad()
    m(x).sum().backward()
    loaded(x).sum().backward()
    for (n, a), (_, b) in zip(m.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), n
    rt = loaded._ghl_runtime
    assert rt.graph.to_text() == m._ghl_runtime.graph.to_text()
    assert rt.sites["3.weight"].state.rule.temperature == 2.0


def test_round_trip_keeps_the_sampled_mode(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    cfg = ghlc.GHLConfig(sample_fraction=0.25, sample_over="positions")
    m = ghlc.prepare(net(), (x[:1],), cfg)
    ghlc.save(m, tmp_path / "m.ghl")
    loaded = ghlc.load(tmp_path / "m.ghl", model=net())
    rule = loaded._ghl_runtime.sites["0.weight"].state.rule
    assert (rule.sample_fraction, rule.sample_over) == (0.25, "positions")


def test_round_trip_keeps_the_hebbian_precision(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    m = ghlc.prepare(net(), (x[:1],), ghlc.GHLConfig(hebbian_precision="autocast"))
    ghlc.save(m, tmp_path / "m.ghl")
    loaded = ghlc.load(tmp_path / "m.ghl", model=net())
    assert loaded._ghl_runtime.sites["0.weight"].state.rule.precision == "autocast"


def test_load_checks_the_model(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    ghlc.save(ghlc.prepare(net(), (x,)), tmp_path / "m.ghl")
    wrong = nn.Sequential(nn.Conv2d(3, 5, 3))
    with pytest.raises(ArtifactError, match="does not match"):
        ghlc.load(tmp_path / "m.ghl", model=wrong)
    with pytest.raises(ArtifactError, match="no model source"):
        ghlc.load(tmp_path / "m.ghl")


def test_save_needs_a_compiled_module(tmp_path):
    with pytest.raises(ghlc.GHLError, match="ghlc.prepare"):
        ghlc.save(net(), tmp_path / "x.ghl")
    assert not (tmp_path / "x.ghl").exists()
