"""ghlc.save / ghlc.load round-trip exactly: same outputs, same GHL gradients, same graph."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

import ghlc
from ghlc.artifact import ArtifactError, read_meta
from ghlc.runtime import runtime_of
from ghlc.serialize import graph_from_json, graph_to_json


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, groups=3),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 4),
    )


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
    rt = runtime_of(loaded)
    assert rt.graph.to_text() == runtime_of(m).graph.to_text()
    assert rt.sites["3.weight"].state.rule.temperature == 2.0


def test_round_trip_keeps_the_sampled_mode(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    cfg = ghlc.GHLConfig(sample_fraction=0.25, sample_over="positions")
    m = ghlc.prepare(net(), (x[:1],), cfg)
    ghlc.save(m, tmp_path / "m.ghl")
    loaded = ghlc.load(tmp_path / "m.ghl", model=net())
    rule = runtime_of(loaded).sites["0.weight"].state.rule
    assert (rule.sample_fraction, rule.sample_over) == (0.25, "positions")


def test_round_trip_keeps_the_hebbian_precision(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    m = ghlc.prepare(net(), (x[:1],), ghlc.GHLConfig(hebbian_precision="autocast"))
    ghlc.save(m, tmp_path / "m.ghl")
    loaded = ghlc.load(tmp_path / "m.ghl", model=net())
    assert runtime_of(loaded).sites["0.weight"].state.rule.precision == "autocast"


def test_load_checks_the_model(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    ghlc.save(ghlc.prepare(net(), (x,)), tmp_path / "m.ghl")
    wrong = nn.Sequential(nn.Conv2d(3, 5, 3))
    with pytest.raises(ArtifactError, match="does not match"):
        ghlc.load(tmp_path / "m.ghl", model=wrong)
    with pytest.raises(ArtifactError, match="no model source"):
        ghlc.load(tmp_path / "m.ghl")


def test_save_needs_a_built_module(tmp_path):
    with pytest.raises(ghlc.GHLError, match="ghlc.prepare"):
        ghlc.save(net(), tmp_path / "x.ghl")
    assert not (tmp_path / "x.ghl").exists()


def grads(m, x):
    m.train()
    m.zero_grad()
    m(x).sum().backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def test_graph_json_round_trips():
    m = ghlc.prepare(net(), (torch.randn(1, 3, 8, 8),), ghlc.GHLConfig(global_signal="none"))
    lg = runtime_of(m).graph
    back = graph_from_json(graph_to_json(lg))
    assert back.to_text() == lg.to_text()
    assert dict(back.g.nodes(data=True)) == dict(lg.g.nodes(data=True))
    assert sorted(back.g.edges(data="type")) == sorted(lg.g.edges(data="type"))
    assert back.global_signal == "none" and back.config == lg.config


def test_load_as_pure_hebbian_sets_the_global_sign_node_only(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    ghlc.save(ghlc.prepare(net(), (x[:1],)), tmp_path / "m.ghl")
    hebb = ghlc.load(tmp_path / "m.ghl", model=net(), method="hebbian")
    rt = runtime_of(hebb)
    assert rt.graph.global_signal == "none"
    assert rt.graph.rule("0.weight") == read_meta(tmp_path / "m.ghl")["graph"].rule("0.weight")
    assert {s.state.global_signal for s in rt.sites.values()} == {"none"}
    # the same numbers as a model prepared pure Hebbian from the start: -H_n
    want = grads(ghlc.prepare(net(), (x[:1],), ghlc.GHLConfig(global_signal="none")), x)
    got = grads(hebb, x)
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    ghl = grads(ghlc.load(tmp_path / "m.ghl", model=net()), x)
    assert not torch.equal(ghl["0.weight"], got["0.weight"])


def _rewrite_graph(path, edit) -> None:
    """Rewrite the graph JSON of the artifact at ``path`` with ``edit(dict)``."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    graph = json.loads(meta["graph"])
    edit(graph)
    meta["graph"] = json.dumps(graph)
    path.write_bytes(safetensors_bytes(tensors, metadata=meta))


def test_artifact_with_the_global_signal_in_its_rules_still_loads(tmp_path):
    """Artifacts written before the global signal moved to the global-sign node stored it in
    every HebbianRule too: it is read and dropped, the node's value wins."""
    x = torch.randn(4, 3, 8, 8)
    ghlc.save(ghlc.prepare(net(), (x[:1],)), tmp_path / "m.ghl")

    def old_form(graph):
        for node in graph["nodes"]:
            if node["type"] == "hebbian":
                node["rule"]["global_signal"] = "none"  # the node ("grad_sign") must win
        assert any(
            n["type"] == "global_sign" and n["signal"] == "grad_sign" for n in graph["nodes"]
        )

    _rewrite_graph(tmp_path / "m.ghl", old_form)
    loaded = ghlc.load(tmp_path / "m.ghl", model=net())
    rt = runtime_of(loaded)
    assert rt.graph.global_signal == "grad_sign"
    assert not hasattr(rt.graph.rule("0.weight"), "global_signal")
    assert {s.state.global_signal for s in rt.sites.values()} == {"grad_sign"}
    want = grads(ghlc.prepare(net(), (x[:1],)), x)
    got = grads(loaded, x)
    for n in want:
        assert torch.equal(got[n], want[n]), n
