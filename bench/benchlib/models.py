"""The benchmark models (the repository's examples and a ResNet-50) and their random batch."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("deephebb", "fasthebb", "resnet18")
EXTRA_MODELS = ("mobilenetv2",)  # on request (--models): depthwise convs, not in the targets
# Set by a script's --channels-last: every model and 4-D input in channels-last format.
CHANNELS_LAST = False


def _example(name: str) -> ModuleType:
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(name: str) -> tuple[nn.Module, float | dict]:
    """(fresh model, temperature setting) for a model name (channels-last with
    ``--channels-last``)."""
    m, temp = _build(name)
    return (m.to(memory_format=torch.channels_last) if CHANNELS_LAST else m), temp


def _build(name: str) -> tuple[nn.Module, float | dict]:
    if name == "deephebb":
        m = _example("deephebb")
        return m.deephebb(), dict(m.TEMPERATURES)
    if name == "fasthebb":
        m = _example("fasthebb")
        return m.fasthebb(), dict(m.TEMPERATURES)
    if name == "resnet18":
        return _example("resnet").resnet18(), 1.0
    if name == "mobilenetv2":
        return _example("mobilenet").mobilenetv2(), 1.0
    if name == "resnet50":
        return resnet50(), 1.0
    raise SystemExit(
        f"error: unknown model {name!r} (choose from {', '.join(MODELS + EXTRA_MODELS)})"
    )


def data(batch: int, size: int, classes: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded batch of random (batch, 3, size, size) inputs and labels."""
    g = torch.Generator().manual_seed(1)
    x = layout(torch.randn(batch, 3, size, size, generator=g))
    y = torch.randint(0, classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the run's memory format: channels-last for 4-D tensors with
    ``--channels-last``, else as it is."""
    return t.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST and t.dim() == 4 else t


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50 (torchvision layout: stride on the 3x3 conv) for 224x224 inputs."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    c_in = 64
    for i, n in enumerate((3, 4, 6, 3)):
        width = 64 * 2**i
        for j in range(n):
            layers.append(Bottleneck(c_in, width, 2 if (j == 0 and i > 0) else 1))
            c_in = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)
