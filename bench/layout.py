"""The standard (NCHW) layout against channels-last, for backprop and ghlc, in one process.

    python bench/layout.py --models resnet18 --repeats 15
    python bench/layout.py --repeats 11 --json bench/results/layout_cpu.json
    python bench/layout.py --device cuda --models deephebb,fasthebb,resnet18 --repeats 20

For each model (batch 64 of random 3x32x32 inputs, as bench/step.py) it builds bp, ghlc and
the sampled ghlc_s25 (bench/step.py's variants) twice: once as they are and once with the
model and the input in channels-last memory format (``model.to(memory_format=...)``, the
layout torch recommends for convolutions). The six step functions run interleaved, in an
order shuffled every repeat (seeded), so that every repeat gives paired ratios taken close
together in time. It prints, per model, each variant's median step in both layouts with the
paired ratio channels-last / standard, and each ghlc variant's ratio to bp within its
layout, all with their distribution-free 95 % confidence intervals (``median_ci`` of
benchlib.stats, as bench/step.py). On CUDA (``--device cuda``, eager steps) each step is
timed with CUDA events, as bench/step.py does. Only timing: peak memory and the floors in
channels-last come from ``python bench/step.py --channels-last``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
from pathlib import Path

import torch
from benchlib.machine import machine
from benchlib.models import EXTRA_MODELS, MODELS, build, data
from benchlib.runners import Runner
from benchlib.stats import median_ci
from benchlib.timing import sync, timed_step

VARIANTS = ("bp", "ghlc", "ghlc_s25")
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def _runners(name: str, batch: int, device: str) -> tuple[dict, torch.Tensor]:
    """{(variant, layout): (runner, input)} for one model, and the batch's labels."""
    base, temp = build(name)  # (the standard layout: --channels-last is step.py's)
    base = base.to(device)
    x, y = data(batch, 32, 10, device)
    out = {}
    for lay, fmt in LAYOUTS.items():
        m = base if lay == "nchw" else copy.deepcopy(base).to(memory_format=fmt)
        xl = x.contiguous(memory_format=fmt)
        for v in VARIANTS:
            out[(v, lay)] = (Runner(m, temp, v, xl[:2]), xl)
    return out, y


def paired(a: list[float], b: list[float]) -> dict:
    """Median of the per-repeat ratios a/b with its 95 % CI."""
    r = [p / q for p, q in zip(a, b)]
    lo, hi, cov = median_ci(r)
    return {"median": statistics.median(r), "ci": [lo, hi], "coverage": cov}


def bench(name: str, repeats: int, warmup: int, batch: int, seed: int, device: str) -> dict:
    runners, y = _runners(name, batch, device)
    for r, x in runners.values():
        for _ in range(warmup):
            r.step(x, y)
    sync(device)
    times: dict = {k: [] for k in runners}
    rng = random.Random(seed)
    keys = list(runners)
    for i in range(repeats):
        print(f"  {name} repeat {i + 1}/{repeats}", file=sys.stderr, flush=True)
        rng.shuffle(keys)
        for k in keys:
            r, x = runners[k]
            times[k].append(timed_step(r, x, y, device))
    res = {
        "model": name,
        "times_ms": {f"{v}_{lay}": t for (v, lay), t in times.items()},
        "median_ms": {f"{v}_{lay}": statistics.median(t) for (v, lay), t in times.items()},
        "cl_over_nchw": {v: paired(times[(v, "cl")], times[(v, "nchw")]) for v in VARIANTS},
        "ratio_to_bp": {
            f"{v}_{lay}": paired(times[(v, lay)], times[("bp", lay)])
            for v in VARIANTS[1:]
            for lay in LAYOUTS
        },
    }
    return res


def _fmt(p: dict) -> str:
    return f"{p['median']:.3f} ({p['ci'][0]:.3f}–{p['ci'][1]:.3f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--models",
        default="resnet18",
        help=f"comma-separated, from {', '.join(MODELS + EXTRA_MODELS)}",
    )
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS + EXTRA_MODELS:
            print(f"error: unknown model {m!r}", file=sys.stderr)
            return 2
    if args.repeats < 1 or args.batch < 2:
        print("error: --repeats must be >= 1 and --batch >= 2", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    results = [
        bench(m, args.repeats, args.warmup, args.batch, args.seed, args.device) for m in models
    ]
    out = {
        "machine": machine(args.device),
        "device": args.device,
        "batch": args.batch,
        "repeats": args.repeats,
        "command": "python bench/layout.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "models": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"machine: {out['machine']}")
    print("paired medians with their 95 % CI; cl = model and input channels-last")
    print("| model | variant | nchw ms | cl ms | cl / nchw | × bp (nchw) | × bp (cl) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for v in VARIANTS:
            med = r["median_ms"]
            to_bp = (
                ("–", "–")
                if v == "bp"
                else (_fmt(r["ratio_to_bp"][f"{v}_nchw"]), _fmt(r["ratio_to_bp"][f"{v}_cl"]))
            )
            print(
                f"| {r['model']} | {v} | {med[f'{v}_nchw']:.1f} | {med[f'{v}_cl']:.1f} | "
                f"{_fmt(r['cl_over_nchw'][v])} | {to_bp[0]} | {to_bp[1]} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
