"""select_plastic: decide each layer's role (plastic / backprop / frozen) and say why."""

from __future__ import annotations

import dataclasses
import fnmatch

from ghlc.graph import LayerGraph, LayerInfo, Role


def _match(info: LayerInfo, patterns) -> bool:
    return any(fnmatch.fnmatchcase(info.module, p) or fnmatch.fnmatchcase(info.name, p)
               for p in patterns)


def decide(info: LayerInfo, cfg) -> tuple[Role, str]:
    """Role of one layer under ``cfg``, with the reason when it is not plastic."""
    if not info.requires_grad:
        return Role.FROZEN, "weight does not require grad"
    included = _match(info, cfg.include)
    if _match(info, cfg.exclude):
        return Role.BACKPROP, "excluded by config"
    if info.is_output and not included:
        return Role.BACKPROP, "output layer (name it in config.include to make it plastic)"
    if info.family not in cfg.plastic and not included:
        return Role.BACKPROP, f"{info.family} layers are not in config.plastic"
    return Role.PLASTIC, ""


def select_plastic(lg: LayerGraph) -> LayerGraph:
    g = lg.copy_graph()
    for info in lg.layers():
        role, reason = decide(info, lg.config)
        g.nodes[info.name]["info"] = dataclasses.replace(info, role=role, reason=reason)
    return lg.evolve(g=g)
