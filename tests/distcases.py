"""Cases for tests/test_distributed.py, run in spawned CPU processes (gloo).

Each case trains a prepared float64 model under DDP on this process's share of a batch and
compares every parameter's gradient with one process on the union batch (the rule's exact
data-parallel step, DESIGN.md "Many processes"). A case returns {label: max relative error}.
Models without batch statistics (BatchNorm's would differ between a share and the union).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

import ghlc
from ghlc import distributed as gd

sys.path.insert(0, os.path.dirname(__file__))
from zoo import BY_NAME  # noqa: E402

SHARE = 4  # samples per process and micro-batch


def _rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return float((a - b).abs().max() / (b.abs().max() + 1e-300))


def _model(name: str, **cfg) -> tuple[nn.Module, torch.Tensor, dict]:
    e = BY_NAME[name]
    model, x = e.make(0)
    kw = {**e.config_kwargs(), **cfg}
    return model.double(), x.double(), kw


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A mean over samples of a fixed projection of each output (the union's loss is the
    mean of the processes' losses, as DDP's averaging assumes)."""
    g = torch.Generator().manual_seed(5)
    r = torch.randn(out[0].numel(), generator=g, dtype=out.dtype)
    return (out.flatten(1) * r).sum(1).mean()


def _batch(x: torch.Tensor, world: int, micro: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(micro * world * SHARE, *x.shape[1:], generator=g, dtype=x.dtype)


def _share(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def _reference(model: nn.Module, x: torch.Tensor, kw: dict, micro: list[torch.Tensor]) -> dict:
    """One process, the union batches, accumulated over the micro-batches."""
    ref = ghlc.prepare(copy.deepcopy(model), (x[:2],), config=ghlc.GHLConfig(**kw))
    for xb in micro:
        _loss(ref(xb)).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def _compare(m: nn.Module, want: dict, tag: str) -> dict[str, float]:
    return {f"{tag}:{n}": _rel(p.grad, want[n]) for n, p in m.named_parameters()}


def exact(rank: int, world: int, name: str, micro: int = 1, **ddp_kw) -> dict[str, float]:
    """DDP (with ``micro - 1`` backward passes under ``no_sync()``) against the union."""
    model, x, kw = _model(name)
    batches = [_batch(x, world, 1, 10 + i) for i in range(micro)]
    want = _reference(model, x, kw, batches)
    m = ghlc.prepare(copy.deepcopy(model), (x[:2],), config=ghlc.GHLConfig(**kw))
    d = gd.ddp(m, **ddp_kw)
    for i, xb in enumerate(batches):
        if i < micro - 1:
            with d.no_sync():
                _loss(d(_share(xb, rank, world))).backward()
        else:
            _loss(d(_share(xb, rank, world))).backward()
    return _compare(m, want, name)


def two_steps(rank: int, world: int, name: str, **ddp_kw) -> dict[str, float]:
    """Two optimiser steps (static_graph needs a second one): each step's gradients against
    one process on the union batch from the same weights."""
    model, x, kw = _model(name)
    m = ghlc.prepare(copy.deepcopy(model), (x[:2],), config=ghlc.GHLConfig(**kw))
    d = gd.ddp(m, **ddp_kw)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    out: dict[str, float] = {}
    for step in range(2):
        xb = _batch(x, world, 1, 20 + step)
        now = copy.deepcopy(model)
        now.load_state_dict({k: v.detach() for k, v in m.state_dict().items()})
        want = _reference(now, x, kw, [xb])
        opt.zero_grad()
        _loss(d(_share(xb, rank, world))).backward()
        out.update(_compare(m, want, f"{name}@{step}"))
        opt.step()
    return out


def after_sync(rank: int, world: int, name: str) -> dict[str, float]:
    """Accumulation over two synchronised backward passes (no ``no_sync``, no step between):
    ghlc keeps the reduced totals and adds the next pass to them."""
    model, x, kw = _model(name)
    batches = [_batch(x, world, 1, 30 + i) for i in range(2)]
    want = _reference(model, x, kw, batches)
    m = ghlc.prepare(copy.deepcopy(model), (x[:2],), config=ghlc.GHLConfig(**kw))
    d = gd.ddp(m)
    for xb in batches:
        _loss(d(_share(xb, rank, world))).backward()
    return _compare(m, want, name)


def zeroed(rank: int, world: int, name: str) -> dict[str, float]:
    """``zero_grad(set_to_none=False)`` between backward passes starts a new total."""
    model, x, kw = _model(name)
    batches = [_batch(x, world, 1, 40 + i) for i in range(2)]
    want = _reference(model, x, kw, batches[1:])
    m = ghlc.prepare(copy.deepcopy(model), (x[:2],), config=ghlc.GHLConfig(**kw))
    d = gd.ddp(m, gradient_as_bucket_view=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    with d.no_sync():
        _loss(d(_share(batches[0], rank, world))).backward()
    opt.zero_grad(set_to_none=False)
    _loss(d(_share(batches[1], rank, world))).backward()
    return _compare(m, want, name)


def per_rank_control(rank: int, world: int, name: str) -> dict[str, float]:
    """The negative control: each process combines its own terms, then the gradients are
    averaged (what DDP alone would do). Returns the plastic weights' errors, which must be
    large."""
    model, x, kw = _model(name)
    xb = _batch(x, world, 1, 50)
    want = _reference(model, x, kw, [xb])
    m = ghlc.prepare(copy.deepcopy(model), (x[:2],), config=ghlc.GHLConfig(**kw))
    _loss(m(_share(xb, rank, world))).backward()
    plastic = BY_NAME[name].plastic
    out = {}
    for n, p in m.named_parameters():
        assert p.grad is not None
        dist.all_reduce(p.grad)
        p.grad /= world
        if n in plastic:
            out[f"{name}:{n}"] = _rel(p.grad, want[n])
    return out


def plain_ddp_refused(rank: int, world: int, name: str) -> dict[str, float]:
    """torch's own DDP around a prepared model: the first backward raises, naming
    ghlc.distributed.ddp; an evaluation forward is fine."""
    model, x, kw = _model(name)
    m = ghlc.prepare(copy.deepcopy(model), (x[:2],), config=ghlc.GHLConfig(**kw))
    d = nn.parallel.DistributedDataParallel(m)
    with torch.no_grad():
        d(x)
    try:
        _loss(d(x)).backward()
    except ghlc.RuntimeGHLError as e:
        msg = str(e)
        ok = "ghlc.distributed.ddp" in msg and "\n" not in msg
        return {"refused": 0.0 if ok else 1.0}
    return {"refused": float("inf")}


def sampled(rank: int, world: int, name: str) -> dict[str, float]:
    """The sampled mode: each process estimates H from a block of its own share. The
    reduced gradient is |sum H_r| normalised by its global max, times sign of the union's G:
    every plastic weight's .grad has max 1, and its signs are those of the union's gradient
    wherever it is non-zero. Returns deviations from those (0 when they hold)."""
    model, x, kw = _model(name, sample_fraction=0.5)
    xb = _batch(x, world, 1, 60)
    plain = copy.deepcopy(model)  # the union's plain gradient (backprop), for the signs
    _loss(plain(xb)).backward()
    m = ghlc.prepare(copy.deepcopy(model), (x[:2],), config=ghlc.GHLConfig(**kw))
    d = gd.ddp(m)
    _loss(d(_share(xb, rank, world))).backward()
    out = {}
    g_union = dict(plain.named_parameters())
    for n in BY_NAME[name].plastic:
        gr = dict(m.named_parameters())[n].grad
        assert gr is not None
        gu = g_union[n].grad
        assert gu is not None
        nz = (gr != 0) & (gu != 0)
        out[f"{name}:{n}:max"] = abs(float(gr.abs().max()) - 1.0)
        out[f"{name}:{n}:sign"] = float((torch.sign(gr[nz]) != torch.sign(gu[nz])).sum())
    return out


def fp16_scaler(rank: int, world: int, name: str) -> dict[str, float]:
    """float16 autocast with ghlc.GradScaler: after unscale_, every gradient is the union's
    under the same autocast (to float16's rounding), the plastic ones not divided by the
    scale."""
    model, x, kw = _model(name)
    model = model.float()
    xb = _batch(x, world, 1, 70).float()
    grads = {}
    for kind in ("union", "ddp"):
        m = ghlc.prepare(copy.deepcopy(model), (x[:2].float(),), config=ghlc.GHLConfig(**kw))
        d = gd.ddp(m) if kind == "ddp" else m
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        scaler = ghlc.GradScaler("cpu", init_scale=16.0)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = _loss(d(_share(xb, rank, world) if kind == "ddp" else xb))
        scaler.scale(loss.float()).backward()
        scaler.unscale_(opt)
        grads[kind] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    out = {}
    for n, g in grads["ddp"].items():
        u = grads["union"][n]
        close = torch.isclose(g, u, rtol=2e-2, atol=2e-2 * float(u.abs().max()))
        out[f"{name}:{n}:mismatch"] = float((~close).float().mean())
    return out


CASES: dict[str, Callable[..., dict[str, float]]] = {
    f.__name__: f
    for f in (
        exact,
        two_steps,
        after_sync,
        zeroed,
        per_rank_control,
        plain_ddp_refused,
        sampled,
        fp16_scaler,
    )
}


def worker(rank: int, world: int, init: str, plan: list, out_dir: str) -> None:
    """Run ``plan`` (a list of [case, args, kwargs]) in this process; rank 0 writes the
    results (or each case's error) to ``out_dir/results.json``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results: dict[str, dict[str, float] | str] = {}
    try:
        for key, (case, args, kwargs) in plan:
            try:
                results[key] = CASES[case](rank, world, *args, **kwargs)
            except Exception:
                results[key] = traceback.format_exc(limit=-4)
            dist.barrier()
    finally:
        if rank == 0:
            path = os.path.join(out_dir, "results.json")
            with open(path + ".tmp", "w") as f:
                json.dump(results, f)
            os.replace(path + ".tmp", path)
        dist.destroy_process_group()


def fsdp(rank: int, world: int, name: str, micro: int = 1, **cfg) -> dict[str, float]:
    """FSDP2: ``fully_shard`` on each plastic layer's module and the root (shards of
    uneven and empty size where a layer has few rows), ``micro - 1`` backward passes with
    gradient sync off, against one process on the union batches."""
    from torch.distributed.fsdp import fully_shard

    model, x, kw = _model(name, **cfg)
    batches = [_batch(x, world, 1, 80 + i) for i in range(micro)]
    want = _reference(model, x, kw, batches)
    m = ghlc.prepare(copy.deepcopy(model), (x[:2],), config=ghlc.GHLConfig(**kw))
    # (vit: its blocks, as FSDP2's documentation shards transformers. Not the attention
    # modules: FSDP2's input hooks hand nn.MultiheadAttention three distinct q, k, v tensors,
    # so it takes its separate-projection path, three Hebbian calls instead of one.)
    owners = (
        {"blocks.0", "pool"}
        if name == "vit"
        else {n.rpartition(".")[0] for n in BY_NAME[name].plastic}
    )
    for owner in sorted(owners, key=len, reverse=True):
        if owner:
            fully_shard(m.get_submodule(owner))
    fully_shard(m)
    for i, xb in enumerate(batches):
        m.set_requires_gradient_sync(i == micro - 1)
        _loss(m(_share(xb, rank, world))).backward()
    return {
        f"{name}:{n}": _rel(p.grad.full_tensor() if p.grad is not None else None, want[n])
        for n, p in m.named_parameters()
    }


def fsdp_adds_refused(rank: int, world: int, name: str) -> dict[str, float]:
    """FSDP2: a second synchronising backward without zero_grad() is refused (FSDP would add
    its G to the combined gradient)."""
    from torch.distributed.fsdp import fully_shard

    model, x, kw = _model(name)
    m = ghlc.prepare(copy.deepcopy(model), (x[:2],), config=ghlc.GHLConfig(**kw))
    fully_shard(m)
    _loss(m(x)).backward()
    try:
        _loss(m(x)).backward()
    except ghlc.RuntimeGHLError as e:
        return {"refused": 0.0 if "zero_grad" in str(e) else 1.0}
    return {"refused": float("inf")}


CASES.update({f.__name__: f for f in (fsdp, fsdp_adds_refused)})
