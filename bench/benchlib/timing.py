"""Timing: one step or one kernel call, synchronised on CUDA, in a shuffled order per repeat."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

# A kernel-floor sample on CUDA is the mean of this many back-to-back calls: one call alone
# on an idle stream is timed as its launch gap.
CUDA_KERNEL_CALLS = 10

METHOD = {
    "cpu": "time.perf_counter around one full step; median over repeats; the kernel floor's "
    "weight-gradient kernels timed the same way, one round per repeat in the shuffled order",
    "cuda": "CUDA events around one full step (synchronised); median over repeats; the kernel "
    "floor's weight-gradient kernels timed the same way (each sample the mean of "
    f"{CUDA_KERNEL_CALLS} back-to-back calls), one round per repeat in the shuffled order",
}


class Steps(Protocol):
    def step(self, x: torch.Tensor, y: torch.Tensor) -> None: ...


def sync(device: str) -> None:
    """Wait for the device's queued work (nothing to wait for on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(r: Steps, x: torch.Tensor, y: torch.Tensor, device: str) -> float:
    """Milliseconds of one step of ``r``."""
    if device == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        r.step(x, y)
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    r.step(x, y)
    return (time.perf_counter() - t0) * 1e3


def time_call(fn: Callable[[], Any], device: str) -> float:
    """Milliseconds of one call of fn, without autograd. On CUDA the mean of
    CUDA_KERNEL_CALLS back-to-back calls between two events."""
    with torch.no_grad():
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            for _ in range(CUDA_KERNEL_CALLS):
                fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / CUDA_KERNEL_CALLS
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def run_order(items: list[str], rep: int) -> list[str]:
    """The order of one repeat: shuffled with the repeat's seed, so that no variant is always
    first or always right after the same other one (a rotation keeps the cyclic order, and a
    variant that always follows, say, the allocation-heavy naive one is timed in a different
    state from the rest)."""
    random.Random(rep).shuffle(items)
    return items


def time_layers(layers: list[dict], device: str, repeats: int) -> dict:
    """{(layer index, variant): [ms]} for every layer's ``fns``: one warm-up round (kernel
    selection), then ``repeats`` rounds, each running every layer's variants in a shuffled
    order (:func:`run_order`)."""
    times: dict = {(i, v): [] for i, lay in enumerate(layers) for v in lay["fns"]}
    for rep in range(1 + repeats):
        for i, lay in enumerate(layers):
            for v in run_order(list(lay["fns"]), rep):
                ms = time_call(lay["fns"][v], device)
                if rep:
                    times[i, v].append(ms)
    return times


def measuring() -> Any:
    """ghlc's kernel-measuring module (``ghlc.runtime.measure``), or None where this ghlc has
    none: its first step's measuring time is then reported as not available."""
    try:
        from ghlc.runtime import measure
    except ImportError:
        return None
    return measure
