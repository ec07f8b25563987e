"""A conv's weight gradient in one call, a block of output units at a time, or as a forward conv.

    python bench/wgrad_blocks.py --device cpu --model deephebb
    python bench/wgrad_blocks.py --device cpu --model resnet18 --extra --repeats 7
    python bench/wgrad_blocks.py --device cpu --model resnet18 --batch 16   # sampled block
    python bench/wgrad_blocks.py --device cpu --small --repeats 21         # small 3x3 convs

For every plastic conv of the model (shapes traced at the bench batch, as bench/step.py does)
and, with ``--extra``, a few larger 3x3 and 1x1 convs, it times the weight gradient alone
(``convolution_backward``, weight only) on random tensors of the layer's shapes:

    one      one call over all output units
    uN       one call per block of N output units, each written into one output tensor
    fwd      the same sums as forward convs (batch and channels swapped, the cotangent as
             the kernel, ``block_units`` output units a call; ``correlation.forward_form``)
    ghlc     ``ghlc.runtime.correlation.weight_vjp``: what ghlc's Hebbian term uses (the
             fastest way measured at its first call, or with measuring off the policy's
             static choice; column "ghlc way": the static choice)

``--small`` times a grid of small 3x3 convs instead (batch 4/16/64, 16-96 channels in and
out, 3x3 to 12x12 outputs), to show where the forward form's fixed cost loses
(the dispatch policy's ``forward_form_min_macs`` and ``forward_form_min_channels``). It
prints, per layer, the medians and the paired ratios to ``one`` (each repeat runs every
variant once, in a shuffled order). The in-call combine uses blocks of at most
``block_units`` units too. On CUDA each sample is the mean of 10 back-to-back calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from benchlib.layers import bench_layers, layer_bench_args, layer_bench_error
from benchlib.machine import machine
from benchlib.timing import time_layers

from ghlc.runtime import correlation, policy
from ghlc.runtime.calls import CallSpec

# (name, batch, C_in, C_out, size, kernel, stride, padding): larger convs than the bench
# models have, to show where blocks start to pay
EXTRA = (
    ("c512-1024 8x8", 64, 512, 1024, 8, 3, 1, 1),
    ("c768-768 8x8", 64, 768, 768, 8, 3, 1, 1),
    ("c1024-1024 4x4", 64, 1024, 1024, 4, 3, 1, 1),
    ("c256-1536 8x8", 64, 256, 1536, 8, 3, 1, 1),
    ("c2048-512 1x1 7x7", 64, 2048, 512, 7, 1, 1, 0),
)

# (batch, channels in and out, output size) of --small: 3x3 convs, stride 1, padding 1
SMALL = tuple((n, c, size) for n in (4, 16, 64) for c in (16, 32, 64, 96) for size in (3, 6, 12))


def _case(name: str, x: torch.Tensor, w: torch.Tensor, spec: CallSpec, units: list[int]) -> dict:
    cot = torch.randn(spec.run(x, w, None).shape, device=x.device)
    fns = {
        "one": lambda: correlation.vendor(spec, x, w, cot),
        "ghlc": lambda: correlation.weight_vjp(spec, x, w, cot),
        "fwd": lambda: correlation.forward_form(spec, x, w, cot),
    }
    for n in units:
        if n < w.shape[0]:
            fns[f"u{n}"] = lambda n=n: correlation.by_units(spec, x, w, cot, n)
    ref = fns["one"]()
    scale = ref.abs().max().item() or 1.0
    err = max((f() - ref).abs().max().item() for f in fns.values()) / scale
    way = {"forward_form": "fwd", "unit_blocks": "blocks", "vendor": "one"}[
        correlation.static_choice(spec, w, cot, policy.current())
    ]
    return {"layer": name, "shape": tuple(w.shape), "fns": fns, "err": err, "way": way}


def small_cases(device: str, units: list[int]) -> list[dict]:
    """The :data:`SMALL` grid, named by batch, channels, output size and multiply-adds."""
    out = []
    spec = CallSpec("conv", nd=2, stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    for n, c, size in SMALL:
        xi = torch.randn(n, c, size, size, device=device)
        w = torch.randn(c, c, 3, 3, device=device)
        macs = n * size * size * c * c * 9
        out.append(_case(f"b{n} c{c} {size}x{size} ({macs / 1e6:.1f} M MAC)", xi, w, spec, units))
    return out


def cases(model: str, batch: int, device: str, extra: bool, units: list[int]) -> list[dict]:
    out = []
    for info, conv in bench_layers(model, batch):
        if not conv or conv[3] or conv[5] != 1:  # linear, transposed or grouped
            continue
        stride, padding, dilation = (tuple(a) for a in conv[:3])
        spec = CallSpec("conv", len(stride), stride=stride, padding=padding, dilation=dilation)
        xi = torch.randn(info.in_shape, device=device)
        w = torch.randn(info.weight_shape, device=device)
        out.append(_case(info.name, xi, w, spec, units))
    if extra:
        for name, n, ci, co, size, k, s, p in EXTRA:
            spec = CallSpec("conv", nd=2, stride=(s, s), padding=(p, p), dilation=(1, 1))
            xi = torch.randn(n, ci, size, size, device=device)
            w = torch.randn(co, ci, k, k, device=device)
            out.append(_case(name, xi, w, spec, units))
    return out


def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    layer_bench_args(p, "deephebb", "cpu", 5)
    p.add_argument("--units", default="64,128,256,512", help="block sizes to time")
    p.add_argument("--extra", action="store_true", help="also a few larger convs")
    p.add_argument(
        "--small",
        action="store_true",
        help="a grid of small 3x3 convs instead of the model's layers",
    )
    args = p.parse_args(argv)
    problem = layer_bench_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        units = sorted({int(u) for u in args.units.split(",") if u.strip()})
    except ValueError:
        print(f"error: --units {args.units!r} is not a list of integers", file=sys.stderr)
        return 2
    if not units or min(units) < 1:
        print("error: --units must list positive integers", file=sys.stderr)
        return 2
    rows = (
        small_cases(args.device, units)
        if args.small
        else cases(args.model, args.batch, args.device, args.extra, units)
    )
    times = time_layers(rows, args.device, args.repeats)
    cols = ["ghlc", "fwd", *(f"u{n}" for n in units)]
    what = "small 3x3 convs" if args.small else f"{args.model}, batch {args.batch}"
    print(
        f"{what}, {machine(args.device)}, weight gradient only, median of "
        f"{args.repeats} (ms), paired ratio to one call"
    )
    print("| layer | weight | ghlc way | one | " + " | ".join(cols) + " | max rel diff |")
    print("|---|---|---|---|" + "---|" * len(cols) + "---|")
    for i, r in enumerate(rows):
        one = times[i, "one"]
        cells = []
        for c in cols:
            if (i, c) not in times:
                cells.append("–")
                continue
            ratio = statistics.median(a / b for a, b in zip(times[i, c], one))
            cells.append(f"{_ms(statistics.median(times[i, c]))} ({ratio:.3f})")
        print(
            f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | "
            f"{r['way']} | {_ms(statistics.median(one))} | "
            + " | ".join(cells)
            + f" | {r['err']:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
