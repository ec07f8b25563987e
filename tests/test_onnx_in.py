"""ONNX in: torch model -> ONNX (with and without constant folding) -> ghlc convert -> one GHL
step against the float64 oracle on the converted module -> ghlc export -> onnxruntime."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import oracle  # noqa: E402
import pytest
import torch
import torch.nn as nn

import ghlc  # noqa: E402
from ghlc.artifact import load, read_meta  # noqa: E402
from ghlc.cli import main  # noqa: E402
from ghlc.onnx_in import FoldedNormWarning, converter_available, load_onnx  # noqa: E402

if not converter_available():
    pytest.skip("the onnx-in extra (onnx2torch) is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.deephebb import deephebb  # noqa: E402
from examples.fasthebb import fasthebb  # noqa: E402
from examples.mobilenet import mobilenetv2  # noqa: E402
from examples.resnet import resnet18  # noqa: E402


class ResCatGroup(nn.Module):
    """Residual adds, a concat, a grouped conv, a BatchNorm after a conv and a MatMul weight."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.group = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.mix = nn.Conv2d(16, 8, 1)
        self.w = nn.Parameter(torch.randn(8, 12) / 3)
        self.head = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn(self.stem(x)))
        b = torch.relu(self.group(a)) + a
        c = self.mix(torch.cat([a, b], 1)) + b
        v = c.mean((2, 3)) @ self.w
        return self.head(torch.relu(v))


NETS = {
    "rescatgroup": (ResCatGroup, (3, 10, 10)),
    "fasthebb": (fasthebb, (3, 32, 32)),
    "deephebb": (deephebb, (3, 32, 32)),
    "resnet18": (resnet18, (3, 16, 16)),
    "mobilenetv2": (mobilenetv2, (3, 16, 16)),
}
CFG = ghlc.GHLConfig(plastic=("conv", "linear"))


def export_torch(model: nn.Module, path: Path, shape: tuple, fold: bool) -> None:
    torch.manual_seed(1)
    model.train()  # give BatchNorm non-trivial running statistics
    with torch.no_grad():
        model(torch.randn(8, *shape))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, *shape),),
            str(path),
            dynamo=False,
            do_constant_folding=fold,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    target = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return ((out - target) ** 2).mean()


def run_cli(*args: object) -> tuple[int, str, str]:
    from click.testing import CliRunner

    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def round_trip(tmp_path: Path, net: str, fold: bool) -> None:
    make, shape = NETS[net]
    torch.manual_seed(0)
    src = tmp_path / f"{net}.onnx"
    export_torch(make(), src, shape, fold)

    code, out, err = run_cli("convert", src, "-o", tmp_path / "m.ghl")
    assert code == 0, err
    assert "GHL" in out
    meta = read_meta(tmp_path / "m.ghl")
    assert meta["source"]["format"] == "onnx"
    plastic = [i.name for i in meta["graph"].plastic()]
    assert plastic and all(".weight" in n for n in plastic)

    # one step in float64: the artifact's module (rebuilt from the ONNX file) vs the oracle
    m = load(tmp_path / "m.ghl").double()
    plain = load_onnx(src, quiet=True).model.double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    h, g, _ = oracle.run_plain(plain, (x,), plastic, loss_fn)
    m.train()
    m.zero_grad(set_to_none=True)
    loss_fn(m(x)).backward()
    params = dict(m.named_parameters())
    for n, p in params.items():
        assert p.grad is not None, n
        exp = oracle.expected_grad(h[n], g[n]) if n in plastic else g[n]
        err_rel = (p.grad - exp).norm() / exp.norm().clamp_min(1e-30)
        assert err_rel <= 1e-9, f"{net} fold={fold} {n}: rel err {err_rel:.3g}"
    assert any(params[n].grad.abs().max() == 1 for n in plastic)  # |H_n| reaches 1

    # export the (float32) artifact and check the ONNX file against the converted module
    code, out, err = run_cli("export", tmp_path / "m.ghl", "-o", tmp_path / "out.onnx")
    assert code == 0, err
    import onnxruntime as ort

    ref_model = load(tmp_path / "m.ghl").eval()
    xs = torch.randn(3, *shape)
    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})[0]
    with torch.no_grad():
        want = ref_model(xs).numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_residual_concat_grouped_model_round_trips(tmp_path, fold):
    round_trip(tmp_path, "rescatgroup", fold)


@pytest.mark.slow
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("net", ["fasthebb", "deephebb", "resnet18", "mobilenetv2"])
def test_paper_nets_round_trip(tmp_path, net, fold):
    round_trip(tmp_path, net, fold)


def test_weights_of_conv_gemm_and_matmul_are_parameters(tmp_path):
    export_torch(ResCatGroup(), tmp_path / "m.onnx", (3, 10, 10), fold=False)
    m = load_onnx(tmp_path / "m.onnx", quiet=True).model
    params = {n: p for n, p in m.named_parameters()}
    buffers = {n: b for n, b in m.named_buffers()}
    shapes = sorted(tuple(p.shape) for p in params.values())
    # stem, group, mix convs; the MatMul weight (as F.linear's (out, in)); the Gemm head; BN
    for s in [(8, 3, 3, 3), (8, 2, 3, 3), (8, 16, 1, 1), (12, 8), (5, 12)]:
        assert s in shapes, s
    assert sum(p.numel() for p in params.values()) == sum(
        p.numel() for p in ResCatGroup().parameters()
    )
    # BatchNorm's running statistics stay buffers, and training updates them in place
    assert sorted(b.numel() for b in buffers.values() if b.is_floating_point()) == [8, 8]
    before = {n: b.clone() for n, b in buffers.items()}
    m.train()
    m(torch.randn(4, 3, 10, 10))
    assert any(not torch.equal(before[n], b) for n, b in m.named_buffers())


def test_folded_batchnorm_is_warned_about(tmp_path):
    export_torch(ResCatGroup(), tmp_path / "f.onnx", (3, 10, 10), fold=True)
    export_torch(ResCatGroup(), tmp_path / "u.onnx", (3, 10, 10), fold=False)
    with pytest.warns(FoldedNormWarning, match="folded"):
        load_onnx(tmp_path / "f.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FoldedNormWarning)
        load_onnx(tmp_path / "u.onnx")
    code, _, err = run_cli("convert", tmp_path / "f.onnx", "-o", tmp_path / "f.ghl")
    assert code == 0 and "warning:" in err and "BatchNorm" in err


def _one_line_error(code: int, err: str) -> str:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_unsupported_operator_is_a_one_line_error_naming_it(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Det", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(proto, str(tmp_path / "det.onnx"))
    code, _, err = run_cli("convert", tmp_path / "det.onnx", "-o", tmp_path / "det.ghl")
    line = _one_line_error(code, err)
    assert "operator Det (opset 17) is not supported" in line
    assert not (tmp_path / "det.ghl").exists()


def test_a_file_that_is_not_onnx_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.onnx").write_text("this is not a model\n")
    code, _, err = run_cli("convert", tmp_path / "bad.onnx", "-o", tmp_path / "bad.ghl")
    assert "not an ONNX model" in _one_line_error(code, err)
    assert not (tmp_path / "bad.ghl").exists()


def test_artifact_of_a_changed_onnx_file_loads_only_with_the_same_structure(tmp_path):
    from ghlc.artifact import SourceChangedWarning

    export_torch(ResCatGroup(), tmp_path / "m.onnx", (3, 10, 10), fold=True)
    code, _, err = run_cli("convert", tmp_path / "m.onnx", "-o", tmp_path / "m.ghl")
    assert code == 0, err
    torch.manual_seed(5)  # other weights, same graph: loads (the weights are the artifact's)
    export_torch(ResCatGroup(), tmp_path / "m.onnx", (3, 10, 10), fold=True)
    with pytest.warns(SourceChangedWarning, match="m.onnx"):
        load(tmp_path / "m.ghl")
    export_torch(ResCatGroup(), tmp_path / "m.onnx", (3, 10, 10), fold=False)  # + BatchNorm
    code, _, err = run_cli("export", tmp_path / "m.ghl", "-o", tmp_path / "o.onnx")
    assert "does not match the artifact" in _one_line_error(code, err)
    assert not (tmp_path / "o.onnx").exists()


def test_train_recipe_naming_an_onnx_file(tmp_path, monkeypatch):
    import tomllib

    monkeypatch.chdir(tmp_path)
    export_torch(ResCatGroup(classes=10), tmp_path / "m.onnx", (3, 10, 10), fold=False)
    (tmp_path / "r.toml").write_text(
        '[model]\nonnx = "m.onnx"\n[ghl]\nplastic = ["conv", "linear"]\n'
        '[train]\nepochs = 1\nbatch_size = 256\nout = "run"\n[data]\nsource = "digits"\n'
    )
    code, out, err = run_cli("train", tmp_path / "r.toml")
    assert code == 0, err
    assert "test acc" in out
    meta = read_meta(tmp_path / "run" / "model.ghl")
    assert meta["source"]["format"] == "onnx"
    assert {i.name for i in meta["graph"].plastic()} >= {"stem/Conv.weight", "MatMul.weight"}
    saved = tomllib.loads((tmp_path / "run" / "recipe.toml").read_text())
    assert saved["model"]["onnx"] == str(tmp_path / "m.onnx")
    trained = load(tmp_path / "run" / "model.ghl")  # rebuilt from the ONNX file
    fresh = load_onnx(tmp_path / "m.onnx", quiet=True).model
    assert not torch.equal(
        trained.state_dict()["stem/Conv.weight"], fresh.state_dict()["stem/Conv.weight"]
    )


def test_a_graph_whose_weights_all_sit_in_modules_converts(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    export_torch(net, tmp_path / "s.onnx", (3, 10, 10), fold=True)
    m = load_onnx(tmp_path / "s.onnx", quiet=True).model
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in net.parameters())
    assert not list(m.buffers())
