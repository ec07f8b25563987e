"""Domain errors: every message names what is unsupported or wrong, and why."""

from __future__ import annotations


class GHLError(Exception):
    """Base class for all ghlc errors (a user-facing, one-line message)."""


class ConfigError(GHLError, ValueError):
    """An invalid GHLConfig value."""


class TraceError(GHLError):
    """No capture tier could handle the model."""


class PassError(GHLError):
    """A pass failed or broke a graph invariant."""


class RuntimeGHLError(GHLError, RuntimeError):
    """A failure inside the compiled training module, naming the layer."""


class GHLWarning(UserWarning):
    """Base class of ghlc's warnings (a one-line message; the CLI prints it as one line)."""


class SlowPrecisionWarning(UserWarning):
    """A requested precision that runs on slow fallback kernels on this device."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or ''."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def describe(e: BaseException) -> str:
    """``Type: first line`` of an exception, for one-line error messages."""
    msg = first_line(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
