"""The rule's weight-sized work per plastic layer: the per-unit dots of Oja's decay (one
bmm, or ghlc's ``fused.row_dots``), the whole decay and the sign combination.

    python bench/rule_ops.py --model resnet18
    python bench/rule_ops.py --model deephebb --repeats 25
    python bench/rule_ops.py --model resnet18 --in-step --repeats 10

For every plastic layer of the model (weights of its shapes, random values) it times what
the rule does once the layer's Hebbian correlation is in hand:

    dots_bmm   the per-unit dots <corr_k, W_k> as one torch.bmm of (1 x n) by (n x 1)
    dots       the same as ghlc computes them (``fused.row_dots``)
    oja        Oja's decay as ghlc computes it (``fused.oja_decay_``)
    combine    |H| sign(G) / max|H| in place as ghlc computes it (``fused.sign_combine_``)

Each call gets fresh copies of the inputs it writes (made outside the timed region), as in
a step, where H and G are new tensors every time. It prints the medians per layer and summed
over the model, and the paired ratio dots / dots_bmm (each repeat runs every variant once
over all layers, in a shuffled order).

Microbenchmarks of such passes can mislead (they depend on what the heap and the caches
hold), so ``--in-step`` times the dots inside real ghlc training steps of the model (batch
64, as bench/step.py), the two ways alternating step by step, and prints the time per step
spent in them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from benchlib.layers import bench_layers, layer_bench_args, layer_bench_error
from benchlib.machine import machine
from benchlib.models import build, data
from benchlib.runners import make_runner
from benchlib.timing import run_order, sync

from ghlc.runtime import fused

VARIANTS = ("dots_bmm", "dots", "oja", "combine")


def _dots_bmm(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    k = c.shape[0]
    return torch.bmm(c.reshape(k, 1, -1), w.reshape(k, -1, 1)).view(k)


# variant -> (function, which of the layer's tensors it takes: copied fresh for every call)
OPS = {
    "dots_bmm": (_dots_bmm, ("c", "w")),
    "dots": (fused.row_dots, ("c", "w")),
    "oja": (lambda c, w: fused.oja_decay_(c, w, None), ("c*", "w")),
    "combine": (fused.sign_combine_, ("h*", "g*")),
}


def layers(model: str, batch: int, device: str) -> list[dict]:
    out = []
    for info, _ in bench_layers(model, batch):
        shape = tuple(info.weight_shape)
        t = {k: torch.randn(shape, device=device) for k in "cwhg"}
        ref = (t["c"].double() * t["w"].double()).flatten(1).sum(1)
        err = {
            v: (OPS[v][0](t["c"], t["w"]).double() - ref).abs().max().item()
            for v in ("dots", "dots_bmm")
        }
        out.append({"layer": info.name, "shape": shape, "t": t, "err": err})
    return out


def timed(layer: dict, variant: str, device: str) -> float:
    """ms of one call on fresh copies of the tensors it writes (``*``)."""
    fn, names = OPS[variant]
    args = [layer["t"][n[0]].clone() if n.endswith("*") else layer["t"][n] for n in names]
    sync(device)
    t0 = time.perf_counter()
    fn(*args)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def in_step(model: str, repeats: int) -> dict[str, list[float]]:
    """{way: [ms per step spent in the per-unit dots]} over ``repeats`` ghlc steps each."""
    torch.manual_seed(0)
    base, temp = build(model)
    x, y = data(64, 32, 10, "cpu")
    runner = make_runner(base, temp, "ghlc", x, y)
    ghlc_dots, spent = fused.row_dots, [0.0]

    def timing(fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[0] += time.perf_counter() - t0
            return out

        return call

    ways = {"dots_bmm": timing(lambda c, w, block=0: _dots_bmm(c, w)), "dots": timing(ghlc_dots)}
    out: dict[str, list[float]] = {k: [] for k in ways}
    try:
        for rep in range(2 + repeats):  # two warm-up steps
            for k in run_order(list(ways), rep):
                fused.row_dots = ways[k]
                spent[0] = 0.0
                runner.step(x, y)
                if rep >= 2:
                    out[k].append(spent[0] * 1e3)
    finally:
        fused.row_dots = ghlc_dots
    return out


def ratio(a: list[float], b: list[float]) -> str:
    """The median of the paired ratios a / b."""
    return f"{statistics.median(x / y for x, y in zip(a, b)):.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    layer_bench_args(p, "resnet18", "cpu", 15)
    p.add_argument(
        "--in-step",
        action="store_true",
        help="time the dots inside training steps instead (CPU, batch 64)",
    )
    args = p.parse_args(argv)
    problem = layer_bench_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.in_step:
        if args.device != "cpu":
            print("error: --in-step times CPU steps only", file=sys.stderr)
            return 2
        got = in_step(args.model, args.repeats)
        print(
            f"{args.model}, {machine('cpu')}, {args.repeats} ghlc steps per way: ms "
            "per step in the per-unit dots (median)"
        )
        print(
            f"| dots_bmm | dots | dots / dots_bmm |\n|---|---|---|\n"
            f"| {statistics.median(got['dots_bmm']):.2f} | "
            f"{statistics.median(got['dots']):.2f} | {ratio(got['dots'], got['dots_bmm'])} |"
        )
        return 0
    rows = layers(args.model, args.batch, args.device)
    times = {(i, v): [] for i in range(len(rows)) for v in VARIANTS}
    for rep in range(1 + args.repeats):  # the first round warms up
        for v in run_order(list(VARIANTS), rep):
            for i, r in enumerate(rows):
                ms = timed(r, v, args.device)
                if rep:
                    times[i, v].append(ms)
    total = {
        v: [sum(times[i, v][j] for i in range(len(rows))) for j in range(args.repeats)]
        for v in VARIANTS
    }

    print(
        f"{args.model}, {machine(args.device)}, median of {args.repeats} (ms), fresh "
        "inputs every call; dots: max abs error against float64"
    )
    heads = [*VARIANTS, "dots / dots_bmm", "error dots / dots_bmm"]
    print("| layer | weight | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(heads))
    for i, r in enumerate(rows):
        cells = [f"{statistics.median(times[i, v]):.3f}" for v in VARIANTS]
        cells.append(ratio(times[i, "dots"], times[i, "dots_bmm"]))
        cells.append(f"{r['err']['dots']:.1e} / {r['err']['dots_bmm']:.1e}")
        print(f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | " + " | ".join(cells) + " |")
    cells = [f"{statistics.median(total[v]):.2f}" for v in VARIANTS]
    cells.append(ratio(total["dots"], total["dots_bmm"]))
    print("| **all layers** | | " + " | ".join(cells) + " | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
