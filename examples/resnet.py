"""ResNet-18 for 32x32 inputs (CIFAR-style), in plain PyTorch.

The usual CIFAR variant of He et al. (2016): a 3x3 stem without max-pooling, four stages of
two BasicBlocks (64, 128, 256, 512 channels; stride 2 from the second stage on), global
average pooling and a Linear classifier. Every convolution, including the 1x1 downsample
convolutions of the shortcuts, has no bias and is made plastic by ghlc's default config; the
classifier (the output layer) stays backprop.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, c_in = [], 64
        for i, n in enumerate(blocks):
            c_out = 64 * 2**i
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(c_in, c_out, stride)]
            stage += [BasicBlock(c_out, c_out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 for 3x32x32 inputs."""
    return ResNet((2, 2, 2, 2), num_classes)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(1, 3, 32, 32),)


if __name__ == "__main__":
    import ghlc
    from ghlc.cli import layer_table

    lg = ghlc.passes.PassManager(ghlc.passes.default_passes())(
        ghlc.trace(resnet18(), example_inputs())
    )
    print(layer_table(lg))
