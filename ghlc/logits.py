"""The logits of a model's output, as training, evaluation and the range test take them."""

from __future__ import annotations

import torch

from .errors import GHLError


def logits(out) -> torch.Tensor:
    """The tensor itself, a tuple's first tensor, or a Hugging Face ``ModelOutput``'s
    ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(getattr(out, "logits", None), torch.Tensor):  # a Hugging Face ModelOutput
        return out.logits
    raise GHLError(f"the model must return a logits tensor, got {type(out).__name__}")
