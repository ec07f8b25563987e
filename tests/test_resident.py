"""ghlc.resident: the device-resident loop on CPU is the Trainer's run, and it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ghlc
from ghlc.data import augment_batch
from ghlc.errors import GHLError
from ghlc.resident import ResidentConfig, ResidentData, normalise_uint8, train_resident
from ghlc.train import train

MEAN, STD = (0.5, 0.4, 0.3), (0.5, 0.25, 0.2)


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(8, affine=False),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(8 * 3 * 3, 4),
    )


def _data(n: int = 70, n_test: int = 30):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, n + n_test)
    # learnable: the class sets the brightness of one colour channel
    x = rng.integers(0, 120, (n + n_test, 8, 8, 3)).astype(np.uint8)
    x[np.arange(n + n_test), :, :, y % 3] += (60 * (1 + y // 3)).astype(np.uint8)[:, None, None]
    return x[:n], y[:n], x[n:], y[n:]


def _prepared(seed: int = 0) -> tuple[nn.Module, set[str]]:
    torch.manual_seed(seed)
    m = ghlc.prepare(_net(), example_inputs=(torch.zeros(2, 3, 8, 8),))
    return m, {"0.weight"}


@pytest.mark.parametrize("augment", [False, True])
def test_same_run_as_the_trainer_on_cpu(tmp_path, augment):
    xtr, ytr, xte, yte = _data()
    data = ResidentData.from_uint8(xtr, ytr, xte, yte, mean=MEAN, std=STD)
    kw = dict(epochs=2, batch_size=16, lr=0.05, lr_plastic=0.02, wd_plastic=0.01, seed=3)
    a, plastic = _prepared()
    hist = train_resident(
        a, data, ResidentConfig(plastic=frozenset(plastic), augment=augment, **kw)
    )
    b, _ = _prepared()
    xf = [
        normalise_uint8(torch.from_numpy(x).permute(0, 3, 1, 2), data.mean, data.std)
        for x in (xtr, xte)
    ]
    res = train(
        b,
        xf[0],
        ytr,
        xf[1],
        yte,
        plastic=plastic,
        out_dir=tmp_path,
        progress=False,
        augment=augment_batch if augment else None,
        **kw,
    )
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), rtol=1e-5, atol=1e-6), k
    assert len(hist) == 2 and [h["epoch"] for h in hist] == [1, 2]
    for h, r in zip(hist, res.history):
        assert h["train_loss"] == pytest.approx(r["train_loss"], rel=1e-5)
        assert h["train_acc"] == r["train_acc"] and h["lr_plastic"] == r["lr_plastic"]
        assert h["test_acc"] == pytest.approx(r["test_acc"])
        assert h["test_loss"] == pytest.approx(r["test_loss"], rel=1e-4)


def test_learns_and_resumes(tmp_path):
    xtr, ytr, xte, yte = _data(400, 200)
    data = ResidentData.from_uint8(xtr, ytr, xte, yte, mean=MEAN, std=STD)
    cfg = ResidentConfig(plastic=frozenset({"0.weight"}), epochs=4, batch_size=32, lr=0.05)
    m, _ = _prepared()
    snaps: list[dict] = []
    hist = train_resident(m, data, cfg, on_epoch=lambda h, snap: snaps.append(snap()))
    assert hist[-1]["test_acc"] > 0.6  # 4 classes: chance is 0.25
    assert hist[-1]["lr"] < 0.05 * 0.1  # cosine towards 0 over all steps
    r, _ = _prepared(seed=9)  # other initial weights: the state overrides them
    again = train_resident(r, data, cfg, state=snaps[1])
    assert [h["epoch"] for h in again] == [1, 2, 3, 4]
    for p, q in zip(m.state_dict().values(), r.state_dict().values()):
        assert torch.equal(p, q)


def test_bad_input():
    x = np.zeros((4, 8, 8, 3), np.float32)
    with pytest.raises(GHLError, match="uint8"):
        ResidentData.from_uint8(x, np.zeros(4), x, np.zeros(4), mean=MEAN, std=STD)
    u = x.astype(np.uint8)
    with pytest.raises(GHLError, match="3 values"):
        ResidentData.from_uint8(u, np.zeros(4), u, np.zeros(4), mean=(0.5,), std=(0.5,))
    with pytest.raises(GHLError, match="epochs"):
        ResidentConfig(plastic=frozenset(), epochs=0)
