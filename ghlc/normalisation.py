"""Input normalisation: the per-channel mean and std ``ghlc train`` normalises inputs with.

They are recorded where a trained model goes: the artifact ``RUN/model.ghl`` (its ``extra``
metadata), each checkpoint and the exported ONNX file's ``metadata_props`` (``input_mean``,
``input_std``: JSON lists, one value per input channel). :class:`Normalised` puts
``(x - mean) / std`` in front of a model, so that an exported graph takes raw inputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import GHLError

__all__ = ["Normalisation", "Normalised"]


@dataclass(frozen=True)
class Normalisation:
    """Per-channel ``mean`` and ``std`` of the model's input (channel axis 1): the model
    sees ``(x - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        if not mean or len(mean) != len(std):
            raise GHLError(
                f"input normalisation needs one mean and one std per channel, got "
                f"{len(mean)} mean(s) and {len(std)} std(s)"
            )
        if not all(math.isfinite(v) for v in mean) or not all(
            math.isfinite(v) and v > 0 for v in std
        ):
            raise GHLError("input normalisation: means must be finite and stds positive")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Any) -> Normalisation:
        """From :meth:`to_dict`'s form; a one-line ``GHLError`` when it is not that."""
        if not isinstance(d, Mapping) or not {"mean", "std"} <= d.keys():
            raise GHLError("input normalisation record is damaged (expected mean and std)")
        if not all(isinstance(d[k], Sequence) for k in ("mean", "std")):
            raise GHLError("input normalisation record is damaged (mean, std must be lists)")
        return cls(tuple(d["mean"]), tuple(d["std"]))

    def metadata(self, in_graph: bool) -> dict[str, str]:
        """ONNX ``metadata_props`` entries; ``in_graph`` says whether the exported graph
        applies the normalisation itself (then it takes raw inputs)."""
        return {
            "input_mean": json.dumps(list(self.mean)),
            "input_std": json.dumps(list(self.std)),
            "input_normalisation_in_graph": "true" if in_graph else "false",
        }

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` over axis 1."""
        shape = (1, len(self.mean)) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std


class Normalised(nn.Module):
    """``model((x - mean) / std)``: a model that takes raw inputs (for export)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, norm: Normalisation, ndim: int = 4) -> None:
        super().__init__()
        self.model = model
        shape = (1, len(norm.mean)) + (1,) * (ndim - 2)
        self.register_buffer("mean", torch.tensor(norm.mean).view(shape))
        self.register_buffer("std", torch.tensor(norm.std).view(shape))

    def forward(self, x: torch.Tensor, *rest: Any) -> Any:
        if x.dim() != self.mean.dim() or x.shape[1] != self.mean.shape[1]:
            raise GHLError(
                f"input normalisation is for {self.mean.shape[1]} channels on axis 1 of a "
                f"{self.mean.dim()}-D input, got shape {tuple(x.shape)}"
            )
        return self.model((x - self.mean) / self.std, *rest)
