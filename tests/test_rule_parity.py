"""Property-based parity of the GHL runtime against the float64 oracle (tests/oracle.py).

Two levels, over randomly drawn single-layer configurations (Linear, Conv1d/2d/3d and
ConvTranspose1d/2d/3d with random strides, dilations, groups, paddings and padding modes;
random temperature, competition, local rule, scope and global signal):

(a) ``ghlc.runtime.hebbian_raw`` on the call the module really makes, against ``oracle.hebbian``;
(b) end to end: ``ghlc.prepare`` the one-layer model, backward a fixed random loss, and compare
    the weight's ``.grad`` with ``oracle.expected_grad(oracle.hebbian(...), G)`` where G is the
    plain autograd gradient of an unprepared copy; the bias keeps the plain gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import ghlc
from ghlc.runtime import (
    HebbianRule,
    accumulate,
    correlation,
    fast,
    hebbian_raw,
    parse_call,
    policy,
    sampled,
)
from ghlc.runtime import rule as rule_module
from ghlc.runtime.calls import CONV_FUNCS, LINEAR_FUNC
from ghlc.runtime.sampled import grid_steps

sys.path.insert(0, os.path.dirname(__file__))
import oracle  # noqa: E402

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


# ---- drawing a layer -----------------------------------------------------------------------
KINDS = [
    "Linear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
]


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
            m = cls(
                cin,
                cout,
                k,
                stride=s,
                padding=padding,
                dilation=d,
                groups=groups,
                bias=bias,
                padding_mode=mode,
            )
            desc = (
                f"{cls.__name__}({cin},{cout},k={k},s={s},p={padding!r},d={d},g={groups},"
                f"mode={mode})"
            )
        else:
            op = tuple(draw(st.integers(0, max(s[i], d[i]) - 1)) for i in range(nd))
            padding = []
            for i in range(nd):  # keep the output non-empty
                full = (size[i] - 1) * s[i] + d[i] * (k[i] - 1) + op[i]
                padding.append(min(draw(st.integers(0, 2)), full // 2))
            padding = tuple(padding)
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]
            m = cls(
                cin,
                cout,
                k,
                stride=s,
                padding=padding,
                output_padding=op,
                groups=groups,
                bias=bias,
                dilation=d,
            )
            desc = f"{cls.__name__}({cin},{cout},k={k},s={s},p={padding},op={op},d={d},g={groups})"
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
        normalisation=draw(st.sampled_from(["layer", "unit"])),
    )


# ---- helpers -------------------------------------------------------------------------------
def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    diff = (got.double() - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def oracle_rule(rule: HebbianRule) -> dict:
    """The oracle's rule dict of a HebbianRule (its exact settings)."""
    return {
        "competition": rule.competition,
        "temperature": rule.temperature,
        "local_rule": rule.local_rule,
        "competition_scope": rule.competition_scope,
    }


def oracle_h(m, x, rule: HebbianRule, mask: torch.Tensor | None = None):
    return oracle.hebbian(m, x, oracle_rule(rule), mask)


def unit_dim(m, x):
    if isinstance(m, nn.Linear):
        return -1
    return 0 if x.dim() == len(m.kernel_size) + 1 else 1


def no_ties(m, x, rule) -> bool:
    """For hard competition: the winner leads the runner-up clearly at every position."""
    if rule.competition != "hard":
        return True
    u = oracle.forward(m, x).movedim(unit_dim(m, x), -1)
    groups = m.groups if (rule.competition_scope == "group" and not isinstance(m, nn.Linear)) else 1
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


# ---- the oracle itself ---------------------------------------------------------------------
def test_oracle_imports_nothing_from_ghlc():
    """The parity tests compare against code that shares nothing with ghlc."""
    import ast

    tree = ast.parse(Path(oracle.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert "torch" in names and not [
        n for n in names if n.split(".")[0] in ("ghlc", "passes", "runtime")
    ]


@pytest.mark.parametrize("name", KINDS)
@settings(SETTINGS, max_examples=25)
@given(data=st.data())
def test_oracle_forward_matches_torch(name, data):
    """The oracle's hand-written u equals the module's output (checks its geometry)."""
    m, x, desc = data.draw(layers(name))
    m, x = m.double(), x.double()
    with torch.no_grad():
        assert rel_err(oracle.forward(m, x), m(x)) <= 1e-12, desc


# ---- (a) hebbian_raw directly --------------------------------------------------------------
@pytest.mark.parametrize("name", KINDS)
@SETTINGS
@given(data=st.data(), rule=rules())
def test_hebbian_raw_matches_oracle(name, data, rule):
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
    ref = oracle_h(m, x, rule)
    err = rel_err(h, ref)
    assert err <= TOL[x.dtype], f"{desc} {rule}: rel err {err:.3g}"


# ---- (b) end to end through ghlc.prepare ---------------------------------------------------
@pytest.mark.parametrize("name", KINDS)
@SETTINGS
@given(data=st.data(), rule=rules(), signal=st.sampled_from(["grad_sign", "none"]))
def test_prepared_grad_matches_oracle(name, data, rule, signal):
    m, x, desc = data.draw(layers(name))
    assume(no_ties(m, x, rule))
    model = One(m)
    plain = copy.deepcopy(model)
    cfg = ghlc.GHLConfig(
        plastic=("conv", "linear"),
        include=("*",),
        temperature=rule.temperature,
        competition=rule.competition,
        local_rule=rule.local_rule,
        global_signal=signal,
        competition_scope=rule.competition_scope,
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

    h = oracle_h(m, x, rule)
    want = oracle.expected_grad(h, g, signal, rule.normalisation, m)
    got = prepared.layer.weight.grad
    assert got is not None and got.shape == want.shape and got.dtype == x.dtype, desc
    if signal == "grad_sign":  # exact zeros of G must stay zero
        assert torch.equal(got == 0, want == 0) or rel_err(got, want) <= TOL[x.dtype], desc
    err = rel_err(got, want)
    assert err <= TOL[x.dtype], f"{desc} {rule} {signal}: rel err {err:.3g}"
    if m.bias is not None:
        assert torch.equal(prepared.layer.bias.grad, plain.layer.bias.grad), desc


# ---- (c) the sampled mode: the same sums over the sampled terms only ------------------------
FRACTIONS = (0.5, 0.25, 1 / 3)


def test_grid_steps():
    """Steps of the positions grid: product round(1/fraction), as equal as they can be."""
    assert grid_steps(0.25, 2) == (2, 2) and grid_steps(0.25, 1) == (4,)
    assert grid_steps(0.25, 3) == (1, 2, 2) and grid_steps(0.5, 2) == (1, 2)
    assert grid_steps(1 / 9, 2) == (3, 3) and grid_steps(0.125, 2) == (2, 4)
    assert grid_steps(1 / 3, 2) == (1, 3)


def test_grid_calls_equal_masked_weight_gradients():
    """Every offset of a sweep of 1-D geometries (kernel, stride, padding, dilation, length,
    step): the strided call of the sampled grid gives the weight gradient of the full call
    with the cotangent zeroed off the grid (including grids that need leading zero outputs,
    and grids that read padding only)."""
    from ghlc.runtime.calls import CallSpec
    from ghlc.runtime.correlation import weight_vjp
    from ghlc.runtime.sampled import grid_call, grid_pad, sample_grid

    gen = torch.Generator().manual_seed(0)
    cases = 0
    seen = set()
    for k, s, p, d, length, q in itertools.product(
        (1, 2, 3, 5), (1, 2, 3), (0, 1, 2, 3), (1, 2), (1, 2, 5, 8), (2, 3, 4)
    ):
        out = (length + 2 * p - d * (k - 1) - 1) // s + 1
        if out < 1:
            continue
        spec = CallSpec("conv", 1, False, (s,), (p,), (d,), (), 1)
        x = torch.randn(2, 3, length, generator=gen, dtype=torch.float64)
        w = torch.randn(4, 3, k, dtype=torch.float64)
        u = torch.randn(2, 4, out, generator=gen, dtype=torch.float64)
        for a in range(min(q, out)):
            (g,) = sample_grid(spec, x.shape, w.shape, u.shape, 1 / q, (a,))
            sp, sx, su = grid_call(spec, x, u, (g,))
            got = (
                torch.zeros_like(w) if g.length == 0 else weight_vjp(sp, sx, w, grid_pad(su, (g,)))
            )
            cot = torch.zeros_like(u)
            cot[..., a::q] = u[..., a::q]
            want = weight_vjp(spec, x, w, cot)
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (k, s, p, d, length, q, a)
            seen.add("empty" if g.length == 0 else "lead" if g.lead else "plain")
            cases += 1
    assert cases > 1000 and seen == {"empty", "lead", "plain"}, (cases, seen)


def sample_mask(m, x, u, frac: float, over: str, draws: list[int]) -> torch.Tensor:
    """The 0/1 mask of the terms the sampled mode keeps (the oracle's, given the values the
    runtime drew, in order: the oracle derives each draw's range itself)."""
    it = iter(draws)
    transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    ub = u if isinstance(m, nn.Linear) or u.dim() == len(m.kernel_size) + 2 else u.unsqueeze(0)
    call = oracle.Call(
        name="",
        kind="linear" if isinstance(m, nn.Linear) else "conv",
        x=x,
        u=ub,
        w=m.weight,
        transposed=transposed,
    )
    return oracle.sample_mask(
        call, {"sample_fraction": frac, "sample_over": over, "draw": lambda n: next(it)}
    )


def recording_draw(data):
    """A stand-in for the sampled mode's random draw: values from hypothesis, recorded."""
    drawn: list[int] = []

    def draw(n: int) -> int:
        v = data.draw(st.integers(0, n - 1))
        drawn.append(v)
        return v

    return draw, drawn


def recorded_hebbian(m, x, data, rule, dtype=None):
    """hebbian_raw on the one call of ``m(x)`` as ghlc sees it (batched, pre-padded), with the
    sampled modes' draws taken from ``data`` and recorded: (H, u, w, draws)."""
    with Record() as rec, torch.no_grad():
        m(x)
    xc, w, b, spec, unbatched = parse_call(*rec.calls[0])
    if unbatched:
        xc = xc.unsqueeze(0)
    if spec.pre_pad:
        xc = torch.nn.functional.pad(xc, list(spec.pre_pad))
    draw, drawn = recording_draw(data)
    with torch.no_grad(), mock.patch.object(sampled, "draw", draw):
        u = spec.run(xc, w, b)
        h = hebbian_raw(spec, xc, u, w, b, rule, dtype)
    return h, u, w, drawn


@pytest.mark.parametrize("over", ["batch", "positions"])
@pytest.mark.parametrize("name", KINDS)
@settings(SETTINGS, max_examples=25)
@given(data=st.data(), rule=rules(), frac=st.sampled_from(FRACTIONS))
def test_sampled_hebbian_matches_oracle(name, over, data, rule, frac):
    """hebbian_raw in the sampled mode equals the oracle's sums over the sampled terms."""
    m, x, desc = data.draw(layers(name))
    assume(no_ties(m, x, rule))
    rule = dataclasses.replace(rule, sample_fraction=frac, sample_over=over)
    h, u, w, drawn = recorded_hebbian(m, x, data, rule)
    mask = sample_mask(m, x, u, frac, over, drawn)
    if mask.sum() < mask.numel():
        event("sampled")
    ref = oracle_h(m, x, rule, mask)
    err = rel_err(h, ref)
    assert err <= TOL[x.dtype], f"{desc} {rule} draws {drawn}: rel err {err:.3g}"


@pytest.mark.parametrize("over", ["exact", "batch", "positions"])
@pytest.mark.parametrize("name", KINDS)
@settings(SETTINGS, max_examples=8)
@given(data=st.data(), rule=rules())
def test_hebbian_raw_with_a_wider_result_dtype_matches_oracle(name, over, data, rule):
    """``hebbian_raw(..., dtype)``, the path of ``hebbian_precision="autocast"`` (y and the
    correlation in the operands' dtype, Oja's decay and H in ``dtype``), on float32 operands
    with a float64 result: the float64 oracle on the same operands, to float32 rounding,
    exact and in both sampled modes."""
    m, x, desc = data.draw(layers(name))
    m, x = m.float(), x.float()
    assume(no_ties(m, x, rule))
    if over != "exact":
        rule = dataclasses.replace(rule, sample_fraction=0.25, sample_over=over)
    h, u, w, drawn = recorded_hebbian(m, x, data, rule, torch.float64)
    assert h.dtype == torch.float64 and h.shape == w.shape, desc
    mask = None if over == "exact" else sample_mask(m, x, u, 0.25, over, drawn)
    ref = oracle_h(m, x, rule, mask)
    err = rel_err(h, ref)
    assert err <= TOL[torch.float32], f"{desc} {rule} draws {drawn}: rel err {err:.3g}"


@pytest.mark.parametrize("over", ["batch", "positions"])
@pytest.mark.parametrize("name", ["Linear", "Conv1d", "Conv2d", "ConvTranspose2d"])
@settings(SETTINGS, max_examples=15)
@given(data=st.data(), frac=st.sampled_from(FRACTIONS))
def test_prepared_sampled_grad_matches_oracle(name, over, data, frac):
    """End to end: GHLConfig(sample_fraction, sample_over) gives |Hn| * sign(G) of the
    oracle's sampled H."""
    m, x, desc = data.draw(layers(name))
    model = One(m)
    plain = copy.deepcopy(model)
    cfg = ghlc.GHLConfig(
        plastic=("conv", "linear"), include=("*",), sample_fraction=frac, sample_over=over
    )
    prepared = ghlc.prepare(model, (x,), cfg)
    draw, drawn = recording_draw(data)
    with mock.patch.object(sampled, "draw", draw):
        out = prepared(x)
        r = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        ).to(x.dtype)
        (out * r).sum().backward()
    plain_out = plain(x)
    (plain_out * r).sum().backward()
    with torch.no_grad():
        u = m(x)
    mask = sample_mask(m, x, u, frac, over, drawn)
    h = oracle.hebbian(m, x, mask=mask)
    want = oracle.expected_grad(h, plain.layer.weight.grad)
    err = rel_err(prepared.layer.weight.grad, want)
    assert err <= TOL[x.dtype], f"{desc} draws {drawn}: rel err {err:.3g}"


@pytest.mark.parametrize("t", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_softmax_units_cuda_formula_matches_float64(t, dim, monkeypatch):
    """The decomposed softmax used on CUDA (forced here on CPU) against float64 softmax."""
    v = torch.randn(5, 7, 6, 4) * 4
    ref = torch.softmax(v.double() * t, dim)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert v.is_cuda  # the patch takes: the decomposed branch runs
    got = fast.softmax_units(v, dim, t)
    monkeypatch.undo()
    assert rel_err(got, ref) <= 1e-6


@pytest.mark.parametrize("t", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "group_view", "half"])
def test_softmax_units_cpu_matches_torch_softmax(t, layout):
    """The CPU path (in place on t*v where that is a contiguous tensor of its own) gives
    torch.softmax(v * t)'s numbers bit for bit, over every dim and layout, and leaves v as it
    was."""
    v = torch.randn(5, 12, 6, 4, generator=torch.Generator().manual_seed(3)) * 4
    if layout == "channels_last":
        v = v.contiguous(memory_format=torch.channels_last)
    elif layout == "group_view":
        v = v.unflatten(1, (3, 4))
    elif layout == "half":
        v = v.to(torch.bfloat16)
    before = v.clone()
    for dim in range(v.dim()):
        got = fast.softmax_units(v, dim, t)
        want = torch.softmax(v * t if t != 1.0 else v, dim)
        assert got.data_ptr() != v.data_ptr()
        if layout == "channels_last" and dim == 1:  # the channels lie innermost: see below
            continue
        assert got.dtype == want.dtype and torch.equal(got, want), (layout, dim)
    assert torch.equal(v, before)


@pytest.mark.parametrize("t", [1.0, 0.3])
@pytest.mark.parametrize(
    "shape,fmt", [((5, 12, 6, 4), torch.channels_last), ((3, 7, 4, 5, 2), torch.channels_last_3d)]
)
def test_softmax_units_cpu_channels_last(t, shape, fmt):
    """Over the channels of a channels-last output the CPU softmax runs where they lie
    (innermost): y keeps u's layout (torch.softmax returns the standard layout, which the
    weight-gradient call then copies back), and its numbers are torch's innermost-dim
    softmax of the same memory, within float32 rounding of float64."""
    v = (torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 4).contiguous(
        memory_format=fmt
    )
    assert not v.is_contiguous()
    got = fast.softmax_units(v, 1, t)
    assert got.stride() == v.stride()
    last = v.movedim(1, -1)  # the same memory, channels last in the logical order too
    assert last.is_contiguous()
    assert torch.equal(got.movedim(1, -1), torch.softmax(last * t if t != 1.0 else last, -1))
    ref = torch.softmax(v.double() * t, 1)
    assert ((got.double() - ref).abs() / ref.clamp_min(1e-30)).max() <= 1e-5
    for dim in (0, 2, 3):  # other dims: as before
        assert torch.equal(
            fast.softmax_units(v, dim, t), torch.softmax(v * t if t != 1.0 else v, dim)
        )


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("units", [None, 1, 3, 6, 7, 100])
def test_in_call_combine_blocks_match_one_combine(kind, units):
    """The in-call combine's blockwise dL/dW (any block size, the last block short) gives
    the oracle's |H_n| * sign(G) of the full gradient."""
    gen = torch.Generator().manual_seed(5)
    if kind == "conv":
        m = nn.Conv2d(4, 7, 3, stride=2, padding=1).double()
        x = torch.randn(3, 4, 9, 9, dtype=torch.float64, generator=gen)
    else:
        m = nn.Linear(5, 7).double()
        x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    with Record() as rec, torch.no_grad():
        m(x)
    xc, w, b, spec, _ = parse_call(*rec.calls[0])
    rule = HebbianRule(temperature=0.7)
    with torch.no_grad():
        u = spec.run(xc, w, b)
        gout = torch.randn(u.shape, dtype=u.dtype, generator=gen)
        h = hebbian_raw(spec, xc, u, w, b, rule)
    (m(x) * gout).sum().backward()
    want = oracle.expected_grad(oracle.hebbian(m, x, {"temperature": 0.7}), m.weight.grad)
    with torch.no_grad():
        got = accumulate.combine_in_call(spec, gout, xc, w, h.clone(), rule, units)
    assert rel_err(got, want) <= TOL[torch.float64]
    assert correlation.units_per_block(7) == 4 and correlation.units_per_block(4096) == 256


def test_blocked_weight_gradient_matches_one_call(monkeypatch, override):
    """Large conv weights on CPU get the Hebbian correlation a block of output units at a
    time (forced here on a small conv, blocks of 3 units, the last one short): the same sums
    as one call; transposed, grouped and linear calls and other devices keep one call
    (the static policy: measuring would let the timings decide)."""
    override(measure=False)
    gen = torch.Generator().manual_seed(6)
    m = nn.Conv2d(4, 7, 3, stride=2, padding=1, dilation=1).double()
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64, generator=gen)
    with Record() as rec, torch.no_grad():
        m(x)
    xc, w, _, spec, _ = parse_call(*rec.calls[0])
    cot = torch.randn(spec.run(xc, w, None).shape, dtype=w.dtype, generator=gen)
    one = correlation.weight_vjp(spec, xc, w, cot)
    assert not correlation.blocked(spec, w, policy.current())  # small: one call by default
    override(block_units=3)
    override(blocked_min_numel=0)
    assert correlation.blocked(spec, w, policy.current())
    calls = []
    orig = correlation.vendor
    monkeypatch.setattr(
        correlation, "vendor", lambda s, a, ww, c: calls.append(ww.shape[0]) or orig(s, a, ww, c)
    )
    got = correlation.weight_vjp(spec, xc, w, cot)
    assert calls == [3, 3, 1]
    assert rel_err(got, one) <= 1e-12
    for other in (
        dataclasses.replace(spec, transposed=True),
        dataclasses.replace(spec, groups=7),
        dataclasses.replace(spec, kind="linear"),
    ):
        assert not correlation.blocked(other, w, policy.current())
    override(blocked_devices=("cuda",))
    assert not correlation.blocked(spec, w, policy.current())


def _loop_wgrad(x, cot, k, stride, padding, dilation):
    """dW[o, c, i] = sum_{n, p} cot[n, o, p] * xpad[n, c, stride*p + dilation*i], written
    out one kernel offset i at a time (an independent reference for the weight gradient)."""
    pad = [q for p in reversed(padding) for q in (p, p)]
    xp = torch.nn.functional.pad(x, pad)
    out_sp = cot.shape[2:]
    dw = x.new_zeros(cot.shape[1], x.shape[1], *k)
    for i in itertools.product(*(range(n) for n in k)):
        idx = tuple(
            slice(d * a, d * a + s * (o - 1) + 1, s)
            for a, s, d, o in zip(i, stride, dilation, out_sp)
        )
        xs = xp[(slice(None), slice(None), *idx)]
        dw[(slice(None), slice(None), *i)] = torch.einsum(
            "nop,ncp->oc", cot.flatten(2), xs.flatten(2)
        )
    return dw


@pytest.mark.parametrize(
    "nd,k,stride,padding,dilation,channels_last",
    [
        (2, (3, 3), (1, 1), (1, 1), (1, 1), False),
        (2, (3, 3), (1, 1), (0, 0), (1, 1), True),
        (2, (3, 2), (2, 1), (1, 0), (1, 2), False),
        (2, (5, 5), (1, 1), (2, 2), (1, 1), True),
        (2, (1, 1), (2, 2), (0, 0), (1, 1), False),
        (1, (3,), (1,), (1,), (1,), False),
        (1, (4,), (3,), (2,), (2,), False),
        (3, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), False),
        (3, (2, 3, 2), (1, 2, 1), (0, 1, 1), (2, 1, 1), False),
    ],
)
def test_forward_form_weight_gradient_matches_loops(
    nd, k, stride, padding, dilation, channels_last, override
):
    """The weight gradient as a forward conv (batch and channels swapped, the cotangent as
    the kernel) against a plain loop over kernel offsets, for any stride, padding, dilation
    and kernel shape, in float64 and float32, in one call and in blocks of output units;
    written in the weight's layout."""
    from ghlc.runtime.calls import CallSpec

    gen = torch.Generator().manual_seed(11)
    size = (9, 8, 7)[:nd] if nd < 3 else (6, 7, 6)
    x = torch.randn(3, 4, *size, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 4, *k, dtype=torch.float64, generator=gen)
    if channels_last:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    spec = CallSpec(
        "conv", nd, stride=stride, padding=padding, dilation=dilation, output_padding=(0,) * nd
    )
    cot = torch.randn(spec.run(x, w, None).shape, dtype=torch.float64, generator=gen)
    ref = _loop_wgrad(x, cot, k, stride, padding, dilation)
    got = correlation.forward_form(spec, x, w, cot)
    assert got.shape == w.shape and got.stride() == w.stride()
    assert rel_err(got, ref) <= 1e-12
    got32 = correlation.forward_form(spec, x.float(), w.float(), cot.float())
    assert got32.dtype == torch.float32 and rel_err(got32, ref) <= 1e-5
    override(block_units=2)  # blocks of 2, 2 and 1 units
    got = correlation.forward_form(spec, x, w, cot)
    assert got.stride() == w.stride() and rel_err(got, ref) <= 1e-12


@pytest.mark.parametrize("case", ["linear", "linear3d", "conv", "conv_cl"])
def test_unit_activity_and_activity_sums(case, monkeypatch, override):
    """unit_activity (blocks of rows or samples) against a plain loop; Oja's decay with its
    per-unit sum over y * u against the sum over the weight (<W_k, corr_k> + b_k sum y_k):
    the same H; and activity_sums picks the route where the activations are the smaller."""
    from ghlc.runtime.calls import CallSpec

    gen = torch.Generator().manual_seed(13)
    rnd = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=gen)  # noqa: E731
    if case.startswith("linear"):
        spec = CallSpec("linear")
        x = rnd(5, 7) if case == "linear" else rnd(3, 2, 7)
        w, b = rnd(4, 7), rnd(4)
        u = spec.run(x, w, b)
    else:
        spec = CallSpec(
            "conv", 2, stride=(1, 1), padding=(1, 1), dilation=(1, 1), output_padding=(0, 0)
        )
        x, w, b = rnd(3, 2, 4, 4), rnd(5, 2, 3, 3), rnd(5)
        if case == "conv_cl":
            x = x.to(memory_format=torch.channels_last)
        u = spec.run(x, w, b)
    rule = HebbianRule()
    y = rule_module.compete(u, spec, rule)
    units = u.shape[-1] if spec.kind == "linear" else u.shape[1]
    ref = torch.zeros(units, dtype=torch.float64)
    for idx in itertools.product(*(range(n) for n in u.shape)):
        ref[idx[-1] if spec.kind == "linear" else idx[1]] += y[idx] * u[idx]
    for block in (1, 5, 10**6):
        got = fast.unit_activity(spec, y, u, block)
        assert got.shape == (units,) and rel_err(got, ref) <= 1e-12
    corr = correlation.weight_vjp(spec, x, w, y)
    by_weight = rule_module.hebbian_finish(spec, corr.clone(), y, w, b, rule)
    monkeypatch.setattr(fast, "activity_sums", lambda *a: True)
    by_activity = rule_module.hebbian_finish(spec, corr.clone(), y, w, b, rule, u=u)
    assert rel_err(by_activity, by_weight) <= 1e-12
    monkeypatch.undo()
    big = w.new_empty(units, u.numel())  # (more elements than u: the activations' route)
    assert fast.activity_sums(spec, y, u, big, corr) == (u.device.type == "cpu")
    assert not fast.activity_sums(spec, y, u, u.new_empty(units, 1), corr)
    override(activity_sum_devices=())
    assert not fast.activity_sums(spec, y, u, big, corr)


def test_forward_form_is_taken_where_it_pays(monkeypatch, override):
    """weight_vjp takes the forward form for plain stride-1 convs with kernels wider than 1,
    a short sum over batch x positions, enough channels and multiply-adds (both limits
    lowered here for a small conv), on the listed devices, and never for backprop's own
    dL/dW (as_forward=False); the same sums either way."""
    from ghlc.runtime.calls import CallSpec

    override(forward_form_min_channels=3)
    override(forward_form_min_macs=4 * 5 * 6 * 6 * 3 * 3 * 3)
    gen = torch.Generator().manual_seed(12)
    spec = CallSpec(
        "conv", 2, stride=(1, 1), padding=(1, 1), dilation=(1, 1), output_padding=(0, 0)
    )
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=gen)
    cot = torch.randn(4, 5, 6, 6, dtype=torch.float64, generator=gen)
    taken = []
    orig = correlation.forward_form
    monkeypatch.setattr(correlation, "forward_form", lambda *a: taken.append(1) or orig(*a))
    one = correlation.vendor(spec, x, w, cot)
    assert correlation.forward_form_pays(spec, w, cot, policy.current())
    assert rel_err(correlation.weight_vjp(spec, x, w, cot), one) <= 1e-12 and taken
    taken.clear()
    assert rel_err(correlation.weight_vjp(spec, x, w, cot, as_forward=False), one) <= 1e-12
    assert not taken
    rep = dataclasses.replace
    for other, ww in (
        (rep(spec, stride=(2, 1)), w),
        (rep(spec, dilation=(1, 2)), w),
        (rep(spec, groups=3), w[:, :1]),
        (rep(spec, transposed=True), w),
        (rep(spec, kind="linear"), w),
        (spec, w[:, :, :1, :]),
    ):
        assert not correlation.forward_form_pays(other, ww, cot, policy.current())
    limit = 4 * 6 * 6
    override(forward_form_max_reduction=limit - 1)
    assert not correlation.forward_form_pays(spec, w, cot, policy.current())
    override(forward_form_max_reduction=limit)
    assert correlation.forward_form_pays(spec, w, cot, policy.current())
    override(forward_form_min_channels=4)  # (3 input channels)
    assert not correlation.forward_form_pays(spec, w, cot, policy.current())
    assert correlation.forward_form_pays(spec, w.new_empty(5, 4, 3, 3), cot, policy.current())
    override(forward_form_min_channels=3)
    override(forward_form_min_macs=4 * 5 * 6 * 6 * 3 * 3 * 3 + 1)
    assert not correlation.forward_form_pays(spec, w, cot, policy.current())
    override(forward_form_min_macs=4 * 5 * 6 * 6 * 3 * 3 * 3)
    assert correlation.forward_form_pays(spec, w, cot, policy.current())
    override(forward_form_devices=("cuda",))
    assert not correlation.forward_form_pays(spec, w, cot, policy.current())
    correlation.weight_vjp(spec, x, w, cot)
    assert not taken
