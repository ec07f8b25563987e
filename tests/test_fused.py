"""The compiled kernels (``runtime/fused.py``) against their eager twins, and a whole GHL step
with them forced on (CPU: ``mode 'on'``, an Inductor C++ build) against the oracle. On CUDA
(used in CUDA-graph capture) tests/test_gpu.py checks them against the float64 oracle."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_semantics import (
    _build,
    _steps_against_oracle,
    fused_calls,  # noqa: F401 (a fixture)
)

import ghlc
from ghlc.runtime import fused, policy
from ghlc.runtime.status import STATUS

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("g++") is None,
    reason="Inductor's CPU backend needs a C++ compiler",
)


@pytest.fixture
def fused_on(monkeypatch):
    monkeypatch.setattr(STATUS, "compile_broken", None)  # (restored after a failure test)
    with policy.override(fused="on"):
        yield


@needs_cc
def test_compiled_kernels_equal_eager_twins(fused_on):
    g = torch.Generator().manual_seed(0)
    for shape, dim, t in [((4, 6, 5, 5), 1, 1.0), ((3, 8, 7), 1, 0.5), ((2, 4, 3, 6, 6), 2, 2.0)]:
        v = torch.randn(shape, generator=g) * 4
        got = fused.softmax(v, dim, t)
        ref = torch.softmax(v.double() * t, dim)
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got, fused.softmax_eager(v, dim, t))
    for shape in [(6, 4, 3, 3), (10, 7)]:
        h, gr = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        gr[0] = 0.0  # sign(0) = 0: no step
        ref = fused.sign_combine_eager_(h.clone(), gr.clone())
        buf = h.clone()
        out = fused.sign_combine_(buf, gr)
        assert out.data_ptr() == buf.data_ptr()  # written into h, as the eager twin
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert (out[0] == 0).all()
        a = h.abs()
        for scale in (a.amax() + 1e-30, a.flatten(1).amax(1).view(-1, *[1] * (h.dim() - 1))):
            ref = fused.scaled_sign_eager_(a.clone(), gr.clone(), scale)
            buf = a.clone()
            fused.scaled_sign_(buf, gr.clone(), scale)
            torch.testing.assert_close(buf, ref, rtol=0, atol=0)
    for shape, bias in [((6, 4, 3, 3), True), ((10, 7), False)]:
        c, w = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        extra = torch.randn(shape[0], generator=g) if bias else None
        ref = (
            c.double()
            - ((c.double() * w.double()).flatten(1).sum(1) + (extra.double() if bias else 0)).view(
                -1, *[1] * (c.dim() - 1)
            )
            * w
        )
        buf = c.clone()
        assert fused.oja_decay_(buf, w, extra).data_ptr() == buf.data_ptr()
        torch.testing.assert_close(buf.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(buf, fused.oja_decay_eager_(c.clone(), w, extra))
        for fn in (fused.oja_decay_, fused.oja_decay_eager_):  # into a buffer of its own
            src, dst = c.clone(), torch.empty_like(c)
            assert fn(src, w, extra, dst).data_ptr() == dst.data_ptr()
            torch.testing.assert_close(dst, buf)
            assert torch.equal(src, c)  # c is left as it was
    assert STATUS.compile_broken is None


@needs_cc
@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_step_with_compiled_kernels_matches_oracle(fused_on, fused_calls, name):  # noqa: F811
    """Every path that uses a compiled kernel (softmax, in-place combine, in-call combine);
    the second step combines inside the calls."""
    _steps_against_oracle(name, fused_calls, steps=2)
    assert STATUS.compile_broken is None


def test_compile_failure_falls_back_to_eager(fused_on, monkeypatch):
    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("no compiler here")

        return call

    monkeypatch.setattr(STATUS, "compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    v = torch.randn(2, 5, 3, 3)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        y = fused.softmax(v, 1, 1.0)
    torch.testing.assert_close(y, torch.softmax(v, 1))
    assert not fused.active(v)  # stays eager from then on


def test_mode_off_and_bad_mode(monkeypatch):
    """The policy's ``fused`` field: "off" keeps the eager formulas, "on" the compiled ones
    everywhere; a bad value, from an override or from GHLC_FUSED (read when the policy is
    made, so a prepare in a fresh process fails), is a one-line error."""
    with policy.override(fused="on"):
        assert fused.mode() == "on" and fused.active(torch.zeros(1))
        with policy.override(fused="off"):
            assert fused.mode() == "off" and not fused.active(torch.zeros(1))
    with pytest.raises(ghlc.ConfigError, match=r"^fused='fast' is not one of auto, on, off$"):
        with policy.override(fused="fast"):
            pass
    assert not fused.active(torch.zeros(1))  # auto: CPU tensors stay eager
    monkeypatch.setenv("GHLC_FUSED", "on")
    assert policy.DispatchPolicy().fused == "on"
    monkeypatch.setenv("GHLC_FUSED", "fast")
    with pytest.raises(ghlc.ConfigError, match=r"^GHLC_FUSED='fast' is not one of auto, on, off$"):
        policy.DispatchPolicy()
    monkeypatch.setattr(policy, "_STACK", [])  # as in a fresh process
    model, x, cfg = _build("vgg")
    with pytest.raises(ghlc.ConfigError, match=r"^GHLC_FUSED='fast' is not one of auto, on, off$"):
        ghlc.prepare(model, (x,), config=cfg)


_TRITON_CHECK = """
import torch
from ghlc.runtime.triton_softmax import channel_softmax
g = torch.Generator().manual_seed(0)
for shape, dim, t, cl in [((4, 6, 5, 5), 1, 1.0, False), ((2, 70, 3, 3), 1, 1.3, True),
                          ((2, 4, 3, 6, 6), 2, 2.0, False), ((2, 300, 9), 1, 0.5, False),
                          ((3, 5, 1, 1), 1, 1.0, False)]:
    v = torch.randn(shape, generator=g) * 4
    if cl:
        v = v.contiguous(memory_format=torch.channels_last)
    y = channel_softmax(v, dim, t)
    assert y.stride() == v.stride(), shape
    torch.testing.assert_close(y.double(), torch.softmax(v.double() * t, dim),
                               rtol=1e-6, atol=1e-7)
print("ok")
"""


def test_triton_softmax_in_interpreter():
    """The Triton kernel's program logic, run by Triton's CPU interpreter in a fresh process
    (the interpreter is chosen when triton is imported); on CUDA: tests/test_gpu.py."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_triton_failure_falls_back_once(monkeypatch):
    """A Triton kernel that fails to build: one warning, then the eager formula (softmax) or
    nothing written (softmax_into, whose caller then copies compete()'s output)."""
    calls = []

    def broken(v, dim, t, out=None):
        calls.append(1)
        raise RuntimeError("no ptxas\nmore")

    monkeypatch.setattr(STATUS, "triton_broken", None)
    monkeypatch.setattr(
        fused, "_triton_softmax", lambda v: None if STATUS.triton_broken else broken
    )
    v = torch.randn(2, 5, 3, 3)
    with pytest.warns(RuntimeWarning, match="Triton softmax kernel failed .*no ptxas"):
        y = fused.softmax(v, 1, 0.5)
    torch.testing.assert_close(y, fused.softmax_eager(v, 1, 0.5))
    assert STATUS.triton_broken == "RuntimeError: no ptxas"
    out = torch.zeros(2, 5, 3, 3)
    assert not fused.softmax_into(v, 1, 0.5, out) and not out.any() and len(calls) == 1
    monkeypatch.setattr(STATUS, "triton_broken", None)
    with pytest.warns(RuntimeWarning):
        assert not fused.softmax_into(v, 1, 0.5, out)
    assert not out.any() and len(calls) == 2


def test_row_dots_match_float64_sums():
    """Per-row dots over blocks of rows (CPU) against plain float64 sums: blocks of one row,
    of rows that do not divide the weight, one call, and weights that are not contiguous."""
    g = torch.Generator().manual_seed(1)
    for shape in [(7, 5, 3, 3), (10, 7), (1, 4), (5, 2, 1, 1)]:
        c, w = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        ref = (c.double() * w.double()).flatten(1).sum(1)
        per_row = c[0].numel()
        for block in (1, 2 * per_row + 1, 3 * per_row, 10**9, policy.current().dot_block_numel):
            got = fused.row_dots(c, w, block)
            assert got.shape == (shape[0],) and got.dtype == c.dtype
            torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    c = torch.randn(6, 4, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    ref = (c.double() * w.double()).flatten(1).sum(1)
    torch.testing.assert_close(fused.row_dots(c, w, 40).double(), ref, rtol=1e-6, atol=1e-6)


def test_row_dots_mixed_layouts_and_no_copies():
    """A channels-last weight's rows are read where they lie (no copy of either operand);
    mixed layouts pair the same elements (against float64 sums)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(2)
    cl = torch.channels_last
    a, b = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    ref = (a.double() * b.double()).flatten(1).sum(1)
    for c, w in [
        (a.contiguous(memory_format=cl), b),
        (a, b.contiguous(memory_format=cl)),
        (a.contiguous(memory_format=cl), b.contiguous(memory_format=cl)),
    ]:
        for block in (40, 10**9):
            torch.testing.assert_close(
                fused.row_dots(c, w, block).double(), ref, rtol=1e-6, atol=1e-6
            )
    c, w = a.contiguous(memory_format=cl), b.contiguous(memory_format=cl)
    with Ops() as ops:
        fused.row_dots(c, w, 40)
    assert ops.names and not {"clone.default", "copy_.default", "_to_copy.default"} & set(
        ops.names
    ), ops.names
