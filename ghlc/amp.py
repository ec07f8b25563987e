"""Loss scaling for float16 autocast with plastic layers."""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState

from .runtime.accumulate import is_plastic
from .runtime.status import STATUS


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` for models prepared by ghlc (same arguments and use).

    A plastic weight's gradient is ``|H| * sign(G)``: its size comes from the Hebbian term,
    not from the loss, so the loss scale is not in it. torch's ``unscale_`` (which ``step``
    runs) would divide it by the scale all the same (65536 at first). Here ``unscale_`` first
    multiplies the plastic weights' gradients by the scale, so that unscaling gives them back
    as they were (exactly for power-of-two scales, the default); every other gradient is
    unscaled as usual, and an inf or NaN in any gradient still skips the step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        STATUS.scaler_in_use = True

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if (
            self._enabled
            and self._scale is not None
            and self._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY
        ):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None and is_plastic(p):
                        p.grad.mul_(self._scale.to(p.grad.device))
        super().unscale_(optimizer)
