"""The pass contract: a pass maps a LayerGraph to a ``PassResult(graph, modified)`` and may
state its pre- and post-conditions (``requires`` / ``ensures``), as torch.fx's pass
infrastructure does. The PassManager runs the checks; a pass never edits its input graph."""

from __future__ import annotations

from typing import NamedTuple

from ghlc.graph import LayerGraph


class PassResult(NamedTuple):
    """What a pass returns: the new graph and whether it differs from the input."""

    graph: LayerGraph
    modified: bool


class PassBase:
    """A pass with a name and optional conditions. Subclasses implement :meth:`call`;
    ``requires`` / ``ensures`` return the list of problems (empty when the condition holds)."""

    name: str = ""

    def call(self, lg: LayerGraph) -> PassResult:
        raise NotImplementedError

    def requires(self, lg: LayerGraph) -> list[str]:
        """Preconditions on the input graph."""
        return []

    def ensures(self, lg: LayerGraph) -> list[str]:
        """Postconditions on the output graph."""
        return []

    def __call__(self, lg: LayerGraph) -> PassResult:
        return self.call(lg)

    def __repr__(self) -> str:
        return f"<pass {self.name or type(self).__name__}>"


def changed(before: LayerGraph, after: LayerGraph) -> bool:
    """Whether two graphs differ in nodes, edges or their data."""
    return dict(before.g.nodes(data=True)) != dict(after.g.nodes(data=True)) or sorted(
        before.g.edges(data="type")
    ) != sorted(after.g.edges(data="type"))
