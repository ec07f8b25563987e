"""Gradient clipping and GHL.

A plastic weight's gradient ``|H_n| * sign(G)`` is already bounded: its largest element is 1,
so its largest step is the learning rate. Clipping the total gradient norm (torch's
``clip_grad_norm_``, Lightning's ``gradient_clip_val``, the Hugging Face Trainer's
``max_grad_norm``) scales it by a factor that depends on every other layer's gradient too,
which is no longer the rule; and since ``sign(G)`` does not change when G is scaled, clipping
G before the combination would leave the plastic gradients as they are. So ghlc's choice:
:func:`clip_grad_norm_` clips the backprop gradients by their own norm and leaves the plastic
ones as the rule made them; a plastic gradient found rescaled at an optimiser step (someone
clipped after backward) gets a warning, once per process.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .accumulate import _site_of
from .status import STATUS


class RescaledGradientWarning(UserWarning):
    """A plastic weight's gradient was rescaled between backward and the optimiser step."""


def clip_grad_norm_(
    parameters: torch.nn.Module | Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the non-plastic parameters only (a module or
    parameters); plastic gradients keep the rule's ``|H_n| * sign(G)``. Returns the norm of the
    backprop gradients before clipping."""
    if isinstance(parameters, torch.nn.Module):
        params: list[torch.Tensor] = list(parameters.parameters())
    elif isinstance(parameters, torch.Tensor):
        params = [parameters]
    else:
        params = list(parameters)
    plain = [p for p in params if _site_of(p) is None]
    return torch.nn.utils.clip_grad_norm_(
        plain, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
    )


def watch_rescaling() -> None:
    """Register :func:`before_step` as a global optimiser pre-step hook (once per process)."""
    if STATUS.pre_step_hook is None:
        STATUS.pre_step_hook = register_optimizer_step_pre_hook(before_step)


def before_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    """Global optimiser pre-step hook: warn once if a plastic gradient was changed in place
    since ghlc wrote it and its largest element is no longer 1 (clipping, manual scaling).
    Costs a version-counter comparison per plastic weight; the max only on a change."""
    if STATUS.rescale_warned:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            st, grad = _site_of(p), p.grad
            if st is None or grad is None or st._written is None:
                continue
            wrote = st._written()
            if wrote is None or wrote is not grad:
                continue
            if grad._version == st._written_version:
                continue
            top = float(grad.detach().abs().max())
            if top == 0.0 or abs(top - 1.0) <= 1e-6:
                continue
            STATUS.rescale_warned = True
            warnings.warn(
                f"layer {st.layer!r}: its GHL gradient was scaled by {top:.3g} after backward "
                "(gradient clipping?), which changes the rule; clip with "
                "ghlc.clip_grad_norm_(model, max_norm), which clips the backprop gradients "
                "only (README, 'Gradient clipping')",
                RescaledGradientWarning,
                stacklevel=3,
            )
            return
