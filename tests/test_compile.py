"""``torch.compile`` of a prepared model: the same GHL gradients as the eager model.

Plastic calls are graph breaks (they run eagerly); models that need the function mode run
their training forwards eagerly under compile. ``aot_eager`` runs dynamo and AOTAutograd
(the graph split and the compiled backward) without generating code."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from zoo import BY_NAME, sweep

import ghlc


def _train(entry, compiled: bool, n: int = 2, sub: str | None = None):
    model, x = entry.make()
    m = ghlc.prepare(model, (x,), ghlc.GHLConfig(**entry.config_kwargs()))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    f = m
    if compiled and sub is None:
        f = torch.compile(m, backend="aot_eager")
    elif compiled:
        setattr(m, sub, torch.compile(getattr(m, sub), backend="aot_eager"))
    grads = []
    for step in range(n):
        torch.manual_seed(step)
        opt.zero_grad()
        y = f(x)
        (y[0] if isinstance(y, tuple) else y).square().mean().backward()
        grads.append(
            {
                k.replace("._orig_mod", ""): p.grad.clone()
                for k, p in m.named_parameters()
                if p.grad is not None
            }
        )
        opt.step()
    m.eval()
    with torch.no_grad():
        y = f(x)
    return (y[0] if isinstance(y, tuple) else y), grads


@pytest.mark.parametrize("name", sweep())
def test_compiled_prepared_model_trains_like_the_eager_one(name, caplog):
    torch._dynamo.reset()
    entry = BY_NAME[name]
    out, eager = _train(entry, compiled=False)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        out_c, compiled = _train(entry, compiled=True)
    assert not [str(w.message) for w in caught]  # (a ghlc frame traced by dynamo warned)
    assert not [r.getMessage() for r in caplog.records if "recompile" in r.getMessage()]
    for step, (a, b) in enumerate(zip(eager, compiled)):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"step {step}: {k}")
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)  # eval: compiled, plain


@pytest.mark.parametrize(
    ("name", "sub"),
    [("resnet", "layer1"), ("vit", "blocks")],
    ids=["module-calls", "function-mode"],
)
def test_compiled_submodule_of_a_prepared_model_trains_like_the_eager_one(name, sub):
    """A submodule compiled after ``prepare`` (its parameters now named ``..._orig_mod..``):
    plastic calls are graph breaks in it; with the function mode it runs eagerly in training
    (MultiheadAttention's in_proj chunks would otherwise get plain gradients)."""
    torch._dynamo.reset()
    entry = BY_NAME[name]
    out, eager = _train(entry, compiled=False)
    out_c, compiled = _train(entry, compiled=True, sub=sub)
    for step, (a, b) in enumerate(zip(eager, compiled)):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"step {step}: {k}")
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)


def test_preparing_a_compiled_model_is_a_clear_error():
    model, x = BY_NAME["resnet"].make()
    with pytest.raises(ghlc.TraceError, match="prepare the model first, then compile"):
        ghlc.prepare(torch.compile(model, backend="aot_eager"), (x,))


def test_a_replaced_plastic_layer_is_a_clear_error():
    entry = BY_NAME["resnet"]
    model, x = entry.make()
    m = ghlc.prepare(model, (x,), ghlc.GHLConfig(**entry.config_kwargs()))
    m.layer1 = torch.nn.Identity()
    with pytest.raises(ghlc.RuntimeGHLError, match="no longer in the model"):
        m(x)


def test_eager_training_does_not_import_dynamo():
    """The graph-break wrappers import torch._dynamo only when torch.compile runs (it adds
    about 1.5 s to every process start, the CLI's included)."""
    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); from zoo import BY_NAME; import ghlc\n"
        "for n in ('resnet', 'vit'):\n"
        "    e = BY_NAME[n]; model, x = e.make()\n"
        "    m = ghlc.prepare(model, (x,), ghlc.GHLConfig(**e.config_kwargs()))\n"
        "    y = m(x); (y[0] if isinstance(y, tuple) else y).square().mean().backward()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "False"
