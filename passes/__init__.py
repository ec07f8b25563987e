"""ghlc.passes: pure LayerGraph -> LayerGraph passes and the PassManager that runs them."""

from .broadcast_global_sign import broadcast_global_sign
from .insert_hebbian import insert_hebbian
from .invariants import check as check_invariants
from .manager import PassManager
from .select_plastic import select_plastic
from .validate import validate


def default_passes() -> list:
    """select_plastic -> insert_hebbian -> broadcast_global_sign -> validate."""
    return [select_plastic, insert_hebbian, broadcast_global_sign, validate]


__all__ = [
    "PassManager", "broadcast_global_sign", "check_invariants", "default_passes",
    "insert_hebbian", "select_plastic", "validate",
]
