"""broadcast_global_sign: one global-sign source with a broadcast edge to every Hebbian node."""

from __future__ import annotations

from ghlc.graph import GLOBAL_SIGN, LayerGraph


def broadcast_global_sign(lg: LayerGraph) -> LayerGraph:
    g = lg.copy_graph()
    if GLOBAL_SIGN in g:
        g.remove_node(GLOBAL_SIGN)
    g.add_node(GLOBAL_SIGN, type="global_sign", signal=lg.config.global_signal)
    for n, d in list(g.nodes(data=True)):
        if d["type"] == "hebbian":
            g.add_edge(GLOBAL_SIGN, n, type="broadcast")
    return lg.evolve(g=g)
