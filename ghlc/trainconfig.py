"""The settings of a training run: one frozen record, checked when it is made."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import GHLError
from .normalisation import Normalisation

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything :func:`ghlc.train.train` takes besides the model and the data.

    ``plastic`` names the plastic parameters (their own SGD group: ``lr_plastic``,
    ``wd_plastic``); the rest use ``lr``/``wd``. A bad value raises a one-line ``GHLError``
    naming the setting."""

    out_dir: Path
    plastic: AbstractSet[str]  # (a frozenset once made)
    epochs: int = 1
    batch_size: int = 64
    lr: float = 5e-3
    lr_plastic: float = 1e-2
    wd_plastic: float = 5e-2
    wd: float = 0.0
    seed: int = 0
    resume: bool = False
    augment: Augment | None = None
    progress: bool = True
    classes: Sequence[Any] | None = None  # (a tuple once made)
    autocast: torch.dtype | None = None
    cuda_graph: bool = False
    channels_last: bool = False
    max_steps: int | None = None  # stop after this many SGD steps (cosine over them)
    eval_batches: int | None = None  # score only the first N test batches of batch_size
    normalisation: Normalisation | None = None  # of the inputs, recorded in checkpoints
    plastic_step: str = "paper"  # "rms": plastic grads times the weight's RMS (lrfind.py)

    def __post_init__(self) -> None:
        # normalised forms (a frozen dataclass sets them through object.__setattr__)
        _set(self, "out_dir", _path(self.out_dir))
        _set(self, "plastic", _names(self.plastic))
        if self.classes is not None:
            _set(self, "classes", tuple(self.classes))
        for name in ("epochs", "batch_size"):
            _check_count(name, getattr(self, name))
        for name in ("max_steps", "eval_batches"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        _check_int("seed", self.seed)
        for name in ("lr", "lr_plastic", "wd", "wd_plastic"):
            _check_rate(name, getattr(self, name))
        if self.augment is not None and not callable(self.augment):
            raise GHLError(
                f"augment must be a function (x, generator) -> x, got {type(self.augment).__name__}"
            )
        if self.normalisation is not None and not isinstance(self.normalisation, Normalisation):
            raise GHLError(
                "normalisation must be a ghlc.normalisation.Normalisation, got "
                f"{type(self.normalisation).__name__}"
            )
        if self.plastic_step not in ("paper", "rms"):
            raise GHLError(f"plastic_step must be paper or rms, got {self.plastic_step!r}")
        if self.autocast is not None and self.autocast != torch.bfloat16:
            raise GHLError(f"autocast {self.autocast} is not supported here: use torch.bfloat16")

    def hparams(self) -> dict[str, Any]:
        """The run's settings as stored in every checkpoint (``hparams``)."""
        return {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epochs": self.epochs,
            "lr": self.lr,
            "lr_plastic": self.lr_plastic,
            "wd": self.wd,
            "wd_plastic": self.wd_plastic,
            "autocast": str(self.autocast).removeprefix("torch.") if self.autocast else None,
            "cuda_graph": self.cuda_graph,
            "channels_last": self.channels_last,
            "max_steps": self.max_steps,
            "eval_batches": self.eval_batches,
            "plastic_step": self.plastic_step,
        }


def _set(cfg: TrainConfig, name: str, value: Any) -> None:
    object.__setattr__(cfg, name, value)


def _path(value: Any) -> Path:
    if not isinstance(value, (str, Path)):
        raise GHLError(f"out_dir must be a path, got {type(value).__name__}")
    return Path(value)


def _names(value: Iterable[str]) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise GHLError(f"plastic must be a set of parameter names, got {type(value).__name__}")
    names = frozenset(value)
    if not all(isinstance(k, str) for k in names):
        raise GHLError("plastic must be a set of parameter names (strings)")
    return names


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GHLError(f"{name} must be an integer, got {value!r}")


def _check_count(name: str, value: Any) -> None:
    _check_int(name, value)
    if value < 1:
        raise GHLError(f"{name} must be >= 1, got {value}")


def _check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GHLError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise GHLError(f"{name} must be a finite number >= 0, got {value}")
