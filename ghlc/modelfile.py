"""Find the model in a user's ``model.py``: a factory, a module instance or a no-arg class."""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .errors import GHLError, describe


class ModelFileError(GHLError):
    """The model file is missing, does not import, or holds no usable model."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    entry: str
    example_inputs: tuple | dict[str, Any] | None
    path: Path
    sha256: str
    deps: dict[str, str]  # the local modules it imported: path (from path's folder) -> sha256

    def source(self) -> dict[str, Any]:
        """What an artifact records of where its model came from (see ghlc.artifact)."""
        return {
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "entry": self.entry,
            "deps": self.deps,
        }


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _local(folder: Path) -> list[tuple[str, Path]]:
    """The loaded modules that an ``import`` in a model file in ``folder`` resolves to the
    folder itself (``blocks`` for ``folder/blocks.py``, ``pkg.x`` for ``folder/pkg/x.py``):
    the model file's local imports. Installed packages and ghlc are elsewhere."""
    out = []
    here: dict[str, bool] = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if not f or not f.endswith(".py"):
            continue
        top = name.partition(".")[0]
        if top not in here:  # (a cheap test first: resolving every module's path is slow)
            here[top] = (folder / f"{top}.py").is_file() or (folder / top).is_dir()
        if not here[top]:
            continue
        p = Path(f).resolve()
        if not p.is_relative_to(folder):
            continue
        parts = p.relative_to(folder).with_suffix("").parts
        if parts[-1:] == ("__init__",):
            parts = parts[:-1]
        if ".".join(parts) == name:
            out.append((name, p))
    return out


def _shadowed(folder: Path) -> list[str]:
    """Loaded modules that an ``import`` in a model file in ``folder`` would now find in the
    folder (it comes first on the path): the folder's own modules, loaded before, and
    same-named local modules of another folder. Installed packages and ghlc are kept."""
    installed = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix}]
    here: dict[str, bool] = {}
    out = []
    for name, mod in list(sys.modules.items()):
        top = name.partition(".")[0]
        if top not in here:
            here[top] = (folder / f"{top}.py").is_file() or (folder / top).is_dir()
        f = getattr(mod, "__file__", None)
        if not here[top] or top == "ghlc" or not f:
            continue
        p = Path(f).resolve()
        if "site-packages" in p.parts or any(p.is_relative_to(i) for i in installed):
            continue
        out.append(name)
    return out


def local_modules(path: Path) -> dict[str, str]:
    """The local modules loaded from ``path``'s folder (see :func:`_local`), by path
    relative to that folder, with their sha256."""
    folder = path.resolve().parent
    out = {p.relative_to(folder).as_posix(): file_hash(p) for _, p in _local(folder)}
    return dict(sorted(out.items()))


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


def import_file(path: str | Path) -> ModuleType:
    """Import the model file ``path`` afresh, with its local imports (modules beside it)
    imported again too, as in a new process: an edited ``blocks.py`` is seen as it is now,
    and a ``blocks`` loaded before from another folder is not used (:func:`_shadowed`)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    for cached in _shadowed(path.resolve().parent):
        del sys.modules[cached]
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


def _resolve(node: ast.expr, namespace: dict[str, Any]) -> Any:
    """The object a name or dotted name (``nn.Module``, ``"Net"``) refers to in
    ``namespace``, found by attribute lookups only (nothing is called); None if unknown."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a string annotation
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return None
    if isinstance(node, ast.Name):
        return namespace.get(node.id, vars(builtins).get(node.id))
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, namespace)
        if base is None:
            return None
        try:
            return inspect.getattr_static(base, node.attr)
        except AttributeError:
            return getattr(base, node.attr, None) if inspect.ismodule(base) else None
    return None


def _is_module_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, torch.nn.Module)


def _returns(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.expr | None]:
    """The values of ``fn``'s own return statements (not those of nested functions)."""
    out: list[ast.expr | None] = []
    todo: list[ast.AST] = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Return):
            out.append(node.value)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return out


def _assigned_calls(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, list[ast.Call]]:
    """For each local name, the calls assigned to it (``net = Net()``)."""
    out: dict[str, list[ast.Call]] = {}
    for node in ast.walk(fn):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    out.setdefault(t.id, []).append(node.value)
    return out


def _builds_module(
    fn: ast.FunctionDef | ast.AsyncFunctionDef, namespace: dict[str, Any], factories: set[str]
) -> bool | None:
    """Whether the function ``fn`` returns an nn.Module, read from its source: True (its
    return annotation is an nn.Module class, or a return constructs one or calls a known
    factory), False (it returns nothing, or its annotation is another type), None (unknown)."""
    if fn.returns is not None:
        ann = _resolve(fn.returns, namespace)
        if ann is not None:
            return _is_module_class(ann)
    values = _returns(fn)
    if all(v is None or (isinstance(v, ast.Constant) and v.value is None) for v in values):
        return False  # a helper such as test(): it returns nothing

    assigned = _assigned_calls(fn)

    def builds(call: ast.expr | None) -> bool:
        if not isinstance(call, ast.Call):
            return False
        if isinstance(call.func, ast.Name) and call.func.id in factories:
            return True
        return _is_module_class(_resolve(call.func, namespace))

    for v in values:
        if builds(v):
            return True
        if isinstance(v, ast.Name) and any(builds(c) for c in assigned.get(v.id, [])):
            return True
    return None


@dataclass
class Candidates:
    """What a model file offers, by kind, in preference order: ``factory`` (functions that
    build a module, as their source shows), ``instance`` (module-level nn.Module objects),
    ``class`` (nn.Module classes with a no-argument constructor); and, not candidates,
    ``maybe`` (argument-free functions whose result the source does not show) and
    ``needs_args`` (nn.Module classes whose constructor needs arguments)."""

    factory: list[str]
    instance: list[str]
    klass: list[str]
    maybe: list[str]
    needs_args: list[str]


def candidates(mod: ModuleType, path: Path | None = None) -> Candidates:
    """The model candidates in the imported file ``mod``, found without calling anything:
    functions are told apart by their source (``path``, default ``mod.__file__``)."""
    found = Candidates([], [], [], [], [])
    namespace = vars(mod)
    src = Path(path or mod.__file__ or "")
    try:
        tree = ast.parse(src.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        tree = ast.Module(body=[], type_ignores=[])
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    functions = []
    for name, obj in namespace.items():
        if name.startswith("_") or name == "example_inputs":
            continue
        if isinstance(obj, torch.nn.Module):
            found.instance.append(name)
        elif _is_module_class(obj):
            if obj.__module__ != mod.__name__:
                continue
            (found.needs_args if _required_args(obj.__init__) else found.klass).append(name)
        elif inspect.isfunction(obj) and obj.__module__ == mod.__name__:
            if not _required_args(obj) and name in defs:
                functions.append(name)
    # A factory may build its module by calling another factory (ResNet18 -> ResNet(...) is
    # direct; resnet18 -> ResNet18() needs a second round): repeat until nothing changes.
    verdict: dict[str, bool | None] = {}
    factories: set[str] = set()
    while True:
        verdict = {n: _builds_module(defs[n], namespace, factories) for n in functions}
        now = {n for n, v in verdict.items() if v}
        if now == factories:
            break
        factories = now
    found.factory = [n for n in functions if verdict[n]]
    found.maybe = [n for n in functions if verdict[n] is None]
    return found


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _pick(path: Path, found: Candidates) -> str:
    """The entry to use when the user named none, or a one-line error listing the choices."""
    for names in (found.factory, found.instance, found.klass):
        if len(names) == 1:
            return names[0]
        if len(names) > 1:
            raise ModelFileError(
                f"{path}: several models ({_names(names)}); pick one with --entry NAME, "
                f"e.g. --entry {names[0]}"
            )
    if found.maybe:
        raise ModelFileError(
            f"{path}: no function here shows that it returns an nn.Module (candidates: "
            f"{_names(found.maybe)}); name one with --entry NAME, e.g. --entry "
            f"{found.maybe[0]}, or annotate it `-> nn.Module`"
        )
    if found.needs_args:
        raise ModelFileError(
            f"{path}: {found.needs_args[0]} needs constructor arguments; add a "
            "factory function without arguments (or name one with --entry NAME)"
        )
    raise ModelFileError(
        f"{path}: no model found (expected a function that returns an nn.Module, an "
        "nn.Module instance or an nn.Module class with a no-argument constructor)"
    )


def load_model_file(path: str | Path, entry: str | None = None) -> LoadedModel:
    """Import ``path`` and build its model. Without ``entry`` the model is found without
    calling anything but the one it picks (see :func:`candidates`); ``entry`` names one."""
    path = Path(path)
    mod = import_file(path)
    if entry is None:
        entry = _pick(path, candidates(mod, path))
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
            raise ModelFileError(f"{path}: {entry}() failed: {describe(e)}") from None
        if not isinstance(model, torch.nn.Module):
            raise ModelFileError(
                f"{path}: {entry}() returned {type(model).__name__}, not an nn.Module"
            )
    ex = None
    if callable(getattr(mod, "example_inputs", None)):
        ex = mod.example_inputs()
        if isinstance(ex, torch.Tensor):
            ex = (ex,)
        elif isinstance(ex, Mapping):  # keyword inputs ({"input_ids": ..., ...})
            ex = dict(ex)
        else:
            ex = tuple(ex)
    return LoadedModel(model, entry, ex, path, file_hash(path), local_modules(path))
