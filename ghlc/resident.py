"""Training with the data resident on the device: the fast path for long protocol runs.

The whole data set sits on the device as uint8 (CIFAR-10: 184 MB); each batch is gathered,
normalised (and augmented, when asked) there, so no image crosses the bus after the start. On
CUDA the forward, loss and backward of every full batch replay one captured CUDA graph
(:func:`ghlc.cuda_graph_step`); the SGD step and the per-iteration cosine schedule run eagerly
(a handful of launches, the learning rate a Python number), and nothing reads a device value
back until the epoch ends: loss, accuracy and a NaN flag are summed on the device and read
once per epoch, and the test set is scored in large batches with one read at the end. On CPU
the same code runs without the graph.

The run is the one :class:`ghlc.train.Trainer` makes (same SGD parameter groups, schedule,
shuffle generator ``seed*1000+epoch``, global seed for dropout): on CPU, with inputs normalised
by :func:`normalise_uint8`, the weights agree with the Trainer's to float rounding (tested).
It keeps no files itself; ``on_epoch`` gets each epoch's metrics and a function that returns a
resumable state (see :func:`train_resident`'s ``state``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import augment_batch
from .errors import GHLError
from .train import TrainingDiverged

__all__ = ["ResidentConfig", "ResidentData", "normalise_uint8", "train_resident"]


def normalise_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 ``(x / 255 - mean) / std`` (``mean``, ``std``: (1, C, 1, 1))."""
    return x.float().div_(255.0).sub_(mean).div_(std)


@dataclass
class ResidentData:
    """A data set on one device: uint8 NCHW images, int64 labels, the input normalisation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: torch.Tensor  # (1, C, 1, 1) float32, in [0, 1] units
    std: torch.Tensor

    @classmethod
    def from_uint8(
        cls,
        x_train: np.ndarray | torch.Tensor,
        y_train: np.ndarray | torch.Tensor,
        x_test: np.ndarray | torch.Tensor,
        y_test: np.ndarray | torch.Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
    ) -> ResidentData:
        """From uint8 NHWC (or NHW) images, moved to ``device`` once."""
        dev = torch.device(device)
        xs = []
        for what, x in (("x_train", x_train), ("x_test", x_test)):
            t = torch.as_tensor(x)
            if t.dtype != torch.uint8 or t.dim() not in (3, 4):
                raise GHLError(f"{what} must be uint8 NHWC or NHW, got {t.dtype} {tuple(t.shape)}")
            t = t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
            xs.append(t.contiguous().to(dev))
        ys = [torch.as_tensor(y).long().reshape(-1).to(dev) for y in (y_train, y_test)]
        for what, x, y in (("train", xs[0], ys[0]), ("test", xs[1], ys[1])):
            if x.shape[0] != y.shape[0]:
                raise GHLError(f"{what}: {x.shape[0]} images but {y.shape[0]} labels")
        c = xs[0].shape[1]
        if len(mean) != c or len(std) != c or min(std) <= 0:
            raise GHLError(f"mean and std need {c} values (std > 0), got {mean} and {std}")
        m = torch.tensor(list(mean), dtype=torch.float32, device=dev).view(1, c, 1, 1)
        s = torch.tensor(list(std), dtype=torch.float32, device=dev).view(1, c, 1, 1)
        return cls(xs[0], ys[0], xs[1], ys[1], m, s)

    @property
    def device(self) -> torch.device:
        return self.x_train.device


@dataclass(frozen=True, kw_only=True)
class ResidentConfig:
    """The run's settings (those of :class:`ghlc.train.TrainConfig` that apply here)."""

    plastic: frozenset[str]
    epochs: int
    batch_size: int = 64
    lr: float = 5e-3
    lr_plastic: float = 1e-2
    wd_plastic: float = 5e-2
    wd: float = 0.0
    seed: int = 0
    augment: bool = False  # random crop (4-pixel zero padding) + flip, on the device
    cuda_graph: bool = True  # on CUDA only; CPU never captures
    eval_batch: int = 1000

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GHLError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("lr", "lr_plastic", "wd_plastic", "wd"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise GHLError(f"{name} must be a finite number >= 0, got {v!r}")


OnEpoch = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]


def _optimizer(model: nn.Module, cfg: ResidentConfig) -> torch.optim.SGD:
    unknown = cfg.plastic - {k for k, _ in model.named_parameters()}
    if unknown:
        raise GHLError(f"plastic parameters not in the model: {', '.join(sorted(unknown))}")
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    return torch.optim.SGD(
        [
            {
                "params": [p for k, p in named if k not in cfg.plastic],
                "lr": cfg.lr,
                "weight_decay": cfg.wd,
            },
            {
                "params": [p for k, p in named if k in cfg.plastic],
                "lr": cfg.lr_plastic,
                "weight_decay": cfg.wd_plastic,
            },
        ],
        lr=cfg.lr,
        momentum=0.0,
    )


def evaluate_resident(
    model: nn.Module, data: ResidentData, batch: int = 1000
) -> tuple[float, float]:
    """Test loss and accuracy in eval mode, summed on the device and read once."""
    n = data.y_test.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    was = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=data.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    try:
        with torch.no_grad():
            for i in range(0, n, batch):
                xb = normalise_uint8(data.x_test[i : i + batch], data.mean, data.std)
                yb = data.y_test[i : i + batch]
                out = model(xb)
                loss += F.cross_entropy(out.float(), yb, reduction="sum").double()
                correct += (out.argmax(1) == yb).sum()
    finally:
        model.train(was)
    return float(loss) / n, int(correct) / n


def train_resident(
    model: nn.Module,
    data: ResidentData,
    config: ResidentConfig,
    *,
    on_epoch: OnEpoch | None = None,
    state: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` (already on ``data.device``) for ``config.epochs``; returns the
    per-epoch metrics (epoch, train_loss, train_acc, test_loss, test_acc, lr, lr_plastic,
    seconds, train_seconds, images_per_s).

    ``on_epoch(metrics, snapshot)`` runs after each epoch; ``snapshot()`` returns a state that
    ``state=`` resumes from (weights, optimiser, schedule, RNG, history). Raises
    ``TrainingDiverged`` when a loss of the epoch or a weight is NaN/Inf (checked once per
    epoch)."""
    cfg = config
    dev = data.device
    n = data.y_train.shape[0]
    if n == 0:
        raise GHLError("the training set is empty")
    opt = _optimizer(model, cfg)
    steps = math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    logits_box: list[torch.Tensor] = []
    graph_step = None
    model.train()
    if dev.type == "cuda" and cfg.cuda_graph and n >= cfg.batch_size:
        from .cudagraph import cuda_graph_step

        def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            logits_box[:] = [out]
            return F.cross_entropy(out, target)

        x0 = normalise_uint8(data.x_train[: cfg.batch_size], data.mean, data.std)
        graph_step = cuda_graph_step(
            model, opt, loss_fn, (x0,), data.y_train[: cfg.batch_size], optimizer_step=False
        )
    history: list[dict[str, Any]] = []
    first = 1
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = [dict(h) for h in state["history"]]
        first = int(state["epoch"]) + 1
        torch.set_rng_state(state["torch_rng_state"])
        if dev.type == "cuda" and "cuda_rng_state" in state:
            torch.cuda.set_rng_state(state["cuda_rng_state"], dev)
    else:
        torch.manual_seed(cfg.seed)

    def snapshot() -> dict[str, Any]:
        s = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "history": history,
            "epoch": history[-1]["epoch"] if history else 0,
            "torch_rng_state": torch.get_rng_state(),
        }
        if dev.type == "cuda":
            s["cuda_rng_state"] = torch.cuda.get_rng_state(dev)
        return copy.deepcopy(s)  # a copy: training goes on in place

    for epoch in range(first, cfg.epochs + 1):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(n, generator=g).to(dev)
        # augmentation draws on the device (the CPU case uses the shuffle's generator, as the
        # Trainer does)
        ga = g if dev.type == "cpu" else torch.Generator(dev).manual_seed(cfg.seed * 1000 + epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        bad = torch.zeros((), dtype=torch.bool, device=dev)
        lrs = [grp["lr"] for grp in opt.param_groups]
        for step in range(steps):
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb = normalise_uint8(data.x_train.index_select(0, idx), data.mean, data.std)
            if cfg.augment:
                xb = augment_batch(xb, ga)
            yb = data.y_train.index_select(0, idx)
            if graph_step is not None and idx.shape[0] == cfg.batch_size:
                loss = graph_step(xb, target=yb)
                logits = logits_box[0]
            else:
                opt.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                loss.backward()
            lrs = [grp["lr"] for grp in opt.param_groups]
            opt.step()
            sched.step()
            d = loss.detach()
            bad |= ~torch.isfinite(d)
            loss_sum += d.double() * idx.shape[0]
            correct += (logits.detach().argmax(1) == yb).sum()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        train_s = time.perf_counter() - t0
        if bool(bad) or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise TrainingDiverged(
                f"training diverged in epoch {epoch}: a loss or weight is NaN/Inf"
            )
        test_loss, test_acc = evaluate_resident(model, data, cfg.eval_batch)
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(loss_sum) / n,
                "train_acc": int(correct) / n,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "lr": lrs[0],
                "lr_plastic": lrs[1],
                "seconds": time.perf_counter() - t0,
                "train_seconds": train_s,
                "images_per_s": n / max(train_s, 1e-9),
            }
        )
        if on_epoch is not None:
            on_epoch(history[-1], snapshot)
    return history
