"""PyTorch Lightning on several processes: ``DDPStrategy`` with ghlc's comm hook on any device.

Lightning registers a ``ddp_comm_hook`` only on CUDA; on CPU (gloo) it skips it, and ghlc then
refuses the first backward (torch's DDP without the hook is not the rule). ``GHLDDPStrategy``
registers :func:`ghlc.distributed.comm_hook` on every device.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from ..runtime.distributed import comm_hook


class GHLDDPStrategy(DDPStrategy):
    """``DDPStrategy(ddp_comm_hook=ghlc.distributed.comm_hook)``, the hook registered on CPU
    too. Any other ``DDPStrategy`` keyword argument passes through."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("ddp_comm_hook", comm_hook)
        super().__init__(**kwargs)

    def _register_ddp_hooks(self) -> None:
        if self.root_device.type == "cuda":
            super()._register_ddp_hooks()
        elif self._ddp_comm_hook is not None:
            model = self.model
            assert isinstance(model, DistributedDataParallel)  # (wrapped by configure_ddp)
            model.register_comm_hook(self._ddp_comm_state, self._ddp_comm_hook)
