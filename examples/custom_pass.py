"""A user-written pass: a per-depth temperature schedule.

A pass is any function ``LayerGraph -> LayerGraph`` (the built-in ones return a
``PassResult(graph, modified)``, see ``passes/base.py``). This one rewrites the rule of every
Hebbian node so that the competition temperature decays geometrically with depth, from the
configured value T_0 at the first plastic layer to T_0 * FINAL at the last::

    T(layer d) = T_0 * FINAL ** (d / (n - 1)),   d = 0 .. n-1 in order of the n plastic layers

(the DeepHebb settings 1.0 / 0.65 / 0.25 follow the same trend). It runs between
``insert_hebbian`` (which creates the Hebbian nodes) and ``broadcast_global_sign``; the
PassManager checks the graph's invariants after it. Run it as a script::

    python examples/custom_pass.py
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import ghlc
from ghlc import passes
from ghlc.graph import LayerGraph, hebb_key

FINAL = 0.25


def depth_temperature(lg: LayerGraph, final: float = FINAL) -> LayerGraph:
    """Scale each plastic layer's temperature by ``final ** (depth / (n - 1))``."""
    g = lg.copy_graph()
    plastic = lg.plastic()
    last = max(len(plastic) - 1, 1)
    for depth, info in enumerate(plastic):
        node = g.nodes[hebb_key(info.name)]
        rule = node["rule"]  # a frozen HebbianRule: replace it, never mutate it
        scale = final ** (depth / last)
        node["rule"] = dataclasses.replace(rule, temperature=rule.temperature * scale)
    return lg.evolve(g=g)


def depth_temperature_requires(lg: LayerGraph) -> list[str]:
    """Precondition: the Hebbian nodes exist already."""
    return [
        f"{i.name} has no Hebbian node (run insert_hebbian first)"
        for i in lg.plastic()
        if hebb_key(i.name) not in lg.g
    ]


depth_temperature.requires = depth_temperature_requires  # type: ignore[attr-defined]

PASSES = [
    passes.select_plastic,
    passes.insert_hebbian,
    depth_temperature,
    passes.broadcast_global_sign,
    passes.validate,
]


def _resnet18():
    spec = importlib.util.spec_from_file_location(
        "ghlc_example_resnet", Path(__file__).with_name("resnet.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.resnet18(), mod.example_inputs()


def _main() -> None:
    from ghlc.cli import layer_table

    model, inputs = _resnet18()
    lg = passes.PassManager(PASSES)(ghlc.trace(model, inputs))
    m = ghlc.build(lg)
    print(layer_table(lg))
    print(f"built: {type(m).__name__}, {sum(p.numel() for p in m.parameters()):,} parameters")


if __name__ == "__main__":
    _main()
