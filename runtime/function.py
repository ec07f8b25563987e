"""How one plastic call runs: plain forward, and its backward adds the Hebbian term.

When H is computed is ``timing.py``'s choice (``hebbian_at``, resolved per call to ``at``).
Most calls run backprop's own (C++) autograd node and add H from a hook on the output
(:func:`_hooked_call`), which costs less host time than a Python autograd Function
(``bench/overhead.py``). Calls that may combine H and G inside the call (the in-call combine:
large weights on the policy's ``in_call_combine_devices``) need their weight gradient in hand
and run :class:`PlasticCall`; so do plain convs in a CUDA-graph step captured with
``cuda_graph_step(..., stack_weight_grads=True)`` (on the policy's ``stack_devices``), whose
backward computes backprop's weight gradient and the Hebbian correlation in one stacked
weight-gradient call (host time is not replayed there, GPU time is). The policy's
``hooked_calls=False`` runs every call through :class:`PlasticCall`. All give the same
numbers (tests force each).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, overload

import torch
import torch.nn.functional as F

from ghlc.errors import RuntimeGHLError, first_line

from . import fused, policy
from .accumulate import PlasticParam, combine_in_call, in_call_sized, splits_by_unit
from .calls import CallSpec
from .rule import UNITS_LEAD, hebbian_raw
from .sampled import block_fraction, sample_block
from .stacked import stackable, stacked_wgrads
from .status import STATUS
from .timing import (
    Block,
    SplitH,
    choose_at,
    hebbian_split,
    hebbian_split_finish,
    split_units,
    splits,
)


def _grads(spec: CallSpec, g, x, w, need):
    if spec.kind == "linear":
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ w).reshape(x.shape) if need[0] else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
        gb = g2.sum(0) if need[2] else None
        return gx, gw, gb
    return spec.conv_backward(g, x, w, need)


def _create_graph_message(site: PlasticParam) -> str:
    return (
        f"layer {site.layer!r}: a backward pass with create_graph=True through a plastic "
        "layer is not supported (GHL replaces its weight's gradient)"
    )


def _retained_graph_message(site: PlasticParam) -> str:
    return (
        f"layer {site.layer!r}: a second backward pass through the same graph "
        "(retain_graph=True) is not supported"
    )


class PlasticCall(torch.autograd.Function):
    """u = f(x; w) + b; backward returns ordinary grads and records H for ``site``."""

    @staticmethod
    def forward(
        ctx,
        x,
        w,
        b,
        spec: CallSpec,
        site: PlasticParam,
        hebbian_at: str,
        out_saved: bool,
        copy_out: bool,
        view,
        stack: bool = False,
        amp: torch.dtype | None = None,
    ):
        # amp: autocast's dtype; x and b come cast, w is cast here, so that the weight's
        # gradient (returned in w's dtype) reaches the parameter with no cast in between and
        # the in-call combine still applies; H is then in w's dtype (_hebbian_in)
        h_dtype, ctx.w_dtype = (w.dtype if amp is not None else None), w.dtype
        if amp is not None:
            w = w.to(amp)
        out = spec.run(x, w, b)
        if out._is_view():  # (F.linear on 3+ dims): autograd forbids changing a Function's
            out = torch.ops.aten._unsafe_view(out, out.shape)  # view output in place
        site.note_call()
        ctx.spec, ctx.site, ctx.view, ctx.stack, ctx.h_dtype = spec, site, view, stack, h_dtype
        ctx.h = None
        at = choose_at(
            hebbian_at, out_saved, copy_out, w.numel(), out.numel(), block_fraction(site.rule)
        )
        if at == "block":
            ctx.h = Block(*sample_block(spec, x, out.detach(), site.rule))
            ctx.save_for_backward(x, w, b)
        elif at == "forward":
            split = splits(hebbian_at, w) and h_dtype is None
            n_split = split_units(spec, w, site.rule) if split else 0
            if n_split:  # H of the last units recomputed in backward (hebbian_split)
                ctx.h = hebbian_split(spec, x, out, w, b, site.rule, n_split)
                ctx.save_for_backward(x, w, b)
            else:
                ctx.h = _hebbian_in(spec, x, out, w, b, site, h_dtype)
                ctx.save_for_backward(x, w)
        else:
            ctx.save_for_backward(x, w, b, out.clone() if copy_out else out)
        return out

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeGHLError(_create_graph_message(ctx.site))
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
        in_call = (
            need[1] and ctx.view is None and splits_by_unit(spec) and site.can_combine_in_call(w)
        )
        if ctx.stack and need[1] and not in_call and ctx.h is None and len(saved) == 4:
            gx = gb = None
            if need[0] or need[2]:
                gx, _, gb = _grads(spec, g, x, w, (need[0], False, need[2]))
            gw, h = stacked_wgrads(spec, x, w, saved[2], saved[3].detach(), g, site.rule)
            site.add(h, None, (spec.transposed, spec.groups))
            site.returned(gw, False)
            return gx, gw, gb, None, None, None, None, None, None, None, None
        gx, gw, gb = _grads(spec, g, x, w, (need[0], not in_call, need[2]))
        if isinstance(ctx.h, SplitH):
            h, ctx.h = hebbian_split_finish(spec, w, saved[2], ctx.h, site.rule), None
        elif isinstance(ctx.h, Block):
            blk, ctx.h = ctx.h, None
            h = _hebbian_in(spec, blk.x, blk.u, w, saved[2], site, ctx.h_dtype, True)
        elif ctx.h is not None:
            h, ctx.h = ctx.h, None
        elif len(saved) < 4:  # H was computed in forward and used by an earlier backward
            raise RuntimeGHLError(_retained_graph_message(site))
        else:
            h = _hebbian_in(spec, x, saved[3].detach(), w, saved[2], site, ctx.h_dtype)
        if in_call:  # (in h's dtype)
            gw = combine_in_call(spec, g, x, w, h, site.rule, global_signal=site.global_signal)
        else:
            axes = (spec.transposed, spec.groups) if ctx.view is None else UNITS_LEAD
            site.add(h, ctx.view, axes)
            if gw is not None and gw.dtype != ctx.w_dtype:  # (w was cast in the forward)
                gw = gw.to(ctx.w_dtype)
        if need[1]:
            site.returned(gw, in_call)
        return gx, gw if need[1] else None, gb, None, None, None, None, None, None, None, None


def _hebbian_in(
    spec: CallSpec,
    x,
    u,
    w,
    b,
    site: PlasticParam,
    h_dtype: torch.dtype | None,
    presampled: bool = False,
) -> torch.Tensor:
    """H of one call. With ``h_dtype`` (a call run by autocast in a lower precision) H is in
    that dtype (the weight's): by default from the call's operands upcast to it, so that all
    of the rule's arithmetic is in it; with the rule's ``precision="autocast"`` the
    competition and the correlation run on the operands as they are (as autocast runs
    backprop's own weight gradient) and only Oja's decay in ``h_dtype``. ``presampled``: x
    and u are the sampled block already (the ``block`` timing)."""
    if h_dtype is None:
        return hebbian_raw(spec, x, u, w, b, site.rule, presampled=presampled)
    with torch.autocast(x.device.type, enabled=False):  # (H in the forward pass: inside it)
        if site.rule.precision == "autocast":
            return hebbian_raw(spec, x, u, w, b, site.rule, h_dtype, presampled)
        x, u, w, b = (t if t is None else t.to(h_dtype) for t in (x, u, w, b))
        return hebbian_raw(spec, x, u, w, b, site.rule, presampled=presampled, u_exact=False)


def _hooked_call(
    x,
    w,
    b,
    spec: CallSpec,
    site: PlasticParam,
    hebbian_at: str,
    out_saved: bool,
    copy_out: bool,
    view,
    h_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The call as backprop runs it; a hook on the autograd node that computes its weight
    gradient adds H to ``site`` when that node runs (so before the weight's gradient is
    accumulated and combined). ``h_dtype``: see :func:`_hebbian_in`.

    The hook sits on the node, not on the output tensor: an output that is a view (``F.linear``
    on an input of 3+ dims returns one) and is then changed in place gets a new autograd
    history that skips the view's node, so a hook on the tensor would never run and the
    weight would silently get backprop's plain gradient. The node that computed the output
    (the base's, for a view) runs whenever this call contributes to the weight's gradient."""
    out = spec.run(x, w, b)
    site.note_call()
    # (x, w, b are held as they are: the hook runs without grad mode, so nothing is recorded;
    # only the output is detached, since a hook holding its own tensor would be a cycle)
    at = choose_at(
        hebbian_at, out_saved, copy_out, w.numel(), out.numel(), block_fraction(site.rule)
    )
    # [H, or None and the input and output it comes from, the output's version, whether
    # they are the sampled block already]: one flat list, emptied when used
    held: list[Any]
    if at == "forward":
        with torch.no_grad():
            held = [_hebbian_in(spec, x, out.detach(), w, b, site, h_dtype), None, None, 0, False]
    elif at == "block":
        xs, us = sample_block(spec, x, out.detach(), site.rule)
        held = [None, xs, us, us._version, True]
    else:  # the output shares its version counter with ``u``: in-place changes are seen
        u = out.detach().clone() if copy_out else out.detach()
        held = [None, x, u, u._version, False]
    axes = (spec.transposed, spec.groups) if view is None else UNITS_LEAD

    def add_hebbian(grad_outputs: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled():
            raise RuntimeGHLError(_create_graph_message(site))
        if not held:
            raise RuntimeGHLError(_retained_graph_message(site))
        h, xs, u, version, presampled = held
        held.clear()  # as autograd frees saved tensors: a graph kept alive (the user's
        # ``loss``) must not keep this call's activations
        if h is None:
            if u._version != version:
                raise RuntimeGHLError(
                    f"layer {site.layer!r}: its output was modified in place after the call"
                )
            h = _hebbian_in(spec, xs, u, w, b, site, h_dtype, presampled)
        site.add(h, view, axes)

    _producer(out).register_prehook(add_hebbian)
    return out


def _producer(out: torch.Tensor) -> torch.autograd.graph.Node:
    """The autograd node that computed a call's output: the output's own, or its base's
    where the call returned a view."""
    base = out._base if out._is_view() else None
    node = (base if base is not None else out).grad_fn
    assert node is not None, "a plastic call's output has no autograd history"
    return node


def _needs_function(spec: CallSpec, w: torch.Tensor, site: PlasticParam, view) -> bool:
    """Whether the call may use the in-call combine (see PlasticParam.can_combine_in_call),
    which only PlasticCall's backward can do, or the policy runs every call that way."""
    return not policy.current().hooked_calls or (
        view is None and site.direct and splits_by_unit(spec) and in_call_sized(w)
    )


def _stacks(spec: CallSpec, w: torch.Tensor, site: PlasticParam, view) -> bool:
    """Whether the call's backward stacks the two weight gradients (see the module
    docstring): a stackable conv of the parameter itself, while a CUDA graph is captured
    with ``stack_weight_grads=True``."""
    if not fused.stacking():
        return False
    pol = policy.current()
    return (
        view is None
        and site.direct
        and w.device.type in pol.stack_devices
        and stackable(spec, site.rule)
        and (pol.stack_max_numel is None or w.numel() < pol.stack_max_numel)
    )


@functools.cache
def _warn_float16() -> None:
    warnings.warn(
        "ghlc: float16 autocast: scale the loss with ghlc.GradScaler, not "
        "torch.amp.GradScaler, whose unscale_ would also divide the plastic weights' "
        "|H|*sign(G) by the loss scale",
        stacklevel=4,
    )


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs a conv/linear on ``x``'s device in, or None when it is off."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


@overload
def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...
@overload
def _cast(t: None, dtype: torch.dtype) -> None: ...
def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` as autocast would pass it to a lower-precision op: floating tensors other than
    float64 in ``dtype``, the rest as they are."""
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def plastic_call(
    x,
    w,
    b,
    spec: CallSpec,
    site: PlasticParam,
    unbatched: bool,
    copy_out: bool = False,
    view: tuple | None = None,
    hebbian_at: str = "auto",
    out_saved: bool = False,
) -> torch.Tensor:
    """Run one conv/linear call as a plastic call (handles unbatched and 'same' padding).

    Under autocast the call runs as autocast runs the plain op (its operands cast to the
    autocast dtype; ``torch.convolution`` itself is not autocast), and H is computed in the
    weight's dtype (:func:`_hebbian_in`). A call that may combine inside its backward casts
    the weight itself (:class:`PlasticCall`), so that its gradient reaches the parameter
    as the call returned it."""
    if unbatched:
        x = x.unsqueeze(0)
    if spec.pre_pad:
        x = F.pad(x, list(spec.pre_pad))
    amp, h_dtype = autocast_dtype(x), None
    if amp is not None:
        if amp == torch.float16 and not STATUS.scaler_in_use:
            _warn_float16()
        x, b, wc = _cast(x, amp), _cast(b, amp), _cast(w, amp)
        h_dtype = w.dtype if wc.dtype != w.dtype else None
        w = w if h_dtype is not None and _needs_function(spec, w, site, view) else wc
    if h_dtype is not None and w is not wc:  # the weight is cast inside the call
        out = PlasticCall.apply(
            x, w, b, spec, site, hebbian_at, out_saved, copy_out, view, False, wc.dtype
        )
    elif h_dtype is not None:
        out = _hooked_call(x, w, b, spec, site, hebbian_at, out_saved, copy_out, view, h_dtype)
    elif (stack := _stacks(spec, w, site, view)) or _needs_function(spec, w, site, view):
        out = PlasticCall.apply(x, w, b, spec, site, hebbian_at, out_saved, copy_out, view, stack)
    else:
        out = _hooked_call(x, w, b, spec, site, hebbian_at, out_saved, copy_out, view)
    return out.squeeze(0) if unbatched else out
