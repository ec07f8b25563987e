"""Errors raised in the compiled training module name the layer and the user's source line."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ghlc


class FlipsDtype(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bad = False

    def forward(self, x):
        if self.bad:
            return F.conv2d(x.double(), self.conv.weight)  # dtype mismatch at train time
        return self.conv(x)


def test_runtime_error_names_layer_and_line():
    x = torch.randn(2, 3, 8, 8)
    m = ghlc.prepare(FlipsDtype(), (x,), ghlc.GHLConfig(include=("conv",)))
    m.bad = True
    with pytest.raises(ghlc.RuntimeGHLError, match=r"layer 'conv' at .*test_errors_runtime.py:\d+"):
        m(x)
    m.bad = False
    m(x).sum().backward()  # the module still works after the error


def test_inplace_modification_after_call_is_handled():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    p = ghlc.prepare(m, (x,))
    assert p(x).sum().backward() is None
    assert p[0].weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_float64():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4),
                      nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(4, 3, 8, 8)
    r = torch.randn(4, 5)
    ref = ghlc.prepare(m.double(), (x.double(),))
    (ref(x.double()) * r.double()).sum().backward()
    gpu = ghlc.prepare(m.float().cuda(), (x.cuda(),))
    (gpu(x.cuda()) * r.cuda()).sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), gpu.named_parameters(), strict=True):
        err = (a.grad.float() - b.grad.cpu()).abs().max() / a.grad.abs().max()
        assert err <= 1e-4, n
