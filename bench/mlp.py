"""GHL steps of plain MLPs, every linear layer but the head plastic, against backprop.

    python bench/mlp.py                       # CPU, three sizes, 100 repeats
    python bench/mlp.py --sizes 1000x64 --repeats 200

An MLP 784-H-H-10 (ReLU) on random 28x28 inputs at batch B, for each ``HxB`` of ``--sizes``.
Its plastic weights are large next to its activations, unlike the conv models of
``bench/step.py``, so the rule's weight-sized passes (Oja's decay, the sign combination) weigh
more here. In one process, interleaved, it times one full SGD step of:

    bp         plain backprop
    ghlc       ghlc.prepare(..., GHLConfig(plastic=("conv", "linear")))
    ghlc_wdot  the same with Oja's per-unit sum taken over the weight (<W_k, corr_k> +
               b_k sum y_k) instead of over y * u (the dispatch policy's
               ``activity_sum_devices`` emptied: ghlc's way before ``activity_sums``)

and prints the median step, the paired median ratio to bp with its 95 % CI, and the
arithmetic floor: (backprop MACs + one weight-gradient-sized product per plastic layer) /
backprop MACs, backprop being forward + input gradient + weight gradient for every layer
but the first's input gradient.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time

import torch
from benchlib.machine import machine
from benchlib.runners import Stepper
from benchlib.stats import median_ci
from torch import nn

import ghlc

VARIANTS = ("bp", "ghlc", "ghlc_wdot")
OVERRIDES = {"ghlc_wdot": {"activity_sum_devices": ()}}  # dispatch-policy fields


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def floor(hidden: int) -> float:
    """The arithmetic floor of a GHL step over a backprop step (per sample; the head is not
    plastic)."""
    fwd = [784 * hidden, hidden * hidden, hidden * 10]
    bp = 2 * fwd[0] + 3 * (fwd[1] + fwd[2])
    return (bp + fwd[0] + fwd[1]) / bp


def timed(s: Stepper) -> float:
    """Microseconds of one step."""
    t0 = time.perf_counter()
    s()
    return (time.perf_counter() - t0) * 1e6


def run(hidden: int, batch: int, repeats: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    base = mlp(hidden)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    cfg = ghlc.GHLConfig(plastic=("conv", "linear"))
    steppers = {}
    for v in VARIANTS:
        m = copy.deepcopy(base)
        if v != "bp":
            m = ghlc.prepare(m, (x,), cfg)
        steppers[v] = Stepper(m, x, y, OVERRIDES.get(v))
    for s in steppers.values():
        for _ in range(5):
            s()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(repeats):
        order = list(VARIANTS)
        random.Random(i).shuffle(order)
        for v in order:
            times[v].append(timed(steppers[v]))
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes", default="256x64,1000x64,1000x256", help="comma-separated HIDDENxBATCH"
    )
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args(argv)
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
        if any(len(s) != 2 or min(s) < 1 for s in sizes):
            raise ValueError
    except ValueError:
        print(f"error: --sizes {args.sizes!r} is not a list of HIDDENxBATCH", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    rows = []
    for hidden, batch in sizes:
        print(f"  MLP 784-{hidden}-{hidden}-10, batch {batch}", file=sys.stderr)
        times = run(hidden, batch, args.repeats)
        for v in VARIANTS:
            ratios = [a / b for a, b in zip(times[v], times["bp"])]
            lo, hi, _ = median_ci(ratios)
            rows.append(
                (
                    hidden,
                    batch,
                    v,
                    statistics.median(times[v]) / 1e3,
                    statistics.median(ratios),
                    lo,
                    hi,
                    floor(hidden),
                )
            )
    print(f"{machine('cpu')}, median of {args.repeats} interleaved steps")
    print("| MLP | batch | variant | median ms | ratio to bp | 95% CI | floor | ratio/floor |")
    print("|---|---|---|---|---|---|---|---|")
    for hidden, batch, v, ms, r, lo, hi, fl in rows:
        tail = "– | – | – |" if v == "bp" else f"{lo:.3f}–{hi:.3f} | {fl:.3f} | {r / fl:.3f} |"
        print(f"| 784-{hidden}-{hidden}-10 | {batch} | {v} | {ms:.2f} | {r:.3f} | {tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
