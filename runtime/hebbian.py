"""The GHL rule itself: competition, the Oja/Hebb term, normalisation and sign combination.

For a call ``u = f(x; W) + b``:  ``y = softmax(t*u)`` over output units,
``H = sum y.x - (sum y*u)[k] W[k]``, where ``sum y.x`` is the weight-gradient (VJP w.r.t. W)
with cotangent y, computed by the vendor's weight-gradient kernel, or where that runs slowly as
one forward conv over the same operands (no unfolded patches either way).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ghlc.graph import HebbianRule

from . import fused
from .calls import CallSpec


def channel_dim(spec: CallSpec, u: torch.Tensor) -> int:
    return u.dim() - 1 if spec.kind == "linear" else 1


def compete(u: torch.Tensor, spec: CallSpec, rule: HebbianRule) -> torch.Tensor:
    """Post-synaptic activity y from pre-activations u (competition over output units)."""
    if rule.competition == "none":
        return u
    dim = channel_dim(spec, u)
    groups = spec.groups if (rule.competition_scope == "group" and spec.kind == "conv") else 1
    v = u if groups == 1 else u.unflatten(dim, (groups, u.shape[dim] // groups))
    d = dim if groups == 1 else dim + 1
    if rule.competition == "softmax":
        y = softmax_units(v, d, rule.temperature)
    else:  # hard winner-take-all: one-hot of the argmax
        y = torch.zeros_like(v).scatter_(d, v.argmax(dim=d, keepdim=True), 1.0)
    return y if groups == 1 else y.flatten(dim, dim + 1)


def softmax_units(v: torch.Tensor, dim: int, t: float) -> torch.Tensor:
    """softmax(t * v) over ``dim``. On CUDA, for a dim that is not the innermost (channels of
    NCHW), torch's spatial softmax kernel runs far below memory bandwidth (measured on an H100:
    ~21 ms per ResNet-50 step at 224x224, batch 64); ``fused.softmax`` computes it as one
    Triton kernel (in CUDA graphs and for large outputs) or as reductions and in-place passes.
    Elsewhere torch.softmax is the faster; with a temperature, on CPU, it runs in place on
    ``t * v`` (a contiguous tensor of our own): one activation-sized buffer and one pass fewer
    than ``torch.softmax(v * t)``, the same numbers (measured on a 2-core CPU, 64x64x32x32:
    4.9 against 6.0 ms)."""
    if dim in (-1, v.dim() - 1) or not (v.is_cuda or fused.active(v)):
        order = _innermost_order(v, dim) if v.device.type == "cpu" else None
        if order is not None:  # dim is innermost in memory (channels_last): softmax there
            inverse = sorted(range(v.dim()), key=order.__getitem__)
            return softmax_units(v.permute(order), v.dim() - 1, t).permute(inverse)
        if t == 1.0:
            return torch.softmax(v, dim=dim)
        s = v * t
        if s.device.type == "cpu" and s.is_contiguous():
            return torch._softmax(s, dim, False, out=s)
        return torch.softmax(s, dim=dim)
    return fused.softmax(v, dim, t)


def _innermost_order(v: torch.Tensor, dim: int) -> list[int] | None:
    """The permutation of ``v``'s dims into memory order, where that makes ``v`` contiguous
    with ``dim`` last but ``v`` itself is not (a channels-last output and its channel dim);
    None elsewhere. torch's CPU softmax first copies such a tensor into the standard layout
    and returns it there, so the weight-gradient call that reads y copies it back; over the
    permuted view the softmax reads and writes the memory as it lies, and in its fast
    innermost-dim kernel."""
    dim %= v.dim()
    if v.dim() < 3 or v.stride(dim) != 1 or dim == v.dim() - 1 or v.is_contiguous():
        return None
    order = sorted((d for d in range(v.dim()) if d != dim), key=lambda d: -v.stride(d))
    order.append(dim)
    return order if v.permute(order).is_contiguous() else None


# Output units per block where a weight gradient is computed a block at a time: the in-call
# combine (at most this many, at least two blocks) and large conv weights on CPU (below). On
# the 2-core CPU, dL/dx plus dL/dW in blocks of 256 units took 0.95-1.04 x backprop's one
# combined call for ResNet-18's layer4 convs and 0.86 x for DeepHebb's 1536x384x3x3, against
# 1.09-1.21 x and 0.89 x in eight blocks (64 units for a 512-unit weight: oneDNN's kernels
# run slower on narrow blocks).
BLOCK_UNITS = 256
# Conv weights of at least this many elements (and more than BLOCK_UNITS output units) get
# their Hebbian correlation a block of BLOCK_UNITS units at a time on these devices: there
# oneDNN's weight gradient in blocks took 0.48-0.81 x the one call's time for 3x3 weights of
# 4.7-9.4 M elements at 4x4-8x8 outputs (DeepHebb's 1536x384x3x3: 0.75 x), and 0.95-1.12 x
# on ResNet-18's smaller 3x3 weights (microbenchmarks, bench/wgrad_blocks.py).
WGRAD_BLOCK_MIN_NUMEL = 1 << 22
WGRAD_BLOCK_DEVICES = {"cpu"}


def _conv_wgrad(spec: CallSpec, x: torch.Tensor, w: torch.Tensor,
                cot: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        cot, x, w, None, spec.stride, spec.padding, spec.dilation, spec.transposed,
        spec.output_padding if spec.transposed else (0,) * spec.nd, spec.groups,
        [False, True, False],
    )[1]


# Small-output plain convs on these devices get their Hebbian correlation as a FORWARD conv
# (:func:`_conv_wgrad_as_forward`): oneDNN's weight-gradient kernel runs far below its forward
# rate when the sum over batch x output positions is short, and the forward kernel does not.
# `python bench/wgrad_blocks.py --model M [--batch 16]` on a 2-core AVX2 CPU, forward form over
# one weight-gradient call: ResNet-18's 512x512x3x3 at 4x4 outputs 0.44 x (batch 16: 0.58 x),
# its 256x256x3x3 at 8x8 0.73-0.78 x, FastHebb's 3x3 convs at 12x12-3x3 0.73-0.94 x,
# DeepHebb's 1536x384x3x3 at 8x8 0.68 x; at batch 64 x 16x16 outputs 0.87 x (DeepHebb) but
# 1.12-1.17 x (ResNet-18), at 32x32 1.8 x (hence the limit on batch x positions: 64 x 12 x
# 12); strided convs 0.95-1.8 x and 1x1 convs 1.4-5.2 x (the form then has one output
# position), so strided or dilated convs and kernels with a dim of 1 keep the weight-gradient
# call. Backprop's own dL/dW (the in-call combine) keeps it too. Small convs keep it as well:
# the form's fixed cost (its transposed operands, the crop and copy, more host time) loses
# below about 16 M multiply-adds, and with fewer than 64 input or output channels it did not
# gain at any size timed (`python bench/wgrad_blocks.py --small --repeats 21 --units 256`, 2
# threads: 1.19-1.67 x up to 5.3 M multiply-adds, 1.03-1.10 x at 11.9 M; from 21 M on 1.12 x
# at 16 channels, 0.98-1.02 x at 32, 0.77-0.93 x at 64-96).
FORWARD_WGRAD_MAX_REDUCTION = 64 * 12 * 12
FORWARD_WGRAD_MIN_MACS = 1 << 24
FORWARD_WGRAD_MIN_CHANNELS = 64
FORWARD_WGRAD_DEVICES = {"cpu"}


def wgrad_as_forward(spec: CallSpec, w: torch.Tensor, cot: torch.Tensor) -> bool:
    """Whether :func:`weight_vjp` computes the weight gradient of ``w`` with cotangent ``cot``
    as a forward convolution (:func:`_conv_wgrad_as_forward`)."""
    return (spec.kind == "conv" and not spec.transposed and spec.groups == 1
            and cot.device.type in FORWARD_WGRAD_DEVICES and all(k > 1 for k in w.shape[2:])
            and all(s == 1 for s in spec.stride) and all(d == 1 for d in spec.dilation)
            and min(w.shape[0], w.shape[1]) >= FORWARD_WGRAD_MIN_CHANNELS
            and cot.numel() * w.shape[1:].numel() >= FORWARD_WGRAD_MIN_MACS
            and 0 < cot.shape[0] * cot.shape[2:].numel() <= FORWARD_WGRAD_MAX_REDUCTION)


def _conv_wgrad_as_forward(spec: CallSpec, x: torch.Tensor, w: torch.Tensor,
                           cot: torch.Tensor) -> torch.Tensor:
    """A plain conv's weight gradient as forward convs: batch and channels swapped, the
    cotangent as the kernel. dW[o, c, i] = sum_{n, p} cot[n, o, p] xpad[n, c, s*p + d*i] is a
    conv of xpad^T (channels n) with kernel cot^T (dilation s), output stride d, cropped to
    the weight's extent and written in the weight's layout; BLOCK_UNITS output units a call,
    so that the conv's (C_in, C_out) result and the written gradient coexist for one block
    only (ResNet-18's 512x512x3x3 in two blocks: 1.04 x one call's time; DeepHebb's
    1536x384x3x3 in six: 0.82-0.93 x)."""
    out = torch.empty_like(w, dtype=cot.dtype)
    xt, k, n = x.transpose(0, 1), w.shape[2:], w.shape[0]
    crop = (slice(None), slice(None), *(slice(0, m) for m in k))
    for s in range(0, n, BLOCK_UNITS):
        e = min(n, s + BLOCK_UNITS)
        r = torch.convolution(xt, cot.narrow(1, s, e - s).transpose(0, 1), None, spec.dilation,
                              spec.padding, spec.stride, False, (0,) * spec.nd, 1)
        out[s:e].copy_(r[crop].transpose(0, 1))
    return out


def wgrad_blocked(spec: CallSpec, w: torch.Tensor) -> bool:
    """Whether :func:`weight_vjp` computes this call's weight gradient in blocks of units."""
    return (spec.kind == "conv" and not spec.transposed and spec.groups == 1
            and w.shape[0] > BLOCK_UNITS and w.numel() >= WGRAD_BLOCK_MIN_NUMEL
            and w.device.type in WGRAD_BLOCK_DEVICES)


def weight_vjp(spec: CallSpec, x: torch.Tensor, w: torch.Tensor, cot: torch.Tensor, *,
               as_forward: bool = True) -> torch.Tensor:
    """sum over uses of cot (x) x: the weight gradient of the call with cotangent ``cot``
    (as a forward conv where :func:`wgrad_as_forward` and ``as_forward``, else in blocks of
    output units where :func:`wgrad_blocked`; the same sums). ``as_forward=False`` is for
    backprop's own dL/dW, which ghlc computes the way backprop does."""
    if spec.kind == "linear":
        return cot.reshape(-1, cot.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    if as_forward and wgrad_as_forward(spec, w, cot):
        return _conv_wgrad_as_forward(spec, x, w, cot)
    if not wgrad_blocked(spec, w):
        return _conv_wgrad(spec, x, w, cot)
    return wgrad_by_units(spec, x, w, cot, BLOCK_UNITS)


def wgrad_by_units(spec: CallSpec, x: torch.Tensor, w: torch.Tensor, cot: torch.Tensor,
                   units: int) -> torch.Tensor:
    """A plain conv's weight gradient with cotangent ``cot``, ``units`` output units a call."""
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    n = w.shape[0]
    for s in range(0, n, units):
        e = min(n, s + units)
        out[s:e] = _conv_wgrad(spec, x, w[s:e], cot.narrow(1, s, e - s))
    return out


def units_lead(spec: CallSpec, t: torch.Tensor) -> bool:
    """Whether the weight-shaped ``t`` of this call has its output units along dim 0 (not a
    transposed conv's weight, not a 1-D weight)."""
    return (spec.kind == "linear" or not spec.transposed) and t.dim() > 1


def unit_scale(spec: CallSpec, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-output-unit vector ``s`` onto the weight's layout."""
    if spec.kind == "linear" or not spec.transposed:
        return s.view(-1, *([1] * (w.dim() - 1)))
    g = spec.groups  # transposed weight: (C_in, C_out/g, *k); unit = group*(C_out/g) + j
    cin, cog = w.shape[0], w.shape[1]
    sw = s.view(g, 1, cog).expand(g, cin // g, cog).reshape(cin, cog)
    return sw.view(cin, cog, *([1] * (w.dim() - 2)))


def unit_sum(spec: CallSpec, t: torch.Tensor) -> torch.Tensor:
    """Sum a weight-shaped tensor over everything but the output unit (inverse of
    ``unit_scale``)."""
    if spec.kind == "linear" or not spec.transposed:
        return t.sum(dim=list(range(1, t.dim()))) if t.dim() > 1 else t
    g = spec.groups  # transposed weight: (C_in, C_out/g, *k)
    cin, cog = t.shape[0], t.shape[1]
    per = t.sum(dim=list(range(2, t.dim()))) if t.dim() > 2 else t
    return per.view(g, cin // g, cog).sum(1).reshape(-1)


def hebbian_raw(
    spec: CallSpec, x: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
    rule: HebbianRule, dtype: torch.dtype | None = None, presampled: bool = False,
    u_exact: bool = True,
) -> torch.Tensor:
    """Un-normalised local term H of one call (same shape as w).

    Oja's decay ``sum_j y_k u_k`` is taken as ``<W_k, corr_k> + b_k sum_j y_k`` (u is linear
    in W, so the two are equal), or over y and u where they are the smaller
    (:func:`activity_sums`). With ``dtype``
    (operands in a lower precision, ``precision="autocast"``), y and the correlation are
    computed in the operands' dtype, and Oja's decay and H in ``dtype`` (:func:`finish_in`).
    ``presampled``: x and u are the sampled mode's block already (:func:`sample_block`).
    ``u_exact=False``: u was rounded to a lower precision than x and w are in (the call ran
    under autocast, its operands upcast since): Oja's sum is then taken over the weight."""
    if rule.sample_fraction < 1.0 and not presampled:
        if rule.sample_over == "positions" and spec.kind == "conv" and not spec.transposed:
            return _hebbian_positions(spec, x, u, w, b, rule, dtype)
        x, u = _subsample(spec, x, u, rule.sample_fraction, rule.sample_over)
    y = compete(u, spec, rule)
    return finish_in(spec, weight_vjp(spec, x, w, y), y, w, b, rule, dtype,
                     u if u_exact else None)


def finish_in(spec: CallSpec, corr: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
              b: torch.Tensor | None, rule: HebbianRule, dtype: torch.dtype | None,
              u: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`hebbian_finish` in ``dtype``: the correlation, w and b cast to it first (the
    correlation of a lower-precision call is rounded once, as backprop's own weight gradient
    is under autocast; the rest of the rule runs in ``dtype``). ``u``: the call's output
    under y, for :func:`activity_sums` (not used when a cast is needed)."""
    if dtype is not None and corr.dtype != dtype:
        corr, w = corr.to(dtype), w.to(dtype)
        b, u = None if b is None else b.to(dtype), None
    return hebbian_finish(spec, corr, y, w, b, rule, u=u)


# Devices where Oja's per-unit sum over y * u may be taken over the activations
# (:func:`activity_sums`). On the 2-core CPU, for linear layers at batch 64 the weight-sized
# dot products <W_k, corr_k> were the larger part of the rule's own time; CUDA keeps them
# (one bmm, not measured there).
ACTIVITY_SUM_DEVICES = {"cpu"}


def activity_sums(spec: CallSpec, y: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                  corr: torch.Tensor) -> bool:
    """Whether Oja's per-unit ``sum_j y_k u_k`` is summed over the call's y and u (fewer
    elements than the weight: linear layers at ordinary batch sizes, convs with small
    outputs) instead of as ``<W_k, corr_k> + b_k sum_j y_k`` over the weight; the same sum.
    Output units along the weight's dim 0, one dtype, eager kernels."""
    return (u.device.type in ACTIVITY_SUM_DEVICES and u.numel() < w.numel()
            and units_lead(spec, corr)
            and u.dtype == y.dtype == corr.dtype and not fused.active(corr))


def unit_activity(spec: CallSpec, y: torch.Tensor, u: torch.Tensor,
                  block: int | None = None) -> torch.Tensor:
    """Per output unit, the sum of ``y * u`` over batch and positions, a block of samples (or
    rows) at a time: a product temporary of at most ``block`` elements (default
    ``fused.DOT_BLOCK_NUMEL``)."""
    block = fused.DOT_BLOCK_NUMEL if block is None else block
    if spec.kind == "linear":
        y, u = y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1])
    dims = [0, *range(2, y.dim())]
    n = y.shape[0]
    rows = max(1, block // max(1, y.shape[1:].numel()))
    s = (y[:rows] * u[:rows]).sum(dims)
    for r in range(rows, n, rows):
        s += (y[r:r + rows] * u[r:r + rows]).sum(dims)
    return s


def hebbian_finish(spec: CallSpec, corr: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                   b: torch.Tensor | None, rule: HebbianRule,
                   out: torch.Tensor | None = None,
                   u: torch.Tensor | None = None) -> torch.Tensor:
    """H from the correlation ``corr`` = sum y.x (overwritten): Oja's decay, or ``corr``
    itself for the plain Hebb rule. With ``out`` (rows layout only), H is written there.
    ``u`` (the call's output under y): Oja's per-unit sum is taken over y and u where
    :func:`activity_sums` says so."""
    if rule.local_rule == "hebb":
        return corr if out is None else out.copy_(corr)
    if out is None and u is not None and activity_sums(spec, y, u, w, corr):
        s = unit_activity(spec, y, u)  # (u includes the bias: no separate bias term)
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
    assert out is None, "out: rows layout only"
    s = unit_sum(spec, corr * w)  # per unit <corr, w> (transposed convs, 1-D weights)
    if extra is not None:
        s = s + extra
    return corr.addcmul_(unit_scale(spec, s, w), w, value=-1.0)


def stackable(spec: CallSpec, rule: HebbianRule) -> bool:
    """Calls whose Hebbian correlation can share one weight-gradient call with backprop's
    (:func:`stacked_wgrads`): plain convs over the whole batch."""
    return (spec.kind == "conv" and not spec.transposed and spec.groups == 1
            and rule.sample_fraction >= 1.0)


def stacked_wgrads(spec: CallSpec, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                   u: torch.Tensor, g: torch.Tensor, rule: HebbianRule
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
    fmt = (torch.channels_last if w.dim() == 4 and not w.is_contiguous()
           and w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    w2 = torch.empty((2 * c, *w.shape[1:]), dtype=w.dtype, device=w.device, memory_format=fmt)
    both = weight_vjp(spec, x, w2, gy, as_forward=False)  # (w2: only its shape is read)
    h = torch.empty_like(w, memory_format=torch.contiguous_format)
    return both[:c], hebbian_finish(spec, both[c:], y, w, b, rule, out=h)


def normalise(h: torch.Tensor) -> torch.Tensor:
    return h / (h.abs().max() + 1e-30)


Layout = tuple[bool, int]  # (transposed, groups) of the calls using the weight
ROWS: Layout = (False, 1)  # output units along dim 0 (Linear, Conv, views of them)


def unit_amax(a: torch.Tensor, layout: Layout = ROWS) -> torch.Tensor:
    """Per output unit, the max of the non-negative weight-shaped ``a``, broadcastable onto
    it. Units lead the weight except for transposed convs ((C_in, C_out/g, *k): unit = group,
    column)."""
    transposed, g = layout
    if a.dim() < 2:
        return a.amax()
    if not transposed:
        return a.amax(dim=tuple(range(1, a.dim())), keepdim=True)
    cin, cog = a.shape[0], a.shape[1]
    per = a.flatten(2).amax(2).view(g, cin // g, cog).amax(1, keepdim=True)
    return per.expand(g, cin // g, cog).reshape(cin, cog).view(cin, cog, *([1] * (a.dim() - 2)))


def _scale(h: torch.Tensor, rule: HebbianRule, layout: Layout,
           nonneg: bool = False) -> torch.Tensor:
    """max|H| over the layer, or per output unit (``normalisation="unit"``); ``nonneg``: h
    is already |H|. (Plain max reductions: torch.linalg.vector_norm(h, inf) measured ~50x
    slower than amax on CPU.)"""
    if rule.normalisation == "layer":
        if nonneg:
            return h.amax() + 1e-30
        lo, hi = torch.aminmax(h)
        return torch.maximum(hi, -lo) + 1e-30
    return unit_amax(h if nonneg else h.abs(), layout) + 1e-30


def combine(h_raw: torch.Tensor, g: torch.Tensor | None, rule: HebbianRule,
            inplace: bool = False, layout: Layout = ROWS, *,
            global_signal: str = "grad_sign") -> torch.Tensor:
    """The plastic weight's gradient: |H_n| * sign(G) (GHL), or -H_n (pure Hebbian:
    ``global_signal="none"`` or no G), where H_n = H / max|H| over the layer or over each
    output unit. ``inplace`` writes it into ``h_raw`` (no new weight-sized buffer)."""
    if global_signal == "none" or g is None:
        scale = _scale(h_raw, rule, layout)
        return (h_raw if inplace else h_raw.clone()).div_(scale).neg_()
    if inplace and rule.normalisation == "layer":
        return fused.sign_combine_(h_raw, g)
    out = h_raw.abs_() if inplace else h_raw.abs()
    scale = _scale(out, rule, layout, nonneg=True)
    return out.mul_(torch.sign(g)).div_(scale)  # sign(0) = 0: no step without a direction


def fusable(spec: CallSpec) -> bool:
    """Calls whose weight gradient splits by output unit along the weight's dim 0."""
    return spec.kind == "linear" or (not spec.transposed and spec.groups == 1)


def _weight_grad_rows(spec: CallSpec, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                      s: int, e: int) -> torch.Tensor:
    """dL/dW for output units s..e-1 only."""
    if spec.kind == "linear":
        g2 = g.reshape(-1, g.shape[-1])[:, s:e]
        return g2.t() @ x.reshape(-1, x.shape[-1])
    return weight_vjp(spec, x, w[s:e], g.narrow(1, s, e - s), as_forward=False)


def block_units(n: int) -> int:
    """Output units per block of the in-call combine for a weight of ``n`` units."""
    return max(1, min(BLOCK_UNITS, -(-n // 2)))


def fused_combine(spec: CallSpec, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                  h: torch.Tensor, rule: HebbianRule, units: int | None = None, *,
                  global_signal: str = "grad_sign") -> torch.Tensor:
    """``combine(h, dL/dW, rule, inplace=True)`` for a weight used by this call alone, with
    dL/dW computed a block of output units at a time (``units`` per block, default
    :func:`block_units`): the full gradient never exists, so the step needs most of a
    weight-sized buffer fewer (H becomes the gradient). The pure Hebbian rule needs no dL/dW
    at all."""
    if global_signal == "none":
        return combine(h, None, rule, inplace=True)
    a = h.abs_()
    scale = _scale(a, rule, ROWS, nonneg=True)
    n = w.shape[0]
    step = units or block_units(n)
    for s in range(0, n, step):
        e = min(n, s + step)
        sc = scale if scale.dim() == 0 else scale[s:e]
        fused.scaled_sign_(a[s:e], _weight_grad_rows(spec, g, x, w, s, e), sc)
    return a


# Split timing (large conv weights whose output backprop does not keep): H of the first units
# is computed in the forward pass and kept; for the last SPLIT_UNITS units only the softmax's
# per-position log-sum-exp is kept, and their output and H are recomputed a block at a time in
# the backward pass. One forward conv over those units buys their rows of H not held between
# the passes (DeepHebb's 1536x384x3x3 conv on a 2-core CPU: 512 units, peak 1.061 -> 1.047 x
# backprop's, the step 1.055 x as long, still within 1.05 x its arithmetic floor). Taken by
# ``hebbian_at="recompute"`` everywhere and by ``"auto"`` on SPLIT_DEVICES; on CUDA that conv's
# peak was within 1.05 x backprop's without it (an H100), so there it would only cost time.
SPLIT_UNITS = 512
SPLIT_MIN_NUMEL = 1 << 22
SPLIT_DEVICES = {"cpu"}


def splits(timing: str, w: torch.Tensor) -> bool:
    """Whether ``hebbian_at=timing`` splits a call of ``w`` that :func:`split_units` allows."""
    return timing == "recompute" or (timing == "auto" and w.device.type in SPLIT_DEVICES)


def split_units(spec: CallSpec, w: torch.Tensor, rule: HebbianRule) -> int:
    """How many output units of this call :func:`hebbian_split` recomputes (0: no split)."""
    if (spec.kind != "conv" or spec.transposed or spec.groups != 1
            or w.numel() < SPLIT_MIN_NUMEL
            or rule.competition != "softmax" or rule.competition_scope != "layer"
            or (rule.sample_fraction < 1.0 and rule.sample_over != "batch")
            or w.shape[0] < 2 * SPLIT_UNITS):
        return 0
    return SPLIT_UNITS


@dataclass
class SplitH:
    """What :func:`hebbian_split` keeps between the passes: H of units [0, k), the
    log-sum-exp of t*u over all units at every position, and the input H is over (the
    call's input, or a view of its sampled block)."""

    h: torch.Tensor | None
    lse: torch.Tensor
    x: torch.Tensor


def hebbian_split(spec: CallSpec, x: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                  b: torch.Tensor | None, rule: HebbianRule, n_recompute: int) -> SplitH:
    """Forward half of the split timing: H of all units but the last ``n_recompute``
    (:func:`hebbian_raw`'s numbers, to float32 rounding, once :func:`hebbian_split_finish`
    has added the rest)."""
    if rule.sample_fraction < 1.0:
        x, u = _subsample(spec, x, u, rule.sample_fraction, rule.sample_over)
    k = w.shape[0] - n_recompute
    s = u * rule.temperature
    lse = torch.logsumexp(s, dim=1, keepdim=True)
    y = torch.sub(s[:, :k], lse).exp_()
    del s
    # (in blocks of units where the whole weight's correlation would be: w[:k] alone may be
    # under the size limit, and one call on it is the slower)
    corr = (wgrad_by_units(spec, x, w[:k], y, BLOCK_UNITS)
            if wgrad_blocked(spec, w) and not wgrad_as_forward(spec, w, y)
            else weight_vjp(spec, x, w[:k], y))
    h = hebbian_finish(spec, corr, y, w[:k], None if b is None else b[:k], rule)
    return SplitH(h, lse, x)


def hebbian_split_finish(spec: CallSpec, w: torch.Tensor, b: torch.Tensor | None,
                         kept: SplitH, rule: HebbianRule) -> torch.Tensor:
    """Backward half: H of the last units from their recomputed output, joined to the rest."""
    n, k, x = w.shape[0], kept.h.shape[0], kept.x
    h = torch.empty_like(w, memory_format=torch.contiguous_format)
    h[:k] = kept.h
    kept.h = None
    step = block_units(n - k)
    for s0 in range(k, n, step):
        e = min(n, s0 + step)
        ws, bs = w[s0:e], None if b is None else b[s0:e]
        y = spec.run(x, ws, bs).mul_(rule.temperature).sub_(kept.lse).exp_()
        h[s0:e] = hebbian_finish(spec, weight_vjp(spec, x, ws, y), y, ws, bs, rule)
    return h


def block_fraction(rule: HebbianRule) -> float:
    """The part of a call's output the sampled mode reads: its fraction where it takes a block
    of the batch (what :func:`sample_block` keeps), 1.0 otherwise."""
    return rule.sample_fraction if rule.sample_over == "batch" else 1.0


def sample_block(spec: CallSpec, x: torch.Tensor, u: torch.Tensor, rule: HebbianRule
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled mode's block of the batch, drawn now: a view of x (which backprop keeps)
    and a copy of u's block (so that u itself need not be kept), for
    ``hebbian_raw(..., presampled=True)`` in the backward pass."""
    xs, us = _subsample(spec, x, u, rule.sample_fraction, rule.sample_over)
    return xs, us.clone()


def draw(n: int) -> int:
    """A uniform integer in [0, n) from torch's generator (every random choice of the sampled
    modes; tests replace it to fix the choice)."""
    return int(torch.randint(0, n, ()))


def _subsample(spec: CallSpec, x: torch.Tensor, u: torch.Tensor, frac: float,
               over: str = "batch"):
    """Fast approximate mode over the batch: a random contiguous block of samples (rows for
    linear), a view, so no activation is copied; batches are shuffled by the data loader.
    ``over="positions"`` for a linear layer: every n-th row (n = round(1/frac)) from a random
    offset, so every sample contributes."""
    if spec.kind == "linear":
        x, u = x.reshape(-1, x.shape[-1]), u.reshape(-1, u.shape[-1])
    n = x.shape[0]
    if over == "positions" and spec.kind == "linear":
        q = min(n, grid_steps(frac, 1)[0])
        a = draw(q)
        return x[a::q], u[a::q]
    k = max(1, int(round(frac * n)))
    if k >= n:
        return x, u
    start = draw(n - k + 1)
    return x.narrow(0, start, k), u.narrow(0, start, k)


@functools.cache
def grid_steps(frac: float, nd: int) -> tuple[int, ...]:
    """Steps of the sampled grid per spatial dim: integers whose product is round(1/frac),
    as equal as they can be (the larger ones last): 0.25 in 2-D is every 2nd row and column."""
    n = max(1, round(1 / frac))

    def split(n: int, k: int) -> tuple[int, ...]:
        if k == 1:
            return (n,)
        best: tuple[int, ...] | None = None
        for d in range(1, n + 1):
            if n % d == 0:
                cand = (d, *split(n // d, k - 1))
                if best is None or max(cand) < max(best):
                    best = cand
        assert best is not None
        return best

    return split(n, nd)


@dataclass(frozen=True)
class GridDim:
    """One spatial dim of a sampled grid of output positions ``a, a+q, ...`` (``m`` of them),
    as a strided conv: input narrowed to ``[start, start+length)``, stride ``stride``,
    padding ``pad``, and ``lead`` all-zero output rows before the sampled ones. ``length``
    0: the sampled outputs read padding only."""

    q: int
    a: int
    m: int
    start: int
    length: int
    stride: int
    pad: int
    lead: int


def grid_dim(length: int, out: int, k: int, s: int, p: int, d: int, q: int, a: int) -> GridDim:
    """The strided conv whose outputs are outputs ``a, a+q, ...`` of a conv (kernel ``k``,
    stride ``s``, symmetric padding ``p``, dilation ``d``) over ``length`` input rows with
    ``out`` outputs. Output ``a+q*j`` reads input rows ``(a+q*j)*s - p + t*d``: a stride of
    ``q*s`` from row ``a*s - p``. Where the sampled outputs read more padding at the end than
    at the start, the padding is made symmetric by adding a multiple of the stride at both
    ends, which puts ``lead`` extra outputs (zero cotangent) before the sampled ones; the
    last sampled output is then the strided call's last."""
    m = (out - a + q - 1) // q
    big = q * s
    if a * s >= p:
        pad, start = 0, a * s - p
    else:
        pad, start = p - a * s, 0
    last = (m - 1) * big + d * (k - 1) - pad  # last row read, relative to start
    avail = length - start
    if last < 0 or avail <= 0:
        return GridDim(q, a, m, min(start, length), 0, big, pad, 0)
    lead = 0
    if last <= avail - 1:
        n = last + 1  # rows past the last one read are left out
    else:  # reads past the end: padding there must be real padding
        n = avail
        short = last - (avail - 1) - pad
        if short > 0:
            lead = -(-short // big)
            pad += lead * big
    assert (n + 2 * pad - d * (k - 1) - 1) // big + 1 == lead + m  # (see the docstring)
    return GridDim(q, a, m, start, n, big, pad, lead)


def sample_grid(spec: CallSpec, x_shape, w_shape, out_shape, frac: float,
                offsets: tuple[int, ...] | None = None) -> tuple[GridDim, ...]:
    """The sampled grid of a (non-transposed, batched) conv call: steps from
    :func:`grid_steps`, offsets drawn uniformly (or given)."""
    steps = grid_steps(frac, spec.nd)
    dims = []
    for i in range(spec.nd):
        out = out_shape[2 + i]
        q = min(steps[i], out)
        a = draw(q) if offsets is None else offsets[i]
        dims.append(grid_dim(x_shape[2 + i], out, w_shape[2 + i], spec.stride[i],
                             spec.padding[i], spec.dilation[i], q, a))
    return tuple(dims)


def grid_call(spec: CallSpec, x: torch.Tensor, u: torch.Tensor, grid: tuple[GridDim, ...]
              ) -> tuple[CallSpec, torch.Tensor, torch.Tensor]:
    """(strided spec, narrowed input, sampled outputs) of a sampled grid (views, no copies)."""
    sx = x
    index = [slice(None), slice(None)]
    for i, g in enumerate(grid):
        sx = sx.narrow(2 + i, g.start, g.length)
        index.append(slice(g.a, None, g.q))
    s = replace(spec, stride=tuple(g.stride for g in grid), padding=tuple(g.pad for g in grid))
    return s, sx, u[tuple(index)]


def grid_pad(y: torch.Tensor, grid: tuple[GridDim, ...]) -> torch.Tensor:
    """y after its ``lead`` zero rows (a copy only where there are any)."""
    pads: list[int] = []
    for g in reversed(grid):
        pads += [g.lead, 0]
    return F.pad(y, pads) if any(pads) else y


def _hebbian_positions(spec: CallSpec, x: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                       b: torch.Tensor | None, rule: HebbianRule,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """H from a random grid of output positions of every sample: every q-th position along
    each spatial dim from a random offset (``grid_steps``), computed as the weight gradient of
    the equivalent strided conv (no patches are unfolded)."""
    grid = sample_grid(spec, x.shape, w.shape, u.shape, rule.sample_fraction)
    s, sx, su = grid_call(spec, x, u, grid)
    y = compete(su, spec, rule)
    if any(g.length == 0 for g in grid):  # only padding under the sampled outputs
        corr = torch.zeros_like(w, memory_format=torch.contiguous_format)
    else:
        corr = weight_vjp(s, sx, w, grid_pad(y, grid))
    return finish_in(spec, corr, y, w, b, rule, dtype)
