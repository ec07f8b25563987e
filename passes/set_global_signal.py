"""set_global_signal: change the signal on the global-sign node.

``set_global_signal("none")`` turns a GHL graph into pure local Hebbian learning (each plastic
weight's update is ``-H_n``, no backprop sign): how an artifact loads with
``method="hebbian"``. The Hebbian nodes and their rules are unchanged.
"""

from __future__ import annotations

from ghlc.config import GLOBAL_SIGNALS
from ghlc.errors import PassError
from ghlc.graph import GLOBAL_SIGN, LayerGraph

from .base import PassBase, PassResult


class SetGlobalSignal(PassBase):
    name = "set_global_signal"

    def __init__(self, signal: str) -> None:
        if signal not in GLOBAL_SIGNALS:
            raise PassError(f"global signal {signal!r} is not one of {', '.join(GLOBAL_SIGNALS)}")
        self.signal = signal

    def call(self, lg: LayerGraph) -> PassResult:
        if lg.global_signal == self.signal:
            return PassResult(lg, False)
        g = lg.copy_graph()
        g.nodes[GLOBAL_SIGN]["signal"] = self.signal
        return PassResult(lg.evolve(g=g), True)

    def requires(self, lg: LayerGraph) -> list[str]:
        """The graph has its global-sign node (broadcast_global_sign ran)."""
        return (
            [] if GLOBAL_SIGN in lg.g else ["no global-sign node (run broadcast_global_sign first)"]
        )

    def ensures(self, lg: LayerGraph) -> list[str]:
        if lg.global_signal != self.signal:
            return [f"the global signal is {lg.global_signal!r}, expected {self.signal!r}"]
        return []


def set_global_signal(signal: str) -> SetGlobalSignal:
    """The pass that sets the global-sign node's signal to ``signal``."""
    return SetGlobalSignal(signal)
