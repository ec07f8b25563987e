"""ghlc.passes: pure LayerGraph -> PassResult passes and the PassManager that runs them."""

from .base import PassBase, PassResult
from .broadcast_global_sign import broadcast_global_sign
from .insert_hebbian import insert_hebbian
from .invariants import check as check_invariants
from .manager import PassManager
from .select_plastic import select_plastic
from .set_global_signal import set_global_signal
from .validate import validate


def default_passes() -> list:
    """select_plastic -> insert_hebbian -> broadcast_global_sign -> validate."""
    return [select_plastic, insert_hebbian, broadcast_global_sign, validate]


__all__ = [
    "PassBase",
    "PassManager",
    "PassResult",
    "broadcast_global_sign",
    "check_invariants",
    "default_passes",
    "insert_hebbian",
    "select_plastic",
    "set_global_signal",
    "validate",
]
