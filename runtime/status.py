"""What this process is doing now, as the runtime needs to know it: not tuning (that is
``policy.py``), but state that the rest of the runtime reads. Declared here, in one place."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Status:
    """The runtime's process-wide state."""

    # Depth of ``fused.capturing()`` scopes (the warm-up steps and capture of a CUDA graph),
    # and of those entered with ``stack=True``.
    capturing: int = 0
    stacking: int = 0
    # A ghlc.GradScaler was made (float16 autocast then does not warn about torch's).
    scaler_in_use: bool = False
    # Why compiling the fused kernels failed, once it has; likewise the Triton softmax.
    compile_broken: str | None = None
    triton_broken: str | None = None
    # The compiled fused kernels, by name (compiled once).
    compiled: dict[str, Callable] = field(default_factory=dict)
    # id(param) -> its accumulator (a weakref), for the optimiser step hook; the hook's handle.
    by_param: dict[int, weakref.ref] = field(default_factory=dict)
    step_hook: object | None = None
    # The pre-step hook that looks for clipped plastic gradients, and whether it has warned.
    pre_step_hook: object | None = None
    rescale_warned: bool = False


STATUS = Status()
