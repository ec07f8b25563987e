"""The autograd Function of one plastic call: plain forward, backward adds the Hebbian term.

The Hebbian term H needs the call's input x and output u. Backprop keeps x anyway (for the
weight gradient); whether it keeps u depends on the next op (BatchNorm does, ReLU does not).
So each call picks when to compute H:

- ``backward``: save u and compute H in the backward pass (free when u is kept anyway);
- ``forward``: compute H right away and keep only H (weight-sized) until the backward pass.

``auto`` takes whichever keeps less memory alive between forward and backward. H is added to
the parameter's accumulator only when the call's backward runs, whichever the timing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ghlc.errors import RuntimeGHLError, first_line

from .calls import CallSpec
from .hebbian import ROWS, fusable, fused_combine, hebbian_raw
from .state import PlasticParam


def _grads(spec: CallSpec, g, x, w, need):
    if spec.kind == "linear":
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ w).reshape(x.shape) if need[0] else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
        gb = g2.sum(0) if need[2] else None
        return gx, gw, gb
    bias_sizes = [g.shape[1]] if need[2] else None
    return torch.ops.aten.convolution_backward(
        g, x, w, bias_sizes, spec.stride, spec.padding, spec.dilation, spec.transposed,
        spec.output_padding if spec.transposed else (0,) * spec.nd, spec.groups, list(need),
    )


def choose_timing(timing: str, out_saved: bool, copy_out: bool, w_numel: int,
                  out_numel: int) -> str:
    """``forward`` or ``backward`` for one call (see the module docstring)."""
    if timing != "auto":
        return timing
    u_cost = 0 if (out_saved and not copy_out) else out_numel  # extra kept by saving u
    return "forward" if w_numel < u_cost else "backward"


class PlasticCall(torch.autograd.Function):
    """u = f(x; w) + b; backward returns ordinary grads and records H for ``site``."""

    @staticmethod
    def forward(ctx, x, w, b, spec: CallSpec, site: PlasticParam, timing: str, out_saved: bool,
                copy_out: bool, view):
        out = spec.run(x, w, b)
        site.note_call()
        ctx.spec, ctx.site, ctx.view = spec, site, view
        ctx.h = None
        if choose_timing(timing, out_saved, copy_out, w.numel(), out.numel()) == "forward":
            ctx.h = hebbian_raw(spec, x, out, w, b, site.rule)
            ctx.save_for_backward(x, w)
        else:
            ctx.save_for_backward(x, w, b, out.clone() if copy_out else out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        try:
            saved = ctx.saved_tensors
        except RuntimeError as e:
            raise RuntimeGHLError(
                f"layer {ctx.site.layer!r}: its output was modified in place after the call "
                f"({first_line(e)})"
            ) from None
        x, w = saved[0], saved[1]
        spec, site = ctx.spec, ctx.site
        need = ctx.needs_input_grad[:3]
        fuse = need[1] and ctx.view is None and fusable(spec) and site.can_fuse(w)
        gx, gw, gb = _grads(spec, g, x, w, (need[0], not fuse, need[2]))
        if ctx.h is not None:
            h, ctx.h = ctx.h, None
        else:
            h = hebbian_raw(spec, x, saved[3].detach(), w, saved[2], site.rule)
        if fuse:
            gw = fused_combine(spec, g, x, w, h, site.rule)
        else:
            layout = (spec.transposed, spec.groups) if ctx.view is None else ROWS
            site.add(h, ctx.view, layout)
        if need[1]:
            site.returned(gw, fuse)
        return gx, gw if need[1] else None, gb, None, None, None, None, None, None


def plastic_call(x, w, b, spec: CallSpec, site: PlasticParam, unbatched: bool,
                 copy_out: bool = False, view: tuple | None = None, timing: str = "auto",
                 out_saved: bool = False) -> torch.Tensor:
    """Run one conv/linear call as a plastic call (handles unbatched and 'same' padding)."""
    if unbatched:
        x = x.unsqueeze(0)
    if spec.pre_pad:
        x = F.pad(x, list(spec.pre_pad))
    out = PlasticCall.apply(x, w, b, spec, site, timing, out_saved, copy_out, view)
    return out.squeeze(0) if unbatched else out

