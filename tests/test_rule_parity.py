"""Property-based parity of the GHL runtime against the plain float64 reference.

Two levels, over randomly drawn single-layer configurations (Linear, Conv1d/2d/3d and
ConvTranspose1d/2d/3d with random strides, dilations, groups, paddings and padding modes;
random temperature, competition, local rule, scope and global signal):

(a) ``ghlc.runtime.hebbian_raw`` on the call the module really makes, against ``ref_hebbian``;
(b) end to end: ``ghlc.prepare`` the one-layer model, backward a fixed random loss, and compare
    the weight's ``.grad`` with ``ref_ghl_grad(ref_hebbian(...), G)`` where G is the plain
    autograd gradient of an unprepared copy; the bias keeps the plain gradient.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import ghlc
from ghlc.runtime import HebbianRule, hebbian_raw, parse_call
from ghlc.runtime.calls import CONV_FUNCS, LINEAR_FUNC

sys.path.insert(0, os.path.dirname(__file__))
from reference import ref_forward, ref_ghl_grad, ref_hebbian  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


# ---- drawing a layer -----------------------------------------------------------------------
KINDS = ["Linear", "Conv1d", "Conv2d", "Conv3d",
         "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


@st.composite
def layers(draw, name: str):
    """(module, x, description) of layer class ``name``, random geometry, seed and dtype."""
    kind = "linear" if name == "Linear" else "conv_t" if "Transpose" in name else "conv"
    nd = int(name[-2]) if kind != "linear" else 0
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.float64, torch.float64, torch.float32]))
    bias = draw(st.booleans()) or kind == "linear"
    n = draw(st.integers(1, 3))
    small = nd == 3  # keep 3-d shapes tiny
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "linear":
        fin, fout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
        m = nn.Linear(fin, fout, bias=bias)
        x = torch.randn(*lead, fin, generator=gen, dtype=torch.float64)
        desc = f"Linear({fin},{fout}) x{tuple(x.shape)}"
    else:
        if draw(st.booleans()) and not small:  # depthwise
            cin = draw(st.integers(1, 4))
            groups, cout = cin, cin * draw(st.integers(1, 2))
        else:
            groups = draw(st.integers(1, 3))
            cin = groups * draw(st.integers(1, 2 if small else 3))
            cout = groups * draw(st.integers(1, 2 if small else 3))
        kmax = 2 if small else 3
        k = tuple(draw(st.integers(1, kmax)) for _ in range(nd))
        s = tuple(draw(st.integers(1, 2 if small else 3)) for _ in range(nd))
        d = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        pad_kind = draw(st.sampled_from(["int", "tuple", "same", "same", "valid"]))
        if kind == "conv" and pad_kind == "same" and draw(st.booleans()):
            k, d = (2, *k[1:]), (1, *d[1:])  # odd total padding: torch pads one more right
        size = tuple(
            max(3, d[i] * (k[i] - 1) + 1) + draw(st.integers(0, 1 if small else 2))
            for i in range(nd)
        )
        unbatched = draw(st.integers(0, 5)) == 0
        if kind == "conv":
            if pad_kind == "same":
                s = (1,) * nd  # 'same' needs stride 1
                padding = "same"
            elif pad_kind == "valid":
                padding = "valid"
            elif pad_kind == "int":
                padding = draw(st.integers(0, 2))
            else:
                padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
            mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
            m = cls(cin, cout, k, stride=s, padding=padding, dilation=d, groups=groups,
                    bias=bias, padding_mode=mode)
            desc = (f"{cls.__name__}({cin},{cout},k={k},s={s},p={padding!r},d={d},g={groups},"
                    f"mode={mode})")
        else:
            op = tuple(draw(st.integers(0, max(s[i], d[i]) - 1)) for i in range(nd))
            padding = []
            for i in range(nd):  # keep the output non-empty
                full = (size[i] - 1) * s[i] + d[i] * (k[i] - 1) + op[i]
                padding.append(min(draw(st.integers(0, 2)), full // 2))
            padding = tuple(padding)
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]
            m = cls(cin, cout, k, stride=s, padding=padding, output_padding=op, groups=groups,
                    bias=bias, dilation=d)
            desc = (f"{cls.__name__}({cin},{cout},k={k},s={s},p={padding},op={op},d={d},"
                    f"g={groups})")
        shape = (cin, *size) if unbatched else (n, cin, *size)
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        desc += f" x{tuple(x.shape)}"
    m = m.to(dtype)
    with torch.no_grad():  # weights of order one, so outputs are not all tiny
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64))
        if m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
    return m, x.to(dtype), desc


@st.composite
def rules(draw):
    return HebbianRule(
        temperature=draw(st.sampled_from([0.05, 0.25, 0.65, 1.0, 2.5])),
        competition=draw(st.sampled_from(["softmax", "softmax", "hard", "none"])),
        competition_scope=draw(st.sampled_from(["layer", "group"])),
        local_rule=draw(st.sampled_from(["oja", "hebb"])),
        global_signal=draw(st.sampled_from(["grad_sign", "none"])),
        normalisation=draw(st.sampled_from(["layer", "unit"])),
    )


# ---- helpers -------------------------------------------------------------------------------
def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    diff = (got.double() - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def ref_h(m, x, rule: HebbianRule):
    return ref_hebbian(m, x, rule.competition, rule.temperature, rule.local_rule,
                       rule.competition_scope)


def unit_dim(m, x):
    if isinstance(m, nn.Linear):
        return -1
    return 0 if x.dim() == len(m.kernel_size) + 1 else 1


def no_ties(m, x, rule) -> bool:
    """For hard competition: the winner leads the runner-up clearly at every position."""
    if rule.competition != "hard":
        return True
    u = ref_forward(m, x).movedim(unit_dim(m, x), -1)
    groups = m.groups if (rule.competition_scope == "group" and not isinstance(m, nn.Linear)) \
        else 1
    u = u.reshape(*u.shape[:-1], groups, u.shape[-1] // groups)
    if u.shape[-1] < 2:
        return True
    top = u.topk(2, dim=-1).values
    return bool((top[..., 0] - top[..., 1]).min() > 1e-3)


class Record(TorchFunctionMode):
    """Records the conv/linear calls a module makes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONV_FUNCS or func is LINEAR_FUNC:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


class One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


# ---- the reference itself ------------------------------------------------------------------
@pytest.mark.parametrize("name", KINDS)
@settings(SETTINGS, max_examples=25)
@given(data=st.data())
def test_reference_forward_matches_torch(name, data):
    """The reference's hand-written u equals the module's output (checks its geometry)."""
    m, x, desc = data.draw(layers(name))
    m, x = m.double(), x.double()
    with torch.no_grad():
        assert rel_err(ref_forward(m, x), m(x)) <= 1e-12, desc


# ---- (a) hebbian_raw directly --------------------------------------------------------------
@pytest.mark.parametrize("name", KINDS)
@SETTINGS
@given(data=st.data(), rule=rules())
def test_hebbian_raw_matches_reference(name, data, rule):
    m, x, desc = data.draw(layers(name))
    assume(no_ties(m, x, rule))
    for tag in ("float32", "'same'", "reflect", "replicate", "circular", "op=(1", "g=2", "g=3"):
        if tag in desc + str(x.dtype):
            event(tag)
    with Record() as rec, torch.no_grad():
        m(x)
    assert len(rec.calls) == 1, desc
    parsed = parse_call(*rec.calls[0])
    assert parsed is not None, desc
    xc, w, b, spec, unbatched = parsed
    assert unbatched == (not isinstance(m, nn.Linear) and x.dim() == len(m.kernel_size) + 1)
    if unbatched:
        xc = xc.unsqueeze(0)
        event("unbatched")
    if spec.pre_pad:
        xc = torch.nn.functional.pad(xc, list(spec.pre_pad))
        event("asymmetric 'same' (pre_pad)")
    with torch.no_grad():
        u = spec.run(xc, w, b)
        h = hebbian_raw(spec, xc, u, w, b, rule)
    assert h.shape == m.weight.shape and h.dtype == m.weight.dtype, desc
    ref = ref_h(m, x, rule)
    err = rel_err(h, ref)
    assert err <= TOL[x.dtype], f"{desc} {rule}: rel err {err:.3g}"


# ---- (b) end to end through ghlc.prepare ---------------------------------------------------
@pytest.mark.parametrize("name", KINDS)
@SETTINGS
@given(data=st.data(), rule=rules())
def test_prepared_grad_matches_reference(name, data, rule):
    m, x, desc = data.draw(layers(name))
    assume(no_ties(m, x, rule))
    model = One(m)
    plain = copy.deepcopy(model)
    cfg = ghlc.GHLConfig(
        plastic=("conv", "linear"), include=("*",), temperature=rule.temperature,
        competition=rule.competition, local_rule=rule.local_rule,
        global_signal=rule.global_signal, competition_scope=rule.competition_scope,
        normalisation=rule.normalisation,
    )
    prepared = ghlc.prepare(model, (x,), cfg)
    prepared.train()
    out = prepared(x)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = r.to(x.dtype)
    (out * r).sum().backward()

    plain_out = plain(x)
    assert torch.equal(out.detach(), plain_out.detach()), desc  # forward untouched
    (plain_out * r).sum().backward()
    g = plain.layer.weight.grad

    h = ref_h(m, x, rule)
    want = ref_ghl_grad(h, g, rule.global_signal, rule.normalisation, m)
    got = prepared.layer.weight.grad
    assert got is not None and got.shape == want.shape and got.dtype == x.dtype, desc
    if rule.global_signal == "grad_sign":  # exact zeros of G must stay zero
        assert torch.equal(got == 0, want == 0) or rel_err(got, want) <= TOL[x.dtype], desc
    err = rel_err(got, want)
    assert err <= TOL[x.dtype], f"{desc} {rule}: rel err {err:.3g}"
    if m.bias is not None:
        assert torch.equal(prepared.layer.bias.grad, plain.layer.bias.grad), desc



@pytest.mark.parametrize("t", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_softmax_units_cuda_formula_matches_float64(t, dim, monkeypatch):
    """The decomposed softmax used on CUDA (forced here on CPU) against float64 softmax."""
    from ghlc.runtime import hebbian

    v = torch.randn(5, 7, 6, 4) * 4
    ref = torch.softmax(v.double() * t, dim)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert v.is_cuda  # the patch takes: the decomposed branch runs
    got = hebbian.softmax_units(v, dim, t)
    monkeypatch.undo()
    assert rel_err(got, ref) <= 1e-6
