"""Smoke runs: ``max_steps`` ends a run early (the cosine spans the steps made), and
``eval_batches`` scores only the first test batches; the CLI's ``--max-steps`` and
``--eval-batches``."""

import json

import pytest
import torch
from test_cli import MODEL, cli
from test_train import make_data, make_model, run, state

import ghlc.train as T
from ghlc.errors import GHLError


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setattr(T, "_plot", lambda path, history: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_max_steps_stops_mid_epoch_with_the_cosine_over_the_steps_made(tmp_path):
    # 64 samples in batches of 16: 4 steps an epoch; 6 steps = one epoch and half the next
    _, res = run("ghl", tmp_path, epochs=3, max_steps=6)
    assert res.epochs_run == 2
    ck = _ckpt(tmp_path / "last.pt")
    assert ck["epoch"] == 2 and ck["scheduler"]["last_epoch"] == 6
    assert ck["scheduler"]["T_max"] == 6 and ck["hparams"]["max_steps"] == 6
    # the schedule reached its end: both groups' LRs are 0 after the last of the 6 steps
    assert [g["lr"] for g in ck["optimizer"]["param_groups"]] == pytest.approx([0.0, 0.0])
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]


def test_max_steps_beyond_the_run_changes_nothing(tmp_path):
    a, _ = run("ghl", tmp_path / "a", epochs=2)
    b, _ = run("ghl", tmp_path / "b", epochs=2, max_steps=1000)
    sa, sb = state(a), state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_eval_batches_scores_the_first_test_batches(tmp_path):
    m, res = run("ghl", tmp_path, epochs=1, eval_batches=1)  # 1 batch of 16 of 32 images
    xt, yt = make_data(32, seed=1)
    first = T.evaluate(m, xt[:16], yt[:16])
    assert res.final["test_acc"] == first["acc"]
    assert res.final["test_loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert (res.final["test_acc"] * 16) == pytest.approx(round(res.final["test_acc"] * 16))
    full = T.evaluate(m, xt, yt, max_batches=None)
    assert T.evaluate(m, xt, yt, batch_size=8, max_batches=4) == full


@pytest.mark.parametrize("field", ["max_steps", "eval_batches"])
def test_a_bad_limit_is_refused_in_one_line(tmp_path, field):
    with pytest.raises(GHLError) as e:
        T.TrainConfig(out_dir=tmp_path, plastic=set(), **{field: 0})
    assert str(e.value) == f"{field} must be >= 1, got 0"
    x, y = make_data(8)
    with pytest.raises(GHLError):
        T.train(make_model(), x, y, None, None, plastic=set(), out_dir=tmp_path / "r", **{field: 0})
    assert not (tmp_path / "r").exists()


def test_cli_smoke_run(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    assert cli("convert", "model.py", cwd=tmp_path).returncode == 0
    r = cli(
        "train", "model.ghl", "--max-steps", "3", "--eval-batches", "2",
        "--batch-size", "16", "--out", "run", "--device", "cpu", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    ck = _ckpt(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 1 and ck["scheduler"]["last_epoch"] == 3
    r = cli("eval", "run/model.ghl", "--batches", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("train", "model.ghl", "--max-steps", "0", "--out", "bad", cwd=tmp_path)
    assert r.returncode != 0 and "--max-steps" in r.stderr
    assert not (tmp_path / "bad").exists()
