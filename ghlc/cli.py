"""ghlc command line: convert, inspect, train, eval, export."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tomllib
import warnings
from functools import wraps
from pathlib import Path

import click

from .errors import GHLError, GHLWarning, SlowPrecisionWarning
from .launch import rank_errors, relaunch


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


def user_errors(fn):
    """Turn ghlc errors into one-line messages and a non-zero exit, never a traceback."""

    @wraps(fn)
    def wrapper(*a, **k):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return fn(*a, **k)
        except GHLError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted")
        except BrokenPipeError:  # stdout closed early (`ghlc eval ... | head`): stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)
        except OSError as e:
            name = getattr(e, "filename", None)
            _fail(f"{name}: {e.strerror or e}" if name else str(e.strerror or e))

    return wrapper


_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """ghlc's own warnings as one line (``warning: ...``); others as Python shows them."""
    if issubclass(category, GHLWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _showwarning(message, category, filename, lineno, file, line)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise GHLError(f"--input-shape {text!r}: expected comma-separated integers") from None
    if not dims or any(d <= 0 for d in dims):
        raise GHLError(f"--input-shape {text!r}: dimensions must be positive")
    return dims


def _config(path: str | None):
    from .config import GHLConfig

    if path is None:
        return GHLConfig()
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise GHLError(f"{path}: invalid TOML: {e}") from None
    d = d.get("ghlc", d)
    if "model" in d:  # a recipe (ghlc/recipe.py): its [ghl] table
        d = d.get("ghl", {})
    return GHLConfig.from_dict(d)


def layer_table(lg) -> str:
    from .report import capture_line

    rows = [("layer", "kind", "output shape", "role", "temperature")]
    for i in lg.layers():
        role = {"plastic": "GHL", "backprop": "backprop", "frozen": "frozen"}[i.role.value]
        t = f"{lg.rule(i.name).temperature:g}" if i.role.value == "plastic" else "-"
        rows.append((i.module or i.name, i.kind, "x".join(map(str, i.out_shape)), role, t))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_p = len(lg.plastic())
    lines.append(f"{n_p} of {len(lg.layers())} layers plastic (GHL); {capture_line(lg)}")
    return "\n".join(lines)


@click.group()
@click.version_option(package_name="ghlc")
def main() -> None:
    """ghlc: train any PyTorch model with Global-guided Hebbian Learning."""


@main.command()
@click.argument("model_file", type=click.Path())
@click.option("--entry", help="Name of the factory, instance or class when several exist.")
@click.option(
    "--input-shape",
    help="Example input shape, e.g. 1,3,32,32 (default: the file's "
    "example_inputs(), else 1,3,32,32).",
)
@click.option("--config", "config_path", type=click.Path(), help="GHLConfig as TOML.")
@click.option("-o", "--output", type=click.Path(), help="Artifact path (default MODEL.ghl).")
@click.option("--explain", is_flag=True, help="List every layer not made plastic and why.")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    help="Seeds torch before the model file is imported (initial weights).",
)
@user_errors
def convert(model_file, entry, input_shape, config_path, output, explain, seed):
    """Trace MODEL_FILE (.py, .onnx, or a recipe .toml), make its layers Hebbian, and write
    a .ghl artifact."""
    import torch

    from .recipe import convert_params, is_recipe

    if is_recipe(model_file):
        ctx = click.get_current_context()
        return ctx.invoke(convert, **convert_params(ctx, model_file))

    from .artifact import save
    from .build import trace_and_build
    from .errors import TraceError
    from .inputs import split_inputs
    from .modelfile import load_model_file
    from .onnx_in import is_onnx_path, onnx_source
    from .report import capture_reasons, output_note

    cfg = _config(config_path)
    torch.manual_seed(seed)  # the same file converts to the same initial weights
    inputs: tuple | dict = (torch.randn(1, 3, 32, 32),)
    if is_onnx_path(model_file):  # ONNX in (ghlc/onnx_in.py): the weights are the file's
        onnx_in, inputs, source = onnx_source(model_file, input_shape and _shape(input_shape))
        model = onnx_in.model
    else:
        loaded = load_model_file(model_file, entry)
        if input_shape:
            inputs = (torch.randn(*_shape(input_shape)),)
        elif loaded.example_inputs is not None:
            inputs = loaded.example_inputs
        model, source = loaded.model, loaded.source()
    try:  # what ghlc.prepare runs, recording the model file for ghlc.load
        m, lg = trace_and_build(model, inputs, cfg, inplace=True, source=source)
    except TraceError as e:
        args, kwargs = split_inputs(inputs)
        ts = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
        shapes = ", ".join("x".join(map(str, x.shape)) for x in ts)
        raise GHLError(f"{e} (input shape {shapes}; set it with --input-shape)") from None
    out = Path(output) if output else Path(model_file).with_suffix(".ghl")
    save(m, out)
    click.echo(layer_table(lg))
    args, kwargs = split_inputs(inputs)
    try:  # how ghlc train will read the output (eval mode: the user's model, untouched)
        with torch.no_grad():
            note = output_note(m.eval()(*args, **kwargs))
    except Exception:  # noqa: BLE001 - only a note: a model that fails here fails in training
        note = None
    finally:
        m.train()
    if note:
        click.echo(f"note: {note}")
    if not lg.plastic():
        click.echo(
            "warning: no layer is plastic, so training this artifact is plain backprop "
            "(--explain says why for each layer)",
            err=True,
        )
    if explain and lg.capture_errors:
        click.echo("\nwhy the earlier captures did not apply:")
        for line in capture_reasons(lg):
            click.echo(f"  {line}")
    if explain:
        click.echo("\nnot plastic:")
        for i in lg.layers():
            if i.role.value != "plastic":
                click.echo(f"  {i.module or i.name}: {i.reason}")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("artifact", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "dot", "svg"]),
    default="text",
    show_default=True,
)
@click.option("-o", "--output", type=click.Path(), help="Write to a file instead of stdout.")
@user_errors
def inspect(artifact, fmt, output):
    """Show the layer graph of ARTIFACT with its Hebbian nodes and global-sign edges."""
    from .artifact import read_meta
    from .fileio import write_atomic
    from .serialize import graph_to_json

    lg = read_meta(artifact)["graph"]
    if fmt == "text":
        text = layer_table(lg) + "\n\n" + lg.to_text()
    elif fmt == "json":
        text = json.dumps(json.loads(graph_to_json(lg)), indent=2) + "\n"
    else:
        text = lg.to_dot()
        if fmt == "svg":
            if shutil.which("dot") is None:
                raise GHLError("--format svg needs Graphviz's `dot` on PATH; use --format dot")
            text = subprocess.run(
                ["dot", "-Tsvg"], input=text, capture_output=True, text=True, check=True
            ).stdout
    if output:
        write_atomic(output, text)
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)


class _Rate(click.ParamType):
    """A learning rate: a finite number >= 0, or "auto" (None)."""

    name = "rate"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        if str(value).strip().lower() == "auto":
            return None
        try:
            v = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or auto", param, ctx)
        if not (0 <= v < float("inf")):
            self.fail(f"{value!r} is not a finite number >= 0", param, ctx)
        return v


def _one_line_warning(message, category, *args, **kwargs) -> None:
    """A warning during training as one line on stderr."""
    click.echo(f"warning: {message}", err=True)


def _pick_device(name: str):
    """The torch device for ``--device``: auto (CUDA when available), cpu, cuda or cuda:N."""
    import torch

    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        idx = name.partition(":")[2]
        if idx and not idx.isdigit():
            raise GHLError(f"--device {name!r}: expected cuda or cuda:N")
        if not torch.cuda.is_available():
            raise GHLError(
                f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False)"
            )
        n = torch.cuda.device_count()
        if idx and int(idx) >= n:
            raise GHLError(f"--device {name}: there are {n} CUDA device(s)")
        return torch.device(name)
    raise GHLError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


_model_file = click.option(
    "--model-file",
    type=click.Path(),
    help="Rebuild the model from this file (its structure must match the artifact's) "
    "instead of the source the artifact records.",
)


def _image_shape(meta, command: str) -> tuple[int, ...]:
    """The (C, H, W) input of an image classifier, or a one-line error saying what ghlc
    ``command`` takes."""
    from .inputs import image_input

    def one(i: int, s: dict) -> str:
        what = f" {'x'.join(map(str, s['shape']))} {s['dtype']}" if "shape" in s else ""
        return s.get("name", f"input #{i}") + what

    shape = image_input(meta["inputs"])
    if shape is None:
        took = ", ".join(one(i, s) for i, s in enumerate(meta["inputs"]))
        raise GHLError(
            f"ghlc {command} works on image classifiers that take one float image batch "
            f"(N, C, H, W); this model takes {took}: use the Python API (ghlc.prepare and "
            "your own loop)"
        )
    return shape


def _load_any(path: str, method: str = "ghl", model_file: str | None = None):
    """A .ghl artifact, or a training checkpoint (.pt) beside its run's model.ghl; the model
    rebuilt from ``model_file`` when given (else from the artifact's recorded source)."""
    import torch

    from .artifact import load, read_meta

    p = Path(path)
    if p.suffix == ".pt":
        art = p.parent / "model.ghl"
        if not art.is_file():
            raise GHLError(f"{p}: no model.ghl beside this checkpoint")
        m = load(art, method=method, model_file=model_file)
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
            m.load_state_dict(ckpt["model"])
        except Exception as e:
            raise GHLError(f"{p}: not a ghlc checkpoint or damaged ({type(e).__name__})") from None
        return m, read_meta(art)
    return load(p, method=method, model_file=model_file), read_meta(p)


def _normalisation(meta, path: str):
    """The input normalisation the artifact's training recorded, or None."""
    from .normalisation import Normalisation

    rec = meta["extra"].get("normalisation")
    if rec is None:
        return None
    try:
        return Normalisation.from_dict(rec)
    except GHLError as e:
        raise GHLError(f"{path}: {e}") from None


@main.command()
@click.argument("artifact", type=click.Path())
@click.option(
    "--data",
    default="digits",
    show_default=True,
    help="digits | cifar10-jpeg | FILE.npz | cifar10:DIR | cifar100:DIR",
)
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--lr",
    default=5e-3,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="LR of backprop layers.",
)
@click.option(
    "--lr-plastic",
    default="auto",
    show_default=True,
    type=_Rate(),
    help="LR of plastic layers; auto: a short range test picks it (at most 1e-2; see "
    "docs/ACCURACY.md, 'Step size').",
)
@click.option(
    "--wd-plastic",
    default=5e-2,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Weight decay of plastic layers.",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--method",
    type=click.Choice(["ghl", "bp", "hebbian"]),
    default="ghl",
    show_default=True,
    help="ghl; bp = plain backprop; hebbian = global signal off.",
)
@click.option("--augment/--no-augment", default=False, help="Random crop + flip.")
@click.option("--out", "out_dir", type=click.Path(), default="runs/latest", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt.")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when available) | cpu | cuda | cuda:N.",
)
@click.option(
    "--autocast",
    type=click.Choice(["off", "bf16"]),
    default="off",
    show_default=True,
    help="Run the training forward under torch.autocast in bfloat16 (see the "
    "artifact's hebbian_precision for the plastic layers).",
)
@click.option(
    "--cuda-graph",
    is_flag=True,
    help="CUDA: replay each full batch's forward and backward from one captured "
    "CUDA graph (faster for small models).",
)
@click.option(
    "--channels-last",
    is_flag=True,
    help="Train in channels-last memory format (4-D weights and batches): often "
    "faster for conv nets.",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    help="Train in N processes started by torch's launcher (one per GPU; --batch-size "
    "is the global batch). Under torchrun, leave it out.",
)
@click.option(
    "--backend",
    type=click.Choice(["gloo", "nccl"]),
    help="Process group backend for several processes (default: nccl on CUDA, gloo on CPU).",
)
@click.option(
    "--plastic-step",
    type=click.Choice(["paper", "rms"]),
    default="paper",
    show_default=True,
    help="rms: scale each plastic layer's step by its weight RMS (then --lr-plastic is a "
    "relative step; docs/ACCURACY.md, 'Step size').",
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    help="Stop after N SGD steps (the cosine schedule spans them): a smoke run.",
)
@click.option(
    "--eval-batches",
    type=click.IntRange(min=1),
    help="Score only the first N test batches (of --batch-size images) after each epoch.",
)
@_model_file
@user_errors
@rank_errors
def train(
    artifact,
    data,
    epochs,
    batch_size,
    lr,
    lr_plastic,
    wd_plastic,
    seed,
    method,
    augment,
    out_dir,
    resume,
    device,
    autocast,
    cuda_graph,
    channels_last,
    nproc_per_node,
    backend,
    model_file,
    plastic_step,
    max_steps,
    eval_batches,
):
    """Train ARTIFACT (or a recipe .toml) on DATA with SGD, a cosine schedule and per-role
    settings."""
    from .recipe import is_recipe, train_params

    if is_recipe(artifact):  # (before relaunching: the processes train the converted artifact)
        ctx = click.get_current_context()
        return ctx.invoke(train, **train_params(ctx, artifact, convert))
    if nproc_per_node is not None:
        return relaunch(nproc_per_node)
    import torch

    from .artifact import save
    from .data import augment_batch, load_data
    from .normalisation import Normalisation
    from .ranks import join
    from .train import TrainConfig, check_labels, slow_bf16

    ranks = join(backend, _pick_device(device))
    dev = ranks.device
    if cuda_graph and dev.type != "cuda":
        raise GHLError(f"--cuda-graph needs a CUDA device (training would run on {dev})")
    torch.manual_seed(seed)
    model, meta = _load_any(artifact, method="ghl", model_file=model_file)
    plastic = {i.name for i in meta["graph"].plastic()}
    shape = _image_shape(meta, "train")
    ds = load_data(data, shape, augment=augment)
    check_labels(model, ds.x_train, torch.cat([ds.y_train, ds.y_test]))  # before any file
    out = Path(out_dir)
    auto = lr_plastic  # None: auto
    if auto is None and resume:  # the resumed run's own rate (its checkpoint says which)
        from .train import load_checkpoint

        lr_plastic = float(load_checkpoint(out / "last.pt")["hparams"]["lr_plastic"])
    elif auto is None and plastic:
        lr_plastic = None  # chosen below, on the model to train
    elif auto is None:
        lr_plastic = 1e-2  # (no plastic layer: the rate is not used)
    else:
        lr_plastic = auto
    norm = Normalisation(ds.mean, ds.std)
    extra = {"classes": ds.classes, "data": data, "normalisation": norm.to_dict()}
    # bp keeps the same per-role settings, so that only the rule differs between methods
    config = TrainConfig(
        out_dir=out,
        plastic=plastic,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_plastic=lr_plastic if lr_plastic is not None else 0.0,
        wd_plastic=wd_plastic,
        seed=seed,
        resume=resume,
        augment=augment_batch if augment else None,
        classes=ds.classes,
        autocast=torch.bfloat16 if autocast == "bf16" else None,
        cuda_graph=cuda_graph,
        channels_last=channels_last,
        progress=ranks.main,
        max_steps=max_steps,
        eval_batches=eval_batches,
        normalisation=norm,
        plastic_step=plastic_step,
    )
    ranks.check(config)
    out.mkdir(parents=True, exist_ok=True)
    if ranks.main:  # (with several processes only rank 0 prints and writes)
        save(model, out / "model.ghl", extra=extra)
    ranks.barrier()
    net = _load_any(str(out / "model.ghl"), method=method)[0].to(dev)
    ranks.barrier()  # (every process has read it before rank 0 writes it again)
    if lr_plastic is None:  # (picked on rank 0 and shared: the processes train alike)
        from .lrfind import auto_lr

        found = None
        if ranks.main:
            lr_plastic, found = auto_lr(
                net, ds.x_train, ds.y_train, plastic=plastic, lr=lr, wd_plastic=wd_plastic,
                batch_size=batch_size, plastic_step=plastic_step, seed=seed,
            )  # fmt: skip
            click.echo(
                f"--lr-plastic auto: {lr_plastic:.3g} (range test over {len(found.lrs)} "
                f"steps suggests {found.suggestion:.3g}; give --lr-plastic to skip it)"
            )
        lr_plastic = ranks.share(lr_plastic)
        config = dataclasses.replace(config, lr_plastic=lr_plastic)
    if ranks.main:
        many = f", {ranks.world} processes ({ranks.backend})" if ranks.world > 1 else ""
        click.echo(f"training on {dev}{many}")
    if ranks.main and autocast == "bf16" and (why := slow_bf16(dev)):
        click.echo(f"warning: {why}", err=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPrecisionWarning)  # (said above, once)
        warnings.showwarning = _one_line_warning  # (restored on leaving the block)
        res = ranks.trainer(net, config).fit(ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    if not ranks.main:
        return
    trained = model
    trained.load_state_dict(net.state_dict())
    save(trained, out / "model.ghl", extra=extra)
    f = res.final
    click.echo(
        f"epochs {res.epochs_run}: test acc {f.get('test_acc', float('nan')):.4f}, "
        f"best {res.best_acc:.4f}; checkpoints in {out}"
    )


@main.command("lr-find")
@click.argument("artifact", type=click.Path())
@click.option("--data", default="digits", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=5e-3, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--wd-plastic", default=5e-2, show_default=True, type=click.FloatRange(min=0.0))
@click.option(
    "--plastic-step", type=click.Choice(["paper", "rms"]), default="paper", show_default=True
)
@click.option("--start", default=1e-5, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--end", default=1.0, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=2))
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("-o", "--output", type=click.Path(), help="Write the sweep as JSON.")
@user_errors
def lr_find_cmd(
    artifact, data, batch_size, lr, wd_plastic, plastic_step, start, end, steps, seed, device,
    output,
):  # fmt: skip
    """Range test of the plastic learning rate: a short sweep, its loss curve, a suggestion."""
    import torch

    from .data import load_data
    from .fileio import write_atomic
    from .lrfind import lr_find, report, to_json

    dev = _pick_device(device)
    torch.manual_seed(seed)
    model, meta = _load_any(artifact, method="ghl")
    plastic = {i.name for i in meta["graph"].plastic()}
    ds = load_data(data, tuple(meta["inputs"][0]["shape"][1:]))
    res = lr_find(
        model.to(dev), ds.x_train, ds.y_train, plastic=plastic, lr=lr, wd_plastic=wd_plastic,
        batch_size=batch_size, start=start, end=end, steps=steps, plastic_step=plastic_step,
        seed=seed,
    )  # fmt: skip
    click.echo(report(res))
    if output:
        write_atomic(output, to_json(res) + "\n")
        click.echo(f"wrote {output}")


@main.command("eval")
@click.argument("model_path", type=click.Path())
@click.option("--data", default="digits", show_default=True)
@click.option(
    "--batches", type=click.IntRange(min=1), help="Score only the first N batches of 256 images."
)
@_model_file
@user_errors
def eval_cmd(model_path, data, batches, model_file):
    """Score a .ghl artifact or a checkpoint: loss, accuracy, per-class accuracy."""
    from .data import load_data
    from .train import evaluate

    model, meta = _load_any(model_path, model_file=model_file)
    norm = _normalisation(meta, model_path)  # the model's own, where training recorded it
    stats = None if norm is None else (norm.mean, norm.std)
    ds = load_data(data, _image_shape(meta, "eval"), normalisation=stats)
    r = evaluate(model, ds.x_test, ds.y_test, classes=ds.classes, max_batches=batches)
    click.echo(f"loss {r['loss']:.4f}  accuracy {r['acc']:.4f}")
    for c, a in r["per_class"].items():
        click.echo(f"  {c}: {a:.4f}")


@main.command()
@click.argument("model_path", type=click.Path())
@click.option("-o", "--output", type=click.Path(), required=True)
@click.option("--opset", type=int, default=None)
@click.option("--dynamic-batch/--static", default=True, show_default=True)
@click.option(
    "--include-normalisation",
    is_flag=True,
    help="Put the training's input normalisation, (x - mean) / std, into the graph: the "
    "ONNX model then takes raw inputs.",
)
@_model_file
@user_errors
def export(model_path, output, opset, dynamic_batch, include_normalisation, model_file):
    """Write the inference graph as ONNX and check it against onnxruntime."""
    from .artifact import make_inputs
    from .export import export_onnx
    from .normalisation import Normalised
    from .version import __version__

    model, meta = _load_any(model_path, model_file=model_file)
    if any("name" in s for s in meta["inputs"]):
        raise GHLError(
            "ghlc export takes models with positional inputs only; this one takes keyword "
            "inputs: export it from Python with torch.onnx.export"
        )
    norm = _normalisation(meta, model_path)
    if include_normalisation and norm is None:
        raise GHLError(
            f"{model_path}: records no input normalisation (only ghlc train records one); "
            "export without --include-normalisation"
        )
    classes = meta["extra"].get("classes") or []
    md = {
        "ghlc_version": __version__,
        "source_sha256": meta["source"].get("sha256", ""),
        "classes": ",".join(map(str, classes)),
    }
    if norm is not None:
        md.update(norm.metadata(in_graph=include_normalisation))
    inputs = make_inputs(meta["inputs"])
    if include_normalisation:
        model = Normalised(model, norm, ndim=inputs[0].dim())
    rep = export_onnx(
        model,
        output,
        inputs,
        opset=opset,
        dynamic_batch=dynamic_batch,
        metadata=md,
    )
    click.echo(
        f"wrote {output}: onnxruntime max abs diff {rep.max_abs_diff:.3g} "
        f"(output scale {rep.scale:.3g})"
    )


if __name__ == "__main__":
    main()
