"""ghlc.runtime: the GHL rule and the machinery that applies it during training."""

from ghlc.graph import HebbianRule

from .accumulate import PlasticParam
from .calls import CallSpec, parse_call
from .correlation import weight_vjp
from .function import PlasticCall, plastic_call
from .install import install
from .mode import GHLMode, Runtime, Site, is_prepared, runtime_of
from .rule import combine, compete, hebbian_raw, normalise

__all__ = [
    "CallSpec",
    "GHLMode",
    "HebbianRule",
    "PlasticCall",
    "PlasticParam",
    "Runtime",
    "Site",
    "combine",
    "compete",
    "hebbian_raw",
    "install",
    "is_prepared",
    "normalise",
    "parse_call",
    "plastic_call",
    "runtime_of",
    "weight_vjp",
]
