"""GHL under DistributedDataParallel against backprop under DDP, on CPU processes (gloo).

    python bench/distributed.py                         # fasthebb and deephebb, 2 processes
    python bench/distributed.py --models fasthebb --repeats 41 --json out.json

For each model it times one full SGD step (forward, loss, backward with DDP's gradient
reduction, optimiser step) of

    bp    torch's DistributedDataParallel around the plain model (DDP's default all-reduce)
    ghl   ghlc.distributed.ddp around the prepared model (raw H travels with the buckets)

interleaved (the order alternates between repeats), first on ``--procs`` processes and then on
one process with the same per-process batch and threads (no DDP), and prints per model the
median step, the paired median ratio ghl/bp with its 95 % CI for both, their quotient (the
target: at most 1.05, i.e. GHL's extra communication is hidden behind its backward pass as
backprop's is), and the bytes each process sends into all-reduce per step: backprop's are
its gradients; ghl's are counted on the all-reduce calls of ghlc's hook (its buckets, the raw
H of each plastic weight and one flag per plastic weight).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from benchlib.machine import machine, machine_info
from benchlib.models import build, data
from benchlib.stats import median_ci, paired_ratios

import ghlc
from ghlc import distributed as gd
from ghlc.errors import GHLWarning

SIZE, CLASSES = 32, 10


def _models(name: str, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    plain, temp = build(name)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # (the paper's nets: most weights in backprop Linears)
        warnings.simplefilter("ignore", GHLWarning)
        cfg = ghlc.GHLConfig(temperature=temp)
        prepared = ghlc.prepare(build(name)[0], (x[:2],), config=cfg)
    return {"bp": plain, "ghl": prepared}


class _Counter:
    """Bytes handed to torch.distributed.all_reduce (ghlc's hook calls it; DDP's built-in
    reduction of backprop does not, so backprop's bytes are its gradients' size)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._orig = dist.all_reduce

    def __enter__(self) -> _Counter:
        def counted(tensor, *a, **k):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._orig(tensor, *a, **k)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._orig


def _steps(
    name: str, batch: int, repeats: int, warmup: int, world: int, rank: int
) -> dict[str, object]:
    x, y = data(batch * max(world, 1), SIZE, CLASSES, "cpu")
    x, y = x[rank * batch : (rank + 1) * batch], y[rank * batch : (rank + 1) * batch]
    mods = _models(name, x)
    if world > 1:
        wrapped = {
            "bp": torch.nn.parallel.DistributedDataParallel(mods["bp"]),
            "ghl": gd.ddp(mods["ghl"]),
        }
    else:
        wrapped = dict(mods)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in mods.items()}

    def step(k: str) -> float:
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        opts[k].zero_grad()
        F.cross_entropy(wrapped[k](x), y).backward()
        opts[k].step()
        return time.perf_counter() - t0

    for _ in range(warmup):  # (the first GHL step also times the kernels: measure.py)
        for k in ("bp", "ghl"):
            step(k)
    times: dict[str, list[float]] = {"bp": [], "ghl": []}
    for i in range(repeats):
        for k in ("bp", "ghl") if i % 2 == 0 else ("ghl", "bp"):
            times[k].append(step(k))
    sent = {"bp": sum(p.numel() * p.element_size() for p in mods["bp"].parameters())}
    if world > 1:
        with _Counter() as c:
            step("ghl")
        sent["ghl"] = c.bytes
    return {"times": times, "sent": sent}


def _worker(rank: int, world: int, init: str, args: dict, out: str) -> None:
    torch.set_num_threads(args["threads"])
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    res = {
        m: _steps(m, args["batch"], args["repeats"], args["warmup"], world, rank)
        for m in args["models"]
    }
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    if world > 1:
        dist.destroy_process_group()


def _run(world: int, args: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.json")
        init = f"file://{os.path.join(tmp, 'store')}"
        if world == 1:
            _worker(0, 1, init, args, out)
        else:
            mp.spawn(_worker, args=(world, init, args, out), nprocs=world)
        return json.loads(Path(out).read_text())


def _ratio(times: dict) -> tuple[float, float, float]:
    r = paired_ratios(times["ghl"], times["bp"])
    lo, hi, _ = median_ci(r)
    return statistics.median(r), lo, hi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="fasthebb,deephebb")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="samples per process and step")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="per process (0: cores / procs)")
    p.add_argument("--json", help="write the results here too")
    a = p.parse_args()
    if a.procs < 2:
        sys.exit("error: --procs must be at least 2")
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.procs)
    args = {
        "models": a.models.split(","),
        "batch": a.batch,
        "repeats": a.repeats,
        "warmup": a.warmup,
        "threads": threads,
    }
    many = _run(a.procs, args)
    one = _run(1, args)
    torch.set_num_threads(threads)
    print(f"# {machine('cpu')}")
    print(
        f"# {a.procs} gloo processes x {threads} threads, batch {a.batch} per process, "
        f"{a.repeats} paired repeats; one process: the same batch and threads, no DDP"
    )
    head = (
        "model", "bp-DDP ms", "ghl-DDP ms", f"ghl/bp {a.procs}p [95% CI]", "ghl/bp 1p [95% CI]",
        "quotient", "bp MB/step", "ghl MB/step",
    )  # fmt: skip
    print(" | ".join(head))
    rows = []
    for m in args["models"]:
        t2, t1 = many[m]["times"], one[m]["times"]
        r2, r1 = _ratio(t2), _ratio(t1)
        q = r2[0] / r1[0]
        sent = many[m]["sent"]
        row = {
            "model": m,
            "bp_ms": 1e3 * statistics.median(t2["bp"]),
            "ghl_ms": 1e3 * statistics.median(t2["ghl"]),
            "ratio_many": r2,
            "ratio_one": r1,
            "quotient": q,
            "quotient_bounds": [r2[1] / r1[2], r2[2] / r1[1]],
            "bytes_bp": sent["bp"],
            "bytes_ghl": sent["ghl"],
        }
        rows.append(row)
        print(
            f"{m} | {row['bp_ms']:.1f} | {row['ghl_ms']:.1f} | "
            f"{r2[0]:.3f} [{r2[1]:.3f}, {r2[2]:.3f}] | {r1[0]:.3f} [{r1[1]:.3f}, {r1[2]:.3f}] | "
            f"{q:.3f} | {sent['bp'] / 1e6:.2f} | {sent['ghl'] / 1e6:.2f}"
        )
    if a.json:
        cmd = "python bench/distributed.py " + " ".join(sys.argv[1:])
        record = {"command": cmd, "machine": machine_info("cpu"), "procs": a.procs, "rows": rows}
        Path(a.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
