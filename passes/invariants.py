"""Graph invariants checked by the PassManager after every pass."""

from __future__ import annotations

from ghlc.config import GLOBAL_SIGNALS
from ghlc.graph import GLOBAL_SIGN, LayerGraph, Role, hebb_key


def check(lg: LayerGraph) -> list[str]:
    """Return the list of broken invariants (empty when the graph is well formed)."""
    problems: list[str] = []
    g = lg.g
    hebb = {n for n, d in g.nodes(data=True) if d["type"] == "hebbian"}
    for info in lg.layers():
        k = hebb_key(info.name)
        if k in hebb and info.role is not Role.PLASTIC:
            problems.append(f"{info.name} is {info.role.value} but has a Hebbian node")
    for k in hebb:
        layers = [u for u, _, d in g.in_edges(k, data=True) if d["type"] == "update"]
        if len(layers) != 1:
            problems.append(f"{k} is attached to {len(layers)} layers, expected 1")
    if GLOBAL_SIGN in g:
        for k in hebb:
            n = sum(
                1
                for u, _, d in g.in_edges(k, data=True)
                if u == GLOBAL_SIGN and d["type"] == "broadcast"
            )
            if n != 1:
                problems.append(f"{k} has {n} global-sign edges, expected 1")
    for u, v, d in g.edges(data=True):
        if d["type"] == "broadcast" and (g.nodes[u]["type"] != "global_sign" or v not in hebb):
            problems.append(
                f"broadcast edge {u} -> {v} does not join the global sign to a Hebbian node"
            )
    sources = [n for n, d in g.nodes(data=True) if d["type"] == "global_sign"]
    if len(sources) > 1:
        problems.append(f"{len(sources)} global-sign sources, expected at most 1")
    for n in sources:
        if g.nodes[n].get("signal") not in GLOBAL_SIGNALS:
            problems.append(
                f"global signal {g.nodes[n].get('signal')!r} is not one of "
                f"{', '.join(GLOBAL_SIGNALS)}"
            )
    return problems


def hebbian_complete(lg: LayerGraph) -> list[str]:
    """Every plastic layer has exactly one Hebbian node and one global-sign edge."""
    problems = []
    for info in lg.plastic():
        k = hebb_key(info.name)
        if k not in lg.g:
            problems.append(f"plastic parameter {info.name} has no Hebbian node")
        elif not lg.g.has_edge(GLOBAL_SIGN, k):
            problems.append(f"Hebbian node of {info.name} has no global-sign edge")
    return problems
