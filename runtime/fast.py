"""Faster exact ways of the rule's own steps (``rule.py``): the softmax over output units
and Oja's per-unit sum. Each gives the numbers of the formula it replaces (the tests compare
them in float64); where each is taken is policy (``policy.py``) or the tensor's layout."""

from __future__ import annotations

import torch

from . import fused, policy
from .calls import CallSpec, units_lead


def softmax_units(v: torch.Tensor, dim: int, t: float) -> torch.Tensor:
    """softmax(t * v) over ``dim``. On CUDA, for a dim that is not the innermost (channels of
    NCHW), torch's spatial softmax kernel runs far below memory bandwidth, so ``fused.softmax``
    computes it (one Triton kernel, or reductions and in-place passes). Elsewhere
    torch.softmax; with a temperature, on CPU, in place on ``t * v`` (a contiguous tensor of
    our own: one activation-sized buffer and one pass fewer, the same numbers).
    docs/PERFORMANCE.md, 'Why the runtime chooses what it does'."""
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
    stride = v.stride()
    order = sorted((d for d in range(v.dim()) if d != dim), key=lambda d: -stride[d])
    order.append(dim)
    return order if v.permute(order).is_contiguous() else None


def activity_sums(
    spec: CallSpec, y: torch.Tensor, u: torch.Tensor, w: torch.Tensor, corr: torch.Tensor
) -> bool:
    """Whether Oja's per-unit ``sum_j y_k u_k`` is summed over the call's y and u (fewer
    elements than the weight: linear layers at ordinary batch sizes, convs with small
    outputs) instead of as ``<W_k, corr_k> + b_k sum_j y_k`` over the weight; the same sum.
    On the policy's ``activity_sum_devices``, output units along the weight's dim 0, one
    dtype, eager kernels (docs/PERFORMANCE.md, 'Why the runtime chooses what it does')."""
    return (
        u.device.type in policy.current().activity_sum_devices
        and u.numel() < w.numel()
        and units_lead(spec, corr)
        and u.dtype == y.dtype == corr.dtype
        and not fused.active(corr)
    )


def unit_activity(
    spec: CallSpec, y: torch.Tensor, u: torch.Tensor, numel: int | None = None
) -> torch.Tensor:
    """Per output unit, the sum of ``y * u`` over batch and positions, a chunk of samples (or
    rows) at a time: a product temporary of at most ``numel`` elements (default: the
    policy's ``dot_block_numel``)."""
    numel = policy.current().dot_block_numel if numel is None else numel
    if spec.kind == "linear":
        y, u = y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1])
    dims = [0, *range(2, y.dim())]
    n = y.shape[0]
    rows = max(1, numel // max(1, y.shape[1:].numel()))
    s = (y[:rows] * u[:rows]).sum(dims)
    for r in range(rows, n, rows):
        s += (y[r : r + rows] * u[r : r + rows]).sum(dims)
    return s
