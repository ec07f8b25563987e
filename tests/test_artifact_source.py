"""Artifacts survive edits: the model source is found relative to the artifact when the
folder moves, and what must match is the model's structure, not the source's bytes (edits in
the modules the model file imports included)."""

import shutil
import warnings

import pytest
import torch

import ghlc
from ghlc.artifact import ArtifactError, SourceChangedWarning, read_meta
from ghlc.build import trace_and_build
from ghlc.modelfile import load_model_file

BLOCKS = """
import torch
import torch.nn as nn

class Block(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, stride=1)

    def forward(self, x):
        return torch.relu(self.conv(x))
"""

MODEL = """
import torch
import torch.nn as nn
from blocks import Block

def net() -> nn.Module:
    return nn.Sequential(Block(3, 4), Block(4, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 5))

def example_inputs():
    return (torch.randn(2, 3, 8, 8),)
"""


def convert(model_file, out):
    """What ``ghlc convert`` does, in this process."""
    torch.manual_seed(0)
    loaded = load_model_file(model_file)
    m, _ = trace_and_build(loaded.model, loaded.example_inputs, source=loaded.source())
    ghlc.save(m, out)
    return m


@pytest.fixture
def project(tmp_path):
    d = tmp_path / "project"
    d.mkdir()
    (d / "blocks.py").write_text(BLOCKS)
    (d / "model.py").write_text(MODEL)
    (d / "runs").mkdir()
    m = convert(d / "model.py", d / "runs" / "m.ghl")
    m.eval()
    x = torch.randn(3, 3, 8, 8)
    return d, x, m(x)


def load_quietly(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning expected
        return ghlc.load(path, **kw)


def test_the_artifact_finds_its_source_after_the_folder_moves(project, tmp_path):
    d, x, y = project
    src = read_meta(d / "runs" / "m.ghl")["source"]
    assert src["relpath"] == "../model.py" and src["deps"].keys() == {"blocks.py"}
    moved = shutil.move(d, tmp_path / "elsewhere")
    assert not (d / "model.py").exists()
    m = load_quietly(moved / "runs" / "m.ghl").eval()
    assert torch.equal(m(x), y)


def test_a_comment_in_the_source_loads_with_a_warning(project):
    d, x, y = project
    (d / "model.py").write_text("# a comment\n" + MODEL)
    with pytest.warns(SourceChangedWarning, match=r"changed since .* \(model.py\); its struct"):
        m = ghlc.load(d / "runs" / "m.ghl")
    assert torch.equal(m.eval()(x), y)
    ghlc.save(m, d / "runs" / "again.ghl")  # records the source as it is now
    load_quietly(d / "runs" / "again.ghl")


def test_an_edit_in_an_imported_module_is_caught(project):
    d, x, y = project
    (d / "blocks.py").write_text(BLOCKS + "\n# tidied\n")
    with pytest.warns(SourceChangedWarning, match=r"\(blocks.py\)"):
        ghlc.load(d / "runs" / "m.ghl")
    # same parameters, another layer graph: the stride changes every later shape
    (d / "blocks.py").write_text(BLOCKS.replace("stride=1", "stride=2"))
    with pytest.raises(ArtifactError) as e:
        ghlc.load(d / "runs" / "m.ghl")
    msg = str(e.value)
    assert (
        "does not match the artifact: layer 0.conv.weight: out_shape 2x4x4x4 in the model, " in msg
    )
    assert msg.endswith("--model-file PATH (ghlc.load: model_file=)") and "\n" not in msg


def test_a_changed_layer_is_refused_and_model_file_is_the_way_out(project):
    d, x, y = project
    shutil.copy(d / "model.py", d / "model_v1.py")
    (d / "model.py").write_text(
        MODEL.replace("Block(4, 6)", "Block(4, 8)").replace("(6, 5)", "(8, 5)")
    )
    with pytest.raises(
        ArtifactError, match=r"1.conv.weight is 8x4x3x3 in the model, 6x4x3x3 in the"
    ):
        ghlc.load(d / "runs" / "m.ghl")
    m = load_quietly(d / "runs" / "m.ghl", model_file=d / "model_v1.py")
    assert torch.equal(m.eval()(x), y)
    ghlc.save(m, d / "runs" / "v1.ghl")
    assert read_meta(d / "runs" / "v1.ghl")["source"]["relpath"] == "../model_v1.py"
    with pytest.raises(ArtifactError, match=r"the model in .*model.py does not match the artifact"):
        ghlc.load(d / "runs" / "m.ghl", model_file=d / "model.py")


def test_a_missing_source_names_the_way_out(project):
    d, _, _ = project
    (d / "model.py").unlink()
    with pytest.raises(
        ArtifactError, match=r"model source .*model.py or ../model.py not found; give"
    ):
        ghlc.load(d / "runs" / "m.ghl")


def test_a_model_with_an_extra_buffer_is_refused(project):
    d, _, _ = project
    buffer = "\n    m.register_buffer('scale', torch.ones(1))\n    return m"
    text = MODEL.replace("    return nn.Sequential(", "    m = nn.Sequential(")
    text = text.replace("nn.Linear(6, 5))", "nn.Linear(6, 5))" + buffer)
    (d / "model.py").write_text(text)
    with pytest.raises(ArtifactError, match=r"the model has scale \(1\), which the artifact lacks"):
        ghlc.load(d / "runs" / "m.ghl")


class ValueBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3)
        self.b = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)  # the example takes branch a


def test_the_structure_is_checked_on_the_example_inputs_themselves(tmp_path):
    x = torch.ones(1, 3, 8, 8)
    ghlc.save(ghlc.prepare(ValueBranch(), (x,)), tmp_path / "m.ghl")
    for _ in range(5):  # random inputs would take branch b half the time
        load_quietly(tmp_path / "m.ghl", model=ValueBranch())
