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
