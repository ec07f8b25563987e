"""broadcast_global_sign: one global-sign source with a broadcast edge to every Hebbian node.

The source holds the global signal (``config.global_signal``): the one place it is stored.
"""

from __future__ import annotations

from ghlc.config import GLOBAL_SIGNALS
from ghlc.graph import GLOBAL_SIGN, LayerGraph

from .base import PassBase, PassResult, changed


class BroadcastGlobalSign(PassBase):
    name = "broadcast_global_sign"

    def call(self, lg: LayerGraph) -> PassResult:
        g = lg.copy_graph()
        if GLOBAL_SIGN in g:
            g.remove_node(GLOBAL_SIGN)
        g.add_node(GLOBAL_SIGN, type="global_sign", signal=lg.config.global_signal)
        for n, d in list(g.nodes(data=True)):
            if d["type"] == "hebbian":
                g.add_edge(GLOBAL_SIGN, n, type="broadcast")
        out = lg.evolve(g=g)
        return PassResult(out, changed(lg, out))

    def ensures(self, lg: LayerGraph) -> list[str]:
        """A known signal, and one broadcast edge into every Hebbian node."""
        if lg.global_signal not in GLOBAL_SIGNALS:
            return [f"global signal {lg.global_signal!r} is not one of {', '.join(GLOBAL_SIGNALS)}"]
        return [
            f"{k} has no global-sign edge"
            for k in lg.hebbian_nodes()
            if not lg.g.has_edge(GLOBAL_SIGN, k)
        ]


broadcast_global_sign = BroadcastGlobalSign()
