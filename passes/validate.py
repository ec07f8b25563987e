"""validate: the annotated graph is complete and ready to build."""

from __future__ import annotations

from ghlc.errors import PassError
from ghlc.graph import LayerGraph

from .base import PassBase, PassResult
from .invariants import check, hebbian_complete


class Validate(PassBase):
    """Raises a PassError unless the graph is well formed and every plastic layer has its
    Hebbian node and global-sign edge; the graph passes through unchanged."""

    name = "validate"

    def call(self, lg: LayerGraph) -> PassResult:
        problems = check(lg) + hebbian_complete(lg)
        if problems:
            raise PassError("invalid layer graph: " + "; ".join(problems))
        return PassResult(lg, False)

    def ensures(self, lg: LayerGraph) -> list[str]:
        return hebbian_complete(lg)


validate = Validate()
