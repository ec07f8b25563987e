"""Training loop: SGD with per-role settings, cosine schedule, metrics, checkpoints, resume.

The model comes built by the caller: a ghlc-prepared module (GHL or pure Hebbian) or a plain
one (backprop). ``plastic`` names the plastic parameters; they get their own SGD parameter
group (``lr_plastic``, ``wd_plastic``), everything else gets ``lr``/``wd``. The cosine schedule
spans all steps of the run. ``out_dir`` receives:

- ``metrics.jsonl``: one JSON object per epoch (epoch, train_loss, train_acc, test_loss,
  test_acc, lr, lr_plastic, seconds, images_per_s);
- ``curves.png``: loss and accuracy curves (when matplotlib is installed);
- ``last.pt`` / ``best.pt``: checkpoints (by test accuracy), written atomically and loadable
  with ``torch.load(weights_only=True)``.

A run stopped after epoch k (or interrupted during epoch k+1) and resumed with ``resume=True``
ends with weights bit-identical to an unbroken run with the same arguments.
"""

from __future__ import annotations

import io
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GHLError, SlowPrecisionWarning, first_line
from .fileio import write_atomic

CKPT_FORMAT = "ghlc-checkpoint"
CKPT_VERSION = 1
# On an accelerator the loss is checked for NaN/Inf every this many steps (and at the end of
# an epoch): reading it back every step would make the host wait for the device each step.
FINITE_CHECK_EVERY = 10


class TrainingDiverged(GHLError):
    """The loss (or a weight) became NaN/Inf; ``last.pt`` keeps the last good epoch."""


class TrainingInterrupted(GHLError):
    """Ctrl-C during training; ``last.pt`` holds the last completed epoch."""


@dataclass
class TrainResult:
    epochs_run: int  # epochs completed by the run in total (resumed ones included)
    final: dict[str, Any]  # metrics of the last completed epoch ({} if none)
    best_acc: float
    out_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)


# ---- helpers -------------------------------------------------------------------------------


def _as_tensors(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x)
    y = torch.as_tensor(y).long().reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise GHLError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
    return x, y


def check_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Labels must index the model's outputs: checked on one sample before any file is
    written (eval mode, no grad: no dropout draw, no BatchNorm update, no Hebbian work)."""
    if y.numel() == 0:
        return
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = _logits(model(x[:1].to(_device(model))))
    finally:
        model.train(was)
    _check_range(logits, y)


def _check_range(logits: torch.Tensor, y: torch.Tensor) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise GHLError(f"negative label {lo}")
    if logits.dim() >= 2 and hi >= logits.shape[1]:
        raise GHLError(f"label {hi} out of range: the model gives {logits.shape[1]} outputs "
                       f"(classes 0..{logits.shape[1] - 1})")


def _cpu_native_bf16() -> bool | None:
    """Whether oneDNN runs bfloat16 natively on this CPU (None: torch cannot tell)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def slow_bf16(dev: torch.device) -> str | None:
    """Why bfloat16 autocast on ``dev`` runs on slow fallback kernels, or None: on a CPU
    without native bfloat16 support (oneDNN needs AVX-512 BF16 or AMX) torch runs bfloat16
    convolutions and matrix products on its reference kernels (a FastHebb training step took
    about 14x its float32 time on an AVX2-only CPU)."""
    if dev.type != "cpu" or _cpu_native_bf16() in (True, None):  # None: unknown, no warning
        return None
    return ("bfloat16 autocast on this CPU runs on slow fallback kernels (no AVX-512 BF16 or "
            "AMX: torch has no native bfloat16 convolutions here), often over 10x slower than "
            "float32; train without autocast")


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise GHLError(f"the model must return a logits tensor, got {type(out).__name__}")


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _finite_check_every(dev: torch.device) -> int:
    """Steps between NaN/Inf checks of the loss: every step on CPU (reading a CPU tensor
    costs nothing), FINITE_CHECK_EVERY on an accelerator."""
    return 1 if dev.type == "cpu" else FINITE_CHECK_EVERY


def _cosine_lr(base: float, step: int, total: int) -> float:
    return base * (1 + math.cos(math.pi * step / total)) / 2


# ---- evaluation ----------------------------------------------------------------------------


def evaluate(model: nn.Module, x, y, batch_size: int = 256, classes=None) -> dict[str, Any]:
    """Mean cross-entropy, accuracy and per-class accuracy, in eval mode without gradients.

    ``per_class`` is keyed by class name (``classes[i]``) when ``classes`` is given (NaN for a
    class with no samples), else by the integer labels present in ``y``."""
    x, y = _as_tensors(x, y)
    dev = _device(model)
    was_training = model.training
    model.eval()
    n = y.shape[0]
    loss_sum, preds = 0.0, []
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                xb = x[i:i + batch_size].to(dev)
                yb = y[i:i + batch_size].to(dev)
                out = _logits(model(xb))
                if i == 0:
                    _check_range(out, y)
                loss_sum += float(F.cross_entropy(out.float(), yb, reduction="sum"))
                preds.append(out.argmax(1).cpu())
    finally:
        model.train(was_training)
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "per_class": {}}
    pred = torch.cat(preds)
    correct = pred == y
    per_class: dict[Any, float] = {}
    labels = range(len(classes)) if classes is not None else sorted(set(y.tolist()))
    for k in labels:
        m = y == k
        cnt = int(m.sum())
        acc = float(correct[m].float().mean()) if cnt else float("nan")
        per_class[classes[k] if classes is not None else int(k)] = acc
    return {"loss": loss_sum / n, "acc": float(correct.float().mean()), "per_class": per_class}


# ---- outputs -------------------------------------------------------------------------------


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(h) + "\n" for h in history)
    write_atomic(path, text)


def _plot(path: Path, history: list[dict[str, Any]]) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # plotting is optional
        return
    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.5))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.95, wspace=0.25)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(ep, [h["test_loss"] for h in history], "o-", label="test")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    ax2.plot(ep, [h["test_acc"] for h in history], "o-", label="test")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    write_atomic(path, buf.getvalue())


def _rng_state(dev: torch.device) -> dict[str, torch.Tensor]:
    s = {"torch_rng_state": torch.get_rng_state()}
    if dev.type == "cuda":
        s["cuda_rng_state"] = torch.cuda.get_rng_state(dev).cpu()
    return s


def _checkpoint(model, opt, sched, epoch, best_acc, history, dev, hparams) -> dict[str, Any]:
    return {
        "format": CKPT_FORMAT, "version": CKPT_VERSION,
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "epoch": epoch, "best_acc": best_acc,
        "history": history, "hparams": hparams, **_rng_state(dev),
    }


def _save(path: Path, ckpt: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    write_atomic(path, buf.getbuffer())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint safely (``weights_only``) and check its format marker."""
    path = Path(path)
    if not path.is_file():
        raise GHLError(f"{path}: no checkpoint to resume from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GHLError(f"{path}: not a ghlc checkpoint or damaged ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise GHLError(f"{path}: not a ghlc training checkpoint")
    if int(ckpt.get("version", 0)) > CKPT_VERSION:
        raise GHLError(f"{path}: checkpoint format version {ckpt['version']} is newer than this "
                       f"ghlc supports ({CKPT_VERSION}); upgrade ghlc")
    return ckpt


# ---- training ------------------------------------------------------------------------------


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch in channels-last format when asked and 4-D; else as it is."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def train(
    model: nn.Module,
    x_train,
    y_train,
    x_test,
    y_test,
    *,
    plastic: set[str],
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 5e-3,
    lr_plastic: float = 1e-2,
    wd_plastic: float = 5e-2,
    wd: float = 0.0,
    seed: int = 0,
    out_dir: str | Path,
    resume: bool = False,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    progress: bool = True,
    classes=None,
    autocast: torch.dtype | None = None,
    cuda_graph: bool = False,
    channels_last: bool = False,
) -> TrainResult:
    """Train ``model`` with cross-entropy and SGD (no momentum), cosine LR over all steps.

    Parameters named in ``plastic`` use ``lr_plastic``/``wd_plastic``, the rest ``lr``/``wd``.
    Epoch ``e`` (1-based) shuffles with a generator seeded ``seed*1000+e``; ``augment(x, g)``
    gets that generator too. A fresh run seeds torch's global RNG with ``seed`` (dropout) and
    writes an epoch-0 ``last.pt`` so any interruption can be resumed. ``autocast`` (say
    ``torch.bfloat16``) runs each training forward and loss under ``torch.autocast`` in that
    dtype (plastic layers: see ``GHLConfig(hebbian_precision=...)``); evaluation stays in the
    model's dtype. float16 needs loss scaling (``ghlc.GradScaler``), which this loop does not
    do, so it is refused. ``cuda_graph=True`` (CUDA only) captures the forward, loss and
    backward of a full batch in one CUDA graph and replays it every full-batch step
    (:func:`ghlc.cuda_graph_step` with ``optimizer_step=False``; the optimiser, the schedule
    and a smaller last batch run eagerly): the small-model speed-up of a captured step. The
    capture runs before anything is written; a model that cannot be captured raises
    ``GHLError``. ``channels_last=True`` converts the model's 4-D weights and every 4-D
    training batch to channels-last memory format (often the faster layout for convolutions;
    docs/PERFORMANCE.md).

    Raises ``GHLError`` before writing anything when a label is negative or not below the
    model's number of outputs (:func:`check_labels`), ``TrainingDiverged`` on a NaN/Inf loss
    (checked every step on CPU, every ``FINITE_CHECK_EVERY`` steps on an accelerator) or
    weight (``last.pt`` keeps the last good epoch) and ``TrainingInterrupted`` on Ctrl-C
    (``last.pt`` keeps the last completed epoch).
    """
    if epochs < 1:
        raise GHLError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise GHLError(f"batch_size must be >= 1, got {batch_size}")
    if autocast is not None and autocast != torch.bfloat16:
        raise GHLError(f"autocast {autocast} is not supported here: use torch.bfloat16")
    x_train, y_train = _as_tensors(x_train, y_train)
    if x_test is None:
        x_test, y_test = x_train[:0], y_train[:0]
    x_test, y_test = _as_tensors(x_test, y_test)
    n = y_train.shape[0]
    if n == 0:
        raise GHLError("the training set is empty")
    check_labels(model, x_train, torch.cat([y_train, y_test]))
    out = Path(out_dir)
    last_path, best_path = out / "last.pt", out / "best.pt"
    metrics_path, plot_path = out / "metrics.jsonl", out / "curves.png"

    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    unknown = set(plastic) - {k for k, _ in model.named_parameters()}
    if unknown:
        raise GHLError(f"plastic parameters not in the model: {', '.join(sorted(unknown))}")
    bp_params = [p for k, p in named if k not in plastic]
    pl_params = [p for k, p in named if k in plastic]
    opt = torch.optim.SGD([
        {"params": bp_params, "lr": lr, "weight_decay": wd, "role": "backprop"},
        {"params": pl_params, "lr": lr_plastic, "weight_decay": wd_plastic, "role": "plastic"},
    ], lr=lr, momentum=0.0)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    dev = _device(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if autocast is not None and (why := slow_bf16(dev)):
        warnings.warn(why, SlowPrecisionWarning, stacklevel=2)
    hparams = {"batch_size": batch_size, "seed": seed, "epochs": epochs, "lr": lr,
               "lr_plastic": lr_plastic, "wd": wd, "wd_plastic": wd_plastic,
               "autocast": str(autocast).removeprefix("torch.") if autocast else None,
               "cuda_graph": cuda_graph, "channels_last": channels_last}
    # (a missing or foreign checkpoint fails before the capture)
    ckpt = load_checkpoint(last_path) if resume else None
    graph_step, graph_logits = None, []
    if cuda_graph and n >= batch_size:
        def graph_loss(out, target):
            graph_logits[:] = [_logits(out)]
            return F.cross_entropy(graph_logits[0], target)

        model.train()
        graph_step = _capture(model, opt, graph_loss,
                              _layout(x_train[:batch_size].to(dev), channels_last),
                              y_train[:batch_size].to(dev), autocast)
    out.mkdir(parents=True, exist_ok=True)

    history: list[dict[str, Any]] = []
    best_acc = float("-inf")
    start_epoch = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            msg = first_line(e) or type(e).__name__
            raise GHLError(f"{last_path}: does not match this model/run: {msg}") from None
        start_epoch = int(ckpt["epoch"])
        best_acc = float(ckpt["best_acc"])
        history = [dict(h) for h in ckpt.get("history", [])][:start_epoch]
        torch.set_rng_state(ckpt["torch_rng_state"])
        if dev.type == "cuda" and "cuda_rng_state" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng_state"], dev)
        if sched.T_max != total_steps:  # a longer/shorter run: re-plan the rest of the cosine
            sched.T_max = total_steps
            t = min(sched.last_epoch, total_steps)
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(g["initial_lr"], t, total_steps)
            sched._last_lr = [g["lr"] for g in opt.param_groups]
        _write_metrics(metrics_path, history)
    else:
        torch.manual_seed(seed)
        ckpt = _checkpoint(model, opt, sched, 0, best_acc, history, dev, hparams)
        _save(last_path, ckpt)
        _write_metrics(metrics_path, history)
        for stale in (best_path, plot_path):
            stale.unlink(missing_ok=True)

    model.train()
    epoch, step = start_epoch + 1, 0
    try:
        for epoch in range(start_epoch + 1, epochs + 1):
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(seed * 1000 + epoch)
            perm = torch.randperm(n, generator=g)
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            seen = 0
            nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
            every = _finite_check_every(dev)
            lrs = [gr["lr"] for gr in opt.param_groups]
            bar = _bar(progress, steps_per_epoch, f"epoch {epoch}/{epochs}")
            try:
                for step in range(1, steps_per_epoch + 1):
                    idx = perm[(step - 1) * batch_size:step * batch_size]
                    xb = x_train[idx]
                    if augment is not None:
                        xb = augment(xb, g)
                    xb = _layout(xb.to(dev, non_blocking=True), channels_last)
                    yb = y_train[idx].to(dev, non_blocking=True)
                    replay = graph_step is not None and yb.shape[0] == batch_size
                    if replay:  # forward, loss and backward in one graph replay
                        loss = graph_step(xb, target=yb)
                        logits = graph_logits[0]
                    else:
                        opt.zero_grad(set_to_none=True)  # also resets the Hebbian accumulators
                        with torch.autocast(dev.type, dtype=autocast or torch.bfloat16,
                                            enabled=autocast is not None):
                            logits = _logits(model(xb))
                            loss = F.cross_entropy(logits, yb)
                    nonfinite |= ~torch.isfinite(loss.detach())
                    if (step % every == 0 or step == steps_per_epoch) and bool(nonfinite):
                        when = f"step {step}" if every == 1 else (
                            f"step {step} (or up to {every - 1} steps before it; checked every "
                            f"{every} steps)")
                        raise TrainingDiverged(
                            f"training diverged at epoch {epoch} {when}: the loss is not "
                            f"finite; {last_path.name} keeps epoch {epoch - 1}")
                    if not replay:
                        loss.backward()
                    lrs = [gr["lr"] for gr in opt.param_groups]
                    opt.step()
                    sched.step()
                    b = yb.shape[0]
                    seen += b
                    loss_sum += loss.detach().double() * b
                    correct += (logits.detach().argmax(1) == yb).sum()
                    if bar is not None:
                        bar.update(1)
                        if step % 10 == 0 or step == steps_per_epoch:
                            el = time.perf_counter() - t0
                            bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}",
                                            acc=f"{int(correct) / seen:.4f}",
                                            img_s=f"{seen / max(el, 1e-9):.0f}", refresh=False)
            finally:
                if bar is not None:
                    bar.close()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            train_s = time.perf_counter() - t0
            if not _finite(model):
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch} step {step}: weights are not finite; "
                    f"{last_path.name} keeps epoch {epoch - 1}")
            ev = evaluate(model, x_test, y_test, classes=classes)
            model.train()
            rec = {
                "epoch": epoch, "train_loss": float(loss_sum) / seen,
                "train_acc": int(correct) / seen, "test_loss": ev["loss"], "test_acc": ev["acc"],
                "lr": lrs[0], "lr_plastic": lrs[1],
                "seconds": time.perf_counter() - t0, "images_per_s": seen / max(train_s, 1e-9),
            }
            history.append(rec)
            improved = ev["acc"] > best_acc  # False for NaN (no test set)
            if improved:
                best_acc = ev["acc"]
            ckpt = _checkpoint(model, opt, sched, epoch, best_acc, history, dev, hparams)
            _save(last_path, ckpt)
            if improved:
                _save(best_path, ckpt)
            _write_metrics(metrics_path, history)
            _plot(plot_path, history)
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            f"interrupted at epoch {epoch} step {step}; resume with --resume") from None

    return TrainResult(
        epochs_run=len(history), final=dict(history[-1]) if history else {},
        best_acc=best_acc if math.isfinite(best_acc) else float("nan"), out_dir=out,
        history=history,
    )


def _capture(model: nn.Module, opt: torch.optim.Optimizer,
             loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], x: torch.Tensor,
             y: torch.Tensor, autocast: torch.dtype | None) -> Callable[..., torch.Tensor]:
    """The training step of one full batch captured in a CUDA graph (forward, loss, backward;
    the optimiser steps eagerly): ``step(x, target=y) -> loss``."""
    from .cudagraph import cuda_graph_step

    if x.device.type != "cuda":
        raise GHLError(f"cuda_graph needs the model on a CUDA device (it is on {x.device})")

    return cuda_graph_step(model, opt, loss_fn, (x,), y, optimizer_step=False,
                           autocast=autocast)


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=True, dynamic_ncols=True)
