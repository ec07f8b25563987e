"""compile: annotated LayerGraph -> training module; prepare: trace + passes + compile."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from .artifact import input_spec
from .config import GHLConfig
from .errors import GHLError
from .graph import LayerGraph
from .passes import PassManager, default_passes
from .passes.invariants import hebbian_complete
from .runtime import Runtime, Site, fused, install
from .trace import trace


def build_runtime(lg: LayerGraph) -> Runtime:
    return Runtime([
        Site(i.name, i.module, lg.rule(i.name), i.weight_use, i.copy_out, i.out_saved,
             lg.config.hebbian_at, lg.config.accumulation,
             i.module_call and lg.config.interception == "auto")
        for i in lg.plastic()
    ])


def compile(lg: LayerGraph, inplace: bool = False) -> torch.nn.Module:  # noqa: A001
    """Return the training module: the traced model (a copy unless ``inplace``), whose plastic
    layers get ``|H|*sign(G)`` gradients in training mode. Parameter names are unchanged;
    eval-mode forwards are the original model's, untouched."""
    if lg.model is None:
        raise GHLError("this LayerGraph holds no model to compile")
    problems = hebbian_complete(lg)
    if problems:
        raise GHLError("run the default passes before compile: " + "; ".join(problems))
    return compile_graph(lg, inplace)


def compile_graph(lg: LayerGraph, inplace: bool) -> torch.nn.Module:
    fused.check_mode()  # a bad GHLC_FUSED fails here, not at the first step
    model = lg.model if inplace else copy.deepcopy(lg.model)
    rt = build_runtime(lg)
    rt.graph = lg.evolve(model=None, program=None, example_inputs=())
    rt.inputs = input_spec(lg.example_inputs)
    rt.source = {}
    return install(model, rt)


def prepare(
    model: torch.nn.Module,
    example_inputs: Sequence | torch.Tensor,
    config: GHLConfig | None = None,
    inplace: bool = False,
) -> torch.nn.Module:
    """trace + default passes + compile, in one call."""
    lg = trace(model, example_inputs, config=config or GHLConfig())
    lg = PassManager(default_passes())(lg)
    return compile(lg, inplace=inplace)
