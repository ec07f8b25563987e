"""Training on several processes: ``ghlc.distributed.ddp`` and its communication hook (the
runtime's ``distributed`` module; see there and DESIGN.md, "Many processes")."""

from .runtime.distributed import comm_hook, ddp

__all__ = ["comm_hook", "ddp"]
