"""Every zoo architecture: prepare succeeds, the expected layers are plastic, one SGD step
matches the independent float64 oracle exactly, and eval outputs are bit-identical."""

from __future__ import annotations

import copy
import functools

import oracle
import pytest
import torch
from zoo import ZOO

import ghlc

LR = 0.1
IDS = [e.name for e in ZOO]


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    target = torch.randn(out.shape, generator=g)
    return ((out - target) ** 2).mean()


@functools.cache
def _prepared(name: str):
    """(original model, untouched copy, prepared model, input, LayerGraph) for one entry."""
    e = next(z for z in ZOO if z.name == name)
    model, x = e.make()
    plain = copy.deepcopy(model)
    cfg = ghlc.GHLConfig(**e.config_kwargs())
    m = ghlc.prepare(model, (x,), config=cfg)
    lg = ghlc.passes.PassManager(ghlc.passes.default_passes())(ghlc.trace(model, (x,), config=cfg))
    return e, model, plain, m, x, lg


@pytest.fixture(params=IDS)
def case(request):
    e, model, plain, m, x, lg = _prepared(request.param)
    # fresh copies per test so no test sees another's optimiser step
    return e, model, copy.deepcopy(plain), copy.deepcopy(m), x, lg


def test_prepare_keeps_names(case):
    e, model, plain, m, x, lg = case
    assert m is not model
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert [n for n, _ in m.named_parameters(remove_duplicate=False)] == names
    assert list(m.state_dict()) == list(model.state_dict())


def test_expected_layers_plastic(case):
    e, model, plain, m, x, lg = case
    got = {i.name: i.weight_use for i in lg.plastic()}
    assert got == e.plastic
    for i in lg.plastic():
        assert i.calls == e.calls.get(i.name, 1), i.name
    assert lg.global_signal == "grad_sign"
    if e.fx_fails:
        assert lg.capture != "fx"
        assert lg.capture_errors
        assert any(t == "fx" for t, _ in lg.capture_errors)
    else:
        assert lg.capture == "fx"


def test_eval_outputs_bit_identical(case):
    e, model, plain, m, x, lg = case
    m.eval()
    plain.eval()
    model.eval()
    with torch.no_grad():
        ref = plain(x)
        assert torch.equal(m(x), ref)
        assert torch.equal(model(x), ref)
    ref = plain(x)  # grad enabled, eval mode: still the original computation
    assert torch.equal(m(x), ref)


def _check_grad(name, got, expected, g_plain):
    """``got`` (float32) against the oracle's float64 ``expected``."""
    exp = expected.to(torch.float64)
    got = got.to(torch.float64)
    err = (got - exp).norm() / exp.norm().clamp_min(1e-30)
    assert err <= 1e-4, f"{name}: rel err {err:.3g}"
    big = exp.abs() > 1e-3 * exp.abs().max()
    assert torch.equal(torch.sign(got[big]), torch.sign(exp[big])), f"{name}: sign differs"


def test_one_sgd_step_matches_oracle(case):
    e, model, plain, m, x, lg = case
    names = list(e.plastic)
    h, g, _ = oracle.run_plain(plain, (x,), names, loss_fn)
    assert set(h) == set(names)

    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=0.0, weight_decay=0.0)
    opt.zero_grad()
    loss_fn(m(x)).backward()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    opt.step()

    for n, p in m.named_parameters():
        if n in h:
            exp = oracle.expected_grad(h[n], g[n])
        else:
            exp = g[n]
        _check_grad(n, grads[n], exp, g[n])
        step = p.detach().to(torch.float64) - before[n].to(torch.float64)
        want = -LR * exp
        # float32 parameter storage: allow a few ulps of the parameter on top of 1e-4 rel
        slack = 4 * torch.finfo(torch.float32).eps * before[n].abs().to(torch.float64)
        tol = 1e-4 * want.abs().max() + slack
        assert ((step - want).abs() <= tol).all(), f"{n}: step differs"
        if n in h:
            big = want.abs() > 1e-3 * want.abs().max()
            assert torch.equal(torch.sign(step[big]), torch.sign(want[big])), n


CONVS = [
    (
        torch.nn.functional.conv1d,
        (2, 4, 9),
        (6, 2, 3),
        dict(stride=2, padding=1, dilation=2, groups=2),
    ),
    (
        torch.nn.functional.conv2d,
        (2, 4, 7, 6),
        (6, 2, 3, 2),
        dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    ),
    (
        torch.nn.functional.conv3d,
        (2, 2, 4, 5, 5),
        (4, 2, 2, 3, 3),
        dict(stride=(1, 2, 2), padding=1),
    ),
    (
        torch.nn.functional.conv_transpose1d,
        (2, 4, 5),
        (4, 3, 3),
        dict(stride=2, padding=1, output_padding=1, groups=2, dilation=1),
    ),
    (
        torch.nn.functional.conv_transpose2d,
        (2, 4, 4, 3),
        (4, 2, 3, 2),
        dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2), groups=2, dilation=(1, 2)),
    ),
    (
        torch.nn.functional.conv_transpose3d,
        (2, 2, 3, 3, 3),
        (2, 3, 2, 2, 2),
        dict(stride=2, padding=0),
    ),
]


@pytest.mark.parametrize("func,xs,ws,kw", CONVS, ids=lambda v: getattr(v, "__name__", ""))
def test_oracle_correlation_equals_autograd(func, xs, ws, kw):
    """Self-check of the oracle: its explicit patch correlation sum y.x equals the weight
    gradient with cotangent y, and its Oja decay uses the right output unit per weight."""
    torch.manual_seed(0)
    x = torch.randn(*xs, dtype=torch.float64)
    w = torch.randn(*ws, dtype=torch.float64, requires_grad=True)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(w.detach().clone())

        def forward(self, x):
            return func(x, self.weight, None, **kw)

    hold = Holder()
    u, calls = oracle.record(hold, (x,), ["weight"])
    assert len(calls) == 1
    y = torch.softmax(u.detach(), 1)
    (ref,) = torch.autograd.grad(func(x, w, None, **kw), w, y)
    corr = oracle.call_term(calls[0], {"local_rule": "hebb"})
    torch.testing.assert_close(corr, ref, rtol=1e-10, atol=1e-10)
    # Oja decay: each weight is scaled by s of the output unit it feeds
    oja = oracle.call_term(calls[0], {})
    s = (y * u.detach()).sum(dim=[i for i in range(u.dim()) if i != 1])
    decay = corr - oja  # = s[unit(w)] * w
    wd = w.detach()
    tr = func in (
        torch.nn.functional.conv_transpose1d,
        torch.nn.functional.conv_transpose2d,
        torch.nn.functional.conv_transpose3d,
    )
    g = kw.get("groups", 1)
    for idx in [(0, 0), (ws[0] - 1, ws[1] - 1), (ws[0] // 2, 0)]:
        unit = (idx[0] // (ws[0] // g)) * ws[1] + idx[1] if tr else idx[0]
        torch.testing.assert_close(decay[idx], s[unit] * wd[idx])


def test_oracle_patches_match_unfold():
    """The oracle's windows (Tensor.unfold on the padded input) agree with F.unfold's columns
    on a 2-d case with stride, padding and dilation."""
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    k, s, p, d = (3, 2), (2, 1), (1, 0), (1, 2)
    a = oracle.patches(x, k, s, p, d)  # (N, C, L0, L1, k0, k1)
    cols = torch.nn.functional.unfold(x, k, dilation=d, padding=p, stride=s)
    b = cols.view(2, 3, *k, *a.shape[2:4]).permute(0, 1, 4, 5, 2, 3)
    assert a.shape == (2, 3, 4, 4, 3, 2) and torch.equal(a, b)
