"""Find the model in a user's ``model.py``: a factory, a module instance or a no-arg class."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GHLError


class ModelFileError(GHLError):
    """The model file is missing, does not import, or holds no usable model."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    entry: str
    example_inputs: tuple | None
    path: Path
    sha256: str


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _required_args(fn) -> list[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in sig.parameters.values()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name != "self"
    ]


def import_file(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    name = f"ghlc_user_model_{file_hash(path)[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise ModelFileError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # the user's file fails at import
        raise ModelFileError(f"{path} failed to import: {type(e).__name__}: {e}") from None
    finally:
        sys.path.pop(0)
    return mod


def candidates(mod) -> dict[str, list[str]]:
    """Model candidates by kind, in preference order: factories, instances, classes."""
    out: dict[str, list[str]] = {"factory": [], "instance": [], "class": [], "needs_args": []}
    for name, obj in vars(mod).items():
        if name.startswith("_") or name == "example_inputs":
            continue
        if isinstance(obj, torch.nn.Module):
            out["instance"].append(name)
        elif inspect.isclass(obj) and issubclass(obj, torch.nn.Module):
            if obj.__module__ != mod.__name__:
                continue
            (out["needs_args"] if _required_args(obj.__init__) else out["class"]).append(name)
        elif inspect.isfunction(obj) and obj.__module__ == mod.__name__:
            if not _required_args(obj):
                out["factory"].append(name)
    return out


def load_model_file(path: str | Path, entry: str | None = None) -> LoadedModel:
    """Import ``path`` and build its model (``entry`` names one when several exist)."""
    path = Path(path)
    mod = import_file(path)
    found = candidates(mod)
    if entry is None:
        for kind in ("factory", "instance", "class"):
            if len(found[kind]) == 1:
                entry = found[kind][0]
                break
            if len(found[kind]) > 1:
                raise ModelFileError(
                    f"{path}: several models ({', '.join(found[kind])}); pick one with --entry"
                )
        else:
            if found["needs_args"]:
                raise ModelFileError(
                    f"{path}: {found['needs_args'][0]} needs constructor arguments; add a "
                    "factory function without arguments"
                )
            raise ModelFileError(
                f"{path}: no model found (expected a factory function, an nn.Module instance "
                "or an nn.Module class with a no-argument constructor)"
            )
    if not hasattr(mod, entry):
        raise ModelFileError(f"{path}: no attribute {entry!r}")
    obj = getattr(mod, entry)
    if isinstance(obj, torch.nn.Module):
        model = obj
    else:
        req = _required_args(obj.__init__ if inspect.isclass(obj) else obj)
        if req:
            raise ModelFileError(
                f"{path}: {entry} needs constructor arguments ({', '.join(req)}); add a "
                "factory function without arguments"
            )
        try:
            model = obj()
        except Exception as e:
            raise ModelFileError(f"{path}: {entry}() failed: {type(e).__name__}: {e}") from None
        if not isinstance(model, torch.nn.Module):
            raise ModelFileError(
                f"{path}: {entry}() returned {type(model).__name__}, not an nn.Module"
            )
    ex = None
    if callable(getattr(mod, "example_inputs", None)):
        ex = mod.example_inputs()
        ex = (ex,) if isinstance(ex, torch.Tensor) else tuple(ex)
    return LoadedModel(model, entry, ex, path, file_hash(path))
