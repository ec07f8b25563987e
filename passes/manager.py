"""PassManager: runs LayerGraph -> LayerGraph passes and checks invariants after each."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ghlc.errors import GHLError, PassError
from ghlc.graph import LayerGraph

from .invariants import check

Pass = Callable[[LayerGraph], LayerGraph]


def _name(p: Pass) -> str:
    return getattr(p, "__name__", type(p).__name__)


class PassManager:
    """Run ``passes`` in order. A pass may declare ``requires(lg)`` / ``ensures(lg)`` callables
    returning a list of problems; graph invariants are checked after every pass. Errors name
    the failing pass and the passes that ran before it."""

    def __init__(self, passes: Sequence[Pass], check_invariants: bool = True) -> None:
        self.passes = list(passes)
        self.check_invariants = check_invariants

    def __call__(self, lg: LayerGraph) -> LayerGraph:
        done: list[str] = []
        for p in self.passes:
            name = _name(p)
            where = f"pass {name!r}" + (f" (after {', '.join(done)})" if done else "")
            req = getattr(p, "requires", None)
            if req is not None and (problems := req(lg)):
                raise PassError(f"{where}: precondition failed: {'; '.join(problems)}")
            try:
                out = p(lg)
            except GHLError as e:
                raise PassError(f"{where} failed: {e}") from e
            except Exception as e:
                raise PassError(f"{where} failed: {type(e).__name__}: {e}") from e
            if not isinstance(out, LayerGraph):
                raise PassError(f"{where} returned {type(out).__name__}, expected LayerGraph")
            problems = (check(out) if self.check_invariants else [])
            ens = getattr(p, "ensures", None)
            if ens is not None:
                problems += ens(out)
            if problems:
                raise PassError(f"{where} broke an invariant: {'; '.join(problems)}")
            lg = out
            done.append(name)
        return lg
