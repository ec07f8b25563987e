"""capture: the op-level program, from tiers tried in order: fx symbolic tracing, then
torch.export, else ``eager`` (no program). One of trace's two parts; record.py is the other.

fx's default leaf rule keeps only ``torch.nn`` classes, so Conv/Linear *subclasses* (timm's
``Linear``, ``StdConv2d``) would be inlined; this tracer keeps every one as a leaf.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .errors import describe

_LAYER_TYPES = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)


class LeafTracer(fx.Tracer):
    """fx tracer that keeps every Conv/Linear subclass (and torch.nn module) a leaf."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, _LAYER_TYPES) or super().is_leaf_module(m, qualname)


def capture_fx(model: torch.nn.Module) -> fx.GraphModule:
    graph = LeafTracer().trace(model)
    return fx.GraphModule(model, graph, model.__class__.__name__)


def capture_export(model: torch.nn.Module, example_inputs: tuple):
    return torch.export.export(model, tuple(example_inputs), strict=False).module()


def capture(model: torch.nn.Module, example_inputs: tuple, tiers=("fx", "export")):
    """Try each tier in order; return (tier, program or None, [(tier, why it failed)])."""
    errors: list[tuple[str, str]] = []
    for tier in tiers:
        try:
            if tier == "fx":
                return tier, capture_fx(model), errors
            if tier == "export":
                was = model.training
                try:
                    return tier, capture_export(model, example_inputs), errors
                finally:
                    model.train(was)
        except Exception as e:  # noqa: BLE001 - each tier's failure is recorded, not fatal
            errors.append((tier, describe(e)))
    return "eager", None, errors
