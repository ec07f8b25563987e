"""Step sizes of the plastic layers: a learning-rate range test and the opt-in scaled step.

GHL gives each plastic weight ``|H_n| * sign(G)`` with ``max |H_n| = 1``: with SGD, every
layer's largest element moves by the full learning rate whatever that layer's weight scale,
so one learning rate can be tiny for one layer and larger than the weights of another (wide
convs have small weights). Two tools (docs/ACCURACY.md, "Step size"):

- :func:`lr_find`, a range test in the style of fastai's and Lightning's finders: train a few
  dozen steps with the plastic learning rate growing exponentially, record the smoothed loss,
  suggest a rate a decade below the one with the lowest loss, and restore the model;
- :func:`scale_by_rms_`, the scaled step (``plastic_step="rms"``): each plastic weight's
  gradient times the weight's RMS before the optimiser steps, so the learning rate is the
  largest element's step relative to the layer's weight scale (like LARS/LAMB trust ratios).
  The rule's gradient itself stays the paper's; only the step taken from it changes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GHLError
from .logits import logits as _logits

PLASTIC_STEPS = ("paper", "rms")


def scale_by_rms_(params: Iterable[torch.Tensor]) -> None:
    """Multiply each parameter's ``.grad`` by the parameter's RMS (a zero weight keeps its
    gradient: it has no scale yet)."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            w = p.detach().to(torch.promote_types(p.dtype, torch.float32))
            rms = w.square().mean().sqrt()  # (in float32 at least)
            p.grad.mul_(torch.where(rms > 0, rms, torch.ones_like(rms)).to(p.grad.dtype))


@dataclass
class LRFindResult:
    """The sweep: the plastic learning rate of each step, its loss (raw and smoothed), the
    suggested rate, and whether the loss blew up before the sweep's end."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    diverged: bool


def lr_find(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    plastic: set[str],
    lr: float = 5e-3,
    wd_plastic: float = 5e-2,
    batch_size: int = 64,
    start: float = 1e-5,
    end: float = 1.0,
    steps: int = 50,
    plastic_step: str = "paper",
    seed: int = 0,
) -> LRFindResult:
    """Range test of the plastic learning rate: ``steps`` SGD steps on shuffled batches of
    ``x``, ``y`` (cross-entropy), the plastic group's rate growing from ``start`` to ``end``
    geometrically, the other parameters at ``lr``. Stops early once the smoothed loss passes
    4x its lowest value or a loss is not finite. The model's weights, buffers and mode are
    restored afterwards, and torch's random state too. The suggestion is the rate with the
    lowest smoothed loss divided by 10 (fastai's rule of thumb)."""
    if not (0 < start < end) or steps < 2:
        raise GHLError(f"lr-find needs 0 < start < end and 2+ steps, got {start}, {end}, {steps}")
    if plastic_step not in PLASTIC_STEPS:
        raise GHLError(f"plastic_step {plastic_step!r} is not one of {', '.join(PLASTIC_STEPS)}")
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    if not any(k in plastic for k, _ in named):
        raise GHLError("lr-find: the model has no plastic layer (nothing to sweep)")
    dev = next(p.device for _, p in named)
    saved = copy.deepcopy(model.state_dict())
    was_training = model.training
    group = [p for k, p in named if k in plastic]
    opt = torch.optim.SGD(
        [
            {"params": [p for k, p in named if k not in plastic], "lr": lr},
            {"params": group, "lr": start, "weight_decay": wd_plastic},
        ],
        lr=lr,
    )
    ratio = (end / start) ** (1 / (steps - 1))
    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, math.inf, False
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            model.train()
            for i in range(steps):
                rate = start * ratio**i
                opt.param_groups[1]["lr"] = rate
                lo = (i * batch_size) % len(y)
                idx = order[lo : lo + batch_size]
                if len(idx) < batch_size:  # wrap around: a full batch each step
                    idx = torch.cat([idx, order[: batch_size - len(idx)]])
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(_logits(model(x[idx].to(dev))), y[idx].to(dev))
                value = float(loss.detach())
                if not math.isfinite(value):
                    diverged = True
                    break
                loss.backward()
                if plastic_step == "rms":
                    scale_by_rms_(group)
                opt.step()
                avg = 0.9 * avg + 0.1 * value  # smoothed as fastai does, bias-corrected
                s = avg / (1 - 0.9 ** (i + 1))
                lrs.append(rate)
                losses.append(value)
                smoothed.append(s)
                best = min(best, s)
                if s > 4 * best:
                    diverged = True
                    break
    finally:
        opt.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
        model.train(was_training)
    if not lrs:
        raise GHLError(f"lr-find: the loss is not finite at the first rate ({start:g})")
    k = min(range(len(smoothed)), key=smoothed.__getitem__)
    return LRFindResult(lrs, losses, smoothed, lrs[k] / 10, diverged)


def report(res: LRFindResult, rows: int = 12) -> str:
    """The sweep as a short table (about ``rows`` lines) and the suggestion."""
    every = max(1, len(res.lrs) // rows)
    keep = sorted(set(range(0, len(res.lrs), every)) | {len(res.lrs) - 1})
    lines = ["lr_plastic  loss (smoothed)"]
    lines += [f"{res.lrs[i]:<10.3g}  {res.smoothed[i]:.4g}" for i in keep]
    end = "the loss blew up at the end of the sweep" if res.diverged else "sweep completed"
    lines.append(f"{end}; suggested --lr-plastic {res.suggestion:.3g}")
    return "\n".join(lines)


def to_json(res: LRFindResult) -> str:
    import json

    return json.dumps(
        {
            "lr_plastic": res.lrs,
            "loss": res.losses,
            "smoothed": res.smoothed,
            "suggestion": res.suggestion,
            "diverged": res.diverged,
        }
    )


# ``ghlc train --lr-plastic auto`` (the CLI's default): a short range test, capped at the
# paper's rate for the paper's step (docs/ACCURACY.md, "Step size").
AUTO_STEPS = 30
AUTO_CAP = {"paper": 1e-2, "rms": 1.0}


def auto_lr(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    plastic: set[str],
    lr: float,
    wd_plastic: float,
    batch_size: int,
    plastic_step: str = "paper",
    seed: int = 0,
) -> tuple[float, LRFindResult]:
    """The plastic learning rate ``ghlc train`` uses by default: :func:`lr_find`'s suggestion
    over ``AUTO_STEPS`` steps from 1e-5 to 1, at most ``AUTO_CAP[plastic_step]``."""
    res = lr_find(
        model, x, y, plastic=plastic, lr=lr, wd_plastic=wd_plastic, batch_size=batch_size,
        steps=AUTO_STEPS, plastic_step=plastic_step, seed=seed,
    )  # fmt: skip
    return min(res.suggestion, AUTO_CAP[plastic_step]), res
