"""One recipe file for a run: the model, the GHLConfig, the training settings and the data.

```toml
[model]
file = "fasthebb.py"        # or: onnx = "model.onnx" (paths relative to the recipe)
entry = "fasthebb"          # optional
input_shape = [2, 3, 32, 32]  # optional
[ghl]                       # any GHLConfig field
temperature = 1.0
[train]                     # any `ghlc train` option, by its name with underscores
epochs = 1
[data]
source = "digits"           # digits | FILE.npz | cifar10:DIR | cifar100:DIR
```

``ghlc train recipe.toml`` and ``ghlc convert recipe.toml`` read it; options given on the
command line win. A bad key or value is a one-line error naming it. ``ghlc train`` saves the
resolved recipe as ``RUN/recipe.toml``.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import GHLConfig
from .errors import GHLError

__all__ = ["RecipeError", "is_recipe", "read_recipe", "to_toml"]


class RecipeError(GHLError):
    """A recipe file that is missing, not TOML, or breaks the schema."""


_INT, _FLOAT, _STR, _BOOL, _SHAPE = "an integer", "a number", "a string", "true or false", "shape"
SCHEMA: dict[str, dict[str, str]] = {
    "model": {"file": _STR, "onnx": _STR, "entry": _STR, "input_shape": _SHAPE, "seed": _INT},
    "train": {
        "epochs": _INT,
        "batch_size": _INT,
        "lr": _FLOAT,
        "lr_plastic": _FLOAT,
        "wd_plastic": _FLOAT,
        "seed": _INT,
        "method": _STR,
        "augment": _BOOL,
        "out": _STR,
        "device": _STR,
        "autocast": _STR,
        "cuda_graph": _BOOL,
        "channels_last": _BOOL,
        "nproc_per_node": _INT,
        "backend": _STR,
    },
    "data": {"source": _STR},
}
TABLES = ("model", "ghl", "train", "data")


def is_recipe(path: str | Path) -> bool:
    """Whether ``path`` names a recipe (a ``.toml`` file)."""
    return Path(path).suffix.lower() == ".toml"


def _check(path: Path, table: str, key: str, kind: str, v: Any) -> None:
    ok = {
        _INT: isinstance(v, int) and not isinstance(v, bool),
        _FLOAT: isinstance(v, (int, float)) and not isinstance(v, bool),
        _STR: isinstance(v, str),
        _BOOL: isinstance(v, bool),
        _SHAPE: isinstance(v, list) and bool(v) and all(isinstance(d, int) and d > 0 for d in v),
    }[kind]
    if not ok:
        want = "a list of positive integers" if kind == _SHAPE else kind
        raise RecipeError(f"{path}: [{table}] {key}: expected {want}, got {v!r}")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe at ``path``, checked against the schema, with paths made absolute."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such file")
    try:
        d = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from None
    for table in d:
        if table not in TABLES:
            raise RecipeError(f"{path}: unknown table [{table}] (expected {', '.join(TABLES)})")
        if not isinstance(d[table], Mapping):
            raise RecipeError(f"{path}: {table} must be a table ([{table}])")
    for table, keys in SCHEMA.items():
        for key, v in d.get(table, {}).items():
            if key not in keys:
                raise RecipeError(f"{path}: unknown key [{table}] {key}")
            _check(path, table, key, keys[key], v)
    ghl_keys = {f.name for f in fields(GHLConfig)}
    for key in d.get("ghl", {}):
        if key not in ghl_keys:
            raise RecipeError(f"{path}: unknown key [ghl] {key} (not a GHLConfig field)")
    try:
        GHLConfig.from_dict(d.get("ghl", {}))
    except GHLError as e:
        raise RecipeError(f"{path}: [ghl] {e}") from None
    model = d.get("model", {})
    if ("file" in model) == ("onnx" in model):
        raise RecipeError(f"{path}: [model] needs exactly one of file and onnx")
    for key in ("file", "onnx"):
        if key in model:
            model[key] = str((path.parent / model[key]).resolve())
    return d


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string is a JSON string


def to_toml(d: Mapping[str, Mapping[str, Any]]) -> str:
    """A recipe (tables of scalars, lists and inline tables) as TOML text."""
    out = []
    for table in TABLES:
        if table in d:
            out.append(f"[{table}]")
            out += [f"{k} = {_value(v)}" for k, v in d[table].items() if v is not None]
            out.append("")
    return "\n".join(out)


# ---- the command line: `ghlc convert recipe.toml`, `ghlc train recipe.toml` --------------------
TRAIN_OPTION = {"out": "out_dir"}  # recipe key -> `ghlc train` parameter, where they differ


def _given(ctx: Any, name: str) -> bool:
    import click

    return ctx.get_parameter_source(name) not in (
        click.core.ParameterSource.DEFAULT,
        click.core.ParameterSource.DEFAULT_MAP,
    )


def convert_params(ctx: Any, recipe: str) -> dict[str, Any]:
    """``ghlc convert``'s parameters for a recipe: the recipe's, then the command line's."""
    r = read_recipe(recipe)
    model = r.get("model", {})
    p = dict(ctx.params)
    p["model_file"] = model.get("file") or model["onnx"]
    fill = {
        "entry": model.get("entry"),
        "input_shape": ",".join(map(str, model["input_shape"])) if "input_shape" in model else None,
        "seed": model.get("seed"),
        "config_path": recipe,  # the recipe's [ghl] table (cli._config reads it)
        "output": str(Path(recipe).with_suffix(".ghl")),
    }
    for k, v in fill.items():
        if v is not None and not _given(ctx, k):
            p[k] = v
    return p


def train_params(ctx: Any, recipe: str, convert: Any) -> dict[str, Any]:
    """Convert the recipe's model into the run folder, save the resolved recipe beside the
    run (``RUN/recipe.toml``) and return ``ghlc train``'s parameters for that artifact."""
    from .config import GHLConfig
    from .fileio import write_atomic

    r = read_recipe(recipe)
    p = dict(ctx.params)
    for key, v in r.get("train", {}).items():
        name = TRAIN_OPTION.get(key, key)
        if not _given(ctx, name):
            p[name] = v
    if "source" in r.get("data", {}) and not _given(ctx, "data"):
        p["data"] = r["data"]["source"]
    out = Path(p["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    art = out / "source.ghl"
    model = r.get("model", {})
    ctx.invoke(
        convert,
        model_file=model.get("file") or model["onnx"],
        entry=model.get("entry"),
        input_shape=",".join(map(str, model["input_shape"])) if "input_shape" in model else None,
        config_path=recipe,
        output=str(art),
        explain=False,
        seed=model.get("seed", 0),
    )
    resolved = {
        "model": model,
        "ghl": GHLConfig.from_dict(r.get("ghl", {})).to_dict(),
        "train": {k: p[TRAIN_OPTION.get(k, k)] for k in SCHEMA["train"]},
        "data": {"source": p["data"]},
    }
    resolved["train"]["out"] = str(out)
    write_atomic(out / "recipe.toml", to_toml(resolved))
    p["artifact"] = str(art)
    return p
