"""select_plastic: decide each layer's role (plastic / backprop / frozen) and say why."""

from __future__ import annotations

import dataclasses
import fnmatch

from ghlc.config import GHLConfig
from ghlc.graph import LayerGraph, LayerInfo, Role

from .base import PassBase, PassResult, changed


def _match(info: LayerInfo, patterns) -> bool:
    return any(
        fnmatch.fnmatchcase(info.module, p) or fnmatch.fnmatchcase(info.name, p) for p in patterns
    )


def decide(info: LayerInfo, cfg: GHLConfig) -> tuple[Role, str]:
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


class SelectPlastic(PassBase):
    """Every layer's role from the config: ``plastic``, ``include`` / ``exclude`` globs."""

    name = "select_plastic"

    def call(self, lg: LayerGraph) -> PassResult:
        g = lg.copy_graph()
        for info in lg.layers():
            role, reason = decide(info, lg.config)
            g.nodes[info.name]["info"] = dataclasses.replace(info, role=role, reason=reason)
        out = lg.evolve(g=g)
        return PassResult(out, changed(lg, out))

    def ensures(self, lg: LayerGraph) -> list[str]:
        """Each role is the config's, and every layer left out says why."""
        problems = []
        for info in lg.layers():
            if (info.role, info.reason) != decide(info, lg.config):
                problems.append(f"{info.name} is {info.role.value}, the config says otherwise")
            elif info.role is not Role.PLASTIC and not info.reason:
                problems.append(f"{info.name} is {info.role.value} with no reason given")
        return problems


select_plastic = SelectPlastic()
