"""trace: model + example inputs -> LayerGraph, the whole front end (the one seam).

Three words, one meaning each: *trace* is this whole step; *record* (record.py) is the eager
run that sees every conv/linear call and its weight, which gives the layers, shapes and data
flow; *capture* (capture.py) is the op-level program, from the first tier that works:
fx, then torch.export, else eager.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import torch

from .capture import capture
from .config import GHLConfig
from .errors import TraceError, first_line
from .graph import INPUT, OUTPUT, LayerGraph, LayerInfo
from .inputs import ExampleInputs, split_inputs
from .record import record
from .runtime.install import owns_its_calls
from .runtime.mode import is_prepared


def _check_not_prepared(model: torch.nn.Module) -> None:
    """A module ghlc already prepared holds plastic calls: tracing it again would stack a
    second runtime on the first (two Hebbian terms, wrong gradients)."""
    for name, m in model.named_modules():
        if is_prepared(m):
            where = "the model" if not name else f"its submodule {name!r}"
            raise TraceError(
                f"{where} is already prepared by ghlc: trace or prepare the "
                "original model (ghlc.load rebuilds a saved one)"
            )


def _materialise_lazy(model: torch.nn.Module, inputs: tuple, kwargs: dict[str, Any]) -> None:
    """Lazy modules (``nn.LazyLinear`` ...) get their shapes from a first forward: run one on
    the example inputs, in eval mode without grad (no BatchNorm update, no dropout draw)."""
    if not any(torch.nn.parameter.is_lazy(p) for p in model.parameters()):
        return
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    except Exception as e:
        raise TraceError(
            f"the model fails on the example inputs (run to initialise its lazy "
            f"modules): {type(e).__name__}: {first_line(e)}"
        ) from None
    finally:
        model.train(was)


def _warn_unmapped(rec) -> None:
    """One warning for conv/linear calls whose trainable weight is no parameter (say a
    ``torch.nn.utils.parametrize``d weight): they cannot be made plastic. Calls with fixed
    filters (buffers, constants: a blur pool's kernel) are not plastic by design and pass."""
    where = sorted({w for w, _, trainable in rec.skipped if trainable})
    if where:
        names = ", ".join(repr(w) for w in where[:3]) + (", ..." if len(where) > 3 else "")
        warnings.warn(
            f"ghlc: conv/linear calls in {len(where)} module(s) ({names}) use a trainable "
            "weight that is not a parameter (e.g. torch.nn.utils.parametrize): ghlc cannot "
            "map it to a parameter, so these calls stay plain backprop",
            stacklevel=3,
        )


def trace(
    model: torch.nn.Module,
    example_inputs: ExampleInputs,
    config: GHLConfig | None = None,
    tiers: Sequence[str] = ("fx", "export"),
    example_kwargs: Mapping[str, Any] | None = None,
) -> LayerGraph:
    """Trace ``model`` into a LayerGraph.

    ``example_inputs``: a tensor, a sequence of positional inputs, or a dict of keyword
    inputs (``{"input_ids": ..., "attention_mask": ...}``); ``example_kwargs`` adds keyword
    inputs to positional ones.

    Layers, shapes and layer-to-layer data flow come from an instrumented training-mode run
    keyed by parameter identity (exact for every tier). The op-level program comes from the
    first tier that succeeds: fx symbolic tracing, then torch.export; ``eager`` when neither
    does. The graph records which tier was used and why the earlier ones failed.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    dynamo = sys.modules.get("torch._dynamo")  # (a compiled module implies it was imported)
    if dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule):
        raise TraceError(
            "got a torch.compile'd module: prepare the model first, then compile "
            "it: torch.compile(ghlc.prepare(model, ...))"
        )
    _check_not_prepared(model)
    inputs, kwargs = split_inputs(example_inputs, example_kwargs)
    with torch.random.fork_rng():  # tracing never shifts the user's random streams
        _materialise_lazy(model, inputs, kwargs)
        rec = record(model, inputs, kwargs)
        tier, program, errors = capture(model, inputs, tuple(tiers), kwargs)

    _warn_unmapped(rec)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules(remove_duplicate=False))
    g: nx.DiGraph[str] = nx.DiGraph()
    g.add_node(INPUT, type="io")
    g.add_node(OUTPUT, type="io")
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    in_owner: dict[str, bool] = {}
    for i, c in enumerate(rec.calls):
        counts[c.param] = counts.get(c.param, 0) + 1
        first.setdefault(c.param, i)
        own = c.weight_use == "direct" and c.module_stack[-1:] == (c.param.rpartition(".")[0],)
        in_owner[c.param] = in_owner.get(c.param, True) and own
    outputs = rec.output_layers()
    for order, (name, idx) in enumerate(sorted(first.items(), key=lambda kv: kv[1])):
        c = rec.calls[idx]
        mpath = name.rpartition(".")[0]
        mod = modules.get(mpath)
        g.add_node(
            name,
            type="layer",
            info=LayerInfo(
                name=name,
                module=mpath,
                module_type=type(mod).__name__ if mod is not None else "?",
                kind=c.kind,
                weight_shape=tuple(params[name].shape),
                in_shape=c.in_shape,
                out_shape=c.out_shape,
                groups=c.groups,
                calls=counts[name],
                weight_use=c.weight_use,
                copy_out=name in rec.mutated,
                out_saved=rec.out_saved(name),
                is_output=name in outputs,
                module_call=in_owner[name] and mod is not None and owns_its_calls(mod),
                requires_grad=params[name].requires_grad,
                order=order,
            ),
        )
    for u, v in rec.edges:
        if u in g and v in g:
            g.add_edge(u, v, type="data")
    return LayerGraph(
        g=g,
        model=model,
        example_inputs=inputs,
        example_kwargs=kwargs,
        config=config or GHLConfig(),
        capture=tier,
        capture_errors=tuple(errors),
        program=program,
    )
