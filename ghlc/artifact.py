"""The ``.ghl`` artifact: one safetensors file with weights plus JSON metadata.

It holds the annotated layer graph, config, input spec and provenance (source file and hash,
ghlc and torch versions). Loading never executes code stored in the file: the model is rebuilt
from its source file (or a module the caller passes) and the weights are read by safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .build import build_module
from .errors import GHLError, first_line
from .fileio import write_atomic
from .graph import LayerGraph
from .passes import PassManager, set_global_signal
from .runtime import runtime_of
from .serialize import graph_from_json, graph_to_json

FORMAT = "ghlc-artifact"
VERSION = 1


class ArtifactError(GHLError):
    """A file that is not a ghlc artifact, is damaged, or comes from a newer format."""


def make_inputs(spec: list[dict[str, Any]]) -> tuple:
    out = []
    for s in spec:
        dt = getattr(torch, s["dtype"])
        if dt.is_floating_point:
            out.append(torch.randn(*s["shape"], dtype=dt))
        else:
            out.append(torch.zeros(*s["shape"], dtype=dt))
    return tuple(out)


def save(module: torch.nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write a built module to ``path`` (a ``.ghl`` artifact)."""
    from .version import __version__

    rt = runtime_of(module)
    if rt is None or rt.graph is None:
        raise GHLError("ghlc.save expects a module made by ghlc.prepare or ghlc.build")
    lg: LayerGraph = rt.graph
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "graph": graph_to_json(lg),
        "inputs": json.dumps(rt.inputs),
        "source": json.dumps(rt.source),
        "ghlc_version": __version__,
        "torch_version": torch.__version__,
        "extra": json.dumps(extra or {}),
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    write_atomic(path, safetensors_bytes(tensors, metadata=meta))


def read_meta(path: str | Path) -> dict[str, Any]:
    """The artifact's metadata (graph, inputs, source, versions), checked."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ArtifactError(
            f"{path}: not a ghlc artifact or damaged ({type(e).__name__})"
        ) from None
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a ghlc artifact")
    try:
        version = int(meta.get("version", "0"))
    except ValueError:
        raise ArtifactError(f"{path}: damaged artifact (bad version field)") from None
    if version > VERSION:
        raise ArtifactError(
            f"{path}: made by a newer ghlc (format version {version}, this ghlc reads "
            f"up to {VERSION}); upgrade ghlc"
        )
    try:
        return {
            "graph": graph_from_json(meta["graph"]),
            "inputs": json.loads(meta["inputs"]),
            "source": json.loads(meta["source"]),
            "ghlc_version": meta.get("ghlc_version"),
            "torch_version": meta.get("torch_version"),
            "extra": json.loads(meta["extra"]),
        }
    except Exception as e:
        raise ArtifactError(f"{path}: damaged artifact metadata ({type(e).__name__})") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ArtifactError(f"{path}: damaged artifact ({type(e).__name__}: {e})") from None


def load(
    path: str | Path, model: torch.nn.Module | None = None, method: str = "ghl"
) -> torch.nn.Module:
    """Rebuild the built module: from ``model`` if given, else from the recorded source.

    ``method``: "ghl" (as saved), "hebbian" (global signal off: the ``set_global_signal("none")``
    pass) or "bp" (the plain model, every layer trained by backprop)."""
    from .modelfile import file_hash, load_model_file

    meta = read_meta(path)
    lg: LayerGraph = meta["graph"]
    src = meta["source"]
    if model is None:
        if not src.get("path"):
            raise ArtifactError(f"{path}: records no model source; pass the model to load()")
        p = Path(src["path"])
        if not p.is_file():
            raise ArtifactError(f"{path}: model source {p} not found")
        if src.get("sha256") and file_hash(p) != src["sha256"]:
            raise ArtifactError(f"{path}: model source {p} changed since the artifact was made")
        if src.get("format") == "onnx":  # rebuilt from the ONNX file (ghlc/onnx_in.py)
            from .onnx_in import load_onnx

            model = load_onnx(p, quiet=True).model
        else:
            model = load_model_file(p, src.get("entry")).model
    params = dict(model.named_parameters(remove_duplicate=False))
    for info in lg.layers():
        if info.name not in params or tuple(params[info.name].shape) != info.weight_shape:
            raise ArtifactError(
                f"{path}: the model does not match the artifact (parameter {info.name})"
            )
    weights = read_weights(path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: weights do not fit the model: {first_line(e)}") from None
    if method == "bp":
        return model
    if method == "hebbian":
        lg = PassManager([set_global_signal("none")])(lg)
    return build_module(lg.evolve(model=model), inplace=True, inputs=meta["inputs"], source=src)
