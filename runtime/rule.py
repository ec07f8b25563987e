"""The GHL rule, as math: competition, the Oja/Hebb term, normalisation and the combination.

For a call ``u = f(x; W) + b`` (DESIGN.md, "The rule"):

1. competition  ``y = softmax(t*u)`` over the output units (or one-hot argmax, or ``u``);
2. local term   ``H = sum y.x - (sum y*u)[k] W[k]`` (Oja), or ``sum y.x`` (plain Hebb);
3. normalise    ``H_n = H / (max|H| + 1e-30)`` over the layer (or over each output unit);
4. combine      ``|H_n| * sign(G)`` with G = dL/dW (GHL), or ``-H_n`` (pure Hebbian).

``sum y.x`` is the call's weight gradient with cotangent y (``correlation.py``). Each step
that has a faster way of computing the same numbers calls it by name (``fast.py``,
``fused.py``); the policy picks the way.
"""

from __future__ import annotations

import torch

from ghlc.graph import HebbianRule

from . import fast, fused, sampled
from .calls import CallSpec, units_lead
from .correlation import weight_vjp

UnitAxes = tuple[bool, int]  # (transposed, groups) of the calls using the weight
UNITS_LEAD: UnitAxes = (False, 1)  # output units along dim 0 (Linear, Conv, views of them)


def channel_dim(spec: CallSpec, u: torch.Tensor) -> int:
    return u.dim() - 1 if spec.kind == "linear" else 1


# ---- 1. competition -----------------------------------------------------------------------
def compete(u: torch.Tensor, spec: CallSpec, rule: HebbianRule) -> torch.Tensor:
    """Post-synaptic activity y from pre-activations u (competition over output units)."""
    if rule.competition == "none":
        return u
    dim = channel_dim(spec, u)
    groups = spec.groups if (rule.competition_scope == "group" and spec.kind == "conv") else 1
    v = u if groups == 1 else u.unflatten(dim, (groups, u.shape[dim] // groups))
    d = dim if groups == 1 else dim + 1
    if rule.competition == "softmax":
        y = fast.softmax_units(v, d, rule.temperature)
    else:  # hard winner-take-all: one-hot of the argmax
        y = torch.zeros_like(v).scatter_(d, v.argmax(dim=d, keepdim=True), 1.0)
    return y if groups == 1 else y.flatten(dim, dim + 1)


# ---- 2. the local term ----------------------------------------------------------------------
def hebbian_raw(
    spec: CallSpec,
    x: torch.Tensor,
    u: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    rule: HebbianRule,
    dtype: torch.dtype | None = None,
    presampled: bool = False,
    u_exact: bool = True,
) -> torch.Tensor:
    """Un-normalised local term H of one call (same shape as w).

    With ``dtype`` (operands in a lower precision, ``precision="autocast"``), y and the
    correlation are computed in the operands' dtype, Oja's decay and H in ``dtype``.
    ``presampled``: x and u are the sampled mode's block already (``sampled.sample_block``).
    ``u_exact=False``: u was rounded to a lower precision than x and w (the call ran under
    autocast, its operands upcast since): Oja's sum is then taken over the weight."""
    if rule.sample_fraction < 1.0 and not presampled:
        if rule.sample_over == "positions" and spec.kind == "conv" and not spec.transposed:
            return hebbian_positions(spec, x, u, w, b, rule, dtype)
        x, u = sampled.subsample(spec, x, u, rule.sample_fraction, rule.sample_over)
    y = compete(u, spec, rule)
    return finish_in(spec, weight_vjp(spec, x, w, y), y, w, b, rule, dtype, u if u_exact else None)


def finish_in(
    spec: CallSpec,
    corr: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    rule: HebbianRule,
    dtype: torch.dtype | None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`hebbian_finish` in ``dtype``: the correlation, w and b cast to it first (rounded
    once, as backprop's own weight gradient is under autocast). ``u``: the call's output
    under y, for ``fast.activity_sums`` (not used when a cast is needed)."""
    if dtype is not None and corr.dtype != dtype:
        corr, w = corr.to(dtype), w.to(dtype)
        b, u = None if b is None else b.to(dtype), None
    return hebbian_finish(spec, corr, y, w, b, rule, u=u)


def hebbian_positions(
    spec: CallSpec,
    x: torch.Tensor,
    u: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    rule: HebbianRule,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """H from a random grid of output positions of every sample: every q-th position along
    each spatial dim from a random offset (``sampled.grid_steps``), computed as the weight
    gradient of the equivalent strided conv (no patches are unfolded)."""
    grid = sampled.sample_grid(spec, x.shape, w.shape, u.shape, rule.sample_fraction)
    s, sx, su = sampled.grid_call(spec, x, u, grid)
    y = compete(su, spec, rule)
    if any(g.length == 0 for g in grid):  # only padding under the sampled outputs
        corr = torch.zeros_like(w, memory_format=torch.contiguous_format)
    else:
        corr = weight_vjp(s, sx, w, sampled.grid_pad(y, grid))
    return finish_in(spec, corr, y, w, b, rule, dtype)


def hebbian_finish(
    spec: CallSpec,
    corr: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    rule: HebbianRule,
    out: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """H from the correlation ``corr`` = sum y.x (overwritten): ``corr`` minus Oja's decay
    ``(sum y*u)[k] W[k]``, or ``corr`` itself for the plain Hebb rule. u is linear in W, so
    ``(sum y*u)[k] = <W_k, corr_k> + b_k sum y_k``, summed over the weight; or over y and u
    where ``fast.activity_sums`` says they are the smaller. With ``out`` (units leading the
    weight only), H is written there."""
    if rule.local_rule == "hebb":
        return corr if out is None else out.copy_(corr)
    if out is None and u is not None and fast.activity_sums(spec, y, u, w, corr):
        s = fast.unit_activity(spec, y, u)  # (u includes the bias: no separate bias term)
        return corr.addcmul_(unit_scale(spec, s, w), w.detach(), value=-1.0)
    extra = None
    if b is not None:
        dim = channel_dim(spec, y)
        dims = [i for i in range(y.dim()) if i != dim]
        # (sum(dim=[]) would sum over everything; a lower-precision y is summed in b's dtype)
        sum_dtype = None if y.dtype == b.dtype else b.dtype
        extra = b * (y.sum(dim=dims, dtype=sum_dtype) if dims else y.to(b.dtype))
    if units_lead(spec, corr):
        # (detached: torch.compile would specialise on a Parameter's shape)
        return fused.oja_decay_(corr, w.detach(), extra, out)
    assert out is None, "out: units leading the weight only"
    s = unit_sum(spec, corr * w)  # per unit <corr, w> (transposed convs, 1-D weights)
    if extra is not None:
        s = s + extra
    return corr.addcmul_(unit_scale(spec, s, w), w, value=-1.0)


def unit_scale(spec: CallSpec, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-output-unit vector ``s`` onto the weight's shape."""
    if spec.kind == "linear" or not spec.transposed:
        return s.view(-1, *([1] * (w.dim() - 1)))
    g = spec.groups  # transposed weight: (C_in, C_out/g, *k); unit = group*(C_out/g) + j
    cin, cog = w.shape[0], w.shape[1]
    sw = s.view(g, 1, cog).expand(g, cin // g, cog).reshape(cin, cog)
    return sw.view(cin, cog, *([1] * (w.dim() - 2)))


def unit_sum(spec: CallSpec, t: torch.Tensor) -> torch.Tensor:
    """Sum a weight-shaped tensor over everything but the output unit (inverse of
    :func:`unit_scale`)."""
    if spec.kind == "linear" or not spec.transposed:
        return t.sum(dim=list(range(1, t.dim()))) if t.dim() > 1 else t
    g = spec.groups  # transposed weight: (C_in, C_out/g, *k)
    cin, cog = t.shape[0], t.shape[1]
    per = t.sum(dim=list(range(2, t.dim()))) if t.dim() > 2 else t
    return per.view(g, cin // g, cog).sum(1).reshape(-1)


# ---- 3. normalisation -----------------------------------------------------------------------
def normalise(h: torch.Tensor) -> torch.Tensor:
    return h / (h.abs().max() + 1e-30)


def unit_amax(a: torch.Tensor, axes: UnitAxes = UNITS_LEAD) -> torch.Tensor:
    """Per output unit, the max of the non-negative weight-shaped ``a``, broadcastable onto
    it. Units lead the weight except for transposed convs ((C_in, C_out/g, *k): unit = group,
    column)."""
    transposed, g = axes
    if a.dim() < 2:
        return a.amax()
    if not transposed:
        return a.amax(dim=tuple(range(1, a.dim())), keepdim=True)
    cin, cog = a.shape[0], a.shape[1]
    per = a.flatten(2).amax(2).view(g, cin // g, cog).amax(1, keepdim=True)
    return per.expand(g, cin // g, cog).reshape(cin, cog).view(cin, cog, *([1] * (a.dim() - 2)))


def scale_of(
    h: torch.Tensor, rule: HebbianRule, axes: UnitAxes = UNITS_LEAD, nonneg: bool = False
) -> torch.Tensor:
    """max|H| + 1e-30 over the layer, or per output unit (``normalisation="unit"``);
    ``nonneg``: h is already |H|. (Plain max reductions: docs/PERFORMANCE.md, 'Why the
    runtime chooses what it does'.)"""
    if rule.normalisation == "layer":
        if nonneg:
            return h.amax() + 1e-30
        lo, hi = torch.aminmax(h)
        return torch.maximum(hi, -lo) + 1e-30
    return unit_amax(h if nonneg else h.abs(), axes) + 1e-30


# ---- 4. combination -------------------------------------------------------------------------
def combine(
    h_raw: torch.Tensor,
    g: torch.Tensor | None,
    rule: HebbianRule,
    inplace: bool = False,
    axes: UnitAxes = UNITS_LEAD,
    global_signal: str = "grad_sign",
) -> torch.Tensor:
    """The plastic weight's gradient: |H_n| * sign(G) (GHL), or -H_n (pure Hebbian, where
    ``global_signal="none"`` or ``g`` is None). ``inplace`` writes it into ``h_raw`` (no new
    weight-sized buffer)."""
    if global_signal == "none" or g is None:
        scale = scale_of(h_raw, rule, axes)
        return (h_raw if inplace else h_raw.clone()).div_(scale).neg_()
    if inplace and rule.normalisation == "layer":
        return fused.sign_combine_(h_raw, g)
    out = h_raw.abs_() if inplace else h_raw.abs()
    scale = scale_of(out, rule, axes, nonneg=True)
    return out.mul_(torch.sign(g)).div_(scale)  # sign(0) = 0: no step without a direction
