"""End-to-end CLI tests: the commands run as a user would run them (subprocess); error
paths that need no process of their own run in this process (``cli``)."""

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

MODEL = """
import torch
import torch.nn as nn

def tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))

def example_inputs():
    return (torch.randn(1, 1, 8, 8),)
"""


def ghlc(*args, cwd, check=True, env=None, max_file_bytes=None):
    def limits():  # in the child: umask 022, and files capped as on a nearly full disk
        os.umask(0o022)
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    r = subprocess.run(
        [sys.executable, "-m", "ghlc.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limits,
        env=None if env is None else {**os.environ, **env},
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def cli(*args, cwd) -> subprocess.CompletedProcess:
    """The CLI run in this process by click's test runner, for error paths that need no
    process of their own (no file-size limit, umask, environment or closed pipe): the same
    code without an interpreter start and a torch import per call. An exception that escapes
    the CLI leaves stderr empty, so ``one_line_error`` fails on it."""
    from click.testing import CliRunner

    from ghlc.cli import main

    rng = torch.get_rng_state()  # (convert seeds torch)
    try:
        with contextlib.chdir(cwd), warnings.catch_warnings():
            res = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        torch.set_rng_state(rng)
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


@pytest.fixture
def work(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    return tmp_path


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """``ghlc convert model.py`` run once for the module (test_convert_is_seeded checks that
    converting again gives the same weights)."""
    d = tmp_path_factory.mktemp("converted")
    (d / "model.py").write_text(MODEL)
    ghlc("convert", "model.py", cwd=d)
    return d / "model.ghl"


@pytest.fixture
def model_ghl(work, converted):
    """``work`` also holds the converted model.ghl."""
    shutil.copy2(converted, work / "model.ghl")


@pytest.fixture(scope="module")
def trained(converted) -> Path:
    """``ghlc train model.ghl --data digits --epochs 1 --out ok`` run once for the module:
    the folder holding model.ghl and the run folder ok/ (copy it, permissions kept)."""
    ghlc(
        "train",
        "model.ghl",
        "--data",
        "digits",
        "--epochs",
        "1",
        "--out",
        "ok",
        cwd=converted.parent,
    )
    return converted.parent


def one_line_error(r, pattern):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert pattern in lines[0], lines[0]


def test_convert_train_eval_export(work):
    r = ghlc("convert", "model.py", "--explain", cwd=work)
    assert "GHL" in r.stdout and "2 of 3 layers plastic" in r.stdout
    assert "warning" not in r.stderr
    assert "output layer" in r.stdout or "not in config.plastic" in r.stdout
    assert (work / "model.ghl").is_file()
    r = ghlc("inspect", "model.ghl", "--format", "json", cwd=work)
    assert '"global_sign"' in r.stdout
    r = ghlc(
        "train",
        "model.ghl",
        "--data",
        "digits",
        "--epochs",
        "2",
        "--out",
        "run",
        "--device",
        "cpu",
        cwd=work,
    )
    assert "training on cpu" in r.stdout
    assert (work / "run" / "last.pt").is_file() and (work / "run" / "metrics.jsonl").is_file()
    assert len((work / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    r = ghlc("eval", "run/last.pt", "--data", "digits", cwd=work)
    assert "accuracy" in r.stdout
    r = ghlc("export", "run/model.ghl", "-o", "m.onnx", cwd=work)
    assert (work / "m.onnx").is_file() and "max abs diff" in r.stdout


@pytest.mark.usefixtures("model_ghl")
def test_train_channels_last_then_export(work):
    """--channels-last trains (recorded in the checkpoint); the saved model and its ONNX
    export are in the standard layout as always."""
    r = ghlc(
        "train",
        "model.ghl",
        "--data",
        "digits",
        "--epochs",
        "1",
        "--out",
        "run",
        "--device",
        "cpu",
        "--channels-last",
        cwd=work,
    )
    assert "test acc" in r.stdout
    import torch

    ck = torch.load(work / "run" / "last.pt", weights_only=True)
    assert ck["hparams"]["channels_last"] is True
    r = ghlc("export", "run/model.ghl", "-o", "m.onnx", cwd=work)
    assert (work / "m.onnx").is_file() and "max abs diff" in r.stdout


@pytest.mark.usefixtures("model_ghl")
def test_train_under_autocast(work):
    r = ghlc(
        "train",
        "model.ghl",
        "--data",
        "digits",
        "--epochs",
        "1",
        "--out",
        "run",
        "--device",
        "cpu",
        "--autocast",
        "bf16",
        cwd=work,
    )
    assert "test acc" in r.stdout
    import torch

    ck = torch.load(work / "run" / "last.pt", weights_only=True)
    assert ck["hparams"]["autocast"] == "bfloat16"
    from ghlc.train import slow_bf16

    slow = slow_bf16(torch.device("cpu"))  # this machine's CPU: one warning line, or none
    assert r.stderr.count("warning: bfloat16 autocast") == (slow is not None), r.stderr
    r = cli("train", "model.ghl", "--autocast", "fp16", cwd=work)
    assert r.returncode == 2 and "Invalid value for '--autocast'" in r.stderr, r.stderr
    one_line_error(
        cli("train", "model.ghl", "--device", "cpu", "--cuda-graph", "--out", "graphed", cwd=work),
        "--cuda-graph needs a CUDA device",
    )
    assert not (work / "graphed").exists()


def test_convert_warns_when_nothing_is_plastic(work):
    (work / "head.py").write_text(
        "import torch.nn as nn\n"
        "def head():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))\n"
    )
    r = ghlc("convert", "head.py", "--input-shape", "2,3,2,2", cwd=work)
    assert "0 of 1 layers plastic" in r.stdout
    assert r.stderr.strip().startswith("warning: no layer is plastic")
    assert (work / "head.ghl").is_file()


def test_bad_inputs(work):
    one_line_error(cli("convert", "missing.py", cwd=work), "no such file")
    (work / "syn.py").write_text("def f(:\n")
    one_line_error(cli("convert", "syn.py", cwd=work), "syntax error")
    (work / "imp.py").write_text("import not_a_module_xyz\n")
    one_line_error(cli("convert", "imp.py", cwd=work), "failed to import")
    (work / "none.py").write_text("x = 1\n")
    one_line_error(cli("convert", "none.py", cwd=work), "no model found")
    (work / "two.py").write_text(
        "import pathlib\nimport torch.nn as nn\ndef a():\n    return nn.Linear(2, 2)\n"
        "def b():\n    return nn.Linear(2, 2)\n"
        "def test():\n    pathlib.Path('ran').touch()\n    print(a())\n"
    )
    one_line_error(
        cli("convert", "two.py", cwd=work),
        "two.py: several models (a, b); pick one with --entry NAME, e.g. --entry a",
    )
    assert not (work / "ran").exists()  # the helper was not called
    (work / "args.py").write_text(
        "import torch.nn as nn\nclass M(nn.Module):\n"
        "    def __init__(self, n):\n        super().__init__()\n"
    )
    one_line_error(cli("convert", "args.py", cwd=work), "constructor arguments")
    one_line_error(
        cli("convert", "model.py", "--input-shape", "1,3", cwd=work), "fails on the example inputs"
    )
    one_line_error(cli("convert", "model.py", "-o", "nodir/x.ghl", cwd=work), "does not exist")
    (work / "junk.ghl").write_bytes(b"not an artifact")
    one_line_error(cli("inspect", "junk.ghl", cwd=work), "not a ghlc artifact")
    for opt in ("--lr", "--lr-plastic", "--wd-plastic"):  # rejected before any work
        r = cli("train", "junk.ghl", opt, "-1", cwd=work)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"Invalid value for '{opt}'" in r.stderr, r.stderr


def test_a_full_disk_leaves_nothing_behind(work, trained):
    # A file-size limit makes writes fail with an OSError (EFBIG) just as a full disk does
    # (ENOSPC): every writer must give one line naming the file, and leave no part of it.
    shutil.copy2(trained / "model.ghl", work)
    shutil.copytree(trained / "ok", work / "ok")
    for name in ("model.ghl", "ok/model.ghl", "ok/last.pt", "ok/metrics.jsonl", "ok/curves.png"):
        assert (work / name).stat().st_mode & 0o777 == 0o644, name  # as open() under umask
    art, ckpt = (work / "ok" / n for n in ("model.ghl", "last.pt"))
    assert art.stat().st_size < ckpt.stat().st_size
    r = ghlc("convert", "model.py", "-o", "full.ghl", cwd=work, check=False, max_file_bytes=512)
    one_line_error(r, "full.ghl: cannot write: File too large")
    between = (art.stat().st_size + ckpt.stat().st_size) // 2  # the artifact fits, not last.pt
    r = ghlc(
        "train",
        "model.ghl",
        "--data",
        "digits",
        "--epochs",
        "1",
        "--out",
        "run",
        cwd=work,
        check=False,
        max_file_bytes=between,
    )
    one_line_error(r, "last.pt: cannot write: File too large")
    r = ghlc("export", "ok/model.ghl", "-o", "m.onnx", cwd=work, check=False, max_file_bytes=512)
    one_line_error(r, "m.onnx: cannot write: File too large")
    assert not (work / "full.ghl").exists() and not (work / "m.onnx").exists()
    assert not (work / "run" / "last.pt").exists()
    assert not [p.name for p in work.rglob("*.tmp")]


@pytest.mark.usefixtures("model_ghl")
def test_labels_beyond_the_model_outputs(work):
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 8, 8), dtype=np.float32)
    np.savez(
        work / "many.npz",
        x_train=x,
        y_train=np.array([0, 1, 2, 3, 4, 12]),
        x_test=x,
        y_test=np.zeros(6, dtype=np.int64),
    )
    r = cli("train", "model.ghl", "--data", "many.npz", "--out", "run", cwd=work)
    one_line_error(r, "label 12 out of range: the model gives 10 outputs")
    assert not (work / "run").exists()
    np.savez(
        work / "many_test.npz",
        x_train=x,
        y_train=np.zeros(6, dtype=np.int64),
        x_test=x,
        y_test=np.array([0, 1, 2, 3, 4, 12]),
    )
    r = cli("eval", "model.ghl", "--data", "many_test.npz", cwd=work)
    one_line_error(r, "label 12 out of range: the model gives 10 outputs")


@pytest.mark.usefixtures("model_ghl")
def test_truncated_and_future_artifacts(work):
    data = (work / "model.ghl").read_bytes()
    (work / "trunc.ghl").write_bytes(data[: len(data) // 2])
    one_line_error(cli("inspect", "trunc.ghl", cwd=work), "trunc.ghl")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(work / "model.ghl"), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["version"] = "99"
    save_file(tensors, str(work / "future.ghl"), metadata=meta)
    one_line_error(cli("inspect", "future.ghl", cwd=work), "newer ghlc")


@pytest.mark.usefixtures("model_ghl")
def test_bad_data(work):
    np.savez(work / "d.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4))
    r = cli("train", "model.ghl", "--data", "d.npz", "--out", "r", cwd=work)
    one_line_error(r, "x_test")
    r = ghlc(
        "train",
        "model.ghl",
        "--data",
        "digits",
        "--out",
        "r2",
        cwd=work,
        check=False,
        env={"GHLC_FUSED": "fast"},
    )
    one_line_error(r, "GHLC_FUSED='fast' is not one of auto, on, off")
    assert not (work / "r2").exists()  # nothing half-written


def test_version_and_help(work):
    assert "convert" in ghlc("--help", cwd=work).stdout
    assert Path(work).is_dir()


@pytest.mark.usefixtures("model_ghl")
def test_methods_and_resume(work, trained):
    for method in ("bp", "hebbian"):
        ghlc("train", "model.ghl", "--epochs", "1", "--method", method, "--out", method, cwd=work)
        assert (work / method / "last.pt").is_file()
    shutil.copytree(trained / "ok", work / "r")  # one epoch done
    r = ghlc("train", "model.ghl", "--epochs", "3", "--out", "r", "--resume", cwd=work)
    assert "epochs 3" in r.stdout
    assert len((work / "r" / "metrics.jsonl").read_text().splitlines()) == 3
    r = ghlc("eval", "bp/model.ghl", cwd=work)
    assert "accuracy" in r.stdout


@pytest.mark.usefixtures("model_ghl")
def test_train_device(work):
    for bad in ("tpu", "cuda:x"):
        r = cli("train", "model.ghl", "--device", bad, "--out", "d", cwd=work)
        one_line_error(r, f"--device {bad!r}: expected")
    if not torch.cuda.is_available():
        r = cli("train", "model.ghl", "--device", "cuda", "--out", "d", cwd=work)
        one_line_error(r, "--device cuda: no CUDA device is available")
        r = ghlc("train", "model.ghl", "--epochs", "1", "--out", "auto", cwd=work)
        assert "training on cpu" in r.stdout  # auto without CUDA
    else:
        r = ghlc("train", "model.ghl", "--device", "cuda:99", "--out", "d", cwd=work, check=False)
        one_line_error(r, "CUDA device(s)")
    assert not (work / "d").exists()  # nothing half-written


@pytest.mark.usefixtures("model_ghl")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_train_on_cuda(work):
    r = ghlc("train", "model.ghl", "--epochs", "2", "--device", "cuda", "--out", "g", cwd=work)
    assert "training on cuda" in r.stdout and "epochs 2" in r.stdout
    r = ghlc(
        "train",
        "model.ghl",
        "--epochs",
        "3",
        "--device",
        "cuda",
        "--out",
        "g",
        "--resume",
        cwd=work,
    )
    assert "epochs 3" in r.stdout
    assert "accuracy" in ghlc("eval", "g/model.ghl", cwd=work).stdout  # saved for CPU


def test_convert_is_seeded(work, converted):
    from safetensors import safe_open

    def weights(path):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    ghlc("convert", "model.py", "-o", "b.ghl", cwd=work)
    ghlc("convert", "model.py", "-o", "c.ghl", "--seed", "1", cwd=work)
    a, b, c = weights(converted), weights(work / "b.ghl"), weights(work / "c.ghl")
    assert a.keys() == b.keys() and any(k.endswith("weight") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.usefixtures("model_ghl")
def test_closed_stdout_is_quiet(work):
    r, w = os.pipe()
    os.close(r)  # nobody reads: as after `| head` has exited
    try:
        p = subprocess.run(
            [sys.executable, "-m", "ghlc.cli", "inspect", "model.ghl"],
            cwd=work,
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(w)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "Broken pipe" not in p.stderr, p.stderr
    assert p.stderr == ""


BRANCHY = """
import torch
import torch.nn as nn

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: neither fx nor torch.export takes it
            x = x * 2
        return self.head(self.a(x).mean((2, 3)))

def example_inputs():
    return (torch.ones(1, 1, 8, 8),)
"""


def test_convert_names_the_capture_in_one_line_and_torch_stays_quiet(work):
    r = cli("convert", "model.py", cwd=work)
    assert r.stdout.splitlines()[-2].endswith("layers plastic (GHL); capture: fx"), r.stdout
    (work / "branchy.py").write_text(BRANCHY)
    r = ghlc("convert", "branchy.py", cwd=work)
    line = "1 of 2 layers plastic (GHL); capture: hooks (fx, torch.export did not apply; --explain"
    assert line in r.stdout and "failed" not in r.stdout
    assert r.stderr == "" and "def forward" not in r.stdout  # no graph dump, no torch logs
    r = cli("convert", "branchy.py", "--explain", cwd=work)
    why = r.stdout.split("why the earlier captures did not apply:\n")[1].splitlines()
    assert why[0] == (
        "  fx: TraceError: symbolically traced variables cannot be used as inputs to control flow"
    )
    assert why[1].startswith("  torch.export: GuardOnDataDependentSymNode: Could not guard on")
    assert why[1].endswith(")") and r.stderr == ""


@pytest.mark.usefixtures("model_ghl")
def test_an_edited_model_file_warns_or_is_refused_with_the_way_out(work):
    shutil.copy(work / "model.py", work / "model_v1.py")
    (work / "model.py").write_text("# a comment\n" + MODEL)
    r = cli("eval", "model.ghl", "--data", "digits", cwd=work)
    assert r.returncode == 0 and "accuracy" in r.stdout
    assert r.stderr.startswith("warning: model.ghl: model source changed since the artifact")
    assert len(r.stderr.strip().splitlines()) == 1
    (work / "model.py").write_text(MODEL.replace("nn.Conv2d(1, 4, 3,", "nn.Conv2d(1, 5, 3,"))
    for cmd in (("eval", "model.ghl"), ("export", "model.ghl", "-o", "m.onnx")):
        one_line_error(cli(*cmd, cwd=work), "does not match the artifact: 0.weight is 5x1x3x3 in")
        one_line_error(cli(*cmd, cwd=work), "--model-file PATH")
    assert not (work / "m.onnx").exists()
    r = cli("export", "model.ghl", "-o", "m.onnx", "--model-file", "model_v1.py", cwd=work)
    assert r.returncode == 0 and r.stderr == "" and (work / "m.onnx").is_file()
