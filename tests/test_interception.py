"""How the runtime reaches and runs plastic calls; every way gives the same training step.

Reaching: where every plastic call is its own stock Conv/Linear module's forward, the prepared
module replaces those forwards and enters no function mode; elsewhere a function mode routes
the calls. Running: a call runs backprop's own autograd node plus a hook on its output, or
ghlc's autograd Function (the in-call combine's way). The tests run the ways on the same
models and require identical gradients step by step, and the same errors.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import pickle
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack
from zoo import BY_NAME, sweep

import ghlc

ALL = ghlc.GHLConfig(plastic=("conv", "linear"), include=("*",))  # every layer plastic
MODE = dataclasses.replace(ALL, interception="mode")


class Probe(nn.Module):
    """Notes how many function modes are active while the training forward runs."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(len(_get_current_function_mode_stack()))
        return x


class MyConv(nn.Conv2d):  # a subclass that keeps torch's forward
    pass


def net2d():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        Probe(),
        nn.Conv2d(4, 4, 4, padding="same"),  # even kernel: asymmetric 'same' padding
        nn.ReLU(),
        MyConv(4, 6, 3, stride=2, groups=2, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    ), torch.randn(5, 3, 8, 8)


def net1d_unbatched():
    return nn.Sequential(
        nn.Conv1d(3, 5, 3, dilation=2), Probe(), nn.ReLU(), nn.Flatten(0), nn.Linear(5 * 12, 4)
    ), torch.randn(3, 16)


def _prepare(make, module_calls: bool):
    torch.manual_seed(0)
    model, x = make()
    m = ghlc.prepare(model, (x,), ALL if module_calls else MODE)
    assert ghlc.runtime.runtime_of(m).module_calls is module_calls
    for mod in m.modules():
        if isinstance(mod, Probe):
            mod.seen.clear()  # the trace's run
    return m, x


def _steps(m, x, n=3):
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    grads = []
    for _ in range(n):
        opt.zero_grad()
        m(x).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
        opt.step()
    return grads


@pytest.mark.parametrize("make", [net2d, net1d_unbatched], ids=["2d", "1d-unbatched"])
def test_module_forwards_match_the_function_mode(make):
    fast, x = _prepare(make, True)
    slow, _ = _prepare(make, False)
    plastic = set(ghlc.runtime.runtime_of(fast).sites)
    assert len(plastic) >= 2
    got, want = _steps(fast, x), _steps(slow, x)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            torch.testing.assert_close(g[k], w[k], rtol=0, atol=0, msg=k)
        for k in plastic:  # the plastic gradients are GHL's, not backprop's
            assert g[k].abs().max() == 1, k
    probe = next(mod for mod in fast.modules() if isinstance(mod, Probe))
    assert set(probe.seen) == {0}  # no function mode during the training forwards
    probe = next(mod for mod in slow.modules() if isinstance(mod, Probe))
    assert set(probe.seen) == {1}


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return F.linear(x, self.fc.weight, self.fc.bias)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Twice(nn.Module):  # one module called twice: still its own forward
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class PadConv(nn.Conv2d):  # overrides forward
    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


class StdConv(nn.Conv2d):  # a computed weight (weight standardisation)
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias)


@pytest.mark.parametrize(
    "make,x,expected",
    [
        (Functional, torch.randn(2, 6), False),
        (Tied, torch.randn(2, 6), False),
        (Twice, torch.randn(2, 6), True),
        (lambda: nn.Sequential(PadConv(3, 4, 3)), torch.randn(2, 3, 6, 6), False),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2)),
            torch.randn(2, 3, 6, 6),
            True,
        ),
        (lambda: nn.Sequential(StdConv(3, 4, 3)), torch.randn(2, 3, 6, 6), False),
        (lambda: nn.MultiheadAttention(6, 2), (torch.randn(3, 2, 6),) * 3, False),
    ],
    ids=["functional", "tied", "called-twice", "forward-override", "plain", "computed", "mha"],
)
def test_which_models_need_the_function_mode(make, x, expected):
    x = x if isinstance(x, tuple) else (x,)
    m = ghlc.prepare(make(), x, ALL)
    rt = ghlc.runtime.runtime_of(m)
    assert rt.sites
    assert rt.module_calls is expected
    out = m(*x)
    (out[0] if isinstance(out, tuple) else out).square().mean().backward()
    for name in rt.sites:  # plastic either way
        p = m.get_parameter(name)
        assert p.grad is not None and p.grad.abs().max() == 1, name


@pytest.mark.parametrize("module_calls", [True, False], ids=["module", "mode"])
def test_copies_and_pickles_keep_the_plastic_forwards(module_calls):
    m, x = _prepare(net2d, module_calls)
    want = _steps(copy.deepcopy(m), x)
    for q in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        rt = ghlc.runtime.runtime_of(q)
        if not module_calls:  # the root's forward (eager under torch.compile) is its own
            assert q.forward.module is q
            assert inspect.signature(q.forward) == inspect.signature(type(q).forward.__get__(q))
        for site in rt.sites.values() if module_calls else ():
            fwd = q.get_submodule(site.layer).forward
            assert fwd.module is q.get_submodule(site.layer) and fwd.rt is rt
        got = _steps(q, x)
        for g, w in zip(got, want):
            for k in g:
                torch.testing.assert_close(g[k], w[k], rtol=0, atol=0, msg=k)


def test_eval_and_no_grad_forwards_are_the_plain_model():
    m, x = _prepare(net2d, True)
    plain = copy.deepcopy(m)
    for mod in plain.modules():
        mod.__dict__.pop("forward", None)  # back to torch's own forwards
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)
    m.eval(), plain.eval()
    torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)


class LateBranch(nn.Module):
    """Uses its weight functionally only once ``late`` is set (after the trace)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.late = False

    def forward(self, x):
        if self.late:
            return F.linear(x, self.fc.weight, self.fc.bias)
        return self.fc(x)


@pytest.mark.parametrize("interception", ["auto", "mode"])
def test_uses_the_trace_did_not_see(interception):
    """``auto`` makes plastic the calls the trace saw; ``mode`` also later, unseen ones."""
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    m = ghlc.prepare(LateBranch(), (x,), dataclasses.replace(ALL, interception=interception))
    m.late = True
    m(x).square().mean().backward()
    g = m.fc.weight.grad
    plain = copy.deepcopy(m).eval()  # eval: the original model, backprop gradient
    plain.zero_grad()
    plain(x).square().mean().backward()
    if interception == "mode":
        assert g.abs().max() == 1
    else:
        torch.testing.assert_close(g, plain.fc.weight.grad, rtol=0, atol=0)


def test_interception_is_checked():
    with pytest.raises(ghlc.ConfigError, match="interception"):
        ghlc.GHLConfig(interception="hooks")


# ---- how a plastic call runs: backprop's node + an output hook, or the autograd Function --


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"hebbian_at": "backward"},
        {"hebbian_at": "forward"},
        {"sample_fraction": 0.5},
        {"sample_fraction": 0.25, "sample_over": "positions"},
    ],
    ids=["auto", "backward", "forward", "sampled", "positions"],
)
@pytest.mark.parametrize("name", sweep())
def test_output_hooks_match_the_autograd_function(name, kw, override):
    """Both ways of running a plastic call give bit-identical gradients, step after step."""
    entry = BY_NAME[name]
    grads = {}
    for hooks in (True, False):
        override(hooked_calls=hooks)
        model, x = entry.make()
        cfg = ghlc.GHLConfig(**entry.config_kwargs(), **kw)
        m = ghlc.prepare(model, (x,), cfg)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        out = []
        for step in range(3):
            torch.manual_seed(step)
            opt.zero_grad()
            y = m(x)
            (y[0] if isinstance(y, tuple) else y).square().mean().backward()
            out.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
            opt.step()
        grads[hooks] = out
    for step, (a, b) in enumerate(zip(grads[True], grads[False])):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"step {step}: {k}")


class LateInPlace(nn.Module):
    """Changes its conv's output in place only once ``late`` is set (after the trace)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.late = False

    def forward(self, x):
        u = self.conv(x)
        if self.late:
            u.mul_(2)  # saves nothing itself: only ghlc needs the old u
        return u


@pytest.mark.parametrize("hooks", [True, False], ids=["output-hook", "function"])
def test_output_changed_in_place_after_the_call_is_a_clear_error(hooks, override):
    override(hooked_calls=hooks)
    x = torch.randn(2, 3, 6, 6)
    m = ghlc.prepare(LateInPlace(), (x,), dataclasses.replace(ALL, hebbian_at="backward"))
    m(x).sum().backward()
    m.late = True
    with pytest.raises(ghlc.RuntimeGHLError, match="layer 'conv': its output was modified in"):
        m(x).sum().backward()


@pytest.mark.parametrize("hooks", [True, False], ids=["output-hook", "function"])
def test_create_graph_through_a_plastic_layer_is_a_clear_error(hooks, override):
    override(hooked_calls=hooks)
    m = ghlc.prepare(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2)),
        (torch.randn(2, 3, 6, 6),),
    )
    loss = m(torch.randn(2, 3, 6, 6)).square().sum()
    with pytest.raises(ghlc.RuntimeGHLError, match="create_graph"):
        torch.autograd.grad(loss, list(m.parameters()), create_graph=True)


@pytest.mark.parametrize("timing", ["forward", "backward"])
@pytest.mark.parametrize("hooks", [True, False], ids=["output-hook", "function"])
def test_a_kept_loss_keeps_no_activations(hooks, timing, override):
    """A training loop keeps last step's ``loss`` (and so its graph) during the next forward:
    what a plastic call kept for its backward must be gone once that backward ran."""
    override(hooked_calls=hooks)
    m = ghlc.prepare(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2)
        ),
        (torch.randn(2, 3, 6, 6),),
        ghlc.GHLConfig(hebbian_at=timing),
    )
    x = torch.randn(2, 3, 6, 6)
    loss = m(x).square().sum()
    loss.backward()
    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None and loss.grad_fn is not None


@pytest.mark.parametrize("hooks", [True, False], ids=["output-hook", "function"])
def test_second_backward_through_a_retained_graph_is_a_clear_error(hooks, override):
    override(hooked_calls=hooks)
    m = ghlc.prepare(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2)),
        (torch.randn(2, 3, 6, 6),),
        ghlc.GHLConfig(hebbian_at="forward"),
    )
    loss = m(torch.randn(2, 3, 6, 6)).square().sum()
    loss.backward(retain_graph=True)
    with pytest.raises(ghlc.RuntimeGHLError, match="retain_graph"):
        loss.backward()


def test_autocast_steps_match_between_the_two_ways(override):
    """Mixed precision (CPU bfloat16 autocast): both ways give the same GHL gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 2),
    )
    x = torch.randn(4, 3, 8, 8)
    grads = {}
    for hooks in (True, False):
        override(hooked_calls=hooks)
        m = ghlc.prepare(copy.deepcopy(model), (x[:2],))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x).float().square().mean()
        loss.backward()
        grads[hooks] = {k: p.grad.clone() for k, p in m.named_parameters()}
        for name in ghlc.runtime.runtime_of(m).sites:
            assert grads[hooks][name].abs().max() == 1, name
    for k in grads[True]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=0, atol=0, msg=k)
