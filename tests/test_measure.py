"""Kernels chosen by measurement: the choice follows the timings (a fake clock), the caches
(process and disk) and when nothing is measured; and every kernel the choice is made among
against an independent float64 correlation written here."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from ghlc.runtime import measure, policy
from ghlc.runtime.calls import CallSpec
from ghlc.runtime.correlation import by_units, forward_form, vendor


class FakeClock:
    """A clock that moves only when a fake kernel runs."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: dict[str, int] = {}

    def __call__(self) -> float:
        return self.now

    def kernel(self, name: str, seconds: float):
        self.calls.setdefault(name, 0)

        def run() -> None:
            self.calls[name] += 1
            self.now += seconds

        return run

    def kernels(self, seconds: dict[str, float]) -> dict:
        return {name: self.kernel(name, s) for name, s in seconds.items()}


def never(name: str):
    def run() -> None:
        raise AssertionError(f"candidate {name} was called")

    return run


NEVER = {"a": never("a"), "b": never("b")}
KEY = (torch.device("cpu"), (torch.float32, (8, 3, 5, 5), "contiguous"))


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv(measure.CACHE_ENV, raising=False)
    measure.reset()
    with policy.override(measure=True, measure_repeats=3):
        yield
    measure.reset()


# ---- the choice -----------------------------------------------------------------------------
@pytest.mark.parametrize("winner", ["a", "b", "c"])
def test_the_fastest_candidate_is_chosen(winner):
    clock = FakeClock()
    seconds = {n: (1.0 if n == winner else 2.0 + i) for i, n in enumerate("abc")}
    assert measure.choose("op", KEY, clock.kernels(seconds), "b", timer=clock) == winner
    assert clock.calls == {"a": 4, "b": 4, "c": 4}  # one warm-up, three timed calls each
    s = measure.stats()
    assert (s.measured, s.hits) == (1, 0)
    assert s.seconds == pytest.approx(4 * sum(seconds.values()))
    assert list(s.choices.values()) == [winner]


def test_the_median_decides_not_one_slow_call():
    clock = FakeClock()
    slow_once = iter([0.0, 10.0, 1.0, 1.0])  # warm-up, then one outlier among three

    def a() -> None:
        clock.now += next(slow_once)

    cands = {"a": a, "b": clock.kernel("b", 1.5)}
    assert measure.choose("op", KEY, cands, "b", timer=clock) == "a"


def test_ties_go_to_the_static_choice():
    clock = FakeClock()
    cands = clock.kernels({"a": 1.0, "b": 1.0, "c": 1.0})
    assert measure.choose("op", KEY, cands, "c", timer=clock) == "c"
    measure.reset()
    cands = clock.kernels({"a": 1.0, "b": 1.0, "c": 3.0})  # static slower: first fastest
    assert measure.choose("op", KEY, cands, "c", timer=clock) == "a"


def test_repeats_come_from_the_policy():
    clock = FakeClock()
    with policy.override(measure_repeats=6):
        measure.choose("op", KEY, clock.kernels({"a": 1.0, "b": 2.0}), "a", timer=clock)
    assert clock.calls == {"a": 7, "b": 7}


def test_a_cached_key_is_not_timed_again():
    clock = FakeClock()
    cands = clock.kernels({"a": 2.0, "b": 1.0})
    assert measure.choose("op", KEY, cands, "a", timer=clock) == "b"
    assert measure.choose("op", KEY, cands, "a", timer=clock) == "b"
    assert measure.choose("op", KEY, NEVER, "a", timer=clock) == "b"
    assert clock.calls == {"a": 4, "b": 4}
    s = measure.stats()
    assert (s.measured, s.hits) == (1, 2)
    measure.reset()
    assert measure.stats() == measure.MeasureStats()
    assert measure.choose("op", KEY, cands, "a", timer=clock) == "b"
    assert clock.calls == {"a": 8, "b": 8}


def test_threads_dtypes_shapes_and_memory_formats_are_different_keys():
    x = torch.zeros(2, 3, 4, 5)
    variants = [
        measure.operand_key(x.double()),
        measure.operand_key(x[:1]),
        measure.operand_key(x.to(memory_format=torch.channels_last)),
        measure.operand_key(x.transpose(2, 3)),
    ]
    base = measure.operand_key(x)
    assert len({base, *variants}) == 5
    clock = FakeClock()
    cands = clock.kernels({"a": 1.0, "b": 2.0})
    measure.choose("op", base, cands, "a", timer=clock)
    for k in variants:
        measure.choose("op", k, cands, "a", timer=clock)
    measure.choose("other op", base, cands, "a", timer=clock)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        measure.choose("op", base, cands, "a", timer=clock)
    finally:
        torch.set_num_threads(threads)
    measure.choose("op", base, cands, "a", timer=clock)
    s = measure.stats()
    assert (s.measured, s.hits) == (7, 1)
    assert len(s.choices) == 7


def test_operand_key_names_device_dtype_shape_and_format():
    x = torch.zeros(2, 3, 4, 5, 6, dtype=torch.float64)
    assert measure.operand_key(x, x.to(memory_format=torch.channels_last_3d)) == (
        torch.device("cpu"),
        (torch.float64, (2, 3, 4, 5, 6), "contiguous"),
        (torch.float64, (2, 3, 4, 5, 6), "channels_last_3d"),
    )
    assert measure.memory_format(x.transpose(0, 1)) == "strides(120, 360, 30, 6, 1)"


# ---- when nothing is measured ---------------------------------------------------------------
def test_measure_off_in_the_policy_returns_the_static_choice():
    with policy.override(measure=False):
        assert measure.choose("op", KEY, NEVER, "b") == "b"
    assert measure.stats() == measure.MeasureStats()


def test_env_ghlc_measure_0_returns_the_static_choice():
    code = (
        "import torch\n"
        "from ghlc.runtime import measure, policy\n"
        "def boom():\n"
        "    raise SystemExit('a candidate was called')\n"
        "assert policy.current().measure is False\n"
        "print(measure.choose('op', (torch.device('cpu'),), {'a': boom, 'b': boom}, 'b'))\n"
    )
    env = {**os.environ, "GHLC_MEASURE": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert (r.returncode, r.stdout.strip()) == (0, "b"), r.stderr


def test_one_candidate_is_not_timed():
    assert measure.choose("op", KEY, {"a": never("a")}, "a") == "a"
    assert measure.stats().measured == 0


def test_nothing_is_measured_while_compiling(monkeypatch):
    clock = FakeClock()
    measure.choose("op", KEY, clock.kernels({"a": 2.0, "b": 1.0}), "a", timer=clock)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert measure.choose("op", KEY, NEVER, "a") == "a"  # not even the cache: static
    assert measure.choose("new op", KEY, NEVER, "a") == "a"
    assert measure.stats().measured == 1


def test_while_capturing_a_cuda_graph_only_cached_choices_are_used(monkeypatch):
    clock = FakeClock()
    measure.choose("op", KEY, clock.kernels({"a": 2.0, "b": 1.0}), "a", timer=clock)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert measure.choose("op", KEY, NEVER, "a") == "b"
    assert measure.choose("new op", KEY, NEVER, "a") == "a"
    assert measure.stats().measured == 1


def test_a_failing_candidate_is_left_out_but_not_the_static_one():
    clock = FakeClock()

    def oom() -> None:
        raise torch.OutOfMemoryError("out of memory")

    cands = {"a": clock.kernel("a", 2.0), "b": oom}
    assert measure.choose("op", KEY, cands, "a", timer=clock) == "a"
    with pytest.raises(torch.OutOfMemoryError):
        measure.choose("op2", KEY, cands, "b", timer=clock)


def test_a_static_choice_outside_the_candidates_is_a_one_line_error():
    with pytest.raises(
        ValueError,
        match=r"^op: static choice 'c' is not among the candidates "
        r"a, b$",
    ):
        measure.choose("op", KEY, NEVER, "c")


# ---- the disk cache -------------------------------------------------------------------------
def test_the_disk_cache_round_trips_between_processes(tmp_path, monkeypatch):
    monkeypatch.setenv(measure.CACHE_ENV, str(tmp_path / "kernels"))
    clock = FakeClock()
    assert measure.choose("op", KEY, clock.kernels({"a": 2.0, "b": 1.0}), "a", timer=clock) == "b"
    assert measure.choose("op2", KEY, clock.kernels({"a": 1.0, "b": 2.0}), "b", timer=clock) == "a"
    (name,) = os.listdir(tmp_path / "kernels")
    assert name.startswith("cpu-") and name.endswith(".json")
    data = json.loads((tmp_path / "kernels" / name).read_text())
    assert data["format"] == 1 and data["machine"] == measure.machine_name(KEY[0])
    assert sorted(data["choices"].values()) == ["a", "b"]
    measure.reset()  # as a new process
    assert measure.choose("op", KEY, NEVER, "a") == "b"
    assert measure.choose("op2", KEY, NEVER, "b") == "a"
    assert measure.choose("op2", KEY, NEVER, "b") == "a"
    s = measure.stats()
    assert (s.measured, s.disk_hits, s.hits) == (0, 2, 1)
    measure.reset()
    with pytest.MonkeyPatch.context() as m:
        m.delenv(measure.CACHE_ENV)
        assert (
            measure.choose("op", KEY, clock.kernels({"a": 1.0, "b": 2.0}), "b", timer=clock) == "a"
        )  # without the folder: measured again


def test_a_disk_choice_no_longer_among_the_candidates_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv(measure.CACHE_ENV, str(tmp_path))
    clock = FakeClock()
    measure.choose("op", KEY, clock.kernels({"a": 2.0, "b": 1.0}), "a", timer=clock)
    measure.reset()
    assert measure.choose("op", KEY, clock.kernels({"a": 2.0, "c": 1.0}), "a", timer=clock) == "c"
    assert measure.stats().measured == 1


@pytest.mark.parametrize(
    "content",
    ["{not json", '{"format": 99, "choices": {}}', "[1, 2]", '{"format": 1, "choices": {"k": 3}}'],
)
def test_a_damaged_cache_file_warns_once_and_is_ignored(tmp_path, monkeypatch, content):
    monkeypatch.setenv(measure.CACHE_ENV, str(tmp_path))
    clock = FakeClock()
    measure.choose("op", KEY, clock.kernels({"a": 2.0, "b": 1.0}), "a", timer=clock)
    (name,) = os.listdir(tmp_path)
    (tmp_path / name).write_text(content)
    measure.reset()
    with pytest.warns(RuntimeWarning, match=r"^kernel cache .* ignored: ") as rec:
        assert (
            measure.choose("op", KEY, clock.kernels({"a": 1.0, "b": 2.0}), "b", timer=clock) == "a"
        )  # measured, not read
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            measure.choose("op2", KEY, clock.kernels({"a": 1.0, "b": 2.0}), "b", timer=clock) == "a"
        )
    assert measure.stats().measured == 2
    data = json.loads((tmp_path / name).read_text())  # rewritten whole
    assert sorted(data["choices"].values()) == ["a", "a"]
    assert os.listdir(tmp_path) == [name]  # no temporary file left


def test_an_unwritable_cache_folder_warns_and_the_choice_stands(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(measure.CACHE_ENV, str(tmp_path / "file" / "sub"))
    clock = FakeClock()
    with pytest.warns(RuntimeWarning, match=r"^kernel cache not written: "):
        assert (
            measure.choose("op", KEY, clock.kernels({"a": 2.0, "b": 1.0}), "a", timer=clock) == "b"
        )
    assert measure.choose("op", KEY, NEVER, "a") == "b"


# ---- the kernels measured, against a float64 correlation ------------------------------------
def ref_wgrad(x, cot, w_shape, stride, padding, dilation, groups, transposed, output_padding):
    """sum over batch and positions of cot (x) input patch, for every weight element: slices
    of the zero-padded input (of the padded cotangent for a transposed conv), one per kernel
    offset, contracted with einsum per group."""
    x, cot = x.double().contiguous(), cot.double().contiguous()
    k = w_shape[2:]
    pads = [q for p in reversed(padding) for q in (p, p)]
    # a plain conv reads the padded input at s*p + d*i for output position p; a transposed
    # conv reads its padded output at s*p + d*i for input position p
    src, idx = (cot, x) if transposed else (x, cot)
    src = F.pad(src, pads)
    out = torch.zeros(w_shape, dtype=torch.float64)
    for i in itertools.product(*(range(m) for m in k)):
        sl = tuple(
            slice(d * o, d * o + s * (n - 1) + 1, s)
            for d, o, s, n in zip(dilation, i, stride, idx.shape[2:])
        )
        patch = src[(slice(None), slice(None), *sl)]
        for g in range(groups):
            a = idx.shape[1] // groups
            b = patch.shape[1] // groups
            ig = idx[:, g * a : (g + 1) * a].flatten(2)
            pg = patch[:, g * b : (g + 1) * b].flatten(2)
            if transposed:  # weight (C_in, C_out / groups, *k): input channel first
                out[(slice(g * a, (g + 1) * a), slice(None), *i)] = torch.einsum(
                    "ncp,nop->co", ig, pg
                )
            else:  # weight (C_out, C_in / groups, *k)
                out[(slice(g * a, (g + 1) * a), slice(None), *i)] = torch.einsum(
                    "nop,ncp->oc", ig, pg
                )
    return out


# nd, C_in, C_out, kernel, stride, padding, dilation, groups, transposed, out_pad, size
CASES = {
    "conv1d": (1, 3, 5, (3,), (1,), (1,), (1,), 1, False, (0,), (9,)),
    "conv1d strided dilated": (1, 4, 6, (3,), (2,), (2,), (2,), 1, False, (0,), (13,)),
    "conv1d 260 units": (1, 2, 260, (3,), (1,), (1,), (1,), 1, False, (0,), (6,)),
    "conv2d": (2, 3, 7, (3, 2), (1, 1), (1, 0), (1, 1), 1, False, (0, 0), (6, 5)),
    "conv2d kernel 3x1": (2, 3, 4, (3, 1), (1, 1), (1, 0), (1, 1), 1, False, (0, 0), (5, 4)),
    "conv2d strided padded dilated": (
        2,
        3,
        5,
        (3, 2),
        (2, 1),
        (1, 2),
        (1, 2),
        1,
        False,
        (0, 0),
        (9, 7),
    ),
    "conv2d groups": (2, 4, 6, (3, 3), (1, 2), (1, 1), (1, 1), 2, False, (0, 0), (6, 7)),
    "conv2d depthwise": (2, 4, 8, (3, 3), (1, 1), (1, 1), (1, 1), 4, False, (0, 0), (5, 5)),
    "conv3d": (3, 2, 5, (2, 3, 2), (1, 2, 1), (1, 1, 0), (1, 1, 2), 1, False, (0, 0, 0), (4, 6, 5)),
    "conv_transpose1d": (1, 4, 6, (3,), (2,), (1,), (2,), 2, True, (1,), (5,)),
    "conv_transpose2d": (2, 3, 4, (2, 3), (2, 1), (0, 1), (1, 1), 1, True, (1, 0), (4, 3)),
    "conv_transpose3d": (
        3,
        2,
        4,
        (2, 2, 2),
        (2, 1, 1),
        (1, 0, 0),
        (1, 1, 1),
        2,
        True,
        (0, 0, 0),
        (3, 3, 2),
    ),
}
LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def conv_case(name: str, layout: str):
    nd, cin, cout, k, s, p, d, g, tr, op, size = CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    w_shape = (cin, cout // g, *k) if tr else (cout, cin // g, *k)
    x = torch.randn(2, cin, *size, dtype=torch.float64, generator=gen)
    w = torch.randn(w_shape, dtype=torch.float64, generator=gen)
    u = torch.convolution(x, w, None, s, p, d, tr, op, g)
    cot = torch.randn(u.shape, dtype=torch.float64, generator=gen)
    if layout == "channels_last":
        x, w, cot = (t.to(memory_format=LAST[t.dim()]) for t in (x, w, cot))
    spec = CallSpec("conv", nd, tr, s, p, d, op, g)
    return spec, x, w, cot, ref_wgrad(x, cot, w_shape, s, p, d, g, tr, op)


def kernels_for(spec: CallSpec, x, w, cot) -> dict:
    """The candidates that apply to this call (the forward form and unit blocks need a plain
    conv whose output units lie along the weight's dim 0)."""
    out = {"wgrad": lambda: vendor(spec, x, w, cot)}
    if spec.groups == 1 and not spec.transposed:
        out["forward form"] = lambda: forward_form(spec, x, w, cot)
        for units in (1, 2, 3, 256):
            out[f"units {units}"] = lambda u=units: by_units(spec, x, w, cot, u)
    return out


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == torch.float64, what
    err = (got - ref).abs().max().item()
    assert err <= 1e-12 * ref.abs().max().item(), f"{what}: max error {err:.3g}"


@pytest.mark.parametrize(
    "name,layout",
    [
        (n, lay)
        for n, c in CASES.items()
        for lay in (("contiguous",) if c[0] == 1 else ("contiguous", "channels_last"))
    ],
)
def test_every_kernel_candidate_matches_the_float64_correlation(name, layout):
    spec, x, w, cot, ref = conv_case(name, layout)
    assert ref.abs().max() > 0
    cands = kernels_for(spec, x, w, cot)
    assert len(cands) == (1 if spec.groups > 1 or spec.transposed else 6)
    for kname, fn in cands.items():
        assert_close(fn(), ref, f"{name} {layout} {kname}")


def test_the_measured_choice_of_real_kernels_computes_the_same_numbers():
    spec, x, w, cot, ref = conv_case("conv2d strided padded dilated", "channels_last")
    cands = kernels_for(spec, x, w, cot)
    key = (*measure.operand_key(x, w, cot), spec)
    chosen = measure.choose("correlation", key, cands, "wgrad")
    assert chosen in cands and measure.stats().measured == 1
    assert measure.choose("correlation", key, cands, "wgrad") == chosen
    assert_close(cands[chosen](), ref, chosen)
