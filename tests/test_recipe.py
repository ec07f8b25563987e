"""ghlc train/convert recipe.toml: schema errors name the key, flags override, the resolved
recipe is saved beside the run; the paper nets' recipes in examples/ are valid."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ghlc.cli import main
from ghlc.config import GHLConfig
from ghlc.recipe import read_recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL = """
import torch
import torch.nn as nn

def tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 10))
"""


def run_cli(*args: object) -> tuple[int, str, str]:
    from click.testing import CliRunner

    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "tiny.py").write_text(MODEL)
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


BASE = """
[model]
file = "tiny.py"
input_shape = [2, 1, 8, 8]
[ghl]
temperature = 0.5
[train]
epochs = 1
batch_size = 64
out = "run"
[data]
source = "digits"
"""


def test_paper_recipes_are_valid():
    fast = read_recipe(EXAMPLES / "fasthebb.toml")
    deep = read_recipe(EXAMPLES / "deephebb.toml")
    assert Path(fast["model"]["file"]).is_file() and Path(deep["model"]["file"]).is_file()
    cfg = GHLConfig.from_dict(deep["ghl"])
    assert cfg.temperature_for("block2.conv") == 0.65
    assert fast["train"]["lr_plastic"] == 5e-2 and deep["train"]["lr_plastic"] == 1e-2


@pytest.mark.parametrize(
    "edit, message",
    [
        (("epochs = 1", "epochs = 'one'"), "[train] epochs: expected an integer, got 'one'"),
        (("epochs = 1", "epoch = 1"), "unknown key [train] epoch"),
        (("temperature = 0.5", "temprature = 0.5"), "unknown key [ghl] temprature"),
        (("temperature = 0.5", "competition = 'max'"), "[ghl] competition='max' is not one"),
        (("[data]", "[dataset]"), "unknown table [dataset]"),
        (("input_shape = [2, 1, 8, 8]", "input_shape = [2, 0]"), "[model] input_shape"),
        (('file = "tiny.py"', 'onnx = "a.onnx"\nfile = "tiny.py"'), "exactly one of file and onnx"),
        (("epochs = 1", "epochs = "), "invalid TOML"),
    ],
)
def test_a_bad_recipe_is_a_one_line_error_naming_the_key(tmp_path, edit, message):
    p = write(tmp_path, BASE.replace(*edit))
    for cmd in ("convert", "train"):
        code, _, err = run_cli(cmd, p)
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert message in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.ghl").exists()


def test_convert_recipe_uses_its_model_and_config(tmp_path):
    p = write(tmp_path, BASE)
    code, out, err = run_cli("convert", p)
    assert code == 0, err
    assert (tmp_path / "r.ghl").is_file()
    assert "0.5" in out  # the recipe's temperature in the layer table


def test_train_recipe_with_flags_overriding_saves_the_resolved_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, BASE)
    code, out, err = run_cli("train", p, "--batch-size", "128", "--lr", "0.002")
    assert code == 0, err
    run = tmp_path / "run"
    assert (run / "model.ghl").is_file() and (run / "last.pt").is_file()
    saved = tomllib.loads((run / "recipe.toml").read_text())
    assert saved["train"]["batch_size"] == 128 and saved["train"]["lr"] == 0.002
    assert saved["train"]["epochs"] == 1 and saved["ghl"]["temperature"] == 0.5
    assert saved["data"]["source"] == "digits"
    assert read_recipe(run / "recipe.toml")["model"]["file"] == str(tmp_path / "tiny.py")
