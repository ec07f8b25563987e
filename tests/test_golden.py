"""Golden layer graphs of the example models.

Each file ``tests/golden/<name>.txt`` holds ``lg.to_text()`` of an example model after the
default passes (with the example's paper temperatures where it has them). A change to the
tracer or the passes that alters one of these graphs shows up here as a diff.

To accept an intended change, regenerate the files and review the diff in git::

    GHLC_UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

import pytest

import ghlc
from ghlc import passes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("GHLC_UPDATE_GOLDEN") == "1"

# golden name -> (example file, factory)
MODELS = {
    "deephebb": ("deephebb", "deephebb"),
    "fasthebb": ("fasthebb", "fasthebb"),
    "resnet18": ("resnet", "resnet18"),
    "mobilenetv2": ("mobilenet", "mobilenetv2"),
}


def load_example(stem: str):
    spec = importlib.util.spec_from_file_location(f"_ghlc_example_{stem}", EXAMPLES / f"{stem}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def layer_graph_text(name: str) -> str:
    stem, factory = MODELS[name]
    mod = load_example(stem)
    temps = getattr(mod, "TEMPERATURES", 1.0)
    lg = ghlc.trace(
        getattr(mod, factory)(), mod.example_inputs(), config=ghlc.GHLConfig(temperature=temps)
    )
    return passes.PassManager(passes.default_passes())(lg).to_text()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_golden_layer_graph(name):
    text = layer_graph_text(name)
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".txt.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return
    assert path.exists(), f"{path.name} missing: run GHLC_UPDATE_GOLDEN=1 pytest {__file__}"
    want = path.read_text()
    if text != want:
        diff = "".join(
            difflib.unified_diff(
                want.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"golden/{name}.txt",
                tofile="traced",
            )
        )
        pytest.fail(f"layer graph of {name} changed (GHLC_UPDATE_GOLDEN=1 to accept):\n{diff}")


def test_golden_paper_settings():
    """The goldens record the paper's temperatures and the backprop output layer."""
    deep = (GOLDEN / "deephebb.txt").read_text()
    temps = [ln.split()[1] for ln in deep.splitlines() if ln.startswith("  hebbian")]
    assert temps == ["T=1", "T=0.65", "T=0.25"]
    assert "head.fc.weight linear" in deep and "role=backprop output" in deep
    res = (GOLDEN / "resnet18.txt").read_text()
    assert res.count("role=plastic") == 20  # 17 3x3 convs + 3 1x1 downsample convs
    assert "global_sign grad_sign -> 20 hebbian" in res
