"""Training-loop semantics of a prepared model, checked against the independent oracle:
state_dict compatibility, no Hebbian work outside training, gradient accumulation,
zero_grad, the pure-Hebbian signal, competition scope and weight sharing."""

from __future__ import annotations

import copy
import dataclasses
import math

import oracle
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import BY_NAME, sweep

import ghlc
import ghlc.runtime.function as rt_function
import ghlc.runtime.mode as rt_mode
import ghlc.runtime.timing as rt_timing
from ghlc.runtime import correlation, fast, policy, sampled
from ghlc.runtime.status import STATUS


def loss_fn(out):
    g = torch.Generator().manual_seed(7)
    return ((out - torch.randn(out.shape, generator=g)) ** 2).mean()


def _plastic_names(m):
    return [s for s in ghlc.runtime.runtime_of(m).sites]


def _assert_matches(m, expected: dict, plain_grads: dict):
    for n, p in m.named_parameters():
        exp = expected[n] if n in expected else plain_grads[n]
        got = p.grad.to(torch.float64)
        err = (got - exp).norm() / exp.norm().clamp_min(1e-30)
        assert err <= 1e-4, f"{n}: rel err {err:.3g}"
        if n in expected:
            big = exp.abs() > 1e-3 * exp.abs().max()
            assert torch.equal(torch.sign(got[big]), torch.sign(exp[big])), n


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(F.relu(self.g(F.relu(self.stem(x)))).mean((2, 3)))


class Tied(nn.Module):
    """Two modules sharing one weight Parameter."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.a(h))
        h = F.relu(self.b(h))
        return self.fc(h.mean((2, 3)))


def _build(name):
    e = BY_NAME[name]
    model, x = e.make()
    return model, x, ghlc.GHLConfig(**e.config_kwargs())


def _compiled(name):
    """(zoo model ``name``, its layer graph after the default passes)."""
    model, x, cfg = _build(name)
    return model, ghlc.passes.PassManager(ghlc.passes.default_passes())(
        ghlc.trace(model, (x,), config=cfg)
    )


# ---- state_dict ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet", "vit", "stdconv"])
def test_state_dict_round_trip(name):
    model, x, cfg = _build(name)
    m = ghlc.prepare(model, (x,), config=cfg)
    assert list(m.state_dict()) == list(model.state_dict())
    # train one step so the weights differ, then load into a fresh original and back
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss_fn(m(x)).backward()
    opt.step()
    fresh, _, _ = _build(name)
    res = fresh.load_state_dict(m.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    m2 = ghlc.prepare(fresh, (x,), config=cfg)
    fresh2, _, _ = _build(name)
    m2.load_state_dict(fresh2.state_dict(), strict=True)
    assert list(m2.state_dict()) == list(fresh2.state_dict())
    for k, v in fresh2.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k


# ---- no Hebbian work outside training --------------------------------------------------------


@pytest.fixture
def counters(monkeypatch):
    counts = {"hebbian_raw": 0, "plastic_call": 0}
    raw, pc = rt_function.hebbian_raw, rt_mode.plastic_call

    def c_raw(*a, **k):
        counts["hebbian_raw"] += 1
        return raw(*a, **k)

    def c_pc(*a, **k):
        counts["plastic_call"] += 1
        return pc(*a, **k)

    monkeypatch.setattr(rt_function, "hebbian_raw", c_raw)
    monkeypatch.setattr(rt_mode, "plastic_call", c_pc)
    return counts


@pytest.mark.parametrize("name", ["vgg", "vit"])
def test_eval_and_no_grad_do_no_hebbian_work(name, counters):
    model, x, cfg = _build(name)
    plain = copy.deepcopy(model)
    m = ghlc.prepare(model, (x,), config=cfg)
    m.eval()
    plain.eval()
    loss_fn(m(x)).backward()
    loss_fn(plain(x)).backward()
    assert counters == {"hebbian_raw": 0, "plastic_call": 0}
    for (n, p), q in zip(m.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), n  # eval: ordinary gradients, the same kernels
    m.train()
    with torch.no_grad():
        m(x)
    assert counters == {"hebbian_raw": 0, "plastic_call": 0}
    m.zero_grad()
    loss_fn(m(x)).backward()  # sanity: the counters do see training
    assert counters["plastic_call"] > 0 and counters["hebbian_raw"] > 0


# ---- accumulation and zero_grad ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["vgg", "vit", "conv_twice"])
def test_grad_accumulation_two_micro_batches(name):
    model, x, cfg = _build(name)
    x2 = torch.randn_like(x).abs() + 0.05 if BY_NAME[name].fx_fails else torch.randn_like(x)
    plain = copy.deepcopy(model)
    m = ghlc.prepare(model, (x,), config=cfg)
    names = _plastic_names(m)
    h1, _, _ = oracle.run_plain(plain, (x,), names, loss_fn)
    h2, g, _ = oracle.run_plain(plain, (x2,), names, loss_fn, zero=False)  # G1 + G2
    expected = {n: oracle.expected_grad(h1[n] + h2[n], g[n]) for n in names}
    m.train()
    m.zero_grad()
    loss_fn(m(x)).backward()
    loss_fn(m(x2)).backward()
    _assert_matches(m, expected, g)
    # not the same as normalising each micro-batch separately
    n0 = names[0]
    per_batch = oracle.expected_grad(h1[n0], g[n0]) + oracle.expected_grad(h2[n0], g[n0])
    assert not torch.allclose(per_batch, expected[n0], rtol=1e-3)


@pytest.mark.parametrize("name", ["vgg", "vit", "conv_twice"])
def test_unit_normalisation_two_micro_batches(name):
    """normalisation="unit": each output unit's total H is scaled by its own max, also for
    shared weights, in_proj views and accumulated micro-batches."""
    model, x, cfg = _build(name)
    cfg = dataclasses.replace(cfg, normalisation="unit")
    x2 = torch.randn_like(x).abs() + 0.05 if BY_NAME[name].fx_fails else torch.randn_like(x)
    plain = copy.deepcopy(model)
    m = ghlc.prepare(model, (x,), config=cfg)
    names = _plastic_names(m)
    h1, _, _ = oracle.run_plain(plain, (x,), names, loss_fn)
    h2, g, _ = oracle.run_plain(plain, (x2,), names, loss_fn, zero=False)
    expected = {n: oracle.expected_grad(h1[n] + h2[n], g[n], normalisation="unit") for n in names}
    m.train()
    m.zero_grad()
    loss_fn(m(x)).backward()
    loss_fn(m(x2)).backward()
    _assert_matches(m, expected, g)
    layer = oracle.expected_grad(h1[names[0]] + h2[names[0]], g[names[0]])
    assert not torch.allclose(layer, expected[names[0]], rtol=1e-3)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_resets_accumulation(set_to_none):
    model, x, cfg = _build("resnet")
    x2 = torch.randn_like(x)
    plain = copy.deepcopy(model)
    m = ghlc.prepare(model, (x,), config=cfg)
    names = _plastic_names(m)
    h2, g2, _ = oracle.run_plain(plain, (x2,), names, loss_fn)
    expected = {n: oracle.expected_grad(h2[n], g2[n]) for n in names}
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss_fn(m(x)).backward()
    opt.zero_grad(set_to_none=set_to_none)
    loss_fn(m(x2)).backward()
    _assert_matches(m, expected, g2)


# ---- rule variants ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vgg", "mlp", "unet"])
def test_global_signal_none_is_minus_hn(name):
    model, x, _ = _build(name)
    e = BY_NAME[name]
    cfg = ghlc.GHLConfig(plastic=e.plastic_kinds, global_signal="none")
    plain = copy.deepcopy(model)
    m = ghlc.prepare(model, (x,), config=cfg)
    names = _plastic_names(m)
    assert set(names) == set(e.plastic)
    h, g, _ = oracle.run_plain(plain, (x,), names, loss_fn)
    expected = {n: oracle.expected_grad(h[n], None, "none") for n in names}
    for n in names:
        assert torch.equal(expected[n], -h[n] / (h[n].abs().max() + 1e-30))
    m.train()
    loss_fn(m(x)).backward()
    _assert_matches(m, expected, g)


RULES = [
    dict(competition_scope="layer"),
    dict(competition_scope="group"),
    dict(competition_scope="group", temperature=0.5, local_rule="hebb"),
    dict(competition="hard", competition_scope="group"),
    dict(competition="none"),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(f"{v}" for v in r.values()))
def test_grouped_conv_competition_matches_oracle(rule):
    torch.manual_seed(3)
    model, x = GroupedNet(), torch.randn(2, 3, 6, 6)
    plain = copy.deepcopy(model)
    m = ghlc.prepare(model, (x,), config=ghlc.GHLConfig(**rule))
    names = _plastic_names(m)
    assert set(names) == {"stem.weight", "g.weight"}
    h, g, _ = oracle.run_plain(plain, (x,), names, loss_fn, rule=rule)
    expected = {n: oracle.expected_grad(h[n], g[n]) for n in names}
    m.train()
    loss_fn(m(x)).backward()
    _assert_matches(m, expected, g)


def test_group_scope_differs_from_layer_scope():
    torch.manual_seed(3)
    model, x = GroupedNet(), torch.randn(2, 3, 6, 6)
    grads = {}
    for scope in ("layer", "group"):
        m = ghlc.prepare(model, (x,), config=ghlc.GHLConfig(competition_scope=scope))
        m.train()
        loss_fn(m(x)).backward()
        grads[scope] = m.g.weight.grad.clone()
        stem = m.stem.weight.grad.clone()  # groups=1: scope makes no difference there
        grads[scope + "_stem"] = stem
    assert not torch.allclose(grads["layer"], grads["group"])
    assert torch.equal(grads["layer_stem"], grads["group_stem"])


# ---- weight sharing ---------------------------------------------------------------------------


def test_tied_weight_sums_raw_terms():
    torch.manual_seed(5)
    model, x = Tied(), torch.randn(2, 3, 6, 6)
    plain = copy.deepcopy(model)
    m = ghlc.prepare(model, (x,))
    lg = ghlc.passes.PassManager(ghlc.passes.default_passes())(ghlc.trace(model, (x,)))
    shared = [i for i in lg.plastic() if i.name in ("a.weight", "b.weight")]
    assert len(shared) == 1 and shared[0].calls == 2
    names = [i.name for i in lg.plastic()]
    h, g, calls = oracle.run_plain(plain, (x,), names, loss_fn)
    assert sum(c.name == shared[0].name for c in calls) == 2
    expected = {n: oracle.expected_grad(h[n], g[n]) for n in names}
    expected["a.weight"] = expected["b.weight"] = expected[shared[0].name]
    m.train()
    loss_fn(m(x)).backward()
    assert m.a.weight is m.b.weight
    _assert_matches(m, expected, g)
    # the sum of raw terms, normalised once: not the sum of per-call normalised terms
    per_call = [oracle.call_term(c, {}) for c in calls if c.name == shared[0].name]
    separate = sum(oracle.expected_grad(t, g[shared[0].name]) for t in per_call)
    assert not torch.allclose(separate, expected[shared[0].name], rtol=1e-3)


# ---- when H is computed: forward or backward, the same numbers --------------------------------


@pytest.mark.parametrize("name", ["vgg", "resnet", "unet", "vit", "stdconv", "conv_twice"])
def test_hebbian_timing_gives_the_same_grads(name):
    """``hebbian_at`` forward / backward / auto / fast: identical gradients (float32
    rounding)."""
    model, x, cfg = _build(name)
    grads = {}
    for at in ("backward", "forward", "auto", "fast"):
        m = ghlc.prepare(
            copy.deepcopy(model), (x,), config=ghlc.GHLConfig(**{**cfg.to_dict(), "hebbian_at": at})
        )
        m.train()
        torch.manual_seed(0)  # dropout, if any, draws the same mask
        loss_fn(m(x)).backward()
        grads[at] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for at in ("forward", "auto", "fast"):
        for n, g in grads["backward"].items():
            err = (grads[at][n] - g).norm() / g.norm().clamp_min(1e-30)
            assert err <= 1e-6, f"{at} {n}: rel err {err:.3g}"


class _KeepsOrNot(nn.Module):
    """c1's output goes to BatchNorm (which saves its input), c2's to ReLU (which saves only
    its own output), c3's to an in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.c2, self.c3 = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = torch.relu(self.c2(self.bn(self.c1(x))))
        return F.relu(self.c3(h), inplace=True).mean((1, 2, 3))


def test_trace_knows_which_outputs_backprop_keeps():
    lg = ghlc.trace(_KeepsOrNot(), (torch.randn(2, 3, 8, 8),))
    saved = {i.name: i.out_saved for i in lg.layers()}
    assert saved == {"c1.weight": True, "c2.weight": False, "c3.weight": True}
    assert lg.layer("c3.weight").copy_out  # ...but it is changed in place afterwards


def _kept_bytes(m, x, monkeypatch) -> int:
    """Bytes of the distinct storages a training forward keeps for backward: autograd's saved
    tensors, and the tensors held by hooks registered during the forward (on outputs, or on
    the autograd nodes that computed them)."""
    seen: dict[int, int] = {}

    def note(t):
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    hooks = []
    with monkeypatch.context() as mp:
        real = torch.Tensor.register_hook
        mp.setattr(
            torch.Tensor, "register_hook", lambda self, fn: (hooks.append(fn), real(self, fn))[1]
        )
        producer = rt_function._producer

        class Spy:
            def __init__(self, node):
                self.node = node

            def register_prehook(self, fn):
                hooks.append(fn)
                return self.node.register_prehook(fn)

        mp.setattr(rt_function, "_producer", lambda out: Spy(producer(out)))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (note(t), t)[1], lambda t: t):
            out = m(x)
    for fn in hooks:
        for cell in fn.__closure__ or ():
            v = cell.cell_contents
            for t in v if isinstance(v, (tuple, list)) else (v,):
                note(t)
    out.sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("hooks", [True, False], ids=["output-hook", "function"])
def test_auto_timing_keeps_no_extra_activation(hooks, monkeypatch, override):
    """auto: u is kept only where backprop keeps it anyway (c1); elsewhere H is computed in
    the forward pass and only H is kept, so the kept tensors are backprop's plus H."""
    override(hooked_calls=hooks)
    model, x = _KeepsOrNot(), torch.randn(2, 3, 16, 16)  # c2's, c3's outputs larger than H
    sizes = {}
    for variant in ("bp", "auto", "backward"):
        m = (
            copy.deepcopy(model)
            if variant == "bp"
            else ghlc.prepare(copy.deepcopy(model), (x,), ghlc.GHLConfig(hebbian_at=variant))
        )
        sizes[variant] = _kept_bytes(m.train(), x, monkeypatch)
    assert sizes["backward"] > sizes["bp"]
    # auto: c1 (kept by BN) adds nothing; c2, c3 add H (weight-sized) at most
    w_bytes = sum(4 * c.weight.numel() for c in (model.c2, model.c3))
    assert sizes["bp"] <= sizes["auto"] <= sizes["bp"] + w_bytes


# ---- raw totals are released by an optimiser step ---------------------------------------------


def test_step_releases_raw_totals_and_keeps_results():
    model, x, cfg = _build("vgg")
    x2 = torch.randn_like(x)
    plain = copy.deepcopy(model)
    m = ghlc.prepare(model, (x,), config=cfg)
    names = _plastic_names(m)
    rt = ghlc.runtime.runtime_of(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: the weights stay those of plain
    m.train()
    loss_fn(m(x)).backward()
    assert all(rt.sites[n].state.h_acc is not None for n in names)
    opt.step()
    assert all(rt.sites[n].state.h_acc is None and rt.sites[n].state.g_acc is None for n in names)
    opt.zero_grad()
    loss_fn(m(x2)).backward()
    h2, g2, _ = oracle.run_plain(plain, (x2,), names, loss_fn)
    _assert_matches(m, {n: oracle.expected_grad(h2[n], g2[n]) for n in names}, g2)


def _vgg_steps(accumulation: str):
    model, x, cfg = _build("vgg")
    plain = copy.deepcopy(model)
    m = ghlc.prepare(
        model, (x,), config=ghlc.GHLConfig(**{**cfg.to_dict(), "accumulation": accumulation})
    )
    names = _plastic_names(m)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: the weights stay those of plain
    return m, plain, x, names, opt, ghlc.runtime.runtime_of(m)


@pytest.fixture
def fused_calls(monkeypatch, override):
    """Every weight qualifies for the in-call combine (not only large ones); records the
    kinds of the calls that used it."""
    override(in_call_combine_min_numel=0)
    return _spy(monkeypatch, "combine_in_call", lambda spec, *a: spec.kind)


def _spy(monkeypatch, name: str, note) -> list:
    """Wrap ``ghlc.runtime.function.<name>`` (called with the call's spec first); returns the
    list that gets ``note(*args)`` of every call."""
    import ghlc.runtime.function as fn

    calls: list = []
    orig = getattr(fn, name)

    def spy(*a, **k):
        calls.append(note(*a))
        return orig(*a, **k)

    monkeypatch.setattr(fn, name, spy)
    return calls


@pytest.mark.parametrize("fused", [False, True])
def test_auto_accumulation_stops_keeping_totals_after_a_plain_step(fused, request):
    calls = request.getfixturevalue("fused_calls") if fused else None
    m, plain, x, names, opt, rt = _vgg_steps("auto")
    loss_fn(m(x)).backward()
    opt.step()
    opt.zero_grad()
    x2 = torch.randn_like(x)
    loss_fn(m(x2)).backward()  # combined in place, no totals kept
    assert all(rt.sites[n].state.h_acc is None for n in names)
    h2, g2, _ = oracle.run_plain(plain, (x2,), names, loss_fn)
    _assert_matches(m, {n: oracle.expected_grad(h2[n], g2[n]) for n in names}, g2)
    opt.step()
    loss_fn(m(x)).backward()  # after step() without zero_grad: a new total, as documented
    h1, g1, _ = oracle.run_plain(plain, (x,), names, loss_fn)
    others = {n: g1[n] + g2[n] for n in g1}  # backprop layers keep adding, as in torch
    _assert_matches(m, {n: oracle.expected_grad(h1[n], g1[n]) for n in names}, others)
    with pytest.raises(ghlc.RuntimeGHLError, match="accumulation='always'"):
        loss_fn(m(x2)).backward()  # accumulation that starts late: a clear error
    if fused:
        assert calls, "the in-call combine never ran"


# ---- in-call combine (large weights used by one call: no full G buffer) ----------------------


def _steps_against_oracle(
    name, fused_calls, signal="grad_sign", steps=3, oracle_rule=None, memory_format=None, **kw
):
    """Train ``steps`` steps at lr 0 (the weights stay those of the plain copy), checking
    every step's grads against the oracle (``oracle_rule``: its rule settings, if any);
    returns the prepared model."""
    model, x, cfg = _build(name)
    if memory_format is not None:
        model, x = model.to(memory_format=memory_format), x.contiguous(memory_format=memory_format)
    cfg = dataclasses.replace(cfg, global_signal=signal, **kw)
    plain = copy.deepcopy(model)
    m = ghlc.prepare(model, (x,), config=cfg)
    names = _plastic_names(m)
    h, g, _ = oracle.run_plain(plain, (x,), names, loss_fn, rule=oracle_rule)
    expected = {n: oracle.expected_grad(h[n], g[n], signal) for n in names}
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    m.train()
    fused_per_step = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(m(x)).backward()
        _assert_matches(m, expected, g)
        opt.step()
        fused_per_step.append(len(fused_calls))
    return m, fused_per_step


@pytest.mark.parametrize(
    "name,signal",
    [("vgg", "grad_sign"), ("vgg", "none"), ("resnet", "grad_sign"), ("vit", "grad_sign")],
)
def test_in_call_combine_matches_oracle(fused_calls, name, signal):
    """From the second step on, a weight fed by one call alone is combined inside the call,
    its gradient computed a block of output units at a time; the grads stay the oracle's."""
    _, fused = _steps_against_oracle(name, fused_calls, signal)
    assert fused[0] == 0 and fused[1] > 0  # the first step checks single use


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("name", ["vgg", "resnet", "mobilenetv2", "unet"])
@pytest.mark.parametrize("timing", ["auto", "fast", "forward", "backward", "recompute"])
def test_channels_last_models_match_oracle(monkeypatch, name, fuse, timing, override):
    """A model and input in channels-last layout (as users do for speed): every step's grads
    are the oracle's, with the in-call combine on every weight or on none, for every timing
    of H (the recompute split forced onto these small convs), and each plastic weight's
    gradient keeps the weight's layout."""
    override(in_call_combine_min_numel=0 if fuse else 1 << 62)
    override(split_min_numel=0)
    override(split_units=2)
    fused = _spy(monkeypatch, "combine_in_call", lambda spec, *a: spec.kind)
    cl = torch.channels_last
    m, per_step = _steps_against_oracle(name, fused, memory_format=cl, hebbian_at=timing)
    assert (per_step[-1] > per_step[0]) == fuse
    for n in _plastic_names(m):
        p = m.get_parameter(n)
        if p.dim() == 4:
            assert p.grad.is_contiguous(memory_format=cl), n


def test_in_call_combine_skips_shared_weights(fused_calls):
    m, _ = _steps_against_oracle("conv_twice", fused_calls)
    shared = ghlc.runtime.runtime_of(m).sites["conv.weight"].state
    assert shared.single_use is False and shared.calls == 0


class Reg(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def _reg_grads(fuse: bool, reg_from: int = 0, steps: int = 3):
    with policy.override(in_call_combine_min_numel=0 if fuse else 1 << 62):
        return _reg_steps(reg_from, steps)


def _reg_steps(reg_from: int, steps: int):
    torch.manual_seed(0)
    model, x = Reg(), torch.randn(4, 3, 8, 8)
    m = ghlc.prepare(model, (x,), config=ghlc.GHLConfig())
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    grads = []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_fn(m(x))
        if step >= reg_from:  # a penalty on the weight: a second use outside the conv
            loss = loss + 0.1 * (m.conv.weight**2).sum()
        loss.backward()
        grads.append(m.conv.weight.grad.clone())
        opt.step()
    return grads


def test_in_call_combine_skips_weights_used_elsewhere():
    """A weight that also gets a gradient from outside its call keeps the combine after
    backward (sign of the total G), exactly as without the in-call path."""
    for a, b in zip(_reg_grads(True), _reg_grads(False)):
        assert torch.equal(a, b)


def test_in_call_combine_refuses_a_use_that_appears_later():
    with pytest.raises(ghlc.RuntimeGHLError, match="gradient from outside its call"):
        _reg_grads(True, reg_from=2)
    _reg_grads(False, reg_from=2)  # without the in-call path: fine


@pytest.mark.parametrize("accumulation", ["auto", "always"])
def test_accumulation_every_step_stays_exact(accumulation):
    """Micro-batches from the first step on (auto keeps totals), or at any time (always)."""
    m, plain, x, names, opt, rt = _vgg_steps(accumulation)
    x2 = torch.randn_like(x)
    h1, _, _ = oracle.run_plain(plain, (x,), names, loss_fn)
    h2, g, _ = oracle.run_plain(plain, (x2,), names, loss_fn, zero=False)
    expected = {n: oracle.expected_grad(h1[n] + h2[n], g[n]) for n in names}
    if accumulation == "always":  # a plain first step, then accumulation
        loss_fn(m(x)).backward()
        opt.step()
        opt.zero_grad()
    for _ in range(2):
        loss_fn(m(x)).backward()
        loss_fn(m(x2)).backward()
        _assert_matches(m, expected, g)
        opt.step()
        opt.zero_grad()


def test_prepare_keeps_nothing_of_the_original_alive():
    """Tracing holds no reference to the user's model or its tensors once it returns."""
    import gc
    import weakref

    model, x, cfg = _build("vit")
    refs = [weakref.ref(p) for p in model.parameters()]
    m = ghlc.prepare(model, (x,), config=cfg)
    del model
    gc.collect()
    assert all(r() is None for r in refs)
    assert m is not None


class _GradInForward(nn.Module):
    """Differentiates inside forward (an energy-style model)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = x.detach().requires_grad_(True)
        e = torch.relu(self.c(x)).pow(2).sum()
        (gx,) = torch.autograd.grad(e, x, create_graph=True)
        return self.fc(torch.relu(self.c(gx)).mean((2, 3)))


def test_model_that_differentiates_in_forward_is_traced():
    """The record run's saved-tensor watch cannot serve a backward inside forward; tracing
    then records without it. (Training such a model differentiates a plastic call twice,
    which the runtime does not support yet.)"""
    x = torch.randn(2, 3, 6, 6)
    lg = ghlc.trace(_GradInForward(), (x,))
    assert lg.layer("c.weight").calls == 2 and not lg.layer("c.weight").out_saved
    assert lg.layer("fc.weight").calls == 1


# ---- stacked weight gradients (inside a captured CUDA-graph step) ---------------------------


@pytest.fixture
def stacked_calls(monkeypatch, override):
    """Every stackable conv stacks its two weight gradients, here on CPU (as inside
    ``cuda_graph_step(..., stack_weight_grads=True)`` on CUDA); records the calls that did."""
    override(stack_devices=("cpu",))
    monkeypatch.setattr(STATUS, "capturing", 1)
    monkeypatch.setattr(STATUS, "stacking", 1)
    return _spy(monkeypatch, "stacked_wgrads", lambda spec, *a: spec.kind)


@pytest.mark.parametrize(
    "name,signal,kw",
    [
        ("resnet", "grad_sign", {}),
        ("resnet", "none", {}),
        ("vgg", "grad_sign", {"hebbian_at": "backward"}),
        ("conv_twice", "grad_sign", {"hebbian_at": "backward"}),  # a weight of two calls
    ],
)
def test_stacked_weight_gradients_match_oracle(stacked_calls, name, signal, kw):
    """One weight-gradient call with backprop's cotangent and y stacked along the output
    channels gives both gradients: the grads stay the oracle's, step after step."""
    _steps_against_oracle(name, stacked_calls, signal, **kw)
    assert stacked_calls and set(stacked_calls) == {"conv"}


def _two_step_grads(name: str, **kw) -> list[dict[str, torch.Tensor]]:
    """Every parameter's grad over two SGD steps (lr 0.05) of zoo model ``name`` prepared
    with its config changed by ``kw``."""
    model, x, cfg = _build(name)
    m = ghlc.prepare(model, (x,), config=dataclasses.replace(cfg, **kw))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    out = []
    for _ in range(2):
        opt.zero_grad()
        loss_fn(m(x)).backward()
        out.append({k: p.grad.clone() for k, p in m.named_parameters()})
        opt.step()
    return out


def _assert_same_grads(want: list[dict], got: list[dict]) -> None:
    for a, b in zip(want, got, strict=True):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    "kw",
    [
        {"local_rule": "hebb"},
        {"competition": "none"},
        {"competition": "hard"},
        {"temperature": 0.3},
    ],
    ids=["hebb", "no-competition", "hard-wta", "temperature"],
)
def test_stacked_weight_gradients_match_the_separate_calls(monkeypatch, kw, override):
    """Rule variants the oracle does not cover: the stacked call against the two calls."""
    grads = {}
    for stack in (False, True):
        override(stack_devices=("cpu",) if stack else ())
        monkeypatch.setattr(STATUS, "capturing", 1)
        monkeypatch.setattr(STATUS, "stacking", 1)
        grads[stack] = _two_step_grads("resnet", **kw)
    _assert_same_grads(grads[False], grads[True])


@pytest.mark.parametrize("over", ["batch", "positions"])
@pytest.mark.parametrize("name", sweep())
def test_sampled_modes_match_oracle(name, over, monkeypatch):
    """The sampled modes on every zoo model against the oracle's sums over the sampled terms
    (the draw fixed to its last value: the last block of the batch, or odd grid offsets,
    which need the strided call's leading zero rows)."""

    def last(n: int) -> int:
        return n - 1

    monkeypatch.setattr(sampled, "draw", last)
    rule = {"sample_fraction": 0.25, "sample_over": over, "draw": last}
    _steps_against_oracle(
        name, [], steps=2, oracle_rule=rule, sample_fraction=0.25, sample_over=over
    )


@pytest.mark.parametrize("hooks", [True, False], ids=["output-hook", "function"])
@pytest.mark.parametrize("timing", ["auto", "fast", "forward", "backward"])
@pytest.mark.parametrize("name", sweep())
def test_block_timing_matches_oracle(name, timing, hooks, monkeypatch, override):
    """The sampled mode over the batch keeps a copy of u's block (drawn in the forward pass)
    instead of H where that is smaller and backprop does not keep u: taken by ``auto`` and
    ``fast`` where it applies and only there; every zoo model against the oracle."""
    override(hooked_calls=hooks)
    monkeypatch.setattr(sampled, "draw", lambda n: n - 1)
    taken = _spy(monkeypatch, "sample_block", lambda *a: 1)
    rule = {"sample_fraction": 0.25, "sample_over": "batch", "draw": lambda n: n - 1}
    _steps_against_oracle(
        name, [], steps=2, oracle_rule=rule, sample_fraction=0.25, hebbian_at=timing
    )
    model, lg = _compiled(name)
    applies = any(
        str(i.role) == "plastic"
        and not (i.out_saved and not i.copy_out)
        and math.prod(i.weight_shape) >= 0.25 * math.prod(i.out_shape)
        for i in lg.layers()
    )
    assert bool(taken) == (applies and timing in ("auto", "fast"))


def test_block_timing_keeps_the_block_not_h(monkeypatch):
    """Sampled over the batch, a conv whose output ReLU does not keep and whose weight is
    larger than a quarter of its output: ``auto`` keeps backprop's tensors plus a copy of the
    output's block (a quarter), ``forward`` backprop's plus H (weight-sized)."""
    model = nn.Sequential(
        nn.Conv2d(4, 64, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 3)
    )
    x = torch.randn(8, 4, 6, 6)  # output 8x64x4x4 = 8192 values, weight 2304
    sizes = {}
    for at in ("bp", "auto", "forward"):
        m = (
            copy.deepcopy(model)
            if at == "bp"
            else ghlc.prepare(
                copy.deepcopy(model), (x,), ghlc.GHLConfig(sample_fraction=0.25, hebbian_at=at)
            )
        )
        sizes[at] = _kept_bytes(m.train(), x, monkeypatch)
    assert sizes["auto"] == sizes["bp"] + 4 * 2 * 64 * 4 * 4  # 2 of the 8 samples
    assert sizes["forward"] == sizes["bp"] + 4 * 64 * 4 * 3 * 3


def _two_steps_against_oracle(name, over, monkeypatch):
    """Two steps of zoo model ``name`` against the oracle, exact (``over="none"``) or sampled
    over a quarter of ``over`` (the last block of the batch, or the position grid)."""
    if over == "none":
        _steps_against_oracle(name, [], steps=2)
        return
    monkeypatch.setattr(sampled, "draw", lambda n: n - 1)
    rule = {"sample_fraction": 0.25, "sample_over": over, "draw": lambda n: n - 1}
    _steps_against_oracle(
        name, [], steps=2, oracle_rule=rule, sample_fraction=0.25, sample_over=over
    )


@pytest.mark.parametrize("over", ["none", "batch", "positions"])
@pytest.mark.parametrize("name", sweep())
def test_blocked_weight_gradients_match_oracle(name, over, monkeypatch, override):
    """The Hebbian correlation in blocks of output units (on CPU for large conv weights;
    forced here on every plain conv, blocks of 3 units) on every zoo model, exact and both
    sampled modes, against the oracle."""
    override(block_units=3)
    override(blocked_min_numel=0)
    override(forward_form_devices=())  # (it would come first)
    blocked: list[bool] = []
    orig = correlation.blocked
    monkeypatch.setattr(
        correlation,
        "blocked",
        lambda spec, w, pol: blocked.append(orig(spec, w, pol)) or blocked[-1],
    )
    _two_steps_against_oracle(name, over, monkeypatch)
    model, lg = _compiled(name)
    wide = any(
        str(i.role) == "plastic"
        and i.kind in ("conv1d", "conv2d", "conv3d")
        and i.groups == 1
        and i.weight_shape[0] > 3
        for i in lg.layers()
    )
    assert any(blocked) == wide  # blocks were taken where they apply


@pytest.mark.parametrize("way", ["always", "never"])
@pytest.mark.parametrize("over", ["none", "batch", "positions"])
@pytest.mark.parametrize("name", sweep())
def test_forward_form_weight_gradients_match_oracle(name, over, way, monkeypatch, override):
    """The Hebbian correlation as a forward conv (on CPU for small outputs; forced here on
    every conv it applies to, whatever the output size, channels and multiply-adds, in
    blocks of 3 output units) and as
    the weight-gradient call everywhere (the form off) on every zoo model, exact and both
    sampled modes, against the oracle."""
    if way == "always":
        override(forward_form_max_reduction=1 << 62)
        override(forward_form_min_macs=0)
        override(forward_form_min_channels=0)
        override(block_units=3)
    else:
        override(forward_form_devices=())
    taken: list[bool] = []
    orig = correlation.forward_form_pays
    monkeypatch.setattr(
        correlation,
        "forward_form_pays",
        lambda spec, w, cot, pol: taken.append(orig(spec, w, cot, pol)) or taken[-1],
    )
    _two_steps_against_oracle(name, over, monkeypatch)
    if way == "never":
        assert not any(taken)
        return
    model, lg = _compiled(name)
    plastic = {i.module for i in lg.layers() if str(i.role) == "plastic"}
    convs = [
        m
        for n, m in model.named_modules()
        if n in plastic and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    if not any(i.kind.startswith("conv") for i in lg.layers() if i.module in plastic):
        assert not any(taken)  # linear layers only
    elif over != "positions" and any(  # (a position grid strides the call: never there)
        m.groups == 1 and min(m.kernel_size) > 1 and max(m.stride) == 1 and max(m.dilation) == 1
        for m in convs
    ):
        assert any(taken)


@pytest.mark.parametrize("way", ["always", "never"])
@pytest.mark.parametrize("over", ["none", "batch", "positions"])
@pytest.mark.parametrize("name", sweep())
def test_activity_sums_match_oracle(name, over, way, monkeypatch, override):
    """Oja's per-unit sum over y * u (on CPU where the activations are smaller than the
    weight; forced here wherever it applies, whatever the sizes, in blocks of 5 elements) and
    over the weight everywhere (the route off) on every zoo model, exact and both sampled
    modes, against the oracle."""
    orig = fast.activity_sums
    if way == "always":
        override(dot_block_numel=5)
        monkeypatch.setattr(
            fast,
            "activity_sums",
            lambda spec, y, u, w, corr: (
                (
                    (spec.kind == "linear" or not spec.transposed)
                    and corr.dim() > 1
                    and u.dtype == y.dtype == corr.dtype
                )
                and taken.append(True) is None
            ),
        )
    else:
        override(activity_sum_devices=())
        monkeypatch.setattr(fast, "activity_sums", lambda *a: taken.append(orig(*a)) or taken[-1])
    taken: list[bool] = []
    _two_steps_against_oracle(name, over, monkeypatch)
    if way == "never":
        assert not any(taken)
        return
    model, lg = _compiled(name)
    rows = [
        i
        for i in lg.layers()
        if str(i.role) == "plastic" and (i.kind in ("linear", "conv1d", "conv2d", "conv3d"))
    ]
    if any(i.kind == "linear" for i in rows) or (rows and over != "positions"):
        assert any(taken)  # (a position grid takes Oja's sum over the weight)


def test_stacking_size_limit(stacked_calls, monkeypatch, override):
    """With the policy's stack_max_numel only the smaller weights stack; the grads stay the
    oracle's."""
    sizes = _spy(monkeypatch, "stacked_wgrads", lambda spec, x, w, *a: w.numel())
    model, _, _ = _build("resnet")
    numels = sorted({m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d)})
    limit = numels[len(numels) // 2]
    override(stack_max_numel=limit)
    _steps_against_oracle("resnet", stacked_calls, "grad_sign")
    assert sizes and max(sizes) < limit
    assert any(n >= limit for n in numels)  # some convs were left to the two calls


def test_stacking_skips_sampled_forward_timed_and_computed_weights(stacked_calls):
    """The sampled mode's block of the batch, a term computed in the forward pass and a
    computed weight (its gradient flows on to the parameter) cannot share backprop's call:
    those calls keep the separate weight gradient."""
    _steps_against_oracle("resnet", stacked_calls, hebbian_at="forward")
    _steps_against_oracle("stdconv", stacked_calls, hebbian_at="backward")
    assert not stacked_calls
    model, x, cfg = _build("resnet")
    m = ghlc.prepare(model, (x,), config=dataclasses.replace(cfg, sample_fraction=0.5))
    loss_fn(m(x)).backward()
    assert not stacked_calls
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# ---- the split timing (H of the last units recomputed in backward) ------------------------


@pytest.mark.parametrize("timing", ["recompute", "auto", "fast"])
@pytest.mark.parametrize("over", ["none", "batch"])
@pytest.mark.parametrize("name", sweep())
def test_recompute_timing_matches_oracle(name, over, timing, monkeypatch, override):
    """The split (for large conv weights whose output is not kept; here on every plain conv of
    a PlasticCall, the last 2 units recomputed) on every zoo model, exact and batch-sampled,
    against the oracle: taken by ``hebbian_at="recompute"`` and, on CPU, by ``"auto"``; never
    by ``"fast"``."""
    override(hooked_calls=False)
    override(split_units=2)
    override(split_min_numel=0)
    split = _spy(monkeypatch, "hebbian_split", lambda spec, x, u, w, *a: w.shape[0])
    if over == "none":
        _steps_against_oracle(name, [], steps=2, hebbian_at=timing)
    else:
        monkeypatch.setattr(sampled, "draw", lambda n: n - 1)
        rule = {"sample_fraction": 0.25, "sample_over": over, "draw": lambda n: n - 1}
        _steps_against_oracle(
            name,
            [],
            steps=2,
            oracle_rule=rule,
            sample_fraction=0.25,
            sample_over=over,
            hebbian_at=timing,
        )
    model, lg = _compiled(name)
    fraction = 0.25 if over == "batch" else 1.0
    applies = any(
        str(i.role) == "plastic"
        and i.kind in ("conv1d", "conv2d", "conv3d")
        and i.groups == 1
        and i.weight_shape[0] >= 4
        and not i.out_saved
        # forward timing (a sampled block smaller than w: the block timing)
        and math.prod(i.weight_shape) < math.prod(i.out_shape) * fraction
        for i in lg.layers()
    )
    # the split was taken where it applies, and only there (never by "fast")
    assert bool(split) == (applies and timing != "fast")


def test_choose_at():
    """Per call: backward where u is kept anyway; otherwise the smaller of H (forward) and
    what backward would keep: u, or in the batch-sampled mode a copy of its block."""
    ct = rt_timing.choose_at
    for at in ("auto", "fast", "recompute"):
        assert ct(at, True, False, 200, 100) == "backward"  # u kept by backprop
        assert ct(at, True, True, 10, 100) == "forward"  # changed in place: a copy of u
        assert ct(at, False, False, 10, 100) == "forward"
        assert ct(at, False, False, 200, 100) == "backward"
        assert ct(at, False, False, 20, 100, 0.25) == "forward"
        assert ct(at, False, False, 30, 100, 0.25) == "block"
        assert ct(at, True, False, 30, 100, 0.25) == "backward"
    for at in ("forward", "backward"):
        assert ct(at, False, False, 30, 100, 0.25) == at


def test_auto_splits_on_cpu_only():
    from ghlc.runtime.timing import splits

    cpu, meta = torch.empty(1), torch.empty(1, device="meta")
    assert splits("auto", cpu) and splits("recompute", cpu) and splits("recompute", meta)
    assert not splits("auto", meta) and not splits("fast", cpu)
    assert not splits("forward", cpu) and not splits("backward", cpu)


@pytest.mark.parametrize(
    "kw",
    [
        {"local_rule": "hebb"},
        {"temperature": 0.3},
        {"normalisation": "unit"},
        {"global_signal": "none"},
    ],
    ids=["hebb", "temperature", "unit-norm", "pure-hebbian"],
)
def test_recompute_timing_matches_the_forward_timing(monkeypatch, kw, override):
    """Rule variants the oracle does not cover: ``recompute`` against ``fast`` (which takes
    the forward timing there), two steps with the in-call combine."""
    override(hooked_calls=False)
    override(split_units=2)
    override(split_min_numel=0)
    split = _spy(monkeypatch, "hebbian_split", lambda *a: 1)
    grads = {}
    for at in ("fast", "recompute"):
        grads[at] = _two_step_grads("vgg", hebbian_at=at, **kw)
        assert bool(split) == (at == "recompute")  # only the second run split
    _assert_same_grads(grads["fast"], grads["recompute"])


def test_recompute_timing_conditions():
    """Where the split applies: large plain convs, softmax over the layer, exact or
    batch-sampled."""
    from ghlc.graph import HebbianRule
    from ghlc.runtime.calls import CallSpec
    from ghlc.runtime.timing import split_units

    spec = CallSpec("conv", stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, nd=2)
    w = torch.empty(1536, 384, 3, 3)
    assert split_units(spec, w, HebbianRule()) == policy.current().split_units
    assert split_units(spec, w, HebbianRule(sample_fraction=0.25)) == policy.current().split_units
    for rule in (
        HebbianRule(competition="hard"),
        HebbianRule(competition="none"),
        HebbianRule(competition_scope="group"),
        HebbianRule(sample_fraction=0.25, sample_over="positions"),
    ):
        assert split_units(spec, w, rule) == 0, rule
    assert split_units(dataclasses.replace(spec, groups=2), w, HebbianRule()) == 0
    assert split_units(CallSpec("linear"), torch.empty(1536, 4096), HebbianRule()) == 0
    assert split_units(spec, torch.empty(512, 384, 3, 3), HebbianRule()) == 0  # too small
    with pytest.raises(ghlc.errors.ConfigError, match="hebbian_at"):
        ghlc.GHLConfig(hebbian_at="later")


@pytest.mark.parametrize("in_call", [False, True], ids=["after-backward", "in-call"])
@pytest.mark.parametrize("signal", ["none", "grad_sign"])
def test_the_global_signal_comes_from_the_plastic_parameter(signal, in_call, override):
    """The runtime combines by ``PlasticParam.global_signal`` (the IR's global-sign node),
    not by the rule's field: set against the rule, it decides GHL or pure Hebbian, after
    backward and in the call alike; the grads are the oracle's for that signal."""
    if in_call:
        override(in_call_combine_min_numel=0)
    model, x, cfg = _build("vgg")
    other = "grad_sign" if signal == "none" else "none"
    cfg = dataclasses.replace(cfg, global_signal=other)
    plain = copy.deepcopy(model)
    m = ghlc.prepare(model, (x,), config=cfg)
    names = _plastic_names(m)
    for n in names:
        ghlc.runtime.runtime_of(m).sites[n].state.global_signal = signal
    h, g, _ = oracle.run_plain(plain, (x,), names, loss_fn)
    expected = {n: oracle.expected_grad(h[n], g[n], signal) for n in names}
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    for _ in range(3):  # (the in-call combine from the second step on)
        opt.zero_grad()
        loss_fn(m(x)).backward()
        _assert_matches(m, expected, g)
        opt.step()
