"""Example inputs: positional tensors, keyword inputs (a dict, as Hugging Face models take
``input_ids=..., attention_mask=...``), or both, and the spec an artifact records of them."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import GHLError

ExampleInputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]

_JSON_VALUES = (bool, int, float, str, type(None))


def split_inputs(
    example_inputs: ExampleInputs, example_kwargs: Mapping[str, Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` to call the model with: a tensor is one positional input, a
    sequence the positional inputs, a mapping the keyword inputs; ``example_kwargs`` adds
    keyword inputs to either."""
    if isinstance(example_inputs, torch.Tensor):
        args: tuple[Any, ...] = (example_inputs,)
        kwargs: dict[str, Any] = {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), {}
    for k, v in (example_kwargs or {}).items():
        if k in kwargs:
            raise GHLError(f"example input {k!r} is given twice")
        kwargs[k] = v
    if any(not isinstance(k, str) for k in kwargs):
        raise GHLError("keyword example inputs need string keys (the forward's argument names)")
    return args, kwargs


# Example inputs up to this many elements are recorded with their values (a CIFAR image is
# 3072): the structure check on load then runs the model on the very inputs it was traced on
# (token ids, attention masks and data-dependent branches give the same layer graph).
KEEP_VALUES = 1 << 16


def _entry(x: Any, what: str) -> dict[str, Any]:
    if isinstance(x, torch.Tensor):
        out = {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
        if x.numel() <= KEEP_VALUES:
            raw = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            out["data"] = base64.b64encode(raw).decode("ascii")
        return out
    if isinstance(x, _JSON_VALUES):
        return {"value": x}
    raise GHLError(
        f"example input {what} is a {type(x).__name__}: an artifact can record tensors and "
        "plain values (bool, int, float, str, None) only"
    )


def input_spec(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> list[dict]:
    """What an artifact records of the example inputs: shape and dtype of each tensor (and
    its values, base64, up to ``KEEP_VALUES`` elements) or the plain value, in order,
    keyword inputs with their ``name``."""
    out = [_entry(x, f"#{i}") for i, x in enumerate(args)]
    for k, v in (kwargs or {}).items():
        out.append({"name": k, **_entry(v, repr(k))})
    return out


def _make(s: dict[str, Any]) -> Any:
    if "value" in s:
        return s["value"]
    dt = getattr(torch, s["dtype"])
    if "data" in s:
        raw = bytearray(base64.b64decode(s["data"]))
        return torch.frombuffer(raw, dtype=torch.uint8).view(dt).reshape(s["shape"]).clone()
    if dt.is_floating_point:
        return torch.randn(*s["shape"], dtype=dt)
    return torch.zeros(*s["shape"], dtype=dt)


def inputs_from_spec(spec: Sequence[dict[str, Any]]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)``: the recorded values, else random floats and zero integers of the
    recorded shapes."""
    args = tuple(_make(s) for s in spec if "name" not in s)
    kwargs = {s["name"]: _make(s) for s in spec if "name" in s}
    return args, kwargs


def image_input(spec: Sequence[dict[str, Any]]) -> tuple[int, ...] | None:
    """The (C, H, W) of a model whose one input is a positional floating-point image batch
    (N, C, H, W), else None."""
    if len(spec) != 1 or "name" in spec[0] or "value" in spec[0]:
        return None
    if len(spec[0]["shape"]) != 4 or not getattr(torch, spec[0]["dtype"]).is_floating_point:
        return None
    return tuple(spec[0]["shape"][1:])
