"""The rule's weight-sized work per plastic layer: Oja's decay and the sign combination.

    python bench/rule_ops.py --model resnet18
    python bench/rule_ops.py --model deephebb --repeats 25

For every plastic layer of the model (weights of its shapes, random values) it times, after
the layer's Hebbian correlation is in hand:

    bmm        the per-unit dots <corr_k, W_k> as one torch.bmm of (1 x n) by (n x 1)
    row_dots   the same dots as ghlc computes them (``fused.row_dots``)
    oja        Oja's decay as ghlc computes it (``fused.oja_decay_``, into a buffer)
    combine    |H| sign(G) / max|H| in place (``hebbian.combine``)

and prints the medians per layer, their sums over the model, and the paired ratio of
``row_dots`` to ``bmm`` (each repeat runs every variant once, in a shuffled order).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step  # noqa: E402

from ghlc.runtime import fused, hebbian  # noqa: E402

VARIANTS = ("bmm", "row_dots", "oja", "combine")


def _bmm_dots(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    k = c.shape[0]
    return torch.bmm(c.reshape(k, 1, -1), w.reshape(k, -1, 1)).view(k)


def cases(model: str, batch: int, device: str) -> list[dict]:
    out = []
    rule = hebbian.HebbianRule()
    for info, _ in step.bench_layers(model, batch):
        shape = tuple(info.weight_shape)
        w, c, g = (torch.randn(shape, device=device) for _ in range(3))
        h, buf = torch.randn(shape, device=device), torch.empty(shape, device=device)
        ref = (c.double() * w.double()).flatten(1).sum(1)
        err = (fused.row_dots(c, w).double() - ref).abs().max().item()
        err_bmm = (_bmm_dots(c, w).double() - ref).abs().max().item()
        fns = {"bmm": lambda c=c, w=w: _bmm_dots(c, w),
               "row_dots": lambda c=c, w=w: fused.row_dots(c, w),
               "oja": lambda c=c, w=w, b=buf: fused.oja_decay_(c, w, None, b),
               "combine": lambda h=h, g=g: hebbian.combine(h, g, rule, inplace=True)}
        out.append({"layer": info.name, "shape": shape, "fns": fns, "err": err,
                    "err_bmm": err_bmm})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    step.layer_bench_args(p, "resnet18", "cpu", 15)
    args = p.parse_args(argv)
    problem = step.layer_bench_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    rows = cases(args.model, args.batch, args.device)
    times = step.time_layers(rows, args.device, args.repeats)
    print(f"{args.model}, {step.machine(args.device)}, median of {args.repeats} (ms); "
          "max abs error of the dots against float64")
    print("| layer | weight | " + " | ".join(VARIANTS) + " | row_dots / bmm | error "
          "row_dots / bmm |")
    print("|---|---|" + "---|" * len(VARIANTS) + "---|---|")
    per_rep = {v: [0.0] * args.repeats for v in VARIANTS}
    for i, r in enumerate(rows):
        for v in VARIANTS:
            for j, ms in enumerate(times[i, v]):
                per_rep[v][j] += ms
        ratio = statistics.median(a / b for a, b in zip(times[i, "row_dots"], times[i, "bmm"]))
        cells = " | ".join(f"{statistics.median(times[i, v]):.3f}" for v in VARIANTS)
        print(f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {cells} | {ratio:.3f} | "
              f"{r['err']:.1e} / {r['err_bmm']:.1e} |")
    total = statistics.median(a / b for a, b in zip(per_rep["row_dots"], per_rep["bmm"]))
    cells = " | ".join(f"{statistics.median(per_rep[v]):.2f}" for v in VARIANTS)
    print(f"| **all layers** | | {cells} | {total:.3f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
