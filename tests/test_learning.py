"""GHL learns on real data: a few steps on real MNIST images reduce the training loss."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ghlc
from ghlc.runtime import runtime_of

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-subset.npz"


@pytest.fixture
def mnist_batch():
    if not MNIST.is_file():
        pytest.skip("shared data absent (mnist-subset.npz)")
    with np.load(MNIST) as d:
        x = torch.from_numpy(d["x_train"][:256]).unsqueeze(1).float().div(255)
        y = torch.from_numpy(d["y_train"][:256]).long()
    return (x - 0.1307) / 0.3081, y


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 28 -> 24 -> 12
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 12 -> 10 -> 5
        nn.Flatten(),
        nn.Linear(32 * 5 * 5, 10),
    )


def test_ghl_steps_reduce_training_loss(mnist_batch):
    x, y = mnist_batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        m = ghlc.prepare(tiny_net(), (x[:2],), ghlc.GHLConfig())
        plastic = set(runtime_of(m).sites)
        assert plastic == {"0.weight", "3.weight"}
        params = dict(m.named_parameters())
        opt = torch.optim.SGD(
            [
                {"params": [p for k, p in params.items() if k in plastic], "lr": 5e-2},
                {"params": [p for k, p in params.items() if k not in plastic], "lr": 1e-1},
            ]
        )

        def full_loss() -> float:
            m.eval()
            with torch.no_grad():
                loss = float(F.cross_entropy(m(x), y))
            m.train()
            return loss

        w0 = {k: params[k].detach().clone() for k in plastic}
        before = full_loss()
        g = torch.Generator().manual_seed(0)
        m.train()
        for step in range(20):
            if step % 4 == 0:
                perm = torch.randperm(len(y), generator=g)
            idx = perm[(step % 4) * 64 : (step % 4 + 1) * 64]
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            for k in plastic:  # GHL gradients: |H| * sign(G), |H| normalised to max 1
                gr = params[k].grad
                assert gr is not None and torch.isfinite(gr).all()
                assert float(gr.abs().max()) <= 1.0 + 1e-6
            opt.step()
        after = full_loss()
    finally:
        torch.set_num_threads(threads)
    assert all(not torch.equal(params[k], w0[k]) for k in plastic)  # the convs learned too
    assert after < 0.5 * before, (before, after)
