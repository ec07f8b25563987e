"""build: annotated LayerGraph -> training module; prepare: trace + passes + build.

``ghlc.build`` (formerly ``ghlc.compile``, still there as a deprecated alias) binds the
graph's plastic parameters to a runtime. Each runtime ``Site`` gets its layer's ``LayerInfo``,
its Hebbian node's rule and the global-sign node's signal, read from the graph and nowhere else.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any, cast

import torch

from .config import GHLConfig
from .errors import GHLError
from .graph import LayerGraph
from .inputs import ExampleInputs, input_spec
from .passes import PassManager, default_passes
from .passes.invariants import hebbian_complete
from .report import MostlyBackpropWarning, mostly_backprop
from .runtime import Runtime, Site, fused, install
from .trace import trace


def build_runtime(
    lg: LayerGraph, inputs: list[dict[str, Any]] | None = None, source: dict[str, Any] | None = None
) -> Runtime:
    """The Runtime of an annotated graph: one Site per plastic parameter. ``inputs`` (default:
    the spec of ``lg.example_inputs``) and ``source`` are recorded for ``ghlc.save``."""
    # (cast: in an annotated graph every plastic layer has a global-sign edge, so a signal)
    cfg, signal = lg.config, cast(str, lg.global_signal)
    sites = [
        Site(
            i,
            lg.rule(i.name),
            global_signal=signal,
            hebbian_at=cfg.hebbian_at,
            accumulation=cfg.accumulation,
            module_call=i.module_call and cfg.interception == "auto",
        )
        for i in lg.plastic()
    ]
    return Runtime(
        sites,
        graph=lg.evolve(model=None, program=None, example_inputs=(), example_kwargs={}),
        inputs=input_spec(lg.example_inputs, lg.example_kwargs) if inputs is None else inputs,
        source=source,
    )


def build(lg: LayerGraph, inplace: bool = False) -> torch.nn.Module:
    """Return the training module: the traced model (a copy unless ``inplace``), whose plastic
    layers get ``|H|*sign(G)`` gradients in training mode. Parameter names are unchanged;
    eval-mode forwards are the original model's, untouched."""
    return build_module(lg, inplace=inplace)


def build_module(
    lg: LayerGraph,
    *,
    inplace: bool,
    inputs: list[dict[str, Any]] | None = None,
    source: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """:func:`build`, recording ``inputs`` and ``source`` for ``ghlc.save`` (the artifact
    loader and ``ghlc convert`` pass them)."""
    if lg.model is None:
        raise GHLError("this LayerGraph holds no model to build")
    problems = hebbian_complete(lg)
    if problems:
        raise GHLError("run the default passes before build: " + "; ".join(problems))
    fused.check_mode()  # a bad GHLC_FUSED fails here, not at the first step
    model = lg.model if inplace else copy.deepcopy(lg.model)
    return install(model, build_runtime(lg, inputs, source))


def compile(lg: LayerGraph, inplace: bool = False) -> torch.nn.Module:  # noqa: A001
    """Deprecated alias of :func:`build`."""
    warnings.warn(
        "ghlc.compile is deprecated; use ghlc.build (same arguments)",
        DeprecationWarning,
        stacklevel=2,
    )
    return build(lg, inplace=inplace)


def trace_and_build(
    model: torch.nn.Module,
    example_inputs: ExampleInputs,
    config: GHLConfig | None = None,
    inplace: bool = False,
    source: dict[str, Any] | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[torch.nn.Module, LayerGraph]:
    """trace + default passes + build: what ``ghlc.prepare`` and ``ghlc convert`` both run.
    Returns the training module and its annotated graph."""
    lg = trace(model, example_inputs, config=config or GHLConfig(), example_kwargs=example_kwargs)
    lg = PassManager(default_passes())(lg)
    if msg := mostly_backprop(lg, model):
        warnings.warn(msg, MostlyBackpropWarning, stacklevel=3)
    return build_module(lg, inplace=inplace, source=source), lg


def prepare(
    model: torch.nn.Module,
    example_inputs: ExampleInputs,
    config: GHLConfig | None = None,
    inplace: bool = False,
    example_kwargs: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """trace + default passes + build, in one call. ``example_inputs``: a tensor, a
    sequence of positional inputs, or a dict of keyword inputs; ``example_kwargs`` adds
    keyword inputs to positional ones."""
    return trace_and_build(model, example_inputs, config, inplace, example_kwargs=example_kwargs)[0]
