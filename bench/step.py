"""One SGD training step: plain backprop vs naive GHL vs ghlc GHL (exact and sampled).

For each model (random 3x32x32 inputs, random labels, batch 64 by default) this measures, in
one process and interleaved round-robin across the variants on every repeat, the median time
of one full step (zero_grad, forward, cross-entropy, backward, [Hebbian], SGD step) of:

    bp         the model as is, plain backprop
    naive      GHL written the way the paper's demo does (bench/naive_ghl.py: forward hooks,
               F.unfold patches + matmul after backward)
    ghlc       ghlc.prepare(model, ..., GHLConfig(temperature=...))
    ghlc_s25   ghlc with GHLConfig(sample_fraction=0.25) (fast approximate mode)

and the peak memory of one step. It also reports the arithmetic floor of GHL from the layer
shapes (backprop MACs + one weight-gradient-sized product per plastic layer, over backprop
MACs), optionally ResNet-50 at 224x224 (--resnet50: ghlc peak memory next to the size of
the unfolded patch tensors the paper's way would need), and the time of ghlc.prepare on a
200-layer model.

    python bench/step.py --device cpu --repeats 5
    python bench/step.py --device cuda --repeats 20 --resnet50
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import platform
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

VARIANTS = ("bp", "naive", "ghlc", "ghlc_s25")
SAMPLE_FRACTION = 0.25
LR = 1e-3
MODELS = ("deephebb", "fasthebb", "resnet18")

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
        "peak = max_memory_allocated - memory_allocated before the model was built"
    ),
}
TIMING_METHOD = {
    "cpu": "time.perf_counter around one full step; median over repeats",
    "cuda": "CUDA events around one full step (synchronised); median over repeats",
}


# ---------------------------------------------------------------------------- models
def _example(name: str):
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(name: str) -> tuple[nn.Module, float | dict]:
    """(fresh model, temperature setting) for a model name."""
    if name == "deephebb":
        m = _example("deephebb")
        return m.deephebb(), dict(m.TEMPERATURES)
    if name == "fasthebb":
        m = _example("fasthebb")
        return m.fasthebb(), dict(m.TEMPERATURES)
    if name == "resnet18":
        return _example("resnet").resnet18(), 1.0
    if name == "resnet50":
        return resnet50(), 1.0
    raise SystemExit(f"error: unknown model {name!r} (choose from {', '.join(MODELS)})")


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
class Runner:
    """One variant of one model, ready to take SGD steps."""

    def __init__(self, base: nn.Module, temp, variant: str, x2: torch.Tensor) -> None:
        model = copy.deepcopy(base).train()
        self.naive = None
        if variant == "naive":
            self.naive = NaiveGHL(model, temp)
        elif variant == "ghlc":
            model = ghlc.prepare(model, (x2,), ghlc.GHLConfig(temperature=temp))
        elif variant == "ghlc_s25":
            cfg = ghlc.GHLConfig(temperature=temp, sample_fraction=SAMPLE_FRACTION)
            model = ghlc.prepare(model, (x2,), cfg)
        elif variant != "bp":
            raise ValueError(variant)
        self.model = model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.naive is not None:
            self.naive.apply()
        self.opt.step()


def data(batch: int, size: int, classes: int, device: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return x.to(device), y.to(device)


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
def bench_model(name: str, args) -> list[dict]:
    torch.manual_seed(0)
    base, temp = build(name)
    base = base.to(args.device)
    x, y = data(args.batch, 32, 10, args.device)
    fl = floor_stats(base, temp, x)
    mems = {v: memory(name, v, args) for v in VARIANTS}
    runners = {v: Runner(base, temp, v, x[:2]) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.warmup + args.repeats):
        k = rep % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:  # rotate the order: no variant always first
            ms = timed_step(runners[v], x, y, args.device)
            if rep >= args.warmup:
                times[v].append(ms)
        print(f"  {name} repeat {rep + 1}/{args.warmup + args.repeats}", file=sys.stderr)
    del runners
    gc.collect()
    bp_ms = statistics.median(times["bp"])
    bp_mem = mems["bp"]["peak_bytes"]
    rows = []
    for v in VARIANTS:
        med = statistics.median(times[v])
        floor = fl["floor_sampled"] if v == "ghlc_s25" else (1.0 if v == "bp" else fl["floor"])
        rows.append({
            "model": name, "variant": v, "median_ms": med, "times_ms": times[v],
            "ratio_to_bp": med / bp_ms, "floor": floor, "ratio_to_floor": med / bp_ms / floor,
            "peak_mb": mems[v]["peak_bytes"] / 2**20,
            "mem_ratio": mems[v]["peak_bytes"] / bp_mem if bp_mem > 0 else float("nan"),
            "peak_reset": mems[v]["peak_reset"],
            "bp_macs": fl["bp_macs"], "hebbian_macs": fl["hebbian_macs"],
        })
    return rows


def bench_resnet50(args) -> dict:
    """ResNet-50, 224x224: ghlc vs backprop peak memory and time, and the patch sizes the
    unfold-based (paper's) implementation would materialise. The naive variant is not run."""
    b, size = args.resnet50_batch, 224
    torch.manual_seed(0)
    base, _ = build("resnet50")
    patches = patch_bytes(base, torch.randn(2, 3, size, size))
    scale = b / 2  # traced at batch 2; patch sizes are linear in the batch
    patches = {
        "sum_bytes": patches["sum_bytes"] * scale, "max_bytes": patches["max_bytes"] * scale,
        "max_layer": patches["max_layer"],
    }
    out = {"batch": b, "size": size, "patches": patches}
    for v in ("bp", "ghlc"):
        if args.device == "cuda":
            mem = memory_inproc("resnet50", v, b, size, "cuda")
            gc.collect()
            torch.cuda.empty_cache()
        else:
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu",
                   "--batch", str(b), "--probe", f"resnet50:{v}"]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"resnet50 probe failed:\n{res.stderr[-2000:]}")
            mem = json.loads(res.stdout.strip().splitlines()[-1])
        out[f"{v}_peak_bytes"] = mem["peak_bytes"]
    x, y = data(b, size, 1000, args.device)
    runners = {v: Runner(base.to(args.device), 1.0, v, x[:2]) for v in ("bp", "ghlc")}
    times: dict[str, list[float]] = {"bp": [], "ghlc": []}
    n = max(1, min(args.repeats, 10))
    for rep in range(1 + n):
        for v in (("bp", "ghlc") if rep % 2 == 0 else ("ghlc", "bp")):
            ms = timed_step(runners[v], x, y, args.device)
            if rep >= 1:
                times[v].append(ms)
    out["bp_ms"] = statistics.median(times["bp"])
    out["ghlc_ms"] = statistics.median(times["ghlc"])
    del runners
    gc.collect()
    return out


def bench_prepare(n_layers: int = 200, device: str = "cpu") -> dict:
    """Wall time of ghlc.prepare on a plain stack of n 3x3 convs (8 channels, 8x8 input)."""
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
def table(rows: list[dict]) -> str:
    head = ("model", "variant", "median ms", "ratio to bp", "floor", "ratio/floor", "peak MB",
            "mem ratio")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['median_ms']:.1f} | {r['ratio_to_bp']:.3f} | "
            f"{r['floor']:.3f} | {r['ratio_to_floor']:.3f} | {r['peak_mb']:.1f} | "
            f"{r['mem_ratio']:.3f} |"
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
    return (f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu}), "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="output file (default bench/step_<device>.json)")
    p.add_argument("--resnet50", action="store_true",
                   help="also ResNet-50 at 224x224: ghlc peak memory vs unfolded patch size")
    p.add_argument("--resnet50-batch", type=int, default=64)
    p.add_argument("--no-prepare-bench", action="store_true",
                   help="skip timing ghlc.prepare on a 200-layer model")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: MODEL:VARIANT
    args = p.parse_args(argv)

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
        if m not in MODELS:
            print(f"error: unknown model {m!r} (choose from {', '.join(MODELS)})",
                  file=sys.stderr)
            return 2
    if args.repeats < 1 or args.batch < 2:
        print("error: --repeats must be >= 1 and --batch >= 2", file=sys.stderr)
        return 2

    rows: list[dict] = []
    for m in models:
        rows += bench_model(m, args)
    result = {
        "machine": machine(args.device), "device": args.device, "batch": args.batch,
        "repeats": args.repeats, "warmup": args.warmup, "sample_fraction": SAMPLE_FRACTION,
        "timing_method": TIMING_METHOD[args.device], "memory_method": MEMORY_METHOD[args.device],
        "command": "python bench/step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    if not args.no_prepare_bench:
        result["prepare"] = bench_prepare(200, args.device)
    if args.resnet50:
        result["resnet50"] = bench_resnet50(args)

    out = Path(args.json) if args.json else HERE / f"step_{args.device}.json"
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)

    print(f"machine: {result['machine']}")
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
              f"{r['bp_ms']:.1f} ms, ghlc {r['ghlc_ms']:.1f} ms")
    print(f"wrote {out}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
