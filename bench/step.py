"""One SGD training step: plain backprop vs naive GHL vs ghlc GHL (exact and sampled).

For each model (random 3x32x32 inputs, random labels, batch 64 by default) this measures, in
one process and interleaved across the variants (a seeded shuffle of their order on every
repeat), the median time of one full step (zero_grad, forward, cross-entropy, backward,
[Hebbian], SGD step) of:

    bp         the model as is, plain backprop
    naive      GHL written the way the paper's demo does (bench/benchlib/naive_ghl.py:
               forward hooks, F.unfold patches + matmul after backward)
    ghlc       ghlc.prepare(model, ..., GHLConfig(temperature=...))
    ghlc_s25   ghlc with GHLConfig(sample_fraction=0.25) (fast approximate mode)

and, with --device cuda, ``ghlc_ref`` (the fused kernels off) and the ``*_graph`` variants
(the whole step captured in one CUDA graph: bp, ghlc, ghlc_ref, ghlc_chunk, ghlc_s25,
ghlc_p25, ghlc_stack, ghlc_stack20). More on request with ``--variants`` (``ghlc_static``:
the static dispatch thresholds instead of the measured kernel choice; ``ghlc_wgrad``,
``ghlc_wdot``, ``ghlc_fast``, ``ghlc_compile``, ``ghlc_amp`` ...). Every variant is a row of
the table in ``bench/benchlib/variants.py`` (its GHLConfig settings and dispatch-policy
overrides); ``--list-variants`` prints it. A *_graph variant whose capture raises is
dropped with a one-line warning. Besides the time it measures the peak memory of one step.
The *_graph rows' ratios (to bp, to the floors) are taken to bp_graph, the other rows' to bp
(the autocast rows' to bp_amp, ghlc_compile's to bp_compile where it runs).

Ratios are of medians (median step / median bp step). Because the variants of one repeat run
next to each other, each repeat also gives a paired ratio (its step / its bp step). The
quartiles of those (``ratio/floor IQR`` in the table) show how far one repeat's ratio moves
with the machine's load; the distribution-free 95 % confidence interval of their median
(``ratio/floor 95% CI``: order statistics, no assumption on the noise) says how well the run
pins the ratio down. A target is read as met where the whole CI is below it, missed where the
whole CI is above it, and unresolved otherwise (more repeats narrow the CI, not the IQR).

Two floors for GHL's extra cost, both over one backprop step:

    floor        arithmetic, from the layer shapes: (backprop MACs + one weight-gradient-sized
                 product per plastic layer) / backprop MACs. It assumes a weight-gradient
                 kernel runs at the forward's MAC rate, which need not hold (on CPU oneDNN's
                 weight gradient of a large 3x3 conv takes about twice its forward).
    kernel floor measured: for every plastic layer, one weight-gradient-only kernel on random
                 tensors of the layer's real shapes at the benchmark batch
                 (aten.convolution_backward with output_mask [False, True, False] for convs,
                 cot^T @ x for linear layers), median over the repeats (on CUDA each sample
                 the mean of 10 back-to-back calls, so that a short kernel is not timed as
                 its launch gap), times the layer's calls per step;
                 kernel floor = (bp step ms + sum) / bp step ms, the bp step being the same
                 run's median. For ghlc_s25 the kernels take the sampled block of the batch
                 (a quarter of the rows; on a GPU a small batch does not run in a quarter of
                 the time, so this is not 0.25 of the sum); for ghlc_p25 they are the strided
                 weight-gradient calls of the sampled grid (offset 0). The kernels are timed in
                 the same process, interleaved with the step repeats, so they see the same
                 machine load. A plastic conv whose module does not give a consistent
                 stride/padding/dilation is left out of the sum with a note.

On request it also reports ResNet-50 at 224x224 (--resnet50: ghlc peak memory next to the
size of the unfolded patch tensors the paper's way would need, the step times, the arithmetic
floor, and on CUDA the bp/ghlc steps captured in CUDA graphs), and by default the time of
ghlc.prepare on a 200-layer model. ``--no-memory`` skips the memory probes (a fresh process
per model and variant on CPU: most of a short run's time) and leaves those columns empty.

Each variant takes one untimed first step before the repeats; where ghlc measures its
kernel candidates at the first step (``ghlc.runtime.measure``), the seconds it spent doing so
are reported per row (``measure s``; "–" where this ghlc does not measure).

    python bench/step.py --device cpu --repeats 25
    python bench/step.py --device cuda --repeats 20 --resnet50
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchlib import models
from benchlib import variants as vt
from benchlib.layers import (
    floor_stats,
    kernel_probes,
    kernel_round,
    kernel_summary,
    patch_bytes,
)
from benchlib.machine import machine, machine_info
from benchlib.models import EXTRA_MODELS, MODELS, build, data
from benchlib.runners import (
    GraphRunner,
    Runner,
    cuda_cleanup,
    first_step,
    make_runner,
    warn_dropped,
)
from benchlib.stats import median_ci, mem_ratio, paired_ratios, quartiles
from benchlib.timing import METHOD as TIMING_METHOD
from benchlib.timing import run_order, sync, timed_step
from benchlib.variants import SAMPLE_FRACTION, reference
from torch import nn

import ghlc
from ghlc.runtime import fused
from ghlc.runtime.status import STATUS
from ghlc.train import slow_bf16

HERE = Path(__file__).resolve().parent

MEMORY_METHOD = {
    "cpu": (
        "each (model, variant) in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=131072 (large "
        "buffers are mmapped and returned to the OS on free, so RSS follows live memory): "
        "build, one warm-up step, reset the peak RSS (/proc/self/clear_refs 5), one measured "
        "step; peak = VmHWM - RSS before the model was built (weights, grads, ghlc state, "
        "activations and temporaries; excludes torch/ghlc import)"
    ),
    "cuda": (
        "per (model, variant), one at a time: build, one warm-up step, "
        "torch.cuda.reset_peak_memory_stats, one measured step; "
        "peak = max_memory_allocated - memory_allocated before the model was built. "
        "*_graph variants: build, the warm-up steps, reset_peak_memory_stats, then capture "
        "and one replay; peak = max_memory_allocated over capture + replay - memory_allocated "
        "before the model was built (a replay allocates nothing, so the peak of the step's "
        "temporaries is seen while capturing, when they are laid out in the graph's pool)"
    ),
}


# ---------------------------------------------------------------------------- memory
def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_inproc(model_name: str, variant: str, batch: int, size: int, device: str) -> dict:
    """Peak memory of one step, in this process (CUDA, or a CPU probe subprocess)."""
    torch.manual_seed(0)
    classes = 1000 if model_name == "resnet50" else 10
    x, y = data(batch, size, classes, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
    else:
        base = _proc_kb("VmRSS") * 1024
    m, temp = build(model_name)
    if vt.variant(variant).graph:  # CUDA only: peak over capture + one replay
        r = GraphRunner(m.to(device), temp, variant, x, y)  # takes the warm-up steps
        del m
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        r.capture()
        r.step(x, y)
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "peak_reset": True}
    r = Runner(m.to(device), temp, variant, x[:2])
    del m
    r.step(x, y)  # warm-up: grads and ghlc state exist from here on
    sync(device)
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        r.step(x, y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        exact = True
    else:
        exact = _reset_peak_rss()
        r.step(x, y)
        peak = _proc_kb("VmHWM") * 1024
    return {"peak_bytes": peak - base, "peak_reset": exact}


def memory(model_name: str, variant: str, args) -> dict:
    if args.device == "cuda":
        out = memory_inproc(model_name, variant, args.batch, 32, "cuda")
        gc.collect()
        torch.cuda.empty_cache()
        return out
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--device",
        "cpu",
        "--batch",
        str(args.batch),
        "--probe",
        f"{model_name}:{variant}",
    ]
    if models.CHANNELS_LAST:
        cmd.append("--channels-last")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe {model_name}/{variant} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- benches
def bench_model(name: str, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """(table rows, kernel-floor details) of one model."""
    torch.manual_seed(0)
    base, temp = build(name)
    base = base.to(args.device)
    x, y = data(args.batch, 32, 10, args.device)
    fl = floor_stats(base, temp, x)
    variants = list(args.variants or vt.defaults_for(args.device))

    def each_variant(make) -> dict:
        """``make(v)`` for every variant; a graph variant whose capture fails is dropped."""
        out = {}
        for v in list(variants):
            try:
                out[v] = make(v)
            except Exception as e:
                if not vt.variant(v).graph:
                    raise
                warn_dropped(name, v, e)
                variants.remove(v)
                del e
                cuda_cleanup()
        return out

    if args.no_memory:
        mems = {v: {"peak_bytes": None, "peak_reset": None} for v in variants}
    else:
        mems = each_variant(lambda v: memory(name, v, args))
    built = each_variant(
        lambda v: first_step(lambda: make_runner(base, temp, v, x, y), x, y, args.device)
    )
    runners = {v: r for v, (r, _) in built.items()}
    measure_s = {v: sec for v, (_, sec) in built.items()}
    probes, skipped = kernel_probes(base, temp, x, args.device)
    for note in skipped:
        print(f"  {name}: kernel floor leaves out {note}", file=sys.stderr)
    # the other kernel floors the variants need: "sampled" (the sampled block of the batch),
    # "positions" (the sampled grid), "amp_low" (the full kernels in bfloat16)
    kinds = {vt.variant(v).kernels for v in variants} - {"", "full"}
    probes_s = {
        k: kernel_probes(base, temp, x, args.device, dtype=vt.AMP_DTYPE)[0]
        if k == "amp_low"
        else kernel_probes(
            base,
            temp,
            x,
            args.device,
            SAMPLE_FRACTION,
            "positions" if k == "positions" else "batch",
        )[0]
        for k in sorted(kinds)
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    rounds: list[list[float]] = []
    rounds_s: dict[str, list[list[float]]] = {k: [] for k in probes_s}
    for rep in range(args.warmup + args.repeats):
        for v in run_order([*variants, "kernels"], rep):  # kernel-floor round included
            if v == "kernels":
                ks = kernel_round(probes, args.device)
                ks_s = {k: kernel_round(p, args.device) for k, p in probes_s.items()}
                if rep >= args.warmup:
                    rounds.append(ks)
                    for k in probes_s:
                        rounds_s[k].append(ks_s[k])
                continue
            ms = timed_step(runners[v], x, y, args.device)
            if rep >= args.warmup:
                times[v].append(ms)
        print(f"  {name} repeat {rep + 1}/{args.warmup + args.repeats}", file=sys.stderr)
    kern = kernel_summary(probes, rounds, skipped)
    for k, p in probes_s.items():
        kern[k] = kernel_summary(p, rounds_s[k], skipped)
    del runners, built, probes, probes_s
    gc.collect()
    medians = {v: statistics.median(times[v]) for v in variants}
    rows = []
    for v in variants:
        spec = vt.variant(v)
        ref = spec.reference if spec.reference in medians else "bp"
        ref_ms, ref_mem = medians[ref], mems[ref]["peak_bytes"]
        floor = 1.0 if spec.floor_key == "none" else fl[spec.floor_key]
        heb_ms = (
            0.0
            if not spec.kernels
            else kern["hebbian_kernel_ms"]
            if spec.kernels == "full"
            else kern[spec.kernels]["hebbian_kernel_ms"]
        )
        kfloor = (ref_ms + heb_ms) / ref_ms
        med, peak = medians[v], mems[v]["peak_bytes"]
        paired = paired_ratios(times[v], times[ref])
        q1, qm, q3 = quartiles(paired)
        ci_lo, ci_hi, ci_cover = median_ci(paired)
        rows.append(
            {
                "model": name,
                "variant": v,
                "reference": ref,
                "median_ms": med,
                "times_ms": times[v],
                "ratio_to_bp": med / ref_ms,
                "floor": floor,
                "ratio_to_floor": med / ref_ms / floor,
                "paired_ratio_quartiles": [q1, qm, q3],
                "ratio_to_floor_iqr": [q1 / floor, q3 / floor],
                "paired_ratio_median_ci": [ci_lo, ci_hi],
                "median_ci_coverage": ci_cover,
                "ratio_to_floor_ci": [ci_lo / floor, ci_hi / floor],
                "kernel_floor": kfloor,
                "ratio_to_kernel_floor": med / ref_ms / kfloor,
                "hebbian_kernel_ms": heb_ms,
                "peak_mb": None if peak is None else peak / 2**20,
                "mem_ratio": mem_ratio(peak, ref_mem),
                "peak_reset": mems[v]["peak_reset"],
                "measure_s": measure_s[v],
                "policy": dict(spec.policy),
                "bp_macs": fl["bp_macs"],
                "hebbian_macs": fl["hebbian_macs"],
            }
        )
    return rows, kern


def bench_resnet50(args: argparse.Namespace) -> dict:
    """ResNet-50, 224x224: ghlc vs backprop peak memory and time, and the patch sizes the
    unfold-based (paper's) implementation would materialise. The naive variant is not run."""
    b, size = args.resnet50_batch, 224
    torch.manual_seed(0)
    base, _ = build("resnet50")
    x2 = torch.randn(2, 3, size, size)
    patches = patch_bytes(base, x2)
    fl = floor_stats(base, 1.0, x2)  # MACs are linear in the batch: the ratio is not
    scale = b / 2  # traced at batch 2; patch sizes are linear in the batch
    patches = {
        "sum_bytes": patches["sum_bytes"] * scale,
        "max_bytes": patches["max_bytes"] * scale,
        "max_layer": patches["max_layer"],
    }
    out = {
        "batch": b,
        "size": size,
        "patches": patches,
        "floor": fl["floor"],
        "floor_sampled": fl["floor_sampled"],
    }
    names = ("bp", "ghlc", "ghlc_ref") if args.device == "cuda" else ("bp", "ghlc")
    for v in names:
        if args.device == "cuda":
            mem = memory_inproc("resnet50", v, b, size, "cuda")
            gc.collect()
            torch.cuda.empty_cache()
        else:
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--device",
                "cpu",
                "--batch",
                str(b),
                "--probe",
                f"resnet50:{v}",
            ]
            if models.CHANNELS_LAST:
                cmd.append("--channels-last")
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"resnet50 probe failed:\n{res.stderr[-2000:]}")
            mem = json.loads(res.stdout.strip().splitlines()[-1])
        out[f"{v}_peak_bytes"] = mem["peak_bytes"]
    x, y = data(b, size, 1000, args.device)
    base = base.to(args.device)
    runners = {v: Runner(base, 1.0, v, x[:2]) for v in names}
    if args.device == "cuda":  # the whole step in one CUDA graph (dropped if capture fails)
        for v in ("bp_graph", "ghlc_graph"):
            try:
                runners[v] = make_runner(base, 1.0, v, x, y)
            except Exception as e:
                warn_dropped("resnet50", v, e)
                del e
                cuda_cleanup()
    times: dict[str, list[float]] = {v: [] for v in runners}
    n = max(1, min(args.repeats, 10))
    for rep in range(1 + n):
        for v in run_order(list(runners), rep):
            ms = timed_step(runners[v], x, y, args.device)
            if rep >= 1:
                times[v].append(ms)
    for v in runners:
        out[f"{v}_ms"] = statistics.median(times[v])
    for v in ("ghlc", "ghlc_graph"):
        ref = reference(v)
        if v in times and ref in times:
            out[f"{v}_ratio_to_bp"] = out[f"{v}_ms"] / out[f"{ref}_ms"]
            out[f"{v}_ratio_to_floor"] = out[f"{v}_ratio_to_bp"] / fl["floor"]
    del runners
    gc.collect()
    return out


def bench_prepare(n_layers: int = 200, device: str = "cpu") -> dict:
    """Wall time of ghlc.prepare on a plain stack of n 3x3 convs (8 channels, 8x8 input).

    Runs with one torch thread: the tiny convs of the tracing run are then not at the mercy of
    OpenMP barriers, which on a loaded machine cost ~20 ms per op and turn 0.1 s into 5 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench_prepare(n_layers, device)
    finally:
        torch.set_num_threads(threads)


def _bench_prepare(n_layers: int, device: str) -> dict:
    layers: list[nn.Module] = []
    for _ in range(n_layers):
        layers += [nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU()]
    model = nn.Sequential(*layers).to(device)
    x = torch.randn(2, 8, 8, 8, device=device)
    t_trace, t_prep = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        ghlc.trace(model, (x,))
        t_trace.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        m = ghlc.prepare(model, (x,), ghlc.GHLConfig())
        t_prep.append(time.perf_counter() - t0)
    return {
        "layers": n_layers,
        "prepare_s": min(t_prep),
        "trace_s": min(t_trace),
        "plastic_layers": sum(1 for n, _ in m.named_parameters() if n.endswith("weight")),
    }


# ---------------------------------------------------------------------------- output
def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    head = (
        "model",
        "variant",
        "median ms",
        "ratio to bp",
        "floor",
        "ratio/floor",
        "ratio/floor IQR",
        "ratio/floor 95% CI",
        "kernel floor",
        "ratio/kfloor",
        "peak MB",
        "mem ratio",
        "measure s",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        own = r["variant"] != r["reference"]
        lo, hi = r["ratio_to_floor_iqr"]
        iqr = f"{lo:.3f}–{hi:.3f}" if own else "–"
        lo, hi = r["ratio_to_floor_ci"]
        ci = f"{lo:.3f}–{hi:.3f}" if own else "–"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['median_ms']:.1f} | {r['ratio_to_bp']:.3f} | "
            f"{r['floor']:.3f} | {r['ratio_to_floor']:.3f} | {iqr} | {ci} | "
            f"{r['kernel_floor']:.3f} | "
            f"{r['ratio_to_kernel_floor']:.3f} | {_num(r['peak_mb'], '.1f')} | "
            f"{_num(r['mem_ratio'], '.3f')} | {_num(r.get('measure_s'), '.2f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated: "
        + ", ".join(MODELS)
        + " (default), "
        + ", ".join(EXTRA_MODELS)
        + " (on request)",
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="output file (default bench/step_<device>.json)")
    p.add_argument(
        "--resnet50",
        action="store_true",
        help="also ResNet-50 at 224x224: ghlc peak memory vs unfolded patch size",
    )
    p.add_argument("--resnet50-batch", type=int, default=64)
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="time only: skip the peak-memory probes (one fresh process per "
        "model and variant; most of a short run's time)",
    )
    p.add_argument(
        "--no-prepare-bench",
        action="store_true",
        help="skip timing ghlc.prepare on a 200-layer model",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated variants to run instead of the device's default set "
        "(bp is always run; the reference of the autocast rows, bp_amp, is "
        "added when needed); --list-variants names them all",
    )
    p.add_argument(
        "--list-variants",
        action="store_true",
        help="print the table of variants (settings, policy overrides) and exit",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="every variant's model and input in channels-last memory format "
        "(ratios to bp in that format too)",
    )
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: MODEL:VARIANT
    args = p.parse_args(argv)
    if args.list_variants:
        print(vt.listing())
        return 0
    models.CHANNELS_LAST = args.channels_last

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.probe:
        name, variant = args.probe.split(":")
        size = 224 if name == "resnet50" else 32
        print(json.dumps(memory_inproc(name, variant, args.batch, size, args.device)))
        return 0
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in names:
        if m not in MODELS + EXTRA_MODELS:
            print(
                f"error: unknown model {m!r} (choose from {', '.join(MODELS + EXTRA_MODELS)})",
                file=sys.stderr,
            )
            return 2
    if args.variants:
        asked = [v.strip() for v in args.variants.split(",") if v.strip()]
        for v in asked:
            if v not in vt.VARIANTS:
                print(
                    f"error: unknown variant {v!r} (choose from {', '.join(vt.VARIANTS)})",
                    file=sys.stderr,
                )
                return 2
            if vt.variant(v).cuda_only and args.device != "cuda":
                print(f"error: variant {v!r} needs --device cuda", file=sys.stderr)
                return 2
        # bp first, then the autocast rows' reference (bp_amp or bp_amp_graph), then the rest;
        # other rows whose reference is not run take their ratios to bp
        refs = [reference(v) for v in asked if vt.variant(v).amp]
        args.variants = tuple(dict.fromkeys(["bp", *refs, *asked]))
        if any(vt.variant(v).amp and not vt.variant(v).graph for v in args.variants) and (
            why := slow_bf16(torch.device(args.device))
        ):
            print(f"warning: {why} (the *_amp rows measure those kernels)", file=sys.stderr)
    if args.repeats < 1 or args.batch < 2:
        print("error: --repeats must be >= 1 and --batch >= 2", file=sys.stderr)
        return 2
    if args.no_memory and args.resnet50:
        print("error: --resnet50 reports peak memory: drop --no-memory", file=sys.stderr)
        return 2

    rows: list[dict] = []
    kernels: dict[str, dict] = {}
    result = {
        "machine": machine(args.device),
        "device": args.device,
        "batch": args.batch,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "sample_fraction": SAMPLE_FRACTION,
        "machine_info": machine_info(args.device),
        "memory_format": "channels_last" if models.CHANNELS_LAST else "contiguous",
        "timing_method": TIMING_METHOD[args.device],
        "memory_method": (
            "not measured (--no-memory)" if args.no_memory else MEMORY_METHOD[args.device]
        ),
        "command": "python bench/step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
        "kernels": kernels,
    }
    out = Path(args.json) if args.json else HERE / f"step_{args.device}.json"

    def save() -> None:  # after every model, so that a run cut short keeps what it measured
        result["compiled_kernels"] = {
            "mode": fused.mode(),
            "active": fused.active(torch.zeros(1, device=args.device)),
            "failed": STATUS.compile_broken,
        }
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)

    for m in names:
        model_rows, kernels[m] = bench_model(m, args)
        rows += model_rows
        save()
    if not args.no_prepare_bench:
        result["prepare"] = bench_prepare(200, args.device)
    if args.resnet50:
        result["resnet50"] = bench_resnet50(args)
    save()

    print(f"machine: {result['machine']}")
    if models.CHANNELS_LAST:
        print("memory format: channels-last (models and inputs)")
    ck = result["compiled_kernels"]
    print(
        f"compiled kernels (GHLC_FUSED={ck['mode']}): "
        + ("active" if ck["active"] else "not used")
        + (f"; failed: {ck['failed']}" if ck["failed"] else "")
    )
    print(f"timing: {result['timing_method']}")
    print(f"memory: {result['memory_method']}")
    if "prepare" in result:
        pr = result["prepare"]
        print(
            f"ghlc.prepare on a {pr['layers']}-conv stack: {pr['prepare_s']:.2f} s "
            f"(trace alone {pr['trace_s']:.2f} s)"
        )
    if "resnet50" in result:
        r = result["resnet50"]
        pt = r["patches"]
        print(
            f"ResNet-50 {r['size']}x{r['size']} batch {r['batch']}: peak bp "
            f"{r['bp_peak_bytes'] / 2**20:.0f} MB, ghlc {r['ghlc_peak_bytes'] / 2**20:.0f} MB; "
            f"unfolded patches (paper's way) sum {pt['sum_bytes'] / 2**20:.0f} MB, "
            f"max {pt['max_bytes'] / 2**20:.0f} MB ({pt['max_layer']}); step bp "
            f"{r['bp_ms']:.1f} ms, ghlc {r['ghlc_ms']:.1f} ms"
            + (f", ghlc_ref {r['ghlc_ref_ms']:.1f} ms" if "ghlc_ref_ms" in r else "")
            + f"; floor {r['floor']:.3f}, ghlc ratio/floor {r['ghlc_ratio_to_floor']:.3f}"
            + (
                f"; CUDA graph: bp {r['bp_graph_ms']:.1f} ms, ghlc {r['ghlc_graph_ms']:.1f} "
                f"ms, ratio/floor {r['ghlc_graph_ratio_to_floor']:.3f}"
                if "ghlc_graph_ratio_to_floor" in r
                else ""
            )
        )
    for m, kern in kernels.items():
        note = f"; left out: {'; '.join(kern['skipped'])}" if kern["skipped"] else ""
        print(
            f"{m}: weight-gradient kernels of {len(kern['layers'])} plastic layers "
            f"{kern['hebbian_kernel_ms']:.2f} ms per step"
            + (
                f" ({kern['sampled']['hebbian_kernel_ms']:.2f} ms on the sampled block)"
                if "sampled" in kern
                else ""
            )
            + (
                f" ({kern['positions']['hebbian_kernel_ms']:.2f} ms on the sampled grid)"
                if "positions" in kern
                else ""
            )
            + note
        )
    print(f"wrote {out}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
