"""Where the time of one training step goes: backprop vs ghlc, top operators by device time.

    python bench/profile_step.py --model resnet18 --device cuda
    python bench/profile_step.py --model fasthebb --device cpu --batch 64
    python bench/profile_step.py --model resnet18 --variants bp_graph,ghlc_graph  # CUDA graphs

Builds the model as bench/step.py does, takes warm-up steps, profiles a few steps of each
variant with torch.profiler and prints, per variant, the step time and the operators that
take the most self time on the device (CUDA kernels on cuda, operators on cpu), and the
number of kernel launches per step. A *_graph variant (CUDA) profiles replays of the
captured step; its kernels are counted on the device (no launches on the host).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from benchlib import variants
from benchlib.models import EXTRA_MODELS, MODELS, build, data
from benchlib.runners import make_runner
from benchlib.timing import sync
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=(*MODELS, *EXTRA_MODELS, "resnet50"))
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--variants", default="bp,ghlc")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    size = 224 if args.model == "resnet50" else 32
    classes = 1000 if args.model == "resnet50" else 10
    torch.manual_seed(0)
    base, temp = build(args.model)
    base = base.to(args.device)
    x, y = data(args.batch, size, classes, args.device)
    cuda = args.device == "cuda"
    for variant in args.variants.split(","):
        if variant not in variants.VARIANTS:
            print(
                f"error: unknown variant {variant!r} (--list-variants of bench/step.py names them)",
                file=sys.stderr,
            )
            return 2
        if variant in variants.graph_variants() and not cuda:
            print(f"error: {variant} needs --device cuda", file=sys.stderr)
            return 2
        r = make_runner(base, temp, variant, x, y)  # graph variants: warmed up, captured
        for _ in range(3):
            r.step(x, y)
        sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            r.step(x, y)
        sync(args.device)
        ms = (time.perf_counter() - t0) * 1e3 / args.steps
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(args.steps):
                r.step(x, y)
            sync(args.device)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        events = prof.key_averages()
        launches = sum(
            e.count
            for e in events
            if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        on_device = sum(e.count for e in events if e.device_type == DeviceType.CUDA)
        busy = (
            sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
            / 1e3
            / args.steps
        )
        print(
            f"\n=== {args.model} {variant}: {ms:.2f} ms/step (wall, unprofiled)"
            + (
                f", {launches / args.steps:.0f} kernel launches/step, "
                f"{on_device / args.steps:.0f} device activities/step, "
                f"{busy:.2f} ms/step of device time"
                if cuda
                else ""
            )
        )
        print(events.table(sort_by=key, row_limit=args.top, max_name_column_width=60))
        del r
    return 0


if __name__ == "__main__":
    sys.exit(main())
