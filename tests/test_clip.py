"""Gradient clipping and GHL: ghlc.clip_grad_norm_ clips the backprop gradients only; torch's
clip on a prepared model (which rescales |H_n|*sign(G)) is warned about at the step."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import ghlc
from ghlc.runtime.clip import RescaledGradientWarning
from ghlc.runtime.status import STATUS


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 4))
    x = torch.randn(4, 3, 8, 8)
    return ghlc.prepare(net, (x[:1],)), x


@pytest.fixture(autouse=True)
def _fresh_warning():
    STATUS.rescale_warned = False
    yield
    STATUS.rescale_warned = False


def test_ghlc_clip_leaves_plastic_gradients_and_clips_the_rest():
    m, x = _model()
    m(x).square().sum().backward()
    plastic = m[0].weight.grad.clone()
    head = m[3].weight.grad.clone()
    head_b = m[3].bias.grad.clone()
    conv_b = m[0].bias.grad.clone()
    total = torch.linalg.vector_norm(torch.cat([head.flatten(), head_b, conv_b]))
    assert total > 0.5  # so that clipping to 0.5 does something
    norm = ghlc.clip_grad_norm_(m, 0.5)
    assert torch.allclose(norm, total)
    assert torch.equal(m[0].weight.grad, plastic)
    assert plastic.abs().max() == 1
    assert torch.allclose(m[3].weight.grad, head * 0.5 / total, rtol=1e-5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RescaledGradientWarning)
        opt.step()


def test_torch_clip_on_a_prepared_model_is_warned_about_once():
    m, x = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x).square().sum().backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
    scale = float(m[0].weight.grad.abs().max())
    assert scale < 1  # the rule's largest element is 1: clipping scaled it
    with pytest.warns(RescaledGradientWarning, match=r"layer '0'.*scaled by"):
        opt.step()
    opt.zero_grad()
    m(x).square().sum().backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RescaledGradientWarning)
        opt.step()  # once per process


def test_a_clip_that_does_not_clip_is_not_warned_about():
    m, x = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x).square().sum().backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9)  # multiplies in place by 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RescaledGradientWarning)
        opt.step()
