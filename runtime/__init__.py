"""ghlc.runtime: the GHL rule and the machinery that applies it during training."""

from ghlc.graph import HebbianRule

from .calls import CallSpec, parse_call
from .function import PlasticCall, plastic_call
from .hebbian import combine, compete, hebbian_raw, normalise, weight_vjp
from .install import install, is_prepared, runtime_of
from .mode import GHLMode, Runtime, Site
from .state import PlasticParam

__all__ = [
    "CallSpec", "GHLMode", "HebbianRule", "PlasticCall", "PlasticParam", "Runtime", "Site",
    "combine", "compete", "hebbian_raw", "install", "is_prepared", "normalise", "parse_call",
    "plastic_call", "runtime_of", "weight_vjp",
]
