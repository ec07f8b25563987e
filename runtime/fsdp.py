"""GHL under FSDP2 (``torch.distributed.fsdp.fully_shard``): the combination on each shard.

FSDP2 keeps each parameter as a DTensor sharded on dim 0 and all-gathers it for its module's
forward, so a plastic call sees the *unsharded* parameter (:func:`matches` maps it back to its
site). Its backward leaves the raw G on the unsharded parameter, which FSDP reduce-scatters
into the sharded ``.grad`` (the mean over processes). ghlc keeps this process's raw H
(full-sized) and, in a callback at the end of the backward pass (after FSDP's own), reduce-
scatters it the way FSDP sharded the weight (rows in ``ceil(n / world)`` chunks: uneven and
empty shards included), takes the layer's max with one all-reduce(MAX) of a scalar per layer
(a vector of per-unit maxima for ``normalisation="unit"``), and combines on the local shard.
With ``set_requires_gradient_sync(False)`` H accumulates locally like FSDP's unsharded G; the
synchronising backward sends the totals.
"""

from __future__ import annotations

import math
import sys
import weakref
from typing import Any, cast

import torch
import torch.distributed as dist

from ghlc.errors import RuntimeGHLError

from .accumulate import PlasticParam
from .rule import UnitAxes

_QUEUED: list[bool] = [False]
# (torch 2.13 renamed reduce_scatter_tensor, which now warns)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_sharded(p: torch.Tensor) -> bool:
    """A parameter that FSDP2 has sharded (a DTensor); other DTensor layouts are refused."""
    if "torch.distributed.tensor" not in sys.modules:  # (no DTensor made: nothing to import)
        return False
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return False
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise RuntimeGHLError(
            f"a plastic parameter is a DTensor placed as {tuple(p.placements)} on a "
            f"{p.device_mesh.ndim}-D mesh; ghlc combines on FSDP2's dim-0 shards only"
        )
    return True


def groups_of(root: torch.nn.Module) -> tuple[dict[int, Any], dict[int, torch.Tensor]]:
    """For every FSDP module in ``root``: id(sharded parameter) -> its FSDP parameter group,
    and id(unsharded parameter) -> the sharded one (FSDP2 swaps the unsharded form in around
    a module's forward; a model's own forward pre-hook may run after FSDP's)."""
    groups: dict[int, Any] = {}
    sharded: dict[int, torch.Tensor] = {}
    if "torch.distributed.fsdp" not in sys.modules:  # (no FSDP module made)
        return groups, sharded
    from torch.distributed.fsdp import FSDPModule

    for m in root.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                for fp in group.fsdp_params:
                    groups[id(fp.sharded_param)] = group
                    unsharded = getattr(fp, "_unsharded_param", None)
                    if unsharded is not None:
                        sharded[id(unsharded)] = fp.sharded_param
    return groups, sharded


class Shards:
    """The plastic parameters of one prepared model under FSDP2 (in name order: every
    process runs the same collectives in the same order)."""

    def __init__(self, states: list[PlasticParam], groups: dict[int, Any]) -> None:
        self.states = sorted(states, key=lambda s: s.name)
        self.groups = groups
        for st in self.states:
            st.ddp, st.shards = "fsdp", self

    def queue(self) -> None:
        """Called by the first Hebbian term of a backward pass: combine at its end. Notes
        which shards hold a gradient that FSDP would add this backward's G to."""
        if not _QUEUED[0]:
            _QUEUED[0] = True
            for st in self.states:
                p = st.param_ref() if st.param_ref is not None else None
                g = None if p is None else p.grad
                st._add_reduced = (
                    g is not None and not st._stepped and bool(_local(g).count_nonzero())
                )
            ref = weakref.ref(self)
            torch.autograd.Variable._execution_engine.queue_callback(lambda: _finish(ref))


def _finish(ref: weakref.ref) -> None:
    _QUEUED[0] = False
    shards = ref()
    if shards is not None:
        finish(shards)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor."""
    return cast(Any, t).to_local()


def _rows(n: int, world: int, rank: int) -> tuple[int, int, int]:
    """(chunk, first row, rows) of ``rank``'s shard of ``n`` rows (torch.chunk's split)."""
    c = math.ceil(n / world)
    start = min(n, rank * c)
    return c, start, max(0, min(c, n - start))


def finish(shards: Shards) -> None:
    """Reduce-scatter each layer's raw H, take its max over processes, combine on the shard."""
    work = []
    for st in shards.states:
        p = st.param_ref() if st.param_ref is not None else None
        if p is None:
            continue
        group = shards.groups.get(id(p))
        h, st.pending = st.pending, None
        if h is not None:
            st.h_local = h if st.h_local is None else st.h_local.add_(h)
        if group is None or not getattr(group, "reduce_grads", True):
            continue  # no reduction this backward: H accumulates with FSDP's unsharded G
        if st._add_reduced:
            raise RuntimeGHLError(
                f"layer {st.layer!r}: under FSDP2 this backward adds to a gradient that "
                "ghlc has already combined; call zero_grad() or step between synchronising "
                "backward passes, and accumulate with set_requires_gradient_sync(False)"
            )
        work.append((st, p))
    if not work:
        return
    pg = cast(Any, work[0][1]).device_mesh.get_group()
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    local_h = []
    for st, p in work:
        h, st.h_local = st.h_local, None
        n = p.shape[0]
        c, start, rows = _rows(n, world, rank)
        full = torch.zeros((c * world, *p.shape[1:]), dtype=p.dtype, device=_local(p).device)
        if h is not None:
            full[:n].copy_(h)
        out = torch.empty_like(full[:c])
        _reduce_scatter(out, full, group=pg)
        local_h.append((out[:rows], start))
    # the scale of each layer: one all-reduce(MAX) for all of them
    parts = [_local_max(h, st, p, start) for (st, p), (h, start) in zip(work, local_h, strict=True)]
    flat = torch.cat([v.reshape(-1).to(torch.float64) for v in parts])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=pg)
    at = 0
    for (st, p), (h, start), v in zip(work, local_h, parts, strict=True):
        maxes = flat[at : at + v.numel()].to(h.dtype)
        at += v.numel()
        grad = p.grad
        if grad is None:
            raise RuntimeGHLError(f"layer {st.layer!r}: FSDP2 left no gradient on its shard")
        g = _local(grad)
        if h.shape[0] == 0:
            continue
        scale = _scale_on_shard(maxes, st, p, h, start) + 1e-30
        if st.global_signal == "none":
            g.copy_(h / scale).neg_()
        else:
            g.copy_(h.abs().mul_(torch.sign(g)).div_(scale))
        st._stepped = False


def _local_max(h: torch.Tensor, st: PlasticParam, p: torch.Tensor, start: int) -> torch.Tensor:
    """This shard's part of the layer's max: a scalar, or the per-unit maxima placed in a
    vector over all the layer's output units (zeros for units held elsewhere)."""
    a = h.abs()
    if st.rule.normalisation == "layer" or p.dim() < 2:
        return a.amax() if a.numel() else torch.zeros((), dtype=a.dtype, device=a.device)
    idx, units = _unit_index(st.axes, p.shape, start, a.shape[0], a.device)
    v = torch.zeros(units, dtype=a.dtype, device=a.device)
    if a.numel():
        if st.axes[0]:  # transposed: per (row, column)
            per = a.flatten(2).amax(2) if a.dim() > 2 else a
        else:  # per row
            per = a.flatten(1).amax(1)
        v.scatter_reduce_(0, idx.reshape(-1), per.reshape(-1), "amax")
    return v


def _unit_index(
    axes: UnitAxes, shape: torch.Size, start: int, rows: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """The output unit of each of the shard's rows (units lead the weight), or of each
    (row, column) of a transposed conv's weight ((C_in, C_out/g, *k): unit = group*cog + j)."""
    r = torch.arange(start, start + rows, device=device)
    transposed, g = axes
    if not transposed:
        return r, shape[0]
    cin, cog = shape[0], shape[1]
    return (r // (cin // g))[:, None] * cog + torch.arange(cog, device=device)[None, :], g * cog


def _scale_on_shard(
    maxes: torch.Tensor, st: PlasticParam, p: torch.Tensor, h: torch.Tensor, start: int
) -> torch.Tensor:
    if maxes.dim() == 0 or maxes.numel() == 1:
        return maxes.reshape(())
    idx, _ = _unit_index(st.axes, p.shape, start, h.shape[0], h.device)
    per = maxes[idx]
    return per.view(*per.shape, *([1] * (h.dim() - per.dim())))
