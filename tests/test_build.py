"""ghlc.build: the runtime reads every setting from the annotated graph, in one place."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import ghlc
from ghlc import passes
from ghlc.build import input_spec
from ghlc.runtime import is_prepared, runtime_of


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, groups=3),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 4),
    )


CFG = ghlc.GHLConfig(
    temperature={"0": 0.5},
    global_signal="none",
    hebbian_at="backward",
    accumulation="always",
    interception="mode",
)


def test_each_site_holds_its_layer_info_rule_and_the_global_signal():
    x = torch.randn(2, 3, 8, 8)
    lg = passes.PassManager(passes.default_passes())(ghlc.trace(net(), (x,), config=CFG))
    m = ghlc.build(lg)
    rt = runtime_of(m)
    assert is_prepared(m) and not is_prepared(net())
    assert sorted(rt.sites) == ["0.weight", "2.weight"]
    for name, site in rt.sites.items():
        assert site.info == lg.layer(name) and site.rule == lg.rule(name)
        assert (site.name, site.layer) == (name, lg.layer(name).module)
        assert site.state.global_signal == lg.global_signal == "none"
        assert (site.state.name, site.state.layer) == (site.name, site.layer)
        assert (site.hebbian_at, site.state.accumulation) == ("backward", "always")
        assert site.module_call is False  # interception="mode" keeps the function mode
    assert rt.sites["0.weight"].rule.temperature == 0.5
    assert rt.graph.model is None and rt.graph.to_text() == lg.to_text()
    assert rt.inputs == input_spec((x,))
    assert [(s["shape"], s["dtype"]) for s in rt.inputs] == [([2, 3, 8, 8], "float32")]
    assert rt.source == {}


def test_build_refuses_a_graph_the_passes_did_not_complete():
    lg = ghlc.trace(net(), (torch.randn(1, 3, 8, 8),))
    lg = passes.insert_hebbian(passes.select_plastic(lg).graph).graph
    with pytest.raises(
        ghlc.GHLError,
        match="run the default passes before build: Hebbian "
        "node of 0.weight has no global-sign edge",
    ):
        ghlc.build(lg)
    with pytest.raises(ghlc.GHLError, match="holds no model"):
        ghlc.build(lg.evolve(model=None))


def test_prepare_equals_trace_passes_build():
    x = torch.randn(2, 3, 8, 8)
    a = ghlc.prepare(net(), (x,), CFG)
    lg = passes.PassManager(passes.default_passes())(ghlc.trace(net(), (x,), config=CFG))
    b = ghlc.build(lg)
    assert runtime_of(a).graph.to_text() == runtime_of(b).graph.to_text()
    for m in (a, b):
        m.train()
        m(x).sum().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n


def test_convert_runs_what_prepare_runs(tmp_path, monkeypatch):
    """``ghlc convert`` goes through trace_and_build, the function behind ghlc.prepare, so it
    cannot skip prepare's checks; the model file is recorded as the runtime's source."""
    from ghlc.cli import main

    build_module = sys.modules["ghlc.build"]  # (the name ghlc.build is the function)

    (tmp_path / "model.py").write_text(
        "import torch.nn as nn\n"
        "def tiny():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 2))\n"
    )
    calls = []
    real = build_module.trace_and_build

    def spy(*a, **k):
        calls.append(k.get("source"))
        return real(*a, **k)

    monkeypatch.setattr(build_module, "trace_and_build", spy)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["convert", "model.py", "--input-shape", "1,1,8,8"])
    assert r.exit_code == 0, r.output
    assert len(calls) == 1 and calls[0]["path"] == str((tmp_path / "model.py").resolve())
    loaded = ghlc.load(tmp_path / "model.ghl")
    assert runtime_of(loaded).source == calls[0]
    plain = ghlc.load(tmp_path / "model.ghl", method="bp")
    want = ghlc.prepare(plain, (torch.randn(1, 1, 8, 8),))
    assert runtime_of(want).graph.to_text() == runtime_of(loaded).graph.to_text()
