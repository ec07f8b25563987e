"""validate: the annotated graph is complete and ready to compile."""

from __future__ import annotations

from ghlc.errors import PassError
from ghlc.graph import LayerGraph

from .invariants import check, hebbian_complete


def validate(lg: LayerGraph) -> LayerGraph:
    problems = check(lg) + hebbian_complete(lg)
    if problems:
        raise PassError("invalid layer graph: " + "; ".join(problems))
    return lg


validate.ensures = hebbian_complete  # type: ignore[attr-defined]
