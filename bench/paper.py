"""The paper's protocol: FastHebb and DeepHebb on all of CIFAR-10, GHL against backprop.

Run as ``python bench/accuracy.py --paper [options]`` (or ``python bench/paper.py``). Per net
the paper demo code's settings, taken from ``examples/<net>.py`` (``LR_CONV``, ``WD_CONV``,
``LR``, ``BATCH_SIZE`` 64, ``EPOCHS`` 100, inputs normalised with ``INPUT_MEAN`` =
``INPUT_STD`` = 0.5, the temperatures): plain SGD without momentum, convs in one parameter
group (``lr_conv``, ``wd_conv``), the rest in the other (``lr``, no weight decay), a cosine
schedule per iteration down to 0 over all steps, no augmentation. ``ghl`` and ``bp`` of a net
start from the same initial weights and see the same data order (seed). Data: all of CIFAR-10
from ``cifar10-jpeg.npz`` (50,000 / 10,000 images, JPEG copies of the official ones: see the
data README), decoded once; training runs with the data resident on the device
(:mod:`ghlc.resident`; on CUDA each full batch replays one captured CUDA graph).

Each run keeps its folder under ``--runs-dir`` (``metrics.jsonl``: one line per epoch, the
curve; ``run.json``; on CPU ``last.pt`` after each epoch, from which a rerun of the same command
resumes). The report (the final and the best-epoch test accuracy beside the paper's) replaces
the ``accuracy:paper`` section of ``docs/ACCURACY.md``; every run's curve goes to
``--results`` as ``curves.json`` and ``curves.png`` (test accuracy against training steps, so
runs on the full set and on the subset compare at the same number of steps).

    python bench/accuracy.py --paper                               # 100 epochs, both nets
    python bench/accuracy.py --paper --device cpu --nets fasthebb --epochs 5
    python bench/accuracy.py --paper --data cifar10-subset.npz --epochs 25   # same steps
    python bench/accuracy.py --paper --nets deephebb --budget-s 300  # as many epochs as fit
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:  # examples/ and bench/ are not installed packages
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from benchlib.machine import cpu_model  # noqa: E402

import ghlc  # noqa: E402
from examples import deephebb as deephebb_mod  # noqa: E402
from examples import fasthebb as fasthebb_mod  # noqa: E402
from ghlc.cifar import CifarError, load_uint8  # noqa: E402
from ghlc.fileio import write_atomic  # noqa: E402
from ghlc.resident import ResidentConfig, ResidentData, train_resident  # noqa: E402
from ghlc.train import TrainingDiverged  # noqa: E402

NETS = {"fasthebb": fasthebb_mod, "deephebb": deephebb_mod}
METHODS = ("ghl", "bp")
# The paper's CIFAR-10 test accuracies (%, best epoch, as its code reports): GHL, backprop.
PAPER = {"fasthebb": (83.96, 84.71), "deephebb": (86.41, 86.98)}
DATA_DIR = ROOT.parent / "shared" / "data"
DOC = ROOT / "docs" / "ACCURACY.md"
MARK = ("<!-- accuracy:paper:start -->", "<!-- accuracy:paper:end -->")


def settings(net: str, method: str, args: argparse.Namespace, n_train: int) -> dict[str, Any]:
    """Everything that makes a run what it is (a run folder resumes only if these match)."""
    m = NETS[net]
    return {
        "net": net,
        "method": method,
        "seed": args.seed,
        "epochs": args.epochs_of[net],
        "lr_conv": m.LR_CONV,
        "wd_conv": m.WD_CONV,
        "lr": m.LR,
        "wd": m.WD,
        "momentum": m.MOMENTUM,
        "batch_size": m.BATCH_SIZE,
        "mean": list(m.INPUT_MEAN),
        "std": list(m.INPUT_STD),
        "temperatures": dict(m.TEMPERATURES),
        "augment": args.augment,
        "data": args.data_name,
        "n_train": n_train,
    }


def run_name(s: dict[str, Any], n_test: int) -> str:
    data = {"cifar10-jpeg": "full", "cifar10-subset": "subset"}.get(s["data"], s["data"])
    n = f"-n{s['n_train']}" if s["data"] == "cifar10-jpeg" and s["n_train"] < 50000 else ""
    aug = "-augment" if s["augment"] else ""
    return f"paper-{data}{n}-{s['net']}-{s['method']}{aug}-e{s['epochs']}-s{s['seed']}-t{n_test}"


def build(net: str, method: str, seed: int) -> tuple[torch.nn.Module, set[str]]:
    """The net with its seeded initial weights (the same for both methods) and the names of
    its plastic (conv) weights; ``bp`` gets the plain module."""
    mod = NETS[net]
    torch.manual_seed(seed)
    model = getattr(mod, net)()
    cfg = ghlc.GHLConfig(temperature=mod.TEMPERATURES)
    lg = ghlc.passes.PassManager(ghlc.passes.default_passes())(
        ghlc.trace(model, mod.example_inputs(), config=cfg)
    )
    plastic = {i.name for i in lg.plastic()}
    return (model if method == "bp" else ghlc.build(lg)), plastic


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_model()}, {torch.get_num_threads()} thread(s)"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(net, method, args, data: ResidentData, dev: torch.device) -> dict[str, Any]:
    n_train, n_test = data.y_train.shape[0], data.y_test.shape[0]
    s = settings(net, method, args, n_train)
    d = args.runs_dir / run_name(s, n_test)
    meta_path, metrics_path, ckpt_path = d / "run.json", d / "metrics.jsonl", d / "last.pt"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    done = _jsonl(metrics_path) if old and old.get("settings") == s else []
    if len(done) >= s["epochs"]:
        print(f"[skip] {d.name}: {len(done)} epochs done", flush=True)
        return {"name": d.name, "settings": s, "hist": done, **(old or {})}
    state = None
    if done and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=dev, weights_only=True)
        print(f"[resume] {d.name} from epoch {state['epoch']}", flush=True)
    model, plastic = build(net, method, args.seed)
    model.to(dev)
    meta = {
        "settings": s,
        "plastic": sorted(plastic),
        "device": device_name(dev),
        "torch": torch.__version__,
        "n_test": n_test,
        "steps_per_epoch": math.ceil(n_train / s["batch_size"]),
        "started": old["started"] if state is not None and old else time.strftime("%Y-%m-%d"),
    }
    d.mkdir(parents=True, exist_ok=True)
    write_atomic(meta_path, json.dumps(meta, indent=1) + "\n")
    cfg = ResidentConfig(
        plastic=frozenset(plastic),
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        lr=s["lr"],
        lr_plastic=s["lr_conv"],
        wd_plastic=s["wd_conv"],
        wd=s["wd"],
        seed=s["seed"],
        augment=s["augment"],
    )
    checkpoint = args.checkpoint if args.checkpoint is not None else dev.type == "cpu"

    def on_epoch(h: dict[str, Any], snapshot) -> None:
        hist.append(h)
        if checkpoint:
            buf = io.BytesIO()
            torch.save(snapshot(), buf)
            write_atomic(ckpt_path, buf.getbuffer())
        write_atomic(metrics_path, "".join(json.dumps(x) + "\n" for x in hist))
        print(
            f"  {d.name} epoch {h['epoch']}/{s['epochs']}: test acc {100 * h['test_acc']:.2f}% "
            f"train acc {100 * h['train_acc']:.2f}% ({h['seconds']:.1f} s)",
            flush=True,
        )

    hist: list[dict[str, Any]] = list(state["history"]) if state is not None else []
    print(f"[start] {d.name}: {s['epochs']} epochs, {n_train}/{n_test} images, {dev}", flush=True)
    try:
        train_resident(model, data, cfg, on_epoch=on_epoch, state=state)
    except TrainingDiverged as e:
        print(f"[diverged] {d.name}: {e}", flush=True)
    return {"name": d.name, "hist": hist, **meta}


def probe_epoch_s(net: str, args, data: ResidentData, dev: torch.device) -> float:
    """Seconds one epoch of ``net`` takes with both methods (train and test pass), from two
    short epochs on a slice of the data (the second timed: the first holds kernel choice)."""
    total = 0.0
    n = data.y_train.shape[0]
    steps = math.ceil(n / NETS[net].BATCH_SIZE)
    k = min(n, NETS[net].BATCH_SIZE * args.probe_steps)
    part = ResidentData(
        data.x_train[:k], data.y_train[:k], data.x_test[:k], data.y_test[:k], data.mean, data.std
    )
    for method in METHODS:
        model, plastic = build(net, method, 0)
        model.to(dev)
        cfg = ResidentConfig(plastic=frozenset(plastic), epochs=2, lr=0.0, lr_plastic=0.0)
        h = train_resident(model, part, cfg)[-1]
        step_s = h["train_seconds"] / math.ceil(k / cfg.batch_size)
        test_s = (h["seconds"] - h["train_seconds"]) * data.y_test.shape[0] / k
        total += steps * step_s + test_s
    return total


def curves(runs: list[dict[str, Any]], out: Path) -> Path | None:
    """Write every run's curve as JSON, and a plot of test accuracy against steps."""
    out.mkdir(parents=True, exist_ok=True)
    rec = {
        r["name"]: {
            "settings": r["settings"],
            "device": r.get("device"),
            "steps_per_epoch": r.get("steps_per_epoch"),
            "n_test": r.get("n_test"),
            "epochs": [h["epoch"] for h in r["hist"]],
            "test_acc": [h["test_acc"] for h in r["hist"]],
            "train_acc": [h["train_acc"] for h in r["hist"]],
            "train_loss": [h["train_loss"] for h in r["hist"]],
            "seconds": [h["seconds"] for h in r["hist"]],
        }
        for r in runs
    }
    write_atomic(out / "curves.json", json.dumps(rec, indent=1) + "\n")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    nets = sorted({r["settings"]["net"] for r in runs}, key=list(NETS).index)
    fig = Figure(figsize=(5.5 * max(1, len(nets)), 4.2))
    axes = fig.subplots(1, max(1, len(nets)), squeeze=False)[0]
    for ax, net in zip(axes, nets):
        for i, r in enumerate(x for x in runs if x["settings"]["net"] == net):
            spe = r.get("steps_per_epoch") or 1
            style = "o-" if r["settings"]["method"] == "ghl" else "o--"
            ax.plot(
                [spe * h["epoch"] for h in r["hist"]],
                [100 * h["test_acc"] for h in r["hist"]],
                style,
                color=f"C{i % 10}",
                ms=3,
                label=r["name"].removeprefix("paper-").replace(f"-{net}", ""),
            )
        ghl, bp = PAPER[net]
        ax.axhline(ghl, color="k", lw=0.6, ls="-", alpha=0.5)
        ax.axhline(bp, color="k", lw=0.6, ls="--", alpha=0.5)
        ax.set_title(f"{net} (paper: GHL {ghl}, BP {bp}, grey)", fontsize=10)
        ax.set_xlabel("training steps (batch 64)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    write_atomic(out / "curves.png", buf.getvalue())
    return out / "curves.png"


def table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| net | method | data (train / test images) | epochs | steps | final test acc | "
        "best test acc (epoch) | paper | s / epoch | device |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s, h = r["settings"], r["hist"]
        if not h:
            continue
        best = max(h, key=lambda x: x["test_acc"])
        paper = PAPER[s["net"]][METHODS.index(s["method"])]
        spe = r.get("steps_per_epoch") or math.ceil(s["n_train"] / s["batch_size"])
        data = f"{s['data']} ({s['n_train']} / {r.get('n_test', '?')})"
        if s["augment"]:
            data += ", augmented"
        lines.append(
            f"| {s['net']} | {s['method']} | {data} | {len(h)}/{s['epochs']} | "
            f"{spe * len(h)} | {100 * h[-1]['test_acc']:.2f}% | "
            f"{100 * best['test_acc']:.2f}% ({best['epoch']}) | {paper:.2f}% | "
            f"{sum(x['seconds'] for x in h) / len(h):.1f} | {r.get('device', '?')} |"
        )
    return lines


def report(runs: list[dict[str, Any]], doc: Path, png: Path | None) -> None:
    """Replace the ``accuracy:paper`` section of ``doc`` (appended when it has none)."""
    body = [
        MARK[0],
        "The protocol's runs (`python bench/accuracy.py --paper`, see `bench/paper.py`), "
        f'{time.strftime("%Y-%m-%d")}, torch {torch.__version__}. "best" is the paper code\'s '
        "figure (the best epoch's test accuracy); \"paper\" is the paper's reported figure.",
        "",
        *table(runs),
    ]
    if png is not None:
        rel = Path(os.path.relpath(png.resolve(), doc.resolve().parent)).as_posix()
        body += ["", f"![test accuracy against training steps]({rel})"]
    body.append(MARK[1])
    text = doc.read_text() if doc.is_file() else "# Accuracy\n"
    if MARK[0] in text and MARK[1] in text:
        a, rest = text.split(MARK[0], 1)
        text = a + "\n".join(body) + rest.split(MARK[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    write_atomic(doc, text)
    print(f"wrote {doc}")


def collect(runs_dir: Path) -> list[dict[str, Any]]:
    out = []
    for d in sorted(runs_dir.glob("paper-*")):
        meta = json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else None
        hist = _jsonl(d / "metrics.jsonl")
        if meta and hist:
            out.append({"name": d.name, "hist": hist, **meta})
    return sorted(out, key=_order)


def _order(r: dict[str, Any]) -> tuple:
    s = r["settings"]
    net = list(NETS).index(s["net"]) if s["net"] in NETS else len(NETS)
    method = METHODS.index(s["method"]) if s["method"] in METHODS else len(METHODS)
    return (net, s["data"], -s["n_train"], s["epochs"], s["augment"], method, s["seed"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/accuracy.py --paper",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nets", default="fasthebb,deephebb", help="fasthebb,deephebb")
    p.add_argument("--methods", default="ghl,bp", help="ghl,bp")
    p.add_argument("--epochs", type=int, default=None, help="default: the paper's 100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data",
        default="cifar10-jpeg.npz",
        help="a .npz in --data-dir or a path: the JPEG set, or an image .npz such as "
        "cifar10-subset.npz",
    )
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--train-limit", "--limit-train", type=int, default=None, dest="train_limit")
    p.add_argument("--test-limit", "--limit-test", type=int, default=None, dest="test_limit")
    p.add_argument("--augment", action="store_true", help="random crop + flip (not the paper's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds this command may take: each net gets as many epochs (at most --epochs) "
        "as a timed probe says fit in what is left, the same for both methods",
    )
    p.add_argument("--probe-steps", type=int, default=40, help=argparse.SUPPRESS)
    p.add_argument(
        "--checkpoint",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write last.pt after each epoch (default: on CPU)",
    )
    p.add_argument("--runs-dir", type=Path, default=ROOT / "bench" / "runs")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "paper")
    p.add_argument("--doc", type=Path, default=DOC, help="the page whose section is replaced")
    p.add_argument("--no-report", action="store_true", help="touch neither --doc nor --results")
    args = p.parse_args(argv)
    args.nets = [v for v in args.nets.split(",") if v]
    args.methods = [v for v in args.methods.split(",") if v]
    for what, vals, ok in (("net", args.nets, NETS), ("method", args.methods, METHODS)):
        bad = [v for v in vals if v not in ok]
        if bad or not vals:
            p.error(f"unknown {what} {', '.join(bad) or '(none)'} (choose from {', '.join(ok)})")
    for name in ("epochs", "train_limit", "test_limit", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget-s must be positive")
    return args


def load(args: argparse.Namespace, dev: torch.device) -> ResidentData:
    path = Path(args.data)
    if not path.is_file() and not path.is_absolute():
        path = args.data_dir / args.data
    if not path.is_file():
        raise SystemExit(
            f"error: data file {path} not found (the shared data folder holds "
            "cifar10-jpeg.npz; pass --data-dir DIR or --data PATH)"
        )
    t0 = time.perf_counter()
    try:
        u8 = load_uint8(path)
    except CifarError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"loaded {path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    args.data_name = path.stem
    ntr, nte = args.train_limit, args.test_limit
    m = NETS[args.nets[0]]  # both nets: mean = std = 0.5
    return ResidentData.from_uint8(
        u8.x_train[:ntr],
        u8.y_train[:ntr],
        u8.x_test[:nte],
        u8.y_test[:nte],
        mean=m.INPUT_MEAN,
        std=m.INPUT_STD,
        device=dev,
    )


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    data = load(args, dev)
    print(f"device: {device_name(dev)}", flush=True)
    args.epochs_of = {}
    runs = []
    for net in args.nets:
        epochs = args.epochs or NETS[net].EPOCHS
        if args.budget_s is not None:
            per_epoch = probe_epoch_s(net, args, data, dev) * len(args.methods) / len(METHODS)
            left = args.budget_s - (time.perf_counter() - t_start) - 20 * len(args.methods)
            fit = int(0.95 * left / per_epoch) if left > 0 else 0
            print(
                f"{net}: about {per_epoch:.1f} s per epoch for {'+'.join(args.methods)}; "
                f"{max(0, left):.0f} s left: {min(fit, epochs)} epochs",
                flush=True,
            )
            if fit < 1:
                continue
            epochs = min(epochs, fit)
        args.epochs_of[net] = epochs
        for method in args.methods:
            runs.append(run_one(net, method, args, data, dev))
    if not args.no_report:
        done = collect(args.runs_dir)
        png = curves(done, args.results)
        report(done, args.doc, png)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
