"""What ghlc tells the user about a traced model: which capture tier was used (and, on
request, why the earlier ones did not apply), how much of the model stays backprop, and how
``ghlc train`` reads the model's output."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .errors import GHLWarning
from .graph import LayerGraph, Role
from .passes.select_plastic import decide

TIER_NAMES = {"fx": "fx", "export": "torch.export", "eager": "hooks"}


class MostlyBackpropWarning(GHLWarning):
    """Most of the model's weights are in Linear layers that train by plain backprop."""


def capture_line(lg: LayerGraph) -> str:
    """One line: the capture tier used; earlier tiers that did not apply are only named."""
    line = f"capture: {TIER_NAMES.get(lg.capture, lg.capture)}"
    if lg.capture_errors:
        tried = ", ".join(TIER_NAMES.get(t, t) for t, _ in lg.capture_errors)
        line += f" ({tried} did not apply; --explain says why)"
    return line


def capture_reasons(lg: LayerGraph) -> list[str]:
    """Why each tier before the one used did not apply, one whole line each."""
    return [f"{TIER_NAMES.get(t, t)}: {why}" for t, why in lg.capture_errors]


def linear_backprop_share(lg: LayerGraph, model: torch.nn.Module) -> float:
    """The fraction of the model's weights in Linear layers that train by backprop only
    because ``linear`` is not in ``config.plastic`` (output layers and exclusions aside)."""
    with_linear = dataclasses.replace(lg.config, plastic=(*lg.config.plastic, "linear"))
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    held = sum(
        params[i.name].numel()
        for i in lg.layers()
        if i.role is Role.BACKPROP
        and i.name in params
        and decide(i, with_linear)[0] is Role.PLASTIC
    )
    return held / total if total else 0.0


def mostly_backprop(lg: LayerGraph, model: torch.nn.Module) -> str | None:
    """A one-line warning when most of the model's weights are in Linear layers that are not
    plastic (a transformer under the default config: only its patch embedding is), else None."""
    share = linear_backprop_share(lg, model)
    if share <= 0.5 or "linear" in lg.config.plastic:
        return None
    return (
        f"{share:.0%} of the model's weights are in Linear layers that train by plain "
        'backprop (not in config.plastic); to train them with GHL too, set plastic = ["conv", '
        '"linear"] in the config TOML (GHLConfig(plastic=("conv", "linear")))'
    )


def output_note(out: Any) -> str | None:
    """How ``ghlc train`` reads a model output that is not a plain tensor, or None."""
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return f"the model returns a {type(out).__name__}: ghlc train uses its first element"
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return f"the model returns {type(out).__name__}: ghlc train uses its .logits"
    return None
