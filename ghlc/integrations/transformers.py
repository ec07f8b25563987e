"""The Hugging Face Trainer with a ghlc-prepared model: clip the backprop gradients only.

The Trainer clips every gradient by their total norm (``max_grad_norm``, 1.0 by default),
which rescales the plastic gradients ``|H_n| * sign(G)`` (README, "Gradient clipping"). Pass
``max_grad_norm=0`` and ``callbacks=[ClipBackpropGradients(1.0)]`` instead.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..runtime.clip import clip_grad_norm_


class ClipBackpropGradients(TrainerCallback):
    """Clips the non-plastic gradients to ``max_norm`` just before each optimiser step."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = float(max_norm)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None:
            clip_grad_norm_(model, self.max_norm)
