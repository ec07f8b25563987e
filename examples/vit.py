"""A small Vision Transformer from Hugging Face ``transformers``, built from a config.

Nothing is downloaded: the model is made from a ``ViTConfig`` with random weights (16x16
images in 4x4 patches, 4 blocks of width 64, 10 classes; about 0.2 M weights), so it converts
and trains anywhere ``transformers`` is installed (``pip install "ghlc[hf]"``).

Under ghlc's default config only the patch embedding (a conv) is plastic, and ``ghlc
convert`` warns that most weights are in Linear layers; ``vit.toml`` beside this file makes
the Linear layers plastic too::

    ghlc convert examples/vit.py --config examples/vit.toml -o vit.ghl
    ghlc train vit.ghl --data digits --epochs 1 --out runs/vit

The model returns a ``ModelOutput``; ``ghlc train`` trains on its ``.logits``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification


def vit(num_classes: int = 10) -> nn.Module:
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=num_classes,
    )
    return ViTForImageClassification(config)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 16, 16),)
