"""Plastic calls under autocast: run as autocast runs the plain ops, H in the weight's dtype.

The reference is the float64 oracle on the operands autocast actually used (the recorded
input and weight rounded to bfloat16, the recorded bfloat16 output) and the plain model's own
autocast gradient for the sign."""

from __future__ import annotations

import copy
import warnings

import oracle
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ghlc
from ghlc.runtime.accumulate import combine_in_call
from ghlc.runtime.status import STATUS

AMP = torch.bfloat16
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),  # H in backward
        nn.Conv2d(8, 6, 3),
        nn.ReLU(),  # no BN: H in forward (auto) when H is smaller
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    return out.float().logsumexp(1).mean()


def call_h(c: oracle.Call, bias: torch.Tensor | None) -> torch.Tensor:
    """H of one autocast call in float64: y from the call's own (bfloat16) output, Σ y·x from
    the operands autocast passed to the kernel, and Oja's Σ y⊙u from the output recomputed
    exactly from those operands (ghlc's Σ y⊙u = <W_k, Σ y·x> + b_k Σ y holds for that u)."""
    c.x, c.w = c.x.to(AMP).double(), c.w.to(AMP).double()
    b = None if bias is None else bias.detach().to(AMP).double()
    corr = oracle.call_term(c, {"local_rule": "hebb"})
    if c.kind == "linear":
        u = F.linear(c.x, c.w, b).reshape(-1, c.w.shape[0])
        y = oracle.compete(c.u.reshape(-1, c.w.shape[0]), 1, {})
        s = (y * u).sum(0)
    else:
        u = F.conv2d(c.x, c.w, b, c.stride, c.padding, c.dilation, c.groups)
        y = oracle.compete(c.u, 1, {})
        s = (y * u).sum(dim=(0, 2, 3))
    return corr - s.view(-1, *[1] * (c.w.dim() - 1)) * c.w


def reference(plain: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Expected gradients of the plastic weights for one autocast step of ``plain``: |H_n|
    times the sign of the plain model's own autocast gradient."""
    plain.train()
    plain.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=AMP):
        out, calls = oracle.record(plain, (x,), names)
    loss_fn(out).backward()
    params = dict(plain.named_parameters())
    h = {c.name: call_h(c, params.get(c.name.removesuffix("weight") + "bias")) for c in calls}
    assert sorted(h) == sorted(names) and len(calls) == len(names)
    return {n: oracle.expected_grad(h[n], params[n].grad) for n in names}


def check(m: nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = dict(m.named_parameters())
    for n, exp in want.items():
        g = got[n].grad
        assert g.dtype == torch.float32, n
        err = (g.double() - exp).norm() / exp.norm()
        assert err <= 1e-4, f"{n}: rel err {err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("timing", ["auto", "forward", "backward"])
@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "function"])
def test_autocast_step_matches_the_oracle_on_the_cast_operands(
    timing, device, hooks, monkeypatch, override
):
    """Both runtimes: backprop's node with the output hook, and PlasticCall (which casts the
    weight itself under autocast)."""

    override(hooked_calls=hooks)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same kernels
    base = model().to(device)
    x = torch.randn(4, 3, 8, 8).to(device)
    cfg = ghlc.GHLConfig(plastic=("conv", "linear"), include=("8",), hebbian_at=timing)
    m = ghlc.prepare(copy.deepcopy(base), (x[:1],), cfg)
    names = sorted(ghlc.runtime.runtime_of(m).sites)
    assert names == ["0.weight", "3.weight", "6.weight", "8.weight"]
    want = reference(copy.deepcopy(base), x, names)

    m.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=AMP):
        out = m(x)
        plain_out = copy.deepcopy(base)(x)
    assert out.dtype == AMP  # the plain model's autocast forward (bit for bit on CPU)
    assert (
        torch.equal(out, plain_out)
        if device == "cpu"
        else torch.allclose(out, plain_out, rtol=1e-2, atol=1e-2 * plain_out.abs().max().item())
    )
    loss_fn(out).backward()
    check(m, want)


@pytest.mark.parametrize("precision", ["full", "autocast"])
def test_autocast_after_plain_steps_with_the_in_call_combine(precision, monkeypatch, override):
    """A weight that takes the in-call combine in plain steps keeps it under autocast (the
    call casts the weight itself, so its gradient reaches the parameter as returned), with
    the oracle's gradients, and after autocast steps too."""
    from ghlc.runtime import function

    override(in_call_combine_min_numel=0)
    combines = []
    monkeypatch.setattr(
        function,
        "combine_in_call",
        lambda *a, **k: combines.append(a[4].dtype) or combine_in_call(*a, **k),
    )
    base = model()
    x = torch.randn(4, 3, 8, 8)
    m = ghlc.prepare(copy.deepcopy(base), (x[:1],), ghlc.GHLConfig(hebbian_precision=precision))
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: the weights stay the reference's
    for _ in range(2):  # plain steps: single use seen, then the in-call combine
        opt.zero_grad()
        loss_fn(m(x)).backward()
        opt.step()
    assert combines == [torch.float32] * 2
    opt.zero_grad()
    with torch.autocast("cpu", dtype=AMP):
        out = m(x)
    loss_fn(out).backward()
    assert combines == [torch.float32] * 4  # H in float32 under autocast too
    want = reference(copy.deepcopy(base), x, ["0.weight", "3.weight"])
    if precision == "full":
        check(m, want)
    else:  # the correlation in bfloat16: see the test above
        for n, p in m.named_parameters():
            if n in want:
                assert p.grad.dtype == torch.float32
                assert (p.grad.double() - want[n]).norm() / want[n].norm() <= 1.5e-2, n
    opt.step()
    opt.zero_grad()
    loss_fn(m(x)).backward()  # plain again: the in-call combine, as before
    h, g, _ = oracle.run_plain(copy.deepcopy(base), (x,), ["0.weight", "3.weight"], loss_fn)
    check(m, {n: oracle.expected_grad(h[n], g[n]) for n in h})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("timing", ["auto", "forward", "backward"])
def test_autocast_precision_computes_the_correlation_in_the_lower_precision(
    timing, device, monkeypatch
):
    """``hebbian_precision="autocast"``: the correlation runs in bfloat16, so H differs from
    the float32 path by bfloat16 rounding (relative 2⁻⁸ per term) and no more; without
    autocast the option changes nothing."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    base = model().to(device)
    x = torch.randn(4, 3, 8, 8).to(device)
    names = ["0.weight", "3.weight", "6.weight", "8.weight"]
    want = reference(copy.deepcopy(base), x, names)

    def grads(precision: str, amp: bool) -> dict[str, torch.Tensor]:
        cfg = ghlc.GHLConfig(
            plastic=("conv", "linear"),
            include=("8",),
            hebbian_at=timing,
            hebbian_precision=precision,
        )
        m = ghlc.prepare(copy.deepcopy(base), (x[:1],), cfg)
        with torch.autocast(device, dtype=AMP, enabled=amp):
            out = m(x)
        loss_fn(out).backward()
        return {n: p.grad for n, p in m.named_parameters()}

    low, full = grads("autocast", True), grads("full", True)
    for n, exp in want.items():
        assert low[n].dtype == torch.float32, n
        err = ((low[n].double() - exp).norm() / exp.norm()).item()
        assert 0 < err <= 1.5e-2, f"{n}: rel err {err:.3g}"  # > 0: the bfloat16 path ran
        assert not torch.equal(low[n], full[n]), n
    for n in low:  # biases and other parameters: backprop's own gradients
        if n not in want:
            assert torch.equal(low[n], full[n]), n
    plain_low, plain_full = grads("autocast", False), grads("full", False)
    assert all(torch.equal(plain_low[n], plain_full[n]) for n in plain_full)


def fp16_step(m: nn.Module, x: torch.Tensor, scaler) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    with torch.autocast("cpu", dtype=torch.float16):
        out = m(x)
    scaler.scale(loss_fn(out)).backward()
    return opt


def test_grad_scaler_leaves_the_plastic_gradients_unscaled(monkeypatch):
    """float16 autocast with loss scaling: ghlc.GradScaler's unscale_ gives the plastic
    weights back |H|*sign(G) as backward left it (torch's would divide it by the scale), and
    unscales every other gradient as torch's does; its step moves a plastic weight by
    lr * |H|*sign(G)."""
    monkeypatch.setattr(STATUS, "scaler_in_use", False)
    base = model()
    x = torch.randn(4, 3, 8, 8)
    plastic = ["0.weight", "3.weight"]
    grads = {}
    for kind in ("ghlc", "torch"):
        m = ghlc.prepare(copy.deepcopy(base), (x[:1],))
        scaler = (ghlc.GradScaler if kind == "ghlc" else torch.amp.GradScaler)("cpu")
        opt = fp16_step(m, x, scaler)
        params = dict(m.named_parameters())
        before = {n: p.grad.clone() for n, p in params.items()}
        scaler.unscale_(opt)
        grads[kind] = {n: p.grad.clone() for n, p in params.items()}
        s = scaler.get_scale()
        assert s == 2.0**16
        for n in params:
            want = before[n] if (kind == "ghlc" and n in plastic) else before[n] / s
            assert torch.equal(grads[kind][n], want), (kind, n)
        if kind == "ghlc":
            w0 = {n: params[n].detach().clone() for n in plastic}
            scaler.step(opt)
            scaler.update()
            for n in plastic:
                assert torch.allclose(params[n].detach(), w0[n] - 0.5 * before[n], atol=1e-7), n
    assert STATUS.scaler_in_use


def test_float16_autocast_warns_about_torch_grad_scaler(monkeypatch):
    from ghlc.runtime import function

    monkeypatch.setattr(STATUS, "scaler_in_use", False)
    function._warn_float16.cache_clear()
    m = ghlc.prepare(model(), (torch.randn(1, 3, 8, 8),))
    with pytest.warns(UserWarning, match="ghlc.GradScaler"):
        fp16_step(m, torch.randn(4, 3, 8, 8), torch.amp.GradScaler("cpu"))
    function._warn_float16.cache_clear()
    ghlc.GradScaler("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp16_step(m, torch.randn(4, 3, 8, 8), torch.amp.GradScaler("cpu"))
    function._warn_float16.cache_clear()
