"""Step sizes of the plastic layers: the scaled step (``plastic_step="rms"``) against the
float64 oracle, the learning-rate range test, and the warning that names the layer that
grew fastest when a run starts to diverge."""

import copy
import math
import warnings

import oracle
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_train import make_data, make_model

import ghlc
import ghlc.train as T
from ghlc.errors import GHLError
from ghlc.lrfind import lr_find, report, scale_by_rms_
from ghlc.runtime import runtime_of


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setattr(T, "_plot", lambda path, history: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 6 * 6, 3),
    ).double()  # fmt: skip


def test_scale_by_rms_multiplies_each_gradient_by_its_weights_rms():
    a, z = nn.Parameter(torch.tensor([[3.0, -4.0]])), nn.Parameter(torch.zeros(2, 2))
    a.grad, z.grad = torch.tensor([[1.0, -1.0]]), torch.ones(2, 2)
    scale_by_rms_([a, z, nn.Parameter(torch.ones(1))])  # (no grad: skipped)
    rms = math.sqrt((9 + 16) / 2)
    assert torch.allclose(a.grad, torch.tensor([[rms, -rms]]))
    assert torch.equal(z.grad, torch.ones(2, 2))  # a zero weight has no scale: unchanged


def test_the_scaled_step_is_rms_times_the_rules_gradient_float64(tmp_path):
    """One Trainer step with plastic_step="rms" moves each plastic weight by
    lr * (RMS(W) * |H_n| sign(G) + wd * W), H and G from the oracle (float64)."""
    x, y = make_data(16)
    x = x.double()
    plain = _net()
    names = ["0.weight", "2.weight"]
    h, g, _ = oracle.run_plain(copy.deepcopy(plain), (x,), names, lambda o: F.cross_entropy(o, y))
    m = ghlc.prepare(copy.deepcopy(plain), (x[:1],))
    assert set(runtime_of(m).sites) == set(names)
    w0 = {k: p.detach().clone() for k, p in m.named_parameters()}
    lr, wd = 0.3, 0.05
    T.train(
        m, x, y, None, None, plastic=set(names), epochs=1, batch_size=16, lr=0.0,
        lr_plastic=lr, wd_plastic=wd, out_dir=tmp_path, progress=False, plastic_step="rms",
    )  # fmt: skip
    for k in names:
        rms = w0[k].square().mean().sqrt()
        want = w0[k] - lr * (rms * oracle.expected_grad(h[k], g[k]) + wd * w0[k])
        got = dict(m.named_parameters())[k].detach()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(got, w0[k])
    # the paper's step on the same batch moves the largest element by the full rate instead
    m2 = ghlc.prepare(copy.deepcopy(plain), (x[:1],))
    T.train(
        m2, x, y, None, None, plastic=set(names), epochs=1, batch_size=16, lr=0.0,
        lr_plastic=lr, wd_plastic=0.0, out_dir=tmp_path / "p", progress=False,
    )  # fmt: skip
    step = (w0["2.weight"] - dict(m2.named_parameters())["2.weight"].detach()).abs().max()
    assert float(step) == pytest.approx(lr, rel=1e-9)


def test_lr_find_sweeps_suggests_and_restores_the_model():
    x, y = make_data(64)
    m = ghlc.prepare(make_model(), (x[:1],))
    plastic = set(runtime_of(m).sites)
    before = copy.deepcopy(m.state_dict())
    rng = torch.get_rng_state()
    res = lr_find(m, x, y, plastic=plastic, batch_size=16, start=1e-4, end=10.0, steps=20)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and m.training
    n = len(res.lrs)
    assert 2 <= n <= 20 and res.lrs[0] == pytest.approx(1e-4)
    assert all(b / a == pytest.approx(10 ** (5 / 19)) for a, b in zip(res.lrs, res.lrs[1:]))
    k = min(range(n), key=res.smoothed.__getitem__)
    assert res.suggestion == pytest.approx(res.lrs[k] / 10)
    if res.diverged and n < 20:
        assert res.smoothed[-1] > 4 * min(res.smoothed)
    text = report(res)
    assert f"suggested --lr-plastic {res.suggestion:.3g}" in text.splitlines()[-1]
    again = lr_find(m, x, y, plastic=plastic, batch_size=16, start=1e-4, end=10.0, steps=20)
    assert again.losses == res.losses  # seeded: the same sweep twice


def test_lr_find_stops_when_the_loss_blows_up():
    x, y = make_data(64)
    m = ghlc.prepare(make_model(), (x[:1],))
    res = lr_find(
        m, x, y, plastic=set(runtime_of(m).sites), batch_size=16, start=1.0, end=1e6, steps=30
    )
    assert res.diverged and len(res.lrs) < 30
    assert res.suggestion < 1e5


def test_lr_find_refuses_bad_settings_in_one_line():
    x, y = make_data(16)
    m = make_model()
    with pytest.raises(GHLError, match="no plastic layer"):
        lr_find(m, x, y, plastic=set())
    with pytest.raises(GHLError, match="0 < start < end"):
        lr_find(m, x, y, plastic={"0.weight"}, start=1.0, end=0.1)


def test_a_rising_loss_warns_once_naming_the_layer_that_grew_fastest(tmp_path):
    x, y = make_data()
    m = ghlc.prepare(make_model(), (x[:1],))
    plastic = set(runtime_of(m).sites)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            T.train(
                m, x, y, None, None, plastic=plastic, epochs=3, batch_size=16, lr=0.05,
                lr_plastic=30.0, wd_plastic=0.0, out_dir=tmp_path, progress=False,
            )  # fmt: skip
        except T.TrainingDiverged as e:
            assert "grew fastest" in str(e)
    div = [w for w in seen if issubclass(w.category, T.DivergenceWarning)]
    assert len(div) == 1
    msg = str(div[0].message)
    assert "likely diverging" in msg and "--lr-plastic" in msg and "\n" not in msg
    assert "the weights of 0 grew fastest" in msg or "the weights of 2 grew fastest" in msg


def test_a_calm_run_does_not_warn(tmp_path):
    x, y = make_data()
    m = ghlc.prepare(make_model(), (x[:1],))
    with warnings.catch_warnings():
        warnings.simplefilter("error", T.DivergenceWarning)
        T.train(
            m, x, y, None, None, plastic=set(runtime_of(m).sites), epochs=2, batch_size=16,
            lr=0.05, lr_plastic=0.01, out_dir=tmp_path, progress=False,
        )  # fmt: skip
