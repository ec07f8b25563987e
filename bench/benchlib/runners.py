"""A variant of a model ready to take SGD steps: eager, compiled or in one CUDA graph."""

from __future__ import annotations

import contextlib
import copy
import gc
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ghlc
from ghlc.runtime import fused, policy

from .naive_ghl import NaiveGHL
from .variants import AMP_DTYPE, Variant, variant

LR = 1e-3
GRAPH_WARMUP = 3


class Runner:
    """One variant of one model, ready to take SGD steps."""

    capturing = False

    def __init__(
        self, base: nn.Module, temp: float | dict, name: str | Variant, x2: torch.Tensor
    ) -> None:
        v = name if isinstance(name, Variant) else variant(name)
        self.variant = v
        model = copy.deepcopy(base).train()
        self.naive: NaiveGHL | None = None
        self.fused = v.fused or fused.mode()
        if v.method == "naive":
            self.naive = NaiveGHL(model, temp)
        elif v.method == "ghlc":
            model = ghlc.prepare(model, (x2,), ghlc.GHLConfig(temperature=temp, **v.config))
        self.model = torch.compile(model.train()) if v.compiled else model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The forward and the loss (under autocast for the *_amp* variants)."""
        with torch.autocast(x.device.type, dtype=AMP_DTYPE, enabled=self.variant.amp):
            return F.cross_entropy(self.model(x), y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with settings(self):
            self.opt.zero_grad()
            loss = self.loss(x, y)
            loss.backward()
            if self.naive is not None:
                self.naive.apply()
            self.opt.step()


@contextlib.contextmanager
def settings(r: Runner | GraphRunner) -> Iterator[None]:
    """A runner's ghlc settings for the duration (variants run interleaved in one process):
    its compiled-kernel mode, its dispatch-policy overrides and, while a graph is warmed up
    and captured, fused.capturing() as ghlc.cuda_graph_step does (with stack_weight_grads for
    the stacked variants)."""
    with (
        policy.override(fused=r.fused, **r.variant.policy),
        fused.capturing(r.variant.stack) if r.capturing else contextlib.nullcontext(),
    ):
        yield


class GraphRunner:
    """A Runner whose whole step is captured in one CUDA graph (CUDA only).

    __init__ takes the warm-up steps on a side stream; capture() records the graph (separate,
    so that the memory probe can reset the peak between the two); step() copies the batch
    into the static tensors and replays."""

    capturing = True

    def __init__(
        self, base: nn.Module, temp: float | dict, name: str, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        self.variant = variant(name)
        if not self.variant.graph:
            raise ValueError(f"{name} is not a CUDA-graph variant")
        r = Runner(base, temp, self.variant, x[:2])  # its eager part: the model and optimiser
        self.model, self.opt, self.fused, self.loss_fn = r.model, r.opt, r.fused, r.loss
        self.static_x, self.static_y = x.clone(), y.clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), settings(self):
            for _ in range(GRAPH_WARMUP):
                self.opt.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.static_x, self.static_y)
                loss.backward()
                self.opt.step()
        torch.cuda.current_stream().wait_stream(s)

    def capture(self) -> None:
        self.opt.zero_grad(set_to_none=True)  # grads are allocated in the graph's pool
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g), settings(self):
            self.loss = self.loss_fn(self.static_x, self.static_y)
            self.loss.backward()
            self.opt.step()
        self.graph = g

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        assert self.graph is not None, "capture() first"
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()


def make_runner(
    base: nn.Module, temp: float | dict, name: str, x: torch.Tensor, y: torch.Tensor
) -> Runner | GraphRunner:
    """A ready Runner, or for a *_graph variant a warmed-up and captured GraphRunner."""
    if variant(name).graph:
        r = GraphRunner(base, temp, name, x, y)
        r.capture()
        return r
    return Runner(base, temp, name, x[:2])


class Stepper:
    """A prepared (or plain) model taking SGD steps on one fixed batch, with dispatch-policy
    overrides around each step (the small-model scripts: overhead.py, mlp.py)."""

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.model, self.x, self.y = model.train(), x, y
        self.overrides = dict(overrides or {})
        self.opt = torch.optim.SGD(model.parameters(), lr=LR)

    def __call__(self) -> None:
        with policy.override(**self.overrides):
            self.opt.zero_grad()
            F.cross_entropy(self.model(self.x), self.y).backward()
            self.opt.step()


def warn_dropped(model_name: str, name: str, err: BaseException) -> None:
    msg = str(err).strip().splitlines()
    first = msg[0] if msg else ""
    print(
        f"warning: {model_name}/{name}: CUDA graph capture failed, variant dropped "
        f"({type(err).__name__}: {first})",
        file=sys.stderr,
    )


def cuda_cleanup() -> None:
    gc.collect()
    try:
        torch.cuda.synchronize()
    except RuntimeError:
        pass
    torch.cuda.empty_cache()


def first_step(
    make: Any, x: torch.Tensor, y: torch.Tensor, device: str
) -> tuple[Runner | GraphRunner, float | None]:
    """(runner, seconds ghlc spent measuring kernels) for ``make()``'s runner and its first
    step (a graph runner measures in its warm-up steps). The seconds are None where this
    ghlc has no kernel measuring."""
    from .timing import measuring, sync

    m = measuring()
    if m is not None:
        m.reset()
    r = make()
    if not isinstance(r, GraphRunner):
        r.step(x, y)
    sync(device)
    return r, (None if m is None else float(m.stats().seconds))
