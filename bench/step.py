"""One SGD training step: plain backprop vs naive GHL vs ghlc GHL (exact and sampled).

For each model (random 3x32x32 inputs, random labels, batch 64 by default) this measures, in
one process and interleaved across the variants (a seeded shuffle of their order on every
repeat), the median time of one full step (zero_grad, forward, cross-entropy, backward,
[Hebbian], SGD step) of:

    bp         the model as is, plain backprop
    naive      GHL written the way the paper's demo does (bench/naive_ghl.py: forward hooks,
               F.unfold patches + matmul after backward)
    ghlc       ghlc.prepare(model, ..., GHLConfig(temperature=...))
    ghlc_s25   ghlc with GHLConfig(sample_fraction=0.25) (fast approximate mode)
    ghlc_p25   (only with --variants) ghlc with GHLConfig(sample_fraction=0.25,
               sample_over="positions"): the sampled mode over a grid of output positions
               of every sample (every 2nd row and column) instead of a block of the batch
    ghlc_fused (only with --variants) ghlc with GHLC_FUSED=on: the compiled kernels in every
               step, on CPU too (Inductor's C++ backend; the first steps compile)
    ghlc_wgrad, ghlc_s25_wgrad (only with --variants) ghlc and ghlc_s25 with every Hebbian
               correlation as the weight-gradient call (the forward-conv form that ghlc uses on
               CPU for small outputs off: hebbian.FORWARD_WGRAD_DEVICES emptied), to show what
               that form gives in one process
    ghlc_wdot, ghlc_s25_wdot (only with --variants) ghlc and ghlc_s25 with Oja's per-unit
               sum always over the weight (<W_k, corr_k> + b_k sum y_k), never over y * u
               (hebbian.ACTIVITY_SUM_DEVICES emptied: ghlc's way before activity_sums)
    ghlc_fast, ghlc_s25_fast (only with --variants) ghlc and ghlc_s25 with
               GHLConfig(hebbian_at="fast"): no conv recomputes part of its H in the backward
               pass (the split timing that "auto" takes on CPU, for a lower peak)
    ghlc_recompute (only with --variants) ghlc with GHLConfig(hebbian_at="recompute"): the
               split timing on every device
    ghlc_nosoftmax (only with --variants) ghlc with GHLConfig(competition="none"): the same
               step without the channel softmax, to show its share of the step (a different
               rule: not GHL, a diagnostic)
    bp_compile, ghlc_compile (only with --variants) bp and ghlc under torch.compile (Inductor;
               the first steps compile): each plastic call is a graph break and runs eagerly,
               the rest of the step is compiled. ghlc_compile's ratios are to bp_compile
    bp_amp, ghlc_amp, ghlc_amp_low (only with --variants) the forward and loss under
               torch.autocast in bfloat16 (backprop runs its convs in bfloat16): ghlc_amp with
               the default GHLConfig(hebbian_precision="full"), H from the operands upcast to
               float32; ghlc_amp_low with hebbian_precision="autocast", the correlation in
               bfloat16. Their ratios are to bp_amp; ghlc_amp's kernel floor uses the float32
               weight-gradient kernels, ghlc_amp_low's the bfloat16 ones

and, with --device cuda only,

    ghlc_ref    ghlc with its fused kernels off (GHLC_FUSED=off: the eager formulas for the
                channel softmax, Oja's decay and the sign combination), to show what they give
    bp_graph    bp with the whole step (forward, loss, backward, SGD step) captured in one
                CUDA graph (static input/target tensors, 3 warm-up steps on a side stream);
                a timed step copies the batch into the static tensors and replays the graph
    ghlc_graph  the same for ghlc
    ghlc_ref_graph  the same for ghlc_ref
    ghlc_chunk_graph  ghlc_graph with the in-call combine that ghlc uses on CPU only (large
                single-use weights: dL/dW in blocks of output units, each combined at
                once), to show why it is off on CUDA
    ghlc_s25_graph  ghlc_s25 captured the same way (the sampled block of the batch is drawn
                at capture and fixed across replays, see ghlc.cuda_graph_step)
    ghlc_p25_graph  ghlc_p25 captured the same way (its grid offsets are drawn at capture)
    ghlc_stack_graph  ghlc_graph captured with stack_weight_grads=True (plain convs compute
                backprop's weight gradient and the Hebbian correlation in one call)
    ghlc_stack20_graph  the same, stacking only weights under 2**20 elements
                (runtime/state.py STACK_MAX_NUMEL)
    bp_amp_graph, ghlc_amp_graph, ghlc_amp_low_graph  (only with --variants) the autocast
                variants above captured the same way (ratios to bp_amp_graph)

(a variant whose capture raises is dropped with a one-line warning), and the peak memory of
one step. The *_graph rows' ratios (to bp, to the floors) are taken to bp_graph, the other
rows' to bp.

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

    python bench/step.py --device cpu --repeats 25
    python bench/step.py --device cuda --repeats 20 --resnet50
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from naive_ghl import NaiveGHL  # noqa: E402

import ghlc  # noqa: E402
from ghlc.runtime import fused, hebbian  # noqa: E402
from ghlc.runtime import state as rt_state  # noqa: E402
from ghlc.train import _cpu_native_bf16, slow_bf16  # noqa: E402

VARIANTS = ("bp", "naive", "ghlc", "ghlc_s25")
AMP_VARIANTS = ("bp_amp", "ghlc_amp", "ghlc_amp_low")  # forward under autocast (AMP_DTYPE)
AMP_GRAPH_VARIANTS = tuple(v + "_graph" for v in AMP_VARIANTS)
GRAPH_VARIANTS = ("bp_graph", "ghlc_graph", "ghlc_ref_graph", "ghlc_chunk_graph",
                  "ghlc_s25_graph", "ghlc_p25_graph", "ghlc_stack_graph",
                  "ghlc_stack20_graph", *AMP_GRAPH_VARIANTS)
CUDA_VARIANTS = ("ghlc_ref", *(v for v in GRAPH_VARIANTS if v not in AMP_GRAPH_VARIANTS))
CUDA_ONLY = (*CUDA_VARIANTS, *AMP_GRAPH_VARIANTS)  # --device cuda only
COMPILE_VARIANTS = ("bp_compile", "ghlc_compile")
WGRAD_VARIANTS = ("ghlc_wgrad", "ghlc_s25_wgrad")  # the forward-conv form off
FAST_VARIANTS = ("ghlc_fast", "ghlc_s25_fast")  # hebbian_at="fast": no split timing
WDOT_VARIANTS = ("ghlc_wdot", "ghlc_s25_wdot")  # Oja's per-unit sum over the weight only
EXTRA_VARIANTS = ("ghlc_fused", "ghlc_nosoftmax", "ghlc_recompute", "ghlc_p25", *WGRAD_VARIANTS,
                  *FAST_VARIANTS, *WDOT_VARIANTS,
                  *COMPILE_VARIANTS, *AMP_VARIANTS, *AMP_GRAPH_VARIANTS)  # on request (--variants)
AMP_DTYPE = torch.bfloat16
SAMPLED = {"ghlc_s25": "batch", "ghlc_p25": "positions"}  # sampled variant -> sample_over
KERNEL_KEY = {"batch": "sampled", "positions": "positions"}  # sample_over -> kernels[model][key]
AMP_KERNELS = "amp_low"  # kernels[model][key]: the full kernels in AMP_DTYPE
GRAPH_WARMUP = 3
CUDA_KERNEL_CALLS = 10  # kernel-floor sample on CUDA: mean of this many back-to-back calls
SAMPLE_FRACTION = 0.25
CHANNELS_LAST = False  # --channels-last: every model and input in channels-last memory format
LR = 1e-3
MODELS = ("deephebb", "fasthebb", "resnet18")
EXTRA_MODELS = ("mobilenetv2",)  # on request (--models): depthwise convs, not in the targets

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
TIMING_METHOD = {
    "cpu": "time.perf_counter around one full step; median over repeats; the kernel floor's "
           "weight-gradient kernels timed the same way, one round per repeat in the shuffled order",
    "cuda": "CUDA events around one full step (synchronised); median over repeats; the kernel "
            "floor's weight-gradient kernels timed the same way (each sample the mean of "
            f"{CUDA_KERNEL_CALLS} back-to-back calls), one round per repeat in the shuffled order",
}


# ---------------------------------------------------------------------------- models
def _example(name: str):
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(name: str) -> tuple[nn.Module, float | dict]:
    """(fresh model, temperature setting) for a model name (channels-last with
    ``--channels-last``)."""
    m, temp = _build(name)
    return (m.to(memory_format=torch.channels_last) if CHANNELS_LAST else m), temp


def _build(name: str) -> tuple[nn.Module, float | dict]:
    if name == "deephebb":
        m = _example("deephebb")
        return m.deephebb(), dict(m.TEMPERATURES)
    if name == "fasthebb":
        m = _example("fasthebb")
        return m.fasthebb(), dict(m.TEMPERATURES)
    if name == "resnet18":
        return _example("resnet").resnet18(), 1.0
    if name == "mobilenetv2":
        return _example("mobilenet").mobilenetv2(), 1.0
    if name == "resnet50":
        return resnet50(), 1.0
    raise SystemExit(f"error: unknown model {name!r} "
                     f"(choose from {', '.join(MODELS + EXTRA_MODELS)})")


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50 (torchvision layout: stride on the 3x3 conv) for 224x224 inputs."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    c_in = 64
    for i, n in enumerate((3, 4, 6, 3)):
        width = 64 * 2**i
        for j in range(n):
            layers.append(Bottleneck(c_in, width, 2 if (j == 0 and i > 0) else 1))
            c_in = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------- variants
def without_settings(variant: str) -> str:
    """The variant a settings variant (``*_wgrad``, ``*_fast``, ``*_wdot``) changes a
    setting of."""
    return variant.removesuffix("_wgrad").removesuffix("_fast").removesuffix("_wdot")


class Runner:
    """One variant of one model, ready to take SGD steps."""

    def __init__(self, base: nn.Module, temp, variant: str, x2: torch.Tensor) -> None:
        model = copy.deepcopy(base).train()
        compiled = variant in COMPILE_VARIANTS
        self.amp = variant in AMP_VARIANTS
        precision = "autocast" if variant == "ghlc_amp_low" else "full"
        self.forward_wgrad = variant not in WGRAD_VARIANTS
        self.activity_sums = variant not in WDOT_VARIANTS
        at = ("fast" if variant in FAST_VARIANTS
              else "recompute" if variant == "ghlc_recompute" else "auto")
        variant = variant.removesuffix("_compile").removesuffix("_amp_low").removesuffix("_amp")
        variant = without_settings(variant)
        self.naive = None
        self.fused = {"ghlc_ref": "off", "ghlc_fused": "on"}.get(variant, fused.mode())
        self.chunk = variant == "ghlc_chunk"
        self.stack = variant in ("ghlc_stack", "ghlc_stack20")
        self.stack_max = 1 << 20 if variant == "ghlc_stack20" else None
        self.capturing = False
        if variant == "naive":
            self.naive = NaiveGHL(model, temp)
        elif variant in ("ghlc", "ghlc_ref", "ghlc_chunk", "ghlc_fused", "ghlc_recompute",
                         "ghlc_stack", "ghlc_stack20"):
            model = ghlc.prepare(model, (x2,), ghlc.GHLConfig(
                temperature=temp, hebbian_precision=precision, hebbian_at=at))
        elif variant in (*SAMPLED, "ghlc_nosoftmax"):
            extra = ({"sample_fraction": SAMPLE_FRACTION, "sample_over": SAMPLED[variant]}
                     if variant in SAMPLED else {"competition": "none"})
            model = ghlc.prepare(model, (x2,), ghlc.GHLConfig(temperature=temp, hebbian_at=at,
                                                              **extra))
        elif variant != "bp":
            raise ValueError(variant)
        self.model = torch.compile(model.train()) if compiled else model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The forward and the loss (under autocast for the *_amp* variants)."""
        with torch.autocast(x.device.type, dtype=AMP_DTYPE, enabled=self.amp):
            return F.cross_entropy(self.model(x), y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with settings(self):
            self.opt.zero_grad()
            loss = self.loss(x, y)
            loss.backward()
            if self.naive is not None:
                self.naive.apply()
            self.opt.step()


@contextlib.contextmanager
def settings(r):
    """A runner's ghlc settings for the duration (variants run interleaved): the
    compiled-kernel mode (a graph's warm-up and capture in fused.capturing(), as
    ghlc.cuda_graph_step, with stack_weight_grads for ghlc_stack and its size limit for
    ghlc_stack20), the in-call combine on CUDA for ghlc_chunk, no forward-conv form of the
    Hebbian correlation for the *_wgrad variants and Oja's sum over the weight only for the
    *_wdot ones."""
    old = (fused.mode(), rt_state.FUSE_DEVICES, rt_state.STACK_MAX_NUMEL,
           hebbian.FORWARD_WGRAD_DEVICES, hebbian.ACTIVITY_SUM_DEVICES)
    fused.set_mode(r.fused)
    if not r.forward_wgrad:
        hebbian.FORWARD_WGRAD_DEVICES = set()
    if not r.activity_sums:
        hebbian.ACTIVITY_SUM_DEVICES = set()
    if r.chunk:
        rt_state.FUSE_DEVICES = {"cpu", "cuda"}
    rt_state.STACK_MAX_NUMEL = r.stack_max
    try:
        with fused.capturing(r.stack) if r.capturing else contextlib.nullcontext():
            yield
    finally:
        fused.set_mode(old[0])
        rt_state.FUSE_DEVICES, rt_state.STACK_MAX_NUMEL = old[1], old[2]
        hebbian.FORWARD_WGRAD_DEVICES, hebbian.ACTIVITY_SUM_DEVICES = old[3], old[4]


class GraphRunner:
    """A bp or ghlc Runner whose whole step is captured in one CUDA graph (CUDA only).

    __init__ takes the warm-up steps on a side stream; capture() records the graph (separate,
    so that the memory probe can reset the peak between the two); step() copies the batch
    into the static tensors and replays."""

    def __init__(self, base: nn.Module, temp, variant: str, x: torch.Tensor,
                 y: torch.Tensor) -> None:
        eager = variant.removesuffix("_graph")
        if variant not in GRAPH_VARIANTS:
            raise ValueError(variant)
        r = Runner(base, temp, eager, x[:2])
        self.model, self.opt, self.fused, self.chunk = r.model, r.opt, r.fused, r.chunk
        self.forward_wgrad, self.activity_sums = r.forward_wgrad, r.activity_sums
        self.loss_fn = r.loss
        self.stack, self.stack_max = r.stack, r.stack_max
        self.capturing = True
        self.static_x, self.static_y = x.clone(), y.clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), settings(self):
            for _ in range(GRAPH_WARMUP):
                self.opt.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.static_x, self.static_y)
                loss.backward()
                self.opt.step()
        torch.cuda.current_stream().wait_stream(s)

    def capture(self) -> None:
        self.opt.zero_grad(set_to_none=True)  # grads are allocated in the graph's pool
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g), settings(self):
            self.loss = self.loss_fn(self.static_x, self.static_y)
            self.loss.backward()
            self.opt.step()
        self.graph = g

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()


def make_runner(base: nn.Module, temp, variant: str, x: torch.Tensor, y: torch.Tensor):
    """A ready Runner, or for a *_graph variant a warmed-up and captured GraphRunner."""
    if variant in GRAPH_VARIANTS:
        r = GraphRunner(base, temp, variant, x, y)
        r.capture()
        return r
    return Runner(base, temp, variant, x[:2])


def variants_for(device: str) -> tuple[str, ...]:
    return VARIANTS + CUDA_VARIANTS if device == "cuda" else VARIANTS


def layer_bench_args(p: argparse.ArgumentParser, model: str, device: str,
                     repeats: int) -> None:
    """--model, --device, --batch and --repeats of the per-layer kernel benches
    (wgrad_stack.py, wgrad_blocks.py, rule_ops.py), with these defaults."""
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


def time_layers(layers: list[dict], device: str, repeats: int) -> dict:
    """{(layer index, variant): [ms]} for every layer's ``fns``: one warm-up round (kernel
    selection), then ``repeats`` rounds, each running every layer's variants in a shuffled
    order (:func:`run_order`)."""
    times: dict = {(i, v): [] for i, lay in enumerate(layers) for v in lay["fns"]}
    for rep in range(1 + repeats):
        for i, lay in enumerate(layers):
            for v in run_order(list(lay["fns"]), rep):
                ms = time_call(lay["fns"][v], device)
                if rep:
                    times[i, v].append(ms)
    return times


def run_order(items: list[str], rep: int) -> list[str]:
    """The order of one repeat: shuffled with the repeat's seed, so that no variant is always
    first or always right after the same other one (a rotation keeps the cyclic order, and a
    variant that always follows, say, the allocation-heavy naive one is timed in a different
    state from the rest)."""
    random.Random(rep).shuffle(items)
    return items


def reference(variant: str) -> str:
    """The variant whose median step the ratios of ``variant`` are taken to."""
    if variant in COMPILE_VARIANTS:
        return "bp_compile"
    base = "bp_amp" if "_amp" in variant else "bp"
    return base + "_graph" if variant in GRAPH_VARIANTS else base


def warn_dropped(model_name: str, variant: str, err: BaseException) -> None:
    msg = str(err).strip().splitlines()
    first = msg[0] if msg else ""
    print(f"warning: {model_name}/{variant}: CUDA graph capture failed, variant dropped "
          f"({type(err).__name__}: {first})", file=sys.stderr)


def _cuda_cleanup() -> None:
    gc.collect()
    try:
        torch.cuda.synchronize()
    except RuntimeError:
        pass
    torch.cuda.empty_cache()


def data(batch: int, size: int, classes: int, device: str):
    g = torch.Generator().manual_seed(1)
    x = layout(torch.randn(batch, 3, size, size, generator=g))
    y = torch.randint(0, classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the run's memory format: channels-last for 4-D tensors with
    ``--channels-last``, else as it is."""
    return t.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST and t.dim() == 4 else t


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(r: Runner, x, y, device: str) -> float:
    """Milliseconds of one step."""
    if device == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        r.step(x, y)
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    r.step(x, y)
    return (time.perf_counter() - t0) * 1e3


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
    if variant in GRAPH_VARIANTS:  # CUDA only: peak over capture + one replay
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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu",
           "--batch", str(args.batch), "--probe", f"{model_name}:{variant}"]
    if CHANNELS_LAST:
        cmd.append("--channels-last")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe {model_name}/{variant} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- floor
def layer_macs(info) -> int:
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


def floor_stats(base: nn.Module, temp, x: torch.Tensor) -> dict:
    """Backprop MACs (forward + input-grad + weight-grad; none of the first layer's input-grad),
    Hebbian MACs (one weight-gradient-sized product per plastic layer) and the floor ratio."""
    cfg = ghlc.GHLConfig(temperature=temp)
    lg = ghlc.trace(copy.deepcopy(base), (x,), config=cfg)
    lg = ghlc.passes.PassManager(ghlc.passes.default_passes())(lg)
    layers = lg.layers()
    first = min(i.order for i in layers)
    bp = hebb = 0
    per_layer = []
    for info in layers:
        f = layer_macs(info) * max(1, info.calls)
        bp += f * (2 if info.order == first else 3)
        plastic = str(info.role) == "plastic"
        hebb += f if plastic else 0
        per_layer.append({"layer": info.name, "kind": info.kind, "fwd_macs": f,
                          "plastic": plastic})
    return {
        "bp_macs": bp, "hebbian_macs": hebb, "floor": (bp + hebb) / bp,
        "floor_sampled": (bp + SAMPLE_FRACTION * hebb) / bp, "layers": per_layer,
    }


def _conv_out(n: int, k: int, stride: int, pad: int, dil: int, out_pad: int,
              transposed: bool) -> int:
    if transposed:
        return (n - 1) * stride - 2 * pad + dil * (k - 1) + out_pad + 1
    return (n + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _conv_args(mod: nn.Module, info) -> tuple[tuple, str]:
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
            _conv_out(info.in_shape[2 + i], k[i], stride[i], pad[i], dil[i], out_pad[i],
                      transposed)
            for i in range(nd)
        )
        if want == tuple(info.out_shape[2:]):
            return (list(stride), list(pad), list(dil), transposed, list(out_pad),
                    int(mod.groups)), ""
    return (), (f"padding={mod.padding!r} (padding_mode={mod.padding_mode!r}) does not give "
                f"the recorded output {info.out_shape} from {info.in_shape}")


def plastic_layers(base: nn.Module, temp, x: torch.Tensor) -> tuple[list[tuple], list[str]]:
    """([(info, conv)], skipped) for the plastic layers of ``base`` traced at ``x``: ``conv``
    = the call's convolution arguments (``()`` for linear layers); a conv whose arguments
    cannot be had from its module is left out with a note in ``skipped``."""
    cfg = ghlc.GHLConfig(temperature=temp)
    lg = ghlc.trace(copy.deepcopy(base), (x,), config=cfg)
    lg = ghlc.passes.PassManager(ghlc.passes.default_passes())(lg)
    layers, skipped = [], []
    for info in lg.layers():
        if str(info.role) != "plastic":
            continue
        conv: tuple = ()
        if info.kind != "linear":
            conv, why = _conv_args(base.get_submodule(info.module), info)
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


def conv_weight_grad(cot: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                     conv: tuple) -> torch.Tensor:
    """The weight gradient alone of a conv call (``conv``: its arguments after the bias)."""
    return torch.ops.aten.convolution_backward(cot, x, w, None, *conv, [False, True, False])[1]


def kernel_probes(base: nn.Module, temp, x: torch.Tensor, device: str, frac: float = 1.0,
                  over: str = "batch", dtype: torch.dtype | None = None
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
        probes.append({"layer": info.name, "kind": info.kind, "calls": max(1, info.calls),
                       "fn": fn})
    sync(device)
    return probes, skipped


def grid_probe(info, conv: tuple, frac: float, mk: dict) -> tuple:
    """(narrowed input, cotangent, conv arguments) of the strided weight-gradient call that
    ``sample_over="positions"`` makes for a conv layer (offsets 0)."""
    from ghlc.runtime.calls import CallSpec
    from ghlc.runtime.hebbian import grid_call, grid_pad, sample_grid

    stride, padding, dilation, transposed, out_pad, groups = conv
    nd = len(stride)
    spec = CallSpec("conv", nd, False, tuple(stride), tuple(padding), tuple(dilation), (),
                    groups)
    xi = layout(torch.randn(info.in_shape, **mk))
    u = layout(torch.randn(info.out_shape, **mk))
    grid = sample_grid(spec, xi.shape, info.weight_shape, u.shape, frac, (0,) * nd)
    sp, sx, su = grid_call(spec, xi, u, grid)
    cot = grid_pad(su.contiguous(), grid)
    return sx, cot, (sp.stride, sp.padding, dilation, transposed, out_pad, groups)


def sampled_rows(t: torch.Tensor, frac: float) -> torch.Tensor:
    """The first max(1, round(frac * n)) of t's n rows (all of them for frac 1), in t's
    memory format."""
    k = max(1, int(round(frac * t.shape[0])))
    return t[:k].clone() if k < t.shape[0] else t


def time_call(fn, device: str) -> float:
    """Milliseconds of one call of fn. On CUDA the mean of CUDA_KERNEL_CALLS back-to-back
    calls between two events: one call alone on an idle stream is timed as its launch."""
    with torch.no_grad():
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            for _ in range(CUDA_KERNEL_CALLS):
                fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / CUDA_KERNEL_CALLS
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def kernel_round(probes: list[dict], device: str) -> list[float]:
    """One timed call of every probe (ms, in probe order)."""
    return [time_call(p["fn"], device) for p in probes]


def kernel_summary(probes: list[dict], rounds: list[list[float]], skipped: list[str]) -> dict:
    """Per-layer median ms x calls, and their sum (hebbian_kernel_ms)."""
    layers = []
    for i, p in enumerate(probes):
        med = statistics.median(r[i] for r in rounds)
        layers.append({"layer": p["layer"], "kind": p["kind"], "calls": p["calls"],
                       "median_ms": med, "step_ms": med * p["calls"]})
    return {"hebbian_kernel_ms": sum(lay["step_ms"] for lay in layers), "layers": layers,
            "skipped": skipped}


def kernel_floor(base: nn.Module, temp, x: torch.Tensor, device: str, repeats: int) -> dict:
    """Measured weight-gradient kernel time of the plastic layers, on its own: ``repeats``
    rounds back to back. (bench_model takes the same rounds between its step repeats.)
    The kernel floor of a step is (bp_ms + hebbian_kernel_ms) / bp_ms."""
    probes, skipped = kernel_probes(base, temp, x, device)
    rounds = [kernel_round(probes, device) for _ in range(max(1, repeats))]
    return kernel_summary(probes, rounds, skipped)


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
    worst = max(sizes, key=sizes.get)
    return {"sum_bytes": sum(sizes.values()), "max_bytes": sizes[worst], "max_layer": worst,
            "per_layer_bytes": sizes}


# ---------------------------------------------------------------------------- benches
def bench_model(name: str, args) -> tuple[list[dict], dict]:
    """(table rows, kernel-floor details) of one model."""
    torch.manual_seed(0)
    base, temp = build(name)
    base = base.to(args.device)
    x, y = data(args.batch, 32, 10, args.device)
    fl = floor_stats(base, temp, x)
    variants = list(args.variants or variants_for(args.device))
    def each_variant(build) -> dict:
        """``build(v)`` for every variant; a graph variant whose capture fails is dropped."""
        out = {}
        for v in list(variants):
            try:
                out[v] = build(v)
            except Exception as e:
                if v not in GRAPH_VARIANTS:
                    raise
                warn_dropped(name, v, e)
                variants.remove(v)
                del e
                _cuda_cleanup()
        return out

    if args.no_memory:
        mems = {v: {"peak_bytes": None, "peak_reset": None} for v in variants}
    else:
        mems = each_variant(lambda v: memory(name, v, args))
    runners = each_variant(lambda v: make_runner(base, temp, v, x, y))
    probes, skipped = kernel_probes(base, temp, x, args.device)
    for note in skipped:
        print(f"  {name}: kernel floor leaves out {note}", file=sys.stderr)
    # the sampled variants' kernels: "sampled" (block of the batch), "positions" (grid)
    probes_s = {KERNEL_KEY[over]: kernel_probes(base, temp, x, args.device, SAMPLE_FRACTION,
                                           over)[0]
                for v, over in SAMPLED.items()
                if any(without_settings(u.removesuffix("_graph")) == v for u in variants)}
    if any(v.startswith("ghlc_amp_low") for v in variants):
        probes_s[AMP_KERNELS] = kernel_probes(base, temp, x, args.device, dtype=AMP_DTYPE)[0]
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
    del runners, probes, probes_s
    gc.collect()
    hk = kern["hebbian_kernel_ms"]
    medians = {v: statistics.median(times[v]) for v in variants}
    rows = []
    for v in variants:
        ref = reference(v) if reference(v) in medians else "bp"
        ref_ms, ref_mem = medians[ref], mems[ref]["peak_bytes"]
        eager = without_settings(v.removesuffix("_graph").removesuffix("_compile"))
        if eager in ("bp", "bp_amp"):
            floor, heb_ms = 1.0, 0.0
        elif eager == "ghlc_amp_low":
            floor, heb_ms = fl["floor"], kern[AMP_KERNELS]["hebbian_kernel_ms"]
        elif eager in SAMPLED:
            key = KERNEL_KEY[SAMPLED[eager]]
            floor, heb_ms = fl["floor_sampled"], kern[key]["hebbian_kernel_ms"]
        else:
            floor, heb_ms = fl["floor"], hk
        kfloor = (ref_ms + heb_ms) / ref_ms
        med, peak = medians[v], mems[v]["peak_bytes"]
        paired = [a / b for a, b in zip(times[v], times[ref])]
        q1, qm, q3 = quartiles(paired)
        ci_lo, ci_hi, ci_cover = median_ci(paired)
        rows.append({
            "model": name, "variant": v, "reference": ref, "median_ms": med,
            "times_ms": times[v], "ratio_to_bp": med / ref_ms, "floor": floor,
            "ratio_to_floor": med / ref_ms / floor,
            "paired_ratio_quartiles": [q1, qm, q3],
            "ratio_to_floor_iqr": [q1 / floor, q3 / floor],
            "paired_ratio_median_ci": [ci_lo, ci_hi], "median_ci_coverage": ci_cover,
            "ratio_to_floor_ci": [ci_lo / floor, ci_hi / floor],
            "kernel_floor": kfloor, "ratio_to_kernel_floor": med / ref_ms / kfloor,
            "hebbian_kernel_ms": heb_ms,
            "peak_mb": None if peak is None else peak / 2**20,
            "mem_ratio": mem_ratio(peak, ref_mem),
            "peak_reset": mems[v]["peak_reset"],
            "bp_macs": fl["bp_macs"], "hebbian_macs": fl["hebbian_macs"],
        })
    return rows, kern


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of xs (the lower/upper halves' medians; all three equal for one)."""
    xs = sorted(xs)
    n = len(xs)
    if n == 1:
        return xs[0], xs[0], xs[0]
    half = n // 2
    return statistics.median(xs[:half]), statistics.median(xs), statistics.median(xs[-half:])


def median_ci(xs: list[float], conf: float = 0.95) -> tuple[float, float, float]:
    """(lo, hi, coverage): the distribution-free confidence interval of the median of xs, the
    j-th smallest and j-th largest value for the largest j whose coverage
    1 - 2 P(Binomial(n, 1/2) < j) is at least ``conf`` (the full range, with its smaller
    coverage, when n is too small for ``conf``)."""
    xs = sorted(xs)
    n = len(xs)

    def cover(j: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) * 0.5**n

    j = 1
    while j + 1 <= (n + 1) // 2 and cover(j + 1) >= conf:
        j += 1
    return xs[j - 1], xs[n - j], cover(j)


def bench_resnet50(args) -> dict:
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
        "sum_bytes": patches["sum_bytes"] * scale, "max_bytes": patches["max_bytes"] * scale,
        "max_layer": patches["max_layer"],
    }
    out = {"batch": b, "size": size, "patches": patches, "floor": fl["floor"],
           "floor_sampled": fl["floor_sampled"]}
    names = ("bp", "ghlc", "ghlc_ref") if args.device == "cuda" else ("bp", "ghlc")
    for v in names:
        if args.device == "cuda":
            mem = memory_inproc("resnet50", v, b, size, "cuda")
            gc.collect()
            torch.cuda.empty_cache()
        else:
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu",
                   "--batch", str(b), "--probe", f"resnet50:{v}"]
            if CHANNELS_LAST:
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
                _cuda_cleanup()
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
    return {"layers": n_layers, "prepare_s": min(t_prep), "trace_s": min(t_trace),
            "plastic_layers": sum(1 for n, _ in m.named_parameters() if n.endswith("weight"))}


# ---------------------------------------------------------------------------- output
def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def mem_ratio(peak: int | None, ref: int | None) -> float | None:
    """Peak over the reference's peak (None: not measured, --no-memory)."""
    if peak is None or ref is None:
        return None
    return peak / ref if ref > 0 else float("nan")


def table(rows: list[dict]) -> str:
    head = ("model", "variant", "median ms", "ratio to bp", "floor", "ratio/floor",
            "ratio/floor IQR", "ratio/floor 95% CI", "kernel floor", "ratio/kfloor", "peak MB",
            "mem ratio")
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
            f"{_num(r['mem_ratio'], '.3f')} |"
        )
    return "\n".join(lines)


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu}{cpu_kernels()}), "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def cpu_kernels() -> str:
    """The CPU's vector instruction set as torch's kernels use it, and whether oneDNN has
    native bfloat16 there (machines of one name differ: an AVX2-only "AMD EPYC" ran every
    step about twice as long as an earlier one, and has no fast bfloat16)."""
    parts = []
    try:
        parts.append(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        pass
    native = _cpu_native_bf16()
    if native is not None:
        parts.append("native bfloat16" if native else "no native bfloat16")
    return "; " + ", ".join(parts) if parts else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated: " + ", ".join(MODELS) + " (default), "
                        + ", ".join(EXTRA_MODELS) + " (on request)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="output file (default bench/step_<device>.json)")
    p.add_argument("--resnet50", action="store_true",
                   help="also ResNet-50 at 224x224: ghlc peak memory vs unfolded patch size")
    p.add_argument("--resnet50-batch", type=int, default=64)
    p.add_argument("--no-memory", action="store_true",
                   help="time only: skip the peak-memory probes (one fresh process per "
                        "model and variant; most of a short run's time)")
    p.add_argument("--no-prepare-bench", action="store_true",
                   help="skip timing ghlc.prepare on a 200-layer model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--variants", default=None,
                   help="comma-separated variants to run instead of the device's default set "
                        "(bp is always run); also ghlc_fused: ghlc with GHLC_FUSED=on "
                        "(compiled kernels in every step, on CPU too), ghlc_nosoftmax: "
                        "ghlc without the channel softmax (a diagnostic), ghlc_wgrad and "
                        "ghlc_s25_wgrad: ghlc and ghlc_s25 with the forward-conv form of "
                        "the Hebbian correlation off, ghlc_wdot and ghlc_s25_wdot: Oja's sum "
                        "over the weight only, ghlc_recompute: "
                        "ghlc with hebbian_at='recompute', ghlc_fast and ghlc_s25_fast: ghlc "
                        "and ghlc_s25 with hebbian_at='fast' (no split timing), bp_compile and "
                        "ghlc_compile: both under torch.compile (ghlc_compile's ratios are "
                        "to bp_compile), bp_amp, ghlc_amp and ghlc_amp_low: the forward "
                        "under autocast in bfloat16 (ratios to bp_amp, added when needed), "
                        "and on CUDA their *_graph captures")
    p.add_argument("--channels-last", action="store_true",
                   help="every variant's model and input in channels-last memory format "
                        "(ratios to bp in that format too)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: MODEL:VARIANT
    args = p.parse_args(argv)
    global CHANNELS_LAST
    CHANNELS_LAST = args.channels_last

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
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS + EXTRA_MODELS:
            print(f"error: unknown model {m!r} "
                  f"(choose from {', '.join(MODELS + EXTRA_MODELS)})",
                  file=sys.stderr)
            return 2
    if args.variants:
        known = VARIANTS + CUDA_VARIANTS + EXTRA_VARIANTS
        asked = [v.strip() for v in args.variants.split(",")]
        for refv, group in (("bp_amp", AMP_VARIANTS), ("bp_amp_graph", AMP_GRAPH_VARIANTS)):
            if refv not in asked and any(v in group for v in asked):  # the ratios' reference
                args.variants = refv + "," + args.variants
        chosen = ["bp"] + [v.strip() for v in args.variants.split(",")
                           if v.strip() and v.strip() != "bp"]
        for v in chosen:
            if v not in known:
                print(f"error: unknown variant {v!r} (choose from {', '.join(known)})",
                      file=sys.stderr)
                return 2
            if v in CUDA_ONLY and args.device != "cuda":
                print(f"error: variant {v!r} needs --device cuda", file=sys.stderr)
                return 2
        args.variants = tuple(dict.fromkeys(chosen))
        if any(v in AMP_VARIANTS for v in args.variants) and (
                why := slow_bf16(torch.device(args.device))):
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
        "machine": machine(args.device), "device": args.device, "batch": args.batch,
        "repeats": args.repeats, "warmup": args.warmup, "sample_fraction": SAMPLE_FRACTION,
        "memory_format": "channels_last" if CHANNELS_LAST else "contiguous",
        "timing_method": TIMING_METHOD[args.device],
        "memory_method": ("not measured (--no-memory)" if args.no_memory
                          else MEMORY_METHOD[args.device]),
        "command": "python bench/step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows, "kernels": kernels,
    }
    out = Path(args.json) if args.json else HERE / f"step_{args.device}.json"

    def save() -> None:  # after every model, so that a run cut short keeps what it measured
        result["compiled_kernels"] = {
            "mode": fused.mode(), "active": fused.active(torch.zeros(1, device=args.device)),
            "failed": fused._broken,
        }
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)

    for m in models:
        model_rows, kernels[m] = bench_model(m, args)
        rows += model_rows
        save()
    if not args.no_prepare_bench:
        result["prepare"] = bench_prepare(200, args.device)
    if args.resnet50:
        result["resnet50"] = bench_resnet50(args)
    save()

    print(f"machine: {result['machine']}")
    if CHANNELS_LAST:
        print("memory format: channels-last (models and inputs)")
    ck = result["compiled_kernels"]
    print(f"compiled kernels (GHLC_FUSED={ck['mode']}): "
          + ("active" if ck["active"] else "not used") + (f"; failed: {ck['failed']}"
                                                          if ck["failed"] else ""))
    print(f"timing: {result['timing_method']}")
    print(f"memory: {result['memory_method']}")
    if "prepare" in result:
        pr = result["prepare"]
        print(f"ghlc.prepare on a {pr['layers']}-conv stack: {pr['prepare_s']:.2f} s "
              f"(trace alone {pr['trace_s']:.2f} s)")
    if "resnet50" in result:
        r = result["resnet50"]
        pt = r["patches"]
        print(f"ResNet-50 {r['size']}x{r['size']} batch {r['batch']}: peak bp "
              f"{r['bp_peak_bytes'] / 2**20:.0f} MB, ghlc {r['ghlc_peak_bytes'] / 2**20:.0f} MB; "
              f"unfolded patches (paper's way) sum {pt['sum_bytes'] / 2**20:.0f} MB, "
              f"max {pt['max_bytes'] / 2**20:.0f} MB ({pt['max_layer']}); step bp "
              f"{r['bp_ms']:.1f} ms, ghlc {r['ghlc_ms']:.1f} ms"
              + (f", ghlc_ref {r['ghlc_ref_ms']:.1f} ms" if "ghlc_ref_ms" in r else "")
              + f"; floor {r['floor']:.3f}, ghlc ratio/floor {r['ghlc_ratio_to_floor']:.3f}"
              + (f"; CUDA graph: bp {r['bp_graph_ms']:.1f} ms, ghlc {r['ghlc_graph_ms']:.1f} "
                 f"ms, ratio/floor {r['ghlc_graph_ratio_to_floor']:.3f}"
                 if "ghlc_graph_ratio_to_floor" in r else ""))
    for m, kern in kernels.items():
        note = f"; left out: {'; '.join(kern['skipped'])}" if kern["skipped"] else ""
        print(f"{m}: weight-gradient kernels of {len(kern['layers'])} plastic layers "
              f"{kern['hebbian_kernel_ms']:.2f} ms per step"
              + (f" ({kern['sampled']['hebbian_kernel_ms']:.2f} ms on the sampled block)"
                 if "sampled" in kern else "")
              + (f" ({kern['positions']['hebbian_kernel_ms']:.2f} ms on the sampled grid)"
                 if "positions" in kern else "") + note)
    print(f"wrote {out}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
