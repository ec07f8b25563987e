"""The stacked call: backprop's dL/dW and the Hebbian correlation of a plain conv from ONE
weight-gradient call (the two cotangents stacked along the output channels). Taken inside CUDA
graphs captured with ``stack_weight_grads=True`` on the policy's ``stack_devices``."""

from __future__ import annotations

import torch

from ghlc.graph import HebbianRule

from . import fused
from .calls import CallSpec
from .correlation import plain, weight_vjp
from .rule import compete, hebbian_finish


def stackable(spec: CallSpec, rule: HebbianRule) -> bool:
    """Calls whose correlation can share one weight-gradient call with backprop's
    (:func:`stacked_wgrads`): plain convs over the whole batch."""
    return plain(spec) and rule.sample_fraction >= 1.0


def stacked_wgrads(
    spec: CallSpec,
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    u: torch.Tensor,
    g: torch.Tensor,
    rule: HebbianRule,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dW, H) of a :func:`stackable` call from ONE weight-gradient call: the cotangents g
    and y = compete(u) stacked along the output channels, against a weight of twice the
    output channels (the input x is read and re-laid-out once for both). The softmax writes y
    straight into its half of the stacked buffer where the Triton kernel runs. H is written
    to a buffer of its own: as the weight's gradient it must not keep the stacked result's
    storage (twice the weight) alive between steps."""
    c = g.shape[1]
    if g.is_contiguous():
        gy = g.new_empty((g.shape[0], 2 * c, *g.shape[2:]))
        gy[:, :c].copy_(g)
        y = gy[:, c:]
        if not (rule.competition == "softmax" and fused.softmax_into(u, 1, rule.temperature, y)):
            y.copy_(compete(u, spec, rule))
    else:
        y = compete(u, spec, rule)
        gy = torch.cat([g, y], 1)
        y = gy[:, c:]
    fmt = (
        torch.channels_last
        if w.dim() == 4
        and not w.is_contiguous()
        and w.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    w2 = torch.empty((2 * c, *w.shape[1:]), dtype=w.dtype, device=w.device, memory_format=fmt)
    both = weight_vjp(spec, x, w2, gy, as_forward=False)  # (w2: only its shape is read)
    h = torch.empty_like(w, memory_format=torch.contiguous_format)
    return both[:c], hebbian_finish(spec, both[c:], y, w, b, rule, out=h)
