"""A LightningModule that trains its model with GHL: prepare the model in ``__init__``.

Lightning runs ``backward()``, accumulation (``accumulate_grad_batches``) and the optimiser
step as usual; every plastic weight's ``.grad`` is ``|H_n| * sign(G)`` by the time
``on_before_optimizer_step`` runs. Gradient clipping goes through ``ghlc.clip_grad_norm_``
(backprop gradients only). Several processes:
``Trainer(strategy=ghlc.integrations.lightning.GHLDDPStrategy())`` (ghlc's DDP comm hook).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

import ghlc


class GHLModule(L.LightningModule):
    """Cross-entropy classifier around ``net``, prepared for GHL with ``config``."""

    def __init__(
        self,
        net: torch.nn.Module,
        example_input: torch.Tensor,
        config: ghlc.GHLConfig | None = None,
        lr: float = 0.01,
    ) -> None:
        super().__init__()
        self.net = ghlc.prepare(net, example_inputs=(example_input,), config=config)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val:  # Trainer(gradient_clip_val=...): the backprop gradients only
            ghlc.clip_grad_norm_(self, gradient_clip_val)
