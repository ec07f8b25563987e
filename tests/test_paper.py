"""bench/accuracy.py --paper (bench/paper.py): the protocol's settings come from examples/,
the loop runs end to end on CPU, resumes, fits a time budget and rewrites its doc section."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def paper(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("paper")


def _npz(path: Path, n: int = 64, n_test: int = 40) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, n),
        x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, n_test),
    )
    return path


def test_settings_are_the_papers(paper):
    ns = paper.parse_args(["--epochs", "3"])
    ns.epochs_of, ns.data_name = {"fasthebb": 3, "deephebb": 3}, "cifar10-jpeg"
    f = paper.settings("fasthebb", "ghl", ns, 50000)
    d = paper.settings("deephebb", "bp", ns, 50000)
    assert (f["lr_conv"], f["wd_conv"], f["lr"], f["wd"]) == (5e-2, 1e-2, 1e-4, 0.0)
    assert (d["lr_conv"], d["wd_conv"], d["lr"], d["wd"]) == (1e-2, 5e-2, 5e-3, 0.0)
    for s in (f, d):
        assert s["batch_size"] == 64 and s["momentum"] == 0.0 and not s["augment"]
        assert s["mean"] == s["std"] == [0.5, 0.5, 0.5]
    assert sorted(set(d["temperatures"].values())) == [0.25, 0.65, 1.0]
    assert paper.run_name(f, 10000) == "paper-full-fasthebb-ghl-e3-s0-t10000"
    assert paper.parse_args([]).epochs is None  # None: each net's EPOCHS, 100
    assert paper.NETS["fasthebb"].EPOCHS == paper.NETS["deephebb"].EPOCHS == 100


@pytest.mark.slow  # about 10-20 s on two shared cores
def test_runs_resumes_and_reports(paper, tmp_path, capsys):
    data = _npz(tmp_path / "tiny.npz")
    doc = tmp_path / "ACC.md"
    doc.write_text(
        "# A\n\nbefore\n\n<!-- accuracy:paper:start -->\nold\n<!-- accuracy:paper:end -->\nafter\n"
    )
    argv = [
        "--device",
        "cpu",
        "--nets",
        "fasthebb",
        "--epochs",
        "2",
        "--data",
        str(data),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "res"),
        "--doc",
        str(doc),
    ]
    assert paper.main([*argv, "--methods", "ghl"]) == 0
    run = tmp_path / "runs" / "paper-tiny-fasthebb-ghl-e2-s0-t40"
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2] and (run / "last.pt").is_file()
    assert hist[1]["lr_plastic"] < 5e-2  # the cosine, per iteration
    # a cut run resumes from its checkpoint; a finished one is skipped
    (run / "metrics.jsonl").write_text(json.dumps(hist[0]) + "\n")
    capsys.readouterr()
    import torch

    ck = torch.load(run / "last.pt", weights_only=True)
    ck["epoch"], ck["history"] = 1, ck["history"][:1]
    torch.save(ck, run / "last.pt")
    assert paper.main([*argv, "--methods", "ghl"]) == 0
    out = capsys.readouterr().out
    assert "[resume]" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    assert paper.main(argv) == 0  # bp as well now
    text = doc.read_text()
    assert text.startswith("# A\n\nbefore\n") and text.endswith("after\n") and "old" not in text
    rows = [x for x in text.splitlines() if x.startswith("| fasthebb")]
    assert len(rows) == 2 and "| ghl |" in rows[0] and "83.96%" in rows[0] and "84.71%" in rows[1]
    assert "| 2/2 | 2 |" in rows[0]  # epochs, steps
    assert "](res/curves.png)" in text  # linked relative to the page
    curves = json.loads((tmp_path / "res" / "curves.json").read_text())
    assert curves[run.name]["epochs"] == [1, 2] and len(curves[run.name]["test_acc"]) == 2


def test_budget_and_bad_input(paper, tmp_path, capsys):
    data = _npz(tmp_path / "tiny.npz")
    base = [
        "--device",
        "cpu",
        "--nets",
        "fasthebb",
        "--data",
        str(data),
        "--no-report",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--probe-steps",
        "1",
    ]
    assert paper.main([*base, "--budget-s", "0.5"]) == 0  # nothing fits
    assert "0 epochs" in capsys.readouterr().out and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit, match="nowhere.npz not found"):
        paper.main(["--data", str(tmp_path / "nowhere.npz"), "--no-report"])
    with pytest.raises(SystemExit):
        paper.parse_args(["--nets", "resnet"])
    assert "unknown net resnet" in capsys.readouterr().err
