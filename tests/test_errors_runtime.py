"""Errors raised in the compiled training module name the layer and the user's source line."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ghlc


class FlipsDtype(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.functional, self.bad = functional, False

    def forward(self, x):
        if self.bad:
            x = x.double()  # dtype mismatch at train time
        if self.functional:
            return F.conv2d(x, self.conv.weight, self.conv.bias)
        return self.conv(x)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_runtime_error_names_layer_and_line(functional):
    x = torch.randn(2, 3, 8, 8)
    m = ghlc.prepare(FlipsDtype(functional), (x,), ghlc.GHLConfig(include=("conv",)))
    assert ghlc.runtime.runtime_of(m).module_calls is not functional  # both interceptions
    m.bad = True
    with pytest.raises(ghlc.RuntimeGHLError, match=r"layer 'conv' at .*test_errors_runtime.py:\d+"):
        m(x)
    assert ghlc.runtime.runtime_of(m).depth == 0  # the failed forward left GHL switched off
    m.bad = False
    m(x).sum().backward()  # the module still works after the error
    assert m.conv.weight.grad.abs().max() == 1  # and is plastic: |H_n| sign(G) reaches 1


def test_inplace_modification_after_call_is_handled():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    p = ghlc.prepare(m, (x,))
    assert p(x).sum().backward() is None
    assert p[0].weight.grad is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_graph_step_without_cuda_is_a_clear_error():
    m = ghlc.prepare(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)),
        (torch.randn(2, 3, 4, 4),),
    )
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ghlc.GHLError, match="needs a CUDA device"):
        ghlc.cuda_graph_step(
            m,
            opt,
            torch.nn.functional.cross_entropy,
            (torch.randn(2, 3, 4, 4),),
            torch.tensor([0, 1]),
        )
