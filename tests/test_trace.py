"""Capture tiers, identity-keyed layer discovery, data-flow edges and trace errors."""

import copy
import warnings

import oracle
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ghlc
from ghlc.errors import TraceError


class MyLinear(nn.Linear):  # a subclass: fx's default leaf rule would inline it
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = MyLinear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.a(x)
        return self.b(x)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.c(x.view(7, -1))


def test_fx_keeps_conv_linear_subclasses_as_leaves():
    lg = ghlc.trace(Net(), (torch.randn(2, 3, 8, 8),))
    assert lg.capture == "fx"
    targets = [n.target for n in lg.program.graph.nodes if n.op == "call_module"]
    assert "head" in targets and "conv" in targets
    names = [i.name for i in lg.layers()]
    assert names == ["conv.weight", "head.weight"]
    assert lg.layer("head.weight").is_output
    assert lg.layer("conv.weight").out_shape == (2, 4, 6, 6)
    edges = {(u, v) for u, v, d in lg.g.edges(data=True) if d["type"] == "data"}
    assert edges == {
        ("input", "conv.weight"),
        ("conv.weight", "head.weight"),
        ("head.weight", "output"),
    }


def test_value_branch_falls_back_and_records_why():
    x = torch.ones(1, 3, 8, 8)
    lg = ghlc.trace(ValueBranch(), (x,))
    assert lg.capture in ("export", "eager")
    assert lg.capture_errors and lg.capture_errors[0][0] == "fx"
    assert [i.name for i in lg.layers()] == ["a.weight"]  # the path actually taken


def test_eager_tier_when_others_disabled():
    lg = ghlc.trace(Net(), (torch.randn(1, 3, 8, 8),), tiers=())
    assert lg.capture == "eager" and lg.program is None
    assert len(lg.layers()) == 2


def test_model_that_fails_gets_clear_error():
    with pytest.raises(TraceError, match="fails on the example inputs.*RuntimeError"):
        ghlc.trace(Broken(), (torch.randn(2, 3, 8, 8),))


def test_not_a_module():
    with pytest.raises(TraceError, match="expected an nn.Module"):
        ghlc.trace(lambda x: x, (torch.randn(1),))


def test_trace_has_no_side_effects():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    rng = torch.random.get_rng_state()
    ghlc.trace(m, (x,))
    assert not m.training
    assert torch.equal(rng, torch.random.get_rng_state())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prepared_model_is_not_prepared_again():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5))
    x = torch.randn(2, 3, 8, 8)
    p = ghlc.prepare(m, (x,))
    with pytest.raises(TraceError, match="the model is already prepared by ghlc"):
        ghlc.prepare(p, (x,))
    with pytest.raises(TraceError, match="submodule 'inner' is already prepared"):
        ghlc.trace(_Wrap(p), (x,))
    ghlc.prepare(m, (x,))  # the original model stays preparable


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_lazy_modules_are_initialised_and_match_the_oracle():
    torch.manual_seed(0)
    lazy = nn.Sequential(
        nn.LazyConv2d(4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)
    )
    x = torch.randn(6, 3, 8, 8)
    m = ghlc.prepare(lazy, (x[:2],))
    assert not any(torch.nn.parameter.is_lazy(p) for p in lazy.parameters())
    assert lazy.training and torch.equal(lazy[1].running_mean, torch.zeros(4))  # no BN update
    plain = copy.deepcopy(lazy)
    h, g, _ = oracle.run_plain(plain, (x,), ["0.weight"], lambda out: out.logsumexp(1).mean())
    m.zero_grad()
    m(x).logsumexp(1).mean().backward()
    want = oracle.expected_grad(h["0.weight"], g["0.weight"])
    got = dict(m.named_parameters())["0.weight"].grad.to(torch.float64)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())
    broken = nn.Sequential(nn.LazyLinear(3), nn.Linear(4, 2))  # 3 outputs into a 4-input layer
    with pytest.raises(TraceError, match="lazy modules.*RuntimeError"):
        ghlc.prepare(broken, (torch.randn(2, 3),))


class _Unit(torch.nn.Module):
    def forward(self, w):
        return w / w.norm()


def test_trainable_weights_that_are_no_parameter_are_reported():
    """A parametrized weight cannot be mapped to a parameter: one warning names the module.
    A fixed filter (a buffer) is not plastic by design and passes silently."""
    from torch.nn.utils import parametrize

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 3)
            self.b = torch.nn.Conv2d(4, 4, 3)
            parametrize.register_parametrization(self.b, "weight", _Unit())
            self.register_buffer("blur", torch.full((4, 1, 2, 2), 0.25))

        def forward(self, x):
            return torch.nn.functional.conv2d(self.b(self.a(x)), self.blur, groups=4)

    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"1 module\(s\) \('b'\) use a trainable weight"):
        lg = ghlc.trace(Net(), (x,))
    assert [i.name for i in lg.layers()] == ["a.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ghlc.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), (x,))  # nothing to report


class Scaled(nn.Module):
    """Takes keyword inputs; fx cannot trace it (a long reason) and torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x, *, scale, shift=None):
        if isinstance(x, torch.fx.Proxy):
            raise RuntimeError("no symbolic tracing here," + " because" * 60 + " of reasons")
        y = self.conv(x) * scale
        y = y if shift is None else y + shift
        return self.head(y.mean((2, 3)))


def test_keyword_example_inputs_are_passed_by_name():
    x, scale = torch.randn(2, 3, 8, 8), torch.tensor(2.0)
    lg = ghlc.trace(Scaled(), {"x": x, "scale": scale})
    assert lg.capture == "export"
    assert [i.name for i in lg.layers()] == ["conv.weight", "head.weight"]
    assert lg.layer("conv.weight").out_shape == (2, 4, 6, 6)
    lg2 = ghlc.trace(Scaled(), (x,), example_kwargs={"scale": scale, "shift": 1.0})
    assert lg2.example_inputs == (x,) and lg2.example_kwargs == {"scale": scale, "shift": 1.0}
    m = ghlc.prepare(Scaled(), (x,), example_kwargs={"scale": scale})
    m(x, scale=scale).sum().backward()
    assert m.conv.weight.grad.abs().max() == 1  # |H| / max|H|: the rule ran


def test_a_capture_reason_is_kept_whole():
    lg = ghlc.trace(Scaled(), {"x": torch.randn(1, 3, 8, 8), "scale": 1.0})
    (tier, why), *_ = lg.capture_errors
    assert tier == "fx" and len(why) > 400
    assert why == "RuntimeError: no symbolic tracing here," + " because" * 60 + " of reasons"
