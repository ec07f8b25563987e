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

from ghlc.runtime import policy

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def override() -> Iterator[Callable[..., object]]:
    """``override(block_units=3)``: change dispatch policy fields until the test ends (each
    call stacks on the previous ones, like ``policy.override`` scopes)."""
    with contextlib.ExitStack() as stack:
        yield lambda **fields: stack.enter_context(policy.override(**fields))
