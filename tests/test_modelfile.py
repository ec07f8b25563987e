"""Finding the model in a user's model file: only real candidates, found without calling
anything but the one picked, and a one-line error that lists the choices."""

import textwrap

import pytest
import torch.nn as nn

from ghlc.modelfile import ModelFileError, candidates, import_file, load_model_file

# A file laid out like the popular CIFAR model collections: blocks that need arguments, a
# model class that needs arguments, factories, and a test() helper with side effects.
RESNET_LIKE = """
import pathlib
import torch
import torch.nn as nn

class Block(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))

class Net(nn.Module):
    def __init__(self, widths, num_classes=10):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(a, b) for a, b in zip((3,) + widths, widths)])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        return self.fc(self.blocks(x).mean((2, 3)))

def Net2():
    return Net((4, 8))

def Net3():
    return Net((4, 8, 8))

def conv3x3(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 3)

def test():
    pathlib.Path("test_ran").write_text("side effect")
    net = Net2()
    y = net(torch.randn(1, 3, 8, 8))
    print(y.size())
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_helpers_are_not_candidates_and_are_never_called(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, "resnet_like.py", RESNET_LIKE)
    found = candidates(import_file(p), p)
    assert found.factory == ["Net2", "Net3"]
    assert found.needs_args == ["Block", "Net"] and not found.klass and not found.maybe
    with pytest.raises(ModelFileError) as e:
        load_model_file(p)
    msg = str(e.value)
    assert "several models (Net2, Net3)" in msg and "--entry NAME, e.g. --entry Net2" in msg
    assert "test" not in msg.partition(": ")[2] and "\n" not in msg
    assert not (tmp_path / "test_ran").exists()
    loaded = load_model_file(p, "Net3")
    assert [m.conv.out_channels for m in loaded.model.blocks] == [4, 8, 8]
    assert not (tmp_path / "test_ran").exists()


def test_the_one_factory_is_picked_over_helpers_that_return_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = RESNET_LIKE.replace("def Net3():\n    return Net((4, 8, 8))\n", "")
    p = write(tmp_path, "one.py", text)
    loaded = load_model_file(p)
    assert loaded.entry == "Net2" and isinstance(loaded.model, nn.Module)
    assert not (tmp_path / "test_ran").exists()


@pytest.mark.parametrize(
    "body, kind",
    [
        ("def make() -> nn.Module:\n    return build()\n", "factory"),  # annotation
        ("def make() -> 'nn.Sequential':\n    return build()\n", "factory"),
        ("def make():\n    return nn.Sequential(nn.Linear(2, 2))\n", "factory"),
        ("def make():\n    m = Small()\n    m.apply(init)\n    return m\n", "factory"),
        ("def make():\n    return small()\n", "factory"),  # a factory calling a factory
        ("def make():\n    return TABLE['b']()\n", "maybe"),  # the source does not show it
        ("def make() -> int:\n    return 3\n", None),
        ("def make():\n    print('hi')\n", None),
    ],
)
def test_functions_are_told_apart_by_their_source(tmp_path, body, kind):
    text = (
        "import torch.nn as nn\n"
        "def build():\n    return nn.Linear(2, 2)\n"
        "def init(m):\n    pass\n"
        "def small():\n    return Small()\n"
        "class Small(nn.Module):\n    def __init__(self, n):\n        super().__init__()\n" + body
    )
    p = write(tmp_path, "f.py", text)
    found = candidates(import_file(p), p)
    assert ("make" in found.factory) == (kind == "factory")
    assert ("make" in found.maybe) == (kind == "maybe")
    assert found.factory[:1] == ["build"] and "small" in found.factory


def test_a_function_of_unknown_result_is_named_not_called(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write(
        tmp_path,
        "hub.py",
        """
        import pathlib
        def get_model():
            pathlib.Path("called").write_text("x")
            return load_somehow()
        """,
    )
    with pytest.raises(ModelFileError, match=r"--entry get_model, or annotate it `-> nn.Module`"):
        load_model_file(p)
    assert not (tmp_path / "called").exists()


def test_instances_and_no_argument_classes_are_found(tmp_path):
    p = write(
        tmp_path,
        "inst.py",
        """
        import torch.nn as nn
        class Net(nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.fc = nn.Linear(3, width)
        model = Net()
        """,
    )
    found = candidates(import_file(p), p)
    assert found.instance == ["model"] and found.klass == ["Net"]
    assert load_model_file(p).entry == "model"  # an instance before a class


def test_a_factory_that_fails_or_returns_no_module_is_a_one_line_error(tmp_path):
    p = write(
        tmp_path,
        "bad.py",
        """
        import torch.nn as nn
        def boom() -> nn.Module:
            raise ValueError("bad width\\nsecond line")
        def not_a_model():
            return 3
        """,
    )
    with pytest.raises(ModelFileError, match=r"boom\(\) failed: ValueError: bad width$"):
        load_model_file(p)
    with pytest.raises(ModelFileError, match=r"not_a_model\(\) returned int, not an nn.Module"):
        load_model_file(p, "not_a_model")
