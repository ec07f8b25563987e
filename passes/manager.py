"""PassManager: runs passes in order, checking each one's conditions and the invariants."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ghlc.errors import GHLError, PassError
from ghlc.graph import LayerGraph

from .base import PassResult
from .invariants import check

# A pass: a PassBase, or any callable LayerGraph -> PassResult | LayerGraph (user passes may be
# plain functions, with optional ``requires`` / ``ensures`` attributes)
Pass = Callable[[LayerGraph], "PassResult | LayerGraph"]


def _name(p: Pass) -> str:
    """A PassBase's ``name``, else a function's ``__name__``, else the class name."""
    return getattr(p, "name", "") or getattr(p, "__name__", type(p).__name__)


def _snapshot(lg: LayerGraph) -> tuple:
    """The graph's nodes, edges and their data, to detect a pass editing its input."""
    return (
        lg.g.graph.copy(),
        {n: dict(d) for n, d in lg.g.nodes(data=True)},
        sorted((u, v, d["type"]) for u, v, d in lg.g.edges(data=True)),
        lg.config,
    )


class PassManager:
    """Run ``passes`` in order. Before each pass its ``requires(lg)`` is checked, after it the
    graph invariants and its ``ensures(out)`` (each returns a list of problems); a pass that
    edits its input graph is an error. Errors name the failing pass and the passes that ran
    before it. ``modified`` says whether the last run changed the graph."""

    def __init__(self, passes: Sequence[Pass], check_invariants: bool = True) -> None:
        self.passes = list(passes)
        self.check_invariants = check_invariants
        self.modified = False

    def __call__(self, lg: LayerGraph) -> LayerGraph:
        done: list[str] = []
        self.modified = False
        for p in self.passes:
            name = _name(p)
            where = f"pass {name!r}" + (f" (after {', '.join(done)})" if done else "")
            req = getattr(p, "requires", None)
            if req is not None and (problems := req(lg)):
                raise PassError(f"{where}: precondition failed: {'; '.join(problems)}")
            before = _snapshot(lg)
            try:
                out = p(lg)
            except GHLError as e:
                raise PassError(f"{where} failed: {e}") from e
            except Exception as e:
                raise PassError(f"{where} failed: {type(e).__name__}: {e}") from e
            if isinstance(out, PassResult):
                out, modified = out
            else:
                modified = out is not lg
            if not isinstance(out, LayerGraph):
                raise PassError(
                    f"{where} returned {type(out).__name__}, expected a LayerGraph or a PassResult"
                )
            if _snapshot(lg) != before:
                raise PassError(
                    f"{where} edited its input graph: a pass returns a new graph "
                    "(lg.copy_graph(), then lg.evolve(g=...))"
                )
            problems = check(out) if self.check_invariants else []
            ens = getattr(p, "ensures", None)
            if ens is not None:
                problems += ens(out)
            if problems:
                raise PassError(f"{where} broke an invariant: {'; '.join(problems)}")
            self.modified = self.modified or modified
            lg = out
            done.append(name)
        return lg
