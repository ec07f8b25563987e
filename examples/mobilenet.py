"""MobileNetV2 for 32x32 inputs (CIFAR-style), in plain PyTorch.

Sandler et al. (2018), with the usual CIFAR changes: a stride-1 stem and stride 1 in the
second stage, so 32x32 inputs end at 4x4 before the classifier. Each inverted-residual block
is a 1x1 expansion conv, a 3x3 **depthwise** conv (one filter per channel, ``groups=C``) and a
1x1 projection conv, each followed by BatchNorm (ReLU6 after the first two); blocks with equal
input and output shapes add a shortcut. Depthwise convs are in 43 % of real classifiers, and
ghlc makes them plastic like any conv: every channel is one unit of the layer's competition.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, blocks n, first stride s), as in the paper's Table 2
# with the CIFAR strides.
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn(
    c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    return layers + [nn.ReLU6()] if relu else layers


class InvertedResidual(nn.Module):
    """1x1 expand (when t > 1), 3x3 depthwise, 1x1 project; a shortcut when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = c_in * t
        layers = _conv_bn(c_in, hidden, 1) if t != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, c_out, 1, relu=False)
        self.block = nn.Sequential(*layers)
        self.shortcut = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.shortcut else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers = _conv_bn(3, 32, 3)
        c_in = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers += _conv_bn(c_in, 1280, 1)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2(num_classes: int = 10) -> nn.Module:
    """MobileNetV2 (width 1.0) for 3x32x32 inputs."""
    return MobileNetV2(num_classes)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(1, 3, 32, 32),)
