"""FastHebb: the paper's second (faster, wider-head) CIFAR-10 network, in plain PyTorch.

The six-layer Hebbian CNN of the FastHebb line of work (Lagani et al., "Scalable bio-inspired
training of deep neural networks with FastHebb"), as used by the GHL paper's demo code
("Hebbian Learning with Global Direction", arXiv 2601.21367): four Hebbian convolutions, each
followed by ReLU, optional max-pooling and a non-affine BatchNorm, then a 4096-unit fully
connected layer and the classifier. Where the reference has a Hebbian conv layer this file
has a plain ``nn.Conv2d(bias=False)``; ghlc makes those plastic, the Linear layers train with
backprop.

    block1  conv 5x5, 96 ch   -> ReLU -> MaxPool(2, 2) -> BN(96, affine=False)    32 -> 28 -> 14
    block2  conv 3x3, 128 ch  -> ReLU                  -> BN(128, affine=False)   14 -> 12
    block3  conv 3x3, 192 ch  -> ReLU -> MaxPool(2, 2) -> BN(192, affine=False)   12 -> 10 -> 5
    block4  conv 3x3, 256 ch  -> ReLU                  -> BN(256, affine=False)    5 -> 3
    fc      Flatten -> Linear(2304, 4096) -> ReLU -> BN1d(4096) -> Dropout(0.5)
    head    Linear(4096, 10)

Train it with the paper's settings::

    m = ghlc.prepare(fasthebb(), example_inputs(), ghlc.GHLConfig(temperature=TEMPERATURES))
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# The paper's training settings (CIFAR-10).
TEMPERATURE = 1.0
TEMPERATURES = {f"block{i}.conv": TEMPERATURE for i in range(1, 5)}
LR_CONV = 5e-2  # plastic (GHL) convolution weights
WD_CONV = 1e-2
LR = 1e-4  # everything else, no weight decay
WD = 0.0
BATCH_SIZE = 64
EPOCHS = 100
SCHEDULE = "cosine"  # over all steps
OPTIMIZER = "sgd"  # plain SGD, no momentum
MOMENTUM = 0.0
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)
NUM_CLASSES = 10


def _block(c_in: int, c_out: int, kernel: int, pool: bool) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(c_in, c_out, kernel, bias=False),
        act=nn.ReLU(),
    )
    if pool:
        layers["pool"] = nn.MaxPool2d(2, 2)
    layers["bn"] = nn.BatchNorm2d(c_out, affine=False)
    return nn.Sequential(layers)


def fasthebb(num_classes: int = NUM_CLASSES) -> nn.Module:
    """The FastHebb network for 3x32x32 inputs."""
    return nn.Sequential(
        OrderedDict(
            block1=_block(3, 96, 5, pool=True),
            block2=_block(96, 128, 3, pool=False),
            block3=_block(128, 192, 3, pool=True),
            block4=_block(192, 256, 3, pool=False),
            fc=nn.Sequential(
                OrderedDict(
                    flatten=nn.Flatten(),
                    linear=nn.Linear(256 * 3 * 3, 4096),
                    act=nn.ReLU(),
                    bn=nn.BatchNorm1d(4096),
                    dropout=nn.Dropout(0.5),
                )
            ),
            head=nn.Linear(4096, num_classes),
        )
    )


def example_inputs() -> tuple[torch.Tensor]:
    # Batch 2, not 1: the model is traced in training mode, where BatchNorm1d needs more
    # than one value per channel.
    return (torch.randn(2, 3, 32, 32),)


if __name__ == "__main__":
    import ghlc
    from ghlc.cli import layer_table

    lg = ghlc.trace(fasthebb(), example_inputs(), config=ghlc.GHLConfig(temperature=TEMPERATURES))
    print(layer_table(ghlc.passes.PassManager(ghlc.passes.default_passes())(lg)))
