"""GHLConfig: every knob of the rule and of layer selection, validated once."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

COMPETITIONS = ("softmax", "hard", "none")
SCOPES = ("layer", "group")
LOCAL_RULES = ("oja", "hebb")
NORMALISATIONS = ("layer", "unit")
GLOBAL_SIGNALS = ("grad_sign", "none")
HEBBIAN_AT = ("auto", "fast", "forward", "backward", "recompute")
ACCUMULATION = ("auto", "always")
INTERCEPTIONS = ("auto", "mode")
SAMPLE_OVER = ("batch", "positions")
PRECISIONS = ("full", "autocast")
LAYER_KINDS = ("conv", "linear")


def _tuple(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    return tuple(v)


@dataclass(frozen=True)
class GHLConfig:
    """Settings of Global-guided Hebbian Learning for one model.

    ``temperature`` is a float or a mapping from module path (glob allowed) to float;
    ``plastic`` names layer kinds made plastic ("conv", "linear"); ``include``/``exclude``
    are glob patterns on module paths (or parameter names) applied after ``plastic``.
    ``sample_fraction`` < 1 estimates the Hebbian term from part of the batch: the fast
    approximate mode; 1.0 is exact. ``sample_over="batch"`` (default) takes a random
    contiguous block of that fraction of the samples (rows of a linear layer's flattened
    input); ``"positions"`` takes, in every sample, a grid of output positions from a random
    offset: 1/round(1/fraction) of them (0.25 in 2-D: every 2nd row and column; fractions
    above 2/3 keep them all), computed as the weight gradient of the equivalent strided conv
    (linear layers: every n-th row; transposed convs: the batch block). ``hebbian_at`` says
    when H is computed:
    ``fast`` (per call, whichever of ``forward`` and ``backward`` keeps less memory alive),
    ``forward``, ``backward``, ``recompute``: as ``fast``, but a conv weight of 4 M+ elements
    whose H ``fast`` keeps from the forward pass keeps it for all but its last 512 output
    units, whose output and H are recomputed in the backward pass (less memory, one more
    forward conv over those units), or ``auto`` (default): ``recompute`` on CPU, ``fast``
    elsewhere. The result is the same for all.
    ``accumulation``: ``auto`` keeps the raw Hebbian and gradient totals
    (two weight-sized buffers per plastic layer) only while training accumulates several
    backward passes per optimiser step (seen at the first step); ``always`` keeps them always.
    ``normalisation``: H is divided by its max magnitude over the whole ``layer`` (the
    paper's rule, default) or over each output ``unit`` (every unit's largest step is the
    learning rate; see docs/ACCURACY.md for why this matters).
    ``interception``: ``auto`` (default) replaces the ``forward`` of stock Conv/Linear
    modules when the trace saw every plastic weight used only by its own module, so no
    function mode runs (less host time per step); ``mode`` routes every torch call of a
    training forward through a function mode, which also finds plastic weights used in ways
    the trace did not see (say a branch first taken later in training).
    ``hebbian_precision`` matters only under ``torch.autocast``, where a plastic call runs in
    autocast's lower precision like the plain op: ``full`` (default) computes H from the
    call's operands upcast to the weight's dtype (the rule's numbers to that dtype's
    rounding); ``autocast`` computes the competition and the correlation sum y.x in
    autocast's dtype, as autocast computes backprop's own weight gradient, and Oja's decay
    in the weight's: faster (the Hebbian kernels at the lower precision's rate, no upcast
    copies), H to about the lower precision (see docs/PERFORMANCE.md, "Mixed precision").
    """

    temperature: float | Mapping[str, float] = 1.0
    plastic: tuple[str, ...] = ("conv",)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    competition: str = "softmax"
    competition_scope: str = "layer"
    local_rule: str = "oja"
    global_signal: str = "grad_sign"
    default_temperature: float = field(default=1.0, repr=False)
    sample_fraction: float = 1.0
    sample_over: str = "batch"
    hebbian_at: str = "auto"
    accumulation: str = "auto"
    normalisation: str = "layer"
    interception: str = "auto"
    hebbian_precision: str = "full"

    def __post_init__(self) -> None:
        object.__setattr__(self, "plastic", _tuple(self.plastic))
        object.__setattr__(self, "include", _tuple(self.include))
        object.__setattr__(self, "exclude", _tuple(self.exclude))
        for name, allowed in (
            ("competition", COMPETITIONS),
            ("competition_scope", SCOPES),
            ("local_rule", LOCAL_RULES),
            ("global_signal", GLOBAL_SIGNALS),
            ("hebbian_at", HEBBIAN_AT),
            ("accumulation", ACCUMULATION),
            ("normalisation", NORMALISATIONS),
            ("interception", INTERCEPTIONS),
            ("sample_over", SAMPLE_OVER),
            ("hebbian_precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        for kind in self.plastic:
            if kind not in LAYER_KINDS:
                raise ConfigError(f"plastic kind {kind!r} is not one of {', '.join(LAYER_KINDS)}")
        temps = (
            self.temperature.values()
            if isinstance(self.temperature, Mapping)
            else [self.temperature]
        )
        for t in temps:
            if not isinstance(t, (int, float)) or not t > 0:
                raise ConfigError(f"temperature {t!r} must be a positive number")
        if isinstance(self.temperature, Mapping):
            object.__setattr__(self, "temperature", dict(self.temperature))
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ConfigError(f"sample_fraction={self.sample_fraction} must be in (0, 1]")

    def __hash__(self) -> int:  # temperature may be a dict
        return hash(repr(self))

    def temperature_for(self, module_path: str) -> float:
        """The temperature of one layer: exact key, then first matching glob, then default."""
        t = self.temperature
        if not isinstance(t, Mapping):
            return float(t)
        if module_path in t:
            return float(t[module_path])
        for pattern, value in t.items():
            if fnmatch.fnmatchcase(module_path, pattern):
                return float(value)
        return float(self.default_temperature)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GHLConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        return cls(**dict(d))
