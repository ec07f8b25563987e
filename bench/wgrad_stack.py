"""Two weight-gradient calls per plastic conv (backprop's dL/dW and the Hebbian sum y x) or
one call with the two cotangents stacked along the output channels.

    python bench/wgrad_stack.py --device cuda --model resnet18
    python bench/wgrad_stack.py --device cpu --model fasthebb --repeats 5

For every plastic conv of the model (shapes traced at the bench batch, as bench/step.py does)
it times, on random tensors of the layer's shapes:

    two       convolution_backward(g, x, w) and convolution_backward(y, x, w), weight
              gradient only (what a GHL step computes today)
    stacked   torch.cat([g, y], 1), then one convolution_backward with a weight of 2 x C_out
              output channels (what a stacked call would cost)
    no_cat    the stacked call alone, its input already stacked (a bound: y written into the
              second half of a stacked buffer, g into the first, which backprop does not do)

and prints the medians per layer and their sums. On CUDA each sample is the mean of 10
back-to-back calls (benchlib.timing.time_call).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from benchlib.layers import bench_layers, conv_weight_grad, layer_bench_args, layer_bench_error
from benchlib.machine import machine
from benchlib.timing import time_layers

VARIANTS = ("two", "stacked", "no_cat")


def probes(name: str, batch: int, device: str) -> list[dict]:
    """One dict per plastic conv: layer name and a function per variant."""
    out = []
    for info, conv in bench_layers(name, batch):
        if not conv:  # a linear layer
            continue
        mk = dict(device=device)
        xi = torch.randn(info.in_shape, **mk)
        g = torch.randn(info.out_shape, **mk)
        y = torch.randn(info.out_shape, **mk)
        w = torch.randn(info.weight_shape, **mk)
        w2 = torch.cat([w, w])
        gy = torch.cat([g, y], 1)

        def wgrad(cot, weight, xi=xi, conv=conv):
            return conv_weight_grad(cot, xi, weight, conv)

        fns = {
            "two": lambda g=g, y=y, w=w, f=wgrad: (f(g, w), f(y, w)),
            "stacked": lambda g=g, y=y, w2=w2, f=wgrad: f(torch.cat([g, y], 1), w2),
            "no_cat": lambda gy=gy, w2=w2, f=wgrad: f(gy, w2),
        }
        # the stacked call gives both gradients (same numbers up to float rounding)
        a, b = fns["two"]()
        both = fns["stacked"]()
        c = w.shape[0]
        scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
        err = max((both[:c] - a).abs().max().item(), (both[c:] - b).abs().max().item()) / scale
        out.append(
            {
                "layer": info.name,
                "shape": tuple(info.weight_shape),
                "out_shape": tuple(info.out_shape),
                "fns": fns,
                "err": err,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    layer_bench_args(p, "resnet18", "cuda", 20)
    args = p.parse_args(argv)
    problem = layer_bench_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    layers = probes(args.model, args.batch, args.device)
    times = time_layers(layers, args.device, args.repeats)
    med = {k: statistics.median(t) for k, t in times.items()}
    print(
        f"{args.model}, batch {args.batch}, {machine(args.device)}, median of {args.repeats} (ms)"
    )
    print("| layer | weight | output | two | stacked | no_cat | stacked/two | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for i, lay in enumerate(layers):
        two, st, nc = (med[i, v] for v in VARIANTS)
        print(
            f"| {lay['layer']} | {'x'.join(map(str, lay['shape']))} | "
            f"{'x'.join(map(str, lay['out_shape']))} | {two:.4f} | {st:.4f} | {nc:.4f} | "
            f"{st / two:.3f} | {lay['err']:.1e} |"
        )
    tot = {v: sum(med[i, v] for i in range(len(layers))) for v in VARIANTS}
    print(
        f"| sum | | | {tot['two']:.4f} | {tot['stacked']:.4f} | {tot['no_cat']:.4f} | "
        f"{tot['stacked'] / tot['two']:.3f} | |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
