"""CPU-side cost of a plastic call: what makes small eager GHL steps launch-bound.

    python bench/overhead.py                 # CPU
    python bench/overhead.py --device cuda   # the same on a GPU (host time per step)

A stack of ``--layers`` tiny conv-BN-ReLU blocks (8 channels, 4x4 inputs, batch 2) is so
small that a step's time is the fixed cost of its calls, not arithmetic. The script times, in
one process and interleaved, a plain backprop step and ghlc steps (every conv plastic):

    ghlc       exact, as ghlc runs by default
    ghlc_mode  exact with interception="mode": every torch call of the forward goes through
               a function mode
    ghlc_fn    exact with every plastic call run by ghlc's autograd Function (PlasticCall)
               instead of backprop's node plus an output hook (the dispatch policy's
               ``hooked_calls`` off)
    ghlc_s50   sample_fraction=0.5
    ghlc_fwd   exact with the Hebbian correlation as a forward conv wherever the form applies
               (the policy's ``forward_form_min_macs`` and ``forward_form_min_channels``
               set to 0, as ghlc chose before those limits; on CPU only)

It prints the extra time per plastic layer and, from one profiled step of each, the extra
torch operators per plastic layer, the self time of PlasticCall (its Python in forward and
backward, outside the operators it calls; the profiler inflates it) and the convolution
calls per step (forward and backward kernels; ghlc adds one per plastic conv, its Hebbian
correlation as a weight-gradient call or, on CPU for small outputs of large enough convs,
as a forward conv; this stack's tiny convs take the weight-gradient call but in ghlc_fwd). On
a GPU, eager steps of the 32x32 models in ``bench/step.py`` pay this per plastic layer;
inside a CUDA graph they do not.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time

import torch
from benchlib.runners import Stepper
from benchlib.timing import sync
from torch import nn
from torch.profiler import ProfilerActivity, profile

import ghlc
from ghlc.runtime import policy

GHL_FRAMES = ("PlasticCall", "PlasticCallBackward")
CONV_OPS = ("aten::convolution", "aten::convolution_backward")


def stack(layers: int) -> nn.Module:
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(8 * 16, 10))


def timed(s: Stepper, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    s()
    sync(device)
    return (time.perf_counter() - t0) * 1e6


def op_split(s: Stepper, device: str) -> dict[str, float]:
    """Of one profiled step: torch operators, the self time (us) of ghlc's autograd Function
    frames, and the convolution calls (aten::convolution and aten::convolution_backward)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        s()
        sync(device)
    ev = prof.key_averages()
    return {
        "ops": sum(e.count for e in ev if e.key.startswith("aten::")),
        "function_self_us": sum(e.self_cpu_time_total for e in ev if e.key in GHL_FRAMES),
        "conv_calls": sum(e.count for e in ev if e.key in CONV_OPS),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    if args.layers < 1 or args.steps < 1:
        print("error: --layers and --steps must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device
    base = stack(args.layers).to(dev)
    x = torch.randn(2, 8, 4, 4, device=dev)
    y = torch.tensor([1, 2], device=dev)
    configs = {
        "bp": None,
        "ghlc": {},
        "ghlc_mode": {"interception": "mode"},
        "ghlc_fn": {},
        "ghlc_s50": {"sample_fraction": 0.5},
    }
    if dev in policy.current().forward_form_devices:
        configs["ghlc_fwd"] = {}
    # dispatch-policy overrides of the steps: every call through ghlc's autograd Function, and
    # the forward form for every conv it applies to (the static choice, not a measured one)
    overrides = {
        "ghlc_fn": {"hooked_calls": False},
        "ghlc_fwd": {"forward_form_min_macs": 0, "forward_form_min_channels": 0, "measure": False},
    }
    steppers = {}
    for name, kw in configs.items():
        m = copy.deepcopy(base)
        if kw is not None:
            m = ghlc.prepare(m, (x,), ghlc.GHLConfig(**kw))
        steppers[name] = Stepper(m, x, y, overrides.get(name))
    plastic = len(ghlc.runtime.runtime_of(steppers["ghlc"].model).sites)
    for s in steppers.values():
        for _ in range(5):
            s()
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for i in range(args.steps):
        order = list(steppers)
        random.Random(i).shuffle(order)
        for k in order:
            times[k].append(timed(steppers[k], dev))
    splits = {k: op_split(s, dev) for k, s in steppers.items()}
    bp_us = statistics.median(times["bp"])
    print(
        f"{args.layers} conv-BN-ReLU blocks (8 ch, 4x4, batch 2) and a linear head, "
        f"{plastic} plastic layers, device {dev}, {torch.get_num_threads()} threads, "
        f"median of {args.steps} interleaved steps"
    )
    head = (
        "variant",
        "step us",
        "extra us / plastic layer",
        "torch ops / step",
        "extra ops / plastic layer",
        "PlasticCall self us / plastic layer",
        "conv calls / step",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for k in steppers:
        us = statistics.median(times[k])
        sp = splits[k]
        extra = (us - bp_us) / plastic if k != "bp" else 0.0
        ops = (sp["ops"] - splits["bp"]["ops"]) / plastic if k != "bp" else 0.0
        py = sp["function_self_us"] / plastic
        print(
            f"| {k} | {us:.0f} | {extra:.1f} | {sp['ops']} | {ops:.1f} | {py:.1f} | "
            f"{sp['conv_calls']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
