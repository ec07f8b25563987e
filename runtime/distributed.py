"""GHL across processes: exact under DistributedDataParallel.

The exact data-parallel step equals one process on the union of the processes' batches: the
raw terms H and G are summed over processes, then H is normalised by its global max and
combined (DESIGN.md, "Many processes"). Averaging each process's own ``|H_n| * sign(G)``, what
DDP alone would do, is not the rule.

:func:`ddp` wraps a prepared model in torch's ``DistributedDataParallel`` and registers
:func:`comm_hook`. Each plastic weight's backward keeps this process's raw H and lets DDP
bucket the raw G (``accumulate.PlasticParam``); when a bucket is ready, the hook all-reduces it
and, beside it, the raw H of the bucket's plastic weights, and the combination runs when both
are done (the hook's future), so ``.grad`` after ``backward()`` is the rule. Under ``no_sync()`` H
accumulates locally like G; the synchronising backward sends the totals.

A prepared model inside torch's DDP without this hook is refused at its first backward.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ghlc.errors import RuntimeGHLError

from .accumulate import PlasticParam, _site_of
from .mode import is_prepared


def comm_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook for models prepared by ghlc (``state``: a process group, or
    None for the default one). Plain gradients are averaged as by DDP's default hook."""
    group = state if isinstance(state, dist.ProcessGroup) else None
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    buf.div_(world)
    plastic: list[tuple[PlasticParam, int, torch.Tensor]] = []
    start = 0
    for p in bucket.parameters():
        st = _site_of(p)
        if st is not None and st.ddp == "ghlc":
            plastic.append((st, start, p))
        start += p.numel()
    if not plastic:
        work = dist.all_reduce(buf, group=group, async_op=True)
        assert work is not None
        return work.get_future().then(lambda fut: fut.value()[0])
    # G in place in the bucket, as DDP's default hook; the raw H of the bucket's plastic
    # weights and their flags (a plastic call ran here) in a second all-reduce beside it
    terms: list[torch.Tensor] = []
    has_h = torch.zeros(len(plastic), dtype=buf.dtype, device=buf.device)
    for i, (st, _, p) in enumerate(plastic):
        h = st.take_local()
        if h is None:
            terms.append(torch.zeros(p.numel(), dtype=buf.dtype, device=buf.device))
        else:
            terms.append(h.detach().reshape(-1).to(buf.dtype))
            has_h[i] = 1
    terms.append(has_h)
    hs = torch.cat(terms)
    works = [dist.all_reduce(t, group=group, async_op=True) for t in (buf, hs)]

    def finish(fut: torch.futures.Future[Any]) -> torch.Tensor:
        flags = hs[-len(plastic) :].tolist()
        at = 0
        for (st, off, p), flag in zip(plastic, flags, strict=True):
            k = p.numel()
            g = buf[off : off + k].view_as(p)
            h = hs[at : at + k].view_as(p)
            at += k
            g.copy_(st.combine_reduced(h, g, flag > 0))
        return buf

    futs = [w.get_future() for w in works if w is not None]
    return torch.futures.collect_all(futs).then(finish)


def ddp(model: torch.nn.Module, **ddp_kwargs: Any) -> DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` with :func:`comm_hook` registered, so
    that each plastic weight's ``.grad`` after ``backward()`` is the rule on the union of the
    processes' batches. ``model`` is a prepared model (or contains one); every DDP option
    works (``gradient_as_bucket_view``, ``static_graph``, ``find_unused_parameters``,
    ``bucket_cap_mb``, ``no_sync()``)."""
    if not any(is_prepared(m) for m in model.modules()):
        raise RuntimeGHLError(
            "ghlc.distributed.ddp: the model has no part prepared by ghlc; call "
            "ghlc.prepare(model, ...) first (torch's DistributedDataParallel suits a plain model)"
        )
    wrapped = DistributedDataParallel(model, **ddp_kwargs)
    wrapped.register_comm_hook(ddp_kwargs.get("process_group"), comm_hook)
    return wrapped


def ddp_link() -> str | None:
    """How the running training forward sits under DDP: None (not inside a DDP forward, or
    a one-process group), ``"ghlc"`` (with :func:`comm_hook`) or ``"foreign"`` (without)."""
    wrapper = getattr(DistributedDataParallel, "_active_ddp_module", None)
    if wrapper is None:
        return None
    if dist.get_world_size(wrapper.process_group) == 1:
        return None
    hooks = getattr(wrapper, "_comm_hooks", ())
    return "ghlc" if any(h is comm_hook for h, _ in hooks) else "foreign"
