"""The ``.ghl`` artifact: one safetensors file with weights plus JSON metadata.

It holds the annotated layer graph, config, input spec and provenance (source file, relative
to the artifact and absolute, with the hashes of it and of the local modules it imports; ghlc
and torch versions). Loading never executes code stored in the file: the model is rebuilt from
its source file (or a module or file the caller passes) and the weights are read by
safetensors. What must match is the model's structure (parameter and buffer names and
shapes, the layer graph), not the source's bytes: an edited source of the same structure
loads with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .build import build_module
from .errors import GHLError, GHLWarning, first_line
from .fileio import write_atomic
from .graph import LayerGraph
from .inputs import inputs_from_spec
from .passes import PassManager, set_global_signal
from .runtime import runtime_of
from .serialize import graph_from_json, graph_to_json

FORMAT = "ghlc-artifact"
VERSION = 1


class ArtifactError(GHLError):
    """A file that is not a ghlc artifact, is damaged, or comes from a newer format."""


class SourceChangedWarning(GHLWarning):
    """The model source changed since the artifact was made, but the structure matches."""


WAY_OUT = "give the model file it was made from with --model-file PATH (ghlc.load: model_file=)"


def make_inputs(spec: list[dict[str, Any]]) -> tuple:
    """Positional example inputs of the recorded shapes (random floats, zero integers);
    :func:`ghlc.inputs.inputs_from_spec` gives the keyword ones too."""
    return inputs_from_spec(spec)[0]


def save(module: torch.nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write a built module to ``path`` (a ``.ghl`` artifact)."""
    from .version import __version__

    rt = runtime_of(module)
    if rt is None or rt.graph is None:
        raise GHLError("ghlc.save expects a module made by ghlc.prepare or ghlc.build")
    lg: LayerGraph = rt.graph
    source = dict(rt.source)
    if source.get("path"):  # found again beside the artifact when a folder moves
        try:
            source["relpath"] = os.path.relpath(source["path"], Path(path).resolve().parent)
        except ValueError:  # (another drive)
            source.pop("relpath", None)
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "graph": graph_to_json(lg),
        "inputs": json.dumps(rt.inputs),
        "source": json.dumps(source),
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


def source_path(path: str | Path, src: dict[str, Any]) -> Path | None:
    """The recorded model source: beside the artifact where it was (``relpath``), else at
    its absolute path; None when neither exists."""
    here = Path(path).resolve().parent
    for p in ([here / src["relpath"]] if src.get("relpath") else []) + [Path(src["path"])]:
        if p.is_file():
            return Path(os.path.normpath(p))
    return None


def _shown(p: Path) -> str:
    """``p`` as a user would write it: relative to the working folder when inside it."""
    r = os.path.relpath(p.resolve())
    return str(p.resolve()) if r.startswith("..") else r


def _shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ArtifactError(f"{path}: damaged artifact ({type(e).__name__}: {e})") from None


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def structure_difference(
    lg: LayerGraph, shapes: dict[str, tuple[int, ...]], model: torch.nn.Module, spec: list
) -> str | None:
    """The first difference between the artifact's structure (its graph ``lg`` and tensor
    ``shapes``) and ``model``'s, in a few words; None when they match. Compared: parameter
    and buffer names and shapes, then the layer graph (each layer's kind, shapes, groups and
    calls, and the data flow between layers), traced again on inputs of the recorded spec."""
    from .inputs import inputs_from_spec
    from .trace import trace

    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, s in have.items():
        if k not in shapes:
            return f"the model has {k} ({_dims(s)}), which the artifact lacks"
        if shapes[k] != s:
            return f"{k} is {_dims(s)} in the model, {_dims(shapes[k])} in the artifact"
    for k, s in shapes.items():
        if k not in have:
            return f"the model has no {k} (the artifact has {_dims(s)})"
    args, kwargs = inputs_from_spec(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (said when the artifact was made)
            now = trace(model, args, config=lg.config, tiers=(), example_kwargs=kwargs)
    except GHLError as e:
        return f"the model no longer runs on the recorded inputs ({e})"
    fields = ("kind", "weight_shape", "in_shape", "out_shape", "groups", "calls", "weight_use")
    was = {i.name: i for i in lg.layers()}
    is_ = {i.name: i for i in now.layers()}
    for name, info in is_.items():
        if name not in was:
            return f"{name} is a layer in the model, not in the artifact"
        for f in fields:
            a, b = getattr(info, f), getattr(was[name], f)
            if a != b:
                show = _dims if isinstance(a, tuple) else str
                return f"layer {name}: {f} {show(a)} in the model, {show(b)} in the artifact"
    for name in was:
        if name not in is_:
            return f"{name} is a layer in the artifact, not in the model"

    def flow(g: LayerGraph) -> set[tuple[str, str]]:
        return {(u, v) for u, v, d in g.g.edges(data=True) if d["type"] == "data"}

    for u, v in sorted(flow(lg) ^ flow(now)):
        where = "artifact" if (u, v) in flow(lg) else "model"
        return f"the data flow {u} -> {v} is only in the {where}"
    return None


def _changed(src: dict[str, Any], loaded: Any) -> list[str]:
    """The source files (entry file and local imports) whose bytes differ from the record."""
    out = [loaded.path.name] if src.get("sha256") and src["sha256"] != loaded.sha256 else []
    old, new = src.get("deps") or {}, loaded.deps
    return out + sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def load(
    path: str | Path,
    model: torch.nn.Module | None = None,
    method: str = "ghl",
    model_file: str | Path | None = None,
) -> torch.nn.Module:
    """Rebuild the built module: from ``model`` if given, else from ``model_file`` (a model
    file of the same structure, its entry the recorded one), else from the recorded source.

    The model's structure must match the artifact's (:func:`structure_difference`); a
    source whose bytes changed but whose structure matches loads with a
    ``SourceChangedWarning``. ``method``: "ghl" (as saved), "hebbian" (global signal off: the
    ``set_global_signal("none")`` pass) or "bp" (the plain model, every layer trained by
    backprop)."""
    from .modelfile import load_model_file

    meta = read_meta(path)
    lg: LayerGraph = meta["graph"]
    src = meta["source"]
    what, way, changed = "the model passed to load()", "", []
    if model is None:
        if model_file is not None:
            p: Path | None = Path(model_file)
        elif not src.get("path"):
            raise ArtifactError(f"{path}: records no model source; pass the model to load()")
        else:
            p, way = source_path(path, src), f"; {WAY_OUT}"
            if p is None:
                where = src["path"] + (f" or {src['relpath']}" if src.get("relpath") else "")
                raise ArtifactError(f"{path}: model source {where} not found; {WAY_OUT}")
        assert p is not None
        if src.get("format") == "onnx":  # rebuilt from the ONNX file (ghlc/onnx_in.py)
            from .onnx_in import load_onnx, onnx_record

            onnx_in = load_onnx(p, quiet=True)
            if model_file is None and src.get("sha256") not in (None, onnx_in.sha256):
                changed = [p.name]
            model, what, src = onnx_in.model, f"the model in {_shown(p)}", onnx_record(onnx_in)
        else:
            loaded = load_model_file(p, src.get("entry"))
            if model_file is None:
                changed = _changed(src, loaded)
            model, what, src = loaded.model, f"the model in {_shown(p)}", loaded.source()
    diff = structure_difference(lg, _shapes(path), model, meta["inputs"])
    if diff is not None:
        raise ArtifactError(f"{path}: {what} does not match the artifact: {diff}{way}")
    if changed:
        names = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
        warnings.warn(
            f"{path}: model source changed since the artifact was made ({names}); its "
            "structure matches, so it loads",
            SourceChangedWarning,
            stacklevel=2,
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
