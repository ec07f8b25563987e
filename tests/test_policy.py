"""The dispatch policy: ``policy.override`` scopes, and every field that picks among ways of
computing the same numbers does pick that way, with the oracle's gradients either way."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import pytest
from test_semantics import _steps_against_oracle

import ghlc
import ghlc.runtime
from ghlc.runtime import correlation, fast, function, policy
from ghlc.runtime.status import STATUS


def test_override_restores_on_exit_and_on_exception():
    before = policy.current()
    with policy.override(block_units=7) as p:
        assert policy.current() is p and p.block_units == 7
    assert policy.current() is before
    with pytest.raises(KeyError), policy.override(block_units=9):
        assert policy.current().block_units == 9
        raise KeyError("inside")
    assert policy.current() is before


def test_overrides_nest_and_unwind_in_order():
    base = policy.current()
    with policy.override(block_units=7):
        with policy.override(split_units=5) as inner:
            assert (inner.block_units, inner.split_units) == (7, 5)
            with policy.override(block_units=3):
                assert (policy.current().block_units, policy.current().split_units) == (3, 5)
            assert policy.current() is inner
        assert policy.current().split_units == base.split_units
        assert policy.current().block_units == 7
    assert policy.current() is base


def test_unknown_fields_are_a_one_line_error():
    before = policy.current()
    with pytest.raises(
        ghlc.ConfigError,
        match=r"^unknown dispatch policy field\(s\): "
        r"BLOCK_UNITS, nope$",
    ):
        with policy.override(nope=1, BLOCK_UNITS=3):
            pass
    assert policy.current() is before


def test_the_policy_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.current().block_units = 3  # type: ignore[misc]


OLD_KNOBS = (
    "HOOKS",
    "BLOCK_UNITS",
    "WGRAD_BLOCK_MIN_NUMEL",
    "WGRAD_BLOCK_DEVICES",
    "FORWARD_WGRAD_MAX_REDUCTION",
    "FORWARD_WGRAD_MIN_MACS",
    "FORWARD_WGRAD_MIN_CHANNELS",
    "FORWARD_WGRAD_DEVICES",
    "ACTIVITY_SUM_DEVICES",
    "SPLIT_UNITS",
    "SPLIT_MIN_NUMEL",
    "SPLIT_DEVICES",
    "FUSE_MIN_NUMEL",
    "FUSE_DEVICES",
    "STACK_DEVICES",
    "STACK_MAX_NUMEL",
    "TRITON_EAGER_MIN_NUMEL",
    "DOT_BLOCK_NUMEL",
    "SCALER_IN_USE",
    "_mode",
    "_capturing",
    "_stacking",
    "_broken",
    "_triton_broken",
)


def test_no_runtime_module_keeps_a_tuning_global():
    """The old module-level knobs are gone from every runtime module (a stale one would be
    patched by tests and benchmarks to no effect)."""
    for info in pkgutil.iter_modules(ghlc.runtime.__path__):
        if info.name == "triton_softmax":  # (imports triton)
            continue
        mod = importlib.import_module(f"ghlc.runtime.{info.name}")
        left = [k for k in OLD_KNOBS if hasattr(mod, k)]
        assert not left, (info.name, left)


def _count(monkeypatch, module, name: str) -> list:
    """Count the calls of ``module.<name>`` (still calling it)."""
    calls: list = []
    orig = getattr(module, name)

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(module, name, spy)
    return calls


# (policy fields, the function each routes through, the zoo model, config changes)
FIELDS = {
    "hooked_calls": ({"hooked_calls": False}, (function, "_hooked_call"), "vgg", {}),
    "in_call_combine": ({"in_call_combine_min_numel": 0}, (function, "combine_in_call"), "vgg", {}),
    "unit_blocks": (
        {"blocked_min_numel": 0, "block_units": 3, "forward_form_devices": ()},
        (correlation, "unit_blocks"),
        "vgg",
        {},
    ),
    "forward_form": (
        {
            "forward_form_max_reduction": 1 << 62,
            "forward_form_min_macs": 0,
            "forward_form_min_channels": 0,
        },
        (correlation, "forward_form"),
        "vgg",
        {},
    ),
    "activity_sums": ({"activity_sum_devices": ()}, (fast, "unit_activity"), "mlp", {}),
    "split": (
        {"hooked_calls": False, "split_min_numel": 0, "split_units": 2},
        (function, "hebbian_split"),
        "vgg",
        {"hebbian_at": "recompute"},
    ),
    "stack": (
        {"stack_devices": ("cpu",)},
        (function, "stacked_wgrads"),
        "resnet",
        {"hebbian_at": "backward"},
    ),
}
# where the default policy takes the route (on CPU): the field turns it off
DEFAULT_TAKES = {"hooked_calls", "activity_sums"}


@pytest.mark.parametrize("field", list(FIELDS))
def test_each_field_picks_its_way_with_the_oracle_gradients(field, monkeypatch, override):
    """Each field changes the path it names (counted), and the gradients stay the oracle's
    under the default policy and under the override (kernels by the static thresholds: with
    ``measure`` on, the timings would decide among the correlation's ways)."""
    fields, (module, name), model, kw = FIELDS[field]
    override(measure=False)
    monkeypatch.setattr(STATUS, "capturing", 1 if field == "stack" else STATUS.capturing)
    monkeypatch.setattr(STATUS, "stacking", 1 if field == "stack" else STATUS.stacking)
    calls = _count(monkeypatch, module, name)
    _steps_against_oracle(model, [], steps=2, **kw)
    by_default = len(calls)
    calls.clear()
    with policy.override(**fields):
        _steps_against_oracle(model, [], steps=2, **kw)
    overridden = len(calls)
    if field in DEFAULT_TAKES:
        assert by_default > 0 and overridden == 0
    else:
        assert by_default == 0 and overridden > 0


def test_device_and_size_fields_gate_their_routes(monkeypatch):
    """The device lists and sizes not covered above: the split timing's devices, the in-call
    combine's devices and size, and the per-unit dots' block size (counted in kernel calls,
    the same sums)."""
    import torch

    from ghlc.runtime import accumulate, fused, timing

    cpu = torch.empty(4, 3)
    assert timing.splits("auto", cpu)
    with policy.override(split_devices=()):
        assert not timing.splits("auto", cpu) and timing.splits("recompute", cpu)
    assert not accumulate.in_call_sized(cpu)
    with policy.override(in_call_combine_min_numel=12):
        assert accumulate.in_call_sized(cpu) and not accumulate.in_call_sized(cpu[:3])
        with policy.override(in_call_combine_devices=("cuda",)):
            assert not accumulate.in_call_sized(cpu)
    g = torch.Generator().manual_seed(0)
    c, w = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    ref = (c.double() * w.double()).sum(1)
    calls = _count(monkeypatch, torch.linalg, "vecdot")
    for block, n in ((1 << 18, 1), (10, 3), (5, 6)):
        calls.clear()
        with policy.override(dot_block_numel=block):
            got = fused.row_dots(c, w)
        assert len(calls) == n and torch.allclose(got.double(), ref, rtol=1e-6), block


def test_the_static_choice_is_a_candidate_and_every_candidate_gives_the_same_sums():
    """For linear, plain, strided, 1x1, grouped and transposed calls, under the default policy
    and one that makes every route pay: ``static_choice`` names one of ``candidates``, every
    candidate gives the vendor call's sums (float64), and ``weight_vjp`` gives them too."""
    import torch

    from ghlc.runtime.calls import CallSpec

    gen = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    conv = CallSpec(
        "conv", 2, stride=(1, 1), padding=(1, 1), dilation=(1, 1), output_padding=(0, 0)
    )
    rep = dataclasses.replace
    cases = [
        (CallSpec("linear"), rnd(6, 5), rnd(7, 5)),
        (conv, rnd(2, 3, 6, 6), rnd(7, 3, 3, 3)),
        (rep(conv, stride=(2, 1)), rnd(2, 3, 6, 6), rnd(7, 3, 3, 3)),
        (conv, rnd(2, 3, 6, 6), rnd(7, 3, 1, 1)),
        (rep(conv, groups=3), rnd(2, 3, 6, 6), rnd(6, 1, 3, 3)),
        (rep(conv, transposed=True), rnd(2, 3, 6, 6), rnd(3, 5, 3, 3)),
    ]
    eager = {
        "block_units": 3,
        "blocked_min_numel": 0,
        "forward_form_min_macs": 0,
        "forward_form_min_channels": 0,
        "forward_form_max_reduction": 1 << 62,
    }
    seen = set()
    for fields in ({}, eager, dict(eager, forward_form_devices=())):
        with policy.override(**fields):
            for spec, x, w in cases:
                cot = torch.randn(spec.run(x, w, None).shape, dtype=torch.float64, generator=gen)
                ways = correlation.candidates(spec, x, w, cot)
                static = correlation.static_choice(spec, w, cot, policy.current())
                assert static in ways, (spec, static, list(ways))
                seen.add(static)
                want = (correlation.matmul if spec.kind == "linear" else correlation.vendor)(
                    spec, x, w, cot
                )
                for name, way in ways.items():
                    assert torch.allclose(way(spec, x, w, cot), want, rtol=1e-12, atol=1e-12), (
                        spec,
                        name,
                    )
                assert torch.allclose(
                    correlation.weight_vjp(spec, x, w, cot), want, rtol=1e-12, atol=1e-12
                )
    assert seen == {"matmul", "vendor", "unit_blocks", "forward_form"}
