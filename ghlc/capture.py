"""capture: the op-level program, from tiers tried in order: fx symbolic tracing, then
torch.export, else ``eager`` (no program). One of trace's two parts; record.py is the other.

fx's default leaf rule keeps only ``torch.nn`` classes, so Conv/Linear *subclasses* (timm's
``Linear``, ``StdConv2d``) would be inlined; this tracer keeps every one as a leaf.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

_LAYER_TYPES = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)


class LeafTracer(fx.Tracer):
    """fx tracer that keeps every Conv/Linear subclass (and torch.nn module) a leaf."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, _LAYER_TYPES) or super().is_leaf_module(m, qualname)


def capture_fx(model: torch.nn.Module) -> fx.GraphModule:
    graph = LeafTracer().trace(model)
    return fx.GraphModule(model, graph, model.__class__.__name__)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence what torch itself prints while a tier is tried: torch.export prints the
    partial graph of a failed export to stderr and logs warnings and errors, although a
    failed tier is no failure of ghlc's (the next tier takes over)."""
    loggers = [logging.getLogger("torch")] + [
        logging.getLogger(n)
        for n in list(logging.root.manager.loggerDict)
        if n.startswith("torch.")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def capture_export(
    model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any] | None = None
):
    with _quiet_torch():
        ep = torch.export.export(model, tuple(example_inputs), example_kwargs, strict=False)
    return ep.module()


def _reason(e: BaseException) -> str:
    """``Type: first line`` of why a tier did not apply, whole (not cut off)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__


def capture(
    model: torch.nn.Module,
    example_inputs: tuple,
    tiers=("fx", "export"),
    example_kwargs: dict[str, Any] | None = None,
):
    """Try each tier in order; return (tier, program or None, [(tier, why it did not
    apply)])."""
    errors: list[tuple[str, str]] = []
    for tier in tiers:
        try:
            if tier == "fx":
                return tier, capture_fx(model), errors
            if tier == "export":
                was = model.training
                try:
                    return tier, capture_export(model, example_inputs, example_kwargs), errors
                finally:
                    model.train(was)
        except Exception as e:  # noqa: BLE001 - each tier's failure is recorded, not fatal
            errors.append((tier, _reason(e)))
    return "eager", None, errors
