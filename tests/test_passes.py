"""Every pass, tested twice: structure (which nodes and edges exist) and numbers (the compiled
model's eval-mode outputs are bit-identical to the original model's)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import ghlc
from ghlc import passes
from ghlc.errors import PassError
from ghlc.graph import GLOBAL_SIGN, LayerGraph, Role, hebb_key

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(stem: str):
    spec = importlib.util.spec_from_file_location(f"_ghlc_example_{stem}", EXAMPLES / f"{stem}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Small(nn.Module):
    """conv -> BN -> grouped conv -> 1x1 conv -> pool -> hidden Linear -> Dropout -> output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.blk = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False)
        )
        self.hidden = nn.Linear(8 * 4 * 4, 16)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = nn.functional.avg_pool2d(self.blk(x), 2).flatten(1)
        return self.fc(self.drop(torch.relu(self.hidden(x))))


CONVS = ["conv1.weight", "blk.0.weight", "blk.2.weight"]
LINEARS = ["hidden.weight", "fc.weight"]


def make(config=None, model=None):
    torch.manual_seed(0)
    model = model or Small()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # give BN non-trivial running statistics
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model, x, ghlc.trace(model, (x,), config=config or ghlc.GHLConfig())


def run(lg, pipeline=None):
    return passes.PassManager(pipeline or passes.default_passes())(lg)


def roles(lg):
    return {i.name: i.role for i in lg.layers()}


def nodes_of(lg, kind):
    return sorted(n for n, d in lg.g.nodes(data=True) if d["type"] == kind)


def edges_of(lg, kind):
    return sorted((u, v) for u, v, d in lg.g.edges(data=True) if d["type"] == kind)


def assert_same_eval(model, x, lg):
    """The compiled module's eval output equals the original's, bit for bit."""
    want = copy.deepcopy(model).eval()(x)
    got = ghlc.build(lg).eval()(x)
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max():.3g}"


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- select_plastic ------------------------------------------------------------------------


def test_select_plastic_default_makes_convs_plastic_and_linears_backprop():
    _, _, lg = make()
    res = passes.select_plastic(lg)
    assert res.modified
    out = res.graph
    r = roles(out)
    assert [n for n in r if r[n] is Role.PLASTIC] == CONVS
    assert r["hidden.weight"] is Role.BACKPROP and r["fc.weight"] is Role.BACKPROP
    assert out.layer("fc.weight").is_output
    assert "config.plastic" in out.layer("hidden.weight").reason
    assert nodes_of(out, "hebbian") == [] and nodes_of(out, "global_sign") == []
    # pure: the input graph is untouched
    assert all(role is Role.BACKPROP for role in roles(lg).values())


def test_select_plastic_linear_opt_in_keeps_output_layer_backprop():
    out = passes.select_plastic(make(ghlc.GHLConfig(plastic=("conv", "linear")))[2]).graph
    r = roles(out)
    assert r["hidden.weight"] is Role.PLASTIC
    assert r["fc.weight"] is Role.BACKPROP
    assert "output layer" in out.layer("fc.weight").reason


def test_select_plastic_include_and_exclude_globs():
    cfg = ghlc.GHLConfig(include=("fc", "hid*"), exclude=("blk.*",))
    out = passes.select_plastic(make(cfg)[2]).graph
    r = roles(out)
    assert r["conv1.weight"] is Role.PLASTIC
    assert r["blk.0.weight"] is Role.BACKPROP and r["blk.2.weight"] is Role.BACKPROP
    assert out.layer("blk.0.weight").reason == "excluded by config"
    assert r["hidden.weight"] is Role.PLASTIC  # linear, but named by include
    assert r["fc.weight"] is Role.PLASTIC  # the output layer, named explicitly
    # exclude wins over include
    out = passes.select_plastic(make(ghlc.GHLConfig(include=("fc",), exclude=("fc",)))[2]).graph
    assert roles(out)["fc.weight"] is Role.BACKPROP


def test_select_plastic_frozen_params_get_role_frozen():
    model = Small()
    model.blk[0].weight.requires_grad_(False)
    lg = run(make(model=model)[2])
    assert lg.layer("blk.0.weight").role is Role.FROZEN
    assert hebb_key("blk.0.weight") not in lg.g
    assert [i.name for i in lg.plastic()] == ["conv1.weight", "blk.2.weight"]


# ---- insert_hebbian ------------------------------------------------------------------------


def test_insert_hebbian_one_node_per_plastic_layer():
    lg = passes.insert_hebbian(passes.select_plastic(make()[2]).graph).graph
    assert nodes_of(lg, "hebbian") == sorted(hebb_key(n) for n in CONVS)
    assert edges_of(lg, "update") == sorted((n, hebb_key(n)) for n in CONVS)
    for n in CONVS:
        assert lg.rule(n).temperature == 1.0 and lg.rule(n).competition == "softmax"
    # idempotent: running it again does not duplicate nodes
    again, modified = passes.insert_hebbian(lg)
    assert not modified
    assert nodes_of(again, "hebbian") == nodes_of(lg, "hebbian")
    assert edges_of(again, "update") == edges_of(lg, "update")


def test_insert_hebbian_per_layer_temperature_mapping():
    cfg = ghlc.GHLConfig(temperature={"conv1": 0.65, "blk.*": 0.25})
    lg = run(make(cfg)[2])
    assert lg.rule("conv1.weight").temperature == 0.65
    assert lg.rule("blk.0.weight").temperature == 0.25
    assert lg.rule("blk.2.weight").temperature == 0.25
    cfg = ghlc.GHLConfig(temperature={"conv1": 0.5}, default_temperature=2.0)
    lg = run(make(cfg)[2])
    assert lg.rule("conv1.weight").temperature == 0.5
    assert lg.rule("blk.0.weight").temperature == 2.0


def test_insert_hebbian_rule_carries_config_variants():
    cfg = ghlc.GHLConfig(
        competition="hard", local_rule="hebb", global_signal="none", normalisation="unit"
    )
    lg = run(make(cfg)[2])
    r = lg.rule("conv1.weight")
    assert (r.competition, r.local_rule, r.normalisation) == ("hard", "hebb", "unit")
    assert not hasattr(r, "global_signal")  # stored on the global-sign node only
    assert lg.global_signal == "none"
    assert "norm=unit" in lg.to_text()
    with pytest.raises(ghlc.ConfigError, match="normalisation='rows' is not one of layer, unit"):
        ghlc.GHLConfig(normalisation="rows")
    assert lg.g.nodes[GLOBAL_SIGN]["signal"] == "none"


def test_insert_hebbian_rule_carries_sampling():
    lg = run(make(ghlc.GHLConfig(sample_fraction=0.25, sample_over="positions"))[2])
    r = lg.rule("conv1.weight")
    assert (r.sample_fraction, r.sample_over) == (0.25, "positions")
    assert "sample=0.25/positions" in lg.to_text()
    assert "sample=" not in run(make(ghlc.GHLConfig())[2]).to_text()
    with pytest.raises(ghlc.ConfigError, match="sample_over='rows' is not one of batch, positions"):
        ghlc.GHLConfig(sample_over="rows")


def test_insert_hebbian_rule_carries_the_precision():
    lg = run(make(ghlc.GHLConfig(hebbian_precision="autocast"))[2])
    assert lg.rule("conv1.weight").precision == "autocast"
    assert "precision=autocast" in lg.to_text()
    assert "precision=" not in run(make(ghlc.GHLConfig())[2]).to_text()
    with pytest.raises(
        ghlc.ConfigError, match="hebbian_precision='half' is not one of full, autocast"
    ):
        ghlc.GHLConfig(hebbian_precision="half")


# ---- broadcast_global_sign -----------------------------------------------------------------


def test_broadcast_global_sign_one_source_edge_to_every_hebbian_node():
    lg = run(make(ghlc.GHLConfig(plastic=("conv", "linear")))[2])
    hebb = nodes_of(lg, "hebbian")
    assert len(hebb) == 4  # three convs + the hidden Linear; not the output layer
    assert nodes_of(lg, "global_sign") == [GLOBAL_SIGN]
    assert edges_of(lg, "broadcast") == [(GLOBAL_SIGN, k) for k in hebb]
    assert lg.g.in_degree(GLOBAL_SIGN) == 0
    again, modified = passes.broadcast_global_sign(lg)
    assert not modified
    assert edges_of(again, "broadcast") == edges_of(lg, "broadcast")
    assert nodes_of(again, "global_sign") == [GLOBAL_SIGN]


def test_output_layer_stays_backprop_through_all_passes():
    lg = run(make(ghlc.GHLConfig(plastic=("conv", "linear")))[2])
    assert lg.layer("fc.weight").role is Role.BACKPROP
    assert hebb_key("fc.weight") not in lg.g


def test_data_edges_survive_every_pass():
    _, _, lg0 = make()
    data = edges_of(lg0, "data")
    assert ("input", "conv1.weight") in data and ("fc.weight", "output") in data
    assert edges_of(run(lg0), "data") == data


# ---- validate ------------------------------------------------------------------------------


def test_validate_accepts_complete_graph_and_rejects_missing_broadcast():
    lg = run(make()[2])
    assert passes.validate(lg) == (lg, False)
    with pytest.raises(PassError, match="no global-sign edge"):
        passes.validate(passes.insert_hebbian(passes.select_plastic(make()[2]).graph).graph)
    with pytest.raises(PassError, match="has no Hebbian node"):
        passes.validate(passes.select_plastic(make()[2]).graph)


# ---- numbers: eval outputs identical before and after each pass ---------------------------


@pytest.mark.parametrize(
    "config",
    [
        ghlc.GHLConfig(),
        ghlc.GHLConfig(plastic=("conv", "linear"), include=("fc",), temperature={"blk.*": 0.3}),
        ghlc.GHLConfig(competition="hard", local_rule="hebb", global_signal="none"),
    ],
)
def test_eval_outputs_identical_before_and_after_each_pass(config):
    model, x, lg = make(config)
    before = state(model)
    want = copy.deepcopy(model).eval()(x)
    assert torch.equal(ghlc.build(lg).eval()(x), want)  # traced, no pass yet
    for k, p in enumerate(passes.default_passes()):
        out = p(lg).graph
        # a pass edits the graph only: the model it describes is untouched
        assert out.model is lg.model
        assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items())
        lg = out
        if k >= 2:  # from passes.broadcast_global_sign on, the graph is complete and compiles
            assert_same_eval(model, x, lg)
    assert len(lg.plastic()) > 0


def test_train_mode_forward_unchanged_by_compile():
    model, x, lg = make()
    model.drop.p = 0.0
    m = ghlc.build(run(lg)).train()
    ref = copy.deepcopy(model).train()
    got, want = m(x), ref(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(m.bn.running_mean, ref.bn.running_mean)


@pytest.mark.parametrize(
    "stem,factory",
    [
        ("deephebb", "deephebb"),
        ("fasthebb", "fasthebb"),
        ("resnet", "resnet18"),
        ("mobilenet", "mobilenetv2"),
    ],
)
def test_examples_eval_outputs_identical(stem, factory):
    mod = load_example(stem)
    torch.manual_seed(0)
    model, inputs = getattr(mod, factory)(), mod.example_inputs()
    lg = run(
        ghlc.trace(
            model, inputs, config=ghlc.GHLConfig(temperature=getattr(mod, "TEMPERATURES", 1.0))
        )
    )
    assert len(lg.plastic()) == len(nodes_of(lg, "hebbian")) > 0
    assert_same_eval(model, inputs[0], lg)


# ---- PassManager errors --------------------------------------------------------------------


def rogue_global_sign(lg: LayerGraph) -> LayerGraph:
    """Bad pass: a second global-sign source broadcasting to a Hebbian node."""
    g = lg.copy_graph()
    g.add_node("global_sign_2", type="global_sign", signal="grad_sign")
    g.add_edge("global_sign_2", lg.hebbian_nodes()[0], type="broadcast")
    return lg.evolve(g=g)


def hebbian_on_backprop(lg: LayerGraph) -> LayerGraph:
    """Bad pass: a Hebbian node on the (backprop) output layer."""
    g = lg.copy_graph()
    k = hebb_key("fc.weight")
    g.add_node(k, type="hebbian", rule=lg.rule("conv1.weight"))
    g.add_edge("fc.weight", k, type="update")
    g.add_edge(GLOBAL_SIGN, k, type="broadcast")
    return lg.evolve(g=g)


def dropped_broadcast(lg: LayerGraph) -> LayerGraph:
    """Bad pass: one Hebbian node loses its global-sign edge."""
    g = lg.copy_graph()
    g.remove_edge(GLOBAL_SIGN, hebb_key("conv1.weight"))
    return lg.evolve(g=g)


@pytest.mark.parametrize(
    "bad,problem",
    [
        (rogue_global_sign, "2 global-sign sources, expected at most 1"),
        (hebbian_on_backprop, "fc.weight is backprop but has a Hebbian node"),
        (dropped_broadcast, "hebbian:conv1.weight has 0 global-sign edges, expected 1"),
    ],
)
def test_pass_manager_names_failing_pass_and_earlier_ones(bad, problem):
    pm = passes.PassManager(
        [
            passes.select_plastic,
            passes.insert_hebbian,
            passes.broadcast_global_sign,
            bad,
            passes.validate,
        ]
    )
    with pytest.raises(PassError) as e:
        pm(make()[2])
    msg = str(e.value)
    assert msg.startswith(
        f"pass {bad.__name__!r} (after select_plastic, insert_hebbian, broadcast_global_sign)"
    ), msg
    assert "broke an invariant" in msg and problem in msg, msg
    assert "validate" not in msg


def test_pass_manager_reports_exceptions_preconditions_and_bad_returns():
    custom = load_example("custom_pass")

    def explodes(lg):
        raise ValueError("boom")

    def returns_none(lg):
        return None

    with pytest.raises(
        PassError,
        match=r"pass 'explodes' \(after select_plastic\) failed: "
        r"ValueError: boom",
    ):
        passes.PassManager([passes.select_plastic, explodes])(make()[2])
    with pytest.raises(PassError, match="pass 'returns_none' returned NoneType"):
        passes.PassManager([returns_none])(make()[2])
    with pytest.raises(
        PassError,
        match=r"pass 'depth_temperature' \(after select_plastic\): "
        "precondition failed: .*run insert_hebbian first",
    ):
        passes.PassManager([passes.select_plastic, custom.depth_temperature])(make()[2])
    with pytest.raises(
        PassError,
        match=r"pass 'validate' \(after select_plastic, "
        r"insert_hebbian\) failed: .*no global-sign edge",
    ):
        pipeline = [passes.select_plastic, passes.insert_hebbian, passes.validate]
        passes.PassManager(pipeline)(make()[2])


# ---- a user-written pass (examples/custom_pass.py) -----------------------------------------


def test_custom_depth_temperature_pass():
    custom = load_example("custom_pass")
    model, x, lg = make(ghlc.GHLConfig(temperature=2.0))
    out = passes.PassManager(custom.PASSES)(lg)
    temps = [out.rule(n).temperature for n in CONVS]
    assert temps == pytest.approx([2.0, 2.0 * custom.FINAL**0.5, 2.0 * custom.FINAL])
    assert nodes_of(out, "hebbian") == nodes_of(run(lg), "hebbian")
    assert edges_of(out, "broadcast") == edges_of(run(lg), "broadcast")
    assert isinstance(out.rule("conv1.weight"), type(run(lg).rule("conv1.weight")))
    assert dataclasses.replace(out.rule("blk.2.weight"), temperature=2.0) == run(lg).rule(
        "blk.2.weight"
    )
    assert_same_eval(model, x, out)


def test_custom_pass_example_runs(capsys):
    runpy.run_path(str(EXAMPLES / "custom_pass.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert "20 of 21 layers plastic (GHL)" in text
    assert "layer4.0.downsample.0" in text and "built:" in text


# ---- set_global_signal ---------------------------------------------------------------------


def test_set_global_signal_changes_the_global_sign_node_only():
    lg = run(make()[2])
    out, modified = passes.set_global_signal("none")(lg)
    assert modified and out.global_signal == "none" and lg.global_signal == "grad_sign"
    assert nodes_of(out, "hebbian") == nodes_of(lg, "hebbian")
    assert edges_of(out, "broadcast") == edges_of(lg, "broadcast")
    assert all(out.rule(n) == lg.rule(n) for n in CONVS)
    assert passes.set_global_signal("none")(out) == (out, False)
    with pytest.raises(PassError, match="global signal 'sign' is not one of grad_sign, none"):
        passes.set_global_signal("sign")


def test_set_global_signal_keeps_eval_outputs_and_gives_pure_hebbian_gradients():
    model, x, lg = make()
    model.drop.p = 0.0
    lg = run(lg)
    hebb = passes.PassManager([passes.set_global_signal("none")])(lg)
    assert_same_eval(model, x, hebb)
    other, _, lg_none = make(ghlc.GHLConfig(global_signal="none"))
    other.drop.p = 0.0
    want = ghlc.build(run(lg_none)).train()
    got = ghlc.build(hebb).train()
    want(x).sum().backward()
    got(x).sum().backward()
    for n, p in got.named_parameters():
        assert torch.equal(p.grad, want.get_parameter(n).grad), n
    ghl = ghlc.build(lg).train()
    ghl(x).sum().backward()
    assert not torch.equal(ghl.conv1.weight.grad, got.conv1.weight.grad)


def test_set_global_signal_requires_the_global_sign_node():
    lg = passes.insert_hebbian(passes.select_plastic(make()[2]).graph).graph
    with pytest.raises(
        PassError,
        match=r"pass 'set_global_signal': precondition failed: "
        r"no global-sign node \(run broadcast_global_sign",
    ):
        passes.PassManager([passes.set_global_signal("none")])(lg)


# ---- requires / ensures, PassResult, purity ------------------------------------------------


def test_each_built_in_pass_meets_its_own_conditions():
    lg = make(ghlc.GHLConfig(plastic=("conv", "linear")))[2]
    for p in passes.default_passes():
        assert p.requires(lg) == [], p.name
        lg, _ = p(lg)
        assert p.ensures(lg) == [], p.name


def with_signal(signal: str):
    """Bad pass: writes an unknown signal on the global-sign node."""

    def set_signal(lg: LayerGraph) -> LayerGraph:
        g = lg.copy_graph()
        g.nodes[GLOBAL_SIGN]["signal"] = signal
        return lg.evolve(g=g)

    return set_signal


class ForgetsOneLayer(passes.PassBase):
    """Bad pass: like insert_hebbian, but leaves the last plastic layer out."""

    name = "forgets_one_layer"

    def call(self, lg):
        out = passes.insert_hebbian(lg).graph
        g = out.copy_graph()
        g.remove_node(hebb_key(lg.plastic()[-1].name))
        return passes.PassResult(out.evolve(g=g), True)

    ensures = passes.insert_hebbian.ensures


class Reselects(passes.PassBase):
    """Bad pass: marks the output layer plastic without the config saying so."""

    name = "reselects"

    def call(self, lg):
        g = lg.copy_graph()
        g.nodes["fc.weight"]["info"] = dataclasses.replace(
            lg.layer("fc.weight"), role=Role.PLASTIC, reason=""
        )
        return passes.PassResult(lg.evolve(g=g), True)

    ensures = passes.select_plastic.ensures


@pytest.mark.parametrize(
    "pipeline,message",
    [
        (
            [passes.select_plastic, ForgetsOneLayer()],
            "pass 'forgets_one_layer' (after select_plastic) broke an invariant: plastic parameter "
            "blk.2.weight has no Hebbian node",
        ),
        (
            [passes.select_plastic, Reselects()],
            "pass 'reselects' (after select_plastic) broke an invariant: fc.weight is plastic, the "
            "config says otherwise",
        ),
        (
            [
                passes.select_plastic,
                passes.insert_hebbian,
                passes.broadcast_global_sign,
                with_signal("sign"),
            ],
            "pass 'set_signal' (after select_plastic, insert_hebbian, broadcast_global_sign) "
            "broke an invariant: global signal 'sign' is not one of grad_sign, none",
        ),
    ],
)
def test_pass_manager_checks_each_pass_ensures(pipeline, message):
    with pytest.raises(PassError) as e:
        passes.PassManager(pipeline)(make()[2])
    assert str(e.value).startswith(message), str(e.value)


def test_broadcast_global_sign_ensures_a_known_signal():
    lg = run(make()[2])
    bad = with_signal("sign")(lg)
    assert passes.broadcast_global_sign.ensures(bad) == [
        "global signal 'sign' is not one of grad_sign, none"
    ]
    assert passes.broadcast_global_sign.ensures(lg) == []


def test_pass_manager_rejects_a_pass_that_edits_its_input():
    def edits_input(lg: LayerGraph) -> LayerGraph:
        lg.g.nodes[GLOBAL_SIGN]["signal"] = "none"
        return lg

    lg = run(make()[2])
    with pytest.raises(PassError, match=r"pass 'edits_input' edited its input graph"):
        passes.PassManager([edits_input])(lg)


def test_pass_manager_takes_plain_functions_and_pass_results_and_reports_modified():
    lg = run(make()[2])
    pm = passes.PassManager([passes.validate, lambda g: g])
    assert pm(lg) is lg and not pm.modified
    pm = passes.PassManager([passes.set_global_signal("none"), passes.validate])
    out = pm(lg)
    assert pm.modified and out.global_signal == "none"


def test_compile_is_a_deprecated_alias_of_build():
    model, x, lg = make()
    lg = run(lg)
    with pytest.warns(DeprecationWarning, match="ghlc.compile is deprecated; use ghlc.build"):
        m = ghlc.compile(lg)
    with pytest.warns(DeprecationWarning):
        ghlc.compile(lg)  # once per call
    assert torch.equal(m.eval()(x), ghlc.build(lg).eval()(x))
