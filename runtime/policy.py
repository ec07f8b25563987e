"""Dispatch policy: every threshold and device choice of the runtime, in one frozen record.

The runtime reads :func:`current` wherever it picks among ways of computing the same numbers
(kernels for the correlation, blocks of output units, the in-call combine, the split timing,
fused kernels). Tests and benchmarks change it with :func:`override`, never by editing module
globals. Where several exact kernels exist, the choice is measured on the machine at hand
(``measure``; see ``measure.py``) and the thresholds here are the static fallback used when
measuring is off. Memory-for-time trades (the split timing, the in-call combine) stay policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

from ghlc.errors import ConfigError


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    if v.lower() in ("1", "on", "true", "yes"):
        return True
    if v.lower() in ("0", "off", "false", "no"):
        return False
    raise ConfigError(f"{name}={v!r}: expected on or off")


FUSED_MODES = ("auto", "on", "off")


def _env_fused() -> str:
    v = os.environ.get("GHLC_FUSED", "auto")
    if v not in FUSED_MODES:
        raise ConfigError(f"GHLC_FUSED={v!r} is not one of {', '.join(FUSED_MODES)}")
    return v


@dataclass(frozen=True)
class DispatchPolicy:
    """How the runtime computes the rule's numbers (never which numbers)."""

    # Plain calls run backprop's own autograd node plus a hook on the output (less host time);
    # False runs every call through ghlc's autograd Function (tests, A/B measurements).
    hooked_calls: bool = True
    # Output units per block wherever a weight gradient is computed a block at a time.
    block_units: int = 256
    # Static fallback of the correlation kernel choice (used when ``measure`` is off):
    # conv weights of at least this many elements are correlated a block of units at a time.
    blocked_min_numel: int = 1 << 22
    blocked_devices: tuple[str, ...] = ("cpu",)
    # ... and small-output plain convs as a forward conv (the "forward form").
    forward_form_max_reduction: int = 64 * 12 * 12
    forward_form_min_macs: int = 1 << 24
    forward_form_min_channels: int = 64
    forward_form_devices: tuple[str, ...] = ("cpu",)
    # Time the exact candidates on the real shapes at the first step and keep the fastest.
    measure: bool = dataclasses.field(default_factory=lambda: _env_flag("GHLC_MEASURE", True))
    # Repeats per candidate when measuring (after one warm-up call).
    measure_repeats: int = 3
    # Oja's per-unit sum over y*u (instead of over the weight) where u is the smaller.
    activity_sum_devices: tuple[str, ...] = ("cpu",)
    # Split timing (memory for time): large convs whose H is taken in the forward pass keep
    # H of all but their last ``split_units`` units and recompute those in backward.
    split_units: int = 512
    split_min_numel: int = 1 << 22
    split_devices: tuple[str, ...] = ("cpu",)
    # In-call combine (memory for time): a large weight used by one call alone has its
    # gradient combined inside that call's backward, block by block.
    in_call_combine_min_numel: int = 1 << 20
    in_call_combine_devices: tuple[str, ...] = ("cpu",)
    # One stacked weight-gradient call for backprop's dL/dW and the correlation, in CUDA
    # graphs captured with stack_weight_grads=True; only weights under ``stack_max_numel``.
    stack_devices: tuple[str, ...] = ("cuda",)
    stack_max_numel: int | None = None
    # Eager steps use the Triton channel softmax from outputs of this many elements.
    triton_eager_min_numel: int = 1 << 23
    # Largest product temporary of the blocked per-unit dot products.
    dot_block_numel: int = 1 << 18
    # The fused kernels (fused.py): "auto" (compiled kernels inside a CUDA graph's capture,
    # the Triton softmax there and for large eager outputs), "on" (always, also the compiled
    # ones on CPU) or "off" (eager formulas only). Default from GHLC_FUSED.
    fused: str = dataclasses.field(default_factory=_env_fused)

    def __post_init__(self) -> None:
        if self.fused not in FUSED_MODES:
            raise ConfigError(f"fused={self.fused!r} is not one of {', '.join(FUSED_MODES)}")


_STACK: list[DispatchPolicy] = []


def current() -> DispatchPolicy:
    """The policy in force."""
    if not _STACK:
        _STACK.append(DispatchPolicy())
    return _STACK[-1]


@contextlib.contextmanager
def override(**changes: object) -> Iterator[DispatchPolicy]:
    """``with policy.override(block_units=64): ...`` runs the block with those fields changed
    (unknown names are a one-line error)."""
    names = {f.name for f in dataclasses.fields(DispatchPolicy)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ConfigError(f"unknown dispatch policy field(s): {', '.join(unknown)}")
    new = dataclasses.replace(current(), **changes)  # type: ignore[arg-type]
    _STACK.append(new)
    try:
        yield new
    finally:
        del _STACK[next(i for i, p in enumerate(_STACK) if p is new)]
