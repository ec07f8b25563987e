"""Training loop: SGD with per-role settings, cosine schedule, metrics, checkpoints, resume.

``Trainer(model, TrainConfig(...)).fit(x_train, y_train, x_test, y_test)`` runs one phase per
method (setup, start or resume, run_epoch, evaluate, checkpoint); :func:`train` is the same run
in one call. The model comes built by the caller: a ghlc-prepared module (GHL or pure Hebbian)
or a plain one (backprop). ``plastic`` names the plastic parameters; they get their own SGD
parameter group (``lr_plastic``, ``wd_plastic``), everything else gets ``lr``/``wd``. The
cosine schedule spans all steps of the run. ``out_dir`` receives:

- ``metrics.jsonl``: one JSON object per epoch (epoch, train_loss, train_acc, test_loss,
  test_acc, lr, lr_plastic, seconds, images_per_s);
- ``curves.png``: loss and accuracy curves (when matplotlib is installed);
- ``last.pt`` / ``best.pt``: checkpoints (by test accuracy), written atomically and loadable
  with ``torch.load(weights_only=True)``; with ``normalisation`` set, each records the inputs'
  per-channel mean and std (``normalisation``: ``{"mean": [...], "std": [...]}``).

A run stopped after epoch k (or interrupted during epoch k+1) and resumed with ``resume=True``
ends with weights bit-identical to an unbroken run with the same arguments."""

from __future__ import annotations

import io
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GHLError, SlowPrecisionWarning, first_line
from .fileio import write_atomic
from .logits import logits as _logits
from .lrfind import scale_by_rms_
from .normalisation import Normalisation
from .trainconfig import Augment, TrainConfig

CKPT_FORMAT = "ghlc-checkpoint"
CKPT_VERSION = 1
# On an accelerator the loss is checked for NaN/Inf every this many steps (and at the end of
# an epoch): reading it back every step would make the host wait for the device each step.
FINITE_CHECK_EVERY = 10


class TrainingDiverged(GHLError):
    """The loss (or a weight) became NaN/Inf; ``last.pt`` keeps the last good epoch."""


class DivergenceWarning(UserWarning):
    """The training loss rose far above where it started: the run is likely diverging."""


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
        raise GHLError(
            f"label {hi} out of range: the model gives {logits.shape[1]} outputs "
            f"(classes 0..{logits.shape[1] - 1})"
        )


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
    return (
        "bfloat16 autocast on this CPU runs on slow fallback kernels (no AVX-512 BF16 or "
        "AMX: torch has no native bfloat16 convolutions here), often over 10x slower than "
        "float32; train without autocast"
    )


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _finite_check_every(dev: torch.device) -> int:
    """Steps between NaN/Inf checks of the loss: every step on CPU (reading a CPU tensor
    costs nothing), FINITE_CHECK_EVERY on an accelerator."""
    return 1 if dev.type == "cpu" else FINITE_CHECK_EVERY


def _cosine_lr(base: float, step: int, total: int) -> float:
    return base * (1 + math.cos(math.pi * step / total)) / 2


# ---- evaluation ----------------------------------------------------------------------------


def evaluate(
    model: nn.Module,
    x,
    y,
    batch_size: int = 256,
    classes=None,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Mean cross-entropy, accuracy and per-class accuracy, in eval mode without gradients.

    ``per_class`` is keyed by class name (``classes[i]``) when ``classes`` is given (NaN for a
    class with no samples), else by the integer labels present in ``y``. ``max_batches``
    scores only the first that many batches (a smoke run's quick look)."""
    x, y = _as_tensors(x, y)
    if max_batches is not None:
        x, y = x[: max_batches * batch_size], y[: max_batches * batch_size]
    dev = _device(model)
    was_training = model.training
    model.eval()
    n = y.shape[0]
    loss_sum, preds = 0.0, []
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                xb = x[i : i + batch_size].to(dev)
                yb = y[i : i + batch_size].to(dev)
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
        "format": CKPT_FORMAT,
        "version": CKPT_VERSION,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "best_acc": best_acc,
        "history": history,
        "hparams": hparams,
        **_rng_state(dev),
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
        raise GHLError(
            f"{path}: checkpoint format version {ckpt['version']} is newer than this "
            f"ghlc supports ({CKPT_VERSION}); upgrade ghlc"
        )
    return ckpt


# ---- training ------------------------------------------------------------------------------


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch in channels-last format when asked and 4-D; else as it is."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass
class _EpochStats:
    """Running totals of one training epoch, kept on the device until the epoch ends."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    nonfinite: torch.Tensor
    seen: int = 0
    lrs: list[float] = field(default_factory=list)  # the LRs of the epoch's last step

    @classmethod
    def zeros(cls, dev: torch.device, lrs: list[float]) -> _EpochStats:
        return cls(
            torch.zeros((), dtype=torch.float64, device=dev),
            torch.zeros((), dtype=torch.int64, device=dev),
            torch.zeros((), dtype=torch.bool, device=dev),
            0,
            lrs,
        )


class Trainer:
    """One training run of ``model`` under ``config``, one method per phase.

    :meth:`fit` runs :meth:`setup` (data, optimiser split by role, cosine schedule), then
    :meth:`resume` or :meth:`start`, then :meth:`run_epoch` for each epoch left
    (:meth:`train_epoch`, :meth:`check_weights`, :meth:`evaluate`, :meth:`checkpoint`,
    :meth:`write_metrics`). See
    :func:`train` for the files written and the errors raised.
    """

    # set by setup()
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.CosineAnnealingLR
    steps_per_epoch: int
    total_steps: int  # of the whole run: epochs x steps_per_epoch, or max_steps if fewer
    epochs: int  # epochs the run trains (the last one partly when max_steps ends it)

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.model = model
        self.config = config
        self.device = _device(model)
        out = config.out_dir
        self.last_path, self.best_path = out / "last.pt", out / "best.pt"
        self.metrics_path, self.plot_path = out / "metrics.jsonl", out / "curves.png"
        self.history: list[dict[str, Any]] = []
        self.best_acc = float("-inf")
        self.epoch = 0  # the last completed epoch
        self.step = 0  # the step reached in the current epoch
        self._graph_step: Callable[..., torch.Tensor] | None = None
        self._first_loss: float | None = None  # this process's first training loss
        self._norms0: dict[str, float] = {}  # norms of the >= 2-D weights at that loss
        self._warned = False
        self._graph_logits: list[torch.Tensor] = []

    # -- the run -------------------------------------------------------------------------

    def fit(self, x_train, y_train, x_test=None, y_test=None) -> TrainResult:
        """Train to ``config.epochs`` (from ``last.pt`` when ``config.resume``)."""
        self.setup(x_train, y_train, x_test, y_test)
        # a missing or foreign checkpoint fails before the capture, the capture before any file
        ckpt = load_checkpoint(self.last_path) if self.config.resume else None
        self._capture_step()
        if ckpt is not None:
            self.resume(ckpt)
        else:
            self.start()
        epoch = self.epoch + 1
        self.step = 0
        try:
            for epoch in range(self.epoch + 1, self.epochs + 1):
                self.run_epoch(epoch)
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"interrupted at epoch {epoch} step {self.step}; resume with --resume"
            ) from None
        return self.result()

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, check the weights, evaluate, then record the epoch's metrics and
        write the checkpoints; returns the epoch's metrics."""
        t0 = time.perf_counter()
        stats = self.train_epoch(epoch)
        train_s = time.perf_counter() - t0
        self.check_weights(epoch)
        ev = self.evaluate()
        self.history.append(
            {
                "epoch": epoch,
                "train_loss": float(stats.loss_sum) / stats.seen,
                "train_acc": int(stats.correct) / stats.seen,
                "test_loss": ev["loss"],
                "test_acc": ev["acc"],
                "lr": stats.lrs[0],
                "lr_plastic": stats.lrs[1],
                "seconds": time.perf_counter() - t0,
                "images_per_s": stats.seen / max(train_s, 1e-9),
            }
        )
        improved = ev["acc"] > self.best_acc  # False for NaN (no test set)
        if improved:
            self.best_acc = ev["acc"]
        self.epoch = epoch
        self.checkpoint(best=improved)
        self.write_metrics()
        return self.history[-1]

    def result(self) -> TrainResult:
        """What the run has done so far."""
        best = self.best_acc if math.isfinite(self.best_acc) else float("nan")
        return TrainResult(
            epochs_run=len(self.history),
            final=dict(self.history[-1]) if self.history else {},
            best_acc=best,
            out_dir=self.config.out_dir,
            history=self.history,
        )

    # -- setup ---------------------------------------------------------------------------

    def setup(self, x_train, y_train, x_test=None, y_test=None) -> None:
        """Check the data and the labels, split the parameters by role into two SGD groups and
        plan the cosine schedule over all steps. Writes no file."""
        cfg = self.config
        self.x_train, self.y_train = _as_tensors(x_train, y_train)
        if x_test is None:
            x_test, y_test = self.x_train[:0], self.y_train[:0]
        self.x_test, self.y_test = _as_tensors(x_test, y_test)
        if self.y_train.shape[0] == 0:
            raise GHLError("the training set is empty")
        check_labels(self.model, self.x_train, torch.cat([self.y_train, self.y_test]))
        self.optimizer = self._optimizer()
        self.steps_per_epoch = math.ceil(self.y_train.shape[0] / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:  # a short run: the cosine spans the steps it makes
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.total_steps
        )
        if cfg.channels_last:
            # (Module.to takes memory_format; torch's stub leaves it out of the overloads)
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if cfg.autocast is not None and (why := slow_bf16(self.device)):
            warnings.warn(why, SlowPrecisionWarning, stacklevel=3)

    def _optimizer(self) -> torch.optim.SGD:
        """Plain SGD (no momentum): the backprop parameters in group 0 (``lr``, ``wd``), the
        plastic ones in group 1 (``lr_plastic``, ``wd_plastic``)."""
        cfg = self.config
        unknown = cfg.plastic - {k for k, _ in self.model.named_parameters()}
        if unknown:
            raise GHLError(f"plastic parameters not in the model: {', '.join(sorted(unknown))}")
        named = [(k, p) for k, p in self.model.named_parameters() if p.requires_grad]
        return torch.optim.SGD(
            [
                {
                    "params": [p for k, p in named if k not in cfg.plastic],
                    "lr": cfg.lr,
                    "weight_decay": cfg.wd,
                    "role": "backprop",
                },
                {
                    "params": [p for k, p in named if k in cfg.plastic],
                    "lr": cfg.lr_plastic,
                    "weight_decay": cfg.wd_plastic,
                    "role": "plastic",
                },
            ],
            lr=cfg.lr,
            momentum=0.0,
        )

    def _capture_step(self) -> None:
        """With ``cuda_graph``, capture the forward, loss and backward of one full batch."""
        cfg = self.config
        if not cfg.cuda_graph or self.y_train.shape[0] < cfg.batch_size:
            return

        def graph_loss(out, target):
            self._graph_logits[:] = [_logits(out)]
            return F.cross_entropy(self._graph_logits[0], target)

        self.model.train()
        x = _layout(self.x_train[: cfg.batch_size].to(self.device), cfg.channels_last)
        self._graph_step = _capture(
            self.model,
            self.optimizer,
            graph_loss,
            x,
            self.y_train[: cfg.batch_size].to(self.device),
            cfg.autocast,
        )

    # -- start or resume -----------------------------------------------------------------

    def start(self) -> None:
        """A fresh run: seed torch's global RNG, write an epoch-0 ``last.pt`` (so that any
        interruption can be resumed) and an empty metrics file, drop stale outputs."""
        self.config.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.config.seed)
        self.checkpoint(best=False)
        self.write_metrics(curves=False)
        for stale in (self.best_path, self.plot_path):
            stale.unlink(missing_ok=True)

    def resume(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimiser, schedule, RNG and history."""
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self._load_schedule(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            msg = first_line(e) or type(e).__name__
            raise GHLError(f"{self.last_path}: does not match this model/run: {msg}") from None
        self.epoch = int(ckpt["epoch"])
        self.best_acc = float(ckpt["best_acc"])
        self.history = [dict(h) for h in ckpt.get("history", [])][: self.epoch]
        torch.set_rng_state(ckpt["torch_rng_state"])
        if self.device.type == "cuda" and "cuda_rng_state" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng_state"], self.device)
        self.config.out_dir.mkdir(parents=True, exist_ok=True)
        self.write_metrics(curves=False)

    def _load_schedule(self, state: dict[str, Any]) -> None:
        """Restore the schedule's position. A run resumed with more or fewer epochs re-plans
        the rest of the cosine over the new total: the step count stays, the span and the
        groups' current LRs change (through the optimiser's groups and the scheduler's own
        ``load_state_dict``, not its attributes)."""
        state = dict(state)
        total = self.total_steps
        if state.get("T_max") != total:
            t = min(int(state["last_epoch"]), total)
            for g in self.optimizer.param_groups:
                g["lr"] = _cosine_lr(g["initial_lr"], t, total)
            state.update(T_max=total, _last_lr=[g["lr"] for g in self.optimizer.param_groups])
        self.scheduler.load_state_dict(state)

    # -- one epoch -----------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> _EpochStats:
        """One pass over the shuffled training set (shuffle and augmentation seeded from
        ``seed`` and ``epoch``), one SGD step and one schedule step per batch."""
        cfg = self.config
        self.model.train()
        if not self._norms0:  # for naming the layer that grew fastest, should the run diverge
            with torch.no_grad():
                self._norms0 = {
                    k: float(p.norm()) for k, p in self.model.named_parameters() if p.dim() >= 2
                }
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order, batch = self.epoch_order(epoch, g)
        every = _finite_check_every(self.device)
        stats = _EpochStats.zeros(self.device, self._lrs())
        t0 = time.perf_counter()
        steps = min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch)
        bar = _bar(cfg.progress, steps, f"epoch {epoch}/{self.epochs}")
        try:
            for step in range(1, steps + 1):
                self.step = step
                idx = order[(step - 1) * batch : step * batch]
                xb, yb = self._batch(idx, g)
                loss, logits, replayed = self._forward(xb, yb)
                stats.nonfinite |= ~torch.isfinite(loss.detach())
                if step % every == 0 or step == steps:
                    self.check_loss(stats.nonfinite, epoch, step, every)
                    self.check_rise(float(loss.detach()), epoch, step)
                stats.lrs = self._step(loss, backward=not replayed)
                stats.seen += yb.shape[0]
                stats.loss_sum += loss.detach().double() * yb.shape[0]
                stats.correct += (logits.detach().argmax(1) == yb).sum()
                _show(bar, step, steps, stats, time.perf_counter() - t0)
        finally:
            if bar is not None:
                bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return stats

    def epoch_order(self, epoch: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
        """The sample indices this process trains on in ``epoch``, in order, and its batch
        size: here the whole training set shuffled with ``g`` and ``batch_size``
        (``ghlc.ranks`` splits them across processes)."""
        return torch.randperm(self.y_train.shape[0], generator=g), self.config.batch_size

    def train_module(self) -> nn.Module:
        """The module the training forward runs: the model itself (``ghlc.ranks`` wraps it
        in DistributedDataParallel)."""
        return self.model

    def _batch(self, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        xb = self.x_train[idx]
        if cfg.augment is not None:
            xb = cfg.augment(xb, g)
        xb = _layout(xb.to(self.device, non_blocking=True), cfg.channels_last)
        return xb, self.y_train[idx].to(self.device, non_blocking=True)

    def _forward(
        self, xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Loss and logits of one batch, and whether they came from a replay: a full batch
        under ``cuda_graph`` replays the captured forward, loss and backward."""
        if self._graph_step is not None and yb.shape[0] == self.config.batch_size:
            loss = self._graph_step(xb, target=yb)
            return loss, self._graph_logits[0], True
        self.optimizer.zero_grad(set_to_none=True)  # also resets the Hebbian accumulators
        autocast = self.config.autocast
        with torch.autocast(
            self.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None
        ):
            logits = _logits(self.train_module()(xb))
            return F.cross_entropy(logits, yb), logits, False

    def _step(self, loss: torch.Tensor, backward: bool) -> list[float]:
        """Backward (unless replayed), one SGD step and one schedule step; the LRs used."""
        if backward:
            loss.backward()
        if self.config.plastic_step == "rms":
            scale_by_rms_(self.optimizer.param_groups[1]["params"])
        lrs = self._lrs()
        self.optimizer.step()
        self.scheduler.step()
        return lrs

    def _lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    # -- checks, evaluation, outputs -----------------------------------------------------

    def check_loss(self, nonfinite: torch.Tensor, epoch: int, step: int, every: int) -> None:
        """Raise ``TrainingDiverged`` if a loss since the last check was NaN/Inf."""
        if not bool(nonfinite):
            return
        when = (
            f"step {step}"
            if every == 1
            else (
                f"step {step} (or up to {every - 1} steps before it; checked every {every} steps)"
            )
        )
        raise TrainingDiverged(
            f"training diverged at epoch {epoch} {when}: the loss is not "
            f"finite{self._fastest()}; {self.last_path.name} keeps epoch {epoch - 1}"
        )

    def check_rise(self, loss: float, epoch: int, step: int) -> None:
        """Warn once (``DivergenceWarning``) when the loss passes 2x this process's first
        training loss, naming the layer whose weights grew fastest."""
        if self._first_loss is None:
            self._first_loss = loss
            return
        if self._warned or not loss > 2 * self._first_loss:
            return
        self._warned = True
        warnings.warn(
            f"the training loss rose from {self._first_loss:.3g} to {loss:.3g} by epoch "
            f"{epoch} step {step}: likely diverging{self._fastest()}; try a smaller "
            "--lr-plastic (ghlc lr-find suggests one) or --plastic-step rms",
            DivergenceWarning,
            stacklevel=2,
        )

    def _fastest(self) -> str:
        """ ", the weights of LAYER grew fastest (...)": the conv/linear-sized weight whose norm
        grew most since this process started training (non-finite first)."""
        if not self._norms0:
            return ""
        worst, name = -1.0, ""
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                if k not in self._norms0:
                    continue
                r = float(p.norm()) / max(self._norms0[k], 1e-30)
                r = r if math.isfinite(r) else math.inf
                if r > worst:
                    worst, name = r, k
        how = "not finite" if math.isinf(worst) else f"x{worst:.3g} in norm since the start"
        return f"; the weights of {name.removesuffix('.weight')} grew fastest ({how})"

    def check_weights(self, epoch: int) -> None:
        """Raise ``TrainingDiverged`` if a weight became NaN/Inf during the epoch."""
        if not _finite(self.model):
            raise TrainingDiverged(
                f"training diverged at epoch {epoch} step {self.step}: weights are not "
                f"finite{self._fastest()}; {self.last_path.name} keeps epoch {epoch - 1}"
            )

    def evaluate(self) -> dict[str, Any]:
        """Test-set loss and accuracy (eval mode, no gradients); the model stays in train
        mode."""
        cfg = self.config
        if cfg.eval_batches is None:
            ev = evaluate(self.model, self.x_test, self.y_test, classes=cfg.classes)
        else:
            ev = evaluate(
                self.model,
                self.x_test,
                self.y_test,
                batch_size=cfg.batch_size,
                classes=cfg.classes,
                max_batches=cfg.eval_batches,
            )
        self.model.train()
        return ev

    def checkpoint(self, best: bool) -> None:
        """Write ``last.pt`` (and ``best.pt`` when ``best``) atomically: weights, optimiser,
        schedule, RNG, history and settings after ``self.epoch``."""
        ckpt = _checkpoint(
            self.model,
            self.optimizer,
            self.scheduler,
            self.epoch,
            self.best_acc,
            self.history,
            self.device,
            self.config.hparams(),
        )
        if self.config.normalisation is not None:
            ckpt["normalisation"] = self.config.normalisation.to_dict()
        _save(self.last_path, ckpt)
        if best:
            _save(self.best_path, ckpt)

    def write_metrics(self, curves: bool = True) -> None:
        """Write ``metrics.jsonl`` (and ``curves.png`` when ``curves``) atomically."""
        _write_metrics(self.metrics_path, self.history)
        if curves:
            _plot(self.plot_path, self.history)


def _show(bar, step: int, steps: int, stats: _EpochStats, elapsed: float) -> None:
    if bar is None:
        return
    bar.update(1)
    if step % 10 == 0 or step == steps:
        bar.set_postfix(
            loss=f"{float(stats.loss_sum) / stats.seen:.4f}",
            acc=f"{int(stats.correct) / stats.seen:.4f}",
            img_s=f"{stats.seen / max(elapsed, 1e-9):.0f}",
            refresh=False,
        )


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
    augment: Augment | None = None,
    progress: bool = True,
    classes=None,
    autocast: torch.dtype | None = None,
    cuda_graph: bool = False,
    channels_last: bool = False,
    max_steps: int | None = None,
    eval_batches: int | None = None,
    normalisation: Normalisation | None = None,
    plastic_step: str = "paper",
) -> TrainResult:
    """Train ``model`` with cross-entropy and SGD (no momentum), cosine LR over all steps:
    ``Trainer(model, TrainConfig(...)).fit(x_train, y_train, x_test, y_test)``.

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
    docs/PERFORMANCE.md). ``max_steps`` ends the run after that many SGD steps (the cosine
    schedule spans them; the epoch they end in counts as completed, and a resumed run goes on
    at the next epoch), ``eval_batches`` scores only the first that many test batches of
    ``batch_size`` images: both for smoke runs. ``normalisation`` (the per-channel mean and
    std the inputs were normalised with) is recorded in every checkpoint.
    ``plastic_step="rms"`` multiplies each plastic weight's gradient by the weight's RMS
    before every step (:func:`ghlc.lrfind.scale_by_rms_`); "paper" steps on the rule's
    gradient as it is. A loss that rises past 2x the run's first loss gives one
    ``DivergenceWarning`` naming the layer whose weights grew fastest (as do the errors).

    Raises ``GHLError`` before writing anything on a bad setting (:class:`TrainConfig`) or when
    a label is negative or not below the model's number of outputs (:func:`check_labels`),
    ``TrainingDiverged`` on a NaN/Inf loss (checked every step on CPU, every
    ``FINITE_CHECK_EVERY`` steps on an accelerator) or weight (``last.pt`` keeps the last good
    epoch) and ``TrainingInterrupted`` on Ctrl-C (``last.pt`` keeps the last completed epoch).
    """
    config = TrainConfig(  # (cast: TrainConfig checks out_dir and makes it a Path)
        out_dir=cast(Path, out_dir),
        plastic=plastic,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_plastic=lr_plastic,
        wd_plastic=wd_plastic,
        wd=wd,
        seed=seed,
        resume=resume,
        augment=augment,
        progress=progress,
        classes=classes,
        autocast=autocast,
        cuda_graph=cuda_graph,
        channels_last=channels_last,
        max_steps=max_steps,
        eval_batches=eval_batches,
        normalisation=normalisation,
        plastic_step=plastic_step,
    )
    return Trainer(model, config).fit(x_train, y_train, x_test, y_test)


def _capture(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: torch.dtype | None,
) -> Callable[..., torch.Tensor]:
    """The training step of one full batch captured in a CUDA graph (forward, loss, backward;
    the optimiser steps eagerly): ``step(x, target=y) -> loss``."""
    from .cudagraph import cuda_graph_step

    if x.device.type != "cuda":
        raise GHLError(f"cuda_graph needs the model on a CUDA device (it is on {x.device})")

    return cuda_graph_step(model, opt, loss_fn, (x,), y, optimizer_step=False, autocast=autocast)


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=True, dynamic_ncols=True)
