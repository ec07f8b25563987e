"""Plastic layers at their real shapes: the arithmetic floor, the kernel-floor probes, and the
arguments of the per-layer kernel scripts (wgrad_stack.py, wgrad_blocks.py, rule_ops.py)."""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import ghlc

from .models import EXTRA_MODELS, MODELS, build, data, layout
from .timing import sync, time_call
from .variants import SAMPLE_FRACTION


def _annotated(base: nn.Module, temp: float | dict, x: torch.Tensor) -> Any:
    cfg = ghlc.GHLConfig(temperature=temp)
    lg = ghlc.trace(copy.deepcopy(base), (x,), config=cfg)
    return ghlc.passes.PassManager(ghlc.passes.default_passes())(lg)


def layer_macs(info: Any) -> int:
    """Forward multiply-accumulates of one layer call (shapes include the batch)."""
    per_out = 1
    for d in info.weight_shape[1:]:
        per_out *= d
    if info.kind.startswith("conv_transpose"):  # weight (C_in, C_out/g, *k): per input elem
        n = 1
        for d in info.in_shape:
            n *= d
        return n * per_out
    n = 1
    for d in info.out_shape:
        n *= d
    return n * per_out


def floor_stats(base: nn.Module, temp: float | dict, x: torch.Tensor) -> dict:
    """Backprop MACs (forward + input-grad + weight-grad; none of the first layer's input-grad),
    Hebbian MACs (one weight-gradient-sized product per plastic layer) and the floor ratio."""
    layers = _annotated(base, temp, x).layers()
    first = min(i.order for i in layers)
    bp = hebb = 0
    per_layer = []
    for info in layers:
        f = layer_macs(info) * max(1, info.calls)
        bp += f * (2 if info.order == first else 3)
        plastic = str(info.role) == "plastic"
        hebb += f if plastic else 0
        per_layer.append({"layer": info.name, "kind": info.kind, "fwd_macs": f, "plastic": plastic})
    return {
        "bp_macs": bp,
        "hebbian_macs": hebb,
        "floor": (bp + hebb) / bp,
        "floor_sampled": (bp + SAMPLE_FRACTION * hebb) / bp,
        "layers": per_layer,
    }


def _conv_out(
    n: int, k: int, stride: int, pad: int, dil: int, out_pad: int, transposed: bool
) -> int:
    if transposed:
        return (n - 1) * stride - 2 * pad + dil * (k - 1) + out_pad + 1
    return (n + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv_args(mod: nn.Module, info: Any) -> tuple[tuple, str]:
    """(stride, padding, dilation, transposed, output_padding, groups) of a plastic conv's
    call, or ((), why) when they cannot be had from its module. The recorded in_shape is the
    input of the functional call, so a padding_mode other than "zeros" (the module pads
    first and calls with padding 0) is found by checking the output size."""
    if not isinstance(mod, nn.modules.conv._ConvNd):
        return (), f"owning module is {type(mod).__name__}, not an nn.Conv*d"
    k = info.weight_shape[2:]
    nd = len(k)
    stride, dil = tuple(mod.stride), tuple(mod.dilation)
    out_pad = tuple(mod.output_padding)
    transposed = bool(mod.transposed)
    if len(info.in_shape) != nd + 2 or len(info.out_shape) != nd + 2:
        return (), f"in/out shapes {info.in_shape}/{info.out_shape} (unbatched call?)"
    pads: list[tuple[int, ...]] = []
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            pads.append((0,) * nd)
        else:  # "same": symmetric only when every total padding is even
            total = [d * (kk - 1) for d, kk in zip(dil, k)]
            if any(t % 2 for t in total) and mod.padding_mode == "zeros":
                return (), "padding='same' with an odd total padding (asymmetric)"
            pads.append(tuple(t // 2 for t in total))
    else:
        pads.append(tuple(mod.padding))
    pads.append((0,) * nd)  # padding_mode != "zeros": padded input, padding 0
    for pad in pads:
        want = tuple(
            _conv_out(info.in_shape[2 + i], k[i], stride[i], pad[i], dil[i], out_pad[i], transposed)
            for i in range(nd)
        )
        if want == tuple(info.out_shape[2:]):
            return (
                list(stride),
                list(pad),
                list(dil),
                transposed,
                list(out_pad),
                int(mod.groups),
            ), ""
    return (), (
        f"padding={mod.padding!r} (padding_mode={mod.padding_mode!r}) does not give "
        f"the recorded output {info.out_shape} from {info.in_shape}"
    )


def plastic_layers(
    base: nn.Module, temp: float | dict, x: torch.Tensor
) -> tuple[list[tuple], list[str]]:
    """([(info, conv)], skipped) for the plastic layers of ``base`` traced at ``x``: ``conv``
    = the call's convolution arguments (``()`` for linear layers); a conv whose arguments
    cannot be had from its module is left out with a note in ``skipped``."""
    layers, skipped = [], []
    for info in _annotated(base, temp, x).layers():
        if str(info.role) != "plastic":
            continue
        conv: tuple = ()
        if info.kind != "linear":
            conv, why = conv_args(base.get_submodule(info.module), info)
            if not conv:
                skipped.append(f"{info.name}: {why}")
                continue
        layers.append((info, conv))
    return layers, skipped


def bench_layers(name: str, batch: int) -> list[tuple]:
    """[(info, conv)] of a bench model's plastic layers traced at ``batch`` 3x32x32 inputs
    (:func:`plastic_layers`); the layers left out are noted on stderr."""
    torch.manual_seed(0)
    base, temp = build(name)
    x, _ = data(batch, 32, 10, "cpu")
    layers, skipped = plastic_layers(base, temp, x)
    for note in skipped:
        print(f"  left out {note}", file=sys.stderr)
    return layers


def conv_weight_grad(
    cot: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conv: tuple
) -> torch.Tensor:
    """The weight gradient alone of a conv call (``conv``: its arguments after the bias)."""
    return torch.ops.aten.convolution_backward(cot, x, w, None, *conv, [False, True, False])[1]


def sampled_rows(t: torch.Tensor, frac: float) -> torch.Tensor:
    """The first max(1, round(frac * n)) of t's n rows (all of them for frac 1), in t's
    memory format."""
    k = max(1, int(round(frac * t.shape[0])))
    return t[:k].clone() if k < t.shape[0] else t


def _grid_functions() -> tuple[Callable, Callable, Callable]:
    """The runtime's sampled-grid helpers (sample_grid, grid_call, grid_pad)."""
    from ghlc.runtime.sampled import grid_call, grid_pad, sample_grid

    return sample_grid, grid_call, grid_pad


def grid_probe(info: Any, conv: tuple, frac: float, mk: dict) -> tuple:
    """(narrowed input, cotangent, conv arguments) of the strided weight-gradient call that
    ``sample_over="positions"`` makes for a conv layer (offsets 0)."""
    from ghlc.runtime.calls import CallSpec

    sample_grid, grid_call, grid_pad = _grid_functions()
    stride, padding, dilation, transposed, out_pad, groups = conv
    nd = len(stride)
    spec = CallSpec("conv", nd, False, tuple(stride), tuple(padding), tuple(dilation), (), groups)
    xi = layout(torch.randn(info.in_shape, **mk))
    u = layout(torch.randn(info.out_shape, **mk))
    grid = sample_grid(spec, xi.shape, info.weight_shape, u.shape, frac, (0,) * nd)
    sp, sx, su = grid_call(spec, xi, u, grid)
    cot = grid_pad(su.contiguous(), grid)
    return sx, cot, (sp.stride, sp.padding, dilation, transposed, out_pad, groups)


def kernel_probes(
    base: nn.Module,
    temp: float | dict,
    x: torch.Tensor,
    device: str,
    frac: float = 1.0,
    over: str = "batch",
    dtype: torch.dtype | None = None,
) -> tuple[list[dict], list[str]]:
    """One weight-gradient-only kernel per plastic layer, on random tensors of its shapes.

    The model is traced at x itself, so the recorded shapes are the ones at the benchmark
    batch (a layer called on a reshaped input, e.g. (N*T, C), keeps its real leading dim).
    ``frac`` < 1: the sampled mode's shapes, a block of that fraction of the leading dim (of
    the rows for linear layers), as ``sample_fraction`` takes it; with ``over="positions"``
    a plain conv's strided call over the sampled grid of output positions (offsets 0).
    ``dtype``: the tensors' dtype (default x's).
    Returns (probes: layer, kind, calls, fn; skipped: one note per plastic layer left out).
    Each fn is called once here (allocations, kernel selection)."""
    layers, skipped = plastic_layers(base, temp, x)
    dtype = dtype or (x.dtype if x.is_floating_point() else torch.float32)
    probes = []
    for info, conv in layers:
        mk = dict(device=device, dtype=dtype)
        if info.kind == "linear":
            c_out, c_in = info.weight_shape[0], info.weight_shape[-1]
            xi = torch.randn(info.in_shape, **mk).reshape(-1, c_in)
            cot = torch.randn(info.out_shape, **mk).reshape(-1, c_out)
            xi, cot = sampled_rows(xi, frac), sampled_rows(cot, frac)

            def fn(cot=cot, xi=xi):
                return cot.t() @ xi
        else:
            if over == "positions" and frac < 1 and not conv[3]:  # conv[3]: transposed
                xi, cot, conv = grid_probe(info, conv, frac, mk)
            else:
                xi = sampled_rows(layout(torch.randn(info.in_shape, **mk)), frac)
                cot = sampled_rows(layout(torch.randn(info.out_shape, **mk)), frac)
            w = layout(torch.randn(info.weight_shape, **mk))

            def fn(cot=cot, xi=xi, w=w, conv=conv):
                return conv_weight_grad(cot, xi, w, conv)

        with torch.no_grad():
            fn()
        probes.append(
            {"layer": info.name, "kind": info.kind, "calls": max(1, info.calls), "fn": fn}
        )
    sync(device)
    return probes, skipped


def kernel_round(probes: list[dict], device: str) -> list[float]:
    """One timed call of every probe (ms, in probe order)."""
    return [time_call(p["fn"], device) for p in probes]


def kernel_summary(probes: list[dict], rounds: list[list[float]], skipped: list[str]) -> dict:
    """Per-layer median ms x calls, and their sum (hebbian_kernel_ms)."""
    layers = []
    for i, p in enumerate(probes):
        med = statistics.median(r[i] for r in rounds)
        layers.append(
            {
                "layer": p["layer"],
                "kind": p["kind"],
                "calls": p["calls"],
                "median_ms": med,
                "step_ms": med * p["calls"],
            }
        )
    return {
        "hebbian_kernel_ms": sum(lay["step_ms"] for lay in layers),
        "layers": layers,
        "skipped": skipped,
    }


def patch_bytes(base: nn.Module, x: torch.Tensor) -> dict:
    """Unfolded patch tensors of the paper's way: N*L*C_in*k*k*4 bytes per conv layer."""
    lg = ghlc.trace(copy.deepcopy(base), (x,))
    sizes = {}
    for info in lg.layers():
        if info.family != "conv":
            continue
        n_l = 1
        for d in (info.out_shape[0], *info.out_shape[2:]):
            n_l *= d
        ckk = info.in_shape[1]
        for d in info.weight_shape[2:]:
            ckk *= d
        sizes[info.name] = n_l * ckk * 4 * max(1, info.calls)
    worst = max(sizes, key=lambda k: sizes[k])
    return {
        "sum_bytes": sum(sizes.values()),
        "max_bytes": sizes[worst],
        "max_layer": worst,
        "per_layer_bytes": sizes,
    }


def layer_bench_args(p: argparse.ArgumentParser, model: str, device: str, repeats: int) -> None:
    """--model, --device, --batch and --repeats of the per-layer kernel benches, with these
    defaults."""
    p.add_argument("--model", default=model, choices=MODELS + EXTRA_MODELS)
    p.add_argument("--device", default=device, choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=repeats)


def layer_bench_error(args: argparse.Namespace) -> str | None:
    """The one-line problem with :func:`layer_bench_args`'s values, or None."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda but no CUDA device"
    if args.repeats < 1 or args.batch < 1:
        return "--repeats and --batch must be >= 1"
    return None
