"""Shared fixtures."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from ghlc.runtime import policy


@pytest.fixture
def override() -> Iterator[Callable[..., object]]:
    """``override(block_units=3)``: change dispatch policy fields until the test ends (each
    call stacks on the previous ones, like ``policy.override`` scopes)."""
    with contextlib.ExitStack() as stack:
        yield lambda **fields: stack.enter_context(policy.override(**fields))
