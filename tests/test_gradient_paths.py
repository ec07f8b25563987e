"""Every way a plastic weight's gradient can reach it carries the Hebbian term.

A plastic call's term is added when the autograd node that computed the call's output runs.
These tests take each path that can deliver a plastic weight's gradient (hooked calls and
ghlc's autograd Function, module forwards and the function mode, every timing of H, the
in-call combine, N-D inputs whose output is a view, outputs changed in place) and compare the
gradient with the float64 oracle; and they check that a gradient arriving without its term
is a one-line error, never plain backprop's gradient.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import expected_grad, run_plain

import ghlc
import ghlc.runtime.accumulate as rt_accumulate

LINEAR = ghlc.GHLConfig(plastic=("conv", "linear"))


class LinearThenInPlace(nn.Module):
    """``u = a(x)``; ``u`` changed in place; ``b(u)``. On an input of 3+ dims, ``F.linear``
    returns a view, which the in-place op gives a new history (SwinV2's position-bias MLP)."""

    def __init__(self, inplace: str | None, functional: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 3)
        self.inplace, self.functional = inplace, functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.linear(x, self.a.weight, self.a.bias) if self.functional else self.a(x)
        if self.inplace == "relu":
            F.relu(u, inplace=True)
        elif self.inplace == "add":
            u += 0.5
        elif self.inplace == "slice":
            u[..., :4] *= 2.0
        v = torch.tanh(self.b(u))
        return self.head(v.flatten(1, -2).mean(1) if v.dim() > 2 else v)


class ConvThenInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.a(x)
        u += 0.25
        F.relu(u, inplace=True)
        return self.head(self.b(u).mean((2, 3)))


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.logsumexp(-1).sum() + 0.1 * out.square().sum()


def _check(
    model: nn.Module, x: torch.Tensor, cfg: ghlc.GHLConfig, plastic: list[str], steps: int = 1
) -> None:
    """``steps`` training steps of the prepared model (SGD between them); on the last one
    every plastic weight's gradient must equal the oracle's, computed on a plain model with
    the same weights."""
    torch.manual_seed(0)
    model = model.double()
    m = ghlc.prepare(model, example_inputs=(x,), config=cfg).train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    for _ in range(steps):
        plain = _rebuild(model).double()
        plain.load_state_dict(m.state_dict())
        opt.zero_grad(set_to_none=True)
        _loss(m(x)).backward()
        got = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
        opt.step()
    h, g, _ = run_plain(plain, (x,), plastic, _loss)
    for n in plastic:
        assert not torch.allclose(got[n], g[n]), f"{n}: plain backprop's gradient"
        torch.testing.assert_close(got[n], expected_grad(h[n], g[n]), rtol=1e-10, atol=1e-12, msg=n)


def _rebuild(model: nn.Module) -> nn.Module:
    if isinstance(model, LinearThenInPlace):
        return LinearThenInPlace(model.inplace, model.functional)
    return ConvThenInPlace()


@pytest.mark.parametrize("inplace", ["relu", "add", "slice", None])
@pytest.mark.parametrize("shape", [(10, 8), (2, 5, 8), (2, 3, 4, 8)], ids=["2d", "3d", "4d"])
def test_linear_output_changed_in_place_gets_the_rule(inplace, shape):
    x = torch.randn(shape, dtype=torch.float64)
    _check(LinearThenInPlace(inplace), x, LINEAR, ["a.weight", "b.weight"])


@pytest.mark.parametrize("interception", ["auto", "mode"])
@pytest.mark.parametrize("hooked", [True, False], ids=["hooked", "function"])
@pytest.mark.parametrize("hebbian_at", ["auto", "forward", "backward"])
def test_every_call_path_and_timing_delivers_the_rule(interception, hooked, hebbian_at, override):
    override(hooked_calls=hooked)
    cfg = dataclasses.replace(LINEAR, interception=interception, hebbian_at=hebbian_at)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    _check(LinearThenInPlace("relu"), x, cfg, ["a.weight", "b.weight"])
    _check(
        ConvThenInPlace(),
        torch.randn(2, 3, 6, 6, dtype=torch.float64),
        cfg,
        ["a.weight", "b.weight"],
    )


def test_functional_use_on_nd_input_changed_in_place_gets_the_rule():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    _check(LinearThenInPlace("add", functional=True), x, LINEAR, ["a.weight", "b.weight"])


def test_in_call_combine_with_nd_input_changed_in_place(override):
    """The in-call combine starts on the second step (single use is checked on the first)."""
    override(in_call_combine_min_numel=0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    _check(LinearThenInPlace("relu"), x, LINEAR, ["a.weight", "b.weight"], steps=3)


def test_a_gradient_without_its_hebbian_term_is_an_error(monkeypatch):
    """The guard: should a call's term ever be lost, the backward pass stops with a one-line
    error naming the layer instead of leaving plain backprop's gradient."""
    monkeypatch.setattr(rt_accumulate.PlasticParam, "add", lambda self, *a, **k: None)
    model = LinearThenInPlace(None)
    x = torch.randn(2, 5, 8)
    m = ghlc.prepare(model, example_inputs=(x,), config=LINEAR).train()
    with pytest.raises(
        ghlc.RuntimeGHLError, match=r"^layer '[ab]': .*without the Hebbian term"
    ) as e:
        _loss(m(x)).backward()
    assert "\n" not in str(e.value)


def test_a_plain_backward_after_no_plastic_call_keeps_the_plain_gradient():
    """Gradients through eval-mode forwards (saliency maps, say) run no plastic call: they
    stay backprop's, as the README says, and raise nothing."""
    model = LinearThenInPlace("relu")
    x = torch.randn(2, 5, 8)
    m = ghlc.prepare(model, example_inputs=(x,), config=LINEAR).eval()
    plain = LinearThenInPlace("relu")
    plain.load_state_dict(model.state_dict())
    _loss(m(x)).backward()
    _loss(plain(x)).backward()
    torch.testing.assert_close(m.a.weight.grad, plain.a.weight.grad)
