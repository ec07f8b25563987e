"""Shared fixtures of the test suite.

The helper modules beside the tests (``oracle``, the float64 oracle of the rule, and ``zoo``,
the example models) are imported by name; this directory is put on ``sys.path`` so that works
under any pytest import mode.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def dispatch() -> Iterator[Callable[..., None]]:
    """``dispatch(**fields)`` overrides the runtime's dispatch policy until the test ends
    (``ghlc.runtime.policy.override`` held open); later calls stack on earlier ones."""
    from ghlc.runtime import policy

    with contextlib.ExitStack() as stack:

        def override(**fields: object) -> None:
            stack.enter_context(policy.override(**fields))

        yield override
