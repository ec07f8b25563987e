"""A small squeeze-and-excitation net for 3x32x32 inputs (Hu et al. 2018) on pre-activation
blocks, as the widely copied CIFAR SENet18 is: each block rescales its residual branch by
sigmoid(fc2(relu(fc1(pool(x))))), the two fcs being 1x1 convs with no normalisation after
them, and no normalisation follows the last block (a test fixture of ghlc train)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class SEPreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.fc1 = nn.Conv2d(cout, cout // 4, 1)
        self.fc2 = nn.Conv2d(cout // 4, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        w = F.adaptive_avg_pool2d(out, 1)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return out * w + short


class SENet(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(SEPreActBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def senet() -> nn.Module:
    return SENet()


def example_inputs():
    return (torch.randn(2, 3, 32, 32),)
