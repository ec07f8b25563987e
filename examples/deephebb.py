"""DeepHebb: the paper's deep CIFAR-10 network, in plain PyTorch.

This is the SoftHebb "deep" convolutional net (Journé et al., 2022, "Hebbian deep learning
without feedback") that GHL ("Hebbian Learning with Global Direction", arXiv 2601.21367)
trains with Global-guided Hebbian Learning. Where the reference code has a Hebbian conv layer
this file has a plain ``nn.Conv2d(bias=False)``; ghlc makes those plastic.

    block1  BN(3, affine=False)   -> conv 5x5, 96 ch, pad 2   -> Triangle(0.7) -> MaxPool(4, 2, 1)
    block2  BN(96, affine=False)  -> conv 3x3, 384 ch, pad 1  -> Triangle(1.4) -> MaxPool(4, 2, 1)
    block3  BN(384, affine=False) -> conv 3x3, 1536 ch, pad 1 -> Triangle(1.0) -> AvgPool(2, 2)
    head    Flatten -> Dropout(0.5) -> Linear(1536*4*4 = 24576, 10)

Triangle(x) = relu(x - mean over channels)^power (the channel mean is treated as a constant,
as in the reference code).

Train it with the paper's settings::

    cfg = ghlc.GHLConfig(temperature=TEMPERATURES)
    m = ghlc.prepare(deephebb(), example_inputs(), cfg)
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# The paper's training settings (CIFAR-10).
TEMPERATURES = {"block1.conv": 1.0, "block2.conv": 0.65, "block3.conv": 0.25}
LR_CONV = 1e-2  # plastic (GHL) convolution weights
WD_CONV = 5e-2
LR = 5e-3  # everything else, no weight decay
WD = 0.0
BATCH_SIZE = 64
EPOCHS = 100
SCHEDULE = "cosine"  # over all steps
OPTIMIZER = "sgd"  # plain SGD, no momentum
MOMENTUM = 0.0
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)
NUM_CLASSES = 10


class Triangle(nn.Module):
    """relu(x - mean over channels) ** power."""

    def __init__(self, power: float = 1.0) -> None:
        super().__init__()
        self.power = power

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.detach().mean(dim=1, keepdim=True)
        return torch.relu(x).pow(self.power)

    def extra_repr(self) -> str:
        return f"power={self.power}"


def _block(c_in: int, c_out: int, kernel: int, power: float, pool: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            bn=nn.BatchNorm2d(c_in, affine=False),
            conv=nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
            act=Triangle(power),
            pool=pool,
        )
    )


def deephebb(num_classes: int = NUM_CLASSES) -> nn.Module:
    """The DeepHebb network for 3x32x32 inputs."""
    return nn.Sequential(
        OrderedDict(
            block1=_block(3, 96, 5, 0.7, nn.MaxPool2d(4, 2, padding=1)),
            block2=_block(96, 384, 3, 1.4, nn.MaxPool2d(4, 2, padding=1)),
            block3=_block(384, 1536, 3, 1.0, nn.AvgPool2d(2, 2)),
            head=nn.Sequential(
                OrderedDict(
                    flatten=nn.Flatten(),
                    dropout=nn.Dropout(0.5),
                    fc=nn.Linear(1536 * 4 * 4, num_classes),
                )
            ),
        )
    )


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(1, 3, 32, 32),)


if __name__ == "__main__":
    import ghlc
    from ghlc.cli import layer_table

    lg = ghlc.trace(deephebb(), example_inputs(), config=ghlc.GHLConfig(temperature=TEMPERATURES))
    print(layer_table(ghlc.passes.PassManager(ghlc.passes.default_passes())(lg)))
