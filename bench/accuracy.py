"""Accuracy benchmark: GHL vs backprop vs pure Hebbian on the paper's two networks.

Runs the table (net x method x seed) plus FastHebb ablations of the rule on CIFAR-10
(``cifar10-subset.npz``: 10,000 training images, 2,000 test images, JPEG-compressed copies of
official CIFAR-10 images; see the data README), then writes ``docs/ACCURACY.md`` and a plot
of test accuracy per epoch.

Methods (all with the same per-role SGD settings, so only the learning rule differs):

- ``ghl``: ghlc-prepared model, plastic convs get ``|H| * sign(dL/dW)`` (the paper's rule);
- ``hebbian``: ghlc-prepared with ``global_signal="none"`` (plastic convs get ``-H``, pure local
  Hebbian); the layers after the convs still learn by backprop;
- ``bp``: the plain model, all weights by backprop. For a fair comparison the conv weights
  still get the plastic group's settings (``lr_conv``, ``wd_conv``) and the rest ``lr``, i.e.
  the same SGD parameter groups as ``ghl``;
- ``sign`` (diagnostic, only when named in ``--methods``): the plain model with
  ``sign(dL/dW)`` on the plastic convs, i.e. GHL with ``|H|`` replaced by 1.

Each run trains in its own folder ``bench/runs/<name>/`` (checkpoints, ``metrics.jsonl``), so
the table resumes: runs whose ``metrics.jsonl`` has all epochs are skipped, partly done runs
continue from ``last.pt``. A run folder whose settings differ from the requested ones is
started afresh.

    python bench/accuracy.py                      # the full table (GPU recommended)
    python bench/accuracy.py --quick              # FastHebb, 2000-image slice, ~10 min on 2 CPUs
    python bench/accuracy.py --sanity             # FastHebb on MNIST / Fashion-MNIST, minutes
    python bench/accuracy.py --report-only        # rewrite the docs from finished runs
    python bench/accuracy.py --paper              # the paper's protocol, all of CIFAR-10
                                                  # (bench/paper.py; --paper --help)
    python bench/accuracy.py --step-size          # plastic step sizes on a pre-activation
                                                  # ResNet-18 and an SE-ResNet-18, minutes

``--step-size`` trains the test fixtures ``tests/models/preact_resnet.py`` and
``tests/models/senet.py`` at ResNet-18 width (64-128-256-512, two blocks a stage) for one
short epoch on a CIFAR-10 slice with ``ghlc train``'s defaults for everything but the plastic
step: the paper's step at the old CLI default 1e-2, at the rate the range test picks (the
CLI's default, ``--lr-plastic auto``), the scaled step (``plastic_step="rms"``) at its own
picked rate, and backprop with the same groups.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # examples/ is not an installed package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import ghlc  # noqa: E402
from examples import deephebb as deephebb_mod  # noqa: E402
from examples import fasthebb as fasthebb_mod  # noqa: E402
from ghlc.data import augment_batch, load_data  # noqa: E402
from ghlc.train import TrainingInterrupted, train  # noqa: E402

DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data"
RUNS_DIR = ROOT / "bench" / "runs"
DOCS_DIR = ROOT / "docs"
MD_PATH = DOCS_DIR / "ACCURACY.md"

NETS = {"fasthebb": fasthebb_mod, "deephebb": deephebb_mod}
METHODS = ("ghl", "bp", "hebbian")
# Diagnostic method, run only when asked for: the plain model with sign(dL/dW) on the plastic
# convs, i.e. GHL with |H| replaced by 1 (separates the sign's effect from the Hebbian scale).
ALL_METHODS = (*METHODS, "sign")

# FastHebb ablations of the GHL rule: tag -> GHLConfig overrides (temperature is a float here:
# the paper uses 1.0 for every FastHebb layer).
ABLATIONS: dict[str, dict[str, Any]] = {
    "paper": {},  # the paper's rule: the baseline row when ablations run at their own epochs
    "competition-none": {"competition": "none"},
    "competition-hard": {"competition": "hard"},
    "rule-hebb": {"local_rule": "hebb"},
    "temp-0.5": {"temperature": 0.5},
    "temp-2.0": {"temperature": 2.0},
    "sample-0.25": {"sample_fraction": 0.25},
    "sample-positions-0.25": {"sample_fraction": 0.25, "sample_over": "positions"},
    "norm-unit": {"normalisation": "unit"},
    # Training forward under bfloat16 autocast ("autocast" is the training loop's setting, not
    # a GHLConfig field): H in float32 (the default), and in bfloat16 (hebbian_precision).
    "amp-bf16": {"autocast": "bfloat16"},
    "amp-bf16-low": {"autocast": "bfloat16", "hebbian_precision": "autocast"},
}

# --quick: FastHebb only, a 2000-image CIFAR-10 slice, a few epochs. The paper's classifier
# learning rate (1e-4) is meant for 100 epochs over 50,000 images (78,000 steps); over a few
# hundred steps it barely moves the 4096-unit head, so the quick run uses QUICK_LR for the
# backprop layers (all three methods alike) and the paper's conv settings.
QUICK = {
    "data": "cifar10-subset.npz",
    "limit_train": 2000,
    "limit_test": 1000,
    "epochs": 4,
    "seeds": [0],
    "lr": 1e-2,
}


# --sanity: FastHebb on the MNIST and Fashion-MNIST subsets (resized to 3x32x32), a couple of
# epochs on 2000 images: all three methods should learn; a fast check that nothing is broken.
SANITY = {
    "datasets": {"mnist": "mnist-subset.npz", "fashion": "fashion-mnist-subset.npz"},
    "limit_train": 2000,
    "limit_test": 2000,
    "epochs": 2,
    "seeds": [0],
    "lr": 1e-2,
}


@dataclass
class RunSpec:
    name: str
    net: str
    method: str
    seed: int
    epochs: int
    lr_conv: float
    wd_conv: float
    lr: float
    batch_size: int
    data: str
    limit_train: int | None
    limit_test: int | None
    augment: bool
    group: str  # the table row: name without the seed
    section: str  # "main" | "ablation"
    cfg: dict[str, Any] = field(default_factory=dict)  # GHLConfig overrides

    def settings(self) -> dict[str, Any]:
        """What must match for a run folder to be resumed (epochs handled separately)."""
        d = asdict(self)
        d.pop("epochs")
        d.pop("section")
        return d


# ---- building runs --------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:g}"


def plan(args) -> list[RunSpec]:
    prefix = "quick-" if args.quick else ""
    runs: list[RunSpec] = []

    def add(net, method, seed, tag, section, cfg, data=None, prefix=prefix, epochs=None):
        mod = NETS[net]
        group = f"{prefix}{net}-{method}" + (f"-{tag}" if tag else "")
        if epochs is not None and epochs != args.epochs:
            group += f"-e{epochs}"  # ablations at their own length: never the main runs' folders
        runs.append(
            RunSpec(
                name=f"{group}-s{seed}",
                net=net,
                method=method,
                seed=seed,
                epochs=epochs or args.epochs,
                lr_conv=args.lr_conv if args.lr_conv is not None else mod.LR_CONV,
                wd_conv=args.wd_conv if args.wd_conv is not None else mod.WD_CONV,
                lr=args.lr if args.lr is not None else mod.LR,
                batch_size=args.batch_size,
                data=data or args.data,
                limit_train=args.limit_train,
                limit_test=args.limit_test,
                augment=args.augment,
                group=group,
                section=section,
                cfg=dict(cfg),
            )
        )

    if args.sanity:
        for tag, file in SANITY["datasets"].items():
            for method in args.methods:
                for seed in args.seeds:
                    add(
                        "fasthebb",
                        method,
                        seed,
                        "",
                        "sanity",
                        {},
                        data=file,
                        prefix=f"sanity-{tag}-",
                    )
        return runs
    for net in args.nets:
        for method in args.methods:
            for seed in args.seeds:
                add(net, method, seed, "", "main", {})
    if args.ablations and "fasthebb" in args.nets:
        own = args.ablation_epochs not in (None, args.epochs)
        for tag in args.ablations:
            if tag == "paper" and not own:
                continue  # the main table's ghl run is the baseline
            for seed in args.ablation_seeds:
                add(
                    "fasthebb",
                    "ghl",
                    seed,
                    tag,
                    "ablation",
                    ABLATIONS[tag],
                    epochs=args.ablation_epochs,
                )
    return runs


def config_for(spec: RunSpec) -> ghlc.GHLConfig:
    mod = NETS[spec.net]
    kw: dict[str, Any] = {"temperature": mod.TEMPERATURES}
    kw.update({k: v for k, v in spec.cfg.items() if k != "autocast"})
    if spec.method == "hebbian":
        kw["global_signal"] = "none"
    return ghlc.GHLConfig(**kw)


def build(spec: RunSpec, in_shape) -> tuple[torch.nn.Module, set[str]]:
    """The model for ``spec`` (seeded init) and the names of its plastic parameters."""
    mod = NETS[spec.net]
    torch.manual_seed(spec.seed)
    model = getattr(mod, spec.net)()
    x = torch.zeros(2, *in_shape)
    lg = ghlc.passes.PassManager(ghlc.passes.default_passes())(
        ghlc.trace(model, (x,), config=config_for(spec))
    )
    plastic = {i.name for i in lg.plastic()}
    if spec.method == "bp":
        return model, plastic  # plain model; same parameter groups as ghl
    if spec.method == "sign":
        for name, p in model.named_parameters():
            if name in plastic:
                p.register_hook(torch.sign)
        return model, plastic
    return ghlc.build(lg), plastic


# ---- running --------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def read_spec(run_dir: Path) -> dict[str, Any] | None:
    p = run_dir / "run.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


_DATA_CACHE: dict[tuple, Any] = {}


def dataset(spec: RunSpec, data_dir: Path):
    key = (spec.data, spec.limit_train, spec.limit_test)
    if key not in _DATA_CACHE:
        path = Path(spec.data)
        if not path.is_absolute() and not path.exists():
            path = data_dir / spec.data
        if not path.is_file():
            sys.exit(f"error: data file {path} not found (use --data-dir)")
        ds = load_data(str(path), (3, 32, 32))
        n_tr = spec.limit_train or len(ds.y_train)
        n_te = spec.limit_test or len(ds.y_test)
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = (
            ds.x_train[:n_tr],
            ds.y_train[:n_tr],
            ds.x_test[:n_te],
            ds.y_test[:n_te],
            ds.classes,
        )
    return _DATA_CACHE[key]


def run_one(spec: RunSpec, data_dir: Path, device: torch.device, progress: bool) -> None:
    run_dir = RUNS_DIR / spec.name
    saved = read_spec(run_dir)
    done = read_metrics(run_dir)
    same = (
        saved is not None
        and saved.get("settings") == spec.settings()
        and saved.get("epochs") == spec.epochs
    )
    if same and len(done) >= spec.epochs:
        print(
            f"[skip] {spec.name}: {len(done)} epochs done, test acc {done[-1]['test_acc']:.4f}",
            flush=True,
        )
        return
    resume = same and (run_dir / "last.pt").is_file()
    if saved is not None and not same:
        print(f"[fresh] {spec.name}: settings changed, starting over", flush=True)
    x_tr, y_tr, x_te, y_te, classes = dataset(spec, data_dir)
    model, plastic = build(spec, tuple(x_tr.shape[1:]))
    model.to(device)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "settings": spec.settings(),
        "epochs": spec.epochs,
        "section": spec.section,
        "plastic": sorted(plastic),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "n_train": len(y_tr),
        "n_test": len(y_te),
    }
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    what = f"resume from epoch {len(done)}" if resume else "start"
    print(
        f"[{what}] {spec.name}: {spec.epochs} epochs, {len(y_tr)} train / {len(y_te)} test "
        f"images, {device}",
        flush=True,
    )
    t0 = time.perf_counter()
    res = train(
        model,
        x_tr,
        y_tr,
        x_te,
        y_te,
        plastic=plastic,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        lr_plastic=spec.lr_conv,
        wd_plastic=spec.wd_conv,
        wd=0.0,
        seed=spec.seed,
        out_dir=run_dir,
        resume=resume,
        augment=augment_batch if spec.augment else None,
        progress=progress,
        classes=classes,
        autocast=getattr(torch, spec.cfg["autocast"]) if "autocast" in spec.cfg else None,
    )
    print(
        f"[done] {spec.name}: test acc {res.final.get('test_acc', float('nan')):.4f} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )


# ---- report ---------------------------------------------------------------------------------


def _settings_text(s: dict[str, Any]) -> str:
    parts = [
        f"lr_conv {_fmt(s['lr_conv'])}",
        f"wd_conv {_fmt(s['wd_conv'])}",
        f"lr {_fmt(s['lr'])}",
        f"batch {s['batch_size']}",
    ]
    cfg = s.get("cfg") or {}
    if "temperature" not in cfg:
        temps = sorted(set(NETS[s["net"]].TEMPERATURES.values()), reverse=True)
        cfg = {"temperature": "/".join(_fmt(t) for t in temps), **cfg}
    parts += [f"{k} {v}" for k, v in cfg.items()]
    if s.get("augment"):
        parts.append("augment")
    return ", ".join(parts)


def collect(names: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        d = RUNS_DIR / name
        meta, hist = read_spec(d), read_metrics(d)
        if meta is None or not hist:
            continue
        out.append({"name": name, "meta": meta, "hist": hist})
    return out


def _order(r: dict[str, Any]):
    s = r["meta"]["settings"]
    net = list(NETS).index(s["net"]) if s["net"] in NETS else len(NETS)
    method = ALL_METHODS.index(s["method"]) if s["method"] in ALL_METHODS else len(ALL_METHODS)
    return (r["meta"].get("section") != "main", net, s["data"], method, s["group"], s["seed"])


def table(runs: list[dict[str, Any]]) -> list[str]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["meta"]["settings"]["group"], []).append(r)
    lines = [
        "| run | final test acc | best test acc | s / epoch | epochs | seeds | settings |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, rs in groups.items():
        finals = [r["hist"][-1]["test_acc"] for r in rs]
        bests = [max(h["test_acc"] for h in r["hist"]) for r in rs]
        secs = [h["seconds"] for r in rs for h in r["hist"]]
        eps = sorted({f"{len(r['hist'])}/{r['meta']['epochs']}" for r in rs})

        def ms(v):
            if len(v) < 2:
                return f"{100 * v[0]:.2f}%"
            return f"{100 * statistics.mean(v):.2f} ± {100 * statistics.stdev(v):.2f}%"

        seeds = ",".join(str(r["meta"]["settings"]["seed"]) for r in rs)
        lines.append(
            f"| {group} | {ms(finals)} | {ms(bests)} | {statistics.mean(secs):.1f} | "
            f"{', '.join(eps)} | {seeds} | "
            f"{_settings_text(rs[0]['meta']['settings'])} |"
        )
    return lines


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    panels: dict[str, list[dict[str, Any]]] = {}
    main_epochs = {
        (r["meta"]["settings"]["net"], r["meta"]["epochs"])
        for r in runs
        if r["meta"]["section"] == "main"
    }
    for r in runs:
        s = r["meta"]["settings"]
        section = r["meta"]["section"]
        if section == "ablation" and (s["net"], r["meta"]["epochs"]) in main_epochs:
            section = "main"  # an ablation as long as the main runs: plot it beside them
        key = f"{s['net']} " + {"main": "methods", "sanity": Path(s["data"]).stem}.get(
            section, f"GHL ablations, {r['meta']['epochs']} epochs"
        )
        panels.setdefault(key, []).append(r)
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, rs) in zip(axes, panels.items()):
        colors: dict[str, Any] = {}
        for r in rs:
            g = r["meta"]["settings"]["group"]
            label = None
            if g not in colors:
                colors[g] = f"C{len(colors) % 10}"
                label = g
            ep = [h["epoch"] for h in r["hist"]]
            ax.plot(
                ep,
                [100 * h["test_acc"] for h in r["hist"]],
                "o-",
                ms=3,
                color=colors[g],
                label=label,
                lw=1.2,
            )
        ax.set_title(f"{title}: {key}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)
    return True


def _section_markers(key: str) -> tuple[str, str]:
    return f"<!-- accuracy:{key}:start -->", f"<!-- accuracy:{key}:end -->"


HEADER = """# Accuracy

Numbers on this page come from `python bench/accuracy.py` (see its docstring); rerun it to
reproduce them. Data: `cifar10-subset.npz` from the shared data folder, i.e. JPEG-compressed
copies of official CIFAR-10 images (10,000 training, 2,000 test images). These are **not**
official CIFAR-10 numbers: the subset is 5x smaller than CIFAR-10's training set and JPEG
artefacts cost accuracy, so do not compare them with the paper's tables directly.

Methods: `ghl` = Global-guided Hebbian Learning (plastic convs get |H| * sign(dL/dW));
`hebbian` = the same with the global signal off (plastic convs get -H, pure local Oja rule with
soft competition; the fully connected layers still learn by backprop); `bp` = plain backprop.
All methods use the same SGD parameter groups (convs: `lr_conv`, `wd_conv`; the rest: `lr`,
no weight decay), plain SGD without momentum, cosine schedule over all steps. "±" is the sample
standard deviation over seeds. s / epoch includes the test pass.
"""


def write_report(runs: list[dict[str, Any]], key: str, args, device: torch.device) -> None:
    png = DOCS_DIR / {"quick": "accuracy-quick.png", "sanity": "accuracy-sanity.png"}.get(
        key, "accuracy.png"
    )
    title = {"quick": "quick", "sanity": "sanity"}.get(key, "CIFAR-10 subset")
    has_plot = bool(runs) and plot(runs, png, title)
    meta0 = runs[0]["meta"] if runs else {}
    s0 = meta0.get("settings", {})
    heading = {
        "quick": "## Quick check (`--quick`)",
        "sanity": "## Sanity check: MNIST / Fashion-MNIST (`--sanity`)",
    }.get(key, "## Full table")
    threads = torch.get_num_threads()
    body = [heading, ""]
    if key == "sanity":
        body += [
            f"FastHebb on the first {meta0.get('n_train', '?')} training and first "
            f"{meta0.get('n_test', '?')} test images of the MNIST and Fashion-MNIST subsets "
            "(resized to 3x32x32), "
            f"{meta0.get('epochs', '?')} epochs, backprop layers at lr "
            f"{_fmt(s0.get('lr', float('nan')))}. Every method should learn well above chance "
            "(10%); this checks that nothing is broken, not the paper's claim.",
            "",
        ]
    elif key == "quick":
        body += [
            f"FastHebb on the first {meta0.get('n_train', '?')} training and first "
            f"{meta0.get('n_test', '?')} test images of `{s0.get('data', '?')}`, "
            f"{meta0.get('epochs', '?')} epochs. The backprop layers use lr "
            f"{_fmt(s0.get('lr', float('nan')))} instead of the paper's 1e-4 (made for 100 "
            "epochs on 50,000 images), the same for all three methods. A smoke test of the "
            "ordering, not a measure of final accuracy: with 1000 test images one run's "
            "accuracy has a standard error of about 1.5 points.",
            "",
        ]
    else:
        body += [
            f"{meta0.get('n_train', '?')} training / {meta0.get('n_test', '?')} test images of "
            f"`{s0.get('data', '?')}`. Each run's settings are in its row; they are the paper's "
            "(see `examples/`) except where the notes below say otherwise. Every method of a "
            "network gets the same epochs, batch, schedule, data order and seed.",
            "",
        ]
    body += table(runs) if runs else ["(no finished runs)"]
    devices = sorted({r["meta"].get("device", str(device)) for r in runs}) or [str(device)]
    seen = sorted({r["meta"]["threads"] for r in runs if "threads" in r["meta"]})
    if seen:
        threads = (
            "/".join(map(str, seen)) + " (per run; earlier runs: not recorded)"
            if any("threads" not in r["meta"] for r in runs)
            else "/".join(map(str, seen))
        )
    body += [
        "",
        f"Measured on {', '.join(devices)} ({platform.machine()}, "
        f"torch {torch.__version__}, torch CPU threads: {threads}), "
        f"{time.strftime('%Y-%m-%d')}.",
    ]
    if has_plot:
        body += ["", f"![test accuracy per epoch]({png.name})"]
    start, end = _section_markers(key)
    section = "\n".join([start, *body, end])
    text = MD_PATH.read_text() if MD_PATH.is_file() else HEADER
    if start in text and end in text:
        a, rest = text.split(start, 1)
        _, b = rest.split(end, 1)
        text = a + section + b
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = MD_PATH.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(MD_PATH)
    print(
        f"wrote {MD_PATH.relative_to(ROOT)}" + (f" and {png.relative_to(ROOT)}" if has_plot else "")
    )


# ---- step sizes (--step-size) -----------------------------------------------------------------

STEP = {"data": "cifar10-subset.npz", "limit_train": 640, "limit_test": 400, "epochs": 1}
STEP_NETS = ("preact_resnet", "senet")
# variant -> (method, plastic_step, lr_plastic: a number or "auto"); the rest is the CLI's
# defaults: lr 5e-3 for the backprop layers, wd_plastic 5e-2, batch 64, SGD, cosine
STEP_VARIANTS: dict[str, tuple[str, str, float | str]] = {
    "paper-0.01": ("ghl", "paper", 1e-2),
    "paper-auto": ("ghl", "paper", "auto"),
    "rms-auto": ("ghl", "rms", "auto"),
    "bp-0.01": ("bp", "paper", 1e-2),
}


def _fixture(net: str) -> torch.nn.Module:
    import importlib.util

    path = ROOT / "tests" / "models" / f"{net}.py"
    spec = importlib.util.spec_from_file_location(f"fixture_{net}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cls = mod.PreActResNet if net == "preact_resnet" else mod.SENet
    return cls(widths=(64, 128, 256, 512), blocks=2)


def step_size_runs(args, device: torch.device) -> list[dict[str, Any]]:
    """Each net x variant once (seed 0); returns one row per run."""
    import warnings

    from ghlc.lrfind import auto_lr
    from ghlc.runtime import runtime_of
    from ghlc.train import DivergenceWarning

    path = args.data_dir / STEP["data"]
    ds = load_data(str(path), (3, 32, 32))
    x, y = ds.x_train[: STEP["limit_train"]], ds.y_train[: STEP["limit_train"]]
    xt, yt = ds.x_test[: STEP["limit_test"]], ds.y_test[: STEP["limit_test"]]
    rows = []
    for net in STEP_NETS:
        for tag, (method, step, rate) in STEP_VARIANTS.items():
            torch.manual_seed(0)
            plain = _fixture(net)
            model = ghlc.prepare(plain, (x[:2],)) if method == "ghl" else plain
            plastic = set(runtime_of(model).sites) if method == "ghl" else set()
            if method == "bp":  # the same groups: the convs the GHL run makes plastic
                plastic = {k for k, p in plain.named_parameters() if p.dim() == 4}
            model.to(device)
            t0 = time.perf_counter()
            if rate == "auto":
                rate, _ = auto_lr(
                    model, x, y, plastic=plastic, lr=5e-3, wd_plastic=5e-2, batch_size=64,
                    plastic_step=step,
                )  # fmt: skip
            print(f"[start] step-{net}-{tag}: lr_plastic {rate:.3g}", flush=True)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always", DivergenceWarning)
                try:
                    res = train(
                        model, x, y, xt, yt, plastic=plastic, epochs=STEP["epochs"],
                        batch_size=64, lr=5e-3, lr_plastic=float(rate), wd_plastic=5e-2,
                        out_dir=args.runs_dir / f"step-{net}-{tag}", progress=False,
                        plastic_step=step,
                    )  # fmt: skip
                    final = res.final
                except ghlc.GHLError as e:
                    final = {"train_loss": float("nan"), "test_loss": float("nan"),
                             "test_acc": float("nan")}  # fmt: skip
                    print(f"[failed] step-{net}-{tag}: {e}", flush=True)
            warned = any(issubclass(w.category, DivergenceWarning) for w in seen)
            rows.append(
                {**final, "net": net, "variant": tag, "lr_plastic": float(rate), "warned": warned,
                 "seconds": time.perf_counter() - t0}
            )  # fmt: skip
            print(f"[done] step-{net}-{tag}: {rows[-1]}", flush=True)
    return rows


def write_step_report(rows: list[dict[str, Any]], device: torch.device) -> None:
    """The ``step`` section of docs/ACCURACY.md."""
    sys.path.insert(0, str(ROOT / "bench"))
    from benchlib.machine import machine

    body = [
        "## Step size (`--step-size`)",
        "",
        f"Pre-activation ResNet-18 and SE-ResNet-18 (`tests/models/`, widths 64-512) on the "
        f"first {STEP['limit_train']} training and {STEP['limit_test']} test images of "
        f"`{STEP['data']}`, one epoch of {STEP['limit_train'] // 64} steps, seed 0; "
        "backprop layers at lr 5e-3, plastic weight decay 5e-2, batch 64 (the CLI's "
        "defaults). `lr_plastic` is the rate used (`auto`: picked by the range test). The "
        'train loss is the epoch\'s mean; chance is ln 10 = 2.30. "warned": the run gave '
        "the divergence warning (a loss above twice the first).",
        "",
        "| net | variant | lr_plastic | train loss | test loss | test acc | warned | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        body.append(
            f"| {r['net']} | {r['variant']} | {r['lr_plastic']:.3g} | {r['train_loss']:.3f} | "
            f"{r['test_loss']:.3f} | {100 * r['test_acc']:.1f}% | "
            f"{'yes' if r['warned'] else 'no'} | {r['seconds']:.0f} |"
        )
    body += ["", f"Measured on {machine(device.type)}, {time.strftime('%Y-%m-%d')}."]
    start, end = _section_markers("step")
    section = "\n".join([start, *body, end])
    text = MD_PATH.read_text()
    if start in text and end in text:
        a, rest = text.split(start, 1)
        text = a + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = MD_PATH.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(MD_PATH)
    print(f"wrote {MD_PATH.relative_to(ROOT)}")


# ---- command line ---------------------------------------------------------------------------


def _csv(kind):
    def parse(s: str):
        return [kind(v) for v in s.split(",") if v.strip()]

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs per run (default 100; --quick: {QUICK['epochs']})",
    )
    p.add_argument("--nets", type=_csv(str), default=None, help="fasthebb,deephebb")
    p.add_argument(
        "--methods",
        type=_csv(str),
        default=list(METHODS),
        help="ghl,bp,hebbian (also: sign, a diagnostic)",
    )
    p.add_argument("--seeds", type=_csv(int), default=None, help="default 0,1,2 (--quick: 0)")
    p.add_argument(
        "--ablations",
        type=_csv(str),
        default=None,
        help=f"FastHebb GHL ablations, comma-separated from {','.join(ABLATIONS)}; "
        "'none' for none (default: all; --quick: none)",
    )
    p.add_argument(
        "--ablation-epochs",
        type=int,
        default=None,
        help="epochs of the ablation runs (default: --epochs); when different, "
        "the runs get an -eN suffix and a 'paper' baseline row",
    )
    p.add_argument(
        "--ablation-seeds",
        type=_csv(int),
        default=None,
        help="seeds of the ablation runs (default: the first of --seeds)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="FastHebb only, 2000-image CIFAR slice, few epochs, lr 1e-2 for the "
        "backprop layers: checks the ordering ghl >~ bp > hebbian in ~10 min on 2 CPUs",
    )
    p.add_argument(
        "--sanity",
        action="store_true",
        help="FastHebb on MNIST and Fashion-MNIST subsets, 2 epochs on 2000 images",
    )
    p.add_argument(
        "--step-size",
        action="store_true",
        help="plastic step sizes on a pre-activation and an SE ResNet-18 (minutes)",
    )
    p.add_argument("--limit-train", type=int, default=None, help="use the first N train images")
    p.add_argument("--limit-test", type=int, default=None, help="use the first N test images")
    p.add_argument(
        "--data", default=None, help="a .npz in --data-dir, or a path (default cifar10-subset.npz)"
    )
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--lr", type=float, default=None, help="override the backprop-layer LR")
    p.add_argument("--lr-conv", type=float, default=None, help="override the conv LR")
    p.add_argument("--wd-conv", type=float, default=None, help="override the conv weight decay")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--augment", action="store_true", help="random crop + flip")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="where run folders go")
    p.add_argument("--report-only", action="store_true", help="only rewrite the docs")
    p.add_argument("--no-report", action="store_true", help="do not touch docs/")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--paper",
        action="store_true",
        help="the paper's protocol on all of CIFAR-10 instead (bench/paper.py; "
        "its options: --paper --help)",
    )
    args = p.parse_args(argv)

    if args.quick and args.sanity:
        p.error("--quick and --sanity are separate checks; pick one")
    if args.sanity:
        args.epochs = args.epochs or SANITY["epochs"]
        args.seeds = args.seeds if args.seeds is not None else SANITY["seeds"]
        args.limit_train = args.limit_train or SANITY["limit_train"]
        args.limit_test = args.limit_test or SANITY["limit_test"]
        args.lr = args.lr if args.lr is not None else SANITY["lr"]
        args.ablations = []
    q = args.quick
    args.epochs = args.epochs or (QUICK["epochs"] if q else 100)
    args.nets = args.nets or (["fasthebb"] if q else list(NETS))
    args.seeds = args.seeds if args.seeds is not None else (QUICK["seeds"] if q else [0, 1, 2])
    if args.ablations is None:
        args.ablations = [] if q else list(ABLATIONS)
    elif args.ablations == ["none"]:
        args.ablations = []
    args.ablation_seeds = args.ablation_seeds or args.seeds[:1]
    args.data = args.data or (QUICK["data"] if q else "cifar10-subset.npz")
    if q:
        args.limit_train = args.limit_train or QUICK["limit_train"]
        args.limit_test = args.limit_test or QUICK["limit_test"]
        args.lr = args.lr if args.lr is not None else QUICK["lr"]
    for what, vals, ok in (
        ("net", args.nets, NETS),
        ("method", args.methods, ALL_METHODS),
        ("ablation", args.ablations, ABLATIONS),
    ):
        bad = [v for v in vals if v not in ok]
        if bad:
            p.error(f"unknown {what} {', '.join(bad)} (choose from {', '.join(ok)})")
    if args.ablation_epochs is not None and args.ablation_epochs < 1:
        p.error("--ablation-epochs must be at least 1")
    if args.epochs < 1 or not args.seeds:
        p.error("need at least one epoch and one seed")
    return args


def main(argv=None) -> int:
    global RUNS_DIR
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--paper" in argv:  # the paper's protocol on all of CIFAR-10: bench/paper.py
        sys.path.insert(0, str(ROOT / "bench"))
        import paper

        return paper.main([a for a in argv if a != "--paper"])
    args = parse_args(argv)
    RUNS_DIR = args.runs_dir
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.step_size:
        rows = step_size_runs(args, device)
        if not args.no_report:
            write_step_report(rows, device)
        return 0
    specs = plan(args)
    if not specs:
        print("nothing to run")
        return 0
    t0 = time.perf_counter()
    if not args.report_only:
        for i, spec in enumerate(specs, 1):
            print(
                f"--- run {i}/{len(specs)} ({time.perf_counter() - t0:.0f} s elapsed)", flush=True
            )
            try:
                run_one(spec, args.data_dir, device, progress=not args.no_progress)
            except TrainingInterrupted as e:
                print(f"[interrupted] {spec.name}: {e}; rerun to resume", flush=True)
                return 130
            except ghlc.GHLError as e:  # diverged: keep going, the report shows the epochs
                print(f"[failed] {spec.name}: {e}", flush=True)
    names = [s.name for s in specs]
    if not (args.quick or args.sanity) and RUNS_DIR.is_dir():  # the full table: every run
        names += sorted(
            d.name
            for d in RUNS_DIR.iterdir()
            if d.is_dir()
            and d.name not in names
            and not d.name.startswith(("quick-", "sanity-", "probe", "paper-"))
        )
    runs = sorted(collect(names), key=_order)
    for r in runs:
        h = r["hist"][-1]
        print(
            f"{r['name']:40s} epoch {h['epoch']:3d}  test acc {100 * h['test_acc']:6.2f}%  "
            f"{h['seconds']:.1f} s/epoch"
        )
    if not args.no_report:
        write_report(
            runs, "quick" if args.quick else "sanity" if args.sanity else "full", args, device
        )
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
